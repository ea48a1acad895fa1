//! `checkpointctl automanage` against real containerd, runc and CRIU: a
//! container burning a CPU (selected by id) is checkpointed once when it
//! crosses the threshold and not again while it stays hot (hysteresis); a
//! quiet one (selected by a label of the container) is never checkpointed
//! for CPU but gets a checkpoint every interval, each on the previous one,
//! pruned to the newest few; SIGHUP with a broken policy is refused naming
//! the key and the loop goes on under the old policy; SIGHUP with a changed
//! policy takes effect; SIGTERM stops it cleanly. Around it, the seed
//! workflow of the issue: `create -i 2h --label=daily` first, and the
//! disaster-recovery pipeline (`list --filter=label=golden -o json | jq |
//! xargs restore`) last.
//!
//! Timing is only ever waited for, never asserted: the machine may have two
//! cores, and each CRIU dump takes a while.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{getsid, Pid};
use serde_json::Value;

use super::env::{with_env, Env, Options};

const BURNER: &str = "while :; do :; done";
const QUIET: &str = "while true; do sleep 1; done";

struct Ctl {
    socket: PathBuf,
    ns: String,
}

impl Ctl {
    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkpointctl"));
        cmd.arg("--address").arg(&self.socket).arg("--namespace").arg(&self.ns);
        cmd
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.command().args(args).output()?;
        ensure!(
            out.status.success(),
            "checkpointctl {args:?} exited {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The container's checkpoints, oldest first, as `list -o json` prints them.
    fn checkpoints(&self, container: &str) -> Result<Vec<Value>> {
        let out = self.ok(&["list", container, "-o", "json"])?;
        let all: Vec<Value> = serde_json::from_str(&out).with_context(|| out.clone())?;
        Ok(all.into_iter().filter(|c| c["container"] == container).collect())
    }

    /// Those automanage took for `reason`.
    fn automanaged(&self, container: &str, reason: &str) -> Result<Vec<Value>> {
        Ok(self
            .checkpoints(container)?
            .into_iter()
            .filter(|c| c["labels"]["automanage"] == reason)
            .collect())
    }
}

/// The automanage child; killed if the test fails before it is stopped.
struct Automanage {
    child: Child,
    log: PathBuf,
}

impl Automanage {
    fn start(ctl: &Ctl, policy: &Path, log: PathBuf) -> Result<Automanage> {
        let out = File::create(&log)?;
        let child = ctl
            .command()
            .args(["automanage", "--schedule-file"])
            .arg(policy)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting checkpointctl automanage")?;
        Ok(Automanage { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), signal).with_context(|| format!("sending {signal}"))
    }

