//! Creating a checkpoint: the capture of the container's writable layer
//! through the capture service, then (unless filesystem only) the dump of
//! its processes by CRIU while it is held frozen or journaled, and storing
//! both in the catalogue. The rules of who may stop the container, and when,
//! are written here once.

use super::*;

impl CheckpointService {
    /// Captures the container's writable layer and, unless `fs_only`, dumps
    /// its processes; stores both.
    #[instrument(skip_all, fields(namespace = %request.namespace, container = %request.container))]
    pub async fn create(&self, request: CreateRequest) -> Result<Checkpoint, CheckpointError> {
        crate::host::containerd::validate_namespace(&request.namespace)
            .map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        match request.engine.as_str() {
            "" | "containerd" => {}
            catalogue::ENGINE_DOCKER => return self.create_docker(request).await,
            other => {
                return Err(CheckpointError::Invalid(format!(
                    "engine {other:?}: containerd or docker"
                )))
            }
        }
        let labels = catalogue::parse_labels(&request.labels)?;
        let compression = Compression::parse(&request.compression)?;
        if let Some(parent) = &request.parent {
            catalogue::validate_id(parent)?;
        }
        if request.fs_only {
            if let Some(option) = request.process_option() {
                return Err(CheckpointError::Invalid(format!(
                    "{option} is an option of process-state checkpoints; it cannot go with --fs-only"
                )));
            }
        }
        // CRIU runs only for process state: a filesystem-only checkpoint
        // ignores the caller's choice of binary.
        let settings = if request.fs_only {
            self.settings.criu.clone()
        } else {
            self.settings.criu_for(request.criu_path.as_deref())?
        };
        let catalogue = self.catalogue(&request.storage)?;
        // Without the kernel's dirty-page tracking CRIU cannot tell which
        // pages changed since an earlier dump: no pre-dump, and every dump
        // holds all the memory.
        let dirty_tracking = !request.fs_only
            && *self
                .dirty_tracking
                .get_or_try_init(|| {
                    let settings = settings.clone();
                    async move {
                        tokio::task::spawn_blocking(move || settings.dirty_tracking())
                            .await
                            .map_err(|e| CheckpointError::Task(e.to_string()))
                    }
                })
                .await?;
        if request.pre_dump && !dirty_tracking {
            return Err(CheckpointError::Unsupported(
                "--pre-dump needs the kernel to track dirtied pages (CONFIG_MEM_SOFT_DIRTY), and this kernel does \
                 not (`criu check --feature mem_dirty_track` fails): checkpoint without --pre-dump"
                    .into(),
            ));
        }
        let containerd = crate::host::containerd::Containerd::connect(self.capture.containerd_address()).await?;
        let _writing = self.writing.lock().await;
        // Storage calls block (S3 drives its client on this thread).
        let id = {
            let catalogue = catalogue.clone();
            tokio::task::spawn_blocking(move || catalogue.new_id(SystemTime::now()))
                .await
                .map_err(|e| CheckpointError::Task(e.to_string()))??
        };
        // The memory limit is checked before anything is captured or dumped.
        let mut memory_bytes = 0;
        if !request.fs_only {
            let found = containerd.resolve(&request.namespace, &request.container).await?;
            let (anon, _) = crate::host::cgroup::memory_of(found.pid)?.usage()?;
            if request.memory_limit > 0 && anon > request.memory_limit {
                return Err(CheckpointError::MemoryLimit {
                    container: found.id,
                    used: anon,
                    used_mib: anon >> 20,
                    limit: request.memory_limit,
                    limit_mib: request.memory_limit >> 20,
                });
            }
            memory_bytes = anon;
        }
        let capture_name = {
            let mut n = self.created.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            format!("checkpoint-{}-{n}", std::process::id())
        };
        // --pre-freeze: the container stays frozen from the capture of its
        // disk to the end of its memory dump, so that both are of one
        // instant (CRIU finds it frozen and leaves it so).
        // --leave-running=false: held frozen the same way, dumped with CRIU
        // leaving it so, and stopped here only once the checkpoint is
        // stored: a failure (or a killed daemon, whose successor thaws it)
        // in between loses neither the container nor its checkpoint. Not
        // with --tcp-established: a process killed outside CRIU closes its
        // connections, so there CRIU stops it as it dumps, and the dump is
        // journaled instead (see `journal`): a killed daemon's successor
        // stores it.
        let stop_after_store = !request.leave_running && !request.fs_only && !request.tcp_established;
        let hold = (request.pre_freeze || stop_after_store) && !request.fs_only;
        // The journal's secrets are sealed with the daemon's key: opened
        // before anything is captured, so that a bad key refuses early.
        let journal_key = if !request.fs_only && !request.leave_running && !stop_after_store {
            Some(schedule::SecretsKey::open_or_create(&self.root)?)
        } else {
            None
        };
        let journal_dir = self.root.join("checkpoint-work");
        let mut captured = self
            .capture
            .capture(&request.namespace, &request.container, &capture_name, hold)
            .await?;
        let held = captured.hold.take();
        let capture = captured.captured.snapshot.clone();
        let capture_service = self.capture.clone();
        let remove_capture = {
            let capture_service = capture_service.clone();
            let capture = capture.clone();
            move || capture_service.remove(&capture)
        };
        let container_id = captured.container.id.clone();
        let prepared = self
            .prepare_create(&containerd, &catalogue, &request, &container_id, captured.container.pid)
            .await;
        let (parent, record) = match prepared {
            Ok(p) => p,
            Err(e) => {
                drop(held);
                remove_capture();
                return Err(e);
            }
        };
        let mut new = NewCheckpoint {
            namespace: request.namespace.clone(),
            container: container_id.clone(),
            image: captured.container.image.clone(),
            labels,
            parent: request.parent.clone(),
            compression,
            pause: captured.captured.pause,
            process: None,
            container_key: None,
            engine: String::new(),
        };
        // Without a freezer (no cgroup found) there is nothing to guard.
        let freezer = if request.fs_only {
            None
        } else {
            crate::host::cgroup::freezer_of(captured.container.pid).ok()
        };
        let work = self
            .root
            .join("checkpoint-work")
            .join(format!("criu-{id}-{}", std::process::id()));
        let result = tokio::task::spawn_blocking(move || {
            // The journal written before the dump, if any.
            let mut journaled: Option<PathBuf> = None;
            let result = (|| {
                let json = serde_json::to_vec(&record).map_err(|e| CheckpointError::Task(e.to_string()))?;
                new.container_key = Some(process::store_bytes(&catalogue, &json, Compression::Zstd, "record")?);
                // Both live until the checkpoint is stored (see above).
                let mut stop_when_stored = None;
                let mut dump_guard = None;
                if !request.fs_only {
                    std::fs::create_dir_all(&work)
                        .map_err(|e| CheckpointError::Task(format!("{}: {e}", work.display())))?;
                    // Pages the parent's dump holds are reused only when it
                    // dumped this very process, and the kernel tracks what
                    // it dirtied since.
                    let parent_images = parent
                        .as_ref()
                        .filter(|_| dirty_tracking)
                        .and_then(|p| p.process.as_ref())
                        .filter(|p| !p.process_identity.is_empty() && p.process_identity == record.process_identity)
                        .map(|p| p.images.clone())
                        .unwrap_or_default();
                    // CRIU freezes the container itself; if the dump is
                    // killed (its timeout, the daemon's death) the container
                    // is thawed here, or by the next start.
                    if let Some(freezer) = &freezer {
                        dump_guard = Some(
                            capture_service
                                .thaw_on_release(&format!("{capture_name}-dump"), freezer)
                                .map_err(|e| CheckpointError::Task(e.to_string()))?,
                        );
                    }
                    let input = process::DumpInput {
                        settings: &settings,
                        namespace: &request.namespace,
                        container: &record.id,
                        work: &work,
                        parent_images,
                        pre_dump: request.pre_dump,
                        leave_running: request.leave_running,
                        stopped_by_caller: stop_after_store,
                        tcp_established: request.tcp_established,
                        file_locks: request.file_locks,
                        memory_bytes,
                        process_identity: record.process_identity.clone(),
                        compression,
                        // A journaled dump must stay whole until stored.
                        consume_images: journal_key.is_none(),
                    };
                    let dumped = {
                        let new = &new;
                        let mut write_journal = |plan: &process::DumpPlan| -> Result<(), process::ProcessError> {
                            if let Some(key) = &journal_key {
                                let pending = journal::PendingCheckpoint::new(
                                    &id,
                                    &request.storage,
                                    new,
                                    &capture,
                                    &work,
                                    plan.clone(),
                                );
                                journaled = Some(pending.write(&journal_dir, key)?);
                                journal::failpoint(journal::Failpoint::BeforeDump);
                            }
                            Ok(())
                        };
                        process::dump(&catalogue, &input, &mut write_journal)
                    };
                    if dumped.is_ok() {
                        journal::failpoint(journal::Failpoint::AfterDump);
                    }
                    match held {
                        Some(held) if stop_after_store => stop_when_stored = Some(held),
                        // The pause is the whole frozen time.
                        Some(held) => new.pause = held.thaw().map_err(|e| CheckpointError::Task(e.to_string()))?,
                        None => {}
                    }
                    new.process = Some(process::store_dump(&catalogue, &work, &dumped?)?);
                }
                let checkpoint = catalogue.create(&id, &capture.join("fs"), &new)?;
                if let Some(held) = stop_when_stored {
                    held.kill_and_thaw().map_err(|e| {
                        CheckpointError::Task(format!("checkpoint {} is stored, but {e}", checkpoint.id))
                    })?;
                }
                drop(dump_guard);
                Ok::<_, CheckpointError>(checkpoint)
            })();
            // A dump that stopped the container but could not be stored is
            // the only copy of its processes: journal, images and capture
            // are kept for the next start to store again.
            if result.is_err() && journaled.is_some() && process::dump_finished(&work) {
                warn!(
                    id,
                    work = %work.display(),
                    "storing the dump failed after CRIU stopped the container: kept, the next start stores it again"
                );
                return result;
            }
            // Stored or failed, the journal has done its work: removed
            // first, so that a kill now leaves only scratch files the next
            // start sweeps.
            if let Some(path) = &journaled {
                if let Err(e) = std::fs::remove_file(path) {
                    warn!(journal = %path.display(), error = %e, "checkpoint journal left for the next start");
                }
            }
            // Also when writing the journal failed after the pin.
            if journal_key.is_some() {
                if let Err(e) = crate::capture::unpin(&capture) {
                    warn!(capture = %capture.display(), error = %e, "capture pin left for the next start");
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&work) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(work = %work.display(), error = %e, "CRIU scratch directory left for the next start");
                }
            }
            remove_capture();
            result
        })
        .await
        .map_err(|e| CheckpointError::Task(e.to_string()))?;
        drop(captured);
        let checkpoint = result?;
        info!(
            id = checkpoint.id,
            size = checkpoint.size,
            parent = checkpoint.parent.as_deref().unwrap_or(""),
            pause_ms = checkpoint.pause_ns as f64 / 1e6,
            frozen_ms = checkpoint
                .process
                .as_ref()
                .map(|p| p.stats.frozen_time_us as f64 / 1e3)
                .unwrap_or(0.0),
            "checkpoint created"
        );
        Ok(checkpoint)
    }

    /// Checks the parent and reads what restore will need of the container.
    pub(super) async fn prepare_create(
        &self,
        containerd: &crate::host::containerd::Containerd,
        catalogue: &Catalogue,
        request: &CreateRequest,
        container_id: &str,
        pid: u32,
    ) -> Result<(Option<Checkpoint>, process::ContainerRecord), CheckpointError> {
        let parent = match &request.parent {
            Some(parent) => {
                let found = {
                    let (catalogue, parent) = (catalogue.clone(), parent.clone());
                    tokio::task::spawn_blocking(move || catalogue.get(&parent))
                        .await
                        .map_err(|e| CheckpointError::Task(e.to_string()))??
                };
                if found.container != container_id || found.namespace != request.namespace {
                    return Err(CheckpointError::Invalid(format!(
                        "parent {parent} is a checkpoint of {}/{}, not of {}/{container_id}",
                        found.namespace, found.container, request.namespace
                    )));
                }
                Some(found)
            }
            None => None,
        };
        let container = containerd.container(&request.namespace, container_id).await?;
        let snapshot_parent = containerd
            .snapshot_parent(&request.namespace, &container.snapshotter, &container.snapshot_key)
            .await?;
        let mut record =
            process::ContainerRecord::from_container(&container, snapshot_parent, process::process_identity(pid))?;
        // Sealed before it is stored: the seal travels with the record to
        // wherever the checkpoint goes, and only it makes the record trusted.
        self.settings
            .trust
            .seal(&mut record)
            .map_err(|e| CheckpointError::Task(e.to_string()))?;
        Ok((parent, record))
    }
}
