//! Commits of containers whose base image no registry holds: the base is
//! read from containerd's content store. An image imported with `ctr images
//! import` under `localhost/...` (its top layer, gzip-compressed, made here
//! and never pushed anywhere; its target an index naming the platform's
//! manifest) runs on seamless and is committed as OCI and as Nydus with no
//! `--source-insecure` and no registry at `localhost`: both pushes hold the
//! base layers, and the images run with the container's tree (OCI on
//! containerd's overlayfs and on seamless, Nydus on seamless). A blob
//! tampered with in the content store is refused there, so that its commit
//! fails rather than push it. A base layer deleted from the content store
//! (`ctr content rm`) is fetched from the image's registry instead.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use seamless_snapshotter::oci::content::{ContentError, ContentStore};
use seamless_snapshotter::oci::registry::{Digest, RegistryAuth, RegistryClient, RegistryOptions};
use serde_json::json;

use super::env::{with_env, Env, Options};
use super::image::{self, sha256_digest};
use super::nydus::{build_rpull, run_container as run_on_seamless, run_rpull};
use super::{diff_trees, expect_image_tree, tree_of};

/// The name the imported image goes by: no registry answers at `localhost`.
const LOCAL_NAME: &str = "localhost/seamless-local-only:1";
/// A file only the local image's own top layer holds.
const LOCAL_FILE: (&str, &str) = ("local/only.txt", "made for this test, pushed nowhere\n");

#[test]
fn a_container_of_an_imported_image_commits_with_no_registry() {
    with_env("local-image", Options::default(), |env| {
        let ns = env.namespace("li");
        let archive = env.dir().join("local-only.tar");
        let local = local_only_archive(&archive)?;
        let archive_arg = archive.display().to_string();
        env.ctr(
            &ns,
            &["images", "import", "--snapshotter", &env.snapshotter, &archive_arg],
        )?;
        let id = env.container_id("li");
        run_on_seamless(env, &ns, LOCAL_NAME, &id)?;
        let out = env.exec(
            &ns,
            &id,
            "mkdir -p /data && echo committed > /data/file && rm /srv/seamless/run.sh && sync && cat /local/only.txt",
        )?;
        ensure!(out == LOCAL_FILE.1, "the imported image's own layer: {out:?}");
        let expected = tree_of(&env.container_rootfs(&ns, &id))?;
        let work = env.dir().join("local-work");
        std::fs::create_dir_all(&work)?;
        let registry = RegistryClient::new(RegistryOptions {
            insecure: true,
            ..RegistryOptions::default()
        });
        let runtime = tokio::runtime::Runtime::new()?;

        // OCI: the base layers, copied from the content store, are pushed.
        let target = env.registry_ref("local/oci:1");
        let out = commit(env, &ns, &id, &target, "oci", &work)?;
        ensure!(out.status.success(), "OCI commit: {}", text(&out));
        let pushed = runtime.block_on(registry.pull_manifest_and_config(&target, &RegistryAuth::Anonymous))?;
        let pushed_layers: Vec<&str> = pushed.manifest.layers.iter().map(|l| l.digest.as_str()).collect();
        ensure!(
            pushed_layers.len() == local.layers.len() + 1 && pushed_layers[..local.layers.len()] == local.layers[..],
            "{target}: layers {pushed_layers:?}, the base's {:?} then the commit's expected",
            local.layers
        );
        expect_image_tree(env, &target, &expected, "local-oci")?;

        // Nydus: the base layers, converted from the content store's copies.
        let target = env.registry_ref("local/nydus:1");
        let out = commit(env, &ns, &id, &target, "nydus", &work)?;
        ensure!(out.status.success(), "Nydus commit: {}", text(&out));
        let rpull = build_rpull()?;
        let nydus_ns = env.namespace("li-nydus");
        run_rpull(env, &rpull, &nydus_ns, &target)?;
        let nydus_id = env.container_id("li-nydus");
        run_on_seamless(env, &nydus_ns, &target, &nydus_id)?;
        let after = tree_of(&env.container_rootfs(&nydus_ns, &nydus_id))?;
        let differences = diff_trees(&expected, &after);
        ensure!(
            differences.is_empty(),
            "{target} run on seamless differs from the committed container: {differences:?}"
        );
        let log = std::fs::read_to_string(env.dir().join("daemon.log"))?;
        ensure!(
            !log.contains("fetching it from its registry") && !log.contains("reading it from its registry"),
            "a registry was asked for the local image's base:\n{}",
            env.log_tail("daemon.log")
        );

        // A layer tampered with in the content store (same size, other
        // bytes) is refused there...
        let store = runtime.block_on(ContentStore::connect(&env.containerd_socket(), &ns))?;
        let top = Digest::parse(&local.layers[local.layers.len() - 1])?;
        let blob = env
            .dir()
            .join("containerd/io.containerd.content.v1.content/blobs/sha256")
            .join(top.hex());
        let mut bytes = std::fs::read(&blob)?;
        let size = bytes.len() as u64;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&blob, &bytes)?;
        let copy = work.join("tampered");
        let refused = runtime.block_on(store.copy_blob_to(&top, size, &copy));
        ensure!(
            matches!(refused, Err(ContentError::DigestMismatch { .. })),
            "a tampered blob was not refused: {refused:?}"
        );
        ensure!(
            !copy.exists() && !work.join("tampered.partial").exists(),
            "a refused blob left a file"
        );
        // ...and a commit that needs it fails: the registry it would come
        // from instead does not exist.
        let target = env.registry_ref("local/tampered:1");
        let out = commit(env, &ns, &id, &target, "oci", &work)?;
        ensure!(
            !out.status.success() && text(&out).contains("localhost"),
            "a commit on a tampered base: {}",
            text(&out)
        );
        let log = std::fs::read_to_string(env.dir().join("daemon.log"))?;
        ensure!(
            log.contains("does not match its digest"),
            "no refusal logged:\n{}",
            env.log_tail("daemon.log")
        );
        Ok(())
    });
}

