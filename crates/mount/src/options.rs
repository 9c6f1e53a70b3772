//! `-o` options of `mount`, in the comma-separated form s3fs and `/etc/fstab` use.
//!
//! Our own options, the s3fs spellings of the same things (`use_cache=`, `url=`, `endpoint=` as
//! a region), and the generic options `mount(8)` passes to a helper (`_netdev`, `defaults`,
//! `nofail`, `auto`, ...) are accepted; anything else is refused with the list of known options,
//! so a typo does not silently mount with defaults.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{MountError, Result};

/// Default lifetime of cached listings and attributes (also the kernel's entry/attr TTL).
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// Default limit for one request (and for each wait for more bytes of a download).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default attempts per request (the first and the retries).
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Default number of FUSE worker threads (requests served at once).
pub const DEFAULT_THREADS: usize = 16;
/// Default limit of the staging (write cache) directory.
pub const DEFAULT_CACHE_LIMIT: u64 = 16 * 1024 * 1024 * 1024;

/// Everything `-o` can say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Read-only mount (`ro`).
    pub read_only: bool,
    /// Every file shows this owner (`uid=`), whatever its metadata says.
    pub uid: Option<u32>,
    /// Every file shows this group (`gid=`).
    pub gid: Option<u32>,
    /// Permission bits cleared from every mode shown (`umask=`, octal).
    pub umask: Option<u32>,
    /// Other users may use the mount (`allow_other`).
    pub allow_other: bool,
    /// Root may use a user's mount (`allow_root`).
    pub allow_root: bool,
    /// Staging directory for files being written (`cache=DIR`, s3fs `use_cache=DIR`).
    pub cache_dir: Option<PathBuf>,
    /// Most bytes staged at once (`cache_size=` with K/M/G/T suffix); writes past it fail with
    /// ENOSPC.
    pub cache_limit: u64,
    /// Endpoint URL (`url=`, or `endpoint=` when it is a URL).
    pub endpoint_url: Option<String>,
    /// Region (`region=`, or s3fs's `endpoint=REGION`).
    pub region: Option<String>,
    /// AWS profile (`profile=`).
    pub profile: Option<String>,
    /// Key prefix inside the bucket (`prefix=`), added to the one in the URL.
    pub prefix: Option<String>,
    /// Lifetime of cached listings and attributes (`ttl=` seconds, may be fractional; 0
    /// disables the caches).
    pub ttl: Duration,
    /// Limit of one request (`timeout=` seconds).
    pub timeout: Duration,
    /// Attempts per request (`retries=`: the number of retries after the first attempt).
    pub attempts: u32,
    /// FUSE worker threads (`threads=`).
    pub threads: usize,
    /// Multipart part size in bytes (`part_size=` MiB); `None`: the store's default.
    pub part_size: Option<u64>,
    /// Kernel mount flags passed through (`nosuid`, `nodev`, `noexec`, `noatime`, ...).
    pub kernel_flags: Vec<String>,
    /// Options accepted for compatibility and ignored, with why (printed at debug level).
    pub ignored: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            uid: None,
            gid: None,
            umask: None,
            allow_other: false,
            allow_root: false,
            cache_dir: None,
            cache_limit: DEFAULT_CACHE_LIMIT,
            endpoint_url: None,
            region: None,
            profile: None,
            prefix: None,
            ttl: DEFAULT_TTL,
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            threads: DEFAULT_THREADS,
            part_size: None,
            kernel_flags: Vec::new(),
            ignored: Vec::new(),
        }
    }
}

/// Names of the options, for the error message and `--help`.
pub const KNOWN: &str = "ro, rw, uid=N, gid=N, umask=OCTAL, allow_other, allow_root, \
cache=DIR (use_cache=DIR), cache_size=SIZE, url=URL, endpoint=URL|REGION, region=R, profile=P, \
prefix=P, ttl=SECONDS, timeout=SECONDS, retries=N, threads=N, part_size=MIB, nosuid, nodev, \
noexec, noatime, and the fstab options _netdev, defaults, auto, noauto, nofail, user, users";

