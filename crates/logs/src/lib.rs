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
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
}
