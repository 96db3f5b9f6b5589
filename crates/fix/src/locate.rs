//! Which binding in which file a fixed-output hash mismatch belongs to.
//!
//! A candidate is a `name = value;` binding whose value is a hash placeholder
//! (`lib.fakeHash`, `lib.fakeSha256`, `""`) or a hash literal. A mismatch picks the candidate
//! whose value equals what Nix says was specified, preferring the attribute whose kind matches
//! the fixed-output derivation (`npmDepsHash` for `…-npm-deps`, `cargoHash` for `…-vendor`,
//! `vendorHash` for `…-go-modules`) and the one whose own `{ … }` holds string literals that
//! appear in the derivation (its `rev`, `url`, `owner`…).

use crate::lex::{Tok, Token, tokenize};
use nixfarm_nix::StorePath;
use nixfarm_nix::hash::Sri;
use nixfarm_nix::hash::{Algo, Hash};

/// A fixed-output hash mismatch, as the farm reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The fixed-output derivation's store path.
    pub fod_drv: StorePath,
    /// What the derivation says: its name, `rev`, `url`, `owner`, `repo` and the like.
    pub hints: Vec<String>,
    pub specified: Sri,
    pub got: Sri,
}

impl Mismatch {
    /// The derivation's name, from its store path (`/nix/store/<hash>-<name>.drv`).
    pub fn fod_name(&self) -> &str {
        let name = self.fod_drv.name();
        name.strip_suffix(".drv").unwrap_or(name)
    }
}

/// A place in a file where a hash is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The attribute's last name (`hash`, `sha256`, `npmDepsHash`, …).
    pub attribute: String,
    /// 1-based line of the value.
    pub line: usize,
    /// Byte range of the value expression.
    pub start: usize,
    pub end: usize,
    /// The value as written (`lib.fakeHash`, `"sha256-…"`).
    pub text: String,
    /// The value in SRI form.
    pub sri: Sri,
    /// Plain string literals directly inside the same `{ … }` (one list per block, shared by
    /// its candidates: a lock file's block holds thousands of both).
    pub siblings: std::sync::Arc<[String]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Npm,
    Cargo,
    Go,
    Generic,
}

fn fod_kind(name: &str) -> Kind {
    if name.contains("npm-deps") {
        Kind::Npm
    } else if name.ends_with("-go-modules") {
        Kind::Go
    } else if name.ends_with("-vendor") || name.ends_with("-vendor.tar.gz") {
        Kind::Cargo
    } else {
        Kind::Generic
    }
}

fn attr_kind(attr: &str) -> Kind {
    match attr {
        "npmDepsHash" => Kind::Npm,
        "cargoHash" | "cargoSha256" => Kind::Cargo,
        "vendorHash" | "vendorSha256" => Kind::Go,
        _ => Kind::Generic,
    }
}

fn hashy_name(attr: &str) -> bool {
    let lower = attr.to_ascii_lowercase();
    lower == "hash"
        || lower.ends_with("hash")
        || lower.ends_with("sha256")
        || lower.ends_with("sha512")
}

fn zero_sri(algo: Algo) -> Sri {
    Sri::from(&Hash {
        algo,
        digest: vec![0; algo.size()],
    })
}

fn algo_of_attr(attr: &str) -> Algo {
    if attr.to_ascii_lowercase().ends_with("sha512") {
        Algo::Sha512
    } else {
        Algo::Sha256
    }
}

/// The SRI value of a binding's right-hand side, when it is a hash or a hash placeholder.
fn value_sri(attr: &str, tok: &Tok) -> Option<Sri> {
    match tok {
        Tok::Ident(path) => {
            let last = path.rsplit('.').next().unwrap_or(path);
            match last {
                "fakeHash" | "fakeSha256" => Some(zero_sri(Algo::Sha256)),
                "fakeSha512" => Some(zero_sri(Algo::Sha512)),
                _ => None,
            }
        }
        Tok::Str { text: Some(t) } if hashy_name(attr) => {
            if t.is_empty() {
                // Nix reads an empty hash as the all-zero one of the expected type.
                return Some(zero_sri(algo_of_attr(attr)));
            }
            Hash::parse(t, Some(algo_of_attr(attr))).map(|h| Sri::from(&h))
        }
        _ => None,
    }
}

