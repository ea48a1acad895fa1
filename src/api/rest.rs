//! The REST API of seamless commit: `POST /api/v1/snapshots`,
//! `GET /api/v1/snapshots/{id}`, `GET /api/v1/snapshots?state=&limit=&offset=`,
//! `GET /api/v1/metrics` (JSON) and `GET /metrics` (Prometheus text). Served
//! on a unix socket; on TCP (loopback only) every request needs the bearer
//! token, and an address that keeps sending wrong ones is locked out for a
//! while. Connections are bounded as `[rest.connections]` says (how many,
//! header and idle timeouts) and bodies are capped before they are parsed.
//! Handlers only unwrap, delegate to `commit`, and wrap; errors use
//! `{"error":{"code","message","details"}}` with the HTTP status of their code.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::body::HttpBody;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use hyper::service::service_fn;
use hyper::{Body, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::api::connections::{AcceptBackoff, Guarded, TokenAttempts, TokenVerdict};
use crate::api::remote::{read_token, RemoteError};
use crate::commit::metrics::CommitMetrics;
use crate::commit::{CommitCode, CommitError, CommitOptions, CommitService, FailureCause, Job, JobState};
use crate::config::{ConnectionLimits, RestConfig};
use crate::oci::credentials::RegistryCredentials;
use crate::time::{go_duration, rfc3339};

/// Request bodies larger than this are refused, before any byte of them is
/// parsed.
pub const MAX_BODY: usize = 1 << 20;
const MAX_LIMIT: usize = 1000;
/// The longest a `"wait": true` request waits for its job; past it the
/// answer is the job as it stands.
const WAIT_LIMIT: Duration = Duration::from_secs(6 * 3600);

/// What the REST API serves, and whether it asks for the token.
#[derive(Debug, Clone)]
pub struct RestApi {
    commits: Arc<CommitService>,
    /// The namespace of requests that name none (`[rest] namespace`).
    namespace: String,
    token: Option<Token>,
    /// How long a request's body may take to arrive, whole.
    body_timeout: Duration,
}

#[derive(Clone)]
struct Token {
    value: Arc<str>,
    attempts: Arc<TokenAttempts>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<hidden>)")
    }
}

/// The token of `rest.token_file`, if set: a private file (0600, the same
/// check as the remote API's) whose first line is the token.
pub fn read_token_file(config: &RestConfig) -> Result<Option<String>, RemoteError> {
    match config.token_file.as_str() {
        "" => Ok(None),
        file => read_token("rest.token_file", Path::new(file)).map(Some),
    }
}

/// The options of a commit request, by the JSON tags of the reference's
/// `CommitOptions` (and ours: `format`, the credentials). A request gives
/// them under `"options"` (the reference's body) or beside its container
/// and target (our earlier flat body); missing ones take the commit's
/// defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestOptions {
    /// Answer when the job has ended, not when the capture is taken.
    #[serde(default)]
    wait: bool,
    format: Option<String>,
    work_dir: Option<PathBuf>,
    fs_version: Option<FsVersion>,
    compressor: Option<String>,
    target_insecure: Option<bool>,
    source_insecure: Option<bool>,
    with_paths: Option<Vec<PathBuf>>,
    without_paths: Option<Vec<PathBuf>>,
    maximum_times: Option<u32>,
    /// The reference client's own bound on its jobs; the daemon's is
    /// `[commit] background_workers`. Checked, then left to the client.
    background_workers: Option<u32>,
    /// `{"username": .., "password": ..}` for the target's registry, for
    /// this request only: never stored or shown.
    target_creds: Option<RegistryCredentials>,
    /// The same for the source image's registry.
    source_creds: Option<RegistryCredentials>,
}

/// The reference writes the RAFS version as a string ("6"); a number is
/// taken too.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FsVersion {
    Number(u32),
    Text(String),
}

impl FsVersion {
    fn number(&self) -> Result<u32, RequestError> {
        match self {
            FsVersion::Number(n) => Ok(*n),
            FsVersion::Text(text) => text.parse().map_err(|_| {
                RequestError::Commit(CommitError::InvalidParameter(format!(
                    "fs_version {text:?} is not 5 or 6"
                )))
            }),
        }
    }
}

