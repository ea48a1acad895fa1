//! `checkpointctl image pull` on real containerd: a Nydus image is pulled
//! with the labels CRI gives each layer, so the daemon adopts its data
//! blobs and containerd downloads none of them; the OCI test image is
//! unpacked layer by layer; a registry asking for credentials is answered
//! from a Docker config file; a mirror is found through `--hosts-dir`; and
//! a layer whose bytes do not match its digest, or a config whose diff ids
//! do not describe the layers, fails the pull with nothing left in
//! containerd's images store.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use seamless_snapshotter::oci::registry::{LayerData, LayerSource, RegistryAuth, RegistryClient, RegistryOptions};

use super::check_image_content;
use super::env::{outcome, with_env, Env, Options};
use super::nydus::{convert_and_push, rafs_mounts, run_container};
use super::registry_auth::{auths_config, TlsRegistry, PASSWORD, USER};

/// `checkpointctl --namespace NS image pull --containerd-address <env's>
/// --snapshotter <env's> EXTRA... REF`.
fn image_pull(env: &Env, ns: &str, reference: &str, extra: &[&str]) -> Command {
    let mut cmd = env.checkpointctl(ns);
    cmd.args(["image", "pull", "--containerd-address"])
        .arg(env.containerd_socket())
        .args(["--snapshotter", &env.snapshotter])
        .args(extra)
        .arg(reference);
    cmd
}

/// Runs the pull, which must succeed; returns its stdout and stderr.
fn pulled(env: &Env, ns: &str, reference: &str, extra: &[&str]) -> Result<(String, String)> {
    let (code, out, err) = outcome(&mut image_pull(env, ns, reference, extra))?;
    ensure!(code == 0, "image pull of {reference} exited {code}:\n{out}{err}");
    Ok((out, err))
}

/// The manifest digest the registry serves for `reference`.
fn manifest_digest(reference: &str, auth: &RegistryAuth) -> Result<String> {
    let registry = RegistryClient::new(RegistryOptions {
        insecure: true,
        ..RegistryOptions::default()
    });
    let runtime = tokio::runtime::Runtime::new()?;
    Ok(runtime
        .block_on(registry.pull_manifest_and_config(reference, auth))?
        .manifest_digest)
}

#[test]
fn image_pull_adopts_nydus_blobs_and_unpacks_oci_layers() {
    // erofs fetches blobs whole at pull time, so the adoption shows on disk.
    let options = Options {
        nydus_fs_driver: Some("erofs"),
        ..Options::default()
    };
    with_env("pull", options, |env| {
        ensure!(
            env.snapshotter == "seamless",
            "Nydus images need the seamless snapshotter"
        );
        let nydus_ref = env.registry_ref("pull-nydus:1");
        let blob_digests = convert_and_push(env, &nydus_ref)?;
        let ns = env.namespace("p");

        let (out, err) = pulled(env, &ns, &nydus_ref, &["--plain-http"])?;
        eprint!("image pull of {nydus_ref}:\n{err}{out}");
        let digest = manifest_digest(&nydus_ref, &RegistryAuth::Anonymous)?;
        ensure!(
            out == format!("{nydus_ref} {digest}\n"),
            "stdout {out:?}, manifest {digest}"
        );
        for blob in &blob_digests {
            ensure!(
                err.lines()
                    .any(|l| l.starts_with(blob.as_str()) && l.ends_with("adopted by the snapshotter")),
                "blob layer {blob} not adopted:\n{err}"
            );
            let file = env
                .daemon_root()
                .join("nydus/blobs")
                .join(blob.trim_start_matches("sha256:"));
            ensure!(file.is_file(), "the daemon did not fetch {blob} to {}", file.display());
        }
        ensure!(
            err.lines().filter(|l| l.ends_with(" unpacked")).count() == 1,
            "only the bootstrap layer is unpacked by containerd:\n{err}"
        );
        let content = env.ctr(&ns, &["content", "ls", "-q"])?;
        for blob in &blob_digests {
            ensure!(
                !content.contains(blob.as_str()),
                "containerd downloaded Nydus blob {blob}:\n{content}"
            );
        }
        ensure!(
            content.contains(&digest),
            "the manifest is not in the content store:\n{content}"
        );

        let id = env.container_id("nydus");
        run_container(env, &ns, &nydus_ref, &id)?;
        ensure!(rafs_mounts(env)?.len() == 1, "the container's root is not on a RAFS");
        check_image_content(env, &ns, &id)?;

        // Pulled again: every layer exists, the image record stays.
        let (_, again) = pulled(env, &ns, &nydus_ref, &["--plain-http"])?;
        ensure!(
            again.lines().count() == blob_digests.len() + 1 && again.lines().all(|l| l.ends_with(" exists")),
            "a second pull should find every layer:\n{again}"
        );

        // The plain OCI image: every layer unpacked by containerd.
        let oci_ref = env.image_ref();
        let (out, err) = pulled(env, &ns, &oci_ref, &["--plain-http"])?;
        ensure!(out.starts_with(&format!("{oci_ref} sha256:")), "stdout {out:?}");
        ensure!(
            !err.is_empty() && err.lines().all(|l| l.ends_with(" unpacked")),
            "every OCI layer is unpacked:\n{err}"
        );
        let oci_id = env.container_id("oci");
        env.run_container(&ns, &oci_id)?;
        check_image_content(env, &ns, &oci_id)?;
        Ok(())
    });
}

