//! A flake's outputs beside its packages, checked as `nix flake check --no-build` would:
//! overlays are functions, NixOS modules functions, attribute sets or paths, the formatter
//! a derivation, dev shells derivations that evaluate, apps `{ type = "app"; program; }`.
//! Each output is one small evaluation, run side by side; an output the flake does not
//! have is not a failure.

use crate::entry::Entry;
use crate::runner::{Nix, NixError};

/// One checked output and what is wrong with it (None: nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputCheck {
    pub name: String,
    pub problem: Option<String>,
}

const OVERLAY: &str = r#"v: let t = builtins.tryEval (builtins.isFunction v); in if !t.success then "does not evaluate" else if t.value then null else "is not a function (an overlay is final: prev: { ... })""#;
const MODULE: &str = r#"v: let t = builtins.tryEval (builtins.isFunction v || builtins.isAttrs v || builtins.isPath v); in if !t.success then "does not evaluate" else if t.value then null else "is not a NixOS module (a function, an attribute set or a path)""#;
const DERIVATION: &str = r#"v: if !(builtins.isAttrs v) || (v.type or null) != "derivation" then "is not a derivation" else let t = builtins.tryEval v.drvPath; in if t.success then null else "does not evaluate""#;
const APP: &str = r#"v: let t = builtins.tryEval (builtins.isAttrs v && (v.type or null) == "app" && builtins.isString (v.program or null)); in if !t.success then "does not evaluate" else if t.value then null else "is not an app ({ type = \"app\"; program = \"/nix/store/...\"; })""#;

/// Whether Nix's error says the flake has no such output.
fn absent(message: &str) -> bool {
    message.contains("does not provide attribute")
}

impl Nix {
    /// Checks the flake's overlays, NixOS modules, formatter, dev shells and apps for
    /// `system`, in processes capped at `mem_mib` MiB each (0: none).
    pub async fn check_outputs(
        &self,
        entry: &Entry,
        system: &str,
        mem_mib: u64,
    ) -> Vec<OutputCheck> {
        let outputs: [(String, &str, bool); 5] = [
            ("overlays".into(), OVERLAY, true),
            ("nixosModules".into(), MODULE, true),
            (format!("formatter.{system}"), DERIVATION, false),
            (format!("devShells.{system}"), DERIVATION, true),
            (format!("apps.{system}"), APP, true),
        ];
        let runs = outputs.iter().map(|(path, check, many)| async move {
            let apply = if *many {
                format!("s: builtins.mapAttrs (n: {check}) s")
            } else {
                format!("s: {{ \"\" = ({check}) s; }}")
            };
            let mut c = self.eval_cmd("");
            // Behind the packages' evaluation and builds, which they run beside.
            // SAFETY: setpriority(2) between fork and exec touches no memory of this process.
            unsafe {
                c.pre_exec(|| {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 15);
                    Ok(())
                });
            }
            entry.select(&mut c, path);
            c.arg("--apply").arg(apply);
            (path.clone(), self.run_json(c, mem_mib).await)
        });
        let mut out = Vec::new();
        for (path, result) in futures_util::future::join_all(runs).await {
            match result {
                Ok(json) => {
                    let map: std::collections::BTreeMap<String, Option<String>> =
                        serde_json::from_str(&json).unwrap_or_default();
                    for (name, problem) in map {
                        out.push(OutputCheck {
                            name: if name.is_empty() {
                                path.clone()
                            } else {
                                format!("{path}.{name}")
                            },
                            problem,
                        });
                    }
                }
                Err(NixError::Failed { message, .. }) if absent(&message) => {}
                Err(e) => out.push(OutputCheck {
                    name: path.clone(),
                    problem: Some(e.to_string()),
                }),
            }
        }
        out
    }
}
