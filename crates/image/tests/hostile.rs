//! Hostile inputs to the image builder: outer archives read in place (links in them never
//! written anywhere), the unpacker's directory times, xattrs and opaque directories, and limits
//! that stop compression and sparse-file bombs with nothing left on disk. Each test here fails on
//! the builder as it was before these checks.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use infra_image::unpack::Unpacker;
use infra_image::{build, Error, NoProgress, UnpackLimits};

/// A `docker save` archive: `manifest.json`, the config and the layers as members.
fn docker_archive(
    extra: &[u8],
    layers: &[Vec<u8>],
    manifest_layers: Option<Vec<String>>,
) -> Vec<u8> {
    let img = TestImage::new(layers.to_vec());
    let (config, _, _) = img.blobs();
    let config_name = format!("{}.json", sha256_hex(&config));
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("l{i}/layer.tar"))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": ["hostile:1"],
        "Layers": manifest_layers.unwrap_or_else(|| names.clone()),
    }]))
    .unwrap();
    let mut body = extra.to_vec();
    body.extend(raw_tar_entry(
        "manifest.json",
        tar::EntryType::Regular,
        &manifest,
        None,
    ));
    body.extend(raw_tar_entry(
        &config_name,
        tar::EntryType::Regular,
        &config,
        None,
    ));
    for (n, l) in names.iter().zip(layers) {
        body.extend(raw_tar_entry(n, tar::EntryType::Regular, l, None));
    }
    tar_end(body)
}

fn archive_origin(path: &Path) -> infra_image::Origin {
    infra_image::Origin::Image {
        spec: infra_image::source::SourceSpec::DockerArchive(path.to_path_buf(), None),
        mode: infra_image::source::SourceMode::Auto,
    }
}

/// The attack that reached the host's root on the extracting reader: every link looks inside when
/// read as text, but `a` → `.` makes `a/a/…/x` land at the top, and `x` → `../../…` then climbs
/// to `/`, so a later member `x/tmp/NAME/pwned` was written to the host's /tmp as root.
#[tokio::test(flavor = "multi_thread")]
async fn docker_archive_symlink_chain_writes_nothing_outside() {
    let nonce = format!(
        "infra-escape-{}-{}",
        std::process::id(),
        sha256_hex(b"chain")
    );
    let host_target = Path::new("/tmp").join(&nonce);
    let _ = std::fs::remove_dir_all(&host_target);
    // Deeper than any work directory (tar's old header holds 100-byte names and link targets).
    let depth = 30;
    let deep = format!("{}x", "a/".repeat(depth));
    let up = "../".repeat(depth);
    let chain = [
        raw_tar_entry("a", tar::EntryType::Symlink, b"", Some(".")),
        raw_tar_entry(
            &deep,
            tar::EntryType::Symlink,
            b"",
            Some(up.trim_end_matches('/')),
        ),
        raw_tar_entry(
            &format!("x/tmp/{nonce}/pwned"),
            tar::EntryType::Regular,
            b"owned",
            None,
        ),
    ]
    .concat();
    let layer = tar(&[Item::File("hello", b"hi", 0o644)]);
    let home = tempfile::tempdir().unwrap();
    let archive = home.path().join("hostile.tar");
    std::fs::write(
        &archive,
        docker_archive(&chain, std::slice::from_ref(&layer), None),
    )
    .unwrap();
    let (paths, req) = request(home.path(), "chain", archive_origin(&archive));
    let r = build(&req, &paths, &NoProgress).await;
    let escaped = host_target.exists();
    let _ = std::fs::remove_dir_all(&host_target);
    assert!(!escaped, "the archive wrote {}", host_target.display());
    // The image itself is fine: its layer is read from inside the archive.
    let m = r.expect("the outer links are never followed, so the build succeeds");
    assert_eq!(m.source.kind, "docker-archive");
    assert_eq!(debugfs_cat(&req.output, "/hello"), b"hi");

    // A manifest that names a layer through a link climbing out of the archive is refused, by
    // name, inside the archive (nothing on disk is consulted).
    let up = raw_tar_entry("b/up", tar::EntryType::Symlink, b"", Some("../.."));
    std::fs::write(
        &archive,
        docker_archive(&up, &[layer], Some(vec!["b/up/etc/passwd".into()])),
    )
    .unwrap();
    let (paths, req) = request(home.path(), "chain2", archive_origin(&archive));
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::Archive { .. }), "{e:?}");
    assert!(e.to_string().contains("outside"), "{e}");
    assert!(!host_target.exists());
}

