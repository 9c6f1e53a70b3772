//! `infra.operator rootfs ...`: flags and output; the work is in `infra_image`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use infra_config::Paths;
use infra_image::debootstrap::{Base, CreateOptions};
use infra_image::ext4::SizeSpec;
use infra_image::source::{SourceMode, SourceSpec};
use infra_image::{BuildRequest, NoProgress, Origin, Progress, UnpackLimits};
use infra_languages::LanguageTable;

use crate::ui::{human_mb, table, TerminalProgress};

/// Rootfs image commands.
#[derive(Subcommand, Debug)]
pub enum RootfsCommand {
    /// Build a rootfs from an OCI/Docker image (registry, local daemon or archive).
    #[command(after_help = "Examples:
  sudo infra.operator rootfs from-docker --name python --image python:3.12-alpine --size 150
  sudo infra.operator rootfs from-docker --lang python            # preset image, --size auto
  sudo infra.operator rootfs from-docker -n app -i 127.0.0.1:5000/app:1 --platform linux/arm64
  sudo infra.operator rootfs from-docker -n py -i docker-archive:python.tar --lang python
  sudo infra.operator rootfs from-docker -n py -i python:3.12 --source docker")]
    FromDocker(FromDockerArgs),
    /// Build a rootfs with debootstrap (Debian/Ubuntu) or apk (Alpine).
    #[command(after_help = "Examples:
  sudo infra.operator rootfs create --lang python
  sudo infra.operator rootfs create --lang python --packages numpy,pandas
  sudo infra.operator rootfs create --lang bash --base debian --post-install setup.sh
  sudo infra.operator rootfs create --langs python,nodejs,c,java --name polyglot
  sudo infra.operator rootfs create --langs all               # every installable language
  infra.operator run --lang java --rootfs polyglot --code 'class Main { ... }'")]
    Create(CreateArgs),
    /// List rootfs images.
    #[command(
        alias = "ls",
        after_help = "Examples:
  infra.operator rootfs list
  infra.operator rootfs list --remote
  infra.operator rootfs list --json"
    )]
    List(ListArgs),
    /// Boot an image and print its language version and disk usage.
    Verify(crate::run::VerifyArgs),
    /// Upload an image (and its manifest) to the object store.
    #[command(after_help = "Examples:
  infra.operator rootfs upload --lang python
  infra.operator rootfs upload --lang nodejs --bucket s3://my-bucket
  infra.operator rootfs upload --lang python --compress     # rootfs-python.ext4.zst")]
    Upload(crate::store::RootfsUploadArgs),
    /// Download an image (and its manifest) from the object store.
    #[command(after_help = "Examples:
  infra.operator rootfs download --lang python
  infra.operator rootfs download --lang nodejs --output /tmp/nodejs.ext4
  infra.operator rootfs download --lang python --version-id VERSION")]
    Download(crate::store::RootfsDownloadArgs),
}

/// Flags shared by the build commands.
#[derive(Args, Debug)]
pub struct OutputArgs {
    /// Image size in MB, or `auto` (smallest that fits plus --headroom).
    #[arg(short = 's', long, default_value = "auto")]
    size: String,
    /// Free space left by `--size auto`, in percent of the content.
    #[arg(long, default_value_t = 10)]
    headroom: u32,
    /// Output path [default: <images>/rootfs-{name}.ext4].
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// Agent binary to inject [default: this binary].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Print the manifest as JSON instead of progress.
    #[arg(long)]
    json: bool,
}

/// Bounds on what an image's layers may expand to (a build that crosses one stops with a clear
/// error and leaves nothing behind). Sizes take K, M, G or T suffixes (powers of 1024).
#[derive(Args, Debug)]
#[command(next_help_heading = "Limits (hostile images)")]
pub struct LimitArgs {
    /// Most uncompressed bytes of one layer.
    #[arg(long, value_name = "SIZE", default_value = "32G", value_parser = parse_size)]
    max_layer_size: u64,
    /// Most bytes of all the image's files together (holes of sparse files included).
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = parse_size)]
    max_image_size: u64,
    /// Most bytes of one file.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = parse_size)]
    max_file_size: u64,
    /// Most tar entries over all layers.
    #[arg(long, value_name = "N", default_value_t = 2_000_000)]
    max_entries: u64,
}

impl LimitArgs {
    fn limits(&self) -> UnpackLimits {
        UnpackLimits {
            max_layer_bytes: self.max_layer_size,
            max_image_bytes: self.max_image_size,
            max_entries: self.max_entries,
            max_file_bytes: self.max_file_size,
        }
    }
}

/// `1048576`, `512K`, `64M`, `32G`, `1T` (powers of 1024; a trailing `B`/`iB` is accepted).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 1048576, 512M, 32G)"))
}

