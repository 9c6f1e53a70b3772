//! Making the ext4 image: `mke2fs -d` from the staged tree into a sparse file, no loop mounts,
//! no zero-filled files. `--size auto` picks the smallest size that fits plus headroom; every
//! image is checked with `e2fsck -fn`.
//!
//! Reproducibility: the filesystem UUID and directory hash seed come from the content digest,
//! and `E2FSPROGS_FAKE_TIME` pins superblock times, so the same input gives the same bytes.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::tools;
use crate::unpack::TreeUsage;

/// How big the image should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// Smallest size that fits, plus `headroom_pct` percent free space.
    Auto {
        /// Free space to leave, in percent of the content.
        headroom_pct: u32,
    },
    /// Exactly this many MiB (the seed's `--size 150`).
    Fixed {
        /// Size in MiB.
        mb: u64,
    },
}

impl SizeSpec {
    /// Parses `auto` or a number of MB.
    pub fn parse(text: &str, headroom_pct: u32) -> std::result::Result<Self, String> {
        if text.eq_ignore_ascii_case("auto") {
            return Ok(SizeSpec::Auto { headroom_pct });
        }
        let mb: u64 = text
            .trim_end_matches(|c: char| {
                c.eq_ignore_ascii_case(&'m') || c.eq_ignore_ascii_case(&'b')
            })
            .parse()
            .map_err(|_| format!("--size must be a number of MB or 'auto', not '{text}'"))?;
        if mb < 8 {
            return Err(format!(
                "--size {mb} is too small: ext4 images need at least 8 MB"
            ));
        }
        Ok(SizeSpec::Fixed { mb })
    }
}

/// Inputs that decide the image bytes besides the tree.
#[derive(Debug, Clone)]
pub struct Ext4Params {
    /// Size policy.
    pub size: SizeSpec,
    /// Volume label (16 bytes max).
    pub label: String,
    /// Filesystem UUID and hash seed (derived from the content).
    pub uuid: String,
    /// Fixed timestamp for filesystem-level times.
    pub epoch: i64,
}

/// Facts about the finished filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Facts {
    /// Image size in bytes (the file's length).
    pub size_bytes: u64,
    /// Bytes in use inside the filesystem (blocks in use × block size).
    pub used_bytes: u64,
    /// Inodes in use.
    pub inodes_used: u64,
    /// Inodes in total.
    pub inodes_total: u64,
}

const BLOCK: u64 = 4096;
const JOURNAL_MB: u64 = 4;

/// A first estimate of the bytes a tree needs in ext4 (data, inode tables, journal, group metadata).
pub fn estimate_bytes(usage: &TreeUsage, inodes: u64) -> u64 {
    let data = usage.blocks * BLOCK;
    let inode_tables = inodes * 256;
    let journal = JOURNAL_MB << 20;
    let base = data + inode_tables + journal;
    // Bitmaps, group descriptors, reserved GDT blocks and extent trees: ~3% plus a floor.
    base + base / 32 + (2 << 20)
}

/// Builds `out` from `tree`. On failure nothing is left at `out`.
pub fn make_ext4(
    tree: &Path,
    out: &Path,
    usage: &TreeUsage,
    params: &Ext4Params,
) -> Result<Ext4Facts> {
    let mke2fs = tools::find("mke2fs", "e2fsprogs")?;
    let (mut inodes, mut bytes, fixed) = match params.size {
        SizeSpec::Auto { headroom_pct } => {
            let inodes = usage.inodes + (usage.inodes * headroom_pct as u64 / 100).max(256);
            let need = estimate_bytes(usage, inodes);
            (
                inodes,
                round_mb(need + need * headroom_pct as u64 / 100),
                false,
            )
        }
        SizeSpec::Fixed { mb } => {
            let bytes = mb << 20;
            // Default density, but never fewer inodes than the tree needs.
            let inodes = (bytes / 16384).max(usage.inodes + 64);
            (inodes, bytes, true)
        }
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = try_mke2fs(&mke2fs, tree, out, bytes, inodes, params);
        match result {
            Ok(()) => break,
            Err(MkfsFailure::NoSpace(detail)) => {
                let _ = std::fs::remove_file(out);
                if fixed {
                    let need = round_mb(estimate_bytes(usage, usage.inodes + 64)) >> 20;
                    let SizeSpec::Fixed { mb } = params.size else {
                        unreachable!()
                    };
                    tracing::debug!(%detail, "fixed size too small");
                    return Err(Error::TooSmall {
                        size_mb: mb,
                        needed_mb: need.max(mb + 1),
                    });
                }
                if attempt >= 6 {
                    return Err(Error::ToolFailed {
                        tool: "mke2fs".into(),
                        status: "no space".into(),
                        output: detail,
                    });
                }
                tracing::debug!(attempt, bytes, inodes, %detail, "image too small, growing");
                bytes = round_mb(bytes + bytes / 8);
                inodes += inodes / 5;
            }
            Err(MkfsFailure::Other(e)) => {
                let _ = std::fs::remove_file(out);
                return Err(e);
            }
        }
    }
    normalize_times(out, tree, params.epoch)?;
    check(out)?;
    facts(out)
}

