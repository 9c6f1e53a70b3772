//! `--compress`: images stored as `rootfs-{lang}.ext4.zst`.
//!
//! Upload: holes of the (sparse) image are found with `SEEK_DATA`/`SEEK_HOLE` and fed to zstd
//! as zeros without reading the disk; zstd turns long zero runs (free blocks) into a few bytes.
//! The compressed stream is cut into parts as it is produced, so nothing is staged on disk. The
//! metadata records the sha256 and size of the *uncompressed* content.
//!
//! Download: the stream is decompressed as it arrives, zero blocks are skipped (the result is
//! sparse again), the uncompressed sha256 is checked, then fsync and rename. Compressed
//! transfers restart instead of resuming (the stream cannot be entered in the middle).

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use crate::error::{Error, IoContext, Result};
use crate::object::{
    Body, GetOptions, Metadata, PartInfo, META_UNCOMPRESSED_SHA256, META_UNCOMPRESSED_SIZE,
};
use crate::transfer::{
    partial_paths, short_label, write_sparse, DownloadSummary, Engine, UploadSummary, MAX_PARTS,
};

const MIB: u64 = 1024 * 1024;
/// zstd level: 3 is zstd's default, fast enough to keep up with the network on one core.
pub const ZSTD_LEVEL: i32 = 3;
const READ_BUF: usize = 1024 * 1024;

/// Suffix of compressed objects.
pub const ZST_SUFFIX: &str = ".zst";

/// Compressed part size: 8 MiB, more if 10 000 parts of the uncompressed size need it.
fn compressed_part_size(uncompressed: u64) -> u64 {
    (uncompressed.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB).max(8 * MIB)
}

/// Collects encoder output into parts and hands them to the uploader.
struct PartSink {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    part_size: usize,
    sent: u64,
}

impl Write for PartSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // Parts are filled to exactly `part_size` in buffers allocated once at that size, so
        // memory is (parts in flight + 2) × part size.
        let total = data.len();
        let mut data = data;
        while !data.is_empty() {
            let room = self.part_size - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.part_size {
                let part = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size));
                self.sent += part.len() as u64;
                self.tx
                    .blocking_send(Bytes::from(part))
                    .map_err(|_| std::io::Error::other("upload stopped"))?;
            }
        }
        Ok(total)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PartSink {
    fn finish(mut self) -> std::io::Result<u64> {
        if !self.buf.is_empty() || self.sent == 0 {
            let part = std::mem::take(&mut self.buf);
            self.sent += part.len() as u64;
            self.tx
                .blocking_send(Bytes::from(part))
                .map_err(|_| std::io::Error::other("upload stopped"))?;
        }
        Ok(self.sent)
    }
}

/// Data regions of a file as (offset, len), from SEEK_DATA/SEEK_HOLE (whole file if the
/// filesystem cannot tell).
pub(crate) fn data_regions(file: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        let start = match lseek(file, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => return vec![(0, size)],
        };
        let end = lseek(file, start, Whence::SeekHole).unwrap_or(size as i64);
        out.push((start as u64, (end - start) as u64));
        pos = end;
    }
    out
}

