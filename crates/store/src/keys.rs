//! Object keys are untrusted: the one check every key goes through before it becomes a local
//! path (`store sync` into a directory, `store download`, the local-directory store; later the
//! mount and the Files API).
//!
//! A key is refused when it is empty, absolute, has an empty, `.` or `..` component, contains
//! NUL, or has a component longer than a file name may be. Paths are then resolved beneath a
//! root the way a chroot would: [`safe_key_path`] is the lexical check, [`prepare_key_path`]
//! also creates the parent directories one component at a time and refuses any symbolic link
//! beneath the root (a pre-existing link must not carry a write out of the root). The root
//! itself is the operator's choice and may be a link.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Longest file name component Linux file systems accept (`NAME_MAX`).
pub const MAX_COMPONENT: usize = 255;

/// Why a key cannot be used as a local path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// The key is empty.
    Empty,
    /// The key starts with `/`.
    Absolute,
    /// A component is `..`.
    ParentComponent,
    /// A component is `.`.
    DotComponent,
    /// Two `/` in a row, or a trailing `/`.
    EmptyComponent,
    /// The key contains a NUL byte.
    Nul,
    /// A single name (component) contains `/`.
    Slash,
    /// A component is longer than [`MAX_COMPONENT`] bytes.
    ComponentTooLong,
    /// The key names the local store's bookkeeping directory.
    Reserved,
    /// A component beneath the root is a symbolic link (or not a directory where one is needed).
    Link {
        /// The offending local path.
        path: PathBuf,
    },
}

impl std::fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => f.write_str("the key is empty"),
            Self::Absolute => f.write_str("it is an absolute path (leading '/')"),
            Self::ParentComponent => f.write_str("it has a '..' component"),
            Self::DotComponent => f.write_str("it has a '.' component"),
            Self::EmptyComponent => {
                f.write_str("it has an empty component ('//' or a trailing '/')")
            }
            Self::Nul => f.write_str("it contains a NUL byte"),
            Self::Slash => f.write_str("a file name contains '/'"),
            Self::ComponentTooLong => {
                write!(f, "a component is longer than {MAX_COMPONENT} bytes")
            }
            Self::Reserved => f.write_str("it names the local store's bookkeeping directory"),
            Self::Link { path } => write!(
                f,
                "{} is a symbolic link or not a directory, and links beneath the destination \
                 are not followed",
                path.display()
            ),
        }
    }
}

/// Checks a key for use as a relative local path (see the module doc). Pure, no file system.
pub fn check_key(key: &str) -> Result<(), KeyProblem> {
    if key.is_empty() {
        return Err(KeyProblem::Empty);
    }
    if key.contains('\0') {
        return Err(KeyProblem::Nul);
    }
    if key.starts_with('/') {
        return Err(KeyProblem::Absolute);
    }
    key.split('/').try_for_each(check_component)
}

/// Checks one component of a key (one file name: what lies between two `/`): refused when it
/// is empty, `.`, `..`, contains NUL or `/`, or is longer than [`MAX_COMPONENT`]. [`check_key`]
/// applies it to every component; the mount applies it to every name it shows or is given.
pub fn check_component(c: &str) -> Result<(), KeyProblem> {
    match c {
        "" => Err(KeyProblem::EmptyComponent),
        "." => Err(KeyProblem::DotComponent),
        ".." => Err(KeyProblem::ParentComponent),
        c if c.contains('\0') => Err(KeyProblem::Nul),
        c if c.contains('/') => Err(KeyProblem::Slash),
        c if c.len() > MAX_COMPONENT => Err(KeyProblem::ComponentTooLong),
        _ => Ok(()),
    }
}

/// The local path of `key` beneath `root`, after [`check_key`]: every component of the result
/// below `root` is a normal name taken from the key.
pub fn safe_key_path(root: &Path, key: &str) -> Result<PathBuf> {
    check_key(key).map_err(|problem| Error::UnsafeKey {
        key: key.to_string(),
        problem,
    })?;
    let rel = Path::new(key);
    debug_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(root.join(rel))
}

/// Like [`safe_key_path`], and makes the path ready to be written: creates the missing parent
/// directories beneath `root` one at a time (mode 0755 less the umask) and refuses, with
/// [`KeyProblem::Link`], a symbolic link at any component beneath `root`, including the last
/// one. `root` itself is created when missing.
pub fn prepare_key_path(root: &Path, key: &str) -> Result<PathBuf> {
    let path = safe_key_path(root, key)?;
    std::fs::create_dir_all(root).map_err(|e| Error::io("create", root, e))?;
    walk_beneath(root, key, true)?;
    Ok(path)
}

/// Like [`safe_key_path`], for a path that is removed or read: refuses a symbolic link at any
/// component beneath `root` (so `--delete` never reaches through a link); creates nothing.
pub fn existing_key_path(root: &Path, key: &str) -> Result<PathBuf> {
    let path = safe_key_path(root, key)?;
    walk_beneath(root, key, false)?;
    Ok(path)
}

