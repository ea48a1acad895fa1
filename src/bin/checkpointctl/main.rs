//! checkpointctl: the command-line client of the daemon's control API
//! (proto/seamless/v1/control.proto).
//!
//! One file per subcommand; this file owns the global options, the dispatch,
//! the error type and the only mapping from errors to exit codes. It must not
//! hold subcommand logic.

mod automanage;
mod checkpoints;
mod create;
mod daemon;
mod image;
mod import;
mod info;
mod list;
mod merge;
mod mounts;
mod policy;
mod prune;
mod restore;
mod resume;
mod schedule;
mod seamless_commit;
mod settings;
mod version;

use seamless_snapshotter::api::codes;
use seamless_snapshotter::time::rfc3339;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};
use tonic::Code;

#[derive(Debug, Parser)]
#[command(
    name = "checkpointctl",
    version,
    about = "commit running containers through containerd-seamless-grpc"
)]
struct Cli {
    /// Unix socket of containerd-seamless-grpc (an extension of nydusify's
    /// flags when run as nydusify).
    #[arg(
        long,
        global = true,
        env = "CHECKPOINTCTL_ADDRESS",
        default_value = "/run/containerd-seamless/containerd-seamless-grpc.sock"
    )]
    address: PathBuf,
    /// containerd namespace of the container.
    #[arg(long, global = true, env = "CONTAINERD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Configuration file (YAML) [default: ~/.checkpointctl.yaml].
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// How much checkpointctl says on stderr.
    #[arg(long, global = true, value_parser = settings::LOG_LEVELS)]
    log_level: Option<String>,
    /// Where checkpoints are stored (overrides storage.backend of the config).
    #[arg(long, global = true, value_parser = settings::BACKENDS)]
    storage_backend: Option<String>,
    /// CRIU binary for process-state checkpoints (overrides criu_path).
    #[arg(long, global = true)]
    criu_path: Option<PathBuf>,
    /// Whose containers `create` checkpoints and `import` of a directory
    /// reads: containerd's, or Docker Engine's (overrides `engine` of the
    /// config file). Restore follows the checkpoint's own engine.
    #[arg(long, global = true, value_parser = ["containerd", "docker"])]
    engine: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capture a running container's writable layer and build and push an image from it.
    SeamlessCommit(Box<seamless_commit::Invocation>),
    /// Checkpoint a running container: its filesystem (a pause of milliseconds) and its processes.
    Create(create::Args),
    /// List checkpoints, oldest first.
    List(list::Args),
    /// Show a checkpoint; compare it with another, verify its data, or export it as an OCI archive.
    Info(info::Args),
    /// Create a new container from a checkpoint, here or on another node.
    Restore(restore::Args),
    /// Let a container that restore left paused run.
    Resume(resume::Args),
    /// Recreate the checkpoints of an archive that `info --export` wrote.
    Import(import::Args),
    /// Delete a container's checkpoints that no rule keeps.
    Prune(prune::Args),
    /// Squash a container's checkpoint chains, keeping what rules retain restorable.
    Merge(merge::Args),
    /// List or stop the recurring checkpoints `create --interval` registers.
    Schedule(schedule::Args),
    /// Checkpoint containers when CPU or memory crosses a threshold or an
    /// interval is due, then merge and prune, as a policy file says.
    Automanage(automanage::Args),
    /// List the daemon's mounts of Nydus images: how each is served, by
    /// which process, for which snapshots, and the cache its image uses.
    Mounts(mounts::Args),
    /// Pull images into containerd, unpacked on a snapshotter with the
    /// layer labels CRI passes (Nydus images included); no daemon call.
    Image(image::Args),
    /// Print the daemon's version, storage and root.
    Version,
}

/// What every checkpoint subcommand needs: the daemon, the namespace and
/// the storage (flags over the config file).
pub struct Context {
    pub address: PathBuf,
    pub namespace: String,
    pub storage: seamless_snapshotter::proto::Storage,
    /// `--criu-path`, else the config's `criu_path`: sent with each
    /// process-state request; the daemon runs it only if its config allows.
    pub criu_path: Option<String>,
    /// `--engine`, else the config's `engine`: "containerd" or "docker".
    pub engine: String,
}

