//! Store paths, parsed: `<store dir>/<32 characters of Nix's base-32>-<name>`, as Nix accepts them.
//!
//! What an agent, a client or a cache says is a store path becomes a [`StorePath`] once, at
//! the edge; past it, code holds one that Nix would accept, and an output whose path is not
//! known before it is built says so ([`OutputPath::Floating`]) instead of being empty.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use crate::hash::NIX32;

/// Longest store path taken, in bytes (Nix's own bound on a name is 211 bytes).
pub const MAX_LEN: usize = 512;
/// Longest name (the part after the hash), in bytes, as Nix bounds it.
pub const MAX_NAME: usize = 211;
const HASH_LEN: usize = 32;

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("a store path is at most {MAX_LEN} bytes; this one is {0}")]
    TooLong(usize),
    #[error("a store path's directory must be absolute and plain (no '.', '..' or empty parts)")]
    Dir,
    #[error("a store path's base must be 32 characters of Nix's base-32, '-' and a name")]
    Hash,
    #[error(
        "a store path's name must be 1 to {MAX_NAME} bytes of letters, digits and '+-._?=', and not '.' or '..'"
    )]
    Name,
    #[error("a derivation's path must end in '.drv'")]
    NotDrv,
}

/// A store path Nix would accept: a plain absolute store directory, then a base of 32
/// characters of Nix's base-32, `-` and a name of Nix's characters. It derefs to the path
/// as text, and maps keyed by it are looked up with a `&str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StorePath(String);

impl StorePath {
    /// Parses `s` as a store path.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        Self::try_from(s.to_string())
    }

    /// Parses `s` as a derivation's path (a store path ending in `.drv`).
    pub fn parse_drv(s: &str) -> Result<Self, StorePathError> {
        let p = Self::parse(s)?;
        if p.is_drv() {
            Ok(p)
        } else {
            Err(StorePathError::NotDrv)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 characters of hash that identify it in a binary cache (`<hash>.narinfo`).
    pub fn hash_part(&self) -> &str {
        &self.base()[..HASH_LEN]
    }

    /// The name after the hash (`hello-2.12`, `hello-2.12.drv`).
    pub fn name(&self) -> &str {
        &self.base()[HASH_LEN + 1..]
    }

    pub fn is_drv(&self) -> bool {
        self.0.ends_with(".drv")
    }

    fn base(&self) -> &str {
        // Parsing proved a '/' before the base.
        self.0.rsplit_once('/').map_or("", |(_, b)| b)
    }
}

impl TryFrom<String> for StorePath {
    type Error = StorePathError;
    fn try_from(s: String) -> Result<Self, StorePathError> {
        if s.len() > MAX_LEN {
            return Err(StorePathError::TooLong(s.len()));
        }
        let (dir, base) = s.rsplit_once('/').ok_or(StorePathError::Dir)?;
        let plain_dir = dir.starts_with('/')
            && dir[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
        if !plain_dir {
            return Err(StorePathError::Dir);
        }
        let b = base.as_bytes();
        if b.len() < HASH_LEN + 2
            || b[HASH_LEN] != b'-'
            || !b[..HASH_LEN].iter().all(|c| NIX32.contains(c))
        {
            return Err(StorePathError::Hash);
        }
        let name = &base[HASH_LEN + 1..];
        let name_ok = name.len() <= MAX_NAME
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c));
        if !name_ok {
            return Err(StorePathError::Name);
        }
        Ok(StorePath(s))
    }
}

impl From<StorePath> for String {
    fn from(p: StorePath) -> String {
        p.0
    }
}

impl Deref for StorePath {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for StorePath {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

/// Hashes as its text does, so a map keyed by store paths is looked up with a `&str`.
impl Borrow<str> for StorePath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl PartialEq<str> for StorePath {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for StorePath {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for StorePath {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

/// Where one output of a derivation goes: a path its derivation fixes, or one known only
/// once it is built (a floating content-addressed output). Written as its path, or as
/// the empty string when floating, as the wire and older state have it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum OutputPath {
    Known(StorePath),
    Floating,
}

impl OutputPath {
    /// Parses an output's path; empty: floating.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        Self::try_from(s.to_string())
    }

    pub fn known(&self) -> Option<&StorePath> {
        match self {
            OutputPath::Known(p) => Some(p),
            OutputPath::Floating => None,
        }
    }

    /// The path as text; empty when floating.
    pub fn as_str(&self) -> &str {
        self.known().map_or("", StorePath::as_str)
    }
}

impl TryFrom<String> for OutputPath {
    type Error = StorePathError;
    fn try_from(s: String) -> Result<Self, StorePathError> {
        if s.is_empty() {
            Ok(OutputPath::Floating)
        } else {
            StorePath::try_from(s).map(OutputPath::Known)
        }
    }
}

impl From<OutputPath> for String {
    fn from(p: OutputPath) -> String {
        match p {
            OutputPath::Known(p) => p.0,
            OutputPath::Floating => String::new(),
        }
    }
}

impl From<StorePath> for OutputPath {
    fn from(p: StorePath) -> Self {
        OutputPath::Known(p)
    }
}

impl fmt::Display for OutputPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for OutputPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputPath::Known(p) => fmt::Debug::fmt(p, f),
            OutputPath::Floating => f.write_str("Floating"),
        }
    }
}

