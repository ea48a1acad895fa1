//! Registry host configuration in containerd's layout: a directory (by
//! default `/etc/containerd/certs.d`) holding `<host>/hosts.toml` (and
//! `_default/hosts.toml` for hosts without their own), which says, per
//! registry host, which mirrors to try first, which of them may pull,
//! resolve or push, which CAs to trust, and which hosts speak plain HTTP.
//!
//! Owns reading and typing those files only: [`RegistryHosts::endpoints`]
//! turns one into the ordered [`Endpoint`]s a registry client tries. It
//! makes no request and knows nothing of credentials. Files are read at each
//! resolution, as containerd does, so an edit applies to the next request.
//!
//! Secrets named by a file are read and checked when the file is parsed:
//! a client certificate's key (`client`) must be readable by its owner
//! only, and a file that is missing or holds no usable PEM is an error
//! naming it and its field, not a TLS failure at the first request.
//!
//! What the registry client cannot do is refused with a reason rather than
//! ignored: extra headers (`header`) and endpoint paths other than `/v2`.

use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::{io_err, IoError};

/// containerd's default `config_path` (the configuration's default too).
pub const DEFAULT_CONFIG_PATH: &str = crate::config::DEFAULT_REGISTRY_CONFIG_PATH;
/// The file in each host directory.
const HOSTS_FILE: &str = "hosts.toml";
/// The directory whose `hosts.toml` serves hosts without their own.
const DEFAULT_HOST_DIR: &str = "_default";
/// A CA file larger than this is not a CA file.
const MAX_CA_FILE_BYTES: u64 = 1 << 20;
/// A client certificate or key file larger than this is neither.
const MAX_CLIENT_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("registry hosts file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("registry hosts file {path}: field {field}: {reason}")]
    Invalid {
        path: String,
        field: String,
        reason: String,
    },
    #[error("registry hosts file {path}: field {field}: CA file {ca}: {reason}")]
    CaFile {
        path: String,
        field: String,
        ca: String,
        reason: String,
    },
    #[error("registry hosts file {path}: field {field}: client file {file}: {reason}")]
    ClientFile {
        path: String,
        field: String,
        file: String,
        reason: String,
    },
    /// Its op is "registry hosts file", whatever the call: the message
    /// names the file, not the system call.
    #[error(transparent)]
    Read(#[from] IoError),
}

/// How an endpoint is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Https,
    Http,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }
}

/// What an endpoint may be asked: containerd's `capabilities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve a tag to a manifest.
    pub resolve: bool,
    /// Upload blobs and manifests.
    pub push: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };

    /// Whether these capabilities cover all of `needed`.
    pub fn covers(self, needed: Capabilities) -> bool {
        (self.pull || !needed.pull) && (self.resolve || !needed.resolve) && (self.push || !needed.push)
    }
}

/// A PEM certificate to trust, as read from a `ca` file.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificate {
    /// The file it came from, for messages.
    pub path: PathBuf,
    /// One `-----BEGIN CERTIFICATE-----` block.
    pub pem: Vec<u8>,
}

impl std::fmt::Debug for CaCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCertificate").field("path", &self.path).finish()
    }
}

/// A client certificate and its private key, as read from a `client`
/// entry: what an endpoint that requires mutual TLS is shown.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate file, for messages.
    pub certificate: PathBuf,
    /// The key file: the certificate file itself when it holds both.
    pub key: PathBuf,
    /// The certificate chain then the private key, PEM.
    pub pem: Vec<u8>,
}

/// The key never shows, only where it came from.
impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificate", &self.certificate)
            .field("key", &self.key)
            .finish()
    }
}

/// One place a registry host's content can be asked for, in the order tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
    /// `host` or `host:port`.
    pub host: String,
    pub capabilities: Capabilities,
    /// CAs trusted for this endpoint besides the system's.
    pub ca: Vec<CaCertificate>,
    /// Client certificates, in file order; a TLS connection presents the
    /// first (one identity per connection, as rustls offers it).
    pub client: Vec<ClientIdentity>,
    /// Accept any certificate.
    pub skip_verify: bool,
    /// The registry host itself (the `server`), not a mirror: explicit
    /// credentials given for the reference apply to it.
    pub is_server: bool,
    /// Plain HTTP is tried when the endpoint speaks no TLS: a loopback
    /// registry no file configures, as docker and containerd treat them.
    pub http_fallback: bool,
}

