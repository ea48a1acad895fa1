//! The daemon's side of serving processes: [`ProcessFuse`] mounts, starts a
//! serving process per mount, keeps a copy of each connection, watches each
//! process (a pidfd), starts another on the kept connection when one dies,
//! finds them again after a restart, and replaces those of another binary.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::socket;
use tracing::{error, info, warn};

use super::{
    ask, control_socket, receive, send, socket_err, Reply, Request, ServingError, WireSpec, LINK_FD, SERVE_SUBCOMMAND,
};
use crate::error::io_err;
use crate::host::sys::SystemOps;
use crate::nydus::fuse::{self, FuseError, FuseServer, FuseSpec, ServingProcess};

/// How long a new serving process may take to load its bootstrap and say
/// it serves.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a control request may take; a retiring process answers once
/// the requests it read are answered (a chunk from a registry: 60 s at most).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
const RETIRE_TIMEOUT: Duration = Duration::from_secs(130);
/// More deaths than this within the window and a mount is given up: it is
/// detached, and its readers get errors rather than wait for ever.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// One serving process of one mount, as this daemon knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedMount {
    pub mountpoint: PathBuf,
    pub bootstrap: PathBuf,
    pub pid: u32,
    /// Serving processes started again on this connection by this daemon.
    pub restarts: usize,
}

/// RAFS mounts served by processes of their own: see the module above.
#[derive(Debug, Clone)]
pub struct ProcessFuse {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The program of a serving process (the daemon's own binary).
    exe: PathBuf,
    /// `<root>/nydus/servers`: the control sockets.
    dir: PathBuf,
    /// `<root>/nydus/mnt`: every mount point served is directly in it.
    mounts: PathBuf,
    sys: Arc<dyn SystemOps>,
    served: Mutex<HashMap<PathBuf, Arc<Served>>>,
}

#[derive(Debug)]
struct Served {
    spec: FuseSpec,
    /// The daemon's copy of the connection: while it is open, a serving
    /// process may die and another take its place.
    connection: OwnedFd,
    state: Mutex<ServedState>,
}

#[derive(Debug)]
struct ServedState {
    pid: u32,
    /// Unmounted on purpose: the process's end is not a death.
    stopping: bool,
    restarts: VecDeque<Instant>,
    restarted: usize,
}

impl Served {
    fn lock(&self) -> MutexGuard<'_, ServedState> {
        // Every change of the state is a plain field assignment.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A serving process found at start-up.
struct Found {
    pid: u32,
    spec: FuseSpec,
    connection: OwnedFd,
}

impl ProcessFuse {
    /// Opens `<nydus_dir>/servers`, runs serving processes from `exe`, and
    /// takes over the serving processes a previous run left: each is watched
    /// again, and one running another binary than `exe` is replaced.
    /// Sockets of dead processes are removed; their mounts are dead.
    pub fn open(exe: &Path, nydus_dir: &Path, sys: Arc<dyn SystemOps>) -> Result<ProcessFuse, ServingError> {
        let dir = nydus_dir.join("servers");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create directory", &dir))?;
        let fuse = ProcessFuse {
            inner: Arc::new(Inner {
                exe: exe.to_path_buf(),
                dir,
                mounts: nydus_dir.join(crate::nydus::mount::MOUNTS),
                sys,
                served: Mutex::new(HashMap::new()),
            }),
        };
        fuse.inner.adopt_all()?;
        Ok(fuse)
    }

    /// Lets go of every serving process without stopping it, as a daemon
    /// that exits does: they serve on, for the next daemon to take over.
    pub fn abandon(&self) {
        for (_, served) in self.inner.lock().drain() {
            served.lock().stopping = true;
        }
    }

