//! Binary cache URLs: one parser, so the CLI, the coordinator and the agents accept the same
//! caches and refuse the rest before a run starts.

use std::path::PathBuf;

/// Cachix's own API root.
pub const CACHIX_API: &str = "https://app.cachix.org/api/v1/";

/// Where a run's outputs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheTarget {
    File(PathBuf),
    Http(String),
    Cachix { name: String, api: String },
}

/// A cache URL nixfarm cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unsupported cache URL '{0}': use cachix://NAME, file:///path or http(s)://host/path (optionally ?compression=zstd|xz)"
)]
pub struct BadCacheUrl(pub String);

impl CacheTarget {
    /// `cachix://NAME` (with `?api=URL` to point at another API host), `file:///path`, or
    /// `http(s)://…` (a cache that accepts PUT); `?compression=zstd|xz` on any of them.
    pub fn parse(url: &str) -> Result<CacheTarget, BadCacheUrl> {
        let bad = || BadCacheUrl(crate::limits::clip(url, 200).to_string());
        if url.len() > crate::limits::MAX_CACHE_URL
            || url.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad());
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        if let Some(c) = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("compression="))
            && !matches!(c.to_ascii_lowercase().as_str(), "zstd" | "zst" | "xz")
        {
            return Err(bad());
        }
        if let Some(name) = base.strip_prefix("cachix://") {
            let name = name.trim_end_matches('/');
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad());
            }
            let api = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("api="))
                .map(String::from)
                .unwrap_or_else(|| CACHIX_API.to_string());
            if !(api.starts_with("http://") || api.starts_with("https://")) {
                return Err(bad());
            }
            let api = if api.ends_with('/') {
                api
            } else {
                format!("{api}/")
            };
            return Ok(CacheTarget::Cachix {
                name: name.into(),
                api,
            });
        }
        if let Some(path) = base.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad());
            }
            return Ok(CacheTarget::File(PathBuf::from(path)));
        }
        let host = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"));
        match host {
            Some(h) if !h.is_empty() && !h.starts_with('/') => {
                Ok(CacheTarget::Http(base.trim_end_matches('/').to_string()))
            }
            _ => Err(bad()),
        }
    }
}

/// Two spellings of one cache URL: equal but for a trailing `/`.
pub fn same_cache(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Whether a run with `cache` (empty: none of its own) is one that an operator's list of
/// run caches admits: an empty list admits any.
pub fn cache_listed(listed: &[String], cache: &str) -> bool {
    cache.is_empty() || listed.is_empty() || listed.iter().any(|c| same_cache(c, cache))
}

/// Whether `k` has the shape of a Nix public key, `NAME:BASE64`, on one line.
pub fn is_public_key(k: &str) -> bool {
    k.split_once(':')
        .is_some_and(|(n, b)| !n.is_empty() && !b.is_empty())
        && !k.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_lists_of_caches_and_keys() {
        let listed = vec![
            "cachix://team".to_string(),
            "https://c.example.org/".to_string(),
        ];
        assert!(cache_listed(&listed, "cachix://team/"));
        assert!(cache_listed(&listed, "https://c.example.org"));
        assert!(cache_listed(&listed, ""), "no cache of its own");
        assert!(cache_listed(&[], "https://any.example.org"), "no list");
        assert!(!cache_listed(
            &listed,
            "cachix://team?api=http://evil.example/"
        ));
        assert!(!cache_listed(&listed, "CACHIX://team"));
        assert!(is_public_key("team-1:AAAA"));
        for bad in ["team-1", ":AAAA", "team-1:", "team 1:AAAA", "t:A\nB"] {
            assert!(!is_public_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_caches_nixfarm_pushes_to_and_nothing_else() {
        assert_eq!(
            CacheTarget::parse("cachix://my-cache").unwrap(),
            CacheTarget::Cachix {
                name: "my-cache".into(),
                api: CACHIX_API.into()
            }
        );
        assert!(matches!(
            CacheTarget::parse("file:///srv/cache?compression=zstd").unwrap(),
            CacheTarget::File(p) if p == std::path::Path::new("/srv/cache")
        ));
        assert!(
            matches!(CacheTarget::parse("https://c.example/x/").unwrap(), CacheTarget::Http(u) if u == "https://c.example/x")
        );
        for bad in [
            "s3://x",
            "file://relative",
            "cachix://",
            "cachix://a b",
            "ftp://x",
            "https://",
            "file:///x?compression=gzip",
            "cachix://c?api=file:///etc",
        ] {
            assert!(CacheTarget::parse(bad).is_err(), "{bad}");
        }
        let long = format!("https://c.example/{}", "x".repeat(5000));
        let e = CacheTarget::parse(&long).unwrap_err().to_string();
        assert!(
            e.len() < 400,
            "the error echoes the whole URL: {} bytes",
            e.len()
        );
    }
}
