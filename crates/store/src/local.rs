//! The local-directory store: the embedded default when no bucket is configured, so every
//! command works offline with the same semantics as S3.
//!
//! Layout under the root (the "bucket"): objects are plain files at `<prefix>/<key>` (so the
//! directory looks like the bucket), and the bookkeeping lives in `.infra-store/`:
//! `meta/<prefix>/<key>.json` (size, ETag, metadata such as the sha256, version id, the data
//! file's inode), `uploads/<id>/` (multipart parts), `versions/<prefix>/<key>/<version>` (older
//! versions when versioning is on) and `config.json` (versioning, lifecycle).
//!
//! ETags follow S3: md5 of the content for whole-object writes, md5 of the parts' md5s plus
//! `-N` for multipart uploads, so sync compares local-store and S3 objects the same way.
//! Limitation: a key cannot also be a "directory" of other keys (`a` and `a/b`).

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::object::{
    BackendKind, Body, GetOptions, GetResponse, InitOptions, InitStep, Metadata, ObjectInfo,
    ObjectStore, PartInfo, PutResult, StepStatus, VersionInfo,
};
use crate::s3::normalize_prefix;

/// Name of the bookkeeping directory at the root of a local store.
pub const STATE_DIR: &str = ".infra-store";
const READ_CHUNK: usize = 256 * 1024;

