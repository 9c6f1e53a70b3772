//! Runs untrusted code in a fresh microVM: pick a backend, boot the language's image with the
//! guest kernel, wait for the agent, run, stream the output back, tear everything down.
//!
//! ```text
//! Runner::run ─▶ select backend (Firecracker | QEMU kvm | QEMU tcg, KVM proven by a boot)
//!             ─▶ Vm::start (own temp dir) ─▶ hello (boot timeout)
//!             ─▶ make_dir output/, put input files ─▶ exec in /workspace (streamed)
//!             ─▶ list output/, download within the caps (also after a timeout or failure)
//!             ─▶ Vm::stop (kill, wait, remove dir) — on every path, error or not
//! ```
//!
//! Files: [`RunSpec::files`] are copied into the workspace (`/workspace` in the VM) before
//! the program starts, and the program runs there, so `data.txt` and `/workspace/data.txt`
//! are the same file. With [`RunSpec::outputs`], the regular files the program leaves under
//! `output/` come back into [`OutputLimits::dir`] as `0`, `1`, ... (never a name chosen by the
//! guest), listed in [`RunOutcome::output_files`] by their name under `output/`; files over
//! the caps are named in [`RunOutcome::output_files_skipped`]. Outputs are collected whatever
//! the program's status (timeout, error, compile error): partial results are results. They are
//! not collected when the run itself fails (the VM died, the agent broke the protocol); then
//! the files already downloaded are removed and the error is returned.

pub mod bench;
mod client;
mod error;
pub mod pool;
pub mod prepare;
pub mod snapshot;
pub mod snapshot_store;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use infra_protocol::{check_relative_path, ErrorCode, Exec, Exit, FEATURE_FILE_TRANSFER};
use infra_vmm::{Accel, Backend, Vm, VmConfig};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

pub use client::{
    AgentClient, AgentInfo, FileListing, FileMeta, Output, FILE_CHUNK_BYTES, MAX_STRAY_FRAMES,
    OUTPUT_SLACK_BYTES,
};
pub use error::{RunError, Violation};

/// Which VMM to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Firecracker when its binary is present and KVM works, else QEMU.
    #[default]
    Auto,
    /// Firecracker only.
    Firecracker,
    /// QEMU only.
    Qemu,
}

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM when a probe boot proves it works on this host, else TCG.
    #[default]
    Auto,
    /// KVM, no fallback.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// Verdict key of Firecracker's KVM probe.
const FIRECRACKER: &str = "firecracker";
/// Verdict key of QEMU-KVM's probe.
const QEMU_KVM: &str = "qemu-kvm";

/// Host-wide runner settings.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// VMM choice.
    pub backend: BackendChoice,
    /// QEMU acceleration choice.
    pub accel: AccelChoice,
    /// `qemu-system-x86_64` (default: from `PATH`).
    pub qemu: Option<PathBuf>,
    /// `firecracker` (default: from `PATH`).
    pub firecracker: Option<PathBuf>,
    /// The jailer in front of Firecracker: `None` finds `jailer` on `PATH` when running as
    /// root (Firecracker as root without it is refused unless `no_jailer`).
    pub jailer: Option<PathBuf>,
    /// Run Firecracker as root without the jailer (`--no-jailer`).
    pub no_jailer: bool,
    /// Uids (and gids) given to VMMs, one per VM.
    pub vm_uids: infra_vmm::uid::UidRange,
    /// How long a VM may take to boot to a ready agent.
    pub boot_timeout: Duration,
    /// The agent binary that becomes the initramfs `/init` (the CLI sets the slim agent from
    /// [`infra_config::agent_binary`]).
    pub agent: PathBuf,
    /// Where per-VM directories are created.
    pub run_dir: PathBuf,
    /// Extra kernel arguments (e.g. `infra.log=debug`).
    pub extra_args: String,
}

impl RunnerOptions {
    /// Defaults for this host: auto backend, 120 s boot timeout (TCG boots on a loaded
    /// 2-core host take ~10 s; the margin is for much slower machines), this executable as
    /// the agent.
    pub fn for_host() -> std::io::Result<Self> {
        Ok(Self {
            backend: BackendChoice::Auto,
            accel: AccelChoice::Auto,
            qemu: None,
            firecracker: None,
            jailer: None,
            no_jailer: false,
            vm_uids: infra_vmm::uid::UidRange::default(),
            boot_timeout: Duration::from_secs(120),
            agent: std::env::current_exe()?,
            run_dir: default_run_dir(),
            extra_args: String::new(),
        })
    }
}

/// Where VM directories go: [`infra_config::default_run_dir`] (never a shared temp dir).
pub fn default_run_dir() -> PathBuf {
    infra_config::default_run_dir()
}

/// Guest memory kept out of the program's cgroup for the kernel, page cache and the agent.
pub const GUEST_RESERVE_MIB: u32 = 96;

/// Default process budget (`--max-pids`).
pub const DEFAULT_MAX_PIDS: u32 = 256;

/// One program to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Language key or alias.
    pub lang: String,
    /// Source code.
    pub code: String,
    /// Program arguments.
    pub argv: Vec<String>,
    /// Standard input.
    pub stdin: Vec<u8>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit for the program.
    pub timeout: Duration,
    /// Output cap per stream.
    pub max_output_bytes: u64,
    /// Guest memory (MiB).
    pub mem_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u8,
    /// Most processes/threads the program may have at once.
    pub max_pids: u32,
    /// Image to boot.
    pub rootfs: PathBuf,
    /// Kernel (ELF vmlinux) to boot.
    pub kernel: PathBuf,
    /// Host files copied into the workspace before the program runs.
    pub files: Vec<InputFile>,
    /// Bring back what the program writes under `output/`; `None` leaves it in the VM.
    pub outputs: Option<OutputLimits>,
    /// A snapshot directory to restore from when it fits this run (see [`snapshot`]);
    /// `None` cold-boots.
    pub snapshot: Option<PathBuf>,
}

/// The workspace directory whose files come back ([`RunSpec::outputs`]); it exists, empty and
/// writable by the program, when the program starts.
pub const OUTPUT_DIR: &str = "output";

/// A host file to place in the run's workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// Path in the workspace, relative (`data.csv`, `in/a.bin`); must pass
    /// [`check_input_name`].
    pub name: String,
    /// The host file to copy (read when the VM is up, streamed in 2 MiB chunks).
    pub source: PathBuf,
}

