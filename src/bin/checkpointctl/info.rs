//! `checkpointctl info`: one checkpoint (with what CRIU reported of its
//! process state, if it has one); with `--metadata` everything stored about
//! it (JSON, CRIU's dump.log included), `--diff` its difference from another,
//! `--verify` every blob it needs re-hashed (exit 1 naming each one that
//! fails), `--export` its chain written as an OCI image archive.

use std::path::PathBuf;

use seamless_snapshotter::proto::{ExportCheckpointRequest, InspectCheckpointRequest, ProcessState};

use crate::checkpoints::{
    checkpoint_id, created, human_size, labels_text, new_file_path, process_state, to_json, View,
};
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint id (JSON quotes are fine).
    id: String,
    /// Print everything stored about the checkpoint, as JSON: its process
    /// state and the last lines of CRIU's dump.log included.
    #[arg(long)]
    metadata: bool,
    /// With --metadata: the whole dump.log, not its last 40 lines.
    #[arg(long, requires = "metadata")]
    full_log: bool,
    /// Files added, changed and removed since OTHER_ID, and the size delta.
    #[arg(long, value_name = "OTHER_ID")]
    diff: Option<String>,
    /// Re-hash every blob against its digest.
    #[arg(long)]
    verify: bool,
    /// Write the checkpoint and its chain as an OCI image archive (a tar
    /// file, 0600, one layer per checkpoint) that `ctr images import`,
    /// `skopeo` and `checkpointctl import` read. The daemon writes it:
    /// PATH is on the daemon's host and its directory must exist. Without
    /// PATH: `<ID>.tar` in the current directory.
    #[arg(
        long,
        value_name = "PATH",
        num_args = 0..=1,
        conflicts_with_all = ["metadata", "diff", "verify"]
    )]
    export: Option<Option<PathBuf>>,
    /// With --export: replace a regular file already at PATH (atomically).
    #[arg(long, requires = "export")]
    force: bool,
}

