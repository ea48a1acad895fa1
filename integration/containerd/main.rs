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
mod commit_jobs;
mod commit_nydus;
mod credentials;
mod cri;
mod env;
mod grpc;
mod image;
mod local_image;
mod nydus;
mod registry_auth;
mod restore;
mod stall;

use std::collections::HashMap;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;

use env::{with_env, with_env_config, Env, Options, SnapshotRow};
use grpc::Snapshots;

/// containerd redials a dead proxy plugin with a backoff of at most 3 s.
const REDIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// Pull, run, write into and read from a container, then remove it all: the
/// whole life of a container on the snapshotter, and what each step leaves
/// behind in containerd's and the daemon's view.
#[test]
fn pull_run_exec_and_remove() {
    with_env("pull", Options::default(), |env| {
        let ns = env.namespace("a");
        let chain = env.image().chain_ids.clone();
        env.pull(&ns)?;
        expect_snapshots(env, &ns, &[], "after the pull")?;

        let id = env.container_id("c1");
        env.run_container(&ns, &id)?;
        expect_snapshots(env, &ns, &[&id], "with the container running")?;
        check_image_content(env, &ns, &id)?;

        env.exec(
            &ns,
            &id,
            "mkdir -p /data && echo written-by-test > /data/file1 && \
             dd if=/dev/zero of=/data/blob bs=1024 count=512 2>/dev/null && \
             echo appended-line >> /etc/passwd && sync",
        )?;
        let read = env.exec(&ns, &id, "cat /data/file1; wc -c < /data/blob; tail -n 1 /etc/passwd")?;
        ensure!(
            read.split_whitespace().collect::<Vec<_>>() == ["written-by-test", "524288", "appended-line"],
            "reading back what was written in the container: {read:?}"
        );
        check_root_mount(env, &ns, &id)?;
        check_write_landed_in_storage(env, "data/file1", "written-by-test\n")?;

        let usage = env.usage(&ns)?;
        let base = find_usage(&usage, &chain[0])?;
        ensure!(
            base.size >= env.image().busybox_size && base.inodes >= 100,
            "usage of the base layer {} is too small for busybox and its applet links: {base:?}",
            chain[0]
        );
        let container = find_usage(&usage, &id)?;
        ensure!(
            container.size >= 512 * 1024,
            "usage of the container snapshot must count the 512 KiB written into it: {container:?}"
        );

        env.remove_container(&ns, &id)?;
        expect_snapshots(env, &ns, &[], "after deleting the container")?;
        let usage = env.usage(&ns)?;
        let mut keys: Vec<&str> = usage.iter().map(|u| u.key.as_str()).collect();
        keys.sort();
        let mut expected: Vec<&str> = chain.iter().map(String::as_str).collect();
        expected.sort();
        ensure!(
            keys == expected,
            "`ctr snapshots usage` after deleting the container: {usage:?}"
        );

        // Removing the image lets containerd's garbage collector remove the
        // committed layers from the snapshotter (and call Cleanup).
        env.ctr(&ns, &["images", "rm", "--sync", &env.image_ref()])?;
        let left = env.snapshots(&ns)?;
        ensure!(left.is_empty(), "snapshots left after removing the image: {left:?}");
        if env.snapshotter == "seamless" {
            let in_daemon = Snapshots::daemon(&env.daemon_socket())?.list(&[])?;
            ensure!(
                in_daemon.is_empty(),
                "the daemon still lists snapshots after containerd removed them all: {:?}",
                in_daemon.iter().map(|i| &i.name).collect::<Vec<_>>()
            );
            let dirs = snapshot_dirs(env)?;
            ensure!(
                dirs.is_empty(),
                "snapshot directories left in {} after every snapshot was removed: {dirs:?}",
                env.storage_dir().display()
            );
        }
        Ok(())
    });
}

/// kill -9 of the daemon while a container runs: the container keeps working
/// (its overlay mount does not need the daemon), the daemon restarts on the
/// same root over the stale socket, and containerd uses it again once it
/// redials.
#[test]
fn daemon_sigkill_restart_keeps_containers_working() {
    with_env("kill", Options::default(), |env| {
        let ns = env.namespace("a");
        env.pull(&ns)?;
        let first = env.container_id("c1");
        env.run_container(&ns, &first)?;
        env.exec(&ns, &first, "echo before-kill > /root/before")?;

        let status = env.signal_daemon(Signal::SIGKILL)?;
        ensure!(
            status.code().is_none(),
            "the daemon should have died of SIGKILL: {status}"
        );
        let out = env.exec(
            &ns,
            &first,
            "echo while-down > /root/down && cat /root/before /root/down",
        )?;
        ensure!(
            out == "before-kill\nwhile-down\n",
            "the container must keep working while the daemon is down: {out:?}"
        );

        env.start_daemon().context("restarting the daemon after SIGKILL")?;
        let out = env.exec(
            &ns,
            &first,
            "echo after-restart > /root/after && cat /root/before /root/down /root/after",
        )?;
        ensure!(
            out == "before-kill\nwhile-down\nafter-restart\n",
            "the container after the daemon restarted: {out:?}"
        );

        let second = run_container_retrying(env, &ns, "c2")?;
        let out = env.exec(
            &ns,
            &second,
            &format!(
                "cat {}; test -e /root/before && echo leaked || echo isolated",
                image::GREETING.0
            ),
        )?;
        ensure!(
            out == format!("{}isolated\n", image::GREETING.1),
            "a new container after the restart must see the image and not the other container's files: {out:?}"
        );
        expect_snapshots(env, &ns, &[&first, &second], "after the restart")?;

        env.remove_container(&ns, &first)?;
        env.remove_container(&ns, &second)?;
        expect_snapshots(env, &ns, &[], "after deleting both containers")?;
        Ok(())
    });
}