/// Where output files go and how many bytes of them to bring back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLimits {
    /// An existing directory, best empty and private: the runner creates the files `0`, `1`,
    /// ... in it (O_EXCL: an existing name fails the run), one per downloaded file, mode 0600.
    pub dir: PathBuf,
    /// Most files downloaded.
    pub max_files: usize,
    /// Largest file downloaded, in bytes.
    pub max_file_bytes: u64,
    /// Most bytes downloaded in all.
    pub max_total_bytes: u64,
}

/// A file the program left under `output/`, now on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Path relative to `output/`, `/`-separated; passed [`infra_protocol::check_relative_path`].
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Permission bits in the guest (`0o777` part only).
    pub mode: u32,
    /// Where the runner wrote it: `dir/<index>` (not serialized).
    #[serde(skip)]
    pub host_path: PathBuf,
}

/// A file under `output/` that was not downloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedOutput {
    /// Path relative to `output/`.
    pub name: String,
    /// Its size in the guest.
    pub bytes: u64,
    /// Which cap it hit.
    pub reason: SkipReason,
}

/// Why an output file was not downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// `max_files` files were already downloaded.
    TooManyFiles,
    /// The file is over `max_file_bytes`.
    FileTooLarge,
    /// It would take the total over `max_total_bytes`.
    TotalTooLarge,
}

/// What a run produced, in the original API's shape plus our fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOutcome {
    /// Request id (`tr-…`).
    pub trace_id: String,
    /// `success`, `error`, `timeout`, `compile_error`, `internal_error`.
    pub status: String,
    /// Program stdout (lossy UTF-8).
    pub stdout: String,
    /// Program stderr (lossy UTF-8).
    pub stderr: String,
    /// Shell-style exit code (124 for timeouts, 128+N for signals).
    pub exit_code: i32,
    /// Program wall time, seconds (the run only; a build is in `compile_time`).
    pub exec_time: f64,
    /// Build step wall time, seconds, for compiled languages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile_time: Option<f64>,
    /// Language key.
    pub lang: String,
    /// `restore` (from a snapshot) or `boot` (cold).
    #[serde(default)]
    pub start: String,
    /// Why a snapshot was not used, when one was asked for and the run cold-booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_note: Option<String>,
    /// VMM start to ready agent (restored and reseeded, or booted), seconds.
    pub boot_time: f64,
    /// Whole run, seconds.
    pub total_time: f64,
    /// `firecracker` or `qemu`.
    pub backend: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The wall timeout fired.
    pub timed_out: bool,
    /// Signal that ended the program.
    pub signal: Option<i32>,
    /// stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Peak memory of the program, bytes (cgroup v2).
    pub peak_memory_bytes: Option<u64>,
    /// Compiler output for `compile_error`.
    pub compile_output: Option<String>,
    /// Agent version in the guest.
    pub agent_version: String,
    /// Files brought back from `output/`, in name order (empty without
    /// [`RunSpec::outputs`]).
    #[serde(default)]
    pub output_files: Vec<OutputFile>,
    /// Files under `output/` that were listed but not downloaded, with the cap each hit.
    #[serde(default)]
    pub output_files_skipped: Vec<SkippedOutput>,
    /// `output/` held more files than were listed (more than `max_files + 1`, or more than
    /// one listing carries); those are neither downloaded nor named.
    #[serde(default)]
    pub output_files_truncated: bool,
}

/// What `snapshot create` saves.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    /// Language key.
    pub lang: String,
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs (with the agent).
    pub initramfs: PathBuf,
    /// Image.
    pub rootfs: PathBuf,
    /// Guest memory (MiB); restores must ask for the same.
    pub mem_mib: u32,
    /// Guest vCPUs; restores must ask for the same.
    pub vcpus: u8,
    /// A program run before saving (e.g. importing heavy modules, to warm the page cache).
    pub warmup: Option<String>,
    /// Its time limit.
    pub warmup_timeout: Duration,
    /// The snapshot directory (`<home>/snapshots/<lang>`).
    pub dir: PathBuf,
}

/// A booted VM with a connected, greeted agent.
pub struct ReadyVm {
    /// The VM (stop it with [`Vm::stop`]).
    pub vm: Vm,
    /// The agent connection.
    pub client: AgentClient<UnixStream>,
    /// What the agent reported.
    pub info: AgentInfo,
    /// Start-to-ready time.
    pub boot: Duration,
    /// The workspace's `output/` exists already (a pool VM prepares it while it waits, which
    /// saves the hand-out a round trip to the guest).
    pub workspace_ready: bool,
}

/// Boots VMs and runs programs in them.
#[derive(Debug, Clone)]
pub struct Runner {
    opts: RunnerOptions,
    cache: PathBuf,
}

/// The KVM probes' verdicts, one per KVM backend (a Firecracker failure says nothing about
/// QEMU-KVM), remembered until the host reboots; the latest boot of a backend overwrites its
/// entry.
#[derive(Debug, Default, Serialize, Deserialize)]
struct KvmVerdicts {
    boot_id: String,
    #[serde(default)]
    backends: std::collections::BTreeMap<String, KvmVerdict>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KvmVerdict {
    usable: bool,
    reason: String,
}

impl Runner {
    /// A runner with these options; probe results are cached under `cache`.
    pub fn new(opts: RunnerOptions, cache: &Path) -> Self {
        Self {
            opts,
            cache: cache.to_path_buf(),
        }
    }

    /// The options in use.
    pub fn options(&self) -> &RunnerOptions {
        &self.opts
    }

    fn verdict_path(&self) -> PathBuf {
        self.cache.join("kvm-probe.json")
    }

    fn verdicts(&self) -> KvmVerdicts {
        std::fs::read(self.verdict_path())
            .ok()
            .and_then(|b| serde_json::from_slice::<KvmVerdicts>(&b).ok())
            .filter(|v| v.boot_id == boot_id())
            .unwrap_or_default()
    }

    /// What an earlier probe of `backend` (`firecracker`, `qemu-kvm`) found on this boot of the
    /// host, if any.
    pub fn kvm_verdict_of(&self, backend: &str) -> Option<(bool, String)> {
        self.verdicts()
            .backends
            .get(backend)
            .map(|v| (v.usable, v.reason.clone()))
    }

    /// What an earlier probe of QEMU-KVM found on this boot of the host, if any.
    pub fn kvm_verdict(&self) -> Option<(bool, String)> {
        self.kvm_verdict_of(QEMU_KVM)
    }

