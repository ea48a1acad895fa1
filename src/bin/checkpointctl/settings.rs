//! checkpointctl's configuration file (YAML, `~/.checkpointctl.yaml` unless
//! `-c` names another) and how the global flags override it. A file with an
//! unknown key or a bad value is refused with the key's path and the reason;
//! secrets (S3 keys, the encryption key) are never printed: `Debug` hides
//! them. `nodes:` names the daemons of other hosts that `restore -t NODE`
//! may address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use seamless_snapshotter::api::remote::{parse_https_address, RemoteTarget};
use seamless_snapshotter::checkpoint::filter::parse_size;
use seamless_snapshotter::proto::{MergeRules, Storage};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: key {key}: {reason}")]
    Invalid { path: String, key: String, reason: String },
    #[error("unknown node {node:?}: {}", defined_nodes(known))]
    UnknownNode { node: String, known: Vec<String> },
    #[error("{from}: criu path {path:?} is not an absolute UTF-8 path")]
    CriuPath { from: &'static str, path: String },
}

fn defined_nodes(known: &[String]) -> String {
    if known.is_empty() {
        "the config file defines no nodes (nodes: {NAME: {address: /path/to.sock}})".into()
    } else {
        format!("the config file defines {}", known.join(", "))
    }
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub storage: StorageSettings,
    #[serde(default)]
    pub automerge: AutomergeSettings,
    #[serde(default)]
    pub logging: LoggingSettings,
    /// CRIU binary, for process-state checkpoints: sent with each request
    /// (`--criu-path` overrides it); the daemon runs it only if its own
    /// config lists it in `[criu] allowed_paths`.
    #[serde(default)]
    pub criu_path: Option<String>,
    /// Other hosts' daemons by name, for `restore --target-node`.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeSettings>,
    /// Whose containers are checkpointed: `containerd` (the default) or
    /// `docker` (`--engine` overrides it).
    #[serde(default, deserialize_with = "engine_name")]
    pub engine: Option<String>,
}

fn engine_name<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let name = <Option<String> as Deserialize>::deserialize(deserializer)?;
    match name.as_deref() {
        None | Some("containerd") | Some("docker") => Ok(name),
        Some(other) => Err(serde::de::Error::custom(format!(
            "engine {other:?}: containerd or docker"
        ))),
    }
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// The node's daemon: its unix socket (an absolute path or
    /// unix:///absolute/path), or https://HOST:PORT of its `[remote]` API.
    pub address: NodeAddress,
    /// https only: PEM CA certificates that signed the node's certificate;
    /// the system's roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// https only, and required there: the file holding the node's bearer
    /// token (its first line; mode 0600).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// https only: the name the node's certificate is for, when not HOST.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl NodeSettings {
    /// What the TLS client needs for the node at `address`.
    pub fn remote_target(&self, address: &str) -> RemoteTarget {
        RemoteTarget {
            address: address.to_string(),
            ca_file: self.ca_file.clone(),
            token_file: self.token_file.clone().unwrap_or_default(),
            server_name: self.server_name.clone(),
        }
    }
}

/// Where a node's daemon listens: checked while the file is read, so a bad
/// address is reported with its key.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "String")]
pub enum NodeAddress {
    /// An absolute unix socket path, as `/path` or `unix:///path`.
    Unix(PathBuf),
    /// `https://HOST:PORT`.
    Https(String),
}

impl TryFrom<String> for NodeAddress {
    type Error = String;

    fn try_from(address: String) -> Result<NodeAddress, String> {
        if address.starts_with("https://") {
            parse_https_address(&address).map_err(|e| e.to_string())?;
            return Ok(NodeAddress::Https(address));
        }
        let path = address.strip_prefix("unix://").unwrap_or(&address);
        if path.starts_with('/') {
            Ok(NodeAddress::Unix(PathBuf::from(path)))
        } else {
            Err(format!(
                "{address:?} is not an absolute unix socket path, unix:///path or https://HOST:PORT"
            ))
        }
    }
}

