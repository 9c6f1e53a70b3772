//! The kernel side: `fuser::Filesystem` over [`Fs`]. Each request runs on one of the session's
//! worker threads (`threads=`), which blocks on the async operation; errors become errno in
//! [`crate::error::errno`] only.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};

use crate::error::{errno, FsError, FsResult};
use crate::fs::{Fs, SetAttr, ROOT};
use crate::meta::{Attr, Kind};

/// The FUSE adapter.
#[derive(Debug)]
pub struct FuseFs {
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    ttl: Duration,
}

impl FuseFs {
    /// Serves `fs`, running its futures on `rt`.
    pub fn new(fs: Arc<Fs>, rt: tokio::runtime::Handle) -> Self {
        let ttl = fs.config().ttl;
        Self { fs, rt, ttl }
    }

    fn attr(&self, ino: u64, a: &Attr) -> FileAttr {
        let (perm, uid, gid) = self.fs.shown(a);
        FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind: match a.kind {
                Kind::File => FileType::RegularFile,
                Kind::Dir => FileType::Directory,
                Kind::Symlink => FileType::Symlink,
            },
            perm: perm as u16,
            nlink: if a.kind == Kind::Dir { 2 } else { 1 },
            uid,
            gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn run<T>(&self, f: impl std::future::Future<Output = FsResult<T>>) -> Result<T, Errno> {
        self.rt.block_on(f).map_err(|e| {
            let n = errno(&e);
            match &e {
                FsError::NotFound | FsError::Exists | FsError::NotEmpty => {
                    tracing::trace!("{e}")
                }
                _ => tracing::debug!(errno = n.code(), "{e}"),
            }
            if matches!(
                e,
                FsError::Store(_) | FsError::TimedOut { .. } | FsError::Local { .. }
            ) {
                tracing::warn!("{}", error_chain(&e));
            }
            n
        })
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn name(n: &OsStr) -> Result<&str, Errno> {
    std::str::from_utf8(n.as_bytes()).map_err(|_| Errno::EINVAL)
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC reaches open() (one upload instead of truncate + upload), and readdirplus
        // answers `ls -l` with one listing plus parallel HEADs.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_ATOMIC_O_TRUNC
                | fuser::InitFlags::FUSE_DO_READDIRPLUS
                | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        let r = name(n).and_then(|n| self.run(self.fs.lookup(parent.0, n)));
        match r {
            Ok((ino, a)) => reply.entry(&self.ttl, &self.attr(ino, &a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.run(self.fs.getattr(ino.0)) {
            Ok(a) => reply.attr(&self.ttl, &self.attr(ino.0, &a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ch = SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(time),
        };
        match self.run(self.fs.setattr(ino.0, ch, fh.map(|f| f.0))) {
            Ok(a) => reply.attr(&self.ttl, &self.attr(ino.0, &a)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.run(self.fs.readlink(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&FsError::Unsupported));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r =
            name(n).and_then(|n| self.run(self.fs.mkdir(parent.0, n, mode, req.uid(), req.gid())));
        match r {
            Ok((ino, a)) => reply.entry(&self.ttl, &self.attr(ino, &a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        match name(n).and_then(|n| self.run(self.fs.unlink(parent.0, n))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        match name(n).and_then(|n| self.run(self.fs.rmdir(parent.0, n))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = name(link_name).and_then(|n| {
            self.run(self.fs.symlink(
                parent.0,
                n,
                target.as_os_str().as_bytes(),
                req.uid(),
                req.gid(),
            ))
        });
        match r {
            Ok((ino, a)) => reply.entry(&self.ttl, &self.attr(ino, &a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            reply.error(errno(&FsError::Invalid));
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let r = name(n).and_then(|n| {
            name(newname)
                .and_then(|nn| self.run(self.fs.rename(parent.0, n, newparent.0, nn, noreplace)))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&FsError::Unsupported));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let acc = flags.0 & nix::libc::O_ACCMODE;
        let write = acc == nix::libc::O_WRONLY || acc == nix::libc::O_RDWR;
        let trunc = flags.0 & nix::libc::O_TRUNC != 0;
        match self.run(self.fs.open(ino.0, write, trunc)) {
            Ok((fh, keep)) => {
                let f = if keep {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), f)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.run(self.fs.read(fh.0, offset, size)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.run(self.fs.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.run(self.fs.flush(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.run(self.fs.release(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.run(self.fs.flush(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.run(self.fs.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (_, entries) = match self.fs.dir_entries(fh.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut i = offset as usize;
        while i < entries.len() + 2 {
            let (name, kind, eino) = match i {
                0 => (".", FileType::Directory, ino.0),
                1 => ("..", FileType::Directory, ROOT),
                _ => {
                    let e = &entries[i - 2];
                    let kind = match e.kind {
                        Kind::Dir => FileType::Directory,
                        Kind::File => FileType::RegularFile,
                        Kind::Symlink => FileType::Symlink,
                    };
                    (e.name.as_str(), kind, fake_ino(ino.0, &e.name))
                }
            };
            if reply.add(INodeNo(eino), (i + 1) as u64, kind, name) {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let mut i = offset as usize;
        if i < 2 {
            let a = match self.run(self.fs.getattr(ino.0)) {
                Ok(a) => a,
                Err(e) => return reply.error(e),
            };
            while i < 2 {
                let n = if i == 0 { "." } else { ".." };
                if reply.add(
                    INodeNo(ino.0),
                    (i + 1) as u64,
                    n,
                    &Duration::ZERO,
                    &self.attr(ino.0, &a),
                    Generation(0),
                ) {
                    return reply.ok();
                }
                i += 1;
            }
        }
        let first = i;
        loop {
            let batch = match self.run(self.fs.readdirplus(fh.0, i - 2)) {
                Ok(b) => b,
                // Entries already added were counted (`remember`): hand them over, the
                // next call reports the error.
                Err(_) if i > first => return reply.ok(),
                Err(e) => return reply.error(e),
            };
            if batch.is_empty() {
                break;
            }
            for e in batch {
                let full = reply.add(
                    INodeNo(e.ino),
                    (i + 1) as u64,
                    &e.name,
                    &self.ttl,
                    &self.attr(e.ino, &e.attr),
                    Generation(0),
                );
                if full {
                    return reply.ok();
                }
                self.fs.remember(e.ino);
                i += 1;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A bucket has no fixed size: report plenty (as s3fs does), 1 MiB blocks.
        const BLOCKS: u64 = 1 << 28;
        reply.statfs(
            BLOCKS,
            BLOCKS,
            BLOCKS,
            1 << 32,
            1 << 32,
            1 << 20,
            255,
            1 << 20,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r =
            name(n).and_then(|n| self.run(self.fs.create(parent.0, n, mode, req.uid(), req.gid())));
        match r {
            Ok((ino, a, fh)) => reply.created(
                &self.ttl,
                &self.attr(ino, &a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }
}

/// A stable, non-zero inode number for plain `readdir` entries (the kernel does not use it;
/// some programs skip entries numbered 0).
fn fake_ino(dir: u64, name: &str) -> u64 {
    // FNV-1a.
    let mut h: u64 = 0xcbf29ce484222325 ^ dir;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h | (1 << 63)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fake_inodes_are_never_zero_and_stable() {
        let a = super::fake_ino(1, "x");
        assert_ne!(a, 0);
        assert_eq!(a, super::fake_ino(1, "x"));
        assert_ne!(a, super::fake_ino(1, "y"));
    }
}
