//! Generated gRPC code for the `nixfarm.v1` API, kept apart from domain types.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("nixfarm.v1");
}

pub mod convert;

/// Client-side transport settings shared by the agent and the CLI.
pub mod client {
    use std::path::Path;
    use std::time::Duration;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    #[derive(Debug, thiserror::Error)]
    pub enum EndpointError {
        #[error(
            "'{0}' is not a valid coordinator URL (expected http://HOST:PORT or https://HOST:PORT)"
        )]
        Url(String),
        #[error("cannot read {path}")]
        Read {
            path: String,
            #[source]
            source: std::io::Error,
        },
        #[error("{path} holds no PEM {what} (a block \"-----BEGIN {what}-----\")")]
        NotPem { path: String, what: &'static str },
        #[error("TLS settings are not usable: {0}")]
        Tls(String),
        #[error(
            "refusing to send the {what} in clear to {url}: it is http:// and beyond this machine, so anyone on the path reads it; use https:// (the coordinator's [tls]), or allow plain http for a network you trust ({how})"
        )]
        ClearText {
            what: &'static str,
            url: String,
            how: &'static str,
        },
    }

    /// Whether `url` is plain http:// to a host other than this machine (`localhost`, a
    /// loopback address): a token sent there travels in clear. An unparsable URL counts as
    /// beyond (its endpoint is refused later anyway).
    pub fn clear_text_beyond_loopback(url: &str) -> bool {
        let Some(rest) = url.strip_prefix("http://") else {
            return false;
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        // userinfo@host:port; an IPv6 literal keeps its colons inside brackets.
        let host_port = authority.rsplit('@').next().unwrap_or_default();
        let host = match host_port.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host_port.split(':').next().unwrap_or_default(),
        };
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        !loopback
    }

    /// Refuses to send a secret (`what`) over plain http beyond this machine unless the
    /// operator allowed it (`how` says how to).
    pub fn guard_clear_text(
        url: &str,
        has_secret: bool,
        allowed: bool,
        what: &'static str,
        how: &'static str,
    ) -> Result<(), EndpointError> {
        if has_secret && !allowed && clear_text_beyond_loopback(url) {
            return Err(EndpointError::ClearText {
                what,
                url: url.to_string(),
                how,
            });
        }
        Ok(())
    }

    /// TLS material for a client; all optional. Without `ca_file`, https:// URLs are
    /// verified against the public web PKI roots.
    #[derive(Debug, Clone, Default)]
    pub struct TlsFiles<'a> {
        pub ca_file: Option<&'a Path>,
        /// Client certificate and key (mTLS).
        pub cert_file: Option<&'a Path>,
        pub key_file: Option<&'a Path>,
    }

    fn read(p: &Path) -> Result<Vec<u8>, EndpointError> {
        std::fs::read(p).map_err(|source| EndpointError::Read {
            path: p.display().to_string(),
            source,
        })
    }

    /// `p`'s bytes, which must hold a PEM block of `what` (`CERTIFICATE`, `PRIVATE KEY`):
    /// a file of something else is said to be so now, not met later as a failed handshake.
    fn read_pem(p: &Path, what: &'static str) -> Result<Vec<u8>, EndpointError> {
        let bytes = read(p)?;
        let text = String::from_utf8_lossy(&bytes);
        let holds = text.lines().any(|l| {
            l.trim()
                .strip_prefix("-----BEGIN ")
                .is_some_and(|rest| rest.trim_end_matches('-').ends_with(what))
        });
        if !holds {
            return Err(EndpointError::NotPem {
                path: p.display().to_string(),
                what,
            });
        }
        Ok(bytes)
    }

    /// An endpoint for `url`: TLS (rustls) for https://, plain HTTP/2 for http://.
    pub fn endpoint(url: &str, tls: &TlsFiles<'_>) -> Result<Endpoint, EndpointError> {
        let mut e = Endpoint::from_shared(url.to_string())
            .map_err(|_| EndpointError::Url(url.to_string()))?
            .connect_timeout(Duration::from_secs(5));
        if url.starts_with("https://") {
            let mut t = ClientTlsConfig::new();
            t = match tls.ca_file {
                Some(ca) => t.ca_certificate(Certificate::from_pem(read_pem(ca, "CERTIFICATE")?)),
                None => t.with_webpki_roots(),
            };
            if let (Some(c), Some(k)) = (tls.cert_file, tls.key_file) {
                t = t.identity(Identity::from_pem(
                    read_pem(c, "CERTIFICATE")?,
                    read_pem(k, "PRIVATE KEY")?,
                ));
            }
            e = e
                .tls_config(t)
                .map_err(|err| EndpointError::Tls(err.to_string()))?;
        } else if !url.starts_with("http://") {
            return Err(EndpointError::Url(url.to_string()));
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::client::{clear_text_beyond_loopback as beyond, guard_clear_text};

    #[test]
    fn a_secret_goes_in_clear_only_to_this_machine_or_where_allowed() {
        for url in [
            "http://127.0.0.1:7420",
            "http://localhost:7420",
            "http://LOCALHOST",
            "http://[::1]:7420",
            "http://127.8.9.10:1/x",
            "https://farm.example.org:7420",
        ] {
            assert!(!beyond(url), "{url}");
        }
        for url in [
            "http://farm:7420",
            "http://10.0.0.5:7420",
            "http://[fe80::1]:7420",
            "http://127.0.0.1.evil.example:7420",
            "http://localhost.evil.example",
            "http://127.0.0.1@farm:7420",
        ] {
            assert!(beyond(url), "{url}");
        }
        let e = guard_clear_text(
            "http://farm:7420",
            true,
            false,
            "client token",
            "--allow-plain-http",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("http://farm:7420") && e.contains("--allow-plain-http"),
            "{e}"
        );
        assert!(guard_clear_text("http://farm:7420", true, true, "t", "h").is_ok());
        assert!(guard_clear_text("http://farm:7420", false, false, "t", "h").is_ok());
    }
}
