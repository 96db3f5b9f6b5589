//! Cachix: its API (bulk narinfo queries, multipart uploads with Content-MD5 and ETags,
//! `complete`/`abort`), as `../shared/docs/cachix-api.md` describes it.

use crate::backend::{Backend, Fut};
use crate::http::json_bounded;
use crate::narinfo::{NarInfo, basename, sha256_nix32, store_hash};
use crate::stage::{Compression, Staged};
use crate::{Pusher, StoreError, io};
use futures_util::StreamExt;
use md5::{Digest as _, Md5};
use serde::Deserialize;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::Ordering;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachixCache {
    pub name: String,
    pub uri: String,
    #[serde(default)]
    pub is_public: bool,
    #[serde(default)]
    pub public_signing_keys: Vec<String>,
    #[serde(default)]
    pub preferred_compression_method: Option<String>,
}

pub(crate) struct CachixBackend {
    pub(crate) name: String,
    pub(crate) api: String,
    pub(crate) info: tokio::sync::OnceCell<CachixCache>,
}

impl Backend for CachixBackend {
    fn substituter<'a>(&'a self, p: &'a Pusher) -> Fut<'a, (String, Vec<String>)> {
        Box::pin(async move {
            let c = self.info(p).await?;
            Ok((c.uri.clone(), c.public_signing_keys.clone()))
        })
    }

    fn missing<'a>(&'a self, p: &'a Pusher, paths: &'a [String]) -> Fut<'a, Vec<String>> {
        Box::pin(async move {
            let url = format!("{}cache/{}/narinfo", self.api, self.name);
            let mut missing = std::collections::HashSet::new();
            for chunk in paths.chunks(4096) {
                let hashes: Vec<&str> = chunk.iter().map(|p| store_hash(p)).collect();
                let r = p
                    .send("asking Cachix which paths are missing", || {
                        p.bearer(p.http.post(&url)).json(&hashes)
                    })
                    .await?;
                // At most the hashes asked about, each quoted: 40 bytes apiece is room enough.
                let list: Vec<String> =
                    json_bounded(r, 40 * hashes.len() + 64, "narinfo answer").await?;
                missing.extend(list);
            }
            Ok(paths
                .iter()
                .filter(|p| missing.contains(store_hash(p)))
                .cloned()
                .collect())
        })
    }

    fn preferred_compression<'a>(&'a self, p: &'a Pusher) -> Fut<'a, Option<Compression>> {
        Box::pin(async move {
            let pref = self.info(p).await?.preferred_compression_method.clone();
            Ok(pref.as_deref().and_then(Compression::parse))
        })
    }

    fn narinfo_text<'a>(&'a self, p: &'a Pusher, path: &'a str) -> Fut<'a, Option<String>> {
        Box::pin(async move {
            // Read where Nix reads it (the cache's URI), with the token a private cache needs.
            let uri = self.info(p).await?.uri.trim_end_matches('/').to_string();
            let url = format!("{uri}/{}.narinfo", store_hash(path));
            let r = p
                .send("reading a narinfo", || p.bearer(p.http.get(&url)))
                .await?;
            crate::http::narinfo_body(r).await
        })
    }

    fn upload<'a>(&'a self, p: &'a Pusher, staged: Staged, ni: NarInfo) -> Fut<'a, ()> {
        Box::pin(async move { self.push_cachix(p, staged, &ni).await })
    }

    fn needs_token(&self) -> bool {
        true
    }
}

impl CachixBackend {
    /// The Cachix cache's description (`GET cache/NAME`), fetched once.
    pub(crate) async fn info(&self, p: &Pusher) -> Result<&CachixCache, StoreError> {
        let (name, api) = (&self.name, &self.api);
        self.info
            .get_or_try_init(|| async {
                let url = format!("{api}cache/{name}");
                let r = p
                    .send("reading the Cachix cache", || p.bearer(p.http.get(&url)))
                    .await?;
                if r.status().as_u16() == 404 {
                    return Err(StoreError::Http(format!(
                        "Cachix has no cache named '{name}'"
                    )));
                }
                json_bounded::<CachixCache>(r, 64 * 1024, "cache description").await
            })
            .await
    }

    /// Tells Cachix to drop a multipart upload that will not complete (best effort).
    async fn abort(&self, p: &Pusher, base: &str, upload_id: &str) {
        let _ = p
            .send("aborting the upload", || {
                p.bearer(
                    p.http
                        .post(format!("{base}/abort"))
                        .query(&[("uploadId", upload_id)]),
                )
            })
            .await;
    }