#[test]
fn a_base_layer_gone_from_the_content_store_comes_from_the_registry() {
    with_env("local-gone", Options::default(), |env| {
        let ns = env.namespace("lg");
        env.pull(&ns)?;
        let id = env.container_id("lg");
        env.run_container(&ns, &id)?;
        env.exec(&ns, &id, "echo after-gc > /after-gc && sync")?;
        let expected = tree_of(&env.container_rootfs(&ns, &id))?;
        // As `discard_unpacked_layers` or a garbage collection leaves it:
        // the container's layer unpacked, its blob gone.
        let gone = env.image().diff_ids[1].clone();
        env.ctr(&ns, &["content", "rm", &gone])?;
        let held = env.ctr(&ns, &["content", "ls", "-q"])?;
        ensure!(!held.contains(&gone), "{gone} still in the content store:\n{held}");

        let work = env.dir().join("gone-work");
        std::fs::create_dir_all(&work)?;
        let target = env.registry_ref("gone/oci:1");
        let mut cmd = commit_command(env, &ns, &id, &target, "oci", &work);
        let out = cmd.arg("--source-insecure").output()?;
        ensure!(out.status.success(), "commit: {}", text(&out));
        let log = std::fs::read_to_string(env.dir().join("daemon.log"))?;
        ensure!(
            log.contains("base blob not in containerd's content store: fetching it from its registry")
                && log.contains("base blob copied from containerd's content store")
                && log.contains("base image read from containerd's content store"),
            "the layer in the store is copied, the one gone is fetched:\n{}",
            env.log_tail("daemon.log")
        );
        expect_image_tree(env, &target, &expected, "gone-oci")?;
        Ok(())
    });
}

/// What the local image is made of.
struct LocalImage {
    /// Layer digests as the manifest lists them, base first.
    layers: Vec<String>,
}

