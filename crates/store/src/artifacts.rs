//! The seed's layout of images and the kernel in a store, and the operations on it that the
//! `rootfs` commands and the runner use.
//!
//! `vmlinux`, `rootfs-{name}.ext4` and its manifest `rootfs-{name}.json` at the prefix root;
//! `rootfs-{name}.ext4.zst` when uploaded with `--compress`; `snapshots/{name}/...` for
//! snapshots (written by the runner's `snapshot upload`).
//!
//! The kernel travels as a bundle: `vmlinux`, its manifest `vmlinux.json` (release, sha256, the
//! modules the initramfs loads) and those modules as `vmlinux.modules/{name}.ko`, the same
//! names as on disk beside the kernel. A `vmlinux` alone (a kernel with built-in drivers, put
//! there by hand) is still a valid bundle.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use infra_config::Paths;
use serde::{Deserialize, Serialize};

use crate::compress::ZST_SUFFIX;
use crate::error::{Error, Result};
use crate::object::{GetOptions, Metadata, ObjectInfo, ObjectStore};
use crate::transfer::{DownloadSummary, Engine, UploadSummary};

/// Key of the guest kernel.
pub const KERNEL_KEY: &str = "vmlinux";
/// Key of the kernel's manifest.
pub const KERNEL_MANIFEST_KEY: &str = "vmlinux.json";
/// Prefix of the kernel's modules (`vmlinux.modules/{name}.ko`).
pub const KERNEL_MODULES_PREFIX: &str = "vmlinux.modules/";
/// Prefix reserved for snapshots (`snapshots/{name}/...`).
pub const SNAPSHOTS_PREFIX: &str = "snapshots/";
/// Most modules a kernel manifest may name (the guest needs about ten).
const MAX_KERNEL_MODULES: usize = 64;
/// Largest manifest read into memory.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// `vmlinux.modules/{module}.ko`.
pub fn kernel_module_key(module: &str) -> String {
    format!("{KERNEL_MODULES_PREFIX}{module}.ko")
}

/// True for the keys of the kernel bundle.
pub fn is_kernel_key(key: &str) -> bool {
    key == KERNEL_KEY || key == KERNEL_MANIFEST_KEY || key.starts_with(KERNEL_MODULES_PREFIX)
}

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