    /// The serving processes of this daemon's mounts.
    pub fn served(&self) -> Vec<ServedMount> {
        let mut list: Vec<ServedMount> = self
            .inner
            .lock()
            .values()
            .map(|served| {
                let state = served.lock();
                ServedMount {
                    mountpoint: served.spec.mountpoint.clone(),
                    bootstrap: served.spec.bootstrap.clone(),
                    pid: state.pid,
                    restarts: state.restarted,
                }
            })
            .collect();
        list.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        list
    }
}

impl FuseServer for ProcessFuse {
    fn serve(&self, spec: &FuseSpec) -> Result<(), FuseError> {
        let inner = &self.inner;
        let failed = |message: String| FuseError::Session {
            mountpoint: spec.mountpoint.display().to_string(),
            message,
        };
        let connection = inner
            .sys
            .mount_fuse(&spec.mountpoint, "rafs", fuse::max_read())
            .map_err(|e| failed(e.to_string()))?;
        let pid = match inner.spawn(spec, connection.as_fd(), false) {
            Ok(pid) => pid,
            Err(e) => {
                if let Err(unmount) = inner.sys.unmount(&spec.mountpoint) {
                    warn!(mountpoint = %spec.mountpoint.display(), error = %unmount, "FUSE mount left for cleanup");
                }
                return Err(failed(e.to_string()));
            }
        };
        info!(mountpoint = %spec.mountpoint.display(), pid, "RAFS served by its own process");
        inner.register(spec.clone(), connection, pid);
        Ok(())
    }

    fn stop(&self, mountpoint: &Path) -> Result<bool, FuseError> {
        let Some(served) = self.inner.lock().remove(mountpoint) else {
            return Ok(false);
        };
        served.lock().stopping = true;
        // The process ends when the kernel ends the connection: at once, or
        // once the last user of a busy mount lets go.
        self.inner.sys.unmount(mountpoint).map_err(|e| FuseError::Session {
            mountpoint: mountpoint.display().to_string(),
            message: e.to_string(),
        })?;
        info!(mountpoint = %mountpoint.display(), "stopped serving RAFS");
        Ok(true)
    }

    fn serves(&self, mountpoint: &Path) -> bool {
        self.inner.lock().contains_key(mountpoint)
    }

