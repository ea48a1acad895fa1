//! Process-state checkpoints and restore, with real containerd, runc and
//! CRIU: a counter loop (its count lives only in the shell's memory) is
//! checkpointed, stopped and removed, restored under a new name, and keeps
//! counting from where it was; the same through an incremental chain
//! (`--parent`, `--pre-dump`); restored paused without `--resume`; the
//! memory limit refused with both numbers; failures leave nothing behind;
//! a daemon killed (or a store failing) after a `--tcp-established
//! --leave-running=false` dump loses neither the container nor its checkpoint.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::env::{with_env, Env, Options};

#[path = "../../tests/hostile/mod.rs"]
mod hostile;

/// Counts every 0.3 s into /count; the count is only in memory, so a
/// restarted container would count from 1 again.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.3; done";

struct Ctl {
    socket: std::path::PathBuf,
    ns: String,
    /// A checkpointctl config file, if any.
    config: Option<std::path::PathBuf>,
}

impl Ctl {
    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkpointctl"));
        cmd.arg("--address").arg(&self.socket).arg("--namespace").arg(&self.ns);
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<(i32, String, String)> {
        crate::env::outcome(self.command().args(args))
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.run(args)?;
        ensure!(code == 0, "checkpointctl {args:?} exited {code}: {out}{err}");
        Ok(out)
    }

    /// Checkpoint `id` as `list -o json` shows it.
    fn listed(&self, id: &str) -> Result<serde_json::Value> {
        let out = self.ok(&["list", "-o", "json"])?;
        let all: Vec<serde_json::Value> = serde_json::from_str(&out).with_context(|| out.clone())?;
        all.into_iter()
            .find(|c| c["id"] == id)
            .with_context(|| format!("{id} is not listed: {out}"))
    }
}

/// A new namespace with the test image pulled, and a CLI for it.
fn pulled_namespace(env: &mut Env) -> Result<(String, Ctl)> {
    let ns = env.namespace("c");
    env.pull(&ns)?;
    let ctl = Ctl {
        socket: env.daemon_socket(),
        ns: ns.clone(),
        config: None,
    };
    Ok((ns, ctl))
}

fn start_counter(env: &Env, ns: &str, id: &str) -> Result<()> {
    start_script(env, ns, id, COUNTER)
}

/// `ctr run -d` of `script` on the snapshotter.
fn start_script(env: &Env, ns: &str, id: &str, script: &str) -> Result<()> {
    start_script_in(env, ns, id, script, None)
}

/// Runs `script` in container `id`, in the network namespace `netns` (a
/// name of `ip netns`) when given, as CNI would give one.
fn start_script_in(env: &Env, ns: &str, id: &str, script: &str, netns: Option<&str>) -> Result<()> {
    let with_ns = netns.map(|netns| format!("network:/var/run/netns/{netns}"));
    let mut args = vec!["run", "-d", "--null-io", "--snapshotter", "seamless"];
    if let Some(with_ns) = &with_ns {
        args.extend(["--with-ns", with_ns]);
    }
    let image = env.image_ref();
    args.extend([image.as_str(), id, "/bin/sh", "-c", script]);
    env.ctr(ns, &args)?;
    Ok(())
}

fn count(env: &Env, ns: &str, id: &str) -> Result<u64> {
    let out = env.exec(ns, id, "cat /count")?;
    out.trim()
        .parse()
        .with_context(|| format!("/count of {id} holds {out:?}"))
}

fn wait_count(env: &Env, ns: &str, id: &str, at_least: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(n) = count(env, ns, id) {
            if n >= at_least {
                return Ok(n);
            }
        }
        if Instant::now() > deadline {
            bail!("{id} did not count to {at_least} in 30 s");
        }
        sleep(Duration::from_millis(200));
    }
}

