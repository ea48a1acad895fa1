//! `checkpointctl version` (and `nydusify version`): this client's version,
//! then what the daemon runs and where.

use std::path::Path;

use seamless_snapshotter::proto::{VersionRequest, VersionResponse};

use crate::{daemon, CliError};

pub async fn run(socket: &Path) -> Result<(), CliError> {
    // Printed first: it needs no daemon.
    println!("client: {}", env!("CARGO_PKG_VERSION"));
    let mut client = daemon::connect(socket).await?;
    let response = client
        .version(VersionRequest {})
        .await
        .map_err(|status| CliError::rpc("version", status))?
        .into_inner();
    print!("{}", render(&response));
    Ok(())
}

/// `key: value` lines with the values aligned.
fn render(response: &VersionResponse) -> String {
    let rows = [
        ("version", &response.version),
        ("storage", &response.storage),
        ("root", &response.root),
    ];
    let width = rows.iter().map(|(key, _)| key.len() + 1).max().unwrap_or(0);
    rows.iter()
        .map(|(key, value)| format!("{:<width$} {value}\n", format!("{key}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_aligned() {
        let response = VersionResponse {
            version: "0.1.0".into(),
            storage: "btrfs".into(),
            root: "/var/lib/containerd-seamless".into(),
        };
        assert_eq!(
            render(&response),
            "version: 0.1.0\nstorage: btrfs\nroot:    /var/lib/containerd-seamless\n"
        );
    }
}
