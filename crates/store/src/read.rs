//! Reading what a cache says of a path: its narinfo, as Nix would read it.

use crate::narinfo::NarInfo;
use crate::text::one_line;
use crate::{Pusher, StoreError};
use futures_util::StreamExt;

/// The largest narinfo read from a cache (one with thousands of references fits).
pub const MAX_NARINFO_BYTES: usize = 1 << 20;

/// Pauses before a narinfo that could not be read is read again by the `*_settled`
/// readers: a CDN in front of a cache may answer from before a push for a moment.
const REREAD_AFTER: [std::time::Duration; 2] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(3),
];

impl Pusher {
    /// Per path, in order: the derivation the cache says produced it (its narinfo's
    /// `Deriver`), None when the cache records none. A narinfo that is not for the path
    /// asked, or cannot be read, is that path's error. The deriver is not covered by the
    /// narinfo's signature: it is the cache's word, good for a heuristic, not for trust.
    pub async fn derivers(&self, paths: &[String]) -> Vec<Result<Option<String>, StoreError>> {
        self.read_narinfos(paths, |ni| Ok(ni.deriver.filter(|d| d.ends_with(".drv"))))
            .await
    }

    /// Per path, in order: the SHA-256 of its NAR as the cache's narinfo states it (what a
    /// client substituting it must get). No narinfo, or one that is not for the path asked,
    /// is that path's error.
    pub async fn nar_hashes(&self, paths: &[String]) -> Vec<Result<Vec<u8>, StoreError>> {
        self.read_narinfos(paths, |ni| Ok(ni.nar_hash)).await
    }

    /// [`Pusher::nar_hashes`], each narinfo signed by one of `keys` (what a client that
    /// requires signatures would take from the cache), or that path's error.
    pub async fn signed_nar_hashes(
        &self,
        paths: &[String],
        keys: &[String],
    ) -> Vec<Result<Vec<u8>, StoreError>> {
        self.read_narinfos(paths, |ni| {
            if ni.signed_by(keys) {
                Ok(ni.nar_hash)
            } else {
                Err(StoreError::Http(format!(
                    "the cache's narinfo of {} is signed by none of the keys it is read with",
                    ni.store_path
                )))
            }
        })
        .await
    }

    /// Per path, in order: whether the cache's narinfo is signed by one of `keys` (false:
    /// it has one, signed by none of them); no narinfo, or one that cannot be read, is that
    /// path's error.
    pub async fn signed_by(
        &self,
        paths: &[String],
        keys: &[String],
    ) -> Vec<Result<bool, StoreError>> {
        self.read_narinfos(paths, |ni| Ok(ni.signed_by(keys))).await
    }

    /// [`Pusher::nar_hashes`], a path whose narinfo could not be read read again after a
    /// pause, twice: what still fails is not what a client could substitute now.
    pub async fn nar_hashes_settled(&self, paths: &[String]) -> Vec<Result<Vec<u8>, StoreError>> {
        self.settled(paths, |ni| Ok(ni.nar_hash)).await
    }

    /// [`Pusher::signed_by`], a path whose narinfo could not be read read again after a
    /// pause, twice.
    pub async fn signed_by_settled(
        &self,
        paths: &[String],
        keys: &[String],
    ) -> Vec<Result<bool, StoreError>> {
        self.settled(paths, |ni| Ok(ni.signed_by(keys))).await
    }

    pub(crate) async fn settled<T>(
        &self,
        paths: &[String],
        pick: impl Fn(NarInfo) -> Result<T, StoreError> + Copy,
    ) -> Vec<Result<T, StoreError>> {
        let mut got = self.read_narinfos(paths, pick).await;
        for pause in REREAD_AFTER {
            let again: Vec<usize> = (0..got.len()).filter(|&i| got[i].is_err()).collect();
            if again.is_empty() {
                break;
            }
            tokio::time::sleep(pause).await;
            let asked: Vec<String> = again.iter().map(|&i| paths[i].clone()).collect();
            for (i, r) in again
                .into_iter()
                .zip(self.read_narinfos(&asked, pick).await)
            {
                got[i] = r;
            }
        }
        got
    }

    /// Each path's narinfo, all read within the push floor ([`crate::Options::push_floor`]):
    /// a cache that answers each request just before its timeout, and again on each retry,
    /// holds the caller no longer; what is not read by then is that path's error.
    async fn read_narinfos<T>(
        &self,
        paths: &[String],
        pick: impl Fn(NarInfo) -> Result<T, StoreError> + Copy,
    ) -> Vec<Result<T, StoreError>> {
        let floor = self.opts.push_floor;
        let deadline = tokio::time::Instant::now() + floor;
        let mut futs = Vec::with_capacity(paths.len());
        for path in paths {
            futs.push(async move {
                tokio::time::timeout_at(deadline, self.read_narinfo(path, pick))
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Http(format!(
                            "the cache did not give the narinfo of {path} within {} s",
                            floor.as_secs()
                        )))
                    })
            });
        }
        futures_util::stream::iter(futs)
            .buffered(16)
            .collect()
            .await
    }

    async fn read_narinfo<T>(
        &self,
        path: &str,
        pick: impl Fn(NarInfo) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Some(text) = self.backend.narinfo_text(self, path).await? else {
            return Err(StoreError::Http(format!(
                "the cache has no narinfo for {path}"
            )));
        };
        let ni = NarInfo::parse(&text)
            .map_err(|e| StoreError::Http(format!("the narinfo of {path}: {e}")))?;
        if ni.store_path != *path {
            return Err(StoreError::Http(format!(
                "the cache answered for {} when asked for {path}",
                one_line(&ni.store_path, 120)
            )));
        }
        pick(ni)
    }
}