    async fn push_cachix(
        &self,
        p: &Pusher,
        staged: Staged,
        ni: &NarInfo,
    ) -> Result<(), StoreError> {
        let (name, api) = (&self.name, &self.api);
        let cache = self.info(p).await?;
        // Self-signed caches publish our key; server-signed ones sign themselves.
        let sig = match &p.key {
            Some(k) => Some(k.sign_raw(&ni.fingerprint())),
            None if cache.public_signing_keys.is_empty() => None,
            None => return Err(StoreError::NoKey(format!("cachix://{name}"))),
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Created {
            nar_id: String,
            upload_id: String,
        }
        let compression = p.compression().await?;
        let r = p
            .send("starting the upload", || {
                p.bearer(p.http.post(format!(
                    "{api}cache/{name}/multipart-nar?compression={}",
                    compression.cachix_param()
                )))
            })
            .await?;
        let created: Created = json_bounded(r, 64 * 1024, "multipart answer").await?;
        let size = staged.file_size;
        let file = Arc::new(std::sync::Mutex::new(staged.file));
        let ranges: Vec<(u32, u64, usize)> = (0..size.max(1))
            .step_by(p.opts.part_size)
            .enumerate()
            .map(|(i, o)| (i as u32 + 1, o, p.opts.part_size.min((size - o) as usize)))
            .collect();
        let base = format!("{api}cache/{name}/multipart-nar/{}", created.nar_id);
        let upload_id = created.upload_id.clone();
        let results: Vec<Result<(u32, String), StoreError>> =
            futures_util::stream::iter(ranges.into_iter().map(|(n, offset, len)| {
                let file = file.clone();
                let base = base.clone();
                let upload_id = upload_id.clone();
                async move {
                    let bytes = {
                        let file = file.clone();
                        tokio::task::spawn_blocking(move || read_part(&file, offset, len))
                            .await
                            .map_err(|e| StoreError::Http(format!("read task failed: {e}")))??
                    };
                    let md5 = data_encoding::BASE64.encode(&Md5::digest(&bytes));
                    #[derive(Deserialize)]
                    #[serde(rename_all = "camelCase")]
                    struct Url {
                        upload_url: String,
                    }
                    let r = p
                        .send("getting a part's upload URL", || {
                            p.bearer(p.http.post(&base).query(&[
                                ("uploadId", upload_id.as_str()),
                                ("partNumber", &n.to_string()),
                            ]))
                            .json(&serde_json::json!({ "contentMD5": md5 }))
                        })
                        .await?;
                    let url: Url = json_bounded(r, 64 * 1024, "part answer").await?;
                    let bytes = bytes::Bytes::from(bytes);
                    // The presigned URL is the credential: no Authorization header here.
                    let r = p
                        .send("uploading a part", || {
                            p.http
                                .put(&url.upload_url)
                                .header("content-type", "application/octet-stream")
                                .header("content-md5", &md5)
                                .body(bytes.clone())
                        })
                        .await?;
                    let etag = r
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from)
                        .ok_or_else(|| {
                            StoreError::Http("part upload answered without an ETag".into())
                        })?;
                    p.stats
                        .bytes_uploaded
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    Ok((n, etag))
                }
            }))
            .buffer_unordered(p.opts.parts_in_flight.max(1))
            .collect()
            .await;
        let mut parts = Vec::new();
        for r in results {
            match r {
                Ok(p) => parts.push(p),
                Err(e) => {
                    self.abort(p, &base, &upload_id).await;
                    return Err(e);
                }
            }
        }
        parts.sort_by_key(|p| p.0);
        let mut refs: Vec<&str> = ni.references.iter().map(|r| basename(r)).collect();
        refs.sort();
        let body = serde_json::json!({
            "parts": parts.iter().map(|(n, e)| serde_json::json!({"partNumber": n, "eTag": e})).collect::<Vec<_>>(),
            "narInfoCreate": {
                "cStoreHash": store_hash(&ni.store_path),
                "cStoreSuffix": basename(&ni.store_path).split_once('-').map(|x| x.1).unwrap_or_default(),
                "cNarHash": sha256_nix32(&ni.nar_hash),
                "cNarSize": ni.nar_size,
                "cFileHash": data_encoding::HEXLOWER.encode(&ni.file_hash),
                "cFileSize": ni.file_size,
                "cReferences": refs,
                "cDeriver": ni.deriver.as_deref().map(basename).unwrap_or("unknown-deriver"),
                "cSig": sig,
            }
        });
        let done = p
            .send("completing the upload", || {
                p.bearer(
                    p.http
                        .post(format!("{base}/complete"))
                        .query(&[("uploadId", upload_id.as_str())]),
                )
                .json(&body)
            })
            .await;
        if let Err(e) = done {
            self.abort(p, &base, &upload_id).await;
            return Err(e);
        }
        Ok(())
    }
}

fn read_part(
    file: &std::sync::Mutex<std::fs::File>,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut f = file
        .lock()
        .map_err(|_| StoreError::Http("staging file lock poisoned".into()))?;
    f.seek(SeekFrom::Start(offset)).map_err(io("seek"))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)
        .map_err(io("cannot read the staging file"))?;
    Ok(buf)
}
