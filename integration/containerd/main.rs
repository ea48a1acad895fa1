//! Integration tests against real containerd, runc, a docker-registry and our
//! daemon (`containerd-seamless-grpc`), selected with
//! `cargo test --test containerd` and run as root.
//!
//! Each test brings up its own world (see `env`): a registry on a free
//! loopback port holding a test image built here from busybox, the daemon on a
//! fresh root (a loop-mounted btrfs pool when /tmp is not btrfs), and a
//! private containerd with the daemon as proxy snapshotter `seamless`.
//! Namespaces and container ids carry the test name and the process id, so
//! the tests run in parallel (cargo's default test threads are fine) and
//! beside other containerd instances. A missing prerequisite (root, a binary,
//! kernel overlay/btrfs) fails the test with the list of what is missing.
//!
//! `SEAMLESS_IT_SNAPSHOTTER=overlayfs` runs the same tests against
//! containerd's built-in snapshotter, to tell a test bug from a daemon bug;
//! the checks that look inside the daemon are then left out, and
//! `namespaces_share_committed_layers` fails by design (only remote-style
//! snapshotters answer AlreadyExists to `containerd.io/snapshot.ref`).

mod automanage;
mod checkpoints;
mod commit;
mod commit_jobs;
mod commit_nydus;
mod contract;
mod credentials;
mod cri;
mod cri_plugin;
mod env;
mod grpc;
mod image;
mod lifecycle;
mod local_image;
mod nydus;
mod outlive;
mod pull;
mod registry_auth;
mod restore;
mod sharing;
mod stall;

use std::collections::HashMap;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;

use env::{outcome, with_env, with_env_config, Env, Options, SnapshotRow};
use grpc::Snapshots;

/// containerd redials a dead proxy plugin with a backoff of at most 3 s.
const REDIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// Pulls `target` with containerd's built-in overlayfs and with seamless,
/// runs it, and checks its tree equals `expected`.
fn expect_image_tree(
    env: &mut Env,
    target: &str,
    expected: &std::collections::BTreeMap<String, String>,
    label: &str,
) -> Result<()> {
    for (snapshotter, name) in [("overlayfs", "builtin"), ("seamless", "seamless")] {
        let ns = env.namespace(&format!("{label}-{name}"));
        env.ctr(
            &ns,
            &["images", "pull", "--plain-http", "--snapshotter", snapshotter, target],
        )?;
        let id = env.container_id(&format!("{label}-{name}"));
        env.ctr(
            &ns,
            &[
                "run",
                "-d",
                "--null-io",
                "--snapshotter",
                snapshotter,
                target,
                &id,
                "/bin/sh",
                "-c",
                "while true; do sleep 1; done",
            ],
        )?;
        let after = tree_of(&env.container_rootfs(&ns, &id))?;
        let differences = diff_trees(expected, &after);
        ensure!(
            differences.is_empty(),
            "{target} pulled with {snapshotter} differs from the committed container: {differences:?}"
        );
        env.remove_container(&ns, &id)?;
    }
    Ok(())
}

/// A client of the daemon's Control API over its socket.
async fn control_client(
    socket: std::path::PathBuf,
) -> Result<seamless_snapshotter::proto::control_client::ControlClient<tonic::transport::Channel>> {
    let channel = seamless_snapshotter::api::client::connect(&socket).await?;
    Ok(seamless_snapshotter::proto::control_client::ControlClient::new(channel))
}

/// Resolves a container through containerd's API, as the daemon does.
fn resolve_container(
    runtime: &tokio::runtime::Runtime,
    env: &Env,
    ns: &str,
    query: &str,
) -> Result<seamless_snapshotter::host::containerd::ContainerInfo> {
    runtime.block_on(async {
        let client = seamless_snapshotter::host::containerd::Containerd::connect(&env.containerd_socket()).await?;
        Ok(client.resolve(ns, query).await?)
    })
}

