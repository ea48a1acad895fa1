//! What the daemon's network listeners (REST on unix and TCP, the Control
//! API on its unix socket and over TLS) share to stay up under hostile or
//! broken clients: a bound on connections served at once, deadlines on
//! silent or slow ones, a back-off when accepting fails, and the lock-out
//! of an address that keeps guessing the bearer token.
//!
//! It knows nothing of HTTP, gRPC or what the APIs do; it sees streams,
//! addresses and tokens only.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tracing::{debug, warn};

use crate::config::ConnectionLimits;

impl ConnectionLimits {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The permits of `max_connections`.
    pub fn connection_slots(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.max_connections as usize))
    }
}

/// The pause after a failed accept: from 5 ms, doubled at each failure in a
/// row up to 1 s. Running out of descriptors (EMFILE) fails every accept at
/// once; without the pause the loop would spin a core and flood the log.
#[derive(Debug)]
pub struct AcceptBackoff {
    listener: &'static str,
    delay: Duration,
}

const FIRST_ACCEPT_DELAY: Duration = Duration::from_millis(5);
const MAX_ACCEPT_DELAY: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    pub fn new(listener: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            listener,
            delay: FIRST_ACCEPT_DELAY,
        }
    }

    /// Logs the failure and sleeps before the next accept.
    pub async fn failed(&mut self, error: &io::Error) {
        warn!(listener = self.listener, %error, retry_in_ms = self.delay.as_millis() as u64, "accepting a connection failed");
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_ACCEPT_DELAY);
    }

    pub fn succeeded(&mut self) {
        self.delay = FIRST_ACCEPT_DELAY;
    }

    /// What an accept returned, resetting the delay; or, for a failed
    /// accept, nothing once its delay has passed (the caller accepts again).
    pub async fn accepted<T>(&mut self, accepted: io::Result<T>) -> Option<T> {
        match accepted {
            Ok(accepted) => {
                self.succeeded();
                Some(accepted)
            }
            Err(e) => {
                self.failed(&e).await;
                None
            }
        }
    }
}

/// A client's stream with its slot of `max_connections` (given back when
/// the connection ends) and two read deadlines: the first `opening_bytes`
/// must arrive within the header timeout of the accept (a client that
/// connects and says nothing, or trickles its first bytes, is cut), and
/// after that any read may wait at most the idle timeout, unless a request
/// of the connection is being answered (see [`Guarded::busy`]): a client
/// waiting for a long answer is not idle. Hitting either deadline fails the
/// read with `TimedOut`, which ends the connection.
pub struct Guarded<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
    opening_bytes: u64,
    read_bytes: u64,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    busy: Busy,
}

/// Counts the requests of a connection being answered; see
/// [`Guarded::busy`].
#[derive(Debug, Clone, Default)]
pub struct Busy(Arc<std::sync::atomic::AtomicUsize>);

/// One request being answered, until dropped.
#[derive(Debug)]
pub struct Answering(Busy);

impl Busy {
    /// Marks a request as being answered until the result is dropped.
    pub fn answering(&self) -> Answering {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Answering(self.clone())
    }

