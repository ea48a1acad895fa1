//! Trust in the container record a checkpoint carries: the spec, runtime
//! and runtime options restore recreates the container from.
//!
//! Bytes do not become trusted by where they were found: an archive given
//! to `import`, an object of shared S3/NFS storage or a checkpoint streamed
//! from another node may hold any record, and a record is a root-equivalent
//! instruction to runc (hooks run on the host, a bind mount of `/`, a
//! runtime binary of its choosing). Trust comes from a key instead:
//!
//! - Every record this daemon writes is sealed: an HMAC-SHA256 under the
//!   node key (32 random bytes in `<root>/record.key`, created 0600 on first
//!   start; a key file others may read refuses the start) over the record's
//!   canonical JSON, stored in the record's `seal` field with the key's id
//!   (a short hash of the key). The seal travels inside the record blob, so
//!   it survives export/import, shared storage and streaming to a node.
//! - Operators trust other nodes by listing copies of their `record.key` in
//!   `[checkpoint] trusted_record_keys` (each 0600). HMAC keys are shared
//!   secrets: a node that holds another's key can seal records the other
//!   trusts, which is what listing it means.
//! - A record whose seal verifies under a trusted key restores as the
//!   original container was. Any other record (none, a bad seal, an unknown
//!   key) is checked by [`untrusted_refusals`] and restores only what an
//!   ordinary container of its image may have; what it may not have is
//!   refused with the field named, unless the restore request opts in
//!   (`checkpointctl restore --trust-record`), which applies it with a
//!   warning.
//!
//! For an untrusted record, **kept** as recorded: process args, env, cwd,
//! user, rlimits, terminal, hostname, cgroup resources (limits of its own
//! cgroup), its image, labels and snapshot. **Rebuilt** (never taken from
//! the record): `linux.cgroupsPath` (`/<namespace>/<id>`, or
//! `<slice>:<prefix>:<id>` for systemd paths with plain names), annotations
//! (dropped: runc reads `org.criu.config` and `org.systemd.property.*`),
//! `linux.maskedPaths` and `linux.readonlyPaths` (containerd's defaults are
//! always added). **Refused**: hooks; capabilities beyond containerd's
//! default set; a negative `oomScoreAdj`; AppArmor `unconfined`; a seccomp
//! profile that allows everything or names a listener; a namespace joined by
//! path or a missing one (a host namespace); `linux.devices`; device cgroup
//! rules beyond containerd's default devices; sysctls that are not
//! namespaced; shared rootfs propagation; a root other than the bundle's
//! `rootfs`; mounts that are not in `[checkpoint] untrusted_mounts` (by
//! default the pseudo-filesystems of containerd's default spec, no host
//! path); a runtime other than runc's shim; runc options that name a binary
//! or a path (`BinaryName`, `Root`, `CriuPath`, `ShimCgroup`, ...) or drop
//! pivot_root; any key that is not ASCII or spells one of the fields above
//! in another case (runc's Go decoder ignores case, so `"Hooks"` are hooks).
//!
//! A spec without a seccomp or AppArmor profile is not refused: containerd's
//! own `ctr run` makes such containers by default.
//!
//! This module owns keys, seals and the policy; it never creates a
//! container and never touches a tree.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::process::ContainerRecord;
use crate::config::AllowedMount;
use crate::host::criu::RuncOptions;

/// The node key's file under the daemon root.
pub const NODE_KEY_FILE: &str = "record.key";
const KEY_LEN: usize = 32;
/// What the HMAC covers starts with this, so that no other use of a key can
/// produce a record's seal.
const SEAL_CONTEXT: &[u8] = b"seamless container record v1\n";
const KEY_ID_CONTEXT: &[u8] = b"seamless record key id\n";

/// containerd's default capabilities (`oci.WithDefaultSpec`).
const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];
/// containerd's default masked and read-only paths.
const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];
const DEFAULT_READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];
/// Namespaces an ordinary container has of its own; a spec without one
/// shares the host's.
const OWN_NAMESPACES: &[&str] = &["pid", "ipc", "uts", "mount", "network"];
/// Character devices containerd allows every container (null, zero, full,
/// random, urandom, tty, console, ptmx, tun; 136 is any pty).
const DEFAULT_DEVICES: &[(i64, Option<i64>)] = &[
    (1, Some(3)),
    (1, Some(5)),
    (1, Some(7)),
    (1, Some(8)),
    (1, Some(9)),
    (5, Some(0)),
    (5, Some(1)),
    (5, Some(2)),
    (10, Some(200)),
    (136, None),
];
/// Sysctl prefixes the kernel namespaces (runc's own list): only these
/// change the container's namespaces rather than the host.
const NAMESPACED_SYSCTLS: &[&str] = &["kernel.msg", "kernel.sem", "kernel.shm", "fs.mqueue.", "net."];
const NAMESPACED_SYSCTL_NAMES: &[&str] = &["kernel.hostname", "kernel.domainname"];
const RUNC_RUNTIMES: &[&str] = &["io.containerd.runc.v2", "io.containerd.runc.v1"];
const HOOK_KINDS: &[&str] = &[
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// Every field of the spec the policy reads or rebuilds, as runc spells it
/// (with [`HOOK_KINDS`], the keys under `hooks`).
const POLICY_FIELDS: &[&str] = &[
    "hooks",
    "process",
    "capabilities",
    "bounding",
    "effective",
    "inheritable",
    "permitted",
    "ambient",
    "oomScoreAdj",
    "apparmorProfile",
    "selinuxLabel",
    "root",
    "path",
    "linux",
    "namespaces",
    "type",
    "devices",
    "resources",
    "allow",
    "access",
    "major",
    "minor",
    "sysctl",
    "rootfsPropagation",
    "seccomp",
    "defaultAction",
    "syscalls",
    "listenerPath",
    "mounts",
    "destination",
    "source",
    "options",
    "cgroupsPath",
    "annotations",
    "maskedPaths",
    "readonlyPaths",
];

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("record key {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("record key {path} has mode {mode:04o}: it must be readable by its owner only (chmod 600 {path})")]
    LooseMode { path: String, mode: u32 },
    #[error("record key {path} is owned by uid {uid}, not by the daemon's uid {daemon}")]
    Owner { path: String, uid: u32, daemon: u32 },
    #[error("record key {path} is not a regular file")]
    NotAFile { path: String },
    #[error("record key {path} holds {len} bytes, not {KEY_LEN}")]
    Length { path: String, len: usize },
    #[error("container record cannot be sealed: {0}")]
    Seal(String),
    #[error(
        "untrusted checkpoint record ({why}): {}; restore with --trust-record to apply the record as it is",
        .refusals.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Refused { why: String, refusals: Vec<Refusal> },
}

/// One field of an untrusted record that restore will not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Where in the record, e.g. `spec.hooks.prestart`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not allowed ({})", self.field, self.reason)
    }
}

