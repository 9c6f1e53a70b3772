//! Applies OCI/Docker layer tarballs onto a directory, in order, like a container runtime.
//!
//! - OCI whiteouts: `.wh.NAME` deletes `NAME` from lower layers, `.wh..wh..opq` empties a
//!   directory of lower-layer content.
//! - Metadata is kept: uid/gid, modes including setuid/setgid/sticky, symlinks, hardlinks, device
//!   nodes and fifos, xattrs (`SCHILY.xattr.*`), mtimes.
//! - Path safety: absolute names and `..` components are refused; parent directories are resolved
//!   inside the root the way a chroot would see them, and a symlink that would lead outside the
//!   root is refused. Final components are never followed: an existing symlink is replaced, not
//!   written through.
//! - Integrity: the uncompressed stream is hashed and compared with the config's `diff_id`.
//! - Limits ([`UnpackLimits`]): uncompressed bytes per layer, logical bytes per image, entries per
//!   image and the size of one file, so a compression or sparse-file bomb stops with
//!   [`Error::LimitExceeded`] instead of filling the disk. Runs of zeros (including the holes of
//!   sparse entries) are written as holes.
//! - Extended attributes: only `user.*`, `security.capability` and `system.posix_acl_*` are
//!   applied; others (`trusted.*`, `security.selinux`, …) are dropped with a warning.
//! - Opaque directories (`.wh..wh..opq`) are applied when the layer ends, so the marker hides
//!   only lower layers' content wherever it appears in the tar.
//! - Directory mtimes are restored at the end by walking from the root with `O_NOFOLLOW` at every
//!   step: a directory a later layer replaced (or a parent turned into a symlink) is skipped,
//!   never reached through a link.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::error::{Error, IoContext, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const MAX_SYMLINK_HOPS: usize = 40;

/// Bounds on what layers may expand to. Defaults fit the largest public language images (tens of
/// GB for CUDA stacks) with room, and stop bombs long before a disk fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Uncompressed tar bytes of one layer.
    pub max_layer_bytes: u64,
    /// Logical bytes of all regular files written, holes of sparse files included.
    pub max_image_bytes: u64,
    /// Tar entries over all layers.
    pub max_entries: u64,
    /// Logical size of one file.
    pub max_file_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_layer_bytes: 32 << 30,
            max_image_bytes: 64 << 30,
            max_entries: 2_000_000,
            max_file_bytes: 16 << 30,
        }
    }
}

/// Extended attributes an image may carry into the rootfs.
pub fn xattr_allowed(name: &str) -> bool {
    name.starts_with("user.")
        || name == "security.capability"
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
}

/// Counts of what a layer did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created or replaced.
    pub entries: u64,
    /// Whiteouts applied (files and opaque directories).
    pub whiteouts: u64,
    /// Uncompressed bytes read.
    pub tar_bytes: u64,
    /// `sha256:` digest of the uncompressed tar (the layer's diff_id).
    pub diff_id: String,
}

/// Applies layers onto one root directory.
pub struct Unpacker {
    root: PathBuf,
    dir_mtimes: HashMap<PathBuf, i64>,
    default_mtime: i64,
    limits: UnpackLimits,
    image_bytes: u64,
    entries: u64,
}

