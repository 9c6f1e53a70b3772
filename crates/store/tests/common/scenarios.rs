//! Store scenarios written once and run against each backend (local store always, Garage in
//! `garage.rs`).

use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use bytes::Bytes;
use infra_store::glob::Filter;
use infra_store::sync::{sync, ActionKind, SyncOptions, SyncSide};
use infra_store::testing::{Faults, FaultyStore};
use infra_store::{
    etag_of_file, partial_paths, Body, Error, HashCache, Metadata, NoProgress, ObjectStore,
    TransferOptions, META_SHA256,
};

use super::*;

/// A sparse image with data scattered over it survives upload/download, plain and compressed,
/// and comes back sparse.
pub async fn round_trip_sparse(store: Arc<dyn ObjectStore>, dir: &Path, size: u64) {
    let img = dir.join("rootfs-big.ext4");
    let regions = [
        (0, 64 * 1024),
        (size / 3, (8 * MIB) as usize),
        (size / 2 + 12345, (3 * MIB) as usize),
        (size - 4096, 4096),
    ];
    sparse_image(&img, size, &regions);
    let want = sha256(&img);
    let e = engine(store.clone(), small_parts(&dir.join("state")));

    let up = e
        .upload_file(&img, "rootfs-big.ext4", &Metadata::new())
        .await
        .unwrap();
    assert_eq!(up.size, size);
    assert_eq!(up.sha256, want);
    assert!(up.parts > 1);
    let head = store.head("rootfs-big.ext4", None).await.unwrap();
    assert_eq!(head.sha256(), Some(want.as_str()));
    assert_eq!(head.size, size);

    let out = dir.join("out/rootfs-big.ext4");
    let down = e
        .download_file("rootfs-big.ext4", &out, None)
        .await
        .unwrap();
    assert_eq!(down.verified, infra_store::Verified::Parts);
    assert_eq!(sha256(&out), want);
    assert!(
        allocated(&out) < 64 * MIB,
        "download is not sparse: {} bytes allocated",
        allocated(&out)
    );
    let (tmp, state) = partial_paths(&out);
    assert!(!tmp.exists() && !state.exists());

    let upz = e
        .upload_compressed(&img, "rootfs-big.ext4.zst", &Metadata::new(), None)
        .await
        .unwrap();
    assert!(
        upz.bytes_sent < 20 * MIB,
        "compressed form is {} bytes",
        upz.bytes_sent
    );
    let outz = dir.join("outz/rootfs-big.ext4");
    let downz = e
        .download_compressed("rootfs-big.ext4.zst", &outz, None)
        .await
        .unwrap();
    assert_eq!(downz.verified, infra_store::Verified::Sha256);
    assert_eq!(downz.size, size);
    assert_eq!(sha256(&outz), want);
    assert!(allocated(&outz) < 64 * MIB);
}

