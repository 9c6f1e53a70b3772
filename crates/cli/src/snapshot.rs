//! `snapshot create|list|rm`: ready VMs saved to disk, restored by `run`, `host` and the API.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use infra_config::Paths;
use infra_runner::{prepare, snapshot, snapshot_store, SnapshotRequest};

use crate::run::VmArgs;
use crate::store::{open, print_json, report_download, report_upload, StoreArgs};
use crate::ui::{human_mb, table};

/// `snapshot` subcommands.
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Boot a language's VM, run an optional warm-up, and save it ready to run code.
    Create(Box<CreateArgs>),
    /// List the snapshots on this host.
    List(ListArgs),
    /// Remove a language's snapshot.
    Rm(RmArgs),
    /// Send snapshots to the object store (snapshots/{lang}/, state files zstd-compressed).
    Upload(TransferArgs),
    /// Fetch snapshots from the object store, verified, replacing the local one atomically.
    Download(TransferArgs),
}

/// `snapshot create` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator snapshot create --lang python
  infra.operator snapshot create -l python --warmup 'import json, decimal, sqlite3'
  infra.operator snapshot create -l python --mem 1024 --vcpus 2 --json

The snapshot is <home>/snapshots/<lang>/: the VMM's state files and manifest.json (backend and
its version, CPU, the sha256 of kernel, initramfs and image, --mem, --vcpus, file digests).
`run` and `host` restore it when all of that matches the run, and boot otherwise, saying why.
An existing snapshot is replaced only once the new one is complete.")]
pub struct CreateArgs {
    /// Language.
    #[arg(short, long)]
    lang: String,
    /// Guest memory in MiB (runs restore it only with the same --mem).
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Guest vCPUs (runs restore it only with the same --vcpus).
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// A program to run before saving, e.g. imports that warm the page cache.
    #[arg(long, value_name = "CODE")]
    warmup: Option<String>,
    /// Time limit for the warm-up, seconds.
    #[arg(long, default_value_t = 60)]
    warmup_timeout: u64,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

/// `snapshot list` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator snapshot list
  infra.operator snapshot list --remote -b s3://llm-infra-operator-rootfs
  infra.operator snapshot list --json")]
pub struct ListArgs {
    /// List the snapshots in the object store instead of this host's.
    #[arg(long)]
    remote: bool,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `snapshot upload|download` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator snapshot upload --lang python
  infra.operator snapshot upload --all -b s3://llm-infra-operator-rootfs
  infra.operator snapshot download --lang python --json
  BUCKET=s3://llm-infra-operator-rootfs infra.operator snapshot download --all

Keys: snapshots/{lang}/manifest.json and snapshots/{lang}/{file}.zst (zstd, holes read as
zeros). Downloads check the manifest and every file's sha256 and size, then swap the
directory in whole; `run` also fetches a matching snapshot by itself when it has none.")]
pub struct TransferArgs {
    /// Language.
    #[arg(short, long, required_unless_present = "all", conflicts_with = "all")]
    lang: Option<String>,
    /// Every language (on this host for upload, in the store for download).
    #[arg(long)]
    all: bool,
    /// One JSON array of the transfers instead of lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `snapshot rm` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator snapshot rm --lang python")]
pub struct RmArgs {
    /// Language.
    #[arg(short, long)]
    lang: String,
}

/// Runs a `snapshot` subcommand.
pub async fn run(cmd: SnapshotCommand, paths: &Paths) -> Result<()> {
    match cmd {
        SnapshotCommand::Create(a) => create(*a, paths).await,
        SnapshotCommand::List(a) if a.remote => list_remote(a, paths).await,
        SnapshotCommand::List(a) => list(a, paths),
        SnapshotCommand::Rm(a) => rm(a, paths),
        SnapshotCommand::Upload(a) => upload(a, paths).await,
        SnapshotCommand::Download(a) => download(a, paths).await,
    }
}

async fn create(a: CreateArgs, paths: &Paths) -> Result<()> {
    let lang = prepare::language(&a.lang)?;
    let runner = a.vm.runner(paths)?;
    let f = a.vm.prepare(paths, &lang, &runner).await?;
    let dir = snapshot::snapshot_dir(&paths.home, &lang.key);
    if !a.json {
        eprintln!(
            "Booting {} and saving it to {} ...",
            lang.key,
            dir.display()
        );
    }
    let started = std::time::Instant::now();
    let m = runner
        .create_snapshot(&SnapshotRequest {
            lang: lang.key.clone(),
            kernel: f.kernel,
            initramfs: f.initramfs,
            rootfs: f.rootfs,
            mem_mib: a.mem,
            vcpus: a.vcpus,
            warmup: a.warmup,
            warmup_timeout: Duration::from_secs(a.warmup_timeout.max(1)),
            dir: dir.clone(),
        })
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let bytes: u64 = m.files.values().map(|f| f.bytes).sum();
    println!(
        "Snapshot of {} saved in {:.1} s (boot {:.1} s): {} on disk for {} MiB of guest memory, {} {}",
        m.machine.lang,
        started.elapsed().as_secs_f64(),
        m.boot_secs,
        human_mb(bytes),
        m.machine.mem_mib,
        m.machine.backend,
        m.machine.accel
    );
    println!("{}", dir.display());
    Ok(())
}

fn list(a: ListArgs, paths: &Paths) -> Result<()> {
    let all = snapshot::list(&paths.home);
    if a.json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|(lang, dir, m)| match m {
                Ok(m) => serde_json::json!({"lang": lang, "path": dir, "manifest": m}),
                Err(e) => serde_json::json!({"lang": lang, "path": dir, "error": e}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if all.is_empty() {
        println!(
            "No snapshots in {}; make one with `infra.operator snapshot create --lang LANG`",
            paths.home.join("snapshots").display()
        );
        return Ok(());
    }
    let rows = all
        .into_iter()
        .map(|(lang, dir, m)| match m {
            Ok(m) => vec![
                lang,
                format!("{} {}", m.machine.backend, m.machine.accel),
                format!("{} MiB / {}", m.machine.mem_mib, m.machine.vcpus),
                human_mb(m.files.values().map(|f| f.bytes).sum()),
                m.created_at.replace('T', " ").trim_end_matches('Z').into(),
                dir.display().to_string(),
            ],
            Err(e) => vec![
                lang,
                format!("unusable: {e}"),
                "-".into(),
                "-".into(),
                "-".into(),
                dir.display().to_string(),
            ],
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "LANGUAGE",
                "BACKEND",
                "MEM / VCPUS",
                "SIZE",
                "CREATED",
                "PATH"
            ],
            rows
        )
    );
    Ok(())
}

fn rm(a: RmArgs, paths: &Paths) -> Result<()> {
    let lang = prepare::language(&a.lang)?;
    let dir = snapshot::snapshot_dir(&paths.home, &lang.key);
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(infra_runner::RunError::Usage(format!(
                "there is no snapshot of {} ({} does not exist)",
                lang.key,
                dir.display()
            )))
        }
        Err(e) => bail!("cannot read {}: {e}", dir.display()),
        Ok(m) if !m.is_dir() => bail!("{} is not a directory; remove it by hand", dir.display()),
        Ok(_) => {}
    }
    std::fs::remove_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", dir.display()))?;
    println!("Removed {}", dir.display());
    Ok(())
}

async fn upload(a: TransferArgs, paths: &Paths) -> Result<()> {
    let langs = match &a.lang {
        Some(l) => vec![prepare::language(l)?.key],
        None => snapshot_store::local_langs(&paths.home),
    };
    if langs.is_empty() {
        bail!(
            "no snapshots in {} to upload; make one with `infra.operator snapshot create --lang LANG`",
            paths.snapshots().display()
        );
    }
    let ctx = open(&a.store, paths, a.json).await?;
    let mut done = Vec::new();
    for lang in langs {
        for s in snapshot_store::upload(&ctx.engine, paths, &lang).await? {
            if !a.json {
                report_upload(&s);
            }
            done.push(s);
        }
    }
    if a.json {
        print_json(&done)?;
    }
    Ok(())
}

async fn download(a: TransferArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let langs = match &a.lang {
        Some(l) => vec![prepare::language(l)?.key],
        None => snapshot_store::remote_list(&ctx.engine)
            .await?
            .into_iter()
            .filter(|r| r.manifest.is_some())
            .map(|r| r.lang)
            .collect(),
    };
    if langs.is_empty() {
        bail!(
            "no snapshots in {}; upload one with `infra.operator snapshot upload --lang LANG`",
            ctx.engine.store().describe()
        );
    }
    let mut done = Vec::new();
    for lang in langs {
        let (_, got) = snapshot_store::download(&ctx.engine, paths, &lang).await?;
        for s in got {
            if !a.json {
                report_download(&s);
            }
            done.push(s);
        }
        if !a.json {
            println!("{}", snapshot::snapshot_dir(&paths.home, &lang).display());
        }
    }
    if a.json {
        print_json(&done)?;
    }
    Ok(())
}

async fn list_remote(a: ListArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let all = snapshot_store::remote_list(&ctx.engine).await?;
    if a.json {
        return print_json(&all);
    }
    if all.is_empty() {
        println!(
            "No snapshots in {}; upload one with `infra.operator snapshot upload --lang LANG`",
            ctx.engine.store().describe()
        );
        return Ok(());
    }
    let rows = all
        .into_iter()
        .map(|r| {
            let key = ctx.engine.store().url_of(&format!(
                "{}{}/",
                infra_store::artifacts::SNAPSHOTS_PREFIX,
                r.lang
            ));
            match (r.manifest, r.error) {
                (Some(m), _) => vec![
                    r.lang,
                    format!("{} {}", m.machine.backend, m.machine.accel),
                    format!("{} MiB / {}", m.machine.mem_mib, m.machine.vcpus),
                    human_mb(r.stored_bytes),
                    m.created_at.replace('T', " ").trim_end_matches('Z').into(),
                    key,
                ],
                (None, e) => vec![
                    r.lang,
                    format!("unusable: {}", e.unwrap_or_default()),
                    "-".into(),
                    human_mb(r.stored_bytes),
                    "-".into(),
                    key,
                ],
            }
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "LANGUAGE",
                "BACKEND",
                "MEM / VCPUS",
                "STORED",
                "CREATED",
                "KEY"
            ],
            rows
        )
    );
    Ok(())
}
