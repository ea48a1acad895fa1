//! Docker Engine's API over its unix socket: the calls a checkpoint and a
//! restore of a Docker container make (inspect, create, start from a
//! checkpoint, top, exec, logs, stats, remove, info).
//!
//! Written on hyper's client connection rather than with bollard: bollard
//! has no checkpoint endpoints and no `checkpoint` parameter on start, and
//! its generated models crate would be the largest build in our graph for
//! ten endpoints. Answers are read as `serde_json::Value` and picked by the
//! caller: the engine is outside this process, so nothing it says is
//! trusted further than the field read from it.
//!
//! Knows nothing of checkpoints: it only speaks the engine's API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::{Body, Method, Request, StatusCode};
use serde_json::Value;

/// Where Docker's CLI looks when `DOCKER_HOST` is unset.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The longest any one call may take: a checkpoint restore (start) of a
/// large process is the slowest.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The most of an answer read into memory (stats and inspect are a few KiB;
/// logs are asked for by their tail).
const MAX_ANSWER: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("DOCKER_HOST {0:?}: only unix:// sockets are supported")]
    Host(String),
    #[error("cannot reach Docker's engine at {socket}: {source}")]
    Connect { socket: String, source: std::io::Error },
    #[error("Docker's engine at {socket}: {message}")]
    Transport { socket: String, message: String },
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    #[error("Docker's engine refused {call}: {message} (HTTP {status})")]
    Refused { call: String, status: u16, message: String },
    #[error("Docker's engine answered {call} with {what}")]
    Answer { call: String, what: String },
}

/// A client of one engine, reached at `socket`.
#[derive(Debug, Clone)]
pub struct DockerClient {
    socket: PathBuf,
}

/// What `exec` ran and saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub output: String,
}

impl DockerClient {
    pub fn new(socket: impl Into<PathBuf>) -> DockerClient {
        DockerClient { socket: socket.into() }
    }

    /// The engine `DOCKER_HOST` names (`unix:///path`), or Docker's default
    /// socket when it is unset or empty.
    pub fn from_env() -> Result<DockerClient, DockerError> {
        Self::from_host(std::env::var("DOCKER_HOST").ok().as_deref())
    }

