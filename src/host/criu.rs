//! Process state through CRIU, as runc drives it: dumps and pre-dumps of a
//! running container's processes into an images directory, CRIU's dump
//! statistics, and the runc options a restore hands to containerd. Knows
//! nothing of where images are stored; restores run through containerd's
//! task API (runc's `criu_image_path`), not here.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorKind};

/// Magic numbers at the head of CRIU image files (criu/include/magic.h).
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// The `Any` type of runc's task options in containerd 1.6
/// (runtime/v2/runc/options/oci.proto).
pub const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";

/// How many trailing lines of a CRIU log an error quotes.
const LOG_TAIL_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("{action} of container {container} failed: {message}{log}")]
    Failed {
        action: &'static str,
        container: String,
        message: String,
        /// The tail of CRIU's log, with a leading newline, or empty.
        log: String,
    },
    #[error("CRIU statistics {path}: {reason}")]
    Stats { path: String, reason: String },
    #[error("{program} did not finish within {timeout:?} and was killed with what it started")]
    Timeout { program: String, timeout: Duration },
}

impl Classify for CriuError {
    fn kind(&self) -> ErrorKind {
        match self {
            CriuError::Spawn { .. } => ErrorKind::FailedPrecondition,
            CriuError::Failed { .. } | CriuError::Stats { .. } => ErrorKind::Internal,
            CriuError::Timeout { .. } => ErrorKind::Unavailable,
        }
    }
}

/// Which runc and criu to use, and where runc keeps container state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuSettings {
    pub runc: PathBuf,
    /// containerd's runc shims keep state under `<runc_root>/<namespace>`.
    pub runc_root: PathBuf,
    /// criu binary for runc (`--criu`); None: runc's own lookup on PATH.
    pub criu: Option<PathBuf>,
    /// How long runc and CRIU may run before they are killed.
    pub timeout: Duration,
}

/// What [`CriuSettings::default`] gives runc and CRIU.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

impl CriuSettings {
    /// The settings of the `[criu]` table; an empty `criu_path` leaves
    /// runc to find criu on PATH.
    pub fn from_config(config: &crate::config::CriuConfig) -> CriuSettings {
        CriuSettings {
            runc: config.runc.clone().into(),
            runc_root: config.runc_root.clone().into(),
            criu: Some(&config.criu_path).filter(|p| !p.is_empty()).map(Into::into),
            timeout: Duration::from_secs(config.dump_timeout_seconds),
        }
    }
}

impl Default for CriuSettings {
    fn default() -> Self {
        CriuSettings {
            runc: PathBuf::from("runc"),
            runc_root: PathBuf::from("/run/containerd/runc"),
            criu: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// One dump (or pre-dump) of a container's processes.
#[derive(Debug, Clone)]
pub struct DumpRequest<'a> {
    pub namespace: &'a str,
    pub container: &'a str,
    /// Where the images go (must exist, empty).
    pub images: &'a Path,
    /// CRIU's working directory: dump.log and stats-dump.
    pub work: &'a Path,
    /// Images of the previous (pre-)dump: only pages dirtied since are
    /// written. Relative to `images` (runc refuses absolute ones).
    pub parent: Option<&'a Path>,
    pub pre_dump: bool,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub file_locks: bool,
}

impl CriuSettings {
    /// runc's arguments for `request`.
    pub fn dump_args(&self, request: &DumpRequest<'_>) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--root".into(), self.runc_root.join(request.namespace).into()];
        if let Some(criu) = &self.criu {
            args.push("--criu".into());
            args.push(criu.into());
        }
        args.push("checkpoint".into());
        args.push("--image-path".into());
        args.push(request.images.into());
        args.push("--work-path".into());
        args.push(request.work.into());
        if let Some(parent) = request.parent {
            args.push("--parent-path".into());
            args.push(parent.into());
        }
        if request.pre_dump {
            args.push("--pre-dump".into());
        } else if request.leave_running {
            args.push("--leave-running".into());
        }
        if request.tcp_established {
            args.push("--tcp-established".into());
        }
        if request.file_locks {
            args.push("--file-locks".into());
        }
        args.push(request.container.into());
        args
    }

    /// Dumps (or pre-dumps) the container's processes, waiting for runc.
    /// A failure quotes the end of CRIU's log.
    pub fn dump(&self, request: &DumpRequest<'_>) -> Result<(), CriuError> {
        let mut command = Command::new(&self.runc);
        command.args(self.dump_args(request));
        let output = run_bounded(command, &self.runc, self.timeout)?;
        if output.status.success() {
            return Ok(());
        }
        let log_name = if request.pre_dump { "pre-dump.log" } else { "dump.log" };
        Err(CriuError::Failed {
            action: if request.pre_dump { "pre-dump" } else { "dump" },
            container: request.container.to_string(),
            message: runc_message(&output.stderr, output.status),
            log: log_tail(&request.work.join(log_name)),
        })
    }

    /// Whether the kernel tracks the pages a process dirties (soft-dirty
    /// bits, CONFIG_MEM_SOFT_DIRTY), which pre-dumps and incremental memory
    /// dumps need.
    pub fn dirty_tracking(&self) -> bool {
        let criu = self.criu.clone().unwrap_or_else(|| PathBuf::from("criu"));
        let mut command = Command::new(&criu);
        command.args(["check", "--feature", "mem_dirty_track"]);
        run_bounded(command, &criu, QUERY_TIMEOUT).is_ok_and(|o| o.status.success())
    }

    /// The criu version runc will use ("4.1.1"), or empty if it cannot tell.
    pub fn criu_version(&self) -> String {
        let criu = self.criu.clone().unwrap_or_else(|| PathBuf::from("criu"));
        let mut command = Command::new(&criu);
        command.arg("--version");
        run_bounded(command, &criu, QUERY_TIMEOUT)
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string()))
            })
            .unwrap_or_default()
    }
}

