//! `nixfarm-coordinator`: serves the farm. Thin: everything lives in the library.

use anyhow::Context;
use clap::Parser;
use nixfarm_coordinator::{Config, server};
use std::path::PathBuf;

/// The nixfarm coordinator: splits package sets across agents and keeps every run's state.
///
/// Agents dial in with `nixfarm-agent --coordinator http://HOST:PORT`; the CLI submits runs
/// with `nixfarm submit`. State lives in STATE_DIR/coordinator.sqlite; restarting resumes runs.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    after_help = "Examples:\n  nixfarm-coordinator --listen 127.0.0.1:7420 --state-dir ./state\n  nixfarm-coordinator --config /etc/nixfarm/coordinator.toml --metrics-listen 127.0.0.1:9420\n  nixfarm-coordinator --listen 0.0.0.0:7420 --http-listen 0.0.0.0:7422   # web UI and badges (the farm cache takes 7421 in deploy/)"
)]
struct Args {
    /// Config file (TOML); see deploy/coordinator.toml for every field and default.
    #[arg(long, short, env = "NIXFARM_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the config's `listen`), e.g. 0.0.0.0:7420.
    #[arg(long)]
    listen: Option<String>,
    /// State directory (overrides the config's `state_dir`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9420).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Serve the web UI (runs, packages, agents, live), its JSON API under /api and
    /// readiness badges at http://ADDR/ (e.g. 127.0.0.1:7422); the config's `[http] listen`.
    #[arg(long)]
    http_listen: Option<String>,
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
    raise_fd_limit();
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = args.state_dir {
        config.state_dir = d;
    }
    if args.metrics_listen.is_some() {
        config.metrics_listen = args.metrics_listen;
    }
    if args.http_listen.is_some() {
        config.http.listen = args.http_listen;
    }
    // Handled from before the first listener opens: a SIGINT (the container image's
    // STOPSIGNAL) as soon as it serves must stop it cleanly, not kill it.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot handle SIGINT")?;
    // A long start (a large database opening) stops at a SIGINT too.
    let running = tokio::select! {
        r = server::start(&config) => r.context("coordinator failed to start")?,
        _ = interrupt.recv() => return Ok(()),
    };
    // Print the bound address on stdout so scripts (and tests) can find a :0 port.
    // One line, written without panicking: whoever started us may stop reading stdout.
    {
        use std::io::Write as _;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {}", running.addr);
        let _ = out.flush();
    }
    if let Some(m) = running.metrics_addr {
        tracing::info!("metrics on http://{m}/metrics");
    }
    if let Some(h) = running.http_addr {
        tracing::info!("web UI on http://{h}/");
    }
    tokio::select! {
        r = running.wait() => r,
        _ = interrupt.recv() => Ok(()),
    }
}

/// Each client connection holds a descriptor: take the hard limit (often 512k) rather than
/// the soft 1024, so many idle clients cannot starve new ones.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the rlimit passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
