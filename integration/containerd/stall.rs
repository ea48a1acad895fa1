//! A plain-HTTP front for the test registry that never answers an upload, so
//! a commit job pushing through it stays in its push stage for as long as the
//! test wants (to kill the daemon exactly there).
//!
//! Every connection carries one request. Reads (GET, HEAD) go to the registry
//! with `Connection: close`, and its answer is copied back until the registry
//! closes. Uploads (POST, PUT, PATCH) are held open without an answer until
//! the proxy is dropped. Anything that is not plain HTTP (the TLS hello a
//! client tries first on an insecure registry) is closed at once, as a plain
//! registry makes TLS fail, so the client falls back to HTTP.
//!
//! This module only moves bytes: it knows no registry API beyond the method.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, sleep, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

/// How often the idle accept loop and the held uploads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// Bounds every read and write of a forwarded request, so a stuck peer cannot
/// keep the proxy from stopping.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head longer than this is not one the registry client sends.
const MAX_HEAD: usize = 64 * 1024;

/// The running proxy; dropping it stops it and waits for its threads.
pub struct StallingProxy {
    address: String,
    stop: Arc<AtomicBool>,
    held_uploads: Arc<AtomicUsize>,
    accept_loop: Option<JoinHandle<()>>,
}

impl StallingProxy {
    /// Listens on a free loopback port in front of `registry` (`host:port`).
    pub fn start(registry: &str) -> Result<StallingProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the stalling proxy")?;
        // Nonblocking, so the loop sees the stop flag without a connection.
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let held_uploads = Arc::new(AtomicUsize::new(0));
        let accept_loop = {
            let (registry, stop, held) = (registry.to_string(), stop.clone(), held_uploads.clone());
            thread::spawn(move || accept_connections(&listener, &registry, &stop, &held))
        };
        Ok(StallingProxy {
            address,
            stop,
            held_uploads,
            accept_loop: Some(accept_loop),
        })
    }

    /// `127.0.0.1:<port>`, to put in an image reference.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// How many uploads arrived and are held unanswered.
    pub fn held_uploads(&self) -> usize {
        self.held_uploads.load(Ordering::SeqCst)
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept_loop) = self.accept_loop.take() {
            let _ = accept_loop.join();
        }
    }
}

/// Serves each connection on its own thread (a held upload must not block
/// the reads after it) until `stop`, then waits for those threads.
fn accept_connections(listener: &TcpListener, registry: &str, stop: &Arc<AtomicBool>, held: &Arc<AtomicUsize>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let (registry, stop, held) = (registry.to_string(), stop.clone(), held.clone());
                connections.push(thread::spawn(move || {
                    if let Err(e) = serve_connection(client, &registry, &stop, &held) {
                        eprintln!("stalling proxy: connection ended with {e}");
                    }
                }));
                connections.retain(|c| !c.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => sleep(POLL),
            Err(e) => {
                eprintln!("stalling proxy: accept failed: {e}");
                sleep(POLL);
            }
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

fn serve_connection(mut client: TcpStream, registry: &str, stop: &AtomicBool, held: &AtomicUsize) -> io::Result<()> {
    // Accepted sockets inherit the listener's nonblocking mode on some systems.
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let Some((head, body_start)) = read_head(&mut client)? else {
        return Ok(());
    };
    let method = head.split(' ').next().unwrap_or_default();
    if matches!(method, "POST" | "PUT" | "PATCH") {
        held.fetch_add(1, Ordering::SeqCst);
        while !stop.load(Ordering::SeqCst) {
            sleep(POLL);
        }
        return Ok(());
    }
    let mut upstream = TcpStream::connect(registry)?;
    upstream.set_read_timeout(Some(IO_TIMEOUT))?;
    upstream.set_write_timeout(Some(IO_TIMEOUT))?;
    upstream.write_all(with_connection_close(&head).as_bytes())?;
    upstream.write_all(&body_start)?;
    // `Connection: close` makes the registry end the answer with EOF.
    io::copy(&mut upstream, &mut client)?;
    Ok(())
}

/// The request head (without its blank line) and whatever was read past it;
/// `None` when the peer sends something else than an HTTP request or closes.
fn read_head(client: &mut TcpStream) -> io::Result<Option<(String, Vec<u8>)>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = client.read(&mut chunk)?;
        if read == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..read]);
        // Methods are uppercase ASCII; a TLS hello starts with 0x16 and holds
        // no blank line, so waiting for one would hang both sides.
        if !buffer[0].is_ascii_uppercase() || buffer.len() > MAX_HEAD {
            return Ok(None);
        }
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            return Ok(Some((head, buffer[end + 4..].to_vec())));
        }
    }
}

/// `head` with any `Connection` header replaced by `Connection: close`, and
/// its blank line back.
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