/// SIGTERM: the daemon drains and exits 0, leaving no live socket; a second
/// daemon never takes over a live socket; the restarted daemon serves the same
/// snapshots and new containers.
#[test]
fn daemon_sigterm_exits_cleanly_and_restarts() {
    with_env("term", Options::default(), |env| {
        let ns = env.namespace("a");
        env.pull(&ns)?;
        let first = env.container_id("c1");
        env.run_container(&ns, &first)?;
        env.exec(&ns, &first, "echo before-term > /root/before")?;

        let second_root = env.dir().join("second");
        let (status, output) = env.run_second_daemon(&second_root)?;
        match status {
            Some(status) if !status.success() => {}
            Some(status) => bail!(
                "a second daemon on the live socket {} must refuse to start, but it exited {status}:\n{output}",
                env.daemon_socket().display()
            ),
            None => bail!(
                "a second daemon on the live socket {} kept running instead of refusing the socket:\n{output}",
                env.daemon_socket().display()
            ),
        }
        ensure!(
            env::socket_is_live(&env.daemon_socket()),
            "the first daemon's socket stopped answering after a second daemon was refused"
        );
        expect_snapshots(env, &ns, &[&first], "after a second daemon was refused")?;

        let status = env.signal_daemon(Signal::SIGTERM)?;
        ensure!(
            status.code() == Some(0),
            "the daemon must exit 0 on SIGTERM, it exited {status}"
        );
        let socket = env.daemon_socket();
        if socket.exists() {
            ensure!(
                !env::socket_is_live(&socket),
                "{} still accepts connections after the daemon exited",
                socket.display()
            );
        }
        let out = env.exec(&ns, &first, "cat /root/before")?;
        ensure!(
            out == "before-term\n",
            "the container while the daemon is stopped: {out:?}"
        );

        env.start_daemon().context("restarting the daemon after SIGTERM")?;
        retry(
            REDIAL_TIMEOUT,
            "containerd listing snapshots through the restarted daemon",
            || expect_snapshots(env, &ns, &[&first], "after the restart"),
        )?;
        let second = run_container_retrying(env, &ns, "c2")?;
        let out = env.exec(&ns, &second, &format!("cat {}", image::GREETING.0))?;
        ensure!(out == image::GREETING.1, "a new container after the restart: {out:?}");
        let out = env.exec(&ns, &first, "echo after > /root/after && cat /root/before /root/after")?;
        ensure!(
            out == "before-term\nafter\n",
            "the first container after the restart: {out:?}"
        );

        env.remove_container(&ns, &first)?;
        env.remove_container(&ns, &second)?;
        expect_snapshots(env, &ns, &[], "after deleting both containers")?;
        Ok(())
    });
}

/// Two namespaces share committed layers through containerd's
/// `containerd.io/snapshot.ref` label: an unpack that labels its Prepare with
/// the chain id of a layer the daemon already holds (in any namespace) gets
/// AlreadyExists, and containerd adopts the existing snapshot instead of
/// unpacking again. The layers outlive the first namespace's image.
///
/// containerd 1.6's `ctr images pull` unpacks through `rootfs.ApplyLayers`,
/// which never sets that label, so the first namespace is `k8s.io`, pulled
/// through CRI (containerd's unpacker, which labels every layer), and the
/// second namespace replays the unpacker's RPCs (Stat, then Prepare with the
/// label) through containerd's snapshots service; its `ctr images pull` then
/// finds every layer and unpacks nothing.
#[test]
fn namespaces_share_committed_layers() {
    // The namespaces that may share, as the operator lists them; the test's
    // namespace names are fixed by its name and process.
    let second_name = format!("sit-share-b-{}", std::process::id());
    with_env_config(
        "share",
        Options {
            cri: true,
            ..Options::default()
        },
        &format!("[snapshotter]\nshared_namespaces = [\"k8s.io\", \"{second_name}\"]\n"),
        |env| {
            let second = env.namespace("b");
            ensure!(
                second == second_name,
                "namespace {second} is not the one configured as sharing"
            );
            let chain = env.image().chain_ids.clone();
            let image_id = cri::pull_image(&env.containerd_socket(), &env.image_ref())?;
            ensure!(image_id.starts_with("sha256:"), "CRI PullImage answered {image_id:?}");
            expect_snapshots(env, "k8s.io", &[], "after the CRI pull")?;
            let before = daemon_snapshots(env)?;

            // The unpacker works under a lease, which keeps what it adopts from
            // the garbage collector until the image references it.
            let lease = "sit-unpack";
            env.ctr(&second, &["leases", "create", "--id", lease])?;
            let mut snapshots =
                Snapshots::containerd(&env.containerd_socket(), &env.snapshotter, &second)?.with_lease(lease);
            for (layer, chain_id) in chain.iter().enumerate() {
                let parent = if layer == 0 { "" } else { chain[layer - 1].as_str() };
                let found = snapshots.stat(chain_id);
                ensure!(
                    found.is_err(),
                    "{chain_id} exists in {second} before its unpack: {found:?}"
                );
                let key = format!("extract-{layer}-test {chain_id}");
                let labels = HashMap::from([("containerd.io/snapshot.ref".to_string(), chain_id.clone())]);
                match snapshots.prepare(&key, parent, labels) {
                    Err(e) if grpc::code_of(&e) == Some(tonic::Code::AlreadyExists) => {}
                    Err(e) => bail!("Prepare of layer {layer} with the chain id label should be AlreadyExists: {e:?}"),
                    Ok(mounts) => {
                        bail!(
                        "Prepare of layer {layer} ({chain_id}) unpacks again instead of reusing the layer: {mounts:?}"
                    )
                    }
                }
                let info = snapshots
                    .stat(chain_id)
                    .with_context(|| format!("layer {layer} after adoption"))?;
                ensure!(
                    grpc::is_committed(&info),
                    "adopted layer {layer} is not committed: {info:?}"
                );
            }
            env.pull(&second)?;
            env.ctr(&second, &["leases", "delete", "--sync", lease])?;
            expect_snapshots(env, &second, &[], "after adopting the layers and pulling")?;

            let after = daemon_snapshots(env)?;
            ensure!(
            after == before,
            "adopting the layers in a second namespace must not create snapshots in the daemon:\n  before {before:#?}\n  after  {after:#?}"
        );
            ensure!(
                env.snapshotter != "seamless"
                    || (after.len() == chain.len()
                        && after
                            .iter()
                            .all(|s| s.starts_with("k8s.io/") && s.contains("(committed"))),
                "the daemon should hold exactly the {} committed layers of k8s.io: {after:#?}",
                chain.len()
            );

            let id = env.container_id("c1");
            env.run_container(&second, &id)?;
            check_image_content(env, &second, &id)?;

            // k8s.io lets go of the image; the second namespace still holds the
            // layers, so garbage collection must keep them.
            // CRI names the image by tag, repo digest and id: remove them all.
            let names = env.ctr("k8s.io", &["images", "ls", "-q"])?;
            let mut rm = vec!["images", "rm", "--sync"];
            rm.extend(names.split_whitespace());
            env.ctr("k8s.io", &rm)?;
            let left = env.snapshots("k8s.io")?;
            ensure!(
                left.is_empty(),
                "k8s.io still has snapshots after removing the image: {left:?}"
            );
            expect_snapshots(env, &second, &[&id], "after k8s.io removed the image")?;
            let id2 = env.container_id("c2");
            env.run_container(&second, &id2)?;
            let out = env.exec(&second, &id2, &format!("cat {}", image::GREETING.0))?;
            ensure!(
                out == image::GREETING.1,
                "a container of the second namespace after k8s.io let go: {out:?}"
            );
            // A namespace the operator did not list claims the same chain
            // ids: it is not handed the layers, it unpacks its own.
            let outsider = env.namespace("c");
            let mut theirs = Snapshots::containerd(&env.containerd_socket(), &env.snapshotter, &outsider)?;
            let outsider_key = format!("extract-0-outsider {}", chain[0]);
            let labels = HashMap::from([("containerd.io/snapshot.ref".to_string(), chain[0].clone())]);
            if let Err(e) = theirs.prepare(&outsider_key, "", labels) {
                bail!("a namespace not listed as sharing must unpack its own layer, got {e:?}");
            }
            ensure!(
                theirs.stat(&chain[0]).is_err(),
                "the outsider namespace sees {} without having unpacked it",
                chain[0]
            );
            theirs.remove(&outsider_key)?;
            env.remove_container(&second, &id)?;
            env.remove_container(&second, &id2)?;
            Ok(())
        },
    );
}

