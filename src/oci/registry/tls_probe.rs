//! Why a TLS connection to a registry ended before any answer. With TLS 1.3
//! a server that requires a client certificate finishes the handshake and
//! only then sends its refusal, which the HTTP client reports as a closed
//! connection. This probe opens one TLS connection of its own, sends an
//! anonymous `GET /v2/` and reads the alert the server answers with.
//!
//! It decides nothing about trust and carries no credential: the server's
//! certificate is not checked here (the real request checked it, or failed
//! with its own error before this runs), and nothing but the probe request
//! is sent.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{AlertDescription, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A probe that gets nothing within this is inconclusive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the server at `host` ("host" or "host:port", port 443 by
/// default) refuses a TLS client that presents no certificate, with the
/// alert of a missing or untrusted client certificate.
pub(super) async fn refuses_without_client_certificate(host: &str) -> bool {
    tokio::time::timeout(PROBE_TIMEOUT, probe(host)).await.unwrap_or(false)
}

async fn probe(host: &str) -> bool {
    let (name, port) = split_host(host);
    let Ok(server_name) = ServerName::try_from(name.to_string()) else {
        return false;
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(builder) =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()
    else {
        return false;
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let Ok(tcp) = tokio::net::TcpStream::connect((name, port)).await else {
        return false;
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = match connector.connect(server_name, tcp).await {
        Ok(tls) => tls,
        // TLS 1.2 refuses within the handshake.
        Err(err) => return is_client_certificate_alert(&err),
    };
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if let Err(err) = tls.write_all(request.as_bytes()).await {
        return is_client_certificate_alert(&err);
    }
    let mut buf = [0u8; 512];
    match tls.read(&mut buf).await {
        Err(err) => is_client_certificate_alert(&err),
        Ok(_) => false,
    }
}

/// `host` and port of "host", "host:port" or "[v6]:port".
fn split_host(host: &str) -> (&str, u16) {
    if let Some(rest) = host.strip_prefix('[') {
        let (address, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok()).unwrap_or(443);
        return (address, port);
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name, port.parse().unwrap_or(443)),
        None => (host, 443),
    }
}

fn is_client_certificate_alert(err: &std::io::Error) -> bool {
    matches!(
        err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
        ))
    )
}

/// Accepts any server certificate, checking only the handshake signatures:
/// the probe learns why the server ends the connection, nothing it sends
/// needs the server to be who it says.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_split_into_name_and_port() {
        assert_eq!(split_host("registry.example"), ("registry.example", 443));
        assert_eq!(split_host("127.0.0.1:5000"), ("127.0.0.1", 5000));
        assert_eq!(split_host("[::1]:5000"), ("::1", 5000));
    }
}
