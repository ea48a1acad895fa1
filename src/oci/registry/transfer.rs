//! Blobs and manifests on the wire: HEAD, monolithic upload (streamed from
//! the file, checked against its digest and size first), bounded downloads
//! staged beside their destination, and manifests read within
//! `MAX_MANIFEST_BYTES` and parsed as the schema they declare.

use super::*;

pub(super) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

pub(super) fn layer_name(layer: &LayerSource) -> String {
    match &layer.data {
        LayerData::File(path) => format!("{} ({})", layer.digest, path.display()),
        LayerData::Bytes(_) | LayerData::InTarget => layer.digest.clone(),
    }
}

/// Refuses a layer whose bytes are not what its descriptor says.
pub(super) async fn verify_layer(layer: &LayerSource) -> Result<(), RegistryError> {
    let name = layer_name(layer);
    check_digest_format(&name, &layer.digest)?;
    let (actual_digest, actual_size) = match &layer.data {
        // The registry verified it when it was uploaded.
        LayerData::InTarget => return Ok(()),
        LayerData::Bytes(bytes) => (sha256_digest(bytes), bytes.len() as u64),
        LayerData::File(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || hash_file(&path).map_err(io_err("blob file", &path)))
                .await
                .map_err(|err| io_err("blob file", Path::new(&name))(std::io::Error::other(err)))??
        }
    };
    if actual_size != layer.size {
        return Err(RegistryError::SizeMismatch {
            blob: name,
            expected: layer.size,
            actual: actual_size,
        });
    }
    if actual_digest != layer.digest {
        return Err(RegistryError::DigestMismatch {
            blob: name,
            expected: layer.digest.clone(),
            actual: actual_digest,
        });
    }
    Ok(())
}

pub(super) fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex(&hasher.finalize())), size))
}

pub(super) fn layer_descriptor(layer: &LayerSource) -> OciDescriptor {
    OciDescriptor {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        // Blob sizes stay far below i64::MAX; saturate rather than wrap.
        size: i64::try_from(layer.size).unwrap_or(i64::MAX),
        annotations: (!layer.annotations.is_empty()).then(|| layer.annotations.clone()),
        ..OciDescriptor::default()
    }
}

/// Whether the session's repository holds blob `digest` (a HEAD).
pub(super) async fn blob_exists(session: &Session, digest: &str, object: &str) -> Result<bool, RegistryError> {
    let url = format!("{}/blobs/{digest}", session.repository_url());
    let response = session.send(object, |http| http.head(&url)).await?;
    match response.status() {
        status if status.is_success() => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => Err(response_error(response, object).await),
    }
}

