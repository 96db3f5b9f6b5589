//! The command line's grammar: subcommands, their flags and what each means (`--help`).

use crate::fix;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// nixfarm: is every package in your Nix repository ready?
///
/// nixfarm evaluates every package of a flake, builds them across agents, and reports per
/// package whether it is ready: it evaluates, its source is pinned to a commit, every
/// fixed-output hash is right, it builds, and (with --cache) its outputs are in that binary
/// cache.
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
    /// CLI config file (TOML: `coordinator`, `token_file`, `tls_ca_file`, `smoke`, `allow_plain_http`). Default: ~/.config/nixfarm/config.toml.
    #[arg(long, global = true, env = "NIXFARM_CONFIG")]
    pub config: Option<PathBuf>,
    /// PEM CA of the coordinator's certificate, for https:// coordinators with a private CA.
    #[arg(long, global = true, env = "NIXFARM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Send the token to an http:// coordinator beyond this machine, in clear. Refused by
    /// default (anyone on the path reads it); for a network you trust. Loopback is always
    /// allowed.
    #[arg(
        long,
        global = true,
        env = "NIXFARM_ALLOW_PLAIN_HTTP",
        value_parser = clap::builder::FalseyValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub allow_plain_http: Option<bool>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Submit a run: a local checkout (uncommitted changes included) or a flake reference.
    #[command(
        after_help = "Examples:\n  nixfarm submit . --watch\n  nixfarm submit github:owner/repo --attr-path packages.x86_64-linux --cache cachix://my-cache\n  nixfarm submit . --fix-hashes --patch-out fix.patch"
    )]
    Submit(SubmitArgs),
    /// Warm a cache: build and push whatever of the repository is not in it yet; outputs
    /// already cached are not built.
    #[command(
        mut_arg("skip_cached", |a| a.hide(true)),
        after_help = "Example:\n  nixfarm warm . --cache cachix://my-cache"
    )]
    Warm(WarmArgs),
    /// Follow a run's progress until it finishes, then print its report. Ctrl-C detaches.
    #[command(
        after_help = "Examples:\n  nixfarm watch r0123456789abcdef --format markdown\n  nixfarm watch r0123456789abcdef --cache cachix://my-cache --fail-under 100"
    )]
    Watch {
        /// The run's id (`nixfarm runs` lists them; `submit` prints it).
        #[arg(value_parser = parse_run_id)]
        run: String,
        #[command(flatten)]
        check: CacheCheckArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Print a run's readiness report.
    #[command(
        after_help = "Examples:\n  nixfarm report r0123456789abcdef --format json > report.json\n  nixfarm report r0123456789abcdef --format junit --fail-under 90"
    )]
    Report {
        /// The run's id (`nixfarm runs` lists them; `submit` prints it).
        #[arg(value_parser = parse_run_id)]
        run: String,
        #[command(flatten)]
        check: CacheCheckArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List runs: id, state, packages ready, source.
    #[command(after_help = "Example:\n  nixfarm --coordinator http://farm:7420 runs")]
    Runs,
    /// List agents: what they offer and what they are building, and why waiting jobs wait.
    #[command(after_help = "Example:\n  nixfarm agents")]
    Agents,
    /// Cancel a run: nothing new starts, running builds are stopped.
    #[command(after_help = "Example:\n  nixfarm cancel r0123456789abcdef")]
    Cancel {
        /// The run's id (`nixfarm runs` lists them).
        #[arg(value_parser = parse_run_id)]
        run: String,
    },
    /// Run a whole farm on this machine (embedded coordinator + local agents) on a checkout.
    #[command(
        after_help = "Examples:\n  nixfarm local examples/atproto-pkgs --agents 2\n  nixfarm local . --fix-hashes --patch-out fix.patch\n  nixfarm local . --format markdown --fail-under 90"
    )]
    Local(LocalArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Attribute path whose attributes are the packages. Default: packages.x86_64-linux of a
    /// flake; the top level of a Nix file (--file), where a list (ci.nix's buildOutputs)
    /// counts as its derivations.
    #[arg(long, value_name = "PATH")]
    pub attr_path: Option<String>,
    /// Evaluate this Nix file of the checkout instead of its flake (classic NUR layouts:
    /// default.nix, or ci.nix with --attr-path buildOutputs). Taken by default when the
    /// checkout has no flake.nix but a default.nix. Evaluated in restricted mode: it reads
    /// nothing outside the checkout.
    #[arg(long, value_name = "FILE")]
    pub file: Option<String>,
    /// Pass NAME = EXPR (a Nix expression) to the file's function, as nix-build --arg.
    #[arg(long = "arg", num_args = 2, value_names = ["NAME", "EXPR"], action = clap::ArgAction::Append)]
    pub args: Vec<String>,
    /// Override the flake input NAME with the flake reference REF, as nix --override-input
    /// (e.g. nixpkgs github:NixOS/nixpkgs/nixos-24.05); repeat for several.
    #[arg(long = "override-input", num_args = 2, value_names = ["NAME", "REF"], action = clap::ArgAction::Append)]
    pub override_inputs: Vec<String>,
    /// One run per value of a flake input, reported side by side (package x value, what
    /// differs marked): NAME=REF1,REF2,… (e.g. nixpkgs=github:NixOS/nixpkgs/nixos-24.05,
    /// github:NixOS/nixpkgs/nixos-unstable). The lowest readiness counts for --fail-under.
    #[arg(long, value_name = "NAME=REF,REF")]
    pub matrix: Option<String>,
    /// Pass NAME = VALUE (taken as a string) to the file's function, as nix-build --argstr.
    #[arg(long = "argstr", num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    pub argstrs: Vec<String>,
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
    /// Smoke-test each package that builds: run its main program (meta.mainProgram, else
    /// the only executable in bin/) with --version, else --help, with an empty HOME, no
    /// network and a 10 s limit, on the agent. A program that fails both is smoke-failed;
    /// packages without one are skipped and counted. Default: the CLI config's `smoke`.
    #[arg(long)]
    pub smoke: bool,
    /// Have every build checked: a second agent, admitted by another credential, fetches
    /// the outputs from the cache and builds the derivation again (`nix-store --check`);
    /// a difference makes the package not-reproducible. Only checked outputs reach
    /// --cache (the checking agent pushes them). About doubles the build work. The
    /// coordinator may do it for every run (`[scheduler] cross_check_builds`).
    #[arg(long)]
    pub cross_check_builds: bool,
    /// Public key the cache's signatures are checked against (NAME:BASE64); repeat for
    /// several. Agents substitute from the cache only with a key (this, Cachix's, or their
    /// own signing key's): a cache no key checks is pushed to, never read from.
    #[arg(long = "trusted-public-key", value_name = "KEY")]
    pub trusted_public_keys: Vec<String>,
    /// With --cache: once the run ends, also download every ready output's NAR from the
    /// cache and check it as a substituting client does (what it decompresses to, against
    /// the signed narinfo): one missing, cut short or different is reported not-cached. Needs --trusted-public-key (or a Cachix cache's own key). Downloads as
    /// much as installing every package would. Default: narinfos only.
    #[arg(long)]
    pub verify_nars: bool,
    /// Build timeout per derivation, seconds; 0: none (packages' meta.timeout wins).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub timeout: u64,
    /// Max time without log output per build, seconds; 0: none (packages' meta.maxSilent
    /// wins).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub max_silent: u64,
}

