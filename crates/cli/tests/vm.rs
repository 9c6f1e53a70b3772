//! End to end: the real binary boots real microVMs (QEMU `-M microvm`; TCG on hosts without
//! a working KVM) from Debian's cloud kernel and a debootstrap'd Python image, both fetched
//! and built by `run` itself on first use, exactly as on a fresh machine.
//!
//! The home directory persists under the target dir, so the kernel and image are made once
//! per checkout. VM tests take a lock: two cores do not need several TCG guests at once.
//! Every test checks that no VM directory or VMM process is left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_infra-operator");

fn home() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-home")
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

/// No VM directory and no process of ours (QEMU, Firecracker) outlives a run.
fn assert_clean() {
    let run_dir = home().join("run");
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
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
    let code = "import subprocess, time\n\
                subprocess.Popen(['sleep', '1000'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
                print('started', flush=True)\n\
                time.sleep(1000)\n";
    let o = run(&[
        "run", "-l", "python", "-c", code, "-t", "2", "--accel", "tcg", "--json",
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
        out.contains("=== Language Version ===") && out.contains("Python 3."),
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

#[test]
fn bad_requests_fail_before_booting() {
    // No VM is booted: no lock needed.
    let o = run(&["run", "-l", "cobol", "-c", "DISPLAY 'x'"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("cobol"), "{}", text(&o.stderr));
    let o = run(&["run", "-l", "python", "-c", "   "]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("empty"), "{}", text(&o.stderr));
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
    let left = std::fs::read_dir(&run_dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "VM directories left in {}", run_dir.display());
}
