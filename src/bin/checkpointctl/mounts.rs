//! `checkpointctl mounts`: the daemon's RAFS mounts of Nydus images, as a
//! table, JSON or YAML. JSON and YAML are arrays of [`MountView`], by
//! bootstrap snapshot, and their field names are stable.

use seamless_snapshotter::proto::{ListMountsRequest, RafsMount};
use serde::Serialize;

use crate::checkpoints::{columns, human_size, to_json, to_yaml};
use crate::{daemon, CliError};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json", "yaml"])]
    output: String,
}

/// One mount as `-o json|yaml` prints it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MountView {
    pub mountpoint: String,
    /// "served", "mounted" or "not-mounted".
    pub state: String,
    pub image: String,
    pub bootstrap_snapshot: String,
    /// The FUSE serving process; absent for erofs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_pid: Option<u32>,
    pub server_restarts: u32,
    pub snapshots: Vec<String>,
    pub cache_bytes: u64,
}

impl MountView {
    fn of(mount: &RafsMount) -> MountView {
        MountView {
            mountpoint: mount.mountpoint.clone(),
            state: mount.state.clone(),
            image: mount.image.clone(),
            bootstrap_snapshot: mount.bootstrap_snapshot.clone(),
            server_pid: (mount.server_pid != 0).then_some(mount.server_pid),
            server_restarts: mount.server_restarts,
            snapshots: mount.snapshots.clone(),
            cache_bytes: mount.cache_bytes,
        }
    }
}

pub async fn run(socket: &std::path::Path, args: Args) -> Result<(), CliError> {
    let mut client = daemon::connect(socket).await?;
    let mounts = client
        .list_mounts(ListMountsRequest {})
        .await
        .map_err(|status| CliError::rpc("list mounts", status))?
        .into_inner()
        .mounts;
    let views: Vec<MountView> = mounts.iter().map(MountView::of).collect();
    let out = match args.output.as_str() {
        "json" => to_json(&views) + "\n",
        "yaml" => to_yaml(&views),
        _ => render_table(&views),
    };
    print!("{out}");
    Ok(())
}

fn render_table(views: &[MountView]) -> String {
    let rows: Vec<[String; 7]> = views
        .iter()
        .map(|m| {
            [
                m.mountpoint.clone(),
                m.image.clone(),
                m.state.clone(),
                match m.server_pid {
                    Some(pid) if m.server_restarts > 0 => format!("{pid} ({} restarts)", m.server_restarts),
                    Some(pid) => pid.to_string(),
                    None => "-".to_string(),
                },
                m.snapshots.len().to_string(),
                human_size(m.cache_bytes),
                m.bootstrap_snapshot.clone(),
            ]
        })
        .collect();
    columns(
        ["MOUNT", "IMAGE", "STATE", "SERVER", "USERS", "CACHE", "BOOTSTRAP"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> RafsMount {
        RafsMount {
            mountpoint: "/var/lib/containerd-seamless/nydus/mnt/12".into(),
            state: "served".into(),
            image: "registry.local/app:nydus".into(),
            bootstrap_snapshot: "k8s.io/7/sha256:abc".into(),
            server_pid: 4242,
            server_restarts: 1,
            snapshots: vec!["k8s.io/9/web".into(), "k8s.io/10/worker".into()],
            cache_bytes: 3 << 20,
        }
    }

    #[test]
    fn the_table_shows_the_server_and_its_restarts_and_json_is_stable() {
        let erofs = RafsMount {
            mountpoint: "/var/lib/containerd-seamless/nydus/mnt/3".into(),
            state: "mounted".into(),
            server_pid: 0,
            server_restarts: 0,
            snapshots: vec!["default/4/db".into()],
            ..served()
        };
        let table = render_table(&[MountView::of(&served()), MountView::of(&erofs)]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("MOUNT"), "{table}");
        assert!(
            lines[1].contains("4242 (1 restarts)") && lines[1].contains("3.0 MB"),
            "{table}"
        );
        assert!(lines[2].contains(" - ") && lines[2].contains("mounted"), "{table}");

        let json: serde_json::Value = serde_json::from_str(&to_json(&vec![MountView::of(&erofs)])).unwrap();
        let keys: Vec<&str> = json[0].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "bootstrap_snapshot",
                "cache_bytes",
                "image",
                "mountpoint",
                "server_restarts",
                "snapshots",
                "state"
            ],
            "no server_pid for erofs"
        );
    }
}