/// Visits each component of a checked key beneath `root`, refusing links and non-directories
/// where a directory is needed; creates missing parents when `create`.
fn walk_beneath(root: &Path, key: &str, create: bool) -> Result<()> {
    let refused = |p: &Path| Error::UnsafeKey {
        key: key.to_string(),
        problem: KeyProblem::Link {
            path: p.to_path_buf(),
        },
    };
    let mut cur = root.to_path_buf();
    let comps: Vec<&str> = key.split('/').collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        let last = i + 1 == comps.len();
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(refused(&cur)),
            Ok(m) if !last && !m.is_dir() => return Err(refused(&cur)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if last {
                    break;
                }
                if !create {
                    // Nothing further down exists.
                    break;
                }
                match std::fs::create_dir(&cur) {
                    Ok(()) => {}
                    // Created meanwhile: only a directory will do.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let m = std::fs::symlink_metadata(&cur)
                            .map_err(|e| Error::io("stat", &cur, e))?;
                        if !m.is_dir() {
                            return Err(refused(&cur));
                        }
                    }
                    Err(e) => return Err(Error::io("create", &cur, e)),
                }
            }
            Err(e) => return Err(Error::io("stat", &cur, e)),
        }
    }
    Ok(())
}

/// A key for messages: control characters escaped, so a hostile key cannot rewrite the
/// terminal or forge log lines.
pub fn display_key(key: &str) -> String {
    key.escape_debug().to_string()
}

/// Up to five keys, escaped and quoted, then how many more.
pub(crate) fn list_for_message(keys: &[String]) -> String {
    let mut s = keys
        .iter()
        .take(5)
        .map(|k| format!("'{}'", display_key(k)))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > 5 {
        s.push_str(&format!(" and {} more", keys.len() - 5));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_keys_are_refused() {
        for (key, want) in [
            ("", KeyProblem::Empty),
            ("/etc/passwd", KeyProblem::Absolute),
            ("//x", KeyProblem::Absolute),
            ("../../x", KeyProblem::ParentComponent),
            ("a/../b", KeyProblem::ParentComponent),
            ("a/..", KeyProblem::ParentComponent),
            ("..", KeyProblem::ParentComponent),
            ("a//b", KeyProblem::EmptyComponent),
            ("a/", KeyProblem::EmptyComponent),
            ("./a", KeyProblem::DotComponent),
            ("a/./b", KeyProblem::DotComponent),
            ("a\0b", KeyProblem::Nul),
            ("../\0", KeyProblem::Nul),
        ] {
            assert_eq!(check_key(key), Err(want), "{key:?}");
            let e = safe_key_path(Path::new("/dest"), key).unwrap_err();
            assert!(matches!(e, Error::UnsafeKey { .. }), "{key:?}: {e}");
        }
        let long = "a".repeat(MAX_COMPONENT + 1);
        assert_eq!(check_key(&long), Err(KeyProblem::ComponentTooLong));
    }

    #[test]
    fn hostile_components_are_refused() {
        for (c, want) in [
            ("", KeyProblem::EmptyComponent),
            (".", KeyProblem::DotComponent),
            ("..", KeyProblem::ParentComponent),
            ("a\0b", KeyProblem::Nul),
            ("a/b", KeyProblem::Slash),
            ("/", KeyProblem::Slash),
        ] {
            assert_eq!(check_component(c), Err(want), "{c:?}");
        }
        assert_eq!(
            check_component(&"x".repeat(MAX_COMPONENT + 1)),
            Err(KeyProblem::ComponentTooLong)
        );
        for c in ["a", "...", ".hidden", "a b", "ключ", "a\\b"] {
            assert_eq!(check_component(c), Ok(()), "{c:?}");
        }
    }

    #[test]
    fn ordinary_keys_stay_beneath_the_root() {
        for key in [
            "vmlinux",
            "rootfs-python.ext4",
            "dir/sub/file.bin",
            "...",
            "..a",
            "a..",
            ".hidden",
            "a b/c\\d",
            "ünïcode/ключ",
        ] {
            let p = safe_key_path(Path::new("/dest"), key).unwrap();
            assert!(p.starts_with("/dest"), "{key:?} -> {}", p.display());
            assert!(p
                .strip_prefix("/dest")
                .unwrap()
                .components()
                .all(|c| matches!(c, Component::Normal(_))));
        }
    }

    #[test]
    fn links_beneath_the_root_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("dest");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), root.join("file-link")).unwrap();
        for key in ["link/x", "link/sub/x", "file-link"] {
            let e = prepare_key_path(&root, key).unwrap_err();
            assert!(
                matches!(
                    &e,
                    Error::UnsafeKey {
                        problem: KeyProblem::Link { .. },
                        ..
                    }
                ),
                "{key}: {e}"
            );
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // A file where a directory is needed is refused too.
        std::fs::write(root.join("plain"), b"x").unwrap();
        assert!(prepare_key_path(&root, "plain/x").is_err());
        // Nothing is removed through a link either.
        assert!(existing_key_path(&root, "link/x").is_err());
        assert!(existing_key_path(&root, "missing/x").is_ok());
        // Ordinary keys get their parents.
        let p = prepare_key_path(&root, "a/b/c").unwrap();
        assert_eq!(p, root.join("a/b/c"));
        assert!(root.join("a/b").is_dir());
        // A root that is itself a link is the operator's choice and is followed.
        let via = d.path().join("via");
        std::os::unix::fs::symlink(&root, &via).unwrap();
        assert!(prepare_key_path(&via, "a/b/d").is_ok());
    }

    #[test]
    fn keys_are_escaped_for_messages() {
        assert_eq!(display_key("a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
    }
}
