//! Seamless commit against real containers: the capture, the pushed
//! image's tree, commit chains, and jobs interrupted by a killed daemon.

use super::*;

/// The core of seamless commit against a real runc container: resolved
/// through containerd's API by id prefix, its upper directory captured as a
/// read-only btrfs snapshot while a process in it keeps writing, frozen only
/// around the snapshot, and running afterwards.
#[test]
fn seamless_capture_of_a_running_container() {
    use seamless_snapshotter::capture::{capture_upper, CaptureMethod, CaptureTarget, FrozenMarkers};
    use seamless_snapshotter::host::sys::{RealSystem, SystemOps};

    with_env("capture", Options::default(), |env| {
        let ns = env.namespace("cap");
        env.pull(&ns)?;
        let id = env.container_id("writer");
        env.run_container(&ns, &id)?;
        env.exec(&ns, &id, "mkdir -p /data && echo before > /data/before && sync")?;
        env.exec(
            &ns,
            &id,
            "(i=0; while true; do i=$((i+1)); echo $i > /data/counter.new; mv /data/counter.new /data/counter; done) >/dev/null 2>&1 &",
        )?;
        sleep(Duration::from_millis(300));

        let runtime = tokio::runtime::Runtime::new()?;
        let prefix = &id[..id.len() - 3];
        let container = resolve_container(&runtime, env, &ns, prefix)?;
        ensure!(container.id == id, "prefix {prefix} resolved to {}", container.id);
        ensure!(container.snapshotter == "seamless", "{container:?}");
        let freezer = seamless_snapshotter::host::cgroup::freezer_of(container.pid)?;

        let mountinfo = env.exec(&ns, &id, "cat /proc/self/mountinfo")?;
        let upper = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .and_then(|l| l.split(',').find_map(|o| o.strip_prefix("upperdir=")))
            .context("no upperdir on the container's root mount")?
            .to_string();
        let subvolume = std::path::Path::new(&upper)
            .parent()
            .context("upper has a parent")?
            .to_path_buf();
        let dest = env.storage_dir().join("test-capture");
        let sys: std::sync::Arc<dyn SystemOps> = std::sync::Arc::new(RealSystem);
        let markers = FrozenMarkers::new(env.dir().join("frozen"));
        let target = CaptureTarget {
            name: "t1",
            subvolume: &subvolume,
            upper: seamless_snapshotter::capture::SNAPSHOT_UPPER,
            dest: &dest,
            freezer: &freezer,
            pause_timeout: Duration::from_secs(2),
            method: CaptureMethod::Snapshot,
        };
        let captured = capture_upper(&sys, &markers, &target)?;
        eprintln!(
            "capture of a container writing in a loop paused it for {:?}",
            captured.pause
        );

        let before = std::fs::read_to_string(dest.join("fs/data/before"))?;
        ensure!(before == "before\n", "captured /data/before holds {before:?}");
        let counted: u64 = std::fs::read_to_string(dest.join("fs/data/counter"))?
            .trim()
            .parse()
            .unwrap_or(0);
        ensure!(counted > 0, "the writer's counter is in the capture");
        let err = std::fs::write(dest.join("fs/data/new"), b"x").expect_err("capture is read-only");
        ensure!(
            err.raw_os_error() == Some(libc::EROFS),
            "writing into the capture: {err}"
        );

        // The container runs on, on its own upper, and is not frozen.
        let state = std::fs::read_to_string(freezer.dir().join(match &freezer {
            seamless_snapshotter::host::sys::Freezer::V1(_) => "freezer.state",
            seamless_snapshotter::host::sys::Freezer::V2(_) => "cgroup.events",
        }))?;
        ensure!(
            !state.contains("FROZEN") && !state.contains("frozen 1"),
            "still frozen: {state}"
        );
        let later = retry(Duration::from_secs(5), "counter moves on after the capture", || {
            let now: u64 = env.exec(&ns, &id, "cat /data/counter")?.trim().parse()?;
            ensure!(now > counted, "counter {now} has not moved past the captured {counted}");
            Ok(now)
        })?;
        ensure!(
            std::fs::read_to_string(dest.join("fs/data/counter"))?
                .trim()
                .parse::<u64>()?
                == counted,
            "the capture changed after it was taken (live value {later})"
        );
        ensure!(
            std::fs::read_dir(env.dir().join("frozen"))?.count() == 0,
            "frozen marker left behind"
        );
        sys.delete_subvolume(&dest)?;
        Ok(())
    });
}

