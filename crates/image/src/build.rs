//! The build pipeline: source → staged tree → init and agent → ext4 → check → manifest → publish.
//!
//! Publishing is atomic: the image is written to a temp file beside the final path, checked,
//! fsynced and renamed; the manifest likewise. A failed build leaves nothing under the final name
//! and removes its work directory.

use std::io::Read;
use std::path::{Path, PathBuf};

use infra_config::Paths;
use infra_languages::{Language, LanguageTable};
use sha2::{Digest, Sha256};

use crate::debootstrap::{self, CreateOptions};
use crate::error::{Error, IoContext, Result};
use crate::ext4::{self, Ext4Params, SizeSpec};
use crate::inject::{self, InjectOptions, AGENT_IN_IMAGE, AGENT_PORT};
use crate::manifest::{BootInfo, Manifest, SourceInfo, MANIFEST_SCHEMA};
use crate::progress::Progress;
use crate::source::{
    archive, daemon, open_layer, registry, FetchedImage, ImageConfig, SourceMode, SourceSpec,
};
use crate::unpack::{measure_tree, UnpackLimits, Unpacker};

/// Bumped whenever the same input would produce different image bytes (part of the UUID input).
pub const MATERIALIZER_ABI: u32 = 1;
/// Timestamp for filesystem times and injected files when `SOURCE_DATE_EPOCH` is not set.
pub const DEFAULT_EPOCH: i64 = 1_704_067_200; // 2024-01-01T00:00:00Z

/// Where the content comes from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// An OCI/Docker image (registry, daemon or archive).
    Image {
        /// Parsed `--image`.
        spec: SourceSpec,
        /// `--source`.
        mode: SourceMode,
    },
    /// A distribution bootstrap (`rootfs create`).
    Distro(CreateOptions),
}

/// One build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// Image name (`rootfs-{name}.ext4`).
    pub name: String,
    /// Language key whose environment and presets apply.
    pub language: Option<String>,
    /// Every language to install (`rootfs create --langs`); `language` alone when empty.
    pub languages: Vec<String>,
    /// Content source.
    pub origin: Origin,
    /// Size policy.
    pub size: SizeSpec,
    /// Final image path.
    pub output: PathBuf,
    /// `os/arch[/variant]` for multi-arch images.
    pub platform: String,
    /// Plain HTTP to every registry.
    pub insecure: bool,
    /// Agent binary to inject (static).
    pub agent: PathBuf,
    /// Bounds on what the image's layers may expand to.
    pub limits: UnpackLimits,
}

const STEPS: usize = 6;

