//! Seamless commit to Nydus images: a running container committed three
//! times (full, incremental, merged past `--maximum-times`) as RAFS v6, and
//! once as RAFS v5. Each pushed image has nydusify's layout (blob layers,
//! then the bootstrap layer, annotations, diff_ids), its bootstrap loads with
//! the nydus-rafs parser and describes exactly the container's tree, and a
//! v6 bootstrap passes `fsck.erofs` with its blobs as devices. Each image,
//! pulled onto seamless and run, has the container's tree, contents
//! included; a container of the last v6 one is committed again (on a Nydus
//! base), and that image runs too. Their blobs being compressed, the daemon
//! serves them over FUSE ("auto" driver), reading chunks from the registry
//! only as files are read: the pull fetches no blob, and a container start
//! leaves a 3 MB file it does not read out of the chunk cache. After a
//! kill -9 of the daemon, new containers of the image run again.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use seamless_snapshotter::nydus;
use seamless_snapshotter::oci::registry::{RegistryAuth, RegistryClient, RegistryOptions};

use nix::sys::signal::Signal;

use super::env::{with_env, Env, Options};
use super::nydus::{build_rpull, rafs_mounts, run_container, run_rpull};
use super::{diff_trees, retry, tree_of, REDIAL_TIMEOUT};

