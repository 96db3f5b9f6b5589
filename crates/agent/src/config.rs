//! The agent's configuration (TOML file, flags and environment).

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `nixfarm-agent.toml`. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Coordinator URL. Default `http://127.0.0.1:7420`.
    pub coordinator: String,
    /// Name the agent registers under; unique per farm. Default: the host name.
    pub name: String,
    /// File holding the join token (or env `NIXFARM_AGENT_TOKEN`). Default: none.
    pub token_file: Option<PathBuf>,
    /// Systems this agent builds for. Default `["x86_64-linux"]`.
    pub systems: Vec<String>,
    /// System features offered (`requiredSystemFeatures`). Default `["big-parallel", "benchmark", "nixos-test"]`, plus `kvm` when /dev/kvm exists.
    pub features: Vec<String>,
    /// Jobs run at once. Default: the number of CPUs.
    pub max_jobs: u32,
    /// Evaluation worker processes per evaluation job. Default 2.
    pub eval_workers: usize,
    /// Seconds one evaluation process may run (a repository that imports from derivations
    /// builds while it evaluates); past it the attributes it held fail, one by one.
    /// Default 3600.
    pub eval_timeout_secs: u64,
    /// Scratch directory for unpacked sources. Default `/var/lib/nixfarm-agent`.
    pub work_dir: PathBuf,
    /// Directory holding `nix` and `nix-store`. Default: empty, found through PATH.
    pub nix_bin: PathBuf,
    /// Nix secret key file used to sign what this agent pushes to a binary cache. Default: none.
    pub signing_key_file: Option<PathBuf>,
    /// Seconds a draining agent waits for running jobs before handing them back. Default 600.
    pub drain_timeout_secs: u64,
    /// Bytes of live log streamed to the coordinator per job. Default 1048576 (1 MiB).
    pub log_limit_bytes: usize,
    /// MiB that must stay free in /nix/store's file system; below it the agent takes no new
    /// jobs (running ones go on) until space is freed. 0: no check. Default 512.
    pub min_free_mib: u64,
    /// PEM CA that signed the coordinator's certificate (https:// URLs). Default: none, which
    /// means the public web PKI roots.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mTLS (the coordinator's `tls.client_ca_file` signs it).
    /// Default: none.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM key of `tls_cert_file`. Default: none.
    pub tls_key_file: Option<PathBuf>,
    /// Evaluate local flake references (`path:`, `git+file:`, `file:`, `flake:` registry
    /// names), which read this host's own disk. Only for a single-user farm whose coordinator
    /// allows them too; `nixfarm local` sets it for its own agents. Default false.
    pub allow_local_flake_refs: bool,
    /// Run anyway where evaluations, smoke tests and builds in its own store cannot be
    /// isolated from this host's secret files (this process cannot make a user namespace
    /// with mount, PID and network namespaces and a /proc of its own): a repository's code
    /// can then read whatever the agent's user can, its token and signing key included.
    /// Refused to start by default. Default false.
    pub allow_unisolated_evaluation: bool,
    /// Send the join token to an `http://` coordinator beyond this machine, in clear:
    /// anyone on the path reads it. Refused by default; for a network you trust (a podman
    /// network on one host, say). Loopback is always allowed. Default false.
    pub allow_plain_http: bool,
    /// Directory of this agent's GC roots: one subdirectory per run, holding what the run
    /// still needs (its derivations and outputs), removed when the run ends. Nix honours it
    /// only below its `gcroots` directory. Default
    /// `/nix/var/nix/gcroots/per-user/$USER/nixfarm-NAME`.
    pub gc_roots_dir: Option<PathBuf>,
    /// Cachix API roots besides Cachix's own (`https://app.cachix.org/api/v1/`) that this
    /// agent sends its `CACHIX_AUTH_TOKEN` to. A run's `cachix://NAME?api=URL` names the API
    /// it pushes through; with any other, this agent refuses the push rather than hand its
    /// token to whoever submitted the run. Default: none.
    pub cachix_api_urls: Vec<String>,
    /// The run caches (`--cache` URLs, as runs give them: `cachix://NAME`, `https://…`)
    /// this agent substitutes from, as root, into a store that later runs reuse. Listed,
    /// the coordinator gives it jobs only of runs with one of them or with none of their own
    /// (their things move through the farm cache, or a store the agents share), and it
    /// refuses any other (a coordinator from before the list would keep sending them, each
    /// refused as an infrastructure failure). Default: empty, any run's cache.
    pub run_caches: Vec<String>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}

