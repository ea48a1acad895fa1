//! Containers outlive the daemon: a container of a Nydus image, served by
//! each `[nydus] fs_driver` (erofs; fuse; auto, which serves this
//! compressed image over FUSE), checksums every file of its image in a loop
//! while the daemon is killed and restarted, stopped and restarted, upgraded
//! (its binary copied to another path and started from there), and while
//! the image's serving process is killed (FUSE only: erofs has none). Not
//! one round may fail or differ, and a new container of the image starts
//! during and after each step. The host drops the page cache of the
//! image's files all along, so the rounds read through the filesystem, not
//! from memory. A stress variant restarts the daemon 20 times at random
//! moments under four readers of two images; afterwards nothing is left:
//! no serving process, no mount, no cache file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use seamless_snapshotter::nydus::Compressor;
use sha2::Digest;

use super::env::{with_env, Env, Options};
use super::nydus::{
    convert_and_push_naming, image_pull, rafs_mounts, run_args, run_container, run_container_script, IDLE,
};
use super::{daemon_snapshots, retry, REDIAL_TIMEOUT};

/// How long containerd's garbage collector may take to remove snapshots.
const GC_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a reader may take to finish the rounds a step waits for.
const ROUNDS_TIMEOUT: Duration = Duration::from_secs(60);

/// The reader: the checksums of every file of the image, taken once as the
/// reference, then again and again; `/tmp/progress` holds the rounds done
/// and the rounds that failed or differed (each kept as `/tmp/bad.N`).
const READER: &str = r#"
files=$(find / -xdev -type f ! -path '/tmp/*' | sort)
sha256sum $files > /tmp/reference 2>&1
n=0
bad=0
while true; do
  if ! sha256sum $files > /tmp/now 2>&1 || ! cmp -s /tmp/now /tmp/reference; then
    bad=$((bad + 1))
    cp /tmp/now /tmp/bad.$bad
  fi
  n=$((n + 1))
  echo "$n $bad" > /tmp/progress.new
  mv /tmp/progress.new /tmp/progress
done
"#;

#[test]
fn containers_read_an_erofs_served_image_through_restarts_and_an_upgrade() {
    outlive("erofs");
}

#[test]
fn containers_read_a_fuse_served_image_through_restarts_an_upgrade_and_server_kills() {
    outlive("fuse");
}

#[test]
fn containers_read_an_auto_served_image_through_restarts_an_upgrade_and_server_kills() {
    outlive("auto");
}

/// What a step does to the daemon or its serving process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    KillDaemon,
    RestartDaemon,
    Upgrade,
    KillServer,
}

