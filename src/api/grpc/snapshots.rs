//! containerd.services.snapshots.v1.Snapshots served over the snapshotter.

use std::pin::Pin;
use std::sync::Arc;

use containerd_snapshots::api::snapshots::v1 as api;
use containerd_snapshots::api::snapshots::v1::snapshots_server::Snapshots;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{info_to_wire, key_style, labels_from_wire, mounts_to_wire};
use super::status::{join_status, to_status};
use crate::snapshot::snapshotter::Snapshotter;

/// containerd sends List results in batches of this many.
const LIST_BATCH: usize = 100;

#[derive(Debug, Clone)]
pub struct SnapshotsService {
    snapshotter: Arc<Snapshotter>,
}

impl SnapshotsService {
    pub fn new(snapshotter: Arc<Snapshotter>) -> Self {
        SnapshotsService { snapshotter }
    }

    /// Runs `f` on the blocking pool and maps its error.
    async fn blocking<T, E>(&self, f: impl FnOnce(&Snapshotter) -> Result<T, E> + Send + 'static) -> Result<T, Status>
    where
        T: Send + 'static,
        E: crate::error::Classify + std::fmt::Display + Send + 'static,
    {
        let snapshotter = self.snapshotter.clone();
        tokio::task::spawn_blocking(move || f(&snapshotter))
            .await
            .map_err(join_status)?
            .map_err(to_status)
    }
}

impl SnapshotsService {
    /// Runs `f` on the calling task: for metadata reads that take
    /// microseconds, where a hop to the blocking pool would cost more than the
    /// work (Stat and Mounts sit on containerd's hot path).
    // tonic::Status is what every handler must return; boxing it here would
    // only move the allocation.
    #[allow(clippy::result_large_err)]
    fn inline<T, E>(&self, f: impl FnOnce(&Snapshotter) -> Result<T, E>) -> Result<T, Status>
    where
        E: crate::error::Classify + std::fmt::Display,
    {
        f(&self.snapshotter).map_err(to_status)
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    #[instrument(level = "debug", err(level = "debug"), skip_all, fields(key = %request.get_ref().key, parent = %request.get_ref().parent))]
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let style = key_style(&request);
        let r = request.into_inner();
        let labels = labels_from_wire(r.labels);
        let mounts = self
            .blocking(move |s| s.prepare(style, &r.key, &r.parent, labels))
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: mounts_to_wire(mounts),
        }))
    }

    #[instrument(level = "debug", err(level = "debug"), skip_all, fields(key = %request.get_ref().key, parent = %request.get_ref().parent))]
    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let style = key_style(&request);
        let r = request.into_inner();
        let labels = labels_from_wire(r.labels);
        let mounts = self.blocking(move |s| s.view(style, &r.key, &r.parent, labels)).await?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: mounts_to_wire(mounts),
        }))
    }

    #[instrument(level = "debug", err(level = "debug"), skip_all, fields(key = %request.get_ref().key))]
    async fn mounts(&self, request: Request<api::MountsRequest>) -> Result<Response<api::MountsResponse>, Status> {
        let style = key_style(&request);
        let key = request.into_inner().key;
        let mounts = self.inline(|s| s.mounts(style, &key))?;
        Ok(Response::new(api::MountsResponse {
            mounts: mounts_to_wire(mounts),
        }))
    }

    #[instrument(level = "debug", err(level = "debug"), skip_all, fields(key = %request.get_ref().key, name = %request.get_ref().name))]
    async fn commit(&self, request: Request<api::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let style = key_style(&request);
        let r = request.into_inner();
        let labels = labels_from_wire(r.labels);
        self.blocking(move |s| s.commit(style, &r.name, &r.key, labels)).await?;
        Ok(Response::new(()))
    }

    #[instrument(level = "debug", err(level = "debug"), skip_all, fields(key = %request.get_ref().key))]
    async fn remove(&self, request: Request<api::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let style = key_style(&request);
        let key = request.into_inner().key;
        self.blocking(move |s| s.remove(style, &key)).await?;
        Ok(Response::new(()))
    }

    #[instrument(level = "debug", err(level = "debug"), skip_all, fields(key = %request.get_ref().key))]
    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let style = key_style(&request);
        let key = request.into_inner().key;
        let info = self.inline(|s| s.stat(style, &key))?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info_to_wire(info)),
        }))
    }

    #[instrument(level = "debug", err(level = "debug"), skip_all)]
    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let style = key_style(&request);
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update request carries no snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let labels = labels_from_wire(info.labels);
        let name = info.name;
        let info = self.blocking(move |s| s.update(style, &name, labels, paths)).await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info_to_wire(info)),
        }))
    }

    type ListStream = ListStream;

    #[instrument(level = "debug", err(level = "debug"), skip_all, fields(filters = ?request.get_ref().filters))]
    async fn list(&self, request: Request<api::ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let filters = request.into_inner().filters;
        let infos = self.blocking(move |s| s.list(&filters)).await?;
        let mut batches: Vec<Result<api::ListSnapshotsResponse, Status>> = Vec::new();
        let mut infos = infos.into_iter().map(info_to_wire).peekable();
        while infos.peek().is_some() {
            batches.push(Ok(api::ListSnapshotsResponse {
                info: infos.by_ref().take(LIST_BATCH).collect(),
            }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    #[instrument(level = "debug", err(level = "debug"), skip_all, fields(key = %request.get_ref().key))]
    async fn usage(&self, request: Request<api::UsageRequest>) -> Result<Response<api::UsageResponse>, Status> {
        let style = key_style(&request);
        let key = request.into_inner().key;
        let usage = self.blocking(move |s| s.usage(style, &key)).await?;
        Ok(Response::new(api::UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    #[instrument(level = "debug", err(level = "debug"), skip_all)]
    async fn cleanup(&self, _request: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        self.blocking(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
