//! The registry side of committing a container to an image: pushing layer
//! blobs, the image config and an OCI image manifest to a distribution
//! registry, and pulling a base image's manifest, config and blobs from one.
//!
//! Every blob is checked against its declared digest and size before anything
//! is uploaded, blobs the registry already holds are not uploaded again, and
//! each registry request is retried with exponential backoff on network
//! errors, 5xx and 429. Knows nothing of snapshots, tar streams or containerd:
//! callers hand in finished blobs and get back digests.
//!
//! Everything read from a registry is bounded before it is read: a manifest
//! or index by [`MAX_MANIFEST_BYTES`], a config by its descriptor's size and
//! [`MAX_CONFIG_BYTES`], a blob by its descriptor's size. A registry is
//! data from elsewhere: a lying `Content-Length` or an endless body ends the
//! read with [`RegistryError::TooLarge`] or [`RegistryError::SizeMismatch`],
//! never an exhausted memory or disk.
//!
//! Which hosts serve a registry's content, over which scheme and trusting
//! which CAs, comes from containerd-style `hosts.toml` files ([`hosts`]):
//! pulls try the mirrors that may serve them first and fall back to the next
//! endpoint when one is unreachable, failing or lacks the content; a push
//! goes to the first endpoint that may take it. A loopback registry no file
//! configures speaks HTTPS or, failing that, plain HTTP, as docker's do.
//!
//! Credentials are never logged. Explicit ones given per call are for the
//! reference's own registry; every other endpoint (a mirror) gets what the
//! client's [`CredentialSource`] says for its host.
//!
//! The distribution API calls themselves (the ping and its auth challenge in
//! `auth`, blob HEAD, GET and monolithic upload, manifest GET and PUT in
//! `transfer`, their failures in `errors`) are made on `reqwest`, one client per endpoint carrying that endpoint's CAs,
//! `skip_verify` and client certificate, so every request of a call is made
//! with the TLS identity its `hosts.toml` gives. oci-client serves only for
//! its types and its reference parsing. A bearer token is fetched once per
//! call and endpoint, and fetched again once when a request is refused with
//! 401 mid-call (it expired).

mod auth;
mod errors;
pub mod hosts;
mod tls_probe;
mod transfer;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use oci_client::manifest::{
    OciManifest, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::Reference;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, instrument, warn};

use crate::error::{io_err, Classify, ErrorKind, IoError};
use crate::oci::digest::{hex, is_sha256_hex};

use auth::*;
pub use errors::RegistryError;
use errors::*;
pub use hosts::{is_loopback_registry, Capabilities, ClientIdentity, Endpoint, HostsError, RegistryHosts, Scheme};
pub use oci_client::manifest::{OciDescriptor, OciImageManifest};
pub use oci_client::secrets::RegistryAuth;
use transfer::*;
pub(crate) use transfer::{manifest_v2, partial_path};

/// Where a registry client finds credentials for a registry host it talks to.
pub trait CredentialSource: Send + Sync + std::fmt::Debug {
    /// Credentials for `host` ("host" or "host:port", as in a reference;
    /// docker.io for Docker Hub), or None to go anonymous.
    fn credentials(&self, host: &str) -> Result<Option<RegistryAuth>, String>;
}

/// Size of the reads that feed an upload or a download file.
const CHUNK_SIZE: usize = 1 << 20;
/// Reads in flight between the disk thread and the HTTP body.
const CHUNKS_IN_FLIGHT: usize = 4;
/// No single backoff sleep is longer than this, whatever the attempt number.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// A registry that accepts no TCP connection within this is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest manifest or index read, as containerd bounds them: real ones
/// are a few KiB, even for images of hundreds of layers.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The largest image config read, whatever its descriptor says: real ones
/// are a few KiB (a long history makes tens).
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// A manifest read that receives nothing for this long is abandoned (and
/// retried): a registry dripping bytes cannot hold a pull forever.
const MANIFEST_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of an error body or a token response read.
const MAX_SMALL_BODY_BYTES: usize = 1 << 20;
/// What an error message quotes of an error body.
const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
/// What a manifest request accepts: images and indexes, OCI and Docker.
const MANIFEST_MEDIA_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// A content digest as this crate accepts one from a manifest, a label or a
/// bootstrap: `sha256:` and 64 lowercase hex. [`Digest::parse`] is the only
/// way to make one, so its hex is safe to use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

/// A string that is not a `sha256:<64 lowercase hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {digest:?}: only sha256:<64 lowercase hex> is supported")]
pub struct InvalidDigest {
    /// The refused string, cut to 100 characters.
    pub digest: String,
}

impl Digest {
    pub fn parse(digest: &str) -> Result<Digest, InvalidDigest> {
        match digest.strip_prefix("sha256:") {
            Some(hex) if is_sha256_hex(hex) => Ok(Digest(digest.to_string())),
            _ => Err(InvalidDigest {
                digest: digest.chars().take(100).collect(),
            }),
        }
    }

    /// `sha256:<digest>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 lowercase hex after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = InvalidDigest;

