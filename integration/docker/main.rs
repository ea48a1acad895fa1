//! Integration tests of `docker-checkpoint` against a real Docker engine
//! (Debian's docker.io, experimental mode), runc and CRIU, selected with
//! `cargo test --test docker` and run as root. Each test starts its own
//! dockerd (see `env`); a missing prerequisite fails the test.

mod env;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use env::DockerEnv;

/// The reference's counter, word for word.
const COUNTER: &str = "i=0; while true; do echo Counter: $i; i=$((i+1)); sleep 2; done";

/// The counter values in a log, in order.
fn counters(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("Counter: "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).map_or(0, |m| m.mode() & 0o7777)
}

#[test]
fn the_reference_workflow_word_for_word() -> Result<()> {
    let env = DockerEnv::start("workflow")?;
    // The reference's default -dir; this test's container name is its own.
    let dir = Path::new("/tmp/docker-checkpoints");
    let _ = std::fs::remove_dir_all(dir.join("testapp"));

    env.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "testapp",
        "alpine:latest",
        "sh",
        "-c",
        COUNTER,
    ])?;
    env.wait_for_log("testapp", "Counter: 2", Duration::from_secs(30))?;
    let before = env.docker(&["logs", "--tail", "5", "testapp"])?;
    let last_before = *counters(&before).last().context("the counter logged nothing")?;
    let id = env.inspect("testapp", "{{.Id}}")?;

    let out = env.checkpoint_tool(&["-container", "testapp", "-name", "checkpoint1"])?;
    ensure!(out.status.success(), "checkpoint failed: {}", stderr(&out));
    ensure!(
        stdout(&out).contains("Checkpoint created at /tmp/docker-checkpoints/testapp/checkpoint1"),
        "{}",
        stdout(&out)
    );
    // -leave-running defaults to true.
    ensure!(env.inspect("testapp", "{{.State.Running}}")? == "true");

    // The reference's layout, private.
    let cp = dir.join("testapp/checkpoint1");
    ensure!(
        mode(&cp) == 0o700 && mode(&dir.join("testapp")) == 0o700,
        "directories are not 0700"
    );
    let names: Vec<String> = std::fs::read_dir(&cp)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    for prefix in ["core-", "fdinfo-", "pagemap-", "pages-"] {
        ensure!(
            names.iter().any(|n| n.starts_with(prefix) && n.ends_with(".img")),
            "no {prefix}*.img in {names:?}"
        );
    }
    for name in ["container.json", "dump.log", "SHA256SUMS", "rootfs-diff"] {
        ensure!(names.iter().any(|n| n == name), "no {name} in {names:?}");
    }
    for name in names.iter().filter(|n| n.as_str() != "rootfs-diff") {
        ensure!(
            mode(&cp.join(name)) == 0o600,
            "{name} is {:o}, not 0600",
            mode(&cp.join(name))
        );
    }
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(cp.join("container.json"))?)?;
    ensure!(
        record["Id"] == id.as_str(),
        "container.json is not the container's metadata"
    );
    ensure!(std::fs::read_to_string(cp.join("dump.log"))?.contains("Dumping finished successfully"));

    env.docker(&["stop", "testapp"])?;
    env.docker(&["rm", "testapp"])?;
    let out = env.checkpoint_tool(&[
        "-restore",
        "-container",
        "testapp",
        "-name",
        "checkpoint1",
        "-new-name",
        "testapp-restored",
    ])?;
    ensure!(out.status.success(), "restore failed: {}", stderr(&out));
    for check in ["status", "process", "api", "logs", "stats"] {
        ensure!(
            stdout(&out).contains(&format!("[ok] {check}:")),
            "check {check} not reported as passed:\n{}",
            stdout(&out)
        );
    }
    ensure!(cp.join("restore.log").is_file(), "no restore.log");
    // containerd's own copy of the images (it never removes it) is gone.
    let inventory = std::fs::read(cp.join("inventory.img"))?;
    let left: Vec<_> = std::fs::read_dir("/tmp")?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ctrd-checkpoint"))
        .filter(|e| std::fs::read(e.path().join("inventory.img")).is_ok_and(|i| i == inventory))
        .map(|e| e.path())
        .collect();
    ensure!(left.is_empty(), "containerd's copies of the images were left: {left:?}");
    ensure!(mode(&cp.join("restore.log")) == 0o600);

    let ps = env.docker(&["ps"])?;
    ensure!(ps.contains("testapp-restored"), "docker ps does not list it:\n{ps}");
    let after = env.wait_for_log("testapp-restored", "Counter: ", Duration::from_secs(30))?;
    let restored = counters(&after);
    // It continues from the checkpoint: never from 0, each value one more.
    ensure!(
        restored[0] > last_before,
        "restored counter starts at {} though {last_before} was logged before the checkpoint",
        restored[0]
    );
    env.wait_for_log(
        "testapp-restored",
        &format!("Counter: {}", restored[0] + 1),
        Duration::from_secs(30),
    )?;
    let tail = counters(&env.docker(&["logs", "--tail", "10", "testapp-restored"])?);
    ensure!(tail.windows(2).all(|w| w[1] == w[0] + 1), "counter skips: {tail:?}");
    let exec = env.docker(&["exec", "testapp-restored", "echo", "exec-ok"])?;
    ensure!(exec.trim() == "exec-ok");
    let stats = env.docker(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.Name}} {{.PIDs}}",
        "testapp-restored",
    ])?;
    ensure!(stats.starts_with("testapp-restored "), "docker stats: {stats}");
    Ok(())
}