fn compress_file(
    path: &Path,
    size: u64,
    sink: PartSink,
    workers: u32,
    on_read: impl Fn(u64),
) -> Result<(u64, String)> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice as A};
    let mut file = std::fs::File::open(path).ctx("open", path)?;
    let _ = posix_fadvise(&file, 0, 0, A::POSIX_FADV_SEQUENTIAL);
    let hasher = std::cell::RefCell::new(Sha256::new());
    let regions = data_regions(&file, size);
    let mut enc = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL).ctx("compress", path)?;
    enc.include_checksum(true).ctx("compress", path)?;
    enc.include_contentsize(false).ctx("compress", path)?;
    if workers > 1 {
        let _ = enc.multithread(workers);
    }
    let zeros = vec![0u8; READ_BUF];
    let mut buf = vec![0u8; READ_BUF];
    let mut pos = 0u64;
    let feed_zeros = |enc: &mut zstd::stream::write::Encoder<PartSink>, mut n: u64| {
        while n > 0 {
            let k = n.min(READ_BUF as u64) as usize;
            hasher.borrow_mut().update(&zeros[..k]);
            enc.write_all(&zeros[..k])?;
            on_read(k as u64);
            n -= k as u64;
        }
        Ok::<(), std::io::Error>(())
    };
    for (off, len) in regions {
        feed_zeros(&mut enc, off - pos).ctx("compress", path)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(off)).ctx("read", path)?;
        let mut left = len;
        while left > 0 {
            let k = left.min(READ_BUF as u64) as usize;
            file.read_exact(&mut buf[..k]).ctx("read", path)?;
            hasher.borrow_mut().update(&buf[..k]);
            enc.write_all(&buf[..k]).ctx("compress", path)?;
            on_read(k as u64);
            left -= k as u64;
        }
        pos = off + len;
    }
    feed_zeros(&mut enc, size - pos).ctx("compress", path)?;
    let sink = enc.finish().ctx("compress", path)?;
    let sent = sink.finish().ctx("compress", path)?;
    Ok((sent, hex::encode(hasher.into_inner().finalize())))
}

