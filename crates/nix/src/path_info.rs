//! What the store knows of a path (`nix path-info --json` in every shape it has had, or the
//! daemon's `QueryPathInfo` when builds go through one): NAR hash and size, references,
//! deriver, content address.

use crate::runner::{Nix, NixError, tail};
use std::process::Stdio;

impl Nix {
    /// What the store knows of each path: NAR hash and size, references, deriver.
    pub async fn path_infos(&self, paths: &[String]) -> Result<Vec<StorePathInfo>, NixError> {
        // A `.drv` path means its outputs to `nix path-info`: only plain paths go the
        // daemon's way, which asks of each path itself.
        if !paths.iter().any(|p| p.ends_with(".drv"))
            && let Some(r) = self.path_infos_daemon(paths).await
        {
            return r;
        }
        self.path_infos_with(paths, false).await
    }

    /// [`Nix::path_infos`] of the whole closure of `paths` (each path once): one Nix call
    /// where asking for the closure and then for its infos would take two.
    pub async fn closure_infos(&self, paths: &[String]) -> Result<Vec<StorePathInfo>, NixError> {
        if let Some(r) = self.closure_infos_daemon(paths).await {
            return r;
        }
        let mut all = self.path_infos_with(paths, true).await?;
        let mut seen = std::collections::HashSet::new();
        all.retain(|i| seen.insert(i.path.clone()));
        Ok(all)
    }

    async fn path_infos_with(
        &self,
        paths: &[String],
        recursive: bool,
    ) -> Result<Vec<StorePathInfo>, NixError> {
        // A .drv path means its outputs unless --derivation is given, and with it an output
        // path means its deriver: ask about the two kinds separately.
        let (drvs, others): (Vec<String>, Vec<String>) =
            paths.iter().cloned().partition(|p| p.ends_with(".drv"));
        let mut all = Vec::with_capacity(paths.len());
        for (list, derivation) in [(drvs, true), (others, false)] {
            for chunk in list.chunks(500) {
                let mut c = self.nix_cmd();
                c.args(["path-info", "--json"]);
                if recursive {
                    c.arg("--recursive");
                }
                if derivation {
                    c.arg("--derivation");
                }
                let out = c
                    .args(chunk)
                    .stderr(Stdio::piped())
                    .output()
                    .await
                    .map_err(|e| NixError::Infra(format!("cannot run nix path-info: {e}")))?;
                if !out.status.success() {
                    return Err(NixError::Infra(format!(
                        "nix path-info failed: {}",
                        tail(&String::from_utf8_lossy(&out.stderr), 500)
                    )));
                }
                all.extend(
                    parse_path_infos(&String::from_utf8_lossy(&out.stdout)).map_err(|e| {
                        NixError::Infra(format!("unreadable nix path-info output: {e}"))
                    })?,
                );
            }
        }
        Ok(all)
    }
}

/// One store path as `nix path-info --json` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePathInfo {
    pub path: String,
    /// As Nix prints it (SRI on 2.4+, `sha256:<nix32>` on older versions).
    pub nar_hash: String,
    pub nar_size: u64,
    /// Full store paths.
    pub references: Vec<String>,
    /// Full store path of the deriver, when known.
    pub deriver: Option<String>,
    /// Content address (`text:sha256:…`, `fixed:r:sha256:…`), when the path has one.
    pub ca: Option<String>,
}

/// Parses `nix path-info --json`: an array of objects with `path` (Nix 2.4 to 2.18) or an
/// object keyed by store path (newer Nix and Lix).
pub fn parse_path_infos(json: &str) -> Result<Vec<StorePathInfo>, serde_json::Error> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(json)?;
    let entries: Vec<(String, Value)> = match v {
        Value::Array(a) => a
            .into_iter()
            .map(|o| {
                let p = o
                    .get("path")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                (p, o)
            })
            .collect(),
        Value::Object(m) => m.into_iter().collect(),
        _ => Vec::new(),
    };
    let full = |p: &str| {
        if p.starts_with('/') {
            p.to_string()
        } else {
            format!("/nix/store/{p}")
        }
    };
    Ok(entries
        .into_iter()
        .filter(|(p, o)| {
            !p.is_empty() && !o.is_null() && o.get("valid") != Some(&Value::Bool(false))
        })
        .map(|(p, o)| StorePathInfo {
            path: full(&p),
            nar_hash: o
                .get("narHash")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            nar_size: o.get("narSize").and_then(Value::as_u64).unwrap_or(0),
            references: o
                .get("references")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(full).collect())
                .unwrap_or_default(),
            deriver: o
                .get("deriver")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
                .map(full),
            ca: o
                .get("ca")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(String::from),
        })
        .collect())
}

#[cfg(test)]
mod path_info_tests {
    use super::*;

    #[test]
    fn both_shapes() {
        let old = r#"[{"path":"/nix/store/aaa-x","narHash":"sha256-AAA=","narSize":120,"references":["/nix/store/bbb-y"],"deriver":"/nix/store/ccc-x.drv","valid":true}]"#;
        let new = r#"{"/nix/store/aaa-x":{"narHash":"sha256-AAA=","narSize":120,"references":["bbb-y"],"deriver":"ccc-x.drv"},"/nix/store/zzz-gone":null}"#;
        for j in [old, new] {
            let v = parse_path_infos(j).unwrap();
            assert_eq!(v.len(), 1);
            assert_eq!(v[0].path, "/nix/store/aaa-x");
            assert_eq!(v[0].nar_size, 120);
            assert_eq!(v[0].references, vec!["/nix/store/bbb-y"]);
            assert_eq!(v[0].deriver.as_deref(), Some("/nix/store/ccc-x.drv"));
        }
    }
}
