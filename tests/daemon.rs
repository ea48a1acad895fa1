//! The daemon served in-process on a temporary socket and driven through
//! containerd's snapshots API with a real gRPC client; plus the real binary
//! killed with SIGKILL while it works.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use containerd_snapshots::api::snapshots::v1 as api;
use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use seamless_snapshotter::api::remote::{RemoteListener, RemoteTarget};
use seamless_snapshotter::api::server;
use seamless_snapshotter::capture::CaptureService;
use seamless_snapshotter::checkpoint::{CheckpointService, CheckpointSettings};
use seamless_snapshotter::commit::CommitService;
use seamless_snapshotter::config::{BackendChoice, Config};
use seamless_snapshotter::config::{ConnectionLimits, RemoteConfig};
use seamless_snapshotter::host::sys::RealSystem;
use seamless_snapshotter::proto::control_client::ControlClient;
use seamless_snapshotter::proto::VersionRequest;
use seamless_snapshotter::snapshot::snapshotter::Snapshotter;
use tokio::net::UnixStream;
use tonic::transport::Channel;
use tonic::Code;

mod hostile;

fn directory_config() -> Config {
    let mut config = Config::default();
    config.storage.backend = BackendChoice::Directory;
    config
}

struct Daemon {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

impl Daemon {
    async fn start(root: &Path, socket: &Path) -> Daemon {
        Daemon::start_with_remote(root, socket, None).await
    }

    async fn start_with_remote(root: &Path, socket: &Path, remote: Option<RemoteListener>) -> Daemon {
        Daemon::start_configured(root, socket, &directory_config(), remote).await
    }

