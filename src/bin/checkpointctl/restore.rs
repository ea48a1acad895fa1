//! `checkpointctl restore`: a new container from a checkpoint, made by the
//! daemon of this host or, with `--target-node`, of a node of the config
//! file (which must then read the same shared storage). Prints what was
//! restored and each check; exit 1 when a check failed.

use serde::Serialize;

use seamless_snapshotter::checkpoint::remap::Remap;
use seamless_snapshotter::proto::{RestoreCheckpointRequest, RestoreCheckpointResponse};

use crate::checkpoints::{checkpoint_id, to_json, to_yaml};
use crate::settings::{NodeSettings, Settings};
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint id (JSON quotes are fine: `jq '.[-1].id' | xargs checkpointctl restore`).
    #[arg(value_name = "CHECKPOINT_ID")]
    id: String,
    /// Id of the new container [default: <original>-restored].
    #[arg(long)]
    name: Option<String>,
    /// Restore the processes running; otherwise they are restored paused.
    #[arg(long)]
    resume: bool,
    /// Blobs fetched, verified and unpacked at a time.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel: u32,
    /// Check the restored container afterwards (status, process, API, logs, stats).
    #[arg(long)]
    validate: bool,
    /// Restore on this node of the config file's `nodes:` (its daemon reads
    /// the same storage, which must be s3 or nfs).
    #[arg(short = 't', long, value_name = "NODE")]
    target_node: Option<String>,
    /// Move addresses of SRC_CIDR into DST_CIDR, as SRC_CIDR:DST_CIDR,
    /// SRC_CIDR->DST_CIDR or SRC_CIDR→DST_CIDR (IPv4, one prefix length;
    /// repeatable).
    #[arg(long = "network-remap", value_name = "SPEC", value_parser = Remap::parse)]
    network_remaps: Vec<Remap>,
    /// Apply the checkpoint's container record as it is even when no key
    /// the daemon trusts sealed it (an archive or storage from elsewhere):
    /// its hooks, capabilities, host mounts and namespaces then run as
    /// root on the node. Only for records you trust yourself.
    #[arg(long)]
    trust_record: bool,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json", "yaml"])]
    output: String,
}

pub async fn run(context: &Context, settings: &Settings, args: Args) -> Result<(), CliError> {
    let id = checkpoint_id(&args.id)?;
    let node = match args.target_node.as_deref() {
        Some(name) => Some((name, settings.node(name)?)),
        None => None,
    };
    if let (true, Some((name, node))) = (needs_sending(context, args.target_node.as_deref()), node) {
        let sent = send_checkpoint(context, &id, name, node).await?;
        if sent > 0 && args.output == "text" {
            println!("sent checkpoint {id} to node {name} ({sent} bytes)");
        }
    }
    // The daemon that restores: the global --address, or the node's, which
    // reads the same storage or has just been sent the checkpoint.
    let mut client = match node {
        Some((_, node)) => daemon::connect_node(node).await?,
        None => daemon::connect(&context.address).await?,
    };
    let restored = client
        .restore_checkpoint(RestoreCheckpointRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            id: id.clone(),
            name: args.name.clone().unwrap_or_default(),
            resume: args.resume,
            parallel: args.parallel,
            validate: args.validate,
            network_remap: args.network_remaps.iter().map(ToString::to_string).collect(),
            trust_record: args.trust_record,
            criu_path: context.criu_path.clone().unwrap_or_default(),
        })
        .await
        .map_err(|status| CliError::rpc(restore_action(&id, args.target_node.as_deref()), status))?
        .into_inner();
    let view = View::of(&id, args.target_node.as_deref(), &restored);
    match args.output.as_str() {
        "json" => println!("{}", to_json(&view)),
        "yaml" => print!("{}", to_yaml(&view)),
        _ => print!("{}", render_text(&id, &restored)),
    }
    failed_checks(&restored)
}

fn restore_action(id: &str, node: Option<&str>) -> String {
    match node {
        Some(node) => format!("restore of checkpoint {id} on node {node}"),
        None => format!("restore of checkpoint {id}"),
    }
}

/// Whether the checkpoint must be sent to the node: its storage is this
/// daemon's own (local), which the node's daemon cannot read.
fn needs_sending(context: &Context, node: Option<&str>) -> bool {
    node.is_some() && matches!(context.storage.backend.as_str(), "" | "local")
}

