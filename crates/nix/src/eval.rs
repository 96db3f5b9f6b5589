//! Evaluating with Nix: listing an attribute set, and what each attribute evaluates to
//! (its derivation, outputs and meta), with throws caught per attribute.

use crate::captured::Marks;
use crate::entry::{Entry, NORMALIZE};
use crate::runner::{Nix, NixError, nix_string};
use serde::Deserialize;
use std::collections::BTreeMap;

/// What one attribute evaluates to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttrInfo {
    pub drv_path: String,
    pub outputs: BTreeMap<String, String>,
    #[serde(default)]
    pub pname: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub position: String,
    #[serde(default)]
    pub rev: String,
    #[serde(default)]
    pub system: String,
    /// `meta.timeout`, seconds (0: none).
    #[serde(default)]
    pub timeout: u64,
    /// `meta.maxSilent`, seconds (0: none).
    #[serde(default)]
    pub max_silent: u64,
    /// `meta.mainProgram` (empty: none).
    #[serde(default)]
    pub main_program: String,
}

/// One attribute `n` of `s`, caught: its info, or null when evaluating it throws.
/// deepSeq: a throw anywhere in what is read (drvPath, meta) is caught here, not later while
/// printing the JSON, where it would fail the process.
const CAUGHT: &str = "let t = builtins.tryEval (let i = info (at n); in builtins.deepSeq i i); in if t.success then t.value else null";

/// Attribute `n` of `s`: a name the listing found inside a set marked
/// `recurseForDerivations` is its path, dot-joined (`tools.fmt`); any other is `s`'s own.
const AT: &str = r#"n: if s ? ${n} then s.${n} else builtins.foldl' (a: k: a.${k}) s (builtins.filter builtins.isString (builtins.split "[.]" n))"#;

/// How deep a file's listing follows sets marked `recurseForDerivations`. A name already
/// on the way down is not followed again (a set that holds itself, as nixpkgs' `pkgs`
/// does, or two that hold each other, would be followed for ever, and each name listed
/// under every path).
const RECURSE_DEPTH: u32 = 8;

/// What [`Nix::list_and_eval`] yields: the names, and each one's info (`None`: it threw)
/// when the listing was small enough to be evaluated.
#[derive(Debug, Deserialize)]
pub struct ListedAndEvaluated {
    pub names: Vec<String>,
    pub evaluated: Option<BTreeMap<String, Option<AttrInfo>>>,
}

const INFO_EXPR: &str = r#"d: if !(builtins.isAttrs d && (d.type or null) == "derivation") then throw "not a derivation but ${if builtins.isAttrs d then "an attribute set without type = \"derivation\" (a set of packages, say)" else "a value of type ${builtins.typeOf d}"}" else let
  outs = d.outputs or [ "out" ];
  src = d.src or null;
  meta = d.meta or { };
  parsed = builtins.parseDrvName (d.name or "");
in {
  drvPath = d.drvPath;
  outputs = builtins.listToAttrs (map (o: { name = o; value = d.${o}.outPath; }) outs);
  pname = toString (d.pname or parsed.name);
  version = toString (d.version or parsed.version);
  position = if builtins.isAttrs meta && meta ? position then toString meta.position else "";
  rev = if builtins.isAttrs src && src ? rev then toString src.rev else "";
  system = d.system or "";
  timeout = if builtins.isAttrs meta && builtins.isInt (meta.timeout or null) then meta.timeout else 0;
  maxSilent = if builtins.isAttrs meta && builtins.isInt (meta.maxSilent or null) then meta.maxSilent else 0;
  mainProgram = if builtins.isAttrs meta && builtins.isString (meta.mainProgram or null) then meta.mainProgram else "";
}"#;

