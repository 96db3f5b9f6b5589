//! Nix's worker protocol, the client side: one `nix-daemon --stdio` spoken to over its pipes.
//!
//! The protocol (worker protocol 1.34, which Nix 2.8 and every later Nix and Lix speak):
//! little-endian u64s, strings as a length and bytes padded to 8; a client's operation is
//! answered by log messages (`STDERR_*`) until `STDERR_LAST`, then the result.

use crate::daemon_cache::CacheSlot;
use crate::runner::{StorePathInfo, tail};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout};

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// 1.34: the first version with `BuildPathsWithResults` (a status per build, not one
/// error for all).
const PROTOCOL: u64 = (1 << 8) | 34;
const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;
const OP_ADD_INDIRECT_ROOT: u64 = 12;
const OP_QUERY_PATH_INFO: u64 = 26;
const OP_QUERY_VALID_PATHS: u64 = 31;
const OP_BUILD_PATHS_WITH_RESULTS: u64 = 46;
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_POST_BUILD_LOG_LINE: u64 = 107;
/// Activities at this level or below are what `nix-store` prints (`building '…'`,
/// `copying path '…'`); the rest is progress.
const LVL_INFO: u64 = 3;
/// Bounds on what the daemon may send: one string, one message's fields, one result's
/// outputs.
const MAX_STRING: u64 = 16 << 20;
const MAX_FIELDS: u64 = 1024;
const MAX_OUTPUTS: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    #[error("cannot talk to nix-daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("nix-daemon sent something unexpected: {0}")]
    Protocol(String),
    /// The daemon's own error for the operation (an invalid path, say).
    #[error("{0}")]
    Nix(String),
}

/// One `nix-daemon --stdio` and its pipes.
pub(crate) struct Conn {
    pub(crate) child: Child,
    r: BufReader<ChildStdout>,
    w: BufWriter<ChildStdin>,
    pub(crate) born: Instant,
    pub(crate) builds: u32,
    /// The daemon's CPU priority.
    pub(crate) nice: i32,
    /// Started ahead of the builds that will take it ([`crate::Nix::prewarm`]), and none
    /// has yet.
    pub(crate) ahead: bool,
    _cache: Option<CacheSlot>,
    /// The last of what the daemon printed on stderr (it says nothing there but when it
    /// dies: an assertion that failed, say).
    said: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Most of a daemon's stderr kept, bytes (its last words).
const SAID_BYTES: usize = 8 << 10;

/// What the daemon said of one build.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) status: u64,
    pub(crate) error: String,
    /// (output name, store path).
    pub(crate) outputs: Vec<(String, String)>,
}

