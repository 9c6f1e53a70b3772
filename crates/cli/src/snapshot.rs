//! `snapshot create|list|rm`: ready VMs saved to disk, restored by `run`, `host` and the API.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use infra_config::Paths;
use infra_runner::{prepare, snapshot, SnapshotRequest};

use crate::run::VmArgs;
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
  infra.operator snapshot list --json")]
pub struct ListArgs {
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
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
        SnapshotCommand::List(a) => list(a, paths),
        SnapshotCommand::Rm(a) => rm(a, paths),
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
