//! Where image content comes from: a registry, a Docker/Podman daemon, or a local archive.
//!
//! Every source produces a [`FetchedImage`]: layer files on disk in apply order plus the image
//! config, with every blob's digest verified on the way.

pub mod archive;
pub mod daemon;
pub mod registry;
pub mod tarindex;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The parts of the OCI image config the guest applies when it runs code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=VALUE` pairs.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory ("" when unset).
    #[serde(default)]
    pub working_dir: String,
    /// User (name, uid or uid:gid; "" when unset).
    #[serde(default)]
    pub user: String,
    /// Entrypoint argv.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default command argv.
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// A layer blob on local disk.
#[derive(Debug, Clone)]
pub struct LayerFile {
    /// Blob path (compressed as published), or the archive that holds it.
    pub path: PathBuf,
    /// Where the blob is inside `path` when that is an archive read in place; `None` for a whole
    /// file.
    pub region: Option<tarindex::Region>,
    /// `sha256:` digest of the blob, or a description for daemon exports.
    pub digest: String,
    /// Expected digest of the uncompressed tar, when the config lists it.
    pub diff_id: Option<String>,
}

/// What a source hands to the builder.
#[derive(Debug, Clone)]
pub struct FetchedImage {
    /// Source kind (`registry`, `docker-daemon`, `docker-archive`, `oci-archive`, `oci`).
    pub kind: String,
    /// The reference as normalized (e.g. `docker.io/library/python:3.12-alpine`).
    pub reference: String,
    /// Manifest (or image id) digest, when the source has one.
    pub digest: Option<String>,
    /// Platform of the selected image (`linux/amd64`).
    pub platform: String,
    /// Layers in the order they are applied.
    pub layers: Vec<LayerFile>,
    /// Runtime config from the image.
    pub config: ImageConfig,
}

/// How `--source` was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceMode {
    /// Archive transports by prefix; otherwise the local daemon if it has the image, else registry.
    #[default]
    Auto,
    /// Always the registry.
    Registry,
    /// Always the Docker/Podman daemon.
    Docker,
}

/// A parsed `--image` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `name:tag` pulled from a registry (`docker://` prefix optional).
    Registry(String),
    /// An image in the local Docker/Podman daemon (`docker-daemon:` prefix).
    Daemon(String),
    /// `docker save` output (`docker-archive:PATH[:REF]`).
    DockerArchive(PathBuf, Option<String>),
    /// OCI layout in a tar (`oci-archive:PATH[:REF]`).
    OciArchive(PathBuf, Option<String>),
    /// OCI layout directory (`oci:DIR[:REF]`).
    OciDir(PathBuf, Option<String>),
}

impl SourceSpec {
    /// Parses skopeo-style transport names; plain references are registry or daemon images.
    pub fn parse(image: &str, mode: SourceMode) -> Result<Self> {
        let image = image.trim();
        if image.is_empty() {
            return Err(Error::InvalidReference {
                reference: image.into(),
                reason: "empty".into(),
            });
        }
        let split_ref = |rest: &str| -> (PathBuf, Option<String>) {
            match rest.rsplit_once(':') {
                Some((p, r)) if !r.contains('/') && Path::new(p).exists() => {
                    (PathBuf::from(p), Some(r.to_string()))
                }
                _ => (PathBuf::from(rest), None),
            }
        };
        if let Some(rest) = image.strip_prefix("docker-archive:") {
            let (p, r) = split_ref(rest);
            return Ok(SourceSpec::DockerArchive(p, r));
        }
        if let Some(rest) = image.strip_prefix("oci-archive:") {
            let (p, r) = split_ref(rest);
            return Ok(SourceSpec::OciArchive(p, r));
        }
        if let Some(rest) = image.strip_prefix("oci:") {
            let (p, r) = split_ref(rest);
            return Ok(SourceSpec::OciDir(p, r));
        }
        if let Some(rest) = image.strip_prefix("docker-daemon:") {
            return Ok(SourceSpec::Daemon(rest.to_string()));
        }
        let plain = image.strip_prefix("docker://").unwrap_or(image);
        Ok(match mode {
            SourceMode::Docker => SourceSpec::Daemon(plain.to_string()),
            _ => SourceSpec::Registry(plain.to_string()),
        })
    }
}

