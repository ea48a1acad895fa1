//! Commits whose background job fails are seen without `--wait`: a loop of
//! commits against a registry that refuses every push leaves each failure in
//! `checkpointctl seamless-commit jobs` / `status`, in the daemon's log with
//! the job's id, container and target, and in the metrics.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::env::{free_port, http_get_status, outcome, with_env, Env, Options};

/// A real docker-registry in read-only maintenance mode: it serves reads
/// and answers every upload with 405, as a registry refusing pushes does.
struct ReadOnlyRegistry {
    child: Child,
    port: u16,
}

impl ReadOnlyRegistry {
    fn start(dir: &Path) -> Result<ReadOnlyRegistry> {
        let port = free_port()?;
        std::fs::create_dir_all(dir.join("ro-registry"))?;
        let config = dir.join("ro-registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 maintenance:\n    readonly:\n      enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("ro-registry").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the read-only docker-registry")?;
        let registry = ReadOnlyRegistry { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http_get_status(port, "/v2/").is_ok_and(|status| status == 200) {
            ensure!(Instant::now() < deadline, "read-only registry not answering on {port}");
            sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }
}

impl Drop for ReadOnlyRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn background_failures_are_seen_in_jobs_log_and_metrics() {
    with_env("commitjobs", Options::default(), |env| {
        let ns = env.namespace("j");
        env.pull(&ns)?;
        let id = env.container_id("refused");
        env.run_container(&ns, &id)?;
        env.exec(&ns, &id, "echo data > /committed")?;
        let refusing = ReadOnlyRegistry::start(env.dir())?;
        let work = env.dir().join("jobs-work");
        std::fs::create_dir_all(&work)?;

        let mut failed = Vec::new();
        for n in 1..=3 {
            let target = format!("127.0.0.1:{}/refused/app:{n}", refusing.port);
            let (code, out, err) = cli(
                env,
                &ns,
                &[
                    "seamless-commit",
                    "--container",
                    &id,
                    "--target",
                    &target,
                    "--format",
                    "oci",
                    "--target-insecure",
                    "--source-insecure",
                    "--work-dir",
                    &work.display().to_string(),
                ],
            )?;
            ensure!(code == 0, "commit {n} without --wait starts: {code} {out} {err}");
            let snapshot_id = out
                .lines()
                .find_map(|line| line.strip_prefix("Background commit processing started for snapshot: "))
                .with_context(|| format!("no snapshot id in {out}"))?
                .to_string();
            // One commit of a container at a time: wait for this one to end.
            let deadline = Instant::now() + Duration::from_secs(120);
            let job = loop {
                let (code, out, err) = cli(env, &ns, &["seamless-commit", "status", &snapshot_id, "-o", "json"])?;
                ensure!(code == 0, "status {snapshot_id}: {code} {err}");
                let job: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
                if job["state"] == "failed" || job["state"] == "completed" {
                    break job;
                }
                ensure!(Instant::now() < deadline, "job {snapshot_id} still {}", job["state"]);
                sleep(Duration::from_millis(200));
            };
            ensure!(
                job["state"] == "failed"
                    && job["error_code"] == "BACKGROUND_PROCESSING_FAILED"
                    && job["stage"] == "pushing the image"
                    && job["container"] == id.as_str()
                    && job["target"] == target.as_str()
                    && job["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("405") || e.contains("not allowed")),
                "the refused push is reported with its stage and reason: {job}"
            );
            failed.push((snapshot_id, target));
        }

        let (code, table, err) = cli(env, &ns, &["seamless-commit", "jobs", "--state", "failed"])?;
        ensure!(code == 0, "jobs: {code} {err}");
        let lines: Vec<&str> = table.lines().collect();
        ensure!(
            lines.first().is_some_and(|h| h.split_whitespace().collect::<Vec<_>>()
                == ["ID", "CONTAINER", "TARGET", "STATE", "STAGE", "ERROR"]),
            "{table}"
        );
        ensure!(lines.len() == 4, "three failed jobs listed:\n{table}");
        // Newest first.
        for ((snapshot_id, target), line) in failed.iter().rev().zip(&lines[1..]) {
            ensure!(
                line.starts_with(snapshot_id.as_str())
                    && line.contains(&id)
                    && line.contains(target.as_str())
                    && line.contains("failed")
                    && line.contains("BACKGROUND_PROCESSING_FAILED"),
                "job {snapshot_id} in the listing: {line}"
            );
        }
        let (code, out, _) = cli(env, &ns, &["seamless-commit", "jobs", "--container", "someone-else"])?;
        ensure!(
            code == 0 && out.lines().count() == 1,
            "no jobs of another container:\n{out}"
        );
        let (code, out, _) = cli(env, &ns, &["seamless-commit", "status"])?;
        let newest = &failed[2].0;
        ensure!(
            code == 0 && out.contains(&format!("Snapshot ID: {newest}")) && out.contains("State: failed"),
            "status without an id shows the newest job: {out}"
        );
        let other_ns = env.namespace("other");
        let (code, out, _) = cli(env, &other_ns, &["seamless-commit", "jobs", "-o", "json"])?;
        ensure!(code == 0 && out.trim() == "[]", "jobs are listed per namespace: {out}");
        let (code, _, err) = cli(env, &ns, &["seamless-commit", "status", "snapshot-0"])?;
        ensure!(code != 0 && err.contains("snapshot-0"), "an unknown job: {code} {err}");

        let log = std::fs::read_to_string(env.dir().join("daemon.log"))?;
        for (snapshot_id, target) in &failed {
            ensure!(
                log.lines().any(|line| line.contains("commit job failed")
                    && line.contains(snapshot_id.as_str())
                    && line.contains(&id)
                    && line.contains(target.as_str())),
                "the daemon log has job {snapshot_id}'s failure with its container and target"
            );
        }
        let (_, metrics) = env.rest("GET", "/metrics", "")?;
        ensure!(
            metrics.contains("nydus_seamless_snapshots_total{status=\"failed\"} 3"),
            "three failures counted:\n{metrics}"
        );
        let out = env.exec(&ns, &id, "cat /committed")?;
        ensure!(out.trim() == "data", "the container keeps its data: {out:?}");
        Ok(())
    });
}

/// checkpointctl against the test's daemon: exit code, stdout, stderr.
fn cli(env: &Env, ns: &str, args: &[&str]) -> Result<(i32, String, String)> {
    outcome(env.checkpointctl(ns).args(args))
}
