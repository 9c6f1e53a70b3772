//! The file system over a store, independent of FUSE: inodes, caches, open files and every
//! operation as an async function returning [`FsResult`]. `fuse.rs` adapts it to the kernel.
//!
//! Inodes are numbered in memory: a node is a (parent, name) pair, its key is the names on the
//! way down joined with `/` (a directory's objects live under `key/`). Names come from the
//! bucket through [`infra_store::check_component`] (keys that cannot be file names are hidden
//! with one warning each) and from the kernel through the same check, so no path built here
//! can leave the mount's prefix.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use infra_store::{
    check_component, Body, Error as StoreError, GetOptions, ObjectInfo, ObjectStore, PartInfo,
};
use tokio::sync::mpsc;

use crate::error::{FsError, FsResult};
use crate::meta::{Attr, Kind};

/// Inode number of the root.
pub const ROOT: u64 = 1;
/// Objects listed per `ListObjectsV2` page.
const PAGE: i32 = 1000;
/// HEAD requests in flight when `readdirplus` fills attributes.
const HEAD_CONCURRENCY: usize = 64;
/// Entries one `readdirplus` call hands out at most.
const PLUS_AHEAD: usize = 512;
/// Entries whose attributes the filling task fetches past the last one `readdirplus`
/// reached (a program that reads a few entries of a huge directory pays for few HEADs).
const FILL_AHEAD: usize = 1024;
/// Range of the first GET after a seek (a random reader pays for little).
const FIRST_WINDOW: u64 = 1 << 20;
/// Range of each GET of a sequential reader.
const CHUNK: u64 = 8 << 20;
/// GETs in flight for a sequential reader (consecutive `CHUNK` ranges).
const READ_DEPTH: usize = 4;
/// Bytes one GET stream may hold ahead of the reader (at least `CHUNK`, so every range in
/// flight completes on its own).
const PREFETCH_BYTES: usize = CHUNK as usize;
/// A read this far past the received bytes waits for them rather than seeking.
const SKIP_AHEAD: u64 = 4 << 20;
/// Received bytes kept behind the reader.
const KEEP_BEHIND: u64 = 8 << 20;
/// Longest symbolic link target read back.
const MAX_LINK: u64 = 4096;

/// Attributes and ETag of a node as the bucket has them.
type Resolved = (Attr, Option<String>);

/// What the file system needs to know, resolved from the options.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Owner shown for objects without `x-amz-meta-uid` (the mounting user).
    pub default_uid: u32,
    /// Group shown for objects without `x-amz-meta-gid`.
    pub default_gid: u32,
    /// `uid=`: the owner shown for everything.
    pub force_uid: Option<u32>,
    /// `gid=`: the group shown for everything.
    pub force_gid: Option<u32>,
    /// `umask=`: bits cleared from every mode shown.
    pub umask: u32,
    /// `ro`.
    pub read_only: bool,
    /// Cache lifetime of listings and attributes.
    pub ttl: Duration,
    /// Limit of one request, and of each wait for download bytes.
    pub timeout: Duration,
    /// Multipart part size, also the size above which uploads are multipart.
    pub part_size: u64,
    /// Parts in flight per upload.
    pub concurrency: usize,
    /// Staging directory.
    pub cache_dir: PathBuf,
    /// Most bytes staged at once.
    pub cache_limit: u64,
}

/// One directory entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// File name (checked).
    pub name: String,
    /// What the listing says it is (symbolic links show as files until a HEAD tells).
    pub kind: Kind,
    /// The listing's info for objects.
    pub info: Option<ObjectInfo>,
}

/// Attribute changes of `setattr`.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend).
    pub size: Option<u64>,
    /// New modification time.
    pub mtime: Option<SystemTime>,
}

#[derive(Debug)]
struct Node {
    parent: u64,
    name: String,
    attr: Attr,
    /// When the store last confirmed the attributes.
    fetched: Option<Instant>,
    lookups: u64,
    etag: Option<String>,
    /// Open write handles.
    writers: usize,
    /// Removed while open: do not upload it again.
    unlinked: bool,
    /// ETag seen by the last open for reading (the kernel may keep its page cache).
    read_etag: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<u64, Node>,
    names: HashMap<(u64, String), u64>,
    next_ino: u64,
    dirs: HashMap<u64, (Instant, Arc<Vec<Entry>>)>,
}

impl State {
    fn path(&self, ino: u64) -> Option<String> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let n = self.nodes.get(&cur)?;
            parts.push(n.name.as_str());
            cur = n.parent;
        }
        parts.reverse();
        Some(parts.join("/"))
    }
}