fn outlive(driver: &'static str) {
    let options = Options {
        nydus_fs_driver: Some(driver),
        ..Options::default()
    };
    with_env(&format!("outlive-{driver}"), options, |env| {
        let image = env.registry_ref("seamless-outlive:1");
        convert_and_push_naming(env, &image, None, Compressor::Lz4Block)?;
        let ns = env.namespace("o");
        image_pull(env, &ns, &image)?;
        let reader = env.container_id("reader");
        run_reader(env, &ns, &image, &reader)?;
        let mounts = rafs_mounts(env)?;
        ensure!(mounts.len() == 1, "one RAFS mount expected: {mounts:?}");
        let (mountpoint, fs_type) = mounts[0].clone();
        let served_over_fuse = driver != "erofs";
        let expected_type = if served_over_fuse { "fuse.rafs" } else { "erofs" };
        ensure!(fs_type == expected_type, "{driver}: the RAFS is {fs_type}");
        let servers = env.serving_processes();
        ensure!(
            servers.len() == usize::from(served_over_fuse),
            "{driver}: serving processes {servers:?}"
        );
        wait_rounds(env, &ns, &reader, 2)?;
        check_reference(env, &ns, &reader)?;
        check_mounts_listed(env, &image, &reader, &mountpoint, 0)?;

        let dropping = CacheDropper::start(&mountpoint);
        let mut steps = vec![Step::KillDaemon, Step::RestartDaemon, Step::Upgrade];
        if served_over_fuse {
            steps.push(Step::KillServer);
        }
        for (n, step) in steps.into_iter().enumerate() {
            let (before, _) = progress(env, &ns, &reader)?;
            let during = env.container_id(&format!("during{n}"));
            let starting = start_container_in_background(env, &ns, &image, &during)?;
            let server_before = env.serving_processes();
            take_step(env, step)?;
            let started_during = starting.wait_with_output()?;
            if !started_during.status.success() {
                // The daemon was down for part of the step: containerd said
                // so, and the start must work once it is back.
                ensure!(
                    step != Step::KillServer,
                    "a container did not start while the serving process was replaced: {}",
                    String::from_utf8_lossy(&started_during.stderr)
                );
                let _ = env.ctr(&ns, &["containers", "delete", &during]);
                retry(REDIAL_TIMEOUT, &format!("a container started during {step:?}"), || {
                    run_container(env, &ns, &image, &during).inspect_err(|_| {
                        let _ = env.ctr(&ns, &["containers", "delete", &during]);
                    })
                })?;
            }
            let after = env.container_id(&format!("after{n}"));
            retry(REDIAL_TIMEOUT, &format!("a container started after {step:?}"), || {
                run_container(env, &ns, &image, &after).inspect_err(|_| {
                    let _ = env.ctr(&ns, &["containers", "delete", &after]);
                })
            })?;
            for id in [&during, &after] {
                let greeting = env.exec(&ns, id, &format!("cat {}", super::image::GREETING.0))?;
                ensure!(greeting == super::image::GREETING.1, "{step:?}: {id} read {greeting:?}");
            }
            wait_rounds(env, &ns, &reader, before + 3).with_context(|| format!("reading on after {step:?}"))?;
            check_no_bad_round(env, &ns, &reader, step)?;
            ensure!(
                rafs_mounts(env)? == mounts,
                "{step:?}: the RAFS mount changed: {:?}",
                rafs_mounts(env)?
            );
            check_serving_after(env, step, served_over_fuse, &server_before)?;
            // The daemon's count of restarts starts with the daemon.
            let restarts = u32::from(step == Step::KillServer);
            check_mounts_listed(env, &image, &reader, &mountpoint, restarts)?;
            env.remove_container(&ns, &during)?;
            env.remove_container(&ns, &after)?;
        }
        let (rounds, _) = progress(env, &ns, &reader)?;
        drop(dropping);
        eprintln!("outlive {driver}: {rounds} rounds of checksums of every file, none failed");

        env.remove_container(&ns, &reader)?;
        env.ctr(&ns, &["images", "rm", "--sync", &image])?;
        check_nothing_left(env)
    });
}

#[test]
fn four_readers_of_two_images_read_through_twenty_random_restarts() {
    with_env("outlive-stress", Options::default(), |env| {
        let images = [
            env.registry_ref("seamless-outlive-lz4:1"),
            env.registry_ref("seamless-outlive-zstd:1"),
        ];
        convert_and_push_naming(env, &images[0], None, Compressor::Lz4Block)?;
        convert_and_push_naming(env, &images[1], None, Compressor::Zstd)?;
        let ns = env.namespace("s");
        let mut readers = Vec::new();
        for (i, image) in images.iter().enumerate() {
            image_pull(env, &ns, image)?;
            for j in 0..2 {
                let id = env.container_id(&format!("reader{i}{j}"));
                run_reader(env, &ns, image, &id)?;
                readers.push(id);
            }
        }
        let mounts = rafs_mounts(env)?;
        ensure!(mounts.len() == 2, "a RAFS mount per image: {mounts:?}");
        for id in &readers {
            wait_rounds(env, &ns, id, 2)?;
            check_reference(env, &ns, id)?;
        }
        let droppers: Vec<CacheDropper> = mounts.iter().map(|(m, _)| CacheDropper::start(m)).collect();
        // A fixed seed: a failure replays the same moments.
        let mut random = 0x5eed_u64;
        let mut next = move |bound: u64| {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random % bound
        };
        for restart in 0..20 {
            sleep(Duration::from_millis(next(1500)));
            let signal = if next(2) == 0 { Signal::SIGKILL } else { Signal::SIGTERM };
            env.signal_daemon(signal)
                .with_context(|| format!("restart {restart}: {signal}"))?;
            env.start_daemon().with_context(|| format!("restart {restart}"))?;
        }
        for id in &readers {
            let (before, _) = progress(env, &ns, id)?;
            wait_rounds(env, &ns, id, before + 2)?;
            check_no_bad_round(env, &ns, id, Step::RestartDaemon)?;
        }
        ensure!(
            rafs_mounts(env)? == mounts,
            "the mounts changed: {:?}",
            rafs_mounts(env)?
        );
        let servers = env.serving_processes();
        ensure!(servers.len() == 2, "a serving process per image, no more: {servers:?}");
        drop(droppers);
        for id in &readers {
            env.remove_container(&ns, id)?;
        }
        for image in &images {
            env.ctr(&ns, &["images", "rm", "--sync", image])?;
        }
        check_nothing_left(env)
    });
}

