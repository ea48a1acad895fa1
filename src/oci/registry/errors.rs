//! What can go wrong talking to a registry, and how transport failures,
//! HTTP statuses and error envelopes become a [`RegistryError`] that says
//! which object and which endpoint. Messages a registry sends are bounded
//! before they are read.

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference { reference: String, message: String },
    #[error("invalid digest {digest:?} of blob {blob}: only sha256:<64 lowercase hex> is supported")]
    InvalidDigest { blob: String, digest: String },
    #[error("cannot reach registry {registry} after {attempts} attempt(s): {message}")]
    Unreachable {
        registry: String,
        attempts: u32,
        message: String,
    },
    #[error("registry {registry} presents a certificate that is not trusted: {message}")]
    UntrustedCertificate { registry: String, message: String },
    #[error("registry {registry} refused the TLS handshake: it wants a client certificate it trusts (`client` in its hosts.toml): {message}")]
    ClientCertificateRefused { registry: String, message: String },
    #[error("registry denied access to {object}: {message}")]
    Denied { object: String, message: String },
    #[error("{object} not found in the registry: {message}")]
    NotFound { object: String, message: String },
    #[error("blob {blob} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        blob: String,
        expected: String,
        actual: String,
    },
    #[error("blob {blob} has {actual} bytes, {expected} declared")]
    SizeMismatch { blob: String, expected: u64, actual: u64 },
    #[error("{object} is larger than the {limit} bytes this client reads: refused")]
    TooLarge { object: String, limit: u64 },
    #[error("image {reference} has no layer {digest}: its blob size is unknown, so it is not fetched")]
    NotInImage { reference: String, digest: String },
    #[error("{object} is not a usable manifest: {message}")]
    InvalidManifest { object: String, message: String },
    #[error("registry failed on {object} (status {}): {message}", status.map_or("none".to_string(), |s| s.to_string()))]
    Registry {
        status: Option<u16>,
        object: String,
        message: String,
    },
    /// Its op is "blob file", whatever the call: the message names the
    /// file, not the system call.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Boxed: a file error names more than any other, and every result
    /// of this module carries the largest variant's size.
    #[error(transparent)]
    Hosts(Box<HostsError>),
    #[error("credentials for registry {registry}: {message}")]
    Credentials { registry: String, message: String },
    #[error("registry {registry}: no endpoint in its host configuration may {operation}")]
    NoEndpoint { registry: String, operation: &'static str },
}

impl From<HostsError> for RegistryError {
    fn from(err: HostsError) -> Self {
        RegistryError::Hosts(Box::new(err))
    }
}

impl Classify for RegistryError {
    fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::InvalidReference { .. } | RegistryError::InvalidDigest { .. } => ErrorKind::InvalidArgument,
            RegistryError::Unreachable { .. } => ErrorKind::Unavailable,
            RegistryError::Registry {
                status: Some(429 | 502 | 503 | 504),
                ..
            } => ErrorKind::Unavailable,
            // The lead maps a denial to PERMISSION_DENIED through `is_permission`.
            RegistryError::Denied { .. }
            | RegistryError::UntrustedCertificate { .. }
            | RegistryError::ClientCertificateRefused { .. }
            | RegistryError::Hosts(_)
            | RegistryError::Credentials { .. }
            | RegistryError::NoEndpoint { .. } => ErrorKind::FailedPrecondition,
            RegistryError::NotFound { .. } => ErrorKind::NotFound,
            RegistryError::NotInImage { .. } => ErrorKind::NotFound,
            RegistryError::DigestMismatch { .. }
            | RegistryError::SizeMismatch { .. }
            | RegistryError::TooLarge { .. }
            | RegistryError::InvalidManifest { .. }
            | RegistryError::Registry { .. }
            | RegistryError::Io { .. } => ErrorKind::Internal,
        }
    }
}

impl RegistryError {
    /// The registry refused the credentials (401 or 403).
    pub fn is_permission(&self) -> bool {
        matches!(self, RegistryError::Denied { .. })
    }

    /// The registry could not be reached, or did not answer in time.
    pub fn is_network(&self) -> bool {
        matches!(self, RegistryError::Unreachable { .. })
    }

    /// Worth another attempt: the network failed, or the registry said it is
    /// overloaded or broken for now.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Registry { status: Some(s), .. } => *s == 429 || *s >= 500,
            _ => false,
        }
    }

    /// Worth asking the next endpoint (a mirror failed): anything but a
    /// refusal of the credentials, a bad argument or local trouble.
    pub(super) fn tries_next_endpoint(&self) -> bool {
        !matches!(
            self,
            RegistryError::Denied { .. }
                | RegistryError::InvalidReference { .. }
                | RegistryError::InvalidDigest { .. }
                | RegistryError::Io { .. }
                | RegistryError::Hosts(_)
                | RegistryError::Credentials { .. }
        )
    }
}

