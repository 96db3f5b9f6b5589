//! A pusher's tuning, and its defaults.

use crate::Compression;
use std::time::Duration;

/// Tuning; the defaults follow the reference Cachix client, with smaller parts to bound memory.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per multipart part (object stores refuse parts under 5 MiB but the last).
    pub part_size: usize,
    /// Parts of one path in flight.
    pub parts_in_flight: usize,
    /// Paths uploaded at once (within one wave of the closure).
    pub paths_in_flight: usize,
    /// Explicit compression (None: the cache's preference, else zstd).
    pub compression: Option<Compression>,
    /// Attempts per request on 429, 5xx and connection errors.
    pub request_attempts: u32,
    /// Time a request may spend retrying in all (the reference client's 90 s): no new
    /// attempt starts after it.
    pub retry_budget: Duration,
    /// Extra attempts per path after a failed upload.
    pub path_retries: u32,
    /// First retry delay; doubles, jittered, capped at 15 s.
    pub backoff: Duration,
    pub zstd_level: i32,
    /// The cache signs what it is sent (a nixfarm coordinator's farm cache): narinfos go
    /// unsigned when this pusher has no key.
    pub server_signs: bool,
    /// A push of a closure ends within this time plus its NARs' bytes at
    /// [`Options::push_floor_rate`]: a cache that answers each request just before its
    /// timeout, and again on each retry, holds a build no longer than that.
    pub push_floor: Duration,
    /// Bytes per second a push is given at least (of NAR size), for its deadline.
    pub push_floor_rate: u64,
    /// Longest a push waits on paths another pusher claimed before it uploads them itself
    /// too: a claim renewed by a pusher that never uploads (broken, or dishonest) must not
    /// hold others' pushes until their deadline. Default 120 s.
    pub claim_patience: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            part_size: 8 << 20,
            parts_in_flight: 4,
            paths_in_flight: 8,
            compression: None,
            request_attempts: 12,
            retry_budget: Duration::from_secs(90),
            path_retries: 3,
            backoff: Duration::from_millis(200),
            zstd_level: 3,
            server_signs: false,
            push_floor: Duration::from_secs(600),
            push_floor_rate: 256 << 10,
            claim_patience: Duration::from_secs(120),
        }
    }
}
