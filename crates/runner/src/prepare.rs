//! Getting a host ready to run a language: the kernel and the language's image, fetched or
//! built on first use so `run` works on a fresh machine with no other step.
//!
//! The policy lives here, once, for every front end (`run`, `host`, `rootfs verify`, the HTTP
//! API): an image missing on this host is fetched from the configured object store; when the
//! store does not have it either (or none is reachable), it is built with debootstrap.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infra_config::Paths;
use infra_image::debootstrap::{Base, CreateOptions};
use infra_image::ext4::SizeSpec;
use infra_image::{BuildRequest, Origin, Progress};
use infra_languages::{Language, LanguageTable};
use infra_vmm::kernel::{download_package, resolve_package, KernelManifest, KernelStore};

use crate::error::RunError;

/// Downloads Debian's cloud kernel package (or `package`) and installs it as the guest kernel.
pub fn fetch_kernel(paths: &Paths, package: Option<&str>) -> Result<KernelManifest, RunError> {
    let wanted = package.unwrap_or(infra_vmm::kernel::DEFAULT_PACKAGE);
    let concrete = resolve_package(wanted)?;
    infra_config::ensure_dir(&paths.cache, infra_config::PRIVATE_DIR)?;
    let work = tempfile::Builder::new()
        .prefix("kernel-")
        .tempdir_in(&paths.cache)
        .map_err(|e| infra_vmm::KernelError::io(&paths.cache, e))?;
    // apt's sandbox user cannot write into root-owned temp dirs; it falls back to root with
    // a warning, which is fine here.
    let (vmlinuz, tree, release, version) = download_package(&concrete, work.path())?;
    let store = KernelStore::new(paths);
    Ok(store.install(
        &vmlinuz,
        tree.as_deref(),
        &release,
        format!("deb:{concrete}_{version}"),
    )?)
}

/// Imports a user's kernel file (ELF vmlinux or bzImage), with modules from `modules`
/// (a `/lib/modules/RELEASE` tree) when the kernel is modular.
pub fn import_kernel(
    paths: &Paths,
    image: &Path,
    modules: Option<&Path>,
) -> Result<KernelManifest, RunError> {
    let release = modules
        .and_then(|m| m.file_name())
        .or_else(|| image.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "imported".into());
    let store = KernelStore::new(paths);
    Ok(store.install(
        image,
        modules,
        &release,
        format!("file:{}", image.display()),
    )?)
}

