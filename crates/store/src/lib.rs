//! Object storage for rootfs images, the kernel and (later) snapshots.
//!
//! One interface, [`ObjectStore`], with two backends: [`S3Store`] (AWS S3 and compatible
//! servers such as Garage, MinIO, Ceph) and [`LocalStore`] (a directory; the embedded default
//! when no bucket is configured, so every command works offline). On top of it the transfer
//! [`Engine`] (multipart, ranged parallel downloads verified part by part against the part list
//! recorded at upload, see [`parts`], or against the whole-object sha256 in the metadata,
//! temp file + fsync + rename, resume), zstd compression, [`sync`], versions and the cost table.
//!
//! Layout of a store (compatible with the seed's bucket, so `aws s3 ls` users recognise it):
//! `vmlinux`, `rootfs-{lang}.ext4` and `rootfs-{lang}.json` at the prefix root, optionally
//! `rootfs-{lang}.ext4.zst`; `snapshots/{lang}/...` is reserved.

pub mod artifacts;
mod compress;
mod config;
pub mod cost;
mod error;
pub mod glob;
mod hashes;
pub mod keys;
mod local;
mod object;
pub mod parts;
mod progress;
pub mod report;
mod s3;
pub mod sync;
mod transfer;

pub use compress::{ZSTD_LEVEL, ZST_SUFFIX};
pub use config::{Location, Origin, StoreConfig, StoreFlags, CONFIG_ENV};
pub use error::{CredentialProblem, Error, Result, ACCESS_DENIED_HINTS};
pub use hashes::{
    etag_of_file, local_matches_etag, parse_etag, sha256_file, sha256_file_parts, HashCache,
};
pub use keys::{
    check_component, check_key, existing_key_path, prepare_key_path, safe_key_path, KeyProblem,
};
pub use local::{LocalStore, STATE_DIR};
pub use object::{
    group_listing, BackendKind, Body, ByteChunks, GetOptions, GetResponse, InitOptions, InitStep,
    ListPage, Metadata, ObjectInfo, ObjectStore, PartInfo, PutResult, StepStatus, VersionInfo,
    META_SHA256, META_UNCOMPRESSED_SHA256, META_UNCOMPRESSED_SIZE,
};
pub use progress::{NoProgress, Progress};
pub use s3::{S3Settings, S3Store, Sse, DEFAULT_REGION};
pub use transfer::{
    auto_part_size, choose_part_size, partial_paths, DownloadSummary, Engine, TransferOptions,
    UploadSummary, Verified, DEFAULT_CONCURRENCY, DEFAULT_PART, MAX_PARTS,
};

#[cfg(feature = "testing")]
pub mod testing;
