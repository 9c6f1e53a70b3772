//! The store against a real S3-compatible server: Garage, started on 127.0.0.1 by the harness
//! (`infra_store::testing::Garage`). Fails, with the install command, when garage is missing.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use common::*;
use infra_store::testing::{Garage, GARAGE_REGION};
use infra_store::{
    artifacts, CredentialProblem, Error, InitOptions, Metadata, ObjectStore, S3Store, StepStatus,
    TransferOptions, Verified,
};

async fn garage_store(bucket: &str, prefix: &str) -> (Garage, Arc<dyn ObjectStore>) {
    let g = Garage::start().await;
    g.create_bucket(bucket).await;
    let s = Arc::new(g.store(bucket, prefix).await);
    (g, s)
}

#[tokio::test]
async fn round_trip_large_sparse_image() {
    let (_g, s) = garage_store("images", "dev").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::round_trip_sparse(s, d.path(), 1536 * MIB).await;
}

#[tokio::test]
async fn multipart_etag() {
    let (_g, s) = garage_store("multipart", "").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::multipart_etag(s, d.path()).await;
}

#[tokio::test]
async fn resume_upload_after_failure() {
    let (_g, s) = garage_store("resume-up", "").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::resume_upload(s, d.path()).await;
}

#[tokio::test]
async fn resume_download_after_failure() {
    let (_g, s) = garage_store("resume-down", "").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::resume_download(s, d.path()).await;
}

#[tokio::test]
async fn checksum_mismatch_keeps_old_file() {
    let (_g, s) = garage_store("checksums", "").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::checksum_mismatch_keeps_old(s, d.path()).await;
}

#[tokio::test]
async fn manifest_sha_is_verified() {
    let (_g, s) = garage_store("manifests", "").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::manifest_sha_is_verified(s, d.path()).await;
}

#[tokio::test]
async fn kernel_bundle() {
    let (_g, s) = garage_store("kernel", "").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::kernel_bundle(s, d.path()).await;
}

#[tokio::test]
async fn sync_include_exclude_delete_dry_run() {
    let g = Garage::start().await;
    g.create_bucket("sync-src").await;
    g.create_bucket("sync-backup").await;
    let s: Arc<dyn ObjectStore> = Arc::new(g.store("sync-src", "prod").await);
    let other: Arc<dyn ObjectStore> = Arc::new(g.store("sync-backup", "prod").await);
    let d = tempfile::tempdir().unwrap();
    scenarios::sync_both_ways(s, other, d.path()).await;
}

/// Kills Garage (SIGKILL) in the middle of an upload and of a download, restarts it, and
/// checks both resume instead of starting over.
#[tokio::test]
async fn resume_after_killing_and_restarting_garage() {
    let (mut g, s) = garage_store("killed", "").await;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("big");
    random_file(&f, (96 * MIB) as usize, 5);
    let opts = TransferOptions {
        concurrency: 2,
        ..small_parts(&d.path().join("state"))
    };
    let pid = g.pid().unwrap() as i32;
    let kill = move || {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    let trigger = Arc::new(Trigger {
        after: 40 * MIB,
        seen: AtomicU64::new(0),
        fired: AtomicBool::new(false),
        f: kill,
    });
    let err = engine_with(s.clone(), opts.clone(), trigger)
        .upload_file(&f, "big", &Metadata::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unreachable { .. }),
        "expected the endpoint to be down: {err}"
    );
    g.restart().await;
    let s: Arc<dyn ObjectStore> = Arc::new(g.store("killed", "").await);
    let up = engine(s.clone(), opts.clone())
        .upload_file(&f, "big", &Metadata::new())
        .await
        .unwrap();
    assert!(up.resumed_parts >= 6, "upload started over: {up:?}");
    assert!(up.bytes_sent < 96 * MIB);

    // Download, killed part-way.
    let pid = g.pid().unwrap() as i32;
    let trigger = Arc::new(Trigger {
        after: 40 * MIB,
        seen: AtomicU64::new(0),
        fired: AtomicBool::new(false),
        f: move || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        },
    });
    let out = d.path().join("out/big");
    let err = engine_with(s.clone(), opts.clone(), trigger)
        .download_file("big", &out, None)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(!out.exists());
    g.restart().await;
    let s: Arc<dyn ObjectStore> = Arc::new(g.store("killed", "").await);
    let down = engine(s, opts)
        .download_file("big", &out, None)
        .await
        .unwrap();
    assert!(down.resumed_chunks >= 4, "download started over: {down:?}");
    assert_eq!(down.verified, Verified::Parts);
    assert_eq!(sha256(&out), sha256(&f));
}

