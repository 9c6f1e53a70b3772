//! `infra-operator` (installed also as `infra.operator`): a thin binary over the library crates.
//! It parses flags, renders output and maps errors to exit codes; the libraries decide.

mod api;
mod benchmark;
mod kernel;
mod mount;
mod outputs;
mod rootfs;
mod run;
mod setup;
mod snapshot;
mod store;
mod ui;

use clap::{Parser, Subcommand};

/// Exit codes, one place (documented in the README).
mod exit {
    /// Something failed at run time.
    pub const FAILURE: i32 = 1;
    /// Bad flags or values (clap also uses 2).
    pub const USAGE: i32 = 2;
    /// Input was refused: hostile or corrupt archive, digest mismatch, image not found, unsafe
    /// object keys (a sync or download that skipped some still transferred the rest).
    pub const BAD_INPUT: i32 = 3;
    /// A prerequisite is missing: host tool, root, registry or daemon unreachable, credentials.
    pub const PREREQUISITE: i32 = 4;
}

#[derive(Parser, Debug)]
#[command(
    name = "infra.operator",
    version,
    about = "Build, store and run Firecracker microVM sandboxes for untrusted code",
    after_help = "Examples:
  sudo infra.operator rootfs from-docker --name python --image python:3.12-alpine
  sudo infra.operator rootfs create --lang python
  infra.operator rootfs list
  infra.operator run --lang python --code \"print('hello')\"
  sudo infra.operator setup

Set RUST_LOG=debug for detailed logs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build and list root filesystem images.
    #[command(subcommand)]
    Rootfs(rootfs::RootfsCommand),
    /// Run code in a fresh microVM (the kernel and image are fetched/built on first use).
    Run(run::RunArgs),
    /// Run code in a microVM with the original system's flags and result block.
    Host(run::HostArgs),
    /// Fetch, import and show the guest kernel.
    #[command(subcommand)]
    Kernel(kernel::KernelCommand),
    /// Check (and install) what this host needs.
    Setup(setup::SetupArgs),
    /// Run the in-VM agent (PID 1 in infra.operator images).
    Guest(infra_guest::cli::GuestArgs),
    /// Object store (S3 or a local directory): images, kernel, sync, versions, cost.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Serve the HTTP API (execution, languages, images, OpenAI Files); manage its keys.
    Api(api::ApiArgs),
    /// Save ready VMs (snapshots) that `run`, `host` and the API restore instead of booting.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Time cold boots, snapshot restores, pool hand-outs and executions on this host.
    Benchmark(Box<benchmark::BenchmarkArgs>),
    /// Mount a bucket as a file system (FUSE, s3fs-compatible).
    Mount(mount::MountArgs),
    /// Unmount a bucket mounted with `mount`.
    Umount(mount::UmountArgs),
}

/// A missing prerequisite found by `setup --check` (exit code 4).
#[derive(Debug)]
pub struct Missing(pub String);

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Missing {}

/// Sets up logging (`RUST_LOG`, full `EnvFilter` syntax, else `default`) on stderr. The agent
/// binary uses the lighter `infra_guest::cli::init_logging`.
fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    // Inside a VM, this binary is also the initramfs's /init.
    if infra_guest::initramfs::is_initramfs_init() {
        infra_guest::initramfs::run_stage();
    }
    // Run by mount(8) for an fstab line of type fuse.infra-operator.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match mount::helper_args(&argv) {
        Some(args) => Cli::parse_from(args),
        None => Cli::parse(),
    };
    // aws-config warns for every credential source it tries; errors say it once.
    init_logging("warn,aws_config=error");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let paths = infra_config::Paths::from_env();
    // The mount runs its own runtime and FUSE threads (and may start itself again as the
    // daemon): it is dispatched before this process starts one.
    let cli = match cli.command {
        Command::Mount(a) => finish(mount::mount(a, &paths), false),
        Command::Umount(a) => finish(mount::umount(a), false),
        command => Cli { command },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(exit::FAILURE);
        }
    };
    let is_run = matches!(cli.command, Command::Run(_) | Command::Host(_));
    let result = runtime.block_on(async {
        match cli.command {
            Command::Rootfs(cmd) => rootfs::run(cmd, &paths).await.map(|()| 0),
            Command::Snapshot(cmd) => snapshot::run(cmd, &paths).await.map(|()| 0),
            Command::Run(a) => run::run(a, &paths).await,
            Command::Host(a) => run::host(a, &paths).await,
            Command::Kernel(cmd) => kernel::run(cmd, &paths).map(|()| 0),
            Command::Setup(a) => setup::run(a, &paths).map(|()| 0),
            Command::Guest(a) => infra_guest::cli::run(a).await.map(|()| 0),
            Command::Store(cmd) => store::run(cmd, &paths).await.map(|()| 0),
            Command::Api(a) => api::run(a, &paths).await.map(|()| 0),
            Command::Benchmark(a) => benchmark::run(*a, &paths).await.map(|()| 0),
            Command::Mount(_) | Command::Umount(_) => unreachable!("dispatched above"),
        }
    });
    finish(result, is_run)
}

