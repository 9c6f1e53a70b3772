//! Paths and defaults, resolved once: `INFRA_OPERATOR_HOME` → (root: `/srv/firecracker`, the
//! seeds' layout) → (user: `$XDG_DATA_HOME/infra-operator`).
//!
//! Every other crate receives a [`Paths`] instead of computing locations itself, so there is one
//! answer to "where is the python image" for the CLI, the runner and the tests.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Finds an executable on `PATH` or in the sbin directories (root's tools live there and are
/// not on every user's `PATH`). The one lookup every crate uses for host tools.
pub fn find_executable(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/local/sbin", "/usr/sbin", "/sbin"]
                .into_iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Environment variable that overrides the whole layout (tests and multi-tenant hosts use it).
pub const HOME_ENV: &str = "INFRA_OPERATOR_HOME";
/// The seeds' working directory when running as root.
pub const ROOT_HOME: &str = "/srv/firecracker";

/// Where images, the kernel and caches live on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Top directory (`/srv/firecracker` for root).
    pub home: PathBuf,
    /// `rootfs-{name}.ext4` and `rootfs-{name}.json` live here.
    pub images: PathBuf,
    /// Guest kernel (`vmlinux`, seed default `/srv/firecracker/vmlinux`).
    pub kernel: PathBuf,
    /// Content-addressed downloads (layer blobs) and build scratch space.
    pub cache: PathBuf,
}

impl Paths {
    /// Resolves paths from the process environment.
    pub fn from_env() -> Self {
        Self::resolve(
            std::env::var_os(HOME_ENV),
            nix::unistd::geteuid().is_root(),
            std::env::var_os("XDG_DATA_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// Pure resolution, separated from the environment so it can be tested.
    pub fn resolve(
        override_home: Option<OsString>,
        is_root: bool,
        xdg_data_home: Option<OsString>,
        user_home: Option<OsString>,
    ) -> Self {
        let home = match override_home.filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h),
            None if is_root => PathBuf::from(ROOT_HOME),
            None => {
                let data = xdg_data_home
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(user_home.unwrap_or_else(|| "/tmp".into()))
                            .join(".local/share")
                    });
                data.join("infra-operator")
            }
        };
        Self::under(home)
    }

    /// The standard layout under one directory.
    pub fn under(home: impl Into<PathBuf>) -> Self {
        let home = home.into();
        Self {
            images: home.join("images"),
            kernel: home.join("vmlinux"),
            cache: home.join("cache"),
            home,
        }
    }

    /// Image file for a name: `images/rootfs-{name}.ext4`.
    pub fn image(&self, name: &str) -> PathBuf {
        self.images.join(format!("rootfs-{name}.ext4"))
    }

    /// Manifest beside an image file: same stem, `.json`.
    pub fn manifest_for(image: &Path) -> PathBuf {
        image.with_extension("json")
    }

    /// Content-addressed blob cache (`cache/blobs/sha256/<hex>`).
    pub fn blobs(&self) -> PathBuf {
        self.cache.join("blobs")
    }
}

/// Writes a file atomically: temp file in the same directory, fsync, rename, fsync the directory.
///
/// Readers see the old content or the new, never a partial file; on error nothing is left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir, path)?;
    let res = (|| {
        tmp.1.write_all(bytes)?;
        tmp.1.sync_all()?;
        std::fs::rename(&tmp.0, path)?;
        fsync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp.0);
    }
    res
}

fn tempfile_in(dir: &Path, target: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    for attempt in 0..100u32 {
        let p = dir.join(format!(".{name}.tmp-{}-{attempt}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("could not create a temporary file"))
}

/// Makes a rename durable by syncing the directory that holds it.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_uses_the_seed_layout() {
        let p = Paths::resolve(None, true, None, Some("/root".into()));
        assert_eq!(
            p.image("python"),
            Path::new("/srv/firecracker/images/rootfs-python.ext4")
        );
        assert_eq!(p.kernel, Path::new("/srv/firecracker/vmlinux"));
    }

    #[test]
    fn users_get_xdg_and_override_wins() {
        let p = Paths::resolve(None, false, None, Some("/home/u".into()));
        assert_eq!(
            p.images,
            Path::new("/home/u/.local/share/infra-operator/images")
        );
        let p = Paths::resolve(None, false, Some("/x".into()), Some("/home/u".into()));
        assert_eq!(p.images, Path::new("/x/infra-operator/images"));
        let p = Paths::resolve(Some("/o".into()), true, None, None);
        assert_eq!(p.images, Path::new("/o/images"));
        assert_eq!(
            Paths::manifest_for(&p.image("go")),
            Path::new("/o/images/rootfs-go.json")
        );
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a/b.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(f.parent().unwrap()).unwrap().count(), 1);
    }
}
