//! The one place that waits for child processes.
//!
//! As PID 1 the agent must reap every zombie (orphans are re-parented to it), but a blind
//! `waitpid(-1)` would steal the exit statuses the executor is waiting for. So nothing else
//! waits: the executor spawns through [`Reaper::spawn`], which registers the pid under the
//! same lock that covers the spawn, and the reaper forwards each registered child's status
//! (with its `rusage`) over a oneshot channel; statuses of unregistered pids (orphans) are
//! dropped.
//!
//! * [`ReapMode::All`] (PID 1): `wait4(-1, WNOHANG)` until nothing is left.
//! * [`ReapMode::Registered`] (plain service, tests): `wait4(pid, WNOHANG)` for registered
//!   pids only, so other children of the process are left alone.
//!
//! `std::process::Command::spawn` itself waits for a child whose `exec` failed; the reaper
//! never races it for that pid (in `Registered` mode the pid is not registered yet, in `All`
//! mode the reaper waits only while holding the lock that the spawn holds).
//!
//! Wake-ups come from SIGCHLD and from each registration (a child that exited before it was
//! registered is therefore still found).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use nix::libc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, Notify};

/// Which children the reaper waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReapMode {
    /// Every child, including orphans re-parented to us (PID 1).
    All,
    /// Only children spawned through the reaper.
    Registered,
}

/// How a child ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChildExit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when it was killed.
    pub signal: Option<i32>,
    /// Peak resident set size of the child and its waited-for descendants, in bytes.
    pub maxrss_bytes: Option<u64>,
}

struct Inner {
    mode: ReapMode,
    waiting: Mutex<HashMap<i32, oneshot::Sender<ChildExit>>>,
    wake: Notify,
}

/// Handle to the reaper task; cheap to clone.
#[derive(Clone)]
pub(crate) struct Reaper {
    inner: Arc<Inner>,
}

impl Reaper {
    /// Starts the reaper task on the current runtime.
    pub(crate) fn start(mode: ReapMode) -> io::Result<Self> {
        let mut sigchld = signal(SignalKind::child())?;
        let inner = Arc::new(Inner {
            mode,
            waiting: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
        // The task lives as long as the runtime: one per agent.
        let task_inner = Arc::clone(&inner);
        tokio::spawn(async move {
            loop {
                let wake = task_inner.wake.notified();
                reap(&task_inner);
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = wake => {}
                }
            }
        });
        Ok(Self { inner })
    }

    /// Spawns a child with `spawn` and registers its pid before any status can be collected.
    pub(crate) fn spawn<F>(
        &self,
        spawn: F,
    ) -> io::Result<(std::process::Child, oneshot::Receiver<ChildExit>)>
    where
        F: FnOnce() -> io::Result<std::process::Child>,
    {
        let (tx, rx) = oneshot::channel();
        let child = {
            let mut waiting = self.inner.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let child = spawn()?;
            waiting.insert(child.id() as i32, tx);
            child
        };
        self.inner.wake.notify_one();
        Ok((child, rx))
    }
}

fn reap(inner: &Inner) {
    match inner.mode {
        ReapMode::All => {
            // Hold the registry lock while waiting: `Reaper::spawn` holds it across the
            // spawn, during which std itself waits for a child whose `exec` failed, and a
            // concurrent `wait4(-1)` must not take that status away from it.
            let mut waiting = inner.waiting.lock().unwrap_or_else(|e| e.into_inner());
            while let Some((pid, exit)) = wait4(-1) {
                if let Some(tx) = waiting.remove(&pid) {
                    let _ = tx.send(exit);
                }
            }
        }
        ReapMode::Registered => {
            let pids: Vec<i32> = {
                let waiting = inner.waiting.lock().unwrap_or_else(|e| e.into_inner());
                waiting.keys().copied().collect()
            };
            for pid in pids {
                if let Some((pid, exit)) = wait4(pid) {
                    deliver(inner, pid, exit);
                }
            }
        }
    }
}

fn deliver(inner: &Inner, pid: i32, exit: ChildExit) {
    let sender = inner
        .waiting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pid);
    if let Some(tx) = sender {
        let _ = tx.send(exit);
    }
}

/// One non-blocking `wait4`. `None` when nothing (more) has exited. A pid we cannot wait for
/// (`ECHILD`) is reported as ended with unknown status, so its waiter is not stuck.
fn wait4(pid: i32) -> Option<(i32, ChildExit)> {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers point to live, writable locals of the right types.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r > 0 {
            let exit = ChildExit {
                code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
                signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
                maxrss_bytes: u64::try_from(ru.ru_maxrss).ok().map(|kb| kb * 1024),
            };
            return Some((r, exit));
        }
        if r == 0 {
            return None;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) if pid > 0 => return Some((pid, ChildExit::default())),
            _ => return None,
        }
    }
}