/// Parses an OCI/Docker config blob into the parts we keep, plus diff_ids and platform.
pub fn parse_config(
    bytes: &[u8],
) -> std::result::Result<(ImageConfig, Vec<String>, String), String> {
    #[derive(Deserialize)]
    struct Root {
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        os: String,
        #[serde(default)]
        variant: Option<String>,
        #[serde(default)]
        config: Option<Inner>,
        #[serde(default)]
        rootfs: Option<RootFs>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct Inner {
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        entrypoint: Option<Vec<String>>,
        #[serde(default)]
        cmd: Option<Vec<String>>,
    }
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    let root: Root = serde_json::from_slice(bytes)
        .map_err(|e| format!("image config is not valid JSON: {e}"))?;
    let inner = root.config.unwrap_or_default();
    let config = ImageConfig {
        env: inner.env.unwrap_or_default(),
        working_dir: inner.working_dir.unwrap_or_default(),
        user: inner.user.unwrap_or_default(),
        entrypoint: inner.entrypoint.unwrap_or_default(),
        cmd: inner.cmd.unwrap_or_default(),
    };
    let mut platform = format!("{}/{}", root.os, root.architecture);
    if let Some(v) = root.variant.filter(|v| !v.is_empty()) {
        platform = format!("{platform}/{v}");
    }
    Ok((
        config,
        root.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
        platform,
    ))
}

/// Checks that a digest string is `sha256:` followed by 64 lowercase hex digits.
pub(crate) fn check_digest(d: &str) -> std::result::Result<&str, String> {
    match d.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(h)
        }
        _ => Err(format!(
            "unsupported or malformed digest '{d}' (expected sha256:<64 hex>)"
        )),
    }
}

/// Opens a layer blob for reading: the whole file, or its region of an archive. When the blob
/// is named by a `sha256:` digest, the bytes are hashed as they are read and
/// [`BlobReader::finish`] compares them with it: archive members, registry downloads and cached
/// blobs are all verified the same way, on the bytes actually used.
pub fn open_layer(layer: &LayerFile) -> Result<BlobReader> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |action, e| Error::io(action, &layer.path, e);
    let mut f = std::fs::File::open(&layer.path).map_err(|e| io("open layer", e))?;
    let size = match layer.region {
        Some(r) => {
            f.seek(SeekFrom::Start(r.offset))
                .map_err(|e| io("seek in", e))?;
            r.size
        }
        None => f.metadata().map_err(|e| io("stat", e))?.len(),
    };
    let expected = check_digest(&layer.digest).ok().map(str::to_string);
    Ok(BlobReader {
        inner: f.take(size),
        hasher: expected.as_ref().map(|_| sha2::Sha256::default()),
        expected,
        size,
        read: 0,
        what: layer.digest.clone(),
    })
}

/// A layer's bytes, hashed on the way through (see [`open_layer`]).
pub struct BlobReader {
    inner: std::io::Take<std::fs::File>,
    hasher: Option<sha2::Sha256>,
    expected: Option<String>,
    size: u64,
    read: u64,
    what: String,
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            sha2::Digest::update(h, &buf[..n]);
        }
        self.read += n as u64;
        Ok(n)
    }
}

impl BlobReader {
    /// Reads what the consumer left (trailing padding), then checks length and digest.
    pub fn finish(mut self) -> Result<()> {
        std::io::copy(&mut self, &mut std::io::sink()).map_err(|e| Error::CorruptLayer {
            layer: self.what.clone(),
            source: e,
        })?;
        if self.read != self.size {
            return Err(Error::CorruptLayer {
                layer: self.what.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("blob ends after {} of {} bytes", self.read, self.size),
                ),
            });
        }
        if let (Some(h), Some(hex)) = (self.hasher.take(), self.expected.as_ref()) {
            let actual = hex::encode(sha2::Digest::finalize(h));
            if &actual != hex {
                return Err(Error::DigestMismatch {
                    what: format!("layer {}", self.what),
                    expected: format!("sha256:{hex}"),
                    actual: format!("sha256:{actual}"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_are_recognized() {
        assert_eq!(
            SourceSpec::parse("python:3.12-alpine", SourceMode::Auto).unwrap(),
            SourceSpec::Registry("python:3.12-alpine".into())
        );
        assert_eq!(
            SourceSpec::parse("docker-archive:/nonexistent/x.tar", SourceMode::Auto).unwrap(),
            SourceSpec::DockerArchive("/nonexistent/x.tar".into(), None)
        );
        assert_eq!(
            SourceSpec::parse("python:3", SourceMode::Docker).unwrap(),
            SourceSpec::Daemon("python:3".into())
        );
        assert!(SourceSpec::parse(" ", SourceMode::Auto).is_err());
    }

    #[test]
    fn config_parsing_keeps_runtime_fields() {
        let cfg = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin","A=b"],"WorkingDir":"/app","User":"1000","Cmd":["python3"]},"rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let (c, ids, plat) = parse_config(cfg).unwrap();
        assert_eq!(c.env, ["PATH=/usr/bin", "A=b"]);
        assert_eq!(c.working_dir, "/app");
        assert_eq!(c.cmd, ["python3"]);
        assert_eq!(ids, ["sha256:aa"]);
        assert_eq!(plat, "linux/amd64");
        assert!(parse_config(b"{nope").is_err());
    }
}
