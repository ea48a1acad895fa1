//! Nydus images run on the snapshotter: the test image is converted here to
//! a RAFS v6 Nydus image (each OCI layer built on its own, merged, the
//! bootstrap packed as a layer) and pushed to the test registry; pulled with
//! `checkpointctl image pull` (which labels each layer as CRI does, which
//! `ctr images pull` of containerd 1.6 does not; `integration/rpull`, with
//! containerd's own Go client, serves the tests of other topics), so the daemon
//! fetches the data blobs itself and mounts the RAFS as the lower layer of a
//! container. The container must see exactly what a container of the OCI
//! image sees, write into an upper directory of our storage, and the RAFS
//! mount must go with the last container using it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use seamless_snapshotter::nydus::{self, Compressor, RafsOptions};
use seamless_snapshotter::oci::registry::{LayerData, LayerSource, RegistryAuth, RegistryClient, RegistryOptions};

use super::env::{is_mount_point, with_env, Env, Options};
use super::{
    check_image_content, check_root_mount, check_write_landed_in_storage, daemon_snapshots, diff_trees, retry, tree_of,
    REDIAL_TIMEOUT,
};

/// Repository of the Nydus image in the test registry.
const NYDUS_REPOSITORY: &str = "seamless-nydus:1";
/// How long containerd's garbage collector may take to remove snapshots.
const GC_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn nydus_image_runs_on_a_rafs_lower_with_our_upper() {
    // Mounted with erofs, blobs fetched at pull time: such mounts outlive
    // the daemon, which the kill -9 below checks. commit_nydus covers the
    // default, lazy FUSE serving.
    let options = Options {
        nydus_fs_driver: Some("erofs"),
        ..Options::default()
    };
    with_env("nydus", options, |env| {
        ensure!(
            env.snapshotter == "seamless",
            "Nydus images need the seamless snapshotter (it fetches their blobs), not {}",
            env.snapshotter
        );
        let nydus_ref = env.registry_ref(NYDUS_REPOSITORY);
        let blob_digests = convert_and_push(env, &nydus_ref)?;

        let ns = env.namespace("n");
        let started = Instant::now();
        let out = image_pull(env, &ns, &nydus_ref)?;
        let pull_time = started.elapsed();
        ensure!(out.starts_with(&nydus_ref), "image pull printed {out:?}");

        // The daemon fetched every blob; containerd downloaded none.
        let blobs_dir = env.daemon_root().join("nydus/blobs");
        for digest in &blob_digests {
            let blob = blobs_dir.join(digest.trim_start_matches("sha256:"));
            ensure!(
                blob.is_file(),
                "the daemon did not fetch {digest} to {}",
                blob.display()
            );
        }
        let content = env.ctr(&ns, &["content", "ls", "-q"])?;
        for digest in &blob_digests {
            ensure!(
                !content.contains(digest.as_str()),
                "containerd downloaded the Nydus blob {digest} although the snapshotter adopted its layer:\n{content}"
            );
        }
        ensure!(
            rafs_mounts(env)?.is_empty(),
            "a RAFS is mounted before any container needs it"
        );

        let nydus_id = env.container_id("rafs");
        let started = Instant::now();
        run_container(env, &ns, &nydus_ref, &nydus_id)?;
        let run_time = started.elapsed();
        let mounts = rafs_mounts(env)?;
        ensure!(
            mounts.len() == 1,
            "one RAFS mount expected for the container, found {mounts:?}"
        );
        let (mountpoint, fs_type) = &mounts[0];
        ensure!(
            fs_type == "erofs",
            "the RAFS at {} is {fs_type}, not erofs",
            mountpoint.display()
        );
        check_image_content(env, &ns, &nydus_id)?;
        check_root_mount(env, &ns, &nydus_id)?;
        let mountinfo = env.exec(&ns, &nydus_id, "cat /proc/self/mountinfo")?;
        ensure!(
            mountinfo.contains(&format!("lowerdir={}", mountpoint.display())),
            "the container's root should stack on the RAFS {}:\n{mountinfo}",
            mountpoint.display()
        );

        // The same image as OCI layers, on the same snapshotter.
        env.pull(&ns)?;
        let oci_id = env.container_id("oci");
        let started = Instant::now();
        env.run_container(&ns, &oci_id)?;
        let oci_run_time = started.elapsed();
        let nydus_tree = tree_of(&env.container_rootfs(&ns, &nydus_id))?;
        let oci_tree = tree_of(&env.container_rootfs(&ns, &oci_id))?;
        let differences = diff_trees(&oci_tree, &nydus_tree);
        ensure!(
            differences.is_empty(),
            "the Nydus container's tree differs from the OCI container's ({} entries):\n{}",
            oci_tree.len(),
            differences.join("\n")
        );
        eprintln!(
            "nydus: image pull {:.0} ms, first container start {:.0} ms (RAFS mounted, cache files built); \
             OCI container start {:.0} ms; {} entries compared",
            pull_time.as_secs_f64() * 1000.0,
            run_time.as_secs_f64() * 1000.0,
            oci_run_time.as_secs_f64() * 1000.0,
            oci_tree.len()
        );

        // Writes land in our upper directory, never on the RAFS.
        env.exec(
            &ns,
            &nydus_id,
            "mkdir -p /data && echo nydus-write > /data/nydus-file && echo appended >> /etc/passwd && sync",
        )?;
        check_write_landed_in_storage(env, "data/nydus-file", "nydus-write\n")?;
        ensure!(
            !mountpoint.join("data/nydus-file").exists(),
            "the write reached the RAFS mount"
        );
        let passwd = std::fs::read_to_string(mountpoint.join("etc/passwd"))?;
        ensure!(!passwd.contains("appended"), "a copied-up file changed on the RAFS");

        // kill -9 of the daemon: the container keeps its RAFS, and the
        // restarted daemon counts it again, so the mount stays while any of
        // the containers using it runs.
        env.signal_daemon(Signal::SIGKILL)?;
        env.start_daemon().context("restarting the daemon after SIGKILL")?;
        let out = env.exec(&ns, &nydus_id, "cat /data/nydus-file")?;
        ensure!(out == "nydus-write\n", "the container after the restart: {out:?}");
        let mut attempt = 0;
        let second_id = retry(REDIAL_TIMEOUT, "a second container of the Nydus image", || {
            attempt += 1;
            let id = env.container_id(&format!("rafs{attempt}"));
            run_container(env, &ns, &nydus_ref, &id).inspect_err(|_| {
                // A half-created container would keep its snapshot.
                let _ = env.ctr(&ns, &["containers", "delete", &id]);
            })?;
            Ok(id)
        })?;
        ensure!(
            rafs_mounts(env)? == mounts,
            "both containers share the one RAFS mount: {:?}",
            rafs_mounts(env)?
        );
        env.remove_container(&ns, &second_id)?;
        retry(GC_TIMEOUT, "the second container's snapshot to go", || {
            let left = daemon_snapshots(env)?;
            ensure!(
                !left.iter().any(|s| s.contains(&second_id)),
                "the daemon still has it: {left:?}"
            );
            Ok(())
        })?;
        ensure!(
            is_mount_point(mountpoint),
            "the RAFS went while the first container, counted again after the restart, still runs"
        );
        let out = env.exec(&ns, &nydus_id, &format!("cat {}", super::image::GREETING.0))?;
        ensure!(
            out == super::image::GREETING.1,
            "the first container reads the image: {out:?}"
        );

        env.remove_container(&ns, &nydus_id)?;
        // containerd removes the container's snapshot from the snapshotter
        // in its garbage collection, after `ctr containers delete` returns.
        retry(GC_TIMEOUT, "the RAFS mount to go with its only container", || {
            ensure!(
                !is_mount_point(mountpoint),
                "the RAFS {} is still mounted",
                mountpoint.display()
            );
            let left = rafs_mounts(env)?;
            ensure!(left.is_empty(), "RAFS mounts left: {left:?}");
            Ok(())
        })?;
        env.remove_container(&ns, &oci_id)?;

        // Removing the image lets containerd's garbage collector remove its
        // layers, and the blobs go with them.
        env.ctr(&ns, &["images", "rm", "--sync", &nydus_ref])?;
        retry(GC_TIMEOUT, "the Nydus blobs to go with their image", || {
            let left: Vec<_> = std::fs::read_dir(&blobs_dir)?.collect::<std::io::Result<_>>()?;
            ensure!(
                left.is_empty(),
                "nydus blobs left after the image was removed: {:?}",
                left.iter().map(|e| e.path()).collect::<Vec<_>>()
            );
            Ok(())
        })?;
        Ok(())
    });
}

