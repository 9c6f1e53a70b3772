//! `run --output-dir DIR`: the runner downloads the program's output files into a staging
//! directory inside DIR (as `0`, `1`, ...); this module then moves each to its name under DIR.
//!
//! Like `docker cp CONTAINER:/workspace/output/. DIR`: DIR is created if missing, files land
//! under their names (subdirectories created), and a file already there of the same name is
//! replaced. Unlike it, nothing is ever followed: each directory on the way is opened with
//! `openat(O_NOFOLLOW | O_DIRECTORY)` (a symlink or a file on the way refuses that name), and
//! the file is put in place with `renameat`, which replaces a symlink rather than writing
//! through it. Names are checked again with [`infra_protocol::check_relative_path`].

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{open, openat, renameat, OFlag};
use nix::sys::stat::{mkdirat, Mode};

/// Output caps of `run --output-dir` (documented in its `--help`).
pub const MAX_FILES: usize = 1000;
/// Largest output file brought back, in bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Most output bytes brought back in all.
pub const MAX_TOTAL_BYTES: u64 = 1 << 30;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// The output directory and its staging directory (removed when this is dropped).
pub struct OutputDir {
    dir: PathBuf,
    staging: tempfile::TempDir,
}

impl OutputDir {
    /// Creates `dir` if missing and a private staging directory inside it.
    pub fn prepare(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --output-dir {}", dir.display()))?;
        let staging = tempfile::Builder::new()
            .prefix(".infra-output-")
            .tempdir_in(dir)
            .with_context(|| {
                format!(
                    "cannot create a staging directory in --output-dir {}; is it writable?",
                    dir.display()
                )
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            staging,
        })
    }

    /// The limits to give the runner: its files go to the staging directory.
    pub fn limits(&self) -> infra_runner::OutputLimits {
        infra_runner::OutputLimits {
            dir: self.staging.path().to_path_buf(),
            max_files: MAX_FILES,
            max_file_bytes: MAX_FILE_BYTES,
            max_total_bytes: MAX_TOTAL_BYTES,
        }
    }

    /// Moves every downloaded file to its name under the output directory, and points its
    /// `host_path` there.
    pub fn place(&self, files: &mut [infra_runner::OutputFile]) -> Result<()> {
        let root = open(&self.dir, DIR_FLAGS, Mode::empty())
            .with_context(|| format!("cannot open --output-dir {}", self.dir.display()))?;
        let staging = open(self.staging.path(), DIR_FLAGS, Mode::empty())
            .context("cannot open the staging directory")?;
        for f in files {
            let from = f
                .host_path
                .file_name()
                .context("an output file without a staged name")?
                .to_owned();
            // Read and write for the user; executable where the program made it so. Never
            // setuid/setgid bits.
            let mode = if f.mode & 0o111 != 0 { 0o755 } else { 0o644 };
            std::fs::set_permissions(&f.host_path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot set the mode of {}", f.host_path.display()))?;
            let (parent, name) = open_parent(&root, &f.name).with_context(|| {
                format!(
                    "cannot place output file {:?} in {}",
                    f.name,
                    self.dir.display()
                )
            })?;
            renameat(&staging, from.as_os_str(), &parent, name).with_context(|| {
                format!(
                    "cannot place output file {:?} in {} (a directory of that name there?)",
                    f.name,
                    self.dir.display()
                )
            })?;
            f.host_path = self.dir.join(&f.name);
        }
        Ok(())
    }
}

/// Opens (creating as needed) the directory that holds `name` under `root`, never through a
/// symlink, and returns it with the last component.
fn open_parent<'a>(root: &OwnedFd, name: &'a str) -> Result<(OwnedFd, &'a str)> {
    if let Err(problem) = infra_protocol::check_relative_path(name) {
        bail!("the name is refused: {problem}");
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let last = parts.pop().expect("split yields at least one part");
    let mut fd = root.try_clone().context("cannot duplicate a descriptor")?;
    for p in parts {
        match mkdirat(&fd, p, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create directory {p:?}")),
        }
        fd = match openat(&fd, p, DIR_FLAGS, Mode::empty()) {
            Ok(d) => d,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                bail!("{p:?} on the way is a symlink or a file; it is not followed")
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open directory {p:?}")),
        };
    }
    Ok((fd, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(out: &OutputDir, index: usize, name: &str, data: &[u8]) -> infra_runner::OutputFile {
        let host_path = out.staging.path().join(index.to_string());
        std::fs::write(&host_path, data).unwrap();
        infra_runner::OutputFile {
            name: name.into(),
            bytes: data.len() as u64,
            mode: 0o644,
            host_path,
        }
    }

    #[test]
    fn files_land_under_their_names_replacing_files_but_never_following_links() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("out");
        let victim = top.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("old.txt"), "old").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("link")).unwrap();
        std::os::unix::fs::symlink(victim.join("f"), dir.join("flink")).unwrap();
        let out = OutputDir::prepare(&dir).unwrap();
        let mut files = vec![
            staged(&out, 0, "old.txt", b"new"),
            staged(&out, 1, "sub/deep/b.bin", b"b"),
            staged(&out, 2, "flink", b"replaces the link, not its target"),
        ];
        out.place(&mut files).unwrap();
        assert_eq!(std::fs::read(dir.join("old.txt")).unwrap(), b"new");
        assert_eq!(std::fs::read(dir.join("sub/deep/b.bin")).unwrap(), b"b");
        assert!(std::fs::symlink_metadata(dir.join("flink"))
            .unwrap()
            .is_file());
        assert_eq!(files[1].host_path, dir.join("sub/deep/b.bin"));
        // Through a symlinked directory, or with an unsafe name: refused, nothing written.
        for name in ["link/x", "../escape", "/abs"] {
            let mut f = vec![staged(&out, 9, name, b"x")];
            assert!(out.place(&mut f).is_err(), "{name}");
        }
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        assert!(!top.path().join("escape").exists());
        let staging = out.staging.path().to_path_buf();
        drop(out);
        assert!(!staging.exists(), "the staging directory is removed");
    }
}