/// Layers in a `docker save` archive are read in place and verified: a layer member whose bytes
/// do not match the config's diff_id is refused.
#[tokio::test(flavor = "multi_thread")]
async fn docker_archive_layers_are_verified_in_place() {
    let layer = tar(&[Item::File("f", b"good", 0o644)]);
    let home = tempfile::tempdir().unwrap();
    let archive = home.path().join("img.tar");
    let mut bytes = docker_archive(&[], &[layer], None);
    // Flip one byte of the layer's file data ("good" → "gooe").
    let at = bytes.windows(4).rposition(|w| w == b"good").unwrap();
    bytes[at + 3] = b'e';
    std::fs::write(&archive, bytes).unwrap();
    let (paths, req) = request(home.path(), "flipped", archive_origin(&archive));
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
    assert!(!req.output.exists());
    assert!(entries(&paths.cache)
        .iter()
        .all(|e| !e.starts_with("build-")));
}

fn unpack(root: &Path, layers: &[Vec<u8>], limits: UnpackLimits) -> infra_image::Result<()> {
    let mut u = Unpacker::with_default_mtime(root, 0).with_limits(limits);
    for (i, l) in layers.iter().enumerate() {
        u.apply_layer(&l[..], &format!("layer{i}"), None)?;
    }
    u.finish()
}

/// A later layer turns a directory's parent into a symlink to a host directory: restoring the
/// recorded directory mtimes must not reach through it.
#[test]
fn directory_times_are_not_restored_through_a_later_symlink() {
    let host = tempfile::tempdir().unwrap();
    let victim = host.path().join("sub");
    std::fs::create_dir(&victim).unwrap();
    let before = std::fs::metadata(&victim).unwrap().mtime();
    let root = tempfile::tempdir().unwrap();
    let l1 = tar(&[Item::Dir("d", 0o755), Item::Dir("d/sub", 0o755)]);
    let l2 = tar(&[Item::Symlink("d", host.path().to_str().unwrap())]);
    unpack(root.path(), &[l1, l2], UnpackLimits::default()).unwrap();
    let after = std::fs::metadata(&victim).unwrap().mtime();
    assert_eq!(before, after, "host directory's mtime was changed");
    assert_ne!(after, 1_600_000_000);
}

#[test]
fn only_safe_xattrs_are_applied() {
    let root = tempfile::tempdir().unwrap();
    let l = tar(&[
        Item::Xattr("ok", b"1", "user.note", b"fine"),
        Item::Xattr(
            "cap",
            b"1",
            "security.capability",
            b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ),
        Item::Xattr("bad", b"1", "trusted.overlay.redirect", b"/etc"),
    ]);
    unpack(root.path(), &[l], UnpackLimits::default()).unwrap();
    assert_eq!(
        xattr::get(root.path().join("ok"), "user.note")
            .unwrap()
            .as_deref(),
        Some(&b"fine"[..])
    );
    assert!(xattr::get(root.path().join("cap"), "security.capability")
        .unwrap()
        .is_some());
    assert_eq!(
        xattr::get(root.path().join("bad"), "trusted.overlay.redirect").unwrap(),
        None,
        "trusted.* must be dropped"
    );
}

/// The opaque marker hides lower layers only, wherever it sits in the tar: entries of the same
/// layer written before it (even in a lower subdirectory) survive.
#[test]
fn opaque_marker_keeps_the_same_layers_entries_in_any_order() {
    let root = tempfile::tempdir().unwrap();
    let l1 = tar(&[
        Item::Dir("o", 0o755),
        Item::Dir("o/lower", 0o755),
        Item::File("o/lower/old", b"old", 0o644),
        Item::File("o/gone", b"old", 0o644),
    ]);
    let l2 = tar(&[
        Item::File("o/lower/new", b"new", 0o644),
        Item::File("o/.wh..wh..opq", b"", 0o644),
        Item::File("o/after", b"after", 0o644),
    ]);
    unpack(root.path(), &[l1, l2], UnpackLimits::default()).unwrap();
    let o = root.path().join("o");
    assert_eq!(std::fs::read(o.join("lower/new")).unwrap(), b"new");
    assert_eq!(std::fs::read(o.join("after")).unwrap(), b"after");
    assert!(
        !o.join("lower/old").exists(),
        "lower content of a kept dir is hidden"
    );
    assert!(!o.join("gone").exists());
}

