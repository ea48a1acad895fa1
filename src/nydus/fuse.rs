//! Serves RAFS bootstraps over FUSE from inside the daemon: the images the
//! kernel's erofs cannot mount, whose blobs are stored compressed (read
//! lazily, chunk by chunk, from their registry or from a blob already on this
//! host, and kept in a chunk cache) and RAFS v5.
//!
//! Owns the FUSE sessions and the threads serving them; nydus-rafs parses
//! the bootstrap and nydus-storage fetches and caches chunks. It does not
//! decide which images are served this way, nor where they are mounted
//! (`rafs_mount` does). A FUSE mount lives as long as this process: after a
//! restart, the mount of the previous run is dead and `rafs_mount` mounts it
//! again.
//!
//! nydus-storage names its cache files and local blob files after the blob
//! ids of the bootstrap, which comes from a registry: [`FuseServer::serve`]
//! refuses a bootstrap whose ids are not [`BlobId`]s before nydus-storage
//! sees it, whatever its caller checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::transport::{FuseChannel, FuseSession};
use nydus_api::ConfigV2;
use nydus_rafs::fs::Rafs;
use tracing::{debug, info, warn};

use crate::nydus::{self, BlobId, InvalidBlobId};

/// Threads reading requests of one mount: reads that wait on the registry
/// do not hold up the others.
pub(crate) const THREADS_PER_MOUNT: usize = 4;
/// Seconds a chunk read from a registry may take, and its connection.
const REGISTRY_TIMEOUT_SECS: u64 = 60;
const REGISTRY_CONNECT_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("configuring RAFS {bootstrap}: {message}")]
    Config { bootstrap: String, message: String },
    #[error("loading RAFS bootstrap {bootstrap}: {message}")]
    Load { bootstrap: String, message: String },
    #[error("FUSE mount at {mountpoint}: {message}")]
    Session { mountpoint: String, message: String },
    #[error("RAFS bootstrap {bootstrap}: {source}: refused")]
    InvalidBlobId { bootstrap: String, source: InvalidBlobId },
}

/// Where the blobs of a served bootstrap are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobBackend {
    /// Files in `dir`, named by the blob id (the hex of their digest).
    Local { dir: PathBuf },
    /// Repository `repository` of registry `host`, with HTTP range requests.
    /// `scheme` is "https" or "http"; `skip_verify` accepts any certificate
    /// (and falls back to plain HTTP when the registry speaks no TLS).
    Registry {
        host: String,
        repository: String,
        scheme: &'static str,
        skip_verify: bool,
        /// What nydus-storage authenticates with; None goes anonymous.
        auth: Option<LazyAuth>,
    },
}

/// Credentials of a lazily read registry, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub enum LazyAuth {
    /// base64 of `user:password`: sent as basic auth or exchanged for a
    /// bearer token, which nydus-storage renews when the registry answers
    /// 401 (an expired token) and then retries the read once.
    Basic(String),
    /// A bearer token, sent as it is.
    Bearer(String),
}

impl std::fmt::Debug for LazyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LazyAuth::Basic(_) => f.write_str("LazyAuth::Basic(..)"),
            LazyAuth::Bearer(_) => f.write_str("LazyAuth::Bearer(..)"),
        }
    }
}

/// What to serve and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseSpec {
    pub bootstrap: PathBuf,
    pub backend: BlobBackend,
    /// nydus-storage's chunk cache: `<blob id>.blob.data` holds the chunks
    /// read so far at their uncompressed offsets, `<blob id>.chunk_map`
    /// which ones, `<blob id>.blob.meta` the blob's chunk table.
    pub cache_dir: PathBuf,
    pub mountpoint: PathBuf,
}

/// Serves RAFS bootstraps at mountpoints until told to stop.
pub trait FuseServer: Send + Sync + std::fmt::Debug {
    /// Mounts `spec.bootstrap` read-only at `spec.mountpoint` (an existing
    /// empty directory) and serves it.
    fn serve(&self, spec: &FuseSpec) -> Result<(), FuseError>;
    /// Unmounts what `serve` mounted at `mountpoint` (lazily, when busy) and
    /// stops serving once the kernel lets go. False if nothing was served there.
    fn stop(&self, mountpoint: &Path) -> Result<bool, FuseError>;
    /// Whether this server serves `mountpoint`.
    fn serves(&self, mountpoint: &Path) -> bool;
    /// The process serving `mountpoint`, if this server serves it.
    fn server_of(&self, mountpoint: &Path) -> Option<ServingProcess> {
        self.serves(mountpoint).then(|| ServingProcess {
            pid: std::process::id(),
            restarts: 0,
        })
    }
}

/// Who serves a FUSE mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingProcess {
    pub pid: u32,
    /// Times a serving process was started again on the mount's connection
    /// since the daemon started.
    pub restarts: usize,
}

