//! Daemonless pulls from an OCI registry (Docker Hub, GHCR, a local `docker-registry`).
//!
//! Docker Hub short names are normalized (`python:3.12-alpine` →
//! `docker.io/library/python:3.12-alpine`); anonymous, basic and bearer-token auth are handled by
//! the client, with credentials from `~/.docker/config.json`; a multi-arch index is resolved to
//! the requested platform; every blob is verified against its digest while it downloads, then
//! kept in a content-addressed cache so a rebuild does not download again.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWrite;

use super::{check_digest, parse_config, FetchedImage, LayerFile};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;

/// Options for registry pulls.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// `os/arch[/variant]`, e.g. `linux/amd64`.
    pub platform: String,
    /// Use plain HTTP for every registry (localhost registries always may).
    pub insecure: bool,
    /// Content-addressed blob cache directory.
    pub blob_cache: PathBuf,
    /// Parallel layer downloads.
    pub concurrency: usize,
}

/// Normalizes a user reference the way Docker does.
pub fn normalize(reference: &str) -> Result<Reference> {
    reference
        .parse::<Reference>()
        .map_err(|e| Error::InvalidReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

/// Pulls manifest, config and layers of `reference`.
pub async fn fetch(
    reference: &str,
    opts: &RegistryOptions,
    progress: &dyn Progress,
) -> Result<FetchedImage> {
    let image = normalize(reference)?;
    let registry = image.resolve_registry().to_string();
    let whole = image.whole();
    let available = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = client_for(&registry, opts, available.clone());
    let auth = docker_config_auth(&registry).unwrap_or(RegistryAuth::Anonymous);

    let (manifest, digest, config_json, list_digest) = client
        .pull_manifest_and_config_and_list_digest(&image, &auth)
        .await
        .map_err(|e| {
            let seen = available.lock().map(|a| a.clone()).unwrap_or_default();
            if matches!(
                e,
                OciDistributionError::ImageIndexParsingNoPlatformResolverError
            ) || (!seen.is_empty() && !seen.contains(&opts.platform))
            {
                return Error::PlatformNotFound {
                    reference: whole.clone(),
                    platform: opts.platform.clone(),
                    available: seen.join(", "),
                };
            }
            classify(e, &registry, &whole)
        })?;
    tracing::debug!(%digest, ?list_digest, layers = manifest.layers.len(), "manifest resolved");
    let (config, diff_ids, platform) =
        parse_config(config_json.as_bytes()).map_err(|reason| Error::Registry {
            reference: whole.clone(),
            source: reason.into(),
        })?;
    // Without one diff_id per layer the uncompressed layers could not be verified: refused, never
    // skipped.
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::Registry {
            reference: whole.clone(),
            source: format!(
                "manifest lists {} layers but the config has {} diff_ids",
                manifest.layers.len(),
                diff_ids.len()
            )
            .into(),
        });
    }

    let blobs = opts.blob_cache.join("sha256");
    infra_config::ensure_dir(&blobs, infra_config::PRIVATE_DIR)?;
    // Collected first: a stream over a closure that borrows the descriptors is not provably
    // `Send` for callers that spawn the whole preparation (the HTTP API does).
    let jobs: Vec<_> = manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let (client, image, blobs, whole) = (&client, &image, &blobs, &whole);
            async move { download_blob(client, image, layer, blobs, whole, i, progress).await }
        })
        .collect();
    let paths: Vec<PathBuf> = futures::stream::iter(jobs)
        .buffered(opts.concurrency.max(1))
        .try_collect()
        .await?;

    let layers = manifest
        .layers
        .iter()
        .zip(paths)
        .enumerate()
        .map(|(i, (l, path))| LayerFile {
            path,
            region: None,
            digest: l.digest.clone(),
            diff_id: diff_ids.get(i).cloned(),
        })
        .collect();
    Ok(FetchedImage {
        kind: "registry".into(),
        reference: whole,
        digest: Some(list_digest.unwrap_or(digest)),
        platform,
        layers,
        config,
    })
}

