//! Warm mode's trust: what the cache already has is skipped, except a fixed output another
//! derivation produced (a copied hash) and everything built on it.

use super::*;

/// The fixed-output derivations among `drvs` marked present whose output, as the run's cache
/// (or, without one, this store) records it, was produced by a different derivation that is
/// not the same fetch: their hash may have been copied. An output whose producer cannot be
/// read, or with none recorded (a cache that records none, a path added by hand), is a
/// suspect too: checked rather than trusted, as nothing vouches for it.
pub(super) async fn copied_suspects(
    shared: &Arc<Shared>,
    drvs: &[nixfarm_nix::derivation::Derivation],
    present: &std::collections::HashSet<String>,
    run_cache: &str,
) -> Vec<String> {
    let fods: Vec<(&str, String)> = drvs
        .iter()
        .filter(|d| d.fixed_output && present.contains(&d.path))
        .filter_map(|d| Some((d.path.as_str(), d.outputs.first()?.1.clone())))
        .collect();
    if fods.is_empty() {
        return Vec::new();
    }
    let outs: Vec<String> = fods.iter().map(|(_, o)| o.clone()).collect();
    let producers: Vec<Result<Option<String>, String>> = if run_cache.is_empty() {
        match shared.nix.derivers(&outs).await {
            Ok(v) => v.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e.to_string()); outs.len()],
        }
    } else {
        match pusher(shared, run_cache).await {
            Ok(p) => p
                .derivers(&outs)
                .await
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect(),
            Err(e) => vec![Err(e.to_string()); outs.len()],
        }
    };
    let mut suspects = Vec::new();
    for ((drv, out), producer) in fods.into_iter().zip(producers) {
        let suspect = match producer {
            Ok(None) => true,
            Ok(Some(p)) => p != drv && !super::build::same_fetch(drv, &p),
            Err(e) => {
                tracing::warn!("cannot tell which derivation produced {out}; checking it: {e}");
                true
            }
        };
        if suspect {
            suspects.push(drv.to_string());
        }
    }
    suspects
}

/// Unmarks `suspects` and every derivation among `drvs` that depends on one of them,
/// directly or not.
pub(super) fn unmark_dependents(
    present: &mut std::collections::HashSet<String>,
    drvs: &[nixfarm_nix::derivation::Derivation],
    suspects: Vec<String>,
) {
    let mut dependents: std::collections::HashMap<&str, Vec<&str>> =
        std::collections::HashMap::new();
    for d in drvs {
        for i in &d.input_drvs {
            dependents
                .entry(i.as_str())
                .or_default()
                .push(d.path.as_str());
        }
    }
    // Walked through whatever is not present too: what is built on a suspect, however far
    // up, is not to be taken from the cache unchecked.
    let mut seen = std::collections::HashSet::new();
    let mut todo = suspects;
    while let Some(d) = todo.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        present.remove(&d);
        if let Some(next) = dependents.get(d.as_str()) {
            todo.extend(next.iter().map(|s| s.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(path: &str, inputs: &[&str]) -> nixfarm_nix::derivation::Derivation {
        nixfarm_nix::derivation::Derivation {
            path: path.into(),
            system: "x86_64-linux".into(),
            features: vec![],
            outputs: vec![("out".into(), format!("{path}-out"))],
            input_drvs: inputs.iter().map(|s| s.to_string()).collect(),
            fixed_output: false,
            output_hash: String::new(),
            hints: vec![],
        }
    }

    #[test]
    fn whatever_is_built_on_a_suspect_fixed_output_is_unmarked_however_far_up() {
        // src -> lib (not present: its output is gone) -> app; other stands alone.
        let drvs = vec![
            drv("src", &[]),
            drv("lib", &["src"]),
            drv("app", &["lib"]),
            drv("other", &[]),
        ];
        let mut present: std::collections::HashSet<String> = ["src", "app", "other"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        unmark_dependents(&mut present, &drvs, vec!["src".into()]);
        assert_eq!(present.into_iter().collect::<Vec<_>>(), ["other"]);
    }
}