/// Every entry under `root`: type, mode, owner, and content or link target.
fn tree_of(root: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    use sha2::Digest;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut tree = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut inodes: HashMap<u64, String> = HashMap::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?.display().to_string();
            let meta = std::fs::symlink_metadata(&path)?;
            let ft = meta.file_type();
            let what = if ft.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link->{}", std::fs::read_link(&path)?.display())
            } else if ft.is_file() {
                let digest = sha2::Sha256::digest(std::fs::read(&path)?);
                let linked = if meta.nlink() > 1 {
                    let first = inodes.entry(meta.ino()).or_insert_with(|| rel.clone()).clone();
                    format!(
                        " nlink={}",
                        if first == rel {
                            "first".to_string()
                        } else {
                            meta.nlink().to_string()
                        }
                    )
                } else {
                    String::new()
                };
                format!("file {digest:x}{}", if linked.is_empty() { "" } else { " hardlinked" })
            } else if ft.is_fifo() {
                "fifo".to_string()
            } else if ft.is_char_device() || ft.is_block_device() {
                format!("dev {}", meta.rdev())
            } else {
                "other".to_string()
            };
            let mut xattrs = Vec::new();
            for name in xattr::list(&path)? {
                let value = xattr::get(&path, &name)?.unwrap_or_default();
                xattrs.push(format!(
                    " {}={}",
                    name.to_string_lossy(),
                    String::from_utf8_lossy(&value)
                ));
            }
            xattrs.sort();
            tree.insert(
                rel,
                format!(
                    "{what} mode={:o} owner={}:{}{}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    xattrs.concat()
                ),
            );
        }
    }
    Ok(tree)
}

fn diff_trees(
    a: &std::collections::BTreeMap<String, String>,
    b: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("missing {k} ({v})")),
            Some(w) if w != v => out.push(format!("{k}: {v} != {w}")),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("extra {k}"));
    }
    out.truncate(20);
    out
}

// ----- checks shared by the tests ------------------------------------------

/// `ctr snapshots ls` in `ns` must show exactly the image's chain (committed,
/// each the child of the previous) plus one active snapshot per container,
/// each a child of the top layer.
fn expect_snapshots(env: &Env, ns: &str, containers: &[&str], when: &str) -> Result<()> {
    let chain = &env.image().chain_ids;
    let rows = env.snapshots(ns)?;
    let mut expected: Vec<SnapshotRow> = chain
        .iter()
        .enumerate()
        .map(|(i, key)| SnapshotRow {
            key: key.clone(),
            parent: if i == 0 { String::new() } else { chain[i - 1].clone() },
            kind: "Committed".to_string(),
        })
        .collect();
    for id in containers {
        expected.push(SnapshotRow {
            key: id.to_string(),
            parent: chain.last().cloned().unwrap_or_default(),
            kind: "Active".to_string(),
        });
    }
    let mut actual = rows.clone();
    actual.sort_by(|a, b| a.key.cmp(&b.key));
    expected.sort_by(|a, b| a.key.cmp(&b.key));
    ensure!(
        actual == expected,
        "snapshots in {ns} {when}:\n  expected {expected:?}\n  got      {actual:?}"
    );
    Ok(())
}

/// The image's files as the container sees them: content, modes, the busybox
/// symlinks, and the whiteout of the second layer.
fn check_image_content(env: &Env, ns: &str, id: &str) -> Result<()> {
    let (greeting, greeting_text, greeting_mode) = image::GREETING;
    let (script, _, script_mode) = image::SCRIPT;
    let out = env.exec(
        ns,
        id,
        &format!(
            "cat {greeting}; stat -c '%a %U' {greeting} {script}; {script}; readlink /bin/sh; \
             test -e {removed} && echo present || echo whited-out",
            removed = image::REMOVED_LATER
        ),
    )?;
    let expected = format!(
        "{greeting_text}{greeting_mode:o} root\n{script_mode:o} root\nscript-ran-ok\n/bin/busybox\nwhited-out\n"
    );
    ensure!(
        out == expected,
        "image content in the container:\n  expected {expected:?}\n  got      {out:?}"
    );
    Ok(())
}

/// The container's root is an overlay whose upper directory is in the
/// snapshotter's storage.
fn check_root_mount(env: &Env, ns: &str, id: &str) -> Result<()> {
    let mountinfo = env.exec(ns, id, "cat /proc/self/mountinfo")?;
    let root = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .with_context(|| format!("no root mount in the container's mountinfo:\n{mountinfo}"))?;
    let after_dash = root.split(" - ").nth(1).unwrap_or_default();
    ensure!(
        after_dash.starts_with("overlay "),
        "the container's root is not overlay: {root}"
    );
    let upper = format!("upperdir={}/snapshots/", env.storage_dir().display());
    ensure!(
        after_dash.contains(&upper),
        "the container's upper directory should be under {}: {root}",
        env.storage_dir().display()
    );
    Ok(())
}

/// A file written in the container is in `<storage>/snapshots/<id>/fs`.
fn check_write_landed_in_storage(env: &Env, relative: &str, content: &str) -> Result<()> {
    let mut found = Vec::new();
    for dir in snapshot_dirs(env)? {
        let candidate = dir.join("fs").join(relative);
        if candidate.is_file() {
            found.push(candidate);
        }
    }
    ensure!(
        found.len() == 1,
        "expected /{relative} in exactly one snapshot's fs under {}, found {found:?}",
        env.storage_dir().display()
    );
    let on_disk = std::fs::read_to_string(&found[0])?;
    ensure!(on_disk == content, "{} holds {on_disk:?}", found[0].display());
    Ok(())
}