impl MountOptions {
    /// Parses one or more `-o` values (each comma-separated), later ones winning.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut o = Self::default();
        for v in values {
            for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                o.apply(item)?;
            }
        }
        Ok(o)
    }

    fn apply(&mut self, item: &str) -> Result<()> {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let bad = |reason: &str| MountError::Option {
            option: item.to_string(),
            reason: reason.to_string(),
        };
        fn need<'v>(v: Option<&'v str>, item: &str) -> Result<&'v str> {
            v.filter(|v| !v.is_empty())
                .ok_or_else(|| MountError::Option {
                    option: item.to_string(),
                    reason: "needs a value".into(),
                })
        }
        match k {
            "ro" => self.read_only = true,
            "rw" => self.read_only = false,
            "uid" => self.uid = Some(parse_id(need(v, item)?).ok_or_else(|| bad("not a number"))?),
            "gid" => self.gid = Some(parse_id(need(v, item)?).ok_or_else(|| bad("not a number"))?),
            "umask" => {
                let m = u32::from_str_radix(need(v, item)?, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| bad("an octal mask 000-777"))?;
                self.umask = Some(m);
            }
            "allow_other" => self.allow_other = true,
            "allow_root" => self.allow_root = true,
            "cache" | "use_cache" => self.cache_dir = Some(PathBuf::from(need(v, item)?)),
            "cache_size" => {
                self.cache_limit =
                    parse_size(need(v, item)?).ok_or_else(|| bad("a size such as 512M or 20G"))?
            }
            "url" => self.endpoint_url = aws_default_is_none(need(v, item)?),
            // s3fs: `endpoint=` is the region; a URL there is taken as the endpoint.
            "endpoint" => {
                let v = need(v, item)?;
                if v.contains("://") {
                    self.endpoint_url = aws_default_is_none(v);
                } else {
                    self.region = Some(v.to_string());
                }
            }
            "region" => self.region = Some(need(v, item)?.to_string()),
            "profile" => self.profile = Some(need(v, item)?.to_string()),
            "prefix" => self.prefix = Some(need(v, item)?.to_string()),
            "ttl" | "stat_cache_expire" => {
                let s: f64 = need(v, item)?.parse().map_err(|_| bad("seconds"))?;
                if !(0.0..=86400.0).contains(&s) {
                    return Err(bad("0 to 86400 seconds"));
                }
                self.ttl = Duration::from_secs_f64(s);
            }
            "timeout" => {
                let s: f64 = need(v, item)?.parse().map_err(|_| bad("seconds"))?;
                if !(0.1..=3600.0).contains(&s) {
                    return Err(bad("0.1 to 3600 seconds"));
                }
                self.timeout = Duration::from_secs_f64(s);
            }
            "retries" => {
                let n: u32 = need(v, item)?.parse().map_err(|_| bad("a number"))?;
                if n > 20 {
                    return Err(bad("0 to 20"));
                }
                self.attempts = n + 1;
            }
            "threads" => {
                let n: usize = need(v, item)?.parse().map_err(|_| bad("a number"))?;
                if !(1..=256).contains(&n) {
                    return Err(bad("1 to 256"));
                }
                self.threads = n;
            }
            "part_size" => {
                let n: u64 = need(v, item)?.parse().map_err(|_| bad("MiB"))?;
                if !(5..=5120).contains(&n) {
                    return Err(bad("5 to 5120 MiB"));
                }
                self.part_size = Some(n * 1024 * 1024);
            }
            "nosuid" | "nodev" | "noexec" | "noatime" | "suid" | "dev" | "exec" | "atime"
            | "sync" | "async" | "dirsync" => self.kernel_flags.push(k.to_string()),
            // mount(8) and fstab options that are not for the file system.
            "_netdev"
            | "defaults"
            | "auto"
            | "noauto"
            | "nofail"
            | "user"
            | "users"
            | "owner"
            | "group"
            | "comment"
            | "x-systemd.automount" => self
                .ignored
                .push(format!("{item}: handled by mount(8)/systemd")),
            // s3fs options that the credential chain or our defaults already cover.
            "iam_role" => self.ignored.push(format!(
                "{item}: instance roles are found by the credential chain (IMDS) without it"
            )),
            "use_path_request_style" | "sigv4" | "sigv2" | "use_rrs" | "nonempty" => self
                .ignored
                .push(format!("{item}: not needed (path style is used with url=)")),
            k if k.starts_with("x-") => self.ignored.push(format!("{item}: a mount(8) comment")),
            _ => return Err(bad(&format!("unknown option; known: {KNOWN}"))),
        }
        Ok(())
    }
}