/// Copies the environment's OCI test image to `target` with `auth`.
fn copy_test_image(env: &Env, target: &str, auth: &RegistryAuth) -> Result<()> {
    copy_test_image_with(env, target, auth, |_| {})
}

/// [`copy_test_image`], its config changed by `edit` first.
fn copy_test_image_with(
    env: &Env,
    target: &str,
    auth: &RegistryAuth,
    edit: impl Fn(&mut serde_json::Value),
) -> Result<()> {
    let registry = RegistryClient::new(RegistryOptions {
        insecure: true,
        ..RegistryOptions::default()
    });
    let runtime = tokio::runtime::Runtime::new()?;
    let source = env.image_ref();
    let pulled = runtime.block_on(registry.pull_manifest_and_config(&source, &RegistryAuth::Anonymous))?;
    let work = env.dir().join("pull-copy");
    std::fs::create_dir_all(&work)?;
    let mut layers = Vec::new();
    for (i, layer) in pulled.manifest.layers.iter().enumerate() {
        let file = work.join(format!("layer-{i}"));
        runtime.block_on(registry.pull_blob_to(
            &source,
            &layer.digest,
            u64::try_from(layer.size)?,
            &file,
            &RegistryAuth::Anonymous,
        ))?;
        layers.push(LayerSource {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: u64::try_from(layer.size)?,
            annotations: BTreeMap::new(),
            data: LayerData::File(file),
        });
    }
    let mut config: serde_json::Value = serde_json::from_slice(&pulled.config)?;
    edit(&mut config);
    let config = serde_json::to_vec(&config)?;
    runtime.block_on(registry.push_image(target, &layers, &config, BTreeMap::new(), auth))?;
    Ok(())
}

#[test]
fn image_pull_answers_a_registry_with_credentials_from_a_docker_config() {
    with_env("pull-auth", Options::default(), |env| {
        let registry = TlsRegistry::start_as(env.dir(), "pull-auth-registry", None, true)?;
        let host = registry.host();
        let reference = format!("{host}/auth/app:1");
        let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
        copy_test_image(env, &reference, &auth)?;
        let ns = env.namespace("a");
        let docker = env.dir().join("pull-docker");
        std::fs::create_dir_all(&docker)?;

        // No credentials: refused, exit 4, no image.
        std::fs::write(docker.join("config.json"), "{}")?;
        let (code, out, err) =
            outcome(image_pull(env, &ns, &reference, &["--plain-http"]).env("DOCKER_CONFIG", &docker))?;
        ensure!(
            code == 4,
            "an anonymous pull should be refused with exit 4: {code} {out} {err}"
        );
        ensure!(
            env.ctr(&ns, &["images", "ls", "-q"])?.trim().is_empty(),
            "a refused pull left an image"
        );

        // config.json auths.
        std::fs::write(docker.join("config.json"), auths_config(&[&host]))?;
        let (code, out, err) =
            outcome(image_pull(env, &ns, &reference, &["--plain-http"]).env("DOCKER_CONFIG", &docker))?;
        ensure!(
            code == 0,
            "pull with config.json auths: {code} {out} {err}\n{}",
            registry.log_text()
        );
        ensure!(out.starts_with(&format!("{reference} sha256:")), "stdout {out:?}");

        // --user wins over an empty config, in another namespace.
        std::fs::write(docker.join("config.json"), "{}")?;
        let ns2 = env.namespace("u");
        let user = format!("{USER}:{PASSWORD}");
        let (code, out, err) = outcome(
            image_pull(env, &ns2, &reference, &["--plain-http", "--user", &user]).env("DOCKER_CONFIG", &docker),
        )?;
        ensure!(code == 0, "pull with --user: {code} {out} {err}");

        let id = env.container_id("auth");
        run_container(env, &ns, &reference, &id)?;
        check_image_content(env, &ns, &id)?;
        Ok(())
    });
}

