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
// Each one's every read under tryEval: one output that throws is that output's problem,
// not the end of its siblings' checks.
const DERIVATION: &str = r#"v: let t = builtins.tryEval (builtins.isAttrs v && (v.type or null) == "derivation"); in if !t.success then "does not evaluate" else if !t.value then "is not a derivation" else let d = builtins.tryEval v.drvPath; in if d.success then null else "does not evaluate""#;
const APP: &str = r#"v: let t = builtins.tryEval (builtins.isAttrs v && (v.type or null) == "app" && builtins.isString (v.program or null)); in if !t.success then "does not evaluate" else if !t.value then "is not an app ({ type = \"app\"; program = \"/nix/store/...\"; })" else let p = builtins.tryEval (builtins.substring 0 (builtins.stringLength builtins.storeDir + 1) (builtins.unsafeDiscardStringContext v.program) == builtins.storeDir + "/"); in if !p.success then "does not evaluate" else if p.value then null else "its program is not a path in the Nix store (nix run and nix flake check take only those)""#;

/// What makes Nix say why an output of each kind does not evaluate (tryEval cannot).
const FORCE_VALUE: &str = "v: builtins.seq v null";
const FORCE_DERIVATION: &str = "v: builtins.seq v.drvPath null";
const FORCE_APP: &str = "v: builtins.deepSeq [ v.type v.program ] null";

/// Outputs of one kind asked again, alone, for Nix's message: each costs a process.
const MESSAGES_PER_KIND: usize = 3;

const DOES_NOT_EVALUATE: &str = "does not evaluate";

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
        let outputs: [(String, &str, bool, &str); 5] = [
            ("overlays".into(), OVERLAY, true, FORCE_VALUE),
            ("nixosModules".into(), MODULE, true, FORCE_VALUE),
            (
                format!("formatter.{system}"),
                DERIVATION,
                false,
                FORCE_DERIVATION,
            ),
            (
                format!("devShells.{system}"),
                DERIVATION,
                true,
                FORCE_DERIVATION,
            ),
            (format!("apps.{system}"), APP, true, FORCE_APP),
        ];
        let runs = outputs.iter().map(|(path, check, many, force)| async move {
            let apply = if *many {
                format!("s: builtins.mapAttrs (n: {check}) s")
            } else {
                format!("s: {{ \"\" = ({check}) s; }}")
            };
            let mut c = self.check_cmd();
            entry.select(&mut c, path);
            c.arg("--apply").arg(apply);
            let json = match self.run_json(c, mem_mib).await {
                Ok(json) => json,
                Err(e) => return (path.clone(), Err(e)),
            };
            let mut map: std::collections::BTreeMap<String, Option<String>> =
                serde_json::from_str(&json).unwrap_or_default();
            // Why the first few that do not evaluate do not, in Nix's words.
            let failing: Vec<String> = map
                .iter()
                .filter(|(_, p)| p.as_deref() == Some(DOES_NOT_EVALUATE))
                .map(|(n, _)| n.clone())
                .take(MESSAGES_PER_KIND)
                .collect();
            for name in failing {
                // Asked of the set, by the name quoted: any name (empty, dotted, with a `%`
                // a flake fragment would decode) is the one that failed.
                let apply = if *many {
                    format!("s: ({force}) s.{}", crate::runner::nix_string(&name))
                } else {
                    force.to_string()
                };
                if let Some(why) = self.why_not(entry, path, &apply, mem_mib).await {
                    map.insert(name, Some(format!("{DOES_NOT_EVALUATE}: {why}")));
                }
            }
            (path.clone(), Ok(map))
        });
        let mut out = Vec::new();
        for (path, result) in futures_util::future::join_all(runs).await {
            match result {
                Ok(map) => {
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

    /// An evaluation of the checks: behind the packages' evaluation and builds, which they
    /// run beside.
    fn check_cmd(&self) -> tokio::process::Command {
        let mut c = self.eval_cmd("");
        // SAFETY: setpriority(2) between fork and exec touches no memory of this process.
        unsafe {
            c.pre_exec(|| {
                libc::setpriority(libc::PRIO_PROCESS, 0, 15);
                Ok(())
            });
        }
        c
    }

    /// Nix's message for an output of `path` that does not evaluate (`apply` reads what the
    /// check read), at a low CPU priority as the checks are.
    async fn why_not(
        &self,
        entry: &Entry,
        path: &str,
        apply: &str,
        mem_mib: u64,
    ) -> Option<String> {
        let mut c = self.check_cmd();
        entry.select(&mut c, path);
        c.arg("--apply").arg(apply);
        match self.run_json(c, mem_mib).await {
            Err(NixError::Failed { message, .. }) => Some(message),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One dev shell that throws no longer hides its siblings; one that does not evaluate
    /// says why; an app's program must be a store path.
    #[tokio::test]
    async fn each_output_is_checked_on_its_own_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("flake.nix"),
            r#"{ outputs = { self }: let
  sys = "x86_64-linux";
  d = name: derivation { inherit name; system = sys; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; };
in {
  devShells.${sys} = {
    "odd%41" = throw "odd one";
    default = d "shell";
    notdrv = 5;
    thrower = throw "shell thrower";
    badattr = d "x" // { drvPath = throw "drvPath broken"; };
  };
  apps.${sys} = {
    relative = { type = "app"; program = "relative/path"; };
    good = { type = "app"; program = "${d "app"}/bin/app"; };
  };
}; }
"#,
        )
        .unwrap();
        let entry = Entry::Flake(format!("path:{}", dir.path().display()), vec![]);
        let got: std::collections::BTreeMap<String, Option<String>> = Nix::default()
            .check_outputs(&entry, "x86_64-linux", 0)
            .await
            .into_iter()
            .map(|c| (c.name, c.problem))
            .collect();
        let names: Vec<&String> = got.keys().collect();
        assert_eq!(
            names,
            [
                "apps.x86_64-linux.good",
                "apps.x86_64-linux.relative",
                "devShells.x86_64-linux.badattr",
                "devShells.x86_64-linux.default",
                "devShells.x86_64-linux.notdrv",
                "devShells.x86_64-linux.odd%41",
                "devShells.x86_64-linux.thrower",
            ],
            "{got:?}"
        );
        let problem = |n: &str| got[n].clone().unwrap_or_default();
        assert_eq!(problem("devShells.x86_64-linux.default"), "");
        assert_eq!(
            problem("devShells.x86_64-linux.notdrv"),
            "is not a derivation"
        );
        assert_eq!(
            problem("devShells.x86_64-linux.thrower"),
            "does not evaluate: shell thrower"
        );
        assert_eq!(
            problem("devShells.x86_64-linux.badattr"),
            "does not evaluate: drvPath broken"
        );
        assert_eq!(
            problem("devShells.x86_64-linux.odd%41"),
            "does not evaluate: odd one"
        );
        assert_eq!(problem("apps.x86_64-linux.good"), "");
        assert!(
            problem("apps.x86_64-linux.relative").contains("not a path in the Nix store"),
            "{got:?}"
        );
    }
}