/// `criu check` and `criu --version` answer in well under a second.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `command` to its end and returns what it printed, as
/// [`Command::output`] does, except that it can neither outlive the daemon
/// nor run forever: the child gets SIGKILL when the thread that started it
/// dies (`PR_SET_PDEATHSIG`; the thread waits here until the child ends, so
/// only the daemon's death triggers it), and runs in a process group of
/// its own, all of which is killed once `timeout` passes (runc and the
/// CRIU it started alike).
fn run_bounded(mut command: Command, program: &Path, timeout: Duration) -> Result<Output, CriuError> {
    let spawn_err = |source: std::io::Error| CriuError::Spawn {
        program: program.display().to_string(),
        source,
    };
    let parent = nix::unistd::getpid();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and makes
    // only async-signal-safe calls (prctl, getppid, setpgid), allocating
    // nothing and touching no lock of the parent's.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon died before the prctl took effect: no signal comes.
            if libc::getppid() != parent.as_raw() {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(spawn_err)?;
    let pid = child.id();
    let readers = [
        child.stdout.take().map(|out| read_all_in_thread(Box::new(out))),
        child.stderr.take().map(|err| read_all_in_thread(Box::new(err))),
    ];
    let (done, waited) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = done.send(());
        status
    });
    let timed_out = matches!(waited.recv_timeout(timeout), Err(mpsc::RecvTimeoutError::Timeout));
    if timed_out {
        // The group is the child's pid (setpgid(0, 0) above); it has not
        // been reaped yet, so the id cannot have been reused.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let status = waiter
        .join()
        .map_err(|_| spawn_err(std::io::Error::other("the waiting thread panicked")))?
        .map_err(spawn_err)?;
    let [stdout, stderr] = readers.map(|r| r.and_then(|r| r.join().ok()).unwrap_or_default());
    if timed_out {
        return Err(CriuError::Timeout {
            program: program.display().to_string(),
            timeout,
        });
    }
    Ok(Output { status, stdout, stderr })
}

fn read_all_in_thread(mut pipe: Box<dyn Read + Send>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// What runc printed on failure, without its JSON log framing.
fn runc_message(stderr: &[u8], status: std::process::ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or_else(|| l.to_string())
        })
        .collect();
    if lines.is_empty() {
        format!("runc exited with {status}")
    } else {
        lines[lines.len().saturating_sub(3)..].join("; ")
    }
}

