//! The seed's layout of images and the kernel in a store, and the operations on it that the
//! `rootfs` commands and the runner use.
//!
//! `vmlinux`, `rootfs-{name}.ext4` and its manifest `rootfs-{name}.json` at the prefix root;
//! `rootfs-{name}.ext4.zst` when uploaded with `--compress`; `snapshots/{name}/...` reserved.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use infra_config::Paths;
use serde::Serialize;

use crate::compress::ZST_SUFFIX;
use crate::error::{Error, Result};
use crate::object::{Metadata, ObjectInfo};
use crate::transfer::{DownloadSummary, Engine, UploadSummary};

/// Key of the guest kernel.
pub const KERNEL_KEY: &str = "vmlinux";
/// Prefix reserved for snapshots (`snapshots/{name}/...`).
pub const SNAPSHOTS_PREFIX: &str = "snapshots/";

/// `rootfs-{name}.ext4`.
pub fn image_key(name: &str) -> String {
    format!("rootfs-{name}.ext4")
}

/// `rootfs-{name}.json`.
pub fn manifest_key(name: &str) -> String {
    format!("rootfs-{name}.json")
}

/// `rootfs-{name}.ext4.zst`.
pub fn compressed_key(name: &str) -> String {
    format!("rootfs-{name}.ext4{ZST_SUFFIX}")
}

/// Checks an image name (`--lang`): letters, digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "image name",
            value: name.into(),
            reason: "use letters, digits, '-', '_' and '.'".into(),
        })
    }
}

/// True for the keys `--all` moves: images (plain or compressed), manifests, the kernel.
pub fn is_artifact_key(key: &str) -> bool {
    key == KERNEL_KEY
        || (key.starts_with("rootfs-")
            && !key.contains('/')
            && (key.ends_with(".ext4") || key.ends_with(".ext4.zst") || key.ends_with(".json")))
}

/// Where an artifact key goes locally: images to the images directory, the kernel to its path,
/// anything else to the images directory under its base name. The key is untrusted: it goes
/// through [`crate::keys::check_key`] first ([`Error::UnsafeKey`] when refused).
pub fn local_target(paths: &Paths, key: &str) -> Result<PathBuf> {
    if key == KERNEL_KEY {
        return Ok(paths.kernel.clone());
    }
    target_in(&paths.images, key)
}

/// `dir/{base name of key}` (less `.zst`), after the key check.
pub fn target_in(dir: &Path, key: &str) -> Result<PathBuf> {
    crate::keys::check_key(key).map_err(|problem| Error::UnsafeKey {
        key: key.to_string(),
        problem,
    })?;
    let base = key.rsplit('/').next().unwrap_or(key);
    let base = base.strip_suffix(ZST_SUFFIX).unwrap_or(base);
    crate::keys::safe_key_path(dir, base).map_err(|e| match e {
        // `x/.zst` leaves an empty name: report the whole key.
        Error::UnsafeKey { problem, .. } => Error::UnsafeKey {
            key: key.to_string(),
            problem,
        },
        other => other,
    })
}

/// Local files `--all` uploads: `rootfs-*.ext4`, their manifests and the kernel, with keys.
pub fn local_artifacts(paths: &Paths) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    match std::fs::read_dir(&paths.images) {
        Ok(rd) => {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_image = name.starts_with("rootfs-")
                    && (name.ends_with(".ext4") || name.ends_with(".json"));
                if is_image && e.path().is_file() {
                    out.push((e.path(), name));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("read directory", &paths.images, e)),
    }
    if paths.kernel.is_file() {
        out.push((paths.kernel.clone(), KERNEL_KEY.to_string()));
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// The sha256 an image's manifest (`rootfs-{name}.json` beside it) records, when the manifest
/// describes a file of the image's current size. Builds write it after hashing the image, so
/// uploads can skip their own hashing pass (the upload still verifies it while sending).
pub fn manifest_sha256(image: &Path) -> Option<String> {
    if image.extension().and_then(|e| e.to_str()) != Some("ext4") {
        return None;
    }
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Paths::manifest_for(image)).ok()?).ok()?;
    let sha = v.get("sha256")?.as_str()?;
    let size = v.get("size_bytes")?.as_u64()?;
    let ok = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
    (ok && std::fs::metadata(image).ok()?.len() == size).then(|| sha.to_ascii_lowercase())
}

/// An image in the store (`rootfs list --remote`).
#[derive(Debug, Clone, Serialize)]
pub struct RemoteImage {
    /// Name (language).
    pub language: String,
    /// Object key.
    pub key: String,
    /// Object size (compressed size for `.zst`).
    pub size: u64,
    /// Last modification.
    pub last_modified: Option<DateTime<Utc>>,
    /// Stored with `--compress`.
    pub compressed: bool,
}

/// Images among listed objects (at the prefix root), sorted by name.
pub fn remote_images(objects: &[ObjectInfo]) -> Vec<RemoteImage> {
    let mut out: Vec<RemoteImage> = objects
        .iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix("rootfs-")?;
            if rest.contains('/') {
                return None;
            }
            let (name, compressed) = if let Some(n) = rest.strip_suffix(".ext4.zst") {
                (n, true)
            } else {
                (rest.strip_suffix(".ext4")?, false)
            };
            Some(RemoteImage {
                language: name.to_string(),
                key: o.key.clone(),
                size: o.size,
                last_modified: o.last_modified,
                compressed,
            })
        })
        .collect();
    out.sort_by(|a, b| a.language.cmp(&b.language).then(a.key.cmp(&b.key)));
    out
}

