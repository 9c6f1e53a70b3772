//! End to end: the real binary boots real microVMs (QEMU `-M microvm`; TCG on hosts without
//! a working KVM) from Debian's cloud kernel and a debootstrap'd Python image, both fetched
//! and built by `run` itself on first use, exactly as on a fresh machine.
//!
//! The home directory persists under the target dir, so the kernel and image are made once
//! per checkout. VM tests take a lock: two cores do not need several TCG guests at once.
//! Every test checks that no VM directory or VMM process is left behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_infra-operator");

/// The home sits under a private (0700) directory, as homes often do (`/root`, CI checkouts):
/// VMMs that run as their own uids must not need to search the directories above it.
fn home() -> PathBuf {
    let private = Path::new(env!("CARGO_TARGET_TMPDIR")).join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    private.join("vm-home")
}

fn cli(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env("INFRA_OPERATOR_HOME", home())
        .env_remove("RUST_LOG")
        .args(args);
    c
}

fn run(args: &[&str]) -> Output {
    cli(args).stdin(Stdio::null()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): stdout={} stderr={}",
            text(&o.stdout),
            text(&o.stderr)
        )
    })
}

/// Serializes VM tests and makes sure the kernel and image exist, made the way a user's
/// first `run` makes them (the README's main command).
fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    static READY: OnceLock<()> = OnceLock::new();
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    READY.get_or_init(|| {
        let o = run(&["run", "--lang", "python", "--code", "print('hello')"]);
        assert!(
            o.status.success(),
            "first run (fetch kernel, build image, boot) failed: {}\n{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        assert_eq!(text(&o.stdout), "hello\n");
        assert!(home().join("vmlinux").exists());
        assert!(home().join("images/rootfs-python.ext4").exists());
        assert_clean();
    });
    guard
}

/// What is left in a run directory besides the uid lease files (they stay: their locks are
/// the leases); VM directories must not.
fn vm_dirs_left(run_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(run_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name() != infra_vmm::uid::LEASE_DIR)
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// No VM directory and no process of ours (QEMU, Firecracker) outlives a run.
fn assert_clean() {
    let run_dir = home().join("run");
    let left = vm_dirs_left(&run_dir);
    assert!(left.is_empty(), "VM directories left behind: {left:?}");
    let marker = run_dir.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    for _ in 0..50 {
        let procs: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .chars()
                    .all(|c| c.is_ascii_digit())
            })
            .filter(|e| e.file_name().to_string_lossy() != me)
            .filter_map(|e| {
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = text(&cmd).replace('\0', " ");
                cmd.contains(&marker).then_some(cmd)
            })
            .collect();
        if procs.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("VMM processes left behind");
}

#[test]
fn python_prints_42_with_json_result() {
    let _g = vm_lock();
    let o = run(&["run", "-l", "python", "-c", "print(6*7)", "--json"]);
    let v = json(&o);
    assert_eq!(v["stdout"], "42\n", "{v}");
    assert_eq!(v["status"], "success");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["backend"], "qemu");
    assert!(v["trace_id"].as_str().unwrap().starts_with("tr-"));
    assert!(v["exec_time"].as_f64().unwrap() > 0.0);
    assert!(o.status.success());
    assert_clean();
}

