//! The coordinator's configuration file (TOML). Every field has a default; unknown fields
//! are refused so a typo is an error, not a silently ignored setting.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `nixfarm-coordinator.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port the gRPC server listens on. Default `127.0.0.1:7420`.
    pub listen: String,
    /// Directory for the SQLite database and uploaded snapshots. Default `/var/lib/nixfarm`.
    pub state_dir: PathBuf,
    /// Address of the Prometheus `/metrics` endpoint (plain HTTP). Default: none (off).
    pub metrics_listen: Option<String>,
    /// Accept local flake references (`path:`, `git+file:`, `file:`, `flake:` registry names),
    /// which agents resolve on their own disk. Only for a single-user farm whose agents also
    /// set it; `nixfarm local` turns it on for its embedded coordinator. Default false: only
    /// remote references (github:, gitlab:, sourcehut:, git+https://, https://) and uploads.
    pub allow_local_flake_refs: bool,
    /// The caches runs may name (`--cache`), each as the CLI gives it (`cachix://NAME`,
    /// `https://…`, `file://…`; a trailing `/` aside). Agents substitute from a
    /// run's cache as root, into stores that later runs reuse: whoever chooses it could plant
    /// paths other runs take as built. On a farm whose client token several people hold,
    /// list the caches you trust. Default: empty, any cache (a client token is then a Nix
    /// trusted user's power).
    pub run_caches: Vec<String>,
    /// The public keys runs may give agents to trust (`--trusted-public-key`), as
    /// `NAME:BASE64`. Default: empty, any key.
    pub run_cache_keys: Vec<String>,
    /// Not read from the file: set by `nixfarm local`, whose agents share this machine's
    /// store (so cross-checked builds can hand outputs over without the farm cache).
    #[serde(skip)]
    pub agents_share_store: bool,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub scheduler: SchedulerConfig,
    pub limits: LimitsConfig,
    pub farm_cache: FarmCacheConfig,
    pub http: HttpConfig,
}

/// The web UI, its JSON API and readiness badges (plain HTTP; put a TLS proxy in front of it
/// beyond a trusted network). With `[auth] client_token_file` set, every page and API call
/// needs that token: a bearer header, or the login form's cookie.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address and port of the web UI, e.g. `127.0.0.1:7422`. Default: none (off).
    pub listen: Option<String>,
    /// Offer a cancel button on running runs (a POST form with a CSRF token). Default false:
    /// the UI is read-only.
    pub allow_cancel: bool,
    /// Serve `/badge/…svg` without the client token, so a public README can show it (a
    /// badge tells the ready count and nothing else). Default false.
    pub public_badges: bool,
    /// Reverse proxies in front of the web UI, as addresses or ranges (`"127.0.0.1"`,
    /// `"10.0.0.0/8"`, `"::1"`). A request from one of them is counted against the client
    /// its `X-Forwarded-For` names (the nearest hop that is not such a proxy), so the limit
    /// on wrong tokens holds back that client, not everyone behind the proxy. Default none:
    /// `X-Forwarded-For` is ignored (anyone could write it). At most 64 entries.
    #[serde(deserialize_with = "proxies")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// `trusted_proxies`: addresses or CIDR ranges, each checked at load.
fn proxies<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.len() > 64 {
        return Err(serde::de::Error::custom(
            "at most 64 trusted proxies (use ranges)",
        ));
    }
    list.iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "'{}' is not an IP address or a range like 10.0.0.0/8",
                        nixfarm_core::limits::clip(s, 60)
                    ))
                })
        })
        .collect()
}

/// The coordinator's own binary cache, which agents move derivations and outputs through
/// when a run names no cache: a farm of hosts that share nothing but the coordinator needs
/// no other infrastructure. Served over HTTP (TLS when the gRPC services have it); agents
/// show the token the coordinator issued them at registration, or their own token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FarmCacheConfig {
    /// Serve it. Default true (`nixfarm local`, whose agents share one store, turns it off).
    pub enabled: bool,
    /// Address and port it listens on. Default: the gRPC `listen` address with port 0 (any
    /// free port; agents are told which).
    pub listen: Option<String>,
    /// Largest NAR accepted, bytes. Default 68719476736 (64 GiB); 1 MiB to 1 TiB.
    pub max_nar_bytes: u64,
    /// NAR bytes kept at most: past it the least recently used paths are evicted, never
    /// those of a run still going nor any used in the last ten minutes. Default
    /// 21474836480 (20 GiB); at least 16 MiB.
    pub max_bytes: u64,
}

