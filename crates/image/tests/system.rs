//! Builds from the real system components: dockerd (daemon export and `docker save` archives)
//! and debootstrap (a minimal Debian compared file by file, and `rootfs create --lang python`).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use infra_image::debootstrap::{Base, CreateOptions};
use infra_image::source::{SourceMode, SourceSpec};
use infra_image::{build, NoProgress, Origin};

/// Paths our injection writes or changes; everything else must match the source exactly.
const INJECTED: &[&str] = &[
    "/usr/local/bin/infra.operator",
    "/etc/systemd/system/infra.operator.service",
    "/etc/systemd/system/multi-user.target.wants/infra.operator.service",
    "/etc/init.d/S99guest",
    "/etc/infra-operator",
    "/etc/infra-operator/image.json",
    "/lost+found",
];

fn shared_cache() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("infra-image-cache");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A debootstrap'd minimal Debian, made once and reused by later runs.
fn minimal_debian() -> PathBuf {
    let root = shared_cache().join("bookworm-minbase");
    if root.join(".complete").exists() {
        return root;
    }
    let _ = std::fs::remove_dir_all(&root);
    let debootstrap = require("debootstrap", "debootstrap");
    let mirror = infra_image::debootstrap::host_debian_mirror()
        .unwrap_or_else(|| "http://deb.debian.org/debian".into());
    let cache = shared_cache().join("debs");
    std::fs::create_dir_all(&cache).unwrap();
    let st = Command::new(debootstrap)
        .arg("--variant=minbase")
        .arg(format!("--cache-dir={}", cache.display()))
        .args(["bookworm"])
        .arg(&root)
        .arg(&mirror)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "debootstrap failed");
    std::fs::write(root.join(".complete"), b"").unwrap();
    root
}

#[derive(Debug, PartialEq, Eq)]
struct SrcNode {
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
}

/// Every path of a host tree with the attributes ext4 must keep.
fn host_tree(root: &Path) -> BTreeMap<String, SrcNode> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = format!("/{}", e.path().strip_prefix(root).unwrap().display());
            if rel == "/.complete" {
                continue;
            }
            if m.is_dir() {
                stack.push(e.path());
            }
            let size = (m.is_file() || m.file_type().is_symlink()).then_some(m.len());
            out.insert(
                rel,
                SrcNode {
                    mode: m.mode(),
                    uid: m.uid(),
                    gid: m.gid(),
                    size,
                },
            );
        }
    }
    out
}

fn compare_with_source(image: &Path, src: &Path, extra_allowed: &[&str]) {
    let built = debugfs_tree(image);
    let source = host_tree(src);
    let allowed = |p: &str| {
        INJECTED
            .iter()
            .chain(extra_allowed)
            .any(|a| p == *a || p.starts_with(&format!("{a}/")))
    };
    for (path, s) in &source {
        if allowed(path) {
            continue;
        }
        let b = built
            .get(path)
            .unwrap_or_else(|| panic!("{path} is missing from the image"));
        assert_eq!(
            (b.mode, b.uid, b.gid),
            (s.mode, s.uid, s.gid),
            "{path}: mode/uid/gid"
        );
        if let Some(size) = s.size {
            assert_eq!(b.size, size, "{path}: size");
        }
    }
    for path in built.keys() {
        assert!(
            source.contains_key(path) || allowed(path),
            "{path} is in the image but not in the source"
        );
    }
    // Content: dump the whole image with debugfs and hash every regular file.
    let dump = tempfile::tempdir().unwrap();
    let st = Command::new(require("debugfs", "e2fsprogs"))
        .arg("-R")
        .arg(format!("rdump / {}", dump.path().display()))
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let mut checked = 0;
    for (path, s) in &source {
        if allowed(path) || s.mode & 0o170000 != 0o100000 {
            continue;
        }
        let a = std::fs::read(src.join(&path[1..])).unwrap();
        let b =
            std::fs::read(dump.path().join(&path[1..])).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(a == b, "{path}: content differs");
        checked += 1;
    }
    assert!(checked > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn minimal_debian_through_registry_matches_the_source_tree() {
    let root = minimal_debian();
    let work = tempfile::tempdir().unwrap();
    let layer = work.path().join("layer.tar");
    let st = Command::new("tar")
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--exclude=./.complete",
            "-cf",
        ])
        .arg(&layer)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let reg = Registry::start();
    let img = TestImage::new(vec![std::fs::read(&layer).unwrap()]);
    reg.push("debian/minbase", "bookworm", &img).await;
    let (paths, req) = request(
        work.path(),
        "debian",
        registry_origin(&format!("{}/debian/minbase:bookworm", reg.addr)),
    );
    let m = build(&req, &paths, &NoProgress).await.unwrap();
    e2fsck_clean(&req.output);
    compare_with_source(&req.output, &root, &["/etc/profile.d/bash.sh"]);
    assert!(
        m.size_bytes as f64 <= m.used_bytes as f64 * 1.25,
        "auto size stays close to use: {m:?}"
    );
}

