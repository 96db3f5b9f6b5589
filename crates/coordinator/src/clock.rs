//! An injectable clock, so lease and timeout logic can be tested without waiting.

use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The system's wall clock as it read at start, moved on by the time since the system booted
/// (`CLOCK_BOOTTIME`: it never steps, and it counts a suspend): a step of the wall clock while
/// the coordinator runs (NTP correcting minutes, a VM's clock set after a resume) neither
/// expires every lease at once nor stops them from expiring. Timestamps it gives stay close
/// to the wall clock, off by at most the steps it took since the start (a restart reads it
/// afresh).
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    wall_at_start_ms: i64,
    boot_at_start_ms: i64,
}

impl SystemClock {
    pub fn new() -> Self {
        Self::anchored(wall_ms())
    }

    fn anchored(wall_at_start_ms: i64) -> Self {
        SystemClock {
            wall_at_start_ms,
            boot_at_start_ms: boot_ms(),
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
        let since = (boot_ms() - self.boot_at_start_ms).max(0);
        self.wall_at_start_ms.saturating_add(since)
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
    fn the_system_clock_moves_with_time_not_with_the_wall_clock_once_started() {
        // Started when the wall clock read an hour ago (as if stepped an hour on since):
        // it still reads an hour ago, moving on only as time passes.
        let hour = 3_600_000;
        let c = SystemClock::anchored(wall_ms() - hour);
        let a = c.now_ms();
        assert!((wall_ms() - hour - a).abs() < 1_000, "{a}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = c.now_ms();
        assert!((20..1_000).contains(&(b - a)), "{a} {b}");
        // A clock started now reads the wall clock.
        assert!((SystemClock::new().now_ms() - wall_ms()).abs() < 1_000);
    }
}
