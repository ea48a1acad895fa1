//! `registry::RegistryClient` against a real distribution registry
//! (`docker-registry serve`) started on 127.0.0.1 with filesystem storage in a
//! temporary directory: plain HTTP, HTTP with htpasswd basic auth, and TLS
//! with a self-signed certificate. The registry's access log tells which
//! requests were made. Fails, never skips, when `docker-registry` (or, for
//! the TLS test, `openssl`) is missing. Stand-in registries on 127.0.0.1
//! answer what a real one would not: errors, manifests of megabytes, bodies
//! longer than their descriptors, with and without a length, which must be
//! refused without being read whole.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use seamless_snapshotter::error::{Classify, ErrorKind};
use seamless_snapshotter::oci::registry::{
    CredentialSource, LayerData, LayerSource, RegistryAuth, RegistryClient, RegistryError, RegistryHosts,
    RegistryOptions,
};
use sha2::{Digest, Sha256};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const USER: &str = "committer";
const PASSWORD: &str = "s3cret";
/// bcrypt (cost 4) of `PASSWORD`, as the registry's htpasswd backend wants it.
const PASSWORD_BCRYPT: &str = "$2b$04$EjA1GPfsgiPVVN66mk8FCu7uFkAiIBzwRfRSQJ9aL21vTSbsk/Ag6";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Plain,
    BasicAuth,
    Tls,
}

/// A `docker-registry` process, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a registry of [`Registry::start_with`] serves.
#[derive(Default)]
struct Setup {
    /// TLS with this certificate and key (PEM files).
    tls: Option<(PathBuf, PathBuf)>,
    /// htpasswd basic auth for `USER` / `PASSWORD`.
    basic_auth: bool,
    /// Bearer tokens from this token server (its realm and certificate).
    token: Option<(String, PathBuf)>,
    /// With `tls`: a client certificate this CA signed is required.
    client_cas: Option<PathBuf>,
}

impl Registry {
    fn start(flavour: Flavour) -> Registry {
        Registry::start_flavour(flavour, Setup::default())
    }

    fn start_with(setup: Setup) -> Registry {
        let flavour = if setup.basic_auth {
            Flavour::BasicAuth
        } else {
            Flavour::Plain
        };
        Registry::start_flavour(flavour, setup)
    }

    fn start_flavour(flavour: Flavour, setup: Setup) -> Registry {
        let binary = which("docker-registry").unwrap_or_else(|| {
            panic!("docker-registry is not installed: `apt-get install docker-registry` (these tests never skip)")
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: test-secret\n",
            dir.path().join("data").display()
        );
        let tls = match setup.tls {
            Some(pair) => Some(pair),
            None if flavour == Flavour::Tls => Some(self_signed_certificate(dir.path())),
            None => None,
        };
        if let Some((cert, key)) = tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if let Some(client_ca) = &setup.client_cas {
                config.push_str(&format!("    clientcas:\n      - {}\n", client_ca.display()));
            }
        }
        if let Some((realm, certificate)) = &setup.token {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    \
                 rootcertbundle: {}\n",
                certificate.display()
            ));
        }
        if flavour == Flavour::BasicAuth {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{USER}:{PASSWORD_BCRYPT}\n")).expect("write htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log = dir.path().join("registry.log");
        let log_file = std::fs::File::create(&log).expect("registry log");
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry {
            child,
            port,
            log,
            _dir: dir,
        };
        registry.wait_listening();
        registry
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited with {status}: {}", self.log_text());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not listen within 15s: {}", self.log_text());
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Access-log lines of requests `method` whose path starts with `path`.
    fn requests(&self, method: &str, path: &str) -> usize {
        let needle = format!("\"{method} {path}");
        self.log_text().lines().filter(|line| line.contains(&needle)).count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn self_signed_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let openssl = which("openssl").unwrap_or_else(|| panic!("openssl is not installed: the TLS test needs it"));
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let output = Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (cert, key)
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    format!(
        "sha256:{}",
        digest.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn fast_options(insecure: bool) -> RegistryOptions {
    RegistryOptions {
        insecure,
        retries: 2,
        retry_base_delay: Duration::from_millis(20),
        ..RegistryOptions::default()
    }
}

/// The blobs of a two-layer image: one layer in a file, one in memory.
struct TestImage {
    _dir: tempfile::TempDir,
    layers: Vec<LayerSource>,
    layer_bytes: Vec<Vec<u8>>,
    config: Vec<u8>,
}

fn test_image() -> TestImage {
    let dir = tempfile::tempdir().expect("temp dir");
    // Bigger than one read chunk, so the file upload streams several.
    let file_layer: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file_path = dir.path().join("layer0.tar.gz");
    std::fs::write(&file_path, &file_layer).expect("write layer file");
    let bytes_layer = b"second layer, held in memory".to_vec();
    let layers = vec![
        LayerSource {
            media_type: LAYER_MEDIA_TYPE.to_string(),
            digest: sha256(&file_layer),
            size: file_layer.len() as u64,
            annotations: BTreeMap::from([("org.example.layer".to_string(), "zero".to_string())]),
            data: LayerData::File(file_path),
        },
        LayerSource {
            media_type: LAYER_MEDIA_TYPE.to_string(),
            digest: sha256(&bytes_layer),
            size: bytes_layer.len() as u64,
            annotations: BTreeMap::new(),
            data: LayerData::Bytes(bytes_layer.clone()),
        },
    ];
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    TestImage {
        _dir: dir,
        layers,
        layer_bytes: vec![file_layer, bytes_layer],
        config,
    }
}

fn manifest_annotations() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "org.opencontainers.image.description".to_string(),
        "committed".to_string(),
    )])
}

/// GET over HTTP/1.0 (so no chunked body): status and body.
fn raw_get(host: &str, path: &str, accept: &str) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(host).expect("connect to registry");
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: {accept}\r\n\r\n"
    )
    .expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, response[split + 4..].to_vec())
}

