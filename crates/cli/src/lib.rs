//! The `nixfarm` command line: submit runs, watch their progress, render readiness reports,
//! and run a whole farm locally (`nixfarm local`).

pub mod fix;
pub mod source;
pub mod watch;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use nixfarm_core::report::Report;
use nixfarm_proto::v1 as pb;
use nixfarm_proto::v1::run_service_client::RunServiceClient;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;

/// nixfarm: is every package in your Nix repository ready?
///
/// nixfarm evaluates every package of a flake, builds them across agents, and reports per
/// package whether it is ready: it evaluates, its source is pinned to a commit, every
/// fixed-output hash is right, it builds, and its outputs are in the binary cache.
///
/// Quick start (no setup: an embedded coordinator and local agents):
///   nixfarm local examples/atproto-pkgs
///
/// Against a farm:
///   nixfarm --coordinator http://farm:7420 submit . --watch
///   nixfarm report RUN --format markdown > readiness.md
#[derive(Parser, Debug)]
#[command(name = "nixfarm", version, about, long_about, verbatim_doc_comment)]
pub struct Cli {
    /// Coordinator URL.
    #[arg(long, global = true, env = "NIXFARM_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Client token for the coordinator (prefer the environment variable: flags show in `ps`).
    #[arg(long, global = true, env = "NIXFARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CLI config file (TOML with `coordinator` and `token_file`). Default: ~/.config/nixfarm/config.toml.
    #[arg(long, global = true, env = "NIXFARM_CONFIG")]
    pub config: Option<PathBuf>,
    /// PEM CA of the coordinator's certificate, for https:// coordinators with a private CA.
    #[arg(long, global = true, env = "NIXFARM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Submit a run: a local checkout (uncommitted changes included) or a flake reference.
    Submit(SubmitArgs),
    /// Warm a cache: build and push whatever of the repository is not in it yet; outputs
    /// already cached are not built. Example: nixfarm warm . --cache cachix://my-cache
    Warm(WarmArgs),
    /// Follow a run's progress until it finishes, then print its report. Ctrl-C detaches.
    Watch {
        run: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Print a run's readiness report.
    Report {
        run: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List runs.
    Runs,
    /// List agents: what they offer and what they are building.
    Agents,
    /// Cancel a run: nothing new starts, running builds are stopped.
    Cancel { run: String },
    /// Run a whole farm on this machine (embedded coordinator + local agents) on a checkout.
    Local(LocalArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Attribute path whose attributes are the packages.
    #[arg(long, default_value = "packages.x86_64-linux")]
    pub attr_path: String,
    /// Only this package (an attribute name under --attr-path); repeat for several.
    #[arg(long = "attr", value_name = "NAME")]
    pub attrs: Vec<String>,
    /// Binary cache the agents push to and substitute from: cachix://NAME, file:///path or
    /// http(s)://host/path (a cache that accepts PUT). Agents on other hosts need one.
    /// Credentials (CACHIX_AUTH_TOKEN, CACHIX_SIGNING_KEY, a Nix secret key) stay on the agents.
    #[arg(long)]
    pub cache: Option<String>,
    /// Cachix API root, for cachix:// caches (default: Cachix's own).
    #[arg(long, env = "NIXFARM_CACHIX_API_URL")]
    pub cachix_api_url: Option<String>,
    /// Do not build outputs the cache already has; they show as ready (warm mode).
    #[arg(long)]
    pub skip_cached: bool,
    /// Public key(s) the cache's signatures are checked against (name:base64).
    #[arg(long = "trusted-public-key")]
    pub trusted_public_keys: Vec<String>,
    /// Build timeout per derivation, seconds (packages' meta.timeout wins).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Max time without log output per build, seconds (packages' meta.maxSilent wins).
    #[arg(long, default_value_t = 0)]
    pub max_silent: u64,
}

#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Report format: table for people, json for scripts, markdown for READMEs/PRs, junit for CI.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Exit with status 1 when fewer than PCT percent of the packages are ready (0 to 100).
    #[arg(long, value_name = "PCT", value_parser = parse_percent)]
    pub fail_under: Option<f64>,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// A directory holding flake.nix, or a flake reference (github:owner/repo, git+https://…).
    pub source: String,
    #[command(flatten)]
    pub run: RunArgs,
    /// Follow the run until it finishes and print its report.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub fix: fix::FixArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct WarmArgs {
    /// A directory holding flake.nix, or a flake reference.
    pub source: String,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct LocalArgs {
    /// A directory holding flake.nix, or a flake reference.
    pub source: String,
    /// Number of local agents (1 to 64).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub agents: u32,
    /// Jobs per agent (1 to 4096). Default: CPUs divided among the agents (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub jobs: Option<u32>,
    /// State directory of the embedded coordinator (database, snapshots).
    #[arg(long, env = "NIXFARM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Nix secret key file the local agents sign pushed paths with (file:// and HTTP caches,
    /// self-signed Cachix caches; CACHIX_SIGNING_KEY works too).
    #[arg(long)]
    pub signing_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub fix: fix::FixArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Markdown,
    Junit,
}

/// A percentage: a finite number from 0 to 100.
fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if !v.is_finite() || !(0.0..=100.0).contains(&v) {
        return Err(format!("{s} is not a percentage from 0 to 100"));
    }
    Ok(v)
}

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
}

struct Conn {
    url: String,
    token: Option<String>,
    tls_ca: Option<PathBuf>,
}

fn resolve_conn(cli: &Cli) -> anyhow::Result<Conn> {
    let path = cli.config.clone().or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/nixfarm/config.toml"))
    });
    let cfg: CliConfig = match path {
        Some(p) if p.is_file() => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{} is not a valid nixfarm CLI config", p.display()))?
        }
        Some(p) if cli.config.is_some() => bail!("config file {} does not exist", p.display()),
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
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    Ok(Conn {
        url,
        token,
        tls_ca: cli.tls_ca.clone().or(cfg.tls_ca_file),
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
        )?;
        let channel = endpoint.connect().await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            anyhow::anyhow!("cannot reach the coordinator at {url}: {msg}\n  (is it running? set --coordinator or NIXFARM_COORDINATOR, or use `nixfarm local`; for https:// with a private CA, --tls-ca)")
        })?;
        let inner = RunServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        Ok(Client {
            inner,
            token,
            url: url.to_string(),
        })
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