fn take_step(env: &mut Env, step: Step) -> Result<()> {
    match step {
        Step::KillDaemon => {
            env.signal_daemon(Signal::SIGKILL)?;
            env.start_daemon()
        }
        Step::RestartDaemon => {
            env.signal_daemon(Signal::SIGTERM)?;
            env.start_daemon()
        }
        Step::Upgrade => {
            let dir = env.dir().join("upgrade");
            std::fs::create_dir_all(&dir)?;
            let binary = dir.join("containerd-seamless-grpc");
            std::fs::copy(env!("CARGO_BIN_EXE_containerd-seamless-grpc"), &binary)?;
            env.signal_daemon(Signal::SIGTERM)?;
            env.set_daemon_binary(&binary);
            env.start_daemon()
        }
        Step::KillServer => {
            let servers = env.serving_processes();
            ensure!(servers.len() == 1, "one serving process to kill: {servers:?}");
            kill(Pid::from_raw(servers[0].0), Signal::SIGKILL)?;
            Ok(())
        }
    }
}

/// After `step`: one serving process (FUSE) or none (erofs); a new one of
/// the new binary after an upgrade, a new one after a kill, the same one
/// after a restart.
fn check_serving_after(env: &Env, step: Step, fuse: bool, before: &[(i32, PathBuf)]) -> Result<()> {
    if !fuse {
        let servers = env.serving_processes();
        ensure!(servers.is_empty(), "erofs needs no serving process: {servers:?}");
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let servers = env.serving_processes();
        let settled = match step {
            Step::KillDaemon | Step::RestartDaemon => servers == before,
            Step::Upgrade => {
                servers.len() == 1 && servers[0].0 != before[0].0 && servers[0].1.starts_with(env.dir().join("upgrade"))
            }
            Step::KillServer => servers.len() == 1 && servers[0].0 != before[0].0,
        };
        if settled {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{step:?}: serving processes {servers:?}, before {before:?}"
        );
        sleep(Duration::from_millis(100));
    }
}

/// `checkpointctl mounts -o json` lists the image's one mount: its state,
/// image, serving process, users (the reader among them) and cache.
fn check_mounts_listed(env: &Env, image: &str, reader: &str, mountpoint: &Path, restarts: u32) -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_checkpointctl"))
        .arg("--address")
        .arg(env.daemon_socket())
        .args(["mounts", "-o", "json"])
        .output()?;
    ensure!(
        out.status.success(),
        "checkpointctl mounts: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mounts = listed.as_array().context("an array")?;
    ensure!(mounts.len() == 1, "one mount listed: {listed}");
    let mount = &mounts[0];
    ensure!(mount["mountpoint"] == mountpoint.display().to_string(), "{mount}");
    ensure!(mount["image"] == image, "{mount}");
    ensure!(mount["cache_bytes"].as_u64().is_some_and(|b| b > 0), "{mount}");
    let users = mount["snapshots"].as_array().context("snapshots")?;
    ensure!(
        users.iter().any(|u| u.as_str().is_some_and(|u| u.ends_with(reader))),
        "the reader's snapshot uses it: {mount}"
    );
    match env.serving_processes().as_slice() {
        [] => ensure!(
            mount["state"] == "mounted" && mount.get("server_pid").is_none(),
            "{mount}"
        ),
        [(pid, _)] => ensure!(
            mount["state"] == "served" && mount["server_pid"] == *pid && mount["server_restarts"] == restarts,
            "served by {pid} after {restarts} restarts: {mount}"
        ),
        more => bail!("serving processes {more:?}"),
    }
    Ok(())
}