/// Multipart uploads get S3's ETag (md5 of part md5s, `-N`), which we can recompute locally.
pub async fn multipart_etag(store: Arc<dyn ObjectStore>, dir: &Path) {
    let f = dir.join("blob");
    random_file(&f, (23 * MIB) as usize, 7);
    let e = engine(store.clone(), small_parts(&dir.join("state")));
    let up = e
        .upload_file(&f, "dir/blob", &Metadata::new())
        .await
        .unwrap();
    assert_eq!(up.parts, 5);
    let etag = up.etag.clone().unwrap();
    assert!(etag.ends_with("-5"), "{etag}");
    assert_eq!(etag, etag_of_file(&f, 5 * MIB, true).unwrap());
    let listed = store.list("dir/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].etag.as_deref(), Some(etag.as_str()));
    // Ranges.
    let r = store
        .get(
            "dir/blob",
            &infra_store::GetOptions {
                range: Some(10..20),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    use futures::TryStreamExt;
    let got: Vec<Bytes> = r.body.try_collect().await.unwrap();
    assert_eq!(got.concat(), noise(7, 20)[10..20].to_vec());
}

/// An upload that fails part-way resumes with the parts already in the store.
pub async fn resume_upload(store: Arc<dyn ObjectStore>, dir: &Path) {
    let f = dir.join("resume-up");
    random_file(&f, (31 * MIB) as usize, 11);
    let state = dir.join("state");
    let faults = Faults::none();
    faults.fail_parts_after.store(3, SeqCst);
    let faulty: Arc<dyn ObjectStore> = Arc::new(FaultyStore::new(store.clone(), faults.clone()));
    let opts = TransferOptions {
        concurrency: 1,
        ..small_parts(&state)
    };
    let err = engine(faulty, opts.clone())
        .upload_file(&f, "resume-up", &Metadata::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(matches!(
        store.head("resume-up", None).await,
        Err(Error::NoSuchKey { .. })
    ));
    let up = engine(store.clone(), opts)
        .upload_file(&f, "resume-up", &Metadata::new())
        .await
        .unwrap();
    assert_eq!(up.resumed_parts, 3, "{up:?}");
    assert_eq!(up.bytes_sent, 31 * MIB - 15 * MIB);
    let out = dir.join("resume-up.out");
    engine(store, TransferOptions::default())
        .download_file("resume-up", &out, None)
        .await
        .unwrap();
    assert_eq!(sha256(&out), sha256(&f));
}

/// A download that fails part-way leaves no file under the final name and resumes.
pub async fn resume_download(store: Arc<dyn ObjectStore>, dir: &Path) {
    let f = dir.join("resume-down");
    random_file(&f, (40 * MIB) as usize, 13);
    let opts = TransferOptions {
        concurrency: 1,
        ..small_parts(&dir.join("state"))
    };
    engine(store.clone(), opts.clone())
        .upload_file(&f, "resume-down", &Metadata::new())
        .await
        .unwrap();
    let faults = Faults::none();
    faults.fail_get_after_bytes.store(12 * MIB, SeqCst);
    let faulty: Arc<dyn ObjectStore> = Arc::new(FaultyStore::new(store.clone(), faults));
    let out = dir.join("dl/resume-down");
    let err = engine(faulty, opts.clone())
        .download_file("resume-down", &out, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(!out.exists(), "a partial download is under the final name");
    let (tmp, state) = partial_paths(&out);
    assert!(tmp.exists() && state.exists());
    let d = engine(store, opts)
        .download_file("resume-down", &out, None)
        .await
        .unwrap();
    assert!(d.resumed_chunks >= 2, "{d:?}");
    assert!(d.bytes_received <= 40 * MIB - 10 * MIB);
    assert_eq!(sha256(&out), sha256(&f));
    assert!(!tmp.exists() && !state.exists());
}

/// A checksum mismatch is an error and the old local file stays as it was.
pub async fn checksum_mismatch_keeps_old(store: Arc<dyn ObjectStore>, dir: &Path) {
    let mut meta = Metadata::new();
    meta.insert(META_SHA256.into(), hex_sha(b"something else"));
    store
        .put(
            "bad",
            Body::Bytes(Bytes::from_static(b"new content")),
            &meta,
        )
        .await
        .unwrap();
    let out = dir.join("keep/bad");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, b"old content").unwrap();
    let e = engine(store.clone(), TransferOptions::default());
    let err = e.download_file("bad", &out, None).await.unwrap_err();
    match &err {
        Error::ChecksumMismatch { path, .. } => assert_eq!(path.as_deref(), Some(out.as_path())),
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(err.to_string().contains("left as it was"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"old content");
    let (tmp, state) = partial_paths(&out);
    assert!(!tmp.exists() && !state.exists());

    // Corruption in transit is caught the same way.
    let good = dir.join("good");
    random_file(&good, (7 * MIB) as usize, 3);
    e.upload_file(&good, "good", &Metadata::new())
        .await
        .unwrap();
    let faults = Faults::none();
    faults.corrupt_gets.store(true, SeqCst);
    let faulty: Arc<dyn ObjectStore> = Arc::new(FaultyStore::new(store, faults));
    let out2 = dir.join("keep/good");
    std::fs::write(&out2, b"previous").unwrap();
    let err = engine(faulty, TransferOptions::default())
        .download_file("good", &out2, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert_eq!(std::fs::read(&out2).unwrap(), b"previous");
}

/// Missing keys are a clear error.
pub async fn missing_key(store: Arc<dyn ObjectStore>, dir: &Path) {
    let e = engine(store.clone(), TransferOptions::default());
    let err = e
        .download_file("no/such/key", &dir.join("x"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoSuchKey { .. }), "{err}");
    assert!(err.to_string().contains("store ls"), "{err}");
    assert!(!dir.join("x").exists());
}

fn counted(store: &Arc<dyn ObjectStore>) -> (Arc<dyn ObjectStore>, Arc<Faults>) {
    let f = Faults::none();
    (Arc::new(FaultyStore::new(store.clone(), f.clone())), f)
}

/// Sync in both directions and between stores, with filters, `--delete` and `--dry-run`;
/// unchanged objects cost one listing and nothing else.
pub async fn sync_both_ways(store: Arc<dyn ObjectStore>, other: Arc<dyn ObjectStore>, dir: &Path) {
    let src = dir.join("images");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    random_file(&src.join("rootfs-a.ext4"), (12 * MIB) as usize, 1);
    random_file(&src.join("rootfs-b.ext4"), 100_000, 2);
    std::fs::write(src.join("rootfs-a.json"), b"{}").unwrap();
    std::fs::write(src.join("notes.txt"), b"notes").unwrap();
    std::fs::write(src.join("sub/deep.bin"), b"deep").unwrap();
    let hashes = Arc::new(HashCache::load(dir.join("hashes.json")));
    let opts = small_parts(&dir.join("state"));
    let filters = vec![
        Filter::Exclude("*".into()),
        Filter::Include("rootfs-*.ext4".into()),
    ];
    let local = SyncSide::Dir(src.clone());
    let run = |src: SyncSide, dst: SyncSide, o: SyncOptions| {
        let opts = opts.clone();
        let hashes = hashes.clone();
        async move {
            sync(&src, &dst, &o, &opts, Arc::new(NoProgress), hashes)
                .await
                .unwrap()
        }
    };

    // Dry run: a plan, no change.
    let r = run(
        local.clone(),
        SyncSide::Store(store.clone()),
        SyncOptions {
            filters: filters.clone(),
            dry_run: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.actions.len(), 2);
    assert!(r.actions.iter().all(|a| a.kind == ActionKind::Upload));
    assert_eq!(r.filtered_out, 3);
    assert!(store.list("").await.unwrap().is_empty());

    // Real run: only the images.
    let r = run(
        local.clone(),
        SyncSide::Store(store.clone()),
        SyncOptions {
            filters: filters.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.actions.len(), 2);
    let keys: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["rootfs-a.ext4", "rootfs-b.ext4"]);

    // Unchanged: one listing, no HEAD, no GET, no write.
    let (c, f) = counted(&store);
    let r = run(
        local.clone(),
        SyncSide::Store(c),
        SyncOptions {
            filters: filters.clone(),
            ..Default::default()
        },
    )
    .await;
    assert!(r.actions.is_empty(), "{:?}", r.actions);
    assert_eq!(r.unchanged, 2);
    assert_eq!(f.list_calls.load(SeqCst), 1);
    assert_eq!(f.head_calls.load(SeqCst), 0);
    assert_eq!(f.get_calls.load(SeqCst), 0);
    assert_eq!(f.write_calls.load(SeqCst), 0);

    // Same size, other content: found without downloading, uploaded again.
    random_file(&src.join("rootfs-b.ext4"), 100_000, 99);
    let (c, f) = counted(&store);
    let r = run(
        local.clone(),
        SyncSide::Store(c),
        SyncOptions {
            filters: filters.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.actions.len(), 1);
    assert_eq!(r.actions[0].key, "rootfs-b.ext4");
    assert_eq!(f.get_calls.load(SeqCst), 0);

    // --delete removes what the source lost, within the filters only.
    std::fs::remove_file(src.join("rootfs-b.ext4")).unwrap();
    store
        .put(
            "other.txt",
            Body::Bytes(Bytes::from_static(b"x")),
            &Metadata::new(),
        )
        .await
        .unwrap();
    let r = run(
        local.clone(),
        SyncSide::Store(store.clone()),
        SyncOptions {
            filters: filters.clone(),
            delete: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.actions.len(), 1);
    assert_eq!(r.actions[0].kind, ActionKind::Delete);
    let keys: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["other.txt", "rootfs-a.ext4"]);

    // Store → directory, then unchanged.
    let back = dir.join("back");
    let r = run(
        SyncSide::Store(store.clone()),
        SyncSide::Dir(back.clone()),
        SyncOptions::default(),
    )
    .await;
    assert_eq!(r.actions.len(), 2);
    assert_eq!(
        sha256(&back.join("rootfs-a.ext4")),
        sha256(&src.join("rootfs-a.ext4"))
    );
    let (c, f) = counted(&store);
    let r = run(
        SyncSide::Store(c),
        SyncSide::Dir(back.clone()),
        SyncOptions::default(),
    )
    .await;
    assert!(r.actions.is_empty());
    assert_eq!(f.list_calls.load(SeqCst), 1);
    assert_eq!(f.get_calls.load(SeqCst) + f.head_calls.load(SeqCst), 0);

    // Store → store (backup), then unchanged; --delete there too.
    let r = run(
        SyncSide::Store(store.clone()),
        SyncSide::Store(other.clone()),
        SyncOptions::default(),
    )
    .await;
    assert_eq!(r.actions.len(), 2);
    assert!(r.actions.iter().all(|a| a.kind == ActionKind::Copy));
    let copied = other.head("rootfs-a.ext4", None).await.unwrap();
    assert_eq!(
        copied.sha256(),
        Some(sha256(&src.join("rootfs-a.ext4")).as_str())
    );
    let r = run(
        SyncSide::Store(store.clone()),
        SyncSide::Store(other.clone()),
        SyncOptions::default(),
    )
    .await;
    assert!(r.actions.is_empty(), "{:?}", r.actions);
    store.delete("other.txt").await.unwrap();
    let r = run(
        SyncSide::Store(store.clone()),
        SyncSide::Store(other.clone()),
        SyncOptions {
            delete: true,
            dry_run: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.actions.len(), 1);
    assert!(
        other.head("other.txt", None).await.is_ok(),
        "dry run deleted"
    );
}

/// An image's manifest sha256 saves the hashing pass, and is checked while sending: a stale
/// manifest stops the upload before anything is stored.
pub async fn manifest_sha_is_verified(store: Arc<dyn ObjectStore>, dir: &Path) {
    let paths = infra_config::Paths::under(dir.join("home"));
    std::fs::create_dir_all(&paths.images).unwrap();
    let img = paths.image("py");
    sparse_image(&img, 48 * MIB, &[(0, (9 * MIB) as usize), (30 * MIB, 4096)]);
    let size = 48 * MIB;
    let manifest = infra_config::Paths::manifest_for(&img);
    let write_manifest = |sha: &str| {
        std::fs::write(
            &manifest,
            format!("{{\"name\":\"py\",\"sha256\":\"{sha}\",\"size_bytes\":{size}}}"),
        )
        .unwrap()
    };
    let e = engine(store.clone(), small_parts(&dir.join("state")));
    write_manifest(&sha256(&img));
    for compress in [false, true] {
        let up = infra_store::artifacts::upload_image(&e, &paths, "py", compress)
            .await
            .unwrap();
        assert_eq!(up[0].sha256, sha256(&img));
    }
    // Stale manifest: both forms refuse, nothing new is stored.
    let wrong = hex_sha(b"stale");
    write_manifest(&wrong);
    let fresh = engine(store.clone(), small_parts(&dir.join("state2")));
    for compress in [false, true] {
        store.delete("rootfs-py.ext4").await.unwrap();
        store.delete("rootfs-py.ext4.zst").await.unwrap();
        let err = infra_store::artifacts::upload_image(&fresh, &paths, "py", compress)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::SourceMismatch { .. }), "{err}");
        assert!(err.to_string().contains("nothing was stored"), "{err}");
        let keys: Vec<String> = store
            .list("rootfs-py.ext4")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert!(keys.is_empty(), "{keys:?}");
    }
}

async fn sync_to_dir(
    store: Arc<dyn ObjectStore>,
    dest: &Path,
    delete: bool,
) -> infra_store::sync::SyncReport {
    sync(
        &SyncSide::Store(store),
        &SyncSide::Dir(dest.to_path_buf()),
        &SyncOptions {
            delete,
            ..Default::default()
        },
        &TransferOptions::default(),
        Arc::new(NoProgress),
        Arc::new(HashCache::in_memory()),
    )
    .await
    .unwrap()
}

fn skipped_keys(r: &infra_store::sync::SyncReport) -> Vec<String> {
    let mut k: Vec<String> = r.skipped.iter().map(|s| s.key.clone()).collect();
    k.sort();
    k
}

/// A symbolic link already inside the destination directory is not followed: the key that
/// would write through it is skipped (named in the report), the other keys are written, and
/// nothing lands where the link points; `--delete` does not remove through it either.
pub async fn sync_does_not_follow_links_in_destination(store: Arc<dyn ObjectStore>, dir: &Path) {
    let none = Metadata::new();
    for key in ["link/evil.txt", "file-link", "fine.txt", "sub/fine.txt"] {
        store
            .put(key, Body::Bytes(Bytes::from(key.to_string())), &none)
            .await
            .unwrap();
    }
    let dest = dir.join("links-dest");
    let outside = dir.join("links-outside");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"keep me").unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.join("target"), dest.join("file-link")).unwrap();
    let outside_names = || {
        let mut v: Vec<String> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let r = sync_to_dir(store.clone(), &dest, false).await;
    assert_eq!(skipped_keys(&r), ["file-link", "link/evil.txt"], "{r:?}");
    assert!(r.skipped[0].reason.contains("symbolic link"), "{r:?}");
    assert_eq!(outside_names(), ["victim"], "a write went through a link");
    assert_eq!(std::fs::read(dest.join("fine.txt")).unwrap(), b"fine.txt");
    assert_eq!(
        std::fs::read(dest.join("sub/fine.txt")).unwrap(),
        b"sub/fine.txt"
    );
    assert_eq!(r.actions.len(), 2, "{r:?}");
    // --delete: `link/victim` is listed through the link but not removed through it.
    let r = sync_to_dir(store, &dest, true).await;
    assert_eq!(
        skipped_keys(&r),
        ["file-link", "link/evil.txt", "link/victim"],
        "{r:?}"
    );
    assert_eq!(outside_names(), ["victim"], "a delete went through a link");
}

/// Multipart uploads record a part list (digest in the metadata, list in a sidecar); downloads
/// verify each part and refuse hostile lists, leaving nothing at the destination.
pub async fn part_lists(store: Arc<dyn ObjectStore>, dir: &Path) {
    use infra_store::parts::{PartList, META_PARTS_SHA256, META_PART_SIZE};
    use infra_store::Verified;
    let opts = small_parts(&dir.join("state"));
    let e = engine(store.clone(), opts.clone());
    let f = dir.join("parts.bin");
    let data = noise(41, (23 * MIB) as usize);
    std::fs::write(&f, &data).unwrap();
    let up = e
        .upload_file(&f, "parts.bin", &Metadata::new())
        .await
        .unwrap();
    assert_eq!(up.parts, 5);
    let digests: Vec<[u8; 32]> = data
        .chunks((5 * MIB) as usize)
        .map(|c| sha2::Sha256::digest(c).into())
        .collect();
    let list = PartList {
        size: data.len() as u64,
        part_size: 5 * MIB,
        digests: digests.clone(),
    };
    let head = store.head("parts.bin", None).await.unwrap();
    assert_eq!(head.metadata.get(META_PARTS_SHA256), Some(&list.digest()));
    assert_eq!(
        head.metadata.get(META_PART_SIZE),
        Some(&(5 * MIB).to_string())
    );
    assert!(store.head(&list.sidecar_key(), None).await.is_ok());

    // A clean download verifies the parts (no whole-object pass), in parallel.
    let out = dir.join("dl/parts.bin");
    let d = e.download_file("parts.bin", &out, None).await.unwrap();
    assert_eq!(d.verified, Verified::Parts);
    assert_eq!(d.sha256, hex_sha(&data));
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // Hostile objects: data, metadata and sidecar all written by someone else.
    let put_hostile = |key: &'static str, body: Vec<u8>, list: PartList| {
        let store = store.clone();
        async move {
            store
                .put(
                    &list.sidecar_key(),
                    Body::Bytes(list.to_json().into()),
                    &Metadata::new(),
                )
                .await
                .unwrap();
            let mut meta = Metadata::new();
            meta.insert(META_SHA256.into(), hex_sha(&body));
            list.add_to_metadata(&mut meta);
            store
                .put(key, Body::Bytes(body.into()), &meta)
                .await
                .unwrap();
        }
    };
    let check_refused = |key: &'static str, want: &'static str| {
        let e = e.clone();
        let dir = dir.to_path_buf();
        async move {
            let out = dir.join("hostile").join(key);
            let err = e.download_file(key, &out, None).await.unwrap_err();
            assert!(err.to_string().contains(want), "{key}: {err}");
            assert!(!err.to_string().contains('\n'), "{err}");
            assert!(
                !out.exists(),
                "{key}: something was left at the destination"
            );
            let (tmp, state) = partial_paths(&out);
            assert!(!tmp.exists() && !state.exists(), "{key}: partial file left");
            err
        }
    };

    // One part's digest is wrong (whole-object sha256 right): refused, naming the part.
    let mut wrong = list.clone();
    wrong.digests[2] = sha2::Sha256::digest(b"not this part").into();
    put_hostile("wrong-part", data.clone(), wrong).await;
    let err = check_refused("wrong-part", "part 3 of 5").await;
    assert!(matches!(err, Error::PartMismatch { part: 3, .. }), "{err}");

    // The list covers fewer bytes than the object: the tail would go unchecked. Refused.
    let mut tampered = data.clone();
    let n = tampered.len();
    tampered[n - 1] ^= 1;
    let short = PartList {
        size: 20 * MIB,
        part_size: 5 * MIB,
        digests: digests[..4].to_vec(),
    };
    put_hostile("short-list", tampered.clone(), short).await;
    check_refused("short-list", "covers 20971520 bytes").await;
    // Fewer digests than parts, size claimed right.
    let few = PartList {
        size: n as u64,
        part_size: 5 * MIB,
        digests: digests[..4].to_vec(),
    };
    put_hostile("few-digests", tampered, few).await;
    check_refused("few-digests", "4 digests for 5 parts").await;

    // The sidecar does not match the digest the metadata names.
    let mut meta = Metadata::new();
    list.add_to_metadata(&mut meta);
    let other = PartList {
        digests: digests.iter().rev().copied().collect(),
        ..list.clone()
    };
    store
        .put(
            &list.sidecar_key(),
            Body::Bytes(other.to_json().into()),
            &Metadata::new(),
        )
        .await
        .unwrap();
    store
        .put("swapped", Body::Bytes(data.clone().into()), &meta)
        .await
        .unwrap();
    check_refused("swapped", "metadata says").await;

    // A missing sidecar falls back to the whole-object sha256.
    store.delete(&list.sidecar_key()).await.unwrap();
    let out2 = dir.join("dl/fallback.bin");
    let d = e.download_file("parts.bin", &out2, None).await.unwrap();
    assert_eq!(d.verified, Verified::Sha256);
    assert_eq!(std::fs::read(&out2).unwrap(), data);
}

/// The kernel travels as a bundle (modules, vmlinux, manifest) and lands as `kernel install`
/// leaves it; a manifest naming a hostile module or another kernel is refused with nothing
/// written; a vmlinux alone replaces the kernel and drops the stale manifest and modules.
pub async fn kernel_bundle(store: Arc<dyn ObjectStore>, dir: &Path) {
    use infra_store::artifacts::{
        download_kernel, ensure_kernel, upload_kernel, KERNEL_MANIFEST_KEY,
    };
    let a = infra_config::Paths::under(dir.join("a"));
    std::fs::create_dir_all(a.kernel_modules()).unwrap();
    random_file(&a.kernel, (3 * MIB) as usize, 7);
    for (i, m) in ["virtio_blk", "virtio_net"].iter().enumerate() {
        random_file(
            &a.kernel_modules().join(format!("{m}.ko")),
            40_000 + i,
            20 + i as u64,
        );
    }
    let manifest = format!(
        "{{\"release\":\"6.1.0-test\",\"source\":\"deb:x\",\"compression\":\"none\",\
         \"sha256\":\"{}\",\"bytes\":{},\"modules\":[\"virtio_blk\",\"virtio_net\"],\
         \"installed_at\":\"2026-12-03T00:00:00Z\"}}",
        sha256(&a.kernel),
        3 * MIB
    );
    std::fs::write(a.kernel_manifest(), &manifest).unwrap();
    let e = engine(store.clone(), small_parts(&dir.join("state")));
    let sent: Vec<String> = upload_kernel(&e, &a)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.key)
        .collect();
    assert_eq!(
        sent,
        [
            "vmlinux.modules/virtio_blk.ko",
            "vmlinux.modules/virtio_net.ko",
            "vmlinux",
            "vmlinux.json"
        ]
    );

    // A fresh home gets the whole bundle, byte for byte.
    let b = infra_config::Paths::under(dir.join("b"));
    let got = ensure_kernel(&e, &b).await.unwrap().expect("fetched");
    assert_eq!(got.len(), 3, "two modules and the kernel");
    assert_eq!(sha256(&b.kernel), sha256(&a.kernel));
    assert_eq!(
        std::fs::read_to_string(b.kernel_manifest()).unwrap(),
        manifest
    );
    for m in ["virtio_blk", "virtio_net"] {
        let f = format!("{m}.ko");
        assert_eq!(
            std::fs::read(b.kernel_modules().join(&f)).unwrap(),
            std::fs::read(a.kernel_modules().join(&f)).unwrap()
        );
    }
    assert!(
        ensure_kernel(&e, &b).await.unwrap().is_none(),
        "present: no fetch"
    );
    let leftovers = |p: &infra_config::Paths| -> Vec<String> {
        std::fs::read_dir(&p.home)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("download"))
            .collect()
    };
    assert!(leftovers(&b).is_empty(), "{:?}", leftovers(&b));

    // Hostile manifests from the store: refused before any key or path is made of them.
    let put = |body: String| {
        let store = store.clone();
        async move {
            store
                .put(
                    KERNEL_MANIFEST_KEY,
                    Body::Bytes(Bytes::from(body)),
                    &Metadata::new(),
                )
                .await
                .unwrap();
        }
    };
    let sha = sha256(&a.kernel);
    let escape = dir.join("escaped");
    for (body, why) in [
        (
            format!(
                "{{\"sha256\":\"{sha}\",\"modules\":[\"../../../{}\"]}}",
                escape.display()
            ),
            "module name",
        ),
        (
            format!("{{\"sha256\":\"{sha}\",\"modules\":[\"a/b\"]}}"),
            "module name",
        ),
        (
            format!("{{\"sha256\":\"{sha}\",\"modules\":[\"x\",\"x\"]}}"),
            "named twice",
        ),
        (
            format!(
                "{{\"sha256\":\"{sha}\",\"modules\":{:?}}}",
                (0..65).map(|i| format!("m{i}")).collect::<Vec<_>>()
            ),
            "at most 64",
        ),
        ("{\"sha256\":\"../x\"}".to_string(), "64 hex"),
        ("not json".to_string(), "not valid"),
    ] {
        put(body).await;
        let c = infra_config::Paths::under(dir.join("c"));
        let err = download_kernel(&e, &c).await.unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{why}: {err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
        assert!(!c.kernel.exists() && !escape.exists(), "{why}");
    }
    // A manifest of another kernel: the download is discarded, b keeps its kernel.
    let before = sha256(&b.kernel);
    put(format!(
        "{{\"sha256\":\"{}\",\"modules\":[\"virtio_blk\"]}}",
        hex_sha(b"another kernel")
    ))
    .await;
    let err = download_kernel(&e, &b).await.unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert_eq!(sha256(&b.kernel), before);
    assert_eq!(
        std::fs::read_to_string(b.kernel_manifest()).unwrap(),
        manifest
    );
    assert!(b.kernel_modules().join("virtio_net.ko").exists());
    assert!(leftovers(&b).is_empty(), "{:?}", leftovers(&b));

    // A kernel without a manifest (built-in drivers): uploading it removes the stale
    // manifest; downloading it drops b's manifest and modules, which described another one.
    std::fs::remove_file(a.kernel_manifest()).unwrap();
    random_file(&a.kernel, (2 * MIB) as usize, 9);
    let sent = upload_kernel(&e, &a).await.unwrap();
    assert_eq!(sent.len(), 1);
    assert!(matches!(
        store.head(KERNEL_MANIFEST_KEY, None).await,
        Err(Error::NoSuchKey { .. })
    ));
    download_kernel(&e, &b).await.unwrap();
    assert_eq!(sha256(&b.kernel), sha256(&a.kernel));
    assert!(!b.kernel_manifest().exists() && !b.kernel_modules().exists());
}
