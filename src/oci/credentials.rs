//! Registry credentials as the container ecosystem keeps them, and as a
//! caller hands them over for one request.
//!
//! - [`Keychain`] answers "which credentials for registry host H" from
//!   Docker's `config.json`: `auths` entries (`auth`, `username`/`password`,
//!   `identitytoken`), `credHelpers` (per host) and `credsStore` (the
//!   default), the last two by running `docker-credential-<name> get` as the
//!   docker-credential-helpers protocol says. The file is read again when it
//!   changes, so a `docker login` on the node counts without a restart.
//! - [`RegistryCredentials`] is a user name and password given for one
//!   request (`--target-creds`), [`RequestAuth`] picks a request's
//!   credentials for each registry a commit talks to.
//!
//! Secrets stay inside the values that hold them: errors name the file, the
//! helper and the host, never a value read from them (a malformed
//! `config.json` is reported by its JSON position and key names), and the
//! `Debug` of every type here prints `<redacted>` for them.
//!
//! Identity tokens (`identitytoken`, or a helper's `<token>` user) are
//! OAuth2 refresh tokens. Docker trades one for an access token with the
//! `refresh_token` grant; oci-client has no such grant, so here the token is
//! sent as the basic-auth password of the registry's token request (with the
//! entry's user name, `<token>` when it has none). Registries that accept a
//! refresh token that way (Azure Container Registry with the user
//! `00000000-0000-0000-0000-000000000000`) work; one that insists on the
//! OAuth2 grant refuses it, and the commit fails with PERMISSION_DENIED.
//!
//! Knows nothing of the registry protocol or of commits: it only answers
//! which credentials belong to a host.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tracing::{debug, warn};

use crate::oci::registry::RegistryAuth;

/// Where Docker keeps its config without `DOCKER_CONFIG`, for root.
pub const DEFAULT_DOCKER_CONFIG: &str = "/root/.docker/config.json";
/// The key Docker files Docker Hub's credentials under.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";
/// A helper that has not answered by then is killed: a hung keychain must
/// not hold a commit forever.
pub const DEFAULT_HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a helper may print: a real answer is a few hundred bytes.
pub const MAX_HELPER_OUTPUT: u64 = 64 << 10;
/// The largest `config.json` read: real ones are a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// How long a helper's answer is reused: one commit asks for a host many
/// times, and some helpers (ECR, GCR) take seconds.
const HELPER_CACHE_TTL: Duration = Duration::from_secs(30);
/// What a helper prints when it has nothing for the server.
const NOT_FOUND: &str = "credentials not found in native keychain";
/// The user name that says the secret is an identity token.
const TOKEN_USER: &str = "<token>";

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("docker config {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("docker config {path}: {key}: {reason}")]
    Entry { path: String, key: String, reason: String },
    #[error("credential helper name {name:?} is not a name of letters, digits, '.', '_' and '-'")]
    HelperName { name: String },
    #[error("credential helper docker-credential-{helper} for {host}: {reason}")]
    Helper {
        helper: String,
        host: String,
        reason: String,
    },
    #[error("credentials {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("credentials file {path}: {reason}")]
    File { path: String, reason: String },
}

/// A user name and its password (or token), for basic auth. The password
/// never shows in `Debug`; it is not serialised.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    username: String,
    password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl RegistryCredentials {
    /// A user name (not empty, no ':' or control characters: it travels
    /// in a basic-auth header) and a password (not empty, no control
    /// characters). `what` names them in errors.
    pub fn new(what: &str, username: &str, password: &str) -> Result<RegistryCredentials, CredentialError> {
        let bad = |reason: &str| CredentialError::Invalid {
            what: what.to_string(),
            reason: reason.to_string(),
        };
        if username.is_empty() {
            return Err(bad("the user name is empty"));
        }
        if username.contains(':') || username.chars().any(char::is_control) {
            return Err(bad("the user name holds ':' or a control character"));
        }
        if password.is_empty() {
            return Err(bad("the password is empty"));
        }
        if password.chars().any(char::is_control) {
            return Err(bad("the password holds a control character"));
        }
        Ok(RegistryCredentials {
            username: username.to_string(),
            password: password.to_string(),
        })
    }

    /// `user:password`, split at the first ':' (a password may hold more).
    pub fn parse(what: &str, text: &str) -> Result<RegistryCredentials, CredentialError> {
        let (username, password) = text.split_once(':').ok_or_else(|| CredentialError::Invalid {
            what: what.to_string(),
            reason: "expected user:password".to_string(),
        })?;
        RegistryCredentials::new(what, username, password)
    }

    /// The first line of a file readable by its owner only (like every
    /// secret file of ours), as `user:password`.
    pub fn read_file(path: &Path) -> Result<RegistryCredentials, CredentialError> {
        let bad = |reason: String| CredentialError::File {
            path: path.display().to_string(),
            reason,
        };
        let (file, _) = crate::host::private_file::open(path).map_err(|e| bad(e.to_string()))?;
        let mut text = String::new();
        file.take(MAX_HELPER_OUTPUT)
            .read_to_string(&mut text)
            .map_err(|e| bad(e.to_string()))?;
        let line = text.lines().next().unwrap_or_default().trim_end_matches('\r');
        RegistryCredentials::parse(&format!("in {}", path.display()), line)
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Basic auth with these credentials.
    pub fn to_auth(&self) -> RegistryAuth {
        RegistryAuth::Basic(self.username.clone(), self.password.clone())
    }
}

/// The REST form: `{"username": "...", "password": "..."}`. Every refusal
/// is a message of ours: serde's own would quote the refused value.
impl<'de> serde::Deserialize<'de> for RegistryCredentials {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `deserialize_any`: a typed request (`deserialize_map`) makes
        // serde_json quote a refused string itself.
        deserializer.deserialize_any(CredentialsVisitor)
    }
}