    fn any(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst) > 0
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl<S> Guarded<S> {
    /// `accepted`: when the connection was accepted (a TLS handshake may
    /// have used part of the header timeout already).
    pub fn new(
        inner: S,
        slot: OwnedSemaphorePermit,
        limits: &ConnectionLimits,
        accepted: tokio::time::Instant,
        opening_bytes: u64,
    ) -> Guarded<S> {
        let deadline = accepted + limits.header_timeout();
        Guarded {
            inner,
            _slot: slot,
            opening_bytes,
            read_bytes: 0,
            idle: limits.idle_timeout(),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            busy: Busy::default(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The handle the server marks its requests with while it answers
    /// them: meanwhile the idle deadline does not end the connection.
    pub fn busy(&self) -> Busy {
        self.busy.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = (buf.filled().len() - before) as u64;
                this.read_bytes += read;
                // The opening deadline stays fixed until the opening is in;
                // from then on each read that brings data restarts the idle one.
                if read > 0 && this.read_bytes >= this.opening_bytes {
                    let next = tokio::time::Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) if this.read_bytes >= this.opening_bytes && this.busy.any() => {
                    // Waiting for our answer is not idling: look again later.
                    let next = tokio::time::Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                    match this.deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        }
                        Poll::Pending => Poll::Pending,
                    }
                }
                Poll::Ready(()) => {
                    let what = if this.read_bytes < this.opening_bytes {
                        "the client did not open its request within the header timeout"
                    } else {
                        "the client sent nothing within the idle timeout"
                    };
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Addresses tracked at most; past it, those not locked out are forgotten
/// (a spray of addresses cannot grow the table without bound).
const MAX_TRACKED: usize = 4096;

/// Wrong bearer tokens per client address. After `token_failures` in a row
/// an address is locked out for `token_lockout_secs`: its calls are refused
/// without the token being compared, so guessing runs at a few tries a
/// minute. A right token clears the address's count.
#[derive(Debug)]
pub struct TokenAttempts {
    failures: u32,
    lockout: Duration,
    by_address: Mutex<HashMap<IpAddr, Attempts>>,
}

#[derive(Debug, Clone, Copy)]
struct Attempts {
    failed: u32,
    locked_until: Option<Instant>,
}

/// The verdict on one call's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVerdict {
    Accepted,
    Refused,
    /// Refused without comparing: too many wrong tokens from this address.
    LockedOut {
        retry_in: Duration,
    },
}

impl TokenAttempts {
    pub fn new(limits: &ConnectionLimits) -> TokenAttempts {
        TokenAttempts {
            failures: limits.token_failures.max(1),
            lockout: Duration::from_secs(limits.token_lockout_secs),
            by_address: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `given` against `expected` for a call from `peer` (None: a
    /// peer without an address, never locked out), counting failures and
    /// logging each with the address, never the token.
    pub fn check(&self, peer: Option<IpAddr>, given: Option<&str>, expected: &str) -> TokenVerdict {
        let now = Instant::now();
        // A poisoned lock only means another call panicked mid-update; the
        // counts are still usable.
        let mut table = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(locked_until) = peer.and_then(|p| table.get(&p)).and_then(|a| a.locked_until) {
            if locked_until > now {
                let retry_in = locked_until - now;
                // Debug only: a locked-out guesser must not flood the log;
                // the lock-out itself was logged when it began.
                debug!(peer = %peer_name(peer), retry_in_secs = retry_in.as_secs(), "call refused: this address is locked out after wrong bearer tokens");
                return TokenVerdict::LockedOut { retry_in };
            }
        }
        if given.is_some_and(|given| crate::api::remote::token_matches(given, expected)) {
            if let Some(peer) = peer {
                table.remove(&peer);
            }
            return TokenVerdict::Accepted;
        }
        let Some(peer) = peer else {
            warn!(peer = "unknown", "call without a valid bearer token");
            return TokenVerdict::Refused;
        };
        if table.len() >= MAX_TRACKED && !table.contains_key(&peer) {
            table.retain(|_, a| a.locked_until.is_some_and(|until| until > now));
        }
        let attempts = table.entry(peer).or_insert(Attempts {
            failed: 0,
            locked_until: None,
        });
        if attempts.locked_until.is_some() {
            // The lock-out is over: a fresh count.
            *attempts = Attempts {
                failed: 0,
                locked_until: None,
            };
        }
        attempts.failed += 1;
        warn!(peer = %peer, failures = attempts.failed, "call without a valid bearer token");
        if attempts.failed >= self.failures {
            attempts.locked_until = Some(now + self.lockout);
            warn!(peer = %peer, lockout_secs = self.lockout.as_secs(), "address locked out after {} wrong bearer tokens", attempts.failed);
        }
        TokenVerdict::Refused
    }
}

fn peer_name(peer: Option<IpAddr>) -> String {
    peer.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(header: u64, idle: u64) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout_secs: header,
            idle_timeout_secs: idle,
            token_failures: 3,
            token_lockout_secs: 3600,
            ..ConnectionLimits::default()
        }
    }

    #[test]
    fn wrong_tokens_lock_the_address_out() {
        let attempts = TokenAttempts::new(&limits(1, 1));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(
            attempts.check(Some(a), Some("s3cret"), "s3cret"),
            TokenVerdict::Accepted
        );
        for _ in 0..3 {
            assert_eq!(attempts.check(Some(a), Some("guess"), "s3cret"), TokenVerdict::Refused);
        }
        // Locked out: even the right token is not looked at.
        assert!(matches!(
            attempts.check(Some(a), Some("s3cret"), "s3cret"),
            TokenVerdict::LockedOut { .. }
        ));
        assert!(matches!(
            attempts.check(Some(a), None, "s3cret"),
            TokenVerdict::LockedOut { .. }
        ));
        // Another address is not.
        assert_eq!(
            attempts.check(Some(b), Some("s3cret"), "s3cret"),
            TokenVerdict::Accepted
        );
        // A right token clears the count: two wrong, one right, two wrong.
        for token in ["x", "y", "s3cret", "x", "y"] {
            attempts.check(Some(b), Some(token), "s3cret");
        }
        assert_eq!(
            attempts.check(Some(b), Some("s3cret"), "s3cret"),
            TokenVerdict::Accepted
        );
    }

    #[tokio::test]
    async fn failed_accepts_back_off_up_to_a_second() {
        let mut backoff = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let mut delays = Vec::new();
        for _ in 0..10 {
            delays.push(backoff.delay.as_millis());
            backoff.failed(&emfile).await;
        }
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.delay, FIRST_ACCEPT_DELAY);
    }

    #[test]
    fn the_table_of_addresses_stays_bounded() {
        let attempts = TokenAttempts::new(&ConnectionLimits {
            token_failures: 2,
            ..limits(1, 1)
        });
        for i in 0..(MAX_TRACKED as u32 + 100) {
            let peer = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            attempts.check(Some(peer), Some("guess"), "s3cret");
        }
        assert!(attempts.by_address.lock().unwrap().len() <= MAX_TRACKED);
    }

    #[tokio::test]
    async fn silent_and_idle_clients_are_cut_off() {
        let slots = Arc::new(Semaphore::new(1));
        // Silent: nothing within the header timeout.
        let (client, server) = tokio::io::duplex(64);
        let slot = slots.clone().try_acquire_owned().unwrap();
        let mut guarded = Guarded::new(server, slot, &limits(1, 2), tokio::time::Instant::now(), 4);
        assert!(
            slots.clone().try_acquire_owned().is_err(),
            "the connection holds its slot"
        );
        let mut buf = [0u8; 8];
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("header timeout"), "{err}");
        drop(guarded);
        drop(client);
        assert!(slots.clone().try_acquire_owned().is_ok(), "the slot is given back");

        // Opened in time, then idle past the idle timeout.
        let (mut client, server) = tokio::io::duplex(64);
        let slot = slots.clone().try_acquire_owned().unwrap();
        let mut guarded = Guarded::new(server, slot, &limits(1, 2), tokio::time::Instant::now(), 4);
        client.write_all(b"open").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 4);
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("idle timeout"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_waiting_for_its_answer_is_not_idle() {
        let slots = Arc::new(Semaphore::new(1));
        let (mut client, server) = tokio::io::duplex(64);
        let slot = slots.clone().try_acquire_owned().unwrap();
        let mut guarded = Guarded::new(server, slot, &limits(1, 2), tokio::time::Instant::now(), 4);
        client.write_all(b"open").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 4);
        let answering = guarded.busy().answering();
        // Three idle timeouts pass while the request is answered.
        let read = tokio::time::timeout(Duration::from_secs(7), guarded.read(&mut buf)).await;
        assert!(read.is_err(), "still reading, not cut: {read:?}");
        drop(answering);
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("idle timeout"), "{err}");
    }
}