/// Where the `hosts.toml` files are; `None` reads none (every host is its
/// own only endpoint, over HTTPS, loopback falling back to HTTP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryHosts {
    config_path: Option<PathBuf>,
}

impl RegistryHosts {
    /// No host configuration.
    pub fn none() -> RegistryHosts {
        RegistryHosts { config_path: None }
    }

    /// Host configuration under `config_path` (containerd's `certs.d`
    /// layout). A missing directory configures nothing.
    pub fn at(config_path: impl Into<PathBuf>) -> RegistryHosts {
        RegistryHosts {
            config_path: Some(config_path.into()),
        }
    }

    /// The host configuration `registry.config_path` names; none when it
    /// is empty.
    pub fn from_config(config: &crate::config::RegistryConfig) -> RegistryHosts {
        if config.config_path.is_empty() {
            RegistryHosts::none()
        } else {
            RegistryHosts::at(&config.config_path)
        }
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// The endpoints of registry `host` ("host" or "host:port", as in a
    /// reference; "docker.io" for Docker Hub), mirrors first in file order,
    /// the server last.
    pub fn endpoints(&self, host: &str) -> Result<Vec<Endpoint>, HostsError> {
        let file = self.config_path.as_deref().and_then(|root| hosts_file(root, host));
        let Some(file) = file else {
            return Ok(vec![default_server(host)]);
        };
        let text = read_limited(&file, 1 << 20).map_err(io_err("registry hosts file", &file))?;
        parse_hosts_file(&text, &file, host)
    }
}

/// `<root>/<host>/hosts.toml`, else `<root>/_default/hosts.toml`, whichever
/// exists first. A host that could climb out of `root` reads nothing.
fn hosts_file(root: &Path, host: &str) -> Option<PathBuf> {
    let safe = !host.is_empty() && !host.contains('/') && host != "." && host != "..";
    let own = safe.then(|| root.join(host).join(HOSTS_FILE));
    own.into_iter()
        .chain(std::iter::once(root.join(DEFAULT_HOST_DIR).join(HOSTS_FILE)))
        .find(|path| path.is_file())
}

fn read_limited(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)?.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(std::io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(text)
}

/// The registry host itself when no file says otherwise.
fn default_server(host: &str) -> Endpoint {
    Endpoint {
        scheme: Scheme::Https,
        host: server_host(host),
        capabilities: Capabilities::ALL,
        ca: Vec::new(),
        client: Vec::new(),
        skip_verify: false,
        is_server: true,
        http_fallback: is_loopback_registry(host),
    }
}

/// Docker Hub's API host, as containerd and oci-client spell it.
fn server_host(host: &str) -> String {
    if host == "docker.io" {
        "registry-1.docker.io".to_string()
    } else {
        host.to_string()
    }
}

/// Whether `registry` ("host[:port]") names this host: 127.0.0.0/8, ::1 or
/// localhost, where nothing but this host can listen.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => registry.rsplit_once(':').map_or(registry, |(host, _)| host),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `hosts.toml` as written: the top level configures the server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFileText {
    server: Option<String>,
    capabilities: Option<Vec<String>>,
    ca: Option<PathList>,
    client: Option<toml::Value>,
    skip_verify: Option<bool>,
    header: Option<toml::Value>,
    override_path: Option<bool>,
    #[serde(default)]
    host: OrderedHosts,
}

/// One `[host."..."]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostText {
    capabilities: Option<Vec<String>>,
    ca: Option<PathList>,
    client: Option<toml::Value>,
    skip_verify: Option<bool>,
    header: Option<toml::Value>,
    override_path: Option<bool>,
}

/// `ca = "a.crt"` or `ca = ["a.crt", "b.crt"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PathList {
    One(String),
    Many(Vec<String>),
}

