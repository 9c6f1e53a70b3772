//! Firecracker: configured through its REST API on a Unix socket, agent reached through its
//! hybrid vsock. Written against Firecracker's published API (swagger `firecracker.yaml`,
//! `docs/vsock.md`, `docs/jailer.md`); our CI hosts cannot run it (no usable KVM), so the
//! requests are tested against a recording server, not a real Firecracker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::process::Command;

use crate::error::VmError;
use crate::process::{PidfdProcess, VmProcess};
use crate::uid::UidRange;
use crate::vm::{spawn, vm_dir, AgentEndpoint, Vm, VmConfig, AGENT_PORT, FAST_BOOT_ARGS};

/// Guest context id of the VM's vsock device (any value ≥ 3 works; each VM has its own
/// device, so they do not clash).
pub const GUEST_CID: u32 = 3;

/// The jailer (chroot, cgroups, uid/gid drop) in front of Firecracker.
#[derive(Debug, Clone)]
pub struct Jailer {
    /// `jailer` binary.
    pub binary: PathBuf,
    /// Each VM runs as its own uid (and gid of the same number) from this range.
    pub uids: UidRange,
    /// `--chroot-base-dir` (jailer default `/srv/jailer`).
    pub chroot_base: PathBuf,
    /// Memory and pid limits through the jailer's cgroup options; `None` when the host has
    /// no memory and pids controllers (see [`Cgroups::detect`]).
    pub cgroups: Option<Cgroups>,
}

/// The cgroup hierarchy the jailer places each VM in: `<controller root>/infra-operator/<id>`,
/// with `memory` capped at the guest's memory plus [`VMM_OVERHEAD_MIB`] and `pids` at
/// [`VMM_TASKS`] plus one per vCPU, so a compromised VMM can neither take the host's memory nor
/// fork-bomb it. The jailer creates the cgroup; the VM's guard removes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cgroups {
    /// 1 (a controller per hierarchy) or 2 (unified).
    pub version: u8,
    /// Where the VMs' cgroups go, one per hierarchy that holds `memory` or `pids`
    /// (`<mount>/infra-operator`).
    pub parents: Vec<PathBuf>,
}

/// `--parent-cgroup`: our VMs' cgroups, below each controller's root.
pub const PARENT_CGROUP: &str = "infra-operator";

/// Memory a Firecracker process needs beyond the guest's RAM (its own code, buffers and the
/// page cache of the files it reads; Firecracker documents under 5 MiB for the VMM itself).
pub const VMM_OVERHEAD_MIB: u64 = 128;

/// Tasks a Firecracker process needs besides its vCPU threads (main, API, and spare).
pub const VMM_TASKS: u32 = 16;

impl Cgroups {
    /// The host's cgroups as the jailer would find them in `/proc/mounts`: version 2 when the
    /// unified hierarchy holds the `memory` and `pids` controllers, else version 1 when both
    /// have their own hierarchy, else none (then VMs run without cgroup limits, with a warning
    /// at start).
    pub fn detect() -> Option<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        Self::from_mounts(&mounts, |p| std::fs::read_to_string(p).ok())
    }

    fn from_mounts(mounts: &str, read: impl Fn(&Path) -> Option<String>) -> Option<Self> {
        let mut v1 = Vec::new();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(dir), Some(fs), Some(opts)) = (f.get(1), f.get(2), f.get(3)) else {
                continue;
            };
            let dir = Path::new(dir);
            match *fs {
                "cgroup2" => {
                    let ctl = read(&dir.join("cgroup.controllers")).unwrap_or_default();
                    let ctl: Vec<&str> = ctl.split_whitespace().collect();
                    if ctl.contains(&"memory") && ctl.contains(&"pids") {
                        return Some(Cgroups {
                            version: 2,
                            parents: vec![dir.join(PARENT_CGROUP)],
                        });
                    }
                }
                "cgroup" => {
                    let opts: Vec<&str> = opts.split(',').collect();
                    for c in ["memory", "pids"] {
                        if opts.contains(&c) {
                            v1.push((c, dir.join(PARENT_CGROUP)));
                        }
                    }
                }
                _ => {}
            }
        }
        let has = |c: &str| v1.iter().any(|(n, _)| *n == c);
        (has("memory") && has("pids")).then(|| {
            let mut parents: Vec<PathBuf> = v1.into_iter().map(|(_, p)| p).collect();
            parents.dedup();
            Cgroups {
                version: 1,
                parents,
            }
        })
    }

    /// The jailer's cgroup arguments for a VM.
    pub fn jailer_args(&self, cfg: &VmConfig) -> Vec<String> {
        let bytes = (u64::from(cfg.mem_mib) + VMM_OVERHEAD_MIB) * 1024 * 1024;
        let mem_file = if self.version == 2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        vec![
            "--cgroup-version".into(),
            self.version.to_string(),
            "--parent-cgroup".into(),
            PARENT_CGROUP.into(),
            "--cgroup".into(),
            format!("{mem_file}={bytes}"),
            "--cgroup".into(),
            format!("pids.max={}", VMM_TASKS + u32::from(cfg.vcpus)),
        ]
    }
}

