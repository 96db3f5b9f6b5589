//! What an evaluation reads: a flake (`REF#attr.path`), or a Nix file of a local tree
//! (classic NUR layouts: `default.nix`, `ci.nix`) called with the run's arguments. A file is
//! evaluated in restricted mode with only its tree on the search path, so it reads nothing
//! else of the agent's disk, as a flake in pure mode cannot.

use crate::runner::nix_string;
use std::path::PathBuf;
use tokio::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A flake reference, with inputs overridden (`--override-input NAME REF`).
    Flake(String, Vec<(String, String)>),
    File {
        /// The tree (an unpacked snapshot).
        root: PathBuf,
        /// Relative to `root`.
        file: String,
        /// (name, value, literal): literal values are strings (`--argstr`), others Nix
        /// expressions (`--arg`).
        args: Vec<(String, String, bool)>,
    },
}

/// The environment a Nix file's evaluation sees: what Nix needs to reach its store, nothing
/// else (not NIX_CONFIG, which may hold access tokens).
/// Clears `c`'s environment but for [`KEPT_ENV`] and `also`.
pub(crate) fn keep_env(c: &mut Command, also: &[&str]) {
    c.env_clear();
    for (k, v) in std::env::vars_os() {
        if k.to_str()
            .is_some_and(|k| KEPT_ENV.contains(&k) || also.contains(&k))
        {
            c.env(k, v);
        }
    }
}

const KEPT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "TMPDIR",
    "LANG",
    "NIX_REMOTE",
    "NIX_STORE_DIR",
    "NIX_STATE_DIR",
    "NIX_LOG_DIR",
    "NIX_CONF_DIR",
    "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "XDG_CACHE_HOME",
    // Fetching (flake inputs, substitutes, fixed-output builds) behind a proxy.
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

/// Lists become attribute sets named by their derivations' `pname` (or name without the
/// version): `ci.nix`'s `buildOutputs` is a list. Derivations that share a `pname` (two
/// versions of a tool) go by their full names (`tool-1.0`, `tool-2.0`), and a full name
/// there twice is told apart by its place (`tool-1.0#3`; no derivation name holds a `#`):
/// none is dropped.
pub(crate) const NORMALIZE: &str = r#"(s: if builtins.isList s then let
  n = builtins.length s; at = builtins.elemAt s;
  base = d: d.pname or (builtins.parseDrvName d.name).name;
  places = f: builtins.genList (i: { name = f (at i); value = i; }) n;
  first = f: builtins.listToAttrs (places f);
  last = f: let p = places f; in builtins.listToAttrs (builtins.genList (i: builtins.elemAt p (n - 1 - i)) n);
  fb = first base; lb = last base;
  cands = builtins.genList (i: let b = base (at i); in if fb.${b} == i && lb.${b} == i then b else (at i).name) n;
  fc = builtins.listToAttrs (builtins.genList (i: { name = builtins.elemAt cands i; value = i; }) n);
  uniq = i: let c = builtins.elemAt cands i; in if fc.${c} == i then c else "${c}#${toString i}";
in builtins.listToAttrs (builtins.genList (i: { name = uniq i; value = at i; }) n) else s)"#;

impl Entry {
    /// Adds what selects `attr_path` of this entry to a `nix eval` command.
    pub(crate) fn select(&self, c: &mut Command, attr_path: &str) {
        match self {
            Entry::Flake(f, overrides) => {
                c.arg(format!("{f}#{}", crate::runner::fragment(attr_path)));
                for (name, reference) in overrides {
                    c.args(["--override-input", name, reference]);
                }
                // Nothing is locked here that the flake's lock file does not lock (what it
                // locks was checked): Nix would fetch an input to lock it, a local path too.
                c.arg("--no-update-lock-file");
                if !overrides.is_empty() {
                    // The lock the overrides make is this run's, not the checkout's.
                    c.arg("--no-write-lock-file");
                }
            }
            Entry::File { root, file, args } => {
                self.restrict(c);
                c.arg("--expr").arg(self.expr(root, file, args, attr_path));
            }
        }
    }

    /// For a file entry: impure, as nix-build is, but restricted to the tree (the search
    /// path), and with none of the agent's secrets to read through builtins.getEnv.
    pub(crate) fn restrict(&self, c: &mut Command) {
        let Entry::File { root, .. } = self else {
            return;
        };
        // Without flakes, which `restrict-eval` does not confine (`fetchTree`, `getFlake`).
        c.args(["--experimental-features", "nix-command"]);
        c.args(["--impure", "--option", "restrict-eval", "true"]);
        keep_env(c, &[]);
        c.arg("-I").arg(root);
    }

    pub fn is_file(&self) -> bool {
        matches!(self, Entry::File { .. })
    }

    /// `import FILE`, called like `nix-build --arg` calls it (only the arguments it
    /// declares), then `attr_path` selected.
    fn expr(
        &self,
        root: &std::path::Path,
        file: &str,
        args: &[(String, String, bool)],
        attr_path: &str,
    ) -> String {
        let path = root.join(file);
        let mut set = String::from("{ ");
        for (name, value, literal) in args {
            let v = if *literal {
                nix_string(value)
            } else {
                format!("({value})")
            };
            set.push_str(&format!("{} = {v}; ", nix_string(name)));
        }
        set.push('}');
        let mut select = String::new();
        for p in attr_path.split('.').filter(|p| !p.is_empty()) {
            select.push('.');
            select.push_str(&nix_string(p));
        }
        format!(
            "let f = import (/. + {}); args = {set}; v = if builtins.isFunction f then f (builtins.intersectAttrs (builtins.functionArgs f) args) else f; in v{select}",
            nix_string(&path.to_string_lossy())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_called_with_its_arguments_and_selected() {
        let e = Entry::File {
            root: "/src/r".into(),
            file: "ci.nix".into(),
            args: vec![
                ("greeting".into(), "hi \"${x}\"".into(), true),
                ("n".into(), "1 + 1".into(), false),
            ],
        };
        let Entry::File { root, file, args } = &e else {
            unreachable!()
        };
        let x = e.expr(root, file, args, "buildOutputs");
        assert!(
            x.starts_with("let f = import (/. + \"/src/r/ci.nix\");"),
            "{x}"
        );
        assert!(
            x.contains(r#""greeting" = "hi \"\${x}\""; "n" = (1 + 1);"#),
            "{x}"
        );
        assert!(x.ends_with(r#"in v."buildOutputs""#), "{x}");
        assert!(e.expr(root, file, args, "").ends_with("in v"));
    }
}