/// The RAFS mounts of the daemon: mount point and filesystem type.
pub(super) fn rafs_mounts(env: &Env) -> Result<Vec<(PathBuf, String)>> {
    let under = env.daemon_root().join("nydus/mnt");
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let point = PathBuf::from(line.split(' ').nth(4)?);
            let fs_type = line.split(" - ").nth(1)?.split(' ').next()?.to_string();
            point.starts_with(&under).then_some((point, fs_type))
        })
        .collect())
}

/// Converts the test image to a RAFS v6 Nydus image at `target`, laid out
/// as nydusify does (a blob layer per OCI layer, then the bootstrap layer;
/// diff_ids follow). Returns the blob digests.
pub(super) fn convert_and_push(env: &Env, target: &str) -> Result<Vec<String>> {
    convert_and_push_naming(env, target, None, Compressor::Lz4Block)
}

/// [`convert_and_push`], the bootstrap's first blob renamed `blob_id` in its
/// blob and device tables when one is given (an id of 64 bytes keeps the
/// bootstrap loadable): a hostile image whose layers are all genuine.
pub(super) fn convert_and_push_naming(
    env: &Env,
    target: &str,
    blob_id: Option<&str>,
    compressor: Compressor,
) -> Result<Vec<String>> {
    let work = env.dir().join(format!("nydus-convert-{compressor:?}"));
    std::fs::create_dir_all(&work)?;
    let registry = RegistryClient::new(RegistryOptions {
        insecure: true,
        ..RegistryOptions::default()
    });
    let runtime = tokio::runtime::Runtime::new()?;
    let source = env.image_ref();
    let pulled = runtime.block_on(registry.pull_manifest_and_config(&source, &RegistryAuth::Anonymous))?;
    let options = RafsOptions {
        fs_version: 6,
        compressor,
    };
    let blob_dir = work.join("blobs");
    let mut builds = Vec::new();
    for (i, layer) in pulled.manifest.layers.iter().enumerate() {
        let blob = work.join(format!("oci-{i}"));
        runtime.block_on(registry.pull_blob_to(
            &source,
            &layer.digest,
            u64::try_from(layer.size)?,
            &blob,
            &RegistryAuth::Anonymous,
        ))?;
        let tar = work.join(format!("oci-{i}.tar"));
        seamless_snapshotter::commit::nydus_image::decompress_layer(&layer.media_type, &blob, &tar)
            .map_err(anyhow::Error::msg)?;
        let built = nydus::build_layer(&tar, None, &options, &work.join(format!("layer-{i}.boot")), &blob_dir)
            .with_context(|| format!("building RAFS of layer {i}"))?;
        builds.push(built);
    }
    let bootstrap = work.join("image.boot");
    let ids = nydus::merge_layers(None, &builds, None, &bootstrap)?;
    if let Some(blob_id) = blob_id {
        ensure!(blob_id.len() == 64, "a blob id of the table is 64 bytes: {blob_id:?}");
        let first = ids.first().context("the image has no blob")?;
        let mut bytes = std::fs::read(&bootstrap)?;
        let mut renamed = 0;
        let mut at = 0;
        while let Some(found) = bytes[at..].windows(64).position(|w| w == first.as_bytes()) {
            let start = at + found;
            bytes[start..start + 64].copy_from_slice(blob_id.as_bytes());
            renamed += 1;
            at = start + 64;
        }
        ensure!(renamed > 0, "blob {first} is not in the bootstrap's bytes");
        std::fs::write(&bootstrap, bytes)?;
    }
    let packed = nydus::pack_bootstrap_layer(&bootstrap, &work.join("bootstrap.tar.gz"))?;

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for blob in builds.iter().filter_map(|b| b.blob.as_ref()) {
        layers.push(LayerSource {
            media_type: nydus::BLOB_MEDIA_TYPE.to_string(),
            digest: blob.digest(),
            size: blob.size,
            annotations: nydus::blob_annotations(&blob.digest()),
            data: LayerData::File(blob.path.clone()),
        });
        diff_ids.push(blob.digest());
    }
    let blob_digests = diff_ids.clone();
    layers.push(LayerSource {
        media_type: nydus::BOOTSTRAP_MEDIA_TYPE.to_string(),
        digest: packed.digest.clone(),
        size: packed.size,
        annotations: BTreeMap::from([
            (nydus::ANNOTATION_BOOTSTRAP.to_string(), "true".to_string()),
            (nydus::ANNOTATION_FS_VERSION.to_string(), "6".to_string()),
        ]),
        data: LayerData::File(packed.path.clone()),
    });
    diff_ids.push(packed.diff_id.clone());
    let mut config: serde_json::Value = serde_json::from_slice(&pulled.config)?;
    config["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": diff_ids });
    // One history entry per layer, as the image config's history counts
    // non-empty layers.
    config["history"] = serde_json::Value::Array(
        diff_ids
            .iter()
            .map(|d| serde_json::json!({ "created_by": format!("seamless test: nydus layer {d}") }))
            .collect(),
    );
    let config = serde_json::to_vec(&config)?;
    runtime.block_on(registry.push_image(target, &layers, &config, BTreeMap::new(), &RegistryAuth::Anonymous))?;
    Ok(blob_digests)
}

