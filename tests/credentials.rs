//! The keychain against real `docker-credential-<name>` executables (shell
//! scripts this test writes, speaking the docker-credential-helpers
//! protocol), found in a helper directory given to the keychain rather than
//! through a PATH shared by parallel tests; and the per-request credentials
//! of a commit, which must never reach what the daemon stores or reports.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use seamless_snapshotter::commit::{CommitOptions, Format, Job, JobState};
use seamless_snapshotter::oci::credentials::{
    Credential, CredentialError, Keychain, DOCKER_HUB_SERVER, MAX_HELPER_OUTPUT,
};
use seamless_snapshotter::oci::registry::RegistryAuth;

/// A directory with `config.json` and a `bin/` of helpers.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let node = Node {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(node.bin()).unwrap();
        node
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    /// Replaces config.json as `docker login` does: a new file renamed over.
    fn write_config(&self, json: &str) {
        let staged = self.dir.path().join("config.json.new");
        std::fs::write(&staged, json).unwrap();
        std::fs::rename(&staged, self.config()).unwrap();
    }

    /// Installs `docker-credential-<name>` running `body` under /bin/sh.
    fn helper(&self, name: &str, body: &str) {
        let path = self.bin().join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\nset -e\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn keychain(&self) -> Keychain {
        Keychain::new(self.config()).with_helper_dirs(vec![self.bin()])
    }

    /// A helper that answers `<user>` and a secret naming the server it was
    /// asked about (read from stdin), and logs each call to `calls-<name>`.
    fn answering_helper(&self, name: &str, user: &str) {
        let log = self.dir.path().join(format!("calls-{name}"));
        self.helper(
            name,
            &format!(
                r#"[ "$1" = get ] || exit 3
server=$(cat)
echo "$server" >> {log}
printf '{{"ServerURL":"%s","Username":"{user}","Secret":"secret-of-%s"}}' "$server" "$server""#,
                log = log.display()
            ),
        );
    }

    fn calls(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(format!("calls-{name}")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn basic(user: &str, pass: &str) -> Option<RegistryAuth> {
    Some(RegistryAuth::Basic(user.into(), pass.into()))
}

#[test]
fn a_creds_store_helper_is_asked_with_the_server_on_stdin() {
    let node = Node::new();
    node.answering_helper("store", "helper-user");
    node.write_config(r#"{"credsStore": "store", "auths": {"registry.local:5000": {}}}"#);
    let keys = node.keychain();
    assert_eq!(
        keys.auth_for("registry.local:5000").unwrap(),
        basic("helper-user", "secret-of-registry.local:5000")
    );
    // Docker Hub is asked for by Docker's server URL, whatever its alias.
    assert_eq!(
        keys.auth_for("registry-1.docker.io").unwrap(),
        basic("helper-user", &format!("secret-of-{DOCKER_HUB_SERVER}"))
    );
    assert_eq!(node.calls("store"), ["registry.local:5000", DOCKER_HUB_SERVER]);
    // Answers are reused for a while: one commit asks many times.
    keys.auth_for("registry.local:5000").unwrap();
    assert_eq!(node.calls("store").len(), 2);
    // Unless the caller was refused and asks again.
    keys.forget("registry.local:5000");
    keys.auth_for("registry.local:5000").unwrap();
    assert_eq!(node.calls("store").len(), 3);
}

#[test]
fn cred_helpers_win_over_the_creds_store_for_their_host() {
    let node = Node::new();
    node.answering_helper("store", "store-user");
    node.answering_helper("ecr", "ecr-user");
    node.write_config(
        r#"{"credsStore": "store",
            "credHelpers": {"123.dkr.ecr.example.com": "ecr"},
            "auths": {"plain.local": {"auth": "dTpw"}}}"#,
    );
    let keys = node.keychain();
    assert_eq!(
        keys.auth_for("123.dkr.ecr.example.com").unwrap(),
        basic("ecr-user", "secret-of-123.dkr.ecr.example.com")
    );
    // A credsStore serves every host, as for Docker: an `auths` entry
    // holds no secret then.
    assert_eq!(
        keys.auth_for("plain.local").unwrap(),
        basic("store-user", "secret-of-plain.local")
    );
    assert_eq!(node.calls("ecr"), ["123.dkr.ecr.example.com"]);
    assert_eq!(node.calls("store"), ["plain.local"]);

    // Without a credsStore, `auths` serves the hosts no helper does.
    node.write_config(
        r#"{"credHelpers": {"123.dkr.ecr.example.com": "ecr"}, "auths": {"plain.local": {"auth": "dTpw"}}}"#,
    );
    assert_eq!(keys.auth_for("plain.local").unwrap(), basic("u", "p"));
    assert_eq!(keys.auth_for("other.local").unwrap(), None);
}

#[test]
fn a_helper_with_nothing_means_anonymous_and_token_users_are_identity_tokens() {
    let node = Node::new();
    node.helper(
        "empty",
        r#"cat >/dev/null
echo "credentials not found in native keychain"
exit 1"#,
    );
    node.helper(
        "acr",
        r#"cat >/dev/null
printf '{"ServerURL":"acr.example.io","Username":"<token>","Secret":"refresh-token-1"}'"#,
    );
    node.write_config(r#"{"credsStore": "empty", "credHelpers": {"acr.example.io": "acr"}}"#);
    let keys = node.keychain();
    assert_eq!(keys.auth_for("ghcr.io").unwrap(), None);
    assert_eq!(
        keys.credential_for("acr.example.io").unwrap(),
        Some(Credential::IdentityToken {
            username: String::new(),
            token: "refresh-token-1".into()
        })
    );
}

#[test]
fn a_failing_helper_is_an_error_naming_it_and_the_host() {
    let node = Node::new();
    node.helper(
        "broken",
        r#"cat >/dev/null
echo "the keyring is locked" >&2
echo "error getting credentials: keyring locked"
exit 1"#,
    );
    node.helper(
        "garbage",
        r#"cat >/dev/null
echo 'Username=u Secret=garbage-secret'"#,
    );
    node.write_config(r#"{"credsStore": "broken", "credHelpers": {"garbage.local": "garbage"}}"#);
    let keys = node.keychain();
    let err = keys.auth_for("ghcr.io").unwrap_err();
    assert!(
        matches!(&err, CredentialError::Helper { helper, host, .. } if helper == "broken" && host == "ghcr.io"),
        "{err}"
    );
    assert!(err.to_string().contains("keyring locked"), "{err}");
    let err = keys.auth_for("garbage.local").unwrap_err().to_string();
    assert!(
        err.contains("docker-credential-garbage") && !err.contains("garbage-secret"),
        "{err}"
    );
}

#[test]
fn a_hung_helper_is_killed_at_its_timeout_children_and_all() {
    let node = Node::new();
    // The sleep is a child of the shell: it holds the output pipe open
    // after the shell dies unless the whole group is killed.
    node.helper(
        "hang",
        &format!(
            "cat >/dev/null\nsleep 1000 &\necho $! > {}\nwait",
            node.dir.path().join("sleeper").display()
        ),
    );
    node.write_config(r#"{"credsStore": "hang"}"#);
    let keys = node.keychain().with_helper_timeout(Duration::from_millis(500));
    let err = keys.auth_for("ghcr.io").unwrap_err();
    assert!(
        matches!(&err, CredentialError::Helper { reason, .. } if reason.contains("no answer within")),
        "{err}"
    );
    // The child got SIGKILL with its group (without, it would sleep on for
    // 1000 s): it dies, at most a zombie until init reaps it.
    let pid = std::fs::read_to_string(node.dir.path().join("sleeper")).unwrap();
    let dead = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|rest| rest.chars().next());
        matches!(state, None | Some('Z') | Some('X'))
    };
    for _ in 0..200 {
        if dead() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dead(), "the helper's child {} still runs", pid.trim());
}

#[test]
fn a_helper_that_prints_megabytes_is_cut_off() {
    let node = Node::new();
    node.helper(
        "flood",
        r#"cat >/dev/null
head -c 20000000 /dev/zero | tr '\0' 'a'"#,
    );
    node.write_config(r#"{"credsStore": "flood"}"#);
    let err = node.keychain().auth_for("ghcr.io").unwrap_err();
    assert!(
        matches!(&err, CredentialError::Helper { reason, .. } if reason.contains(&format!("more than {MAX_HELPER_OUTPUT} bytes"))),
        "{err}"
    );
}

#[test]
fn a_helper_name_that_is_a_path_is_never_run() {
    let node = Node::new();
    // Were the name used as given, this would run.
    let marker = node.dir.path().join("ran");
    let evil = node.dir.path().join("docker-credential-evil");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).unwrap();
    node.write_config(r#"{"credsStore": "../evil"}"#);
    let err = node.keychain().auth_for("ghcr.io").unwrap_err();
    assert!(err.to_string().contains("credsStore"), "{err}");
    assert!(!marker.exists());
}

#[test]
fn a_changed_config_is_read_again() {
    let node = Node::new();
    let keys = node.keychain();
    // No file yet: anonymous, and a later `docker login` counts.
    assert_eq!(keys.auth_for("registry.local").unwrap(), None);
    node.write_config(r#"{"auths": {"registry.local": {"username": "first", "password": "one"}}}"#);
    assert_eq!(keys.auth_for("registry.local").unwrap(), basic("first", "one"));
    node.write_config(r#"{"auths": {"registry.local": {"username": "second", "password": "two"}}}"#);
    assert_eq!(keys.auth_for("registry.local").unwrap(), basic("second", "two"));
    // A helper configured later replaces the entry, and is asked.
    node.answering_helper("late", "late-user");
    node.write_config(r#"{"credHelpers": {"registry.local": "late"}}"#);
    assert_eq!(
        keys.auth_for("registry.local").unwrap(),
        basic("late-user", "secret-of-registry.local")
    );
    std::fs::remove_file(node.config()).unwrap();
    assert_eq!(keys.auth_for("registry.local").unwrap(), None);
}

#[test]
fn the_keychain_is_shared_across_threads() {
    fn shareable<T: Send + Sync + std::fmt::Debug>() {}
    shareable::<Keychain>();
    let node = Node::new();
    node.answering_helper("store", "u");
    node.write_config(
        r#"{"credsStore": "store", "auths": {"x.local": {"username": "u", "password": "inline-secret"}}}"#,
    );
    let keys = std::sync::Arc::new(node.keychain());
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let keys = keys.clone();
            std::thread::spawn(move || keys.auth_for(&format!("host{i}.local")).unwrap())
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), basic("u", &format!("secret-of-host{i}.local")));
    }
    let shown = format!("{keys:?}");
    assert!(
        !shown.contains("secret-of-") && !shown.contains("inline-secret"),
        "{shown}"
    );
}

fn job_with(options: CommitOptions) -> Job {
    Job {
        snapshot_id: "snapshot-1".into(),
        container: "c1".into(),
        namespace: "default".into(),
        source_image: "registry.local/base:1".into(),
        options,
        snapshot_key: "k".into(),
        capture: PathBuf::from("/var/lib/x"),
        new_upper: PathBuf::from("/var/lib/y"),
        pause: Duration::from_millis(3),
        total: Duration::from_millis(9),
        state: JobState::Pending,
        progress: 0.0,
        stage: "queued".into(),
        started: std::time::SystemTime::UNIX_EPOCH,
        ended: None,
        error_code: None,
        error: None,
        cause: None,
        manifest_digest: None,
        layer_plan: String::new(),
        commit_layers: 0,
    }
}

#[test]
fn request_credentials_are_never_persisted_nor_shown() {
    let body = br#"{"container": "c1", "target": "registry.local/app:v2", "format": "oci",
        "target_creds": {"username": "alice", "password": "target-pass-1"},
        "source_creds": {"username": "bob", "password": "source-pass-2"}}"#;
    let options = seamless_snapshotter::api::rest::parse_create(body, "default")
        .unwrap()
        .options;
    assert_eq!(options.format, Format::Oci);
    assert_eq!(options.target_creds.as_ref().unwrap().password(), "target-pass-1");
    assert_eq!(options.source_creds.as_ref().unwrap().username(), "bob");
    let job = job_with(options);
    let stored = serde_json::to_string(&job).unwrap();
    let shown = format!("{job:?}");
    for secret in ["target-pass-1", "source-pass-2"] {
        assert!(!stored.contains(secret), "{stored}");
        assert!(!shown.contains(secret), "{shown}");
    }
    // A job read back has no credentials: they lived only in memory.
    let back: Job = serde_json::from_str(&stored).unwrap();
    assert!(back.options.target_creds.is_none() && back.options.source_creds.is_none());
}

#[test]
fn rest_bodies_with_bad_credentials_are_refused_without_quoting_them() {
    for body in [
        r#"{"container": "c1", "target": "r/a:1", "target_creds": "alice:TOPSECRET"}"#,
        r#"{"container": "c1", "target": "r/a:1", "target_creds": {"username": "alice", "password": 31415926}}"#,
        r#"{"container": "c1", "target": "r/a:1", "source_creds": {"password": "TOPSECRET"}}"#,
    ] {
        let err = match seamless_snapshotter::api::rest::parse_create(body.as_bytes(), "default") {
            Err(seamless_snapshotter::api::rest::RequestError::Malformed(message)) => message,
            other => panic!("{body}: {other:?}"),
        };
        assert!(!err.contains("TOPSECRET") && !err.contains("31415926"), "{err}");
    }
}

/// The credentials file helper the CLI uses refuses what others may read.
#[test]
fn credentials_files_must_be_private() {
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("creds");
    std::fs::write(path, "alice:file-secret\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = seamless_snapshotter::oci::credentials::RegistryCredentials::read_file(path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("0644") && !err.contains("file-secret"), "{err}");
}
