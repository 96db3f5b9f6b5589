//! Who may call in: a shared token (the agents' join token, or the CLI's token), and tokens
//! each bound to one agent name (`[auth] agent_tokens_file`), so that an agent cannot
//! register, claim uploads or answer evaluation under another's name.

/// An agent name the caller's credential is bound to (a request extension set by the
/// token check); absent: the credential admits any name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundName(pub String);

/// Set beside a certificate credential when the caller also showed a valid token: it can
/// show that token to the farm cache too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShowsToken;

/// What admitted an agent. Cross-checks count two agents only when their credentials
/// differ: two names registered with one join token (or one certificate) are one holder,
/// who could otherwise answer twice and agree with itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Credential {
    /// None is asked for (a loopback farm with no token): agents are told apart by name.
    #[default]
    Open,
    /// The shared join token (`[auth] agent_token_file`).
    JoinToken,
    /// A token bound to this agent name (`[auth] agent_tokens_file`).
    NamedToken(String),
    /// A client certificate, by the SHA-256 of its DER encoding (hex).
    Certificate(String),
}

impl Credential {
    /// What admitted an agent, as `nixfarm agents` shows it: for a certificate, the
    /// fingerprint `[tls] revoked_certs_file` takes.
    pub fn describe(&self) -> String {
        match self {
            Credential::Open => "open".into(),
            Credential::JoinToken => "join token".into(),
            Credential::NamedToken(_) => "named token".into(),
            Credential::Certificate(fp) => format!("certificate sha256:{fp}"),
        }
    }

    /// Whether agents `a` and `b` (name, credential) count as two for a cross-check:
    /// different names, and different credentials unless none is asked for.
    pub fn independent(a: (&str, &Credential), b: (&str, &Credential)) -> bool {
        a.0 != b.0 && (a.1 != b.1 || (*a.1 == Credential::Open && *b.1 == Credential::Open))
    }
}

/// Why an agent whose certificate was revoked is refused.
pub const REVOKED: &str = "this client certificate was revoked ([tls] revoked_certs_file)";

/// Why an agent whose named token was taken back is refused.
pub const TAKEN_BACK: &str =
    "this agent's token was taken back or replaced ([auth] agent_tokens_file)";

/// Why an agent is refused a name its operator gave a token of its own.
pub const NAME_RESERVED: &str = "this name has a token of its own ([auth] agent_tokens_file): an agent registers under it only with that token";

/// Why an agent admitted by a join token that was since replaced is refused.
pub const JOIN_REPLACED: &str = "the join token was replaced ([auth] agent_token_file)";

/// What the engine asks, under its lock, before it registers an agent: whether what
/// admitted it was taken back since (a registration may come up to 30 s after its stream
/// was admitted).
#[derive(Debug, Default)]
pub struct Gate {
    pub revoked: Option<std::sync::Arc<crate::revoked::Revoked>>,
    /// The agents' tokens, named ones read again when their file changes.
    pub agents: Option<std::sync::Arc<Credentials>>,
}

impl Gate {
    /// Why an agent admitted by `credential` (showing a token of digest `token_digest`, or
    /// none: empty) may not register as `name`: a name the named tokens file lists is that
    /// token's alone, shown as what admitted the agent or beside its certificate (a join
    /// token or a certificate, which may take any other name, would otherwise take it while
    /// its agent is away, and its jobs).
    pub fn name_refusal(
        &self,
        name: &str,
        credential: &Credential,
        token_digest: &str,
    ) -> Option<&'static str> {
        self.agents
            .as_ref()?
            .takes_name(name, credential, token_digest)
            .then_some(NAME_RESERVED)
    }

    /// Why an agent admitted by `credential` (a named token checked at `admitted_at`) may
    /// not register; None: it may.
    pub fn refusal(&self, credential: &Credential, admitted_at: u64) -> Option<&'static str> {
        match credential {
            Credential::Certificate(fp)
                if self.revoked.as_ref().is_some_and(|r| r.contains(fp)) =>
            {
                Some(REVOKED)
            }
            Credential::NamedToken(name)
                if self
                    .agents
                    .as_ref()
                    .is_some_and(|c| !c.still_holds(name, admitted_at)) =>
            {
                Some(TAKEN_BACK)
            }
            Credential::JoinToken
                if self
                    .agents
                    .as_ref()
                    .is_some_and(|c| !c.join_still_holds(admitted_at)) =>
            {
                Some(JOIN_REPLACED)
            }
            _ => None,
        }
    }
}