#[test]
fn exit_code_stdin_env_args_and_stderr_pass_through() {
    let _g = vm_lock();
    let code = "import os, sys\n\
                data = sys.stdin.read()\n\
                print(data.upper(), os.environ['GREETING'], sys.argv[1:])\n\
                print('to stderr', file=sys.stderr)\n\
                sys.exit(3)\n";
    let o = run(&[
        "run",
        "-l",
        "python",
        "-c",
        code,
        "--accel",
        "tcg",
        "--stdin",
        "abc",
        "--env",
        "GREETING=hi",
        "--",
        "x",
        "y",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "ABC hi ['x', 'y']\n");
    assert!(text(&o.stderr).contains("to stderr"));
    assert_clean();
}

#[test]
fn binary_output_passes_through_unchanged() {
    let _g = vm_lock();
    let code = "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 3)\n";
    let o = run(&["run", "-l", "python", "-c", code, "--accel", "tcg"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let want: Vec<u8> = (0..=255u8).cycle().take(768).collect();
    assert_eq!(o.stdout, want);
    assert_clean();
}

#[test]
fn timeout_kills_the_tree_and_reports_124() {
    let _g = vm_lock();
    // A grandchild that closed stdout keeps running: the kill must still reach it.
    // 5 s, not 2: Python's start alone takes about 2 s under TCG on a loaded 2-core host.
    let code = "import subprocess, time\n\
                subprocess.Popen(['sleep', '1000'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
                print('started', flush=True)\n\
                time.sleep(1000)\n";
    let o = run(&[
        "run", "-l", "python", "-c", code, "-t", "5", "--accel", "tcg", "--json",
    ]);
    let v = json(&o);
    assert_eq!(o.status.code(), Some(124));
    assert_eq!(v["status"], "timeout");
    assert_eq!(v["timed_out"], true);
    assert_eq!(v["stdout"], "started\n");
    assert_clean();
}

#[test]
fn output_cap_truncates_and_keeps_draining() {
    let _g = vm_lock();
    let code = "import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 50000)\nprint('done', file=sys.stderr)\n";
    let o = run(&[
        "run",
        "-l",
        "python",
        "-c",
        code,
        "--max-output",
        "10000",
        "--accel",
        "tcg",
        "--json",
    ]);
    let v = json(&o);
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["stdout_truncated"], true);
    assert!(v["stdout"].as_str().unwrap().len() < 11_000);
    assert_eq!(
        v["stderr"], "done\n",
        "the program was not blocked by the cap"
    );
    assert_clean();
}

#[test]
fn fork_bomb_and_memory_hog_end_with_a_status() {
    let _g = vm_lock();
    let bomb =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let o = run(&[
        "run", "-l", "python", "-c", bomb, "-t", "5", "--accel", "tcg", "--json",
    ]);
    let v = json(&o);
    assert_eq!(v["status"], "timeout", "{v}");
    assert_clean();

    let hog = "a = bytearray(4 << 30)\nprint(len(a))\n";
    let o = run(&[
        "run", "-l", "python", "-c", hog, "--mem", "320", "--accel", "tcg", "--json",
    ]);
    let v = json(&o);
    assert_eq!(v["status"], "error", "{v}");
    assert!(v["stderr"].as_str().unwrap().contains("MemoryError"), "{v}");
    assert_clean();
}

/// Starts a `run` whose program prints `up` and sleeps; returns once it printed.
fn start_sleeper() -> std::process::Child {
    let mut child = cli(&[
        "run",
        "-l",
        "python",
        "-c",
        "import time\nprint('up', flush=True)\ntime.sleep(600)",
        "--accel",
        "tcg",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut first = [0u8; 3];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first, b"up\n");
    child
}

#[test]
fn killed_vmm_is_reported_and_cleaned_up() {
    let _g = vm_lock();
    // The program runs (it printed `up`); then it is interrupted.
    let child = start_sleeper();
    let qemu = qemu_children(child.id());
    assert_eq!(qemu.len(), 1, "one VMM per run");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = text(&o.stderr);
    assert!(err.contains("VM exited unexpectedly"), "{err}");
    assert_clean();
}

/// QEMU started by root runs as a uid of its own (from `--vm-uids`) under its seccomp sandbox,
/// with no supplementary groups, and still boots and runs the program.
#[test]
fn qemu_runs_as_its_own_uid_under_seccomp() {
    let _g = vm_lock();
    let child = start_sleeper();
    let qemu = qemu_children(child.id());
    assert_eq!(qemu.len(), 1, "one VMM per run");
    let status = std::fs::read_to_string(format!("/proc/{}/status", qemu[0])).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let uids = field("Uid:");
    assert_eq!(uids.len(), 4, "{status}");
    for u in &uids {
        let u: u32 = u.parse().unwrap();
        assert!((900_000..910_000).contains(&u), "QEMU uid {u}: {status}");
    }
    assert_eq!(field("Gid:")[0], uids[0], "gid is the uid's number");
    assert!(field("Groups:").is_empty(), "no supplementary groups");
    assert_eq!(field("Seccomp:"), ["2"], "seccomp filter mode: {status}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
    assert_clean();
}

#[test]
fn ctrl_c_stops_the_vm_and_removes_its_files() {
    let _g = vm_lock();
    // The program runs (it printed `up`); then it is interrupted.
    let child = start_sleeper();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("interrupted"),
        "{}",
        text(&o.stderr)
    );
    assert_clean();
}

fn qemu_children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("");
            after.split_whitespace().nth(1) == Some(&parent.to_string())
                && stat.contains("(qemu-system-x86")
        })
        .collect()
}

/// Runs `print(1)` with `extra` flags, expects the sandbox to fail (125) with `reason`.
fn assert_sandbox_failure(extra: &[&str], reason: &str) {
    let mut args = vec!["run", "-l", "python", "-c", "print(1)", "--accel", "tcg"];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(125));
    let err = text(&o.stderr);
    assert!(err.contains(reason), "{err}");
    assert_clean();
}

#[test]
fn missing_root_disk_fails_the_boot_with_the_guest_reason() {
    let _g = vm_lock();
    assert_sandbox_failure(
        &["--kernel-args", "infra.root=/dev/vdz"],
        "root device /dev/vdz did not appear",
    );
}

#[test]
fn boot_timeout_is_a_clear_error() {
    let _g = vm_lock();
    assert_sandbox_failure(&["--boot-timeout", "1"], "not ready after 1 s");
}

