//! `checkpointctl image pull REF`: pulls an image from its registry into
//! containerd (the global `--namespace`) and unpacks it on a snapshotter
//! the way CRI does, so that the seamless snapshotter sees each layer's
//! labels and adopts Nydus data blobs itself (`oci::pull`). Talks to
//! containerd and the registry, not to the daemon.
//!
//! Progress goes to stderr, one line per layer; stdout gets
//! `<name> <manifest digest>` once the image is there.

use std::path::PathBuf;
use std::sync::Arc;

use seamless_snapshotter::host::containerd::Containerd;
use seamless_snapshotter::oci::credentials::Keychain;
use seamless_snapshotter::oci::pull::{pull_image, LayerReport, PullTarget};
use seamless_snapshotter::oci::registry::{RegistryAuth, RegistryClient, RegistryHosts, RegistryOptions};

use crate::CliError;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ImageCommand {
    /// Pull an image into containerd, unpacked on a snapshotter with the
    /// labels CRI gives each layer (Nydus images included).
    Pull(PullArgs),
}

#[derive(Debug, clap::Args)]
struct PullArgs {
    /// The image reference, as the image record is named.
    reference: String,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_address: PathBuf,
    /// The snapshotter to unpack on.
    #[arg(long, default_value = "seamless")]
    snapshotter: String,
    /// Talk to a registry that has no trusted TLS: HTTPS with any
    /// certificate, then plain HTTP.
    #[arg(long)]
    plain_http: bool,
    /// USER[:PASSWORD] for the registry; otherwise credentials come from
    /// the Docker config file ($DOCKER_CONFIG/config.json or
    /// ~/.docker/config.json) and its credential helpers.
    #[arg(long)]
    user: Option<String>,
    /// A containerd-style certs.d directory (<host>/hosts.toml): mirrors,
    /// schemes and CAs per registry.
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
}

pub async fn run(namespace: &str, args: Args) -> Result<(), CliError> {
    match args.command {
        ImageCommand::Pull(args) => pull(namespace, args).await,
    }
}

async fn pull(namespace: &str, args: PullArgs) -> Result<(), CliError> {
    let auth = match &args.user {
        Some(user) => {
            let (name, password) = match user.split_once(':') {
                Some((name, password)) => (name.to_string(), password.to_string()),
                None => (user.clone(), password_from_stdin()?),
            };
            if name.is_empty() {
                return Err(CliError::Usage("--user needs a user name".into()));
            }
            RegistryAuth::Basic(name, password)
        }
        None => RegistryAuth::Anonymous,
    };
    let options = RegistryOptions {
        insecure: args.plain_http,
        hosts: args.hosts_dir.map_or_else(RegistryHosts::none, RegistryHosts::at),
        credentials: Some(Arc::new(Keychain::new(Keychain::default_config_path()))),
        ..RegistryOptions::default()
    };
    let registry = RegistryClient::new(options);
    let containerd = Containerd::connect(&args.containerd_address)
        .await
        .map_err(|e| CliError::Pull(e.into()))?;
    let target = PullTarget {
        namespace: namespace.to_string(),
        snapshotter: args.snapshotter,
    };
    let mut progress = |layer: &LayerReport| {
        eprintln!("{} {:>12} {}", layer.digest, layer.size, layer.outcome.describe());
    };
    let image = pull_image(&registry, &auth, &containerd, &target, &args.reference, &mut progress).await?;
    println!("{} {}", image.name, image.manifest_digest);
    Ok(())
}

/// The password of `--user USER`, as the first line of stdin (as
/// `docker login --password-stdin` reads it).
fn password_from_stdin() -> Result<String, CliError> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Usage(format!("--user without a password reads it from stdin: {e}")))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
