//! Client of containerd's own API: resolves a container, given by id or
//! unique id prefix in a namespace, to what a seamless commit needs (its
//! image, snapshot and running task), and reads its images store and
//! content store (an image's target descriptor, blobs as byte streams).
//! Knows nothing of snapshots' storage, nor of what a blob holds.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, DeleteImageRequest, Image, Info as ContentInfo, UpdateImageRequest,
    UpdateRequest as ContentUpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, GetContainerRequest, GetImageRequest, GetRequest,
    InfoRequest, KillRequest, ListContainersRequest, ListNamespacesRequest, ListRequest as ListLeasesRequest,
    MetricsRequest, PauseTaskRequest, ReadContentRequest, ReadContentResponse, ResumeTaskRequest, StartRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status, Streaming};
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::types::{Descriptor, Mount};

use crate::error::{Classify, ErrorKind};
use crate::namespace::InvalidNamespace;

const NAMESPACE_HEADER: &str = "containerd-namespace";
const LEASE_HEADER: &str = "containerd-lease";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("cannot reach containerd at {address}: {message}")]
    Unreachable { address: String, message: String },
    #[error(transparent)]
    BadNamespace(#[from] InvalidNamespace),
    #[error("no container {query:?} in namespace {namespace}")]
    NotFound { namespace: String, query: String },
    #[error("container name or prefix {query:?} is ambiguous in namespace {namespace}: {matches}")]
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
    #[error("containerd {call}: {message}")]
    Exists { call: &'static str, message: String },
    #[error("containerd {call}: {message}")]
    Missing { call: &'static str, message: String },
}

/// Maps a containerd status, keeping "not found" and "already exists"
/// apart from other failures.
fn call_error(call: &'static str) -> impl FnOnce(Status) -> ContainerdError {
    move |s| {
        let message = s.message().to_string();
        match s.code() {
            Code::NotFound => ContainerdError::Missing { call, message },
            Code::AlreadyExists => ContainerdError::Exists { call, message },
            _ => ContainerdError::Call { call, message },
        }
    }
}

impl Classify for ContainerdError {
    fn kind(&self) -> ErrorKind {
        match self {
            ContainerdError::Unreachable { .. } => ErrorKind::Unavailable,
            ContainerdError::BadNamespace { .. } | ContainerdError::Ambiguous { .. } => ErrorKind::InvalidArgument,
            ContainerdError::NotFound { .. } => ErrorKind::NotFound,
            ContainerdError::NotRunning { .. } => ErrorKind::FailedPrecondition,
            ContainerdError::Call { .. } => ErrorKind::Internal,
            ContainerdError::Exists { .. } => ErrorKind::AlreadyExists,
            ContainerdError::Missing { .. } => ErrorKind::NotFound,
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

/// containerd's namespace rule ([`crate::namespace`]); also keeps the
/// value a valid gRPC header.
pub fn validate_namespace(namespace: &str) -> Result<(), ContainerdError> {
    Ok(crate::namespace::validate_namespace(namespace)?)
}

/// The label nerdctl gives a container's name.
pub const NERDCTL_NAME_LABEL: &str = "nerdctl/name";
/// The labels the CRI plugin gives a Kubernetes container: its name, its
/// pod's name and the pod's namespace.
pub const CRI_CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";
pub const CRI_POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const CRI_POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// The names a container is known by, from its labels: nerdctl's name, and
/// for a Kubernetes container its name alone, `<pod>/<name>` and
/// `<pod namespace>/<pod>/<name>`.
pub fn container_names(labels: &HashMap<String, String>) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(name) = labels.get(NERDCTL_NAME_LABEL).filter(|n| !n.is_empty()) {
        names.push(name.clone());
    }
    if let Some(name) = labels.get(CRI_CONTAINER_NAME_LABEL).filter(|n| !n.is_empty()) {
        names.push(name.clone());
        if let Some(pod) = labels.get(CRI_POD_NAME_LABEL).filter(|p| !p.is_empty()) {
            names.push(format!("{pod}/{name}"));
            if let Some(pod_ns) = labels.get(CRI_POD_NAMESPACE_LABEL).filter(|n| !n.is_empty()) {
                names.push(format!("{pod_ns}/{pod}/{name}"));
            }
        }
    }
    names
}

/// A container as a query may name it: its id and its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named<'a> {
    pub id: &'a str,
    pub names: Vec<String>,
}

/// The id of the container `query` names: the one whose id it is, else the
/// one whose name it is, else the one whose id or a name starts with it. A
/// name or prefix that fits more than one container is refused, listing
/// them.
pub fn pick_container<'a>(containers: &[Named<'a>], namespace: &str, query: &str) -> Result<&'a str, ContainerdError> {
    if let Some(exact) = containers.iter().find(|c| c.id == query) {
        return Ok(exact.id);
    }
    let unique = |matches: Vec<&Named<'a>>| match matches.as_slice() {
        [one] => Ok(Some(one.id)),
        [] => Ok(None),
        many => Err(ContainerdError::Ambiguous {
            namespace: namespace.to_string(),
            query: query.to_string(),
            matches: many.iter().map(|c| c.id).collect::<Vec<_>>().join(", "),
        }),
    };
    let by_name = containers
        .iter()
        .filter(|c| c.names.iter().any(|n| n == query))
        .collect();
    if let Some(id) = unique(by_name)? {
        return Ok(id);
    }
    let by_prefix = containers
        .iter()
        .filter(|c| !query.is_empty() && (c.id.starts_with(query) || c.names.iter().any(|n| n.starts_with(query))))
        .collect();
    unique(by_prefix)?.ok_or_else(|| ContainerdError::NotFound {
        namespace: namespace.to_string(),
        query: query.to_string(),
    })
}