/// Most named tokens in one file.
const MAX_NAMED: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// The shared token: any name.
    Any,
    /// A token bound to this agent name.
    Named(String),
}

/// When a request's token was checked: the generation of the tokens then (a request
/// extension). A registration that comes after its token was taken back is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdmittedAt(pub u64);

/// The SHA-256 (hex) of the token that admitted a request (a request extension), kept
/// with the agent's registration: a restarted coordinator tells by it an agent whose token
/// was replaced while it was down.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenDigest(pub String);

impl TokenDigest {
    pub fn of(token: &str) -> TokenDigest {
        use sha2::Digest as _;
        TokenDigest(data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(token.as_bytes())))
    }
}

/// The credentials one kind of caller may present.
#[derive(Debug, Default)]
pub struct Credentials {
    named: std::sync::RwLock<Named>,
}

/// The tokens, as last read.
#[derive(Debug, Default)]
struct Named {
    /// The shared (join) token.
    shared: Option<String>,
    tokens: Vec<(String, String)>,
    /// Bumped by each reading that changed a token.
    generation: u64,
    /// The generation at which each name's token last changed or was taken back.
    changed: std::collections::HashMap<String, u64>,
    /// The generation at which the shared token last changed.
    shared_changed: u64,
}

impl Credentials {
    /// None when there is nothing to check (no token at all).
    pub fn new(shared: Option<String>, named: Vec<(String, String)>) -> Option<Credentials> {
        (shared.is_some() || !named.is_empty()).then(|| Credentials {
            named: std::sync::RwLock::new(Named {
                shared,
                tokens: named,
                ..Default::default()
            }),
        })
    }

    /// Whether `digest` is that of the token that admits `name` now (None: the join
    /// token). An empty digest (a registration kept by an older coordinator) is taken as
    /// matching.
    pub fn digest_matches(&self, name: Option<&str>, digest: &str) -> bool {
        if digest.is_empty() {
            return true;
        }
        let Ok(n) = self.named.read() else {
            return false;
        };
        let token = match name {
            None => n.shared.as_deref(),
            Some(name) => n
                .tokens
                .iter()
                .find(|(n2, _)| n2 == name)
                .map(|(_, t)| t.as_str()),
        };
        token.is_some_and(|t| TokenDigest::of(t).0 == digest)
    }

    /// Whether the shared token, checked at generation `at`, is still the one it is.
    pub fn join_still_holds(&self, at: u64) -> bool {
        self.named.read().is_ok_and(|n| n.shared_changed <= at)
    }

    /// What a stream admitted now is checked against later ([`Admission::holds`]).
    pub fn admission(self: &std::sync::Arc<Self>) -> Admission {
        let at = self.named.read().map_or(0, |n| n.generation);
        Admission {
            creds: Some(self.clone()),
            at,
        }
    }

    /// `f` of the shared token as it is now (the web UI derives its session cookie from it).
    pub fn with_shared<R>(&self, f: impl FnOnce(Option<&str>) -> R) -> R {
        match self.named.read() {
            Ok(n) => f(n.shared.as_deref()),
            Err(_) => f(None),
        }
    }

    /// Takes the shared token read again; true when it changed (the agents admitted by the
    /// old one are to be cut off).
    pub fn replace_shared(&self, token: String) -> bool {
        let Ok(mut n) = self.named.write() else {
            return false;
        };
        if n.shared.as_deref() == Some(token.as_str()) {
            return false;
        }
        n.generation += 1;
        n.shared_changed = n.generation;
        n.shared = Some(token);
        true
    }

