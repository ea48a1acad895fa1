//! The published contracts, driven as their users would: the seamless-commit
//! reference's REST requests and answers (every field and type, every error
//! code with its status, the metrics JSON and the Prometheus names), its
//! Python and JavaScript clients against the daemon, `nydusify
//! seamless-commit` through the link packaging makes, containers named as
//! nerdctl and Kubernetes name them, the exit codes, and commits that queue
//! behind a container's running job instead of being refused.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use anyhow::anyhow;
use seamless_snapshotter::time::parse_go_duration;

use super::*;
use crate::env::free_port;
use serde_json::{json, Value};

/// One REST request: the status, the body as JSON (Null if it is not), the
/// text.
fn rest(env: &Env, method: &str, path: &str, body: &Value) -> Result<(u16, Value, String)> {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, text) = env.rest(method, path, &body)?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null), text))
}

fn go_duration_of(v: &Value, what: &str) -> Result<Duration> {
    let text = v.as_str().with_context(|| format!("{what} is not a string: {v}"))?;
    parse_go_duration(text).map_err(|e| anyhow!("{what}: {e}"))
}

fn utc_time(v: &Value, what: &str) -> Result<()> {
    let text = v.as_str().with_context(|| format!("{what} is not a string: {v}"))?;
    ensure!(
        text.ends_with('Z') && humantime::parse_rfc3339(text).is_ok(),
        "{what} {text:?} is not RFC 3339 UTC"
    );
    Ok(())
}

/// The reference's `SnapshotStatus` fields, with their types.
fn check_status_fields(job: &Value) -> Result<()> {
    ensure!(
        job["snapshot_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("snapshot-")),
        "snapshot_id: {job}"
    );
    ensure!(
        ["pending", "processing", "completed", "failed"].contains(&job["state"].as_str().unwrap_or("")),
        "state: {job}"
    );
    ensure!(
        job["progress"].as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)),
        "progress: {job}"
    );
    utc_time(&job["start_time"], "start_time")?;
    match job["state"].as_str() {
        Some("completed" | "failed") => utc_time(&job["end_time"], "end_time")?,
        _ => ensure!(job["end_time"].is_null(), "end_time is null while running: {job}"),
    }
    match job["state"].as_str() {
        Some("failed") => ensure!(job["error"].is_string(), "error of a failed job: {job}"),
        _ => ensure!(job.get("error").is_none(), "no error field unless failed: {job}"),
    }
    Ok(())
}

/// The reference's `SnapshotResult` fields, with their types.
fn check_result_fields(created: &Value) -> Result<Duration> {
    let pause = go_duration_of(&created["pause_time"], "pause_time")?;
    let total = go_duration_of(&created["total_time"], "total_time")?;
    ensure!(total >= pause, "the call took at least its pause: {created}");
    for dir in ["old_upper_dir", "new_upper_dir"] {
        ensure!(
            created[dir].as_str().is_some_and(|d| d.starts_with('/')),
            "{dir}: {created}"
        );
    }
    Ok(pause)
}

fn run_labelled(env: &Env, ns: &str, id: &str, labels: &[&str]) -> Result<()> {
    let image = env.image_ref();
    let mut args = vec!["run", "-d", "--null-io", "--snapshotter", "seamless"];
    for label in labels {
        args.extend(["--label", label]);
    }
    args.extend([image.as_str(), id, "/bin/sh", "-c", "while true; do sleep 1; done"]);
    env.ctr(ns, &args)?;
    Ok(())
}

fn wait_completed(env: &Env, id: &str) -> Result<Value> {
    retry(Duration::from_secs(180), "the job completes", || {
        let (status, job, text) = rest(env, "GET", &format!("/api/v1/snapshots/{id}"), &Value::Null)?;
        ensure!(status == 200, "{status} {text}");
        ensure!(job["state"] != "failed", "the job failed: {text}");
        ensure!(job["state"] == "completed", "{text}");
        Ok(job)
    })
}