    fn from_str(digest: &str) -> Result<Digest, InvalidDigest> {
        Digest::parse(digest)
    }
}

/// How the client talks to registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Accept every endpoint without trusted TLS: HTTPS with any certificate
    /// is tried first, then plain HTTP (as docker treats an insecure
    /// registry). A per-request override of what `hosts` says.
    pub insecure: bool,
    /// Further attempts after a failed one, for transient failures only.
    /// Only the last endpoint of a pull retries: the others give way to the
    /// next at once.
    pub retries: u32,
    /// Sleep before the first retry; it doubles for each further one.
    pub retry_base_delay: Duration,
    /// Mirrors, schemes and CAs per registry host.
    pub hosts: RegistryHosts,
    /// Credentials per endpoint host, asked when a call gives none for its
    /// registry and for every mirror; None goes anonymous. Its `Debug` must
    /// show no secret: these options are printed with the client.
    pub credentials: Option<Arc<dyn CredentialSource>>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure: false,
            retries: 4,
            retry_base_delay: Duration::from_millis(500),
            hosts: RegistryHosts::none(),
            credentials: None,
        }
    }
}

impl RegistryOptions {
    /// Options with the host configuration of `config` and the credentials
    /// of its `docker_config` (none when it is empty).
    pub fn from_config(config: &crate::config::RegistryConfig) -> RegistryOptions {
        let credentials: Option<Arc<dyn CredentialSource>> = if config.docker_config.is_empty() {
            None
        } else {
            Some(Arc::new(crate::oci::credentials::Keychain::new(&config.docker_config)))
        };
        RegistryOptions {
            hosts: RegistryHosts::from_config(config),
            credentials,
            ..RegistryOptions::default()
        }
    }
}

/// What a call asks of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Blobs by digest.
    Pull,
    /// A manifest by tag (or by digest, which needs only `pull`).
    Resolve,
    Push,
}

impl Need {
    fn capabilities(self) -> Capabilities {
        Capabilities {
            pull: self != Need::Push,
            resolve: self == Need::Resolve,
            push: self == Need::Push,
        }
    }

    /// The actions a bearer token's scope asks for.
    fn actions(self) -> &'static str {
        match self {
            Need::Push => "pull,push",
            Need::Pull | Need::Resolve => "pull",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Need::Pull => "pull",
            Need::Resolve => "resolve",
            Need::Push => "push",
        }
    }
}

/// Where the bytes of a blob to push are.
#[derive(Debug, Clone)]
pub enum LayerData {
    /// A finished blob file, streamed from disk.
    File(PathBuf),
    /// A small blob held in memory.
    Bytes(Vec<u8>),
    /// A blob the target repository holds already (checked with
    /// [`RegistryClient::has_blob`]): referenced by the manifest, not
    /// uploaded; the push fails if it has gone missing since.
    InTarget,
}

/// One layer of the image to push, in manifest order.
#[derive(Debug, Clone)]
pub struct LayerSource {
    pub media_type: String,
    /// `sha256:<hex>` of the blob as stored (compressed, if it is).
    pub digest: String,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
    pub data: LayerData,
}

/// What the registry holds after a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// The normalised reference the manifest was pushed to.
    pub reference: String,
    pub manifest_digest: String,
    /// Where the registry says the manifest can be fetched.
    pub manifest_url: String,
}

/// A base image's manifest (for the running platform, when the reference
/// names an index) and its config.
#[derive(Debug, Clone)]
pub struct PulledManifest {
    pub manifest: OciImageManifest,
    /// Digest of `manifest` as the registry stores it.
    pub manifest_digest: String,
    /// `manifest` as the registry stores it (what `manifest_digest` hashes).
    pub manifest_bytes: Vec<u8>,
    /// The config blob, verified against `manifest.config`.
    pub config: Vec<u8>,
}

/// Pushes and pulls images; cheap to share, holds no connection.
#[derive(Debug)]
pub struct RegistryClient {
    options: RegistryOptions,
    /// For insecure registries: which scheme each host answered on.
    schemes: Mutex<HashMap<String, Scheme>>,
}

/// One call's view of one endpoint: its HTTP clients (with the endpoint's
/// TLS settings) and what authorises the call's requests there.
struct Session {
    /// The call's reference, at the endpoint's host.
    reference: Reference,
    /// The endpoint's host.
    registry: String,
    /// Retries of each request: none when another endpoint is next.
    retries: u32,
    /// Blob and manifest writes and blob reads: no read timeout, as an
    /// upload of a large layer waits long for the registry's answer.
    http: reqwest::Client,
    /// Manifest reads, abandoned when the registry stalls.
    manifests: reqwest::Client,
    scheme: Scheme,
    /// What authorises each request; a bearer token is replaced when it
    /// expires. Never held across an await.
    credentials: Mutex<Credentials>,
    /// The call's credentials for this endpoint, kept to fetch a new token.
    auth: RegistryAuth,
    need: Need,
}