/// The `[host."..."]` tables in file order: mirrors are tried in it, and a
/// map type would sort them.
#[derive(Debug, Default)]
struct OrderedHosts(Vec<(String, HostText)>);

impl<'de> Deserialize<'de> for OrderedHosts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = OrderedHosts;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table of host URLs")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedHosts, A::Error> {
                let mut hosts = Vec::new();
                while let Some(entry) = map.next_entry::<String, HostText>()? {
                    hosts.push(entry);
                }
                Ok(OrderedHosts(hosts))
            }
        }
        deserializer.deserialize_map(InOrder)
    }
}

/// The settings shared by the server and each mirror, as written.
struct SettingsText<'a> {
    capabilities: &'a Option<Vec<String>>,
    ca: &'a Option<PathList>,
    client: &'a Option<toml::Value>,
    skip_verify: Option<bool>,
    header: &'a Option<toml::Value>,
    override_path: Option<bool>,
}

/// Parses `text`, the hosts file at `path` that configures registry `host`.
pub fn parse_hosts_file(text: &str, path: &Path, host: &str) -> Result<Vec<Endpoint>, HostsError> {
    let file: HostsFileText = toml::from_str(text).map_err(|err| HostsError::Parse {
        path: path.display().to_string(),
        message: err.to_string().trim_end().replace('\n', " "),
    })?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut endpoints = Vec::with_capacity(file.host.0.len() + 1);
    for (url, mirror) in &file.host.0 {
        let field = format!("host.{url:?}");
        let settings = SettingsText {
            capabilities: &mirror.capabilities,
            ca: &mirror.ca,
            client: &mirror.client,
            skip_verify: mirror.skip_verify,
            header: &mirror.header,
            override_path: mirror.override_path,
        };
        let mut endpoint = endpoint_from(url, &settings, dir, path, &field)?;
        endpoint.is_server = false;
        endpoints.push(endpoint);
    }
    let settings = SettingsText {
        capabilities: &file.capabilities,
        ca: &file.ca,
        client: &file.client,
        skip_verify: file.skip_verify,
        header: &file.header,
        override_path: file.override_path,
    };
    let mut server = match &file.server {
        Some(url) => endpoint_from(url, &settings, dir, path, "server")?,
        // No server: the host itself, with the top-level settings.
        None => {
            let default = default_server(host);
            let mut endpoint = with_settings(default.scheme, &default.host, &settings, dir, path, "server")?;
            endpoint.http_fallback = default.http_fallback;
            endpoint
        }
    };
    server.is_server = true;
    endpoints.push(server);
    Ok(endpoints)
}

/// One endpoint from its URL (a scheme-less one is HTTPS, as containerd
/// reads it) and its settings.
fn endpoint_from(
    url: &str,
    settings: &SettingsText<'_>,
    dir: &Path,
    path: &Path,
    field: &str,
) -> Result<Endpoint, HostsError> {
    let invalid = |name: &str, reason: String| HostsError::Invalid {
        path: path.display().to_string(),
        field: if name.is_empty() {
            field.to_string()
        } else {
            format!("{field}.{name}")
        },
        reason,
    };
    let (scheme, rest) = match url.split_once("://") {
        Some(("https", rest)) => (Scheme::Https, rest),
        Some(("http", rest)) => (Scheme::Http, rest),
        Some((other, _)) => return Err(invalid("", format!("scheme {other:?} is not http or https"))),
        None => (Scheme::Https, url),
    };
    let (host, url_path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, ""),
    };
    if host.is_empty() || host.contains(['@', '?', '#', ' ']) {
        return Err(invalid("", format!("{url:?} names no usable host")));
    }
    let trimmed = url_path.trim_end_matches('/');
    if !(trimmed.is_empty() || trimmed == "/v2") {
        return Err(invalid(
            "",
            format!("path {url_path:?} is not supported: only endpoints at /v2 are"),
        ));
    }
    if settings.override_path == Some(true) && trimmed != "/v2" {
        return Err(invalid(
            "override_path",
            "is not supported: only endpoints at /v2 are".to_string(),
        ));
    }
    with_settings(scheme, host, settings, dir, path, field)
}

