//! Setting a mount up and taking it down: the bucket is checked before the kernel mount, the
//! caller is told when the mount is ready (so a daemonizing front end reports errors before it
//! detaches, and systemd's `Type=notify` works), SIGTERM/SIGINT unmount.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infra_config::Paths;
use infra_store::{Location, ObjectStore, S3Store, StoreConfig, StoreFlags};

use crate::error::{MountError, Result};
use crate::fs::{Fs, FsConfig};
use crate::fuse::FuseFs;
use crate::options::MountOptions;

/// FUSE subtype (`fuse.infra-operator` is the fstab type; a root mount shows as `fuse` in
/// `/proc/mounts`, with the bucket as the source).
pub const SUBTYPE: &str = "infra-operator";

/// What to mount where.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// `s3://BUCKET[/PREFIX]`, `BUCKET[/PREFIX]` or `infra.operator#BUCKET` (fstab).
    pub source: String,
    /// The directory to mount on.
    pub mountpoint: PathBuf,
    /// `-o` options.
    pub options: MountOptions,
}

/// `infra.operator#bucket`, `bucket/prefix`, `s3://bucket/prefix` → the store location (with
/// `prefix=` appended).
pub fn location(source: &str, opts: &MountOptions) -> Result<Location> {
    let s = source
        .strip_prefix("infra.operator#")
        .or_else(|| source.strip_prefix("infra-operator#"))
        .unwrap_or(source);
    let loc = Location::parse(s).map_err(|e| MountError::Source {
        value: source.to_string(),
        reason: e.to_string(),
    })?;
    Ok(match (loc, &opts.prefix) {
        (Location::S3 { bucket, prefix }, Some(p)) => Location::S3 {
            bucket,
            prefix: format!("{prefix}{}/", p.trim_matches('/')),
        },
        (Location::Local { root, prefix }, Some(p)) => Location::Local {
            root,
            prefix: format!("{prefix}{}/", p.trim_matches('/')),
        },
        (loc, None) => loc,
    })
}

/// The store configuration of a mount: the options first, then the usual flags → environment
/// → config file chain of the store crate.
pub fn store_config(req: &MountRequest, paths: &Paths) -> Result<StoreConfig> {
    let loc = location(&req.source, &req.options)?;
    let flags = StoreFlags {
        bucket: Some(loc.display()),
        region: req.options.region.clone(),
        endpoint_url: req.options.endpoint_url.clone(),
        profile: req.options.profile.clone(),
        part_size_mib: req.options.part_size.map(|b| b / (1024 * 1024)),
        concurrency: None,
    };
    Ok(StoreConfig::from_env(&flags, paths)?)
}

async fn open_store(cfg: &StoreConfig, opts: &MountOptions) -> Result<Arc<dyn ObjectStore>> {
    match cfg.s3_settings() {
        Some(mut s) => {
            s.max_attempts = opts.attempts;
            Ok(Arc::new(S3Store::connect(&s).await?))
        }
        None => Ok(cfg.open().await?),
    }
}

fn check_mountpoint(p: &Path) -> Result<()> {
    let bad = |reason: &str| MountError::Mountpoint {
        path: p.to_path_buf(),
        reason: reason.to_string(),
    };
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(bad("it is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(bad("it does not exist (create it with mkdir -p)"))
        }
        Err(e) => Err(bad(&format!(
            "{e} (is something already mounted there and broken? try `infra.operator umount`)"
        ))),
    }
}

/// Mounts and serves until unmounted. `ready` is called once the kernel mount is live (and
/// not at all when setting up failed: the error is returned instead).
pub fn serve(req: &MountRequest, paths: &Paths, ready: impl FnOnce()) -> Result<()> {
    check_mountpoint(&req.mountpoint)?;
    let opts = &req.options;
    let cfg = store_config(req, paths)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("mount-io")
        .enable_all()
        .build()
        .map_err(|source| MountError::Local {
            op: "start the async runtime for",
            path: req.mountpoint.clone(),
            source,
        })?;
    let store = rt.block_on(async {
        let store = open_store(&cfg, opts).await?;
        // One request before mounting: a wrong bucket, credentials or endpoint is reported
        // here, not as EIO on the first `ls`.
        match tokio::time::timeout(opts.timeout, store.list_page("", "/", None, Some(1))).await {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(e)) => Err(MountError::from(e)),
            Err(_) => Err(MountError::ProbeTimeout {
                seconds: opts.timeout.as_secs().max(1),
            }),
        }
    })?;
    let settings = StoreSettings {
        cache_dir: opts
            .cache_dir
            .clone()
            .unwrap_or_else(|| paths.cache.join("mount")),
        part_size: cfg.part_size.unwrap_or(infra_store::DEFAULT_PART),
        concurrency: cfg.concurrency,
    };
    serve_store(store, req, &settings, rt, ready)
}

