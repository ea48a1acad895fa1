//! The Control API over TCP, for checkpointctl on other hosts (`restore
//! --target-node`): TLS on both ends (rustls with ring) and a bearer token on
//! every call. This module owns reading the certificate, key and token files,
//! the server's TLS accept loop (bounded by `[remote.connections]`), the
//! token check and the client's connector. It knows nothing of what the API
//! does (which calls a remote caller may make is `grpc::remote`'s), and the
//! unix socket never passes here: its 0660 mode is its access control.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::server::Connected;
use tonic::{Request, Status};
use tracing::{debug, warn};

use crate::api::connections::{AcceptBackoff, Guarded, TokenAttempts, TokenVerdict};
use crate::config::{ConnectionLimits, RemoteConfig};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} {path} may be read by other users (mode {mode:04o}); make it 0600")]
    Exposed {
        what: &'static str,
        path: String,
        mode: u32,
    },
    #[error("TLS with {cert} and {key}: {reason}")]
    Tls { cert: String, key: String, reason: String },
    #[error("binding {address}: {source}")]
    Bind { address: String, source: io::Error },
    #[error("node address {address:?}: {reason}")]
    Address { address: String, reason: String },
}

/// Bytes of the HTTP/2 connection preface ("PRI * HTTP/2.0..."): what a
/// client must have sent, TLS handshake included, within the header timeout.
const H2_PREFACE_LEN: u64 = 24;