impl Unpacker {
    /// Starts on an existing, empty (or partially built) root directory.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_default_mtime(root, 0)
    }

    /// Like [`Unpacker::new`]; directories no layer describes (the root, missing parents) get
    /// `mtime`, so the result does not depend on when it was built.
    pub fn with_default_mtime(root: impl Into<PathBuf>, mtime: i64) -> Self {
        let root = root.into();
        let mut dir_mtimes = HashMap::new();
        dir_mtimes.insert(root.clone(), mtime);
        Self {
            root,
            dir_mtimes,
            default_mtime: mtime,
            limits: UnpackLimits::default(),
            image_bytes: 0,
            entries: 0,
        }
    }

    /// Replaces the default [`UnpackLimits`].
    pub fn with_limits(mut self, limits: UnpackLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Records that a directory was changed, so [`Unpacker::finish`] restores a fixed mtime.
    pub fn note_dir(&mut self, dir: &Path) {
        self.dir_mtimes
            .entry(dir.to_path_buf())
            .or_insert(self.default_mtime);
    }

    /// Applies one layer read from `reader` (gzip, zstd or plain tar, detected from the bytes).
    ///
    /// `expected_diff_id`, when known, is checked against the uncompressed stream.
    pub fn apply_layer(
        &mut self,
        reader: impl Read,
        layer: &str,
        expected_diff_id: Option<&str>,
    ) -> Result<LayerStats> {
        let corrupt = |source: io::Error| Error::CorruptLayer {
            layer: layer.to_string(),
            source,
        };
        let mut buffered = io::BufReader::with_capacity(1 << 20, reader);
        let magic = peek(&mut buffered).map_err(corrupt)?;
        let decoder: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(buffered))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(corrupt)?)
        } else {
            Box::new(buffered)
        };
        let mut hashing = HashingReader {
            inner: decoder,
            hasher: Sha256::new(),
            bytes: 0,
            limit: self.limits.max_layer_bytes,
        };
        let mut stats = LayerStats::default();
        let mut layer_state = LayerState::default();
        let applied = (|| -> Result<()> {
            let mut archive = tar::Archive::new(&mut hashing);
            for entry in archive.entries().map_err(corrupt)? {
                let mut entry = entry.map_err(corrupt)?;
                self.apply_entry(&mut entry, layer, &mut layer_state, &mut stats)
                    .map_err(|e| match e {
                        // A read error inside an entry's data is corruption, not a local I/O fault.
                        Error::Io {
                            source,
                            action: "read layer data of",
                            ..
                        } => corrupt(source),
                        other => other,
                    })?;
            }
            // Hash the end-of-archive padding too, so the digest covers the whole stream.
            io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(corrupt)?;
            Ok(())
        })();
        if hashing.bytes > hashing.limit {
            return Err(Error::LimitExceeded {
                layer: layer.to_string(),
                what: "uncompressed size",
                limit: format!("{} bytes", self.limits.max_layer_bytes),
                flag: "--max-layer-size",
            });
        }
        applied?;
        self.apply_opaque(&layer_state)?;
        stats.tar_bytes = hashing.bytes;
        stats.diff_id = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if let Some(expected) = expected_diff_id {
            if expected != stats.diff_id {
                return Err(Error::DigestMismatch {
                    what: format!("layer {layer} (uncompressed)"),
                    expected: expected.to_string(),
                    actual: stats.diff_id,
                });
            }
        }
        Ok(stats)
    }

    /// Restores directory mtimes (changed while children were written). Call after the last layer.
    pub fn finish(self) -> Result<()> {
        self.restore_dir_mtimes()
    }

    /// Restores recorded directory mtimes without consuming the unpacker (injection uses it;
    /// directories it touched all get the default mtime).
    pub fn finish_with_default(&mut self) -> Result<()> {
        for v in self.dir_mtimes.values_mut() {
            *v = self.default_mtime;
        }
        self.restore_dir_mtimes()
    }

    fn restore_dir_mtimes(&self) -> Result<()> {
        let mut dirs: Vec<_> = self
            .dir_mtimes
            .iter()
            .map(|(p, t)| (p.clone(), *t))
            .collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (dir, mtime) in dirs {
            let Ok(rel) = dir.strip_prefix(&self.root) else {
                continue;
            };
            if let Some(fd) = open_dir_nofollow(&self.root, rel)? {
                let t = TimeSpec::new(mtime, 0);
                nix::sys::stat::futimens(&fd, &t, &t)
                    .map_err(|e| Error::io("set times of", &dir, e.into()))?;
            }
        }
        Ok(())
    }

    /// Empties the layer's opaque directories of everything this layer did not write (lower
    /// layers' content), keeping the layer's own entries and the directories leading to them.
    fn apply_opaque(&self, state: &LayerState) -> Result<()> {
        for dir in &state.opaque {
            // The directory may have been replaced by a non-directory later in the layer.
            let Ok(rel) = dir.strip_prefix(&self.root) else {
                continue;
            };
            if open_dir_nofollow(&self.root, rel)?.is_none() {
                continue;
            }
            self.prune_lower(dir, state)?;
        }
        Ok(())
    }

    fn prune_lower(&self, dir: &Path, state: &LayerState) -> Result<()> {
        for child in fs::read_dir(dir).ctx("read directory", dir)? {
            let child = child.ctx("read directory", dir)?;
            let path = child.path();
            let is_dir = child.file_type().ctx("stat", &path)?.is_dir();
            if state.touched.contains(&path) {
                // Written by this layer; a directory it wrote may still hold lower content.
                if is_dir {
                    self.prune_lower(&path, state)?;
                }
            } else if is_dir && state.ancestors.contains(&path) {
                self.prune_lower(&path, state)?;
            } else {
                remove_any(&path)?;
            }
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        layer: &str,
        state: &mut LayerState,
        stats: &mut LayerStats,
    ) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let hostile = |reason: String| Error::HostileEntry {
            layer: layer.to_string(),
            entry: shown.clone(),
            reason,
        };
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(Error::LimitExceeded {
                layer: layer.to_string(),
                what: "number of entries",
                limit: format!("{} entries", self.limits.max_entries),
                flag: "--max-entries",
            });
        }
        let rel = sanitize(Path::new(OsStr::from_bytes(&raw))).map_err(&hostile)?;
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            // The root itself ("./"): take its metadata.
            if kind == EntryType::Directory {
                self.apply_metadata(entry, &self.root.clone(), false)?;
            }
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = self
            .resolve_dir(parent_rel, true)
            .map_err(|r| hostile(r.to_string()))?;
        self.note_dir(&parent);
        let name_str = name.to_string_lossy();

        if name_str == OPAQUE_MARKER {
            state.opaque.push(parent.clone());
            stats.whiteouts += 1;
            return Ok(());
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(hostile("whiteout names no file".into()));
            }
            remove_any(&parent.join(hidden))?;
            stats.whiteouts += 1;
            return Ok(());
        }

        let dest = parent.join(&name);
        let existing = fs::symlink_metadata(&dest).ok();
        stats.entries += 1;
        match kind {
            EntryType::Directory => {
                match existing {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        remove_any(&dest)?;
                        fs::create_dir(&dest).ctx("create directory", &dest)?;
                    }
                    None => fs::create_dir(&dest).ctx("create directory", &dest)?,
                }
                self.apply_metadata(entry, &dest, false)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                let over =
                    |what: &'static str, limit: u64, flag: &'static str| Error::LimitExceeded {
                        layer: layer.to_string(),
                        what,
                        limit: format!("{limit} bytes"),
                        flag,
                    };
                if size > self.limits.max_file_bytes {
                    return Err(over(
                        "size of one file",
                        self.limits.max_file_bytes,
                        "--max-file-size",
                    ));
                }
                self.image_bytes = self.image_bytes.saturating_add(size);
                if self.image_bytes > self.limits.max_image_bytes {
                    return Err(over(
                        "total size of the image's files",
                        self.limits.max_image_bytes,
                        "--max-image-size",
                    ));
                }
                if existing.is_some() {
                    remove_any(&dest)?;
                }
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .ctx("create file", &dest)?;
                let written = copy_entry_data(entry, &mut file, &dest)?;
                if written != size {
                    return Err(Error::CorruptLayer {
                        layer: layer.to_string(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{shown}: {written} of {size} bytes"),
                        ),
                    });
                }
                self.apply_metadata(entry, &dest, false)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile("symlink without a target".into()))?
                    .into_owned();
                if existing.is_some() {
                    remove_any(&dest)?;
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest)
                    .ctx("create symlink", &dest)?;
                self.apply_metadata(entry, &dest, true)?;
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile("hardlink without a target".into()))?
                    .into_owned();
                let target_rel = sanitize(Path::new(OsStr::from_bytes(&target_raw)))
                    .map_err(|r| hostile(format!("hardlink target: {r}")))?;
                let target_parent = self
                    .resolve_dir(target_rel.parent().unwrap_or(Path::new("")), false)
                    .map_err(|r| hostile(format!("hardlink target: {r}")))?;
                let target = match target_rel.file_name() {
                    Some(n) => target_parent.join(n),
                    None => return Err(hostile("hardlink to the root directory".into())),
                };
                match fs::symlink_metadata(&target) {
                    Ok(m) if !m.is_dir() => {}
                    Ok(_) => return Err(hostile("hardlink to a directory".into())),
                    Err(_) => return Err(hostile("hardlink target does not exist".into())),
                }
                if target == dest {
                    return Ok(());
                }
                if existing.is_some() {
                    remove_any(&dest)?;
                }
                fs::hard_link(&target, &dest).ctx("create hardlink", &dest)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if existing.is_some() {
                    remove_any(&dest)?;
                }
                let h = entry.header();
                let sflag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let mode = Mode::from_bits_truncate(h.mode().unwrap_or(0o644) & 0o7777);
                nix::sys::stat::mknod(
                    &dest,
                    sflag,
                    mode,
                    nix::sys::stat::makedev(major.into(), minor.into()),
                )
                .map_err(|e| Error::io("create device node", &dest, e.into()))?;
                self.apply_metadata(entry, &dest, false)?;
            }
            other => {
                tracing::warn!(entry = %shown, kind = ?other, "skipping unsupported tar entry type");
                stats.entries -= 1;
                return Ok(());
            }
        }
        state.touch(&self.root, dest);
        Ok(())
    }

    fn apply_metadata<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        dest: &Path,
        is_symlink: bool,
    ) -> Result<()> {
        let h = entry.header();
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let mtime = h.mtime().unwrap_or(0) as i64;
        let is_dir = h.entry_type() == EntryType::Directory;
        // Owner first: chown clears setuid/setgid, so the mode comes after it.
        std::os::unix::fs::lchown(dest, Some(uid), Some(gid)).ctx("set owner of", dest)?;
        if !is_symlink {
            fs::set_permissions(dest, fs::Permissions::from_mode(mode)).ctx("set mode of", dest)?;
        }
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let Ok(key) = ext.key() else { continue };
                if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                    if !xattr_allowed(attr) {
                        tracing::warn!(path = %dest.display(), attr, "dropping extended attribute an image may not set");
                        continue;
                    }
                    // lsetxattr: never through a symlink.
                    if let Err(e) = xattr::set(dest, attr, ext.value_bytes()) {
                        tracing::warn!(path = %dest.display(), attr, error = %e, "cannot set xattr");
                    }
                }
            }
        }
        if is_dir {
            self.dir_mtimes.insert(dest.to_path_buf(), mtime);
        } else {
            set_times(dest, mtime)?;
        }
        Ok(())
    }

    /// Resolves a directory path inside the root like a chroot would: symlinks are followed with
    /// absolute targets taken relative to the root; climbing above the root is refused.
    /// Missing directories are created (0755, root) when `create` is set.
    pub fn resolve_dir(
        &mut self,
        rel: &Path,
        create: bool,
    ) -> std::result::Result<PathBuf, String> {
        let mut stack: Vec<std::ffi::OsString> = Vec::new();
        let mut pending: Vec<std::ffi::OsString> = rel
            .components()
            .rev()
            .map(|c| c.as_os_str().to_os_string())
            .collect();
        let mut hops = 0;
        while let Some(comp) = pending.pop() {
            if comp == "." || comp.is_empty() {
                continue;
            }
            if comp == ".." {
                if stack.pop().is_none() {
                    return Err(format!(
                        "path leads outside the image root via '{}'",
                        rel.display()
                    ));
                }
                continue;
            }
            let candidate = self
                .root
                .join(stack.iter().collect::<PathBuf>())
                .join(&comp);
            match fs::symlink_metadata(&candidate) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err("too many levels of symbolic links".into());
                    }
                    let target = fs::read_link(&candidate).map_err(|e| e.to_string())?;
                    if target.is_absolute() {
                        stack.clear();
                    }
                    for c in target.components().rev() {
                        match c {
                            Component::RootDir | Component::CurDir => {}
                            other => pending.push(other.as_os_str().to_os_string()),
                        }
                    }
                }
                Ok(m) if m.is_dir() => stack.push(comp),
                Ok(_) => {
                    return Err(format!(
                        "'{}' is not a directory",
                        candidate
                            .strip_prefix(&self.root)
                            .unwrap_or(&candidate)
                            .display()
                    ))
                }
                Err(_) if create => {
                    fs::create_dir(&candidate).map_err(|e| e.to_string())?;
                    self.note_dir(&candidate);
                    if let Some(parent) = candidate.parent() {
                        self.note_dir(parent);
                    }
                    stack.push(comp);
                }
                Err(_) => return Err(format!("'{}' does not exist", candidate.display())),
            }
        }
        Ok(self.root.join(stack.iter().collect::<PathBuf>()))
    }
}