/// Every hash binding in a file.
pub fn candidates(src: &str) -> Vec<Candidate> {
    let toks = tokenize(src);
    // Innermost `{` (token index) enclosing each token, computed with a stack.
    let mut enclosing: Vec<Option<usize>> = Vec::with_capacity(toks.len());
    let mut stack: Vec<usize> = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if t.tok == Tok::Punct(b'}') {
            stack.pop();
        }
        enclosing.push(stack.last().copied());
        if t.tok == Tok::Punct(b'{') {
            stack.push(i);
        }
    }
    // Each block's literals, gathered in one pass: looked up per candidate, a file of
    // thousands of hashes (a node2nix or yarn lock) cost the square of its size.
    let mut literals: std::collections::HashMap<Option<usize>, Vec<String>> =
        std::collections::HashMap::new();
    for (i, t) in toks.iter().enumerate() {
        if let Tok::Str { text: Some(s) } = &t.tok
            && !s.is_empty()
        {
            literals.entry(enclosing[i]).or_default().push(s.clone());
        }
    }
    let literals: std::collections::HashMap<Option<usize>, std::sync::Arc<[String]>> =
        literals.into_iter().map(|(b, l)| (b, l.into())).collect();
    let none: std::sync::Arc<[String]> = Vec::new().into();
    // Lines counted as the candidates come, in order.
    let (mut counted_to, mut line) = (0usize, 1usize);
    let mut out = Vec::new();
    for i in 0..toks.len().saturating_sub(3) {
        let (
            Token {
                tok: Tok::Ident(name),
                ..
            },
            eq,
            val,
            semi,
        ) = (&toks[i], &toks[i + 1], &toks[i + 2], &toks[i + 3])
        else {
            continue;
        };
        if eq.tok != Tok::Punct(b'=') || semi.tok != Tok::Punct(b';') {
            continue;
        }
        // `inherit x;` and `a.b = …` both end in the last name.
        let attr = name.rsplit('.').next().unwrap_or(name).to_string();
        let Some(sri) = value_sri(&attr, &val.tok) else {
            continue;
        };
        line += src[counted_to..val.start]
            .bytes()
            .filter(|&c| c == b'\n')
            .count();
        counted_to = val.start;
        out.push(Candidate {
            attribute: attr,
            line,
            start: val.start,
            end: val.end,
            text: src[val.start..val.end].to_string(),
            sri,
            siblings: literals.get(&enclosing[i]).unwrap_or(&none).clone(),
        });
    }
    out
}

/// How well a candidate fits a mismatch; None when it cannot be the one.
fn score(c: &Candidate, m: &Mismatch) -> Option<u32> {
    if m.specified != c.sri {
        return None;
    }
    let fk = fod_kind(m.fod_name());
    let ak = attr_kind(&c.attribute);
    let mut s = match (ak, fk) {
        (Kind::Generic, Kind::Generic) => 2,
        (Kind::Generic, _) => 0,
        (a, f) if a == f => 20,
        _ => return None,
    };
    // Literals of six characters or more beside the hash that the derivation also carries
    // (shorter ones such as "main" or "1.0" match too much by accident).
    let matched = c
        .siblings
        .iter()
        .filter(|lit| lit.len() >= 6 && lit.as_str() != c.text.trim_matches('"'))
        .filter(|lit| m.hints.iter().any(|h| h.contains(lit.as_str())))
        .count();
    s += 8 * matched as u32;
    Some(s)
}

/// Outcome of looking for one mismatch in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    One(Candidate, u32),
    Ambiguous(Vec<usize>),
    None,
}

/// The best candidate in `src` for a mismatch. `min_score` lets a caller demand corroboration
/// (a literal shared with the derivation) when searching files other than the package's own.
pub fn find(src: &str, m: &Mismatch, min_score: u32) -> Found {
    find_among(&candidates(src), m, min_score)
}

