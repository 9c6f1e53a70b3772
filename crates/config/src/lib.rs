//! Paths and defaults, resolved once: `INFRA_OPERATOR_HOME` → (root: `/srv/firecracker`, the
//! seeds' layout) → (user: `$XDG_DATA_HOME/infra-operator`).
//!
//! Every other crate receives a [`Paths`] instead of computing locations itself, so there is one
//! answer to "where is the python image" for the CLI, the runner and the tests.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of directories only this user reads: run and cache directories.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of the run directory: VMM processes, each under a uid of its own, must reach their own
/// VM directory inside it (search), but cannot list it or enter another VM's directory (0700).
pub const TRAVERSE_DIR: u32 = 0o711;
/// Mode of directories other users must read: the home (it holds the kernel) and images.
pub const SHARED_READ_DIR: u32 = 0o755;

/// Why one of infra.operator's host directories cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory could not be created or inspected.
    #[error("cannot create or inspect {}: check the parent directory's permissions, or set \
             INFRA_OPERATOR_HOME to a directory of your own", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The path exists and is not a directory.
    #[error("{} exists and is not a directory: remove it, or set INFRA_OPERATOR_HOME to another \
             place", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The directory (or a link naming it) belongs to another user, who could swap its
    /// content.
    #[error("{} belongs to uid {owner}, not to this user (uid {euid}): refusing to use it; \
             remove it, `chown {euid} {}` it, or set INFRA_OPERATOR_HOME to a directory of your \
             own", path.display(), path.display())]
    WrongOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// The directory is writable by its group or by everyone, who could plant files in it.
    #[error("{} is writable by group or others (mode {mode:03o}): refusing to use it; \
             `chmod go-w {}` it, or set INFRA_OPERATOR_HOME to a directory of your own",
             path.display(), path.display())]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Creates one of infra.operator's host directories (run, cache, images, home) with `mode`
/// ([`PRIVATE_DIR`] or [`SHARED_READ_DIR`]), parents included, or verifies the one that is
/// there: it must be a directory owned by this user (a link to it too), not writable by group
/// or others. Anything else is refused with a [`DirError`] that says what to do. The one
/// function every crate uses for these directories.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<(), DirError> {
    let io = |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)
            {
                Ok(()) => {
                    // Exactly `mode`, whatever the umask.
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                        .map_err(io)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
        }
        Err(e) => return Err(io(e)),
        Ok(_) => {}
    }
    verify_dir(path)
}

/// The checks of [`ensure_dir`] on an existing directory.
pub fn verify_dir(path: &Path) -> Result<(), DirError> {
    let io = |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    };
    let euid = nix::unistd::geteuid().as_raw();
    let link = std::fs::symlink_metadata(path).map_err(io)?;
    // A link is followed only when this user (or root, the administrator) made it.
    if link.file_type().is_symlink() && link.uid() != euid && link.uid() != 0 {
        return Err(DirError::WrongOwner {
            path: path.to_path_buf(),
            owner: link.uid(),
            euid,
        });
    }
    let md = std::fs::metadata(path).map_err(io)?;
    if !md.is_dir() {
        return Err(DirError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    if md.uid() != euid {
        return Err(DirError::WrongOwner {
            path: path.to_path_buf(),
            owner: md.uid(),
            euid,
        });
    }
    let perm = md.mode() & 0o7777;
    if perm & 0o022 != 0 {
        return Err(DirError::Writable {
            path: path.to_path_buf(),
            mode: perm,
        });
    }
    Ok(())
}

/// Where VM directories (sockets, logs) go: `$INFRA_OPERATOR_HOME/run` when that is set, else
/// `/run/infra-operator` for root, else `$XDG_RUNTIME_DIR/infra-operator`, else `run` under
/// this user's data directory. Never a shared temporary directory.
pub fn default_run_dir() -> PathBuf {
    if let Some(home) = std::env::var_os(HOME_ENV).filter(|h| !h.is_empty()) {
        return PathBuf::from(home).join("run");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/infra-operator");
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join("infra-operator"))
        .unwrap_or_else(|| Paths::from_env().home.join("run"))
}

/// This user's home from the password database (when `HOME` is unset).
fn passwd_home() -> Option<OsString> {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.dir.into_os_string())
}

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