/// Kills and removes the container, waiting until its processes are gone
/// (CRIU cannot restore over pids still in use).
fn remove_container(env: &Env, ns: &str, id: &str) -> Result<()> {
    let _ = env.ctr(ns, &["tasks", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.ctr(ns, &["tasks", "rm", id]).is_err() {
        ensure!(Instant::now() < deadline, "the task of {id} did not stop");
        sleep(Duration::from_millis(100));
    }
    env.ctr(ns, &["containers", "rm", id])?;
    Ok(())
}

fn task_status(env: &Env, ns: &str, id: &str) -> Result<String> {
    let tasks = env.ctr(ns, &["tasks", "ls"])?;
    Ok(tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("none")
        .to_string())
}

/// After a restore: the count goes on from `from` (not from 1) and keeps
/// increasing.
fn continues_from(env: &Env, ns: &str, id: &str, from: u64, most: u64) -> Result<()> {
    let first = count(env, ns, id)?;
    ensure!(
        first >= from && first <= most,
        "restored {id} counts {first}: expected between {from} (the checkpoint) and {most}, not a fresh start"
    );
    sleep(Duration::from_millis(1500));
    let later = count(env, ns, id)?;
    ensure!(
        later > first,
        "restored {id} stopped counting at {first} (then {later})"
    );
    Ok(())
}

#[test]
fn counter_continues_after_restore() {
    with_env("restore", Options::default(), |env| {
        let (ns, ctl) = pulled_namespace(env)?;
        let id = env.container_id("counter");
        start_counter(env, &ns, &id)?;
        wait_count(env, &ns, &id, 4)?;

        // Refused before anything is dumped, saying both numbers.
        let (code, _, err) = ctl.run(&["create", &id, "--memory-limit", "4k"])?;
        ensure!(code != 0, "a 4 KiB memory limit was not refused");
        ensure!(
            err.contains("4096") && err.contains("memory limit"),
            "the refusal names both numbers: {err}"
        );

        let before = count(env, &ns, &id)?;
        let checkpoint = ctl.ok(&["create", &id, "-l", "golden"])?.trim().to_string();
        let after = count(env, &ns, &id)?;
        ensure!(
            task_status(env, &ns, &id)? == "RUNNING",
            "the container keeps running after a checkpoint"
        );
        // --pre-freeze: frozen from the disk capture to the end of the
        // dump, then thawed.
        let frozen_before = count(env, &ns, &id)?;
        let held = ctl.ok(&["create", &id, "--pre-freeze"])?.trim().to_string();
        let frozen_after = count(env, &ns, &id)?;
        ensure!(
            task_status(env, &ns, &id)? == "RUNNING",
            "a pre-frozen container is thawed after its dump"
        );
        let listed = ctl.listed(&held)?;
        let (pause, frozen) = (
            listed["pause_ms"].as_f64().unwrap_or(0.0),
            listed["process"]["frozen_ms"].as_f64().unwrap_or(f64::MAX),
        );
        ensure!(
            pause >= frozen,
            "the pause of a pre-frozen checkpoint covers CRIU's frozen time: {pause} ms < {frozen} ms"
        );

        let info = ctl.listed(&checkpoint)?;
        let process = info
            .get("process")
            .filter(|p| !p.is_null())
            .with_context(|| format!("no process state in {info}"))?;
        ensure!(
            process["pages_written"].as_u64().unwrap_or(0) > 0,
            "CRIU statistics are recorded: {process}"
        );
        let metadata = ctl.ok(&["info", &checkpoint, "--metadata"])?;
        ensure!(
            metadata.contains("dump_log")
                && metadata.contains("Dumping finished successfully")
                && metadata.contains("frozen"),
            "info --metadata shows the dump statistics and log: {metadata}"
        );

        // The container goes on counting, then is removed altogether.
        wait_count(env, &ns, &id, after + 6)?;
        remove_container(env, &ns, &id)?;

        // The disaster-recovery pipeline of the issue.
        let restored = format!("{id}-r");
        let pipeline = format!(
            "{ctl} list --filter=label=golden -o json | jq '.[-1].id' | xargs {ctl} restore --resume --validate --name {restored}",
            ctl = format!(
                "{} --address {} --namespace {}",
                env!("CARGO_BIN_EXE_checkpointctl"),
                env.daemon_socket().display(),
                ns
            )
        );
        let out = Command::new("sh").arg("-c").arg(&pipeline).output()?;
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.status.success(), "restore pipeline failed: {printed}");
        ensure!(
            printed.contains(&restored) && printed.contains("ok") && !printed.contains("FAIL"),
            "restore reports its checks: {printed}"
        );
        ensure!(
            task_status(env, &ns, &restored)? == "RUNNING",
            "restored with --resume runs"
        );
        continues_from(env, &ns, &restored, before, after + 6)?;

        // Without --resume: restored paused, counting nothing until resumed
        // (the pre-frozen checkpoint: its disk and memory are of one instant).
        let paused = format!("{id}-p");
        ctl.ok(&["restore", &held, "--name", &paused])?;
        ensure!(
            task_status(env, &ns, &paused)? == "PAUSED",
            "restored without --resume is paused"
        );
        let out = ctl.ok(&["resume", &paused])?;
        ensure!(out.contains(&format!("resumed container {paused}")), "{out}");
        ensure!(task_status(env, &ns, &paused)? == "RUNNING", "resumed: {out}");
        sleep(Duration::from_millis(700));
        continues_from(env, &ns, &paused, frozen_before, frozen_after + 5)?;
        let again = ctl.ok(&["resume", &paused, "-o", "json"])?;
        let again: serde_json::Value = serde_json::from_str(&again)?;
        ensure!(
            again["previous_status"] == "running" && again["status"] == "running",
            "resuming a running container changes nothing: {again}"
        );
        let (code, _, err) = ctl.run(&["resume", "no-such-container"])?;
        ensure!(code == 3 && err.contains("no-such-container"), "exit {code}: {err}");

        // A name in use is refused and nothing of the attempt is left.
        let (code, _, err) = ctl.run(&["restore", &checkpoint, "--name", &paused])?;
        ensure!(code != 0 && err.contains("already exists"), "{err}");
        let containers = env.ctr(&ns, &["containers", "ls", "-q"])?;
        ensure!(
            containers.lines().filter(|l| !l.trim().is_empty()).count() == 2,
            "only the two restored containers exist: {containers}"
        );

        // A filesystem-only checkpoint: the files come back, the processes
        // start afresh (created, or started with --resume).
        env.exec(&ns, &restored, "echo kept > /marker && sync")?;
        let fs_only = ctl.ok(&["create", &restored, "--fs-only"])?.trim().to_string();
        ensure!(ctl.listed(&fs_only)?["process"].is_null(), "no process state");
        let fresh = format!("{id}-f");
        ctl.ok(&["restore", &fs_only, "--name", &fresh])?;
        ensure!(task_status(env, &ns, &fresh)? == "none", "not started without --resume");
        let (code, _, err) = ctl.run(&["resume", &fresh])?;
        ensure!(
            code != 0 && err.contains("has no task"),
            "a container without processes cannot be resumed (exit {code}): {err}"
        );
        env.ctr(&ns, &["tasks", "start", "-d", &fresh])?;
        ensure!(
            env.exec(&ns, &fresh, "cat /marker")?.trim() == "kept",
            "the files are restored"
        );
        Ok(())
    });
}

/// Whether this kernel tracks dirtied pages for CRIU (CONFIG_MEM_SOFT_DIRTY):
/// pre-dumps need it.
fn dirty_tracking() -> bool {
    Command::new("criu")
        .args(["check", "--feature", "mem_dirty_track"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn incremental_chain_restores_and_stores_only_changed_memory() {
    with_env("restore-chain", Options::default(), |env| {
        let (ns, ctl) = pulled_namespace(env)?;
        let id = env.container_id("counter");
        // 8 MB of incompressible text held in the shell's memory, then the
        // counter.
        let script = format!("big=$(head -c 4000000 /dev/urandom | od -An -x); {COUNTER}");
        start_script(env, &ns, &id, &script)?;
        wait_count(env, &ns, &id, 3)?;
        let first = ctl.ok(&["create", &id])?.trim().to_string();
        wait_count(env, &ns, &id, count(env, &ns, &id)? + 2)?;
        let second = ctl.ok(&["create", &id, "--parent", &first])?.trim().to_string();
        let (one, two) = (ctl.listed(&first)?, ctl.listed(&second)?);
        let stored = |c: &serde_json::Value| c["process"]["stored_bytes"].as_u64().unwrap_or(0);
        ensure!(
            stored(&one) > 4_000_000,
            "the first dump stores the whole memory: {}",
            one["process"]
        );
        ensure!(
            stored(&two) * 4 < stored(&one),
            "the second dump stores only what changed: {} then {} bytes",
            stored(&one),
            stored(&two)
        );

        // Pre-dumps need the kernel's dirty-page tracking.
        if dirty_tracking() {
            let pre = ctl
                .ok(&["create", &id, "--parent", &second, "--pre-dump"])?
                .trim()
                .to_string();
            let process = &ctl.listed(&pre)?["process"];
            ensure!(
                process["pre_dump"] == true && process["pages_skipped_parent"].as_u64().unwrap_or(0) > 0,
                "the final dump after a pre-dump writes only dirtied pages: {process}"
            );
        } else {
            let (code, _, err) = ctl.run(&["create", &id, "--parent", &second, "--pre-dump"])?;
            ensure!(
                code != 0 && err.contains("CONFIG_MEM_SOFT_DIRTY") && err.contains("--pre-dump"),
                "--pre-dump is refused clearly on a kernel without dirty tracking: {err}"
            );
        }

        wait_count(env, &ns, &id, count(env, &ns, &id)? + 2)?;
        let before = count(env, &ns, &id)?;
        let third = ctl
            .ok(&["create", &id, "--parent", &second, "--leave-running=false"])?
            .trim()
            .to_string();
        // --leave-running=false: CRIU stopped the processes.
        let deadline = Instant::now() + Duration::from_secs(10);
        while task_status(env, &ns, &id)? != "STOPPED" {
            ensure!(
                Instant::now() < deadline,
                "the container still runs after --leave-running=false"
            );
            sleep(Duration::from_millis(100));
        }
        ensure!(
            ctl.listed(&third)?["process"]["leave_running"] == false,
            "the metadata says the container was stopped"
        );
        remove_container(env, &ns, &id)?;
        let restored = format!("{id}-r");
        ctl.ok(&["restore", &third, "--name", &restored, "--resume", "--parallel", "2"])?;
        continues_from(env, &ns, &restored, before, before + 4)?;
        let big = env.exec(&ns, &restored, "ps -o rss,args | grep -c 'sh -c big'")?;
        ensure!(big.trim() != "0", "the restored shell is the original one: {big}");
        Ok(())
    });
}

/// A TCP connection over loopback: the sender counts into it, the receiver
/// writes each number it reads into /count. A count that goes on after a
/// restore went through the same connection: nc does not reconnect. (The
/// listener's stdin must stay open: at its end busybox nc closes the
/// connection.)
const TCP_COUNTER: &str = "sleep 1000000 | nc -l -p 7000 | while read n; do echo $n > /count; done & \
    sleep 0.5; i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done | nc 127.0.0.1 7000";

#[test]
fn an_established_tcp_connection_survives_restore() {
    with_env("restore-tcp", Options::default(), |env| {
        let (ns, ctl) = pulled_namespace(env)?;
        let id = env.container_id("tcp");
        // A network namespace joined by path, as CNI gives one: the restore
        // joins it again. (One runc creates is restored empty, its loopback
        // down, where no connection can be rebuilt.)
        let netns = format!("seam-{}-t", std::process::id());
        let _netns = Netns(vec![netns.clone()]);
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        start_script_in(env, &ns, &id, TCP_COUNTER, Some(&netns))?;
        wait_count(env, &ns, &id, 4)?;

        // Without --tcp-established CRIU refuses, saying so, and the
        // container is left running, not frozen.
        let (code, _, err) = ctl.run(&["create", &id])?;
        ensure!(
            code != 0 && err.contains("tcp-established"),
            "a connected socket needs --tcp-established (exit {code}): {err}"
        );
        ensure!(
            task_status(env, &ns, &id)? == "RUNNING",
            "a failed dump leaves the container running"
        );
        let resumed = count(env, &ns, &id)?;
        wait_count(env, &ns, &id, resumed + 3)?;

        let before = count(env, &ns, &id)?;
        let checkpoint = ctl
            .ok(&["create", &id, "--tcp-established", "--leave-running=false"])?
            .trim()
            .to_string();
        let listed = ctl.listed(&checkpoint)?;
        ensure!(
            listed["process"]["tcp_established"] == serde_json::Value::Bool(true),
            "the checkpoint records its TCP option: {listed}"
        );
        remove_container(env, &ns, &id)?;

        let restored = format!("{id}-r");
        ctl.ok(&["restore", &checkpoint, "--name", &restored, "--resume"])?;
        let result = (|| {
            ensure!(
                task_status(env, &ns, &restored)? == "RUNNING",
                "the restored container runs"
            );
            continues_from(env, &ns, &restored, before, before + 12)
        })();
        let cleaned = remove_container(env, &ns, &restored);
        result?;
        cleaned
    });
}

#[test]
fn restore_on_another_node_through_shared_storage_or_streamed() {
    with_env("restore-node1", Options::default(), |env| {
        // A second host: its own registry, containerd and daemon, which also
        // serves its Control API on TCP with TLS and a token.
        let tls = env.dir().join("tls");
        let made = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/make-certs.sh"))
            .arg(&tls)
            .status()?;
        ensure!(made.success(), "tests/tls/make-certs.sh failed: {made}");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut node2 = Env::new("restore-node2").with_daemon_config(&format!(
            "[remote]\naddress = \"127.0.0.1:{port}\"\ntls_cert = \"{0}/server.crt\"\n\
             tls_key = \"{0}/server.key\"\ntoken_file = \"{0}/token\"\n",
            tls.display()
        ));
        node2.start(Options::default()).context("starting the second node")?;
        let ns = env.namespace("c");
        env.pull(&ns)?;
        node2.pull(&ns)?;
        // Shared storage both daemons mount (a local directory standing in
        // for the NFS export: this kernel has no NFS client).
        let shared = env.dir().join("shared-export");
        std::fs::create_dir_all(&shared)?;
        let config = env.dir().join("nodes.yaml");
        std::fs::write(
            &config,
            format!(
                "storage:\n  backend: nfs\n  nfs: {{path: {}}}\nnodes:\n  node2: {{address: {}}}\n",
                shared.display(),
                node2.daemon_socket().display()
            ),
        )?;
        let ctl = Ctl {
            socket: env.daemon_socket(),
            ns: ns.clone(),
            config: Some(config),
        };
        let id = env.container_id("counter");
        start_counter(env, &ns, &id)?;
        wait_count(env, &ns, &id, 4)?;
        // A checkpoint in this daemon's own storage: streamed to the node,
        // over TLS with the node's token. "node2-stranger" holds a token of
        // its own, which the node refuses.
        let stranger_token = env.dir().join("stranger.token");
        std::fs::write(&stranger_token, "not-the-node-token\n")?;
        std::fs::set_permissions(&stranger_token, std::fs::Permissions::from_mode(0o600))?;
        let local_config = env.dir().join("local.yaml");
        std::fs::write(
            &local_config,
            format!(
                "nodes:\n  node2: {{address: \"https://127.0.0.1:{port}\", ca_file: {0}/ca.crt, token_file: {0}/token}}\n  \
                 node2-stranger: {{address: \"https://localhost:{port}\", ca_file: {0}/ca.crt, token_file: {1}}}\n",
                tls.display(),
                stranger_token.display()
            ),
        )?;
        let local = Ctl {
            socket: env.daemon_socket(),
            ns: ns.clone(),
            config: Some(local_config),
        };
        let local_before = count(env, &ns, &id)?;
        let local_checkpoint = local.ok(&["create", &id])?.trim().to_string();

        let before = count(env, &ns, &id)?;
        let checkpoint = ctl.ok(&["create", &id, "--leave-running=false"])?.trim().to_string();

        let (code, _, err) = ctl.run(&["restore", &checkpoint, "-t", "node9"])?;
        ensure!(
            code == 2 && err.contains("node2"),
            "an unknown node lists the known ones: {err}"
        );
        let (code, _, err) = local.run(&["restore", &local_checkpoint, "-t", "node2-stranger"])?;
        ensure!(
            code == 4 && err.contains("bearer token"),
            "a node refuses a wrong token (exit {code}): {err}"
        );
        let sent = format!("{id}-sent");
        let out = local.ok(&["restore", &local_checkpoint, "-t", "node2", "--name", &sent, "--resume"])?;
        ensure!(out.contains("sent checkpoint"), "{out}");
        let streamed = (|| {
            ensure!(
                task_status(&node2, &ns, &sent)? == "RUNNING",
                "restored on the node it was sent to"
            );
            continues_from(&node2, &ns, &sent, local_before, before + 4)?;
            // Sent again: the node keeps what it has and restores it.
            let again = format!("{id}-again");
            local.ok(&["restore", &local_checkpoint, "-t", "node2", "--name", &again])?;
            remove_container(&node2, &ns, &again)?;
            // The node's records are not this one's, and a token holder
            // cannot have them applied as recorded.
            let (code, _, err) = local.run(&[
                "restore",
                &local_checkpoint,
                "-t",
                "node2",
                "--name",
                "trusting",
                "--trust-record",
            ])?;
            ensure!(
                code != 0 && err.contains("unix socket only"),
                "--trust-record over TCP is refused (exit {code}): {err}"
            );
            Ok(())
        })();
        let cleaned = remove_container(&node2, &ns, &sent);
        streamed?;
        cleaned?;

        // Without the image's layers on the node, the restore fails at its
        // snapshot step and leaves no container behind.
        node2.ctr(&ns, &["images", "rm", "--sync", &node2.image_ref()])?;
        let (code, _, err) = ctl.run(&["restore", &checkpoint, "-t", "node2", "--name", "early"])?;
        ensure!(
            code != 0 && err.contains("snapshot") && err.contains("pull the image first"),
            "a restore without the image's layers names its step: {err}"
        );
        ensure!(
            node2.ctr(&ns, &["containers", "ls", "-q"])?.trim().is_empty(),
            "a failed restore leaves no container"
        );
        node2.pull(&ns)?;

        let restored = format!("{id}-moved");
        let out = ctl.ok(&[
            "restore",
            &checkpoint,
            "-t",
            "node2",
            "--name",
            &restored,
            "--resume",
            "--validate",
        ])?;
        ensure!(out.contains(&restored), "{out}");
        let result = (|| {
            ensure!(
                task_status(&node2, &ns, &restored)? == "RUNNING",
                "restored on the second node"
            );
            ensure!(
                task_status(env, &ns, &restored)? == "none",
                "nothing was restored on the first node"
            );
            continues_from(&node2, &ns, &restored, before, before + 12)
        })();
        let cleaned = remove_container(&node2, &ns, &restored);
        result?;
        cleaned
    });
}

/// Network namespaces of the test's own, deleted when dropped.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output()?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `curl` of `url` from inside network namespace `netns`.
fn fetch_in(netns: &str, url: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sf", "--max-time", "5", url])
        .output()?;
    ensure!(
        out.status.success(),
        "curl {url} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn network_remap_moves_addresses_routes_sockets_and_hosts() {
    with_env("restore-remap", Options::default(), |env| {
        let (ns, ctl) = pulled_namespace(env)?;
        // The container's network namespace and a peer's, joined by a veth
        // pair: addresses only inside the test's own namespaces.
        let pid = std::process::id();
        let (inner, peer) = (format!("seam-{pid}-c"), format!("seam-{pid}-p"));
        let _netns = Netns(vec![inner.clone(), peer.clone()]);
        ip(&["netns", "add", &inner])?;
        ip(&["netns", "add", &peer])?;
        ip(&[
            "-n", &inner, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", &peer,
        ])?;
        ip(&["-n", &inner, "link", "set", "lo", "up"])?;
        ip(&["-n", &inner, "addr", "add", "10.201.0.2/24", "dev", "eth0"])?;
        ip(&["-n", &inner, "link", "set", "eth0", "up"])?;
        ip(&["-n", &peer, "addr", "add", "10.201.0.1/24", "dev", "peer0"])?;
        ip(&["-n", &peer, "link", "set", "peer0", "up"])?;
        ip(&["-n", &inner, "route", "add", "default", "via", "10.201.0.1"])?;

        let id = env.container_id("web");
        start_script_in(
            env,
            &ns,
            &id,
            "echo '10.201.0.2 self' >> /etc/hosts && mkdir -p /www && echo hello > /www/index.html && \
             exec httpd -f -p 10.201.0.2:8080 -h /www",
            Some(&inner),
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while fetch_in(&peer, "http://10.201.0.2:8080/index.html").is_err() {
            ensure!(Instant::now() < deadline, "httpd did not answer on 10.201.0.2");
            sleep(Duration::from_millis(200));
        }
        let checkpoint = ctl.ok(&["create", &id, "--leave-running=false"])?.trim().to_string();
        remove_container(env, &ns, &id)?;

        // The new network: the peer is now on 10.202.0.0/24.
        ip(&["-n", &peer, "addr", "add", "10.202.0.1/24", "dev", "peer0"])?;
        let restored = format!("{id}-r");
        ctl.ok(&[
            "restore",
            &checkpoint,
            "--name",
            &restored,
            "--resume",
            "--network-remap",
            "10.201.0.0/24->10.202.0.0/24",
        ])?;
        let result = (|| {
            let addrs = ip(&["-n", &inner, "-4", "addr", "show", "dev", "eth0"])?;
            ensure!(
                addrs.contains("10.202.0.2/24") && !addrs.contains("10.201.0.2"),
                "the namespace's address moved: {addrs}"
            );
            let routes = ip(&["-n", &inner, "-4", "route", "show", "default"])?;
            ensure!(routes.contains("via 10.202.0.1"), "the default route moved: {routes}");
            // The listening socket was bound to 10.201.0.2: it is now bound
            // to 10.202.0.2, in the restored httpd.
            ensure!(
                fetch_in(&peer, "http://10.202.0.2:8080/index.html")?.trim() == "hello",
                "the restored server answers on its new address"
            );
            let hosts = env.exec(&ns, &restored, "cat /etc/hosts")?;
            ensure!(
                hosts.contains("10.202.0.2 self") && !hosts.contains("10.201.0.2"),
                "/etc/hosts moved: {hosts}"
            );
            Ok(())
        })();
        let removed = remove_container(env, &ns, &restored);
        result?;
        removed?;

        // A container with a network namespace of its own: refused, saying
        // why, and nothing is left.
        let own = env.container_id("own");
        start_counter(env, &ns, &own)?;
        wait_count(env, &ns, &own, 2)?;
        let plain = ctl.ok(&["create", &own])?.trim().to_string();
        let (code, _, err) = ctl.run(&[
            "restore",
            &plain,
            "--name",
            "own-moved",
            "--network-remap",
            "10.201.0.0/24:10.202.0.0/24",
        ])?;
        ensure!(
            code != 0 && err.contains("network") && err.contains("of its own"),
            "remapping a namespace CRIU dumps itself is refused: {err}"
        );
        ensure!(
            !env.ctr(&ns, &["containers", "ls", "-q"])?.contains("own-moved"),
            "nothing is left of the refused restore"
        );
        Ok(())
    });
}

/// Holds about 3 MB of incompressible data in the shell's memory besides
/// the count, so that its process images are that large.
const BIG_COUNTER: &str = "big=$(head -c 2200000 /dev/urandom | base64); \
     i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.3; done";

/// `--leave-running=false` stops the container only once its checkpoint is
/// stored: when storing fails after the dump (storage too small for the
/// process images), the container keeps running and nothing is left
/// frozen; when storing succeeds, it is stopped as asked.
#[test]
fn leave_running_false_stops_the_container_only_once_stored() {
    with_env("stopstore", Options::default(), |env| {
        let (ns, mut ctl) = pulled_namespace(env)?;
        let id = env.container_id("counter");
        start_script(env, &ns, &id, BIG_COUNTER)?;
        let before = wait_count(env, &ns, &id, 2)?;

        // nfs storage on a 512 KiB tmpfs: the container's record fits,
        // its process images do not.
        let export = env.dir().join("small-export");
        std::fs::create_dir_all(&export)?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(&export)
            .status()?;
        ensure!(mounted.success(), "mounting a tmpfs on {}", export.display());
        let config = env.dir().join("small.yaml");
        std::fs::write(
            &config,
            format!("storage:\n  backend: nfs\n  nfs: {{path: {}}}\n", export.display()),
        )?;
        ctl.config = Some(config);
        let result = ctl.run(&["create", &id, "--leave-running=false"]);
        let _ = Command::new("umount").arg("-l").arg(&export).status();
        let (code, out, err) = result?;
        ensure!(code != 0, "a checkpoint into a full storage succeeded: {out}");
        ensure!(
            err.contains("No space left") || err.contains("space"),
            "the error says the storage is full: {err}"
        );
        let status = task_status(env, &ns, &id)?;
        ensure!(
            status == "RUNNING",
            "after a failed store the container must run on, it is {status}"
        );
        // Not frozen either: it goes on counting.
        wait_count(env, &ns, &id, before + 3)?;

        ctl.config = None;
        let checkpoint = ctl.ok(&["create", &id, "--leave-running=false"])?.trim().to_string();
        ensure!(
            ctl.listed(&checkpoint)?["process"]["leave_running"] == false,
            "the metadata says the container was stopped"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while task_status(env, &ns, &id)? != "STOPPED" {
            ensure!(
                Instant::now() < deadline,
                "the container still runs after --leave-running=false"
            );
            sleep(Duration::from_millis(100));
        }
        remove_container(env, &ns, &id)?;
        // What was stored restores and counts on.
        let restored = format!("{id}-r");
        ctl.ok(&["restore", &checkpoint, "--name", &restored, "--resume"])?;
        wait_count(env, &ns, &restored, before + 4)?;
        remove_container(env, &ns, &restored)?;
        Ok(())
    });
}

/// The annotation of a checkpoint archive's layer that names its container
/// record's blob.
const RECORD_ANNOTATION: &str = "io.seamless.checkpoint.container-record";

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies the checkpoint archive `source` to `target` with each layer's
/// container record changed by `edit` (its blob, the layer's annotation,
/// the manifest and the index made consistent again, as someone who
/// rewrites an archive would), so that only the record's seal can tell.
fn rewrite_record(
    source: &std::path::Path,
    target: &std::path::Path,
    edit: impl Fn(&mut serde_json::Value),
) -> Result<()> {
    use std::io::Read;
    let mut members: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(source)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry.path()?.display().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        members.push((name, data));
    }
    let find = |members: &[(String, Vec<u8>)], name: &str| -> Result<usize> {
        members
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no member {name} in {}", source.display()))
    };
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let at = find(&members, "index.json")?;
    let mut index: serde_json::Value = serde_json::from_slice(&members[at].1)?;
    let manifest_at = find(
        &members,
        &blob(index["manifests"][0]["digest"].as_str().unwrap_or_default()),
    )?;
    let mut manifest: serde_json::Value = serde_json::from_slice(&members[manifest_at].1)?;
    let mut edited = 0;
    for layer in manifest["layers"].as_array_mut().into_iter().flatten() {
        let Some(digest) = layer["annotations"][RECORD_ANNOTATION].as_str().map(str::to_string) else {
            continue;
        };
        let record_at = find(&members, &blob(&digest))?;
        let mut record: serde_json::Value = serde_json::from_slice(&members[record_at].1)?;
        edit(&mut record);
        let bytes = serde_json::to_vec(&record)?;
        let digest = format!("sha256:{}", sha256_hex(&bytes));
        members[record_at] = (blob(&digest), bytes);
        layer["annotations"][RECORD_ANNOTATION] = serde_json::Value::String(digest);
        edited += 1;
    }
    ensure!(edited > 0, "{} holds no container record", source.display());
    let bytes = serde_json::to_vec(&manifest)?;
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    index["manifests"][0]["digest"] = serde_json::Value::String(digest.clone());
    index["manifests"][0]["size"] = serde_json::json!(bytes.len());
    members[manifest_at] = (blob(&digest), bytes);
    members[at].1 = serde_json::to_vec(&index)?;
    let mut builder = tar::Builder::new(std::fs::File::create(target)?);
    for (name, data) in &members {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, data.as_slice())?;
    }
    builder.into_inner()?.sync_all()?;
    Ok(())
}

/// A CLI on `nfs` storage in a new directory `<test dir>/<name>`.
fn nfs_ctl(env: &Env, ns: &str, name: &str) -> Result<Ctl> {
    let export = env.dir().join(name);
    std::fs::create_dir_all(&export)?;
    let config = env.dir().join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!("storage:\n  backend: nfs\n  nfs: {{path: {}}}\n", export.display()),
    )?;
    Ok(Ctl {
        socket: env.daemon_socket(),
        ns: ns.to_string(),
        config: Some(config),
    })
}

/// A checkpoint archive whose container record was rewritten to carry a
/// prestart hook, a bind mount of the host's `/` and the host's network
/// namespace: imported, its restore is refused naming each field, and no
/// container is created (the hook never runs); `--trust-record` applies it.
/// The same archive untouched restores (the seal of this node verifies),
/// and with the seal stripped off an ordinary record restores rebuilt.
#[test]
fn a_tampered_container_record_is_refused_on_restore() {
    with_env("restore-record", Options::default(), |env| {
        let (ns, ctl) = pulled_namespace(env)?;
        let id = env.container_id("rec");
        start_script(env, &ns, &id, "echo mine > /mine && sync && exec sleep 1000")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.exec(&ns, &id, "cat /mine").is_err() {
            ensure!(Instant::now() < deadline, "{id} did not start");
            sleep(Duration::from_millis(200));
        }
        let checkpoint = ctl.ok(&["create", &id, "--fs-only"])?.trim().to_string();
        let archive = env.dir().join("record.tar");
        ctl.ok(&["info", &checkpoint, "--export", &archive.display().to_string()])?;

        let marker = env.dir().join("hook-ran");
        let hostile = env.dir().join("hostile.tar");
        let hook = format!("touch {}", marker.display());
        rewrite_record(&archive, &hostile, |record| {
            let spec = &mut record["spec"];
            spec["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", hook]}]});
            spec["mounts"]
                .as_array_mut()
                .expect("the recorded spec has mounts")
                .push(serde_json::json!({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]}));
            for namespace in spec["linux"]["namespaces"].as_array_mut().into_iter().flatten() {
                if namespace["type"] == "network" {
                    namespace["path"] = serde_json::json!("/proc/1/ns/net");
                }
            }
        })?;
        let foreign = nfs_ctl(env, &ns, "foreign")?;
        foreign.ok(&["import", &hostile.display().to_string()])?;
        let (code, out, err) = foreign.run(&["restore", &checkpoint, "--name", "hostile", "--resume"])?;
        ensure!(code != 0, "a tampered record was restored: {out}{err}");
        for field in [
            "untrusted checkpoint record",
            "does not verify",
            "spec.hooks.prestart is not allowed",
            "(/host) is not allowed (host path /",
            "spec.linux.namespaces[network].path is not allowed",
            "/proc/1/ns/net",
        ] {
            ensure!(err.contains(field), "the refusal names {field:?}: {err}");
        }
        ensure!(
            !env.ctr(&ns, &["containers", "ls", "-q"])?.contains("hostile"),
            "a refused restore creates no container"
        );
        ensure!(!marker.exists(), "the hook of a refused record ran");
        // The daemon goes on serving.
        ctl.listed(&checkpoint)?;

        // The operator's opt-in applies it as recorded (created, not
        // started: the hook would run only with a task).
        let out = foreign.ok(&["restore", &checkpoint, "--name", "forced", "--trust-record"])?;
        ensure!(out.contains("forced"), "{out}");
        let info = env.ctr(&ns, &["containers", "info", "forced"])?;
        ensure!(info.contains("prestart") && info.contains("/proc/1/ns/net"), "{info}");
        env.ctr(&ns, &["containers", "rm", "forced"])?;
        ensure!(!marker.exists(), "the hook ran without a task");

        // Untouched, the archive restores as this node made it.
        let own = nfs_ctl(env, &ns, "own")?;
        own.ok(&["import", &archive.display().to_string()])?;
        own.ok(&["restore", &checkpoint, "--name", "own", "--resume"])?;
        ensure!(
            env.exec(&ns, "own", "cat /mine")?.trim() == "mine",
            "the files come back"
        );
        let spec = env.ctr(&ns, &["containers", "info", "own"])?;
        remove_container(env, &ns, "own")?;

        // Without a seal an ordinary record still restores, as an ordinary
        // container of its image: its cgroup path made again.
        let unsealed = env.dir().join("unsealed.tar");
        rewrite_record(&archive, &unsealed, |record| {
            record.as_object_mut().map(|r| r.remove("seal"));
            record["spec"]["linux"]["cgroupsPath"] = serde_json::json!("/system.slice/ssh.service/x");
        })?;
        let plain = nfs_ctl(env, &ns, "plain")?;
        plain.ok(&["import", &unsealed.display().to_string()])?;
        plain.ok(&["restore", &checkpoint, "--name", "plain", "--resume"])?;
        ensure!(
            env.exec(&ns, "plain", "cat /mine")?.trim() == "mine",
            "the files come back"
        );
        let info = env.ctr(&ns, &["containers", "info", "plain"])?;
        ensure!(
            info.contains(&format!("\"cgroupsPath\": \"/{ns}/plain\"")) && !info.contains("ssh.service"),
            "the cgroup path of an untrusted record is rebuilt: {info}"
        );
        ensure!(
            spec.contains(&format!("\"cgroupsPath\": \"/{ns}/own\"")),
            "the own record keeps its path: {spec}"
        );
        remove_container(env, &ns, "plain")?;
        Ok(())
    });
}