/// The endpoint at `scheme://host` with `settings`.
fn with_settings(
    scheme: Scheme,
    host: &str,
    settings: &SettingsText<'_>,
    dir: &Path,
    path: &Path,
    field: &str,
) -> Result<Endpoint, HostsError> {
    let invalid = |name: &str, reason: String| HostsError::Invalid {
        path: path.display().to_string(),
        field: format!("{field}.{name}"),
        reason,
    };
    if settings.header.is_some() {
        return Err(invalid("header", "extra headers are not supported yet".to_string()));
    }
    let capabilities = match settings.capabilities {
        None => Capabilities::ALL,
        Some(names) => {
            let mut capabilities = Capabilities {
                pull: false,
                resolve: false,
                push: false,
            };
            for name in names {
                match name.as_str() {
                    "pull" => capabilities.pull = true,
                    "resolve" => capabilities.resolve = true,
                    "push" => capabilities.push = true,
                    other => {
                        return Err(invalid(
                            "capabilities",
                            format!("unknown capability {other:?} (pull, resolve or push)"),
                        ))
                    }
                }
            }
            capabilities
        }
    };
    let ca_paths: Vec<&String> = match settings.ca {
        None => Vec::new(),
        Some(PathList::One(one)) => vec![one],
        Some(PathList::Many(many)) => many.iter().collect(),
    };
    let mut ca = Vec::new();
    for ca_path in ca_paths {
        ca.extend(read_ca(&dir.join(ca_path), path, &format!("{field}.ca"))?);
    }
    let client = match settings.client {
        None => Vec::new(),
        Some(value) => client_pairs(value)
            .map_err(|reason| invalid("client", reason))?
            .into_iter()
            .map(|(certificate, key)| read_client(dir, &certificate, key.as_deref(), path, &format!("{field}.client")))
            .collect::<Result<_, _>>()?,
    };
    Ok(Endpoint {
        scheme,
        host: host.to_string(),
        capabilities,
        ca,
        client,
        skip_verify: settings.skip_verify.unwrap_or(false),
        is_server: false,
        http_fallback: false,
    })
}

/// The certificates of PEM file `ca`, each block on its own.
fn read_ca(ca: &Path, path: &Path, field: &str) -> Result<Vec<CaCertificate>, HostsError> {
    let error = |reason: String| HostsError::CaFile {
        path: path.display().to_string(),
        field: field.to_string(),
        ca: ca.display().to_string(),
        reason,
    };
    let text = read_limited(ca, MAX_CA_FILE_BYTES).map_err(|err| error(err.to_string()))?;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut certificates = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(BEGIN) {
        let Some(length) = rest[start..].find(END) else {
            return Err(error("a certificate block has no end".to_string()));
        };
        let end = start + length + END.len();
        let mut pem = rest.as_bytes()[start..end].to_vec();
        pem.push(b'\n');
        certificates.push(CaCertificate {
            path: ca.to_path_buf(),
            pem,
        });
        rest = &rest[end..];
    }
    if certificates.is_empty() {
        return Err(error("holds no PEM certificate".to_string()));
    }
    Ok(certificates)
}

/// The (certificate, key) file pairs of a `client` value, as containerd
/// reads it: `"both.pem"`, a list of such, or a list whose entries are
/// `["cert.pem", "key.pem"]` pairs (an empty key: the certificate file
/// holds both).
fn client_pairs(value: &toml::Value) -> Result<Vec<(String, Option<String>)>, String> {
    let one = |entry: &toml::Value| -> Result<(String, Option<String>), String> {
        match entry {
            toml::Value::String(both) => Ok((both.clone(), None)),
            toml::Value::Array(pair) => match pair.as_slice() {
                [toml::Value::String(cert), toml::Value::String(key)] => {
                    Ok((cert.clone(), (!key.is_empty()).then(|| key.clone())))
                }
                _ => Err(format!("{entry} is not a [certificate, key] pair of file names")),
            },
            other => Err(format!("{other} is not a file name or a [certificate, key] pair")),
        }
    };
    let pairs = match value {
        toml::Value::String(_) => vec![one(value)?],
        toml::Value::Array(entries) => entries.iter().map(one).collect::<Result<_, _>>()?,
        other => return Err(format!("{other} is not a file name or a list")),
    };
    if pairs.iter().any(|(cert, _)| cert.is_empty()) {
        return Err("a certificate file name is empty".to_string());
    }
    Ok(pairs)
}

