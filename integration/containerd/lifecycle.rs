//! A container's life on the snapshotter and the daemon's: pull, run,
//! write, remove; the daemon killed or stopped under running containers and
//! restarted; a container left frozen by a killed daemon thawed on restart.

use super::*;

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

/// A daemon killed while a container is frozen: the state it leaves behind
/// (the cgroup frozen, its marker written before the freeze) is recreated
/// exactly with the daemon down, and the restarted daemon thaws the real
/// container before serving.
#[test]
fn restart_thaws_a_container_left_frozen() {
    use seamless_snapshotter::host::sys::{Freezer, RealSystem, SystemOps};

    with_env("frozen", Options::default(), |env| {
        let ns = env.namespace("f");
        env.pull(&ns)?;
        let id = env.container_id("frozen");
        env.run_container(&ns, &id)?;
        let runtime = tokio::runtime::Runtime::new()?;
        let container = resolve_container(&runtime, env, &ns, &id)?;
        let freezer = seamless_snapshotter::host::cgroup::freezer_of(container.pid)?;
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