#[derive(Clone)]
enum Credentials {
    None,
    /// A token from the registry's token service, renewable there.
    Token {
        token: String,
        challenge: BearerChallenge,
    },
    /// A bearer token the caller gave: nothing renews it.
    Bearer(String),
    Basic(String, String),
}

/// Where a registry sends clients for a token (`WWW-Authenticate: Bearer`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BearerChallenge {
    realm: String,
    service: Option<String>,
}

impl Session {
    /// `<scheme>://<registry>/v2/<repository>`.
    fn repository_url(&self) -> String {
        format!(
            "{}://{}/v2/{}",
            self.scheme.as_str(),
            self.registry,
            self.reference.repository()
        )
    }

    fn current_credentials(&self) -> Credentials {
        // A poisoned lock only means a panic elsewhere mid-assignment of a
        // whole value: the value is intact.
        match self.credentials.lock() {
            Ok(credentials) => credentials.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Sends the request `build` makes with the session's credentials; on
    /// a 401 with a token from the token service, fetches a new token once
    /// and sends it again (a token may expire mid-call). Any status is
    /// returned: what it means is the caller's to say.
    async fn send<F>(&self, object: &str, build: F) -> Result<Response, RegistryError>
    where
        F: Fn(&reqwest::Client) -> RequestBuilder,
    {
        self.send_with(&self.http, object, build).await
    }

    async fn send_with<F>(&self, http: &reqwest::Client, object: &str, build: F) -> Result<Response, RegistryError>
    where
        F: Fn(&reqwest::Client) -> RequestBuilder,
    {
        let credentials = self.current_credentials();
        let response = authorize(build(http), &credentials)
            .send()
            .await
            .map_err(|err| classify_transport(&err, &self.registry, object))?;
        let Credentials::Token { challenge, .. } = credentials else {
            return Ok(response);
        };
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        debug!(registry = %self.registry, "bearer token refused, fetching a new one");
        let token = fetch_token(http, &challenge, &self.auth, &self.reference, self.need, &self.registry).await?;
        let renewed = Credentials::Token { token, challenge };
        match self.credentials.lock() {
            Ok(mut credentials) => *credentials = renewed.clone(),
            Err(poisoned) => *poisoned.into_inner() = renewed.clone(),
        }
        authorize(build(http), &renewed)
            .send()
            .await
            .map_err(|err| classify_transport(&err, &self.registry, object))
    }
}

static CRYPTO_PROVIDER: Once = Once::new();

/// Runs `$body` with `$session` bound to a session of each endpoint of
/// `$reference`'s registry that can serve `$need`, in turn, until one
/// succeeds or fails in a way the next cannot mend. A macro rather than a
/// function taking an async closure: the futures of such closures are not
/// `Send` for every lifetime, which the daemon's spawned jobs need.
macro_rules! on_endpoints {
    ($client:expr, $reference:expr, $auth:expr, $need:expr, |$session:ident| $body:expr) => {{
        let client = $client;
        let reference: &Reference = $reference;
        let endpoints = client.capable_endpoints(reference, $need)?;
        let count = endpoints.len();
        let mut outcome = None;
        for (index, endpoint) in endpoints.iter().enumerate() {
            let last = index + 1 == count;
            let result = match client.open_session(reference, endpoint, $auth, $need, last).await {
                Ok(session) => {
                    let $session = &session;
                    $body.await
                }
                Err(err) => Err(err),
            };
            match result {
                Err(err) if client.gives_way(reference, endpoint, last, &err) => {}
                result => {
                    outcome = Some(result);
                    break;
                }
            }
        }
        // capable_endpoints returns at least one endpoint, and the last one's result is kept.
        outcome.unwrap_or_else(|| {
            Err(RegistryError::NoEndpoint {
                registry: reference.registry().to_string(),
                operation: $need.verb(),
            })
        })
    }};
}

impl RegistryClient {
    pub fn new(options: RegistryOptions) -> Self {
        CRYPTO_PROVIDER.call_once(|| {
            // An error means the process installed a provider already: it serves as well.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        RegistryClient {
            options,
            schemes: Mutex::new(HashMap::new()),
        }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// Pushes `layers` (in order), `config` and an OCI image manifest
    /// annotated with `manifest_annotations` to `reference`, at the first
    /// endpoint of its registry that may take a push. Every blob is verified
    /// before the first upload, so a bad one leaves the registry untouched.
    #[instrument(level = "info", err(level = "info"), skip_all, fields(reference = %reference, layers = layers.len()))]
    pub async fn push_image(
        &self,
        reference: &str,
        layers: &[LayerSource],
        config: &[u8],
        manifest_annotations: BTreeMap<String, String>,
        auth: &RegistryAuth,
    ) -> Result<PushedImage, RegistryError> {
        let parsed = parse_reference(reference)?;
        if parsed.digest().is_some() {
            return Err(RegistryError::InvalidReference {
                reference: reference.to_string(),
                message: "a push needs a tag, not a digest".to_string(),
            });
        }
        for layer in layers {
            verify_layer(layer).await?;
        }
        let config_digest = sha256_digest(config);
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: OciDescriptor {
                media_type: IMAGE_CONFIG_MEDIA_TYPE.to_string(),
                digest: config_digest.clone(),
                size: config.len() as i64,
                ..OciDescriptor::default()
            },
            layers: layers.iter().map(layer_descriptor).collect(),
            subject: None,
            artifact_type: None,
            annotations: (!manifest_annotations.is_empty()).then_some(manifest_annotations),
        };
        // Plain data: serialising cannot fail.
        let body = serde_json::to_vec(&manifest).expect("manifest serialises");
        let manifest_digest = sha256_digest(&body);

        let manifest_url = on_endpoints!(self, &parsed, auth, Need::Push, |session| async {
            for layer in layers {
                self.push_blob_once(session, &layer.digest, layer.size, &layer.data)
                    .await?;
            }
            let config_data = LayerData::Bytes(config.to_vec());
            self.push_blob_once(session, &config_digest, config.len() as u64, &config_data)
                .await?;
            let object = format!("manifest {}", session.reference.whole());
            self.with_retries(
                session.retries,
                "manifest upload",
                &manifest_digest,
                &session.registry,
                || {
                    let (body, object, digest) = (&body, &object, &manifest_digest);
                    async move { put_manifest(session, body, digest, object).await }
                },
            )
            .await
        })?;
        info!(digest = %manifest_digest, "pushed image manifest");
        Ok(PushedImage {
            reference: parsed.whole(),
            manifest_digest,
            manifest_url,
        })
    }

    /// Whether the repository of `reference` holds blob `digest`.
    pub async fn has_blob(&self, reference: &str, digest: &str, auth: &RegistryAuth) -> Result<bool, RegistryError> {
        let present = self.blobs_present(reference, &[digest], auth).await?;
        Ok(present.first().copied().unwrap_or(false))
    }

    /// Which of `digests` the repository of `reference` holds, in order,
    /// asked over one session of the endpoint a push would go to.
    #[instrument(level = "debug", err(level = "info"), skip_all, fields(reference = %reference, blobs = digests.len()))]
    pub async fn blobs_present(
        &self,
        reference: &str,
        digests: &[&str],
        auth: &RegistryAuth,
    ) -> Result<Vec<bool>, RegistryError> {
        let parsed = parse_reference(reference)?;
        for digest in digests {
            check_digest_format(&format!("blob {digest}"), digest)?;
        }
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        // What a later push may reference is what its endpoint holds.
        on_endpoints!(self, &parsed, auth, Need::Push, |session| async {
            let mut present = Vec::with_capacity(digests.len());
            for digest in digests {
                let object = format!("blob {digest}");
                let exists = self
                    .with_retries(session.retries, "blob check", digest, &session.registry, || {
                        blob_exists(session, digest, &object)
                    })
                    .await?;
                present.push(exists);
            }
            Ok(present)
        })
    }

    /// The image manifest `reference` names and its config blob, each read
    /// within its bound ([`MAX_MANIFEST_BYTES`], the config's descriptor
    /// and [`MAX_CONFIG_BYTES`]).
    #[instrument(level = "info", err(level = "info"), skip_all, fields(reference = %reference))]
    pub async fn pull_manifest_and_config(
        &self,
        reference: &str,
        auth: &RegistryAuth,
    ) -> Result<PulledManifest, RegistryError> {
        let parsed = parse_reference(reference)?;
        on_endpoints!(self, &parsed, auth, resolve_need(&parsed), |session| async {
            let (manifest, manifest_digest, manifest_bytes) = self.pull_image_manifest(session).await?;
            let config_object = format!("config blob {}", manifest.config.digest);
            let config_digest = check_digest_format(&config_object, &manifest.config.digest)?;
            let declared = descriptor_size(&config_object, manifest.config.size)?;
            if declared > MAX_CONFIG_BYTES {
                return Err(RegistryError::TooLarge {
                    object: format!("{config_object} ({declared} bytes declared)"),
                    limit: MAX_CONFIG_BYTES,
                });
            }
            let config = self
                .with_retries(
                    session.retries,
                    "config pull",
                    config_digest.as_str(),
                    &session.registry,
                    || read_blob_bounded(session, &config_digest, declared, &config_object),
                )
                .await?;
            Ok(PulledManifest {
                manifest,
                manifest_digest,
                manifest_bytes,
                config,
            })
        })
    }

    /// The size the image `reference` declares for its layer `digest`, from
    /// its manifest: what bounds a download whose caller knows only the
    /// digest (a snapshotter label).
    #[instrument(level = "debug", err(level = "info"), skip_all, fields(reference = %reference, digest = %digest))]
    pub async fn layer_size(&self, reference: &str, digest: &str, auth: &RegistryAuth) -> Result<u64, RegistryError> {
        let parsed = parse_reference(reference)?;
        let object = format!("blob {digest}");
        check_digest_format(&object, digest)?;
        on_endpoints!(self, &parsed, auth, resolve_need(&parsed), |session| async {
            let (manifest, _, _) = self.pull_image_manifest(session).await?;
            let layer =
                manifest
                    .layers
                    .iter()
                    .find(|l| l.digest == digest)
                    .ok_or_else(|| RegistryError::NotInImage {
                        reference: session.reference.whole(),
                        digest: digest.to_string(),
                    })?;
            descriptor_size(&object, layer.size)
        })
    }

    /// The image manifest of the session's reference, for this platform when
    /// it names an index, its digest and its bytes.
    async fn pull_image_manifest(
        &self,
        session: &Session,
    ) -> Result<(OciImageManifest, String, Vec<u8>), RegistryError> {
        let object = format!("manifest {}", session.reference.whole());
        let (body, digest) = self
            .with_retries(session.retries, "manifest pull", "", &session.registry, || {
                read_manifest_bounded(session, &session.reference, &object)
            })
            .await?;
        let index = match parse_manifest(&body, &object)? {
            OciManifest::Image(manifest) => return Ok((manifest, digest, body)),
            OciManifest::ImageIndex(index) => index,
        };
        let chosen =
            oci_client::client::current_platform_resolver(&index.manifests).ok_or_else(|| RegistryError::NotFound {
                object: object.clone(),
                message: "the index has no manifest for this platform".to_string(),
            })?;
        check_digest_format(&object, &chosen)?;
        let by_digest = session.reference.clone_with_digest(chosen);
        let object = format!("manifest {}", by_digest.whole());
        let (body, digest) = self
            .with_retries(session.retries, "manifest pull", "", &session.registry, || {
                read_manifest_bounded(session, &by_digest, &object)
            })
            .await?;
        match parse_manifest(&body, &object)? {
            OciManifest::Image(manifest) => Ok((manifest, digest, body)),
            OciManifest::ImageIndex(_) => Err(RegistryError::InvalidManifest {
                object,
                message: "an index names another index for this platform".to_string(),
            }),
        }
    }

    /// Downloads blob `digest` of `reference`'s repository to `dest`,
    /// verifying its digest and its `size` (its descriptor's): a body that
    /// goes past it is cut off there. The file appears at `dest` only when
    /// complete and verified. Returns its size.
    #[instrument(level = "info", err(level = "info"), skip_all, fields(reference = %reference, digest = %digest, size = size))]
    pub async fn pull_blob_to(
        &self,
        reference: &str,
        digest: &str,
        size: u64,
        dest: &Path,
        auth: &RegistryAuth,
    ) -> Result<u64, RegistryError> {
        let parsed = parse_reference(reference)?;
        let object = format!("blob {digest}");
        let digest = check_digest_format(&object, digest)?;
        let partial = partial_path(dest);
        let size = on_endpoints!(self, &parsed, auth, Need::Pull, |session| async {
            self.with_retries(session.retries, "blob pull", digest.as_str(), &session.registry, || {
                download_blob(session, &digest, size, &object, &partial)
            })
            .await
        });
        let size = match size {
            Ok(size) => size,
            Err(err) => {
                let _ = std::fs::remove_file(&partial);
                return Err(err);
            }
        };
        std::fs::rename(&partial, dest).map_err(io_err("blob file", dest))?;
        Ok(size)
    }

    /// The endpoints a call on `reference` may use for `need`, in the order
    /// tried: every capable one for a pull, the first capable one for a push
    /// (as containerd pushes).
    pub fn endpoints_for(&self, reference: &str, push: bool) -> Result<Vec<Endpoint>, RegistryError> {
        let parsed = parse_reference(reference)?;
        let need = if push { Need::Push } else { resolve_need(&parsed) };
        self.capable_endpoints(&parsed, need)
    }

    fn capable_endpoints(&self, reference: &Reference, need: Need) -> Result<Vec<Endpoint>, RegistryError> {
        let mut endpoints: Vec<Endpoint> = self
            .options
            .hosts
            .endpoints(reference.registry())?
            .into_iter()
            .filter(|endpoint| endpoint.capabilities.covers(need.capabilities()))
            .collect();
        if need == Need::Push {
            endpoints.truncate(1);
        }
        if endpoints.is_empty() {
            return Err(RegistryError::NoEndpoint {
                registry: reference.registry().to_string(),
                operation: need.verb(),
            });
        }
        Ok(endpoints)
    }

    /// Whether a failure at `endpoint` gives way to the next endpoint: a
    /// refusal of credentials is final, as is any failure of the last one.
    fn gives_way(&self, reference: &Reference, endpoint: &Endpoint, last: bool, err: &RegistryError) -> bool {
        let gives_way = !last && err.tries_next_endpoint();
        if gives_way {
            warn!(
                registry = reference.registry(),
                endpoint = %endpoint.host,
                error = %err,
                "registry endpoint failed, trying the next one"
            );
        }
        gives_way
    }

    /// The credentials for `endpoint`: the call's own for the registry
    /// itself, else what the credential source says for its host.
    fn endpoint_auth(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        auth: &RegistryAuth,
    ) -> Result<RegistryAuth, RegistryError> {
        if endpoint.is_server && *auth != RegistryAuth::Anonymous {
            return Ok(auth.clone());
        }
        let host = if endpoint.is_server {
            reference.registry()
        } else {
            endpoint.host.as_str()
        };
        let Some(source) = &self.options.credentials else {
            return Ok(RegistryAuth::Anonymous);
        };
        match source.credentials(host) {
            Ok(found) => Ok(found.unwrap_or(RegistryAuth::Anonymous)),
            Err(message) => Err(RegistryError::Credentials {
                registry: host.to_string(),
                message,
            }),
        }
    }

    /// A client for one call on one endpoint, past the endpoint's ping and
    /// auth challenge.
    async fn open_session(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        auth: &RegistryAuth,
        need: Need,
        last: bool,
    ) -> Result<Session, RegistryError> {
        let at_endpoint = reference_at(reference, &endpoint.host);
        let registry = at_endpoint.resolve_registry().to_string();
        // A credential helper is a process the lookup may wait seconds
        // for: off the async workers where the runtime allows it.
        let auth = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.endpoint_auth(reference, endpoint, auth))?
            }
            _ => self.endpoint_auth(reference, endpoint, auth)?,
        };
        let retries = if last { self.options.retries } else { 0 };
        let may_fall_back = endpoint.scheme == Scheme::Https && (self.options.insecure || endpoint.http_fallback);
        let http = self.build_http_client(endpoint, &registry, None)?;
        let manifests = self.build_http_client(endpoint, &registry, Some(MANIFEST_READ_TIMEOUT))?;
        let shows_certificate = !endpoint.client.is_empty();
        let (scheme, credentials) = self
            .with_retries(retries, "registry ping", "", &registry, || async {
                let (first, fallback) = match (endpoint.scheme, may_fall_back, self.known_scheme(&registry)) {
                    (Scheme::Http, _, _) => (Scheme::Http, None),
                    (Scheme::Https, false, _) => (Scheme::Https, None),
                    (Scheme::Https, true, Some(known)) => (known, None),
                    (Scheme::Https, true, None) => (Scheme::Https, Some(Scheme::Http)),
                };
                let first_err =
                    match authenticate(&http, first, &registry, &at_endpoint, &auth, need, shows_certificate).await {
                        Ok(credentials) => return Ok((first, credentials)),
                        Err(err) => err,
                    };
                let Some(fallback) = fallback.filter(|_| first_err.is_transient()) else {
                    return Err(first_err);
                };
                match authenticate(&http, fallback, &registry, &at_endpoint, &auth, need, shows_certificate).await {
                    Ok(credentials) => Ok((fallback, credentials)),
                    Err(err) => Err(combine(first_err, err)),
                }
            })
            .await?;
        if may_fall_back {
            if let Ok(mut schemes) = self.schemes.lock() {
                schemes.insert(registry.clone(), scheme);
            }
        }
        debug!(registry, ?scheme, "registry answered");
        Ok(Session {
            reference: at_endpoint,
            registry,
            retries,
            http,
            manifests,
            scheme,
            credentials: Mutex::new(credentials),
            auth,
            need,
        })
    }

