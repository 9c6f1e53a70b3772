//! PID-1 duties: early mounts, loopback, hostname, and power-off.
//!
//! Each setup step that fails is logged and skipped: a guest with a missing mount point is
//! still more useful with the agent running than with a kernel panic.

use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, set_cad_enabled, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

/// Whether the agent should act as init.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pid1Mode {
    /// Act as init exactly when running as PID 1.
    #[default]
    Auto,
    /// Act as init even when not PID 1 (e.g. inside a PID namespace). Mounts over the
    /// current root: never use on a host.
    On,
    /// Never act as init; run as a plain service.
    Off,
}

impl Pid1Mode {
    /// Resolves `Auto` against the current pid.
    pub fn active(self) -> bool {
        match self {
            Pid1Mode::Auto => std::process::id() == 1,
            Pid1Mode::On => true,
            Pid1Mode::Off => false,
        }
    }
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV.union(MsFlags::MS_NOEXEC),
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV.union(MsFlags::MS_NOEXEC),
        data: None,
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=620,ptmxmode=666"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV.union(MsFlags::MS_NOEXEC),
        data: None,
    },
];

/// Kernel settings written at boot, before any program runs: links, symlinks, regular files
/// and fifos in sticky world-writable directories (`/tmp`) cannot be used to trick a more
/// privileged process (the agent) into following or opening them; kernel pointers and the
/// kernel log are hidden from unprivileged code.
pub const SYSCTLS: &[(&str, &str)] = &[
    ("/proc/sys/fs/protected_hardlinks", "1"),
    ("/proc/sys/fs/protected_symlinks", "1"),
    ("/proc/sys/fs/protected_regular", "2"),
    ("/proc/sys/fs/protected_fifos", "2"),
    ("/proc/sys/kernel/kptr_restrict", "2"),
    ("/proc/sys/kernel/dmesg_restrict", "1"),
];

/// Sets the machine up as init: mounts, sysctls, `/dev` links, loopback, hostname,
/// Ctrl-Alt-Del.
pub(crate) fn init() {
    for m in MOUNTS {
        let target = Path::new(m.target);
        if let Err(e) = std::fs::create_dir_all(target) {
            tracing::warn!(target = m.target, error = %e, "cannot create mount point");
            continue;
        }
        match mount(Some(m.source), target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => tracing::warn!(target = m.target, error = %e, "mount failed"),
        }
    }
    for (path, value) in SYSCTLS {
        if let Err(e) = std::fs::write(path, value) {
            tracing::warn!(path, error = %e, "cannot set sysctl");
        }
    }
    // Init must survive whatever the sandboxed program does to memory: if the OOM killer
    // picked PID 1, the kernel would panic and the run would lose its result.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!(error = %e, "cannot protect the agent from the OOM killer");
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
    if let Err(e) = loopback_up() {
        tracing::warn!(error = %e, "cannot bring up lo");
    }
    let hostname = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sandbox".to_string());
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        tracing::warn!(error = %e, "cannot set hostname");
    }
    // Ctrl-Alt-Del then sends SIGINT to us instead of rebooting at once.
    if let Err(e) = set_cad_enabled(false) {
        tracing::warn!(error = %e, "cannot disable Ctrl-Alt-Del");
    }
}

/// `ip link set lo up`, with `SIOCGIFFLAGS`/`SIOCSIFFLAGS`.
fn loopback_up() -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is a plain C struct for which all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming "lo"; the ioctls read and write only it.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(Errno::last());
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

/// Stops every other process, syncs, and powers off (or reboots). Never returns.
pub(crate) fn power_off(poweroff: bool) -> ! {
    tracing::info!(poweroff, "shutting down");
    let all = Pid::from_raw(-1);
    let _ = kill(all, Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    let _ = kill(all, Signal::SIGKILL);
    nix::unistd::sync();
    let how = if poweroff {
        RebootMode::RB_POWER_OFF
    } else {
        RebootMode::RB_AUTOBOOT
    };
    let err = reboot(how).unwrap_err();
    tracing::error!(error = %err, "reboot(2) failed");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
