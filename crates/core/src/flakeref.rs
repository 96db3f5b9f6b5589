//! Syntactic checks of flake references, so a malformed one is refused before a run starts.

/// Why a string is not a flake reference nixfarm accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlakeRefError {
    #[error(
        "'{0}' is not a flake reference: expected TYPE:… (github:OWNER/REPO, git+https://…, path:/…, https://….tar.gz, …)"
    )]
    NoScheme(String),
    #[error("'{input}' is not a flake reference: unknown type '{scheme}'")]
    UnknownScheme { input: String, scheme: String },
    #[error("'{0}' is not a flake reference: {1}")]
    Invalid(String, &'static str),
    #[error(
        "'{input}' is refused: {scheme}: references read the agent's own disk or registry. Use a remote reference (github:, gitlab:, sourcehut:, git+https://, https://….tar.gz), or point nixfarm at a local checkout (it is uploaded); a single-user farm may allow local references with allow_local_flake_refs = true on the coordinator and its agents"
    )]
    Local { input: String, scheme: String },
    #[error(
        "'{input}' is refused: {scheme}: fetches without TLS, so anyone on the path can change what is built; use the https form"
    )]
    Insecure { input: String, scheme: String },
}

/// Longest flake reference accepted, in bytes.
pub const MAX_LEN: usize = 2048;

/// Schemes that fetch from the network over an authenticated transport.
const REMOTE: &[&str] = &[
    "github",
    "gitlab",
    "sourcehut",
    "git+https",
    "hg+https",
    "https",
    "tarball+https",
];

/// Schemes that fetch over the network without TLS.
const PLAIN: &[&str] = &["git+http", "hg+http", "http", "tarball+http", "git"];

const SCHEMES: &[&str] = &[
    "github",
    "gitlab",
    "sourcehut",
    "git+https",
    "git+http",
    "git+ssh",
    "git+file",
    "git",
    "hg+https",
    "hg+http",
    "hg+file",
    "https",
    "http",
    "file",
    "tarball+https",
    "tarball+http",
    "tarball+file",
    "path",
    "flake",
];

/// Checks that `input` is a flake reference a farm may hand to agents: well formed, and
/// remote (nothing on the agent's own disk) unless `allow_local`.
pub fn validate_for_farm(input: &str, allow_local: bool) -> Result<(), FlakeRefError> {
    validate(input)?;
    if allow_local {
        return Ok(());
    }
    let scheme = input.trim().split_once(':').map_or("", |(s, _)| s);
    scheme_for_farm(input, scheme)
}

/// Whether a reference of `scheme` (`input`, as the error names it) fetches from the
/// network over TLS, which is all a farm's agents fetch.
fn scheme_for_farm(input: &str, scheme: &str) -> Result<(), FlakeRefError> {
    if REMOTE.contains(&scheme) {
        Ok(())
    } else if PLAIN.contains(&scheme) {
        Err(FlakeRefError::Insecure {
            input: input.into(),
            scheme: scheme.into(),
        })
    } else {
        // path:, git+file:, file:, tarball+file:, hg+file:, flake: (registry), git+ssh (the
        // agent's own keys).
        Err(FlakeRefError::Local {
            input: input.into(),
            scheme: scheme.into(),
        })
    }
}

/// Longest `flake.lock` read, in bytes.
pub const MAX_LOCK_BYTES: u64 = 8 << 20;