#[tokio::test]
async fn pushed_image_pulls_back_identical() {
    let registry = Registry::start(Flavour::Plain);
    let client = RegistryClient::new(fast_options(true));
    let image = test_image();
    let reference = format!("{}/commits/app:v1", registry.host());

    let pushed = client
        .push_image(
            &reference,
            &image.layers,
            &image.config,
            manifest_annotations(),
            &RegistryAuth::Anonymous,
        )
        .await
        .expect("push image");
    assert_eq!(pushed.reference, reference);
    assert!(pushed.manifest_digest.starts_with("sha256:"));
    assert!(
        pushed.manifest_url.contains("/v2/commits/app/manifests/"),
        "{}",
        pushed.manifest_url
    );

    // What the registry stores, fetched without our client.
    let (status, body) = raw_get(
        &registry.host(),
        "/v2/commits/app/manifests/v1",
        "application/vnd.oci.image.manifest.v1+json",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sha256(&body), pushed.manifest_digest);
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest json");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(manifest["config"]["digest"], sha256(&image.config));
    assert_eq!(manifest["config"]["size"], image.config.len());
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.description"],
        "committed"
    );
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2);
    for (descriptor, layer) in layers.iter().zip(&image.layers) {
        assert_eq!(descriptor["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(descriptor["digest"], layer.digest.as_str());
        assert_eq!(descriptor["size"], layer.size);
    }
    assert_eq!(layers[0]["annotations"]["org.example.layer"], "zero");
    assert!(layers[1].get("annotations").is_none());

    // And through our own pull functions.
    let pulled = client
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("pull manifest and config");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert_eq!(pulled.config, image.config);
    let digests: Vec<&str> = pulled.manifest.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(
        digests,
        [image.layers[0].digest.as_str(), image.layers[1].digest.as_str()]
    );
    assert_eq!(
        pulled.manifest.annotations.as_ref().expect("manifest annotations"),
        &manifest_annotations()
    );
    let by_digest = format!("{}/commits/app@{}", registry.host(), pushed.manifest_digest);
    let again = client
        .pull_manifest_and_config(&by_digest, &RegistryAuth::Anonymous)
        .await
        .expect("pull by digest");
    assert_eq!(again.manifest_digest, pushed.manifest_digest);

    let out = tempfile::tempdir().expect("temp dir");
    for (index, (layer, bytes)) in image.layers.iter().zip(&image.layer_bytes).enumerate() {
        let dest = out.path().join(format!("blob{index}"));
        let size = client
            .pull_blob_to(&reference, &layer.digest, layer.size, &dest, &RegistryAuth::Anonymous)
            .await
            .expect("pull blob");
        assert_eq!(size, layer.size);
        assert_eq!(&std::fs::read(&dest).expect("read pulled blob"), bytes);
    }
    let names: Vec<_> = std::fs::read_dir(out.path())
        .expect("list pulled blobs")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "no partial files left behind: {names:?}");
}

/// Pushes `layers` and `config` to `reference` anonymously, without
/// manifest annotations.
async fn push_plain(
    client: &RegistryClient,
    reference: &str,
    layers: &[LayerSource],
    config: &[u8],
) -> Result<seamless_snapshotter::oci::registry::PushedImage, RegistryError> {
    client
        .push_image(reference, layers, config, BTreeMap::new(), &RegistryAuth::Anonymous)
        .await
}

/// Pulls layer `index` of `image` from `reference` into a temporary file
/// and checks it is the layer's bytes; `what` says how, for a failure.
async fn pull_layer_back(client: &RegistryClient, reference: &str, image: &TestImage, index: usize, what: &str) {
    let out = tempfile::tempdir().expect("temp dir");
    let dest = out.path().join("blob");
    let layer = &image.layers[index];
    client
        .pull_blob_to(reference, &layer.digest, layer.size, &dest, &RegistryAuth::Anonymous)
        .await
        .unwrap_or_else(|e| panic!("pull a blob {what}: {e}"));
    assert_eq!(std::fs::read(&dest).expect("read blob"), image.layer_bytes[index]);
}

/// Pushes `image` to `reference` anonymously and pulls it back: the same
/// manifest digest, the same config, the same first layer. `what` says
/// how, for a failure.
async fn push_and_pull_back(
    client: &RegistryClient,
    reference: &str,
    image: &TestImage,
    what: &str,
) -> seamless_snapshotter::oci::registry::PushedImage {
    let pushed = push_plain(client, reference, &image.layers, &image.config)
        .await
        .unwrap_or_else(|e| panic!("push {what}: {e}"));
    let pulled = client
        .pull_manifest_and_config(reference, &RegistryAuth::Anonymous)
        .await
        .unwrap_or_else(|e| panic!("pull back {what}: {e}"));
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert_eq!(pulled.config, image.config);
    pull_layer_back(client, reference, image, 0, what).await;
    pushed
}

#[tokio::test]
async fn second_push_uploads_no_blob_again() {
    let registry = Registry::start(Flavour::Plain);
    let client = RegistryClient::new(fast_options(true));
    let image = test_image();
    let reference = format!("{}/commits/again:v1", registry.host());
    let first = push_plain(&client, &reference, &image.layers, &image.config)
        .await
        .expect("first push");
    let uploads = registry.requests("POST", "/v2/commits/again/blobs/uploads/");
    assert_eq!(uploads, 3, "two layers and the config: {}", registry.log_text());
    let checks = registry.requests("HEAD", "/v2/commits/again/blobs/");

    let retag = format!("{}/commits/again:v2", registry.host());
    let second = push_plain(&client, &retag, &image.layers, &image.config)
        .await
        .expect("second push");
    assert_eq!(second.manifest_digest, first.manifest_digest);
    assert_eq!(
        registry.requests("POST", "/v2/commits/again/blobs/uploads/"),
        uploads,
        "no blob uploaded twice"
    );
    assert_eq!(registry.requests("HEAD", "/v2/commits/again/blobs/"), checks + 3);
    assert_eq!(registry.requests("PUT", "/v2/commits/again/manifests/"), 2);
}

/// A later commit references blobs the target holds already without
/// uploading them, and a blob said to be there that is not fails the push
/// before the manifest is written.
#[tokio::test]
async fn blobs_in_the_target_are_referenced_not_uploaded() {
    let registry = Registry::start(Flavour::Plain);
    let client = RegistryClient::new(fast_options(true));
    let image = test_image();
    let first_ref = format!("{}/commits/chain:v1", registry.host());
    let absent = sha256(b"never pushed");
    assert!(!client
        .has_blob(&first_ref, &image.layers[0].digest, &RegistryAuth::Anonymous)
        .await
        .expect("check before push"));
    push_plain(&client, &first_ref, &image.layers, &image.config)
        .await
        .expect("first push");
    for layer in &image.layers {
        assert!(client
            .has_blob(&first_ref, &layer.digest, &RegistryAuth::Anonymous)
            .await
            .expect("check after push"));
    }
    assert!(!client
        .has_blob(&first_ref, &absent, &RegistryAuth::Anonymous)
        .await
        .expect("check absent"));
    let asked = [
        image.layers[0].digest.as_str(),
        absent.as_str(),
        image.layers[1].digest.as_str(),
    ];
    assert_eq!(
        client
            .blobs_present(&first_ref, &asked, &RegistryAuth::Anonymous)
            .await
            .expect("check several"),
        vec![true, false, true]
    );
    let err = client
        .has_blob(&first_ref, "sha256:short", &RegistryAuth::Anonymous)
        .await
        .expect_err("bad digest");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");

    let uploads = registry.requests("POST", "/v2/commits/chain/blobs/uploads/");
    let referenced: Vec<LayerSource> = image
        .layers
        .iter()
        .map(|l| LayerSource {
            data: LayerData::InTarget,
            ..l.clone()
        })
        .collect();
    let second_ref = format!("{}/commits/chain:v2", registry.host());
    let second = push_plain(&client, &second_ref, &referenced, &image.config)
        .await
        .expect("push referencing blobs in the target");
    assert_eq!(
        registry.requests("POST", "/v2/commits/chain/blobs/uploads/"),
        uploads,
        "no layer uploaded"
    );
    let pulled = client
        .pull_manifest_and_config(&second_ref, &RegistryAuth::Anonymous)
        .await
        .expect("pull v2");
    assert_eq!(pulled.manifest_digest, second.manifest_digest);
    assert_eq!(
        pulled
            .manifest
            .layers
            .iter()
            .map(|l| l.digest.clone())
            .collect::<Vec<_>>(),
        image.layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()
    );

    let mut missing = referenced.clone();
    missing[0].digest = absent.clone();
    let err = client
        .push_image(
            &format!("{}/commits/chain:v3", registry.host()),
            &missing,
            &image.config,
            BTreeMap::new(),
            &RegistryAuth::Anonymous,
        )
        .await
        .expect_err("a referenced blob that is absent");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(&absent), "{err}");
    assert_eq!(
        registry.requests("PUT", "/v2/commits/chain/manifests/v3"),
        0,
        "no manifest written"
    );
}

