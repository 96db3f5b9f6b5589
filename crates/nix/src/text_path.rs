//! Where Nix puts a text-addressed file (every `.drv` is one): its store path follows from
//! its name, its content and its references, so a derivation can be checked against its
//! path without trusting whoever sent it.

use sha2::{Digest, Sha256};

/// The store path Nix gives a text file of `name` with `content` referring to `references`
/// (full store paths) in `store_dir`: `makeTextPath`, i.e. the hash of
/// `text[:REF…]:sha256:HEX:STORE_DIR:NAME`, folded to 20 bytes, in Nix's base-32.
pub fn text_store_path(
    store_dir: &str,
    name: &str,
    content: &[u8],
    references: &[String],
) -> String {
    let mut refs: Vec<&str> = references.iter().map(String::as_str).collect();
    refs.sort_unstable();
    refs.dedup();
    let mut kind = String::from("text");
    for r in refs {
        kind.push(':');
        kind.push_str(r);
    }
    let inner = data_encoding::HEXLOWER.encode(&Sha256::digest(content));
    let fingerprint = format!("{kind}:sha256:{inner}:{store_dir}:{name}");
    let digest = Sha256::digest(fingerprint.as_bytes());
    let mut folded = [0u8; 20];
    for (i, b) in digest.iter().enumerate() {
        folded[i % 20] ^= b;
    }
    format!("{store_dir}/{}-{name}", crate::hash::nix32_encode(&folded))
}

/// What a derivation file says of its own path.
#[derive(Debug)]
pub enum DrvCheck {
    /// Its content, with the references a derivation has (its input derivations and
    /// sources), gives its path; the derivation as read (no need to read it again).
    Matches(Box<crate::aterm::Drv>),
    /// They give another path: forged or corrupt.
    Differs,
    /// It cannot be read, or is in a format this does not parse.
    Unreadable,
}

/// Checks the derivation file at `path` (in the store) against its path. A derivation
/// fetched from a cache is only as good as whoever signed it; this holds whoever did.
pub fn check_derivation(path: &str) -> DrvCheck {
    let Some((dir, base)) = path.rsplit_once('/') else {
        return DrvCheck::Unreadable;
    };
    let Some(name) = base.get(33..).filter(|n| n.ends_with(".drv")) else {
        return DrvCheck::Unreadable;
    };
    let text = match std::fs::metadata(path) {
        Ok(m) if m.len() <= crate::aterm::MAX_DRV_BYTES => match std::fs::read(path) {
            Ok(t) => t,
            Err(_) => return DrvCheck::Unreadable,
        },
        _ => return DrvCheck::Unreadable,
    };
    let Ok(drv) = crate::aterm::parse(path, &text) else {
        return DrvCheck::Unreadable;
    };
    let refs: Vec<String> = drv
        .input_drvs
        .iter()
        .map(|(p, _)| p.clone())
        .chain(drv.input_srcs.iter().cloned())
        .collect();
    if text_store_path(dir, name, &text, &refs) == path {
        DrvCheck::Matches(Box::new(drv))
    } else {
        DrvCheck::Differs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Derivations written by real Nix 2.8 (`nix-instantiate` of two one-line
    /// `derivation`s, the second with the first and a source as inputs), with the paths and
    /// references Nix gave them.
    #[test]
    fn paths_are_the_ones_nix_gives() {
        let x = r#"Derive([("out","/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","x"),("out","/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x"),("system","x86_64-linux")])"#;
        assert_eq!(
            text_store_path("/nix/store", "x.drv", x.as_bytes(), &[]),
            "/nix/store/mh3rz2qzm0lrcxk22g2b1kifak7q2nj9-x.drv"
        );
        let y = r#"Derive([("out","/nix/store/806i5cs6iyn4py3kjp9jm7j3gy8m3fra-y","","")],[("/nix/store/mh3rz2qzm0lrcxk22g2b1kifak7q2nj9-x.drv",["out"])],["/nix/store/437rdgjgz6cm37vszv4apj4qhmim0849-a.nix"],"x86_64-linux","/bin/sh",["-c","cat $x > $out"],[("builder","/bin/sh"),("name","y"),("out","/nix/store/806i5cs6iyn4py3kjp9jm7j3gy8m3fra-y"),("src","/nix/store/437rdgjgz6cm37vszv4apj4qhmim0849-a.nix"),("system","x86_64-linux"),("x","/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x")])"#;
        let refs = vec![
            "/nix/store/mh3rz2qzm0lrcxk22g2b1kifak7q2nj9-x.drv".to_string(),
            "/nix/store/437rdgjgz6cm37vszv4apj4qhmim0849-a.nix".to_string(),
        ];
        assert_eq!(
            text_store_path("/nix/store", "y.drv", y.as_bytes(), &refs),
            "/nix/store/2d0p6yl3v08yk5hw5dbpini6c98g8bj0-y.drv"
        );
        // Any other content or reference gives another path.
        let forged = y.replace("cat $x", "rm -rf $x");
        assert_ne!(
            text_store_path("/nix/store", "y.drv", forged.as_bytes(), &refs),
            "/nix/store/2d0p6yl3v08yk5hw5dbpini6c98g8bj0-y.drv"
        );
        assert_ne!(
            text_store_path("/nix/store", "y.drv", y.as_bytes(), &refs[..1]),
            "/nix/store/2d0p6yl3v08yk5hw5dbpini6c98g8bj0-y.drv"
        );
        // A derivation's references are what it names as inputs: checked from the file
        // alone, in a directory standing in for the store.
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().to_str().unwrap();
        let at = |c: &str| format!("{store}/{}-y.drv", &c[..32]);
        let good = text_store_path(store, "y.drv", y.as_bytes(), &refs);
        std::fs::write(&good, y).unwrap();
        assert!(matches!(check_derivation(&good), DrvCheck::Matches(_)));
        let bad = at("0000000000000000000000000000000000");
        std::fs::write(&bad, forged.as_bytes()).unwrap();
        assert!(matches!(check_derivation(&bad), DrvCheck::Differs));
        // The right name, the wrong content: what a poisoned cache would hand out.
        std::fs::write(&good, forged.as_bytes()).unwrap();
        assert!(matches!(check_derivation(&good), DrvCheck::Differs));
        std::fs::write(&good, "not a derivation").unwrap();
        assert!(matches!(check_derivation(&good), DrvCheck::Unreadable));
        assert!(matches!(
            check_derivation(&format!("{store}/missing-y.drv")),
            DrvCheck::Unreadable
        ));
    }
}