/// What a mount takes from the store configuration.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Staging directory (when `cache=` is not given).
    pub cache_dir: PathBuf,
    /// Multipart part size (and threshold).
    pub part_size: u64,
    /// Parts in flight.
    pub concurrency: usize,
}

/// Mounts an opened store (what [`serve`] does after checking the bucket; tests call it with
/// their own store) and serves until unmounted, on `rt`.
pub fn serve_store(
    store: Arc<dyn ObjectStore>,
    req: &MountRequest,
    settings: &StoreSettings,
    rt: tokio::runtime::Runtime,
    ready: impl FnOnce(),
) -> Result<()> {
    check_mountpoint(&req.mountpoint)?;
    let opts = &req.options;
    let cache_dir = settings.cache_dir.clone();
    std::fs::create_dir_all(&cache_dir).map_err(|source| MountError::Local {
        op: "create the cache directory",
        path: cache_dir.clone(),
        source,
    })?;
    tempfile::tempfile_in(&cache_dir).map_err(|source| MountError::Local {
        op: "write in the cache directory",
        path: cache_dir.clone(),
        source,
    })?;
    let fs_cfg = FsConfig {
        default_uid: nix::unistd::getuid().as_raw(),
        default_gid: nix::unistd::getgid().as_raw(),
        force_uid: opts.uid,
        force_gid: opts.gid,
        umask: opts.umask.unwrap_or(0),
        read_only: opts.read_only,
        ttl: opts.ttl,
        timeout: opts.timeout,
        part_size: opts.part_size.unwrap_or(settings.part_size),
        concurrency: settings.concurrency,
        cache_dir,
        cache_limit: opts.cache_limit,
    };
    let fs = Arc::new(Fs::new(store, fs_cfg));
    let fuse = FuseFs::new(fs, rt.handle().clone());

    let mut config = fuser::Config::default();
    config.mount_options = mount_options(&req.source, opts);
    config.acl = if opts.allow_other {
        fuser::SessionACL::All
    } else if opts.allow_root {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(opts.threads);
    let mut session =
        fuser::Session::new(fuse, &req.mountpoint, &config).map_err(|source| MountError::Fuse {
            path: req.mountpoint.clone(),
            hint: fuse_hint(&source),
            source,
        })?;
    let mut unmounter = session.unmount_callable();
    let mp = req.mountpoint.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("unmounting {} on a signal", mp.display());
            match unmounter.unmount() {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    "cannot unmount {} yet: {e} (files are open; close them, or use umount -l)",
                    mp.display()
                ),
            }
        }
    });
    tracing::info!("mounted {} on {}", req.source, req.mountpoint.display());
    notify_systemd("READY=1");
    ready();
    let r = session.run().map_err(|source| MountError::Fuse {
        path: req.mountpoint.clone(),
        hint: "the FUSE session ended with an error".into(),
        source,
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    r
}

fn mount_options(source: &str, opts: &MountOptions) -> Vec<fuser::MountOption> {
    use fuser::MountOption as M;
    let mut v = vec![
        M::FSName(source.replace(',', "_")),
        M::Subtype(SUBTYPE.into()),
        // The kernel checks modes and owners against what getattr reports.
        M::DefaultPermissions,
    ];
    if opts.read_only {
        v.push(M::RO);
    }
    for f in &opts.kernel_flags {
        v.push(match f.as_str() {
            "nosuid" => M::NoSuid,
            "suid" => M::Suid,
            "nodev" => M::NoDev,
            "dev" => M::Dev,
            "noexec" => M::NoExec,
            "exec" => M::Exec,
            "noatime" => M::NoAtime,
            "atime" => M::Atime,
            "sync" => M::Sync,
            "async" => M::Async,
            "dirsync" => M::DirSync,
            other => M::CUSTOM(other.to_string()),
        });
    }
    v
}

fn fuse_hint(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(nix::libc::ENOENT) => {
            "/dev/fuse or fusermount3 is missing: load the module (modprobe fuse) and install \
             fuse3"
                .into()
        }
        Some(nix::libc::EPERM) | Some(nix::libc::EACCES) => {
            "not permitted: run as root, or install fuse3 (fusermount3) and, for allow_other, \
             enable user_allow_other in /etc/fuse.conf"
                .into()
        }
        Some(nix::libc::EBUSY) => "something is already mounted there".into(),
        _ => "check that /dev/fuse exists and fuse3 is installed".into(),
    }
}