#[test]
fn nydus_image_naming_a_traversing_blob_id_is_refused_and_the_daemon_serves_on() {
    let options = Options {
        nydus_fs_driver: Some("erofs"),
        ..Options::default()
    };
    with_env("nydus-evil", options, |env| {
        ensure!(
            env.snapshotter == "seamless",
            "Nydus images need the seamless snapshotter"
        );
        // From `<root>/nydus/{blobs,cache}/`, three `..` are the test's
        // directory: the id names a file there, which exists, so that only
        // the id's check keeps the daemon from extending and rewriting it
        // (and creating `<name>.applied` beside it).
        let name = "x".repeat(47);
        let evil_id = format!("../../../outside/{name}");
        ensure!(
            env.daemon_root().join("nydus/blobs/../../..").canonicalize()? == env.dir().canonicalize()?,
            "the daemon root is {}",
            env.daemon_root().display()
        );
        let outside = env.dir().join("outside");
        std::fs::create_dir_all(&outside)?;
        let sentinel = outside.join(&name);
        let content = b"sentinel: must stay as it is\n";
        std::fs::write(&sentinel, content)?;

        let evil_ref = env.registry_ref("seamless-nydus-evil:1");
        convert_and_push_naming(env, &evil_ref, Some(&evil_id), Compressor::Lz4Block)?;
        let ns = env.namespace("n");
        image_pull(env, &ns, &evil_ref)?;
        let id = env.container_id("evil");
        let err = run_container(env, &ns, &evil_ref, &id).expect_err("a container of the hostile image");
        let _ = env.ctr(&ns, &["containers", "delete", &id]);
        let now = std::fs::read(&sentinel)?;
        ensure!(
            now == content,
            "the file the blob id names was changed: now {} bytes, starting {:?}",
            now.len(),
            String::from_utf8_lossy(&now[..now.len().min(64)])
        );
        let beside: Vec<_> = std::fs::read_dir(&outside)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        ensure!(beside.len() == 1, "files appeared outside the daemon root: {beside:?}");
        let message = format!("{err:#}");
        eprintln!("nydus-evil: ctr run refused: {message}");
        ensure!(
            message.contains(&evil_id) && message.contains("refused"),
            "the refusal names the blob id: {message}"
        );
        ensure!(rafs_mounts(env)?.is_empty(), "a RAFS of the hostile image is mounted");

        // The daemon serves on: a container of the OCI image runs.
        env.pull(&ns)?;
        let oci_id = env.container_id("oci");
        env.run_container(&ns, &oci_id)?;
        let out = env.exec(&ns, &oci_id, &format!("cat {}", super::image::GREETING.0))?;
        ensure!(
            out == super::image::GREETING.1,
            "the OCI container reads its image: {out:?}"
        );
        env.remove_container(&ns, &oci_id)?;
        Ok(())
    });
}