fn client_for(
    registry: &str,
    opts: &RegistryOptions,
    available: Arc<Mutex<Vec<String>>>,
) -> Client {
    let host = registry
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(registry);
    let protocol = if opts.insecure {
        ClientProtocol::Http
    } else if matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1") {
        ClientProtocol::HttpsExcept(vec![registry.to_string()])
    } else {
        ClientProtocol::Https
    };
    let wanted = opts.platform.clone();
    let resolver = move |entries: &[ImageIndexEntry]| -> Option<String> {
        let names: Vec<(String, String)> = entries
            .iter()
            .filter_map(|e| {
                let p = e.platform.as_ref()?;
                let mut name = format!("{}/{}", p.os, p.architecture);
                if let Some(v) = p.variant.as_ref().filter(|v| !v.is_empty()) {
                    name = format!("{name}/{v}");
                }
                Some((name, e.digest.clone()))
            })
            .collect();
        if let Ok(mut a) = available.lock() {
            *a = names.iter().map(|(n, _)| n.clone()).collect();
        }
        names
            .iter()
            .find(|(n, _)| *n == wanted)
            .or_else(|| {
                names
                    .iter()
                    .find(|(n, _)| n.starts_with(&format!("{wanted}/")))
            })
            .map(|(_, d)| d.clone())
    };
    Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(resolver)),
        connect_timeout: Some(std::time::Duration::from_secs(15)),
        read_timeout: Some(std::time::Duration::from_secs(120)),
        user_agent: concat!("infra-operator/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    })
}

async fn download_blob(
    client: &Client,
    image: &Reference,
    layer: &OciDescriptor,
    blobs: &Path,
    whole: &str,
    index: usize,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let hex = check_digest(&layer.digest).map_err(|reason| Error::Registry {
        reference: whole.into(),
        source: reason.into(),
    })?;
    let final_path = blobs.join(hex);
    if layer.size < 0 {
        return Err(Error::Registry {
            reference: whole.into(),
            source: format!(
                "layer {} has a negative size in its descriptor",
                layer.digest
            )
            .into(),
        });
    }
    // A cached blob of the right size is used; its digest is checked again as the unpacker reads
    // it (and the blob removed if it no longer matches).
    if tokio::fs::metadata(&final_path)
        .await
        .is_ok_and(|m| m.len() == layer.size as u64)
    {
        tracing::debug!(digest = %layer.digest, "layer cached");
        return Ok(final_path);
    }
    let tmp = blobs.join(format!(".{hex}.partial-{}", std::process::id()));
    let file = tokio::fs::File::create(&tmp).await.ctx("create", &tmp)?;
    let id = layer.digest.clone();
    let short = &hex[..12];
    progress.transfer_start(
        &id,
        &format!("layer {} {short}", index + 1),
        Some(layer.size.max(0) as u64),
    );
    let writer = CountingWriter {
        inner: file,
        progress,
        id: &id,
        written: 0,
        limit: layer.size as u64,
    };
    let result = client.pull_blob(image, layer, writer).await;
    progress.transfer_done(&id);
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(match e {
            OciDistributionError::IoError(io) if is_oversize(&io) => Error::Registry {
                reference: whole.into(),
                source: format!(
                    "layer {} is larger than the {} bytes its descriptor declares; download stopped",
                    layer.digest, layer.size
                )
                .into(),
            },
            OciDistributionError::DigestError(d) => Error::DigestMismatch {
                what: format!("layer {}", layer.digest),
                expected: layer.digest.clone(),
                actual: d.to_string(),
            },
            OciDistributionError::IoError(io) => Error::io("write", &tmp, io),
            other => classify(other, image.resolve_registry(), whole),
        });
    }
    let f = std::fs::File::open(&tmp).ctx("open", &tmp)?;
    f.sync_all().ctx("sync", &tmp)?;
    tokio::fs::rename(&tmp, &final_path)
        .await
        .ctx("rename", &final_path)?;
    Ok(final_path)
}

