//! `checkpointctl create`: checkpoint a running container: its writable
//! layer and, unless `--fs-only`, its processes (a CRIU dump on the daemon's
//! host). Prints the new checkpoint's id.

use seamless_snapshotter::checkpoint::filter::{parse_duration, parse_size};
use seamless_snapshotter::proto::{CreateCheckpointRequest, ScheduleCheckpointsRequest};

use crate::checkpoints::checkpoint_id;
use crate::settings::AutomergeSettings;
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Container id or unique id prefix.
    container: String,
    /// Repeat the checkpoint at this interval (e.g. 30m, 1h): the daemon
    /// keeps the schedule across restarts (see `checkpointctl schedule`).
    #[arg(short = 'i', long)]
    interval: Option<String>,
    /// Label the checkpoint: k=v or a bare k (repeatable).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// Store only the changes since this checkpoint; with --interval, the
    /// schedule's first checkpoint is taken on it.
    #[arg(short = 'p', long)]
    parent: Option<String>,
    /// Compression of the stored data.
    #[arg(long, default_value = "zstd", value_parser = ["none", "gzip", "zstd"])]
    compression: String,
    /// Keep the container frozen across the filesystem capture and the
    /// memory dump, so that disk and memory are of the same instant.
    #[arg(long)]
    pre_freeze: bool,
    /// Refuse, before dumping, a container whose memory exceeds this (e.g. 1G).
    #[arg(long, default_value = "1G")]
    memory_limit: String,
    /// Checkpoint the filesystem only, not the processes.
    #[arg(long)]
    fs_only: bool,
    /// Keep the container running after the dump; --leave-running=false
    /// stops it.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    leave_running: bool,
    /// Dump established TCP connections (restored only where their
    /// addresses are).
    #[arg(long)]
    tcp_established: bool,
    /// Dump the processes' file locks.
    #[arg(long)]
    file_locks: bool,
    /// Copy the memory while the container runs, then freeze it only to
    /// dump the pages dirtied since: a shorter freeze.
    #[arg(long)]
    pre_dump: bool,
}