#[test]
fn an_open_file_in_the_writable_layer_survives_the_restore() -> Result<()> {
    let env = DockerEnv::start("openfile")?;
    let dir = env.dir().join("checkpoints");
    let dir_arg = dir.to_str().context("utf-8")?;
    // Writes a line a second into a file it holds open in its own layer.
    let writer = "exec 3>>/data.log; i=0; while true; do echo line $i >&3; echo Counter: $i; i=$((i+1)); sleep 1; done";
    env.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "writer",
        "alpine:latest",
        "sh",
        "-c",
        writer,
    ])?;
    env.wait_for_log("writer", "Counter: 3", Duration::from_secs(30))?;
    // Stopped by the checkpoint this time.
    let out = env.checkpoint_tool(&[
        "-container",
        "writer",
        "-name",
        "c1",
        "-dir",
        dir_arg,
        "-leave-running=false",
    ])?;
    ensure!(out.status.success(), "checkpoint failed: {}", stderr(&out));
    ensure!(
        env.inspect("writer", "{{.State.Running}}")? == "false",
        "-leave-running=false left it running"
    );
    let saved = std::fs::read_to_string(dir.join("writer/c1/rootfs-diff/data.log"))?;
    let saved_lines = saved.lines().count();
    ensure!(
        saved_lines >= 4,
        "the writable layer's file was not captured: {saved:?}"
    );
    env.docker(&["rm", "writer"])?;

    let out = env.checkpoint_tool(&["-restore", "-container", "writer", "-name", "c1", "-dir", dir_arg])?;
    ensure!(out.status.success(), "restore failed: {}", stderr(&out));
    // The default new name.
    env.wait_for_log(
        "writer-restored",
        &format!("Counter: {}", saved_lines + 1),
        Duration::from_secs(30),
    )?;
    let data = env.docker(&["exec", "writer-restored", "cat", "/data.log"])?;
    let lines: Vec<&str> = data.lines().collect();
    ensure!(
        lines.starts_with(&saved.lines().collect::<Vec<_>>()),
        "the file lost what it held"
    );
    let expected: Vec<String> = (0..lines.len()).map(|i| format!("line {i}")).collect();
    ensure!(
        lines == expected,
        "the restored process did not go on writing its open file: {lines:?}"
    );
    Ok(())
}

