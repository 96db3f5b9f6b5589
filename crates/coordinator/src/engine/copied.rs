//! Naming where a copied hash came from: the package whose fixed output declares it.

use super::*;

/// For a hash copied from another fixed-output derivation: which one, by the package that
/// owns it in this run when there is one ("the hash is atproto-api's source's"). The
/// derivation the store names may be none of this run's (an earlier one of the same
/// source: its hash still fake, Nix kept what it fetched under the right path): then the
/// fixed output of this run that declares that hash, other than `fod` (the one that
/// failed), names it.
pub(super) fn copied_note(
    rep: &BuildReport,
    fod: &str,
    nodes: &HashMap<&str, DrvNode>,
    results: &HashMap<&str, (DrvState, BuildReport)>,
    top_of: &HashMap<String, String>,
) -> String {
    let Some(from) = &rep.copied_from else {
        return String::new();
    };
    // A derivation file spells its hash in hex (`sha256:e3b0…`): compared as hashes.
    let hash = |s: &str| nixfarm_core::hash::Hash::parse(s, None);
    let specified = rep.specified.as_deref().and_then(hash);
    // Of those, one whose own fetch gave what it declares (not another copy that failed).
    let declaring = || {
        let mut same: Vec<(bool, &str)> = nodes
            .iter()
            .filter(|(d, n)| {
                **d != fod
                    && n.fixed_output
                    && specified.is_some()
                    && hash(&n.output_hash) == specified
            })
            .map(|(d, _)| {
                let mismatched = results
                    .get(d)
                    .is_some_and(|(_, r)| r.kind == BuildOutcome::HashMismatch);
                (mismatched, *d)
            })
            .collect();
        same.sort();
        same.iter().find_map(|(_, d)| top_of.get(*d)).cloned()
    };
    let whose = top_of
        .get(from.as_str())
        .cloned()
        .or_else(declaring)
        .unwrap_or_else(|| from.to_string());
    format!(
        " (the hash was copied: the output with hash {} was produced by {whose}, and this fetch gives other content)",
        rep.specified.as_deref().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store names the derivation that fetched the output first: an earlier version of
    /// alpha's source, its hash still fake, is in no graph of this run. The run's own fixed
    /// output that declares the hash (as a derivation file spells it, in hex), and whose
    /// fetch gave that content, names it: not gamma's, another copy that failed too.
    #[test]
    fn a_copied_hash_is_named_by_the_package_that_declares_it() {
        let sri = "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=";
        let hex = format!(
            "sha256:{}",
            nixfarm_core::hash::Hash::parse(sri, None)
                .unwrap()
                .digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let gamma_src = "/nix/store/22222222222222222222222222222222-source.drv";
        let alpha_src = "/nix/store/33333333333333333333333333333333-source.drv";
        let beta_src = "/nix/store/44444444444444444444444444444444-source.drv";
        let earlier = "/nix/store/55555555555555555555555555555555-source.drv";
        let fod = || DrvNode {
            fixed_output: true,
            output_hash: hex.clone(),
            ..Default::default()
        };
        let nodes: HashMap<&str, DrvNode> =
            [(alpha_src, fod()), (beta_src, fod()), (gamma_src, fod())].into();
        let top_of: HashMap<String, String> = [
            (alpha_src.to_string(), "alpha's source".to_string()),
            (beta_src.to_string(), "beta's source".to_string()),
            (gamma_src.to_string(), "gamma's source".to_string()),
        ]
        .into();
        let rep = |from: &str| BuildReport {
            kind: BuildOutcome::HashMismatch,
            specified: Some(nixfarm_core::Sri::parse(sri).unwrap()),
            copied_from: Some(sp(from)),
            ..Default::default()
        };
        let built = BuildReport {
            kind: BuildOutcome::Built,
            ..Default::default()
        };
        let results: HashMap<&str, (DrvState, BuildReport)> = [
            (alpha_src, (DrvState::Built, built)),
            (gamma_src, (DrvState::Failed, rep(earlier))),
        ]
        .into();
        let note = copied_note(&rep(earlier), beta_src, &nodes, &results, &top_of);
        assert!(note.contains("was produced by alpha's source"), "{note}");
        // One of this run's: by its own name.
        let note = copied_note(&rep(alpha_src), beta_src, &nodes, &results, &top_of);
        assert!(note.contains("was produced by alpha's source"), "{note}");
        // None declares it: the derivation the store names.
        let alone: HashMap<&str, DrvNode> = [(beta_src, fod())].into();
        let note = copied_note(&rep(earlier), beta_src, &alone, &results, &top_of);
        assert!(
            note.contains(&format!("was produced by {earlier}")),
            "{note}"
        );
    }
}
