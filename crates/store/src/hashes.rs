//! Content identity of local files: sha256, S3-style ETags, and a small cache of both keyed
//! by (path, size, mtime, inode) so unchanged files are not read again.
//!
//! Sync compares a local file with a listed object without downloading it: sizes first, then
//! the sha256 when the listing carries it (local store), else the ETag the listing carries
//! (S3 computes it as md5 of the content, or md5 of the parts' md5s plus `-N` for multipart
//! uploads; we recompute it locally with the part size that gives N parts).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use md5::Md5;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};

const MIB: u64 = 1024 * 1024;
const READ_BUF: usize = 4 * 1024 * 1024;

/// Part sizes tried when recomputing a multipart ETag: ours (auto), then the common defaults
/// of aws-cli (8 MiB), boto (8 MiB), s5cmd (50 MiB), rclone (5 MiB), mc (16 MiB / 64 MiB).
pub(crate) fn candidate_part_sizes(size: u64) -> Vec<u64> {
    let mut v = vec![crate::transfer::auto_part_size(size)];
    for m in [8, 5, 16, 50, 64, 15, 100, 128] {
        v.push(m * MIB);
    }
    v.dedup();
    v
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    size: u64,
    mtime_ns: i64,
    ino: u64,
    sha256: Option<String>,
    #[serde(default)]
    etags: Vec<String>,
    /// Part size and hex sha256 of each part, from the last upload or verified download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parts: Option<(u64, Vec<String>)>,
}

impl Entry {
    fn matches(&self, md: &std::fs::Metadata) -> bool {
        self.size == md.len() && self.mtime_ns == mtime_ns(md) && self.ino == md.ino()
    }
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// Cache of known hashes of local files (`<cache>/store/hashes.json`).
#[derive(Debug, Default)]
pub struct HashCache {
    path: Option<PathBuf>,
    entries: Mutex<HashMap<PathBuf, Entry>>,
}

impl HashCache {
    /// A cache kept only in memory.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads the cache file (a missing or unreadable file starts empty).
    pub fn load(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path: Some(path),
            entries: Mutex::new(entries),
        }
    }

    /// Writes the cache back (atomically); errors are ignored, the cache is only an optimisation.
    pub fn save(&self) {
        let Some(path) = &self.path else { return };
        let Ok(entries) = self.entries.lock() else {
            return;
        };
        // Drop entries of files that no longer exist, so the file does not grow forever.
        let live: HashMap<&PathBuf, &Entry> = entries.iter().filter(|(p, _)| p.exists()).collect();
        if let Ok(bytes) = serde_json::to_vec(&live) {
            let _ = infra_config::write_atomic(path, &bytes);
        }
    }

    fn with_entry<T>(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> T {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = entries.entry(key).or_default();
        if !e.matches(md) {
            *e = Entry {
                size: md.len(),
                mtime_ns: mtime_ns(md),
                ino: md.ino(),
                ..Default::default()
            };
        }
        f(e)
    }

    /// The sha256 of `path` if known for its current size/mtime/inode.
    pub fn sha256(&self, path: &Path, md: &std::fs::Metadata) -> Option<String> {
        self.with_entry(path, md, |e| e.sha256.clone())
    }

    /// True when `etag` is known to be the ETag of the current content of `path`.
    pub fn has_etag(&self, path: &Path, md: &std::fs::Metadata, etag: &str) -> bool {
        self.with_entry(path, md, |e| e.etags.iter().any(|x| x == etag))
    }

    /// Records the sha256 of the content described by `md`.
    pub fn record_sha256(&self, path: &Path, md: &std::fs::Metadata, sha256: &str) {
        self.with_entry(path, md, |e| e.sha256 = Some(sha256.to_string()));
    }

    /// The part sha256s of `path` for `part_size`, if known for its current size/mtime/inode.
    pub fn part_digests(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        part_size: u64,
    ) -> Option<Vec<[u8; 32]>> {
        self.with_entry(path, md, |e| {
            let (ps, v) = e.parts.as_ref()?;
            if *ps != part_size {
                return None;
            }
            v.iter()
                .map(|h| {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(h, &mut d).ok().map(|_| d)
                })
                .collect()
        })
    }

    /// Records the part sha256s of the content described by `md`.
    pub fn record_part_digests(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        part_size: u64,
        digests: &[[u8; 32]],
    ) {
        self.with_entry(path, md, |e| {
            e.parts = Some((part_size, digests.iter().map(hex::encode).collect()))
        });
    }

    /// Records an ETag the store gave this content.
    pub fn record_etag(&self, path: &Path, md: &std::fs::Metadata, etag: &str) {
        self.with_entry(path, md, |e| {
            if !e.etags.iter().any(|x| x == etag) {
                e.etags.push(etag.to_string());
            }
        });
    }
}

/// How far ahead of the hasher the kernel is asked to read (the disk works while we hash).
const READ_AHEAD: u64 = 128 * MIB;

/// sha256 of a file, reporting bytes read to `on_read`. Holes (sparse files) are hashed as
/// zeros without reading them.
pub fn sha256_file(path: &Path, on_read: impl FnMut(u64)) -> Result<String> {
    let mut h = Sha256::new();
    read_file(path, on_read, |b| h.update(b))?;
    Ok(hex::encode(h.finalize()))
}

/// sha256 of a file and of each of its `part_size` parts, in one read: the two hashes run side
/// by side on two threads (the part digests cost no wall time where a core is free).
pub fn sha256_file_parts(
    path: &Path,
    part_size: u64,
    on_read: impl FnMut(u64),
) -> Result<(String, Vec<[u8; 32]>)> {
    let mut whole = Sha256::new();
    let mut parts = PartHasher::new(part_size);
    read_file(path, on_read, |b| {
        std::thread::scope(|s| {
            s.spawn(|| parts.update(b));
            whole.update(b);
        });
    })?;
    Ok((hex::encode(whole.finalize()), parts.finish()))
}

/// sha256 of consecutive parts of a stream.
pub(crate) struct PartHasher {
    part_size: u64,
    in_part: u64,
    h: Sha256,
    done: Vec<[u8; 32]>,
}

impl PartHasher {
    pub(crate) fn new(part_size: u64) -> Self {
        Self {
            part_size: part_size.max(1),
            in_part: 0,
            h: Sha256::new(),
            done: Vec::new(),
        }
    }

