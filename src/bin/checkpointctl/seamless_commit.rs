//! `checkpointctl seamless-commit`: capture a running container's writable
//! layer and start the background job that builds and pushes the image;
//! with `--wait`, follow that job to its end. `seamless-commit status [ID]`
//! and `seamless-commit jobs` show jobs afterwards, so a commit that failed
//! in the background is seen by someone who did not wait for it.
//!
//! Arguments are validated here, by clap, before the daemon is asked: bad
//! values exit 2 without a connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use seamless_snapshotter::api::client::DaemonClient;
use seamless_snapshotter::api::grpc::control_convert::commit_to_wire;
use seamless_snapshotter::commit::{CommitOptions, Format};
use seamless_snapshotter::oci::credentials::RegistryCredentials;
use seamless_snapshotter::proto::{
    CommitJob, GetCommitRequest, ListCommitsRequest, SeamlessCommitRequest, SeamlessCommitResponse,
};
use seamless_snapshotter::time::rfc3339;
use serde::Serialize;
use tokio::time::Instant;

use crate::checkpoints::{columns, to_json, to_yaml};
use crate::{daemon, CliError};

/// How often `--wait` asks the daemon about the job.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// `seamless-commit [FLAGS]` commits; `seamless-commit status|jobs` reports.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Invocation {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    commit: Option<Args>,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Show one commit job (the namespace's newest without an ID).
    Status(StatusArgs),
    /// List the namespace's commit jobs, newest first.
    Jobs(JobsArgs),
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// Snapshot id of the job, as the commit printed it.
    id: Option<String>,
    /// Without an ID: the newest job of this container.
    #[arg(long)]
    container: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json", "yaml"])]
    output: String,
}

#[derive(Debug, clap::Args)]
struct JobsArgs {
    /// Only this container's jobs.
    #[arg(long)]
    container: Option<String>,
    /// Only jobs in this state.
    #[arg(long, value_parser = ["pending", "processing", "completed", "failed"])]
    state: Option<String>,
    /// At most this many, the newest.
    #[arg(long, default_value_t = 0)]
    limit: u32,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json", "yaml"])]
    output: String,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Container id, name (nerdctl's; Kubernetes' NAME, POD/NAME or
    /// NAMESPACE/POD/NAME), or a unique prefix of either.
    #[arg(long, value_parser = non_empty)]
    container: String,
    /// Image reference to push to.
    #[arg(long, value_parser = non_empty)]
    target: String,
    /// Layer format of the image.
    #[arg(long, default_value_t = defaults().format,
          value_parser = PossibleValuesParser::new(Format::NAMES).map(|name| Format::parse(&name).expect("a listed name")))]
    format: Format,
    /// Wait for the background job to build and push the image.
    #[arg(long)]
    wait: bool,
    /// Working directory of the background job, on the daemon's host: one
    /// only root may write to (created 0700 if missing). Default: the
    /// daemon's private directory under its root.
    #[arg(long, value_parser = absolute_path)]
    work_dir: Option<PathBuf>,
    /// Nydus filesystem version.
    #[arg(long, default_value_t = defaults().fs_version,
          value_parser = PossibleValuesParser::new(seamless_snapshotter::nydus::FS_VERSIONS).map(|v| v.parse::<u32>().expect("a listed number")))]
    fs_version: u32,
    /// Compression of the layer data.
    #[arg(long, default_value_t = defaults().compressor,
          value_parser = PossibleValuesParser::new(seamless_snapshotter::nydus::Compressor::NAMES))]
    compressor: String,
    /// Plain HTTP or unverified TLS to the target registry.
    #[arg(long)]
    target_insecure: bool,
    /// Plain HTTP or unverified TLS to the source registry.
    #[arg(long)]
    source_insecure: bool,
    /// Include only this absolute path (container view); repeatable.
    #[arg(long = "with-path", value_name = "PATH", value_parser = absolute_path)]
    with_paths: Vec<PathBuf>,
    /// Leave out this absolute path (container view); repeatable.
    #[arg(long = "without-path", value_name = "PATH", value_parser = absolute_path)]
    without_paths: Vec<PathBuf>,
    /// Most commit layers in the container's chain before older ones are merged.
    #[arg(long, default_value_t = defaults().maximum_times, value_parser = clap::value_parser!(u32).range(1..))]
    maximum_times: u32,
    /// Longest `--wait` follows the job: 90s, 5m, 1h, 1h30m.
    #[arg(long, default_value = "30m", value_parser = parse_wait_timeout)]
    wait_timeout: Duration,
    /// Credentials for the target's registry, for this commit only (other
    /// users can see a command line: prefer --target-creds-file).
    #[arg(long, value_name = "USER:PASSWORD", value_parser = CredsParser("--target-creds"),
          conflicts_with = "target_creds_file")]
    target_creds: Option<RegistryCredentials>,
    /// A file only its owner may read whose first line is USER:PASSWORD,
    /// for the target's registry.
    #[arg(long, value_name = "FILE", value_parser = read_creds_file)]
    target_creds_file: Option<RegistryCredentials>,
    /// Credentials for the source image's registry, for this commit only.
    #[arg(long, value_name = "USER:PASSWORD", value_parser = CredsParser("--source-creds"),
          conflicts_with = "source_creds_file")]
    source_creds: Option<RegistryCredentials>,
    /// A file only its owner may read whose first line is USER:PASSWORD,
    /// for the source image's registry.
    #[arg(long, value_name = "FILE", value_parser = read_creds_file)]
    source_creds_file: Option<RegistryCredentials>,
}