const CREDENTIALS_SHAPE: &str = "credentials must be an object with a username and a password";

struct CredentialsVisitor;

impl<'de> serde::de::Visitor<'de> for CredentialsVisitor {
    type Value = RegistryCredentials;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with a username and a password")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RegistryCredentials, A::Error> {
        use serde::de::Error as _;
        let (mut username, mut password) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "username" => username = Some(map.next_value::<SecretText>()?.0),
                "password" => password = Some(map.next_value::<SecretText>()?.0),
                other => {
                    return Err(A::Error::custom(format!(
                        "unknown credentials field {other:?}: expected username and password"
                    )))
                }
            }
        }
        RegistryCredentials::new(
            "of the request",
            &username.unwrap_or_default(),
            &password.unwrap_or_default(),
        )
        .map_err(A::Error::custom)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<RegistryCredentials, E> {
        Err(E::custom(CREDENTIALS_SHAPE))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<RegistryCredentials, E> {
        Err(E::custom(CREDENTIALS_SHAPE))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<RegistryCredentials, E> {
        Err(E::custom(CREDENTIALS_SHAPE))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<RegistryCredentials, E> {
        Err(E::custom(CREDENTIALS_SHAPE))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<RegistryCredentials, E> {
        Err(E::custom(CREDENTIALS_SHAPE))
    }
}

/// A string field of credentials; anything else is refused without
/// quoting it.
struct SecretText(String);

impl<'de> serde::Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SecretTextVisitor)
    }
}

const SECRET_TEXT_SHAPE: &str = "a credentials field must be a string";

struct SecretTextVisitor;

impl<'de> serde::de::Visitor<'de> for SecretTextVisitor {
    type Value = SecretText;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<SecretText, E> {
        Ok(SecretText(text.to_string()))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<SecretText, E> {
        Err(E::custom(SECRET_TEXT_SHAPE))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<SecretText, E> {
        Err(E::custom(SECRET_TEXT_SHAPE))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<SecretText, E> {
        Err(E::custom(SECRET_TEXT_SHAPE))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<SecretText, E> {
        Err(E::custom(SECRET_TEXT_SHAPE))
    }
}

/// Credentials as a keychain holds them for a host.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password.
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (`identitytoken`, or a helper's `<token>`
    /// user), with the entry's user name if it had one.
    IdentityToken { username: String, token: String },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credential::IdentityToken { username, .. } => f
                .debug_struct("IdentityToken")
                .field("username", username)
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

impl Credential {
    /// What oci-client sends: a basic-auth pair either way (see the module
    /// docs for what that means for identity tokens).
    pub fn to_auth(&self) -> RegistryAuth {
        match self {
            Credential::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
            Credential::IdentityToken { username, token } => {
                let user = if username.is_empty() { TOKEN_USER } else { username };
                RegistryAuth::Basic(user.to_string(), token.clone())
            }
        }
    }
}

/// The name under which Docker files a registry host's credentials:
/// Docker Hub's aliases are [`DOCKER_HUB_SERVER`], any other host itself.
pub fn server_key(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    if is_docker_hub(&host) {
        DOCKER_HUB_SERVER.to_string()
    } else {
        host
    }
}

fn is_docker_hub(host: &str) -> bool {
    matches!(host, "docker.io" | "registry-1.docker.io" | "index.docker.io")
}

/// The host of a config key, as Docker reads old keys: scheme and path
/// dropped (`https://host:5000/v1/` is `host:5000`); Docker Hub's aliases
/// are one host.
fn key_host(key: &str) -> String {
    let lower = key.trim().to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .unwrap_or(&lower);
    let host = rest.split('/').next().unwrap_or_default();
    if is_docker_hub(host) {
        "index.docker.io".to_string()
    } else {
        host.to_string()
    }
}

/// The entry of `map` for `host`: the key equal to its server key first,
/// then (in key order, so the answer does not depend on the file's) the
/// first key whose host is the host.
fn find_for_host<'a, T>(map: &'a BTreeMap<String, T>, host: &str) -> Option<(&'a String, &'a T)> {
    let server = server_key(host);
    if let Some(found) = map.get_key_value(&server) {
        return Some(found);
    }
    let wanted = key_host(&server);
    map.iter().find(|(key, _)| key_host(key) == wanted)
}

/// A credential helper's name, checked before it becomes part of a command:
/// letters, digits, '.', '_' and '-' only, so it cannot name a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperName(String);

impl HelperName {
    pub fn parse(name: &str) -> Result<HelperName, CredentialError> {
        let valid = !name.is_empty()
            && name.len() <= 100
            && name != "."
            && name != ".."
            && !name.contains("..")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(HelperName(name.to_string()))
        } else {
            Err(CredentialError::HelperName {
                name: name.chars().take(100).collect(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `docker-credential-<name>`.
    pub fn program(&self) -> String {
        format!("docker-credential-{}", self.0)
    }
}

/// What `config.json` says, parsed.
#[derive(Debug, Default)]
struct DockerConfig {
    auths: BTreeMap<String, AuthEntry>,
    /// A helper name, or why the entry's is refused (for its host only).
    cred_helpers: BTreeMap<String, Result<HelperName, String>>,
    creds_store: Option<HelperName>,
}

/// An `auths` entry. Its fields are checked when it is used, so one bad
/// entry breaks only its own host.
#[derive(Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identity_token: Option<String>,
    /// The key and reason of the entry's first bad field.
    invalid: Option<(String, &'static str)>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry")
            .field("username", &self.username)
            .field("secrets", &"<redacted>")
            .finish()
    }
}

impl DockerConfig {
    /// Parses `text`: JSON first (a syntax error names only its position),
    /// then each key the daemon uses, by hand, so no message quotes a value.
    fn parse(path: &Path, text: &[u8]) -> Result<DockerConfig, CredentialError> {
        let path_text = path.display().to_string();
        let value: Value = serde_json::from_slice(text).map_err(|e| CredentialError::Config {
            path: path_text.clone(),
            reason: format!(
                "not JSON (line {}, column {}: {:?} error)",
                e.line(),
                e.column(),
                e.classify()
            ),
        })?;
        let entry_error = |key: &str, reason: &str| CredentialError::Entry {
            path: path_text.clone(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let top = value.as_object().ok_or_else(|| CredentialError::Config {
            path: path_text.clone(),
            reason: "is not a JSON object".into(),
        })?;
        let mut config = DockerConfig::default();
        match top.get("auths") {
            None | Some(Value::Null) => {}
            Some(Value::Object(auths)) => {
                for (key, entry) in auths {
                    let name = format!("auths.{key}");
                    let Value::Object(fields) = entry else {
                        let invalid = Some((name, "is not an object"));
                        config.auths.insert(
                            key.clone(),
                            AuthEntry {
                                invalid,
                                ..AuthEntry::default()
                            },
                        );
                        continue;
                    };
                    let mut entry = AuthEntry::default();
                    for (field, slot) in [
                        ("auth", &mut entry.auth),
                        ("username", &mut entry.username),
                        ("password", &mut entry.password),
                        ("identitytoken", &mut entry.identity_token),
                    ] {
                        match fields.get(field) {
                            None | Some(Value::Null) => {}
                            Some(Value::String(s)) if s.is_empty() => {}
                            Some(Value::String(s)) => *slot = Some(s.clone()),
                            Some(_) => {
                                entry
                                    .invalid
                                    .get_or_insert((format!("{name}.{field}"), "is not a string"));
                            }
                        }
                    }
                    config.auths.insert(key.clone(), entry);
                }
            }
            Some(_) => return Err(entry_error("auths", "is not an object")),
        }
        match top.get("credHelpers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(helpers)) => {
                for (key, helper) in helpers {
                    let helper = match helper {
                        Value::String(helper) => HelperName::parse(helper).map_err(|e| e.to_string()),
                        _ => Err("is not a string".to_string()),
                    };
                    config.cred_helpers.insert(key.clone(), helper);
                }
            }
            Some(_) => return Err(entry_error("credHelpers", "is not an object")),
        }
        match top.get("credsStore") {
            None | Some(Value::Null) => {}
            Some(Value::String(store)) if store.is_empty() => {}
            Some(Value::String(store)) => {
                config.creds_store =
                    Some(HelperName::parse(store).map_err(|e| entry_error("credsStore", &e.to_string()))?);
            }
            Some(_) => return Err(entry_error("credsStore", "is not a string")),
        }
        Ok(config)
    }
}

/// The credentials of an `auths` entry: `identitytoken` first (Docker sends
/// it instead of the password), then `auth`, then `username`/`password`.
fn entry_credential(path: &Path, key: &str, entry: &AuthEntry) -> Result<Option<Credential>, CredentialError> {
    let bad = |field: &str, reason: &str| CredentialError::Entry {
        path: path.display().to_string(),
        key: format!("auths.{key}.{field}"),
        reason: reason.to_string(),
    };
    if let Some((key, reason)) = &entry.invalid {
        return Err(CredentialError::Entry {
            path: path.display().to_string(),
            key: key.clone(),
            reason: reason.to_string(),
        });
    }
    let (mut username, mut password) = (entry.username.clone(), entry.password.clone());
    if let Some(auth) = &entry.auth {
        let decoded = decode_base64(auth.trim()).ok_or_else(|| bad("auth", "is not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad("auth", "is not UTF-8 once decoded"))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| bad("auth", "does not decode to user:password"))?;
        username = Some(user.to_string());
        password = Some(pass.to_string());
    }
    if let Some(token) = &entry.identity_token {
        return Ok(Some(Credential::IdentityToken {
            username: username.unwrap_or_default(),
            token: token.clone(),
        }));
    }
    match (username, password) {
        (Some(username), Some(password)) if !username.is_empty() && !password.is_empty() => {
            Ok(Some(Credential::Basic { username, password }))
        }
        // `docker login` with a credential store leaves `{}` here.
        (None, None) => Ok(None),
        (Some(u), Some(p)) if u.is_empty() && p.is_empty() => Ok(None),
        _ => Err(bad("username", "has a user name without a password or the reverse")),
    }
}

/// Standard base64 with or without padding, as Docker writes `auth`.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const DOCKER: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    DOCKER.decode(text).ok()
}

/// The identity of a file version: a `docker login` that rewrites the file
/// changes one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    device: u64,
}

#[derive(Debug, Default)]
struct State {
    /// The config as last read and the file version it came from; `None`
    /// stamp: the file did not exist.
    loaded: Option<(Option<FileStamp>, std::sync::Arc<DockerConfig>)>,
    /// Helper answers by (helper, server), with when they were given.
    helper_answers: HashMap<(String, String), (Instant, Option<Credential>)>,
}

/// Docker's credential store of this node: `config.json` and the helpers
/// it names. Cheap to share in an `Arc`; every method blocks (a file read,
/// a helper run of up to its timeout), so async code calls it from
/// `spawn_blocking`.
#[derive(Debug)]
pub struct Keychain {
    path: PathBuf,
    /// Where helpers are looked for; `None`: the daemon's `PATH`.
    helper_dirs: Option<Vec<PathBuf>>,
    helper_timeout: Duration,
    state: Mutex<State>,
}

/// The registry client asks the keychain for each registry host it talks to.
impl crate::oci::registry::CredentialSource for Keychain {
    fn credentials(&self, host: &str) -> Result<Option<RegistryAuth>, String> {
        self.auth_for(host).map_err(|e| e.to_string())
    }
}

impl Keychain {
    /// The keychain of the Docker config at `path` (a missing file is a
    /// keychain without credentials).
    pub fn new(path: impl Into<PathBuf>) -> Keychain {
        Keychain {
            path: path.into(),
            helper_dirs: None,
            helper_timeout: DEFAULT_HELPER_TIMEOUT,
            state: Mutex::new(State::default()),
        }
    }

    /// `$DOCKER_CONFIG/config.json`, else [`DEFAULT_DOCKER_CONFIG`].
    pub fn default_config_path() -> PathBuf {
        match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("config.json"),
            _ => PathBuf::from(DEFAULT_DOCKER_CONFIG),
        }
    }

    /// Helpers are looked for in `dirs` (in order) instead of `PATH`.
    pub fn with_helper_dirs(mut self, dirs: Vec<PathBuf>) -> Keychain {
        self.helper_dirs = Some(dirs);
        self
    }

    /// A helper that has not answered within `timeout` is killed.
    pub fn with_helper_timeout(mut self, timeout: Duration) -> Keychain {
        self.helper_timeout = timeout;
        self
    }

    pub fn config_path(&self) -> &Path {
        &self.path
    }

    /// The basic or bearer credentials for registry `host` ("host" or
    /// "host:port"; Docker Hub by any of its names); `None`: anonymous.
    pub fn auth_for(&self, host: &str) -> Result<Option<RegistryAuth>, CredentialError> {
        Ok(self.credential_for(host)?.map(|c| c.to_auth()))
    }

    /// The credentials for registry `host` as the keychain holds them, as
    /// Docker picks them: the host's `credHelpers` entry, else `credsStore`,
    /// else its `auths` entry. A helper that has nothing for the host means
    /// anonymous, as for Docker.
    pub fn credential_for(&self, host: &str) -> Result<Option<Credential>, CredentialError> {
        let config = self.config()?;
        let server = server_key(host);
        let helper = match find_for_host(&config.cred_helpers, host) {
            Some((_, Ok(helper))) => Some(helper),
            Some((key, Err(reason))) => {
                return Err(CredentialError::Entry {
                    path: self.path.display().to_string(),
                    key: format!("credHelpers.{key}"),
                    reason: reason.clone(),
                })
            }
            None => config.creds_store.as_ref(),
        };
        if let Some(helper) = helper {
            return self.ask_helper(helper, host, &server);
        }
        match find_for_host(&config.auths, host) {
            Some((key, entry)) => entry_credential(&self.path, key, entry),
            None => Ok(None),
        }
    }

    /// Forgets the helpers' answers for `host`, so the next lookup asks
    /// again: for a caller whose token the registry refused as expired.
    pub fn forget(&self, host: &str) {
        let server = server_key(host);
        if let Ok(mut state) = self.state.lock() {
            state.helper_answers.retain(|(_, s), _| *s != server);
        }
    }

    /// The config, read again if the file changed since the last read.
    fn config(&self) -> Result<std::sync::Arc<DockerConfig>, CredentialError> {
        let bad = |reason: String| CredentialError::Config {
            path: self.path.display().to_string(),
            reason,
        };
        let stamp = match std::fs::metadata(&self.path) {
            Ok(meta) => Some(FileStamp {
                modified: meta.modified().ok(),
                len: meta.len(),
                inode: meta.ino(),
                device: meta.dev(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(bad(e.to_string())),
        };
        // A poisoned lock only lost a cache: the state is rebuilt from the file.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((loaded, config)) = &state.loaded {
            if *loaded == stamp {
                return Ok(config.clone());
            }
        }
        let config = match &stamp {
            None => DockerConfig::default(),
            Some(_) => {
                let file = std::fs::File::open(&self.path).map_err(|e| bad(e.to_string()))?;
                let mut bytes = Vec::new();
                file.take(MAX_CONFIG_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| bad(e.to_string()))?;
                if bytes.len() as u64 > MAX_CONFIG_BYTES {
                    return Err(bad(format!("is larger than {MAX_CONFIG_BYTES} bytes")));
                }
                DockerConfig::parse(&self.path, &bytes)?
            }
        };
        debug!(path = %self.path.display(), present = stamp.is_some(), "docker config read");
        let config = std::sync::Arc::new(config);
        state.loaded = Some((stamp, config.clone()));
        // Which helper serves a host may have changed with the file.
        state.helper_answers.clear();
        Ok(config)
    }

    fn ask_helper(&self, helper: &HelperName, host: &str, server: &str) -> Result<Option<Credential>, CredentialError> {
        let key = (helper.as_str().to_string(), server.to_string());
        {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, answer)) = state.helper_answers.get(&key) {
                if at.elapsed() < HELPER_CACHE_TTL {
                    return Ok(answer.clone());
                }
            }
        }
        let program = self.find_helper(helper, host)?;
        let answer = run_helper(&program, helper, host, server, self.helper_timeout)?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.helper_answers.insert(key, (Instant::now(), answer.clone()));
        Ok(answer)
    }

    /// The helper's executable in the helper directories (or `PATH`).
    fn find_helper(&self, helper: &HelperName, host: &str) -> Result<PathBuf, CredentialError> {
        let dirs: Vec<PathBuf> = match &self.helper_dirs {
            Some(dirs) => dirs.clone(),
            None => std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).collect())
                .unwrap_or_default(),
        };
        let program = helper.program();
        dirs.iter()
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(&program))
            .find(|candidate| {
                std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(|| CredentialError::Helper {
                helper: helper.as_str().to_string(),
                host: host.to_string(),
                reason: format!("no executable {program} in the helper path"),
            })
    }
}

/// Runs `<program> get` with `server` on stdin, no shell, in its own process
/// group (killed whole at the timeout, so a helper's children cannot hold
/// its output open), reading at most [`MAX_HELPER_OUTPUT`] bytes.
fn run_helper(
    program: &Path,
    helper: &HelperName,
    host: &str,
    server: &str,
    timeout: Duration,
) -> Result<Option<Credential>, CredentialError> {
    let failed = |reason: String| CredentialError::Helper {
        helper: helper.as_str().to_string(),
        host: host.to_string(),
        reason,
    };
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // What a helper logs is not ours to keep: it could name a secret.
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| failed(format!("cannot start {}: {e}", program.display())))?;
    let pid = child.id();
    let kill_group = || {
        // The group is the child's own (process_group(0)): its id is the pid.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    // The server name is short: the pipe takes it without the helper reading.
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(server.as_bytes()))
        .unwrap_or(Ok(()));
    let Some(stdout) = child.stdout.take() else {
        kill_group();
        let _ = child.wait();
        return Err(failed("no output pipe".into()));
    };
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = stdout.take(MAX_HELPER_OUTPUT + 1).read_to_end(&mut out);
        let _ = send.send(read.map(|_| out));
    });
    let deadline = Instant::now() + timeout;
    let output = match receive.recv_timeout(timeout) {
        Ok(Ok(out)) if out.len() as u64 > MAX_HELPER_OUTPUT => {
            kill_group();
            let _ = child.wait();
            return Err(failed(format!("printed more than {MAX_HELPER_OUTPUT} bytes: refused")));
        }
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            kill_group();
            let _ = child.wait();
            return Err(failed(format!("reading its answer: {e}")));
        }
        Err(_) => {
            kill_group();
            let _ = child.wait();
            return Err(failed(format!("no answer within {timeout:?}: killed")));
        }
    };
    // The output is closed: the helper is exiting, give it the rest of the time.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                kill_group();
                let _ = child.wait();
                return Err(failed(format!("did not exit within {timeout:?}: killed")));
            }
            Err(e) => return Err(failed(format!("waiting for it: {e}"))),
        }
    };
    let text = String::from_utf8_lossy(&output);
    if !status.success() {
        // On failure the protocol puts the error message on stdout.
        let message = text.trim();
        if message.contains(NOT_FOUND) {
            debug!(helper = helper.as_str(), host, "credential helper has no credentials");
            return Ok(None);
        }
        let first_line: String = message.lines().next().unwrap_or_default().chars().take(200).collect();
        return Err(failed(format!("exited with {status}: {first_line}")));
    }
    if let Err(e) = written {
        // A helper may well not read stdin (it knows its server): only noted.
        warn!(helper = helper.as_str(), host, error = %e, "credential helper did not take the server name");
    }
    parse_helper_answer(&output).map_err(|reason| failed(reason.to_string()))
}