/// The REST API with the reference's request bodies: a commit waited for,
/// one followed by polling, the listing, every error code with its status
/// and details, the metrics JSON and the Prometheus names; requests name no
/// namespace (the daemon's `[rest] namespace`) and containers by their
/// nerdctl and Kubernetes names. Then the Python and JavaScript clients run
/// their suites and their live flow against the same daemon.
#[test]
fn the_rest_api_answers_as_the_reference_and_its_clients_work() {
    let ns = format!("sit-restref-apps-{}", std::process::id());
    let config = format!("[rest]\nnamespace = \"{ns}\"\n\n[commit]\nmax_queued = 1\n");
    with_env_config("restref", Options::default(), &config, |env| {
        ensure!(env.namespace("apps") == ns, "the namespace the config names");
        env.pull(&ns)?;
        let web = env.container_id("web");
        run_labelled(env, &ns, &web, &["nerdctl/name=shop-web"])?;
        let app = env.container_id("app");
        run_labelled(
            env,
            &ns,
            &app,
            &[
                "io.kubernetes.container.name=app",
                "io.kubernetes.pod.name=shop-pod",
                "io.kubernetes.pod.namespace=prod",
            ],
        )?;
        env.exec(&ns, &web, "echo one > /one && sync")?;
        let target = |tag: &str| env.registry_ref(&format!("restref/web:{tag}"));

        // The reference's body, waited for, naming the container by its
        // nerdctl name and no namespace; /tmp as its work dir.
        let (status, created, text) = rest(
            env,
            "POST",
            "/api/v1/snapshots",
            &json!({"container_id": "shop-web", "target_ref": target("wait"),
                    "options": {"wait": true, "work_dir": "/tmp", "fs_version": "6", "compressor": "lz4_block",
                                "target_insecure": true, "source_insecure": true}}),
        )?;
        ensure!(status == 201, "create with wait: {status} {text}");
        check_result_fields(&created)?;
        check_status_fields(&created)?;
        ensure!(
            created["state"] == "completed" && created["progress"] == 1.0,
            "answered when the job ended: {text}"
        );
        ensure!(
            created["container_id"] == web.as_str() && created["namespace"] == ns.as_str(),
            "the name resolved to the container, in the [rest] namespace: {text}"
        );
        let waited = created["snapshot_id"].as_str().context("snapshot_id")?.to_string();

        // Not waited for, the Kubernetes name, OCI (our extra option).
        let (status, created, text) = rest(
            env,
            "POST",
            "/api/v1/snapshots",
            &json!({"container_id": "prod/shop-pod/app", "target_ref": env.registry_ref("restref/app:1"),
                    "options": {"fs_version": "6", "format": "oci", "target_insecure": true,
                                "source_insecure": true, "maximum_times": 5}}),
        )?;
        ensure!(status == 201, "create: {status} {text}");
        check_result_fields(&created)?;
        ensure!(created["container_id"] == app.as_str(), "{text}");
        let polled = created["snapshot_id"].as_str().context("snapshot_id")?.to_string();
        let done = wait_completed(env, &polled)?;
        check_status_fields(&done)?;
        ensure!(
            done["manifest_digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
            "{done}"
        );

        let (status, listed, text) = rest(env, "GET", "/api/v1/snapshots?limit=10", &Value::Null)?;
        ensure!(status == 200 && listed["total"] == 2, "{text}");
        let entries = listed["snapshots"].as_array().context("snapshots")?;
        for entry in entries {
            check_status_fields(entry)?;
        }
        let ids: Vec<&str> = entries.iter().filter_map(|e| e["snapshot_id"].as_str()).collect();
        ensure!(
            ids.contains(&waited.as_str()) && ids.contains(&polled.as_str()),
            "{text}"
        );

        // Every error: its code, status and details.
        let (status, body, text) = rest(env, "GET", "/api/v1/snapshots/snapshot-1", &Value::Null)?;
        ensure!(
            status == 404
                && body["error"]["code"] == "SNAPSHOT_NOT_FOUND"
                && body["error"]["details"]["snapshot_id"] == "snapshot-1",
            "{status} {text}"
        );
        utc_time(&body["error"]["details"]["timestamp"], "details.timestamp")?;
        let create = |container: &str, options: Value| {
            rest(
                env,
                "POST",
                "/api/v1/snapshots",
                &json!({"container_id": container, "target_ref": target("x"), "options": options}),
            )
        };
        let (status, body, text) = create("mycontainer", json!({}))?;
        ensure!(
            status == 404
                && body["error"]["code"] == "CONTAINER_NOT_FOUND"
                && body["error"]["details"]["container_id"] == "mycontainer",
            "{status} {text}"
        );
        let (status, body, text) = create(&web, json!({"fs_version": "4"}))?;
        ensure!(
            status == 400 && body["error"]["code"] == "INVALID_PARAMETER",
            "{status} {text}"
        );
        let stopped = env.container_id("stopped");
        env.ctr(
            &ns,
            &[
                "containers",
                "create",
                "--snapshotter",
                "seamless",
                &env.image_ref(),
                &stopped,
            ],
        )?;
        let (status, body, text) = create(&stopped, json!({}))?;
        ensure!(
            status == 400 && body["error"]["code"] == "CONTAINER_NOT_RUNNING",
            "the reference's status for a container not running: {status} {text}"
        );
        let (status, body, text) = rest(env, "GET", "/api/v1/snapshot", &Value::Null)?;
        ensure!(
            status == 404 && body["error"]["details"]["path"] == "/api/v1/snapshot",
            "{status} {text}"
        );

        let (status, metrics, text) = rest(env, "GET", "/api/v1/metrics", &Value::Null)?;
        ensure!(status == 200, "{text}");
        let m = &metrics["metrics"];
        ensure!(
            m["total_snapshots"] == 2 && m["successful_snapshots"] == 2 && m["failed_snapshots"] == 0,
            "{text}"
        );
        for field in ["average_pause_time", "average_total_time", "average_background_time"] {
            go_duration_of(&m[field], field)?;
        }
        ensure!(
            go_duration_of(&m["average_background_time"], "background")? > Duration::ZERO,
            "{text}"
        );
        utc_time(&metrics["timestamp"], "timestamp")?;
        let (status, _, prometheus) = rest(env, "GET", "/metrics", &Value::Null)?;
        ensure!(status == 200, "{prometheus}");
        for line in [
            "nydus_seamless_snapshots_total{status=\"success\"} 2",
            "nydus_seamless_snapshots_total{status=\"failed\"} 0",
            "nydus_seamless_pause_time_seconds{quantile=\"0.5\"}",
            "nydus_seamless_pause_time_seconds{quantile=\"0.95\"}",
            "nydus_seamless_pause_time_seconds{quantile=\"0.99\"}",
            "nydus_seamless_background_time_seconds{quantile=\"0.99\"}",
        ] {
            ensure!(prometheus.contains(line), "{line} in:\n{prometheus}");
        }

        // A waited commit whose job fails: the error answer, with the job.
        let closed = free_port()?;
        let (status, body, text) = rest(
            env,
            "POST",
            "/api/v1/snapshots",
            &json!({"container_id": web, "target_ref": format!("127.0.0.1:{closed}/gone/app:1"),
                    "options": {"wait": true, "format": "oci", "target_insecure": true, "source_insecure": true}}),
        )?;
        ensure!(
            status == 500
                && body["error"]["code"] == "BACKGROUND_PROCESSING_FAILED"
                && body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("background commit processing failed: ")),
            "{status} {text}"
        );
        let failed = body["error"]["details"]["snapshot_id"]
            .as_str()
            .context("details.snapshot_id")?;
        let (_, job, text) = rest(env, "GET", &format!("/api/v1/snapshots/{failed}"), &Value::Null)?;
        check_status_fields(&job)?;
        ensure!(
            job["state"] == "failed" && job["error_cause"] == "network",
            "an unreachable registry: {text}"
        );

        // SNAPSHOT_IN_PROGRESS over HTTP: with `max_queued = 1`, a commit
        // while one job runs and one waits is refused (409), naming the
        // container; the two accepted ones both complete.
        env.exec(
            &ns,
            &app,
            "dd if=/dev/urandom of=/big bs=1M count=64 2>/dev/null && sync",
        )?;
        let slow = json!({"container_id": app, "target_ref": env.registry_ref("restref/app:2"),
                          "options": {"format": "oci", "compressor": "zstd", "target_insecure": true,
                                      "source_insecure": true}});
        let (first, running, text) = rest(env, "POST", "/api/v1/snapshots", &slow)?;
        ensure!(first == 201, "{text}");
        let (second, waiting, text) = rest(env, "POST", "/api/v1/snapshots", &slow)?;
        ensure!(
            second == 201 && waiting["state"] == "pending",
            "queued behind the first: {text}"
        );
        let (status, body, text) = rest(env, "POST", "/api/v1/snapshots", &slow)?;
        ensure!(
            status == 409
                && body["error"]["code"] == "SNAPSHOT_IN_PROGRESS"
                && body["error"]["details"]["container_id"] == app.as_str(),
            "a full line: {status} {text}"
        );
        for job in [&running, &waiting] {
            wait_completed(env, job["snapshot_id"].as_str().context("snapshot_id")?)?;
        }

        // The clients: their offline suites, then their live flow here.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let socket = env.daemon_socket().with_file_name("rest.sock");
        for (name, program, args, prefix) in [
            (
                "python offline",
                "python3",
                vec!["-m", "unittest", "discover", "-s", "clients/python/tests"],
                "",
            ),
            ("node offline", "node", vec!["--test", "clients/js/test/"], ""),
            (
                "python live",
                "python3",
                vec!["clients/python/tests/live_daemon.py"],
                "clients/py",
            ),
            (
                "node live",
                "node",
                vec!["clients/js/live/live-daemon.js"],
                "clients/js",
            ),
        ] {
            let mut command = Command::new(program);
            command
                .args(&args)
                .current_dir(root)
                .env("SEAMLESS_REST_SOCKET", &socket)
                .env("SEAMLESS_TEST_CONTAINER", &web)
                .env("SEAMLESS_TEST_TARGET_PREFIX", env.registry_ref(prefix));
            let (code, out, err) = outcome(&mut command)?;
            ensure!(code == 0, "{name}: exit {code}\n{out}\n{err}");
            eprintln!("{name}:\n{out}{err}");
        }
        Ok(())
    });
}