/// Streams checkpoint `id` (its chain, process state included) from the
/// daemon of --address into the local storage of `node`'s daemon; one the
/// node already holds is left as it is. Returns the bytes sent.
async fn send_checkpoint(context: &Context, id: &str, node: &str, target: &NodeSettings) -> Result<u64, CliError> {
    use seamless_snapshotter::proto::{ReceiveCheckpointRequest, SendCheckpointRequest};
    let action = || format!("sending checkpoint {id} to node {node}");
    let mut source = daemon::connect(&context.address).await?;
    let mut chunks = source
        .send_checkpoint(SendCheckpointRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            id: id.to_string(),
        })
        .await
        .map_err(|status| CliError::rpc(action(), status))?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (storage, namespace) = (context.storage.clone(), context.namespace.clone());
    let pump = tokio::spawn(async move {
        let mut first = true;
        let mut sent = 0u64;
        while let Some(chunk) = chunks.message().await? {
            sent += chunk.data.len() as u64;
            let message = ReceiveCheckpointRequest {
                storage: first.then(|| storage.clone()),
                namespace: if first { namespace.clone() } else { String::new() },
                data: chunk.data,
            };
            first = false;
            if tx.send(message).await.is_err() {
                break;
            }
        }
        Ok::<u64, tonic::Status>(sent)
    });
    let mut receiver = daemon::connect_node(target).await?;
    let received = receiver
        .receive_checkpoint(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let sent = pump
        .await
        .map_err(|e| CliError::Failed(format!("{}: {e}", action())))?
        .map_err(|status| CliError::rpc(action(), status))?;
    match received {
        Ok(_) => Ok(sent),
        // Sent before: the node restores what it holds.
        Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(0),
        Err(status) => Err(CliError::rpc(action(), status)),
    }
}

/// A restore as `-o json|yaml` prints it: the daemon's answer with the
/// checkpoint and the node it was asked of.
#[derive(Debug, Serialize)]
struct View<'a> {
    checkpoint: &'a str,
    /// Null for the daemon of --address.
    node: Option<&'a str>,
    container: &'a str,
    pid: u32,
    status: &'a str,
    process_restored: bool,
    checks: Vec<CheckView<'a>>,
    duration_ns: u64,
    restore_log: &'a str,
    blobs_fetched: u64,
}

#[derive(Debug, Serialize)]
struct CheckView<'a> {
    name: &'a str,
    ok: bool,
    detail: &'a str,
}

impl<'a> View<'a> {
    fn of(checkpoint: &'a str, node: Option<&'a str>, r: &'a RestoreCheckpointResponse) -> View<'a> {
        View {
            checkpoint,
            node,
            container: &r.container,
            pid: r.pid,
            status: &r.status,
            process_restored: r.process_restored,
            checks: r
                .checks
                .iter()
                .map(|c| CheckView {
                    name: &c.name,
                    ok: c.ok,
                    detail: &c.detail,
                })
                .collect(),
            duration_ns: r.duration_ns,
            restore_log: &r.restore_log,
            blobs_fetched: r.blobs_fetched,
        }
    }
}

fn render_text(id: &str, r: &RestoreCheckpointResponse) -> String {
    let mut out = format!(
        "restored {id} as container {} (pid {}, status {}) in {:.2}s\n",
        r.container,
        r.pid,
        r.status,
        r.duration_ns as f64 / 1e9
    );
    for check in &r.checks {
        let mark = if check.ok { "ok" } else { "FAIL" };
        let detail = if check.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", check.detail)
        };
        out.push_str(&format!("  {mark:<4}  {}{detail}\n", check.name));
    }
    if !r.restore_log.is_empty() {
        out.push_str(&format!("restore log: {}\n", r.restore_log));
    }
    out
}

