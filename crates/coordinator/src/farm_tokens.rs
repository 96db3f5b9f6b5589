//! Who the farm cache admits: the agents' configured tokens, and tokens the coordinator
//! issues to each agent at registration. An agent admitted by a client certificate has no
//! token of its own, and Nix, which reads the farm cache for it, cannot present a
//! certificate: the issued token is what it shows instead.

use crate::clock::{Clock, SystemClock};
use crate::credentials::{Credential, Credentials};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Tokens issued to registered agents, one per agent name, kept in the state directory: an
/// agent that reconnects, to this coordinator or to it restarted, gets the same one, so its
/// pushes in flight still count.
///
/// A token counts only while its agent is connected, and for a lease after its stream ends
/// (or after the coordinator starts): an agent retired, or no longer admitted (its
/// certificate withdrawn), loses the farm cache with its lease, as its jobs go back to the
/// queue then.
pub struct FarmTokens {
    inner: Mutex<Issued>,
    /// Where they are kept (`NAME TOKEN` lines, mode 0600); None: in memory only.
    file: Option<PathBuf>,
    clock: Arc<dyn Clock>,
    /// How long a token outlives its agent's stream, ms (the scheduler's lease).
    lease_ms: i64,
}

#[derive(Default)]
struct Issued {
    by_name: HashMap<String, String>,
    /// The agent of each token by its SHA-256: a request's token is looked up by its hash,
    /// in constant time whatever the number out, and the hash gives nothing of a token away.
    names: HashMap<[u8; 32], String>,
    /// Whether each agent's token counts now: while connected, or until a time.
    live: HashMap<String, Live>,
    /// What admitted the registration each token was issued to (none yet: read from the
    /// file after a restart; the next registration's is taken).
    holders: HashMap<String, Credential>,
    /// The agents whose token is in the file: one the operator took out of it is withdrawn
    /// ([`FarmTokens::withdraw_struck`]); one that could not be written there is not.
    on_file: std::collections::HashSet<String>,
}

/// Whether an agent's token counts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Live {
    /// Its agent is connected on this stream.
    Connected(u64),
    /// Until this time, ms (its stream ended, or the coordinator started).
    Until(i64),
}

impl Default for FarmTokens {
    /// In memory only, on the system clock, with the default lease (tests).
    fn default() -> FarmTokens {
        FarmTokens::in_memory(Arc::new(SystemClock::new()), 60_000)
    }
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
    /// Tokens kept nowhere: lost with the process.
    pub fn in_memory(clock: Arc<dyn Clock>, lease_ms: i64) -> FarmTokens {
        FarmTokens {
            inner: Mutex::new(Issued::default()),
            file: None,
            clock,
            lease_ms,
        }
    }

    /// The tokens kept in `file` (made when the first is issued). Lines that are not a
    /// name and a 64-digit token are skipped, with a warning. Each counts for `lease_ms`
    /// from now, or for as long as its agent is connected again.
    pub fn open(file: PathBuf, clock: Arc<dyn Clock>, lease_ms: i64) -> FarmTokens {
        let until = Live::Until(clock.now_ms().saturating_add(lease_ms));
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
                            issued.names.insert(digest(token), name.to_string());
                            issued.by_name.insert(name.to_string(), token.to_string());
                            issued.live.insert(name.to_string(), until);
                            issued.on_file.insert(name.to_string());
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
            clock,
            lease_ms,
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
        if let Some(file) = &self.file {
            match keep(file, name, &token) {
                Ok(()) => {
                    issued.on_file.insert(name.to_string());
                }
                // Still valid until a restart; after one, the agent is issued another.
                Err(e) => {
                    tracing::warn!(file = %file.display(), "cannot keep a farm cache token: {e}")
                }
            }
        }
        issued.names.insert(digest(&token), name.to_string());
        issued.by_name.insert(name.to_string(), token.clone());
        Some(token)
    }

    /// [`FarmTokens::issue`] to a registration of `name` admitted by `credential`. A name
    /// registered with another credential than the one its token was issued to (a host
    /// that took the name of one gone for now) gets a new token, the old one withdrawn:
    /// otherwise it would hold the other's token, which taking back its own credential
    /// (the real agent having come back under its own) would not withdraw.
    pub fn issue_to(&self, name: &str, credential: &Credential) -> Option<String> {
        let other = self.inner.lock().ok().is_some_and(|i| {
            i.holders.get(name).is_some_and(|c| c != credential) && i.by_name.contains_key(name)
        });
        if other {
            tracing::warn!(
                agent = name,
                "registered with another credential than its farm cache token was issued to: a new token is issued, the old one withdrawn"
            );
            self.withdraw(name);
        }
        let token = self.issue(name)?;
        if let Ok(mut i) = self.inner.lock() {
            i.holders.insert(name.to_string(), credential.clone());
        }
        Some(token)
    }

