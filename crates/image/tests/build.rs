//! End-to-end builds against real components: Debian's docker-registry, OCI layouts, dockerd;
//! every image checked with e2fsck and read back with debugfs.

mod common;

use common::*;
use infra_image::{build, Error, NoProgress};

fn layered_image() -> TestImage {
    let base = tar(&[
        Item::Dir("bin", 0o755),
        Item::File("bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
        Item::Owned("bin/su-like", b"setuid", 0o4755, 0, 0),
        Item::Owned("bin/sg-like", b"setgid", 0o2711, 0, 50),
        Item::Dir("etc", 0o755),
        Item::File("etc/keep", b"keep me", 0o644),
        Item::File("etc/remove-me", b"gone in layer 2", 0o644),
        Item::Dir("opaque", 0o755),
        Item::File("opaque/old-a", b"a", 0o644),
        Item::File("opaque/old-b", b"b", 0o644),
        Item::Dir("home", 0o755),
        Item::Owned("home/user-file", b"owned by 1000", 0o640, 1000, 1000),
        Item::Dir("tmp", 0o1777),
        Item::Symlink("etc/link", "keep"),
        Item::Hardlink("etc/hard", "etc/keep"),
        Item::CharDev("etc/null-dev", 1, 3),
        Item::Fifo("etc/fifo"),
        Item::Xattr("etc/with-xattr", b"x", "user.test", b"value"),
        Item::File("replace-me", b"file becomes dir", 0o644),
    ]);
    let second = tar(&[
        Item::File("etc/.wh.remove-me", b"", 0o644),
        Item::Dir("opaque", 0o755),
        Item::File("opaque/.wh..wh..opq", b"", 0o644),
        Item::File("opaque/new", b"only me", 0o600),
        Item::Dir("replace-me", 0o700),
        Item::File("replace-me/inside", b"in", 0o644),
    ]);
    let third = tar(&[
        Item::Symlink("etc/link", "/etc/keep"),
        Item::File("etc/keep", b"changed", 0o600),
    ]);
    TestImage::new(vec![base, second, third])
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_build_applies_layers_with_whiteouts_and_metadata() {
    let reg = Registry::start();
    reg.push("test/layers", "v1", &layered_image()).await;
    let home = tempfile::tempdir().unwrap();
    let (paths, req) = request(
        home.path(),
        "layers",
        registry_origin(&format!("{}/test/layers:v1", reg.addr)),
    );
    let m = build(&req, &paths, &NoProgress).await.unwrap();
    e2fsck_clean(&req.output);
    assert_eq!(m.source.kind, "registry");
    assert_eq!(m.source.layers.len(), 3);
    assert!(m.config.env.contains(&"HELLO=world".to_string()));
    assert_eq!(m.config.working_dir, "/app");
    assert!(m.used_bytes <= m.size_bytes);

    let t = debugfs_tree(&req.output);
    let node = |p: &str| {
        t.get(p)
            .unwrap_or_else(|| panic!("{p} missing from image: {:?}", t.keys().collect::<Vec<_>>()))
    };
    assert_eq!(node("/bin/su-like").mode, 0o104755, "setuid kept");
    assert_eq!(
        (node("/bin/sg-like").mode, node("/bin/sg-like").gid),
        (0o102711, 50),
        "setgid kept"
    );
    assert_eq!(
        (
            node("/home/user-file").uid,
            node("/home/user-file").gid,
            node("/home/user-file").mode
        ),
        (1000, 1000, 0o100640)
    );
    assert_eq!(node("/tmp").mode, 0o041777, "sticky dir");
    assert!(
        !t.contains_key("/etc/remove-me"),
        "whiteout removed the file"
    );
    assert!(
        !t.contains_key("/etc/.wh.remove-me"),
        "whiteout markers are not copied"
    );
    assert!(
        !t.contains_key("/opaque/old-a") && !t.contains_key("/opaque/old-b"),
        "opaque dir hides lower content"
    );
    assert_eq!(node("/opaque/new").mode, 0o100600);
    assert_eq!(
        node("/replace-me").mode,
        0o040700,
        "file replaced by a directory"
    );
    assert!(t.contains_key("/replace-me/inside"));
    assert_eq!(node("/etc/link").mode & 0o170000, 0o120000);
    assert!(debugfs_stat(&req.output, "/etc/link").contains("Fast link dest: \"/etc/keep\""));
    assert_eq!(node("/etc/hard").ino, t["/etc/hard"].ino);
    assert_eq!(debugfs_cat(&req.output, "/etc/keep"), b"changed");
    assert_eq!(
        debugfs_cat(&req.output, "/etc/hard"),
        b"keep me",
        "hardlink keeps the inode it linked"
    );
    assert_eq!(node("/etc/null-dev").mode, 0o020666);
    assert!(debugfs_stat(&req.output, "/etc/null-dev").contains("Device major/minor number: 01:03"));
    assert_eq!(node("/etc/fifo").mode, 0o010600);
    assert!(
        debugfs_stat(&req.output, "/etc/with-xattr").contains("user.test"),
        "xattr kept"
    );
    let st = debugfs_stat(&req.output, "/bin/tool");
    assert!(st.contains("mtime: 0x5f5e1000"), "mtime kept: {st}");

    // Injection and layout.
    assert_eq!(node("/usr/local/bin/infra.operator").mode, 0o100755);
    assert_eq!(
        sha256_hex(&debugfs_cat(&req.output, "/usr/local/bin/infra.operator")),
        m.agent_sha256
    );
    let unit = String::from_utf8(debugfs_cat(
        &req.output,
        "/etc/systemd/system/infra.operator.service",
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/infra.operator guest --port 5000"));
    assert!(t.contains_key("/etc/init.d/S99guest"));
    assert!(t.contains_key("/etc/profile.d/bash.sh"));
    for d in ["/proc", "/sys", "/dev", "/run", "/var/log"] {
        assert!(t.contains_key(d), "{d}");
    }
    let image_json =
        String::from_utf8(debugfs_cat(&req.output, "/etc/infra-operator/image.json")).unwrap();
    assert!(image_json.contains("HELLO=world"));

    // Manifest beside the image matches the image.
    let on_disk =
        infra_image::Manifest::read(&infra_config::Paths::manifest_for(&req.output)).unwrap();
    assert_eq!(on_disk, m);
    assert_eq!(sha256_hex(&std::fs::read(&req.output).unwrap()), m.sha256);
    let listed = infra_image::list_local(&paths.images).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].manifest.as_ref().unwrap().name, "layers");
}

#[tokio::test(flavor = "multi_thread")]
async fn same_input_gives_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    layered_image().write_oci_dir(&dir.path().join("oci"), "v1");
    let home = tempfile::tempdir().unwrap();
    let (paths, mut req) = request(
        home.path(),
        "same",
        oci_origin(&dir.path().join("oci"), Some("v1")),
    );
    let a = build(&req, &paths, &NoProgress).await.unwrap();
    req.output = home.path().join("second.ext4");
    let b = build(&req, &paths, &NoProgress).await.unwrap();
    assert_eq!(a.sha256, b.sha256);
    assert_eq!(a.fs_uuid, b.fs_uuid);
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_arch_index_resolves_the_requested_platform() {
    let reg = Registry::start();
    let amd = TestImage::new(vec![tar(&[Item::File("arch", b"amd64", 0o644)])]);
    let mut arm = TestImage::new(vec![tar(&[Item::File("arch", b"arm64", 0o644)])]);
    arm.arch = "arm64".into();
    reg.push_index("test/multi", "v1", &[("amd64", &amd), ("arm64", &arm)])
        .await;
    let reference = format!("{}/test/multi:v1", reg.addr);
    let home = tempfile::tempdir().unwrap();
    for arch in ["amd64", "arm64"] {
        let (paths, mut req) = request(home.path(), arch, registry_origin(&reference));
        req.platform = format!("linux/{arch}");
        let m = build(&req, &paths, &NoProgress).await.unwrap();
        assert_eq!(m.source.platform, format!("linux/{arch}"));
        assert_eq!(debugfs_cat(&req.output, "/arch"), arch.as_bytes());
    }
    let (paths, mut req) = request(home.path(), "s390x", registry_origin(&reference));
    req.platform = "linux/s390x".into();
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::PlatformNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains("linux/arm64"),
        "lists what is available: {e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_errors_are_clear_and_leave_nothing() {
    let reg = Registry::start();
    let home = tempfile::tempdir().unwrap();
    let (paths, req) = request(
        home.path(),
        "missing",
        registry_origin(&format!("{}/test/none:v9", reg.addr)),
    );
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let closed = format!("127.0.0.1:{}", free_port());
    let (paths, req) = request(
        home.path(),
        "down",
        registry_origin(&format!("{closed}/x/y:1")),
    );
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    assert!(
        entries(&paths.images).is_empty(),
        "nothing under images: {:?}",
        entries(&paths.images)
    );
}

async fn build_oci(
    layers: Vec<Vec<u8>>,
    name: &str,
) -> (
    tempfile::TempDir,
    infra_config::Paths,
    infra_image::BuildRequest,
    infra_image::Result<infra_image::Manifest>,
) {
    let home = tempfile::tempdir().unwrap();
    let oci = home.path().join("oci");
    TestImage::new(layers).write_oci_dir(&oci, "v1");
    let (paths, req) = request(home.path(), name, oci_origin(&oci, None));
    let r = build(&req, &paths, &NoProgress).await;
    (home, paths, req, r)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_archives_are_refused_and_write_nothing_outside() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let escape_link = format!("../../../../../../../../../..{}", target.display());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "tar-slip",
            tar_end(raw_tar_entry(
                "../../../../../../../../tmp/slip",
                tar::EntryType::Regular,
                b"x",
                None,
            )),
        ),
        (
            "absolute",
            tar_end(raw_tar_entry(
                "/etc/absolute",
                tar::EntryType::Regular,
                b"x",
                None,
            )),
        ),
        (
            "symlink-escape",
            tar_end(
                [
                    raw_tar_entry("esc", tar::EntryType::Symlink, b"", Some(&escape_link)),
                    raw_tar_entry("esc/pwned", tar::EntryType::Regular, b"x", None),
                ]
                .concat(),
            ),
        ),
        (
            "hardlink-escape",
            tar_end(raw_tar_entry(
                "h",
                tar::EntryType::Link,
                b"",
                Some("../../../../etc/shadow"),
            )),
        ),
    ];
    for (name, layer) in cases {
        let (_home, paths, req, r) = build_oci(vec![layer], name).await;
        let e = r.unwrap_err();
        assert!(matches!(e, Error::HostileEntry { .. }), "{name}: {e:?}");
        assert!(!req.output.exists(), "{name}: no image");
        assert!(
            entries(&paths.images).is_empty(),
            "{name}: nothing in images dir"
        );
        assert!(
            entries(&target).is_empty(),
            "{name}: nothing written outside"
        );
        assert!(!std::path::Path::new("/tmp/slip").exists());
    }
    // An absolute symlink is resolved inside the image (as in a chroot), never on the host.
    let inside = tar_end(
        [
            raw_tar_entry(
                "abs",
                tar::EntryType::Symlink,
                b"",
                Some(target.to_str().unwrap()),
            ),
            raw_tar_entry("abs/file", tar::EntryType::Regular, b"x", None),
        ]
        .concat(),
    );
    let (_home, _paths, req, r) = build_oci(vec![inside], "abs").await;
    r.unwrap();
    assert!(entries(&target).is_empty(), "host path untouched");
    assert_eq!(
        debugfs_cat(&req.output, &format!("{}/file", target.display())),
        b"x"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_truncated_and_too_small_inputs_fail_cleanly() {
    // A blob whose bytes do not match its digest.
    let home = tempfile::tempdir().unwrap();
    let oci = home.path().join("oci");
    let img = TestImage::new(vec![tar(&[Item::File("f", &[7u8; 4096], 0o644)])]);
    img.write_oci_dir(&oci, "v1");
    let (_, gz, _) = img.blobs();
    // Same length, one byte changed: only the digest can tell.
    let mut tampered = gz[0].clone();
    tampered[10] ^= 0xff;
    std::fs::write(oci.join("blobs/sha256").join(sha256_hex(&gz[0])), tampered).unwrap();
    let (paths, req) = request(home.path(), "tampered", oci_origin(&oci, None));
    let e = build(&req, &paths, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
    assert!(!req.output.exists());

    // A truncated gzip stream (its own digest is right, the content is cut).
    let full = tar(&[Item::File("big", &vec![1u8; 200_000], 0o644)]);
    let gz = gzip(&full);
    let cut = gz[..gz.len() / 2].to_vec();
    let home2 = tempfile::tempdir().unwrap();
    let oci2 = home2.path().join("oci");
    write_raw_oci(&oci2, &cut, &digest(&full));
    let (paths2, req2) = request(home2.path(), "truncated", oci_origin(&oci2, None));
    let e = build(&req2, &paths2, &NoProgress).await.unwrap_err();
    assert!(
        matches!(e, Error::CorruptLayer { .. } | Error::DigestMismatch { .. }),
        "{e:?}"
    );
    assert!(!req2.output.exists());

    // --size too small for the content.
    let (_home3, _p, _r, _) = (0, 0, 0, 0);
    let home3 = tempfile::tempdir().unwrap();
    let oci3 = home3.path().join("oci");
    TestImage::new(vec![tar(&[Item::File("big", &vec![3u8; 30 << 20], 0o644)])])
        .write_oci_dir(&oci3, "v1");
    let (paths3, mut req3) = request(home3.path(), "small", oci_origin(&oci3, None));
    req3.size = infra_image::ext4::SizeSpec::Fixed { mb: 16 };
    let e = build(&req3, &paths3, &NoProgress).await.unwrap_err();
    assert!(matches!(e, Error::TooSmall { .. }), "{e:?}");
    assert!(
        entries(&paths3.images).is_empty(),
        "{:?}",
        entries(&paths3.images)
    );
}

/// An OCI layout whose single layer is `layer` (already compressed), with the given diff_id.
fn write_raw_oci(dir: &std::path::Path, layer: &[u8], diff_id: &str) {
    let config = serde_json::to_vec(
        &serde_json::json!({"architecture":"amd64","os":"linux","config":{},
        "rootfs":{"type":"layers","diff_ids":[diff_id]}}),
    )
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion":2,
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":digest(&config),"size":config.len()},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":digest(layer),"size":layer.len()}]}))
    .unwrap();
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for b in [layer, &config[..], &manifest[..]] {
        std::fs::write(blobs.join(sha256_hex(b)), b).unwrap();
    }
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":digest(&manifest),"size":manifest.len()}]})).unwrap(),
    )
    .unwrap();
}