impl Conn {
    /// Starts `program --stdio` with `settings`, its narinfo cache in `cache`'s directory
    /// (held as long as the connection lives), at CPU priority `nice` (its builds inherit it),
    /// under `covers` (see [`crate::isolation::build_command`]).
    pub(crate) async fn start(
        program: &Path,
        covers: Option<&Vec<std::path::PathBuf>>,
        settings: &[(String, String)],
        cache: Option<CacheSlot>,
        nice: i32,
    ) -> Result<Conn, DaemonError> {
        let mut c = crate::isolation::build_command(program, covers.map(Vec::as_slice));
        c.arg("--stdio");
        crate::runner::set_nice(&mut c, nice);
        if let Some(slot) = &cache {
            c.env("XDG_CACHE_HOME", slot.dir());
        }
        crate::runner::apply_settings(
            &mut c,
            settings.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
        );
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let (Some(w), Some(r)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(DaemonError::Protocol("no pipes".into()));
        };
        let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(mut e) = child.stderr.take() {
            let said = said.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = e.read(&mut buf).await {
                    if let Ok(mut s) = said.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        if s.len() > SAID_BYTES {
                            let mut cut = s.len() - SAID_BYTES;
                            while !s.is_char_boundary(cut) {
                                cut += 1;
                            }
                            s.drain(..cut);
                        }
                    }
                }
            });
        }
        let mut conn = Conn {
            child,
            r: BufReader::new(r),
            w: BufWriter::new(w),
            born: Instant::now(),
            builds: 0,
            nice,
            _cache: cache,
            ahead: false,
            said,
        };
        conn.u64(WORKER_MAGIC_1).await?;
        conn.w.flush().await?;
        if conn.read_u64().await? != WORKER_MAGIC_2 {
            return Err(DaemonError::Protocol("not a Nix daemon".into()));
        }
        let server = conn.read_u64().await?;
        if server >> 8 != 1 || server & 0xff < 34 {
            return Err(DaemonError::Protocol(format!(
                "protocol {}.{} (1.34 or later needed)",
                server >> 8,
                server & 0xff
            )));
        }
        conn.u64(PROTOCOL).await?;
        conn.u64(0).await?; // no CPU affinity
        conn.u64(0).await?; // reserveSpace: obsolete
        conn.w.flush().await?;
        conn.read_string().await?; // the daemon's Nix version
        conn.messages(&mut |_| {}, &mut Vec::new()).await?;
        Ok(conn)
    }

    /// The failure a build on this connection ends in when the connection broke with `e`:
    /// the daemon's abort (below) when it was one, else the machine's.
    pub(crate) async fn broken(&mut self, e: DaemonError) -> crate::messages::Failure {
        self.aborted()
            .await
            .unwrap_or(crate::messages::Failure::Infra(e.to_string()))
    }

    /// What broke a connection, when it was the daemon aborting on a failed assertion while
    /// it built (Nix 2.8 does, on a fixed-output derivation whose output refers to a store
    /// path): that build's own failure, not the machine's. Waits a moment for it to exit.
    async fn aborted(&mut self) -> Option<crate::messages::Failure> {
        use std::os::unix::process::ExitStatusExt as _;
        let status = tokio::time::timeout(std::time::Duration::from_secs(2), self.child.wait())
            .await
            .ok()?
            .ok()?;
        // Its last words come through the pipe just before it ends.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let said = self.said.lock().map(|s| s.clone()).unwrap_or_default();
        crate::messages::aborted(status.signal(), &said)
    }

    async fn u64(&mut self, n: u64) -> std::io::Result<()> {
        self.w.write_all(&n.to_le_bytes()).await
    }

    async fn string(&mut self, s: &str) -> std::io::Result<()> {
        self.u64(s.len() as u64).await?;
        self.w.write_all(s.as_bytes()).await?;
        let pad = (8 - s.len() % 8) % 8;
        self.w.write_all(&[0u8; 8][..pad]).await
    }

    async fn read_u64(&mut self) -> Result<u64, DaemonError> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).await?;
        Ok(u64::from_le_bytes(b))
    }

    async fn read_string(&mut self) -> Result<String, DaemonError> {
        let n = self.read_u64().await?;
        if n > MAX_STRING {
            return Err(DaemonError::Protocol(format!("a string of {n} bytes")));
        }
        let padded = (n as usize).div_ceil(8) * 8;
        let mut b = vec![0u8; padded];
        self.r.read_exact(&mut b).await?;
        b.truncate(n as usize);
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// An activity's or a result's fields; the strings among them.
    async fn read_fields(&mut self) -> Result<Vec<String>, DaemonError> {
        let n = self.read_u64().await?;
        if n > MAX_FIELDS {
            return Err(DaemonError::Protocol(format!("{n} fields")));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            match self.read_u64().await? {
                0 => {
                    self.read_u64().await?;
                }
                1 => out.push(self.read_string().await?),
                t => return Err(DaemonError::Protocol(format!("field type {t}"))),
            }
        }
        Ok(out)
    }

    /// Log messages up to `STDERR_LAST`: what `nix-store` would print goes to `log` as text,
    /// the builder's lines included; the texts of started activities to `activities`.
    async fn messages(
        &mut self,
        log: &mut (dyn FnMut(&[u8]) + Send),
        activities: &mut Vec<String>,
    ) -> Result<(), DaemonError> {
        loop {
            match self.read_u64().await? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT => {
                    let mut s = self.read_string().await?;
                    if !s.ends_with('\n') {
                        s.push('\n');
                    }
                    log(s.as_bytes());
                }
                STDERR_START_ACTIVITY => {
                    let _id = self.read_u64().await?;
                    let level = self.read_u64().await?;
                    let _kind = self.read_u64().await?;
                    let text = self.read_string().await?;
                    self.read_fields().await?;
                    let _parent = self.read_u64().await?;
                    if level <= LVL_INFO && !text.is_empty() {
                        log(format!("{text}...\n").as_bytes());
                        activities.push(text);
                    }
                }
                STDERR_STOP_ACTIVITY => {
                    self.read_u64().await?;
                }
                STDERR_RESULT => {
                    let _id = self.read_u64().await?;
                    let kind = self.read_u64().await?;
                    let fields = self.read_fields().await?;
                    if matches!(kind, RES_BUILD_LOG_LINE | RES_POST_BUILD_LOG_LINE)
                        && let Some(line) = fields.first()
                    {
                        log(format!("{line}\n").as_bytes());
                    }
                }
                STDERR_WRITE => {
                    self.read_string().await?;
                }
                STDERR_ERROR => {
                    let _type = self.read_string().await?;
                    let _level = self.read_u64().await?;
                    let _name = self.read_string().await?;
                    let msg = self.read_string().await?;
                    if self.read_u64().await? != 0 {
                        return Err(DaemonError::Protocol("an error with a position".into()));
                    }
                    let traces = self.read_u64().await?;
                    if traces > MAX_FIELDS {
                        return Err(DaemonError::Protocol(format!("{traces} traces")));
                    }
                    for _ in 0..traces {
                        if self.read_u64().await? != 0 {
                            return Err(DaemonError::Protocol("a trace with a position".into()));
                        }
                        self.read_string().await?;
                    }
                    return Err(DaemonError::Nix(msg));
                }
                STDERR_READ => {
                    return Err(DaemonError::Protocol("asked for data".into()));
                }
                m => return Err(DaemonError::Protocol(format!("message {m:#x}"))),
            }
        }
    }

    /// Realises one derived path (`BuildPathsWithResults`, normal mode): `DRV!*` builds
    /// every output of a derivation, a plain store path is substituted.
    pub(crate) async fn build(
        &mut self,
        path: &str,
        log: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<Outcome, DaemonError> {
        self.builds += 1;
        self.u64(OP_BUILD_PATHS_WITH_RESULTS).await?;
        self.u64(1).await?;
        self.string(path).await?;
        self.u64(0).await?;
        self.w.flush().await?;
        self.messages(log, &mut Vec::new()).await?;
        let n = self.read_u64().await?;
        if n != 1 {
            return Err(DaemonError::Protocol(format!("{n} results for one build")));
        }
        let _path = self.read_string().await?;
        let status = self.read_u64().await?;
        let error = self.read_string().await?;
        for _ in 0..4 {
            // timesBuilt, isNonDeterministic, startTime, stopTime
            self.read_u64().await?;
        }
        let m = self.read_u64().await?;
        if m > MAX_OUTPUTS {
            return Err(DaemonError::Protocol(format!("{m} outputs")));
        }
        let mut outputs = Vec::new();
        for _ in 0..m {
            let id = self.read_string().await?;
            let realisation = self.read_string().await?;
            let name = id.rsplit_once('!').map(|(_, n)| n.to_string());
            let path = serde_json::from_str::<serde_json::Value>(&realisation)
                .ok()
                .and_then(|v| v.get("outPath")?.as_str().map(String::from))
                .map(|p| {
                    if p.starts_with('/') {
                        p
                    } else {
                        format!("/nix/store/{p}")
                    }
                });
            match (name, path) {
                (Some(n), Some(p)) if is_store_path(&p) => outputs.push((n, p)),
                _ => {
                    return Err(DaemonError::Protocol(format!(
                        "an output {id}: {}",
                        tail(&realisation, 200)
                    )));
                }
            }
        }
        outputs.sort();
        Ok(Outcome {
            status,
            error,
            outputs,
        })
    }

    /// What the store knows of `path` (None: not valid).
    pub(crate) async fn query_path_info(
        &mut self,
        path: &str,
    ) -> Result<Option<StorePathInfo>, DaemonError> {
        self.u64(OP_QUERY_PATH_INFO).await?;
        self.string(path).await?;
        self.w.flush().await?;
        self.messages(&mut |_| {}, &mut Vec::new()).await?;
        if self.read_u64().await? == 0 {
            return Ok(None);
        }
        let deriver = self.read_string().await?;
        let hex = self.read_string().await?;
        let n = self.read_u64().await?;
        if n > MAX_OUTPUTS * 16 {
            return Err(DaemonError::Protocol(format!("{n} references")));
        }
        let mut references = Vec::new();
        for _ in 0..n {
            references.push(self.read_string().await?);
        }
        let _registered = self.read_u64().await?;
        let nar_size = self.read_u64().await?;
        let _ultimate = self.read_u64().await?;
        let sigs = self.read_u64().await?;
        if sigs > MAX_FIELDS {
            return Err(DaemonError::Protocol(format!("{sigs} signatures")));
        }
        for _ in 0..sigs {
            self.read_string().await?;
        }
        let ca = self.read_string().await?;
        // The NAR hash travels as bare SHA-256 hex; Nix prints it as SRI.
        let nar_hash = crate::hash::Hash::parse(&format!("sha256:{hex}"), None)
            .ok_or_else(|| DaemonError::Protocol(format!("a NAR hash {hex:?}")))?
            .to_sri();
        references.sort();
        Ok(Some(StorePathInfo {
            path: path.to_string(),
            nar_hash,
            nar_size,
            references,
            deriver: (!deriver.is_empty()).then_some(deriver),
            ca: (!ca.is_empty()).then_some(ca),
        }))
    }

    /// Which of `paths` are valid in the store (never substituted to make them so).
    pub(crate) async fn query_valid_paths(
        &mut self,
        paths: &[String],
    ) -> Result<Vec<String>, DaemonError> {
        self.u64(OP_QUERY_VALID_PATHS).await?;
        self.u64(paths.len() as u64).await?;
        for p in paths {
            self.string(p).await?;
        }
        // Protocol 1.27 on: whether to substitute what is missing.
        self.u64(0).await?;
        self.w.flush().await?;
        self.messages(&mut |_| {}, &mut Vec::new()).await?;
        let n = self.read_u64().await?;
        if n > paths.len() as u64 {
            return Err(DaemonError::Protocol(format!(
                "{n} valid paths of {} asked for",
                paths.len()
            )));
        }
        let mut valid = Vec::with_capacity(n as usize);
        for _ in 0..n {
            valid.push(self.read_string().await?);
        }
        Ok(valid)
    }

    /// Registers `link` (a symlink into the store) as an indirect GC root.
    pub(crate) async fn add_indirect_root(&mut self, link: &Path) -> Result<(), DaemonError> {
        self.u64(OP_ADD_INDIRECT_ROOT).await?;
        self.string(&link.to_string_lossy()).await?;
        self.w.flush().await?;
        self.messages(&mut |_| {}, &mut Vec::new()).await?;
        self.read_u64().await?;
        Ok(())
    }
}

