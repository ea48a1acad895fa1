//! The library API for embedding seamless commit in other programs: a typed
//! client of the daemon's Control API. The capture itself must run in the
//! daemon, which owns the writable layers; this module only talks to it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UnixStream};
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::api::grpc::control_convert::commit_to_wire;
use crate::api::remote::{BearerToken, RemoteTarget};
use crate::proto::control_client::ControlClient;
use crate::proto::{CommitJob, GetCommitRequest, SeamlessCommitRequest};

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
    #[error("snapshot {snapshot_id} failed: {error_code}: {error}")]
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

/// How to reach the daemon.
#[derive(Debug, Clone)]
pub struct SeamlessOptions {
    pub address: PathBuf,
    /// containerd namespace of the containers to commit.
    pub namespace: String,
}

impl Default for SeamlessOptions {
    fn default() -> Self {
        SeamlessOptions {
            address: DEFAULT_ADDRESS.into(),
            namespace: "default".into(),
        }
    }
}

/// What to commit and how: the commit's own request model, with its
/// defaults ([`CommitOptions::new`]). Its `namespace` is the client's
/// ([`SeamlessOptions::namespace`]), whatever the options say.
pub use crate::commit::{CommitOptions, Format};

/// A started commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotResult {
    pub snapshot_id: String,
    /// From the freeze request to the completed thaw.
    pub pause_time: Duration,
    /// From the request to the answer (or, with `commit_with_wait`, to the
    /// end of the background job).
    pub total_time: Duration,
    pub old_upper_dir: PathBuf,
    pub new_upper_dir: PathBuf,
}

/// A connected client.
#[derive(Debug, Clone)]
pub struct SeamlessSnapshot {
    control: ControlClient<Channel>,
    namespace: String,
}

impl SeamlessSnapshot {
    pub async fn new(options: SeamlessOptions) -> Result<SeamlessSnapshot, ClientError> {
        Ok(SeamlessSnapshot {
            control: ControlClient::new(connect(&options.address).await?),
            namespace: options.namespace,
        })
    }

    /// Captures the container and returns once its background job started.
    pub async fn commit(&self, options: &CommitOptions) -> Result<SnapshotResult, ClientError> {
        let start = Instant::now();
        let r = self
            .control
            .clone()
            .seamless_commit(SeamlessCommitRequest {
                namespace: self.namespace.clone(),
                ..commit_to_wire(options)
            })
            .await?
            .into_inner();
        Ok(SnapshotResult {
            snapshot_id: r.snapshot_id,
            pause_time: Duration::from_nanos(r.pause_time_ns),
            total_time: start.elapsed(),
            old_upper_dir: r.old_upper_dir.into(),
            new_upper_dir: r.new_upper_dir.into(),
        })
    }

    /// Commits and waits until the image is pushed (or the job failed, or
    /// `timeout` passed).
    pub async fn commit_with_wait(
        &self,
        options: &CommitOptions,
        timeout: Duration,
    ) -> Result<SnapshotResult, ClientError> {
        let start = Instant::now();
        let mut result = self.commit(options).await?;
        loop {
            let job = self.get_status(&result.snapshot_id).await?;
            match job.state.as_str() {
                "completed" => {
                    result.total_time = start.elapsed();
                    return Ok(result);
                }
                "failed" => {
                    return Err(ClientError::JobFailed {
                        snapshot_id: job.snapshot_id,
                        error_code: job.error_code,
                        error: job.error,
                    })
                }
                state if start.elapsed() >= timeout => {
                    return Err(ClientError::Timeout {
                        snapshot_id: result.snapshot_id,
                        timeout,
                        state: state.to_string(),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The job of `snapshot_id`: state, progress, times, error.
    pub async fn get_status(&self, snapshot_id: &str) -> Result<CommitJob, ClientError> {
        Ok(self
            .control
            .clone()
            .get_commit(GetCommitRequest {
                snapshot_id: snapshot_id.to_string(),
            })
            .await?
            .into_inner())
    }
}
