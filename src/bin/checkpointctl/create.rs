//! `checkpointctl create`: checkpoint a running container: its writable
//! layer and, unless `--fs-only`, its processes (a CRIU dump on the daemon's
//! host). Prints the new checkpoint's id.

use seamless_snapshotter::checkpoint::filter::{parse_duration, parse_size};
use seamless_snapshotter::proto::{CreateCheckpointRequest, ScheduleCheckpointsRequest};

use crate::checkpoints::checkpoint_id;
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
    /// Store only the changes since this checkpoint.
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

pub async fn run(context: &Context, args: Args) -> Result<(), CliError> {
    if let Some(flag) = args.process_flag_with_fs_only() {
        return Err(CliError::Usage(format!(
            "--fs-only excludes {flag}: a filesystem-only checkpoint dumps no processes"
        )));
    }
    let memory_limit =
        parse_size(&args.memory_limit).map_err(|reason| CliError::Usage(format!("--memory-limit: {reason}")))?;
    let interval = args
        .interval
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|reason| CliError::Usage(format!("--interval: {reason}")))?;
    let parent = args.parent.as_deref().map(checkpoint_id).transpose()?;
    if interval.is_some() && parent.is_some() {
        return Err(CliError::Usage(
            "--interval and --parent exclude each other: a schedule builds each checkpoint on its previous one".into(),
        ));
    }
    let request = CreateCheckpointRequest {
        storage: Some(context.storage.clone()),
        namespace: context.namespace.clone(),
        container: args.container.clone(),
        labels: args.labels,
        parent: parent.unwrap_or_default(),
        compression: args.compression,
        pre_freeze: args.pre_freeze,
        memory_limit,
        fs_only: args.fs_only,
        exit_after: !args.leave_running,
        tcp_established: args.tcp_established,
        file_locks: args.file_locks,
        pre_dump: args.pre_dump,
    };
    let mut client = daemon::connect(&context.address).await?;
    let action = format!("checkpoint of container {}", args.container);
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

    #[tokio::test]
    async fn a_conflict_is_a_usage_error_before_any_connection() {
        let context = Context {
            address: "/nonexistent/d.sock".into(),
            namespace: "default".into(),
            storage: Default::default(),
        };
        let err = run(&context, parse(&["--fs-only", "--tcp-established"]))
            .await
            .unwrap_err();
        assert!(matches!(err, CliError::Usage(_)), "{err:?}");
        assert!(err.to_string().contains("--tcp-established"), "{err}");
    }
}