/// The nydus-rafs configuration of a served bootstrap.
pub fn rafs_config(spec: &FuseSpec) -> Result<ConfigV2, FuseError> {
    let backend = match &spec.backend {
        BlobBackend::Local { dir } => serde_json::json!({
            "type": "localfs",
            "localfs": { "dir": dir },
        }),
        BlobBackend::Registry {
            host,
            repository,
            scheme,
            skip_verify,
            auth,
        } => serde_json::json!({
            "type": "registry",
            "registry": {
                "scheme": scheme,
                "host": host,
                "repo": repository,
                "skip_verify": skip_verify,
                "auth": match auth {
                    Some(LazyAuth::Basic(basic)) => Some(basic),
                    _ => None,
                },
                "registry_token": match auth {
                    Some(LazyAuth::Bearer(token)) => Some(token),
                    _ => None,
                },
                "timeout": REGISTRY_TIMEOUT_SECS,
                "connect_timeout": REGISTRY_CONNECT_TIMEOUT_SECS,
                "retry_limit": 2,
            },
        }),
    };
    let config = serde_json::json!({
        "version": 2,
        "id": "seamless",
        "backend": backend,
        "cache": {
            "type": "filecache",
            // Chunks from a registry are checked against their digest
            // before they are cached or returned.
            "validate": true,
            "filecache": { "work_dir": spec.cache_dir },
        },
        "rafs": { "mode": "direct", "enable_xattr": true },
    });
    ConfigV2::from_str(&config.to_string()).map_err(|e| FuseError::Config {
        bootstrap: spec.bootstrap.display().to_string(),
        message: e.to_string(),
    })
}

/// FUSE sessions served by threads of this process.
#[derive(Default)]
pub struct InProcessFuse {
    sessions: Mutex<HashMap<PathBuf, FuseSession>>,
    /// Numbers each mount, so that nydus-rafs's per-instance state of a
    /// bootstrap served again never meets the previous one's.
    mounted: AtomicU64,
}

