//! What the Control API lets a caller over TCP do: the one place that
//! decides it. A token holder on another host needs only what moving a
//! checkpoint to this node and restoring it takes (the calls `checkpointctl
//! restore|resume --target-node` makes, and `list`/`info` to look at what
//! arrived): Version, ListCheckpoints, InspectCheckpoint, ReceiveCheckpoint,
//! RestoreCheckpoint and ResumeContainer. Every other call is refused with
//! PermissionDenied naming it, and in the calls served, a field that names a
//! place on this host or an endpoint it would call (`storage.path`, an nfs
//! directory; `storage.endpoint`, an S3 server) is refused naming the field:
//! otherwise the token would let its holder read and write any host path as
//! root, or make the node call any server.
//!
//! Served only on the TCP listener (see `server::run`), so being here is
//! being remote; the unix socket serves `ControlService` itself. Every
//! method of the `Control` trait must be written out here, so a call added
//! to the API is refused until someone decides otherwise.

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::control::ControlService;
use crate::proto::control_server::Control;
use crate::proto::{
    Checkpoint, CommitJob, ContainerStatsRequest, ContainerStatsResponse, CreateCheckpointRequest,
    ExportCheckpointRequest, ExportCheckpointResponse, GetCommitRequest, ImportCheckpointRequest,
    ImportCheckpointResponse, InspectCheckpointRequest, InspectCheckpointResponse, ListCheckpointsRequest,
    ListCheckpointsResponse, ListCommitsRequest, ListCommitsResponse, ListMountsRequest, ListMountsResponse,
    ListSchedulesRequest, ListSchedulesResponse, MergeCheckpointsRequest, MergeCheckpointsResponse,
    PruneCheckpointsRequest, PruneCheckpointsResponse, ReceiveCheckpointRequest, RemoveScheduleRequest,
    RemoveScheduleResponse, RestoreCheckpointRequest, RestoreCheckpointResponse, ResumeContainerRequest,
    ResumeContainerResponse, ScheduleCheckpointsRequest, ScheduleCheckpointsResponse, SeamlessCommitRequest,
    SeamlessCommitResponse, SendCheckpointRequest, Storage, VersionRequest, VersionResponse,
};

/// The Control API as callers over TCP see it.
#[derive(Debug, Clone)]
pub struct RemoteControl {
    inner: Arc<ControlService>,
}

impl RemoteControl {
    pub fn new(inner: Arc<ControlService>) -> RemoteControl {
        RemoteControl { inner }
    }
}

/// The calls a remote caller may make, for the refusal's message.
const SERVED: &str =
    "Version, ListCheckpoints, InspectCheckpoint, ReceiveCheckpoint, RestoreCheckpoint and ResumeContainer";

fn not_served(rpc: &str) -> Status {
    Status::permission_denied(format!(
        "{rpc} is not served over TCP: remote callers may call only {SERVED}; \
         use the node's unix socket for the rest"
    ))
}

/// Refuses the fields of a storage that name something of this host or a
/// server it would reach: the node's own storage is the only one a remote
/// caller may name (backend "local"), or S3 at the provider's default
/// endpoint.
fn storage_refusal(rpc: &str, storage: Option<&Storage>) -> Option<Status> {
    let storage = storage?;
    [
        ("storage.path", &storage.path, "a directory of the node's host"),
        (
            "storage.endpoint",
            &storage.endpoint,
            "a server the node would connect to",
        ),
    ]
    .into_iter()
    .find(|(_, value, _)| !value.is_empty())
    .map(|(field, _, what)| {
        Status::permission_denied(format!(
            "{rpc}: {field} names {what}, which a remote caller may not choose; \
             leave it empty or call the node's unix socket"
        ))
    })
}

