//! `setup [--check]`: what this host needs to build images and run VMs, installed or reported.

use std::process::Command;

use anyhow::{bail, Result};
use clap::Args;
use infra_config::Paths;

/// `setup` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator setup --check     # report only; exit 4 when something is missing
  sudo infra.operator setup        # install missing Debian packages, create /srv/firecracker")]
pub struct SetupArgs {
    /// Only report; change nothing.
    #[arg(long)]
    check: bool,
    /// JSON report.
    #[arg(long)]
    json: bool,
}

/// One prerequisite.
#[derive(serde::Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    /// Debian package that provides it, when apt can fix it.
    package: Option<&'static str>,
}

fn tool(name: &'static str, binary: &str, package: &'static str, why: &str) -> Check {
    let found = infra_vmm::find_binary(None, binary);
    Check {
        name,
        ok: found.is_some(),
        detail: match found {
            Some(p) => p.display().to_string(),
            None => format!("missing ({why})"),
        },
        package: Some(package),
    }
}

/// Runs `setup`.
pub fn run(a: SetupArgs, paths: &Paths) -> Result<()> {
    let mut checks = vec![
        tool(
            "qemu",
            "qemu-system-x86_64",
            "qemu-system-x86",
            "the VMM used when Firecracker or KVM is unavailable",
        ),
        tool("mke2fs", "mke2fs", "e2fsprogs", "builds ext4 images"),
        tool(
            "debootstrap",
            "debootstrap",
            "debootstrap",
            "builds Debian images",
        ),
        tool(
            "apt-get",
            "apt-get",
            "apt",
            "fetches the Debian cloud kernel",
        ),
    ];
    let fc = infra_vmm::find_binary(None, "firecracker");
    checks.push(Check {
        name: "firecracker",
        ok: fc.is_some(),
        detail: fc.map(|p| p.display().to_string()).unwrap_or_else(|| {
            "not installed (optional: install a release binary from github.com/firecracker-microvm/firecracker/releases; QEMU is used meanwhile)".into()
        }),
        package: None,
    });
    let mut opts = infra_runner::RunnerOptions::for_host()?;
    opts.agent = infra_config::agent_binary(infra_guest::AGENT_BUILD_VERSION)?;
    let runner = infra_runner::Runner::new(opts, &paths.cache);
    let kvm = match (infra_vmm::kvm_openable(), runner.kvm_verdict()) {
        (false, _) => (false, "/dev/kvm cannot be opened: VMs run under TCG (slow)".to_string()),
        (true, Some((ok, reason))) => (ok, format!("probe boot on this host boot: {reason}")),
        (true, None) => (true, "/dev/kvm opens; not yet proven by a boot (the first `run` probes it and falls back to TCG if it fails)".into()),
    };
    checks.push(Check {
        name: "kvm",
        ok: kvm.0,
        detail: kvm.1,
        package: None,
    });
    let kernel = infra_vmm::kernel::KernelStore::new(paths).installed();
    checks.push(Check {
        name: "kernel",
        ok: kernel.is_ok(),
        detail: match &kernel {
            Ok(m) => format!("{} ({})", paths.kernel.display(), m.release),
            Err(e) => e.to_string(),
        },
        package: None,
    });

    if !a.check {
        let missing: Vec<&str> = checks
            .iter()
            .filter(|c| !c.ok)
            .filter_map(|c| c.package)
            .collect();
        if !missing.is_empty() {
            if !nix::unistd::geteuid().is_root() {
                bail!(
                    "installing {} needs root; re-run with sudo",
                    missing.join(" ")
                );
            }
            println!("Installing {} ...", missing.join(" "));
            let st = Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()?;
            if !st.success() {
                bail!(
                    "apt-get install {} failed ({st}); run `apt-get update` and retry",
                    missing.join(" ")
                );
            }
        }
        paths.ensure_dirs()?;
        if kernel.is_err() {
            println!("Fetching the guest kernel ...");
            infra_runner::prepare::fetch_kernel(paths, None)?;
        }
        return run(
            SetupArgs {
                check: true,
                json: a.json,
            },
            paths,
        );
    }

    if a.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        let rows = checks
            .iter()
            .map(|c| {
                vec![
                    c.name.to_string(),
                    if c.ok { "ok" } else { "MISSING" }.to_string(),
                    c.detail.clone(),
                ]
            })
            .collect();
        println!("{}", crate::ui::table(&["CHECK", "STATUS", "DETAIL"], rows));
        println!("Home: {}", paths.home.display());
    }
    // firecracker and kvm are optional: QEMU/TCG covers them.
    let required_missing: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok && c.package.is_some())
        .map(|c| c.name)
        .collect();
    if !required_missing.is_empty() || kernel.is_err() {
        bail!(crate::Missing(format!(
            "not ready: {}; run `sudo infra.operator setup`",
            required_missing
                .iter()
                .chain(kernel.is_err().then_some(&"kernel"))
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}
