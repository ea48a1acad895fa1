//! The container a restore creates, read from `container.json` (the
//! engine's inspect answer at checkpoint time). The file is outside this
//! process's trust: only the fields a restore needs are read, each checked,
//! and a container that needed more of the host than its own namespaces
//! (privileges, host paths, devices, host namespaces, added capabilities)
//! is refused by name rather than recreated from a file anyone with the
//! directory could have written.

use serde_json::{json, Map, Value};

/// The longest string field taken from a record.
const MAX_TEXT: usize = 4096;
/// The most entries of a list or map field.
const MAX_ENTRIES: usize = 1024;

/// Settings of the record's `HostConfig` that give a container more of the
/// host; a record asking for any is refused.
const HOST_ACCESS: [(&str, &str); 9] = [
    ("Privileged", "privileged mode"),
    ("Binds", "bind mounts of host paths"),
    ("Mounts", "mounts"),
    ("Devices", "host devices"),
    ("CapAdd", "added capabilities"),
    ("PidMode", "the host's process namespace"),
    ("IpcMode", "the host's IPC namespace"),
    ("UTSMode", "the host's UTS namespace"),
    ("UsernsMode", "the host's user namespace"),
];

/// Network modes a record may ask for: a private network namespace.
pub const NETWORK_MODES: [&str; 3] = ["none", "default", "bridge"];

/// The resource limits of a record's `HostConfig` a restore keeps; with
/// `NetworkMode`, all a create body's `HostConfig` ever holds.
pub const LIMITS: [&str; 7] = [
    "Memory",
    "MemorySwap",
    "NanoCpus",
    "CpuShares",
    "CpuQuota",
    "CpuPeriod",
    "PidsLimit",
];

/// The body of the engine's create call that recreates the container
/// `record` describes, or why it is refused.
pub fn create_body(record: &Value) -> Result<Value, String> {
    let config = record.get("Config").and_then(Value::as_object).ok_or("no Config")?;
    let host = record
        .get("HostConfig")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for (field, what) in HOST_ACCESS {
        match host.get(field) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::String(s)) if s.is_empty() || s == "private" || s == "shareable" => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(other) => {
                return Err(format!(
                    "the container used {what} (HostConfig.{field} = {other}): docker-checkpoint restores only \
                     containers confined to their own namespaces and image"
                ))
            }
        }
    }
    let network = text(host.get("NetworkMode"), "HostConfig.NetworkMode")?.unwrap_or_default();
    if !network.is_empty() && !NETWORK_MODES.contains(&network.as_str()) {
        return Err(format!(
            "the container used the network {network:?}: only none, default and bridge are restored"
        ));
    }
    let image = text(config.get("Image"), "Config.Image")?
        .filter(|i| !i.is_empty())
        .ok_or("no Config.Image")?;
    let mut body = Map::new();
    body.insert("Image".into(), json!(image));
    for field in ["Cmd", "Entrypoint", "Env"] {
        if let Some(list) = strings(config.get(field), &format!("Config.{field}"))? {
            body.insert(field.into(), json!(list));
        }
    }
    if let Some(env) = body.get("Env").and_then(Value::as_array) {
        if env.iter().any(|e| !e.as_str().is_some_and(|e| e.contains('='))) {
            return Err("Config.Env holds an entry without '='".into());
        }
    }
    for field in ["WorkingDir", "User", "Hostname", "Domainname", "StopSignal"] {
        if let Some(value) = text(config.get(field), &format!("Config.{field}"))? {
            body.insert(field.into(), json!(value));
        }
    }
    for field in [
        "Tty",
        "OpenStdin",
        "StdinOnce",
        "AttachStdin",
        "AttachStdout",
        "AttachStderr",
    ] {
        match config.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => {
                body.insert(field.into(), json!(b));
            }
            Some(other) => return Err(format!("Config.{field} is {other}, not a boolean")),
        }
    }
    if let Some(labels) = config.get("Labels").filter(|l| !l.is_null()) {
        let labels = labels.as_object().ok_or("Config.Labels is not a map")?;
        if labels.len() > MAX_ENTRIES {
            return Err("Config.Labels has too many entries".into());
        }
        for (key, value) in labels {
            if key.len() > MAX_TEXT || value.as_str().is_none_or(|v| v.len() > MAX_TEXT) {
                return Err(format!("Config.Labels[{key:?}] is not a short string"));
            }
        }
        body.insert("Labels".into(), Value::Object(labels.clone()));
    }
    let mut host_body = Map::new();
    if !network.is_empty() {
        host_body.insert("NetworkMode".into(), json!(network));
    }
    for field in LIMITS {
        match host.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_i64().is_some() => {
                host_body.insert(field.into(), Value::Number(n.clone()));
            }
            Some(other) => return Err(format!("HostConfig.{field} is {other}, not an integer")),
        }
    }
    body.insert("HostConfig".into(), Value::Object(host_body));
    Ok(Value::Object(body))
}