    fn record_verdict(&self, backend: &str, usable: bool, reason: &str) {
        let mut all = self.verdicts();
        all.boot_id = boot_id();
        all.backends.insert(
            backend.to_string(),
            KvmVerdict {
                usable,
                reason: reason.to_string(),
            },
        );
        // Best effort: no verdict is written into a directory that fails the checks.
        if infra_config::ensure_dir(&self.cache, infra_config::PRIVATE_DIR).is_err() {
            return;
        }
        let _ = infra_config::write_atomic(
            &self.verdict_path(),
            &serde_json::to_vec_pretty(&all).unwrap_or_default(),
        );
    }

    /// The `--version` first line of the VMM named `name` (`qemu` or `firecracker`) as this
    /// runner would start it; empty when it cannot be found.
    pub fn backend_version(&self, name: &str) -> String {
        let backend = match name {
            "firecracker" => self.firecracker(),
            _ => self.qemu(Accel::Tcg),
        };
        backend
            .map(|b| snapshot::backend_version(&b))
            .unwrap_or_default()
    }

    fn qemu(&self, accel: Accel) -> Result<Backend, RunError> {
        let binary = infra_vmm::find_binary(self.opts.qemu.as_deref(), "qemu-system-x86_64")
            .ok_or_else(|| {
                RunError::Prerequisite(format!(
                    "qemu-system-x86_64 not found; install it with `apt-get install {}` or run `infra.operator setup`",
                    infra_vmm::qemu::QEMU_PACKAGE
                ))
            })?;
        Ok(Backend::Qemu(infra_vmm::qemu::Qemu {
            binary,
            accel,
            uids: nix::unistd::geteuid()
                .is_root()
                .then_some(self.opts.vm_uids),
        }))
    }

    /// Firecracker, under its jailer when we are root (the jailer chroots it and drops it to a
    /// uid of its own). `Err` says why it cannot be used.
    fn firecracker(&self) -> Result<Backend, RunError> {
        let binary = infra_vmm::find_binary(self.opts.firecracker.as_deref(), "firecracker")
            .ok_or_else(|| {
                RunError::Prerequisite(
                    "firecracker not found on PATH; install it from https://github.com/firecracker-microvm/firecracker/releases or pass --firecracker PATH".into(),
                )
            })?;
        let jailed = nix::unistd::geteuid().is_root() && !self.opts.no_jailer;
        let jailer = if jailed {
            let jb = infra_vmm::find_binary(self.opts.jailer.as_deref(), "jailer").ok_or_else(|| {
                RunError::Prerequisite(
                    "firecracker runs as root only under its jailer, and no jailer was found: install it beside firecracker (same release), pass --jailer PATH, or --no-jailer to run it unjailed".into(),
                )
            })?;
            Some(infra_vmm::firecracker::Jailer {
                binary: jb,
                uids: self.opts.vm_uids,
                chroot_base: "/srv/jailer".into(),
                cgroups: infra_vmm::firecracker::Cgroups::detect(),
            })
        } else {
            None
        };
        Ok(Backend::Firecracker(infra_vmm::firecracker::Firecracker {
            binary,
            jailer,
        }))
    }

    /// Backends to try, in order. Each KVM candidate is proven by its boot; a failure is
    /// remembered and the next candidate is used.
    fn candidates(&self) -> Result<Vec<Backend>, RunError> {
        let openable = infra_vmm::kvm_openable();
        let usable = |b: &str| openable && self.kvm_verdict_of(b).is_none_or(|(ok, _)| ok);
        let mut out = Vec::new();
        match self.opts.backend {
            BackendChoice::Firecracker => {
                out.push(self.firecracker()?);
                return Ok(out);
            }
            BackendChoice::Auto if usable(FIRECRACKER) => match self.firecracker() {
                Ok(b) => out.push(b),
                Err(e) => tracing::debug!(reason = %e, "firecracker not used"),
            },
            _ => {}
        }
        match self.opts.accel {
            AccelChoice::Kvm => out.push(self.qemu(Accel::Kvm)?),
            AccelChoice::Tcg => out.push(self.qemu(Accel::Tcg)?),
            AccelChoice::Auto => {
                if usable(QEMU_KVM) {
                    out.push(self.qemu(Accel::Kvm)?);
                }
                out.push(self.qemu(Accel::Tcg)?);
            }
        }
        Ok(out)
    }

