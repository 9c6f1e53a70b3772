//! `rootfs create`: a base system from a distribution mirror instead of an OCI image.
//!
//! Debian and Ubuntu use `debootstrap --variant=minbase` (packages resolved with their
//! dependencies through `--include`); Alpine uses `apk --initdb` when its mirror is reachable.
//! A post-install script runs in a chroot with `/proc` mounted, and fails the build if it fails.

use std::io::Read;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::tools;

/// Base distribution for `rootfs create --base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// Debian (bookworm by default).
    Debian,
    /// Ubuntu (jammy by default; needs a reachable mirror).
    Ubuntu,
    /// Alpine (needs a reachable mirror and `apk`).
    Alpine,
}

impl std::str::FromStr for Base {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "debian" => Ok(Base::Debian),
            "ubuntu" => Ok(Base::Ubuntu),
            "alpine" => Ok(Base::Alpine),
            other => Err(format!(
                "unknown base '{other}': use debian, ubuntu or alpine"
            )),
        }
    }
}

/// Options for a distribution build.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Distribution.
    pub base: Base,
    /// Release (`bookworm`, `jammy`, `v3.20`); the base's default when `None`.
    pub suite: Option<String>,
    /// Mirror URL; from the host's apt sources (Debian) or the distribution default when `None`.
    pub mirror: Option<String>,
    /// Packages to install (language packages plus `--packages`).
    pub packages: Vec<String>,
    /// PyPI installs: (directory inside the image, packages), run with the host's pip.
    pub pip: Vec<(String, Vec<String>)>,
    /// npm installs: (directory inside the image, packages), run with the host's npm.
    pub npm: Vec<(String, Vec<String>)>,
    /// Script run in the chroot after installation.
    pub post_install: Option<PathBuf>,
    /// Build cache: the bootstrapped base systems and downloaded packages (kept between
    /// builds).
    pub cache_dir: PathBuf,
}

/// The apt lists of a cached base are refreshed when older than this.
const LISTS_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

/// Result of staging: a description for the manifest.
#[derive(Debug, Clone)]
pub struct Staged {
    /// `debootstrap` or `apk`.
    pub kind: String,
    /// `debian:bookworm@http://…`.
    pub reference: String,
}

impl CreateOptions {
    fn suite(&self) -> String {
        self.suite.clone().unwrap_or_else(|| match self.base {
            Base::Debian => "bookworm".into(),
            Base::Ubuntu => "jammy".into(),
            Base::Alpine => "v3.20".into(),
        })
    }

    fn mirror(&self) -> String {
        self.mirror.clone().unwrap_or_else(|| match self.base {
            Base::Debian => {
                host_debian_mirror().unwrap_or_else(|| "http://deb.debian.org/debian".into())
            }
            Base::Ubuntu => "http://archive.ubuntu.com/ubuntu".into(),
            Base::Alpine => "https://dl-cdn.alpinelinux.org/alpine".into(),
        })
    }
}

/// Installs the base system into `root` (an empty directory), then the packages, the PyPI and
/// npm installs and the post-install script.
///
/// Debian and Ubuntu bootstrap once per release and mirror into the build cache
/// (`bases/`); every build copies that base and installs its packages on the copy with apt,
/// sharing one package download cache, so many images cost one debootstrap.
pub fn stage(root: &Path, opts: &CreateOptions) -> Result<Staged> {
    let suite = opts.suite();
    let mirror = opts.mirror();
    let what = match opts.base {
        Base::Debian => "Debian",
        Base::Ubuntu => "Ubuntu",
        Base::Alpine => "Alpine",
    };
    let staged = match opts.base {
        Base::Debian | Base::Ubuntu => {
            copy_base(opts, &suite, &mirror, what, root)?;
            apt_install(root, &opts.packages, &opts.cache_dir)?;
            let name = if opts.base == Base::Ubuntu {
                "ubuntu"
            } else {
                "debian"
            };
            Staged {
                kind: "debootstrap".into(),
                reference: format!("{name}:{suite}@{mirror}"),
            }
        }
        Base::Alpine => {
            check_reachable(&mirror).map_err(|source| Error::MirrorUnreachable {
                what: what.into(),
                mirror: mirror.clone(),
                source: source.into(),
            })?;
            apk(root, opts, &suite, &mirror)?
        }
    };
    for (dir, pkgs) in &opts.pip {
        pip_install(root, dir, pkgs)?;
    }
    for (dir, pkgs) in &opts.npm {
        npm_install(root, dir, pkgs)?;
    }
    if let Some(script) = &opts.post_install {
        post_install(root, script)?;
    }
    Ok(staged)
}

