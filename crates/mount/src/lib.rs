//! A bucket as a file system: FUSE (the `fuser` crate) over the store crate's [`ObjectStore`],
//! compatible with s3fs-fuse in both directions (same object layout and metadata headers).
//!
//! - [`options`]: the `-o` options (ours, s3fs's spellings, fstab's).
//! - [`meta`]: attributes in `x-amz-meta-*` exactly as s3fs stores them.
//! - [`fs`]: the file system itself (inodes, listing and attribute caches, ranged reads with
//!   prefetch, writes through staging files), independent of FUSE.
//! - `fuse`: the adapter to the kernel; [`error::errno`] is the one errno mapping.
//! - [`run`]: checking the bucket, mounting, readiness (daemon, systemd), unmounting.
//!
//! What is guaranteed and what is not is written in `docs/mount-semantics.md`.
//!
//! [`ObjectStore`]: infra_store::ObjectStore

pub mod error;
pub mod fs;
mod fuse;
pub mod meta;
pub mod options;
pub mod run;

pub use error::{errno, FsError, MountError};
pub use fs::{Fs, FsConfig};
pub use options::MountOptions;
pub use run::{serve, serve_store, systemd_unit, unmount, MountRequest, StoreSettings, SUBTYPE};
