//! `store sync SRC DST`: local directory ↔ store and store ↔ store (backups).
//!
//! One listing per store side (a directory is walked). An object is skipped when the other side
//! has the same key with the same size and the same content, decided without downloading: the
//! sha256 when both sides know it (local store listings carry it; the hash cache knows local
//! files), else the ETag from the listing recomputed for the local file (cached, so a second
//! sync reads nothing), else a HEAD for the sha256 in the metadata. Filters and `--delete`
//! follow `aws s3 sync`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::task::JoinSet;

use crate::error::{Error, IoContext, Result};
use crate::glob::{included, validate, Filter};
use crate::hashes::{local_matches_etag, HashCache};
use crate::object::{Body, GetOptions, ObjectInfo, ObjectStore, PartInfo};
use crate::progress::Progress;
use crate::transfer::{choose_part_size, short_label, Engine, TransferOptions};

/// One side of a sync.
#[derive(Debug, Clone)]
pub enum SyncSide {
    /// A directory of plain files.
    Dir(PathBuf),
    /// A store (bucket or local store) under its prefix.
    Store(Arc<dyn ObjectStore>),
}

impl SyncSide {
    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Dir(p) => p.display().to_string(),
            Self::Store(s) => s.describe(),
        }
    }

    fn url_of(&self, key: &str) -> String {
        match self {
            Self::Dir(p) => p.join(key).display().to_string(),
            Self::Store(s) => s.url_of(key),
        }
    }

    /// Whether keys written to this side become local paths (a directory, or the local store).
    fn keys_become_paths(&self) -> bool {
        match self {
            Self::Dir(_) => true,
            Self::Store(s) => s.kind() == crate::object::BackendKind::Local,
        }
    }
}

/// A source key that was not transferred because it is not safe as a local path.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedKey {
    /// The key as the source listed it.
    pub key: String,
    /// Where it came from.
    pub from: String,
    /// Why it was skipped (one line, the key escaped).
    pub reason: String,
}

/// Sync settings.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Filters in command-line order.
    pub filters: Vec<Filter>,
    /// Delete what the destination has and the source does not (within the filters).
    pub delete: bool,
    /// Only report what would be done.
    pub dry_run: bool,
}

/// What sync does with one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Local file → store.
    Upload,
    /// Store → local file.
    Download,
    /// Store → store.
    Copy,
    /// Removed from the destination.
    Delete,
}

/// One action of a sync.
#[derive(Debug, Clone, Serialize)]
pub struct SyncAction {
    /// What.
    pub kind: ActionKind,
    /// Key relative to both roots.
    pub key: String,
    /// Source (file path or URL); empty for deletes.
    pub from: String,
    /// Destination (file path or URL).
    pub to: String,
    /// Bytes to move.
    pub size: u64,
}

/// What a sync did (or would do, with `--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// Source.
    pub source: String,
    /// Destination.
    pub destination: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Actions in order.
    pub actions: Vec<SyncAction>,
    /// Keys skipped because unchanged.
    pub unchanged: usize,
    /// Keys left out by the filters.
    pub filtered_out: usize,
    /// Keys skipped because they are not safe as local paths (see [`crate::keys`]); everything
    /// else was transferred. The CLI exits non-zero when this is not empty.
    pub skipped: Vec<SkippedKey>,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    path: Option<PathBuf>,
    info: Option<ObjectInfo>,
}

fn is_internal(name: &str) -> bool {
    name == crate::local::STATE_DIR
        || (name.starts_with('.') && (name.ends_with(".part") || name.ends_with(".part.json")))
}

fn walk_dir(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == root => return Ok(()),
        Err(e) => return Err(Error::io("read directory", dir, e)),
    };
    for e in rd {
        let e = e.ctx("read directory", dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_internal(&name) {
            continue;
        }
        let path = e.path();
        let md = match std::fs::metadata(&path) {
            Ok(m) => m,
            // A dangling link: nothing to transfer or compare.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("stat", &path, e)),
        };
        if md.is_dir() {
            walk_dir(root, &path, out)?;
        } else if md.is_file() {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            out.insert(
                rel,
                Entry {
                    size: md.len(),
                    path: Some(path),
                    info: None,
                },
            );
        }
    }
    Ok(())
}

