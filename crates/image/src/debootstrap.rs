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
    /// Script run in the chroot after installation.
    pub post_install: Option<PathBuf>,
    /// Package download cache (kept between builds).
    pub cache_dir: PathBuf,
}

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

/// Installs the base system into `root` (an empty directory).
pub fn stage(root: &Path, opts: &CreateOptions) -> Result<Staged> {
    let suite = opts.suite();
    let mirror = opts.mirror();
    let what = match opts.base {
        Base::Debian => "Debian",
        Base::Ubuntu => "Ubuntu",
        Base::Alpine => "Alpine",
    };
    check_reachable(&mirror).map_err(|source| Error::MirrorUnreachable {
        what: what.into(),
        mirror: mirror.clone(),
        source: source.into(),
    })?;
    let staged = match opts.base {
        Base::Debian | Base::Ubuntu => debootstrap(root, opts, &suite, &mirror)?,
        Base::Alpine => apk(root, opts, &suite, &mirror)?,
    };
    if let Some(script) = &opts.post_install {
        post_install(root, script)?;
    }
    Ok(staged)
}

fn debootstrap(root: &Path, opts: &CreateOptions, suite: &str, mirror: &str) -> Result<Staged> {
    let bin = tools::find("debootstrap", "debootstrap")?;
    let cache = opts.cache_dir.join(format!("debootstrap-{suite}"));
    infra_config::ensure_dir(&cache, infra_config::PRIVATE_DIR)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--variant=minbase")
        .arg(format!("--cache-dir={}", cache.display()));
    if !opts.packages.is_empty() {
        cmd.arg(format!("--include={}", opts.packages.join(",")));
    }
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
    // Package lists and caches are not wanted in a read-only base image.
    for dir in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        let d = root.join(dir);
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    let name = if opts.base == Base::Ubuntu {
        "ubuntu"
    } else {
        "debian"
    };
    Ok(Staged {
        kind: "debootstrap".into(),
        reference: format!("{name}:{suite}@{mirror}"),
    })
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
    let shell = if root.join("bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let result = tools::run(
        "post-install script",
        Command::new("chroot")
            .arg(root)
            .arg(shell)
            .arg("-e")
            .arg("/tmp/infra-operator-post-install.sh"),
    );
    let _ = nix::mount::umount2(&proc_dir, nix::mount::MntFlags::MNT_DETACH);
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
