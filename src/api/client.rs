//! The library API for embedding seamless commit in other programs: a typed
//! client of the daemon's Control API, shaped as the seamless-commit
//! reference's Go API (`SeamlessSnapshot::new(options)`, `commit`,
//! `commit_with_wait`, `get_status`; `CommitOptions`, `SnapshotResult`,
//! `SnapshotStatus` with its JSON tags). The capture itself must run in the
//! daemon, which owns the writable layers; this module only talks to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpStream, UnixStream};
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::api::grpc::control_convert::commit_to_wire;
use crate::api::remote::{BearerToken, RemoteTarget};
use crate::proto::control_client::ControlClient;
use crate::proto::{CommitJob, GetCommitRequest};

/// A Control client of a daemon here (unix socket, no token) or on another
/// host (TLS, with its token on every call).
pub type DaemonClient = ControlClient<InterceptedService<Channel, BearerToken>>;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_ADDRESS: &str = "/run/containerd-seamless/containerd-seamless-grpc.sock";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {address}: {message}")]
    Unreachable { address: String, message: String },
    /// The daemon's answer; `message` starts with the commit error code.
    #[error("{message}")]
    Daemon { code: tonic::Code, message: String },
    #[error("invalid commit options: {message}")]
    InvalidOptions { message: String },
    #[error("background commit processing failed: {error} (snapshot {snapshot_id}, {error_code})")]
    JobFailed {
        snapshot_id: String,
        error_code: String,
        error: String,
    },
    #[error("snapshot {snapshot_id} did not finish within {timeout:?} (state {state})")]
    Timeout {
        snapshot_id: String,
        timeout: Duration,
        state: String,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Daemon {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// A daemon that accepts but never answers must not hang its client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the daemon's socket now, so a missing socket or a refused
/// connection is reported here, naming the socket and the reason.
pub async fn connect(socket: &Path) -> Result<Channel, ClientError> {
    let unreachable = |message: String| ClientError::Unreachable {
        address: socket.display().to_string(),
        message,
    };
    // tonic needs a URI; the connector below ignores it.
    let endpoint = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT);
    let path = socket.to_path_buf();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| UnixStream::connect(path.clone())))
        .await
        .map_err(|e| unreachable(root_cause(&e)))
}

/// Connects to the daemon of another host over TLS now, so a refused
/// connection, a certificate that does not check out or a missing token file
/// is reported here, naming the address and the reason.
pub async fn connect_remote(target: &RemoteTarget) -> Result<DaemonClient, ClientError> {
    let unreachable = |message: String| ClientError::Unreachable {
        address: target.address.clone(),
        message,
    };
    let remote = target.connector().map_err(|e| unreachable(e.to_string()))?;
    let authority = if remote.host.contains(':') {
        format!("[{}]:{}", remote.host, remote.port)
    } else {
        format!("{}:{}", remote.host, remote.port)
    };
    // The connector does TLS itself; tonic only needs the authority.
    let endpoint = Endpoint::try_from(format!("http://{authority}"))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT);
    let (connector, server_name) = (remote.connector, remote.server_name);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, server_name, authority) = (connector.clone(), server_name.clone(), authority.clone());
            async move {
                let tcp = TcpStream::connect(authority.as_str()).await?;
                tcp.set_nodelay(true)?;
                connector.connect(server_name, tcp).await
            }
        }))
        .await
        .map_err(|e| unreachable(root_cause(&e)))?;
    Ok(ControlClient::with_interceptor(channel, remote.token))
}

/// A client of the local daemon's channel, with no token.
pub fn local_client(channel: Channel) -> DaemonClient {
    ControlClient::with_interceptor(channel, BearerToken::none())
}