    /// Boots `rootfs` and returns once the agent has answered hello.
    pub async fn boot(
        &self,
        kernel: &Path,
        initramfs: &Path,
        rootfs: &Path,
        mem_mib: u32,
        vcpus: u8,
    ) -> Result<ReadyVm, RunError> {
        // The kernel holds the archive and its unpacked files at once while booting; 96 MiB
        // for the kernel and a small program: Python's print(42) runs from 84 MiB up with the
        // 3 MiB initramfs of the slim agent (bench/results/agent-2026-12-03.md).
        let initramfs_mib = std::fs::metadata(initramfs)
            .map(|m| (m.len() >> 20) as u32)
            .unwrap_or(0);
        let floor = 2 * initramfs_mib + 96;
        if mem_mib < floor {
            return Err(RunError::Usage(format!(
                "--mem {mem_mib} is too small: the initramfs alone is {initramfs_mib} MiB; use at least {floor}"
            )));
        }
        let cfg = self.vm_config(kernel, initramfs, rootfs, mem_mib, vcpus);
        let candidates = self.candidates()?;
        let last = candidates.len() - 1;
        for (i, backend) in candidates.into_iter().enumerate() {
            let probe = match &backend {
                Backend::Firecracker(_) => Some(FIRECRACKER),
                Backend::Qemu(q) if q.accel == Accel::Kvm => Some(QEMU_KVM),
                Backend::Qemu(_) => None,
            };
            let uses_kvm = probe.is_some();
            let proven = probe
                .and_then(|p| self.kvm_verdict_of(p))
                .is_some_and(|(ok, _)| ok);
            // An unproven KVM gets a short leash: when it is broken, the guest dies or
            // stalls early, and the fallback still has its full boot timeout.
            let timeout = if uses_kvm && !proven && i < last {
                self.opts.boot_timeout.min(Duration::from_secs(30))
            } else {
                self.opts.boot_timeout
            };
            match boot_one(&backend, &cfg, timeout).await {
                Ok(ready) => {
                    if let (Some(p), false) = (probe, proven) {
                        self.record_verdict(p, true, "a probe boot reached the agent");
                    }
                    return Ok(ready);
                }
                Err(e) if uses_kvm && i < last && self.opts.accel == AccelChoice::Auto => {
                    tracing::warn!(backend = backend.name(), error = %e, "KVM boot failed; falling back");
                    let first_line = e.to_string().lines().next().unwrap_or("").to_string();
                    if let Some(p) = probe {
                        self.record_verdict(p, false, &first_line);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last candidate returns")
    }

    fn vm_config(
        &self,
        kernel: &Path,
        initramfs: &Path,
        rootfs: &Path,
        mem_mib: u32,
        vcpus: u8,
    ) -> VmConfig {
        VmConfig {
            kernel: kernel.to_path_buf(),
            initramfs: initramfs.to_path_buf(),
            rootfs: rootfs.to_path_buf(),
            mem_mib,
            vcpus,
            extra_args: self.opts.extra_args.clone(),
            run_dir: self.opts.run_dir.clone(),
        }
    }

    /// Restores a ready VM for `spec` from the snapshot in `dir`: the manifest must fit the
    /// run on one of this runner's backends and every state file must match its sha256; the
    /// VM is then restored, greeted, and made unique (entropy and clock) before it is handed
    /// out. On any failure nothing is left running.
    pub async fn restore(
        &self,
        spec: &RunSpec,
        initramfs: &Path,
        dir: &Path,
    ) -> Result<ReadyVm, RunError> {
        let refuse = |reason: String| RunError::Snapshot {
            dir: dir.to_path_buf(),
            lang: spec.lang.clone(),
            reason,
        };
        let manifest = snapshot::read_manifest(dir).map_err(refuse)?;
        let cfg = self.vm_config(
            &spec.kernel,
            initramfs,
            &spec.rootfs,
            spec.mem_mib,
            spec.vcpus,
        );
        let mut reasons = Vec::new();
        let mut chosen = None;
        for backend in self.candidates()? {
            let want = snapshot::expected(&self.cache, &spec.lang, &backend, &cfg)?;
            match manifest.mismatch(&want) {
                None => {
                    chosen = Some(backend);
                    break;
                }
                Some(r) => reasons.push(r),
            }
        }
        let Some(backend) = chosen else {
            return Err(refuse(reasons.join("; ")));
        };
        snapshot::verify_files(&self.cache, dir, &manifest).map_err(refuse)?;
        let started = Instant::now();
        let vm = backend.restore(&cfg, dir).await?;
        ready_vm(
            vm,
            backend.name(),
            self.opts.boot_timeout,
            started,
            Greeting::Reseed,
        )
        .await
    }

    /// Boots a VM for `req`, waits for its agent, runs the optional warm-up, and saves it as
    /// the snapshot `req.dir` (written beside it and renamed into place; an existing snapshot
    /// is replaced only once the new one is complete). The VM is stopped afterwards.
    pub async fn create_snapshot(
        &self,
        req: &SnapshotRequest,
    ) -> Result<snapshot::SnapshotManifest, RunError> {
        let parent = req.dir.parent().ok_or_else(|| {
            RunError::Usage(format!("{} has no parent directory", req.dir.display()))
        })?;
        infra_config::ensure_dir(parent, 0o755)?;
        let cfg = self.vm_config(
            &req.kernel,
            &req.initramfs,
            &req.rootfs,
            req.mem_mib,
            req.vcpus,
        );
        let ready = self
            .boot(
                &req.kernel,
                &req.initramfs,
                &req.rootfs,
                req.mem_mib,
                req.vcpus,
            )
            .await?;
        let ReadyVm {
            mut vm,
            mut client,
            info,
            boot,
            workspace_ready: _,
        } = ready;
        let result = self
            .save_ready(&mut vm, &mut client, &info, boot, req, &cfg, parent)
            .await;
        let _ = vm.stop().await;
        let (tmp, manifest) = result?;
        let tmp = tmp.keep();
        snapshot::install(&tmp, &req.dir, &self.cache, &manifest)?;
        Ok(manifest)
    }

    #[allow(clippy::too_many_arguments)]
    async fn save_ready(
        &self,
        vm: &mut Vm,
        client: &mut AgentClient<UnixStream>,
        info: &AgentInfo,
        boot: Duration,
        req: &SnapshotRequest,
        cfg: &VmConfig,
        parent: &Path,
    ) -> Result<(tempfile::TempDir, snapshot::SnapshotManifest), RunError> {
        if !client.supports(infra_protocol::FEATURE_RESEED) {
            return Err(RunError::AgentTooOld {
                agent_version: info.agent_version.clone(),
                feature: "reseed (restored VMs could not be made unique)",
            });
        }
        if let Some(code) = &req.warmup {
            let mut exec = Exec::new(&req.lang, code);
            exec.timeout_ms = req.warmup_timeout.as_millis() as u64;
            let exit = client.exec(exec, |_| {}).await?;
            if exit.status != infra_protocol::ExecStatus::Success {
                return Err(RunError::Usage(format!(
                    "the warm-up program ended with {} (exit code {}); fix it or leave --warmup out",
                    exit.status.as_str(),
                    exit.shell_exit_code()
                )));
            }
        }
        let backend_name = vm.backend();
        let backend = self
            .candidates()?
            .into_iter()
            .find(|b| b.name() == backend_name && snapshot::accel_of(b).to_string() == vm.accel())
            .ok_or_else(|| {
                RunError::Prerequisite("the backend that booted the VM is gone".into())
            })?;
        let want = snapshot::expected(&self.cache, &req.lang, &backend, cfg)?;
        // The agent goes back to waiting for a host: the saved VM is one that no host is
        // talking to, and the restored one waits for its own.
        client.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".new-{}-", req.lang))
            .tempdir_in(parent)
            .map_err(|e| {
                RunError::Prerequisite(format!(
                    "cannot create a directory in {}: {e}",
                    parent.display()
                ))
            })?;
        let names = vm.save_snapshot(tmp.path()).await?;
        let mut files = std::collections::BTreeMap::new();
        for name in names {
            let path = tmp.path().join(name);
            let bytes = std::fs::metadata(&path)
                .map_err(|e| RunError::Prerequisite(format!("{}: {e}", path.display())))?
                .len();
            let sha256 = snapshot::cached_sha256(&self.cache, &path)
                .map_err(|e| RunError::Prerequisite(format!("{}: {e}", path.display())))?;
            files.insert(name.to_string(), snapshot::FileDigest { bytes, sha256 });
        }
        let manifest = snapshot::SnapshotManifest {
            format: snapshot::SNAPSHOT_FORMAT,
            machine: want,
            agent_version: info.agent_version.clone(),
            warmup: req.warmup.clone(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            boot_secs: boot.as_secs_f64(),
            files,
        };
        infra_config::write_atomic(
            &tmp.path().join(snapshot::MANIFEST),
            &serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
        )
        .map_err(|e| RunError::Prerequisite(format!("cannot write the snapshot manifest: {e}")))?;
        Ok((tmp, manifest))
    }

    /// Boots a VM for `spec`, places its input files, runs the program, streams its output to
    /// `on_output`, brings its output files back (see the crate doc), and tears the VM down
    /// (also when anything fails).
    pub async fn run(
        &self,
        spec: &RunSpec,
        initramfs: &Path,
        on_output: impl FnMut(Output),
    ) -> Result<RunOutcome, RunError> {
        self.run_on(spec, initramfs, None, on_output).await
    }

    /// Like [`Runner::run`], on `pooled` when given (a ready VM from the warm pool, made for
    /// this language and shape; `start` is then `pool`), else on a VM restored or booted for
    /// the run. The VM is destroyed afterwards either way.
    pub async fn run_on(
        &self,
        spec: &RunSpec,
        initramfs: &Path,
        pooled: Option<ReadyVm>,
        on_output: impl FnMut(Output),
    ) -> Result<RunOutcome, RunError> {
        let checked = (|| {
            check_code(&spec.code)?;
            check_env(&spec.env)?;
            check_args(&spec.argv)?;
            check_timeout(spec.timeout)?;
            check_files(spec)
        })();
        if let Err(e) = checked {
            if let Some(p) = pooled {
                let _ = p.vm.stop().await;
            }
            return Err(e);
        }
        let started = Instant::now();
        let trace_id = format!("tr-{}", uuid::Uuid::new_v4().simple());
        if let Some(mut ready) = pooled {
            ready.boot = Duration::ZERO;
            return self
                .finish_run(spec, ready, "pool", None, started, trace_id, on_output)
                .await;
        }
        let mut start_note = None;
        let restored = match &spec.snapshot {
            Some(dir) => match self.restore(spec, initramfs, dir).await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "not restoring from the snapshot; booting");
                    start_note = Some(e.to_string());
                    None
                }
            },
            None => None,
        };
        let start = if restored.is_some() {
            "restore"
        } else {
            "boot"
        };
        let ready = match restored {
            Some(r) => r,
            None => {
                self.boot(
                    &spec.kernel,
                    initramfs,
                    &spec.rootfs,
                    spec.mem_mib,
                    spec.vcpus,
                )
                .await?
            }
        };
        self.finish_run(spec, ready, start, start_note, started, trace_id, on_output)
            .await
    }

