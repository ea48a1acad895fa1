//! One private world per test: a temporary directory holding a
//! docker-registry, our daemon, and a containerd configured with the daemon as
//! the proxy snapshotter `seamless`; the test image built and pushed to that
//! registry. Everything is torn down on drop: containers killed and deleted,
//! processes stopped, mounts under the directory unmounted (the daemon's
//! loop-mounted btrfs pool included), the directory removed. When the test
//! panics, the logs of the daemon, containerd and the registry are printed
//! first.
//!
//! This module owns processes and paths; what a test checks lives in the test.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::image::{self, BuiltImage};

/// The daemon under test.
const DAEMON_BIN: &str = env!("CARGO_BIN_EXE_containerd-seamless-grpc");

/// The snapshotter the tests drive: `seamless` (our daemon) unless
/// `SEAMLESS_IT_SNAPSHOTTER` names another, e.g. containerd's `overlayfs`,
/// to check the tests themselves while the daemon is unfinished.
fn snapshotter_under_test() -> String {
    std::env::var("SEAMLESS_IT_SNAPSHOTTER").unwrap_or_else(|_| "seamless".to_string())
}

/// Commands and files every test needs; a missing one fails the test.
const REQUIRED_COMMANDS: &[&str] = &[
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    "runc",
    "docker-registry",
    "mkfs.btrfs",
    "umount",
    // Certificates of the TCP Control API (tests/tls/make-certs.sh).
    "openssl",
    // Process-state checkpoints (packaging/criu/install.sh provides one).
    "criu",
];

const CTR_TIMEOUT: Duration = Duration::from_secs(90);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How a test wants its containerd.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Load containerd's CRI plugin with `snapshotter = "seamless"`; the other
    /// tests disable it (they do not need it, and it adds a stream server).
    pub cri: bool,
    /// `[nydus] fs_driver` of the daemon; None keeps the default ("auto").
    pub nydus_fs_driver: Option<&'static str>,
}

/// A row of `ctr snapshots ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub key: String,
    pub parent: String,
    pub kind: String,
}

/// A row of `ctr snapshots usage -b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub key: String,
    pub size: u64,
    pub inodes: u64,
}

pub struct Env {
    test: String,
    dir: Option<tempfile::TempDir>,
    pub snapshotter: String,
    registry: Option<Child>,
    registry_port: u16,
    daemon: Option<Child>,
    /// The daemon's binary: [`DAEMON_BIN`] unless a test upgrades it.
    daemon_bin: PathBuf,
    containerd: Option<Child>,
    namespaces: BTreeSet<String>,
    /// `[nydus] fs_driver` written into the daemon's configuration.
    nydus_fs_driver: Option<&'static str>,
    /// More of the daemon's configuration (TOML sections), set before start.
    daemon_config: String,
    image: Option<BuiltImage>,
    exec_counter: AtomicU64,
}

impl Env {
    /// An empty world; `start` brings it up. Split so that a failing start is
    /// still torn down (and its logs printed) by `Drop`.
    pub fn new(test: &str) -> Env {
        Env {
            test: test.to_string(),
            dir: None,
            snapshotter: snapshotter_under_test(),
            registry: None,
            registry_port: 0,
            daemon: None,
            daemon_bin: PathBuf::from(DAEMON_BIN),
            containerd: None,
            namespaces: BTreeSet::new(),
            nydus_fs_driver: None,
            daemon_config: String::new(),
            image: None,
            exec_counter: AtomicU64::new(0),
        }
    }

    /// Adds `toml` (whole sections) to the daemon's configuration file.
    pub fn with_daemon_config(mut self, toml: &str) -> Env {
        self.daemon_config.push_str(toml);
        self
    }

    pub fn start(&mut self, options: Options) -> Result<()> {
        check_prerequisites()?;
        // Short: unix socket paths must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("sit-")
            .tempdir_in("/tmp")
            .context("creating the test directory")?;
        self.dir = Some(dir);
        self.nydus_fs_driver = options.nydus_fs_driver;
        self.start_registry()?;
        self.start_daemon()?;
        self.start_containerd(options)?;
        self.push_test_image()?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("Env::start ran").path()
    }

