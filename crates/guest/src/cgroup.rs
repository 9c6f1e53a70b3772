//! cgroup v2 per exec: memory and pids limits, peak memory, and `cgroup.kill`.
//!
//! Used only when `/sys/fs/cgroup` is a writable cgroup2 mount and the agent sits in its root
//! cgroup (PID 1 in a VM, where the agent mounts it). Exec cgroups live under
//! `/sys/fs/cgroup/infra-agent/`, which holds no process itself, so the "no internal
//! processes" rule is kept. Anywhere else (a host with cgroup v1, a systemd service without
//! delegation) the executor falls back to rlimits.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

/// Where exec cgroups are created, with the controllers that could be enabled.
#[derive(Debug)]
pub(crate) struct Cgroups {
    parent: PathBuf,
    memory: bool,
    pids: bool,
}

impl Cgroups {
    /// Detects a usable cgroup2 hierarchy at `/sys/fs/cgroup`.
    pub(crate) fn detect() -> Option<Self> {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    fn detect_at(mount: &Path) -> Option<Self> {
        let fs = statfs(mount).ok()?;
        if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return None;
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        if !own.lines().any(|l| l == "0::/") {
            tracing::info!("not in the root cgroup; limits fall back to rlimits");
            return None;
        }
        let parent = mount.join("infra-agent");
        if let Err(e) = std::fs::create_dir_all(&parent) {
            tracing::info!(error = %e, "cgroup2 is not writable; limits fall back to rlimits");
            return None;
        }
        let available =
            std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        let mut memory = false;
        let mut pids = false;
        for (name, flag) in [("memory", &mut memory), ("pids", &mut pids)] {
            if !available.split_whitespace().any(|c| c == name) {
                continue;
            }
            let enable = format!("+{name}");
            *flag = std::fs::write(mount.join("cgroup.subtree_control"), &enable).is_ok()
                && std::fs::write(parent.join("cgroup.subtree_control"), &enable).is_ok();
        }
        tracing::info!(memory, pids, "using cgroup v2 for exec limits");
        Some(Self {
            parent,
            memory,
            pids,
        })
    }

    /// Whether `memory.max` can be set (else use `RLIMIT_AS`).
    pub(crate) fn has_memory(&self) -> bool {
        self.memory
    }

    /// Whether `pids.max` can be set (else use `RLIMIT_NPROC`).
    pub(crate) fn has_pids(&self) -> bool {
        self.pids
    }

    /// Creates a cgroup for one process tree with the given limits.
    pub(crate) fn create(
        &self,
        name: &str,
        memory_bytes: Option<u64>,
        max_pids: Option<u32>,
    ) -> io::Result<ExecCgroup> {
        let path = self.parent.join(name);
        std::fs::create_dir(&path)?;
        let cg = ExecCgroup {
            procs: CString::new(crate::files::bytes(&path.join("cgroup.procs")))
                .map_err(io::Error::other)?,
            path,
        };
        if let (Some(m), true) = (memory_bytes, self.memory) {
            std::fs::write(cg.path.join("memory.max"), m.to_string())?;
            // No swap: the limit is the limit.
            let _ = std::fs::write(cg.path.join("memory.swap.max"), "0");
        }
        if let (Some(p), true) = (max_pids, self.pids) {
            std::fs::write(cg.path.join("pids.max"), p.to_string())?;
        }
        Ok(cg)
    }
}

/// One exec's cgroup. The child joins it itself (before `exec`) by writing `0` to
/// `cgroup.procs`, so nothing it starts can escape it.
#[derive(Debug)]
pub(crate) struct ExecCgroup {
    path: PathBuf,
    procs: CString,
}

impl ExecCgroup {
    /// `cgroup.procs` as a C string, for the child's pre-exec hook.
    pub(crate) fn procs_path(&self) -> &CString {
        &self.procs
    }

    /// Kills every process in the cgroup (`cgroup.kill`, else SIGKILL to each member).
    pub(crate) fn kill(&self) {
        if std::fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// `memory.peak`, when the kernel has it (5.19+).
    pub(crate) fn peak_memory(&self) -> Option<u64> {
        std::fs::read_to_string(self.path.join("memory.peak"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills what is left and removes the cgroup once it is empty (in the background).
    pub(crate) fn remove(self) {
        tokio::spawn(async move {
            for _ in 0..100 {
                self.kill();
                if std::fs::remove_dir(&self.path).is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::warn!(path = %self.path.display(), "cgroup still busy; left in place");
        });
    }
}