/// A `POST /api/v1/snapshots` request, parsed.
#[derive(Debug)]
pub struct CreateRequest {
    pub options: CommitOptions,
    /// Answer when the job has ended.
    pub wait: bool,
}

#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    details: Details,
}

/// An error's `details`: what it is about (`container_id`, `snapshot_id`,
/// `path`, ...), then when it happened, as the reference writes it.
#[derive(Debug, Default)]
struct Details(Vec<(&'static str, String)>);

impl Details {
    fn about(key: &'static str, value: impl Into<String>) -> Details {
        Details(vec![(key, value.into())])
    }
}

impl Serialize for Details {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len() + 1))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.serialize_entry("timestamp", &rfc3339(SystemTime::now()))?;
        map.end()
    }
}

/// A job as every answer shows it: the reference's fields first (those of
/// its `SnapshotStatus`, then those of its `SnapshotResult`), ours after.
#[derive(Debug, Serialize)]
struct JobView {
    snapshot_id: String,
    state: &'static str,
    progress: f64,
    start_time: String,
    /// Null while the job runs.
    end_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Go durations: the container's pause, and the commit call's own time.
    pause_time: String,
    total_time: String,
    old_upper_dir: String,
    new_upper_dir: String,
    // Ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'static str>,
    /// "network" when a registry could not be reached or timed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_cause: Option<&'static str>,
    namespace: String,
    container_id: String,
    target_ref: String,
    format: &'static str,
    stage: String,
    pause_time_seconds: f64,
    /// From the capture to the job's end; null while it runs.
    background_time: Option<String>,
    manifest_digest: Option<String>,
    /// "full", "incremental" or "merged"; empty until decided.
    layer_plan: String,
    /// Commit layers above the source image's own in the pushed image.
    commit_layers: u32,
}

fn job_view(job: Job) -> JobView {
    JobView {
        state: job.state.as_str(),
        start_time: rfc3339(job.started),
        end_time: job.ended.map(rfc3339),
        error: job.error.filter(|_| job.state == JobState::Failed),
        pause_time: go_duration(job.pause),
        total_time: go_duration(job.total),
        old_upper_dir: job.capture.join("fs").display().to_string(),
        new_upper_dir: job.new_upper.display().to_string(),
        error_code: job.error_code.map(CommitCode::as_str),
        error_cause: job.cause.map(FailureCause::as_str),
        format: job.options.format.as_str(),
        pause_time_seconds: job.pause.as_secs_f64(),
        background_time: job
            .ended
            .map(|ended| go_duration(ended.duration_since(job.started).unwrap_or_default())),
        snapshot_id: job.snapshot_id,
        namespace: job.namespace,
        container_id: job.container,
        target_ref: job.options.target,
        progress: job.progress,
        stage: job.stage,
        manifest_digest: job.manifest_digest,
        layer_plan: job.layer_plan,
        commit_layers: job.commit_layers,
    }
}

/// `GET /api/v1/snapshots`: a page of jobs, and how many match in all.
#[derive(Debug, Serialize)]
struct JobPage {
    snapshots: Vec<JobView>,
    total: usize,
    limit: usize,
    offset: usize,
}

/// `GET /api/v1/metrics`: the reference's `metrics` and `timestamp`, then
/// our counts and summaries in seconds.
#[derive(Debug, Serialize)]
struct MetricsView {
    metrics: ReferenceMetrics,
    timestamp: String,
    #[serde(flatten)]
    ours: CommitMetrics,
}

#[derive(Debug, Serialize)]
struct ReferenceMetrics {
    total_snapshots: u64,
    successful_snapshots: u64,
    failed_snapshots: u64,
    average_pause_time: String,
    average_total_time: String,
    average_background_time: String,
    // Ours.
    pending_snapshots: u64,
    processing_snapshots: u64,
}

