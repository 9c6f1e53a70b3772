//! Local archives with skopeo's transport names: `docker-archive:PATH` (`docker save`),
//! `oci-archive:PATH` (an OCI layout in a tar) and `oci:DIR` (an OCI layout directory).
//!
//! Archives are never extracted: a [`TarIndex`] maps member names to their data inside the
//! archive, JSON documents are read from there with a size cap, and layers are handed to the
//! unpacker as regions of the archive file. Links inside the archive are resolved by name within
//! the archive (nothing is created on disk that a later member could write through). Every blob
//! named by a digest is verified as it is read: small JSON blobs here, layers by the unpacker.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::tarindex::{Region, TarIndex, MAX_JSON_BYTES};
use super::{check_digest, parse_config, FetchedImage, LayerFile};
use crate::error::{Error, IoContext, Result};

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Archive {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Every layer must have its diff_id in the config, or it could not be verified.
pub(crate) fn check_layer_count(path: &Path, layers: usize, diff_ids: usize) -> Result<()> {
    if layers != diff_ids {
        return Err(bad(
            path,
            format!("{layers} layers but {diff_ids} diff_ids in the config: the uncompressed layers could not be verified"),
        ));
    }
    Ok(())
}

/// Compares in-memory bytes with their digest.
fn verify_bytes(origin: &Path, what: &str, bytes: &[u8], digest: &str) -> Result<()> {
    use sha2::Digest;
    let hex = check_digest(digest).map_err(|r| bad(origin, r))?;
    let actual = hex::encode(sha2::Sha256::digest(bytes));
    if actual != hex {
        return Err(Error::DigestMismatch {
            what: format!("{what} in {}", origin.display()),
            expected: digest.to_string(),
            actual: format!("sha256:{actual}"),
        });
    }
    Ok(())
}

/// Reads a `docker save` archive in place (legacy layout with `manifest.json`; newer ones are
/// also OCI layouts, with `blobs/sha256/…` members).
pub fn fetch_docker_archive(path: &Path, reference: Option<&str>) -> Result<FetchedImage> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let index = TarIndex::open(path)?;
    if !index.contains("manifest.json") {
        return Err(bad(path, "no manifest.json: not a `docker save` archive"));
    }
    let entries: Vec<Entry> = serde_json::from_slice(&index.read_small("manifest.json")?)
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
            None if entries.is_empty() => return Err(bad(path, "manifest.json lists no image")),
            None => return Err(bad(
                path,
                "the archive holds several images: add :REF (e.g. docker-archive:x.tar:name:tag)",
            )),
        };
    let config_bytes = index.read_small(&entry.config)?;
    // Config members are named by their digest in both layouts (`<hex>.json`, `blobs/sha256/<hex>`).
    let name = Path::new(&entry.config)
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let config_hex = name.strip_suffix(".json").unwrap_or(name);
    let config_digest = format!("sha256:{config_hex}");
    if check_digest(&config_digest).is_ok() {
        verify_bytes(path, "image config", &config_bytes, &config_digest)?;
    }
    let (config, diff_ids, platform) = parse_config(&config_bytes).map_err(|r| bad(path, r))?;
    check_layer_count(path, entry.layers.len(), diff_ids.len())?;
    let layers = entry
        .layers
        .iter()
        .zip(&diff_ids)
        .map(|(l, d)| {
            let region = index.find(l)?;
            // OCI-style members carry their digest in the name; legacy `<id>/layer.tar` members are
            // uncompressed, so the diff_id check covers them.
            let digest = match l.strip_prefix("blobs/sha256/") {
                Some(hex) if check_digest(&format!("sha256:{hex}")).is_ok() => {
                    format!("sha256:{hex}")
                }
                _ => l.clone(),
            };
            Ok(LayerFile {
                path: path.to_path_buf(),
                region: Some(region),
                digest,
                diff_id: Some(d.clone()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(FetchedImage {
        kind: "docker-archive".into(),
        reference: entry
            .repo_tags
            .iter()
            .flatten()
            .next()
            .cloned()
            .unwrap_or_else(|| path.display().to_string()),
        digest: check_digest(&config_digest)
            .is_ok()
            .then_some(config_digest),
        platform,
        layers,
        config,
    })
}

/// Reads an `oci-archive:` tar in place as an OCI layout.
pub fn fetch_oci_archive(
    path: &Path,
    reference: Option<&str>,
    platform: &str,
) -> Result<FetchedImage> {
    let index = TarIndex::open(path)?;
    let mut img = read_layout(&Layout::Archive(&index), reference, platform)?;
    img.kind = "oci-archive".into();
    Ok(img)
}

/// Reads an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`).
pub fn fetch_oci_dir(dir: &Path, reference: Option<&str>, platform: &str) -> Result<FetchedImage> {
    read_layout(&Layout::Dir(dir), reference, platform)
}

/// Where an OCI layout's members are: a directory, or an archive read in place.
enum Layout<'a> {
    Dir(&'a Path),
    Archive(&'a TarIndex),
}

impl Layout<'_> {
    fn origin(&self) -> &Path {
        match self {
            Layout::Dir(d) => d,
            Layout::Archive(i) => i.path(),
        }
    }

    /// The file and region holding member `name`.
    fn locate(&self, name: &str) -> Result<(PathBuf, Option<Region>)> {
        match self {
            Layout::Dir(d) => {
                let p = d.join(name);
                if !p.is_file() {
                    return Err(bad(d, format!("{name} is missing")));
                }
                Ok((p, None))
            }
            Layout::Archive(i) => Ok((i.path().to_path_buf(), Some(i.find(name)?))),
        }
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        match self {
            Layout::Dir(d) => {
                let p = d.join(name);
                let len = fs::metadata(&p)
                    .map_err(|_| bad(d, format!("{name} is missing")))?
                    .len();
                if len > MAX_JSON_BYTES {
                    return Err(bad(
                        d,
                        format!("{name} is {len} bytes, more than the {MAX_JSON_BYTES} allowed for a JSON document"),
                    ));
                }
                fs::read(&p).ctx("read", &p)
            }
            Layout::Archive(i) => i.read_small(name),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
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

/// Reads an OCI layout: `index.json`, then the chosen manifest (through a nested index for
/// multi-platform images), the config and the layers, all named by digest and verified.
fn read_layout(
    layout: &Layout<'_>,
    reference: Option<&str>,
    platform: &str,
) -> Result<FetchedImage> {
    let dir = layout.origin();
    let index: Index = serde_json::from_slice(
        &layout
            .read_small("index.json")
            .map_err(|_| bad(dir, "no index.json: not an OCI image layout"))?,
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
    let member = |d: &Descriptor| -> Result<String> {
        let hex = check_digest(&d.digest).map_err(|r| bad(dir, r))?;
        Ok(format!("blobs/sha256/{hex}"))
    };
    // A JSON blob: read with a size cap and checked against its digest.
    let json_blob = |d: &Descriptor, what: &str| -> Result<Vec<u8>> {
        let bytes = layout.read_small(&member(d)?)?;
        verify_bytes(dir, what, &bytes, &d.digest)?;
        Ok(bytes)
    };
    let mut manifest_desc = chosen;
    let nested;
    if manifest_desc.media_type.contains("index")
        || manifest_desc.media_type.contains("manifest.list")
    {
        let inner: Index = serde_json::from_slice(&json_blob(manifest_desc, "image index")?)
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
    let manifest: Manifest = serde_json::from_slice(&json_blob(manifest_desc, "manifest")?)
        .map_err(|e| bad(dir, format!("manifest is invalid: {e}")))?;
    let config_bytes = json_blob(&manifest.config, "image config")?;
    let (config, diff_ids, plat) = parse_config(&config_bytes).map_err(|r| bad(dir, r))?;
    check_layer_count(dir, manifest.layers.len(), diff_ids.len())?;
    let layers = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| {
            let (path, region) = layout.locate(&member(l)?)?;
            // The descriptor's size is what the blob must be; the unpacker checks the digest.
            let actual = match region {
                Some(r) => r.size,
                None => fs::metadata(&path).ctx("stat", &path)?.len(),
            };
            if l.size.is_some_and(|s| s != actual) {
                return Err(bad(
                    dir,
                    format!(
                        "layer {} is {actual} bytes but its descriptor says {}",
                        l.digest,
                        l.size.unwrap_or_default()
                    ),
                ));
            }
            Ok(LayerFile {
                path,
                region,
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
