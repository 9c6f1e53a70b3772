//! A tar archive read in place: one pass over the headers builds a name → (offset, size) index,
//! then files are read straight from the archive. Nothing of the archive is ever written to disk,
//! so links inside it cannot redirect a write anywhere: they are resolved by name, inside the
//! archive's own namespace, the way a chroot would resolve them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Most entries an outer archive (`docker save`, OCI layout in a tar) may have. Real ones have a
/// few per layer; the cap bounds the index's memory for a hostile archive.
pub const MAX_ARCHIVE_ENTRIES: usize = 100_000;
/// Most bytes of a JSON document (manifest, index, config) read into memory.
pub const MAX_JSON_BYTES: u64 = 16 << 20;
/// Symlinks followed while resolving one name (as Linux's MAXSYMLINKS).
const MAX_HOPS: usize = 40;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// File data at `offset`, `size` bytes long.
    File {
        offset: u64,
        size: u64,
    },
    Dir,
    /// Symlink: its target as written.
    Symlink(PathBuf),
    /// Hard link: the name of another entry, from the archive root.
    Hardlink(PathBuf),
}

/// A region of the archive file that holds one member's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Byte offset of the data in the archive.
    pub offset: u64,
    /// Data length.
    pub size: u64,
}

/// The index of one archive.
#[derive(Debug)]
pub struct TarIndex {
    path: PathBuf,
    nodes: HashMap<PathBuf, Node>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Archive {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Normalizes a member name: `./a//b/` → `a/b`. Absolute names and `..` are refused.
fn member_name(raw: &[u8]) -> std::result::Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute member name"),
            Component::ParentDir => return Err("member name with '..'"),
        }
    }
    Ok(out)
}

