//! Whether a job's "No space left on device" is this host's disk being full, or only words
//! a builder or an expression printed: only the former pauses the agent.

use crate::Shared;
use std::sync::Mutex;

/// Most times one job's log has the free space read: a builder may print the words without end.
const MAX_SAMPLES: u32 = 16;

/// The phrases, as [`nixfarm_nix::messages::is_disk_full`] knows them; the longest bounds
/// how much of a chunk is kept for one split across two.
const CARRY: usize = 32;

/// Where a job's log goes (`sink`), and what watches it for a full disk.
pub(super) struct Logged<'a, F> {
    pub sink: F,
    pub disk: &'a DiskWatch,
}

/// The least free space seen while a job's log said the disk was full.
#[derive(Debug, Default)]
pub(super) struct DiskWatch {
    inner: Mutex<Watch>,
}

#[derive(Debug, Default)]
struct Watch {
    /// The end of the previous chunk: the words may straddle two.
    carry: Vec<u8>,
    samples: u32,
    low_mib: Option<u64>,
}

/// The free space (MiB) under which `shared`'s host counts as full: also its own
/// `min_free_mib`, when more.
fn believed_below(shared: &Shared) -> u64 {
    nixfarm_nix::room::BELIEVED_BELOW_MIB.max(shared.cfg.min_free_mib)
}

impl DiskWatch {
    /// Looks at a chunk of a job's log: when it says the disk is full, reads the free space
    /// at once, while what filled the disk is still there (Nix removes a failed build's
    /// files as soon as its builder exits).
    pub(super) fn observe(&self, chunk: &[u8]) {
        let Ok(mut w) = self.inner.lock() else {
            return;
        };
        // The chunk as it is (no copy of a build's whole log), and where it meets the
        // previous one.
        let says_in = |b: &[u8]| nixfarm_nix::messages::is_disk_full(&String::from_utf8_lossy(b));
        let mut edge = std::mem::take(&mut w.carry);
        edge.extend_from_slice(&chunk[..chunk.len().min(CARRY)]);
        let says = says_in(chunk) || says_in(&edge);
        // Kept for the next chunk only when the words were not found (found, they are
        // not counted twice).
        w.carry = if says {
            Vec::new()
        } else if chunk.len() >= CARRY {
            chunk[chunk.len() - CARRY..].to_vec()
        } else {
            edge[edge.len().saturating_sub(CARRY)..].to_vec()
        };
        if says && w.samples < MAX_SAMPLES {
            w.samples += 1;
            if let Some(free) = nixfarm_nix::room::least_free_mib() {
                w.low_mib = Some(w.low_mib.map_or(free, |l| l.min(free)));
            }
        }
    }

    /// Whether this host's disk was full as the job said: the least free space seen while
    /// its log said so, or now, is under the bar. Err with the free space when it was not.
    pub(super) fn confirms(&self, shared: &Shared) -> Result<(), u64> {
        let seen = self.inner.lock().ok().and_then(|w| w.low_mib);
        confirmed(shared, seen)
    }
}

/// [`DiskWatch::confirms`] for a job whose log was not watched (an evaluation's error).
pub(super) fn confirmed(shared: &Shared, seen: Option<u64>) -> Result<(), u64> {
    // Unreadable: believed, as before this check existed.
    let Some(low) = seen
        .into_iter()
        .chain(nixfarm_nix::room::least_free_mib())
        .min()
    else {
        return Ok(());
    };
    if low < believed_below(shared) {
        Ok(())
    } else {
        Err(low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(w: &DiskWatch) -> (u32, Option<u64>) {
        let w = w.inner.lock().unwrap();
        (w.samples, w.low_mib)
    }

    #[test]
    fn the_free_space_is_read_when_the_log_says_the_disk_is_full_and_only_then() {
        let w = DiskWatch::default();
        w.observe(b"compiling foo.c\n");
        assert_eq!(seen(&w), (0, None));
        // The words split across two chunks still count.
        w.observe(b"cc1: error writing foo.o: No space le");
        w.observe(b"ft on device\n");
        let (samples, low) = seen(&w);
        assert_eq!(samples, 1);
        assert!(low.is_some(), "the free space was read");
        w.observe(b"linking\n");
        assert_eq!(seen(&w).0, 1, "once per saying");
        // A builder printing them without end has the space read a bounded number of times.
        for _ in 0..1000 {
            w.observe(b"No space left on device\n");
        }
        assert_eq!(seen(&w).0, MAX_SAMPLES);
    }
}