/// Checks a flake's `flake.lock` (its text `lock`) as [`validate_for_farm`] checks the run's
/// own reference: every input it locks is fetched by the agents as it says, so each must be
/// remote (nothing on the agent's own disk: a `path:` input naming the agent's credentials
/// would be copied into its store and readable to the evaluation) unless `allow_local`.
/// Root inputs the run overrides (`overridden`) are fetched as their overrides say, which
/// are checked apart; the nodes they lock in turn are checked all the same (Nix locks the
/// overriding flake's inputs with them). A node that is not locked is refused: Nix would
/// lock it, fetching it first.
pub fn check_lock(
    lock: &str,
    overridden: &[String],
    allow_local: bool,
) -> Result<(), FlakeRefError> {
    if allow_local {
        return Ok(());
    }
    let bad = |why| FlakeRefError::Invalid("flake.lock".into(), why);
    let v: serde_json::Value =
        serde_json::from_str(lock).map_err(|_| bad("it is not JSON as Nix writes a lock file"))?;
    let nodes = v
        .get("nodes")
        .and_then(|n| n.as_object())
        .ok_or_else(|| bad("it has no nodes"))?;
    let root = v.get("root").and_then(|r| r.as_str()).unwrap_or("root");
    // Every node the flake reaches from its root, but through the root inputs the run
    // overrides (another node may still reach one of those: then it is checked).
    let inputs_of = |key: &str| -> Vec<(String, String)> {
        nodes
            .get(key)
            .and_then(|n| n.get("inputs"))
            .and_then(|i| i.as_object())
            .map(|i| {
                i.iter()
                    // A `follows` (a list) names a node reached some other way.
                    .filter_map(|(name, to)| Some((name.clone(), to.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut seen: Vec<String> = Vec::new();
    // An overridden input's own node is fetched as the override says; what its node locks
    // below it is still what Nix takes for the overriding flake's inputs of those names.
    let mut stack: Vec<String> = inputs_of(root)
        .into_iter()
        .flat_map(|(name, to)| {
            if overridden.contains(&name) {
                inputs_of(&to).into_iter().map(|(_, below)| below).collect()
            } else {
                vec![to]
            }
        })
        .collect();
    while let Some(key) = stack.pop() {
        if seen.contains(&key) || seen.len() > 100_000 {
            continue;
        }
        let shown = format!("flake.lock's input '{}'", crate::limits::clip(&key, 80));
        let Some(node) = nodes.get(&key) else {
            return Err(FlakeRefError::Invalid(
                shown,
                "it names a node the lock does not have",
            ));
        };
        let Some(locked) = node.get("locked").and_then(|l| l.as_object()) else {
            return Err(FlakeRefError::Invalid(shown, "it is not locked"));
        };
        // Nix 2.8 lays a node's `info` over its `locked`: what is fetched is both.
        let mut fetched = locked.clone();
        if let Some(info) = node.get("info").and_then(|i| i.as_object()) {
            fetched.extend(info.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        scheme_for_farm(&shown, &locked_scheme(&serde_json::Value::Object(fetched)))?;
        stack.extend(inputs_of(&key).into_iter().map(|(_, to)| to));
        seen.push(key);
    }
    Ok(())
}

/// Checks an input as `flake.nix` declares it (`spec`: its attributes, as JSON), and the
/// inputs it declares for its own inputs in turn, as [`validate_for_farm`] checks a
/// reference: Nix fetches it whenever the lock file does not lock it as declared.
pub fn check_declared(name: &str, spec: &serde_json::Value) -> Result<(), FlakeRefError> {
    let shown = format!("flake.nix's input '{}'", crate::limits::clip(name, 80));
    // A registry name (`nixpkgs`, `nixpkgs/nixos-24.05`, `flake:…`) resolves through the
    // agent's registry, as an input `outputs` takes by name does: what the lock file locks
    // it to is checked there (and it must be locked).
    let indirect = |url: &str| {
        url.starts_with("flake:")
            || url.split('/').next().is_some_and(|head| {
                !head.is_empty()
                    && head
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
    };
    if let Some(url) = spec
        .get("url")
        .and_then(|u| u.as_str())
        .filter(|u| !indirect(u))
    {
        validate_for_farm(url, false).map_err(|e| match e {
            FlakeRefError::Local { scheme, .. } => FlakeRefError::Local {
                input: shown.clone(),
                scheme,
            },
            FlakeRefError::Insecure { scheme, .. } => FlakeRefError::Insecure {
                input: shown.clone(),
                scheme,
            },
            e => e,
        })?;
    } else if spec.get("type").is_some() {
        scheme_for_farm(&shown, &locked_scheme(spec))?;
    }
    if let Some(nested) = spec.get("inputs").and_then(|i| i.as_object()) {
        for (n, s) in nested {
            check_declared(&format!("{name}/{n}"), s)?;
        }
    }
    Ok(())
}

/// [`check_declared`] for an input the run overrides: its own reference is the override's
/// (checked apart), but what `flake.nix` declares for its inputs still applies to the
/// overriding flake's, and Nix fetches those as declared.
pub fn check_declared_below(name: &str, spec: &serde_json::Value) -> Result<(), FlakeRefError> {
    if let Some(nested) = spec.get("inputs").and_then(|i| i.as_object()) {
        for (n, s) in nested {
            check_declared(&format!("{name}/{n}"), s)?;
        }
    }
    Ok(())
}

/// The names of the inputs a lock file locks for its flake itself (its root node's).
pub fn locked_root_inputs(lock: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(lock) else {
        return Vec::new();
    };
    let root = v.get("root").and_then(|r| r.as_str()).unwrap_or("root");
    v.get("nodes")
        .and_then(|n| n.get(root))
        .and_then(|r| r.get("inputs"))
        .and_then(|i| i.as_object())
        .map(|i| i.keys().cloned().collect())
        .unwrap_or_default()
}

/// The flake reference scheme a lock file's `locked` attributes stand for (`github`,
/// `git+https`, `path`, …; a URL without a scheme is a file's).
fn locked_scheme(locked: &serde_json::Value) -> String {
    let field = |k: &str| locked.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let url = field("url");
    let url_scheme = match url.split_once("://") {
        Some((s, _)) => s.to_ascii_lowercase(),
        None if url.starts_with('/') => "file".into(),
        // `git@host:owner/repo`: ssh, with the agent's own keys.
        None => "ssh".into(),
    };
    match field("type") {
        t @ ("github" | "gitlab" | "sourcehut") => t.into(),
        "git" => format!("git+{url_scheme}"),
        "hg" | "mercurial" => format!("hg+{url_scheme}"),
        "tarball" | "file" => url_scheme,
        "indirect" => "flake".into(),
        other => other.to_ascii_lowercase(),
    }
}

/// Checks that `input` looks like a flake reference Nix understands (without fetching it),
/// and that it names no attribute (`#…`): the attribute path is given separately.
pub fn validate(input: &str) -> Result<(), FlakeRefError> {
    if input.len() > MAX_LEN {
        return Err(FlakeRefError::Invalid(
            format!("{}…", crate::limits::clip(input, 60)),
            "it is longer than 2048 bytes",
        ));
    }
    let s = input.trim();
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FlakeRefError::Invalid(
            input.into(),
            "it is empty or contains white space",
        ));
    }
    if s.contains('#') {
        return Err(FlakeRefError::Invalid(
            input.into(),
            "remove the '#…' fragment and pass the attribute path with --attr-path",
        ));
    }
    let Some((scheme, rest)) = s.split_once(':') else {
        return Err(FlakeRefError::NoScheme(input.into()));
    };
    if !SCHEMES.contains(&scheme) {
        return Err(FlakeRefError::UnknownScheme {
            input: input.into(),
            scheme: scheme.into(),
        });
    }
    let body = rest.split('?').next().unwrap_or_default();
    match scheme {
        "github" | "gitlab" | "sourcehut" => {
            let parts: Vec<&str> = body.split('/').collect();
            if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
                return Err(FlakeRefError::Invalid(
                    input.into(),
                    "expected OWNER/REPO[/REF]",
                ));
            }
        }
        "path" => {
            if !body.starts_with('/') {
                return Err(FlakeRefError::Invalid(
                    input.into(),
                    "a path: reference needs an absolute path",
                ));
            }
        }
        "flake" => {
            if body.is_empty() {
                return Err(FlakeRefError::Invalid(input.into(), "expected flake:NAME"));
            }
        }
        _ => {
            if !body.starts_with("//") || body.len() <= 2 {
                return Err(FlakeRefError::Invalid(
                    input.into(),
                    "expected a URL (TYPE://HOST/…)",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock file as Nix 2.8 writes one, with `input` locked as `locked`.
    fn lock_with(locked: &str) -> String {
        format!(
            r#"{{"nodes": {{"k": {{"flake": false, "locked": {locked}, "original": {{}}}},
               "nixpkgs": {{"locked": {{"type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": "abc", "narHash": "sha256-x"}}}},
               "root": {{"inputs": {{"k": "k", "nixpkgs": "nixpkgs"}}}}}}, "root": "root", "version": 7}}"#
        )
    }

    #[test]
    fn a_lock_file_locks_only_remote_inputs() {
        for ok in [
            r#"{"type": "github", "owner": "o", "repo": "r", "rev": "1"}"#,
            r#"{"type": "git", "url": "https://example.org/r.git", "rev": "1"}"#,
            r#"{"type": "tarball", "url": "https://example.org/r.tar.gz", "narHash": "sha256-x"}"#,
        ] {
            assert_eq!(check_lock(&lock_with(ok), &[], false), Ok(()), "{ok}");
        }
        for (bad, scheme) in [
            (
                r#"{"type": "path", "path": "/run/credentials/agent", "narHash": "sha256-x"}"#,
                "path",
            ),
            (
                r#"{"type": "git", "url": "file:///var/lib/agent", "rev": "1"}"#,
                "git+file",
            ),
            (
                r#"{"type": "git", "url": "git@github.com:o/private", "rev": "1"}"#,
                "git+ssh",
            ),
            (
                r#"{"type": "file", "url": "/etc/shadow", "narHash": "sha256-x"}"#,
                "file",
            ),
            (
                r#"{"type": "tarball", "url": "http://example.org/r.tar.gz"}"#,
                "http",
            ),
            (r#"{"type": "indirect", "id": "nixpkgs"}"#, "flake"),
        ] {
            match check_lock(&lock_with(bad), &[], false) {
                Err(
                    FlakeRefError::Local { input, scheme: s }
                    | FlakeRefError::Insecure { input, scheme: s },
                ) => {
                    assert!(input.contains("flake.lock's input 'k'"), "{input}");
                    assert_eq!(s, scheme, "{bad}");
                }
                other => panic!("{bad}: {other:?}"),
            }
            // Overridden by the run (its override is checked apart), or a farm that allows
            // local references: taken.
            assert_eq!(check_lock(&lock_with(bad), &["k".into()], false), Ok(()));
            assert_eq!(check_lock(&lock_with(bad), &[], true), Ok(()));
        }
        assert!(check_lock("not json", &[], false).is_err());
        // As flake.nix declares them: a URL, attributes, or an input of an input.
        let spec = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert!(check_declared("a", &spec(r#"{"url": "github:o/r"}"#)).is_ok());
        assert!(check_declared("a", &spec(r#"{"follows": "b"}"#)).is_ok());
        for registry in ["nixpkgs/nixos-22.05", "nixpkgs", "flake:nixpkgs"] {
            let s = spec(&format!(r#"{{"url": "{registry}"}}"#));
            assert!(check_declared("a", &s).is_ok(), "{registry}");
        }
        for bad in [
            r#"{"url": "path:/run/credentials"}"#,
            r#"{"type": "path", "path": "/x"}"#,
            r#"{"url": "/run/credentials"}"#,
            r#"{"url": "./sub"}"#,
            r#"{"url": "github:o/r", "inputs": {"b": {"url": "git+file:///x"}}}"#,
        ] {
            assert!(check_declared("a", &spec(bad)).is_err(), "{bad}");
        }
        // A node's `info` lies over its `locked` (as Nix 2.8 reads it).
        let info = r#"{"nodes": {"k": {"locked": {"type": "github", "owner": "o", "repo": "r"}, "info": {"type": "path", "path": "/secret", "rev": "0"}}, "root": {"inputs": {"k": "k"}}}, "root": "root", "version": 7}"#;
        assert!(check_lock(info, &[], false).is_err());
        // An overridden root input still reached through another node is checked.
        let nested = r#"{"nodes": {"k": {"locked": {"type": "path", "path": "/secret", "rev": "0"}}, "foo": {"locked": {"type": "github", "owner": "o", "repo": "r"}, "inputs": {"x": "k"}}, "root": {"inputs": {"k": "k", "foo": "foo"}}}, "root": "root", "version": 7}"#;
        assert!(check_lock(nested, &["k".into()], false).is_err());
        // Overridden too, `foo`'s own node is not fetched, but Nix locks the overriding
        // flake's input `x` with what `foo`'s node locks under it: still checked.
        assert!(check_lock(nested, &["k".into(), "foo".into()], false).is_err());
        let below = r#"{"nodes": {"sub": {"locked": {"type": "path", "path": "/secret", "rev": "0"}}, "dep": {"locked": {"type": "path", "path": "/old"}, "inputs": {"sub": "sub"}}, "root": {"inputs": {"dep": "dep"}}}, "root": "root", "version": 7}"#;
        assert!(check_lock(below, &["dep".into()], false).is_err());
        let fine_below = below.replace(
            r#"{"type": "path", "path": "/secret", "rev": "0"}"#,
            r#"{"type": "github", "owner": "o", "repo": "r", "rev": "0"}"#,
        );
        assert!(check_lock(&fine_below, &["dep".into()], false).is_ok());
        // What flake.nix declares below an overridden input still applies, and is checked.
        let declared = spec(r#"{"url": "github:o/r", "inputs": {"sub": {"url": "path:/secret"}}}"#);
        assert!(check_declared_below("dep", &declared).is_err());
        assert!(check_declared_below("dep", &spec(r#"{"url": "path:/overridden"}"#)).is_ok());
        assert_eq!(locked_root_inputs(&lock_with("{}")), ["k", "nixpkgs"]);
        assert!(locked_root_inputs("not json").is_empty());
        let unlocked = r#"{"nodes": {"k": {"original": {"type": "path", "path": "/x"}}, "root": {"inputs": {"k": "k"}}}, "root": "root", "version": 7}"#;
        assert!(check_lock(unlocked, &[], false).is_err());
    }

    #[test]
    fn accepts_common_references() {
        for ok in [
            "github:NixOS/nixpkgs",
            "github:owner/repo/v1.0",
            "git+https://example.org/repo.git?ref=main",
            "path:/srv/flake",
            "https://example.org/x.tar.gz",
            "flake:nixpkgs",
        ] {
            validate(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn refuses_malformed_references() {
        assert!(matches!(
            validate("nonsense"),
            Err(FlakeRefError::NoScheme(_))
        ));
        assert!(matches!(
            validate("gopher:x"),
            Err(FlakeRefError::UnknownScheme { .. })
        ));
        assert!(validate("github:onlyowner").is_err());
        assert!(validate("github:a/b#pkg").is_err());
        assert!(validate("path:relative").is_err());
        assert!(validate("git+https:nohost").is_err());
        assert!(validate("").is_err());
        assert!(validate(&format!("github:o/{}", "r".repeat(5000))).is_err());
    }

    #[test]
    fn a_farm_takes_remote_references_only_unless_told_otherwise() {
        for ok in [
            "github:NixOS/nixpkgs",
            "gitlab:o/r",
            "sourcehut:~o/r",
            "git+https://example.org/repo.git?ref=main",
            "https://example.org/x.tar.gz",
        ] {
            validate_for_farm(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for local in [
            "path:/etc",
            "path:/",
            "git+file:///srv/repo",
            "file:///etc/x.tar.gz",
            "tarball+file:///x.tar.gz",
            "flake:nixpkgs",
            "git+ssh://git@example.org/r",
        ] {
            let e = validate_for_farm(local, false).unwrap_err();
            assert!(matches!(e, FlakeRefError::Local { .. }), "{local}: {e}");
            assert!(e.to_string().contains("agent's own disk"), "{e}");
            validate_for_farm(local, true).unwrap();
        }
        assert!(matches!(
            validate_for_farm("http://example.org/x.tar.gz", false),
            Err(FlakeRefError::Insecure { .. })
        ));
    }
}