/// A directory used as an object store.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetaFile {
    size: u64,
    etag: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    version_id: Option<String>,
    /// Inode of the data file this record describes; a mismatch means the record is stale.
    ino: u64,
    last_modified: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VersionFile {
    version_id: String,
    size: u64,
    etag: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    last_modified: DateTime<Utc>,
    delete_marker: bool,
    /// When it stopped being the current version (for the lifecycle rule).
    noncurrent_since: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoreConfigFile {
    versioning: bool,
    noncurrent_days: Option<u32>,
    abort_incomplete_days: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadFile {
    key: String,
    metadata: Metadata,
    created: DateTime<Utc>,
}

impl LocalStore {
    /// A store rooted at `root` (created on first write) under `prefix`.
    pub fn new(root: impl Into<PathBuf>, prefix: &str) -> Self {
        Self {
            root: root.into(),
            prefix: normalize_prefix(prefix),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state(&self) -> PathBuf {
        self.root.join(STATE_DIR)
    }

    fn data_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{}{}", self.prefix, key))
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.state()
            .join("meta")
            .join(format!("{}{}.json", self.prefix, key))
    }

    fn versions_dir(&self, key: &str) -> PathBuf {
        self.state()
            .join("versions")
            .join(format!("{}{}", self.prefix, key))
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.state().join("uploads").join(id)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.state().join("tmp")
    }

    /// Keys become paths here: the shared key check, plus the bookkeeping directory.
    fn check_key(&self, key: &str) -> Result<()> {
        crate::keys::check_key(key).map_err(|problem| Error::UnsafeKey {
            key: key.to_string(),
            problem,
        })?;
        let full = format!("{}{}", self.prefix, key);
        if full == STATE_DIR || full.starts_with(&format!("{STATE_DIR}/")) {
            return Err(Error::UnsafeKey {
                key: key.to_string(),
                problem: crate::keys::KeyProblem::Reserved,
            });
        }
        Ok(())
    }

    /// Upload ids name directories under `uploads/`: only the ids this store hands out.
    fn check_upload_id(&self, key: &str, id: &str) -> Result<()> {
        if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(self.not_found(key, None))
        }
    }

    /// Version ids name files under `versions/`: only the ids this store hands out.
    fn check_version_id(&self, key: &str, v: &str) -> Result<()> {
        let ok =
            v == "null" || (v.len() == 29 && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
        if ok {
            Ok(())
        } else {
            Err(self.not_found(key, Some(v)))
        }
    }

    fn config(&self) -> StoreConfigFile {
        std::fs::read(self.state().join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn read_meta(&self, key: &str, data: &std::fs::Metadata) -> Option<MetaFile> {
        let m: MetaFile = serde_json::from_slice(&std::fs::read(self.meta_path(key)).ok()?).ok()?;
        (m.ino == data.ino() && m.size == data.len()).then_some(m)
    }

    fn info_for(&self, key: &str, data: &std::fs::Metadata) -> ObjectInfo {
        let meta = self.read_meta(key, data);
        ObjectInfo {
            key: key.to_string(),
            size: data.len(),
            last_modified: meta.as_ref().map(|m| m.last_modified).or_else(|| {
                data.modified()
                    .ok()
                    .map(|t| DateTime::<Utc>::from(t).trunc_subsecs_ms())
            }),
            etag: meta.as_ref().map(|m| m.etag.clone()),
            version_id: meta.as_ref().and_then(|m| m.version_id.clone()),
            metadata: meta.map(|m| m.metadata).unwrap_or_default(),
        }
    }

    fn not_found(&self, key: &str, version: Option<&str>) -> Error {
        Error::NoSuchKey {
            target: self.url_of(key),
            version: version.map(str::to_string),
        }
    }

    /// Writes a new temp file from `body`, returning its path and md5.
    fn write_temp(&self, body: &Body) -> Result<(PathBuf, [u8; 16])> {
        let tmp_dir = self.tmp_dir();
        std::fs::create_dir_all(&tmp_dir).ctx("create", &tmp_dir)?;
        let path = tmp_dir.join(uuid::Uuid::new_v4().simple().to_string());
        let res = (|| {
            let mut out = std::fs::File::create(&path).ctx("create", &path)?;
            let mut md5 = Md5::new();
            match body {
                Body::Bytes(b) => {
                    md5.update(b);
                    out.write_all(b).ctx("write", &path)?;
                }
                Body::File {
                    path: src,
                    offset,
                    len,
                } => {
                    let mut f = std::fs::File::open(src).ctx("open", src)?;
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(*offset))
                        .ctx("read", src)?;
                    let mut f = f.take(*len);
                    let mut buf = vec![0u8; READ_CHUNK];
                    let mut copied = 0u64;
                    loop {
                        let n = f.read(&mut buf).ctx("read", src)?;
                        if n == 0 {
                            break;
                        }
                        md5.update(&buf[..n]);
                        out.write_all(&buf[..n]).ctx("write", &path)?;
                        copied += n as u64;
                    }
                    if copied != *len {
                        return Err(Error::io(
                            "read",
                            src,
                            std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the file is shorter than expected (did it change?)",
                            ),
                        ));
                    }
                }
            }
            out.sync_all().ctx("fsync", &path)?;
            Ok(md5.finalize().into())
        })();
        match res {
            Ok(md5) => Ok((path, md5)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Moves the current object (if any) into the versions directory (versioning on), or drops
    /// it. `delete_marker` records a deletion as the newest noncurrent entry.
    fn retire_current(&self, key: &str, cfg: &StoreConfigFile, delete_marker: bool) -> Result<()> {
        let data = self.data_path(key);
        let Ok(md) = std::fs::metadata(&data) else {
            return Ok(());
        };
        if !cfg.versioning {
            return Ok(());
        }
        let info = self.info_for(key, &md);
        let now = Utc::now();
        let vid = info.version_id.clone().unwrap_or_else(|| "null".into());
        let dir = self.versions_dir(key);
        std::fs::create_dir_all(&dir).ctx("create", &dir)?;
        let vfile = VersionFile {
            version_id: vid.clone(),
            size: info.size,
            etag: info.etag,
            metadata: info.metadata,
            last_modified: info.last_modified.unwrap_or(now),
            delete_marker: false,
            noncurrent_since: now,
        };
        // A hard link keeps the old data while the new file is renamed over the key.
        let vdata = dir.join(&vid);
        let _ = std::fs::remove_file(&vdata);
        std::fs::hard_link(&data, &vdata).ctx("link", &vdata)?;
        infra_config::write_atomic(
            &dir.join(format!("{vid}.json")),
            &serde_json::to_vec(&vfile).unwrap_or_default(),
        )
        .ctx("write", &dir)?;
        if delete_marker {
            let mid = new_version_id();
            let marker = VersionFile {
                version_id: mid.clone(),
                size: 0,
                etag: None,
                metadata: Metadata::new(),
                last_modified: now,
                delete_marker: true,
                noncurrent_since: now,
            };
            infra_config::write_atomic(
                &dir.join(format!("{mid}.json")),
                &serde_json::to_vec(&marker).unwrap_or_default(),
            )
            .ctx("write", &dir)?;
        }
        self.expire_noncurrent(key, cfg);
        Ok(())
    }

    /// Applies the lifecycle rule: drops versions noncurrent for longer than the configured days.
    fn expire_noncurrent(&self, key: &str, cfg: &StoreConfigFile) {
        let Some(days) = cfg.noncurrent_days else {
            return;
        };
        let limit = Utc::now() - chrono::Duration::days(days as i64);
        for v in self.read_versions(key) {
            if v.noncurrent_since < limit {
                let dir = self.versions_dir(key);
                let _ = std::fs::remove_file(dir.join(&v.version_id));
                let _ = std::fs::remove_file(dir.join(format!("{}.json", v.version_id)));
            }
        }
    }

    fn read_versions(&self, key: &str) -> Vec<VersionFile> {
        let dir = self.versions_dir(key);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect()
    }

    /// Renames a finished temp file over the key and records its metadata.
    fn publish(
        &self,
        key: &str,
        tmp: &Path,
        etag: String,
        metadata: &Metadata,
    ) -> Result<PutResult> {
        let cfg = self.config();
        // Parents are created beneath the root without following links.
        let data = crate::keys::prepare_key_path(&self.root, &format!("{}{}", self.prefix, key))?;
        let parent = data.parent().unwrap_or(&self.root).to_path_buf();
        self.retire_current(key, &cfg, false)?;
        let version_id = cfg.versioning.then(new_version_id);
        std::fs::rename(tmp, &data).ctx("rename", &data)?;
        let _ = infra_config::fsync_dir(&parent);
        let md = std::fs::metadata(&data).ctx("stat", &data)?;
        let meta = MetaFile {
            size: md.len(),
            etag: etag.clone(),
            metadata: metadata.clone(),
            version_id: version_id.clone(),
            ino: md.ino(),
            last_modified: Utc::now().trunc_subsecs_ms(),
        };
        let mp = self.meta_path(key);
        infra_config::write_atomic(&mp, &serde_json::to_vec(&meta).unwrap_or_default())
            .ctx("write", &mp)?;
        Ok(PutResult {
            etag: Some(etag),
            version_id,
        })
    }

    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<ObjectInfo>) -> Result<()> {
        let rd = match std::fs::read_dir(dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("read directory", dir, e)),
        };
        for e in rd {
            let e = e.ctx("read directory", dir)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let full_rel = format!("{}{}", self.prefix, child_rel);
            if full_rel == STATE_DIR || full_rel.starts_with(&format!("{STATE_DIR}/")) {
                continue;
            }
            let ft = e.file_type().ctx("stat", &e.path())?;
            if ft.is_dir() {
                self.walk(&e.path(), &child_rel, out)?;
            } else if ft.is_file() {
                let md = e.metadata().ctx("stat", &e.path())?;
                out.push(self.info_for(&child_rel, &md));
            }
        }
        Ok(())
    }
}

trait TruncMs {
    fn trunc_subsecs_ms(self) -> Self;
}

impl TruncMs for DateTime<Utc> {
    fn trunc_subsecs_ms(self) -> Self {
        chrono::SubsecRound::trunc_subsecs(self, 3)
    }
}

/// Sortable version id: time in nanoseconds and a random suffix.
fn new_version_id() -> String {
    let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    format!(
        "{nanos:020}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error::Io {
            op: "run",
            path: PathBuf::from("<blocking task>"),
            source: std::io::Error::other(e),
        }),
    }
}

fn file_chunks(path: PathBuf, start: u64, len: u64) -> crate::object::ByteChunks {
    let state = (None::<tokio::fs::File>, path, start, len);
    futures::stream::unfold(state, |(file, path, pos, left)| async move {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        if left == 0 {
            return None;
        }
        let mut f = match file {
            Some(f) => f,
            None => {
                let mut f = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) => {
                        return Some((Err(Error::io("open", &path, e)), (None, path, pos, 0)))
                    }
                };
                if let Err(e) = f.seek(std::io::SeekFrom::Start(pos)).await {
                    return Some((Err(Error::io("read", &path, e)), (None, path, pos, 0)));
                }
                f
            }
        };
        let mut buf = BytesMut::with_capacity((left as usize).min(READ_CHUNK));
        match f.read_buf(&mut buf).await {
            Ok(0) => Some((
                Err(Error::io(
                    "read",
                    &path,
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "object truncated"),
                )),
                (None, path, pos, 0),
            )),
            Ok(n) => {
                let n = (n as u64).min(left);
                let mut b: Bytes = buf.freeze();
                b.truncate(n as usize);
                Some((Ok(b), (Some(f), path, pos + n, left - n)))
            }
            Err(e) => Some((Err(Error::io("read", &path, e)), (None, path, pos, 0))),
        }
    })
    .boxed()
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}/{}", self.root.display(), self.prefix)
    }

    fn url_of(&self, key: &str) -> String {
        format!("local:{}/{}{}", self.root.display(), self.prefix, key)
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let this = self.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let mut out = Vec::new();
            let base = this.root.join(this.prefix.trim_end_matches('/'));
            this.walk(&base, "", &mut out)?;
            let sidecars = crate::parts::is_sidecar_key(&prefix);
            out.retain(|o| {
                o.key.starts_with(&prefix) && (sidecars || !crate::parts::is_sidecar_key(&o.key))
            });
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn head(&self, key: &str, version_id: Option<&str>) -> Result<ObjectInfo> {
        self.check_key(key)?;
        if let Some(v) = version_id {
            self.check_version_id(key, v)?;
        }
        let this = self.clone();
        let key = key.to_string();
        let version = version_id.map(str::to_string);
        blocking(move || {
            let data = this.data_path(&key);
            let current = std::fs::metadata(&data)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| this.info_for(&key, &m));
            match (&version, current) {
                (None, Some(c)) => Ok(c),
                (Some(v), Some(c)) if c.version_id.as_deref() == Some(v.as_str()) => Ok(c),
                (None, None) => Err(this.not_found(&key, None)),
                (Some(v), _) => this
                    .read_versions(&key)
                    .into_iter()
                    .find(|x| &x.version_id == v && !x.delete_marker)
                    .map(|x| ObjectInfo {
                        key: key.clone(),
                        size: x.size,
                        last_modified: Some(x.last_modified),
                        etag: x.etag,
                        version_id: Some(x.version_id),
                        metadata: x.metadata,
                    })
                    .ok_or_else(|| this.not_found(&key, Some(v))),
            }
        })
        .await
    }

    async fn get(&self, key: &str, opts: &GetOptions) -> Result<GetResponse> {
        let info = self.head(key, opts.version_id.as_deref()).await?;
        if let Some(want) = &opts.if_match {
            if info.etag.as_deref() != Some(want.as_str()) {
                return Err(Error::Changed {
                    target: self.url_of(key),
                });
            }
        }
        let path = match &opts.version_id {
            Some(v) => {
                let current = self.head(key, None).await.ok();
                if current.and_then(|c| c.version_id).as_deref() == Some(v.as_str()) {
                    self.data_path(key)
                } else {
                    self.versions_dir(key).join(v)
                }
            }
            None => self.data_path(key),
        };
        let (start, end) = match &opts.range {
            Some(r) => (
                r.start.min(info.size),
                if r.end > r.start {
                    r.end.min(info.size)
                } else {
                    info.size
                },
            ),
            None => (0, info.size),
        };
        Ok(GetResponse {
            body: file_chunks(path, start, end.saturating_sub(start)),
            info,
        })
    }

    async fn put(&self, key: &str, body: Body, metadata: &Metadata) -> Result<PutResult> {
        self.check_key(key)?;
        let this = self.clone();
        let key = key.to_string();
        let metadata = metadata.clone();
        blocking(move || {
            let (tmp, md5) = this.write_temp(&body)?;
            let r = this.publish(&key, &tmp, hex::encode(md5), &metadata);
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.check_key(key)?;
        let this = self.clone();
        let key = key.to_string();
        blocking(move || {
            let cfg = this.config();
            this.retire_current(&key, &cfg, true)?;
            let data = this.data_path(&key);
            match std::fs::remove_file(&data) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &data, e)),
            }
            let _ = std::fs::remove_file(this.meta_path(&key));
            Ok(())
        })
        .await
    }

    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> Result<String> {
        self.check_key(key)?;
        let this = self.clone();
        let up = UploadFile {
            key: key.to_string(),
            metadata: metadata.clone(),
            created: Utc::now(),
        };
        blocking(move || {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let dir = this.upload_dir(&id);
            std::fs::create_dir_all(&dir).ctx("create", &dir)?;
            infra_config::write_atomic(
                &dir.join("upload.json"),
                &serde_json::to_vec(&up).unwrap_or_default(),
            )
            .ctx("write", &dir)?;
            Ok(id)
        })
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Body,
    ) -> Result<PartInfo> {
        self.check_upload_id(key, upload_id)?;
        let this = self.clone();
        let key = key.to_string();
        let id = upload_id.to_string();
        blocking(move || {
            let dir = this.upload_dir(&id);
            if !dir.join("upload.json").exists() {
                return Err(this.not_found(&key, None));
            }
            let (tmp, md5) = this.write_temp(&body)?;
            let part = dir.join(format!("part-{number:05}"));
            std::fs::rename(&tmp, &part).ctx("rename", &part)?;
            let info = PartInfo {
                number,
                etag: hex::encode(md5),
                size: body.len(),
            };
            infra_config::write_atomic(
                &dir.join(format!("part-{number:05}.json")),
                &serde_json::to_vec(&info).unwrap_or_default(),
            )
            .ctx("write", &dir)?;
            Ok(info)
        })
        .await
    }

    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>> {
        self.check_upload_id(key, upload_id)?;
        let this = self.clone();
        let key = key.to_string();
        let id = upload_id.to_string();
        blocking(move || {
            let dir = this.upload_dir(&id);
            let rd = std::fs::read_dir(&dir).map_err(|_| this.not_found(&key, None))?;
            let mut parts: Vec<PartInfo> = rd
                .filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("part-") && n.ends_with(".json")
                })
                .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
                .collect();
            parts.sort_by_key(|p| p.number);
            Ok(parts)
        })
        .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartInfo],
    ) -> Result<PutResult> {
        self.check_key(key)?;
        self.check_upload_id(key, upload_id)?;
        let this = self.clone();
        let key = key.to_string();
        let id = upload_id.to_string();
        let parts = parts.to_vec();
        blocking(move || {
            let dir = this.upload_dir(&id);
            let up: UploadFile = std::fs::read(dir.join("upload.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| this.not_found(&key, None))?;
            let tmp_dir = this.tmp_dir();
            std::fs::create_dir_all(&tmp_dir).ctx("create", &tmp_dir)?;
            let tmp = tmp_dir.join(uuid::Uuid::new_v4().simple().to_string());
            let res = (|| {
                let mut out = std::fs::File::create(&tmp).ctx("create", &tmp)?;
                let mut md5s = Md5::new();
                for p in &parts {
                    let pj = dir.join(format!("part-{:05}.json", p.number));
                    let stored: PartInfo = std::fs::read(&pj)
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .ok_or_else(|| Error::Invalid {
                            what: "multipart part",
                            value: p.number.to_string(),
                            reason: "this part was not uploaded".into(),
                        })?;
                    if stored.etag != p.etag {
                        return Err(Error::Invalid {
                            what: "multipart part",
                            value: p.number.to_string(),
                            reason: "its ETag does not match the uploaded part".into(),
                        });
                    }
                    md5s.update(hex::decode(&stored.etag).unwrap_or_default());
                    let pf = dir.join(format!("part-{:05}", p.number));
                    let mut f = std::fs::File::open(&pf).ctx("open", &pf)?;
                    std::io::copy(&mut f, &mut out).ctx("write", &tmp)?;
                }
                out.sync_all().ctx("fsync", &tmp)?;
                let etag = format!("{}-{}", hex::encode(md5s.finalize()), parts.len());
                this.publish(&key, &tmp, etag, &up.metadata)
            })();
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
            res
        })
        .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.check_upload_id(key, upload_id)?;
        let dir = self.upload_dir(upload_id);
        blocking(move || {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        })
        .await
    }

    async fn versions(&self, key: &str) -> Result<Vec<VersionInfo>> {
        self.check_key(key)?;
        let this = self.clone();
        let key = key.to_string();
        blocking(move || {
            let cfg = this.config();
            let mut out = Vec::new();
            let current = std::fs::metadata(this.data_path(&key))
                .ok()
                .map(|m| this.info_for(&key, &m));
            if !cfg.versioning && this.read_versions(&key).is_empty() {
                return Err(Error::Unsupported {
                    feature: "object versions",
                    backend: format!("this local store ({})", this.root.display()),
                    detail: Some(
                        "versioning is off; `infra.operator store init` turns it on".into(),
                    ),
                });
            }
            if let Some(c) = &current {
                out.push(VersionInfo {
                    key: key.clone(),
                    version_id: c.version_id.clone().unwrap_or_else(|| "null".into()),
                    is_latest: true,
                    delete_marker: false,
                    size: c.size,
                    last_modified: c.last_modified,
                    etag: c.etag.clone(),
                });
            }
            let mut older = this.read_versions(&key);
            older.sort_by(|a, b| {
                b.noncurrent_since
                    .cmp(&a.noncurrent_since)
                    .then(b.delete_marker.cmp(&a.delete_marker))
            });
            let mut latest_taken = current.is_some();
            for v in older {
                // With no current object the newest entry (a delete marker) is the latest.
                let is_latest = !latest_taken;
                latest_taken = true;
                out.push(VersionInfo {
                    key: key.clone(),
                    version_id: v.version_id,
                    is_latest,
                    delete_marker: v.delete_marker,
                    size: v.size,
                    last_modified: Some(v.last_modified),
                    etag: v.etag,
                });
            }
            if out.is_empty() {
                return Err(this.not_found(&key, None));
            }
            Ok(out)
        })
        .await
    }

    async fn init(&self, opts: &InitOptions) -> Result<Vec<InitStep>> {
        let this = self.clone();
        let opts = opts.clone();
        blocking(move || {
            let existed = this.state().join("config.json").exists();
            let state = this.state();
            std::fs::create_dir_all(&state).ctx("create", &state)?;
            let mut cfg = this.config();
            let mut steps = vec![InitStep {
                feature: "bucket",
                status: if existed {
                    StepStatus::AlreadyDone
                } else {
                    StepStatus::Done
                },
                detail: format!("local store at {}", this.root.display()),
            }];
            steps.push(InitStep {
                feature: "versioning",
                status: match (opts.versioning, cfg.versioning) {
                    (false, _) => StepStatus::Skipped,
                    (true, true) => StepStatus::AlreadyDone,
                    (true, false) => StepStatus::Done,
                },
                detail: if opts.versioning {
                    "enabled".into()
                } else {
                    "not requested".into()
                },
            });
            cfg.versioning |= opts.versioning;
            if opts.noncurrent_days.is_some() || opts.abort_incomplete_days.is_some() {
                cfg.noncurrent_days = opts.noncurrent_days;
                cfg.abort_incomplete_days = opts.abort_incomplete_days;
                steps.push(InitStep {
                    feature: "lifecycle",
                    status: StepStatus::Done,
                    detail: format!(
                        "noncurrent versions expire after {} days (applied on each write)",
                        opts.noncurrent_days
                            .map(|d| d.to_string())
                            .unwrap_or_else(|| "-".into())
                    ),
                });
            } else {
                steps.push(InitStep {
                    feature: "lifecycle",
                    status: StepStatus::Skipped,
                    detail: "not requested".into(),
                });
            }
            steps.push(InitStep {
                feature: "encryption",
                status: if opts.encryption {
                    StepStatus::Unsupported
                } else {
                    StepStatus::Skipped
                },
                detail: if opts.encryption {
                    "not supported by the local store (use disk encryption on the host)".into()
                } else {
                    "not requested".into()
                },
            });
            let path = state.join("config.json");
            infra_config::write_atomic(&path, &serde_json::to_vec(&cfg).unwrap_or_default())
                .ctx("write", &path)?;
            Ok(steps)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    async fn read_all(s: &LocalStore, key: &str, opts: GetOptions) -> Vec<u8> {
        let r = s.get(key, &opts).await.unwrap();
        let chunks: Vec<Bytes> = r.body.try_collect().await.unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn put_get_range_list_delete() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path(), "dev");
        let mut meta = Metadata::new();
        meta.insert("sha256".into(), "abc".into());
        let r = s
            .put(
                "a/b.txt",
                Body::Bytes(Bytes::from_static(b"hello world")),
                &meta,
            )
            .await
            .unwrap();
        assert_eq!(r.etag.as_deref(), Some("5eb63bbbe01eeed093cb22bb8f5acdc3"));
        assert!(d.path().join("dev/a/b.txt").is_file());
        let h = s.head("a/b.txt", None).await.unwrap();
        assert_eq!(h.sha256(), Some("abc"));
        assert_eq!(h.size, 11);
        let part = read_all(
            &s,
            "a/b.txt",
            GetOptions {
                range: Some(6..11),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(part, b"world");
        let l = s.list("").await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].key, "a/b.txt");
        assert_eq!(l[0].sha256(), Some("abc"));
        let e = s
            .get(
                "a/b.txt",
                &GetOptions {
                    if_match: Some("nope".into()),
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(e, Err(Error::Changed { .. })));
        s.delete("a/b.txt").await.unwrap();
        assert!(matches!(
            s.head("a/b.txt", None).await,
            Err(Error::NoSuchKey { .. })
        ));
        assert!(s.list("").await.unwrap().is_empty());
        assert!(matches!(
            s.put("../x", Body::Bytes(Bytes::new()), &meta).await,
            Err(Error::UnsafeKey { .. })
        ));
    }

    /// Keys, upload ids and version ids become paths in this backend: hostile ones are refused
    /// by every operation, and a link inside the store is not followed on write.
    #[tokio::test]
    async fn hostile_keys_ids_and_links_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("store");
        let s = LocalStore::new(&root, "dev");
        let none = Metadata::new();
        let body = || Body::Bytes(Bytes::from_static(b"x"));
        for key in [
            "../x", "../../x", "/abs", "a//b", "a/../b", "a\0b", "./a", "",
        ] {
            assert!(
                matches!(
                    s.put(key, body(), &none).await,
                    Err(Error::UnsafeKey { .. })
                ),
                "put {key:?}"
            );
            assert!(matches!(
                s.head(key, None).await,
                Err(Error::UnsafeKey { .. })
            ));
            assert!(matches!(s.delete(key).await, Err(Error::UnsafeKey { .. })));
            assert!(matches!(
                s.create_multipart(key, &none).await,
                Err(Error::UnsafeKey { .. })
            ));
        }
        // Under the prefix "dev/" this is an ordinary key.
        assert!(s
            .put(".infra-store/config.json", body(), &none)
            .await
            .is_ok());
        let bare = LocalStore::new(&root, "");
        assert!(matches!(
            bare.put(".infra-store/config.json", body(), &none).await,
            Err(Error::UnsafeKey { .. })
        ));
        // complete_multipart checks the key too (it publishes under it).
        let id = s.create_multipart("ok", &none).await.unwrap();
        let p = s.upload_part("ok", &id, 1, body()).await.unwrap();
        assert!(matches!(
            s.complete_multipart("../../escaped", &id, &[p]).await,
            Err(Error::UnsafeKey { .. })
        ));
        assert!(!d.path().join("escaped").exists());
        // Upload ids name directories: a hostile one must not remove anything outside.
        let victim = d.path().join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("keep"), b"x").unwrap();
        let hostile_id = "../../../victim";
        assert!(s.abort_multipart("ok", hostile_id).await.is_err());
        assert!(s.list_parts("ok", hostile_id).await.is_err());
        assert!(s.upload_part("ok", hostile_id, 1, body()).await.is_err());
        assert!(victim.join("keep").is_file());
        // Version ids name files: a hostile one reads nothing outside.
        s.put("k", body(), &none).await.unwrap();
        let e = s
            .get(
                "k",
                &GetOptions {
                    version_id: Some("../../../../victim/keep".into()),
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(e, Err(Error::NoSuchKey { .. })));
        // A link planted inside the store is not followed when writing under it.
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("dev/link")).unwrap();
        let e = s.put("link/x", body(), &none).await.unwrap_err();
        assert!(matches!(e, Error::UnsafeKey { .. }), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn multipart_etag_matches_s3() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path(), "");
        let id = s.create_multipart("big", &Metadata::new()).await.unwrap();
        let p1 = s
            .upload_part("big", &id, 1, Body::Bytes(Bytes::from_static(b"aaaa")))
            .await
            .unwrap();
        let p2 = s
            .upload_part("big", &id, 2, Body::Bytes(Bytes::from_static(b"bb")))
            .await
            .unwrap();
        assert_eq!(s.list_parts("big", &id).await.unwrap().len(), 2);
        let r = s.complete_multipart("big", &id, &[p1, p2]).await.unwrap();
        let mut m = Md5::new();
        m.update(Md5::digest(b"aaaa"));
        m.update(Md5::digest(b"bb"));
        assert_eq!(r.etag.unwrap(), format!("{}-2", hex::encode(m.finalize())));
        assert_eq!(read_all(&s, "big", GetOptions::default()).await, b"aaaabb");
        assert!(matches!(
            s.list_parts("big", &id).await,
            Err(Error::NoSuchKey { .. })
        ));
    }

    #[tokio::test]
    async fn versions_when_enabled() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path(), "");
        let none = Metadata::new();
        s.put("k", Body::Bytes(Bytes::from_static(b"v0")), &none)
            .await
            .unwrap();
        assert!(matches!(
            s.versions("k").await,
            Err(Error::Unsupported { .. })
        ));
        let steps = s
            .init(&InitOptions {
                versioning: true,
                noncurrent_days: Some(30),
                abort_incomplete_days: Some(7),
                encryption: true,
            })
            .await
            .unwrap();
        assert_eq!(steps[1].status, StepStatus::Done);
        assert_eq!(steps[3].status, StepStatus::Unsupported);
        let v1 = s
            .put("k", Body::Bytes(Bytes::from_static(b"v1")), &none)
            .await
            .unwrap()
            .version_id
            .unwrap();
        s.put("k", Body::Bytes(Bytes::from_static(b"v2")), &none)
            .await
            .unwrap();
        let vs = s.versions("k").await.unwrap();
        assert_eq!(vs.len(), 3, "{vs:?}");
        assert!(vs[0].is_latest);
        assert_eq!(vs[1].version_id, v1);
        assert_eq!(vs[2].version_id, "null");
        let old = read_all(
            &s,
            "k",
            GetOptions {
                version_id: Some(v1.clone()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(old, b"v1");
        assert_eq!(read_all(&s, "k", GetOptions::default()).await, b"v2");
        s.delete("k").await.unwrap();
        let vs = s.versions("k").await.unwrap();
        assert!(vs[0].delete_marker && vs[0].is_latest);
        assert_eq!(vs.len(), 4);
    }
}