/// tonic's transport error says only "transport error"; the reason (no such
/// file, connection refused, timed out) is at the bottom of the chain.
fn root_cause(err: &tonic::transport::Error) -> String {
    let mut cause: &dyn std::error::Error = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// What a [`SeamlessSnapshot`] commits and how, as the seamless-commit
/// reference's Go `CommitOptions` has it (same fields, same JSON tags, same
/// defaults), plus where the daemon is and which namespace, format and
/// credentials to use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CommitOptions {
    /// Unused by [`SeamlessSnapshot::commit`], which names its container;
    /// kept for the reference's shape.
    pub container_id: String,
    /// Where the daemon's background job builds: a directory only root may
    /// write, or a root-owned sticky one such as /tmp (the job then works
    /// in a private directory made inside it).
    pub work_dir: PathBuf,
    /// Nydus filesystem version, "5" or "6".
    pub fs_version: String,
    /// "none", "lz4_block" or "zstd".
    pub compressor: String,
    pub target_insecure: bool,
    pub source_insecure: bool,
    pub with_paths: Vec<PathBuf>,
    pub without_paths: Vec<PathBuf>,
    /// Most commit layers in a container's chain before older ones merge.
    pub maximum_times: u32,
    /// How many of this client's commits may be under way at once (each
    /// [`SeamlessSnapshot::commit_with_wait`] holds one of them until its
    /// job ends); the daemon's `[commit] background_workers` bounds all
    /// clients together.
    pub background_workers: u32,
    // Ours.
    /// The daemon's socket.
    #[serde(skip)]
    pub address: PathBuf,
    /// containerd namespace of the containers.
    pub namespace: String,
    /// Image format: Nydus (the reference's) or OCI.
    pub format: Format,
    /// Credentials for the target's registry, for this client's commits;
    /// never serialised.
    #[serde(skip)]
    pub target_creds: Option<crate::oci::credentials::RegistryCredentials>,
    /// The same for the source image's registry.
    #[serde(skip)]
    pub source_creds: Option<crate::oci::credentials::RegistryCredentials>,
}

impl Default for CommitOptions {
    /// The reference's `DefaultCommitOptions`: work_dir /tmp, fs_version
    /// "6", lz4_block, maximum_times 10, background_workers 4; the daemon
    /// at its default socket, namespace `default`, Nydus.
    fn default() -> CommitOptions {
        let ours = crate::commit::CommitOptions::default();
        CommitOptions {
            container_id: String::new(),
            work_dir: PathBuf::from("/tmp"),
            fs_version: ours.fs_version.to_string(),
            compressor: ours.compressor,
            target_insecure: false,
            source_insecure: false,
            with_paths: Vec::new(),
            without_paths: Vec::new(),
            maximum_times: ours.maximum_times,
            background_workers: 4,
            address: DEFAULT_ADDRESS.into(),
            namespace: ours.namespace,
            format: ours.format,
            target_creds: None,
            source_creds: None,
        }
    }
}

pub use crate::commit::Format;

impl CommitOptions {
    /// The daemon's request for `container` to `target`.
    fn request(&self, container: &str, target: &str) -> Result<crate::commit::CommitOptions, ClientError> {
        let fs_version = self.fs_version.parse().map_err(|_| ClientError::InvalidOptions {
            message: format!("fs_version {:?} is not 5 or 6", self.fs_version),
        })?;
        Ok(crate::commit::CommitOptions {
            namespace: self.namespace.clone(),
            container: container.to_string(),
            target: target.to_string(),
            format: self.format,
            work_dir: self.work_dir.clone(),
            fs_version,
            compressor: self.compressor.clone(),
            target_insecure: self.target_insecure,
            source_insecure: self.source_insecure,
            with_paths: self.with_paths.clone(),
            without_paths: self.without_paths.clone(),
            maximum_times: self.maximum_times,
            target_creds: self.target_creds.clone(),
            source_creds: self.source_creds.clone(),
        })
    }
}

/// A started commit, as the reference's `SnapshotResult` (durations in
/// JSON as Go writes them: "8.72416ms"; integer nanoseconds are read too).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotResult {
    pub snapshot_id: String,
    /// From the freeze request to the completed thaw.
    #[serde(with = "go_duration_serde")]
    pub pause_time: Duration,
    /// From the request to the answer (or, with `commit_with_wait`, to the
    /// end of the background job).
    #[serde(with = "go_duration_serde")]
    pub total_time: Duration,
    pub old_upper_dir: PathBuf,
    pub new_upper_dir: PathBuf,
}

/// A job's state, as the reference's `SnapshotState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Pending,
    Processing,
    Completed,
    Failed,
}