/// Everything that can fail after the arguments parsed. Each variant names
/// what failed; `exit_code` is the only place that turns one into a status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the daemon at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    // Boxed: a Status is large and this error travels up every call.
    #[error("{action}: {}", status.message())]
    Rpc { action: String, status: Box<tonic::Status> },
    /// The reference's own line: `background commit processing failed: `
    /// and the reason, then which job and its code.
    #[error("background commit processing failed: {reason} (snapshot {snapshot_id}, {code})")]
    JobFailed {
        snapshot_id: String,
        code: String,
        /// "network" when a registry could not be reached or timed out.
        cause: String,
        reason: String,
    },
    #[error("timed out after {waited} waiting for snapshot {snapshot_id}, job still {state}")]
    WaitTimeout {
        snapshot_id: String,
        waited: String,
        state: String,
    },
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    /// A usage error found after parsing (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// Something checked and found wrong, already reported (exit code 1).
    #[error("{0}")]
    Failed(String),
    #[error("pull: {0}")]
    Pull(#[from] seamless_snapshotter::oci::pull::PullError),
}

impl CliError {
    /// A call the daemon answered with an error.
    pub fn rpc(action: impl Into<String>, status: tonic::Status) -> CliError {
        CliError::Rpc {
            action: action.into(),
            status: Box::new(status),
        }
    }
}

/// The name under which checkpointctl answers as the seamless-commit
/// reference's CLI (`nydusify seamless-commit ...`, `nydusify version`),
/// through a link of that name.
const NYDUSIFY: &str = "nydusify";

/// The command line, parsed as checkpointctl's, or as nydusify's when run
/// under that name: then only `seamless-commit` and `version` are served.
fn parse_cli(args: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let invoked = args
        .first()
        .and_then(|arg0| std::path::Path::new(arg0).file_name())
        .is_some_and(|name| name == NYDUSIFY);
    if !invoked {
        return Cli::try_parse_from(args);
    }
    let mut command = Cli::command()
        .name(NYDUSIFY)
        .bin_name(NYDUSIFY)
        .about("nydusify's seamless-commit and version, served by checkpointctl through containerd-seamless-grpc");
    let matches = command.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::SeamlessCommit(_) | Command::Version => Ok(cli),
        _ => Err(command.error(
            clap::error::ErrorKind::InvalidSubcommand,
            "as nydusify, only `seamless-commit` and `version` are served; run checkpointctl for the rest",
        )),
    }
}

