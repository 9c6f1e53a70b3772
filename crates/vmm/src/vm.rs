//! One running microVM, whatever VMM runs it: its process, its private directory, its
//! console log and the way to reach the agent inside.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::error::VmError;

/// Most bytes read from the end of a log the guest can write to (console, VMM stderr) when
/// an error quotes it. The file itself may be any size.
pub const LOG_TAIL_BYTES: u64 = 64 << 10;

/// The last `max` bytes of the file at `path` as text (lossy UTF-8, the first partial line
/// dropped when the file was cut); empty when it cannot be read.
pub fn read_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    // `take` bounds the read even if the file grows meanwhile.
    let _ = f.take(max).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    match text.split_once('\n') {
        Some((_, rest)) if start > 0 => rest.to_string(),
        _ => text,
    }
}

fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// CPU virtualisation used by QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (slow, works everywhere).
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What to boot. The same kernel, initramfs and image boot under every backend.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Initramfs with the agent as `/init` (see `initramfs`).
    pub initramfs: PathBuf,
    /// ext4 image, attached read-only as the first virtio-blk disk (`/dev/vda`).
    pub rootfs: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u8,
    /// Kernel command line extras, appended to the backend's own console/reboot arguments.
    pub extra_args: String,
    /// Where VM directories are created (short: Unix socket paths are limited to 107 bytes).
    pub run_dir: PathBuf,
}

/// How the host reaches the agent.
#[derive(Debug, Clone)]
pub enum AgentEndpoint {
    /// A Unix socket that is the agent's byte stream (QEMU virtio-serial chardev).
    Stream(PathBuf),
    /// Firecracker's hybrid vsock: connect, send `CONNECT port\n`, expect `OK ...\n`.
    HybridVsock {
        /// The vsock device's `uds_path`.
        uds: PathBuf,
        /// Guest port (5000).
        port: u32,
    },
}

impl AgentEndpoint {
    /// Opens a byte stream to the agent. For QEMU this succeeds as soon as QEMU listens;
    /// bytes wait in the socket until the agent opens its port.
    pub async fn connect(&self) -> Result<UnixStream, VmError> {
        match self {
            AgentEndpoint::Stream(path) => UnixStream::connect(path)
                .await
                .map_err(|e| VmError::io(format!("connect to {}", path.display()), e)),
            AgentEndpoint::HybridVsock { uds, port } => hybrid_vsock_connect(uds, *port).await,
        }
    }
}

/// A started VM. Dropping it kills the VMM and removes its directory; [`Vm::stop`] does the
/// same and waits for the process, so nothing is left behind.
#[derive(Debug)]
pub struct Vm {
    pub(crate) backend: &'static str,
    pub(crate) accel: String,
    pub(crate) child: crate::process::VmProcess,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) console: PathBuf,
    /// The VMM's own stderr when it is not the console (QEMU).
    pub(crate) vmm_log: Option<PathBuf>,
    pub(crate) endpoint: AgentEndpoint,
    /// The VMM's control channel (snapshots).
    pub(crate) control: Control,
    /// Firecracker's jail, removed after the VMM is killed (fields drop in order).
    pub(crate) _jail: Option<crate::firecracker::JailGuard>,
    /// The VMM's own uid, released last.
    pub(crate) _uid: Option<crate::uid::UidLease>,
}

/// How the host controls a running VMM.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    /// QEMU's QMP socket.
    Qmp(PathBuf),
    /// Firecracker's API socket, where its files are on the host, and the same directory as
    /// Firecracker sees it (`/` in a jail).
    Firecracker {
        api: PathBuf,
        files: PathBuf,
        guest_dir: PathBuf,
    },
}

/// Agent port inside the guest (vsock), same number as the seeds' service.
pub const AGENT_PORT: u32 = 5000;

impl Vm {
    /// `qemu` or `firecracker`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Acceleration in use (`kvm`, `tcg`).
    pub fn accel(&self) -> &str {
        &self.accel
    }