impl Engine {
    /// Uploads `path` compressed with zstd as `key` (which should end in `.zst`).
    ///
    /// `expected_sha256` (from the image's manifest) saves the hashing pass: the content is
    /// hashed while it is compressed and the upload is completed only if the two agree.
    pub async fn upload_compressed(
        &self,
        path: &Path,
        key: &str,
        extra: &Metadata,
        expected_sha256: Option<&str>,
    ) -> Result<UploadSummary> {
        let t0 = Instant::now();
        let md = std::fs::metadata(path).ctx("stat", path)?;
        let size = md.len();
        let claimed = match (self.hashes().sha256(path, &md), expected_sha256) {
            (Some(s), _) => s,
            (None, Some(e)) => e.to_ascii_lowercase(),
            (None, None) => self.local_sha256(path).await?,
        };
        let mut meta = extra.clone();
        meta.insert(META_UNCOMPRESSED_SHA256.into(), claimed.clone());
        meta.insert(META_UNCOMPRESSED_SIZE.into(), size.to_string());
        let part_size = compressed_part_size(size);
        let in_flight = self.options().concurrency.clamp(1, 2);
        let url = self.store().url_of(key);
        let id = format!("upz:{url}");
        self.progress()
            .start(&id, &short_label("compress+upload", key), Some(size));

        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let sink = PartSink {
            tx,
            buf: Vec::with_capacity(part_size as usize),
            part_size: part_size as usize,
            sent: 0,
        };
        let p = path.to_path_buf();
        let progress = self.progress().clone();
        let pid = id.clone();
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
            .min(4);
        let mut producer = Some(tokio::task::spawn_blocking(move || {
            compress_file(&p, size, sink, workers, |n| progress.advance(&pid, n))
        }));
        // Waits for the compressor; its sha256 must be the one announced in the metadata.
        let finish_producer = |producer: tokio::task::JoinHandle<Result<(u64, String)>>| async {
            let (sent, actual) = producer
                .await
                .map_err(|e| Error::io("compress", path, std::io::Error::other(e)))??;
            if actual != claimed {
                return Err(Error::SourceMismatch {
                    path: path.to_path_buf(),
                    expected: claimed.clone(),
                    actual,
                });
            }
            Ok(sent)
        };

        let result: Result<(crate::object::PutResult, usize, u64)> = async {
            let first = rx.recv().await;
            let second = rx.recv().await;
            let (first, second) = match (first, second) {
                (Some(f), None) => {
                    // Fits in one request; the compressor is done.
                    let sent = finish_producer(producer.take().expect("producer")).await?;
                    let r = self.store().put(key, Body::Bytes(f), &meta).await?;
                    return Ok((r, 1, sent));
                }
                (Some(f), Some(s)) => (f, s),
                (None, _) => {
                    return Err(finish_producer(producer.take().expect("producer"))
                        .await
                        .err()
                        .unwrap_or_else(|| {
                            Error::io(
                                "compress",
                                path,
                                std::io::Error::other("the compressor stopped"),
                            )
                        }))
                }
            };
            let upload_id = self.store().create_multipart(key, &meta).await?;
            let mut set: JoinSet<Result<PartInfo>> = JoinSet::new();
            let mut parts = Vec::new();
            let mut pending = vec![first, second].into_iter();
            let mut number = 0i32;
            let mut input_done = false;
            let r: Result<u64> = async {
                loop {
                    while set.len() < in_flight && !input_done {
                        let next = match pending.next() {
                            Some(b) => Some(b),
                            None => rx.recv().await,
                        };
                        let Some(b) = next else {
                            input_done = true;
                            break;
                        };
                        number += 1;
                        let store = self.store().clone();
                        let key = key.to_string();
                        let uid = upload_id.clone();
                        let n = number;
                        set.spawn(
                            async move { store.upload_part(&key, &uid, n, Body::Bytes(b)).await },
                        );
                    }
                    match set.join_next().await {
                        None => break,
                        Some(Ok(Ok(p))) => parts.push(p),
                        Some(Ok(Err(e))) => return Err(e),
                        Some(Err(e)) => {
                            return Err(Error::io("upload", path, std::io::Error::other(e)))
                        }
                    }
                }
                finish_producer(producer.take().expect("producer")).await
            }
            .await;
            let sent = match r {
                Ok(sent) => sent,
                Err(e) => {
                    set.abort_all();
                    let _ = self.store().abort_multipart(key, &upload_id).await;
                    return Err(e);
                }
            };
            parts.sort_by_key(|p| p.number);
            let n = parts.len();
            let r = self
                .store()
                .complete_multipart(key, &upload_id, &parts)
                .await?;
            Ok((r, n, sent))
        }
        .await;
        drop(rx);
        if let Some(p) = producer {
            let _ = p.await;
        }
        self.progress().finish(&id);
        let (r, parts, sent) = result?;
        self.hashes().record_sha256(path, &md, &claimed);
        self.hashes().save();
        Ok(UploadSummary {
            path: path.to_path_buf(),
            url,
            key: key.to_string(),
            size,
            bytes_sent: sent,
            sha256: claimed,
            etag: r.etag,
            version_id: r.version_id,
            parts,
            resumed_parts: 0,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Downloads a `.zst` object and writes the decompressed content (sparse) to `dest`.
    pub async fn download_compressed(
        &self,
        key: &str,
        dest: &Path,
        version_id: Option<&str>,
    ) -> Result<DownloadSummary> {
        let t0 = Instant::now();
        let info = self.store().head(key, version_id).await?;
        let url = self.store().url_of(key);
        let expected_sha = info.metadata.get(META_UNCOMPRESSED_SHA256).cloned();
        let expected_size: Option<u64> = info
            .metadata
            .get(META_UNCOMPRESSED_SIZE)
            .and_then(|s| s.parse().ok());
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        std::fs::create_dir_all(&dir).ctx("create", &dir)?;
        let (tmp, _) = partial_paths(dest);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .ctx("create", &tmp)?;
        if let Some(s) = expected_size {
            file.set_len(s).ctx("allocate", &tmp)?;
        }
        let id = format!("downz:{url}:{}", dest.display());
        self.progress().start(
            &id,
            &short_label("download+decompress", key),
            Some(info.size),
        );

        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let dtmp = tmp.clone();
        let target = url.clone();
        let decoder = tokio::task::spawn_blocking(move || -> Result<(String, u64)> {
            struct ChannelReader<'a> {
                rx: &'a mut tokio::sync::mpsc::Receiver<Bytes>,
                cur: Bytes,
            }
            impl Read for ChannelReader<'_> {
                fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                    while self.cur.is_empty() {
                        match self.rx.blocking_recv() {
                            Some(b) => self.cur = b,
                            None => return Ok(0),
                        }
                    }
                    let n = out.len().min(self.cur.len());
                    out[..n].copy_from_slice(&self.cur[..n]);
                    self.cur = self.cur.slice(n..);
                    Ok(n)
                }
            }
            let reader = ChannelReader {
                rx: &mut rx,
                cur: Bytes::new(),
            };
            let corrupt = |e: std::io::Error| Error::Corrupt {
                target: target.clone(),
                reason: format!("not a valid zstd stream: {e}"),
            };
            let mut dec = zstd::stream::read::Decoder::new(reader).map_err(corrupt)?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; READ_BUF];
            let mut pos = 0u64;
            loop {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = dec.read(&mut buf[filled..]).map_err(corrupt)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                h.update(&buf[..filled]);
                write_sparse(&file, &dtmp, pos, &buf[..filled])?;
                pos += filled as u64;
            }
            file.set_len(pos).ctx("write", &dtmp)?;
            file.sync_all().ctx("fsync", &dtmp)?;
            Ok((hex::encode(h.finalize()), pos))
        });