/// Writes to `path` an OCI archive of the test image with a third,
/// gzip-compressed layer holding [`LOCAL_FILE`], named [`LOCAL_NAME`]; its
/// target is an index naming the manifest for this platform.
fn local_only_archive(path: &Path) -> Result<LocalImage> {
    let built = image::build_image(LOCAL_NAME)?;
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut archive = tar::Archive::new(built.archive.as_slice());
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.display().to_string();
        if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            blobs.insert(format!("sha256:{hex}"), data);
        }
    }
    let base_manifest: serde_json::Value =
        serde_json::from_slice(blobs.get(&built.manifest_digest).context("the test image's manifest")?)?;
    let base_config_digest = base_manifest["config"]["digest"].as_str().context("config digest")?;
    let mut config: serde_json::Value =
        serde_json::from_slice(blobs.get(base_config_digest).context("the test image's config")?)?;

    let mut layer_tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    header.set_mtime(1_700_000_000);
    layer_tar.append_data(&mut header, "local", std::io::empty())?;
    let mut header = tar::Header::new_ustar();
    header.set_mode(0o644);
    header.set_size(LOCAL_FILE.1.len() as u64);
    header.set_mtime(1_700_000_000);
    layer_tar.append_data(&mut header, LOCAL_FILE.0, LOCAL_FILE.1.as_bytes())?;
    let layer_tar = layer_tar.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer_tar)?;
    let layer = gz.finish()?;

    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("diff_ids")?
        .push(json!(sha256_digest(&layer_tar)));
    config["history"]
        .as_array_mut()
        .context("history")?
        .push(json!({"created_by": "seamless integration test: local only", "created": "2023-11-14T22:13:20Z"}));
    let config = serde_json::to_vec(&config)?;
    let mut layers = base_manifest["layers"].as_array().context("layers")?.clone();
    layers.push(descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers,
    }))?;
    let mut manifest_entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    manifest_entry["platform"] = json!({
        "architecture": config_field(&config, "architecture")?,
        "os": "linux",
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_entry],
    }))?;
    let mut index_entry = descriptor("application/vnd.oci.image.index.v1+json", &index);
    index_entry["annotations"] = json!({
        "io.containerd.image.name": LOCAL_NAME,
        "org.opencontainers.image.ref.name": "1",
    });
    let top = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [index_entry],
    }))?;

    let layer_digests = layers
        .iter()
        .map(|l| l["digest"].as_str().map(str::to_string).context("layer digest"))
        .collect::<Result<Vec<_>>>()?;
    // The base layers and the old config; the old manifest is left out.
    blobs.remove(&built.manifest_digest);
    for blob in [config, manifest, index, layer] {
        blobs.insert(sha256_digest(&blob), blob);
    }
    let mut out = tar::Builder::new(std::fs::File::create(path)?);
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        out.append_data(&mut header, name, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &top)?;
    for (digest, data) in &blobs {
        add(&format!("blobs/sha256/{}", Digest::parse(digest)?.hex()), data)?;
    }
    out.into_inner()?.sync_all()?;
    Ok(LocalImage { layers: layer_digests })
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": sha256_digest(blob), "size": blob.len() })
}

fn config_field(config: &[u8], field: &str) -> Result<String> {
    let value: serde_json::Value = serde_json::from_slice(config)?;
    value[field].as_str().map(str::to_string).context("config field")
}

/// `checkpointctl seamless-commit --wait` of container `id` to `target` in
/// `format`, without `--source-insecure`: the source registry (if any) is
/// not to be asked.
fn commit_command(env: &Env, ns: &str, id: &str, target: &str, format: &str, work: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkpointctl"));
    cmd.arg("--address")
        .arg(env.daemon_socket())
        .arg("--namespace")
        .arg(ns)
        .args([
            "seamless-commit",
            "--container",
            id,
            "--target",
            target,
            "--format",
            format,
        ])
        .args(["--target-insecure", "--wait", "--work-dir"])
        .arg(work);
    cmd
}

fn commit(env: &Env, ns: &str, id: &str, target: &str, format: &str, work: &Path) -> Result<Output> {
    commit_command(env, ns, id, target, format, work)
        .output()
        .context("running checkpointctl seamless-commit")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
