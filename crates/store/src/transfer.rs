//! The transfer engine: multipart uploads, ranged parallel downloads, sha256 end to end,
//! atomic publication and resume.
//!
//! - **Uploads** hash the file first (the sha256 goes into the object's metadata, which S3 only
//!   accepts when the upload starts; multipart uploads also hash each part in the same read and
//!   record the part list, see [`crate::parts`]), then send parts streamed from disk: memory
//!   stays at a few buffers whatever the size. A multipart upload's id is kept in a small state file; when the
//!   same file is uploaded again after an interruption, the parts the store already has
//!   (ListParts) are skipped.
//! - **Downloads** go to `.{name}.part` beside the target, chunk by chunk with ranged GETs in
//!   parallel (`If-Match` on the ETag so a changed object is never mixed), zero blocks are not
//!   written (the file stays sparse). Objects with a part list are fetched one part per range
//!   and each part is hashed by the task that fetched it and checked against its digest before
//!   it counts as written (no second pass, whatever order parts arrive in); objects without one
//!   get the whole-object sha256 computed in order while chunks arrive and compared with the
//!   metadata. Then fsync and rename. A `.{name}.part.json` records finished
//!   chunks, so an interrupted download resumes. On a mismatch the old file stays untouched.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use crate::error::{Error, IoContext, Result};
use crate::hashes::{sha256_file, sha256_file_parts, HashCache};
use crate::object::{Body, GetOptions, Metadata, ObjectInfo, ObjectStore, PartInfo, META_SHA256};
use crate::parts::{self, PartList};
use crate::progress::Progress;

const MIB: u64 = 1024 * 1024;
/// S3's limits.
pub const MAX_PARTS: u64 = 10_000;
/// Smallest part S3 accepts (except the last).
pub const MIN_PART: u64 = 5 * MIB;
/// Largest part S3 accepts.
pub const MAX_PART: u64 = 5 * 1024 * MIB;
/// Default part size when the object is small enough.
pub const DEFAULT_PART: u64 = 16 * MIB;
/// Default number of parts or chunks in flight.
pub const DEFAULT_CONCURRENCY: usize = 8;
const BLOCK: usize = 4096;
const WRITE_BUF: usize = 64 * 1024;

/// Knobs of the engine.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Part size for uploads and chunk size for downloads; `None` = automatic.
    pub part_size: Option<u64>,
    /// Parts (or chunks) in flight.
    pub concurrency: usize,
    /// Objects up to this size are sent in one PUT.
    pub multipart_threshold: u64,
    /// Where multipart upload ids are remembered for resuming (`None`: no resume).
    pub state_dir: Option<PathBuf>,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            part_size: None,
            concurrency: DEFAULT_CONCURRENCY,
            multipart_threshold: DEFAULT_PART,
            state_dir: None,
        }
    }
}

/// Part size for an object of `size` bytes: 16 MiB, or larger (in MiB steps) so that the
/// object fits in 10 000 parts (a 5 TiB object gets ~525 MiB parts).
pub fn auto_part_size(size: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    needed.max(DEFAULT_PART)
}

/// Validates a requested part size for an object of `size` bytes.
pub fn choose_part_size(size: u64, requested: Option<u64>) -> Result<u64> {
    let Some(ps) = requested else {
        return Ok(auto_part_size(size));
    };
    if !(MIN_PART..=MAX_PART).contains(&ps) {
        return Err(Error::Invalid {
            what: "part size",
            value: ps.to_string(),
            reason: "S3 accepts parts from 5 MiB to 5 GiB".into(),
        });
    }
    if size.div_ceil(ps) > MAX_PARTS {
        return Err(Error::Invalid {
            what: "part size",
            value: ps.to_string(),
            reason: format!(
                "a {size}-byte object would need more than 10000 parts; use at least {} bytes \
                 or leave the part size automatic",
                auto_part_size(size)
            ),
        });
    }
    Ok(ps)
}