    /// Agent `name` is connected on stream `conn`: its token counts until that ends. A
    /// stream older than the one already noted (streams are numbered in order; two
    /// registrations raced) changes nothing.
    pub fn connected(&self, name: &str, conn: u64) {
        if let Ok(mut i) = self.inner.lock()
            && i.by_name.contains_key(name)
        {
            let live = i.live.entry(name.to_string()).or_insert(Live::Until(0));
            if !matches!(*live, Live::Connected(c) if c > conn) {
                *live = Live::Connected(conn);
            }
        }
    }

    /// Agent `name`'s stream `conn` ended: its token counts for a lease more (a stream
    /// that another of the agent's registrations replaced changes nothing).
    pub fn disconnected(&self, name: &str, conn: u64) {
        let until = Live::Until(self.clock.now_ms().saturating_add(self.lease_ms));
        if let Ok(mut i) = self.inner.lock()
            && let Some(live) = i.live.get_mut(name)
            && *live == Live::Connected(conn)
        {
            *live = until;
        }
    }

    /// Withdraws agent `name`'s token for good (what admitted it was taken back): refused from
    /// now on, struck from the file, and the name, if it registers again with another
    /// credential, is issued a new one.
    pub fn withdraw(&self, name: &str) {
        self.withdraw_all(std::slice::from_ref(&name.to_string()));
    }

    /// [`FarmTokens::withdraw`] for several names, with one rewrite of the file.
    pub fn withdraw_all(&self, names: &[String]) {
        let Ok(mut i) = self.inner.lock() else {
            return;
        };
        let mut any = false;
        for name in names {
            let Some(token) = i.by_name.remove(name) else {
                continue;
            };
            i.names.remove(&digest(&token));
            i.live.remove(name);
            i.on_file.remove(name);
            i.holders.remove(name);
            tracing::warn!(agent = %name, "farm cache token withdrawn");
            any = true;
        }
        if !any {
            return;
        }
        if let Some(file) = &self.file {
            let text: String = i
                .by_name
                .iter()
                .map(|(n, t)| format!("{n} {t}\n"))
                .collect();
            if let Err(e) = rewrite(file, &text) {
                // Refused until a restart, which would read it back from the file.
                tracing::error!(
                    file = %file.display(),
                    "cannot strike a withdrawn farm cache token from the file: {e}"
                );
            }
        }
    }

    /// Whether any token is kept in the file.
    pub fn kept_on_file(&self) -> bool {
        self.inner.lock().is_ok_and(|i| !i.on_file.is_empty())
    }

