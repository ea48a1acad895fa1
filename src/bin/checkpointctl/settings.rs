//! checkpointctl's configuration file (YAML, `~/.checkpointctl.yaml` unless
//! `-c` names another) and how the global flags override it. A file with an
//! unknown key or a bad value is refused with the key's path and the reason;
//! secrets (S3 keys, the encryption key) are never printed: `Debug` hides
//! them. `nodes:` names the daemons of other hosts that `restore -t NODE`
//! may address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use seamless_snapshotter::checkpoint::filter::parse_size;
use seamless_snapshotter::proto::Storage;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: key {key}: {reason}")]
    Invalid { path: String, key: String, reason: String },
    #[error("unknown node {node:?}: {}", defined_nodes(known))]
    UnknownNode { node: String, known: Vec<String> },
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
    /// CRIU binary, for process-state checkpoints.
    #[serde(default)]
    pub criu_path: Option<String>,
    /// Other hosts' daemons by name, for `restore --target-node`.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeSettings>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// The unix socket of the node's daemon: an absolute path or
    /// unix:///absolute/path.
    pub address: SocketAddress,
}

/// An absolute unix socket path, as `/path` or `unix:///path`: checked
/// while the file is read, so a bad one is reported with its key.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "String")]
pub struct SocketAddress(PathBuf);

impl TryFrom<String> for SocketAddress {
    type Error = String;

    fn try_from(address: String) -> Result<SocketAddress, String> {
        let path = address.strip_prefix("unix://").unwrap_or(&address);
        if path.starts_with('/') {
            Ok(SocketAddress(PathBuf::from(path)))
        } else {
            Err(format!(
                "{address:?} is not an absolute unix socket path or unix:///path"
            ))
        }
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

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggingSettings {
    /// debug, info, warn or error.
    #[serde(default)]
    pub level: Option<String>,
    /// A size such as 100MB.
    #[serde(default)]
    pub max_size: Option<String>,
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
        Settings::parse(&text, &path.display().to_string())
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
            parse_size(size).map_err(|reason| invalid("logging.max_size", reason))?;
        }
        let key = &self.storage.encryption_key.0;
        if !key.is_empty() && (key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(invalid(
                "storage.encryption_key",
                "must be 64 hexadecimal characters (32 bytes)".into(),
            ));
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

    /// The daemon socket of node `name` of `nodes:`.
    pub fn node_socket(&self, name: &str) -> Result<&Path, SettingsError> {
        match self.nodes.get(name) {
            Some(node) => Ok(&node.address.0),
            None => Err(SettingsError::UnknownNode {
                node: name.to_string(),
                known: self.nodes.keys().cloned().collect(),
            }),
        }
    }

    /// The storage a request names: `--storage-backend` over the file.
    pub fn storage(&self, backend_flag: Option<&str>) -> Storage {
        let backend = backend_flag
            .map(str::to_string)
            .or_else(|| self.storage.backend.clone())
            .unwrap_or_else(|| "local".into());
        Storage {
            backend,
            path: self.storage.nfs.path.clone(),
            bucket: self.storage.s3.bucket.clone(),
            region: self.storage.s3.region.clone(),
            endpoint: self.storage.s3.endpoint.clone(),
            access_key: self.storage.s3.access_key.0.clone(),
            secret_key: self.storage.s3.secret_key.0.clone(),
            encryption_key: self.storage.encryption_key.0.clone(),
        }
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
                "not an absolute unix socket path",
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
    fn nodes_name_their_daemon_sockets() {
        let text = "\
nodes:
  node-b: {address: /run/containerd-seamless/b.sock}
  node-c:
    address: unix:///run/c.sock
";
        let s = Settings::parse(text, "t.yaml").unwrap();
        assert_eq!(
            s.node_socket("node-b").unwrap(),
            Path::new("/run/containerd-seamless/b.sock")
        );
        assert_eq!(s.node_socket("node-c").unwrap(), Path::new("/run/c.sock"));
        let err = s.node_socket("node-d").unwrap_err().to_string();
        assert_eq!(err, "unknown node \"node-d\": the config file defines node-b, node-c");
        let err = Settings::default().node_socket("node-b").unwrap_err().to_string();
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
