//! A private Docker engine per test: dockerd with its own config file
//! (data-root, exec-root, pidfile and socket under the test's directory,
//! no iptables, no bridge, experimental mode for checkpoints), the
//! reference's `alpine:latest` imported from a busybox root filesystem (no
//! image can be pulled here), and the programs under test pointed at it
//! through `DOCKER_HOST`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// How long dockerd may take to answer after its start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `flocker FILE`: takes an exclusive flock(2) on FILE, then counts as
/// the reference's counter does, a line a second.
const FLOCKER: &str = r#"
#include <sys/file.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
    if (fd < 0 || flock(fd, LOCK_EX) != 0) { perror("flock"); return 1; }
    for (unsigned long i = 0;; i++) { printf("Counter: %lu\n", i); fflush(stdout); sleep(1); }
}
"#;

pub struct DockerEnv {
    dir: PathBuf,
    dockerd: Option<Child>,
    /// Our daemons, by node name (see [`DockerEnv::start_daemon`]).
    daemons: Vec<Child>,
}

impl DockerEnv {
    /// Starts an engine for `test` under a fresh directory of /tmp.
    pub fn start(test: &str) -> Result<DockerEnv> {
        let missing: Vec<&str> = ["dockerd", "docker", "runc", "criu", "busybox", "cc"]
            .into_iter()
            .filter(|tool| {
                !Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .collect();
        ensure!(nix::unistd::geteuid().is_root(), "the docker tests run as root");
        ensure!(missing.is_empty(), "missing programs: {missing:?} (run .ci/setup)");
        let dir = PathBuf::from(format!("/tmp/sit-docker-{test}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let config = serde_json::json!({
            "data-root": dir.join("data"),
            "exec-root": dir.join("exec"),
            "pidfile": dir.join("docker.pid"),
            "hosts": [format!("unix://{}", dir.join("docker.sock").display())],
            "iptables": false,
            "ip-masq": false,
            "bridge": "none",
            "experimental": true,
            "storage-driver": "overlay2",
        });
        std::fs::write(dir.join("daemon.json"), config.to_string())?;
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let dockerd = Command::new("dockerd")
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start dockerd")?;
        let env = DockerEnv {
            dir,
            dockerd: Some(dockerd),
            daemons: Vec::new(),
        };
        let started = Instant::now();
        loop {
            if env.docker(&["version", "--format", "{{.Server.Version}}"]).is_ok() {
                break;
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "dockerd did not answer within {START_TIMEOUT:?}; its log:\n{}",
                    std::fs::read_to_string(env.dir.join("dockerd.log")).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(200));
        }
        env.import_alpine()?;
        Ok(env)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    /// A busybox root filesystem imported as `alpine:latest`.
    fn import_alpine(&self) -> Result<()> {
        let rootfs = self.dir.join("rootfs");
        for sub in ["bin", "tmp", "etc", "proc", "sys", "dev"] {
            std::fs::create_dir_all(rootfs.join(sub))?;
        }
        let busybox = String::from_utf8(Command::new("sh").args(["-c", "command -v busybox"]).output()?.stdout)?;
        std::fs::copy(busybox.trim(), rootfs.join("bin/busybox"))?;
        for applet in ["sh", "echo", "sleep", "cat", "ls", "ps", "true", "wc", "tail", "nc"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        // Busybox has no flock: a static program that holds one.
        let source = self.dir.join("flocker.c");
        std::fs::write(&source, FLOCKER)?;
        let out = Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(rootfs.join("bin/flocker"))
            .arg(&source)
            .output()
            .context("run cc")?;
        ensure!(
            out.status.success(),
            "cc flocker.c: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = format!(
            "tar -C {} -c . | DOCKER_HOST={} docker import - alpine:latest",
            rootfs.display(),
            self.host()
        );
        let out = Command::new("sh").args(["-c", &script]).output()?;
        ensure!(
            out.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Starts our daemon as node `node` (its root and socket under the
    /// test's directory, directory storage), reaching this engine through
    /// `[docker] address`. Returns its socket.
    pub fn start_daemon(&mut self, node: &str) -> Result<PathBuf> {
        let root = self.dir.join(format!("{node}-root"));
        // Its own directory: the daemon puts its REST socket beside it.
        let run = self.dir.join(format!("{node}-run"));
        std::fs::create_dir_all(&run)?;
        let socket = run.join("daemon.sock");
        let config = self.dir.join(format!("{node}.toml"));
        std::fs::write(
            &config,
            format!(
                "version = 1\n[storage]\nbackend = \"directory\"\n[docker]\naddress = \"{}\"\n",
                self.dir.join("docker.sock").display()
            ),
        )?;
        let log = std::fs::File::create(self.dir.join(format!("{node}.log")))?;
        let child = Command::new(env!("CARGO_BIN_EXE_containerd-seamless-grpc"))
            .arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(&socket)
            .arg("--containerd-address")
            .arg(self.dir.join("no-containerd.sock"))
            .arg("--config")
            .arg(&config)
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start containerd-seamless-grpc")?;
        self.daemons.push(child);
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "daemon {node} did not serve within {START_TIMEOUT:?}; its log:\n{}",
                    std::fs::read_to_string(self.dir.join(format!("{node}.log"))).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(50));
        }
        Ok(socket)
    }

    /// `checkpointctl` of the daemon at `socket`, with the config file
    /// `config` (YAML), on `args`; prints what it said.
    pub fn checkpointctl(&self, socket: &Path, config: &Path, args: &[&str]) -> Result<Output> {
        let out = Command::new(env!("CARGO_BIN_EXE_checkpointctl"))
            .arg("--address")
            .arg(socket)
            .args(["--namespace", "sit-docker", "--config"])
            .arg(config)
            .args(args)
            .output()
            .context("run checkpointctl")?;
        eprintln!(
            "checkpointctl {} -> {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// Runs Docker's CLI against this engine; fails unless it succeeds.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self.docker_output(args)?;
        ensure!(
            out.status.success(),
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn docker_output(&self, args: &[&str]) -> Result<Output> {
        Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", self.host())
            .output()
            .context("run docker")
    }

    /// Runs the `docker-checkpoint` under test against this engine.
    pub fn checkpoint_tool(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new(env!("CARGO_BIN_EXE_docker-checkpoint"))
            .args(args)
            .env("DOCKER_HOST", self.host())
            .output()
            .context("run docker-checkpoint")?;
        eprintln!(
            "docker-checkpoint {} -> {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// The container's `docker inspect` field `format` (a Go template).
    pub fn inspect(&self, container: &str, format: &str) -> Result<String> {
        Ok(self.docker(&["inspect", "-f", format, container])?.trim().to_string())
    }

    /// Waits until the container's log holds `needle`.
    pub fn wait_for_log(&self, container: &str, needle: &str, timeout: Duration) -> Result<String> {
        let started = Instant::now();
        loop {
            let out = self.docker_output(&["logs", container])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains(needle) {
                return Ok(text);
            }
            if started.elapsed() > timeout {
                bail!("{container} did not log {needle:?} within {timeout:?}; it logged:\n{text}");
            }
            sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for DockerEnv {
    fn drop(&mut self) {
        // Containers first, so that dockerd leaves no shim or mount behind.
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker_output(&args);
            }
        }
        for mut daemon in self.daemons.drain(..) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && !matches!(daemon.try_wait(), Ok(Some(_))) {
                sleep(Duration::from_millis(50));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if let Some(mut dockerd) = self.dockerd.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(dockerd.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if matches!(dockerd.try_wait(), Ok(Some(_))) {
                    break;
                }
                sleep(Duration::from_millis(100));
            }
            let _ = dockerd.kill();
            let _ = dockerd.wait();
        }
        // Whatever dockerd left mounted under the directory goes first.
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "grep -o ' {}/[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l",
                    self.dir.display()
                ),
            ])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