fn metrics_view(metrics: CommitMetrics) -> MetricsView {
    let average = |s: &crate::commit::metrics::Summary| go_duration(Duration::from_secs_f64(s.mean()));
    MetricsView {
        metrics: ReferenceMetrics {
            total_snapshots: metrics.pending + metrics.processing + metrics.completed + metrics.failed,
            successful_snapshots: metrics.completed,
            failed_snapshots: metrics.failed,
            average_pause_time: average(&metrics.pause_time_seconds),
            average_total_time: average(&metrics.total_time_seconds),
            average_background_time: average(&metrics.background_time_seconds),
            pending_snapshots: metrics.pending,
            processing_snapshots: metrics.processing,
        },
        timestamp: rfc3339(SystemTime::now()),
        ours: metrics,
    }
}

/// The HTTP status of a commit error code (see [`crate::api::codes`]).
pub fn http_status(code: CommitCode) -> StatusCode {
    StatusCode::from_u16(crate::api::codes::commit_surface(code).http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    // Plain data: serialising cannot fail.
    let bytes = serde_json::to_vec(body).expect("response serialises");
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: String, details: Details) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: ErrorDetail { code, message, details },
        },
    )
}

/// A commit error about `details`' subject, with its code's status.
fn commit_error(e: CommitError, details: Details) -> Response<Body> {
    let code = e.code();
    error(http_status(code), code.as_str(), e.to_string(), details)
}

fn bad_request(message: String) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        CommitCode::InvalidParameter.as_str(),
        message,
        Details::default(),
    )
}

impl RestApi {
    /// `token` set: every request must carry `Authorization: Bearer <token>`,
    /// and wrong ones count against the caller's address as `limits` says.
    /// Requests that name no namespace are for `namespace`.
    pub fn new(commits: Arc<CommitService>, namespace: &str, limits: &ConnectionLimits, token: Option<String>) -> Self {
        RestApi {
            commits,
            namespace: namespace.to_string(),
            token: token.map(|value| Token {
                value: value.into(),
                attempts: Arc::new(TokenAttempts::new(limits)),
            }),
            body_timeout: limits.header_timeout(),
        }
    }