/// `nydusify seamless-commit` as the reference shows it, through the link
/// packaging/install.sh makes (and never makes over another nydusify); the
/// socket from the environment; the exit codes: 3 for a missing container,
/// 5 for a registry that cannot be reached (with the reference's FATA line).
#[test]
fn nydusify_seamless_commit_through_the_link() {
    with_env("nydusify", Options::default(), |env| {
        let ns = env.namespace("n");
        env.pull(&ns)?;
        let id = env.container_id("app");
        run_labelled(env, &ns, &id, &["nerdctl/name=front"])?;
        env.exec(&ns, &id, "echo hello > /hello && sync")?;

        let build = Path::new(env!("CARGO_BIN_EXE_checkpointctl"))
            .parent()
            .context("build directory")?
            .to_path_buf();
        let install = |stage: &Path, path: &str| -> Result<String> {
            let mut command = Command::new("bash");
            command
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/install.sh"))
                .env("DESTDIR", stage)
                .env("BINDIR", "/bin")
                .env("BUILD", &build)
                .env("PATH", path);
            let (code, out, err) = outcome(&mut command)?;
            ensure!(code == 0, "install.sh: {code} {out} {err}");
            Ok(out)
        };
        let stage = env.dir().join("stage");
        install(&stage, "/usr/bin:/bin")?;
        let nydusify = stage.join("bin/nydusify");
        ensure!(
            std::fs::read_link(&nydusify)? == Path::new("checkpointctl"),
            "the link is made where no nydusify exists"
        );
        ensure!(
            install(&stage, "/usr/bin:/bin")?.contains("already answers"),
            "again: kept"
        );
        // Another nydusify on PATH, or a file at the link's place: untouched.
        let other = env.dir().join("other");
        std::fs::create_dir_all(&other)?;
        std::fs::write(other.join("nydusify"), "#!/bin/sh\necho the real one\n")?;
        std::fs::set_permissions(other.join("nydusify"), std::fs::Permissions::from_mode(0o755))?;
        let elsewhere = env.dir().join("stage2");
        let out = install(&elsewhere, &format!("{}:/usr/bin:/bin", other.display()))?;
        ensure!(
            !elsewhere.join("bin/nydusify").exists() && out.contains("already at"),
            "{out}"
        );
        let taken = env.dir().join("stage3");
        std::fs::create_dir_all(taken.join("bin"))?;
        std::fs::write(taken.join("bin/nydusify"), "mine")?;
        install(&taken, "/usr/bin:/bin")?;
        ensure!(
            std::fs::read_to_string(taken.join("bin/nydusify"))? == "mine",
            "never replaced"
        );

        let run = |args: &[&str]| -> Result<(i32, String, String)> {
            let mut command = Command::new(&nydusify);
            command
                .args(args)
                .env("CHECKPOINTCTL_ADDRESS", env.daemon_socket())
                .env("CONTAINERD_NAMESPACE", &ns);
            outcome(&mut command)
        };
        let target = env.registry_ref("nydusify/front:snapshot");
        let (code, out, err) = run(&[
            "seamless-commit",
            "--container",
            "front",
            "--target",
            &target,
            "--format",
            "oci",
            "--target-insecure",
            "--source-insecure",
            "--wait",
        ])?;
        ensure!(code == 0, "nydusify seamless-commit: {code}\n{out}\n{err}");
        ensure!(
            out.starts_with("Seamless snapshot created successfully:\n  Snapshot ID: snapshot-")
                && out.contains("Background processing completed successfully."),
            "{out}"
        );
        let pause = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Pause Time: "))
            .context("a Pause Time line")?;
        parse_go_duration(pause).map_err(|e| anyhow!("Pause Time as Go prints it: {e}"))?;
        let (code, out, _) = run(&["version"])?;
        ensure!(
            code == 0 && out.contains(&format!("client: {}", env!("CARGO_PKG_VERSION"))),
            "{out}"
        );
        let (code, _, err) = run(&["list"])?;
        ensure!(
            code == 2 && err.contains("only `seamless-commit` and `version`"),
            "{err}"
        );

        let (code, _, err) = run(&["seamless-commit", "--container", "nobody", "--target", &target])?;
        ensure!(code == 3, "a missing container exits 3: {code} {err}");
        // A registry that is not there: exit 5, the reference's FATA line.
        let closed = free_port()?;
        let (code, out, err) = run(&[
            "seamless-commit",
            "--container",
            &id,
            "--target",
            &format!("127.0.0.1:{closed}/gone/app:1"),
            "--format",
            "oci",
            "--target-insecure",
            "--source-insecure",
            "--wait",
        ])?;
        let last = err.lines().last().unwrap_or_default();
        ensure!(
            code == 5 && last.starts_with("FATA[") && last.contains("] background commit processing failed: "),
            "an unreachable registry exits 5: {code}\n{out}\n{err}"
        );
        Ok(())
    });
}