/// The installed kernel, fetched first if there is none.
pub fn ensure_kernel(paths: &Paths, progress: &dyn Progress) -> Result<KernelManifest, RunError> {
    let store = KernelStore::new(paths);
    match store.installed() {
        Ok(m) => Ok(m),
        Err(infra_vmm::KernelError::NotInstalled(_)) => {
            progress.step(1, 1, "No guest kernel yet: fetching Debian's cloud kernel");
            fetch_kernel(paths, None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The language's image path, built with `rootfs create` (Debian, debootstrap) if missing.
pub async fn ensure_image(
    paths: &Paths,
    lang: &Language,
    agent: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf, RunError> {
    let image = paths.image(&lang.key);
    if image.exists() {
        return Ok(image);
    }
    progress.step(
        0,
        0,
        &format!(
            "No {} image yet: building it with debootstrap (first run only)",
            lang.name
        ),
    );
    let req = BuildRequest {
        name: lang.key.clone(),
        language: Some(lang.key.clone()),
        languages: Vec::new(),
        origin: Origin::Distro(CreateOptions {
            base: Base::Debian,
            suite: None,
            mirror: None,
            packages: Vec::new(),
            pip: Vec::new(),
            npm: Vec::new(),
            post_install: None,
            cache_dir: paths.cache.clone(),
        }),
        size: SizeSpec::parse("auto", 10).map_err(RunError::Usage)?,
        output: image.clone(),
        platform: "linux/amd64".into(),
        insecure: false,
        agent: agent.to_path_buf(),
        limits: infra_image::UnpackLimits::default(),
    };
    infra_image::build(&req, paths, progress).await?;
    Ok(image)
}

/// Resolves a language name or alias, with the list of known ones in the error.
pub fn language(name: &str) -> Result<Language, RunError> {
    LanguageTable::builtin()
        .get(name)
        .cloned()
        .map_err(|e| RunError::Usage(e.to_string()))
}

/// The three files a VM boots from.
#[derive(Debug, Clone)]
pub struct VmFiles {
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Initramfs carrying this host's agent.
    pub initramfs: PathBuf,
    /// The language's root filesystem image.
    pub rootfs: PathBuf,
    /// The language's snapshot directory, when it holds a snapshot (`run` restores from it
    /// when it fits, see [`crate::snapshot`]).
    pub snapshot: Option<PathBuf>,
}

/// Files a caller names instead of the defaults.
#[derive(Debug, Clone, Default)]
pub struct FileOverrides {
    /// A kernel file instead of the installed one.
    pub kernel: Option<PathBuf>,
    /// An image instead of the language's `rootfs-{lang}.ext4`.
    pub rootfs: Option<PathBuf>,
}

/// Kernel, initramfs and image for `lang`: the installed kernel (fetched from Debian when
/// there is none), an initramfs for `agent`, and the language's image (from the object store,
/// else built). Progress and notes go to `progress`.
pub async fn vm_files(
    paths: &Paths,
    lang: &Language,
    agent: &Path,
    overrides: &FileOverrides,
    progress: Arc<dyn Progress>,
) -> Result<VmFiles, RunError> {
    let store = KernelStore::new(paths);
    let kernel = match &overrides.kernel {
        Some(k) => k.clone(),
        None => {
            let lock = language_lock("\0kernel");
            let _held = lock.lock().await;
            fetch_kernel_from_store(paths, progress.clone()).await;
            ensure_kernel(paths, progress.as_ref())?;
            store.vmlinux.clone()
        }
    };
    let initramfs = store.initramfs_for(agent)?;
    let rootfs = match &overrides.rootfs {
        Some(r) => match image_name(r) {
            // `--rootfs polyglot`: an image by name, from the store when not here.
            Some(name) => {
                let lock = language_lock(name);
                let _held = lock.lock().await;
                fetch_image_from_store(paths, name, progress.clone()).await;
                paths.image(name)
            }
            None => r.clone(),
        },
        None => {
            // One fetch-or-build per language at a time in this process (the HTTP API gets
            // many first requests for a language at once); the others wait and find it.
            let lock = language_lock(&lang.key);
            let _held = lock.lock().await;
            fetch_image_from_store(paths, &lang.key, progress.clone()).await;
            ensure_image(paths, lang, agent, progress.as_ref()).await?
        }
    };
    if !rootfs.exists() {
        let how = match overrides.rootfs.as_deref().and_then(image_name) {
            Some(name) => format!("--langs {},... --name {name}", lang.key),
            None => format!("--lang {}", lang.key),
        };
        return Err(RunError::Usage(format!(
            "rootfs {} does not exist; build it with `infra.operator rootfs create {how}`",
            rootfs.display(),
        )));
    }
    let snap = crate::snapshot::snapshot_dir(&paths.home, &lang.key);
    if overrides.kernel.is_none() && overrides.rootfs.is_none() {
        let lock = language_lock(&lang.key);
        let _held = lock.lock().await;
        fetch_snapshot_from_store(paths, &lang.key, &rootfs, progress.clone()).await;
    }
    let snapshot = snap
        .join(crate::snapshot::MANIFEST)
        .exists()
        .then_some(snap);
    Ok(VmFiles {
        kernel,
        initramfs,
        rootfs,
        snapshot,
    })
}

/// The lock that serializes preparing `key`'s image in this process.
fn language_lock(key: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    let mut map = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.entry(key.to_string()).or_default().clone()
}

/// The configured object store (`BUCKET`/`S3_BUCKET`, the config file, else the local
/// directory store), with transfers shown through `progress`.
async fn store_engine(
    paths: &Paths,
    progress: Arc<dyn Progress>,
) -> Result<infra_store::Engine, infra_store::Error> {
    let bridge: Arc<dyn infra_store::Progress> = Arc::new(StoreProgress(progress));
    let config = infra_store::StoreConfig::from_env(&infra_store::StoreFlags::default(), paths)?;
    config.engine(bridge).await
}

/// Shows what a fetch from the store did. A store that does not have the thing is not worth
/// a word (it is built or fetched elsewhere next); any other failure is a note.
fn report_fetch(
    progress: &dyn Progress,
    what: &str,
    instead: &str,
    fetched: Result<Vec<infra_store::DownloadSummary>, RunError>,
) {
    match fetched {
        Ok(done) => {
            for d in &done {
                progress.detail(&d.line());
            }
        }
        Err(RunError::Store(
            infra_store::Error::NoSuchKey { .. } | infra_store::Error::NoSuchBucket { .. },
        )) => {}
        Err(e) => progress.detail(&format!(
            "note: {what} could not be fetched from the store ({e}); {instead}"
        )),
    }
}

/// The image name in a `--rootfs` value that is a bare name (`polyglot`) and not a file here;
/// `None` for paths.
fn image_name(rootfs: &Path) -> Option<&str> {
    let name = rootfs.to_str()?;
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.ends_with(".ext4");
    (plain && !rootfs.exists()).then_some(name)
}

/// Fetches `rootfs-{name}.ext4` from the configured store when it is not on this host.
async fn fetch_image_from_store(paths: &Paths, name: &str, progress: Arc<dyn Progress>) {
    if paths.image(name).is_file() {
        return;
    }
    let fetched = async {
        let engine = store_engine(paths, progress.clone()).await?;
        Ok(infra_store::artifacts::ensure_image(&engine, paths, name)
            .await?
            .unwrap_or_default())
    }
    .await;
    report_fetch(
        progress.as_ref(),
        &format!("image {name}"),
        "building it instead",
        fetched,
    );
}

/// Fetches the kernel bundle from the configured store when there is no kernel on this host,
/// so a host with only a bucket configured needs no apt.
async fn fetch_kernel_from_store(paths: &Paths, progress: Arc<dyn Progress>) {
    if paths.kernel.is_file() {
        return;
    }
    let fetched = async {
        let engine = store_engine(paths, progress.clone()).await?;
        Ok(infra_store::artifacts::ensure_kernel(&engine, paths)
            .await?
            .unwrap_or_default())
    }
    .await;
    report_fetch(
        progress.as_ref(),
        "the kernel",
        "fetching Debian's instead",
        fetched,
    );
}

/// Fetches `lang`'s snapshot from the configured store when there is none on this host and
/// the store's was made from this host's image and kernel (its manifest says so; the rest is
/// checked when it is restored). Asked once per language and image per process, so runs
/// without a snapshot do not pay a request each.
async fn fetch_snapshot_from_store(
    paths: &Paths,
    lang: &str,
    rootfs: &Path,
    progress: Arc<dyn Progress>,
) {
    let dir = crate::snapshot::snapshot_dir(&paths.home, lang);
    if dir.join(crate::snapshot::MANIFEST).exists() {
        return;
    }
    let (Some(image_sha), Ok(kernel)) = (
        infra_store::artifacts::manifest_sha256(rootfs),
        KernelStore::new(paths).installed(),
    ) else {
        return;
    };
    static ASKED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    let first = ASKED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(format!("{}\0{lang}\0{image_sha}", paths.home.display()));
    if !first {
        return;
    }
    let fetched = async {
        let engine = store_engine(paths, progress.clone()).await?;
        let m = crate::snapshot_store::remote_manifest(&engine, lang).await?;
        if m.machine.image_sha256 != image_sha || m.machine.kernel_sha256 != kernel.sha256 {
            tracing::info!(lang, "the store's snapshot is of another image or kernel");
            return Ok(Vec::new());
        }
        progress.detail(&format!("Fetching the {lang} snapshot from the store"));
        Ok(crate::snapshot_store::download(&engine, paths, lang)
            .await?
            .1)
    }
    .await;
    report_fetch(
        progress.as_ref(),
        &format!("the {lang} snapshot"),
        "booting instead",
        fetched,
    );
}

/// Store transfers shown through the caller's progress.
struct StoreProgress(Arc<dyn Progress>);

impl infra_store::Progress for StoreProgress {
    fn start(&self, id: &str, label: &str, total: Option<u64>) {
        self.0.transfer_start(id, label, total);
    }
    fn advance(&self, id: &str, bytes: u64) {
        self.0.transfer_inc(id, bytes);
    }
    fn finish(&self, id: &str) {
        self.0.transfer_done(id);
    }
    fn note(&self, message: &str) {
        self.0.detail(message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_values_are_names_or_paths() {
        assert_eq!(image_name(Path::new("polyglot")), Some("polyglot"));
        assert_eq!(image_name(Path::new("my-image_2")), Some("my-image_2"));
        for path in [
            "./polyglot",
            "/srv/x.ext4",
            "x.ext4",
            "../polyglot",
            ".hidden",
            "a/b",
            "",
        ] {
            assert_eq!(image_name(Path::new(path)), None, "{path}");
        }
    }
}