    pub fn daemon_root(&self) -> PathBuf {
        self.dir().join("seamless")
    }

    pub fn daemon_socket(&self) -> PathBuf {
        self.dir().join("s.sock")
    }

    /// One request on the daemon's REST socket (`rest.sock` beside its
    /// gRPC socket), `body` sent as JSON: the status and the body.
    pub fn rest(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let mut stream = UnixStream::connect(self.daemon_socket().with_file_name("rest.sock"))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response.split(' ').nth(1).unwrap_or("0").parse()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.dir().join("c.sock")
    }

    fn containerd_root(&self) -> PathBuf {
        self.dir().join("containerd")
    }

    /// Where the snapshotter under test keeps `snapshots/<id>/{fs,work}`.
    pub fn storage_dir(&self) -> PathBuf {
        if self.snapshotter == "seamless" {
            let pool = self.daemon_root().join("pool");
            if is_mount_point(&pool) {
                pool
            } else {
                self.daemon_root()
            }
        } else {
            self.containerd_root()
                .join(format!("io.containerd.snapshotter.v1.{}", self.snapshotter))
        }
    }

    pub fn image_ref(&self) -> String {
        format!("127.0.0.1:{}/{}:{}", self.registry_port, image::REPOSITORY, image::TAG)
    }

    /// Another repository on the test registry.
    pub fn registry_ref(&self, repository_and_tag: &str) -> String {
        format!("127.0.0.1:{}/{repository_and_tag}", self.registry_port)
    }

    /// The merged root filesystem of a running container, as the host sees it.
    pub fn container_rootfs(&self, ns: &str, id: &str) -> PathBuf {
        self.dir()
            .join(format!("state/io.containerd.runtime.v2.task/{ns}/{id}/rootfs"))
    }

    pub fn image(&self) -> &BuiltImage {
        self.image.as_ref().expect("Env::start pushed the image")
    }

    /// A namespace unique to this test and process (several containerd
    /// instances share `/run/containerd/runc/<ns>`); removed at teardown.
    pub fn namespace(&mut self, name: &str) -> String {
        let ns = format!("sit-{}-{}-{}", self.test, name, std::process::id());
        self.namespaces.insert(ns.clone());
        ns
    }

    /// A container id unique across processes, for the same reason.
    pub fn container_id(&self, name: &str) -> String {
        format!("{}-{}-{}", self.test, name, std::process::id())
    }

    // ----- registry -------------------------------------------------------

