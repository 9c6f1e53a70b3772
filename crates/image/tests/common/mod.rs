//! Test harness: real components on 127.0.0.1 (Debian's docker-registry, dockerd), layer and
//! image construction, and reading built images back with debugfs (no mounting).
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Fails (never skips) when a tool the suite needs is missing.
pub fn require(tool: &str, package: &str) -> PathBuf {
    infra_image::tools::find(tool, package)
        .unwrap_or_else(|e| panic!("{e} (run scripts/install-deps.sh)"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(b))
}

/// A tar entry for hand-made layers.
pub enum Item<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Owned(&'a str, &'a [u8], u32, u64, u64),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    CharDev(&'a str, u32, u32),
    Fifo(&'a str),
    Xattr(&'a str, &'a [u8], &'a str, &'a [u8]),
}

/// Builds an uncompressed tar from items (mtime 1_600_000_000 unless stated).
pub fn tar(items: &[Item<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for it in items {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match it {
            Item::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Item::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            Item::Owned(p, data, mode, uid, gid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            Item::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Item::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Item::CharDev(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Item::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Item::Xattr(p, data, key, value) => {
                let name = format!("SCHILY.xattr.{key}");
                b.append_pax_extensions([(name.as_str(), *value)]).unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Writes a raw tar entry with an arbitrary (even hostile) name, bypassing the tar crate's checks.
pub fn raw_tar_entry(name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    {
        let bytes = h.as_old_mut();
        bytes.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            bytes.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Ends a hand-assembled tar stream.
pub fn tar_end(mut body: Vec<u8>) -> Vec<u8> {
    body.extend_from_slice(&[0u8; 1024]);
    body
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// An image made of layer tars (uncompressed), with its config.
pub struct TestImage {
    pub layers_tar: Vec<Vec<u8>>,
    pub config_env: Vec<String>,
    pub arch: String,
}

impl TestImage {
    pub fn new(layers_tar: Vec<Vec<u8>>) -> Self {
        Self {
            layers_tar,
            config_env: vec![
                "PATH=/usr/local/bin:/usr/bin:/bin".into(),
                "HELLO=world".into(),
            ],
            arch: "amd64".into(),
        }
    }

    /// (config bytes, [(gz layer bytes)], manifest bytes)
    pub fn blobs(&self) -> (Vec<u8>, Vec<Vec<u8>>, Vec<u8>) {
        let gz: Vec<Vec<u8>> = self.layers_tar.iter().map(|t| gzip(t)).collect();
        let diff_ids: Vec<String> = self.layers_tar.iter().map(|t| digest(t)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": self.arch, "os": "linux",
            "config": {"Env": self.config_env, "WorkingDir": "/app", "Cmd": ["/bin/sh"], "User": "0"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
            "layers": gz.iter().map(|l| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(l), "size": l.len()
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        (config, gz, manifest)
    }

    /// Writes an OCI image layout directory with one tagged manifest.
    pub fn write_oci_dir(&self, dir: &Path, tag: &str) {
        let (config, gz, manifest) = self.blobs();
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for b in gz.iter().chain([&config, &manifest]) {
            std::fs::write(blobs.join(sha256_hex(b)), b).unwrap();
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(&manifest),
            "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}]});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

/// Debian's docker-registry on a free loopback port, stopped on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bin = require("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        wait_for_port(&addr, Duration::from_secs(20));
        Registry {
            child,
            addr,
            _dir: dir,
        }
    }

    async fn push_blob(&self, client: &reqwest::Client, repo: &str, data: &[u8]) {
        let r = client
            .post(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "start upload");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let url = if loc.starts_with("http") {
            loc
        } else {
            format!("http://{}{loc}", self.addr)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let r = client
            .put(format!("{url}{sep}digest={}", digest(data)))
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "finish upload");
    }

    pub async fn push_blobs(&self, client: &reqwest::Client, repo: &str, blobs: &[&[u8]]) {
        for b in blobs {
            self.push_blob(client, repo, b).await;
        }
    }

    pub async fn push_manifest(
        &self,
        client: &reqwest::Client,
        repo: &str,
        tag: &str,
        media: &str,
        body: &[u8],
    ) {
        let r = client
            .put(format!("http://{}/v2/{repo}/manifests/{tag}", self.addr))
            .header("content-type", media)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "push manifest: {}", r.status());
    }

    /// Pushes an image; returns the manifest bytes.
    pub async fn push(&self, repo: &str, tag: &str, img: &TestImage) -> Vec<u8> {
        let client = reqwest::Client::new();
        let (config, gz, manifest) = img.blobs();
        for b in gz.iter().chain([&config]) {
            self.push_blob(&client, repo, b).await;
        }
        self.push_manifest(
            &client,
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        )
        .await;
        manifest
    }

    /// Pushes several single-platform images under one index tag.
    pub async fn push_index(&self, repo: &str, tag: &str, images: &[(&str, &TestImage)]) {
        let client = reqwest::Client::new();
        let mut entries = Vec::new();
        for (arch, img) in images {
            let m = self.push(repo, &format!("{tag}-{arch}"), img).await;
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(&m), "size": m.len(),
                "platform": {"os": "linux", "architecture": arch}}));
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries})).unwrap();
        self.push_manifest(
            &client,
            repo,
            tag,
            "application/vnd.oci.image.index.v1+json",
            &index,
        )
        .await;
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_port(addr: &str, timeout: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < timeout,
            "{addr} did not come up within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What debugfs says about one path in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub ino: u64,
}

/// Lists every path in an ext4 image (BFS, one debugfs process per directory level).
pub fn debugfs_tree(image: &Path) -> BTreeMap<String, Node> {
    let debugfs = require("debugfs", "e2fsprogs");
    let mut out = BTreeMap::new();
    let mut level = vec![String::from("/")];
    while !level.is_empty() {
        let script: String = level.iter().map(|d| format!("ls -p \"{d}\"\n")).collect();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), script).unwrap();
        let o = Command::new(&debugfs)
            .arg("-f")
            .arg(f.path())
            .arg(image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let mut next = Vec::new();
        let mut cur = String::new();
        for line in text.lines() {
            if let Some(cmd) = line.strip_prefix("debugfs: ls -p \"") {
                cur = cmd.trim_end_matches('"').to_string();
                continue;
            }
            // /ino/mode/uid/gid/name/size/
            let parts: Vec<&str> = line.split('/').collect();
            if parts.len() < 7 {
                continue;
            }
            let name = parts[5..parts.len() - 2].join("/");
            if name == "." || name == ".." || name.is_empty() {
                continue;
            }
            let mode = u32::from_str_radix(parts[2], 8).unwrap();
            let path = if cur == "/" {
                format!("/{name}")
            } else {
                format!("{cur}/{name}")
            };
            let node = Node {
                ino: parts[1].parse().unwrap(),
                mode,
                uid: parts[3].parse().unwrap(),
                gid: parts[4].parse().unwrap(),
                size: parts[parts.len() - 2].parse().unwrap_or(0),
            };
            if mode & 0o170000 == 0o040000 {
                next.push(path.clone());
            }
            out.insert(path, node);
        }
        level = next;
    }
    out
}

/// Content of one file in the image.
pub fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    let o = Command::new(require("debugfs", "e2fsprogs"))
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(image)
        .output()
        .unwrap();
    o.stdout
}

/// Symlink target via `stat`.
pub fn debugfs_stat(image: &Path, path: &str) -> String {
    let o = Command::new(require("debugfs", "e2fsprogs"))
        .arg("-R")
        .arg(format!("stat \"{path}\""))
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn e2fsck_clean(image: &Path) {
    let o = Command::new(require("e2fsck", "e2fsprogs"))
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A fresh paths layout under a temp dir, plus a build request for `origin`.
pub fn request(
    home: &Path,
    name: &str,
    origin: infra_image::Origin,
) -> (infra_config::Paths, infra_image::BuildRequest) {
    let paths = infra_config::Paths::under(home);
    let req = infra_image::BuildRequest {
        name: name.into(),
        language: Some("bash".into()),
        languages: Vec::new(),
        origin,
        size: infra_image::ext4::SizeSpec::Auto { headroom_pct: 10 },
        output: paths.image(name),
        platform: "linux/amd64".into(),
        insecure: false,
        agent: agent_binary(),
        limits: infra_image::UnpackLimits::default(),
    };
    (paths, req)
}

/// The static agent to inject: the test binary itself is linked statically like the CLI.
pub fn agent_binary() -> PathBuf {
    std::env::current_exe().unwrap()
}

pub fn registry_origin(reference: &str) -> infra_image::Origin {
    infra_image::Origin::Image {
        spec: infra_image::source::SourceSpec::Registry(reference.into()),
        mode: infra_image::source::SourceMode::Registry,
    }
}

pub fn oci_origin(dir: &Path, tag: Option<&str>) -> infra_image::Origin {
    infra_image::Origin::Image {
        spec: infra_image::source::SourceSpec::OciDir(dir.into(), tag.map(String::from)),
        mode: infra_image::source::SourceMode::Auto,
    }
}

/// Lists files left in a directory (for "nothing left behind" checks).
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