/// Runs a whole build and returns the manifest written beside the image.
pub async fn build(req: &BuildRequest, paths: &Paths, progress: &dyn Progress) -> Result<Manifest> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NeedRoot);
    }
    for tool in ["mke2fs", "e2fsck", "dumpe2fs"] {
        crate::tools::find(tool, "e2fsprogs")?;
    }
    inject::ensure_static(&req.agent)?;
    let language = req
        .language
        .as_deref()
        .map(|l| LanguageTable::builtin().get(l))
        .transpose()?
        .cloned();
    let languages: Vec<Language> = if req.languages.is_empty() {
        language.iter().cloned().collect()
    } else {
        req.languages
            .iter()
            .map(|l| LanguageTable::builtin().get(l).cloned())
            .collect::<std::result::Result<_, _>>()?
    };
    let out_dir = req
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    if out_dir == paths.images {
        infra_config::ensure_dir(&out_dir, infra_config::SHARED_READ_DIR)?;
    } else {
        // `--output` elsewhere: the user's choice of place.
        std::fs::create_dir_all(&out_dir).ctx("create", &out_dir)?;
    }
    infra_config::ensure_dir(&paths.cache, infra_config::PRIVATE_DIR)?;
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&paths.cache)
        .ctx("create work directory in", &paths.cache)?;
    let staging = work.path().join("rootfs");
    std::fs::create_dir(&staging).ctx("create", &staging)?;
    std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .ctx("set mode of", &staging)?;
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_EPOCH);

    // [1/6] + [2/6]: content.
    let (source_info, config, identity) = match &req.origin {
        Origin::Image { spec, mode } => {
            progress.step(1, STEPS, &format!("Pulling image: {}", describe(spec)));
            let fetched = fetch(spec, *mode, req, paths, work.path(), progress).await?;
            progress.detail(&format!(
                "{} ({}, {} layers)",
                fetched.reference,
                fetched.platform,
                fetched.layers.len()
            ));
            progress.step(2, STEPS, "Unpacking filesystem layers...");
            let staging2 = staging.clone();
            let f2 = fetched.clone();
            let limits = req.limits;
            let diff_ids =
                tokio::task::spawn_blocking(move || unpack_all(&f2, &staging2, epoch, limits))
                    .await
                    .map_err(|e| Error::Usage(format!("unpack task failed: {e}")))??;
            let info = SourceInfo {
                kind: fetched.kind.clone(),
                reference: fetched.reference.clone(),
                digest: fetched.digest.clone(),
                platform: fetched.platform.clone(),
                layers: fetched.layers.iter().map(|l| l.digest.clone()).collect(),
            };
            let identity = diff_ids.join("\n");
            (info, fetched.config, identity)
        }
        Origin::Distro(opts) => {
            let mut opts = opts.clone();
            add_language_packages(&mut opts, &languages)?;
            progress.step(
                1,
                STEPS,
                &format!(
                    "Bootstrapping {:?} with {} extra packages...",
                    opts.base,
                    opts.packages.len()
                ),
            );
            let staging2 = staging.clone();
            let opts_pip_npm = (opts.pip.clone(), opts.npm.clone());
            let staged = tokio::task::spawn_blocking(move || debootstrap::stage(&staging2, &opts))
                .await
                .map_err(|e| Error::Usage(format!("bootstrap task failed: {e}")))??;
            progress.step(2, STEPS, "Base system installed");
            let status = std::fs::read(staging.join("var/lib/dpkg/status"))
                .or_else(|_| std::fs::read(staging.join("lib/apk/db/installed")))
                .unwrap_or_default();
            let mut h = Sha256::new();
            h.update(&status);
            h.update(format!(
                "pip={:?}\nnpm={:?}\n",
                opts_pip_npm.0, opts_pip_npm.1
            ));
            let identity = hex::encode(h.finalize());
            let info = SourceInfo {
                kind: staged.kind,
                reference: staged.reference,
                digest: Some(format!("sha256:{identity}")),
                platform: "linux/amd64".into(),
                layers: vec![],
            };
            let config = ImageConfig {
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ],
                ..Default::default()
            };
            (info, config, identity)
        }
    };

    // [3/6] + [4/6]: init files and agent.
    progress.step(3, STEPS, "Configuring init system...");
    progress.step(
        4,
        STEPS,
        &format!("Installing guest agent ({AGENT_IN_IMAGE})..."),
    );
    let injected = inject::inject(
        &staging,
        &InjectOptions {
            agent: &req.agent,
            language: language.as_ref(),
            languages: &languages,
            config: &config,
            epoch,
        },
    )?;

    // [5/6]: ext4.
    let uuid = content_uuid(&identity, &injected.agent_sha256, req, &config);
    let label = format!("rootfs-{}", req.name);
    let tmp_image = out_dir.join(format!(
        ".{}.partial-{}",
        file_name(&req.output),
        std::process::id()
    ));
    let _cleanup = RemoveOnDrop(vec![tmp_image.clone()]);
    let size_text = match req.size {
        SizeSpec::Auto { headroom_pct } => format!("auto, {headroom_pct}% headroom"),
        SizeSpec::Fixed { mb } => format!("{mb}MB"),
    };
    progress.step(
        5,
        STEPS,
        &format!("Creating ext4 image ({size_text}) and checking it (e2fsck -fn)..."),
    );
    let params = Ext4Params {
        size: req.size,
        label,
        uuid: uuid.clone(),
        epoch,
    };
    let (staging2, tmp2) = (staging.clone(), tmp_image.clone());
    let facts = tokio::task::spawn_blocking(move || -> Result<_> {
        let usage = measure_tree(&staging2)?;
        ext4::make_ext4(&staging2, &tmp2, &usage, &params)
    })
    .await
    .map_err(|e| Error::Usage(format!("mke2fs task failed: {e}")))??;
    progress.detail(&format!(
        "size {} MB, used {} MB, {} inodes",
        facts.size_bytes >> 20,
        facts.used_bytes >> 20,
        facts.inodes_used
    ));

    // [6/6]: verify, hash, publish.
    progress.step(6, STEPS, "Hashing, syncing and writing manifest...");
    let sha256 = sha256_file_and_sync(&tmp_image)?;
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        name: req.name.clone(),
        language: language.as_ref().map(|l| l.key.clone()),
        languages: if req.languages.is_empty() {
            Vec::new()
        } else {
            languages.iter().map(|l| l.key.clone()).collect()
        },
        source: source_info,
        size_bytes: facts.size_bytes,
        used_bytes: facts.used_bytes,
        sha256,
        fs_uuid: uuid,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        builder_version: env!("CARGO_PKG_VERSION").into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        agent_sha256: injected.agent_sha256,
        config,
        boot: BootInfo {
            init: AGENT_IN_IMAGE.into(),
            args: vec!["guest".into(), "--port".into(), AGENT_PORT.to_string()],
            port: AGENT_PORT,
        },
        enabled_services: injected.enabled_services,
    };
    std::fs::rename(&tmp_image, &req.output).ctx("publish image to", &req.output)?;
    infra_config::write_atomic(
        &infra_config::Paths::manifest_for(&req.output),
        manifest.to_json().as_bytes(),
    )
    .ctx("write manifest for", &req.output)?;
    infra_config::fsync_dir(&out_dir).ctx("sync", &out_dir)?;
    Ok(manifest)
}