    fn start_registry(&mut self) -> Result<()> {
        let storage = self.dir().join("registry");
        std::fs::create_dir_all(&storage)?;
        let mut last_error = None;
        // A free port can be taken between probing and binding: retry.
        for _ in 0..5 {
            let port = free_port()?;
            let config = self.dir().join("registry.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                     delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                    storage.display()
                ),
            )?;
            let log = self.log_file("registry.log")?;
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting docker-registry")?;
            self.registry = Some(child);
            self.registry_port = port;
            match self.wait_registry() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last_error = Some(e);
                    if let Some(mut child) = self.registry.take() {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("registry did not start")))
    }

    /// `checkpointctl --address <the daemon> --namespace <ns>`, to add the
    /// command's own arguments to.
    pub fn checkpointctl(&self, ns: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkpointctl"));
        cmd.arg("--address")
            .arg(self.daemon_socket())
            .arg("--namespace")
            .arg(ns);
        cmd
    }

    /// Stops the environment's registry, as an upstream that went down; its
    /// storage ([`Env::registry_storage`]) stays.
    pub fn stop_registry(&mut self) {
        if let Some(mut child) = self.registry.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where the environment's registry keeps its repositories.
    pub fn registry_storage(&self) -> PathBuf {
        self.dir().join("registry")
    }

    fn wait_registry(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.registry.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "docker-registry exited with {status}:\n{}",
                    self.log_tail("registry.log")
                );
            }
            if http_get_status(self.registry_port, "/v2/").is_ok_and(|s| s == 200) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "docker-registry not answering on 127.0.0.1:{} after {START_TIMEOUT:?}",
                self.registry_port
            );
            sleep(Duration::from_millis(50));
        }
    }

    // ----- daemon ---------------------------------------------------------

    /// Starts the daemon on the test's root and socket and waits until the
    /// socket accepts connections. Used again after a kill to restart it.
    pub fn start_daemon(&mut self) -> Result<()> {
        self.start_daemon_with_env(&[])
    }

    /// [`Env::start_daemon`] with `vars` set in the daemon's environment.
    pub fn start_daemon_with_env(&mut self, vars: &[(&str, &str)]) -> Result<()> {
        ensure!(self.daemon.is_none(), "the daemon is already running");
        let config = self.dir().join("seamless.toml");
        // A small pool: several tests run at once, each with its own.
        let mut text = "version = 1\n[storage]\npool_size = \"2GiB\"\n".to_string();
        if let Some(driver) = self.nydus_fs_driver {
            text.push_str(&format!("[nydus]\nfs_driver = \"{driver}\"\n"));
        }
        text.push_str(&self.daemon_config);
        std::fs::write(&config, text)?;
        let log = self.log_file("daemon.log")?;
        let bin = self.daemon_bin.clone();
        writeln!(&log, "===== test harness: starting {}", bin.display())?;
        let child = Command::new(&bin)
            .arg("--root")
            .arg(self.daemon_root())
            .arg("--address")
            .arg(self.daemon_socket())
            .arg("--containerd-address")
            .arg(self.containerd_socket())
            .arg("--config")
            .arg(&config)
            .arg("--log-level")
            .arg("debug")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.daemon = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.daemon = None;
                bail!(
                    "the daemon exited with {status} before serving:\n{}",
                    self.log_tail("daemon.log")
                );
            }
            if socket_accepts(&self.daemon_socket()) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the daemon did not serve {} within {START_TIMEOUT:?}:\n{}",
                self.daemon_socket().display(),
                self.log_tail("daemon.log")
            );
            sleep(Duration::from_millis(25));
        }
    }

    /// The next [`Env::start_daemon`] runs `binary` (an upgrade).
    pub fn set_daemon_binary(&mut self, binary: &Path) {
        self.daemon_bin = binary.to_path_buf();
    }

    /// The live serving processes of this test's daemon root: pid and
    /// executable.
    pub fn serving_processes(&self) -> Vec<(i32, PathBuf)> {
        serving_processes_of(&self.daemon_root())
    }

    /// Sends `signal` to the daemon and waits for it to exit.
    pub fn signal_daemon(&mut self, signal: Signal) -> Result<ExitStatus> {
        let mut child = self.daemon.take().context("the daemon is not running")?;
        send_signal(&child, signal)?;
        match wait_exit(&mut child, STOP_TIMEOUT)? {
            Some(status) => Ok(status),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the daemon did not exit within {STOP_TIMEOUT:?} of {signal}:\n{}",
                    self.log_tail("daemon.log")
                )
            }
        }
    }

    /// Runs a second daemon with its own root on the live socket and returns
    /// how it exited and what it logged; `None` if it was still running after
    /// 10 s (it then serves: it took the socket instead of refusing it).
    pub fn run_second_daemon(&self, root: &Path) -> Result<(Option<ExitStatus>, String)> {
        let log_path = self.dir().join("second-daemon.log");
        let log = self.log_file("second-daemon.log")?;
        let mut child = Command::new(DAEMON_BIN)
            .arg("--root")
            .arg(root)
            .arg("--address")
            .arg(self.daemon_socket())
            .arg("--containerd-address")
            .arg(self.containerd_socket())
            .arg("--config")
            .arg(self.dir().join("seamless.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting a second {DAEMON_BIN}"))?;
        let status = wait_exit(&mut child, Duration::from_secs(10))?;
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok((status, std::fs::read_to_string(log_path).unwrap_or_default()))
    }

    // ----- containerd -----------------------------------------------------

    fn start_containerd(&mut self, options: Options) -> Result<()> {
        let root = self.containerd_root();
        std::fs::create_dir_all(&root)?;
        // CRI stats this directory as the image filesystem of the snapshotter.
        std::fs::create_dir_all(root.join("io.containerd.snapshotter.v1.seamless"))?;
        let mut disabled = vec![
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
        ];
        if !options.cri {
            disabled.push("io.containerd.grpc.v1.cri");
        }
        let disabled: Vec<String> = disabled.iter().map(|p| format!("{p:?}")).collect();
        let mut config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{grpc}"

[ttrpc]
  address = "{grpc}.ttrpc"

[debug]
  level = "debug"

[proxy_plugins.seamless]
  type = "snapshot"
  address = "{daemon}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = root.display(),
            state = self.dir().join("state").display(),
            disabled = disabled.join(", "),
            grpc = self.containerd_socket().display(),
            daemon = self.daemon_socket().display(),
            opt = self.dir().join("opt").display(),
        );
        if options.cri {
            let cni = self.dir().join("cni");
            std::fs::create_dir_all(cni.join("conf"))?;
            std::fs::create_dir_all(cni.join("bin"))?;
            config.push_str(&format!(
                r#"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    # Pass the image's layer digests etc. to the snapshotter as
    # containerd.io/snapshot/cri.* labels, as remote snapshotters need.
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{conf}"
    bin_dir = "{bin}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."127.0.0.1:{port}"]
    endpoint = ["http://127.0.0.1:{port}"]
"#,
                snapshotter = self.snapshotter,
                conf = cni.join("conf").display(),
                bin = cni.join("bin").display(),
                port = self.registry_port,
            ));
        }
        let config_path = self.dir().join("containerd.toml");
        std::fs::write(&config_path, config)?;
        let log = self.log_file("containerd.log")?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        self.containerd = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.containerd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.containerd = None;
                bail!("containerd exited with {status}:\n{}", self.log_tail("containerd.log"));
            }
            if socket_accepts(&self.containerd_socket()) && self.ctr_global(&["version"]).is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "containerd did not answer `ctr version` within {START_TIMEOUT:?}:\n{}",
                self.log_tail("containerd.log")
            );
            sleep(Duration::from_millis(50));
        }
        let plugins = self.ctr_global(&["plugins", "ls"])?;
        ensure!(
            plugins.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() >= 4
                    && cols[0] == "io.containerd.snapshotter.v1"
                    && cols[1] == self.snapshotter
                    && cols[3] == "ok"
            }),
            "containerd has no working snapshotter {}:\n{plugins}",
            self.snapshotter
        );
        Ok(())
    }

    // ----- image ----------------------------------------------------------

    /// Builds the test image, imports it into a build namespace without
    /// unpacking, pushes it, and removes it again so test pulls are real.
    fn push_test_image(&mut self) -> Result<()> {
        let reference = self.image_ref();
        let built = image::build_image(&reference)?;
        let archive = self.dir().join("image.tar");
        std::fs::write(&archive, &built.archive)?;
        let ns = self.namespace("build");
        let archive_arg = archive.display().to_string();
        self.ctr(&ns, &["images", "import", "--no-unpack", &archive_arg])?;
        self.ctr(&ns, &["images", "push", "--plain-http", &reference])?;
        self.ctr(&ns, &["images", "rm", "--sync", &reference])?;
        let left = self.ctr(&ns, &["content", "ls", "-q"])?;
        ensure!(
            left.trim().is_empty(),
            "content left after removing the build image:\n{left}"
        );
        let manifest = http_get_status(
            self.registry_port,
            &format!("/v2/{}/manifests/{}", image::REPOSITORY, image::TAG),
        )?;
        ensure!(
            manifest == 200,
            "the registry has no manifest after the push (HTTP {manifest})"
        );
        self.image = Some(built);
        Ok(())
    }

    // ----- ctr ------------------------------------------------------------

    fn ctr_command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.containerd_socket());
        cmd
    }

    /// `ctr ARGS...` without a namespace (`version`, `plugins ls`).
    pub fn ctr_global(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.ctr_command();
        cmd.args(args);
        checked(run_with_timeout(cmd, CTR_TIMEOUT)?, &format!("ctr {}", args.join(" ")))
    }

    /// `ctr -n NS ARGS...`; fails with ctr's output when it exits non-zero.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.ctr_command();
        cmd.arg("-n").arg(ns).args(args);
        checked(
            run_with_timeout(cmd, CTR_TIMEOUT)?,
            &format!("ctr -n {ns} {}", args.join(" ")),
        )
    }

    pub fn pull(&self, ns: &str) -> Result<()> {
        let reference = self.image_ref();
        self.ctr(
            ns,
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                &self.snapshotter,
                &reference,
            ],
        )?;
        Ok(())
    }

    /// `ctr run -d` of a container that loops forever.
    pub fn run_container(&self, ns: &str, id: &str) -> Result<()> {
        let reference = self.image_ref();
        self.ctr(
            ns,
            &[
                "run",
                "-d",
                "--null-io",
                "--snapshotter",
                &self.snapshotter,
                &reference,
                id,
                "/bin/sh",
                "-c",
                "while true; do sleep 1; done",
            ],
        )?;
        Ok(())
    }

    /// Runs a shell script in the container with `ctr tasks exec`; returns
    /// its output (stdout and stderr together).
    ///
    /// The output goes through a file the shim writes (`--log-uri file://`):
    /// ctr's own FIFO copy can drop the output of a process that exits at
    /// once (containerd#5741, fixed in ctr by containerd#13931), while the
    /// shim finishes copying before ctr's exec returns.
    pub fn exec(&self, ns: &str, id: &str, script: &str) -> Result<String> {
        let exec_id = format!("exec{}", self.exec_counter.fetch_add(1, Ordering::Relaxed));
        let log = self.dir().join("exec").join(format!("{id}-{exec_id}.log"));
        let uri = format!("file://{}", log.display());
        let result = self.ctr(
            ns,
            &[
                "tasks",
                "exec",
                "--log-uri",
                &uri,
                "--exec-id",
                &exec_id,
                id,
                "/bin/sh",
                "-c",
                script,
            ],
        );
        let output = std::fs::read_to_string(&log);
        match (result, output) {
            (Ok(_), Ok(output)) => Ok(output),
            (Ok(_), Err(e)) => Err(e).with_context(|| format!("reading the output of exec {exec_id} in {id}")),
            (Err(e), output) => Err(e.context(format!(
                "exec {exec_id} in {id} of {script:?}; its output: {:?}",
                output.unwrap_or_default()
            ))),
        }
    }

    /// Kills the task, deletes it and the container (and with it the
    /// container's snapshot).
    pub fn remove_container(&self, ns: &str, id: &str) -> Result<()> {
        self.ctr(ns, &["tasks", "kill", "-s", "SIGKILL", id])?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.ctr(ns, &["tasks", "delete", id]) {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.context(format!("task {id} did not stop after SIGKILL"))),
            }
        }
        self.ctr(ns, &["containers", "delete", id])?;
        Ok(())
    }

    pub fn snapshots(&self, ns: &str) -> Result<Vec<SnapshotRow>> {
        let out = self.ctr(ns, &["snapshots", "--snapshotter", &self.snapshotter, "ls"])?;
        Ok(parse_snapshot_rows(&out))
    }

    pub fn usage(&self, ns: &str) -> Result<Vec<UsageRow>> {
        let out = self.ctr(ns, &["snapshots", "--snapshotter", &self.snapshotter, "usage", "-b"])?;
        out.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                ensure!(cols.len() == 3, "unexpected `ctr snapshots usage` row: {l:?}\n{out}");
                Ok(UsageRow {
                    key: cols[0].to_string(),
                    size: cols[1].parse().with_context(|| format!("size in {l:?}"))?,
                    inodes: cols[2].parse().with_context(|| format!("inodes in {l:?}"))?,
                })
            })
            .collect()
    }

    // ----- logs -----------------------------------------------------------

    fn log_file(&self, name: &str) -> Result<File> {
        let path = self.dir().join(name);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    /// The last lines of a log in the test directory.
    pub fn log_tail(&self, name: &str) -> String {
        let Some(dir) = self.dir.as_ref() else {
            return String::new();
        };
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(150);
        format!(
            "----- {name} (last {} lines) -----\n{}\n",
            lines.len() - start,
            lines[start..].join("\n")
        )
    }

    fn dump_logs(&self) {
        if self.dir.is_none() {
            return;
        }
        eprintln!("===== test {} failed; snapshotter {}", self.test, self.snapshotter);
        for log in ["daemon.log", "containerd.log", "registry.log"] {
            eprintln!("{}", self.log_tail(log));
        }
    }

    // ----- teardown -------------------------------------------------------

    fn teardown(&mut self) {
        let Some(dir) = self.dir.as_ref().map(|d| d.path().to_path_buf()) else {
            return;
        };
        if self.containerd.is_some() {
            for ns in self.namespaces.clone() {
                self.remove_everything_in(&ns);
            }
        }
        if let Some(child) = self.containerd.take() {
            stop_child(child, "containerd");
        }
        kill_leftover_shims(&dir, &self.containerd_socket());
        if let Some(child) = self.daemon.take() {
            stop_child(child, "the daemon");
        }
        // They outlive the daemon by design; they end with their mounts
        // below anyway, but a test that failed must not leave them waiting.
        for (pid, _) in serving_processes_of(&self.daemon_root()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(child) = self.registry.take() {
            stop_child(child, "docker-registry");
        }
        unmount_everything_under(&dir);
        // runc state directories of our namespaces, left empty by the shims.
        for ns in &self.namespaces {
            let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(ns));
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("teardown: removing {}: {e}", path.display());
            }
        }
    }

    fn remove_everything_in(&self, ns: &str) {
        let quick = |args: &[&str]| -> Result<String> {
            let mut cmd = self.ctr_command();
            cmd.arg("-n").arg(ns).args(args);
            checked(run_with_timeout(cmd, Duration::from_secs(20))?, &args.join(" "))
        };
        if let Ok(tasks) = quick(&["tasks", "ls", "-q"]) {
            for task in tasks.split_whitespace() {
                let _ = quick(&["tasks", "kill", "-s", "SIGKILL", task]);
                let deadline = Instant::now() + Duration::from_secs(10);
                while quick(&["tasks", "delete", "-f", task]).is_err() && Instant::now() < deadline {
                    sleep(Duration::from_millis(100));
                }
            }
        }
        if let Ok(containers) = quick(&["containers", "ls", "-q"]) {
            for container in containers.split_whitespace() {
                let _ = quick(&["containers", "delete", container]);
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.teardown();
    }
}

/// Starts a world, runs `body` in it, and turns an error into a panic while
/// the world still exists, so that its logs are printed before teardown.
pub fn with_env(test: &str, options: Options, body: impl FnOnce(&mut Env) -> Result<()>) {
    with_env_config(test, options, "", body)
}

/// [`with_env`] with `daemon_config` (whole TOML sections) added to the
/// daemon's configuration.
pub fn with_env_config(test: &str, options: Options, daemon_config: &str, body: impl FnOnce(&mut Env) -> Result<()>) {
    let mut env = Env::new(test).with_daemon_config(daemon_config);
    let result = env.start(options).context("starting the test environment");
    if let Err(e) = result.and_then(|()| body(&mut env)) {
        panic!("{e:?}");
    }
}

fn check_prerequisites() -> Result<()> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (the tests start containerd, mount filesystems and run containers)".to_string());
    }
    for command in REQUIRED_COMMANDS {
        if find_in_path(command).is_none() {
            missing.push(format!("command {command} in PATH"));
        }
    }
    if !Path::new("/usr/bin/busybox").is_file() {
        missing.push("/usr/bin/busybox (package busybox-static)".to_string());
    }
    if !Path::new(DAEMON_BIN).is_file() {
        missing.push(format!("the daemon binary {DAEMON_BIN}"));
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    for fs in ["overlay", "btrfs"] {
        if !filesystems.split_whitespace().any(|f| f == fs) {
            // The module may just not be loaded yet; mount(2) would load it.
            let _ = Command::new("modprobe").arg(fs).status();
            let again = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
            if !again.split_whitespace().any(|f| f == fs) {
                missing.push(format!("kernel support for {fs}"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "prerequisites missing (run .ci/setup as root): {}",
        missing.join(", ")
    );
    Ok(())
}

fn find_in_path(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
}

fn parse_snapshot_rows(out: &str) -> Vec<SnapshotRow> {
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols.as_slice() {
                [key, kind] => Some(SnapshotRow {
                    key: key.to_string(),
                    parent: String::new(),
                    kind: kind.to_string(),
                }),
                [key, parent, kind] => Some(SnapshotRow {
                    key: key.to_string(),
                    parent: parent.to_string(),
                    kind: kind.to_string(),
                }),
                _ => None,
            }
        })
        .collect()
}

/// Output of a finished command.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` with its output captured; kills it after `timeout`.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let description = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {description}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let status = match wait_exit(&mut child, timeout)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            bail!(
                "{description} did not finish within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    Ok(Output {
        status,
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
    })
}

