//! The serving process, `containerd-seamless-grpc serve-rafs --dir DIR`:
//! takes one connection and its spec from the daemon that started it (the
//! link at descriptor [`LINK_FD`]), answers the connection's requests with
//! [`THREADS_PER_MOUNT`] threads, and answers daemons on its control socket
//! `DIR/<pid>.sock` until the connection ends (the mount is gone) or it is
//! told to retire. It never mounts nor unmounts: the daemon does both.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_backend_rs::transport::FuseSession;
use nix::sys::socket;
use tracing::{info, warn};

use super::{receive, send, socket_err, Reply, Request, ServerStatus, ServingError, WireSpec, LINK_FD};
use crate::error::io_err;
use crate::nydus::fuse::{load_server, serve_channel, FuseSpec, THREADS_PER_MOUNT};

/// How long the daemon may take to send the spec, and a control client its
/// request.
const LINK_TIMEOUT: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the control loop looks whether the connection has ended.
const POLL_INTERVAL_MS: u16 = 200;

struct Serving {
    spec: WireSpec,
    /// Holds the connection: made on a directory of ours, never mounted,
    /// and forgotten rather than dropped (a drop would try an unmount).
    session: FuseSession,
    threads: Vec<JoinHandle<()>>,
    answered: Arc<AtomicU64>,
    started: String,
    socket: PathBuf,
}

/// Runs the serving process on the link the daemon left at [`LINK_FD`].
pub fn run_on_inherited_link(dir: &Path) -> Result<(), ServingError> {
    // SAFETY: fstat only writes into the buffer it is given.
    let stat = nix::sys::stat::fstat(LINK_FD).map_err(socket_err("inspect the link"))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(ServingError::Protocol(format!(
            "descriptor {LINK_FD} is not the daemon's link (started by hand?)"
        )));
    }
    // SAFETY: descriptor 3 is a socket (checked above) that the daemon left
    // open for this process alone; nothing else in it owns the number.
    let link = unsafe { OwnedFd::from_raw_fd(LINK_FD) };
    run(link, dir)
}

/// Serves the connection the daemon sends on `link`.
pub fn run(link: OwnedFd, dir: &Path) -> Result<(), ServingError> {
    let (request, connection) = receive::<Request>(link.as_fd(), LINK_TIMEOUT)?;
    let (spec, resend) = match request {
        Request::Serve { spec, resend } => (spec, resend),
        _ => {
            return Err(ServingError::Protocol(
                "the link's first message is not serve".to_string(),
            ))
        }
    };
    let started = start(*spec, connection, resend, dir);
    let serving = match started {
        Ok(serving) => serving,
        Err(e) => {
            let _ = send(link.as_fd(), &Reply::Failed { message: e.to_string() }, None);
            return Err(e);
        }
    };
    // Its control socket exists before the daemon hears it serves.
    let listener = match serving.bind() {
        Ok(listener) => listener,
        Err(e) => {
            let _ = send(link.as_fd(), &Reply::Failed { message: e.to_string() }, None);
            return Err(e);
        }
    };
    send(link.as_fd(), &Reply::Ready, None)?;
    drop(link);
    serving.answer_control(listener)
}

fn start(spec: WireSpec, connection: Option<OwnedFd>, resend: bool, dir: &Path) -> Result<Serving, ServingError> {
    let connection = connection.ok_or_else(|| ServingError::Protocol("serve came without a connection".to_string()))?;
    let fuse_spec = FuseSpec::try_from(spec.clone())?;
    let mountpoint = fuse_spec.mountpoint.clone();
    let server = load_server(&fuse_spec, "seamless-rafs")?;
    let session_err = |message: String| ServingError::Server {
        mountpoint: mountpoint.display().to_string(),
        message,
    };
    let mut session = FuseSession::new(dir, "seamless-rafs", "rafs", true).map_err(|e| session_err(e.to_string()))?;
    session.set_fuse_file(std::fs::File::from(connection));
    let answered = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::with_capacity(THREADS_PER_MOUNT);
    for thread in 0..THREADS_PER_MOUNT {
        let channel = session.new_channel().map_err(|e| session_err(e.to_string()))?;
        let (server, mountpoint, answered) = (server.clone(), mountpoint.clone(), answered.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("rafs-fuse-{thread}"))
                .spawn(move || serve_channel(channel, &server, &mountpoint, &answered))
                .map_err(|e| session_err(format!("starting a serving thread: {e}")))?,
        );
    }
    if resend {
        if let Some(file) = session.get_fuse_file() {
            super::ask_resend(file.as_fd(), &mountpoint);
        }
    }
    let socket = super::control_socket(dir, std::process::id());
    info!(
        mountpoint = %mountpoint.display(),
        bootstrap = %fuse_spec.bootstrap.display(),
        resend,
        control = %socket.display(),
        "serving RAFS over FUSE"
    );
    Ok(Serving {
        spec,
        session,
        threads,
        answered,
        started: crate::time::rfc3339(std::time::SystemTime::now()),
        socket,
    })
}

