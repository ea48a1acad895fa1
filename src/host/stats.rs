//! Samples of running containers' cgroup usage (CPU time, memory and its
//! limit), for policies that act on load, such as `checkpointctl
//! automanage`. Reads cgroup files only; decides nothing.

use std::time::SystemTime;

use crate::host::containerd::{Containerd, ContainerdError};

/// One container's usage at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub status: String,
    pub cpu_usage_ns: u64,
    pub sampled_unix_ns: u64,
    pub memory_bytes: u64,
    /// The cgroup's limit, or the host's memory when it has none.
    pub memory_limit_bytes: u64,
    pub memory_limited: bool,
}

/// The host's memory, bytes (MemTotal of /proc/meminfo).
fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Samples `ids` of `namespace` (every container with a running task when
/// empty). A named container that is not running is reported with its
/// status and no usage; an unknown one is an error.
pub async fn sample(containerd: &Containerd, namespace: &str, ids: &[String]) -> Result<Vec<Sample>, ContainerdError> {
    let listed = containerd.list_containers(namespace).await?;
    let wanted: Vec<_> = if ids.is_empty() {
        listed
    } else {
        let mut out = Vec::new();
        for id in ids {
            match listed.iter().find(|(name, _)| name == id) {
                Some(found) => out.push(found.clone()),
                None => {
                    return Err(ContainerdError::NotFound {
                        namespace: namespace.to_string(),
                        query: id.clone(),
                    })
                }
            }
        }
        out
    };
    let host = host_memory();
    let mut samples = Vec::new();
    for (id, labels) in wanted {
        let task = containerd.task(namespace, &id).await?;
        let mut sample = Sample {
            id: id.clone(),
            labels,
            status: task
                .as_ref()
                .map_or_else(|| "no task".to_string(), |t| t.status.clone()),
            cpu_usage_ns: 0,
            sampled_unix_ns: 0,
            memory_bytes: 0,
            memory_limit_bytes: host,
            memory_limited: false,
        };
        match task {
            Some(t) if t.status == "running" && t.pid > 0 => {
                let pid = t.pid;
                let read = tokio::task::spawn_blocking(move || {
                    let cpu = crate::host::cgroup::cpu_usage_ns(pid).ok();
                    let memory = crate::host::cgroup::memory_of(pid).ok();
                    let current = memory.as_ref().and_then(|m| m.current().ok());
                    let limit = memory
                        .as_ref()
                        .and_then(|m| m.usage().ok())
                        .and_then(|(_, limit)| limit);
                    (cpu, current, limit, SystemTime::now())
                })
                .await
                .map_err(|e| ContainerdError::Call {
                    call: "sample cgroup",
                    message: e.to_string(),
                })?;
                let (cpu, current, limit, at) = read;
                sample.cpu_usage_ns = cpu.unwrap_or(0);
                sample.memory_bytes = current.unwrap_or(0);
                if let Some(limit) = limit {
                    sample.memory_limit_bytes = limit;
                    sample.memory_limited = true;
                }
                sample.sampled_unix_ns =
                    at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
                samples.push(sample);
            }
            _ if !ids.is_empty() => samples.push(sample),
            _ => {}
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_memory_is_read() {
        assert!(super::host_memory() > 1 << 20);
    }
}