fn snapshot_dirs(env: &Env) -> Result<Vec<std::path::PathBuf>> {
    let dir = env.storage_dir().join("snapshots");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        dirs.push(entry?.path());
    }
    Ok(dirs)
}

/// A daemon snapshot in one line, for failure messages.
fn describe(info: &grpc::Info) -> String {
    let kind = match info.kind {
        k if k == grpc::KIND_COMMITTED => "committed",
        k if k == grpc::KIND_ACTIVE => "active",
        _ => "view",
    };
    let mut labels: Vec<_> = info.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!(
        "{} ({kind}, parent {:?}, labels {{{}}})",
        info.name,
        info.parent,
        labels.join(", ")
    )
}

/// The daemon's snapshots, described and sorted (seamless only; empty for
/// another snapshotter).
fn daemon_snapshots(env: &Env) -> Result<Vec<String>> {
    if env.snapshotter != "seamless" {
        return Ok(Vec::new());
    }
    let mut all: Vec<String> = Snapshots::daemon(&env.daemon_socket())?
        .list(&[])?
        .iter()
        .map(describe)
        .collect();
    all.sort();
    Ok(all)
}

fn find_usage<'a>(usage: &'a [env::UsageRow], key: &str) -> Result<&'a env::UsageRow> {
    usage
        .iter()
        .find(|u| u.key == key)
        .with_context(|| format!("`ctr snapshots usage` has no row for {key}: {usage:?}"))
}

fn expect_labels(info: &grpc::Info, labels: &HashMap<String, String>, what: &str) -> Result<()> {
    for (key, value) in labels {
        ensure!(
            info.labels.get(key) == Some(value),
            "{what}: {} should carry {key}={value}; labels: {:?}",
            info.name,
            info.labels
        );
    }
    Ok(())
}

/// `ctr run` right after the daemon restarted can fail until containerd has
/// redialed it; retry with a fresh container id per attempt.
fn run_container_retrying(env: &Env, ns: &str, name: &str) -> Result<String> {
    let deadline = Instant::now() + REDIAL_TIMEOUT;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let id = env.container_id(&format!("{name}-{attempt}"));
        match env.run_container(ns, &id) {
            Ok(()) => return Ok(id),
            Err(e) if Instant::now() < deadline => {
                eprintln!("ctr run attempt {attempt} failed, retrying: {e:#}");
                // A half-created container would keep its snapshot: drop it.
                let _ = env.ctr(ns, &["containers", "delete", &id]);
                sleep(Duration::from_millis(500));
            }
            Err(e) => bail!(
                "containerd could not run a new container within {REDIAL_TIMEOUT:?} of the daemon restarting: {e:?}"
            ),
        }
    }
}

fn retry<T>(timeout: Duration, what: &str, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e.context(format!("{what}: still failing after {timeout:?}"))),
        }
    }
}

/// The `host:port` of an image reference on the test registry.
fn registry_address(reference: &str) -> Result<String> {
    let (address, _) = reference
        .split_once('/')
        .with_context(|| format!("no registry in the reference {reference}"))?;
    Ok(address.to_string())
}

/// One commit job as the daemon reports it now.
fn get_commit(
    runtime: &tokio::runtime::Runtime,
    env: &Env,
    snapshot_id: &str,
) -> Result<seamless_snapshotter::proto::CommitJob> {
    runtime.block_on(async {
        let mut control = control_client(env.daemon_socket()).await?;
        let request = seamless_snapshotter::proto::GetCommitRequest {
            snapshot_id: snapshot_id.to_string(),
        };
        Ok(control.get_commit(request).await?.into_inner())
    })
}

/// Polls a running job until `reached` holds for it; a job that ends first,
/// or a timeout, is an error naming the job's last report.
fn wait_for_job(
    runtime: &tokio::runtime::Runtime,
    env: &Env,
    snapshot_id: &str,
    timeout: Duration,
    mut reached: impl FnMut(&seamless_snapshotter::proto::CommitJob) -> bool,
) -> Result<seamless_snapshotter::proto::CommitJob> {
    let deadline = Instant::now() + timeout;
    loop {
        let job = get_commit(runtime, env, snapshot_id)?;
        if reached(&job) {
            return Ok(job);
        }
        ensure!(
            job.state != "completed" && job.state != "failed",
            "the job ended before the awaited point: {job:?}"
        );
        ensure!(
            Instant::now() < deadline,
            "the job did not reach the awaited point within {timeout:?}: {job:?}"
        );
        sleep(Duration::from_millis(50));
    }
}