/// A GNU sparse entry: `data` at offset `real_size - data.len()`, holes before it.
fn sparse_entry(name: &str, real_size: u64, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_mode(0o644);
    h.set_mtime(1_600_000_000);
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(data.len() as u64);
    {
        let g = h.as_gnu_mut().unwrap();
        let octal = |field: &mut [u8], v: u64| {
            let s = format!("{:0w$o}\0", v, w = field.len() - 1);
            field.copy_from_slice(s.as_bytes());
        };
        octal(&mut g.sparse[0].offset, real_size - data.len() as u64);
        octal(&mut g.sparse[0].numbytes, data.len() as u64);
        octal(&mut g.realsize, real_size);
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn sparse_entries_are_written_sparsely() {
    let root = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    let l = tar_end(sparse_entry("holes", size, &[9u8; 4096]));
    unpack(root.path(), &[l], UnpackLimits::default()).unwrap();
    let m = std::fs::metadata(root.path().join("holes")).unwrap();
    assert_eq!(m.len(), size);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} bytes allocated for a 256 MiB sparse file",
        m.blocks() * 512
    );
}

#[test]
fn bombs_stop_at_the_limits() {
    let small = UnpackLimits {
        max_layer_bytes: 8 << 20,
        max_image_bytes: 12 << 20,
        max_entries: 50,
        max_file_bytes: 1 << 30,
    };
    let limited = |e: Error, flag: &str| match e {
        Error::LimitExceeded { flag: f, .. } => assert_eq!(f, flag),
        other => panic!("expected the {flag} limit, got {other:?}"),
    };
    // Compression bomb: 64 MiB of zeros in a few KB of gzip.
    let root = tempfile::tempdir().unwrap();
    let bomb = gzip(&tar(&[Item::File("zeros", &vec![0u8; 64 << 20], 0o644)]));
    assert!(bomb.len() < 1 << 20);
    let roomy = UnpackLimits {
        max_image_bytes: 1 << 30,
        ..small
    };
    limited(
        unpack(root.path(), &[bomb], roomy).unwrap_err(),
        "--max-layer-size",
    );
    // Sparse bomb: a 4 GiB file from one block of data.
    let root = tempfile::tempdir().unwrap();
    let sparse = tar_end(sparse_entry("huge", 4 << 30, &[1u8; 512]));
    limited(
        unpack(root.path(), &[sparse], small).unwrap_err(),
        "--max-file-size",
    );
    assert!(!root.path().join("huge").exists());
    // Many entries.
    let root = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..60).map(|i| format!("f{i}")).collect();
    let many = tar(&names
        .iter()
        .map(|n| Item::File(n.as_str(), b"x", 0o644))
        .collect::<Vec<_>>());
    limited(
        unpack(root.path(), &[many], small).unwrap_err(),
        "--max-entries",
    );
    // The image total over several layers, each under the layer limit.
    let root = tempfile::tempdir().unwrap();
    let five = vec![5u8; 5 << 20];
    let layers: Vec<Vec<u8>> = (0..3)
        .map(|i| tar(&[Item::File(&format!("big{i}"), &five, 0o644)]))
        .collect();
    limited(
        unpack(root.path(), &layers, small).unwrap_err(),
        "--max-image-size",
    );
}

/// A compression bomb through the whole build: a clear error, no image, no work directory.
#[tokio::test(flavor = "multi_thread")]
async fn a_bomb_build_leaves_nothing_on_disk() {
    let home = tempfile::tempdir().unwrap();
    let oci = home.path().join("oci");
    TestImage::new(vec![tar(&[Item::File(
        "zeros",
        &vec![0u8; 48 << 20],
        0o644,
    )])])
    .write_oci_dir(&oci, "v1");
    let (paths, mut req) = request(home.path(), "bomb", oci_origin(&oci, None));
    req.limits.max_layer_bytes = 16 << 20;
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { .. }), "{e:?}");
    assert!(e.to_string().contains("--max-layer-size"), "{e}");
    assert!(!req.output.exists());
    assert!(
        entries(&paths.images).is_empty(),
        "{:?}",
        entries(&paths.images)
    );
    assert!(
        entries(&paths.cache)
            .iter()
            .all(|e| !e.starts_with("build-")),
        "work directory left: {:?}",
        entries(&paths.cache)
    );
}