    /// The run on a ready VM: inputs, exec, outputs, teardown.
    #[allow(clippy::too_many_arguments)]
    async fn finish_run(
        &self,
        spec: &RunSpec,
        mut ready: ReadyVm,
        start: &'static str,
        start_note: Option<String>,
        started: Instant,
        trace_id: String,
        on_output: impl FnMut(Output),
    ) -> Result<RunOutcome, RunError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let t = Instant::now();
        let result = converse(&mut ready, spec, &mut stdout, &mut stderr, on_output).await;
        let conversed = t.elapsed();
        let backend = ready.vm.backend().to_string();
        let accel = ready.vm.accel().to_string();
        let stop = ready.vm.stop().await;
        tracing::debug!(
            conversation_ms = conversed.as_millis() as u64,
            exec_ms = result.as_ref().map(|r| r.0.wall_ms).unwrap_or(0),
            stop_ms = (t.elapsed() - conversed).as_millis() as u64,
            start,
            "run finished"
        );
        let (exit, collected): (Exit, CollectedOutputs) = result?;
        if let Err(e) = stop {
            remove_outputs(&collected.files);
            return Err(e.into());
        }
        let (stdout_s, stderr_s) = (
            String::from_utf8_lossy(&stdout).into_owned(),
            String::from_utf8_lossy(&stderr).into_owned(),
        );
        Ok(RunOutcome {
            trace_id,
            status: exit.status.as_str().to_string(),
            stdout: stdout_s,
            stderr: stderr_s,
            exit_code: exit.shell_exit_code(),
            exec_time: exit.wall_ms as f64 / 1000.0,
            compile_time: exit.build_ms.map(|ms| ms as f64 / 1000.0),
            lang: spec.lang.clone(),
            start: start.to_string(),
            start_note,
            boot_time: ready.boot.as_secs_f64(),
            total_time: started.elapsed().as_secs_f64(),
            backend,
            accel,
            timed_out: exit.timed_out,
            signal: exit.signal,
            stdout_truncated: exit.stdout_truncated,
            stderr_truncated: exit.stderr_truncated,
            peak_memory_bytes: exit.peak_memory_bytes,
            compile_output: exit.compile_output,
            agent_version: ready.info.agent_version,
            output_files: collected.files,
            output_files_skipped: collected.skipped,
            output_files_truncated: collected.truncated,
        })
    }
}

/// Time allowed for moving `bytes` through the agent, on top of a fixed minute: 256 KiB/s is
/// far below what TCG guests manage, so only a stuck guest reaches it.
fn transfer_time(bytes: u64) -> Duration {
    Duration::from_secs(60 + bytes.min(1 << 40) / (256 << 10))
}