/// An open directory: its entries as listed at `opendir`, and attributes fetched for
/// `readdirplus`.
#[derive(Debug)]
pub struct DirHandle {
    /// The directory.
    pub ino: u64,
    /// Entries (without `.` and `..`).
    pub entries: Arc<Vec<Entry>>,
    attrs: Arc<Slots>,
    /// The task filling `attrs` (started by the first `readdirplus`, stopped at release).
    filler: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for DirHandle {
    fn drop(&mut self) {
        if let Some(t) = &self.filler {
            t.abort();
        }
    }
}

/// Attributes of an open directory's entries, filled in order by a task `HEAD_CONCURRENCY`
/// requests at a time while `readdirplus` hands out the ones ready.
#[derive(Debug)]
struct Slots {
    attrs: Mutex<Vec<Slot>>,
    /// The task ended (finished, failed or stopped): a slot still pending is asked in the
    /// foreground.
    done: std::sync::atomic::AtomicBool,
    /// Entries `readdirplus` reached so far: the task stays at most `FILL_AHEAD` past it.
    wanted: AtomicUsize,
    changed: tokio::sync::Notify,
}

#[derive(Debug, Clone)]
enum Slot {
    Pending,
    /// The attributes, and when they were asked for (a node changed since keeps its own).
    Ready(Resolved, Instant),
    /// The request failed: asked again in the foreground, so its error reaches the program.
    Failed,
}

/// Marks the filling task ended however it stops (finished, failed, aborted, panicked), so no
/// `readdirplus` waits for it.
struct FillDone(Arc<Slots>);

impl Drop for FillDone {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// An entry for `readdirplus`: its node and attributes.
#[derive(Debug, Clone)]
pub struct PlusEntry {
    /// File name.
    pub name: String,
    /// Inode (created if new; its lookup count is raised by [`Fs::remember`]).
    pub ino: u64,
    /// Attributes.
    pub attr: Attr,
}

#[derive(Debug)]
enum Handle {
    Read(Reader),
    Write(Staging),
}

#[derive(Debug)]
struct Reader {
    ino: u64,
    etag: Option<String>,
    size: u64,
    /// Consecutive ranges requested, the first being read: one after a seek, up to
    /// `READ_DEPTH` while reading sequentially.
    streams: std::collections::VecDeque<Stream>,
    /// The reader went on from one range to the next (so it reads sequentially).
    sequential: bool,
    /// Bytes received, in order, from `buf_start` (recent ones kept so that reads the kernel
    /// sends slightly out of order, as its async read-ahead does, are served without a seek).
    buf: std::collections::VecDeque<Bytes>,
    buf_start: u64,
    buf_len: u64,
}

#[derive(Debug)]
struct Stream {
    rx: mpsc::UnboundedReceiver<FsResult<Bytes>>,
    /// Bytes the task may still read ahead; given back as the reader takes chunks.
    budget: Arc<tokio::sync::Semaphore>,
    task: tokio::task::JoinHandle<()>,
    /// End of the range requested.
    end: u64,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Staging {
    ino: u64,
    file: std::fs::File,
    path: tempfile::TempPath,
    size: u64,
    dirty: bool,
    /// An upload of this handle failed (its `close` or `fsync` reported it): the last release
    /// does not try again, so what the program was told stays true.
    failed: bool,
    charged: u64,
    /// Whether full parts may go up while the file is still being written: it started empty
    /// and nothing was written into a range already handed to an upload.
    may_stream: bool,
    /// End of the bytes written from offset 0 without a gap (only those go up early: a
    /// file preallocated or written from its end has holes that are not its content yet).
    contiguous: u64,
    /// The multipart upload under way while the file is written.
    early: Option<Early>,
    /// The data is stored but replacing its metadata afterwards failed (see `finish_early`):
    /// tried again at the next `close`/`fsync` and at the last release.
    meta_stale: bool,
}

/// A multipart upload started while a file that began empty is written sequentially: each
/// full part goes up as soon as it is written, so `close`/`fsync` only sends the tail. Any
/// write into a part already handed out abandons it (the whole file goes up at close).
#[derive(Debug)]
struct Early {
    key: String,
    /// The metadata sent with CreateMultipartUpload.
    meta: infra_store::Metadata,
    id: String,
    part: u64,
    /// Parts handed out: numbers `1..=started`, bytes `0..started * part`.
    started: u64,
    running: std::collections::VecDeque<tokio::task::JoinHandle<FsResult<PartInfo>>>,
    done: Vec<PartInfo>,
}

/// S3's limit on the parts of one upload.
const MAX_PARTS: u64 = 10_000;
/// S3's limit on one CopyObject.
const MAX_COPY: u64 = 5 << 30;

/// `f` with the request limit of `timeout=`.
async fn timed<T>(
    timeout: Duration,
    op: &'static str,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> FsResult<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(FsError::from),
        Err(_) => Err(FsError::TimedOut { op }),
    }
}

type SharedHandle = Arc<tokio::sync::Mutex<Handle>>;

/// The file system.
#[derive(Debug)]
pub struct Fs {
    store: Arc<dyn ObjectStore>,
    cfg: FsConfig,
    state: Mutex<State>,
    /// Open files: the inode a write handle stages (found without locking any handle, which a
    /// slow read or upload may hold), and the handle.
    handles: Mutex<HashMap<u64, (Option<u64>, SharedHandle)>>,
    dir_handles: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirHandle>>>>,
    next_fh: AtomicU64,
    staged: AtomicU64,
    warned: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn local(op: &'static str) -> impl FnOnce(std::io::Error) -> FsError {
    move |source| FsError::Local { op, source }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn dir_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    }
}

fn is_not_found(e: &FsError) -> bool {
    matches!(
        e,
        FsError::NotFound | FsError::Store(StoreError::NoSuchKey { .. })
    )
}

impl Fs {
    /// A file system over `store` (keys relative to the store's prefix).
    pub fn new(store: Arc<dyn ObjectStore>, cfg: FsConfig) -> Self {
        let mut st = State {
            next_ino: ROOT + 1,
            ..Default::default()
        };
        st.nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                name: String::new(),
                attr: Attr::implied_dir(),
                fetched: None,
                lookups: 1,
                etag: None,
                writers: 0,
                unlinked: false,
                read_etag: None,
            },
        );
        Self {
            store,
            cfg,
            state: Mutex::new(st),
            handles: Mutex::new(HashMap::new()),
            dir_handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            staged: AtomicU64::new(0),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// Mode, owner and group as shown, after `uid=`, `gid=` and `umask=`.
    pub fn shown(&self, a: &Attr) -> (u32, u32, u32) {
        let perm = a.perm & !self.cfg.umask & 0o7777;
        let uid = self.cfg.force_uid.or(a.uid).unwrap_or(self.cfg.default_uid);
        let gid = self.cfg.force_gid.or(a.gid).unwrap_or(self.cfg.default_gid);
        (perm, uid, gid)
    }

    /// Runs one store request under the `timeout=` limit.
    async fn t<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> FsResult<T> {
        timed(self.cfg.timeout, op, f).await
    }

    fn warn_hidden(&self, key: &str, problem: &infra_store::KeyProblem) {
        if lock(&self.warned).insert(key.to_string()) {
            tracing::warn!(
                key = %infra_store::keys::display_key(key),
                "object key cannot be a file name ({problem}); it is hidden from the mount \
                 (rename or delete it in the bucket)"
            );
        }
    }

    fn path(&self, ino: u64) -> FsResult<String> {
        lock(&self.state).path(ino).ok_or(FsError::BadHandle)
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn child_path(&self, parent: u64, name: &str) -> FsResult<String> {
        check_component(name).map_err(FsError::Name)?;
        let st = lock(&self.state);
        let p = st.nodes.get(&parent).ok_or(FsError::BadHandle)?;
        if p.attr.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let dir = st.path(parent).ok_or(FsError::BadHandle)?;
        Ok(join(&dir, name))
    }

    /// Records our own change in the parent's cached listing, when it has one: `name` now
    /// exists as `kind` (with the listing's `info`), or is gone (`None`). The listing keeps
    /// its age, so it expires as before; until then, lookups of names a program is creating
    /// in a directory it just listed or made are answered without a request.
    fn dir_set(&self, parent: u64, name: &str, now: Option<(Kind, Option<ObjectInfo>)>) {
        let mut st = lock(&self.state);
        let Some((at, entries)) = st.dirs.get_mut(&parent) else {
            return;
        };
        if !self.fresh(Some(*at)) {
            // Expired: listed again next time, not worth an update.
            st.dirs.remove(&parent);
            return;
        }
        let entries = Arc::make_mut(entries);
        let at = entries.binary_search_by(|e| e.name.as_str().cmp(name));
        match (at, now) {
            (Ok(i), Some((kind, info))) => {
                entries[i] = Entry {
                    name: name.to_string(),
                    kind,
                    info,
                }
            }
            (Err(i), Some((kind, info))) => entries.insert(
                i,
                Entry {
                    name: name.to_string(),
                    kind,
                    info,
                },
            ),
            (Ok(i), None) => {
                entries.remove(i);
            }
            (Err(_), None) => {}
        }
    }

    /// What a listing would say of an object we just wrote.
    fn listed(&self, key: &str, size: u64, etag: Option<String>) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size,
            last_modified: Some(chrono::Utc::now()),
            etag,
            version_id: None,
            metadata: Default::default(),
        }
    }