/// File name of the slim agent binary installed beside `infra-operator`.
pub const AGENT_BINARY: &str = "infra-operator-agent";

/// Cargo profile the slim agent is built with (`cargo build --profile agent -p infra-agent`),
/// so also the directory it lands in beside `debug` and `release` in a cargo target directory.
pub const AGENT_PROFILE: &str = "agent";

/// The agent this host puts into images and initramfs: `infra-operator-agent` when it reports
/// `version` (`--version` prints `infra.operator VERSION`; the CLI passes the guest crate's
/// version with its source fingerprint), looked for beside this executable and, when this
/// executable runs from a cargo target directory, in that directory's `agent` profile
/// directory; else this executable itself (the full CLI is an agent too, only larger). So an
/// agent built from other sources than this host's is never shipped.
pub fn agent_binary(version: &str) -> std::io::Result<PathBuf> {
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|n| n == AGENT_BINARY) {
        return Ok(me);
    }
    let want = format!("infra.operator {version}");
    let reports = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file())
            && std::process::Command::new(p)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == want)
    };
    Ok(agent_candidates(&me)
        .into_iter()
        .find(|p| reports(p))
        .unwrap_or(me))
}

/// Where [`agent_binary`] looks, in order: beside `exe`, then (when `exe`'s directory is a
/// profile directory of a cargo target directory, which holds `CACHEDIR.TAG`) in the `agent`
/// profile directory next to it.
fn agent_candidates(exe: &Path) -> Vec<PathBuf> {
    let mut c = vec![exe.with_file_name(AGENT_BINARY)];
    if let Some(target) = exe.parent().and_then(Path::parent) {
        if target.join("CACHEDIR.TAG").is_file() {
            c.push(target.join(AGENT_PROFILE).join(AGENT_BINARY));
        }
    }
    c
}

impl Paths {
    /// Resolves paths from the process environment.
    pub fn from_env() -> Self {
        Self::resolve(
            std::env::var_os(HOME_ENV),
            nix::unistd::geteuid().is_root(),
            std::env::var_os("XDG_DATA_HOME"),
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .or_else(passwd_home),
        )
    }

    /// Pure resolution, separated from the environment so it can be tested. With no home at
    /// all the user layout goes under `/nonexistent` (so creating it fails with a clear error)
    /// rather than into a shared temporary directory.
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
                        PathBuf::from(
                            user_home
                                .filter(|h| !h.is_empty())
                                .unwrap_or_else(|| "/nonexistent".into()),
                        )
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

    /// The kernel's manifest, beside it: `vmlinux.json`.
    pub fn kernel_manifest(&self) -> PathBuf {
        Self::with_suffix(&self.kernel, ".json")
    }

    /// The kernel's modules the initramfs loads, beside it: `vmlinux.modules/`.
    pub fn kernel_modules(&self) -> PathBuf {
        Self::with_suffix(&self.kernel, ".modules")
    }

    /// Snapshots of ready VMs, one directory per language: `snapshots/<lang>/`.
    pub fn snapshots(&self) -> PathBuf {
        self.home.join("snapshots")
    }

    fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
        let mut s = path.as_os_str().to_os_string();
        s.push(suffix);
        PathBuf::from(s)
    }

    /// Content-addressed blob cache (`cache/blobs/sha256/<hex>`).
    pub fn blobs(&self) -> PathBuf {
        self.cache.join("blobs")
    }

    /// Creates (or verifies) the home 0755, images 0755 and cache 0700 with [`ensure_dir`].
    pub fn ensure_dirs(&self) -> Result<(), DirError> {
        ensure_dir(&self.home, SHARED_READ_DIR)?;
        ensure_dir(&self.images, SHARED_READ_DIR)?;
        ensure_dir(&self.cache, PRIVATE_DIR)
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

/// What kind of failure an error is, the same words for every crate. Each crate's error type
/// has a `kind()` that names every variant (no wildcard), the CLI maps a kind to an exit code
/// once, and the HTTP API maps it to a status once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bad flags, values or request fields: fix the request.
    Usage,
    /// Input was refused: hostile or corrupt archive, digest mismatch, unsafe object keys.
    Refused,
    /// What was named does not exist (image, key, file, bucket).
    NotFound,
    /// Over a size or count limit.
    TooLarge,
    /// The object is not in a state that allows this (changed meanwhile, already completed).
    Conflict,
    /// A prerequisite of this host is missing: a tool, root, the kernel, credentials, access.
    Prerequisite,
    /// A service this depends on is down, unreachable or busy: retry later.
    Unavailable,
    /// The sandbox failed: the VM did not boot, died, or its guest broke the protocol.
    Sandbox,
    /// Anything else that failed at run time (I/O, a full disk, a bug).
    Failure,
}