/// Turns a tar path into a relative path of normal components, or says why it is refused.
fn sanitize(path: &Path) -> std::result::Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute path (entries must be relative to the image root)".into())
            }
            Component::ParentDir => return Err("'..' component escapes the image root".into()),
        }
    }
    Ok(out)
}

/// Copies an entry's data, leaving runs of zeros (4 KiB blocks) as holes; returns the logical
/// size written.
fn copy_entry_data<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    file: &mut fs::File,
    dest: &Path,
) -> Result<u64> {
    use std::io::Seek;
    const BLOCK: usize = 4096;
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = 0u64;
    loop {
        let n = match read_full(entry, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(Error::Io {
                    action: "read layer data of",
                    path: dest.into(),
                    source: e,
                })
            }
        };
        for chunk in buf[..n].chunks(BLOCK) {
            if chunk.iter().all(|&b| b == 0) {
                file.seek(io::SeekFrom::Current(chunk.len() as i64))
                    .ctx("seek in", dest)?;
            } else {
                file.write_all(chunk).ctx("write", dest)?;
            }
        }
        pos += n as u64;
    }
    // A trailing hole needs the length set explicitly.
    file.set_len(pos).ctx("set length of", dest)?;
    Ok(pos)
}

/// Fills `buf` as far as the reader allows (short only at the end).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Opens `rel` under `root` one component at a time with `O_NOFOLLOW | O_DIRECTORY`: `None`
/// when a component is missing, a symlink or not a directory.
fn open_dir_nofollow(root: &Path, rel: &Path) -> Result<Option<std::os::fd::OwnedFd>> {
    use nix::fcntl::{open, openat, OFlag};
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd = open(root, flags, Mode::empty()).map_err(|e| Error::io("open", root, e.into()))?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Ok(None);
        };
        match openat(&fd, name, flags, Mode::empty()) {
            Ok(next) => fd = next,
            Err(
                nix::errno::Errno::ENOENT | nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR,
            ) => return Ok(None),
            Err(e) => return Err(Error::io("open", root.join(rel), e.into())),
        }
    }
    Ok(Some(fd))
}