/// Adds the languages' packages, PyPI and npm installs to a distribution build, and picks the
/// Debian release they need. Languages that no reachable source provides, or that need
/// different releases, are refused with what to do instead.
fn add_language_packages(opts: &mut CreateOptions, languages: &[Language]) -> Result<()> {
    let mut packages: Vec<String> = Vec::new();
    for lang in languages {
        if let Some(reason) = &lang.unavailable {
            return Err(Error::Usage(format!(
                "{} cannot be installed from the package sources this host reaches ({reason}): build it from {} with `rootfs from-docker --lang {}`",
                lang.name,
                lang.image.as_deref().unwrap_or("its OCI image"),
                lang.key
            )));
        }
        let pkgs = match opts.base {
            debootstrap::Base::Alpine => &lang.alpine_packages,
            _ => &lang.debian_packages,
        };
        let extra = lang.pip_packages.len() + lang.npm_packages.len();
        if pkgs.is_empty() && extra == 0 && lang.key != "base" {
            return Err(Error::Usage(format!(
                "{} has no packages for this base in the language table: use `rootfs from-docker --lang {}`",
                lang.name, lang.key
            )));
        }
        for p in pkgs {
            if !packages.contains(p) {
                packages.push(p.clone());
            }
        }
        if !lang.pip_packages.is_empty() {
            opts.pip
                .push((format!("/opt/pypi/{}", lang.key), lang.pip_packages.clone()));
        }
        if !lang.npm_packages.is_empty() {
            opts.npm
                .push((format!("/opt/npm/{}", lang.key), lang.npm_packages.clone()));
        }
    }
    if opts.base == debootstrap::Base::Debian && opts.suite.is_none() {
        let mut suites: Vec<(&str, &str)> = languages
            .iter()
            .map(|l| (l.suite.as_deref().unwrap_or("bookworm"), l.key.as_str()))
            .collect();
        suites.sort();
        suites.dedup_by(|a, b| a.0 == b.0);
        match suites.as_slice() {
            [] | [("bookworm", _)] => {}
            [(suite, _)] => opts.suite = Some(suite.to_string()),
            several => {
                let named: Vec<String> = several
                    .iter()
                    .map(|(s, k)| format!("{k} needs {s}"))
                    .collect();
                return Err(Error::Usage(format!(
                    "these languages come from different Debian releases ({}): build them as separate images, or pass --suite",
                    named.join(", ")
                )));
            }
        }
    }
    packages.append(&mut opts.packages);
    opts.packages = packages;
    Ok(())
}

fn describe(spec: &SourceSpec) -> String {
    match spec {
        SourceSpec::Registry(r) | SourceSpec::Daemon(r) => r.clone(),
        SourceSpec::DockerArchive(p, _) => format!("docker-archive:{}", p.display()),
        SourceSpec::OciArchive(p, _) => format!("oci-archive:{}", p.display()),
        SourceSpec::OciDir(p, _) => format!("oci:{}", p.display()),
    }
}