async fn list_side(side: &SyncSide) -> Result<BTreeMap<String, Entry>> {
    match side {
        SyncSide::Dir(root) => {
            let root = root.clone();
            tokio::task::spawn_blocking(move || {
                let mut out = BTreeMap::new();
                walk_dir(&root, &root, &mut out)?;
                Ok(out)
            })
            .await
            .map_err(|e| Error::io("read directory", Path::new("."), std::io::Error::other(e)))?
        }
        SyncSide::Store(s) => Ok(s
            .list("")
            .await?
            .into_iter()
            // Part-list sidecars belong to the objects that name them, not to the tree.
            .filter(|o| !o.key.ends_with('/') && !crate::parts::is_sidecar_key(&o.key))
            .map(|o| {
                (
                    o.key.clone(),
                    Entry {
                        size: o.size,
                        path: None,
                        info: Some(o),
                    },
                )
            })
            .collect()),
    }
}

/// Whether a local file and an object hold the same bytes (sizes already equal).
async fn same_local_remote(
    path: &Path,
    remote: &ObjectInfo,
    store: &dyn ObjectStore,
    hashes: &Arc<HashCache>,
) -> Result<bool> {
    let md = std::fs::metadata(path).ctx("stat", path)?;
    if let (Some(rs), Some(ls)) = (remote.sha256(), hashes.sha256(path, &md)) {
        return Ok(rs.eq_ignore_ascii_case(&ls));
    }
    if let Some(etag) = &remote.etag {
        let (p, e, h) = (path.to_path_buf(), etag.clone(), hashes.clone());
        let r = tokio::task::spawn_blocking(move || local_matches_etag(&p, &md, &e, &h))
            .await
            .map_err(|e| Error::io("read", path, std::io::Error::other(e)))??;
        if let Some(same) = r {
            return Ok(same);
        }
    }
    // Last resort: the sha256 in the object's metadata.
    let head = store.head(&remote.key, None).await?;
    let Some(rs) = head.sha256() else {
        return Ok(false);
    };
    let md = std::fs::metadata(path).ctx("stat", path)?;
    let ls = match hashes.sha256(path, &md) {
        Some(s) => s,
        None => {
            let p = path.to_path_buf();
            let s = tokio::task::spawn_blocking(move || crate::hashes::sha256_file(&p, |_| {}))
                .await
                .map_err(|e| Error::io("read", path, std::io::Error::other(e)))??;
            hashes.record_sha256(path, &md, &s);
            s
        }
    };
    Ok(rs.eq_ignore_ascii_case(&ls))
}

async fn same_remote_remote(
    a: &ObjectInfo,
    sa: &dyn ObjectStore,
    b: &ObjectInfo,
    sb: &dyn ObjectStore,
) -> Result<bool> {
    if a.etag.is_some() && a.etag == b.etag {
        return Ok(true);
    }
    let sha_a = match a.sha256() {
        Some(s) => Some(s.to_string()),
        None => sa.head(&a.key, None).await?.sha256().map(str::to_string),
    };
    let sha_b = match b.sha256() {
        Some(s) => Some(s.to_string()),
        None => sb.head(&b.key, None).await?.sha256().map(str::to_string),
    };
    Ok(matches!((sha_a, sha_b), (Some(x), Some(y)) if x.eq_ignore_ascii_case(&y)))
}

