//! File attributes in object metadata, exactly as s3fs-fuse stores them (checked against the
//! Debian s3fs 1.90 binary): `x-amz-meta-mode` is the decimal `st_mode` (type bits included for
//! files and symbolic links; s3fs writes a directory's as permission bits only and marks the
//! `dir/` object with `Content-Type: application/x-directory`), `x-amz-meta-uid`/`-gid` are
//! decimal ids, and `x-amz-meta-mtime` (with `-atime`, `-ctime`) is decimal seconds, followed
//! by `.` and nine digits of nanoseconds when those are not zero. A symbolic link is an object
//! whose content is the target and whose mode has `S_IFLNK`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use infra_store::{Metadata, ObjectInfo};

/// `x-amz-meta-mode`.
pub const MODE: &str = "mode";
/// `x-amz-meta-uid`.
pub const UID: &str = "uid";
/// `x-amz-meta-gid`.
pub const GID: &str = "gid";
/// `x-amz-meta-mtime`.
pub const MTIME: &str = "mtime";
/// `x-amz-meta-atime`.
pub const ATIME: &str = "atime";
/// `x-amz-meta-ctime`.
pub const CTIME: &str = "ctime";

/// File type bits.
pub const S_IFMT: u32 = 0o170000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Directory.
pub const S_IFDIR: u32 = 0o040000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;

/// What an object is in the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory (`dir/` object or a common prefix).
    Dir,
    /// A symbolic link.
    Symlink,
}

/// The attributes the mount keeps for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// File type.
    pub kind: Kind,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Permission bits (and setuid/setgid/sticky), without the type.
    pub perm: u32,
    /// Owner as stored (`None`: not stored; the mount's default applies).
    pub uid: Option<u32>,
    /// Group as stored.
    pub gid: Option<u32>,
    /// Modification time.
    pub mtime: SystemTime,
}

impl Attr {
    /// Attributes of something the bucket says nothing about (a prefix without a `dir/`
    /// object, the root).
    pub fn implied_dir() -> Self {
        Self {
            kind: Kind::Dir,
            size: 0,
            perm: 0o755,
            uid: None,
            gid: None,
            mtime: UNIX_EPOCH,
        }
    }

    /// Attributes from an object's metadata (a HEAD answer); `dir` when the key ends in `/`.
    pub fn from_object(info: &ObjectInfo, dir: bool) -> Self {
        let m = &info.metadata;
        let mode = m.get(MODE).and_then(|v| v.trim().parse::<u32>().ok());
        let kind = if dir {
            Kind::Dir
        } else {
            match mode.map(|m| m & S_IFMT) {
                Some(S_IFLNK) => Kind::Symlink,
                _ => Kind::File,
            }
        };
        let perm = match (mode, kind) {
            (Some(m), _) => m & 0o7777,
            (None, Kind::Dir) => 0o755,
            (None, Kind::Symlink) => 0o777,
            (None, Kind::File) => 0o644,
        };
        let mtime = m
            .get(MTIME)
            .and_then(|v| parse_time(v))
            .or_else(|| info.last_modified.map(SystemTime::from))
            .unwrap_or(UNIX_EPOCH);
        Self {
            kind,
            size: if dir { 0 } else { info.size },
            perm,
            uid: m.get(UID).and_then(|v| v.trim().parse().ok()),
            gid: m.get(GID).and_then(|v| v.trim().parse().ok()),
            mtime,
        }
    }

    /// Attributes from a listing entry (no metadata: defaults until a HEAD tells more).
    pub fn from_listing(info: &ObjectInfo) -> Self {
        Self {
            kind: Kind::File,
            size: info.size,
            perm: 0o644,
            uid: None,
            gid: None,
            mtime: info
                .last_modified
                .map(SystemTime::from)
                .unwrap_or(UNIX_EPOCH),
        }
    }

    /// The full `st_mode`, type bits included.
    pub fn mode(&self) -> u32 {
        let t = match self.kind {
            Kind::File => S_IFREG,
            Kind::Dir => S_IFDIR,
            Kind::Symlink => S_IFLNK,
        };
        t | (self.perm & 0o7777)
    }

