//! Kernel modules the initramfs must load, in dependency order.
//!
//! Debian's kernel packages ship the `.ko` files without `modules.dep` (postinst runs
//! `depmod`), so dependencies come from each module's own `.modinfo` `depends=` field, which
//! is what `depmod` records for them. When a `modules.dep` is present (an installed kernel),
//! it is used instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::error::KernelError;

/// Modules our guests need, in the order they are asked for. Missing *required* ones fail the
/// kernel import; missing optional ones only remove a feature (named in the log).
pub const GUEST_MODULES: &[(&str, bool)] = &[
    ("virtio_mmio", true),
    ("virtio_blk", true),
    ("virtio_console", false),
    ("vmw_vsock_virtio_transport", false),
    ("overlay", false),
];

/// One module file to put in the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Module name with `_` (as the kernel reports it).
    pub name: String,
    /// Where the `.ko` (maybe compressed) is on the host.
    pub path: PathBuf,
}

/// What a kernel's module tree provides.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    files: HashMap<String, PathBuf>,
    deps: HashMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.split(".ko").next()?;
    (file.contains(".ko")).then(|| canonical(stem))
}

impl ModuleIndex {
    /// Indexes `/lib/modules/RELEASE` (or the same directory from an unpacked package).
    pub fn load(dir: &Path) -> Result<Self, KernelError> {
        let mut idx = ModuleIndex::default();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(|e| KernelError::io(&d, e))?;
            for e in entries {
                let e = e.map_err(|e| KernelError::io(&d, e))?;
                let p = e.path();
                let ft = e.file_type().map_err(|e| KernelError::io(&p, e))?;
                if ft.is_dir() {
                    stack.push(p);
                } else if let Some(name) = module_name(&p) {
                    idx.files.insert(name, p);
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("modules.builtin")) {
            idx.builtin = text
                .lines()
                .filter_map(|l| module_name(Path::new(l.trim())))
                .collect();
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("modules.dep")) {
            for line in text.lines() {
                let Some((m, deps)) = line.split_once(':') else {
                    continue;
                };
                let Some(name) = module_name(Path::new(m)) else {
                    continue;
                };
                let deps = deps
                    .split_whitespace()
                    .filter_map(|d| module_name(Path::new(d)))
                    .collect();
                idx.deps.insert(name, deps);
            }
        }
        Ok(idx)
    }

    /// Whether the kernel has this module compiled in (no file needed).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical(name))
    }

    fn depends(&mut self, name: &str) -> Result<Vec<String>, KernelError> {
        if let Some(d) = self.deps.get(name) {
            return Ok(d.clone());
        }
        let path = self.files[name].clone();
        let deps = modinfo_depends(&read_module(&path)?, &path)?;
        self.deps.insert(name.to_string(), deps.clone());
        Ok(deps)
    }

    /// The files to load for `wanted`, dependencies first, each once. Built-in modules are
    /// skipped; a missing required module is an error, a missing optional one a warning.
    pub fn resolve(&mut self, wanted: &[(&str, bool)]) -> Result<Vec<ModuleFile>, KernelError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for &(name, required) in wanted {
            let name = canonical(name);
            if self.is_builtin(&name) {
                continue;
            }
            if !self.files.contains_key(&name) {
                if required {
                    return Err(KernelError::MissingModule(name));
                }
                tracing::warn!(module = %name, "kernel has no such module; its feature is off");
                continue;
            }
            self.visit(&name, &mut done, &mut BTreeSet::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &mut self,
        name: &str,
        done: &mut BTreeSet<String>,
        path: &mut BTreeSet<String>,
        order: &mut Vec<ModuleFile>,
    ) -> Result<(), KernelError> {
        if done.contains(name) || self.is_builtin(name) {
            return Ok(());
        }
        if !path.insert(name.to_string()) {
            return Err(KernelError::Format(format!(
                "module dependency cycle at {name}"
            )));
        }
        if !self.files.contains_key(name) {
            return Err(KernelError::MissingModule(name.to_string()));
        }
        for dep in self.depends(name)? {
            self.visit(&dep, done, path, order)?;
        }
        path.remove(name);
        done.insert(name.to_string());
        order.push(ModuleFile {
            name: name.to_string(),
            path: self.files[name].clone(),
        });
        Ok(())
    }
}

/// Reads a module file, undoing `.ko.zst`/`.ko.gz`/`.ko.xz` compression (the initramfs
/// stage loads plain ELF objects with `finit_module`).
pub fn read_module(path: &Path) -> Result<Vec<u8>, KernelError> {
    let raw = std::fs::read(path).map_err(|e| KernelError::io(path, e))?;
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(raw.as_slice())
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(|e| KernelError::io(path, e))?;
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| KernelError::io(path, e))?;
    } else if name.ends_with(".xz") {
        let o = std::process::Command::new("xz")
            .args(["-dc", "--"])
            .arg(path)
            .output()
            .map_err(|e| KernelError::io(path, e))?;
        if !o.status.success() {
            return Err(KernelError::Format(format!(
                "cannot decompress {} with xz: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        out = o.stdout;
    } else {
        out = raw;
    }
    Ok(out)
}

/// The `depends=` list from a module's `.modinfo` section.
fn modinfo_depends(elf: &[u8], path: &Path) -> Result<Vec<String>, KernelError> {
    let file = object::File::parse(elf).map_err(|e| {
        KernelError::Format(format!("{} is not an ELF module: {e}", path.display()))
    })?;
    let Some(section) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let data = section
        .data()
        .map_err(|e| KernelError::Format(format!("{}: bad .modinfo: {e}", path.display())))?;
    let mut deps = BTreeMap::new();
    for field in data.split(|b| *b == 0) {
        if let Some(list) = field.strip_prefix(b"depends=") {
            for d in String::from_utf8_lossy(list)
                .split(',')
                .filter(|d| !d.is_empty())
            {
                deps.insert(canonical(d), ());
            }
        }
    }
    Ok(deps.into_keys().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_dep_orders_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&k).unwrap();
        for m in [
            "virtio.ko",
            "virtio_ring.ko",
            "virtio_mmio.ko",
            "virtio_blk.ko",
        ] {
            std::fs::write(k.join(m), b"").unwrap();
        }
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/virtio_ring.ko:\n\
             kernel/drivers/virtio.ko: kernel/drivers/virtio_ring.ko\n\
             kernel/drivers/virtio_mmio.ko: kernel/drivers/virtio.ko kernel/drivers/virtio_ring.ko\n\
             kernel/drivers/virtio_blk.ko: kernel/drivers/virtio.ko kernel/drivers/virtio_ring.ko\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/overlayfs/overlay.ko\n",
        )
        .unwrap();
        let mut idx = ModuleIndex::load(dir.path()).unwrap();
        let got: Vec<String> = idx
            .resolve(GUEST_MODULES)
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(got, ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]);
        let err = idx.resolve(&[("nvme", true)]).unwrap_err().to_string();
        assert!(err.contains("nvme"), "{err}");
    }
}