/// Copies the bootstrapped base for this distribution, release and mirror into `root`. The
/// base is made once with debootstrap (in a temporary directory renamed into place) and its apt
/// lists are refreshed when stale; all of it, the copy included, under the base's lock, so a
/// concurrent refresh never yields a half-updated copy.
fn copy_base(
    opts: &CreateOptions,
    suite: &str,
    mirror: &str,
    what: &str,
    root: &Path,
) -> Result<()> {
    let bases = opts.cache_dir.join("bases");
    infra_config::ensure_dir(&bases, infra_config::PRIVATE_DIR)?;
    let tag = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(mirror.as_bytes())[..4])
    };
    let kind = if opts.base == Base::Ubuntu {
        "ubuntu"
    } else {
        "debian"
    };
    let name = format!("{kind}-{suite}-{tag}");
    let dir = bases.join(&name);
    let complete = bases.join(format!("{name}.complete"));
    let lock_path = bases.join(format!("{name}.lock"));
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ctx("open", &lock_path)?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io("lock", &lock_path, e.into()))?;
    if !complete.exists() || !dir.is_dir() {
        check_reachable(mirror).map_err(|source| Error::MirrorUnreachable {
            what: what.into(),
            mirror: mirror.to_string(),
            source: source.into(),
        })?;
        let tmp = bases.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).ctx("create", &tmp)?;
        let made = debootstrap(&tmp, opts, suite, mirror);
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).ctx("move base into", &dir)?;
        infra_config::write_atomic(&complete, mirror.as_bytes()).ctx("write", &complete)?;
        tracing::info!(base = %dir.display(), "bootstrapped a base system for the build cache");
    }
    let stamp = bases.join(format!("{name}.lists"));
    let fresh = std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < LISTS_MAX_AGE);
    if !fresh {
        check_reachable(mirror).map_err(|source| Error::MirrorUnreachable {
            what: what.into(),
            mirror: mirror.to_string(),
            source: source.into(),
        })?;
        let _mounts = ChrootMounts::enter(&dir, None)?;
        tools::run(
            "apt-get update",
            &mut chroot_cmd(&dir, &["apt-get", "update"]),
        )?;
        infra_config::write_atomic(&stamp, b"").ctx("write", &stamp)?;
    }
    copy_tree(&dir, root)
}

fn debootstrap(root: &Path, opts: &CreateOptions, suite: &str, mirror: &str) -> Result<()> {
    let bin = tools::find("debootstrap", "debootstrap")?;
    let cache = opts.cache_dir.join(format!("debootstrap-{suite}"));
    infra_config::ensure_dir(&cache, infra_config::PRIVATE_DIR)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--variant=minbase")
        .arg(format!("--cache-dir={}", cache.display()));
    if opts.base == Base::Ubuntu {
        let keyring = Path::new("/usr/share/keyrings/ubuntu-archive-keyring.gpg");
        if !keyring.exists() {
            return Err(Error::MissingTool {
                tool: "ubuntu-archive-keyring.gpg".into(),
                package: "ubuntu-keyring".into(),
            });
        }
        cmd.arg(format!("--keyring={}", keyring.display()))
            .arg("--components=main,universe");
    }
    cmd.arg(suite).arg(root).arg(mirror);
    tools::run("debootstrap", &mut cmd)?;
    Ok(())
}

/// Copies a tree with owners, modes, times, hard links, device nodes and xattrs (`cp -a`,
/// reflinked where the file system can).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let mut src = from.as_os_str().to_owned();
    src.push("/.");
    tools::run(
        "cp",
        Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(src)
            .arg(to),
    )?;
    Ok(())
}