/// Shared storage tampered with (a node that wrote a hostile tree, or
/// anyone who can write the export): the checkpoint's stored tree now holds
/// a symlink to a host directory with a file beneath it, then a directory
/// beneath a symlink to /. Restore refuses it before writing anything,
/// names the path, leaves no container and nothing in the host directory,
/// and the daemon goes on serving.
#[test]
fn a_tampered_tree_in_shared_storage_is_refused_by_restore() {
    with_env("restore-hostile", Options::default(), |env| {
        let (ns, _) = pulled_namespace(env)?;
        let shared = env.dir().join("hostile-export");
        std::fs::create_dir_all(&shared)?;
        let config = env.dir().join("hostile.yaml");
        std::fs::write(
            &config,
            format!("storage:\n  backend: nfs\n  nfs: {{path: {}}}\n", shared.display()),
        )?;
        let ctl = Ctl {
            socket: env.daemon_socket(),
            ns: ns.clone(),
            config: Some(config),
        };
        let id = env.container_id("victim");
        start_script(env, &ns, &id, "sleep 600")?;
        let checkpoint = ctl.ok(&["create", &id, "--fs-only"])?.trim().to_string();
        remove_container(env, &ns, &id)?;

        // Where the hostile tree points: a host directory.
        let host_dir = env.dir().join("host-target");
        std::fs::create_dir_all(&host_dir)?;
        let entry = |kind: &str, mode: u32| serde_json::json!({"kind": kind, "mode": mode, "uid": 0, "gid": 0, "mtime_ns": 0, "ctime_ns": 0});
        let mut symlink_out = entry("symlink", 0o777);
        symlink_out["target"] = host_dir.display().to_string().into();
        let mut slash = entry("symlink", 0o777);
        slash["target"] = "/".into();
        let delta = serde_json::json!({
            "changed": {
                "": entry("dir", 0o755),
                "x": symlink_out,
                "x/owned": entry("file", 0o4755),
                "y": slash,
                "y/seamless-hostile": entry("dir", 0o777),
            },
            "removed": [],
        });
        let stored = zstd::encode_all(&serde_json::to_vec(&delta)?[..], 3)?;
        let digest: String = <sha2::Sha256 as sha2::Digest>::digest(&stored)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let objects = shared.join("seamless-checkpoints");
        let key = format!("deltas/{checkpoint}-hostile.json.zst");
        std::fs::write(objects.join(&key), &stored)?;
        let meta_path = objects.join(format!("checkpoints/{checkpoint}.json"));
        let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path)?)?;
        meta["delta_key"] = key.into();
        meta["delta_digest"] = digest.into();
        std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta)?)?;

        let restored = format!("{id}-hostile");
        let (code, out, err) = ctl.run(&["restore", &checkpoint, "--name", &restored])?;
        ensure!(code != 0, "a tampered tree was restored: {out}{err}");
        ensure!(
            err.contains("/x/owned") && err.contains("its ancestor /x is a symlink"),
            "the refusal names the path: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(&host_dir)?.collect();
        ensure!(left.is_empty(), "written through the symlink: {left:?}");
        ensure!(
            !std::path::Path::new("/seamless-hostile").exists(),
            "written through the symlink to /"
        );
        ensure!(
            !env.ctr(&ns, &["containers", "ls", "-q"])?.contains(&restored),
            "a refused restore leaves no container"
        );
        ensure!(
            ctl.listed(&checkpoint)?["id"] == checkpoint.as_str(),
            "the daemon still serves"
        );

        // The same tree as an archive, through `checkpointctl import`:
        // refused before anything is listed.
        let archive = env.dir().join("hostile.tar");
        let host_text = host_dir.display().to_string();
        hostile::checkpoint_archive(
            &archive,
            "cp-20251201-120000",
            "victim",
            &[
                hostile::Member::Symlink("x", &host_text),
                hostile::Member::File("x/owned", b"owned"),
            ],
        );
        let (code, out, err) = ctl.run(&["import", &archive.display().to_string()])?;
        ensure!(code != 0, "a hostile archive was imported: {out}{err}");
        ensure!(
            err.contains("checkpoint cp-20251201-120000 is refused")
                && err.contains("tree entry /x/owned refused: its ancestor /x is a symlink"),
            "the refusal names the checkpoint and the path: {err}"
        );
        ensure!(
            !ctl.ok(&["list", "-o", "json"])?.contains("cp-20251201-120000"),
            "nothing was imported"
        );
        ensure!(
            std::fs::read_dir(&host_dir)?.next().is_none(),
            "nothing in the host directory"
        );
        Ok(())
    });
}