/// Parses USER:PASSWORD with an error of its own: clap's would quote the
/// refused value, which may be a password.
#[derive(Debug, Clone, Copy)]
struct CredsParser(&'static str);

impl clap::builder::TypedValueParser for CredsParser {
    type Value = RegistryCredentials;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<RegistryCredentials, clap::Error> {
        let refused = |reason: String| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{reason}\n")).with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refused(format!("credentials {}: not UTF-8", self.0)))?;
        RegistryCredentials::parse(self.0, text).map_err(|e| refused(e.to_string()))
    }
}

fn read_creds_file(path: &str) -> Result<RegistryCredentials, String> {
    RegistryCredentials::read_file(Path::new(path)).map_err(|e| e.to_string())
}

/// The commit's own defaults, which the flags' defaults are.
fn defaults() -> seamless_snapshotter::commit::CommitOptions {
    seamless_snapshotter::commit::CommitOptions::default()
}

impl Args {
    fn request(&self, namespace: &str) -> SeamlessCommitRequest {
        let options = CommitOptions {
            namespace: namespace.to_owned(),
            format: self.format,
            work_dir: self.work_dir.clone().unwrap_or_default(),
            fs_version: self.fs_version,
            compressor: self.compressor.clone(),
            target_insecure: self.target_insecure,
            source_insecure: self.source_insecure,
            with_paths: self.with_paths.clone(),
            without_paths: self.without_paths.clone(),
            maximum_times: self.maximum_times,
            target_creds: self.target_creds.clone().or_else(|| self.target_creds_file.clone()),
            source_creds: self.source_creds.clone().or_else(|| self.source_creds_file.clone()),
            ..CommitOptions::new(self.container.clone(), self.target.clone())
        };
        commit_to_wire(&options)
    }
}

pub async fn run(socket: &Path, namespace: &str, invocation: Invocation) -> Result<(), CliError> {
    match (invocation.action, invocation.commit) {
        (Some(Action::Status(args)), _) => status(socket, namespace, args).await,
        (Some(Action::Jobs(args)), _) => jobs(socket, namespace, args).await,
        (None, Some(args)) => commit(socket, namespace, args).await,
        // clap requires --container and --target without a subcommand.
        (None, None) => Err(CliError::Usage(
            "seamless-commit needs --container and --target, or a subcommand (status, jobs)".into(),
        )),
    }
}

async fn commit(socket: &Path, namespace: &str, args: Args) -> Result<(), CliError> {
    let mut client = daemon::connect(socket).await?;
    let created = client
        .seamless_commit(args.request(namespace))
        .await
        .map_err(|status| CliError::rpc(format!("seamless commit of container {}", args.container), status))?
        .into_inner();
    print!("{}", render_created(&created));
    if !args.wait {
        return Ok(());
    }
    let job = wait_for_job(&mut client, &created.snapshot_id, args.wait_timeout).await?;
    print!("{}", render_completed(&args.target, &job));
    Ok(())
}

/// Polls until the job completes (returned), fails or outlives `timeout`
/// (errors). Progress goes to stderr, one line per change.
async fn wait_for_job(client: &mut DaemonClient, snapshot_id: &str, timeout: Duration) -> Result<CommitJob, CliError> {
    let deadline = Instant::now() + timeout;
    let mut last_progress = String::new();
    loop {
        let job = client
            .get_commit(GetCommitRequest {
                snapshot_id: snapshot_id.to_owned(),
            })
            .await
            .map_err(|status| CliError::rpc(format!("status of snapshot {snapshot_id}"), status))?
            .into_inner();
        let progress = render_progress(&job);
        if progress != last_progress {
            eprintln!("{progress}");
            last_progress = progress;
        }
        match job.state.as_str() {
            "completed" => return Ok(job),
            "failed" => {
                return Err(CliError::JobFailed {
                    snapshot_id: snapshot_id.to_owned(),
                    code: job.error_code,
                    cause: job.error_cause,
                    reason: job.error,
                })
            }
            // "pending", "processing", or a state newer than this client.
            _ => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CliError::WaitTimeout {
                snapshot_id: snapshot_id.to_owned(),
                waited: format_wait(timeout),
                state: job.state,
            });
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

async fn status(socket: &Path, namespace: &str, args: StatusArgs) -> Result<(), CliError> {
    let mut client = daemon::connect(socket).await?;
    let job = match &args.id {
        Some(id) => client
            .get_commit(GetCommitRequest {
                snapshot_id: id.clone(),
            })
            .await
            .map_err(|status| CliError::rpc(format!("status of snapshot {id}"), status))?
            .into_inner(),
        None => list(&mut client, namespace, args.container.clone(), None, 1)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                CliError::Failed(match &args.container {
                    Some(container) => format!("no commit jobs of container {container} in namespace {namespace}"),
                    None => format!("no commit jobs in namespace {namespace}"),
                })
            })?,
    };
    let out = match args.output.as_str() {
        "json" => to_json(&JobView::of(&job)) + "\n",
        "yaml" => to_yaml(&JobView::of(&job)),
        _ => render_status(&job),
    };
    print!("{out}");
    Ok(())
}

async fn jobs(socket: &Path, namespace: &str, args: JobsArgs) -> Result<(), CliError> {
    let mut client = daemon::connect(socket).await?;
    let jobs = list(&mut client, namespace, args.container, args.state, args.limit).await?;
    let views: Vec<JobView> = jobs.iter().map(JobView::of).collect();
    let out = match args.output.as_str() {
        "json" => to_json(&views) + "\n",
        "yaml" => to_yaml(&views),
        _ => render_jobs(&jobs),
    };
    print!("{out}");
    Ok(())
}

async fn list(
    client: &mut DaemonClient,
    namespace: &str,
    container: Option<String>,
    state: Option<String>,
    limit: u32,
) -> Result<Vec<CommitJob>, CliError> {
    Ok(client
        .list_commits(ListCommitsRequest {
            namespace: namespace.to_owned(),
            container: container.unwrap_or_default(),
            state: state.unwrap_or_default(),
            limit,
        })
        .await
        .map_err(|status| CliError::rpc(format!("list commit jobs of namespace {namespace}"), status))?
        .into_inner()
        .jobs)
}

/// A job as `--output json|yaml` prints it; the field names are stable.
#[derive(Debug, Serialize)]
struct JobView<'a> {
    id: &'a str,
    namespace: &'a str,
    container: &'a str,
    target: &'a str,
    state: &'a str,
    stage: &'a str,
    progress: f64,
    started: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ended: Option<String>,
    pause_time_ns: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    manifest_digest: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    layer_plan: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    error_code: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    error: &'a str,
}

