//! Derivations in the farm cache: signed only when they are what their path says.

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
    let f = std::fs::File::open(nar_file).map_err(|e| format!("cannot read the NAR: {e}"))?;
    // The compression as the store crate spells it (the one parser uploads are named by);
    // "none" is the only other name a narinfo may give.
    use nixfarm_store::Compression;
    let reader: Box<dyn Read> = match Compression::parse(&ni.compression) {
        Some(Compression::Zstd) => {
            Box::new(zstd::Decoder::new(f).map_err(|e| format!("cannot read the NAR: {e}"))?)
        }
        Some(Compression::Xz) => Box::new(xz2::read::XzDecoder::new(f)),
        None if ni.compression.eq_ignore_ascii_case("none") => Box::new(f),
        None => {
            return Err(format!(
                "derivations are checked here and {} NARs cannot be read: upload it as zstd, xz or none",
                nixfarm_core::limits::clip(&ni.compression, 16)
            ));
        }
    };
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