/// Objects over 5 GB: part size chosen so parts stay within S3's limits; content checked at
/// both ends (tail read back with a range).
#[tokio::test]
async fn object_over_5_gb() {
    let (_g, s) = garage_store("huge", "").await;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("huge.img");
    let size = 5 * 1024 * MIB + 300 * MIB;
    sparse_image(&f, size, &[(0, 4096), (size - 3 * MIB, (3 * MIB) as usize)]);
    let e = engine(
        s.clone(),
        TransferOptions {
            part_size: Some(64 * MIB),
            ..Default::default()
        },
    );
    let up = e
        .upload_file(&f, "huge.img", &Metadata::new())
        .await
        .unwrap();
    assert_eq!(up.parts, 85);
    let head = s.head("huge.img", None).await.unwrap();
    assert_eq!(head.size, size);
    assert_eq!(head.sha256(), Some(sha256(&f).as_str()));
    let out = d.path().join("huge.out");
    let down = e.download_file("huge.img", &out, None).await.unwrap();
    assert_eq!(down.verified, Verified::Parts);
    assert!(allocated(&out) < 64 * MIB);
}

#[tokio::test]
async fn errors_bad_credentials_missing_bucket_and_key_wrong_region_endpoint_down() {
    let (mut g, s) = garage_store("errors", "").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::missing_key(s.clone(), d.path()).await;

    // Unknown access key: Garage answers AccessDenied and says why.
    let mut st = g.settings("errors", "");
    st.static_credentials = Some(("GK0000000000000000000000ff".into(), "x".into(), None));
    let err = S3Store::connect(&st)
        .await
        .unwrap()
        .list("")
        .await
        .unwrap_err();
    match &err {
        Error::AccessDenied { message, .. } => {
            assert!(
                message.as_deref().unwrap_or("").contains("No such key"),
                "{err}"
            )
        }
        Error::BadCredentials { problem, .. } => {
            assert_eq!(*problem, CredentialProblem::UnknownAccessKey)
        }
        other => panic!("unexpected: {other}"),
    }
    assert!(err.to_string().contains("IAM policy"), "{err}");

    // Wrong secret, on a HEAD (no body): the message still says which.
    let mut st = g.settings("errors", "");
    st.static_credentials = Some((g.key_id.clone(), "0".repeat(64), None));
    let err = S3Store::connect(&st)
        .await
        .unwrap()
        .head("anything", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AccessDenied { message: Some(m), .. } if m.contains("signature"))
            || matches!(
                &err,
                Error::BadCredentials {
                    problem: CredentialProblem::WrongSecret,
                    ..
                }
            ),
        "{err}"
    );

    // Missing bucket.
    let err = g
        .store("no-such-bucket", "")
        .await
        .list("")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoSuchBucket { .. }), "{err}");
    assert!(err.to_string().contains("store init"));

    // Wrong region.
    let mut st = g.settings("errors", "");
    st.region = Some("eu-west-1".into());
    let err = S3Store::connect(&st)
        .await
        .unwrap()
        .list("")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongRegion { .. }), "{err}");
    assert!(err.to_string().contains("--region"));

    // Endpoint down.
    g.kill();
    let err = s.list("").await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&g.endpoint()), "{err}");
}

