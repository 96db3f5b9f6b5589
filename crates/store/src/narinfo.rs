//! narinfo files, their fingerprints and ed25519 signatures.

use data_encoding::BASE64;
use ed25519_dalek::{Signer, SigningKey};
use nixfarm_nix::hash::{Algo, Hash, nix32_encode};
use std::fmt::Write as _;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the signing key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the signing key is not `name:base64(64 bytes)` (or base64 of 64 bytes for Cachix)")]
    Malformed,
    /// A key without a name (Cachix's form) for a cache that is not Cachix: its signatures
    /// would read `Sig: :…`, which Nix refuses.
    #[error(
        "the signing key has no name (Cachix's CACHIX_SIGNING_KEY form): a file:// or http(s):// cache needs `name:base64`, as `nix key generate-secret --key-name NAME` writes"
    )]
    Nameless,
}

/// A cache signing key: the name signatures are filed under, and the ed25519 key.
#[derive(Clone)]
pub struct Key {
    pub name: String,
    key: SigningKey,
}

impl std::fmt::Debug for Key {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.name)
    }
}

impl Key {
    /// Parses Nix's secret key format, `name:base64(seed ‖ public)`, or Cachix's
    /// `CACHIX_SIGNING_KEY` (base64 of the same 64 bytes, no name).
    pub fn parse(text: &str) -> Result<Key, KeyError> {
        let text = text.trim();
        let (name, b64) = match text.split_once(':') {
            Some((n, b)) => (n.to_string(), b),
            None => (String::new(), text),
        };
        let bytes = BASE64
            .decode(b64.as_bytes())
            .map_err(|_| KeyError::Malformed)?;
        let seed: [u8; 32] = bytes
            .get(..32)
            .and_then(|s| s.try_into().ok())
            .ok_or(KeyError::Malformed)?;
        if bytes.len() != 64 {
            return Err(KeyError::Malformed);
        }
        Ok(Key {
            name,
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn from_file(path: &std::path::Path) -> Result<Key, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if let Some(why) = nixfarm_core::config_text::world_readable(path) {
            tracing::warn!("{why}");
        }
        Key::parse(&text)
    }

    /// `name:base64(public key)`, what `trusted-public-keys` takes.
    pub fn public(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.verifying_key().as_bytes())
        )
    }

