//! seamless.v1.Control: the daemon's own API (checkpointctl is its client).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::status::{commit_status, to_status};
use crate::checkpoint::restore::{self, RestoreRequest};
use crate::checkpoint::{
    self, CheckpointError, CheckpointService, CreateRequest, ExportRequest, MergePolicy, MergeStrategy, PrunePolicy,
    StorageSpec,
};
use crate::commit::{CommitError, CommitService, Job, JobState};
use crate::proto::control_server::Control;
use crate::proto::{
    ArchiveChunk, Checkpoint, CommitJob, ContainerSample, ContainerStatsRequest, ContainerStatsResponse,
    CreateCheckpointRequest, Diff, ExportCheckpointRequest, ExportCheckpointResponse, GetCommitRequest,
    ImportCheckpointRequest, ImportCheckpointResponse, InspectCheckpointRequest, InspectCheckpointResponse,
    ListCheckpointsRequest, ListCheckpointsResponse, ListCommitsRequest, ListCommitsResponse, ListMountsRequest,
    ListMountsResponse, ListSchedulesRequest, ListSchedulesResponse, MergeCheckpointsRequest, MergeCheckpointsResponse,
    MergeRules, ProcessState, PruneCheckpointsRequest, PruneCheckpointsResponse, ReceiveCheckpointRequest,
    RemoveScheduleRequest, RemoveScheduleResponse, RestoreCheck, RestoreCheckpointRequest, RestoreCheckpointResponse,
    ResumeContainerRequest, ResumeContainerResponse, Schedule, ScheduleCheckpointsRequest, ScheduleCheckpointsResponse,
    SeamlessCommitRequest, SeamlessCommitResponse, SendCheckpointRequest, Storage, Verification, VersionRequest,
    VersionResponse,
};
use crate::snapshot::snapshotter::Snapshotter;

#[derive(Debug, Clone)]
pub struct ControlService {
    snapshotter: Arc<Snapshotter>,
    commits: Arc<CommitService>,
    checkpoints: Arc<CheckpointService>,
    root: PathBuf,
}

impl ControlService {
    /// Starts the checkpoint scheduler of `checkpoints`.
    pub fn new(
        snapshotter: Arc<Snapshotter>,
        commits: Arc<CommitService>,
        checkpoints: Arc<CheckpointService>,
        root: PathBuf,
    ) -> Self {
        checkpoints.start_scheduler();
        ControlService {
            snapshotter,
            checkpoints,
            commits,
            root,
        }
    }
}

fn checkpoint_status(err: CheckpointError) -> Status {
    match err {
        CheckpointError::Capture(e) => commit_status(CommitError::from(e)),
        other => to_status(other),
    }
}

fn storage_from_wire(storage: Option<Storage>) -> StorageSpec {
    let storage = storage.unwrap_or_default();
    StorageSpec {
        backend: storage.backend,
        path: storage.path,
        s3: checkpoint::s3::S3Config {
            bucket: storage.bucket,
            region: storage.region,
            endpoint: storage.endpoint,
            access_key: storage.access_key,
            secret_key: storage.secret_key,
            prefix: String::new(),
        },
        encryption_key: storage.encryption_key,
    }
}

fn create_request_from_wire(r: CreateCheckpointRequest) -> CreateRequest {
    CreateRequest {
        storage: storage_from_wire(r.storage),
        namespace: r.namespace,
        container: r.container,
        labels: r.labels,
        parent: Some(r.parent).filter(|p| !p.is_empty()),
        compression: r.compression,
        pre_freeze: r.pre_freeze,
        memory_limit: r.memory_limit,
        fs_only: r.fs_only,
        leave_running: !r.exit_after,
        tcp_established: r.tcp_established,
        file_locks: r.file_locks,
        pre_dump: r.pre_dump,
        criu_path: Some(r.criu_path).filter(|p| !p.is_empty()),
        engine: r.engine,
    }
}