#[test]
fn rootfs_verify_and_host_output() {
    let _g = vm_lock();
    let o = run(&["rootfs", "verify", "--lang", "python", "--accel", "tcg"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains("=== Language Versions ===") && out.contains("Python 3."),
        "{out}"
    );
    assert!(
        out.contains("=== Disk Usage ===") && out.contains("/mnt/image"),
        "{out}"
    );
    assert_clean();

    let o = run(&["host", "-l", "python", "-c", "print(6*7)", "--accel", "tcg"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    let (head, body) = out.split_once('\n').unwrap();
    assert_eq!(head, "=== Execution Result ===");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["stdout"], "42\n");
    assert_clean();
}

/// The representative set of issue 11, in one polyglot image: each language prints its
/// version and runs the language table's programs in a VM (hello world, stdin summed with exit
/// code 3, and a broken program answered with compile_error for the compiled ones).
#[test]
fn polyglot_image_verifies_the_representative_languages() {
    let _g = vm_lock();
    let langs = "python,nodejs,c,java,go,rust,bash";
    let o = run(&[
        "rootfs", "create", "--langs", langs, "--name", "polyglot", "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let m = json(&o);
    assert_eq!(m["languages"].as_array().map(Vec::len), Some(7), "{m}");

    let o = run(&[
        "rootfs", "verify", "--langs", langs, "--rootfs", "polyglot", "--accel", "tcg", "--json",
    ]);
    let v = json(&o);
    assert!(o.status.success(), "{v:#}\n{}", text(&o.stderr));
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 7, "{v:#}");
    for r in results {
        assert_eq!(r["ok"], true, "{r:#}");
        let checks: Vec<&str> = r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["check"].as_str().unwrap())
            .collect();
        let compiled = ["c", "java", "go", "rust"].contains(&r["lang"].as_str().unwrap());
        if compiled {
            assert_eq!(checks, ["hello", "stdin", "compile_error"], "{r:#}");
            // The build's time is reported apart from the run's.
            assert!(r["checks"][0]["build_ms"].as_u64().is_some(), "{r:#}");
        } else {
            assert_eq!(checks, ["hello", "stdin"], "{r:#}");
        }
        assert!(!r["version"].as_str().unwrap().is_empty(), "{r:#}");
    }
    assert_clean();

    // A compile error through `run`: the compiler's message, exit status of the build, and
    // no run time.
    let o = run(&[
        "run",
        "--lang",
        "c",
        "--rootfs",
        "polyglot",
        "--accel",
        "tcg",
        "--json",
        "--code",
        "int main( { return 0; }",
    ]);
    let r = json(&o);
    assert_eq!(r["status"], "compile_error", "{r:#}");
    assert!(
        r["compile_output"].as_str().unwrap().contains("error"),
        "{r:#}"
    );
    assert!(r["compile_time"].as_f64().unwrap() > 0.0, "{r:#}");
    assert_eq!(r["exec_time"].as_f64(), Some(0.0), "{r:#}");
    assert_clean();
}

#[test]
fn bad_requests_fail_before_booting() {
    // No VM is booted: no lock needed.
    // Not in the table (cobol was an unknown language before the table had all 45).
    let o = run(&["run", "-l", "brainfuck", "-c", "+."]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("unknown language 'brainfuck'"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&["run", "-l", "python", "-c", "   "]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("empty"), "{}", text(&o.stderr));
    for bad in [
        "/etc/hostname:../x",
        "/etc/hostname:/abs",
        "/nonexistent/file",
    ] {
        let o = run(&["run", "-l", "python", "-c", "1", "--file-in", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o.stderr));
    }
}

#[test]
fn missing_image_is_fetched_from_the_store_before_building() {
    let _g = vm_lock();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let bucket = store.to_str().unwrap();
    // Publish the image from the shared home to a local-directory store.
    let o = cli(&["rootfs", "upload", "--lang", "python", "--bucket", bucket])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    // A second host (a fresh home) runs python: the image comes from the store, no build.
    let home2 = tmp.path().join("home2");
    let o = Command::new(BIN)
        .env("INFRA_OPERATOR_HOME", &home2)
        .env("BUCKET", bucket)
        .args(["run", "-l", "python", "-c", "print(6*7)", "--accel", "tcg"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(text(&o.stdout), "42\n");
    assert!(
        !err.contains("debootstrap"),
        "built instead of fetched: {err}"
    );
    assert!(err.contains("download:"), "{err}");
    assert!(
        home2.join("images/rootfs-python.json").is_file(),
        "the manifest came along"
    );
    let run_dir = home2.join("run");
    let left = vm_dirs_left(&run_dir);
    assert!(left.is_empty(), "VM directories left behind: {left:?}");
}

/// A copy of the python image that also ships a setuid-root `id` (`/usr/local/bin/suid-id`,
/// made with debugfs from the image's own `/usr/bin/id`): a setuid binary that reports its
/// effective uid.
fn suid_test_image(dir: &Path) -> PathBuf {
    let img = dir.join("rootfs-suid.ext4");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(home().join("images/rootfs-python.ext4"))
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let id = dir.join("id");
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /usr/bin/id {}", id.display()))
        .arg(&img)
        .output()
        .unwrap();
    assert!(id.is_file(), "debugfs dump: {}", text(&o.stderr));
    let cmds = dir.join("debugfs.cmds");
    std::fs::write(
        &cmds,
        format!(
            "cd /usr/local/bin\nwrite {} suid-id\nsif suid-id mode 0104755\nsif suid-id uid 0\nsif suid-id gid 0\n",
            id.display()
        ),
    )
    .unwrap();
    let o = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "debugfs: {}", text(&o.stderr));
    img
}

/// One program that tries what untrusted code must not be able to do in the VM and prints a
/// `CHECK <name> ok|FAIL <detail>` line per attempt; then exits 7 with output on both streams.
const PRIVILEGE_PROBE: &str = r#"
import ctypes, errno, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(name, ok, detail=""):
    print(f"CHECK {name} {'ok' if ok else 'FAIL'} {detail}".rstrip(), flush=True)
def err():
    return errno.errorcode.get(ctypes.get_errno(), "?")
def fails(name, fn):
    try:
        fn()
        check(name, False, "succeeded")
    except OSError as e:
        check(name, True, errno.errorcode.get(e.errno, str(e)))

nnp = [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs:")]
check("no_new_privs", [l.split()[1] for l in nnp] == ["1"], nnp)
check("runs_as_nobody", os.geteuid() == 65534 and os.getuid() == 65534, os.geteuid())

mounts = {}
for l in open("/proc/self/mounts"):
    _dev, mp, _fs, opts = l.split()[:4]
    mounts[mp] = opts.split(",")
def mount_of(path):
    path = os.path.realpath(path)
    return max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
for name, path in [("root", "/"), ("tmp", "/tmp"), ("workspace", os.getcwd())]:
    mp = mount_of(path)
    check(f"nosuid_nodev_{name}", "nosuid" in mounts[mp] and "nodev" in mounts[mp], f"{mp} {','.join(mounts[mp])}")

for k in ["protected_hardlinks", "protected_symlinks", "protected_regular", "protected_fifos"]:
    v = int(open(f"/proc/sys/fs/{k}").read())
    check(k, v >= 1, v)

st = os.stat("/usr/local/bin/suid-id")
check("suid_id_shipped", st.st_uid == 0 and st.st_mode & 0o4000 != 0, oct(st.st_mode))
out = subprocess.run(["/usr/local/bin/suid-id"], capture_output=True, text=True).stdout.strip()
check("setuid_binary_keeps_euid_65534", "euid=" not in out and out.startswith("uid=65534"), out)
su = next(p for p in ["/usr/bin/su", "/bin/su"] if os.path.exists(p))
st = os.stat(su)
check("su_is_setuid_root", st.st_uid == 0 and st.st_mode & 0o4000 != 0, oct(st.st_mode))
r = subprocess.run([su, "-c", "id -u", "root"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
check("su_does_not_give_root", r.returncode != 0 and r.stdout.strip() != "0", f"rc={r.returncode} {r.stderr.strip()!r}")

fails("write_etc_new_file", lambda: open("/etc/infra-probe", "w"))
fails("write_etc_passwd", lambda: open("/etc/passwd", "a"))
r = libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)
check("mount_syscall", r != 0, err())
r = subprocess.run(["mount", "-t", "tmpfs", "none", "/mnt"], capture_output=True, text=True)
check("mount_binary", r.returncode != 0, r.stderr.strip())
r = libc.syscall(175, None, 0, b"")  # init_module
check("load_module", r != 0 and ctypes.get_errno() == errno.EPERM, err())
fails("kill_9_pid_1", lambda: os.kill(1, 9))
fails("read_dev_mem", lambda: open("/dev/mem", "rb").read(1))
r = libc.ptrace(16, 1, None, None)  # PTRACE_ATTACH to the agent
check("ptrace_agent", r != 0, err())
fails("open_agent_memory", lambda: open("/proc/1/mem", "rb"))
fails("write_agent_binary", lambda: open("/usr/local/bin/infra.operator", "ab"))
port = None
for d in os.listdir("/sys/class/virtio-ports"):
    if open(f"/sys/class/virtio-ports/{d}/name").read().strip() == "agent":
        port = f"/dev/{d}"
check("agent_port_found", port is not None, port)
fails("open_agent_port", lambda: os.open(port, os.O_RDWR | os.O_NONBLOCK))
cg = open("/proc/self/cgroup").read().strip().split("::")[-1]
fails("raise_own_memory_limit", lambda: open(f"/sys/fs/cgroup{cg}/memory.max", "w").write("max"))
extra = sorted(int(f) for f in os.listdir("/proc/self/fd") if int(f) > 2)
# listdir's own descriptor is the only one allowed beyond stdio.
check("no_inherited_descriptors", len(extra) <= 1, extra)
print("to stderr", file=sys.stderr)
print("done")
sys.exit(7)
"#;

#[test]
fn untrusted_code_cannot_become_root_or_reach_the_agent() {
    let _g = vm_lock();
    let tmp = tempfile::tempdir().unwrap();
    let img = suid_test_image(tmp.path());
    let o = run(&[
        "run",
        "-l",
        "python",
        "-c",
        PRIVILEGE_PROBE,
        "--rootfs",
        img.to_str().unwrap(),
        "--accel",
        "tcg",
        "-t",
        "120",
    ]);
    let out = text(&o.stdout);
    let err = text(&o.stderr);
    // The run still reports the program's own exit code and output.
    assert_eq!(o.status.code(), Some(7), "{out}\n{err}");
    assert!(out.ends_with("done\n"), "{out}\n{err}");
    assert!(err.contains("to stderr"), "{err}");
    let checks: Vec<&str> = out.lines().filter(|l| l.starts_with("CHECK ")).collect();
    let failed: Vec<&&str> = checks
        .iter()
        .filter(|l| l.split_whitespace().nth(2) != Some("ok"))
        .collect();
    assert!(failed.is_empty(), "checks failed:\n{}", checks.join("\n"));
    for name in [
        "no_new_privs",
        "runs_as_nobody",
        "nosuid_nodev_root",
        "nosuid_nodev_tmp",
        "nosuid_nodev_workspace",
        "protected_hardlinks",
        "protected_symlinks",
        "protected_regular",
        "protected_fifos",
        "setuid_binary_keeps_euid_65534",
        "su_does_not_give_root",
        "write_etc_new_file",
        "write_etc_passwd",
        "mount_syscall",
        "mount_binary",
        "load_module",
        "kill_9_pid_1",
        "read_dev_mem",
        "ptrace_agent",
        "open_agent_memory",
        "write_agent_binary",
        "open_agent_port",
        "raise_own_memory_limit",
        "no_inherited_descriptors",
    ] {
        assert!(
            checks
                .iter()
                .any(|l| l.starts_with(&format!("CHECK {name} ok"))),
            "no passing check {name}:\n{}",
            checks.join("\n")
        );
    }
    assert_clean();
}

/// Files in, files out: `--file-in` puts host files in /workspace (the program's working
/// directory), and what the program writes under output/ (relative or as /workspace/output)
/// comes back into `--output-dir` under its name, listed in the JSON result. The 3 MiB file
/// crosses in several chunks both ways.
#[test]
fn input_files_go_in_and_output_files_come_back() {
    let _g = vm_lock();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data.txt");
    std::fs::write(&data, "21\n").unwrap();
    let blob: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    let blob_path = work.path().join("blob.bin");
    std::fs::write(&blob_path, &blob).unwrap();
    let out = work.path().join("OUT");
    let code = "import os\n\
                print(os.getcwd())\n\
                n = int(open('data.txt').read())\n\
                open('output/result.txt', 'w').write(str(2 * n))\n\
                os.makedirs('/workspace/output/sub')\n\
                open('/workspace/output/sub/b.bin', 'wb').write(open('in/blob.bin', 'rb').read())\n\
                os.symlink('/etc/passwd', 'output/passwd')\n";
    let o = run(&[
        "run",
        "--lang",
        "python",
        "-c",
        code,
        "--file-in",
        &format!("{}:data.txt", data.display()),
        "--file-in",
        &format!("{}:in/blob.bin", blob_path.display()),
        "--output-dir",
        out.to_str().unwrap(),
        "--accel",
        "tcg",
        "--json",
    ]);
    let v = json(&o);
    assert!(o.status.success(), "{v}\n{}", text(&o.stderr));
    assert_eq!(v["stdout"], "/workspace\n", "{v}");
    assert_eq!(
        v["output_files"],
        serde_json::json!([
            {"name": "result.txt", "bytes": 2, "mode": 0o644},
            {"name": "sub/b.bin", "bytes": 3 << 20, "mode": 0o644},
        ]),
        "{v}"
    );
    assert_eq!(v["output_files_skipped"], serde_json::json!([]));
    assert_eq!(v["output_files_truncated"], false);
    assert_eq!(
        std::fs::read_to_string(out.join("result.txt")).unwrap(),
        "42"
    );
    assert!(std::fs::read(out.join("sub/b.bin")).unwrap() == blob);
    // Only the two files (the symlink stayed in the guest), no staging directory left.
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["result.txt", "sub"]);
    assert_clean();
}

/// The HTTP API server started by the real binary on a free loopback port.
struct ApiServer {
    child: std::process::Child,
    base: String,
}

impl ApiServer {
    fn start(extra: &[&str]) -> Self {
        use std::io::BufRead;
        let mut args = vec!["api", "--port", "0"];
        args.extend_from_slice(extra);
        let mut child = cli(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("api printed its address").unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, base }
    }

    /// curl: returns (status, body).
    fn curl(&self, args: &[&str]) -> (u16, Vec<u8>) {
        let o = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "curl {args:?}: {}", text(&o.stderr));
        let mut body = o.stdout;
        let pos = body.iter().rposition(|b| *b == b'\n').unwrap();
        let status = text(&body[pos + 1..]).trim().parse().unwrap();
        body.truncate(pos);
        (status, body)
    }

    fn post_json(&self, path: &str, v: &serde_json::Value) -> (u16, serde_json::Value) {
        let url = format!("{}{path}", self.base);
        let body = v.to_string();
        let (s, b) = self.curl(&["-H", "content-type: application/json", "-d", &body, &url]);
        (
            s,
            serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}: {}", text(&b))),
        )
    }

    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "api exits 0 on SIGTERM: {status}");
    }
}

#[test]
fn http_api_runs_code_with_files_in_and_out_and_streams() {
    let _g = vm_lock();
    let api = ApiServer::start(&[]);
    // A file through the Files API, then a run that reads it and writes two outputs.
    let data = std::env::temp_dir().join(format!("api-vm-{}.txt", std::process::id()));
    std::fs::write(&data, "21\n").unwrap();
    let (s, b) = api.curl(&[
        "-F",
        "purpose=assistants",
        "-F",
        &format!("file=@{};filename=numbers.txt", data.display()),
        &format!("{}/v1/files", api.base),
    ]);
    std::fs::remove_file(&data).unwrap();
    assert_eq!(s, 200, "{}", text(&b));
    let file: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let code = "import os\nn = int(open('numbers.txt').read())\nprint(n * 2)\nos.makedirs('/workspace/output/sub', exist_ok=True)\nopen('/workspace/output/result.txt', 'w').write(str(n * 3))\nopen('output/sub/b.bin', 'wb').write(bytes(range(256)))\n";
    let (s, r) = api.post_json(
        "/api/v1/execute",
        &serde_json::json!({"language": "python", "code": code, "file_ids": [file["id"]]}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["stdout"], "42\n");
    let outs = r["output_files"].as_array().unwrap();
    assert_eq!(outs.len(), 2, "{r}");
    let find = |p: &str| {
        outs.iter()
            .find(|o| o["path"] == p)
            .unwrap_or_else(|| panic!("{p} in {r}"))
    };
    let (s, body) = api.curl(&[&format!(
        "{}/v1/files/{}/content",
        api.base,
        find("result.txt")["id"].as_str().unwrap()
    )]);
    assert_eq!((s, text(&body)), (200, "63".to_string()));
    let (_, body) = api.curl(&[&format!(
        "{}/v1/files/{}/content",
        api.base,
        find("sub/b.bin")["id"].as_str().unwrap()
    )]);
    assert_eq!(body, (0..=255u8).collect::<Vec<_>>());
    let (_, listed) = api.curl(&[&format!("{}/v1/files?purpose=assistants_output", api.base)]);
    let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    for o in outs {
        assert!(
            listed["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["id"] == o["id"]),
            "{o} listed as assistants_output"
        );
    }

    // The stream: output events as they happen, then the result.
    let (s, body) = api.curl(&[
        "-N",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"language":"python","code":"import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)"}"#,
        &format!("{}/api/v1/execute/stream", api.base),
    ]);
    assert_eq!(s, 200);
    let sse = text(&body);
    // Chunks may split anywhere: join each stream's events.
    let joined = |name: &str| -> String {
        let mut out = String::new();
        let mut lines = sse.lines();
        while let Some(l) = lines.next() {
            if l == format!("event: {name}") {
                let d = lines.next().unwrap().trim_start_matches("data: ");
                let v: serde_json::Value = serde_json::from_str(d).unwrap();
                out.push_str(v["data"].as_str().unwrap());
            }
        }
        out
    };
    assert_eq!(joined("stdout"), "out\n", "{sse}");
    assert_eq!(joined("stderr"), "err\n", "{sse}");
    let exit_line = sse
        .lines()
        .skip_while(|l| *l != "event: exit")
        .nth(1)
        .unwrap_or_else(|| panic!("no exit event: {sse}"));
    let exit: serde_json::Value =
        serde_json::from_str(exit_line.trim_start_matches("data: ")).unwrap();
    assert_eq!(exit["exit_code"], 3);

    // The original's batch form: one VM per input.
    let (s, r) = api.post_json(
        "/api/v1/run",
        &serde_json::json!({"language": "python", "code": "print(int(input()) + 1)", "stdin": ["1", "41"]}),
    );
    assert_eq!(s, 200, "{r}");
    let outs: Vec<&str> = r
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["stdout"].as_str().unwrap())
        .collect();
    assert_eq!(outs, ["2\n", "42\n"]);
    assert_eq!(r[1]["stdin"], "41");

    let (_, m) = api.curl(&[&format!("{}/metrics", api.base)]);
    let m = text(&m);
    assert!(
        m.contains("infra_operator_runs_total{language=\"python\",status=\"success\"} 3"),
        "{m}"
    );
    api.stop();
    assert_clean();
}

#[test]
fn http_api_answers_429_when_its_queue_is_full() {
    let _g = vm_lock();
    let cfg = std::env::temp_dir().join(format!("api-429-{}.yaml", std::process::id()));
    std::fs::write(&cfg, "runs: {max_concurrent: 1, max_queue: 0}\n").unwrap();
    let api = ApiServer::start(&["--config", cfg.to_str().unwrap()]);
    let base = api.base.clone();
    let slow = std::thread::spawn(move || {
        Command::new("curl")
            .args(["-sS", "-H", "content-type: application/json", "-d"])
            .arg(r#"{"language":"python","code":"import time\ntime.sleep(4)\nprint('done')"}"#)
            .arg(format!("{base}/api/v1/execute"))
            .output()
            .unwrap()
    });
    // Wait until the first run holds the slot.
    let mut busy = None;
    for _ in 0..600 {
        let (_, h) = api.curl(&[&format!("{}/health", api.base)]);
        let h: serde_json::Value = serde_json::from_slice(&h).unwrap();
        if h["running"] == 1 {
            busy = Some(());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(busy.is_some(), "the first run never started");
    let (s, body) = api.curl(&[
        "-D",
        "-",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"language":"python","code":"print(1)"}"#,
        &format!("{}/api/v1/execute", api.base),
    ]);
    let t = text(&body).to_lowercase();
    assert_eq!(s, 429, "{t}");
    assert!(t.contains("retry-after: "), "{t}");
    assert!(t.contains("\"code\":\"rate_limit_exceeded\""), "{t}");
    let first = slow.join().unwrap();
    assert!(
        text(&first.stdout).contains("\"stdout\":\"done\\n\""),
        "{}",
        text(&first.stdout)
    );
    api.stop();
    std::fs::remove_file(&cfg).unwrap();
    assert_clean();
}

/// Removes the language's snapshot when dropped (the other tests boot cold).
struct SnapshotGuard(PathBuf);

impl Drop for SnapshotGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn snapshots_restore_unique_vms_and_refuse_what_does_not_fit() {
    let _g = vm_lock();
    let dir = home().join("snapshots/python");
    let _cleanup = SnapshotGuard(dir.clone());
    let o = run(&["snapshot", "create", "--lang", "python", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let m = json(&o);
    assert_eq!(m["lang"], "python");
    assert_eq!(m["backend"], "qemu");
    assert_eq!(m["mem_mib"], 512);
    let state = dir.join(m["files"].as_object().unwrap().keys().next().unwrap());
    assert!(state.exists() && dir.join("manifest.json").exists());
    assert_clean();
    let o = run(&["snapshot", "list", "--json"]);
    assert!(o.status.success());
    assert_eq!(json(&o)[0]["lang"], "python");

    // Two VMs restored from it at once: each reseeded, so their randomness differs, and each
    // given the host's clock.
    let code = "import os, uuid, time; print(os.urandom(16).hex(), uuid.uuid4(), time.time())";
    let runs: Vec<_> = (0..2)
        .map(|_| {
            cli(&["run", "--lang", "python", "--json", "--code", code])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut seen = Vec::new();
    for child in runs {
        let o = child.wait_with_output().unwrap();
        let after = unix_now();
        assert!(o.status.success(), "{}", text(&o.stderr));
        let r = json(&o);
        assert_eq!(r["start"], "restore", "{r}");
        assert!(r.get("start_note").is_none(), "{r}");
        let out = r["stdout"].as_str().unwrap().to_string();
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "{out}");
        let guest_time: f64 = fields[2].parse().unwrap();
        let took = r["total_time"].as_f64().unwrap();
        assert!(
            guest_time <= after + 1.0 && guest_time >= after - took - 5.0,
            "the restored guest's clock says {guest_time}, the host's {after} (run took {took} s)"
        );
        seen.push((fields[0].to_string(), fields[1].to_string()));
    }
    assert_ne!(seen[0].0, seen[1].0, "os.urandom repeated across restores");
    assert_ne!(seen[0].1, seen[1].1, "uuid4 repeated across restores");
    assert_clean();

    // Another --mem than the snapshot's: booted, and the reason given.
    let o = run(&[
        "run", "-l", "python", "--mem", "640", "--json", "-c", "print(1)",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r = json(&o);
    assert_eq!(r["start"], "boot");
    let note = r["start_note"].as_str().unwrap();
    assert!(note.contains("memory (MiB) 512"), "{note}");
    // --cold boots without a note.
    let r = json(&run(&[
        "run", "-l", "python", "--cold", "--json", "-c", "print(1)",
    ]));
    assert_eq!(r["start"], "boot");
    assert!(r.get("start_note").is_none(), "{r}");

    // A corrupted state file (same size, one byte changed) is refused before QEMU reads it;
    // the run boots instead and nothing is left running.
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&state, &bytes).unwrap();
    let o = run(&["run", "-l", "python", "-c", "print('still runs')"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "still runs\n");
    let err = text(&o.stderr);
    assert!(
        err.contains("booted instead of restoring") && err.contains("corrupted"),
        "{err}"
    );
    assert_clean();

    let o = run(&["snapshot", "rm", "--lang", "python"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!dir.exists());
    let o = run(&["snapshot", "rm", "--lang", "python"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
}

/// The server's `infra_operator_vms_pooled` gauge.
fn pooled(api: &ApiServer) -> i64 {
    let (_, m) = api.curl(&[&format!("{}/metrics", api.base)]);
    text(&m)
        .lines()
        .find(|l| l.starts_with("infra_operator_vms_pooled "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(-1)
}

fn wait_pooled(api: &ApiServer, want: i64) {
    for _ in 0..1200 {
        if pooled(api) == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the pool never reached {want} ready VMs");
}

#[test]
fn http_api_hands_out_pool_vms_once_and_refills() {
    let _g = vm_lock();
    let cfg = std::env::temp_dir().join(format!("api-pool-{}.yaml", std::process::id()));
    std::fs::write(&cfg, "runs: {pool: {python: 1}}\n").unwrap();
    let api = ApiServer::start(&["--config", cfg.to_str().unwrap()]);
    wait_pooled(&api, 1);
    // Each execution gets a pooled VM of its own: a file written by the first is not seen by
    // the second.
    let code = "import os\nprint(os.path.exists('/tmp/mark'))\nopen('/tmp/mark','w').write('x')";
    for round in 0..2 {
        let (s, body) = api.curl(&[
            "-H",
            "content-type: application/json",
            "-d",
            &serde_json::json!({"language": "python", "code": code}).to_string(),
            &format!("{}/api/v1/execute", api.base),
        ]);
        assert_eq!(s, 200, "{}", text(&body));
        let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(r["start"], "pool", "round {round}: {r}");
        assert_eq!(
            r["stdout"], "False\n",
            "round {round}: state leaked between runs"
        );
        assert_eq!(r["boot_time"], 0.0);
        // Refilled in the background.
        wait_pooled(&api, 1);
    }
    api.stop();
    std::fs::remove_file(&cfg).unwrap();
    assert_clean();
}

/// A fresh host with nothing but a bucket configured runs code: the kernel bundle, the image
/// and the snapshot come from the store (a real Garage), and neither apt nor debootstrap is
/// on its PATH, so nothing could have come from elsewhere. The run restores the snapshot.
#[test]
fn fresh_host_runs_from_a_bucket_alone() {
    let _g = vm_lock();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let garage = rt.block_on(infra_store::testing::Garage::start());
    rt.block_on(garage.create_bucket("fleet"));
    let with_bucket = |c: &mut Command| {
        for (k, v) in garage.env() {
            c.env(k, v);
        }
        c.env("BUCKET", "s3://fleet/prod");
    };
    let snap = home().join("snapshots/python");
    let _cleanup = SnapshotGuard(snap.clone());
    let o = run(&["snapshot", "create", "--lang", "python", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for args in [
        &["store", "upload", "--all"][..],
        &["snapshot", "upload", "--lang", "python"][..],
    ] {
        let mut c = cli(args);
        with_bucket(&mut c);
        let o = c.stdin(Stdio::null()).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    }
    let mut c = cli(&["snapshot", "list", "--remote", "--json"]);
    with_bucket(&mut c);
    let listed = json(&c.output().unwrap());
    assert_eq!(listed[0]["lang"], "python", "{listed}");
    assert_eq!(listed[0]["manifest"]["mem_mib"], 512, "{listed}");

    // The fresh host: an empty home (in the system's temp dir: a checkout's own path can make
    // the VM's socket paths too long), and a PATH with QEMU and objcopy only.
    let fresh = tempfile::Builder::new()
        .prefix("fresh-host-")
        .tempdir()
        .unwrap();
    // The VMM runs as a uid of its own: its binary's directory must be searchable by it.
    let bin_dir = tempfile::Builder::new()
        .prefix("fresh-host-bin-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().to_path_buf();
    for tool in ["qemu-system-x86_64", "objcopy"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not on PATH"));
        std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
    }
    let fresh_home = fresh.path().join("home");
    let mut c = Command::new(BIN);
    c.env_remove("RUST_LOG")
        .env("INFRA_OPERATOR_HOME", &fresh_home)
        .env("PATH", &bin)
        .args(["run", "-l", "python", "--json", "-c", "print(6 * 7)"]);
    with_bucket(&mut c);
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r = json(&o);
    assert_eq!(r["stdout"], "42\n", "{r}");
    assert_eq!(r["start"], "restore", "{r}\n{}", text(&o.stderr));
    for f in [
        "vmlinux",
        "vmlinux.json",
        "vmlinux.modules",
        "images/rootfs-python.ext4",
        "images/rootfs-python.json",
        "snapshots/python/manifest.json",
    ] {
        assert!(fresh_home.join(f).exists(), "{f} was not fetched");
    }
    assert_eq!(
        std::fs::read(fresh_home.join("vmlinux")).unwrap(),
        std::fs::read(home().join("vmlinux")).unwrap()
    );
    let left = vm_dirs_left(&fresh_home.join("run"));
    assert!(left.is_empty(), "VM directories left behind: {left:?}");
    assert_clean();
}