#[test]
fn nydus_commits_push_images_the_nydus_tools_read() {
    with_env("nydus-commit", Options::default(), |env| {
        let ns = env.namespace("nc");
        env.pull(&ns)?;
        let id = env.container_id("nc");
        env.run_container(&ns, &id)?;
        let work = env.dir().join("nydus-work");
        std::fs::create_dir_all(&work)?;
        let registry = RegistryClient::new(RegistryOptions {
            insecure: true,
            ..RegistryOptions::default()
        });
        let runtime = tokio::runtime::Runtime::new()?;
        let rpull = build_rpull()?;
        let mut last_run = None;

        // (changes, target, fs version, compressor, layer plan, commit blobs)
        let steps: [(&str, &str, u32, &str, &str, usize); 4] = [
            (
                "mkdir -p /data/sub && echo hello > /data/sub/file && chmod 0640 /data/sub/file && \
                 chown 1000:1001 /data/sub/file && ln -s sub/file /data/link && ln /data/sub/file /data/hard && \
                 head -c 3000000 /dev/urandom > /data/big && rm /bin/vi && mkdir /opt && echo x > /opt/x && \
                 mknod /data/fifo p",
                "nydus/app:1",
                6,
                "lz4_block",
                "full",
                1,
            ),
            (
                "rm /data/link && echo again > /data/sub/new && rm -rf /opt && mkdir /opt && echo y > /opt/y",
                "nydus/app:2",
                6,
                "lz4_block",
                "incremental",
                2,
            ),
            (
                "cp /data/big /data/big-copy && echo three > /data/three && rm /bin/ls && chmod 0700 /data/sub",
                "nydus/other:3",
                6,
                "lz4_block",
                "merged",
                2,
            ),
            ("echo five > /data/five", "nydus/v5:1", 5, "zstd", "full", 1),
        ];
        for (step, (script, repository, fs_version, compressor, plan, commit_blobs)) in steps.into_iter().enumerate() {
            env.exec(&ns, &id, &format!("{script} && sync"))?;
            let expected = tree_of(&env.container_rootfs(&ns, &id))?;
            let target = env.registry_ref(repository);
            // The first commit through the CLI with the default format.
            let mut args = vec![
                "seamless-commit".to_string(),
                "--container".into(),
                id.clone(),
                "--target".into(),
                target.clone(),
                "--target-insecure".into(),
                "--source-insecure".into(),
                "--work-dir".into(),
                work.display().to_string(),
                "--maximum-times".into(),
                "2".into(),
                "--fs-version".into(),
                fs_version.to_string(),
                "--compressor".into(),
                compressor.into(),
                "--wait".into(),
            ];
            if step > 0 {
                args.extend(["--format".into(), "nydus".into()]);
            }
            let out = env.checkpointctl(&ns).args(&args).output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "commit {step}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let layers_line = format!("Commit Layers: {commit_blobs} ({plan} layer pushed)");
            ensure!(
                stdout.contains(&layers_line),
                "commit {step}: no {layers_line:?} in\n{stdout}"
            );
            eprintln!("commit {step}:\n{stdout}");
            if step == 0 {
                // The converted OCI base layers are kept for the next commits.
                let kept = std::fs::read_dir(env.daemon_root().join("nydus-base"))?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().join("parts.json").is_file())
                    .count();
                ensure!(kept >= 1, "no converted base layer kept under the daemon root");
            }
            let (newest_digest, newest) = runtime.block_on(check_image(
                &registry,
                &target,
                fs_version,
                commit_blobs,
                &expected,
                &work,
            ))?;
            // The first commit's blob holds /data/big, which starting a
            // container does not read.
            let unread = (step == 0).then_some(newest_digest.as_str());
            let run = expect_runs_as(env, &rpull, &target, &expected, &format!("nrun{step}"), unread)?;
            if fs_version == 6 {
                last_run = Some(run);
            }
            if step == 2 {
                ensure!(
                    newest < 1_000_000,
                    "commit {step}: the copy of a 3 MB file is deduplicated against the chunks pushed already, \
                     yet the newest blob has {newest} bytes"
                );
            }
        }

        // A container of a committed Nydus image, committed again: the
        // base is now a Nydus image, its blobs reused, its bootstrap the
        // parent.
        let (ns2, id2) = last_run.context("a v6 image ran")?;
        env.exec(&ns2, &id2, "echo on-nydus > /data/on-nydus && rm /data/three && sync")?;
        let expected = tree_of(&env.container_rootfs(&ns2, &id2))?;
        let target = env.registry_ref("nydus/again:1");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_checkpointctl"))
            .arg("--address")
            .arg(env.daemon_socket())
            .arg("--namespace")
            .arg(&ns2)
            .args(["seamless-commit", "--container", &id2, "--target", &target])
            .args(["--target-insecure", "--source-insecure", "--wait", "--work-dir"])
            .arg(&work)
            .output()?;
        ensure!(
            out.status.success(),
            "commit on a Nydus base: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        runtime.block_on(check_image(&registry, &target, 6, 1, &expected, &work))?;
        let (ns3, _) = expect_runs_as(env, &rpull, &target, &expected, "again", None)?;

        // kill -9: the FUSE mounts die with the daemon. The restarted daemon
        // detaches them and serves the image again to new containers.
        env.signal_daemon(Signal::SIGKILL)?;
        env.start_daemon().context("restarting the daemon after SIGKILL")?;
        let mut attempt = 0;
        let id3 = retry(REDIAL_TIMEOUT, "a container of the Nydus image after a restart", || {
            attempt += 1;
            let id = env.container_id(&format!("after-kill{attempt}"));
            run_container(env, &ns3, &target, &id).inspect_err(|_| {
                let _ = env.ctr(&ns3, &["containers", "delete", &id]);
            })?;
            Ok(id)
        })?;
        let out = env.exec(&ns3, &id3, "cat /data/on-nydus /data/sub/file")?;
        ensure!(
            out == "on-nydus\nhello\n",
            "the image's files after the restart: {out:?}"
        );
        Ok(())
    });
}