    /// `peer`: the client's address (None on the unix socket).
    pub async fn handle(&self, request: Request<Body>, peer: Option<IpAddr>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        if let Some(token) = &self.token {
            let given = request
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match token.attempts.check(peer, given, &token.value) {
                TokenVerdict::Accepted => {}
                TokenVerdict::Refused => {
                    return error(
                        StatusCode::FORBIDDEN,
                        CommitCode::PermissionDenied.as_str(),
                        "a valid bearer token is required".into(),
                        Details::default(),
                    )
                }
                TokenVerdict::LockedOut { retry_in } => {
                    return error(
                        StatusCode::TOO_MANY_REQUESTS,
                        CommitCode::PermissionDenied.as_str(),
                        format!(
                        "too many requests with a wrong bearer token from this address: refused for {} more seconds",
                        retry_in.as_secs().max(1)
                    ),
                        Details::default(),
                    )
                }
            }
        }
        debug!(%method, %path, "REST request");
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::POST, ["api", "v1", "snapshots"]) => self.create(request).await,
            (&Method::GET, ["api", "v1", "snapshots"]) => self.list(request.uri().query().unwrap_or_default()),
            (&Method::GET, ["api", "v1", "snapshots", id]) => match self.commits.job(id) {
                Ok(job) => json(StatusCode::OK, &job_view(job)),
                Err(e) => commit_error(e, Details::about("snapshot_id", *id)),
            },
            (&Method::GET, ["api", "v1", "metrics"]) => match self.commits.jobs() {
                Ok(jobs) => json(StatusCode::OK, &metrics_view(CommitMetrics::of(&jobs))),
                Err(e) => commit_error(e, Details::default()),
            },
            (&Method::GET, ["metrics"]) => match self.commits.jobs() {
                Ok(jobs) => {
                    let mut r = Response::new(Body::from(CommitMetrics::of(&jobs).prometheus()));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                }
                Err(e) => commit_error(e, Details::default()),
            },
            (_, ["api", "v1", "snapshots", ..]) | (_, ["api", "v1", "metrics"]) | (_, ["metrics"]) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                CommitCode::InvalidParameter.as_str(),
                format!("{method} is not allowed on {path}"),
                Details::about("path", path.as_str()),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                format!(
                    "no endpoint {path}: the endpoints are /api/v1/snapshots, /api/v1/snapshots/{{id}}, \
                     /api/v1/metrics and /metrics"
                ),
                Details::about("path", path.as_str()),
            ),
        }
    }

    /// `POST /api/v1/snapshots`: 201 with the job once captured, or with
    /// `wait` once it has ended (an error answer if it failed).
    async fn create(&self, request: Request<Body>) -> Response<Body> {
        let bytes = match tokio::time::timeout(self.body_timeout, read_body(request)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(refused)) => return refused,
            Err(_) => {
                return body_timeout(&format_args!(
                    "not whole within {} seconds",
                    self.body_timeout.as_secs()
                ))
            }
        };
        let CreateRequest { options, wait } = match parse_create(&bytes, &self.namespace) {
            Ok(request) => request,
            Err(RequestError::Malformed(message)) => return bad_request(message),
            Err(RequestError::Commit(e)) => return commit_error(e, Details::default()),
        };
        let container = options.container.clone();
        let started = match self.commits.commit(options).await {
            Ok(started) => started,
            Err(e) => return commit_error(e, Details::about("container_id", container)),
        };
        let id = started.snapshot_id;
        let job = match wait {
            true => self.commits.wait_job(&id, WAIT_LIMIT).await,
            false => self.commits.job(&id),
        };
        let job = match job {
            Ok(job) => job,
            Err(e) => return commit_error(e, Details::about("snapshot_id", id)),
        };
        if job.state == JobState::Failed {
            let code = job.error_code.unwrap_or(CommitCode::BackgroundProcessingFailed);
            let message = format!(
                "background commit processing failed: {}",
                job.error.as_deref().unwrap_or("no reason recorded")
            );
            return error(
                http_status(code),
                code.as_str(),
                message,
                Details::about("snapshot_id", id),
            );
        }
        let mut r = json(StatusCode::CREATED, &job_view(job));
        if let Ok(location) = format!("/api/v1/snapshots/{id}").parse() {
            r.headers_mut().insert(LOCATION, location);
        }
        r
    }

    fn list(&self, query: &str) -> Response<Body> {
        let ListQuery { state, limit, offset } = match parse_list_query(query) {
            Ok(query) => query,
            Err(message) => return bad_request(message),
        };
        let jobs = match self.commits.jobs() {
            Ok(jobs) => jobs,
            Err(e) => return commit_error(e, Details::default()),
        };
        let matching: Vec<Job> = jobs
            .into_iter()
            .filter(|j| state.is_none_or(|s| j.state == s))
            .collect();
        let total = matching.len();
        let snapshots = matching.into_iter().skip(offset).take(limit).map(job_view).collect();
        json(
            StatusCode::OK,
            &JobPage {
                snapshots,
                total,
                limit,
                offset,
            },
        )
    }
}

/// Why a request's body or query was refused before anything ran.
#[derive(Debug)]
pub enum RequestError {
    /// Not the JSON or query the API takes: 400 with this message.
    Malformed(String),
    /// Well-formed, but a value the commit refuses.
    Commit(CommitError),
}

