//! Snapshots: a booted, ready VM saved to disk, and VMs restored from it.
//!
//! A snapshot is a directory `<home>/snapshots/<lang>/` holding the backend's state files
//! (QEMU: `vmstate.snapshot`, the migration stream; Firecracker: `vmstate.snapshot` and
//! `mem.snapshot`) and `manifest.json` ([`SnapshotManifest`]): the format, the backend and its
//! version, the acceleration and CPU, the sha256 of the kernel, initramfs (which carries the
//! agent) and image it was booted from, memory, vCPUs, boot arguments, and the size and sha256
//! of every state file. It is written into a temporary directory beside its final place and
//! renamed over it, so a reader sees the old snapshot or the new one, never half of one.
//!
//! Loading compares every field that decides whether the saved machine fits the run
//! ([`SnapshotManifest::mismatch`]): a snapshot of another image, kernel, agent, memory size,
//! vCPU count, backend version or CPU is refused with a one-line reason, and the run
//! cold-boots instead. The state files are checked against their sha256 before QEMU or
//! Firecracker reads them; a file's verified digest is remembered (size, mtime, inode) in the
//! cache, so only the first restore after a change pays for hashing.
//!
//! Every restored VM is made unique before any program runs: the host sends 64 bytes from
//! its own RNG and its wall clock ([`crate::client::AgentClient::reseed`]); the agent credits
//! them to the kernel's pool, reseeds the CRNG at once and sets the clock. Each VM restores
//! into its own VMM process with its own copy-on-write memory, in its own VM directory; the
//! image stays a read-only disk shared by all.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use infra_vmm::{Accel, Backend, VmConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::RunError;

/// Version of the snapshot layout and manifest.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The manifest's file name in a snapshot directory.
pub const MANIFEST: &str = "manifest.json";

/// Bytes of host entropy sent to every restored VM.
pub const RESEED_BYTES: usize = 64;

/// Size and digest of one state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Bytes.
    pub bytes: u64,
    /// Hex sha256.
    pub sha256: String,
}

/// What a snapshot is of, and its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// [`SNAPSHOT_FORMAT`].
    pub format: u32,
    /// The machine it was made of: what a run must match (fields at the top level of the JSON).
    #[serde(flatten)]
    pub machine: Expected,
    /// The agent's version, as it said in hello.
    pub agent_version: String,
    /// The warm-up program run before saving, if any.
    pub warmup: Option<String>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// Seconds from VMM start to ready agent when the snapshot was made.
    pub boot_secs: f64,
    /// The state files.
    pub files: BTreeMap<String, FileDigest>,
}

/// The facts a snapshot must match to be restored for a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// Language key.
    pub lang: String,
    /// `qemu` or `firecracker`.
    pub backend: String,
    /// The VMM's `--version`, first line.
    pub backend_version: String,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// The guest CPU: `max` under TCG; the host's model name under KVM.
    pub cpu: String,
    /// sha256 of the host CPU's flags under KVM (a restore on a CPU with fewer features
    /// crashes the guest); empty under TCG, whose CPU does not depend on the host.
    pub cpu_flags_sha256: String,
    /// sha256 of the kernel booted.
    pub kernel_sha256: String,
    /// sha256 of the initramfs booted (it carries the agent).
    pub initramfs_sha256: String,
    /// sha256 of the image attached.
    pub image_sha256: String,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u8,
    /// The kernel command line.
    pub boot_args: String,
}

impl SnapshotManifest {
    /// Why this snapshot does not fit `want`, in a few words; `None` when it does.
    pub fn mismatch(&self, want: &Expected) -> Option<String> {
        if self.format != SNAPSHOT_FORMAT {
            return Some(format!(
                "format {} (this version reads {SNAPSHOT_FORMAT})",
                self.format
            ));
        }
        let m = &self.machine;
        let short = |s: &str| s.chars().take(12).collect::<String>();
        let checks: [(&str, String, String); 11] = [
            ("language", m.lang.clone(), want.lang.clone()),
            ("backend", m.backend.clone(), want.backend.clone()),
            (
                "backend version",
                m.backend_version.clone(),
                want.backend_version.clone(),
            ),
            ("acceleration", m.accel.clone(), want.accel.clone()),
            ("CPU", m.cpu.clone(), want.cpu.clone()),
            (
                "CPU flags",
                short(&m.cpu_flags_sha256),
                short(&want.cpu_flags_sha256),
            ),
            (
                "kernel",
                short(&m.kernel_sha256),
                short(&want.kernel_sha256),
            ),
            (
                "initramfs (agent)",
                short(&m.initramfs_sha256),
                short(&want.initramfs_sha256),
            ),
            ("image", short(&m.image_sha256), short(&want.image_sha256)),
            (
                "memory (MiB)",
                m.mem_mib.to_string(),
                want.mem_mib.to_string(),
            ),
            ("vCPUs", m.vcpus.to_string(), want.vcpus.to_string()),
        ];
        for (what, had, wanted) in checks {
            if had != wanted {
                return Some(format!(
                    "it was made with {what} {had}, this run has {wanted}"
                ));
            }
        }
        if m.boot_args != want.boot_args {
            return Some("it was booted with other kernel arguments".into());
        }
        None
    }
}

