//! Warnings said once: the first of each distinct message is logged, repeats are counted and
//! summed up in one line at most once a minute, so a cache refusing every upload costs a few
//! log lines, not one per path.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Distinct messages remembered; past it the oldest are forgotten (and may be said again).
const MAX_KEYS: usize = 256;

pub struct Repeats {
    every: Duration,
    /// Message → (repeats not yet said, when it was last said).
    seen: Mutex<BTreeMap<String, (u64, Instant)>>,
}

impl Repeats {
    pub const fn new(every: Duration) -> Repeats {
        Repeats {
            every,
            seen: Mutex::new(BTreeMap::new()),
        }
    }

    /// Logs `key` as a warning unless it was said recently; then it is counted, and the count
    /// goes with the next line that is said.
    pub fn warn(&self, key: &str) {
        match self.note(key, Instant::now()) {
            Some(0) => tracing::warn!("{key}"),
            Some(n) => tracing::warn!("{key} (and {n} more times since it was last said)"),
            None => {}
        }
    }

    /// Whether `key` is said at `now`: `Some(repeats since it was last said)`, or `None` to
    /// keep quiet.
    pub fn note(&self, key: &str, now: Instant) -> Option<u64> {
        let Ok(mut seen) = self.seen.lock() else {
            return Some(0);
        };
        if let Some((count, last)) = seen.get_mut(key) {
            if now.saturating_duration_since(*last) < self.every {
                *count += 1;
                return None;
            }
            let n = *count;
            *count = 0;
            *last = now;
            return Some(n);
        }
        if seen.len() >= MAX_KEYS
            && let Some(oldest) = seen
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, _)| k.clone())
        {
            seen.remove(&oldest);
        }
        seen.insert(key.to_string(), (0, now));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_distinct_message_once_then_a_count() {
        let r = Repeats::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(r.note("HTTP 403", t0), Some(0));
        for i in 1..=257 {
            assert_eq!(r.note("HTTP 403", t0 + Duration::from_millis(i)), None);
        }
        // Another error is its own line.
        assert_eq!(r.note("HTTP 500", t0), Some(0));
        // A minute on, the next repeat is said with how many were kept quiet.
        assert_eq!(r.note("HTTP 403", t0 + Duration::from_secs(61)), Some(257));
        assert_eq!(r.note("HTTP 403", t0 + Duration::from_secs(62)), None);
    }

    #[test]
    fn memory_is_bounded() {
        let r = Repeats::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            r.note(&format!("error {i}"), t0 + Duration::from_millis(i));
        }
        assert!(r.seen.lock().unwrap().len() <= MAX_KEYS);
    }
}