/// The commit a `POST /api/v1/snapshots` body asks for: the reference's
/// `{"container_id", "target_ref", "options": {..}}`, or our flat body
/// (`container`, `target` and the options beside them). `namespace` is
/// used when the body names none. Values are checked in full by the commit
/// itself ([`CommitOptions::validate`]).
pub fn parse_create(body: &[u8], namespace: &str) -> Result<CreateRequest, RequestError> {
    let mut fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    let container = take_text(&mut fields, &["container_id", "container"])?
        .ok_or_else(|| malformed("missing field `container_id`".into()))?;
    let target = take_text(&mut fields, &["target_ref", "target"])?
        .ok_or_else(|| malformed("missing field `target_ref`".into()))?;
    let namespace = take_text(&mut fields, &["namespace"])?.unwrap_or_else(|| namespace.to_string());
    // The options object, with any option given flat beside it; one given
    // in both places is refused rather than guessed.
    let mut options = match fields.remove("options") {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(options)) => options,
        Some(_) => return Err(malformed("`options` must be an object".into())),
    };
    // The reference's `CommitOptions` also carries the container's id.
    match options.remove("container_id") {
        Some(serde_json::Value::String(id)) if id == container => {}
        None => {}
        Some(_) => {
            return Err(malformed(
                "options.container_id differs from container_id: name the container once".into(),
            ))
        }
    }
    for (key, value) in fields {
        if options.contains_key(&key) {
            return Err(malformed(format!("`{key}` is given both in options and beside them")));
        }
        options.insert(key, value);
    }
    let given: RequestOptions =
        serde_json::from_value(serde_json::Value::Object(options)).map_err(|e| malformed(e.to_string()))?;
    if given.background_workers == Some(0) {
        return Err(RequestError::Commit(CommitError::InvalidParameter(
            "background_workers must be at least 1".into(),
        )));
    }
    let defaults = CommitOptions::default();
    Ok(CreateRequest {
        wait: given.wait,
        options: CommitOptions {
            format: CommitOptions::parse_format(given.format.as_deref().unwrap_or_default())
                .map_err(RequestError::Commit)?,
            namespace,
            container,
            target,
            work_dir: given.work_dir.unwrap_or(defaults.work_dir),
            fs_version: match given.fs_version {
                Some(version) => version.number()?,
                None => defaults.fs_version,
            },
            compressor: given.compressor.unwrap_or(defaults.compressor),
            target_insecure: given.target_insecure.unwrap_or(defaults.target_insecure),
            source_insecure: given.source_insecure.unwrap_or(defaults.source_insecure),
            with_paths: given.with_paths.unwrap_or(defaults.with_paths),
            without_paths: given.without_paths.unwrap_or(defaults.without_paths),
            maximum_times: given.maximum_times.unwrap_or(defaults.maximum_times),
            target_creds: given.target_creds,
            source_creds: given.source_creds,
        },
    })
}

/// A body that is not the JSON the API takes, saying why.
fn malformed(reason: String) -> RequestError {
    RequestError::Malformed(format!("request body: {reason}"))
}

/// Removes the string field of `fields` named by one of `names` (their
/// spellings); None when none is there. Two spellings at once are refused.
fn take_text(
    fields: &mut serde_json::Map<String, serde_json::Value>,
    names: &[&str],
) -> Result<Option<String>, RequestError> {
    let mut found = None;
    for name in names {
        match fields.remove(*name) {
            None => {}
            Some(_) if found.is_some() => return Err(malformed(format!("give only one of {}", names.join(", ")))),
            Some(serde_json::Value::String(text)) => found = Some(text),
            Some(_) => return Err(malformed(format!("`{name}` must be a string"))),
        }
    }
    Ok(found)
}

/// What `GET /api/v1/snapshots?state=&limit=&offset=` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub state: Option<JobState>,
    pub limit: usize,
    pub offset: usize,
}

/// Parses the query of a job listing; the message says what is wrong.
pub fn parse_list_query(query: &str) -> Result<ListQuery, String> {
    let mut parsed = ListQuery {
        state: None,
        limit: 100,
        offset: 0,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "state" => {
                parsed.state = Some(value.parse::<JobState>()?);
            }
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => parsed.limit = n,
                _ => return Err(format!("limit {value:?} is not a number from 1 to {MAX_LIMIT}")),
            },
            "offset" => match value.parse::<usize>() {
                Ok(n) => parsed.offset = n,
                Err(_) => return Err(format!("offset {value:?} is not a non-negative number")),
            },
            other => return Err(format!("unknown query parameter {other:?} (state, limit, offset)")),
        }
    }
    Ok(parsed)
}

fn payload_too_large() -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        CommitCode::InvalidParameter.as_str(),
        format!("request body is larger than {MAX_BODY} bytes"),
        Details::default(),
    )
}