/// Refuses a secret (key or token) that other users may read: the file is
/// the secret's only protection.
pub fn check_private(what: &'static str, path: &Path) -> Result<(), RemoteError> {
    use crate::host::private_file::PrivateFileError;
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| RemoteError::File {
        what,
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    crate::host::private_file::check(&meta).map_err(|e| match e {
        PrivateFileError::Exposed { mode } => RemoteError::Exposed {
            what,
            path: shown,
            mode,
        },
        other => RemoteError::File {
            what,
            path: shown,
            reason: other.to_string(),
        },
    })
}

/// The bearer token of a token file: its first line, trimmed. The file must
/// be private, and the token printable ASCII (it travels in a header).
pub fn read_token(what: &'static str, path: &Path) -> Result<String, RemoteError> {
    check_private(what, path)?;
    let bad = |reason: String| RemoteError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.is_empty() {
        return Err(bad("holds no token on its first line".into()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("the token must be printable ASCII without spaces".into()));
    }
    Ok(token)
}

/// Whether `given` is `expected`, in time that does not depend on where they
/// first differ.
pub fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates of `path`; none at all is an error.
fn read_certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, RemoteError> {
    let bad = |reason: String| RemoteError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn server_tls(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, RemoteError> {
    let certs = read_certificates("remote.tls_cert", cert)?;
    check_private("remote.tls_key", key)?;
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| RemoteError::File {
        what: "remote.tls_key",
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let tls = |reason: String| RemoteError::Tls {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        reason,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(|e| tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The TCP side of the daemon: a bound listener, the TLS acceptor of the
/// configured certificate and the token every call must carry.
pub struct RemoteListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    token: TokenCheck,
    limits: ConnectionLimits,
}

impl RemoteListener {
    /// Reads the certificate, key and token (each checked, each error naming
    /// its key and file) and binds the address.
    pub async fn bind(config: &RemoteConfig) -> Result<RemoteListener, RemoteError> {
        let tls = server_tls(Path::new(&config.tls_cert), Path::new(&config.tls_key))?;
        let token = read_token("remote.token_file", Path::new(&config.token_file))?;
        let listener = TcpListener::bind(&config.address)
            .await
            .map_err(|source| RemoteError::Bind {
                address: config.address.clone(),
                source,
            })?;
        Ok(RemoteListener {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            token: TokenCheck {
                token: token.into(),
                attempts: Arc::new(TokenAttempts::new(&config.connections)),
            },
            limits: config.connections.clone(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The interceptor that refuses calls without the token.
    pub fn token_check(&self) -> TokenCheck {
        self.token.clone()
    }

    /// The limits the server of these connections applies as well (HTTP/2
    /// pings at half the idle timeout).
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Connections that completed their TLS handshake. At most
    /// `max_connections` are open and `max_handshakes` handshaking at once:
    /// past either, accepting waits (clients queue in the kernel's backlog).
    /// Handshakes run side by side, so a slow or silent client holds up
    /// nobody; each has the header timeout to finish its handshake and send
    /// the HTTP/2 preface, a failed one is logged and dropped. Accepting
    /// stops when the stream is dropped.
    pub fn into_incoming(self) -> ReceiverStream<io::Result<TlsConnection>> {
        let (tx, rx) = mpsc::channel(16);
        let RemoteListener {
            listener,
            acceptor,
            limits,
            ..
        } = self;
        let slots = limits.connection_slots();
        let handshakes = Arc::new(Semaphore::new(limits.max_handshakes as usize));
        tokio::spawn(async move {
            let mut backoff = AcceptBackoff::new("remote");
            loop {
                // Both semaphores live as long as this loop: never closed.
                let permits = async {
                    let slot = slots.clone().acquire_owned().await;
                    let handshake = handshakes.clone().acquire_owned().await;
                    slot.ok().zip(handshake.ok())
                };
                let (slot, handshake) = tokio::select! {
                    permits = permits => match permits {
                        Some(permits) => permits,
                        None => return,
                    },
                    _ = tx.closed() => return,
                };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = tx.closed() => return,
                };
                let Some((stream, peer)) = backoff.accepted(accepted).await else {
                    continue;
                };
                let opened = tokio::time::Instant::now();
                let (acceptor, tx, limits) = (acceptor.clone(), tx.clone(), limits.clone());
                tokio::spawn(async move {
                    let handshake_deadline = opened + limits.header_timeout();
                    let accepted = tokio::time::timeout_at(handshake_deadline, acceptor.accept(stream)).await;
                    drop(handshake);
                    match accepted {
                        Ok(Ok(stream)) => {
                            debug!(%peer, "TLS connection");
                            let stream = Guarded::new(stream, slot, &limits, opened, H2_PREFACE_LEN);
                            let _ = tx.send(Ok(TlsConnection { stream, peer })).await;
                        }
                        Ok(Err(e)) => warn!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => warn!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// One client's TLS connection, as tonic serves it.
pub struct TlsConnection {
    stream: Guarded<tokio_rustls::server::TlsStream<TcpStream>>,
    peer: SocketAddr,
}

/// The address a remote call came from, in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct RemotePeer(pub SocketAddr);

impl Connected for TlsConnection {
    type ConnectInfo = RemotePeer;

    fn connect_info(&self) -> RemotePeer {
        RemotePeer(self.peer)
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.get_ref().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Server side: every call must carry `authorization: Bearer <token>`; an
/// address that keeps sending wrong ones is locked out for a while.
#[derive(Clone)]
pub struct TokenCheck {
    token: Arc<str>,
    attempts: Arc<TokenAttempts>,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCheck(<hidden>)")
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let peer = request.extensions().get::<RemotePeer>().map(|p| p.0.ip());
        match self.attempts.check(peer, given, &self.token) {
            TokenVerdict::Accepted => Ok(request),
            TokenVerdict::Refused => Err(Status::unauthenticated("a valid bearer token is required")),
            TokenVerdict::LockedOut { retry_in } => Err(Status::resource_exhausted(format!(
                "too many calls with a wrong bearer token from this address: refused for {} more seconds",
                retry_in.as_secs().max(1)
            ))),
        }
    }
}

/// Client side: adds the node's token to every call; none for the local
/// unix socket.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn none() -> BearerToken {
        BearerToken(None)
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<hidden>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A daemon on another host: `https://HOST:PORT`, the CA that signed its
/// certificate (the system's roots when None), its token file and the name
/// its certificate is for (HOST when None).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteTarget {
    pub address: String,
    pub ca_file: Option<PathBuf>,
    pub token_file: PathBuf,
    pub server_name: Option<String>,
}

/// The host and port of an `https://HOST:PORT` address (no path); HOST
/// without the brackets of an IPv6 literal.
pub fn parse_https_address(address: &str) -> Result<(String, u16), RemoteError> {
    let bad = |reason: &str| RemoteError::Address {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    let rest = address
        .strip_prefix("https://")
        .ok_or_else(|| bad("not https://HOST:PORT"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('@') {
        return Err(bad("has a path or user; give only https://HOST:PORT"));
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("has no :PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').ok_or_else(|| bad("an unclosed [ in the host"))?,
        None if host.contains(':') => return Err(bad("an IPv6 host must be in brackets")),
        None => host,
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok((host.to_string(), port))
}

/// What connecting needs, read from the target's files before any byte is
/// sent: the TLS client configuration, the server name and the token.
pub struct RemoteConnector {
    pub host: String,
    pub port: u16,
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
    pub token: BearerToken,
}

impl RemoteTarget {
    pub fn connector(&self) -> Result<RemoteConnector, RemoteError> {
        let (host, port) = parse_https_address(&self.address)?;
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(ca) => {
                for cert in read_certificates("ca_file", ca)? {
                    roots.add(cert).map_err(|e| RemoteError::File {
                        what: "ca_file",
                        path: ca.display().to_string(),
                        reason: e.to_string(),
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    return Err(RemoteError::Address {
                        address: self.address.clone(),
                        reason: "no ca_file and no system CA certificates to check the node's certificate".into(),
                    });
                }
            }
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| RemoteError::Address {
                address: self.address.clone(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let name = self.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone()).map_err(|_| RemoteError::Address {
            address: self.address.clone(),
            reason: format!("{name:?} is not a valid server name"),
        })?;
        let token = read_token("token_file", &self.token_file)?;
        let header = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| RemoteError::File {
            what: "token_file",
            path: self.token_file.display().to_string(),
            reason: "the token is not a valid header value".into(),
        })?;
        Ok(RemoteConnector {
            host,
            port,
            connector: TlsConnector::from(Arc::new(tls)),
            server_name,
            token: BearerToken(Some(header)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn https_addresses_name_host_and_port() {
        assert_eq!(
            parse_https_address("https://node-b.example:7443").unwrap(),
            ("node-b.example".to_string(), 7443)
        );
        assert_eq!(
            parse_https_address("https://10.0.0.2:7443/").unwrap(),
            ("10.0.0.2".to_string(), 7443)
        );
        assert_eq!(parse_https_address("https://[::1]:9").unwrap(), ("::1".to_string(), 9));
        for (bad, reason) in [
            ("http://10.0.0.2:7443", "https://"),
            ("https://10.0.0.2", ":PORT"),
            ("https://10.0.0.2:0", "1 to 65535"),
            ("https://10.0.0.2:70000", "1 to 65535"),
            ("https://:7443", "no host"),
            ("https://a:7443/api", "path"),
            ("https://u@a:7443", "user"),
            ("https://::1:7443", "brackets"),
        ] {
            let err = parse_https_address(bad).unwrap_err().to_string();
            assert!(err.contains(reason), "{bad}: {err}");
        }
    }

    #[test]
    fn tokens_are_private_single_words() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret-token\nignored\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_token("token_file", &file).unwrap_err().to_string();
        assert!(err.contains("mode 0644") && err.contains("0600"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token("token_file", &file).unwrap(), "s3cret-token");
        std::fs::write(&file, "\n").unwrap();
        let err = read_token("token_file", &file).unwrap_err().to_string();
        assert!(err.contains("no token"), "{err}");
        std::fs::write(&file, "two words\n").unwrap();
        let err = read_token("token_file", &file).unwrap_err().to_string();
        assert!(err.contains("printable ASCII"), "{err}");
        let err = read_token("token_file", &dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3creT", "s3cret"));
        assert!(!token_matches("", "s3cret"));
    }

    #[test]
    fn the_token_check_wants_the_bearer_token() {
        let mut check = TokenCheck {
            token: "s3cret".into(),
            attempts: Arc::new(TokenAttempts::new(&ConnectionLimits::default())),
        };
        let with = |value: Option<&str>| {
            let mut request = Request::new(());
            if let Some(value) = value {
                request.metadata_mut().insert("authorization", value.parse().unwrap());
            }
            request
        };
        assert!(check.call(with(Some("Bearer s3cret"))).is_ok());
        for refused in [None, Some("Bearer s3cre"), Some("s3cret"), Some("Basic s3cret")] {
            let status = check.call(with(refused)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
        let mut add = BearerToken(Some("Bearer s3cret".parse().unwrap()));
        let request = add.call(Request::new(())).unwrap();
        assert!(check.call(request).is_ok());
        assert!(!format!("{add:?}{check:?}").contains("s3cret"));
    }
}