#[tokio::test]
async fn a_blob_not_matching_its_digest_is_refused_before_any_upload() {
    let registry = Registry::start(Flavour::Plain);
    let client = RegistryClient::new(fast_options(true));
    let reference = format!("{}/commits/bad:v1", registry.host());

    let mut image = test_image();
    image.layers[1].digest = sha256(b"something else");
    let err = push_plain(&client, &reference, &image.layers, &image.config)
        .await
        .expect_err("a wrong digest must be refused");
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&image.layers[1].digest),
        "names the blob: {err}"
    );
    assert_eq!(err.kind(), ErrorKind::Internal);

    let mut image = test_image();
    image.layers[0].size += 1;
    let err = push_plain(&client, &reference, &image.layers, &image.config)
        .await
        .expect_err("a wrong size must be refused");
    assert!(matches!(err, RegistryError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("layer0.tar.gz"), "names the file: {err}");

    let mut image = test_image();
    image.layers[0].digest = "md5:1234".to_string();
    let err = push_plain(&client, &reference, &image.layers, &image.config)
        .await
        .expect_err("an unsupported digest must be refused");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");

    assert_eq!(registry.requests("POST", "/v2/"), 0, "{}", registry.log_text());
    assert_eq!(registry.requests("PUT", "/v2/"), 0);
}