#[test]
fn bad_input_gets_a_clear_error_and_loses_nothing() -> Result<()> {
    let env = DockerEnv::start("badinput")?;
    let dir = env.dir().join("checkpoints");
    let dir_arg = dir.to_str().context("utf-8")?;
    let expect = |out: &std::process::Output, code: i32, text: &str| -> Result<()> {
        ensure!(
            out.status.code() == Some(code) && stderr(out).contains(text),
            "expected exit {code} and {text:?}, got {:?}: {}",
            out.status.code(),
            stderr(out)
        );
        Ok(())
    };

    let out = env.checkpoint_tool(&["-container", "nosuch", "-dir", dir_arg])?;
    expect(&out, 3, "no such container: nosuch")?;

    env.docker(&[
        "create",
        "--network",
        "none",
        "--name",
        "stopped",
        "alpine:latest",
        "sleep",
        "60",
    ])?;
    let out = env.checkpoint_tool(&["-container", "stopped", "-dir", dir_arg])?;
    expect(&out, 1, "is not running")?;

    env.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "app",
        "alpine:latest",
        "sh",
        "-c",
        COUNTER,
    ])?;
    env.wait_for_log("app", "Counter: 0", Duration::from_secs(30))?;
    let out = env.checkpoint_tool(&["-container", "app", "-pre-dump", "-dir", dir_arg])?;
    expect(&out, 1, "-pre-dump")?;

    // A -dir that is a symlink, or that others may write.
    let real = env.dir().join("real");
    std::fs::create_dir(&real)?;
    let link = env.dir().join("link");
    std::os::unix::fs::symlink(&real, &link)?;
    let out = env.checkpoint_tool(&["-container", "app", "-dir", link.to_str().context("utf-8")?])?;
    expect(&out, 2, "is a symlink")?;
    let shared = env.dir().join("shared");
    std::fs::create_dir(&shared)?;
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
    let out = env.checkpoint_tool(&["-container", "app", "-dir", shared.to_str().context("utf-8")?])?;
    expect(&out, 2, "writable by others")?;
    ensure!(
        env.inspect("app", "{{.State.Running}}")? == "true",
        "a refused checkpoint stopped the container"
    );

    // A checkpoint name that exists.
    let out = env.checkpoint_tool(&["-container", "app", "-name", "c1", "-dir", dir_arg])?;
    ensure!(out.status.success(), "checkpoint failed: {}", stderr(&out));
    let out = env.checkpoint_tool(&["-container", "app", "-name", "c1", "-dir", dir_arg])?;
    expect(&out, 1, "already exists")?;

    // A new name that is taken.
    let out = env.checkpoint_tool(&[
        "-restore",
        "-container",
        "app",
        "-name",
        "c1",
        "-dir",
        dir_arg,
        "-new-name",
        "stopped",
    ])?;
    expect(&out, 1, "a container named stopped already exists")?;

    // A damaged image file: refused before anything is created.
    let cp = dir.join("app/c1");
    let pages = std::fs::read_dir(&cp)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("pages-")))
        .context("no pages image")?;
    let original = std::fs::read(&pages)?;
    let mut damaged = original.clone();
    damaged[original.len() / 2] ^= 0xff;
    std::fs::write(&pages, &damaged)?;
    let out = env.checkpoint_tool(&["-restore", "-container", "app", "-name", "c1", "-dir", dir_arg])?;
    expect(&out, 2, "does not match its digest")?;
    ensure!(
        env.docker_output(&["inspect", "app-restored"])?.status.code() == Some(1),
        "a refused restore created a container"
    );
    ensure!(std::fs::read(&pages)? == damaged, "the checkpoint was changed");

    // A record rewritten to ask for the host (digests made to match, as
    // whoever could write the directory could): refused by name.
    std::fs::write(&pages, &original)?;
    let record_path = cp.join("container.json");
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&record_path)?)?;
    record["HostConfig"]["Privileged"] = serde_json::Value::Bool(true);
    record["HostConfig"]["Binds"] = serde_json::json!(["/:/host"]);
    std::fs::write(&record_path, serde_json::to_vec(&record)?)?;
    let sums = std::process::Command::new("sh")
        .args(["-c", "find . -type f ! -name SHA256SUMS ! -name restore.log | sed 's|^./||' | sort | xargs sha256sum > SHA256SUMS"])
        .current_dir(&cp)
        .status()?;
    ensure!(sums.success());
    let out = env.checkpoint_tool(&["-restore", "-container", "app", "-name", "c1", "-dir", dir_arg])?;
    expect(&out, 2, "privileged mode")?;
    ensure!(env.docker_output(&["inspect", "app-restored"])?.status.code() == Some(1));
    ensure!(env.inspect("app", "{{.State.Running}}")? == "true");
    Ok(())
}

