//! Checkpoint objects in a bucket of any S3-compatible server (AWS S3, MinIO,
//! Ceph RGW, ...): the `ObjectStore` of the "s3" backend, on object_store's
//! S3 client, which signs requests, uploads large objects in parts and pages
//! through listings. Owns where keys go in the bucket (under a prefix), the
//! bridge from the trait's blocking calls to that async client, and the
//! translation of its errors. Knows nothing of what the objects mean, and
//! must never let the secret key into a message or a `Debug` output.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore as _, ObjectStoreExt as _, PutPayload, RetryConfig, WriteMultipart};
use tokio_stream::{Stream, StreamExt};

use super::objects::{validate_key, ImmediateBatch, ObjectError, ObjectStore, PutBatch};
use crate::error::IoError;

/// Files up to this size go in one PUT; larger ones in parts of at least
/// this size, so that an upload holds a few parts in memory, never the file.
const PART_SIZE: u64 = 8 << 20;
/// S3 takes at most 10,000 parts per upload: parts grow for files so large
/// that 8 MiB parts would need more (with a margin for the rounding).
const MAX_PARTS: u64 = 9_000;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// One request, from connecting to its last byte: long enough for a part
/// on a slow link. Reads of an object that outlive it resume where they
/// were (object_store retries a body with a range request).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// What requests are signed for when the config names no region; the
/// region most S3-compatible servers expect.
const DEFAULT_REGION: &str = "us-east-1";

/// Where checkpoint objects live on S3.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket, which must exist.
    pub bucket: String,
    /// The region requests are signed for; empty means us-east-1.
    pub region: String,
    /// `http://` or `https://` URL of an S3-compatible server, addressed
    /// path-style (`<endpoint>/<bucket>/<key>`); empty means AWS.
    pub endpoint: String,
    /// Access key id. Empty, with `secret_key` empty too, means the
    /// credentials of the instance's role (EC2 or ECS metadata) on AWS.
    pub access_key: String,
    /// Secret access key: never printed.
    pub secret_key: String,
    /// Folder of the bucket the objects go under, e.g.
    /// "seamless-checkpoints"; empty means the root of the bucket.
    pub prefix: String,
}

impl S3Config {
    /// Why this config cannot work, if it cannot. Messages never repeat
    /// a credential.
    pub fn validate(&self) -> Result<(), String> {
        if self.bucket.is_empty()
            || !self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(format!(
                "bucket {:?} is not a bucket name (letters, digits and -._)",
                self.bucket
            ));
        }
        let prefix = self.prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|e| format!("prefix: {e}"))?;
        }
        if !self.endpoint.is_empty() {
            let Some(rest) = self
                .endpoint
                .strip_prefix("http://")
                .or_else(|| self.endpoint.strip_prefix("https://"))
            else {
                return Err(format!(
                    "endpoint {:?} is not an http:// or https:// URL",
                    without_userinfo(&self.endpoint)
                ));
            };
            let authority = rest.split('/').next().unwrap_or_default();
            if authority.contains('@') {
                return Err("endpoint must not carry credentials: set access_key and secret_key".into());
            }
            // Not repeated: a query may carry a token.
            if authority.is_empty() || rest.contains(['?', '#']) {
                return Err("endpoint is not a server URL (a host, an optional port and path)".into());
            }
        }
        if self.access_key.is_empty() != self.secret_key.is_empty() {
            return Err("access_key and secret_key are set together or not at all".into());
        }
        Ok(())
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = if self.secret_key.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &without_userinfo(&self.endpoint))
            .field("access_key", &self.access_key)
            .field("secret_key", &secret)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Checkpoint objects as S3 objects named `<prefix>/<key>`. S3 replaces an
