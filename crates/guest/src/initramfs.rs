//! The initramfs stage: what `/init` does before the agent proper starts.
//!
//! Distro kernels keep virtio and overlayfs as modules, so something must load them before
//! the rootfs can be mounted. This stage loads them, mounts the image read-only, stacks an
//! overlay with a tmpfs upper layer on it (every write of a run stays in RAM; the image is
//! never modified and can be shared by any number of VMs), bind-mounts this very binary
//! over the image's agent (so the agent always matches the host that booted it), and
//! switches root to run `infra.operator guest` as PID 1.
//!
//! Kernel command-line parameters: `infra.root=DEV` (default `/dev/vda`),
//! `infra.overlay=0` (mount the image read-only without overlay), `infra.log=FILTER`
//! (`RUST_LOG` for the agent), `infra.init=PATH` (run this init instead, e.g. systemd).

use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Module load order written by the host's initramfs builder.
const MODULE_LIST: &str = "/etc/infra-operator/modules";
const MODULE_DIR: &str = "/lib/modules";
/// Where the agent lives in every image (see `infra_image`'s injector).
const AGENT_IN_IMAGE: &str = "/usr/local/bin/infra.operator";
/// Flags of every mount of the image: no setuid, no device nodes.
const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
/// How long to wait for the root disk to appear after its driver loads.
const ROOT_WAIT: Duration = Duration::from_secs(10);

/// Settings read from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOptions {
    /// Root block device.
    pub root: String,
    /// Stack a tmpfs overlay on the read-only image.
    pub overlay: bool,
    /// `RUST_LOG` for the agent, if given.
    pub log: Option<String>,
    /// Another init to run instead of the agent (e.g. `/lib/systemd/systemd`, which then
    /// starts the agent as a service: the seeds' boot path, kept for comparison).
    pub init: Option<String>,
}

impl StageOptions {
    /// Parses `/proc/cmdline` text.
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut o = StageOptions {
            root: "/dev/vda".into(),
            overlay: true,
            log: None,
            init: None,
        };
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("infra.root=") {
                o.root = v.to_string();
            } else if let Some(v) = word.strip_prefix("infra.overlay=") {
                o.overlay = !matches!(v, "0" | "off" | "no" | "false");
            } else if let Some(v) = word.strip_prefix("infra.log=") {
                o.log = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("infra.init=") {
                o.init = Some(v.to_string());
            }
        }
        o
    }
}

/// Whether this process is the initramfs `/init` (PID 1 started as `/init`).
pub fn is_initramfs_init() -> bool {
    std::process::id() == 1 && std::env::args_os().next().is_some_and(|a| a == "/init")
}

