//! QEMU `-M microvm`: the backend that works without Firecracker, and without KVM (TCG).
//!
//! The machine mirrors Firecracker's: virtio-mmio devices only, no PCI, no firmware, the
//! rootfs read-only on virtio-blk. The agent channel is a virtio-serial port named `agent`
//! backed by a Unix socket (vhost-vsock needs a host module that is often absent).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::error::VmError;
use crate::vm::{spawn, timer_args, vm_dir, Accel, AgentEndpoint, Vm, VmConfig, FAST_BOOT_ARGS};

/// Debian's package for the binary, named in errors.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// QEMU's seccomp sandbox, on for every VM: no obsolete syscalls, no privilege changes, no
/// fork/exec, no scheduler or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The file descriptor QEMU finds the rootfs on when it runs as a VM uid (`-add-fd`).
const ROOTFS_FD: i32 = 3;

/// The QMP socket in the VM directory.
pub(crate) const QMP_SOCKET: &str = "qmp.sock";

/// The single file a QEMU snapshot is: the migration stream (device state and memory; pages
/// that are all zeros take a few bytes each).
pub const STATE_FILE: &str = "vmstate.snapshot";

/// How long saving or loading a VM's state may take.
pub(crate) const MIGRATION_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The kernel and initramfs as placed in the VM directory for a VM uid.
const KERNEL: &str = "vmlinux";
const INITRD: &str = "initrd";

/// How to run QEMU.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// When set (the host runs as root), each QEMU runs as its own uid from this range: it is
    /// dropped to before exec, so the seccomp sandbox can deny privilege changes entirely.
    pub uids: Option<crate::uid::UidRange>,
}