    /// What `given` admits, and the named tokens' generation it was checked at (read
    /// under the same lock: a token replaced meanwhile cannot look taken back).
    pub fn admit_at(&self, given: &str) -> Option<(Admitted, u64)> {
        let named = self.named.read().ok()?;
        let found = Self::admit_in(given, &named)?;
        Some((found, named.generation))
    }

    /// Whether an agent admitted by `credential` (showing a token of digest `token_digest`,
    /// or none: empty) would take a name the file gives another token: `name` is listed, and
    /// it shows that name's token neither as what admitted it nor beside its certificate.
    pub fn takes_name(&self, name: &str, credential: &Credential, token_digest: &str) -> bool {
        let own = match credential {
            Credential::NamedToken(n) => n == name,
            Credential::Certificate(_) => {
                !token_digest.is_empty() && self.digest_matches(Some(name), token_digest)
            }
            Credential::JoinToken | Credential::Open => false,
        };
        !own && self.names(name)
    }

    /// Whether the file still names `name` at all.
    pub fn names(&self, name: &str) -> bool {
        self.named
            .read()
            .is_ok_and(|n| n.tokens.iter().any(|(n2, _)| n2 == name))
    }

    /// Whether `name`'s token, checked at generation `at`, is still the one it has.
    pub fn still_holds(&self, name: &str, at: u64) -> bool {
        self.named
            .read()
            .is_ok_and(|n| n.changed.get(name).is_none_or(|g| *g <= at))
    }

    /// Takes the named tokens read again: returns the names whose token changed or went
    /// (their agents are to be cut off).
    pub fn replace_named(&self, tokens: Vec<(String, String)>) -> Vec<String> {
        let Ok(mut n) = self.named.write() else {
            return Vec::new();
        };
        let gone: Vec<String> = n
            .tokens
            .iter()
            .filter(|(name, token)| !tokens.iter().any(|(n2, t2)| n2 == name && t2 == token))
            .map(|(name, _)| name.clone())
            .collect();
        if !gone.is_empty() {
            n.generation += 1;
            let g = n.generation;
            for name in &gone {
                n.changed.insert(name.clone(), g);
            }
        }
        n.tokens = tokens;
        gone
    }

    /// Reads an agent tokens file: one `NAME TOKEN` per line (blank lines and `#` comments
    /// skipped). Names follow agent names' rules; each name and each token appears once.
    pub fn parse_named(text: &str) -> Result<Vec<(String, String)>, String> {
        let out = Self::parse_named_lines(text)?;
        if out.is_empty() {
            return Err("no agent in it".into());
        }
        Ok(out)
    }

    /// [`Credentials::parse_named`] as read again while running: a file whose lines were
    /// all taken out holds no agent (each one's token is taken back); an empty file is
    /// taken for one being written, and refused.
    pub fn parse_named_again(text: &str) -> Result<Vec<(String, String)>, String> {
        if text.trim().is_empty() {
            return Err("empty (being written?)".into());
        }
        Self::parse_named_lines(text)
    }

    fn parse_named_lines(text: &str) -> Result<Vec<(String, String)>, String> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("line {}", i + 1);
            let mut parts = line.split_whitespace();
            let (Some(name), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("{}: expected `NAME TOKEN`", at()));
            };
            let name_ok = name.len() <= nixfarm_core::limits::MAX_AGENT_NAME
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
            if !name_ok {
                return Err(format!(
                    "{}: an agent name is 1 to 255 letters, digits and - _ . @",
                    at()
                ));
            }
            if token.len() < 16 {
                return Err(format!("{}: a token is at least 16 characters", at()));
            }
            if out.iter().any(|(n, t)| n == name || t == token) {
                return Err(format!("{}: the name or the token appears twice", at()));
            }
            if out.len() >= MAX_NAMED {
                return Err(format!("more than {MAX_NAMED} agents"));
            }
            out.push((name.to_string(), token.to_string()));
        }
        Ok(out)
    }

    /// What `given` admits, compared in constant time against every credential (no early
    /// exit), so a token cannot be guessed byte by byte nor told apart by timing.
    pub fn admit(&self, given: &str) -> Option<Admitted> {
        let named = self.named.read().ok()?;
        Self::admit_in(given, &named)
    }

    fn admit_in(given: &str, tokens: &Named) -> Option<Admitted> {
        let g = given.as_bytes();
        let mut found = None;
        if let Some(s) = &tokens.shared
            && crate::engine::constant_time_eq(g, s.as_bytes())
            && !s.is_empty()
        {
            found = Some(Admitted::Any);
        }
        for (name, token) in &tokens.tokens {
            if crate::engine::constant_time_eq(g, token.as_bytes()) && found.is_none() {
                found = Some(Admitted::Named(name.clone()));
            }
        }
        found
    }
}