    /// A new key named `name`, from the kernel's random source.
    pub fn generate(name: &str) -> Result<Key, KeyError> {
        use std::io::Read as _;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|source| KeyError::Read {
                path: "/dev/urandom".into(),
                source,
            })?;
        Ok(Key {
            name: name.into(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Nix's secret key format, `name:base64(seed ‖ public)`: what [`Key::parse`] reads.
    pub fn secret_text(&self) -> String {
        let mut bytes = self.key.to_bytes().to_vec();
        bytes.extend_from_slice(self.key.verifying_key().as_bytes());
        format!("{}:{}", self.name, BASE64.encode(&bytes))
    }

    /// Base64 of the signature of `fingerprint`, without the key name.
    pub fn sign_raw(&self, fingerprint: &str) -> String {
        BASE64.encode(&self.key.sign(fingerprint.as_bytes()).to_bytes())
    }
}

/// Everything a narinfo says about one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// Full store path.
    pub store_path: String,
    /// `nar/<file hash>.nar.zst`.
    pub url: String,
    /// `zstd`, `xz` or `none`.
    pub compression: String,
    /// SHA-256 of the compressed file.
    pub file_hash: Vec<u8>,
    pub file_size: u64,
    /// SHA-256 of the NAR.
    pub nar_hash: Vec<u8>,
    pub nar_size: u64,
    /// Full store paths, sorted.
    pub references: Vec<String>,
    /// Full store path of the deriver.
    pub deriver: Option<String>,
    /// `keyname:base64`.
    pub sigs: Vec<String>,
    /// Content address, for content-addressed paths (derivations, fixed outputs).
    pub ca: Option<String>,
}

pub fn sha256_nix32(digest: &[u8]) -> String {
    format!("sha256:{}", nix32_encode(digest))
}

/// Parses a NAR hash in any spelling Nix prints (SRI, `sha256:nix32`, hex) into bytes.
pub fn nar_hash_bytes(s: &str) -> Option<Vec<u8>> {
    Hash::parse(s, Some(Algo::Sha256))
        .filter(|h| h.algo == Algo::Sha256)
        .map(|h| h.digest)
}

/// `/nix/store/<hash>-<name>` → `<hash>`.
pub fn store_hash(path: &str) -> &str {
    let base = basename(path);
    base.split_once('-').map_or(base, |(h, _)| h)
}

pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A narinfo that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("not a narinfo: {0}")]
pub struct NarInfoError(pub String);

impl NarInfo {
    /// Reads a narinfo as caches serve it (references and deriver as base names).
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let bad = |what: &str| NarInfoError(what.to_string());
        let mut f: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        let mut sigs = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once(": ")
                .ok_or_else(|| bad("a line without 'Key: value'"))?;
            if k == "Sig" {
                sigs.push(v.to_string());
            } else if f.insert(k, v).is_some() {
                return Err(bad(&format!("{} twice", crate::text::one_line(k, 40))));
            }
        }
        let get = |k: &str| f.get(k).copied().ok_or_else(|| bad(&format!("no {k}")));
        // Each path a store path as Nix reads one (a plain store directory, Nix's base-32
        // and name characters): a reference or deriver of `../..` names no file here.
        let store_path = nixfarm_nix::StorePath::parse(get("StorePath")?)
            .map_err(|e| bad(&format!("StorePath is not a store path: {e}")))?
            .to_string();
        let store_dir = store_path
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .ok_or_else(|| bad("StorePath is not a store path"))?;
        let in_store = |k: &str, b: &str| -> Result<String, NarInfoError> {
            nixfarm_nix::StorePath::parse(&format!("{store_dir}/{b}"))
                .map(|p| p.to_string())
                .map_err(|e| bad(&format!("{k} holds what is not a store path's name: {e}")))
        };
        let hash = |k: &str| -> Result<Vec<u8>, NarInfoError> {
            nar_hash_bytes(get(k)?).ok_or_else(|| bad(&format!("{k} is not a SHA-256")))
        };
        let num = |k: &str| -> Result<u64, NarInfoError> {
            get(k)?
                .parse()
                .map_err(|_| bad(&format!("{k} is not a number")))
        };
        let references = f
            .get("References")
            .map(|r| {
                r.split_whitespace()
                    .map(|b| in_store("References", b))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let deriver = f
            .get("Deriver")
            .filter(|d| **d != "unknown-deriver")
            .map(|d| in_store("Deriver", d))
            .transpose()?;
        Ok(NarInfo {
            url: get("URL")?.to_string(),
            compression: f.get("Compression").copied().unwrap_or("bzip2").to_string(),
            file_hash: hash("FileHash")?,
            file_size: num("FileSize")?,
            nar_hash: hash("NarHash")?,
            nar_size: num("NarSize")?,
            references,
            deriver,
            sigs,
            ca: f.get("CA").map(|c| c.to_string()),
            store_path,
        })
    }

    /// Whether one of its signatures is by one of `keys` (`NAME:BASE64` public keys) over
    /// its fingerprint, as Nix checks it with `require-sigs`.
    pub fn signed_by(&self, keys: &[String]) -> bool {
        let fingerprint = self.fingerprint();
        self.sigs.iter().any(|sig| {
            let Some((name, sig)) = sig.split_once(':') else {
                return false;
            };
            let Some(sig) = BASE64
                .decode(sig.as_bytes())
                .ok()
                .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
            else {
                return false;
            };
            keys.iter()
                .filter_map(|k| k.split_once(':'))
                .filter(|(n, _)| *n == name)
                .filter_map(|(_, k)| BASE64.decode(k.as_bytes()).ok())
                .filter_map(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
                .filter_map(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
                .any(|k| k.verify_strict(fingerprint.as_bytes(), &sig).is_ok())
        })
    }

    /// `1;<path>;<narhash>;<narsize>;<refs,…>`: what a signature covers.
    pub fn fingerprint(&self) -> String {
        let mut refs = self.references.clone();
        refs.sort();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            sha256_nix32(&self.nar_hash),
            self.nar_size,
            refs.join(",")
        )
    }

    pub fn sign(&mut self, key: &Key) {
        let sig = key.sign_raw(&self.fingerprint());
        self.sigs.push(format!("{}:{sig}", key.name));
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "StorePath: {}", self.store_path);
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        let _ = writeln!(s, "FileHash: {}", sha256_nix32(&self.file_hash));
        let _ = writeln!(s, "FileSize: {}", self.file_size);
        let _ = writeln!(s, "NarHash: {}", sha256_nix32(&self.nar_hash));
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let mut refs: Vec<&str> = self.references.iter().map(|r| basename(r)).collect();
        refs.sort();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {}", basename(d));
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_narinfo_parses_back_and_a_generated_key_reloads() {
        let info = NarInfo {
            store_path: "/nix/store/0000000000000000000000000000000a-x".into(),
            url: "nar/x.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: vec![1; 32],
            file_size: 10,
            nar_hash: vec![2; 32],
            nar_size: 120,
            references: vec!["/nix/store/0000000000000000000000000000000b-y".into()],
            deriver: Some("/nix/store/0000000000000000000000000000000c-x.drv".into()),
            sigs: vec!["k:abc".into()],
            ca: None,
        };
        assert_eq!(NarInfo::parse(&info.render()).unwrap(), info);
        assert!(NarInfo::parse("StorePath: x\nURL: y\n").is_err());
        // Paths that name files beyond the store are no narinfo's.
        let text = info.render();
        for (good, bad) in [
            (
                "Deriver: 0000000000000000000000000000000c-x.drv",
                "Deriver: ../../srv/x.drv",
            ),
            (
                "References: 0000000000000000000000000000000b-y",
                "References: 0000000000000000000000000000000b-y /etc/passwd",
            ),
            (
                "StorePath: /nix/store/0000000000000000000000000000000a-x",
                "StorePath: /nix/../etc/0000000000000000000000000000000a-x",
            ),
        ] {
            assert!(text.contains(good), "{good}");
            let e = NarInfo::parse(&text.replace(good, bad)).unwrap_err();
            assert!(e.to_string().contains("store path"), "{bad}: {e}");
        }
        let k = Key::generate("farm-1").unwrap();
        let again = Key::parse(&k.secret_text()).unwrap();
        assert_eq!(again.public(), k.public());
        assert_eq!(again.sign_raw("f"), k.sign_raw("f"));
    }

    #[test]
    fn keys_sign_what_nix_verifies() {
        // `nix-store --generate-binary-cache-key` writes exactly this shape.
        let seed = [7u8; 32];
        let sk = SigningKey::from_bytes(&seed);
        let mut bytes = seed.to_vec();
        bytes.extend_from_slice(sk.verifying_key().as_bytes());
        let key = Key::parse(&format!("test-1:{}", BASE64.encode(&bytes))).unwrap();
        assert_eq!(key.name, "test-1");
        assert!(key.public().starts_with("test-1:"));
        assert!(
            format!("{key:?}").contains("test-1")
                && !format!("{key:?}").contains(&BASE64.encode(&bytes))
        );
        let cachix = Key::parse(&BASE64.encode(&bytes)).unwrap();
        assert_eq!(cachix.sign_raw("x"), key.sign_raw("x"));
        assert!(Key::parse("name:AAAA").is_err());
        let mut info = NarInfo {
            store_path: "/nix/store/0000000000000000000000000000000a-x".into(),
            url: "nar/x.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: vec![1; 32],
            file_size: 10,
            nar_hash: vec![2; 32],
            nar_size: 120,
            references: vec![
                "/nix/store/0000000000000000000000000000000c-z".into(),
                "/nix/store/0000000000000000000000000000000b-y".into(),
            ],
            deriver: Some("/nix/store/0000000000000000000000000000000d-x.drv".into()),
            sigs: vec![],
            ca: None,
        };
        assert!(info.fingerprint().ends_with(";120;/nix/store/0000000000000000000000000000000b-y,/nix/store/0000000000000000000000000000000c-z"));
        info.sign(&key);
        // Checked as Nix checks it: by the key's name and bytes, over the fingerprint.
        assert!(info.signed_by(&[key.public()]));
        assert!(!info.signed_by(&[Key::generate("test-1").unwrap().public()]));
        assert!(!info.signed_by(&[]));
        let mut forged = info.clone();
        forged.nar_size += 1;
        assert!(!forged.signed_by(&[key.public()]));
        let text = info.render();
        assert!(text.contains(
            "References: 0000000000000000000000000000000b-y 0000000000000000000000000000000c-z\n"
        ));
        assert!(text.contains("Deriver: 0000000000000000000000000000000d-x.drv\n"));
        assert!(text.contains("Sig: test-1:"));
    }
}