/// dockerd from Debian's docker.io, on private sockets and directories, stopped on drop.
struct Dockerd {
    child: std::process::Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dockerd {
    fn start() -> Self {
        let bin = require("dockerd", "docker.io");
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let child = Command::new(bin)
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ])
            .arg(format!("--host=unix://{}", sock.display()))
            .arg(format!("--data-root={}", dir.path().join("data").display()))
            .arg(format!("--exec-root={}", dir.path().join("exec").display()))
            .arg(format!(
                "--pidfile={}",
                dir.path().join("docker.pid").display()
            ))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        loop {
            let ok = Command::new("docker")
                .arg(format!("--host=unix://{}", sock.display()))
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dockerd did not start: {}",
                std::fs::read_to_string(dir.path().join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        Dockerd {
            child,
            sock,
            _dir: dir,
        }
    }

    fn docker(&self, args: &[&str], stdin: Option<&Path>) {
        let mut c = Command::new(require("docker", "docker.io"));
        c.arg(format!("--host=unix://{}", self.sock.display()))
            .args(args);
        if let Some(p) = stdin {
            c.stdin(std::fs::File::open(p).unwrap());
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_daemon_export_and_docker_save_archive() {
    let daemon = Dockerd::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let layer = tar(&[
        Item::Dir("bin", 0o755),
        Item::Owned("bin/su-like", b"setuid", 0o4755, 0, 0),
        Item::Owned("home-file", b"user", 0o640, 1000, 1000),
        Item::Symlink("link", "bin/su-like"),
        Item::File("data", &[9u8; 10_000], 0o644),
    ]);
    let tarball = work.path().join("rootfs.tar");
    std::fs::write(&tarball, &layer).unwrap();
    daemon.docker(
        &[
            "import",
            "--change",
            "ENV FOO=bar",
            "--change",
            "WORKDIR /work",
            "-",
            "local/imported:1",
        ],
        Some(&tarball),
    );

    // SAFETY of the env change: this test is the only one in this binary that uses DOCKER_HOST.
    std::env::set_var("DOCKER_HOST", format!("unix://{}", daemon.sock.display()));
    let origin = Origin::Image {
        spec: SourceSpec::Daemon("local/imported:1".into()),
        mode: SourceMode::Docker,
    };
    let (paths, req) = request(work.path(), "daemon", origin);
    let m = build(&req, &paths, &NoProgress).await.unwrap();
    e2fsck_clean(&req.output);
    assert_eq!(m.source.kind, "docker-daemon");
    assert!(
        m.config.env.contains(&"FOO=bar".to_string()),
        "{:?}",
        m.config
    );
    assert_eq!(m.config.working_dir, "/work");
    let t = debugfs_tree(&req.output);
    assert_eq!(t["/bin/su-like"].mode, 0o104755);
    assert_eq!(
        (t["/home-file"].uid, t["/home-file"].mode),
        (1000, 0o100640)
    );
    assert_eq!(t["/link"].mode & 0o170000, 0o120000);
    assert!(!t.contains_key("/.dockerenv"));
    assert_eq!(debugfs_cat(&req.output, "/data"), vec![9u8; 10_000]);

    // Auto mode finds the image in the daemon without --source.
    let auto = Origin::Image {
        spec: SourceSpec::Registry("local/imported:1".into()),
        mode: SourceMode::Auto,
    };
    let (paths2, mut req2) = request(work.path(), "auto", auto);
    req2.output = work.path().join("auto.ext4");
    assert_eq!(
        build(&req2, &paths2, &NoProgress)
            .await
            .unwrap()
            .source
            .kind,
        "docker-daemon"
    );

    // `docker save` → docker-archive:
    let saved = work.path().join("saved.tar");
    daemon.docker(
        &["save", "-o", saved.to_str().unwrap(), "local/imported:1"],
        None,
    );
    std::env::remove_var("DOCKER_HOST");
    drop(daemon);
    let origin = Origin::Image {
        spec: SourceSpec::DockerArchive(saved, None),
        mode: SourceMode::Auto,
    };
    let (paths3, mut req3) = request(work.path(), "archive", origin);
    req3.output = work.path().join("archive.ext4");
    let m = build(&req3, &paths3, &NoProgress).await.unwrap();
    assert!(m.config.env.contains(&"FOO=bar".to_string()));
    let t = debugfs_tree(&req3.output);
    assert_eq!(t["/bin/su-like"].mode, 0o104755);
    assert_eq!(debugfs_cat(&req3.output, "/data"), vec![9u8; 10_000]);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_python_on_debian_installs_the_language_and_agent() {
    let work = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        base: Base::Debian,
        suite: None,
        mirror: None,
        packages: vec![],
        pip: Vec::new(),
        npm: Vec::new(),
        post_install: Some({
            let p = work.path().join("post.sh");
            std::fs::write(&p, "echo post-install-ran > /etc/post-install-marker\n").unwrap();
            p
        }),
        cache_dir: shared_cache(),
    };
    let (paths, mut req) = request(work.path(), "python", Origin::Distro(opts));
    req.language = Some("python".into());
    let m = build(&req, &paths, &NoProgress).await.unwrap();
    e2fsck_clean(&req.output);
    assert_eq!(m.source.kind, "debootstrap");
    let t = debugfs_tree(&req.output);
    assert!(
        t.keys().any(|k| k.starts_with("/usr/bin/python3")),
        "python3 installed"
    );
    assert!(t.contains_key("/usr/local/bin/infra.operator"));
    assert!(t.contains_key("/etc/systemd/system/infra.operator.service"));
    assert!(t.contains_key("/etc/init.d/S99guest"));
    let profile = String::from_utf8(debugfs_cat(&req.output, "/etc/profile.d/python.sh")).unwrap();
    assert!(profile.contains("PYTHONUNBUFFERED"));
    assert_eq!(
        debugfs_cat(&req.output, "/etc/post-install-marker"),
        b"post-install-ran\n"
    );
    assert!(
        !t.keys()
            .any(|k| k.starts_with("/var/cache/apt/archives/") && k.ends_with(".deb")),
        "no package cache left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_alpine_mirror_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        base: Base::Alpine,
        suite: None,
        mirror: Some(format!("http://127.0.0.1:{}/alpine", free_port())),
        packages: vec![],
        pip: Vec::new(),
        npm: Vec::new(),
        post_install: None,
        cache_dir: shared_cache(),
    };
    let (paths, mut req) = request(work.path(), "alpine", Origin::Distro(opts));
    req.language = Some("bash".into());
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(
        matches!(e, infra_image::Error::MirrorUnreachable { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("not reachable"), "{e}");
}
