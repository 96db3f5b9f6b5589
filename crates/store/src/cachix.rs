//! Cachix: its API (bulk narinfo queries, multipart uploads with Content-MD5 and ETags,
//! `complete`/`abort`), as `../shared/docs/cachix-api.md` describes it.

use crate::backend::{Backend, Fut, NarSource};
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

/// The most signing keys taken from a cache's description.
const MAX_KEYS: usize = 64;

impl CachixCache {
    /// The description as Nix will be told it: `uri` a plain http(s) URL and each key
    /// `NAME:BASE64`, since both become Nix options, which split on whitespace. A URI in
    /// plain http is taken only where the API itself is plain http (a test server).
    fn checked(self, api: &str) -> Result<CachixCache, StoreError> {
        let bad = |what: &str| {
            StoreError::Http(format!(
                "the Cachix cache's description has {what}; nothing is read from it or pushed to it"
            ))
        };
        let uri_ok = reqwest::Url::parse(&self.uri).is_ok_and(|u| {
            u.scheme() == "https" || (u.scheme() == "http" && api.starts_with("http://"))
        }) && !self
            .uri
            .chars()
            .any(|c| c.is_whitespace() || c.is_control());
        if !uri_ok {
            return Err(bad("a URI that is not an https URL"));
        }
        if self.public_signing_keys.len() > MAX_KEYS
            || !self
                .public_signing_keys
                .iter()
                .all(|k| k.len() <= 1024 && nixfarm_core::cache_url::is_public_key(k))
        {
            return Err(bad("a signing key that is not NAME:BASE64"));
        }
        Ok(self)
    }
}

/// Whether two URLs have one scheme, host and port.
fn same_origin(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// Whether `uri` is one of Cachix's own hosts (over https) and the API Cachix's own.
fn cachix_host(uri: &str, api: &str) -> bool {
    let own = |u: &str, host: &str| {
        reqwest::Url::parse(u).is_ok_and(|u| {
            u.scheme() == "https"
                && u.host_str()
                    .is_some_and(|h| h == host || h.ends_with(&format!(".{host}")))
        })
    };
    own(api, "cachix.org") && own(uri, "cachix.org")
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
                    .send_write("asking Cachix which paths are missing", || {
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
            let file = format!("{}.narinfo", store_hash(path));
            let r = self
                .get_file(p, &p.http, &file, "reading a narinfo")
                .await?;
            crate::http::narinfo_body(r).await
        })
    }

    fn nar_source<'a>(
        &'a self,
        p: &'a Pusher,
        client: &'a reqwest::Client,
        url: &'a str,
    ) -> Fut<'a, Option<NarSource>> {
        Box::pin(async move {
            let r = self.get_file(p, client, url, "reading a NAR").await?;
            Ok(NarSource::found(r))
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
    /// GETs `file` where Nix reads the cache (its URI), through `client`, with the token a
    /// private cache needs sent only where the API is or to Cachix's own hosts (a redirect
    /// to another host drops it).
    async fn get_file(
        &self,
        p: &Pusher,
        client: &reqwest::Client,
        file: &str,
        what: &str,
    ) -> Result<reqwest::Response, StoreError> {
        let uri = self.info(p).await?.uri.trim_end_matches('/').to_string();
        let url = format!("{uri}/{file}");
        let with_token = same_origin(&uri, &self.api) || cachix_host(&uri, &self.api);
        p.send(what, || {
            let get = client.get(&url);
            if with_token { p.bearer(get) } else { get }
        })
        .await
    }

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
                let c = json_bounded::<CachixCache>(r, 64 * 1024, "cache description").await?;
                c.checked(api)
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
            .send_write("starting the upload", || {
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
                        .send_write("getting a part's upload URL", || {
                            p.bearer(p.http.post(&base).query(&[
                                ("uploadId", upload_id.as_str()),
                                ("partNumber", &n.to_string()),
                            ]))
                            .json(&serde_json::json!({ "contentMD5": md5 }))
                        })
                        .await?;
                    let url: Url = json_bounded(r, 64 * 1024, "part answer").await?;
                    // The NAR's bytes go over TLS, or to where the API itself is.
                    if !(url.upload_url.starts_with("https://")
                        || same_origin(&url.upload_url, api))
                    {
                        return Err(StoreError::Http(format!(
                            "Cachix named '{}' to upload a part to: neither https nor the API's own address",
                            crate::text::one_line(&url.upload_url, 120)
                        )));
                    }
                    let bytes = bytes::Bytes::from(bytes);
                    // The presigned URL is the credential: no Authorization header here.
                    let r = p
                        .send_write("uploading a part", || {
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
            .send_write("completing the upload", || {
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

#[cfg(test)]
mod answer_tests {
    use super::*;

    fn cache(uri: &str, keys: &[&str]) -> CachixCache {
        CachixCache {
            name: "c".into(),
            uri: uri.into(),
            is_public: true,
            public_signing_keys: keys.iter().map(|k| k.to_string()).collect(),
            preferred_compression_method: None,
        }
    }

    #[test]
    fn what_cachix_says_of_a_cache_is_checked_before_nix_is_told() {
        let api = "https://app.cachix.org/api/v1/";
        assert!(
            cache("https://c.cachix.org", &["c-1:AAAA"])
                .checked(api)
                .is_ok()
        );
        for bad in [
            cache("https://c.cachix.org https://evil.example", &[]),
            cache("http://c.cachix.org", &[]),
            cache("file:///etc", &[]),
            cache("https://c.cachix.org", &["c-1:AAAA evil-1:BBBB"]),
            cache("https://c.cachix.org", &["no-key"]),
        ] {
            assert!(bad.clone().checked(api).is_err(), "{:?}", bad.uri);
        }
        // A plain-http API (a test server) may describe a plain-http cache.
        assert!(
            cache("http://127.0.0.1:1/c", &[])
                .checked("http://127.0.0.1:1/api/v1/")
                .is_ok()
        );
    }

    #[test]
    fn the_token_goes_to_the_api_host_or_cachix_own_hosts_only() {
        let api = "https://app.cachix.org/api/v1/";
        assert!(cachix_host("https://c.cachix.org", api));
        assert!(!cachix_host("https://c.cachix.org.evil.example", api));
        assert!(!cachix_host("http://c.cachix.org", api));
        assert!(!cachix_host(
            "https://c.cachix.org",
            "https://cachix.evil.example/api/v1/"
        ));
        assert!(same_origin(
            "http://127.0.0.1:9/x",
            "http://127.0.0.1:9/api/v1/"
        ));
        assert!(!same_origin(
            "http://127.0.0.1:9/x",
            "http://127.0.0.1:10/api/v1/"
        ));
    }
}
