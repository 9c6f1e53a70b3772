//! Snapshots in the object store, in the seed's layout: `snapshots/{lang}/manifest.json` and
//! each state file compressed as `snapshots/{lang}/{file}.zst`.
//!
//! Upload verifies the local snapshot first (a corrupt one is not published), sends every state
//! file zstd-compressed (holes of a sparse file are read as zeros without touching the disk,
//! and guest memory is mostly zeros: an idle Python VM's 512 MiB of RAM went as 15.8 MiB),
//! and the manifest last, so a reader that sees the new manifest finds its files.
//!
//! Download treats the store as untrusted: the manifest is read with a size limit, must be of
//! the language asked for, and names only plain files ([`snapshot::check_file_list`]) before
//! any of them becomes a key or a path. Files are written sparse into a temporary directory
//! beside the final one, each checked against the manifest's size and sha256, then the
//! directory is swapped in whole ([`snapshot::install`]); a failure leaves the old snapshot,
//! or none, and nothing half-written.

use std::path::Path;

use chrono::{DateTime, Utc};
use infra_config::Paths;
use infra_store::artifacts::{read_small, MAX_MANIFEST_BYTES, SNAPSHOTS_PREFIX};
use infra_store::{DownloadSummary, Engine, Metadata, UploadSummary, ZST_SUFFIX};
use serde::Serialize;

use crate::error::RunError;
use crate::snapshot::{self, SnapshotManifest, MANIFEST};

/// `snapshots/{lang}/manifest.json`.
pub fn manifest_key(lang: &str) -> String {
    format!("{SNAPSHOTS_PREFIX}{lang}/{MANIFEST}")
}

/// `snapshots/{lang}/{file}.zst`.
pub fn file_key(lang: &str, file: &str) -> String {
    format!("{SNAPSHOTS_PREFIX}{lang}/{file}{ZST_SUFFIX}")
}

/// Uploads the snapshot of `lang` on this host: its state files compressed, then the manifest.
pub async fn upload(
    engine: &Engine,
    paths: &Paths,
    lang: &str,
) -> Result<Vec<UploadSummary>, RunError> {
    let dir = snapshot::snapshot_dir(&paths.home, lang);
    let m = snapshot::read_manifest(&dir).map_err(|e| {
        RunError::Usage(format!(
            "there is no usable snapshot of {lang} in {} ({e}); make one with `infra.operator snapshot create --lang {lang}`",
            dir.display()
        ))
    })?;
    let refuse = |reason: String| RunError::Snapshot {
        dir: dir.clone(),
        lang: lang.to_string(),
        reason,
    };
    if m.machine.lang != lang {
        return Err(refuse(format!(
            "its manifest is of {}, not {lang}",
            m.machine.lang
        )));
    }
    snapshot::verify_files(&paths.cache, &dir, &m).map_err(refuse)?;
    let mut out = Vec::new();
    for (name, d) in &m.files {
        out.push(
            engine
                .upload_compressed(
                    &dir.join(name),
                    &file_key(lang, name),
                    &Metadata::new(),
                    Some(&d.sha256),
                )
                .await?,
        );
    }
    out.push(
        engine
            .upload_file(&dir.join(MANIFEST), &manifest_key(lang), &Metadata::new())
            .await?,
    );
    Ok(out)
}

/// Reads and checks the manifest of `lang`'s snapshot in the store.
pub async fn remote_manifest(engine: &Engine, lang: &str) -> Result<SnapshotManifest, RunError> {
    let store = engine.store();
    let key = manifest_key(lang);
    let raw = read_small(store.as_ref(), &key, MAX_MANIFEST_BYTES).await?;
    let corrupt = |reason: String| {
        RunError::Store(infra_store::Error::Corrupt {
            target: store.url_of(&key),
            reason,
        })
    };
    let m: SnapshotManifest = serde_json::from_slice(&raw)
        .map_err(|e| corrupt(format!("it is not a snapshot manifest: {e}")))?;
    if m.machine.lang != lang {
        return Err(corrupt(format!(
            "it describes a snapshot of {:?}, not of {lang}",
            m.machine.lang.escape_debug().to_string()
        )));
    }
    snapshot::check_file_list(&m).map_err(corrupt)?;
    Ok(m)
}

