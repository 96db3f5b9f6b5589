//! Reading config files without exposing secrets: a TOML parse error names the line and what
//! is wrong, never the line's text (a line that does not belong there may hold a secret, as
//! `token = "…"` does where `token_file` was meant); a secret file every user can read is
//! named.

/// A config text that does not parse: where, and the parser's message only.
#[derive(Debug, thiserror::Error)]
#[error("{at}{message}")]
pub struct TomlError {
    at: String,
    message: String,
}

/// Parses `text` as `T`, the error (if any) without the text.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let at = e.span().map_or(String::new(), |s| {
            let before = &text.as_bytes()[..s.start.min(text.len())];
            format!(
                "line {}: ",
                before.iter().filter(|b| **b == b'\n').count() + 1
            )
        });
        TomlError {
            at,
            message: e.message().to_string(),
        }
    })
}

/// Why the secret file `path` is exposed, when every user of the host can read it (its
/// mode gives others read access): said as a warning by whoever reads a secret from it.
/// A group-readable file is not flagged (a service's group is how credentials are often
/// handed over).
pub fn world_readable(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "{} is readable by every user of this host (mode {:04o}): keep secrets to 0600 (or 0640 for a service's group)",
            path.display(),
            mode & 0o7777
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_file_others_can_read_is_flagged() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("token");
        std::fs::write(&f, "x").unwrap();
        for (mode, flagged) in [(0o644, true), (0o604, true), (0o640, false), (0o600, false)] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = super::world_readable(&f);
            assert_eq!(got.is_some(), flagged, "{mode:o}: {got:?}");
        }
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(super::world_readable(&f).unwrap().contains("(mode 0644)"));
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Conf {
        token_file: Option<String>,
    }

    /// A secret put where its file was meant is refused by name and line, not repeated.
    #[test]
    fn a_parse_error_names_the_line_and_not_its_text() {
        let e = super::parse::<Conf>("# agent\ntoken = \"s3cret-value\"\n").unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with("line 2: unknown field `token`"),
            "{shown}"
        );
        assert!(!shown.contains("s3cret-value"), "{shown}");
        // As toml itself would show it.
        let raw = toml::from_str::<Conf>("token = \"s3cret-value\"\n").unwrap_err();
        assert!(raw.to_string().contains("s3cret-value"));
    }
}
