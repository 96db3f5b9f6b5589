//! HTTP caches that accept PUT (nginx with WebDAV, a plain object store endpoint).

use crate::backend::{Backend, Fut, NarSource};
use crate::narinfo::{NarInfo, store_hash};
use crate::stage::Staged;
use crate::{Pusher, StoreError};
use futures_util::{StreamExt, TryStreamExt};
use std::io::{Seek, SeekFrom};
use std::sync::atomic::Ordering;

pub(crate) struct HttpCache {
    pub(crate) base: String,
    /// Set once the cache is known to have its `nix-cache-info`.
    pub(crate) has_info: tokio::sync::OnceCell<()>,
}

/// A response's body, refused past `limit` bytes.
pub(crate) async fn read_bounded(
    mut r: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut body = Vec::new();
    while let Some(chunk) = r
        .chunk()
        .await
        .map_err(|e| StoreError::Http(format!("reading the cache's answer: {e}")))?
    {
        if body.len() + chunk.len() > limit {
            return Err(StoreError::Http(format!(
                "the cache's answer is over {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The first `limit` bytes of a response's body at most (what an error page says); the rest
/// is not read.
pub(crate) async fn read_prefix(mut r: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match r.chunk().await {
            Ok(Some(chunk)) => {
                let n = chunk.len().min(limit - body.len());
                body.extend_from_slice(&chunk[..n]);
            }
            _ => break,
        }
    }
    body
}

/// A JSON answer, read within `limit` bytes.
pub(crate) async fn json_bounded<T: serde::de::DeserializeOwned>(
    r: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<T, StoreError> {
    let body = read_bounded(r, limit).await?;
    serde_json::from_slice(&body).map_err(|e| StoreError::Http(format!("unreadable {what}: {e}")))
}

/// A narinfo response's text: None for 404, bounded, UTF-8.
pub(crate) async fn narinfo_body(r: reqwest::Response) -> Result<Option<String>, StoreError> {
    if r.status().as_u16() == 404 {
        return Ok(None);
    }
    let body = read_bounded(r, crate::MAX_NARINFO_BYTES).await?;
    String::from_utf8(body)
        .map(Some)
        .map_err(|_| StoreError::Http("a narinfo that is not UTF-8".into()))
}

/// What a Nix binary cache says of itself; Nix refuses a cache without it.
const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";

impl Backend for HttpCache {
    fn substituter<'a>(&'a self, p: &'a Pusher) -> Fut<'a, (String, Vec<String>)> {
        Box::pin(async move { Ok((self.base.clone(), p.own_keys())) })
    }

    fn missing<'a>(&'a self, p: &'a Pusher, paths: &'a [String]) -> Fut<'a, Vec<String>> {
        Box::pin(async move {
            // A coordinator's farm cache answers for thousands of paths in one request.
            if p.opts.server_signs
                && let Some(m) = self.bulk_missing(p, paths).await?
            {
                return Ok(m);
            }
            // A plain binary cache has no bulk query: one HEAD per path, 16 at a time.
            // (Futures built eagerly: a mapping closure would make callers' futures not
            // provably Send.)
            let mut futs = Vec::with_capacity(paths.len());
            for path in paths {
                futs.push(self.http_missing(p, path));
            }
            // The first failure ends the question (the rest would only add their retries).
            let answers: Vec<Option<String>> = futures_util::stream::iter(futs)
                .buffered(16)
                .try_collect()
                .await?;
            Ok(answers.into_iter().flatten().collect())
        })
    }

    fn narinfo_text<'a>(&'a self, p: &'a Pusher, path: &'a str) -> Fut<'a, Option<String>> {
        Box::pin(async move {
            let url = format!("{}/{}.narinfo", self.base, store_hash(path));
            let r = p
                .send("reading a narinfo", || p.http_auth(p.http.get(&url)))
                .await?;
            narinfo_body(r).await
        })
    }

    fn nar_source<'a>(
        &'a self,
        p: &'a Pusher,
        client: &'a reqwest::Client,
        url: &'a str,
    ) -> Fut<'a, Option<NarSource>> {
        Box::pin(async move {
            let url = format!("{}/{url}", self.base);
            let r = p
                .send("reading a NAR", || p.http_auth(client.get(&url)))
                .await?;
            Ok(NarSource::found(r))
        })
    }

    fn upload<'a>(&'a self, p: &'a Pusher, staged: Staged, mut ni: NarInfo) -> Fut<'a, ()> {
        Box::pin(async move {
            match &p.key {
                Some(key) => ni.sign(key),
                // The cache signs what it accepts (a coordinator's farm cache).
                None if p.opts.server_signs => {}
                None => return Err(StoreError::NoKey(self.base.clone())),
            }
            self.ensure_info(p).await;
            self.push_http(p, staged, &ni).await
        })
    }
}