impl Serving {
    /// Answers daemons on the control socket until the connection ends or a
    /// daemon says retire.
    fn answer_control(mut self, listener: OwnedFd) -> Result<(), ServingError> {
        loop {
            let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(POLL_INTERVAL_MS)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => {}
                Ok(_) => match socket::accept4(listener.as_raw_fd(), socket::SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor this process owns.
                    Ok(fd) => self.answer(unsafe { OwnedFd::from_raw_fd(fd) }),
                    Err(errno) => warn!(%errno, "accepting a control connection"),
                },
                Err(errno) => return Err(socket_err("poll the control socket")(errno)),
            }
            if self.threads.iter().all(|t| t.is_finished()) {
                info!(mountpoint = %self.spec.mountpoint.display(), "the connection ended (unmounted): exiting");
                let _ = std::fs::remove_file(&self.socket);
                std::mem::forget(self.session);
                return Ok(());
            }
        }
    }

    fn bind(&self) -> Result<OwnedFd, ServingError> {
        let listener = super::seqpacket_socket()?;
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &self.socket)(e).into()),
        }
        let address = socket::UnixAddr::new(&self.socket).map_err(socket_err("address"))?;
        socket::bind(listener.as_raw_fd(), &address).map_err(socket_err("bind the control socket"))?;
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", &self.socket))?;
        socket::listen(&listener, socket::Backlog::new(16).map_err(socket_err("listen"))?)
            .map_err(socket_err("listen"))?;
        Ok(listener)
    }

    fn answer(&mut self, connection: OwnedFd) {
        let request = match receive::<Request>(connection.as_fd(), REQUEST_TIMEOUT) {
            Ok((request, _)) => request,
            Err(e) => {
                warn!(error = %e, "a control request");
                return;
            }
        };
        let sent = match request {
            Request::Status => send(
                connection.as_fd(),
                &Reply::Status(Box::new(ServerStatus {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    spec: self.spec.clone(),
                    requests: self.answered.load(std::sync::atomic::Ordering::Relaxed),
                    started: self.started.clone(),
                })),
                None,
            ),
            Request::Connection => match self.session.get_fuse_file() {
                Some(file) => send(connection.as_fd(), &Reply::Connection, Some(file.as_fd())),
                None => send(
                    connection.as_fd(),
                    &Reply::Failed {
                        message: "no connection".to_string(),
                    },
                    None,
                ),
            },
            Request::Retire => self.retire(connection),
            Request::Serve { .. } => send(
                connection.as_fd(),
                &Reply::Failed {
                    message: "already serving".to_string(),
                },
                None,
            ),
        };
        if let Err(e) = sent {
            warn!(error = %e, "answering a control request");
        }
    }

    /// Stops reading, waits for the requests read to be answered, says so,
    /// and exits leaving the mount to the successor.
    fn retire(&mut self, connection: OwnedFd) -> Result<(), ServingError> {
        info!(mountpoint = %self.spec.mountpoint.display(), "retiring: a successor serves the connection");
        if let Err(e) = self.session.wake() {
            warn!(error = %e, "waking the serving threads");
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        send(connection.as_fd(), &Reply::Retired, None)?;
        // No destructor: the session must not unmount, and the successor
        // holds the connection already.
        std::process::exit(0)
    }
}
