//! Build jobs as this agent takes them: each wire `BuildJob` is checked once, at the edge,
//! into a [`BuildJob`] of typed fields, or refused with what is wrong; past it, nothing
//! from the coordinator reaches Nix or the file system unchecked.

use nixfarm_nix::StorePath;
use nixfarm_nix::hash::{Algo, Hash};
use nixfarm_proto::v1 as pb;
use std::time::Duration;

/// The most outputs a check may be told the first build's NAR hashes of (as many as a
/// derivation may have in Nix's worker protocol here).
const MAX_EXPECTED: usize = 4096;
/// The most keys a job may name for its cache.
const MAX_KEYS: usize = 64;
/// The longest limit a job is given (a year): a longer one (a package's `meta.timeout`) is
/// this one.
const MAX_LIMIT_SECS: u64 = 365 * 24 * 3600;
/// The longest program name in `bin/` (a file name).
const MAX_PROGRAM: usize = 255;

/// What is wrong with a build job the coordinator sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JobError {
    #[error("the coordinator sent '{shown}' as a derivation to build: {why}")]
    Drv {
        shown: String,
        why: nixfarm_nix::StorePathError,
    },
    #[error(transparent)]
    Cache(#[from] nixfarm_core::cache_url::BadCacheUrl),
    #[error("the job names more than {MAX_KEYS} public keys for its cache")]
    TooManyKeys,
    #[error("the job's key '{0}' is not a public key (NAME:BASE64)")]
    Key(String),
    #[error("the job says what the first build got for more than {MAX_EXPECTED} outputs")]
    TooManyExpected,
    #[error("the job's first-build output '{shown}' is not a store path: {why}")]
    ExpectedPath {
        shown: String,
        why: nixfarm_nix::StorePathError,
    },
    #[error("the job's NAR hash of {0} is not a SHA-256")]
    ExpectedHash(StorePath),
    #[error("the job says twice what the first build of {0} got")]
    ExpectedTwice(StorePath),
}

/// Where a cross-checked build's outputs wait for their check (the wire's `HoldOutputs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Not held: pushed to the run's cache at once.
    None,
    /// In the coordinator's farm cache. Also what a value this agent does not know means:
    /// never the run's cache before the check.
    FarmCache,
    /// In the store the agents share.
    SharedStore,
    /// In the building agent's own store; the check builds again from scratch.
    BuilderStore,
}

impl From<i32> for Hold {
    fn from(v: i32) -> Self {
        match pb::HoldOutputs::try_from(v) {
            Ok(pb::HoldOutputs::None) => Hold::None,
            Ok(pb::HoldOutputs::SharedStore) => Hold::SharedStore,
            Ok(pb::HoldOutputs::BuilderStore) => Hold::BuilderStore,
            Ok(pb::HoldOutputs::FarmCache) | Err(_) => Hold::FarmCache,
        }
    }
}

/// An output of the derivation a check builds, and its NAR hash (SHA-256 digest) as the
/// first build, in its own store, reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expected {
    pub path: StorePath,
    pub nar_hash: Vec<u8>,
}

/// Running the built package's main program once it is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Smoke {
    /// `bin/<name>` of an output (meta.mainProgram); None: the only executable there (also
    /// for a name that is no file name in `bin/`).
    pub main_program: Option<String>,
}

/// A build job, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BuildJob {
    /// The derivation to build: a store path ending in `.drv`.
    pub drv: StorePath,
    /// The run's own cache (a URL nixfarm can use); None: the farm cache, or a shared store.
    pub cache: Option<String>,
    /// The keys its signatures are checked against (each `NAME:BASE64`, no whitespace).
    pub trusted_public_keys: Vec<String>,
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
    pub smoke: Option<Smoke>,
    /// Far off the run's longest chain: built at a lower CPU priority.
    pub background: bool,
    /// A cross-check: build again and compare.
    pub check: bool,
    pub hold: Hold,
    /// A check of outputs held in the builder's store: what that build got.
    pub expect: Vec<Expected>,
}

impl BuildJob {
    /// The run's cache URL as the helpers shared with evaluation jobs take it ("": none).
    pub fn cache_url(&self) -> &str {
        self.cache.as_deref().unwrap_or("")
    }
}

/// A run's trusted keys as the coordinator sends them: each becomes part of one Nix option,
/// which splits on whitespace.
pub(super) fn check_keys(keys: &[String]) -> Result<(), JobError> {
    if keys.len() > MAX_KEYS {
        return Err(JobError::TooManyKeys);
    }
    match keys
        .iter()
        .find(|k| k.len() > 1024 || !nixfarm_core::cache_url::is_public_key(k))
    {
        Some(k) => Err(JobError::Key(
            nixfarm_core::limits::clip(k, 200).to_string(),
        )),
        None => Ok(()),
    }
}

/// A limit in seconds, 0 for none, at most [`MAX_LIMIT_SECS`].
pub(super) fn limit(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs.min(MAX_LIMIT_SECS)))
}

impl TryFrom<pb::BuildJob> for BuildJob {
    type Error = JobError;

