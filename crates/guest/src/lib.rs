//! The in-VM agent behind `infra.operator guest`.
//!
//! It accepts host connections (AF_VSOCK, virtio-serial, TCP, Unix), speaks
//! [`infra_protocol`], and runs untrusted programs with the language table from
//! [`infra_languages`]: as an unprivileged user, in their own process group and (when
//! available) cgroup, with a wall-clock timeout that kills the whole tree, output caps, and
//! memory/pids limits. When it is PID 1 it also does init's work: mounts, loopback, hostname,
//! reaping, and power-off.
//!
//! ```no_run
//! # async fn f() -> Result<(), infra_guest::AgentError> {
//! let mut opts = infra_guest::AgentOptions::for_port(5000);
//! opts.listen.push(infra_guest::parse_listen("tcp://127.0.0.1:5001").unwrap());
//! infra_guest::run_agent(opts).await
//! # }
//! ```

mod agent;
mod cgroup;
#[cfg(feature = "cli")]
pub mod cli;
mod error;
mod exec;
mod files;
pub mod initramfs;
mod listen;
mod pid1;
mod reaper;
mod reseed;

pub use agent::{
    run_agent, Agent, AgentOptions, ShutdownHandle, ShutdownKind, AGENT_BUILD_VERSION,
    AGENT_VERSION, DEFAULT_RUN_AS, DEFAULT_WORKSPACE, MAX_FILE_BYTES, VM_WORKSPACE,
};
pub use error::{AgentError, ExecError, FileError, ListenParseError};
pub use listen::{find_serial_port, parse_listen, BoundAddr, ListenUri};
pub use pid1::Pid1Mode;