    /// Log lines that mention `container` and contain `text`.
    fn lines(&self, container: &str, text: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("container={container}")) && l.contains(text))
            .map(str::to_string)
            .collect()
    }

    /// Polls `check` every half second until it holds, failing after
    /// `within` with `what` and the log (or at once if automanage exited).
    fn wait_until(
        &mut self,
        within: Duration,
        what: &str,
        mut check: impl FnMut(&Automanage) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.still_running()?;
            if check(self)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what} within {within:?}; automanage's log:\n{}", self.log());
            }
            sleep(Duration::from_millis(500));
        }
    }

    fn still_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("automanage exited ({status}):\n{}", self.log());
        }
        Ok(())
    }

    fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "automanage did not exit:\n{}", self.log());
            sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Automanage {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_container(env: &Env, ns: &str, id: &str, labels: &[&str], script: &str) -> Result<()> {
    let image = env.image_ref();
    let mut args = vec!["run", "-d", "--null-io", "--snapshotter", &env.snapshotter];
    for label in labels {
        args.extend(["--label", label]);
    }
    args.extend([image.as_str(), id, "/bin/sh", "-c", script]);
    env.ctr(ns, &args)?;
    Ok(())
}

/// Written whole, then renamed: a SIGHUP never reads half a file.
fn write_policy(path: &Path, text: &str) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// The hysteresis is wide (re-arm below 5%): other work on a small machine
/// can hold the burner well under 100% for a second or two, but never near 0.
fn policy(burner: &str, quiet_labels: &str) -> String {
    format!(
        "\
check_interval: 1s
cpu_threshold: 50
hysteresis: 45
containers:
  - id: {burner}
    checkpoint_labels: [golden]
  - labels: {{role: quiet}}
    interval: 2s
    checkpoint_labels: {quiet_labels}
    prune: {{keep_latest: 3, exclude_labels: [daily]}}
"
    )
}

fn ids(checkpoints: &[Value]) -> Vec<&str> {
    checkpoints
        .iter()
        .map(|c| c["id"].as_str().unwrap_or_default())
        .collect()
}

#[test]
fn automanage_checkpoints_on_thresholds_and_intervals() {
    with_env("automanage", Options::default(), |env| {
        let ns = env.namespace("a");
        env.pull(&ns)?;
        let ctl = Ctl {
            socket: env.daemon_socket(),
            ns: ns.clone(),
        };
        let burner = env.container_id("burner");
        let quiet = env.container_id("quiet");
        run_container(env, &ns, &burner, &[], BURNER)?;
        run_container(env, &ns, &quiet, &["role=quiet"], QUIET)?;

        // The seed workflow: a schedule of the daemon's own first.
        let created = ctl.ok(&["create", "-i", "2h", "--label=daily", &quiet])?;
        let daily = created.lines().next().unwrap_or_default().trim().to_string();
        ensure!(
            created.contains("schedule "),
            "create -i registers a schedule: {created}"
        );

        let policy_file = env.dir().join("policy.yaml");
        write_policy(&policy_file, &policy(&burner, "[]"))?;
        let mut automanage = Automanage::start(&ctl, &policy_file, env.dir().join("automanage.log"))?;

        // The burner crosses 50% on the second sample; the quiet one's 2 s
        // interval comes round again and again.
        automanage.wait_until(Duration::from_secs(40), "no CPU checkpoint of the burner", |_| {
            Ok(!ctl.automanaged(&burner, "cpu")?.is_empty())
        })?;
        automanage.wait_until(Duration::from_secs(40), "no 2 interval checkpoints", |_| {
            Ok(ctl.automanaged(&quiet, "interval")?.len() >= 2)
        })?;
        // Several more samples of a burner that stays hot.
        automanage.wait_until(
            Duration::from_secs(30),
            "the burner was not seen disarmed 4 times",
            |am| Ok(am.lines(&burner, "(disarmed until < 5%)").len() >= 4),
        )?;
        let hot = ctl.automanaged(&burner, "cpu")?;
        ensure!(
            hot.len() == 1,
            "one CPU checkpoint while the burner stays hot, not {:?}; log:\n{}",
            ids(&hot),
            automanage.log()
        );
        ensure!(
            hot[0]["labels"].get("golden").is_some(),
            "the rule's labels: {}",
            hot[0]
        );
        let burner_lines = automanage.lines(&burner, "cpu ");
        ensure!(
            burner_lines
                .iter()
                .any(|l| l.contains("checkpoint taken: cpu") && l.contains(">= 50% (armed)")),
            "the decision is logged with its numbers: {burner_lines:#?}"
        );
        ensure!(
            ctl.automanaged(&burner, "interval")?.is_empty(),
            "no interval in the burner's rule"
        );
        ensure!(
            ctl.automanaged(&quiet, "cpu")?.is_empty(),
            "the quiet one never crosses 50%: {}",
            automanage.log()
        );
        ensure!(
            !automanage.lines(&quiet, "% < 50%").is_empty(),
            "the quiet one's CPU is measured and logged: {}",
            automanage.log()
        );

        // SIGHUP with a broken policy: refused, naming the key; the old one
        // stays in force.
        write_policy(
            &policy_file,
            &(policy(&burner, "[]") + "  - id: x\n    cpu_threshold: 150\n"),
        )?;
        automanage.signal(Signal::SIGHUP)?;
        let refusal = format!(
            "policy {} refused: containers[2].cpu_threshold: 150 is not a percentage between 1 and 100",
            policy_file.display()
        );
        automanage.wait_until(Duration::from_secs(15), "the refusal does not name the key", |am| {
            Ok(am.log().contains(&refusal))
        })?;
        ensure!(
            automanage
                .log()
                .lines()
                .any(|l| l.contains(&refusal) && l.ends_with("; keeping the previous policy")),
            "{}",
            automanage.log()
        );
        // The old policy goes on: another interval checkpoint comes.
        let taken_before = automanage.lines(&quiet, "checkpoint taken: ").len();
        automanage.wait_until(Duration::from_secs(20), "no checkpoint after the refusal", |am| {
            Ok(am.lines(&quiet, "checkpoint taken: ").len() > taken_before)
        })?;

        // SIGHUP with a changed policy: its labels go on the next checkpoints.
        write_policy(&policy_file, &policy(&burner, "[reloaded]"))?;
        automanage.signal(Signal::SIGHUP)?;
        automanage.wait_until(Duration::from_secs(15), "no reload logged", |am| {
            Ok(am.log().contains(&format!("policy {} reloaded", policy_file.display())))
        })?;
        automanage.wait_until(Duration::from_secs(20), "no checkpoint with the new label", |_| {
            Ok(ctl
                .automanaged(&quiet, "interval")?
                .iter()
                .any(|c| c["labels"].get("reloaded").is_some()))
        })?;

        // SIGTERM: stops between ticks, exit 0.
        automanage.signal(Signal::SIGTERM)?;
        let status = automanage.wait_exit(Duration::from_secs(30))?;
        ensure!(
            status.success(),
            "SIGTERM stops cleanly: {status}\n{}",
            automanage.log()
        );
        ensure!(
            automanage.log().contains("SIGTERM: automanage stopped"),
            "{}",
            automanage.log()
        );

        // The quiet one's checkpoints: pruned to the newest 3 (the daily one
        // is excluded), each on the one before.
        let taken = automanage.lines(&quiet, "checkpoint taken: ").len();
        let interval = ctl.automanaged(&quiet, "interval")?;
        ensure!(
            taken >= 4 && interval.len() == 3,
            "{taken} interval checkpoints taken, pruned to the newest 3: {:?}\n{}",
            ids(&interval),
            automanage.log()
        );
        ensure!(
            !automanage.lines(&quiet, "prune: 1 removed").is_empty(),
            "{}",
            automanage.log()
        );
        for pair in interval.windows(2) {
            ensure!(
                pair[1]["parent"] == pair[0]["id"],
                "each interval checkpoint is taken on the previous one: {pair:#?}"
            );
        }
        let all = ids(&ctl.checkpoints(&quiet)?).join(" ");
        ensure!(
            all.contains(&daily),
            "prune leaves the excluded daily checkpoint {daily}: {all}"
        );

        // --daemonize: a new session, the log in the file, the pid printed;
        // a policy that never checkpoints, so nothing dumps the burner here.
        let quiet_only = env.dir().join("quiet-only.yaml");
        write_policy(
            &quiet_only,
            &format!("check_interval: 1s\ncontainers: [{{id: {quiet}}}]\n"),
        )?;
        let detached_log = env.dir().join("detached.log");
        let printed = ctl.ok(&[
            "automanage",
            "--daemonize",
            "--log-file",
            &detached_log.display().to_string(),
            "--schedule-file",
            &quiet_only.display().to_string(),
        ])?;
        let pid: i32 = printed
            .trim()
            .parse()
            .with_context(|| format!("--daemonize printed {printed:?}"))?;
        let pid = Pid::from_raw(pid);
        ensure!(alive(pid), "the detached automanage {pid} is not running");
        ensure!(
            getsid(Some(pid))? == pid,
            "the detached automanage leads its own session"
        );
        let log = || std::fs::read_to_string(&detached_log).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !log().contains("% < 80%") {
            ensure!(
                Instant::now() < deadline,
                "the detached automanage logs nothing: {}",
                log()
            );
            sleep(Duration::from_millis(200));
        }
        kill(pid, Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(pid) {
            ensure!(
                Instant::now() < deadline,
                "the detached automanage ignores SIGTERM: {}",
                log()
            );
            sleep(Duration::from_millis(100));
        }
        ensure!(log().contains("SIGTERM: automanage stopped"), "{}", log());

        // Disaster recovery as the issue writes it, the burner gone.
        env.remove_container(&ns, &burner)?;
        let ctl_line = format!(
            "{} --address {} --namespace {}",
            env!("CARGO_BIN_EXE_checkpointctl"),
            env.daemon_socket().display(),
            ns
        );
        let pipeline =
            format!("{ctl_line} list --filter=\"label=golden\" -o json | jq '.[-1].id' | xargs {ctl_line} restore");
        let out = Command::new("sh").arg("-c").arg(&pipeline).output()?;
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.status.success(), "the recovery pipeline failed: {printed}");
        let restored = format!("{burner}-restored");
        let tasks = env.ctr(&ns, &["tasks", "ls"])?;
        ensure!(
            tasks
                .lines()
                .any(|l| l.split_whitespace().next() == Some(restored.as_str())),
            "{restored} has a task after the restore: {tasks}\n{printed}"
        );

        // --once without a policy: every running container (the restored one
        // is paused), default thresholds, one decision each, exit 0.
        let out = ctl
            .command()
            .args(["automanage", "--once"])
            .env("NO_COLOR", "1")
            .output()?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "automanage --once: {said}");
        let decisions: Vec<&str> = said.lines().filter(|l| l.contains("no checkpoint: ")).collect();
        ensure!(
            decisions.len() == 1
                && decisions[0].contains(&format!("container={quiet}"))
                && decisions[0].contains("% < 80%"),
            "one decision, on the quiet container: {said}"
        );
        Ok(())
    });
}

