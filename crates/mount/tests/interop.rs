//! s3fs-fuse interop, both ways, on one Garage bucket (docs/mount-semantics.md,
//! "Compatibility with s3fs"), and several processes at once ("Concurrency").

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use infra_store::testing::{Garage, GARAGE_REGION};

/// An s3fs mount of `bucket`; unmounted on drop.
struct S3fs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3fs {
    fn start(g: &Garage, bucket: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("s3fs-test-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("mnt");
        fs::create_dir(&path).unwrap();
        let pw = dir.path().join("passwd");
        fs::write(&pw, format!("{}:{}\n", g.key_id, g.secret)).unwrap();
        fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
        let out = Command::new("s3fs")
            .arg(bucket)
            .arg(&path)
            .arg("-o")
            .arg(format!(
                "passwd_file={},url={},use_path_request_style,endpoint={GARAGE_REGION},\
                 max_stat_cache_size=0,dbglevel=warn",
                pw.display(),
                g.endpoint()
            ))
            .output()
            .expect("run s3fs");
        assert!(
            out.status.success(),
            "s3fs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // s3fs daemonizes before it is mounted: wait until it is.
        let t0 = std::time::Instant::now();
        while !fs::read_to_string("/proc/mounts")
            .unwrap()
            .contains(&format!(" {} fuse.s3fs", path.display()))
        {
            assert!(t0.elapsed().as_secs() < 30, "s3fs did not mount");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Self { path, _dir: dir }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.path)
            .status();
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn have_s3fs() -> bool {
    Command::new("s3fs").arg("--version").output().is_ok()
}

fn stat(p: &Path) -> (u32, u32, u32, i64, i64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode(), m.uid(), m.gid(), m.mtime(), m.mtime_nsec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3fs_interop_both_ways() {
    if !have_s3fs() {
        eprintln!(
            "SKIPPED s3fs_interop_both_ways: the s3fs binary is not installed \
             (scripts/install-deps.sh --tests installs Debian's s3fs)"
        );
        return;
    }
    let (g, s) = garage("interop").await;
    let theirs = S3fs::start(&g, "interop");
    let ours = TestMount::start(s.clone(), "ttl=0");

    // s3fs writes, we read.
    fs::write(theirs.p("f.txt"), b"from s3fs\n").unwrap();
    fs::set_permissions(theirs.p("f.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(theirs.p("f.txt"), Some(12), Some(34)).unwrap();
    // (s3fs 1.90 drops `touch -m` alone, atime omitted; setting both is stored.)
    sh(&format!(
        "touch -d @1700000000.5 '{}'",
        theirs.p("f.txt").display()
    ));
    fs::create_dir(theirs.p("d")).unwrap();
    fs::set_permissions(theirs.p("d"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(theirs.p("d/g"), b"nested").unwrap();
    std::os::unix::fs::symlink("f.txt", theirs.p("lnk")).unwrap();

    assert_eq!(fs::read(ours.p("f.txt")).unwrap(), b"from s3fs\n");
    let (mode, uid, gid, mtime, nsec) = stat(&ours.p("f.txt"));
    assert_eq!((mode, uid, gid), (0o100600, 12, 34));
    assert_eq!((mtime, nsec), (1700000000, 500_000_000));
    let (mode, ..) = stat(&ours.p("d"));
    assert_eq!(mode, 0o40750, "s3fs's directory mode");
    assert_eq!(fs::read(ours.p("d/g")).unwrap(), b"nested");
    assert_eq!(
        fs::read_link(ours.p("lnk")).unwrap().to_str(),
        Some("f.txt")
    );
    assert_eq!(fs::read(ours.p("lnk")).unwrap(), b"from s3fs\n");

    // We write, s3fs reads.
    fs::write(ours.p("ours.txt"), b"from infra.operator\n").unwrap();
    fs::set_permissions(ours.p("ours.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(ours.p("ours.txt"), Some(55), Some(66)).unwrap();
    sh(&format!(
        "touch -m -d @1600000000.25 '{}'",
        ours.p("ours.txt").display()
    ));
    fs::create_dir(ours.p("e")).unwrap();
    fs::set_permissions(ours.p("e"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(ours.p("e/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("ours.txt", ours.p("l2")).unwrap();
    fs::rename(ours.p("d/g"), ours.p("e/g-moved")).unwrap();

    assert_eq!(
        fs::read(theirs.p("ours.txt")).unwrap(),
        b"from infra.operator\n"
    );
    let (mode, uid, gid, mtime, nsec) = stat(&theirs.p("ours.txt"));
    assert_eq!((mode, uid, gid), (0o100640, 55, 66));
    assert_eq!((mtime, nsec), (1600000000, 250_000_000));
    let (mode, ..) = stat(&theirs.p("e"));
    assert_eq!(mode, 0o40700);
    assert_eq!(fs::read(theirs.p("e/inner")).unwrap(), b"inner");
    assert_eq!(fs::read(theirs.p("e/g-moved")).unwrap(), b"nested");
    assert_eq!(
        fs::read_link(theirs.p("l2")).unwrap().to_str(),
        Some("ours.txt")
    );
    let mut names: Vec<String> = fs::read_dir(&theirs.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "e", "f.txt", "l2", "lnk", "ours.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_processes_read_and_write() {
    let (_g, s) = garage("concurrency").await;
    let m = TestMount::start(s.clone(), "");
    let src = tempfile::tempdir().unwrap();
    // Bounded: 6 writer processes x 8 files x 256 KiB, 2 reader processes of a shared file.
    for i in 0..8u8 {
        fs::write(src.path().join(format!("s{i}")), pattern(256 << 10, i)).unwrap();
    }
    fs::write(m.p("shared"), pattern(4 << 20, 99)).unwrap();
    fs::write(src.path().join("shared"), pattern(4 << 20, 99)).unwrap();
    let mut kids = Vec::new();
    for w in 0..6 {
        let script = format!(
            "set -e; mkdir -p '{mnt}/w{w}'; for i in 0 1 2 3 4 5 6 7; do \
             cp '{src}/s'$i '{mnt}/w{w}/f'$i; done; for i in 0 1 2 3 4 5 6 7; do \
             cmp '{src}/s'$i '{mnt}/w{w}/f'$i; done",
            mnt = m.path.display(),
            src = src.path().display()
        );
        kids.push(
            Command::new("timeout")
                .args(["300", "sh", "-c", &script])
                .spawn()
                .unwrap(),
        );
    }
    for _ in 0..2 {
        let script = format!(
            "set -e; for i in 1 2 3; do cmp '{src}/shared' '{mnt}/shared'; done",
            mnt = m.path.display(),
            src = src.path().display()
        );
        kids.push(
            Command::new("timeout")
                .args(["300", "sh", "-c", &script])
                .spawn()
                .unwrap(),
        );
    }
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    for w in 0..6 {
        for i in 0..8u8 {
            assert_eq!(
                object(&s, &format!("w{w}/f{i}")).await,
                pattern(256 << 10, i),
                "w{w}/f{i}"
            );
        }
    }
}