/// Tells systemd (`Type=notify`) about the state when `NOTIFY_SOCKET` is set.
pub fn notify_systemd(state: &str) {
    let Some(sock) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = sock.to_string_lossy().into_owned();
    let Ok(d) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let r = if let Some(name) = sock.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| d.send_to_addr(state.as_bytes(), &a))
    } else {
        d.send_to(state.as_bytes(), &sock)
    };
    if let Err(e) = r {
        tracing::warn!("cannot notify systemd at {sock}: {e}");
    }
}

/// Unmounts a mount point: `umount2` as root (lazily with `lazy`), else `fusermount3 -u`.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let err = |source: std::io::Error, hint: &str| MountError::Unmount {
        path: mountpoint.to_path_buf(),
        hint: hint.to_string(),
        source,
    };
    if nix::unistd::geteuid().is_root() {
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        return nix::mount::umount2(mountpoint, flags).map_err(|e| {
            let hint = match e {
                nix::errno::Errno::EBUSY => {
                    "files are open or a process has its working directory there: close them, \
                     or unmount lazily with --lazy"
                }
                nix::errno::Errno::EINVAL => "it is not a mount point",
                _ => "check the path",
            };
            err(std::io::Error::from(e), hint)
        });
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg(mountpoint).output().map_err(|e| {
        err(
            e,
            "fusermount3 is needed to unmount as a user: install fuse3",
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            "fusermount3 -u failed",
        ))
    }
}

/// A systemd unit that mounts `source` on `mountpoint` (`Type=notify`: ready once mounted;
/// stopping it unmounts).
pub fn systemd_unit(source: &str, mountpoint: &Path, options: &str, exe: &Path) -> String {
    let mp = mountpoint.display();
    let opts = if options.is_empty() {
        String::new()
    } else {
        format!(" -o {options}")
    };
    format!(
        "# /etc/systemd/system/infra-operator-mount-{name}.service
# Credentials come from the usual chain: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY in an EnvironmentFile (mode 0600), or use an instance role.
[Unit]
Description=infra.operator mount of {source} on {mp}
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
#EnvironmentFile=/etc/infra-operator/mount.env
ExecStartPre=/bin/mkdir -p {mp}
ExecStart={exe} mount {source} {mp} -f{opts}
ExecStop=/bin/umount {mp}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
",
        name = systemd_name(mountpoint),
        exe = exe.display(),
    )
}

/// `/mnt/bamboo-share` → `mnt-bamboo\x2dshare`-like, simplified: path components joined by
/// `-`, other characters than `[A-Za-z0-9_]` as `_`.
fn systemd_name(p: &Path) -> String {
    let s: String = p
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| match c {
            '/' => '-',
            c if c.is_ascii_alphanumeric() || c == '_' => c,
            _ => '_',
        })
        .collect();
    if s.is_empty() {
        "root".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        let o = MountOptions::default();
        assert_eq!(
            location("s3://my-s3-bucket/documents", &o)
                .unwrap()
                .display(),
            "s3://my-s3-bucket/documents/"
        );
        assert_eq!(
            location("infra.operator#my-s3-bucket", &o)
                .unwrap()
                .display(),
            "s3://my-s3-bucket/"
        );
        let o = MountOptions::parse(["prefix=pdf"]).unwrap();
        assert_eq!(
            location("my-s3-bucket/x", &o).unwrap().display(),
            "s3://my-s3-bucket/x/pdf/"
        );
        assert!(location("s3://A", &o).is_err());
    }

    #[test]
    fn unit_has_notify_and_unmount() {
        let u = systemd_unit(
            "s3://elasticbamboo-agent-share",
            Path::new("/home/bamboo/.m2"),
            "uid=500,gid=501",
            Path::new("/usr/local/bin/infra.operator"),
        );
        assert!(u.contains("Type=notify"));
        assert!(u.contains(
            "ExecStart=/usr/local/bin/infra.operator mount s3://elasticbamboo-agent-share /home/bamboo/.m2 -f -o uid=500,gid=501"
        ));
        assert!(u.contains("ExecStop=/bin/umount /home/bamboo/.m2"));
        assert!(u.contains("infra-operator-mount-home-bamboo-_m2.service"));
    }
}