/// Prefix of the jail ids we create: `infra-<runner pid>-<n>`, so stale jails of dead runners
/// can be found and removed.
const JAIL_PREFIX: &str = "infra-";

/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Removes a jail directory when dropped (the VM stopped, failed to start, or the runner is
/// unwinding).
#[derive(Debug)]
pub(crate) struct JailGuard {
    pub(crate) jail: PathBuf,
    /// The VM's cgroup directories (removed once the VMM's tasks are gone).
    pub(crate) cgroups: Vec<PathBuf>,
}

impl Drop for JailGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.jail) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(jail = %self.jail.display(), error = %e, "cannot remove the jail");
            }
        }
        for cg in &self.cgroups {
            remove_cgroup(cg);
        }
    }
}

/// Removes a cgroup directory (rmdir: the kernel refuses while tasks remain, so a VMM that is
/// still exiting gets a short grace).
fn remove_cgroup(cg: &Path) {
    for attempt in 0..50 {
        match std::fs::remove_dir(cg) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if attempt == 49 => {
                tracing::warn!(cgroup = %cg.display(), error = %e, "cannot remove the VM's cgroup");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removes the cgroups of VMs whose runner process is gone (`<parent>/infra-<pid>-…`).
fn remove_stale_cgroups(parents: &[PathBuf]) {
    for parent in parents {
        for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if runner_pid(&name).is_some_and(|pid| !alive(pid)) {
                remove_cgroup(&e.path());
            }
        }
    }
}

/// The runner pid in a jail id `infra-<pid>-<n>`.
fn runner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(JAIL_PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|p| p.parse::<i32>().ok())
        .filter(|p| *p > 0)
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .map_or_else(|e| e != nix::errno::Errno::ESRCH, |_| true)
}

/// Removes jails under `exec_dir` whose runner process is gone (a runner killed with SIGKILL
/// cannot clean up, and the jailer's uid change drops the parent-death signal).
pub fn remove_stale_jails(exec_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(exec_dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = runner_pid(&name) else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        // Firecracker outlives its runner (it is the jailer's child, in its own PID
        // namespace): kill it first, held by pidfd and checked to be chrooted in this jail.
        let root = e.path().join("root");
        for f in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".pid") {
                continue;
            }
            let pid = read_small_nofollow(&f.path())
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok());
            if let Some(p) = pid.and_then(|pid| PidfdProcess::adopt(pid, &root).ok()) {
                tracing::info!(jail = %e.path().display(), "killing the Firecracker of a runner that died");
                drop(p); // kills it
            }
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Refuses a Unix socket path the kernel cannot bind or connect to.
pub fn check_socket_path(path: &Path) -> Result<(), VmError> {
    check_socket_path_of("firecracker", path)
}

/// Refuses a Unix socket path of `backend` the kernel cannot bind or connect to, before the
/// VMM starts (a connect to it would fail on every attempt until the boot limit).
pub fn check_socket_path_of(backend: &'static str, path: &Path) -> Result<(), VmError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmError::Start {
            backend,
            detail: format!(
                "socket path {} is {len} bytes, over the {MAX_SOCKET_PATH} a Unix socket allows; use a shorter --chroot-base-dir or run directory (INFRA_OPERATOR_HOME)",
                path.display()
            ),
        });
    }
    Ok(())
}

