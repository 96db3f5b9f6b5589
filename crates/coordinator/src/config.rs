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
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub scheduler: SchedulerConfig,
    pub limits: LimitsConfig,
}

/// Tokens; each is read from a file so it never sits in the config itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the token agents present (join token). Default: none (no check; loopback only).
    pub agent_token_file: Option<PathBuf>,
    /// File holding the token the CLI presents. Default: none (no check; loopback only).
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Attributes per evaluation task. Default 16.
    pub eval_chunk_size: usize,
    /// Memory cap per evaluation worker process, MiB (0: none). Default 4096.
    pub eval_memory_mib: u64,
    /// Infrastructure failures retried per job before it is reported. Default 3.
    pub max_infra_retries: i64,
    /// Runs evaluating or building at once. Default 64.
    pub max_runs_in_flight: usize,
    /// Seconds an agent may be silent before its jobs are requeued. Default 60.
    pub lease_secs: u64,
    /// Seconds between agent heartbeats. Default 10.
    pub heartbeat_secs: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            eval_chunk_size: 16,
            eval_memory_mib: 4096,
            max_infra_retries: 3,
            max_runs_in_flight: 64,
            lease_secs: 60,
            heartbeat_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest source snapshot accepted, bytes. Default 268435456 (256 MiB).
    pub snapshot_max_bytes: u64,
    /// Most files in one snapshot. Default 100000.
    pub snapshot_max_files: usize,
    /// Largest gRPC message accepted, bytes. Default 67108864 (64 MiB).
    pub max_message_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            snapshot_max_bytes: 256 << 20,
            snapshot_max_files: 100_000,
            max_message_bytes: 64 << 20,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7420".into(),
            state_dir: "/var/lib/nixfarm".into(),
            metrics_listen: None,
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            scheduler: SchedulerConfig::default(),
            limits: LimitsConfig::default(),
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
        source: toml::de::Error,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }
}

/// Reads a secret from a file, trimmed; the value is never logged.
pub fn read_secret(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: Config =
            toml::from_str("listen = \"0.0.0.0:1\"\n[scheduler]\nlease_secs = 5\n").unwrap();
        assert_eq!(c.listen, "0.0.0.0:1");
        assert_eq!(c.scheduler.lease_secs, 5);
        assert_eq!(c.scheduler.eval_chunk_size, 16);
        let err = toml::from_str::<Config>("lisen = \"x\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
