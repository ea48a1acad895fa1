//! The five checks the reference runs after every restore, each against
//! the restored container itself: the engine says it runs; its process
//! lives; it answers the API (the engine lists its processes through runc);
//! its recent logs can be fetched; it produces stats.

use std::time::Duration;

use serde_json::Value;

use crate::host::docker::DockerClient;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// All five, in the reference's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub checks: Vec<Check>,
}

impl Verification {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub fn failed(&self) -> Vec<&'static str> {
        self.checks.iter().filter(|c| !c.ok).map(|c| c.name).collect()
    }
}

/// How long a check waits for a container that is still settling.
const SETTLE: Duration = Duration::from_secs(5);

/// Runs the five checks on container `id`.
pub async fn verify(engine: &DockerClient, id: &str, tty: bool) -> Verification {
    let inspect = engine.inspect(id).await;
    let state = |key: &str| {
        inspect
            .as_ref()
            .ok()
            .and_then(|i| i.get("State"))
            .and_then(|s| s.get(key))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let status = match &inspect {
        Ok(_) => {
            let status = state("Status");
            check(
                "status",
                status == "running" && state("Running") == true,
                format!("engine status {status}"),
            )
        }
        Err(e) => check("status", false, e.to_string()),
    };
    let pid = state("Pid").as_u64().unwrap_or(0);
    let alive = pid > 1
        && i32::try_from(pid)
            .ok()
            .is_some_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok());
    let process = check(
        "process",
        alive,
        if alive {
            format!("pid {pid} runs")
        } else {
            format!("pid {pid} does not run")
        },
    );
    let api = match engine.top(id).await {
        Ok(top) => {
            let processes = top.get("Processes").and_then(Value::as_array).map_or(0, Vec::len);
            check("api", processes > 0, format!("top lists {processes} processes"))
        }
        Err(e) => check("api", false, e.to_string()),
    };
    let logs = match engine.logs(id, 10, tty).await {
        Ok(lines) => check("logs", true, format!("{} recent lines fetched", lines.len())),
        Err(e) => check("logs", false, e.to_string()),
    };
    let stats = stats_check(engine, id).await;
    Verification {
        checks: vec![status, process, api, logs, stats],
    }
}

/// Stats of a running container name its processes; the first sample
/// after a start may not yet.
async fn stats_check(engine: &DockerClient, id: &str) -> Check {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        match engine.stats(id).await {
            Ok(stats) => {
                let pids = stats
                    .get("pids_stats")
                    .and_then(|p| p.get("current"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let memory = stats
                    .get("memory_stats")
                    .and_then(|m| m.get("usage"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                if pids > 0 || tokio::time::Instant::now() >= deadline {
                    return check("stats", pids > 0, format!("{pids} processes, {memory} bytes of memory"));
                }
            }
            Err(e) => return check("stats", false, e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn check(name: &'static str, ok: bool, detail: String) -> Check {
    Check { name, ok, detail }
}