/// The conversation with a ready VM: inputs, exec, outputs. The caller stops the VM.
async fn converse(
    ready: &mut ReadyVm,
    spec: &RunSpec,
    stdout: &mut Vec<u8>,
    stderr: &mut Vec<u8>,
    mut on_output: impl FnMut(Output),
) -> Result<(Exit, CollectedOutputs), RunError> {
    let files = ready.client.supports(FEATURE_FILE_TRANSFER);
    if !files && (!spec.files.is_empty() || spec.outputs.is_some()) {
        return Err(RunError::AgentTooOld {
            agent_version: ready.info.agent_version.clone(),
            feature: "input and output files",
        });
    }
    if files {
        let mut total = 0u64;
        for f in &spec.files {
            total += std::fs::metadata(&f.source).map_or(0, |m| m.len());
        }
        let client = &mut ready.client;
        let make_output = !ready.workspace_ready;
        let place = async {
            if make_output {
                client.make_dir(OUTPUT_DIR).await?;
            }
            for f in &spec.files {
                let file = tokio::fs::File::open(&f.source).await.map_err(|source| {
                    RunError::InputFile {
                        path: f.source.clone(),
                        source,
                    }
                })?;
                client.put_file(&f.name, file, 0o644).await?;
            }
            Ok(())
        };
        let limit = transfer_time(total);
        watch_vm(&mut ready.vm, limit, place, |vm| RunError::AgentSilent {
            secs: limit.as_secs(),
            console: vm.console_tail(15),
        })
        .await?;
    }
    let mut exec = Exec::new(spec.lang.clone(), spec.code.clone());
    exec.argv = spec.argv.clone();
    exec.stdin = spec.stdin.clone();
    exec.env = spec.env.clone();
    exec.timeout_ms = spec.timeout.as_millis() as u64;
    exec.max_output_bytes = spec.max_output_bytes;
    // Leave the kernel and the agent room to report: the program's cgroup gets the
    // guest's memory minus a reserve, and a pid budget that stops fork bombs early.
    exec.memory_mb = Some(u64::from(
        spec.mem_mib.saturating_sub(GUEST_RESERVE_MIB).max(32),
    ));
    exec.max_pids = Some(spec.max_pids);
    // In the workspace itself (`/workspace` in the VM), next to the input files and output/.
    exec.workdir = files.then(|| ".".to_string());
    // The agent enforces the timeout; this backstop only covers an agent or guest that
    // stops answering.
    let backstop = spec.timeout + Duration::from_secs(15);
    let exit = {
        let exec_fut = ready.client.exec(exec, |o| {
            match &o {
                Output::Stdout(d) => stdout.extend_from_slice(d),
                Output::Stderr(d) => stderr.extend_from_slice(d),
            }
            on_output(o);
        });
        watch_vm(&mut ready.vm, backstop, exec_fut, |vm| {
            RunError::AgentSilent {
                secs: backstop.as_secs(),
                console: vm.console_tail(15),
            }
        })
        .await?
    };
    let Some(limits) = &spec.outputs else {
        return Ok((exit, CollectedOutputs::default()));
    };
    let client = &mut ready.client;
    let limit = transfer_time(0);
    let plan = watch_vm(&mut ready.vm, limit, plan_outputs(client, limits), |vm| {
        RunError::AgentSilent {
            secs: limit.as_secs(),
            console: vm.console_tail(15),
        }
    })
    .await?;
    let mut collected = CollectedOutputs {
        files: Vec::new(),
        skipped: plan.skipped,
        truncated: plan.truncated,
    };
    let limit = transfer_time(plan.wanted.iter().map(|e| e.size).sum());
    let client = &mut ready.client;
    let r = watch_vm(
        &mut ready.vm,
        limit,
        download_outputs(client, &limits.dir, plan.wanted, &mut collected.files),
        |vm| RunError::AgentSilent {
            secs: limit.as_secs(),
            console: vm.console_tail(15),
        },
    )
    .await;
    match r {
        Ok(()) => Ok((exit, collected)),
        Err(e) => {
            remove_outputs(&collected.files);
            Err(e)
        }
    }
}

/// Removes downloaded output files (a run that fails returns none).
fn remove_outputs(files: &[OutputFile]) {
    for f in files {
        let _ = std::fs::remove_file(&f.host_path);
    }
}

/// What [`collect_outputs`] brought back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectedOutputs {
    /// Downloaded files, in name order, at `dir/0`, `dir/1`, ...
    pub files: Vec<OutputFile>,
    /// Listed files over a cap.
    pub skipped: Vec<SkippedOutput>,
    /// `output/` held more files than were listed.
    pub truncated: bool,
}

/// Brings back the files under the workspace's `output/` through a greeted `client`, within
/// `limits` (see the crate doc): lists at most `max_files + 1`, downloads in name order what
/// fits into `limits.dir` as `0`, `1`, ... (created O_EXCL, mode 0600), names the rest as
/// skipped. A missing or replaced `output/` gives nothing. On any error the files it created
/// are removed. [`Runner::run`] does the same with a time limit per phase; a caller using this
/// directly bounds the time itself.
pub async fn collect_outputs<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(
    client: &mut AgentClient<S>,
    limits: &OutputLimits,
) -> Result<CollectedOutputs, RunError> {
    let plan = plan_outputs(client, limits).await?;
    let mut files = Vec::new();
    if let Err(e) = download_outputs(client, &limits.dir, plan.wanted, &mut files).await {
        remove_outputs(&files);
        return Err(e);
    }
    Ok(CollectedOutputs {
        files,
        skipped: plan.skipped,
        truncated: plan.truncated,
    })
}

/// What to download from `output/`, decided from its listing and the caps.
struct OutputPlan {
    wanted: Vec<infra_protocol::FileEntry>,
    skipped: Vec<SkippedOutput>,
    truncated: bool,
}

/// Lists `output/` (at most `max_files + 1` entries) and splits it, in name order, into the
/// files that fit the caps and those that do not.
async fn plan_outputs<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(
    client: &mut AgentClient<S>,
    limits: &OutputLimits,
) -> Result<OutputPlan, RunError> {
    let mut plan = OutputPlan {
        wanted: Vec::new(),
        skipped: Vec::new(),
        truncated: false,
    };
    let max_entries = u64::try_from(limits.max_files)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let listing = match client.list_files(OUTPUT_DIR, max_entries).await {
        Ok(l) => l,
        // The program removed output/ or put something else in its place: nothing to bring.
        Err(RunError::Refused { code, .. })
            if code == ErrorCode::NotFound.as_str() || code == ErrorCode::PathRefused.as_str() =>
        {
            return Ok(plan)
        }
        Err(e) => return Err(e),
    };
    plan.truncated = listing.truncated;
    let mut total = 0u64;
    for e in listing.entries {
        let reason = if plan.wanted.len() >= limits.max_files {
            SkipReason::TooManyFiles
        } else if e.size > limits.max_file_bytes {
            SkipReason::FileTooLarge
        } else if total.saturating_add(e.size) > limits.max_total_bytes {
            SkipReason::TotalTooLarge
        } else {
            total += e.size;
            plan.wanted.push(e);
            continue;
        };
        plan.skipped.push(SkippedOutput {
            name: e.path,
            bytes: e.size,
            reason,
        });
    }
    Ok(plan)
}