/// The authentication of a record: which key sealed it, and the HMAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSeal {
    /// [`RecordKey::id`] of the key that sealed the record.
    pub key_id: String,
    /// Hex of HMAC-SHA256 over the record's canonical JSON without its seal.
    pub hmac_sha256: String,
}

/// A 32-byte HMAC key and its id.
#[derive(Clone)]
pub struct RecordKey {
    id: String,
    bytes: [u8; KEY_LEN],
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        f.debug_struct("RecordKey").field("id", &self.id).finish()
    }
}

impl RecordKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> RecordKey {
        let mut hasher = Sha256::new();
        hasher.update(KEY_ID_CONTEXT);
        hasher.update(bytes);
        let id = crate::oci::digest::hex(&hasher.finalize()[..8]);
        RecordKey { id, bytes }
    }

    /// A short hash of the key: names it in a seal without revealing it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// HMAC-SHA256 of the record's canonical bytes, ready to finish or
    /// verify.
    fn mac(&self, record: &ContainerRecord) -> Result<Hmac<Sha256>, TrustError> {
        // Any key length is valid for HMAC: this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes).expect("HMAC takes keys of any length");
        mac.update(SEAL_CONTEXT);
        mac.update(&canonical_bytes(record)?);
        Ok(mac)
    }
}

/// Whether a record may be applied as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Sealed by the key of this id, which this node trusts.
    Trusted { key_id: String },
    /// Not sealed by a trusted key; why.
    Untrusted { why: String },
}

/// The keys this node seals with and trusts, and what it allows untrusted
/// records.
#[derive(Debug, Clone)]
pub struct RecordTrust {
    node: RecordKey,
    others: Vec<RecordKey>,
    untrusted_mounts: Vec<AllowedMount>,
}

impl RecordTrust {
    /// Reads (or on first start creates) `<root>/record.key` and the
    /// trusted keys of other nodes.
    pub fn load(
        root: &Path,
        trusted_key_files: &[PathBuf],
        untrusted_mounts: Vec<AllowedMount>,
    ) -> Result<RecordTrust, TrustError> {
        let node = load_or_create_node_key(&root.join(NODE_KEY_FILE))?;
        let others = trusted_key_files
            .iter()
            .map(|path| read_key(path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecordTrust::new(node, others, untrusted_mounts))
    }

    pub fn new(node: RecordKey, others: Vec<RecordKey>, untrusted_mounts: Vec<AllowedMount>) -> RecordTrust {
        RecordTrust {
            node,
            others,
            untrusted_mounts,
        }
    }

    pub fn node_key_id(&self) -> &str {
        self.node.id()
    }

    pub fn untrusted_mounts(&self) -> &[AllowedMount] {
        &self.untrusted_mounts
    }

    /// Seals `record` with the node key (replacing any seal it had).
    pub fn seal(&self, record: &mut ContainerRecord) -> Result<(), TrustError> {
        record.seal = None;
        let mac = self.node.mac(record)?;
        record.seal = Some(RecordSeal {
            key_id: self.node.id.clone(),
            hmac_sha256: crate::oci::digest::hex(&mac.finalize().into_bytes()),
        });
        Ok(())
    }

    pub fn verify(&self, record: &ContainerRecord) -> Verdict {
        let Some(seal) = &record.seal else {
            return Verdict::Untrusted {
                why: "it carries no seal".into(),
            };
        };
        let Some(key) = std::iter::once(&self.node)
            .chain(&self.others)
            .find(|k| k.id == seal.key_id)
        else {
            return Verdict::Untrusted {
                why: format!("sealed by key {}, which this node does not trust", seal.key_id),
            };
        };
        let unsealed = ContainerRecord {
            seal: None,
            ..record.clone()
        };
        // verify_slice compares in constant time.
        let verified = match (key.mac(&unsealed), crate::oci::digest::unhex(&seal.hmac_sha256)) {
            (Ok(mac), Some(given)) => mac.verify_slice(&given).is_ok(),
            _ => false,
        };
        if verified {
            Verdict::Trusted { key_id: key.id.clone() }
        } else {
            Verdict::Untrusted {
                why: format!("its seal does not verify under key {}: the record was altered", key.id),
            }
        }
    }
}

/// How restore takes a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// Sealed by a trusted key: applied as recorded.
    Sealed { key_id: String },
    /// Not trusted, but holding nothing an ordinary container may not have:
    /// applied with what [`rebuild_untrusted`] makes again.
    Rebuilt { why: String },
    /// Not trusted, and applied as recorded because the request said so.
    ForcedByRequest { why: String },
}

