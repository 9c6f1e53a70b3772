//! `infra.operator store ...` and the store side of `rootfs upload|download|list --remote`:
//! flags and output; the work is in `infra_store`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use infra_config::Paths;
use infra_store::artifacts;
use infra_store::glob::Filter;
use infra_store::report::aws_size;
use infra_store::sync::{ActionKind, SyncSide};
use infra_store::{
    DownloadSummary, Engine, HashCache, InitOptions, Location, NoProgress, ObjectInfo, ObjectStore,
    Origin, Progress, StepStatus, StoreConfig, StoreFlags, UploadSummary,
};

use crate::ui::{human_mb, table, TerminalProgress};

/// Where the store is (every store command takes these).
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Bucket: s3://NAME[/PREFIX], or file:///DIR for a local store [env: BUCKET, S3_BUCKET;
    /// default: the config file's, else the local store <home>/store].
    #[arg(short = 'b', long, value_name = "s3://NAME[/PREFIX]")]
    bucket: Option<String>,
    /// Region [env: AWS_REGION; default: the profile's, else us-east-1].
    #[arg(long)]
    region: Option<String>,
    /// S3-compatible endpoint (Garage, MinIO, Ceph), path-style addressing [env:
    /// S3_ENDPOINT_URL, AWS_ENDPOINT_URL].
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// AWS profile of the shared config files [env: AWS_PROFILE].
    #[arg(long)]
    profile: Option<String>,
    /// Part size in MiB for multipart uploads and ranged downloads [default: 16, more for
    /// objects over ~160 GB so that they fit in 10000 parts].
    #[arg(long, value_name = "MIB")]
    part_size: Option<u64>,
    /// Parts in flight [default: 8].
    #[arg(long)]
    concurrency: Option<usize>,
}

impl StoreArgs {
    fn flags(&self) -> StoreFlags {
        StoreFlags {
            bucket: self.bucket.clone(),
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            profile: self.profile.clone(),
            part_size_mib: self.part_size,
            concurrency: self.concurrency,
        }
    }
}

/// Object store commands.
#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// List the store's contents (like `aws s3 ls --summarize`).
    #[command(after_help = "Examples:
  infra.operator store ls --human-readable
  infra.operator store ls -b s3://llm-infra-operator-rootfs/dev/ --recursive
  S3_BUCKET=llm-infra-operator-rootfs-dev infra.operator store ls")]
    Ls(LsArgs),
    /// Upload files (default key: the file name at the prefix root).
    #[command(after_help = "Examples:
  infra.operator store upload --all                       # rootfs-*.ext4, manifests, vmlinux
  infra.operator store upload /srv/firecracker/images/rootfs-python.ext4
  infra.operator store upload ./vmlinux --key vmlinux -b s3://llm-infra-operator-rootfs/prod")]
    Upload(StoreUploadArgs),
    /// Download objects (images to the images directory, vmlinux to the kernel path).
    #[command(after_help = "Examples:
  infra.operator store download --all
  infra.operator store download rootfs-python.ext4
  infra.operator store download vmlinux --output /tmp/vmlinux")]
    Download(StoreDownloadArgs),
    /// Make DST like SRC: local directory ↔ bucket, or bucket ↔ bucket.
    #[command(after_help = "Examples:
  infra.operator store sync /srv/firecracker/images/ s3://llm-infra-operator-rootfs/ \\
      --exclude '*' --include 'rootfs-*.ext4'
  infra.operator store sync s3://llm-infra-operator-rootfs/ /srv/firecracker/images/ --dry-run
  infra.operator store sync s3://llm-infra-operator-rootfs/prod/ s3://rootfs-backup/prod/ --delete

SRC and DST are s3://NAME[/PREFIX], file:///DIR (a local store) or a directory.
Filters apply in order, the last match wins (as in `aws s3 sync`); '*' matches '/' too.")]
    Sync(SyncArgs),
    /// Create the bucket with versioning, a lifecycle rule and default encryption.
    #[command(after_help = "Examples:
  infra.operator store init -b s3://llm-infra-operator-rootfs --region us-east-1
  infra.operator store init -b s3://my-rootfs --region eu-west-1 --noncurrent-days 30