#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
}

/// The label of the leases restores take; its value names the daemon's run.
pub const RESTORE_LEASE_LABEL: &str = "io.seamless.restore";

/// This run of the daemon: its pid and when it first asked.
fn this_run() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("{}-{started}", std::process::id())
    })
}

/// `request` made under lease `lease`: what it creates is kept from
/// containerd's garbage collection while the lease lives.
fn leased<T>(call: &'static str, mut request: Request<T>, lease: &str) -> Result<Request<T>, ContainerdError> {
    let value = lease.parse().map_err(|_| ContainerdError::Call {
        call,
        message: format!("lease id {lease:?} is not a valid header"),
    })?;
    request.metadata_mut().insert(LEASE_HEADER, value);
    Ok(request)
}

fn namespaced<T>(message: T, namespace: &str) -> Result<Request<T>, ContainerdError> {
    validate_namespace(namespace)?;
    let mut request = Request::new(message);
    let value = namespace
        .parse()
        .map_err(|_| ContainerdError::BadNamespace(InvalidNamespace::new(namespace)))?;
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

    /// Resolves `query` (an id, a name, or a unique prefix of either; see
    /// [`pick_container`]) in `namespace` to a container with a running
    /// task.
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
        let named: Vec<Named> = listed
            .iter()
            .map(|c| Named {
                id: &c.id,
                names: container_names(&c.labels),
            })
            .collect();
        let id = pick_container(&named, namespace, query)?.to_string();
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

/// A task as containerd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    pub pid: u32,
    /// "running", "paused", "stopped", "created", ...
    pub status: String,
}

