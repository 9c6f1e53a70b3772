//! The Firecracker backend under its jailer, against a stand-in (`fake_jailer.py`) that
//! computes the jail as the real jailer does, drops to the VM's uid and opens every file a
//! request names as that uid, as real Firecracker does. (CI hosts cannot run Firecracker; the
//! same flow was checked by hand against a real build, see docs/security.md.)
//!
//! Each defect found with the real jailer has a check here: a symlinked `--firecracker` (jail
//! named after the resolved file), a 0600 initramfs (400 "Permission denied" from
//! `PUT /boot-source`), jails left behind after a run and by runners that died, and the VM's own
//! uid.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use infra_vmm::firecracker::{Cgroups, Firecracker, Jailer};
use infra_vmm::uid::UidRange;
use infra_vmm::VmConfig;

/// The fake reads its log path and cgroup parents from the environment, which is the
/// process's: the tests here take turns.
static ENV_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn jailed_firecracker_boots_with_private_uid_and_leaves_no_jail() {
    let _env = ENV_LOCK.lock().await;
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (uid drop, chown)"
    );
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // A symlinked firecracker: the jailer names the jail after the resolved file.
    let real_fc = d.join("bin/firecracker-v1.17");
    std::fs::create_dir_all(real_fc.parent().unwrap()).unwrap();
    std::fs::write(&real_fc, b"#!/bin/false\n").unwrap();
    std::os::unix::fs::symlink(&real_fc, d.join("bin/firecracker")).unwrap();
    // The kernel and image world-readable, the initramfs 0600 as `kernel fetch` writes it.
    for (name, mode) in [
        ("vmlinux", 0o644),
        ("initrd", 0o600),
        ("rootfs.ext4", 0o644),
    ] {
        let p = d.join(name);
        std::fs::write(&p, name.as_bytes()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let base = d.join("jails");
    // A jail left by a runner that died (pid 0x7ffffffe does not exist), with its Firecracker
    // still running (a process chrooted in the jail, its pid in the jailer's pid file) ...
    let stale = base.join("firecracker-v1.17/infra-2147483646-old/root");
    std::fs::create_dir_all(&stale).unwrap();
    let mut orphan = std::process::Command::new("python3")
        .arg("-c")
        .arg("import os, sys, time; os.chroot(sys.argv[1]); print('in', flush=True); time.sleep(120)")
        .arg(&stale)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(orphan.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "in\n");
    std::fs::write(stale.join("firecracker-v1.17.pid"), orphan.id().to_string()).unwrap();
    // ... and a second dead runner's jail whose pid file names a process that is not in it:
    // that process must survive (a pid file is only a hint).
    let stale2 = base.join("firecracker-v1.17/infra-2147483645-old/root");
    std::fs::create_dir_all(&stale2).unwrap();
    let mut bystander = std::process::Command::new("sleep")
        .arg("120")
        .spawn()
        .unwrap();
    std::fs::write(
        stale2.join("firecracker-v1.17.pid"),
        bystander.id().to_string(),
    )
    .unwrap();
    let log = d.join("requests.jsonl");
    std::env::set_var("FAKE_JAILER_LOG", &log);
    // cgroup v1 layout: one hierarchy per controller, a dead runner's cgroup left in one.
    let cg_parents = vec![
        d.join("cgroup/memory/infra-operator"),
        d.join("cgroup/pids/infra-operator"),
    ];
    let stale_cg = cg_parents[1].join("infra-2147483646-old");
    std::fs::create_dir_all(&stale_cg).unwrap();
    std::env::set_var(
        "FAKE_CGROUP_PARENTS",
        std::env::join_paths(&cg_parents).unwrap(),
    );
    let fc = Firecracker {
        binary: d.join("bin/firecracker"),
        jailer: Some(Jailer {
            binary: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_jailer.py"),
            uids: UidRange {
                first: 910_000,
                count: 4,
            },
            chroot_base: base.clone(),
            cgroups: Some(Cgroups {
                version: 1,
                parents: cg_parents.clone(),
            }),
        }),
    };
    let cfg = VmConfig {
        kernel: d.join("vmlinux"),
        initramfs: d.join("initrd"),
        rootfs: d.join("rootfs.ext4"),
        mem_mib: 256,
        vcpus: 1,
        extra_args: String::new(),
        run_dir: d.join("run"),
    };
    let vm = fc.start(&cfg).await.expect("jailed start");
    let recs = records(&log);
    let jail = Path::new(recs[0]["jail"].as_str().unwrap()).to_path_buf();
    assert!(
        jail.starts_with(base.join("firecracker-v1.17")),
        "jail named after the resolved exec file: {}",
        jail.display()
    );
    assert!(!stale.exists(), "the dead runner's jail was removed");
    assert!(!stale_cg.exists(), "the dead runner's cgroup was removed");
    // Memory and pid limits through the jailer, and the VM's cgroups exist while it runs.
    assert_eq!(recs[0]["cgroup_version"], "1");
    assert_eq!(
        recs[0]["cgroups"],
        serde_json::json!([
            format!("memory.limit_in_bytes={}", (256 + 128) << 20),
            "pids.max=17"
        ])
    );
    let jail_id = jail.parent().unwrap().file_name().unwrap().to_owned();
    for p in &cg_parents {
        assert!(p.join(&jail_id).is_dir(), "{}", p.display());
    }
    assert!(!stale2.exists(), "the dead runner's jail was removed");
    let st = orphan.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(9),
        "the dead runner's Firecracker was killed"
    );
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a process outside the jail named by its pid file survives"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    // Firecracker runs as pid 1 of its own PID namespace (--new-pid-ns); the jailer exited and
    // we hold Firecracker itself.
    assert_eq!(recs[1]["pid"], 1, "{:?}", recs[1]);
    let host_pid = vm.pid().expect("Firecracker's host pid");
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.trim_end().ends_with("\t1"), "{nspid}");
    assert!(std::fs::read_link(format!("/proc/{host_pid}/root"))
        .unwrap()
        .ends_with("root"));
    let calls: Vec<String> = recs[1..]
        .iter()
        .map(|r| format!("{} {}", r["method"], r["path"]).replace('"', ""))
        .collect();
    assert!(calls.contains(&"PUT /boot-source".into()), "{calls:?}");
    assert_eq!(calls.last().unwrap(), "PUT /actions");
    let uid = recs[1]["uid"].as_u64().unwrap();
    assert!((910_000..910_004).contains(&uid), "VM uid {uid}");
    // The originals keep their owners and modes.
    let m = std::fs::metadata(d.join("initrd")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 0);
    vm.stop().await.unwrap();
    assert!(
        !jail.exists(),
        "jail removed after stop: {}",
        jail.display()
    );
    for p in &cg_parents {
        assert!(!p.join(&jail_id).exists(), "cgroup removed after stop");
    }
    let state = std::fs::read_to_string(format!("/proc/{host_pid}/stat"))
        .map(|s| {
            s.rsplit(") ")
                .next()
                .unwrap_or("")
                .chars()
                .next()
                .unwrap_or('?')
        })
        .unwrap_or('X');
    assert!(
        state == 'X' || state == 'Z',
        "Firecracker ({host_pid}) is gone after stop, state {state}"
    );

    // Firecracker killed under us is seen through its pidfd.
    let mut vm = fc.start(&cfg).await.expect("jailed start");
    let pid = vm.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(vm.exited_within(std::time::Duration::from_secs(5)).await);
    assert!(vm.exited().unwrap().contains("exited"));
    vm.stop().await.unwrap();

    // A socket path too long for sun_path is refused before anything starts.
    let long = d.join("x".repeat(120));
    std::fs::create_dir_all(&long).unwrap();
    let fc2 = Firecracker {
        binary: fc.binary.clone(),
        jailer: Some(Jailer {
            chroot_base: long,
            ..fc.jailer.clone().unwrap()
        }),
    };
    let Err(e) = fc2.start(&cfg).await else {
        panic!("a 120-byte jail path must be refused")
    };
    let e = e.to_string();
    assert!(e.contains("Unix socket allows"), "{e}");
}