/// Maps client errors to what the user should do, by error kind (never by message text).
fn classify(e: OciDistributionError, registry: &str, reference: &str) -> Error {
    let reg = registry.to_string();
    let reference = reference.to_string();
    match e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => Error::AuthDenied {
            registry: reg,
            reference,
            source: Box::new(e),
        },
        OciDistributionError::ImageManifestNotFoundError(_) => Error::NotFound {
            reference,
            source: Box::new(e),
        },
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|x| &x.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                )
            }) {
                Error::NotFound {
                    reference,
                    source: Box::new(e),
                }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Error::AuthDenied {
                    registry: reg,
                    reference,
                    source: Box::new(e),
                }
            } else {
                Error::Registry {
                    reference,
                    source: Box::new(e),
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => Error::NotFound {
            reference,
            source: Box::new(e),
        },
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => Error::AuthDenied {
            registry: reg,
            reference,
            source: Box::new(e),
        },
        OciDistributionError::RequestError(ref r) if r.is_connect() || r.is_timeout() => {
            Error::Unreachable {
                registry: reg,
                source: Box::new(e),
            }
        }
        other => Error::Registry {
            reference,
            source: Box::new(other),
        },
    }
}

/// Credentials for `registry` from the Docker CLI config (`$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`), `auths` section. Credential helpers are not consulted.
pub fn docker_config_auth(registry: &str) -> Option<RegistryAuth> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    auth_from_config(&text, registry)
}

fn auth_from_config(text: &str, registry: &str) -> Option<RegistryAuth> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let hub = registry == "docker.io"
        || registry == "index.docker.io"
        || registry == "registry-1.docker.io";
    let entry = auths.iter().find(|(k, _)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = k.split('/').next().unwrap_or(k);
        host == registry
            || (hub
                && (host == "index.docker.io"
                    || host == "docker.io"
                    || host == "registry-1.docker.io"))
    })?;
    let obj = entry.1.as_object()?;
    if let Some(token) = obj.get("registrytoken").and_then(|t| t.as_str()) {
        return Some(RegistryAuth::Bearer(token.to_string()));
    }
    if let (Some(u), Some(p)) = (
        obj.get("username").and_then(|x| x.as_str()),
        obj.get("password").and_then(|x| x.as_str()),
    ) {
        return Some(RegistryAuth::Basic(u.into(), p.into()));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(obj.get("auth")?.as_str()?)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(RegistryAuth::Basic(u.into(), p.into()))
}

/// Counts downloaded bytes for the progress bar and stops the download as soon as it passes the
/// size the descriptor declared (a registry cannot make us store more than it promised).
struct CountingWriter<'a, W> {
    inner: W,
    progress: &'a dyn Progress,
    id: &'a str,
    written: u64,
    limit: u64,
}

/// The writer's refusal, recognised by type when it comes back through the client.
#[derive(Debug, thiserror::Error)]
#[error("blob is larger than its descriptor's size")]
struct Oversize;

fn is_oversize(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Oversize>())
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CountingWriter<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.written.saturating_add(buf.len() as u64) > self.limit {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                Oversize,
            )));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
            self.progress.transfer_inc(self.id, n as u64);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_short_names_are_normalized() {
        let r = normalize("python:3.12-alpine").unwrap();
        assert_eq!(r.whole(), "docker.io/library/python:3.12-alpine");
        assert_eq!(
            normalize("127.0.0.1:5000/x/y:1")
                .unwrap()
                .resolve_registry(),
            "127.0.0.1:5000"
        );
        assert!(normalize("UPPER:case").is_err());
    }

    #[test]
    fn docker_config_credentials() {
        let cfg = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#;
        assert!(
            matches!(auth_from_config(cfg, "docker.io"), Some(RegistryAuth::Basic(u, p)) if u == "u" && p == "p")
        );
        assert!(
            matches!(auth_from_config(cfg, "127.0.0.1:5000"), Some(RegistryAuth::Basic(u, _)) if u == "a")
        );
        assert!(auth_from_config(cfg, "ghcr.io").is_none());
    }
}