/// Pulls `target` onto the snapshotter under test with the CRI labels, runs
/// it and checks its tree is `expected`; returns the running container.
fn expect_runs_as(
    env: &mut Env,
    rpull: &Path,
    target: &str,
    expected: &BTreeMap<String, String>,
    label: &str,
    unread_blob: Option<&str>,
) -> Result<(String, String)> {
    let ns = env.namespace(label);
    run_rpull(env, rpull, &ns, target)?;
    let blobs_dir = env.daemon_root().join("nydus/blobs");
    let fetched = std::fs::read_dir(&blobs_dir)?.count();
    ensure!(fetched == 0, "{target}: the pull fetched {fetched} blobs whole");
    let id = env.container_id(label);
    run_container(env, &ns, target, &id)?;
    let served: Vec<_> = rafs_mounts(env)?
        .into_iter()
        .filter(|(_, t)| t != "fuse.rafs")
        .collect();
    ensure!(
        served.is_empty(),
        "{target}: compressed blobs are served over FUSE, yet mounted {served:?}"
    );
    let cached = |digest: &str| -> Result<u64> {
        let path = env
            .daemon_root()
            .join("nydus/fuse-cache")
            .join(format!("{}.blob.data", digest.trim_start_matches("sha256:")));
        Ok(std::fs::metadata(&path).map(|m| m.blocks() * 512).unwrap_or(0))
    };
    if let Some(digest) = unread_blob {
        let before = cached(digest)?;
        ensure!(
            before < 1 << 20,
            "{target}: starting the container cached {before} bytes of blob {digest}, whose 3 MB file it never reads"
        );
    }
    let after = tree_of(&env.container_rootfs(&ns, &id))?;
    let differences = diff_trees(expected, &after);
    ensure!(
        differences.is_empty(),
        "{target} run on {} differs from the committed container: {differences:?}",
        env.snapshotter
    );
    if let Some(digest) = unread_blob {
        let read = cached(digest)?;
        ensure!(
            read >= 3_000_000,
            "{target}: reading the whole tree cached only {read} bytes of blob {digest}"
        );
    }
    ensure!(
        std::fs::read_dir(&blobs_dir)?.count() == 0,
        "{target}: chunks are read from the registry, no blob is fetched whole"
    );
    Ok((ns, id))
}