impl RecordTrust {
    /// Decides how `record` (of a checkpoint in `namespace`) is restored:
    /// as recorded when sealed by a trusted key or when `apply_untrusted`,
    /// otherwise rebuilt, or refused naming every field it may not have.
    pub fn admit(
        &self,
        record: &mut ContainerRecord,
        namespace: &str,
        apply_untrusted: bool,
    ) -> Result<Admitted, TrustError> {
        let why = match self.verify(record) {
            Verdict::Trusted { key_id } => return Ok(Admitted::Sealed { key_id }),
            Verdict::Untrusted { why } => why,
        };
        if apply_untrusted {
            return Ok(Admitted::ForcedByRequest { why });
        }
        let refusals = untrusted_refusals(record, &self.untrusted_mounts);
        if !refusals.is_empty() {
            return Err(TrustError::Refused { why, refusals });
        }
        rebuild_untrusted(record, namespace);
        Ok(Admitted::Rebuilt { why })
    }
}

/// The record without its seal as canonical JSON: object keys sorted at
/// every level, no whitespace, whatever order the bytes came in.
fn canonical_bytes(record: &ContainerRecord) -> Result<Vec<u8>, TrustError> {
    let mut value = serde_json::to_value(record).map_err(|e| TrustError::Seal(e.to_string()))?;
    if let Some(object) = value.as_object_mut() {
        object.remove("seal");
    }
    let mut out = Vec::new();
    write_canonical(&value, &mut out).map_err(|e| TrustError::Seal(e.to_string()))?;
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (n, key) in keys.into_iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_canonical(&map[key], out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TrustError {
    let path = path.display().to_string();
    move |source| TrustError::Io { op, path, source }
}

/// Reads a key file: a regular file of the daemon's user, mode 0600 or
/// stricter, holding exactly 32 bytes.
fn read_key(path: &Path) -> Result<RecordKey, TrustError> {
    let shown = path.display().to_string();
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    match crate::host::private_file::check(&meta) {
        Ok(()) => {}
        Err(crate::host::private_file::PrivateFileError::Exposed { mode }) => {
            return Err(TrustError::LooseMode { path: shown, mode })
        }
        Err(_) => return Err(TrustError::NotAFile { path: shown }),
    }
    let daemon = nix::unistd::geteuid().as_raw();
    if meta.uid() != daemon {
        return Err(TrustError::Owner {
            path: shown,
            uid: meta.uid(),
            daemon,
        });
    }
    let mut bytes = Vec::with_capacity(KEY_LEN + 1);
    Read::by_ref(&mut file)
        .take(KEY_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| TrustError::Length {
        path: shown,
        len: bytes.len(),
    })?;
    Ok(RecordKey::from_bytes(key))
}

/// The node key at `path`, made on first start: written whole to a
/// temporary and linked into place, so a crash never leaves a short key and
/// two starts never make two keys.
fn load_or_create_node_key(path: &Path) -> Result<RecordKey, TrustError> {
    match fs::symlink_metadata(path) {
        Ok(_) => return read_key(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", path)(e)),
    }
    let mut bytes = [0u8; KEY_LEN];
    fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(io_err("read random bytes for", path))?;
    let temporary = path.with_extension(format!("key.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&temporary);
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::hard_link(&temporary, path)
    })();
    let _ = fs::remove_file(&temporary);
    match written {
        Ok(()) => {
            tracing::info!(path = %path.display(), key_id = %RecordKey::from_bytes(bytes).id, "node record key created");
            Ok(RecordKey::from_bytes(bytes))
        }
        // Another start made it first: use that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(path),
        Err(e) => Err(io_err("create", path)(e)),
    }
}

/// Everything an untrusted record holds that an ordinary container of its
/// image may not have; empty if it may be restored (after
/// [`rebuild_untrusted`]).
pub fn untrusted_refusals(record: &ContainerRecord, mounts: &[AllowedMount]) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    let mut refuse = |field: String, reason: String| refusals.push(Refusal { field, reason });
    if !is_container_id(&record.id) {
        refuse("id".into(), format!("{:?} is not a container id", record.id));
    }
    if !RUNC_RUNTIMES.contains(&record.runtime_name.as_str()) {
        refuse(
            "runtime.name".into(),
            format!(
                "{:?} is not runc's shim ({})",
                record.runtime_name,
                RUNC_RUNTIMES.join(", ")
            ),
        );
    }
    check_runtime_options(record, &mut refuse);
    let spec = &record.spec;
    if !spec.is_object() {
        refuse("spec".into(), "not a JSON object".into());
        return refusals;
    }
    match spec.pointer("/root/path").and_then(Value::as_str) {
        Some("rootfs") => {}
        other => refuse(
            "spec.root.path".into(),
            format!("{other:?} is not the bundle's rootfs: a host path as the root"),
        ),
    }
    if let Some(hooks) = spec.get("hooks").filter(|h| !h.is_null()) {
        match hooks.as_object() {
            Some(map) => {
                for (kind, list) in map {
                    let empty = list.is_null() || list.as_array().is_some_and(Vec::is_empty);
                    if !empty {
                        let known = if HOOK_KINDS.contains(&kind.as_str()) {
                            ""
                        } else {
                            "unknown "
                        };
                        refuse(
                            format!("spec.hooks.{kind}"),
                            format!("{known}OCI hooks run commands on the host"),
                        );
                    }
                }
            }
            None => refuse("spec.hooks".into(), "not an object".into()),
        }
    }
    check_spelling(spec, "spec", &mut refuse);
    check_process(spec, &mut refuse);
    check_linux(spec, &mut refuse);
    check_mounts(spec, mounts, &mut refuse);
    refusals
}

/// Refuses keys that read differently here and in runc: Go's JSON decoder
/// matches struct fields without regard to case (and with Unicode folding),
/// so `"Hooks"` or a `hoo\u{212a}s` with a Kelvin sign are hooks to runc while
/// the checks here look for `"hooks"`. A key is refused when it is not ASCII,
/// or when it spells a field the policy reads in another case. Annotations
/// are dropped whole and not walked.
fn check_spelling(value: &Value, at: &str, refuse: &mut impl FnMut(String, String)) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let field = format!("{at}.{key}");
                if !key.is_ascii() {
                    refuse(field, "a key that is not ASCII".into());
                    continue;
                }
                if let Some(canonical) = POLICY_FIELDS
                    .iter()
                    .chain(HOOK_KINDS)
                    .find(|c| c.eq_ignore_ascii_case(key) && **c != key.as_str())
                {
                    refuse(field, format!("runc reads {key:?} as {canonical:?}"));
                    continue;
                }
                if at == "spec" && key == "annotations" {
                    continue;
                }
                check_spelling(inner, &field, refuse);
            }
        }
        Value::Array(items) => {
            for (n, item) in items.iter().enumerate() {
                check_spelling(item, &format!("{at}[{n}]"), refuse);
            }
        }
        _ => {}
    }
}