/// Snapshots under the jailer: `save_snapshot` pauses the VM and has Firecracker write its
/// state and memory files in the jail (as the VM's uid), then moves them out; `restore` places
/// them in a fresh jail and loads them, with no machine configuration, as Firecracker's
/// snapshot documentation requires.
#[tokio::test]
async fn jailed_firecracker_saves_and_restores_snapshots() {
    let _env = ENV_LOCK.lock().await;
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (uid drop, chown)"
    );
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::write(d.join("bin/firecracker"), b"#!/bin/false\n").unwrap();
    for name in ["vmlinux", "initrd", "rootfs.ext4"] {
        std::fs::write(d.join(name), name.as_bytes()).unwrap();
    }
    let log = d.join("requests.jsonl");
    std::env::set_var("FAKE_JAILER_LOG", &log);
    std::env::remove_var("FAKE_CGROUP_PARENTS");
    let fc = Firecracker {
        binary: d.join("bin/firecracker"),
        jailer: Some(Jailer {
            binary: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_jailer.py"),
            uids: UidRange {
                first: 911_000,
                count: 4,
            },
            chroot_base: d.join("jails"),
            cgroups: None,
        }),
    };
    let cfg = VmConfig {
        kernel: d.join("vmlinux"),
        initramfs: d.join("initrd"),
        rootfs: d.join("rootfs.ext4"),
        mem_mib: 256,
        vcpus: 1,
        extra_args: String::new(),
        run_dir: d.join("run"),
    };
    let mut vm = fc.start(&cfg).await.expect("jailed start");
    let snap = d.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let names = vm.save_snapshot(&snap).await.expect("snapshot saved");
    assert_eq!(names, vec!["vmstate.snapshot", "mem.snapshot"]);
    assert_eq!(
        std::fs::read(snap.join("vmstate.snapshot")).unwrap(),
        b"vmstate"
    );
    assert_eq!(
        std::fs::metadata(snap.join("mem.snapshot")).unwrap().len(),
        4096
    );
    vm.stop().await.unwrap();
    let saved: Vec<serde_json::Value> = records(&log)
        .into_iter()
        .filter(|r| r.get("method").is_some())
        .collect();
    let n = saved.len();
    assert_eq!(saved[n - 2]["method"], "PATCH");
    assert_eq!(saved[n - 2]["path"], "/vm");
    assert_eq!(saved[n - 2]["body"], serde_json::json!({"state": "Paused"}));
    assert_eq!(saved[n - 1]["path"], "/snapshot/create");
    assert_eq!(
        saved[n - 1]["body"],
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": "/vmstate.snapshot", "mem_file_path": "/mem.snapshot"})
    );

    std::fs::remove_file(&log).unwrap();
    let vm = fc.restore(&cfg, &snap).await.expect("restored");
    let calls: Vec<serde_json::Value> = records(&log)
        .into_iter()
        .filter(|r| r.get("method").is_some())
        .collect();
    let paths: Vec<&str> = calls.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, vec!["/logger", "/metrics", "/snapshot/load"]);
    assert_eq!(
        calls[2]["body"],
        serde_json::json!({
            "snapshot_path": "/vmstate.snapshot",
            "mem_backend": {"backend_type": "File", "backend_path": "/mem.snapshot"},
            "enable_diff_snapshots": false,
            "resume_vm": true
        })
    );
    vm.stop().await.unwrap();
    // The snapshot stays where it was (placed in the jail, not moved).
    assert!(snap.join("mem.snapshot").exists());

    // Without the jailer, restoring is refused with the reason.
    let bare = Firecracker {
        binary: d.join("bin/firecracker"),
        jailer: None,
    };
    let e = bare.restore(&cfg, &snap).await.unwrap_err().to_string();
    assert!(e.contains("needs the jailer"), "{e}");
}