    /// What the bucket says `path` is: a directory (`path/` object or prefix), a file or a
    /// symbolic link; [`FsError::NotFound`] when neither.
    async fn resolve(&self, path: &str) -> FsResult<(Attr, Option<String>)> {
        if path.is_empty() {
            return Ok((Attr::implied_dir(), None));
        }
        let prefix = format!("{path}/");
        let (head, list) = tokio::join!(
            self.t("HeadObject", self.store.head(path, None)),
            self.t(
                "ListObjectsV2",
                self.store.list_page(&prefix, "/", None, Some(1))
            )
        );
        let page = list?;
        if !page.objects.is_empty() || !page.prefixes.is_empty() {
            if head.is_ok() {
                self.warn_hidden(path, &infra_store::KeyProblem::Reserved);
            }
            if page.objects.first().map(|o| o.key.as_str()) == Some(prefix.as_str()) {
                match self.t("HeadObject", self.store.head(&prefix, None)).await {
                    Ok(info) => return Ok((Attr::from_object(&info, true), info.etag)),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok((Attr::implied_dir(), None));
        }
        match head {
            Ok(info) => Ok((Attr::from_object(&info, false), info.etag)),
            Err(e) if is_not_found(&e) => Err(FsError::NotFound),
            Err(e) => Err(e),
        }
    }

    /// The node for (parent, name) with these attributes: the same inode while the kind
    /// stays, a new one when it changed.
    fn upsert(&self, parent: u64, name: &str, attr: Attr, etag: Option<String>) -> u64 {
        self.upsert_since(parent, name, attr, etag, None).0
    }

    /// [`Fs::upsert`] with attributes known at `known` (the time their request was sent):
    /// a node that learned newer ones since (our own upload, another lookup) keeps them.
    /// Returns the node and the attributes it has now.
    fn upsert_since(
        &self,
        parent: u64,
        name: &str,
        attr: Attr,
        etag: Option<String>,
        known: Option<Instant>,
    ) -> (u64, Attr) {
        let mut st = lock(&self.state);
        let key = (parent, name.to_string());
        if let Some(&ino) = st.names.get(&key) {
            if let Some(n) = st.nodes.get_mut(&ino) {
                if n.attr.kind == attr.kind {
                    let newer = matches!((n.fetched, known), (Some(f), Some(k)) if f > k);
                    if n.writers == 0 && !newer {
                        n.attr = attr;
                        n.etag = etag;
                        n.fetched = Some(known.unwrap_or_else(Instant::now));
                    }
                    return (ino, n.attr);
                }
            }
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        st.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_string(),
                attr,
                fetched: Some(known.unwrap_or_else(Instant::now)),
                lookups: 0,
                etag,
                writers: 0,
                unlinked: false,
                read_etag: None,
            },
        );
        st.names.insert(key, ino);
        (ino, attr)
    }

    /// Raises the kernel's lookup count of a node (after an entry was handed to it).
    pub fn remember(&self, ino: u64) {
        if let Some(n) = lock(&self.state).nodes.get_mut(&ino) {
            n.lookups += 1;
        }
    }

    /// The kernel dropped `n` references.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut st = lock(&self.state);
        let drop_it = match st.nodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0 && node.writers == 0
            }
            None => false,
        };
        if drop_it {
            if let Some(node) = st.nodes.remove(&ino) {
                let key = (node.parent, node.name);
                if st.names.get(&key) == Some(&ino) {
                    st.names.remove(&key);
                }
            }
            st.dirs.remove(&ino);
        }
    }

    fn fresh(&self, fetched: Option<Instant>) -> bool {
        fetched.is_some_and(|t| t.elapsed() < self.cfg.ttl)
    }

    /// Looks `name` up in `parent`; raises its lookup count.
    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<(u64, Attr)> {
        let path = self.child_path(parent, name)?;
        {
            let st = lock(&self.state);
            if let Some(&ino) = st.names.get(&(parent, name.to_string())) {
                let n = &st.nodes[&ino];
                if n.writers > 0 || self.fresh(n.fetched) {
                    let a = n.attr;
                    drop(st);
                    self.remember(ino);
                    return Ok((ino, a));
                }
            }
        }
        // A fresh listing of the parent answers without a request when the name is not in
        // it, and says which one request tells its attributes when it is.
        let asked = Instant::now();
        let ((attr, etag), known) = match self.listed_entry(parent, name) {
            Some(None) => return Err(FsError::NotFound),
            Some(Some(e)) => self.entry_attr(parent, &e, &path).await?,
            None => (self.resolve(&path).await?, asked),
        };
        let (ino, attr) = self.upsert_since(parent, name, attr, etag, Some(known));
        self.remember(ino);
        Ok((ino, attr))
    }

    /// What the parent's fresh listing says of `name`: `Some(None)` when it is not there,
    /// `None` when there is no fresh listing.
    fn listed_entry(&self, parent: u64, name: &str) -> Option<Option<Entry>> {
        let st = lock(&self.state);
        let (t, entries) = st.dirs.get(&parent)?;
        if t.elapsed() >= self.cfg.ttl {
            return None;
        }
        Some(
            entries
                .binary_search_by(|e| e.name.as_str().cmp(name))
                .ok()
                .map(|i| entries[i].clone()),
        )
    }

    /// Attributes of a node (from the cache while fresh or while it is being written).
    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let (path, parent, name) = {
            let st = lock(&self.state);
            let n = st.nodes.get(&ino).ok_or(FsError::BadHandle)?;
            if ino == ROOT || n.writers > 0 || n.unlinked || self.fresh(n.fetched) {
                return Ok(n.attr);
            }
            (
                st.path(ino).ok_or(FsError::BadHandle)?,
                n.parent,
                n.name.clone(),
            )
        };
        let asked = Instant::now();
        let (attr, etag) = self.resolve(&path).await?;
        let (got, attr) = self.upsert_since(parent, &name, attr, etag, Some(asked));
        if got != ino {
            // It is something else now (a file became a directory): this inode is stale.
            return Err(FsError::NotFound);
        }
        Ok(attr)
    }

    /// The full listing of a directory (cached for the TTL).
    async fn list_dir(&self, ino: u64) -> FsResult<Arc<Vec<Entry>>> {
        let path = {
            let st = lock(&self.state);
            if let Some((t, e)) = st.dirs.get(&ino) {
                if t.elapsed() < self.cfg.ttl {
                    return Ok(e.clone());
                }
            }
            let n = st.nodes.get(&ino).ok_or(FsError::BadHandle)?;
            if n.attr.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            st.path(ino).ok_or(FsError::BadHandle)?
        };
        let prefix = dir_prefix(&path);
        let mut dirs: Vec<Entry> = Vec::new();
        let mut files: Vec<Entry> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .t(
                    "ListObjectsV2",
                    self.store
                        .list_page(&prefix, "/", token.as_deref(), Some(PAGE)),
                )
                .await?;
            for p in page.prefixes {
                let Some(rest) = p.strip_prefix(&prefix) else {
                    continue;
                };
                let name = rest.strip_suffix('/').unwrap_or(rest);
                match check_component(name) {
                    Ok(()) => dirs.push(Entry {
                        name: name.to_string(),
                        kind: Kind::Dir,
                        info: None,
                    }),
                    Err(problem) => self.warn_hidden(&p, &problem),
                }
            }
            for o in page.objects {
                let Some(rest) = o.key.strip_prefix(&prefix) else {
                    continue;
                };
                if rest.is_empty() {
                    continue; // the directory's own `dir/` object
                }
                match check_component(rest) {
                    Ok(()) => files.push(Entry {
                        name: rest.to_string(),
                        kind: Kind::File,
                        info: Some(o.clone()),
                    }),
                    Err(problem) => self.warn_hidden(&o.key, &problem),
                }
            }
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let dir_names: HashSet<String> = dirs.iter().map(|d| d.name.clone()).collect();
        let mut entries = dirs;
        for f in files {
            if dir_names.contains(&f.name) {
                // Both `x` and `x/...`: the directory wins, the object is hidden.
                self.warn_hidden(&join(&path, &f.name), &infra_store::KeyProblem::Reserved);
            } else {
                entries.push(f);
            }
        }
        // Files created here and not uploaded yet are shown too.
        {
            let st = lock(&self.state);
            let known: HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            let mut extra = Vec::new();
            for n in st.nodes.values() {
                if n.parent == ino
                    && n.writers > 0
                    && !n.unlinked
                    && !known.contains(n.name.as_str())
                {
                    extra.push(Entry {
                        name: n.name.clone(),
                        kind: n.attr.kind,
                        info: None,
                    });
                }
            }
            entries.extend(extra);
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let entries = Arc::new(entries);
        lock(&self.state)
            .dirs
            .insert(ino, (Instant::now(), entries.clone()));
        Ok(entries)
    }

    /// Opens a directory: lists it once for this handle.
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let entries = self.list_dir(ino).await?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let n = entries.len();
        lock(&self.dir_handles).insert(
            fh,
            Arc::new(tokio::sync::Mutex::new(DirHandle {
                ino,
                entries,
                attrs: Arc::new(Slots {
                    attrs: Mutex::new(vec![Slot::Pending; n]),
                    done: false.into(),
                    wanted: AtomicUsize::new(0),
                    changed: tokio::sync::Notify::new(),
                }),
                filler: None,
            })),
        );
        Ok(fh)
    }

    /// The entries of an open directory.
    pub fn dir_entries(&self, fh: u64) -> FsResult<(u64, Arc<Vec<Entry>>)> {
        let h = lock(&self.dir_handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let h = h.try_lock().map_err(|_| FsError::BadHandle)?;
        Ok((h.ino, h.entries.clone()))
    }

    /// Entries `from..` of an open directory with their attributes: as many as are ready, at
    /// least one. The first call starts a task that fetches every entry's attributes in order
    /// (HEAD requests, `HEAD_CONCURRENCY` in flight), so the kernel's small `readdirplus`
    /// calls never wait for a batch to drain. Nodes are created but not counted.
    pub async fn readdirplus(self: &Arc<Self>, fh: u64, from: usize) -> FsResult<Vec<PlusEntry>> {
        let h = lock(&self.dir_handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let (dir, entries, slots) = {
            let mut h = h.lock().await;
            if h.filler.is_none() {
                h.filler = Some(tokio::spawn(self.clone().fill_attrs(
                    h.ino,
                    h.entries.clone(),
                    h.attrs.clone(),
                )));
            }
            (h.ino, h.entries.clone(), h.attrs.clone())
        };
        if from >= entries.len() {
            return Ok(Vec::new());
        }
        if slots.wanted.fetch_max(from, Ordering::SeqCst) < from {
            slots.changed.notify_waiters();
        }
        // Wait for the first slot (registered before looking, so no wake-up is missed).
        loop {
            let changed = slots.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !matches!(lock(&slots.attrs)[from], Slot::Pending)
                || slots.done.load(Ordering::SeqCst)
            {
                break;
            }
            changed.await;
        }
        let ready: Vec<(usize, Resolved, Instant)> = {
            let attrs = lock(&slots.attrs);
            (from..(from + PLUS_AHEAD).min(entries.len()))
                .map_while(|i| match &attrs[i] {
                    Slot::Ready(a, asked) => Some((i, a.clone(), *asked)),
                    Slot::Pending | Slot::Failed => None,
                })
                .collect()
        };
        let ready = if ready.is_empty() {
            // The task could not get this one: ask again here, so its error reaches ls.
            let path = self.path(dir)?;
            let e = &entries[from];
            let (a, known) = self.settle(dir, e, &join(&path, &e.name)).await?;
            vec![(from, a, known)]
        } else {
            ready
        };
        let mut out = Vec::with_capacity(ready.len());
        for (i, (attr, etag), known) in ready {
            let name = &entries[i].name;
            let (ino, attr) = self.upsert_since(dir, name, attr, etag, Some(known));
            out.push(PlusEntry {
                name: name.clone(),
                ino,
                attr,
            });
        }
        Ok(out)
    }

    /// The task behind [`Fs::readdirplus`]: fills `slots` in order, at most `FILL_AHEAD`
    /// entries past the last one asked for. A failed request marks its slot at once (the
    /// `readdirplus` waiting for it asks again and reports the error; the program then closes
    /// the directory, which stops this task).
    async fn fill_attrs(self: Arc<Self>, dir: u64, entries: Arc<Vec<Entry>>, slots: Arc<Slots>) {
        let _done = FillDone(slots.clone());
        let Ok(path) = self.path(dir) else {
            return;
        };
        // Each request owns what it uses: the task must not borrow across its own awaits.
        let mut results = futures::stream::iter(0..entries.len())
            .map(|i| {
                let (fs, entries, path, slots) =
                    (self.clone(), entries.clone(), path.clone(), slots.clone());
                async move {
                    loop {
                        let changed = slots.changed.notified();
                        tokio::pin!(changed);
                        changed.as_mut().enable();
                        if i < slots.wanted.load(Ordering::SeqCst) + FILL_AHEAD {
                            break;
                        }
                        changed.await;
                    }
                    let e = &entries[i];
                    let r = fs.settle(dir, e, &join(&path, &e.name)).await;
                    (i, r)
                }
            })
            .buffered(HEAD_CONCURRENCY);
        while let Some((i, r)) = results.next().await {
            lock(&slots.attrs)[i] = match r {
                Ok((a, known)) => Slot::Ready(a, known),
                Err(_) => Slot::Failed,
            };
            slots.changed.notify_waiters();
        }
    }

    /// An entry's attributes for a listing: an entry gone since the listing is shown with
    /// what the listing said.
    async fn settle(&self, dir: u64, e: &Entry, key: &str) -> FsResult<(Resolved, Instant)> {
        let asked = Instant::now();
        match self.entry_attr(dir, e, key).await {
            Err(err) if is_not_found(&err) => {
                let a = match (&e.info, e.kind) {
                    (Some(info), _) => Attr::from_listing(info),
                    (None, Kind::Dir) => Attr::implied_dir(),
                    (None, kind) => Attr {
                        kind,
                        ..Attr::implied_dir()
                    },
                };
                Ok(((a, None), asked))
            }
            r => r,
        }
    }

    /// An entry's attributes (the node's while fresh, else one HEAD) and when they were
    /// known: the node's fetch time, or the time the request was sent (so that a cached
    /// answer never counts as newer than it is).
    async fn entry_attr(&self, dir: u64, e: &Entry, key: &str) -> FsResult<(Resolved, Instant)> {
        let asked = Instant::now();
        {
            let st = lock(&self.state);
            if let Some(&ino) = st.names.get(&(dir, e.name.clone())) {
                let n = &st.nodes[&ino];
                if n.writers > 0 || self.fresh(n.fetched) {
                    return Ok(((n.attr, n.etag.clone()), n.fetched.unwrap_or(asked)));
                }
            }
        }
        let r = match e.kind {
            Kind::Dir => match self
                .t("HeadObject", self.store.head(&format!("{key}/"), None))
                .await
            {
                Ok(info) => (Attr::from_object(&info, true), info.etag),
                Err(err) if is_not_found(&err) => (Attr::implied_dir(), None),
                Err(err) => return Err(err),
            },
            Kind::File | Kind::Symlink => {
                let info = self.t("HeadObject", self.store.head(key, None)).await?;
                (Attr::from_object(&info, false), info.etag)
            }
        };
        Ok((r, asked))
    }

    /// Closes a directory handle.
    pub fn releasedir(&self, fh: u64) {
        lock(&self.dir_handles).remove(&fh);
    }

    /// Target of a symbolic link.
    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let path = self.path(ino)?;
        let resp = self
            .t(
                "GetObject",
                self.store.get(
                    &path,
                    &GetOptions {
                        range: Some(0..MAX_LINK),
                        ..Default::default()
                    },
                ),
            )
            .await?;
        let mut out = Vec::new();
        let mut body = resp.body;
        while let Some(c) = self.next_chunk(&mut body).await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    async fn next_chunk(&self, body: &mut infra_store::ByteChunks) -> FsResult<Option<Bytes>> {
        match tokio::time::timeout(self.cfg.timeout, body.next()).await {
            Ok(Some(Ok(b))) => Ok(Some(b)),
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(None) => Ok(None),
            Err(_) => Err(FsError::TimedOut { op: "GetObject" }),
        }
    }

    /// Fails with [`FsError::Exists`] when the name is taken (in the bucket or locally).
    async fn ensure_absent(&self, parent: u64, name: &str, path: &str) -> FsResult<()> {
        {
            let st = lock(&self.state);
            if let Some(&ino) = st.names.get(&(parent, name.to_string())) {
                if st.nodes[&ino].writers > 0 && !st.nodes[&ino].unlinked {
                    return Err(FsError::Exists);
                }
            }
        }
        match self.resolve(path).await {
            Ok(_) => Err(FsError::Exists),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn now_attr(&self, kind: Kind, perm: u32, uid: u32, gid: u32) -> Attr {
        Attr {
            kind,
            size: 0,
            perm: perm & 0o7777,
            uid: Some(uid),
            gid: Some(gid),
            mtime: SystemTime::now(),
        }
    }

    fn metadata(&self, a: &Attr) -> infra_store::Metadata {
        a.to_metadata(
            self.cfg.default_uid,
            self.cfg.default_gid,
            SystemTime::now(),
        )
    }

    /// Creates a directory: a `name/` object with the s3fs metadata.
    pub async fn mkdir(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(u64, Attr)> {
        self.check_writable()?;
        let path = self.child_path(parent, name)?;
        self.ensure_absent(parent, name, &path).await?;
        let attr = self.now_attr(Kind::Dir, mode, uid, gid);
        self.t(
            "PutObject",
            self.store.put(
                &format!("{path}/"),
                Body::Bytes(Bytes::new()),
                &self.metadata(&attr),
            ),
        )
        .await?;
        self.dir_set(parent, name, Some((Kind::Dir, None)));
        let ino = self.upsert(parent, name, attr, None);
        // Nothing was under `path/` a moment ago (ensure_absent): the new directory's
        // listing is known, so creating files in it needs no lookups.
        lock(&self.state)
            .dirs
            .insert(ino, (Instant::now(), Arc::new(Vec::new())));
        self.remember(ino);
        Ok((ino, attr))
    }

    /// Creates a symbolic link: an object holding the target, mode `S_IFLNK|0777`.
    pub async fn symlink(
        &self,
        parent: u64,
        name: &str,
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<(u64, Attr)> {
        self.check_writable()?;
        let path = self.child_path(parent, name)?;
        self.ensure_absent(parent, name, &path).await?;
        let mut attr = self.now_attr(Kind::Symlink, 0o777, uid, gid);
        attr.size = target.len() as u64;
        let put = self
            .t(
                "PutObject",
                self.store.put(
                    &path,
                    Body::Bytes(Bytes::copy_from_slice(target)),
                    &self.metadata(&attr),
                ),
            )
            .await?;
        let info = self.listed(&path, attr.size, put.etag.clone());
        self.dir_set(parent, name, Some((Kind::Symlink, Some(info))));
        let ino = self.upsert(parent, name, attr, put.etag);
        self.remember(ino);
        Ok((ino, attr))
    }

    /// Removes a file or symbolic link.
    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        self.check_writable()?;
        let path = self.child_path(parent, name)?;
        let local = {
            let st = lock(&self.state);
            st.names.get(&(parent, name.to_string())).and_then(|ino| {
                st.nodes
                    .get(ino)
                    .map(|n| (*ino, n.writers > 0, n.attr.kind))
            })
        };
        let (kind, held) = match local {
            Some((ino, true, kind)) => (kind, self.hold_writers(&[ino]).await),
            _ => (self.resolve(&path).await?.0.kind, Vec::new()),
        };
        if kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        match self.t("DeleteObject", self.store.delete(&path)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        self.detach(parent, name);
        self.dir_set(parent, name, None);
        drop(held);
        Ok(())
    }

    /// Forgets the name (the node lives on for open handles, which will not upload it).
    fn detach(&self, parent: u64, name: &str) {
        let mut st = lock(&self.state);
        if let Some(ino) = st.names.remove(&(parent, name.to_string())) {
            if let Some(n) = st.nodes.get_mut(&ino) {
                n.unlinked = true;
            }
        }
    }

    /// Removes an empty directory (its `dir/` object).
    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        self.check_writable()?;
        let path = self.child_path(parent, name)?;
        let (attr, _) = self.resolve(&path).await?;
        if attr.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let prefix = format!("{path}/");
        let page = self
            .t(
                "ListObjectsV2",
                self.store.list_page(&prefix, "/", None, Some(2)),
            )
            .await?;
        if !page.prefixes.is_empty() || page.objects.iter().any(|o| o.key != prefix) {
            return Err(FsError::NotEmpty);
        }
        // Local files not uploaded yet count too.
        {
            let st = lock(&self.state);
            if let Some(&ino) = st.names.get(&(parent, name.to_string())) {
                if st
                    .nodes
                    .values()
                    .any(|n| n.parent == ino && n.writers > 0 && !n.unlinked)
                {
                    return Err(FsError::NotEmpty);
                }
            }
        }
        match self.t("DeleteObject", self.store.delete(&prefix)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        self.detach(parent, name);
        self.dir_set(parent, name, None);
        Ok(())
    }

    /// Renames a file, symbolic link or directory: copy, then delete (see the semantics doc
    /// for what is atomic).
    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
    ) -> FsResult<()> {
        self.check_writable()?;
        let from = self.child_path(parent, name)?;
        let to = self.child_path(newparent, newname)?;
        if from == to {
            return Ok(());
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(FsError::Invalid);
        }
        // Data written through open handles goes first, so the copy has it; those handles
        // and the target's stay locked until the names are switched.
        let (src_ino, dst_ino) = {
            let st = lock(&self.state);
            (
                st.names.get(&(parent, name.to_string())).copied(),
                st.names.get(&(newparent, newname.to_string())).copied(),
            )
        };
        let inos: Vec<u64> = src_ino.into_iter().chain(dst_ino).collect();
        let mut held = self.hold_writers(&inos).await;
        for g in held.iter_mut() {
            if let Handle::Write(s) = &mut **g {
                if Some(s.ino) == src_ino && s.dirty {
                    self.upload(s).await?;
                }
            }
        }
        let (src, _) = self.resolve(&from).await?;
        let dst = match self.resolve(&to).await {
            Ok((a, _)) => Some(a),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(e),
        };
        if noreplace && dst.is_some() {
            return Err(FsError::Exists);
        }
        match (src.kind, dst.map(|d| d.kind)) {
            (Kind::Dir, Some(Kind::File | Kind::Symlink)) => return Err(FsError::NotDir),
            (Kind::File | Kind::Symlink, Some(Kind::Dir)) => return Err(FsError::IsDir),
            (Kind::Dir, Some(Kind::Dir)) => {
                let p = format!("{to}/");
                let page = self
                    .t(
                        "ListObjectsV2",
                        self.store.list_page(&p, "/", None, Some(2)),
                    )
                    .await?;
                if !page.prefixes.is_empty() || page.objects.iter().any(|o| o.key != p) {
                    return Err(FsError::NotEmpty);
                }
            }
            _ => {}
        }
        if src.kind == Kind::Dir {
            let prefix = format!("{from}/");
            let all = self.t("ListObjectsV2", self.store.list(&prefix)).await?;
            let objects: Vec<String> = all.into_iter().map(|o| o.key).collect();
            let copies = futures::stream::iter(objects.iter().map(|k| {
                let dest = format!("{to}/{}", &k[prefix.len()..]);
                async move { self.t("CopyObject", self.store.copy(k, &dest, None)).await }
            }))
            .buffer_unordered(self.cfg.concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
            for c in copies {
                c?;
            }
            for k in &objects {
                match self.t("DeleteObject", self.store.delete(k)).await {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        } else {
            self.t("CopyObject", self.store.copy(&from, &to, None))
                .await?;
            match self.t("DeleteObject", self.store.delete(&from)).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        {
            let mut st = lock(&self.state);
            if let Some(old) = st.names.remove(&(newparent, newname.to_string())) {
                if let Some(n) = st.nodes.get_mut(&old) {
                    n.unlinked = true;
                }
            }
            if let Some(ino) = st.names.remove(&(parent, name.to_string())) {
                if let Some(n) = st.nodes.get_mut(&ino) {
                    n.parent = newparent;
                    n.name = newname.to_string();
                    n.fetched = None;
                }
                st.names.insert((newparent, newname.to_string()), ino);
            }
            st.dirs.remove(&parent);
            st.dirs.remove(&newparent);
        }
        drop(held);
        Ok(())
    }

    /// Changes attributes: the size through a staging file, the rest in metadata (a copy of
    /// the object onto itself, or the `dir/` object).
    pub async fn setattr(&self, ino: u64, ch: SetAttr, fh: Option<u64>) -> FsResult<Attr> {
        self.check_writable()?;
        if ino == ROOT {
            return self.getattr(ino).await;
        }
        let cur = self.getattr(ino).await?;
        let mut new = cur;
        if let Some(m) = ch.mode {
            new.perm = m & 0o7777;
        }
        if let Some(u) = ch.uid {
            new.uid = Some(u);
        }
        if let Some(g) = ch.gid {
            new.gid = Some(g);
        }
        if let Some(t) = ch.mtime {
            new.mtime = t;
        }
        if let Some(size) = ch.size {
            if cur.kind != Kind::File {
                return Err(if cur.kind == Kind::Dir {
                    FsError::IsDir
                } else {
                    FsError::Invalid
                });
            }
            if ch.mtime.is_none() {
                new.mtime = SystemTime::now();
            }
            new.size = size;
            // Through an open write handle: the upload happens at close or fsync.
            if let Some(h) = self.write_handle(ino, fh) {
                let mut h = h.lock().await;
                if let Handle::Write(s) = &mut *h {
                    if s.early.as_ref().is_some_and(|e| size < e.started * e.part) {
                        // The whole file goes up at close.
                        self.abandon(s);
                        s.may_stream = false;
                    }
                    self.resize_staging(s, size)?;
                    s.contiguous = s.contiguous.min(size);
                    s.dirty = true;
                }
                self.set_local_attr(ino, new);
                return Ok(new);
            }
            let mut s = self.new_staging(ino)?;
            let r = if size > 0 {
                self.fill_staging(&mut s).await
            } else {
                Ok(())
            };
            let r = match r.and_then(|()| self.resize_staging(&mut s, size)) {
                Ok(()) => {
                    self.set_local_attr(ino, new);
                    self.upload(&mut s).await
                }
                Err(e) => Err(e),
            };
            self.uncharge(&s);
            r?;
            return Ok(new);
        }
        self.set_local_attr(ino, new);
        if self.has_writers(ino) {
            // Uploaded with the data at close or fsync.
            self.mark_dirty(ino).await;
            return Ok(new);
        }
        let path = self.path(ino)?;
        let key = if cur.kind == Kind::Dir {
            format!("{path}/")
        } else {
            path
        };
        let (mut meta, exists) = match self.t("HeadObject", self.store.head(&key, None)).await {
            Ok(info) => (info.metadata, true),
            // An implied directory gets its `dir/` object.
            Err(e) if is_not_found(&e) && cur.kind == Kind::Dir => {
                (infra_store::Metadata::new(), false)
            }
            Err(e) => return Err(e),
        };
        meta.extend(self.metadata(&new));
        let put = if exists {
            self.t("CopyObject", self.store.copy(&key, &key, Some(&meta)))
                .await?
        } else {
            self.t(
                "PutObject",
                self.store.put(&key, Body::Bytes(Bytes::new()), &meta),
            )
            .await?
        };
        // Again, with the time: attributes fetched meanwhile (before the copy) are older.
        // The copy may have a new ETag (a multipart object's becomes a plain one): readers
        // opened from now on expect it.
        if let Some(n) = lock(&self.state).nodes.get_mut(&ino) {
            n.attr = new;
            n.fetched = Some(Instant::now());
            if cur.kind != Kind::Dir {
                n.etag = put.etag;
            }
        }
        Ok(new)
    }

    fn set_local_attr(&self, ino: u64, a: Attr) {
        if let Some(n) = lock(&self.state).nodes.get_mut(&ino) {
            n.attr = a;
        }
    }

    fn has_writers(&self, ino: u64) -> bool {
        lock(&self.state)
            .nodes
            .get(&ino)
            .is_some_and(|n| n.writers > 0)
    }

    fn write_handle(&self, ino: u64, fh: Option<u64>) -> Option<SharedHandle> {
        let handles = lock(&self.handles);
        if let Some((Some(i), h)) = fh.and_then(|fh| handles.get(&fh)) {
            if *i == ino {
                return Some(h.clone());
            }
        }
        handles
            .values()
            .find(|(i, _)| *i == Some(ino))
            .map(|(_, h)| h.clone())
    }

    /// The write handles of `inos`, in handle order.
    fn writers_of(&self, inos: &[u64]) -> Vec<SharedHandle> {
        let mut hs: Vec<(u64, SharedHandle)> = lock(&self.handles)
            .iter()
            .filter(|(_, (i, _))| i.is_some_and(|i| inos.contains(&i)))
            .map(|(fh, (_, h))| (*fh, h.clone()))
            .collect();
        hs.sort_by_key(|(fh, _)| *fh);
        hs.into_iter().map(|(_, h)| h).collect()
    }

    async fn mark_dirty(&self, ino: u64) {
        for h in self.writers_of(&[ino]) {
            if let Handle::Write(s) = &mut *h.lock().await {
                if s.ino == ino {
                    s.dirty = true;
                }
            }
        }
    }

    /// Locks the write handles of `inos`, in handle order (so two callers never deadlock):
    /// while the guards live, no `close` or `fsync` can store these files, so an upload
    /// cannot land under a name that an unlink or rename is removing (it would bring the
    /// name back). A close waiting meanwhile then sees the new state.
    async fn hold_writers(&self, inos: &[u64]) -> Vec<tokio::sync::OwnedMutexGuard<Handle>> {
        let mut guards = Vec::new();
        for h in self.writers_of(inos) {
            guards.push(h.lock_owned().await);
        }
        guards
    }

    fn new_staging(&self, ino: u64) -> FsResult<Staging> {
        std::fs::create_dir_all(&self.cfg.cache_dir)
            .map_err(local("create the cache directory"))?;
        let tmp = tempfile::Builder::new()
            .prefix(".infra-mount-")
            .tempfile_in(&self.cfg.cache_dir)
            .map_err(local("create a staging file"))?;
        let (file, path) = tmp.into_parts();
        Ok(Staging {
            ino,
            file,
            path,
            size: 0,
            dirty: false,
            failed: false,
            charged: 0,
            may_stream: false,
            contiguous: 0,
            early: None,
            meta_stale: false,
        })
    }

    fn resize_staging(&self, s: &mut Staging, size: u64) -> FsResult<()> {
        self.charge(s, size)?;
        s.file
            .set_len(size)
            .map_err(local("truncate a staging file"))?;
        s.size = size;
        Ok(())
    }

    /// Counts the staging file's growth against `cache_size=`.
    fn charge(&self, s: &mut Staging, size: u64) -> FsResult<()> {
        if size > s.charged {
            let delta = size - s.charged;
            let before = self.staged.fetch_add(delta, Ordering::SeqCst);
            if before + delta > self.cfg.cache_limit {
                self.staged.fetch_sub(delta, Ordering::SeqCst);
                return Err(FsError::CacheFull);
            }
            s.charged = size;
        }
        Ok(())
    }

    fn uncharge(&self, s: &Staging) {
        self.staged.fetch_sub(s.charged, Ordering::SeqCst);
    }

    /// Copies the object into a staging file (open for writing without O_TRUNC).
    async fn fill_staging(&self, s: &mut Staging) -> FsResult<()> {
        let path = self.path(s.ino)?;
        let resp = self
            .t("GetObject", self.store.get(&path, &GetOptions::default()))
            .await?;
        self.charge(s, resp.info.size)?;
        let mut body = resp.body;
        let mut off = 0u64;
        while let Some(c) = self.next_chunk(&mut body).await? {
            s.file
                .write_all_at(&c, off)
                .map_err(local("write a staging file"))?;
            off += c.len() as u64;
        }
        s.size = off;
        Ok(())
    }

    /// Uploads a staging file as the node's object with the node's attributes: one PUT up to
    /// the part size, multipart above it.
    async fn upload(&self, s: &mut Staging) -> FsResult<()> {
        let (key, attr, unlinked) = {
            let st = lock(&self.state);
            let n = st.nodes.get(&s.ino).ok_or(FsError::BadHandle)?;
            (st.path(s.ino), n.attr, n.unlinked)
        };
        if unlinked {
            self.abandon(s);
            s.dirty = false;
            return Ok(());
        }
        let key = key.ok_or(FsError::BadHandle)?;
        let attr = Attr {
            size: s.size,
            ..attr
        };
        let meta = self.metadata(&attr);
        let path = s.path.to_path_buf();
        let early = match s.early.take() {
            Some(e) => self.finish_early(e, s, &key, &meta).await?,
            None => None,
        };
        // The object holds the data but not the latest metadata (see `finish_early`).
        let stale = matches!(early, Some((_, false)));
        let etag = if let Some((etag, _)) = early {
            etag
        } else if s.size <= self.cfg.part_size {
            let body = Body::File {
                path,
                offset: 0,
                len: s.size,
            };
            self.t("PutObject", self.store.put(&key, body, &meta))
                .await?
                .etag
        } else {
            self.multipart(&key, &path, s.size, &meta).await?
        };
        {
            let mut st = lock(&self.state);
            let n = st.nodes.get_mut(&s.ino).ok_or(FsError::BadHandle)?;
            n.attr = attr;
            n.etag = etag;
            n.fetched = (!stale).then(Instant::now);
        }
        s.dirty = false;
        s.meta_stale = stale;
        if stale {
            self.store_meta(s).await;
        }
        let (parent, name, etag) = {
            let st = lock(&self.state);
            let n = st.nodes.get(&s.ino).ok_or(FsError::BadHandle)?;
            (n.parent, n.name.clone(), n.etag.clone())
        };
        let info = self.listed(&key, attr.size, etag);
        self.dir_set(parent, &name, Some((Kind::File, Some(info))));
        Ok(())
    }

    /// Stores the node's metadata on its object, whose data is stored with older metadata
    /// (see `finish_early`): a copy onto itself, server-side. Never fails the caller, since
    /// the data is safe: a failure is logged and tried again at the next `close`/`fsync` and
    /// the last release. Over CopyObject's limit it cannot be done: the times stay those of
    /// the upload's start.
    async fn store_meta(&self, s: &mut Staging) {
        let (key, attr) = {
            let st = lock(&self.state);
            match st.nodes.get(&s.ino) {
                Some(n) if !n.unlinked => (st.path(s.ino), n.attr),
                Some(_) | None => {
                    s.meta_stale = false;
                    return;
                }
            }
        };
        let Some(key) = key else {
            s.meta_stale = false;
            return;
        };
        if attr.size > MAX_COPY {
            s.meta_stale = false;
            return;
        }
        let meta = self.metadata(&attr);
        match self
            .t("CopyObject", self.store.copy(&key, &key, Some(&meta)))
            .await
        {
            Ok(put) => {
                s.meta_stale = false;
                if let Some(n) = lock(&self.state).nodes.get_mut(&s.ino) {
                    n.etag = put.etag;
                    n.fetched = Some(Instant::now());
                }
            }
            Err(err) => tracing::warn!(
                %key,
                "the data is stored, but its mode, owner and times are those of when the \
                 upload began: replacing them failed ({err}); tried again at the next close, \
                 or chmod or touch the file"
            ),
        }
    }

    async fn multipart(
        &self,
        key: &str,
        path: &std::path::Path,
        size: u64,
        meta: &infra_store::Metadata,
    ) -> FsResult<Option<String>> {
        let part = infra_store::choose_part_size(size, Some(self.cfg.part_size))
            .unwrap_or_else(|_| infra_store::auto_part_size(size));
        let id = self
            .t(
                "CreateMultipartUpload",
                self.store.create_multipart(key, meta),
            )
            .await?;
        self.complete_parts(key, &id, path, size, part, Vec::new())
            .await
    }

    /// Uploads the parts of the file at `path` after those in `done` (parts of `part` bytes,
    /// up to `size`), then completes the upload `id`. On failure the upload is aborted, so
    /// nothing half-written stays: the object keeps its previous content.
    async fn complete_parts(
        &self,
        key: &str,
        id: &str,
        path: &std::path::Path,
        size: u64,
        part: u64,
        mut done: Vec<PartInfo>,
    ) -> FsResult<Option<String>> {
        let first = done.len() as u64;
        let rest = futures::stream::iter((first..size.div_ceil(part)).map(|i| {
            let offset = i * part;
            let body = Body::File {
                path: path.to_path_buf(),
                offset,
                len: part.min(size - offset),
            };
            async move {
                self.t(
                    "UploadPart",
                    self.store.upload_part(key, id, i as i32 + 1, body),
                )
                .await
            }
        }))
        .buffered(self.cfg.concurrency.max(1))
        .collect::<Vec<FsResult<PartInfo>>>()
        .await;
        let completed = match rest.into_iter().collect::<FsResult<Vec<PartInfo>>>() {
            Ok(more) => {
                done.extend(more);
                done.sort_by_key(|p| p.number);
                self.t(
                    "CompleteMultipartUpload",
                    self.store.complete_multipart(key, id, &done),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match completed {
            Ok(r) => Ok(r.etag),
            Err(e) => {
                if let Err(a) = self.store.abort_multipart(key, id).await {
                    tracing::warn!(%key, "aborting the failed multipart upload failed: {a}");
                }
                Err(e)
            }
        }
    }

    /// Hands full parts to uploads while a file that started empty is written (see
    /// [`Early`]); `offset` is where the write that just happened began. Never fails the
    /// write: when anything goes wrong, the whole file goes up at close as without it.
    async fn stream_parts(&self, s: &mut Staging, offset: u64) {
        if !s.may_stream || self.cfg.read_only {
            return;
        }
        // Removed while open: it never goes up, so neither do its parts.
        if lock(&self.state)
            .nodes
            .get(&s.ino)
            .is_none_or(|n| n.unlinked)
        {
            self.abandon(s);
            s.may_stream = false;
            return;
        }
        let part = self.cfg.part_size;
        if s.early
            .as_ref()
            .is_some_and(|e| offset < e.started * e.part)
        {
            // A part already on its way changed.
            self.abandon(s);
            s.may_stream = false;
            return;
        }
        loop {
            let started = s.early.as_ref().map_or(0, |e| e.started);
            if s.contiguous < (started + 1) * part {
                return;
            }
            if started + 1 > MAX_PARTS {
                self.abandon(s);
                s.may_stream = false;
                return;
            }
            if s.early.is_none() {
                let Ok(key) = self.path(s.ino) else {
                    s.may_stream = false;
                    return;
                };
                let attr = lock(&self.state).nodes.get(&s.ino).map(|n| n.attr);
                let Some(attr) = attr else {
                    s.may_stream = false;
                    return;
                };
                let meta = self.metadata(&attr);
                match self
                    .t(
                        "CreateMultipartUpload",
                        self.store.create_multipart(&key, &meta),
                    )
                    .await
                {
                    Ok(id) => {
                        s.early = Some(Early {
                            key,
                            meta,
                            id,
                            part,
                            started: 0,
                            running: Default::default(),
                            done: Vec::new(),
                        })
                    }
                    Err(e) => {
                        tracing::debug!("no early parts for this file ({e}); it goes up at close");
                        s.may_stream = false;
                        return;
                    }
                }
            }
            let Some(e) = s.early.as_mut() else { return };
            // At most `concurrency` parts in flight: the writer waits for the oldest.
            while e.running.len() >= self.cfg.concurrency.max(1) {
                let Some(h) = e.running.pop_front() else {
                    break;
                };
                match h.await {
                    Ok(Ok(p)) => e.done.push(p),
                    Ok(Err(err)) => {
                        tracing::debug!("an early part failed ({err}); the file goes up at close");
                        self.abandon(s);
                        s.may_stream = false;
                        return;
                    }
                    Err(_) => {
                        self.abandon(s);
                        s.may_stream = false;
                        return;
                    }
                }
            }
            let number = e.started + 1;
            let body = Body::File {
                path: s.path.to_path_buf(),
                offset: e.started * part,
                len: part,
            };
            let (store, key, id, timeout) = (
                self.store.clone(),
                e.key.clone(),
                e.id.clone(),
                self.cfg.timeout,
            );
            e.running.push_back(tokio::spawn(async move {
                timed(
                    timeout,
                    "UploadPart",
                    store.upload_part(&key, &id, number as i32, body),
                )
                .await
            }));
            e.started = number;
        }
    }

    /// Drops the early upload of `s`, if any: its running parts stop and, once they have,
    /// the upload is aborted in the background (the object keeps its previous content).
    /// Waiting for them first narrows, but cannot close, the window in which a server that
    /// already received a part's body stores it after the abort; a bucket lifecycle rule
    /// for incomplete uploads removes such leftovers.
    fn abandon(&self, s: &mut Staging) {
        let Some(e) = s.early.take() else { return };
        for h in &e.running {
            h.abort();
        }
        let (store, timeout) = (self.store.clone(), self.cfg.timeout);
        tokio::spawn(async move {
            for h in e.running {
                let _ = h.await;
            }
            let mut tries = 0;
            loop {
                tries += 1;
                match timed(
                    timeout,
                    "AbortMultipartUpload",
                    store.abort_multipart(&e.key, &e.id),
                )
                .await
                {
                    Ok(()) => return,
                    Err(err) if tries >= 3 => {
                        tracing::warn!(
                            key = %e.key,
                            upload = %e.id,
                            "aborting an abandoned multipart upload failed; its parts stay \
                             stored until a lifecycle rule removes them: {err}"
                        );
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_secs(tries)).await,
                }
            }
        });
    }

    /// Completes the early upload with the rest of the file. `Ok(None)` when it cannot be
    /// used (the file was renamed, truncated below it, or a part failed): then it is
    /// aborted and the caller uploads the whole file. Returns the ETag and whether the stored
    /// metadata is `meta`: it differs when something changed since the upload began (the
    /// mtime of the last write, a chmod), and then [`Fs::store_meta`] replaces it.
    async fn finish_early(
        &self,
        mut e: Early,
        s: &mut Staging,
        key: &str,
        meta: &infra_store::Metadata,
    ) -> FsResult<Option<(Option<String>, bool)>> {
        let sent = e.started * e.part;
        let parts_needed = e.started + (s.size - sent.min(s.size)).div_ceil(e.part);
        // Over CopyObject's limit the metadata cannot be replaced afterwards: the upload is
        // kept when only the times differ (they stay those of the first part), not when the
        // mode or owner changed.
        let without = |m: &infra_store::Metadata, keys: &[&str]| {
            let mut m = m.clone();
            m.retain(|k, _| !keys.contains(&k.as_str()));
            m
        };
        let times = [crate::meta::MTIME, crate::meta::ATIME, crate::meta::CTIME];
        let same_but_times = || without(meta, &times) == without(&e.meta, &times);
        // The ctime is the time of the request: not a reason to copy.
        let same = without(meta, &[crate::meta::CTIME]) == without(&e.meta, &[crate::meta::CTIME]);
        let usable = e.key == key
            && s.size >= sent
            && parts_needed <= MAX_PARTS
            && (s.size <= MAX_COPY || same_but_times());
        if !usable {
            s.early = Some(e);
            self.abandon(s);
            return Ok(None);
        }
        while let Some(h) = e.running.pop_front() {
            match h.await {
                Ok(Ok(p)) => e.done.push(p),
                Ok(Err(_)) | Err(_) => {
                    s.early = Some(e);
                    self.abandon(s);
                    return Ok(None);
                }
            }
        }
        let etag = self
            .complete_parts(
                key,
                &e.id,
                &s.path,
                s.size,
                e.part,
                std::mem::take(&mut e.done),
            )
            .await?;
        Ok(Some((etag, same)))
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let ino = match &h {
            Handle::Write(s) => Some(s.ino),
            Handle::Read(_) => None,
        };
        lock(&self.handles).insert(fh, (ino, Arc::new(tokio::sync::Mutex::new(h))));
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<SharedHandle> {
        lock(&self.handles)
            .get(&fh)
            .map(|(_, h)| h.clone())
            .ok_or(FsError::BadHandle)
    }

    /// Opens a file. Returns the handle and whether the kernel may keep its page cache (the
    /// object did not change since the last open).
    pub async fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<(u64, bool)> {
        let attr = self.getattr(ino).await?;
        match attr.kind {
            Kind::Dir => return Err(FsError::IsDir),
            Kind::Symlink => return Err(FsError::Invalid),
            Kind::File => {}
        }
        if write {
            self.check_writable()?;
            let mut s = self.new_staging(ino)?;
            if truncate {
                s.dirty = true;
                s.may_stream = true;
                let mut a = attr;
                a.size = 0;
                a.mtime = SystemTime::now();
                self.set_local_attr(ino, a);
            } else if attr.size > 0 {
                if let Err(e) = self.fill_staging(&mut s).await {
                    self.uncharge(&s);
                    return Err(e);
                }
            }
            if let Some(n) = lock(&self.state).nodes.get_mut(&ino) {
                n.writers += 1;
            }
            return Ok((self.add_handle(Handle::Write(s)), false));
        }
        let (etag, keep) = {
            let mut st = lock(&self.state);
            let n = st.nodes.get_mut(&ino).ok_or(FsError::BadHandle)?;
            let keep = n.etag.is_some() && n.read_etag == n.etag;
            n.read_etag = n.etag.clone();
            (n.etag.clone(), keep)
        };
        let r = Reader {
            ino,
            etag,
            size: attr.size,
            streams: Default::default(),
            sequential: false,
            buf: Default::default(),
            buf_start: 0,
            buf_len: 0,
        };
        Ok((self.add_handle(Handle::Read(r)), keep))
    }

    /// Creates and opens a new file (uploaded at close or fsync).
    pub async fn create(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(u64, Attr, u64)> {
        self.check_writable()?;
        // Checks the name and that the parent is a directory.
        self.child_path(parent, name)?;
        let attr = self.now_attr(Kind::File, mode, uid, gid);
        let ino = {
            let mut st = lock(&self.state);
            let ino = st.next_ino;
            st.next_ino += 1;
            ino
        };
        // Staged first: when that fails (cache directory full or unwritable), nothing of the
        // new name shows.
        let mut s = self.new_staging(ino)?;
        {
            let mut st = lock(&self.state);
            let key = (parent, name.to_string());
            if let Some(old) = st.names.remove(&key) {
                if let Some(n) = st.nodes.get_mut(&old) {
                    n.unlinked = true;
                }
            }
            st.nodes.insert(
                ino,
                Node {
                    parent,
                    name: name.to_string(),
                    attr,
                    fetched: Some(Instant::now()),
                    lookups: 1,
                    etag: None,
                    writers: 1,
                    unlinked: false,
                    read_etag: None,
                },
            );
            st.names.insert(key, ino);
        }
        self.dir_set(parent, name, Some((Kind::File, None)));
        s.dirty = true;
        s.may_stream = true;
        let fh = self.add_handle(Handle::Write(s));
        Ok((ino, attr, fh))
    }

    /// Reads from an open file.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.handle(fh)?;
        let mut h = h.lock().await;
        match &mut *h {
            Handle::Write(s) => {
                let end = (offset + size as u64).min(s.size);
                if offset >= end {
                    return Ok(Vec::new());
                }
                let mut buf = vec![0u8; (end - offset) as usize];
                s.file
                    .read_exact_at(&mut buf, offset)
                    .map_err(local("read a staging file"))?;
                Ok(buf)
            }
            Handle::Read(r) => self.read_object(r, offset, size as u64).await,
        }
    }

    /// A read starts a ranged GET at its offset (`FIRST_WINDOW` long, a task reads its body
    /// ahead into a channel bounded in bytes). Once the reader goes on past the end of one
    /// range into the next, it is sequential: `READ_DEPTH` consecutive `CHUNK` ranges stay in
    /// flight, so several GETs fetch at once. A seek (a read outside what was received, or
    /// too far ahead of it) drops them and starts again.
    async fn read_object(&self, r: &mut Reader, offset: u64, size: u64) -> FsResult<Vec<u8>> {
        if offset >= r.size {
            return Ok(Vec::new());
        }
        let want_end = (offset + size).min(r.size);
        let received = r.buf_start + r.buf_len;
        if offset < r.buf_start || offset > received + SKIP_AHEAD {
            r.streams.clear();
            r.sequential = false;
            r.buf.clear();
            r.buf_start = offset;
            r.buf_len = 0;
        }
        while r.buf_start + r.buf_len < want_end {
            let next = r.buf_start + r.buf_len;
            while r.streams.front().is_some_and(|s| s.end <= next) {
                r.streams.pop_front();
                r.sequential = true;
            }
            if r.streams.is_empty() {
                let len = if next == 0 || r.sequential {
                    CHUNK
                } else {
                    FIRST_WINDOW
                };
                r.streams.push_back(self.start_stream(r, next, len)?);
            }
            if r.sequential || next == 0 {
                while r.streams.len() < READ_DEPTH {
                    let end = r.streams.back().map_or(next, |s| s.end);
                    if end >= r.size {
                        break;
                    }
                    let s = self.start_stream(r, end, CHUNK)?;
                    r.streams.push_back(s);
                }
            }
            let s = r.streams.front_mut().ok_or(FsError::BadHandle)?;
            match tokio::time::timeout(self.cfg.timeout, s.rx.recv()).await {
                Ok(Some(Ok(b))) => {
                    s.budget.add_permits(b.len().min(PREFETCH_BYTES));
                    r.buf_len += b.len() as u64;
                    r.buf.push_back(b);
                }
                Ok(Some(Err(e))) => {
                    r.streams.clear();
                    return Err(e);
                }
                Ok(None) => {
                    r.streams.clear();
                    return Err(FsError::Store(StoreError::Corrupt {
                        target: self.store.url_of(&self.path(r.ino)?),
                        reason: "the body ended before the requested range".into(),
                    }));
                }
                Err(_) => {
                    r.streams.clear();
                    return Err(FsError::TimedOut { op: "GetObject" });
                }
            }
        }
        // Drop what lies well behind the reader.
        while let Some(front) = r.buf.front() {
            let flen = front.len() as u64;
            if r.buf_start + flen <= offset && r.buf_len - flen >= KEEP_BEHIND {
                r.buf_start += flen;
                r.buf_len -= flen;
                r.buf.pop_front();
            } else {
                break;
            }
        }
        let mut out = Vec::with_capacity((want_end - offset) as usize);
        let mut pos = r.buf_start;
        for c in &r.buf {
            let cend = pos + c.len() as u64;
            if cend > offset && pos < want_end {
                let from = offset.saturating_sub(pos) as usize;
                let to = (want_end.min(cend) - pos) as usize;
                out.extend_from_slice(&c[from..to]);
            }
            if cend >= want_end {
                break;
            }
            pos = cend;
        }
        Ok(out)
    }

    /// Requests `offset..offset + len` (cut at the end of the object) in a task that sends the
    /// body, or the request's error, through the stream's channel.
    fn start_stream(&self, r: &Reader, offset: u64, len: u64) -> FsResult<Stream> {
        let end = (offset + len).min(r.size);
        let key = self.path(r.ino)?;
        let opts = GetOptions {
            range: Some(offset..end),
            if_match: r.etag.clone(),
            ..Default::default()
        };
        // The channel is bounded in bytes, not chunks (their size is the server's choice):
        // the task takes a chunk's length from the budget before handing it over.
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(tokio::sync::Semaphore::new(PREFETCH_BYTES));
        let (b, store, timeout) = (budget.clone(), self.store.clone(), self.cfg.timeout);
        let task = tokio::spawn(async move {
            let mut body = match timed(timeout, "GetObject", store.get(&key, &opts)).await {
                Ok(resp) => resp.body,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while let Some(c) = body.next().await {
                let c = c.map_err(FsError::from);
                let stop = c.is_err();
                if let Ok(bytes) = &c {
                    match b.acquire_many(bytes.len().min(PREFETCH_BYTES) as u32).await {
                        Ok(p) => p.forget(),
                        Err(_) => break,
                    }
                }
                if tx.send(c).is_err() || stop {
                    break;
                }
            }
        });
        Ok(Stream {
            rx,
            budget,
            task,
            end,
        })
    }

    /// Writes into an open file's staging file.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.handle(fh)?;
        let mut h = h.lock().await;
        let Handle::Write(s) = &mut *h else {
            return Err(FsError::BadHandle);
        };
        let end = offset + data.len() as u64;
        self.charge(s, end)?;
        s.file
            .write_all_at(data, offset)
            .map_err(local("write a staging file"))?;
        s.size = s.size.max(end);
        if offset <= s.contiguous {
            s.contiguous = s.contiguous.max(end);
        }
        s.dirty = true;
        // Written again: what the last release uploads is this, whatever an earlier
        // `fsync` said.
        s.failed = false;
        let size = s.size;
        if let Some(n) = lock(&self.state).nodes.get_mut(&s.ino) {
            n.attr.size = size;
            n.attr.mtime = SystemTime::now();
        }
        self.stream_parts(s, offset).await;
        Ok(data.len() as u32)
    }

    /// `close` (and `fsync`): uploads what was written; the error goes back to the caller.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        let mut h = h.lock().await;
        match &mut *h {
            Handle::Write(s) if s.dirty => {
                let r = self.upload(s).await;
                s.failed = r.is_err();
                r
            }
            Handle::Write(s) if s.meta_stale => {
                self.store_meta(s).await;
                Ok(())
            }
            Handle::Write(_) | Handle::Read(_) => Ok(()),
        }
    }

    /// Last close of a handle: uploads anything still unwritten, frees the staging file.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some((_, h)) = lock(&self.handles).remove(&fh) else {
            return Err(FsError::BadHandle);
        };
        let mut h = h.lock().await;
        let r = match &mut *h {
            Handle::Write(s) => {
                // Not again after a failed `close`/`fsync`: the program was told the data is
                // not stored, and the kernel sends this release after `close` returned, maybe
                // once the server is back.
                let r = if s.dirty && !s.failed {
                    self.upload(s).await
                } else {
                    Ok(())
                };
                if r.is_ok() && !s.dirty && s.meta_stale {
                    self.store_meta(s).await;
                }
                self.abandon(s);
                self.uncharge(s);
                let mut st = lock(&self.state);
                if let Some(n) = st.nodes.get_mut(&s.ino) {
                    n.writers = n.writers.saturating_sub(1);
                    // What the bucket has is not what was written here: ask it again (the
                    // file may not exist there at all).
                    if r.is_err() || s.dirty {
                        n.fetched = None;
                        let parent = n.parent;
                        st.dirs.remove(&parent);
                    }
                }
                drop(st);
                r
            }
            Handle::Read(_) => Ok(()),
        };
        if let Err(e) = &r {
            tracing::error!("data written to a file was not stored: {e}");
        }
        r
    }

    /// Bytes staged now (for tests and statistics).
    pub fn staged_bytes(&self) -> u64 {
        self.staged.load(Ordering::SeqCst)
    }
}