    /// The file the tokens are kept in, if any.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    /// Withdraws the tokens the operator struck from the file (a line taken out or
    /// changed, or the whole file removed): a token that leaked is refused from now on, and
    /// its agent, once it registers again, is issued a new one. The names withdrawn. The
    /// file is read under the same lock as the tokens are kept under, so one issued
    /// meanwhile is not taken for struck.
    pub fn withdraw_struck(&self) -> Vec<String> {
        let Some(file) = &self.file else {
            return Vec::new();
        };
        let struck: Vec<String> = {
            let Ok(i) = self.inner.lock() else {
                return Vec::new();
            };
            let text = match crate::watched::read_at_most(file, 64 << 20) {
                Ok(t) => t,
                Err(_) if !file.exists() => String::new(),
                Err(e) => {
                    tracing::error!(file = %file.display(), "cannot read the farm cache tokens again: {e}");
                    return Vec::new();
                }
            };
            // Spacing aside: a line the operator kept, retyped, still holds its token.
            let listed: std::collections::HashSet<(&str, &str)> = text
                .lines()
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    Some((w.next()?, w.next()?))
                })
                .collect();
            i.on_file
                .iter()
                .filter(|n| {
                    i.by_name
                        .get(n.as_str())
                        .is_some_and(|t| !listed.contains(&(n.as_str(), t.as_str())))
                })
                .cloned()
                .collect()
        };
        self.withdraw_all(&struck);
        struck
    }

    /// Whether `given` is a token issued here whose agent is connected, or was within
    /// its lease.
    pub fn admits(&self, given: &str) -> bool {
        if given.is_empty() {
            return false;
        }
        let now = self.clock.now_ms();
        self.inner.lock().is_ok_and(|i| {
            i.names
                .get(&digest(given))
                .and_then(|name| i.live.get(name))
                .is_some_and(|live| match *live {
                    Live::Connected(_) => true,
                    Live::Until(t) => now <= t,
                })
        })
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

/// Replaces `file` with `text` (mode 0600) atomically: a crash leaves the old or the new.
fn rewrite(file: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = file.with_extension("new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()?;
    std::fs::rename(&tmp, file)
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
        t.connected("a", 1);
        t.connected("b", 2);
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

    /// A name taken by a registration with another credential (its agent gone for now) is
    /// issued a new token, and the old one is refused; the real agent, back under its own
    /// credential, is issued another again, so the first taker's token is refused too.
    #[test]
    fn a_name_registered_with_another_credential_gets_a_new_token_and_the_old_is_refused() {
        let t = FarmTokens::default();
        let keeper = Credential::Certificate("aa".into());
        let taker = Credential::Certificate("bb".into());
        let first = t.issue_to("keeper", &keeper).unwrap();
        assert_eq!(t.issue_to("keeper", &keeper).unwrap(), first);
        t.connected("keeper", 1);
        let taken = t.issue_to("keeper", &taker).unwrap();
        assert_ne!(taken, first);
        t.connected("keeper", 2);
        assert!(!t.admits(&first) && t.admits(&taken));
        let back = t.issue_to("keeper", &keeper).unwrap();
        t.connected("keeper", 3);
        assert!(!t.admits(&taken) && t.admits(&back));
    }

    #[test]
    fn issued_tokens_survive_a_restart_in_a_file_only_the_coordinator_reads() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("farm-tokens");
        let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
        let open = || FarmTokens::open(file.clone(), clock.clone(), 60_000);
        let a = open().issue("a").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A line someone broke is skipped; the rest still count.
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("broken\n");
        std::fs::write(&file, text).unwrap();
        let again = open();
        assert!(again.admits(&a), "for a lease from the start");
        assert_eq!(again.issue("a").unwrap(), a);
        assert_ne!(again.issue("b").unwrap(), a);
    }

    #[test]
    fn a_token_struck_from_the_file_is_withdrawn_and_replaced_at_the_next_registration() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("farm-tokens");
        let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
        let t = FarmTokens::open(file.clone(), clock, 60_000);
        let a = t.issue("a").unwrap();
        let b = t.issue("b").unwrap();
        t.connected("a", 1);
        t.connected("b", 2);
        assert!(
            t.withdraw_struck().is_empty(),
            "its own writes strike nothing"
        );
        // The operator takes a's line out.
        let text = std::fs::read_to_string(&file).unwrap();
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with("a "))
            // (b's line retyped with other spacing: still b's.)
            .map(|l| format!("{}  \n", l.replacen(' ', "   ", 1)))
            .collect();
        std::fs::write(&file, kept).unwrap();
        assert_eq!(t.withdraw_struck(), ["a"]);
        assert!(!t.admits(&a) && t.admits(&b));
        let a2 = t.issue("a").unwrap();
        assert_ne!(a2, a);
        t.connected("a", 3);
        assert!(t.admits(&a2));
        assert!(t.withdraw_struck().is_empty());
        // Or removes the file: every token.
        std::fs::remove_file(&file).unwrap();
        let mut gone = t.withdraw_struck();
        gone.sort();
        assert_eq!(gone, ["a", "b"]);
        assert!(!t.admits(&a2) && !t.admits(&b));
    }

    #[test]
    fn a_token_counts_while_its_agent_is_connected_and_for_a_lease_after() {
        let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
        let t = FarmTokens::in_memory(clock.clone(), 5_000);
        let a = t.issue("a").unwrap();
        assert!(!t.admits(&a), "issued, but its agent never connected");
        t.connected("a", 1);
        clock.advance(3_600_000);
        assert!(t.admits(&a), "connected for an hour");
        // A reconnect replaced stream 1: its end changes nothing, nor does its news
        // arriving late.
        t.connected("a", 2);
        t.connected("a", 1);
        t.disconnected("a", 1);
        clock.advance(10_000);
        assert!(t.admits(&a));
        t.disconnected("a", 2);
        clock.advance(5_000);
        assert!(t.admits(&a), "within its lease");
        clock.advance(1);
        assert!(
            !t.admits(&a),
            "its agent did not come back within the lease"
        );
        t.connected("a", 3);
        assert!(t.admits(&a), "back");
        // Restarted: every token kept counts for a lease from the start, then lapses
        // unless its agent connects.
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("farm-tokens");
        let b = FarmTokens::open(file.clone(), clock.clone(), 5_000)
            .issue("b")
            .unwrap();
        let again = FarmTokens::open(file, clock.clone(), 5_000);
        assert!(again.admits(&b));
        clock.advance(5_001);
        assert!(!again.admits(&b));
        again.connected("b", 1);
        assert!(again.admits(&b));
        // Withdrawn: refused at once, and after a restart; the name gets a new one.
        again.issue("c").unwrap();
        again.withdraw("b");
        assert!(!again.admits(&b));
        let restarted = FarmTokens::open(d.path().join("farm-tokens"), clock.clone(), 5_000);
        assert!(!restarted.admits(&b));
        let b2 = restarted.issue("b").unwrap();
        assert_ne!(b2, b);
        assert!(restarted.issue("c").is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("farm-tokens"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
