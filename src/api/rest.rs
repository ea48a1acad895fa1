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
use std::time::Duration;

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
use crate::commit::{CommitCode, CommitError, CommitOptions, CommitService, Job, JobState};
use crate::config::{ConnectionLimits, RestConfig};
use crate::oci::credentials::RegistryCredentials;
use crate::time::rfc3339;

/// Request bodies larger than this are refused, before any byte of them is
/// parsed.
pub const MAX_BODY: usize = 1 << 20;
const MAX_LIMIT: usize = 1000;

/// What the REST API serves, and whether it asks for the token.
#[derive(Debug, Clone)]
pub struct RestApi {
    commits: Arc<CommitService>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSnapshot {
    container: String,
    target: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    format: String,
    #[serde(default = "default_work_dir")]
    work_dir: PathBuf,
    #[serde(default = "default_fs_version")]
    fs_version: u32,
    #[serde(default = "default_compressor")]
    compressor: String,
    #[serde(default)]
    target_insecure: bool,
    #[serde(default)]
    source_insecure: bool,
    #[serde(default)]
    with_paths: Vec<PathBuf>,
    #[serde(default)]
    without_paths: Vec<PathBuf>,
    #[serde(default = "default_maximum_times")]
    maximum_times: u32,
    /// `{"username": .., "password": ..}` for the target's registry, for
    /// this request only: never stored or shown.
    #[serde(default)]
    target_creds: Option<RegistryCredentials>,
    /// The same for the source image's registry.
    #[serde(default)]
    source_creds: Option<RegistryCredentials>,
}

// Missing fields take the commit's own defaults.
fn default_namespace() -> String {
    CommitOptions::default().namespace
}
fn default_work_dir() -> PathBuf {
    CommitOptions::default().work_dir
}
fn default_fs_version() -> u32 {
    CommitOptions::default().fs_version
}
fn default_compressor() -> String {
    CommitOptions::default().compressor
}
fn default_maximum_times() -> u32 {
    CommitOptions::default().maximum_times
}

#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    details: String,
}

#[derive(Debug, Serialize)]
struct JobView {
    snapshot_id: String,
    namespace: String,
    container: String,
    target: String,
    state: &'static str,
    progress: f64,
    stage: String,
    pause_time_seconds: f64,
    started_at: String,
    ended_at: Option<String>,
    manifest_digest: Option<String>,
    /// "full", "incremental" or "merged"; empty until decided.
    layer_plan: String,
    /// Commit layers above the source image's own in the pushed image.
    commit_layers: u32,
    error: Option<JobError>,
}

#[derive(Debug, Serialize)]
struct JobError {
    code: &'static str,
    message: String,
}

fn job_view(job: Job) -> JobView {
    JobView {
        state: job.state.as_str(),
        pause_time_seconds: job.pause.as_secs_f64(),
        started_at: rfc3339(job.started),
        ended_at: job.ended.map(rfc3339),
        error: job.error_code.map(|c| JobError {
            code: c.as_str(),
            message: job.error.clone().unwrap_or_default(),
        }),
        snapshot_id: job.snapshot_id,
        namespace: job.namespace,
        container: job.container,
        target: job.options.target,
        progress: job.progress,
        stage: job.stage,
        manifest_digest: job.manifest_digest,
        layer_plan: job.layer_plan,
        commit_layers: job.commit_layers,
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

fn error(status: StatusCode, code: &str, message: String, details: String) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: ErrorDetail { code, message, details },
        },
    )
}

fn commit_error(e: CommitError) -> Response<Body> {
    let code = e.code();
    let status = match e {
        CommitError::JobNotFound { .. } => StatusCode::NOT_FOUND,
        _ => http_status(code),
    };
    error(status, code.as_str(), e.to_string(), String::new())
}

fn bad_request(message: String) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        CommitCode::InvalidParameter.as_str(),
        message,
        String::new(),
    )
}

