//! `infra.operator mount` / `umount`, and the `mount.infra-operator` helper form that
//! `mount(8)` runs for `/etc/fstab` lines of type `fuse.infra-operator`: flags and process
//! plumbing only; the file system is `infra_mount`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use clap::Args;
use infra_config::Paths;
use infra_mount::{MountOptions, MountRequest};

/// Environment variable that makes a foreground mount print `ready` on stdout once mounted
/// and then detach its output (set by the daemonizing parent for its child).
const READY_ENV: &str = "INFRA_OPERATOR_MOUNT_READY";

/// `mount` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator mount s3://my-s3-bucket /data
  infra.operator mount s3://my-s3-bucket/documents /mnt/docs -o ro,allow_other,uid=1000,gid=1000
  infra.operator mount my-s3-bucket /mnt/x -o url=http://127.0.0.1:3900,region=garage -f
  infra.operator mount s3://my-s3-bucket /mnt/x -o cache=/var/cache/s3,cache_size=20G,umask=022
  infra.operator mount s3://elasticbamboo-agent-share /home/bamboo/.m2 --print-systemd-unit -o uid=500,gid=501
  infra.operator umount /data

/etc/fstab (with /sbin/mount.fuse.infra-operator linked to this binary):
  my-s3-bucket /data fuse.infra-operator _netdev,allow_other,uid=33,gid=33 0 0

Options (-o, comma-separated; s3fs spellings accepted): ro, uid=, gid=, umask=, allow_other,
allow_root, cache=DIR (use_cache=DIR), cache_size=SIZE, url=URL, endpoint=URL|REGION, region=,
profile=, prefix=, ttl=SECONDS (listing/attribute cache, default 5), timeout=SECONDS (per
request, default 30), retries=N (default 2), threads=N (default 16), part_size=MIB,
nosuid, nodev, noexec, noatime. Credentials: the AWS chain (environment, profile, SSO, role).
What is guaranteed: docs/mount-semantics.md.")]
pub struct MountArgs {
    /// s3://BUCKET[/PREFIX] (also BUCKET[/PREFIX] or infra.operator#BUCKET).
    source: String,
    /// Directory to mount on.
    mountpoint: PathBuf,
    /// Mount options, comma-separated; may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground (logs on stderr); else detach once the mount is ready.
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Print a systemd unit that mounts this and exit.
    #[arg(long)]
    print_systemd_unit: bool,
}

/// `umount` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator umount /data
  infra.operator umount --lazy /data     # detach now, finish when the last file is closed")]
pub struct UmountArgs {
    /// The mount point.
    mountpoint: PathBuf,
    /// Detach now even with open files (the upload of files still open happens at their close).
    #[arg(short = 'l', long)]
    lazy: bool,
}

/// Runs `mount`: returns the process exit code (0, or the error was returned).
pub fn mount(a: MountArgs, paths: &Paths) -> Result<i32> {
    let options = MountOptions::parse(a.options.iter().map(String::as_str))?;
    for i in &options.ignored {
        tracing::debug!("option ignored: {i}");
    }
    if a.print_systemd_unit {
        let exe =
            std::env::current_exe().unwrap_or_else(|_| "/usr/local/bin/infra.operator".into());
        let exe = if exe.ends_with("infra-operator") {
            exe.with_file_name("infra.operator")
        } else {
            exe
        };
        let mountpoint = std::path::absolute(&a.mountpoint).unwrap_or(a.mountpoint.clone());
        print!(
            "{}",
            infra_mount::systemd_unit(&a.source, &mountpoint, &a.options.join(","), &exe)
        );
        return Ok(0);
    }
    let req = MountRequest {
        source: a.source.clone(),
        mountpoint: std::path::absolute(&a.mountpoint).unwrap_or(a.mountpoint.clone()),
        options,
    };
    if a.foreground {
        let detach = std::env::var_os(READY_ENV).is_some();
        let log = req
            .options
            .cache_dir
            .clone()
            .unwrap_or_else(|| paths.cache.join("mount"))
            .join("mount.log");
        infra_mount::serve(&req, paths, || {
            if detach {
                detach_output(&log);
            }
        })?;
        return Ok(0);
    }
    daemonize(&a)
}