impl<'a> JobView<'a> {
    fn of(job: &'a CommitJob) -> JobView<'a> {
        JobView {
            id: &job.snapshot_id,
            namespace: &job.namespace,
            container: &job.container,
            target: &job.target,
            state: &job.state,
            stage: &job.stage,
            progress: job.progress,
            started: unix_ms_text(job.started_unix_ms),
            ended: (job.ended_unix_ms > 0).then(|| unix_ms_text(job.ended_unix_ms)),
            pause_time_ns: job.pause_time_ns,
            manifest_digest: &job.manifest_digest,
            layer_plan: &job.layer_plan,
            error_code: &job.error_code,
            error: &job.error,
        }
    }
}

fn unix_ms_text(ms: i64) -> String {
    rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
}

/// One job, a field a line; the error in full.
fn render_status(job: &CommitJob) -> String {
    let mut out = format!(
        "Snapshot ID: {}\nContainer: {}\nTarget: {}\nState: {}\nProgress: {}\nStarted: {}\nPause Time: {}\n",
        job.snapshot_id,
        job.container,
        job.target,
        job.state,
        render_progress(job).trim_start_matches("progress: "),
        unix_ms_text(job.started_unix_ms),
        format_pause(job.pause_time_ns),
    );
    if job.ended_unix_ms > 0 {
        out += &format!("Ended: {}\n", unix_ms_text(job.ended_unix_ms));
    }
    if !job.manifest_digest.is_empty() {
        out += &format!("Image: {}@{}\n", job.target, job.manifest_digest);
    }
    if !job.error.is_empty() {
        out += &format!("Error: {}: {}\n", job.error_code, job.error);
    }
    out
}

const JOB_HEADERS: [&str; 6] = ["ID", "CONTAINER", "TARGET", "STATE", "STAGE", "ERROR"];

fn render_jobs(jobs: &[CommitJob]) -> String {
    let rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|job| {
            [
                job.snapshot_id.clone(),
                job.container.clone(),
                job.target.clone(),
                job.state.clone(),
                job.stage.clone(),
                if job.error.is_empty() {
                    "-".into()
                } else {
                    // One line a job, whatever the registry said.
                    format!("{}: {}", job.error_code, job.error.replace('\n', " "))
                },
            ]
        })
        .collect();
    columns(JOB_HEADERS, &rows)
}