/// `/proc`, the host's DNS settings, the shared package cache and a policy that keeps
/// services from starting, for as long as a command runs in the chroot; undone on drop.
struct ChrootMounts {
    mounted: Vec<PathBuf>,
    restore: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl ChrootMounts {
    fn enter(root: &Path, archives: Option<&Path>) -> Result<Self> {
        let mut me = Self {
            mounted: Vec::new(),
            restore: Vec::new(),
        };
        let proc_dir = root.join("proc");
        std::fs::create_dir_all(&proc_dir).ctx("create", &proc_dir)?;
        nix::mount::mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::io("mount proc at", &proc_dir, e.into()))?;
        me.mounted.push(proc_dir);
        if let Some(cache) = archives {
            std::fs::create_dir_all(cache.join("partial")).ctx("create", cache)?;
            let target = root.join("var/cache/apt/archives");
            std::fs::create_dir_all(&target).ctx("create", &target)?;
            nix::mount::mount(
                Some(cache),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| Error::io("bind the package cache on", &target, e.into()))?;
            me.mounted.push(target);
        }
        // Replace, never write through: a link planted at these names must not be followed.
        for (name, text) in [
            (
                "etc/resolv.conf",
                std::fs::read("/etc/resolv.conf").unwrap_or_default(),
            ),
            ("usr/sbin/policy-rc.d", b"#!/bin/sh\nexit 101\n".to_vec()),
        ] {
            let path = root.join(name);
            let old = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => Some(std::fs::read(&path).ctx("read", &path)?),
                _ => None,
            };
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, &text).ctx("write", &path)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .ctx("set mode of", &path)?;
            me.restore.push((path, old));
        }
        Ok(me)
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        for (path, old) in self.restore.drain(..) {
            let _ = std::fs::remove_file(&path);
            if let Some(bytes) = old {
                let _ = std::fs::write(&path, bytes);
                let _ = std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o644),
                );
            }
        }
        for m in self.mounted.drain(..).rev() {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(path = %m.display(), error = %e, "cannot unmount after the chroot");
            }
        }
    }
}

/// A command run inside `root` with a clean, non-interactive environment.
fn chroot_cmd(root: &Path, argv: &[&str]) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .arg("/usr/bin/env")
        .arg("-i")
        .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("DEBIAN_FRONTEND=noninteractive")
        .arg("LANG=C.UTF-8")
        .args(argv);
    cmd
}

/// Installs `packages` with apt inside `root`, keeping downloads in the shared cache; the
/// lists and caches are then removed (not wanted in a read-only image).
fn apt_install(root: &Path, packages: &[String], cache_dir: &Path) -> Result<()> {
    if !packages.is_empty() {
        let archives = cache_dir.join("apt-archives");
        infra_config::ensure_dir(&archives, infra_config::PRIVATE_DIR)?;
        let _mounts = ChrootMounts::enter(root, Some(&archives))?;
        let mut argv = vec![
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            "-o",
            "APT::Keep-Downloaded-Packages=true",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            "--",
        ];
        argv.extend(packages.iter().map(String::as_str));
        tools::run("apt-get install", &mut chroot_cmd(root, &argv))?;
    }
    for dir in [
        "var/lib/apt/lists",
        "var/cache/apt/archives",
        "var/cache/apt",
    ] {
        let d = root.join(dir);
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}

/// `pip install --target` into `root/dir`, wheels only (no package code runs on the host).
fn pip_install(root: &Path, dir: &str, packages: &[String]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let python = tools::find("python3", "python3-pip")?;
    let target = inside(root, dir)?;
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "install", "--target"])
        .arg(&target)
        .args([
            "--only-binary=:all:",
            "--no-compile",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--quiet",
            "--",
        ])
        .args(packages);
    tools::run("pip install", &mut cmd)?;
    Ok(())
}

/// `npm install --prefix` into `root/dir` with install scripts off (no package code runs on
/// the host).
fn npm_install(root: &Path, dir: &str, packages: &[String]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let npm = tools::find("npm", "npm")?;
    let target = inside(root, dir)?;
    std::fs::create_dir_all(&target).ctx("create", &target)?;
    let mut cmd = Command::new(npm);
    cmd.arg("install")
        .arg("--prefix")
        .arg(&target)
        .args([
            "--ignore-scripts",
            "--omit=dev",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--",
        ])
        .args(packages);
    tools::run("npm install", &mut cmd)?;
    Ok(())
}

/// `root/dir` for an absolute in-image directory made of plain components under `/opt`.
fn inside(root: &Path, dir: &str) -> Result<PathBuf> {
    let rel = dir.strip_prefix("/opt/").unwrap_or("");
    let plain = !rel.is_empty()
        && rel.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        });
    if !plain {
        return Err(Error::Usage(format!(
            "install directory {dir:?} must be a plain path under /opt"
        )));
    }
    let opt = root.join("opt");
    if std::fs::symlink_metadata(&opt).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::Usage(
            "the image's /opt is a symbolic link: refusing to install through it".into(),
        ));
    }
    Ok(root.join(dir.trim_start_matches('/')))
}

