//! `checkpointctl resume`: lets a container that `restore` left paused run,
//! on this host or, with `--target-node`, on a node of the config file.

use serde::Serialize;

use seamless_snapshotter::proto::{ResumeContainerRequest, ResumeContainerResponse};

use crate::checkpoints::{to_json, to_yaml};
use crate::settings::Settings;
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Id of the container (a restored one is paused until resumed).
    #[arg(value_name = "CONTAINER")]
    container: String,
    /// The container is on this node of the config file's `nodes:`.
    #[arg(short = 't', long, value_name = "NODE")]
    target_node: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json", "yaml"])]
    output: String,
}

pub async fn run(context: &Context, settings: &Settings, args: Args) -> Result<(), CliError> {
    let mut client = match args.target_node.as_deref() {
        Some(name) => daemon::connect_node(settings.node(name)?).await?,
        None => daemon::connect(&context.address).await?,
    };
    let resumed = client
        .resume_container(ResumeContainerRequest {
            namespace: context.namespace.clone(),
            container: args.container.clone(),
            engine: context.engine.clone(),
        })
        .await
        .map_err(|status| CliError::rpc(format!("resume of container {}", args.container), status))?
        .into_inner();
    let view = View {
        container: &args.container,
        node: args.target_node.as_deref(),
        pid: resumed.pid,
        status: &resumed.status,
        previous_status: &resumed.previous_status,
    };
    match args.output.as_str() {
        "json" => println!("{}", to_json(&view)),
        "yaml" => print!("{}", to_yaml(&view)),
        _ => println!("{}", render_text(&args.container, &resumed)),
    }
    Ok(())
}

/// A resume as `-o json|yaml` prints it.
#[derive(Debug, Serialize)]
struct View<'a> {
    container: &'a str,
    /// Null for the daemon of --address.
    node: Option<&'a str>,
    pid: u32,
    status: &'a str,
    previous_status: &'a str,
}

fn render_text(container: &str, resumed: &ResumeContainerResponse) -> String {
    match resumed.previous_status.as_str() {
        "running" => format!("container {container} was already running (pid {})", resumed.pid),
        "created" => format!(
            "started container {container} (pid {}, {})",
            resumed.pid, resumed.status
        ),
        _ => format!(
            "resumed container {container} (pid {}, {})",
            resumed.pid, resumed.status
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_says_what_happened() {
        let answer = |previous: &str| ResumeContainerResponse {
            pid: 42,
            status: "running".into(),
            previous_status: previous.into(),
        };
        assert_eq!(
            render_text("web", &answer("paused")),
            "resumed container web (pid 42, running)"
        );
        assert_eq!(
            render_text("web", &answer("created")),
            "started container web (pid 42, running)"
        );
        assert_eq!(
            render_text("web", &answer("running")),
            "container web was already running (pid 42)"
        );
    }
}