/// Exits with the command's code, or prints its error and exits with the error's code.
fn finish(result: anyhow::Result<i32>, is_run: bool) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            let code = exit_code(&e);
            // `run`/`host` pass the program's exit code through; their own failures use
            // 125 like `docker run`, except usage errors.
            let code = if e.downcast_ref::<run::Interrupted>().is_some() {
                run::INTERRUPTED
            } else if is_run && code != exit::USAGE {
                run::SANDBOX_FAILURE
            } else {
                code
            };
            std::process::exit(code);
        }
    }
}

/// The kind of an error: the first error in its chain that has one (every crate's error
/// type names a kind for each of its variants); plain context errors are failures.
fn error_kind(e: &anyhow::Error) -> infra_config::ErrorKind {
    for cause in e.chain() {
        if let Some(k) = cause_kind(cause) {
            return k;
        }
    }
    infra_config::ErrorKind::Failure
}

fn cause_kind(c: &(dyn std::error::Error + 'static)) -> Option<infra_config::ErrorKind> {
    if let Some(e) = c.downcast_ref::<infra_store::Error>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_image::Error>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_runner::RunError>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_guest::AgentError>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_languages::Error>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_vmm::KernelError>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_vmm::VmError>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_config::DirError>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_api::ApiError>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_api::keys::KeyError>() {
        return Some(e.kind());
    }
    if let Some(e) = c.downcast_ref::<infra_mount::MountError>() {
        return Some(e.kind());
    }
    if c.downcast_ref::<Missing>().is_some() {
        return Some(infra_config::ErrorKind::Prerequisite);
    }
    None
}

/// The documented exit code of each kind: the one place kinds become exit codes.
fn kind_exit_code(k: infra_config::ErrorKind) -> i32 {
    use infra_config::ErrorKind as K;
    match k {
        K::Usage => exit::USAGE,
        K::Refused | K::NotFound | K::TooLarge => exit::BAD_INPUT,
        K::Prerequisite | K::Unavailable => exit::PREREQUISITE,
        K::Conflict | K::Sandbox | K::Failure => exit::FAILURE,
    }
}

/// Maps an error to the documented exit code.
fn exit_code(e: &anyhow::Error) -> i32 {
    kind_exit_code(error_kind(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that breaks the protocol is a sandbox failure (1 here, 125 for `run`/`host`
    /// in `main`), not a usage error or a prerequisite.
    #[test]
    fn guest_failures_map_to_the_sandbox_failure_code() {
        let violation = infra_runner::Violation::TooManyFrames { limit: 1024 };
        for e in [
            infra_runner::RunError::Protocol { violation },
            infra_runner::RunError::AgentClosed,
        ] {
            let e = anyhow::Error::from(e);
            assert_eq!(exit_code(&e), exit::FAILURE, "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        let e = anyhow::Error::from(
            infra_runner::check_timeout(std::time::Duration::from_secs(u64::MAX)).unwrap_err(),
        );
        assert_eq!(exit_code(&e), exit::USAGE, "{e}");
    }
}
