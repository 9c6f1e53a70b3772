//! Workspace file access, confined beneath the workspace root.
//!
//! Paths are split into plain components (absolute paths, `..` and NUL are refused) and then
//! walked one directory at a time with `openat(O_NOFOLLOW)`, so a symlink anywhere on the way,
//! even one planted by the untrusted program while we walk, is refused rather than followed.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use infra_protocol::{check_relative_path, FileEntry, MAX_LIST_DEPTH};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid};

use crate::error::FileError;

/// Owner given to files and directories the agent creates for the untrusted user.
pub(crate) type Owner = Option<(u32, u32)>;

/// Splits a workspace-relative path into its components, refusing anything that could leave
/// the workspace: the one confinement check every file operation goes through. The result is
/// never empty.
pub(crate) fn components(path: &str) -> Result<Vec<&OsStr>, FileError> {
    split(path, false)
}

/// [`components`] for a directory that may be the workspace itself: `.` gives no components.
pub(crate) fn dir_components(path: &str) -> Result<Vec<&OsStr>, FileError> {
    split(path, true)
}

fn split(path: &str, root_ok: bool) -> Result<Vec<&OsStr>, FileError> {
    let refuse = |reason| FileError::Refused {
        path: path.to_string(),
        reason,
    };
    if path.contains('\0') {
        return Err(refuse("contains a NUL byte"));
    }
    let mut out = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("'..' is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("must be relative to the workspace"))
            }
        }
    }
    if out.is_empty() && !(root_ok && path == ".") {
        return Err(refuse("empty path"));
    }
    Ok(out)
}

fn map_errno(path: &str, e: Errno) -> FileError {
    match e {
        Errno::ELOOP => FileError::Refused {
            path: path.to_string(),
            reason: "goes through a symlink",
        },
        Errno::ENOTDIR => FileError::Refused {
            path: path.to_string(),
            reason: "a parent is not a directory",
        },
        Errno::ENOENT => FileError::NotFound {
            path: path.to_string(),
        },
        e => FileError::Io {
            path: path.to_string(),
            source: e.into(),
        },
    }
}

