//! Who the farm cache admits: the agents' configured tokens, and tokens the coordinator
//! issues to each agent at registration. An agent admitted by a client certificate has no
//! token of its own, and Nix, which reads the farm cache for it, cannot present a
//! certificate: the issued token is what it shows instead.

use crate::credentials::Credentials;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Tokens issued to registered agents, one per agent name, kept in the state directory: an
/// agent that reconnects, to this coordinator or to it restarted, gets the same one, so its
/// pushes in flight still count.
#[derive(Default)]
pub struct FarmTokens {
    inner: Mutex<Issued>,
    /// Where they are kept (`NAME TOKEN` lines, mode 0600); None: in memory only.
    file: Option<PathBuf>,
}

#[derive(Default)]
struct Issued {
    by_name: HashMap<String, String>,
    /// SHA-256 of every token: a request's token is looked up by its hash, in constant
    /// time whatever the number out, and the hash gives nothing of a token away.
    hashes: HashSet<[u8; 32]>,
}

fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Secrets: only how many are out.
impl std::fmt::Debug for FarmTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.lock().map_or(0, |m| m.by_name.len());
        write!(f, "FarmTokens({n} issued)")
    }
}

/// Most names a coordinator issues tokens to (agents' names are bounded at registration;
/// this bounds the map, whatever registers).
const MAX_ISSUED: usize = 100_000;

impl FarmTokens {
    /// The tokens kept in `file` (made when the first is issued). Lines that are not a
    /// name and a 64-digit token are skipped, with a warning.
    pub fn open(file: PathBuf) -> FarmTokens {
        let mut issued = Issued::default();
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for line in text.lines().take(MAX_ISSUED) {
                    match line.split_once(' ') {
                        Some((name, token))
                            if !name.is_empty()
                                && token.len() == 64
                                && token.bytes().all(|b| b.is_ascii_hexdigit()) =>
                        {
                            issued.hashes.insert(digest(token));
                            issued.by_name.insert(name.to_string(), token.to_string());
                        }
                        _ => tracing::warn!(
                            file = %file.display(),
                            "skipping a line that is not NAME TOKEN"
                        ),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                file = %file.display(),
                "cannot read the farm cache tokens issued before ({e}): agents get new ones"
            ),
        }
        FarmTokens {
            inner: Mutex::new(issued),
            file: Some(file),
        }
    }

    /// The token of agent `name` (issued now if it has none). None when no unguessable
    /// token can be made here, or too many are out: the agent then has none to show.
    pub fn issue(&self, name: &str) -> Option<String> {
        let mut issued = self.inner.lock().ok()?;
        if let Some(t) = issued.by_name.get(name) {
            return Some(t.clone());
        }
        if issued.by_name.len() >= MAX_ISSUED {
            tracing::warn!(
                agent = name,
                "no farm cache token issued: {MAX_ISSUED} are out already"
            );
            return None;
        }
        let token = random_token()?;
        if let Some(file) = &self.file
            && let Err(e) = keep(file, name, &token)
        {
            // Still valid until a restart; after one, the agent is issued another.
            tracing::warn!(file = %file.display(), "cannot keep a farm cache token: {e}");
        }
        issued.hashes.insert(digest(&token));
        issued.by_name.insert(name.to_string(), token.clone());
        Some(token)
    }

    /// Whether `given` is a token issued here.
    pub fn admits(&self, given: &str) -> bool {
        !given.is_empty()
            && self
                .inner
                .lock()
                .is_ok_and(|i| i.hashes.contains(&digest(given)))
    }
}

/// Appends `NAME TOKEN` to `file` (mode 0600: secrets).
fn keep(file: &std::path::Path, name: &str, token: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)?;
    f.write_all(format!("{name} {token}\n").as_bytes())?;
    f.sync_data()
}

/// 256 bits from the kernel, hex; None if it cannot give them (fail closed: no weak token).
fn random_token() -> Option<String> {
    use std::io::Read as _;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| tracing::warn!("no farm cache token issued: /dev/urandom: {e}"))
        .ok()?;
    Some(data_encoding::HEXLOWER.encode(&b))
}

/// What the farm cache takes as a credential. Neither set: it admits anyone, which the
/// coordinator allows only on loopback.
#[derive(Default, Clone)]
pub struct FarmAdmission {
    /// The agents' configured tokens (`[auth] agent_token_file`, `agent_tokens_file`).
    pub tokens: Option<Arc<Credentials>>,
    /// Tokens issued at registration.
    pub issued: Option<Arc<FarmTokens>>,
}

impl FarmAdmission {
    /// Whether anyone is admitted without a credential.
    pub fn is_open(&self) -> bool {
        self.tokens.is_none() && self.issued.is_none()
    }

    /// Whether `given` (a token, as Bearer or as a netrc password) is admitted.
    pub fn admits(&self, given: &str) -> bool {
        self.tokens
            .as_ref()
            .is_some_and(|c| c.admit(given).is_some())
            | self.issued.as_ref().is_some_and(|i| i.admits(given))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_token_is_unguessable_stable_per_agent_and_admitted_only_itself() {
        let t = FarmTokens::default();
        let a = t.issue("a").unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(t.issue("a").unwrap(), a, "the same on a reconnect");
        let b = t.issue("b").unwrap();
        assert_ne!(a, b);
        assert!(t.admits(&a) && t.admits(&b));
        for wrong in ["", &a[..63], "x", &format!("{a}0")] {
            assert!(!t.admits(wrong), "{wrong}");
        }
        let issued = FarmAdmission {
            tokens: None,
            issued: Some(Arc::new(t)),
        };
        assert!(!issued.is_open() && issued.admits(&a) && !issued.admits("guess"));
        let both = FarmAdmission {
            tokens: Credentials::new(Some("join".into()), vec![]).map(Arc::new),
            ..issued
        };
        assert!(both.admits("join") && both.admits(&b) && !both.admits("guess"));
        assert!(FarmAdmission::default().is_open());
    }

    #[test]
    fn issued_tokens_survive_a_restart_in_a_file_only_the_coordinator_reads() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("farm-tokens");
        let a = FarmTokens::open(file.clone()).issue("a").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A line someone broke is skipped; the rest still count.
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("broken\n");
        std::fs::write(&file, text).unwrap();
        let again = FarmTokens::open(file);
        assert!(again.admits(&a));
        assert_eq!(again.issue("a").unwrap(), a);
        assert_ne!(again.issue("b").unwrap(), a);
    }
}
