//! Builds over Nix's daemon protocol: a long-lived `nix-daemon --stdio` per set of build
//! settings, reused build after build, so a build costs no Nix process start. With Nix 2.8 a
//! trivial derivation takes about 8 ms this way against about 40 ms with one
//! `nix-store --realise` each (measured here). Only for a store this process owns (no
//! `NIX_REMOTE`): in front of a system daemon `--stdio` only relays bytes, and the settings
//! given to it would not reach the builds. Any failure to start or speak to it falls back to
//! `nix-store`.
//! The protocol itself is in `worker_protocol.rs`.

use crate::messages::{Failure, classify_nix_failure};
use crate::runner::{BuildOptions, BuildRun, Nix, TailBuffer, tail};
use crate::worker_protocol::{Conn, DaemonError, exit_code, is_already_valid, succeeded};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How much nicer than the agent a build far off its run's longest chain runs: a build the
/// run waits on gets the CPU first, and these still get what it leaves.
pub(crate) const BACKGROUND_NICE: i32 = 10;
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether builds land in a store this process owns: no `NIX_REMOTE` naming another, and
/// the store's state directory writable here.
fn owns_store() -> bool {
    let remote = std::env::var("NIX_REMOTE").unwrap_or_default();
    let state = std::env::var_os("NIX_STATE_DIR")
        .map_or_else(|| PathBuf::from("/nix/var/nix"), PathBuf::from);
    let probe = if state.exists() {
        state
    } else {
        PathBuf::from("/nix")
    };
    let writable = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        // SAFETY: access(2) reads a NUL-terminated path we own; no memory is written.
        .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0);
    (remote.is_empty() || remote == "local") && writable
}

pub(crate) use crate::daemon_pool::{DaemonPool, Settings};

impl Nix {
    /// The settings of a build, as `--option NAME VALUE` pairs: the same for `nix-store` and
    /// for a daemon started for such builds.
    pub(crate) fn build_settings(&self, opts: &BuildOptions) -> Vec<(String, String)> {
        // A cache with no key to check what it serves is no substituter: a run's cache is
        // its submitter's choice, and what is substituted lands in this store for every
        // later run (Nix's own rule: signatures are required).
        let substituter = if opts.trusted_public_keys.is_empty() {
            String::new()
        } else {
            opts.substituter.clone()
        };
        let mut out = vec![
            ("substituters".to_string(), substituter.clone()),
            ("builders".to_string(), String::new()),
        ];
        let mut set = |k: &str, v: String| out.push((k.to_string(), v));
        if let Some(h) = &self.build_hook {
            set("build-hook", h.display().to_string());
        }
        if !opts.system_features.is_empty() {
            set("system-features", opts.system_features.join(" "));
        }
        if let Some(n) = &opts.netrc {
            set("netrc-file", n.display().to_string());
        }
        if let Some(ca) = &opts.ssl_cert_file {
            set("ssl-cert-file", ca.display().to_string());
            // Fixed-output builds get the CA file's path (NIX_SSL_CERT_FILE): in a sandbox
            // it must be there too (`?`: a build does not fail for want of it).
            set("extra-sandbox-paths", format!("{}?", ca.display()));
        }
        if !substituter.is_empty() {
            // The farm's cache gains paths while a run goes: a "not there" remembered from
            // a minute ago would have Nix build an input again instead of fetching it.
            set("narinfo-cache-negative-ttl", "0".into());
            set("trusted-public-keys", opts.trusted_public_keys.join(" "));
        }
        if let Some(t) = opts.timeout {
            set("timeout", t.as_secs().max(1).to_string());
        }
        if let Some(t) = opts.max_silent {
            set("max-silent-time", t.as_secs().max(1).to_string());
        }
        out
    }