/// `{"ServerURL": .., "Username": .., "Secret": ..}`; `<token>` as the user
/// makes the secret an identity token. The reasons never quote a value.
fn parse_helper_answer(output: &[u8]) -> Result<Option<Credential>, &'static str> {
    let value: Value = serde_json::from_slice(output).map_err(|_| "its answer is not JSON")?;
    let field = |name: &str| match value.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err("its answer has a field that is not a string"),
    };
    if !value.is_object() {
        return Err("its answer is not a JSON object");
    }
    let (username, secret) = (field("Username")?, field("Secret")?);
    if secret.is_empty() {
        return Ok(None);
    }
    if username == TOKEN_USER {
        return Ok(Some(Credential::IdentityToken {
            username: String::new(),
            token: secret,
        }));
    }
    if username.is_empty() {
        return Err("its answer has a secret without a user name");
    }
    Ok(Some(Credential::Basic {
        username,
        password: secret,
    }))
}

/// The credentials one request gave, by the registry they are for: each
/// registry call of the request takes the ones of its reference's host
/// (the same repository first, when two were given for one host), or
/// none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestAuth {
    /// (host as [`server_key`] names it, repository, credentials).
    entries: Vec<(String, String, RegistryCredentials)>,
}

impl RequestAuth {
    /// Adds `credentials` for the registry of image `reference` (nothing
    /// when `None`, or when the reference does not parse: such a request
    /// fails before any registry call).
    pub fn with(mut self, reference: &str, credentials: Option<&RegistryCredentials>) -> RequestAuth {
        if let (Some(credentials), Some((host, repository))) = (credentials, host_and_repository(reference)) {
            self.entries.push((host, repository, credentials.clone()));
        }
        self
    }

