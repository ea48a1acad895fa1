//! Docker Engine containers in the catalogue (`checkpointctl --engine
//! docker`): created from a running container of the engine (its overlay2
//! upper copied while frozen, its processes dumped by the engine's runc
//! while it stays frozen), restored as a new container of the engine, and
//! imported from a `docker-checkpoint` directory. Stored like every other
//! checkpoint (chunks, parents, labels, sealing, list/prune/merge), with
//! `engine: docker` and the engine's inspect answer as the record, which a
//! restore reads field by field (`docker::record`) instead of through the
//! seal of containerd records: nothing in it can ask for more of the host
//! than its own namespaces.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tracing::{info, instrument, warn};

use super::catalogue::{Catalogue, Checkpoint, Compression, NewCheckpoint, ProcessState, ENGINE_DOCKER};
use super::restore::{RestoreCheck, RestoreRequest, Restored};
use super::{catalogue, process, CheckpointError, CheckpointService, CreateRequest};
use crate::docker::criu_config::RUNC_CRIU_CONFIG;
use crate::docker::layout::CheckpointDir;
use crate::docker::restore::{restore_through_engine, EnginePlan};
use crate::docker::{DockerCheckpointError, RunningContainer};
use crate::error::ErrorKind;
use crate::host::docker::DockerClient;

fn task<E: std::fmt::Display>(e: E) -> CheckpointError {
    CheckpointError::Task(e.to_string())
}

impl CheckpointService {
    fn docker_engine(&self) -> DockerClient {
        DockerClient::new(&self.settings.docker_socket)
    }

    /// Where restores keep the lock over runc's CRIU options file.
    fn docker_state(&self) -> PathBuf {
        self.root.join("docker")
    }