/// Prints a report in the chosen format on stdout; returns the exit code.
pub fn print_report(report: &Report, out: &OutputArgs) -> i32 {
    let format = out.format.unwrap_or(Format::Table);
    let text = match format {
        Format::Table => report.to_table(),
        Format::Json => report.to_json() + "\n",
        Format::Markdown => report.to_markdown(),
        Format::Junit => report.to_junit(),
    };
    print!("{text}");
    if report.state == nixfarm_core::RunState::Failed {
        eprintln!("error: run {} failed: {}", report.run_id, report.error);
        return 2;
    }
    if let Some(pct) = out.fail_under
        && report.summary.percent < pct
    {
        eprintln!(
            "readiness {:.1}% is below --fail-under {pct}%",
            report.summary.percent
        );
        return 1;
    }
    0
}

async fn submit(
    client: &Client,
    source: &str,
    run: &RunArgs,
    overrides: &BTreeMap<PathBuf, Vec<u8>>,
    attrs: &[String],
) -> anyhow::Result<String> {
    let (src, label) = source::prepare(client, source, overrides).await?;
    let cache = run_cache(run)?;
    let req = pb::SubmitRunRequest {
        source: Some(src),
        attr_path: run.attr_path.clone(),
        label,
        cache,
        trusted_public_keys: run.trusted_public_keys.clone(),
        timeout_secs: run.timeout,
        max_silent_secs: run.max_silent,
        attrs: attrs.to_vec(),
        skip_cached: run.skip_cached,
    };
    let resp = client
        .raw()
        .submit_run(client.req(req))
        .await
        .map_err(status_error)?;
    Ok(resp.into_inner().run_id)
}

async fn get_report(client: &Client, run: &str) -> anyhow::Result<Report> {
    let r = client
        .raw()
        .get_report(client.req(pb::GetReportRequest {
            run_id: run.to_string(),
        }))
        .await
        .map_err(status_error)?;
    Ok(Report::try_from(r.into_inner())?)
}

