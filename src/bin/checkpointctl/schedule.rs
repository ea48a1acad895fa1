//! `checkpointctl schedule ls|rm`: the recurring checkpoints that
//! `create --interval` registers with the daemon (which keeps them across
//! restarts and takes each checkpoint on the previous one).

use std::time::{Duration, UNIX_EPOCH};

use seamless_snapshotter::proto::{ListSchedulesRequest, MergeRules, RemoveScheduleRequest, Schedule};
use seamless_snapshotter::time::rfc3339;

use crate::checkpoints::to_json;
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List the recurring checkpoints of the namespace.
    Ls {
        /// Output format.
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Stop a recurring checkpoint (its checkpoints stay).
    Rm {
        /// Schedule id, as `schedule ls` prints it.
        id: String,
    },
}

#[derive(serde::Serialize)]
struct View {
    id: String,
    container: String,
    interval_secs: u64,
    labels: Vec<String>,
    last_run: String,
    next_run: String,
    last_checkpoint: Option<String>,
    last_error: Option<String>,
    runs: u64,
    failures: u64,
    /// What is merged after each run, e.g. `time-based keep_daily=7`.
    automerge: Option<String>,
}

/// Merge rules in one word group: the strategy, then what it keeps.
fn rules_text(r: &MergeRules) -> String {
    let mut text = r.strategy.clone();
    if r.has_keep_daily {
        text += &format!(" keep_daily={}", r.keep_daily);
    }
    if r.has_keep_hourly {
        text += &format!(" keep_hourly={}", r.keep_hourly);
    }
    if !r.retain_labels.is_empty() {
        text += &format!(" retain={}", r.retain_labels.join(","));
    }
    if r.aggressive {
        text += " aggressive";
    }
    text
}

fn at(unix: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64))
}

fn view(s: &Schedule) -> View {
    View {
        id: s.id.clone(),
        container: s.container.clone(),
        interval_secs: s.interval_secs,
        labels: s.labels.clone(),
        last_run: at(s.last_run_unix),
        next_run: at(s.last_run_unix + s.interval_secs as i64),
        last_checkpoint: Some(s.last_checkpoint.clone()).filter(|c| !c.is_empty()),
        last_error: Some(s.last_error.clone()).filter(|e| !e.is_empty()),
        runs: s.runs,
        failures: s.failures,
        automerge: s.automerge.as_ref().map(rules_text),
    }
}

pub async fn run(context: &Context, args: Args) -> Result<(), CliError> {
    let mut client = daemon::connect(&context.address).await?;
    match args.command {
        Command::Ls { output } => {
            let schedules = client
                .list_schedules(ListSchedulesRequest {
                    namespace: context.namespace.clone(),
                })
                .await
                .map_err(|status| CliError::rpc("list schedules", status))?
                .into_inner()
                .schedules;
            let views: Vec<View> = schedules.iter().map(view).collect();
            if output == "json" {
                println!("{}", to_json(&views));
                return Ok(());
            }
            println!(
                "{:<24}  {:<16}  {:>9}  {:<20}  {:<24}  {:>5}  {:<24}  LAST ERROR",
                "ID", "CONTAINER", "INTERVAL", "NEXT RUN", "LAST CHECKPOINT", "RUNS", "AUTOMERGE"
            );
            for v in views {
                println!(
                    "{:<24}  {:<16}  {:>8}s  {:<20}  {:<24}  {:>5}  {:<24}  {}",
                    v.id,
                    v.container,
                    v.interval_secs,
                    v.next_run,
                    v.last_checkpoint.unwrap_or_else(|| "-".into()),
                    v.runs,
                    v.automerge.unwrap_or_else(|| "-".into()),
                    v.last_error.unwrap_or_default()
                );
            }
        }
        Command::Rm { id } => {
            client
                .remove_schedule(RemoveScheduleRequest {
                    namespace: context.namespace.clone(),
                    id: id.trim().to_string(),
                })
                .await
                .map_err(|status| CliError::rpc(format!("schedule {id}"), status))?;
            println!("removed {id}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedules_automerge_is_shown_in_one_word_group() {
        let rules = MergeRules {
            strategy: "time-based".into(),
            keep_daily: 7,
            has_keep_daily: true,
            retain_labels: vec!["golden".into()],
            ..Default::default()
        };
        assert_eq!(rules_text(&rules), "time-based keep_daily=7 retain=golden");
        let schedule = Schedule {
            automerge: Some(rules),
            ..Default::default()
        };
        assert_eq!(
            view(&schedule).automerge.as_deref(),
            Some("time-based keep_daily=7 retain=golden")
        );
        assert_eq!(view(&Schedule::default()).automerge, None);
    }
}