    /// `create` of a Docker Engine container (by name, id or id prefix).
    #[instrument(skip_all, fields(namespace = %request.namespace, container = %request.container))]
    pub(super) async fn create_docker(&self, request: CreateRequest) -> Result<Checkpoint, CheckpointError> {
        let labels = catalogue::parse_labels(&request.labels)?;
        let compression = Compression::parse(&request.compression)?;
        if let Some(parent) = &request.parent {
            catalogue::validate_id(parent)?;
        }
        if request.pre_dump {
            return Err(CheckpointError::Unsupported(
                "--pre-dump is not taken with --engine docker: the container is held frozen from the copy of its \
                 writable layer to the end of its dump, and Docker's engine restores from one image directory"
                    .into(),
            ));
        }
        if request.fs_only && request.tcp_established {
            return Err(CheckpointError::Invalid(
                "--tcp-established is an option of process-state checkpoints; it cannot go with --fs-only".into(),
            ));
        }
        let settings = self.settings.criu_for(request.criu_path.as_deref())?;
        let catalogue = self.catalogue(&request.storage)?;
        let engine = self.docker_engine();
        let container = RunningContainer::find(&engine, &request.container).await?;
        let (anon, _) = crate::host::cgroup::memory_of(container.pid)?.usage()?;
        if !request.fs_only && request.memory_limit > 0 && anon > request.memory_limit {
            return Err(CheckpointError::MemoryLimit {
                container: container.name.clone(),
                used: anon,
                used_mib: anon >> 20,
                limit: request.memory_limit,
                limit_mib: request.memory_limit >> 20,
            });
        }
        let _writing = self.writing.lock().await;
        let id = {
            let catalogue = catalogue.clone();
            tokio::task::spawn_blocking(move || catalogue.new_id(SystemTime::now()))
                .await
                .map_err(task)??
        };
        if let Some(parent) = &request.parent {
            let found = {
                let (catalogue, parent) = (catalogue.clone(), parent.clone());
                tokio::task::spawn_blocking(move || catalogue.get(&parent))
                    .await
                    .map_err(task)??
            };
            if found.container != container.name
                || found.namespace != request.namespace
                || found.engine != ENGINE_DOCKER
            {
                return Err(CheckpointError::Invalid(format!(
                    "parent {parent} is not a checkpoint of the Docker container {} in namespace {}",
                    container.name, request.namespace
                )));
            }
        }
        let freezer = crate::host::cgroup::freezer_of(container.pid)?;
        let work = self
            .root
            .join("checkpoint-work")
            .join(format!("docker-{id}-{}", std::process::id()));
        let capture_service = self.capture.clone();
        let settings = crate::host::criu::CriuSettings {
            runc: container.runc.clone(),
            runc_root: container.runc_root.clone(),
            ..settings
        };
        let result = tokio::task::spawn_blocking(move || {
            let result = (|| {
                fs::create_dir_all(&work).map_err(task)?;
                fs::set_permissions(&work, fs::Permissions::from_mode(0o700)).map_err(task)?;
                let layer = container
                    .upper
                    .parent()
                    .ok_or_else(|| CheckpointError::Invalid("the container's upper directory has no parent".into()))?;
                let capture = work.join("capture");
                let (captured, hold) = capture_service.capture_foreign_and_hold(
                    &format!("docker-{id}"),
                    layer,
                    "diff",
                    &capture,
                    &freezer,
                )?;
                let mut new = NewCheckpoint {
                    namespace: request.namespace.clone(),
                    container: container.name.clone(),
                    image: crate::docker::image_of(&container.inspect),
                    labels,
                    parent: request.parent.clone(),
                    compression,
                    pause: captured.pause,
                    process: None,
                    container_key: None,
                    engine: ENGINE_DOCKER.into(),
                };
                let mut stop_when_stored = None;
                if request.fs_only {
                    new.pause = hold.thaw()?;
                } else {
                    let dump_work = work.join("criu");
                    fs::create_dir_all(&dump_work).map_err(task)?;
                    let input = process::DumpInput {
                        settings: &settings,
                        namespace: &container.runc_namespace,
                        container: &container.id,
                        work: &dump_work,
                        parent_images: Vec::new(),
                        pre_dump: false,
                        leave_running: request.leave_running,
                        // Held frozen by us from the copy of its layer: CRIU
                        // leaves it so, the hold thaws or stops it.
                        stopped_by_caller: true,
                        tcp_established: request.tcp_established,
                        file_locks: request.file_locks,
                        memory_bytes: anon,
                        process_identity: process::process_identity(container.pid),
                        compression,
                        consume_images: true,
                    };
                    // A failed dump drops the hold, which thaws.
                    let plan = process::dump(&catalogue, &input, &mut |_| Ok(()))?;
                    if request.leave_running {
                        new.pause = hold.thaw()?;
                    } else {
                        stop_when_stored = Some(hold);
                    }
                    new.process = Some(process::store_dump(&catalogue, &dump_work, &plan)?);
                }
                let record = serde_json::to_vec(&container.inspect).map_err(task)?;
                new.container_key = Some(process::store_bytes(&catalogue, &record, Compression::Zstd, "record")?);
                let checkpoint = catalogue.create(&id, &capture.join(crate::capture::SNAPSHOT_UPPER), &new)?;
                if let Some(hold) = stop_when_stored {
                    hold.kill_and_thaw().map_err(|e| {
                        CheckpointError::Task(format!("checkpoint {} is stored, but {e}", checkpoint.id))
                    })?;
                }
                Ok::<_, CheckpointError>(checkpoint)
            })();
            if let Err(e) = fs::remove_dir_all(&work) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(work = %work.display(), error = %e, "checkpoint scratch directory left for the next start");
                }
            }
            result
        })
        .await
        .map_err(task)?;
        let checkpoint = result?;
        info!(
            id = checkpoint.id,
            size = checkpoint.size,
            "checkpoint of a Docker container created"
        );
        Ok(checkpoint)
    }

    /// `restore` of a Docker container's checkpoint: a new container of the
    /// engine named `request.name` (default `<container>-restored`).
    pub(super) async fn restore_docker(
        &self,
        request: &RestoreRequest,
        catalogue: Catalogue,
        checkpoint: Checkpoint,
    ) -> Result<Restored, CheckpointError> {
        let started = Instant::now();
        let name = request
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-restored", checkpoint.container));
        super::restore::validate_container_id(&name)?;
        let Some(record_key) = checkpoint.container_key.clone() else {
            return Err(CheckpointError::Invalid(format!(
                "checkpoint {} holds no container record: it cannot be restored as a container",
                checkpoint.id
            )));
        };
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let work = self.root.join("restore-work").join(format!("{name}-{stamp}"));
        let fetched = {
            let (catalogue, checkpoint, work, parallel, validate) = (
                catalogue.clone(),
                checkpoint.clone(),
                work.clone(),
                request.parallel,
                request.validate,
            );
            tokio::task::spawn_blocking(move || {
                fetch_docker(&catalogue, &checkpoint, &record_key, &work, parallel, validate)
            })
            .await
            .map_err(task)?
        };
        let (body, images_dir, images, tty) = match fetched {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        let engine = self.docker_engine();
        let state = self.docker_state();
        let plan = EnginePlan {
            body: &body,
            new_name: &name,
            checkpoint_name: &checkpoint.id,
            images_dir: &images_dir,
            images: &images,
            state_root: &state,
            runc_criu_config: Path::new(RUNC_CRIU_CONFIG),
        };
        let mut lines = Vec::new();
        let restored = {
            let (catalogue, checkpoint) = (catalogue.clone(), checkpoint.clone());
            restore_through_engine(
                &engine,
                &plan,
                move |upper| {
                    super::restore::write_checkpoint_tree(&catalogue, &checkpoint, upper).map_err(|e| {
                        DockerCheckpointError::Copy {
                            what: "the checkpoint's writable layer".into(),
                            message: e.to_string(),
                        }
                    })
                },
                &mut lines,
            )
            .await
        };
        for line in &lines {
            info!(container = name, "{line}");
        }
        let _ = fs::remove_dir_all(&work);
        let restored = restored?;
        let restore_log = restored.criu_log.as_ref().and_then(|text| {
            let dir = self.root.join("restore-logs");
            let kept = dir.join(format!("{name}-{stamp}.restore.log"));
            fs::create_dir_all(&dir)
                .map_err(task)
                .and_then(|()| super::restore::write_private(&kept, text.as_bytes()))
                .map_err(|e| warn!(error = %e, "cannot keep restore.log"))
                .ok()
                .map(|()| kept)
        });
        let checks = if request.validate {
            crate::docker::verify(&engine, &restored.id, tty)
                .await
                .checks
                .into_iter()
                .map(|c| RestoreCheck {
                    name: c.name.to_string(),
                    ok: c.ok,
                    detail: c.detail,
                })
                .collect()
        } else {
            Vec::new()
        };
        // As every restore: paused until `checkpointctl resume` (the
        // engine's pause: `docker unpause` resumes it too), unless --resume.
        if !request.resume {
            engine.pause(&restored.id).await.map_err(DockerCheckpointError::from)?;
        }
        let inspect = engine.inspect(&restored.id).await.ok();
        let state_of = |key: &str| {
            inspect
                .as_ref()
                .and_then(|i| i.get("State"))
                .and_then(|s| s.get(key))
                .cloned()
        };
        let pid = state_of("Pid").and_then(|p| p.as_u64()).unwrap_or(0) as u32;
        let status = state_of("Status")
            .and_then(|s| s.as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        if !request.network_remap.is_empty() {
            warn!("--network-remap is not applied to Docker containers: the engine gives the new one its network");
        }
        Ok(Restored {
            container: name,
            pid,
            status,
            process_restored: !images.is_empty(),
            checks,
            duration: started.elapsed(),
            restore_log,
            blobs_fetched: 1 + checkpoint.process.as_ref().map_or(0, |p| p.images.len() as u64),
        })
    }

    /// `resume` of a Docker container that a restore left paused: the
    /// engine unpauses it. Returns its pid, status now and status before.
    pub async fn resume_docker(&self, container: &str) -> Result<(u32, String, String), CheckpointError> {
        let engine = self.docker_engine();
        let status = |inspect: &Value| {
            let state = inspect.get("State");
            (
                state.and_then(|s| s.get("Pid")).and_then(Value::as_u64).unwrap_or(0) as u32,
                state
                    .and_then(|s| s.get("Status"))
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
            )
        };
        let (_, before) = status(&engine.inspect(container).await.map_err(DockerCheckpointError::from)?);
        match before.as_str() {
            "paused" => engine.unpause(container).await.map_err(DockerCheckpointError::from)?,
            "running" => {}
            other => {
                return Err(CheckpointError::Unsupported(format!(
                    "Docker container {container} is {other}: only a paused one can be resumed"
                )))
            }
        }
        let (pid, now) = status(&engine.inspect(container).await.map_err(DockerCheckpointError::from)?);
        info!(container, from = %before, to = %now, pid, "Docker container resumed");
        Ok((pid, now, before))
    }

    /// Stores the `docker-checkpoint` directory `path`
    /// (`<dir>/<container>/<name>`) as a checkpoint of the catalogue, after
    /// checking it as a restore from it would.
    #[instrument(skip_all, fields(namespace = %namespace, path = %path.display()))]
    pub async fn import_docker_dir(
        &self,
        storage: &super::StorageSpec,
        namespace: &str,
        path: &Path,
        labels: &[String],
    ) -> Result<Checkpoint, CheckpointError> {
        crate::host::containerd::validate_namespace(namespace).map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        let labels = catalogue::parse_labels(labels)?;
        let (Some(name), Some(container), Some(base)) = (
            path.file_name().and_then(|n| n.to_str()),
            path.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()),
            path.parent().and_then(Path::parent),
        ) else {
            return Err(CheckpointError::Invalid(format!(
                "{}: name a checkpoint directory, <dir>/<container>/<name>",
                path.display()
            )));
        };
        let dir = CheckpointDir::open(base, container, name)?;
        let catalogue = self.catalogue(storage)?;
        let _writing = self.writing.lock().await;
        let namespace = namespace.to_string();
        let container = container.to_string();
        let scratch = self
            .root
            .join("checkpoint-work")
            .join(format!("docker-import-{}", std::process::id()));
        tokio::task::spawn_blocking(move || {
            let result = import_dir(&catalogue, &dir, &scratch, namespace, container, labels);
            let _ = fs::remove_dir_all(&scratch);
            result
        })
        .await
        .map_err(task)?
    }
}