impl Containerd {
    /// Every container of `namespace`: id and labels.
    pub async fn list_containers(
        &self,
        namespace: &str,
    ) -> Result<Vec<(String, std::collections::BTreeMap<String, String>)>, ContainerdError> {
        Ok(ContainersClient::new(self.channel.clone())
            .list(namespaced(ListContainersRequest { filters: vec![] }, namespace)?)
            .await
            .map_err(call_error("list containers"))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| (c.id, c.labels.into_iter().collect()))
            .collect())
    }

    pub async fn container(&self, namespace: &str, id: &str) -> Result<Container, ContainerdError> {
        ContainersClient::new(self.channel.clone())
            .get(namespaced(GetContainerRequest { id: id.to_string() }, namespace)?)
            .await
            .map_err(call_error("get container"))?
            .into_inner()
            .container
            .ok_or(ContainerdError::Call {
                call: "get container",
                message: "empty answer".into(),
            })
    }

    pub async fn container_exists(&self, namespace: &str, id: &str) -> Result<bool, ContainerdError> {
        match self.container(namespace, id).await {
            Ok(_) => Ok(true),
            Err(ContainerdError::Missing { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn create_container(&self, namespace: &str, container: Container) -> Result<(), ContainerdError> {
        ContainersClient::new(self.channel.clone())
            .create(namespaced(
                CreateContainerRequest {
                    container: Some(container),
                },
                namespace,
            )?)
            .await
            .map_err(call_error("create container"))?;
        Ok(())
    }

    pub async fn delete_container(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        ContainersClient::new(self.channel.clone())
            .delete(namespaced(DeleteContainerRequest { id: id.to_string() }, namespace)?)
            .await
            .map_err(call_error("delete container"))?;
        Ok(())
    }

    /// The name of the snapshot `key` was prepared on.
    pub async fn snapshot_parent(
        &self,
        namespace: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<String, ContainerdError> {
        let info = SnapshotsClient::new(self.channel.clone())
            .stat(namespaced(
                StatSnapshotRequest {
                    snapshotter: snapshotter.to_string(),
                    key: key.to_string(),
                },
                namespace,
            )?)
            .await
            .map_err(call_error("stat snapshot"))?
            .into_inner()
            .info
            .unwrap_or_default();
        Ok(info.parent)
    }

    /// A lease that keeps what is made under it from containerd's garbage
    /// collection until [`Containerd::delete_lease`].
    /// Creates lease `id`, labelled [`RESTORE_LEASE_LABEL`]: the restores
    /// of this daemon are its only users, and a daemon that starts deletes
    /// the ones a killed run left ([`Containerd::delete_restore_leases`]).
    pub async fn create_lease(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        let mut labels = HashMap::new();
        labels.insert(RESTORE_LEASE_LABEL.to_string(), this_run().to_string());
        // Expires by itself if the daemon dies before deleting it.
        self.create_expiring_lease(namespace, id, std::time::Duration::from_secs(3600), labels)
            .await
    }

    /// Creates lease `id` with `labels`, which containerd deletes by itself
    /// `lifetime` from now if nobody deletes it before (a killed client).
    pub async fn create_expiring_lease(
        &self,
        namespace: &str,
        id: &str,
        lifetime: std::time::Duration,
        mut labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            crate::time::rfc3339(std::time::SystemTime::now() + lifetime),
        );
        LeasesClient::new(self.channel.clone())
            .create(namespaced(
                CreateLeaseRequest {
                    id: id.to_string(),
                    labels,
                },
                namespace,
            )?)
            .await
            .map_err(call_error("create lease"))?;
        Ok(())
    }

    /// Deletes, in every namespace, the leases [`Containerd::create_lease`]
    /// made in an earlier run of the daemon (what an interrupted restore
    /// holds: its snapshot, then collected); returns `namespace/lease` of
    /// each. This run's leases stay: their restores may be under way.
    pub async fn delete_restore_leases(&self) -> Result<Vec<String>, ContainerdError> {
        let namespaces = NamespacesClient::new(self.channel.clone())
            .list(ListNamespacesRequest { filter: String::new() })
            .await
            .map_err(call_error("list namespaces"))?
            .into_inner()
            .namespaces;
        let mut deleted = Vec::new();
        for namespace in namespaces {
            let ns = namespace.name;
            if validate_namespace(&ns).is_err() {
                continue;
            }
            let leases = LeasesClient::new(self.channel.clone())
                .list(namespaced(
                    ListLeasesRequest {
                        filters: vec![format!("labels.\"{RESTORE_LEASE_LABEL}\"")],
                    },
                    &ns,
                )?)
                .await
                .map_err(call_error("list leases"))?
                .into_inner()
                .leases;
            for lease in leases {
                if lease.labels.get(RESTORE_LEASE_LABEL).map(String::as_str) == Some(this_run()) {
                    continue;
                }
                self.delete_lease(&ns, &lease.id).await?;
                deleted.push(format!("{ns}/{}", lease.id));
            }
        }
        Ok(deleted)
    }

    pub async fn delete_lease(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        LeasesClient::new(self.channel.clone())
            .delete(namespaced(
                DeleteLeaseRequest {
                    id: id.to_string(),
                    sync: false,
                },
                namespace,
            )?)
            .await
            .map_err(call_error("delete lease"))?;
        Ok(())
    }

    /// Prepares active snapshot `key` on `parent` under lease `lease`.
    pub async fn prepare_snapshot(
        &self,
        namespace: &str,
        lease: &str,
        snapshotter: &str,
        key: &str,
        parent: &str,
    ) -> Result<Vec<Mount>, ContainerdError> {
        self.prepare_labelled_snapshot(namespace, lease, snapshotter, key, parent, HashMap::new())
            .await
    }

    /// Prepares active snapshot `key` on `parent` under lease `lease`, with
    /// `labels` (what containerd's unpacker tells a snapshotter of a layer).
    pub async fn prepare_labelled_snapshot(
        &self,
        namespace: &str,
        lease: &str,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, ContainerdError> {
        let request = leased(
            "prepare snapshot",
            namespaced(
                PrepareSnapshotRequest {
                    snapshotter: snapshotter.to_string(),
                    key: key.to_string(),
                    parent: parent.to_string(),
                    labels,
                },
                namespace,
            )?,
            lease,
        )?;
        Ok(SnapshotsClient::new(self.channel.clone())
            .prepare(request)
            .await
            .map_err(call_error("prepare snapshot"))?
            .into_inner()
            .mounts)
    }

    pub async fn snapshot_mounts(
        &self,
        namespace: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<Vec<Mount>, ContainerdError> {
        Ok(SnapshotsClient::new(self.channel.clone())
            .mounts(namespaced(
                MountsRequest {
                    snapshotter: snapshotter.to_string(),
                    key: key.to_string(),
                },
                namespace,
            )?)
            .await
            .map_err(call_error("snapshot mounts"))?
            .into_inner()
            .mounts)
    }

    pub async fn remove_snapshot(&self, namespace: &str, snapshotter: &str, key: &str) -> Result<(), ContainerdError> {
        SnapshotsClient::new(self.channel.clone())
            .remove(namespaced(
                RemoveSnapshotRequest {
                    snapshotter: snapshotter.to_string(),
                    key: key.to_string(),
                },
                namespace,
            )?)
            .await
            .map_err(call_error("remove snapshot"))?;
        Ok(())
    }

    /// Creates the task; returns its init pid.
    pub async fn create_task(&self, namespace: &str, request: CreateTaskRequest) -> Result<u32, ContainerdError> {
        Ok(TasksClient::new(self.channel.clone())
            .create(namespaced(request, namespace)?)
            .await
            .map_err(call_error("create task"))?
            .into_inner()
            .pid)
    }

    pub async fn start_task(&self, namespace: &str, id: &str) -> Result<u32, ContainerdError> {
        Ok(TasksClient::new(self.channel.clone())
            .start(namespaced(
                StartRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                },
                namespace,
            )?)
            .await
            .map_err(call_error("start task"))?
            .into_inner()
            .pid)
    }

    pub async fn pause_task(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        TasksClient::new(self.channel.clone())
            .pause(namespaced(
                PauseTaskRequest {
                    container_id: id.to_string(),
                },
                namespace,
            )?)
            .await
            .map_err(call_error("pause task"))?;
        Ok(())
    }

    pub async fn resume_task(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        TasksClient::new(self.channel.clone())
            .resume(namespaced(
                ResumeTaskRequest {
                    container_id: id.to_string(),
                },
                namespace,
            )?)
            .await
            .map_err(call_error("resume task"))?;
        Ok(())
    }

    /// The container's task, or None when it has none.
    pub async fn task(&self, namespace: &str, id: &str) -> Result<Option<TaskState>, ContainerdError> {
        let answer = TasksClient::new(self.channel.clone())
            .get(namespaced(
                GetRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                },
                namespace,
            )?)
            .await;
        match answer {
            Ok(r) => Ok(r.into_inner().process.map(|p| TaskState {
                pid: p.pid,
                status: TaskStatus::from_i32(p.status)
                    .unwrap_or(TaskStatus::Unknown)
                    .as_str_name()
                    .to_lowercase(),
            })),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call_error("get task")(s)),
        }
    }

    /// Kills the task's processes (SIGKILL) and deletes it, waiting until
    /// its init process is gone; a container without task is left as is.
    pub async fn remove_task(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        let Some(task) = self.task(namespace, id).await? else {
            return Ok(());
        };
        if task.status != "stopped" {
            let killed = TasksClient::new(self.channel.clone())
                .kill(namespaced(
                    KillRequest {
                        container_id: id.to_string(),
                        exec_id: String::new(),
                        signal: 9,
                        all: true,
                    },
                    namespace,
                )?)
                .await;
            if let Err(s) = killed {
                if s.code() != Code::NotFound && s.code() != Code::FailedPrecondition {
                    return Err(call_error("kill task")(s));
                }
            }
            for _ in 0..200 {
                match self.task(namespace, id).await? {
                    Some(t) if t.status != "stopped" => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
                    _ => break,
                }
            }
        }
        match TasksClient::new(self.channel.clone())
            .delete(namespaced(
                DeleteTaskRequest {
                    container_id: id.to_string(),
                },
                namespace,
            )?)
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call_error("delete task")(s)),
        }
    }

    /// Whether containerd produces metrics (cgroup statistics) for the task.
    pub async fn task_metrics(&self, namespace: &str, id: &str) -> Result<usize, ContainerdError> {
        Ok(TasksClient::new(self.channel.clone())
            .metrics(namespaced(
                MetricsRequest {
                    filters: vec![format!("id=={id}")],
                },
                namespace,
            )?)
            .await
            .map_err(call_error("task metrics"))?
            .into_inner()
            .metrics
            .len())
    }
}

