//! Docker Engine containers checkpointed with their processes and their
//! writable layer, into a directory of the Docker checkpoint reference's
//! layout (`<dir>/<container>/<name>/`), and restored from one under a new
//! name through the engine, then verified.
//!
//! The dump does not go through the engine's checkpoint API, which carries
//! neither CRIU's TCP nor its file-lock options and keeps no files: the
//! container is frozen, its overlay2 upper directory copied, and runc (the
//! one the engine's shim uses, at the engine's runc root) dumps the frozen
//! processes with the options asked for. The restore goes through the
//! engine (`start` from a checkpoint placed in the new container's own
//! checkpoint directory), so that the engine manages the restored container
//! as any other.
//!
//! Owns: finding a running container's pid, freezer, runc state and upper
//! directory ([`RunningContainer`]); the layout ([`layout`]); the record of
//! the container a restore recreates ([`record`]); [`dump`], [`restore`]
//! and [`verify`]. Knows nothing of the catalogue: that is `checkpoint`'s.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Classify, ErrorKind, IoError};
use crate::host::docker::{DockerClient, DockerError};

pub mod criu_config;
pub mod dump;
pub mod layout;
pub mod record;
pub mod restore;
pub mod verify;

pub use dump::{checkpoint, CheckpointOptions, CheckpointReport};
pub use restore::{restore, RestoreOptions, RestoreReport};
pub use verify::{verify, Check, Verification};

/// The containerd namespace of the engine's containers, when the shim does
/// not say.
const ENGINE_NAMESPACE: &str = "moby";
/// Where containerd's runc shims keep runc's state when their options name
/// no root.
const SHIM_DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";