impl Args {
    /// The process-state flag that `--fs-only` makes meaningless, if one
    /// was given.
    fn process_flag_with_fs_only(&self) -> Option<&'static str> {
        if !self.fs_only {
            return None;
        }
        [
            (self.pre_dump, "--pre-dump"),
            (self.tcp_established, "--tcp-established"),
            (self.file_locks, "--file-locks"),
            (!self.leave_running, "--leave-running=false"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

/// What `create` asks of the daemon: one checkpoint, or (with an
/// interval) a schedule whose first checkpoint is taken now.
#[derive(Debug)]
struct Plan {
    request: CreateCheckpointRequest,
    interval: Option<std::time::Duration>,
}

impl Args {
    /// Checks the flags together and builds the request; a conflict is a
    /// usage error before any connection. `--parent` goes with `--interval`
    /// (`create web -i 30m -p cp-x`): the schedule's first checkpoint is
    /// taken on that parent, each later one on the schedule's previous one.
    fn plan(self, context: &Context) -> Result<Plan, CliError> {
        if let Some(flag) = self.process_flag_with_fs_only() {
            return Err(CliError::Usage(format!(
                "--fs-only excludes {flag}: a filesystem-only checkpoint dumps no processes"
            )));
        }
        let memory_limit =
            parse_size(&self.memory_limit).map_err(|reason| CliError::Usage(format!("--memory-limit: {reason}")))?;
        let interval = self
            .interval
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|reason| CliError::Usage(format!("--interval: {reason}")))?;
        let parent = self.parent.as_deref().map(checkpoint_id).transpose()?;
        let request = CreateCheckpointRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            container: self.container,
            labels: self.labels,
            parent: parent.unwrap_or_default(),
            compression: self.compression,
            pre_freeze: self.pre_freeze,
            memory_limit,
            fs_only: self.fs_only,
            exit_after: !self.leave_running,
            tcp_established: self.tcp_established,
            file_locks: self.file_locks,
            pre_dump: self.pre_dump,
            criu_path: context.criu_path.clone().unwrap_or_default(),
            engine: context.engine.clone(),
        };
        Ok(Plan { request, interval })
    }
}

/// `automerge` (of the config file) goes with a schedule: the daemon
/// merges the container's checkpoints after each scheduled one.
pub async fn run(context: &Context, automerge: &AutomergeSettings, args: Args) -> Result<(), CliError> {
    let Plan { request, interval } = args.plan(context)?;
    let container = request.container.clone();
    let mut client = daemon::connect(&context.address).await?;
    let action = format!("checkpoint of container {container}");
    match interval {
        None => {
            let created = client
                .create_checkpoint(request)
                .await
                .map_err(|status| CliError::rpc(action, status))?
                .into_inner();
            println!("{}", created.id);
        }
        Some(interval) => {
            let scheduled = client
                .schedule_checkpoints(ScheduleCheckpointsRequest {
                    checkpoint: Some(request),
                    interval_secs: interval.as_secs(),
                    automerge: automerge.rules(),
                })
                .await
                .map_err(|status| CliError::rpc(action, status))?
                .into_inner();
            let first = scheduled.first.unwrap_or_default();
            let schedule = scheduled.schedule.unwrap_or_default();
            println!("{}", first.id);
            println!("schedule {}: every {}s", schedule.id, schedule.interval_secs);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Create {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Args {
        Create::try_parse_from([&["create", "web"], argv].concat())
            .unwrap()
            .args
    }

    #[test]
    fn process_state_is_on_and_leaves_the_container_running_by_default() {
        let args = parse(&[]);
        assert!(!args.fs_only && args.leave_running);
        assert_eq!(args.memory_limit, "1G");
        assert!(parse(&["--leave-running"]).leave_running);
        assert!(parse(&["--leave-running=true"]).leave_running);
        assert!(!parse(&["--leave-running=false"]).leave_running);
        assert!(!parse(&["--leave-running", "false"]).leave_running);
        let err = Create::try_parse_from(["create", "web", "--leave-running=maybe"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn fs_only_refuses_each_process_flag_by_name() {
        for flag in [
            "--pre-dump",
            "--tcp-established",
            "--file-locks",
            "--leave-running=false",
        ] {
            assert_eq!(parse(&["--fs-only", flag]).process_flag_with_fs_only(), Some(flag));
            assert_eq!(parse(&[flag]).process_flag_with_fs_only(), None);
        }
        for fine in [
            &["--fs-only"][..],
            &["--fs-only", "--leave-running"],
            &["--fs-only", "--pre-freeze"],
        ] {
            assert_eq!(parse(fine).process_flag_with_fs_only(), None, "{fine:?}");
        }
    }

    fn context() -> Context {
        Context {
            address: "/nonexistent/d.sock".into(),
            namespace: "default".into(),
            storage: Default::default(),
            criu_path: None,
            engine: "containerd".into(),
        }
    }

    /// The reference's own example: a schedule labelled production whose
    /// first checkpoint is taken on cp-x.
    #[test]
    fn an_interval_goes_with_a_label_and_a_parent() {
        let plan = parse(&["-i", "30m", "-l", "production", "-p", "cp-x"])
            .plan(&context())
            .unwrap();
        assert_eq!(plan.interval, Some(std::time::Duration::from_secs(1800)));
        assert_eq!(plan.request.parent, "cp-x");
        assert_eq!(plan.request.labels, ["production"]);
        assert_eq!(plan.request.container, "web");
        let long = parse(&["--interval", "1h", "--label", "a=b", "--parent", "\"cp-y\""])
            .plan(&context())
            .unwrap();
        assert_eq!(long.interval, Some(std::time::Duration::from_secs(3600)));
        assert_eq!(long.request.parent, "cp-y");
        // The whole command line, global options included: no short flag
        // of checkpointctl's collides with -i, -l or -p.
        let cli = crate::Cli::try_parse_from([
            "checkpointctl",
            "-c",
            "/dev/null",
            "create",
            "web",
            "-i",
            "30m",
            "-l",
            "production",
            "-p",
            "cp-x",
        ])
        .unwrap();
        let crate::Command::Create(args) = cli.command else {
            panic!("{:?} is not create", cli.command);
        };
        assert_eq!(args.plan(&context()).unwrap().request.parent, "cp-x");
        let err = parse(&["-i", "soon"]).plan(&context()).unwrap_err();
        assert!(
            matches!(err, CliError::Usage(_)) && err.to_string().contains("--interval"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_conflict_is_a_usage_error_before_any_connection() {
        let context = context();
        let err = run(
            &context,
            &Default::default(),
            parse(&["--fs-only", "--tcp-established"]),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CliError::Usage(_)), "{err:?}");
        assert!(err.to_string().contains("--tcp-established"), "{err}");
    }
}
