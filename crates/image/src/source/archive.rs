//! Local archives with skopeo's transport names: `docker-archive:PATH` (`docker save`),
//! `oci-archive:PATH` (an OCI layout in a tar) and `oci:DIR` (an OCI layout directory).
//!
//! Archives are unpacked into the build's work directory with the same path checks as layers, and
//! every blob is verified against its digest before use.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{check_digest, parse_config, verify_file_digest, FetchedImage, LayerFile};
use crate::error::{Error, IoContext, Result};

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Archive {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Extracts a tar archive (regular files and directories only) under `dest`, refusing escapes.
fn extract_plain(archive: &Path, dest: &Path) -> Result<()> {
    let f = fs::File::open(archive).ctx("open", archive)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(f));
    for entry in tar
        .entries()
        .map_err(|e| bad(archive, format!("not a tar archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(archive, format!("corrupt or truncated: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(archive, e.to_string()))?
            .into_owned();
        if path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(Error::HostileEntry {
                layer: archive.display().to_string(),
                entry: path.display().to_string(),
                reason: "path escapes the archive root".into(),
            });
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(dest.join(&path)).ctx("create", dest.join(&path))?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let out = dest.join(&path);
                if let Some(p) = out.parent() {
                    fs::create_dir_all(p).ctx("create", p)?;
                }
                let mut file = fs::File::create(&out).ctx("create", &out)?;
                std::io::copy(&mut entry, &mut file)
                    .map_err(|e| bad(archive, format!("corrupt or truncated: {e}")))?;
            }
            // Symlinks inside `docker save` output point layer.tar names at shared blobs.
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .ok_or_else(|| bad(archive, "symlink without target"))?;
                let out = dest.join(&path);
                let resolved = out.parent().unwrap_or(dest).join(&target);
                let normal = normalize_lexically(&resolved);
                if !normal.starts_with(dest) {
                    return Err(Error::HostileEntry {
                        layer: archive.display().to_string(),
                        entry: path.display().to_string(),
                        reason: "symlink points outside the archive".into(),
                    });
                }
                if let Some(p) = out.parent() {
                    fs::create_dir_all(p).ctx("create", p)?;
                }
                std::os::unix::fs::symlink(&target, &out).ctx("create symlink", &out)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every layer must have its diff_id in the config, or it could not be verified.
fn check_layer_count(path: &Path, layers: usize, diff_ids: usize) -> Result<()> {
    if layers != diff_ids {
        return Err(bad(
            path,
            format!("{layers} layers but {diff_ids} diff_ids in the config"),
        ));
    }
    Ok(())
}

fn normalize_lexically(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Reads a `docker save` archive (legacy layout with `manifest.json`; newer ones are also OCI layouts).
pub fn fetch_docker_archive(
    path: &Path,
    reference: Option<&str>,
    workdir: &Path,
) -> Result<FetchedImage> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let dir = workdir.join("archive");
    fs::create_dir_all(&dir).ctx("create", &dir)?;
    extract_plain(path, &dir)?;
    let manifest_path = dir.join("manifest.json");
    let text = fs::read(&manifest_path)
        .map_err(|_| bad(path, "no manifest.json: not a `docker save` archive"))?;
    let entries: Vec<Entry> = serde_json::from_slice(&text)
        .map_err(|e| bad(path, format!("manifest.json is invalid: {e}")))?;
    let entry =
        match reference {
            Some(r) => entries
                .iter()
                .find(|e| {
                    e.repo_tags
                        .iter()
                        .flatten()
                        .any(|t| t == r || t.ends_with(&format!("/{r}")))
                })
                .ok_or_else(|| bad(path, format!("no image tagged {r} in the archive")))?,
            None if entries.len() == 1 => &entries[0],
            None => return Err(bad(
                path,
                "the archive holds several images: add :REF (e.g. docker-archive:x.tar:name:tag)",
            )),
        };
    let inside = |name: &str| -> Result<PathBuf> {
        let p = Path::new(name);
        if p.is_absolute()
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad(
                path,
                format!("manifest names a file outside the archive: {name}"),
            ));
        }
        Ok(dir.join(p))
    };
    let config_path = inside(&entry.config)?;
    let config_bytes = fs::read(&config_path)
        .map_err(|_| bad(path, format!("missing config {}", entry.config)))?;
    // Config file names are content digests in both the legacy and the OCI-style layout.
    let config_hex = Path::new(&entry.config)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let config_hex = Path::new(&entry.config)
        .file_name()
        .and_then(|s| s.to_str())
        .filter(|n| n.len() == 64)
        .unwrap_or(config_hex);
    if config_hex.len() == 64 {
        verify_file_digest(&config_path, &format!("sha256:{config_hex}"))?;
    }
    let (config, diff_ids, platform) = parse_config(&config_bytes).map_err(|r| bad(path, r))?;
    check_layer_count(path, entry.layers.len(), diff_ids.len())?;
    let layers = entry
        .layers
        .iter()
        .zip(&diff_ids)
        .map(|(l, d)| {
            Ok(LayerFile {
                path: inside(l)?,
                digest: l.clone(),
                diff_id: Some(d.clone()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for l in &layers {
        if !l.path.is_file() {
            return Err(bad(path, format!("missing layer {}", l.digest)));
        }
    }
    Ok(FetchedImage {
        kind: "docker-archive".into(),
        reference: entry
            .repo_tags
            .iter()
            .flatten()
            .next()
            .cloned()
            .unwrap_or_else(|| path.display().to_string()),
        digest: Some(format!("sha256:{}", config_hex)),
        platform,
        layers,
        config,
    })
}

/// Extracts an `oci-archive:` tar and reads it as an OCI layout.
pub fn fetch_oci_archive(
    path: &Path,
    reference: Option<&str>,
    platform: &str,
    workdir: &Path,
) -> Result<FetchedImage> {
    let dir = workdir.join("oci");
    fs::create_dir_all(&dir).ctx("create", &dir)?;
    extract_plain(path, &dir)?;
    let mut img = fetch_oci_dir(&dir, reference, platform)?;
    img.kind = "oci-archive".into();
    if img.reference.starts_with(&dir.display().to_string()) {
        img.reference = path.display().to_string();
    }
    Ok(img)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Reads an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`).
pub fn fetch_oci_dir(dir: &Path, reference: Option<&str>, platform: &str) -> Result<FetchedImage> {
    let index_path = dir.join("index.json");
    let index: Index = serde_json::from_slice(
        &fs::read(&index_path).map_err(|_| bad(dir, "no index.json: not an OCI image layout"))?,
    )
    .map_err(|e| bad(dir, format!("index.json is invalid: {e}")))?;
    let chosen = match reference {
        Some(r) => index
            .manifests
            .iter()
            .find(|m| {
                m.annotations
                    .get("org.opencontainers.image.ref.name")
                    .is_some_and(|n| n == r)
            })
            .ok_or_else(|| bad(dir, format!("no manifest named {r} in index.json")))?,
        None if index.manifests.len() == 1 => &index.manifests[0],
        None if index.manifests.is_empty() => {
            return Err(bad(dir, "index.json lists no manifests"))
        }
        None => pick_platform(&index.manifests, platform)
            .ok_or_else(|| bad(dir, "several manifests: add :REF"))?,
    };
    let blob = |d: &Descriptor| -> Result<PathBuf> {
        let hex = check_digest(&d.digest).map_err(|r| bad(dir, r))?;
        let p = dir.join("blobs/sha256").join(hex);
        if !p.is_file() {
            return Err(bad(dir, format!("missing blob {}", d.digest)));
        }
        verify_file_digest(&p, &d.digest)?;
        Ok(p)
    };
    let mut manifest_desc = chosen;
    let nested;
    if manifest_desc.media_type.contains("index")
        || manifest_desc.media_type.contains("manifest.list")
    {
        let inner: Index =
            serde_json::from_slice(&fs::read(blob(manifest_desc)?).ctx("read", dir)?)
                .map_err(|e| bad(dir, format!("nested index is invalid: {e}")))?;
        nested = inner;
        manifest_desc =
            pick_platform(&nested.manifests, platform).ok_or_else(|| Error::PlatformNotFound {
                reference: dir.display().to_string(),
                platform: platform.into(),
                available: nested
                    .manifests
                    .iter()
                    .filter_map(|m| {
                        m.platform
                            .as_ref()
                            .map(|p| format!("{}/{}", p.os, p.architecture))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
    }
    let manifest: Manifest =
        serde_json::from_slice(&fs::read(blob(manifest_desc)?).ctx("read", dir)?)
            .map_err(|e| bad(dir, format!("manifest is invalid: {e}")))?;
    let config_bytes = fs::read(blob(&manifest.config)?).ctx("read", dir)?;
    let (config, diff_ids, plat) = parse_config(&config_bytes).map_err(|r| bad(dir, r))?;
    check_layer_count(dir, manifest.layers.len(), diff_ids.len())?;
    let layers = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| {
            Ok(LayerFile {
                path: blob(l)?,
                digest: l.digest.clone(),
                diff_id: Some(d),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(FetchedImage {
        kind: "oci".into(),
        reference: match reference {
            Some(r) => format!("{}:{r}", dir.display()),
            None => dir.display().to_string(),
        },
        digest: Some(manifest_desc.digest.clone()),
        platform: plat,
        layers,
        config,
    })
}

fn pick_platform<'a>(manifests: &'a [Descriptor], platform: &str) -> Option<&'a Descriptor> {
    manifests.iter().find(|m| {
        m.platform.as_ref().is_some_and(|p| {
            let base = format!("{}/{}", p.os, p.architecture);
            let full = match p.variant.as_deref() {
                Some(v) if !v.is_empty() => format!("{base}/{v}"),
                _ => base.clone(),
            };
            full == platform || base == platform
        })
    })
}