        let fetch: Result<u64> = async {
            let mut resp = self
                .store()
                .get(
                    key,
                    &GetOptions {
                        version_id: version_id.map(str::to_string),
                        if_match: info.etag.clone(),
                        ..Default::default()
                    },
                )
                .await?;
            let mut got = 0u64;
            while let Some(b) = resp.body.next().await {
                let b = b?;
                got += b.len() as u64;
                self.progress().advance(&id, b.len() as u64);
                if tx.send(b).await.is_err() {
                    break; // the decoder stopped: its error is reported below
                }
            }
            Ok(got)
        }
        .await;
        drop(tx);
        let decoded = decoder
            .await
            .map_err(|e| Error::io("write", &tmp, std::io::Error::other(e)))?;
        self.progress().finish(&id);
        let cleanup = || {
            let _ = std::fs::remove_file(&tmp);
        };
        let received = match fetch {
            Ok(n) => n,
            Err(e) => {
                cleanup();
                return Err(e);
            }
        };
        let (sha, size) = match decoded {
            Ok(v) => v,
            Err(e) => {
                cleanup();
                return Err(e);
            }
        };
        if let Some(exp) = &expected_sha {
            if !exp.eq_ignore_ascii_case(&sha) || expected_size.is_some_and(|s| s != size) {
                cleanup();
                return Err(Error::ChecksumMismatch {
                    target: url,
                    expected: exp.clone(),
                    actual: sha,
                    path: dest.exists().then(|| dest.to_path_buf()),
                });
            }
        }
        std::fs::rename(&tmp, dest).ctx("rename", dest)?;
        infra_config::fsync_dir(&dir).ctx("fsync", &dir)?;
        if let Ok(md) = std::fs::metadata(dest) {
            self.hashes().record_sha256(dest, &md, &sha);
            self.hashes().save();
        }
        Ok(DownloadSummary {
            url,
            key: key.to_string(),
            path: dest.to_path_buf(),
            size,
            bytes_received: received,
            sha256: sha,
            verified: if expected_sha.is_some() {
                crate::Verified::Sha256
            } else {
                crate::Verified::Unverified
            },
            version_id: info.version_id.clone(),
            resumed_chunks: 0,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_of_a_sparse_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 4096], 10 * MIB).unwrap();
        let r = data_regions(&std::fs::File::open(&p).unwrap(), 64 * MIB);
        assert!(!r.is_empty());
        let total: u64 = r.iter().map(|x| x.1).sum();
        assert!(total < 8 * MIB, "{r:?}");
        assert!(r
            .iter()
            .any(|(o, l)| *o <= 10 * MIB && o + l >= 10 * MIB + 4096));
    }
}