/// `https://s3.amazonaws.com` (the seed's `url=`) is AWS itself: no custom endpoint.
fn aws_default_is_none(url: &str) -> Option<String> {
    let host = url.split("://").nth(1).unwrap_or(url).trim_end_matches('/');
    if host == "s3.amazonaws.com" {
        None
    } else {
        Some(url.to_string())
    }
}

/// A numeric id (names are resolved by the caller, which knows the user database).
fn parse_id(v: &str) -> Option<u32> {
    v.parse().ok().or_else(|| {
        let c = std::ffi::CString::new(v).ok()?;
        nix::unistd::User::from_name(c.to_str().ok()?)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
            .or_else(|| {
                nix::unistd::Group::from_name(v)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
            })
    })
}

/// `512M`, `20G`, `1048576`.
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last()? {
        (i, 'K' | 'k') => (&v[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&v[..i], 1 << 20),
        (i, 'G' | 'g') => (&v[..i], 1 << 30),
        (i, 'T' | 't') => (&v[..i], 1 << 40),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_fstab_options_parse() {
        // The seed's fstab line, with our type.
        let o = MountOptions::parse([
            "_netdev,rw,nosuid,nodev,allow_other,uid=33,gid=33,use_rrs,use_cache=/tmp,url=https://s3.amazonaws.com",
        ])
        .unwrap();
        assert!(o.allow_other && !o.read_only);
        assert_eq!((o.uid, o.gid), (Some(33), Some(33)));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/tmp")));
        assert_eq!(o.endpoint_url, None);
        assert_eq!(o.kernel_flags, ["nosuid", "nodev"]);
        // The seed's upstart line: endpoint= is the region.
        let o = MountOptions::parse([
            "rw,uid=500,gid=501,iam_role=RoleX,use_cache=/tmp,endpoint=ap-southeast-2,url=https://s3.amazonaws.com",
        ])
        .unwrap();
        assert_eq!(o.region.as_deref(), Some("ap-southeast-2"));
        assert_eq!(o.uid, Some(500));
    }

    #[test]
    fn our_options_parse_and_bad_ones_are_refused() {
        let o = MountOptions::parse([
            "ro,umask=022,url=http://127.0.0.1:3900,region=garage,profile=p,prefix=a/b,ttl=0.5,timeout=3,retries=1,threads=4,part_size=8,cache_size=1G",
        ])
        .unwrap();
        assert!(o.read_only);
        assert_eq!(o.umask, Some(0o022));
        assert_eq!(o.endpoint_url.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(o.ttl, Duration::from_millis(500));
        assert_eq!(o.timeout, Duration::from_secs(3));
        assert_eq!(o.attempts, 2);
        assert_eq!(o.threads, 4);
        assert_eq!(o.part_size, Some(8 << 20));
        assert_eq!(o.cache_limit, 1 << 30);
        for bad in [
            "umask=999",
            "uid=",
            "ttl=-1",
            "threads=0",
            "bogus",
            "part_size=1",
            "timeout=0",
        ] {
            let e = MountOptions::parse([bad]).unwrap_err();
            assert!(
                e.to_string().contains(bad.split('=').next().unwrap()),
                "{e}"
            );
        }
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("x"), None);
    }
}