#[derive(Debug, thiserror::Error)]
pub enum DockerCheckpointError {
    #[error(transparent)]
    Engine(#[from] DockerError),
    #[error("container {container} is not running (its state is {state:?})")]
    NotRunning { container: String, state: String },
    #[error("container {container}: {reason}")]
    Unsupported { container: String, reason: String },
    #[error("container {container}: cannot find what the engine runs it with: {reason}")]
    Runtime { container: String, reason: String },
    #[error("checkpoint directory {path}: {reason}")]
    Layout { path: String, reason: String },
    #[error("checkpoint {name} of {container} already exists at {path}: remove it or choose another -name")]
    Exists {
        container: String,
        name: String,
        path: String,
    },
    #[error("no checkpoint {name} of {container} at {path}")]
    NoCheckpoint {
        container: String,
        name: String,
        path: String,
    },
    #[error("checkpoint at {path} is damaged: {reason}")]
    Damaged { path: String, reason: String },
    #[error("container record {path}: {reason}")]
    Record { path: String, reason: String },
    #[error("Docker's engine does not run in experimental mode, which restoring from a checkpoint needs: set \"experimental\": true in /etc/docker/daemon.json and restart dockerd")]
    NotExperimental,
    #[error("a container named {0} already exists: choose another -new-name or remove it")]
    NameTaken(String),
    #[error("{0}")]
    PreDump(String),
    #[error("{0}")]
    CriuConfig(String),
    #[error("{action} failed: {message}")]
    Criu { action: &'static str, message: String },
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    #[error(transparent)]
    Cgroup(#[from] crate::host::cgroup::CgroupError),
    #[error("copying {what}: {message}")]
    Copy { what: String, message: String },
    #[error(transparent)]
    Io(#[from] IoError),
}

impl Classify for DockerCheckpointError {
    fn kind(&self) -> ErrorKind {
        use DockerCheckpointError as E;
        match self {
            E::Engine(DockerError::NoSuchContainer(_)) | E::NoCheckpoint { .. } => ErrorKind::NotFound,
            E::Engine(DockerError::Connect { .. } | DockerError::Transport { .. }) => ErrorKind::Unavailable,
            E::Engine(DockerError::Host(_)) => ErrorKind::InvalidArgument,
            E::Exists { .. } | E::NameTaken(_) => ErrorKind::AlreadyExists,
            E::NotRunning { .. } | E::NotExperimental | E::PreDump(_) | E::CriuConfig(_) | E::Unsupported { .. } => {
                ErrorKind::FailedPrecondition
            }
            E::Layout { .. } | E::Damaged { .. } | E::Record { .. } => ErrorKind::InvalidArgument,
            _ => ErrorKind::Internal,
        }
    }
}

/// A running container as the engine and the host see it.
#[derive(Debug, Clone)]
pub struct RunningContainer {
    pub id: String,
    /// Without the engine's leading `/`.
    pub name: String,
    pub pid: u32,
    /// The engine's whole `inspect` answer (stored as `container.json`).
    pub inspect: Value,
    /// overlay2's upper directory of the container's layer.
    pub upper: PathBuf,
    /// runc's state root of the engine's shims (runc's `--root` is
    /// `<runc_root>/<runc_namespace>`).
    pub runc_root: PathBuf,
    pub runc_namespace: String,
    pub runc: PathBuf,
}

impl RunningContainer {
    /// The running container `name` (a name, an id or a unique id prefix).
    pub async fn find(engine: &DockerClient, name: &str) -> Result<RunningContainer, DockerCheckpointError> {
        let inspect = engine.inspect(name).await?;
        let field = |path: &[&str]| path.iter().try_fold(&inspect, |v, key| v.get(key));
        let id = field(&["Id"]).and_then(Value::as_str).unwrap_or_default().to_string();
        if !is_container_id(&id) {
            return Err(DockerCheckpointError::Runtime {
                container: name.into(),
                reason: format!("the engine gave the id {id:?}"),
            });
        }
        let running = field(&["State", "Running"]).and_then(Value::as_bool) == Some(true);
        let paused = field(&["State", "Paused"]).and_then(Value::as_bool) == Some(true);
        if !running || paused {
            let state = field(&["State", "Status"]).and_then(Value::as_str).unwrap_or("unknown");
            return Err(DockerCheckpointError::NotRunning {
                container: name.into(),
                state: state.into(),
            });
        }
        let pid = field(&["State", "Pid"])
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 1)
            .ok_or_else(|| DockerCheckpointError::Runtime {
                container: name.into(),
                reason: "the engine gave no process id".into(),
            })?;
        let driver = field(&["GraphDriver", "Name"])
            .and_then(Value::as_str)
            .unwrap_or_default();
        if driver != "overlay2" {
            return Err(DockerCheckpointError::Unsupported {
                container: name.into(),
                reason: format!(
                    "its storage driver is {driver:?}: only overlay2's upper directory can be checkpointed"
                ),
            });
        }
        let upper = field(&["GraphDriver", "Data", "UpperDir"])
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute() && p.file_name() == Some("diff".as_ref()))
            .ok_or_else(|| DockerCheckpointError::Runtime {
                container: name.into(),
                reason: "no overlay2 UpperDir ending in /diff".into(),
            })?;
        let (runc_root, runc_namespace, runc) = runc_of(pid, &id).map_err(|reason| DockerCheckpointError::Runtime {
            container: name.into(),
            reason,
        })?;
        let display_name = field(&["Name"])
            .and_then(Value::as_str)
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.clone());
        Ok(RunningContainer {
            id,
            name: display_name,
            pid,
            inspect,
            upper,
            runc_root,
            runc_namespace,
            runc,
        })
    }

    /// Whether the container was created with a terminal (its logs are then
    /// one stream, not multiplexed).
    pub fn tty(&self) -> bool {
        tty_of(&self.inspect)
    }
}

/// The image an inspect answer says the container was created from (as
/// named then), or empty.
pub fn image_of(inspect: &Value) -> String {
    inspect
        .get("Config")
        .and_then(|c| c.get("Image"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn tty_of(inspect: &Value) -> bool {
    inspect
        .get("Config")
        .and_then(|c| c.get("Tty"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// A full container id: 64 lowercase hex digits.
pub fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// runc's state root, namespace and binary for the container
/// whose init process is `pid`: its parent is containerd's runc shim, whose
/// working directory is the bundle, whose `options.json` names them.
fn runc_of(pid: u32, id: &str) -> Result<(PathBuf, String, PathBuf), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let shim = parent_pid(&stat).ok_or_else(|| format!("cannot read the parent of {pid}"))?;
    let cmdline = std::fs::read(format!("/proc/{shim}/cmdline")).map_err(|e| format!("/proc/{shim}/cmdline: {e}"))?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let flag = |name: &str| {
        args.windows(2)
            .find(|w| w[0] == name || w[0] == format!("-{name}"))
            .map(|w| w[1].clone())
    };
    if flag("-id").as_deref() != Some(id) {
        return Err(format!("process {shim}, the parent of {pid}, is not the shim of {id}"));
    }
    let namespace = flag("-namespace").unwrap_or_else(|| ENGINE_NAMESPACE.to_string());
    if namespace.is_empty() || namespace.contains('/') || namespace.starts_with('.') {
        return Err(format!("the shim names the namespace {namespace:?}"));
    }
    let bundle = std::fs::read_link(format!("/proc/{shim}/cwd")).map_err(|e| format!("/proc/{shim}/cwd: {e}"))?;
    let (root, binary) = shim_options(&bundle.join("options.json"))?;
    let root = root.unwrap_or_else(|| PathBuf::from(SHIM_DEFAULT_RUNC_ROOT));
    let state = root.join(&namespace).join(id).join("state.json");
    if !state.is_file() {
        return Err(format!("runc has no state for it at {}", state.display()));
    }
    Ok((root, namespace, binary.unwrap_or_else(|| PathBuf::from("runc"))))
}

/// The runc root and binary a shim's `options.json` names (either may be
/// absent; a missing file names neither).
fn shim_options(path: &Path) -> Result<(Option<PathBuf>, Option<PathBuf>), String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, None)),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let options: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let text_of = |key: &str| {
        options
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    let root = text_of("root");
    if root.as_ref().is_some_and(|r| !r.is_absolute()) {
        return Err(format!("{} names a relative runc root", path.display()));
    }
    Ok((root, text_of("binary_name")))
}

/// The parent pid in a `/proc/<pid>/stat` line (after the command name,
/// which may hold spaces and parentheses).
pub(crate) fn parent_pid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_pid_is_read_past_any_command_name() {
        assert_eq!(parent_pid("42 (sh) S 7 42 42 0"), Some(7));
        assert_eq!(parent_pid("42 (a) b) (c) R 9 1"), Some(9));
        assert_eq!(parent_pid("garbage"), None);
    }

    #[test]
    fn container_ids_are_64_hex_digits() {
        assert!(is_container_id(&"a1".repeat(32)));
        assert!(!is_container_id("a1b2"));
        assert!(!is_container_id(&"A1".repeat(32)));
        assert!(!is_container_id(&format!("../{}", "a".repeat(61))));
    }

    #[test]
    fn shim_options_name_the_runc_root_and_binary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("options.json");
        assert_eq!(shim_options(&path).unwrap(), (None, None));
        std::fs::write(&path, r#"{"binary_name":"runc","root":"/run/docker/runtime-runc"}"#).unwrap();
        assert_eq!(
            shim_options(&path).unwrap(),
            (Some("/run/docker/runtime-runc".into()), Some("runc".into()))
        );
        std::fs::write(&path, r#"{"root":"relative"}"#).unwrap();
        assert!(shim_options(&path).is_err());
        std::fs::write(&path, "not json").unwrap();
        assert!(shim_options(&path).is_err());
    }
}