    /// The metadata s3fs writes for these attributes (`ctime` and `atime` set to `now`'s
    /// change time and the mtime).
    pub fn to_metadata(&self, uid: u32, gid: u32, ctime: SystemTime) -> Metadata {
        let mut m = Metadata::new();
        m.insert(MODE.into(), self.mode().to_string());
        m.insert(UID.into(), self.uid.unwrap_or(uid).to_string());
        m.insert(GID.into(), self.gid.unwrap_or(gid).to_string());
        m.insert(MTIME.into(), format_time(self.mtime));
        m.insert(ATIME.into(), format_time(self.mtime));
        m.insert(CTIME.into(), format_time(ctime));
        m
    }
}

/// `1700000000` or `1700000000.500000000` (s3fs's format) to a time; `None` when not one.
pub fn parse_time(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let negative = secs.starts_with('-');
    let secs: u64 = secs.trim_start_matches('-').parse().ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut f = frac.to_string();
        f.truncate(9);
        while f.len() < 9 {
            f.push('0');
        }
        f.parse().ok()?
    };
    if negative {
        UNIX_EPOCH.checked_sub(Duration::new(secs, 0))
    } else {
        UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    }
}

/// A time in s3fs's format (seconds, `.nnnnnnnnn` only when there are nanoseconds).
pub fn format_time(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() == 0 => d.as_secs().to_string(),
        Ok(d) => format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
        Err(e) => format!("-{}", e.duration().as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(meta: &[(&str, &str)]) -> ObjectInfo {
        ObjectInfo {
            key: "k".into(),
            size: 6,
            last_modified: None,
            etag: None,
            version_id: None,
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The metadata below is what s3fs 1.90 wrote on Garage (see the module doc).
    #[test]
    fn reads_what_s3fs_writes() {
        let f = Attr::from_object(
            &obj(&[
                ("mode", "33152"),
                ("uid", "12"),
                ("gid", "34"),
                ("mtime", "1796308094"),
            ]),
            false,
        );
        assert_eq!(f.kind, Kind::File);
        assert_eq!(f.perm, 0o600);
        assert_eq!((f.uid, f.gid), (Some(12), Some(34)));
        assert_eq!(f.mtime, UNIX_EPOCH + Duration::from_secs(1796308094));
        let d = Attr::from_object(&obj(&[("mode", "493")]), true);
        assert_eq!((d.kind, d.perm, d.mode()), (Kind::Dir, 0o755, 0o40755));
        let l = Attr::from_object(&obj(&[("mode", "41471")]), false);
        assert_eq!((l.kind, l.perm), (Kind::Symlink, 0o777));
        let t = Attr::from_object(&obj(&[("mtime", "1700000000.500000000")]), false);
        assert_eq!(t.mtime, UNIX_EPOCH + Duration::new(1700000000, 500_000_000));
        assert_eq!(t.perm, 0o644);
    }

    #[test]
    fn writes_what_s3fs_reads() {
        let a = Attr {
            kind: Kind::File,
            size: 1,
            perm: 0o600,
            uid: Some(12),
            gid: None,
            mtime: UNIX_EPOCH + Duration::new(1700000000, 500_000_000),
        };
        let m = a.to_metadata(0, 7, UNIX_EPOCH + Duration::from_secs(5));
        assert_eq!(m["mode"], "33152");
        assert_eq!(m["uid"], "12");
        assert_eq!(m["gid"], "7");
        assert_eq!(m["mtime"], "1700000000.500000000");
        assert_eq!(m["ctime"], "5");
        let l = Attr {
            kind: Kind::Symlink,
            perm: 0o777,
            ..a
        };
        assert_eq!(l.to_metadata(0, 0, UNIX_EPOCH)["mode"], "41471");
        assert_eq!(
            parse_time("12.5"),
            Some(UNIX_EPOCH + Duration::new(12, 500_000_000))
        );
        assert_eq!(parse_time("x"), None);
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(3)), "3");
    }
}
