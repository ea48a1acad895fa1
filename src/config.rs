//! Daemon configuration: a versioned TOML file whose every key is optional.
//! Owns parsing and validation only; it never touches the filesystem beyond
//! reading the file it is given.

use std::path::Path;

use serde::Deserialize;

/// The only configuration version this daemon reads.
pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Configuration format version; must be 1.
    #[serde(default = "default_version")]
    pub version: u32,
    /// Where writable layers live.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Snapshotter behaviour visible to containerd.
    #[serde(default)]
    pub snapshotter: SnapshotterConfig,
    /// Seamless commit.
    #[serde(default)]
    pub commit: CommitConfig,
    /// The REST API of seamless commit.
    #[serde(default)]
    pub rest: RestConfig,
    /// The Control API over TCP with TLS, for checkpointctl on other hosts.
    #[serde(default)]
    pub remote: RemoteConfig,
    /// Running Nydus images.
    #[serde(default)]
    pub nydus: NydusConfig,
    /// Process-state checkpoints: which runc and criu dump and restore.
    #[serde(default)]
    pub criu: CriuConfig,
    /// Which checkpoint records restore trusts (see `checkpoint::trust`).
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// How registries are reached: host configuration and credentials.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Docker's engine, for checkpoints of its containers
    /// (`checkpointctl --engine docker`).
    #[serde(default)]
    pub docker: DockerConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// The engine's API socket (an absolute path).
    #[serde(default = "default_docker_address")]
    pub address: String,
}

fn default_docker_address() -> String {
    "/var/run/docker.sock".into()
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            address: default_docker_address(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Directory of containerd-style host configuration:
    /// `<config_path>/<host[:port]>/hosts.toml` (or `_default/hosts.toml`)
    /// names a registry host's mirrors, which of them may pull, resolve or
    /// push, the CAs to trust and the plain-HTTP hosts. Empty reads none.
    #[serde(default = "default_registry_config_path")]
    pub config_path: String,
    /// Docker's `config.json`, where registry credentials are looked up
    /// (`auths`, `credHelpers`, `credsStore`).
    #[serde(default = "default_docker_config")]
    pub docker_config: String,
}

/// containerd's default `config_path`, where `hosts.toml` files live.
pub const DEFAULT_REGISTRY_CONFIG_PATH: &str = "/etc/containerd/certs.d";

fn default_registry_config_path() -> String {
    DEFAULT_REGISTRY_CONFIG_PATH.to_string()
}

/// `$DOCKER_CONFIG/config.json`, else root's, as docker finds it.
fn default_docker_config() -> String {
    match std::env::var("DOCKER_CONFIG") {
        Ok(dir) if !dir.is_empty() => format!("{}/config.json", dir.trim_end_matches('/')),
        _ => "/root/.docker/config.json".to_string(),
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            config_path: default_registry_config_path(),
            docker_config: default_docker_config(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Record keys of other nodes whose checkpoints restore as they were
    /// recorded: copies of their `<root>/record.key` (32 bytes), each an
    /// absolute path to a file of mode 0600. Holding a node's key is being
    /// able to seal records that node trusts: list only nodes trusted as
    /// much as this one.
    #[serde(default)]
    pub trusted_record_keys: Vec<String>,
    /// Mounts a record that no trusted key sealed may carry; any other mount
    /// refuses its restore. Default: the pseudo-filesystems of containerd's
    /// default spec, no host path.
    #[serde(default = "default_untrusted_mounts")]
    pub untrusted_mounts: Vec<AllowedMount>,
    /// The largest checkpoint archive another node may stream in
    /// (ReceiveCheckpoint), as a size such as "64GiB". A stream is also cut
    /// once it would leave the daemon root's filesystem less than half its
    /// free space at the start (the import copies it once more).
    #[serde(default = "default_max_received_archive")]
    pub max_received_archive: String,
}

fn default_max_received_archive() -> String {
    "64GiB".into()
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            trusted_record_keys: Vec::new(),
            untrusted_mounts: default_untrusted_mounts(),
            max_received_archive: default_max_received_archive(),
        }
    }
}

/// A mount an untrusted checkpoint record may carry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowedMount {
    /// Where in the container, exactly.
    pub destination: String,
    /// The filesystem type ("proc", "tmpfs", ...), or "bind" for a bind
    /// mount (a mount whose options hold bind or rbind is one).
    #[serde(rename = "type")]
    pub kind: String,
    /// The source: exactly this, or for a bind mount, a host directory
    /// ending in '/' under which the source must lie.
    pub source: String,
}