fn run_reader(env: &Env, ns: &str, image: &str, id: &str) -> Result<()> {
    run_container_script(env, ns, image, id, READER)
}

/// `ctr run -d` of a container of `image`, not waited for.
fn start_container_in_background(env: &Env, ns: &str, image: &str, id: &str) -> Result<std::process::Child> {
    Ok(Command::new("ctr")
        .arg("--address")
        .arg(env.containerd_socket())
        .args(["-n", ns])
        .args(run_args(env, image, id, IDLE))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

/// Rounds done and rounds failed by reader `id`.
fn progress(env: &Env, ns: &str, id: &str) -> Result<(u64, u64)> {
    let out = env.exec(ns, id, "cat /tmp/progress 2>/dev/null || echo 0 0")?;
    let mut fields = out.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(done)), Some(Ok(failed))) => Ok((done, failed)),
        _ => bail!("reader {id}: progress {out:?}"),
    }
}

fn wait_rounds(env: &Env, ns: &str, id: &str, rounds: u64) -> Result<()> {
    let deadline = Instant::now() + ROUNDS_TIMEOUT;
    loop {
        let (done, _) = progress(env, ns, id)?;
        if done >= rounds {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "reader {id}: {done} rounds, {rounds} awaited"
        );
        sleep(Duration::from_millis(200));
    }
}

/// The reference the reader took holds the image's known file as it is.
fn check_reference(env: &Env, ns: &str, id: &str) -> Result<()> {
    let reference = env.exec(ns, id, "cat /tmp/reference")?;
    let (path, content, _) = super::image::GREETING;
    let digest = format!("{:x}", sha2::Sha256::digest(content.as_bytes()));
    ensure!(
        reference.lines().any(|l| l == format!("{digest}  {path}")),
        "reader {id}: the reference lacks {path} as the image holds it:\n{reference}"
    );
    ensure!(
        reference.lines().count() >= 5 && reference.contains("/bin/busybox"),
        "reader {id}: the reference covers too little:\n{reference}"
    );
    Ok(())
}

fn check_no_bad_round(env: &Env, ns: &str, id: &str, step: Step) -> Result<()> {
    let (done, failed) = progress(env, ns, id)?;
    if failed > 0 {
        let first = env.exec(ns, id, "cat /tmp/bad.1; echo ---; cat /tmp/reference")?;
        bail!("reader {id}: {failed} of {done} rounds failed or differed by {step:?}; the first:\n{first}");
    }
    Ok(())
}

/// With the image's last container and the image gone: no RAFS mount, no
/// serving process, no control socket, no blob or cache file.
fn check_nothing_left(env: &Env) -> Result<()> {
    let root = env.daemon_root();
    retry(GC_TIMEOUT, "everything of the image to go", || {
        let mounts = rafs_mounts(env)?;
        ensure!(mounts.is_empty(), "RAFS mounts left: {mounts:?}");
        let servers = env.serving_processes();
        ensure!(servers.is_empty(), "serving processes left: {servers:?}");
        for dir in [
            "nydus/servers",
            "nydus/blobs",
            "nydus/cache",
            "nydus/fuse-cache",
            "nydus/mnt",
        ] {
            let left: Vec<PathBuf> = std::fs::read_dir(root.join(dir))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?;
            ensure!(left.is_empty(), "left in {dir}: {left:?}");
        }
        let snapshots = daemon_snapshots(env)?;
        ensure!(snapshots.is_empty(), "snapshots left: {snapshots:?}");
        Ok(())
    })
}

/// Drops the page cache of every file of a mounted image every 100 ms, so
/// that the readers' rounds read through the filesystem.
struct CacheDropper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CacheDropper {
    fn start(mountpoint: &Path) -> CacheDropper {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, root) = (stop.clone(), mountpoint.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                drop_page_cache(&root);
                sleep(Duration::from_millis(100));
            }
        });
        CacheDropper {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for CacheDropper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Errors are ignored: the mount may be between servers, which is the point.
fn drop_page_cache(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            drop_page_cache(&path);
        } else if meta.is_file() {
            if let Ok(file) = std::fs::File::open(&path) {
                let _ = nix::fcntl::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
            }
        }
    }
}