fn check_runtime_options(record: &ContainerRecord, refuse: &mut impl FnMut(String, String)) {
    use prost::Message;
    let Some(options) = record.runtime_options() else {
        if !record.runtime_options.is_empty() && crate::oci::digest::unhex(&record.runtime_options).is_none() {
            refuse("runtime.options".into(), "not hex".into());
        }
        return;
    };
    if options.value.is_empty() {
        return;
    }
    if !options.type_url.ends_with(crate::host::criu::RUNC_OPTIONS_TYPE) {
        refuse(
            "runtime.options".into(),
            format!("options of type {:?} are not runc's", options.type_url),
        );
        return;
    }
    let decoded = match RuncOptions::decode(options.value.as_slice()) {
        Ok(decoded) => decoded,
        Err(e) => {
            refuse("runtime.options".into(), format!("not runc options: {e}"));
            return;
        }
    };
    for (field, value) in [
        ("BinaryName", &decoded.binary_name),
        ("Root", &decoded.root),
        ("CriuPath", &decoded.criu_path),
        ("ShimCgroup", &decoded.shim_cgroup),
        ("CriuImagePath", &decoded.criu_image_path),
        ("CriuWorkPath", &decoded.criu_work_path),
    ] {
        if !value.is_empty() {
            refuse(
                format!("runtime.options.{field}"),
                format!("{value:?} names a host binary or path"),
            );
        }
    }
    if decoded.no_pivot_root {
        refuse(
            "runtime.options.NoPivotRoot".into(),
            "without pivot_root the host's root stays reachable".into(),
        );
    }
}

