//! Serving processes: RAFS images served over FUSE by processes of their
//! own, so that a mount outlives the daemon that made it. The daemon mounts
//! (`host::sys::SystemOps::mount_fuse`) and keeps a copy of each
//! connection's `/dev/fuse` descriptor; a serving process
//! (`containerd-seamless-grpc serve-rafs`, [`server::run`]) answers the
//! connection's requests, in a session of its own so that nothing sent to the
//! daemon's process group reaches it. The daemon's side is
//! [`supervisor::ProcessFuse`]:
//!
//! - a daemon that dies or restarts finds its serving processes again through
//!   their control sockets, `<root>/nydus/servers/<pid>.sock`, and takes a
//!   copy of each connection back;
//! - a serving process that dies is started again on the kept descriptor,
//!   and the kernel is asked to send again the requests the dead one had
//!   read and not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9);
//! - a serving process of another binary (an upgrade) is replaced: its
//!   successor reads the same connection first, then it stops reading,
//!   answers what it read, and exits without unmounting. No request waits
//!   for a process to start.
//!
//! A mount is lost only when the daemon and its serving process are both
//! gone at once: nobody holds the connection then, and the kernel ends it.
//!
//! This module holds the protocol between the two: one message a datagram
//! of a `SOCK_SEQPACKET` unix socket, JSON of at most [`MAX_MESSAGE`] bytes,
//! a descriptor riding along where the message says so. Both ends are root
//! processes of ours, and still every message is parsed into its type and
//! bounded, and a server's answers are checked against what it was asked.

pub mod server;
pub mod supervisor;

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::nydus::fuse::{BlobBackend, FuseSpec, LazyAuth};

/// The largest message either end sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The subcommand of the daemon's binary that runs a serving process.
pub const SERVE_SUBCOMMAND: &str = "serve-rafs";
/// The descriptor number a serving process finds its daemon's link at.
pub const LINK_FD: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{op} on the serving process link: {errno}")]
    Socket { op: &'static str, errno: nix::errno::Errno },
    #[error("serving process link: {0}")]
    Protocol(String),
    #[error("serving process for {mountpoint}: {message}")]
    Server { mountpoint: String, message: String },
    #[error(transparent)]
    Fuse(#[from] crate::nydus::fuse::FuseError),
    #[error(transparent)]
    Sys(#[from] crate::host::sys::SysError),
}

impl From<crate::error::IoError> for ServingError {
    fn from(crate::error::IoError { op, path, source }: crate::error::IoError) -> ServingError {
        ServingError::Io { op, path, source }
    }
}

fn socket_err(op: &'static str) -> impl FnOnce(nix::errno::Errno) -> ServingError {
    move |errno| ServingError::Socket { op, errno }
}

/// What a daemon asks of a serving process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Serve `spec` on the connection sent with this message (on the link
    /// only, once). `resend`: the previous server of this connection died
    /// with requests read and unanswered, which the kernel is asked to queue
    /// again.
    Serve { spec: Box<WireSpec>, resend: bool },
    /// What it serves, and how much.
    Status,
    /// A copy of the connection's descriptor.
    Connection,
    /// Stop reading requests, answer those read, and exit without
    /// unmounting: a successor reads the connection.
    Retire,
}

/// A serving process's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Serving: its threads read the connection.
    Ready,
    Status(Box<ServerStatus>),
    /// The descriptor rides with this message.
    Connection,
    /// Every request it read is answered; it exits.
    Retired,
    Failed {
        message: String,
    },
}

/// What a serving process reports of itself.
#[derive(Debug, Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServerStatus {
    /// The version of the binary it runs.
    pub version: String,
    pub spec: WireSpec,
    /// Requests answered since it started.
    pub requests: u64,
    /// RFC 3339.
    pub started: String,
}

/// [`FuseSpec`] on the wire. Credentials of a registry travel only over the
/// root-only sockets of this module, never to disk.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WireSpec {
    pub bootstrap: PathBuf,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub backend: WireBackend,
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WireBackend {
    Local {
        dir: PathBuf,
    },
    Registry {
        host: String,
        repository: String,
        scheme: String,
        skip_verify: bool,
        basic: Option<String>,
        bearer: Option<String>,
    },
}

impl std::fmt::Debug for WireBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireBackend::Local { dir } => f.debug_struct("Local").field("dir", dir).finish(),
            WireBackend::Registry {
                host,
                repository,
                scheme,
                skip_verify,
                basic,
                bearer,
            } => f
                .debug_struct("Registry")
                .field("host", host)
                .field("repository", repository)
                .field("scheme", scheme)
                .field("skip_verify", skip_verify)
                .field("basic", &basic.as_ref().map(|_| ".."))
                .field("bearer", &bearer.as_ref().map(|_| ".."))
                .finish(),
        }
    }
}

