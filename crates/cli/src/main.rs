//! `nixfarm`: the command line. Thin: everything is in the library.

use clap::{CommandFactory, FromArgMatches};

fn main() {
    forget_empty_env();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(cli_main()),
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            std::process::exit(2);
        }
    }
}

/// An environment variable a flag reads that is set but empty (`NIXFARM_CONFIG=` in a CI
/// file, a template left blank) is taken as unset, as a shell user means it: clap would
/// take it for the flag given without its value, and refuse every command.
fn forget_empty_env() {
    fn names(c: &clap::Command, out: &mut Vec<std::ffi::OsString>) {
        out.extend(
            c.get_arguments()
                .filter_map(|a| a.get_env().map(|e| e.to_owned())),
        );
        for s in c.get_subcommands() {
            names(s, out);
        }
    }
    let mut all = Vec::new();
    names(&nixfarm_cli::Cli::command(), &mut all);
    for name in all {
        if std::env::var_os(&name).is_some_and(|v| v.is_empty()) {
            // SAFETY: called first thing in main, before the runtime (or any other thread)
            // exists: nothing reads the environment concurrently.
            unsafe { std::env::remove_var(&name) };
        }
    }
}

async fn cli_main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIXFARM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let matches = nixfarm_cli::Cli::command().get_matches();
    // `local` runs its own coordinator: a flag meant for another one is refused, not ignored.
    if let Some(("local", _)) = matches.subcommand() {
        for (id, flag) in [
            ("coordinator", "--coordinator"),
            ("token", "--token"),
            ("tls_ca", "--tls-ca"),
            ("allow_plain_http", "--allow-plain-http"),
        ] {
            if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                eprintln!(
                    "error: nixfarm local runs its own coordinator on this machine; {flag} does not apply (use nixfarm submit against a farm)"
                );
                std::process::exit(2);
            }
        }
    }
    let cli = match nixfarm_cli::Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    nixfarm_cli::ci::stop_commands();
    let code = match nixfarm_cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // Said if anyone still reads stderr; the exit code says it either way.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: {}",
                nixfarm_core::fit::printable(&format!("{e:#}"))
            );
            2
        }
    };
    nixfarm_cli::ci::resume_commands(false);
    // A report cut short (a full disk under `> report.json`) is no success.
    let code = match nixfarm_cli::stdout_failure() {
        Some(e) => {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: cannot write to stdout: {e}"
            );
            2
        }
        None => code,
    };
    std::process::exit(code);
}
