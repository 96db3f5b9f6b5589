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
}

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

/// Checks that `input` looks like a flake reference Nix understands (without fetching it),
/// and that it names no attribute (`#…`): the attribute path is given separately.
pub fn validate(input: &str) -> Result<(), FlakeRefError> {
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
    }
}
