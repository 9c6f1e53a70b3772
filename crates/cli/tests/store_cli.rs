//! The `store` and `rootfs upload|download|list --remote` commands as users run them: output
//! formats, JSON, exit codes and one-line errors, against a real Garage and the local store.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use infra_store::testing::Garage;

const MIB: u64 = 1024 * 1024;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_infra-operator"));
    for k in [
        "BUCKET",
        "S3_BUCKET",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "S3_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "INFRA_OPERATOR_CONFIG",
    ] {
        c.env_remove(k);
    }
    c.env("NO_COLOR", "1");
    c
}

fn run(home: &Path, g: Option<&Garage>, args: &[&str]) -> Output {
    let mut c = bin();
    c.env("INFRA_OPERATOR_HOME", home).args(args);
    if let Some(g) = g {
        for (k, v) in g.env() {
            c.env(k, v);
        }
    }
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed ({:?}): {}\n{}",
        o.status.code(),
        stderr(&o),
        stdout(&o)
    );
    stdout(&o)
}

fn image(home: &Path, name: &str, size: u64) {
    let dir = home.join("images");
    std::fs::create_dir_all(&dir).unwrap();
    let f = std::fs::File::create(dir.join(format!("rootfs-{name}.ext4"))).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(name.as_bytes().repeat(100_000).as_slice(), 4096)
        .unwrap();
    std::fs::write(
        dir.join(format!("rootfs-{name}.json")),
        format!("{{\"name\":\"{name}\"}}"),
    )
    .unwrap();
}