/// object atomically on PUT and on completing a multipart upload, so writes
/// are whole or absent without temporaries. `open` streams the object as
/// the caller reads it rather than downloading it first.
pub struct S3Store {
    client: AmazonS3,
    bucket: Arc<Bucket>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the client: its configuration holds the credentials.
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket.name)
            .field("prefix", &self.bucket.prefix)
            .field("endpoint", &self.bucket.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// A store on the bucket `config` names. Sends no request: a bucket
    /// that is missing or unreachable shows in the first call.
    pub fn new(config: &S3Config) -> Result<S3Store, ObjectError> {
        S3Store::with_retry(config, RetryConfig::default())
    }

    fn with_retry(config: &S3Config, retry: RetryConfig) -> Result<S3Store, ObjectError> {
        let bucket = Arc::new(Bucket::new(config));
        let invalid = |reason: String| {
            ObjectError::Io(IoError {
                op: "configure",
                path: bucket.describe(),
                source: io::Error::new(io::ErrorKind::InvalidInput, reason),
            })
        };
        config.validate().map_err(invalid)?;
        install_crypto_provider();
        let options = ClientOptions::new()
            .with_allow_http(config.endpoint.starts_with("http://"))
            .with_timeout(REQUEST_TIMEOUT);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(bucket.region.as_str())
            .with_virtual_hosted_style_request(false)
            .with_client_options(options)
            .with_retry(retry);
        if !config.endpoint.is_empty() {
            builder = builder.with_endpoint(config.endpoint.trim_end_matches('/'));
        }
        if !config.access_key.is_empty() {
            builder = builder
                .with_access_key_id(&config.access_key)
                .with_secret_access_key(&config.secret_key);
        }
        let client = builder.build().map_err(|e| invalid(bucket.scrub(e.to_string())))?;
        Ok(S3Store { client, bucket })
    }

    async fn upload_parts(
        &self,
        path: &ObjectPath,
        key: &str,
        file: &mut File,
        source: &Path,
        part_size: usize,
    ) -> Result<(), ObjectError> {
        let upload = self
            .client
            .put_multipart(path)
            .await
            .map_err(|e| self.bucket.failure("start the upload of", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            // The file is read on the caller's (blocking) thread, which runs
            // this future; the parts upload on the runtime's workers.
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Parts left behind are billed until aborted.
                    let _ = writer.abort().await;
                    return Err(local_error("read", source, e));
                }
            };
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(self.bucket.failure("upload", key, e));
            }
            writer.write(&buf[..n]);
        }
        // finish() aborts the upload itself when it fails.
        writer
            .finish()
            .await
            .map(drop)
            .map_err(|e| self.bucket.failure("upload", key, e))
    }
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        self.bucket.describe()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectError> {
        let path = self.bucket.path(key)?;
        block_on(self.client.put(&path, PutPayload::from(data.to_vec())))?
            .map(drop)
            .map_err(|e| self.bucket.failure("put", key, e))
    }

    fn put_file(&self, key: &str, source: &Path) -> Result<(), ObjectError> {
        let path = self.bucket.path(key)?;
        let mut file = File::open(source).map_err(|e| local_error("open", source, e))?;
        let size = file.metadata().map_err(|e| local_error("stat", source, e))?.len();
        if size <= PART_SIZE {
            let mut data = Vec::with_capacity(size as usize);
            file.read_to_end(&mut data)
                .map_err(|e| local_error("read", source, e))?;
            return block_on(self.client.put(&path, PutPayload::from(data)))?
                .map(drop)
                .map_err(|e| self.bucket.failure("put", key, e));
        }
        let part_size = PART_SIZE.max(size.div_ceil(MAX_PARTS)).next_multiple_of(1 << 20);
        let part_size = usize::try_from(part_size).map_err(|_| {
            local_error(
                "upload",
                source,
                io::Error::new(io::ErrorKind::FileTooLarge, "too large for this platform's memory"),
            )
        })?;
        block_on(self.upload_parts(&path, key, &mut file, source, part_size))?
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        // Streamed and bounded: a bucket someone else can write may hold
        // an object of any size under a document's key.
        super::objects::read_document(self.open(key)?, self, key, super::objects::MAX_DOCUMENT)
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, ObjectError> {
        let path = self.bucket.path(key)?;
        let found = block_on(self.client.get(&path))?.map_err(|e| self.bucket.error("get", key, e))?;
        Ok(Box::new(BodyReader {
            body: found.into_stream(),
            chunk: None,
            offset: 0,
            bucket: Arc::clone(&self.bucket),
            key: key.to_string(),
        }))
    }

    fn size(&self, key: &str) -> Result<Option<u64>, ObjectError> {
        let path = self.bucket.path(key)?;
        match block_on(self.client.head(&path))? {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.bucket.failure("stat", key, e)),
        }
    }

    fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let path = self.bucket.path(key)?;
        match block_on(self.client.delete(&path))? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.bucket.failure("delete", key, e)),
        }
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        // Every S3 put is durable when it returns.
        Box::new(ImmediateBatch(self))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ObjectError> {
        let folder = prefix.trim_end_matches('/');
        let path = self.bucket.path(folder)?;
        let under = format!("{folder}/");
        block_on(async {
            // The stream requests page after page as it is drained.
            let mut listing = self.client.list(Some(&path));
            let mut out = Vec::new();
            while let Some(meta) = listing.next().await {
                let meta = meta.map_err(|e| self.bucket.failure("list", folder, e))?;
                // Folder markers that consoles create, and names no key can
                // have, are not objects of this store.
                if let Some(key) = self.bucket.key_of(&meta.location) {
                    if key.starts_with(&under) && validate_key(key).is_ok() {
                        out.push((key.to_string(), meta.size));
                    }
                }
            }
            out.sort();
            Ok(out)
        })?
    }
}