/// A long stream's admission (a live page, `nixfarm watch`): it holds while the shared
/// token it was admitted under stands; replaced, the stream ends.
#[derive(Clone, Default)]
pub struct Admission {
    creds: Option<std::sync::Arc<Credentials>>,
    at: u64,
}

impl Admission {
    /// Whether the token the stream was admitted under is still the one (no token
    /// configured: always).
    pub fn holds(&self) -> bool {
        self.creds
            .as_ref()
            .is_none_or(|c| c.join_still_holds(self.at))
    }
}

/// What a stream whose admission no longer holds is told as it ends.
pub const TOKEN_REPLACED: &str =
    "the coordinator's client token was replaced: this stream ends; use the new token";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_admission_holds_until_the_shared_token_is_replaced() {
        assert!(Admission::default().holds(), "no token configured");
        let c = std::sync::Arc::new(Credentials::new(Some("one".into()), vec![]).unwrap());
        let a = c.admission();
        assert!(a.holds());
        assert!(!c.replace_shared("one".into()), "the same token again");
        assert!(a.holds());
        assert!(c.replace_shared("two".into()));
        assert!(!a.holds());
        assert!(c.admission().holds(), "a stream admitted under the new one");
    }

    #[test]
    fn two_names_on_one_credential_are_one_holder() {
        use Credential::*;
        let cert = |h: &str| Certificate(h.to_string());
        assert!(Credential::independent(("a", &Open), ("b", &Open)));
        assert!(!Credential::independent(("a", &Open), ("a", &Open)));
        assert!(!Credential::independent(
            ("a", &JoinToken),
            ("b", &JoinToken)
        ));
        assert!(Credential::independent(
            ("a", &JoinToken),
            ("b", &cert("01"))
        ));
        assert!(!Credential::independent(
            ("a", &cert("01")),
            ("b", &cert("01"))
        ));
        assert!(Credential::independent(
            ("a", &cert("01")),
            ("b", &cert("02"))
        ));
        assert!(Credential::independent(
            ("a", &NamedToken("a".into())),
            ("b", &NamedToken("b".into()))
        ));
    }

    /// The named tokens read again: a name whose token went or changed is taken back, and a
    /// registration admitted before that is refused by the gate; others are not.
    #[test]
    fn a_token_taken_back_refuses_what_it_admitted_before() {
        let t = |n: &str, tok: &str| (n.to_string(), tok.to_string());
        let c = std::sync::Arc::new(
            Credentials::new(
                None,
                vec![
                    t("one", "one-0123456789abcdef"),
                    t("two", "two-0123456789abcdef"),
                ],
            )
            .unwrap(),
        );
        let gate = Gate {
            revoked: None,
            agents: Some(c.clone()),
        };
        let (admitted, before) = c.admit_at("one-0123456789abcdef").unwrap();
        assert_eq!(admitted, Admitted::Named("one".into()));
        let gone = c.replace_named(vec![
            t("one", "one-fedcba9876543210"),
            t("two", "two-0123456789abcdef"),
        ]);
        assert_eq!(gone, vec!["one".to_string()]);
        assert_eq!(c.admit("one-0123456789abcdef"), None, "the old token");
        let one = Credential::NamedToken("one".into());
        let two = Credential::NamedToken("two".into());
        assert_eq!(gate.refusal(&one, before), Some(TAKEN_BACK));
        assert_eq!(gate.refusal(&two, before), None, "two's token is the same");
        let (_, now) = c.admit_at("one-fedcba9876543210").unwrap();
        assert_eq!(gate.refusal(&one, now), None, "the new token");
        assert!(c.replace_named(vec![t("two", "two-0123456789abcdef")]) == ["one"]);
        assert!(!c.names("one") && c.names("two"));
        assert_eq!(gate.refusal(&Credential::JoinToken, 0), None);
        // A listed name is its token's: not a join token's, a certificate's or another's.
        assert_eq!(gate.name_refusal("two", &two, ""), None);
        let cert = Credential::Certificate("ab".into());
        for other in [
            Credential::JoinToken,
            cert.clone(),
            Credential::Open,
            one.clone(),
        ] {
            assert_eq!(gate.name_refusal("two", &other, ""), Some(NAME_RESERVED));
        }
        // A certificate with two's own token beside it is two; with another's, not.
        let digest = |t: &str| crate::credentials::TokenDigest::of(t).0;
        assert_eq!(
            gate.name_refusal("two", &cert, &digest("two-0123456789abcdef")),
            None
        );
        assert_eq!(
            gate.name_refusal("two", &cert, &digest("one-fedcba9876543210")),
            Some(NAME_RESERVED)
        );
        assert_eq!(gate.name_refusal("three", &Credential::JoinToken, ""), None);
        // Read again: every line taken out is no agent; an empty file is one being written.
        assert_eq!(Credentials::parse_named_again("# all gone\n"), Ok(vec![]));
        assert!(Credentials::parse_named_again("").is_err());
        assert_eq!(c.replace_named(vec![]), vec!["two".to_string()]);
        assert_eq!(c.admit("two-0123456789abcdef"), None);
    }

    #[test]
    fn a_join_token_replaced_refuses_what_the_old_one_admitted() {
        let c = Credentials::new(Some("join-0123456789abcdef".into()), vec![]).unwrap();
        let gate = Gate {
            revoked: None,
            agents: Some(std::sync::Arc::new(c)),
        };
        let c = gate.agents.as_ref().unwrap();
        let (a, before) = c.admit_at("join-0123456789abcdef").unwrap();
        assert_eq!(a, Admitted::Any);
        assert!(
            !c.replace_shared("join-0123456789abcdef".into()),
            "the same"
        );
        assert!(c.replace_shared("join-fedcba9876543210".into()));
        assert_eq!(c.admit("join-0123456789abcdef"), None);
        assert_eq!(
            gate.refusal(&Credential::JoinToken, before),
            Some(JOIN_REPLACED)
        );
        let (_, now) = c.admit_at("join-fedcba9876543210").unwrap();
        assert_eq!(gate.refusal(&Credential::JoinToken, now), None);
    }

    #[test]
    fn a_named_token_admits_its_name_only_and_bad_files_are_refused() {
        let named =
            Credentials::parse_named("# agents\none  0123456789abcdef0\n\ntwo 0123456789abcdef1\n")
                .unwrap();
        let c = Credentials::new(Some("shared-secret".into()), named).unwrap();
        assert_eq!(c.admit("shared-secret"), Some(Admitted::Any));
        assert_eq!(
            c.admit("0123456789abcdef1"),
            Some(Admitted::Named("two".into()))
        );
        assert_eq!(c.admit("0123456789abcdef"), None);
        assert_eq!(c.admit(""), None);
        assert!(Credentials::new(None, vec![]).is_none());
        for (text, why) in [
            ("one\n", "expected `NAME TOKEN`"),
            ("one a b c\n", "expected `NAME TOKEN`"),
            ("on/e 0123456789abcdef0\n", "an agent name"),
            ("one short\n", "at least 16"),
            ("one 0123456789abcdef0\none 0123456789abcdef1\n", "twice"),
            ("one 0123456789abcdef0\ntwo 0123456789abcdef0\n", "twice"),
            ("# nothing\n", "no agent"),
        ] {
            let e = Credentials::parse_named(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