    pub fn from_host(host: Option<&str>) -> Result<DockerClient, DockerError> {
        match host.filter(|h| !h.is_empty()) {
            None => Ok(DockerClient::new(DEFAULT_SOCKET)),
            Some(host) => match host.strip_prefix("unix://") {
                Some(path) if path.starts_with('/') => Ok(DockerClient::new(path)),
                _ => Err(DockerError::Host(host.to_string())),
            },
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /containers/{name}/json`: the container by id, name or unique
    /// id prefix, as the engine resolves them.
    pub async fn inspect(&self, name: &str) -> Result<Value, DockerError> {
        let path = format!("/containers/{}/json", encode(name));
        self.call_json(Method::GET, &path, None, &format!("inspect {name}"))
            .await
            .map_err(|e| not_found_as(e, name))
    }

    /// `GET /info`.
    pub async fn info(&self) -> Result<Value, DockerError> {
        self.call_json(Method::GET, "/info", None, "info").await
    }

    /// `POST /containers/create?name=`: returns the new container's id.
    pub async fn create(&self, name: &str, body: &Value) -> Result<String, DockerError> {
        let path = format!("/containers/create?name={}", encode(name));
        let call = format!("create {name}");
        let answer = self.call_json(Method::POST, &path, Some(body), &call).await?;
        string_field(&answer, "Id", &call)
    }

    /// `POST /containers/{id}/start`, from the checkpoint `checkpoint` of
    /// the container's own checkpoint directory when given.
    pub async fn start(&self, id: &str, checkpoint: Option<&str>) -> Result<(), DockerError> {
        let mut path = format!("/containers/{}/start", encode(id));
        if let Some(checkpoint) = checkpoint {
            path.push_str(&format!("?checkpoint={}", encode(checkpoint)));
        }
        self.call(Method::POST, &path, None, &format!("start {id}")).await?;
        Ok(())
    }

    /// `POST /containers/{id}/pause` (the engine freezes it).
    pub async fn pause(&self, id: &str) -> Result<(), DockerError> {
        let path = format!("/containers/{}/pause", encode(id));
        self.call(Method::POST, &path, None, &format!("pause {id}")).await?;
        Ok(())
    }

    /// `POST /containers/{id}/unpause`.
    pub async fn unpause(&self, id: &str) -> Result<(), DockerError> {
        let path = format!("/containers/{}/unpause", encode(id));
        self.call(Method::POST, &path, None, &format!("unpause {id}"))
            .await
            .map_err(|e| not_found_as(e, id))?;
        Ok(())
    }

    /// `DELETE /containers/{id}?force=1`.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let path = format!("/containers/{}?force=1", encode(id));
        self.call(Method::DELETE, &path, None, &format!("remove {id}")).await?;
        Ok(())
    }

    /// `GET /containers/{id}/top`: the processes the engine finds in the
    /// container (through runc), as rows of `ps` columns.
    pub async fn top(&self, id: &str) -> Result<Value, DockerError> {
        let path = format!("/containers/{}/top", encode(id));
        self.call_json(Method::GET, &path, None, &format!("top {id}")).await
    }

    /// Runs `cmd` in the container and waits for it: its exit code and
    /// output (stdout and stderr, demultiplexed).
    pub async fn exec(&self, id: &str, cmd: &[&str]) -> Result<ExecOutput, DockerError> {
        let call = format!("exec in {id}");
        let body = serde_json::json!({"Cmd": cmd, "AttachStdout": true, "AttachStderr": true});
        let created = self
            .call_json(
                Method::POST,
                &format!("/containers/{}/exec", encode(id)),
                Some(&body),
                &call,
            )
            .await?;
        let exec_id = string_field(&created, "Id", &call)?;
        let start = serde_json::json!({"Detach": false, "Tty": false});
        let raw = self
            .call(
                Method::POST,
                &format!("/exec/{}/start", encode(&exec_id)),
                Some(&start),
                &call,
            )
            .await?;
        let output = demultiplex(&raw).unwrap_or_else(|| String::from_utf8_lossy(&raw).into_owned());
        let inspected = self
            .call_json(Method::GET, &format!("/exec/{}/json", encode(&exec_id)), None, &call)
            .await?;
        let exit_code = inspected
            .get("ExitCode")
            .and_then(Value::as_i64)
            .ok_or_else(|| DockerError::Answer {
                call: call.clone(),
                what: "no ExitCode".into(),
            })?;
        Ok(ExecOutput { exit_code, output })
    }

    /// The last `tail` lines the container logged (stdout and stderr).
    pub async fn logs(&self, id: &str, tail: usize, tty: bool) -> Result<Vec<String>, DockerError> {
        let path = format!("/containers/{}/logs?stdout=1&stderr=1&tail={tail}", encode(id));
        let raw = self.call(Method::GET, &path, None, &format!("logs of {id}")).await?;
        let text = if tty {
            String::from_utf8_lossy(&raw).into_owned()
        } else {
            demultiplex(&raw).ok_or_else(|| DockerError::Answer {
                call: format!("logs of {id}"),
                what: "a malformed log stream".into(),
            })?
        };
        Ok(text.lines().map(str::to_string).collect())
    }

    /// One sample of `GET /containers/{id}/stats`.
    pub async fn stats(&self, id: &str) -> Result<Value, DockerError> {
        let path = format!("/containers/{}/stats?stream=false", encode(id));
        self.call_json(Method::GET, &path, None, &format!("stats of {id}"))
            .await
    }

    async fn call_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        call: &str,
    ) -> Result<Value, DockerError> {
        let raw = self.call(method, path, body, call).await?;
        serde_json::from_slice(&raw).map_err(|e| DockerError::Answer {
            call: call.to_string(),
            what: format!("no JSON ({e})"),
        })
    }

    /// One request on a connection of its own; an answer outside 2xx is an
    /// error carrying the engine's message.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>, call: &str) -> Result<Vec<u8>, DockerError> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_unbounded(method, path, body, call))
            .await
            .map_err(|_| self.transport(format!("{call} took longer than {CALL_TIMEOUT:?}")))?
    }

    async fn call_unbounded(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        call: &str,
    ) -> Result<Vec<u8>, DockerError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| DockerError::Connect {
                socket: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::handshake(stream)
            .await
            .map_err(|e| self.transport(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "docker")
            .header("Content-Type", "application/json");
        let body = match body {
            Some(value) => Body::from(value.to_string()),
            None => Body::empty(),
        };
        let request = request.body(body).map_err(|e| self.transport(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.transport(e.to_string()))?;
        let status = response.status();
        let bytes = read_bounded(response.into_body())
            .await
            .map_err(|e| self.transport(format!("{call}: {e}")))?;
        driver.abort();
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
        Err(DockerError::Refused {
            call: call.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    fn transport(&self, message: String) -> DockerError {
        DockerError::Transport {
            socket: self.socket.display().to_string(),
            message,
        }
    }
}

/// A 404 of a call about the container `name` is "no such container".
fn not_found_as(error: DockerError, name: &str) -> DockerError {
    match error {
        DockerError::Refused { status, .. } if status == StatusCode::NOT_FOUND.as_u16() => {
            DockerError::NoSuchContainer(name.to_string())
        }
        other => other,
    }
}

async fn read_bounded(mut body: Body) -> Result<Vec<u8>, String> {
    use hyper::body::HttpBody;
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if bytes.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("answer larger than {MAX_ANSWER} bytes"));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

fn string_field(answer: &Value, field: &str, call: &str) -> Result<String, DockerError> {
    answer
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| DockerError::Answer {
            call: call.to_string(),
            what: format!("no {field}"),
        })
}

/// Percent-encodes a path segment or query value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The text of the engine's multiplexed stream (stdout and stderr frames of
/// an 8-byte header each: stream, three zero bytes, big-endian length), or
/// None when it is not one.
pub fn demultiplex(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while !rest.is_empty() {
        if rest.len() < 8 || rest[0] > 2 || rest[1..4] != [0, 0, 0] {
            return None;
        }
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let frame = rest.get(8..8 + len)?;
        out.extend_from_slice(frame);
        rest = &rest[8 + len..];
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_is_a_unix_socket_or_the_default() {
        assert_eq!(
            DockerClient::from_host(None).unwrap().socket(),
            Path::new(DEFAULT_SOCKET)
        );
        assert_eq!(
            DockerClient::from_host(Some("")).unwrap().socket(),
            Path::new(DEFAULT_SOCKET)
        );
        assert_eq!(
            DockerClient::from_host(Some("unix:///tmp/d/docker.sock"))
                .unwrap()
                .socket(),
            Path::new("/tmp/d/docker.sock")
        );
        for bad in [
            "tcp://127.0.0.1:2375",
            "unix://relative.sock",
            "/var/run/docker.sock",
            "ssh://h",
        ] {
            assert!(
                matches!(DockerClient::from_host(Some(bad)), Err(DockerError::Host(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn multiplexed_frames_are_joined_and_anything_else_refused() {
        let mut raw = vec![1, 0, 0, 0, 0, 0, 0, 3];
        raw.extend_from_slice(b"ab\n");
        raw.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 2]);
        raw.extend_from_slice(b"c\n");
        assert_eq!(demultiplex(&raw).as_deref(), Some("ab\nc\n"));
        assert_eq!(demultiplex(b"").as_deref(), Some(""));
        assert_eq!(demultiplex(b"plain text"), None);
        // A frame longer than what follows.
        assert_eq!(demultiplex(&[1, 0, 0, 0, 0, 0, 0, 9, b'x']), None);
    }

    #[test]
    fn names_are_encoded_as_one_segment() {
        assert_eq!(encode("testapp-restored_1.x"), "testapp-restored_1.x");
        assert_eq!(encode("../x?y=1&z"), "..%2Fx%3Fy%3D1%26z");
    }
}