/// Plans and (unless dry-run) performs a sync.
pub async fn sync(
    src: &SyncSide,
    dst: &SyncSide,
    opts: &SyncOptions,
    transfer: &TransferOptions,
    progress: Arc<dyn Progress>,
    hashes: Arc<HashCache>,
) -> Result<SyncReport> {
    let t0 = Instant::now();
    validate(&opts.filters)?;
    if matches!((src, dst), (SyncSide::Dir(_), SyncSide::Dir(_))) {
        return Err(Error::Invalid {
            what: "sync",
            value: format!("{} → {}", src.describe(), dst.describe()),
            reason: "one side must be a bucket (s3://NAME[/PREFIX]) or a local store \
                     (file:///DIR)"
                .into(),
        });
    }
    let (src_list, dst_list) = tokio::try_join!(list_side(src), list_side(dst))?;
    let mut actions = Vec::new();
    let mut unchanged = 0usize;
    let mut filtered_out = 0usize;
    let mut skipped = Vec::new();
    for (key, s) in &src_list {
        if !included(&opts.filters, key) {
            filtered_out += 1;
            continue;
        }
        // Keys from a store are untrusted: one check before any becomes a local path.
        if dst.keys_become_paths() {
            if let Err(problem) = crate::keys::check_key(key) {
                skipped.push(skipped_key(src, key, problem));
                continue;
            }
        }
        let kind = match (src, dst) {
            (SyncSide::Dir(_), SyncSide::Store(_)) => ActionKind::Upload,
            (SyncSide::Store(_), SyncSide::Dir(_)) => ActionKind::Download,
            _ => ActionKind::Copy,
        };
        if let Some(d) = dst_list.get(key) {
            if d.size == s.size {
                let same = match (src, dst) {
                    (SyncSide::Dir(_), SyncSide::Store(st)) => {
                        same_local_remote(
                            s.path.as_deref().unwrap_or(Path::new("")),
                            d.info.as_ref().expect("listed object"),
                            &**st,
                            &hashes,
                        )
                        .await?
                    }
                    (SyncSide::Store(st), SyncSide::Dir(_)) => {
                        same_local_remote(
                            d.path.as_deref().unwrap_or(Path::new("")),
                            s.info.as_ref().expect("listed object"),
                            &**st,
                            &hashes,
                        )
                        .await?
                    }
                    (SyncSide::Store(sa), SyncSide::Store(sb)) => {
                        same_remote_remote(
                            s.info.as_ref().expect("listed object"),
                            &**sa,
                            d.info.as_ref().expect("listed object"),
                            &**sb,
                        )
                        .await?
                    }
                    _ => false,
                };
                if same {
                    unchanged += 1;
                    continue;
                }
            }
        }
        actions.push(SyncAction {
            kind,
            key: key.clone(),
            from: src.url_of(key),
            to: dst.url_of(key),
            size: s.size,
        });
    }
    if opts.delete {
        for key in dst_list.keys() {
            if !src_list.contains_key(key) && included(&opts.filters, key) {
                actions.push(SyncAction {
                    kind: ActionKind::Delete,
                    key: key.clone(),
                    from: String::new(),
                    to: dst.url_of(key),
                    size: 0,
                });
            }
        }
    }
    hashes.save();
    let mut report = SyncReport {
        source: src.describe(),
        destination: dst.describe(),
        dry_run: opts.dry_run,
        actions,
        unchanged,
        filtered_out,
        skipped,
        bytes: 0,
        seconds: 0.0,
    };
    if !opts.dry_run {
        let mut done = Vec::with_capacity(report.actions.len());
        for a in std::mem::take(&mut report.actions) {
            let r = perform(&a, src, dst, transfer, &progress, &hashes).await;
            match r {
                Ok(()) => {
                    report.bytes += a.size;
                    done.push(a);
                }
                // A link beneath the destination (found only when writing): skip this key.
                Err(Error::UnsafeKey { key, problem }) => {
                    report.skipped.push(skipped_key(src, &key, problem));
                }
                Err(e) => return Err(e),
            }
        }
        report.actions = done;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn skipped_key(src: &SyncSide, key: &str, problem: crate::keys::KeyProblem) -> SkippedKey {
    let from = src.url_of(key);
    let reason = Error::UnsafeKey {
        key: key.to_string(),
        problem,
    }
    .to_string();
    SkippedKey {
        key: key.to_string(),
        from: crate::keys::display_key(&from),
        reason,
    }
}

/// Performs one planned action.
async fn perform(
    a: &SyncAction,
    src: &SyncSide,
    dst: &SyncSide,
    transfer: &TransferOptions,
    progress: &Arc<dyn Progress>,
    hashes: &Arc<HashCache>,
) -> Result<()> {
    match (a.kind.clone(), src, dst) {
        (ActionKind::Upload, SyncSide::Dir(root), SyncSide::Store(st)) => {
            let e = Engine::new(
                st.clone(),
                transfer.clone(),
                progress.clone(),
                hashes.clone(),
            );
            e.upload_file(&root.join(&a.key), &a.key, &Default::default())
                .await?;
        }
        (ActionKind::Download, SyncSide::Store(st), SyncSide::Dir(root)) => {
            let e = Engine::new(
                st.clone(),
                transfer.clone(),
                progress.clone(),
                hashes.clone(),
            );
            // Checked again, and parents created without following links.
            let dest = crate::keys::prepare_key_path(root, &a.key)?;
            e.download_file(&a.key, &dest, None).await?;
        }
        (ActionKind::Copy, SyncSide::Store(from), SyncSide::Store(to)) => {
            copy_object(&**from, to.clone(), &a.key, transfer, &**progress).await?;
        }
        (ActionKind::Delete, _, SyncSide::Store(st)) => st.delete(&a.key).await?,
        (ActionKind::Delete, _, SyncSide::Dir(root)) => {
            // Keys here come from walking the directory, which follows links: never remove
            // through one.
            let p = crate::keys::existing_key_path(root, &a.key)?;
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &p, e)),
            }
        }
        _ => {}
    }
    Ok(())
}

