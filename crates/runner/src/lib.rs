//! Runs untrusted code in a fresh microVM: pick a backend, boot the language's image with the
//! guest kernel, wait for the agent, run, stream the output back, tear everything down.
//!
//! ```text
//! Runner::run ─▶ select backend (Firecracker | QEMU kvm | QEMU tcg, KVM proven by a boot)
//!             ─▶ Vm::start (own temp dir) ─▶ hello (boot timeout) ─▶ exec (streamed)
//!             ─▶ Vm::stop (kill, wait, remove dir) — on every path, error or not
//! ```

mod client;
mod error;
pub mod prepare;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use infra_protocol::{Exec, Exit};
use infra_vmm::{Accel, Backend, Vm, VmConfig};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

pub use client::{AgentClient, AgentInfo, Output, MAX_STRAY_FRAMES, OUTPUT_SLACK_BYTES};
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
    /// The agent binary that becomes the initramfs `/init` (this executable).
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
    /// Program wall time, seconds.
    pub exec_time: f64,
    /// Language key.
    pub lang: String,
    /// Boot-to-ready time, seconds.
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
        // The kernel holds the archive and its unpacked files at once while booting.
        let initramfs_mib = std::fs::metadata(initramfs)
            .map(|m| (m.len() >> 20) as u32)
            .unwrap_or(0);
        let floor = 2 * initramfs_mib + 128;
        if mem_mib < floor {
            return Err(RunError::Usage(format!(
                "--mem {mem_mib} is too small: the initramfs alone is {initramfs_mib} MiB; use at least {floor}"
            )));
        }
        let cfg = VmConfig {
            kernel: kernel.to_path_buf(),
            initramfs: initramfs.to_path_buf(),
            rootfs: rootfs.to_path_buf(),
            mem_mib,
            vcpus,
            extra_args: self.opts.extra_args.clone(),
            run_dir: self.opts.run_dir.clone(),
        };
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

    /// Boots a VM for `spec`, runs the program, streams its output to `on_output`, and tears
    /// the VM down (also when anything fails).
    pub async fn run(
        &self,
        spec: &RunSpec,
        initramfs: &Path,
        mut on_output: impl FnMut(Output),
    ) -> Result<RunOutcome, RunError> {
        check_code(&spec.code)?;
        check_timeout(spec.timeout)?;
        let started = Instant::now();
        let trace_id = format!("tr-{}", uuid::Uuid::new_v4().simple());
        let mut ready = self
            .boot(
                &spec.kernel,
                initramfs,
                &spec.rootfs,
                spec.mem_mib,
                spec.vcpus,
            )
            .await?;
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
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        // The agent enforces the timeout; this backstop only covers an agent or guest that
        // stops answering.
        let backstop = spec.timeout + Duration::from_secs(15);
        let result = {
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
            .await
        };
        let backend = ready.vm.backend().to_string();
        let accel = ready.vm.accel().to_string();
        let stop = ready.vm.stop().await;
        let exit: Exit = result?;
        stop?;
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
            lang: spec.lang.clone(),
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
        })
    }
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
    let mut vm = backend.start(cfg).await?;
    let endpoint = vm.endpoint().clone();
    let greet = async move {
        // Firecracker's vsock refuses until the guest listens: retry the connection.
        let stream = loop {
            match endpoint.connect().await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::trace!(error = %e, "agent not reachable yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let mut client = AgentClient::new(stream);
        let info = client.hello().await?;
        Ok::<_, RunError>((client, info))
    };
    let accel = vm.accel().to_string();
    let outcome = watch_vm(&mut vm, timeout, greet, |vm| {
        infra_vmm::VmError::BootTimeout {
            secs: timeout.as_secs(),
            backend: backend.name(),
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
