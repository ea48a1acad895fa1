//! `checkpointctl prune`: delete a container's checkpoints that no rule
//! keeps. A removed checkpoint with a kept child is folded into it first,
//! so every kept checkpoint stays restorable.

use seamless_snapshotter::checkpoint::filter::parse_size;
use seamless_snapshotter::proto::PruneCheckpointsRequest;

use crate::checkpoints::human_size;
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Container id.
    container: String,
    /// Keep the newest N checkpoints.
    #[arg(long, value_name = "N")]
    keep_latest: Option<u32>,
    /// Keep checkpoints made within the last N days.
    #[arg(long, value_name = "N")]
    keep_days: Option<u32>,
    /// Keep checkpoints with any of these labels (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "LABELS")]
    exclude_labels: Vec<String>,
    /// Delete the oldest until the storage holds at most SIZE (e.g. 10GB).
    #[arg(long, value_name = "SIZE")]
    max_storage: Option<String>,
    /// Delete checkpoints whose parent is gone.
    #[arg(long)]
    prune_dangling: bool,
    /// Print what would go, change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(context: &Context, args: Args) -> Result<(), CliError> {
    let max_storage = args
        .max_storage
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(|reason| CliError::Usage(format!("--max-storage: {reason}")))?;
    let mut client = daemon::connect(&context.address).await?;
    let plan = client
        .prune_checkpoints(PruneCheckpointsRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            container: args.container.clone(),
            keep_latest: args.keep_latest.unwrap_or(0),
            has_keep_latest: args.keep_latest.is_some(),
            keep_days: args.keep_days.unwrap_or(0),
            has_keep_days: args.keep_days.is_some(),
            exclude_labels: args.exclude_labels,
            max_storage: max_storage.unwrap_or(0),
            has_max_storage: max_storage.is_some(),
            prune_dangling: args.prune_dangling,
            dry_run: args.dry_run,
        })
        .await
        .map_err(|status| CliError::rpc(format!("prune of container {}", args.container), status))?
        .into_inner();
    let (remove, fold) = if plan.dry_run {
        ("would remove", "would fold its removed parent into")
    } else {
        ("removed", "folded its removed parent into")
    };
    for id in &plan.removed {
        println!("{remove} {id}");
    }
    for id in &plan.folded {
        println!("{fold} {id}");
    }
    if plan.dry_run {
        println!(
            "{} checkpoints would be removed, {} would be freed",
            plan.removed.len(),
            human_size(plan.freed_bytes)
        );
    } else {
        println!(
            "{} checkpoints removed, {} freed",
            plan.removed.len(),
            human_size(plan.freed_bytes)
        );
    }
    Ok(())
}
