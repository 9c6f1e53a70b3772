//! The agent: listeners, connections, request dispatch, shutdown.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infra_protocol::{
    read_message_async, write_message_async, ErrorCode, Exec, FrameError, Reply, Request,
    RequestBody, FEATURE_FILE_TRANSFER, FEATURE_RESEED, MAX_FRAME, PROTOCOL_VERSION,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::cgroup::Cgroups;
use crate::error::{AgentError, FileError};
use crate::exec::{ExecHandle, Executor, EXEC_DIR};
use crate::files;
use crate::listen::{find_serial_port, open_serial, BoundAddr, Conn, ListenUri, VsockListener};
use crate::pid1::{self, Pid1Mode};
use crate::reaper::{ReapMode, Reaper};

/// The agent's build version, reported in `hello_reply`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version with the fingerprint of the sources the agent is built from (see `build.rs`):
/// what `infra-operator-agent --version` prints after the program name, and what the host
/// requires of the agent binary it ships ([`infra_config::agent_binary`]).
pub const AGENT_BUILD_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (build ",
    env!("INFRA_AGENT_BUILD"),
    ")"
);

/// uid/gid that untrusted code runs as when the agent is root and no `run_as` is given
/// (`nobody`/`nogroup`).
pub const DEFAULT_RUN_AS: (u32, u32) = (65534, 65534);

/// The workspace when none is given (outside VMs; the initramfs passes [`VM_WORKSPACE`]).
pub const DEFAULT_WORKSPACE: &str = "/tmp/infra-workspace";

/// The workspace in our VMs: programs find their input files and write `output/` there.
pub const VM_WORKSPACE: &str = "/workspace";

/// Largest file `get_file` returns: what fits in one frame after base64 and the envelope.
pub const MAX_FILE_BYTES: u64 = (MAX_FRAME as u64 / 4) * 3 - 4096;

/// How the agent is started.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Where to accept host connections. vsock and serial addresses that are not available
    /// on this machine are skipped with a warning; TCP and Unix failures are errors.
    pub listen: Vec<ListenUri>,
    /// Directory for exec working directories and `put_file`/`get_file`; created if missing.
    pub workspace: PathBuf,
    /// Give the workspace directory itself to the run-as user, so programs run in it
    /// (`exec.workdir = "."`) can create files there. For a machine that serves one run (the
    /// VM, `guest --workspace-owner run-as`); its `.exec` directory stays the agent's. When
    /// `false` the workspace is the agent's, mode 0755.
    pub workspace_for_run_as: bool,
    /// uid/gid for untrusted code. `None`: [`DEFAULT_RUN_AS`] when the agent is root, the
    /// agent's own user otherwise.
    pub run_as: Option<(u32, u32)>,
    /// Whether to act as init.
    pub pid1: Pid1Mode,
    /// The image's environment (OCI config `Env`), under the language and request env.
    /// Its `PATH`, if any, is the base the language's directories are prepended to.
    pub base_env: BTreeMap<String, String>,
    /// Shared secret the host must send in `hello` on TCP listeners that are not loopback.
    /// Such a listener is refused without one; loopback, Unix, vsock and serial listeners do
    /// not ask for it.
    pub token: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            workspace: PathBuf::from(DEFAULT_WORKSPACE),
            workspace_for_run_as: false,
            run_as: None,
            pid1: Pid1Mode::Auto,
            base_env: BTreeMap::new(),
            token: None,
        }
    }
}

impl AgentOptions {
    /// What `infra.operator guest --port PORT` means: AF_VSOCK on `port` plus the
    /// virtio-serial port named `agent` (each skipped when absent).
    pub fn for_port(port: u32) -> Self {
        Self {
            listen: vec![ListenUri::Vsock(port), ListenUri::Serial("agent".into())],
            ..Self::default()
        }
    }
}

/// What ended [`Agent::serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    /// A `shutdown` request with `poweroff: true`, or SIGTERM/SIGINT.
    PowerOff,
    /// A `shutdown` request with `poweroff: false`.
    Reboot,
}

/// Stops a serving agent from outside (tests, embedding).
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: watch::Sender<Option<ShutdownKind>>,
}

impl ShutdownHandle {
    /// Asks the agent to stop; [`Agent::serve`] then returns `kind`.
    pub fn shutdown(&self, kind: ShutdownKind) {
        self.tx.send_replace(Some(kind));
    }
}