fn merge_rules_from_wire(r: MergeRules) -> Result<MergePolicy, CheckpointError> {
    Ok(MergePolicy {
        strategy: MergeStrategy::parse(&r.strategy)?,
        keep_daily: r.has_keep_daily.then_some(r.keep_daily),
        keep_hourly: r.has_keep_hourly.then_some(r.keep_hourly),
        retain_labels: r.retain_labels,
        aggressive: r.aggressive,
    })
}

fn merge_rules_to_wire(p: MergePolicy) -> MergeRules {
    MergeRules {
        strategy: p.strategy.as_str().to_string(),
        keep_daily: p.keep_daily.unwrap_or_default(),
        has_keep_daily: p.keep_daily.is_some(),
        keep_hourly: p.keep_hourly.unwrap_or_default(),
        has_keep_hourly: p.keep_hourly.is_some(),
        retain_labels: p.retain_labels,
        aggressive: p.aggressive,
    }
}

fn schedule_to_wire(s: checkpoint::schedule::Schedule) -> Schedule {
    Schedule {
        id: s.id,
        namespace: s.namespace,
        container: s.container,
        interval_secs: s.interval_secs,
        labels: s.labels,
        compression: s.compression,
        backend: if s.storage.backend.is_empty() {
            "local".into()
        } else {
            s.storage.backend
        },
        created_unix: s.created_unix,
        last_run_unix: s.last_run_unix,
        last_checkpoint: s.last_checkpoint.unwrap_or_default(),
        last_error: s.last_error.unwrap_or_default(),
        runs: s.runs,
        failures: s.failures,
        automerge: s.automerge.map(merge_rules_to_wire),
    }
}

fn checkpoint_to_wire(c: checkpoint::Checkpoint) -> Checkpoint {
    Checkpoint {
        id: c.id,
        namespace: c.namespace,
        container: c.container,
        image: c.image,
        created_unix: c.created_unix,
        size: c.size,
        content_size: c.content_size,
        labels: c.labels.into_iter().collect(),
        parent: c.parent.unwrap_or_default(),
        status: c.status,
        compression: c.compression.as_str().to_string(),
        changed_entries: c.changed_entries,
        removed_entries: c.removed_entries,
        fs_only: c.fs_only,
        pause_time_ns: c.pause_ns,
        delta_digest: format!("sha256:{}", c.delta_digest),
        process: c.process.map(|p| ProcessState {
            frozen_time_us: p.stats.frozen_time_us,
            freezing_time_us: p.stats.freezing_time_us,
            memdump_time_us: p.stats.memdump_time_us,
            memwrite_time_us: p.stats.memwrite_time_us,
            pages_scanned: p.stats.pages_scanned,
            pages_skipped_parent: p.stats.pages_skipped_parent,
            pages_written: p.stats.pages_written,
            memory_bytes: p.memory_bytes,
            images_size: p.images_size,
            stored_bytes: p.stored_bytes,
            images: p.images,
            dump_log_key: p.dump_log_key,
            pre_dump: p.pre_dump,
            pre_dump_pages_written: p.pre_dump_pages_written,
            tcp_established: p.tcp_established,
            file_locks: p.file_locks,
            leave_running: p.leave_running,
            criu_version: p.criu_version,
        }),
        engine: c.engine,
    }
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
        container: job.container,
        namespace: job.namespace,
        error_cause: job.cause.map(|c| c.as_str().to_string()).unwrap_or_default(),
        total_time_ns: job.total.as_nanos() as u64,
    }
}

