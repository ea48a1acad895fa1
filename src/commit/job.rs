//! A commit job in the background: from the capture to a pushed image.
//! The base image comes from containerd's content store or its registry,
//! `chain::plan` decides a full, incremental or merged layer, the layers are
//! written from the capture (OCI tars, or a Nydus image through
//! `nydus_image`), and what the target lacks is pushed. Progress and the
//! outcome go to the job's record.

use super::*;

impl CommitService {
    /// containerd's content store as `namespace` sees it, or None, with a
    /// warning, when containerd cannot be reached: the base image is then
    /// read from its registry.
    pub(super) async fn content_store(&self, namespace: &str) -> Option<ContentStore> {
        match ContentStore::connect(self.capture.containerd_address(), namespace).await {
            Ok(store) => Some(store),
            Err(e) => {
                warn!(error = %e, "containerd's content store cannot be read: the base image comes from its registry");
                None
            }
        }
    }

    pub(super) fn update(&self, job: &mut Job, progress: f64, stage: &str) {
        job.state = JobState::Processing;
        job.progress = progress;
        job.stage = stage.to_string();
        if let Err(e) = self.save(job) {
            warn!(job = job.snapshot_id, error = %e, "cannot persist job progress");
        }
    }

    #[instrument(skip_all, fields(snapshot_id = %job.snapshot_id))]
    pub(super) async fn run_job(&self, mut job: Job) {
        // The semaphore is never closed, so acquiring only waits.
        let _worker = self.workers.acquire().await;
        let result = self.build_and_push(&mut job).await;
        job.ended = Some(SystemTime::now());
        let mut keep_capture = false;
        match result {
            Ok((digest, chain)) => {
                job.state = JobState::Completed;
                job.progress = 1.0;
                job.stage = "completed".into();
                job.manifest_digest = Some(digest);
                job.commit_layers = chain.layers.len() as u32;
                let key = chain_key(&job.namespace, &job.container);
                match self.advance_chain(&key, &chain) {
                    Ok(()) => keep_capture = true,
                    Err(e) => {
                        warn!(error = %e, "cannot record the commit chain: the next commit builds on the previous one")
                    }
                }
                info!(
                    target = job.options.target,
                    layer_plan = job.layer_plan,
                    commit_layers = job.commit_layers,
                    "commit pushed"
                );
            }
            Err(JobFailure { code, cause, message }) => {
                job.state = JobState::Failed;
                job.error_code = Some(code);
                job.cause = cause;
                // The job runs in the background: this line (with the job's
                // id from the span), the job record and the metrics are how
                // a failure is seen by whoever did not `--wait`.
                error!(
                    namespace = job.namespace,
                    container = job.container,
                    target = job.options.target,
                    stage = job.stage,
                    error = %message,
                    "commit job failed"
                );
                job.error = Some(format!("{}: {message}", job.stage));
            }
        }
        if !keep_capture {
            if let Err(e) = self.snapshotter.remove_capture(&job.capture) {
                warn!(capture = %job.capture.display(), error = %e, "cannot remove capture");
            }
        }
        if let Err(e) = self.prune_chains() {
            warn!(error = %e, "cannot prune commit chains");
        }
        let _ = std::fs::remove_dir_all(
            job.options
                .work_root(self.snapshotter.scratch_dir())
                .join(&job.snapshot_id),
        );
        if let Err(e) = self.save(&job) {
            error!(error = %e, "cannot persist the job's end");
        }
    }