/// The last lines of a log file, on one line (for errors).
pub(crate) fn log_tail(path: &Path, max: u64) -> String {
    let text = crate::vm::read_tail(path, max);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// How to run Firecracker.
#[derive(Debug, Clone)]
pub struct Firecracker {
    /// `firecracker` binary.
    pub binary: PathBuf,
    /// Run it under the jailer.
    pub jailer: Option<Jailer>,
}

/// The device state file of a Firecracker snapshot.
pub const STATE_FILE: &str = "vmstate.snapshot";
/// The guest memory file of a Firecracker snapshot.
pub const MEMORY_FILE: &str = "mem.snapshot";

/// One API call: method, path, JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCall {
    /// `PUT`.
    pub method: &'static str,
    /// `/machine-config`, ...
    pub path: String,
    /// Request body.
    pub body: Value,
}

/// Paths as Firecracker sees them (inside the jail when jailed).
#[derive(Debug, Clone)]
pub struct GuestPaths {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Root filesystem image.
    pub rootfs: PathBuf,
    /// vsock Unix socket.
    pub vsock: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// Metrics file.
    pub metrics: PathBuf,
}

impl Firecracker {
    /// The kernel command line. Firecracker appends the virtio-mmio device list itself.
    pub fn boot_args(cfg: &VmConfig) -> String {
        // reboot=k: the guest's reboot reaches Firecracker through the i8042 reset line and
        // the VMM exits; pci=off: Firecracker has no PCI bus.
        let mut s = format!("console=ttyS0 quiet panic=-1 reboot=k pci=off {FAST_BOOT_ARGS}");
        if !cfg.extra_args.is_empty() {
            s.push(' ');
            s.push_str(&cfg.extra_args);
        }
        s
    }

    /// The API calls that configure and start a VM, in order.
    pub fn api_calls(cfg: &VmConfig, p: &GuestPaths) -> Vec<ApiCall> {
        Self::api_calls_with(Some(cfg), p)
    }

    /// Logging and metrics, then (with `cfg`) the machine, boot source, drive, vsock, start.
    fn api_calls_with(cfg: Option<&VmConfig>, p: &GuestPaths) -> Vec<ApiCall> {
        let put = |path: &str, body: Value| ApiCall {
            method: "PUT",
            path: path.to_string(),
            body,
        };
        let mut calls = vec![
            put(
                "/logger",
                json!({"log_path": p.log, "level": "Warning", "show_level": true, "show_log_origin": false}),
            ),
            put("/metrics", json!({"metrics_path": p.metrics})),
        ];
        let Some(cfg) = cfg else {
            return calls;
        };
        calls.extend([
            put(
                "/machine-config",
                json!({"vcpu_count": cfg.vcpus, "mem_size_mib": cfg.mem_mib, "smt": false}),
            ),
            put(
                "/boot-source",
                json!({
                    "kernel_image_path": p.kernel,
                    "initrd_path": p.initrd,
                    "boot_args": Self::boot_args(cfg),
                }),
            ),
            // Not the root device: the initramfs mounts it (read-only, under an overlay), so
            // Firecracker must not add its own `root=` argument.
            put(
                "/drives/rootfs",
                json!({
                    "drive_id": "rootfs",
                    "path_on_host": p.rootfs,
                    "is_root_device": false,
                    "is_read_only": true,
                }),
            ),
            put(
                "/vsock",
                json!({"guest_cid": GUEST_CID, "uds_path": p.vsock}),
            ),
            put("/actions", json!({"action_type": "InstanceStart"})),
        ]);
        calls
    }

