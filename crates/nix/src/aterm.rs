//! Derivation files (`.drv`, Nix's ATerm `Derive(…)`) read in-process: the agent needs a
//! derivation's outputs and inputs before and after every build, and a Nix process per
//! question costs ~30 ms each time.

use crate::derivation::{Derivation, fod_hints};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Largest derivation file read, bytes (nixpkgs' largest are a few hundred KiB).
pub const MAX_DRV_BYTES: u64 = 16 << 20;
/// Most derivations one closure walk reads.
pub const MAX_CLOSURE: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AtermError {
    #[error("{0}: not a derivation Nix writes (Derive(…)) at byte {1}")]
    Syntax(String, usize),
    #[error("{0}: cannot read: {1}")]
    Read(String, String),
    #[error("{0}: larger than {MAX_DRV_BYTES} bytes")]
    TooLarge(String),
    #[error("more than {MAX_CLOSURE} derivations in one closure")]
    TooMany,
}

/// The fields of `Derive(outputs, inputDrvs, inputSrcs, system, builder, args, env)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drv {
    /// (name, path, hashAlgo, hash); path empty for a floating content-addressed output.
    pub outputs: Vec<(String, String, String, String)>,
    pub input_drvs: Vec<(String, Vec<String>)>,
    pub input_srcs: Vec<String>,
    pub system: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn eat(&mut self, lit: &str) -> Option<()> {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Some(())
        } else {
            None
        }
    }

    fn string(&mut self) -> Option<String> {
        self.eat("\"")?;
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.i)?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                }
                other => out.push(other),
            }
        }
    }

    /// `[item,item,…]`
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        self.eat("[")?;
        let mut out = Vec::new();
        if self.eat("]").is_some() {
            return Some(out);
        }
        loop {
            out.push(item(self)?);
            if self.eat("]").is_some() {
                return Some(out);
            }
            self.eat(",")?;
        }
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        self.list(Self::string)
    }

    fn drv(&mut self) -> Option<Drv> {
        self.eat("Derive(")?;
        let outputs = self.list(|p| {
            p.eat("(")?;
            let name = p.string()?;
            p.eat(",")?;
            let path = p.string()?;
            p.eat(",")?;
            let algo = p.string()?;
            p.eat(",")?;
            let hash = p.string()?;
            p.eat(")")?;
            Some((name, path, algo, hash))
        })?;
        self.eat(",")?;
        let input_drvs = self.list(|p| {
            p.eat("(")?;
            let path = p.string()?;
            p.eat(",")?;
            let outs = p.strings()?;
            p.eat(")")?;
            Some((path, outs))
        })?;
        self.eat(",")?;
        let input_srcs = self.strings()?;
        self.eat(",")?;
        let system = self.string()?;
        self.eat(",")?;
        let builder = self.string()?;
        self.eat(",")?;
        let args = self.strings()?;
        self.eat(",")?;
        let env = self.list(|p| {
            p.eat("(")?;
            let k = p.string()?;
            p.eat(",")?;
            let v = p.string()?;
            p.eat(")")?;
            Some((k, v))
        })?;
        self.eat(")")?;
        (self.i == self.s.len()).then_some(Drv {
            outputs,
            input_drvs,
            input_srcs,
            system,
            builder,
            args,
            env: env.into_iter().collect(),
        })
    }
}

/// Parses a derivation file's text; `name` only labels errors.
pub fn parse(name: &str, text: &[u8]) -> Result<Drv, AtermError> {
    let mut p = Parser { s: text, i: 0 };
    p.drv()
        .ok_or_else(|| AtermError::Syntax(name.to_string(), p.i))
}