/// Ten commits one second apart of a container with a 200 MB writable
/// layer, as a user tried them: every one is accepted (each waits for the
/// one before), and each builds on the previous capture, in order.
#[test]
fn ten_commits_a_second_apart_are_all_accepted_and_build_in_order() {
    with_env("tencommits", Options::default(), |env| {
        let ns = env.namespace("t");
        env.pull(&ns)?;
        let id = env.container_id("big");
        env.run_container(&ns, &id)?;
        env.exec(
            &ns,
            &id,
            "dd if=/dev/urandom of=/big bs=1M count=200 2>/dev/null && sync",
        )?;
        let mut ids = Vec::new();
        for n in 0..10 {
            env.exec(&ns, &id, &format!("echo {n} > /n{n}"))?;
            let (status, created, text) = rest(
                env,
                "POST",
                "/api/v1/snapshots",
                &json!({"namespace": ns, "container_id": id, "target_ref": env.registry_ref(&format!("ten/app:{n}")),
                        "options": {"format": "oci", "compressor": "none", "target_insecure": true,
                                    "source_insecure": true}}),
            )?;
            ensure!(status == 201, "commit {n} is accepted: {status} {text}");
            ids.push(created["snapshot_id"].as_str().context("snapshot_id")?.to_string());
            sleep(Duration::from_secs(1));
        }
        let mut ended = Vec::new();
        for (n, snapshot) in ids.iter().enumerate() {
            let job = wait_completed(env, snapshot)?;
            let plan = if n == 0 { "full" } else { "incremental" };
            ensure!(
                job["layer_plan"] == plan && job["commit_layers"] == n as u64 + 1,
                "commit {n} builds on the one before: {job}"
            );
            ended.push(job["end_time"].as_str().unwrap_or_default().to_string());
        }
        let mut sorted = ended.clone();
        sorted.sort();
        ensure!(
            sorted == ended,
            "the jobs ended in the order of their captures: {ended:?}"
        );
        Ok(())
    });
}