impl Nix {
    /// Attribute names below `attr_path` of `entry`, in a process capped at `mem_mib` MiB
    /// (0: none). Of a Nix file, only the derivations (and what fails to evaluate): a NUR
    /// `default.nix` also holds `lib`, `modules` and `overlays`. As `nix-build` does, a
    /// file's sets marked `recurseForDerivations` (`recurseIntoAttrs`) are followed, their
    /// derivations named by path (`tools.fmt`; a name with a dot of its own inside such a
    /// set, or one a top-level attribute already has, is left out: it would name two).
    pub async fn list_attrs(
        &self,
        entry: &Entry,
        attr_path: &str,
        mem_mib: u64,
    ) -> Result<Vec<String>, NixError> {
        let mut c = self.eval_cmd("");
        entry.select(&mut c, attr_path);
        c.arg("--apply")
            .arg(format!("s: {}", Self::names_expr(entry)));
        let out = self.run_json(c, mem_mib).await?;
        serde_json::from_str(&out)
            .map_err(|e| NixError::Infra(format!("cannot parse attribute list: {e}")))
    }

    /// The listing's expression of `s` (what `attr_path` selects): its attribute names.
    fn names_expr(entry: &Entry) -> String {
        if entry.is_file() {
            format!(
                r#"let n = {NORMALIZE} s; isDrv = v: builtins.isAttrs v && (v.type or null) == "derivation"; walk = depth: prefix: path: set: builtins.concatMap (k: let t = builtins.tryEval set.${{k}}; name = prefix + k; dotted = builtins.match ".*[.].*" k != null; in if depth > 0 && (dotted || n ? ${{name}}) then [ ] else if !t.success || isDrv t.value then [ name ] else if depth < {RECURSE_DEPTH} && !dotted && !(builtins.elem k path) && builtins.isAttrs t.value && (builtins.tryEval ((t.value.recurseForDerivations or false) == true)).value then walk (depth + 1) (name + ".") (path ++ [ k ]) t.value else [ ]) (builtins.attrNames set); in if builtins.isAttrs n then walk 0 "" [ ] n else throw "not an attribute set or a list""#
            )
        } else {
            "if builtins.isAttrs s then builtins.attrNames s else throw \"not an attribute set\""
                .to_string()
        }
    }

    /// Lists the attributes below `attr_path` and, when there are at most `up_to` of them,
    /// evaluates them all in the same process, each as [`Nix::eval_attrs_caught`] does: a
    /// small repository costs one Nix process, not a listing and then evaluation tasks.
    /// `None` for the evaluation when there were more; an error that fails the process (an
    /// uncatchable one while evaluating, a memory cap) fails it all, and callers list alone.
    pub async fn list_and_eval(
        &self,
        entry: &Entry,
        attr_path: &str,
        up_to: usize,
        mem_mib: u64,
    ) -> Result<ListedAndEvaluated, NixError> {
        let apply = format!(
            "s0: let info = {INFO_EXPR}; names = (s: {}) s0; s = {NORMALIZE} s0; at = {AT}; in {{ names = names; evaluated = if builtins.length names <= {up_to} then builtins.listToAttrs (map (n: {{ name = n; value = {CAUGHT}; }}) names) else null; }}",
            Self::names_expr(entry)
        );
        let mut c = self.eval_cmd("");
        entry.select(&mut c, attr_path);
        c.arg("--apply").arg(apply);
        let out = self.run_json(c, mem_mib).await?;
        serde_json::from_str(&out)
            .map_err(|e| NixError::Infra(format!("cannot parse attribute list: {e}")))
    }

    /// Instantiates `attrs` (below `attr_path`) in one process, each attribute under
    /// `builtins.tryEval`: one that throws or fails an assertion (a package "unsupported on
    /// this platform", say) comes back `None` without failing the others, so callers evaluate
    /// only those again, alone, for their message. Errors `tryEval` cannot catch (`abort`, a
    /// missing file, a type error) still fail the whole process, and callers bisect.
    pub async fn eval_attrs_caught(
        &self,
        entry: &Entry,
        attr_path: &str,
        attrs: &[String],
        mem_mib: u64,
    ) -> Result<BTreeMap<String, Option<AttrInfo>>, NixError> {
        self.eval_infos(entry, attr_path, attrs, CAUGHT, mem_mib)
            .await
    }

    /// Instantiates `attrs` (below `attr_path`) in one process; any failing attribute fails it all,
    /// with its message (see [`Nix::eval_attrs_caught`] for groups).
    pub async fn eval_attrs(
        &self,
        entry: &Entry,
        attr_path: &str,
        attrs: &[String],
        mem_mib: u64,
    ) -> Result<BTreeMap<String, AttrInfo>, NixError> {
        self.eval_infos(entry, attr_path, attrs, "info (at n)", mem_mib)
            .await
    }