/// What a Docker restore needs fetched: the create body, CRIU's files
/// (flat, in the returned directory) and whether the container had a
/// terminal.
fn fetch_docker(
    catalogue: &Catalogue,
    checkpoint: &Checkpoint,
    record_key: &str,
    work: &Path,
    parallel: usize,
    validate: bool,
) -> Result<(Value, PathBuf, Vec<String>, bool), CheckpointError> {
    let record_path = super::restore::fetch_record(catalogue, checkpoint, record_key, work, validate)?;
    let record = crate::docker::restore::read_record(&record_path)?;
    let body = crate::docker::record::create_body(&record).map_err(|reason| CheckpointError::Restore {
        step: "record",
        reason: format!("checkpoint {}: {reason}", checkpoint.id),
        log: String::new(),
        kind: ErrorKind::FailedPrecondition,
    })?;
    let tty = crate::docker::tty_of(&record);
    let Some(state) = &checkpoint.process else {
        return Ok((body, work.join("images"), Vec::new(), tty));
    };
    if state.images.len() != 1 {
        return Err(CheckpointError::Unsupported(format!(
            "checkpoint {}'s processes are stored as {} image sets (a pre-dump and its parents): Docker's engine \
             restores from one directory",
            checkpoint.id,
            state.images.len()
        )));
    }
    let dirs = process::unpack_images(catalogue, &state.images, &work.join("images"), parallel)?;
    let images_dir = dirs
        .last()
        .cloned()
        .ok_or_else(|| CheckpointError::Task("no image directory".into()))?;
    let mut images = Vec::new();
    for entry in fs::read_dir(&images_dir).map_err(task)? {
        let entry = entry.map_err(task)?;
        if let Some(name) = entry.file_name().to_str() {
            images.push(name.to_string());
        }
    }
    images.sort();
    Ok((body, images_dir, images, tty))
}