#[test]
fn tcp_connections_and_file_locks_are_checkpointed_as_asked() -> Result<()> {
    let env = DockerEnv::start("tcplocks")?;
    let dir = env.dir().join("checkpoints");
    let dir_arg = dir.to_str().context("utf-8")?;

    // An established connection over the container's loopback: a sender
    // writes a numbered line a second to a listener that keeps them.
    let pair = "sleep 100000 | nc -l -p 9000 > /tmp/got & sleep 1; \
                (i=0; while true; do echo msg $i; i=$((i+1)); sleep 1; done) | nc 127.0.0.1 9000 & \
                i=0; while true; do echo Counter: $i; i=$((i+1)); sleep 1; done";
    env.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "tcp",
        "alpine:latest",
        "sh",
        "-c",
        pair,
    ])?;
    env.wait_for_log("tcp", "Counter: 3", Duration::from_secs(30))?;
    let out = env.checkpoint_tool(&["-container", "tcp", "-name", "notcp", "-dir", dir_arg, "-tcp=false"])?;
    ensure!(!out.status.success(), "-tcp=false dumped an established connection");
    ensure!(stderr(&out).contains("dump failed"), "{}", stderr(&out));
    ensure!(
        env.inspect("tcp", "{{.State.Running}}")? == "true",
        "a failed dump stopped the container"
    );
    let out = env.checkpoint_tool(&["-container", "tcp", "-name", "c1", "-dir", dir_arg])?;
    ensure!(out.status.success(), "checkpoint failed: {}", stderr(&out));
    let got_before = env.docker(&["exec", "tcp", "cat", "/tmp/got"])?.lines().count();
    env.docker(&["rm", "-f", "tcp"])?;
    let out = env.checkpoint_tool(&["-restore", "-container", "tcp", "-name", "c1", "-dir", dir_arg])?;
    ensure!(out.status.success(), "restore failed: {}", stderr(&out));
    ensure!(
        !Path::new(docker_restore_config()).exists(),
        "the CRIU options written for the restore were left"
    );
    // The restored pair goes on over the same connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = env.docker(&["exec", "tcp-restored", "cat", "/tmp/got"])?;
        let lines: Vec<&str> = got.lines().collect();
        let expected: Vec<String> = (0..lines.len()).map(|i| format!("msg {i}")).collect();
        ensure!(lines == expected, "the connection's stream broke: {lines:?}");
        if lines.len() >= got_before + 3 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "nothing more came over the restored connection"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // A process holding a file lock.
    env.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "lk",
        "alpine:latest",
        "/bin/flocker",
        "/lockfile",
    ])?;
    env.wait_for_log("lk", "Counter: 1", Duration::from_secs(30))?;
    let out = env.checkpoint_tool(&[
        "-container",
        "lk",
        "-name",
        "nolocks",
        "-dir",
        dir_arg,
        "-file-locks=false",
    ])?;
    ensure!(!out.status.success(), "-file-locks=false dumped a held lock");
    let out = env.checkpoint_tool(&["-container", "lk", "-name", "c1", "-dir", dir_arg])?;
    ensure!(out.status.success(), "checkpoint failed: {}", stderr(&out));
    env.docker(&["rm", "-f", "lk"])?;
    let out = env.checkpoint_tool(&["-restore", "-container", "lk", "-name", "c1", "-dir", dir_arg])?;
    ensure!(out.status.success(), "restore failed: {}", stderr(&out));
    let pid = env.inspect("lk-restored", "{{.State.Pid}}")?;
    let locks = std::fs::read_to_string("/proc/locks")?;
    ensure!(
        locks
            .lines()
            .any(|l| l.contains("FLOCK") && l.split_whitespace().nth(4) == Some(pid.as_str())),
        "the restored process {pid} holds no lock:\n{locks}"
    );
    let log = std::fs::read_to_string(dir.join("lk/c1/restore.log"))?;
    ensure!(log.contains("CRIU restores with file-locks"), "{log}");
    ensure!(
        log.contains("Restore finished successfully"),
        "CRIU's own log is not in restore.log"
    );
    Ok(())
}