/// The image at `target` is laid out as nydusify writes one, and its
/// bootstrap describes `expected`. Returns the size of the newest blob.
async fn check_image(
    registry: &RegistryClient,
    target: &str,
    fs_version: u32,
    commit_blobs: usize,
    expected: &BTreeMap<String, String>,
    work: &Path,
) -> Result<(String, i64)> {
    let pulled = registry
        .pull_manifest_and_config(target, &RegistryAuth::Anonymous)
        .await?;
    let layers = &pulled.manifest.layers;
    let (bootstrap, blobs) = layers.split_last().context("no layers")?;
    let annotations =
        |l: &seamless_snapshotter::oci::registry::OciDescriptor| l.annotations.clone().unwrap_or_default();
    for blob in blobs {
        let a = annotations(blob);
        ensure!(
            blob.media_type == nydus::BLOB_MEDIA_TYPE
                && a.get(nydus::ANNOTATION_BLOB).map(String::as_str) == Some("true")
                && a.get(nydus::ANNOTATION_UNCOMPRESSED) == Some(&blob.digest),
            "{target}: blob layer {blob:?}"
        );
    }
    let a = annotations(bootstrap);
    ensure!(
        bootstrap.media_type == nydus::BOOTSTRAP_MEDIA_TYPE
            && a.get(nydus::ANNOTATION_BOOTSTRAP).map(String::as_str) == Some("true")
            && a.get(nydus::ANNOTATION_FS_VERSION) == Some(&fs_version.to_string()),
        "{target}: bootstrap layer {bootstrap:?}"
    );
    let committed: Vec<&str> = a
        .get(nydus::ANNOTATION_COMMIT_BLOBS)
        .map(|v| v.split(',').collect())
        .unwrap_or_default();
    ensure!(
        committed.len() == commit_blobs && committed.iter().all(|d| blobs.iter().any(|b| b.digest == *d)),
        "{target}: commit blobs {committed:?}, {commit_blobs} expected among the layers"
    );
    let config: serde_json::Value = serde_json::from_slice(&pulled.config)?;
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .context("diff_ids")?
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    let layer_digests: Vec<&str> = blobs.iter().map(|b| b.digest.as_str()).collect();
    ensure!(
        diff_ids.len() == layers.len() && diff_ids[..blobs.len()] == layer_digests[..],
        "{target}: diff_ids {diff_ids:?} do not follow the layers {layer_digests:?}"
    );

    let dir = work.join(target.replace(['/', ':'], "_"));
    std::fs::create_dir_all(&dir)?;
    let layer = dir.join("bootstrap.tar.gz");
    registry
        .pull_blob_to(
            target,
            &bootstrap.digest,
            u64::try_from(bootstrap.size)?,
            &layer,
            &RegistryAuth::Anonymous,
        )
        .await?;
    let boot = dir.join("image.boot");
    nydus::unpack_bootstrap_layer(&layer, &boot)?;
    ensure!(
        nydus::bootstrap_fs_version(&boot)? == fs_version,
        "{target}: RAFS version"
    );
    let described = describe_bootstrap(&boot)?;
    let wanted = describe_tree(expected);
    let differences: Vec<String> = wanted
        .iter()
        .filter(|(path, what)| described.get(*path) != Some(what))
        .map(|(path, what)| format!("{path}: container {what:?}, bootstrap {:?}", described.get(path)))
        .chain(
            described
                .keys()
                .filter(|p| !wanted.contains_key(*p))
                .map(|p| format!("{p}: only in the bootstrap")),
        )
        .collect();
    ensure!(differences.is_empty(), "{target}: bootstrap differs: {differences:#?}");

    if fs_version == 6 {
        // fsck.erofs reads a RAFS v6 bootstrap with one device per blob, in
        // the order of its blob table.
        let mut fsck = std::process::Command::new("fsck.erofs");
        let ids: Vec<String> = nydus::load_bootstrap(&boot)?
            .superblock
            .get_blob_infos()
            .iter()
            .map(|b| b.blob_id())
            .collect();
        for blob_id in &ids {
            let path = dir.join(blob_id);
            let digest = format!("sha256:{blob_id}");
            let size = blobs
                .iter()
                .find(|b| b.digest == digest)
                .map_or(Ok(0), |b| u64::try_from(b.size))?;
            registry
                .pull_blob_to(target, &digest, size, &path, &RegistryAuth::Anonymous)
                .await
                .with_context(|| format!("{target}: blob {blob_id} of the blob table is not in the registry"))?;
            fsck.arg(format!("--device={}", path.display()));
        }
        let out = fsck.arg(&boot).output().context("running fsck.erofs")?;
        ensure!(
            out.status.success(),
            "{target}: fsck.erofs failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(blobs.last().map_or((String::new(), 0), |b| (b.digest.clone(), b.size)))
}

/// path -> "kind mode owner [target]" of a bootstrap's entries.
fn describe_bootstrap(boot: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in nydus::bootstrap_tree(boot)? {
        let path = entry.path.display().to_string();
        let Some(rel) = path.strip_prefix('/').filter(|r| !r.is_empty()) else {
            continue;
        };
        let kind = match entry.mode & libc::S_IFMT {
            libc::S_IFDIR => "dir".to_string(),
            libc::S_IFLNK => format!(
                "link->{}",
                entry.target.map(|t| t.display().to_string()).unwrap_or_default()
            ),
            libc::S_IFREG => "file".to_string(),
            libc::S_IFIFO => "fifo".to_string(),
            libc::S_IFCHR | libc::S_IFBLK => "dev".to_string(),
            _ => "other".to_string(),
        };
        out.insert(
            rel.to_string(),
            format!(
                "{kind} mode={:o} owner={}:{}",
                entry.mode & 0o7777,
                entry.uid,
                entry.gid
            ),
        );
    }
    Ok(out)
}

/// The same description of a `tree_of` tree (content digests, link counts
/// and attributes left out: the bootstrap's metadata is what is compared).
fn describe_tree(tree: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    tree.iter()
        .map(|(path, what)| {
            let kind = what.split(' ').next().unwrap_or("");
            let mode = what.split(' ').find(|w| w.starts_with("mode=")).unwrap_or("");
            let owner = what.split(' ').find(|w| w.starts_with("owner=")).unwrap_or("");
            (path.clone(), format!("{kind} {mode} {owner}"))
        })
        .collect()
}
