//! `checkpointctl info`: one checkpoint; with `--metadata` everything
//! stored about it (JSON), `--diff` its difference from another, `--verify`
//! every blob it needs re-hashed (exit 1 naming each one that fails),
//! `--export` its chain written as an OCI image archive.

use std::path::PathBuf;

use seamless_snapshotter::proto::{ExportCheckpointRequest, InspectCheckpointRequest};

use crate::checkpoints::{checkpoint_id, created, human_size, labels_text, new_file_path, to_json, View};
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint id (JSON quotes are fine).
    id: String,
    /// Print everything stored about the checkpoint, as JSON.
    #[arg(long)]
    metadata: bool,
    /// Files added, changed and removed since OTHER_ID, and the size delta.
    #[arg(long, value_name = "OTHER_ID")]
    diff: Option<String>,
    /// Re-hash every blob against its digest.
    #[arg(long)]
    verify: bool,
    /// Write the checkpoint and its chain as an OCI image archive (a tar
    /// file, 0600, one layer per checkpoint) that `ctr images import`,
    /// `skopeo` and `checkpointctl import` read. The daemon writes it:
    /// PATH is on the daemon's host and its directory must exist.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["metadata", "diff", "verify"])]
    export: Option<PathBuf>,
    /// With --export: replace a regular file already at PATH (atomically).
    #[arg(long, requires = "export")]
    force: bool,
}

pub async fn run(context: &Context, args: Args) -> Result<(), CliError> {
    let id = checkpoint_id(&args.id)?;
    if let Some(path) = &args.export {
        return export(context, &id, path, args.force).await;
    }
    let other = args.diff.as_deref().map(checkpoint_id).transpose()?;
    let mut client = daemon::connect(&context.address).await?;
    let found = client
        .inspect_checkpoint(InspectCheckpointRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            id: id.clone(),
            diff_with: other.clone().unwrap_or_default(),
            verify: args.verify,
        })
        .await
        .map_err(|status| CliError::rpc(format!("checkpoint {id}"), status))?
        .into_inner();
    let c = found.checkpoint.unwrap_or_default();
    if args.metadata {
        #[derive(serde::Serialize)]
        struct Metadata<'a> {
            #[serde(flatten)]
            view: View,
            chain: &'a [String],
            blobs: u64,
        }
        let metadata = Metadata {
            view: View::of(&c),
            chain: &found.chain,
            blobs: found.blobs,
        };
        println!("{}", to_json(&metadata));
    } else if other.is_none() && !args.verify {
        let rows = [
            ("ID", c.id.clone()),
            ("Container", format!("{}/{}", c.namespace, c.container)),
            ("Image", c.image.clone()),
            ("Created", created(&c)),
            (
                "Parent",
                if c.parent.is_empty() {
                    "-".into()
                } else {
                    c.parent.clone()
                },
            ),
            ("Chain", found.chain.join(" -> ")),
            ("Size", human_size(c.size)),
            ("Content", human_size(c.content_size)),
            (
                "Entries",
                format!("{} set, {} removed", c.changed_entries, c.removed_entries),
            ),
            ("Labels", labels_text(&c)),
            ("Compression", c.compression.clone()),
            ("Pause", format!("{:.2} ms", c.pause_time_ns as f64 / 1e6)),
            ("Status", c.status.clone()),
        ];
        for (key, value) in rows {
            println!("{:<13}{value}", format!("{key}:"));
        }
    }
    if let (Some(other), Some(diff)) = (&other, &found.diff) {
        for (mark, paths) in [("A", &diff.added), ("M", &diff.changed), ("D", &diff.removed)] {
            for path in paths {
                println!("{mark} /{path}");
            }
        }
        let sign = if diff.size_delta < 0 { "-" } else { "+" };
        println!(
            "{} added, {} changed, {} removed since {other}; size {sign}{}",
            diff.added.len(),
            diff.changed.len(),
            diff.removed.len(),
            human_size(diff.size_delta.unsigned_abs())
        );
    }
    if let Some(verification) = &found.verification {
        if !verification.failures.is_empty() {
            for failure in &verification.failures {
                eprintln!("MISMATCH {failure}");
            }
            return Err(CliError::Failed(format!(
                "checkpoint {id}: {} of {} objects do not match their digest: {}",
                verification.failures.len(),
                verification.checked,
                verification.failures.join("; ")
            )));
        }
        println!("checkpoint {id}: {} objects verified", verification.checked);
    }
    Ok(())
}

async fn export(context: &Context, id: &str, path: &std::path::Path, force: bool) -> Result<(), CliError> {
    let path = new_file_path(path)?;
    let mut client = daemon::connect(&context.address).await?;
    let exported = client
        .export_checkpoint(ExportCheckpointRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            id: id.to_string(),
            path: path.display().to_string(),
            overwrite: force,
        })
        .await
        .map_err(|status| CliError::rpc(format!("export of checkpoint {id} to {}", path.display()), status))?
        .into_inner();
    let rows = [
        ("Archive", format!("{} ({})", exported.path, human_size(exported.bytes))),
        ("Layers", exported.layers.join(" -> ")),
        ("Image", exported.reference),
        ("Manifest", exported.manifest_digest),
    ];
    for (key, value) in rows {
        println!("{:<13}{value}", format!("{key}:"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Info {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn export_stands_alone_and_force_needs_it() {
        let parsed = Info::try_parse_from(["info", "cp-20261201-101112", "--export", "x.tar", "--force"]).unwrap();
        assert_eq!(parsed.args.export.as_deref(), Some(std::path::Path::new("x.tar")));
        assert!(parsed.args.force);
        for bad in [
            &["info", "cp-20261201-101112", "--force"][..],
            &["info", "cp-20261201-101112", "--export", "x.tar", "--verify"],
            &[
                "info",
                "cp-20261201-101112",
                "--export",
                "x.tar",
                "--diff",
                "cp-20261201-101000",
            ],
        ] {
            let err = Info::try_parse_from(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }
}