impl RestApi {
    /// `token` set: every request must carry `Authorization: Bearer <token>`,
    /// and wrong ones count against the caller's address as `limits` says.
    pub fn new(commits: Arc<CommitService>, limits: &ConnectionLimits, token: Option<String>) -> Self {
        RestApi {
            commits,
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
                        String::new(),
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
                        String::new(),
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
                Err(e) => commit_error(e),
            },
            (&Method::GET, ["api", "v1", "metrics"]) => match self.commits.jobs() {
                Ok(jobs) => json(StatusCode::OK, &CommitMetrics::of(&jobs)),
                Err(e) => commit_error(e),
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
                Err(e) => commit_error(e),
            },
            (_, ["api", "v1", "snapshots", ..]) | (_, ["api", "v1", "metrics"]) | (_, ["metrics"]) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                CommitCode::InvalidParameter.as_str(),
                format!("{method} is not allowed on {path}"),
                String::new(),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                format!("no endpoint {path}"),
                "endpoints: /api/v1/snapshots, /api/v1/snapshots/{id}, /api/v1/metrics, /metrics".into(),
            ),
        }
    }

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
        let options = match parse_create(&bytes) {
            Ok(options) => options,
            Err(RequestError::Malformed(message)) => return bad_request(message),
            Err(RequestError::Commit(e)) => return commit_error(e),
        };
        match self.commits.commit(options).await {
            Ok(started) => {
                let job = match self.commits.job(&started.snapshot_id) {
                    Ok(job) => job,
                    Err(e) => return commit_error(e),
                };
                let mut r = json(StatusCode::CREATED, &job_view(job));
                if let Ok(location) = format!("/api/v1/snapshots/{}", started.snapshot_id).parse() {
                    r.headers_mut().insert(LOCATION, location);
                }
                r
            }
            Err(e) => commit_error(e),
        }
    }

    fn list(&self, query: &str) -> Response<Body> {
        let ListQuery { state, limit, offset } = match parse_list_query(query) {
            Ok(query) => query,
            Err(message) => return bad_request(message),
        };
        let jobs = match self.commits.jobs() {
            Ok(jobs) => jobs,
            Err(e) => return commit_error(e),
        };
        let matching: Vec<Job> = jobs
            .into_iter()
            .filter(|j| state.is_none_or(|s| j.state == s))
            .collect();
        let total = matching.len();
        let page: Vec<JobView> = matching.into_iter().skip(offset).take(limit).map(job_view).collect();
        json(
            StatusCode::OK,
            &serde_json::json!({"snapshots": page, "total": total, "limit": limit, "offset": offset}),
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

/// The commit a `POST /api/v1/snapshots` body asks for. Values are checked
/// in full by the commit itself ([`CommitOptions::validate`]).
pub fn parse_create(body: &[u8]) -> Result<CommitOptions, RequestError> {
    let create: CreateSnapshot =
        serde_json::from_slice(body).map_err(|e| RequestError::Malformed(format!("request body: {e}")))?;
    Ok(CommitOptions {
        format: CommitOptions::parse_format(&create.format).map_err(RequestError::Commit)?,
        namespace: create.namespace,
        container: create.container,
        target: create.target,
        work_dir: create.work_dir,
        fs_version: create.fs_version,
        compressor: create.compressor,
        target_insecure: create.target_insecure,
        source_insecure: create.source_insecure,
        with_paths: create.with_paths,
        without_paths: create.without_paths,
        maximum_times: create.maximum_times,
        target_creds: create.target_creds,
        source_creds: create.source_creds,
    })
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
        String::new(),
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
        String::new(),
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
        let api = api.clone();
        let header_timeout = limits.header_timeout();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(request, peer).await) }
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
        let options =
            parse_create(br#"{"container":"c1","target":"r/app:1","format":"oci","with_paths":["/data"]}"#).unwrap();
        assert_eq!(options.format, crate::commit::Format::Oci);
        assert_eq!((options.namespace.as_str(), options.maximum_times), ("default", 10));
        assert!(
            options.work_dir.as_os_str().is_empty(),
            "the daemon's private work dir by default"
        );
        let refused = |body: &[u8]| match parse_create(body) {
            Err(RequestError::Malformed(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(refused(br#"{"container":"c1"}"#).contains("missing field `target`"));
        assert!(refused(br#"{"container":"c1","target":"t","hooks":[]}"#).contains("unknown field `hooks`"));
        assert!(refused(b"\xff{").contains("request body"));
        assert!(matches!(
            parse_create(br#"{"container":"c1","target":"r/a:1","format":"docker"}"#),
            Err(RequestError::Commit(_))
        ));

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
        assert_eq!(http_status(CommitCode::PauseTimeout), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