impl HttpCache {
    /// Writes `nix-cache-info` on the first push if the cache lacks it: a server that only
    /// stores what it is sent (nginx with WebDAV) has none of its own, and Nix reading it
    /// GET-only would refuse it ("does not appear to be a binary cache").
    async fn ensure_info(&self, p: &Pusher) {
        let _ = self
            .has_info
            .get_or_try_init(|| async {
                let url = format!("{}/nix-cache-info", self.base);
                let r = p
                    .send("asking for nix-cache-info", || {
                        p.http_auth(p.http.head(&url))
                    })
                    .await?;
                if r.status().is_success() {
                    return Ok(());
                }
                p.send_write("writing nix-cache-info", || {
                    p.http_auth(p.http.put(&url))
                        .header("content-type", "text/x-nix-cache-info")
                        .body(CACHE_INFO)
                })
                .await
                .map(|_| ())
            })
            .await
            .map_err(|e: StoreError| {
                crate::PUSH_WARNINGS.warn(&format!("cannot write nix-cache-info: {e}"))
            });
    }

    /// `Some(path)` when the HTTP cache at `base` lacks it.
    /// Which of `paths` a farm cache lacks, asked in bulk (`/_nixfarm/missing`, 4,096 hashes
    /// a request). None when the cache has no such query (a coordinator before it).
    async fn bulk_missing(
        &self,
        p: &Pusher,
        paths: &[String],
    ) -> Result<Option<Vec<String>>, StoreError> {
        let url = format!("{}{}", self.base, crate::FARM_CACHE_BULK_MISSING);
        let mut missing = std::collections::HashSet::new();
        for chunk in paths.chunks(4096) {
            let hashes: Vec<&str> = chunk.iter().map(|p| store_hash(p)).collect();
            let r = p
                .send("asking the farm cache which paths are missing", || {
                    p.http_auth(p.http.post(&url)).json(&hashes)
                })
                .await?;
            if r.status().as_u16() == 404 {
                return Ok(None);
            }
            // At most every hash asked about comes back (in JSON quotes, with commas).
            let limit = hashes.len() * 40 + 64;
            let body = read_bounded(r, limit).await?;
            let list: Vec<String> = serde_json::from_slice(&body).map_err(|e| {
                StoreError::Http(format!("unreadable answer from the farm cache: {e}"))
            })?;
            let asked: std::collections::HashSet<&str> = hashes.iter().copied().collect();
            missing.extend(list.into_iter().filter(|h| asked.contains(h.as_str())));
        }
        Ok(Some(
            paths
                .iter()
                .filter(|p| missing.contains(store_hash(p)))
                .cloned()
                .collect(),
        ))
    }

    async fn http_missing(&self, p: &Pusher, path: &str) -> Result<Option<String>, StoreError> {
        let base = &self.base;
        let url = format!("{base}/{}.narinfo", store_hash(path));
        let r = p
            .send("asking the cache", || p.http_auth(p.http.head(&url)))
            .await?;
        Ok((!r.status().is_success()).then(|| path.to_string()))
    }

    async fn push_http(&self, p: &Pusher, staged: Staged, ni: &NarInfo) -> Result<(), StoreError> {
        let base = &self.base;
        let nar_url = format!("{base}/{}", ni.url);
        let size = staged.file_size;
        let file = staged.file;
        // Streamed from the staging file; each attempt reads it again from the start. The
        // declared length makes a short read fail the request instead of uploading less.
        p.send_write("uploading the NAR", || {
            let body = match file.try_clone().and_then(|mut c| {
                c.seek(SeekFrom::Start(0))?;
                Ok(c)
            }) {
                Ok(c) => reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
                    tokio::fs::File::from_std(c),
                )),
                Err(_) => reqwest::Body::from(Vec::new()),
            };
            p.http_auth(p.http.put(&nar_url))
                .header("content-type", "application/x-nix-nar")
                .header("content-length", size)
                .body(body)
        })
        .await?;
        let ni_url = format!("{base}/{}.narinfo", store_hash(&ni.store_path));
        let text = ni.render();
        let put = p
            .send_write("uploading the narinfo", || {
                p.http_auth(p.http.put(&ni_url))
                    .header("content-type", "text/x-nix-narinfo")
                    .body(text.clone())
            })
            .await;
        match put {
            Ok(_) => {}
            // Another build of the path was published first (a build that is not
            // reproducible, built twice at once): the cache keeps that one, and it is what
            // dependents get, if it has one for the path: a 409 that means something else
            // (a missing folder, an aborted write) leaves the path out of the cache.
            Err(StoreError::Conflict(why)) => {
                let held = p.nar_hashes(std::slice::from_ref(&ni.store_path)).await;
                if let Some(Err(e)) = held.into_iter().next() {
                    return Err(StoreError::Refused(format!(
                        "{why}, and the cache holds no readable narinfo of the path: {e}"
                    )));
                }
                tracing::warn!(
                    path = ni.store_path,
                    "{why}: the cache keeps the copy it has"
                );
            }
            Err(e) => return Err(e),
        }
        p.stats.bytes_uploaded.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }
}
