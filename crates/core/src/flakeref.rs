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