/// The identity in `certificate` (and `key`, else the certificate file
/// holds the key too), relative to the host directory `dir`. A file that
/// holds a private key must be readable by its owner only.
fn read_client(
    dir: &Path,
    certificate: &str,
    key: Option<&str>,
    path: &Path,
    field: &str,
) -> Result<ClientIdentity, HostsError> {
    let certificate = dir.join(certificate);
    let key = key.map_or_else(|| certificate.clone(), |key| dir.join(key));
    let error = |file: &Path, reason: String| HostsError::ClientFile {
        path: path.display().to_string(),
        field: field.to_string(),
        file: file.display().to_string(),
        reason,
    };
    let cert_text =
        read_limited(&certificate, MAX_CLIENT_FILE_BYTES).map_err(|err| error(&certificate, err.to_string()))?;
    if !cert_text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(error(&certificate, "holds no PEM certificate".to_string()));
    }
    let key_text = if key == certificate {
        cert_text.clone()
    } else {
        read_limited(&key, MAX_CLIENT_FILE_BYTES).map_err(|err| error(&key, err.to_string()))?
    };
    if !key_text.contains("PRIVATE KEY-----") {
        return Err(error(&key, "holds no PEM private key".to_string()));
    }
    check_owner_only(&key).map_err(|reason| error(&key, reason))?;
    let mut pem = Vec::with_capacity(cert_text.len() + key_text.len() + 1);
    pem.extend_from_slice(cert_text.as_bytes());
    if key != certificate {
        pem.push(b'\n');
        pem.extend_from_slice(key_text.as_bytes());
    }
    // What TLS will do with it, checked now: a key that does not parse is
    // the file's fault, named here, not a handshake failure later.
    reqwest::Identity::from_pem(&pem).map_err(|err| error(&key, format!("not a usable certificate and key: {err}")))?;
    Ok(ClientIdentity { certificate, key, pem })
}