impl Default for FarmCacheConfig {
    fn default() -> Self {
        FarmCacheConfig {
            enabled: true,
            listen: None,
            max_nar_bytes: 64 << 30,
            max_bytes: 20 << 30,
        }
    }
}

/// Tokens; each is read from a file so it never sits in the config itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the token agents present (join token). Read again within two seconds of
    /// a change (once it stood still for a second): replaced, the agents admitted by the old one are cut off (an empty or
    /// unreadable file keeps the old one). Default: none (no check; loopback only).
    pub agent_token_file: Option<PathBuf>,
    /// File of tokens each bound to one agent: a `NAME TOKEN` line per agent (tokens at
    /// least 16 characters). An agent presenting one may register, claim uploads and so
    /// answer evaluation only under its own name (what `cross_check_evaluation` relies on
    /// to tell two agents apart); the join token, if also set, still admits any name.
    /// Read again within two seconds of a change (once it stood still for a second): an
    /// agent whose token went or changed is cut off (its jobs requeued, its farm cache
    /// token withdrawn); an edit that cannot be read keeps the tokens read before.
    /// Default: none.
    pub agent_tokens_file: Option<PathBuf>,
    /// File holding the token the CLI (and the web UI's login) presents. Read again within
    /// two seconds of a change (once it stood still for a second): requests with the old
    /// token, or a browser's session of it, are refused from then on, and streams opened
    /// with it (a live page, `nixfarm watch`) end within seconds (an empty or unreadable
    /// file keeps the old one). Default: none (no check;
    /// loopback only).
    pub client_token_file: Option<PathBuf>,
}

