//! Source snapshot uploads: streamed to disk as they arrive (never buffered whole), hashed on
//! the way, bounded in size, in number (in all and per client) and in idle time, and checked
//! whole before they are kept.

use nixfarm_core::snapshot;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// Bytes an upload must send within each idle limit (`upload_idle_secs`) to be going on:
/// 64 KiB, which any link a client uploads over sends in well under a second.
pub const MIN_PROGRESS_BYTES: u64 = 64 << 10;

/// The limits uploads are held to.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub snapshot: snapshot::Limits,
    /// Uploads in progress at once, from everyone.
    pub max_concurrent: usize,
    /// Uploads in progress at once from one client address.
    pub per_client: usize,
    /// Longest wait for the next [`MIN_PROGRESS_BYTES`] (or the end).
    pub idle: Duration,
}

/// Held while an upload puts its snapshot in place, while a submit checks the snapshot it
/// names and stores its run, and while the sweep decides what to remove and removes it: no
/// run is accepted on a snapshot the sweep is removing, and no snapshot is removed in the
/// instant an upload of the same content lands on it.
#[derive(Debug, Clone, Default)]
pub struct SnapshotsLock(Arc<Mutex<()>>);

impl SnapshotsLock {
    pub fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        // It guards no data: a panic while it was held left nothing half-done.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Admits and receives uploads into the coordinator's sources directory.
pub struct Uploads {
    dir: PathBuf,
    placed: SnapshotsLock,
    limits: UploadLimits,
    total: Arc<Semaphore>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// A place among the uploads in progress; freed when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    client: Option<IpAddr>,
    uploads: Arc<Uploads>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.client
            && let Ok(mut m) = self.uploads.per_client.lock()
            && let Some(n) = m.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// How long an uploaded snapshot is kept after the last run that names it began
/// (`--fix-hashes` reads a run's snapshot once the run is over).
pub const SNAPSHOT_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a snapshot no run names is kept (its submit follows its upload).
pub const UNCLAIMED_KEEP: Duration = Duration::from_secs(3600);

/// Removes from `dir` the snapshots (`<digest>.tar`) not in `wanted` and older than
/// [`UNCLAIMED_KEEP`]: an upload needs no run, so without this a client could fill the
/// state directory (which holds the database too). Returns how many went. Called with the
/// [`SnapshotsLock`] held since `wanted` was read.
pub fn sweep_snapshots(dir: &Path, wanted: &std::collections::HashSet<String>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(digest) = name.strip_suffix(".tar") else {
            continue;
        };
        if !snapshot::is_digest(digest) || wanted.contains(digest) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > UNCLAIMED_KEEP);
        if old && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A partial upload, removed unless it was kept.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Uploads {
    /// Uploads into `dir`, placed under `placed`; partial uploads a crash left behind are
    /// removed.
    pub fn new(dir: &Path, limits: UploadLimits, placed: SnapshotsLock) -> Arc<Uploads> {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".upload-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Arc::new(Uploads {
            dir: dir.to_path_buf(),
            placed,
            limits,
            total: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for an upload from `client`, or says why there is none (at once: a
    /// client is never left waiting on a full coordinator).
    pub fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Result<Slot, Status> {
        let permit = self.total.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the coordinator is receiving {} uploads already (its limit); try again shortly",
                self.limits.max_concurrent
            ))
        })?;
        if let Some(ip) = client {
            let mut m = self
                .per_client
                .lock()
                .map_err(|_| Status::internal("upload bookkeeping is broken"))?;
            let n = m.entry(ip).or_insert(0);
            if *n >= self.limits.per_client {
                return Err(Status::resource_exhausted(format!(
                    "{} uploads from {ip} are in progress already (the limit per client); wait for one to finish",
                    self.limits.per_client
                )));
            }
            *n += 1;
        }
        Ok(Slot {
            _permit: permit,
            client,
            uploads: self.clone(),
        })
    }