impl Default for AgentConfig {
    fn default() -> Self {
        let mut features: Vec<String> = ["big-parallel", "benchmark", "nixos-test"]
            .map(String::from)
            .to_vec();
        if Path::new("/dev/kvm").exists() {
            features.push("kvm".into());
        }
        AgentConfig {
            coordinator: "http://127.0.0.1:7420".into(),
            name: hostname(),
            token_file: None,
            systems: vec!["x86_64-linux".into()],
            features,
            max_jobs: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            eval_workers: 2,
            eval_timeout_secs: 3600,
            work_dir: "/var/lib/nixfarm-agent".into(),
            nix_bin: PathBuf::new(),
            signing_key_file: None,
            drain_timeout_secs: 600,
            log_limit_bytes: 1 << 20,
            min_free_mib: 512,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            allow_local_flake_refs: false,
            allow_unisolated_evaluation: false,
            allow_plain_http: false,
            gc_roots_dir: None,
            cachix_api_urls: Vec::new(),
            run_caches: Vec::new(),
        }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        nixfarm_core::config_text::parse(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a valid agent config: {e}", path.display()))
    }

    /// The directory the farm cache's credentials are written to for Nix (a netrc file):
    /// covered whole, so a new netrc renamed into it stays covered for a process already
    /// running (a rename over a covered file would lift that file's cover).
    pub fn farm_cache_dir(&self) -> PathBuf {
        self.work_dir.join("farm-cache")
    }

    /// Where the farm cache's credentials are written for Nix.
    pub fn farm_netrc(&self) -> PathBuf {
        self.farm_cache_dir().join("netrc")
    }

    /// What evaluations may not read (see `nixfarm_nix::isolation`): this agent's secret files
    /// and the host's usual secret places. None for a single user's own farm
    /// (`allow_local_flake_refs`), or where this process cannot make the namespaces and
    /// `allow_unisolated_evaluation` says to go on (said once, at start); without it, an
    /// error naming the ways out.
    pub fn isolation(&self) -> anyhow::Result<Option<std::sync::Arc<Vec<PathBuf>>>> {
        if self.allow_local_flake_refs {
            return Ok(None);
        }
        if !nixfarm_nix::isolation::can_isolate() {
            let why = "this agent cannot make a user namespace with mount, PID and network namespaces and a /proc of its own, where evaluations, smoke tests and its own store's builds run without its secret files (it needs util-linux 2.38 or later (unshare, setpriv, mount); a systemd unit must allow the namespaces and a container must unmask /proc: deploy/README.md)";
            if !self.allow_unisolated_evaluation {
                anyhow::bail!(
                    "{why}. Fix that, or set allow_unisolated_evaluation = true to run anyway: a repository's code could then read whatever the agent's user can, its token and signing key included"
                );
            }
            tracing::warn!(
                "{why}; running anyway (allow_unisolated_evaluation): a repository's code can read whatever the agent's user can, its token files included"
            );
            return Ok(None);
        }
        // Made now, so it is covered from the first evaluation on.
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(self.farm_cache_dir())
                .map_err(|e| {
                    anyhow::anyhow!("cannot make {}: {e}", self.farm_cache_dir().display())
                })?;
        }
        // Where agents before it kept the netrc (its own token in it), uncovered now.
        for old in ["farm-cache.netrc", "farm-cache.tmp"] {
            let old = self.work_dir.join(old);
            match std::fs::remove_file(&old) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    anyhow::bail!("cannot remove {} (a token is in it): {e}", old.display())
                }
                _ => {}
            }
        }
        // The agent's process (its environment holds its tokens) is not in the PID namespace
        // an evaluation runs in.
        let mut own = vec![self.farm_cache_dir()];
        own.extend(self.token_file.iter().cloned());
        own.extend(self.signing_key_file.iter().cloned());
        own.extend(self.tls_key_file.iter().cloned());
        for var in ["CACHIX_AUTH_TOKEN_FILE", "CACHIX_SIGNING_KEY_FILE"] {
            own.extend(std::env::var_os(var).map(PathBuf::from));
        }
        own.extend(unused_roots(WHOLE_IF_UNUSED, &self.used_paths()));
        Ok(Some(std::sync::Arc::new(own)))
    }

    /// What this agent and the Nix it runs read or write outside the store: its work
    /// directory, home, caches, temporary files, Nix's and TLS's files, its programs.
    fn used_paths(&self) -> Vec<PathBuf> {
        let mut used = vec![self.work_dir.clone(), self.nix_bin.clone()];
        used.extend(self.tls_ca_file.iter().cloned());
        for var in [
            "HOME",
            "XDG_CACHE_HOME",
            "XDG_CONFIG_HOME",
            "XDG_DATA_HOME",
            "XDG_STATE_HOME",
            "TMPDIR",
            "NIX_CONF_DIR",
            "NIX_STATE_DIR",
            "NIX_STORE_DIR",
            "NIX_LOG_DIR",
            "NIX_SSL_CERT_FILE",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "CURL_CA_BUNDLE",
        ] {
            used.extend(std::env::var_os(var).map(PathBuf::from));
        }
        for list in ["PATH", "NIX_USER_CONF_FILES"] {
            if let Some(paths) = std::env::var_os(list) {
                used.extend(std::env::split_paths(&paths));
            }
        }
        used.extend(std::env::current_dir().ok());
        used.retain(|p| p.is_absolute());
        used
    }

    /// The join token: `NIXFARM_AGENT_TOKEN`, else the token file.
    /// Reads the cache credentials: `CACHIX_AUTH_TOKEN` (or `CACHIX_AUTH_TOKEN_FILE`), and
    /// the signing key from `CACHIX_SIGNING_KEY` or `signing_key_file`.
    pub fn cache_credentials(&self) -> anyhow::Result<CacheCredentials> {
        let from_env_or_file = |var: &str| -> anyhow::Result<Option<String>> {
            if let Ok(v) = std::env::var(var)
                && !v.trim().is_empty()
            {
                return Ok(Some(v.trim().to_string()));
            }
            if let Ok(f) = std::env::var(format!("{var}_FILE")) {
                let v = std::fs::read_to_string(&f)
                    .map_err(|e| anyhow::anyhow!("cannot read {var}_FILE {f}: {e}"))?;
                return Ok(Some(v.trim().to_string()));
            }
            Ok(None)
        };
        let key = match (
            &self.signing_key_file,
            from_env_or_file("CACHIX_SIGNING_KEY")?,
        ) {
            (Some(f), _) => Some(nixfarm_store::narinfo::Key::from_file(f)?),
            (None, Some(k)) => Some(
                nixfarm_store::narinfo::Key::parse(&k)
                    .map_err(|e| anyhow::anyhow!("CACHIX_SIGNING_KEY: {e}"))?,
            ),
            (None, None) => None,
        };
        Ok(CacheCredentials {
            cachix_token: from_env_or_file("CACHIX_AUTH_TOKEN")?,
            key,
        })
    }

    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Ok(t) = std::env::var("NIXFARM_AGENT_TOKEN")
            && !t.trim().is_empty()
        {
            return Ok(Some(t.trim().to_string()));
        }
        match &self.token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", p.display()))?
                    .trim()
                    .to_string();
                if t.is_empty() {
                    anyhow::bail!("token file {} is empty", p.display());
                }
                if let Some(why) = nixfarm_core::config_text::world_readable(p) {
                    tracing::warn!("{why}");
                }
                Ok(Some(t))
            }
            None => Ok(None),
        }
    }

    /// Range-checks the numeric fields and the name, naming the field and what is allowed.
    pub fn validate(&self) -> anyhow::Result<()> {
        fn range<T: PartialOrd + std::fmt::Display>(
            f: &str,
            v: T,
            lo: T,
            hi: T,
        ) -> anyhow::Result<()> {
            if v < lo || v > hi {
                anyhow::bail!("config: {f} = {v} is out of range: {lo} to {hi}");
            }
            Ok(())
        }
        range("max_jobs", self.max_jobs, 1, 4096)?;
        range("eval_workers", self.eval_workers, 1, 256)?;
        range("eval_timeout_secs", self.eval_timeout_secs, 10, 7 * 86_400)?;
        range("drain_timeout_secs", self.drain_timeout_secs, 0, 7 * 86_400)?;
        range("log_limit_bytes", self.log_limit_bytes, 0, 64 << 20)?;
        if self.name.is_empty()
            || self.name.len() > 255
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            anyhow::bail!(
                "config: name '{}' is not usable: 1 to 255 letters, digits and - _ . @",
                nixfarm_core::limits::clip(&self.name, 64)
            );
        }
        if self.systems.is_empty() {
            anyhow::bail!("config: systems is empty: an agent builds for at least one system");
        }
        if self.run_caches.len() > nixfarm_core::limits::MAX_AGENT_RUN_CACHES {
            anyhow::bail!(
                "config: run_caches lists more than {} caches",
                nixfarm_core::limits::MAX_AGENT_RUN_CACHES
            );
        }
        // A typo would leave every run with that cache waiting for another agent.
        if let Some(bad) = self
            .run_caches
            .iter()
            .find(|c| nixfarm_core::cache_url::CacheTarget::parse(c).is_err())
        {
            anyhow::bail!(
                "config: run_caches holds '{}', which is not a cache URL (cachix://NAME, https://…, file://…)",
                nixfarm_core::limits::clip(bad, 200)
            );
        }
        Ok(())
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