/// A descriptor as containerd's images store gives an image's target:
/// strings and a size as containerd holds them, not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentDescriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
}

/// The bytes of one blob of the content store, as containerd streams them.
#[derive(Debug)]
pub struct ContentReader {
    stream: Streaming<ReadContentResponse>,
    digest: String,
    /// Where the next chunk must start: containerd says where each one
    /// does, and a gap or an overlap would splice another blob's bytes.
    offset: i64,
}

impl ContentReader {
    /// The next chunk of the blob, or None at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, ContainerdError> {
        let Some(response) = self.stream.message().await.map_err(call_error("read content"))? else {
            return Ok(None);
        };
        if response.offset != self.offset {
            return Err(ContainerdError::Call {
                call: "read content",
                message: format!(
                    "blob {}: a chunk at offset {} where {} was next",
                    self.digest, response.offset, self.offset
                ),
            });
        }
        self.offset = self.offset.saturating_add(response.data.len() as i64);
        Ok(Some(response.data))
    }
}

impl Containerd {
    /// The descriptor image `name` of `namespace` points at (a manifest or
    /// an index), or None when the images store has no such image.
    pub async fn image_target(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ContentDescriptor>, ContainerdError> {
        let answer = ImagesClient::new(self.channel.clone())
            .get(namespaced(GetImageRequest { name: name.to_string() }, namespace)?)
            .await;
        match answer {
            Ok(r) => Ok(r.into_inner().image.and_then(|i| i.target).map(|d| ContentDescriptor {
                media_type: d.media_type,
                digest: d.digest,
                size: d.size,
            })),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call_error("get image")(s)),
        }
    }

