//! Checking a cache's NARs as a substituting client does: each one its narinfo names
//! downloaded, decompressed and hashed against what that signed narinfo says.

use crate::backend::NarSource;
use crate::narinfo::{NarInfo, sha256_nix32};
use crate::{Pusher, StoreError};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::time::Duration;

/// NARs checked at once (each streamed: nothing is kept on disk).
const AT_ONCE: usize = 4;

/// Slowest download taken (bytes/s): a NAR may take 300 s, or longer at this rate.
const SLOWEST: u64 = 256 * 1024;

/// What checking one NAR found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarCheck {
    /// The cache serves it whole.
    Whole,
    /// Not checked, and why: a form Nix reads but this check does not (another
    /// compression, an absolute URL).
    Unchecked(String),
}

impl Pusher {
    /// Per path, in order: whether the cache serves it as Nix substituting it with
    /// `require-sigs` would take it: its narinfo signed by one of `keys` (which must not be
    /// empty: the narinfo's signed NarSize bounds the download), the file it names
    /// decompressing to NarSize bytes that hash to NarHash. Else that path's error, saying
    /// what differs. Downloads every NAR: as much as a client installing them all.
    pub async fn verify_nars(
        &self,
        paths: &[String],
        keys: &[String],
    ) -> Result<Vec<Result<NarCheck, StoreError>>, StoreError> {
        if keys.is_empty() {
            return Err(StoreError::Http(
                "checking NARs needs a key to check their narinfos by".into(),
            ));
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            // Caches behind a CDN or an object store redirect NAR downloads, and Nix follows
            // them; reqwest drops the Authorization header when a redirect leaves the host.
            .redirect(reqwest::redirect::Policy::limited(5));
        if let Some(ca) = &self.root_ca {
            b = b.add_root_certificate(ca.clone());
        }
        let client = b
            .build()
            .map_err(|e| StoreError::Http(format!("cannot build the HTTP client: {e}")))?;
        let infos = self
            .settled(paths, |ni| {
                if ni.signed_by(keys) {
                    Ok(ni)
                } else {
                    Err(StoreError::Http(format!(
                        "the cache's narinfo of {} is signed by none of the keys it is checked by",
                        ni.store_path
                    )))
                }
            })
            .await;
        let mut futs = Vec::with_capacity(infos.len());
        for ni in infos {
            let client = &client;
            futs.push(async move { self.verify_nar(client, ni?).await });
        }
        Ok(futures_util::stream::iter(futs)
            .buffered(AT_ONCE)
            .collect()
            .await)
    }

    async fn verify_nar(
        &self,
        client: &reqwest::Client,
        ni: NarInfo,
    ) -> Result<NarCheck, StoreError> {
        let path = ni.store_path.clone();
        let for_http = !matches!(self.target, crate::Target::File(_));
        if ni.url.contains("://") {
            return Ok(NarCheck::Unchecked(format!(
                "the narinfo of {path} names its NAR at an absolute URL"
            )));
        }
        let url = relative_url(&ni.url, for_http)
            .ok_or_else(|| {
                StoreError::Http(format!(
                    "the narinfo of {path} names its NAR at '{}', not a file in the cache",
                    crate::text::one_line(&ni.url, 120)
                ))
            })?
            .to_string();
        let Some(compression) = Decompress::of(&ni.compression) else {
            return Ok(NarCheck::Unchecked(format!(
                "the NAR of {path} is compressed with '{}', which this check does not read",
                crate::text::one_line(&ni.compression, 40)
            )));
        };
        // Bounded by the signed NarSize (FileSize is not signed): compressed, a NAR is
        // hardly larger than itself.
        let limit = ni
            .nar_size
            .saturating_add(ni.nar_size / 8)
            .saturating_add(1 << 20);
        let within = Duration::from_secs(300).max(Duration::from_secs(limit / SLOWEST));
        let read = async {
            let source = self
                .backend
                .nar_source(self, client, &url)
                .await
                .map_err(|e| StoreError::Http(format!("reading the NAR of {path}: {e}")))?
                .ok_or_else(|| {
                    StoreError::Http(format!(
                        "the cache has no {url}, the NAR its narinfo of {path} names"
                    ))
                })?;
            check_source(source, ni, compression, limit).await
        };
        tokio::time::timeout(within, read)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Http(format!(
                    "the NAR of {path} was not read within {} s",
                    within.as_secs()
                )))
            })?;
        Ok(NarCheck::Whole)
    }
}

