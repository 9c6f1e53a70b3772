//! Firecracker: configured through its REST API on a Unix socket, agent reached through its
//! hybrid vsock. Written against Firecracker's published API (swagger `firecracker.yaml`,
//! `docs/vsock.md`, `docs/jailer.md`); our CI hosts cannot run it (no usable KVM), so the
//! requests are tested against a recording server, not a real Firecracker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::process::Command;

use crate::error::VmError;
use crate::vm::{spawn, vm_dir, AgentEndpoint, Vm, VmConfig, AGENT_PORT, FAST_BOOT_ARGS};

/// Guest context id of the VM's vsock device (any value ≥ 3 works; each VM has its own
/// device, so they do not clash).
pub const GUEST_CID: u32 = 3;

/// Optional jailer (chroot, cgroups, uid/gid drop) in front of Firecracker.
#[derive(Debug, Clone)]
pub struct Jailer {
    /// `jailer` binary.
    pub binary: PathBuf,
    /// uid Firecracker runs as.
    pub uid: u32,
    /// gid Firecracker runs as.
    pub gid: u32,
    /// `--chroot-base-dir` (jailer default `/srv/jailer`).
    pub chroot_base: PathBuf,
}

/// How to run Firecracker.
#[derive(Debug, Clone)]
pub struct Firecracker {
    /// `firecracker` binary.
    pub binary: PathBuf,
    /// Run it under the jailer.
    pub jailer: Option<Jailer>,
}

/// One API call: method, path, JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCall {
    /// `PUT`.
    pub method: &'static str,
    /// `/machine-config`, ...
    pub path: String,
    /// Request body.
    pub body: Value,
}

/// Paths as Firecracker sees them (inside the jail when jailed).
#[derive(Debug, Clone)]
pub struct GuestPaths {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Root filesystem image.
    pub rootfs: PathBuf,
    /// vsock Unix socket.
    pub vsock: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// Metrics file.
    pub metrics: PathBuf,
}

impl Firecracker {
    /// The kernel command line. Firecracker appends the virtio-mmio device list itself.
    pub fn boot_args(cfg: &VmConfig) -> String {
        // reboot=k: the guest's reboot reaches Firecracker through the i8042 reset line and
        // the VMM exits; pci=off: Firecracker has no PCI bus.
        let mut s = format!("console=ttyS0 quiet panic=-1 reboot=k pci=off {FAST_BOOT_ARGS}");
        if !cfg.extra_args.is_empty() {
            s.push(' ');
            s.push_str(&cfg.extra_args);
        }
        s
    }

    /// The API calls that configure and start a VM, in order.
    pub fn api_calls(cfg: &VmConfig, p: &GuestPaths) -> Vec<ApiCall> {
        let put = |path: &str, body: Value| ApiCall {
            method: "PUT",
            path: path.to_string(),
            body,
        };
        vec![
            put(
                "/logger",
                json!({"log_path": p.log, "level": "Warning", "show_level": true, "show_log_origin": false}),
            ),
            put("/metrics", json!({"metrics_path": p.metrics})),
            put(
                "/machine-config",
                json!({"vcpu_count": cfg.vcpus, "mem_size_mib": cfg.mem_mib, "smt": false}),
            ),
            put(
                "/boot-source",
                json!({
                    "kernel_image_path": p.kernel,
                    "initrd_path": p.initrd,
                    "boot_args": Self::boot_args(cfg),
                }),
            ),
            // Not the root device: the initramfs mounts it (read-only, under an overlay), so
            // Firecracker must not add its own `root=` argument.
            put(
                "/drives/rootfs",
                json!({
                    "drive_id": "rootfs",
                    "path_on_host": p.rootfs,
                    "is_root_device": false,
                    "is_read_only": true,
                }),
            ),
            put(
                "/vsock",
                json!({"guest_cid": GUEST_CID, "uds_path": p.vsock}),
            ),
            put("/actions", json!({"action_type": "InstanceStart"})),
        ]
    }