    fn known_scheme(&self, registry: &str) -> Option<Scheme> {
        // A poisoned map only lost a cache entry: probing again is correct.
        self.schemes.lock().ok()?.get(registry).copied()
    }

    /// Whether TLS certificates of `endpoint` go unchecked.
    fn skips_verify(&self, endpoint: &Endpoint) -> bool {
        self.options.insecure || endpoint.skip_verify
    }

    /// An HTTP client for `endpoint`: its CAs besides the system's, its
    /// `skip_verify`, and its first client certificate, if any.
    fn build_http_client(
        &self,
        endpoint: &Endpoint,
        registry: &str,
        read_timeout: Option<Duration>,
    ) -> Result<reqwest::Client, RegistryError> {
        let failed = |err: reqwest::Error| RegistryError::Registry {
            status: None,
            object: format!("client for {registry}"),
            message: error_chain(&err),
        };
        let mut builder = reqwest::Client::builder()
            .danger_accept_invalid_certs(self.skips_verify(endpoint))
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(timeout) = read_timeout {
            builder = builder.read_timeout(timeout);
        }
        for ca in &endpoint.ca {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&ca.pem).map_err(failed)?);
        }
        if let Some(identity) = endpoint.client.first() {
            builder = builder.identity(reqwest::Identity::from_pem(&identity.pem).map_err(failed)?);
        }
        builder.build().map_err(failed)
    }

    /// Uploads one blob unless the registry has it already.
    async fn push_blob_once(
        &self,
        session: &Session,
        digest: &str,
        size: u64,
        data: &LayerData,
    ) -> Result<(), RegistryError> {
        let object = format!("blob {digest}");
        self.with_retries(session.retries, "blob upload", digest, &session.registry, || async {
            let exists = blob_exists(session, digest, &object).await?;
            if exists {
                info!(digest, "registry has blob already, not uploading");
                return Ok(());
            }
            upload_blob(session, digest, size, data, &object).await?;
            info!(digest, size, "uploaded blob");
            Ok(())
        })
        .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or the `retries`
    /// are spent, sleeping `retry_base_delay * 2^n` between attempts.
    async fn with_retries<T, F, Fut>(
        &self,
        retries: u32,
        operation: &'static str,
        digest: &str,
        registry: &str,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let attempts = retries.saturating_add(1);
        let mut number = 1;
        loop {
            debug!(operation, registry, digest, attempt = number, "registry request");
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(err) if err.is_transient() && number < attempts => {
                    let delay = backoff_delay(self.options.retry_base_delay, number);
                    warn!(operation, registry, digest, attempt = number, error = %err, ?delay, "registry request failed, retrying");
                    tokio::time::sleep(delay).await;
                    number += 1;
                }
                Err(err) => {
                    warn!(operation, registry, digest, attempt = number, error = %err, "registry request failed");
                    return Err(with_attempts(err, number));
                }
            }
        }
    }
}

