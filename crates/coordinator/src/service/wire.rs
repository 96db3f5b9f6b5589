//! Wire messages from clients and agents become domain values here (checked, bounded), and domain values become wire messages.

use super::*;

/// A hex SHA-256, checked before it names a file or is echoed.
pub(super) fn is_digest(d: &str) -> bool {
    nixfarm_core::snapshot::is_digest(d)
}

/// A run id as clients send it: checked for shape before it is looked up or echoed.
pub(super) fn checked_run_id(id: String) -> Result<String, WireError> {
    if lim::is_run_id(&id) {
        Ok(id)
    } else {
        Err(WireError(format!(
            "'{}' is not a run id (nixfarm runs lists them)",
            clip(&id, 64)
        )))
    }
}

pub(super) fn source_from_wire(s: Option<pb::Source>) -> Result<SourceSpec, WireError> {
    match s.and_then(|s| s.kind) {
        Some(pb::source::Kind::Snapshot(d)) => {
            if !is_digest(&d) {
                return Err(WireError(format!(
                    "snapshot digest '{}' is not a hex SHA-256",
                    clip(&d, 80)
                )));
            }
            Ok(SourceSpec::Snapshot(d))
        }
        Some(pb::source::Kind::FlakeRef(f)) => {
            nixfarm_core::flakeref::validate(&f).map_err(|e| WireError(e.to_string()))?;
            Ok(SourceSpec::FlakeRef(f))
        }
        None => Err(WireError(
            "a run needs a source (snapshot or flake reference)".into(),
        )),
    }
}

/// Most repository checks kept from one listing.
const MAX_REPO_CHECKS: usize = 1000;

/// A non-flake entry from the CLI, checked (the agent checks it again).
pub(super) fn entry_from_wire(e: Option<pb::NixEntry>) -> Result<EntrySpec, WireError> {
    let Some(e) = e else {
        return Ok(EntrySpec::default());
    };
    if e.file.is_empty() {
        if !e.args.is_empty() {
            return Err(WireError(
                "--arg and --argstr apply to a Nix file (--file), not to a flake".into(),
            ));
        }
        if e.overrides.len() > nixfarm_core::entry::MAX_ARGS {
            return Err(WireError("too many overridden inputs".into()));
        }
        // The references' kind (remote or local) is checked against the farm's policy
        // when the run is accepted.
        let mut overrides = Vec::new();
        for o in e.overrides {
            nixfarm_core::entry::check_override(&o.name, &o.value, true)
                .map_err(|x| WireError(x.0))?;
            overrides.push((o.name, o.value));
        }
        if !e.flake_dir.is_empty() {
            nixfarm_core::entry::check_flake_dir(&e.flake_dir).map_err(|x| WireError(x.0))?;
        }
        return Ok(EntrySpec {
            overrides,
            flake_dir: e.flake_dir,
            ..EntrySpec::default()
        });
    }
    if !e.flake_dir.is_empty() {
        return Err(WireError(
            "a flake's directory applies to a flake, not to a Nix file (--file)".into(),
        ));
    }
    if !e.overrides.is_empty() {
        return Err(WireError(
            "--override-input applies to a flake, not to a Nix file (--file)".into(),
        ));
    }
    nixfarm_core::entry::check_file(&e.file).map_err(|x| WireError(x.0))?;
    if e.args.len() > nixfarm_core::entry::MAX_ARGS {
        return Err(WireError(format!(
            "{} arguments; at most {} are accepted",
            e.args.len(),
            nixfarm_core::entry::MAX_ARGS
        )));
    }
    let mut args = Vec::new();
    for a in e.args {
        nixfarm_core::entry::check_arg(&a.name, &a.value).map_err(|x| WireError(x.0))?;
        args.push((a.name, a.value, a.literal));
    }
    Ok(EntrySpec {
        file: e.file,
        args,
        overrides: Vec::new(),
        flake_dir: String::new(),
    })
}

