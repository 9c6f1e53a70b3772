//! Getting a host ready to run a language: the kernel and the language's image, fetched or
//! built on first use so `run` works on a fresh machine with no other step.

use std::path::{Path, PathBuf};

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
        origin: Origin::Distro(CreateOptions {
            base: Base::Debian,
            suite: None,
            mirror: None,
            packages: Vec::new(),
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