fn checked(out: Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "`{what}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout.trim_end(),
        out.stderr.trim_end()
    );
    Ok(out.stdout)
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        sleep(Duration::from_millis(20));
    }
}

fn send_signal(child: &Child, signal: Signal) -> Result<()> {
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    kill(Pid::from_raw(pid), signal).with_context(|| format!("sending {signal} to {pid}"))
}

/// SIGTERM, then SIGKILL if the process lingers.
fn stop_child(mut child: Child, what: &str) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = send_signal(&child, Signal::SIGTERM);
    if !matches!(wait_exit(&mut child, STOP_TIMEOUT), Ok(Some(_))) {
        eprintln!("teardown: {what} ignored SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Every process's pid and command line.
fn processes() -> Vec<(i32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, args))
        })
        .collect()
}

/// Live (not zombie) `serve-rafs` processes whose control sockets are under
/// `root`: pid and executable.
fn serving_processes_of(root: &Path) -> Vec<(i32, PathBuf)> {
    let servers = root.join("nydus/servers").display().to_string();
    let mut found: Vec<(i32, PathBuf)> = processes()
        .into_iter()
        .filter(|(pid, args)| {
            let ours =
                args.iter().any(|a| a == "serve-rafs") && args.windows(2).any(|w| w[0] == "--dir" && w[1] == servers);
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
                .unwrap_or(true);
            ours && !zombie
        })
        .map(|(pid, _)| (pid, std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()))
        .collect();
    found.sort();
    found
}