/// A string field: absent, null, or a short string without control
/// characters.
fn text(value: Option<&Value>, field: &str) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_TEXT && !s.chars().any(char::is_control) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{field} is not a short string")),
    }
}

/// A list of strings field: absent, null, or at most [`MAX_ENTRIES`] short
/// strings (a command's arguments may hold newlines, not NULs).
fn strings(value: Option<&Value>, field: &str) -> Result<Option<Vec<String>>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) if items.len() <= MAX_ENTRIES => items
            .iter()
            .map(|item| match item.as_str() {
                Some(s) if s.len() <= MAX_TEXT && !s.contains('\0') => Ok(s.to_string()),
                _ => Err(format!("{field} holds something other than a short string")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(format!("{field} is not a list of strings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> Value {
        json!({
            "Id": "a".repeat(64),
            "Config": {
                "Image": "alpine:latest",
                "Cmd": ["sh", "-c", "i=0; while true; do echo Counter: $i; i=$((i+1)); sleep 2; done"],
                "Entrypoint": null,
                "Env": ["PATH=/bin"],
                "WorkingDir": "",
                "Tty": false,
                "Labels": {"app": "counter"}
            },
            "HostConfig": {"NetworkMode": "none", "Privileged": false, "Binds": null, "CapAdd": null,
                           "PidMode": "", "IpcMode": "private", "Memory": 0}
        })
    }

    #[test]
    fn the_counter_is_recreated_with_its_image_command_and_network() {
        let body = create_body(&counter()).unwrap();
        assert_eq!(body["Image"], "alpine:latest");
        assert_eq!(body["Cmd"][0], "sh");
        assert_eq!(body["Env"], json!(["PATH=/bin"]));
        assert_eq!(body["Labels"]["app"], "counter");
        assert_eq!(body["HostConfig"], json!({"NetworkMode": "none", "Memory": 0}));
        assert!(body.get("Entrypoint").is_none());
    }

    #[test]
    fn a_record_asking_for_the_host_is_refused_by_name() {
        let cases = [
            ("Privileged", json!(true), "privileged"),
            ("Binds", json!(["/:/host"]), "bind mounts"),
            ("Devices", json!([{"PathOnHost": "/dev/sda"}]), "host devices"),
            ("CapAdd", json!(["SYS_ADMIN"]), "capabilities"),
            ("PidMode", json!("host"), "process namespace"),
            ("NetworkMode", json!("host"), "network \"host\""),
            ("NetworkMode", json!("container:abc"), "network"),
        ];
        for (field, value, expected) in cases {
            let mut record = counter();
            record["HostConfig"][field] = value;
            let err = create_body(&record).unwrap_err();
            assert!(err.contains(expected), "{field}: {err}");
        }
    }

    #[test]
    fn malformed_fields_are_refused() {
        for (path, value) in [
            (("Config", "Image"), json!("")),
            (("Config", "Image"), json!(7)),
            (("Config", "Cmd"), json!("sh")),
            (("Config", "Cmd"), json!(["a\0b"])),
            (("Config", "Env"), json!(["NOEQUALS"])),
            (("Config", "User"), json!("root\nx")),
            (("Config", "Tty"), json!("yes")),
            (("Config", "Labels"), json!(["a"])),
            (("HostConfig", "Memory"), json!("1g")),
        ] {
            let mut record = counter();
            record[path.0][path.1] = value.clone();
            assert!(create_body(&record).is_err(), "{path:?} = {value}");
        }
        assert!(create_body(&json!({"HostConfig": {}})).is_err());
    }
}