/// Downloads `lang`'s snapshot from the store into `<home>/snapshots/{lang}/`, replacing the
/// one there only once the new one is complete and verified.
pub async fn download(
    engine: &Engine,
    paths: &Paths,
    lang: &str,
) -> Result<(SnapshotManifest, Vec<DownloadSummary>), RunError> {
    let m = remote_manifest(engine, lang).await?;
    let store = engine.store();
    let dir = snapshot::snapshot_dir(&paths.home, lang);
    let parent = paths.snapshots();
    infra_config::ensure_dir(&parent, 0o755)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".download-{lang}-"))
        .tempdir_in(&parent)
        .map_err(|e| {
            RunError::Prerequisite(format!(
                "cannot create a directory in {}: {e}; check its permissions and free space",
                parent.display()
            ))
        })?;
    let mut out = Vec::new();
    for (name, want) in &m.files {
        let key = file_key(lang, name);
        let got = engine
            .download_compressed(&key, &tmp.path().join(name), None)
            .await?;
        if got.sha256 != want.sha256.to_ascii_lowercase() || got.size != want.bytes {
            return Err(RunError::Store(infra_store::Error::ChecksumMismatch {
                target: store.url_of(&key),
                expected: format!("{} ({} bytes)", want.sha256, want.bytes),
                actual: format!("{} ({} bytes)", got.sha256, got.size),
                path: None,
            }));
        }
        out.push(got);
    }
    let json = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
    let manifest = tmp.path().join(MANIFEST);
    infra_config::write_atomic(&manifest, &json).map_err(|e| {
        RunError::Prerequisite(format!(
            "cannot write {}: {e}; check free space",
            manifest.display()
        ))
    })?;
    let tmp = tmp.keep();
    snapshot::install(&tmp, &dir, &paths.cache, &m)?;
    Ok((m, out))
}

/// A snapshot in the store (`snapshot list --remote`).
#[derive(Debug, Serialize)]
pub struct RemoteSnapshot {
    /// Language.
    pub lang: String,
    /// Bytes stored (compressed state files and manifest).
    pub stored_bytes: u64,
    /// Newest modification among its objects.
    pub last_modified: Option<DateTime<Utc>>,
    /// The manifest, when it is readable and valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<SnapshotManifest>,
    /// Why it is not usable, otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The snapshots in the store, by language.
pub async fn remote_list(engine: &Engine) -> Result<Vec<RemoteSnapshot>, RunError> {
    let objects = engine.store().list(SNAPSHOTS_PREFIX).await?;
    let mut by_lang: std::collections::BTreeMap<String, (u64, Option<DateTime<Utc>>)> =
        Default::default();
    for o in &objects {
        let Some((lang, _)) = o
            .key
            .strip_prefix(SNAPSHOTS_PREFIX)
            .and_then(|r| r.split_once('/'))
        else {
            continue;
        };
        let e = by_lang.entry(lang.to_string()).or_default();
        e.0 += o.size;
        e.1 = e.1.max(o.last_modified);
    }
    let mut out = Vec::new();
    for (lang, (stored_bytes, last_modified)) in by_lang {
        let (manifest, error) = if infra_store::artifacts::check_name(&lang).is_err() {
            (None, Some("not a language name".to_string()))
        } else {
            match remote_manifest(engine, &lang).await {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(e.to_string())),
            }
        };
        out.push(RemoteSnapshot {
            lang,
            stored_bytes,
            last_modified,
            manifest,
            error,
        });
    }
    Ok(out)
}