/// `rootfs from-docker` flags.
#[derive(Args, Debug)]
pub struct FromDockerArgs {
    /// Name for the rootfs (`rootfs-{name}.ext4`) [default: the language].
    #[arg(short = 'n', long)]
    name: Option<String>,
    /// Image: `name:tag`, `docker://ref`, `docker-daemon:ref`, `docker-archive:PATH`,
    /// `oci-archive:PATH`, `oci:DIR` [default: the language's preset].
    #[arg(short = 'i', long)]
    image: Option<String>,
    /// Language whose presets (image, environment) apply.
    #[arg(short = 'l', long)]
    lang: Option<String>,
    /// Platform to select from a multi-arch image.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Use plain HTTP for the registry (always allowed for localhost).
    #[arg(long)]
    insecure: bool,
    /// Where to get the image: auto (daemon if it has it, else registry), registry, docker.
    #[arg(long, default_value = "auto", value_parser = ["auto", "registry", "docker"])]
    source: String,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    out: OutputArgs,
}

/// `rootfs create` flags.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Language runtime to install.
    #[arg(
        short = 'l',
        long,
        required_unless_present = "langs",
        conflicts_with = "langs"
    )]
    lang: Option<String>,
    /// Several languages in one image (comma separated, or `all` for every installable one
    /// of the Debian release); named `polyglot` unless --name says otherwise.
    #[arg(long, value_name = "LIST")]
    langs: Option<String>,
    /// Name [default: the language, or `polyglot` with --langs].
    #[arg(short = 'n', long)]
    name: Option<String>,
    /// Base OS: debian, ubuntu or alpine.
    #[arg(short = 'b', long, default_value = "debian")]
    base: String,
    /// Additional packages (comma or space separated).
    #[arg(short = 'p', long)]
    packages: Option<String>,
    /// Script run in the chroot after installation.
    #[arg(long)]
    post_install: Option<PathBuf>,
    /// Release (bookworm, jammy, v3.20) [default: per base].
    #[arg(long)]
    suite: Option<String>,
    /// Package mirror [default: the host's apt mirror for Debian].
    #[arg(long)]
    mirror: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
}

/// `rootfs list` flags.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// List images in the object store instead (see `store ls`).
    #[arg(short = 'r', long)]
    remote: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: crate::store::StoreArgs,
}

/// Runs a rootfs subcommand.
pub async fn run(cmd: RootfsCommand, paths: &Paths) -> Result<()> {
    match cmd {
        RootfsCommand::FromDocker(a) => from_docker(a, paths).await,
        RootfsCommand::Create(a) => create(a, paths).await,
        RootfsCommand::List(a) if a.remote => {
            crate::store::rootfs_list_remote(&a.store, a.json, paths).await
        }
        RootfsCommand::List(a) => list(a, paths),
        RootfsCommand::Verify(a) => crate::run::verify(a, paths).await,
        RootfsCommand::Upload(a) => crate::store::rootfs_upload(a, paths).await,
        RootfsCommand::Download(a) => crate::store::rootfs_download(a, paths).await,
    }
}

async fn from_docker(a: FromDockerArgs, paths: &Paths) -> Result<()> {
    let lang = a
        .lang
        .as_deref()
        .map(|l| LanguageTable::builtin().get(l))
        .transpose()?;
    let image = match (&a.image, lang) {
        (Some(i), _) => i.clone(),
        (None, Some(l)) => l.image.clone().with_context(|| {
            format!(
                "{} has no preset image: pass --image, or use `rootfs create --lang {}`",
                l.name, l.key
            )
        })?,
        (None, None) => bail!("--image is required (or --lang to use the language's preset image)"),
    };
    let name = match (&a.name, lang) {
        (Some(n), _) => n.clone(),
        (None, Some(l)) => l.key.clone(),
        (None, None) => {
            bail!("--name is required (or --lang to name the image after the language)")
        }
    };
    // A name that matches a language gets its presets, as in the seeds (`--name python`).
    let language = lang.map(|l| l.key.clone()).or_else(|| {
        LanguageTable::builtin()
            .get(&name)
            .ok()
            .map(|l| l.key.clone())
    });
    let mode = match a.source.as_str() {
        "registry" => SourceMode::Registry,
        "docker" => SourceMode::Docker,
        _ => SourceMode::Auto,
    };
    let spec = SourceSpec::parse(&image, mode)?;
    let mut req = request(
        &name,
        language,
        Origin::Image { spec, mode },
        &a.out,
        paths,
        a.platform,
        a.insecure,
    )?;
    req.limits = a.limits.limits();
    if !a.out.json {
        println!("Creating rootfs for {name} from Docker image...");
        println!("  Docker Image: {image}");
        println!("  Size: {}", size_label(&req.size));
    }
    build_and_report(req, &a.out, paths).await
}