/// One upload attempt of a blob the registry does not have: a monolithic
/// upload, a POST that opens it and one PUT of the whole body, streamed
/// from disk for a file.
pub(super) async fn upload_blob(
    session: &Session,
    digest: &str,
    size: u64,
    data: &LayerData,
    object: &str,
) -> Result<(), RegistryError> {
    if let LayerData::InTarget = data {
        return Err(RegistryError::NotFound {
            object: object.to_string(),
            message: format!(
                "it was in repository {} when the push began",
                session.reference.repository()
            ),
        });
    }
    let start = format!("{}/blobs/uploads/", session.repository_url());
    let response = session
        .send(object, |http| http.post(&start).header(CONTENT_LENGTH, 0))
        .await?;
    if response.status() != StatusCode::ACCEPTED {
        return Err(response_error(response, object).await);
    }
    let mut url = location(&response, object)?;
    url.query_pairs_mut().append_pair("digest", digest);
    // A file read fails ours, not the network's: reported as such, not retried.
    let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::new(Mutex::new(None));
    let response = session
        .send(object, |http| {
            let body = match data {
                LayerData::Bytes(bytes) => reqwest::Body::from(bytes.clone()),
                LayerData::File(path) => {
                    let (sender, receiver) = mpsc::channel(CHUNKS_IN_FLIGHT);
                    spawn_file_reader(path.clone(), sender, read_error.clone());
                    reqwest::Body::wrap_stream(ReceiverStream::new(receiver))
                }
                LayerData::InTarget => reqwest::Body::from(Vec::new()),
            };
            http.put(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, size)
                .body(body)
        })
        .await;
    let failed_read = match read_error.lock() {
        Ok(mut slot) => slot.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    if let (Some(source), LayerData::File(path)) = (failed_read, data) {
        return Err(io_err("blob file", path)(source).into());
    }
    let response = response?;
    if response.status() != StatusCode::CREATED {
        return Err(response_error(response, object).await);
    }
    Ok(())
}

/// The absolute URL a response's `Location` names (relative to the URL
/// that answered, as the distribution spec allows).
pub(super) fn location(response: &Response, object: &str) -> Result<reqwest::Url, RegistryError> {
    let invalid = |message: String| RegistryError::Registry {
        status: Some(response.status().as_u16()),
        object: object.to_string(),
        message,
    };
    let value = response
        .headers()
        .get(LOCATION)
        .ok_or_else(|| invalid("the answer has no Location header".to_string()))?;
    let value = value
        .to_str()
        .map_err(|_| invalid("its Location header is not text".to_string()))?;
    response
        .url()
        .join(value)
        .map_err(|err| invalid(format!("its Location {value:?} is not a URL: {err}")))
}

/// Pushes the manifest `body` to the session's reference; where the
/// registry says it can be fetched (by digest, when it names no place).
pub(super) async fn put_manifest(
    session: &Session,
    body: &[u8],
    digest: &str,
    object: &str,
) -> Result<String, RegistryError> {
    let tag = session.reference.tag().unwrap_or("latest");
    let url = format!("{}/manifests/{tag}", session.repository_url());
    let response = session
        .send(object, |http| {
            http.put(&url)
                .header(CONTENT_TYPE, OCI_IMAGE_MEDIA_TYPE)
                .body(body.to_vec())
        })
        .await?;
    if response.status() != StatusCode::CREATED {
        return Err(response_error(response, object).await);
    }
    // Some registries (ECR) answer without a Location: the manifest is
    // there all the same, at its digest.
    match location(&response, object) {
        Ok(url) => Ok(url.to_string()),
        Err(_) => Ok(format!("{}/manifests/{digest}", session.repository_url())),
    }
}

/// Reads `path` on a blocking thread into `sender`, a chunk at a time, until
/// the end of the file or until the upload stops listening. A read error
/// ends the body and is left in `failed`.
pub(super) fn spawn_file_reader(
    path: PathBuf,
    sender: mpsc::Sender<std::io::Result<Vec<u8>>>,
    failed: Arc<Mutex<Option<std::io::Error>>>,
) {
    tokio::task::spawn_blocking(move || {
        let fail = |err: std::io::Error| {
            let _ = sender.blocking_send(Err(std::io::Error::new(err.kind(), err.to_string())));
            match failed.lock() {
                Ok(mut slot) => *slot = Some(err),
                Err(poisoned) => *poisoned.into_inner() = Some(err),
            }
        };
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(err) => return fail(err),
        };
        loop {
            let mut buf = vec![0u8; CHUNK_SIZE];
            let n = match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return fail(err),
            };
            buf.truncate(n);
            if sender.blocking_send(Ok(buf)).is_err() {
                // The upload ended early; it reports why.
                return;
            }
        }
    });
}

/// Where a download to `dest` is written until it is whole and verified.
pub(crate) fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

/// The body of blob `digest`, refused up front when the registry declares
/// another length than the descriptor's `size`.
pub(super) async fn open_blob(
    session: &Session,
    digest: &Digest,
    size: u64,
    object: &str,
) -> Result<Response, RegistryError> {
    let url = format!("{}/blobs/{digest}", session.repository_url());
    let response = session.send(object, |http| http.get(&url)).await?;
    if !response.status().is_success() {
        return Err(response_error(response, object).await);
    }
    if let Some(length) = response.content_length().filter(|&length| length != size) {
        return Err(RegistryError::SizeMismatch {
            blob: object.to_string(),
            expected: size,
            actual: length,
        });
    }
    Ok(response)
}