/// TLS for every gRPC connection (rustls). Default: off (plain HTTP/2, loopback only).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the coordinator. Setting it (with `key_file`) turns TLS on.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the coordinator.
    pub key_file: Option<PathBuf>,
    /// PEM CA that signs agents' client certificates (mTLS): an agent that presents one is
    /// admitted without the join token. Default: none.
    pub client_ca_file: Option<PathBuf>,
    /// Client certificates no longer admitted, one SHA-256 fingerprint per line (as
    /// `openssl x509 -noout -fingerprint -sha256 -in CERT` prints it, or 64 hex digits);
    /// `#` starts a comment. Read again within two seconds of a change: a revoked
    /// certificate is refused, its agent cut off (its jobs go back to the queue) and its
    /// farm cache token withdrawn. An edit that cannot be read keeps what was revoked
    /// before. Needs `client_ca_file`. Default: none.
    pub revoked_certs_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Attributes per evaluation task. Default 16.
    pub eval_chunk_size: usize,
    /// A repository of at most this many attributes is evaluated by the Nix process that
    /// lists it, with no evaluation tasks after (one process instead of several: most
    /// repositories are this small). Its memory is capped by `eval_memory_mib`; past the cap
    /// the attributes are evaluated by tasks after all. 0: never. Default 32.
    pub list_eval_max: u32,
    /// Memory cap per evaluation worker process, MiB (0: none). Default 4096.
    pub eval_memory_mib: u64,
    /// Infrastructure failures retried per job before it is reported. Default 3.
    pub max_infra_retries: i64,
    /// Runs evaluating or building at once. Default 64.
    pub max_runs_in_flight: usize,
    /// Seconds an agent may be silent before its jobs are requeued (and gone before its
    /// issued farm cache token lapses). Default 60.
    pub lease_secs: u64,
    /// Seconds between agent heartbeats. Default 10.
    pub heartbeat_secs: u64,
    /// Of equally urgent derivations, give an agent the one whose inputs it built (they are
    /// in its store; nothing travels through a cache). Never delays a more urgent one.
    /// Default true.
    pub locality: bool,
    /// Have every evaluation task (the attribute listing included) answered by two
    /// different agents, and take an answer only when both agree: an agent that lies about
    /// which derivation a package evaluates to (or hides a package) then fails the run
    /// instead of having the farm build and sign what it chose. Doubles the evaluation
    /// work, adds one evaluation's time before builds start, and a run waits until two
    /// agents are connected. Both cross-checks count agents by credential: two names on one
    /// join token (or one client certificate) are one holder, so each agent needs a token
    /// (`[auth] agent_tokens_file`) or a certificate of its own. Default false.
    pub cross_check_evaluation: bool,
    /// Have every derivation an agent builds (fixed-output ones aside, whose hash already
    /// checks them) built again by a different agent, which fetches the first agent's
    /// outputs from the cache and compares them with its own (`nix-store --check`): an
    /// agent that pushes something other than what the derivation builds is caught, and so
    /// is a build that is not reproducible. A derivation counts as built, and its dependents
    /// start, only once the two agree; otherwise its package is `not-reproducible`. With
    /// the farm cache on, a run's own cache (`--cache`) gets only checked outputs: the first
    /// agent pushes to the farm cache, and the checking agent publishes its own copy. About
    /// doubles the build work. Default false.
    pub cross_check_builds: bool,
    /// Longest time, seconds, a cross-check (an evaluation answer or a build to compare)
    /// may wait with no agent connected that could take it (another credential; for a
    /// build, one that builds its system and features): a run would otherwise wait for
    /// ever. While such an agent is connected, if busy, the check waits its turn. Past it
    /// the evaluation fails the run, and the build counts as an infrastructure failure,
    /// both saying why. Default 600; 10 to 86400.
    pub cross_check_wait_secs: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            eval_chunk_size: 16,
            list_eval_max: 32,
            eval_memory_mib: 4096,
            max_infra_retries: 3,
            max_runs_in_flight: 64,
            lease_secs: 60,
            heartbeat_secs: 10,
            locality: true,
            cross_check_evaluation: false,
            cross_check_builds: false,
            cross_check_wait_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest source snapshot accepted (sum of its file sizes), bytes. The CLI and agents are
    /// told it. Default 268435456 (256 MiB); 1 MiB to 4 GiB.
    pub snapshot_max_bytes: u64,
    /// Most files in one snapshot. Default 100000; 1 to 1000000.
    pub snapshot_max_files: usize,
    /// Largest gRPC message accepted, bytes (from agents; the CLI's messages are held to at
    /// most 4 MiB, uploads come in 1 MiB chunks). Default 67108864 (64 MiB); 1 MiB to 1 GiB.
    pub max_message_bytes: usize,
    /// Snapshot uploads in progress at once, from all clients. Default 16; 1 to 1024.
    pub max_concurrent_uploads: usize,
    /// Snapshot uploads in progress at once from one client address. Default 4.
    pub max_uploads_per_client: usize,
    /// Seconds an upload may go without sending 64 KiB (or ending) before it is aborted:
    /// empty or tiny chunks do not keep it going. Default 30.
    pub upload_idle_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            snapshot_max_bytes: 256 << 20,
            snapshot_max_files: 100_000,
            max_message_bytes: 64 << 20,
            max_concurrent_uploads: 16,
            max_uploads_per_client: 4,
            upload_idle_secs: 30,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7420".into(),
            state_dir: "/var/lib/nixfarm".into(),
            metrics_listen: None,
            allow_local_flake_refs: false,
            run_caches: Vec::new(),
            run_cache_keys: Vec::new(),
            agents_share_store: false,
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            scheduler: SchedulerConfig::default(),
            limits: LimitsConfig::default(),
            farm_cache: FarmCacheConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid coordinator config: {source}")]
    Parse {
        path: PathBuf,
        source: nixfarm_core::config_text::TomlError,
    },
    #[error("config: {field} = {value} is out of range: {allowed}")]
    Range {
        field: &'static str,
        value: String,
        allowed: String,
    },
    #[error(
        "{0} is empty: a token file must hold the token (an empty one would turn authentication off)"
    )]
    EmptySecret(PathBuf),
    #[error("config: {field} {why}")]
    Needs {
        field: &'static str,
        why: &'static str,
    },
    #[error("config: {field} holds '{value}', which is not {what}")]
    NotA {
        field: &'static str,
        value: String,
        what: &'static str,
    },
}

/// Checks that `value` lies in `lo..=hi`.
fn range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: T,
    lo: T,
    hi: T,
) -> Result<(), ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError::Range {
            field,
            value: value.to_string(),
            allowed: format!("{lo} to {hi}"),
        });
    }
    Ok(())
}

