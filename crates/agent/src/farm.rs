//! How this agent reaches the coordinator's farm cache: its address, the token it shows
//! there (in a netrc for Nix), and the CA bundle Nix trusts for it.

use crate::{Shared, url_host};
use nixfarm_proto::v1 as pb;
use std::path::{Path, PathBuf};

/// How this agent reaches the coordinator's farm cache.
#[derive(Clone)]
pub(crate) struct FarmCacheUse {
    pub url: String,
    pub public_key: String,
    /// The token it shows there: its own, else the one the coordinator issued it (None:
    /// none). A secret: never logged.
    pub token: Option<String>,
    /// A netrc file with that token, for Nix (None: no token).
    pub netrc: Option<std::path::PathBuf>,
    /// The CA Nix trusts for it (the agent's `tls_ca_file`; None: the system's).
    pub ca: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for FarmCacheUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FarmCacheUse")
            .field("url", &self.url)
            .field("public_key", &self.public_key)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("netrc", &self.netrc)
            .field("ca", &self.ca)
            .finish()
    }
}

/// The farm cache a registration announces, with a netrc file for Nix when the agent has a
/// token for it: its own, else the one the registration issued (Nix sends it as Basic
/// auth; the farm cache takes the token as the password).
pub(crate) fn farm_cache_use(shared: &Shared, r: &pb::Registered) -> Option<FarmCacheUse> {
    if r.farm_cache_port == 0 {
        return None;
    }
    let host = if r.farm_cache_host.is_empty() {
        url_host(&shared.cfg.coordinator).to_string()
    } else if r.farm_cache_host.contains(':') {
        format!("[{}]", r.farm_cache_host)
    } else {
        r.farm_cache_host.clone()
    };
    let scheme = if r.farm_cache_tls { "https" } else { "http" };
    let url = format!("{scheme}://{host}:{}", r.farm_cache_port);
    // Its own token first: it outlives anything the coordinator issues. Over plain http
    // beyond this machine, as to the coordinator, only where the operator allowed it.
    let clear =
        nixfarm_proto::client::clear_text_beyond_loopback(&url) && !shared.cfg.allow_plain_http;
    let issued = Some(r.farm_cache_token.clone()).filter(|t| !t.is_empty() && !clear);
    let token = shared
        .token
        .clone()
        .filter(|_| !clear)
        .or_else(|| issued.clone());
    if clear && (shared.token.is_some() || !r.farm_cache_token.is_empty()) {
        tracing::warn!(
            "the farm cache at {url} is plain http beyond this machine: no token is sent to it in clear (allow_plain_http), so it may refuse this agent"
        );
    }
    // Nix reads the netrc while it builds, and where builds run as the agent's user (see
    // `Nix::with_build_isolation`) they can read it too: then only the token issued for
    // the farm cache goes in, never the join token.
    let for_nix = if shared.nix.builds_covered() {
        if issued.is_none() && token.is_some() {
            tracing::warn!(
                "builds cannot fetch from the farm cache at {url}: the coordinator issued no token for it, and this agent's own token is kept from its builds (they run as its user); they build their inputs instead"
            );
        }
        issued
    } else {
        token.clone()
    };
    let netrc = for_nix.as_ref().and_then(|t| {
        let path = shared.cfg.farm_netrc();
        let machine = host.trim_start_matches('[').trim_end_matches(']');
        let text = format!("machine {machine} login nixfarm password {t}\n");
        write_file(&path, &text, 0o600)
            .map_err(|e| tracing::warn!("cannot write {}: {e}", path.display()))
            .ok()
            .map(|()| path)
    });
    Some(FarmCacheUse {
        url,
        public_key: r.farm_cache_public_key.clone(),
        token,
        netrc,
        ca: shared
            .cfg
            .tls_ca_file
            .as_deref()
            .map(|ca| ca_bundle(&shared.cfg.work_dir, ca)),
    })
}

/// Writes `text` to `path` with `mode` through a temporary file renamed over it: a Nix
/// process reading it meanwhile (a pooled daemon reads its netrc on every request) sees the
/// old file or the new one, never none. Unchanged content is left alone.
fn write_file(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Where the system keeps the CAs it trusts, first found first (the agent's own
/// environment, then Debian's, Fedora's, SUSE's and a Nix profile's bundle).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
];

/// The CA file Nix is to trust for the farm cache: the system's CAs with the farm's
/// private CA `ca` added, written to `work_dir`. Nix hands its CA file on to fixed-output
/// builds (`NIX_SSL_CERT_FILE` among their impure variables, and the sandbox's
/// `/etc/ssl/certs`), which fetch from the public internet: the private CA alone would fail
/// them. Falls back to `ca` itself when the bundle cannot be written.
fn ca_bundle(work_dir: &Path, ca: &Path) -> PathBuf {
    let system = ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    let made = std::fs::read_to_string(ca).and_then(|private| {
        let mut text = system
            .as_deref()
            .map(std::fs::read_to_string)
            .transpose()?
            .unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&private);
        let path = work_dir.join("farm-cache-ca.pem");
        write_file(&path, &text, 0o644)?;
        Ok(path)
    });
    made.unwrap_or_else(|e| {
        tracing::warn!(
            "cannot write a CA bundle for Nix ({e}): it trusts {} alone, so fixed-output builds cannot verify public servers",
            ca.display()
        );
        ca.to_path_buf()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_trusts_the_farms_ca_beside_the_systems_and_reads_a_whole_netrc() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("farm-ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nfarm\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let bundle = ca_bundle(d.path(), &ca);
        let text = std::fs::read_to_string(&bundle).unwrap();
        assert!(
            text.ends_with("farm\n-----END CERTIFICATE-----\n"),
            "{text}"
        );
        if SYSTEM_BUNDLES.iter().any(|p| Path::new(p).is_file()) {
            assert!(text.len() > 1000, "the system's CAs are in it too");
        }
        // Rewritten in one step, and left alone when unchanged.
        let netrc = d.path().join("netrc");
        write_file(&netrc, "machine a password 1\n", 0o600).unwrap();
        write_file(&netrc, "machine a password 2\n", 0o600).unwrap();
        assert_eq!(
            std::fs::read_to_string(&netrc).unwrap(),
            "machine a password 2\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&netrc).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!netrc.with_extension("tmp").exists());
    }

    #[test]
    fn a_farm_cache_token_goes_in_clear_only_to_this_machine_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let agent = |allow: bool| {
            crate::Agent::new(crate::AgentConfig {
                work_dir: d.path().join("work"),
                gc_roots_dir: Some(d.path().join("roots")),
                allow_plain_http: allow,
                ..Default::default()
            })
            .unwrap()
        };
        let registered = |host: &str, tls: bool| pb::Registered {
            farm_cache_port: 7421,
            farm_cache_host: host.into(),
            farm_cache_token: "issued".into(),
            farm_cache_tls: tls,
            ..Default::default()
        };
        let token = |allow: bool, host: &str, tls: bool| {
            farm_cache_use(&agent(allow).shared, &registered(host, tls))
                .unwrap()
                .token
        };
        assert_eq!(token(false, "10.0.0.1", false), None);
        assert!(!d.path().join("work/farm-cache/netrc").exists());
        assert_eq!(token(false, "127.0.0.1", false).as_deref(), Some("issued"));
        assert_eq!(token(false, "10.0.0.1", true).as_deref(), Some("issued"));
        assert_eq!(token(true, "10.0.0.1", false).as_deref(), Some("issued"));
    }
}