    /// Has builds go through long-lived `nix-daemon --stdio` processes (no Nix process start
    /// per build) when this process owns its store: not when `NIX_REMOTE` names another
    /// store, or the store's state directory is not writable here. Falls back to
    /// `nix-store --realise` by itself if no daemon can be started. Each daemon keeps its
    /// narinfo cache in a directory of its own under `work_dir/nix-cache`.
    pub fn with_daemon(mut self, work_dir: &std::path::Path) -> Nix {
        if !owns_store() {
            tracing::info!("builds use nix-store --realise: the store is not this process's own");
            return self;
        }
        let program = match self.nix_store.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("nix-daemon"),
            _ => PathBuf::from("nix-daemon"),
        };
        self.daemon = Some(std::sync::Arc::new(crate::daemon::DaemonPool::new(
            program,
            work_dir.join("nix-cache"),
            self.build_covers.clone(),
        )));
        self
    }

    /// Whether builds run under covers (see [`Nix::with_build_isolation`]): they read what
    /// was left readable to them.
    pub fn builds_covered(&self) -> bool {
        self.build_covers.is_some()
    }

    /// Builds in a store this process owns run as its user when that is not root (there
    /// are no build users then, and no sandbox here): they get the covers evaluations get
    /// (`own`), but for `readable` (what Nix itself reads while building: the farm cache's
    /// netrc). Call before [`Nix::with_daemon`], whose daemons run so. Builds through a
    /// system daemon run as its build users, and a root agent's as root or its build users:
    /// neither is covered.
    pub fn with_build_isolation(
        mut self,
        own: Option<&std::sync::Arc<Vec<PathBuf>>>,
        readable: &[PathBuf],
    ) -> Nix {
        if let Some(own) = own
            && !crate::isolation::is_root()
            && owns_store()
        {
            let covered = own
                .iter()
                .filter(|p| !readable.contains(p))
                .cloned()
                .collect();
            self.build_covers = Some(std::sync::Arc::new(covered));
        }
        self
    }

    /// Starts `n` daemons for builds with `opts` ahead of them, in the background (when
    /// builds go through daemons): a run's first builds then find one waiting instead of
    /// starting it on their critical path. Unused ones stop after a few seconds.
    pub fn prewarm(&self, opts: &BuildOptions, n: usize) {
        let Some(pool) = self.daemon.clone() else {
            return;
        };
        pool.prewarm(self.build_settings(opts), n);
    }

    /// True while builds go through daemons (set up with [`Nix::with_daemon`], and none has
    /// failed to start).
    pub fn daemon_active(&self) -> bool {
        self.daemon.as_ref().is_some_and(|p| p.active())
    }

    /// Builds `drv` through a pooled daemon; None when no daemon can be had (the caller
    /// runs `nix-store`).
    pub(crate) async fn realise_daemon(
        &self,
        pool: &Arc<DaemonPool>,
        drv: &str,
        opts: &BuildOptions,
        cancel: &CancellationToken,
        on_log: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Option<BuildRun> {
        let start = Instant::now();
        let settings = self.build_settings(opts);
        let nice = if opts.background { BACKGROUND_NICE } else { 0 };
        let mut conn = pool.take(&settings, nice).await?;
        let mut log = TailBuffer::build_log(self.log_tail_bytes.max(64 * 1024));
        let pid = conn.child.id();
        let mut cancelled = false;
        let outcome = {
            let mut sink = |b: &[u8]| {
                on_log(b);
                log.push(b);
            };
            let wanted = format!("{drv}!*");
            let fut = conn.build(&wanted, &mut sink);
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => r,
                _ = cancel.cancelled() => {
                    cancelled = true;
                    if let Some(pid) = pid {
                        crate::isolation::signal(pid, libc::SIGINT);
                    }
                    tokio::time::timeout(STOP_TIMEOUT, fut)
                        .await
                        .unwrap_or_else(|_| Err(DaemonError::Protocol("did not stop".into())))
                }
            }
        };
        let mut full = log.text();
        // Reused only when the exchange ended where the protocol says it does.
        let mut reusable = false;
        let mut already_valid = false;
        let result = match outcome {
            _ if cancelled => Err(Failure::Infra("cancelled".into())),
            Ok(o) if succeeded(o.status) => {
                already_valid = is_already_valid(o.status);
                match self.root_outputs(&mut conn, opts, &o.outputs).await {
                    Ok(()) => {
                        reusable = true;
                        Ok(o.outputs.into_iter().map(|(_, p)| p).collect())
                    }
                    Err(e) => Err(Failure::Infra(format!(
                        "cannot add a GC root for {drv}: {e}"
                    ))),
                }
            }
            Ok(o) => {
                reusable = true;
                // Through the tail's buffer: Nix's message repeats the log's last lines,
                // a long one too.
                log.push(format!("error: {}\n", o.error).as_bytes());
                full = log.text();
                Err(classify_nix_failure(
                    Some(exit_code(o.status)),
                    &full,
                    &o.error,
                ))
            }
            Err(DaemonError::Nix(msg)) => {
                log.push(format!("error: {msg}\n").as_bytes());
                full = log.text();
                Err(classify_nix_failure(Some(1), &full, &msg))
            }
            Err(e) => Err(conn.broken(e).await),
        };
        if reusable {
            pool.put(settings, conn);
        }
        let (substituted, built) = crate::runner::what_nix_did(&full, drv);
        Some(BuildRun {
            substituted,
            built,
            already_valid,
            log_tail: tail(&full, self.log_tail_bytes),
            duration: start.elapsed(),
            result,
            cancelled,
        })
    }

    /// Substitutes `path` (with its references) from the build's substituter through a
    /// pooled daemon, as `nix copy --from` would: how a derivation evaluated on another host
    /// gets here. None when no daemon can be had.
    pub async fn substitute_daemon(
        &self,
        path: &str,
        opts: &BuildOptions,
    ) -> Option<Result<(), String>> {
        let pool = self.daemon.as_ref()?;
        let settings = self.build_settings(opts);
        let mut conn = pool.take(&settings, 0).await?;
        let mut said = String::new();
        let r = conn
            .build(path, &mut |b: &[u8]| {
                if said.len() < 4096 {
                    said.push_str(&String::from_utf8_lossy(b));
                }
            })
            .await;
        Some(match r {
            Ok(o) => {
                pool.put(settings, conn);
                if succeeded(o.status) {
                    Ok(())
                } else {
                    Err(crate::messages::strip_ansi(&o.error))
                }
            }
            Err(e) => Err(format!("{e} {}", tail(&said, 500))),
        })
    }

    /// What `--add-root R --indirect` does: `R` links to the output `out`, `R-NAME` to each
    /// other output, and each link is registered as a root.
    async fn root_outputs(
        &self,
        conn: &mut Conn,
        opts: &BuildOptions,
        outputs: &[(String, String)],
    ) -> Result<(), DaemonError> {
        let Some(root) = &opts.gc_root else {
            return Ok(());
        };
        for (name, path) in outputs {
            let link = if name == "out" {
                root.clone()
            } else {
                PathBuf::from(format!("{}-{name}", root.display()))
            };
            let tmp = PathBuf::from(format!("{}.tmp-{}", link.display(), std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(path, &tmp)?;
            std::fs::rename(&tmp, &link)?;
            conn.add_indirect_root(&link).await?;
        }
        Ok(())
    }
}