fn main() -> ExitCode {
    let cli = parse_cli(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", fatal_line(SystemTime::now(), &e.to_string()));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    // Detaching starts a new process: before any runtime exists.
    if let Command::Automanage(args) = &cli.command {
        if automanage::should_detach(args) {
            return automanage::detach(args);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let (config, required) = match &cli.config {
        Some(path) => (Some(path.clone()), true),
        None => (settings::default_path(), false),
    };
    let settings = match &config {
        Some(path) => settings::Settings::load(path, required)?,
        None => settings::Settings::default(),
    };
    // automanage's decisions are its output: logged at info.
    let default_level = match cli.command {
        Command::Automanage(_) => "info",
        _ => "warn",
    };
    init_logging(
        cli.log_level
            .as_deref()
            .or(settings.logging.level.as_deref())
            .unwrap_or(default_level),
    );
    let context = Context {
        address: cli.address.clone(),
        namespace: cli.namespace.clone(),
        storage: settings.storage(cli.storage_backend.as_deref()),
        criu_path: settings.criu_path(cli.criu_path.as_deref())?,
        engine: cli
            .engine
            .clone()
            .or_else(|| settings.engine.clone())
            .unwrap_or_else(|| "containerd".into()),
    };
    runtime.block_on(async {
        match cli.command {
            Command::SeamlessCommit(args) => seamless_commit::run(&cli.address, &cli.namespace, *args).await,
            Command::Create(args) => create::run(&context, &settings.automerge, args).await,
            Command::List(args) => list::run(&context, args).await,
            Command::Info(args) => info::run(&context, args).await,
            Command::Restore(args) => restore::run(&context, &settings, args).await,
            Command::Resume(args) => resume::run(&context, &settings, args).await,
            Command::Import(args) => import::run(&context, args).await,
            Command::Prune(args) => prune::run(&context, args).await,
            Command::Merge(args) => merge::run(&context, &settings.automerge, args).await,
            Command::Schedule(args) => schedule::run(&context, args).await,
            Command::Automanage(args) => automanage::run(&context, &settings, args).await,
            Command::Mounts(args) => mounts::run(&cli.address, args).await,
            Command::Image(args) => image::run(&cli.namespace, args).await,
            Command::Version => version::run(&cli.address).await,
        }
    })
}

/// Diagnostics on stderr at `level` (debug, info, warn, error); what the
/// commands print for people and scripts goes to stdout regardless.
fn init_logging(level: &str) {
    let level = match level {
        "debug" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "error" => tracing::Level::ERROR,
        _ => tracing::Level::WARN,
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .try_init();
}

/// 0 ok, 1 general, 2 bad arguments, 3 container not found, 4 permission,
/// 5 network. The daemon's error code (typed, in the status details) decides
/// first, then the gRPC code, as the one table in `api::codes` says.
fn exit_code(err: &CliError) -> u8 {
    match err {
        // A socket the user may not open (0660 root) is a permission problem.
        CliError::Unreachable { reason, .. } if reason.contains("Permission denied") => 4,
        CliError::Unreachable { .. } => 5,
        CliError::Rpc { status, .. } => {
            let code = seamless_snapshotter::api::grpc::status::error_code(status);
            codes::exit_status(code.as_deref(), status.code())
        }
        // A registry that cannot be reached or times out is a network error
        // (5), whatever the job's code.
        CliError::JobFailed { cause, .. } if cause == "network" => 5,
        CliError::JobFailed { code, .. } => codes::exit_status(Some(code), Code::Unknown),
        CliError::Pull(e) if e.is_permission() => 4,
        CliError::Pull(e) if e.is_network() => 5,
        CliError::Pull(e) => {
            use seamless_snapshotter::error::Classify;
            codes::exit_status(None, codes::kind_grpc(e.kind()))
        }
        CliError::Settings(_) | CliError::Usage(_) => 2,
        CliError::WaitTimeout { .. } | CliError::Runtime(_) | CliError::Failed(_) => 1,
    }
}

/// `FATA[2026-11-23T13:30:00Z] message`, always one line: scripts read the
/// last line of stderr.
fn fatal_line(at: SystemTime, message: &str) -> String {
    let message = message.replace(['\r', '\n'], " ");
    format!("FATA[{}] {message}", rfc3339(at))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn rpc(status: tonic::Status) -> CliError {
        CliError::rpc("seamless commit of container c1", status)
    }

    #[test]
    fn fatal_line_is_timestamped_in_utc_to_the_second() {
        let line = fatal_line(at(1_795_440_600) + Duration::from_millis(999), "no daemon");
        assert_eq!(line, "FATA[2026-11-23T13:30:00Z] no daemon");
    }

    #[test]
    fn fatal_line_stays_on_one_line() {
        assert_eq!(fatal_line(at(0), "a\nb\r\nc"), "FATA[1970-01-01T00:00:00Z] a b  c");
    }

    #[test]
    fn timestamps_cross_leap_days_and_centuries() {
        assert_eq!(rfc3339(at(951_868_799)), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339(at(951_868_800)), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339(at(4_107_542_400)), "2100-03-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00Z");
    }

    /// A status as the daemon sends a commit error: the code typed in the
    /// details and leading the message.
    fn coded(grpc: Code, code: &str, reason: &str) -> tonic::Status {
        use prost::Message as _;
        let detail = seamless_snapshotter::proto::ErrorDetail { code: code.into() };
        tonic::Status::with_details(grpc, format!("{code}: {reason}"), detail.encode_to_vec().into())
    }

    #[test]
    fn commit_error_codes_decide_before_grpc_codes() {
        let cases = [
            (
                coded(Code::FailedPrecondition, "INVALID_PARAMETER", "target is empty"),
                2,
            ),
            (coded(Code::Unknown, "CONTAINER_NOT_FOUND", "no container c1"), 3),
            (coded(Code::Internal, "PERMISSION_DENIED", "cannot freeze c1"), 4),
            (coded(Code::Unavailable, "INTERNAL_ERROR", "registry unreachable"), 5),
            (
                coded(Code::FailedPrecondition, "CONTAINER_NOT_RUNNING", "c1 is stopped"),
                1,
            ),
            (
                coded(Code::Internal, "SNAPSHOT_IN_PROGRESS", "c1 is being committed"),
                1,
            ),
            // The code is read from the details, never parsed out of a message.
            (tonic::Status::internal("PERMISSION_DENIED: looks like a code"), 1),
        ];
        for (status, code) in cases {
            assert_eq!(exit_code(&rpc(status.clone())), code, "{status:?}");
        }
    }

    #[test]
    fn grpc_codes_decide_without_a_known_commit_code() {
        let cases = [
            (tonic::Status::invalid_argument("bad request"), 2),
            (tonic::Status::not_found("no such snapshot"), 3),
            (tonic::Status::permission_denied("denied"), 4),
            (tonic::Status::unavailable("connection reset"), 5),
            (tonic::Status::internal("boom"), 1),
            (tonic::Status::unimplemented("GetCommit"), 1),
        ];
        for (status, code) in cases {
            assert_eq!(exit_code(&rpc(status.clone())), code, "{status:?}");
        }
    }

    #[test]
    fn local_failures_have_their_own_codes() {
        let unreachable = CliError::Unreachable {
            address: "/run/x.sock".into(),
            reason: "No such file or directory (os error 2)".into(),
        };
        assert_eq!(exit_code(&unreachable), 5);
        let denied = CliError::Unreachable {
            address: "/run/x.sock".into(),
            reason: "Permission denied (os error 13)".into(),
        };
        assert_eq!(exit_code(&denied), 4);
        assert_eq!(
            unreachable.to_string(),
            "cannot reach the daemon at /run/x.sock: No such file or directory (os error 2)"
        );
        let failed = |code: &str, cause: &str| CliError::JobFailed {
            snapshot_id: "s1".into(),
            code: code.into(),
            cause: cause.into(),
            reason: "r".into(),
        };
        assert_eq!(exit_code(&failed("PERMISSION_DENIED", "")), 4);
        assert_eq!(exit_code(&failed("BACKGROUND_PROCESSING_FAILED", "")), 1);
        assert_eq!(
            exit_code(&failed("BACKGROUND_PROCESSING_FAILED", "network")),
            5,
            "a registry that cannot be reached"
        );
        assert!(
            fatal_line(at(0), &failed("BACKGROUND_PROCESSING_FAILED", "").to_string())
                .starts_with("FATA[1970-01-01T00:00:00Z] background commit processing failed: r"),
            "the reference's line"
        );
        let timeout = CliError::WaitTimeout {
            snapshot_id: "s1".into(),
            waited: "30m".into(),
            state: "processing".into(),
        };
        assert_eq!(exit_code(&timeout), 1);
    }

    #[test]
    fn pull_failures_exit_by_what_refused() {
        use seamless_snapshotter::oci::pull::PullError;
        use seamless_snapshotter::oci::registry::RegistryError;
        let denied = PullError::Registry(RegistryError::Denied {
            object: "manifest r".into(),
            message: "unauthorized".into(),
        });
        assert_eq!(exit_code(&CliError::Pull(denied)), 4);
        let bad = PullError::InvalidImage {
            reference: "r".into(),
            message: "the manifest has 2 layers, its config 1 diff ids".into(),
        };
        assert_eq!(exit_code(&CliError::Pull(bad)), 2);
        let containerd = PullError::Containerd(seamless_snapshotter::host::containerd::ContainerdError::Unreachable {
            address: "/run/containerd/containerd.sock".into(),
            message: "no such file".into(),
        });
        assert_eq!(exit_code(&CliError::Pull(containerd)), 5);
    }

    #[test]
    fn rpc_errors_show_the_daemon_message_not_the_status_debug() {
        let err = rpc(tonic::Status::not_found("CONTAINER_NOT_FOUND: no container c1"));
        assert_eq!(
            err.to_string(),
            "seamless commit of container c1: CONTAINER_NOT_FOUND: no container c1"
        );
    }

    #[test]
    fn usage_errors_exit_2() {
        let err = Cli::try_parse_from(["checkpointctl", "seamless-commit", "--target", "r/x:1"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn restore_takes_ids_as_jq_prints_them() {
        let cli = Cli::try_parse_from(["checkpointctl", "restore", "\"cp-20261201-101112\"", "-t", "b"]).unwrap();
        let Command::Restore(_) = cli.command else {
            panic!("{:?} is not restore", cli.command);
        };
        let err = Cli::try_parse_from(["checkpointctl", "restore"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn global_options_have_defaults() {
        let cli = Cli::try_parse_from(["checkpointctl", "version"]).unwrap();
        assert_eq!(cli.namespace, "default");
        assert_eq!(
            cli.address,
            PathBuf::from("/run/containerd-seamless/containerd-seamless-grpc.sock")
        );
    }

    #[test]
    fn as_nydusify_only_seamless_commit_and_version_are_served() {
        let args = |line: &[&str]| line.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let cli = parse_cli(args(&[
            "/usr/local/bin/nydusify",
            "seamless-commit",
            "--container",
            "mycontainer",
            "--target",
            "registry.example.com/myimage:snapshot",
            "--wait",
            "--address",
            "/run/x.sock",
        ]))
        .unwrap();
        assert!(matches!(cli.command, Command::SeamlessCommit(_)));
        assert_eq!(
            cli.address,
            PathBuf::from("/run/x.sock"),
            "global flags stay, as extensions"
        );
        assert!(matches!(
            parse_cli(args(&["nydusify", "version"])).unwrap().command,
            Command::Version
        ));
        let refused = parse_cli(args(&["nydusify", "list"])).unwrap_err();
        assert!(
            refused.to_string().contains("only `seamless-commit` and `version`"),
            "{refused}"
        );
        assert_eq!(refused.exit_code(), 2);
        // Under its own name every command is served.
        assert!(matches!(
            parse_cli(args(&["checkpointctl", "list"])).unwrap().command,
            Command::List(_)
        ));
    }
}
