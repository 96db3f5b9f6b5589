//! The gRPC services' gate: who a request is (a client certificate, the join token, a named
//! token, the CLI's token), refused with a message that says which credential was wrong;
//! wrong tokens hold back their address.

use crate::credentials::{Admitted, BoundName, Credential, Credentials};
use std::sync::Arc;
use tonic::{Request, Status};

/// Who presents a token: the messages name that side's own flags.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    Agent,
    Client,
}

impl Role {
    fn token(self) -> &'static str {
        match self {
            Role::Agent => "an agent token",
            Role::Client => "a client token",
        }
    }
    fn hint(self) -> &'static str {
        match self {
            Role::Agent => "the agent's --token-file or NIXFARM_AGENT_TOKEN",
            Role::Client => "--token or NIXFARM_TOKEN",
        }
    }
}

/// The Bearer token a request carries (empty: none).
fn bearer(req: &Request<()>) -> &str {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

pub(crate) fn token_check(
    expected: Option<Arc<Credentials>>,
    who: Role,
    client_certs: bool,
    revoked: Arc<crate::revoked::Revoked>,
    limiter: Arc<crate::limit::Limiter>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        // A client certificate the TLS layer verified against the client CA admits an
        // agent, unless the operator revoked it (whatever token comes with it).
        if client_certs && let Some(der) = req.peer_certs().and_then(|c| c.first().cloned()) {
            use sha2::Digest as _;
            let fingerprint = data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(der.as_ref()));
            if revoked.contains(&fingerprint) {
                return Err(Status::permission_denied(crate::credentials::REVOKED));
            }
            req.extensions_mut()
                .insert(Credential::Certificate(fingerprint));
            let token = bearer(&req);
            if expected.as_ref().is_some_and(|e| e.admit(token).is_some()) {
                // Which token: an agent's own, beside its certificate, keeps its name.
                let digest = crate::credentials::TokenDigest::of(token);
                req.extensions_mut().insert(crate::credentials::ShowsToken);
                if matches!(who, Role::Agent) {
                    req.extensions_mut().insert(digest);
                }
            }
            return Ok(req);
        }
        let ip = req.remote_addr().map(|a| a.ip());
        if let Some(wait) = ip.and_then(|ip| limiter.blocked(ip, std::time::Instant::now())) {
            return Err(Status::resource_exhausted(crate::limit::refusal(wait)));
        }
        let Some(expected) = &expected else {
            if client_certs {
                return Err(Status::unauthenticated(format!(
                    "this coordinator requires a client certificate (or {})",
                    who.token()
                )));
            }
            req.extensions_mut().insert(Credential::Open);
            return Ok(req);
        };
        let given = bearer(&req);
        // Compared in constant time, so a token cannot be guessed byte by byte; with the
        // generation of the named tokens it was checked at (one taken back after this is
        // caught at registration).
        if let Some((a, generation)) = expected.admit_at(given) {
            // What a registration is checked against again (agents only).
            if matches!(who, Role::Agent) {
                let digest = crate::credentials::TokenDigest::of(given);
                req.extensions_mut().insert(digest);
                req.extensions_mut()
                    .insert(crate::credentials::AdmittedAt(generation));
            }
            let credential = match a {
                Admitted::Named(name) => {
                    req.extensions_mut().insert(BoundName(name.clone()));
                    Credential::NamedToken(name)
                }
                Admitted::Any => Credential::JoinToken,
            };
            req.extensions_mut().insert(credential);
            Ok(req)
        } else if given.is_empty() {
            Err(Status::unauthenticated(format!(
                "this coordinator requires {} ({})",
                who.token(),
                who.hint()
            )))
        } else {
            if let Some(ip) = ip {
                limiter.failed(ip, std::time::Instant::now());
            }
            Err(Status::unauthenticated(format!(
                "{} was refused: check {}",
                who.token(),
                who.hint()
            )))
        }
    }
}
