//! `checkpointctl create`: checkpoint a running container's filesystem.

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
    /// Flush the container's writes before freezing it (the filesystem
    /// capture always does).
    #[arg(long)]
    pre_freeze: bool,
    /// Most memory a process-state dump may take (e.g. 1G).
    #[arg(long, default_value = "1G")]
    memory_limit: String,
    /// Checkpoint the filesystem only, not the processes.
    #[arg(long)]
    fs_only: bool,
}

pub async fn run(context: &Context, args: Args) -> Result<(), CliError> {
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