#[tonic::async_trait]
impl Control for RemoteControl {
    async fn version(&self, request: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        self.inner.version(request).await
    }

    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        if let Some(refused) = storage_refusal("ListCheckpoints", request.get_ref().storage.as_ref()) {
            return Err(refused);
        }
        self.inner.list_checkpoints(request).await
    }

    async fn inspect_checkpoint(
        &self,
        request: Request<InspectCheckpointRequest>,
    ) -> Result<Response<InspectCheckpointResponse>, Status> {
        if let Some(refused) = storage_refusal("InspectCheckpoint", request.get_ref().storage.as_ref()) {
            return Err(refused);
        }
        self.inner.inspect_checkpoint(request).await
    }

    async fn restore_checkpoint(
        &self,
        request: Request<RestoreCheckpointRequest>,
    ) -> Result<Response<RestoreCheckpointResponse>, Status> {
        if let Some(refused) = storage_refusal("RestoreCheckpoint", request.get_ref().storage.as_ref()) {
            return Err(refused);
        }
        self.inner.restore_checkpoint(request).await
    }

    async fn resume_container(
        &self,
        request: Request<ResumeContainerRequest>,
    ) -> Result<Response<ResumeContainerResponse>, Status> {
        self.inner.resume_container(request).await
    }

    async fn receive_checkpoint(
        &self,
        request: Request<Streaming<ReceiveCheckpointRequest>>,
    ) -> Result<Response<ImportCheckpointResponse>, Status> {
        // Every message is checked, not only the first that names the
        // storage: a refused one ends the call and its scratch file.
        #[allow(clippy::result_large_err)] // the stream's items are tonic's
        let checked = request.into_inner().map(|message| {
            let message = message?;
            match storage_refusal("ReceiveCheckpoint", message.storage.as_ref()) {
                Some(refused) => Err(refused),
                None => Ok(message),
            }
        });
        self.inner.receive(checked).await
    }

    type SendCheckpointStream = <ControlService as Control>::SendCheckpointStream;

    async fn send_checkpoint(
        &self,
        _request: Request<SendCheckpointRequest>,
    ) -> Result<Response<Self::SendCheckpointStream>, Status> {
        Err(not_served("SendCheckpoint"))
    }

    async fn list_mounts(&self, _request: Request<ListMountsRequest>) -> Result<Response<ListMountsResponse>, Status> {
        Err(not_served("ListMounts"))
    }

    async fn seamless_commit(
        &self,
        _request: Request<SeamlessCommitRequest>,
    ) -> Result<Response<SeamlessCommitResponse>, Status> {
        Err(not_served("SeamlessCommit"))
    }

    async fn get_commit(&self, _request: Request<GetCommitRequest>) -> Result<Response<CommitJob>, Status> {
        Err(not_served("GetCommit"))
    }

    async fn list_commits(
        &self,
        _request: Request<ListCommitsRequest>,
    ) -> Result<Response<ListCommitsResponse>, Status> {
        Err(not_served("ListCommits"))
    }

    async fn create_checkpoint(
        &self,
        _request: Request<CreateCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        Err(not_served("CreateCheckpoint"))
    }

    async fn prune_checkpoints(
        &self,
        _request: Request<PruneCheckpointsRequest>,
    ) -> Result<Response<PruneCheckpointsResponse>, Status> {
        Err(not_served("PruneCheckpoints"))
    }

    async fn merge_checkpoints(
        &self,
        _request: Request<MergeCheckpointsRequest>,
    ) -> Result<Response<MergeCheckpointsResponse>, Status> {
        Err(not_served("MergeCheckpoints"))
    }

    async fn export_checkpoint(
        &self,
        _request: Request<ExportCheckpointRequest>,
    ) -> Result<Response<ExportCheckpointResponse>, Status> {
        Err(not_served("ExportCheckpoint"))
    }

    async fn import_checkpoint(
        &self,
        _request: Request<ImportCheckpointRequest>,
    ) -> Result<Response<ImportCheckpointResponse>, Status> {
        Err(not_served("ImportCheckpoint"))
    }

    async fn schedule_checkpoints(
        &self,
        _request: Request<ScheduleCheckpointsRequest>,
    ) -> Result<Response<ScheduleCheckpointsResponse>, Status> {
        Err(not_served("ScheduleCheckpoints"))
    }

    async fn list_schedules(
        &self,
        _request: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        Err(not_served("ListSchedules"))
    }

    async fn remove_schedule(
        &self,
        _request: Request<RemoveScheduleRequest>,
    ) -> Result<Response<RemoveScheduleResponse>, Status> {
        Err(not_served("RemoveSchedule"))
    }

    async fn container_stats(
        &self,
        _request: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        Err(not_served("ContainerStats"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_fields_of_a_storage_are_named() {
        assert!(storage_refusal("X", None).is_none());
        assert!(storage_refusal("X", Some(&Storage::default())).is_none());
        let s3 = Storage {
            backend: "s3".into(),
            bucket: "b".into(),
            region: "r".into(),
            ..Storage::default()
        };
        assert!(
            storage_refusal("X", Some(&s3)).is_none(),
            "s3 at the provider's endpoint"
        );
        for (storage, field) in [
            (
                Storage {
                    backend: "nfs".into(),
                    path: "/etc".into(),
                    ..Storage::default()
                },
                "storage.path",
            ),
            (
                Storage {
                    endpoint: "http://169.254.169.254".into(),
                    ..s3
                },
                "storage.endpoint",
            ),
        ] {
            let status = storage_refusal("RestoreCheckpoint", Some(&storage)).expect("refused");
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
            assert!(
                status.message().contains(field) && status.message().contains("RestoreCheckpoint"),
                "{status:?}"
            );
        }
    }
}