    /// The size the content store holds blob `digest` at, or None when it
    /// holds no such blob (never fetched, or garbage-collected).
    pub async fn content_size(&self, namespace: &str, digest: &str) -> Result<Option<i64>, ContainerdError> {
        let answer = ContentClient::new(self.channel.clone())
            .info(namespaced(
                InfoRequest {
                    digest: digest.to_string(),
                },
                namespace,
            )?)
            .await;
        match answer {
            Ok(r) => Ok(r.into_inner().info.map(|i| i.size)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call_error("content info")(s)),
        }
    }

    /// Streams blob `digest` of the content store from its start to its end.
    pub async fn read_content(&self, namespace: &str, digest: &str) -> Result<ContentReader, ContainerdError> {
        let stream = ContentClient::new(self.channel.clone())
            .read(namespaced(
                ReadContentRequest {
                    digest: digest.to_string(),
                    offset: 0,
                    // Zero reads to the end.
                    size: 0,
                },
                namespace,
            )?)
            .await
            .map_err(call_error("read content"))?
            .into_inner();
        Ok(ContentReader {
            stream,
            digest: digest.to_string(),
            offset: 0,
        })
    }
}

/// A blob to write into the content store: what it must hash to, its size,
/// and the labels it is committed with.
#[derive(Debug, Clone)]
pub struct ContentWrite {
    pub digest: String,
    pub size: i64,
    pub labels: HashMap<String, String>,
}

/// How much of a blob one write request carries: well under the 4 MiB
/// containerd's gRPC server accepts in one message.
pub const WRITE_CHUNK_BYTES: usize = 1 << 20;

