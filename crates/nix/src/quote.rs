//! Quoting for Nix: a string literal, a flake fragment.

/// Escapes a string for a Nix double-quoted string literal.
pub fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders an attribute path (`packages.x86_64-linux`) as a flake fragment with each
/// element quoted where needed.
pub fn fragment(attr_path: &str) -> String {
    attr_path
        .split('.')
        .map(|p| {
            if p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && !p.is_empty()
            {
                p.to_string()
            } else {
                nix_string(p)
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}