/// A narinfo's URL as a file below the cache: no absolute path, no `..`, nothing but the
/// characters caches name NARs with; for an HTTP cache a query may follow (harmonia's
/// `?hash=`).
fn relative_url(url: &str, for_http: bool) -> Option<&str> {
    let fine = |c: char| c.is_ascii_alphanumeric() || "-._/+".contains(c);
    let (path, query) = match url.split_once('?') {
        Some((p, q)) if for_http => (p, q),
        Some(_) => return None,
        None => (url, ""),
    };
    let query_fine = |c: char| c.is_ascii_alphanumeric() || "-._~=&%+".contains(c);
    (!path.is_empty()
        && url.len() <= 512
        && path.chars().all(fine)
        && query.chars().all(query_fine)
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != ".." && part != "."))
    .then_some(url)
}

#[derive(Debug, Clone, Copy)]
enum Decompress {
    None,
    Xz,
    Zstd,
}

impl Decompress {
    fn of(compression: &str) -> Option<Decompress> {
        match compression {
            "none" | "" => Some(Decompress::None),
            "xz" => Some(Decompress::Xz),
            "zstd" => Some(Decompress::Zstd),
            _ => None,
        }
    }
}

/// Reads a NAR from `source` (at most `limit` bytes) and checks what it decompresses to,
/// off the async threads; an HTTP body is handed over chunk by chunk, never stored.
async fn check_source(
    source: NarSource,
    ni: NarInfo,
    compression: Decompress,
    limit: u64,
) -> Result<(), StoreError> {
    let path = ni.store_path.clone();
    let joined =
        |e: tokio::task::JoinError| StoreError::Http(format!("checking the NAR of {path}: {e}"));
    let mut r = match source {
        NarSource::File(f) => {
            return tokio::task::spawn_blocking(move || {
                check_nar(f.take(limit.saturating_add(1)), &ni, compression, limit)
            })
            .await
            .map_err(joined)?;
        }
        NarSource::Http(r) => r,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let checking = tokio::task::spawn_blocking(move || {
        let chunks = Chunks {
            rx,
            cur: bytes::Bytes::new(),
        };
        check_nar(chunks, &ni, compression, limit)
    });
    let mut len = 0u64;
    let mut pumped = Ok(());
    loop {
        match r.chunk().await {
            Ok(Some(c)) => {
                len += c.len() as u64;
                // Past the limit the checker says so; a checker that stopped reading (an
                // error, or the NAR read whole) ends the download.
                if tx.send(c).await.is_err() || len > limit {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                pumped = Err(StoreError::Http(format!(
                    "reading the NAR of {}: {e}",
                    path
                )));
                break;
            }
        }
    }
    drop(tx);
    let checked = checking.await.map_err(joined)?;
    pumped.and(checked)
}

/// A blocking reader over the chunks an async task sends.
struct Chunks {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.cur = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// What `file` (a compressed NAR, at most `limit` bytes of it) decompresses to, against its
/// narinfo: read no further than NarSize and a byte.
fn check_nar(
    file: impl Read,
    ni: &NarInfo,
    compression: Decompress,
    limit: u64,
) -> Result<(), StoreError> {
    let path = &ni.store_path;
    let mut counted = Counted { inner: file, n: 0 };
    let reader: Box<dyn Read + '_> = match compression {
        Decompress::None => Box::new(&mut counted),
        // Nix reads every stream of a file of several.
        Decompress::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(&mut counted)),
        Decompress::Zstd => Box::new(
            zstd::stream::read::Decoder::new(&mut counted)
                .map_err(|e| StoreError::Http(format!("the NAR of {path}: {e}")))?,
        ),
    };
    let read = hash_all(&mut reader.take(ni.nar_size.saturating_add(1)));
    if counted.n > limit {
        return Err(StoreError::Http(format!(
            "the NAR of {path} in the cache is over {limit} bytes, for {} bytes uncompressed",
            ni.nar_size
        )));
    }
    let (size, hash) =
        read.map_err(|e| StoreError::Http(format!("the NAR of {path} does not decompress: {e}")))?;
    if size > ni.nar_size {
        // Read no further than a byte past it: its hash would say nothing.
        return Err(StoreError::Http(format!(
            "the NAR of {path} decompresses to more than the {} bytes its narinfo says",
            ni.nar_size
        )));
    }
    if size != ni.nar_size || hash != ni.nar_hash {
        return Err(StoreError::Http(format!(
            "the NAR of {path} decompresses to {size} bytes hashing to {}, where its narinfo says {} bytes hashing to {}",
            sha256_nix32(&hash),
            ni.nar_size,
            sha256_nix32(&ni.nar_hash)
        )));
    }
    Ok(())
}

/// Counts what passes through it.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// The length and SHA-256 of everything `r` reads.
fn hash_all(r: &mut impl Read) -> std::io::Result<(u64, Vec<u8>)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((len, h.finalize().to_vec()));
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A narinfo for `nar`, stored compressed so.
    fn info(nar: &[u8], compression: &str) -> NarInfo {
        NarInfo {
            store_path: format!("/nix/store/{}-x", "0".repeat(32)),
            url: "nar/x".into(),
            compression: compression.into(),
            file_hash: vec![0; 32],
            file_size: 1,
            nar_hash: Sha256::digest(nar).to_vec(),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        }
    }

    fn check(file: &[u8], ni: &NarInfo, c: Decompress) -> Result<(), StoreError> {
        check_nar(file, ni, c, file.len() as u64)
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
        std::io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_nar_is_taken_only_as_its_narinfo_describes_it() {
        let nar = b"nix-archive-1 and then some contents".repeat(100);
        let zst = zstd::encode_all(&nar[..], 3).unwrap();
        check(&xz(&nar), &info(&nar, "xz"), Decompress::Xz).unwrap();
        check(&zst, &info(&nar, "zstd"), Decompress::Zstd).unwrap();
        check(&nar, &info(&nar, "none"), Decompress::None).unwrap();
        // Several xz streams one after the other, as Nix reads them.
        let mut two = xz(&nar[..1000]);
        two.extend(xz(&nar[1000..]));
        check(&two, &info(&nar, "xz"), Decompress::Xz).unwrap();
        // Decompressing to more (or other) than the NAR it names: read no further than
        // NarSize and a byte.
        let short = info(&nar[..100], "xz");
        let e = check(&xz(&nar), &short, Decompress::Xz)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("decompresses to more than the 100 bytes its narinfo says"),
            "{e}"
        );
        let mut other = info(&nar, "xz");
        other.nar_hash = vec![0; 32];
        let e = check(&xz(&nar), &other, Decompress::Xz)
            .unwrap_err()
            .to_string();
        assert!(e.contains("where its narinfo says"), "{e}");
        // Not what it says it is compressed with.
        let e = check(&zst, &info(&nar, "xz"), Decompress::Xz)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not decompress"), "{e}");
        // More of it than its size allows.
        let e = check_nar(&nar[..], &info(&nar, "none"), Decompress::None, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is over 10 bytes"), "{e}");
    }

    #[test]
    fn only_plain_relative_names_are_fetched() {
        for good in ["nar/0abc.nar.xz", "nar/x-y_z+1.nar.zst", "a.nar"] {
            assert_eq!(relative_url(good, false), Some(good));
        }
        // harmonia's query, over HTTP only.
        let q = "nar/0abc.nar?hash=0abc";
        assert_eq!(relative_url(q, true), Some(q));
        assert_eq!(relative_url(q, false), None);
        for bad in [
            "",
            "/etc/passwd",
            "../secret",
            "nar/../../x",
            "nar//x",
            "./x",
            "https://elsewhere/x",
            "nar/x?y\n",
            "nar/x\n",
            "?x",
        ] {
            assert_eq!(relative_url(bad, true), None, "{bad:?}");
        }
    }
}
