//! Seamless commit to a registry behind TLS with a private CA, trusted only
//! through the daemon's `[registry] config_path`: a containerd-style
//! `certs.d/<host:port>/hosts.toml` the test writes, naming the CA. The
//! commit (through `checkpointctl seamless-commit --wait`, without any
//! insecure flag) fails while no hosts.toml names the CA, and pushes once one
//! does; its base image comes from the environment's plain-HTTP loopback
//! registry, also without a flag. Credentials end to end wait for the
//! CLI's credential options (issue 14); tests/registry.rs covers them.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use seamless_snapshotter::oci::registry::{
    RegistryAuth, RegistryClient, RegistryError, RegistryHosts, RegistryOptions,
};

use super::env::{outcome, with_env_config, Options};

/// A docker-registry serving TLS with `cert` and `key`, killed on drop.
pub(super) struct TlsRegistry {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// The registry's user, and its password (bcrypt, cost 4, in `htpasswd`).
pub(super) const USER: &str = "committer";
pub(super) const PASSWORD: &str = "s3cret";
const PASSWORD_BCRYPT: &str = "$2b$04$EjA1GPfsgiPVVN66mk8FCu7uFkAiIBzwRfRSQJ9aL21vTSbsk/Ag6";

impl TlsRegistry {
    fn start(dir: &Path, cert: &Path, key: &Path) -> Result<TlsRegistry> {
        TlsRegistry::start_as(dir, "tls-registry", Some((cert, key)), false)
    }