/// Directories an evaluation, a build or a smoke test of a repository needs nothing from
/// (other users' homes, mounted disks): covered whole unless the agent uses something
/// beneath one. Not `/srv`: a run's `file://` cache there is read by Nix.
const WHOLE_IF_UNUSED: &[&str] = &["/home", "/mnt", "/media"];

/// Those of `roots` that exist and hold none of `used` (links resolved on both sides).
fn unused_roots(roots: &[&str], used: &[PathBuf]) -> Vec<PathBuf> {
    let used: Vec<PathBuf> = used
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .filter(|r| r.is_dir() && !used.iter().any(|u| u.starts_with(r)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_fields() {
        let c: AgentConfig =
            toml::from_str("coordinator = \"http://c:1\"\nmax_jobs = 3\n").unwrap();
        assert_eq!(c.max_jobs, 3);
        assert_eq!(c.systems, vec!["x86_64-linux"]);
        assert!(toml::from_str::<AgentConfig>("max_job = 3").is_err());
    }

    /// A directory is covered whole only when nothing the agent uses lies beneath it (links
    /// resolved), and when it exists.
    #[test]
    fn a_root_is_covered_whole_only_when_the_agent_uses_nothing_beneath_it() {
        let dir = tempfile::tempdir().unwrap();
        let (homes, srv, none) = (
            dir.path().join("home"),
            dir.path().join("srv"),
            dir.path().join("none"),
        );
        std::fs::create_dir_all(homes.join("alice/work")).unwrap();
        std::fs::create_dir_all(homes.join("bob")).unwrap();
        std::fs::create_dir_all(&srv).unwrap();
        std::os::unix::fs::symlink(homes.join("alice/work"), dir.path().join("work-link")).unwrap();
        let roots = [
            homes.to_str().unwrap(),
            srv.to_str().unwrap(),
            none.to_str().unwrap(),
        ];
        assert_eq!(
            unused_roots(&roots, &[dir.path().join("elsewhere")]),
            vec![homes.clone(), srv.clone()]
        );
        // The agent's work directory (reached through a link) is in one: that one stays.
        assert_eq!(
            unused_roots(&roots, &[dir.path().join("work-link")]),
            vec![srv.clone()]
        );
        assert_eq!(unused_roots(&roots, &[homes.join("alice/work")]), vec![srv]);
    }

    /// What evaluations may not read: the farm cache's directory and the agent's secret
    /// files; a netrc an older agent left beside them (its own token in it) is removed.
    #[test]
    fn isolation_covers_the_secrets_and_removes_an_old_netrc() {
        let d = tempfile::tempdir().unwrap();
        let (work, key) = (d.path().join("work"), d.path().join("key"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("farm-cache.netrc"), "password s3cret\n").unwrap();
        let cfg = AgentConfig {
            work_dir: work.clone(),
            signing_key_file: Some(key.clone()),
            ..AgentConfig::default()
        };
        let own = cfg.isolation().unwrap().expect("root isolates here");
        assert!(
            own.contains(&work.join("farm-cache")) && own.contains(&key),
            "{own:?}"
        );
        assert!(work.join("farm-cache").is_dir());
        assert!(!work.join("farm-cache.netrc").exists());
        // A single user's own farm covers nothing.
        let local = AgentConfig {
            allow_local_flake_refs: true,
            ..cfg
        };
        assert!(local.isolation().unwrap().is_none());
    }

    #[test]
    fn the_join_token_goes_over_plain_http_only_to_this_machine_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let token = d.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let cfg = AgentConfig {
            coordinator: "http://farm.example.org:7420".into(),
            token_file: Some(token),
            work_dir: d.path().join("work"),
            gc_roots_dir: Some(d.path().join("roots")),
            ..AgentConfig::default()
        };
        let e = crate::Agent::new(cfg.clone()).err().unwrap().to_string();
        assert!(
            e.contains("in clear") && e.contains("allow_plain_http"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        assert!(
            !d.path().join("work").exists(),
            "refused before anything else"
        );
        // Allowed, it goes on (and creates its work directory).
        let allowed = AgentConfig {
            allow_plain_http: true,
            ..cfg
        };
        assert!(crate::Agent::new(allowed).is_ok());
        assert!(d.path().join("work").exists());
    }

    #[test]
    fn listed_run_caches_must_be_cache_urls() {
        let ok = AgentConfig {
            run_caches: vec!["cachix://team".into(), "https://c.example.org".into()],
            ..AgentConfig::default()
        };
        ok.validate().unwrap();
        let typo = AgentConfig {
            run_caches: vec!["cachix:/team".into()],
            ..AgentConfig::default()
        };
        let e = typo.validate().unwrap_err().to_string();
        assert!(
            e.contains("run_caches") && e.contains("cachix:/team"),
            "{e}"
        );
    }

    #[test]
    fn numbers_and_names_are_checked() {
        let ok = AgentConfig {
            name: "a1".into(),
            ..Default::default()
        };
        ok.validate().unwrap();
        for (c, field) in [
            (
                AgentConfig {
                    eval_timeout_secs: 1,
                    ..ok.clone()
                },
                "eval_timeout_secs",
            ),
            (
                AgentConfig {
                    max_jobs: 0,
                    ..ok.clone()
                },
                "max_jobs",
            ),
            (
                AgentConfig {
                    eval_workers: 0,
                    ..ok.clone()
                },
                "eval_workers",
            ),
            (
                AgentConfig {
                    name: "a b".into(),
                    ..ok.clone()
                },
                "name",
            ),
            (
                AgentConfig {
                    systems: vec![],
                    ..ok.clone()
                },
                "systems",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}

/// Secrets for pushing to caches. Debug never prints them.
#[derive(Clone, Default)]
pub struct CacheCredentials {
    pub cachix_token: Option<String>,
    pub key: Option<nixfarm_store::narinfo::Key>,
}

impl std::fmt::Debug for CacheCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheCredentials")
            .field("cachix_token", &self.cachix_token.as_ref().map(|_| "<set>"))
            .field("key", &self.key.as_ref().map(|k| k.name.clone()))
            .finish()
    }
}