    /// The jailer's argv, and the chroot it will create.
    pub fn jailer_command(j: &Jailer, firecracker: &Path, id: &str) -> (Vec<String>, PathBuf) {
        let exec_name = firecracker
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into());
        let root = j.chroot_base.join(&exec_name).join(id).join("root");
        let argv = vec![
            "--id".into(),
            id.into(),
            "--exec-file".into(),
            firecracker.display().to_string(),
            "--uid".into(),
            j.uid.to_string(),
            "--gid".into(),
            j.gid.to_string(),
            "--chroot-base-dir".into(),
            j.chroot_base.display().to_string(),
            "--".into(),
            "--api-sock".into(),
            "/api.sock".into(),
        ];
        (argv, root)
    }

    /// Starts Firecracker, configures the VM through the API and starts it.
    pub async fn start(&self, cfg: &VmConfig) -> Result<Vm, VmError> {
        let dir = vm_dir(&cfg.run_dir)?;
        let id = dir
            .path()
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
            })
            .unwrap_or_else(|| "vm".into());
        let console = dir.path().join("console.log");
        let (cmd, api_sock, guest, host_vsock) = match &self.jailer {
            None => {
                let mut cmd = Command::new(&self.binary);
                let api = dir.path().join("api.sock");
                cmd.arg("--api-sock").arg(&api).arg("--id").arg(&id);
                let g = GuestPaths {
                    kernel: cfg.kernel.clone(),
                    initrd: cfg.initramfs.clone(),
                    rootfs: cfg.rootfs.clone(),
                    vsock: dir.path().join("vsock.sock"),
                    log: dir.path().join("firecracker.log"),
                    metrics: dir.path().join("metrics.json"),
                };
                for f in [&g.log, &g.metrics] {
                    std::fs::File::create(f).map_err(|e| VmError::io("create log files", e))?;
                }
                let vsock = g.vsock.clone();
                (cmd, api, g, vsock)
            }
            Some(j) => {
                let (argv, root) = Self::jailer_command(j, &self.binary, &id);
                // The jail sees only what is linked into its root.
                std::fs::create_dir_all(&root)
                    .map_err(|e| VmError::io(format!("create jail {}", root.display()), e))?;
                for (src, name) in [
                    (&cfg.kernel, "vmlinux"),
                    (&cfg.initramfs, "initrd"),
                    (&cfg.rootfs, "rootfs.ext4"),
                ] {
                    link_or_copy(src, &root.join(name))?;
                }
                for name in ["firecracker.log", "metrics.json"] {
                    std::fs::File::create(root.join(name))
                        .map_err(|e| VmError::io("create log files", e))?;
                    let _ = nix::unistd::chown(
                        &root.join(name),
                        Some(nix::unistd::Uid::from_raw(j.uid)),
                        Some(nix::unistd::Gid::from_raw(j.gid)),
                    );
                }
                let mut cmd = Command::new(&j.binary);
                cmd.args(&argv);
                let g = GuestPaths {
                    kernel: "/vmlinux".into(),
                    initrd: "/initrd".into(),
                    rootfs: "/rootfs.ext4".into(),
                    vsock: "/vsock.sock".into(),
                    log: "/firecracker.log".into(),
                    metrics: "/metrics.json".into(),
                };
                (cmd, root.join("api.sock"), g, root.join("vsock.sock"))
            }
        };
        let mut child = spawn(cmd, &console).map_err(|e| VmError::Start {
            backend: "firecracker",
            detail: format!("cannot run {}: {e}", self.binary.display()),
        })?;
        let mut ready = false;
        for _ in 0..200 {
            if api_sock.exists() {
                ready = true;
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(VmError::Start {
                    backend: "firecracker",
                    detail: format!(
                        "exited with {st}: {}",
                        crate::vm::read_tail(&console, crate::vm::LOG_TAIL_BYTES).trim()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !ready {
            return Err(VmError::Start {
                backend: "firecracker",
                detail: format!(
                    "API socket {} did not appear within 5 s",
                    api_sock.display()
                ),
            });
        }
        for call in Self::api_calls(cfg, &guest) {
            api_request(&api_sock, &call).await?;
        }
        Ok(Vm {
            backend: "firecracker",
            accel: "kvm".into(),
            child,
            dir,
            console,
            vmm_log: None,
            endpoint: AgentEndpoint::HybridVsock {
                uds: host_vsock,
                port: AGENT_PORT,
            },
        })
    }
}

fn link_or_copy(src: &Path, dst: &Path) -> Result<(), VmError> {
    let _ = std::fs::remove_file(dst);
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)
        .map(|_| ())
        .map_err(|e| VmError::io(format!("copy {} into the jail", src.display()), e))
}

/// Sends one API request over the Unix socket; a non-2xx answer becomes [`VmError::Api`] with
/// Firecracker's `fault_message`.
pub async fn api_request(sock: &Path, call: &ApiCall) -> Result<(), VmError> {
    let io_err = |e: std::io::Error| VmError::io(format!("firecracker API {}", call.path), e);
    let other = |e: String| io_err(std::io::Error::other(e));
    let stream = UnixStream::connect(sock).await.map_err(io_err)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| other(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(call.method)
        .uri(&call.path)
        .header("Host", "localhost")
        .header("Accept", "application/json")
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(call.body.to_string())))
        .map_err(|e| other(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| other(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| other(e.to_string()))?
        .to_bytes();
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body);
    let fault = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    Err(VmError::Api {
        method: call.method.into(),
        path: call.path.clone(),
        status: status.as_u16(),
        body: fault,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initrd".into(),
            rootfs: "/img/rootfs-python.ext4".into(),
            mem_mib: 512,
            vcpus: 1,
            extra_args: "infra.root=/dev/vda".into(),
            run_dir: "/tmp".into(),
        }
    }

    fn paths() -> GuestPaths {
        GuestPaths {
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            rootfs: "/img/rootfs-python.ext4".into(),
            vsock: "/run/vm/vsock.sock".into(),
            log: "/run/vm/fc.log".into(),
            metrics: "/run/vm/metrics.json".into(),
        }
    }

    #[test]
    fn api_calls_match_the_published_schema() {
        let calls = Firecracker::api_calls(&cfg(), &paths());
        let by_path = |p: &str| calls.iter().find(|c| c.path == p).unwrap().body.clone();
        assert_eq!(
            by_path("/machine-config"),
            json!({"vcpu_count": 1, "mem_size_mib": 512, "smt": false})
        );
        let boot = by_path("/boot-source");
        assert_eq!(boot["kernel_image_path"], "/k/vmlinux");
        assert_eq!(boot["initrd_path"], "/k/initrd");
        let args = boot["boot_args"].as_str().unwrap();
        assert!(
            args.contains("pci=off") && args.contains("reboot=k"),
            "{args}"
        );
        assert!(args.ends_with("infra.root=/dev/vda"), "{args}");
        let drive = by_path("/drives/rootfs");
        assert_eq!(drive["is_read_only"], true);
        assert_eq!(drive["drive_id"], "rootfs");
        assert_eq!(
            by_path("/vsock"),
            json!({"guest_cid": 3, "uds_path": "/run/vm/vsock.sock"})
        );
        // InstanceStart comes last: everything else is pre-boot only.
        assert_eq!(
            calls.last().unwrap().body,
            json!({"action_type": "InstanceStart"})
        );
        assert!(calls.iter().all(|c| c.method == "PUT"));
    }

    #[test]
    fn jailer_argv_and_chroot() {
        let j = Jailer {
            binary: "/usr/bin/jailer".into(),
            uid: 123,
            gid: 456,
            chroot_base: "/srv/jailer".into(),
        };
        let (argv, root) =
            Firecracker::jailer_command(&j, Path::new("/usr/bin/firecracker"), "vm-a");
        assert_eq!(root, Path::new("/srv/jailer/firecracker/vm-a/root"));
        let s = argv.join(" ");
        assert!(
            s.starts_with("--id vm-a --exec-file /usr/bin/firecracker --uid 123 --gid 456"),
            "{s}"
        );
        assert!(s.ends_with("-- --api-sock /api.sock"), "{s}");
    }

    /// A one-connection HTTP server that records the request and answers with `status`.
    async fn serve_once(listener: tokio::net::UnixListener, status: &str, body: &str) -> String {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(h) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= h + 4 + len {
                    break;
                }
            }
        }
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[tokio::test]
    async fn api_request_sends_json_and_reports_faults() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let call = Firecracker::api_calls(&cfg(), &paths()).remove(2);
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve_once(l, "204 No Content", ""));
        api_request(&sock, &call).await.unwrap();
        let req = server.await.unwrap();
        assert!(req.starts_with("PUT /machine-config HTTP/1.1\r\n"), "{req}");
        assert!(
            req.ends_with(r#"{"mem_size_mib":512,"smt":false,"vcpu_count":1}"#),
            "{req}"
        );

        std::fs::remove_file(&sock).unwrap();
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve_once(
            l,
            "400 Bad Request",
            r#"{"fault_message":"The kernel file cannot be opened"}"#,
        ));
        let err = api_request(&sock, &call).await.unwrap_err().to_string();
        server.await.unwrap();
        assert!(
            err.contains("HTTP 400") && err.contains("kernel file cannot be opened"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn hybrid_vsock_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).await.unwrap();
            s.write_all(b"OK 1073741824\nfirst-agent-bytes")
                .await
                .unwrap();
            line
        });
        let mut s = crate::vm::hybrid_vsock_connect(&sock, 5000).await.unwrap();
        assert_eq!(&server.await.unwrap(), b"CONNECT 5000\n");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            rest, b"first-agent-bytes",
            "bytes after the OK line belong to the agent"
        );
    }
}