    pub(crate) fn update(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            let n = ((self.part_size - self.in_part) as usize).min(b.len());
            self.h.update(&b[..n]);
            self.in_part += n as u64;
            b = &b[n..];
            if self.in_part == self.part_size {
                self.done
                    .push(std::mem::take(&mut self.h).finalize().into());
                self.in_part = 0;
            }
        }
    }

    /// Digests of every part (one, of nothing, for an empty stream).
    pub(crate) fn finish(mut self) -> Vec<[u8; 32]> {
        if self.in_part > 0 || self.done.is_empty() {
            self.done.push(self.h.finalize().into());
        }
        self.done
    }
}

/// Reads a file in order, handing its content to `feed` (holes as zeros, without reading
/// them), with the kernel reading ahead.
fn read_file(path: &Path, mut on_read: impl FnMut(u64), mut feed: impl FnMut(&[u8])) -> Result<()> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice as A};
    let mut f = std::fs::File::open(path).ctx("open", path)?;
    let size = f.metadata().ctx("stat", path)?.len();
    let _ = posix_fadvise(&f, 0, 0, A::POSIX_FADV_SEQUENTIAL);
    let mut buf = vec![0u8; READ_BUF];
    let zeros = vec![0u8; READ_BUF];
    let mut pos = 0u64;
    let mut advised = 0u64;
    for (off, len) in crate::compress::data_regions(&f, size)
        .into_iter()
        .chain(std::iter::once((size, 0)))
    {
        // The hole before this region.
        while pos < off {
            let n = (off - pos).min(READ_BUF as u64) as usize;
            feed(&zeros[..n]);
            on_read(n as u64);
            pos += n as u64;
        }
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off)).ctx("read", path)?;
        let end = off + len;
        while pos < end {
            if advised < (pos + READ_AHEAD).min(end) {
                let from = advised.max(pos);
                let to = (pos + 2 * READ_AHEAD).min(end);
                let _ = posix_fadvise(&f, from as i64, (to - from) as i64, A::POSIX_FADV_WILLNEED);
                advised = to;
            }
            let want = ((end - pos) as usize).min(buf.len());
            let n = f.read(&mut buf[..want]).ctx("read", path)?;
            if n == 0 {
                return Err(crate::Error::io(
                    "read",
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank while read",
                    ),
                ));
            }
            feed(&buf[..n]);
            on_read(n as u64);
            pos += n as u64;
        }
    }
    Ok(())
}

/// The S3 ETag a file would get when uploaded with `part_size` (single PUT when it fits in one
/// request and `multipart` is false).
pub fn etag_of_file(path: &Path, part_size: u64, multipart: bool) -> Result<String> {
    let mut f = std::fs::File::open(path).ctx("open", path)?;
    let mut buf = vec![0u8; READ_BUF];
    let mut whole = Md5::new();
    let mut part = Md5::new();
    let mut in_part = 0u64;
    let mut parts = Vec::new();
    loop {
        let want = (part_size - in_part).min(buf.len() as u64) as usize;
        let n = f.read(&mut buf[..want]).ctx("read", path)?;
        if n == 0 {
            break;
        }
        if multipart {
            part.update(&buf[..n]);
            in_part += n as u64;
            if in_part == part_size {
                parts.push(std::mem::take(&mut part).finalize());
                in_part = 0;
            }
        } else {
            whole.update(&buf[..n]);
        }
    }
    if !multipart {
        return Ok(hex::encode(whole.finalize()));
    }
    if in_part > 0 || parts.is_empty() {
        parts.push(part.finalize());
    }
    let mut outer = Md5::new();
    for p in &parts {
        outer.update(p);
    }
    Ok(format!("{}-{}", hex::encode(outer.finalize()), parts.len()))
}

