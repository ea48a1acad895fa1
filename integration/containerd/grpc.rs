//! containerd's snapshots API (`containerd.services.snapshots.v1.Snapshots`)
//! over a unix socket, for what `ctr` cannot do: labels on Prepare, and
//! looking at the daemon's own view of its snapshots. The same service is
//! served by containerd (namespaced by the `containerd-namespace` header, keys
//! as the user names them) and by our daemon (keys `<ns>/<n>/<name>`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use containerd_snapshots::api::snapshots::v1 as api;
use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use api::Info;

/// A blocking client: the tests are synchronous, so each client owns a
/// small runtime.
pub struct Snapshots {
    runtime: tokio::runtime::Runtime,
    client: SnapshotsClient<Channel>,
    snapshotter: String,
    namespace: Option<String>,
    lease: Option<String>,
}

impl Snapshots {
    /// A client of our daemon's socket.
    pub fn daemon(socket: &Path) -> Result<Snapshots> {
        Snapshots::connect(socket, "seamless", None)
    }

    /// A client of containerd's socket, for `snapshotter` in `namespace`.
    pub fn containerd(socket: &Path, snapshotter: &str, namespace: &str) -> Result<Snapshots> {
        Snapshots::connect(socket, snapshotter, Some(namespace.to_string()))
    }

    fn connect(socket: &Path, snapshotter: &str, namespace: Option<String>) -> Result<Snapshots> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?;
        let path = socket.to_path_buf();
        let channel = runtime
            .block_on(
                Endpoint::try_from("http://[::]:50051")?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(60))
                    .connect_with_connector(tower::service_fn(move |_: Uri| UnixStream::connect(path.clone()))),
            )
            .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(Snapshots {
            runtime,
            client: SnapshotsClient::new(channel),
            snapshotter: snapshotter.to_string(),
            namespace,
            lease: None,
        })
    }

    /// Makes every later request under containerd lease `id`, as containerd's
    /// unpacker does, so what it creates is not garbage collected meanwhile.
    pub fn with_lease(mut self, id: &str) -> Snapshots {
        self.lease = Some(id.to_string());
        self
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(ns) = &self.namespace {
            // Namespace names are plain ASCII: always a valid header value.
            request
                .metadata_mut()
                .insert("containerd-namespace", ns.parse().expect("namespace is ASCII"));
        }
        if let Some(lease) = &self.lease {
            request
                .metadata_mut()
                .insert("containerd-lease", lease.parse().expect("lease id is ASCII"));
        }
        request
    }

    pub fn prepare(&mut self, key: &str, parent: &str, labels: HashMap<String, String>) -> Result<Vec<String>> {
        let request = self.request(api::PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels,
        });
        let mounts = self
            .runtime
            .block_on(self.client.prepare(request))
            .with_context(|| format!("Prepare {key}"))?
            .into_inner()
            .mounts;
        Ok(mounts
            .into_iter()
            .map(|m| format!("{} {} {:?}", m.r#type, m.source, m.options))
            .collect())
    }

    pub fn stat(&mut self, key: &str) -> Result<Info> {
        let request = self.request(api::StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        self.runtime
            .block_on(self.client.stat(request))
            .with_context(|| format!("Stat {key}"))?
            .into_inner()
            .info
            .with_context(|| format!("Stat {key} answered without info"))
    }

    pub fn remove(&mut self, key: &str) -> Result<()> {
        let request = self.request(api::RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        self.runtime
            .block_on(self.client.remove(request))
            .with_context(|| format!("Remove {key}"))?;
        Ok(())
    }

    pub fn list(&mut self, filters: &[&str]) -> Result<Vec<Info>> {
        let request = self.request(api::ListSnapshotsRequest {
            snapshotter: self.snapshotter.clone(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        });
        let client = &mut self.client;
        self.runtime.block_on(async {
            let mut stream = client.list(request).await.context("List")?.into_inner();
            let mut all = Vec::new();
            while let Some(batch) = stream.message().await.context("List stream")? {
                all.extend(batch.info);
            }
            Ok(all)
        })
    }
}

pub const KIND_COMMITTED: i32 = api::Kind::Committed as i32;
pub const KIND_ACTIVE: i32 = api::Kind::Active as i32;

pub fn is_committed(info: &Info) -> bool {
    info.kind == KIND_COMMITTED
}

pub fn is_active(info: &Info) -> bool {
    info.kind == KIND_ACTIVE
}

/// The gRPC code of a failed call, if the error is one.
pub fn code_of(error: &anyhow::Error) -> Option<tonic::Code> {
    error.downcast_ref::<tonic::Status>().map(tonic::Status::code)
}
