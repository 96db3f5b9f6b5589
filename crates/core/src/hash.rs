//! Nix hash encodings: base-16, Nix's base-32, base-64 and SRI, and conversion to SRI.

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};

/// Nix's base-32 alphabet (store path hashes are written in it too).
pub(crate) const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Hash algorithms Nix uses for fixed outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::Md5 => "md5",
            Algo::Sha1 => "sha1",
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Algo::Md5 => 16,
            Algo::Sha1 => 20,
            Algo::Sha256 => 32,
            Algo::Sha512 => 64,
        }
    }
    pub fn parse(s: &str) -> Option<Algo> {
        match s {
            "md5" => Some(Algo::Md5),
            "sha1" => Some(Algo::Sha1),
            "sha256" => Some(Algo::Sha256),
            "sha512" => Some(Algo::Sha512),
            _ => None,
        }
    }
    const ALL: [Algo; 4] = [Algo::Md5, Algo::Sha1, Algo::Sha256, Algo::Sha512];
}

/// Length of the Nix base-32 encoding of `n` bytes.
pub fn nix32_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Encodes bytes in Nix's base-32 (bytes read from the end, its own alphabet).
pub fn nix32_encode(bytes: &[u8]) -> String {
    let len = nix32_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = (bytes[i] as u16) >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(NIX32[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes Nix's base-32; `None` on a bad character, length or stray high bits.
pub fn nix32_decode(s: &str) -> Option<Vec<u8>> {
    let size = (s.len() * 5) / 8;
    if nix32_len(size) != s.len() {
        return None;
    }
    let mut out = vec![0u8; size];
    for (pos, ch) in s.bytes().enumerate() {
        let c = NIX32.iter().position(|&a| a == ch)? as u16;
        let n = s.len() - 1 - pos;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (c << j) as u8;
        let carry = (c >> (8 - j)) as u8;
        if i + 1 < size {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// Decodes a digest written in hex, Nix base-32 or base-64, the encoding told by length.
fn decode_digest(algo: Algo, s: &str) -> Option<Vec<u8>> {
    let size = algo.size();
    if s.len() == size * 2 {
        HEXLOWER_PERMISSIVE.decode(s.as_bytes()).ok()
    } else if s.len() == nix32_len(size) {
        nix32_decode(s)
    } else if s.len() == BASE64.encode_len(size) {
        BASE64.decode(s.as_bytes()).ok().filter(|b| b.len() == size)
    } else {
        None
    }
}

/// Guesses the algorithm of a bare digest from its length.
fn algo_for_bare(s: &str) -> Option<Algo> {
    Algo::ALL.into_iter().find(|a| {
        s.len() == a.size() * 2
            || s.len() == nix32_len(a.size())
            || s.len() == BASE64.encode_len(a.size())
    })
}

/// A parsed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hash {
    pub algo: Algo,
    pub digest: Vec<u8>,
}

impl Hash {
    /// Parses SRI (`sha256-…`), `sha256:…` (hex, base-32 or base-64) or a bare digest;
    /// `default` is the algorithm for a bare digest when its length does not tell.
    pub fn parse(s: &str, default: Option<Algo>) -> Option<Hash> {
        let s = s.trim().trim_matches(|c| c == '\'' || c == '"');
        if let Some((a, rest)) = s.split_once('-')
            && let Some(algo) = Algo::parse(a)
        {
            let digest = BASE64
                .decode(rest.as_bytes())
                .ok()
                .filter(|d| d.len() == algo.size())?;
            return Some(Hash { algo, digest });
        }
        if let Some((a, rest)) = s.split_once(':') {
            let algo = Algo::parse(a)?;
            return Some(Hash {
                algo,
                digest: decode_digest(algo, rest)?,
            });
        }
        let algo = default
            .filter(|a| decode_digest(*a, s).is_some())
            .or_else(|| algo_for_bare(s))?;
        Some(Hash {
            algo,
            digest: decode_digest(algo, s)?,
        })
    }

    /// The SRI form Nix prints today: `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo.name(), BASE64.encode(&self.digest))
    }

    /// `sha256:<nix32>`, as narinfo files write it.
    pub fn to_nix32_prefixed(&self) -> String {
        format!("{}:{}", self.algo.name(), nix32_encode(&self.digest))
    }
}

/// A hash in the SRI form Nix prints (`sha256-<base64>`), checked: a hash mismatch's
/// specified and got hashes, and what a fix writes into a user's file. It derefs to its
/// text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sri(String);

/// Text that is not a hash in SRI form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a hash in SRI form (such as sha256-<base64>): {0:?}")]
pub struct NotSri(pub String);

impl Sri {
    pub fn parse(s: &str) -> Result<Sri, NotSri> {
        Sri::try_from(s.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its algorithm and digest.
    pub fn hash(&self) -> Hash {
        // Parsing proved it one.
        Hash::parse(&self.0, None).unwrap_or(Hash {
            algo: Algo::Sha256,
            digest: Vec::new(),
        })
    }
}

impl TryFrom<String> for Sri {
    type Error = NotSri;
    fn try_from(s: String) -> Result<Sri, NotSri> {
        let sri = s.contains('-') && Hash::parse(&s, None).is_some_and(|h| h.to_sri() == s);
        if sri {
            Ok(Sri(s))
        } else {
            Err(NotSri(s.chars().take(100).collect()))
        }
    }
}

impl From<Sri> for String {
    fn from(s: Sri) -> String {
        s.0
    }
}

impl From<&Hash> for Sri {
    fn from(h: &Hash) -> Sri {
        Sri(h.to_sri())
    }
}

impl std::ops::Deref for Sri {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Sri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl PartialEq<str> for Sri {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Sri {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Converts any accepted hash spelling to SRI, or returns it unchanged if it cannot be parsed.
pub fn to_sri(s: &str, default: Option<Algo>) -> String {
    Hash::parse(s, default)
        .map(|h| h.to_sri())
        .unwrap_or_else(|| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // SHA-256 of the empty string; `nix hash to-base32 --type sha256 e3b0…` on Nix 2.8.
    const NIX32_HASH: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const SRI_HASH: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
    // `nix hash to-sri --type sha256 1b8m03r6…` on Nix 2.8.
    const OTHER_NIX32: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    const OTHER_SRI: &str = "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";

    #[test]
    fn nix32_round_trip_and_known_value() {
        let h = Hash::parse(NIX32_HASH, Some(Algo::Sha256)).unwrap();
        assert_eq!(h.to_sri(), SRI_HASH);
        assert_eq!(nix32_encode(&h.digest), NIX32_HASH);
        for n in [0usize, 1, 5, 16, 20, 32, 64] {
            let bytes: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(37)).collect();
            assert_eq!(nix32_decode(&nix32_encode(&bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn every_spelling_converts_to_sri() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(to_sri(hex, None), SRI_HASH);
        assert_eq!(to_sri(&format!("sha256:{hex}"), None), SRI_HASH);
        assert_eq!(to_sri(&format!("sha256:{NIX32_HASH}"), None), SRI_HASH);
        assert_eq!(to_sri(SRI_HASH, None), SRI_HASH);
        assert_eq!(to_sri(OTHER_NIX32, Some(Algo::Sha256)), OTHER_SRI);
        let fake32 = "0".repeat(52);
        assert_eq!(to_sri(&fake32, None), format!("sha256-{}=", "A".repeat(43)));
    }

    #[test]
    fn sri_takes_only_the_sri_form() {
        let s = Sri::parse(SRI_HASH).unwrap();
        assert_eq!(s.hash().algo, Algo::Sha256);
        assert_eq!(s, SRI_HASH);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Sri>(&json).unwrap(), s);
        for bad in [
            "",
            "sha256-short",
            NIX32_HASH,
            &format!("sha256:{NIX32_HASH}"),
            &format!("\"{SRI_HASH}\""),
            &format!(" {SRI_HASH}"),
            "\"; rm -rf ~; \"",
        ] {
            assert!(Sri::parse(bad).is_err(), "{bad}");
            assert!(
                serde_json::from_str::<Sri>(&format!("{bad:?}")).is_err(),
                "{bad}"
            );
        }
    }

    /// Stored state: absent is the empty string; what an older version stored unchecked
    /// reads as absent, not as an error that would make the row unreadable.
    #[test]
    fn an_optional_sri_is_stored_as_text_or_empty() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Row {
            #[serde(default, with = "crate::stored_or_empty")]
            got: Option<Sri>,
        }
        let some = Row {
            got: Some(Sri::parse(SRI_HASH).unwrap()),
        };
        let json = serde_json::to_string(&some).unwrap();
        assert_eq!(json, format!("{{\"got\":\"{SRI_HASH}\"}}"));
        assert_eq!(serde_json::from_str::<Row>(&json).unwrap(), some);
        assert_eq!(
            serde_json::to_string(&Row { got: None }).unwrap(),
            "{\"got\":\"\"}"
        );
        for stored in ["{}", "{\"got\":\"\"}", "{\"got\":\"sha256-A\"}"] {
            assert_eq!(
                serde_json::from_str::<Row>(stored).unwrap(),
                Row { got: None }
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(Hash::parse("sha256-PLACEHOLDER", None).is_none());
        assert!(Hash::parse("sha256:zzzz", None).is_none());
        assert!(nix32_decode("e").is_none());
    }
}
