//! The guest kernel on this host: fetched from Debian's cloud kernel package or imported from
//! a user's file, stored as `vmlinux` (the seeds' `/srv/firecracker/vmlinux`) with a manifest
//! `vmlinux.json` and the few modules the initramfs needs in `vmlinux.modules/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::KernelError;
use crate::initramfs::write_initramfs;
use crate::modules::{ModuleFile, ModuleIndex, GUEST_MODULES};
use crate::vmlinux::{extract_vmlinux, Compression};

/// Debian's metapackage for the small cloud kernel (virtio as modules, no real hardware).
pub const DEFAULT_PACKAGE: &str = "linux-image-cloud-amd64";

/// What is installed, written next to `vmlinux`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelManifest {
    /// Kernel release (`6.1.0-28-cloud-amd64`), or the file name for imported kernels
    /// whose release is unknown.
    pub release: String,
    /// Where it came from: `deb:PACKAGE_VERSION` or `file:PATH`.
    pub source: String,
    /// Compression undone to get the ELF (`none` for an ELF input).
    pub compression: String,
    /// sha256 of `vmlinux`.
    pub sha256: String,
    /// Size of `vmlinux` in bytes.
    pub bytes: u64,
    /// Modules the initramfs loads, in order (empty when everything is built in).
    pub modules: Vec<String>,
    /// When it was installed (RFC 3339).
    pub installed_at: String,
}

/// Paths of the installed kernel.
#[derive(Debug, Clone)]
pub struct KernelStore {
    /// The ELF image.
    pub vmlinux: PathBuf,
    /// Its manifest.
    pub manifest: PathBuf,
    /// Copies of the modules listed in the manifest.
    pub modules: PathBuf,
    /// Cache for generated initramfs archives.
    pub initramfs_cache: PathBuf,
}

impl KernelStore {
    /// The kernel files under the host's [`infra_config::Paths`].
    pub fn new(paths: &infra_config::Paths) -> Self {
        Self {
            manifest: paths.kernel_manifest(),
            modules: paths.kernel_modules(),
            vmlinux: paths.kernel.clone(),
            initramfs_cache: paths.cache.join("initramfs"),
        }
    }