/// One download attempt: streams the blob into `partial` on a blocking
/// thread, hashing it, and checks its size and digest. A body longer than
/// `size` is cut off at the first byte past it.
pub(super) async fn download_blob(
    session: &Session,
    digest: &Digest,
    size: u64,
    object: &str,
    partial: &Path,
) -> Result<u64, RegistryError> {
    let mut stream = open_blob(session, digest, size, object).await?;
    let (sender, mut receiver) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let path = partial.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        let mut file = std::fs::File::create(&path)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = receiver.blocking_recv() {
            hasher.update(&chunk);
            file.write_all(&chunk)?;
            written += chunk.len() as u64;
        }
        file.sync_all()?;
        Ok((format!("sha256:{}", hex(&hasher.finalize())), written))
    });
    let mut network = None;
    let mut received = 0u64;
    loop {
        match stream.chunk().await {
            Ok(None) => break,
            Ok(Some(chunk)) => {
                received = received.saturating_add(chunk.len() as u64);
                if received > size {
                    network = Some(RegistryError::SizeMismatch {
                        blob: object.to_string(),
                        expected: size,
                        actual: received,
                    });
                    break;
                }
                if sender.send(Vec::from(chunk)).await.is_err() {
                    break; // The writer failed; its error is reported below.
                }
            }
            Err(err) => {
                network = Some(classify_transport(&err, &session.registry, object));
                break;
            }
        }
    }
    drop(sender);
    let written = writer
        .await
        .map_err(|join| io_err("blob file", partial)(std::io::Error::other(join)))?;
    if let Some(err) = network {
        return Err(err);
    }
    let (actual, written) = written.map_err(io_err("blob file", partial))?;
    if written != size {
        return Err(RegistryError::SizeMismatch {
            blob: object.to_string(),
            expected: size,
            actual: written,
        });
    }
    if actual != digest.as_str() {
        return Err(RegistryError::DigestMismatch {
            blob: object.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(written)
}

/// One attempt at a small blob (a config) into memory: `size` bytes, its
/// descriptor's, and not one more read.
pub(super) async fn read_blob_bounded(
    session: &Session,
    digest: &Digest,
    size: u64,
    object: &str,
) -> Result<Vec<u8>, RegistryError> {
    let mut stream = open_blob(session, digest, size, object).await?;
    let mut data = Vec::new();
    while let Some(chunk) = stream
        .chunk()
        .await
        .map_err(|err| classify_transport(&err, &session.registry, object))?
    {
        if (data.len() + chunk.len()) as u64 > size {
            return Err(RegistryError::SizeMismatch {
                blob: object.to_string(),
                expected: size,
                actual: (data.len() + chunk.len()) as u64,
            });
        }
        data.extend_from_slice(&chunk);
    }
    if data.len() as u64 != size {
        return Err(RegistryError::SizeMismatch {
            blob: object.to_string(),
            expected: size,
            actual: data.len() as u64,
        });
    }
    let actual = sha256_digest(&data);
    if actual != digest.as_str() {
        return Err(RegistryError::DigestMismatch {
            blob: object.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(data)
}

/// One attempt at the manifest `reference` names: its body, read no
/// further than [`MAX_MANIFEST_BYTES`], and its digest (checked against the
/// reference's, when it names one).
pub(super) async fn read_manifest_bounded(
    session: &Session,
    reference: &Reference,
    object: &str,
) -> Result<(Vec<u8>, String), RegistryError> {
    let target = reference.digest().or(reference.tag()).unwrap_or("latest");
    let url = format!("{}/manifests/{target}", session.repository_url());
    let accept = MANIFEST_MEDIA_TYPES.join(", ");
    let request_error = |err: reqwest::Error| classify_transport(&err, &session.registry, object);
    let mut response = session
        .send_with(&session.manifests, object, |http| {
            http.get(&url).header(reqwest::header::ACCEPT, &accept)
        })
        .await?;
    if !response.status().is_success() {
        return Err(response_error(response, object).await);
    }
    let too_large = || RegistryError::TooLarge {
        object: object.to_string(),
        limit: MAX_MANIFEST_BYTES,
    };
    if response
        .content_length()
        .is_some_and(|length| length > MAX_MANIFEST_BYTES)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(request_error)? {
        if (body.len() + chunk.len()) as u64 > MAX_MANIFEST_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    let digest = sha256_digest(&body);
    if let Some(expected) = reference.digest().filter(|expected| *expected != digest) {
        return Err(RegistryError::DigestMismatch {
            blob: object.to_string(),
            expected: expected.to_string(),
            actual: digest,
        });
    }
    Ok((body, digest))
}

pub(super) fn parse_manifest(body: &[u8], object: &str) -> Result<OciManifest, RegistryError> {
    manifest_v2(body).map_err(|message| RegistryError::InvalidManifest {
        object: object.to_string(),
        message,
    })
}

/// A manifest or index as oci-client types it, schema version 2 only,
/// wherever it was read from (a registry, containerd's content store).
pub(crate) fn manifest_v2(body: &[u8]) -> Result<OciManifest, String> {
    let manifest: OciManifest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let version = match &manifest {
        OciManifest::Image(image) => image.schema_version,
        OciManifest::ImageIndex(index) => index.schema_version,
    };
    if version != 2 {
        return Err(format!("schema version {version}, not 2"));
    }
    Ok(manifest)
}

/// A descriptor's size, which JSON lets be negative.
pub(super) fn descriptor_size(object: &str, size: i64) -> Result<u64, RegistryError> {
    u64::try_from(size).map_err(|_| RegistryError::InvalidManifest {
        object: object.to_string(),
        message: format!("its descriptor declares {size} bytes"),
    })
}
