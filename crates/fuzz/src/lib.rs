//! The bodies of the fuzz targets: every parser that reads input from outside the host's trust
//! (layer tars, image archives, registry documents, agent frames in both directions).
//!
//! The libFuzzer harness in `fuzz/` (cargo-fuzz) calls these functions; `tests/replay.rs` runs
//! every saved corpus file through them on each CI run. A target fails by panicking: the
//! functions themselves assert the invariants that must hold for any input (no write outside the
//! root, bounded reads), beyond "does not crash".

use std::io::Cursor;
use std::path::Path;

use infra_image::source::tarindex::TarIndex;
use infra_image::unpack::Unpacker;
use infra_image::UnpackLimits;

/// Small limits so one input cannot take the fuzzer's time or disk.
fn limits() -> UnpackLimits {
    UnpackLimits {
        max_layer_bytes: 8 << 20,
        max_image_bytes: 8 << 20,
        max_entries: 4096,
        max_file_bytes: 4 << 20,
    }
}

/// Applies `data` as two layers (the same bytes twice, so links and whiteouts of the first meet
/// the second) onto a root inside a sandbox directory, then checks that nothing was created
/// beside the root.
pub fn unpack_layer(data: &[u8]) {
    let sandbox = tempfile::tempdir().expect("temp dir");
    let root = sandbox.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let mut u = Unpacker::with_default_mtime(&root, 0).with_limits(limits());
    if u.apply_layer(Cursor::new(data), "fuzz", None).is_ok() {
        let _ = u.apply_layer(Cursor::new(data), "fuzz", None);
    }
    let _ = u.finish();
    let outside: Vec<_> = std::fs::read_dir(sandbox.path())
        .expect("read sandbox")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "root")
        .collect();
    assert!(
        outside.is_empty(),
        "layer wrote outside its root: {outside:?}"
    );
}

/// Indexes `data` as an outer image archive and reads it as both archive kinds; every member the
/// index hands out lies inside the file.
pub fn archive_index(data: &[u8]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("archive.tar");
    std::fs::write(&path, data).expect("write");
    if let Ok(index) = TarIndex::open(&path) {
        for name in [
            "manifest.json",
            "index.json",
            "oci-layout",
            "a",
            "a/b",
            "blobs/sha256/x",
        ] {
            if let Ok(r) = index.find(name) {
                assert!(
                    r.offset + r.size <= data.len() as u64,
                    "region past the end"
                );
            }
            let _ = index.read_small(name);
        }
    }
    let _ = infra_image::source::archive::fetch_docker_archive(&path, None);
    let _ = infra_image::source::archive::fetch_oci_archive(&path, None, "linux/amd64");
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(entries.len(), 1, "reading an archive wrote files beside it");
}

/// Parses `data` as the registry documents we read: image config, OCI/Docker manifest, index.
pub fn registry_documents(data: &[u8]) {
    let _ = infra_image::source::parse_config(data);
    let _ = serde_json::from_slice::<oci_client::manifest::OciManifest>(data);
    let _ = serde_json::from_slice::<oci_client::manifest::OciImageManifest>(data);
    let _ = serde_json::from_slice::<oci_client::manifest::OciImageIndex>(data);
}

/// Decodes `data` as a stream of frames, both as the host reads the agent's replies and as the
/// agent reads the host's requests.
pub fn frames(data: &[u8]) {
    let mut host = Cursor::new(data);
    while let Ok(Some(reply)) = infra_protocol::read_message::<infra_protocol::Reply, _>(&mut host)
    {
        let _ = reply.id();
        let _ = reply.is_final();
        if let infra_protocol::Reply::Exit(e) = &reply {
            let _ = e.shell_exit_code();
        }
    }
    let mut guest = Cursor::new(data);
    while let Ok(Some(_req)) =
        infra_protocol::read_message::<infra_protocol::Request, _>(&mut guest)
    {}
}

/// The corpus directory of a target, for the replay test.
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}
