//! Helpers shared by the store tests: sparse test images, hashes, engines.

#![allow(dead_code)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use infra_store::{Engine, HashCache, NoProgress, ObjectStore, Progress, TransferOptions};
use sha2::{Digest, Sha256};

pub const MIB: u64 = 1024 * 1024;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse file of `size` bytes with data at the given (offset, len) regions.
pub fn sparse_image(path: &Path, size: u64, regions: &[(u64, usize)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in regions.iter().enumerate() {
        f.write_all_at(&noise(i as u64 + 1, *len), *off).unwrap();
    }
    f.sync_all().unwrap();
}

/// A file of `len` pseudo-random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, noise(seed, len)).unwrap();
}

pub fn sha256(path: &Path) -> String {
    infra_store::sha256_file(path, |_| {}).unwrap()
}

/// Bytes allocated on disk (to check sparseness).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

pub fn engine(store: Arc<dyn ObjectStore>, opts: TransferOptions) -> Engine {
    engine_with(store, opts, Arc::new(NoProgress))
}

pub fn engine_with(
    store: Arc<dyn ObjectStore>,
    opts: TransferOptions,
    progress: Arc<dyn Progress>,
) -> Engine {
    Engine::new(store, opts, progress, Arc::new(HashCache::in_memory()))
}

/// Options with small parts so tests exercise multipart with little data.
pub fn small_parts(state_dir: &Path) -> TransferOptions {
    TransferOptions {
        part_size: Some(5 * MIB),
        concurrency: 4,
        multipart_threshold: 5 * MIB,
        state_dir: Some(state_dir.to_path_buf()),
    }
}

pub fn hex_sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Calls `f` once when more than `after` bytes were reported (to kill a server mid-transfer).
pub struct Trigger<F: Fn() + Send + Sync> {
    pub after: u64,
    pub seen: std::sync::atomic::AtomicU64,
    pub fired: std::sync::atomic::AtomicBool,
    pub f: F,
}

impl<F: Fn() + Send + Sync> Progress for Trigger<F> {
    fn start(&self, _: &str, _: &str, _: Option<u64>) {}
    fn advance(&self, id: &str, bytes: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        if id.starts_with("sha256:") {
            return;
        }
        let now = self.seen.fetch_add(bytes, SeqCst) + bytes;
        if now > self.after && !self.fired.swap(true, SeqCst) {
            (self.f)();
        }
    }
    fn finish(&self, _: &str) {}
    fn note(&self, _: &str) {}
}
pub mod scenarios;