/// Kubernetes' path: containerd's CRI plugin loads with
/// `snapshotter = "seamless"`, reports the snapshotter's image filesystem, and
/// pulls through it with the `containerd.io/snapshot/cri.*` labels reaching
/// the daemon; a Prepare carrying those labels, through containerd or straight
/// to the daemon, keeps them.
#[test]
fn cri_plugin_uses_seamless_and_keeps_cri_labels() {
    with_env(
        "cri",
        Options {
            cri: true,
            ..Options::default()
        },
        |env| {
            let ns = env.namespace("k8s");
            let plugins = env.ctr_global(&["plugins", "ls"])?;
            let cri = plugins
                .lines()
                .find(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() >= 3 && cols[0] == "io.containerd.grpc.v1" && cols[1] == "cri"
                })
                .with_context(|| format!("the CRI plugin is not listed:\n{plugins}"))?;
            ensure!(
                cri.split_whitespace().last() == Some("ok"),
                "the CRI plugin did not load with snapshotter {:?}: {cri}",
                env.snapshotter
            );

            let fs = cri::image_fs_mountpoints(&env.containerd_socket())?;
            let expected_fs = format!("io.containerd.snapshotter.v1.{}", env.snapshotter);
            ensure!(
                fs.iter().any(|m| m.ends_with(&expected_fs)),
                "CRI ImageFsInfo should report {expected_fs}, it reports {fs:?}"
            );

            let reference = env.image_ref();
            let image_id = cri::pull_image(&env.containerd_socket(), &reference)?;
            ensure!(image_id.starts_with("sha256:"), "CRI PullImage answered {image_id:?}");
            let built = env.image();
            let layer_digests = built.diff_ids.join(",");
            if env.snapshotter == "seamless" {
                let all = Snapshots::daemon(&env.daemon_socket())?.list(&[])?;
                for (layer, chain_id) in built.chain_ids.iter().enumerate() {
                    let info = all
                        .iter()
                        .find(|i| i.labels.get("containerd.io/snapshot.ref") == Some(chain_id))
                        .with_context(|| {
                            format!(
                                "CRI pulled, but the daemon has no snapshot for chain id {chain_id}: {:?}",
                                all.iter().map(|i| &i.name).collect::<Vec<_>>()
                            )
                        })?;
                    ensure!(grpc::is_committed(info), "layer {layer} is not committed: {info:?}");
                    let expected = [
                        ("containerd.io/snapshot/cri.image-ref", reference.as_str()),
                        (
                            "containerd.io/snapshot/cri.manifest-digest",
                            built.manifest_digest.as_str(),
                        ),
                        (
                            "containerd.io/snapshot/cri.layer-digest",
                            built.diff_ids[layer].as_str(),
                        ),
                    ];
                    for (key, value) in expected {
                        ensure!(
                            info.labels.get(key).map(String::as_str) == Some(value),
                            "layer {layer} ({}) should carry {key}={value} from the CRI pull; labels: {:?}",
                            info.name,
                            info.labels
                        );
                    }
                }
            }

            // A Prepare with CRI labels through containerd's snapshots service...
            let labels: HashMap<String, String> = [
                ("containerd.io/snapshot/cri.image-ref", reference.clone()),
                (
                    "containerd.io/snapshot/cri.manifest-digest",
                    built.manifest_digest.clone(),
                ),
                ("containerd.io/snapshot/cri.layer-digest", built.diff_ids[0].clone()),
                ("containerd.io/snapshot/cri.image-layers", layer_digests.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let mut through_containerd = Snapshots::containerd(&env.containerd_socket(), &env.snapshotter, &ns)?;
            // Nothing else references the snapshot: keep the garbage collector off it.
            let mut with_root = labels.clone();
            with_root.insert("containerd.io/gc.root".to_string(), "2023-11-14T22:13:20Z".to_string());
            through_containerd.prepare("cri-prepare", "", with_root)?;
            let info = through_containerd.stat("cri-prepare")?;
            ensure!(grpc::is_active(&info), "cri-prepare should be active: {info:?}");
            expect_labels(&info, &labels, "Stat through containerd")?;

            if env.snapshotter == "seamless" {
                let mut daemon = Snapshots::daemon(&env.daemon_socket())?;
                let suffix = "/cri-prepare";
                let backend = daemon
                    .list(&[])?
                    .into_iter()
                    .find(|i| i.name.starts_with(&format!("{ns}/")) && i.name.ends_with(suffix))
                    .with_context(|| format!("the daemon has no snapshot named {ns}/<n>{suffix}"))?;
                expect_labels(&backend, &labels, "the daemon's view of the Prepare through containerd")?;

                // ...and straight to the daemon, as a remote snapshotter client
                // would do it.
                let key = format!("{ns}/9999/cri-direct");
                daemon.prepare(&key, "", labels.clone())?;
                let info = daemon.stat(&key)?;
                ensure!(grpc::is_active(&info), "{key} should be active: {info:?}");
                expect_labels(&info, &labels, "Stat straight from the daemon")?;
                daemon.remove(&key)?;
            }
            through_containerd.remove("cri-prepare")?;
            Ok(())
        },
    );
}

/// The core of seamless commit against a real runc container: resolved
/// through containerd's API by id prefix, its upper directory captured as a
/// read-only btrfs snapshot while a process in it keeps writing, frozen only
/// around the snapshot, and running afterwards.
#[test]
fn seamless_capture_of_a_running_container() {
    use seamless_snapshotter::capture::{capture_upper, CaptureMethod, FrozenMarkers};
    use seamless_snapshotter::sys::{RealSystem, SystemOps};

    with_env("capture", Options::default(), |env| {
        let ns = env.namespace("cap");
        env.pull(&ns)?;
        let id = env.container_id("writer");
        env.run_container(&ns, &id)?;
        env.exec(&ns, &id, "mkdir -p /data && echo before > /data/before && sync")?;
        env.exec(
            &ns,
            &id,
            "(i=0; while true; do i=$((i+1)); echo $i > /data/counter.new; mv /data/counter.new /data/counter; done) >/dev/null 2>&1 &",
        )?;
        sleep(Duration::from_millis(300));

        let runtime = tokio::runtime::Runtime::new()?;
        let prefix = &id[..id.len() - 3];
        let container = resolve_container(&runtime, env, &ns, prefix)?;
        ensure!(container.id == id, "prefix {prefix} resolved to {}", container.id);
        ensure!(container.snapshotter == "seamless", "{container:?}");
        let freezer = seamless_snapshotter::cgroup::freezer_of(container.pid)?;

        let mountinfo = env.exec(&ns, &id, "cat /proc/self/mountinfo")?;
        let upper = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .and_then(|l| l.split(',').find_map(|o| o.strip_prefix("upperdir=")))
            .context("no upperdir on the container's root mount")?
            .to_string();
        let subvolume = std::path::Path::new(&upper)
            .parent()
            .context("upper has a parent")?
            .to_path_buf();
        let dest = env.storage_dir().join("test-capture");
        let sys: std::sync::Arc<dyn SystemOps> = std::sync::Arc::new(RealSystem);
        let markers = FrozenMarkers::new(env.dir().join("frozen"));
        let captured = capture_upper(
            &sys,
            &markers,
            "t1",
            &subvolume,
            &dest,
            &freezer,
            Duration::from_secs(2),
            CaptureMethod::Snapshot,
        )?;
        eprintln!(
            "capture of a container writing in a loop paused it for {:?}",
            captured.pause
        );

        let before = std::fs::read_to_string(dest.join("fs/data/before"))?;
        ensure!(before == "before\n", "captured /data/before holds {before:?}");
        let counted: u64 = std::fs::read_to_string(dest.join("fs/data/counter"))?
            .trim()
            .parse()
            .unwrap_or(0);
        ensure!(counted > 0, "the writer's counter is in the capture");
        let err = std::fs::write(dest.join("fs/data/new"), b"x").expect_err("capture is read-only");
        ensure!(
            err.raw_os_error() == Some(libc::EROFS),
            "writing into the capture: {err}"
        );

        // The container runs on, on its own upper, and is not frozen.
        let state = std::fs::read_to_string(freezer.dir().join(match &freezer {
            seamless_snapshotter::sys::Freezer::V1(_) => "freezer.state",
            seamless_snapshotter::sys::Freezer::V2(_) => "cgroup.events",
        }))?;
        ensure!(
            !state.contains("FROZEN") && !state.contains("frozen 1"),
            "still frozen: {state}"
        );
        let later = retry(Duration::from_secs(5), "counter moves on after the capture", || {
            let now: u64 = env.exec(&ns, &id, "cat /data/counter")?.trim().parse()?;
            ensure!(now > counted, "counter {now} has not moved past the captured {counted}");
            Ok(now)
        })?;
        ensure!(
            std::fs::read_to_string(dest.join("fs/data/counter"))?
                .trim()
                .parse::<u64>()?
                == counted,
            "the capture changed after it was taken (live value {later})"
        );
        ensure!(
            std::fs::read_dir(env.dir().join("frozen"))?.count() == 0,
            "frozen marker left behind"
        );
        sys.delete_subvolume(&dest)?;
        Ok(())
    });
}

/// Seamless commit end to end: a running container changed in every way a
/// layer can express is committed through the daemon's Control API, the image
/// is built and pushed in the background, and the pushed image, pulled with
/// containerd's built-in overlayfs and with seamless and run, has exactly the
/// tree the container had.
#[test]
fn seamless_commit_pushes_the_container_view() {
    use seamless_snapshotter::proto::{GetCommitRequest, SeamlessCommitRequest};

    with_env("commit", Options::default(), |env| {
        let ns = env.namespace("src");
        env.pull(&ns)?;
        let id = env.container_id("app");
        env.run_container(&ns, &id)?;
        env.exec(
            &ns,
            &id,
            "mkdir -p /data/sub && echo hello > /data/sub/file && chmod 0640 /data/sub/file && \
             chown 1000:1001 /data/sub/file && ln -s sub/file /data/link && ln /data/sub/file /data/hard && \
             rm /bin/vi && mkdir /opt && echo x > /opt/x && rm -rf /opt && mkdir /opt && echo y > /opt/y && \
             mknod /data/fifo p && mknod /data/null c 1 3 && mkdir /data/attrs && echo z > /data/attrs/f && sync",
        )?;
        // busybox has no setfattr: set attributes through the container's
        // root mount, as a process inside would.
        let rootfs = env.container_rootfs(&ns, &id);
        xattr::set(rootfs.join("data/attrs/f"), "user.origin", b"inside")?;
        xattr::set(rootfs.join("data/attrs"), "user.dir", b"d")?;
        xattr::set(rootfs.join("etc/passwd"), "user.lower", b"copied-up")?;
        let before = tree_of(&rootfs)?;
        ensure!(
            before["data/attrs/f"].contains("user.origin=inside")
                && before["etc/passwd"].contains("user.lower=copied-up")
                && before["data/null"].starts_with("dev 259"),
            "attributes and the device are visible: {:?} {:?} {:?}",
            before["data/attrs/f"],
            before["etc/passwd"],
            before["data/null"]
        );
        ensure!(
            before.contains_key("data/sub/file") && !before.contains_key("bin/vi"),
            "changes visible"
        );

        let target = env.registry_ref("committed/app:1");
        let runtime = tokio::runtime::Runtime::new()?;
        let work = env.dir().join("commit-work");
        std::fs::create_dir_all(&work)?;
        let (started, job) = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            let started = control
                .seamless_commit(SeamlessCommitRequest {
                    namespace: ns.clone(),
                    container: id[..id.len() - 2].to_string(),
                    target: target.clone(),
                    format: "oci".into(),
                    work_dir: work.display().to_string(),
                    compressor: "zstd".into(),
                    target_insecure: true,
                    source_insecure: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            // A second commit while the first is processing may be refused;
            // either way the first must complete.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let job = control
                    .get_commit(GetCommitRequest {
                        snapshot_id: started.snapshot_id.clone(),
                    })
                    .await?
                    .into_inner();
                if job.state == "completed" || job.state == "failed" || Instant::now() > deadline {
                    return Ok::<_, anyhow::Error>((started, job));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })?;
        eprintln!(
            "seamless commit: pause {:?}, job {} {} ({})",
            Duration::from_nanos(started.pause_time_ns),
            job.state,
            job.manifest_digest,
            job.error
        );
        ensure!(
            job.state == "completed",
            "commit job ended {}: {} {}",
            job.state,
            job.error_code,
            job.error
        );
        ensure!(started.snapshot_id.starts_with("snapshot-"), "{started:?}");
        ensure!(
            Path::new(&started.old_upper_dir).exists(),
            "the capture is kept as the base of the container's next commit"
        );

        // The CLI against the same daemon: exit codes and messages of the issue.
        let cli = |args: &[&str]| -> Result<(i32, String, String)> {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_checkpointctl"))
                .arg("--address")
                .arg(env.daemon_socket())
                .arg("--namespace")
                .arg(&ns)
                .args(args)
                .output()?;
            Ok((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        };
        let (code, _, err) = cli(&[
            "seamless-commit",
            "--container",
            "no-such-container",
            "--target",
            &target,
            "--format",
            "oci",
        ])?;
        ensure!(
            code == 3 && err.starts_with("FATA[") && err.contains("CONTAINER_NOT_FOUND"),
            "{code} {err}"
        );
        let (code, out, err) = cli(&[
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
            "--wait",
        ])?;
        ensure!(code == 0, "second commit through the CLI: {code} {out} {err}");
        ensure!(
            !Path::new(&started.old_upper_dir).exists(),
            "the first capture is removed once the next commit is pushed"
        );
        for line in [
            "Seamless snapshot created successfully:",
            "  Snapshot ID: snapshot-",
            "  Pause Time: ",
            "  Old Upper Dir: ",
            "  New Upper Dir: ",
            "Background commit processing started for snapshot: snapshot-",
            "Background processing completed successfully.",
        ] {
            ensure!(
                out.lines().any(|l| l.starts_with(line)),
                "CLI output lacks {line:?}:\n{out}"
            );
        }
        eprintln!("{out}");

        // The REST API on the daemon's rest.sock, same daemon and container.
        let rest = |method: &str, path: &str, body: &str| -> Result<(u16, serde_json::Value, String)> {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(env.daemon_socket().with_file_name("rest.sock"))?;
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            let mut response = String::new();
            s.read_to_string(&mut response)?;
            let status = response.split(' ').nth(1).unwrap_or("0").parse()?;
            let text = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Ok((
                status,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                text,
            ))
        };
        let create = serde_json::json!({
            "namespace": ns, "container": id, "target": env.registry_ref("committed/app:rest"), "format": "oci",
            "work_dir": work, "target_insecure": true, "source_insecure": true, "compressor": "none"
        });
        let (status, created, text) = rest("POST", "/api/v1/snapshots", &create.to_string())?;
        ensure!(status == 201, "REST commit: {status} {text}");
        let rest_id = created["snapshot_id"].as_str().context("snapshot_id")?.to_string();
        let done = retry(Duration::from_secs(60), "REST job completes", || {
            let (status, job, text) = rest("GET", &format!("/api/v1/snapshots/{rest_id}"), "")?;
            ensure!(status == 200 && job["state"] == "completed", "{status} {text}");
            Ok(job)
        })?;
        ensure!(
            done["manifest_digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
            "{done}"
        );
        let (status, _, listed) = rest("GET", "/api/v1/snapshots?state=completed&limit=10", "")?;
        ensure!(status == 200 && listed.contains(&rest_id), "{listed}");
        let (status, missing, _) = rest(
            "POST",
            "/api/v1/snapshots",
            &serde_json::json!({
                "namespace": ns, "container": "nope", "target": env.registry_ref("x/y:1"), "format": "oci"
            })
            .to_string(),
        )?;
        ensure!(
            status == 404 && missing["error"]["code"] == "CONTAINER_NOT_FOUND",
            "{status} {missing}"
        );
        let (status, _, metrics) = rest("GET", "/metrics", "")?;
        ensure!(
            status == 200 && metrics.contains("nydus_seamless_snapshots_total{status=\"completed\"} 3"),
            "three commits completed (API, CLI, REST):\n{metrics}"
        );

        expect_image_tree(env, &target, &before, "commit")?;
        Ok(())
    });
}

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

/// Commits of one container form a chain: the first pushes the whole upper,
/// the next ones only the change since the previous capture (deletions,
/// rewrites, an opaque directory), reusing the pushed layers even in another
/// repository; past `maximum_times` the older commit layers are merged into
/// one. Every image, pulled and run, has the tree the container had.
#[test]
fn commit_chain_is_incremental_and_merges_past_maximum_times() {
    use seamless_snapshotter::client::{CommitOptions, SeamlessOptions, SeamlessSnapshot};
    use seamless_snapshotter::registry::{RegistryAuth, RegistryClient, RegistryOptions};

    with_env("chain", Options::default(), |env| {
        let ns = env.namespace("chain");
        env.pull(&ns)?;
        let id = env.container_id("chain");
        env.run_container(&ns, &id)?;
        let runtime = tokio::runtime::Runtime::new()?;
        let work = env.dir().join("chain-work");
        std::fs::create_dir_all(&work)?;
        let registry = RegistryClient::new(RegistryOptions {
            insecure: true,
            ..RegistryOptions::default()
        });
        let base_layers = runtime
            .block_on(registry.pull_manifest_and_config(&env.image_ref(), &RegistryAuth::Anonymous))?
            .manifest
            .layers
            .len();

        // Each step: change the container, commit with at most two commit
        // layers, check the job, the pushed manifest and the image's tree.
        let steps: [(&str, &str, &str, u32); 3] = [
            (
                "head -c 1048576 /dev/urandom > /data-big && mkdir -p /data/d && echo a > /data/a && \
                 echo 1 > /data/keep && echo x > /data/d/x && rm /bin/vi",
                "chain/app:1",
                "full",
                1,
            ),
            (
                "rm /data/a && echo 2 > /data/keep && rm -rf /data/d && mkdir /data/d && echo y > /data/d/y && \
                 echo b > /data/b",
                "chain/app:2",
                "incremental",
                2,
            ),
            (
                "rm /data/b && echo 3 > /data/keep && mkdir /data/c && rm /bin/ls",
                "other/app:3",
                "merged",
                2,
            ),
        ];
        let mut previous_capture: Option<std::path::PathBuf> = None;
        let mut previous_layers: Vec<String> = Vec::new();
        for (step, (script, repository, plan, commit_layers)) in steps.into_iter().enumerate() {
            env.exec(&ns, &id, &format!("{script} && sync"))?;
            let expected = tree_of(&env.container_rootfs(&ns, &id))?;
            let target = env.registry_ref(repository);
            let (result, job) = runtime.block_on(async {
                let client = SeamlessSnapshot::new(SeamlessOptions {
                    address: env.daemon_socket(),
                    namespace: ns.clone(),
                })
                .await?;
                let mut options = CommitOptions::new(id.clone(), target.clone());
                options.format = "oci".into();
                options.compressor = "zstd".into();
                options.work_dir = work.clone();
                options.target_insecure = true;
                options.source_insecure = true;
                options.maximum_times = 2;
                let result = client.commit_with_wait(&options, Duration::from_secs(120)).await?;
                let job = client.get_status(&result.snapshot_id).await?;
                Ok::<_, anyhow::Error>((result, job))
            })?;
            ensure!(
                job.state == "completed" && job.layer_plan == plan && job.commit_layers == commit_layers,
                "commit {step}: expected a {plan} layer and {commit_layers} commit layers: {job:?}"
            );
            let pushed = runtime.block_on(registry.pull_manifest_and_config(&target, &RegistryAuth::Anonymous))?;
            let layers: Vec<String> = pushed.manifest.layers.iter().map(|l| l.digest.clone()).collect();
            ensure!(
                layers.len() == base_layers + commit_layers as usize,
                "commit {step}: {} layers, {base_layers} of the image and {commit_layers} commit layers expected",
                layers.len()
            );
            let config: serde_json::Value = serde_json::from_slice(&pushed.config)?;
            ensure!(
                config["rootfs"]["diff_ids"].as_array().map(Vec::len) == Some(layers.len()),
                "commit {step}: diff_ids follow the layers: {config}"
            );
            match plan {
                "incremental" => {
                    ensure!(
                        layers[..previous_layers.len()] == previous_layers[..],
                        "commit {step}: the earlier layers are reused as they are"
                    );
                    let newest = pushed.manifest.layers.last().context("a layer")?;
                    ensure!(
                        newest.size < 64 * 1024,
                        "commit {step}: the incremental layer holds only the change, not the 1 MiB file: {} bytes",
                        newest.size
                    );
                }
                "merged" => ensure!(
                    layers[..base_layers] == previous_layers[..base_layers]
                        && !previous_layers.contains(&layers[base_layers]),
                    "commit {step}: the image's layers, then a new merged layer"
                ),
                _ => {}
            }
            if let Some(previous) = &previous_capture {
                ensure!(
                    !previous.exists(),
                    "commit {step}: the previous capture is removed once this commit is pushed"
                );
            }
            ensure!(
                result.old_upper_dir.exists(),
                "commit {step}: the capture is kept for the next"
            );
            expect_image_tree(env, &target, &expected, &format!("chain{step}"))?;
            previous_capture = Some(result.old_upper_dir.clone());
            previous_layers = layers;
        }

        // The container gone, the daemon drops its chain and capture at the
        // next job's end or start.
        env.remove_container(&ns, &id)?;
        retry(
            Duration::from_secs(30),
            "containerd removes the container's snapshot",
            || {
                let active: Vec<String> = Snapshots::daemon(&env.daemon_socket())?
                    .list(&[])?
                    .into_iter()
                    .filter(grpc::is_active)
                    .map(|i| i.name)
                    .collect();
                ensure!(active.is_empty(), "active snapshots left: {active:?}");
                Ok(())
            },
        )?;
        env.signal_daemon(Signal::SIGTERM)?;
        env.start_daemon()?;
        let capture = previous_capture.context("a capture")?;
        ensure!(
            !capture.exists(),
            "a removed container's last capture is removed at the next start"
        );
        Ok(())
    });
}

/// A second commit of a container whose job is still running is refused
/// with SNAPSHOT_IN_PROGRESS; a daemon killed mid-job leaves the container
/// running and thawed, and the restarted daemon reports the job failed with
/// its reason, removes the capture and commits again.
#[test]
fn commit_in_progress_and_daemon_killed_mid_job() {
    use seamless_snapshotter::proto::{GetCommitRequest, SeamlessCommitRequest};

    with_env("commitkill", Options::default(), |env| {
        let ns = env.namespace("k");
        env.pull(&ns)?;
        let id = env.container_id("busy");
        env.run_container(&ns, &id)?;
        // Incompressible data keeps the background build busy for a while.
        env.exec(
            &ns,
            &id,
            "dd if=/dev/urandom of=/big bs=1M count=64 2>/dev/null && sync",
        )?;
        let work = env.dir().join("kill-work");
        std::fs::create_dir_all(&work)?;
        let request = SeamlessCommitRequest {
            namespace: ns.clone(),
            container: id.clone(),
            target: env.registry_ref("killed/app:1"),
            format: "oci".into(),
            work_dir: work.display().to_string(),
            compressor: "zstd".into(),
            target_insecure: true,
            source_insecure: true,
            ..Default::default()
        };
        let runtime = tokio::runtime::Runtime::new()?;
        let (first, second) = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            let first = control.seamless_commit(request.clone()).await?.into_inner();
            let second = control.seamless_commit(request.clone()).await;
            Ok::<_, anyhow::Error>((first, second))
        })?;
        let refused = second.expect_err("a second commit while the first job runs is refused");
        ensure!(
            refused.code() == tonic::Code::AlreadyExists && refused.message().starts_with("SNAPSHOT_IN_PROGRESS"),
            "{refused:?}"
        );

        // Kill the daemon while the job builds or pushes.
        env.signal_daemon(Signal::SIGKILL)?;
        ensure!(
            Path::new(&first.old_upper_dir).exists(),
            "the capture exists while its job is interrupted"
        );
        env.start_daemon()?;
        let job = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            Ok::<_, anyhow::Error>(
                control
                    .get_commit(GetCommitRequest {
                        snapshot_id: first.snapshot_id.clone(),
                    })
                    .await?
                    .into_inner(),
            )
        })?;
        ensure!(
            job.state == "failed"
                && job.error_code == "BACKGROUND_PROCESSING_FAILED"
                && job.error.contains("daemon stopped"),
            "interrupted job after restart: {job:?}"
        );
        ensure!(
            !Path::new(&first.old_upper_dir).exists(),
            "the interrupted job's capture is removed"
        );
        let out = env.exec(&ns, &id, "echo alive > /alive && cat /alive")?;
        ensure!(out.trim() == "alive", "container works after the kill: {out:?}");

        // The library API for embedding, against the restarted daemon.
        let again = retry(Duration::from_secs(15), "commit after the restart", || {
            runtime.block_on(async {
                use seamless_snapshotter::client::{CommitOptions, SeamlessOptions, SeamlessSnapshot};
                let client = SeamlessSnapshot::new(SeamlessOptions {
                    address: env.daemon_socket(),
                    namespace: ns.clone(),
                })
                .await?;
                let mut options = CommitOptions::new(id.clone(), env.registry_ref("killed/app:2"));
                options.format = "oci".into();
                options.work_dir = work.clone();
                options.target_insecure = true;
                options.source_insecure = true;
                let result = client.commit_with_wait(&options, Duration::from_secs(120)).await?;
                let job = client.get_status(&result.snapshot_id).await?;
                ensure!(result.total_time >= result.pause_time, "{result:?}");
                Ok::<_, anyhow::Error>(job)
            })
        })?;
        ensure!(again.state == "completed", "commit after restart: {again:?}");
        Ok(())
    });
}

/// A daemon killed while a container is frozen: the state it leaves behind
/// (the cgroup frozen, its marker written before the freeze) is recreated
/// exactly with the daemon down, and the restarted daemon thaws the real
/// container before serving.
#[test]
fn restart_thaws_a_container_left_frozen() {
    use seamless_snapshotter::sys::{Freezer, RealSystem, SystemOps};

    with_env("frozen", Options::default(), |env| {
        let ns = env.namespace("f");
        env.pull(&ns)?;
        let id = env.container_id("frozen");
        env.run_container(&ns, &id)?;
        let runtime = tokio::runtime::Runtime::new()?;
        let container = resolve_container(&runtime, env, &ns, &id)?;
        let freezer = seamless_snapshotter::cgroup::freezer_of(container.pid)?;
        let state_file = match &freezer {
            Freezer::V1(d) => d.join("freezer.state"),
            Freezer::V2(d) => d.join("cgroup.events"),
        };

        env.signal_daemon(Signal::SIGKILL)?;
        let markers = env.daemon_root().join("frozen");
        std::fs::create_dir_all(&markers)?;
        std::fs::write(markers.join("snapshot-killed.json"), serde_json::to_vec(&freezer)?)?;
        RealSystem.freeze_cgroup(&freezer, Instant::now() + Duration::from_secs(5))?;
        let state = std::fs::read_to_string(&state_file)?;
        ensure!(
            state.contains("FROZEN") || state.contains("frozen 1"),
            "set-up froze it: {state}"
        );

        env.start_daemon()?;
        let state = std::fs::read_to_string(&state_file)?;
        ensure!(
            !state.contains("FROZEN") && !state.contains("frozen 1"),
            "the restarted daemon left the container frozen: {state}"
        );
        ensure!(
            std::fs::read_dir(&markers)?.count() == 0,
            "marker removed after the thaw"
        );
        let out = env.exec(&ns, &id, "echo thawed")?;
        ensure!(out.trim() == "thawed", "{out:?}");
        ensure!(env.log_tail("daemon.log").contains("thawed"), "the thaw is logged");
        Ok(())
    });
}

/// A client of the daemon's Control API over its socket.
async fn control_client(
    socket: std::path::PathBuf,
) -> Result<seamless_snapshotter::proto::control_client::ControlClient<tonic::transport::Channel>> {
    let channel = seamless_snapshotter::client::connect(&socket).await?;
    Ok(seamless_snapshotter::proto::control_client::ControlClient::new(channel))
}

/// Resolves a container through containerd's API, as the daemon does.
fn resolve_container(
    runtime: &tokio::runtime::Runtime,
    env: &Env,
    ns: &str,
    query: &str,
) -> Result<seamless_snapshotter::containerd::ContainerInfo> {
    runtime.block_on(async {
        let client = seamless_snapshotter::containerd::Containerd::connect(&env.containerd_socket()).await?;
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

/// A daemon killed while its job pushes the image: a front that never answers
/// uploads holds the job in that stage, so the kill lands there every time.
/// The container keeps running, the restarted daemon reports the job failed
/// in that stage and removes its capture, and the next commit completes.
#[test]
fn daemon_killed_while_pushing_fails_the_job_with_its_stage() {
    use seamless_snapshotter::proto::SeamlessCommitRequest;

    with_env("pushkill", Options::default(), |env| {
        let ns = env.namespace("p");
        env.pull(&ns)?;
        let id = env.container_id("pushing");
        env.run_container(&ns, &id)?;
        let registry = registry_address(&env.registry_ref("x:y"))?;
        let proxy = stall::StallingProxy::start(&registry)?;
        let work = env.dir().join("pushkill-work");
        std::fs::create_dir_all(&work)?;
        let request = SeamlessCommitRequest {
            namespace: ns.clone(),
            container: id.clone(),
            target: format!("{}/stalled/app:1", proxy.address()),
            format: "oci".into(),
            work_dir: work.display().to_string(),
            target_insecure: true,
            source_insecure: true,
            ..Default::default()
        };
        let runtime = tokio::runtime::Runtime::new()?;
        let first = runtime.block_on(async {
            let mut control = control_client(env.daemon_socket()).await?;
            Ok::<_, anyhow::Error>(control.seamless_commit(request).await?.into_inner())
        })?;

        // Not the stage alone: an upload held by the proxy proves the job
        // cannot leave it before the kill.
        let stalled = wait_for_job(&runtime, env, &first.snapshot_id, Duration::from_secs(60), |job| {
            job.stage == "pushing the image" && proxy.held_uploads() > 0
        })
        .context("waiting for the job to stall in its push")?;
        eprintln!("job stalled: {stalled:?}");

        env.signal_daemon(Signal::SIGKILL)?;
        ensure!(
            Path::new(&first.old_upper_dir).exists(),
            "the capture {} exists while its job is interrupted",
            first.old_upper_dir
        );
        env.start_daemon()?;
        let job = get_commit(&runtime, env, &first.snapshot_id)?;
        ensure!(
            job.state == "failed"
                && job.error_code == "BACKGROUND_PROCESSING_FAILED"
                && job.error.contains("pushing the image"),
            "the job interrupted while pushing, after the restart: {job:?}"
        );
        ensure!(
            !Path::new(&first.old_upper_dir).exists(),
            "the interrupted job's capture {} is removed",
            first.old_upper_dir
        );
        let out = env.exec(&ns, &id, "echo alive")?;
        ensure!(out.trim() == "alive", "container works after the kill: {out:?}");

        let again = retry(Duration::from_secs(15), "commit after the restart", || {
            runtime.block_on(async {
                use seamless_snapshotter::client::{CommitOptions, SeamlessOptions, SeamlessSnapshot};
                let client = SeamlessSnapshot::new(SeamlessOptions {
                    address: env.daemon_socket(),
                    namespace: ns.clone(),
                })
                .await?;
                let mut options = CommitOptions::new(id.clone(), env.registry_ref("stalled/app:2"));
                options.format = "oci".into();
                options.work_dir = work.clone();
                options.target_insecure = true;
                options.source_insecure = true;
                let result = client.commit_with_wait(&options, Duration::from_secs(120)).await?;
                Ok::<_, anyhow::Error>(client.get_status(&result.snapshot_id).await?)
            })
        })?;
        ensure!(again.state == "completed", "commit after restart: {again:?}");
        Ok(())
    });
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