/// The pid of the task of container `id`.
fn task_pid(env: &Env, ns: &str, id: &str) -> Result<u32> {
    let tasks = env.ctr(ns, &["tasks", "ls"])?;
    tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|pid| pid.parse().ok())
        .with_context(|| format!("no task of {id} in {tasks}"))
}

/// The one checkpoint journal in the daemon's scratch directory, as JSON,
/// and its path.
fn the_journal(env: &Env) -> Result<(std::path::PathBuf, serde_json::Value)> {
    let work = env.daemon_root().join("checkpoint-work");
    let journals: Vec<std::path::PathBuf> = std::fs::read_dir(&work)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pending-"))
        })
        .collect();
    ensure!(
        journals.len() == 1,
        "one checkpoint journal in {}, found {journals:?}",
        work.display()
    );
    let path = journals[0].clone();
    ensure!(
        std::fs::metadata(&path)?.permissions().mode() & 0o777 == 0o600,
        "the journal is 0600"
    );
    let json = serde_json::from_slice(&std::fs::read(&path)?)?;
    Ok((path, json))
}

/// Waits until containerd reaches the daemon again after a restart: its
/// connection to the old one fails the first call through it.
fn reconnected(env: &Env, ns: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = env.snapshots(ns) {
        ensure!(
            Instant::now() < deadline,
            "containerd does not reach the restarted daemon: {e:#}"
        );
        sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Restarts the daemon so that it stops at `failpoint` of the next
/// checkpoint; runs `create --tcp-established --leave-running=false` of
/// `id`, which fails with the daemon; reaps the daemon and checks it
/// stopped there.
fn create_killed_at(env: &mut Env, ctl: &Ctl, id: &str, failpoint: &str) -> Result<()> {
    use seamless_snapshotter::checkpoint::journal::{FAILPOINT_ENV, FAILPOINT_EXIT};
    env.signal_daemon(nix::sys::signal::Signal::SIGTERM)?;
    env.start_daemon_with_env(&[(FAILPOINT_ENV, failpoint)])?;
    reconnected(env, &ctl.ns)?;
    let (code, out, _) = ctl.run(&["create", id, "--tcp-established", "--leave-running=false"])?;
    ensure!(code != 0, "the create survived the daemon's death: {out}");
    // Already gone: the signal only reaps it.
    let status = env.signal_daemon(nix::sys::signal::Signal::SIGKILL)?;
    ensure!(
        status.code() == Some(FAILPOINT_EXIT),
        "the daemon stopped at failpoint {failpoint} (exit {FAILPOINT_EXIT}), not {status}:\n{}",
        env.log_tail("daemon.log")
    );
    Ok(())
}

/// A daemon killed after CRIU stopped the container
/// (`--tcp-established --leave-running=false`) and before the checkpoint
/// was stored loses nothing: the next start stores the dump it journaled,
/// and the checkpoint restores to a container counting on.
#[test]
fn a_checkpoint_dumped_by_a_killed_daemon_is_stored_by_the_next_start() {
    with_env("journal-store", Options::default(), |env| {
        let (ns, ctl) = pulled_namespace(env)?;
        let id = env.container_id("counter");
        start_counter(env, &ns, &id)?;
        let before = wait_count(env, &ns, &id, 4)?;
        create_killed_at(env, &ctl, &id, "after-dump")?;

        // CRIU stopped the container; only the journaled dump holds it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while task_status(env, &ns, &id)? != "STOPPED" {
            ensure!(Instant::now() < deadline, "CRIU did not stop the container");
            sleep(Duration::from_millis(100));
        }
        let (journal, pending) = the_journal(env)?;
        let text = std::fs::read_to_string(&journal)?;
        ensure!(
            pending["dump"]["tcp_established"] == true && pending["container"] == id.as_str(),
            "the journal holds the request: {text}"
        );
        let work = std::path::PathBuf::from(pending["work"].as_str().unwrap_or_default());
        let capture = std::path::PathBuf::from(pending["capture"].as_str().unwrap_or_default());
        ensure!(
            work.join("work/dump.log").exists() && capture.join("fs").exists(),
            "the dump and the capture are there: {text}"
        );

        env.start_daemon()?;
        reconnected(env, &ns)?;
        let out = ctl.ok(&["list", "-o", "json"])?;
        let all: Vec<serde_json::Value> = serde_json::from_str(&out).with_context(|| out.clone())?;
        ensure!(all.len() == 1, "one checkpoint stored at restart: {out}");
        let checkpoint = all[0]["id"].as_str().unwrap_or_default().to_string();
        ensure!(
            checkpoint == pending["id"].as_str().unwrap_or_default()
                && all[0]["container"] == id.as_str()
                && all[0]["process"]["tcp_established"] == true
                && all[0]["process"]["leave_running"] == false,
            "the checkpoint the journal named, with its options: {out}"
        );
        ensure!(
            env.log_tail("daemon.log")
                .contains("stored the checkpoint a previous run dumped"),
            "the daemon logs what it stored"
        );
        ensure!(
            !journal.exists() && !work.exists() && !capture.exists(),
            "the journal, the dump and the capture are removed once stored"
        );

        remove_container(env, &ns, &id)?;
        let restored = format!("{id}-r");
        ctl.ok(&["restore", &checkpoint, "--name", &restored, "--resume"])?;
        let result = continues_from(env, &ns, &restored, before, before + 40);
        let cleaned = remove_container(env, &ns, &restored);
        result?;
        cleaned
    });
}

/// A daemon killed before the dump finished (here: before CRIU ran, its
/// container then frozen as CRIU leaves one it was killed dumping, and a
/// dump.log without CRIU's success) leaves a journal the next start
/// discards, with the capture and the scratch directory; the container is
/// thawed and counts on, and the daemon serves.
#[test]
fn a_checkpoint_whose_dump_did_not_finish_is_discarded_by_the_next_start() {
    with_env("journal-discard", Options::default(), |env| {
        let (ns, ctl) = pulled_namespace(env)?;
        let id = env.container_id("counter");
        start_counter(env, &ns, &id)?;
        wait_count(env, &ns, &id, 4)?;
        create_killed_at(env, &ctl, &id, "before-dump")?;

        let (journal, pending) = the_journal(env)?;
        let work = std::path::PathBuf::from(pending["work"].as_str().unwrap_or_default());
        let capture = std::path::PathBuf::from(pending["capture"].as_str().unwrap_or_default());
        ensure!(capture.exists(), "the capture is kept while journaled");
        std::fs::write(
            work.join("work/dump.log"),
            "(00.000000) Version: 4.1\n(00.001000) Dumping processes (pid: 1)\n",
        )?;
        let freezer = seamless_snapshotter::host::cgroup::freezer_of(task_pid(env, &ns, &id)?)?;
        let state = match &freezer {
            seamless_snapshotter::host::sys::Freezer::V1(dir) => {
                std::fs::write(dir.join("freezer.state"), "FROZEN")?;
                dir.join("freezer.state")
            }
            seamless_snapshotter::host::sys::Freezer::V2(dir) => {
                std::fs::write(dir.join("cgroup.freeze"), "1")?;
                dir.join("cgroup.freeze")
            }
        };

        env.start_daemon()?;
        reconnected(env, &ns)?;
        let thawed = std::fs::read_to_string(&state)?;
        ensure!(
            matches!(thawed.trim(), "THAWED" | "0"),
            "the container is not left frozen: {thawed}"
        );
        ensure!(
            !journal.exists() && !work.exists() && !capture.exists(),
            "the journal, the scratch directory and the capture are removed"
        );
        ensure!(
            env.log_tail("daemon.log").contains("discarded the checkpoint"),
            "the daemon logs what it discarded"
        );
        ensure!(
            task_status(env, &ns, &id)? == "RUNNING",
            "the container was never stopped"
        );
        let resumed = count(env, &ns, &id)?;
        wait_count(env, &ns, &id, resumed + 3)?;
        let out = ctl.ok(&["list", "-o", "json"])?;
        ensure!(out.trim() == "[]", "nothing was stored: {out}");
        // The daemon serves: the same checkpoint now succeeds.
        let checkpoint = ctl.ok(&["create", &id])?.trim().to_string();
        ctl.listed(&checkpoint)?;
        let left: Vec<_> = std::fs::read_dir(env.daemon_root().join("checkpoint-work"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("pending-"))
            .collect();
        ensure!(left.is_empty(), "no journal is left by a stored checkpoint: {left:?}");
        Ok(())
    });
}

/// A dump CRIU finished, stopping the container, that cannot be stored
/// (encrypted nfs storage on a full tmpfs) is not thrown away: its journal
/// (the encryption key sealed, not in clear), images and capture are kept,
/// and once the storage has room the next start stores it, and it restores
/// counting on.
#[test]
fn a_stopping_dump_that_cannot_be_stored_is_stored_by_the_next_start() {
    with_env("journal-full", Options::default(), |env| {
        let (ns, mut ctl) = pulled_namespace(env)?;
        let id = env.container_id("counter");
        start_script(env, &ns, &id, BIG_COUNTER)?;
        let before = wait_count(env, &ns, &id, 2)?;

        // Room for the container's record, not for its process images.
        let export = env.dir().join("small-export");
        std::fs::create_dir_all(&export)?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(&export)
            .status()?;
        ensure!(mounted.success(), "mounting a tmpfs on {}", export.display());
        let result = (|| {
            let key = "3c".repeat(32);
            let config = env.dir().join("small.yaml");
            std::fs::write(
                &config,
                format!(
                    "storage:\n  backend: nfs\n  nfs: {{path: {}}}\n  encryption_key: \"{key}\"\n",
                    export.display()
                ),
            )?;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))?;
            ctl.config = Some(config);
            let (code, out, err) = ctl.run(&["create", &id, "--tcp-established", "--leave-running=false"])?;
            ensure!(code != 0, "a checkpoint into a full storage succeeded: {out}");
            ensure!(err.contains("space"), "the error says the storage is full: {err}");
            ensure!(task_status(env, &ns, &id)? == "STOPPED", "CRIU stopped the container");
            let (journal, pending) = the_journal(env)?;
            let text = std::fs::read_to_string(&journal)?;
            ensure!(
                !text.contains(&key),
                "the encryption key is in clear in the journal: {text}"
            );
            ensure!(
                pending["storage"]["sealed_secrets"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "the journal holds the key sealed: {text}"
            );

            let grown = Command::new("mount")
                .args(["-o", "remount,size=64m"])
                .arg(&export)
                .status()?;
            ensure!(grown.success(), "growing the tmpfs on {}", export.display());
            env.signal_daemon(nix::sys::signal::Signal::SIGTERM)?;
            env.start_daemon()?;
            reconnected(env, &ns)?;
            ensure!(!journal.exists(), "the journal is removed once stored");
            let out = ctl.ok(&["list", "-o", "json"])?;
            let all: Vec<serde_json::Value> = serde_json::from_str(&out).with_context(|| out.clone())?;
            ensure!(
                all.len() == 1 && all[0]["id"] == pending["id"],
                "the journaled checkpoint is stored: {out}"
            );
            let checkpoint = all[0]["id"].as_str().unwrap_or_default().to_string();
            remove_container(env, &ns, &id)?;
            let restored = format!("{id}-r");
            ctl.ok(&["restore", &checkpoint, "--name", &restored, "--resume"])?;
            let result = continues_from(env, &ns, &restored, before, before + 60);
            let cleaned = remove_container(env, &ns, &restored);
            result?;
            cleaned
        })();
        let _ = Command::new("umount").arg("-l").arg(&export).status();
        result
    });
}

#[test]
fn what_interrupted_restores_left_is_swept_when_the_daemon_starts() {
    with_env("restore-sweep", Options::default(), |env| {
        let ns = env.namespace("r");
        // A lease as a killed run's restore left it (its label names
        // another run), one of somebody else, and a restore's work
        // directory.
        env.ctr(
            &ns,
            &[
                "leases",
                "create",
                "--id",
                "seamless-restore-gone-1",
                "io.seamless.restore=1-1",
            ],
        )?;
        env.ctr(&ns, &["leases", "create", "--id", "someone-elses", "team=web"])?;
        let work = env.daemon_root().join("restore-work/gone-1700000000");
        std::fs::create_dir_all(work.join("images"))?;
        std::fs::write(work.join("images/pages-1.img"), b"left by a killed restore")?;

        env.signal_daemon(nix::sys::signal::Signal::SIGKILL)?;
        env.start_daemon()?;
        ensure!(
            !env.daemon_root().join("restore-work/gone-1700000000").exists(),
            "the restore's work directory is removed before the daemon serves"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leases = env.ctr(&ns, &["leases", "ls", "-q"])?;
            if !leases.contains("seamless-restore-gone-1") {
                ensure!(
                    leases.contains("someone-elses"),
                    "a lease not of ours went too: {leases:?}"
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the restore's lease is still there: {leases:?}"
            );
            sleep(Duration::from_millis(200));
        }
        Ok(())
    });
}