fn check_process(spec: &Value, refuse: &mut impl FnMut(String, String)) {
    let Some(process) = spec.get("process") else {
        return;
    };
    if let Some(capabilities) = process.get("capabilities").and_then(Value::as_object) {
        for (set, caps) in capabilities {
            let beyond: Vec<&str> = caps
                .as_array()
                .map(|caps| caps.iter().map(|c| c.as_str().unwrap_or("?")).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .filter(|c| !DEFAULT_CAPABILITIES.contains(c))
                .collect();
            if !beyond.is_empty() {
                refuse(
                    format!("spec.process.capabilities.{set}"),
                    format!("{} beyond containerd's default set", beyond.join(", ")),
                );
            }
        }
    }
    if process
        .get("oomScoreAdj")
        .and_then(Value::as_i64)
        .is_some_and(|v| v < 0)
    {
        refuse(
            "spec.process.oomScoreAdj".into(),
            "a negative score shields the container from the OOM killer".into(),
        );
    }
    if process.get("apparmorProfile").and_then(Value::as_str) == Some("unconfined") {
        refuse("spec.process.apparmorProfile".into(), "AppArmor disabled".into());
    }
    if process
        .get("selinuxLabel")
        .and_then(Value::as_str)
        .is_some_and(|l| l.contains("spc_t") || l.contains("unconfined_t"))
    {
        refuse(
            "spec.process.selinuxLabel".into(),
            "SELinux confinement disabled".into(),
        );
    }
}

fn check_linux(spec: &Value, refuse: &mut impl FnMut(String, String)) {
    let linux = spec.get("linux").unwrap_or(&Value::Null);
    let namespaces = linux["namespaces"].as_array().cloned().unwrap_or_default();
    for namespace in &namespaces {
        let kind = namespace["type"].as_str().unwrap_or("?");
        if let Some(path) = namespace["path"].as_str().filter(|p| !p.is_empty()) {
            refuse(
                format!("spec.linux.namespaces[{kind}].path"),
                format!("joining the namespace at {path} shares one outside the container"),
            );
        }
    }
    for own in OWN_NAMESPACES {
        if !namespaces.iter().any(|n| n["type"] == *own) {
            refuse(
                "spec.linux.namespaces".into(),
                format!("no {own} namespace: the container would share the host's"),
            );
        }
    }
    if linux["devices"].as_array().is_some_and(|d| !d.is_empty()) {
        refuse("spec.linux.devices".into(), "host devices in the container".into());
    }
    for (n, rule) in linux["resources"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if rule["allow"] != Value::Bool(true) {
            continue;
        }
        let access = rule["access"].as_str().unwrap_or("rwm");
        let default_device = rule["type"] == "c"
            && DEFAULT_DEVICES.iter().any(|(major, minor)| {
                rule["major"].as_i64() == Some(*major) && (rule["minor"].as_i64() == *minor || minor.is_none())
            });
        // A rule of mknod alone opens nothing: using a node needs r or w.
        if access != "m" && !default_device {
            refuse(
                format!("spec.linux.resources.devices[{n}]"),
                format!("allows device {} beyond containerd's default devices", compact(rule)),
            );
        }
    }
    for key in linux["sysctl"].as_object().into_iter().flat_map(|m| m.keys()) {
        let namespaced =
            NAMESPACED_SYSCTLS.iter().any(|p| key.starts_with(p)) || NAMESPACED_SYSCTL_NAMES.contains(&key.as_str());
        if !namespaced {
            refuse(
                format!("spec.linux.sysctl.{key}"),
                "not a namespaced sysctl: it would change the host".into(),
            );
        }
    }
    if let Some(propagation) = linux["rootfsPropagation"].as_str().filter(|p| p.contains("shared")) {
        refuse(
            "spec.linux.rootfsPropagation".into(),
            format!("{propagation} propagation reaches the host's mounts"),
        );
    }
    if let Some(seccomp) = linux.get("seccomp").filter(|s| !s.is_null()) {
        let allows_all =
            seccomp["defaultAction"] == "SCMP_ACT_ALLOW" && seccomp["syscalls"].as_array().is_none_or(Vec::is_empty);
        if allows_all {
            refuse(
                "spec.linux.seccomp".into(),
                "a profile that allows every system call".into(),
            );
        }
        if seccomp["listenerPath"].as_str().is_some_and(|p| !p.is_empty()) {
            refuse(
                "spec.linux.seccomp.listenerPath".into(),
                "a host socket deciding system calls".into(),
            );
        }
    }
}

fn check_mounts(spec: &Value, allowed: &[AllowedMount], refuse: &mut impl FnMut(String, String)) {
    for (n, mount) in spec["mounts"].as_array().into_iter().flatten().enumerate() {
        let destination = mount["destination"].as_str().unwrap_or_default();
        let source = mount["source"].as_str().unwrap_or_default();
        let options: Vec<&str> = mount["options"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        // runc binds whatever the type says when the options say bind.
        let kind = if options.iter().any(|o| *o == "bind" || *o == "rbind") {
            "bind"
        } else {
            mount["type"].as_str().unwrap_or_default()
        };
        let field = format!("spec.mounts[{n}] ({destination})");
        let permitted = allowed
            .iter()
            .any(|a| a.destination == destination && a.kind == kind && a.permits_source(source));
        if !permitted {
            let what = if source.starts_with('/') {
                format!("host path {source}")
            } else {
                format!("{kind} {source:?}")
            };
            refuse(
                field,
                format!("{what} mounted as {kind} is not in [checkpoint] untrusted_mounts"),
            );
            continue;
        }
        let writable_kernel_view = matches!(kind, "sysfs" | "cgroup" | "cgroup2") && !options.contains(&"ro");
        if writable_kernel_view || options.iter().any(|o| o.contains("shared")) {
            refuse(
                field,
                format!("{kind} must be mounted read-only and not shared (options {options:?})"),
            );
        }
    }
}

fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// containerd's rule for container ids.
fn is_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 76
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn is_plain_unit_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'@'))
}

