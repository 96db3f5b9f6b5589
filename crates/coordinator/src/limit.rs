//! Guessing tokens is bounded per address: after `MAX_FAILURES` wrong tokens within
//! `WINDOW` (client or agent tokens over gRPC; the web UI's bearer header, login form or
//! cookie; one count for all of them; the farm cache keeps a count of its own), an address
//! is refused whatever needs a token, right token included, until its window ends (gRPC:
//! RESOURCE_EXHAUSTED; HTTP: 429). Tokens are meant to be random secrets, so this is
//! defence in depth against weak ones; clients behind one proxy share its address. An IPv6
//! address counts by its /64 prefix: one host is routinely given a whole /64, and could
//! otherwise send each guess from an address of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong tokens an address may send within a window.
pub const MAX_FAILURES: u32 = 10;
/// How long an address's failures count.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; past it the oldest windows are forgotten first.
const MAX_TRACKED: usize = 10_000;

/// What a held-back address is told: the cause and how long to wait.
pub fn refusal(wait: Duration) -> String {
    format!(
        "too many wrong tokens from this address ({MAX_FAILURES} in {} s): try again in {} s",
        WINDOW.as_secs(),
        wait.as_secs().max(1)
    )
}

/// Wrong tokens per client address, in fixed windows.
#[derive(Debug, Default)]
pub struct Limiter {
    seen: Mutex<HashMap<IpAddr, Window>>,
}

/// What failures are counted under: an IPv4 address (also when it comes IPv4-mapped), or an
/// IPv6 address's /64 prefix.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

impl Limiter {
    /// None when `ip` may try a token at `now`; else how long until it may.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let seen = self.seen.lock().ok()?;
        let w = seen.get(&source(ip))?;
        let left = WINDOW.checked_sub(now.saturating_duration_since(w.start))?;
        (w.failures >= MAX_FAILURES && !left.is_zero()).then_some(left)
    }

    /// Counts a wrong token from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let ip = source(ip);
        if seen.len() >= MAX_TRACKED && !seen.contains_key(&ip) {
            seen.retain(|_, w| now.saturating_duration_since(w.start) < WINDOW);
            if seen.len() >= MAX_TRACKED
                && let Some(oldest) = seen.iter().min_by_key(|(_, w)| w.start).map(|(k, _)| *k)
            {
                seen.remove(&oldest);
            }
        }
        let w = seen.entry(ip).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now.saturating_duration_since(w.start) >= WINDOW {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_held_back_after_too_many_wrong_tokens_until_its_window_ends() {
        let l = Limiter::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..MAX_FAILURES {
            assert_eq!(l.blocked(a, t0), None, "after {i} failures");
            l.failed(a, t0 + Duration::from_secs(i as u64));
        }
        let wait = l
            .blocked(a, t0 + Duration::from_secs(20))
            .expect("held back");
        assert_eq!(wait, Duration::from_secs(40));
        assert_eq!(l.blocked(b, t0), None, "another address is not");
        // The window ends: a fresh start.
        assert_eq!(l.blocked(a, t0 + WINDOW), None);
        l.failed(a, t0 + WINDOW);
        assert_eq!(l.blocked(a, t0 + WINDOW), None);
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let l = Limiter::default();
        let t0 = Instant::now();
        // Each guess from another address of one /64.
        for i in 0..MAX_FAILURES {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            assert_eq!(l.blocked(ip, t0), None, "after {i} failures");
            l.failed(ip, t0);
        }
        let fresh: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(l.blocked(fresh, t0).is_some(), "the whole /64 is held back");
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(l.blocked(other, t0), None, "the next /64 is not");
        // An IPv4 address counts the same whether it comes mapped or not.
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            l.failed("::ffff:192.0.2.7".parse().unwrap(), t0);
        }
        assert!(l.blocked(v4, t0).is_some());
        assert_eq!(l.blocked("192.0.2.8".parse().unwrap(), t0), None);
    }

    #[test]
    fn tracked_addresses_are_bounded() {
        let l = Limiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 100) {
            l.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(l.seen.lock().unwrap().len() <= MAX_TRACKED);
    }
}