impl From<&FuseSpec> for WireSpec {
    fn from(spec: &FuseSpec) -> WireSpec {
        let backend = match &spec.backend {
            BlobBackend::Local { dir } => WireBackend::Local { dir: dir.clone() },
            BlobBackend::Registry {
                host,
                repository,
                scheme,
                skip_verify,
                auth,
            } => WireBackend::Registry {
                host: host.clone(),
                repository: repository.clone(),
                scheme: scheme.to_string(),
                skip_verify: *skip_verify,
                basic: match auth {
                    Some(LazyAuth::Basic(b)) => Some(b.clone()),
                    _ => None,
                },
                bearer: match auth {
                    Some(LazyAuth::Bearer(b)) => Some(b.clone()),
                    _ => None,
                },
            },
        };
        WireSpec {
            bootstrap: spec.bootstrap.clone(),
            mountpoint: spec.mountpoint.clone(),
            cache_dir: spec.cache_dir.clone(),
            backend,
        }
    }
}

impl TryFrom<WireSpec> for FuseSpec {
    type Error = ServingError;

    fn try_from(wire: WireSpec) -> Result<FuseSpec, ServingError> {
        for path in [&wire.bootstrap, &wire.mountpoint, &wire.cache_dir] {
            if !path.is_absolute() {
                return Err(ServingError::Protocol(format!(
                    "path {} is not absolute",
                    path.display()
                )));
            }
        }
        let backend = match wire.backend {
            WireBackend::Local { dir } if dir.is_absolute() => BlobBackend::Local { dir },
            WireBackend::Local { dir } => {
                return Err(ServingError::Protocol(format!(
                    "blob directory {} is not absolute",
                    dir.display()
                )))
            }
            WireBackend::Registry {
                host,
                repository,
                scheme,
                skip_verify,
                basic,
                bearer,
            } => BlobBackend::Registry {
                host,
                repository,
                scheme: match scheme.as_str() {
                    "https" => "https",
                    "http" => "http",
                    other => return Err(ServingError::Protocol(format!("registry scheme {other:?}"))),
                },
                skip_verify,
                auth: match (basic, bearer) {
                    (Some(basic), None) => Some(LazyAuth::Basic(basic)),
                    (None, Some(bearer)) => Some(LazyAuth::Bearer(bearer)),
                    (None, None) => None,
                    (Some(_), Some(_)) => {
                        return Err(ServingError::Protocol(
                            "registry credentials both basic and bearer".to_string(),
                        ))
                    }
                },
            },
        };
        Ok(FuseSpec {
            bootstrap: wire.bootstrap,
            backend,
            cache_dir: wire.cache_dir,
            mountpoint: wire.mountpoint,
        })
    }
}

/// Sends `message`, with a copy of `fd` if given, as one datagram.
pub fn send(socket: BorrowedFd<'_>, message: &impl Serialize, fd: Option<BorrowedFd<'_>>) -> Result<(), ServingError> {
    let bytes = serde_json::to_vec(message).map_err(|e| ServingError::Protocol(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(ServingError::Protocol(format!(
            "message of {} bytes, over {MAX_MESSAGE}",
            bytes.len()
        )));
    }
    let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(socket_err("send"))?;
    Ok(())
}

/// Receives one datagram as a `T`, with the descriptor that rode along.
/// Waits at most `timeout`; a closed peer is an error.
pub fn receive<T: serde::de::DeserializeOwned>(
    socket: BorrowedFd<'_>,
    timeout: Duration,
) -> Result<(T, Option<OwnedFd>), ServingError> {
    let timeval = nix::sys::time::TimeVal::new(
        timeout.as_secs() as nix::sys::time::time_t,
        timeout.subsec_micros() as nix::sys::time::suseconds_t,
    );
    socket::setsockopt(&socket, socket::sockopt::ReceiveTimeout, &timeval).map_err(socket_err("set timeout"))?;
    let mut buffer = vec![0u8; MAX_MESSAGE + 1];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (length, flags, received) = {
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let message = socket::recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(socket_err("receive"))?;
        let mut received = Vec::new();
        for cmsg in message.cmsgs().map_err(socket_err("receive"))? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                received.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (message.bytes, message.flags, received)
    };
    if length == 0 {
        return Err(ServingError::Protocol("the other end closed the link".to_string()));
    }
    if length > MAX_MESSAGE || flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) || received.len() > 1 {
        return Err(ServingError::Protocol(format!(
            "a message over {MAX_MESSAGE} bytes or one descriptor"
        )));
    }
    let message = serde_json::from_slice(&buffer[..length]).map_err(|e| ServingError::Protocol(e.to_string()))?;
    Ok((message, received.into_iter().next()))
}