impl AllowedMount {
    fn pseudo(destination: &str, kind: &str, source: &str) -> AllowedMount {
        AllowedMount {
            destination: destination.into(),
            kind: kind.into(),
            source: source.into(),
        }
    }

    /// Whether a mount of `source` is this entry's.
    pub fn permits_source(&self, source: &str) -> bool {
        if source == self.source {
            return true;
        }
        self.kind == "bind"
            && self.source.ends_with('/')
            && source.starts_with(&self.source)
            && !source.split('/').any(|p| p == ".." || p == ".")
    }
}

fn default_untrusted_mounts() -> Vec<AllowedMount> {
    vec![
        AllowedMount::pseudo("/proc", "proc", "proc"),
        AllowedMount::pseudo("/dev", "tmpfs", "tmpfs"),
        AllowedMount::pseudo("/dev/pts", "devpts", "devpts"),
        AllowedMount::pseudo("/dev/shm", "tmpfs", "shm"),
        AllowedMount::pseudo("/dev/mqueue", "mqueue", "mqueue"),
        AllowedMount::pseudo("/sys", "sysfs", "sysfs"),
        AllowedMount::pseudo("/sys/fs/cgroup", "cgroup", "cgroup"),
        AllowedMount::pseudo("/sys/fs/cgroup", "cgroup2", "cgroup"),
        AllowedMount::pseudo("/run", "tmpfs", "tmpfs"),
    ]
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CriuConfig {
    /// The runc containerd's shims run (a path, or a name looked up on PATH).
    #[serde(default = "default_runc")]
    pub runc: String,
    /// runc's state root of containerd's shims (`<runc_root>/<namespace>`).
    #[serde(default = "default_runc_root")]
    pub runc_root: String,
    /// criu binary for runc; empty: runc finds `criu` on PATH.
    #[serde(default)]
    pub criu_path: String,
    /// criu binaries a caller may name per request (`checkpointctl
    /// --criu-path`, its config's `criu_path`): absolute paths, each a
    /// regular executable file owned by root that neither group nor others
    /// may write, in directories likewise. Empty (the default): callers
    /// cannot choose the binary the daemon runs as root.
    #[serde(default)]
    pub allowed_paths: Vec<String>,
    /// A dump (runc checkpoint and the CRIU it runs) still running after
    /// this many seconds is killed, and the container thawed; 1 to 86400.
    #[serde(default = "default_dump_timeout_seconds")]
    pub dump_timeout_seconds: u64,
}

fn default_dump_timeout_seconds() -> u64 {
    1800
}

fn default_runc() -> String {
    "runc".into()
}

fn default_runc_root() -> String {
    "/run/containerd/runc".into()
}

impl Default for CriuConfig {
    fn default() -> Self {
        CriuConfig {
            runc: default_runc(),
            runc_root: default_runc_root(),
            criu_path: String::new(),
            allowed_paths: Vec::new(),
            dump_timeout_seconds: default_dump_timeout_seconds(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NydusConfig {
    /// Registries (`host` or `host:port`) whose Nydus blobs are fetched over
    /// plain HTTP or TLS without verification. Loopback registries always
    /// are, as docker treats them.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Room for OCI base layers converted to Nydus by commits, kept under
    /// `<root>/nydus-base` so later commits on the same base convert
    /// nothing; past it the least recently used go.
    #[serde(default = "default_base_cache_size")]
    pub base_cache_size: String,
    /// How the filesystem of a Nydus image is served: "auto" mounts RAFS v6
    /// images whose blobs are stored uncompressed with the kernel's erofs
    /// (blobs fetched whole on first use) and serves the others (compressed
    /// blobs, RAFS v5) over FUSE, reading chunks lazily from
    /// the registry; "erofs" fetches every blob when its layer is pulled and
    /// mounts with erofs (RAFS v5 is refused); "fuse" serves every image over
    /// FUSE. FUSE mounts are served by processes of their own that outlive
    /// the daemon.
    #[serde(default)]
    pub fs_driver: FsDriver,
    /// Bound on what `<root>/nydus` keeps of Nydus blobs (whole blobs, erofs
    /// cache files, FUSE chunk caches): a size ("20GiB") or a share of the
    /// filesystem holding it ("20%"). Past it, the blobs of images no
    /// container uses go, least recently used first; an image that needs
    /// them again fetches them from its registry.
    #[serde(default = "default_cache_max_size")]
    pub cache_max_size: String,
}

fn default_cache_max_size() -> String {
    "20%".into()
}

/// [`NydusConfig::cache_max_size`], parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBound {
    Bytes(u64),
    /// Percent of the filesystem's size, 1 to 100.
    Percent(u8),
}

impl CacheBound {
    /// The bound in bytes on a filesystem of `filesystem_bytes`.
    pub fn bytes(self, filesystem_bytes: u64) -> u64 {
        match self {
            CacheBound::Bytes(bytes) => bytes,
            CacheBound::Percent(percent) => (filesystem_bytes as u128 * percent as u128 / 100) as u64,
        }
    }
}

/// How Nydus images are served; see [`NydusConfig::fs_driver`].
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsDriver {
    #[default]
    Auto,
    Erofs,
    Fuse,
}

fn default_base_cache_size() -> String {
    "10GiB".into()
}

impl Default for NydusConfig {
    fn default() -> Self {
        NydusConfig {
            insecure_registries: Vec::new(),
            base_cache_size: default_base_cache_size(),
            cache_max_size: default_cache_max_size(),
            fs_driver: FsDriver::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RestConfig {
    /// Unix socket of the REST API (created 0660); empty means `rest.sock`
    /// in the directory of `--address`.
    #[serde(default)]
    pub socket: String,
    /// Also serve on this TCP address, which must be on loopback (for
    /// example "127.0.0.1:8089"); empty means no TCP. Needs `token_file`.
    #[serde(default)]
    pub tcp_address: String,
    /// File holding the bearer token that every TCP request must carry;
    /// must be mode 0600.
    #[serde(default)]
    pub token_file: String,
    /// Limits on the connections of both REST listeners.
    #[serde(default)]
    pub connections: ConnectionLimits,
    /// The containerd namespace of requests that name none (the reference's
    /// requests never do); empty means `default`.
    #[serde(default)]
    pub namespace: String,
}

impl RestConfig {
    /// The namespace of requests that name none.
    pub fn namespace(&self) -> &str {
        match self.namespace.as_str() {
            "" => "default",
            named => named,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// TCP address ("0.0.0.0:7443") on which the Control API is also served
    /// to checkpointctl on other hosts (`restore --target-node`); empty
    /// means none. Needs `tls_cert`, `tls_key` and `token_file`.
    #[serde(default)]
    pub address: String,
    /// PEM certificate chain the daemon presents, leaf first.
    #[serde(default)]
    pub tls_cert: String,
    /// PEM private key of `tls_cert`; must be mode 0600.
    #[serde(default)]
    pub tls_key: String,
    /// File holding the bearer token every call must carry (its first
    /// line); must be mode 0600. Never logged.
    #[serde(default)]
    pub token_file: String,
    /// Limits on the TCP connections.
    #[serde(default)]
    pub connections: ConnectionLimits,
}

/// What one client may hold of a listener (`[rest.connections]`,
/// `[remote.connections]`): what keeps a silent, slow or guessing client
/// from starving the others.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Connections served at once; further clients wait in the kernel's
    /// backlog until one ends.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// TLS handshakes in progress at once (`[remote]` only).
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: u32,
    /// Seconds a new connection has to finish its TLS handshake and its
    /// first request's headers (REST) or HTTP/2 preface (remote).
    #[serde(default = "default_header_timeout_secs")]
    pub header_timeout_secs: u64,
    /// Seconds a connection may stay without a byte from its client
    /// (remote: HTTP/2 pings are sent at half this, which live clients answer).
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Wrong bearer tokens from one address before its calls are refused
    /// without being checked, for `token_lockout_secs`.
    #[serde(default = "default_token_failures")]
    pub token_failures: u32,
    #[serde(default = "default_token_lockout_secs")]
    pub token_lockout_secs: u64,
}

fn default_max_connections() -> u32 {
    256
}
fn default_max_handshakes() -> u32 {
    32
}
fn default_header_timeout_secs() -> u64 {
    10
}
fn default_idle_timeout_secs() -> u64 {
    300
}
fn default_token_failures() -> u32 {
    5
}
fn default_token_lockout_secs() -> u64 {
    60
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: default_max_connections(),
            max_handshakes: default_max_handshakes(),
            header_timeout_secs: default_header_timeout_secs(),
            idle_timeout_secs: default_idle_timeout_secs(),
            token_failures: default_token_failures(),
            token_lockout_secs: default_token_lockout_secs(),
        }
    }
}

impl ConnectionLimits {
    /// Every limit must be at least 1: a zero would refuse every client.
    fn validate(&self, table: &'static str) -> Result<(), ConfigError> {
        for (field, value) in [
            ("max_connections", u64::from(self.max_connections)),
            ("max_handshakes", u64::from(self.max_handshakes)),
            ("header_timeout_secs", self.header_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("token_failures", u64::from(self.token_failures)),
            ("token_lockout_secs", self.token_lockout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key: table,
                    reason: format!("{field} must be at least 1"),
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommitConfig {
    /// Background commit jobs (layer build and push) run at once; more wait
    /// as pending. The capture itself is never queued.
    #[serde(default = "default_background_workers")]
    pub background_workers: u32,
    /// Commits of one container accepted while earlier ones are still
    /// building or pushing: each is captured at once and builds on the one
    /// before it, in order. One more is refused with SNAPSHOT_IN_PROGRESS.
    #[serde(default = "default_max_queued")]
    pub max_queued: u32,
}

fn default_max_queued() -> u32 {
    32
}

fn default_background_workers() -> u32 {
    4
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            background_workers: default_background_workers(),
            max_queued: default_max_queued(),
        }
    }
}

/// Which storage holds snapshot directories.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// Native btrfs when the root is on btrfs, otherwise the loop-mounted pool.
    Auto,
    /// Require the root to be on btrfs.
    Btrfs,
    /// Always use a btrfs pool file under the root, loop-mounted.
    Pool,
    /// Plain directories; seamless commit then copies while frozen.
    Directory,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// auto, btrfs, pool or directory.
    #[serde(default = "default_backend")]
    pub backend: BackendChoice,
    /// Size of the pool image: "auto" (half of the free space where the root
    /// lives, at least 1 GiB) or a size such as "20GiB".
    #[serde(default = "default_pool_size")]
    pub pool_size: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// Report each snapshot's upper directory in the label
    /// `containerd.io/snapshot/overlay.upperdir`.
    #[serde(default)]
    pub upperdir_label: bool,
    /// Namespaces that share committed layers: an unpack in one of them
    /// adopts a layer another of them holds, by its chain id, instead of
    /// unpacking it again. A chain id proves no access to a layer's content
    /// (an image config merely claims its diff ids), so list only
    /// namespaces that trust one another; `"*"` shares among all. Empty (the
    /// default): each namespace adopts only its own layers, as containerd's
    /// own snapshotters do.
    #[serde(default)]
    pub shared_namespaces: Vec<String>,
}

fn default_version() -> u32 {
    CONFIG_VERSION
}

fn default_backend() -> BackendChoice {
    BackendChoice::Auto
}

fn default_pool_size() -> String {
    "auto".to_string()
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: default_backend(),
            pool_size: default_pool_size(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: default_version(),
            storage: StorageConfig::default(),
            snapshotter: SnapshotterConfig::default(),
            commit: CommitConfig::default(),
            rest: RestConfig::default(),
            remote: RemoteConfig::default(),
            nydus: NydusConfig::default(),
            criu: CriuConfig::default(),
            checkpoint: CheckpointConfig::default(),
            registry: RegistryConfig::default(),
            docker: DockerConfig::default(),
        }
    }
}

/// The pool size, resolved from its text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    Auto,
    Bytes(u64),
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Returns the first reason this configuration cannot be used.
    /// `[remote]`: an address, and with it absolute paths of all three files.
    fn validate_remote(&self) -> Result<(), ConfigError> {
        let remote = &self.remote;
        if remote.address.is_empty() {
            for (key, value) in [
                ("remote.tls_cert", &remote.tls_cert),
                ("remote.tls_key", &remote.tls_key),
                ("remote.token_file", &remote.token_file),
            ] {
                if !value.is_empty() {
                    return Err(ConfigError::Invalid {
                        key,
                        reason: "set without remote.address, which turns the TCP API on".into(),
                    });
                }
            }
            return Ok(());
        }
        remote
            .address
            .parse::<std::net::SocketAddr>()
            .map_err(|_| ConfigError::Invalid {
                key: "remote.address",
                reason: format!("{:?} is not an address such as 0.0.0.0:7443", remote.address),
            })?;
        for (key, value) in [
            ("remote.tls_cert", &remote.tls_cert),
            ("remote.tls_key", &remote.tls_key),
            ("remote.token_file", &remote.token_file),
        ] {
            if value.is_empty() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "required when remote.address is set: the TCP API always uses TLS and a token".into(),
                });
            }
            if !value.starts_with('/') || value.split('/').any(|p| p == "..") {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{value:?} must be an absolute path without '..'"),
                });
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(ConfigError::Invalid {
                key: "version",
                reason: format!("version {} is not supported, expected {CONFIG_VERSION}", self.version),
            });
        }
        self.pool_size()?;
        if !self.docker.address.starts_with('/') || self.docker.address.split('/').any(|p| p == "..") {
            return Err(ConfigError::Invalid {
                key: "docker.address",
                reason: format!("{:?} is not an absolute path", self.docker.address),
            });
        }
        for (key, value) in [
            ("registry.config_path", &self.registry.config_path),
            ("registry.docker_config", &self.registry.docker_config),
        ] {
            if !value.is_empty() && !value.starts_with('/') {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{value:?} is not an absolute path"),
                });
            }
        }
        for (key, value, empty_ok) in [
            ("criu.runc", &self.criu.runc, false),
            ("criu.runc_root", &self.criu.runc_root, false),
            ("criu.criu_path", &self.criu.criu_path, true),
        ] {
            let ok = if value.is_empty() {
                empty_ok
            } else {
                key == "criu.runc" && !value.contains('/')
                    || value.starts_with('/') && !value.split('/').any(|p| p == "..")
            };
            if !ok {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{value:?} must be an absolute path without '..'"),
                });
            }
        }
        if let Some(bad) = self
            .criu
            .allowed_paths
            .iter()
            .find(|p| !p.starts_with('/') || p.split('/').any(|c| c == ".."))
        {
            return Err(ConfigError::Invalid {
                key: "criu.allowed_paths",
                reason: format!("{bad:?} must be an absolute path without '..'"),
            });
        }
        if !(1..=86_400).contains(&self.criu.dump_timeout_seconds) {
            return Err(ConfigError::Invalid {
                key: "criu.dump_timeout_seconds",
                reason: format!("{} is not between 1 and 86400", self.criu.dump_timeout_seconds),
            });
        }
        if !self.rest.tcp_address.is_empty() {
            let addr: std::net::SocketAddr = self.rest.tcp_address.parse().map_err(|_| ConfigError::Invalid {
                key: "rest.tcp_address",
                reason: format!("{:?} is not an address such as 127.0.0.1:8089", self.rest.tcp_address),
            })?;
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid {
                    key: "rest.tcp_address",
                    reason: format!("{addr} is not a loopback address; the REST API never listens beyond this host"),
                });
            }
            if self.rest.token_file.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "rest.token_file",
                    reason: "a token file is required when rest.tcp_address is set".into(),
                });
            }
        }
        self.rest.connections.validate("rest.connections")?;
        crate::namespace::validate_namespace(self.rest.namespace()).map_err(|e| ConfigError::Invalid {
            key: "rest.namespace",
            reason: e.to_string(),
        })?;
        self.remote.connections.validate("remote.connections")?;
        self.validate_remote()?;
        for namespace in &self.snapshotter.shared_namespaces {
            if namespace != "*" {
                crate::namespace::validate_namespace(namespace).map_err(|e| ConfigError::Invalid {
                    key: "snapshotter.shared_namespaces",
                    reason: e.to_string(),
                })?;
            }
        }
        self.validate_checkpoint()?;
        for registry in &self.nydus.insecure_registries {
            let valid = !registry.is_empty()
                && !registry.contains("://")
                && !registry.contains('/')
                && registry
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
            if !valid {
                return Err(ConfigError::Invalid {
                    key: "nydus.insecure_registries",
                    reason: format!("{registry:?} is not a registry host such as registry.local:5000"),
                });
            }
        }
        self.nydus_base_cache_bytes()?;
        self.nydus_cache_bound()?;
        self.max_received_archive_bytes()?;
        if !(1..=64).contains(&self.commit.background_workers) {
            return Err(ConfigError::Invalid {
                key: "commit.background_workers",
                reason: format!("{} is not between 1 and 64", self.commit.background_workers),
            });
        }
        if !(1..=1024).contains(&self.commit.max_queued) {
            return Err(ConfigError::Invalid {
                key: "commit.max_queued",
                reason: format!("{} is not between 1 and 1024", self.commit.max_queued),
            });
        }
        Ok(())
    }

    /// `[checkpoint]`: absolute key paths; mounts at absolute destinations,
    /// bind sources absolute, pseudo-filesystem sources not host paths.
    fn validate_checkpoint(&self) -> Result<(), ConfigError> {
        let plain_absolute = |p: &str| p.starts_with('/') && !p.split('/').any(|c| c == ".." || c == ".");
        for key in &self.checkpoint.trusted_record_keys {
            if !plain_absolute(key) {
                return Err(ConfigError::Invalid {
                    key: "checkpoint.trusted_record_keys",
                    reason: format!("{key:?} must be an absolute path without '..'"),
                });
            }
        }
        for mount in &self.checkpoint.untrusted_mounts {
            let source_ok = if mount.kind == "bind" {
                plain_absolute(&mount.source)
            } else {
                !mount.source.is_empty() && !mount.source.starts_with('/')
            };
            if !plain_absolute(&mount.destination) || mount.kind.is_empty() || !source_ok {
                return Err(ConfigError::Invalid {
                    key: "checkpoint.untrusted_mounts",
                    reason: format!(
                        "{mount:?}: the destination must be an absolute path, a bind's source a host path and any \
                         other type's source a name such as \"proc\""
                    ),
                });
            }
        }
        Ok(())
    }

    /// `checkpoint.max_received_archive` in bytes.
    pub fn max_received_archive_bytes(&self) -> Result<u64, ConfigError> {
        parse_size(&self.checkpoint.max_received_archive).map_err(|reason| ConfigError::Invalid {
            key: "checkpoint.max_received_archive",
            reason,
        })
    }

    /// `nydus.base_cache_size` in bytes.
    pub fn nydus_base_cache_bytes(&self) -> Result<u64, ConfigError> {
        parse_size(&self.nydus.base_cache_size).map_err(|reason| ConfigError::Invalid {
            key: "nydus.base_cache_size",
            reason,
        })
    }

    /// `nydus.cache_max_size`, parsed.
    pub fn nydus_cache_bound(&self) -> Result<CacheBound, ConfigError> {
        let text = self.nydus.cache_max_size.trim();
        let invalid = |reason: String| ConfigError::Invalid {
            key: "nydus.cache_max_size",
            reason,
        };
        match text.strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(CacheBound::Percent(p)),
                _ => Err(invalid(format!("{text:?}: a share of the filesystem is 1% to 100%"))),
            },
            None => parse_size(text).map(CacheBound::Bytes).map_err(invalid),
        }
    }

    pub fn pool_size(&self) -> Result<PoolSize, ConfigError> {
        if self.storage.pool_size == "auto" {
            return Ok(PoolSize::Auto);
        }
        let bytes = parse_size(&self.storage.pool_size).map_err(|reason| ConfigError::Invalid {
            key: "storage.pool_size",
            reason,
        })?;
        if bytes < MIN_POOL_BYTES {
            return Err(ConfigError::Invalid {
                key: "storage.pool_size",
                reason: format!("{bytes} bytes is below the minimum of 256MiB"),
            });
        }
        Ok(PoolSize::Bytes(bytes))
    }
}