impl ErrorKind {
    /// A short snake_case name (the `code` of the API's error body, metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Usage => "invalid_request",
            Self::Refused => "input_refused",
            Self::NotFound => "not_found",
            Self::TooLarge => "too_large",
            Self::Conflict => "conflict",
            Self::Prerequisite => "prerequisite_missing",
            Self::Unavailable => "unavailable",
            Self::Sandbox => "sandbox_failure",
            Self::Failure => "failure",
        }
    }
}

impl DirError {
    /// The kind of this failure: a host directory that cannot be used is a prerequisite.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Prerequisite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_looked_for_beside_and_in_the_agent_profile_of_a_target_dir() {
        let t = tempfile::tempdir().unwrap();
        let debug = t.path().join("debug");
        std::fs::create_dir(&debug).unwrap();
        let exe = debug.join("infra-operator");
        assert_eq!(agent_candidates(&exe), vec![debug.join(AGENT_BINARY)]);
        std::fs::write(t.path().join("CACHEDIR.TAG"), "").unwrap();
        assert_eq!(
            agent_candidates(&exe),
            vec![
                debug.join(AGENT_BINARY),
                t.path().join("agent").join(AGENT_BINARY)
            ]
        );
    }

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
    fn no_home_never_means_a_shared_tmp() {
        let p = Paths::resolve(None, false, None, None);
        assert!(!p.home.starts_with("/tmp"), "{}", p.home.display());
        let p = Paths::resolve(None, false, Some("".into()), Some("".into()));
        assert!(!p.home.starts_with("/tmp"), "{}", p.home.display());
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn dirs_are_created_with_their_mode() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("a/run");
        ensure_dir(&run, PRIVATE_DIR).unwrap();
        assert_eq!(mode_of(&run), 0o700);
        let images = d.path().join("home/images");
        ensure_dir(&images, SHARED_READ_DIR).unwrap();
        assert_eq!(mode_of(&images), 0o755);
        // Existing and fine: accepted again, mode left as it is.
        ensure_dir(&images, PRIVATE_DIR).unwrap();
        assert_eq!(mode_of(&images), 0o755);
        let paths = Paths::under(d.path().join("h2"));
        paths.ensure_dirs().unwrap();
        assert_eq!(mode_of(&paths.cache), 0o700);
        assert_eq!(mode_of(&paths.home), 0o755);
    }

    #[test]
    fn group_or_world_writable_dirs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o777, 0o1777, 0o770, 0o702] {
            let p = d.path().join(format!("w{mode:o}"));
            std::fs::create_dir(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = ensure_dir(&p, PRIVATE_DIR).unwrap_err();
            assert!(matches!(e, DirError::Writable { .. }), "{mode:o}: {e}");
            assert!(e.to_string().contains("chmod go-w"), "{e}");
        }
    }

    #[test]
    /// Needs root (to chown to uid 65534), as CI runs.
    fn dirs_of_another_user_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let nobody = nix::unistd::Uid::from_raw(65534);
        let p = d.path().join("theirs");
        std::fs::create_dir(&p).unwrap();
        nix::unistd::chown(&p, Some(nobody), None).unwrap();
        let e = ensure_dir(&p, PRIVATE_DIR).unwrap_err();
        assert!(
            matches!(e, DirError::WrongOwner { owner: 65534, .. }),
            "{e}"
        );
        // A link made by another user, even to our own directory, is refused too.
        let mine = d.path().join("mine");
        ensure_dir(&mine, PRIVATE_DIR).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            Some(nobody),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert!(matches!(
            ensure_dir(&link, PRIVATE_DIR),
            Err(DirError::WrongOwner { .. })
        ));
        // Not a directory.
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            ensure_dir(&f, PRIVATE_DIR),
            Err(DirError::NotADirectory { .. })
        ));
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