    /// `{ NAME = VALUE; }` for each of `attrs`, VALUE a Nix expression of `info`, `s` (the
    /// attribute set) and `n` (the name), in one process.
    async fn eval_infos<T: serde::de::DeserializeOwned>(
        &self,
        entry: &Entry,
        attr_path: &str,
        attrs: &[String],
        value: &str,
        mem_mib: u64,
    ) -> Result<BTreeMap<String, T>, NixError> {
        let names: Vec<String> = attrs.iter().map(|a| nix_string(a)).collect();
        // Each attribute marked as Nix starts on it: one past the limit names itself.
        let marks = Marks::new();
        let value = format!(
            "builtins.trace \"{}${{builtins.hashString \"sha256\" n}}.\" ({value})",
            marks.prefix()
        );
        let apply = format!(
            "s0: let info = {INFO_EXPR}; s = {NORMALIZE} s0; at = {AT}; in builtins.listToAttrs (map (n: {{ name = n; value = {value}; }}) [ {} ])",
            names.join(" ")
        );
        let mut c = self.eval_cmd("");
        entry.select(&mut c, attr_path);
        c.arg("--apply").arg(apply);
        let out = match self.run_json_marked(c, mem_mib, Some(&marks)).await {
            Err(NixError::TooLong(message)) => return Err(stopped_at(&marks, attrs, message)),
            r => r?,
        };
        serde_json::from_str(&out)
            .map_err(|e| NixError::Infra(format!("cannot parse evaluation result: {e}")))
    }
}

