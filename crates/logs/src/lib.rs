//! How nixfarm's daemons (coordinator, agent) log on stderr: plain text for people (colour
//! only at a terminal, never with NO_COLOR, so files and journald get no escape codes) or
//! JSON lines for log shippers, filtered by RUST_LOG (default info).

/// The `--log-format` of a daemon.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the logger; call once, first thing in `main`.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
}

/// A daemon's exit: success, or [`fatal`] with the error `run` ended with.
pub fn exit_code<E: AsRef<dyn std::error::Error + 'static>>(
    run: Result<(), E>,
) -> std::process::ExitCode {
    match run {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fatal(e.as_ref()),
    }
}

/// How a daemon that cannot go on says why: `error: ` and the error with its causes on one
/// line, each said once (a cause's text often repeats in the error above it), on stderr, no
/// backtrace; the exit code to end with.
pub fn fatal(e: &(dyn std::error::Error + 'static)) -> std::process::ExitCode {
    use std::io::Write as _;
    let _ = writeln!(Stderr, "error: {}", error_chain(e));
    std::process::ExitCode::FAILURE
}

/// Standard error for a daemon's logs: a write that fails (the reader of a log pipe went
/// away: a log shipper restarting, `| head`) is dropped, not a panic. tracing's own fallback
/// for a failed write is `eprintln!`, which panics on a closed pipe and took the whole
/// coordinator or agent down with it.
pub struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// An error's message and its causes', joined by `: `, each said once.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let said = cause.to_string();
        if !msg.contains(&said) {
            msg.push_str(": ");
            msg.push_str(&said);
        }
        src = cause.source();
    }
    msg
}

#[cfg(test)]
mod fatal_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot read /x: {0}")]
    struct Read(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once() {
        let e = Read(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(super::error_chain(&e), "cannot read /x: entity not found");
    }
}
