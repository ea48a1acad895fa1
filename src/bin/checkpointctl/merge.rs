//! `checkpointctl merge`: squash a container's checkpoint chains into
//! fewer checkpoints. Every checkpoint a rule retains (and the newest of
//! each chain) stays restorable; the others are folded into their
//! children. Rules not given on the command line come from `automerge` of
//! the config file.

use seamless_snapshotter::proto::MergeCheckpointsRequest;

use crate::checkpoints::human_size;
use crate::settings::AutomergeSettings;
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Container id.
    container: String,
    /// time-based: the newest of each of the last N days/hours; incremental:
    /// one checkpoint per chain; tagged: labelled checkpoints stay.
    #[arg(short = 's', long, value_parser = ["time-based", "incremental", "tagged"])]
    strategy: Option<String>,
    /// Keep the newest checkpoint of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest checkpoint of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// Checkpoints with any of these labels stay (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "LABELS")]
    retain_labels: Vec<String>,
    /// Also split large files into content-defined chunks, each stored once
    /// across checkpoints and files (versions of a file share what did not
    /// change).
    #[arg(long)]
    aggressive: bool,
    /// Print the plan, change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(context: &Context, automerge: &AutomergeSettings, args: Args) -> Result<(), CliError> {
    let strategy = args
        .strategy
        .or_else(|| automerge.strategy.clone())
        .unwrap_or_else(|| "time-based".into());
    let keep_daily = args.keep_daily.or(automerge.keep_daily);
    let keep_hourly = args.keep_hourly.or(automerge.keep_hourly);
    let mut client = daemon::connect(&context.address).await?;
    let plan = client
        .merge_checkpoints(MergeCheckpointsRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            container: args.container.clone(),
            strategy,
            keep_daily: keep_daily.unwrap_or(0),
            has_keep_daily: keep_daily.is_some(),
            keep_hourly: keep_hourly.unwrap_or(0),
            has_keep_hourly: keep_hourly.is_some(),
            retain_labels: args.retain_labels,
            aggressive: args.aggressive || automerge.aggressive,
            dry_run: args.dry_run,
        })
        .await
        .map_err(|status| CliError::rpc(format!("merge of container {}", args.container), status))?
        .into_inner();
    let would = if plan.dry_run { "would " } else { "" };
    for kept in &plan.kept {
        println!("keep {kept}");
    }
    for id in &plan.merged {
        println!("{would}merge {id} into its child");
    }
    for id in &plan.rebased {
        println!("{would}rebase {id}");
    }
    println!(
        "{} checkpoints {}merged, {} kept, {}free {}",
        plan.merged.len(),
        if plan.dry_run { "would be " } else { "" },
        plan.kept.len(),
        if plan.dry_run { "would " } else { "" },
        human_size(plan.freed_bytes)
    );
    Ok(())
}
