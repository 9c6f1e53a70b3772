//! The manifest written beside every image (`rootfs-{name}.json`) and the local catalogue.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result};
use crate::source::ImageConfig;

/// Version of the manifest format; bumped on incompatible changes.
pub const MANIFEST_SCHEMA: u32 = 1;

/// Where the image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// `registry`, `docker-daemon`, `docker-archive`, `oci-archive`, `oci`, `debootstrap`, `apk`.
    pub kind: String,
    /// The reference as resolved.
    pub reference: String,
    /// Manifest digest (or image id), when the source has one.
    pub digest: Option<String>,
    /// `os/arch`.
    pub platform: String,
    /// Layer digests in apply order.
    #[serde(default)]
    pub layers: Vec<String>,
}

/// How to boot the image straight into the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    /// Kernel `init=`.
    pub init: String,
    /// Arguments after `--` on the kernel command line.
    pub args: Vec<String>,
    /// Agent vsock port.
    pub port: u32,
}

/// Everything known about a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub schema: u32,
    /// Image name (`rootfs-{name}.ext4`).
    pub name: String,
    /// Language key, when built for one.
    pub language: Option<String>,
    /// Every language installed (`rootfs create --langs`); empty in manifests from before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
    /// Origin of the content.
    pub source: SourceInfo,
    /// Image file size in bytes.
    pub size_bytes: u64,
    /// Bytes used inside the filesystem.
    pub used_bytes: u64,
    /// sha256 of the image file.
    pub sha256: String,
    /// Filesystem UUID (derived from the content).
    pub fs_uuid: String,
    /// RFC 3339 build time.
    pub created_at: String,
    /// Version of the builder that made it.
    pub builder_version: String,
    /// Version of the injected agent.
    pub agent_version: String,
    /// sha256 of the injected agent binary.
    pub agent_sha256: String,
    /// Image runtime config (Env, WorkingDir, User, Entrypoint, Cmd).
    pub config: ImageConfig,
    /// How to boot it.
    pub boot: BootInfo,
    /// Init systems whose service was enabled besides PID-1 boot.
    #[serde(default)]
    pub enabled_services: Vec<String>,
}

impl Manifest {
    /// Reads a manifest file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).ctx("read manifest", path)?;
        serde_json::from_slice(&bytes).map_err(|e| crate::Error::Archive {
            path: path.into(),
            reason: format!("manifest is not valid: {e}; rebuild the image"),
        })
    }

    /// Serialized form (pretty JSON) for writing and `--json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// One image found in the local images directory.
#[derive(Debug, Clone, Serialize)]
pub struct LocalImage {
    /// Name from the file (`rootfs-{name}.ext4`).
    pub name: String,
    /// Image path.
    pub path: PathBuf,
    /// File size.
    pub size_bytes: u64,
    /// Manifest, when present and readable.
    pub manifest: Option<Manifest>,
}

/// Lists `rootfs-*.ext4` in `dir`, sorted by name, with their manifests.
pub fn list_local(dir: &Path) -> Result<Vec<LocalImage>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(crate::Error::io("read directory", dir, e)),
    };
    for e in entries {
        let e = e.ctx("read directory", dir)?;
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(name) = file
            .strip_prefix("rootfs-")
            .and_then(|f| f.strip_suffix(".ext4"))
        else {
            continue;
        };
        let path = e.path();
        let size_bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
        let manifest = Manifest::read(&path.with_extension("json")).ok();
        out.push(LocalImage {
            name: name.to_string(),
            path,
            size_bytes,
            manifest,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