    async fn start_configured(root: &Path, socket: &Path, config: &Config, remote: Option<RemoteListener>) -> Daemon {
        let snapshotter = Snapshotter::open(root, config, Arc::new(RealSystem)).expect("open snapshotter");
        let listener = server::bind_socket(socket).expect("bind socket");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let snapshotter = Arc::new(snapshotter);
        let capture = Arc::new(CaptureService::new(
            snapshotter.clone(),
            root,
            root.join("no-containerd.sock"),
        ));
        let commits = Arc::new(CommitService::new(capture.clone(), 4, None).unwrap());
        let settings = CheckpointSettings::load(root, config).expect("checkpoint settings");
        let checkpoints = Arc::new(CheckpointService::new(capture, settings, root));
        let task = tokio::spawn(server::run(
            listener,
            remote,
            snapshotter,
            commits,
            checkpoints,
            root.to_path_buf(),
            async {
                let _ = stopped.await;
            },
        ));
        Daemon { stop: Some(stop), task }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().expect("stopped once").send(());
        self.task.await.expect("server task").expect("server ran cleanly");
    }
}

async fn channel(socket: &Path) -> Channel {
    seamless_snapshotter::api::client::connect(socket)
        .await
        .expect("connect")
}

async fn client(socket: &Path) -> SnapshotsClient<Channel> {
    SnapshotsClient::new(channel(socket).await)
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<Vec<containerd_snapshots::api::types::Mount>, tonic::Status> {
    c.prepare(api::PrepareSnapshotRequest {
        snapshotter: "seamless".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

async fn commit(c: &mut SnapshotsClient<Channel>, name: &str, key: &str) -> Result<(), tonic::Status> {
    c.commit(api::CommitSnapshotRequest {
        snapshotter: "seamless".into(),
        name: name.into(),
        key: key.into(),
        labels: labels(&[("committed", "yes")]),
    })
    .await
    .map(|_| ())
}

async fn list(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Result<Vec<api::Info>, tonic::Status> {
    let mut stream = c
        .list(api::ListSnapshotsRequest {
            snapshotter: "seamless".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(batch) = stream.message().await? {
        assert!(batch.info.len() <= 100, "batches hold at most 100 infos");
        all.extend(batch.info);
    }
    Ok(all)
}

#[tokio::test]
async fn lifecycle_through_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let daemon = Daemon::start(&tmp.path().join("root"), &socket).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
    let mut c = client(&socket).await;

    let mounts = prepare(&mut c, "ns/1/base", "").await.unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].r#type, "bind");
    assert!(Path::new(&mounts[0].source).is_absolute());
    std::fs::write(Path::new(&mounts[0].source).join("hello"), b"world").unwrap();
    let usage = c
        .usage(api::UsageRequest {
            snapshotter: String::new(),
            key: "ns/1/base".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.inodes, 2);
    assert!(usage.size >= 5);
    commit(&mut c, "ns/2/layer1", "ns/1/base").await.unwrap();
    let info = c
        .stat(api::StatSnapshotRequest {
            snapshotter: String::new(),
            key: "ns/2/layer1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, api::Kind::Committed as i32);
    assert_eq!(info.labels.get("committed").map(String::as_str), Some("yes"));
    assert!(info.created_at.is_some());

    let mounts = prepare(&mut c, "ns/3/ctr", "ns/2/layer1").await.unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    let m = c
        .mounts(api::MountsRequest {
            snapshotter: String::new(),
            key: "ns/3/ctr".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m, mounts);

    let updated = c
        .update(api::UpdateSnapshotRequest {
            snapshotter: String::new(),
            info: Some(api::Info {
                name: "ns/3/ctr".into(),
                labels: labels(&[("a", "1"), ("b", "2")]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.a".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated.labels, labels(&[("a", "1")]));

    for i in 0..250 {
        c.view(api::ViewSnapshotRequest {
            snapshotter: String::new(),
            key: format!("ns/v/{i}"),
            parent: "ns/2/layer1".into(),
            labels: labels(&[("view", "yes")]),
        })
        .await
        .unwrap();
    }
    assert_eq!(list(&mut c, &[]).await.unwrap().len(), 252);
    assert_eq!(list(&mut c, &["labels.view==yes"]).await.unwrap().len(), 250);
    let active = list(&mut c, &["kind==active", "name==ns/2/layer1"]).await.unwrap();
    let mut names: Vec<_> = active.into_iter().map(|i| i.name).collect();
    names.sort();
    assert_eq!(names, vec!["ns/2/layer1", "ns/3/ctr"]);

    for i in 0..250 {
        c.remove(api::RemoveSnapshotRequest {
            snapshotter: String::new(),
            key: format!("ns/v/{i}"),
        })
        .await
        .unwrap();
    }
    c.cleanup(api::CleanupRequest {
        snapshotter: String::new(),
    })
    .await
    .unwrap();
    let version = ControlClient::new(channel(&socket).await)
        .version(VersionRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.storage, "directory");
    daemon.stop().await;
}

#[tokio::test]
async fn bad_requests_get_the_right_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let daemon = Daemon::start(&tmp.path().join("root"), &socket).await;
    let mut c = client(&socket).await;
    for key in ["", "/etc/passwd", "ns/1/../../x"] {
        let e = prepare(&mut c, key, "").await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key:?}: {e:?}");
    }
    // With the namespace named in the header, keys are opaque: path-like is fine, `..` is not.
    let mut request = tonic::Request::new(api::PrepareSnapshotRequest {
        key: "/work/preparing".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("containerd-namespace", "testsuite".parse().unwrap());
    c.prepare(request).await.expect("namespaced path-like key");
    let mut request = tonic::Request::new(api::PrepareSnapshotRequest {
        key: "/work/../x".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("containerd-namespace", "testsuite".parse().unwrap());
    assert_eq!(c.prepare(request).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        prepare(&mut c, "k", "no-such-parent").await.unwrap_err().code(),
        Code::NotFound
    );
    prepare(&mut c, "k", "").await.unwrap();
    let e = prepare(&mut c, "k", "").await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains("k"), "names the key: {e:?}");
    assert_eq!(
        prepare(&mut c, "child", "k").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    commit(&mut c, "K", "k").await.unwrap();
    assert_eq!(
        commit(&mut c, "K2", "K").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        commit(&mut c, "K3", "missing").await.unwrap_err().code(),
        Code::NotFound
    );
    prepare(&mut c, "child", "K").await.unwrap();
    let e = c
        .remove(api::RemoveSnapshotRequest {
            snapshotter: String::new(),
            key: "K".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .prepare(api::PrepareSnapshotRequest {
            snapshotter: String::new(),
            key: "big".into(),
            parent: String::new(),
            labels: labels(&[("k", &"v".repeat(4096))]),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = list(&mut c, &["name=K"]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("column"), "{e:?}");
    let e = c
        .update(api::UpdateSnapshotRequest {
            snapshotter: String::new(),
            info: None,
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .update(api::UpdateSnapshotRequest {
            snapshotter: String::new(),
            info: Some(api::Info {
                name: "K".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    daemon.stop().await;
}

#[tokio::test]
async fn snapshots_survive_restart_and_live_socket_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let socket = tmp.path().join("s.sock");
    let daemon = Daemon::start(&root, &socket).await;
    let mut c = client(&socket).await;
    let mounts = prepare(&mut c, "a", "").await.unwrap();
    std::fs::write(Path::new(&mounts[0].source).join("f"), b"kept").unwrap();
    commit(&mut c, "A", "a").await.unwrap();
    prepare(&mut c, "b", "A").await.unwrap();
    let err = server::bind_socket(&socket).unwrap_err();
    assert!(matches!(err, server::ServerError::InUse { .. }), "{err}");
    daemon.stop().await;

    // The socket file stays behind after an unclean stop; it is replaced.
    assert!(socket.exists());
    let daemon = Daemon::start(&root, &socket).await;
    let mut c = client(&socket).await;
    let names: Vec<String> = list(&mut c, &[]).await.unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(names, vec!["A", "b"]);
    let view = c
        .view(api::ViewSnapshotRequest {
            snapshotter: String::new(),
            key: "v".into(),
            parent: "A".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(std::fs::read(Path::new(&view[0].source).join("f")).unwrap(), b"kept");
    daemon.stop().await;

    std::fs::write(tmp.path().join("plain"), b"x").unwrap();
    let err = server::bind_socket(&tmp.path().join("plain")).unwrap_err();
    assert!(matches!(err, server::ServerError::NotASocket { .. }), "{err}");
}

/// Kills the real daemon with SIGKILL at many points of a stream of Prepare,
/// Commit and Remove calls. After each restart every acknowledged snapshot is
/// there with its data, and no directory is left that metadata does not name.
#[tokio::test]
async fn sigkill_at_any_instant_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let socket = tmp.path().join("s.sock");
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, "[storage]\nbackend = \"directory\"\n").unwrap();
    let mut acknowledged: Vec<String> = Vec::new();
    let mut next = 0u32;
    for round in 0..8u64 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_containerd-seamless-grpc"))
            .arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(&socket)
            .arg("--config")
            .arg(&config)
            .arg("--log-level")
            .arg("warn")
            .spawn()
            .expect("start daemon");
        let mut c = None;
        for _ in 0..200 {
            if let Ok(Ok(ch)) = tokio::time::timeout(
                Duration::from_millis(200),
                seamless_snapshotter::api::client::connect(&socket),
            )
            .await
            {
                c = Some(SnapshotsClient::new(ch));
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let mut c = c.expect("daemon came up");

        // Everything acknowledged before is still there, with its data.
        let names: std::collections::BTreeSet<String> =
            list(&mut c, &[]).await.unwrap().into_iter().map(|i| i.name).collect();
        for name in &acknowledged {
            assert!(
                names.contains(name),
                "round {round}: acknowledged {name} lost; have {names:?}"
            );
            let view = c
                .view(api::ViewSnapshotRequest {
                    snapshotter: String::new(),
                    key: format!("check-{round}-{name}"),
                    parent: name.clone(),
                    labels: HashMap::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .mounts;
            let data = std::fs::read(Path::new(&view[0].source).join("data")).unwrap();
            assert_eq!(data, name.as_bytes());
            c.remove(api::RemoveSnapshotRequest {
                snapshotter: String::new(),
                key: format!("check-{round}-{name}"),
            })
            .await
            .unwrap();
        }
        // No orphan directories survive the restart's recovery.
        let meta_count = names.len();
        let dirs = std::fs::read_dir(root.join("snapshots")).unwrap().count();
        assert_eq!(dirs, meta_count, "round {round}: directories without metadata");

        // Work, and kill at a point that moves each round.
        let killer = {
            let pid = child.id() as i32;
            let delay = Duration::from_millis(15 + round * 11);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            })
        };
        loop {
            next += 1;
            let key = format!("active-{next}");
            let name = format!("layer-{next}");
            let Ok(mounts) = prepare(&mut c, &key, "").await else {
                break;
            };
            std::fs::write(Path::new(&mounts[0].source).join("data"), name.as_bytes()).unwrap();
            if commit(&mut c, &name, &key).await.is_err() {
                break;
            }
            acknowledged.push(name);
        }
        killer.await.unwrap();
        child.wait().unwrap();
    }
    assert!(acknowledged.len() > 8, "the daemon did some work between kills");
}

/// One HTTP/1.1 request over `stream`; returns the status and the body.
async fn http<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: seamless\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A commit service over a directory-storage snapshotter under `dir/root`,
/// with no containerd to reach.
fn commit_service(dir: &Path) -> Arc<CommitService> {
    let root = dir.join("root");
    let snapshotter = Arc::new(Snapshotter::open(&root, &directory_config(), Arc::new(RealSystem)).unwrap());
    let capture = CaptureService::new(snapshotter, &root, dir.join("no-containerd.sock"));
    Arc::new(CommitService::new(Arc::new(capture), 4, None).unwrap())
}

#[tokio::test]
async fn rest_api_on_unix_socket_and_token_guarded_tcp() {
    use seamless_snapshotter::api::rest::{self, RestApi};
    let tmp = tempfile::tempdir().unwrap();
    let commits = commit_service(tmp.path());
    let socket = tmp.path().join("rest.sock");
    let unix = Arc::new(server::bind_socket(&socket).unwrap());
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o660, "REST socket mode");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = ConnectionLimits::default();
    tokio::spawn(rest::serve(
        Arc::new(RestApi::new(commits.clone(), "default", &limits, None)),
        limits.clone(),
        move || {
            let l = unix.clone();
            async move { l.accept().await.map(|(s, _)| (s, None)) }
        },
        async {
            let _ = stopped.await;
        },
    ));
    let tcp = Arc::new(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let tcp_addr = tcp.local_addr().unwrap();
    tokio::spawn(rest::serve(
        Arc::new(RestApi::new(commits.clone(), "default", &limits, Some("s3cret".into()))),
        limits.clone(),
        move || {
            let l = tcp.clone();
            async move { l.accept().await.map(|(s, peer)| (s, Some(peer.ip()))) }
        },
        std::future::pending(),
    ));
    let unix_req = |method: &'static str, path: &'static str, body: &'static str| {
        let socket = socket.clone();
        async move { http(UnixStream::connect(&socket).await.unwrap(), method, path, &[], body).await }
    };

    let (status, body) = unix_req("GET", "/api/v1/snapshots", "").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["total"], 0);
    assert_eq!(v["snapshots"], serde_json::json!([]));

    let (status, body) = unix_req("GET", "/api/v1/snapshots/snapshot-404", "").await;
    assert_eq!(status, 404, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "SNAPSHOT_NOT_FOUND", "{body}");
    assert!(v["error"]["message"].as_str().unwrap().contains("snapshot-404"));
    // The reference's details: the subject, and when.
    assert_eq!(v["error"]["details"]["snapshot_id"], "snapshot-404", "{body}");
    let when = v["error"]["details"]["timestamp"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(when).is_ok() && when.ends_with('Z'), "{when}");

    for (path, needle) in [
        ("/api/v1/snapshots?state=sleeping", "state"),
        ("/api/v1/snapshots?limit=0", "limit"),
        ("/api/v1/snapshots?offset=-1", "offset"),
        ("/api/v1/snapshots?colour=red", "colour"),
    ] {
        let (status, body) = unix_req("GET", path, "").await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body.contains("INVALID_PARAMETER") && body.contains(needle),
            "{path}: {body}"
        );
    }
    let (status, body) = unix_req("POST", "/api/v1/snapshots", "{not json").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = unix_req(
        "POST",
        "/api/v1/snapshots",
        r#"{"container":"c","target":"r/a:1","colour":1}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("colour"), "unknown field named: {body}");
    // The default format (nydus) is checked like the rest before containerd
    // is asked anything.
    let (status, body) = unix_req(
        "POST",
        "/api/v1/snapshots",
        r#"{"container":"c","target":"r/a:1","fs_version":4}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("fs-version"), "{body}");
    let (status, body) = unix_req("POST", "/api/v1/snapshots", r#"{"container":"c","target":"r/a:1"}"#).await;
    assert_eq!(status, 500, "a valid request, no containerd: {body}");
    assert!(
        body.contains("INTERNAL_ERROR") && body.contains("cannot reach containerd"),
        "{body}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["details"]["container_id"], "c", "{body}");
    // The reference's body is refused for the same reason, not for its shape.
    let (status, body) = unix_req(
        "POST",
        "/api/v1/snapshots",
        r#"{"container_id":"c","target_ref":"r/a:1","options":{"wait":false,"work_dir":"/tmp","fs_version":"6","compressor":"lz4_block"}}"#,
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("cannot reach containerd"), "{body}");
    let (status, body) = unix_req("DELETE", "/api/v1/snapshots", "").await;
    assert_eq!(status, 405, "{body}");

    let (status, body) = unix_req("GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("nydus_seamless_snapshots_total{status=\"success\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("nydus_seamless_snapshots_total{status=\"failed\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("nydus_seamless_pause_time_seconds{quantile=\"0.95\"} 0"),
        "{body}"
    );
    assert!(body.contains("nydus_seamless_pause_time_seconds_count 0"), "{body}");
    assert!(
        body.contains("# TYPE nydus_seamless_background_time_seconds summary"),
        "{body}"
    );
    let (status, body) = unix_req("GET", "/api/v1/metrics", "").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["completed"], 0, "our fields stay: {body}");
    assert_eq!(v["metrics"]["total_snapshots"], 0, "{body}");
    assert_eq!(v["metrics"]["average_pause_time"], "0s", "{body}");
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{body}");

    // TCP: the token or nothing.
    let tcp = || async { tokio::net::TcpStream::connect(tcp_addr).await.unwrap() };
    let (status, body) = http(tcp().await, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("PERMISSION_DENIED"), "{body}");
    let (status, _) = http(tcp().await, "GET", "/metrics", &[("Authorization", "Bearer wrong")], "").await;
    assert_eq!(status, 403);
    let (status, body) = http(
        tcp().await,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer s3cret")],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let _ = stop.send(());
}

/// Certificates, keys and a token made by tests/tls/make-certs.sh in `dir`.
fn make_certificates(dir: &Path) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/make-certs.sh");
    let status = std::process::Command::new(script)
        .arg(dir)
        .status()
        .expect("run make-certs.sh (needs openssl)");
    assert!(status.success(), "make-certs.sh failed: {status}");
}

#[tokio::test]
async fn the_control_api_over_tcp_wants_tls_and_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_certificates(&tls);
    let file = |name: &str| tls.join(name).display().to_string();
    let config = RemoteConfig {
        address: "127.0.0.1:0".into(),
        tls_cert: file("server.crt"),
        tls_key: file("server.key"),
        token_file: file("token"),
        ..RemoteConfig::default()
    };
    // A key others may read is refused, naming it.
    std::fs::set_permissions(tls.join("server.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = RemoteListener::bind(&config)
        .await
        .err()
        .expect("an exposed key is refused")
        .to_string();
    assert!(err.contains("remote.tls_key") && err.contains("0640"), "{err}");
    std::fs::set_permissions(tls.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let remote = RemoteListener::bind(&config).await.expect("bind the TLS listener");
    let port = remote.local_addr().unwrap().port();
    let socket = tmp.path().join("s.sock");
    let daemon = Daemon::start_with_remote(&tmp.path().join("root"), &socket, Some(remote)).await;
    let target = RemoteTarget {
        address: format!("https://127.0.0.1:{port}"),
        ca_file: Some(tls.join("ca.crt")),
        token_file: tls.join("token"),
        server_name: None,
    };

    let mut client = seamless_snapshotter::api::client::connect_remote(&target)
        .await
        .expect("connect over TLS");
    let version = client
        .version(VersionRequest {})
        .await
        .expect("version with the token")
        .into_inner();
    assert_eq!(version.version, env!("CARGO_PKG_VERSION"));
    // The certificate's DNS name works as well as its address.
    let by_name = RemoteTarget {
        address: format!("https://localhost:{port}"),
        ..target.clone()
    };
    let mut client = seamless_snapshotter::api::client::connect_remote(&by_name)
        .await
        .expect("connect by name");
    client.version(VersionRequest {}).await.expect("version by name");
    // Plain HTTP/2 to the TLS port gets nothing.
    let plain = tonic::transport::Endpoint::try_from(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Ok(channel) = plain.connect().await {
        let status = ControlClient::new(channel)
            .version(VersionRequest {})
            .await
            .unwrap_err();
        assert_ne!(
            status.code(),
            Code::Unauthenticated,
            "plain text must not reach the API: {status:?}"
        );
    }

    let wrong_token = tmp.path().join("wrong-token");
    std::fs::write(&wrong_token, "not-the-token\n").unwrap();
    std::fs::set_permissions(&wrong_token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut client = seamless_snapshotter::api::client::connect_remote(&RemoteTarget {
        token_file: wrong_token,
        ..target.clone()
    })
    .await
    .expect("TLS succeeds before the token is checked");
    let status = client.version(VersionRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut tokenless = ControlClient::new(
        tonic::transport::Endpoint::try_from(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_with_connector(tower::service_fn({
                let target = target.clone();
                move |_: tonic::transport::Uri| {
                    let remote = target.connector().unwrap();
                    async move {
                        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                        remote.connector.connect(remote.server_name, tcp).await
                    }
                }
            }))
            .await
            .expect("TLS without a token"),
    );
    let status = tokenless.version(VersionRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    for (target, reason) in [
        (
            RemoteTarget {
                ca_file: Some(tls.join("other-ca.crt")),
                ..target.clone()
            },
            "UnknownIssuer",
        ),
        (
            RemoteTarget {
                server_name: Some("node-b.example".into()),
                ..target.clone()
            },
            "not valid for name \"node-b.example\"",
        ),
    ] {
        let err = seamless_snapshotter::api::client::connect_remote(&target)
            .await
            .expect_err("refused")
            .to_string();
        assert!(err.contains(reason) && err.contains(&target.address), "{err}");
    }
    daemon.stop().await;
}

/// A TLS listener of the Control API on a free loopback port, with the
/// certificates and token `make_certificates` wrote in `tls`, and the target
/// a client reaches it by.
async fn remote_listener(tls: &Path, limits: ConnectionLimits) -> (RemoteListener, RemoteTarget) {
    let file = |name: &str| tls.join(name).display().to_string();
    let remote = RemoteListener::bind(&RemoteConfig {
        address: "127.0.0.1:0".into(),
        tls_cert: file("server.crt"),
        tls_key: file("server.key"),
        token_file: file("token"),
        connections: limits,
    })
    .await
    .expect("bind the TLS listener");
    let target = RemoteTarget {
        address: format!("https://127.0.0.1:{}", remote.local_addr().unwrap().port()),
        ca_file: Some(tls.join("ca.crt")),
        token_file: tls.join("token"),
        server_name: None,
    };
    (remote, target)
}

/// Reads `stream` until the server ends it: the bytes it sent before, or
/// the error that ended it. A server that never closes fails the test
/// (after a minute, far beyond any timeout the tests configure) instead of
/// hanging it.
async fn until_closed<S: tokio::io::AsyncRead + Unpin>(mut stream: S) -> Result<Vec<u8>, std::io::Error> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut seen))
        .await
        .expect("the server closes the connection")?;
    Ok(seen)
}

#[tokio::test]
async fn remote_callers_get_only_what_restore_needs() {
    use seamless_snapshotter::proto::*;
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_certificates(&tls);
    let (remote, target) = remote_listener(&tls, ConnectionLimits::default()).await;
    let socket = tmp.path().join("s.sock");
    let daemon = Daemon::start_with_remote(&tmp.path().join("root"), &socket, Some(remote)).await;
    let mut client = seamless_snapshotter::api::client::connect_remote(&target)
        .await
        .expect("connect over TLS");
    // Host paths a caller could aim at: nothing may appear there.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let host_path = elsewhere.display().to_string();
    let nfs = |path: &str| {
        Some(Storage {
            backend: "nfs".into(),
            path: path.into(),
            ..Storage::default()
        })
    };
    let s3_at = |endpoint: &str| {
        Some(Storage {
            backend: "s3".into(),
            bucket: "b".into(),
            region: "us-east-1".into(),
            endpoint: endpoint.into(),
            access_key: "a".into(),
            secret_key: "s".into(),
            ..Storage::default()
        })
    };

    // Every call restore to another node does not need is refused, named.
    let refused: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "SeamlessCommit",
            client
                .seamless_commit(SeamlessCommitRequest {
                    container: "c".into(),
                    target: "r/a:1".into(),
                    work_dir: host_path.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "GetCommit",
            client
                .get_commit(GetCommitRequest {
                    snapshot_id: "s".into(),
                })
                .await
                .map(drop),
        ),
        (
            "CreateCheckpoint",
            client
                .create_checkpoint(CreateCheckpointRequest {
                    storage: nfs(&host_path),
                    container: "c".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "PruneCheckpoints",
            client
                .prune_checkpoints(PruneCheckpointsRequest {
                    storage: nfs(&host_path),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "MergeCheckpoints",
            client
                .merge_checkpoints(MergeCheckpointsRequest {
                    storage: nfs(&host_path),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "ExportCheckpoint",
            client
                .export_checkpoint(ExportCheckpointRequest {
                    id: "cp-20250101-000000".into(),
                    path: elsewhere.join("exported.tar").display().to_string(),
                    overwrite: true,
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "ImportCheckpoint",
            client
                .import_checkpoint(ImportCheckpointRequest {
                    path: "/etc/passwd".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "ScheduleCheckpoints",
            client
                .schedule_checkpoints(ScheduleCheckpointsRequest {
                    checkpoint: Some(CreateCheckpointRequest {
                        storage: s3_at("http://169.254.169.254"),
                        container: "c".into(),
                        ..Default::default()
                    }),
                    interval_secs: 60,
                    automerge: None,
                })
                .await
                .map(drop),
        ),
        (
            "ListSchedules",
            client.list_schedules(ListSchedulesRequest::default()).await.map(drop),
        ),
        (
            "RemoveSchedule",
            client.remove_schedule(RemoveScheduleRequest::default()).await.map(drop),
        ),
        (
            "ContainerStats",
            client.container_stats(ContainerStatsRequest::default()).await.map(drop),
        ),
        (
            "SendCheckpoint",
            client
                .send_checkpoint(SendCheckpointRequest {
                    id: "cp-20250101-000000".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
    ];
    for (rpc, result) in refused {
        let status = result.expect_err(rpc);
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc}: {status:?}");
        assert!(
            status.message().contains(rpc) && status.message().contains("not served over TCP"),
            "{rpc}: {status:?}"
        );
    }

    // In the calls it may make, fields naming host paths or endpoints are
    // refused, named.
    let receiver = client.clone();
    let receive = move |messages: Vec<ReceiveCheckpointRequest>| {
        let mut client = receiver.clone();
        async move { client.receive_checkpoint(tokio_stream::iter(messages)).await.map(drop) }
    };
    let chunk = |storage: Option<Storage>| ReceiveCheckpointRequest {
        storage,
        namespace: "default".into(),
        data: vec![0u8; 512],
    };
    let fields: Vec<(&str, &str, Result<(), tonic::Status>)> = vec![
        (
            "ListCheckpoints",
            "storage.path",
            client
                .list_checkpoints(ListCheckpointsRequest {
                    storage: nfs(&host_path),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "ListCheckpoints",
            "storage.endpoint",
            client
                .list_checkpoints(ListCheckpointsRequest {
                    storage: s3_at("http://127.0.0.1:1"),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "InspectCheckpoint",
            "storage.path",
            client
                .inspect_checkpoint(InspectCheckpointRequest {
                    storage: nfs(&host_path),
                    id: "cp-20250101-000000".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "InspectCheckpoint",
            "storage.endpoint",
            client
                .inspect_checkpoint(InspectCheckpointRequest {
                    storage: s3_at("http://127.0.0.1:1"),
                    id: "cp-20250101-000000".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "RestoreCheckpoint",
            "storage.path",
            client
                .restore_checkpoint(RestoreCheckpointRequest {
                    storage: nfs(&host_path),
                    id: "cp-20250101-000000".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "RestoreCheckpoint",
            "storage.endpoint",
            client
                .restore_checkpoint(RestoreCheckpointRequest {
                    storage: s3_at("http://127.0.0.1:1"),
                    id: "cp-20250101-000000".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "ReceiveCheckpoint",
            "storage.path",
            receive(vec![chunk(nfs(&host_path)), chunk(None)]).await,
        ),
        (
            "ReceiveCheckpoint",
            "storage.endpoint",
            receive(vec![chunk(None), chunk(s3_at("http://127.0.0.1:1"))]).await,
        ),
    ];
    for (rpc, field, result) in fields {
        let status = result.expect_err(rpc);
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc} {field}: {status:?}");
        assert!(
            status.message().contains(rpc) && status.message().contains(field),
            "{rpc} {field}: {status:?}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing was written where a remote caller pointed"
    );

    // The calls it may make reach the daemon: they fail only for want of
    // a checkpoint or of containerd.
    client.version(VersionRequest {}).await.expect("version");
    let listed = client
        .list_checkpoints(ListCheckpointsRequest {
            namespace: "default".into(),
            ..Default::default()
        })
        .await
        .expect("list the node's own checkpoints")
        .into_inner();
    assert!(listed.checkpoints.is_empty());
    let s3 = s3_at("");
    for (rpc, result) in [
        (
            "InspectCheckpoint",
            client
                .inspect_checkpoint(InspectCheckpointRequest {
                    namespace: "default".into(),
                    id: "cp-20250101-000000".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "RestoreCheckpoint",
            client
                .restore_checkpoint(RestoreCheckpointRequest {
                    namespace: "default".into(),
                    id: "cp-20250101-000000".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "ResumeContainer",
            client
                .resume_container(ResumeContainerRequest {
                    engine: String::new(),
                    namespace: "default".into(),
                    container: "c".into(),
                })
                .await
                .map(drop),
        ),
        (
            "ReceiveCheckpoint",
            receive(vec![chunk(Some(Storage::default())), chunk(None)]).await,
        ),
        (
            "ReceiveCheckpoint to s3 at the provider's endpoint",
            receive(vec![chunk(s3.clone())]).await,
        ),
    ] {
        let status = result.expect_err(rpc);
        assert_ne!(status.code(), Code::PermissionDenied, "{rpc} is served: {status:?}");
        assert_ne!(status.code(), Code::Unauthenticated, "{rpc}: {status:?}");
    }

    // The unix socket is not restricted: the same export reaches the
    // catalogue (and fails only for want of the checkpoint).
    let mut local = ControlClient::new(channel(&socket).await);
    let status = local
        .export_checkpoint(ExportCheckpointRequest {
            namespace: "default".into(),
            id: "cp-20250101-000000".into(),
            path: elsewhere.join("exported.tar").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn wrong_tokens_from_one_address_are_locked_out() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_certificates(&tls);
    let limits = ConnectionLimits {
        token_failures: 3,
        token_lockout_secs: 3600,
        ..ConnectionLimits::default()
    };
    let (remote, target) = remote_listener(&tls, limits).await;
    let socket = tmp.path().join("s.sock");
    let daemon = Daemon::start_with_remote(&tmp.path().join("root"), &socket, Some(remote)).await;
    let wrong_token = tmp.path().join("wrong-token");
    std::fs::write(&wrong_token, "not-the-token\n").unwrap();
    std::fs::set_permissions(&wrong_token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut guessing = seamless_snapshotter::api::client::connect_remote(&RemoteTarget {
        token_file: wrong_token,
        ..target.clone()
    })
    .await
    .unwrap();
    let mut right = seamless_snapshotter::api::client::connect_remote(&target)
        .await
        .unwrap();
    // A right token between wrong ones clears the count.
    guessing.version(VersionRequest {}).await.unwrap_err();
    right.version(VersionRequest {}).await.expect("the right token");
    for attempt in 0..3 {
        let status = guessing.version(VersionRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "attempt {attempt}: {status:?}");
    }
    // Locked out: refused without comparing, the right token included.
    for client in [&mut guessing, &mut right] {
        let status = client.version(VersionRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("wrong bearer token"), "{status:?}");
    }
    // The daemon serves its unix socket all along.
    ControlClient::new(channel(&socket).await)
        .version(VersionRequest {})
        .await
        .expect("the unix socket serves");
    daemon.stop().await;
}

#[tokio::test]
async fn hostile_tcp_clients_of_the_control_api_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_certificates(&tls);
    let limits = ConnectionLimits {
        header_timeout_secs: 1,
        idle_timeout_secs: 2,
        ..ConnectionLimits::default()
    };
    let (remote, target) = remote_listener(&tls, limits).await;
    let port = remote.local_addr().unwrap().port();
    let socket = tmp.path().join("s.sock");
    let daemon = Daemon::start_with_remote(&tmp.path().join("root"), &socket, Some(remote)).await;
    let mut client = seamless_snapshotter::api::client::connect_remote(&target)
        .await
        .unwrap();
    client.version(VersionRequest {}).await.expect("before");
    let tcp = || async move { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap() };
    let tls_connect = || {
        let target = target.clone();
        async move {
            let remote = target.connector().unwrap();
            remote
                .connector
                .connect(remote.server_name, tcp().await)
                .await
                .expect("TLS handshake")
        }
    };

    // Garbage instead of a TLS handshake.
    let mut garbage = tcp().await;
    garbage
        .write_all(b"GET / HTTP/1.1\r\n\r\n\x00\x01garbage")
        .await
        .unwrap();
    until_closed(garbage).await.ok();
    // Connected, and never a byte: the handshake times out.
    until_closed(tcp().await).await.ok();
    // Half a handshake.
    let mut half = tcp().await;
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    until_closed(half).await.ok();
    // A handshake, then nothing: no HTTP/2 preface within the header timeout.
    let silent = tls_connect().await;
    until_closed(silent).await.ok();
    // A handshake and half a preface, never finished.
    let mut partial = tls_connect().await;
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    partial.flush().await.unwrap();
    until_closed(partial).await.ok();
    // An oversized message is refused by the decoder, not buffered.
    let status = client
        .list_checkpoints(seamless_snapshotter::proto::ListCheckpointsRequest {
            filter: "x".repeat(5 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    assert!(status.message().contains("too large"), "{status:?}");

    // A live client idle for longer than the idle timeout keeps its
    // connection: it answers the server's pings.
    tokio::time::sleep(Duration::from_secs(3)).await;
    client
        .version(VersionRequest {})
        .await
        .expect("after the hostile clients");
    seamless_snapshotter::api::client::connect_remote(&target)
        .await
        .unwrap()
        .version(VersionRequest {})
        .await
        .expect("a new client after the hostile ones");
    daemon.stop().await;
}

#[tokio::test]
async fn hostile_rest_clients_are_cut_off_and_the_daemon_keeps_serving() {
    use seamless_snapshotter::api::rest::{self, RestApi};
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let commits = commit_service(tmp.path());
    let limits = ConnectionLimits {
        header_timeout_secs: 1,
        idle_timeout_secs: 1,
        token_failures: 2,
        token_lockout_secs: 3600,
        ..ConnectionLimits::default()
    };
    let socket = tmp.path().join("rest.sock");
    let unix = Arc::new(server::bind_socket(&socket).unwrap());
    tokio::spawn(rest::serve(
        Arc::new(RestApi::new(commits.clone(), "default", &limits, None)),
        limits.clone(),
        move || {
            let l = unix.clone();
            async move { l.accept().await.map(|(s, _)| (s, None)) }
        },
        std::future::pending(),
    ));
    let tcp = Arc::new(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let tcp_addr = tcp.local_addr().unwrap();
    tokio::spawn(rest::serve(
        Arc::new(RestApi::new(commits.clone(), "default", &limits, Some("s3cret".into()))),
        limits.clone(),
        move || {
            let l = tcp.clone();
            async move { l.accept().await.map(|(s, peer)| (s, Some(peer.ip()))) }
        },
        std::future::pending(),
    ));
    let auth = [("Authorization", "Bearer s3cret")];

    for over_tcp in [false, true] {
        let connect = || {
            let socket = socket.clone();
            async move {
                if over_tcp {
                    Box::new(tokio::net::TcpStream::connect(tcp_addr).await.unwrap()) as Box<dyn RestStream>
                } else {
                    Box::new(UnixStream::connect(&socket).await.unwrap())
                }
            }
        };
        let headers: &[(&str, &str)] = if over_tcp { &auth } else { &[] };
        let token = if over_tcp {
            "Authorization: Bearer s3cret\r\n"
        } else {
            ""
        };
        let (status, body) = http(connect().await, "GET", "/api/v1/snapshots", headers, "").await;
        assert_eq!(status, 200, "before: {body}");

        // Garbage: hyper answers 400 and closes.
        let mut garbage = connect().await;
        garbage.write_all(b"\x00\x01\x02 NOT HTTP\r\n\r\n").await.unwrap();
        let answer = until_closed(garbage).await.unwrap_or_default();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer}");
        // Never a byte.
        until_closed(connect().await).await.ok();
        // Slowloris: headers begun, never finished.
        let mut slow = connect().await;
        slow.write_all(format!("POST /api/v1/snapshots HTTP/1.1\r\nHost: seamless\r\n{token}X-Slow: 1").as_bytes())
            .await
            .unwrap();
        until_closed(slow).await.ok();
        // A declared body over the cap: refused before it is sent.
        let mut oversized = connect().await;
        oversized
            .write_all(
                format!(
                    "POST /api/v1/snapshots HTTP/1.1\r\nHost: seamless\r\n{token}Content-Length: {}\r\n\r\n",
                    rest::MAX_BODY + 1
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&until_closed(oversized).await.unwrap_or_default()).into_owned();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("larger than"), "{answer}");
        // A body over the cap without a length: refused once past it.
        let mut chunked = connect().await;
        chunked
            .write_all(
                format!(
                    "POST /api/v1/snapshots HTTP/1.1\r\nHost: seamless\r\n{token}Transfer-Encoding: chunked\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let piece = vec![b'x'; 64 << 10];
        for _ in 0..(rest::MAX_BODY / piece.len() + 2) {
            let sent = async {
                chunked.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
                chunked.write_all(&piece).await?;
                chunked.write_all(b"\r\n").await
            };
            if sent.await.is_err() {
                break;
            }
        }
        let answer = String::from_utf8_lossy(&until_closed(chunked).await.unwrap_or_default()).into_owned();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        // A body promised and never sent in full.
        let mut short = connect().await;
        short
            .write_all(
                format!(
                    "POST /api/v1/snapshots HTTP/1.1\r\nHost: seamless\r\n{token}Content-Length: 100\r\n\r\n{{\"co"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&until_closed(short).await.unwrap_or_default()).into_owned();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

        let (status, body) = http(connect().await, "GET", "/api/v1/snapshots", headers, "").await;
        assert_eq!(status, 200, "after the hostile clients: {body}");
    }

    // Wrong tokens over TCP: after two, the address is locked out.
    let tcp = || async { tokio::net::TcpStream::connect(tcp_addr).await.unwrap() };
    for _ in 0..2 {
        let (status, _) = http(tcp().await, "GET", "/metrics", &[("Authorization", "Bearer guess")], "").await;
        assert_eq!(status, 403);
    }
    let (status, body) = http(tcp().await, "GET", "/metrics", &auth, "").await;
    assert_eq!(status, 429, "locked out, the right token included: {body}");
    assert!(body.contains("wrong bearer token"), "{body}");
    // The unix socket knows no token and is not affected.
    let (status, _) = http(UnixStream::connect(&socket).await.unwrap(), "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
}

trait RestStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RestStream for T {}

#[tokio::test]
async fn a_rest_token_file_others_can_read_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("rest.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nbackend = \"directory\"\n[rest]\ntcp_address = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    )
    .unwrap();
    let socket = tmp.path().join("s.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_containerd-seamless-grpc"))
        .arg("--root")
        .arg(tmp.path().join("root"))
        .arg("--address")
        .arg(&socket)
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the daemon");
    // A daemon that accepted the file would serve on: stop it after a
    // minute, far beyond its start-up, and fail.
    let mut exited = None;
    for _ in 0..600 {
        exited = child.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if exited.is_none() {
        child.kill().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        exited.is_some_and(|status| !status.success()),
        "the daemon refuses to start: {stderr}"
    );
    assert!(
        stderr.contains("rest.token_file") && stderr.contains(&token.display().to_string()) && stderr.contains("0644"),
        "names the file and its mode: {stderr}"
    );
    assert!(!socket.exists(), "nothing was served");
}

/// The real daemon with few descriptors (prlimit), its socket flooded with
/// connections until accepting fails with EMFILE: it logs, backs off and,
/// once descriptors are free again, serves, where tonic's server would have
/// stopped at the first failed accept.
#[tokio::test]
async fn running_out_of_descriptors_does_not_stop_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, "[storage]\nbackend = \"directory\"\n").unwrap();
    let log = tmp.path().join("daemon.log");
    let mut child = std::process::Command::new("prlimit")
        .arg("--nofile=96:96")
        .arg(env!("CARGO_BIN_EXE_containerd-seamless-grpc"))
        .arg("--root")
        .arg(tmp.path().join("root"))
        .arg("--address")
        .arg(&socket)
        .arg("--config")
        .arg(&config)
        .arg("--log-level")
        .arg("warn")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the daemon under prlimit (util-linux)");
    let mut up = false;
    for _ in 0..600 {
        if let Ok(Ok(channel)) = tokio::time::timeout(
            Duration::from_millis(200),
            seamless_snapshotter::api::client::connect(&socket),
        )
        .await
        {
            up = ControlClient::new(channel).version(VersionRequest {}).await.is_ok();
            if up {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the daemon came up: {}", std::fs::read_to_string(&log).unwrap());
    // More connections than the daemon has descriptors: they wait in the
    // backlog, or are refused once it is full.
    let mut flood = Vec::new();
    let mut exhausted = false;
    for _ in 0..600 {
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) {
            flood.push(stream);
        }
        exhausted = std::fs::read_to_string(&log)
            .unwrap()
            .contains("accepting a connection failed");
        if exhausted && flood.len() > 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        exhausted,
        "the daemon ran out of descriptors: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    drop(flood);
    let mut served = None;
    for _ in 0..100 {
        if let Ok(Ok(channel)) = tokio::time::timeout(
            Duration::from_secs(2),
            seamless_snapshotter::api::client::connect(&socket),
        )
        .await
        {
            served = Some(ControlClient::new(channel).version(VersionRequest {}).await);
            if matches!(served, Some(Ok(_))) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(still_running, "the daemon kept running: {log}");
    assert!(
        matches!(served, Some(Ok(_))),
        "the daemon serves again: {served:?}\n{log}"
    );
}

/// Both sockets of the real daemon are 0660 from their bind, and binding
/// them under a restrictive umask left the daemon's own umask (every
/// thread's) as it was started with.
#[tokio::test]
async fn sockets_are_bound_0660_and_the_daemon_keeps_its_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, "[storage]\nbackend = \"directory\"\n").unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 002 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_containerd-seamless-grpc"))
        .arg("--root")
        .arg(tmp.path().join("root"))
        .arg("--address")
        .arg(&socket)
        .arg("--config")
        .arg(&config)
        .arg("--log-level")
        .arg("warn")
        .spawn()
        .expect("start the daemon");
    let mut up = false;
    for _ in 0..600 {
        if let Ok(Ok(channel)) = tokio::time::timeout(
            Duration::from_millis(200),
            seamless_snapshotter::api::client::connect(&socket),
        )
        .await
        {
            up = ControlClient::new(channel).version(VersionRequest {}).await.is_ok();
            if up {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let modes: Vec<(String, u32)> = ["s.sock", "rest.sock"]
        .iter()
        .map(|name| {
            let mode = std::fs::metadata(tmp.path().join(name)).map(|m| m.permissions().mode() & 0o7777);
            (name.to_string(), mode.unwrap_or(0))
        })
        .collect();
    let umasks: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .map(|task| {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "the daemon came up");
    assert_eq!(
        modes,
        [("s.sock".to_string(), 0o660), ("rest.sock".to_string(), 0o660)],
        "socket modes"
    );
    assert!(
        !umasks.is_empty() && umasks.iter().all(|u| u == "0002"),
        "thread umasks: {umasks:?}"
    );
}

/// Archives holding what no capture makes, imported through the Control
/// API as `checkpointctl import` does: each refused with the path it names,
/// nothing imported, nothing written where their symlinks and links point,
/// and the daemon serving after.
#[tokio::test]
async fn hostile_archives_are_refused_by_import() {
    use hostile::Member;
    use seamless_snapshotter::proto::{ImportCheckpointRequest, ListCheckpointsRequest};
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let daemon = Daemon::start(&tmp.path().join("root"), &socket).await;
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("passwd"), b"root:x:0:0").unwrap();
    let outside_text = outside.display().to_string();
    let passwd_text = outside.join("passwd").display().to_string();
    let cases: Vec<(&str, Vec<Member>, &str)> = vec![
        (
            "a file beneath a symlink out",
            vec![Member::Symlink("x", &outside_text), Member::File("x/f", b"owned")],
            "tree entry /x/f refused: its ancestor /x is a symlink, not a directory",
        ),
        (
            "a directory beneath a symlink to /",
            vec![Member::Symlink("r", "/"), Member::Dir("r/etc/")],
            "tree entry /r/etc refused: its ancestor /r is a symlink",
        ),
        (
            "a file beneath a file",
            vec![Member::File("f", b"1"), Member::File("f/g", b"2")],
            "tree entry /f/g refused: its ancestor /f is a regular file",
        ),
        (
            "a hard link to a later file",
            vec![Member::HardLink("a", "b"), Member::File("b", b"later")],
            "tree entry /a refused: hard link to \"b\": the target does not come before the link",
        ),
        (
            "a hard link up and out",
            vec![Member::HardLink("l", "../outside/passwd")],
            "member l: member \"../outside/passwd\" has a .. component",
        ),
        (
            "a hard link to a host file",
            vec![Member::HardLink("l", &passwd_text)],
            "has an absolute path",
        ),
        (
            "a hard link to a symlink",
            vec![Member::Symlink("s", &passwd_text), Member::HardLink("h", "s")],
            "/h links to /s, which is no file of the layer or below",
        ),
        ("a .. name", vec![Member::File("../escape", b"x")], "has a .. component"),
    ];
    let mut control = ControlClient::new(channel(&socket).await);
    for (n, (what, members, expected)) in cases.into_iter().enumerate() {
        let archive = tmp.path().join(format!("hostile-{n}.tar"));
        hostile::checkpoint_archive(&archive, &format!("cp-20251201-10000{n}"), "web", &members);
        let status = control
            .import_checkpoint(ImportCheckpointRequest {
                storage: None,
                namespace: "default".into(),
                path: archive.display().to_string(),
                ..Default::default()
            })
            .await
            .expect_err(what);
        assert!(
            status.message().contains(expected),
            "{what}: {:?} does not say {expected:?}",
            status.message()
        );
        assert!(
            matches!(status.code(), Code::InvalidArgument | Code::FailedPrecondition),
            "{what}: {status:?}"
        );
        let listed = control
            .list_checkpoints(ListCheckpointsRequest {
                namespace: "default".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            listed.checkpoints.is_empty(),
            "{what}: {:?} imported",
            listed.checkpoints
        );
        assert_eq!(hostile::listing(&outside), vec!["passwd"], "{what}");
        assert_eq!(std::fs::read(outside.join("passwd")).unwrap(), b"root:x:0:0", "{what}");
    }
    assert!(!tmp.path().join("escape").exists());
    let version = control.version(VersionRequest {}).await.unwrap().into_inner();
    assert!(!version.version.is_empty(), "the daemon still serves");
    daemon.stop().await;
}

/// An archive streamed in past `checkpoint.max_received_archive` is cut off
/// before it is written whole: refused naming the limit, nothing imported,
/// no scratch file left behind, the daemon serving on.
#[tokio::test]
async fn a_received_archive_past_its_bound_is_refused_before_it_is_written() {
    use seamless_snapshotter::proto::{ListCheckpointsRequest, ReceiveCheckpointRequest};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let socket = tmp.path().join("s.sock");
    let mut config = directory_config();
    config.checkpoint.max_received_archive = "64KiB".into();
    let daemon = Daemon::start_configured(&root, &socket, &config, None).await;
    let mut control = ControlClient::new(channel(&socket).await);
    // 1 MiB in 64 KiB pieces: an endless sender is cut the same way.
    let pieces = (0..16).map(|_| ReceiveCheckpointRequest {
        storage: None,
        namespace: "default".into(),
        data: vec![7u8; 64 << 10],
    });
    let status = control
        .receive_checkpoint(tokio_stream::iter(pieces))
        .await
        .expect_err("an archive past the bound");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("larger than 65536 bytes")
            && status.message().contains("checkpoint.max_received_archive"),
        "{status:?}"
    );
    let left: Vec<_> = std::fs::read_dir(root.join("checkpoint-work"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
    let listed = control
        .list_checkpoints(ListCheckpointsRequest {
            namespace: "default".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.checkpoints.is_empty(), "nothing imported: {listed:?}");
    let version = control.version(VersionRequest {}).await.unwrap().into_inner();
    assert!(!version.version.is_empty(), "the daemon still serves");
    daemon.stop().await;
}