    /// The installed kernel's manifest, or [`KernelError::NotInstalled`].
    pub fn installed(&self) -> Result<KernelManifest, KernelError> {
        if !self.vmlinux.exists() {
            return Err(KernelError::NotInstalled(self.vmlinux.clone()));
        }
        match std::fs::read(&self.manifest) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                KernelError::Format(format!(
                    "{}: {e}; re-run `kernel fetch`",
                    self.manifest.display()
                ))
            }),
            // A vmlinux put there by hand (seed workflow): describe it on the fly.
            Err(_) => Ok(KernelManifest {
                release: "unknown".into(),
                source: format!("file:{}", self.vmlinux.display()),
                compression: "none".into(),
                sha256: String::new(),
                bytes: std::fs::metadata(&self.vmlinux)
                    .map(|m| m.len())
                    .unwrap_or(0),
                modules: Vec::new(),
                installed_at: String::new(),
            }),
        }
    }

    /// Installs a kernel image (ELF or bzImage) with modules from `module_tree`
    /// (`/lib/modules/RELEASE`, maybe unpacked from a package), replacing what was there.
    pub fn install(
        &self,
        image: &Path,
        module_tree: Option<&Path>,
        release: &str,
        source: String,
    ) -> Result<KernelManifest, KernelError> {
        // The kernel's directory (the home) is read by other users: 0755, ours, not shared.
        if let Some(dir) = self.vmlinux.parent().filter(|d| !d.as_os_str().is_empty()) {
            infra_config::ensure_dir(dir, infra_config::SHARED_READ_DIR)?;
        }
        let raw = std::fs::read(image).map_err(|e| KernelError::io(image, e))?;
        let (elf, compression) = extract_vmlinux(&raw)?;
        let modules = match module_tree {
            Some(tree) => ModuleIndex::load(tree)?.resolve(GUEST_MODULES)?,
            None => Vec::new(),
        };
        // Modules first, then the image, then the manifest that names both: a crash in
        // between leaves the previous manifest pointing at a consistent older set or at
        // nothing, never at half of the new one.
        let staging = self.modules.with_extension("modules.new");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| KernelError::io(&staging, e))?;
        for m in &modules {
            let data = crate::modules::read_module(&m.path)?;
            let dst = staging.join(format!("{}.ko", m.name));
            infra_config::write_atomic(&dst, &data).map_err(|e| KernelError::io(&dst, e))?;
        }
        let _ = std::fs::remove_dir_all(&self.modules);
        std::fs::rename(&staging, &self.modules).map_err(|e| KernelError::io(&self.modules, e))?;
        infra_config::write_atomic(&self.vmlinux, &elf)
            .map_err(|e| KernelError::io(&self.vmlinux, e))?;
        let manifest = KernelManifest {
            release: release.to_string(),
            source,
            compression: match compression {
                Compression::None => "none",
                Compression::Lz4 => "lz4",
                Compression::Gzip => "gzip",
                Compression::Zstd => "zstd",
            }
            .into(),
            sha256: hex::encode(Sha256::digest(&elf)),
            bytes: elf.len() as u64,
            modules: modules.iter().map(|m| m.name.clone()).collect(),
            installed_at: chrono_now(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        infra_config::write_atomic(&self.manifest, &json)
            .map_err(|e| KernelError::io(&self.manifest, e))?;
        Ok(manifest)
    }

    /// The initramfs for this kernel with `agent` as `/init`, built on first use and cached
    /// by agent identity (path, size, mtime) and kernel checksum, so a rebuilt agent is
    /// picked up on the next boot.
    pub fn initramfs_for(&self, agent: &Path) -> Result<PathBuf, KernelError> {
        let manifest = self.installed()?;
        let meta = std::fs::metadata(agent).map_err(|e| KernelError::io(agent, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = Sha256::digest(format!(
            "{}\n{}\n{}\n{}\n{}",
            agent.display(),
            meta.len(),
            mtime,
            manifest.sha256,
            manifest.modules.join(",")
        ));
        let out = self
            .initramfs_cache
            .join(format!("initramfs-{}.cpio", &hex::encode(key)[..16]));
        if out.exists() {
            return Ok(out);
        }
        let agent_bytes = stripped_agent(agent)?;
        let modules: Vec<ModuleFile> = manifest
            .modules
            .iter()
            .map(|name| ModuleFile {
                name: name.clone(),
                path: self.modules.join(format!("{name}.ko")),
            })
            .collect();
        write_initramfs(&out, &agent_bytes, &modules)?;
        prune_initramfs_cache(&self.initramfs_cache, &out);
        Ok(out)
    }
}

/// The agent without its debug sections when `objcopy` (binutils) is available: the
/// initramfs lives in guest RAM, and a debug build is three times larger with them.
fn stripped_agent(agent: &Path) -> Result<Vec<u8>, KernelError> {
    let tmp = tempfile::NamedTempFile::new().map_err(|e| KernelError::io(agent, e))?;
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(agent)
        .arg(tmp.path())
        .output()
        .is_ok_and(|o| o.status.success());
    let from = if stripped { tmp.path() } else { agent };
    if !stripped {
        tracing::info!("objcopy not available; the initramfs carries the agent unstripped");
    }
    std::fs::read(from).map_err(|e| KernelError::io(from, e))
}

/// Keeps the cache to the newest few archives (each holds a full agent binary).
fn prune_initramfs_cache(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("initramfs-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    files.sort();
    let excess = files.len().saturating_sub(3);
    for (_, p) in files.into_iter().take(excess) {
        if p != keep {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The concrete package behind a metapackage (`linux-image-cloud-amd64` →
/// `linux-image-6.1.0-28-cloud-amd64`), as apt resolves it.
pub fn resolve_package(package: &str) -> Result<String, KernelError> {
    let fetch_err = |detail: String| KernelError::Fetch {
        package: package.to_string(),
        detail,
    };
    let out = Command::new("apt-cache")
        .args(["depends", "--important", package])
        .output()
        .map_err(|e| fetch_err(format!("cannot run apt-cache: {e}")))?;
    if !out.status.success() {
        return Err(fetch_err(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let dep = text.lines().find_map(|l| {
        let d = l.trim().strip_prefix("Depends:")?.trim();
        d.starts_with("linux-image-").then(|| d.to_string())
    });
    // Not a metapackage: the name is already concrete.
    Ok(dep.unwrap_or_else(|| package.to_string()))
}

/// Downloads `package` with `apt-get download` and unpacks it with `dpkg -x` into `dir`.
/// Returns (vmlinuz path, module tree, release, package version).
pub fn download_package(
    package: &str,
    dir: &Path,
) -> Result<(PathBuf, Option<PathBuf>, String, String), KernelError> {
    let fetch_err = |detail: String| KernelError::Fetch {
        package: package.to_string(),
        detail,
    };
    let run = |cmd: &mut Command| -> Result<(), KernelError> {
        let out = cmd
            .output()
            .map_err(|e| fetch_err(format!("cannot run {:?}: {e}", cmd.get_program())))?;
        if out.status.success() {
            Ok(())
        } else {
            let msg = String::from_utf8_lossy(&out.stderr);
            let last = msg
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(fetch_err(last.trim().to_string()))
        }
    };
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(dir))?;
    let deb = std::fs::read_dir(dir)
        .map_err(|e| KernelError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| fetch_err("apt-get download produced no .deb".into()))?;
    let version = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('_').nth(1))
        .unwrap_or("unknown")
        .to_string();
    let root = dir.join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| KernelError::io(&boot, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") || n.starts_with("vmlinux-"))
        })
        .ok_or_else(|| fetch_err("the package has no /boot/vmlinuz-*".into()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n[8..].to_string())
        .unwrap_or_default();
    let tree = root.join("lib/modules").join(&release);
    let tree = tree.is_dir().then_some(tree);
    Ok((vmlinuz, tree, release, version))
}