    /// Builds the commit's layers, pushes the image and returns its manifest
    /// digest and the container's chain as it stands after the push.
    pub(super) async fn build_and_push(&self, job: &mut Job) -> Result<(String, Chain), JobFailure> {
        let text = JobFailure::from;
        let auth = request_auth(job);
        let root = job.options.work_root(self.snapshotter.scratch_dir());
        check_work_dir(root, true).map_err(|e| e.to_string())?;
        let work = create_job_dir(root, &job.snapshot_id)?;

        self.update(job, 0.05, "reading the base image");
        let source = RegistryClient::new(RegistryOptions {
            insecure: job.options.source_insecure,
            ..self.registry.clone()
        });
        // containerd's content store first: an image imported or built
        // locally may be in no registry at all.
        let base_store = self.content_store(&job.namespace).await;
        let base = match local_base(base_store.as_ref(), &job.source_image).await {
            Some(base) => base,
            None => source
                .pull_manifest_and_config(&job.source_image, &auth.for_reference(&job.source_image))
                .await
                .map_err(text)?,
        };
        let target = RegistryClient::new(RegistryOptions {
            insecure: job.options.target_insecure,
            ..self.registry.clone()
        });
        // Credentials the target refuses, or a target that cannot be
        // reached, fail the job now, not after the layers are built. Any
        // other failure shows again where it matters.
        self.update(job, 0.1, "checking access to the target");
        if let Err(e) = target
            .has_blob(
                &job.options.target,
                &base.manifest.config.digest,
                &auth.for_reference(&job.options.target),
            )
            .await
        {
            // A registry that refuses us, or that cannot be reached even
            // after the client's retries, fails the job before its build.
            if e.is_permission() || e.is_network() {
                return Err(text(e));
            }
        }

        let origin = ChainOrigin {
            snapshot_key: job.snapshot_key.clone(),
            source_image: job.source_image.clone(),
            with_paths: job.options.with_paths.clone(),
            without_paths: job.options.without_paths.clone(),
            image_format: job.options.image_format(),
        };
        let chain = self.chain(&chain_key(&job.namespace, &job.container));
        let head_exists = chain.as_ref().is_some_and(|c| c.head.join("fs").is_dir());
        let plan = chain::plan(chain.as_ref(), head_exists, &origin, job.options.maximum_times);
        job.layer_plan = plan.describe().to_string();
        self.update(job, 0.15, "building the layer");
        // A Nydus layer is built from the plain tar.
        let compression = match job.options.format {
            Format::Oci => job.options.oci_compression(),
            Format::Nydus => Compression::None,
        };
        // A Nydus layer is built one part per core; an OCI layer is one blob.
        let parts = match job.options.format {
            Format::Oci => 1,
            Format::Nydus => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let built = self.build_commit_layers(job, &plan, &work, compression, parts).await?;
        let assembled = match job.options.format {
            Format::Oci => {
                self.assemble_oci(job, &plan, &base, built, &target, base_store.as_ref(), &work)
                    .await?
            }
            Format::Nydus => {
                let input = nydus_image::Input {
                    source_image: job.source_image.clone(),
                    target: job.options.target.clone(),
                    target_insecure: job.options.target_insecure,
                    source_insecure: job.options.source_insecure,
                    snapshot_id: job.snapshot_id.clone(),
                    started: job.started,
                    options: job.options.rafs_options()?,
                    previous_bootstrap: chain.as_ref().and_then(|c| c.bootstrap.clone()),
                    cache: self.nydus_cache.clone(),
                    base_store: base_store.clone(),
                    auth: auth.clone(),
                };
                nydus_image::assemble(
                    &input,
                    &plan,
                    &base,
                    built,
                    &source,
                    &target,
                    &work,
                    &mut |progress, stage| self.update(job, progress, stage),
                )
                .await?
            }
        };

        self.update(job, 0.85, "pushing the image");
        let annotations = BTreeMap::from([(
            "org.opencontainers.image.base.name".to_string(),
            job.source_image.clone(),
        )]);
        let pushed = target
            .push_image(
                &job.options.target,
                &assembled.layers,
                &assembled.config,
                annotations,
                &auth.for_reference(&job.options.target),
            )
            .await
            .map_err(text)?;
        let chain = Chain {
            origin,
            head: job.capture.clone(),
            layers: assembled.commit_layers,
            bootstrap: assembled.bootstrap,
        };
        Ok((pushed.manifest_digest, chain))
    }

    /// The OCI image: the base image's layers, the chain's and the new ones.
    /// Base layers the target lacks come from `base_store` when it holds
    /// them, else from the source registry.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn assemble_oci(
        &self,
        job: &mut Job,
        plan: &Plan,
        base: &PulledManifest,
        built: Vec<BuiltLayer>,
        target: &RegistryClient,
        base_store: Option<&ContentStore>,
        work: &std::path::Path,
    ) -> Result<Assembled, String> {
        let mut commit_layers = match plan {
            Plan::Incremental { keep, .. } => keep.clone(),
            Plan::Full | Plan::Merge { .. } => Vec::new(),
        };
        let kept = commit_layers.len();
        let mut new_layers = Vec::new();
        for BuiltLayer { parts, created_by } in built {
            // One part: the OCI build asked for one.
            let Some((blob, path)) = parts.into_iter().next() else {
                continue;
            };
            // A commit that changed nothing since the last adds no layer.
            if blob.entries == 0 && plan.previous().is_some() {
                continue;
            }
            commit_layers.push(CommitLayer {
                media_type: blob.media_type.to_string(),
                digest: blob.digest.clone(),
                diff_id: blob.diff_id.clone(),
                size: blob.size,
                pushed_to: job.options.target.clone(),
                insecure: job.options.target_insecure,
                created_by,
                created: job.started,
            });
            new_layers.push(path);
        }

        self.update(job, 0.5, "fetching base layers");
        let mut reused: Vec<Reused> = base
            .manifest
            .layers
            .iter()
            .map(|descriptor| Reused::of(descriptor, &job.source_image, job.options.source_insecure))
            .collect();
        reused.extend(commit_layers[..kept].iter().map(|layer| Reused {
            layer: oci_source(layer, LayerData::InTarget),
            from: layer.pushed_to.clone(),
            insecure: layer.insecure,
        }));
        let target_ref = job.options.target.clone();
        let auth = request_auth(job);
        let mut layers = nydus_image::resolve_reused(
            target,
            &target_ref,
            reused,
            base_store,
            &auth,
            work,
            &mut |progress, stage| self.update(job, progress, stage),
        )
        .await?;
        for (layer, path) in commit_layers[kept..].iter().zip(new_layers) {
            layers.push(oci_source(layer, LayerData::File(path)));
        }
        let config = derive_config(&base.config, &commit_layers)?;
        Ok(Assembled {
            layers,
            config,
            commit_layers,
            bootstrap: None,
        })
    }

