//! seamless.v1.Control: the daemon's own API (checkpointctl is its client).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::status::commit_status;
use crate::commit::{CommitError, CommitOptions, CommitService, Job};
use crate::proto::control_server::Control;
use crate::proto::{
    CommitJob, GetCommitRequest, SeamlessCommitRequest, SeamlessCommitResponse, VersionRequest, VersionResponse,
};
use crate::snapshotter::Snapshotter;

#[derive(Debug, Clone)]
pub struct ControlService {
    snapshotter: Arc<Snapshotter>,
    commits: Arc<CommitService>,
    root: PathBuf,
}

impl ControlService {
    pub fn new(snapshotter: Arc<Snapshotter>, commits: Arc<CommitService>, root: PathBuf) -> Self {
        ControlService {
            snapshotter,
            commits,
            root,
        }
    }
}

fn options_from_wire(r: SeamlessCommitRequest) -> Result<CommitOptions, CommitError> {
    Ok(CommitOptions {
        format: CommitOptions::parse_format(&r.format)?,
        namespace: r.namespace,
        container: r.container,
        target: r.target,
        work_dir: if r.work_dir.is_empty() {
            "/tmp".into()
        } else {
            r.work_dir.into()
        },
        fs_version: if r.fs_version == 0 { 6 } else { r.fs_version },
        compressor: if r.compressor.is_empty() {
            "lz4_block".into()
        } else {
            r.compressor
        },
        target_insecure: r.target_insecure,
        source_insecure: r.source_insecure,
        with_paths: r.with_paths.into_iter().map(PathBuf::from).collect(),
        without_paths: r.without_paths.into_iter().map(PathBuf::from).collect(),
        maximum_times: if r.maximum_times == 0 { 10 } else { r.maximum_times },
    })
}

fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn job_to_wire(job: Job) -> CommitJob {
    CommitJob {
        snapshot_id: job.snapshot_id,
        state: job.state.as_str().to_string(),
        progress: job.progress,
        started_unix_ms: unix_ms(job.started),
        ended_unix_ms: job.ended.map(unix_ms).unwrap_or(0),
        error_code: job.error_code.map(|c| c.as_str().to_string()).unwrap_or_default(),
        error: job.error.unwrap_or_default(),
        target: job.options.target,
        manifest_digest: job.manifest_digest.unwrap_or_default(),
        pause_time_ns: job.pause.as_nanos() as u64,
        stage: job.stage,
        layer_plan: job.layer_plan,
        commit_layers: job.commit_layers,
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn version(&self, _request: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            storage: self.snapshotter.storage_kind().as_str().to_string(),
            root: self.root.display().to_string(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(container = %request.get_ref().container))]
    async fn seamless_commit(
        &self,
        request: Request<SeamlessCommitRequest>,
    ) -> Result<Response<SeamlessCommitResponse>, Status> {
        let options = options_from_wire(request.into_inner()).map_err(commit_status)?;
        let started = self.commits.commit(options).await.map_err(commit_status)?;
        Ok(Response::new(SeamlessCommitResponse {
            snapshot_id: started.snapshot_id,
            pause_time_ns: started.pause.as_nanos() as u64,
            old_upper_dir: started.old_upper.display().to_string(),
            new_upper_dir: started.new_upper.display().to_string(),
        }))
    }

    async fn get_commit(&self, request: Request<GetCommitRequest>) -> Result<Response<CommitJob>, Status> {
        let id = request.into_inner().snapshot_id;
        let job = self.commits.job(&id).map_err(commit_status)?;
        Ok(Response::new(job_to_wire(job)))
    }
}