/// Whether `pid` runs (a zombie waiting for init does not).
fn alive(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// `automerge` of checkpointctl's config runs after every scheduled
/// checkpoint (the daemon merges, with the rules the schedule was created
/// with) and after every automanaged one of a rule without a merge of its
/// own: with `strategy: incremental` a container's chain is squashed into
/// its newest checkpoint each time, so however many were taken, one stays.
#[test]
fn automerge_runs_after_scheduled_and_automanaged_checkpoints() {
    with_env("automerge", Options::default(), |env| {
        let ns = env.namespace("m");
        env.pull(&ns)?;
        let ctl = Ctl {
            socket: env.daemon_socket(),
            ns: ns.clone(),
        };
        let config = env.dir().join("automerge.yaml");
        std::fs::write(&config, "automerge: {strategy: incremental}\n")?;
        let with_config = |args: &[&str]| -> Result<String> {
            let out = ctl.command().arg("-c").arg(&config).args(args).output()?;
            ensure!(
                out.status.success(),
                "checkpointctl {args:?} exited {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
        };

        // Scheduled: three runs or more, one checkpoint left.
        let scheduled = env.container_id("scheduled");
        run_container(env, &ns, &scheduled, &[], QUIET)?;
        let out = with_config(&["create", &scheduled, "-i", "1s", "--fs-only", "-l", "auto"])?;
        let schedule_id = out
            .lines()
            .find_map(|l| l.strip_prefix("schedule "))
            .and_then(|l| l.split(':').next())
            .context("no schedule line")?
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listed: Vec<Value> = serde_json::from_str(&ctl.ok(&["schedule", "ls", "-o", "json"])?)?;
            let runs = listed.first().and_then(|s| s["runs"].as_u64()).unwrap_or(0);
            ensure!(
                listed.first().is_some_and(|s| s["last_error"].is_null()),
                "the schedule's runs and merges succeed: {listed:?}"
            );
            ensure!(
                listed.first().is_some_and(|s| s["automerge"] == "incremental"),
                "schedule ls shows the schedule's automerge: {listed:?}"
            );
            if runs >= 3 {
                break;
            }
            ensure!(Instant::now() < deadline, "3 scheduled runs expected: {listed:?}");
            sleep(Duration::from_millis(500));
        }
        ctl.ok(&["schedule", "rm", &schedule_id])?;
        // A run under way when the schedule went still merges.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = ctl.checkpoints(&scheduled)?;
            if left.len() == 1 {
                ensure!(left[0]["parent"].is_null(), "squashed whole: {left:?}");
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "automerge left {} checkpoints of the schedule: {:?}",
                left.len(),
                ids(&left)
            );
            sleep(Duration::from_millis(500));
        }

        // Automanaged, by a rule with no merge: two runs, one checkpoint left.
        let managed = env.container_id("managed");
        run_container(env, &ns, &managed, &[], QUIET)?;
        let policy_file = env.dir().join("automerge-policy.yaml");
        write_policy(
            &policy_file,
            &format!("check_interval: 1s\ncontainers:\n  - id: {managed}\n    interval: 1s\n    fs_only: true\n"),
        )?;
        let policy_arg = policy_file.display().to_string();
        for run in 1..=2 {
            let log = with_config(&["automanage", "--once", "--schedule-file", &policy_arg])?;
            ensure!(log.contains("checkpoint taken"), "run {run}: {log}");
            ensure!(
                log.contains("automerge") && log.contains("merge:"),
                "run {run} merged: {log}"
            );
        }
        let left = ctl.checkpoints(&managed)?;
        ensure!(
            left.len() == 1,
            "automerge after each automanaged checkpoint: {:?}",
            ids(&left)
        );
        Ok(())
    });
}

