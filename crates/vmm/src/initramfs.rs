//! The initramfs every guest boots through: our agent as `/init`, plus the kernel modules it
//! loads before mounting the read-only rootfs under a RAM overlay (see `infra_guest`'s
//! initramfs stage).
//!
//! The newc cpio writer is a few lines of our own: the format is fixed, we only ever write
//! it, and writing it ourselves makes the archive byte-for-byte reproducible (fixed inode
//! numbers and mtimes), which `cpio`/`gen_init_cpio` runs do not give without extra care.

use std::io::{self, Write};
use std::path::Path;

use crate::error::KernelError;
use crate::modules::{read_module, ModuleFile};

/// Where the initramfs stage finds its module load order (one name per line).
pub const MODULE_LIST: &str = "etc/infra-operator/modules";
/// Module files, `NAME.ko`, loaded in [`MODULE_LIST`] order.
pub const MODULE_DIR: &str = "lib/modules";

/// A newc ("070701") cpio archive being written.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        if name.contains('\0') || size > u32::MAX as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry {name:?} cannot be stored (NUL in name or over 4 GiB)"),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, 0o040000 | perm, 0, (0, 0))
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, 0o100000 | perm, data.len() as u64, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, 0o020000 | perm, 0, (major, minor))
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        // The kernel reads the archive in 512-byte records; pad like cpio(1) does.
        let n = (512 - (self.written % 512) as usize) % 512;
        self.put(&vec![0u8; n])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Writes the initramfs to `out` (an uncompressed cpio: the kernel unpacks it with a copy,
/// where decompressing tens of MB would cost seconds under TCG).
pub fn write_initramfs(
    out: &Path,
    agent: &[u8],
    modules: &[ModuleFile],
) -> Result<(), KernelError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    // The initramfs cache is a private directory (it feeds every VM's boot).
    infra_config::ensure_dir(parent, infra_config::PRIVATE_DIR)?;
    let tmp = tempfile::NamedTempFile::new_in(parent).map_err(|e| KernelError::io(parent, e))?;
    let mut w = CpioWriter::new(io::BufWriter::new(tmp.as_file()));
    let io = |e| KernelError::io(out, e);
    for d in [
        "dev",
        "proc",
        "sys",
        "etc",
        "etc/infra-operator",
        "lib",
        MODULE_DIR,
    ] {
        w.dir(d, 0o755).map_err(io)?;
    }
    for d in ["newroot", "lower", "rw"] {
        w.dir(d, 0o755).map_err(io)?;
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs exists.
    w.char_dev("dev/console", 0o600, 5, 1).map_err(io)?;
    w.file("init", 0o755, agent).map_err(io)?;
    let mut list = String::new();
    for m in modules {
        let data = read_module(&m.path)?;
        w.file(&format!("{MODULE_DIR}/{}.ko", m.name), 0o644, &data)
            .map_err(io)?;
        list.push_str(&m.name);
        list.push('\n');
    }
    w.file(MODULE_LIST, 0o644, list.as_bytes()).map_err(io)?;
    w.finish()
        .map_err(io)?
        .into_inner()
        .map_err(|e| io(e.into_error()))?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(out).map_err(|e| io(e.error))?;
    infra_config::fsync_dir(parent).map_err(|e| KernelError::io(parent, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_newc_aligned_and_readable_by_cpio_tool() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("etc", 0o755).unwrap();
        w.file("etc/hello", 0o644, b"hi there").unwrap();
        w.char_dev("console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        let hello = bytes.windows(8).position(|w| w == b"hi there").unwrap();
        assert_eq!(hello % 4, 0, "file data is 4-byte aligned");
        // Cross-check with GNU cpio when the machine has it.
        if let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            child.stdin.take().unwrap().write_all(&bytes).unwrap();
            let out = child.wait_with_output().unwrap();
            let names = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                names.lines().collect::<Vec<_>>(),
                ["etc", "etc/hello", "console"]
            );
        }
    }
}