#[tokio::test]
async fn an_unreachable_registry_fails_after_the_retries() {
    let port = free_port(); // Bound and released: nothing listens there.
    let options = RegistryOptions {
        insecure: true,
        retries: 3,
        retry_base_delay: Duration::from_millis(50),
        ..RegistryOptions::default()
    };
    let client = RegistryClient::new(options);
    let image = test_image();
    let started = Instant::now();
    let err = push_plain(
        &client,
        &format!("127.0.0.1:{port}/commits/app:v1"),
        &image.layers,
        &image.config,
    )
    .await
    .expect_err("nothing listens");
    let elapsed = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    match &err {
        RegistryError::Unreachable { attempts, .. } => assert_eq!(*attempts, 4),
        other => panic!("expected Unreachable, got {other}"),
    }
    // Backoff of 50 + 100 + 200 ms between the four attempts.
    assert!(elapsed >= Duration::from_millis(350), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");

    let err = client
        .pull_blob_to(
            &format!("127.0.0.1:{port}/commits/app:v1"),
            &image.layers[1].digest,
            image.layers[1].size,
            &std::env::temp_dir().join("never-written"),
            &RegistryAuth::Anonymous,
        )
        .await
        .expect_err("nothing listens");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

#[tokio::test]
async fn invalid_references_are_invalid_arguments() {
    let client = RegistryClient::new(fast_options(true));
    let image = test_image();
    for reference in [
        "",
        "UPPER/Case:tag",
        "registry:5000/app:bad tag",
        "127.0.0.1:1/app@sha256:00",
    ] {
        let err = client
            .push_image(
                reference,
                &image.layers,
                &image.config,
                BTreeMap::new(),
                &RegistryAuth::Anonymous,
            )
            .await
            .expect_err("invalid reference");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{reference:?}: {err}");
        assert!(matches!(err, RegistryError::InvalidReference { .. }), "{err}");
    }
    let digest_ref = format!("127.0.0.1:1/app@{}", sha256(b"x"));
    let err = push_plain(&client, &digest_ref, &image.layers, &image.config)
        .await
        .expect_err("a push needs a tag");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let err = client
        .pull_manifest_and_config("Not A Reference", &RegistryAuth::Anonymous)
        .await
        .expect_err("invalid reference");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}

#[tokio::test]
async fn missing_manifests_and_blobs_are_not_found() {
    let registry = Registry::start(Flavour::Plain);
    let client = RegistryClient::new(fast_options(true));
    let reference = format!("{}/commits/none:v1", registry.host());
    let err = client
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("nothing pushed");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    let out = tempfile::tempdir().expect("temp dir");
    let dest = out.path().join("blob");
    let err = client
        .pull_blob_to(&reference, &sha256(b"absent"), 6, &dest, &RegistryAuth::Anonymous)
        .await
        .expect_err("nothing pushed");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(std::fs::read_dir(out.path()).expect("list").count(), 0, "no file left");
}

#[tokio::test]
async fn basic_auth_is_sent_and_refusals_are_permission_errors() {
    let registry = Registry::start(Flavour::BasicAuth);
    let client = RegistryClient::new(fast_options(true));
    let image = test_image();
    let reference = format!("{}/private/app:v1", registry.host());
    let auth = RegistryAuth::Basic(USER.to_string(), PASSWORD.to_string());

    let err = push_plain(&client, &reference, &image.layers, &image.config)
        .await
        .expect_err("anonymous push must be refused");
    assert!(err.is_permission(), "{err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    let pushed = client
        .push_image(&reference, &image.layers, &image.config, BTreeMap::new(), &auth)
        .await
        .expect("push with credentials");
    let pulled = client
        .pull_manifest_and_config(&reference, &auth)
        .await
        .expect("pull with credentials");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);

    let wrong = RegistryAuth::Basic(USER.to_string(), "wrong".to_string());
    let err = client
        .pull_manifest_and_config(&reference, &wrong)
        .await
        .expect_err("wrong password");
    assert!(err.is_permission(), "{err}");
    assert!(!err.to_string().contains("wrong"), "no secret in the message: {err}");
    assert!(!err.to_string().contains(PASSWORD));
}

#[tokio::test]
async fn tls_without_verification_only_when_insecure() {
    let registry = Registry::start(Flavour::Tls);
    let image = test_image();
    let reference = format!("{}/tls/app:v1", registry.host());

    let insecure = RegistryClient::new(fast_options(true));
    let pushed = insecure
        .push_image(
            &reference,
            &image.layers,
            &image.config,
            BTreeMap::new(),
            &RegistryAuth::Anonymous,
        )
        .await
        .expect("push over TLS with a self-signed certificate");
    let pulled = insecure
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("pull over TLS");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);

    let verifying = RegistryClient::new(fast_options(false));
    let err = verifying
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("an untrusted certificate must be refused");
    assert!(matches!(err, RegistryError::UntrustedCertificate { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
}

/// A stand-in registry on plain HTTP that answers the `/v2/` ping with 200
/// and every other request with `status`, counting requests by method. It
/// drops TLS handshakes at once, so an insecure client falls back to HTTP.
struct FailingRegistry {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FailingRegistry {
    fn start(status: u16) -> FailingRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake registry");
        let port = listener.local_addr().expect("local address").port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) if head.is_empty() && byte[0] == 0x16 => break, // TLS ClientHello
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                if !head.ends_with(b"\r\n\r\n") {
                    continue;
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let response = if line.starts_with("GET /v2/ ") {
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string()
                } else {
                    format!("HTTP/1.1 {status} Failing\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                };
                seen.lock().expect("request log").push(line);
                let _ = stream.write_all(response.as_bytes());
            }
        });
        FailingRegistry { port, requests }
    }

    /// Requests whose request line starts with `prefix`.
    fn count(&self, prefix: &str) -> usize {
        self.requests
            .lock()
            .expect("request log")
            .iter()
            .filter(|line| line.starts_with(prefix))
            .count()
    }
}

#[tokio::test]
async fn server_errors_are_retried_and_client_errors_are_not() {
    let image = test_image();
    let options = RegistryOptions {
        insecure: true,
        retries: 3,
        retry_base_delay: Duration::from_millis(10),
        ..RegistryOptions::default()
    };

    let busy = FailingRegistry::start(503);
    let client = RegistryClient::new(options.clone());
    let err = push_plain(
        &client,
        &format!("127.0.0.1:{}/commits/app:v1", busy.port),
        &image.layers,
        &image.config,
    )
    .await
    .expect_err("the registry always fails");
    assert!(
        matches!(err, RegistryError::Registry { status: Some(503), .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(
        busy.count("HEAD /v2/commits/app/blobs/"),
        4,
        "one attempt and three retries of the first blob"
    );

    let limited = FailingRegistry::start(429);
    let err = client
        .pull_manifest_and_config(
            &format!("127.0.0.1:{}/commits/app:v1", limited.port),
            &RegistryAuth::Anonymous,
        )
        .await
        .expect_err("the registry always fails");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert_eq!(
        limited.count("GET /v2/commits/app/manifests/"),
        4,
        "one attempt and three retries"
    );

    let refusing = FailingRegistry::start(400);
    let err = push_plain(
        &client,
        &format!("127.0.0.1:{}/commits/app:v1", refusing.port),
        &image.layers,
        &image.config,
    )
    .await
    .expect_err("the registry refuses");
    assert!(
        matches!(err, RegistryError::Registry { status: Some(400), .. }),
        "{err}"
    );
    assert_eq!(refusing.count("HEAD /v2/commits/app/blobs/"), 1, "a 4xx is not retried");

    let forbidding = FailingRegistry::start(403);
    let err = push_plain(
        &client,
        &format!("127.0.0.1:{}/commits/app:v1", forbidding.port),
        &image.layers,
        &image.config,
    )
    .await
    .expect_err("the registry forbids");
    assert!(err.is_permission(), "{err}");
    assert_eq!(
        forbidding.count("HEAD /v2/commits/app/blobs/"),
        1,
        "a denial is not retried"
    );
}

/// How the stand-in registry below answers one request.
#[derive(Clone)]
enum Answer {
    /// A body with an honest `Content-Length`.
    Body(Vec<u8>),
    /// A chunked body (no length said) of `count` copies of `chunk`: a
    /// registry that streams more than it should.
    Chunked { chunk: Vec<u8>, count: usize },
}

/// A registry on plain HTTP that answers the `/v2/` ping and, for every other
/// GET, what `answer` says for its path (404 for None). One thread per
/// connection; each answer closes its connection.
struct HostileRegistry {
    port: u16,
}

impl HostileRegistry {
    fn start(answer: impl Fn(&str) -> Option<Answer> + Send + Sync + 'static) -> HostileRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake registry");
        let port = listener.local_addr().expect("local address").port();
        let answer = std::sync::Arc::new(answer);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                        match stream.read(&mut byte) {
                            Ok(1) if head.is_empty() && byte[0] == 0x16 => return, // TLS ClientHello
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let path = line.split(' ').nth(1).unwrap_or_default().to_string();
                    let reply = if path == "/v2/" {
                        Some(Answer::Body(b"{}".to_vec()))
                    } else {
                        answer(&path)
                    };
                    match reply {
                        None => {
                            let _ = stream
                                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        }
                        Some(Answer::Body(body)) => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = stream.write_all(head.as_bytes());
                            let _ = stream.write_all(&body);
                        }
                        Some(Answer::Chunked { chunk, count }) => {
                            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                            if stream.write_all(head.as_bytes()).is_err() {
                                return;
                            }
                            for _ in 0..count {
                                let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
                                piece.extend_from_slice(&chunk);
                                piece.extend_from_slice(b"\r\n");
                                // The client hangs up once it has read enough.
                                if stream.write_all(&piece).is_err() {
                                    return;
                                }
                            }
                            let _ = stream.write_all(b"0\r\n\r\n");
                        }
                    }
                });
            }
        });
        HostileRegistry { port }
    }

    fn reference(&self) -> String {
        format!("127.0.0.1:{}/hostile/app:v1", self.port)
    }
}

/// A manifest whose config is `config` and whose one layer is `layer`.
fn manifest_of(config: &[u8], config_size: usize, layer: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config),
            "size": config_size,
        },
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": sha256(layer),
            "size": layer.len(),
        }],
    }))
    .expect("manifest serialises")
}