    /// Receives one upload: returns its digest and size once it is checked and stored. It
    /// must send [`MIN_PROGRESS_BYTES`] (or end) within each idle limit.
    pub async fn receive<S>(&self, _slot: &Slot, mut next: S) -> Result<(String, u64), Status>
    where
        S: AsyncChunks,
    {
        let tmp = self.dir.join(format!(".upload-{:016x}", fastrand::u64(..)));
        let mut partial = Partial(Some(tmp.clone()));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Status::internal(format!("cannot store the upload: {e}")))?;
        let mut out = tokio::io::BufWriter::with_capacity(256 << 10, file);
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let cap = snapshot::max_tar_bytes(self.limits.snapshot);
        let idle = self.limits.idle;
        // Only bytes count as progress: a client that sends empty or tiny chunks, each just
        // before the idle limit, would otherwise hold its place for ever.
        let mut quiet_until = tokio::time::Instant::now() + idle;
        let mut since: u64 = 0;
        loop {
            let chunk = match tokio::time::timeout_at(quiet_until, next.next_chunk()).await {
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "the upload sent less than {} KiB in {} s; aborted",
                        MIN_PROGRESS_BYTES >> 10,
                        idle.as_secs()
                    )));
                }
                Ok(r) => r?,
            };
            let Some(data) = chunk else { break };
            since += data.len() as u64;
            if since >= MIN_PROGRESS_BYTES {
                since = 0;
                quiet_until = tokio::time::Instant::now() + idle;
            }
            size += data.len() as u64;
            if size > cap {
                return Err(Status::resource_exhausted(format!(
                    "the snapshot is larger than this coordinator's limit of {} bytes",
                    self.limits.snapshot.max_bytes
                )));
            }
            hasher.update(&data);
            out.write_all(&data)
                .await
                .map_err(|e| Status::internal(format!("cannot store the upload: {e}")))?;
        }
        out.flush()
            .await
            .map_err(|e| Status::internal(format!("cannot store the upload: {e}")))?;
        out.get_ref()
            .sync_all()
            .await
            .map_err(|e| Status::internal(format!("cannot store the upload: {e}")))?;
        drop(out);
        let limits = self.limits.snapshot;
        let path = tmp.clone();
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            Ok::<_, std::io::Error>(snapshot::verify(std::io::BufReader::new(f), limits))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let digest = data_encoding::HEXLOWER.encode(&hasher.finalize());
        let (placed, dest) = (self.placed.clone(), self.dir.join(format!("{digest}.tar")));
        let from = tmp.clone();
        tokio::task::spawn_blocking(move || {
            let _held = placed.hold();
            std::fs::rename(&from, &dest)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        partial.0 = None;
        Ok((digest, size))
    }
}

/// A source of upload chunks (the gRPC stream; a plain iterator in tests).
pub trait AsyncChunks {
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, Status>> + Send;
}

impl AsyncChunks for tonic::Streaming<nixfarm_proto::v1::SourceChunk> {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Status> {
        Ok(self.message().await?.map(|c| c.data))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Dates `p` back beyond [`UNCLAIMED_KEEP`].
    pub(crate) fn older_than_unclaimed(p: &Path) {
        let then = std::time::SystemTime::now() - UNCLAIMED_KEEP - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(then)
            .unwrap();
    }

    struct Chunks(std::vec::IntoIter<Vec<u8>>, bool);

    impl AsyncChunks for Chunks {
        async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Status> {
            match self.0.next() {
                Some(c) => Ok(Some(c)),
                None if self.1 => std::future::pending().await,
                None => Ok(None),
            }
        }
    }

    /// A client that sends an empty chunk every so often, for ever.
    struct Dribble(Duration);

    impl AsyncChunks for Dribble {
        async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Status> {
            tokio::time::sleep(self.0).await;
            Ok(Some(Vec::new()))
        }
    }