impl Drv {
    /// The scheduler's view of this derivation, stored at `path`.
    pub fn to_derivation(&self, path: &str) -> Derivation {
        let mut fixed_output = false;
        let mut output_hash = String::new();
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for (name, p, algo, hash) in &self.outputs {
            if !hash.is_empty() {
                fixed_output = true;
                let algo = algo.trim_start_matches("r:").trim_start_matches("text:");
                output_hash = if hash.contains('-') || hash.contains(':') {
                    hash.clone()
                } else {
                    format!("{algo}:{hash}")
                };
            }
            outputs.push((name.clone(), p.clone()));
        }
        let env: serde_json::Map<String, serde_json::Value> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        Derivation {
            path: path.to_string(),
            system: self.system.clone(),
            features: self
                .env
                .get("requiredSystemFeatures")
                .map(|s| s.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            outputs,
            input_drvs: self.input_drvs.iter().map(|(p, _)| p.clone()).collect(),
            hints: if fixed_output {
                fod_hints(Some(&serde_json::Value::Object(env)))
            } else {
                Vec::new()
            },
            fixed_output,
            output_hash,
        }
    }
}

impl Drv {
    /// True when `other` is the same fetch as `self` with only its stated hash changed (and so
    /// its output paths): the same builder, arguments, inputs and environment apart from the
    /// hash and the output paths. What one fetched, the other fetches too.
    pub fn same_fetch(&self, other: &Drv) -> bool {
        const HASH_KEYS: &[&str] = &["outputHash", "outputHashAlgo", "outputHashMode"];
        let names = |d: &Drv| d.outputs.iter().map(|o| o.0.clone()).collect::<Vec<_>>();
        let env = |d: &Drv| {
            let outs = names(d);
            d.env
                .iter()
                .filter(|(k, _)| !HASH_KEYS.contains(&k.as_str()) && !outs.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        names(self) == names(other)
            && self.input_drvs == other.input_drvs
            && self.input_srcs == other.input_srcs
            && self.system == other.system
            && self.builder == other.builder
            && self.args == other.args
            && env(self) == env(other)
    }
}

/// Reads and parses one derivation file, bounded in size.
pub fn read(path: &str) -> Result<Drv, AtermError> {
    let p = Path::new(path);
    let meta = std::fs::metadata(p).map_err(|e| AtermError::Read(path.into(), e.to_string()))?;
    if meta.len() > MAX_DRV_BYTES {
        return Err(AtermError::TooLarge(path.into()));
    }
    let text = std::fs::read(p).map_err(|e| AtermError::Read(path.into(), e.to_string()))?;
    parse(path, &text)
}

/// The derivations in the closures of `drvs` (each with its inputs), read from the store's
/// files, sorted by path: what `nix show-derivation -r` lists.
pub fn closure(drvs: &[String]) -> Result<Vec<Derivation>, AtermError> {
    let mut seen: BTreeSet<String> = drvs.iter().cloned().collect();
    let mut todo: Vec<String> = seen.iter().cloned().collect();
    let mut out: BTreeMap<String, Derivation> = BTreeMap::new();
    while let Some(path) = todo.pop() {
        let d = read(&path)?.to_derivation(&path);
        for i in &d.input_drvs {
            if seen.insert(i.clone()) {
                if seen.len() > MAX_CLOSURE {
                    return Err(AtermError::TooMany);
                }
                todo.push(i.clone());
            }
        }
        out.insert(path, d);
    }
    Ok(out.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOD: &str = r#"Derive([("out","/nix/store/s-source","r:sha256","e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")],[],[],"x86_64-linux","/bin/sh",["-c","echo \"hi\"\n"],[("builder","/bin/sh"),("name","source"),("rev","abc1234"),("requiredSystemFeatures","kvm big-parallel")])"#;

    #[test]
    fn a_fixed_output_derivation_reads_as_show_derivation_says() {
        let d = parse("x", FOD.as_bytes()).unwrap();
        assert_eq!(d.args, vec!["-c", "echo \"hi\"\n"]);
        let v = d.to_derivation("/nix/store/b-src.drv");
        assert!(v.fixed_output);
        assert!(v.output_hash.starts_with("sha256:e3b0"));
        assert_eq!(v.hints, vec!["abc1234", "kvm big-parallel", "source"]);
        assert_eq!(v.features, vec!["kvm", "big-parallel"]);
        assert_eq!(
            v.outputs,
            vec![("out".into(), "/nix/store/s-source".into())]
        );
    }

    #[test]
    fn the_same_fetch_with_another_hash_is_recognised_and_another_fetch_is_not() {
        let fod = |out: &str, hash: &str, url: &str| {
            format!(
                r#"Derive([("out","{out}","r:sha256","{hash}")],[],[],"x86_64-linux","/bin/sh",["-c","fetch"],[("out","{out}"),("outputHash","{hash}"),("outputHashAlgo","sha256"),("url","{url}")])"#
            )
        };
        let a = parse(
            "a",
            fod("/nix/store/a-source", "00", "https://x/1").as_bytes(),
        )
        .unwrap();
        let fixed = parse(
            "b",
            fod("/nix/store/b-source", "11", "https://x/1").as_bytes(),
        )
        .unwrap();
        let other = parse(
            "c",
            fod("/nix/store/b-source", "11", "https://x/2").as_bytes(),
        )
        .unwrap();
        assert!(a.same_fetch(&fixed));
        assert!(fixed.same_fetch(&a));
        assert!(!other.same_fetch(&a), "another URL is another fetch");
        let mut args = fixed.clone();
        args.args.push("--evil".into());
        assert!(!args.same_fetch(&a), "other arguments are another fetch");
    }

    #[test]
    fn outputs_and_inputs() {
        let t = r#"Derive([("dev","/nix/store/a-x-dev","",""),("out","/nix/store/b-x","","")],[("/nix/store/c.drv",["out"]),("/nix/store/d.drv",["dev","out"])],["/nix/store/e-src"],"x86_64-linux","/bin/sh",[],[])"#;
        let v = parse("x", t.as_bytes())
            .unwrap()
            .to_derivation("/nix/store/x.drv");
        assert!(!v.fixed_output);
        assert_eq!(v.input_drvs, vec!["/nix/store/c.drv", "/nix/store/d.drv"]);
        assert_eq!(v.outputs.len(), 2);
        assert!(v.hints.is_empty());
    }

    #[test]
    fn anything_else_is_refused_with_where() {
        for bad in [
            "",
            "garbage",
            "Derive([",
            r#"Derive([],[],[],"x","/bin/sh",[],[])trailing"#,
            r#"DrvWithVersion("xp-dyn-drv",[],[],[],"x","/bin/sh",[],[])"#,
            r#"Derive([("out","/nix/store/a","","")],[],[],"x","/bin/sh",[],[("k","unterminated)])"#,
        ] {
            assert!(
                matches!(parse("f", bad.as_bytes()), Err(AtermError::Syntax(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_closure_is_walked_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let (a, b, c) = (p("a.drv"), p("b.drv"), p("c.drv"));
        std::fs::write(&c, FOD).unwrap();
        std::fs::write(
            &b,
            format!(
                r#"Derive([("out","/nix/store/b","","")],[("{c}",["out"])],[],"x","/bin/sh",[],[])"#
            ),
        )
        .unwrap();
        std::fs::write(
            &a,
            format!(r#"Derive([("out","/nix/store/a","","")],[("{b}",["out"]),("{c}",["out"])],[],"x","/bin/sh",[],[])"#),
        )
        .unwrap();
        let all = closure(std::slice::from_ref(&a)).unwrap();
        assert_eq!(
            all.iter().map(|d| d.path.clone()).collect::<Vec<_>>(),
            vec![a.clone(), b, c.clone()]
        );
        assert!(all[2].fixed_output);
        std::fs::remove_file(&c).unwrap();
        assert!(matches!(closure(&[a]), Err(AtermError::Read(..))));
    }
}