#[tokio::test]
async fn rootfs_and_store_commands_against_garage() {
    let g = Garage::start().await;
    g.create_bucket("llm-infra-operator-rootfs").await;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    image(h, "python", 40 * MIB);
    image(h, "go", 30 * MIB);
    std::fs::write(h.join("vmlinux"), vec![7u8; 3 * MIB as usize]).unwrap();
    let b = "s3://llm-infra-operator-rootfs/dev";

    let out = ok(run(
        h,
        Some(&g),
        &["rootfs", "upload", "-l", "python", "-b", b],
    ));
    assert!(out.contains("rootfs-python.ext4"), "{out}");
    ok(run(
        h,
        Some(&g),
        &["rootfs", "upload", "-l", "go", "-b", b, "--compress"],
    ));
    let out = ok(run(
        h,
        Some(&g),
        &["store", "upload", "--all", "-b", b, "--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 5, "{out}");

    // The seed's listing.
    let out = ok(run(
        h,
        Some(&g),
        &["store", "ls", "--human-readable", "-b", b],
    ));
    assert!(
        out.starts_with("=== S3 bucket contents (llm-infra-operator-rootfs/dev/) ==="),
        "{out}"
    );
    assert!(out.contains("  40.0 MiB rootfs-python.ext4"), "{out}");
    assert!(out.contains("3.0 MiB vmlinux"), "{out}");
    assert!(out.contains("\nTotal Objects: 6\n"), "{out}");
    assert!(out.contains("   Total Size: "), "{out}");
    // Prefixes show as PRE at the bucket root.
    let out = ok(run(
        h,
        Some(&g),
        &["store", "ls", "-b", "s3://llm-infra-operator-rootfs"],
    ));
    assert!(out.contains("PRE dev/"), "{out}");

    // rootfs list --remote.
    let out = ok(run(h, Some(&g), &["rootfs", "list", "--remote", "-b", b]));
    let first = out.lines().next().unwrap();
    assert!(
        first.starts_with("LANGUAGE")
            && first.contains("LAST MODIFIED")
            && first.ends_with("S3 KEY"),
        "{out}"
    );
    assert!(
        out.contains("rootfs-go.ext4.zst") && out.contains("rootfs-python.ext4"),
        "{out}"
    );
    let out = ok(run(
        h,
        Some(&g),
        &["rootfs", "list", "--remote", "-b", b, "--json"],
    ));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Download into another host's home; env var instead of the flag.
    let other = tempfile::tempdir().unwrap();
    let mut c = bin();
    c.env("INFRA_OPERATOR_HOME", other.path())
        .env("S3_BUCKET", b)
        .args(["store", "download", "--all"]);
    for (k, v) in g.env() {
        c.env(k, v);
    }
    let out = ok(c.output().unwrap());
    assert!(out.contains("sha256 verified"), "{out}");
    for f in [
        "images/rootfs-python.ext4",
        "images/rootfs-go.ext4",
        "images/rootfs-go.json",
        "vmlinux",
    ] {
        assert_eq!(
            std::fs::read(other.path().join(f)).unwrap(),
            std::fs::read(h.join(f)).unwrap(),
            "{f}"
        );
    }

    // Sync: a new image shows in a dry run; the others are unchanged.
    image(h, "rust", 5 * MIB);
    let out = ok(run(
        h,
        Some(&g),
        &[
            "store",
            "sync",
            h.join("images").to_str().unwrap(),
            b,
            "--exclude",
            "*",
            "--include",
            "rootfs-*.ext4",
            "--dry-run",
        ],
    ));
    assert!(
        out.contains("(dryrun) upload:") && out.contains("rootfs-rust.ext4"),
        "{out}"
    );
    assert!(out.contains("2 unchanged"), "{out}");

    // Errors: one line, the right exit code.
    let o = run(h, Some(&g), &["rootfs", "download", "-l", "rust", "-b", b]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o)
        .starts_with("error: s3://llm-infra-operator-rootfs/dev/rootfs-rust.ext4 not found"));
    let o = run(h, Some(&g), &["store", "ls", "-b", "s3://no-such-bucket"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = run(
        h,
        Some(&g),
        &["store", "ls", "-b", b, "--region", "eu-west-1"],
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("region"), "{}", stderr(&o));
    let mut c = bin();
    c.env("INFRA_OPERATOR_HOME", h)
        .args(["store", "ls", "-b", b]);
    for (k, v) in g.env() {
        c.env(
            &k,
            if k == "AWS_SECRET_ACCESS_KEY" {
                "wrong".to_string()
            } else {
                v
            },
        );
    }
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("access denied") && stderr(&o).contains("IAM"),
        "{}",
        stderr(&o)
    );
    let o = run(
        h,
        Some(&g),
        &["store", "versions", "rootfs-python.ext4", "-b", b],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("not supported"), "{}", stderr(&o));
    let o = run(
        h,
        Some(&g),
        &[
            "store",
            "ls",
            "-b",
            b,
            "--endpoint-url",
            "http://127.0.0.1:9",
        ],
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the object store at http://127.0.0.1:9"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    // No credentials anywhere (IMDS off so this does not wait for a metadata service).
    let o = bin()
        .env("INFRA_OPERATOR_HOME", h)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .args([
            "store",
            "ls",
            "-b",
            b,
            "--endpoint-url",
            &g.endpoint(),
            "--region",
            "garage",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("error: no AWS credentials found"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));

    // init on Garage: runs, names what is unsupported.
    let o = run(
        h,
        Some(&g),
        &[
            "store",
            "init",
            "-b",
            "s3://made-by-cli",
            "--region",
            "garage",
        ],
    );
    let out = ok(o);
    assert!(
        out.contains("versioning") && out.contains("UNSUPPORTED"),
        "{out}"
    );

    // cost.
    let out = ok(run(h, Some(&g), &["store", "cost", "-b", b]));
    assert!(
        out.contains("MONTHLY COST") && out.contains("/month"),
        "{out}"
    );
}

#[test]
fn local_store_is_the_default_and_works_offline() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    image(h, "bash", 8 * MIB);
    let out = ok(run(h, None, &["rootfs", "upload", "--lang", "bash"]));
    assert!(out.contains("local:"), "{out}");
    assert!(h.join("store/rootfs-bash.ext4").is_file());
    let out = ok(run(h, None, &["rootfs", "list", "--remote"]));
    assert!(out.contains("bash"), "{out}");
    let out = ok(run(h, None, &["store", "ls"]));
    assert!(out.contains("Total Objects: 2"), "{out}");
    std::fs::remove_file(h.join("images/rootfs-bash.ext4")).unwrap();
    ok(run(h, None, &["rootfs", "download", "--lang", "bash"]));
    assert!(h.join("images/rootfs-bash.ext4").is_file());
    let out = ok(run(h, None, &["store", "init"]));
    assert!(
        out.contains("encryption") && out.contains("UNSUPPORTED"),
        "{out}"
    );
    ok(run(h, None, &["rootfs", "upload", "--lang", "bash"]));
    let out = ok(run(
        h,
        None,
        &["store", "versions", "rootfs-bash.ext4", "--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{out}");
    // Bad bucket value: usage error.
    let o = run(h, None, &["store", "ls", "-b", "s3://A_B"]);
    assert_eq!(o.status.code(), Some(2));
}

fn aws(g: &Garage, args: &[&str]) {
    let mut c = Command::new("aws");
    c.args(["--endpoint-url", &g.endpoint(), "--region", "garage"])
        .args(args)
        .env_remove("AWS_PROFILE");
    for (k, v) in g.env() {
        c.env(k, v);
    }
    let o = c.output().unwrap_or_else(|e| {
        panic!("the aws CLI is needed for this test (pip install awscli): {e}")
    });
    assert!(o.status.success(), "aws {args:?}: {}", stderr(&o));
}

/// `store sync s3://… DIR` and `store download` with keys planted through the AWS CLI that
/// are not safe as local paths: each is skipped with a warning naming it, the other objects
/// are transferred, nothing is written outside DIR, and the command exits 3.
#[tokio::test]
async fn sync_and_download_skip_unsafe_keys() {
    let g = Garage::start().await;
    g.create_bucket("hostile").await;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let body = h.join("body");
    std::fs::write(&body, b"planted").unwrap();
    let hostile = ["../../x", "a/../b", "a//b", "./dot"];
    for key in hostile.iter().chain(&["good.txt", "dir/ok.bin"]) {
        aws(
            &g,
            &[
                "s3api",
                "put-object",
                "--bucket",
                "hostile",
                "--key",
                key,
                "--body",
                body.to_str().unwrap(),
            ],
        );
    }
    let dest = h.join("one/two");
    let o = run(
        h,
        Some(&g),
        &["store", "sync", "s3://hostile", dest.to_str().unwrap()],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}\n{}", stdout(&o));
    for key in hostile {
        assert!(
            err.lines()
                .any(|l| l.starts_with("warning: skipped") && l.contains(&format!("'{key}'"))),
            "{key} not named: {err}"
        );
    }
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.starts_with("error: 4 object keys are not safe as local paths"),
        "{err}"
    );
    assert!(
        stdout(&o).contains("4 skipped (unsafe keys)"),
        "{}",
        stdout(&o)
    );
    assert_eq!(std::fs::read(dest.join("good.txt")).unwrap(), b"planted");
    assert_eq!(std::fs::read(dest.join("dir/ok.bin")).unwrap(), b"planted");
    assert!(!h.join("x").exists() && !dest.join("b").exists());

    // `store download KEY -o DIR` and to the images directory: refused, nothing written.
    let out = h.join("out");
    std::fs::create_dir_all(&out).unwrap();
    for args in [
        vec!["store", "download", "a/../b", "-o", out.to_str().unwrap()],
        vec!["store", "download", "a//b"],
    ] {
        let mut args = args;
        args.extend(["-b", "s3://hostile"]);
        let o = run(h, Some(&g), &args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("warning: skipped"), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    assert!(!h.join("images/b").exists());
}

/// The same refusal with the local store as the source: a link planted in the destination
/// directory is not written through; exit 3 names the key.
#[test]
fn sync_from_local_store_does_not_follow_links() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let src = h.join("src");
    std::fs::create_dir_all(src.join("link")).unwrap();
    std::fs::write(src.join("link/evil.txt"), b"x").unwrap();
    std::fs::write(src.join("fine.txt"), b"y").unwrap();
    let store = format!("file://{}", h.join("store").display());
    ok(run(
        h,
        None,
        &["store", "sync", src.to_str().unwrap(), &store],
    ));
    let dest = h.join("dest");
    let outside = h.join("outside");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("link")).unwrap();
    let o = run(h, None, &["store", "sync", &store, dest.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("'link/evil.txt'"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert_eq!(std::fs::read(dest.join("fine.txt")).unwrap(), b"y");
}