/// Seamless commit end to end: a running container changed in every way a
/// layer can express is committed through the daemon's Control API, the image
/// is built and pushed in the background, and the pushed image, pulled with
/// containerd's built-in overlayfs and with seamless and run, has exactly the
/// tree the container had.
#[test]
fn seamless_commit_pushes_the_container_view() {
    use seamless_snapshotter::proto::{GetCommitRequest, SeamlessCommitRequest};

    with_env("commit", Options::default(), |env| {
        let ns = env.namespace("src");
        env.pull(&ns)?;
        let id = env.container_id("app");
        env.run_container(&ns, &id)?;
        env.exec(
            &ns,
            &id,
            "mkdir -p /data/sub && echo hello > /data/sub/file && chmod 0640 /data/sub/file && \
             chown 1000:1001 /data/sub/file && ln -s sub/file /data/link && ln /data/sub/file /data/hard && \
             rm /bin/vi && mkdir /opt && echo x > /opt/x && rm -rf /opt && mkdir /opt && echo y > /opt/y && \
             mknod /data/fifo p && mknod /data/null c 1 3 && mkdir /data/attrs && echo z > /data/attrs/f && sync",
        )?;
        // busybox has no setfattr: set attributes through the container's
        // root mount, as a process inside would.
        let rootfs = env.container_rootfs(&ns, &id);
        xattr::set(rootfs.join("data/attrs/f"), "user.origin", b"inside")?;
        xattr::set(rootfs.join("data/attrs"), "user.dir", b"d")?;
        xattr::set(rootfs.join("etc/passwd"), "user.lower", b"copied-up")?;
        let before = tree_of(&rootfs)?;
        ensure!(
            before["data/attrs/f"].contains("user.origin=inside")
                && before["etc/passwd"].contains("user.lower=copied-up")
                && before["data/null"].starts_with("dev 259"),
            "attributes and the device are visible: {:?} {:?} {:?}",
            before["data/attrs/f"],
            before["etc/passwd"],
            before["data/null"]
        );
        ensure!(
            before.contains_key("data/sub/file") && !before.contains_key("bin/vi"),
            "changes visible"
        );

        let target = env.registry_ref("committed/app:1");
        let runtime = tokio::runtime::Runtime::new()?;
        let work = env.dir().join("commit-work");
        std::fs::create_dir_all(&work)?;
        let (started, job) = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            let started = control
                .seamless_commit(SeamlessCommitRequest {
                    namespace: ns.clone(),
                    container: id[..id.len() - 2].to_string(),
                    target: target.clone(),
                    format: "oci".into(),
                    work_dir: work.display().to_string(),
                    compressor: "zstd".into(),
                    target_insecure: true,
                    source_insecure: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            // A second commit while the first is processing may be refused;
            // either way the first must complete.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let job = control
                    .get_commit(GetCommitRequest {
                        snapshot_id: started.snapshot_id.clone(),
                    })
                    .await?
                    .into_inner();
                if job.state == "completed" || job.state == "failed" || Instant::now() > deadline {
                    return Ok::<_, anyhow::Error>((started, job));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })?;
        eprintln!(
            "seamless commit: pause {:?}, job {} {} ({})",
            Duration::from_nanos(started.pause_time_ns),
            job.state,
            job.manifest_digest,
            job.error
        );
        ensure!(
            job.state == "completed",
            "commit job ended {}: {} {}",
            job.state,
            job.error_code,
            job.error
        );
        ensure!(started.snapshot_id.starts_with("snapshot-"), "{started:?}");
        ensure!(
            Path::new(&started.old_upper_dir).exists(),
            "the capture is kept as the base of the container's next commit"
        );

        // The CLI against the same daemon: exit codes and messages of the issue.
        let cli = |args: &[&str]| -> Result<(i32, String, String)> { outcome(env.checkpointctl(&ns).args(args)) };
        let (code, _, err) = cli(&[
            "seamless-commit",
            "--container",
            "no-such-container",
            "--target",
            &target,
            "--format",
            "oci",
        ])?;
        ensure!(
            code == 3 && err.starts_with("FATA[") && err.contains("CONTAINER_NOT_FOUND"),
            "{code} {err}"
        );
        let (code, out, err) = cli(&[
            "seamless-commit",
            "--container",
            &id,
            "--target",
            &target,
            "--format",
            "oci",
            "--target-insecure",
            "--source-insecure",
            "--work-dir",
            &work.display().to_string(),
            "--wait",
        ])?;
        ensure!(code == 0, "second commit through the CLI: {code} {out} {err}");
        ensure!(
            !Path::new(&started.old_upper_dir).exists(),
            "the first capture is removed once the next commit is pushed"
        );
        for line in [
            "Seamless snapshot created successfully:",
            "  Snapshot ID: snapshot-",
            "  Pause Time: ",
            "  Old Upper Dir: ",
            "  New Upper Dir: ",
            "Background commit processing started for snapshot: snapshot-",
            "Background processing completed successfully.",
        ] {
            ensure!(
                out.lines().any(|l| l.starts_with(line)),
                "CLI output lacks {line:?}:\n{out}"
            );
        }
        eprintln!("{out}");

        // The REST API on the daemon's rest.sock, same daemon and container.
        let rest = |method: &str, path: &str, body: &str| -> Result<(u16, serde_json::Value, String)> {
            let (status, text) = env.rest(method, path, body)?;
            Ok((
                status,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                text,
            ))
        };
        let create = serde_json::json!({
            "namespace": ns, "container": id, "target": env.registry_ref("committed/app:rest"), "format": "oci",
            "work_dir": work, "target_insecure": true, "source_insecure": true, "compressor": "none"
        });
        let (status, created, text) = rest("POST", "/api/v1/snapshots", &create.to_string())?;
        ensure!(status == 201, "REST commit: {status} {text}");
        let rest_id = created["snapshot_id"].as_str().context("snapshot_id")?.to_string();
        let done = retry(Duration::from_secs(60), "REST job completes", || {
            let (status, job, text) = rest("GET", &format!("/api/v1/snapshots/{rest_id}"), "")?;
            ensure!(status == 200 && job["state"] == "completed", "{status} {text}");
            Ok(job)
        })?;
        ensure!(
            done["manifest_digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
            "{done}"
        );
        let (status, _, listed) = rest("GET", "/api/v1/snapshots?state=completed&limit=10", "")?;
        ensure!(status == 200 && listed.contains(&rest_id), "{listed}");
        let (status, missing, _) = rest(
            "POST",
            "/api/v1/snapshots",
            &serde_json::json!({
                "namespace": ns, "container": "nope", "target": env.registry_ref("x/y:1"), "format": "oci"
            })
            .to_string(),
        )?;
        ensure!(
            status == 404 && missing["error"]["code"] == "CONTAINER_NOT_FOUND",
            "{status} {missing}"
        );
        let (status, _, metrics) = rest("GET", "/metrics", "")?;
        ensure!(
            status == 200 && metrics.contains("nydus_seamless_snapshots_total{status=\"success\"} 3"),
            "three commits completed (API, CLI, REST):\n{metrics}"
        );

        expect_image_tree(env, &target, &before, "commit")?;
        Ok(())
    });
}

/// Commits of one container form a chain: the first pushes the whole upper,
/// the next ones only the change since the previous capture (deletions,
/// rewrites, an opaque directory), reusing the pushed layers even in another
/// repository; past `maximum_times` the older commit layers are merged into
/// one. Every image, pulled and run, has the tree the container had.
#[test]
fn commit_chain_is_incremental_and_merges_past_maximum_times() {
    use seamless_snapshotter::api::client::{CommitOptions, Format, SeamlessSnapshot, SnapshotState};
    use seamless_snapshotter::oci::registry::{RegistryAuth, RegistryClient, RegistryOptions};

    with_env("chain", Options::default(), |env| {
        let ns = env.namespace("chain");
        env.pull(&ns)?;
        let id = env.container_id("chain");
        env.run_container(&ns, &id)?;
        let runtime = tokio::runtime::Runtime::new()?;
        let work = env.dir().join("chain-work");
        std::fs::create_dir_all(&work)?;
        let registry = RegistryClient::new(RegistryOptions {
            insecure: true,
            ..RegistryOptions::default()
        });
        let base_layers = runtime
            .block_on(registry.pull_manifest_and_config(&env.image_ref(), &RegistryAuth::Anonymous))?
            .manifest
            .layers
            .len();

        // Each step: change the container, commit with at most two commit
        // layers, check the job, the pushed manifest and the image's tree.
        let steps: [(&str, &str, &str, u32); 3] = [
            (
                "head -c 1048576 /dev/urandom > /data-big && mkdir -p /data/d && echo a > /data/a && \
                 echo 1 > /data/keep && echo x > /data/d/x && rm /bin/vi",
                "chain/app:1",
                "full",
                1,
            ),
            (
                "rm /data/a && echo 2 > /data/keep && rm -rf /data/d && mkdir /data/d && echo y > /data/d/y && \
                 echo b > /data/b",
                "chain/app:2",
                "incremental",
                2,
            ),
            (
                "rm /data/b && echo 3 > /data/keep && mkdir /data/c && rm /bin/ls",
                "other/app:3",
                "merged",
                2,
            ),
        ];
        let mut previous_capture: Option<std::path::PathBuf> = None;
        let mut previous_layers: Vec<String> = Vec::new();
        for (step, (script, repository, plan, commit_layers)) in steps.into_iter().enumerate() {
            env.exec(&ns, &id, &format!("{script} && sync"))?;
            let expected = tree_of(&env.container_rootfs(&ns, &id))?;
            let target = env.registry_ref(repository);
            let (result, job) = runtime.block_on(async {
                let client = SeamlessSnapshot::new(CommitOptions {
                    address: env.daemon_socket(),
                    namespace: ns.clone(),
                    format: Format::Oci,
                    compressor: "zstd".into(),
                    work_dir: work.clone(),
                    target_insecure: true,
                    source_insecure: true,
                    maximum_times: 2,
                    ..CommitOptions::default()
                })
                .await?;
                let result = client.commit_with_wait(&id, &target, Duration::from_secs(120)).await?;
                let job = client.get_status(&result.snapshot_id).await?;
                Ok::<_, anyhow::Error>((result, job))
            })?;
            ensure!(
                job.state == SnapshotState::Completed && job.layer_plan == plan && job.commit_layers == commit_layers,
                "commit {step}: expected a {plan} layer and {commit_layers} commit layers: {job:?}"
            );
            let pushed = runtime.block_on(registry.pull_manifest_and_config(&target, &RegistryAuth::Anonymous))?;
            let layers: Vec<String> = pushed.manifest.layers.iter().map(|l| l.digest.clone()).collect();
            ensure!(
                layers.len() == base_layers + commit_layers as usize,
                "commit {step}: {} layers, {base_layers} of the image and {commit_layers} commit layers expected",
                layers.len()
            );
            let config: serde_json::Value = serde_json::from_slice(&pushed.config)?;
            ensure!(
                config["rootfs"]["diff_ids"].as_array().map(Vec::len) == Some(layers.len()),
                "commit {step}: diff_ids follow the layers: {config}"
            );
            match plan {
                "incremental" => {
                    ensure!(
                        layers[..previous_layers.len()] == previous_layers[..],
                        "commit {step}: the earlier layers are reused as they are"
                    );
                    let newest = pushed.manifest.layers.last().context("a layer")?;
                    ensure!(
                        newest.size < 64 * 1024,
                        "commit {step}: the incremental layer holds only the change, not the 1 MiB file: {} bytes",
                        newest.size
                    );
                }
                "merged" => ensure!(
                    layers[..base_layers] == previous_layers[..base_layers]
                        && !previous_layers.contains(&layers[base_layers]),
                    "commit {step}: the image's layers, then a new merged layer"
                ),
                _ => {}
            }
            if let Some(previous) = &previous_capture {
                ensure!(
                    !previous.exists(),
                    "commit {step}: the previous capture is removed once this commit is pushed"
                );
            }
            ensure!(
                result.old_upper_dir.exists(),
                "commit {step}: the capture is kept for the next"
            );
            expect_image_tree(env, &target, &expected, &format!("chain{step}"))?;
            previous_capture = Some(result.old_upper_dir.clone());
            previous_layers = layers;
        }

        // The container gone, the daemon drops its chain and capture at the
        // next job's end or start.
        env.remove_container(&ns, &id)?;
        retry(
            Duration::from_secs(30),
            "containerd removes the container's snapshot",
            || {
                let active: Vec<String> = Snapshots::daemon(&env.daemon_socket())?
                    .list(&[])?
                    .into_iter()
                    .filter(grpc::is_active)
                    .map(|i| i.name)
                    .collect();
                ensure!(active.is_empty(), "active snapshots left: {active:?}");
                Ok(())
            },
        )?;
        env.signal_daemon(Signal::SIGTERM)?;
        env.start_daemon()?;
        let capture = previous_capture.context("a capture")?;
        ensure!(
            !capture.exists(),
            "a removed container's last capture is removed at the next start"
        );
        Ok(())
    });
}

/// A second commit of a container whose job is still running is accepted
/// and queued behind it; past `commit.max_queued` waiting jobs one more is
/// refused with SNAPSHOT_IN_PROGRESS. A daemon killed mid-job leaves the
/// container running and thawed, and the restarted daemon reports the jobs
/// failed with their reason, removes the captures and commits again.
#[test]
fn commit_in_progress_and_daemon_killed_mid_job() {
    use seamless_snapshotter::proto::{GetCommitRequest, SeamlessCommitRequest};

    with_env_config("commitkill", Options::default(), "[commit]\nmax_queued = 1\n", |env| {
        let ns = env.namespace("k");
        env.pull(&ns)?;
        let id = env.container_id("busy");
        env.run_container(&ns, &id)?;
        // Incompressible data keeps the background build busy for a while.
        env.exec(
            &ns,
            &id,
            "dd if=/dev/urandom of=/big bs=1M count=64 2>/dev/null && sync",
        )?;
        let work = env.dir().join("kill-work");
        std::fs::create_dir_all(&work)?;
        let request = SeamlessCommitRequest {
            namespace: ns.clone(),
            container: id.clone(),
            target: env.registry_ref("killed/app:1"),
            format: "oci".into(),
            work_dir: work.display().to_string(),
            compressor: "zstd".into(),
            target_insecure: true,
            source_insecure: true,
            ..Default::default()
        };
        let runtime = tokio::runtime::Runtime::new()?;
        let (first, second, third, queued) = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            let first = control.seamless_commit(request.clone()).await?.into_inner();
            let second = control.seamless_commit(request.clone()).await?.into_inner();
            let third = control.seamless_commit(request.clone()).await;
            let queued = control
                .get_commit(GetCommitRequest {
                    snapshot_id: second.snapshot_id.clone(),
                })
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>((first, second, third, queued))
        })?;
        ensure!(
            queued.state == "pending" && queued.stage.contains(&first.snapshot_id),
            "the second commit waits for the first: {queued:?}"
        );
        let refused = third.expect_err("a third commit while one runs and one waits is refused (max_queued = 1)");
        ensure!(
            refused.code() == tonic::Code::AlreadyExists
                && refused.message().starts_with("SNAPSHOT_IN_PROGRESS")
                && refused.message().contains("commit.max_queued"),
            "{refused:?}"
        );

        // Kill the daemon while the job builds or pushes.
        env.signal_daemon(Signal::SIGKILL)?;
        ensure!(
            Path::new(&first.old_upper_dir).exists(),
            "the capture exists while its job is interrupted"
        );
        env.start_daemon()?;
        let job = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            Ok::<_, anyhow::Error>(
                control
                    .get_commit(GetCommitRequest {
                        snapshot_id: first.snapshot_id.clone(),
                    })
                    .await?
                    .into_inner(),
            )
        })?;
        ensure!(
            job.state == "failed"
                && job.error_code == "BACKGROUND_PROCESSING_FAILED"
                && job.error.contains("daemon stopped"),
            "interrupted job after restart: {job:?}"
        );
        let waiting = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            Ok::<_, anyhow::Error>(
                control
                    .get_commit(GetCommitRequest {
                        snapshot_id: second.snapshot_id.clone(),
                    })
                    .await?
                    .into_inner(),
            )
        })?;
        ensure!(
            waiting.state == "failed" && waiting.error.contains("daemon stopped"),
            "the queued job after restart: {waiting:?}"
        );
        ensure!(
            !Path::new(&first.old_upper_dir).exists() && !Path::new(&second.old_upper_dir).exists(),
            "the interrupted jobs' captures are removed"
        );
        let out = env.exec(&ns, &id, "echo alive > /alive && cat /alive")?;
        ensure!(out.trim() == "alive", "container works after the kill: {out:?}");

        // The library API for embedding, against the restarted daemon.
        let again = retry(Duration::from_secs(15), "commit after the restart", || {
            runtime.block_on(async {
                use seamless_snapshotter::api::client::{CommitOptions, Format, SeamlessSnapshot};
                let client = SeamlessSnapshot::new(CommitOptions {
                    address: env.daemon_socket(),
                    namespace: ns.clone(),
                    format: Format::Oci,
                    work_dir: work.clone(),
                    target_insecure: true,
                    source_insecure: true,
                    ..CommitOptions::default()
                })
                .await?;
                let result = client
                    .commit_with_wait(&id, &env.registry_ref("killed/app:2"), Duration::from_secs(120))
                    .await?;
                let job = client.get_status(&result.snapshot_id).await?;
                ensure!(result.total_time >= result.pause_time, "{result:?}");
                Ok::<_, anyhow::Error>(job)
            })
        })?;
        ensure!(
            again.state == seamless_snapshotter::api::client::SnapshotState::Completed,
            "commit after restart: {again:?}"
        );
        Ok(())
    });
}

