//! `mount` / `umount` as users run them: daemonizing once ready, errors reported before
//! detaching with their exit codes, the `mount.fuse.infra-operator` helper form that
//! /etc/fstab uses, and `--print-systemd-unit`. Real FUSE (as root) and a real Garage.

use std::path::Path;
use std::process::{Command, Output};

use infra_store::testing::Garage;

fn bin(exe: &Path, home: &Path, g: Option<&Garage>) -> Command {
    let mut c = Command::new(exe);
    for k in [
        "BUCKET",
        "S3_BUCKET",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "S3_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "INFRA_OPERATOR_CONFIG",
        "NOTIFY_SOCKET",
    ] {
        c.env_remove(k);
    }
    c.env("INFRA_OPERATOR_HOME", home);
    if let Some(g) = g {
        for (k, v) in g.env() {
            c.env(k, v);
        }
    }
    c
}

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_infra-operator"))
}

fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(1) == Some(&p.to_str().unwrap())
                && f.get(2).is_some_and(|t| t.starts_with("fuse"))
        })
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_daemonizes_reports_errors_and_unmounts() {
    let g = Garage::start().await;
    g.create_bucket("cli-mount").await;
    let home = tempfile::tempdir().unwrap();
    let mp = home.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();

    // A missing bucket: the error is printed by the command itself, before any detach, with
    // the not-found exit code (3); nothing is mounted.
    let o = bin(exe(), home.path(), Some(&g))
        .args(["mount", "s3://no-such-bucket"])
        .arg(&mp)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("no-such-bucket"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!mounted(&mp));
    // An endpoint that is down: exit code 4 (unavailable), one line.
    let o = bin(exe(), home.path(), Some(&g))
        .args(["mount", "s3://cli-mount"])
        .arg(&mp)
        .args(["-o", "url=http://127.0.0.1:9,retries=0,timeout=5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(!mounted(&mp));
    // An unknown option: usage (2).
    let o = bin(exe(), home.path(), Some(&g))
        .args(["mount", "s3://cli-mount"])
        .arg(&mp)
        .args(["-o", "bogus"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // It works: the command returns once the mount is ready, the daemon serves it.
    let o = bin(exe(), home.path(), Some(&g))
        .args(["mount", "s3://cli-mount"])
        .arg(&mp)
        .args(["-o", "ttl=0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(mounted(&mp), "mounted when the command returned");
    std::fs::write(mp.join("hello.txt"), b"hello\n").unwrap();
    let s = g.store("cli-mount", "").await;
    use infra_store::ObjectStore;
    assert_eq!(s.head("hello.txt", None).await.unwrap().size, 6);

    // umount.
    let o = bin(exe(), home.path(), None)
        .arg("umount")
        .arg(&mp)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(!mounted(&mp));
    // umount of something not mounted: one-line error.
    let o = bin(exe(), home.path(), None)
        .arg("umount")
        .arg(&mp)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a mount point"));

    // The fstab helper form: mount(8) runs `mount.fuse.infra-operator SOURCE DIR -o OPTS`.
    let helper = home.path().join("mount.fuse.infra-operator");
    std::os::unix::fs::symlink(exe(), &helper).unwrap();
    let o = bin(&helper, home.path(), Some(&g))
        .args(["cli-mount"])
        .arg(&mp)
        .args(["-o", "rw,_netdev,allow_other,nosuid,nodev", "-n"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(mounted(&mp));
    assert_eq!(std::fs::read(mp.join("hello.txt")).unwrap(), b"hello\n");
    let line = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find(|l| l.contains(mp.to_str().unwrap()))
        .unwrap()
        .to_string();
    assert!(
        line.contains("allow_other") && line.contains("nosuid"),
        "{line}"
    );
    infra_mount::unmount(&mp, false).unwrap();
    assert!(!mounted(&mp));
}

#[test]
fn systemd_unit_and_help() {
    let home = tempfile::tempdir().unwrap();
    let o = bin(exe(), home.path(), None)
        .args([
            "mount",
            "s3://elasticbamboo-agent-share",
            "/home/bamboo/.m2",
            "--print-systemd-unit",
            "-o",
            "uid=500,gid=501,use_cache=/tmp",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let unit = String::from_utf8_lossy(&o.stdout);
    for want in [
        "Type=notify",
        "mount s3://elasticbamboo-agent-share /home/bamboo/.m2 -f -o uid=500,gid=501,use_cache=/tmp",
        "ExecStop=/bin/umount /home/bamboo/.m2",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.contains(want), "{want} missing:\n{unit}");
    }
    let o = bin(exe(), home.path(), None)
        .args(["mount", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("Examples:") && help.contains("fuse.infra-operator"),
        "{help}"
    );
}