/// [`find`] among a file's candidates read already.
pub fn find_among(cands: &[Candidate], m: &Mismatch, min_score: u32) -> Found {
    let mut scored: Vec<(u32, &Candidate)> = cands
        .iter()
        .filter_map(|c| score(c, m).map(|s| (s, c)))
        .filter(|(s, _)| *s >= min_score)
        .collect();
    scored.sort_by_key(|s| std::cmp::Reverse(s.0));
    match scored.as_slice() {
        [] => Found::None,
        [(s, c)] => Found::One((*c).clone(), *s),
        [(s0, c0), (s1, _), ..] if s0 > s1 => Found::One((*c0).clone(), *s0),
        _ => {
            let top = scored[0].0;
            Found::Ambiguous(
                scored
                    .iter()
                    .filter(|(s, _)| *s == top)
                    .map(|(_, c)| c.line)
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock-file-like block of thousands of hashes and literals: each candidate gets its
    /// line and the block's literals (one list, shared), in time that grows with the file.
    #[test]
    fn a_file_of_thousands_of_hashes_is_read_in_linear_time() {
        let mut src = String::from("{ lib }:\n{\n");
        for i in 0..6000 {
            src.push_str(&format!(
                "  \"dep-{i}\" = {{ url = \"https://registry.example/dep-{i}.tgz\"; }};\n  h{i} = lib.fakeHash;\n"
            ));
        }
        src.push_str("}\n");
        let started = std::time::Instant::now();
        let c = candidates(&src);
        assert_eq!(c.len(), 6000);
        assert_eq!(c[0].line, 4);
        assert_eq!(c[5999].line, 4 + 2 * 5999);
        assert!(std::sync::Arc::ptr_eq(&c[0].siblings, &c[5999].siblings));
        assert_eq!(c[0].siblings.len(), 6000);
        // Quadratic, this took tens of seconds; linear, well under one.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    const FAKE: &str = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn m(name: &str, hints: &[&str]) -> Mismatch {
        Mismatch {
            fod_drv: StorePath::parse_drv(&format!("/nix/store/{}-{name}.drv", "a".repeat(32)))
                .unwrap(),
            hints: hints.iter().map(|s| s.to_string()).collect(),
            specified: Sri::parse(FAKE).unwrap(),
            got: Sri::parse("sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=").unwrap(),
        }
    }

    const TWO_STAGE: &str = r#"{ lib, mkPackage, fetchSrc }:
mkPackage {
  pname = "statusphere";
  src = fetchSrc {
    owner = "bluesky-social";
    rev = "bc8bdbbd5d7fe8832c234f6e354cf18d86bdb624";
    hash = lib.fakeHash; # filled in by nixfarm
  };
  # npmDepsHash = "sha256-old";
  npmDepsHash = lib.fakeHash;
}
"#;

    #[test]
    fn placeholders_and_literals_are_candidates_comments_are_not() {
        let c = candidates(TWO_STAGE);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].attribute.as_str(), c[0].line), ("hash", 7));
        assert_eq!(c[0].sri, FAKE);
        assert_eq!(&TWO_STAGE[c[0].start..c[0].end], "lib.fakeHash");
        assert_eq!((c[1].attribute.as_str(), c[1].line), ("npmDepsHash", 10));
        let lit = candidates(
            "{ sha256 = \"0000000000000000000000000000000000000000000000000000\"; hash = \"\"; x = \"\"; }",
        );
        assert_eq!(lit.len(), 2);
        assert!(lit.iter().all(|c| c.sri == FAKE));
    }

    #[test]
    fn the_kind_of_the_derivation_picks_the_attribute() {
        let src = m("source", &["bc8bdbbd5d7fe8832c234f6e354cf18d86bdb624"]);
        let Found::One(c, _) = find(TWO_STAGE, &src, 0) else {
            panic!("not found")
        };
        assert_eq!(c.attribute, "hash");
        let deps = m("statusphere-0.1-npm-deps", &["/nix/store/x-source"]);
        let Found::One(c, _) = find(TWO_STAGE, &deps, 0) else {
            panic!("not found")
        };
        assert_eq!(c.attribute, "npmDepsHash");
    }

    #[test]
    fn the_rev_beside_the_hash_tells_two_fetches_apart() {
        let src = r#"let
  tests = fetchSrc { owner = "bluesky-social"; rev = "5a4b367f880c4b7ca06eb62c481e13430462311e"; hash = lib.fakeHash; };
in mkPackage {
  src = fetchSrc { owner = "blacksky-algorithms"; rev = "0c8a359151a4528d54011a776d3783fe91c6d6f0"; hash = lib.fakeHash; };
}"#;
        let a = m(
            "source",
            &["bluesky-social", "5a4b367f880c4b7ca06eb62c481e13430462311e"],
        );
        let b = m(
            "source",
            &[
                "blacksky-algorithms",
                "0c8a359151a4528d54011a776d3783fe91c6d6f0",
            ],
        );
        assert!(matches!(find(src, &a, 0), Found::One(c, _) if c.line == 2));
        assert!(matches!(find(src, &b, 0), Found::One(c, _) if c.line == 4));
        // Nothing to tell them apart: ambiguous, never a guess.
        assert_eq!(
            find(src, &m("source", &[]), 0),
            Found::Ambiguous(vec![2, 4])
        );
        // Outside the package's own file, corroboration is required.
        assert_eq!(find(src, &m("source", &[]), 8), Found::None);
    }

    #[test]
    fn stale_literals_match_in_any_spelling() {
        let sri = "sha256-8VwXVpr7UlKRP+DkmzPjuTY2eUgu8XagmJsPbAvgDmI=";
        let h = Hash::parse(sri, None).unwrap();
        let hex: String = h.digest.iter().map(|b| format!("{b:02x}")).collect();
        for text in [
            sri.to_string(),
            h.to_nix32_prefixed(),
            h.to_nix32_prefixed()[7..].to_string(),
            hex,
        ] {
            let src = format!("{{ sha256 = \"{text}\"; }}");
            let mut mm = m("source", &[]);
            mm.specified = Sri::parse(sri).unwrap();
            assert!(
                matches!(find(&src, &mm, 0), Found::One(..)),
                "{text} not matched"
            );
        }
    }

    #[test]
    fn fod_names_come_from_store_paths() {
        assert_eq!(
            m("goat-0.1-go-modules", &[]).fod_name(),
            "goat-0.1-go-modules"
        );
        assert_eq!(fod_kind("goat-0.1-go-modules"), Kind::Go);
        assert_eq!(fod_kind("atrium-0.25.3-vendor"), Kind::Cargo);
        assert_eq!(fod_kind("source"), Kind::Generic);
    }
}