/// Serde for an optional store path written as the empty string when absent (as the wire
/// and older state have it): `#[serde(default, with = "nixfarm_core::store_path::or_empty")]`.
pub mod or_empty {
    use super::StorePath;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<StorePath>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_ref().map_or("", StorePath::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<StorePath>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        StorePath::try_from(s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12";

    /// Stored state: absent is the empty string; what an older version stored unchecked
    /// reads as absent, not as an error that would make the row unreadable.
    #[test]
    fn a_stored_optional_path_reads_leniently() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Row {
            #[serde(default, with = "crate::stored_or_empty")]
            from: Option<StorePath>,
        }
        let some = Row {
            from: Some(StorePath::parse(P).unwrap()),
        };
        let json = serde_json::to_string(&some).unwrap();
        assert_eq!(serde_json::from_str::<Row>(&json).unwrap(), some);
        assert_eq!(
            serde_json::to_string(&Row { from: None }).unwrap(),
            r#"{"from":""}"#
        );
        for stored in ["{}", r#"{"from":""}"#, r#"{"from":"not a path"}"#] {
            assert_eq!(
                serde_json::from_str::<Row>(stored).unwrap(),
                Row { from: None }
            );
        }
    }

    #[test]
    fn takes_what_nix_takes() {
        let p = StorePath::parse(P).unwrap();
        assert_eq!(p.hash_part(), "0123456789abcdfghijklmnpqrsvwxyz");
        assert_eq!(p.name(), "hello-2.12");
        assert!(!p.is_drv());
        let d = StorePath::parse_drv(&format!("{P}.drv")).unwrap();
        assert_eq!(d.name(), "hello-2.12.drv");
        // Another store directory, and every character Nix allows in a name.
        StorePath::parse("/gnu/store/0123456789abcdfghijklmnpqrsvwxyz-a+b-c._?=D9").unwrap();
        // Newer Nix allows a leading dot.
        StorePath::parse("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-.hidden").unwrap();
    }

    #[test]
    fn refuses_what_nix_refuses() {
        let bad = [
            ("", StorePathError::Dir),
            ("hello", StorePathError::Dir),
            (
                "nix/store/0123456789abcdfghijklmnpqrsvwxyz-a",
                StorePathError::Dir,
            ),
            (
                "/nix/../etc/0123456789abcdfghijklmnpqrsvwxyz-a",
                StorePathError::Dir,
            ),
            (
                "/nix//store/0123456789abcdfghijklmnpqrsvwxyz-a",
                StorePathError::Dir,
            ),
            (
                "/nix/./store/0123456789abcdfghijklmnpqrsvwxyz-a",
                StorePathError::Dir,
            ),
            ("/0123456789abcdfghijklmnpqrsvwxyz-a", StorePathError::Dir),
            // 'e', 'o', 'u' and 't' are not in Nix's base-32; upper case neither.
            (
                "/nix/store/e123456789abcdfghijklmnpqrsvwxyz-a",
                StorePathError::Hash,
            ),
            (
                "/nix/store/0123456789ABCDFGHIJKLMNPQRSVWXYZ-a",
                StorePathError::Hash,
            ),
            (
                "/nix/store/0123456789abcdfghijklmnpqrsvwxy-ab",
                StorePathError::Hash,
            ),
            (
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-",
                StorePathError::Hash,
            ),
            (
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz_a",
                StorePathError::Hash,
            ),
            (
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a b",
                StorePathError::Name,
            ),
            (
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a\nb",
                StorePathError::Name,
            ),
            (
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-é",
                StorePathError::Name,
            ),
            (
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-..",
                StorePathError::Name,
            ),
            (
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-.",
                StorePathError::Name,
            ),
        ];
        for (s, e) in bad {
            assert_eq!(StorePath::parse(s), Err(e), "{s:?}");
        }
        let long = format!("{P}-{}", "a".repeat(MAX_NAME));
        assert_eq!(StorePath::parse(&long), Err(StorePathError::Name));
        let deep = format!("/{}{P}", "d/".repeat(300));
        assert_eq!(
            StorePath::parse(&deep),
            Err(StorePathError::TooLong(deep.len()))
        );
        assert_eq!(StorePath::parse_drv(P), Err(StorePathError::NotDrv));
    }

    #[test]
    fn travels_as_text_and_looks_up_by_text() {
        let p = StorePath::parse(P).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{P}\""));
        assert_eq!(
            serde_json::from_str::<StorePath>(&format!("\"{P}\"")).unwrap(),
            p
        );
        assert!(serde_json::from_str::<StorePath>("\"/etc/passwd\"").is_err());
        let mut m = std::collections::HashMap::new();
        m.insert(p.clone(), 1);
        assert_eq!(m.get(P), Some(&1));
        assert_eq!(p, P);
        let floating: OutputPath = serde_json::from_str("\"\"").unwrap();
        assert_eq!(floating, OutputPath::Floating);
        assert_eq!(serde_json::to_string(&floating).unwrap(), "\"\"");
        let known = OutputPath::parse(P).unwrap();
        assert_eq!(known.known(), Some(&p));
        assert_eq!(known.to_string(), P);
    }
}