#[tokio::test]
async fn oversized_manifests_are_refused_before_they_are_read_whole() {
    let client = RegistryClient::new(fast_options(true));
    // 5 MiB of JSON padding, its length said: refused from the header.
    let padded = {
        let mut manifest = manifest_of(b"{}", 2, b"layer");
        manifest.pop();
        manifest.extend_from_slice(br#","annotations":{"pad":""#);
        manifest.extend(std::iter::repeat_n(b'x', 5 << 20));
        manifest.extend_from_slice(br#""}}"#);
        manifest
    };
    let honest = HostileRegistry::start(move |path| path.contains("/manifests/").then(|| Answer::Body(padded.clone())));
    let err = client
        .pull_manifest_and_config(&honest.reference(), &RegistryAuth::Anonymous)
        .await
        .expect_err("a 5 MiB manifest");
    assert!(
        matches!(err, RegistryError::TooLarge { limit, .. } if limit == 4 << 20),
        "{err}"
    );
    assert!(
        err.to_string().contains("manifest 127.0.0.1"),
        "names the manifest: {err}"
    );

    // An endless chunked body (up to 256 MiB here): cut off past 4 MiB.
    let endless = HostileRegistry::start(|path| {
        path.contains("/manifests/").then(|| Answer::Chunked {
            chunk: vec![b' '; 64 << 10],
            count: 4096,
        })
    });
    let err = client
        .pull_manifest_and_config(&endless.reference(), &RegistryAuth::Anonymous)
        .await
        .expect_err("an endless manifest");
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");

    // The size a registry reports for a snapshotter's layer comes from the
    // same bounded read.
    let err = client
        .layer_size(&endless.reference(), &sha256(b"layer"), &RegistryAuth::Anonymous)
        .await
        .expect_err("an endless manifest");
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn configs_and_blobs_are_read_no_further_than_their_descriptors() {
    let client = RegistryClient::new(fast_options(true));
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let layer = vec![7u8; 100_000];

    // A config whose descriptor says more than a config may be.
    let huge = manifest_of(&config, 64 << 20, &layer);
    let registry = HostileRegistry::start(move |path| path.contains("/manifests/").then(|| Answer::Body(huge.clone())));
    let err = client
        .pull_manifest_and_config(&registry.reference(), &RegistryAuth::Anonymous)
        .await
        .expect_err("a 64 MiB config");
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("config blob"), "{err}");

    // A registry that serves more than the descriptors say, with and without
    // a length: the manifest is read, the config and the blob are not.
    for chunked in [false, true] {
        let (manifest, served_config, served_layer) = (
            manifest_of(&config, config.len(), &layer),
            config.clone(),
            layer.clone(),
        );
        let config_path = format!("/blobs/{}", sha256(&config));
        let layer_path = format!("/blobs/{}", sha256(&layer));
        let registry = HostileRegistry::start(move |path| {
            let longer = |data: &[u8]| {
                let chunk = [data, b"and more"].concat();
                if chunked {
                    Answer::Chunked { chunk, count: 1000 }
                } else {
                    Answer::Body(chunk)
                }
            };
            if path.contains("/manifests/") {
                Some(Answer::Body(manifest.clone()))
            } else if path.ends_with(&config_path) {
                Some(longer(&served_config))
            } else if path.ends_with(&layer_path) {
                Some(longer(&served_layer))
            } else {
                None
            }
        });
        let err = client
            .pull_manifest_and_config(&registry.reference(), &RegistryAuth::Anonymous)
            .await
            .expect_err("a config longer than its descriptor");
        assert!(
            matches!(&err, RegistryError::SizeMismatch { blob, expected, .. } if blob.contains("config blob") && *expected == config.len() as u64),
            "chunked {chunked}: {err}"
        );

        let size = client
            .layer_size(&registry.reference(), &sha256(&layer), &RegistryAuth::Anonymous)
            .await
            .expect("the manifest declares the layer");
        assert_eq!(size, layer.len() as u64);
        let out = tempfile::tempdir().expect("temp dir");
        let dest = out.path().join("blob");
        let err = client
            .pull_blob_to(
                &registry.reference(),
                &sha256(&layer),
                size,
                &dest,
                &RegistryAuth::Anonymous,
            )
            .await
            .expect_err("a blob longer than its descriptor");
        assert!(
            matches!(&err, RegistryError::SizeMismatch { expected, .. } if *expected == size),
            "chunked {chunked}: {err}"
        );
        assert!(err.to_string().contains(&sha256(&layer)), "names the blob: {err}");
        assert_eq!(std::fs::read_dir(out.path()).expect("list").count(), 0, "no file left");

        let err = client
            .layer_size(&registry.reference(), &sha256(b"not a layer"), &RegistryAuth::Anonymous)
            .await
            .expect_err("not in the image");
        assert!(matches!(err, RegistryError::NotInImage { .. }), "{err}");
    }
}

/// Credentials by registry host, as a credential helper would give them.
#[derive(Debug, Default)]
struct FixedCredentials(std::collections::HashMap<String, (String, String)>);

impl FixedCredentials {
    fn with(host: &str, user: &str, password: &str) -> std::sync::Arc<FixedCredentials> {
        let mut map = std::collections::HashMap::new();
        map.insert(host.to_string(), (user.to_string(), password.to_string()));
        std::sync::Arc::new(FixedCredentials(map))
    }
}

impl CredentialSource for FixedCredentials {
    fn credentials(&self, host: &str) -> Result<Option<RegistryAuth>, String> {
        Ok(self
            .0
            .get(host)
            .map(|(user, password)| RegistryAuth::Basic(user.clone(), password.clone())))
    }
}

/// A private CA (`ca.crt`), a second CA (`other-ca.crt`) and a server
/// certificate for 127.0.0.1 the first signs (`server.crt`, `server.key`),
/// made by tests/tls/make-certs.sh.
fn private_ca(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/make-certs.sh");
    let certs = dir.join("certs");
    let output = Command::new("sh")
        .arg(&script)
        .arg(&certs)
        .output()
        .expect("run make-certs.sh");
    assert!(
        output.status.success(),
        "make-certs.sh failed (it needs openssl): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    certs
}

/// Writes `<certs.d>/<host>/hosts.toml` with `text`.
fn write_hosts(certs_d: &Path, host: &str, text: &str) -> PathBuf {
    let dir = certs_d.join(host);
    std::fs::create_dir_all(&dir).expect("host dir");
    let path = dir.join("hosts.toml");
    std::fs::write(&path, text).expect("write hosts.toml");
    path
}

fn options_with(certs_d: &Path, credentials: Option<std::sync::Arc<dyn CredentialSource>>) -> RegistryOptions {
    RegistryOptions {
        hosts: RegistryHosts::at(certs_d),
        credentials,
        ..fast_options(false)
    }
}

/// A registry behind TLS with a private CA and htpasswd basic auth: the CA
/// named in hosts.toml makes it trusted, the credential source's
/// credentials for its host let the push and pulls through, the call's own
/// credentials win over the source's, and a wrong password is a permission
/// error at once, without the password in it.
#[tokio::test]
async fn tls_with_a_private_ca_from_hosts_toml_and_credentials_from_the_source() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = private_ca(dir.path());
    let registry = Registry::start_with(Setup {
        tls: Some((certs.join("server.crt"), certs.join("server.key"))),
        basic_auth: true,
        ..Setup::default()
    });
    let host = registry.host();
    let certs_d = dir.path().join("certs.d");
    write_hosts(
        &certs_d,
        &host,
        &format!("server = \"https://{host}\"\nca = \"ca.crt\"\n"),
    );
    std::fs::copy(certs.join("ca.crt"), certs_d.join(&host).join("ca.crt")).expect("copy CA");
    let image = test_image();
    let reference = format!("{host}/private/app:v1");

    let client = RegistryClient::new(options_with(
        &certs_d,
        Some(FixedCredentials::with(&host, USER, PASSWORD)),
    ));
    let pushed = push_and_pull_back(
        &client,
        &reference,
        &image,
        "over TLS trusted by the CA in hosts.toml, credentials from the source",
    )
    .await;

    // No credentials: the registry refuses.
    let anonymous = RegistryClient::new(options_with(&certs_d, None));
    let err = anonymous
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("anonymous pull of a private registry");
    assert!(err.is_permission(), "{err}");

    // The call's own credentials win over the source's (wrong) ones.
    let wrong_source = RegistryClient::new(options_with(
        &certs_d,
        Some(FixedCredentials::with(&host, USER, "not-the-password")),
    ));
    let explicit = RegistryAuth::Basic(USER.to_string(), PASSWORD.to_string());
    let again = wrong_source
        .pull_manifest_and_config(&reference, &explicit)
        .await
        .expect("explicit credentials");
    assert_eq!(again.manifest_digest, pushed.manifest_digest);

    // A wrong password: a permission error naming the registry, no secret,
    // and not retried (the client's options allow two retries).
    let manifests = "/v2/private/app/manifests/";
    let before = registry.requests("GET", manifests);
    let err = wrong_source
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("wrong password");
    assert!(err.is_permission(), "{err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    let message = err.to_string();
    assert!(message.contains(&host), "names the registry: {message}");
    assert!(!message.contains("not-the-password"), "no secret: {message}");
    assert!(!message.contains(PASSWORD), "no secret: {message}");
    assert!(!format!("{err:?}").contains("not-the-password"), "no secret: {err:?}");
    assert_eq!(
        registry.requests("GET", manifests) - before,
        1,
        "one attempt, no retry: {}",
        registry.log_text()
    );

    // Without the CA the certificate is not trusted, whatever the credentials.
    let no_ca = RegistryClient::new(RegistryOptions {
        credentials: Some(FixedCredentials::with(&host, USER, PASSWORD)),
        ..fast_options(false)
    });
    let err = no_ca
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("a private CA not configured");
    assert!(matches!(err, RegistryError::UntrustedCertificate { .. }), "{err}");
    assert!(err.to_string().contains(&host), "{err}");
    // Nor with another CA in hosts.toml.
    let other_d = dir.path().join("other.d");
    write_hosts(
        &other_d,
        &host,
        &format!(
            "server = \"https://{host}\"\nca = {:?}\n",
            certs.join("other-ca.crt").display().to_string()
        ),
    );
    let err = RegistryClient::new(options_with(
        &other_d,
        Some(FixedCredentials::with(&host, USER, PASSWORD)),
    ))
    .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
    .await
    .expect_err("a CA that did not sign the certificate");
    assert!(matches!(err, RegistryError::UntrustedCertificate { .. }), "{err}");
}

/// A mirror named in hosts.toml serves pulls (and is asked first), pushes
/// go to the server only, a dead mirror gives way to the server, and once
/// the upstream is stopped the mirror alone serves the image.
#[tokio::test]
async fn a_mirror_serves_pulls_and_the_upstream_takes_pushes() {
    let upstream = Registry::start(Flavour::Plain);
    let mirror = Registry::start(Flavour::Plain);
    let (up, mirror_host) = (upstream.host(), mirror.host());
    let dir = tempfile::tempdir().expect("temp dir");
    let certs_d = dir.path().join("certs.d");
    write_hosts(
        &certs_d,
        &up,
        &format!(
            "server = \"http://{up}\"\n\n[host.\"http://{mirror_host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    );
    let image = test_image();
    let reference = format!("{up}/mirrored/app:v1");
    let client = RegistryClient::new(options_with(&certs_d, None));
    let pushed = push_plain(&client, &reference, &image.layers, &image.config)
        .await
        .expect("push through hosts.toml");
    assert_eq!(mirror.requests("PUT", "/v2/"), 0, "a pull-only mirror takes no push");
    assert_eq!(mirror.requests("POST", "/v2/"), 0, "a pull-only mirror takes no push");
    assert_eq!(upstream.requests("PUT", "/v2/mirrored/app/manifests/v1"), 1);

    // The mirror is asked first: it lacks the image, so the server serves.
    let pulled = client
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("pull falls back to the server");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert_eq!(mirror.requests("GET", "/v2/mirrored/app/manifests/v1"), 1);

    // A mirror nobody listens on gives way to the server.
    let dead_d = dir.path().join("dead.d");
    write_hosts(
        &dead_d,
        &up,
        &format!(
            "server = \"http://{up}\"\n[host.\"http://127.0.0.1:{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            free_port()
        ),
    );
    let dead_mirror = RegistryClient::new(options_with(&dead_d, None));
    let pulled = dead_mirror
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("pull past a dead mirror");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);

    // The mirror receives the image, then the upstream goes down.
    let direct = RegistryClient::new(fast_options(false));
    push_plain(
        &direct,
        &format!("{mirror_host}/mirrored/app:v1"),
        &image.layers,
        &image.config,
    )
    .await
    .expect("fill the mirror");
    drop(upstream);
    let pulled = client
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("the mirror serves while the upstream is down");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    pull_layer_back(&client, &reference, &image, 1, "from the mirror").await;
    assert!(
        mirror.requests("GET", "/v2/mirrored/app/blobs/") >= 2,
        "{}",
        mirror.log_text()
    );

    // Pushes never go to the mirror: with the upstream down they fail.
    let err = push_plain(&client, &format!("{up}/mirrored/app:v2"), &image.layers, &image.config)
        .await
        .expect_err("the only push endpoint is down");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains(&up), "{err}");
}

/// A registry name that is no host at all reaches a plain-HTTP registry
/// through hosts.toml's `server`, without any insecure flag; a loopback
/// registry needs no file either.
#[tokio::test]
async fn plain_http_hosts_need_no_insecure_flag() {
    let registry = Registry::start(Flavour::Plain);
    let dir = tempfile::tempdir().expect("temp dir");
    let certs_d = dir.path().join("certs.d");
    let name = "registry.seamless.invalid:5000";
    write_hosts(&certs_d, name, &format!("server = \"http://{}\"\n", registry.host()));
    let image = test_image();
    let reference = format!("{name}/plain/app:v1");
    let client = RegistryClient::new(options_with(&certs_d, None));
    let pushed = push_plain(&client, &reference, &image.layers, &image.config)
        .await
        .expect("push to a plain-HTTP server named in hosts.toml");
    assert_eq!(registry.requests("PUT", "/v2/plain/app/manifests/v1"), 1);
    let pulled = client
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("pull back");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);

    // Without the file the name reaches nothing.
    let err = RegistryClient::new(fast_options(false))
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("no such host");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    // Loopback: HTTPS is tried, then plain HTTP, with no flag and no file.
    let loopback = format!("{}/plain/app:v1", registry.host());
    let pulled = RegistryClient::new(fast_options(false))
        .pull_manifest_and_config(&loopback, &RegistryAuth::Anonymous)
        .await
        .expect("a loopback registry over plain HTTP");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
}

/// A hosts.toml that cannot be used fails every call on its registry with
/// an error naming the file and the field, before any request.
#[tokio::test]
async fn a_bad_hosts_toml_is_a_clear_error() {
    let registry = Registry::start(Flavour::Plain);
    let host = registry.host();
    let dir = tempfile::tempdir().expect("temp dir");
    let certs_d = dir.path().join("certs.d");
    let reference = format!("{host}/bad/app:v1");
    for (text, field) in [
        ("capabilities = [\"pull\", \"delete\"]\n", "capabilities"),
        (
            "[host.\"https://mirror.example\"]\nclient = [\"c.pem\", \"k.pem\"]\n",
            "c.pem",
        ),
        (
            "[host.\"https://mirror.example\"]\nca = \"missing.crt\"\n",
            "missing.crt",
        ),
        ("server = \"https://mirror.example/some/path\"\n", "path \"/some/path\""),
        ("server = [\n", "hosts.toml"),
        ("skip_verfy = true\n", "skip_verfy"),
    ] {
        let path = write_hosts(&certs_d, &host, text);
        let client = RegistryClient::new(options_with(&certs_d, None));
        let err = client
            .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
            .await
            .expect_err(text);
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{text}: {message}");
        assert!(message.contains(field), "{text}: {message}");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{text}: {message}");
    }
    assert_eq!(registry.requests("GET", "/v2/"), 0, "no request made");

    // Only push-incapable endpoints: a push has nowhere to go.
    write_hosts(&certs_d, &host, "capabilities = [\"pull\", \"resolve\"]\n");
    let image = test_image();
    let err = push_plain(
        &RegistryClient::new(options_with(&certs_d, None)),
        &reference,
        &image.layers,
        &image.config,
    )
    .await
    .expect_err("no push endpoint");
    assert!(matches!(err, RegistryError::NoEndpoint { .. }), "{err}");
}

const TOKEN_SERVICE: &str = "seamless-test-registry";
const TOKEN_ISSUER: &str = "seamless-test-issuer";

/// A token server as docker-registry's token auth expects one: it answers
/// `GET /token?service=&scope=` given `USER`/`PASSWORD` in basic auth with a
/// JWT (RS256, signed by `openssl dgst` with its key, its certificate in
/// `x5c`) granting the scopes asked, and 401 otherwise. Counts the tokens
/// it issued and the refusals.
struct TokenServer {
    realm: String,
    certificate: PathBuf,
    issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TokenServer {
    fn start(dir: &Path) -> TokenServer {
        TokenServer::start_expiring(dir, 0)
    }

    /// A token server whose first `expired` tokens expired before they
    /// were issued (by more than the registry's 60 s leeway for clock
    /// skew): what a client holding a token past its lifetime sends.
    fn start_expiring(dir: &Path, expired: usize) -> TokenServer {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (certificate, key) = (dir.join("token.crt"), dir.join("token.key"));
        let made = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=seamless token",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&certificate)
            .output()
            .expect("openssl req");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&certificate)
            .output()
            .expect("openssl x509");
        assert!(der.status.success());
        let x5c = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&der.stdout)
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the token server");
        let realm = format!("http://{}/token", listener.local_addr().expect("address"));
        let issued = std::sync::Arc::new(AtomicUsize::new(0));
        let refused = std::sync::Arc::new(AtomicUsize::new(0));
        let (issued_count, refused_count) = (issued.clone(), refused.clone());
        std::thread::spawn(move || {
            let mut expired_left = expired;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let granted = serve_token(stream, &key, &x5c, expired_left > 0);
                if granted {
                    expired_left = expired_left.saturating_sub(1);
                }
                let counter = if granted { &issued_count } else { &refused_count };
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        TokenServer {
            realm,
            certificate,
            issued,
            refused,
        }
    }

    fn issued(&self) -> usize {
        self.issued.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Answers one token request; whether a token was granted.
fn serve_token(stream: TcpStream, key: &Path, x5c: &str, expired: bool) -> bool {
    use base64::Engine as _;
    use std::io::{BufRead, BufReader, Write};
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return false;
    }
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                let expected = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
                authorized = value.trim() == format!("Basic {expected}");
            }
        }
    }
    let mut stream = reader.into_inner();
    if !authorized {
        let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return false;
    }
    // scope=repository:<name>:<actions>, each scope parameter one grant.
    let query = request_line
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.split_once('?'))
        .map(|(_, q)| q.to_string());
    let access: Vec<serde_json::Value> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("scope="))
        .filter_map(|scope| {
            let scope = scope.replace("%3A", ":").replace("%2C", ",").replace("%2F", "/");
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
    let issued_at = if expired { now - 900 } else { now };
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE, "exp": issued_at + 300, "nbf": issued_at - 10,
        "iat": issued_at, "jti": format!("{now}-{}", rand_id()), "access": access,
    });
    let signing_input = format!("{}.{}", url.encode(header.to_string()), url.encode(claims.to_string()));
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl dgst");
    openssl
        .stdin
        .take()
        .expect("stdin")
        .write_all(signing_input.as_bytes())
        .expect("sign input");
    let signature = openssl.wait_with_output().expect("signature").stdout;
    let token = format!("{signing_input}.{}", url.encode(signature));
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    true
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    hasher.finish()
}