    /// The auth for a call on image `reference`: anonymous when the request
    /// gave nothing for its host (the registry client may then ask the
    /// node's keychain).
    pub fn for_reference(&self, reference: &str) -> RegistryAuth {
        let Some((host, repository)) = host_and_repository(reference) else {
            return RegistryAuth::Anonymous;
        };
        self.entries
            .iter()
            .find(|(h, r, _)| *h == host && *r == repository)
            .or_else(|| self.entries.iter().find(|(h, _, _)| *h == host))
            .map_or(RegistryAuth::Anonymous, |(_, _, c)| c.to_auth())
    }
}

fn host_and_repository(reference: &str) -> Option<(String, String)> {
    let parsed = oci_client::Reference::try_from(reference).ok()?;
    Some((server_key(parsed.registry()), parsed.repository().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keychain(json: &str) -> (tempfile::TempDir, Keychain) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        let keychain = Keychain::new(&path).with_helper_dirs(vec![dir.path().join("no-helpers")]);
        (dir, keychain)
    }

    fn basic(user: &str, pass: &str) -> Option<RegistryAuth> {
        Some(RegistryAuth::Basic(user.into(), pass.into()))
    }

    #[test]
    fn base64_decodes_as_docker_writes_it() {
        assert_eq!(decode_base64("YWxpY2U6czNjcmV0").unwrap(), b"alice:s3cret");
        assert_eq!(decode_base64("YTpi").unwrap(), b"a:b");
        assert_eq!(decode_base64("YTpiYw==").unwrap(), b"a:bc");
        assert_eq!(decode_base64("YTpiYw").unwrap(), b"a:bc");
        assert_eq!(decode_base64("YTpiYzE=").unwrap(), b"a:bc1");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert!(decode_base64("YTpi!").is_none());
        assert!(decode_base64("Y").is_none());
        assert!(decode_base64("YQ===").is_none());
    }

    #[test]
    fn auth_entries_give_basic_credentials() {
        // "alice:s3cret:with:colons"
        let (_dir, keys) = keychain(
            r#"{"auths": {
                "registry.local:5000": {"auth": "YWxpY2U6czNjcmV0OndpdGg6Y29sb25z"},
                "ghcr.io": {"username": "bob", "password": "hunter2"}
            }}"#,
        );
        assert_eq!(
            keys.auth_for("registry.local:5000").unwrap(),
            basic("alice", "s3cret:with:colons")
        );
        assert_eq!(keys.auth_for("ghcr.io").unwrap(), basic("bob", "hunter2"));
        assert_eq!(keys.auth_for("quay.io").unwrap(), None);
        assert_eq!(
            keys.auth_for("registry.local").unwrap(),
            None,
            "the port is part of the host"
        );
    }

    #[test]
    fn identity_tokens_are_sent_as_the_basic_password() {
        let (_dir, keys) = keychain(
            r#"{"auths": {
                "acr.example.io": {"username": "00000000-0000-0000-0000-000000000000", "identitytoken": "refresh-1"},
                "other.example.io": {"auth": "dTpw", "identitytoken": "refresh-2"},
                "bare.example.io": {"identitytoken": "refresh-3"}
            }}"#,
        );
        assert_eq!(
            keys.credential_for("acr.example.io").unwrap(),
            Some(Credential::IdentityToken {
                username: "00000000-0000-0000-0000-000000000000".into(),
                token: "refresh-1".into()
            })
        );
        assert_eq!(
            keys.auth_for("acr.example.io").unwrap(),
            basic("00000000-0000-0000-0000-000000000000", "refresh-1")
        );
        assert_eq!(keys.auth_for("other.example.io").unwrap(), basic("u", "refresh-2"));
        assert_eq!(keys.auth_for("bare.example.io").unwrap(), basic("<token>", "refresh-3"));
    }

    #[test]
    fn url_shaped_keys_match_their_host() {
        let (_dir, keys) = keychain(
            r#"{"auths": {
                "https://registry.local:5000/v1/": {"username": "url", "password": "p1"},
                "http://plain.local/": {"username": "plain", "password": "p2"},
                "harbor.local/project": {"username": "path", "password": "p3"}
            }}"#,
        );
        assert_eq!(keys.auth_for("registry.local:5000").unwrap(), basic("url", "p1"));
        assert_eq!(keys.auth_for("plain.local").unwrap(), basic("plain", "p2"));
        assert_eq!(keys.auth_for("harbor.local").unwrap(), basic("path", "p3"));
        assert_eq!(keys.auth_for("registry.local").unwrap(), None);
    }

    #[test]
    fn an_exact_key_wins_over_a_url_of_the_same_host() {
        let (_dir, keys) = keychain(
            r#"{"auths": {
                "https://registry.local/v2/": {"username": "url", "password": "p1"},
                "registry.local": {"username": "exact", "password": "p2"}
            }}"#,
        );
        assert_eq!(keys.auth_for("registry.local").unwrap(), basic("exact", "p2"));
    }

    #[test]
    fn docker_hub_aliases_share_one_entry() {
        let (_dir, keys) = keychain(r#"{"auths": {"https://index.docker.io/v1/": {"auth": "aHViOnB3"}}}"#);
        for host in ["docker.io", "registry-1.docker.io", "index.docker.io", "Docker.IO"] {
            assert_eq!(keys.auth_for(host).unwrap(), basic("hub", "pw"), "{host}");
        }
        // An older key naming the hub by another name is the hub too.
        let (_dir, keys) = keychain(r#"{"auths": {"docker.io": {"auth": "aHViOnB3"}}}"#);
        assert_eq!(keys.auth_for("registry-1.docker.io").unwrap(), basic("hub", "pw"));
        assert_eq!(server_key("registry-1.docker.io"), DOCKER_HUB_SERVER);
        assert_eq!(server_key("ghcr.io"), "ghcr.io");
    }

    #[test]
    fn a_missing_file_is_anonymous() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keychain::new(dir.path().join("absent/config.json"));
        assert_eq!(keys.auth_for("ghcr.io").unwrap(), None);
    }

    #[test]
    fn empty_entries_as_docker_login_leaves_them_are_anonymous() {
        let (_dir, keys) = keychain(r#"{"auths": {"ghcr.io": {}, "quay.io": {"auth": ""}}}"#);
        assert_eq!(keys.auth_for("ghcr.io").unwrap(), None);
        assert_eq!(keys.auth_for("quay.io").unwrap(), None);
    }

    #[test]
    fn malformed_files_name_the_file_and_never_a_secret() {
        let cases = [
            r#"{"auths": {"ghcr.io": {"auth": "c2VjcmV0LXZhbHVl"}"#,
            r#"{"auths": "secret-value"}"#,
            r#"{"auths": {"ghcr.io": {"password": 12345678, "username": "u"}}}"#,
            r#"{"auths": {"ghcr.io": "secret-value"}}"#,
            r#"["secret-value"]"#,
            r#"{"credsStore": "../evil"}"#,
            r#"{"credHelpers": {"ghcr.io": "/bin/evil"}}"#,
        ];
        for json in cases {
            let (dir, keys) = keychain(json);
            let err = keys.auth_for("ghcr.io").unwrap_err().to_string();
            let path = dir.path().join("config.json").display().to_string();
            assert!(err.contains(&path), "{err}");
            assert!(!err.contains("secret-value") && !err.contains("12345678"), "{err}");
        }
        // Entries are checked when used: "auth" that is not user:password in base64.
        for auth in ["!!!notbase64", "bm9jb2xvbg=="] {
            let (_dir, keys) = keychain(&format!(r#"{{"auths": {{"ghcr.io": {{"auth": "{auth}"}}}}}}"#));
            let err = keys.auth_for("ghcr.io").unwrap_err().to_string();
            assert!(err.contains("auths.ghcr.io.auth"), "{err}");
            assert!(!err.contains(auth) && !err.contains("nocolon"), "{err}");
        }
        let (_dir, keys) = keychain(r#"{"auths": {"ghcr.io": {"username": "u"}}}"#);
        assert!(keys.auth_for("ghcr.io").is_err());
    }

    #[test]
    fn a_bad_entry_breaks_only_its_own_host() {
        let (_dir, keys) = keychain(
            r#"{"auths": {
                "bad.local": {"username": "u", "password": 12345678},
                "odd.local": "secret-value",
                "good.local": {"username": "u", "password": "p"}
            }, "credHelpers": {"evil.local": "../evil"}}"#,
        );
        assert_eq!(keys.auth_for("good.local").unwrap(), basic("u", "p"));
        for (host, key) in [
            ("bad.local", "auths.bad.local.password"),
            ("odd.local", "auths.odd.local"),
            ("evil.local", "credHelpers.evil.local"),
        ] {
            let err = keys.auth_for(host).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            assert!(!err.contains("12345678") && !err.contains("secret-value"), "{err}");
        }
    }

    #[test]
    fn helper_names_cannot_name_a_path() {
        for good in [
            "ecr-login",
            "gcloud",
            "desktop",
            "osxkeychain",
            "pass",
            "secret_service",
            "v1.2",
        ] {
            assert_eq!(
                HelperName::parse(good).unwrap().program(),
                format!("docker-credential-{good}")
            );
        }
        for bad in [
            "", ".", "..", "../x", "a/b", "/bin/sh", "a..b", "x y", "x;rm", "é", "a\0b",
        ] {
            assert!(
                matches!(HelperName::parse(bad), Err(CredentialError::HelperName { .. })),
                "{bad:?}"
            );
        }
        assert!(HelperName::parse(&"a".repeat(101)).is_err());
    }

    #[test]
    fn a_missing_helper_is_an_error_naming_it() {
        let (_dir, keys) = keychain(r#"{"credsStore": "nothere", "auths": {"ghcr.io": {"auth": "dTpw"}}}"#);
        let err = keys.auth_for("ghcr.io").unwrap_err();
        assert!(
            matches!(&err, CredentialError::Helper { helper, host, .. } if helper == "nothere" && host == "ghcr.io"),
            "{err}"
        );
    }

    #[test]
    fn helper_answers_parse_per_the_protocol() {
        let answer = |json: &str| parse_helper_answer(json.as_bytes());
        assert_eq!(
            answer(r#"{"ServerURL":"ghcr.io","Username":"u","Secret":"p"}"#).unwrap(),
            Some(Credential::Basic {
                username: "u".into(),
                password: "p".into()
            })
        );
        assert_eq!(
            answer(r#"{"ServerURL":"ghcr.io","Username":"<token>","Secret":"t"}"#).unwrap(),
            Some(Credential::IdentityToken {
                username: String::new(),
                token: "t".into()
            })
        );
        assert_eq!(
            answer(r#"{"ServerURL":"ghcr.io","Username":"","Secret":""}"#).unwrap(),
            None
        );
        for bad in [
            "not json TOPSECRET",
            r#"{"Username":"u","Secret":7}"#,
            r#"["TOPSECRET"]"#,
            r#"{"Username":"","Secret":"TOPSECRET"}"#,
        ] {
            let reason = answer(bad).unwrap_err();
            assert!(!reason.contains("TOPSECRET"), "{reason}");
        }
    }

    #[test]
    fn request_credentials_parse_and_never_show() {
        let c = RegistryCredentials::parse("--target-creds", "alice:pa:ss").unwrap();
        assert_eq!((c.username(), c.password()), ("alice", "pa:ss"));
        let shown = format!("{c:?}");
        assert!(shown.contains("alice") && !shown.contains("pa:ss"), "{shown}");
        for bad in ["alicesecret", ":pwsecret", "alice:", "a\nb:csecret", "a:bsecret\u{7}"] {
            let err = RegistryCredentials::parse("--target-creds", bad)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("credentials --target-creds: "), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
        let token = Credential::IdentityToken {
            username: "u".into(),
            token: "refresh-secret".into(),
        };
        assert!(!format!("{token:?}").contains("refresh-secret"));
    }

    #[test]
    fn the_rest_form_is_an_object_and_refusals_quote_nothing() {
        let c: RegistryCredentials = serde_json::from_str(r#"{"username":"alice","password":"s3cret"}"#).unwrap();
        assert_eq!((c.username(), c.password()), ("alice", "s3cret"));
        for bad in [
            r#""alice:TOPSECRET""#,
            r#"{"username":"alice","password":12345678}"#,
            r#"{"username":"alice","password":true}"#,
            r#"{"username":"alice"}"#,
            r#"{"password":"TOPSECRET"}"#,
            r#"{"username":"alice","password":"TOPSECRET","extra":"x"}"#,
            r#"{"username":"alice","password":["TOPSECRET"]}"#,
            r#"12345678"#,
        ] {
            let err = serde_json::from_str::<RegistryCredentials>(bad)
                .unwrap_err()
                .to_string();
            assert!(!err.contains("TOPSECRET") && !err.contains("12345678"), "{bad}: {err}");
        }
    }

    #[test]
    fn credential_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "alice:s3cret\nignored\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = RegistryCredentials::read_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("mode 0644") && err.contains(&path.display().to_string()),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = RegistryCredentials::read_file(&path).unwrap();
        assert_eq!((c.username(), c.password()), ("alice", "s3cret"));
        std::fs::write(&path, "no-colon-secret\n").unwrap();
        let err = RegistryCredentials::read_file(&path).unwrap_err().to_string();
        assert!(!err.contains("no-colon-secret"), "{err}");
    }

    #[test]
    fn request_auth_goes_by_host_then_repository() {
        let target = RegistryCredentials::parse("t", "tu:tp").unwrap();
        let source = RegistryCredentials::parse("s", "su:sp").unwrap();
        let auth = RequestAuth::default()
            .with("registry.local:5000/app:v2", Some(&target))
            .with("registry.local:5000/base:1", Some(&source))
            .with("docker.io/library/busybox:latest", None);
        assert_eq!(
            auth.for_reference("registry.local:5000/app:v1"),
            RegistryAuth::Basic("tu".into(), "tp".into())
        );
        assert_eq!(
            auth.for_reference(
                "registry.local:5000/base@sha256:0000000000000000000000000000000000000000000000000000000000000000"
            ),
            RegistryAuth::Basic("su".into(), "sp".into())
        );
        assert_eq!(
            auth.for_reference("registry.local:5000/other:1"),
            RegistryAuth::Basic("tu".into(), "tp".into())
        );
        assert_eq!(auth.for_reference("busybox:latest"), RegistryAuth::Anonymous);
        assert_eq!(auth.for_reference("ghcr.io/x/y:1"), RegistryAuth::Anonymous);
        let hub = RequestAuth::default().with("busybox", Some(&target));
        assert_eq!(
            hub.for_reference("registry-1.docker.io/library/busybox:1"),
            RegistryAuth::Basic("tu".into(), "tp".into())
        );
    }
}