/// `logging.max_size` of the config keeps the log of `--daemonize` small:
/// past the size it becomes `<log>.1`, the older ones move up, and no more
/// than `logging.max_backups` are kept.
#[test]
fn the_daemonized_log_rotates_past_max_size() {
    with_env("automanage-log-rotation", Options::default(), |env| {
        let ns = env.namespace("r");
        env.pull(&ns)?;
        let ctl = Ctl {
            socket: env.daemon_socket(),
            ns: ns.clone(),
        };
        let quiet = env.container_id("quiet");
        run_container(env, &ns, &quiet, &[], QUIET)?;
        let config = env.dir().join("rotation.yaml");
        std::fs::write(&config, "logging: {level: debug, max_size: 1KB, max_backups: 2}\n")?;
        // Samples every second, never checkpoints: a line or more per tick.
        let policy_file = env.dir().join("rotation-policy.yaml");
        write_policy(
            &policy_file,
            &format!("check_interval: 1s\ncontainers: [{{id: {quiet}}}]\n"),
        )?;
        let log = env.dir().join("rotated.log");
        let backup = |n: u32| std::path::PathBuf::from(format!("{}.{n}", log.display()));
        let out = ctl
            .command()
            .arg("-c")
            .arg(&config)
            .args(["automanage", "--daemonize", "--log-file"])
            .arg(&log)
            .arg("--schedule-file")
            .arg(&policy_file)
            .output()?;
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let pid = Pid::from_raw(String::from_utf8_lossy(&out.stdout).trim().parse()?);
        let result = (|| -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !backup(2).exists() {
                ensure!(alive(pid), "automanage exited: {:?}", std::fs::read_to_string(&log));
                ensure!(Instant::now() < deadline, "the log was not rotated twice within 90 s");
                sleep(Duration::from_millis(500));
            }
            // One tick more: a third rotation drops the oldest, never keeps it.
            sleep(Duration::from_secs(2));
            ensure!(!backup(3).exists(), "only max_backups (2) are kept");
            for n in [1, 2] {
                let size = std::fs::metadata(backup(n))?.len();
                ensure!(
                    (1024..64 * 1024).contains(&size),
                    "{} rotated just past 1KB: {size} bytes",
                    backup(n).display()
                );
            }
            let current = std::fs::read_to_string(&log)?;
            ensure!(
                current.len() < 64 * 1024 && std::fs::read_to_string(backup(1))?.contains("no checkpoint"),
                "the log goes on in the new file"
            );
            Ok(())
        })();
        kill(pid, Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(pid) {
            ensure!(Instant::now() < deadline, "automanage did not stop on SIGTERM");
            sleep(Duration::from_millis(100));
        }
        result
    });
}
