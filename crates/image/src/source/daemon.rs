//! Images from a local Docker or Podman daemon (its Docker-compatible API; `DOCKER_HOST` is
//! honoured). The container filesystem is exported through the API (`GET /containers/ID/export`,
//! what `docker export` does) and the runtime config is read from the image inspect data.

use std::path::Path;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use bollard::Docker;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{FetchedImage, ImageConfig, LayerFile};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;

fn daemon_err(context: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> Error {
    let context = context.into();
    move |e| Error::Daemon {
        context,
        source: Box::new(e),
    }
}

/// Connects to the daemon named by `DOCKER_HOST` or the default socket.
pub fn connect() -> Result<Docker> {
    Docker::connect_with_local_defaults().map_err(daemon_err("connect"))
}

/// True when a daemon answers and has the image locally (used by `--source auto`).
pub async fn has_image(reference: &str) -> bool {
    let default_socket = Path::new("/var/run/docker.sock").exists();
    if !default_socket && std::env::var_os("DOCKER_HOST").is_none() {
        return false;
    }
    match connect() {
        Ok(d) => {
            let probe = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                d.inspect_image(reference),
            );
            matches!(probe.await, Ok(Ok(_)))
        }
        Err(_) => false,
    }
}

/// Exports the filesystem of `reference` to `workdir/export.tar` and reads its config.
pub async fn fetch(
    reference: &str,
    workdir: &Path,
    progress: &dyn Progress,
) -> Result<FetchedImage> {
    let docker = connect()?;
    let inspect = docker.inspect_image(reference).await.map_err(|e| match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => Error::NotFound {
            reference: reference.to_string(),
            source: Box::new(e),
        },
        other => Error::Daemon {
            context: format!("inspect image {reference}"),
            source: Box::new(other),
        },
    })?;
    let cfg = inspect.config.clone().unwrap_or_default();
    let config = ImageConfig {
        env: cfg.env.unwrap_or_default(),
        working_dir: cfg.working_dir.unwrap_or_default(),
        user: cfg.user.unwrap_or_default(),
        entrypoint: cfg.entrypoint.unwrap_or_default(),
        cmd: cfg.cmd.unwrap_or_default(),
    };
    let platform = format!(
        "{}/{}",
        inspect.os.clone().unwrap_or_else(|| "linux".into()),
        inspect
            .architecture
            .clone()
            .unwrap_or_else(|| "amd64".into())
    );

    let name = format!("infra-operator-export-{}-{}", std::process::id(), nanos());
    let body = ContainerCreateBody {
        image: Some(reference.to_string()),
        // Never started; a command is only needed because some images have none.
        cmd: Some(vec!["/infra-operator-never-runs".into()]),
        entrypoint: Some(vec![]),
        ..Default::default()
    };
    let opts = CreateContainerOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    docker
        .create_container(Some(opts), body)
        .await
        .map_err(daemon_err(format!("create a container from {reference}")))?;
    let out = workdir.join("export.tar");
    let result = export(&docker, &name, &out, progress).await;
    let removed = docker
        .remove_container(
            &name,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await;
    result?;
    removed.map_err(daemon_err(format!("remove container {name}")))?;
    Ok(FetchedImage {
        kind: "docker-daemon".into(),
        reference: reference.to_string(),
        digest: inspect.id.clone(),
        platform,
        layers: vec![LayerFile {
            path: out,
            region: None,
            digest: format!("docker-export:{name}"),
            diff_id: None,
        }],
        config,
    })
}

async fn export(docker: &Docker, name: &str, out: &Path, progress: &dyn Progress) -> Result<()> {
    let mut file = tokio::fs::File::create(out).await.ctx("create", out)?;
    let id = format!("export:{name}");
    progress.transfer_start(&id, "exporting container filesystem", None);
    let mut stream = docker.export_container(name);
    let mut result = Ok(());
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                if let Err(e) = file.write_all(&bytes).await {
                    result = Err(Error::io("write", out, e));
                    break;
                }
                progress.transfer_inc(&id, bytes.len() as u64);
            }
            Err(e) => {
                result = Err(Error::Daemon {
                    context: format!("export container {name}"),
                    source: Box::new(e),
                });
                break;
            }
        }
    }
    progress.transfer_done(&id);
    result?;
    file.sync_all().await.ctx("sync", out)?;
    Ok(())
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