/// Downloads `wanted` into `dir` as `0`, `1`, ..., recording each file in `files` as soon as
/// it exists on the host (so a failure can remove it). Each must have its listed size.
async fn download_outputs<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(
    client: &mut AgentClient<S>,
    dir: &Path,
    wanted: Vec<infra_protocol::FileEntry>,
    files: &mut Vec<OutputFile>,
) -> Result<(), RunError> {
    for e in wanted {
        // The host name is the index, never the guest's name.
        let host_path = dir.join(files.len().to_string());
        let file = create_output(&host_path)?;
        files.push(OutputFile {
            name: e.path.clone(),
            bytes: e.size,
            mode: e.mode & 0o777,
            host_path,
        });
        let mut file = tokio::fs::File::from_std(file);
        let guest = format!("{OUTPUT_DIR}/{}", e.path);
        let meta = match client.get_file_chunked(&guest, &mut file, e.size).await {
            Ok(m) => m,
            Err(RunError::FileTooLarge { size, .. }) => {
                return Err(Violation::SizeChanged {
                    was: e.size,
                    now: size,
                }
                .into())
            }
            Err(err) => return Err(err),
        };
        if meta.size != e.size {
            return Err(Violation::SizeChanged {
                was: e.size,
                now: meta.size,
            }
            .into());
        }
    }
    Ok(())
}

/// Creates a new output file: never an existing name, never through a symlink, mode 0600.
fn create_output(path: &Path) -> Result<std::fs::File, RunError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| RunError::OutputFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Checks a workspace name for an input file: a plain relative path
/// ([`infra_protocol::check_relative_path`]) that is not `output` itself.
pub fn check_input_name(name: &str) -> Result<(), RunError> {
    check_relative_path(name).map_err(|problem| {
        RunError::Usage(format!(
            "input file name {name:?} is refused ({problem}); give a relative path such as data/in.csv"
        ))
    })?;
    if name == OUTPUT_DIR {
        return Err(RunError::Usage(format!(
            "input file name {name:?} is refused: {OUTPUT_DIR}/ is the directory for the program's output files; put the file inside it or use another name"
        )));
    }
    Ok(())
}

/// Refuses bad input files and output settings before anything is booted: unsafe or repeated
/// names, the language's own source file name, sources that are not regular files, an output
/// directory that is not a directory.
pub fn check_files(spec: &RunSpec) -> Result<(), RunError> {
    check_input_files(&spec.lang, &spec.files)?;
    if let Some(o) = &spec.outputs {
        if !o.dir.is_dir() {
            return Err(RunError::Usage(format!(
                "the output directory {} does not exist or is not a directory; create it first",
                o.dir.display()
            )));
        }
    }
    Ok(())
}

