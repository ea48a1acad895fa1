//! docker-checkpoint: checkpoint a running Docker Engine container with its
//! processes and its writable layer, or restore one under a new name and
//! verify it, with the Docker checkpoint reference's flags, defaults and
//! storage layout. Standalone: it needs Docker's engine (`DOCKER_HOST`, or
//! /var/run/docker.sock), runc and CRIU, not our daemon. The work is
//! `seamless_snapshotter::docker`'s; this file parses, prints and maps
//! errors to exit statuses.

mod args;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use seamless_snapshotter::api::codes;
use seamless_snapshotter::docker::{self, CheckpointOptions, DockerCheckpointError, RestoreOptions};
use seamless_snapshotter::error::Classify;
use seamless_snapshotter::host::docker::DockerClient;
use seamless_snapshotter::units::human_size;

/// Markers of containers this program froze, so that a run killed while
/// one is frozen is undone by the next.
const STATE_ROOT: &str = "/run/docker-checkpoint";
/// How long runc and CRIU may take.
const CRIU_TIMEOUT: Duration = Duration::from_secs(1800);

fn main() -> ExitCode {
    let args = match args::parse(std::env::args_os()) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let Some(container) = args.container.clone() else {
        eprintln!("docker-checkpoint: -container is required");
        return ExitCode::from(2);
    };
    let engine = match DockerClient::from_env() {
        Ok(engine) => engine,
        Err(e) => return fail(&DockerCheckpointError::from(e)),
    };
    // Interrupts wait until a checkpoint has thawed its container: a
    // signal's default action would leave it frozen. Blocked before any
    // thread starts, so that every thread inherits the mask.
    let blocked = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT]
        .into_iter()
        .collect::<SigSet>();
    if !args.restore {
        let _ = blocked.thread_block();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("docker-checkpoint: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = if args.restore {
        let new_name = args.new_name.clone().unwrap_or_else(|| format!("{container}-restored"));
        runtime.block_on(run_restore(&engine, container, args, new_name))
    } else {
        runtime.block_on(run_checkpoint(&engine, container, args))
    };
    drop(runtime);
    let _ = blocked.thread_unblock();
    code
}

async fn run_checkpoint(engine: &DockerClient, container: String, args: args::Args) -> ExitCode {
    println!("Creating checkpoint {} of container {container}...", args.name);
    let options = CheckpointOptions {
        container,
        name: args.name,
        dir: args.dir,
        leave_running: args.leave_running,
        tcp_established: args.tcp,
        file_locks: args.file_locks,
        pre_dump: args.pre_dump,
        state_root: PathBuf::from(STATE_ROOT),
        criu: None,
        timeout: CRIU_TIMEOUT,
    };
    match docker::checkpoint(engine, &options).await {
        Ok(report) => {
            println!("Checkpoint created at {}", report.path.display());
            println!("  container:      {} ({})", report.name, &report.id[..12]);
            println!("  frozen for:     {:?}", report.frozen);
            println!("  total time:     {:?}", report.total);
            println!("  CRIU images:    {}", human_size(report.images_bytes));
            println!("  writable layer: {}", human_size(report.rootfs_bytes));
            println!(
                "  container:      {}",
                if report.leave_running {
                    "left running"
                } else {
                    "stopped"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = fail(&e);
            eprintln!(
                "Troubleshooting: run `criu check`; CRIU's log of the dump is dump.log in the checkpoint directory"
            );
            code
        }
    }
}

async fn run_restore(engine: &DockerClient, container: String, args: args::Args, new_name: String) -> ExitCode {
    println!(
        "Restoring checkpoint {} of container {container} as {new_name}...",
        args.name
    );
    let options = RestoreOptions {
        container,
        name: args.name,
        dir: args.dir,
        new_name: new_name.clone(),
        state_root: PathBuf::from(STATE_ROOT),
        runc_criu_config: PathBuf::from(docker::criu_config::RUNC_CRIU_CONFIG),
    };
    match docker::restore(engine, &options).await {
        Ok(report) => {
            println!(
                "Container {new_name} ({}) restored in {:?}",
                &report.id[..12],
                report.restore_time
            );
            println!("Verifying the restored container:");
            for check in &report.verification.checks {
                let mark = if check.ok { "ok" } else { "FAILED" };
                println!("  [{mark}] {}: {}", check.name, check.detail);
            }
            let failed = report.verification.failed();
            if failed.is_empty() {
                println!("All {} checks passed", report.verification.checks.len());
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "docker-checkpoint: verification failed: {} (see {})",
                    failed.join(", "),
                    report.path.join(docker::layout::RESTORE_LOG).display()
                );
                ExitCode::from(6)
            }
        }
        Err(e) => {
            let code = fail(&e);
            eprintln!(
                "Troubleshooting: run `criu check`; see restore.log and dump.log in {}",
                options.dir.join(&options.container).join(&options.name).display()
            );
            code
        }
    }
}

/// Prints `error` and returns the exit status `checkpointctl` gives its
/// class of failure (2 bad input, 3 not found, 5 unavailable, else 1).
fn fail(error: &DockerCheckpointError) -> ExitCode {
    eprintln!("docker-checkpoint: error: {error}");
    ExitCode::from(codes::exit_status(None, codes::kind_grpc(error.kind())))
}