enum Bound {
    /// With the token its connections must present (non-loopback addresses).
    Tcp(TcpListener, Option<Arc<str>>),
    Unix(UnixListener, PathBuf),
    Vsock(VsockListener, u32),
    Serial(PathBuf),
}

struct Shared {
    executor: Executor,
    /// The agent is its machine's init: it may reseed the RNG and set the clock.
    pid1: bool,
    workspace: PathBuf,
    run_as: Option<(u32, u32)>,
    shutdown: watch::Sender<Option<ShutdownKind>>,
}

/// A bound, not yet serving agent. Bind first to learn the addresses (port 0), then serve.
pub struct Agent {
    shared: Arc<Shared>,
    bound: Vec<Bound>,
    addrs: Vec<BoundAddr>,
    pid1: bool,
}

impl Agent {
    /// Prepares the workspace, starts the child reaper, and binds every listen address.
    /// Does not perform PID-1 setup; [`run_agent`] does that first when asked.
    pub async fn bind(opts: AgentOptions) -> Result<Agent, AgentError> {
        let pid1 = opts.pid1.active();
        let token: Option<Arc<str>> = match &opts.token {
            Some(t) if t.trim().is_empty() => return Err(AgentError::EmptyToken),
            Some(t) => Some(Arc::from(t.as_str())),
            None => None,
        };
        let run_as = opts
            .run_as
            .or_else(|| nix::unistd::geteuid().is_root().then_some(DEFAULT_RUN_AS));
        prepare_workspace(
            &opts.workspace,
            run_as.filter(|_| opts.workspace_for_run_as),
        )?;
        let reaper = Reaper::start(if pid1 {
            ReapMode::All
        } else {
            ReapMode::Registered
        })
        .map_err(AgentError::Signal)?;
        let executor = Executor::new(
            opts.workspace.clone(),
            run_as,
            opts.base_env.clone(),
            reaper,
            Cgroups::detect(),
        );
        let mut bound = Vec::new();
        let mut addrs = Vec::new();
        for uri in &opts.listen {
            let bind_err = |source| AgentError::Bind {
                uri: uri.to_string(),
                source,
            };
            match uri {
                ListenUri::Tcp(a) => {
                    let l = TcpListener::bind(a.as_str()).await.map_err(bind_err)?;
                    let local = l.local_addr().map_err(bind_err)?;
                    // Decided on the bound address, so names and 0.0.0.0 count as what they are.
                    let needs_token = !local.ip().to_canonical().is_loopback();
                    if needs_token && token.is_none() {
                        return Err(AgentError::TokenRequired {
                            uri: uri.to_string(),
                        });
                    }
                    addrs.push(BoundAddr::Tcp(local));
                    bound.push(Bound::Tcp(l, token.clone().filter(|_| needs_token)));
                }
                ListenUri::Unix(p) => {
                    // A stale socket from an earlier run would make bind fail.
                    if std::fs::symlink_metadata(p)
                        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    {
                        let _ = std::fs::remove_file(p);
                    }
                    let l = UnixListener::bind(p).map_err(bind_err)?;
                    // Only the agent's own user may connect (the program runs as another).
                    {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                            .map_err(bind_err)?;
                    }
                    addrs.push(BoundAddr::Unix(p.clone()));
                    bound.push(Bound::Unix(l, p.clone()));
                }
                ListenUri::Vsock(port) => match VsockListener::bind(*port) {
                    Ok(l) => {
                        addrs.push(BoundAddr::Vsock(*port));
                        bound.push(Bound::Vsock(l, *port));
                    }
                    Err(e) => tracing::warn!(%uri, error = %e, "AF_VSOCK unavailable; skipped"),
                },
                ListenUri::Serial(name) => match find_serial_port(name) {
                    Some(dev) => {
                        // The host's channel is the agent's alone: no other user may open it
                        // (devtmpfs creates it 0600 today; this does not rely on that).
                        use std::os::unix::fs::PermissionsExt;
                        if let Err(e) =
                            std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o600))
                        {
                            tracing::warn!(dev = %dev.display(), error = %e, "cannot chmod the agent port");
                        }
                        addrs.push(BoundAddr::Serial(dev.clone()));
                        bound.push(Bound::Serial(dev));
                    }
                    None => tracing::warn!(%uri, "no virtio-serial port with this name; skipped"),
                },
            }
        }
        if bound.is_empty() {
            return Err(AgentError::NoListener {
                tried: opts
                    .listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let (shutdown, _) = watch::channel(None);
        Ok(Agent {
            shared: Arc::new(Shared {
                executor,
                pid1,
                workspace: opts.workspace,
                run_as,
                shutdown,
            }),
            bound,
            addrs,
            pid1,
        })
    }

    /// The addresses actually bound (TCP port 0 resolved), in `listen` order, skipped ones left
    /// out.
    pub fn local_addrs(&self) -> &[BoundAddr] {
        &self.addrs
    }

    /// The first bound TCP address, if any (convenient in tests).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addrs.iter().find_map(|a| match a {
            BoundAddr::Tcp(s) => Some(*s),
            _ => None,
        })
    }

    /// Language keys this agent found on the machine.
    pub fn languages(&self) -> &[String] {
        self.shared.executor.languages()
    }

    /// Whether the agent acts as init.
    pub fn is_pid1(&self) -> bool {
        self.pid1
    }

    /// A handle that stops [`Agent::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: self.shared.shutdown.clone(),
        }
    }

    /// Serves connections until a `shutdown` request or [`ShutdownHandle::shutdown`]. Running
    /// execs of open connections are killed when it returns. Does not power off; see
    /// [`run_agent`].
    pub async fn serve(self) -> ShutdownKind {
        let mut stop = self.shared.shutdown.subscribe();
        let mut tasks = tokio::task::JoinSet::new();
        for b in self.bound {
            let shared = Arc::clone(&self.shared);
            tasks.spawn(accept_loop(shared, b));
        }
        let kind = loop {
            if let Some(kind) = *stop.borrow_and_update() {
                break kind;
            }
            if stop.changed().await.is_err() {
                break ShutdownKind::PowerOff;
            }
        };
        tasks.abort_all();
        kind
    }
}