/// The bucket as messages name it, and the one secret they must not.
struct Bucket {
    name: String,
    /// Without a leading or trailing `/`; empty for the bucket's root.
    prefix: String,
    region: String,
    /// For messages: the configured endpoint, or AWS's for the region.
    endpoint: String,
    secret: String,
}

impl Bucket {
    fn new(config: &S3Config) -> Bucket {
        let region = if config.region.is_empty() {
            DEFAULT_REGION.to_string()
        } else {
            config.region.clone()
        };
        let endpoint = if config.endpoint.is_empty() {
            format!("https://s3.{region}.amazonaws.com")
        } else {
            without_userinfo(config.endpoint.trim_end_matches('/'))
        };
        Bucket {
            name: config.bucket.clone(),
            prefix: config.prefix.trim_matches('/').to_string(),
            region,
            endpoint,
            secret: config.secret_key.clone(),
        }
    }

    fn describe(&self) -> String {
        format!("s3 storage {} at {}", self.url(""), self.endpoint)
    }

    /// `s3://bucket/prefix/key`, for messages.
    fn url(&self, key: &str) -> String {
        let mut url = format!("s3://{}", self.name);
        for part in [self.prefix.as_str(), key] {
            if !part.is_empty() {
                url.push('/');
                url.push_str(part);
            }
        }
        url
    }

    fn path(&self, key: &str) -> Result<ObjectPath, ObjectError> {
        validate_key(key)?;
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        // Valid keys are valid S3 paths; this only guards the invariant.
        ObjectPath::parse(full).map_err(|_| ObjectError::InvalidKey {
            key: key.to_string(),
            reason: "is not an S3 object name",
        })
    }

    /// The key of the object at `location`, when it is under the prefix.
    fn key_of<'a>(&self, location: &'a ObjectPath) -> Option<&'a str> {
        let location = location.as_ref();
        if self.prefix.is_empty() {
            return Some(location);
        }
        location.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
    }

    /// `e` from a call on object `key`, where a 404 means the object is
    /// missing.
    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> ObjectError {
        match e {
            object_store::Error::NotFound { .. } => ObjectError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            },
            e => self.failure(op, key, e),
        }
    }

    /// `e` from a call that cannot meet a missing object (a put, a listing):
    /// a 404 there means a missing bucket, and stays in the message.
    fn failure(&self, op: &'static str, key: &str, e: object_store::Error) -> ObjectError {
        if is_connect_failure(&e) {
            // The server was never reached: the endpoint is what to check.
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            return ObjectError::Io(IoError {
                op: "connect to",
                path: format!("s3 endpoint {}", self.endpoint),
                source: io::Error::other(self.scrub(cause.to_string())),
            });
        }
        ObjectError::Io(IoError {
            op,
            path: self.url(key),
            source: io::Error::other(self.scrub(e.to_string())),
        })
    }

    /// `text` on one line (servers answer in indented XML), and without
    /// the secret key, should a server ever echo it.
    fn scrub(&self, text: String) -> String {
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if self.secret.is_empty() {
            return text;
        }
        text.replace(&self.secret, "<redacted>")
    }
}

fn is_connect_failure(e: &object_store::Error) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(error) = cause {
        if let Some(http) = error.downcast_ref::<HttpError>() {
            return http.kind() == HttpErrorKind::Connect;
        }
        cause = error.source();
    }
    false
}

