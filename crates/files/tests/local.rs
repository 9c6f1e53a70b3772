//! The scenarios against the local-directory store and SQLite (no server needed).

mod common;

use common::Env;
use infra_files::{FilesConfig, MetadataStore};

fn env(dir: &std::path::Path) -> Env {
    let paths = infra_config::Paths::under(dir);
    let mut cfg = FilesConfig::embedded(&paths);
    // A key prefix, as a tenant would have.
    cfg.config.key_prefix = Some("tenant-a".into());
    Env { cfg, paths }
}

#[tokio::test]
async fn round_trip() {
    let d = tempfile::tempdir().unwrap();
    common::round_trip(&env(d.path())).await;
    // Objects live under <storage_dir>/<key_prefix>/files/.
    assert!(d.path().join("store/tenant-a").is_dir());
}

#[tokio::test]
async fn large_multipart() {
    let d = tempfile::tempdir().unwrap();
    common::large_multipart(&env(d.path())).await;
}

#[tokio::test]
async fn too_large_and_broken_bodies() {
    let d = tempfile::tempdir().unwrap();
    common::too_large_and_broken_bodies(&env(d.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_with_concurrent_inserts() {
    let d = tempfile::tempdir().unwrap();
    common::pagination_with_concurrent_inserts(&env(d.path())).await;
}

#[tokio::test]
async fn expiry() {
    let d = tempfile::tempdir().unwrap();
    common::expiry(&env(d.path())).await;
}

#[tokio::test]
async fn uploads() {
    let d = tempfile::tempdir().unwrap();
    common::uploads(&env(d.path())).await;
}

#[tokio::test]
async fn sweeper() {
    let d = tempfile::tempdir().unwrap();
    common::sweeper(&env(d.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_sqlite_file() {
    let d = tempfile::tempdir().unwrap();
    common::two_instances(&env(d.path())).await;
}

#[tokio::test]
async fn sqlite_is_in_wal_mode() {
    let d = tempfile::tempdir().unwrap();
    let e = env(d.path());
    let _files = e.open().await;
    let MetadataStore::Sqlite { db_path } = &e.cfg.config.metadata_store else {
        unreachable!()
    };
    assert!(db_path.is_file());
    assert!(
        db_path.with_extension("db-wal").exists(),
        "no WAL file next to {}",
        db_path.display()
    );
    // Opening again (migrations already applied) works.
    let _again = e.open().await;
}

/// A store that fails mid-multipart: the upload is aborted, nothing is left.
#[tokio::test]
async fn store_failure_mid_multipart_leaves_nothing() {
    use infra_store::testing::{Faults, FaultyStore};
    use infra_store::{LocalStore, ObjectStore};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let d = tempfile::tempdir().unwrap();
    let e = env(d.path());
    let inner: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(d.path().join("store"), "tenant-a"));
    let faults = Faults::none();
    faults.fail_parts_after.store(2, Ordering::SeqCst);
    let store = Arc::new(FaultyStore::new(inner.clone(), faults.clone()));
    let files = infra_files::Files::open_with_store(&e.cfg, &e.paths, store)
        .await
        .unwrap();
    let err = files
        .create(
            common::new_file("big.bin", infra_files::Purpose::UserData),
            common::body(&common::noise(1, 40 * common::MIB), common::MIB),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), infra_files::ErrorKind::Unavailable, "{err}");
    // The third part fails; with two parts in flight, at most one more was already sent,
    // and nothing after the failure was seen.
    let calls = faults.part_calls.load(Ordering::SeqCst);
    assert!((3..=4).contains(&calls), "{calls} part uploads");
    assert!(inner.list("").await.unwrap().is_empty());
    assert!(common::all_ids(&files).await.is_empty());
}

/// The metadata insert fails after the object was written: the object is deleted.
#[tokio::test]
async fn row_insert_failure_deletes_the_object() {
    let d = tempfile::tempdir().unwrap();
    let e = env(d.path());
    let files = e.open().await;
    let MetadataStore::Sqlite { db_path } = &e.cfg.config.metadata_store else {
        unreachable!()
    };
    // Break the table under the running instance.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db_path.display()))
        .await
        .unwrap();
    sqlx::query("ALTER TABLE files RENAME TO files_elsewhere")
        .execute(&pool)
        .await
        .unwrap();
    for size in [100, 9 * common::MIB] {
        let err = files
            .create(
                common::new_file("x.bin", infra_files::Purpose::UserData),
                common::body(&common::noise(2, size), common::MIB),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, infra_files::FilesError::Db { .. }), "{err}");
        assert!(common::object_keys(&files).await.is_empty(), "{size}");
    }
}