/// Creates the workspace and its `.exec`; with `owner`, gives the workspace itself to that
/// user.
fn prepare_workspace(ws: &std::path::Path, owner: Option<(u32, u32)>) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| AgentError::Workspace {
        path: ws.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(ws.join(EXEC_DIR)).map_err(err)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(ws, Some(uid), Some(gid)).map_err(err)?;
    }
    // The untrusted user must reach its exec directory, but not list the others.
    std::fs::set_permissions(ws, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    std::fs::set_permissions(ws.join(EXEC_DIR), std::fs::Permissions::from_mode(0o711))
        .map_err(err)?;
    Ok(())
}

/// Runs the agent as `infra.operator guest` does: PID-1 setup when active, bind, serve until
/// shutdown (or SIGTERM/SIGINT), then, as PID 1, power off or reboot; as a plain service,
/// return `Ok(())`.
///
/// As PID 1 this never returns: a fatal start-up error is logged and the machine is powered
/// off, since an init that exits panics the kernel.
pub async fn run_agent(opts: AgentOptions) -> Result<(), AgentError> {
    let pid1 = opts.pid1.active();
    if pid1 {
        pid1::init();
    }
    let agent = match Agent::bind(opts).await {
        Ok(a) => a,
        Err(e) if pid1 => {
            tracing::error!(error = %e, "agent cannot start");
            pid1::power_off(true);
        }
        Err(e) => return Err(e),
    };
    tracing::info!(addrs = ?agent.local_addrs(), languages = ?agent.languages(), pid1, "agent ready");
    let handle = agent.shutdown_handle();
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("termination signal received");
        handle.shutdown(ShutdownKind::PowerOff);
    });
    let kind = agent.serve().await;
    if pid1 {
        tokio::task::spawn_blocking(move || pid1::power_off(kind == ShutdownKind::PowerOff))
            .await
            .ok();
        unreachable!("power_off never returns");
    }
    Ok(())
}

async fn accept_loop(shared: Arc<Shared>, bound: Bound) {
    match bound {
        Bound::Tcp(l, token) => loop {
            match l.accept().await {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    spawn_conn(&shared, s, peer.to_string(), token.clone());
                }
                Err(e) => accept_error(&e).await,
            }
        },
        Bound::Unix(l, path) => loop {
            match l.accept().await {
                Ok((s, _)) => spawn_conn(&shared, s, format!("unix:{}", path.display()), None),
                Err(e) => accept_error(&e).await,
            }
        },
        Bound::Vsock(l, port) => loop {
            match l.accept().await {
                Ok(s) => spawn_conn(&shared, s, format!("vsock:{port}"), None),
                Err(e) => accept_error(&e).await,
            }
        },
        // One host connection at a time; when the host side goes away the port reads EOF and
        // is reopened.
        Bound::Serial(dev) => loop {
            match open_serial(&dev) {
                Ok(s) => {
                    let peer = format!("serial:{}", dev.display());
                    handle_conn(Arc::clone(&shared), Box::new(s), peer, None).await;
                }
                Err(e) => {
                    tracing::warn!(dev = %dev.display(), error = %e, "cannot open serial port")
                }
            }
            // The port reads EOF (and polls as hung up) while no host is connected, so it is
            // polled; briefly, as a VM restored from a snapshot waits here for its host.
            tokio::time::sleep(Duration::from_millis(10)).await;
        },
    }
}