/// The last lines of the log at `path`, each indented, after a newline; or
/// empty when there is no log.
pub fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail_from = lines.len().saturating_sub(LOG_TAIL_LINES);
    // CRIU's errors come before the clean-up it logs last.
    let errors = error_lines(&lines[..tail_from]);
    let mut out = format!("\n{}:", path.display());
    for line in errors
        .iter()
        .chain(["..."].iter().filter(|_| !errors.is_empty()))
        .chain(&lines[tail_from..])
    {
        out.push_str("\n  ");
        out.push_str(line);
    }
    out
}

/// CRIU's error lines of the log at `path` (the first few), which say why it
/// failed; empty when there is no log or no error in it.
pub fn log_errors(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    error_lines(&lines).into_iter().map(str::to_string).collect()
}

fn error_lines<'a>(lines: &[&'a str]) -> Vec<&'a str> {
    lines
        .iter()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .take(LOG_TAIL_LINES)
        .copied()
        .collect()
}

/// CRIU's statistics of a dump (times in microseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpStats {
    pub freezing_time_us: u64,
    pub frozen_time_us: u64,
    pub memdump_time_us: u64,
    pub memwrite_time_us: u64,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
}

// images/stats.proto (proto2); every field read as optional.
#[derive(Clone, PartialEq, prost::Message)]
struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    dump: Option<DumpStatsEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DumpStatsEntry {
    #[prost(uint32, optional, tag = "1")]
    freezing_time: Option<u32>,
    #[prost(uint32, optional, tag = "2")]
    frozen_time: Option<u32>,
    #[prost(uint32, optional, tag = "3")]
    memdump_time: Option<u32>,
    #[prost(uint32, optional, tag = "4")]
    memwrite_time: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    pages_scanned: Option<u64>,
    #[prost(uint64, optional, tag = "6")]
    pages_skipped_parent: Option<u64>,
    #[prost(uint64, optional, tag = "7")]
    pages_written: Option<u64>,
}

/// Parses a `stats-dump` image: the magics, then one size-prefixed entry.
pub fn parse_stats(bytes: &[u8]) -> Result<DumpStats, String> {
    let word = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?)) };
    let mut at = match word(0) {
        Some(IMG_SERVICE_MAGIC) | Some(IMG_COMMON_MAGIC) => 4,
        Some(STATS_MAGIC) => 0,
        _ => return Err("not a CRIU image (bad magic)".into()),
    };
    if word(at) != Some(STATS_MAGIC) {
        return Err("not a CRIU statistics image".into());
    }
    at += 4;
    let size = word(at).ok_or("no statistics entry")? as usize;
    let entry = bytes
        .get(at + 4..at + 4 + size)
        .ok_or("statistics entry is truncated")?;
    let stats = <StatsEntry as prost::Message>::decode(entry).map_err(|e| e.to_string())?;
    let dump = stats.dump.ok_or("no dump statistics in the entry")?;
    Ok(DumpStats {
        freezing_time_us: dump.freezing_time.unwrap_or(0).into(),
        frozen_time_us: dump.frozen_time.unwrap_or(0).into(),
        memdump_time_us: dump.memdump_time.unwrap_or(0).into(),
        memwrite_time_us: dump.memwrite_time.unwrap_or(0).into(),
        pages_scanned: dump.pages_scanned.unwrap_or(0),
        pages_skipped_parent: dump.pages_skipped_parent.unwrap_or(0),
        pages_written: dump.pages_written.unwrap_or(0),
    })
}