impl std::fmt::Debug for InProcessFuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessFuse")
            .field("mounts", &self.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl InProcessFuse {
    pub fn new() -> InProcessFuse {
        InProcessFuse::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, FuseSession>> {
        // Every change of the map is one insert or removal.
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl FuseServer for InProcessFuse {
    fn serve(&self, spec: &FuseSpec) -> Result<(), FuseError> {
        let session_err = |message: String| FuseError::Session {
            mountpoint: spec.mountpoint.display().to_string(),
            message,
        };
        let instance = format!("seamless-rafs-{}", self.mounted.fetch_add(1, Ordering::Relaxed));
        let server = load_server(spec, &instance)?;

        let mut session = FuseSession::new(&spec.mountpoint, "seamless-rafs", "rafs", true)
            .map_err(|e| session_err(e.to_string()))?;
        session.mount().map_err(|e| session_err(e.to_string()))?;
        // From here a failure drops the session, which unmounts.
        let answered = Arc::new(AtomicU64::new(0));
        for thread in 0..THREADS_PER_MOUNT {
            let channel = session.new_channel().map_err(|e| session_err(e.to_string()))?;
            let server = server.clone();
            let mountpoint = spec.mountpoint.clone();
            let answered = answered.clone();
            std::thread::Builder::new()
                .name(format!("rafs-fuse-{thread}"))
                .spawn(move || serve_channel(channel, &server, &mountpoint, &answered))
                .map_err(|e| session_err(format!("starting a serving thread: {e}")))?;
        }
        info!(
            bootstrap = %spec.bootstrap.display(),
            mountpoint = %spec.mountpoint.display(),
            backend = ?spec.backend,
            "serving RAFS over FUSE"
        );
        self.lock().insert(spec.mountpoint.clone(), session);
        Ok(())
    }

    fn stop(&self, mountpoint: &Path) -> Result<bool, FuseError> {
        let Some(mut session) = self.lock().remove(mountpoint) else {
            return Ok(false);
        };
        // A detaching unmount: the threads serve whoever still holds the
        // filesystem and end when the kernel closes the connection.
        session.umount().map_err(|e| FuseError::Session {
            mountpoint: mountpoint.display().to_string(),
            message: e.to_string(),
        })?;
        info!(mountpoint = %mountpoint.display(), "stopped serving RAFS over FUSE");
        Ok(true)
    }

    fn serves(&self, mountpoint: &Path) -> bool {
        self.lock().contains_key(mountpoint)
    }
}

/// Loads `spec.bootstrap` for serving: its blob ids checked before
/// nydus-storage names a file after them, nydus-rafs over the spec's
/// backend and chunk cache, under the name `instance` (unique in this
/// process). A bootstrap loaded again gives every file the same inode number,
/// so a successor serves a connection its predecessor answered.
pub(crate) fn load_server(spec: &FuseSpec, instance: &str) -> Result<Arc<Server<Arc<Vfs>>>, FuseError> {
    let bootstrap = spec.bootstrap.display().to_string();
    let load = |message: String| FuseError::Load {
        bootstrap: bootstrap.clone(),
        message,
    };
    let rs = nydus::load_bootstrap(&spec.bootstrap).map_err(|e| load(e.to_string()))?;
    for info in rs.superblock.get_blob_infos() {
        BlobId::parse(&info.blob_id()).map_err(|source| FuseError::InvalidBlobId {
            bootstrap: bootstrap.clone(),
            source,
        })?;
    }
    drop(rs);
    std::fs::create_dir_all(&spec.cache_dir).map_err(|e| FuseError::Config {
        bootstrap: bootstrap.clone(),
        message: format!("creating cache directory {}: {e}", spec.cache_dir.display()),
    })?;
    let config = Arc::new(rafs_config(spec)?);
    let (mut rafs, reader) = Rafs::new(&config, instance, &spec.bootstrap).map_err(|e| load(format!("{e:?}")))?;
    rafs.import(reader, None).map_err(|e| load(format!("{e:?}")))?;
    let vfs = Vfs::new(VfsOptions::default());
    vfs.mount(Box::new(rafs), "/").map_err(|e| load(format!("{e:?}")))?;
    Ok(Arc::new(Server::new(Arc::new(vfs))))
}

/// The largest request a channel reads (fuse-backend-rs's buffer): a mount
/// must say so as its `max_read`, or the kernel sends reads that do not fit.
pub fn max_read() -> usize {
    // A session is plain data until mounted; "/" is only there to be valid.
    FuseSession::new(Path::new("/"), "seamless-rafs", "rafs", true)
        .map(|session| session.bufsize())
        .unwrap_or(256 * 4096 + 4096)
}

/// Answers the requests of one channel until the connection ends.
/// `answered` counts the requests answered.
pub(crate) fn serve_channel(
    mut channel: FuseChannel,
    server: &Server<Arc<Vfs>>,
    mountpoint: &Path,
    answered: &AtomicU64,
) {
    loop {
        match channel.get_request() {
            Ok(Some((reader, writer))) => {
                answered.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
                    if let fuse_backend_rs::Error::EncodeMessage(io) = &e {
                        // The connection is gone (unmounted, or aborted).
                        if matches!(io.raw_os_error(), Some(libc::EBADF) | Some(libc::ENODEV)) {
                            break;
                        }
                    }
                    warn!(mountpoint = %mountpoint.display(), error = %e, "FUSE request failed");
                }
            }
            Ok(None) => break,
            Err(e) => {
                debug!(mountpoint = %mountpoint.display(), error = %e, "FUSE channel ended");
                break;
            }
        }
    }
}

/// Records what it is asked to serve, mounting nothing.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct RecordingFuse {
    pub served: Mutex<Vec<FuseSpec>>,
    pub stopped: Mutex<Vec<PathBuf>>,
}

#[cfg(test)]
impl FuseServer for RecordingFuse {
    fn serve(&self, spec: &FuseSpec) -> Result<(), FuseError> {
        self.served.lock().unwrap().push(spec.clone());
        Ok(())
    }

    fn stop(&self, mountpoint: &Path) -> Result<bool, FuseError> {
        let served = self.serves(mountpoint);
        if served {
            self.stopped.lock().unwrap().push(mountpoint.to_path_buf());
        }
        Ok(served)
    }

    fn serves(&self, mountpoint: &Path) -> bool {
        let served = self
            .served
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.mountpoint == mountpoint)
            .count();
        let stopped = self.stopped.lock().unwrap().iter().filter(|m| *m == mountpoint).count();
        served > stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_and_local_backends_configure_nydus_storage() {
        let spec = FuseSpec {
            bootstrap: "/r/boot".into(),
            backend: BlobBackend::Registry {
                host: "registry.local:5000".into(),
                repository: "team/app".into(),
                scheme: "https",
                skip_verify: true,
                auth: Some(LazyAuth::Basic("dXNlcjpzM2NyZXQ=".into())),
            },
            cache_dir: "/r/nydus/fuse-cache".into(),
            mountpoint: "/r/nydus/mnt/4".into(),
        };
        let config = rafs_config(&spec).unwrap();
        let backend = config.backend.as_ref().unwrap();
        assert_eq!(backend.backend_type, "registry");
        let registry = backend.registry.as_ref().unwrap();
        assert_eq!(
            (registry.host.as_str(), registry.repo.as_str(), registry.scheme.as_str()),
            ("registry.local:5000", "team/app", "https")
        );
        assert!(registry.skip_verify);
        assert_eq!(registry.auth.as_deref(), Some("dXNlcjpzM2NyZXQ="));
        assert_eq!(registry.registry_token, None);
        assert!(!format!("{spec:?}").contains("dXNlcjpzM2NyZXQ="), "no secret in Debug");
        assert_eq!(registry.timeout, REGISTRY_TIMEOUT_SECS as u32);
        let cache = config.cache.as_ref().unwrap();
        assert_eq!(cache.cache_type, "filecache");
        assert!(cache.cache_validate);
        assert_eq!(cache.file_cache.as_ref().unwrap().work_dir, "/r/nydus/fuse-cache");
        assert!(config.rafs.as_ref().unwrap().enable_xattr);

        let local = FuseSpec {
            backend: BlobBackend::Local {
                dir: "/r/nydus/blobs".into(),
            },
            ..spec
        };
        let config = rafs_config(&local).unwrap();
        let backend = config.backend.as_ref().unwrap();
        assert_eq!(backend.backend_type, "localfs");
        assert_eq!(backend.localfs.as_ref().unwrap().dir, "/r/nydus/blobs");
    }
}
