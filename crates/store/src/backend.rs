//! The caches a pusher publishes to: one trait, and one implementation per kind of cache
//! (`file.rs`, `http.rs`, `cachix.rs`), so adding a kind touches one new file.

use crate::narinfo::NarInfo;
use crate::stage::{Compression, Staged};
use crate::{Pusher, StoreError};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// A NAR being read from a cache.
pub(crate) enum NarSource {
    File(std::fs::File),
    Http(reqwest::Response),
}

impl NarSource {
    /// A response to a NAR's GET: None when the cache has no such file (404).
    pub(crate) fn found(r: reqwest::Response) -> Option<NarSource> {
        (r.status().as_u16() != 404).then_some(NarSource::Http(r))
    }
}

pub(crate) type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

pub(crate) trait Backend: Send + Sync {
    /// The URL Nix substitutes from, and the keys its signatures verify against.
    fn substituter<'a>(&'a self, p: &'a Pusher) -> Fut<'a, (String, Vec<String>)>;
    /// Which of `paths` the cache lacks, in the order given.
    fn missing<'a>(&'a self, p: &'a Pusher, paths: &'a [String]) -> Fut<'a, Vec<String>>;
    /// The compression the cache prefers, when it says.
    fn preferred_compression<'a>(&'a self, _p: &'a Pusher) -> Fut<'a, Option<Compression>> {
        Box::pin(async { Ok(None) })
    }
    /// Where NARs are staged (None: a temporary file).
    fn stage_dir(&self) -> Result<Option<PathBuf>, StoreError> {
        Ok(None)
    }
    /// Uploads a staged NAR, then its narinfo (unsigned: the backend signs as the cache
    /// needs), so a narinfo never points at a NAR that is not there.
    fn upload<'a>(&'a self, p: &'a Pusher, staged: Staged, ni: NarInfo) -> Fut<'a, ()>;
    /// The narinfo the cache serves for `path` (as Nix would read it, at most
    /// [`crate::MAX_NARINFO_BYTES`]), None when it has none.
    fn narinfo_text<'a>(&'a self, p: &'a Pusher, path: &'a str) -> Fut<'a, Option<String>>;
    /// Opens the file at `url` (a narinfo's URL, relative to the cache, checked by the
    /// caller), HTTP requests going through `client`: None when the cache has no such file.
    fn nar_source<'a>(
        &'a self,
        p: &'a Pusher,
        client: &'a reqwest::Client,
        url: &'a str,
    ) -> Fut<'a, Option<NarSource>>;
    /// Whether pushing needs a Cachix auth token.
    fn needs_token(&self) -> bool {
        false
    }
}