/// The statistics CRIU left in `work` (or, for older layouts, `images`).
pub fn read_stats(work: &Path, images: &Path) -> Result<DumpStats, CriuError> {
    let path = [work, images]
        .iter()
        .map(|dir| dir.join("stats-dump"))
        .find(|p| p.exists())
        .unwrap_or_else(|| work.join("stats-dump"));
    let bytes = std::fs::read(&path).map_err(|e| CriuError::Stats {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_stats(&bytes).map_err(|reason| CriuError::Stats {
        path: path.display().to_string(),
        reason,
    })
}

/// runc's task options: runtime/v2/runc/options/oci.proto of containerd
/// 1.6 (restore sets some; restore's trust policy reads which a record sets).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RuncOptions {
    #[prost(bool, tag = "1")]
    pub(crate) no_pivot_root: bool,
    #[prost(bool, tag = "2")]
    pub(crate) no_new_keyring: bool,
    #[prost(string, tag = "3")]
    pub(crate) shim_cgroup: String,
    #[prost(uint32, tag = "4")]
    pub(crate) io_uid: u32,
    #[prost(uint32, tag = "5")]
    pub(crate) io_gid: u32,
    #[prost(string, tag = "6")]
    pub(crate) binary_name: String,
    #[prost(string, tag = "7")]
    pub(crate) root: String,
    #[prost(string, tag = "8")]
    pub(crate) criu_path: String,
    #[prost(bool, tag = "9")]
    pub(crate) systemd_cgroup: bool,
    #[prost(string, tag = "10")]
    pub(crate) criu_image_path: String,
    #[prost(string, tag = "11")]
    pub(crate) criu_work_path: String,
}

/// Task options that make containerd's runc shim restore from `images`
/// (CRIU working in `work`), keeping whatever runc options the container
/// was created with (`base`, the container's runtime options).
pub fn restore_options(
    base: Option<&prost_types::Any>,
    images: &Path,
    work: &Path,
    criu: Option<&Path>,
) -> Result<prost_types::Any, String> {
    use prost::Message;
    let mut options = match base {
        Some(any) if !any.value.is_empty() => {
            if !any.type_url.ends_with(RUNC_OPTIONS_TYPE) {
                return Err(format!(
                    "the container's runtime options are {}, not runc's: only runc containers are restored",
                    any.type_url
                ));
            }
            RuncOptions::decode(any.value.as_slice()).map_err(|e| format!("runc options: {e}"))?
        }
        _ => RuncOptions::default(),
    };
    options.criu_image_path = images.display().to_string();
    options.criu_work_path = work.display().to_string();
    if let Some(criu) = criu {
        options.criu_path = criu.display().to_string();
    }
    Ok(prost_types::Any {
        type_url: RUNC_OPTIONS_TYPE.to_string(),
        value: options.encode_to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_run_returns_what_the_program_printed() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2; exit 3"]);
        let output = run_bounded(command, Path::new("sh"), Duration::from_secs(60)).unwrap();
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");
        assert_eq!(output.status.code(), Some(3));
    }

    #[test]
    fn a_run_past_its_timeout_is_killed_with_what_it_started() {
        let tmp = tempfile::tempdir().unwrap();
        let pid_file = tmp.path().join("grandchild");
        let mut command = Command::new("sh");
        // A grandchild, as CRIU is runc's, that would outlive a plain kill
        // of the child.
        command.arg("-c").arg(format!(
            "sleep 600 & echo $! > {}.new; mv {0}.new {0}; wait",
            pid_file.display()
        ));
        let err = run_bounded(command, Path::new("sh"), Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, CriuError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("did not finish within 2s"), "{err}");
        let grandchild: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        // Killed: gone, or a zombie until init reaps it. SIGKILL is acted on
        // when the process is next scheduled, which on a loaded machine can
        // be after killpg returns, so the state is read until it settles; a
        // grandchild that was never signalled sleeps for 600 s and fails.
        let dead = |state: &str| {
            state.is_empty()
                || state
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        };
        let mut state = String::new();
        for _ in 0..300 {
            state = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            if dead(&state) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(dead(&state), "the grandchild {grandchild} still runs: {state}");
    }

    #[test]
    fn a_missing_program_is_named() {
        let err = run_bounded(
            Command::new("/no/such/runc"),
            Path::new("/no/such/runc"),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot run /no/such/runc"), "{err}");
    }
    use prost::Message;

    #[test]
    fn logs_are_quoted_by_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("restore.log");
        let mut text = String::from("(00.001) Version: 4.1.1\n");
        text.push_str("(00.020) Error (criu/sk-inet.c:912): inet: Can't bind inet socket (id 7): Address in use\n");
        for n in 0..30 {
            text.push_str(&format!("(00.1{n:02}) cleaning up {n}\n"));
        }
        std::fs::write(&log, &text).unwrap();
        assert_eq!(
            log_errors(&log),
            vec!["(00.020) Error (criu/sk-inet.c:912): inet: Can't bind inet socket (id 7): Address in use"]
        );
        let tail = log_tail(&log);
        assert!(
            tail.contains("Address in use") && tail.contains("cleaning up 29"),
            "{tail}"
        );
        assert!(!tail.contains("cleaning up 0\n"), "only the tail: {tail}");
        assert!(log_errors(&dir.path().join("absent.log")).is_empty());
    }

    #[test]
    fn dump_arguments_follow_the_request() {
        let settings = CriuSettings {
            criu: Some("/opt/criu/sbin/criu".into()),
            ..CriuSettings::default()
        };
        let request = DumpRequest {
            namespace: "ns1",
            container: "web",
            images: Path::new("/w/img"),
            work: Path::new("/w/work"),
            parent: Some(Path::new("/w/pre")),
            pre_dump: false,
            leave_running: true,
            tcp_established: true,
            file_locks: false,
        };
        let args: Vec<String> = settings
            .dump_args(&request)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "--root /run/containerd/runc/ns1 --criu /opt/criu/sbin/criu checkpoint --image-path /w/img \
             --work-path /w/work --parent-path /w/pre --leave-running --tcp-established web"
        );
        let pre = DumpRequest {
            pre_dump: true,
            parent: None,
            tcp_established: false,
            file_locks: true,
            ..request
        };
        let args: Vec<String> = CriuSettings::default()
            .dump_args(&pre)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "--root /run/containerd/runc/ns1 checkpoint --image-path /w/img --work-path /w/work --pre-dump --file-locks web"
        );
    }

    fn stats_image(head: &[u32], entry: &StatsEntry) -> Vec<u8> {
        let mut bytes: Vec<u8> = head.iter().flat_map(|m| m.to_le_bytes()).collect();
        let body = entry.encode_to_vec();
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        bytes
    }

    #[test]
    fn stats_images_are_decoded_and_bad_ones_refused() {
        let entry = StatsEntry {
            dump: Some(DumpStatsEntry {
                freezing_time: Some(120),
                frozen_time: Some(4500),
                memdump_time: Some(900),
                memwrite_time: Some(800),
                pages_scanned: Some(30000),
                pages_skipped_parent: Some(25000),
                pages_written: Some(5000),
            }),
        };
        let stats = parse_stats(&stats_image(&[IMG_SERVICE_MAGIC, STATS_MAGIC], &entry)).unwrap();
        assert_eq!(stats.frozen_time_us, 4500);
        assert_eq!(stats.pages_written, 5000);
        assert_eq!(stats.pages_skipped_parent, 25000);
        assert_eq!(parse_stats(&stats_image(&[STATS_MAGIC], &entry)).unwrap(), stats);
        assert!(parse_stats(&stats_image(&[IMG_SERVICE_MAGIC, 7], &entry)).is_err());
        assert!(parse_stats(b"junk").is_err());
        let mut truncated = stats_image(&[IMG_SERVICE_MAGIC, STATS_MAGIC], &entry);
        truncated.truncate(truncated.len() - 3);
        assert!(parse_stats(&truncated).is_err());
        let empty = stats_image(&[IMG_SERVICE_MAGIC, STATS_MAGIC], &StatsEntry { dump: None });
        assert!(parse_stats(&empty).unwrap_err().contains("no dump"));
    }

    #[test]
    fn restore_options_keep_the_containers_runc_options() {
        let base = RuncOptions {
            binary_name: "/usr/bin/runc".into(),
            systemd_cgroup: true,
            ..RuncOptions::default()
        };
        let any = prost_types::Any {
            type_url: RUNC_OPTIONS_TYPE.into(),
            value: base.encode_to_vec(),
        };
        let out = restore_options(Some(&any), Path::new("/r/img"), Path::new("/r/work"), None).unwrap();
        assert_eq!(out.type_url, RUNC_OPTIONS_TYPE);
        let decoded = RuncOptions::decode(out.value.as_slice()).unwrap();
        assert_eq!(decoded.binary_name, "/usr/bin/runc");
        assert!(decoded.systemd_cgroup);
        assert_eq!(decoded.criu_image_path, "/r/img");
        assert_eq!(decoded.criu_work_path, "/r/work");
        let none = restore_options(None, Path::new("/i"), Path::new("/w"), Some(Path::new("/c"))).unwrap();
        assert_eq!(RuncOptions::decode(none.value.as_slice()).unwrap().criu_path, "/c");
        let foreign = prost_types::Any {
            type_url: "io.containerd.runhcs.v1.Options".into(),
            value: vec![1],
        };
        assert!(restore_options(Some(&foreign), Path::new("/i"), Path::new("/w"), None).is_err());
    }
}