/// The object's bytes as the caller reads them, one chunk of the response
/// body at a time.
struct BodyReader<S, B> {
    body: S,
    chunk: Option<B>,
    offset: usize,
    bucket: Arc<Bucket>,
    key: String,
}

impl<S, B> Read for BodyReader<S, B>
where
    S: Stream<Item = object_store::Result<B>> + Unpin,
    B: AsRef<[u8]>,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(chunk) = &self.chunk {
                let rest = &chunk.as_ref()[self.offset..];
                if !rest.is_empty() {
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.offset += n;
                    return Ok(n);
                }
            }
            match block_on(self.body.next()).map_err(io::Error::other)? {
                None => return Ok(0),
                Some(Ok(chunk)) => {
                    self.chunk = Some(chunk);
                    self.offset = 0;
                }
                Some(Err(e)) => return Err(io::Error::other(self.bucket.failure("read", &self.key, e))),
            }
        }
    }
}

/// Runs `work` to completion on this thread. The trait's calls come on
/// blocking threads: inside the daemon, tokio's blocking pool, whose
/// runtime then drives the client's I/O; elsewhere (tools, tests) a private
/// runtime does, one per process, whose worker keeps the connections it
/// pools serviced between calls.
fn block_on<F: Future>(work: F) -> Result<F::Output, ObjectError> {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        return Ok(handle.block_on(work));
    }
    static PRIVATE: OnceLock<io::Result<tokio::runtime::Runtime>> = OnceLock::new();
    let runtime = PRIVATE.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("seamless-s3")
            .enable_all()
            .build()
    });
    match runtime {
        Ok(runtime) => Ok(runtime.block_on(work)),
        Err(e) => Err(ObjectError::Io(IoError {
            op: "start",
            path: "the runtime of the s3 client".into(),
            source: io::Error::new(e.kind(), e.to_string()),
        })),
    }
}

/// reqwest, under object_store, takes rustls's process-wide crypto
/// provider and panics without one: install ring's, as the registry client
/// does (an error means one is installed already, which serves as well).
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// `url` without a `user:password@` part, for messages.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) if scheme.is_empty() => format!("<redacted>@{}", &rest[at + 1..]),
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

