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
use seamless_snapshotter::registry::{RegistryAuth, RegistryClient, RegistryError, RegistryHosts, RegistryOptions};

use super::env::{with_env_config, Options};

/// A docker-registry serving TLS with `cert` and `key`, killed on drop.
struct TlsRegistry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl TlsRegistry {
    fn start(dir: &Path, cert: &Path, key: &Path) -> Result<TlsRegistry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("tls-registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n",
                dir.join("tls-registry-data").display(),
                cert.display(),
                key.display()
            ),
        )?;
        let log = dir.join("tls-registry.log");
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

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
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
            let out = Command::new(env!("CARGO_BIN_EXE_checkpointctl"))
                .arg("--address")
                .arg(env.daemon_socket())
                .arg("--namespace")
                .arg(&ns)
                .args(["seamless-commit", "--container", &id, "--target", target])
                .args(["--format", "oci", "--work-dir"])
                .arg(&work)
                .arg("--wait")
                .output()?;
            Ok((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
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