fn render_created(created: &SeamlessCommitResponse) -> String {
    format!(
        "Seamless snapshot created successfully:\n  \
         Snapshot ID: {id}\n  \
         Pause Time: {pause}\n  \
         Old Upper Dir: {old}\n  \
         New Upper Dir: {new}\n\
         Background commit processing started for snapshot: {id}\n",
        id = created.snapshot_id,
        pause = format_pause(created.pause_time_ns),
        old = created.old_upper_dir,
        new = created.new_upper_dir,
    )
}

fn render_completed(target: &str, job: &CommitJob) -> String {
    let mut out = format!(
        "Background processing completed successfully.\nImage: {target}@{}\n",
        job.manifest_digest
    );
    if !job.layer_plan.is_empty() {
        out += &format!(
            "Commit Layers: {} ({} layer pushed)\n",
            job.commit_layers, job.layer_plan
        );
    }
    out
}

/// `progress: 45% building layer`; the state stands in for an empty stage.
fn render_progress(job: &CommitJob) -> String {
    // Saturating cast: a NaN from a confused daemon shows as 0%.
    let percent = (job.progress.clamp(0.0, 1.0) * 100.0).round() as u32;
    let doing = if job.stage.is_empty() { &job.state } else { &job.stage };
    format!("progress: {percent}% {doing}").trim_end().to_owned()
}

/// As Go prints a `time.Duration`, like the reference's CLI and REST API:
/// `8.72416ms`, `512.3µs`.
fn format_pause(nanos: u64) -> String {
    seamless_snapshotter::time::go_duration(Duration::from_nanos(nanos))
}

/// Go-style durations of whole seconds: one or more of `<n>h`, `<n>m`,
/// `<n>s`, in that order, each at most once: 90s, 5m, 1h, 1h30m. Zero is
/// refused, since it would time out before the first poll.
fn parse_wait_timeout(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?}: expected e.g. 90s, 5m, 1h or 1h30m");
    let mut total: u64 = 0;
    let mut rest = text;
    let mut smallest_unit_so_far = u64::MAX;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
        if digits == 0 {
            return Err(invalid());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let unit = match &rest[digits..digits + unit_len] {
            "h" => 3600,
            "m" => 60,
            "s" => 1,
            _ => return Err(invalid()),
        };
        if unit >= smallest_unit_so_far {
            return Err(invalid());
        }
        smallest_unit_so_far = unit;
        total = value
            .checked_mul(unit)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(invalid)?;
        rest = &rest[digits + unit_len..];
    }
    if total == 0 {
        return Err(format!("invalid duration {text:?}: must be longer than zero"));
    }
    Ok(Duration::from_secs(total))
}