/// A daemon killed while its job pushes the image: a front that never answers
/// uploads holds the job in that stage, so the kill lands there every time.
/// The container keeps running, the restarted daemon reports the job failed
/// in that stage and removes its capture, and the next commit completes.
#[test]
fn daemon_killed_while_pushing_fails_the_job_with_its_stage() {
    use seamless_snapshotter::proto::SeamlessCommitRequest;

    with_env("pushkill", Options::default(), |env| {
        let ns = env.namespace("p");
        env.pull(&ns)?;
        let id = env.container_id("pushing");
        env.run_container(&ns, &id)?;
        let registry = registry_address(&env.registry_ref("x:y"))?;
        let proxy = stall::StallingProxy::start(&registry)?;
        let work = env.dir().join("pushkill-work");
        std::fs::create_dir_all(&work)?;
        let request = SeamlessCommitRequest {
            namespace: ns.clone(),
            container: id.clone(),
            target: format!("{}/stalled/app:1", proxy.address()),
            format: "oci".into(),
            work_dir: work.display().to_string(),
            target_insecure: true,
            source_insecure: true,
            ..Default::default()
        };
        let runtime = tokio::runtime::Runtime::new()?;
        let first = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            Ok::<_, anyhow::Error>(control.seamless_commit(request).await?.into_inner())
        })?;

        // Not the stage alone: an upload held by the proxy proves the job
        // cannot leave it before the kill.
        let stalled = wait_for_job(&runtime, env, &first.snapshot_id, Duration::from_secs(60), |job| {
            job.stage == "pushing the image" && proxy.held_uploads() > 0
        })
        .context("waiting for the job to stall in its push")?;
        eprintln!("job stalled: {stalled:?}");

        env.signal_daemon(Signal::SIGKILL)?;
        ensure!(
            Path::new(&first.old_upper_dir).exists(),
            "the capture {} exists while its job is interrupted",
            first.old_upper_dir
        );
        env.start_daemon()?;
        let job = get_commit(&runtime, env, &first.snapshot_id)?;
        ensure!(
            job.state == "failed"
                && job.error_code == "BACKGROUND_PROCESSING_FAILED"
                && job.error.contains("pushing the image"),
            "the job interrupted while pushing, after the restart: {job:?}"
        );
        ensure!(
            !Path::new(&first.old_upper_dir).exists(),
            "the interrupted job's capture {} is removed",
            first.old_upper_dir
        );
        let out = env.exec(&ns, &id, "echo alive")?;
        ensure!(out.trim() == "alive", "container works after the kill: {out:?}");

        let again = retry(Duration::from_secs(15), "commit after the restart", || {
            runtime.block_on(async {
                use seamless_snapshotter::api::client::{CommitOptions, Format, SeamlessSnapshot};
                let client = SeamlessSnapshot::new(CommitOptions {
                    address: env.daemon_socket(),
                    namespace: ns.clone(),
                    format: Format::Oci,
                    work_dir: work.clone(),
                    target_insecure: true,
                    source_insecure: true,
                    ..CommitOptions::default()
                })
                .await?;
                let result = client
                    .commit_with_wait(&id, &env.registry_ref("stalled/app:2"), Duration::from_secs(120))
                    .await?;
                Ok::<_, anyhow::Error>(client.get_status(&result.snapshot_id).await?)
            })
        })?;
        ensure!(
            again.state == seamless_snapshotter::api::client::SnapshotState::Completed,
            "commit after restart: {again:?}"
        );
        Ok(())
    });
}