impl Config {
    /// Range-checks every numeric field, naming the field and the allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls.revoked_certs_file.is_some() && self.tls.client_ca_file.is_none() {
            return Err(ConfigError::Needs {
                field: "[tls] revoked_certs_file",
                why: "needs [tls] client_ca_file: without client certificates there is nothing to revoke",
            });
        }
        // A typo would refuse every run that names the cache meant.
        for c in &self.run_caches {
            if nixfarm_core::cache_url::CacheTarget::parse(c).is_err() {
                return Err(ConfigError::NotA {
                    field: "run_caches",
                    value: nixfarm_core::limits::clip(c, 200).into(),
                    what: "a cache URL (cachix://NAME, https://…, file://…)",
                });
            }
        }
        for k in &self.run_cache_keys {
            if !nixfarm_core::cache_url::is_public_key(k) {
                return Err(ConfigError::NotA {
                    field: "run_cache_keys",
                    value: nixfarm_core::limits::clip(k, 120).into(),
                    what: "a public key (NAME:BASE64)",
                });
            }
        }
        let s = &self.scheduler;
        range("[scheduler] eval_chunk_size", s.eval_chunk_size, 1, 10_000)?;
        range("[scheduler] list_eval_max", s.list_eval_max, 0, 10_000)?;
        if s.eval_memory_mib != 0 {
            range(
                "[scheduler] eval_memory_mib",
                s.eval_memory_mib,
                256,
                1 << 20,
            )
            .map_err(|e| with_note(e, " (or 0 for no cap)"))?;
        }
        range("[scheduler] max_infra_retries", s.max_infra_retries, 0, 100)?;
        range(
            "[scheduler] max_runs_in_flight",
            s.max_runs_in_flight,
            1,
            100_000,
        )?;
        range("[scheduler] heartbeat_secs", s.heartbeat_secs, 1, 3600)?;
        range(
            "[scheduler] lease_secs",
            s.lease_secs,
            (2 * s.heartbeat_secs).max(2),
            86_400,
        )
        .map_err(|e| with_note(e, " (at least twice heartbeat_secs)"))?;
        range(
            "[scheduler] cross_check_wait_secs",
            s.cross_check_wait_secs,
            10,
            86_400,
        )?;
        let l = &self.limits;
        range(
            "[limits] snapshot_max_bytes",
            l.snapshot_max_bytes,
            1 << 20,
            nixfarm_core::snapshot::Limits::MAX_BYTES,
        )?;
        range(
            "[limits] snapshot_max_files",
            l.snapshot_max_files,
            1,
            nixfarm_core::snapshot::Limits::MAX_ENTRIES,
        )?;
        range(
            "[limits] max_message_bytes",
            l.max_message_bytes,
            1 << 20,
            1 << 30,
        )?;
        range(
            "[limits] max_concurrent_uploads",
            l.max_concurrent_uploads,
            1,
            1024,
        )?;
        range(
            "[limits] max_uploads_per_client",
            l.max_uploads_per_client,
            1,
            l.max_concurrent_uploads.max(1),
        )
        .map_err(|e| with_note(e, " (at most max_concurrent_uploads)"))?;
        range("[limits] upload_idle_secs", l.upload_idle_secs, 1, 3600)?;
        range(
            "[farm_cache] max_nar_bytes",
            self.farm_cache.max_nar_bytes,
            1 << 20,
            1 << 40,
        )?;
        range(
            "[farm_cache] max_bytes",
            self.farm_cache.max_bytes,
            16 << 20,
            u64::MAX,
        )?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        nixfarm_core::config_text::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }
}

fn with_note(e: ConfigError, note: &str) -> ConfigError {
    match e {
        ConfigError::Range {
            field,
            value,
            allowed,
        } => ConfigError::Range {
            field,
            value,
            allowed: allowed + note,
        },
        e => e,
    }
}

/// Reads a secret from a file, trimmed; the value is never logged. An empty (or white space
/// only) file is an error: it must never mean "no authentication".
pub fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let s = std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
    if s.is_empty() {
        return Err(ConfigError::EmptySecret(path.into()));
    }
    if let Some(why) = nixfarm_core::config_text::world_readable(path) {
        tracing::warn!("{why}");
    }
    Ok(s)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