/// A config without diff_ids cannot be verified: refused, never skipped (registry and layouts).
#[tokio::test(flavor = "multi_thread")]
async fn configs_without_diff_ids_are_refused() {
    let reg = Registry::start();
    let layer = gzip(&tar(&[Item::File("f", b"x", 0o644)]));
    let config = serde_json::to_vec(&serde_json::json!({"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}})).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion":2,
        "mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":digest(&config),"size":config.len()},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":digest(&layer),"size":layer.len()}]}))
    .unwrap();
    let client = reqwest::Client::new();
    reg.push_blobs(&client, "t/noids", &[&layer, &config]).await;
    reg.push_manifest(
        &client,
        "t/noids",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let (paths, req) = request(
        home.path(),
        "noids",
        registry_origin(&format!("{}/t/noids:v1", reg.addr)),
    );
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("0 diff_ids"), "{chain}");
    assert!(!req.output.exists());
}

/// A cached registry blob is verified again when used: tampered, it is refused and dropped from
/// the cache, and the next build downloads it again.
#[tokio::test(flavor = "multi_thread")]
async fn cached_blobs_are_verified_before_use() {
    let reg = Registry::start();
    let img = TestImage::new(vec![tar(&[Item::File("f", &[4u8; 8192], 0o644)])]);
    reg.push("t/cached", "v1", &img).await;
    let (_, gz, _) = img.blobs();
    let home = tempfile::tempdir().unwrap();
    let origin = registry_origin(&format!("{}/t/cached:v1", reg.addr));
    let (paths, req) = request(home.path(), "first", origin.clone());
    build(&req, &paths, &NoProgress).await.unwrap();
    let cached = paths.blobs().join("sha256").join(sha256_hex(&gz[0]));
    let mut bytes = std::fs::read(&cached).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff; // same size, wrong content
    std::fs::write(&cached, &bytes).unwrap();
    let (paths, req) = request(home.path(), "second", origin.clone());
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
    assert!(!cached.exists(), "the bad blob is dropped from the cache");
    let (paths, req) = request(home.path(), "third", origin);
    build(&req, &paths, &NoProgress).await.unwrap();
    assert_eq!(std::fs::read(&cached).unwrap(), gz[0]);
}

/// A registry that sends more bytes than a layer's descriptor declares: the download stops at
/// the declared size (nothing is kept), whatever the body's length. Debian's docker-registry
/// never lies about sizes, so this is a stand-in speaking just enough of the distribution API.
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_cannot_send_more_than_the_descriptor_declares() {
    use std::io::{BufRead, BufReader, Write as _};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let layer = gzip(&tar(&[Item::File("f", &vec![7u8; 1 << 20], 0o644)]));
    let img = TestImage::new(vec![tar(&[Item::File("f", &vec![7u8; 1 << 20], 0o644)])]);
    let (config, _, _) = img.blobs();
    let declared = layer.len() / 2;
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion":2,
        "mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":digest(&config),"size":config.len()},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":digest(&layer),"size":declared}]}))
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent2 = sent.clone();
    let (m, c, l) = (manifest.clone(), config.clone(), layer.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (ctype, body): (&str, &[u8]) = if path.contains("/manifests/") {
                ("application/vnd.oci.image.manifest.v1+json", &m)
            } else if path.ends_with(&sha256_hex(&c)) {
                ("application/octet-stream", &c)
            } else if path.ends_with(&sha256_hex(&l)) {
                ("application/octet-stream", &l)
            } else {
                ("application/json", b"{}")
            };
            let mut s = stream;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nDocker-Content-Digest: {}\r\nConnection: close\r\n\r\n",
                body.len(),
                digest(body)
            );
            let _ = s.write_all(head.as_bytes());
            if !line.starts_with("HEAD") {
                if let Ok(()) = s.write_all(body) {
                    if body.len() == l.len() {
                        sent2.fetch_add(body.len() as u64, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
        }
    });
    let home = tempfile::tempdir().unwrap();
    let (paths, req) = request(
        home.path(),
        "liar",
        registry_origin(&format!("{addr}/t/liar:v1")),
    );
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    let chain = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(chain.contains("larger than the"), "{chain}");
    assert!(!req.output.exists());
    let cached = paths.blobs().join("sha256");
    let kept: Vec<_> = std::fs::read_dir(&cached)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "nothing kept in the blob cache: {kept:?}");
}