/// Whether an ETag looks like S3's md5 form (`hex32` or `hex32-N`); other forms (SSE-KMS,
/// some servers) cannot be recomputed.
pub fn parse_etag(etag: &str) -> Option<Option<u64>> {
    let (hexpart, n) = match etag.split_once('-') {
        Some((h, n)) => (h, Some(n.parse::<u64>().ok()?)),
        None => (etag, None),
    };
    (hexpart.len() == 32 && hexpart.bytes().all(|b| b.is_ascii_hexdigit())).then_some(n)
}

/// Recomputes `etag` for a local file, choosing the part size that yields the same number of
/// parts. `None` when the ETag is not of the md5 form or no known part size fits.
pub fn local_matches_etag(
    path: &Path,
    md: &std::fs::Metadata,
    etag: &str,
    cache: &HashCache,
) -> Result<Option<bool>> {
    if cache.has_etag(path, md, etag) {
        return Ok(Some(true));
    }
    let Some(parts) = parse_etag(etag) else {
        return Ok(None);
    };
    let size = md.len();
    let computed = match parts {
        None => etag_of_file(path, size.max(1), false)?,
        Some(n) => {
            let Some(ps) = candidate_part_sizes(size)
                .into_iter()
                .find(|ps| size.div_ceil(*ps).max(1) == n)
            else {
                return Ok(None);
            };
            etag_of_file(path, ps, true)?
        }
    };
    cache.record_etag(path, md, &computed);
    Ok(Some(computed == etag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_digests_in_one_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        // Data, a hole across a part boundary, data: parts must not care.
        let f = std::fs::File::create(&p).unwrap();
        let size = 11 * MIB + 5;
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[7u8; 1000], 0).unwrap();
        f.write_all_at(&[9u8; 3000], 9 * MIB).unwrap();
        let all = std::fs::read(&p).unwrap();
        let (whole, parts) = sha256_file_parts(&p, 4 * MIB, |_| {}).unwrap();
        assert_eq!(whole, hex::encode(Sha256::digest(&all)));
        let want: Vec<[u8; 32]> = all
            .chunks(4 * MIB as usize)
            .map(|c| Sha256::digest(c).into())
            .collect();
        assert_eq!(parts, want);
        let mut h = PartHasher::new(4);
        h.update(b"ab");
        h.update(b"cdefghij");
        assert_eq!(h.finish().len(), 3);
        assert_eq!(PartHasher::new(4).finish().len(), 1);
    }

    #[test]
    fn etags_and_cache() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"aaaabb").unwrap();
        assert_eq!(
            etag_of_file(&p, 6, false).unwrap(),
            hex::encode(Md5::digest(b"aaaabb"))
        );
        let mut outer = Md5::new();
        outer.update(Md5::digest(b"aaaa"));
        outer.update(Md5::digest(b"bb"));
        assert_eq!(
            etag_of_file(&p, 4, true).unwrap(),
            format!("{}-2", hex::encode(outer.finalize()))
        );
        assert_eq!(parse_etag("d41d8cd98f00b204e9800998ecf8427e"), Some(None));
        assert_eq!(
            parse_etag("d41d8cd98f00b204e9800998ecf8427e-12"),
            Some(Some(12))
        );
        assert_eq!(parse_etag("xyz"), None);

        let cache = HashCache::load(d.path().join("cache.json"));
        let md = std::fs::metadata(&p).unwrap();
        let single = etag_of_file(&p, 6, false).unwrap();
        assert_eq!(
            local_matches_etag(&p, &md, &single, &cache).unwrap(),
            Some(true)
        );
        assert!(cache.has_etag(&p, &md, &single));
        cache.record_sha256(&p, &md, "s");
        cache.save();
        let again = HashCache::load(d.path().join("cache.json"));
        assert_eq!(again.sha256(&p, &md).as_deref(), Some("s"));
        // A change of content (size/mtime) invalidates the entry.
        std::fs::write(&p, b"different").unwrap();
        let md2 = std::fs::metadata(&p).unwrap();
        assert_eq!(again.sha256(&p, &md2), None);
        assert_eq!(
            sha256_file(&p, |_| {}).unwrap(),
            hex::encode(Sha256::digest(b"different"))
        );
    }
}