    fn try_from(j: pb::BuildJob) -> Result<Self, JobError> {
        let clip = |s: &str| nixfarm_core::limits::clip(s, 200).to_string();
        // The derivation goes to Nix as an argument and names files here (an argument
        // starting with `-` would be an option).
        let drv = StorePath::parse_drv(&j.drv_path).map_err(|why| JobError::Drv {
            shown: clip(&j.drv_path),
            why,
        })?;
        // The URL and keys become Nix options, which split on whitespace.
        let cache = if j.cache.is_empty() {
            None
        } else {
            nixfarm_core::cache_url::CacheTarget::parse(&j.cache)?;
            Some(j.cache)
        };
        check_keys(&j.trusted_public_keys)?;
        // A name that is no file name in bin/ (a package's meta, whatever it says) names
        // nothing there: the only executable is run, as when there is none.
        let smoke = j.smoke.then(|| {
            let p = j.main_program;
            let plain = !p.is_empty()
                && p.len() <= MAX_PROGRAM
                && p != "."
                && p != ".."
                && !p.chars().any(|c| c == '/' || c.is_control());
            Smoke {
                main_program: plain.then_some(p),
            }
        });
        if j.expect.len() > MAX_EXPECTED {
            return Err(JobError::TooManyExpected);
        }
        let mut expect: Vec<Expected> = Vec::with_capacity(j.expect.len());
        for o in &j.expect {
            let path = StorePath::parse(&o.path).map_err(|why| JobError::ExpectedPath {
                shown: clip(&o.path),
                why,
            })?;
            let nar_hash = Hash::parse(&o.nar_hash, None)
                .filter(|h| h.algo == Algo::Sha256)
                .map(|h| h.digest)
                .ok_or_else(|| JobError::ExpectedHash(path.clone()))?;
            if expect.iter().any(|e| e.path == path) {
                return Err(JobError::ExpectedTwice(path));
            }
            expect.push(Expected { path, nar_hash });
        }
        Ok(BuildJob {
            drv,
            cache,
            trusted_public_keys: j.trusted_public_keys,
            timeout: limit(j.timeout_secs),
            max_silent: limit(j.max_silent_secs),
            smoke,
            background: j.background,
            check: j.check,
            hold: Hold::from(j.hold),
            expect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv() -> String {
        format!("/nix/store/{}-x.drv", "0".repeat(32))
    }

    fn out(n: char) -> String {
        format!("/nix/store/{}-x", n.to_string().repeat(32))
    }

    fn sha256() -> String {
        Hash {
            algo: Algo::Sha256,
            digest: vec![7; 32],
        }
        .to_sri()
    }

    fn ok() -> pb::BuildJob {
        pb::BuildJob {
            drv_path: drv(),
            cache: "cachix://team".into(),
            trusted_public_keys: vec!["team-1:AAAA".into()],
            timeout_secs: 60,
            max_silent_secs: 0,
            smoke: true,
            main_program: "hello".into(),
            check: true,
            hold: pb::HoldOutputs::BuilderStore as i32,
            expect: vec![pb::DrvOutput {
                name: "out".into(),
                path: out('1'),
                nar_hash: sha256(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_job_becomes_typed_fields() {
        let j = BuildJob::try_from(ok()).unwrap();
        assert_eq!(j.drv.as_str(), drv());
        assert_eq!(j.cache_url(), "cachix://team");
        assert_eq!(j.timeout, Some(Duration::from_secs(60)));
        assert_eq!(j.max_silent, None);
        assert_eq!(
            j.smoke,
            Some(Smoke {
                main_program: Some("hello".into())
            })
        );
        assert_eq!(j.hold, Hold::BuilderStore);
        assert_eq!(j.expect[0].path.as_str(), out('1'));
        assert_eq!(j.expect[0].nar_hash, vec![7; 32]);
        let plain = BuildJob::try_from(pb::BuildJob {
            drv_path: drv(),
            hold: 99,
            ..Default::default()
        })
        .unwrap();
        assert_eq!((plain.cache, plain.smoke), (None, None));
        // A way to hold outputs this agent does not know: never the run's cache.
        assert_eq!(plain.hold, Hold::FarmCache);
    }

    #[test]
    fn what_would_reach_nix_or_the_file_system_wrong_is_refused() {
        type Edit = Box<dyn Fn(&mut pb::BuildJob)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "as a derivation",
                Box::new(|j| j.drv_path = "--option".into()),
            ),
            ("as a derivation", Box::new(|j| j.drv_path = out('1'))),
            (
                "unsupported cache URL",
                Box::new(|j| j.cache = "https://c.example extra-substituters".into()),
            ),
            (
                "not a public key",
                Box::new(|j| j.trusted_public_keys = vec!["a:b c:d".into()]),
            ),
            (
                "more than 64",
                Box::new(|j| j.trusted_public_keys = vec!["a:b".into(); 65]),
            ),
            (
                "not a store path",
                Box::new(|j| j.expect[0].path = "/etc".into()),
            ),
            (
                "not a SHA-256",
                Box::new(|j| j.expect[0].nar_hash = "md5:x".into()),
            ),
            (
                "says twice",
                Box::new(|j| {
                    let again = j.expect[0].clone();
                    j.expect.push(again)
                }),
            ),
            (
                "more than 4096",
                Box::new(|j| j.expect = vec![j.expect[0].clone(); 4097]),
            ),
        ];
        for (said, edit) in cases {
            let mut j = ok();
            edit(&mut j);
            let e = BuildJob::try_from(j).unwrap_err().to_string();
            assert!(e.contains(said), "{said}: {e}");
        }
        // A program name that is no file name in bin/ names nothing: the only executable
        // is run. A limit past a year is a year.
        for odd in ["../../bin/sh", "..", "."] {
            let mut j = ok();
            j.main_program = odd.into();
            j.timeout_secs = u64::MAX;
            let j = BuildJob::try_from(j).unwrap();
            assert_eq!(j.smoke, Some(Smoke { main_program: None }), "{odd}");
            assert_eq!(j.timeout, Some(Duration::from_secs(MAX_LIMIT_SECS)));
        }
        let mut j = ok();
        j.smoke = false;
        assert_eq!(BuildJob::try_from(j).unwrap().smoke, None);
    }
}