/// mkfs.btrfs refuses much smaller devices, and a tiny pool fills at once.
pub const MIN_POOL_BYTES: u64 = 256 << 20;

/// Sizes such as 512MiB or 10GB (powers of 1024), as every size setting and
/// flag reads them.
pub use crate::units::parse_size;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_trust_keys_and_mounts_are_checked() {
        let config = Config::parse(
            "[checkpoint]\ntrusted_record_keys = [\"/etc/seamless/node-b.key\"]\n\
             untrusted_mounts = [{ destination = \"/data\", type = \"bind\", source = \"/srv/data/\" }]\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.checkpoint.trusted_record_keys, ["/etc/seamless/node-b.key"]);
        assert_eq!(config.checkpoint.untrusted_mounts.len(), 1);
        let err = Config::parse("[checkpoint]\ntrusted_record_keys = [\"node-b.key\"]\n", "t").unwrap_err();
        assert!(err.to_string().contains("checkpoint.trusted_record_keys"), "{err}");
        for bad in [
            "{ destination = \"/data\", type = \"bind\", source = \"srv\" }",
            "{ destination = \"/proc\", type = \"proc\", source = \"/proc\" }",
            "{ destination = \"data\", type = \"tmpfs\", source = \"tmpfs\" }",
        ] {
            let err = Config::parse(&format!("[checkpoint]\nuntrusted_mounts = [{bad}]\n"), "t").unwrap_err();
            assert!(err.to_string().contains("checkpoint.untrusted_mounts"), "{err}");
        }
    }

    #[test]
    fn criu_allowed_paths_are_absolute() {
        let config = Config::parse("[criu]\nallowed_paths = [\"/opt/criu/sbin/criu\"]\n", "t").unwrap();
        assert_eq!(config.criu.allowed_paths, ["/opt/criu/sbin/criu"]);
        assert!(Config::default().criu.allowed_paths.is_empty());
        for bad in ["criu", "/opt/../tmp/criu"] {
            let err = Config::parse(&format!("[criu]\nallowed_paths = [\"{bad}\"]\n"), "t").unwrap_err();
            assert!(err.to_string().contains("criu.allowed_paths"), "{err}");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::parse("", "test").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.storage.backend, BackendChoice::Auto);
        assert_eq!(config.pool_size().unwrap(), PoolSize::Auto);
    }

    #[test]
    fn full_file_parses() {
        let config = Config::parse(
            "version = 1\n[storage]\nbackend = \"pool\"\npool_size = \"2GiB\"\n[snapshotter]\nupperdir_label = true\n",
            "test",
        )
        .unwrap();
        assert_eq!(config.storage.backend, BackendChoice::Pool);
        assert_eq!(config.pool_size().unwrap(), PoolSize::Bytes(2 << 30));
        assert!(config.snapshotter.upperdir_label);
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let err = Config::parse("[storage]\nbakend = \"pool\"\n", "cfg.toml").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("bakend"), "{text}");
        assert!(text.contains("cfg.toml"), "{text}");
    }

    #[test]
    fn bad_values_are_refused_with_key_and_reason() {
        let err = Config::parse("version = 2\n", "t").unwrap_err();
        assert!(err.to_string().contains("config key version"), "{err}");
        let err = Config::parse("[storage]\npool_size = \"12 parsecs\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("storage.pool_size"), "{err}");
        let err = Config::parse("[remote]\naddress = \"0.0.0.0:7443\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("remote.tls_cert"), "{err}");
        let err = Config::parse("[remote]\naddress = \"node-b\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("remote.address"), "{err}");
        let err = Config::parse("[remote]\ntoken_file = \"/t\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("without remote.address"), "{err}");
        let err = Config::parse(
            "[remote]\naddress = \"0.0.0.0:7443\"\ntls_cert = \"/c\"\ntls_key = \"k\"\ntoken_file = \"/t\"\n",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("remote.tls_key"), "{err}");
        let remote = Config::parse(
            "[remote]\naddress = \"[::]:7443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\ntoken_file = \"/t\"\n",
            "t",
        )
        .unwrap()
        .remote;
        assert_eq!(remote.address, "[::]:7443");
        let err = Config::parse("[rest]\ntcp_address = \"0.0.0.0:8089\"\ntoken_file = \"/t\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        let err = Config::parse("[rest]\ntcp_address = \"127.0.0.1:8089\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("rest.token_file"), "{err}");
        Config::parse("[rest]\ntcp_address = \"[::1]:8089\"\ntoken_file = \"/t\"\n", "t").unwrap();
        let err = Config::parse("[remote.connections]\nheader_timeout_secs = 0\n", "t").unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("remote.connections") && err.contains("header_timeout_secs"),
            "{err}"
        );
        let rest = Config::parse("[rest.connections]\nidle_timeout_secs = 1\n", "t")
            .unwrap()
            .rest;
        assert_eq!(
            (rest.connections.idle_timeout_secs, rest.connections.max_connections),
            (1, 256)
        );
        let err = Config::parse("[commit]\nbackground_workers = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("commit.background_workers"), "{err}");
        let err = Config::parse("[commit]\nmax_queued = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("commit.max_queued"), "{err}");
        assert_eq!(Config::default().commit.max_queued, 32);
        assert_eq!(Config::default().rest.namespace(), "default");
        let parsed = Config::parse("[rest]\nnamespace = \"apps\"\n", "t").unwrap();
        assert_eq!(parsed.rest.namespace(), "apps");
        let err = Config::parse("[rest]\nnamespace = \"no spaces\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("rest.namespace"), "{err}");
        let err = Config::parse("[storage]\npool_size = \"1MiB\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("minimum"), "{err}");
        assert!(Config::parse("[storage]\nbackend = \"zfs\"\n", "t").is_err());
        let err = Config::parse("[nydus]\ninsecure_registries = [\"http://r:5000\"]\n", "t").unwrap_err();
        assert!(err.to_string().contains("nydus.insecure_registries"), "{err}");
        let ok = Config::parse(
            "[nydus]\ninsecure_registries = [\"registry.local:5000\", \"[::1]:5000\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(ok.nydus.insecure_registries.len(), 2);
        let config = Config::parse("[nydus]\ncache_max_size = \"30%\"\n", "t").unwrap();
        assert_eq!(config.nydus_cache_bound().unwrap(), CacheBound::Percent(30));
        assert_eq!(CacheBound::Percent(30).bytes(1000), 300);
        assert_eq!(Config::default().nydus_cache_bound().unwrap(), CacheBound::Percent(20));
        let config = Config::parse("[nydus]\ncache_max_size = \"5GiB\"\n", "t").unwrap();
        assert_eq!(config.nydus_cache_bound().unwrap(), CacheBound::Bytes(5 << 30));
        for bad in ["0%", "101%", "lots", "-3%"] {
            let err = Config::parse(&format!("[nydus]\ncache_max_size = \"{bad}\"\n"), "t").unwrap_err();
            assert!(err.to_string().contains("nydus.cache_max_size"), "{bad}: {err}");
        }
        let err = Config::parse("[nydus]\nbase_cache_size = \"lots\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("nydus.base_cache_size"), "{err}");
        assert_eq!(Config::default().nydus_base_cache_bytes().unwrap(), 10 << 30);
        assert_eq!(Config::default().nydus.fs_driver, FsDriver::Auto);
        let fuse = Config::parse("[nydus]\nfs_driver = \"fuse\"\n", "t").unwrap();
        assert_eq!(fuse.nydus.fs_driver, FsDriver::Fuse);
        let err = Config::parse("[nydus]\nfs_driver = \"fscache\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("fs_driver"), "{err}");
    }

    #[test]
    fn shipped_example_is_the_defaults() {
        let text = include_str!("../packaging/config.toml");
        assert_eq!(Config::parse(text, "packaging/config.toml").unwrap(), Config::default());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("1ZiB").is_err());
        assert!(parse_size("20000000TiB").is_err());
    }
}