pub fn entry_to_wire(e: &EntrySpec) -> pb::NixEntry {
    pb::NixEntry {
        file: e.file.clone(),
        args: e
            .args
            .iter()
            .map(|(name, value, literal)| pb::NixArg {
                name: name.clone(),
                value: value.clone(),
                literal: *literal,
            })
            .collect(),
        overrides: e
            .overrides
            .iter()
            .map(|(name, reference)| pb::NixArg {
                name: name.clone(),
                value: reference.clone(),
                literal: true,
            })
            .collect(),
        flake_dir: e.flake_dir.clone(),
    }
}

pub fn source_to_wire(s: &SourceSpec) -> pb::Source {
    pb::Source {
        kind: Some(match s {
            SourceSpec::Snapshot(d) => pb::source::Kind::Snapshot(d.clone()),
            SourceSpec::FlakeRef(f) => pb::source::Kind::FlakeRef(f.clone()),
        }),
    }
}

/// The first run of the hash-fixing session a submit is a stage of (empty: none).
fn stage_from_wire(id: String) -> Result<Option<String>, WireError> {
    if id.is_empty() {
        Ok(None)
    } else if lim::is_run_id(&id) {
        Ok(Some(id))
    } else {
        Err(WireError(format!("'{}' is not a run id", clip(&id, 40))))
    }
}

impl TryFrom<pb::SubmitRunRequest> for RunSpec {
    type Error = WireError;
    fn try_from(r: pb::SubmitRunRequest) -> Result<Self, WireError> {
        check_len("the label", &r.label, lim::MAX_LABEL)?;
        if r.label.chars().any(char::is_control) {
            return Err(WireError("the label holds control characters".into()));
        }
        check_len("the attribute path", &r.attr_path, lim::MAX_ATTR_PATH)?;
        if r.attrs.len() > lim::MAX_SELECTED_ATTRS {
            return Err(WireError(format!(
                "{} attributes selected; at most {} are accepted",
                r.attrs.len(),
                lim::MAX_SELECTED_ATTRS
            )));
        }
        check_len("the cache URL", &r.cache, lim::MAX_CACHE_URL)?;
        if !r.cache.is_empty() {
            nixfarm_core::cache_url::CacheTarget::parse(&r.cache)
                .map_err(|e| WireError(e.to_string()))?;
        }
        if r.trusted_public_keys.len() > lim::MAX_PUBLIC_KEYS {
            return Err(WireError(format!(
                "at most {} trusted public keys are accepted",
                lim::MAX_PUBLIC_KEYS
            )));
        }
        for k in &r.trusted_public_keys {
            check_len("a trusted public key", k, lim::MAX_PUBLIC_KEY)?;
            if !nixfarm_core::cache_url::is_public_key(k) {
                return Err(WireError(format!(
                    "'{}' is not a public key (NAME:BASE64)",
                    clip(k, 80)
                )));
            }
        }
        let skip_listing = r.skip_listing && !r.attrs.is_empty();
        let spec = RunSpec {
            source: source_from_wire(r.source)?,
            // A flake's packages by default; a Nix file's top level.
            attr_path: if r.attr_path.is_empty()
                && r.entry.as_ref().is_none_or(|e| e.file.is_empty())
            {
                "packages.x86_64-linux".into()
            } else {
                r.attr_path
            },
            label: r.label,
            cache: r.cache,
            trusted_public_keys: r.trusted_public_keys,
            timeout_secs: r.timeout_secs,
            max_silent_secs: r.max_silent_secs,
            attrs: {
                for a in &r.attrs {
                    check_len("an attribute name", a, lim::MAX_ATTR)?;
                    if a.is_empty() || a.contains(['"', '$']) || a.chars().any(char::is_control) {
                        return Err(WireError(format!("'{a}' is not an attribute name")));
                    }
                }
                r.attrs
            },
            skip_cached: r.skip_cached,
            skip_listing,
            smoke: r.smoke,
            cross_check_builds: r.cross_check_builds,
            entry: entry_from_wire(r.entry)?,
            stage_of: stage_from_wire(r.stage_of)?,
        };
        // A flake's directory is one of an uploaded tree: a remote reference says its own.
        if !spec.entry.flake_dir.is_empty() && !matches!(spec.source, SourceSpec::Snapshot(_)) {
            return Err(WireError(
                "a flake's directory applies to an uploaded checkout, not to a flake reference (give it ?dir=)".into(),
            ));
        }
        // A Nix file is read from an uploaded tree; a remote flake has no such file here.
        if !spec.entry.file.is_empty() && !matches!(spec.source, SourceSpec::Snapshot(_)) {
            return Err(WireError(
                "--file evaluates a file of a local checkout, not of a flake reference".into(),
            ));
        }
        Ok(spec)
    }
}