/// The inverse of `parse_wait_timeout`, for messages: 1h30m, 90s -> 1m30s.
fn format_wait(duration: Duration) -> String {
    let secs = duration.as_secs();
    let parts = [(secs / 3600, "h"), (secs % 3600 / 60, "m"), (secs % 60, "s")];
    let text: String = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".to_owned()
    } else {
        text
    }
}

fn absolute_path(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!("path {text:?} must be absolute"))
    }
}

fn non_empty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = [
            "checkpointctl",
            "--container",
            "c1",
            "--target",
            "registry.local/app:v2",
        ];
        Cli::try_parse_from(base.iter().chain(extra)).map(|cli| cli.args)
    }

    #[test]
    fn wait_timeouts_parse() {
        let cases = [
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("1h0m5s", 3605),
            ("2m30s", 150),
        ];
        for (text, secs) in cases {
            assert_eq!(parse_wait_timeout(text), Ok(Duration::from_secs(secs)), "{text}");
        }
    }

    #[test]
    fn garbage_wait_timeouts_are_refused() {
        for text in [
            "", "30", "m", "5x", "1.5h", "-5m", "5 m", "30m1h", "1h1h", "0s", "0h0m", "1d", "5mm", "h5",
        ] {
            assert!(parse_wait_timeout(text).is_err(), "{text:?} parsed");
        }
        assert!(parse_wait_timeout("99999999999999999999h").is_err());
    }

    #[test]
    fn wait_timeouts_print_back() {
        assert_eq!(format_wait(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_wait(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_wait(Duration::from_secs(1800)), "30m");
    }

    #[test]
    fn pause_is_milliseconds_below_a_second() {
        assert_eq!(format_pause(4_210_000), "4.21ms");
        assert_eq!(format_pause(8_724_160), "8.72416ms");
        assert_eq!(format_pause(512_300), "512.3µs");
        assert_eq!(format_pause(0), "0s");
        assert_eq!(format_pause(1_000_000_000), "1s");
        assert_eq!(format_pause(12_345_678_901), "12.345678901s");
    }

    #[test]
    fn defaults_become_the_request() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.wait_timeout, Duration::from_secs(1800));
        assert!(!args.wait);
        let request = args.request("k8s.io");
        assert_eq!(
            request,
            SeamlessCommitRequest {
                namespace: "k8s.io".into(),
                container: "c1".into(),
                target: "registry.local/app:v2".into(),
                format: "nydus".into(),
                work_dir: String::new(),
                fs_version: 6,
                compressor: "lz4_block".into(),
                target_insecure: false,
                source_insecure: false,
                with_paths: vec![],
                without_paths: vec![],
                maximum_times: 10,
                target_username: String::new(),
                target_password: String::new(),
                source_username: String::new(),
                source_password: String::new(),
            }
        );
    }

    #[test]
    fn every_option_reaches_the_request() {
        let args = parse(&[
            "--format=oci",
            "--fs-version=5",
            "--compressor=zstd",
            "--work-dir=/var/tmp",
            "--target-insecure",
            "--source-insecure",
            "--with-path=/data",
            "--with-path=/etc",
            "--without-path=/data/cache",
            "--maximum-times=3",
            "--wait",
            "--wait-timeout=1h30m",
        ])
        .unwrap();
        assert!(args.wait);
        assert_eq!(args.wait_timeout, Duration::from_secs(5400));
        let request = args.request("default");
        assert_eq!(request.format, "oci");
        assert_eq!(request.fs_version, 5);
        assert_eq!(request.compressor, "zstd");
        assert_eq!(request.work_dir, "/var/tmp");
        assert!(request.target_insecure && request.source_insecure);
        assert_eq!(request.with_paths, ["/data", "/etc"]);
        assert_eq!(request.without_paths, ["/data/cache"]);
        assert_eq!(request.maximum_times, 3);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for extra in [
            &["--format=docker"][..],
            &["--fs-version=4"],
            &["--compressor=gzip"],
            &["--with-path=data"],
            &["--without-path=./cache"],
            &["--work-dir=tmp"],
            &["--maximum-times=0"],
            &["--wait-timeout=soon"],
        ] {
            let err = parse(extra).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{extra:?}");
        }
        let err = Cli::try_parse_from(["checkpointctl", "--container", "", "--target", "r/x:1"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn credentials_reach_the_request_and_never_show() {
        let args = parse(&["--target-creds=alice:pa:ss"]).unwrap();
        let shown = format!("{args:?}");
        assert!(!shown.contains("pa:ss"), "{shown}");
        let request = args.request("default");
        assert_eq!(
            (request.target_username.as_str(), request.target_password.as_str()),
            ("alice", "pa:ss")
        );
        assert!(request.source_username.is_empty() && request.source_password.is_empty());

        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("creds");
        std::fs::write(&file, "bob:s3cret-from-file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let flag = format!("--source-creds-file={}", file.display());
        let request = parse(&[&flag]).unwrap().request("default");
        assert_eq!(
            (request.source_username.as_str(), request.source_password.as_str()),
            ("bob", "s3cret-from-file")
        );
        assert!(request.target_username.is_empty());
    }

    #[test]
    fn credentials_files_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("creds");
        std::fs::write(&file, "bob:s3cret-from-file\n").unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = parse(&[&format!("--target-creds-file={}", file.display())]).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let text = err.to_string();
            assert!(
                text.contains(&format!("mode {mode:04o}")) && !text.contains("s3cret"),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_credentials_are_usage_errors_that_quote_no_secret() {
        use std::os::unix::fs::PermissionsExt;
        for bad in [
            "--target-creds=nocolonsecret",
            "--source-creds=:secretpw",
            "--target-creds=user:",
        ] {
            let err = parse(&[bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            let text = err.to_string();
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains("credentials --"), "{text}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("creds");
        std::fs::write(&file, "a:b\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let both = [
            "--target-creds=a:b".to_string(),
            format!("--target-creds-file={}", file.display()),
        ];
        let err = parse(&[&both[0], &both[1]]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn creation_prints_the_documented_block() {
        let created = SeamlessCommitResponse {
            snapshot_id: "snap-7".into(),
            pause_time_ns: 512_300,
            old_upper_dir: "/var/lib/containerd-seamless/snapshots/7/fs".into(),
            new_upper_dir: "/var/lib/containerd-seamless/snapshots/8/fs".into(),
            total_time_ns: 22_802_283,
        };
        assert_eq!(
            render_created(&created),
            "Seamless snapshot created successfully:\n\
             \x20 Snapshot ID: snap-7\n\
             \x20 Pause Time: 512.3µs\n\
             \x20 Old Upper Dir: /var/lib/containerd-seamless/snapshots/7/fs\n\
             \x20 New Upper Dir: /var/lib/containerd-seamless/snapshots/8/fs\n\
             Background commit processing started for snapshot: snap-7\n"
        );
    }

    #[test]
    fn completion_names_the_pushed_manifest() {
        let job = CommitJob {
            state: "completed".into(),
            manifest_digest: "sha256:abc".into(),
            ..CommitJob::default()
        };
        assert_eq!(
            render_completed("registry.local/app:v2", &job),
            "Background processing completed successfully.\nImage: registry.local/app:v2@sha256:abc\n"
        );
        let chained = CommitJob {
            layer_plan: "incremental".into(),
            commit_layers: 3,
            ..job
        };
        assert!(render_completed("r/a:1", &chained).ends_with("Commit Layers: 3 (incremental layer pushed)\n"));
    }

    #[derive(Debug, Parser)]
    struct Whole {
        #[command(flatten)]
        invocation: Invocation,
    }

    #[test]
    fn status_and_jobs_are_subcommands_beside_the_commit_flags() {
        let parse = |args: &[&str]| Whole::try_parse_from([&["checkpointctl"], args].concat());
        let commit = parse(&["--container", "c", "--target", "r/a:1"]).unwrap().invocation;
        assert!(commit.action.is_none() && commit.commit.is_some_and(|a| a.container == "c"));
        let status = parse(&["status", "snapshot-1"]).unwrap().invocation;
        assert!(
            matches!(status.action, Some(Action::Status(StatusArgs { id: Some(ref id), .. })) if id == "snapshot-1")
        );
        let jobs = parse(&["jobs", "--state", "failed", "--limit", "5"])
            .unwrap()
            .invocation;
        assert!(
            matches!(jobs.action, Some(Action::Jobs(JobsArgs { limit: 5, ref state, .. })) if state.as_deref() == Some("failed"))
        );
        // Without a subcommand the commit's own flags are required.
        assert_eq!(
            parse(&[]).unwrap_err().kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        // The two do not mix, and states are checked before connecting.
        assert!(parse(&["status", "--target", "r/a:1"]).is_err());
        assert!(parse(&["jobs", "--state", "broken"]).is_err());
    }

    #[test]
    fn flag_defaults_are_the_commits_own() {
        let args = parse(&[]).unwrap();
        let request = args.request("ns");
        let defaults = defaults();
        assert_eq!(request.format, defaults.format.as_str());
        assert_eq!(request.fs_version, defaults.fs_version);
        assert_eq!(request.compressor, defaults.compressor);
        assert_eq!(request.maximum_times, defaults.maximum_times);
        assert_eq!(request.work_dir, defaults.work_dir.display().to_string());
    }

    #[test]
    fn jobs_render_a_line_each_with_their_error() {
        let job = |id: &str, state: &str, error: &str| CommitJob {
            snapshot_id: id.into(),
            container: "web".into(),
            target: "r/app:1".into(),
            state: state.into(),
            stage: if error.is_empty() {
                "completed"
            } else {
                "pushing the image"
            }
            .into(),
            error_code: if error.is_empty() {
                ""
            } else {
                "BACKGROUND_PROCESSING_FAILED"
            }
            .into(),
            error: error.into(),
            ..CommitJob::default()
        };
        let text = render_jobs(&[
            job("snapshot-2", "failed", "pushing the image: registry said\n405"),
            job("snapshot-1", "completed", ""),
        ]);
        assert_eq!(
            text,
            "ID          CONTAINER  TARGET   STATE      STAGE              ERROR\n\
             snapshot-2  web        r/app:1  failed     pushing the image  \
             BACKGROUND_PROCESSING_FAILED: pushing the image: registry said 405\n\
             snapshot-1  web        r/app:1  completed  completed          -\n"
        );
        let failed = job("snapshot-2", "failed", "denied");
        let status = render_status(&failed);
        assert!(status.contains("State: failed\n") && status.contains("Error: BACKGROUND_PROCESSING_FAILED: denied\n"));
        let json = to_json(&JobView::of(&failed));
        assert!(
            json.contains("\"error\": \"denied\"") && !json.contains("manifest_digest"),
            "{json}"
        );
    }

    #[test]
    fn progress_lines_show_percent_and_stage() {
        let job = |progress, state: &str, stage: &str| CommitJob {
            progress,
            state: state.into(),
            stage: stage.into(),
            ..CommitJob::default()
        };
        assert_eq!(
            render_progress(&job(0.454, "processing", "building layer")),
            "progress: 45% building layer"
        );
        assert_eq!(render_progress(&job(0.0, "pending", "")), "progress: 0% pending");
        assert_eq!(
            render_progress(&job(1.7, "processing", "pushing")),
            "progress: 100% pushing"
        );
        assert_eq!(
            render_progress(&job(f64::NAN, "processing", "")),
            "progress: 0% processing"
        );
    }

    /// A daemon whose GetCommit answers from a script, one job per call,
    /// repeating the last.
    struct ScriptedDaemon {
        jobs: std::sync::Mutex<std::collections::VecDeque<CommitJob>>,
    }

    #[tonic::async_trait]
    impl seamless_snapshotter::proto::control_server::Control for ScriptedDaemon {
        async fn version(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::VersionRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::VersionResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("version"))
        }

        async fn list_mounts(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::ListMountsRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ListMountsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("list mounts"))
        }

        async fn seamless_commit(
            &self,
            _: tonic::Request<SeamlessCommitRequest>,
        ) -> Result<tonic::Response<SeamlessCommitResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("seamless commit"))
        }

        async fn get_commit(
            &self,
            request: tonic::Request<GetCommitRequest>,
        ) -> Result<tonic::Response<CommitJob>, tonic::Status> {
            assert_eq!(request.get_ref().snapshot_id, "snap-7");
            let mut jobs = self.jobs.lock().unwrap();
            let job = if jobs.len() > 1 {
                jobs.pop_front()
            } else {
                jobs.front().cloned()
            };
            Ok(tonic::Response::new(job.expect("script is not empty")))
        }

        async fn list_commits(
            &self,
            _: tonic::Request<ListCommitsRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ListCommitsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn create_checkpoint(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::CreateCheckpointRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::Checkpoint>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn list_checkpoints(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::ListCheckpointsRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ListCheckpointsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn inspect_checkpoint(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::InspectCheckpointRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::InspectCheckpointResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn prune_checkpoints(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::PruneCheckpointsRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::PruneCheckpointsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn merge_checkpoints(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::MergeCheckpointsRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::MergeCheckpointsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn export_checkpoint(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::ExportCheckpointRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ExportCheckpointResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn import_checkpoint(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::ImportCheckpointRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ImportCheckpointResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn schedule_checkpoints(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::ScheduleCheckpointsRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ScheduleCheckpointsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn list_schedules(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::ListSchedulesRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ListSchedulesResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn remove_schedule(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::RemoveScheduleRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::RemoveScheduleResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn restore_checkpoint(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::RestoreCheckpointRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::RestoreCheckpointResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn container_stats(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::ContainerStatsRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ContainerStatsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn resume_container(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::ResumeContainerRequest>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ResumeContainerResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        type SendCheckpointStream = std::pin::Pin<
            Box<
                dyn tokio_stream::Stream<Item = Result<seamless_snapshotter::proto::ArchiveChunk, tonic::Status>>
                    + Send
                    + 'static,
            >,
        >;

        async fn send_checkpoint(
            &self,
            _: tonic::Request<seamless_snapshotter::proto::SendCheckpointRequest>,
        ) -> Result<tonic::Response<Self::SendCheckpointStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }

        async fn receive_checkpoint(
            &self,
            _: tonic::Request<tonic::Streaming<seamless_snapshotter::proto::ReceiveCheckpointRequest>>,
        ) -> Result<tonic::Response<seamless_snapshotter::proto::ImportCheckpointResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not scripted"))
        }
    }

    async fn wait_on_script(script: Vec<CommitJob>, timeout: Duration) -> Result<CommitJob, CliError> {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let daemon = ScriptedDaemon {
            jobs: std::sync::Mutex::new(script.into()),
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(seamless_snapshotter::proto::control_server::ControlServer::new(daemon))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let mut client = daemon::connect(&socket).await.unwrap();
        let result = wait_for_job(&mut client, "snap-7", timeout).await;
        server.abort();
        result
    }

    fn job(state: &str, progress: f64) -> CommitJob {
        CommitJob {
            snapshot_id: "snap-7".into(),
            state: state.into(),
            progress,
            stage: "building layer".into(),
            ..CommitJob::default()
        }
    }

    #[tokio::test]
    async fn waiting_ends_with_the_completed_job() {
        let done = CommitJob {
            manifest_digest: "sha256:abc".into(),
            ..job("completed", 1.0)
        };
        let script = vec![job("pending", 0.0), job("processing", 0.45), done];
        let finished = wait_on_script(script, Duration::from_secs(10)).await.unwrap();
        assert_eq!(finished.manifest_digest, "sha256:abc");
    }

    #[tokio::test]
    async fn a_failed_job_is_an_error_with_its_code() {
        let failed = CommitJob {
            error_code: "PERMISSION_DENIED".into(),
            error: "push to registry.local/app denied".into(),
            ..job("failed", 0.8)
        };
        let err = wait_on_script(vec![job("processing", 0.5), failed], Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "background commit processing failed: push to registry.local/app denied (snapshot snap-7, PERMISSION_DENIED)"
        );
        assert!(matches!(err, CliError::JobFailed { ref code, .. } if code == "PERMISSION_DENIED"));
    }

    #[tokio::test]
    async fn waiting_gives_up_at_the_timeout() {
        let started = std::time::Instant::now();
        let err = wait_on_script(vec![job("processing", 0.1)], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            err.to_string(),
            "timed out after 1s waiting for snapshot snap-7, job still processing"
        );
    }
}