/// A job, as the reference's `SnapshotStatus`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotStatus {
    pub snapshot_id: String,
    pub state: SnapshotState,
    /// 0.0 to 1.0.
    pub progress: f64,
    /// The failure, when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(with = "rfc3339_serde")]
    pub start_time: SystemTime,
    /// None while the job runs.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_option_serde")]
    pub end_time: Option<SystemTime>,
    // Ours.
    /// The failure's commit error code, when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// What the job is doing now, for people.
    #[serde(default)]
    pub stage: String,
    /// The pushed manifest's digest, when completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// "full", "incremental" or "merged"; empty until decided.
    #[serde(default)]
    pub layer_plan: String,
    /// Commit layers above the source image's own in the pushed image.
    #[serde(default)]
    pub commit_layers: u32,
}

impl SnapshotStatus {
    fn of(job: CommitJob) -> Result<SnapshotStatus, ClientError> {
        let state = match job.state.as_str() {
            "pending" => SnapshotState::Pending,
            "processing" => SnapshotState::Processing,
            "completed" => SnapshotState::Completed,
            "failed" => SnapshotState::Failed,
            other => {
                return Err(ClientError::Daemon {
                    code: tonic::Code::Internal,
                    message: format!("the daemon answered job state {other:?}"),
                })
            }
        };
        let at = |ms: i64| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
        Ok(SnapshotStatus {
            snapshot_id: job.snapshot_id,
            state,
            progress: job.progress,
            error: (!job.error.is_empty()).then_some(job.error),
            start_time: at(job.started_unix_ms),
            end_time: (job.ended_unix_ms > 0).then(|| at(job.ended_unix_ms)),
            error_code: (!job.error_code.is_empty()).then_some(job.error_code),
            stage: job.stage,
            manifest_digest: (!job.manifest_digest.is_empty()).then_some(job.manifest_digest),
            layer_plan: job.layer_plan,
            commit_layers: job.commit_layers,
        })
    }
}