/// The snapshot directory of `lang` under `home`.
pub fn snapshot_dir(home: &Path, lang: &str) -> PathBuf {
    infra_config::Paths::under(home).snapshots().join(lang)
}

/// Reads a snapshot's manifest.
pub fn read_manifest(dir: &Path) -> Result<SnapshotManifest, String> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {MANIFEST}: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{MANIFEST} is not valid: {e}"))
}

/// The snapshots under `home`, by language (directories without a readable manifest are
/// listed with the reason).
pub fn list(home: &Path) -> Vec<(String, PathBuf, Result<SnapshotManifest, String>)> {
    let root = home.join("snapshots");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&root) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = e.path();
        let m = read_manifest(&dir);
        out.push((name, dir, m));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    sha256: String,
}

fn stamp_of(path: &Path, m: &std::fs::Metadata) -> Stamp {
    Stamp {
        path: path.to_path_buf(),
        dev: m.dev(),
        ino: m.ino(),
        size: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        sha256: String::new(),
    }
}

/// sha256 of `path`, remembered in `cache/digests/` under the file's identity (device, inode,
/// size, mtime): a file that has not changed since it was hashed is not read again.
pub fn cached_sha256(cache: &Path, path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let canon = std::fs::canonicalize(path)?;
    let key = hex::encode(Sha256::digest(canon.as_os_str().as_encoded_bytes()));
    let dir = cache.join("digests");
    let file = dir.join(format!("{key}.json"));
    let mut want = stamp_of(&canon, &meta);
    if let Some(old) = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<Stamp>(&b).ok())
    {
        let known = old.sha256.clone();
        let same = Stamp {
            sha256: String::new(),
            ..old
        } == want;
        if known.len() == 64 && same {
            return Ok(known);
        }
    }
    want.sha256 = sha256_file(path)?;
    // A change while hashing makes the entry useless: only remember a stable file.
    let after = std::fs::metadata(path)?;
    if stamp_of(&canon, &after).mtime_ns == want.mtime_ns && after.len() == want.size {
        let _ = infra_config::ensure_dir(&dir, 0o700);
        let _ = infra_config::write_atomic(&file, &serde_json::to_vec(&want).unwrap_or_default());
    }
    Ok(want.sha256)
}

/// Records `sha256` as the digest of `path` as it is now (a file just written and verified),
/// so the first restore does not hash it again.
pub fn remember_sha256(cache: &Path, path: &Path, sha256: &str) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    let canon = std::fs::canonicalize(path)?;
    let key = hex::encode(Sha256::digest(canon.as_os_str().as_encoded_bytes()));
    let dir = cache.join("digests");
    let mut stamp = stamp_of(&canon, &meta);
    stamp.sha256 = sha256.to_string();
    infra_config::ensure_dir(&dir, 0o700).map_err(std::io::Error::other)?;
    infra_config::write_atomic(
        &dir.join(format!("{key}.json")),
        &serde_json::to_vec(&stamp).unwrap_or_default(),
    )
}

/// Most state files a manifest may list (QEMU writes one, Firecracker two).
const MAX_STATE_FILES: usize = 8;

/// Checks the state files a manifest lists before any of them is opened, downloaded or
/// named in a key (a manifest from the store is untrusted): at least one, at most
/// [`MAX_STATE_FILES`], each a plain file name of letters, digits, `.`, `_` and `-` that does
/// not start with a dot and is not the manifest, and each digest 64 hex digits.
pub fn check_file_list(m: &SnapshotManifest) -> Result<(), String> {
    if m.files.is_empty() {
        return Err("the manifest lists no state files".into());
    }
    if m.files.len() > MAX_STATE_FILES {
        return Err(format!(
            "the manifest lists {} state files, at most {MAX_STATE_FILES} are accepted",
            m.files.len()
        ));
    }
    for (name, want) in &m.files {
        let plain = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name != MANIFEST
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
        if !plain {
            return Err(format!(
                "the manifest names a bad file {:?}",
                name.escape_debug().to_string()
            ));
        }
        if want.sha256.len() != 64 || !want.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "the manifest's sha256 of {name} is not 64 hex digits"
            ));
        }
    }
    Ok(())
}

