//! `infra.operator guest`: the in-VM agent's command line (PID 1 in our images, or a
//! systemd/OpenRC service), shared by the full CLI and the slim agent binary
//! (`infra-operator-agent`, what goes into images and initramfs).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::{AgentOptions, Pid1Mode};
use anyhow::{Context, Result};
use clap::Args;

/// Image config written by `rootfs` builds; its Env is the base environment for code.
const IMAGE_CONFIG: &str = "/etc/infra-operator/image.json";

/// `guest` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator guest --port 5000                       # in a VM: vsock 5000 + virtio-serial 'agent'
  infra.operator guest --listen tcp://127.0.0.1:5000     # development, no VM
  infra.operator guest --listen tcp://0.0.0.0:5000 --token-file /etc/infra-operator/agent.token
  infra.operator guest --listen unix:/run/agent.sock")]
pub struct GuestArgs {
    /// vsock port (also opens the virtio-serial port named `agent` when present).
    #[arg(long, default_value_t = 5000)]
    port: u32,
    /// Listen here instead: tcp://HOST:PORT, unix:/PATH, vsock:PORT, serial:NAME (repeatable).
    #[arg(long)]
    listen: Vec<String>,
    /// Directory for code and files [default: /tmp/infra-workspace; in our VMs the initramfs
    /// passes /workspace].
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Who owns the workspace directory itself: the agent, or the user code runs as (a machine
    /// that serves one run, so programs can write in it; the initramfs passes run-as).
    #[arg(long, default_value = "agent", value_parser = ["agent", "run-as"])]
    workspace_owner: String,
    /// File holding the token the host must send in hello; required to listen on a TCP address
    /// that is not loopback (surrounding whitespace is ignored).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Act as init: auto (when PID 1), on, off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pid1: String,
}

/// Runs the agent until shutdown.
pub async fn run(a: GuestArgs) -> Result<()> {
    let mut opts = AgentOptions::for_port(a.port);
    if !a.listen.is_empty() {
        opts.listen = a
            .listen
            .iter()
            .map(|l| crate::parse_listen(l).with_context(|| format!("--listen {l}")))
            .collect::<Result<_>>()?;
    }
    if let Some(w) = a.workspace {
        opts.workspace = w;
    }
    opts.workspace_for_run_as = a.workspace_owner == "run-as";
    if let Some(f) = &a.token_file {
        let t = std::fs::read_to_string(f).with_context(|| {
            format!("cannot read the token file {} (--token-file)", f.display())
        })?;
        opts.token = Some(t.trim().to_string());
    }
    opts.pid1 = match a.pid1.as_str() {
        "on" => Pid1Mode::On,
        "off" => Pid1Mode::Off,
        _ => Pid1Mode::Auto,
    };
    opts.base_env = image_env();
    crate::run_agent(opts).await.context("guest agent failed")
}

/// Sets up logging on stderr: `RUST_LOG` as `LEVEL` and `TARGET=LEVEL` directives (e.g.
/// `debug` or `warn,infra_guest=debug`; no span or field filters, which need a regex engine the
/// agent binary does without), else `default`.
pub fn init_logging(default: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| v.parse::<Targets>().ok())
        .or_else(|| default.parse::<Targets>().ok())
        .unwrap_or_default();
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}

/// Env from the image config baked in at build time (empty outside our images).
fn image_env() -> BTreeMap<String, String> {
    let Ok(text) = std::fs::read(IMAGE_CONFIG) else {
        return BTreeMap::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return BTreeMap::new();
    };
    v.pointer("/config/env")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            kv.as_str()?
                .split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}