/// The key of an attribute's mark: its name's SHA-256 in hex (a name may hold any character).
fn mark_key(name: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(name.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What an evaluation of `attrs` stopped past its limit was on: the attribute it marked
/// last, those it marked before (evaluated), and how long they took. Without a mark, as it
/// was.
fn stopped_at(marks: &Marks, attrs: &[String], message: String) -> NixError {
    let seen = marks.seen();
    let keys: std::collections::HashMap<String, &String> =
        attrs.iter().map(|a| (mark_key(a), a)).collect();
    match (seen.first(), seen.split_last()) {
        (Some((_, first)), Some(((last, when), before))) if keys.contains_key(last) => {
            NixError::TooLongAt {
                message,
                attr: keys[last].clone(),
                before: when.saturating_duration_since(*first),
                done: before
                    .iter()
                    .filter_map(|(k, _)| keys.get(k).map(|a| (*a).clone()))
                    .collect(),
            }
        }
        _ => NixError::TooLong(message),
    }
}

#[cfg(test)]
mod mark_tests {
    use super::*;

    #[test]
    fn marks_name_the_attribute_an_evaluation_was_on() {
        let m = Marks::new();
        let attrs = vec!["a".to_string(), "b\"\n".to_string(), "c".to_string()];
        assert!(matches!(
            stopped_at(&m, &attrs, "stopped".into()),
            NixError::TooLong(_)
        ));
        let key = |n: &str| mark_key(n);
        assert_eq!(key("a").len(), 64);
        for k in [key("a"), key("b\"\n")] {
            m.line(format!("trace: {}{k}.\n", m.prefix()).as_bytes());
        }
        match stopped_at(&m, &attrs, "stopped".into()) {
            NixError::TooLongAt {
                message,
                attr,
                done,
                ..
            } => {
                assert_eq!((message.as_str(), attr.as_str()), ("stopped", "b\"\n"));
                assert_eq!(done, ["a"]);
            }
            e => panic!("{e:?}"),
        }
        // A mark of no attribute asked for changes nothing.
        m.line(format!("trace: {}{}.\n", m.prefix(), key("z")).as_bytes());
        assert!(matches!(
            stopped_at(&m, &attrs, "stopped".into()),
            NixError::TooLong(_)
        ));
    }
}

#[cfg(test)]
mod listing_tests {
    use super::*;

    /// A NUR `default.nix` with sets marked `recurseForDerivations`: what `nix-build` builds
    /// is what is listed, each evaluated by its dotted name.
    #[tokio::test]
    async fn a_files_marked_sets_are_followed_and_named_by_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("default.nix"),
            r#"{ }:
let
  pkg = name: derivation { inherit name; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; };
in {
  lib = { id = x: x; };
  top = pkg "top";
  "a.b" = pkg "dotted";
  a = { recurseForDerivations = true; b = pkg "shadowed"; c = pkg "c"; };
  tools = {
    recurseForDerivations = true;
    fmt = pkg "fmt";
    "x.y" = pkg "ambiguous";
    broken = throw "no fmt here";
    deeper = { recurseForDerivations = true; lint = pkg "lint"; };
    plain = { hidden = pkg "hidden"; };
  };
  unmarked = { hidden = pkg "hidden"; };
  loop = let self = { recurseForDerivations = true; inherit self; leaf = pkg "leaf"; }; in self;
}
"#,
        )
        .unwrap();
        let entry = Entry::File {
            root: dir.path().to_path_buf(),
            file: "default.nix".into(),
            args: vec![],
        };
        let nix = Nix::default();
        let mut names = nix.list_attrs(&entry, "", 0).await.unwrap();
        names.sort();
        // The loop is followed once round: `self` is not entered from within itself.
        let want = [
            "a.b",
            "a.c",
            "loop.leaf",
            "loop.self.leaf",
            "tools.broken",
            "tools.deeper.lint",
            "tools.fmt",
            "top",
        ];
        assert_eq!(names, want);
        let got = nix
            .eval_attrs_caught(
                &entry,
                "",
                &[
                    "a.b".into(),
                    "a.c".into(),
                    "tools.deeper.lint".into(),
                    "tools.broken".into(),
                ],
                0,
            )
            .await
            .unwrap();
        let name = |a: &str| {
            got[a]
                .as_ref()
                .map(|i| i.drv_path.rsplit('-').next().unwrap().to_string())
        };
        // A top-level name with a dot is its own attribute, not a path.
        assert_eq!(name("a.b").as_deref(), Some("dotted.drv"));
        assert_eq!(name("a.c").as_deref(), Some("c.drv"));
        assert_eq!(name("tools.deeper.lint").as_deref(), Some("lint.drv"));
        assert_eq!(got["tools.broken"], None);
        // Listed and evaluated in one process, the same.
        let both = nix.list_and_eval(&entry, "", 100, 0).await.unwrap();
        let evaluated = both.evaluated.unwrap();
        assert!(evaluated["tools.fmt"].is_some(), "{evaluated:?}");
        assert_eq!(evaluated.len(), want.len());
    }
}

#[cfg(test)]
mod list_tests {
    use super::*;

    /// ci.nix's `buildOutputs`: a list. Two versions of one tool are both there.
    #[tokio::test]
    async fn a_list_names_each_derivation_once_and_drops_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ci.nix"),
            r#"let
  mk = name: v: derivation { inherit name; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo ${v} > $out" ]; };
in {
  buildOutputs = [
    ((mk "tool-1.0" "a") // { pname = "tool"; })
    ((mk "tool-2.0" "b") // { pname = "tool"; })
    (mk "single-1.0" "c")
    (mk "dup-1" "d")
    (mk "dup-1" "e")
  ];
}
"#,
        )
        .unwrap();
        let entry = Entry::File {
            root: dir.path().to_path_buf(),
            file: "ci.nix".into(),
            args: vec![],
        };
        let nix = Nix::default();
        let mut names = nix.list_attrs(&entry, "buildOutputs", 0).await.unwrap();
        names.sort();
        assert_eq!(
            names,
            ["dup-1", "dup-1#4", "single", "tool-1.0", "tool-2.0"]
        );
        let got = nix
            .eval_attrs(&entry, "buildOutputs", &names, 0)
            .await
            .unwrap();
        let drvs: std::collections::BTreeSet<&String> = got.values().map(|i| &i.drv_path).collect();
        assert_eq!(drvs.len(), 5, "{got:?}");
        assert!(got["tool-2.0"].drv_path.ends_with("-tool-2.0.drv"));
    }
}