/// Puts the complete snapshot directory `tmp` in place of `dir`: the old snapshot (if any)
/// aside, the new one in, the old one removed, so a reader sees the old snapshot or the new
/// one, never half of one. The digests of the manifest's files are remembered for restores.
pub fn install(tmp: &Path, dir: &Path, cache: &Path, m: &SnapshotManifest) -> Result<(), RunError> {
    let parent = dir
        .parent()
        .ok_or_else(|| RunError::Usage(format!("{} has no parent directory", dir.display())))?;
    let old = parent.join(format!(
        ".old-{}-{}",
        m.machine.lang,
        uuid::Uuid::new_v4().simple()
    ));
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| {
            RunError::Prerequisite(format!(
                "cannot move the old snapshot {} aside: {e}",
                dir.display()
            ))
        })?;
    }
    if let Err(e) = std::fs::rename(tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(tmp);
        return Err(RunError::Prerequisite(format!(
            "cannot move the new snapshot into {}: {e}",
            dir.display()
        )));
    }
    let _ = infra_config::fsync_dir(parent);
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    for (name, d) in &m.files {
        if let Err(e) = remember_sha256(cache, &dir.join(name), &d.sha256) {
            tracing::debug!(error = %e, file = name, "digest not cached");
        }
    }
    Ok(())
}

/// Checks every state file of `m` in `dir` against its size and sha256.
pub fn verify_files(cache: &Path, dir: &Path, m: &SnapshotManifest) -> Result<(), String> {
    check_file_list(m)?;
    for (name, want) in &m.files {
        let path = dir.join(name);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("{name}: {e}"))?;
        if !meta.file_type().is_file() {
            return Err(format!("{name} is not a regular file"));
        }
        if meta.len() != want.bytes {
            return Err(format!(
                "{name} has {} bytes, the manifest says {}",
                meta.len(),
                want.bytes
            ));
        }
        let got = cached_sha256(cache, &path).map_err(|e| format!("{name}: {e}"))?;
        if got != want.sha256 {
            return Err(format!(
                "{name} is corrupted (sha256 {}…, the manifest says {}…)",
                &got[..12],
                &want.sha256[..want.sha256.len().min(12)]
            ));
        }
    }
    Ok(())
}

/// The VMM's `--version` first line (asked once per binary per process).
pub fn backend_version(backend: &Backend) -> String {
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<BTreeMap<PathBuf, String>>> = OnceLock::new();
    let binary = match backend {
        Backend::Qemu(q) => q.binary.clone(),
        Backend::Firecracker(f) => f.binary.clone(),
    };
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    seen.entry(binary.clone())
        .or_insert_with(|| {
            std::process::Command::new(&binary)
                .arg("--version")
                .output()
                .ok()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                })
                .unwrap_or_default()
        })
        .clone()
}