/// A registry with token auth (`WWW-Authenticate: Bearer realm=...`): the
/// client fetches a token from the realm with the source's credentials and
/// pushes and pulls with it; without credentials, or with a wrong password,
/// the token server refuses and the call is a permission error at once.
#[tokio::test]
async fn bearer_tokens_from_the_realm_with_the_sources_credentials() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = TokenServer::start(dir.path());
    let registry = Registry::start_with(Setup {
        token: Some((tokens.realm.clone(), tokens.certificate.clone())),
        ..Setup::default()
    });
    let host = registry.host();
    let image = test_image();
    let reference = format!("{host}/bearer/app:v1");

    let anonymous = RegistryClient::new(fast_options(false));
    let err = push_plain(&anonymous, &reference, &image.layers, &image.config)
        .await
        .expect_err("anonymous push to a token registry");
    assert!(err.is_permission(), "{err}");

    let client = RegistryClient::new(RegistryOptions {
        credentials: Some(FixedCredentials::with(&host, USER, PASSWORD)),
        ..fast_options(false)
    });
    push_and_pull_back(&client, &reference, &image, "with a bearer token").await;
    assert!(tokens.issued() > 0, "the client asked the realm for a token");

    let refused_before = tokens.refused();
    let wrong = RegistryClient::new(RegistryOptions {
        credentials: Some(FixedCredentials::with(&host, USER, "not-the-password")),
        ..fast_options(false)
    });
    let err = wrong
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("a wrong password");
    assert!(err.is_permission(), "{err}");
    assert!(!err.to_string().contains("not-the-password"), "no secret in {err}");
    assert!(
        tokens.refused() > refused_before,
        "the realm refused the wrong password"
    );
}