/// What an upload did.
#[derive(Debug, Clone, Serialize)]
pub struct UploadSummary {
    /// Local file.
    pub path: PathBuf,
    /// Destination (`s3://bucket/key`).
    pub url: String,
    /// Key.
    pub key: String,
    /// Bytes of the file.
    pub size: u64,
    /// Bytes sent now (less than the size when compressed or resumed).
    pub bytes_sent: u64,
    /// sha256 of the content (the uncompressed content for `--compress`).
    pub sha256: String,
    /// ETag of the new object.
    pub etag: Option<String>,
    /// Version id, when versioned.
    pub version_id: Option<String>,
    /// Parts (1 for a single PUT).
    pub parts: usize,
    /// Parts that were already in the store from an interrupted upload.
    pub resumed_parts: usize,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// What a download did.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadSummary {
    /// Source (`s3://bucket/key`).
    pub url: String,
    /// Key.
    pub key: String,
    /// Local file written.
    pub path: PathBuf,
    /// Bytes of the object (of the uncompressed content for `.zst`).
    pub size: u64,
    /// Bytes received now.
    pub bytes_received: u64,
    /// sha256 of what was written: computed (`verified` = `sha256` or `none`), or, when the parts
    /// were verified instead, the one in the object's metadata, not recomputed (`parts`).
    pub sha256: String,
    /// How the content was checked.
    pub verified: Verified,
    /// Version downloaded.
    pub version_id: Option<String>,
    /// Chunks already present from an interrupted download.
    pub resumed_chunks: usize,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// How a download was checked (`verified` in its summary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verified {
    /// The whole-object sha256 was computed and matched the object's metadata.
    Sha256,
    /// Every part's sha256 matched the object's part list (whose digest is in its metadata); the
    /// whole-object sha256 was not recomputed.
    Parts,
    /// Nothing to compare with: the object has neither a sha256 nor a part list.
    #[serde(rename = "none")]
    Unverified,
}

impl Verified {
    /// True unless nothing was checked.
    pub fn is_verified(self) -> bool {
        self != Self::Unverified
    }
}