impl Containerd {
    /// Whether snapshot `key` of `snapshotter` exists.
    pub async fn snapshot_exists(
        &self,
        namespace: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<bool, ContainerdError> {
        match self.snapshot_parent(namespace, snapshotter, key).await {
            Ok(_) => Ok(true),
            Err(ContainerdError::Missing { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Commits active snapshot `key` as `name`, with `labels`, under lease
    /// `lease`.
    pub async fn commit_snapshot(
        &self,
        namespace: &str,
        lease: &str,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let request = leased(
            "commit snapshot",
            namespaced(
                CommitSnapshotRequest {
                    snapshotter: snapshotter.to_string(),
                    name: name.to_string(),
                    key: key.to_string(),
                    labels,
                },
                namespace,
            )?,
            lease,
        )?;
        SnapshotsClient::new(self.channel.clone())
            .commit(request)
            .await
            .map_err(call_error("commit snapshot"))?;
        Ok(())
    }

    /// Has containerd's diff service apply layer `layer` (a blob of the
    /// content store) onto `mounts`; returns the digest of what it applied
    /// (the uncompressed tar: the layer's diff id).
    pub async fn apply_layer(
        &self,
        namespace: &str,
        lease: &str,
        layer: &ContentDescriptor,
        mounts: Vec<Mount>,
    ) -> Result<String, ContainerdError> {
        let request = leased(
            "apply layer",
            namespaced(
                ApplyRequest {
                    diff: Some(Descriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.clone(),
                        size: layer.size,
                        annotations: HashMap::new(),
                    }),
                    mounts,
                    payloads: HashMap::new(),
                },
                namespace,
            )?,
            lease,
        )?;
        let applied = DiffClient::new(self.channel.clone())
            .apply(request)
            .await
            .map_err(call_error("apply layer"))?
            .into_inner()
            .applied
            .ok_or(ContainerdError::Call {
                call: "apply layer",
                message: "empty answer".into(),
            })?;
        Ok(applied.digest)
    }

    /// Writes a blob into the content store under lease `lease`: the chunks
    /// `chunks` yields, which containerd checks against `blob.digest` and
    /// `blob.size` before it commits them with `blob.labels`. A blob the
    /// store holds already keeps its bytes and gets the labels. `write_ref`
    /// names the write, so that two writers of one blob wait on each other.
    pub async fn write_content<S>(
        &self,
        namespace: &str,
        lease: &str,
        write_ref: &str,
        blob: ContentWrite,
        chunks: S,
    ) -> Result<(), ContainerdError>
    where
        S: tokio_stream::Stream<Item = Vec<u8>> + Send + 'static,
    {
        use tokio_stream::StreamExt;
        if self.content_size(namespace, &blob.digest).await?.is_some() {
            return self.label_content(namespace, &blob.digest, blob.labels).await;
        }
        let first = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: write_ref.to_string(),
            total: blob.size,
            expected: blob.digest.clone(),
            ..Default::default()
        };
        let total = blob.size;
        let mut offset = 0i64;
        let writes = chunks.map(move |data| {
            let request = WriteContentRequest {
                action: WriteAction::Write as i32,
                total,
                offset,
                data,
                ..Default::default()
            };
            offset += request.data.len() as i64;
            request
        });
        // At the end: a commit at offset 0 would truncate what was written.
        let commit = WriteContentRequest {
            action: WriteAction::Commit as i32,
            total,
            offset: total,
            expected: blob.digest.clone(),
            labels: blob.labels.clone(),
            ..Default::default()
        };
        let requests = tokio_stream::iter([first])
            .chain(writes)
            .chain(tokio_stream::iter([commit]));
        let answer = ContentClient::new(self.channel.clone())
            .write(leased("write content", namespaced(requests, namespace)?, lease)?)
            .await;
        let mut responses = match answer {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => {
                return self.label_content(namespace, &blob.digest, blob.labels).await
            }
            Err(s) => return Err(call_error("write content")(s)),
        };
        loop {
            match responses.message().await {
                Ok(Some(response)) if response.action == WriteAction::Commit as i32 => {
                    if response.digest != blob.digest {
                        return Err(ContainerdError::Call {
                            call: "write content",
                            message: format!("committed {} where {} was written", response.digest, blob.digest),
                        });
                    }
                    return Ok(());
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(ContainerdError::Call {
                        call: "write content",
                        message: format!("blob {}: the write ended before its commit", blob.digest),
                    })
                }
                Err(s) if s.code() == Code::AlreadyExists => {
                    return self.label_content(namespace, &blob.digest, blob.labels).await
                }
                Err(s) => return Err(call_error("write content")(s)),
            }
        }
    }

    /// Sets `labels` on blob `digest` of the content store, keeping its others.
    pub async fn label_content(
        &self,
        namespace: &str,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        ContentClient::new(self.channel.clone())
            .update(namespaced(
                ContentUpdateRequest {
                    info: Some(ContentInfo {
                        digest: digest.to_string(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                namespace,
            )?)
            .await
            .map_err(call_error("label content"))?;
        Ok(())
    }

    /// Points image `name` at `target`, creating the image record or
    /// replacing the target of the one there.
    pub async fn put_image(
        &self,
        namespace: &str,
        name: &str,
        target: &ContentDescriptor,
    ) -> Result<(), ContainerdError> {
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(Descriptor {
                media_type: target.media_type.clone(),
                digest: target.digest.clone(),
                size: target.size,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let created = ImagesClient::new(self.channel.clone())
            .create(namespaced(
                CreateImageRequest {
                    image: Some(image.clone()),
                },
                namespace,
            )?)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                ImagesClient::new(self.channel.clone())
                    .update(namespaced(
                        UpdateImageRequest {
                            image: Some(image),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["target".to_string()],
                            }),
                        },
                        namespace,
                    )?)
                    .await
                    .map_err(call_error("update image"))?;
                Ok(())
            }
            Err(s) => Err(call_error("create image")(s)),
        }
    }

    /// Deletes image record `name`; a missing one is no error.
    pub async fn delete_image(&self, namespace: &str, name: &str) -> Result<(), ContainerdError> {
        match ImagesClient::new(self.channel.clone())
            .delete(namespaced(
                DeleteImageRequest {
                    name: name.to_string(),
                    sync: false,
                },
                namespace,
            )?)
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call_error("delete image")(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_namespaces_are_bad_namespace_errors() {
        // The rule itself is `crate::namespace`'s, tested there.
        validate_namespace("k8s.io").unwrap();
        assert!(matches!(
            validate_namespace("a/b"),
            Err(ContainerdError::BadNamespace(_))
        ));
    }

    #[test]
    fn exact_id_beats_prefix_and_prefix_must_be_unique() {
        let ids: Vec<Named> = ["web", "web-2", "db-1"]
            .into_iter()
            .map(|id| Named { id, names: vec![] })
            .collect();
        assert_eq!(pick_container(&ids, "ns", "web").unwrap(), "web");
        assert_eq!(pick_container(&ids, "ns", "db").unwrap(), "db-1");
        let e = pick_container(&ids, "ns", "we").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("web, web-2"), "{e}");
        assert_eq!(pick_container(&ids, "ns", "x").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(pick_container(&ids, "ns", "").unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn containers_are_found_by_their_nerdctl_and_kubernetes_names() {
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let nerdctl = labels(&[(NERDCTL_NAME_LABEL, "shop-db")]);
        let cri = labels(&[
            (CRI_CONTAINER_NAME_LABEL, "app"),
            (CRI_POD_NAME_LABEL, "web-7f9c"),
            (CRI_POD_NAMESPACE_LABEL, "prod"),
        ]);
        assert_eq!(container_names(&nerdctl), vec!["shop-db"]);
        assert_eq!(container_names(&cri), vec!["app", "web-7f9c/app", "prod/web-7f9c/app"]);
        assert!(container_names(&labels(&[("other", "x")])).is_empty());

        let containers = vec![
            Named {
                id: "4f1c2e",
                names: container_names(&nerdctl),
            },
            Named {
                id: "9ab0d1",
                names: container_names(&cri),
            },
            Named {
                id: "app",
                names: vec![],
            },
        ];
        assert_eq!(pick_container(&containers, "ns", "shop-db").unwrap(), "4f1c2e");
        assert_eq!(
            pick_container(&containers, "ns", "shop").unwrap(),
            "4f1c2e",
            "a name prefix"
        );
        assert_eq!(pick_container(&containers, "ns", "web-7f9c/app").unwrap(), "9ab0d1");
        assert_eq!(pick_container(&containers, "ns", "prod/web").unwrap(), "9ab0d1");
        // An id is matched before a name.
        assert_eq!(pick_container(&containers, "ns", "app").unwrap(), "app");
        let e = pick_container(&containers, "ns", "a").unwrap_err();
        assert!(e.to_string().contains("9ab0d1, app"), "{e}");
        assert!(pick_container(&containers, "ns", "4f1c2e-x").is_err());
    }
}
