//! An injectable clock, so lease and timeout logic can be tested without waiting.

use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The system's wall clock as it read at start, moved on by the time since the system booted
/// (`CLOCK_BOOTTIME`: it never steps, and it counts a suspend): a step of the wall clock while
/// the coordinator runs (NTP correcting a few minutes) neither expires every lease at once nor
/// holds them. A step of more than [`FOLLOW_STEP_MS`] (a clock set wholesale: one that was
/// wrong when the coordinator started, before NTP) is followed, so stored and shown times
/// stay the wall clock's.
#[derive(Debug)]
pub struct SystemClock {
    /// The wall clock's reading less the time since boot, ms: now is boot time plus this.
    offset_ms: AtomicI64,
}

/// How far the wall clock may step away from [`SystemClock`] before it is followed: more
/// than a lease or an upload claim lasts, less than any retention.
pub const FOLLOW_STEP_MS: i64 = 10 * 60 * 1000;

impl SystemClock {
    pub fn new() -> Self {
        Self::anchored(wall_ms())
    }

    fn anchored(wall_at_start_ms: i64) -> Self {
        SystemClock {
            offset_ms: AtomicI64::new(wall_at_start_ms - boot_ms()),
        }
    }
}

/// Milliseconds since the system booted, suspends included.
fn boot_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given, which lives on this
    // stack frame; CLOCK_BOOTTIME exists on every Linux since 2.6.39.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec.saturating_mul(1000) + ts.tv_nsec / 1_000_000
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let boot = boot_ms();
        let mine = boot.saturating_add(self.offset_ms.load(Ordering::Relaxed));
        let wall = wall_ms();
        if (wall - mine).abs() > FOLLOW_STEP_MS {
            self.offset_ms.store(wall - boot, Ordering::Relaxed);
            return wall;
        }
        mine
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        ManualClock(AtomicI64::new(start_ms))
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_ignores_small_steps_of_the_wall_clock_and_follows_large_ones() {
        // Started when the wall clock read a minute ago (as if stepped a minute on since):
        // it still reads a minute ago, moving on only as time passes.
        let minute = 60_000;
        let c = SystemClock::anchored(wall_ms() - minute);
        let a = c.now_ms();
        assert!((wall_ms() - minute - a).abs() < 1_000, "{a}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = c.now_ms();
        assert!((20..1_000).contains(&(b - a)), "{a} {b}");
        // A day off (a clock set wholesale since): the wall clock's reading, from then on.
        let c = SystemClock::anchored(wall_ms() - 24 * 60 * minute);
        assert!((c.now_ms() - wall_ms()).abs() < 1_000);
        assert!((c.now_ms() - wall_ms()).abs() < 1_000);
    }
}