/// Stores the checked directory `dir` as a new checkpoint.
fn import_dir(
    catalogue: &Catalogue,
    dir: &CheckpointDir,
    scratch: &Path,
    namespace: String,
    container: String,
    labels: std::collections::BTreeMap<String, String>,
) -> Result<Checkpoint, CheckpointError> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    dir.check_sums(threads)?;
    let record_path = dir.join(crate::docker::layout::RECORD);
    let record = crate::docker::restore::read_record(&record_path)?;
    crate::docker::record::create_body(&record)
        .map_err(|reason| CheckpointError::Invalid(format!("{}: {reason}", record_path.display())))?;
    let rootfs = dir.join(crate::docker::layout::ROOTFS_DIFF);
    crate::docker::restore::check_layer(&rootfs)?;
    let files = dir.criu_files()?;
    if !files.iter().any(|f| f.starts_with("core-") && f.ends_with(".img")) {
        return Err(CheckpointError::Invalid(format!(
            "{} holds no CRIU images (core-*.img)",
            dir.path().display()
        )));
    }
    // CRIU's files alone, in a directory of their own, as stored dumps are.
    let images = scratch.join("images");
    fs::create_dir_all(&images).map_err(task)?;
    for name in &files {
        let (from, to) = (dir.join(name), images.join(name));
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(task)?;
        }
    }
    let stats = crate::host::criu::read_stats(dir.path(), &images).unwrap_or_default();
    let (images_key, images_size, written) = process::store_images(catalogue, &images, Compression::Zstd, true)?;
    let dump_log = fs::read(dir.join(crate::docker::layout::DUMP_LOG)).unwrap_or_default();
    let dump_log_key = process::store_bytes(catalogue, &dump_log, Compression::Zstd, "dump-log")?;
    let needs = crate::docker::criu_config::restore_options(&files);
    let id = catalogue.new_id(SystemTime::now())?;
    let new = NewCheckpoint {
        namespace,
        container,
        image: crate::docker::image_of(&record),
        labels,
        parent: None,
        compression: Compression::Zstd,
        pause: Duration::ZERO,
        process: Some(ProcessState {
            images: vec![images_key],
            dump_log_key,
            stats,
            memory_bytes: 0,
            images_size,
            stored_bytes: written,
            pre_dump: false,
            pre_dump_pages_written: 0,
            tcp_established: needs.contains(&"tcp-established"),
            file_locks: needs.contains(&"file-locks"),
            leave_running: true,
            criu_version: String::new(),
            process_identity: String::new(),
        }),
        container_key: Some(process::store_bytes(
            catalogue,
            &serde_json::to_vec(&record).map_err(task)?,
            Compression::Zstd,
            "record",
        )?),
        engine: ENGINE_DOCKER.into(),
    };
    let checkpoint = catalogue.create(&id, &rootfs, &new)?;
    info!(id = checkpoint.id, "docker-checkpoint directory imported");
    Ok(checkpoint)
}