mod go_duration_serde {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::time::go_duration(*d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Given {
            Nanos(u64),
            Text(String),
        }
        match <Given as serde::Deserialize>::deserialize(d)? {
            Given::Nanos(n) => Ok(Duration::from_nanos(n)),
            Given::Text(t) => crate::time::parse_go_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

mod rfc3339_serde {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::time::rfc3339(*t))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

mod rfc3339_option_serde {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::rfc3339_serde::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        let text = <Option<String> as serde::Deserialize>::deserialize(d)?;
        text.map(|t| humantime::parse_rfc3339_weak(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A client of the daemon, as the reference's Go `SeamlessSnapshot`.
#[derive(Debug, Clone)]
pub struct SeamlessSnapshot {
    control: ControlClient<Channel>,
    options: CommitOptions,
    /// [`CommitOptions::background_workers`] of this client.
    workers: Arc<tokio::sync::Semaphore>,
}

impl SeamlessSnapshot {
    /// Connects to the daemon at `options.address`; every commit of this
    /// client uses `options`.
    pub async fn new(options: CommitOptions) -> Result<SeamlessSnapshot, ClientError> {
        if options.background_workers == 0 {
            return Err(ClientError::InvalidOptions {
                message: "background_workers must be at least 1".into(),
            });
        }
        Ok(SeamlessSnapshot {
            control: ControlClient::new(connect(&options.address).await?),
            workers: Arc::new(tokio::sync::Semaphore::new(options.background_workers as usize)),
            options,
        })
    }

    /// Captures `container_id` (an id, a name, or a unique prefix of
    /// either) and returns once its background job, which builds and pushes
    /// `target_ref`, has started.
    pub async fn commit(&self, container_id: &str, target_ref: &str) -> Result<SnapshotResult, ClientError> {
        let _worker = self.worker().await?;
        self.start(container_id, target_ref).await
    }

    async fn worker(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ClientError> {
        // Never closed: acquiring only waits.
        self.workers
            .acquire()
            .await
            .map_err(|e| ClientError::InvalidOptions { message: e.to_string() })
    }

    async fn start(&self, container_id: &str, target_ref: &str) -> Result<SnapshotResult, ClientError> {
        let start = Instant::now();
        let request = commit_to_wire(&self.options.request(container_id, target_ref)?);
        let r = self.control.clone().seamless_commit(request).await?.into_inner();
        Ok(SnapshotResult {
            snapshot_id: r.snapshot_id,
            pause_time: Duration::from_nanos(r.pause_time_ns),
            total_time: start.elapsed(),
            old_upper_dir: r.old_upper_dir.into(),
            new_upper_dir: r.new_upper_dir.into(),
        })
    }

    /// [`SeamlessSnapshot::commit`], then waits until the image is pushed;
    /// a failed job or `timeout` passing is an error.
    pub async fn commit_with_wait(
        &self,
        container_id: &str,
        target_ref: &str,
        timeout: Duration,
    ) -> Result<SnapshotResult, ClientError> {
        let _worker = self.worker().await?;
        let start = Instant::now();
        let mut result = self.start(container_id, target_ref).await?;
        loop {
            let status = self.get_status(&result.snapshot_id).await?;
            match status.state {
                SnapshotState::Completed => {
                    result.total_time = start.elapsed();
                    return Ok(result);
                }
                SnapshotState::Failed => {
                    return Err(ClientError::JobFailed {
                        snapshot_id: status.snapshot_id,
                        error_code: status.error_code.unwrap_or_default(),
                        error: status.error.unwrap_or_default(),
                    })
                }
                state if start.elapsed() >= timeout => {
                    return Err(ClientError::Timeout {
                        snapshot_id: result.snapshot_id,
                        timeout,
                        state: format!("{state:?}").to_lowercase(),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The job of `snapshot_id`: state, progress, times, error.
    pub async fn get_status(&self, snapshot_id: &str) -> Result<SnapshotStatus, ClientError> {
        let job = self
            .control
            .clone()
            .get_commit(GetCommitRequest {
                snapshot_id: snapshot_id.to_string(),
            })
            .await?
            .into_inner();
        SnapshotStatus::of(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_references() {
        let o = CommitOptions::default();
        assert_eq!(o.work_dir, PathBuf::from("/tmp"));
        assert_eq!((o.fs_version.as_str(), o.compressor.as_str()), ("6", "lz4_block"));
        assert_eq!((o.maximum_times, o.background_workers), (10, 4));
        let json = serde_json::to_value(&o).unwrap();
        for tag in [
            "container_id",
            "work_dir",
            "fs_version",
            "compressor",
            "target_insecure",
            "source_insecure",
            "with_paths",
            "without_paths",
            "maximum_times",
            "background_workers",
        ] {
            assert!(json.get(tag).is_some(), "{tag} in {json}");
        }
        let request = o.request("web", "r/app:1").unwrap();
        assert_eq!((request.fs_version, request.container.as_str()), (6, "web"));
        let bad = CommitOptions {
            fs_version: "six".into(),
            ..CommitOptions::default()
        };
        assert!(bad.request("web", "r/app:1").unwrap_err().to_string().contains("six"));
    }

    #[test]
    fn results_and_statuses_have_the_references_json() {
        let result = SnapshotResult {
            snapshot_id: "snapshot-1752857512540089368".into(),
            pause_time: Duration::from_nanos(8_724_160),
            total_time: Duration::from_nanos(22_802_283),
            old_upper_dir: "/a/fs".into(),
            new_upper_dir: "/b/fs".into(),
        };
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["pause_time"], "8.72416ms");
        assert_eq!(json["total_time"], "22.802283ms");
        assert_eq!(serde_json::from_value::<SnapshotResult>(json).unwrap(), result);
        let from_go: SnapshotResult = serde_json::from_str(
            r#"{"snapshot_id":"s","pause_time":8724160,"total_time":22802283,"old_upper_dir":"/a","new_upper_dir":"/b"}"#,
        )
        .unwrap();
        assert_eq!(from_go.pause_time, result.pause_time, "Go's own JSON: nanoseconds");

        let status: SnapshotStatus = serde_json::from_str(
            r#"{"snapshot_id":"s","state":"processing","progress":0.75,"start_time":"2025-07-18T16:51:52Z","end_time":null}"#,
        )
        .unwrap();
        assert_eq!(
            (status.state, status.end_time, status.error.clone()),
            (SnapshotState::Processing, None, None)
        );
        let back = serde_json::to_value(&status).unwrap();
        assert_eq!(back["start_time"], "2025-07-18T16:51:52Z");
        assert!(back.get("error").is_none(), "omitted when none: {back}");
    }
}
