//! `infra-operator-agent`: the in-VM agent alone. The initramfs's `/init` (its first stage)
//! and, bound over `/usr/local/bin/infra.operator` in the image, `infra.operator guest`: the
//! seed's command line stays valid. Built from the `guest` crate only, so it carries none of
//! the host's S3, registry or HTTP code. The host finds it beside its own executable
//! (`infra_config::agent_binary`) and puts it into every image and initramfs it makes.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "infra.operator",
    version = infra_guest::AGENT_BUILD_VERSION,
    about = "The infra.operator guest agent (the in-VM part of infra.operator)",
    after_help = "Examples:
  infra.operator guest --port 5000
  infra.operator guest --listen tcp://127.0.0.1:5000"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the in-VM agent (PID 1 in infra.operator images).
    Guest(infra_guest::cli::GuestArgs),
}

fn main() {
    if infra_guest::initramfs::is_initramfs_init() {
        infra_guest::initramfs::run_stage();
    }
    let cli = Cli::parse();
    infra_guest::cli::init_logging("warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let Command::Guest(a) = cli.command;
    if let Err(e) = runtime.block_on(infra_guest::cli::run(a)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