/// The run's cache URL as agents get it (a cachix:// URL carries its API root), checked.
fn run_cache(run: &RunArgs) -> anyhow::Result<String> {
    let Some(url) = &run.cache else {
        if run.cachix_api_url.is_some() {
            bail!("--cachix-api-url needs --cache cachix://NAME");
        }
        return Ok(String::new());
    };
    let target = nixfarm_store::Target::parse(url)?;
    Ok(match (target, &run.cachix_api_url) {
        (nixfarm_store::Target::Cachix { name, .. }, Some(api)) => {
            nixfarm_store::cachix_url(&name, Some(api))
        }
        _ => url.clone(),
    })
}

/// Checks "cached" against the cache itself: a ready package whose outputs the cache does not
/// have becomes not-cached.
async fn check_cached(report: &mut Report, run: &RunArgs) -> anyhow::Result<()> {
    let url = run_cache(run)?;
    if url.is_empty() {
        return Ok(());
    }
    let token = std::env::var("CACHIX_AUTH_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let pusher = nixfarm_store::Pusher::for_url(&url, nixfarm_nix::Nix::default(), None, token)?;
    let outs: Vec<String> = report
        .packages
        .iter()
        .filter(|p| p.status() == nixfarm_core::PackageStatus::Ready)
        .flat_map(|p| p.outputs.values().cloned())
        .collect();
    let missing: std::collections::HashSet<String> = pusher
        .missing(&outs)
        .await
        .with_context(|| {
            format!(
                "cannot check the cache {}",
                run.cache.as_deref().unwrap_or_default()
            )
        })?
        .into_iter()
        .collect();
    let mut changed = false;
    for p in &mut report.packages {
        if p.status() != nixfarm_core::PackageStatus::Ready {
            continue;
        }
        if let Some(o) = p.outputs.values().find(|o| missing.contains(*o)) {
            p.status = nixfarm_core::PackageStatus::NotCached;
            p.reason = format!("{o} is not in the cache");
            changed = true;
        }
    }
    if changed {
        report.resummarize();
    }
    Ok(())
}

/// Submits a source and follows it to its report. A local checkout goes through the hash
/// fixer, which fills in each needs-hash package's `hash_fixes` (and, with `--fix-hashes`,
/// runs further rounds).
async fn submit_and_watch(
    client: &Client,
    source: &str,
    run: &RunArgs,
    fix: &fix::FixArgs,
    out: &OutputArgs,
) -> anyhow::Result<i32> {
    match source::check_local_or_ref(source)? {
        source::Named::Dir(dir) => {
            let mut outcome = fix::run(client, &dir, run, fix).await?;
            if outcome.detached {
                return Ok(130);
            }
            check_cached(&mut outcome.report, run).await?;
            Ok(print_report(&outcome.report, out))
        }
        source::Named::FlakeRef(f) => {
            if fix.enabled() {
                bail!(
                    "--fix-hashes edits files, so it needs a local checkout; clone {f} and point nixfarm at the directory"
                );
            }
            let id = submit(client, source, run, &BTreeMap::new(), &run.attrs).await?;
            eprintln!("submitted run {id}");
            match watch::watch(client, &id).await? {
                watch::End::Detached => {
                    eprintln!(
                        "detached; the run continues. Follow it again with: nixfarm watch {id}"
                    );
                    Ok(130)
                }
                watch::End::Finished => {
                    let mut report = get_report(client, &id).await?;
                    check_cached(&mut report, run).await?;
                    Ok(print_report(&report, out))
                }
            }
        }
    }
}

async fn watch_and_report(client: &Client, run: &str, out: &OutputArgs) -> anyhow::Result<i32> {
    match watch::watch(client, run).await? {
        watch::End::Detached => {
            eprintln!("detached; the run continues. Follow it again with: nixfarm watch {run}");
            Ok(130)
        }
        watch::End::Finished => Ok(print_report(&get_report(client, run).await?, out)),
    }
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Command::Local(args) = &cli.command {
        return local(args).await;
    }
    // Bad input is reported as such, before (and whether or not) the coordinator answers.
    if let Command::Submit(SubmitArgs { source, .. }) | Command::Warm(WarmArgs { source, .. }) =
        &cli.command
    {
        source::check_local_or_ref(source)?;
    }
    let conn = resolve_conn(&cli)?;
    let client = Client::connect_tls(&conn.url, conn.token, conn.tls_ca.as_deref()).await?;
    match cli.command {
        Command::Submit(args) => {
            if args.watch || args.fix.enabled() {
                submit_and_watch(&client, &args.source, &args.run, &args.fix, &args.out).await
            } else {
                let id = submit(
                    &client,
                    &args.source,
                    &args.run,
                    &BTreeMap::new(),
                    &args.run.attrs,
                )
                .await?;
                println!("{id}");
                Ok(0)
            }
        }
        Command::Warm(mut args) => {
            if args.run.cache.is_none() {
                bail!(
                    "warm needs --cache: the cache to fill (cachix://NAME, file:///path, http(s)://…)"
                );
            }
            args.run.skip_cached = true;
            submit_and_watch(
                &client,
                &args.source,
                &args.run,
                &fix::FixArgs::default(),
                &args.out,
            )
            .await
        }
        Command::Watch { run, out } => watch_and_report(&client, &run, &out).await,
        Command::Report { run, out } => Ok(print_report(&get_report(&client, &run).await?, &out)),
        Command::Runs => {
            let runs = client
                .raw()
                .list_runs(client.req(pb::ListRunsRequest {}))
                .await
                .map_err(status_error)?
                .into_inner()
                .runs;
            let mut t = comfy();
            t.set_header(vec!["run", "state", "ready", "source"]);
            for r in runs {
                // Whatever a coordinator stored, one row stays one line of sane width.
                let label: String = nixfarm_core::limits::clip(&r.label, 120)
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                t.add_row(vec![
                    nixfarm_core::limits::clip(&r.run_id, 64).to_string(),
                    nixfarm_core::limits::clip(&r.state, 32).to_string(),
                    format!("{}/{}", r.ready, r.total),
                    label,
                ]);
            }
            print!("{t}");
            Ok(0)
        }
        Command::Agents => {
            let resp = client
                .raw()
                .list_agents(client.req(pb::ListAgentsRequest {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let (agents, waiting) = (resp.agents, resp.waiting);
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut t = comfy();
            t.set_header(vec![
                "agent",
                "connected",
                "last seen",
                "systems",
                "jobs",
                "nix",
                "building",
            ]);
            let paused: Vec<String> = agents
                .iter()
                .filter(|a| a.connected && !a.paused.is_empty())
                .map(|a| format!("  {}: {}", a.name, a.paused))
                .collect();
            let violations: Vec<String> = agents
                .iter()
                .filter(|a| a.protocol_violations > 0)
                .map(|a| format!("  {}: {}", a.name, a.protocol_violations))
                .collect();
            for a in agents {
                let building: Vec<String> = a
                    .building
                    .iter()
                    .map(|d| short_name(d).to_string())
                    .collect();
                t.add_row(vec![
                    a.name,
                    match (a.connected, a.draining, a.paused.is_empty()) {
                        (false, _, _) => "no".into(),
                        (true, true, _) => "yes (draining)".into(),
                        (true, false, false) => "yes (paused)".into(),
                        (true, false, true) => "yes".into(),
                    },
                    format!("{}s ago", now_ms.saturating_sub(a.last_seen_ms) / 1000),
                    a.systems.join(" "),
                    format!("{}/{}", a.building.len(), a.max_jobs),
                    a.nix_version,
                    building.join(", "),
                ]);
            }
            print!("{t}");
            if !paused.is_empty() {
                println!("\ntaking no new jobs:\n{}", paused.join("\n"));
            }
            if !violations.is_empty() {
                println!(
                    "\nmessages refused as protocol violations (results for attempts an agent did not hold, outputs not the derivation's):\n{}",
                    violations.join("\n")
                );
            }
            if !waiting.is_empty() {
                println!("\nwaiting jobs:");
                for w in waiting {
                    println!("  {:>6}  {} (e.g. {})", w.jobs, w.reason, w.example);
                }
            }
            Ok(0)
        }
        Command::Cancel { run } => {
            let r = client
                .raw()
                .cancel_run(client.req(pb::CancelRunRequest {
                    run_id: run.clone(),
                }))
                .await
                .map_err(status_error)?;
            if r.into_inner().cancelled {
                eprintln!("cancelled run {run}");
            } else {
                eprintln!("run {run} had already finished");
            }
            Ok(0)
        }
        Command::Local(_) => unreachable!("handled above"),
    }
}

fn comfy() -> comfy_table_shim::Table {
    comfy_table_shim::Table::new()
}

/// A minimal table for listings (the report has its own renderer in nixfarm-core).
mod comfy_table_shim {
    pub struct Table {
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    }
    impl Table {
        pub fn new() -> Self {
            Table {
                header: vec![],
                rows: vec![],
            }
        }
        pub fn set_header(&mut self, h: Vec<&str>) {
            self.header = h.into_iter().map(String::from).collect();
        }
        pub fn add_row(&mut self, r: Vec<String>) {
            self.rows.push(r);
        }
    }
    impl std::fmt::Display for Table {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let n = self.header.len();
            let mut w = vec![0; n];
            for row in std::iter::once(&self.header).chain(self.rows.iter()) {
                for (i, c) in row.iter().enumerate().take(n) {
                    w[i] = w[i].max(c.chars().count());
                }
            }
            for (k, row) in std::iter::once(&self.header)
                .chain(self.rows.iter())
                .enumerate()
            {
                let cells: Vec<String> = row
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<width$}", width = w[i]))
                    .collect();
                writeln!(f, "{}", cells.join("  ").trim_end())?;
                if k == 0 {
                    writeln!(
                        f,
                        "{}",
                        w.iter()
                            .map(|x| "-".repeat(*x))
                            .collect::<Vec<_>>()
                            .join("  ")
                    )?;
                }
            }
            Ok(())
        }
    }
}

pub fn short_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    match base.split_once('-') {
        Some((h, n)) if h.len() == 32 => n,
        _ => base,
    }
}

async fn local(args: &LocalArgs) -> anyhow::Result<i32> {
    // Nix must be here: say so plainly before starting anything.
    let version = tokio::process::Command::new("nix")
        .arg("--version")
        .output()
        .await;
    if !matches!(&version, Ok(o) if o.status.success()) {
        bail!(
            "Nix is not installed (no working `nix` on PATH); on Debian: apt-get install nix-bin"
        );
    }
    // Check the source before starting a farm for it.
    source::check_local_or_ref(&args.source)?;
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/state/nixfarm/local"))
            .unwrap_or_else(|| PathBuf::from(".nixfarm")),
    };
    let config = nixfarm_coordinator::Config {
        listen: "127.0.0.1:0".into(),
        state_dir: state_dir.clone(),
        // One user's own machine: a path: reference reads nothing that user cannot.
        allow_local_flake_refs: true,
        ..Default::default()
    };
    let coordinator = nixfarm_coordinator::server::start(&config)
        .await
        .context("cannot start the embedded coordinator")?;
    let url = format!("http://{}", coordinator.addr);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let n = args.agents.max(1);
    let jobs = args.jobs.unwrap_or((cpus / n).max(1));
    let shutdown = tokio_util_token();
    let mut agents = Vec::new();
    for i in 1..=n {
        let cfg = nixfarm_agent::AgentConfig {
            coordinator: url.clone(),
            name: format!("local-{i}"),
            max_jobs: jobs,
            work_dir: state_dir.join("agents").join(format!("local-{i}")),
            signing_key_file: args.signing_key_file.clone(),
            allow_local_flake_refs: true,
            ..Default::default()
        };
        let agent = nixfarm_agent::Agent::new(cfg)?;
        let token = shutdown.clone();
        agents.push(tokio::spawn(async move { agent.run(token).await }));
    }
    let client = Client::connect(&url, None).await?;
    eprintln!(
        "{n} local agent(s), {jobs} job(s) each; state in {}",
        state_dir.display()
    );
    let result = submit_and_watch(&client, &args.source, &args.run, &args.fix, &args.out).await;
    shutdown.cancel();
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    coordinator.stop().await;
    result
}

fn tokio_util_token() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_under_takes_percentages_only() {
        assert_eq!(parse_percent("90").unwrap(), 90.0);
        assert_eq!(parse_percent("0").unwrap(), 0.0);
        assert_eq!(parse_percent("100").unwrap(), 100.0);
        for bad in ["200", "-1", "NaN", "inf", "x", ""] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_refuses_zero_jobs_and_agents() {
        for args in [
            vec!["nixfarm", "local", ".", "--jobs", "0"],
            vec!["nixfarm", "local", ".", "--agents", "0"],
            vec!["nixfarm", "report", "r1", "--fail-under", "NaN"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["nixfarm", "local", ".", "--jobs", "1"]).is_ok());
    }
}
