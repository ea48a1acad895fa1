//! A commit's own credentials (`--target-creds`, `--target-creds-file`)
//! against a registry that wants them: the test registry behind a front
//! that answers 401 with a Basic challenge unless a request carries the one
//! `Authorization` it accepts. A missing or wrong password ends the job
//! PERMISSION_DENIED (the CLI exits 4), a credentials file others may read
//! is refused before the daemon is asked, and the right password pushes;
//! no password is left in the daemon's root, its log or its job reports.
//!
//! The front moves bytes and reads only request heads: one request per
//! connection, forwarded with `Connection: close`, the rest of the body
//! copied as it comes.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, sleep, JoinHandle};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::env::{outcome, with_env, Options};

const USER: &str = "seamless";
const PASSWORD: &str = "gate-pass-7Q";
/// `Basic base64("seamless:gate-pass-7Q")`.
const ACCEPTED: &str = "Basic c2VhbWxlc3M6Z2F0ZS1wYXNzLTdR";
const WRONG_PASSWORD: &str = "wrong-pass-5X";

const POLL: Duration = Duration::from_millis(20);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HEAD: usize = 64 * 1024;

/// What the front saw, by the `Authorization` of each request.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    refused_with_credentials: AtomicUsize,
    refused_without: AtomicUsize,
}

/// The running front; dropping it stops it.
struct BasicAuthFront {
    address: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    accept_loop: Option<JoinHandle<()>>,
}

impl BasicAuthFront {
    fn start(registry: &str) -> Result<BasicAuthFront> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the basic-auth front")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let accept_loop = {
            let (registry, stop, seen) = (registry.to_string(), stop.clone(), seen.clone());
            thread::spawn(move || {
                let mut connections: Vec<JoinHandle<()>> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let (registry, seen) = (registry.clone(), seen.clone());
                            connections.push(thread::spawn(move || {
                                if let Err(e) = serve(client, &registry, &seen) {
                                    eprintln!("basic-auth front: connection ended with {e}");
                                }
                            }));
                            connections.retain(|c| !c.is_finished());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => sleep(POLL),
                        Err(_) => sleep(POLL),
                    }
                }
                for connection in connections {
                    let _ = connection.join();
                }
            })
        };
        Ok(BasicAuthFront {
            address,
            stop,
            seen,
            accept_loop: Some(accept_loop),
        })
    }
}

impl Drop for BasicAuthFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept_loop) = self.accept_loop.take() {
            let _ = accept_loop.join();
        }
    }
}

fn serve(mut client: TcpStream, registry: &str, seen: &Seen) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let Some((head, body_start)) = read_head(&mut client)? else {
        // Not HTTP (a TLS hello): closed, so the client falls back to HTTP.
        return Ok(());
    };
    let authorization = head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_string())
    });
    match authorization.as_deref() {
        Some(ACCEPTED) => {
            seen.accepted.fetch_add(1, Ordering::SeqCst);
        }
        other => {
            let counter = if other.is_some() {
                &seen.refused_with_credentials
            } else {
                &seen.refused_without
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            write!(
                client,
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"seamless-test\"\r\n\
                 Docker-Distribution-Api-Version: registry/2.0\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return Ok(());
        }
    }
    let mut upstream = TcpStream::connect(registry)?;
    upstream.set_read_timeout(Some(IO_TIMEOUT))?;
    upstream.set_write_timeout(Some(IO_TIMEOUT))?;
    upstream.write_all(with_connection_close(&head).as_bytes())?;
    upstream.write_all(&body_start)?;
    // The rest of an upload's body, as the client sends it.
    let body = {
        let (mut from, mut to) = (client.try_clone()?, upstream.try_clone()?);
        thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
        })
    };
    // `Connection: close` makes the registry end its answer with EOF.
    let answered = io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
    let _ = body.join();
    answered.map(|_| ())
}

fn read_head(client: &mut TcpStream) -> io::Result<Option<(String, Vec<u8>)>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = client.read(&mut chunk)?;
        if read == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..read]);
        if !buffer[0].is_ascii_uppercase() || buffer.len() > MAX_HEAD {
            return Ok(None);
        }
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            return Ok(Some((head, buffer[end + 4..].to_vec())));
        }
    }
}

fn with_connection_close(head: &str) -> String {
    let mut out = String::new();
    for line in head.split("\r\n") {
        let name = line.split(':').next().unwrap_or_default().trim();
        if !name.eq_ignore_ascii_case("connection") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// Files larger than this are the loop-mounted pool's backing image: what it
/// holds is walked as files through its mount point instead.
const MAX_SCANNED_FILE: u64 = 256 << 20;

/// Regular files under `dir` (not following links) that hold `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() && entry.metadata()?.len() <= MAX_SCANNED_FILE {
                let Ok(bytes) = std::fs::read(entry.path()) else {
                    continue;
                };
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(entry.path().display().to_string());
                }
            }
        }
    }
    Ok(found)
}