async fn create(a: CreateArgs, paths: &Paths) -> Result<()> {
    let table = LanguageTable::builtin();
    let base: Base = a.base.parse().map_err(anyhow::Error::msg)?;
    let (primary, keys, title) = match (&a.lang, &a.langs) {
        (Some(l), _) => {
            let lang = table.get(l)?;
            (Some(lang.key.clone()), Vec::new(), lang.name.clone())
        }
        (None, Some(list)) => {
            let mut chosen = table.select(list)?;
            if list.trim().eq_ignore_ascii_case("all") {
                // `all` means all of one Debian release: the others are named, not dropped
                // in silence.
                let suite = a.suite.clone().unwrap_or_else(|| "bookworm".into());
                let (keep, skip): (Vec<_>, Vec<_>) = chosen
                    .into_iter()
                    .partition(|l| l.suite.as_deref().unwrap_or("bookworm") == suite);
                if !skip.is_empty() && !a.out.json {
                    let names: Vec<String> = skip
                        .iter()
                        .map(|l| format!("{} ({})", l.key, l.suite.as_deref().unwrap_or("")))
                        .collect();
                    println!(
                        "Leaving out languages of another Debian release: {}",
                        names.join(", ")
                    );
                }
                chosen = keep;
            }
            let keys: Vec<String> = chosen.iter().map(|l| l.key.clone()).collect();
            let title = format!("{} languages ({})", keys.len(), keys.join(", "));
            (None, keys, title)
        }
        (None, None) => bail!("give --lang LANG or --langs a,b,c (clap should have said so)"),
    };
    let packages = a
        .packages
        .as_deref()
        .unwrap_or("")
        .split([',', ' '])
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let opts = CreateOptions {
        base,
        suite: a.suite,
        mirror: a.mirror,
        packages,
        pip: Vec::new(),
        npm: Vec::new(),
        post_install: a.post_install,
        cache_dir: paths.cache.clone(),
    };
    let name = a
        .name
        .clone()
        .or_else(|| primary.clone())
        .unwrap_or_else(|| "polyglot".into());
    let mut req = request(
        &name,
        primary,
        Origin::Distro(opts),
        &a.out,
        paths,
        "linux/amd64".into(),
        false,
    )?;
    req.languages = keys;
    if !a.out.json {
        println!("Creating rootfs for {title} on {} ...", a.base);
        println!("  Size: {}", size_label(&req.size));
    }
    build_and_report(req, &a.out, paths).await
}

fn request(
    name: &str,
    language: Option<String>,
    origin: Origin,
    out: &OutputArgs,
    paths: &Paths,
    platform: String,
    insecure: bool,
) -> Result<BuildRequest> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        bail!("--name '{name}' is invalid: use letters, digits, '-', '_' and '.'");
    }
    let size = SizeSpec::parse(&out.size, out.headroom).map_err(anyhow::Error::msg)?;
    let agent = match &out.agent {
        Some(a) => a.clone(),
        None => infra_config::agent_binary(infra_guest::AGENT_BUILD_VERSION)
            .context("cannot locate the agent binary to inject")?,
    };
    Ok(BuildRequest {
        name: name.to_string(),
        language,
        languages: Vec::new(),
        origin,
        size,
        output: out.output.clone().unwrap_or_else(|| paths.image(name)),
        platform,
        insecure,
        agent,
        limits: UnpackLimits::default(),
    })
}

fn size_label(size: &SizeSpec) -> String {
    match size {
        SizeSpec::Auto { headroom_pct } => format!("auto (+{headroom_pct}% headroom)"),
        SizeSpec::Fixed { mb } => format!("{mb} MB"),
    }
}

async fn build_and_report(req: BuildRequest, out: &OutputArgs, paths: &Paths) -> Result<()> {
    let manifest = if out.json {
        infra_image::build(&req, paths, &NoProgress).await?
    } else {
        let ui = TerminalProgress::new();
        let progress: &dyn Progress = &ui;
        infra_image::build(&req, paths, progress).await?
    };
    if out.json {
        println!("{}", manifest.to_json());
    } else {
        println!("Created: {}", req.output.display());
        println!(
            "  {} image, {} used, sha256 {}",
            human_mb(manifest.size_bytes),
            human_mb(manifest.used_bytes),
            &manifest.sha256[..16]
        );
    }
    Ok(())
}

fn list(a: ListArgs, paths: &Paths) -> Result<()> {
    let images = infra_image::list_local(&paths.images)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(());
    }
    if images.is_empty() {
        println!("No rootfs images in {}", paths.images.display());
        return Ok(());
    }
    let rows = images
        .iter()
        .map(|i| {
            let m = i.manifest.as_ref();
            vec![
                m.and_then(|m| m.language.clone())
                    .unwrap_or_else(|| i.name.clone()),
                human_mb(i.size_bytes),
                m.map(|m| human_mb(m.used_bytes))
                    .unwrap_or_else(|| "-".into()),
                m.map(|m| {
                    m.created_at
                        .replace('T', " ")
                        .trim_end_matches('Z')
                        .chars()
                        .take(16)
                        .collect()
                })
                .unwrap_or_else(|| "-".into()),
                i.path.display().to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["LANGUAGE", "SIZE", "USED", "CREATED", "PATH"], rows)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_suffixes() {
        use super::parse_size;
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("32GiB"), Ok(32 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
