//! `kernel fetch|import|list`: the guest kernel every VM boots.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use infra_config::Paths;
use infra_runner::prepare;
use infra_vmm::kernel::{KernelManifest, KernelStore};

/// Kernel subcommands.
#[derive(Subcommand, Debug)]
#[command(after_help = "Examples:
  sudo infra.operator kernel fetch                      # Debian's linux-image-cloud-amd64
  sudo infra.operator kernel import ./vmlinux-6.1       # e.g. a Firecracker CI kernel
  sudo infra.operator kernel import /boot/vmlinuz-$(uname -r) --modules /lib/modules/$(uname -r)
  infra.operator kernel list")]
pub enum KernelCommand {
    /// Download a Debian kernel package, extract the ELF vmlinux and the virtio modules.
    Fetch(FetchArgs),
    /// Install a kernel file you have (ELF vmlinux or bzImage).
    Import(ImportArgs),
    /// Show the installed kernel.
    List(ListArgs),
}

/// `kernel fetch` flags.
#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Debian package (a metapackage is resolved to its current kernel).
    #[arg(long, default_value = infra_vmm::kernel::DEFAULT_PACKAGE)]
    package: String,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

/// `kernel import` flags.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// vmlinux (ELF) or vmlinuz (bzImage).
    path: PathBuf,
    /// Module tree (`/lib/modules/RELEASE`) for kernels whose virtio drivers are modules.
    #[arg(long)]
    modules: Option<PathBuf>,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

/// `kernel list` flags.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// Runs a kernel subcommand.
pub fn run(cmd: KernelCommand, paths: &Paths) -> Result<()> {
    let store = KernelStore::new(paths);
    let (manifest, json) = match cmd {
        KernelCommand::Fetch(a) => {
            if !a.json {
                println!("Fetching {} with apt-get ...", a.package);
            }
            (prepare::fetch_kernel(paths, Some(&a.package))?, a.json)
        }
        KernelCommand::Import(a) => (
            prepare::import_kernel(paths, &a.path, a.modules.as_deref())?,
            a.json,
        ),
        KernelCommand::List(a) => (store.installed()?, a.json),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        print_manifest(&store, &manifest);
    }
    Ok(())
}

fn print_manifest(store: &KernelStore, m: &KernelManifest) {
    println!("Kernel:      {}", store.vmlinux.display());
    println!("Release:     {}", m.release);
    println!("Source:      {}", m.source);
    println!("Size:        {}", crate::ui::human_mb(m.bytes));
    if !m.sha256.is_empty() {
        println!("sha256:      {}", m.sha256);
    }
    let modules = if m.modules.is_empty() {
        "none (drivers built in)".to_string()
    } else {
        m.modules.join(" ")
    };
    println!("Modules:     {modules}");
    if !m.installed_at.is_empty() {
        println!("Installed:   {}", m.installed_at);
    }
}
