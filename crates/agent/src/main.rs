//! `nixfarm-agent`: dials a coordinator and builds with the local Nix. Thin: logic is in the library.

use clap::Parser;
use nixfarm_agent::{Agent, AgentConfig};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// A nixfarm build agent: runs evaluation and build jobs with this host's Nix.
///
/// The agent dials the coordinator (it needs no open port), registers its systems, features
/// and job capacity, and keeps building when the coordinator goes away: it reconnects and
/// delivers results later. SIGTERM drains it: no new jobs, running ones finish.
///
/// Example: nixfarm-agent --coordinator http://farm.example.org:7420 --name builder1 --max-jobs 4
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Config file (TOML); see deploy/agent.toml for every field and default.
    #[arg(long, short, env = "NIXFARM_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator URL, e.g. http://127.0.0.1:7420.
    #[arg(long, env = "NIXFARM_COORDINATOR")]
    coordinator: Option<String>,
    /// Name to register under (unique in the farm). Default: host name.
    #[arg(long)]
    name: Option<String>,
    /// Jobs to run at once. Default: number of CPUs.
    #[arg(long)]
    max_jobs: Option<u32>,
    /// Systems to build for (repeatable). Default: x86_64-linux.
    #[arg(long = "system")]
    systems: Vec<String>,
    /// Scratch directory for unpacked sources.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Nix secret key file to sign what this agent pushes to binary caches.
    #[arg(long, env = "NIXFARM_SIGNING_KEY_FILE")]
    signing_key_file: Option<PathBuf>,
    /// File holding the join token (or set NIXFARM_AGENT_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// MiB that must stay free in /nix/store's file system; below it no new jobs are taken.
    /// 0 turns the check off. Default 512.
    #[arg(long)]
    min_free_mib: Option<u64>,
    /// PEM CA of the coordinator's certificate, for https:// coordinators with a private CA.
    #[arg(long, env = "NIXFARM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate (mTLS), instead of a join token.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Evaluate local flake references (path:, git+file:, …), which read this host's disk.
    /// Only for a single-user farm whose coordinator allows them too.
    #[arg(long)]
    allow_local_flake_refs: bool,
    /// Send the join token to an http:// coordinator beyond this machine, in clear (refused
    /// by default: anyone on the path reads it). For a network you trust.
    #[arg(
        long,
        env = "NIXFARM_ALLOW_PLAIN_HTTP",
        value_parser = clap::builder::FalseyValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    allow_plain_http: Option<bool>,
    /// A Cachix API root besides Cachix's own (https://app.cachix.org/api/v1/) that this
    /// agent sends its CACHIX_AUTH_TOKEN to; a run naming any other API gets no push from it.
    #[arg(long, env = "NIXFARM_CACHIX_API_URL")]
    cachix_api_url: Option<String>,
    /// A run cache this agent substitutes from (repeat for several; see run_caches in
    /// deploy/agent.toml). Listed, it takes part only in runs with one of them or none.
    #[arg(long = "run-cache")]
    run_cache: Vec<String>,
    /// Log format on stderr: text (coloured only on a terminal, never with NO_COLOR) or
    /// json, one object per line for log shippers.
    #[arg(long, value_enum, default_value_t = nixfarm_logs::LogFormat::Text)]
    log_format: nixfarm_logs::LogFormat,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Said plainly, each cause once (no backtrace: an operator's terminal is no debugger).
    nixfarm_logs::exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    nixfarm_logs::init(args.log_format);
    let mut cfg = match &args.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(c) = args.coordinator {
        cfg.coordinator = c;
    }
    if let Some(n) = args.name {
        cfg.name = n;
    }
    if let Some(m) = args.max_jobs {
        cfg.max_jobs = m;
    }
    if !args.systems.is_empty() {
        cfg.systems = args.systems;
    }
    if let Some(m) = args.min_free_mib {
        cfg.min_free_mib = m;
    }
    if let Some(w) = args.work_dir {
        cfg.work_dir = w;
    }
    if args.signing_key_file.is_some() {
        cfg.signing_key_file = args.signing_key_file;
    }
    if args.token_file.is_some() {
        cfg.token_file = args.token_file;
    }
    if args.tls_ca.is_some() {
        cfg.tls_ca_file = args.tls_ca;
    }
    if args.tls_cert.is_some() {
        cfg.tls_cert_file = args.tls_cert;
        cfg.tls_key_file = args.tls_key;
    }
    if args.allow_local_flake_refs {
        cfg.allow_local_flake_refs = true;
    }
    // Either way: NIXFARM_ALLOW_PLAIN_HTTP=0 overrides a config's true.
    if let Some(allow) = args.allow_plain_http {
        cfg.allow_plain_http = allow;
    }
    cfg.cachix_api_urls.extend(args.cachix_api_url);
    cfg.run_caches.extend(args.run_cache);
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    // Handled from here on, before the agent connects: a stop sent at once drains it.
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
        s.cancel();
    });
    Agent::new(cfg)?.run(shutdown).await
}