/// runc's CRIU options file, which a restore needing options writes for
/// its length only.
fn docker_restore_config() -> &'static str {
    seamless_snapshotter::docker::criu_config::RUNC_CRIU_CONFIG
}

#[test]
fn checkpointctl_keeps_docker_checkpoints_in_its_catalogue_and_restores_them_on_another_node() -> Result<()> {
    let mut env = DockerEnv::start("catalogue")?;
    let node1 = env.start_daemon("node1")?;
    let node2 = env.start_daemon("node2")?;
    // Shared storage both daemons reach; `engine: docker` from the file.
    let shared = env.dir().join("shared");
    std::fs::create_dir(&shared)?;
    let config = env.dir().join("checkpointctl.yaml");
    std::fs::write(
        &config,
        format!(
            "engine: docker\nstorage:\n  backend: nfs\n  nfs: {{path: {}}}\n",
            shared.display()
        ),
    )?;
    let ok = |out: std::process::Output| -> Result<String> {
        ensure!(out.status.success(), "checkpointctl failed: {}", stderr(&out));
        Ok(stdout(&out).trim().to_string())
    };

    env.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "web",
        "alpine:latest",
        "sh",
        "-c",
        COUNTER,
    ])?;
    env.wait_for_log("web", "Counter: 1", Duration::from_secs(30))?;
    // By a unique prefix of its id, as Docker resolves it.
    let id = env.inspect("web", "{{.Id}}")?;
    let first = ok(env.checkpointctl(&node1, &config, &["create", &id[..10], "-l", "golden"])?)?;
    ensure!(
        env.inspect("web", "{{.State.Running}}")? == "true",
        "create stopped the container"
    );
    env.wait_for_log("web", "Counter: 3", Duration::from_secs(30))?;
    let before_second = *counters(&env.docker(&["logs", "web"])?).last().context("no counter")?;
    let second = ok(env.checkpointctl(&node1, &config, &["create", "web", "--parent", &first])?)?;

    let listed: serde_json::Value = serde_json::from_str(&ok(env.checkpointctl(
        &node1,
        &config,
        &["list", "web", "-o", "json"],
    )?)?)?;
    let rows = listed.as_array().context("list is not an array")?;
    ensure!(rows.len() == 2, "list: {listed}");
    ensure!(
        rows.iter().all(|r| r["engine"] == "docker" && r["container"] == "web"),
        "{listed}"
    );
    ensure!(
        rows[1]["parent"] == first.as_str() && rows[0]["labels"]["golden"] == "",
        "{listed}"
    );
    ensure!(
        rows[1]["process"]["pages_written"].as_u64().unwrap_or(0) > 0,
        "no process state: {listed}"
    );
    let filtered = ok(env.checkpointctl(&node1, &config, &["list", "--filter", "label=golden", "-o", "json"])?)?;
    ensure!(filtered.contains(&first) && !filtered.contains(&second), "{filtered}");
    ok(env.checkpointctl(&node1, &config, &["info", &second, "--verify"])?)?;
    ok(env.checkpointctl(&node1, &config, &["prune", "web", "--keep-latest", "1", "--dry-run"])?)?;
    // A real merge: the first folds into the second, which must restore.
    ok(env.checkpointctl(&node1, &config, &["merge", "web", "-s", "incremental"])?)?;
    let merged = ok(env.checkpointctl(&node1, &config, &["list", "web", "-o", "json"])?)?;
    ensure!(!merged.contains(&first) && merged.contains(&second), "{merged}");

    // Restored by the other node's daemon, from the shared storage.
    env.docker(&["rm", "-f", "web"])?;
    let restored = ok(env.checkpointctl(
        &node2,
        &config,
        &["restore", &second, "--name", "web-restored", "--resume", "--validate"],
    )?)?;
    ensure!(restored.contains("as container web-restored"), "{restored}");
    for check in ["status", "process", "api", "logs", "stats"] {
        ensure!(
            restored.contains(&format!("ok    {check}")),
            "check {check} not passed:\n{restored}"
        );
    }
    ensure!(
        restored.contains("restore log: "),
        "CRIU's log was not kept: {restored}"
    );
    let ps = env.docker(&["ps"])?;
    ensure!(ps.contains("web-restored"), "docker ps does not list it:\n{ps}");
    let log = env.wait_for_log("web-restored", "Counter: ", Duration::from_secs(30))?;
    let after = counters(&log);
    ensure!(
        after[0] > before_second,
        "the counter restarted: {after:?} after {before_second}"
    );
    ensure!(env.docker(&["exec", "web-restored", "echo", "ok"])?.trim() == "ok");
    let stats = env.docker(&["stats", "--no-stream", "--format", "{{.Name}}", "web-restored"])?;
    ensure!(stats.trim() == "web-restored", "{stats}");

    // A docker-checkpoint directory, imported into the catalogue and
    // restored from it.
    let dir = env.dir().join("dirs");
    let out = env.checkpoint_tool(&[
        "-container",
        "web-restored",
        "-name",
        "c1",
        "-dir",
        dir.to_str().context("utf-8")?,
    ])?;
    ensure!(out.status.success(), "docker-checkpoint: {}", stderr(&out));
    let path = dir.join("web-restored/c1");
    let imported = ok(env.checkpointctl(
        &node1,
        &config,
        &["import", path.to_str().context("utf-8")?, "-l", "from-dir"],
    )?)?;
    let shown = ok(env.checkpointctl(&node1, &config, &["list", "web-restored", "-o", "json"])?)?;
    ensure!(shown.contains(&imported) && shown.contains("from-dir"), "{shown}");
    // Without --resume, paused as every restore is, until resumed.
    ok(env.checkpointctl(&node1, &config, &["restore", &imported, "--name", "from-dir"])?)?;
    ensure!(
        env.inspect("from-dir", "{{.State.Status}}")? == "paused",
        "not left paused"
    );
    let resumed = ok(env.checkpointctl(&node1, &config, &["resume", "from-dir"])?)?;
    ensure!(env.inspect("from-dir", "{{.State.Status}}")? == "running", "{resumed}");
    env.wait_for_log("from-dir", "Counter: ", Duration::from_secs(30))?;

    // Unknown container: the CLI's not-found exit.
    let out = env.checkpointctl(&node1, &config, &["--engine", "docker", "create", "nosuch"])?;
    ensure!(
        out.status.code() == Some(3),
        "exit {:?}: {}",
        out.status.code(),
        stderr(&out)
    );
    ensure!(stderr(&out).contains("no such container: nosuch"), "{}", stderr(&out));
    Ok(())
}