fn chown(fd: impl AsFd, owner: Owner) -> nix::Result<()> {
    match owner {
        Some((u, g)) => fchown(fd, Some(Uid::from_raw(u)), Some(Gid::from_raw(g))),
        None => Ok(()),
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Opens the directory `dirs` beneath `root`, creating missing ones (mode 0755, given to
/// `create`'s owner) when `create` is `Some`.
pub(crate) fn open_dir(
    root: &Path,
    path: &str,
    dirs: &[&OsStr],
    create: Option<Owner>,
) -> Result<OwnedFd, FileError> {
    open_dir_mode(root, path, dirs, create.map(|o| (o, 0o755)))
}

/// [`open_dir`] with the permission bits of the directories it creates (set exactly, whatever
/// the umask).
fn open_dir_mode(
    root: &Path,
    path: &str,
    dirs: &[&OsStr],
    create: Option<(Owner, u32)>,
) -> Result<OwnedFd, FileError> {
    let mut fd = open(root, DIR_FLAGS, Mode::empty()).map_err(|e| FileError::Io {
        path: path.to_string(),
        source: e.into(),
    })?;
    for d in dirs {
        if let Some((owner, mode)) = create {
            let mode = Mode::from_bits_truncate(mode & 0o7777);
            match mkdirat(&fd, *d, mode) {
                Ok(()) => {
                    let new = openat(&fd, *d, DIR_FLAGS, Mode::empty())
                        .map_err(|e| map_errno(path, e))?;
                    chown(&new, owner).map_err(|e| map_errno(path, e))?;
                    fchmod(&new, mode).map_err(|e| map_errno(path, e))?;
                    fd = new;
                    continue;
                }
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(map_errno(path, e)),
            }
        }
        fd = openat(&fd, *d, DIR_FLAGS, Mode::empty()).map_err(|e| map_errno(path, e))?;
    }
    Ok(fd)
}

/// Writes `data` to `name` inside the open directory `dir`, never through a symlink; with
/// `append`, adds it at the end instead of replacing the contents.
pub(crate) fn write_in(
    dir: &OwnedFd,
    name: &OsStr,
    data: &[u8],
    mode: u32,
    owner: Owner,
    path: &str,
    append: bool,
) -> Result<(), FileError> {
    let how = if append {
        OFlag::O_APPEND
    } else {
        OFlag::O_TRUNC
    };
    let flags = OFlag::O_WRONLY
        | OFlag::O_CREAT
        | how
        | OFlag::O_NOFOLLOW
        | OFlag::O_CLOEXEC
        | OFlag::O_NONBLOCK;
    let mode = Mode::from_bits_truncate(mode & 0o7777);
    let fd = openat(dir, name, flags, mode).map_err(|e| map_errno(path, e))?;
    let io = |source| FileError::Io {
        path: path.to_string(),
        source,
    };
    let mut file = File::from(fd);
    if !file.metadata().map_err(io)?.is_file() {
        return Err(FileError::Refused {
            path: path.to_string(),
            reason: "not a regular file",
        });
    }
    chown(&file, owner).map_err(|e| io(e.into()))?;
    fchmod(&file, mode).map_err(|e| io(e.into()))?;
    file.write_all(data).map_err(io)?;
    Ok(())
}

/// `PutFile`: writes (or with `append`, extends) a file beneath `root`, creating parent
/// directories.
pub(crate) fn put_file(
    root: &Path,
    path: &str,
    data: &[u8],
    mode: u32,
    owner: Owner,
    append: bool,
) -> Result<(), FileError> {
    let comps = components(path)?;
    let (name, dirs) = comps.split_last().expect("components is never empty");
    let dir = open_dir(root, path, dirs, Some(owner))?;
    write_in(&dir, name, data, mode, owner, path, append)
}

/// `MakeDir`: creates the directory `path` beneath `root` and its missing parents, with
/// permission bits `mode`, for `owner`. An existing directory is left as it is.
pub(crate) fn make_dir(root: &Path, path: &str, mode: u32, owner: Owner) -> Result<(), FileError> {
    let comps = components(path)?;
    open_dir_mode(root, path, &comps, Some((owner, mode))).map(drop)
}

/// What `GetFile` returns: the bytes of the range, the permission bits, the file's size.
pub(crate) struct FileRange {
    /// The bytes read.
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
    /// The whole file's size when it was opened.
    pub size: u64,
}

/// `GetFile`: reads a regular file beneath `root` from `offset`: `length` bytes (fewer at the
/// end of the file; never more than `max`), or with no `length` the rest of the file, refused
/// when that is over `max` bytes.
pub(crate) fn get_file(
    root: &Path,
    path: &str,
    offset: u64,
    length: Option<u64>,
    max: u64,
) -> Result<FileRange, FileError> {
    let comps = components(path)?;
    let (name, dirs) = comps.split_last().expect("components is never empty");
    let dir = open_dir(root, path, dirs, None)?;
    let fd = openat(
        &dir,
        *name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| map_errno(path, e))?;
    let io = |source| FileError::Io {
        path: path.to_string(),
        source,
    };
    let mut file = File::from(fd);
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(FileError::Refused {
            path: path.to_string(),
            reason: "not a regular file",
        });
    }
    let size = meta.len();
    let start = offset.min(size);
    let rest = size - start;
    let want = match length {
        Some(n) => n.min(max).min(rest),
        None if rest > max => {
            return Err(FileError::TooLarge {
                path: path.to_string(),
                size: rest,
                max,
            })
        }
        None => rest,
    };
    file.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut data = Vec::with_capacity(want as usize);
    (&mut file).take(want).read_to_end(&mut data).map_err(io)?;
    Ok(FileRange {
        data,
        mode: meta.permissions().mode() & 0o7777,
        size,
    })
}

/// Most directory entries one `ListFiles` looks at (files, directories and everything else);
/// past it the listing is cut and says `truncated`. Bounds the agent's work on a tree the
/// program made huge.
pub(crate) const MAX_LIST_SCAN: usize = 100_000;

/// Most bytes of entries one `ListFiles` reply carries, estimated on the worst JSON escaping
/// of the paths; past it the listing is cut and says `truncated`. Keeps the reply well under
/// a frame whatever `max_entries` asks for.
pub(crate) const MAX_LIST_BYTES: usize = 2 << 20;

/// What `ListFiles` found.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// Regular files, path order.
    pub entries: Vec<FileEntry>,
    /// More were there than listed.
    pub truncated: bool,
}

struct Walk {
    max_entries: usize,
    scanned: usize,
    bytes: usize,
    out: Listing,
}

impl Walk {
    /// Walks the open directory `dir` (whose path relative to the listed one is `prefix`).
    fn dir(&mut self, dir: OwnedFd, prefix: &str, depth: usize) -> Result<(), Errno> {
        let mut d = Dir::from_fd(dir)?;
        let mut names: Vec<CString> = Vec::new();
        for e in d.iter() {
            let e = e?;
            let name = e.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            self.scanned += 1;
            if self.scanned > MAX_LIST_SCAN {
                self.out.truncated = true;
                break;
            }
            names.push(name.to_owned());
        }
        names.sort();
        for name in names {
            // Set once a file did not fit, or the scan budget ran out: the walk ends.
            if self.out.truncated {
                return Ok(());
            }
            // Names the host would refuse (not UTF-8, control characters, too long) are
            // left out rather than failing the whole listing.
            let Ok(text) = name.to_str() else { continue };
            let rel = if prefix.is_empty() {
                text.to_string()
            } else {
                format!("{prefix}/{text}")
            };
            if check_relative_path(&rel).is_err() {
                continue;
            }
            // Never follows a symlink: lstat, then open with O_NOFOLLOW (a swap in between
            // gives ELOOP, and the entry is skipped).
            let Ok(st) = fstatat(&d, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFREG => {
                    // Worst JSON escaping of the path (only `"` and `\` are escaped: control
                    // characters were refused) plus the entry's other fields.
                    let cost = 2 * rel.len() + 64;
                    if self.out.entries.len() >= self.max_entries
                        || self.bytes + cost > MAX_LIST_BYTES
                    {
                        self.out.truncated = true;
                        return Ok(());
                    }
                    self.bytes += cost;
                    self.out.entries.push(FileEntry {
                        path: rel,
                        size: st.st_size as u64,
                        mode: st.st_mode & 0o7777,
                    });
                }
                SFlag::S_IFDIR if depth < MAX_LIST_DEPTH => {
                    match openat(&d, name.as_c_str(), DIR_FLAGS, Mode::empty()) {
                        Ok(sub) => self.dir(sub, &rel, depth + 1)?,
                        Err(_) => continue,
                    }
                }
                // Symlinks, devices, fifos, sockets; directories too deep.
                _ => {}
            }
        }
        Ok(())
    }
}

/// `ListFiles`: the regular files beneath the directory `path` (`.` for `root` itself), at
/// most `max_entries`, walked without following symlinks, at most [`MAX_LIST_DEPTH`] levels
/// down. Devices, fifos, sockets and symlinks are skipped, as are names that fail
/// [`check_relative_path`].
pub(crate) fn list_files(root: &Path, path: &str, max_entries: u64) -> Result<Listing, FileError> {
    let comps = dir_components(path)?;
    let dir = open_dir(root, path, &comps, None)?;
    let mut walk = Walk {
        max_entries: usize::try_from(max_entries).unwrap_or(usize::MAX),
        scanned: 0,
        bytes: 0,
        out: Listing::default(),
    };
    walk.dir(dir, "", 1).map_err(|e| map_errno(path, e))?;
    let mut out = walk.out;
    out.entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The path as bytes, for error messages and `CString`s.
pub(crate) fn bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(components("a/./b").unwrap(), ["a", "b"]);
        for bad in ["/etc/passwd", "../x", "a/../../b", "", ".", "a\0b"] {
            assert!(
                matches!(components(bad), Err(FileError::Refused { .. })),
                "{bad:?}"
            );
        }
        // Only a directory may be the workspace itself, and only spelled ".".
        assert!(dir_components(".").unwrap().is_empty());
        for bad in ["", "/", "..", "./..", "a\0b"] {
            assert!(
                matches!(dir_components(bad), Err(FileError::Refused { .. })),
                "{bad:?}"
            );
        }
    }

    fn get(root: &Path, path: &str, max: u64) -> Result<(Vec<u8>, u32), FileError> {
        get_file(root, path, 0, None, max).map(|r| (r.data, r.mode))
    }

    #[test]
    fn put_get_round_trip_and_symlink_refusal() {
        let root = tempfile::tempdir().unwrap();
        put_file(root.path(), "d/e/f.bin", &[0, 1, 255], 0o640, None, false).unwrap();
        let (data, mode) = get(root.path(), "d/e/f.bin", 100).unwrap();
        assert_eq!(data, [0, 1, 255]);
        assert_eq!(mode, 0o640);
        assert!(matches!(
            get(root.path(), "d/e/f.bin", 2),
            Err(FileError::TooLarge { .. })
        ));
        assert!(matches!(
            get(root.path(), "missing", 2),
            Err(FileError::NotFound { .. })
        ));
        std::os::unix::fs::symlink("/etc", root.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.path().join("flink")).unwrap();
        for p in ["link/hostname", "flink"] {
            assert!(
                matches!(get(root.path(), p, 1 << 20), Err(FileError::Refused { .. })),
                "{p}"
            );
        }
        assert!(matches!(
            put_file(root.path(), "link/x", b"x", 0o644, None, false),
            Err(FileError::Refused { .. })
        ));
        assert!(matches!(
            put_file(root.path(), "flink", b"x", 0o644, None, true),
            Err(FileError::Refused { .. })
        ));
        assert!(matches!(
            get(root.path(), "d", 10),
            Err(FileError::Refused { .. })
        ));
        assert!(matches!(
            make_dir(root.path(), "link/sub", 0o755, None),
            Err(FileError::Refused { .. })
        ));
    }

    #[test]
    fn append_and_ranges() {
        let root = tempfile::tempdir().unwrap();
        put_file(root.path(), "f", b"abc", 0o644, None, false).unwrap();
        put_file(root.path(), "f", b"def", 0o644, None, true).unwrap();
        let r = get_file(root.path(), "f", 2, Some(3), 100).unwrap();
        assert_eq!((r.data.as_slice(), r.size), (&b"cde"[..], 6));
        // Fewer at the end, none past it, never more than `max`.
        assert_eq!(
            get_file(root.path(), "f", 4, Some(10), 100).unwrap().data,
            b"ef"
        );
        assert!(get_file(root.path(), "f", 99, Some(10), 100)
            .unwrap()
            .data
            .is_empty());
        assert_eq!(
            get_file(root.path(), "f", 0, Some(10), 4).unwrap().data,
            b"abcd"
        );
        // Without a length: the rest, refused when over `max`.
        assert_eq!(get_file(root.path(), "f", 3, None, 3).unwrap().data, b"def");
        assert!(matches!(
            get_file(root.path(), "f", 0, None, 5),
            Err(FileError::TooLarge { size: 6, .. })
        ));
        // Not appending truncates.
        put_file(root.path(), "f", b"x", 0o644, None, false).unwrap();
        assert_eq!(get(root.path(), "f", 10).unwrap().0, b"x");
    }

    #[test]
    fn make_dir_creates_parents_with_the_mode_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        make_dir(root.path(), "a/b/c", 0o750, None).unwrap();
        make_dir(root.path(), "a/b/c", 0o750, None).unwrap();
        let m = std::fs::metadata(root.path().join("a/b/c")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o7777, 0o750);
        for bad in ["..", "../x", "a/../../x", "/tmp/x", ".", ""] {
            assert!(
                matches!(
                    make_dir(root.path(), bad, 0o755, None),
                    Err(FileError::Refused { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn list_files_walks_regular_files_only_and_stops_at_the_limits() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        put_file(r, "out/b.txt", b"bb", 0o600, None, false).unwrap();
        put_file(r, "out/a/x.bin", b"x", 0o644, None, false).unwrap();
        put_file(r, "out/a\nb", b"x", 0o644, None, false).unwrap();
        std::os::unix::fs::symlink("/", r.join("out/root")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", r.join("out/host")).unwrap();
        nix::unistd::mkfifo(&r.join("out/fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let deep = (0..MAX_LIST_DEPTH + 2)
            .map(|_| "d")
            .collect::<Vec<_>>()
            .join("/");
        put_file(r, &format!("out/{deep}/deep.txt"), b"x", 0o644, None, false).unwrap();
        let l = list_files(r, "out", 100).unwrap();
        let paths: Vec<&str> = l.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a/x.bin", "b.txt"], "{l:?}");
        assert_eq!((l.entries[1].size, l.entries[1].mode), (2, 0o600));
        assert!(!l.truncated);
        let l = list_files(r, "out", 1).unwrap();
        assert_eq!(l.entries.len(), 1);
        assert!(l.truncated);
        // Exactly as many files as asked: not truncated, whatever else is there.
        let l = list_files(r, "out", 2).unwrap();
        assert_eq!(l.entries.len(), 2);
        assert!(!l.truncated, "{l:?}");
        // The workspace itself, and refusals.
        let l = list_files(r, ".", 100).unwrap();
        assert!(l.entries.iter().any(|e| e.path == "out/b.txt"), "{l:?}");
        assert!(matches!(
            list_files(r, "out/root", 10),
            Err(FileError::Refused { .. })
        ));
        assert!(matches!(
            list_files(r, "../", 10),
            Err(FileError::Refused { .. })
        ));
        assert!(matches!(
            list_files(r, "nope", 10),
            Err(FileError::NotFound { .. })
        ));
    }
}