/// Builds `integration/rpull` offline from Debian's containerd sources
/// (GOPATH mode, as the conformance suite is built), once per source change.
pub(crate) fn build_rpull() -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/rpull");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rpull");
    let binary = out_dir.join("rpull");
    let newest_source = std::fs::read_dir(&source)?
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
        .context("integration/rpull has no source")?;
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
    if built.is_some_and(|b| b >= newest_source) {
        return Ok(binary);
    }
    std::fs::create_dir_all(&out_dir)?;
    let gocode = Path::new("/usr/share/gocode/src/github.com/containerd/containerd");
    ensure!(
        gocode.is_dir(),
        "containerd's Go sources missing at {} (apt-get install golang-github-containerd-containerd-dev)",
        gocode.display()
    );
    let partial = out_dir.join("rpull.new");
    let output = Command::new("go")
        .args(["build", "-o"])
        .arg(&partial)
        .arg(".")
        .current_dir(&source)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", out_dir.join("gopath").display()),
        )
        .env("GOCACHE", out_dir.join("gocache"))
        .output()
        .context("running go build (apt-get install golang-go)")?;
    ensure!(
        output.status.success(),
        "go build of integration/rpull failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&partial, &binary)?;
    Ok(binary)
}

pub(crate) fn run_rpull(env: &Env, rpull: &Path, ns: &str, reference: &str) -> Result<String> {
    run_rpull_with(env, rpull, ns, reference, &[])
}

