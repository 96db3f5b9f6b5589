//! What admits agents and clients, read again while the coordinator runs: revoked client
//! certificates, the agents' named tokens, the join token and the client token. A change
//! cuts off the agents it took back and withdraws their farm cache tokens; a client token
//! replaced is refused from the next call on.

use crate::credentials::Credentials;
use crate::engine::Engine;
use crate::farm_tokens::FarmTokens;
use crate::revoked::Revoked;
use crate::watched::Watched;
use std::sync::Arc;

/// Largest `[auth] agent_tokens_file` read, bytes.
pub const NAMED_FILE_MAX: u64 = 16 << 20;

/// Largest `[auth] agent_token_file` read again, bytes.
const JOIN_FILE_MAX: u64 = 64 << 10;

/// The files looked at once a second, and what a change in them reaches.
pub struct Reloads {
    pub engine: Engine,
    pub revoked: Arc<Revoked>,
    /// The agents' tokens (None: agents show none).
    pub tokens: Option<Arc<Credentials>>,
    /// `[auth] agent_tokens_file`, when set.
    pub named_file: Option<Watched>,
    /// `[auth] agent_token_file`, when set.
    pub join_file: Option<Watched>,
    /// The farm cache's issued tokens, when it issues them.
    pub issued: Option<Arc<FarmTokens>>,
    /// The client token, as the CLI's services and the web UI check it.
    pub clients: Option<Arc<Credentials>>,
    /// `[auth] client_token_file`, when set.
    pub client_file: Option<Watched>,
    /// The file the farm cache's issued tokens are kept in (`STATE_DIR/farm-tokens`).
    pub issued_file: Option<Watched>,
    /// That file was missing at the last look (an editor saving by renaming it away is
    /// not taken for its removal).
    pub issued_gone: std::sync::atomic::AtomicBool,
}

impl Reloads {
    /// One look at every file; what changed and stood still since is taken.
    pub fn look(&self) {
        if self.revoked.reload() {
            self.withdraw(self.engine.cut_off_certificates());
        }
        // A farm cache token the operator struck from its file (one that leaked): refused,
        // and its agent made to register again, for a new one.
        // (The file created and removed between two looks shows no change: it is gone, at
        // two looks in a row, while tokens are kept in it.)
        let gone = |file: &Watched| {
            use std::sync::atomic::Ordering;
            let now = !file.path().exists();
            self.issued_gone.swap(now, Ordering::SeqCst) && now
        };
        if let (Some(file), Some(issued)) = (&self.issued_file, &self.issued)
            && (file.read_settled(64 << 20).is_some() || (gone(file) && issued.kept_on_file()))
        {
            let struck = issued.withdraw_struck();
            if !struck.is_empty() {
                tracing::warn!(
                    agents = struck.len(),
                    "farm cache tokens struck from {}: withdrawn; their agents register again for new ones",
                    file.path().display()
                );
                self.engine.reconnect(&struck);
            }
        }
        if let (Some(file), Some(clients)) = (&self.client_file, &self.clients)
            && let Some(token) = settled_token(file, "client_token_file")
            && clients.replace_shared(token)
        {
            tracing::warn!(
                file = %file.path().display(),
                "client token replaced: the old one is refused from now on (the CLI and the web UI)"
            );
        }
        let Some(tokens) = &self.tokens else {
            return;
        };
        if let Some(file) = &self.named_file
            && let Some(text) = file.read_settled(NAMED_FILE_MAX)
        {
            match text.and_then(|t| Credentials::parse_named_again(&t)) {
                Ok(named) => {
                    warn_if_open(file);
                    let gone = tokens.replace_named(named);
                    tracing::info!(
                        file = %file.path().display(),
                        taken_back = gone.len(),
                        "agent tokens read again"
                    );
                    if !gone.is_empty() {
                        self.withdraw(self.engine.cut_off_named(tokens));
                    }
                }
                Err(e) => tracing::error!(
                    "[auth] agent_tokens_file {}: {e}; the tokens read before stay",
                    file.path().display()
                ),
            }
        }
        if let Some(file) = &self.join_file
            && let Some(token) = settled_token(file, "agent_token_file")
            && tokens.replace_shared(token)
        {
            tracing::warn!(
                file = %file.path().display(),
                "join token replaced: agents admitted by the old one are cut off"
            );
            self.withdraw(self.engine.cut_off_named(tokens));
        }
    }

    /// Withdraws the farm cache tokens of agents the engine forgot.
    pub fn forgotten(&self, names: Vec<String>) {
        if !names.is_empty() {
            self.withdraw(names);
        }
    }

    /// Withdraws the farm cache tokens of agents cut off.
    fn withdraw(&self, names: Vec<String>) {
        if let Some(t) = &self.issued {
            t.withdraw_all(&names);
        }
    }
}

/// Warns of a secret file read again that every user of the host can read: a token
/// rotated as `openssl rand -hex 32 > new && mv new file` under a usual umask is 0644.
fn warn_if_open(file: &Watched) {
    if let Some(why) = nixfarm_core::config_text::world_readable(file.path()) {
        tracing::warn!("{why}");
    }
}

/// A token file's new text once it changed and settled: the token, trimmed. An empty or
/// unreadable one is said in the log and the token read before stays (None).
fn settled_token(file: &Watched, field: &str) -> Option<String> {
    let text = file.read_settled(JOIN_FILE_MAX)?;
    let token = text.map(|t| t.trim().to_string()).and_then(|t| {
        if t.is_empty() {
            Err("empty (being written?)".to_string())
        } else {
            Ok(t)
        }
    });
    match token {
        Ok(t) => {
            warn_if_open(file);
            Some(t)
        }
        Err(e) => {
            tracing::error!(
                "[auth] {field} {}: {e}; the token read before stays",
                file.path().display()
            );
            None
        }
    }
}
