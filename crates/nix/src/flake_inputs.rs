//! What a flake takes, read before Nix locks anything: the inputs its `flake.nix` declares
//! (evaluated restricted to its own tree, fetching nothing), and a remote flake's source
//! fetched alone, none of its inputs with it. Locking an input fetches it first, a path on
//! the agent's own disk too; these let a caller refuse one before Nix would.

use crate::entry::Entry;
use crate::runner::{Nix, NixError, nix_string};
use std::path::{Path, PathBuf};

/// The inputs' names: declared in `inputs`, and those `outputs` takes by name (Nix looks
/// those up in its registry) but `self`.
const DECLARED: &str = r#"f: builtins.attrNames (f.inputs or { }) ++ builtins.filter (n: n != "self") (builtins.attrNames (if builtins.isFunction (f.outputs or null) then builtins.functionArgs f.outputs else { }))"#;

impl Nix {
    /// The names of the inputs `dir/flake.nix` declares, evaluated impure but restricted to
    /// `dir` (as a `--file` entry is) with none of the agent's environment: nothing is
    /// fetched or read beyond the tree.
    pub async fn flake_input_names(&self, dir: &Path) -> Result<Vec<String>, NixError> {
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
        let mut names: Vec<String> = serde_json::from_str(&out)
            .map_err(|e| NixError::Infra(format!("cannot read the flake's inputs: {e}")))?;
        names.sort();
        names.dedup();
        Ok(names)
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
        assert_eq!(
            nix.flake_input_names(declared.path()).await.unwrap(),
            ["b", "k", "nixpkgs"]
        );
        let none = flake("{ outputs = { self }: { }; }");
        assert!(nix.flake_input_names(none.path()).await.unwrap().is_empty());
        let all = flake("{ outputs = inputs: { }; }");
        assert!(nix.flake_input_names(all.path()).await.unwrap().is_empty());
        // Restricted to the tree: its inputs cannot come from a file beyond it.
        let beyond = flake("{ inputs = import /etc/nix/nix.conf; outputs = _: { }; }");
        assert!(nix.flake_input_names(beyond.path()).await.is_err());
        // Nor through the fetchers flakes bring, which restricted evaluation lets through.
        for fetch in [
            r#"builtins.fetchTree { type = "path"; path = "/etc/nix"; rev = "0000000000000000000000000000000000000000"; }"#,
            r#"builtins.getFlake "path:/etc/nix?rev=0000000000000000000000000000000000000000""#,
        ] {
            let f = flake(&format!(
                "{{ inputs = builtins.seq ({fetch}) {{ }}; outputs = _: {{ }}; }}"
            ));
            let e = nix.flake_input_names(f.path()).await.unwrap_err();
            assert!(!e.is_infra(), "{fetch}: {e}");
        }
    }
}
