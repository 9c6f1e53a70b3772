//! Booting microVMs: the guest kernel and its initramfs, and the VMM backends that run them.
//!
//! Both backends boot the same three files: an ELF `vmlinux`, an initramfs whose `/init` is
//! our agent binary (it loads modules, mounts the image read-only under a RAM overlay and
//! switches root), and the language's ext4 image as a read-only virtio-blk disk. They differ
//! only in how they are configured and how the host reaches the agent:
//!
//! | backend | configured by | agent channel |
//! |---|---|---|
//! | Firecracker | REST API on a Unix socket | hybrid vsock (`CONNECT 5000`) |
//! | QEMU `-M microvm` | command line | virtio-serial port `agent` on a Unix socket |

mod error;
pub mod firecracker;
pub mod initramfs;
pub mod kernel;
pub mod modules;
mod process;
pub mod qemu;
mod qmp;
pub mod uid;
mod vm;
pub mod vmlinux;

pub use error::{KernelError, VmError};
pub use vm::{
    find_binary, hybrid_vsock_connect, read_tail, timer_args, Accel, AgentEndpoint, Vm, VmConfig,
    AGENT_PORT, FAST_BOOT_ARGS, LOG_TAIL_BYTES,
};

/// A configured VMM.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Firecracker (needs working KVM).
    Firecracker(firecracker::Firecracker),
    /// QEMU microvm (KVM or TCG).
    Qemu(qemu::Qemu),
}

impl Backend {
    /// Starts a VM.
    pub async fn start(&self, cfg: &VmConfig) -> Result<Vm, VmError> {
        match self {
            Backend::Firecracker(f) => f.start(cfg).await,
            Backend::Qemu(q) => q.start(cfg).await,
        }
    }

    /// Starts a VM from a snapshot saved by [`Vm::save_snapshot`] from a VM of the same
    /// `cfg` on the same backend.
    pub async fn restore(
        &self,
        cfg: &VmConfig,
        snapshot_dir: &std::path::Path,
    ) -> Result<Vm, VmError> {
        match self {
            Backend::Firecracker(f) => f.restore(cfg, snapshot_dir).await,
            Backend::Qemu(q) => q.restore(cfg, snapshot_dir).await,
        }
    }

    /// `firecracker` or `qemu`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Firecracker(_) => "firecracker",
            Backend::Qemu(_) => "qemu",
        }
    }
}

/// Whether `/dev/kvm` can be opened for read and write. Necessary, not sufficient: on some
/// hosts KVM opens fine and then fails on the first real guest, so callers probe with a boot.
pub fn kvm_openable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
