//! Reading what a cache says of a path: its narinfo, as Nix would read it.

use crate::narinfo::NarInfo;
use crate::text::one_line;
use crate::{Pusher, StoreError};
use futures_util::StreamExt;

/// The largest narinfo read from a cache (one with thousands of references fits).
pub const MAX_NARINFO_BYTES: usize = 1 << 20;

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

    async fn read_narinfos<T>(
        &self,
        paths: &[String],
        pick: impl Fn(NarInfo) -> Result<T, StoreError> + Copy,
    ) -> Vec<Result<T, StoreError>> {
        let mut futs = Vec::with_capacity(paths.len());
        for path in paths {
            futs.push(async move {
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
            });
        }
        futures_util::stream::iter(futs)
            .buffered(16)
            .collect()
            .await
    }
}