/// Uploads `rootfs-{name}.ext4` (compressed with `compress`) and its manifest when present.
pub async fn upload_image(
    engine: &Engine,
    paths: &Paths,
    name: &str,
    compress: bool,
) -> Result<Vec<UploadSummary>> {
    check_name(name)?;
    let image = paths.image(name);
    if !image.is_file() {
        return Err(Error::NoSuchKey {
            target: image.display().to_string(),
            version: None,
        });
    }
    let expected = manifest_sha256(&image);
    let mut out = Vec::new();
    out.push(if compress {
        engine
            .upload_compressed(
                &image,
                &compressed_key(name),
                &Metadata::new(),
                expected.as_deref(),
            )
            .await?
    } else {
        engine
            .upload_file_expecting(
                &image,
                &image_key(name),
                &Metadata::new(),
                expected.as_deref(),
            )
            .await?
    });
    let manifest = Paths::manifest_for(&image);
    if manifest.is_file() {
        out.push(
            engine
                .upload_file(&manifest, &manifest_key(name), &Metadata::new())
                .await?,
        );
    }
    Ok(out)
}

/// Downloads image `name` to `output` (default: the images directory), plus its manifest when
/// the store has one. When both the plain and the compressed form exist, the newer one is used.
pub async fn download_image(
    engine: &Engine,
    paths: &Paths,
    name: &str,
    output: Option<&Path>,
    version_id: Option<&str>,
) -> Result<Vec<DownloadSummary>> {
    check_name(name)?;
    let dest = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| paths.image(name));
    let store = engine.store();
    let plain = store.head(&image_key(name), version_id).await;
    let zst = store.head(&compressed_key(name), version_id).await;
    let use_zst = match (&plain, &zst) {
        (Ok(p), Ok(z)) => z.last_modified > p.last_modified,
        (Err(_), Ok(_)) => true,
        (Ok(_), Err(_)) => false,
        (Err(e), Err(_)) => {
            return Err(match e {
                Error::NoSuchKey { version, .. } => Error::NoSuchKey {
                    target: store.url_of(&image_key(name)),
                    version: version.clone(),
                },
                _ => plain.err().unwrap_or(Error::NoSuchKey {
                    target: store.url_of(&image_key(name)),
                    version: None,
                }),
            })
        }
    };
    let mut out = Vec::new();
    out.push(if use_zst {
        engine
            .download_compressed(&compressed_key(name), &dest, version_id)
            .await?
    } else {
        engine
            .download_file(&image_key(name), &dest, version_id)
            .await?
    });
    match engine
        .download_file(&manifest_key(name), &Paths::manifest_for(&dest), None)
        .await
    {
        Ok(s) => out.push(s),
        Err(Error::NoSuchKey { .. }) => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// Makes sure `rootfs-{name}.ext4` exists locally, fetching it from the store when missing.
/// Returns what was downloaded (`None` when it was already there). For the runner and
/// `rootfs verify`.
pub async fn ensure_image(
    engine: &Engine,
    paths: &Paths,
    name: &str,
) -> Result<Option<Vec<DownloadSummary>>> {
    if paths.image(name).is_file() {
        return Ok(None);
    }
    download_image(engine, paths, name, None, None)
        .await
        .map(Some)
}

/// Makes sure the kernel exists locally, fetching `vmlinux` from the store when missing.
pub async fn ensure_kernel(engine: &Engine, paths: &Paths) -> Result<Option<DownloadSummary>> {
    if paths.kernel.is_file() {
        return Ok(None);
    }
    engine
        .download_file(KERNEL_KEY, &paths.kernel, None)
        .await
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_targets() {
        let p = Paths::under("/srv/firecracker");
        assert_eq!(image_key("python"), "rootfs-python.ext4");
        assert!(is_artifact_key("rootfs-python.ext4.zst"));
        assert!(is_artifact_key("vmlinux"));
        assert!(!is_artifact_key("snapshots/python/x"));
        assert!(!is_artifact_key("notes.txt"));
        assert_eq!(
            local_target(&p, "rootfs-go.ext4.zst").unwrap(),
            Path::new("/srv/firecracker/images/rootfs-go.ext4")
        );
        assert_eq!(
            local_target(&p, "vmlinux").unwrap(),
            Path::new("/srv/firecracker/vmlinux")
        );
        for hostile in [
            "x/..",
            "../../etc/cron.d/x",
            "/etc/passwd",
            "a//b",
            ".zst",
            "d/.zst",
        ] {
            assert!(
                matches!(local_target(&p, hostile), Err(Error::UnsafeKey { .. })),
                "{hostile}"
            );
        }
        assert!(check_name("../x").is_err());
        let objs: Vec<ObjectInfo> = [
            "rootfs-python.ext4",
            "rootfs-go.ext4.zst",
            "rootfs-python.json",
            "vmlinux",
            "dev/rootfs-x.ext4",
        ]
        .iter()
        .map(|k| ObjectInfo {
            key: k.to_string(),
            size: 1,
            last_modified: None,
            etag: None,
            version_id: None,
            metadata: Metadata::new(),
        })
        .collect();
        let imgs = remote_images(&objs);
        assert_eq!(imgs.len(), 2);
        assert_eq!(imgs[0].language, "go");
        assert!(imgs[0].compressed);
    }
}