/// Sets every inode's ctime and atime to `epoch` (mtimes are kept from the source).
///
/// `mke2fs -d` copies the staged files' ctimes, which are the time of the build; pinning them is
/// what makes two builds of the same input byte-identical. Paths debugfs cannot quote (a newline
/// or a double quote in the name) are left as they are.
pub fn normalize_times(image: &Path, tree: &Path, epoch: i64) -> Result<()> {
    let debugfs = tools::find("debugfs", "e2fsprogs")?;
    let mut script = String::new();
    let mut add = |target: &str| {
        for field in ["ctime", "atime"] {
            script.push_str(&format!(
                "sif {target} {field} @{epoch}\nsif {target} {field}_extra 0\n"
            ));
        }
    };
    add("<2>");
    add("/lost+found");
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).ctx("read directory", &dir)? {
            let e = e.ctx("read directory", &dir)?;
            let path = e.path();
            let rel = path
                .strip_prefix(tree)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path.clone());
            }
            if rel.contains(['\n', '"']) || rel.contains(char::REPLACEMENT_CHARACTER) {
                continue;
            }
            add(&format!("\"/{rel}\""));
        }
    }
    let script_path = image.with_extension("debugfs");
    std::fs::write(&script_path, script).ctx("write", &script_path)?;
    let result = tools::run(
        "debugfs",
        Command::new(debugfs)
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(image),
    );
    let _ = std::fs::remove_file(&script_path);
    let out = result?;
    // debugfs reports per-command failures on stderr but exits 0; any such line is a real error.
    let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if !errors.is_empty() {
        return Err(Error::ToolFailed {
            tool: "debugfs".into(),
            status: "command errors".into(),
            output: errors.join(" | "),
        });
    }
    Ok(())
}

enum MkfsFailure {
    NoSpace(String),
    Other(Error),
}

fn try_mke2fs(
    mke2fs: &Path,
    tree: &Path,
    out: &Path,
    bytes: u64,
    inodes: u64,
    params: &Ext4Params,
) -> std::result::Result<(), MkfsFailure> {
    let file = std::fs::File::create(out)
        .ctx("create", out)
        .map_err(MkfsFailure::Other)?;
    file.set_len(bytes)
        .ctx("size", out)
        .map_err(MkfsFailure::Other)?;
    drop(file);
    let label: String = params.label.chars().take(16).collect();
    let mut cmd = Command::new(mke2fs);
    cmd.env("E2FSPROGS_FAKE_TIME", params.epoch.to_string())
        .env("MKE2FS_CONFIG", "/etc/mke2fs.conf")
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
        ])
        .args(["-N", &inodes.to_string()])
        .args(["-J", &format!("size={JOURNAL_MB}")])
        .args(["-L", &label, "-U", &params.uuid])
        .arg("-E")
        .arg(format!(
            "hash_seed={},root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            params.uuid
        ))
        .arg("-d")
        .arg(tree)
        .arg(out);
    let output = cmd
        .output()
        .map_err(|e| MkfsFailure::Other(Error::io("run", "mke2fs", e)))?;
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    // mke2fs reports a full filesystem only in words; these are its messages for it.
    let full = [
        "Could not allocate block",
        "No space left",
        "Could not allocate inode",
        "inode_table",
        "No free space",
    ];
    if full.iter().any(|m| text.contains(m)) {
        return Err(MkfsFailure::NoSpace(
            text.trim().lines().last().unwrap_or_default().to_string(),
        ));
    }
    Err(MkfsFailure::Other(tools::failed("mke2fs", &output)))
}

/// Runs `e2fsck -fn`: a read-only full check that must find nothing.
pub fn check(image: &Path) -> Result<()> {
    let e2fsck = tools::find("e2fsck", "e2fsprogs")?;
    tools::run("e2fsck", Command::new(e2fsck).arg("-fn").arg(image))?;
    Ok(())
}

/// Reads block and inode counts from the superblock (`dumpe2fs -h`).
pub fn facts(image: &Path) -> Result<Ext4Facts> {
    let dumpe2fs = tools::find("dumpe2fs", "e2fsprogs")?;
    let out = tools::run("dumpe2fs", Command::new(dumpe2fs).arg("-h").arg(image))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .map(|v| v.trim_start_matches(':').trim().parse().unwrap_or(0))
            })
            .unwrap_or(0)
    };
    let block_size = field("Block size");
    let blocks = field("Block count");
    let free = field("Free blocks");
    let inodes_total = field("Inode count");
    let inodes_free = field("Free inodes");
    let size_bytes = std::fs::metadata(image).ctx("stat", image)?.len();
    Ok(Ext4Facts {
        size_bytes,
        used_bytes: blocks.saturating_sub(free) * block_size,
        inodes_used: inodes_total.saturating_sub(inodes_free),
        inodes_total,
    })
}

fn round_mb(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20) << 20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_parsing() {
        assert_eq!(
            SizeSpec::parse("auto", 10).unwrap(),
            SizeSpec::Auto { headroom_pct: 10 }
        );
        assert_eq!(
            SizeSpec::parse("150", 10).unwrap(),
            SizeSpec::Fixed { mb: 150 }
        );
        assert_eq!(
            SizeSpec::parse("150MB", 10).unwrap(),
            SizeSpec::Fixed { mb: 150 }
        );
        assert!(SizeSpec::parse("huge", 10).is_err());
        assert!(SizeSpec::parse("2", 10).is_err());
    }

    #[test]
    fn estimate_grows_with_content() {
        let small = estimate_bytes(
            &TreeUsage {
                inodes: 10,
                blocks: 10,
            },
            100,
        );
        let big = estimate_bytes(
            &TreeUsage {
                inodes: 10,
                blocks: 10_000,
            },
            100,
        );
        assert!(big > small + 40_000_000);
    }
}