/// Shims outlive containerd. Ours carry our containerd's address on their
/// command line; kill them and the container processes they supervise.
fn kill_leftover_shims(dir: &Path, containerd_socket: &Path) {
    let address = containerd_socket.display().to_string();
    for (pid, args) in processes() {
        let is_our_shim = args.first().is_some_and(|a| a.ends_with("containerd-shim-runc-v2"))
            && args.windows(2).any(|w| w[0] == "-address" && w[1] == address);
        if !is_our_shim {
            continue;
        }
        let ns = args.windows(2).find(|w| w[0] == "-namespace").map(|w| w[1].clone());
        let id = args.windows(2).find(|w| w[0] == "-id").map(|w| w[1].clone());
        if let (Some(ns), Some(id)) = (ns, id) {
            let init = dir.join(format!("state/io.containerd.runtime.v2.task/{ns}/{id}/init.pid"));
            if let Some(init_pid) = std::fs::read_to_string(init)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let _ = kill(Pid::from_raw(init_pid), Signal::SIGKILL);
            }
        }
        eprintln!("teardown: killing leftover shim {pid}");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Unmounts every mount point under `dir`, deepest first: container rootfs
/// left by a failed teardown, and the daemon's loop-mounted pool.
fn unmount_everything_under(dir: &Path) {
    for _ in 0..3 {
        let mut points: Vec<PathBuf> = mount_points().into_iter().filter(|p| p.starts_with(dir)).collect();
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for point in points {
            if nix::mount::umount(&point).is_err() {
                if let Err(e) = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
                    eprintln!("teardown: unmounting {}: {e}", point.display());
                }
            }
        }
    }
}

fn mount_points() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(p: &str) -> String {
    let bytes = p.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(digits)) = (bytes[i], escape) {
            let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            out.push(value as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

fn socket_accepts(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) && UnixStream::connect(path).is_ok()
}

/// Whether anything accepts on `path` (for stale socket checks).
pub fn socket_is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Runs `cmd` to its end: its exit code (-1 when a signal ended it), stdout
/// and stderr.
pub fn outcome(cmd: &mut Command) -> Result<(i32, String, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A minimal HTTP/1.0 GET against the registry; returns the status code.
pub fn http_get_status(port: u16, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("no HTTP status in {response:?}"))?;
    Ok(status.parse()?)
}
