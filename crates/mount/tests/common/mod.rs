//! Test support: an in-process mount of a store on a temp directory (real FUSE), and a
//! Garage bucket to mount.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use infra_mount::{MountOptions, MountRequest, StoreSettings};
use infra_store::testing::Garage;
use infra_store::ObjectStore;

/// A mounted store; dropping it unmounts.
pub struct TestMount {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
    pub cache: tempfile::TempDir,
    thread: Option<std::thread::JoinHandle<Result<(), infra_mount::MountError>>>,
}

impl TestMount {
    /// Mounts `store` with `-o opts` and waits until the mount is live.
    pub fn start(store: Arc<dyn ObjectStore>, opts: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mount-test-")
            .tempdir()
            .unwrap();
        let cache = tempfile::Builder::new()
            .prefix("mount-cache-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let req = MountRequest {
            source: "s3://test".into(),
            mountpoint: path.clone(),
            options: MountOptions::parse([opts]).unwrap(),
        };
        let settings = StoreSettings {
            cache_dir: cache.path().to_path_buf(),
            part_size: 5 << 20,
            concurrency: 4,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            infra_mount::serve_store(store, &req, &settings, rt, move || {
                let _ = tx.send(());
            })
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let r = thread.join();
            panic!("the mount did not become ready: {r:?}");
        }
        Self {
            path,
            _dir: dir,
            cache,
            thread: Some(thread),
        }
    }

    /// A path inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Unmounts (every file must be closed) and waits for the session to end.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            match nix::mount::umount2(&self.path, nix::mount::MntFlags::empty()) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
                Err(e) => panic!("unmount failed ({e}): is a file still open?"),
            }
            let r = t.join().expect("mount thread panicked");
            r.expect("mount session failed");
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        // A failing test: abort the FUSE connection, then detach. Files of this process still
        // open on the mount would otherwise deadlock its exit (closing them waits for the
        // server, which is this process).
        if self.thread.take().is_some() {
            use std::os::unix::fs::MetadataExt;
            if let Ok(md) = fs::metadata(&self.path) {
                let minor = nix::sys::stat::minor(md.dev());
                let ctl = Path::new("/sys/fs/fuse/connections");
                if !ctl.join(minor.to_string()).exists() {
                    let _ = nix::mount::mount(
                        Some("fusectl"),
                        ctl,
                        Some("fusectl"),
                        nix::mount::MsFlags::empty(),
                        None::<&str>,
                    );
                }
                let _ = fs::write(ctl.join(minor.to_string()).join("abort"), "1");
            }
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Taken by tests whose assertions depend on when uploads happen. Starting a server forks
/// this process, and at exec the child closes the descriptors it inherited (close-on-exec):
/// each such close sends the kernel's FLUSH for files another test has open for writing,
/// which uploads them as any close does (docs/mount-semantics.md, "Writing").
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Garage with one bucket and a store on it.
pub async fn garage(bucket: &str) -> (Garage, Arc<dyn ObjectStore>) {
    let g = Garage::start().await;
    g.create_bucket(bucket).await;
    let s: Arc<dyn ObjectStore> = Arc::new(g.store(bucket, "").await);
    (g, s)
}

/// Deterministic bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e3779b9 ^ seed as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The whole object as the store has it.
pub async fn object(s: &Arc<dyn ObjectStore>, key: &str) -> Vec<u8> {
    use futures::StreamExt;
    let mut r = s.get(key, &Default::default()).await.unwrap().body;
    let mut v = Vec::new();
    while let Some(c) = r.next().await {
        v.extend_from_slice(&c.unwrap());
    }
    v
}

/// The errno of an I/O error.
pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Runs a shell command, panicking with its output on failure.
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}
