//! Per-VM user ids. Every VMM started as root runs under a uid of its own, taken from a
//! configurable range, so one compromised VMM process cannot signal, ptrace or read another
//! (the jailer's advice, and what e2b and Fly do). A uid is leased with an exclusive `flock` on a
//! file named after it: the lease ends when the VM stops or when its runner dies, however it dies,
//! because the kernel drops the lock with the process.

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::Path;

use crate::error::VmError;

/// Directory under the run directory that holds the uid lease files (one small file per uid
/// ever leased; a file's lock, not its existence, is the lease).
pub const LEASE_DIR: &str = ".vm-uids";

/// A range of host uids (and the gids of the same numbers) reserved for VMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    /// First uid.
    pub first: u32,
    /// How many.
    pub count: u32,
}

impl Default for UidRange {
    /// 900000–909999: above the subordinate-id blocks `useradd` hands to the first users
    /// (100000 + 65536 each), far from system and login users.
    fn default() -> Self {
        Self {
            first: 900_000,
            count: 10_000,
        }
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;
    /// `FIRST-LAST`, inclusive (e.g. `900000-909999`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("'{s}' is not a uid range (FIRST-LAST, e.g. 900000-909999)"))?;
        let (first, last): (u32, u32) = (
            a.trim()
                .parse()
                .map_err(|_| format!("'{a}' is not a uid"))?,
            b.trim()
                .parse()
                .map_err(|_| format!("'{b}' is not a uid"))?,
        );
        if first == 0 || last < first {
            return Err(format!(
                "uid range '{s}' must be non-empty and must not include root"
            ));
        }
        Ok(Self {
            first,
            count: last - first + 1,
        })
    }
}

/// A uid held for one VM; released on drop.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    _lock: Flock<File>,
}

impl UidLease {
    /// The leased uid (also used as the gid).
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

/// Leases a free uid of `range`, with lock files under `dir` (created 0700).
pub fn lease(range: UidRange, dir: &Path) -> Result<UidLease, VmError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| VmError::io(format!("create {}", dir.display()), e))?;
    // Start at a varying point so concurrent runners rarely contend for the same files.
    let start = (std::process::id() ^ nanos()) % range.count.max(1);
    for i in 0..range.count {
        let uid = range.first + (start + i) % range.count;
        let path = dir.join(uid.to_string());
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| VmError::io(format!("open {}", path.display()), e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(UidLease { uid, _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
            Err((_, e)) => return Err(VmError::io(format!("lock {}", path.display()), e.into())),
        }
    }
    Err(VmError::io(
        "lease a VM uid",
        std::io::Error::other(format!(
            "all {} uids from {} are in use by running VMs; widen --vm-uids",
            range.count, range.first
        )),
    ))
}

pub(crate) fn chown(path: &Path, uid: u32) -> Result<(), VmError> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    )
    .map_err(|e| VmError::io(format!("chown {}", path.display()), e.into()))
}

/// Makes `src` readable at `dst` (in a jail or VM directory) for `uid`: a hard link when everyone may already read it (the
/// shared image stays shared), else a private copy owned by `uid` (the originals keep their
/// owners and modes; e.g. the initramfs is 0600).
pub(crate) fn place_for(src: &Path, dst: &Path, uid: u32) -> Result<(), VmError> {
    use std::os::unix::fs::PermissionsExt;
    let world_readable = std::fs::metadata(src)
        .map(|m| m.permissions().mode() & 0o004 != 0)
        .unwrap_or(false);
    let _ = std::fs::remove_file(dst);
    if world_readable && std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)
        .map_err(|e| VmError::io(format!("copy {} for the VM", src.display()), e))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o400))
        .map_err(|e| VmError::io(format!("chmod {}", dst.display()), e))?;
    chown(dst, uid)
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let range = UidRange {
            first: 900_000,
            count: 2,
        };
        let a = lease(range, dir.path()).unwrap();
        let b = lease(range, dir.path()).unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(lease(range, dir.path()).is_err(), "range exhausted");
        drop(a);
        let c = lease(range, dir.path()).unwrap();
        assert!(c.uid() == 900_000 || c.uid() == 900_001);
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(
            "900000-909999".parse::<UidRange>().unwrap(),
            UidRange::default()
        );
        assert!("0-10".parse::<UidRange>().is_err());
        assert!("10-5".parse::<UidRange>().is_err());
        assert!("x".parse::<UidRange>().is_err());
    }
}