pub(super) fn with_attempts(err: RegistryError, attempts: u32) -> RegistryError {
    match err {
        RegistryError::Unreachable { registry, message, .. } => RegistryError::Unreachable {
            registry,
            attempts,
            message,
        },
        other => other,
    }
}

/// Both schemes of an insecure registry failed: keep what each said.
pub(super) fn combine(https: RegistryError, http: RegistryError) -> RegistryError {
    match (https, http) {
        (
            RegistryError::Unreachable {
                registry,
                attempts,
                message: https,
            },
            RegistryError::Unreachable { message: http, .. },
        ) => RegistryError::Unreachable {
            registry,
            attempts,
            message: format!("https: {https}; http: {http}"),
        },
        (_, http) => http,
    }
}

/// An error with all its causes, as one line.
pub(super) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Whether a transport error is a TLS certificate the client refused: no
/// retry changes that. The rustls error sits inside nested `io::Error`s, whose
/// `source()` skips the error they wrap, so those are opened with `get_ref`.
pub(super) fn is_untrusted_certificate(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(cause) = current {
        if let Some(rustls::Error::InvalidCertificate(_)) = cause.downcast_ref::<rustls::Error>() {
            return true;
        }
        current = match cause.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
    }
    false
}

/// Whether the server ended the handshake with an alert that says our
/// certificate is missing or not one it trusts: no retry changes that.
pub(super) fn is_client_certificate_refused(err: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription::{BadCertificate, CertificateRequired, CertificateUnknown, UnknownCA};
    let mut current = Some(err);
    while let Some(cause) = current {
        if let Some(rustls::Error::AlertReceived(
            CertificateRequired | BadCertificate | CertificateUnknown | UnknownCA,
        )) = cause.downcast_ref::<rustls::Error>()
        {
            return true;
        }
        current = match cause.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
    }
    false
}

pub(super) fn status_error(status: u16, object: &str, message: String) -> RegistryError {
    match status {
        401 | 403 => RegistryError::Denied {
            object: object.to_string(),
            message,
        },
        404 => RegistryError::NotFound {
            object: object.to_string(),
            message,
        },
        _ => RegistryError::Registry {
            status: Some(status),
            object: object.to_string(),
            message,
        },
    }
}

/// A request that got no answer: a certificate refused (on either side),
/// a timeout, a connection refused or cut.
pub(super) fn classify_transport(err: &reqwest::Error, registry: &str, object: &str) -> RegistryError {
    if let Some(status) = err.status() {
        return status_error(status.as_u16(), object, error_chain(err));
    }
    if is_untrusted_certificate(err) {
        return RegistryError::UntrustedCertificate {
            registry: registry.to_string(),
            message: error_chain(err),
        };
    }
    if is_client_certificate_refused(err) {
        return RegistryError::ClientCertificateRefused {
            registry: registry.to_string(),
            message: error_chain(err),
        };
    }
    RegistryError::Unreachable {
        registry: registry.to_string(),
        attempts: 1,
        message: error_chain(err),
    }
}

/// Up to `limit` bytes of a body; what a failed read left is dropped.
pub(super) async fn read_small_body(mut response: Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            body.truncate(limit);
            break;
        }
    }
    body
}

/// The error a failed answer means: its status, or, for a status that
/// says less, the code of the distribution error envelope in its body.
pub(super) async fn response_error(response: Response, object: &str) -> RegistryError {
    let status = response.status().as_u16();
    let body = read_small_body(response, MAX_ERROR_MESSAGE_BYTES).await;
    let message = String::from_utf8_lossy(&body).trim().to_string();
    let status = match status {
        401 | 403 | 404 | 429 => status,
        _ => envelope_status(&body).unwrap_or(status),
    };
    status_error(status, object, message)
}

/// The status the first known code of a distribution error envelope
/// (`{"errors":[{"code":"DENIED",...}]}`) stands for.
pub(super) fn envelope_status(body: &[u8]) -> Option<u16> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<EnvelopeError>,
    }
    #[derive(serde::Deserialize)]
    struct EnvelopeError {
        code: String,
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    envelope.errors.iter().find_map(|error| match error.code.as_str() {
        "UNAUTHORIZED" => Some(401),
        "DENIED" => Some(403),
        "BLOB_UNKNOWN" | "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "NOT_FOUND" => Some(404),
        "TOOMANYREQUESTS" => Some(429),
        _ => None,
    })
}