pub async fn run(context: &Context, args: Args) -> Result<(), CliError> {
    let id = checkpoint_id(&args.id)?;
    if let Some(path) = &args.export {
        return export(context, &id, &export_path(&id, path.as_deref()), args.force).await;
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
            // Fetched from the storage: only when it is printed.
            dump_log: args.metadata,
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
            /// The last DUMP_LOG_LINES lines unless --full-log; null without one.
            dump_log: Option<&'a str>,
        }
        let log = if args.full_log {
            found.dump_log.as_str()
        } else {
            last_lines(&found.dump_log, DUMP_LOG_LINES)
        };
        let metadata = Metadata {
            view: View::of(&c),
            chain: &found.chain,
            blobs: found.blobs,
            dump_log: Some(log).filter(|l| !l.is_empty()),
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
        if let Some(process) = process_state(&c) {
            print!("{}", render_process(process));
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

/// Where `--export` writes: PATH, or `<id>.tar` in the current directory.
fn export_path(id: &str, given: Option<&std::path::Path>) -> PathBuf {
    given.map_or_else(|| PathBuf::from(format!("{id}.tar")), PathBuf::from)
}

/// Lines of dump.log that `--metadata` shows without `--full-log`: CRIU
/// writes the reason of a failure last.
const DUMP_LOG_LINES: usize = 40;

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> &str {
    if n == 0 {
        return "";
    }
    // A final newline ends the last line; it does not start another.
    let body = text.strip_suffix('\n').unwrap_or(text);
    match body.rmatch_indices('\n').nth(n - 1) {
        Some((at, _)) => &text[at + 1..],
        None => text,
    }
}

/// The "Process state" section of the text view.
fn render_process(p: &ProcessState) -> String {
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1e3);
    let on = |set: bool| if set { "yes" } else { "no" };
    let rows = [
        ("CRIU", p.criu_version.clone()),
        (
            "Memory",
            format!(
                "{} (images {}, {} new in storage)",
                human_size(p.memory_bytes),
                human_size(p.images_size),
                human_size(p.stored_bytes)
            ),
        ),
        ("Frozen", ms(p.frozen_time_us)),
        (
            "Dump times",
            format!(
                "freezing {}, memdump {}, memwrite {}",
                ms(p.freezing_time_us),
                ms(p.memdump_time_us),
                ms(p.memwrite_time_us)
            ),
        ),
        (
            "Pages",
            format!(
                "{} scanned, {} written, {} skipped (parent)",
                p.pages_scanned, p.pages_written, p.pages_skipped_parent
            ),
        ),
        (
            "Pre-dump",
            if p.pre_dump {
                format!("yes, {} pages written", p.pre_dump_pages_written)
            } else {
                "no".into()
            },
        ),
        (
            "Options",
            format!(
                "tcp-established={}, file-locks={}, leave-running={}",
                on(p.tcp_established),
                on(p.file_locks),
                on(p.leave_running)
            ),
        ),
        ("Image sets", p.images.len().to_string()),
    ];
    let mut out = String::from("Process state:\n");
    for (key, value) in rows {
        out.push_str(&format!("  {:<13}{value}\n", format!("{key}:")));
    }
    out
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
        assert_eq!(parsed.args.export, Some(Some(PathBuf::from("x.tar"))));
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

    #[test]
    fn export_without_a_path_writes_the_id_dot_tar_here() {
        let id = "cp-20261201-101112";
        for argv in [
            &["info", id, "--export"][..],
            &["info", id, "--export", "--force"],
            &["info", "--export", "--force", id],
        ] {
            let args = Info::try_parse_from(argv).unwrap().args;
            assert_eq!(args.export, Some(None), "{argv:?}");
            assert_eq!(export_path(id, None), PathBuf::from("cp-20261201-101112.tar"));
        }
        let args = Info::try_parse_from(["info", id, "--export=/tmp/x.tar"]).unwrap().args;
        let given = args.export.unwrap();
        assert_eq!(export_path(id, given.as_deref()), PathBuf::from("/tmp/x.tar"));
        // The name is resolved where checkpointctl runs, as the daemon needs it.
        let here = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(
            new_file_path(&export_path(id, None)).unwrap(),
            here.join("cp-20261201-101112.tar")
        );
        assert_eq!(Info::try_parse_from(["info", id]).unwrap().args.export, None);
    }

    #[test]
    fn full_log_needs_metadata() {
        assert!(Info::try_parse_from(["info", "cp-1", "--metadata", "--full-log"]).is_ok());
        let err = Info::try_parse_from(["info", "cp-1", "--full-log"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn dump_logs_are_cut_to_their_last_lines() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a\nb\n", 2), "a\nb\n");
        assert_eq!(last_lines("a\nb\n", 40), "a\nb\n");
        assert_eq!(last_lines("", 40), "");
        assert_eq!(last_lines("a\nb\n", 0), "");
        let long: String = (1..=100).map(|i| format!("({i:02}) line\n")).collect();
        let tail = last_lines(&long, DUMP_LOG_LINES);
        assert_eq!(tail.lines().count(), 40);
        assert!(
            tail.starts_with("(61) line\n") && tail.ends_with("(100) line\n"),
            "{tail}"
        );
    }

    #[test]
    fn the_process_section_reads_like_the_rest() {
        let p = ProcessState {
            frozen_time_us: 41_237,
            freezing_time_us: 1_200,
            memdump_time_us: 30_000,
            memwrite_time_us: 10_037,
            pages_scanned: 1_200,
            pages_written: 300,
            pages_skipped_parent: 900,
            memory_bytes: 512 << 20,
            images_size: 1_536,
            images: vec!["a".into(), "b".into()],
            pre_dump: true,
            pre_dump_pages_written: 850,
            leave_running: true,
            criu_version: "4.1.1".into(),
            ..ProcessState::default()
        };
        assert_eq!(
            render_process(&p),
            "\
Process state:
  CRIU:        4.1.1
  Memory:      512.0 MB (images 1.5 KB, 0 B new in storage)
  Frozen:      41.24 ms
  Dump times:  freezing 1.20 ms, memdump 30.00 ms, memwrite 10.04 ms
  Pages:       1200 scanned, 300 written, 900 skipped (parent)
  Pre-dump:    yes, 850 pages written
  Options:     tcp-established=no, file-locks=no, leave-running=yes
  Image sets:  2
"
        );
    }
}