/// Runs the stage and execs the agent. Only returns by not returning: on failure it prints
/// the reason on the console and reboots, which ends the VM (the host reports the console).
pub fn run_stage() -> ! {
    let err = match stage() {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("infra.operator initramfs: {err}");
    nix::unistd::sync();
    std::thread::sleep(Duration::from_millis(200));
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

enum Never {}

fn stage() -> Result<Never, String> {
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(fail("mount /dev"))?;
    mount_fs("proc", "/proc", "proc", MsFlags::empty(), None).map_err(fail("mount /proc"))?;
    mount_fs("sysfs", "/sys", "sysfs", MsFlags::empty(), None).map_err(fail("mount /sys"))?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let opts = StageOptions::from_cmdline(&cmdline);

    // The module list is the archive's last file: without it the kernel ran out of memory
    // while unpacking (it logs "Initramfs unpacking failed" and carries on).
    let list = std::fs::read_to_string(MODULE_LIST).map_err(|e| {
        format!("{MODULE_LIST}: {e}: the initramfs did not unpack completely; give the VM more memory (--mem)")
    })?;
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        load_module(name, &module_params(&cmdline, name))?;
    }

    let deadline = Instant::now() + ROOT_WAIT;
    while !Path::new(&opts.root).exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "root device {} did not appear within {} s (no virtio-blk disk attached?)",
                opts.root,
                ROOT_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing on the image may grant privileges or open devices: the program runs without
    // setuid (`nosuid`) and device nodes (`nodev`) on every file system it can write or
    // execute from. /dev is its own mount.
    let ro = MsFlags::MS_RDONLY | NOSUID_NODEV;
    mount_fs(&opts.root, "/lower", "ext4", ro, None)
        .map_err(|e| format!("mount {} (ext4, read-only) on /lower: {e}", opts.root))?;

    let overlaid = opts.overlay
        && overlay()
            .map_err(|e| {
                eprintln!("infra.operator initramfs: no overlay ({e}); the root stays read-only")
            })
            .is_ok();
    if !overlaid {
        mount_fs("/lower", "/newroot", "", MsFlags::MS_BIND, None)
            .map_err(fail("bind the image on /newroot"))?;
    }
    // The agent in this initramfs is the host's own binary: use it in place of the image's.
    let agent = format!("/newroot{AGENT_IN_IMAGE}");
    if overlaid && !Path::new(&agent).exists() {
        let _ = std::fs::create_dir_all(Path::new(&agent).parent().unwrap());
        let _ = std::fs::File::create(&agent);
    }
    if Path::new(&agent).exists() {
        mount_fs("/init", &agent, "", MsFlags::MS_BIND, None)
            .map_err(fail("bind the agent into the image"))?;
    }

    // Keep the pristine image visible read-only (`rootfs verify` reports its usage).
    if overlaid {
        let _ = mount_fs("/lower", "/newroot/mnt/image", "", MsFlags::MS_MOVE, None);
    }
    std::fs::create_dir_all("/newroot/dev").ok();
    mount_fs("/dev", "/newroot/dev", "", MsFlags::MS_MOVE, None).map_err(fail("move /dev"))?;
    let _ = umount2("/proc", MntFlags::MNT_DETACH);
    let _ = umount2("/sys", MntFlags::MNT_DETACH);

    nix::unistd::chdir("/newroot").map_err(fail("chdir /newroot"))?;
    mount_fs(".", "/", "", MsFlags::MS_MOVE, None).map_err(fail("move the new root to /"))?;
    nix::unistd::chroot(".").map_err(fail("chroot"))?;
    nix::unistd::chdir("/").map_err(fail("chdir /"))?;

    let (prog, args) = match &opts.init {
        Some(init) => {
            let p = CString::new(init.as_str()).map_err(|_| "bad infra.init")?;
            (p.clone(), vec![p])
        }
        None => {
            let mut args = vec![
                CString::new("infra.operator").unwrap(),
                CString::new("guest").unwrap(),
            ];
            // The run's files live in /workspace, which belongs to the run-as user (this
            // machine serves one run). It is created on the writable overlay; without one it
            // must already be in the image, else the agent keeps its default under /tmp.
            if overlaid || Path::new(crate::VM_WORKSPACE).is_dir() {
                args.push(CString::new("--workspace").unwrap());
                args.push(CString::new(crate::VM_WORKSPACE).unwrap());
            }
            args.push(CString::new("--workspace-owner").unwrap());
            args.push(CString::new("run-as").unwrap());
            (CString::new(AGENT_IN_IMAGE).unwrap(), args)
        }
    };
    let mut env: Vec<CString> = vec![
        CString::new("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").unwrap(),
        CString::new("HOME=/root").unwrap(),
    ];
    if let Some(log) = &opts.log {
        env.push(CString::new(format!("RUST_LOG={log}")).map_err(|_| "bad infra.log")?);
    }
    let e = nix::unistd::execve(&prog, &args, &env).unwrap_err();
    Err(format!(
        "exec {}: {e} (not in the image?)",
        prog.to_string_lossy()
    ))
}

fn fail(what: &'static str) -> impl Fn(Errno) -> String {
    move |e| format!("{what}: {e}")
}

fn overlay() -> Result<(), String> {
    mount_fs("tmpfs", "/rw", "tmpfs", NOSUID_NODEV, Some("mode=0755"))
        .map_err(|e| format!("tmpfs on /rw: {e}"))?;
    for d in ["/rw/upper", "/rw/work"] {
        std::fs::create_dir_all(d).map_err(|e| format!("{d}: {e}"))?;
    }
    mount_fs(
        "overlay",
        "/newroot",
        "overlay",
        NOSUID_NODEV,
        Some("lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work"),
    )
    .map_err(|e| format!("overlay on /newroot: {e}"))
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> nix::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let fstype = (!fstype.is_empty()).then_some(fstype);
    mount(Some(src), target, fstype, flags, data)
}

/// The `module.param=value` words of the kernel command line for `module`, as the parameter
/// string `finit_module` takes (what modprobe does from `/proc/cmdline`; the kernel applies them
/// only to built-in code). Firecracker describes its devices this way
/// (`virtio_mmio.device=4K@0xd0000000:5`), so a modular `virtio_mmio` must get them to find any.
pub fn module_params(cmdline: &str, module: &str) -> String {
    let want = module.replace('-', "_");
    cmdline
        .split_whitespace()
        .filter_map(|w| {
            let (m, param) = w.split_once('.')?;
            (m.replace('-', "_") == want && param.contains('=') && !param.contains('\0'))
                .then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn load_module(name: &str, params: &str) -> Result<(), String> {
    let path = format!("{MODULE_DIR}/{name}.ko");
    let f = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    let params = CString::new(params).unwrap_or_default();
    match finit_module(f.as_fd(), &params, ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(format!("load module {name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let cmdline = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 virtio-mmio.x=1 virtio_blk.foo virtio.y=2\n";
        assert_eq!(
            module_params(cmdline, "virtio_mmio"),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6 x=1"
        );
        assert_eq!(module_params(cmdline, "virtio_blk"), "");
        assert_eq!(module_params(cmdline, "virtio"), "y=2");
    }

    #[test]
    fn cmdline_options() {
        let o =
            StageOptions::from_cmdline("console=ttyS0 quiet infra.root=/dev/vdb infra.log=debug\n");
        assert_eq!(o.root, "/dev/vdb");
        assert!(o.overlay);
        assert_eq!(o.log.as_deref(), Some("debug"));
        assert_eq!(o.init, None);
        let o = StageOptions::from_cmdline("infra.init=/lib/systemd/systemd");
        assert_eq!(o.init.as_deref(), Some("/lib/systemd/systemd"));
        let o = StageOptions::from_cmdline("infra.overlay=0");
        assert_eq!((o.root.as_str(), o.overlay), ("/dev/vda", false));
    }
}
