//! Checking a cache's NARs as a substituting client does: each one its narinfo names
//! downloaded, decompressed and hashed against what that (signed) narinfo says.

use crate::narinfo::{NarInfo, sha256_nix32};
use crate::{Pusher, StoreError, io};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek};

/// NARs checked at once (each is downloaded to a temporary file first).
const AT_ONCE: usize = 4;

impl Pusher {
    /// Per path, in order: Ok when the cache serves it whole, as Nix substituting it with
    /// `require-sigs` would take it: its narinfo signed by one of `keys` (any when there are
    /// none), the file the narinfo names of its FileSize and FileHash, and that file
    /// decompressing to NarSize bytes that hash to NarHash. Else that path's error, saying
    /// what differs. Downloads every NAR: as much as a client installing them all.
    pub async fn verify_nars(
        &self,
        paths: &[String],
        keys: &[String],
    ) -> Vec<Result<(), StoreError>> {
        let infos = self
            .settled(paths, |ni| {
                if keys.is_empty() || ni.signed_by(keys) {
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
            futs.push(async move { self.verify_nar(ni?).await });
        }
        futures_util::stream::iter(futs)
            .buffered(AT_ONCE)
            .collect()
            .await
    }

    async fn verify_nar(&self, ni: NarInfo) -> Result<(), StoreError> {
        let path = ni.store_path.clone();
        let url = relative_url(&ni.url).ok_or_else(|| {
            StoreError::Http(format!(
                "the narinfo of {path} names its NAR at '{}', not a file in the cache",
                crate::text::one_line(&ni.url, 120)
            ))
        })?;
        let compression = Decompress::of(&ni.compression).ok_or_else(|| {
            StoreError::Http(format!(
                "the NAR of {path} is compressed with '{}', which this check cannot read",
                crate::text::one_line(&ni.compression, 40)
            ))
        })?;
        let mut file = tempfile::tempfile().map_err(io("cannot create a temporary file"))?;
        if !self
            .backend
            .fetch_file(self, url, &mut file, ni.file_size)
            .await
            .map_err(|e| StoreError::Http(format!("reading the NAR of {path}: {e}")))?
        {
            return Err(StoreError::Http(format!(
                "the cache has no {url}, the NAR its narinfo of {path} names"
            )));
        }
        tokio::task::spawn_blocking(move || check_file(file, &ni, compression))
            .await
            .map_err(|e| StoreError::Http(format!("checking the NAR of {path}: {e}")))?
    }
}

/// A narinfo's URL as a file below the cache: no scheme, no absolute path, no `..`, nothing
/// but the characters caches name NARs with.
fn relative_url(url: &str) -> Option<&str> {
    let fine = |c: char| c.is_ascii_alphanumeric() || "-._/+".contains(c);
    (!url.is_empty()
        && url.len() <= 512
        && url.chars().all(fine)
        && !url.starts_with('/')
        && url
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

/// The downloaded file against its narinfo: its size and hash, then what it decompresses
/// to (read no further than NarSize and one byte).
fn check_file(
    mut file: std::fs::File,
    ni: &NarInfo,
    compression: Decompress,
) -> Result<(), StoreError> {
    let path = &ni.store_path;
    let differs = |what: String| Err(StoreError::Http(format!("the NAR of {path} {what}")));
    let read_err = |e: std::io::Error| StoreError::Http(format!("the NAR of {path}: {e}"));
    file.rewind().map_err(read_err)?;
    let (size, hash) = hash_all(&mut file).map_err(read_err)?;
    if size != ni.file_size || hash != ni.file_hash {
        return differs(format!(
            "in the cache is {size} bytes hashing to {}, where its narinfo says {} bytes hashing to {}",
            sha256_nix32(&hash),
            ni.file_size,
            sha256_nix32(&ni.file_hash)
        ));
    }
    file.rewind().map_err(read_err)?;
    let reader: Box<dyn Read> = match compression {
        Decompress::None => Box::new(file),
        Decompress::Xz => Box::new(xz2::read::XzDecoder::new(file)),
        Decompress::Zstd => Box::new(zstd::stream::read::Decoder::new(file).map_err(read_err)?),
    };
    let (size, hash) = hash_all(&mut reader.take(ni.nar_size.saturating_add(1)))
        .map_err(|e| StoreError::Http(format!("the NAR of {path} does not decompress: {e}")))?;
    if size != ni.nar_size || hash != ni.nar_hash {
        return differs(format!(
            "decompresses to {}{size} bytes hashing to {}, where its narinfo says {} bytes hashing to {}",
            if size > ni.nar_size { "over " } else { "" },
            sha256_nix32(&hash),
            ni.nar_size,
            sha256_nix32(&ni.nar_hash)
        ));
    }
    Ok(())
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

    /// A narinfo for `nar` stored as `file` (compressed so).
    fn info(nar: &[u8], file: &[u8], compression: &str) -> NarInfo {
        NarInfo {
            store_path: format!("/nix/store/{}-x", "0".repeat(32)),
            url: "nar/x".into(),
            compression: compression.into(),
            file_hash: Sha256::digest(file).to_vec(),
            file_size: file.len() as u64,
            nar_hash: Sha256::digest(nar).to_vec(),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        }
    }

    fn check(file: &[u8], ni: &NarInfo, c: Decompress) -> Result<(), StoreError> {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, file).unwrap();
        check_file(f, ni, c)
    }

    #[test]
    fn a_nar_is_taken_only_as_its_narinfo_describes_it() {
        let nar = b"nix-archive-1 and then some contents".repeat(100);
        let xz = {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
            std::io::Write::write_all(&mut e, &nar).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&nar[..], 3).unwrap();
        check(&xz, &info(&nar, &xz, "xz"), Decompress::Xz).unwrap();
        check(&zst, &info(&nar, &zst, "zstd"), Decompress::Zstd).unwrap();
        check(&nar, &info(&nar, &nar, "none"), Decompress::None).unwrap();
        // The file as its narinfo says, decompressing to more (or other) than the NAR it
        // names: read no further than NarSize and a byte.
        let mut short = info(&nar[..100], &xz, "xz");
        let e = check(&xz, &short, Decompress::Xz).unwrap_err().to_string();
        assert!(e.contains("decompresses to over 101 bytes"), "{e}");
        short.nar_size = nar.len() as u64;
        let e = check(&xz, &short, Decompress::Xz).unwrap_err().to_string();
        assert!(e.contains("where its narinfo says"), "{e}");
        // Another file than the narinfo's, or one that is not what it says it is compressed with.
        let e = check(&zst, &info(&nar, &xz, "xz"), Decompress::Xz)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("in the cache is {} bytes", zst.len())),
            "{e}"
        );
        let e = check(&zst, &info(&nar, &zst, "xz"), Decompress::Xz)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not decompress"), "{e}");
    }

    #[test]
    fn only_plain_relative_names_are_fetched() {
        for good in ["nar/0abc.nar.xz", "nar/x-y_z+1.nar.zst", "a.nar"] {
            assert_eq!(relative_url(good), Some(good));
        }
        for bad in [
            "",
            "/etc/passwd",
            "../secret",
            "nar/../../x",
            "nar//x",
            "./x",
            "https://elsewhere/x",
            "nar/x?y",
            "nar/x\n",
        ] {
            assert_eq!(relative_url(bad), None, "{bad:?}");
        }
    }
}