/// A token that expires mid-call (the registry refuses it with 401) is
/// fetched again, once, and the call goes on with the new one; a token
/// service that only ever issues expired tokens is a permission error after
/// that one renewal, not a loop.
#[tokio::test]
async fn an_expired_bearer_token_is_renewed_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The token of the call's auth challenge has expired; the next is good.
    let tokens = TokenServer::start_expiring(dir.path(), 1);
    let registry = Registry::start_with(Setup {
        token: Some((tokens.realm.clone(), tokens.certificate.clone())),
        ..Setup::default()
    });
    let host = registry.host();
    let image = test_image();
    let reference = format!("{host}/expiring/app:v1");
    let client = RegistryClient::new(RegistryOptions {
        credentials: Some(FixedCredentials::with(&host, USER, PASSWORD)),
        ..fast_options(false)
    });
    let pushed = push_plain(&client, &reference, &image.layers, &image.config)
        .await
        .expect("push, renewing the expired token");
    assert_eq!(tokens.issued(), 2, "the expired token and its one renewal");
    assert!(
        registry.requests("HEAD", "/v2/expiring/app/blobs/") >= 2,
        "the refused request was sent again: {}",
        registry.log_text()
    );
    let pulled = client
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("pull back");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);

    let always_dir = tempfile::tempdir().expect("temp dir");
    let stale = TokenServer::start_expiring(always_dir.path(), usize::MAX);
    let stale_registry = Registry::start_with(Setup {
        token: Some((stale.realm.clone(), stale.certificate.clone())),
        ..Setup::default()
    });
    let stale_host = stale_registry.host();
    let stale_client = RegistryClient::new(RegistryOptions {
        credentials: Some(FixedCredentials::with(&stale_host, USER, PASSWORD)),
        ..fast_options(false)
    });
    let err = stale_client
        .pull_manifest_and_config(&format!("{stale_host}/expiring/app:v1"), &RegistryAuth::Anonymous)
        .await
        .expect_err("every token expired");
    assert!(err.is_permission(), "{err}");
    assert!(!err.to_string().contains(PASSWORD), "no secret in {err}");
    assert_eq!(stale.issued(), 2, "one token for the call, one renewal, no more");
}