impl TryFrom<pb::Register> for Registration {
    type Error = WireError;
    fn try_from(r: pb::Register) -> Result<Self, WireError> {
        if r.name.is_empty()
            || r.name.len() > lim::MAX_AGENT_NAME
            || !r
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(WireError(
                "an agent name is 1 to 255 letters, digits and - _ . @".into(),
            ));
        }
        let words_ok = |v: &[String]| {
            v.len() <= 64
                && v.iter().all(|w| {
                    !w.is_empty()
                        && w.len() <= 64
                        && !w.chars().any(|c| c.is_whitespace() || c.is_control())
                })
        };
        if !words_ok(&r.systems) || !words_ok(&r.features) {
            return Err(WireError(
                "systems and features are at most 64 words of at most 64 bytes".into(),
            ));
        }
        if r.running_attempts.len() > 100_000 || r.running_attempts.iter().any(|a| a.len() > 64) {
            return Err(WireError("running attempts are not attempt ids".into()));
        }
        if r.run_caches.len() > lim::MAX_AGENT_RUN_CACHES
            || r.run_caches
                .iter()
                .any(|c| nixfarm_core::cache_url::CacheTarget::parse(c).is_err())
        {
            return Err(WireError(format!(
                "run caches are at most {} cache URLs",
                lim::MAX_AGENT_RUN_CACHES
            )));
        }
        Ok(Registration {
            name: r.name,
            systems: r.systems,
            features: r.features,
            max_jobs: r.max_jobs.min(4096),
            nix_version: truncate(r.nix_version, 256),
            running_attempts: r.running_attempts,
            session_key: r.session_key.chars().take(128).collect(),
            credential: Default::default(),
            admitted_at: 0,
            token_digest: String::new(),
            holds_outputs: r.holds_outputs,
            holds_in_builder_store: r.holds_in_builder_store,
            takes_farm_cache_token: r.takes_farm_cache_token,
            has_farm_cache: false,
            run_caches: r.run_caches,
        })
    }
}

pub(super) fn outputs_from_wire(o: Vec<pb::DrvOutput>) -> Result<Outputs, WireError> {
    if o.len() > 64 {
        return Err(WireError("more than 64 outputs".into()));
    }
    o.into_iter()
        .map(|o| {
            let path = OutputPath::parse(&o.path);
            match path {
                Ok(path) if !o.name.is_empty() && o.name.len() <= 64 => Ok((o.name, path)),
                _ => Err(WireError(format!(
                    "output '{}' is not a store path",
                    clip(&o.path, 80)
                ))),
            }
        })
        .collect()
}

/// The NAR hashes the outputs carry (outputs held in their builder's store), by output
/// name; an output without one is left out, one that is not a SHA-256 refuses the result.
pub(super) fn nar_hashes_from_wire(
    o: &[pb::DrvOutput],
) -> Result<BTreeMap<String, NarHash>, WireError> {
    o.iter()
        .filter(|o| !o.nar_hash.is_empty())
        .map(|o| {
            let h = NarHash::try_from(o.nar_hash.clone())
                .map_err(|e| WireError(format!("output '{}': {e}", clip(&o.name, 64))))?;
            Ok((o.name.clone(), h))
        })
        .collect()
}

/// A derivation's path as an agent sent it, parsed.
fn drv_path(p: &str) -> Result<StorePath, WireError> {
    StorePath::parse_drv(p)
        .map_err(|e| WireError(format!("'{}' is not a derivation's path: {e}", clip(p, 80))))
}

