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

/// Parses `text` as `T`, the error (if any) without the text: its line, and the key there
/// when the error is in a value (a key names no secret; its value may).
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let at = e.span().map_or(String::new(), |s| {
            let start = s.start.min(text.len());
            let before = &text[..floor_char_boundary(text, start)];
            let line_no = before.matches('\n').count() + 1;
            let rest = &text[before.len()..];
            let line_end = rest.find('\n').unwrap_or(rest.len());
            match key_at(before, &rest[..line_end]) {
                Some(key) => format!("line {line_no}: {key}: "),
                None => format!("line {line_no}: "),
            }
        });
        TomlError {
            at,
            message: plain_types(e.message()),
        }
    })
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The key whose value starts where `before` ends and goes on with `after` (`key = ` on
/// that line), with the table it is in (`[section] key`); None when the error is not in a value. Only a name shaped like
/// nixfarm's keys (lower case, `_`, a value after `=`): a secret pasted on a line of its own
/// (base64 ends in `=`) is no key, and is not repeated.
fn key_at(before: &str, after: &str) -> Option<String> {
    let (earlier, line) = before.rsplit_once('\n').unwrap_or(("", before));
    // The error's line is `line` then `after`, up to its end.
    let (key, value) = line.split_once('=')?;
    if value.trim().is_empty() && after.trim().is_empty() {
        return None;
    }
    let key = key.trim();
    let plain = |k: &str| {
        k.starts_with(|c: char| c.is_ascii_lowercase())
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.'))
    };
    if !plain(key) {
        return None;
    }
    let table = earlier.lines().rev().find_map(|l| {
        let l = l.trim();
        let name = l.strip_prefix('[')?.trim_start_matches('[');
        let name = name.split(']').next()?.trim();
        plain(name).then(|| name.to_string())
    });
    Some(match table {
        Some(t) => format!("[{t}] {key}"),
        None => key.to_string(),
    })
}

/// The parser's message with Rust's type names said as a config's reader knows them, and
/// without a string it quotes (a token where a number was meant).
fn plain_types(message: &str) -> String {
    let mut m = message.to_string();
    if let (Some(at), Some(end)) = (m.find("invalid type: string \""), m.rfind("\", expected")) {
        let from = at + "invalid type: ".len();
        if end >= from {
            m.replace_range(from..end + 1, "a string");
        }
    }
    for (rust, plain) in [
        (" as i128", ""),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected u16", "expected a whole number, 0 or more"),
        ("expected u8", "expected a whole number, 0 or more"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        m = m.replace(rust, plain);
    }
    m
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

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sched {
        scheduler: Option<Inner>,
        top: Option<u64>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        eval_chunk_size: usize,
    }

    /// A value of the wrong type or range names its key and table, in words a config's
    /// reader knows.
    #[test]
    fn a_wrong_value_names_its_key() {
        for (text, want) in [
            (
                "# c\n[scheduler]\neval_chunk_size = \"16\"\n",
                "line 3: [scheduler] eval_chunk_size: invalid type: a string, expected a whole number, 0 or more",
            ),
            (
                "[scheduler]\neval_chunk_size = -1\n",
                "line 2: [scheduler] eval_chunk_size: invalid value: integer `-1`, expected a whole number, 0 or more",
            ),
            (
                "top = true\n",
                "line 1: top: invalid type: boolean `true`, expected a whole number, 0 or more",
            ),
        ] {
            let got = super::parse::<Sched>(text).unwrap_err().to_string();
            assert_eq!(got, want, "{text}");
        }
        // A token pasted on a line of its own (`openssl rand -base64 32 >> config`), or put
        // where a number was meant: neither is repeated, not even as a key.
        for (text, secret) in [
            (
                "top = 1\nq3ZabcDEFghiJKLmnoPQRstuVWXyz0123456789abcX=\n",
                "q3ZabcDEF",
            ),
            (
                "top = 1\nq3zabcdefghijklmnopqrstuvwxyz0123456789abcx=\n",
                "q3zabcdef",
            ),
            ("top = \"s3cret-value\"\n", "s3cret"),
        ] {
            let got = super::parse::<Sched>(text).unwrap_err().to_string();
            assert!(!got.contains(secret), "{got}");
            assert!(got.starts_with("line "), "{got}");
        }
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
