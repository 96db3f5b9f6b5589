//! Derivations as `nix show-derivation` / `nix derivation show` print them, in every shape.

use serde_json::Value;

const STORE_DIR: &str = "/nix/store";

/// The parts of a derivation the scheduler needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub path: String,
    pub system: String,
    /// `requiredSystemFeatures`.
    pub features: Vec<String>,
    /// Output name and path (empty path for content-addressed outputs not known yet).
    pub outputs: Vec<(String, String)>,
    pub input_drvs: Vec<String>,
    pub fixed_output: bool,
    /// The fixed output's hash as the derivation states it (`hashAlgo` + `hash`).
    pub output_hash: String,
    /// For fixed-output derivations: short environment values (`name`, `rev`, `url`, `owner`,
    /// …) that tie the derivation to the place in the source that defines it.
    pub hints: Vec<String>,
}

/// Environment variables that never identify a fetch.
const NOT_HINTS: &[&str] = &[
    "builder",
    "system",
    "PATH",
    "out",
    "outputs",
    "outputHash",
    "outputHashAlgo",
    "outputHashMode",
    "args",
    "preferLocalBuild",
    "impureEnvVars",
    "allowSubstitutes",
];

pub(crate) fn fod_hints(env: Option<&Value>) -> Vec<String> {
    let Some(Value::Object(env)) = env else {
        return Vec::new();
    };
    let mut out: Vec<String> = env
        .iter()
        .filter(|(k, _)| !NOT_HINTS.contains(&k.as_str()))
        .filter_map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty() && v.len() <= 512 && !v.contains('\n'))
        .map(String::from)
        .collect();
    out.sort();
    out.dedup();
    out.truncate(32);
    out
}

fn full_path(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{STORE_DIR}/{p}")
    }
}

/// Parses the JSON object keyed by derivation path (Nix 2.4 to today; newer versions key by
/// base name and nest input outputs in `{"outputs": […]}`; the newest wrap everything in
/// `{"derivations": {…}}`).
pub fn parse_show_derivation(json: &str) -> Result<Vec<Derivation>, serde_json::Error> {
    let v: Value = serde_json::from_str(json)?;
    let map = match v.get("derivations") {
        Some(Value::Object(m)) => m.clone(),
        _ => match v {
            Value::Object(m) => m,
            _ => Default::default(),
        },
    };
    let mut out = Vec::with_capacity(map.len());
    for (path, d) in map {
        let system = d
            .get("system")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let env = d.get("env");
        let features = env
            .and_then(|e| e.get("requiredSystemFeatures"))
            .and_then(Value::as_str)
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut outputs = Vec::new();
        let mut fixed_output = false;
        let mut output_hash = String::new();
        if let Some(Value::Object(outs)) = d.get("outputs") {
            for (name, o) in outs {
                let p = o
                    .get("path")
                    .and_then(Value::as_str)
                    .map(full_path)
                    .unwrap_or_default();
                if let Some(h) = o.get("hash").and_then(Value::as_str) {
                    fixed_output = true;
                    let algo = o
                        .get("hashAlgo")
                        .and_then(Value::as_str)
                        .unwrap_or("sha256");
                    let algo = algo.trim_start_matches("r:").trim_start_matches("text:");
                    output_hash = if h.contains('-') || h.contains(':') {
                        h.to_string()
                    } else {
                        format!("{algo}:{h}")
                    };
                }
                outputs.push((name.clone(), p));
            }
        }
        // Nix 2.33+ (format 4) nests them: `"inputs": {"srcs": [...], "drvs": {...}}`.
        let drvs = d
            .get("inputDrvs")
            .or_else(|| d.get("inputs").and_then(|i| i.get("drvs")));
        let input_drvs = match drvs {
            Some(Value::Object(m)) => m.keys().map(|k| full_path(k)).collect(),
            _ => Vec::new(),
        };
        out.push(Derivation {
            path: full_path(&path),
            system,
            features,
            outputs,
            input_drvs,
            hints: if fixed_output {
                fod_hints(env)
            } else {
                Vec::new()
            },
            fixed_output,
            output_hash,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_2_8_shape() {
        let j = r#"{"/nix/store/a-x.drv":{"outputs":{"out":{"path":"/nix/store/o-x"}},"inputSrcs":[],"inputDrvs":{"/nix/store/b-src.drv":["out"]},"system":"x86_64-linux","builder":"/bin/sh","args":[],"env":{"requiredSystemFeatures":"kvm big-parallel"}},
                   "/nix/store/b-src.drv":{"outputs":{"out":{"path":"/nix/store/s-src","hashAlgo":"r:sha256","hash":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}},"inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux","builder":"/bin/sh","args":[],"env":{"rev":"abc1234","name":"source","outputHash":"e3b0","builder":"/bin/sh"}}}"#;
        let d = parse_show_derivation(j).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].input_drvs, vec!["/nix/store/b-src.drv"]);
        assert_eq!(d[0].features, vec!["kvm", "big-parallel"]);
        assert!(!d[0].fixed_output);
        assert!(d[1].fixed_output);
        assert!(d[1].output_hash.starts_with("sha256:e3b0"));
        assert!(d[0].hints.is_empty());
        assert_eq!(d[1].hints, vec!["abc1234", "source"]);
    }

    #[test]
    fn newer_shapes() {
        let j = r#"{"version":4,"derivations":{"a-x.drv":{"outputs":{"out":{"path":"o-x"}},"inputDrvs":{"b-y.drv":{"outputs":["out"],"dynamicOutputs":{}}},"system":"aarch64-linux","env":{}}}}"#;
        let d = parse_show_derivation(j).unwrap();
        assert_eq!(d[0].path, "/nix/store/a-x.drv");
        assert_eq!(
            d[0].outputs,
            vec![("out".to_string(), "/nix/store/o-x".to_string())]
        );
        assert_eq!(d[0].input_drvs, vec!["/nix/store/b-y.drv"]);
        assert_eq!(d[0].system, "aarch64-linux");
        // Format 4 (Nix 2.33+): inputs nested, a fixed output with no path.
        let j = r#"{"version":4,"derivations":{"a-x.drv":{"outputs":{"out":{"path":"o-x"}},"inputs":{"srcs":["s-builder.sh"],"drvs":{"b-y.drv":{"outputs":["out"],"dynamicOutputs":{}}}},"system":"x86_64-linux","env":{}},"b-y.drv":{"outputs":{"out":{"method":"nar","hash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="}},"inputs":{"srcs":[],"drvs":{}},"system":"x86_64-linux","env":{"rev":"0123456789abcdef"}}}}"#;
        let d = parse_show_derivation(j).unwrap();
        assert_eq!(d[0].input_drvs, vec!["/nix/store/b-y.drv"]);
        assert!(d[1].fixed_output);
        assert_eq!(
            d[1].output_hash,
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }
}