/// Garage has no versioning or bucket encryption: `init` reports each as unsupported (and
/// creates the bucket, with the region as LocationConstraint); `versions` is a clear error.
#[tokio::test]
async fn init_and_versions_report_what_garage_lacks() {
    let g = Garage::start().await;
    let s = g.store("made-by-init", "").await;
    let steps = s
        .init(&InitOptions {
            versioning: true,
            noncurrent_days: Some(30),
            abort_incomplete_days: Some(7),
            encryption: true,
        })
        .await
        .unwrap();
    let status = |f: &str| {
        steps
            .iter()
            .find(|s| s.feature == f)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(status("bucket"), StepStatus::Done, "{steps:?}");
    assert_eq!(status("versioning"), StepStatus::Unsupported, "{steps:?}");
    assert_eq!(status("encryption"), StepStatus::Unsupported, "{steps:?}");
    assert_ne!(status("lifecycle"), StepStatus::Failed, "{steps:?}");
    // Again: the bucket exists.
    let steps = s
        .init(&InitOptions {
            versioning: false,
            noncurrent_days: None,
            abort_incomplete_days: None,
            encryption: false,
        })
        .await
        .unwrap();
    assert_eq!(steps[0].status, StepStatus::AlreadyDone);
    s.put(
        "k",
        infra_store::Body::Bytes(bytes::Bytes::from_static(b"x")),
        &Metadata::new(),
    )
    .await
    .unwrap();
    let err = s.versions("k").await.unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("versions"), "{err}");
}

