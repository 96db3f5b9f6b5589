//! Client certificates the operator revoked (`[tls] revoked_certs_file`): refused when they
//! call in, and the agents connected with them cut off. The file is read again when it
//! changes, so a host that was compromised is shut out without restarting the coordinator
//! or issuing a new CA.

use crate::watched::{Watched, read_at_most};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::RwLock;

/// Most fingerprints one file may list.
const MAX_REVOKED: usize = 100_000;

/// Largest file read, bytes (a fingerprint line is under 120).
const MAX_FILE_BYTES: u64 = 16 << 20;

/// The revoked certificates, by the SHA-256 of their DER encoding (lowercase hex, as
/// [`crate::credentials::Credential::Certificate`] holds it).
#[derive(Debug, Default)]
pub struct Revoked {
    file: Option<Watched>,
    fingerprints: RwLock<HashSet<String>>,
}

impl Revoked {
    /// Reads `file` (None: nothing is revoked). A file that cannot be read or has a line
    /// that is not a fingerprint is an error naming it: the coordinator does not start
    /// without the revocations it was told of.
    pub fn open(file: Option<PathBuf>) -> Result<Revoked, String> {
        let Some(path) = file else {
            return Ok(Revoked::default());
        };
        let file = Watched::new(path);
        let fingerprints = read_at_most(file.path(), MAX_FILE_BYTES)
            .and_then(|t| parse(&t))
            .map_err(|e| what(&file, &e))?;
        Ok(Revoked {
            file: Some(file),
            fingerprints: RwLock::new(fingerprints),
        })
    }

    /// Whether the certificate with this fingerprint was revoked.
    pub fn contains(&self, fingerprint: &str) -> bool {
        // A poisoned lock: refuse (fail closed) only if revocations are configured.
        match self.fingerprints.read() {
            Ok(s) => s.contains(fingerprint),
            Err(_) => self.file.is_some(),
        }
    }

    /// Reads the file again if it changed since (and has stood still for a look); true when
    /// it was taken (agents still connected with a certificate revoked now are to be cut
    /// off). A file that became unreadable or malformed keeps the revocations read
    /// before (a broken edit never lets a revoked certificate back in), with an error in
    /// the log.
    pub fn reload(&self) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        let Some(text) = file.read_settled(MAX_FILE_BYTES) else {
            return false;
        };
        match text.and_then(|t| parse(&t)).map_err(|e| what(file, &e)) {
            Ok(fingerprints) => {
                tracing::info!(
                    file = %file.path().display(),
                    revoked = fingerprints.len(),
                    "revoked client certificates read again"
                );
                if let Ok(mut s) = self.fingerprints.write() {
                    *s = fingerprints;
                }
                true
            }
            Err(e) => {
                tracing::error!("{e}; the certificates revoked before stay revoked");
                false
            }
        }
    }
}

fn what(file: &Watched, e: &str) -> String {
    format!("[tls] revoked_certs_file {}: {e}", file.path().display())
}

/// One fingerprint per line, as `openssl x509 -noout -fingerprint -sha256` prints it
/// (`sha256 Fingerprint=AB:CD:…`), as `nixfarm agents` and the API show it
/// (`sha256:abcd…`, `certificate sha256:abcd…`) or as 64 hex digits; `#` starts a comment.
fn parse(text: &str) -> Result<HashSet<String>, String> {
    let mut out = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let value = line.rsplit_once('=').map_or(line, |(_, v)| v.trim());
        let value = value.strip_prefix("certificate ").unwrap_or(value).trim();
        let value = value.strip_prefix("sha256:").unwrap_or(value);
        let hex: String = value
            .chars()
            .filter(|c| *c != ':')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "line {} is not a SHA-256 fingerprint (64 hex digits, colons allowed)",
                i + 1
            ));
        }
        if out.len() >= MAX_REVOKED {
            return Err(format!("more than {MAX_REVOKED} fingerprints"));
        }
        out.insert(hex);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn fingerprints_are_read_as_openssl_prints_them_and_bad_lines_are_named() {
        let colons: Vec<String> = FP
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let text = format!(
            "# host a, retired\nsha256 Fingerprint={}\n\n{}  # plain\nsha256:{}\ncertificate sha256:{}\n",
            colons.join(":"),
            FP.replace('0', "f"),
            FP.replace('1', "e"),
            FP.replace('2', "d")
        );
        let got = parse(&text).unwrap();
        assert!(got.contains(FP) && got.len() == 4, "{got:?}");
        let err = parse("# ok\nnot a fingerprint\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse(&FP[1..]).is_err());
    }

    #[test]
    fn a_change_is_read_again_and_a_broken_edit_keeps_what_was_revoked() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("revoked");
        std::fs::write(&file, "").unwrap();
        let r = Revoked::open(Some(file.clone())).unwrap();
        // A change is taken at the look after the one that saw it (it stood still).
        let reload = || {
            assert!(!r.reload(), "taken at the first look");
            r.reload()
        };
        assert!(!r.contains(FP));
        assert!(!r.reload(), "unchanged");
        std::fs::write(&file, format!("{FP}\n")).unwrap();
        assert!(reload());
        assert!(r.contains(FP));
        // Another fingerprint of the same length, the modification time put back (as
        // `cp -p` would): still a change.
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let other = FP.replace('1', "2");
        std::fs::write(&file, format!("{other}\n")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(reload());
        assert!(r.contains(&other) && !r.contains(FP));
        std::fs::write(&file, format!("{FP}\n")).unwrap();
        assert!(reload());
        std::fs::write(&file, "garbage that is longer\n").unwrap();
        assert!(!reload());
        assert!(r.contains(FP), "a broken edit lets nothing back in");
        std::fs::remove_file(&file).unwrap();
        assert!(!reload());
        assert!(r.contains(FP), "nor does a removed file");
        // Unreadable at start: no start.
        assert!(Revoked::open(Some(d.path().join("missing"))).is_err());
        assert!(!Revoked::open(None).unwrap().contains(FP));
    }
}