/// Local images `--all` uploads: `rootfs-*.ext4` and their manifests, with keys (the kernel
/// goes as a bundle, [`upload_kernel`]).
pub fn local_images(paths: &Paths) -> Result<Vec<(PathBuf, String)>> {
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

/// Reads a small object (a manifest) into memory; an object over `limit` bytes is refused
/// before its body is read, and a body longer than announced is cut off at `limit`.
pub async fn read_small(store: &dyn ObjectStore, key: &str, limit: u64) -> Result<Vec<u8>> {
    let resp = store.get(key, &GetOptions::default()).await?;
    let too_big = |n: u64| Error::Invalid {
        what: "manifest",
        value: store.url_of(key),
        reason: format!("it has {n} bytes or more, a manifest has at most {limit}"),
    };
    if resp.info.size > limit {
        return Err(too_big(resp.info.size));
    }
    let mut out = Vec::with_capacity(resp.info.size as usize);
    let mut body = resp.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(too_big((out.len() + chunk.len()) as u64));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// What a kernel bundle's manifest (`vmlinux.json`, written by `kernel fetch|import`) says
/// that a transfer needs; other fields are carried along untouched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KernelBundle {
    /// sha256 of `vmlinux`.
    pub sha256: String,
    /// Modules the initramfs loads (`vmlinux.modules/{name}.ko`).
    #[serde(default)]
    pub modules: Vec<String>,
}

impl KernelBundle {
    /// Parses a kernel manifest from `origin` (a store URL or a path, for messages) and
    /// checks what the transfer will use: a 64-digit sha256 and at most 64 module names of
    /// letters, digits, `_` and `-` (they become keys and file names), none twice.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self> {
        let bad = |reason: String| Error::Invalid {
            what: "kernel manifest",
            value: origin.to_string(),
            reason,
        };
        let b: KernelBundle =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("it is not valid: {e}")))?;
        if b.sha256.len() != 64 || !b.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(format!("sha256 {:?} is not 64 hex digits", b.sha256)));
        }
        if b.modules.len() > MAX_KERNEL_MODULES {
            return Err(bad(format!(
                "it names {} modules, at most {MAX_KERNEL_MODULES} are accepted",
                b.modules.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &b.modules {
            let ok = !m.is_empty()
                && m.len() <= 64
                && m.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
            if !ok {
                return Err(bad(format!(
                    "module name {:?} is not letters, digits, '_' and '-'",
                    m.escape_debug().to_string()
                )));
            }
            if !seen.insert(m.as_str()) {
                return Err(bad(format!("module {m} is named twice")));
            }
        }
        Ok(b)
    }
}

/// Uploads the kernel bundle: the modules its manifest names, then `vmlinux` (checked against
/// the manifest's sha256 while it is read), then the manifest, so a reader that sees the new
/// manifest finds everything it names. A kernel without a manifest goes alone, and a manifest
/// left in the store by an earlier upload is removed (it would describe another kernel).
pub async fn upload_kernel(engine: &Engine, paths: &Paths) -> Result<Vec<UploadSummary>> {
    if !paths.kernel.is_file() {
        return Err(Error::NoSuchKey {
            target: paths.kernel.display().to_string(),
            version: None,
        });
    }
    let manifest = paths.kernel_manifest();
    let bundle = match std::fs::read(&manifest) {
        Ok(b) => Some(KernelBundle::parse(&b, &manifest.display().to_string())?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("read", &manifest, e)),
    };
    let mut out = Vec::new();
    for m in bundle.iter().flat_map(|b| &b.modules) {
        let file = paths.kernel_modules().join(format!("{m}.ko"));
        out.push(
            engine
                .upload_file(&file, &kernel_module_key(m), &Metadata::new())
                .await?,
        );
    }
    out.push(
        engine
            .upload_file_expecting(
                &paths.kernel,
                KERNEL_KEY,
                &Metadata::new(),
                bundle.as_ref().map(|b| b.sha256.as_str()),
            )
            .await?,
    );
    if bundle.is_some() {
        out.push(
            engine
                .upload_file(&manifest, KERNEL_MANIFEST_KEY, &Metadata::new())
                .await?,
        );
    } else {
        match engine.store().delete(KERNEL_MANIFEST_KEY).await {
            Ok(()) | Err(Error::NoSuchKey { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Downloads the kernel bundle into place. With a manifest in the store: its modules into a
/// staging directory, `vmlinux` to a temporary name and checked against the manifest's
/// sha256, then the modules directory, the kernel and the manifest are moved into place, in
/// that order. Without one, `vmlinux` alone replaces the kernel and any local manifest and
/// modules are removed (they described another kernel). The manifest is untrusted: module
/// names are checked ([`KernelBundle::parse`]) before they become keys or file names.
pub async fn download_kernel(engine: &Engine, paths: &Paths) -> Result<Vec<DownloadSummary>> {
    let store = engine.store();
    let raw = match read_small(store.as_ref(), KERNEL_MANIFEST_KEY, MAX_MANIFEST_BYTES).await {
        Ok(raw) => Some(raw),
        Err(Error::NoSuchKey { .. }) => None,
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    let Some(raw) = raw else {
        out.push(
            engine
                .download_file(KERNEL_KEY, &paths.kernel, None)
                .await?,
        );
        for stale in [paths.kernel_manifest(), paths.kernel_modules()] {
            let gone = if stale.is_dir() {
                std::fs::remove_dir_all(&stale)
            } else {
                std::fs::remove_file(&stale)
            };
            match gone {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io("remove", &stale, e))
                }
                _ => {}
            }
        }
        return Ok(out);
    };
    let bundle = KernelBundle::parse(&raw, &store.url_of(KERNEL_MANIFEST_KEY))?;
    let modules = paths.kernel_modules();
    let staging = modules.with_extension("modules.download");
    let incoming = paths.kernel.with_extension("download");
    let result = async {
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)
            .map_err(|e| Error::io("create directory", &staging, e))?;
        for m in &bundle.modules {
            let file = staging.join(format!("{m}.ko"));
            out.push(
                engine
                    .download_file(&kernel_module_key(m), &file, None)
                    .await?,
            );
        }
        let k = engine.download_file(KERNEL_KEY, &incoming, None).await?;
        if k.sha256 != bundle.sha256.to_ascii_lowercase() {
            return Err(Error::ChecksumMismatch {
                target: store.url_of(KERNEL_KEY),
                expected: bundle.sha256.clone(),
                actual: k.sha256.clone(),
                path: paths.kernel.is_file().then(|| paths.kernel.clone()),
            });
        }
        out.push(k);
        match std::fs::remove_dir_all(&modules) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("remove", &modules, e))
            }
            _ => {}
        }
        std::fs::rename(&staging, &modules).map_err(|e| Error::io("rename", &staging, e))?;
        std::fs::rename(&incoming, &paths.kernel).map_err(|e| Error::io("rename", &incoming, e))?;
        let manifest = paths.kernel_manifest();
        infra_config::write_atomic(&manifest, &raw).map_err(|e| Error::io("write", &manifest, e))
    }
    .await;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_file(&incoming);
    result.map(|()| out)
}

/// Makes sure the kernel exists locally, fetching the bundle from the store when missing.
pub async fn ensure_kernel(engine: &Engine, paths: &Paths) -> Result<Option<Vec<DownloadSummary>>> {
    if paths.kernel.is_file() {
        return Ok(None);
    }
    download_kernel(engine, paths).await.map(Some)
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