fn aws(g: &Garage, args: &[&str]) -> std::process::Output {
    let mut c = Command::new("aws");
    c.args(["--endpoint-url", &g.endpoint(), "--region", GARAGE_REGION])
        .args(args)
        .env_remove("AWS_PROFILE");
    for (k, v) in g.env() {
        c.env(k, v);
    }
    let out = c.output().unwrap_or_else(|e| {
        panic!("the aws CLI is needed for the interop tests (pip install awscli): {e}")
    });
    assert!(
        out.status.success(),
        "aws {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Objects we upload are read by `aws s3 cp`, and objects it uploads (multipart, 8 MiB parts)
/// are read by us; sync recognises its objects as unchanged from the ETag alone.
#[tokio::test]
async fn interop_with_aws_cli() {
    let (g, s) = garage_store("interop", "").await;
    let d = tempfile::tempdir().unwrap();
    let ours = d.path().join("ours.bin");
    random_file(&ours, (21 * MIB) as usize, 21);
    let e = engine(s.clone(), TransferOptions::default());
    e.upload_file(&ours, "ours.bin", &Metadata::new())
        .await
        .unwrap();
    let theirs_copy = d.path().join("ours.via-aws");
    aws(
        &g,
        &[
            "s3",
            "cp",
            "s3://interop/ours.bin",
            theirs_copy.to_str().unwrap(),
        ],
    );
    assert_eq!(sha256(&theirs_copy), sha256(&ours));
    // Our metadata is visible to them.
    let head = aws(
        &g,
        &[
            "s3api",
            "head-object",
            "--bucket",
            "interop",
            "--key",
            "ours.bin",
        ],
    );
    assert!(String::from_utf8_lossy(&head.stdout).contains(&sha256(&ours)));

    let theirs = d.path().join("theirs.bin");
    random_file(&theirs, (19 * MIB) as usize, 19);
    aws(
        &g,
        &[
            "s3",
            "cp",
            theirs.to_str().unwrap(),
            "s3://interop/dir/theirs.bin",
        ],
    );
    let got = d.path().join("theirs.got");
    let down = e.download_file("dir/theirs.bin", &got, None).await.unwrap();
    assert_eq!(
        down.verified,
        Verified::Unverified,
        "aws-cli does not store a sha256"
    );
    assert_eq!(sha256(&got), sha256(&theirs));

    // Sync from a directory holding the same file: unchanged, by recomputing aws-cli's ETag.
    let dir = d.path().join("mirror/dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&theirs, dir.join("theirs.bin")).unwrap();
    let r = infra_store::sync::sync(
        &infra_store::sync::SyncSide::Dir(d.path().join("mirror")),
        &infra_store::sync::SyncSide::Store(s.clone()),
        &infra_store::sync::SyncOptions {
            filters: vec![infra_store::glob::Filter::Include("dir/*".into())],
            ..Default::default()
        },
        &TransferOptions::default(),
        Arc::new(infra_store::NoProgress),
        Arc::new(infra_store::HashCache::in_memory()),
    )
    .await
    .unwrap();
    assert!(r.actions.is_empty(), "{:?}", r.actions);
    assert_eq!(r.unchanged, 1);
}

/// `rootfs upload/download` layout: image + manifest at the prefix root, compressed form
/// restoring a sparse file, the newer form chosen on download, `list --remote` entries.
#[tokio::test]
async fn rootfs_artifacts_layout() {
    let (_g, s) = garage_store("artifacts", "staging").await;
    let d = tempfile::tempdir().unwrap();
    let paths = infra_config::Paths::under(d.path().join("home"));
    std::fs::create_dir_all(&paths.images).unwrap();
    let img = paths.image("python");
    sparse_image(&img, 256 * MIB, &[(0, 1 << 20), (100 * MIB, 1 << 20)]);
    std::fs::write(
        infra_config::Paths::manifest_for(&img),
        b"{\"name\":\"python\"}",
    )
    .unwrap();
    let e = engine(s.clone(), TransferOptions::default());
    let up = artifacts::upload_image(&e, &paths, "python", true)
        .await
        .unwrap();
    assert_eq!(up.len(), 2);
    let keys: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["rootfs-python.ext4.zst", "rootfs-python.json"]);
    let other = infra_config::Paths::under(d.path().join("host2"));
    let got = artifacts::ensure_image(&e, &other, "python")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(sha256(&other.image("python")), sha256(&img));
    assert!(allocated(&other.image("python")) < 16 * MIB);
    assert!(artifacts::ensure_image(&e, &other, "python")
        .await
        .unwrap()
        .is_none());
    let imgs = artifacts::remote_images(&s.list("").await.unwrap());
    assert_eq!(imgs.len(), 1);
    assert!(imgs[0].compressed);
    assert!(matches!(
        artifacts::download_image(
            &e,
            &paths,
            "nodejs",
            Some(Path::new("/nonexistent/x")),
            None
        )
        .await,
        Err(Error::NoSuchKey { .. })
    ));
}

#[tokio::test]
async fn sync_does_not_follow_links_in_destination() {
    let (_g, s) = garage_store("links", "").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::sync_does_not_follow_links_in_destination(s, d.path()).await;
}

/// Plants objects with the AWS CLI, keys exactly as given (hostile ones included).
fn plant(g: &Garage, bucket: &str, keys: &[&str], dir: &Path) {
    for (i, key) in keys.iter().enumerate() {
        let body = dir.join(format!("body-{i}"));
        std::fs::write(&body, format!("content of {key}")).unwrap();
        aws(
            g,
            &[
                "s3api",
                "put-object",
                "--bucket",
                bucket,
                "--key",
                key,
                "--body",
                body.to_str().unwrap(),
            ],
        );
    }
}

/// Keys planted through the AWS CLI that are not safe as local paths (`../../x`, `a/../b`,
/// `a//b`, `./dot`, an absolute path) are skipped and named when syncing the bucket into a
/// directory and into a local store; the other objects are transferred and nothing is written
/// outside the destination.
#[tokio::test]
async fn sync_skips_unsafe_keys_planted_with_aws_cli() {
    let g = Garage::start().await;
    g.create_bucket("hostile").await;
    let d = tempfile::tempdir().unwrap();
    let bodies = d.path().join("bodies");
    std::fs::create_dir_all(&bodies).unwrap();
    // The destination is two levels down, so `../../x` would land in `d/x`.
    let dest = d.path().join("one/two");
    let abs = d.path().join("abs-escaped");
    let abs_key = abs.to_str().unwrap().to_string();
    let hostile = ["../../x", "a/../b", "a//b", "./dot", abs_key.as_str()];
    let good = ["good.txt", "dir/ok.bin"];
    // Planted under the prefix `pre/`: Garage drops a leading '/' of a whole key, but
    // `pre//tmp/…` seen through the prefix is the absolute key `/tmp/…`.
    let planted: Vec<String> = hostile
        .iter()
        .chain(&good)
        .map(|k| format!("pre/{k}"))
        .collect();
    let planted: Vec<&str> = planted.iter().map(String::as_str).collect();
    plant(&g, "hostile", &planted, &bodies);
    let s: Arc<dyn ObjectStore> = Arc::new(g.store("hostile", "pre").await);
    // The server kept the keys as planted (else this test would prove nothing).
    let mut listed: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    listed.sort();
    let mut want: Vec<String> = hostile.iter().chain(&good).map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(listed, want);

    let r = infra_store::sync::sync(
        &infra_store::sync::SyncSide::Store(s.clone()),
        &infra_store::sync::SyncSide::Dir(dest.clone()),
        &Default::default(),
        &TransferOptions::default(),
        Arc::new(infra_store::NoProgress),
        Arc::new(infra_store::HashCache::in_memory()),
    )
    .await
    .unwrap();
    let mut skipped: Vec<String> = r.skipped.iter().map(|k| k.key.clone()).collect();
    skipped.sort();
    let mut want_skipped: Vec<String> = hostile.iter().map(|k| k.to_string()).collect();
    want_skipped.sort();
    assert_eq!(skipped, want_skipped, "{r:?}");
    assert_eq!(r.actions.len(), 2, "{r:?}");
    assert_eq!(
        std::fs::read(dest.join("good.txt")).unwrap(),
        b"content of pre/good.txt"
    );
    assert_eq!(
        std::fs::read(dest.join("dir/ok.bin")).unwrap(),
        b"content of pre/dir/ok.bin"
    );
    for escaped in [
        d.path().join("x"),
        abs.clone(),
        dest.join("b"),
        dest.join("dot"),
    ] {
        assert!(!escaped.exists(), "{} was written", escaped.display());
    }
    for s in &r.skipped {
        assert!(s.reason.contains("not safe as a local path"), "{s:?}");
    }

    // Into a local store (`file://`): the same keys are skipped, the sync goes on.
    let local_root = d.path().join("local/store");
    let local: Arc<dyn ObjectStore> = Arc::new(infra_store::LocalStore::new(&local_root, ""));
    let r = infra_store::sync::sync(
        &infra_store::sync::SyncSide::Store(s.clone()),
        &infra_store::sync::SyncSide::Store(local.clone()),
        &Default::default(),
        &TransferOptions::default(),
        Arc::new(infra_store::NoProgress),
        Arc::new(infra_store::HashCache::in_memory()),
    )
    .await
    .unwrap();
    assert_eq!(r.skipped.len(), hostile.len(), "{r:?}");
    let mut local_keys: Vec<String> = local
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    local_keys.sort();
    assert_eq!(local_keys, ["dir/ok.bin", "good.txt"]);
    assert!(!d.path().join("x").exists() && !d.path().join("local/x").exists());
    assert!(!abs.exists());

    // Bucket → bucket copies are not local paths: every key is copied as it is.
    g.create_bucket("hostile-copy").await;
    let copy: Arc<dyn ObjectStore> = Arc::new(g.store("hostile-copy", "").await);
    let r = infra_store::sync::sync(
        &infra_store::sync::SyncSide::Store(s),
        &infra_store::sync::SyncSide::Store(copy),
        &Default::default(),
        &TransferOptions::default(),
        Arc::new(infra_store::NoProgress),
        Arc::new(infra_store::HashCache::in_memory()),
    )
    .await
    .unwrap();
    assert!(r.skipped.is_empty(), "{r:?}");
    assert_eq!(r.actions.len(), hostile.len() + good.len());
}

#[tokio::test]
async fn part_lists_verified_and_hostile_lists_refused() {
    let (_g, s) = garage_store("parts", "dev").await;
    let d = tempfile::tempdir().unwrap();
    scenarios::part_lists(s, d.path()).await;
}
