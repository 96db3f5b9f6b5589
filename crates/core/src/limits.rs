//! Bounds on what crosses the wire: every string a client or agent sends has a documented
//! maximum length, checked at the edge, and errors never echo unbounded input.

/// A run's label (the submitted directory or flake reference), in bytes.
pub const MAX_LABEL: usize = 1024;
/// An attribute path (`packages.x86_64-linux`), in bytes.
pub const MAX_ATTR_PATH: usize = 1024;
/// One attribute (package) name, in bytes.
pub const MAX_ATTR: usize = 256;
/// Attribute names one run may select with `--attr`.
pub const MAX_SELECTED_ATTRS: usize = 10_000;
/// Packages (attributes) one run may list.
pub const MAX_PACKAGES: usize = 1_000_000;
/// A run id (`r` and 16 hex digits today), in bytes.
pub const MAX_RUN_ID: usize = 64;
/// A binary cache URL, in bytes.
pub const MAX_CACHE_URL: usize = 2048;
/// Trusted public keys per run, and the length of each, in bytes.
pub const MAX_PUBLIC_KEYS: usize = 32;
pub const MAX_PUBLIC_KEY: usize = 1024;
/// Hash mismatches the CLI's fixer looks for per package and per report: each may cost it a
/// look through every `.nix` file of the checkout.
pub const MAX_MISMATCHES_PER_PACKAGE: usize = 1024;
pub const MAX_MISMATCHES: usize = 20_000;
/// Hints per fixed-output derivation (what it says of itself), and the length of each, in
/// bytes: taken from agents, and from a report.
pub const MAX_HINTS: usize = 64;
pub const MAX_HINT: usize = 1024;
/// Run caches an agent's operator may list (`run_caches`).
pub const MAX_AGENT_RUN_CACHES: usize = 64;
/// An agent's name, in bytes.
pub const MAX_AGENT_NAME: usize = 255;
/// A store path, in bytes (Nix's own bound on a name is 211 bytes).
pub const MAX_STORE_PATH: usize = 512;
/// Free text an agent reports (an error, a build message), in bytes; longer is cut.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A value that is longer than its bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is {len} bytes long; at most {max} are accepted")]
pub struct TooLong {
    pub what: &'static str,
    pub len: usize,
    pub max: usize,
}

/// Refuses `value` when it is longer than `max` bytes (the error names the field, not the value).
pub fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), TooLong> {
    if value.len() > max {
        Err(TooLong {
            what,
            len: value.len(),
            max,
        })
    } else {
        Ok(())
    }
}

/// At most `max` bytes of `s`, cut at a character boundary: for showing hostile input.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` cut to `max` bytes with a marker saying so (agents' free text).
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let keep = clip(&s, max.saturating_sub(16)).len();
        s.truncate(keep);
        s.push_str(" …(truncated)");
    }
    s
}

/// Whether `a` is an attribute name nixfarm takes: 1 to [`MAX_ATTR`] bytes, no control
/// characters (it is shown on terminals and in reports). The coordinator refuses a listing
/// with another; the agent leaves such names out before it sends one.
pub fn is_attr_name(a: &str) -> bool {
    !a.is_empty() && a.len() <= MAX_ATTR && !a.chars().any(char::is_control)
}

/// Most runs one hash-fixing session has (its first and its stages): each package goes
/// through at most 100 stages (`--max-rounds`), and packages due together share one.
pub const MAX_FIX_ROUNDS: usize = 2_000;

/// Whether `s` has the shape of a run id the coordinator hands out (checked before it is
/// looked up or echoed).
pub fn is_run_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_RUN_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_checked_and_text_is_cut_on_character_boundaries() {
        assert!(check_len("the label", "abc", 3).is_ok());
        let e = check_len("the label", "abcd", 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the label is 4 bytes long; at most 3 are accepted"
        );
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(
            truncate("x".repeat(100), 40).len(),
            24 + " …(truncated)".len()
        );
        assert!(is_run_id("r0123456789abcdef"));
        assert!(!is_run_id(&"r".repeat(65)));
        assert!(!is_run_id("r/../x"));
        assert!(!is_run_id(""));
    }
}
