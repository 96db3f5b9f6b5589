//! Reaching the coordinator: where it is (flags, environment, config file), its token and
//! CA, and one client that attaches the token to every call.

use crate::Cli;
use anyhow::Context;
use nixfarm_proto::v1::run_service_client::RunServiceClient;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;

/// `~/.config/nixfarm/config.toml`.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct CliConfig {
    /// Coordinator URL.
    coordinator: Option<String>,
    /// File holding the client token.
    token_file: Option<PathBuf>,
    /// PEM CA of the coordinator's certificate.
    tls_ca_file: Option<PathBuf>,
    /// Smoke-test packages in every submitted run (as `--smoke`). Default false.
    smoke: Option<bool>,
    /// Send the token to an http:// coordinator beyond this machine (as
    /// `--allow-plain-http`). Default false.
    allow_plain_http: Option<bool>,
}

pub(crate) struct Conn {
    pub url: String,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    /// The config's default for `--smoke`.
    pub smoke: bool,
}

/// The most a CLI config or token file may hold (bytes).
const MAX_CONFIG: u64 = 1 << 20;

/// A text file of at most `max` bytes, whatever kind of file it is (a pipe too).
fn read_small(p: &std::path::Path, max: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    let f = std::fs::File::open(p)?;
    if f.metadata()?.is_dir() {
        return Err(std::io::Error::other("it is a directory"));
    }
    f.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "it is larger than {max} bytes"
        )));
    }
    Ok(text)
}

pub(crate) fn resolve_conn(cli: &Cli) -> anyhow::Result<Conn> {
    let path = cli.config.clone().or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/nixfarm/config.toml"))
    });
    // One named with --config is read whatever it is (a pipe: `--config <(pass show x)`,
    // /dev/null); the default one only when it is there.
    let named = cli.config.is_some();
    let cfg: CliConfig = match path {
        Some(p) if named || p.exists() => {
            let text = read_small(&p, MAX_CONFIG)
                .with_context(|| format!("cannot read the config file {}", p.display()))?;
            // The parser's message only, with where: its full text quotes the line, and a
            // line that does not belong there may hold a secret.
            nixfarm_core::config_text::parse(&text).map_err(|e| {
                anyhow::anyhow!("{} is not a valid nixfarm CLI config: {e}", p.display())
            })?
        }
        _ => CliConfig::default(),
    };
    let url = cli
        .coordinator
        .clone()
        .or(cfg.coordinator)
        .unwrap_or_else(|| "http://127.0.0.1:7420".into());
    let token = match (&cli.token, &cfg.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            read_small(f, MAX_CONFIG)
                .with_context(|| {
                    format!(
                        "cannot read the token_file of the CLI config, {}",
                        f.display()
                    )
                })?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    nixfarm_proto::client::guard_clear_text(
        &url,
        token.is_some(),
        // The flag or environment, either way, over the config file.
        cli.allow_plain_http
            .or(cfg.allow_plain_http)
            .unwrap_or(false),
        "client token",
        "--allow-plain-http, NIXFARM_ALLOW_PLAIN_HTTP=1 or `allow_plain_http = true` in the CLI config",
    )?;
    Ok(Conn {
        url,
        token,
        tls_ca: cli.tls_ca.clone().or(cfg.tls_ca_file),
        smoke: cfg.smoke.unwrap_or(false),
    })
}

/// A connected client with its token attached to every call.
#[derive(Clone)]
pub struct Client {
    inner: RunServiceClient<Channel>,
    token: Option<String>,
    pub url: String,
}

impl Client {
    pub async fn connect(url: &str, token: Option<String>) -> anyhow::Result<Client> {
        Self::connect_tls(url, token, None).await
    }

    /// Connects over TLS for https:// URLs (verified against `ca`, else the web PKI roots).
    pub async fn connect_tls(
        url: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Client> {
        let endpoint = nixfarm_proto::client::endpoint(
            url,
            &nixfarm_proto::client::TlsFiles {
                ca_file: ca,
                ..Default::default()
            },
        )?
        // A coordinator that stops answering mid-call (a watch, a long upload) is given up
        // after about a minute and a half of silence, not waited on for ever; a ping's answer
        // may queue behind an upload's data on a slow link, so it gets a minute.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(60))
        .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|e| {
            let msg = nixfarm_logs::error_chain(&e);
            anyhow::anyhow!("cannot reach the coordinator at {url}: {msg}\n  (is it running? set --coordinator or NIXFARM_COORDINATOR, or use `nixfarm local`; for https:// with a private CA, --tls-ca)")
        })?;
        let inner = RunServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let client = Client {
            inner,
            token,
            url: url.to_string(),
        };
        client.probe().await?;
        Ok(client)
    }