/// The guest CPU and the digest of the host CPU flags it depends on.
pub fn cpu_of(backend: &Backend) -> (String, String) {
    let accel = accel_of(backend);
    if accel == Accel::Tcg {
        return ("max".into(), String::new());
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    (
        format!("host:{}", field("model name")),
        hex::encode(Sha256::digest(flags.as_bytes())),
    )
}

/// The acceleration a backend uses.
pub fn accel_of(backend: &Backend) -> Accel {
    match backend {
        Backend::Qemu(q) => q.accel,
        Backend::Firecracker(_) => Accel::Kvm,
    }
}

/// The kernel command line a backend boots `cfg` with.
pub fn boot_args_of(backend: &Backend, cfg: &VmConfig) -> String {
    match backend {
        Backend::Qemu(q) => q.boot_args(cfg),
        Backend::Firecracker(_) => infra_vmm::firecracker::Firecracker::boot_args(cfg),
    }
}

/// What a snapshot for `cfg` on `backend` must say.
pub fn expected(
    cache: &Path,
    lang: &str,
    backend: &Backend,
    cfg: &VmConfig,
) -> Result<Expected, RunError> {
    let digest = |p: &Path| {
        cached_sha256(cache, p).map_err(|e| {
            RunError::Prerequisite(format!("cannot read {} to hash it: {e}", p.display()))
        })
    };
    let (cpu, cpu_flags_sha256) = cpu_of(backend);
    Ok(Expected {
        lang: lang.to_string(),
        backend: backend.name().to_string(),
        backend_version: backend_version(backend),
        accel: accel_of(backend).to_string(),
        cpu,
        cpu_flags_sha256,
        kernel_sha256: digest(&cfg.kernel)?,
        initramfs_sha256: digest(&cfg.initramfs)?,
        image_sha256: digest(&cfg.rootfs)?,
        mem_mib: cfg.mem_mib,
        vcpus: cfg.vcpus,
        boot_args: boot_args_of(backend, cfg),
    })
}

/// Host entropy and wall clock for [`crate::client::AgentClient::reseed`].
pub fn reseed_material() -> (Vec<u8>, u64) {
    use rand::RngCore;
    let mut entropy = vec![0u8; RESEED_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut entropy);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    (entropy, now.as_nanos() as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid manifest of a python VM with no files (other modules' tests use it too).
    pub(crate) fn manifest() -> SnapshotManifest {
        SnapshotManifest {
            format: SNAPSHOT_FORMAT,
            machine: Expected {
                lang: "python".into(),
                backend: "qemu".into(),
                backend_version: "QEMU emulator version 7.2.22".into(),
                accel: "tcg".into(),
                cpu: "max".into(),
                cpu_flags_sha256: String::new(),
                kernel_sha256: "k".repeat(64),
                initramfs_sha256: "i".repeat(64),
                image_sha256: "m".repeat(64),
                mem_mib: 512,
                vcpus: 1,
                boot_args: "console=ttyS0".into(),
            },
            agent_version: "0.1.0".into(),
            warmup: None,
            created_at: "2026-12-03T00:00:00Z".into(),
            boot_secs: 3.0,
            files: BTreeMap::new(),
        }
    }

    fn expected_of(m: &SnapshotManifest) -> Expected {
        m.machine.clone()
    }

    #[test]
    fn every_field_that_matters_is_compared() {
        let m = manifest();
        assert_eq!(m.mismatch(&expected_of(&m)), None);
        type Change = Box<dyn Fn(&mut Expected)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|e| e.lang = "node".into()), "language"),
            (Box::new(|e| e.backend = "firecracker".into()), "backend"),
            (
                Box::new(|e| e.backend_version = "8.0".into()),
                "backend version",
            ),
            (Box::new(|e| e.accel = "kvm".into()), "acceleration"),
            (Box::new(|e| e.cpu = "host:x".into()), "CPU"),
            (Box::new(|e| e.cpu_flags_sha256 = "f".into()), "CPU flags"),
            (Box::new(|e| e.kernel_sha256 = "x".repeat(64)), "kernel"),
            (
                Box::new(|e| e.initramfs_sha256 = "x".repeat(64)),
                "initramfs",
            ),
            (Box::new(|e| e.image_sha256 = "x".repeat(64)), "image"),
            (Box::new(|e| e.mem_mib = 1024), "memory"),
            (Box::new(|e| e.vcpus = 2), "vCPUs"),
            (
                Box::new(|e| e.boot_args = "quiet".into()),
                "kernel arguments",
            ),
        ];
        for (change, word) in cases {
            let mut e = expected_of(&m);
            change(&mut e);
            let why = m.mismatch(&e).expect("a mismatch");
            assert!(why.contains(word), "{why:?} should name {word}");
        }
        let mut old = manifest();
        old.format = 0;
        assert!(old.mismatch(&expected_of(&m)).unwrap().contains("format"));
    }

    #[test]
    fn corrupted_truncated_and_hostile_state_files_are_refused() {
        let cache = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmstate.snapshot"), b"state bytes").unwrap();
        let mut m = manifest();
        m.files.insert(
            "vmstate.snapshot".into(),
            FileDigest {
                bytes: 11,
                sha256: sha256_file(&dir.path().join("vmstate.snapshot")).unwrap(),
            },
        );
        verify_files(cache.path(), dir.path(), &m).unwrap();
        // Verified once: the digest is cached. A same-size change has a new mtime and is
        // hashed again.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(dir.path().join("vmstate.snapshot"), b"state bytez").unwrap();
        let e = verify_files(cache.path(), dir.path(), &m).unwrap_err();
        assert!(e.contains("corrupted"), "{e}");
        std::fs::write(dir.path().join("vmstate.snapshot"), b"short").unwrap();
        let e = verify_files(cache.path(), dir.path(), &m).unwrap_err();
        assert!(e.contains("bytes"), "{e}");
        // A symlink planted in place of a state file is not followed.
        std::fs::remove_file(dir.path().join("vmstate.snapshot")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("vmstate.snapshot")).unwrap();
        let e = verify_files(cache.path(), dir.path(), &m).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        // Names that leave the directory.
        let mut bad = manifest();
        bad.files.insert(
            "../../etc/shadow".into(),
            FileDigest {
                bytes: 0,
                sha256: String::new(),
            },
        );
        assert!(verify_files(cache.path(), dir.path(), &bad)
            .unwrap_err()
            .contains("bad file"));
        assert!(verify_files(cache.path(), dir.path(), &manifest())
            .unwrap_err()
            .contains("no state files"));
    }
}