    /// A registry named `name` under `dir`: TLS with `tls`, else plain
    /// HTTP; htpasswd basic auth for USER with `auth`.
    pub(super) fn start_as(dir: &Path, name: &str, tls: Option<(&Path, &Path)>, auth: bool) -> Result<TlsRegistry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join(format!("{name}.yml"));
        let mut text = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join(format!("{name}-data")).display(),
        );
        if let Some((cert, key)) = tls {
            text += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
        }
        if auth {
            let htpasswd = dir.join(format!("{name}.htpasswd"));
            std::fs::write(&htpasswd, format!("{USER}:{PASSWORD_BCRYPT}\n"))?;
            text += &format!(
                "auth:\n  htpasswd:\n    realm: seamless-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        std::fs::write(&config, text)?;
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting docker-registry with TLS")?;
        let mut registry = TlsRegistry { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = registry.child.try_wait()? {
                bail!("docker-registry exited with {status}: {}", registry.log_text());
            }
            if Instant::now() > deadline {
                bail!("docker-registry with TLS did not listen: {}", registry.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    pub(super) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn commit_pushes_to_a_tls_registry_trusted_through_hosts_toml() {
    // The daemon's configuration is written before the world starts; the
    // hosts.toml under it is read at each request, so it is written later.
    let certs_d = tempfile::tempdir().expect("certs.d");
    let config = format!("[registry]\nconfig_path = {:?}\n", certs_d.path().display().to_string());
    with_env_config("registry-tls", Options::default(), &config, |env| {
        let certs = env.dir().join("certs");
        let made = Command::new("sh")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/make-certs.sh"))
            .arg(&certs)
            .output()?;
        ensure!(
            made.status.success(),
            "make-certs.sh: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let registry = TlsRegistry::start(env.dir(), &certs.join("server.crt"), &certs.join("server.key"))?;
        let host = registry.host();

        let ns = env.namespace("tls");
        env.pull(&ns)?;
        let id = env.container_id("tls");
        env.run_container(&ns, &id)?;
        env.exec(&ns, &id, "mkdir -p /data && echo over-tls > /data/file && sync")?;
        let work = env.dir().join("tls-work");
        std::fs::create_dir_all(&work)?;
        let commit = |target: &str| -> Result<(i32, String, String)> {
            outcome(
                env.checkpointctl(&ns)
                    .args(["seamless-commit", "--container", &id, "--target", target])
                    .args(["--format", "oci", "--work-dir"])
                    .arg(&work)
                    .arg("--wait"),
            )
        };

        // No hosts.toml names the CA: the daemon does not trust the registry.
        let refused = format!("{host}/tls/app:refused");
        let (code, out, err) = commit(&refused)?;
        ensure!(code != 0, "a commit to an untrusted registry succeeded: {out} {err}");
        ensure!(
            err.contains("not trusted") || out.contains("not trusted"),
            "the failure names the untrusted certificate: {code} {out} {err}"
        );

        let host_dir = certs_d.path().join(&host);
        std::fs::create_dir_all(&host_dir)?;
        std::fs::copy(certs.join("ca.crt"), host_dir.join("ca.crt"))?;
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!("server = \"https://{host}\"\nca = \"ca.crt\"\n"),
        )?;
        let target = format!("{host}/tls/app:v1");
        let (code, out, err) = commit(&target)?;
        ensure!(
            code == 0,
            "commit through the CA of hosts.toml: {code} {out} {err}\n{}",
            registry.log_text()
        );

        // What the registry holds: the base image's layers and the commit's.
        let runtime = tokio::runtime::Runtime::new()?;
        let trusting = RegistryClient::new(RegistryOptions {
            hosts: RegistryHosts::at(certs_d.path()),
            ..RegistryOptions::default()
        });
        let base = runtime.block_on(trusting.pull_manifest_and_config(&env.image_ref(), &RegistryAuth::Anonymous))?;
        let pushed = runtime.block_on(trusting.pull_manifest_and_config(&target, &RegistryAuth::Anonymous))?;
        ensure!(
            pushed.manifest.layers.len() == base.manifest.layers.len() + 1,
            "the base image's layers and one commit layer: {:?}",
            pushed.manifest.layers
        );
        let untrusting = RegistryClient::new(RegistryOptions::default());
        match runtime.block_on(untrusting.pull_manifest_and_config(&target, &RegistryAuth::Anonymous)) {
            Err(RegistryError::UntrustedCertificate { .. }) => {}
            other => bail!("without the CA the registry must be untrusted: {other:?}"),
        }
        env.remove_container(&ns, &id)?;
        Ok(())
    })
}

/// Docker's config.json: `auths` for `hosts` with USER/PASSWORD.
pub(super) fn auths_config(hosts: &[&str]) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let entries: Vec<String> = hosts
        .iter()
        .map(|host| format!("{host:?}: {{\"auth\": {auth:?}}}"))
        .collect();
    format!("{{\"auths\": {{{}}}}}", entries.join(", "))
}

#[test]
fn credentials_from_config_json_a_helper_and_the_cli_reach_an_authenticated_registry() {
    use super::nydus::{build_rpull, rafs_mounts, run_container, run_rpull_with};
    use nix::sys::signal::Signal;

    let certs_d = tempfile::tempdir().expect("certs.d");
    let docker = tempfile::tempdir().expect("docker config dir");
    let docker_config = docker.path().join("config.json");
    let config = format!(
        "[registry]\nconfig_path = {:?}\ndocker_config = {:?}\n",
        certs_d.path().display().to_string(),
        docker_config.display().to_string()
    );
    with_env_config("registry-creds", Options::default(), &config, |env| {
        // A credential helper on the daemon's PATH, speaking the protocol:
        // the server URL on stdin, the credentials as JSON on stdout.
        let helpers = env.dir().join("helpers");
        std::fs::create_dir_all(&helpers)?;
        let asked = env.dir().join("helper-asked");
        let helper = helpers.join("docker-credential-seamlesstest");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\necho \"$server\" >> {}\n\
                 printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n",
                asked.display()
            ),
        )?;
        std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        env.signal_daemon(Signal::SIGTERM)?;
        let path = format!("{}:{}", helpers.display(), std::env::var("PATH").unwrap_or_default());
        env.start_daemon_with_env(&[("PATH", &path)])?;

        let certs = env.dir().join("certs");
        let made = Command::new("sh")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/make-certs.sh"))
            .arg(&certs)
            .output()?;
        ensure!(
            made.status.success(),
            "make-certs.sh: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let tls = TlsRegistry::start_as(
            env.dir(),
            "auth-tls-registry",
            Some((&certs.join("server.crt"), &certs.join("server.key"))),
            true,
        )?;
        let host = tls.host();
        let host_dir = certs_d.path().join(&host);
        std::fs::create_dir_all(&host_dir)?;
        std::fs::copy(certs.join("ca.crt"), host_dir.join("ca.crt"))?;
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!("server = \"https://{host}\"\nca = \"ca.crt\"\n"),
        )?;

        let ns = env.namespace("creds");
        // containerd redials the restarted daemon with a backoff.
        super::retry(super::REDIAL_TIMEOUT, "pull after the daemon's restart", || {
            env.pull(&ns)
        })?;
        let id = env.container_id("creds");
        env.run_container(&ns, &id)?;
        env.exec(&ns, &id, "mkdir -p /data && echo with-credentials > /data/file && sync")?;
        let work = env.dir().join("creds-work");
        std::fs::create_dir_all(&work)?;
        let commit = |target: &str, extra: &[&str]| -> Result<(i32, String, String)> {
            outcome(
                env.checkpointctl(&ns)
                    .args(["seamless-commit", "--container", &id, "--target", target, "--work-dir"])
                    .arg(&work)
                    .args(["--wait", "--wait-timeout", "5m"])
                    .args(extra),
            )
        };

        // No credentials anywhere: the registry refuses, exit 4.
        std::fs::write(&docker_config, "{}")?;
        let (code, out, err) = commit(&format!("{host}/creds/app:anonymous"), &["--format", "oci"])?;
        ensure!(
            code == 4 && err.contains("PERMISSION_DENIED"),
            "anonymous push: {code} {out} {err}"
        );

        // config.json auths.
        std::fs::write(&docker_config, auths_config(&[&host]))?;
        let (code, out, err) = commit(&format!("{host}/creds/app:auths"), &["--format", "oci"])?;
        ensure!(
            code == 0,
            "push with config.json auths: {code} {out} {err}\n{}",
            tls.log_text()
        );

        // A credential helper for the host (credHelpers).
        std::fs::write(
            &docker_config,
            format!("{{\"credHelpers\": {{\"{host}\": \"seamlesstest\"}}}}"),
        )?;
        let (code, out, err) = commit(&format!("{host}/creds/app:helper"), &["--format", "oci"])?;
        ensure!(code == 0, "push with a credential helper: {code} {out} {err}");
        let asked_for = std::fs::read_to_string(&asked).unwrap_or_default();
        ensure!(
            asked_for.lines().any(|l| l.contains(&host)),
            "the helper was asked for {host}: {asked_for:?}"
        );

        // The caller's own credentials for one request; a wrong password.
        std::fs::write(&docker_config, "{}")?;
        let creds = format!("{USER}:{PASSWORD}");
        let (code, out, err) = commit(
            &format!("{host}/creds/app:flag"),
            &["--format", "oci", "--target-creds", &creds],
        )?;
        ensure!(code == 0, "push with --target-creds: {code} {out} {err}");
        let wrong = "Wr0ng-pa55word-7731";
        let (code, out, err) = commit(
            &format!("{host}/creds/app:wrong"),
            &["--format", "oci", "--target-creds", &format!("{USER}:{wrong}")],
        )?;
        ensure!(code == 4, "a wrong password exits 4: {code} {out} {err}");
        let log = std::fs::read_to_string(env.dir().join("daemon.log"))?;
        for secret in [wrong, PASSWORD] {
            ensure!(
                !out.contains(secret) && !err.contains(secret) && !log.contains(secret),
                "a password was printed or logged"
            );
        }

        // A Nydus image on an authenticated registry, run lazily: containerd
        // pulls the bootstrap with its credentials, the daemon reads chunks
        // with the keychain's.
        let plain = TlsRegistry::start_as(env.dir(), "auth-plain-registry", None, true)?;
        std::fs::write(&docker_config, auths_config(&[&host, &plain.host()]))?;
        let nydus = format!("{}/creds/nydus:1", plain.host());
        let (code, out, err) = commit(&nydus, &["--format", "nydus"])?;
        ensure!(code == 0, "Nydus push with config.json auths: {code} {out} {err}");
        let rpull = build_rpull()?;
        let run_ns = env.namespace("creds-run");
        run_rpull_with(env, &rpull, &run_ns, &nydus, &["--user", &creds])?;
        let blobs = env.daemon_root().join("nydus/blobs");
        let fetched = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        ensure!(fetched == 0, "the pull fetched {fetched} blobs whole");
        let run_id = env.container_id("creds-run");
        run_container(env, &run_ns, &nydus, &run_id)?;
        ensure!(
            rafs_mounts(env)?.iter().any(|(_, kind)| kind == "fuse.rafs"),
            "the image is served lazily over FUSE"
        );
        let file = std::fs::read_to_string(env.container_rootfs(&run_ns, &run_id).join("data/file"))?;
        ensure!(
            file == "with-credentials\n",
            "the committed file, read lazily: {file:?}"
        );
        ensure!(
            std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0) == 0,
            "chunks are read from the registry, no blob is fetched whole"
        );
        env.remove_container(&run_ns, &run_id)?;
        env.remove_container(&ns, &id)?;
        Ok(())
    })
}

/// A mirror in hosts.toml serves what the upstream cannot: with the base
/// image gone from containerd's content store and its registry down, a
/// commit fails until hosts.toml names a mirror holding the image, then
/// reads the base from the mirror.
#[test]
fn a_mirror_in_hosts_toml_serves_the_base_when_the_upstream_is_down() {
    let certs_d = tempfile::tempdir().expect("certs.d");
    let config = format!("[registry]\nconfig_path = {:?}\n", certs_d.path().display().to_string());
    with_env_config("registry-mirror", Options::default(), &config, |env| {
        let ns = env.namespace("mirror");
        env.pull(&ns)?;
        let id = env.container_id("mirror");
        env.run_container(&ns, &id)?;
        env.exec(&ns, &id, "echo mirrored > /mirrored && sync")?;
        // The mirror holds a copy of the upstream's repositories (start_as
        // serves <dir>/<name>-data).
        let copied = Command::new("cp")
            .arg("-a")
            .arg(env.registry_storage())
            .arg(env.dir().join("mirror-registry-data"))
            .status()?;
        ensure!(copied.success(), "copying the registry's storage");
        let mirror = TlsRegistry::start_as(env.dir(), "mirror-registry", None, false)?;
        let upstream = env.image_ref();
        let upstream_host = upstream.split('/').next().context("host")?.to_string();
        // The base image leaves containerd's content store (the container
        // keeps its snapshots), and its registry goes down.
        env.ctr(&ns, &["images", "rm", "--sync", &upstream])?;
        env.stop_registry();

        let work = env.dir().join("mirror-work");
        std::fs::create_dir_all(&work)?;
        let commit = |target: &str| -> Result<(i32, String, String)> {
            outcome(
                env.checkpointctl(&ns)
                    .args([
                        "seamless-commit",
                        "--container",
                        &id,
                        "--target",
                        target,
                        "--format",
                        "oci",
                    ])
                    .arg("--work-dir")
                    .arg(&work)
                    .args(["--wait", "--wait-timeout", "5m"]),
            )
        };
        let target = format!("{}/committed/app:mirrored", mirror.host());
        let (code, out, err) = commit(&target)?;
        ensure!(
            code != 0 && err.contains("reading the base image"),
            "without a mirror the base cannot be read: {code} {out} {err}"
        );

        let host_dir = certs_d.path().join(&upstream_host);
        std::fs::create_dir_all(&host_dir)?;
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"http://{upstream_host}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                mirror.host()
            ),
        )?;
        let (code, out, err) = commit(&target)?;
        ensure!(
            code == 0,
            "the mirror serves the base: {code} {out} {err}\n{}",
            mirror.log_text()
        );
        let repository = super::image::REPOSITORY;
        ensure!(
            mirror.log_text().contains(&format!("/v2/{repository}/manifests/")),
            "the base manifest was read from the mirror"
        );
        let runtime = tokio::runtime::Runtime::new()?;
        let client = RegistryClient::new(RegistryOptions::default());
        let pushed = runtime.block_on(client.pull_manifest_and_config(&target, &RegistryAuth::Anonymous))?;
        ensure!(
            pushed.manifest.layers.len() >= 2,
            "base layers and the commit's: {:?}",
            pushed.manifest.layers
        );
        env.remove_container(&ns, &id)?;
        Ok(())
    })
}