/// Copies one object between stores, part by part through memory (metadata, including the
/// sha256, is carried over).
pub async fn copy_object(
    from: &dyn ObjectStore,
    to: Arc<dyn ObjectStore>,
    key: &str,
    transfer: &TransferOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let info = from.head(key, None).await?;
    let size = info.size;
    let id = format!("copy:{}", to.url_of(key));
    progress.start(&id, &short_label("copy", key), Some(size));
    let read = |range: std::ops::Range<u64>| {
        let opts = GetOptions {
            range: Some(range),
            if_match: info.etag.clone(),
            ..Default::default()
        };
        async move {
            use futures::TryStreamExt;
            let r = from.get(key, &opts).await?;
            let chunks: Vec<bytes::Bytes> = r.body.try_collect().await?;
            Ok::<_, Error>(bytes::Bytes::from(chunks.concat()))
        }
    };
    if size <= transfer.multipart_threshold {
        let data = if size == 0 {
            bytes::Bytes::new()
        } else {
            read(0..size).await?
        };
        to.put(key, Body::Bytes(data), &info.metadata).await?;
        progress.advance(&id, size);
        progress.finish(&id);
        return Ok(());
    }
    let part_size = choose_part_size(size, transfer.part_size)?;
    let n_parts = size.div_ceil(part_size);
    let upload_id = to.create_multipart(key, &info.metadata).await?;
    let mut parts = Vec::new();
    let mut set: JoinSet<Result<PartInfo>> = JoinSet::new();
    let mut next = 1u64;
    let in_flight = transfer.concurrency.clamp(1, 4);
    let r: Result<()> = async {
        loop {
            while set.len() < in_flight && next <= n_parts {
                let start = (next - 1) * part_size;
                let end = (start + part_size).min(size);
                let data = read(start..end).await?;
                let to = to.clone();
                let key = key.to_string();
                let uid = upload_id.clone();
                let n = next as i32;
                set.spawn(async move { to.upload_part(&key, &uid, n, Body::Bytes(data)).await });
                next += 1;
            }
            match set.join_next().await {
                None => break Ok(()),
                Some(Ok(Ok(p))) => {
                    progress.advance(&id, p.size);
                    parts.push(p);
                }
                Some(Ok(Err(e))) => break Err(e),
                Some(Err(e)) => {
                    break Err(Error::io("copy", Path::new(key), std::io::Error::other(e)))
                }
            }
        }
    }
    .await;
    progress.finish(&id);
    if let Err(e) = r {
        set.abort_all();
        let _ = to.abort_multipart(key, &upload_id).await;
        return Err(e);
    }
    parts.sort_by_key(|p| p.number);
    to.complete_multipart(key, &upload_id, &parts).await?;
    Ok(())
}