pub(super) fn err_or<T>(error: String, infra: bool, ok: T) -> Result<T, (String, bool)> {
    if error.is_empty() {
        Ok(ok)
    } else {
        Err((error, infra))
    }
}

/// A hash mismatch's two hashes: each in SRI form (as agents send them), of one algorithm,
/// and different.
pub(super) fn sri_mismatch(specified: &str, got: &str) -> Result<(Sri, Sri), WireError> {
    let sri = |what: &str, s: &str| {
        Sri::parse(s).map_err(|_| {
            WireError(format!(
                "a hash mismatch's {what} hash is not a hash in SRI form: {:?}",
                lim::clip(s, 80)
            ))
        })
    };
    let (s, g) = (sri("specified", specified)?, sri("got", got)?);
    if s.hash().algo != g.hash().algo || s == g {
        return Err(WireError(
            "a hash mismatch must name two different hashes of one algorithm".into(),
        ));
    }
    Ok((s, g))
}

/// Short free text from an agent (names, versions, positions), bounded.
pub(super) fn short(s: String) -> String {
    truncate(s, 1024)
}

pub(super) fn list_attrs(attrs: Vec<String>) -> Result<Vec<String>, AgentFailure> {
    if attrs.len() > lim::MAX_PACKAGES {
        return Err((
            format!(
                "the attribute path has {} attributes; at most {} are accepted",
                attrs.len(),
                lim::MAX_PACKAGES
            ),
            false,
        ));
    }
    if let Some(a) = attrs.iter().find(|a| !lim::is_attr_name(a)) {
        return Err((
            format!(
                "attribute '{}…' is not a name nixfarm accepts (1 to {} bytes, no control characters)",
                clip(a, 60),
                lim::MAX_ATTR
            ),
            false,
        ));
    }
    Ok(attrs)
}

pub(super) fn eval_chunk_from_wire(r: pb::EvalChunkResult) -> Result<EvalChunkOutput, WireError> {
    let attrs = r
        .attrs
        .into_iter()
        .map(|a| {
            check_len("an attribute name", &a.attr, lim::MAX_ATTR)?;
            // Empty on the wire: no derivation (the attribute failed to evaluate).
            let drv = (!a.drv_path.is_empty())
                .then(|| drv_path(&a.drv_path))
                .transpose()?;
            Ok(EvaluatedAttr {
                attr: a.attr,
                info: PackageInfo {
                    eval_error: truncate(a.error, lim::MAX_MESSAGE),
                    drv_path: drv,
                    outputs: outputs_from_wire(a.outputs)?,
                    pname: short(a.pname),
                    version: short(a.version),
                    position: short(a.position),
                    rev: short(a.rev),
                    system: short(a.system),
                    timeout_secs: a.timeout_secs,
                    max_silent_secs: a.max_silent_secs,
                    main_program: short(a.main_program),
                },
            })
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let mut drvs = BTreeMap::new();
    for d in r.drvs {
        let inputs = d
            .input_drvs
            .iter()
            .map(|i| drv_path(i))
            .collect::<Result<Vec<_>, _>>()?;
        drvs.insert(
            drv_path(&d.drv_path)?,
            DrvNode {
                system: short(d.system),
                features: d.features.into_iter().take(64).map(short).collect(),
                outputs: outputs_from_wire(d.outputs)?,
                input_drvs: inputs,
                fixed_output: d.fixed_output,
                output_hash: short(d.output_hash),
                hints: d
                    .hints
                    .into_iter()
                    .take(lim::MAX_HINTS)
                    .map(|h| truncate(h, lim::MAX_HINT))
                    .collect(),
                present: d.present,
            },
        );
    }
    Ok((attrs, drvs))
}

/// Bounded like everything an agent says: a count, and short names and texts.
pub(super) fn repo_checks(checks: Vec<pb::RepoCheck>) -> Vec<nixfarm_core::report::RepoCheck> {
    checks
        .into_iter()
        .take(MAX_REPO_CHECKS)
        .map(|c| nixfarm_core::report::RepoCheck {
            name: short(c.name),
            ok: c.ok,
            message: truncate(c.message, 2000),
        })
        .collect()
}