/// A client certificate and key signed by `certs/ca.crt`, for mutual TLS:
/// `client.crt`, `client.key` (0600) and `client.pem` holding both (0600).
fn client_certificate(certs: &Path) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(certs)
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=seamless test client",
    ]);
    std::fs::write(certs.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("write client.ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.crt",
        "-days",
        "2",
        "-extfile",
        "client.ext",
    ]);
    let both = [
        std::fs::read(certs.join("client.crt")).expect("read client.crt"),
        std::fs::read(certs.join("client.key")).expect("read client.key"),
    ]
    .concat();
    std::fs::write(certs.join("client.pem"), both).expect("write client.pem");
    owner_only(&certs.join("client.key"), 0o600);
    owner_only(&certs.join("client.pem"), 0o600);
}

fn owner_only(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A registry that requires a client certificate its CA signed (mutual
/// TLS): `client` in hosts.toml, as one PEM file holding certificate and
/// key or as a [certificate, key] pair, lets pushes and pulls through;
/// without it the handshake is refused with a TLS error that says so; a key
/// file others may read is refused before any request.
#[tokio::test]
async fn client_certificates_from_hosts_toml_for_a_registry_that_requires_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = private_ca(dir.path());
    client_certificate(&certs);
    let registry = Registry::start_with(Setup {
        tls: Some((certs.join("server.crt"), certs.join("server.key"))),
        client_cas: Some(certs.join("ca.crt")),
        ..Setup::default()
    });
    let host = registry.host();
    let image = test_image();
    let ca = certs.join("ca.crt").display().to_string();

    // One file with certificate and key.
    let single_d = dir.path().join("single.d");
    write_hosts(
        &single_d,
        &host,
        &format!(
            "server = \"https://{host}\"\nca = {ca:?}\nclient = {:?}\n",
            certs.join("client.pem").display().to_string()
        ),
    );
    let single = RegistryClient::new(options_with(&single_d, None));
    let reference = format!("{host}/mtls/app:v1");
    let pushed = push_plain(&single, &reference, &image.layers, &image.config)
        .await
        .expect("push with the client certificate of one PEM file");
    let pulled = single
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("pull with the client certificate of one PEM file");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert_eq!(pulled.config, image.config);

    // A [certificate, key] pair, relative to the host directory.
    let pair_d = dir.path().join("pair.d");
    write_hosts(
        &pair_d,
        &host,
        &format!("server = \"https://{host}\"\nca = {ca:?}\nclient = [[\"client.crt\", \"client.key\"]]\n"),
    );
    for name in ["client.crt", "client.key"] {
        std::fs::copy(certs.join(name), pair_d.join(&host).join(name)).expect("copy client file");
    }
    owner_only(&pair_d.join(&host).join("client.key"), 0o600);
    let pair = RegistryClient::new(options_with(&pair_d, None));
    let second = format!("{host}/mtls/app:v2");
    push_plain(&pair, &second, &image.layers, &image.config)
        .await
        .expect("push with a certificate and key pair");
    pull_layer_back(&pair, &second, &image, 0, "with a certificate and key pair").await;

    // Without a client certificate the registry refuses the handshake.
    let none_d = dir.path().join("none.d");
    write_hosts(&none_d, &host, &format!("server = \"https://{host}\"\nca = {ca:?}\n"));
    let err = RegistryClient::new(options_with(&none_d, None))
        .pull_manifest_and_config(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("no client certificate");
    assert!(matches!(err, RegistryError::ClientCertificateRefused { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&host), "{message}");
    assert!(message.contains("client certificate"), "{message}");

    // A key file others may read is refused, naming it, before any request.
    owner_only(&pair_d.join(&host).join("client.key"), 0o644);
    let before = registry.log_text().lines().count();
    let err = pair
        .pull_manifest_and_config(&second, &RegistryAuth::Anonymous)
        .await
        .expect_err("a key file readable by others");
    let message = err.to_string();
    assert!(message.contains("client.key"), "{message}");
    assert!(message.contains("other users"), "{message}");
    assert!(message.contains("server.client"), "{message}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{message}");
    assert_eq!(registry.log_text().lines().count(), before, "no request made");
}