async fn fetch(
    spec: &SourceSpec,
    mode: SourceMode,
    req: &BuildRequest,
    paths: &Paths,
    work: &Path,
    progress: &dyn Progress,
) -> Result<FetchedImage> {
    let reg_opts = registry::RegistryOptions {
        platform: req.platform.clone(),
        insecure: req.insecure,
        blob_cache: paths.blobs(),
        concurrency: 3,
    };
    match spec {
        SourceSpec::Registry(r) => {
            if mode == SourceMode::Auto && daemon::has_image(r).await {
                tracing::info!(image = %r, "image found in the local daemon; exporting from there");
                return daemon::fetch(r, work, progress).await;
            }
            registry::fetch(r, &reg_opts, progress).await
        }
        SourceSpec::Daemon(r) => daemon::fetch(r, work, progress).await,
        SourceSpec::DockerArchive(p, r) => {
            let (p, r) = (p.clone(), r.clone());
            blocking(move || archive::fetch_docker_archive(&p, r.as_deref())).await
        }
        SourceSpec::OciArchive(p, r) => {
            let (p, r, plat) = (p.clone(), r.clone(), req.platform.clone());
            blocking(move || archive::fetch_oci_archive(&p, r.as_deref(), &plat)).await
        }
        SourceSpec::OciDir(p, r) => {
            let (p, r, plat) = (p.clone(), r.clone(), req.platform.clone());
            blocking(move || archive::fetch_oci_dir(&p, r.as_deref(), &plat)).await
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Usage(format!("task failed: {e}")))?
}

/// Applies every layer in order; returns the diff_ids computed. Each blob is verified against
/// its digest as it is read (a cached registry blob that no longer matches is removed, so the
/// next build downloads it again) and each uncompressed stream against its diff_id.
fn unpack_all(
    image: &FetchedImage,
    root: &Path,
    epoch: i64,
    limits: UnpackLimits,
) -> Result<Vec<String>> {
    let mut unpacker = Unpacker::with_default_mtime(root, epoch).with_limits(limits);
    let mut ids = Vec::new();
    for layer in &image.layers {
        let mut blob = open_layer(layer)?;
        let applied = unpacker.apply_layer(&mut blob, &layer.digest, layer.diff_id.as_deref());
        // The blob digest first: a corrupt or substituted blob explains any error after it.
        let verified = blob.finish();
        if let Err(e @ Error::DigestMismatch { .. }) = &verified {
            if image.kind == "registry" {
                let _ = std::fs::remove_file(&layer.path);
            }
            tracing::debug!(error = %e, "layer blob failed verification");
        }
        verified.and(applied).map(|stats| {
            tracing::debug!(layer = %layer.digest, entries = stats.entries, whiteouts = stats.whiteouts, "layer applied");
            ids.push(stats.diff_id);
        })?;
    }
    unpacker.finish()?;
    if image.kind == "docker-daemon" {
        let _ = std::fs::remove_file(root.join(".dockerenv"));
    }
    Ok(ids)
}

/// A UUID derived from everything that decides the image bytes.
fn content_uuid(
    identity: &str,
    agent_sha: &str,
    req: &BuildRequest,
    config: &ImageConfig,
) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "abi={MATERIALIZER_ABI}\n{identity}\nagent={agent_sha}\nlang={:?}\nsize={:?}\n",
        req.language, req.size
    ));
    h.update(serde_json::to_vec(config).unwrap_or_default());
    let mut b: [u8; 16] = h.finalize()[..16].try_into().unwrap_or_default();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4 layout (random-looking), RFC 4122 variant
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

fn sha256_file_and_sync(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).ctx("open", path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ctx("read", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    f.sync_all().ctx("sync", path)?;
    Ok(hex::encode(h.finalize()))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> CreateOptions {
        CreateOptions {
            base: debootstrap::Base::Debian,
            suite: None,
            mirror: None,
            packages: vec!["extra".into()],
            pip: Vec::new(),
            npm: Vec::new(),
            post_install: None,
            cache_dir: PathBuf::from("/nonexistent"),
        }
    }

    fn langs(keys: &[&str]) -> Vec<Language> {
        keys.iter()
            .map(|k| LanguageTable::builtin().get(k).unwrap().clone())
            .collect()
    }

    #[test]
    fn polyglot_packages_are_merged_once_with_pypi_and_npm_apart() {
        let mut o = opts();
        add_language_packages(&mut o, &langs(&["c", "cpp", "zig", "bun"])).unwrap();
        assert_eq!(
            o.packages.iter().filter(|p| *p == "libc6-dev").count(),
            1,
            "{:?}",
            o.packages
        );
        assert_eq!(o.packages.last().map(String::as_str), Some("extra"));
        assert_eq!(o.pip.len(), 1);
        assert_eq!(o.pip[0].0, "/opt/pypi/zig");
        assert_eq!(o.npm[0].0, "/opt/npm/bun");
        assert_eq!(o.suite, None);
    }

    #[test]
    fn unavailable_languages_and_mixed_releases_are_refused() {
        let table = LanguageTable::builtin();
        if let Some(u) = table.iter().find(|l| !l.installable()) {
            let e = add_language_packages(&mut opts(), std::slice::from_ref(u)).unwrap_err();
            assert!(e.to_string().contains("rootfs from-docker"), "{e}");
        }
        if let Some(t) = table
            .iter()
            .find(|l| l.installable() && l.suite.as_deref() == Some("trixie"))
        {
            let mut o = opts();
            add_language_packages(&mut o, std::slice::from_ref(t)).unwrap();
            assert_eq!(o.suite.as_deref(), Some("trixie"));
            let mixed = [t.clone(), table.get("python").unwrap().clone()];
            let e = add_language_packages(&mut opts(), &mixed).unwrap_err();
            assert!(e.to_string().contains("different Debian releases"), "{e}");
        }
    }
}