/// Transient accept errors (EMFILE, ECONNABORTED): log and back off briefly.
async fn accept_error(e: &std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn spawn_conn<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    shared: &Arc<Shared>,
    stream: S,
    peer: String,
    token: Option<Arc<str>>,
) {
    tokio::spawn(handle_conn(
        Arc::clone(shared),
        Box::new(stream),
        peer,
        token,
    ));
}

/// Whether `given` is `want`, in time that depends only on the lengths (no early exit on the
/// first differing byte, so the answer time does not leak how much of a guess was right).
fn token_matches(given: Option<&str>, want: &str) -> bool {
    let Some(given) = given else {
        return false;
    };
    let (a, b) = (given.as_bytes(), want.as_bytes());
    let mut diff = (a.len() ^ b.len()) as u64;
    for (i, &y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// Writes one reply. One that cannot be framed (over `MAX_FRAME`, or not encodable) is
/// replaced by a `too_large` error for the same id: nothing of it was written (the frame is
/// checked before the first byte goes out), so the stream is in step and the connection goes
/// on. An `Err` is an I/O failure: the connection is gone.
async fn write_reply<W: AsyncWrite + Unpin>(wr: &mut W, r: &Reply) -> Result<(), FrameError> {
    match write_message_async(wr, r).await {
        Err(e @ (FrameError::TooLarge { .. } | FrameError::Encode(_))) => {
            tracing::warn!(error = %e, "reply cannot be sent; sending an error instead");
            let err = Reply::error(r.id(), ErrorCode::TooLarge, format!("reply not sent: {e}"));
            write_message_async(wr, &err).await
        }
        other => other,
    }
}

type WrittenAck = Arc<Mutex<Option<(u64, oneshot::Sender<()>)>>>;

type Inflight = Arc<Mutex<HashMap<u64, Arc<ExecHandle>>>>;

/// Serves one connection until EOF, a broken frame, or agent shutdown. Malformed requests get
/// an error reply and the connection goes on. With `token`, a `hello` must carry it; a missing
/// or wrong one gets `unauthorized` and the connection is closed.
async fn handle_conn(
    shared: Arc<Shared>,
    stream: Box<dyn Conn>,
    peer: String,
    token: Option<Arc<str>>,
) {
    let span = tracing::info_span!("conn", %peer);
    async move {
        tracing::debug!("connected");
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (reply_tx, mut rx) = mpsc::channel::<Reply>(256);
        // Set by a shutdown request: acknowledged once its `ok` reply is written.
        let written: WrittenAck = Arc::default();
        let ack = Arc::clone(&written);
        let writer = tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if let Err(e) = write_reply(&mut wr, &r).await {
                    tracing::debug!(error = %e, "write failed; closing");
                    break;
                }
                let mut pending = ack.lock().unwrap_or_else(|e| e.into_inner());
                if pending
                    .as_ref()
                    .is_some_and(|(id, _)| r == Reply::Ok { id: *id })
                {
                    if let Some((_, tx)) = pending.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let inflight: Inflight = Arc::default();
        let mut stop = shared.shutdown.subscribe();
        let mut said_hello = false;
        loop {
            let msg = tokio::select! {
                m = read_message_async::<Request, _>(&mut rd) => m,
                _ = stop.changed() => break,
            };
            let req = match msg {
                Ok(Some(req)) => req,
                Ok(None) => break,
                Err(e) if e.is_recoverable() => {
                    tracing::debug!(error = %e, "bad frame");
                    let _ = reply_tx
                        .send(Reply::error(e.request_id(), e.code(), e.to_string()))
                        .await;
                    continue;
                }
                Err(FrameError::Io(e)) => {
                    tracing::debug!(error = %e, "read failed; closing");
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "broken stream; closing");
                    let _ = reply_tx
                        .send(Reply::error(None, e.code(), e.to_string()))
                        .await;
                    break;
                }
            };
            let id = req.id;
            if let RequestBody::Hello(h) = &req.body {
                if let Some(want) = &token {
                    if !token_matches(h.token.as_deref(), want) {
                        tracing::warn!(client = %h.client, "hello without the right token; closing");
                        let _ = reply_tx
                            .send(Reply::error(
                                Some(id),
                                ErrorCode::Unauthorized,
                                "this listener requires the agent's token in hello (missing or \
                                 wrong)",
                            ))
                            .await;
                        break;
                    }
                }
                let reply = if h.version == PROTOCOL_VERSION {
                    said_hello = true;
                    tracing::debug!(client = %h.client, "hello");
                    Reply::HelloReply {
                        id,
                        version: PROTOCOL_VERSION,
                        agent_version: AGENT_VERSION.to_string(),
                        languages: shared.executor.languages().to_vec(),
                        features: if shared.pid1 {
                            vec![FEATURE_FILE_TRANSFER.to_string(), FEATURE_RESEED.to_string()]
                        } else {
                            vec![FEATURE_FILE_TRANSFER.to_string()]
                        },
                    }
                } else {
                    Reply::error(
                        Some(id),
                        ErrorCode::VersionMismatch,
                        format!(
                            "agent speaks protocol version {PROTOCOL_VERSION}, client sent {}",
                            h.version
                        ),
                    )
                };
                let _ = reply_tx.send(reply).await;
                continue;
            }
            if !said_hello {
                let _ = reply_tx
                    .send(Reply::error(
                        Some(id),
                        ErrorCode::HelloRequired,
                        "send hello first",
                    ))
                    .await;
                continue;
            }
            match req.body {
                RequestBody::Hello(_) => {}
                RequestBody::Exec(exec) => {
                    start_exec(&shared, id, exec, &inflight, &reply_tx, &cancel_rx);
                }
                RequestBody::PutFile(p) => file_op(&shared, &reply_tx, id, move |ws, run_as| {
                    files::put_file(ws, &p.path, &p.data, p.mode, run_as, p.append)
                        .map(|()| Reply::Ok { id })
                }),
                RequestBody::GetFile(g) => file_op(&shared, &reply_tx, id, move |ws, _| {
                    files::get_file(ws, &g.path, g.offset, g.length, MAX_FILE_BYTES).map(|r| {
                        Reply::FileData {
                            id,
                            data: r.data,
                            mode: r.mode,
                            size: r.size,
                        }
                    })
                }),
                RequestBody::ListFiles(l) => file_op(&shared, &reply_tx, id, move |ws, _| {
                    files::list_files(ws, &l.path, l.max_entries).map(|l| Reply::FileList {
                        id,
                        entries: l.entries,
                        truncated: l.truncated,
                    })
                }),
                RequestBody::MakeDir(m) => file_op(&shared, &reply_tx, id, move |ws, run_as| {
                    files::make_dir(ws, &m.path, m.mode, run_as).map(|()| Reply::Ok { id })
                }),
                RequestBody::Signal(s) => {
                    let reply = signal_exec(&inflight, id, s.target, s.signal);
                    let _ = reply_tx.send(reply).await;
                }
                RequestBody::Reseed(r) => {
                    let reply = if !shared.pid1 {
                        Reply::error(
                            Some(id),
                            ErrorCode::BadRequest,
                            "reseed is only done by an agent that is its machine's init (it sets the clock)",
                        )
                    } else {
                        match tokio::task::spawn_blocking(move || {
                            crate::reseed::reseed(&r.entropy, r.unix_nanos)
                        })
                        .await
                        {
                            Ok(Ok(())) => Reply::Ok { id },
                            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidInput => {
                                Reply::error(Some(id), ErrorCode::BadRequest, e.to_string())
                            }
                            Ok(Err(e)) => Reply::error(Some(id), ErrorCode::Io, e.to_string()),
                            Err(e) => Reply::error(Some(id), ErrorCode::Internal, e.to_string()),
                        }
                    };
                    let _ = reply_tx.send(reply).await;
                }
                RequestBody::Shutdown(s) => {
                    // Make sure the reply is on the wire before the machine goes down.
                    let (ack_tx, ack_rx) = oneshot::channel();
                    *written.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, ack_tx));
                    let _ = reply_tx.send(Reply::Ok { id }).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), ack_rx).await;
                    let kind = if s.poweroff {
                        ShutdownKind::PowerOff
                    } else {
                        ShutdownKind::Reboot
                    };
                    shared.shutdown.send_replace(Some(kind));
                    break;
                }
            }
        }
        // Kill this connection's running execs; their tasks end after reaping.
        let _ = cancel_tx.send(true);
        drop(reply_tx);
        let _ = writer.await;
        tracing::debug!("closed");
    }
    .instrument(span)
    .await;
}