/// The body of `request`, at most `MAX_BODY` bytes: a larger declared
/// length is refused before a byte is read, a longer stream as soon as it
/// passes the cap.
async fn read_body(request: Request<Body>) -> Result<Vec<u8>, Response<Body>> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(payload_too_large());
    }
    let mut body = request.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) if bytes.len() + c.len() <= MAX_BODY => bytes.extend_from_slice(&c),
            Ok(_) => return Err(payload_too_large()),
            Err(e) if timed_out(&e) => return Err(body_timeout(&e)),
            Err(e) => return Err(bad_request(format!("reading the request body: {e}"))),
        }
    }
    Ok(bytes)
}

/// Whether reading failed because the connection's idle timeout struck.
fn timed_out(e: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn body_timeout(reason: &dyn std::fmt::Display) -> Response<Body> {
    error(
        StatusCode::REQUEST_TIMEOUT,
        CommitCode::InvalidParameter.as_str(),
        format!("the request body did not arrive in time: {reason}"),
        Details::default(),
    )
}

/// Serves HTTP/1 connections from `accept` (a stream and the client's
/// address, None on a unix socket) until `shutdown` completes. At most
/// `limits.max_connections` are served at once (accepting waits for one to
/// end); each must send its request headers within the header timeout and
/// is closed after the idle timeout without a byte; a failed accept is
/// retried after a back-off.
pub async fn serve<S, A, F>(
    api: Arc<RestApi>,
    limits: ConnectionLimits,
    mut accept: A,
    shutdown: impl Future<Output = ()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> F,
    F: Future<Output = std::io::Result<(S, Option<IpAddr>)>>,
{
    tokio::pin!(shutdown);
    let slots = limits.connection_slots();
    let mut backoff = AcceptBackoff::new("rest");
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => return,
            // Never closed: the semaphore lives as long as this loop.
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = accept() => accepted,
        };
        let Some((stream, peer)) = backoff.accepted(accepted).await else {
            continue;
        };
        // One byte opens a request; hyper's header timeout then bounds the
        // rest of its headers.
        let stream = Guarded::new(stream, slot, &limits, tokio::time::Instant::now(), 1);
        let busy = stream.busy();
        let api = api.clone();
        let header_timeout = limits.header_timeout();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let api = api.clone();
                // A client waiting for a job's end is not idle.
                let answering = busy.answering();
                async move {
                    let response = api.handle(request, peer).await;
                    drop(answering);
                    Ok::<_, Infallible>(response)
                }
            });
            if let Err(e) = hyper::server::conn::Http::new()
                .http1_only(true)
                .http1_header_read_timeout(header_timeout)
                .serve_connection(stream, service)
                .await
            {
                debug!(error = %e, peer = ?peer, "REST connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies_and_queries_are_parsed_or_refused_saying_why() {
        // Our flat body.
        let flat = parse_create(
            br#"{"container":"c1","target":"r/app:1","format":"oci","with_paths":["/data"]}"#,
            "default",
        )
        .unwrap();
        let options = &flat.options;
        assert_eq!(options.format, crate::commit::Format::Oci);
        assert_eq!((options.namespace.as_str(), options.maximum_times), ("default", 10));
        assert!(!flat.wait);
        assert!(
            options.work_dir.as_os_str().is_empty(),
            "the daemon's private work dir by default"
        );
        let refused = |body: &[u8]| match parse_create(body, "default") {
            Err(RequestError::Malformed(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(refused(br#"{"container":"c1"}"#).contains("missing field `target_ref`"));
        assert!(refused(br#"{"container":"c1","target":"t","hooks":[]}"#).contains("unknown field `hooks`"));
        assert!(refused(b"\xff{").contains("request body"));
        assert!(matches!(
            parse_create(br#"{"container":"c1","target":"r/a:1","format":"docker"}"#, "default"),
            Err(RequestError::Commit(_))
        ));
    }

    #[test]
    fn the_reference_body_is_taken_with_every_option_by_its_json_tag() {
        let body = br#"{"container_id": "mycontainer", "target_ref": "registry.example.com/myimage:snapshot",
            "options": {"wait": true, "work_dir": "/data/nydus-work", "fs_version": "5", "compressor": "zstd",
                "target_insecure": true, "source_insecure": true, "with_paths": ["/app"],
                "without_paths": ["/app/cache"], "maximum_times": 3, "background_workers": 2,
                "container_id": "mycontainer"}}"#;
        let parsed = parse_create(body, "apps").unwrap();
        assert!(parsed.wait);
        let o = parsed.options;
        assert_eq!(
            (o.namespace.as_str(), o.container.as_str(), o.target.as_str()),
            ("apps", "mycontainer", "registry.example.com/myimage:snapshot"),
            "a request naming no namespace is for the daemon's [rest] namespace"
        );
        assert_eq!((o.fs_version, o.compressor.as_str(), o.maximum_times), (5, "zstd", 3));
        assert_eq!(o.work_dir, PathBuf::from("/data/nydus-work"));
        assert!(o.target_insecure && o.source_insecure);
        assert_eq!(o.with_paths, vec![PathBuf::from("/app")]);
        assert_eq!(o.without_paths, vec![PathBuf::from("/app/cache")]);
        assert_eq!(o.format, crate::commit::Format::Nydus, "nydus unless told");

        // The reference's minimal body, with the version as a number too,
        // and a namespace of its own.
        let minimal = parse_create(
            br#"{"container_id":"c","target_ref":"r/a:1","namespace":"k8s.io","options":{"fs_version":6}}"#,
            "apps",
        )
        .unwrap();
        assert_eq!(
            (minimal.options.namespace.as_str(), minimal.options.fs_version),
            ("k8s.io", 6)
        );

        let refused = |body: &[u8]| match parse_create(body, "default") {
            Err(RequestError::Malformed(m)) => m,
            Err(RequestError::Commit(e)) => e.to_string(),
            Ok(other) => panic!("{other:?}"),
        };
        assert!(refused(br#"{"container_id":"c","container":"c","target_ref":"r/a:1"}"#).contains("only one of"));
        assert!(refused(
            br#"{"container_id":"c","target_ref":"r/a:1","compressor":"zstd","options":{"compressor":"none"}}"#
        )
        .contains("both in options and beside them"));
        assert!(
            refused(br#"{"container_id":"c","target_ref":"r/a:1","options":{"fs_version":"six"}}"#)
                .contains("fs_version \"six\"")
        );
        assert!(
            refused(br#"{"container_id":"c","target_ref":"r/a:1","options":{"background_workers":0}}"#)
                .contains("background_workers")
        );
        assert!(
            refused(br#"{"container_id":"c","target_ref":"r/a:1","options":{"container_id":"d"}}"#).contains("differs")
        );
        assert!(refused(br#"{"container_id":"c","target_ref":"r/a:1","options":[]}"#).contains("must be an object"));
        assert!(refused(br#"{"container_id":7,"target_ref":"r/a:1"}"#).contains("must be a string"));
        assert!(refused(br#"[]"#).contains("request body"));
    }

    #[test]
    fn list_queries_are_parsed_or_refused_saying_why() {
        assert_eq!(
            parse_list_query("state=failed&limit=5&offset=10").unwrap(),
            ListQuery {
                state: Some(JobState::Failed),
                limit: 5,
                offset: 10
            }
        );
        assert!(parse_list_query("limit=0").unwrap_err().contains("limit \"0\""));
        assert!(parse_list_query("limit=99999999999999999999999").is_err());
        assert!(parse_list_query("state=sleeping").unwrap_err().contains("sleeping"));
        assert!(parse_list_query("sort=asc")
            .unwrap_err()
            .contains("unknown query parameter"));
    }

    #[test]
    fn statuses_follow_the_codes() {
        assert_eq!(http_status(CommitCode::InvalidParameter), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(CommitCode::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(CommitCode::ContainerNotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(CommitCode::SnapshotInProgress), StatusCode::CONFLICT);
        assert_eq!(http_status(CommitCode::ContainerNotRunning), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(CommitCode::SnapshotNotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(CommitCode::PauseTimeout), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
