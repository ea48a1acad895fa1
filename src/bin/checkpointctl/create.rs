//! `checkpointctl create`: checkpoint a running container's filesystem.

use seamless_snapshotter::checkpoint::filter::{parse_duration, parse_size};
use seamless_snapshotter::proto::CreateCheckpointRequest;

use crate::checkpoints::checkpoint_id;
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Container id or unique id prefix.
    container: String,
    /// Repeat the checkpoint at this interval (e.g. 30m, 1h).
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
    if let Some(interval) = &args.interval {
        parse_duration(interval).map_err(|reason| CliError::Usage(format!("--interval: {reason}")))?;
        return Err(CliError::Usage(
            "--interval: recurring checkpoints are not supported by this version yet".into(),
        ));
    }
    let parent = args.parent.as_deref().map(checkpoint_id).transpose()?;
    let mut client = daemon::connect(&context.address).await?;
    let created = client
        .create_checkpoint(CreateCheckpointRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            container: args.container.clone(),
            labels: args.labels,
            parent: parent.unwrap_or_default(),
            compression: args.compression,
            pre_freeze: args.pre_freeze,
            memory_limit,
            fs_only: args.fs_only,
        })
        .await
        .map_err(|status| CliError::rpc(format!("checkpoint of container {}", args.container), status))?
        .into_inner();
    println!("{}", created.id);
    Ok(())
}