    /// The API calls that load a snapshot into a fresh Firecracker and resume it: logging,
    /// then `PUT /snapshot/load` (no machine configuration: it comes from the snapshot).
    pub fn restore_calls(p: &GuestPaths) -> Vec<ApiCall> {
        let dir = p.log.parent().unwrap_or(Path::new("/"));
        let mut calls = Self::api_calls_logging(p);
        calls.push(ApiCall {
            method: "PUT",
            path: "/snapshot/load".into(),
            body: json!({
                "snapshot_path": dir.join(STATE_FILE),
                "mem_backend": {"backend_type": "File", "backend_path": dir.join(MEMORY_FILE)},
                "enable_diff_snapshots": false,
                "resume_vm": true,
            }),
        });
        calls
    }

    /// The API calls that pause a VM and write a full snapshot of it into `dir` (a directory
    /// as Firecracker sees it).
    pub fn snapshot_calls(dir: &Path) -> Vec<ApiCall> {
        vec![
            ApiCall {
                method: "PATCH",
                path: "/vm".into(),
                body: json!({"state": "Paused"}),
            },
            ApiCall {
                method: "PUT",
                path: "/snapshot/create".into(),
                body: json!({
                    "snapshot_type": "Full",
                    "snapshot_path": dir.join(STATE_FILE),
                    "mem_file_path": dir.join(MEMORY_FILE),
                }),
            },
        ]
    }

    fn api_calls_logging(p: &GuestPaths) -> Vec<ApiCall> {
        Self::api_calls_with(None, p)
    }