    /// Builds the layers `plan` asks for from the job's capture, in image
    /// order, each with its history entry's `created_by`, each in up to
    /// `parts` tars (see [`build_layer_parts`]).
    pub(super) async fn build_commit_layers(
        &self,
        job: &Job,
        plan: &Plan,
        work: &std::path::Path,
        compression: Compression,
        parts: usize,
    ) -> Result<Vec<BuiltLayer>, String> {
        let lowers = self
            .snapshotter
            .lower_dirs(&job.snapshot_key)
            .map_err(|e| e.to_string())?;
        let mut builds: Vec<(PathBuf, Option<PathBuf>, String)> = Vec::new();
        if let Plan::Merge { merged, previous } = plan {
            builds.push((
                previous.join("fs"),
                None,
                format!(
                    "seamless-commit {}: {merged} earlier commit layers merged",
                    job.snapshot_id
                ),
            ));
        }
        builds.push((
            job.capture.join("fs"),
            plan.previous().map(|p| p.join("fs")),
            format!("seamless-commit {}", job.snapshot_id),
        ));
        let options = job.options.clone();
        let work = work.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let filter = options.filter();
            let mut out = Vec::new();
            for (i, (upper, previous, created_by)) in builds.into_iter().enumerate() {
                let ctx = BuildContext {
                    upper: &upper,
                    previous: previous.as_deref(),
                    lowers: &lowers,
                    compression,
                    filter: &filter,
                };
                let parts = build_layer_parts(&ctx, parts, crate::nydus::MIN_PART_BYTES, |part| {
                    work.join(format!("layer-{i}-{part}"))
                })
                .map_err(|e| e.to_string())?;
                out.push(BuiltLayer { parts, created_by });
            }
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// A job's own directory, removed with what the job left in it when
/// dropped.
#[derive(Debug)]
pub(super) struct JobDir(PathBuf);

impl std::ops::Deref for JobDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %self.0.display(), error = %e, "cannot remove the job's work directory");
            }
        }
    }
}

/// Creates the job's own directory, 0700, under `root`. In a directory
/// only the daemon's user writes, it is `<root>/<snapshot id>` (one a
/// previous run left is removed first). In a shared sticky directory such
/// as /tmp, where others could plant a predictable name first, it gets a
/// fresh random name, created atomically.
pub(super) fn create_job_dir(root: &Path, snapshot_id: &str) -> Result<JobDir, String> {
    use std::os::unix::fs::DirBuilderExt;
    if std::fs::symlink_metadata(root).is_ok_and(|m| is_shared_sticky(&m)) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix(&format!("seamless-{snapshot_id}-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(root)
            .map_err(|e| format!("create a private directory in {}: {e}", root.display()))?;
        return Ok(JobDir(dir.keep()));
    }
    let dir = root.join(snapshot_id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("remove {}: {e}", dir.display())),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(JobDir(dir))
}

/// A directory others may write but, being sticky, not rename or remove
/// our entries in (as /tmp).
pub(super) fn is_shared_sticky(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    meta.is_dir() && meta.mode() & 0o1000 != 0 && meta.mode() & 0o022 != 0
}

/// Image `name`'s manifest and config from containerd's content store, or
/// None when the store lacks them or what it holds is refused (logged): the
/// registry is asked then.
pub(super) async fn local_base(store: Option<&ContentStore>, name: &str) -> Option<PulledManifest> {
    match store?.image(name).await {
        Ok(Some(base)) => {
            info!(
                image = name,
                manifest = base.manifest_digest,
                "base image read from containerd's content store"
            );
            Some(base)
        }
        Ok(None) => {
            info!(
                image = name,
                "base image not in containerd's content store: reading it from its registry"
            );
            None
        }
        Err(e) => {
            warn!(image = name, error = %e, "base image in containerd's content store refused: reading it from its registry");
            None
        }
    }
}

/// The pushable form of a recorded OCI commit layer.
pub(super) fn oci_source(layer: &CommitLayer, data: LayerData) -> LayerSource {
    LayerSource {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size,
        annotations: BTreeMap::new(),
        data,
    }
}