    /// The VM's private directory (sockets, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The VMM's pid (for tests that kill it to check fault handling).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// How to reach the agent (cloneable, so a connection attempt need not borrow the VM).
    pub fn endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }

    /// `Some(status)` once the VMM process has exited.
    pub fn exited(&mut self) -> Option<String> {
        self.child.try_wait()
    }

    /// Waits up to `limit` for the VMM to exit; `true` if it did. A dropped agent
    /// connection usually means the VM is going down: this tells the two apart.
    pub async fn exited_within(&mut self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, self.child.wait()).await.is_ok()
    }

    /// The last `lines` lines of the guest's serial console (kernel messages, panics). Only
    /// the last [`LOG_TAIL_BYTES`] of the file are read: the guest writes it, so its size is
    /// not ours to trust.
    pub fn console_tail(&self, lines: usize) -> String {
        last_lines(&read_tail(&self.console, LOG_TAIL_BYTES), lines)
    }

    /// The error to report when the VMM died under us.
    pub fn exited_error(&mut self) -> VmError {
        let status = self.exited().unwrap_or_else(|| "still running".into());
        let said = self
            .vmm_log
            .as_ref()
            .map(|p| read_tail(p, LOG_TAIL_BYTES))
            .map(|t| {
                let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
                lines[lines.len().saturating_sub(2)..].join(" / ")
            })
            .filter(|t| !t.is_empty())
            .map(|t| format!(": {t}"))
            .unwrap_or_default();
        let tail = self.console_tail(20);
        VmError::Exited {
            status,
            vmm_said: said,
            console: if tail.trim().is_empty() {
                String::new()
            } else {
                format!("; last console lines:\n{tail}")
            },
        }
    }

    /// Pauses the VM and writes its state into `dest`, an existing empty directory: QEMU's
    /// migration stream ([`crate::qemu::STATE_FILE`], passed to QEMU as a descriptor and
    /// written with `migrate fd:`), or Firecracker's full snapshot
    /// ([`crate::firecracker::STATE_FILE`] and [`crate::firecracker::MEMORY_FILE`], written by
    /// `PUT /snapshot/create` and moved out of the jail). The files are fsynced. The VM stays
    /// paused: stop it afterwards. Returns the names of the files written.
    pub async fn save_snapshot(&mut self, dest: &Path) -> Result<Vec<&'static str>, VmError> {
        match self.control.clone() {
            Control::Qmp(sock) => {
                use std::os::unix::fs::OpenOptionsExt;
                let name = crate::qemu::STATE_FILE;
                let path = dest.join(name);
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| VmError::io(format!("create {}", path.display()), e))?;
                tokio::task::spawn_blocking(move || {
                    let mut q =
                        crate::qmp::Qmp::connect(&sock, std::time::Duration::from_secs(10))?;
                    q.execute("stop", None)?;
                    // QEMU throttles migrations to 128 MiB/s by default; this one is a local file.
                    q.execute(
                        "migrate-set-parameters",
                        Some(serde_json::json!({"max-bandwidth": 1u64 << 40})),
                    )?;
                    q.execute_with_fd(
                        "getfd",
                        Some(serde_json::json!({"fdname": "snapshot"})),
                        Some(std::os::fd::AsFd::as_fd(&file)),
                    )?;
                    q.execute("migrate", Some(serde_json::json!({"uri": "fd:snapshot"})))?;
                    q.wait_migration(crate::qemu::MIGRATION_LIMIT)?;
                    file.sync_all()
                        .map_err(|e| VmError::io(format!("fsync {}", path.display()), e))
                })
                .await
                .map_err(|e| VmError::io("QMP task", std::io::Error::other(e)))??;
                Ok(vec![name])
            }
            Control::Firecracker {
                api,
                files,
                guest_dir,
            } => {
                for call in crate::firecracker::Firecracker::snapshot_calls(&guest_dir) {
                    crate::firecracker::api_request(&api, &call).await?;
                }
                let names = vec![
                    crate::firecracker::STATE_FILE,
                    crate::firecracker::MEMORY_FILE,
                ];
                for name in &names {
                    let (from, to) = (files.join(name), dest.join(name));
                    if std::fs::rename(&from, &to).is_err() {
                        std::fs::copy(&from, &to).map_err(|e| {
                            VmError::io(format!("copy {} to {}", from.display(), to.display()), e)
                        })?;
                        let _ = std::fs::remove_file(&from);
                    }
                    std::fs::File::open(&to)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| VmError::io(format!("fsync {}", to.display()), e))?;
                }
                Ok(names)
            }
        }
    }

    /// Kills the VMM, waits for it and removes the VM directory. The guest holds nothing
    /// worth a clean shutdown: its disk is read-only and its writes live in RAM.
    pub async fn stop(mut self) -> Result<(), VmError> {
        self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        let Vm { dir, .. } = self;
        dir.close()
            .map_err(|e| VmError::io("remove the VM directory", e))
    }
}

