//! Listen addresses (`tcp://`, `unix:`, `vsock://`, `serial:`) and the transports behind them.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ListenParseError;

/// Where the agent accepts host connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenUri {
    /// `tcp://HOST:PORT` (development and tests; port 0 picks a free port).
    Tcp(String),
    /// `unix:/path` (development, benchmarks).
    Unix(PathBuf),
    /// `vsock://PORT` or `vsock:PORT`: AF_VSOCK on any CID (Firecracker).
    Vsock(u32),
    /// `serial:NAME`: the virtio-serial port with this name (QEMU). One host connection at a
    /// time; the port is reopened when the host side goes away.
    Serial(String),
}

impl fmt::Display for ListenUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenUri::Tcp(a) => write!(f, "tcp://{a}"),
            ListenUri::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenUri::Vsock(p) => write!(f, "vsock://{p}"),
            ListenUri::Serial(n) => write!(f, "serial:{n}"),
        }
    }
}

impl std::str::FromStr for ListenUri {
    type Err = ListenParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_listen(s)
    }
}

/// Parses a listen address: `tcp://HOST:PORT`, `unix:/path` (or `unix:///path`),
/// `vsock://PORT` (or `vsock:PORT`), `serial:NAME`.
pub fn parse_listen(s: &str) -> Result<ListenUri, ListenParseError> {
    let err = |reason| ListenParseError {
        uri: s.to_string(),
        reason,
    };
    if let Some(rest) = s.strip_prefix("tcp://") {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or(err("expected tcp://HOST:PORT"))?;
        if host.is_empty() {
            return Err(err("missing host"));
        }
        port.parse::<u16>()
            .map_err(|_| err("port must be 0-65535"))?;
        Ok(ListenUri::Tcp(rest.to_string()))
    } else if let Some(rest) = s.strip_prefix("unix:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(err("missing socket path"));
        }
        Ok(ListenUri::Unix(PathBuf::from(path)))
    } else if let Some(rest) = s.strip_prefix("vsock:") {
        let port = rest.strip_prefix("//").unwrap_or(rest);
        let port = port
            .parse::<u32>()
            .map_err(|_| err("port must be a number"))?;
        Ok(ListenUri::Vsock(port))
    } else if let Some(name) = s.strip_prefix("serial:") {
        if name.is_empty() || name.contains('/') {
            return Err(err("expected serial:NAME (a virtio-serial port name)"));
        }
        Ok(ListenUri::Serial(name.to_string()))
    } else {
        Err(err("expected tcp://, unix:, vsock:// or serial:"))
    }
}

/// The address a listener actually bound, as reported by [`crate::Agent::local_addrs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    /// A TCP socket.
    Tcp(std::net::SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
    /// An AF_VSOCK port.
    Vsock(u32),
    /// A virtio-serial device node.
    Serial(PathBuf),
}

/// A byte stream to the host, whatever the transport.
pub(crate) trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// Registers an owned descriptor with tokio's reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that always reports the same number
    // and stays open until the `AsyncFd` drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// A nonblocking file descriptor driven by tokio: accepted vsock sockets and serial ports.
pub(crate) struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self { fd: register(fd)? })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A listening AF_VSOCK socket.
pub(crate) struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Binds `port` on any CID. Fails with `EAFNOSUPPORT` when the kernel has no AF_VSOCK.
    pub(crate) fn bind(port: u32) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = VsockAddr::new(nix::libc::VMADDR_CID_ANY, port);
        socket::bind(fd.as_raw_fd(), &addr)?;
        socket::listen(&fd, Backlog::new(64).map_err(io::Error::from)?)?;
        Ok(Self { fd: register(fd)? })
    }

    pub(crate) async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                socket::accept4(
                    fd.get_ref().as_fd().as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            match res {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(Ok(raw)) => return FdStream::new(unsafe { OwnedFd::from_raw_fd(raw) }),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Finds the device node of the virtio-serial port called `name` by reading
/// `/sys/class/virtio-ports/vport*/name` (no udev in the guest, so no `/dev/virtio-ports/NAME`).
pub fn find_serial_port(name: &str) -> Option<PathBuf> {
    find_serial_port_in(
        Path::new("/sys/class/virtio-ports"),
        Path::new("/dev"),
        name,
    )
}

pub(crate) fn find_serial_port_in(sys: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(sys).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let port_name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim_end() == name).then(|| dev.join(e.file_name()))
    })
}

/// Opens a serial port for nonblocking async I/O.
pub(crate) fn open_serial(path: &Path) -> io::Result<FdStream> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
        .open(path)?;
    FdStream::new(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            parse_listen("tcp://127.0.0.1:5000").unwrap(),
            ListenUri::Tcp("127.0.0.1:5000".into())
        );
        assert_eq!(
            parse_listen("tcp://[::1]:0").unwrap(),
            ListenUri::Tcp("[::1]:0".into())
        );
        assert_eq!(
            parse_listen("unix:/run/agent.sock").unwrap(),
            ListenUri::Unix("/run/agent.sock".into())
        );
        assert_eq!(
            parse_listen("unix:///run/a.sock").unwrap(),
            ListenUri::Unix("/run/a.sock".into())
        );
        assert_eq!(
            parse_listen("vsock://5000").unwrap(),
            ListenUri::Vsock(5000)
        );
        assert_eq!(parse_listen("vsock:5000").unwrap(), ListenUri::Vsock(5000));
        assert_eq!(
            parse_listen("serial:agent").unwrap(),
            ListenUri::Serial("agent".into())
        );
        for uri in ["tcp://127.0.0.1:5000", "unix:/a", "vsock://1", "serial:x"] {
            assert_eq!(parse_listen(uri).unwrap().to_string(), uri);
        }
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "",
            "http://x:1",
            "tcp://127.0.0.1",
            "tcp://:80",
            "tcp://h:99999",
            "unix:",
            "vsock://abc",
            "serial:",
            "serial:../x",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serial_port_is_found_by_name() {
        let sys = tempfile::tempdir().unwrap();
        for (port, name) in [("vport1p1", "console"), ("vport1p2", "agent")] {
            std::fs::create_dir(sys.path().join(port)).unwrap();
            std::fs::write(sys.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        let dev = Path::new("/dev");
        assert_eq!(
            find_serial_port_in(sys.path(), dev, "agent"),
            Some(PathBuf::from("/dev/vport1p2"))
        );
        assert_eq!(find_serial_port_in(sys.path(), dev, "nope"), None);
        assert_eq!(
            find_serial_port_in(Path::new("/nonexistent"), dev, "agent"),
            None
        );
    }
}
