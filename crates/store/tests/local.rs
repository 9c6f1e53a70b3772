//! The store scenarios against the local-directory store (always runs, no server).

mod common;

use std::sync::Arc;

use common::scenarios;
use infra_store::{LocalStore, ObjectStore};

fn store(dir: &std::path::Path, prefix: &str) -> Arc<dyn ObjectStore> {
    Arc::new(LocalStore::new(dir.join("store"), prefix))
}

#[tokio::test]
async fn round_trip_sparse_image() {
    let d = tempfile::tempdir().unwrap();
    scenarios::round_trip_sparse(store(d.path(), "dev"), d.path(), 512 * common::MIB).await;
}

#[tokio::test]
async fn multipart_etag() {
    let d = tempfile::tempdir().unwrap();
    scenarios::multipart_etag(store(d.path(), ""), d.path()).await;
}

#[tokio::test]
async fn resume_upload() {
    let d = tempfile::tempdir().unwrap();
    scenarios::resume_upload(store(d.path(), ""), d.path()).await;
}

#[tokio::test]
async fn resume_download() {
    let d = tempfile::tempdir().unwrap();
    scenarios::resume_download(store(d.path(), ""), d.path()).await;
}

#[tokio::test]
async fn checksum_mismatch_keeps_old_file() {
    let d = tempfile::tempdir().unwrap();
    scenarios::checksum_mismatch_keeps_old(store(d.path(), ""), d.path()).await;
}

#[tokio::test]
async fn missing_key() {
    let d = tempfile::tempdir().unwrap();
    scenarios::missing_key(store(d.path(), ""), d.path()).await;
}

#[tokio::test]
async fn sync_both_ways() {
    let d = tempfile::tempdir().unwrap();
    let other = Arc::new(LocalStore::new(d.path().join("backup"), "prod"));
    scenarios::sync_both_ways(store(d.path(), "prod"), other, d.path()).await;
}

#[tokio::test]
async fn manifest_sha_is_verified() {
    let d = tempfile::tempdir().unwrap();
    scenarios::manifest_sha_is_verified(store(d.path(), ""), d.path()).await;
}

#[tokio::test]
async fn sync_does_not_follow_links_in_destination() {
    let d = tempfile::tempdir().unwrap();
    scenarios::sync_does_not_follow_links_in_destination(store(d.path(), ""), d.path()).await;
}

#[tokio::test]
async fn kernel_bundle() {
    let d = tempfile::tempdir().unwrap();
    scenarios::kernel_bundle(store(d.path(), ""), d.path()).await;
}

#[tokio::test]
async fn part_lists_verified_and_hostile_lists_refused() {
    let d = tempfile::tempdir().unwrap();
    scenarios::part_lists(store(d.path(), "dev"), d.path()).await;
}