/// The input-file half of [`check_files`], for front ends that check before they have a
/// whole [`RunSpec`]: safe and distinct names, not the language's source file, regular-file
/// sources.
pub fn check_input_files(lang: &str, files: &[InputFile]) -> Result<(), RunError> {
    let source_file = infra_languages::LanguageTable::builtin()
        .get(lang)
        .ok()
        .map(|l| l.file.clone());
    let mut seen = std::collections::HashSet::new();
    for f in files {
        check_input_name(&f.name)?;
        if !seen.insert(f.name.as_str()) {
            return Err(RunError::Usage(format!(
                "input file name {:?} is given twice; give each file its own name",
                f.name
            )));
        }
        if source_file.as_deref() == Some(f.name.as_str()) {
            return Err(RunError::Usage(format!(
                "input file name {:?} is the program's own source file in the workspace; give the input another name",
                f.name
            )));
        }
        match std::fs::metadata(&f.source) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(RunError::Usage(format!(
                    "input file {} is not a regular file; give a file, not a directory or device",
                    f.source.display()
                )))
            }
            Err(source) => {
                return Err(RunError::InputFile {
                    path: f.source.clone(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Refuses a wall-clock limit the protocol does not carry (over
/// [`infra_protocol::MAX_TIMEOUT_MS`], 24 h), before anything is fetched, built or booted.
pub fn check_timeout(timeout: Duration) -> Result<(), RunError> {
    if timeout.as_millis() > u128::from(infra_protocol::MAX_TIMEOUT_MS) {
        return Err(RunError::Usage(format!(
            "--timeout {} s is too long; the most is {} s (24 h)",
            timeout.as_secs(),
            infra_protocol::MAX_TIMEOUT_MS / 1000
        )));
    }
    Ok(())
}

/// Refuses environment variables the guest cannot set (empty names, `=` or NUL in a name, NUL
/// in a value), before anything is fetched, built or booted.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), RunError> {
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(RunError::Usage(format!(
                "environment variable {k:?} is not valid: names are non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    Ok(())
}

/// Refuses program arguments with NUL bytes (they cannot reach `execve`).
pub fn check_args(args: &[String]) -> Result<(), RunError> {
    if args.iter().any(|a| a.contains('\0')) {
        return Err(RunError::Usage("arguments cannot contain NUL bytes".into()));
    }
    Ok(())
}

/// Refuses an empty program before anything is fetched, built or booted.
pub fn check_code(code: &str) -> Result<(), RunError> {
    if code.trim().is_empty() {
        return Err(RunError::Usage(
            "the code is empty; pass a program with --code or --file".into(),
        ));
    }
    Ok(())
}

/// Waits for `fut` while watching the VMM: if it exits, the error says so; if `limit`
/// passes first, the error is `on_timeout`'s.
async fn watch_vm<T>(
    vm: &mut Vm,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, RunError>>,
    on_timeout: impl FnOnce(&Vm) -> RunError,
) -> Result<T, RunError> {
    tokio::pin!(fut);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        tokio::select! {
            r = &mut fut => {
                // A closed connection usually means the VM died: report that instead.
                if r.is_err() && vm.exited_within(Duration::from_secs(3)).await {
                    return Err(vm.exited_error().into());
                }
                return r;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if vm.exited().is_some() {
                    return Err(vm.exited_error().into());
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(on_timeout(vm));
                }
            }
        }
    }
}

async fn boot_one(
    backend: &Backend,
    cfg: &VmConfig,
    timeout: Duration,
) -> Result<ReadyVm, RunError> {
    let started = Instant::now();
    let vm = backend.start(cfg).await?;
    ready_vm(vm, backend.name(), timeout, started, Greeting::Hello).await
}

/// What a fresh VM is told before it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Greeting {
    /// `hello` (a booted VM).
    Hello,
    /// `hello`, then `reseed` with host entropy and clock (a restored VM).
    Reseed,
}

/// Connects to a started VM's agent (retrying until it listens: Firecracker's vsock refuses
/// until then) and greets it, within `timeout` and while the VMM lives; on failure the VM is
/// stopped.
/// How long a restored agent has to answer hello on one connection before the host hangs
/// up and connects again.
const RESTORE_HELLO_ATTEMPT: Duration = Duration::from_secs(4);

async fn ready_vm(
    mut vm: Vm,
    backend: &'static str,
    timeout: Duration,
    started: Instant,
    greeting: Greeting,
) -> Result<ReadyVm, RunError> {
    let endpoint = vm.endpoint().clone();
    // A restored agent is already waiting on its port; a booting one takes seconds.
    let poll = match greeting {
        Greeting::Reseed => Duration::from_millis(5),
        Greeting::Hello => Duration::from_millis(50),
    };
    let greet = async move {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let stream = loop {
                match endpoint.connect().await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::trace!(error = %e, "agent not reachable yet");
                        tokio::time::sleep(poll).await;
                    }
                }
            };
            let mut client = AgentClient::new(stream);
            let hello = client.hello();
            let info = match greeting {
                Greeting::Hello => hello.await?,
                // A restored agent answers within a second even under TCG. When the VM was
                // saved just as the previous host's disconnect reached the guest, the port
                // can come back with the guest's view of the connection stale; hanging up
                // and connecting again makes QEMU signal the port afresh.
                Greeting::Reseed => {
                    match tokio::time::timeout(RESTORE_HELLO_ATTEMPT, hello).await {
                        Ok(info) => info?,
                        Err(_) => {
                            tracing::info!(
                                attempt,
                                "a restored agent did not answer; reconnecting"
                            );
                            drop(client);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
            };
            if greeting == Greeting::Reseed {
                let (entropy, now) = snapshot::reseed_material();
                client.reseed(entropy, now).await?;
            }
            return Ok::<_, RunError>((client, info));
        }
    };
    let accel = vm.accel().to_string();
    let outcome = watch_vm(&mut vm, timeout, greet, |vm| {
        infra_vmm::VmError::BootTimeout {
            secs: timeout.as_secs(),
            backend,
            accel,
            console: vm.console_tail(15),
        }
        .into()
    })
    .await;
    match outcome {
        Ok((client, info)) => Ok(ReadyVm {
            vm,
            client,
            info,
            boot: started.elapsed(),
            workspace_ready: false,
        }),
        Err(e) => {
            let _ = vm.stop().await;
            Err(e)
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(files: Vec<InputFile>, outputs: Option<OutputLimits>) -> RunSpec {
        RunSpec {
            lang: "python".into(),
            code: "print(1)".into(),
            argv: Vec::new(),
            stdin: Vec::new(),
            env: BTreeMap::new(),
            timeout: Duration::from_secs(1),
            max_output_bytes: 1024,
            mem_mib: 256,
            vcpus: 1,
            max_pids: 16,
            rootfs: PathBuf::new(),
            kernel: PathBuf::new(),
            files,
            outputs,
            snapshot: None,
        }
    }

    /// Input names and sources are checked before anything boots.
    #[test]
    fn bad_input_files_are_usage_errors_before_boot() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("data.txt");
        std::fs::write(&src, "x").unwrap();
        let input = |name: &str| InputFile {
            name: name.into(),
            source: src.clone(),
        };
        assert!(check_files(&spec_with(vec![input("data.txt"), input("in/b.txt")], None)).is_ok());
        for bad in [
            vec![input("../x")],
            vec![input("/etc/passwd")],
            vec![input("a//b")],
            vec![input("output")],
            vec![input("main.py")],
            vec![input("a"), input("a")],
        ] {
            let e = check_files(&spec_with(bad.clone(), None)).unwrap_err();
            assert!(matches!(e, RunError::Usage(_)), "{bad:?}: {e}");
        }
        let missing = InputFile {
            name: "m".into(),
            source: dir.path().join("missing"),
        };
        assert!(matches!(
            check_files(&spec_with(vec![missing], None)),
            Err(RunError::InputFile { .. })
        ));
        let a_dir = InputFile {
            name: "d".into(),
            source: dir.path().to_path_buf(),
        };
        assert!(matches!(
            check_files(&spec_with(vec![a_dir], None)),
            Err(RunError::Usage(_))
        ));
        let limits = OutputLimits {
            dir: dir.path().join("nope"),
            max_files: 1,
            max_file_bytes: 1,
            max_total_bytes: 1,
        };
        assert!(matches!(
            check_files(&spec_with(vec![], Some(limits))),
            Err(RunError::Usage(_))
        ));
    }

    /// The JSON result keeps its shape plus the output fields; the host path stays out.
    #[test]
    fn outcome_json_has_output_files_without_host_paths() {
        let f = OutputFile {
            name: "sub/b.bin".into(),
            bytes: 5,
            mode: 0o644,
            host_path: "/secret/0".into(),
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "sub/b.bin", "bytes": 5, "mode": 420})
        );
        let s = SkippedOutput {
            name: "big".into(),
            bytes: 9,
            reason: SkipReason::TotalTooLarge,
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap()["reason"],
            "total_too_large"
        );
    }

    #[test]
    fn kvm_verdicts_are_per_backend() {
        let cache = tempfile::tempdir().unwrap();
        let r = Runner::new(RunnerOptions::for_host().unwrap(), cache.path());
        assert_eq!(r.kvm_verdict_of(FIRECRACKER), None);
        r.record_verdict(FIRECRACKER, false, "KVM_EXIT_INTERNAL_ERROR");
        assert_eq!(
            r.kvm_verdict_of(FIRECRACKER),
            Some((false, "KVM_EXIT_INTERNAL_ERROR".into()))
        );
        assert_eq!(
            r.kvm_verdict(),
            None,
            "QEMU-KVM is not judged by Firecracker"
        );
        r.record_verdict(QEMU_KVM, false, "emulation failure");
        r.record_verdict(QEMU_KVM, true, "a probe boot reached the agent");
        assert_eq!(
            r.kvm_verdict().map(|v| v.0),
            Some(true),
            "a success overwrites"
        );
        assert_eq!(r.kvm_verdict_of(FIRECRACKER).map(|v| v.0), Some(false));
    }
}