    /// The jailer's argv and the jail directory it will create (`<base>/<exec name>/<id>`),
    /// computed as the jailer computes it: from the canonical exec file and chroot base.
    pub fn jailer_command(
        j: &Jailer,
        firecracker: &Path,
        id: &str,
        uid: u32,
    ) -> Result<(Vec<String>, PathBuf), VmError> {
        let canon = |p: &Path| {
            std::fs::canonicalize(p).map_err(|e| VmError::io(format!("resolve {}", p.display()), e))
        };
        let exec = canon(firecracker)?;
        let base = canon(&j.chroot_base)?;
        let exec_name = exec
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into());
        let jail = base.join(&exec_name).join(id);
        let argv = vec![
            "--id".into(),
            id.into(),
            "--exec-file".into(),
            exec.display().to_string(),
            "--uid".into(),
            uid.to_string(),
            "--gid".into(),
            uid.to_string(),
            "--chroot-base-dir".into(),
            base.display().to_string(),
            // Firecracker as init of its own PID namespace: it sees no host process, and the
            // jailer exits once it has written Firecracker's pid (see `adopt_jailed`).
            "--new-pid-ns".into(),
            "--".into(),
            "--api-sock".into(),
            "/api.sock".into(),
        ];
        Ok((argv, jail))
    }

    /// Starts Firecracker, configures the VM through the API and starts it.
    pub async fn start(&self, cfg: &VmConfig) -> Result<Vm, VmError> {
        self.launch(cfg, None).await
    }

    /// Starts a VM from a snapshot in `snapshot_dir` ([`STATE_FILE`] and [`MEMORY_FILE`],
    /// written by [`Vm::save_snapshot`] from a VM of the same `cfg`): the files are placed in
    /// a fresh jail and loaded with `PUT /snapshot/load` (resumed). Needs the jailer: a
    /// snapshot records the paths of the drive and the vsock socket, which only a jail keeps
    /// the same from one VM to the next.
    pub async fn restore(&self, cfg: &VmConfig, snapshot_dir: &Path) -> Result<Vm, VmError> {
        if self.jailer.is_none() {
            return Err(VmError::Snapshot {
                backend: "firecracker",
                detail: "restoring needs the jailer (a snapshot records the drive and vsock paths, which only a jail keeps stable); install `jailer` beside `firecracker`".into(),
            });
        }
        self.launch(cfg, Some(snapshot_dir)).await
    }

    async fn launch(&self, cfg: &VmConfig, restore: Option<&Path>) -> Result<Vm, VmError> {
        let dir = vm_dir(&cfg.run_dir)?;
        let id = format!(
            "{JAIL_PREFIX}{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|n| n
                    .to_string_lossy()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), ""))
                .unwrap_or_default()
        );
        let console = dir.path().join("console.log");
        let mut jail_guard = None;
        let mut lease = None;
        let mut jail_root = None;
        let (cmd, api_sock, guest, host_vsock, fc_log) = match &self.jailer {
            None => {
                let mut cmd = Command::new(&self.binary);
                let api = dir.path().join("api.sock");
                cmd.arg("--api-sock").arg(&api).arg("--id").arg(&id);
                let g = GuestPaths {
                    kernel: cfg.kernel.clone(),
                    initrd: cfg.initramfs.clone(),
                    rootfs: cfg.rootfs.clone(),
                    vsock: dir.path().join("vsock.sock"),
                    log: dir.path().join("firecracker.log"),
                    metrics: dir.path().join("metrics.json"),
                };
                for f in [&g.log, &g.metrics] {
                    std::fs::File::create(f).map_err(|e| VmError::io("create log files", e))?;
                }
                let vsock = g.vsock.clone();
                let log = g.log.clone();
                (cmd, api, g, vsock, log)
            }
            Some(j) => {
                std::fs::create_dir_all(&j.chroot_base)
                    .map_err(|e| VmError::io(format!("create {}", j.chroot_base.display()), e))?;
                let l = crate::uid::lease(j.uids, &cfg.run_dir.join(crate::uid::LEASE_DIR))?;
                let uid = l.uid();
                lease = Some(l);
                let (mut argv, jail) = Self::jailer_command(j, &self.binary, &id, uid)?;
                if let Some(exec_dir) = jail.parent() {
                    let n = remove_stale_jails(exec_dir);
                    if n > 0 {
                        tracing::info!(removed = n, "removed jails of runners that died");
                    }
                }
                let mut cgroups = Vec::new();
                match &j.cgroups {
                    Some(cg) => {
                        remove_stale_cgroups(&cg.parents);
                        // Jailer options go before the `--` that starts Firecracker's own.
                        let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
                        argv.splice(at..at, cg.jailer_args(cfg));
                        cgroups = cg.parents.iter().map(|p| p.join(&id)).collect();
                    }
                    None => tracing::warn!(
                        "no memory and pids cgroup controllers on this host: Firecracker runs without cgroup limits"
                    ),
                }
                let root = jail.join("root");
                check_socket_path(&root.join("api.sock"))?;
                check_socket_path(&root.join(format!("vsock.sock_{AGENT_PORT}")))?;
                jail_guard = Some(JailGuard {
                    jail: jail.clone(),
                    cgroups,
                });
                // The jail sees only what is placed in its root, and Firecracker runs there as
                // `uid`: every file must be readable by it without changing the originals.
                std::fs::create_dir_all(&root)
                    .map_err(|e| VmError::io(format!("create jail {}", root.display()), e))?;
                for (src, name) in [
                    (&cfg.kernel, "vmlinux"),
                    (&cfg.initramfs, "initrd"),
                    (&cfg.rootfs, "rootfs.ext4"),
                ] {
                    crate::uid::place_for(src, &root.join(name), uid)?;
                }
                for name in ["firecracker.log", "metrics.json"] {
                    let p = root.join(name);
                    std::fs::File::create(&p).map_err(|e| VmError::io("create log files", e))?;
                    crate::uid::chown(&p, uid)?;
                }
                if let Some(snap) = restore {
                    for name in [STATE_FILE, MEMORY_FILE] {
                        crate::uid::place_for(&snap.join(name), &root.join(name), uid)?;
                    }
                }
                let mut cmd = Command::new(&j.binary);
                cmd.args(&argv);
                let g = GuestPaths {
                    kernel: "/vmlinux".into(),
                    initrd: "/initrd".into(),
                    rootfs: "/rootfs.ext4".into(),
                    vsock: "/vsock.sock".into(),
                    log: "/firecracker.log".into(),
                    metrics: "/metrics.json".into(),
                };
                let log = root.join("firecracker.log");
                let exec_name = jail
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "firecracker".into());
                jail_root = Some((root.clone(), exec_name));
                (cmd, root.join("api.sock"), g, root.join("vsock.sock"), log)
            }
        };
        check_socket_path(&api_sock)?;
        // Where Firecracker's files are on the host (the jail root, else the VM directory).
        let files_host = jail_root
            .as_ref()
            .map(|(root, _)| root.clone())
            .unwrap_or_else(|| dir.path().to_path_buf());
        let child = spawn(cmd, &console).map_err(|e| VmError::Start {
            backend: "firecracker",
            detail: format!("cannot run {}: {e}", self.binary.display()),
        })?;
        let said = |console: &Path| {
            let mut parts = vec![log_tail(console, 4096), log_tail(&fc_log, 4096)];
            parts.retain(|p| !p.is_empty());
            if parts.is_empty() {
                String::new()
            } else {
                format!("; firecracker said: {}", parts.join(" / "))
            }
        };
        let mut child = match jail_root {
            None => VmProcess::Child(child),
            Some((root, exec_name)) => match adopt_jailed(child, &root, &exec_name).await {
                Ok(p) => VmProcess::Pidfd(p),
                Err(detail) => {
                    return Err(VmError::Start {
                        backend: "firecracker",
                        detail: format!("{detail}{}", said(&console)),
                    })
                }
            },
        };
        // The socket file can exist before Firecracker accepts on it: connect until it answers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if UnixStream::connect(&api_sock).await.is_ok() {
                break;
            }
            if let Some(st) = child.try_wait() {
                return Err(VmError::Start {
                    backend: "firecracker",
                    detail: format!("exited with {st}{}", said(&console)),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmError::Start {
                    backend: "firecracker",
                    detail: format!(
                        "its API socket {} did not accept connections within 5 s{}",
                        api_sock.display(),
                        said(&console)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let calls = match restore {
            None => Self::api_calls(cfg, &guest),
            Some(_) => Self::restore_calls(&guest),
        };
        for call in calls {
            if let Err(e) = api_request(&api_sock, &call).await {
                child.start_kill();
                let extra = said(&console);
                return Err(match e {
                    VmError::Api {
                        method,
                        path,
                        status,
                        body,
                    } => VmError::Api {
                        method,
                        path,
                        status,
                        body: format!("{body}{extra}"),
                    },
                    other => other,
                });
            }
        }
        Ok(Vm {
            backend: "firecracker",
            accel: "kvm".into(),
            child,
            dir,
            console,
            vmm_log: Some(fc_log),
            endpoint: AgentEndpoint::HybridVsock {
                uds: host_vsock,
                port: AGENT_PORT,
            },
            control: crate::vm::Control::Firecracker {
                api: api_sock,
                files: files_host,
                guest_dir: guest
                    .log
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("/")),
            },
            _jail: jail_guard,
            _uid: lease,
        })
    }
}

/// How long the jailer may take to set up the jail and start Firecracker.
const JAILER_SETUP: Duration = Duration::from_secs(10);

/// Waits for the jailer (started with `--new-pid-ns`) to exit after it has started Firecracker,
/// then takes hold of Firecracker through a pidfd, from the pid the jailer wrote to
/// `<root>/<exec name>.pid` (checked: the process must be chrooted at `root`). The error is a
/// one-line detail.
async fn adopt_jailed(
    mut jailer: tokio::process::Child,
    root: &Path,
    exec_name: &str,
) -> Result<PidfdProcess, String> {
    match tokio::time::timeout(JAILER_SETUP, jailer.wait()).await {
        Ok(Ok(st)) if st.success() => {}
        Ok(Ok(st)) => return Err(format!("the jailer exited with {st}")),
        Ok(Err(e)) => return Err(format!("cannot wait for the jailer: {e}")),
        Err(_) => {
            return Err(format!(
                "the jailer did not start Firecracker within {} s (is --new-pid-ns supported by this jailer?)",
                JAILER_SETUP.as_secs()
            ))
        }
    }
    let pid_file = root.join(format!("{exec_name}.pid"));
    // The jail root belongs to the VM's uid: read the pid file without following links.
    let text = read_small_nofollow(&pid_file)
        .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{} holds no pid: {:?}", pid_file.display(), text.trim()))?;
    PidfdProcess::adopt(pid, root).map_err(|e| format!("cannot hold Firecracker (pid {pid}): {e}"))
}

/// Reads a short file (a pid) without following a symlink at its last component.
fn read_small_nofollow(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let mut s = String::new();
    f.take(64).read_to_string(&mut s)?;
    Ok(s)
}

/// Sends one API request over the Unix socket; a non-2xx answer becomes [`VmError::Api`] with
/// Firecracker's `fault_message`.
pub async fn api_request(sock: &Path, call: &ApiCall) -> Result<(), VmError> {
    let io_err = |e: std::io::Error| VmError::io(format!("firecracker API {}", call.path), e);
    let other = |e: String| io_err(std::io::Error::other(e));
    let stream = UnixStream::connect(sock).await.map_err(io_err)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| other(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(call.method)
        .uri(&call.path)
        .header("Host", "localhost")
        .header("Accept", "application/json")
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(call.body.to_string())))
        .map_err(|e| other(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| other(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| other(e.to_string()))?
        .to_bytes();
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body);
    let fault = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    Err(VmError::Api {
        method: call.method.into(),
        path: call.path.clone(),
        status: status.as_u16(),
        body: fault,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initrd".into(),
            rootfs: "/img/rootfs-python.ext4".into(),
            mem_mib: 512,
            vcpus: 1,
            extra_args: "infra.root=/dev/vda".into(),
            run_dir: "/tmp".into(),
        }
    }

    fn paths() -> GuestPaths {
        GuestPaths {
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            rootfs: "/img/rootfs-python.ext4".into(),
            vsock: "/run/vm/vsock.sock".into(),
            log: "/run/vm/fc.log".into(),
            metrics: "/run/vm/metrics.json".into(),
        }
    }

    #[test]
    fn api_calls_match_the_published_schema() {
        let calls = Firecracker::api_calls(&cfg(), &paths());
        let by_path = |p: &str| calls.iter().find(|c| c.path == p).unwrap().body.clone();
        assert_eq!(
            by_path("/machine-config"),
            json!({"vcpu_count": 1, "mem_size_mib": 512, "smt": false})
        );
        let boot = by_path("/boot-source");
        assert_eq!(boot["kernel_image_path"], "/k/vmlinux");
        assert_eq!(boot["initrd_path"], "/k/initrd");
        let args = boot["boot_args"].as_str().unwrap();
        assert!(
            args.contains("pci=off") && args.contains("reboot=k"),
            "{args}"
        );
        assert!(args.ends_with("infra.root=/dev/vda"), "{args}");
        let drive = by_path("/drives/rootfs");
        assert_eq!(drive["is_read_only"], true);
        assert_eq!(drive["drive_id"], "rootfs");
        assert_eq!(
            by_path("/vsock"),
            json!({"guest_cid": 3, "uds_path": "/run/vm/vsock.sock"})
        );
        // InstanceStart comes last: everything else is pre-boot only.
        assert_eq!(
            calls.last().unwrap().body,
            json!({"action_type": "InstanceStart"})
        );
        assert!(calls.iter().all(|c| c.method == "PUT"));
    }

    #[test]
    fn jailer_argv_and_chroot() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("firecracker-v1");
        std::fs::write(&real, b"").unwrap();
        std::os::unix::fs::symlink(&real, t.path().join("firecracker")).unwrap();
        let j = Jailer {
            binary: "/usr/bin/jailer".into(),
            uids: UidRange::default(),
            chroot_base: t.path().to_path_buf(),
            cgroups: None,
        };
        let (argv, jail) =
            Firecracker::jailer_command(&j, &t.path().join("firecracker"), "vm-a", 900_001)
                .unwrap();
        let base = std::fs::canonicalize(t.path()).unwrap();
        assert_eq!(jail, base.join("firecracker-v1/vm-a"));
        let s = argv.join(" ");
        assert!(
            s.starts_with(&format!(
                "--id vm-a --exec-file {} --uid 900001 --gid 900001",
                base.join("firecracker-v1").display()
            )),
            "{s}"
        );
        assert!(s.ends_with("--new-pid-ns -- --api-sock /api.sock"), "{s}");
    }

    #[test]
    fn cgroups_are_found_as_the_jailer_finds_them() {
        // This machine's layout: v1 controllers, an empty unified hierarchy beside them.
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
            cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        let none = |_: &Path| Some(String::new());
        let cg = Cgroups::from_mounts(hybrid, none).unwrap();
        assert_eq!(cg.version, 1);
        assert_eq!(
            cg.parents,
            [
                PathBuf::from("/sys/fs/cgroup/memory/infra-operator"),
                PathBuf::from("/sys/fs/cgroup/pids/infra-operator")
            ]
        );
        let args = cg.jailer_args(&cfg()).join(" ");
        assert_eq!(
            args,
            format!(
                "--cgroup-version 1 --parent-cgroup infra-operator --cgroup memory.limit_in_bytes={} --cgroup pids.max=17",
                (512 + 128) * 1024 * 1024
            )
        );
        // Unified with both controllers: version 2.
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        let ctl = |_: &Path| Some("cpuset cpu io memory hugetlb pids rdma\n".to_string());
        let cg = Cgroups::from_mounts(unified, ctl).unwrap();
        assert_eq!(cg.version, 2);
        assert!(cg
            .jailer_args(&cfg())
            .contains(&format!("memory.max={}", 640 << 20)));
        // No pids controller anywhere: no cgroups (and a warning at start).
        let partial = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(Cgroups::from_mounts(partial, none), None);
    }

    /// A one-connection HTTP server that records the request and answers with `status`.
    async fn serve_once(listener: tokio::net::UnixListener, status: &str, body: &str) -> String {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(h) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= h + 4 + len {
                    break;
                }
            }
        }
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[tokio::test]
    async fn api_request_sends_json_and_reports_faults() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let call = Firecracker::api_calls(&cfg(), &paths()).remove(2);
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve_once(l, "204 No Content", ""));
        api_request(&sock, &call).await.unwrap();
        let req = server.await.unwrap();
        assert!(req.starts_with("PUT /machine-config HTTP/1.1\r\n"), "{req}");
        assert!(
            req.ends_with(r#"{"mem_size_mib":512,"smt":false,"vcpu_count":1}"#),
            "{req}"
        );

        std::fs::remove_file(&sock).unwrap();
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve_once(
            l,
            "400 Bad Request",
            r#"{"fault_message":"The kernel file cannot be opened"}"#,
        ));
        let err = api_request(&sock, &call).await.unwrap_err().to_string();
        server.await.unwrap();
        assert!(
            err.contains("HTTP 400") && err.contains("kernel file cannot be opened"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn hybrid_vsock_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).await.unwrap();
            s.write_all(b"OK 1073741824\nfirst-agent-bytes")
                .await
                .unwrap();
            line
        });
        let mut s = crate::vm::hybrid_vsock_connect(&sock, 5000).await.unwrap();
        assert_eq!(&server.await.unwrap(), b"CONNECT 5000\n");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            rest, b"first-agent-bytes",
            "bytes after the OK line belong to the agent"
        );
    }
}
