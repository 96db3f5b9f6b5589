//! Who uploads a path when several pushers share a cache.

/// Decides which pusher uploads a path when several push overlapping closures to one cache
/// (agents on separate hosts: the coordinator decides).
pub trait Arbiter: Sync {
    /// Per path, in order: true when this pusher should upload it, false when another one
    /// is. An arbiter that cannot be asked answers true (a second upload beats a hang).
    fn claim(&self, paths: &[String]) -> impl std::future::Future<Output = Vec<bool>> + Send;
    /// This pusher is done with `paths`: uploaded, or given up.
    fn release(&self, paths: &[String]) -> impl std::future::Future<Output = ()> + Send;
}

/// The arbiter of a pusher that is alone: every path is its own.
pub struct Alone;

impl Arbiter for Alone {
    async fn claim(&self, paths: &[String]) -> Vec<bool> {
        vec![true; paths.len()]
    }
    async fn release(&self, _: &[String]) {}
}