/// `/nix/store/NAME`, one component, no `..`: what an output path from the daemon must be
/// before it is linked to.
fn is_store_path(p: &str) -> bool {
    p.strip_prefix("/nix/store/")
        .is_some_and(|n| !n.is_empty() && n.len() <= 211 && !n.contains('/') && !n.starts_with('.'))
}

/// The exit code `nix-store --realise` gives for a build status, for the one classifier of
/// failures (0x60 | 0x04 permanent | 0x01 timed out | 0x02 hash mismatch; 1 for the rest).
pub(crate) fn exit_code(status: u64) -> i32 {
    match status {
        // TimedOut
        8 => 101,
        // OutputRejected: a fixed output's hash mismatch
        5 => 102,
        // NotDeterministic, as nix-store says it (0x60 | 0x08)
        12 => 104,
        // PermanentFailure, InputRejected, CachedFailure, DependencyFailed,
        // LogLimitExceeded
        3 | 4 | 7 | 10 | 11 => 100,
        // TransientFailure, MiscFailure, NoSubstituters, anything newer
        _ => 1,
    }
}

/// Built, substituted or already valid (or resolved to a valid one).
pub(crate) fn succeeded(status: u64) -> bool {
    matches!(status, 0..=2 | 13)
}

/// AlreadyValid or ResolvesToAlreadyValid: nothing was built or fetched.
pub(crate) fn is_already_valid(status: u64) -> bool {
    matches!(status, 2 | 13)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_what_nix_store_exits_with() {
        assert!(succeeded(0) && succeeded(1) && succeeded(2) && succeeded(13));
        assert!(!succeeded(3) && !succeeded(8));
        assert!(is_already_valid(2) && is_already_valid(13));
        assert!(!is_already_valid(0) && !is_already_valid(1));
        assert_eq!(exit_code(8), 101);
        assert_eq!(exit_code(5), 102);
        assert_eq!(exit_code(3), 100);
        assert_eq!(exit_code(10), 100);
        assert_eq!(exit_code(12), 104);
        assert_eq!(exit_code(6), 1);
        assert_eq!(exit_code(99), 1);
    }
}