impl Qemu {
    /// The argv for `cfg`, with sockets and logs under `dir`.
    pub fn command_line(&self, cfg: &VmConfig, dir: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        // rtc=off and the timer arguments: both were needed for boots that never hang under
        // load (see docs/architecture.md, "Kernel as Debian ships it").
        push("-M");
        push("microvm,x-option-roms=off,isa-serial=on,pit=on,pic=on,rtc=off");
        match self.accel {
            Accel::Kvm => {
                push("-accel");
                push("kvm");
                push("-cpu");
                push("host");
            }
            Accel::Tcg => {
                push("-accel");
                push("tcg");
                push("-cpu");
                push("max");
            }
        }
        for s in [
            "-m",
            &cfg.mem_mib.to_string(),
            "-smp",
            &cfg.vcpus.to_string(),
        ] {
            push(s);
        }
        for s in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            push(s);
        }
        push("-sandbox");
        push(SANDBOX);
        push("-chardev");
        a.push(chardev("file", "con", &dir.join("console.log")));
        let mut push = |s: &str| a.push(s.into());
        push("-serial");
        push("chardev:con");
        push("-kernel");
        a.push(cfg.kernel.clone().into());
        a.push("-initrd".into());
        a.push(cfg.initramfs.clone().into());
        a.push("-append".into());
        a.push(self.boot_args(cfg).into());
        a.push("-drive".into());
        let mut drive = OsString::from("id=rootfs,format=raw,if=none,readonly=on,file=");
        drive.push(escape_commas(&cfg.rootfs));
        a.push(drive);
        for s in [
            "-device",
            "virtio-blk-device,drive=rootfs",
            "-device",
            "virtio-serial-device",
        ] {
            a.push(s.into());
        }
        a.push("-chardev".into());
        let mut sock = chardev("socket", "agent", &dir.join("agent.sock"));
        sock.push(",server=on,wait=off");
        a.push(sock);
        a.push("-device".into());
        a.push("virtserialport,chardev=agent,name=agent".into());
        // QMP, for snapshots (stop, migrate to a passed descriptor, restore).
        a.push("-chardev".into());
        let mut qmp = chardev("socket", "qmp", &dir.join(QMP_SOCKET));
        qmp.push(",server=on,wait=off");
        a.push(qmp);
        a.push("-mon".into());
        a.push("chardev=qmp,mode=control".into());
        a
    }

    /// The kernel command line.
    pub fn boot_args(&self, cfg: &VmConfig) -> String {
        let mut s = format!("console=ttyS0 quiet panic=-1 reboot=t {FAST_BOOT_ARGS}");
        if self.accel == Accel::Tcg {
            s.push(' ');
            s.push_str(&timer_args());
        }
        if !cfg.extra_args.is_empty() {
            s.push(' ');
            s.push_str(&cfg.extra_args);
        }
        s
    }

    /// Starts the VM. Returns once QEMU runs; the agent is reached through [`Vm::connect`].
    pub async fn start(&self, cfg: &VmConfig) -> Result<Vm, VmError> {
        self.launch(cfg, false).await
    }

    /// Starts a VM from the state saved in `snapshot_dir` ([`STATE_FILE`], written by
    /// [`Vm::save_snapshot`] from a VM of the same `cfg`): QEMU starts with `-incoming defer`,
    /// is handed the state file as a descriptor (`getfd`, `migrate-incoming fd:`), loads it
    /// and is resumed. Returns once the guest runs again.
    pub async fn restore(&self, cfg: &VmConfig, snapshot_dir: &Path) -> Result<Vm, VmError> {
        let state = snapshot_dir.join(STATE_FILE);
        let file = std::fs::File::open(&state)
            .map_err(|e| VmError::io(format!("open {}", state.display()), e))?;
        let mut vm = self.launch(cfg, true).await?;
        let qmp = vm.dir.path().join(QMP_SOCKET);
        let loaded = tokio::task::spawn_blocking(move || {
            let mut q = crate::qmp::Qmp::connect(&qmp, std::time::Duration::from_secs(10))?;
            q.execute_with_fd(
                "getfd",
                Some(serde_json::json!({"fdname": "snapshot"})),
                Some(std::os::fd::AsFd::as_fd(&file)),
            )?;
            q.execute(
                "migrate-incoming",
                Some(serde_json::json!({"uri": "fd:snapshot"})),
            )?;
            q.wait_migration(MIGRATION_LIMIT)?;
            // The state was saved paused; run it.
            q.execute("cont", None)?;
            Ok::<_, VmError>(())
        })
        .await
        .map_err(|e| VmError::io("QMP task", std::io::Error::other(e)))?;
        if let Err(e) = loaded {
            // QEMU's own words (e.g. a section it cannot load) are in its log.
            let said = vm
                .vmm_log
                .as_deref()
                .map(|l| crate::vm::read_tail(l, 2048))
                .unwrap_or_default();
            let _ = vm
                .exited_within(std::time::Duration::from_millis(200))
                .await;
            let e = match e {
                VmError::Snapshot { backend, detail } if !said.trim().is_empty() => {
                    VmError::Snapshot {
                        backend,
                        detail: format!("{detail} (QEMU said: {})", said.trim()),
                    }
                }
                e => e,
            };
            let _ = vm.stop().await;
            return Err(e);
        }
        Ok(vm)
    }

    async fn launch(&self, cfg: &VmConfig, incoming: bool) -> Result<Vm, VmError> {
        let dir = vm_dir(&cfg.run_dir)?;
        for sock in ["agent.sock", QMP_SOCKET] {
            crate::firecracker::check_socket_path_of("qemu", &dir.path().join(sock))?;
        }
        let console = dir.path().join("console.log");
        let log = dir.path().join("qemu.log");
        let mut lease = None;
        let mut args_cfg = cfg.clone();
        let mut rootfs = None;
        if let Some(range) = self.uids {
            // The VM's own uid: its directory becomes the uid's, the kernel and initramfs are
            // made readable for it (linked, or copied when the originals are private), and the
            // rootfs is opened here, read-only, and handed over as a descriptor. QEMU starts in
            // its VM directory (entered while still root) and names every file relative to
            // it, so no directory above it has to be searchable by the VM uid: homes under a
            // private parent (0700) work, and the uid learns nothing about the host's tree.
            let l = crate::uid::lease(range, &cfg.run_dir.join(crate::uid::LEASE_DIR))?;
            let uid = l.uid();
            lease = Some(l);
            crate::uid::chown(dir.path(), uid)?;
            crate::uid::place_for(&cfg.kernel, &dir.path().join(KERNEL), uid)?;
            crate::uid::place_for(&cfg.initramfs, &dir.path().join(INITRD), uid)?;
            args_cfg.kernel = PathBuf::from(KERNEL);
            args_cfg.initramfs = PathBuf::from(INITRD);
            let f = std::fs::File::open(&cfg.rootfs)
                .map_err(|e| VmError::io(format!("open {}", cfg.rootfs.display()), e))?;
            rootfs = Some(std::os::fd::OwnedFd::from(f));
            args_cfg.rootfs = PathBuf::from("/dev/fdset/1");
        }
        let mut cmd = Command::new(&self.binary);
        if rootfs.is_some() {
            cmd.arg("-add-fd")
                .arg(format!("fd={ROOTFS_FD},set=1,opaque=rootfs"));
            cmd.current_dir(dir.path());
            cmd.args(self.command_line(&args_cfg, Path::new("")));
        } else {
            cmd.args(self.command_line(&args_cfg, dir.path()));
        }
        if incoming {
            cmd.arg("-incoming").arg("defer");
        }
        if let (Some(l), Some(fd)) = (&lease, &rootfs) {
            drop_to_uid(&mut cmd, l.uid(), fd, self.accel == Accel::Kvm);
        }
        tracing::debug!(?cmd, "starting qemu");
        let mut child = spawn(cmd, &log).map_err(|e| VmError::Start {
            backend: "qemu",
            detail: format!("cannot run {}: {e}", self.binary.display()),
        })?;
        drop(rootfs);
        // QEMU creates the agent socket before the guest starts; wait for that (or its
        // exit, e.g. a bad option or a missing /dev/kvm).
        let sock = dir.path().join("agent.sock");
        let qmp = dir.path().join(QMP_SOCKET);
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                let said = crate::vm::read_tail(&log, crate::vm::LOG_TAIL_BYTES);
                return Err(VmError::Start {
                    backend: "qemu",
                    detail: format!("exited with {st}: {}", said.trim()),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        Ok(Vm {
            backend: "qemu",
            accel: self.accel.to_string(),
            child: crate::process::VmProcess::Child(child),
            dir,
            console,
            vmm_log: Some(log),
            endpoint: AgentEndpoint::Stream(sock),
            control: crate::vm::Control::Qmp(qmp),
            _jail: None,
            _uid: lease,
        })
    }
}

/// Before exec: the rootfs descriptor onto [`ROOTFS_FD`], no supplementary groups (but the
/// group of `/dev/kvm` for KVM), then gid and uid. Runs before [`spawn`]'s own pre-exec step,
/// so the parent-death signal is set after the uid change (which would clear it).
fn drop_to_uid(cmd: &mut Command, uid: u32, rootfs: &std::os::fd::OwnedFd, kvm: bool) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let raw = rootfs.as_raw_fd();
    let kvm_gid = kvm
        .then(|| std::fs::metadata("/dev/kvm").ok().map(|m| m.gid()))
        .flatten();
    // SAFETY: only async-signal-safe calls (dup2, setgroups, setgid, setuid) on values copied
    // into the closure.
    unsafe {
        cmd.pre_exec(move || {
            use nix::unistd::{Gid, Uid};
            if raw != ROOTFS_FD {
                if nix::libc::dup2(raw, ROOTFS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else {
                // Same number: clear close-on-exec instead.
                nix::fcntl::fcntl(
                    std::os::fd::BorrowedFd::borrow_raw(raw),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
            }
            let groups: Vec<Gid> = kvm_gid.into_iter().map(Gid::from_raw).collect();
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(Gid::from_raw(uid))?;
            nix::unistd::setuid(Uid::from_raw(uid))?;
            Ok(())
        });
    }
}

fn chardev(kind: &str, id: &str, path: &Path) -> OsString {
    let mut s = OsString::from(format!("{kind},id={id},path="));
    s.push(escape_commas(path));
    s
}

/// QEMU option values use `,` as separator; a literal comma is written `,,`.
fn escape_commas(p: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory whose socket paths the kernel cannot take fails at once, naming the
    /// path and the fix, before QEMU starts (it used to wait out the boot limit).
    #[tokio::test]
    async fn over_long_socket_paths_fail_before_start() {
        let d = tempfile::tempdir().unwrap();
        let run_dir = d.path().join("r".repeat(100));
        let q = Qemu {
            uids: None,
            binary: "/nonexistent/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
        };
        let cfg = VmConfig {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/init.cpio".into(),
            rootfs: "/img/a.ext4".into(),
            mem_mib: 256,
            vcpus: 1,
            extra_args: String::new(),
            run_dir: run_dir.clone(),
        };
        let err = q.start(&cfg).await.unwrap_err().to_string();
        assert!(
            err.contains("socket path") && err.contains("INFRA_OPERATOR_HOME"),
            "{err}"
        );
        let left: Vec<_> = std::fs::read_dir(&run_dir).unwrap().flatten().collect();
        assert!(left.is_empty(), "the VM directory was left: {left:?}");
    }

    #[test]
    fn command_line_has_readonly_disk_serial_agent_and_escaped_paths() {
        let q = Qemu {
            uids: None,
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
        };
        let cfg = VmConfig {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/init.cpio".into(),
            rootfs: "/img/a,b.ext4".into(),
            mem_mib: 256,
            vcpus: 2,
            extra_args: "infra.x=1".into(),
            run_dir: "/run/x".into(),
        };
        let argv: Vec<String> = q
            .command_line(&cfg, Path::new("/run/x/vm-1"))
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = argv.join(" ");
        assert!(joined.contains("file=/img/a,,b.ext4"), "{joined}");
        assert!(joined.contains("readonly=on"), "{joined}");
        assert!(joined.contains("-accel tcg"), "{joined}");
        assert!(joined.contains("-m 256 -smp 2"), "{joined}");
        assert!(joined.contains("name=agent"), "{joined}");
        let append = &argv[argv.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.starts_with("console=ttyS0"), "{append}");
        assert!(
            append.contains("no_timer_check") && append.ends_with("infra.x=1"),
            "{append}"
        );
    }
}
