//! Commits a running container with the library API, as the seamless-commit
//! reference's Go example does, and waits for the image to be pushed:
//!
//! ```sh
//! cargo run --example seamless_commit -- [--address SOCK] [--namespace NS] [--insecure] CONTAINER TARGET
//! ```

use std::time::Duration;

use seamless_snapshotter::api::client::{CommitOptions, SeamlessSnapshot, SnapshotState};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut options = CommitOptions::default();
    let mut positional = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--address" => options.address = args.next().ok_or("--address needs a socket")?.into(),
            "--namespace" => options.namespace = args.next().ok_or("--namespace needs a name")?,
            "--insecure" => (options.target_insecure, options.source_insecure) = (true, true),
            _ => positional.push(arg),
        }
    }
    let [container, target] = positional.as_slice() else {
        return Err("usage: seamless_commit [--address SOCK] [--namespace NS] [--insecure] CONTAINER TARGET".into());
    };

    let ss = SeamlessSnapshot::new(options).await?;
    let result = ss.commit(container, target).await?;
    println!("Snapshot ID: {}", result.snapshot_id);
    println!(
        "Pause Time: {}",
        seamless_snapshotter::time::go_duration(result.pause_time)
    );

    loop {
        let status = ss.get_status(&result.snapshot_id).await?;
        println!("{:?} {:.0}% {}", status.state, status.progress * 100.0, status.stage);
        match status.state {
            SnapshotState::Completed => break,
            SnapshotState::Failed => return Err(status.error.unwrap_or_default().into()),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
