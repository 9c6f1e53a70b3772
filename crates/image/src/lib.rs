//! Builds the ext4 root filesystems that microVMs boot, from OCI/Docker images or a distribution
//! bootstrap, with the infra.operator guest agent injected.
//!
//! ```text
//! ImageSource ──layers──▶ Unpacker ──tree──▶ Inject ──▶ Ext4 (mke2fs -d) ──▶ e2fsck ──▶ Manifest
//! (registry | daemon |    (whiteouts,          (agent,    (sparse, auto size,            (sha256,
//!  archive | debootstrap)  path safety)         init)      reproducible)                   config)
//! ```
//!
//! The contract: the same input gives a byte-identical image; a failed build leaves nothing
//! under the final path; hostile archives are refused before anything is written outside the
//! work directory.

pub mod build;
pub mod debootstrap;
pub mod error;
pub mod ext4;
pub mod inject;
pub mod manifest;
pub mod progress;
pub mod source;
pub mod tools;
pub mod unpack;

pub use build::{build, BuildRequest, Origin};
pub use error::{Error, Result};
pub use manifest::{list_local, LocalImage, Manifest};
pub use progress::{NoProgress, Progress};
pub use unpack::UnpackLimits;