/// `FUSE_NOTIFY_RESEND` (linux/fuse.h, protocol 7.40).
const NOTIFY_RESEND: i32 = 7;

/// Asks the kernel to queue again the requests of `connection` that a dead
/// server read and never answered, so that the processes waiting on them
/// get an answer instead of waiting for ever. Kernels before 6.9 refuse:
/// those requests are lost.
pub fn ask_resend(connection: BorrowedFd<'_>, mountpoint: &Path) {
    // struct fuse_out_header: len, error (the notification's code), unique 0.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&NOTIFY_RESEND.to_ne_bytes());
    match nix::unistd::write(connection, &header) {
        Ok(_) => tracing::info!(mountpoint = %mountpoint.display(), "asked the kernel to resend unanswered requests"),
        Err(errno) => tracing::warn!(
            mountpoint = %mountpoint.display(),
            %errno,
            "the kernel cannot resend the requests a dead server left unanswered (Linux 6.9 can)"
        ),
    }
}

/// A new connection to the control socket at `path`.
pub fn connect(path: &Path) -> Result<OwnedFd, ServingError> {
    let socket = seqpacket_socket()?;
    let address = socket::UnixAddr::new(path).map_err(socket_err("address"))?;
    socket::connect(socket.as_raw_fd(), &address).map_err(socket_err("connect"))?;
    Ok(socket)
}

pub(crate) fn seqpacket_socket() -> Result<OwnedFd, ServingError> {
    socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(socket_err("socket"))
}

/// Asks the serving process at `path` one thing and returns its answer.
pub fn ask(path: &Path, request: &Request, timeout: Duration) -> Result<(Reply, Option<OwnedFd>), ServingError> {
    let socket = connect(path)?;
    send(socket.as_fd(), request, None)?;
    receive(socket.as_fd(), timeout)
}

/// The control socket of serving process `pid` in `dir`.
pub fn control_socket(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(backend: BlobBackend) -> FuseSpec {
        FuseSpec {
            bootstrap: "/r/snapshots/7/fs/image.boot".into(),
            backend,
            cache_dir: "/r/nydus/fuse-cache".into(),
            mountpoint: "/r/nydus/mnt/7".into(),
        }
    }

    #[test]
    fn specs_cross_the_link_unchanged_and_bad_ones_are_refused() {
        let registry = spec(BlobBackend::Registry {
            host: "registry.local:5000".into(),
            repository: "team/app".into(),
            scheme: "https",
            skip_verify: false,
            auth: Some(LazyAuth::Bearer("t0ken".into())),
        });
        let local = spec(BlobBackend::Local {
            dir: "/r/nydus/blobs".into(),
        });
        for original in [registry, local] {
            let wire = serde_json::to_vec(&WireSpec::from(&original)).unwrap();
            let back: WireSpec = serde_json::from_slice(&wire).unwrap();
            assert!(!format!("{back:?}").contains("t0ken"), "no secret in Debug");
            assert_eq!(FuseSpec::try_from(back).unwrap(), original);
        }

        let mut relative = WireSpec::from(&spec(BlobBackend::Local { dir: "/b".into() }));
        relative.mountpoint = "mnt/7".into();
        assert!(FuseSpec::try_from(relative).unwrap_err().to_string().contains("mnt/7"));
        let mut scheme = WireSpec::from(&spec(BlobBackend::Registry {
            host: "h".into(),
            repository: "r".into(),
            scheme: "https",
            skip_verify: false,
            auth: None,
        }));
        if let WireBackend::Registry { scheme: s, .. } = &mut scheme.backend {
            *s = "file".into();
        }
        assert!(FuseSpec::try_from(scheme).unwrap_err().to_string().contains("file"));
        let unknown = r#"{"op":"unmount_everything"}"#;
        assert!(serde_json::from_str::<Request>(unknown).is_err());
    }

    #[test]
    fn messages_carry_a_descriptor_and_oversized_ones_are_refused() {
        let (a, b) = socket::socketpair(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            None,
            socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send(a.as_fd(), &Reply::Connection, Some(file.as_fd())).unwrap();
        let (reply, fd) = receive::<Reply>(b.as_fd(), Duration::from_secs(5)).unwrap();
        assert!(matches!(reply, Reply::Connection));
        let fd = fd.expect("the descriptor rode along");
        let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(target, Path::new("/dev/null"));

        let big = vec![b' '; MAX_MESSAGE + 10];
        socket::send(a.as_raw_fd(), &big, MsgFlags::empty()).unwrap();
        let err = receive::<Reply>(b.as_fd(), Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("over"), "{err}");

        let err = receive::<Reply>(b.as_fd(), Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ServingError::Socket { .. }), "a timeout: {err}");
        drop(a);
        let err = receive::<Reply>(b.as_fd(), Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }
}
