//! Store queries (path infos, validity) over a pooled daemon: no Nix process per question.

use crate::daemon::{DaemonPool, Settings};
use crate::runner::{BuildOptions, Nix, NixError, StorePathInfo};
use crate::worker_protocol::Conn;
use std::sync::Arc;

impl Nix {
    /// A pooled daemon to ask, with the pool and the settings to put it back under.
    async fn query_conn(&self) -> Option<(&Arc<DaemonPool>, Settings, Conn)> {
        let pool = self.daemon.as_ref()?;
        let (settings, conn) = pool
            .take_for_query(&self.build_settings(&BuildOptions::default()))
            .await?;
        Some((pool, settings, conn))
    }

    /// [`Nix::closure_infos`] through a pooled daemon, one query per path of the closure
    /// (in this process, not a `nix path-info` each time). None when no daemon can be had.
    pub(crate) async fn closure_infos_daemon(
        &self,
        paths: &[String],
    ) -> Option<Result<Vec<StorePathInfo>, NixError>> {
        let (pool, settings, mut conn) = self.query_conn().await?;
        let mut seen: std::collections::BTreeMap<String, StorePathInfo> = Default::default();
        let mut todo: Vec<String> = paths.to_vec();
        while let Some(p) = todo.pop() {
            if seen.contains_key(&p) {
                continue;
            }
            if seen.len() >= 1_000_000 {
                return Some(Err(NixError::Infra(
                    "a closure of over 1,000,000 paths".into(),
                )));
            }
            match conn.query_path_info(&p).await {
                Ok(Some(info)) => {
                    todo.extend(
                        info.references
                            .iter()
                            .filter(|r| !seen.contains_key(*r))
                            .cloned(),
                    );
                    seen.insert(p, info);
                }
                Ok(None) => {
                    pool.put(settings, conn);
                    return Some(Err(NixError::Infra(format!("path '{p}' is not valid"))));
                }
                Err(e) => return Some(Err(NixError::Infra(e.to_string()))),
            }
        }
        pool.put(settings, conn);
        Some(Ok(seen.into_values().collect()))
    }

    /// [`Nix::path_infos`] through a pooled daemon, one query per path (no `nix path-info`
    /// process). None when no daemon can be had.
    pub(crate) async fn path_infos_daemon(
        &self,
        paths: &[String],
    ) -> Option<Result<Vec<StorePathInfo>, NixError>> {
        let (pool, settings, mut conn) = self.query_conn().await?;
        let mut infos = Vec::with_capacity(paths.len());
        for p in paths {
            match conn.query_path_info(p).await {
                Ok(Some(info)) => infos.push(info),
                Ok(None) => {
                    pool.put(settings, conn);
                    return Some(Err(NixError::Infra(format!("path '{p}' is not valid"))));
                }
                Err(e) => return Some(Err(NixError::Infra(e.to_string()))),
            }
        }
        pool.put(settings, conn);
        Some(Ok(infos))
    }

    /// Which of `paths` are not valid, asked of a pooled daemon (`nix-store
    /// --check-validity` without a process). None when no daemon can be had.
    pub(crate) async fn invalid_paths_daemon(
        &self,
        paths: &[String],
    ) -> Option<Result<Vec<String>, NixError>> {
        let (pool, settings, mut conn) = self.query_conn().await?;
        let mut invalid = Vec::new();
        for chunk in paths.chunks(2000) {
            match conn.query_valid_paths(chunk).await {
                Ok(valid) => {
                    let valid: std::collections::HashSet<String> = valid.into_iter().collect();
                    invalid.extend(chunk.iter().filter(|p| !valid.contains(*p)).cloned());
                }
                Err(e) => return Some(Err(NixError::Infra(e.to_string()))),
            }
        }
        pool.put(settings, conn);
        Some(Ok(invalid))
    }
}