/// The child of a daemonizing mount: says `ready` to the parent, then sends its output to the
/// log file (the parent has gone).
fn detach_output(log: &std::path::Path) {
    use std::io::Write;
    println!("ready");
    let _ = std::io::stdout().flush();
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .or_else(|_| std::fs::OpenOptions::new().write(true).open("/dev/null"));
    if let Ok(f) = out {
        let _ = nix::unistd::dup2_stdout(&f);
        let _ = nix::unistd::dup2_stderr(&f);
    }
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
    }
}

/// Starts this command again in the foreground in a new session, waits until it says the
/// mount is ready (exit 0) or fails (its one-line error is printed here, its exit code kept).
fn daemonize(a: &MountArgs) -> Result<i32> {
    let exe =
        std::env::current_exe().context("cannot find this program to start the mount daemon")?;
    let mut args: Vec<OsString> = vec!["mount".into(), a.source.clone().into()];
    args.push(a.mountpoint.clone().into_os_string());
    for o in &a.options {
        args.push("-o".into());
        args.push(o.into());
    }
    args.push("-f".into());
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .env(READY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().context("cannot start the mount daemon")?;
    let stdout = child.stdout.take().context("no pipe to the mount daemon")?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim() == "ready" {
        return Ok(0);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().context("waiting for the mount daemon")?;
    // The child printed "error: ..." already formatted: pass it on as it is.
    eprint!("{err}");
    Ok(status.code().unwrap_or(1).max(1))
}

/// Runs `umount`.
pub fn umount(a: UmountArgs) -> Result<i32> {
    infra_mount::unmount(&a.mountpoint, a.lazy)?;
    Ok(0)
}

/// When this binary runs as `mount.infra-operator` or `mount.fuse.infra-operator` (the
/// helper `mount(8)` runs for fstab type `fuse.infra-operator`), the arguments in mount's
/// form (`SOURCE DIR [-sfnv] [-o OPTIONS]`), turned into `infra.operator mount ...`; `None`
/// otherwise. mount's `-f` ("fake") makes it exit at once.
pub fn helper_args(argv: &[OsString]) -> Option<Vec<OsString>> {
    let name = std::path::Path::new(argv.first()?).file_name()?.to_str()?;
    if !name.starts_with("mount.") || !name.ends_with("infra-operator") {
        return None;
    }
    let mut out: Vec<OsString> = vec!["infra.operator".into(), "mount".into()];
    let mut positional = Vec::new();
    let mut opts = Vec::new();
    let mut fake = false;
    let mut it = argv[1..].iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                if let Some(o) = it.next() {
                    opts.push(o.clone());
                }
            }
            Some("-t") => {
                it.next();
            }
            Some(f) if f.starts_with('-') && f.len() > 1 && !f.starts_with("--") => {
                fake |= f.contains('f');
            }
            _ => positional.push(a.clone()),
        }
    }
    if fake {
        return Some(vec!["infra.operator".into(), "--version".into()]);
    }
    out.extend(positional);
    for o in opts {
        out.push("-o".into());
        out.push(o);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<OsString> {
        s.iter().map(|x| x.into()).collect()
    }

    #[test]
    fn mount_helper_form() {
        assert_eq!(helper_args(&v(&["infra.operator", "mount"])), None);
        assert_eq!(
            helper_args(&v(&[
                "/sbin/mount.fuse.infra-operator",
                "my-s3-bucket",
                "/mnt/x",
                "-o",
                "rw,_netdev,allow_other",
                "-n"
            ])),
            Some(v(&[
                "infra.operator",
                "mount",
                "my-s3-bucket",
                "/mnt/x",
                "-o",
                "rw,_netdev,allow_other"
            ]))
        );
        assert_eq!(
            helper_args(&v(&["mount.infra-operator", "b", "/m", "-fv"])),
            Some(v(&["infra.operator", "--version"]))
        );
    }
}
