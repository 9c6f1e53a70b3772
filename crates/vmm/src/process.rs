//! The VMM process: our child (QEMU, Firecracker without the jailer), or a process we hold by
//! pidfd (Firecracker that the jailer started in its own PID namespace before exiting).
//!
//! A pidfd pins the process: once opened, signals sent through it reach that process or
//! nothing, never a later process that reused the pid. The pid the jailer writes is only
//! trusted after the pidfd is open and `/proc/<pid>/root` is the jail's root.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use tokio::io::unix::AsyncFd;
use tokio::process::Child;

/// A running VMM.
#[derive(Debug)]
pub(crate) enum VmProcess {
    /// Our child: waited for and killed through tokio (killed on drop).
    Child(Child),
    /// Not our child: Firecracker, started by the jailer in a new PID namespace. Killed on
    /// drop.
    Pidfd(PidfdProcess),
}

/// A process held by pidfd.
#[derive(Debug)]
pub(crate) struct PidfdProcess {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
    exited: bool,
}

/// What to say about the exit of a process that is not our child: its status went to its
/// real parent (init), not to us.
const EXITED_NOT_CHILD: &str = "exited (the jailer's child: exit status not visible to us)";

impl PidfdProcess {
    /// Opens a pidfd for `pid` and checks that the process is chrooted at `root` (what the
    /// jailer does before it execs Firecracker), so a pid from a file is never trusted alone.
    /// Needs a tokio runtime.
    pub(crate) fn adopt(pid: u32, root: &Path) -> std::io::Result<Self> {
        let pid_i = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 1)
            .ok_or_else(|| std::io::Error::other(format!("invalid pid {pid}")))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let raw = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid_i, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        // The jailer pivots into the jail in its own mount namespace, where the root reads
        // as `/`: compare the directories themselves (device and inode; a bind mount of a
        // directory keeps both).
        use std::os::unix::fs::MetadataExt;
        let want = std::fs::metadata(root)?;
        let got = std::fs::metadata(format!("/proc/{pid}/root"))?;
        if (got.dev(), got.ino()) != (want.dev(), want.ino()) {
            return Err(std::io::Error::other(format!(
                "pid {pid} is not chrooted at {}",
                root.display()
            )));
        }
        // The check above read /proc by pid: make sure the pidfd's process is still the one
        // that was checked (if it had exited, the pid could name another process now).
        // SAFETY: the OwnedFd is moved into the AsyncFd and closed only when it drops.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let p = Self {
            pid,
            fd,
            exited: false,
        };
        if p.signal(0).is_err() {
            return Err(std::io::Error::other(format!(
                "pid {pid} exited while it was checked"
            )));
        }
        Ok(p)
    }

    fn signal(&self, sig: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal on a descriptor we own, no siginfo.
        let r = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                sig,
                std::ptr::null::<nix::libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// A pidfd polls readable once its process has exited.
    fn poll_exited(&mut self) -> bool {
        if !self.exited {
            let mut p = nix::libc::pollfd {
                fd: self.fd.get_ref().as_raw_fd(),
                events: nix::libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            let n = unsafe { nix::libc::poll(&mut p, 1, 0) };
            self.exited = n > 0 && p.revents & nix::libc::POLLIN != 0;
        }
        self.exited
    }

    async fn wait(&mut self) {
        while !self.poll_exited() {
            match self.fd.readable().await {
                Ok(mut g) => {
                    if !self.exited {
                        g.clear_ready();
                    }
                }
                Err(_) => break,
            }
        }
    }
}

impl Drop for PidfdProcess {
    fn drop(&mut self) {
        if !self.poll_exited() {
            let _ = self.signal(nix::libc::SIGKILL);
        }
    }
}

impl VmProcess {
    pub(crate) fn id(&self) -> Option<u32> {
        match self {
            VmProcess::Child(c) => c.id(),
            VmProcess::Pidfd(p) => (!p.exited).then_some(p.pid),
        }
    }

    /// `Some(status)` once the process has exited.
    pub(crate) fn try_wait(&mut self) -> Option<String> {
        match self {
            VmProcess::Child(c) => match c.try_wait() {
                Ok(Some(st)) => Some(st.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("unknown ({e})")),
            },
            VmProcess::Pidfd(p) => p.poll_exited().then(|| EXITED_NOT_CHILD.to_string()),
        }
    }

    pub(crate) async fn wait(&mut self) {
        match self {
            VmProcess::Child(c) => {
                let _ = c.wait().await;
            }
            VmProcess::Pidfd(p) => p.wait().await,
        }
    }

    pub(crate) fn start_kill(&mut self) {
        match self {
            VmProcess::Child(c) => {
                let _ = c.start_kill();
            }
            VmProcess::Pidfd(p) => {
                if !p.poll_exited() {
                    let _ = p.signal(nix::libc::SIGKILL);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pidfd_process_is_checked_waited_for_and_killed() {
        // `sleep` is our child here, but is held only through its pidfd, as Firecracker is.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Its root is `/`: adopting it as a process chrooted elsewhere is refused.
        let t = tempfile::tempdir().unwrap();
        let e = PidfdProcess::adopt(pid, t.path()).unwrap_err().to_string();
        assert!(e.contains("not chrooted at"), "{e}");
        let mut p = VmProcess::Pidfd(PidfdProcess::adopt(pid, Path::new("/")).unwrap());
        assert_eq!(p.id(), Some(pid));
        assert_eq!(p.try_wait(), None);
        p.start_kill();
        // Reap it (it is our child in this test) so its pidfd reports the exit.
        let st = child.wait().unwrap();
        assert!(!st.success());
        tokio::time::timeout(Duration::from_secs(5), p.wait())
            .await
            .expect("the pidfd reports the exit");
        assert!(p.try_wait().unwrap().contains("exited"));
        assert_eq!(p.id(), None);
        // Bad pids never reach the kernel.
        assert!(PidfdProcess::adopt(0, Path::new("/")).is_err());
        assert!(PidfdProcess::adopt(1, Path::new("/")).is_err());
    }
}
