//! The two CRI calls the tests make (`runtime.v1.ImageService` PullImage and
//! ImageFsInfo), with the few protobuf messages written out by hand: there is
//! no CRI proto in the build, and these fields have been stable since v1.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UnixStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Endpoint, Uri};

#[derive(Clone, PartialEq, prost::Message)]
struct ImageSpec {
    #[prost(string, tag = "1")]
    image: String,
    #[prost(map = "string, string", tag = "2")]
    annotations: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PullImageResponse {
    #[prost(string, tag = "1")]
    image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ImageFsInfoRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct FilesystemIdentifier {
    #[prost(string, tag = "1")]
    mountpoint: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FilesystemUsage {
    #[prost(int64, tag = "1")]
    timestamp: i64,
    #[prost(message, optional, tag = "2")]
    fs_id: Option<FilesystemIdentifier>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ImageFsInfoResponse {
    #[prost(message, repeated, tag = "1")]
    image_filesystems: Vec<FilesystemUsage>,
}

async fn unary<Req, Resp>(socket: &Path, method: &'static str, message: Req) -> Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let path = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .connect_with_connector(tower::service_fn(move |_: Uri| UnixStream::connect(path.clone())))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("CRI channel not ready")?;
    let response = grpc
        .unary(
            tonic::Request::new(message),
            PathAndQuery::from_static(method),
            tonic::codec::ProstCodec::default(),
        )
        .await
        .with_context(|| format!("CRI {method}"))?;
    Ok(response.into_inner())
}

fn block_on<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")?
        .block_on(future)
}

/// CRI PullImage; returns the image id containerd answers.
pub fn pull_image(containerd_socket: &Path, image: &str) -> Result<String> {
    let request = PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            annotations: HashMap::new(),
        }),
    };
    let response: PullImageResponse =
        block_on(unary(containerd_socket, "/runtime.v1.ImageService/PullImage", request))?;
    Ok(response.image_ref)
}

/// CRI ImageFsInfo: the mount points CRI reports as image filesystems.
pub fn image_fs_mountpoints(containerd_socket: &Path) -> Result<Vec<String>> {
    let response: ImageFsInfoResponse = block_on(unary(
        containerd_socket,
        "/runtime.v1.ImageService/ImageFsInfo",
        ImageFsInfoRequest {},
    ))?;
    Ok(response
        .image_filesystems
        .into_iter()
        .filter_map(|f| f.fs_id.map(|id| id.mountpoint))
        .collect())
}
