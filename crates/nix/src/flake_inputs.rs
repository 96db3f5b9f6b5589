//! What a flake takes, read before Nix locks anything: the inputs its `flake.nix` declares
//! (evaluated restricted to its own tree, fetching nothing), and a remote flake's source
//! fetched alone, none of its inputs with it. Locking an input fetches it first, a path on
//! the agent's own disk too; these let a caller refuse one before Nix would.

use crate::entry::Entry;
use crate::runner::{Nix, NixError, nix_string};
use std::path::{Path, PathBuf};

/// The inputs: each declared in `inputs` with what it says of itself (its attributes, and
/// those of its own inputs, but what is not plain data), and those `outputs` takes by name
/// but `self` (Nix looks those up in its registry), with nothing said of them.
const DECLARED: &str = r#"f: let
  plain = v: if builtins.isAttrs v then builtins.mapAttrs (_: plain) (removeAttrs v [ "outputs" ]) else if builtins.isString v || builtins.isBool v || builtins.isInt v || builtins.isList v then v else null;
  declared = builtins.mapAttrs (_: plain) (f.inputs or { });
  taken = builtins.filter (n: n != "self" && !(declared ? ${n})) (builtins.attrNames (if builtins.isFunction (f.outputs or null) then builtins.functionArgs f.outputs else { }));
in declared // builtins.listToAttrs (map (n: { name = n; value = { }; }) taken)"#;

impl Nix {
    /// The inputs `dir/flake.nix` declares, by name, with what it says of each (its
    /// attributes as JSON), evaluated impure but restricted to `dir` (as a `--file` entry is)
    /// with none of the agent's environment: nothing is fetched or read beyond the tree.
    pub async fn flake_inputs(
        &self,
        dir: &Path,
    ) -> Result<std::collections::BTreeMap<String, serde_json::Value>, NixError> {
        let mut c = self.eval_cmd("");
        let file = dir.join("flake.nix");
        let Some(file) = file.to_str() else {
            return Err(NixError::Infra("the flake's path is not UTF-8".into()));
        };
        let entry = Entry::File {
            root: dir.to_path_buf(),
            file: "flake.nix".into(),
            args: Vec::new(),
        };
        entry.restrict(&mut c);
        c.arg("--expr")
            .arg(format!("({DECLARED}) (import {})", nix_string(file)));
        let out = self.run_json(c, 0).await?;
        serde_json::from_str(&out)
            .map_err(|e| NixError::Infra(format!("cannot read the flake's inputs: {e}")))
    }

    /// Fetches the flake `reference` alone (`nix flake prefetch`: its source, none of its
    /// inputs) and returns the directory of its `flake.nix` (`?dir=` honoured).
    pub async fn prefetch_flake(&self, reference: &str) -> Result<PathBuf, NixError> {
        let mut c = self.nix_cmd();
        c.args([
            "flake",
            "prefetch",
            "--json",
            "--option",
            "substituters",
            "",
        ]);
        c.arg(reference);
        let out = self.run_json(c, 0).await?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| NixError::Infra(format!("cannot read nix flake prefetch: {e}")))?;
        let Some(path) = v.get("storePath").and_then(|p| p.as_str()) else {
            return Err(NixError::Infra(
                "nix flake prefetch named no store path".into(),
            ));
        };
        let path = crate::StorePath::parse(path)
            .map_err(|e| NixError::Infra(format!("nix flake prefetch named {path}: {e}")))?;
        let dir = reference
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("dir=")))
            .unwrap_or_default();
        // Nix decodes it: only plain relative directories are taken, read as Nix reads them.
        if dir.starts_with('/') || dir.contains('%') || dir.split('/').any(|c| c == "..") {
            return Err(NixError::Failed {
                message: format!("the flake reference's dir= is not a plain directory: {dir}"),
                log: String::new(),
            });
        }
        Ok(Path::new(path.as_str()).join(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flake(text: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("flake.nix"), text).unwrap();
        d
    }

    #[tokio::test]
    async fn a_flakes_inputs_are_read_without_fetching_or_reading_beyond_it() {
        let nix = Nix::default();
        let declared = flake(
            r#"{ inputs.k = { url = "path:/nonexistent/secret"; flake = false; };
                 inputs.b.url = "github:o/r";
                 outputs = { self, k, nixpkgs, ... }: { }; }"#,
        );
        let got = nix.flake_inputs(declared.path()).await.unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["b", "k", "nixpkgs"]);
        assert_eq!(got["k"]["url"], "path:/nonexistent/secret");
        assert_eq!(got["nixpkgs"], serde_json::json!({}));
        let none = flake("{ outputs = { self }: { }; }");
        assert!(nix.flake_inputs(none.path()).await.unwrap().is_empty());
        let all = flake("{ outputs = inputs: { }; }");
        assert!(nix.flake_inputs(all.path()).await.unwrap().is_empty());
        // Restricted to the tree: its inputs cannot come from a file beyond it.
        let beyond = flake("{ inputs = import /etc/nix/nix.conf; outputs = _: { }; }");
        assert!(nix.flake_inputs(beyond.path()).await.is_err());
        // Nor through the fetchers flakes bring, which restricted evaluation lets through.
        for fetch in [
            r#"builtins.fetchTree { type = "path"; path = "/etc/nix"; rev = "0000000000000000000000000000000000000000"; }"#,
            r#"builtins.getFlake "path:/etc/nix?rev=0000000000000000000000000000000000000000""#,
        ] {
            let f = flake(&format!(
                "{{ inputs = builtins.seq ({fetch}) {{ }}; outputs = _: {{ }}; }}"
            ));
            let e = nix.flake_inputs(f.path()).await.unwrap_err();
            assert!(!e.is_infra(), "{fetch}: {e}");
        }
    }
}