/// The cache a run published to, for `watch` and `report` to check its report against as
/// `submit --watch` does (they do not know it otherwise).
#[derive(Args, Debug, Clone, Default)]
pub struct CacheCheckArgs {
    /// Check the report against this cache (the run's --cache): a ready package whose
    /// outputs it lacks, cannot serve, or holds signed by none of the keys below (or the
    /// Cachix cache's own) is reported not-cached. Default: no check.
    #[arg(long)]
    pub cache: Option<String>,
    /// Cachix API root, for cachix:// caches (default: Cachix's own).
    #[arg(long, env = "NIXFARM_CACHIX_API_URL")]
    pub cachix_api_url: Option<String>,
    /// Public key the cache's signatures are checked against (NAME:BASE64); repeat for
    /// several.
    #[arg(long = "trusted-public-key", value_name = "KEY")]
    pub trusted_public_keys: Vec<String>,
    /// With --cache: also download every ready output's NAR from the cache and check it as a
    /// substituting client does (what it decompresses to, against the signed narinfo): one
    /// missing, cut short or different is reported not-cached. Needs
    /// --trusted-public-key (or a Cachix cache's own key). Downloads as much as installing
    /// every package would. Default: narinfos only.
    #[arg(long)]
    pub verify_nars: bool,
}