/// Exit 1, once everything is printed, when a check failed.
fn failed_checks(r: &RestoreCheckpointResponse) -> Result<(), CliError> {
    let failed: Vec<&str> = r.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    Err(CliError::Failed(format!(
        "restored container {} failed {} of {} checks: {}",
        r.container,
        failed.len(),
        r.checks.len(),
        failed.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use seamless_snapshotter::proto::{RestoreCheck, Storage};

    #[derive(Debug, Parser)]
    struct Restore {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Restore::try_parse_from([&["restore"], argv].concat()).map(|r| r.args)
    }

    #[test]
    fn bad_network_remaps_are_usage_errors() {
        let err = parse(&["cp-1", "--network-remap", "10.0.0.0/24:10.1.0.0/16"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let ok = parse(&["cp-1", "--network-remap", "10.0.0.0/24->10.1.0.0/24"]).unwrap();
        assert_eq!(ok.network_remaps[0].to_string(), "10.0.0.0/24->10.1.0.0/24");
        // As the reference's table writes it; sent to the daemon as ->.
        let arrow = parse(&["cp-1", "--network-remap", "10.0.0.0/24\u{2192}10.1.0.0/24"]).unwrap();
        assert_eq!(arrow.network_remaps, ok.network_remaps);
        let err = parse(&["cp-1", "--network-remap=10.0.0.0/24\u{2192}10.1.0.0/16"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn arguments_have_defaults_and_bounds() {
        let args = parse(&["cp-1"]).unwrap();
        assert_eq!(args.parallel, 3);
        assert!(args.name.is_none() && !args.resume && !args.validate && args.target_node.is_none());
        assert_eq!(args.output, "text");
        let args = parse(&[
            "\"cp-1\"",
            "--name",
            "web2",
            "--resume",
            "--parallel",
            "64",
            "-t",
            "node-b",
            "--network-remap",
            "10.0.0.0/24:10.1.0.0/24",
            "--network-remap=10.2.0.0/16->10.3.0.0/16",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(checkpoint_id(&args.id).unwrap(), "cp-1");
        assert_eq!(args.parallel, 64);
        assert_eq!(args.target_node.as_deref(), Some("node-b"));
        assert_eq!(args.network_remaps.len(), 2);
        for bad in ["0", "65", "-1", "many"] {
            let err = parse(&["cp-1", "--parallel", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "--parallel {bad}");
        }
        assert_eq!(parse(&[]).unwrap_err().exit_code(), 2);
    }

    fn context(backend: &str) -> Context {
        Context {
            address: "/run/here.sock".into(),
            namespace: "default".into(),
            storage: Storage {
                backend: backend.into(),
                ..Storage::default()
            },
            criu_path: None,
            engine: "containerd".into(),
        }
    }

    #[test]
    fn target_nodes_are_known_and_local_checkpoints_are_sent() {
        let settings = Settings::parse("nodes: {node-b: {address: unix:///run/b.sock}}\n", "t.yaml").unwrap();
        assert!(needs_sending(&context("local"), Some("node-b")));
        assert!(!needs_sending(&context("nfs"), Some("node-b")));
        assert!(!needs_sending(&context("local"), None));
        let err = CliError::from(settings.node("node-c").unwrap_err());
        assert!(matches!(err, CliError::Settings(_)), "{err:?}");
        assert!(err.to_string().contains("defines node-b"), "{err}");
    }

    fn restored(checks: &[(&str, bool, &str)]) -> RestoreCheckpointResponse {
        RestoreCheckpointResponse {
            container: "web-restored".into(),
            pid: 4242,
            status: "running".into(),
            process_restored: true,
            checks: checks
                .iter()
                .map(|(name, ok, detail)| RestoreCheck {
                    name: name.to_string(),
                    ok: *ok,
                    detail: detail.to_string(),
                })
                .collect(),
            duration_ns: 1_234_567_890,
            restore_log: "/var/lib/seamless/restore/web-restored/restore.log".into(),
            blobs_fetched: 7,
        }
    }

    #[test]
    fn text_output_lists_each_check() {
        let r = restored(&[
            ("status", true, "running"),
            ("api", false, "GET / refused"),
            ("logs", true, ""),
        ]);
        assert_eq!(
            render_text("cp-1", &r),
            "\
restored cp-1 as container web-restored (pid 4242, status running) in 1.23s
  ok    status: running
  FAIL  api: GET / refused
  ok    logs
restore log: /var/lib/seamless/restore/web-restored/restore.log
"
        );
        let err = failed_checks(&r).unwrap_err();
        assert!(matches!(err, CliError::Failed(_)));
        assert_eq!(
            err.to_string(),
            "restored container web-restored failed 1 of 3 checks: api"
        );
        assert!(failed_checks(&restored(&[("status", true, "")])).is_ok());
        assert!(failed_checks(&restored(&[])).is_ok());
    }

    #[test]
    fn json_output_keeps_the_response_field_names() {
        let r = restored(&[("status", true, "running")]);
        let json: serde_json::Value = serde_json::from_str(&to_json(&View::of("cp-1", None, &r))).unwrap();
        assert_eq!(json["checkpoint"], "cp-1");
        assert!(json["node"].is_null());
        assert_eq!(json["container"], "web-restored");
        assert_eq!(json["pid"], 4242);
        assert_eq!(json["process_restored"], true);
        assert_eq!(json["checks"][0]["name"], "status");
        assert_eq!(json["checks"][0]["ok"], true);
        assert_eq!(json["duration_ns"], 1_234_567_890u64);
        assert_eq!(json["blobs_fetched"], 7);
    }
}
