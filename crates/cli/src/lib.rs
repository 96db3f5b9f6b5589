//! The `nixfarm` command line: submit runs, watch their progress, render readiness reports,
//! and run a whole farm locally (`nixfarm local`).

/// `eprintln!` for progress and notes: a reader that has gone away (a closed pipe, a log
/// collector that died) is no error. What is said is for whoever watches; the run goes on,
/// and its report still reaches stdout or the file it was sent to. (`eprintln!` panics, and a
/// panicking task left `nixfarm local` waiting for ever.)
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `println!` for reports and listings without the panic: a reader that went away
/// (`nixfarm runs | head`) ends it quietly; any other failure to write (a full disk under
/// `> report.json`) is remembered, and the command then fails ([`stdout_failure`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        let r = writeln!(o, $($arg)*).and_then(|()| o.flush());
        $crate::note_stdout(r);
    }};
}

/// `print!`, as [`out!`].
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        let r = write!(o, $($arg)*).and_then(|()| o.flush());
        $crate::note_stdout(r);
    }};
}

/// The first failure to write stdout other than a reader gone away.
static STDOUT_FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

#[doc(hidden)]
pub fn note_stdout(r: std::io::Result<()>) {
    if let Err(e) = r
        && e.kind() != std::io::ErrorKind::BrokenPipe
        && let Ok(mut f) = STDOUT_FAILURE.lock()
    {
        f.get_or_insert_with(|| e.to_string());
    }
}

/// Why what this command printed on stdout did not all get there (None: it did, or its
/// reader went away): the command must not say it succeeded.
pub fn stdout_failure() -> Option<String> {
    STDOUT_FAILURE.lock().ok().and_then(|f| f.clone())
}

mod args;
mod checkout;
pub mod ci;
mod client;
pub mod cmd;
pub mod fix;
mod fix_asks;
mod output;
pub mod source;
pub mod watch;

pub use args::*;
pub use client::{Client, status_error};
pub use output::print_report;

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Command::Local(args) = &cli.command {
        return cmd::local::local(args).await;
    }
    // Bad input is reported as such, before (and whether or not) the coordinator answers.
    if let Command::Submit(SubmitArgs { source, .. }) | Command::Warm(WarmArgs { source, .. }) =
        &cli.command
    {
        source::check_local_or_ref(source)?;
    }
    if let Command::Watch { check, .. } | Command::Report { check, .. } = &cli.command {
        cmd::submit::check_args(check)?;
    }
    let conn = client::resolve_conn(&cli)?;
    let client = Client::connect_tls(&conn.url, conn.token, conn.tls_ca.as_deref()).await?;
    let mut command = cli.command;
    if conn.smoke
        && let Command::Submit(SubmitArgs { run, .. }) | Command::Warm(WarmArgs { run, .. }) =
            &mut command
    {
        run.smoke = true;
    }
    match command {
        Command::Submit(args) => cmd::submit::submit_cmd(&client, args).await,
        Command::Warm(args) => cmd::submit::warm_cmd(&client, args).await,
        Command::Watch { run, check, out } => {
            cmd::submit::watch_and_report(&client, &run, &check, &out).await
        }
        Command::Report { run, check, out } => {
            cmd::submit::report_cmd(&client, &run, &check, &out).await
        }
        Command::Runs => cmd::runs::runs_cmd(&client).await,
        Command::Agents => cmd::agents::agents_cmd(&client).await,
        Command::Cancel { run } => cmd::cancel::cancel_cmd(&client, run).await,
        Command::Local(_) => unreachable!("handled above"),
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