impl From<&RunArgs> for CacheCheckArgs {
    fn from(run: &RunArgs) -> Self {
        CacheCheckArgs {
            cache: run.cache.clone(),
            cachix_api_url: run.cachix_api_url.clone(),
            trusted_public_keys: run.trusted_public_keys.clone(),
            verify_nars: run.verify_nars,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Report format: table for people, json for scripts, markdown for READMEs/PRs, junit for
    /// CI, github for workflow annotations on the pull request's lines. With
    /// GITHUB_STEP_SUMMARY set, the Markdown report is also appended to that file.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Exit with status 1 when fewer than PCT percent of the packages are ready (0 to 100).
    #[arg(long, value_name = "PCT", value_parser = parse_percent)]
    pub fail_under: Option<f64>,
    /// Table format: every reason whole, however wide the lines get (otherwise reasons are
    /// cut with "…": to fit a terminal's width, or at 90 characters into a file or pipe).
    #[arg(long)]
    pub wide: bool,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// A directory holding flake.nix, or a flake reference (github:owner/repo, git+https://…).
    pub source: String,
    #[command(flatten)]
    pub run: RunArgs,
    /// Follow the run until it finishes and print its report. Implied by what shapes or
    /// checks the report (--format, --fail-under, --wide, --verify-nars) and by
    /// --fix-hashes; without any, submit prints the run id and returns.
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
    /// Jobs per agent (1 to 4096), as the agent's own --max-jobs. Default: CPUs divided
    /// among the agents (at least 1).
    #[arg(long = "max-jobs", alias = "jobs", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub jobs: Option<u32>,
    /// State directory of the embedded coordinator (database, snapshots).
    #[arg(long, env = "NIXFARM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Nix secret key file the local agents sign pushed paths with (file:// and HTTP caches,
    /// self-signed Cachix caches; CACHIX_SIGNING_KEY works too).
    #[arg(long)]
    pub signing_key_file: Option<PathBuf>,
    /// Also serve the web UI (live run page, agents, badges) at http://ADDR/ while the run
    /// goes, e.g. 127.0.0.1:7421 (port 0: any free port; the URL is printed).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
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
    /// GitHub workflow annotations: each package that is not ready on its file and line
    /// (a hash fix on the binding's line, with the new value).
    Github,
}

/// A run id, checked here so a mistyped one is said in the CLI's words, not the wire's.
fn parse_run_id(s: &str) -> Result<String, String> {
    if nixfarm_core::limits::is_run_id(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{}' is not a run id (they look like r0123456789abcdef; nixfarm runs lists them)",
            nixfarm_core::limits::clip(s, 64)
        ))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A mistyped run id is refused by the CLI, saying what one looks like.
    #[test]
    fn a_run_id_is_checked_before_it_is_sent() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(args)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let e = parse(&["nixfarm", "cancel", "bad id!"]).unwrap_err();
        assert!(
            e.contains("'bad id!' is not a run id (they look like r0123456789abcdef"),
            "{e}"
        );
        for cmd in ["cancel", "report", "watch"] {
            assert!(
                parse(&["nixfarm", cmd, "r0123456789abcdef"]).is_ok(),
                "{cmd}"
            );
            assert!(parse(&["nixfarm", cmd, "../etc"]).is_err(), "{cmd}");
        }
    }

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
    fn warm_does_not_offer_what_it_always_does() {
        let mut cmd = Cli::command();
        let warm = cmd.find_subcommand_mut("warm").unwrap();
        let help = warm.render_long_help().to_string();
        assert!(!help.contains("--skip-cached"), "{help}");
        let submit = Cli::command()
            .find_subcommand_mut("submit")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(submit.contains("--skip-cached"));
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