    fn server_of(&self, mountpoint: &Path) -> Option<ServingProcess> {
        let served = self.inner.lock().get(mountpoint)?.clone();
        let state = served.lock();
        Some(ServingProcess {
            pid: state.pid,
            restarts: state.restarted,
        })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, Arc<Served>>> {
        // Every change of the map is one insert or removal.
        self.served.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a serving process of `spec` on `connection`; returns its pid
    /// once it serves.
    fn spawn(&self, spec: &FuseSpec, connection: BorrowedFd<'_>, resend: bool) -> Result<u32, ServingError> {
        let (ours, theirs) = socket::socketpair(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            None,
            socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(socket_err("socketpair"))?;
        let link = theirs.as_raw_fd();
        let mut command = Command::new(&self.exe);
        command
            .arg(SERVE_SUBCOMMAND)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec the closure calls only setsid, dup2
        // and fcntl, which are async-signal-safe, and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                // A session of its own: signals to the daemon's process
                // group (a terminal's ^C, a group kill) do not reach it.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = if link == LINK_FD {
                    libc::fcntl(link, libc::F_SETFD, 0)
                } else {
                    libc::dup2(link, LINK_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(io_err("start", &self.exe))?;
        drop(theirs);
        let pid = child.id();
        let request = Request::Serve {
            spec: Box::new(WireSpec::from(spec)),
            resend,
        };
        let answer =
            send(ours.as_fd(), &request, Some(connection)).and_then(|()| receive::<Reply>(ours.as_fd(), START_TIMEOUT));
        let message = match answer {
            Ok((Reply::Ready, _)) => return Ok(pid),
            Ok((Reply::Failed { message }, _)) => message,
            Ok(_) => "an answer other than ready".to_string(),
            Err(e) => e.to_string(),
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(ServingError::Server {
            mountpoint: spec.mountpoint.display().to_string(),
            message,
        })
    }

    fn register(self: &Arc<Self>, spec: FuseSpec, connection: OwnedFd, pid: u32) -> Arc<Served> {
        let served = Arc::new(Served {
            spec,
            connection,
            state: Mutex::new(ServedState {
                pid,
                stopping: false,
                restarts: VecDeque::new(),
                restarted: 0,
            }),
        });
        self.lock().insert(served.spec.mountpoint.clone(), served.clone());
        let (inner, watched) = (self.clone(), served.clone());
        let spawned = std::thread::Builder::new()
            .name("rafs-watch".to_string())
            .spawn(move || inner.watch(&watched));
        if let Err(e) = spawned {
            error!(mountpoint = %served.spec.mountpoint.display(), error = %e, "cannot watch a serving process");
        }
        served
    }

    /// Waits for each serving process of `served` to end, and starts
    /// another on the kept connection when one dies.
    fn watch(&self, served: &Served) {
        let mountpoint = served.spec.mountpoint.display().to_string();
        loop {
            let pid = served.lock().pid;
            wait_for_exit(pid);
            let _ = std::fs::remove_file(control_socket(&self.dir, pid));
            let mut state = served.lock();
            if state.stopping {
                return;
            }
            if state.pid != pid {
                // Replaced by a successor (an upgrade): watch that one.
                continue;
            }
            if !self.sys.is_mountpoint(&served.spec.mountpoint).unwrap_or(true) {
                // Unmounted behind our back: the connection ended, and the
                // process with it, as it should.
                info!(mountpoint, pid, "the mount is gone: its serving process ended with it");
                state.stopping = true;
                drop(state);
                self.forget(served);
                return;
            }
            let now = Instant::now();
            state.restarts.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
            loop {
                if state.restarts.len() >= MAX_RESTARTS {
                    error!(
                        mountpoint,
                        restarts = state.restarts.len(),
                        "serving processes keep dying: giving the mount up (its readers get errors)"
                    );
                    state.stopping = true;
                    drop(state);
                    self.forget(served);
                    if let Err(e) = self.sys.unmount(&served.spec.mountpoint) {
                        warn!(mountpoint, error = %e, "FUSE mount left for cleanup");
                    }
                    return;
                }
                state.restarts.push_back(Instant::now());
                warn!(
                    mountpoint,
                    pid, "serving process died: starting another on the same connection"
                );
                match self.spawn(&served.spec, served.connection.as_fd(), true) {
                    Ok(new) => {
                        info!(mountpoint, pid = new, "serving again");
                        state.pid = new;
                        state.restarted += 1;
                        break;
                    }
                    Err(e) => {
                        error!(mountpoint, error = %e, "cannot start a serving process");
                        drop(state);
                        std::thread::sleep(Duration::from_secs(1));
                        state = served.lock();
                        if state.stopping {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Drops `served` from the map, unless another took its mount point.
    fn forget(&self, served: &Served) {
        let mut map = self.lock();
        if map
            .get(&served.spec.mountpoint)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), served))
        {
            map.remove(&served.spec.mountpoint);
        }
    }

    /// Finds the serving processes in `dir`: each live one is watched again
    /// (one per mount point; extra ones retire), a dead one's socket goes.
    fn adopt_all(self: &Arc<Self>) -> Result<(), ServingError> {
        let mut found: Vec<Found> = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))? {
            let entry = entry.map_err(io_err("read directory", &self.dir))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("sock") {
                warn!(path = %path.display(), "unexpected entry among serving processes' sockets");
                continue;
            }
            match self.adopt(&path) {
                Ok(one) => found.push(one),
                Err(e) => {
                    info!(socket = %path.display(), reason = %e, "a serving process of a previous run is gone");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // The newest serving process of a mount (an upgrade cut short leaves
        // two) keeps it.
        found.sort_by_key(|f| std::cmp::Reverse(process_start(f.pid)));
        let own = executable_identity(&self.exe);
        for one in found {
            let mountpoint = one.spec.mountpoint.clone();
            let mounted = self.sys.is_mountpoint(&mountpoint).unwrap_or(false);
            if !mounted || self.lock().contains_key(&mountpoint) {
                info!(mountpoint = %mountpoint.display(), pid = one.pid, mounted, "retiring a serving process no mount needs");
                self.retire(one.pid);
                continue;
            }
            info!(mountpoint = %mountpoint.display(), pid = one.pid, "took over a serving process of a previous run");
            let pid = one.pid;
            let served = self.register(one.spec, one.connection, pid);
            if own.is_some() && executable_identity(Path::new(&format!("/proc/{pid}/exe"))) != own {
                if let Err(e) = self.replace(&served) {
                    warn!(mountpoint = %mountpoint.display(), error = %e, "the serving process of an older binary serves on");
                }
            }
        }
        Ok(())
    }

    /// Connects to the serving process at `socket`: what it serves, its pid
    /// (the kernel's word, not its own), and a copy of its connection.
    fn adopt(&self, socket: &Path) -> Result<Found, ServingError> {
        let control = super::connect(socket)?;
        let pid = socket::getsockopt(&control, socket::sockopt::PeerCredentials)
            .map_err(socket_err("peer credentials"))?
            .pid();
        let pid = u32::try_from(pid).map_err(|_| ServingError::Protocol(format!("peer pid {pid}")))?;
        send(control.as_fd(), &Request::Status, None)?;
        let status = match receive::<Reply>(control.as_fd(), ASK_TIMEOUT)? {
            (Reply::Status(status), _) => status,
            _ => {
                return Err(ServingError::Protocol(
                    "status answered with something else".to_string(),
                ))
            }
        };
        let spec = FuseSpec::try_from(status.spec.clone())?;
        if spec.mountpoint.parent() != Some(self.mounts.as_path()) {
            return Err(ServingError::Protocol(format!(
                "a serving process claims {}, outside {}",
                spec.mountpoint.display(),
                self.mounts.display()
            )));
        }
        let connection = match ask(socket, &Request::Connection, ASK_TIMEOUT)? {
            (Reply::Connection, Some(fd)) => fd,
            _ => return Err(ServingError::Protocol("no connection in the answer".to_string())),
        };
        let target = std::fs::read_link(format!("/proc/self/fd/{}", connection.as_raw_fd()))
            .map_err(io_err("inspect", Path::new("the received descriptor")))?;
        if target != Path::new("/dev/fuse") {
            return Err(ServingError::Protocol(format!(
                "the received descriptor is {}, not /dev/fuse",
                target.display()
            )));
        }
        Ok(Found { pid, spec, connection })
    }

    /// Replaces the serving process of `served` by one of this daemon's
    /// binary: the successor reads the connection first, then the
    /// predecessor retires.
    fn replace(&self, served: &Served) -> Result<(), ServingError> {
        let mut state = served.lock();
        let old = state.pid;
        let new = self.spawn(&served.spec, served.connection.as_fd(), false)?;
        state.pid = new;
        drop(state);
        info!(mountpoint = %served.spec.mountpoint.display(), old, new, "replacing a serving process of another binary");
        self.retire(old);
        Ok(())
    }

    /// Asks serving process `pid` to retire and waits until it has; kills
    /// it if it cannot, and has the kernel resend what it read.
    fn retire(&self, pid: u32) {
        match ask(&control_socket(&self.dir, pid), &Request::Retire, RETIRE_TIMEOUT) {
            Ok((Reply::Retired, _)) => {}
            outcome => {
                let reason = match outcome {
                    Err(e) => e.to_string(),
                    Ok(_) => "an answer other than retired".to_string(),
                };
                warn!(pid, reason, "a serving process did not retire: killing it");
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
                wait_for_exit(pid);
                let _ = std::fs::remove_file(control_socket(&self.dir, pid));
                for served in self.lock().values() {
                    if served.lock().pid != pid {
                        super::ask_resend(served.connection.as_fd(), &served.spec.mountpoint);
                    }
                }
            }
        }
    }
}

/// Waits until process `pid` has exited, and reaps it if it is a child.
fn wait_for_exit(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: the descriptor was just returned to this process.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        loop {
            let mut fds = [nix::poll::PollFd::new(pidfd.as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                _ => break,
            }
        }
    }
    // A child of this daemon's is reaped; another's (a previous run's) is
    // not ours to reap (ECHILD).
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
}

/// (device, inode) of the file `path` names, following /proc's links even
/// to a deleted file.
fn executable_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// When process `pid` started, in clock ticks since boot (0 if unknown).
fn process_start(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Field 22, counted after the command name's closing parenthesis.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
