//! Just enough of a Nix lexer to find `name = value;` bindings, their enclosing `{ … }` and
//! the string literals beside them, without being fooled by comments or strings.

/// A token with its byte span in the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    /// Identifier or dotted attribute path (`lib.fakeHash`, `src.hash`).
    Ident(String),
    /// A string literal; `text` is its content when it has no interpolation.
    Str {
        text: Option<String>,
    },
    Punct(u8),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub tok: Tok,
    pub start: usize,
    pub end: usize,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'\'' || c == b'-'
}

/// Skips code inside `${ … }` starting after the `${`; returns the index after the closing `}`.
fn skip_interpolation(b: &[u8], mut i: usize) -> usize {
    let mut depth = 1usize;
    while i < b.len() {
        match b[i] {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            b'"' => {
                i = skip_dq_string(b, i + 1).0;
                continue;
            }
            b'\'' if b.get(i + 1) == Some(&b'\'') => {
                i = skip_indented_string(b, i + 2).0;
                continue;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// From just after an opening `"`: returns (index after the closing quote, had interpolation).
fn skip_dq_string(b: &[u8], mut i: usize) -> (usize, bool) {
    let mut interp = false;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return (i + 1, interp),
            b'$' if b.get(i + 1) == Some(&b'{') => {
                interp = true;
                i = skip_interpolation(b, i + 2);
            }
            _ => i += 1,
        }
    }
    (i, interp)
}

/// From just after an opening `''`: returns (index after the closing `''`, had interpolation).
fn skip_indented_string(b: &[u8], mut i: usize) -> (usize, bool) {
    let mut interp = false;
    while i < b.len() {
        if b[i] == b'\'' && b.get(i + 1) == Some(&b'\'') {
            // `'''`, `''$` and `''\` are escapes inside an indented string.
            match b.get(i + 2) {
                Some(b'\'') | Some(b'$') | Some(b'\\') => {
                    i += 3;
                    continue;
                }
                _ => return (i + 2, interp),
            }
        }
        if b[i] == b'$' && b.get(i + 1) == Some(&b'{') {
            interp = true;
            i = skip_interpolation(b, i + 2);
            continue;
        }
        i += 1;
    }
    (i, interp)
}

/// Tokenizes Nix source. Unknown bytes become `Other`; comments and whitespace are dropped.
pub fn tokenize(src: &str) -> Vec<Token> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(b.len());
            continue;
        }
        if c == b'"' {
            let (end, interp) = skip_dq_string(b, i + 1);
            let text = (!interp && end >= start + 2)
                .then(|| unescape(&src[start + 1..end - 1]))
                .flatten();
            out.push(Token {
                tok: Tok::Str { text },
                start,
                end,
            });
            i = end;
            continue;
        }
        if c == b'\'' && b.get(i + 1) == Some(&b'\'') {
            let (end, _) = skip_indented_string(b, i + 2);
            out.push(Token {
                tok: Tok::Str { text: None },
                start,
                end,
            });
            i = end;
            continue;
        }
        if is_ident_start(c) {
            while i < b.len()
                && (is_ident(b[i])
                    || (b[i] == b'.' && b.get(i + 1).is_some_and(|&n| is_ident_start(n))))
            {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(src[start..i].to_string()),
                start,
                end: i,
            });
            continue;
        }
        if matches!(c, b'=' | b';' | b'{' | b'}' | b'(' | b')' | b'[' | b']') {
            // `==` is a comparison, not a binding.
            if c == b'=' && b.get(i + 1) == Some(&b'=') {
                out.push(Token {
                    tok: Tok::Other,
                    start,
                    end: i + 2,
                });
                i += 2;
                continue;
            }
            out.push(Token {
                tok: Tok::Punct(c),
                start,
                end: i + 1,
            });
            i += 1;
            continue;
        }
        // Multi-byte UTF-8 and operators: advance by one character.
        let w = src[i..].chars().next().map_or(1, char::len_utf8);
        out.push(Token {
            tok: Tok::Other,
            start,
            end: i + w,
        });
        i += w;
    }
    out
}

/// The content of a plain string literal, or None when it holds escapes we do not decode.
fn unescape(s: &str) -> Option<String> {
    if s.contains('\\') {
        return None;
    }
    Some(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<Tok> {
        tokenize(src).into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn comments_and_strings_hide_their_contents() {
        let t =
            kinds("# hash = lib.fakeHash;\n/* x = 1; */ a = \"b ${c \"}\"} d\"; e = ''f = g;'';");
        assert_eq!(
            t,
            vec![
                Tok::Ident("a".into()),
                Tok::Punct(b'='),
                Tok::Str { text: None },
                Tok::Punct(b';'),
                Tok::Ident("e".into()),
                Tok::Punct(b'='),
                Tok::Str { text: None },
                Tok::Punct(b';'),
            ]
        );
    }

    #[test]
    fn dotted_paths_and_plain_strings() {
        let t = kinds("hash = lib.fakeHash; x.y = \"sha256-abc\"; z = a == b;");
        assert_eq!(t[2], Tok::Ident("lib.fakeHash".into()));
        assert_eq!(t[4], Tok::Ident("x.y".into()));
        assert_eq!(
            t[6],
            Tok::Str {
                text: Some("sha256-abc".into())
            }
        );
        assert!(t.contains(&Tok::Other));
    }
}