impl ControlService {
    /// ReceiveCheckpoint over any stream of its messages (the TCP API's
    /// filter passes its checked stream here).
    pub async fn receive<S>(&self, mut stream: S) -> Result<Response<ImportCheckpointResponse>, Status>
    where
        S: tokio_stream::Stream<Item = Result<ReceiveCheckpointRequest, Status>> + Unpin + Send,
    {
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;
        let path = self.checkpoints.stream_scratch("receive").map_err(checkpoint_status)?;
        let mut budget = self.checkpoints.receive_budget().map_err(checkpoint_status)?;
        let received = async {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .await
                .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
            let mut target = None;
            while let Some(message) = stream.next().await {
                let message = message?;
                if target.is_none() {
                    target = Some((storage_from_wire(message.storage), message.namespace));
                }
                budget.take(message.data.len()).map_err(checkpoint_status)?;
                file.write_all(&message.data)
                    .await
                    .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
            }
            file.flush()
                .await
                .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
            let (storage, namespace) = target.ok_or_else(|| Status::invalid_argument("no archive was sent"))?;
            self.checkpoints
                .import(&storage, &namespace, &path)
                .await
                .map_err(checkpoint_status)
        }
        .await;
        let _ = tokio::fs::remove_file(&path).await;
        Ok(Response::new(ImportCheckpointResponse {
            checkpoints: received?.into_iter().map(checkpoint_to_wire).collect(),
        }))
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

    async fn list_mounts(&self, _request: Request<ListMountsRequest>) -> Result<Response<ListMountsResponse>, Status> {
        let snapshotter = self.snapshotter.clone();
        let mounts = tokio::task::spawn_blocking(move || snapshotter.rafs_mounts())
            .await
            .map_err(|e| Status::internal(format!("listing RAFS mounts: {e}")))?
            .map_err(|e| Status::internal(format!("listing RAFS mounts: {e}")))?;
        Ok(Response::new(ListMountsResponse {
            mounts: mounts
                .into_iter()
                .map(super::control_convert::rafs_mount_to_wire)
                .collect(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(container = %request.get_ref().container))]
    async fn seamless_commit(
        &self,
        request: Request<SeamlessCommitRequest>,
    ) -> Result<Response<SeamlessCommitResponse>, Status> {
        let options = super::control_convert::commit_from_wire(request.into_inner()).map_err(commit_status)?;
        let started = self.commits.commit(options).await.map_err(commit_status)?;
        Ok(Response::new(SeamlessCommitResponse {
            snapshot_id: started.snapshot_id,
            pause_time_ns: started.pause.as_nanos() as u64,
            old_upper_dir: started.old_upper.display().to_string(),
            new_upper_dir: started.new_upper.display().to_string(),
            total_time_ns: started.total.as_nanos() as u64,
        }))
    }

    async fn get_commit(&self, request: Request<GetCommitRequest>) -> Result<Response<CommitJob>, Status> {
        let id = request.into_inner().snapshot_id;
        let job = self.commits.job(&id).map_err(commit_status)?;
        Ok(Response::new(job_to_wire(job)))
    }

    async fn list_commits(
        &self,
        request: Request<ListCommitsRequest>,
    ) -> Result<Response<ListCommitsResponse>, Status> {
        let r = request.into_inner();
        let state = match r.state.as_str() {
            "" => None,
            text => Some(text.parse::<JobState>().map_err(Status::invalid_argument)?),
        };
        let mut jobs = self.commits.jobs().map_err(commit_status)?;
        jobs.retain(|job| {
            job.namespace == r.namespace
                && (r.container.is_empty() || job.container == r.container)
                && state.is_none_or(|state| job.state == state)
        });
        // Newest first: the job a user is looking for is usually the last.
        jobs.reverse();
        if r.limit > 0 {
            jobs.truncate(r.limit as usize);
        }
        Ok(Response::new(ListCommitsResponse {
            jobs: jobs.into_iter().map(job_to_wire).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(container = %request.get_ref().container))]
    async fn create_checkpoint(
        &self,
        request: Request<CreateCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        let created = self
            .checkpoints
            .create(create_request_from_wire(request.into_inner()))
            .await
            .map_err(checkpoint_status)?;
        Ok(Response::new(checkpoint_to_wire(created)))
    }

    async fn schedule_checkpoints(
        &self,
        request: Request<ScheduleCheckpointsRequest>,
    ) -> Result<Response<ScheduleCheckpointsResponse>, Status> {
        let r = request.into_inner();
        let checkpoint = r.checkpoint.unwrap_or_default();
        let automerge = r
            .automerge
            .map(merge_rules_from_wire)
            .transpose()
            .map_err(checkpoint_status)?;
        let (schedule, first) = self
            .checkpoints
            .schedule(
                create_request_from_wire(checkpoint),
                std::time::Duration::from_secs(r.interval_secs),
                automerge,
            )
            .await
            .map_err(checkpoint_status)?;
        Ok(Response::new(ScheduleCheckpointsResponse {
            schedule: Some(schedule_to_wire(schedule)),
            first: Some(checkpoint_to_wire(first)),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        let namespace = request.into_inner().namespace;
        let schedules = self.checkpoints.list_schedules(&namespace).map_err(checkpoint_status)?;
        Ok(Response::new(ListSchedulesResponse {
            schedules: schedules.into_iter().map(schedule_to_wire).collect(),
        }))
    }

    async fn restore_checkpoint(
        &self,
        request: Request<RestoreCheckpointRequest>,
    ) -> Result<Response<RestoreCheckpointResponse>, Status> {
        // Applying an untrusted record is root on this host: only for a
        // caller of the unix socket, never a holder of the remote token.
        let local = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .is_some();
        let r = request.into_inner();
        if r.trust_record && !local {
            return Err(Status::permission_denied(
                "trust_record is honoured on the daemon's unix socket only",
            ));
        }
        let restored = self
            .checkpoints
            .restore(RestoreRequest {
                storage: storage_from_wire(r.storage),
                namespace: r.namespace,
                id: r.id,
                name: Some(r.name).filter(|n| !n.is_empty()),
                resume: r.resume,
                parallel: if r.parallel == 0 {
                    restore::DEFAULT_PARALLEL
                } else {
                    r.parallel as usize
                },
                validate: r.validate,
                network_remap: r
                    .network_remap
                    .iter()
                    .map(|spec| checkpoint::remap::Remap::parse(spec))
                    .collect::<Result<_, _>>()
                    .map_err(|reason| Status::invalid_argument(format!("network remap: {reason}")))?,
                trust_record: r.trust_record,
                criu_path: Some(r.criu_path).filter(|p| !p.is_empty()),
            })
            .await
            .map_err(checkpoint_status)?;
        Ok(Response::new(RestoreCheckpointResponse {
            container: restored.container,
            pid: restored.pid,
            status: restored.status,
            process_restored: restored.process_restored,
            checks: restored
                .checks
                .into_iter()
                .map(|c| RestoreCheck {
                    name: c.name,
                    ok: c.ok,
                    detail: c.detail,
                })
                .collect(),
            duration_ns: restored.duration.as_nanos() as u64,
            restore_log: restored
                .restore_log
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            blobs_fetched: restored.blobs_fetched,
        }))
    }

    type SendCheckpointStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ArchiveChunk, Status>> + Send + 'static>>;

    async fn send_checkpoint(
        &self,
        request: Request<SendCheckpointRequest>,
    ) -> Result<Response<Self::SendCheckpointStream>, Status> {
        let r = request.into_inner();
        let path = self.checkpoints.stream_scratch("send").map_err(checkpoint_status)?;
        let exported = self
            .checkpoints
            .export(ExportRequest {
                storage: storage_from_wire(r.storage),
                namespace: r.namespace,
                id: r.id,
                path: path.clone(),
                overwrite: false,
            })
            .await
            .map_err(checkpoint_status)?;
        let mut file = tokio::fs::File::open(&exported.path)
            .await
            .map_err(|e| Status::internal(format!("{}: {e}", exported.path.display())))?;
        // Unlinked while open: the archive goes when the stream does.
        let _ = tokio::fs::remove_file(&exported.path).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            loop {
                let mut data = vec![0u8; 1 << 20];
                let chunk = match file.read(&mut data).await {
                    Ok(0) => return,
                    Ok(n) => {
                        data.truncate(n);
                        Ok(ArchiveChunk { data })
                    }
                    Err(e) => Err(Status::internal(format!("reading the archive: {e}"))),
                };
                let failed = chunk.is_err();
                // The receiver went away: nothing more to send.
                if tx.send(chunk).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn receive_checkpoint(
        &self,
        request: Request<tonic::Streaming<ReceiveCheckpointRequest>>,
    ) -> Result<Response<ImportCheckpointResponse>, Status> {
        self.receive(request.into_inner()).await
    }

    async fn resume_container(
        &self,
        request: Request<ResumeContainerRequest>,
    ) -> Result<Response<ResumeContainerResponse>, Status> {
        let r = request.into_inner();
        let resumed = if r.engine == checkpoint::catalogue::ENGINE_DOCKER {
            self.checkpoints.resume_docker(&r.container).await
        } else {
            self.checkpoints.resume_container(&r.namespace, &r.container).await
        };
        let (pid, status, previous_status) = resumed.map_err(checkpoint_status)?;
        Ok(Response::new(ResumeContainerResponse {
            pid,
            status,
            previous_status,
        }))
    }

    async fn container_stats(
        &self,
        request: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        let r = request.into_inner();
        let samples = self
            .checkpoints
            .container_stats(&r.namespace, &r.containers)
            .await
            .map_err(checkpoint_status)?;
        Ok(Response::new(ContainerStatsResponse {
            containers: samples
                .into_iter()
                .map(|s| ContainerSample {
                    id: s.id,
                    labels: s.labels.into_iter().collect(),
                    cpu_usage_ns: s.cpu_usage_ns,
                    sampled_unix_ns: s.sampled_unix_ns,
                    memory_bytes: s.memory_bytes,
                    memory_limit_bytes: s.memory_limit_bytes,
                    memory_limited: s.memory_limited,
                    status: s.status,
                })
                .collect(),
        }))
    }

    async fn remove_schedule(
        &self,
        request: Request<RemoveScheduleRequest>,
    ) -> Result<Response<RemoveScheduleResponse>, Status> {
        let r = request.into_inner();
        self.checkpoints
            .remove_schedule(&r.namespace, &r.id)
            .map_err(checkpoint_status)?;
        Ok(Response::new(RemoveScheduleResponse {}))
    }

    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let r = request.into_inner();
        let listed = self
            .checkpoints
            .list(&storage_from_wire(r.storage), &r.namespace, &r.container, &r.filter)
            .await
            .map_err(checkpoint_status)?;
        Ok(Response::new(ListCheckpointsResponse {
            checkpoints: listed.into_iter().map(checkpoint_to_wire).collect(),
        }))
    }

    async fn inspect_checkpoint(
        &self,
        request: Request<InspectCheckpointRequest>,
    ) -> Result<Response<InspectCheckpointResponse>, Status> {
        let r = request.into_inner();
        let other = Some(r.diff_with.as_str()).filter(|o| !o.is_empty());
        let storage = storage_from_wire(r.storage);
        let found = self
            .checkpoints
            .inspect(&storage, &r.namespace, &r.id, other, r.verify)
            .await
            .map_err(checkpoint_status)?;
        let dump_log = if r.dump_log {
            self.checkpoints
                .dump_log(&storage, &r.namespace, &r.id)
                .await
                .map_err(checkpoint_status)?
        } else {
            String::new()
        };
        Ok(Response::new(InspectCheckpointResponse {
            checkpoint: Some(checkpoint_to_wire(found.checkpoint)),
            chain: found.chain,
            blobs: found.blobs as u64,
            diff: found.diff.map(|d| Diff {
                added: d.added,
                changed: d.changed,
                removed: d.removed,
                size_delta: d.size_delta,
            }),
            verification: found
                .verification
                .map(|(checked, failures)| Verification { checked, failures }),
            dump_log,
        }))
    }

    async fn prune_checkpoints(
        &self,
        request: Request<PruneCheckpointsRequest>,
    ) -> Result<Response<PruneCheckpointsResponse>, Status> {
        let r = request.into_inner();
        let policy = PrunePolicy {
            keep_latest: r.has_keep_latest.then_some(r.keep_latest),
            keep_days: r.has_keep_days.then_some(r.keep_days),
            exclude_labels: r.exclude_labels,
            max_storage: r.has_max_storage.then_some(r.max_storage),
            prune_dangling: r.prune_dangling,
        };
        let plan = self
            .checkpoints
            .prune(
                &storage_from_wire(r.storage),
                &r.namespace,
                &r.container,
                policy,
                r.dry_run,
            )
            .await
            .map_err(checkpoint_status)?;
        Ok(Response::new(PruneCheckpointsResponse {
            removed: plan.removed,
            folded: plan.folded,
            freed_bytes: plan.freed_bytes,
            dry_run: r.dry_run,
        }))
    }

    async fn merge_checkpoints(
        &self,
        request: Request<MergeCheckpointsRequest>,
    ) -> Result<Response<MergeCheckpointsResponse>, Status> {
        let r = request.into_inner();
        let strategy =
            MergeStrategy::parse(&r.strategy).map_err(|e| checkpoint_status(CheckpointError::Catalogue(e)))?;
        let policy = MergePolicy {
            strategy,
            keep_daily: r.has_keep_daily.then_some(r.keep_daily),
            keep_hourly: r.has_keep_hourly.then_some(r.keep_hourly),
            retain_labels: r.retain_labels,
            aggressive: r.aggressive,
        };
        let plan = self
            .checkpoints
            .merge(
                &storage_from_wire(r.storage),
                &r.namespace,
                &r.container,
                policy,
                r.dry_run,
            )
            .await
            .map_err(checkpoint_status)?;
        Ok(Response::new(MergeCheckpointsResponse {
            kept: plan.kept.into_iter().map(|(id, why)| format!("{id}: {why}")).collect(),
            merged: plan.merged,
            rebased: plan.rebased,
            freed_bytes: plan.freed_bytes,
            dry_run: r.dry_run,
        }))
    }

    #[instrument(level = "debug", skip_all, fields(id = %request.get_ref().id))]
    async fn export_checkpoint(
        &self,
        request: Request<ExportCheckpointRequest>,
    ) -> Result<Response<ExportCheckpointResponse>, Status> {
        let r = request.into_inner();
        let exported = self
            .checkpoints
            .export(ExportRequest {
                storage: storage_from_wire(r.storage),
                namespace: r.namespace,
                id: r.id,
                path: PathBuf::from(r.path),
                overwrite: r.overwrite,
            })
            .await
            .map_err(checkpoint_status)?;
        Ok(Response::new(ExportCheckpointResponse {
            path: exported.path.display().to_string(),
            bytes: exported.bytes,
            layers: exported.layers,
            reference: exported.reference,
            manifest_digest: exported.manifest_digest,
        }))
    }

    #[instrument(level = "debug", skip_all, fields(path = %request.get_ref().path))]
    async fn import_checkpoint(
        &self,
        request: Request<ImportCheckpointRequest>,
    ) -> Result<Response<ImportCheckpointResponse>, Status> {
        let r = request.into_inner();
        let storage = storage_from_wire(r.storage);
        let path = std::path::Path::new(&r.path);
        let imported = if r.docker_dir {
            vec![self
                .checkpoints
                .import_docker_dir(&storage, &r.namespace, path, &r.labels)
                .await
                .map_err(checkpoint_status)?]
        } else {
            self.checkpoints
                .import(&storage, &r.namespace, path)
                .await
                .map_err(checkpoint_status)?
        };
        Ok(Response::new(ImportCheckpointResponse {
            checkpoints: imported.into_iter().map(checkpoint_to_wire).collect(),
        }))
    }
}
