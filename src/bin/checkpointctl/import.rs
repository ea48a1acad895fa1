//! `checkpointctl import`: recreate the checkpoints an archive of `info
//! --export` holds, in the selected storage and namespace, with their ids
//! (an id the storage has already is refused, and nothing is imported).
//! Prints their ids, oldest first. With `--engine docker`, the path is a
//! `docker-checkpoint` directory (`<dir>/<container>/<name>`), imported as
//! one checkpoint of the Docker container `<container>`.

use std::path::PathBuf;

use seamless_snapshotter::proto::ImportCheckpointRequest;

use crate::checkpoints::existing_file_path;
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Archive written by `checkpointctl info --export`, on the daemon's
    /// host. Images of other origin are refused: they carry no checkpoint.
    /// With `--engine docker`: a directory `docker-checkpoint` wrote.
    path: PathBuf,
    /// Labels of a checkpoint imported from a docker-checkpoint directory
    /// (`k=v` or `k`; repeat the flag).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
}

pub async fn run(context: &Context, args: Args) -> Result<(), CliError> {
    let path = existing_file_path(&args.path)?;
    let mut client = daemon::connect(&context.address).await?;
    let imported = client
        .import_checkpoint(ImportCheckpointRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            path: path.display().to_string(),
            docker_dir: context.engine == "docker",
            labels: args.labels,
        })
        .await
        .map_err(|status| CliError::rpc(format!("import of {}", path.display()), status))?
        .into_inner();
    for checkpoint in imported.checkpoints {
        println!("{}", checkpoint.id);
    }
    Ok(())
}