/// Moves bytes between local files and one store.
#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn ObjectStore>,
    opts: TransferOptions,
    progress: Arc<dyn Progress>,
    hashes: Arc<HashCache>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.store.describe())
            .field("opts", &self.opts)
            .finish()
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct UploadState {
    url: String,
    upload_id: String,
    size: u64,
    mtime_ns: i64,
    sha256: String,
    part_size: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct DownloadState {
    url: String,
    etag: Option<String>,
    version_id: Option<String>,
    size: u64,
    chunk_size: u64,
    done: BTreeSet<u64>,
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// `.{name}.part` and `.{name}.part.json` beside `dest`.
pub fn partial_paths(dest: &Path) -> (PathBuf, PathBuf) {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    (
        dir.join(format!(".{name}.part")),
        dir.join(format!(".{name}.part.json")),
    )
}

impl Engine {
    /// An engine over `store`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        opts: TransferOptions,
        progress: Arc<dyn Progress>,
        hashes: Arc<HashCache>,
    ) -> Self {
        Self {
            store,
            opts,
            progress,
            hashes,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The options.
    pub fn options(&self) -> &TransferOptions {
        &self.opts
    }

    /// The progress sink.
    pub fn progress(&self) -> &Arc<dyn Progress> {
        &self.progress
    }

    /// The hash cache.
    pub fn hashes(&self) -> &Arc<HashCache> {
        &self.hashes
    }

    /// sha256 of a local file, from the cache or by reading it (with a progress bar).
    pub async fn local_sha256(&self, path: &Path) -> Result<String> {
        let md = std::fs::metadata(path).ctx("stat", path)?;
        if let Some(s) = self.hashes.sha256(path, &md) {
            return Ok(s);
        }
        let sha = self
            .hash_with_bar(path, md.len(), |p, on_read| sha256_file(p, on_read))
            .await?;
        self.hashes.record_sha256(path, &md, &sha);
        Ok(sha)
    }

    /// Runs `hash` over `path` on the blocking pool, with a progress bar of `size` bytes.
    async fn hash_with_bar<T: Send + 'static>(
        &self,
        path: &Path,
        size: u64,
        hash: impl FnOnce(&Path, &dyn Fn(u64)) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let id = format!("sha256:{}", path.display());
        let label = format!(
            "sha256 {}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        self.progress.start(&id, &label, Some(size));
        let p = path.to_path_buf();
        let progress = self.progress.clone();
        let id2 = id.clone();
        let r = tokio::task::spawn_blocking(move || hash(&p, &|n| progress.advance(&id2, n)))
            .await
            .map_err(|e| Error::io("read", path, std::io::Error::other(e)))?;
        self.progress.finish(&id);
        r
    }

    /// sha256 and part sha256s of a local file, from the cache or by reading it once.
    /// With `expected` (from a manifest), a different sha256 is refused and not cached.
    async fn local_sha256_parts(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        part_size: u64,
        expected: Option<&str>,
    ) -> Result<(String, Vec<[u8; 32]>)> {
        let mismatch = |actual: &str| {
            expected
                .filter(|e| !e.eq_ignore_ascii_case(actual))
                .map(|e| Error::SourceMismatch {
                    path: path.to_path_buf(),
                    expected: e.to_ascii_lowercase(),
                    actual: actual.to_string(),
                })
        };
        if let (Some(s), Some(d)) = (
            self.hashes.sha256(path, md),
            self.hashes.part_digests(path, md, part_size),
        ) {
            return match mismatch(&s) {
                Some(e) => Err(e),
                None => Ok((s, d)),
            };
        }
        let r = self
            .hash_with_bar(path, md.len(), move |p, on_read| {
                sha256_file_parts(p, part_size, on_read)
            })
            .await;
        let (sha, digests) = r?;
        if let Some(e) = mismatch(&sha) {
            return Err(e);
        }
        self.hashes.record_sha256(path, md, &sha);
        self.hashes
            .record_part_digests(path, md, part_size, &digests);
        Ok((sha, digests))
    }

    /// The part list of an object, fetched from its sidecar and checked; `None` when the
    /// object has none (or its sidecar is gone: the whole-object sha256 is used instead).
    async fn part_list(&self, info: &ObjectInfo) -> Result<Option<PartList>> {
        use futures::StreamExt;
        let url = self.store.url_of(&info.key);
        let Some((digest, part_size)) = parts::from_metadata(&info.metadata, &url)? else {
            return Ok(None);
        };
        let key = parts::sidecar_key(&digest);
        let mut resp = match self.store.get(&key, &GetOptions::default()).await {
            Ok(r) => r,
            Err(Error::NoSuchKey { .. }) => {
                self.progress.note(&format!(
                    "{url}: its part list {key} is missing; verifying the whole-object sha256 \
                     instead"
                ));
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let too_big = || Error::Corrupt {
            target: url.clone(),
            reason: format!(
                "its part list {key} is larger than {} bytes",
                parts::MAX_SIDECAR
            ),
        };
        if resp.info.size > parts::MAX_SIDECAR {
            return Err(too_big());
        }
        let mut bytes = Vec::with_capacity(resp.info.size as usize);
        while let Some(b) = resp.body.next().await {
            bytes.extend_from_slice(&b?);
            if bytes.len() as u64 > parts::MAX_SIDECAR {
                return Err(too_big());
            }
        }
        PartList::parse(&bytes, &digest, part_size, info.size, &url).map(Some)
    }

    fn state_file(&self, kind: &str, url: &str) -> Option<PathBuf> {
        let dir = self.opts.state_dir.as_ref()?;
        let h = hex::encode(Sha256::digest(url.as_bytes()));
        Some(dir.join(format!("{kind}-{}.json", &h[..32])))
    }

    /// Uploads `path` as `key`, with `extra` metadata besides the sha256.
    pub async fn upload_file(
        &self,
        path: &Path,
        key: &str,
        extra: &Metadata,
    ) -> Result<UploadSummary> {
        self.upload_file_expecting(path, key, extra, None).await
    }

    /// Like [`Engine::upload_file`], with the sha256 the file is expected to have (from its
    /// manifest): nothing is stored unless the file has it. (A multipart upload hashes the file
    /// before sending anyway, for its part list, so the check costs nothing more.)
    pub async fn upload_file_expecting(
        &self,
        path: &Path,
        key: &str,
        extra: &Metadata,
        expected_sha256: Option<&str>,
    ) -> Result<UploadSummary> {
        let t0 = Instant::now();
        let md = std::fs::metadata(path).ctx("stat", path)?;
        if !md.is_file() {
            return Err(Error::Invalid {
                what: "upload source",
                value: path.display().to_string(),
                reason: "not a regular file".into(),
            });
        }
        let size = md.len();
        let multipart = size > self.opts.multipart_threshold;
        let part_size = choose_part_size(size, self.opts.part_size)?;
        let (sha, part_list) = if multipart {
            let (sha, digests) = self
                .local_sha256_parts(path, &md, part_size, expected_sha256)
                .await?;
            let list = PartList {
                size,
                part_size,
                digests,
            };
            (sha, Some(list))
        } else {
            (self.local_sha256(path).await?, None)
        };
        let mut meta = extra.clone();
        meta.insert(META_SHA256.into(), sha.clone());
        if let Some(list) = &part_list {
            list.add_to_metadata(&mut meta);
        }
        let url = self.store.url_of(key);
        let id = format!("up:{url}");
        let label = short_label("upload", key);

        if size <= self.opts.multipart_threshold {
            self.progress.start(&id, &label, Some(size));
            let r = self
                .store
                .put(
                    key,
                    Body::File {
                        path: path.to_path_buf(),
                        offset: 0,
                        len: size,
                    },
                    &meta,
                )
                .await;
            self.progress.advance(&id, size);
            self.progress.finish(&id);
            let r = r?;
            self.remember_etag(path, &md, r.etag.as_deref());
            return Ok(UploadSummary {
                path: path.to_path_buf(),
                url,
                key: key.to_string(),
                size,
                bytes_sent: size,
                sha256: sha,
                etag: r.etag,
                version_id: r.version_id,
                parts: 1,
                resumed_parts: 0,
                seconds: t0.elapsed().as_secs_f64(),
            });
        }

        let n_parts = size.div_ceil(part_size);
        if let Some(list) = &part_list {
            // Before the object exists, so a reader never finds it without its list.
            self.store
                .put(
                    &list.sidecar_key(),
                    Body::Bytes(list.to_json().into()),
                    &Metadata::new(),
                )
                .await?;
        }
        let state_path = self.state_file("upload", &url);
        let wanted = UploadState {
            url: url.clone(),
            upload_id: String::new(),
            size,
            mtime_ns: mtime_ns(&md),
            sha256: sha.clone(),
            part_size,
        };
        // Resume: same destination, same file content, same part size.
        let mut upload_id = None;
        let mut have: Vec<PartInfo> = Vec::new();
        if let Some(sp) = &state_path {
            if let Some(old) = std::fs::read(sp)
                .ok()
                .and_then(|b| serde_json::from_slice::<UploadState>(&b).ok())
            {
                let same = UploadState {
                    upload_id: old.upload_id.clone(),
                    ..wanted_clone(&wanted)
                } == old;
                if same {
                    match self.store.list_parts(key, &old.upload_id).await {
                        Ok(parts) => {
                            have = parts
                                .into_iter()
                                .filter(|p| {
                                    p.number >= 1
                                        && (p.number as u64) <= n_parts
                                        && p.size == part_len(size, part_size, p.number as u64)
                                })
                                .collect();
                            upload_id = Some(old.upload_id);
                        }
                        Err(Error::NoSuchKey { .. }) => {}
                        Err(e) => return Err(e),
                    }
                } else {
                    let _ = self.store.abort_multipart(key, &old.upload_id).await;
                }
            }
        }
        let upload_id = match upload_id {
            Some(u) => {
                self.progress.note(&format!(
                    "resuming upload of {key}: {} of {n_parts} parts already in the store",
                    have.len()
                ));
                u
            }
            None => {
                let u = self.store.create_multipart(key, &meta).await?;
                if let Some(sp) = &state_path {
                    let st = UploadState {
                        upload_id: u.clone(),
                        ..wanted_clone(&wanted)
                    };
                    if let Some(dir) = sp.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    let _ = infra_config::write_atomic(
                        sp,
                        &serde_json::to_vec(&st).unwrap_or_default(),
                    );
                }
                u
            }
        };
        let resumed_parts = have.len();
        let done_numbers: BTreeSet<i32> = have.iter().map(|p| p.number).collect();
        let todo: Vec<u64> = (1..=n_parts)
            .filter(|n| !done_numbers.contains(&(*n as i32)))
            .collect();
        let already: u64 = have.iter().map(|p| p.size).sum();
        self.progress.start(&id, &label, Some(size));
        self.progress.advance(&id, already);

        let mut parts = have;
        let mut set: JoinSet<Result<PartInfo>> = JoinSet::new();
        let mut queue = todo.into_iter();
        let mut sent = 0u64;
        let result: Result<()> = async {
            loop {
                while set.len() < self.opts.concurrency.max(1) {
                    let Some(n) = queue.next() else { break };
                    let store = self.store.clone();
                    let key = key.to_string();
                    let uid = upload_id.clone();
                    let body = Body::File {
                        path: path.to_path_buf(),
                        offset: (n - 1) * part_size,
                        len: part_len(size, part_size, n),
                    };
                    set.spawn(async move { store.upload_part(&key, &uid, n as i32, body).await });
                }
                match set.join_next().await {
                    None => break Ok(()),
                    Some(Ok(Ok(p))) => {
                        self.progress.advance(&id, p.size);
                        sent += p.size;
                        parts.push(p);
                    }
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => {
                        break Err(Error::io("upload", path, std::io::Error::other(e)));
                    }
                }
            }
        }
        .await;
        set.abort_all();
        if let Err(e) = result {
            self.progress.finish(&id);
            return Err(e);
        }
        // The file must not have changed while it was being sent.
        let md_after = std::fs::metadata(path).ctx("stat", path)?;
        if md_after.len() != size || mtime_ns(&md_after) != mtime_ns(&md) {
            self.progress.finish(&id);
            let _ = self.store.abort_multipart(key, &upload_id).await;
            if let Some(sp) = &state_path {
                let _ = std::fs::remove_file(sp);
            }
            return Err(Error::io(
                "upload",
                path,
                std::io::Error::other("the file changed while it was uploaded; run again"),
            ));
        }
        parts.sort_by_key(|p| p.number);
        let r = self.store.complete_multipart(key, &upload_id, &parts).await;
        self.progress.finish(&id);
        let r = r?;
        if let Some(sp) = &state_path {
            let _ = std::fs::remove_file(sp);
        }
        self.remember_etag(path, &md, r.etag.as_deref());
        Ok(UploadSummary {
            path: path.to_path_buf(),
            url,
            key: key.to_string(),
            size,
            bytes_sent: sent,
            sha256: sha,
            etag: r.etag,
            version_id: r.version_id,
            parts: n_parts as usize,
            resumed_parts,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    fn remember_etag(&self, path: &Path, md: &std::fs::Metadata, etag: Option<&str>) {
        if let Some(e) = etag {
            self.hashes.record_etag(path, md, e);
        }
        self.hashes.save();
    }

    /// Downloads `key` (or one version of it) to `dest`.
    pub async fn download_file(
        &self,
        key: &str,
        dest: &Path,
        version_id: Option<&str>,
    ) -> Result<DownloadSummary> {
        let info = self.store.head(key, version_id).await?;
        let mut resumed = false;
        match self
            .download_with_info(&info, dest, version_id, true, &mut resumed)
            .await
        {
            Err(Error::ChecksumMismatch { .. }) if resumed => {
                // The mismatch may come from stale chunks of an earlier attempt: start over once.
                self.progress.note(&format!(
                    "checksum mismatch after resuming {key}: downloading it again from the start"
                ));
                self.download_with_info(&info, dest, version_id, false, &mut resumed)
                    .await
            }
            r => r,
        }
    }

    async fn download_with_info(
        &self,
        info: &ObjectInfo,
        dest: &Path,
        version_id: Option<&str>,
        allow_resume: bool,
        resumed_out: &mut bool,
    ) -> Result<DownloadSummary> {
        let t0 = Instant::now();
        let key = info.key.as_str();
        let url = self.store.url_of(key);
        let size = info.size;
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        std::fs::create_dir_all(&dir).ctx("create", &dir)?;
        let (tmp, state_path) = partial_paths(dest);
        // With a part list, one range per part: each is verified on its own.
        let part_list = self.part_list(info).await?.map(Arc::new);
        let chunk = match &part_list {
            Some(l) => l.part_size,
            None => {
                let c = self
                    .opts
                    .part_size
                    .unwrap_or(DEFAULT_PART)
                    .clamp(MIB, 1024 * MIB);
                c.div_ceil(BLOCK as u64) * BLOCK as u64
            }
        };
        let n_chunks = size.div_ceil(chunk);
        let mut state = DownloadState {
            url: url.clone(),
            etag: info.etag.clone(),
            version_id: info.version_id.clone(),
            size,
            chunk_size: chunk,
            done: BTreeSet::new(),
        };
        // Resume when the partial file belongs to the same object version and content.
        let mut resumed = false;
        if allow_resume {
            if let Some(old) = std::fs::read(&state_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<DownloadState>(&b).ok())
            {
                let same = old.url == state.url
                    && old.etag == state.etag
                    && old.etag.is_some()
                    && old.size == size
                    && old.chunk_size == chunk
                    && std::fs::metadata(&tmp).map(|m| m.len()).ok() == Some(size);
                if same && !old.done.is_empty() {
                    state.done = old.done;
                    resumed = true;
                }
            }
        }
        let file = if resumed {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&tmp)
                .ctx("open", &tmp)?
        } else {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&tmp)
                .ctx("create", &tmp)?;
            f.set_len(size).ctx("allocate", &tmp)?;
            f
        };
        if resumed {
            self.progress.note(&format!(
                "resuming download of {key}: {} of {n_chunks} chunks already here",
                state.done.len()
            ));
            *resumed_out = true;
            // Chunks not finished may hold partial data: make them holes again, since zero
            // blocks are skipped when writing.
            for i in (0..n_chunks).filter(|i| !state.done.contains(i)) {
                let (off, len) = (i * chunk, chunk.min(size - i * chunk));
                punch_hole(&file, off, len);
            }
        }
        let file = Arc::new(file);
        if let (Some(list), false) = (&part_list, state.done.is_empty()) {
            // Parts kept from an interrupted download were verified when they arrived, but the
            // file was not fsynced: check them again, and fetch again the ones that differ.
            let (f, l, t) = (file.clone(), list.clone(), tmp.clone());
            let done: Vec<u64> = state.done.iter().copied().collect();
            let bad = tokio::task::spawn_blocking(move || verify_on_disk(&f, &t, &l, &done))
                .await
                .map_err(|e| Error::io("read", &tmp, std::io::Error::other(e)))??;
            for i in bad {
                state.done.remove(&i);
                punch_hole(&file, i * chunk, list.part_len(i as usize));
            }
        }
        let resumed_chunks = state.done.len();

        // Without a part list, the hasher reads finished chunks in order (from the page cache)
        // while others arrive.
        let (htx, hasher) = if part_list.is_none() {
            let (htx, hrx) = std::sync::mpsc::channel::<u64>();
            let hfile = file.clone();
            let htmp = tmp.clone();
            let hasher =
                tokio::task::spawn_blocking(move || hash_in_order(&hfile, &htmp, size, chunk, hrx));
            for i in &state.done {
                let _ = htx.send(*i);
            }
            (Some(htx), Some(hasher))
        } else {
            (None, None)
        };

        let id = format!("down:{url}:{}", dest.display());
        self.progress
            .start(&id, &short_label("download", key), Some(size));
        let already: u64 = state.done.iter().map(|i| chunk.min(size - i * chunk)).sum();
        self.progress.advance(&id, already);

        let progress = self.progress.clone();
        let mut set: JoinSet<Result<u64>> = JoinSet::new();
        let todo: Vec<u64> = (0..n_chunks).filter(|i| !state.done.contains(i)).collect();
        let mut queue = todo.into_iter();
        let mut received = 0u64;
        let mut since_save = 0usize;
        let result: Result<()> = async {
            loop {
                while set.len() < self.opts.concurrency.max(1) {
                    let Some(i) = queue.next() else { break };
                    let store = self.store.clone();
                    let key = key.to_string();
                    let file = file.clone();
                    let tmp = tmp.clone();
                    let progress = progress.clone();
                    let id = id.clone();
                    let range = i * chunk..(i * chunk + chunk).min(size);
                    let opts = GetOptions {
                        range: Some(range.clone()),
                        version_id: version_id.map(str::to_string),
                        if_match: info.etag.clone(),
                    };
                    let list = part_list.clone();
                    set.spawn(async move {
                        let got = fetch_chunk(
                            &*store,
                            &key,
                            &opts,
                            &file,
                            &tmp,
                            &*progress,
                            &id,
                            list.is_some(),
                        )
                        .await?;
                        if let (Some(list), Some(got)) = (list, got) {
                            let expected = list.digests[i as usize];
                            if got != expected {
                                return Err(Error::PartMismatch {
                                    target: store.url_of(&key),
                                    part: i + 1,
                                    detail: format!(
                                        "part {} of {} (bytes {}..{}) has sha256 {}, its part \
                                         list says {}",
                                        i + 1,
                                        list.digests.len(),
                                        range.start,
                                        range.end,
                                        hex::encode(got),
                                        hex::encode(expected)
                                    ),
                                    path: None,
                                });
                            }
                        }
                        Ok(i)
                    });
                }
                match set.join_next().await {
                    None => break Ok(()),
                    Some(Ok(Ok(i))) => {
                        let len = chunk.min(size - i * chunk);
                        // Start writing this chunk to disk now, so the final fsync finds little
                        // left to do.
                        start_writeback(&file, i * chunk, len);
                        received += len;
                        state.done.insert(i);
                        if let Some(htx) = &htx {
                            let _ = htx.send(i);
                        }
                        since_save += 1;
                        // Record progress for resuming (not fsynced: the final sha256 catches
                        // anything a host crash lost, and then the download starts over).
                        if since_save >= 4 || set.is_empty() {
                            since_save = 0;
                            let _ = write_state(
                                &state_path,
                                &serde_json::to_vec(&state).unwrap_or_default(),
                            );
                        }
                    }
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => break Err(Error::io("write", &tmp, std::io::Error::other(e))),
                }
            }
        }
        .await;
        set.abort_all();
        drop(htx);
        if let Err(mut e) = result {
            self.progress.finish(&id);
            let _ = write_state(&state_path, &serde_json::to_vec(&state).unwrap_or_default());
            if let Error::PartMismatch { path, .. } = &mut e {
                // What arrived is wrong: nothing of it is kept.
                *path = dest.exists().then(|| dest.to_path_buf());
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(&state_path);
            }
            if matches!(e, Error::Changed { .. } | Error::DiskFull { .. }) {
                // A changed object cannot be resumed; a full disk needs the space back.
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(&state_path);
            }
            if let Some(h) = hasher {
                let _ = h.await;
            }
            return Err(e);
        }
        let expected = info.sha256().map(str::to_string);
        let (actual, verified) = match hasher {
            Some(h) => {
                let actual = h
                    .await
                    .map_err(|e| Error::io("read", &tmp, std::io::Error::other(e)))??;
                let v = if expected.is_some() {
                    Verified::Sha256
                } else {
                    Verified::Unverified
                };
                (actual, v)
            }
            // Every part was checked; the whole-object sha256 is the metadata's.
            None => (expected.clone().unwrap_or_default(), Verified::Parts),
        };
        self.progress.finish(&id);
        if let (Some(exp), Verified::Sha256) = (&expected, verified) {
            if !exp.eq_ignore_ascii_case(&actual) {
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(&state_path);
                return Err(Error::ChecksumMismatch {
                    target: url,
                    expected: exp.clone(),
                    actual,
                    path: dest.exists().then(|| dest.to_path_buf()),
                });
            }
        }
        file.sync_all().ctx("fsync", &tmp)?;
        drop(file);
        std::fs::rename(&tmp, dest).ctx("rename", dest)?;
        infra_config::fsync_dir(&dir).ctx("fsync", &dir)?;
        let _ = std::fs::remove_file(&state_path);
        if let Ok(md) = std::fs::metadata(dest) {
            if !actual.is_empty() {
                self.hashes.record_sha256(dest, &md, &actual);
            }
            if let Some(l) = &part_list {
                self.hashes
                    .record_part_digests(dest, &md, l.part_size, &l.digests);
            }
            if let Some(e) = &info.etag {
                self.hashes.record_etag(dest, &md, e);
            }
            self.hashes.save();
        }
        Ok(DownloadSummary {
            url,
            key: key.to_string(),
            path: dest.to_path_buf(),
            size,
            bytes_received: received,
            sha256: actual,
            verified,
            version_id: info.version_id.clone(),
            resumed_chunks,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

/// Replaces a small state file (temp + rename, no fsync: losing it only costs a restart).
fn write_state(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    // Beside a download target chosen from a key: never write through a planted link.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?
        .write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

fn wanted_clone(w: &UploadState) -> UploadState {
    UploadState {
        url: w.url.clone(),
        upload_id: w.upload_id.clone(),
        size: w.size,
        mtime_ns: w.mtime_ns,
        sha256: w.sha256.clone(),
        part_size: w.part_size,
    }
}

fn part_len(size: u64, part_size: u64, n: u64) -> u64 {
    let start = (n - 1) * part_size;
    part_size.min(size - start)
}

pub(crate) fn short_label(verb: &str, key: &str) -> String {
    let name = key.rsplit('/').next().unwrap_or(key);
    format!("{verb} {name}")
}

/// Asks the kernel to start writing a range to disk (no waiting; errors ignored: the fsync
/// before the rename is what counts).
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is valid for the
    // lifetime of `file`.
    unsafe {
        nix::libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            nix::libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn punch_hole(file: &std::fs::File, offset: u64, len: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    let r = fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    );
    if r.is_err() {
        // No hole punching on this filesystem: write zeros instead.
        let zeros = vec![0u8; WRITE_BUF];
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(WRITE_BUF as u64) as usize;
            let _ = file.write_all_at(&zeros[..n], off);
            off += n as u64;
        }
    }
}

/// True when every byte is zero (vectorises well; no early exit on purpose).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

/// Writes `data` at `offset`, skipping 4 KiB blocks (aligned to the file) that are all zero, so
/// the file stays sparse where the object has zeros. The target range must already read as
/// zeros (a fresh `set_len` or a punched hole).
pub(crate) fn write_sparse(
    file: &std::fs::File,
    path: &Path,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    let mut i = 0usize;
    while i < data.len() {
        // Block boundary relative to the file.
        let pos = offset + i as u64;
        let to_boundary = BLOCK - (pos % BLOCK as u64) as usize;
        let end = (i + to_boundary).min(data.len());
        if is_zero(&data[i..end]) {
            i = end;
            continue;
        }
        // Extend over following non-zero blocks to write one run.
        let mut run_end = end;
        while run_end < data.len() {
            let next = (run_end + BLOCK).min(data.len());
            if is_zero(&data[run_end..next]) {
                break;
            }
            run_end = next;
        }
        file.write_all_at(&data[i..run_end], pos)
            .map_err(|e| Error::io("write", path, e))?;
        i = run_end;
    }
    Ok(())
}

/// Fetches one range into `file`; with `hash`, returns the sha256 of the bytes received
/// (hashed here, as they arrive, so parts fetched in parallel are hashed in parallel).
#[allow(clippy::too_many_arguments)]
async fn fetch_chunk(
    store: &dyn ObjectStore,
    key: &str,
    opts: &GetOptions,
    file: &std::fs::File,
    path: &Path,
    progress: &dyn Progress,
    id: &str,
    hash: bool,
) -> Result<Option<[u8; 32]>> {
    use futures::StreamExt;
    let range = opts.range.clone().unwrap_or(0..0);
    let mut resp = store.get(key, opts).await?;
    let mut pos = range.start;
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BUF);
    let mut buf_start = pos;
    let mut hasher = hash.then(Sha256::new);
    while let Some(b) = resp.body.next().await {
        let b = b?;
        if let Some(h) = &mut hasher {
            h.update(&b);
        }
        progress.advance(id, b.len() as u64);
        pos += b.len() as u64;
        if buf.is_empty() && b.len() >= WRITE_BUF {
            write_sparse(file, path, buf_start, &b)?;
            buf_start = pos;
            continue;
        }
        buf.extend_from_slice(&b);
        if buf.len() >= WRITE_BUF {
            write_sparse(file, path, buf_start, &buf)?;
            buf.clear();
            buf_start = pos;
        }
    }
    if !buf.is_empty() {
        write_sparse(file, path, buf_start, &buf)?;
    }
    if pos != range.end {
        return Err(Error::Corrupt {
            target: store.url_of(key),
            reason: format!(
                "the server sent {} bytes for range {}-{}",
                pos - range.start,
                range.start,
                range.end
            ),
        });
    }
    Ok(hasher.map(|h| h.finalize().into()))
}

/// Parts (0-based) among `done` whose bytes in `file` do not match the list.
fn verify_on_disk(
    file: &std::fs::File,
    path: &Path,
    list: &PartList,
    done: &[u64],
) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; 1024 * 1024];
    let mut bad = Vec::new();
    for &i in done {
        let Some(expected) = list.digests.get(i as usize) else {
            continue;
        };
        let mut h = Sha256::new();
        let start = i * list.part_size;
        hash_range(
            file,
            path,
            start..start + list.part_len(i as usize),
            &mut buf,
            &mut h,
        )?;
        if h.finalize().as_slice() != expected {
            bad.push(i);
        }
    }
    Ok(bad)
}

/// Feeds bytes `range` of `file` into `h`, through `buf`.
fn hash_range(
    file: &std::fs::File,
    path: &Path,
    range: std::ops::Range<u64>,
    buf: &mut [u8],
    h: &mut Sha256,
) -> Result<()> {
    let mut off = range.start;
    while off < range.end {
        let n = ((range.end - off) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], off)
            .map_err(|e| Error::io("read", path, e))?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(())
}

/// Hashes chunks in file order as they are reported finished.
fn hash_in_order(
    file: &std::fs::File,
    path: &Path,
    size: u64,
    chunk: u64,
    rx: std::sync::mpsc::Receiver<u64>,
) -> Result<String> {
    let n_chunks = size.div_ceil(chunk);
    let mut h = Sha256::new();
    let mut pending = BTreeSet::new();
    let mut next = 0u64;
    let mut buf = vec![0u8; 1024 * 1024];
    while next < n_chunks {
        let Ok(i) = rx.recv() else {
            // Sender gone before all chunks arrived: the download failed.
            return Ok(String::new());
        };
        pending.insert(i);
        while pending.remove(&next) {
            let start = next * chunk;
            hash_range(
                file,
                path,
                start..(start + chunk).min(size),
                &mut buf,
                &mut h,
            )?;
            next += 1;
        }
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes() {
        assert_eq!(auto_part_size(1024), DEFAULT_PART);
        assert_eq!(auto_part_size(6 * 1024 * 1024 * 1024), DEFAULT_PART);
        // 5 TiB → parts ≤ 10000.
        let five_tib = 5u64 << 40;
        let ps = auto_part_size(five_tib);
        assert!(five_tib.div_ceil(ps) <= MAX_PARTS);
        assert_eq!(ps % MIB, 0);
        // 200 GiB forces larger parts than 16 MiB.
        let big = 200u64 << 30;
        assert!(auto_part_size(big) > DEFAULT_PART);
        assert!(big.div_ceil(auto_part_size(big)) <= MAX_PARTS);
        assert!(choose_part_size(10, Some(MIB)).is_err());
        assert!(choose_part_size(big, Some(5 * MIB)).is_err());
        assert_eq!(choose_part_size(big, Some(64 * MIB)).unwrap(), 64 * MIB);
    }

    #[test]
    fn sparse_writes_skip_zero_blocks() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let size = 64 * 1024 * 1024u64;
        f.set_len(size).unwrap();
        let mut data = vec![0u8; 8 * 1024 * 1024];
        data[5000] = 1;
        data[8 * 1024 * 1024 - 1] = 2;
        write_sparse(&f, &p, 4096 * 3, &data).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert!(md.blocks() * 512 < 1024 * 1024, "{} blocks", md.blocks());
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 4096 * 3).unwrap();
        assert_eq!(back, data);
    }
}
