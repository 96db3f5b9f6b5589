//! What the farm cache checks of an upload before it signs it: that the NAR unpacks to the
//! size and hash its narinfo states, and that a derivation is what its path says.

use nixfarm_store::narinfo::NarInfo;

/// Largest derivation checked (its NAR, uncompressed), bytes: far over any real one.
const MAX_DRV_NAR: u64 = 64 << 20;

/// A derivation is signed only when it is what its path says. Nix gives every `.drv` a
/// text-addressed path (from its name, content and references), so one whose content does
/// not give its path is forged, and every agent that trusts the farm's key would build
/// whatever it says under that name.
pub(super) fn drv_matches_path(ni: &NarInfo, nar_file: &std::path::Path) -> Result<(), String> {
    use std::io::Read;
    let forged = "a derivation whose content and references do not give its store path: refused";
    if ni.nar_size > MAX_DRV_NAR {
        return Err(format!("a derivation of over {MAX_DRV_NAR} bytes"));
    }
    let reader = decompressed(ni, nar_file)?;
    let mut nar = Vec::new();
    reader
        .take(MAX_DRV_NAR + 1)
        .read_to_end(&mut nar)
        .map_err(|e| format!("cannot read the NAR: {e}"))?;
    if nar.len() as u64 > MAX_DRV_NAR {
        return Err(format!("a derivation of over {MAX_DRV_NAR} bytes"));
    }
    let content = nixfarm_store::nar::single_file(&nar).ok_or(forged)?;
    let (dir, base) = ni.store_path.rsplit_once('/').ok_or(forged)?;
    let name = base.get(33..).filter(|n| !n.is_empty()).ok_or(forged)?;
    let want = nixfarm_nix::text_path::text_store_path(dir, name, content, &ni.references);
    if want != ni.store_path {
        return Err(forged.into());
    }
    Ok(())
}

/// The NAR file `nar_file` uncompressed, as the narinfo `ni` says it is compressed.
fn decompressed(
    ni: &NarInfo,
    nar_file: &std::path::Path,
) -> Result<Box<dyn std::io::Read>, String> {
    let f = std::fs::File::open(nar_file).map_err(|e| format!("cannot read the NAR: {e}"))?;
    // The compression as the store crate spells it (the one parser uploads are named by);
    // "none" is the only other name a narinfo may give.
    use nixfarm_store::Compression;
    Ok(match Compression::parse(&ni.compression) {
        Some(Compression::Zstd) => {
            Box::new(zstd::Decoder::new(f).map_err(|e| format!("cannot read the NAR: {e}"))?)
        }
        Some(Compression::Xz) => Box::new(xz2::read::XzDecoder::new(f)),
        None if ni.compression.eq_ignore_ascii_case("none") => Box::new(f),
        None => {
            return Err(format!(
                "the farm cache checks what it signs and cannot read {} NARs: upload as zstd, xz or none",
                nixfarm_core::limits::clip(&ni.compression, 16)
            ));
        }
    })
}

/// The NAR unpacks to what the narinfo says (its `NarSize`, its `NarHash`) under the
/// compression it names. Nix checks the hash when it substitutes, but a narinfo the farm
/// signed is never replaced: one that lied would fail every dependent until evicted.
pub(super) fn nar_matches(ni: &NarInfo, nar_file: &std::path::Path) -> Result<(), String> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut reader = decompressed(ni, nar_file)?.take(ni.nar_size.saturating_add(1));
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut size: u64 = 0;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("the NAR does not unpack as {}: {e}", ni.compression))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    if size != ni.nar_size || h.finalize().as_slice() != ni.nar_hash.as_slice() {
        return Err("the NAR does not unpack to the NarSize and NarHash the narinfo states".into());
    }
    Ok(())
}