/// What restore never takes from an untrusted record, made again: the
/// cgroup path from the namespace and the record's id, annotations dropped,
/// containerd's masked and read-only paths added.
pub fn rebuild_untrusted(record: &mut ContainerRecord, namespace: &str) {
    let id = record.id.clone();
    let Some(spec) = record.spec.as_object_mut() else {
        return;
    };
    spec.remove("annotations");
    let linux = spec.entry("linux").or_insert_with(|| Value::Object(Default::default()));
    let Some(linux) = linux.as_object_mut() else {
        return;
    };
    if let Some(old) = linux.get("cgroupsPath").and_then(Value::as_str) {
        let rebuilt = match old.split(':').collect::<Vec<_>>().as_slice() {
            // systemd's "slice:prefix:name": the scope it makes is new
            // whatever slice it sits in.
            [slice, prefix, _] if !old.starts_with('/') => {
                let slice = Some(*slice)
                    .filter(|s| is_plain_unit_name(s) && s.ends_with(".slice"))
                    .unwrap_or("system.slice");
                let prefix = Some(*prefix).filter(|p| is_plain_unit_name(p)).unwrap_or("seamless");
                format!("{slice}:{prefix}:{id}")
            }
            _ => format!("/{namespace}/{id}"),
        };
        linux.insert("cgroupsPath".into(), Value::String(rebuilt));
    }
    for (key, defaults) in [
        ("maskedPaths", DEFAULT_MASKED_PATHS),
        ("readonlyPaths", DEFAULT_READONLY_PATHS),
    ] {
        let mut paths: Vec<Value> = linux
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(Value::is_string)
            .collect();
        for default in defaults {
            if !paths.iter().any(|p| p == default) {
                paths.push(Value::String((*default).into()));
            }
        }
        linux.insert(key.into(), Value::Array(paths));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::*;

    fn default_mounts() -> Vec<AllowedMount> {
        crate::config::CheckpointConfig::default().untrusted_mounts
    }

    /// What `ctr run` records for an ordinary container.
    fn ordinary_spec() -> Value {
        json!({
            "ociVersion": "1.0.2-dev",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": ["sh", "-c", "sleep 1000"],
                "env": ["PATH=/usr/bin:/bin"],
                "cwd": "/",
                "capabilities": {
                    "bounding": DEFAULT_CAPABILITIES,
                    "effective": DEFAULT_CAPABILITIES,
                    "permitted": DEFAULT_CAPABILITIES
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs"},
            "hostname": "web",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
            ],
            "linux": {
                "resources": {"devices": [
                    {"allow": false, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 136, "access": "rwm"},
                    {"allow": true, "type": "c", "access": "m"}
                ]},
                "cgroupsPath": "/default/web",
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"]
            }
        })
    }

    fn record(spec: Value) -> ContainerRecord {
        ContainerRecord {
            id: "web".into(),
            image: "registry.local/web:1".into(),
            labels: Default::default(),
            snapshotter: "seamless".into(),
            snapshot_parent: "sha256:abc".into(),
            runtime_name: "io.containerd.runc.v2".into(),
            runtime_options_type: String::new(),
            runtime_options: String::new(),
            spec_type: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
            spec,
            process_identity: "42:1000".into(),
            seal: None,
        }
    }

    fn key(byte: u8) -> RecordKey {
        RecordKey::from_bytes([byte; KEY_LEN])
    }

    fn trust(others: Vec<RecordKey>) -> RecordTrust {
        RecordTrust::new(key(1), others, default_mounts())
    }

    /// The record as stored and read back, as restore sees it.
    fn stored(record: &ContainerRecord) -> Vec<u8> {
        serde_json::to_vec(record).unwrap()
    }

    fn read_back(bytes: &[u8]) -> ContainerRecord {
        serde_json::from_slice(bytes).unwrap()
    }

    fn refused_fields(spec: Value) -> Vec<String> {
        untrusted_refusals(&record(spec), &default_mounts())
            .into_iter()
            .map(|r| r.field)
            .collect()
    }

    #[test]
    fn a_record_sealed_by_this_node_is_trusted_after_a_round_trip() {
        let trust = trust(Vec::new());
        let mut sealed = record(ordinary_spec());
        trust.seal(&mut sealed).unwrap();
        assert_eq!(sealed.seal.as_ref().unwrap().key_id, trust.node_key_id());
        let back = read_back(&stored(&sealed));
        assert_eq!(
            trust.verify(&back),
            Verdict::Trusted {
                key_id: trust.node_key_id().to_string()
            }
        );
        // Whatever order the keys come in.
        let reordered: Value = serde_json::from_slice(&stored(&sealed)).unwrap();
        let mut text = String::from("{");
        let object = reordered.as_object().unwrap();
        for (n, k) in object.keys().rev().enumerate() {
            text.push_str(if n > 0 { "," } else { "" });
            text.push_str(&format!("{}:{}", json!(k), object[k]));
        }
        text.push('}');
        assert!(matches!(
            trust.verify(&read_back(text.as_bytes())),
            Verdict::Trusted { .. }
        ));
    }

    #[test]
    fn one_byte_changed_in_the_spec_is_untrusted() {
        let trust = trust(Vec::new());
        let mut sealed = record(ordinary_spec());
        trust.seal(&mut sealed).unwrap();
        let mut bytes = stored(&sealed);
        let at = bytes.windows(10).position(|w| w == b"sleep 1000").unwrap();
        bytes[at + 6] = b'2';
        let verdict = trust.verify(&read_back(&bytes));
        assert!(
            matches!(&verdict, Verdict::Untrusted { why } if why.contains("does not verify")),
            "{verdict:?}"
        );
    }

    #[test]
    fn an_unknown_key_or_no_seal_is_untrusted() {
        let foreign = RecordTrust::new(key(2), Vec::new(), default_mounts());
        let mut sealed = record(ordinary_spec());
        foreign.seal(&mut sealed).unwrap();
        let verdict = trust(Vec::new()).verify(&sealed);
        assert!(
            matches!(&verdict, Verdict::Untrusted { why } if why.contains(key(2).id()) && why.contains("does not trust")),
            "{verdict:?}"
        );
        let verdict = trust(Vec::new()).verify(&record(ordinary_spec()));
        assert!(
            matches!(&verdict, Verdict::Untrusted { why } if why.contains("no seal")),
            "{verdict:?}"
        );
        // A seal that names our key but was made with another is forged.
        let mut forged = sealed.clone();
        forged.seal.as_mut().unwrap().key_id = key(1).id().to_string();
        assert!(matches!(trust(Vec::new()).verify(&forged), Verdict::Untrusted { .. }));
    }

    #[test]
    fn a_trusted_key_of_another_node_is_trusted() {
        let other = RecordTrust::new(key(2), Vec::new(), default_mounts());
        let mut sealed = record(ordinary_spec());
        other.seal(&mut sealed).unwrap();
        assert_eq!(
            trust(vec![key(2)]).verify(&read_back(&stored(&sealed))),
            Verdict::Trusted {
                key_id: key(2).id().to_string()
            }
        );
    }

    #[test]
    fn the_node_key_is_made_once_private_and_refused_when_loose() {
        let dir = tempfile::tempdir().unwrap();
        let first = RecordTrust::load(dir.path(), &[], default_mounts()).unwrap();
        let path = dir.path().join(NODE_KEY_FILE);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        let again = RecordTrust::load(dir.path(), &[], default_mounts()).unwrap();
        assert_eq!(first.node_key_id(), again.node_key_id());
        assert_eq!(first.node_key_id().len(), 16);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = RecordTrust::load(dir.path(), &[], default_mounts())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("0644"),
            "{err}"
        );
    }

    #[test]
    fn trusted_key_files_must_be_private_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("node-b.key");
        fs::write(&other, [7u8; KEY_LEN]).unwrap();
        fs::set_permissions(&other, fs::Permissions::from_mode(0o640)).unwrap();
        let err = RecordTrust::load(dir.path(), std::slice::from_ref(&other), default_mounts())
            .unwrap_err()
            .to_string();
        assert!(err.contains("node-b.key") && err.contains("0640"), "{err}");
        fs::set_permissions(&other, fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = RecordTrust::load(dir.path(), std::slice::from_ref(&other), default_mounts()).unwrap();
        let mut sealed = record(ordinary_spec());
        RecordTrust::new(key(7), Vec::new(), default_mounts())
            .seal(&mut sealed)
            .unwrap();
        assert!(matches!(loaded.verify(&sealed), Verdict::Trusted { .. }));
        fs::write(&other, [7u8; 16]).unwrap();
        let err = RecordTrust::load(dir.path(), &[other], default_mounts())
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds 16 bytes"), "{err}");
    }

    #[test]
    fn an_ordinary_spec_is_not_refused() {
        assert_eq!(refused_fields(ordinary_spec()), Vec::<String>::new());
    }

    #[test]
    fn a_prestart_hook_is_refused() {
        let mut spec = ordinary_spec();
        spec["hooks"] = json!({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "id > /tmp/owned"]}]});
        assert_eq!(refused_fields(spec), ["spec.hooks.prestart"]);
    }

    #[test]
    fn privileged_capabilities_are_refused() {
        let mut spec = ordinary_spec();
        spec["process"]["capabilities"]["bounding"]
            .as_array_mut()
            .unwrap()
            .push(json!("CAP_SYS_ADMIN"));
        spec["process"]["capabilities"]["effective"] = json!(["CAP_SYS_PTRACE"]);
        let refusals = untrusted_refusals(&record(spec), &default_mounts());
        let fields: Vec<&str> = refusals.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.process.capabilities.bounding",
                "spec.process.capabilities.effective"
            ]
        );
        assert!(refusals[0].reason.contains("CAP_SYS_ADMIN"), "{:?}", refusals[0]);
    }

    #[test]
    fn a_host_bind_mount_of_root_is_refused() {
        let mut spec = ordinary_spec();
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]}));
        let refusals = untrusted_refusals(&record(spec.clone()), &default_mounts());
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert_eq!(refusals[0].field, "spec.mounts[7] (/host)");
        assert!(refusals[0].reason.contains("host path /"), "{:?}", refusals[0]);
        // A tmpfs that binds by its options is a bind all the same.
        let mut spec = ordinary_spec();
        spec["mounts"][6]["source"] = json!("/etc");
        spec["mounts"][6]["options"] = json!(["rbind"]);
        assert_eq!(refused_fields(spec), ["spec.mounts[6] (/run)"]);
    }

    #[test]
    fn an_allowed_bind_mount_passes() {
        let mut spec = ordinary_spec();
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/data", "type": "bind", "source": "/srv/shared/web", "options": ["rbind"]}));
        let mut mounts = default_mounts();
        mounts.push(AllowedMount {
            destination: "/data".into(),
            kind: "bind".into(),
            source: "/srv/shared/".into(),
        });
        assert!(untrusted_refusals(&record(spec.clone()), &mounts).is_empty());
        spec["mounts"][7]["source"] = json!("/srv/shared/../../etc");
        assert_eq!(untrusted_refusals(&record(spec), &mounts).len(), 1);
    }

    #[test]
    fn a_device_is_refused() {
        let mut spec = ordinary_spec();
        spec["linux"]["devices"] = json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]);
        spec["linux"]["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(json!({"allow": true, "type": "b", "major": 8, "minor": 0, "access": "rwm"}));
        assert_eq!(
            refused_fields(spec),
            ["spec.linux.devices", "spec.linux.resources.devices[4]"]
        );
    }

    #[test]
    fn a_host_network_namespace_path_is_refused() {
        let mut spec = ordinary_spec();
        spec["linux"]["namespaces"][4] = json!({"type": "network", "path": "/proc/1/ns/net"});
        let refusals = untrusted_refusals(&record(spec), &default_mounts());
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert_eq!(refusals[0].field, "spec.linux.namespaces[network].path");
        assert!(refusals[0].reason.contains("/proc/1/ns/net"));
        // No network namespace at all is the host's.
        let mut spec = ordinary_spec();
        spec["linux"]["namespaces"].as_array_mut().unwrap().pop();
        assert_eq!(refused_fields(spec), ["spec.linux.namespaces"]);
    }

    #[test]
    fn a_runtime_binary_is_refused() {
        use prost::Message;
        let mut hostile = record(ordinary_spec());
        hostile.runtime_options_type = crate::host::criu::RUNC_OPTIONS_TYPE.into();
        hostile.runtime_options = crate::oci::digest::hex(
            &RuncOptions {
                binary_name: "/tmp/evil-runc".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        hostile.runtime_name = "/tmp/containerd-shim-evil".into();
        let fields: Vec<String> = untrusted_refusals(&hostile, &default_mounts())
            .into_iter()
            .map(|r| r.field)
            .collect();
        assert_eq!(fields, ["runtime.name", "runtime.options.BinaryName"]);
        // runc options that name nothing are fine.
        hostile.runtime_name = "io.containerd.runc.v2".into();
        hostile.runtime_options = crate::oci::digest::hex(
            &RuncOptions {
                systemd_cgroup: true,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert!(untrusted_refusals(&hostile, &default_mounts()).is_empty());
    }

    #[test]
    fn other_escapes_are_refused() {
        let mut spec = ordinary_spec();
        spec["root"]["path"] = json!("/");
        spec["process"]["apparmorProfile"] = json!("unconfined");
        spec["process"]["oomScoreAdj"] = json!(-1000);
        spec["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW"});
        spec["linux"]["sysctl"] = json!({"kernel.core_pattern": "|/tmp/x", "net.ipv4.ip_forward": "1"});
        spec["linux"]["rootfsPropagation"] = json!("rshared");
        spec["mounts"][5]["options"] = json!(["nosuid"]);
        assert_eq!(
            refused_fields(spec),
            [
                "spec.root.path",
                "spec.process.oomScoreAdj",
                "spec.process.apparmorProfile",
                "spec.linux.sysctl.kernel.core_pattern",
                "spec.linux.rootfsPropagation",
                "spec.linux.seccomp",
                "spec.mounts[5] (/sys)",
            ]
        );
    }

    #[test]
    fn fields_spelled_in_another_case_are_refused() {
        // runc's Go decoder reads both as hooks.
        let mut spec = ordinary_spec();
        spec["Hooks"] = json!({"prestart": [{"path": "/bin/sh"}]});
        spec["linux"]["namespaces"][4] = json!({"type": "network", "PATH": "/proc/1/ns/net"});
        spec["hoo\u{212a}s"] = json!({});
        assert_eq!(
            refused_fields(spec),
            ["spec.Hooks", "spec.hoo\u{212a}s", "spec.linux.namespaces[4].PATH",]
        );
    }

    #[test]
    fn untrusted_records_have_cgroup_path_and_annotations_rebuilt() {
        let mut spec = ordinary_spec();
        spec["linux"]["cgroupsPath"] = json!("/system.slice/sshd.service/web");
        spec["annotations"] = json!({"org.criu.config": "/tmp/evil.conf"});
        spec["linux"]["maskedPaths"] = json!([]);
        let mut untrusted = record(spec);
        rebuild_untrusted(&mut untrusted, "prod");
        assert_eq!(untrusted.spec["linux"]["cgroupsPath"], "/prod/web");
        assert!(untrusted.spec.get("annotations").is_none());
        assert_eq!(untrusted.spec["linux"]["maskedPaths"].as_array().unwrap().len(), 10);
        let mut systemd = record(ordinary_spec());
        systemd.spec["linux"]["cgroupsPath"] = json!("../x.slice:cri:web");
        rebuild_untrusted(&mut systemd, "prod");
        assert_eq!(systemd.spec["linux"]["cgroupsPath"], "system.slice:cri:web");
        // to_container then names it after the new container.
        let container = untrusted.to_container("web-restored", "c1", None).unwrap();
        let spec: Value = serde_json::from_slice(&container.spec.unwrap().value).unwrap();
        assert_eq!(spec["linux"]["cgroupsPath"], "/prod/web-restored");
    }

    #[test]
    fn admission_refuses_naming_the_fields_or_forces_with_the_flag() {
        let trust = trust(Vec::new());
        let mut spec = ordinary_spec();
        spec["hooks"] = json!({"createRuntime": [{"path": "/bin/true"}]});
        spec["linux"]["namespaces"][4] = json!({"type": "network", "path": "/proc/1/ns/net"});
        let mut hostile = record(spec);
        let err = trust
            .admit(&mut hostile.clone(), "default", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "untrusted checkpoint record (it carries no seal): spec.hooks.createRuntime is not allowed"
            ),
            "{err}"
        );
        assert!(
            err.contains("spec.linux.namespaces[network].path is not allowed"),
            "{err}"
        );
        assert!(matches!(
            trust.admit(&mut hostile, "default", true).unwrap(),
            Admitted::ForcedByRequest { .. }
        ));
        let mut ordinary = record(ordinary_spec());
        assert!(matches!(
            trust.admit(&mut ordinary, "default", false).unwrap(),
            Admitted::Rebuilt { .. }
        ));
        let mut sealed = record(ordinary_spec());
        sealed.spec["hooks"] = json!({"prestart": [{"path": "/bin/true"}]});
        trust.seal(&mut sealed).unwrap();
        let before = sealed.clone();
        assert!(matches!(
            trust.admit(&mut sealed, "default", false).unwrap(),
            Admitted::Sealed { .. }
        ));
        assert_eq!(sealed, before, "a trusted record is applied as recorded");
    }
}