/// Firecracker's host side of vsock: a Unix socket that forwards to a guest port after a
/// one-line handshake.
pub async fn hybrid_vsock_connect(uds: &Path, port: u32) -> Result<UnixStream, VmError> {
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|e| VmError::io(format!("connect to vsock socket {}", uds.display()), e))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| VmError::io("vsock handshake", e))?;
    // Read the reply byte by byte: anything after the newline belongs to the agent.
    let mut line = Vec::new();
    let mut reader = BufReader::with_capacity(1, &mut s);
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| VmError::io("vsock handshake", e))?;
    let text = String::from_utf8_lossy(&line);
    if !text.starts_with("OK ") {
        return Err(VmError::io(
            "vsock handshake",
            std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!(
                    "guest port {port} answered {:?} (agent not listening yet?)",
                    text.trim()
                ),
            ),
        ));
    }
    Ok(s)
}

/// Creates the VM directory.
pub(crate) fn vm_dir(run_dir: &Path) -> Result<tempfile::TempDir, VmError> {
    infra_config::ensure_dir(run_dir, infra_config::TRAVERSE_DIR)?;
    // A run directory made 0700 by an earlier version: VMMs under their own uids need search.
    let mode = std::fs::metadata(run_dir)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0);
    if mode & 0o011 != 0o011 {
        std::fs::set_permissions(
            run_dir,
            std::os::unix::fs::PermissionsExt::from_mode(mode | 0o011),
        )
        .map_err(|e| VmError::io(format!("chmod {}", run_dir.display()), e))?;
    }
    tempfile::Builder::new()
        .prefix("vm-")
        .tempdir_in(run_dir)
        .map_err(|e| VmError::io(format!("create a VM directory in {}", run_dir.display()), e))
}

/// Spawns a VMM with its output going to `log`, in its own process group, and killed by the
/// kernel if we die first (so a crashed or killed runner never leaves a VM running).
pub(crate) fn spawn(mut cmd: Command, log: &Path) -> std::io::Result<Child> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Finds an executable: an explicit path, else `PATH` and the sbin directories.
pub fn find_binary(explicit: Option<&Path>, name: &str) -> Option<PathBuf> {
    match explicit {
        Some(p) => p.is_file().then(|| p.to_path_buf()),
        None => infra_config::find_executable(name),
    }
}

/// Kernel arguments that skip initcalls that only wait on these machines: `cmos_init`
/// probes an RTC that microVMs do not have (about 1 s under TCG), the kdf108 self-test
/// costs 0.2 s. Kernels without these initcalls ignore the names. `init_on_free=1` zeroes
/// pages as the guest frees them (the unpacked initramfs archive, exited programs), so a
/// snapshot's memory is mostly zero pages, which QEMU's migration stream stores in a few
/// bytes each and compression removes: 177 MB → 121 MB for an idle Python VM of 512 MiB.
pub const FAST_BOOT_ARGS: &str = "initcall_blacklist=cmos_init,crypto_kdf108_init init_on_free=1";

/// Kernel arguments that keep boots from hanging when the host is busy: the TSC rate and
/// delay-loop calibration are given instead of measured (a measurement against the PIT
/// fails under load in TCG, marks the TSC unstable, and the boot stalls for minutes).
pub fn timer_args() -> String {
    let khz = host_tsc_khz();
    match khz {
        Some(khz) => format!(
            "tsc_early_khz={khz} lpj={} tsc=reliable no_timer_check",
            khz * 1000 / 250
        ),
        None => "tsc=reliable no_timer_check".into(),
    }
}

fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 100.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that floods its console cannot make the host read the whole file.
    #[test]
    fn read_tail_reads_only_the_end_of_a_huge_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let f = std::fs::File::create(&p).unwrap();
        // 4 GiB, sparse: reading it all would take seconds and gigabytes.
        f.set_len(4 << 30).unwrap();
        drop(f);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, b"\nkernel panic line 1\nlast line\n").unwrap();
        let t = read_tail(&p, LOG_TAIL_BYTES);
        assert!(t.len() as u64 <= LOG_TAIL_BYTES, "{}", t.len());
        assert_eq!(last_lines(&t, 2), "kernel panic line 1\nlast line");
        assert_eq!(read_tail(&dir.path().join("missing"), 10), "");
        std::fs::write(&p, "short\nlog").unwrap();
        assert_eq!(read_tail(&p, LOG_TAIL_BYTES), "short\nlog");
    }
}
