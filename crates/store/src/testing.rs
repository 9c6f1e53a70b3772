//! Test support (feature `testing`): a throw-away single-node Garage on 127.0.0.1 and a
//! failure-injecting store wrapper.
//!
//! [`Garage::start`] writes a one-node config in a temp dir (sqlite metadata,
//! `replication_factor = 1`, `s3_region = "garage"`, S3/RPC/admin on free ports), starts the
//! server, assigns and applies the layout, creates a key, and waits until a signed S3 request
//! succeeds. Dropping it kills the server and deletes the directory. When the `garage` binary is
//! missing, `start` panics with how to install it: tests must fail, not skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::object::{
    BackendKind, Body, GetOptions, GetResponse, InitOptions, InitStep, ListPage, Metadata,
    ObjectInfo, ObjectStore, PartInfo, PutResult, VersionInfo,
};
use crate::{Error, Result, S3Settings, S3Store};

/// Region Garage is configured with; clients must sign with it.
pub const GARAGE_REGION: &str = "garage";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds the garage binary: `$GARAGE_BIN`, `~/.cargo/bin/garage`, then `PATH`.
pub fn garage_binary() -> Option<PathBuf> {
    let mut cands = Vec::new();
    if let Some(b) = std::env::var_os("GARAGE_BIN") {
        cands.push(PathBuf::from(b));
    }
    if let Some(h) = std::env::var_os("HOME") {
        cands.push(PathBuf::from(h).join(".cargo/bin/garage"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        cands.extend(std::env::split_paths(&path).map(|p| p.join("garage")));
    }
    cands.into_iter().find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes * 2 {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(bytes * 2);
    s
}

/// A running single-node Garage.
#[derive(Debug)]
pub struct Garage {
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    /// S3 API port on 127.0.0.1.
    pub s3_port: u16,
    /// Access key id of the test key.
    pub key_id: String,
    /// Secret of the test key.
    pub secret: String,
}

impl Garage {
    /// Starts a fresh Garage. Panics (with the install command) when the binary is missing.
    pub async fn start() -> Self {
        let bin = garage_binary().unwrap_or_else(|| {
            panic!(
                "the garage binary is needed for the S3 tests and was not found (GARAGE_BIN, \
                 ~/.cargo/bin/garage, PATH): install it with `cargo install garage --locked` \
                 (scripts/install-deps.sh does)"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("garage-test-")
            .tempdir()
            .expect("temp dir");
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let root = dir.path();
        std::fs::create_dir_all(root.join("meta")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        let token = random_hex(32);
        let conf = format!(
            r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{GARAGE_REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
metrics_token = "{token}"
"#,
            root = root.display(),
            secret = random_hex(32),
        );
        std::fs::write(root.join("garage.toml"), conf).unwrap();
        let mut g = Garage {
            dir,
            bin,
            child: None,
            s3_port: s3,
            key_id: String::new(),
            secret: String::new(),
        };
        g.spawn();
        g.wait_cli("garage status", &["status"]).await;
        let node = g.cli_ok(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap_or("").to_string();
        g.cli_ok(&["layout", "assign", "-z", "dc1", "-c", "10G", &node]);
        g.cli_ok(&["layout", "apply", "--version", "1"]);
        g.cli_ok(&["key", "create", "test-key"]);
        g.key_id = g
            .cli_ok(&["key", "info", "--key-id", "test-key"])
            .trim()
            .to_string();
        g.secret = g
            .cli_ok(&["key", "info", "--secret-key", "test-key"])
            .trim()
            .to_string();
        g.cli_ok(&["key", "allow", "--create-bucket", "test-key"]);
        g.create_bucket("ready-probe").await;
        g.wait_ready().await;
        g
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    /// The work directory (config, data, `garage.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .expect("garage.log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.conf())
            .arg("server")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start garage");
        self.child = Some(child);
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run garage cli")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn wait_cli(&mut self, what: &str, args: &[&str]) {
        let t0 = Instant::now();
        loop {
            if self.cli(args).status.success() {
                return;
            }
            self.check_alive(what);
            assert!(
                t0.elapsed() < READY_TIMEOUT,
                "timeout waiting for {what}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_alive(&mut self, what: &str) {
        if let Some(c) = &mut self.child {
            if let Ok(Some(st)) = c.try_wait() {
                panic!(
                    "garage exited ({st}) while waiting for {what}\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// Last lines of the server log (for assertion messages).
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The whole server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// Waits until a signed request succeeds.
    async fn wait_ready(&mut self) {
        let store = self.store("ready-probe", "").await;
        let t0 = Instant::now();
        loop {
            match store.list("").await {
                Ok(_) => return,
                Err(e) => {
                    self.check_alive("a signed S3 request");
                    assert!(
                        t0.elapsed() < READY_TIMEOUT,
                        "garage did not answer a signed request: {e}\n{}",
                        self.log_tail()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a bucket the test key may read, write and own.
    pub async fn create_bucket(&self, name: &str) {
        self.cli_ok(&["bucket", "create", name]);
        self.cli_ok(&[
            "bucket", "allow", "--read", "--write", "--owner", name, "--key", "test-key",
        ]);
    }

    /// Settings reaching `bucket` under `prefix` with the test key.
    pub fn settings(&self, bucket: &str, prefix: &str) -> S3Settings {
        S3Settings {
            region: Some(GARAGE_REGION.into()),
            endpoint: Some(self.endpoint()),
            static_credentials: Some((self.key_id.clone(), self.secret.clone(), None)),
            max_attempts: 2,
            ..S3Settings::new(bucket, prefix)
        }
    }

    /// A client for `bucket` under `prefix`.
    pub async fn store(&self, bucket: &str, prefix: &str) -> S3Store {
        S3Store::connect(&self.settings(bucket, prefix))
            .await
            .expect("client")
    }

    /// Environment for `aws`/`s5cmd`/our binary pointing at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
            ("AWS_REGION".into(), GARAGE_REGION.into()),
            ("AWS_DEFAULT_REGION".into(), GARAGE_REGION.into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("S3_ENDPOINT_URL".into(), self.endpoint()),
        ]
    }

    /// Process id of the server, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the server (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data and ports, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_cli("garage status", &["status"]).await;
        self.wait_ready().await;
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What [`FaultyStore`] breaks.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail `upload_part` once this many parts succeeded (`u64::MAX`: never).
    pub fail_parts_after: AtomicU64,
    /// Fail a GET body once this many bytes were read through all GETs (`u64::MAX`: never).
    pub fail_get_after_bytes: AtomicU64,
    /// Flip a byte of every GET body chunk (corruption in transit).
    pub corrupt_gets: std::sync::atomic::AtomicBool,
    parts_ok: AtomicU64,
    bytes_read: Arc<AtomicU64>,
    /// Number of `upload_part` calls seen.
    pub part_calls: AtomicUsize,
    /// Number of `get` calls seen.
    pub get_calls: AtomicUsize,
    /// Number of `list` calls seen.
    pub list_calls: AtomicUsize,
    /// Number of `head` calls seen.
    pub head_calls: AtomicUsize,
    /// Number of writes seen (`put`, `create_multipart`, `delete`).
    pub write_calls: AtomicUsize,
    /// Bytes handed to `upload_part` (counted when the call is made).
    pub part_bytes: AtomicU64,
    /// Fail every `copy`.
    pub fail_copies: std::sync::atomic::AtomicBool,
    /// Keys whose `head` fails.
    pub fail_heads: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Keys whose `head` never answers (the caller's timeout decides).
    pub stall_heads: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Faults {
    /// No faults.
    pub fn none() -> Arc<Self> {
        let f = Self::default();
        f.fail_parts_after.store(u64::MAX, Ordering::SeqCst);
        f.fail_get_after_bytes.store(u64::MAX, Ordering::SeqCst);
        Arc::new(f)
    }
}

/// Wraps a store and injects failures.
#[derive(Debug, Clone)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    /// The faults (shared: change them while a transfer runs).
    pub faults: Arc<Faults>,
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }

    fn injected(&self, op: &'static str, key: &str) -> Error {
        Error::Unreachable {
            endpoint: format!("{} (fault injected in {op})", self.inner.describe()),
            source: std::io::Error::other(format!("injected failure for {key}")).into(),
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn url_of(&self, key: &str) -> String {
        self.inner.url_of(key)
    }
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.faults.list_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.list(prefix).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: &str,
        token: Option<&str>,
        max_keys: Option<i32>,
    ) -> Result<ListPage> {
        self.faults.list_calls.fetch_add(1, Ordering::SeqCst);
        self.inner
            .list_page(prefix, delimiter, token, max_keys)
            .await
    }
    async fn copy(&self, from: &str, to: &str, metadata: Option<&Metadata>) -> Result<PutResult> {
        self.faults.write_calls.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_copies.load(Ordering::SeqCst) {
            return Err(self.injected("CopyObject", to));
        }
        self.inner.copy(from, to, metadata).await
    }
    async fn head(&self, key: &str, version_id: Option<&str>) -> Result<ObjectInfo> {
        self.faults.head_calls.fetch_add(1, Ordering::SeqCst);
        let lock = |m: &std::sync::Mutex<std::collections::HashSet<String>>| {
            m.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
        };
        if lock(&self.faults.stall_heads) {
            std::future::pending::<()>().await;
        }
        if lock(&self.faults.fail_heads) {
            return Err(self.injected("HeadObject", key));
        }
        self.inner.head(key, version_id).await
    }
    async fn get(&self, key: &str, opts: &GetOptions) -> Result<GetResponse> {
        use futures::StreamExt;
        self.faults.get_calls.fetch_add(1, Ordering::SeqCst);
        let resp = self.inner.get(key, opts).await?;
        let limit = self.faults.fail_get_after_bytes.load(Ordering::SeqCst);
        let corrupt = self.faults.corrupt_gets.load(Ordering::SeqCst);
        let counter = self.faults.bytes_read.clone();
        let err = self.injected("GetObject body", key);
        let mut err = Some(err);
        let body = resp.body.map(move |chunk| {
            let chunk = chunk?;
            let before = counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            if before + chunk.len() as u64 > limit {
                return Err(err.take().unwrap_or(Error::Changed {
                    target: "injected".into(),
                }));
            }
            if corrupt && !chunk.is_empty() {
                let mut v = chunk.to_vec();
                v[0] ^= 0xff;
                return Ok(bytes::Bytes::from(v));
            }
            Ok(chunk)
        });
        Ok(GetResponse {
            info: resp.info,
            body: body.boxed(),
        })
    }
    async fn put(&self, key: &str, body: Body, metadata: &Metadata) -> Result<PutResult> {
        self.faults.write_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.put(key, body, metadata).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.faults.write_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.delete(key).await
    }
    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> Result<String> {
        self.faults.write_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.create_multipart(key, metadata).await
    }
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Body,
    ) -> Result<PartInfo> {
        self.faults.part_calls.fetch_add(1, Ordering::SeqCst);
        self.faults
            .part_bytes
            .fetch_add(body.len(), Ordering::SeqCst);
        let limit = self.faults.fail_parts_after.load(Ordering::SeqCst);
        if self.faults.parts_ok.load(Ordering::SeqCst) >= limit {
            return Err(self.injected("UploadPart", key));
        }
        let r = self.inner.upload_part(key, upload_id, number, body).await?;
        self.faults.parts_ok.fetch_add(1, Ordering::SeqCst);
        Ok(r)
    }
    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>> {
        self.inner.list_parts(key, upload_id).await
    }
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartInfo],
    ) -> Result<PutResult> {
        self.inner.complete_multipart(key, upload_id, parts).await
    }
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.inner.abort_multipart(key, upload_id).await
    }
    async fn versions(&self, key: &str) -> Result<Vec<VersionInfo>> {
        self.inner.versions(key).await
    }
    async fn init(&self, opts: &InitOptions) -> Result<Vec<InitStep>> {
        self.inner.init(opts).await
    }
}