/// No image record and no snapshot of an unpack in `ns`.
fn nothing_left(env: &Env, ns: &str) -> Result<()> {
    ensure!(
        env.ctr(ns, &["images", "ls", "-q"])?.trim().is_empty(),
        "a failed pull left an image record"
    );
    ensure!(
        !env.ctr(ns, &["snapshots", "--snapshotter", &env.snapshotter, "ls"])?
            .lines()
            .any(|l| l.contains("extract-")),
        "a failed pull left its active snapshot"
    );
    Ok(())
}

#[test]
fn image_pull_refuses_a_layer_that_does_not_match_its_digest() {
    with_env("pull-bad", Options::default(), |env| {
        // A config whose diff ids do not describe the layers: refused
        // before anything is made, and after the layer is applied.
        let short = env.registry_ref("pull-bad/ids:short");
        copy_test_image_with(env, &short, &RegistryAuth::Anonymous, |config| {
            if let Some(ids) = config["rootfs"]["diff_ids"].as_array_mut() {
                ids.pop();
            }
        })?;
        let ns = env.namespace("i");
        let (code, out, err) = outcome(&mut image_pull(env, &ns, &short, &["--plain-http"]))?;
        ensure!(
            code == 2 && err.contains("diff ids"),
            "a config with a diff id too few: {code} {out} {err}"
        );
        nothing_left(env, &ns)?;
        let wrong = env.registry_ref("pull-bad/ids:wrong");
        copy_test_image_with(env, &wrong, &RegistryAuth::Anonymous, |config| {
            config["rootfs"]["diff_ids"][0] = serde_json::json!(format!("sha256:{}", "0".repeat(64)));
        })?;
        let (code, out, err) = outcome(&mut image_pull(env, &ns, &wrong, &["--plain-http"]))?;
        ensure!(
            code == 2 && err.contains("names diff id sha256:0000"),
            "a config naming a wrong diff id: {code} {out} {err}"
        );
        nothing_left(env, &ns)?;

        // A copy of the test image whose layer bytes are then damaged in the
        // registry's storage: the registry serves them as they are.
        let reference = env.registry_ref("pull-bad/app:1");
        copy_test_image(env, &reference, &RegistryAuth::Anonymous)?;
        let registry = RegistryClient::new(RegistryOptions {
            insecure: true,
            ..RegistryOptions::default()
        });
        let runtime = tokio::runtime::Runtime::new()?;
        let pulled = runtime.block_on(registry.pull_manifest_and_config(&reference, &RegistryAuth::Anonymous))?;
        let layer = pulled.manifest.layers.last().context("the test image has layers")?;
        let hex = layer.digest.trim_start_matches("sha256:");
        let data = env
            .registry_storage()
            .join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
        let mut bytes = std::fs::read(&data).with_context(|| format!("reading {}", data.display()))?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&data, bytes)?;

        let ns = env.namespace("b");
        let (code, out, err) = outcome(&mut image_pull(env, &ns, &reference, &["--plain-http"]))?;
        eprint!("image pull of a damaged layer:\n{err}");
        ensure!(code != 0, "a pull of a damaged layer succeeded: {out}");
        ensure!(
            err.contains(&layer.digest) && err.to_lowercase().contains("digest"),
            "the error should name the layer and its digest: {err}"
        );
        nothing_left(env, &ns)?;
        Ok(())
    });
}

#[test]
fn image_pull_reads_a_mirror_from_its_hosts_dir() {
    with_env("pull-hosts", Options::default(), |env| {
        // The image's registry is down (nothing listens on its port); the
        // hosts.toml of --hosts-dir names the test registry as its mirror.
        let upstream = format!("127.0.0.1:{}", super::env::free_port()?);
        copy_test_image(env, &env.registry_ref("pull-mirror/app:1"), &RegistryAuth::Anonymous)?;
        let mirror = env.registry_ref("");
        let mirror = mirror.trim_end_matches('/');
        let certs_d = env.dir().join("pull-certs.d");
        let host_dir = certs_d.join(&upstream);
        std::fs::create_dir_all(&host_dir)?;
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!("server = \"http://{upstream}\"\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
        )?;
        let reference = format!("{upstream}/pull-mirror/app:1");
        let ns = env.namespace("h");
        let (out, _) = pulled(env, &ns, &reference, &["--hosts-dir", &certs_d.display().to_string()])?;
        ensure!(out.starts_with(&format!("{reference} sha256:")), "stdout {out:?}");
        let id = env.container_id("mirror");
        run_container(env, &ns, &reference, &id)?;
        check_image_content(env, &ns, &id)?;
        Ok(())
    });
}
