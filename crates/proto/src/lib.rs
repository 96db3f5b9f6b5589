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
        #[error("cannot read {path}: {source}")]
        Read {
            path: String,
            source: std::io::Error,
        },
        #[error("TLS settings are not usable: {0}")]
        Tls(String),
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

    /// An endpoint for `url`: TLS (rustls) for https://, plain HTTP/2 for http://.
    pub fn endpoint(url: &str, tls: &TlsFiles<'_>) -> Result<Endpoint, EndpointError> {
        let mut e = Endpoint::from_shared(url.to_string())
            .map_err(|_| EndpointError::Url(url.to_string()))?
            .connect_timeout(Duration::from_secs(5));
        if url.starts_with("https://") {
            let mut t = ClientTlsConfig::new();
            t = match tls.ca_file {
                Some(ca) => t.ca_certificate(Certificate::from_pem(read(ca)?)),
                None => t.with_webpki_roots(),
            };
            if let (Some(c), Some(k)) = (tls.cert_file, tls.key_file) {
                t = t.identity(Identity::from_pem(read(c)?, read(k)?));
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