fn apk(root: &Path, opts: &CreateOptions, suite: &str, mirror: &str) -> Result<Staged> {
    let bin = tools::find("apk", "apk-tools")?;
    let mut cmd = Command::new(bin);
    cmd.arg("--root")
        .arg(root)
        .args([
            "--initdb",
            "--arch",
            "x86_64",
            "--no-cache",
            "--allow-untrusted",
            "-U",
        ])
        .args([
            "-X",
            &format!("{mirror}/{suite}/main"),
            "-X",
            &format!("{mirror}/{suite}/community"),
        ])
        .arg("add")
        .arg("alpine-base")
        .args(&opts.packages);
    tools::run("apk", &mut cmd)?;
    Ok(Staged {
        kind: "apk".into(),
        reference: format!("alpine:{suite}@{mirror}"),
    })
}

fn post_install(root: &Path, script: &Path) -> Result<()> {
    let inside = root.join("tmp/infra-operator-post-install.sh");
    std::fs::create_dir_all(root.join("tmp")).ctx("create", root.join("tmp"))?;
    std::fs::copy(script, &inside).ctx("copy post-install script", script)?;
    let shell = if root.join("bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let result = {
        let _mounts = ChrootMounts::enter(root, None)?;
        tools::run(
            "post-install script",
            Command::new("chroot")
                .arg(root)
                .arg(shell)
                .arg("-e")
                .arg("/tmp/infra-operator-post-install.sh"),
        )
    };
    let _ = std::fs::remove_file(&inside);
    result.map(|_| ())
}

/// First Debian mirror in the host's apt sources (deb822 or one-line format).
pub fn host_debian_mirror() -> Option<String> {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_822 = deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|u| u.split_whitespace().next());
    if let Some(u) = from_822.filter(|u| !u.contains("security")) {
        return Some(u.trim_end_matches('/').to_string());
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines()
        .filter(|l| l.starts_with("deb "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("http")))
        .find(|u| !u.contains("security"))
        .map(|u| u.trim_end_matches('/').to_string())
}

/// Opens a TCP connection to the mirror's host, so an unreachable mirror fails in seconds with a
/// clear message instead of deep inside debootstrap.
fn check_reachable(url: &str) -> std::result::Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("'{url}' is not a URL"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let default_port = if scheme == "https" { 443 } else { 80 };
    let addr = if hostport.contains(':') && !hostport.starts_with('[') {
        hostport.to_string()
    } else {
        format!("{hostport}:{default_port}")
    };
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
        .collect();
    let mut last = String::from("no address");
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(mut s) => {
                if scheme == "http" {
                    // A proxying mirror may accept and then refuse; one request tells.
                    use std::io::Write;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = write!(s, "HEAD / HTTP/1.0\r\nHost: {hostport}\r\n\r\n");
                    let mut buf = [0u8; 12];
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n < 12 || !buf.starts_with(b"HTTP/") {
                        return Err(format!(
                            "{hostport} accepted a connection but did not answer HTTP"
                        ));
                    }
                }
                return Ok(());
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("cannot connect to {hostport}: {last}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_go_only_to_plain_directories_under_opt() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(
            inside(root.path(), "/opt/pypi/zig").unwrap(),
            root.path().join("opt/pypi/zig")
        );
        for bad in [
            "/opt/../etc",
            "/opt/pypi/../../etc",
            "/usr/lib",
            "/opt/",
            "/opt//x",
            "/opt/./x",
            "opt/x",
            "/opt/x y",
        ] {
            assert!(inside(root.path(), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_opt_link_in_the_image_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("opt")).unwrap();
        let e = inside(root.path(), "/opt/npm/bun").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn chroot_files_are_replaced_not_written_through_and_restored() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["etc", "usr/sbin", "proc"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        // A link planted at resolv.conf must not make the build write outside the root.
        let victim = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(victim.path(), "untouched").unwrap();
        std::os::unix::fs::symlink(victim.path(), r.join("etc/resolv.conf")).unwrap();
        if !nix::unistd::geteuid().is_root() {
            return; // mounting /proc needs root; the rest is covered by the root runs
        }
        {
            let _m = ChrootMounts::enter(r, None).unwrap();
            assert!(r.join("usr/sbin/policy-rc.d").is_file());
            assert!(!std::fs::symlink_metadata(r.join("etc/resolv.conf"))
                .unwrap()
                .file_type()
                .is_symlink());
        }
        assert_eq!(std::fs::read_to_string(victim.path()).unwrap(), "untouched");
        assert!(!r.join("usr/sbin/policy-rc.d").exists());
        assert!(!r.join("etc/resolv.conf").exists());
    }
}
