//! seamless.v1.Control: the daemon's own API (checkpointctl is its client).

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::control_server::Control;
use crate::proto::{VersionRequest, VersionResponse};
use crate::snapshotter::Snapshotter;

#[derive(Debug, Clone)]
pub struct ControlService {
    snapshotter: Arc<Snapshotter>,
    root: PathBuf,
}

impl ControlService {
    pub fn new(snapshotter: Arc<Snapshotter>, root: PathBuf) -> Self {
        ControlService { snapshotter, root }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn version(&self, _request: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            storage: self.snapshotter.storage_kind().as_str().to_string(),
            root: self.root.display().to_string(),
        }))
    }
}