/// Runs a workspace file operation off the async threads and sends its reply (or its error).
fn file_op(
    shared: &Arc<Shared>,
    reply_tx: &mpsc::Sender<Reply>,
    id: u64,
    op: impl FnOnce(&std::path::Path, Option<(u32, u32)>) -> Result<Reply, FileError> + Send + 'static,
) {
    let shared = Arc::clone(shared);
    let reply_tx = reply_tx.clone();
    tokio::spawn(async move {
        let r = tokio::task::spawn_blocking(move || op(&shared.workspace, shared.run_as)).await;
        let reply = match r {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => Reply::error(Some(id), e.code(), e.to_string()),
            Err(e) => Reply::error(Some(id), ErrorCode::Internal, e.to_string()),
        };
        let _ = reply_tx.send(reply).await;
    });
}

fn start_exec(
    shared: &Arc<Shared>,
    id: u64,
    exec: Exec,
    inflight: &Inflight,
    reply_tx: &mpsc::Sender<Reply>,
    cancel: &watch::Receiver<bool>,
) {
    let handle = Arc::new(ExecHandle::default());
    {
        let mut map = inflight.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&id) {
            let reply_tx = reply_tx.clone();
            tokio::spawn(async move {
                let _ = reply_tx
                    .send(Reply::error(
                        Some(id),
                        ErrorCode::DuplicateId,
                        format!("request id {id} is already running"),
                    ))
                    .await;
            });
            return;
        }
        map.insert(id, Arc::clone(&handle));
    }
    let shared = Arc::clone(shared);
    let inflight = Arc::clone(inflight);
    let reply_tx = reply_tx.clone();
    let cancel = cancel.clone();
    let span = tracing::info_span!("exec", req = id, lang = %exec.lang);
    tokio::spawn(
        async move {
            let result = shared
                .executor
                .exec(id, exec, &handle, &reply_tx, cancel)
                .await;
            inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            let reply = match result {
                Ok(Some(exit)) => {
                    tracing::debug!(status = ?exit.status, wall_ms = exit.wall_ms, "exec done");
                    Reply::Exit(exit)
                }
                Ok(None) => return,
                Err(e) => Reply::error(Some(id), e.code(), e.to_string()),
            };
            let _ = reply_tx.send(reply).await;
        }
        .instrument(span),
    );
}

