//! Client of containerd's own API: resolves a container, given by id or
//! unique id prefix in a namespace, to what a seamless commit needs (its
//! image, snapshot and running task). Knows nothing of snapshots' storage.

use std::path::Path;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{GetRequest, ListContainersRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use containerd_client::types::v1::Status as TaskStatus;

use crate::error::{Classify, ErrorKind};

const NAMESPACE_HEADER: &str = "containerd-namespace";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("cannot reach containerd at {address}: {message}")]
    Unreachable { address: String, message: String },
    #[error("invalid namespace {namespace:?}: letters, digits and . _ - between them, at most 76 characters")]
    BadNamespace { namespace: String },
    #[error("no container {query:?} in namespace {namespace}")]
    NotFound { namespace: String, query: String },
    #[error("container prefix {query:?} is ambiguous in namespace {namespace}: {matches}")]
    Ambiguous {
        namespace: String,
        query: String,
        matches: String,
    },
    #[error("container {id} in namespace {namespace} has no running task (status {status})")]
    NotRunning {
        namespace: String,
        id: String,
        status: String,
    },
    #[error("containerd {call}: {message}")]
    Call { call: &'static str, message: String },
}

impl Classify for ContainerdError {
    fn kind(&self) -> ErrorKind {
        match self {
            ContainerdError::Unreachable { .. } => ErrorKind::Unavailable,
            ContainerdError::BadNamespace { .. } | ContainerdError::Ambiguous { .. } => ErrorKind::InvalidArgument,
            ContainerdError::NotFound { .. } => ErrorKind::NotFound,
            ContainerdError::NotRunning { .. } => ErrorKind::FailedPrecondition,
            ContainerdError::Call { .. } => ErrorKind::Internal,
        }
    }
}

/// What a seamless commit needs to know of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub namespace: String,
    pub id: String,
    pub image: String,
    pub snapshotter: String,
    /// containerd's key of the container's active snapshot (without the
    /// `<ns>/<n>/` prefix its metadata store adds).
    pub snapshot_key: String,
    /// Pid of the task's init process.
    pub pid: u32,
}

/// containerd's namespace rule; also keeps the value a valid gRPC header.
pub fn validate_namespace(namespace: &str) -> Result<(), ContainerdError> {
    let valid = !namespace.is_empty()
        && namespace.len() <= 76
        && namespace
            .split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()));
    if valid {
        Ok(())
    } else {
        Err(ContainerdError::BadNamespace {
            namespace: namespace.chars().take(80).collect(),
        })
    }
}

/// The container whose id is `query`, or else the one whose id starts with it.
pub fn pick_container<'a>(ids: &[&'a str], namespace: &str, query: &str) -> Result<&'a str, ContainerdError> {
    if let Some(exact) = ids.iter().find(|id| **id == query) {
        return Ok(exact);
    }
    let matches: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !query.is_empty() && id.starts_with(query))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(ContainerdError::NotFound {
            namespace: namespace.to_string(),
            query: query.to_string(),
        }),
        many => Err(ContainerdError::Ambiguous {
            namespace: namespace.to_string(),
            query: query.to_string(),
            matches: many.join(", "),
        }),
    }
}

#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
}

fn namespaced<T>(message: T, namespace: &str) -> Result<Request<T>, ContainerdError> {
    validate_namespace(namespace)?;
    let mut request = Request::new(message);
    let value = namespace.parse().map_err(|_| ContainerdError::BadNamespace {
        namespace: namespace.to_string(),
    })?;
    request.metadata_mut().insert(NAMESPACE_HEADER, value);
    Ok(request)
}

impl Containerd {
    pub async fn connect(address: &Path) -> Result<Containerd, ContainerdError> {
        let channel = containerd_client::connect(address)
            .await
            .map_err(|e| ContainerdError::Unreachable {
                address: address.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Containerd { channel })
    }

    /// Resolves `query` (an id or a unique id prefix) in `namespace` to a
    /// container with a running task.
    pub async fn resolve(&self, namespace: &str, query: &str) -> Result<ContainerInfo, ContainerdError> {
        let listed = ContainersClient::new(self.channel.clone())
            .list(namespaced(ListContainersRequest { filters: vec![] }, namespace)?)
            .await
            .map_err(|s| ContainerdError::Call {
                call: "list containers",
                message: s.message().to_string(),
            })?
            .into_inner()
            .containers;
        let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
        let id = pick_container(&ids, namespace, query)?.to_string();
        let container = listed
            .into_iter()
            .find(|c| c.id == id)
            .expect("picked id comes from the listed containers");
        let task = TasksClient::new(self.channel.clone())
            .get(namespaced(
                GetRequest {
                    container_id: id.clone(),
                    exec_id: String::new(),
                },
                namespace,
            )?)
            .await;
        let process = match task {
            Ok(r) => r.into_inner().process,
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => {
                return Err(ContainerdError::Call {
                    call: "get task",
                    message: s.message().to_string(),
                })
            }
        };
        let (pid, status) = match process {
            Some(p) => (p.pid, TaskStatus::from_i32(p.status).unwrap_or(TaskStatus::Unknown)),
            None => (0, TaskStatus::Unknown),
        };
        if status != TaskStatus::Running || pid == 0 {
            return Err(ContainerdError::NotRunning {
                namespace: namespace.to_string(),
                id,
                status: if pid == 0 {
                    "no task".to_string()
                } else {
                    status.as_str_name().to_lowercase()
                },
            });
        }
        Ok(ContainerInfo {
            namespace: namespace.to_string(),
            id,
            image: container.image,
            snapshotter: container.snapshotter,
            snapshot_key: container.snapshot_key,
            pid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_follow_containerd() {
        for ok in ["default", "k8s.io", "moby", "seamless-test_1"] {
            validate_namespace(ok).unwrap();
        }
        for bad in ["", "-a", "a..b", "a/b", "a b", "é", &"a".repeat(77)] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exact_id_beats_prefix_and_prefix_must_be_unique() {
        let ids = ["web", "web-2", "db-1"];
        assert_eq!(pick_container(&ids, "ns", "web").unwrap(), "web");
        assert_eq!(pick_container(&ids, "ns", "db").unwrap(), "db-1");
        let e = pick_container(&ids, "ns", "we").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("web, web-2"), "{e}");
        assert_eq!(pick_container(&ids, "ns", "x").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(pick_container(&ids, "ns", "").unwrap_err().kind(), ErrorKind::NotFound);
    }
}
