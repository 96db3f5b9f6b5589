//! A pusher's HTTP requests: sent again on connection errors, 429 and 5xx with jittered
//! backoff, within a budget; a redirect is never followed, and a write counts only on a 2xx.

use crate::text::{error_chain, one_line};
use crate::{Pusher, StoreError, http};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn retryable(status: reqwest::StatusCode) -> bool {
    status.as_u16() == 429 || status.is_server_error()
}

impl Pusher {
    /// [`Pusher::send`] for a request that writes: only a 2xx says it was done (a 404 is
    /// a refusal here, not an answer).
    pub(crate) async fn send_write(
        &self,
        what: &str,
        mk: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, StoreError> {
        let r = self.send(what, mk).await?;
        if r.status().is_success() {
            return Ok(r);
        }
        Err(StoreError::Refused(format!("{what}: HTTP {}", r.status())))
    }

    /// Sends a request, retrying on connection errors, 429 and 5xx with jittered backoff.
    /// A 2xx or a 404 is the answer (a lookup's "not there"); requests that write use
    /// [`Pusher::send_write`]. A redirect is an error.
    pub(crate) async fn send(
        &self,
        what: &str,
        mk: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, StoreError> {
        let mut delay = self.opts.backoff;
        let mut last = String::new();
        let started = std::time::Instant::now();
        for attempt in 0..self.opts.request_attempts.max(1) {
            if attempt > 0 {
                if started.elapsed() + delay > self.opts.retry_budget {
                    break;
                }
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                let jitter = delay.mul_f64(0.5 + fastrand::f64());
                tokio::time::sleep(jitter).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
            match mk().send().await {
                Ok(r) if retryable(r.status()) => {
                    if let Some(s) = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        delay = Duration::from_secs(s.min(15));
                    }
                    last = format!("{what}: HTTP {}", r.status());
                }
                Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => return Ok(r),
                Ok(r) => {
                    let status = r.status();
                    let body = http::read_prefix(r, 4096).await;
                    let body = String::from_utf8_lossy(&body);
                    let said = one_line(&body, 120);
                    let why = if said.is_empty() {
                        format!("{what}: HTTP {status}")
                    } else {
                        format!("{what}: HTTP {status}: {said}")
                    };
                    return Err(if status.as_u16() == 409 {
                        StoreError::Conflict(why)
                    } else {
                        StoreError::Refused(why)
                    });
                }
                Err(e) => last = format!("{what}: {}", error_chain(&e)),
            }
        }
        Err(StoreError::Http(format!("{last} (gave up after retries)")))
    }
}