    /// Asks the coordinator for its limits, a cheap call, before the command's own: an
    /// address that takes the connection but never answers, or that is no coordinator's
    /// (the web UI's port, another HTTP server), is said plainly here, at once.
    async fn probe(&self) -> anyhow::Result<()> {
        let url = &self.url;
        let mut raw = self.raw();
        let asked = raw.get_limits(self.req(nixfarm_proto::v1::GetLimitsRequest::default()));
        match tokio::time::timeout(PROBE_WAIT, asked).await {
            Err(_) => anyhow::bail!(
                "cannot reach the coordinator at {url}: it took the connection but gave no answer within {} s (is this the coordinator's gRPC address?)",
                PROBE_WAIT.as_secs()
            ),
            Ok(Err(s)) if not_grpc(&s) => anyhow::bail!(
                "{url} does not answer as a nixfarm coordinator ({}): is this the coordinator's gRPC address? (its web UI, --http-listen, is another port; one with TLS is https://)",
                nixfarm_logs::error_chain(&s)
            ),
            // A token refused (or an address held back for wrong ones) is said now: asking
            // again with it would only count as one more wrong guess.
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated | tonic::Code::ResourceExhausted
                ) =>
            {
                Err(status_error(s))
            }
            Ok(_) => Ok(()),
        }
    }

    pub fn req<T>(&self, t: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(t);
        if let Some(tok) = &self.token
            && let Ok(v) = format!("Bearer {tok}").parse()
        {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    pub fn raw(&self) -> RunServiceClient<Channel> {
        self.inner.clone()
    }
}

/// How long the first answer may take ([`Client::probe`]).
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// A status no gRPC server sent: an HTTP answer without gRPC's trailers, or a connection
/// that does not speak HTTP/2.
fn not_grpc(s: &tonic::Status) -> bool {
    let m = s.message();
    m.contains("grpc-status header missing")
        || (s.code() == tonic::Code::Unknown && m.contains("transport error"))
        || (s.code() == tonic::Code::Internal && m.contains("h2 protocol error"))
}

/// Turns a gRPC status into the message a user should see.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unauthenticated => anyhow::anyhow!("{}", s.message()),
        tonic::Code::Unavailable => {
            anyhow::anyhow!("the coordinator is unavailable: {}", s.message())
        }
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn a_config_error_does_not_quote_a_secret() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(
            &p,
            "coordinator = \"http://127.0.0.1:1\"\ntoken = \"s3cret\"\n",
        )
        .unwrap();
        let cli =
            Cli::try_parse_from(["nixfarm", "--config", p.to_str().unwrap(), "runs"]).unwrap();
        let e = resolve_conn(&cli).err().unwrap().to_string();
        assert!(
            e.contains("not a valid nixfarm CLI config") && e.contains("line 2"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn the_token_goes_over_plain_http_only_to_this_machine_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let none = d.path().join("none.toml");
        std::fs::write(&none, "").unwrap();
        let conn_with = |config: &std::path::Path, args: &[&str]| {
            let mut argv = vec!["nixfarm", "--config", config.to_str().unwrap()];
            argv.extend_from_slice(args);
            argv.push("runs");
            resolve_conn(&Cli::try_parse_from(argv).unwrap())
        };
        let conn = |args: &[&str]| conn_with(&none, args);
        let e = conn(&["--coordinator", "http://farm:7420", "--token", "s3cret"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("in clear") && e.contains("https://"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        for ok in [
            &[
                "--coordinator",
                "http://farm:7420",
                "--token",
                "t",
                "--allow-plain-http",
            ][..],
            &["--coordinator", "http://127.0.0.1:7420", "--token", "t"],
            &["--coordinator", "https://farm:7420", "--token", "t"],
            &["--coordinator", "http://farm:7420"],
        ] {
            assert!(conn(ok).is_ok(), "{ok:?}");
        }
        // Or once, in the config file.
        let allowed = d.path().join("allowed.toml");
        std::fs::write(&allowed, "allow_plain_http = true\n").unwrap();
        let farm = ["--coordinator", "http://farm:7420", "--token", "t"];
        assert!(conn_with(&allowed, &farm).is_ok());
        // The flag, either way, over the config file.
        let refused = [&farm[..], &["--allow-plain-http=false"]].concat();
        assert!(conn_with(&allowed, &refused).is_err());
    }
}