#[test]
fn commits_push_with_the_callers_credentials_and_never_keep_them() {
    with_env("creds", Options::default(), |env| {
        let ns = env.namespace("c");
        env.pull(&ns)?;
        let id = env.container_id("creds");
        env.run_container(&ns, &id)?;
        let front = BasicAuthFront::start(&super::registry_address(&env.registry_ref("x:y"))?)?;
        let target = format!("{}/private/app:1", front.address);
        let work = env.dir().join("creds-work");
        std::fs::create_dir_all(&work)?;
        let work = work.display().to_string();
        let commit = |format: &str, target: &str, extra: &[&str]| -> Result<(i32, String, String)> {
            outcome(
                env.checkpointctl(&ns)
                    .args([
                        "seamless-commit",
                        "--container",
                        &id,
                        "--target",
                        target,
                        "--format",
                        format,
                        "--target-insecure",
                        "--source-insecure",
                        "--work-dir",
                        &work,
                        "--wait",
                        "--wait-timeout",
                        "5m",
                    ])
                    .args(extra),
            )
        };
        let cli = |extra: &[&str]| commit("oci", &target, extra);

        // No credentials: the registry refuses the anonymous push.
        let (code, out, err) = cli(&[])?;
        ensure!(
            code == 4 && err.contains("PERMISSION_DENIED"),
            "an anonymous commit to a private registry: {code}\n{out}\n{err}"
        );
        ensure!(front.seen.refused_without.load(Ordering::SeqCst) > 0);

        // A wrong password: sent, refused, exit 4, and never shown.
        let wrong = format!("{USER}:{WRONG_PASSWORD}");
        let (code, out, err) = cli(&["--target-creds", &wrong])?;
        ensure!(
            code == 4 && err.contains("PERMISSION_DENIED"),
            "a commit with a wrong password: {code}\n{out}\n{err}"
        );
        ensure!(
            front.seen.refused_with_credentials.load(Ordering::SeqCst) > 0,
            "the wrong password reached the registry"
        );
        ensure!(
            !out.contains(WRONG_PASSWORD) && !err.contains(WRONG_PASSWORD),
            "{out}\n{err}"
        );
        ensure!(front.seen.accepted.load(Ordering::SeqCst) == 0, "nothing got in so far");

        // A credentials file others may read: refused before the daemon is asked.
        let file = env.dir().join("target-creds");
        std::fs::write(&file, format!("{USER}:{PASSWORD}\n"))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        let file_arg = file.display().to_string();
        let (code, out, err) = cli(&["--target-creds-file", &file_arg])?;
        ensure!(
            code == 2 && err.contains("0644") && !err.contains(PASSWORD) && !out.contains("Snapshot ID"),
            "a credentials file others can read: {code}\n{out}\n{err}"
        );

        // The right password, from a private file: pushed through the front.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        let (code, out, err) = cli(&["--target-creds-file", &file_arg])?;
        ensure!(code == 0, "a commit with the right password: {code}\n{out}\n{err}");
        ensure!(out.contains("Background processing completed successfully."), "{out}");
        ensure!(front.seen.accepted.load(Ordering::SeqCst) > 0);
        let snapshot_id = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Snapshot ID: "))
            .context("the CLI printed no snapshot id")?
            .to_string();

        // A Nydus image takes the same credentials.
        let right = format!("{USER}:{PASSWORD}");
        let nydus_target = format!("{}/private/app-nydus:1", front.address);
        let (code, out, err) = commit("nydus", &nydus_target, &["--target-creds", &right])?;
        ensure!(
            code == 0,
            "a Nydus commit with the right password: {code}\n{out}\n{err}"
        );

        // The REST API's create body takes them too.
        let body = serde_json::json!({
            "namespace": ns, "container": id, "target": format!("{}/private/app:rest", front.address),
            "format": "oci", "work_dir": work, "target_insecure": true, "source_insecure": true,
            "target_creds": {"username": USER, "password": PASSWORD},
        })
        .to_string();
        let (status, created) = env.rest("POST", "/api/v1/snapshots", &body)?;
        ensure!(status == 201, "REST commit with credentials: {status} {created}");
        let created: serde_json::Value = serde_json::from_str(&created)?;
        let rest_id = created["snapshot_id"].as_str().context("snapshot_id")?.to_string();
        let accepted_before = front.seen.accepted.load(Ordering::SeqCst);
        let mut report = String::new();
        for _ in 0..1200 {
            let (_, text) = env.rest("GET", &format!("/api/v1/snapshots/{rest_id}"), "")?;
            report = text;
            if report.contains("\"completed\"") || report.contains("\"failed\"") {
                break;
            }
            sleep(Duration::from_millis(100));
        }
        ensure!(report.contains("\"completed\""), "the REST job: {report}");
        ensure!(
            !report.contains(PASSWORD),
            "the REST report shows the password: {report}"
        );
        ensure!(front.seen.accepted.load(Ordering::SeqCst) > accepted_before);

        // What the daemon reports and keeps holds no password.
        let runtime = tokio::runtime::Runtime::new()?;
        let job = super::get_commit(&runtime, env, &snapshot_id)?;
        ensure!(job.state == "completed", "{job:?}");
        ensure!(
            !format!("{job:?}").contains(PASSWORD),
            "GetCommit shows the password: {job:?}"
        );
        // The scan below looks where the job is kept.
        ensure!(
            !files_holding(&env.daemon_root(), snapshot_id.as_bytes())?.is_empty(),
            "no file under the daemon root holds job {snapshot_id}"
        );
        for secret in [PASSWORD, WRONG_PASSWORD] {
            let holding = files_holding(&env.daemon_root(), secret.as_bytes())?;
            ensure!(
                holding.is_empty(),
                "files under the daemon root hold a password: {holding:?}"
            );
            let log = std::fs::read(env.dir().join("daemon.log")).unwrap_or_default();
            ensure!(
                !log.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the daemon log holds a password"
            );
        }
        Ok(())
    });
}