/// What one layer wrote, for its opaque directories.
#[derive(Default)]
struct LayerState {
    /// Paths this layer created or replaced.
    touched: HashSet<PathBuf>,
    /// Directories above those paths (kept, but pruned of lower content under an opaque dir).
    ancestors: HashSet<PathBuf>,
    /// Directories marked opaque, applied when the layer ends.
    opaque: Vec<PathBuf>,
}

impl LayerState {
    fn touch(&mut self, root: &Path, path: PathBuf) {
        let mut up = path.parent();
        while let Some(p) = up {
            if p == root || !p.starts_with(root) || !self.ancestors.insert(p.to_path_buf()) {
                break;
            }
            up = p.parent();
        }
        self.touched.insert(path);
    }
}

fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).ctx("remove", path),
        Ok(_) => fs::remove_file(path).ctx("remove", path),
        Err(_) => Ok(()),
    }
}

/// Sets atime and mtime (atime = mtime, for reproducible images) without following symlinks.
pub(crate) fn set_times(path: &Path, mtime: i64) -> Result<()> {
    let t = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| Error::io("set times of", path, e.into()))
}

fn peek(r: &mut io::BufReader<impl Read>) -> io::Result<Vec<u8>> {
    use io::BufRead;
    Ok(r.fill_buf()?.iter().take(4).copied().collect())
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    /// Past this many bytes the stream is refused (checked by the caller to name the limit).
    limit: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.bytes > self.limit {
            return Err(io::Error::other(
                "layer exceeds the uncompressed size limit",
            ));
        }
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Sizes of a staged tree, for choosing the ext4 size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeUsage {
    /// Inodes needed (hardlinks counted once).
    pub inodes: u64,
    /// Data blocks of 4 KiB needed for file contents, directories and long symlinks.
    pub blocks: u64,
}

/// Walks a tree and estimates what ext4 needs to hold it.
pub fn measure_tree(root: &Path) -> Result<TreeUsage> {
    let mut usage = TreeUsage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries = 0u64;
        let mut name_bytes = 0u64;
        for e in fs::read_dir(&dir).ctx("read directory", &dir)? {
            let e = e.ctx("read directory", &dir)?;
            let m = e.metadata().ctx("stat", e.path())?;
            entries += 1;
            name_bytes += e.file_name().len() as u64;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            usage.inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                // Data blocks plus one extent block for every 128 MiB of fragmentation risk.
                usage.blocks += m.len().div_ceil(4096) + m.len() / (128 << 20);
            } else if m.file_type().is_symlink() && m.len() > 59 {
                usage.blocks += 1;
            }
        }
        // ext4 directory entry: 8 bytes + name, 4-byte aligned.
        usage.blocks += (entries * 12 + name_bytes + 24).div_ceil(4096).max(1);
    }
    usage.inodes += 1;
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_refuses_escapes() {
        assert_eq!(sanitize(Path::new("./a/b")).unwrap(), PathBuf::from("a/b"));
        assert!(sanitize(Path::new("/etc/passwd")).is_err());
        assert!(sanitize(Path::new("a/../../x")).is_err());
    }
}