/// A private key file readable by group or others is refused, as every
/// secret file of ours is.
fn check_owner_only(file: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(file).map_err(|err| err.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".to_string());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "holds a private key and may be read by other users (mode {mode:04o}); make it 0600"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn parse(text: &str, host: &str) -> Result<Vec<Endpoint>, HostsError> {
        parse_hosts_file(text, Path::new("/etc/certs.d/h/hosts.toml"), host)
    }

    #[test]
    fn no_file_means_the_host_itself_over_https() {
        let hosts = RegistryHosts::at("/nonexistent/certs.d");
        let endpoints = hosts.endpoints("registry.example:5000").unwrap();
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].scheme, Scheme::Https);
        assert_eq!(endpoints[0].host, "registry.example:5000");
        assert!(endpoints[0].is_server && !endpoints[0].http_fallback);
        assert_eq!(
            RegistryHosts::none().endpoints("docker.io").unwrap()[0].host,
            "registry-1.docker.io"
        );
        for loopback in ["127.0.0.1:5000", "localhost:5000", "[::1]:5000", "127.1.2.3"] {
            assert!(
                RegistryHosts::none().endpoints(loopback).unwrap()[0].http_fallback,
                "{loopback}"
            );
        }
    }

    #[test]
    fn mirrors_come_first_in_file_order_then_the_server() {
        let text = r#"
server = "https://registry.example"
[host."https://zmirror.example"]
  capabilities = ["pull", "resolve"]
[host."http://amirror.example:5000"]
  capabilities = ["pull"]
  skip_verify = true
[host."mirror3.example/v2"]
"#;
        let endpoints = parse(text, "registry.example").unwrap();
        let hosts: Vec<_> = endpoints.iter().map(|e| (e.scheme, e.host.as_str())).collect();
        assert_eq!(
            hosts,
            [
                (Scheme::Https, "zmirror.example"),
                (Scheme::Http, "amirror.example:5000"),
                (Scheme::Https, "mirror3.example"),
                (Scheme::Https, "registry.example"),
            ]
        );
        assert!(!endpoints[0].capabilities.push && endpoints[0].capabilities.resolve);
        assert!(endpoints[1].skip_verify && !endpoints[1].capabilities.resolve);
        assert_eq!(endpoints[2].capabilities, Capabilities::ALL, "all by default");
        assert!(endpoints[3].is_server && endpoints[3].capabilities == Capabilities::ALL);
        assert!(!endpoints[0].is_server);
    }

    #[test]
    fn a_file_without_server_keeps_the_host_with_its_settings() {
        let endpoints = parse("skip_verify = true\n", "localhost:5000").unwrap();
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].host, "localhost:5000");
        assert!(endpoints[0].skip_verify && endpoints[0].http_fallback);
    }

    #[test]
    fn ca_files_are_read_relative_to_the_host_directory() {
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join("registry.example:5000");
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(host_dir.join("ca.crt"), format!("{PEM}{PEM}")).unwrap();
        std::fs::write(dir.path().join("other.pem"), PEM).unwrap();
        let other = dir.path().join("other.pem");
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"https://registry.example:5000\"\nca = [\"ca.crt\", {:?}]\n",
                other
            ),
        )
        .unwrap();
        let hosts = RegistryHosts::at(dir.path());
        let endpoints = hosts.endpoints("registry.example:5000").unwrap();
        assert_eq!(endpoints[0].ca.len(), 3);
        assert_eq!(endpoints[0].ca[0].path, host_dir.join("ca.crt"));
        assert!(!format!("{:?}", endpoints[0].ca[0]).contains("MIIB"));

        // Another host falls to _default, which is absent here.
        assert!(hosts.endpoints("other.example").unwrap()[0].ca.is_empty());
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(dir.path().join("_default/hosts.toml"), "skip_verify = true\n").unwrap();
        let endpoints = hosts.endpoints("other.example").unwrap();
        assert_eq!(endpoints[0].host, "other.example");
        assert!(endpoints[0].skip_verify);
        // A host that names a path reads only _default.
        assert_eq!(hosts.endpoints("../etc").unwrap()[0].host, "../etc");
    }

    #[test]
    fn bad_files_name_the_file_and_the_field() {
        for (text, needle) in [
            ("server = 5\n", "server"),
            ("capabilities = [\"pull\", \"delete\"]\n", "capabilities"),
            (
                "[host.\"https://m\"]\ncapabilities = [\"fly\"]\n",
                "host.\"https://m\".capabilities",
            ),
            (
                "[host.\"https://m\"]\nclient = \"/nonexistent/c.pem\"\n",
                "/nonexistent/c.pem",
            ),
            ("client = [\"/nonexistent/c.pem\", \"k.pem\"]\n", "server.client"),
            ("client = [[\"c.pem\"]]\n", "[certificate, key] pair"),
            ("client = 5\n", "server.client"),
            ("[host.\"ftp://m\"]\n", "scheme \"ftp\""),
            ("[host.\"https://m/other/path\"]\n", "path \"/other/path\""),
            ("[host.\"https://m\"]\nheader = { a = \"b\" }\n", "header"),
            ("unknown = 1\n", "unknown field"),
            (
                "[host.\"https://m\"]\nca = \"/nonexistent/ca.crt\"\n",
                "/nonexistent/ca.crt",
            ),
            ("server = \"https://\"\n", "no usable host"),
        ] {
            let err = parse(text, "h").expect_err(text).to_string();
            assert!(err.contains("/etc/certs.d/h/hosts.toml"), "{text}: {err}");
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn client_certificates_in_every_containerd_form() {
        let dir = tempfile::tempdir().unwrap();
        testing::client_files(dir.path());
        let path = dir.path().join("hosts.toml");
        for (text, pairs) in [
            ("client = \"both.pem\"\n", vec![("both.pem", "both.pem")]),
            (
                "client = [\"both.pem\", \"both.pem\"]\n",
                vec![("both.pem", "both.pem"); 2],
            ),
            ("client = [[\"c.crt\", \"c.key\"]]\n", vec![("c.crt", "c.key")]),
            (
                "client = [[\"c.crt\", \"c.key\"], [\"both.pem\", \"\"]]\n",
                vec![("c.crt", "c.key"), ("both.pem", "both.pem")],
            ),
        ] {
            let endpoints = parse_hosts_file(text, &path, "h").unwrap_or_else(|err| panic!("{text}: {err}"));
            let client = &endpoints[0].client;
            let read: Vec<_> = client
                .iter()
                .map(|identity| (identity.certificate.clone(), identity.key.clone()))
                .collect();
            let expected: Vec<_> = pairs
                .iter()
                .map(|(cert, key)| (dir.path().join(cert), dir.path().join(key)))
                .collect();
            assert_eq!(read, expected, "{text}");
            let pem = String::from_utf8(client[0].pem.clone()).unwrap();
            assert!(
                pem.contains("BEGIN CERTIFICATE") && pem.contains("PRIVATE KEY"),
                "{text}"
            );
            assert!(
                !format!("{:?}", client[0]).contains("PRIVATE"),
                "no key in Debug output"
            );
        }
    }

    #[test]
    fn client_files_missing_unusable_or_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        testing::client_files(dir.path());
        std::fs::write(
            dir.path().join("nokey.pem"),
            std::fs::read(dir.path().join("c.crt")).unwrap(),
        )
        .unwrap();
        std::fs::set_permissions(dir.path().join("nokey.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("hosts.toml");
        let check = |text: &str, needles: &[&str]| {
            let err = parse_hosts_file(text, &path, "h").expect_err(text).to_string();
            for needle in needles {
                assert!(err.contains(needle), "{text}: {err}");
            }
        };
        check("client = \"missing.pem\"\n", &["server.client", "missing.pem"]);
        check(
            "client = [[\"c.crt\", \"missing.key\"]]\n",
            &["server.client", "missing.key"],
        );
        check("client = \"nokey.pem\"\n", &["nokey.pem", "no PEM private key"]);
        check("client = [[\"c.key\", \"c.key\"]]\n", &["c.key", "no PEM certificate"]);
        std::fs::set_permissions(dir.path().join("c.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
        check(
            "[host.\"https://m\"]\nclient = [[\"c.crt\", \"c.key\"]]\n",
            &["host.\"https://m\".client", "c.key", "other users", "0640"],
        );
    }

    #[test]
    fn a_file_without_certificates_is_no_ca() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), "not a certificate").unwrap();
        std::fs::write(dir.path().join("hosts.toml"), "ca = \"ca.crt\"\n").unwrap();
        let err = parse_hosts_file("ca = \"ca.crt\"\n", &dir.path().join("hosts.toml"), "h").unwrap_err();
        assert!(err.to_string().contains("holds no PEM certificate"), "{err}");
    }

    #[test]
    fn capabilities_cover_what_an_operation_needs() {
        let pull_only = Capabilities {
            pull: true,
            resolve: false,
            push: false,
        };
        assert!(pull_only.covers(Capabilities {
            pull: true,
            resolve: false,
            push: false
        }));
        assert!(!pull_only.covers(Capabilities {
            pull: true,
            resolve: true,
            push: false
        }));
        assert!(Capabilities::ALL.covers(pull_only));
    }
}

/// Test support other modules' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::Path;

    /// A self-signed certificate and its key, made by openssl, in `dir`:
    /// `c.crt`, `c.key` (0600) and `both.pem` (0600).
    pub(crate) fn client_files(dir: &Path) {
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .args(["-days", "1", "-subj", "/CN=client", "-keyout", "c.key", "-out", "c.crt"])
            .current_dir(dir)
            .output()
            .expect("run openssl (the tests need it)");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let both = [
            std::fs::read(dir.join("c.crt")).unwrap(),
            std::fs::read(dir.join("c.key")).unwrap(),
        ]
        .concat();
        std::fs::write(dir.join("both.pem"), both).unwrap();
        for name in ["c.key", "both.pem"] {
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}