Reports each setting the server does not support (Garage: versioning, encryption).")]
    Init(InitArgs),
    /// List the versions of an object (download one with --version-id).
    #[command(after_help = "Examples:
  infra.operator store versions rootfs-python.ext4
  infra.operator rootfs download --lang python --version-id VERSION")]
    Versions(VersionsArgs),
    /// Monthly storage cost of what the store holds.
    #[command(after_help = "Examples:
  infra.operator store cost
  infra.operator store cost --price-per-gb 0.0125      # S3 Standard-IA")]
    Cost(CostArgs),
}

/// `store ls` flags.
#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only keys under this prefix (relative to the bucket's prefix).
    prefix: Option<String>,
    /// Sizes in KiB/MiB/GiB.
    #[arg(short = 'H', long)]
    human_readable: bool,
    /// List keys under sub-prefixes too (else they show as `PRE name/`).
    #[arg(short = 'r', long)]
    recursive: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `store upload` flags.
#[derive(Args, Debug)]
pub struct StoreUploadArgs {
    /// Files to upload.
    paths: Vec<PathBuf>,
    /// Upload all images (rootfs-*.ext4), their manifests and the kernel bundle (vmlinux,
    /// vmlinux.json, vmlinux.modules/).
    #[arg(long, conflicts_with = "paths")]
    all: bool,
    /// Key for a single file [default: its file name].
    #[arg(long)]
    key: Option<String>,
    /// Compress with zstd as KEY.zst (zeros and free blocks are almost free).
    #[arg(long)]
    compress: bool,
    /// JSON summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `store download` flags.
#[derive(Args, Debug)]
pub struct StoreDownloadArgs {
    /// Key to download.
    key: Option<String>,
    /// Download all images, manifests and the kernel bundle.
    #[arg(long, conflicts_with = "key")]
    all: bool,
    /// Output file (one key) or directory (--all) [default: images dir / kernel path].
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// A specific version.
    #[arg(long)]
    version_id: Option<String>,
    /// JSON summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `store sync` flags.
#[derive(Args, Debug)]
pub struct SyncArgs {
    /// Source: s3://NAME[/PREFIX], file:///DIR or a directory.
    src: String,
    /// Destination: s3://NAME[/PREFIX], file:///DIR or a directory.
    dst: String,
    /// Include keys matching this glob (repeatable; order with --exclude matters).
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// Exclude keys matching this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Delete destination keys that the source does not have (within the filters).
    #[arg(long)]
    delete: bool,
    /// Show what would be done.
    #[arg(long)]
    dry_run: bool,
    /// JSON report.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `store init` flags.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Expire noncurrent versions after this many days (0: no rule).
    #[arg(long, default_value_t = 30)]
    noncurrent_days: u32,
    /// Abort incomplete multipart uploads after this many days (0: no rule).
    #[arg(long, default_value_t = 7)]
    abort_incomplete_days: u32,
    /// Leave versioning off.
    #[arg(long)]
    no_versioning: bool,
    /// Do not set default SSE-S3 encryption.
    #[arg(long)]
    no_encryption: bool,
    /// JSON report.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `store versions` flags.
#[derive(Args, Debug)]
pub struct VersionsArgs {
    /// Object key.
    key: String,
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `store cost` flags.
#[derive(Args, Debug)]
pub struct CostArgs {
    /// USD per GB-month (S3 Standard in us-east-1: 0.023).
    #[arg(long, default_value_t = infra_store::cost::DEFAULT_PRICE_PER_GB)]
    price_per_gb: f64,
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `rootfs upload` flags.
#[derive(Args, Debug)]
pub struct RootfsUploadArgs {
    /// Image to upload (rootfs-{lang}.ext4 in the images directory).
    #[arg(short = 'l', long)]
    lang: String,
    /// Upload as rootfs-{lang}.ext4.zst (zstd; downloads restore a sparse file).
    #[arg(long)]
    compress: bool,
    /// JSON summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `rootfs download` flags.
#[derive(Args, Debug)]
pub struct RootfsDownloadArgs {
    /// Image to download.
    #[arg(short = 'l', long)]
    lang: String,
    /// Output path [default: <images>/rootfs-{lang}.ext4].
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// A specific version (see `store versions rootfs-{lang}.ext4`).
    #[arg(long)]
    version_id: Option<String>,
    /// JSON summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// Draws store progress with the CLI's bars (hidden when stderr is not a terminal).
struct Bars(TerminalProgress);

impl Progress for Bars {
    fn start(&self, id: &str, label: &str, total: Option<u64>) {
        infra_image::Progress::transfer_start(&self.0, id, label, total);
    }
    fn advance(&self, id: &str, bytes: u64) {
        infra_image::Progress::transfer_inc(&self.0, id, bytes);
    }
    fn finish(&self, id: &str) {
        infra_image::Progress::transfer_done(&self.0, id);
    }
    fn note(&self, message: &str) {
        self.0.line(message);
    }
}

/// Everything a command needs: the resolved config, the store and an engine.
pub(crate) struct Ctx {
    config: StoreConfig,
    pub(crate) engine: Engine,
}

pub(crate) async fn open(args: &StoreArgs, paths: &Paths, json: bool) -> Result<Ctx> {
    let config = StoreConfig::from_env(&args.flags(), paths)?;
    let store = config.open().await?;
    let progress: Arc<dyn Progress> = if json {
        Arc::new(NoProgress)
    } else {
        Arc::new(Bars(TerminalProgress::new()))
    };
    let hashes = Arc::new(HashCache::load(config.hash_cache_path()));
    let engine = Engine::new(store, config.transfer_options(), progress, hashes);
    Ok(Ctx { config, engine })
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn report_upload(u: &UploadSummary) {
    println!("{}", u.line());
}

pub(crate) fn report_download(d: &DownloadSummary) {
    println!("{}", d.line());
}

/// Runs a `store` subcommand.
pub async fn run(cmd: StoreCommand, paths: &Paths) -> Result<()> {
    match cmd {
        StoreCommand::Ls(a) => ls(a, paths).await,
        StoreCommand::Upload(a) => upload(a, paths).await,
        StoreCommand::Download(a) => download(a, paths).await,
        StoreCommand::Sync(a) => sync(a, paths).await,
        StoreCommand::Init(a) => init(a, paths).await,
        StoreCommand::Versions(a) => versions(a, paths).await,
        StoreCommand::Cost(a) => cost(a, paths).await,
    }
}

/// Sizes the way `aws s3 ls --human-readable` prints them.
fn store_label(c: &StoreConfig) -> String {
    match &c.location {
        Location::S3 { bucket, prefix } if prefix.is_empty() => bucket.clone(),
        Location::S3 { bucket, prefix } => format!("{bucket}/{prefix}"),
        Location::Local { root, prefix } => {
            format!("local store {}/{prefix}", root.display())
        }
    }
}

async fn ls(a: LsArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let prefix = a.prefix.clone().unwrap_or_default();
    let objects = ctx.engine.store().list(&prefix).await?;
    let (mut dirs, mut files): (Vec<String>, Vec<&ObjectInfo>) = (Vec::new(), Vec::new());
    for o in &objects {
        let rest = &o.key[prefix.len().min(o.key.len())..];
        match rest.split_once('/') {
            Some((d, _)) if !a.recursive => {
                let d = format!("{prefix}{d}/");
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
            _ => files.push(o),
        }
    }
    if a.json {
        return print_json(&serde_json::json!({
            "store": ctx.config.location.display(),
            "prefixes": dirs,
            "objects": files,
            "total_objects": files.len(),
            "total_size": files.iter().map(|o| o.size).sum::<u64>(),
        }));
    }
    println!("=== S3 bucket contents ({}) ===", store_label(&ctx.config));
    for d in &dirs {
        println!("{:>30} {d}", "PRE");
    }
    for o in &files {
        let when = o
            .last_modified
            .map(|t| {
                t.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_else(|| "-".repeat(19));
        println!(
            "{when} {:>10} {}",
            aws_size(o.size, a.human_readable),
            o.key
        );
    }
    let total: u64 = files.iter().map(|o| o.size).sum();
    println!();
    println!("Total Objects: {}", files.len());
    println!("   Total Size: {}", aws_size(total, a.human_readable));
    if ctx.config.origin == Origin::Default {
        eprintln!(
            "note: no bucket configured (--bucket, BUCKET, S3_BUCKET or {}): this is the local store",
            infra_store::CONFIG_ENV
        );
    }
    Ok(())
}

async fn upload(a: StoreUploadArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let items: Vec<(PathBuf, String)> = if a.all {
        let items = artifacts::local_images(paths)?;
        if items.is_empty() && !paths.kernel.is_file() {
            bail!(
                "nothing to upload: no rootfs-*.ext4 in {} and no kernel at {}",
                paths.images.display(),
                paths.kernel.display()
            );
        }
        items
    } else {
        if a.paths.is_empty() {
            bail!("give files to upload, or --all for every image, manifest and the kernel");
        }
        if a.key.is_some() && a.paths.len() > 1 {
            bail!("--key names one object: give one file with it");
        }
        a.paths
            .iter()
            .map(|p| {
                let key = a.key.clone().unwrap_or_else(|| {
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
                (p.clone(), key)
            })
            .collect()
    };
    let mut done = Vec::new();
    for (path, key) in items {
        let compress = a.compress && !key.ends_with(".json");
        let expected = artifacts::manifest_sha256(&path);
        let s = if compress {
            ctx.engine
                .upload_compressed(
                    &path,
                    &format!("{key}{}", infra_store::ZST_SUFFIX),
                    &Default::default(),
                    expected.as_deref(),
                )
                .await
        } else {
            ctx.engine
                .upload_file_expecting(&path, &key, &Default::default(), expected.as_deref())
                .await
        }
        .with_context(|| format!("upload of {} stopped", path.display()))?;
        if !a.json {
            report_upload(&s);
        }
        done.push(s);
    }
    if a.all && paths.kernel.is_file() {
        // The kernel as a bundle: modules, vmlinux, then its manifest.
        let sent = artifacts::upload_kernel(&ctx.engine, paths)
            .await
            .with_context(|| format!("upload of the kernel {} stopped", paths.kernel.display()))?;
        for s in sent {
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

/// Where a downloaded key goes. A path derived from the key (no `--output FILE`) goes through
/// the store's key check.
fn download_target(
    paths: &Paths,
    key: &str,
    output: Option<&Path>,
    all: bool,
) -> infra_store::Result<PathBuf> {
    match output {
        Some(o) if all || o.is_dir() => artifacts::target_in(o, key),
        Some(o) => Ok(o.to_path_buf()),
        None => artifacts::local_target(paths, key),
    }
}

async fn download(a: StoreDownloadArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let mut kernel = false;
    let keys: Vec<String> = if a.all {
        let listed = ctx.engine.store().list("").await?;
        kernel = listed.iter().any(|o| o.key == artifacts::KERNEL_KEY);
        let mut keys: Vec<String> = listed
            .iter()
            .map(|o| o.key.clone())
            .filter(|k| artifacts::is_artifact_key(k) && !artifacts::is_kernel_key(k))
            .collect();
        // When an image exists plain and compressed, take the newer form only.
        let newer = |k: &str| {
            listed
                .iter()
                .find(|o| o.key == k)
                .and_then(|o| o.last_modified)
        };
        let all = keys.clone();
        keys.retain(|k| {
            if let Some(plain) = k.strip_suffix(infra_store::ZST_SUFFIX) {
                !(all.iter().any(|x| x == plain) && newer(plain) >= newer(k))
            } else {
                let z = format!("{k}{}", infra_store::ZST_SUFFIX);
                !(all.contains(&z) && newer(&z) > newer(k))
            }
        });
        if keys.is_empty() && !kernel {
            bail!(
                "no images or kernel in {}: upload them with `infra.operator store upload --all`",
                ctx.engine.store().describe()
            );
        }
        keys
    } else {
        match &a.key {
            Some(k) => vec![k.clone()],
            None => bail!("give a key to download, or --all for every image and the kernel"),
        }
    };
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    for key in keys {
        let dest = match download_target(paths, &key, a.output.as_deref(), a.all) {
            Ok(d) => d,
            Err(e @ infra_store::Error::UnsafeKey { .. }) => {
                eprintln!(
                    "warning: skipped {}: {e}",
                    ctx.engine.store().url_of(&key).escape_debug()
                );
                skipped.push(key);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let s = if key.ends_with(infra_store::ZST_SUFFIX) {
            ctx.engine
                .download_compressed(&key, &dest, a.version_id.as_deref())
                .await
        } else {
            ctx.engine
                .download_file(&key, &dest, a.version_id.as_deref())
                .await
        }?;
        if !a.json {
            report_download(&s);
        }
        done.push(s);
    }
    if kernel {
        // The kernel as a bundle (vmlinux, its manifest, its modules), into the kernel's
        // place, or into --output DIR as `vmlinux`, `vmlinux.json`, `vmlinux.modules/`.
        let mut at = paths.clone();
        if let Some(o) = &a.output {
            at.kernel = o.join(artifacts::KERNEL_KEY);
        }
        for s in artifacts::download_kernel(&ctx.engine, &at).await? {
            if !a.json {
                report_download(&s);
            }
            done.push(s);
        }
    }
    if a.json {
        print_json(&done)?;
    }
    if !skipped.is_empty() {
        return Err(infra_store::Error::UnsafeKeysSkipped {
            keys: skipped,
            source_desc: ctx.engine.store().describe(),
        }
        .into());
    }
    Ok(())
}

/// `--include`/`--exclude` in command-line order (clap keeps two lists; the order between them
/// decides, as in `aws s3 sync`).
fn ordered_filters(argv: &[String], include: &[String], exclude: &[String]) -> Vec<Filter> {
    let mut out = Vec::new();
    let mut it = argv.iter().peekable();
    while let Some(a) = it.next() {
        let (flag, value) = match a.split_once('=') {
            Some((f, v)) if f == "--include" || f == "--exclude" => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let is_inc = flag == "--include";
        if !is_inc && flag != "--exclude" {
            continue;
        }
        let v = match value {
            Some(v) => v,
            None => match it.next() {
                Some(v) => v.clone(),
                None => continue,
            },
        };
        out.push(if is_inc {
            Filter::Include(v)
        } else {
            Filter::Exclude(v)
        });
    }
    // If argv did not contain them (e.g. called as a library), fall back to excludes first.
    if out.len() != include.len() + exclude.len() {
        out = exclude
            .iter()
            .cloned()
            .map(Filter::Exclude)
            .chain(include.iter().cloned().map(Filter::Include))
            .collect();
    }
    out
}

async fn side(value: &str, config: &StoreConfig) -> Result<SyncSide> {
    if value.starts_with("s3://") || value.starts_with("file://") {
        let loc = Location::parse(value)?;
        let store: Arc<dyn ObjectStore> = config.with_location(loc).open().await?;
        Ok(SyncSide::Store(store))
    } else {
        Ok(SyncSide::Dir(PathBuf::from(value)))
    }
}

async fn sync(a: SyncArgs, paths: &Paths) -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let filters = ordered_filters(&argv, &a.include, &a.exclude);
    let ctx = open(&a.store, paths, a.json).await?;
    let src = side(&a.src, &ctx.config).await?;
    let dst = side(&a.dst, &ctx.config).await?;
    let opts = infra_store::sync::SyncOptions {
        filters,
        delete: a.delete,
        dry_run: a.dry_run,
    };
    let report = infra_store::sync::sync(
        &src,
        &dst,
        &opts,
        ctx.engine.options(),
        ctx.engine.progress().clone(),
        ctx.engine.hashes().clone(),
    )
    .await?;
    if a.json {
        print_json(&report)?;
    } else {
        print_sync_report(&report);
    }
    // Unsafe keys were skipped (and named); the rest was transferred: exit non-zero.
    if !report.skipped.is_empty() {
        return Err(infra_store::Error::UnsafeKeysSkipped {
            keys: report.skipped.iter().map(|s| s.key.clone()).collect(),
            source_desc: src.describe(),
        }
        .into());
    }
    Ok(())
}

fn print_sync_report(report: &infra_store::sync::SyncReport) {
    let dry = if report.dry_run { "(dryrun) " } else { "" };
    for s in &report.skipped {
        eprintln!("warning: skipped {}: {}", s.from, s.reason);
    }
    for act in &report.actions {
        let verb = match act.kind {
            ActionKind::Upload => "upload",
            ActionKind::Download => "download",
            ActionKind::Copy => "copy",
            ActionKind::Delete => "delete",
        };
        if act.kind == ActionKind::Delete {
            println!("{dry}{verb}: {}", act.to.escape_debug());
        } else {
            println!(
                "{dry}{verb}: {} to {}",
                act.from.escape_debug(),
                act.to.escape_debug()
            );
        }
    }
    let count = |k: ActionKind| report.actions.iter().filter(|a| a.kind == k).count();
    println!(
        "{} transferred ({}), {} deleted, {} unchanged, {} filtered out{}{} in {:.1} s",
        report.actions.len() - count(ActionKind::Delete),
        human_mb(
            report
                .actions
                .iter()
                .filter(|a| a.kind != ActionKind::Delete)
                .map(|a| a.size)
                .sum()
        ),
        count(ActionKind::Delete),
        report.unchanged,
        report.filtered_out,
        if report.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} skipped (unsafe keys)", report.skipped.len())
        },
        if report.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        },
        report.seconds
    );
}

async fn init(a: InitArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let opts = InitOptions {
        versioning: !a.no_versioning,
        noncurrent_days: (a.noncurrent_days > 0 && !a.no_versioning).then_some(a.noncurrent_days),
        abort_incomplete_days: (a.abort_incomplete_days > 0).then_some(a.abort_incomplete_days),
        encryption: !a.no_encryption,
    };
    let mut steps = ctx.engine.store().init(&opts).await?;
    // A noncurrent-version rule means nothing without versions: say so rather than "done".
    let no_versions = steps
        .iter()
        .any(|s| s.feature == "versioning" && s.status == StepStatus::Unsupported);
    for s in steps.iter_mut() {
        if no_versions && s.feature == "lifecycle" && s.status == StepStatus::Done {
            s.detail
                .push_str(" (accepted, but the server keeps no old versions to expire)");
        }
    }
    if a.json {
        return print_json(&serde_json::json!({
            "store": ctx.config.location.display(),
            "steps": steps,
        }));
    }
    let rows = steps
        .iter()
        .map(|s| {
            vec![
                s.feature.to_string(),
                match s.status {
                    StepStatus::Done => "done",
                    StepStatus::AlreadyDone => "already",
                    StepStatus::Unsupported => "UNSUPPORTED",
                    StepStatus::Skipped => "skipped",
                    StepStatus::Failed => "FAILED",
                }
                .to_string(),
                s.detail.clone(),
            ]
        })
        .collect();
    println!("{}", table(&["SETTING", "STATUS", "DETAIL"], rows));
    let unsupported: Vec<&str> = steps
        .iter()
        .filter(|s| s.status == StepStatus::Unsupported)
        .map(|s| s.feature)
        .collect();
    if !unsupported.is_empty() {
        eprintln!(
            "warning: {} not supported by {}; the bucket is usable without {}",
            unsupported.join(", "),
            ctx.engine.store().describe(),
            if unsupported.len() == 1 { "it" } else { "them" }
        );
    }
    if let Some(f) = steps.iter().find(|s| s.status == StepStatus::Failed) {
        bail!("store init: {} failed: {}", f.feature, f.detail);
    }
    Ok(())
}

async fn versions(a: VersionsArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let vs = ctx.engine.store().versions(&a.key).await?;
    if a.json {
        return print_json(&vs);
    }
    let rows = vs
        .iter()
        .map(|v| {
            vec![
                v.version_id.clone(),
                if v.is_latest { "yes" } else { "" }.to_string(),
                if v.delete_marker {
                    "(delete marker)".to_string()
                } else {
                    human_mb(v.size)
                },
                v.last_modified
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["VERSION ID", "LATEST", "SIZE", "LAST MODIFIED"], rows)
    );
    Ok(())
}

async fn cost(a: CostArgs, paths: &Paths) -> Result<()> {
    if !(a.price_per_gb >= 0.0 && a.price_per_gb.is_finite()) {
        bail!("--price-per-gb must be a non-negative number of dollars");
    }
    let ctx = open(&a.store, paths, a.json).await?;
    let objects = ctx.engine.store().list("").await?;
    let report = infra_store::cost::cost(&objects, a.price_per_gb);
    if a.json {
        return print_json(&report);
    }
    use infra_store::cost::format_usd;
    let mut rows: Vec<Vec<String>> = report
        .lines
        .iter()
        .map(|l| {
            vec![
                l.key.clone(),
                aws_size(l.size, true),
                format_usd(l.monthly_usd),
            ]
        })
        .collect();
    rows.push(vec![
        "Total".into(),
        format!("~{}", aws_size(report.total_size, true)),
        format!("~{}/month", format_usd(report.total_monthly_usd)),
    ]);
    println!("{}", table(&["IMAGE", "SIZE", "MONTHLY COST"], rows));
    println!(
        "\nStorage at ${}/GB-month ({}). Transfer costs (AWS list prices):",
        a.price_per_gb,
        store_label(&ctx.config)
    );
    println!(
        "{}",
        table(
            &["TRANSFER TYPE", "COST"],
            vec![
                vec!["Upload (EC2 → S3, same region)".into(), "Free".into()],
                vec!["Download (S3 → EC2, same region)".into(), "Free".into()],
                vec!["Download (S3 → Internet)".into(), "$0.09/GB".into()],
                vec!["Cross-region transfer".into(), "$0.02/GB".into()],
            ]
        )
    );
    Ok(())
}

/// `rootfs upload`.
pub async fn rootfs_upload(a: RootfsUploadArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let done = artifacts::upload_image(&ctx.engine, paths, &a.lang, a.compress)
        .await
        .with_context(|| format!("rootfs upload --lang {} stopped", a.lang))?;
    if a.json {
        return print_json(&done);
    }
    for s in &done {
        report_upload(s);
    }
    Ok(())
}

/// `rootfs download`.
pub async fn rootfs_download(a: RootfsDownloadArgs, paths: &Paths) -> Result<()> {
    let ctx = open(&a.store, paths, a.json).await?;
    let done = artifacts::download_image(
        &ctx.engine,
        paths,
        &a.lang,
        a.output.as_deref(),
        a.version_id.as_deref(),
    )
    .await?;
    if a.json {
        return print_json(&done);
    }
    for s in &done {
        report_download(s);
    }
    Ok(())
}

/// `rootfs list --remote`.
pub async fn rootfs_list_remote(store: &StoreArgs, json: bool, paths: &Paths) -> Result<()> {
    let ctx = open(store, paths, true).await?;
    let objects = ctx.engine.store().list("").await?;
    let images = artifacts::remote_images(&objects);
    if json {
        return print_json(&images);
    }
    if images.is_empty() {
        println!("No rootfs images in {}", ctx.engine.store().describe());
        return Ok(());
    }
    let rows = images
        .iter()
        .map(|i| {
            vec![
                i.language.clone(),
                human_mb(i.size),
                i.last_modified
                    .map(|t| {
                        t.with_timezone(&chrono::Local)
                            .format("%Y-%m-%d %H:%M")
                            .to_string()
                    })
                    .unwrap_or_else(|| "-".into()),
                i.key.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["LANGUAGE", "SIZE", "LAST MODIFIED", "S3 KEY"], rows)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_keep_command_line_order() {
        let argv: Vec<String> = [
            "infra.operator",
            "store",
            "sync",
            "a",
            "s3://b",
            "--exclude",
            "*",
            "--include=rootfs-*.ext4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = ordered_filters(&argv, &["rootfs-*.ext4".into()], &["*".into()]);
        assert_eq!(
            f,
            vec![
                Filter::Exclude("*".into()),
                Filter::Include("rootfs-*.ext4".into())
            ]
        );
    }
}