impl NodeSettings {
    /// The TLS settings go with an https address, and it needs a token;
    /// files are absolute paths. Errors are (key, reason).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let https = matches!(self.address, NodeAddress::Https(_));
        for (key, set) in [
            ("ca_file", self.ca_file.is_some()),
            ("token_file", self.token_file.is_some()),
            ("server_name", self.server_name.is_some()),
        ] {
            if set && !https {
                return Err((key, "only for an https://HOST:PORT address".into()));
            }
        }
        if https && self.token_file.is_none() {
            return Err((
                "token_file",
                "required for an https:// address: the node's daemon wants its token on every call".into(),
            ));
        }
        for (key, path) in [("ca_file", &self.ca_file), ("token_file", &self.token_file)] {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return Err((key, format!("{} is not an absolute path", path.display())));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// local (default), s3 or nfs.
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub s3: S3Settings,
    #[serde(default)]
    pub nfs: NfsSettings,
    /// 64 hex characters: blobs are encrypted at rest with it.
    #[serde(default)]
    pub encryption_key: Secret,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    #[serde(default)]
    pub bucket: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub access_key: Secret,
    #[serde(default)]
    pub secret_key: Secret,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NfsSettings {
    /// The mounted export.
    #[serde(default)]
    pub path: String,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutomergeSettings {
    /// time-based, incremental or tagged.
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub keep_daily: Option<u32>,
    #[serde(default)]
    pub keep_hourly: Option<u32>,
    #[serde(default)]
    pub aggressive: bool,
}

impl AutomergeSettings {
    /// The merge that runs after every scheduled and automanaged
    /// checkpoint: None unless the file names a strategy or a window
    /// (`aggressive` alone decides nothing). The strategy defaults to
    /// time-based, as for `checkpointctl merge`.
    pub fn rules(&self) -> Option<MergeRules> {
        if self.strategy.is_none() && self.keep_daily.is_none() && self.keep_hourly.is_none() {
            return None;
        }
        Some(MergeRules {
            strategy: self.strategy.clone().unwrap_or_else(|| "time-based".into()),
            keep_daily: self.keep_daily.unwrap_or(0),
            has_keep_daily: self.keep_daily.is_some(),
            keep_hourly: self.keep_hourly.unwrap_or(0),
            has_keep_hourly: self.keep_hourly.is_some(),
            retain_labels: Vec::new(),
            aggressive: self.aggressive,
        })
    }
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggingSettings {
    /// debug, info, warn or error.
    #[serde(default)]
    pub level: Option<String>,
    /// A size such as 100MB: the log of `automanage --daemonize` is
    /// rotated (`<log>.1` the newest) when it grows past it.
    #[serde(default)]
    pub max_size: Option<String>,
    /// Rotated logs kept beside it, `<log>.1` to `<log>.N` (default 3);
    /// 0 truncates the log instead.
    #[serde(default)]
    pub max_backups: Option<u32>,
}

/// Rotated automanage logs kept when `logging.max_backups` is not given.
pub const DEFAULT_MAX_BACKUPS: u32 = 3;

impl LoggingSettings {
    /// `max_size` in bytes, if given (checked when the file was loaded).
    pub fn max_size_bytes(&self) -> Option<u64> {
        self.max_size.as_deref().and_then(|s| parse_size(s).ok())
    }
}

/// A value that is never printed.
#[derive(Default, Deserialize, PartialEq, Clone)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

pub const BACKENDS: [&str; 3] = ["local", "s3", "nfs"];
pub const LOG_LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];
const STRATEGIES: [&str; 3] = ["time-based", "incremental", "tagged"];

/// `~/.checkpointctl.yaml`.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".checkpointctl.yaml"))
}

impl Settings {
    /// Reads `path`; a missing file is an error only when `required` (the
    /// user named it).
    pub fn load(path: &Path, required: bool) -> Result<Settings, SettingsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Settings::default()),
            Err(e) => {
                return Err(SettingsError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        let settings = Settings::parse(&text, &path.display().to_string())?;
        settings.check_secrets_private(path)?;
        Ok(settings)
    }

    /// A file that holds secrets must be readable by its owner only: the
    /// file is their only protection.
    fn check_secrets_private(&self, path: &Path) -> Result<(), SettingsError> {
        let Some(key) = [
            ("storage.s3.secret_key", &self.storage.s3.secret_key),
            ("storage.encryption_key", &self.storage.encryption_key),
        ]
        .into_iter()
        .find_map(|(key, secret)| (!secret.0.is_empty()).then_some(key)) else {
            return Ok(());
        };
        let meta = std::fs::metadata(path).map_err(|e| SettingsError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        seamless_snapshotter::host::private_file::check(&meta).map_err(|e| SettingsError::Invalid {
            path: path.display().to_string(),
            key: key.to_string(),
            reason: format!("is a secret, and the file {e}"),
        })
    }

    pub fn parse(text: &str, path: &str) -> Result<Settings, SettingsError> {
        if text.trim().is_empty() {
            return Ok(Settings::default());
        }
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let settings: Settings = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let reason = e.inner().to_string();
            // The YAML error may lead with the path already, or with the
            // path of the map around a value that failed its own check.
            let reason = match reason.split_once(": ") {
                Some((lead, rest)) if key == lead || key.starts_with(&format!("{lead}.")) => rest.to_string(),
                _ => reason,
            };
            if key == "." {
                SettingsError::Read {
                    path: path.to_string(),
                    reason,
                }
            } else {
                SettingsError::Invalid {
                    path: path.to_string(),
                    key,
                    reason,
                }
            }
        })?;
        settings.validate(path)?;
        Ok(settings)
    }

    fn validate(&self, path: &str) -> Result<(), SettingsError> {
        let invalid = |key: &str, reason: String| SettingsError::Invalid {
            path: path.to_string(),
            key: key.to_string(),
            reason,
        };
        let one_of = |key: &str, value: &Option<String>, allowed: &[&str]| match value {
            Some(v) if !allowed.contains(&v.as_str()) => {
                Err(invalid(key, format!("{v:?} is not one of {}", allowed.join(", "))))
            }
            _ => Ok(()),
        };
        one_of("storage.backend", &self.storage.backend, &BACKENDS)?;
        one_of("automerge.strategy", &self.automerge.strategy, &STRATEGIES)?;
        one_of("logging.level", &self.logging.level, &LOG_LEVELS)?;
        if let Some(size) = &self.logging.max_size {
            let bytes = parse_size(size).map_err(|reason| invalid("logging.max_size", reason))?;
            if bytes == 0 {
                return Err(invalid("logging.max_size", "must be more than 0 bytes".into()));
            }
        }
        let key = &self.storage.encryption_key.0;
        if !key.is_empty() && (key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(invalid(
                "storage.encryption_key",
                "must be 64 hexadecimal characters (32 bytes)".into(),
            ));
        }
        for (name, node) in &self.nodes {
            node.validate()
                .map_err(|(key, reason)| invalid(&format!("nodes.{name}.{key}"), reason))?;
        }
        let endpoint = &self.storage.s3.endpoint;
        if !(endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(invalid(
                "storage.s3.endpoint",
                format!("{:?} is not an http:// or https:// URL", self.storage.s3.endpoint),
            ));
        }
        Ok(())
    }

    /// Node `name` of `nodes:`.
    pub fn node(&self, name: &str) -> Result<&NodeSettings, SettingsError> {
        match self.nodes.get(name) {
            Some(node) => Ok(node),
            None => Err(SettingsError::UnknownNode {
                node: name.to_string(),
                known: self.nodes.keys().cloned().collect(),
            }),
        }
    }

    /// The criu binary requests name: `--criu-path` over the file's
    /// `criu_path`; None: the daemon's own.
    pub fn criu_path(&self, flag: Option<&std::path::Path>) -> Result<Option<String>, SettingsError> {
        let (from, path) = match (flag, &self.criu_path) {
            (Some(flag), _) => (
                "--criu-path",
                flag.to_str()
                    .map(str::to_string)
                    .ok_or_else(|| SettingsError::CriuPath {
                        from: "--criu-path",
                        path: flag.display().to_string(),
                    })?,
            ),
            (None, Some(path)) => ("criu_path of the config file", path.clone()),
            (None, None) => return Ok(None),
        };
        if !path.starts_with('/') {
            return Err(SettingsError::CriuPath { from, path });
        }
        Ok(Some(path))
    }

    /// The storage a request names: `--storage-backend` over the file.
    pub fn storage(&self, backend_flag: Option<&str>) -> Storage {
        let backend = backend_flag
            .map(str::to_string)
            .or_else(|| self.storage.backend.clone())
            .unwrap_or_else(|| "local".into());
        // Only what the chosen backend uses travels: S3 secrets go nowhere
        // they are not needed, and a daemon reached over TCP (which refuses
        // host paths and endpoints) is not sent a leftover nfs path.
        let mut storage = Storage {
            backend,
            encryption_key: self.storage.encryption_key.0.clone(),
            ..Storage::default()
        };
        match storage.backend.as_str() {
            "nfs" => storage.path = self.storage.nfs.path.clone(),
            "s3" => {
                storage.bucket = self.storage.s3.bucket.clone();
                storage.region = self.storage.s3.region.clone();
                storage.endpoint = self.storage.s3.endpoint.clone();
                storage.access_key = self.storage.s3.access_key.0.clone();
                storage.secret_key = self.storage.s3.secret_key.0.clone();
            }
            _ => {}
        }
        storage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "\
storage:
  backend: s3
  s3: {bucket: my-checkpoints, region: us-west-2, endpoint: http://127.0.0.1:9000, access_key: AKIAXXX, secret_key: xxxxx}
automerge: {strategy: time-based, keep_daily: 7, aggressive: true}
logging: {level: info, max_size: 100MB}
";

    #[test]
    fn only_the_chosen_backends_settings_are_sent() {
        let settings = Settings::parse(
            "storage: {backend: nfs, nfs: {path: /mnt/cp}, s3: {bucket: b, endpoint: http://10.0.0.9:9000, secret_key: s}}\n",
            "c.yaml",
        )
        .unwrap();
        let nfs = settings.storage(None);
        assert_eq!(
            (nfs.path.as_str(), nfs.bucket.as_str(), nfs.secret_key.as_str()),
            ("/mnt/cp", "", "")
        );
        let local = settings.storage(Some("local"));
        assert_eq!(
            (local.path.as_str(), local.endpoint.as_str(), local.secret_key.as_str()),
            ("", "", "")
        );
        let s3 = settings.storage(Some("s3"));
        assert_eq!(
            (s3.path.as_str(), s3.bucket.as_str(), s3.secret_key.as_str()),
            ("", "b", "s")
        );
    }

    #[test]
    fn automerge_runs_only_when_the_file_names_a_strategy_or_a_window() {
        let rules = |text: &str| Settings::parse(text, "c.yaml").unwrap().automerge.rules();
        assert_eq!(rules(""), None);
        assert_eq!(rules("automerge: {aggressive: true}\n"), None);
        let daily = rules("automerge: {keep_daily: 7, aggressive: true}\n").unwrap();
        assert_eq!(
            (
                daily.strategy.as_str(),
                daily.keep_daily,
                daily.has_keep_daily,
                daily.has_keep_hourly,
                daily.aggressive
            ),
            ("time-based", 7, true, false, true)
        );
        let incremental = rules("automerge: {strategy: incremental}\n").unwrap();
        assert_eq!(incremental.strategy, "incremental");
    }

    #[test]
    fn the_criu_path_flag_overrides_the_file_and_must_be_absolute() {
        use std::path::Path;
        let settings = Settings::parse("criu_path: /opt/criu/sbin/criu\n", "c.yaml").unwrap();
        assert_eq!(
            settings.criu_path(None).unwrap().as_deref(),
            Some("/opt/criu/sbin/criu")
        );
        assert_eq!(
            settings
                .criu_path(Some(Path::new("/usr/sbin/criu")))
                .unwrap()
                .as_deref(),
            Some("/usr/sbin/criu")
        );
        assert_eq!(Settings::default().criu_path(None).unwrap(), None);
        let e = settings.criu_path(Some(Path::new("criu"))).unwrap_err().to_string();
        assert!(e.contains("--criu-path") && e.contains("not an absolute"), "{e}");
        let relative = Settings::parse("criu_path: bin/criu\n", "c.yaml").unwrap();
        let e = relative.criu_path(None).unwrap_err().to_string();
        assert!(e.contains("criu_path of the config file"), "{e}");
    }

    #[test]
    fn a_file_with_secrets_that_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c.yaml");
        std::fs::write(&path, "storage: {backend: s3, s3: {bucket: b, secret_key: xxxxx}}\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Settings::load(&path, true).unwrap_err().to_string();
        assert!(
            e.contains("c.yaml") && e.contains("storage.s3.secret_key") && e.contains("mode 0644"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Settings::load(&path, true).unwrap();
        // Without secrets the mode is the user's business.
        std::fs::write(&path, "storage: {backend: local}\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Settings::load(&path, true).unwrap();
    }

    #[test]
    fn the_issue_example_parses_and_hides_its_secrets() {
        let s = Settings::parse(EXAMPLE, "t.yaml").unwrap();
        assert_eq!(s.storage.backend.as_deref(), Some("s3"));
        assert_eq!(s.storage.s3.bucket, "my-checkpoints");
        assert_eq!(s.automerge.keep_daily, Some(7));
        assert!(s.automerge.aggressive);
        let printed = format!("{s:?}");
        assert!(!printed.contains("xxxxx") && !printed.contains("AKIAXXX"), "{printed}");
        let storage = s.storage(None);
        assert_eq!((storage.backend.as_str(), storage.secret_key.as_str()), ("s3", "xxxxx"));
        assert_eq!(s.storage(Some("local")).backend, "local");
        assert_eq!(Settings::parse("", "t").unwrap(), Settings::default());
    }

    #[test]
    fn bad_files_name_the_key_and_the_reason() {
        let cases = [
            (
                "storage:\n  backend: ftp\n",
                "storage.backend",
                "not one of local, s3, nfs",
            ),
            ("storage:\n  s3: {bukket: x}\n", "storage.s3", "unknown field `bukket`"),
            ("logging: {max_size: lots}\n", "logging.max_size", ""),
            ("logging: {max_size: 0}\n", "logging.max_size", "more than 0"),
            ("logging: {max_backups: -1}\n", "logging.max_backups", "expected u32"),
            ("automerge: {keep_daily: -1}\n", "automerge.keep_daily", "expected u32"),
            ("automerge: {strategy: random}\n", "automerge.strategy", "time-based"),
            (
                "storage: {encryption_key: abc}\n",
                "storage.encryption_key",
                "64 hexadecimal",
            ),
            ("colour: blue\n", "colour", "unknown field"),
            (
                "nodes: {b: {adress: /run/b.sock}}\n",
                "nodes.b",
                "unknown field `adress`",
            ),
            ("nodes: {b: {}}\n", "nodes.b", "missing field `address`"),
            (
                "nodes: {b: {address: b.sock}}\n",
                "nodes.b.address",
                "not an absolute unix socket path",
            ),
            (
                "nodes: {b: {address: \"tcp://10.0.0.2:9000\"}}\n",
                "nodes.b.address",
                "https://HOST:PORT",
            ),
            (
                "nodes: {b: {address: \"https://10.0.0.2\"}}\n",
                "nodes.b.address",
                "has no :PORT",
            ),
            (
                "nodes: {b: {address: \"https://10.0.0.2:7443\"}}\n",
                "nodes.b.token_file",
                "required for an https:// address",
            ),
            (
                "nodes: {b: {address: \"https://10.0.0.2:7443\", token_file: b.token}}\n",
                "nodes.b.token_file",
                "not an absolute path",
            ),
            (
                "nodes: {b: {address: /run/b.sock, ca_file: /etc/ca.pem}}\n",
                "nodes.b.ca_file",
                "only for an https://HOST:PORT address",
            ),
            ("nodes: [b]\n", "nodes", "expected a map"),
        ];
        for (text, key, reason) in cases {
            let err = Settings::parse(text, "t.yaml").unwrap_err();
            let message = err.to_string();
            assert!(message.contains(&format!("key {key}")), "{text}: {message}");
            // The reason does not repeat the path.
            let top = key.split('.').next().unwrap();
            assert!(!message.contains(&format!(": {top}")), "{text}: {message}");
            assert!(message.contains(reason), "{text}: {message}");
        }
        let err = Settings::parse("storage: [", "t.yaml").unwrap_err();
        assert!(err.to_string().starts_with("config file t.yaml"), "{err}");
    }

    #[test]
    fn nodes_name_their_daemons() {
        let text = "\
nodes:
  node-b: {address: /run/containerd-seamless/b.sock}
  node-c:
    address: unix:///run/c.sock
  node-e:
    address: https://node-e.example:7443
    ca_file: /etc/checkpointctl/ca.pem
    token_file: /etc/checkpointctl/node-e.token
    server_name: seamless.node-e.example
";
        let s = Settings::parse(text, "t.yaml").unwrap();
        assert_eq!(
            s.node("node-b").unwrap().address,
            NodeAddress::Unix("/run/containerd-seamless/b.sock".into())
        );
        assert_eq!(
            s.node("node-c").unwrap().address,
            NodeAddress::Unix("/run/c.sock".into())
        );
        let node_e = s.node("node-e").unwrap();
        let NodeAddress::Https(address) = &node_e.address else {
            panic!("{:?}", node_e.address)
        };
        assert_eq!(
            node_e.remote_target(address),
            RemoteTarget {
                address: "https://node-e.example:7443".into(),
                ca_file: Some("/etc/checkpointctl/ca.pem".into()),
                token_file: "/etc/checkpointctl/node-e.token".into(),
                server_name: Some("seamless.node-e.example".into()),
            }
        );
        let err = s.node("node-d").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown node \"node-d\": the config file defines node-b, node-c, node-e"
        );
        let err = Settings::default().node("node-b").unwrap_err().to_string();
        assert!(err.contains("defines no nodes"), "{err}");
    }

    #[test]
    fn a_missing_default_file_is_fine_a_named_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent.yaml");
        assert_eq!(Settings::load(&absent, false).unwrap(), Settings::default());
        assert!(Settings::load(&absent, true).is_err());
    }
}
