//! Staging a store path for upload: its NAR streamed through SHA-256 and the compressor into
//! a file on disk, so memory stays bounded whatever the path's size.

use crate::{StoreError, io, nar};
use sha2::{Digest, Sha256};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// A NAR staged on disk, compressed, with its hashes.
pub(crate) struct Staged {
    pub(crate) file: std::fs::File,
    /// Set when staged inside a file:// cache: the NAR is renamed into place, not copied.
    pub(crate) named: Option<tempfile::TempPath>,
    pub(crate) nar_hash: Vec<u8>,
    pub(crate) nar_size: u64,
    pub(crate) file_hash: Vec<u8>,
    pub(crate) file_size: u64,
}

/// Hashes and counts what passes through it.
struct Tee<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// How NARs are compressed on their way to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Xz,
}

impl Compression {
    /// The narinfo's `Compression:` value.
    pub fn narinfo_name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => "nar.zst",
            Compression::Xz => "nar.xz",
        }
    }
    /// Cachix's `compression` query parameter.
    pub(crate) fn cachix_param(self) -> &'static str {
        match self {
            Compression::Zstd => "zst",
            Compression::Xz => "xz",
        }
    }
    /// `zstd`/`zst`/`ZSTD`, `xz`/`XZ`.
    pub fn parse(s: &str) -> Option<Compression> {
        let is = |name: &str| s.eq_ignore_ascii_case(name);
        if is("zstd") || is("zst") {
            Some(Compression::Zstd)
        } else if is("xz") {
            Some(Compression::Xz)
        } else {
            None
        }
    }
}

/// The two encoders behind one writer.
enum Encoder<W: Write> {
    Zstd(zstd::stream::Encoder<'static, W>),
    Xz(xz2::write::XzEncoder<W>),
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
        }
    }
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> std::io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
        }
    }
}

pub(crate) fn stage(
    path: &Path,
    compression: Compression,
    level: i32,
    dir: Option<&Path>,
    multithread: bool,
) -> Result<Staged, StoreError> {
    let (tmp, named) = match dir {
        Some(d) => {
            let (f, p) = tempfile::NamedTempFile::new_in(d)
                .map_err(io(format!(
                    "cannot create a staging file in {}",
                    d.display()
                )))?
                .into_parts();
            (f, Some(p))
        }
        None => (
            tempfile::tempfile().map_err(io("cannot create a staging file"))?,
            None,
        ),
    };
    let compressed = Tee {
        inner: std::io::BufWriter::with_capacity(1 << 20, tmp),
        hash: Sha256::new(),
        len: 0,
    };
    let encoder = match compression {
        Compression::Zstd => {
            let mut e = zstd::stream::Encoder::new(compressed, level)
                .map_err(io("cannot start the zstd encoder"))?;
            // Compression runs on worker threads while this one archives and hashes (only
            // worth the threads' start-up for large paths).
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            if multithread && workers > 1 {
                let _ = e.multithread(workers);
                // Smaller jobs than zstd's default (4 windows) bound what the workers hold.
                let _ = e.set_parameter(zstd::zstd_safe::CParameter::JobSize(2 << 20));
            }
            Encoder::Zstd(e)
        }
        // Level 6, xz's default, as Nix uses.
        Compression::Xz => Encoder::Xz(xz2::write::XzEncoder::new(compressed, 6)),
    };
    let mut nar = Tee {
        inner: encoder,
        hash: Sha256::new(),
        len: 0,
    };
    // Buffered: the NAR's many small tokens reach the hasher and the encoder in large writes.
    let mut buffered = std::io::BufWriter::with_capacity(256 << 10, &mut nar);
    // A full disk is the staging directory's (a file:// cache's own nar/, or the temporary
    // directory), not the store's: said so, where.
    let staging = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let archiving = |e: std::io::Error| {
        let full = matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        );
        StoreError::Io {
            what: if full {
                format!(
                    "cannot archive {}: no room left where it is staged, {}",
                    path.display(),
                    staging.display()
                )
            } else {
                format!("cannot archive {}", path.display())
            },
            source: e,
        }
    };
    nar::dump(path, &mut buffered).map_err(archiving)?;
    buffered.flush().map_err(archiving)?;
    drop(buffered);
    let nar_hash = nar.hash.finalize().to_vec();
    let nar_size = nar.len;
    let compressed = nar.inner.finish().map_err(archiving)?;
    let file_hash = compressed.hash.finalize().to_vec();
    let file_size = compressed.len;
    let mut file = compressed.inner.into_inner().map_err(|e| StoreError::Io {
        what: "cannot write the staging file".into(),
        source: e.into_error(),
    })?;
    file.seek(SeekFrom::Start(0))
        .map_err(io("cannot rewind the staging file"))?;
    Ok(Staged {
        file,
        named,
        nar_hash,
        nar_size,
        file_hash,
        file_size,
    })
}