fn signal_exec(inflight: &Inflight, id: u64, target: u64, sig: i32) -> Reply {
    let Ok(sig) = Signal::try_from(sig) else {
        return Reply::error(
            Some(id),
            ErrorCode::BadRequest,
            format!("unknown signal number {sig}"),
        );
    };
    let pgid = inflight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&target)
        .map(|h| h.pgid.load(Ordering::SeqCst))
        .unwrap_or(0);
    if pgid <= 0 {
        return Reply::error(
            Some(id),
            ErrorCode::NotFound,
            format!("no running exec with id {target}"),
        );
    }
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) => Reply::Ok { id },
        Err(e) => Reply::error(Some(id), ErrorCode::NotFound, format!("exec {target}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An oversized reply becomes a `too_large` error for its id, and the stream stays in
    /// step: the next reply is read normally.
    #[tokio::test]
    async fn an_oversized_reply_is_answered_with_an_error_and_the_stream_goes_on() {
        let (mut agent, mut host) = tokio::io::duplex(16 << 20);
        let huge = Reply::FileData {
            id: 9,
            data: vec![0; MAX_FRAME],
            mode: 0o644,
            size: MAX_FRAME as u64,
        };
        write_reply(&mut agent, &huge).await.unwrap();
        write_reply(&mut agent, &Reply::Ok { id: 10 })
            .await
            .unwrap();
        let r: Reply = read_message_async(&mut host).await.unwrap().unwrap();
        assert!(
            matches!(
                r,
                Reply::Error {
                    id: Some(9),
                    code: ErrorCode::TooLarge,
                    ..
                }
            ),
            "{r:?}"
        );
        let r: Reply = read_message_async(&mut host).await.unwrap().unwrap();
        assert_eq!(r, Reply::Ok { id: 10 });
    }
}