    fn limits() -> UploadLimits {
        UploadLimits {
            snapshot: snapshot::Limits {
                max_bytes: 1 << 20,
                max_entries: 100,
            },
            max_concurrent: 2,
            per_client: 1,
            idle: Duration::from_millis(200),
        }
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn snapshots_no_run_wants_go_once_they_are_old() {
        let dir = tempfile::tempdir().unwrap();
        let d = |c: char| c.to_string().repeat(64);
        for (digest, old) in [(d('a'), true), (d('b'), true), (d('c'), false)] {
            let p = dir.path().join(format!("{digest}.tar"));
            std::fs::write(&p, b"tar").unwrap();
            if old {
                older_than_unclaimed(&p);
            }
        }
        std::fs::write(dir.path().join("notes.txt"), b"kept").unwrap();
        let wanted = [d('b')].into_iter().collect();
        assert_eq!(sweep_snapshots(dir.path(), &wanted), 1);
        let left: Vec<bool> = ['a', 'b', 'c']
            .iter()
            .map(|c| dir.path().join(format!("{}.tar", d(*c))).exists())
            .collect();
        // a: old, no run: gone. b: a run wants it. c: just uploaded, its submit may come.
        assert_eq!(left, [false, true, true]);
        assert!(dir.path().join("notes.txt").exists());
    }

    /// The sweep finds an old copy of a snapshot no run wants while the same snapshot is
    /// uploaded again: the upload lands after the sweep, and stays.
    // The test holds the lock across its wait on purpose, standing in for a sweep; only the
    // upload's blocking thread asks for it meanwhile.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn an_upload_landing_during_a_sweep_is_not_swept() {
        let dir = tempfile::tempdir().unwrap();
        let lock = SnapshotsLock::default();
        let up = Uploads::new(dir.path(), limits(), lock.clone());
        let bytes = tar_of(&[("flake.nix", b"{}")]);
        let digest = snapshot::digest(&bytes);
        let p = dir.path().join(format!("{digest}.tar"));
        std::fs::write(&p, &bytes).unwrap();
        older_than_unclaimed(&p);
        let held = lock.hold();
        let uploading = tokio::spawn({
            let up = up.clone();
            async move {
                let slot = up.admit(None).unwrap();
                up.receive(&slot, Chunks(vec![bytes].into_iter(), false))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The sweep, holding the lock: the copy it finds is old and nobody's.
        assert_eq!(
            sweep_snapshots(dir.path(), &std::collections::HashSet::new()),
            1
        );
        drop(held);
        assert_eq!(uploading.await.unwrap().unwrap().0, digest);
        assert!(p.is_file());
        assert_eq!(
            sweep_snapshots(dir.path(), &std::collections::HashSet::new()),
            0
        );
    }

    #[tokio::test]
    async fn an_upload_is_streamed_checked_and_stored_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploads::new(dir.path(), limits(), SnapshotsLock::default());
        let bytes = tar_of(&[("flake.nix", b"{}")]);
        let slot = up.admit(None).unwrap();
        let chunks = bytes.chunks(100).map(<[u8]>::to_vec).collect::<Vec<_>>();
        let (digest, size) = up
            .receive(&slot, Chunks(chunks.into_iter(), false))
            .await
            .unwrap();
        assert_eq!(digest, snapshot::digest(&bytes));
        assert_eq!(size, bytes.len() as u64);
        assert!(dir.path().join(format!("{digest}.tar")).is_file());
    }

    #[tokio::test]
    async fn uploads_are_capped_in_size_number_and_idle_time_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploads::new(dir.path(), limits(), SnapshotsLock::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let slot = up.admit(Some(ip)).unwrap();
        let e = up.admit(Some(ip)).err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("per client"), "{}", e.message());
        let other = up.admit(Some("127.0.0.2".parse().unwrap())).unwrap();
        let e = up.admit(None).err().unwrap();
        assert!(e.message().contains("try again shortly"), "{}", e.message());
        drop(other);
        // Too large: refused while arriving.
        let big = vec![vec![0u8; 1 << 20]; 4];
        let e = up
            .receive(&slot, Chunks(big.into_iter(), false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // Idle: aborted.
        let e = up
            .receive(&slot, Chunks(vec![vec![1u8; 10]].into_iter(), true))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        // Empty chunks, each well within the idle limit, are no progress: aborted too.
        let dribble = up.receive(&slot, Dribble(Duration::from_millis(50)));
        let e = tokio::time::timeout(Duration::from_secs(10), dribble)
            .await
            .expect("a dribbling upload is aborted")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert!(e.message().contains("less than 64 KiB"), "{}", e.message());
        // Not a snapshot: refused after arriving.
        let e = up
            .receive(&slot, Chunks(vec![vec![7u8; 4096]].into_iter(), false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        drop(slot);
        up.admit(Some(ip)).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