/// The languages with a snapshot on this host (for `--all`).
pub fn local_langs(home: &Path) -> Vec<String> {
    snapshot::list(home)
        .into_iter()
        .filter(|(_, _, m)| m.is_ok())
        .map(|(lang, _, _)| lang)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::sync::Arc;

    use infra_store::{Body, HashCache, LocalStore, NoProgress, TransferOptions};

    use super::*;
    use crate::snapshot::FileDigest;

    const MIB: u64 = 1 << 20;

    fn engine(root: &Path) -> Engine {
        Engine::new(
            Arc::new(LocalStore::new(root, "")),
            TransferOptions::default(),
            Arc::new(NoProgress),
            Arc::new(HashCache::in_memory()),
        )
    }

    /// A snapshot like QEMU's: 64 MiB of state, mostly holes, 1 MiB of data.
    fn make_snapshot(paths: &Paths, seed: u8) -> SnapshotManifest {
        let dir = snapshot::snapshot_dir(&paths.home, "python");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vmstate.snapshot");
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(64 * MIB).unwrap();
        let data: Vec<u8> = (0..MIB as usize)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        f.write_all_at(&data, 3 * MIB).unwrap();
        let mut files = BTreeMap::new();
        files.insert(
            "vmstate.snapshot".to_string(),
            FileDigest {
                bytes: 64 * MIB,
                sha256: snapshot::sha256_file(&file).unwrap(),
            },
        );
        let m = SnapshotManifest {
            files,
            ..crate::snapshot::tests::manifest()
        };
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        m
    }

    fn leftovers(paths: &Paths) -> Vec<String> {
        std::fs::read_dir(paths.snapshots())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[tokio::test]
    async fn round_trip_compressed_sparse_and_verified() {
        let d = tempfile::tempdir().unwrap();
        let e = engine(&d.path().join("store"));
        let a = Paths::under(d.path().join("a"));
        let m = make_snapshot(&a, 1);
        let sent = upload(&e, &a, "python").await.unwrap();
        let keys: Vec<&str> = sent.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "snapshots/python/vmstate.snapshot.zst",
                "snapshots/python/manifest.json"
            ]
        );
        // 64 MiB of mostly zeros go as a small fraction (the 1 MiB of data is compressible too).
        assert!(sent[0].bytes_sent < 2 * MIB, "{}", sent[0].bytes_sent);

        let b = Paths::under(d.path().join("b"));
        let (got, _) = download(&e, &b, "python").await.unwrap();
        assert_eq!(got, m);
        let file = snapshot::snapshot_dir(&b.home, "python").join("vmstate.snapshot");
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert!(meta.blocks() * 512 < 8 * MIB, "written sparse");
        assert_eq!(
            snapshot::read_manifest(&snapshot::snapshot_dir(&b.home, "python")).unwrap(),
            m
        );
        snapshot::verify_files(&b.cache, &snapshot::snapshot_dir(&b.home, "python"), &m).unwrap();
        assert!(leftovers(&b).is_empty(), "{:?}", leftovers(&b));

        let listed = remote_list(&e).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].lang, "python");
        assert_eq!(listed[0].manifest.as_ref(), Some(&m));
    }

    #[tokio::test]
    async fn hostile_or_corrupt_store_content_is_refused_and_the_old_snapshot_kept() {
        let d = tempfile::tempdir().unwrap();
        let e = engine(&d.path().join("store"));
        let a = Paths::under(d.path().join("a"));
        let m = make_snapshot(&a, 1);
        upload(&e, &a, "python").await.unwrap();
        let b = Paths::under(d.path().join("b"));
        download(&e, &b, "python").await.unwrap();
        let b_dir = snapshot::snapshot_dir(&b.home, "python");
        let kept = snapshot::sha256_file(&b_dir.join("vmstate.snapshot")).unwrap();
        let store = e.store().clone();
        let put_manifest = |v: serde_json::Value| {
            let store = store.clone();
            async move {
                store
                    .put(
                        &manifest_key("python"),
                        Body::Bytes(serde_json::to_vec(&v).unwrap().into()),
                        &infra_store::Metadata::new(),
                    )
                    .await
                    .unwrap();
            }
        };
        let good = serde_json::to_value(&m).unwrap();
        let escape = d.path().join("escaped");
        let mut cases = Vec::new();
        for name in [
            format!("../../../../{}", escape.display()),
            "a/b".into(),
            ".hidden".into(),
            MANIFEST.into(),
            String::new(),
        ] {
            let mut v = good.clone();
            v["files"] =
                serde_json::json!({ name.clone(): {"bytes": 1, "sha256": "d".repeat(64)} });
            cases.push((v, "bad file"));
        }
        let mut v = good.clone();
        v["lang"] = "go".into();
        cases.push((v, "not of python"));
        let mut v = good.clone();
        v["files"]["vmstate.snapshot"]["sha256"] = "../x".into();
        cases.push((v, "64 hex"));
        let mut v = good.clone();
        v["files"] = serde_json::json!({});
        cases.push((v, "no state files"));
        for (v, why) in cases {
            put_manifest(v).await;
            let err = download(&e, &b, "python").await.unwrap_err();
            assert!(
                matches!(err, RunError::Store(infra_store::Error::Corrupt { .. })),
                "{why}: {err}"
            );
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert!(!escape.exists());
        }
        // A state file in the store that is not what the manifest says: discarded.
        put_manifest(good).await;
        let other = Paths::under(d.path().join("other"));
        make_snapshot(&other, 2);
        e.upload_compressed(
            &snapshot::snapshot_dir(&other.home, "python").join("vmstate.snapshot"),
            &file_key("python", "vmstate.snapshot"),
            &infra_store::Metadata::new(),
            None,
        )
        .await
        .unwrap();
        let err = download(&e, &b, "python").await.unwrap_err();
        assert!(
            matches!(
                err,
                RunError::Store(infra_store::Error::ChecksumMismatch { .. })
            ),
            "{err}"
        );
        // b's snapshot is the one it had, whole, and nothing is left behind.
        assert_eq!(
            snapshot::sha256_file(&b_dir.join("vmstate.snapshot")).unwrap(),
            kept
        );
        assert_eq!(snapshot::read_manifest(&b_dir).unwrap(), m);
        assert!(leftovers(&b).is_empty(), "{:?}", leftovers(&b));

        // A corrupted local snapshot is not published.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(snapshot::snapshot_dir(&a.home, "python").join("vmstate.snapshot"))
            .unwrap();
        f.write_all_at(b"X", 3 * MIB + 5).unwrap();
        drop(f);
        let err = upload(&e, &a, "python").await.unwrap_err();
        assert!(matches!(err, RunError::Snapshot { .. }), "{err}");
        assert!(err.to_string().contains("corrupted"), "{err}");
    }
}