fn local_error(op: &'static str, path: &Path, source: io::Error) -> ObjectError {
    ObjectError::Io(IoError {
        op,
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    const ACCESS_KEY: &str = "seamless-test-access";
    const SECRET_KEY: &str = "seamless-test-SECRET-k3Zq8x1Wv";
    const BUCKET: &str = "seamless-test";

    /// moto's S3 server on a free port of 127.0.0.1, killed on drop.
    struct Moto {
        child: Child,
        port: u16,
        log: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Moto {
        fn start() -> Moto {
            let binary = std::env::var_os("SEAMLESS_MOTO_SERVER")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/opt/seamless-moto/bin/moto_server"));
            assert!(
                binary.is_file(),
                "the S3 tests need moto's S3 server at {} and it is missing: install it with \
                 `apt-get install -y python3-venv && /usr/bin/python3 -m venv /opt/seamless-moto && \
                 /opt/seamless-moto/bin/pip install 'moto[server]'`, or set SEAMLESS_MOTO_SERVER \
                 to a moto_server binary",
                binary.display()
            );
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("moto.log");
            let output = File::create(&log).unwrap();
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new(&binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(output.try_clone().unwrap())
                .stderr(output)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let mut moto = Moto {
                child,
                port,
                log,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            while http_status(port, "GET", "/") != Some(200) {
                if let Some(status) = moto.child.try_wait().unwrap() {
                    panic!("moto_server exited ({status}) before answering:\n{}", moto.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "moto_server did not answer on port {port} within 60s:\n{}",
                    moto.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            moto
        }

        fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        fn config(&self) -> S3Config {
            S3Config {
                bucket: BUCKET.into(),
                region: String::new(),
                endpoint: format!("http://127.0.0.1:{}", self.port),
                access_key: ACCESS_KEY.into(),
                secret_key: SECRET_KEY.into(),
                prefix: "seamless-checkpoints".into(),
            }
        }
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The status of a bare HTTP/1.1 request: moto creates a bucket on an
    /// unsigned `PUT /<bucket>`.
    fn http_status(port: u16, method: &str, path: &str) -> Option<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).ok()?;
        String::from_utf8_lossy(&response)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    #[test]
    fn objects_round_trip_through_an_s3_server() {
        let moto = Moto::start();
        assert_eq!(http_status(moto.port, "PUT", &format!("/{BUCKET}")), Some(200));
        let config = moto.config();
        let store = S3Store::new(&config).unwrap();

        let described = store.describe();
        assert_eq!(
            described,
            format!(
                "s3 storage s3://{BUCKET}/seamless-checkpoints at http://127.0.0.1:{}",
                moto.port
            )
        );
        for shown in [described, format!("{store:?}"), format!("{config:?}")] {
            assert!(!shown.contains(SECRET_KEY), "{shown}");
        }

        // Small objects, in one PUT each.
        store.put("checkpoints/cp-1.json", b"{}").unwrap();
        store.put("blobs/sha256/a:b+c", b"hello").unwrap();
        assert_eq!(store.get("checkpoints/cp-1.json").unwrap(), b"{}");
        assert_eq!(store.get("blobs/sha256/a:b+c").unwrap(), b"hello");
        assert_eq!(store.size("blobs/sha256/a:b+c").unwrap(), Some(5));
        store.put("checkpoints/cp-1.json", b"{\"v\":2}").unwrap();
        assert_eq!(store.get("checkpoints/cp-1.json").unwrap(), b"{\"v\":2}");

        let tmp = tempfile::tempdir().unwrap();
        let small = tmp.path().join("small");
        std::fs::write(&small, b"from a file").unwrap();
        store.put_file("blobs/sha256/small", &small).unwrap();
        assert_eq!(store.get("blobs/sha256/small").unwrap(), b"from a file");

        // A file of several parts, uploaded without reading it whole.
        let large = tmp.path().join("large");
        let data = crate::nydus::noise((20 << 20) + 12_345, 7);
        std::fs::write(&large, &data).unwrap();
        store.put_file("blobs/sha256/large", &large).unwrap();
        assert!(moto.log().contains("?uploads"), "no multipart upload:\n{}", moto.log());
        assert_eq!(store.size("blobs/sha256/large").unwrap(), Some(data.len() as u64));
        assert!(store.get("blobs/sha256/large").unwrap() == data);
        let mut reader = store.open("blobs/sha256/large").unwrap();
        let mut read = Vec::new();
        let mut buf = [0u8; 100_003];
        loop {
            match reader.read(&mut buf).unwrap() {
                0 => break,
                n => read.extend_from_slice(&buf[..n]),
            }
        }
        assert!(read == data, "open read {} bytes of {}", read.len(), data.len());

        // Missing objects.
        assert_eq!(store.size("blobs/sha256/missing").unwrap(), None);
        for err in [
            store.get("blobs/sha256/missing").unwrap_err(),
            store.open("blobs/sha256/missing").err().unwrap(),
        ] {
            assert!(err.is_not_found(), "{err}");
            assert!(err.to_string().contains("s3 storage s3://seamless-test"), "{err}");
        }
        assert!(matches!(
            store.put("../escape", b"x"),
            Err(ObjectError::InvalidKey { .. })
        ));

        // A listing of more than one page (S3 returns 1,000 keys a page),
        // written from several threads at once.
        let keys: Vec<String> = (0..1100).map(|i| format!("many/{:x}/obj-{i}", i % 7)).collect();
        std::thread::scope(|scope| {
            for batch in keys.chunks(275) {
                let store = &store;
                scope.spawn(move || {
                    for key in batch {
                        store.put(key, key.as_bytes()).unwrap();
                    }
                });
            }
        });
        let listed = store.list("many/").unwrap();
        let mut expected: Vec<(String, u64)> = keys.iter().map(|k| (k.clone(), k.len() as u64)).collect();
        expected.sort();
        assert_eq!(listed.len(), 1100);
        assert!(listed == expected, "the listing is not every key, sorted");
        assert!(moto.log().matches("list-type=2").count() >= 2, "one page only");
        assert_eq!(
            store.list("blobs/").unwrap(),
            vec![
                ("blobs/sha256/a:b+c".to_string(), 5),
                ("blobs/sha256/large".to_string(), data.len() as u64),
                ("blobs/sha256/small".to_string(), 11),
            ]
        );
        assert!(store.list("nothing/").unwrap().is_empty());

        store.delete("blobs/sha256/small").unwrap();
        store.delete("blobs/sha256/small").unwrap();
        assert_eq!(store.size("blobs/sha256/small").unwrap(), None);
        assert!(store.get("blobs/sha256/small").unwrap_err().is_not_found());

        // A bucket that does not exist: a put says so, it is no missing object.
        let other = S3Store::new(&S3Config {
            bucket: "no-such-bucket".into(),
            ..config.clone()
        })
        .unwrap();
        let err = other.put("checkpoints/x.json", b"{}").unwrap_err();
        assert!(!err.is_not_found(), "{err}");
        assert!(err.to_string().contains("NoSuchBucket"), "{err}");
        assert!(!err.to_string().contains(SECRET_KEY), "{err}");
    }

    #[test]
    fn calls_on_a_runtime_go_through_its_blocking_pool() {
        let moto = Moto::start();
        assert_eq!(http_status(moto.port, "PUT", &format!("/{BUCKET}")), Some(200));
        let store = Arc::new(S3Store::new(&moto.config()).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let read = runtime.block_on(async {
            let store = Arc::clone(&store);
            tokio::task::spawn_blocking(move || {
                store.put("checkpoints/cp-2.json", b"[1]").unwrap();
                let mut text = String::new();
                store
                    .open("checkpoints/cp-2.json")
                    .unwrap()
                    .read_to_string(&mut text)
                    .unwrap();
                text
            })
            .await
            .unwrap()
        });
        assert_eq!(read, "[1]");
        drop(runtime);
        // And again without one, on the same client.
        assert_eq!(store.get("checkpoints/cp-2.json").unwrap(), b"[1]");
    }

    #[test]
    fn an_unreachable_endpoint_is_named_in_the_error() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = S3Config {
            bucket: BUCKET.into(),
            region: "eu-west-1".into(),
            endpoint: format!("http://127.0.0.1:{port}/"),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            prefix: "/nested/prefix/".into(),
        };
        let retry = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        let store = S3Store::with_retry(&config, retry).unwrap();
        assert_eq!(
            store.describe(),
            format!("s3 storage s3://{BUCKET}/nested/prefix at http://127.0.0.1:{port}")
        );
        let err = store.put("checkpoints/cp-1.json", b"{}").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ObjectError::Io(_)), "{message}");
        assert!(
            message.starts_with(&format!("connect to s3 endpoint http://127.0.0.1:{port}: ")),
            "{message}"
        );
        assert!(!message.contains("cp-1") && !message.contains(SECRET_KEY), "{message}");
        let err = store.size("checkpoints/cp-1.json").unwrap_err();
        assert!(err.to_string().starts_with("connect to s3 endpoint"), "{err}");
    }

    #[test]
    fn configs_are_checked_and_never_print_the_secret() {
        let good = S3Config {
            bucket: BUCKET.into(),
            region: String::new(),
            endpoint: String::new(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            prefix: "seamless-checkpoints".into(),
        };
        good.validate().unwrap();
        let aws = S3Store::new(&good).unwrap();
        assert_eq!(
            aws.describe(),
            "s3 storage s3://seamless-test/seamless-checkpoints at https://s3.us-east-1.amazonaws.com"
        );
        assert!(!format!("{good:?}").contains(SECRET_KEY));
        assert!(format!("{good:?}").contains("<redacted>"));

        let bad = [
            S3Config {
                bucket: String::new(),
                ..good.clone()
            },
            S3Config {
                bucket: "a/b".into(),
                ..good.clone()
            },
            S3Config {
                prefix: "a/../b".into(),
                ..good.clone()
            },
            S3Config {
                endpoint: "127.0.0.1:9000".into(),
                ..good.clone()
            },
            S3Config {
                endpoint: format!("http://user:{SECRET_KEY}@127.0.0.1:9000"),
                ..good.clone()
            },
            S3Config {
                secret_key: String::new(),
                ..good.clone()
            },
        ];
        for config in bad {
            let err = S3Store::new(&config).unwrap_err();
            let message = err.to_string();
            assert!(message.starts_with("configure s3 storage"), "{message}");
            assert!(!message.contains(SECRET_KEY), "{message}");
            assert!(!format!("{config:?}").contains(SECRET_KEY), "{config:?}");
        }
    }
}