/// [`run_rpull`] with more of rpull's flags (`--user`, `--hosts-dir`).
pub(crate) fn run_rpull_with(env: &Env, rpull: &Path, ns: &str, reference: &str, extra: &[&str]) -> Result<String> {
    let output = Command::new(rpull)
        .arg("--address")
        .arg(env.containerd_socket())
        .args([
            "--namespace",
            ns,
            "--snapshotter",
            &env.snapshotter,
            "--plain-http",
            "--timeout",
            "3m",
        ])
        .args(extra)
        .arg(reference)
        .output()
        .context("running rpull")?;
    ensure!(
        output.status.success(),
        "rpull of {reference} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `checkpointctl image pull --plain-http` of `reference` into `ns` on the
/// environment's snapshotter: what [`run_rpull`] does, without Go. Returns
/// its stdout (`<name> <manifest digest>`).
pub(crate) fn image_pull(env: &Env, ns: &str, reference: &str) -> Result<String> {
    let output = env
        .checkpointctl(ns)
        .args(["image", "pull", "--plain-http", "--containerd-address"])
        .arg(env.containerd_socket())
        .args(["--snapshotter", &env.snapshotter])
        .arg(reference)
        .output()
        .context("running checkpointctl image pull")?;
    ensure!(
        output.status.success(),
        "checkpointctl image pull of {reference} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ctr run -d` of a container of `reference` that loops forever.
pub(crate) fn run_container(env: &Env, ns: &str, reference: &str, id: &str) -> Result<()> {
    run_container_script(env, ns, reference, id, IDLE)
}

/// What a container that only has to stay up runs.
pub(crate) const IDLE: &str = "while true; do sleep 1; done";

/// The arguments of `ctr run -d` of a container of `reference` running
/// `script`, after `ctr -n NS`.
pub(crate) fn run_args<'a>(env: &'a Env, reference: &'a str, id: &'a str, script: &'a str) -> [&'a str; 10] {
    [
        "run",
        "-d",
        "--null-io",
        "--snapshotter",
        &env.snapshotter,
        reference,
        id,
        "/bin/sh",
        "-c",
        script,
    ]
}

/// `ctr run -d` of a container of `reference` running `script`.
pub(crate) fn run_container_script(env: &Env, ns: &str, reference: &str, id: &str, script: &str) -> Result<()> {
    env.ctr(ns, &run_args(env, reference, id, script))?;
    Ok(())
}
