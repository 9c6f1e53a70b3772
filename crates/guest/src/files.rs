//! Workspace file access, confined beneath the workspace root.
//!
//! Paths are split into plain components (absolute paths, `..` and NUL are refused) and then
//! walked one directory at a time with `openat(O_NOFOLLOW)`, so a symlink anywhere on the way,
//! even one planted by the untrusted program while we walk, is refused rather than followed.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::{fchmod, mkdirat, Mode};
use nix::unistd::{fchown, Gid, Uid};

use crate::error::FileError;

/// Owner given to files and directories the agent creates for the untrusted user.
pub(crate) type Owner = Option<(u32, u32)>;

/// Splits a workspace-relative path into its components, refusing anything that could leave
/// the workspace.
pub(crate) fn components(path: &str) -> Result<Vec<&OsStr>, FileError> {
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
    if out.is_empty() {
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
    let mut fd = open(root, DIR_FLAGS, Mode::empty()).map_err(|e| FileError::Io {
        path: path.to_string(),
        source: e.into(),
    })?;
    for d in dirs {
        if let Some(owner) = create {
            match mkdirat(&fd, *d, Mode::from_bits_truncate(0o755)) {
                Ok(()) => {
                    let new = openat(&fd, *d, DIR_FLAGS, Mode::empty())
                        .map_err(|e| map_errno(path, e))?;
                    chown(&new, owner).map_err(|e| map_errno(path, e))?;
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

/// Writes `data` to `name` inside the open directory `dir`, never through a symlink.
pub(crate) fn write_in(
    dir: &OwnedFd,
    name: &OsStr,
    data: &[u8],
    mode: u32,
    owner: Owner,
    path: &str,
) -> Result<(), FileError> {
    let flags = OFlag::O_WRONLY
        | OFlag::O_CREAT
        | OFlag::O_TRUNC
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

/// `PutFile`: writes a file beneath `root`, creating parent directories.
pub(crate) fn put_file(
    root: &Path,
    path: &str,
    data: &[u8],
    mode: u32,
    owner: Owner,
) -> Result<(), FileError> {
    let comps = components(path)?;
    let (name, dirs) = comps.split_last().expect("components is never empty");
    let dir = open_dir(root, path, dirs, Some(owner))?;
    write_in(&dir, name, data, mode, owner, path)
}

/// `GetFile`: reads a regular file beneath `root`, up to `max` bytes. Returns the data and
/// the permission bits.
pub(crate) fn get_file(root: &Path, path: &str, max: u64) -> Result<(Vec<u8>, u32), FileError> {
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
    if meta.len() > max {
        return Err(FileError::TooLarge {
            path: path.to_string(),
            size: meta.len(),
            max,
        });
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    (&mut file)
        .take(max + 1)
        .read_to_end(&mut data)
        .map_err(io)?;
    if data.len() as u64 > max {
        return Err(FileError::TooLarge {
            path: path.to_string(),
            size: data.len() as u64,
            max,
        });
    }
    Ok((data, meta.permissions().mode() & 0o7777))
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
    }

    #[test]
    fn put_get_round_trip_and_symlink_refusal() {
        let root = tempfile::tempdir().unwrap();
        put_file(root.path(), "d/e/f.bin", &[0, 1, 255], 0o640, None).unwrap();
        let (data, mode) = get_file(root.path(), "d/e/f.bin", 100).unwrap();
        assert_eq!(data, [0, 1, 255]);
        assert_eq!(mode, 0o640);
        assert!(matches!(
            get_file(root.path(), "d/e/f.bin", 2),
            Err(FileError::TooLarge { .. })
        ));
        assert!(matches!(
            get_file(root.path(), "missing", 2),
            Err(FileError::NotFound { .. })
        ));
        std::os::unix::fs::symlink("/etc", root.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.path().join("flink")).unwrap();
        for p in ["link/hostname", "flink"] {
            assert!(
                matches!(
                    get_file(root.path(), p, 1 << 20),
                    Err(FileError::Refused { .. })
                ),
                "{p}"
            );
        }
        assert!(matches!(
            put_file(root.path(), "link/x", b"x", 0o644, None),
            Err(FileError::Refused { .. })
        ));
        assert!(matches!(
            put_file(root.path(), "flink", b"x", 0o644, None),
            Err(FileError::Refused { .. })
        ));
        assert!(matches!(
            get_file(root.path(), "d", 10),
            Err(FileError::Refused { .. })
        ));
    }
}