/// What reading the manifest of `reference` needs: a tag is resolved, a
/// digest only pulled.
fn resolve_need(reference: &Reference) -> Need {
    if reference.digest().is_some() {
        Need::Pull
    } else {
        Need::Resolve
    }
}

/// `reference` with its repository, tag and digest at registry `host`.
fn reference_at(reference: &Reference, host: &str) -> Reference {
    let (host, repository) = (host.to_string(), reference.repository().to_string());
    match (reference.tag(), reference.digest()) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(host, repository, tag.to_string(), digest.to_string())
        }
        (None, Some(digest)) => Reference::with_digest(host, repository, digest.to_string()),
        (tag, None) => Reference::with_tag(host, repository, tag.unwrap_or("latest").to_string()),
    }
}

/// Sleep before retry `attempt` (1-based): base, 2 base, 4 base ..., capped.
fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(MAX_RETRY_DELAY)
}

fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    Reference::from_str(reference).map_err(|err| RegistryError::InvalidReference {
        reference: reference.chars().take(300).collect(),
        message: err.to_string(),
    })
}

fn check_digest_format(blob: &str, digest: &str) -> Result<Digest, RegistryError> {
    Digest::parse(digest).map_err(|InvalidDigest { digest }| RegistryError::InvalidDigest {
        blob: blob.to_string(),
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff_delay(base, 1), Duration::from_millis(100));
        assert_eq!(backoff_delay(base, 2), Duration::from_millis(200));
        assert_eq!(backoff_delay(base, 4), Duration::from_millis(800));
        assert_eq!(backoff_delay(base, 40), MAX_RETRY_DELAY);
    }

    #[test]
    fn only_network_5xx_and_429_are_retried() {
        let registry = |status| status_error(status, "blob x", String::new());
        assert!(registry(500).is_transient());
        assert!(registry(503).is_transient());
        assert!(registry(429).is_transient());
        assert!(!registry(400).is_transient());
        assert!(!registry(404).is_transient());
        assert!(!registry(401).is_transient());
        let unreachable = RegistryError::Unreachable {
            registry: "r".into(),
            attempts: 1,
            message: String::new(),
        };
        assert!(unreachable.is_transient());
    }

    #[test]
    fn denials_are_permission_errors() {
        for status in [401, 403] {
            let err = status_error(status, "blob x", String::new());
            assert!(err.is_permission());
            assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        }
        assert!(!status_error(500, "blob x", String::new()).is_permission());
        assert_eq!(status_error(404, "blob x", String::new()).kind(), ErrorKind::NotFound);
    }

    #[test]
    fn envelope_codes_map_like_statuses() {
        let status = envelope_status(br#"{"errors":[{"code":"DENIED","message":"no"}]}"#).unwrap();
        assert!(status_error(status, "blob x", String::new()).is_permission());
        assert_eq!(
            envelope_status(br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
            Some(404)
        );
        assert_eq!(envelope_status(b"not json"), None);
    }

    #[test]
    fn bearer_challenges_give_realm_and_service() {
        let challenge = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        )
        .unwrap();
        assert_eq!(challenge.realm, "https://auth.example/token");
        assert_eq!(challenge.service.as_deref(), Some("registry.example"));
        let unquoted = parse_challenge("bearer realm=https://a/t, service=s").unwrap();
        assert_eq!(
            (unquoted.realm.as_str(), unquoted.service.as_deref()),
            ("https://a/t", Some("s"))
        );
        assert_eq!(parse_challenge(r#"Basic realm="registry""#), None);
        assert_eq!(parse_challenge(r#"Bearer service="s""#), None);
    }

    #[test]
    fn digests_must_be_sha256_lowercase_hex() {
        let good = sha256_digest(b"abc");
        assert_eq!(
            good,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(check_digest_format("b", &good).is_ok());
        assert!(check_digest_format("b", &good.to_uppercase()).is_err());
        assert!(check_digest_format("b", "sha512:00").is_err());
        assert!(check_digest_format("b", "sha256:abc").is_err());
    }

    #[test]
    fn digest_values_are_parsed_once_and_give_their_hex() {
        let hex = "ab".repeat(32);
        let digest = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(digest.hex(), hex);
        assert_eq!(digest.to_string(), format!("sha256:{hex}"));
        assert_eq!(format!("sha256:{hex}").parse::<Digest>().unwrap(), digest);
        for bad in [
            "sha256:../../etc/passwd",
            "",
            &hex,
            &format!("sha256:{hex}/"),
            "sha256:AB",
        ] {
            let err = Digest::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[tokio::test]
    async fn a_layer_is_checked_against_its_digest_and_size() {
        let data = b"layer".to_vec();
        let mut layer = LayerSource {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: sha256_digest(&data),
            size: data.len() as u64,
            annotations: BTreeMap::new(),
            data: LayerData::Bytes(data),
        };
        verify_layer(&layer).await.unwrap();
        layer.size += 1;
        assert!(matches!(
            verify_layer(&layer).await,
            Err(RegistryError::SizeMismatch { .. })
        ));
        layer.size -= 1;
        layer.digest = sha256_digest(b"other");
        assert!(matches!(
            verify_layer(&layer).await,
            Err(RegistryError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let auth = RegistryAuth::Basic("user".into(), "hunter2".into());
        assert!(!format!("{auth:?}").contains("hunter2"));
    }

    /// Answers every host but broken.example with `<host>` / `pw`, and
    /// records the hosts asked.
    #[derive(Debug, Default)]
    struct PerHost(Mutex<Vec<String>>);

    impl CredentialSource for PerHost {
        fn credentials(&self, host: &str) -> Result<Option<RegistryAuth>, String> {
            self.0.lock().unwrap().push(host.to_string());
            match host {
                "broken.example" => Err("the helper failed".to_string()),
                "anonymous.example" => Ok(None),
                _ => Ok(Some(RegistryAuth::Basic(host.to_string(), "pw".to_string()))),
            }
        }
    }

    #[test]
    fn explicit_credentials_are_the_registrys_and_the_source_answers_per_host() {
        let source = Arc::new(PerHost::default());
        let client = RegistryClient::new(RegistryOptions {
            credentials: Some(source.clone()),
            ..RegistryOptions::default()
        });
        let reference = parse_reference("docker.io/library/busybox:latest").unwrap();
        let server = RegistryHosts::none().endpoints("docker.io").unwrap().remove(0);
        assert_eq!(server.host, "registry-1.docker.io");
        let mirror = |host: &str| Endpoint {
            host: host.to_string(),
            is_server: false,
            ..server.clone()
        };
        let basic = |user: &str, password: &str| RegistryAuth::Basic(user.to_string(), password.to_string());
        let explicit = basic("me", "mine");
        assert_eq!(client.endpoint_auth(&reference, &server, &explicit).unwrap(), explicit);
        // A mirror never sees the call's credentials: it gets its own.
        assert_eq!(
            client
                .endpoint_auth(&reference, &mirror("mirror.example"), &explicit)
                .unwrap(),
            basic("mirror.example", "pw")
        );
        // The registry's own are looked up by its name, not its API host.
        assert_eq!(
            client
                .endpoint_auth(&reference, &server, &RegistryAuth::Anonymous)
                .unwrap(),
            basic("docker.io", "pw")
        );
        assert_eq!(
            client
                .endpoint_auth(&reference, &mirror("anonymous.example"), &RegistryAuth::Anonymous)
                .unwrap(),
            RegistryAuth::Anonymous
        );
        assert_eq!(
            *source.0.lock().unwrap(),
            ["mirror.example", "docker.io", "anonymous.example"]
        );
        let err = client
            .endpoint_auth(&reference, &mirror("broken.example"), &RegistryAuth::Anonymous)
            .unwrap_err();
        assert!(matches!(err, RegistryError::Credentials { .. }), "{err}");
        assert!(err.to_string().contains("broken.example"), "{err}");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

        let without_source = RegistryClient::new(RegistryOptions::default());
        assert_eq!(
            without_source
                .endpoint_auth(&reference, &mirror("mirror.example"), &explicit)
                .unwrap(),
            RegistryAuth::Anonymous
        );
    }

    #[test]
    fn endpoints_keep_the_reference_but_its_host() {
        let reference = parse_reference("registry.example:5000/team/app:v1").unwrap();
        let moved = reference_at(&reference, "mirror.example");
        assert_eq!(moved.whole(), "mirror.example/team/app:v1");
        let digest = format!("sha256:{}", "a".repeat(64));
        let pinned = parse_reference(&format!("registry.example/app@{digest}")).unwrap();
        assert_eq!(reference_at(&pinned, "m:1").whole(), format!("m:1/app@{digest}"));
        assert_eq!(resolve_need(&pinned), Need::Pull);
        assert_eq!(resolve_need(&reference), Need::Resolve);
    }

    #[test]
    fn partial_download_sits_beside_its_destination() {
        assert_eq!(partial_path(Path::new("/a/b/blob")), PathBuf::from("/a/b/blob.partial"));
    }
}