impl TarIndex {
    /// Reads every header of `path` (data is skipped with seeks, not read).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).ctx("open", path)?;
        let len = file.metadata().ctx("stat", path)?.len();
        let mut archive = tar::Archive::new(file);
        let mut nodes = HashMap::new();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| bad(path, format!("not a tar archive: {e}")))?;
        for (n, entry) in entries.enumerate() {
            if n >= MAX_ARCHIVE_ENTRIES {
                return Err(bad(
                    path,
                    format!("more than {MAX_ARCHIVE_ENTRIES} entries: not an image archive"),
                ));
            }
            let entry = entry.map_err(|e| bad(path, format!("corrupt or truncated: {e}")))?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let hostile = |reason: &str| Error::HostileEntry {
                layer: path.display().to_string(),
                entry: shown.clone(),
                reason: reason.to_string(),
            };
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                continue;
            }
            let name = member_name(&raw).map_err(hostile)?;
            let node = match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let offset = entry.raw_file_position();
                    let size = entry.size();
                    if offset.checked_add(size).is_none_or(|end| end > len) {
                        return Err(bad(
                            path,
                            format!("member {shown} runs past the end of the archive (truncated)"),
                        ));
                    }
                    Node::File { offset, size }
                }
                tar::EntryType::Directory => Node::Dir,
                tar::EntryType::Symlink => {
                    Node::Symlink(PathBuf::from(std::ffi::OsStr::from_bytes(
                        &entry
                            .link_name_bytes()
                            .ok_or_else(|| hostile("symlink without a target"))?,
                    )))
                }
                tar::EntryType::Link => Node::Hardlink(
                    member_name(
                        &entry
                            .link_name_bytes()
                            .ok_or_else(|| hostile("hard link without a target"))?,
                    )
                    .map_err(hostile)?,
                ),
                // Devices, fifos and sparse files have no place in an image archive's outer tar;
                // they are ignored (never created), as are unknown types.
                _ => continue,
            };
            if name.as_os_str().is_empty() {
                continue;
            }
            nodes.insert(name, node);
        }
        Ok(Self {
            path: path.to_path_buf(),
            nodes,
        })
    }

    /// The archive file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolves `name` to the data of a regular member, following the archive's own symlinks and
    /// hard links by name. A link that climbs above the archive root is refused.
    pub fn find(&self, name: &str) -> Result<Region> {
        let mut hops = 0;
        let mut want = member_name(name.as_bytes()).map_err(|r| {
            bad(
                &self.path,
                format!("the manifest names '{name}', which is outside the archive ({r})"),
            )
        })?;
        loop {
            let resolved = self.resolve(&want, &mut hops, name)?;
            match self.nodes.get(&resolved) {
                Some(Node::File { offset, size }) => {
                    return Ok(Region {
                        offset: *offset,
                        size: *size,
                    })
                }
                Some(Node::Hardlink(target)) => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(bad(&self.path, format!("{name}: too many links")));
                    }
                    want = target.clone();
                }
                Some(Node::Dir) => {
                    return Err(bad(
                        &self.path,
                        format!("{name} is a directory, not a file"),
                    ))
                }
                Some(Node::Symlink(_)) | None => {
                    return Err(bad(
                        &self.path,
                        format!("{name} is missing from the archive"),
                    ))
                }
            }
        }
    }

    /// Walks `rel` through the index; every symlink met, including the last component, is
    /// replaced by its target (relative targets from the link's directory, absolute ones from the
    /// archive root).
    fn resolve(&self, rel: &Path, hops: &mut usize, shown: &str) -> Result<PathBuf> {
        let mut stack: Vec<std::ffi::OsString> = Vec::new();
        let mut pending: Vec<std::ffi::OsString> = rel
            .components()
            .rev()
            .map(|c| c.as_os_str().to_os_string())
            .collect();
        while let Some(comp) = pending.pop() {
            if comp == "." || comp.is_empty() || comp == "/" {
                continue;
            }
            if comp == ".." {
                if stack.pop().is_none() {
                    return Err(bad(
                        &self.path,
                        format!("{shown}: a link in the archive leads outside it"),
                    ));
                }
                continue;
            }
            stack.push(comp);
            let here: PathBuf = stack.iter().collect();
            if let Some(Node::Symlink(target)) = self.nodes.get(&here) {
                *hops += 1;
                if *hops > MAX_HOPS {
                    return Err(bad(
                        &self.path,
                        format!("{shown}: too many levels of links"),
                    ));
                }
                stack.pop();
                if target.is_absolute() {
                    stack.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                        other => pending.push(other.as_os_str().to_os_string()),
                    }
                }
            }
        }
        Ok(stack.iter().collect())
    }

    /// Whether `name` resolves to a regular member.
    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Reads a small member (JSON) whole, refusing more than [`MAX_JSON_BYTES`].
    pub fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        let region = self.find(name)?;
        if region.size > MAX_JSON_BYTES {
            return Err(bad(
                &self.path,
                format!(
                    "{name} is {} bytes, more than the {MAX_JSON_BYTES} allowed for a JSON document",
                    region.size
                ),
            ));
        }
        let mut f = File::open(&self.path).ctx("open", &self.path)?;
        f.seek(SeekFrom::Start(region.offset))
            .ctx("seek in", &self.path)?;
        let mut buf = Vec::with_capacity(region.size as usize);
        f.take(region.size)
            .read_to_end(&mut buf)
            .ctx("read", &self.path)?;
        if buf.len() as u64 != region.size {
            return Err(bad(&self.path, format!("{name} is truncated")));
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let bytes = b.into_inner().unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        f
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(kind);
        b.append_link(&mut h, name, target).unwrap();
    }

    #[test]
    fn members_are_found_in_place() {
        let a = archive(|b| {
            file(b, "./manifest.json", b"[]");
            file(b, "blobs/sha256/aa", b"layer");
            link(
                b,
                tar::EntryType::Symlink,
                "x/layer.tar",
                "../blobs/sha256/aa",
            );
            link(b, tar::EntryType::Link, "hard", "blobs/sha256/aa");
        });
        let idx = TarIndex::open(a.path()).unwrap();
        assert_eq!(idx.read_small("manifest.json").unwrap(), b"[]");
        assert_eq!(idx.read_small("x/layer.tar").unwrap(), b"layer");
        assert_eq!(idx.read_small("hard").unwrap(), b"layer");
        assert_eq!(idx.find("blobs/sha256/aa").unwrap().size, 5);
        assert!(idx.find("nope").is_err());
        assert!(idx.find("../etc/passwd").is_err());
        assert!(idx.find("/etc/passwd").is_err());
    }

    #[test]
    fn links_cannot_leave_the_archive() {
        let a = archive(|b| {
            link(b, tar::EntryType::Symlink, "up", "..");
            link(b, tar::EntryType::Symlink, "abs", "/etc/passwd");
            link(b, tar::EntryType::Symlink, "loop", "loop");
        });
        let idx = TarIndex::open(a.path()).unwrap();
        let e = idx.find("up/etc/passwd").unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        // Absolute targets are taken from the archive root: there is no /etc/passwd in it.
        assert!(idx.find("abs").unwrap_err().to_string().contains("missing"));
        assert!(idx
            .find("loop")
            .unwrap_err()
            .to_string()
            .contains("too many"));
    }

    #[test]
    fn truncated_members_are_refused() {
        let a = archive(|b| file(b, "big", &[7u8; 4096]));
        let bytes = std::fs::read(a.path()).unwrap();
        std::fs::write(a.path(), &bytes[..1024]).unwrap();
        assert!(TarIndex::open(a.path()).is_err());
    }
}
