//! Kubernetes' path: containerd's CRI plugin configured with the seamless
//! snapshotter.

use super::*;

/// Kubernetes' path: containerd's CRI plugin loads with
/// `snapshotter = "seamless"`, reports the snapshotter's image filesystem, and
/// pulls through it with the `containerd.io/snapshot/cri.*` labels reaching
/// the daemon; a Prepare carrying those labels, through containerd or straight
/// to the daemon, keeps them.
#[test]
fn cri_plugin_uses_seamless_and_keeps_cri_labels() {
    with_env(
        "cri",
        Options {
            cri: true,
            ..Options::default()
        },
        |env| {
            let ns = env.namespace("k8s");
            let plugins = env.ctr_global(&["plugins", "ls"])?;
            let cri = plugins
                .lines()
                .find(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() >= 3 && cols[0] == "io.containerd.grpc.v1" && cols[1] == "cri"
                })
                .with_context(|| format!("the CRI plugin is not listed:\n{plugins}"))?;
            ensure!(
                cri.split_whitespace().last() == Some("ok"),
                "the CRI plugin did not load with snapshotter {:?}: {cri}",
                env.snapshotter
            );

            let fs = cri::image_fs_mountpoints(&env.containerd_socket())?;
            let expected_fs = format!("io.containerd.snapshotter.v1.{}", env.snapshotter);
            ensure!(
                fs.iter().any(|m| m.ends_with(&expected_fs)),
                "CRI ImageFsInfo should report {expected_fs}, it reports {fs:?}"
            );

            let reference = env.image_ref();
            let image_id = cri::pull_image(&env.containerd_socket(), &reference)?;
            ensure!(image_id.starts_with("sha256:"), "CRI PullImage answered {image_id:?}");
            let built = env.image();
            let layer_digests = built.diff_ids.join(",");
            if env.snapshotter == "seamless" {
                let all = Snapshots::daemon(&env.daemon_socket())?.list(&[])?;
                for (layer, chain_id) in built.chain_ids.iter().enumerate() {
                    let info = all
                        .iter()
                        .find(|i| i.labels.get("containerd.io/snapshot.ref") == Some(chain_id))
                        .with_context(|| {
                            format!(
                                "CRI pulled, but the daemon has no snapshot for chain id {chain_id}: {:?}",
                                all.iter().map(|i| &i.name).collect::<Vec<_>>()
                            )
                        })?;
                    ensure!(grpc::is_committed(info), "layer {layer} is not committed: {info:?}");
                    let expected = [
                        ("containerd.io/snapshot/cri.image-ref", reference.as_str()),
                        (
                            "containerd.io/snapshot/cri.manifest-digest",
                            built.manifest_digest.as_str(),
                        ),
                        (
                            "containerd.io/snapshot/cri.layer-digest",
                            built.diff_ids[layer].as_str(),
                        ),
                    ];
                    for (key, value) in expected {
                        ensure!(
                            info.labels.get(key).map(String::as_str) == Some(value),
                            "layer {layer} ({}) should carry {key}={value} from the CRI pull; labels: {:?}",
                            info.name,
                            info.labels
                        );
                    }
                }
            }

            // A Prepare with CRI labels through containerd's snapshots service...
            let labels: HashMap<String, String> = [
                ("containerd.io/snapshot/cri.image-ref", reference.clone()),
                (
                    "containerd.io/snapshot/cri.manifest-digest",
                    built.manifest_digest.clone(),
                ),
                ("containerd.io/snapshot/cri.layer-digest", built.diff_ids[0].clone()),
                ("containerd.io/snapshot/cri.image-layers", layer_digests.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let mut through_containerd = Snapshots::containerd(&env.containerd_socket(), &env.snapshotter, &ns)?;
            // Nothing else references the snapshot: keep the garbage collector off it.
            let mut with_root = labels.clone();
            with_root.insert("containerd.io/gc.root".to_string(), "2023-11-14T22:13:20Z".to_string());
            through_containerd.prepare("cri-prepare", "", with_root)?;
            let info = through_containerd.stat("cri-prepare")?;
            ensure!(grpc::is_active(&info), "cri-prepare should be active: {info:?}");
            expect_labels(&info, &labels, "Stat through containerd")?;

            if env.snapshotter == "seamless" {
                let mut daemon = Snapshots::daemon(&env.daemon_socket())?;
                let suffix = "/cri-prepare";
                let backend = daemon
                    .list(&[])?
                    .into_iter()
                    .find(|i| i.name.starts_with(&format!("{ns}/")) && i.name.ends_with(suffix))
                    .with_context(|| format!("the daemon has no snapshot named {ns}/<n>{suffix}"))?;
                expect_labels(&backend, &labels, "the daemon's view of the Prepare through containerd")?;

                // ...and straight to the daemon, as a remote snapshotter client
                // would do it.
                let key = format!("{ns}/9999/cri-direct");
                daemon.prepare(&key, "", labels.clone())?;
                let info = daemon.stat(&key)?;
                ensure!(grpc::is_active(&info), "{key} should be active: {info:?}");
                expect_labels(&info, &labels, "Stat straight from the daemon")?;
                daemon.remove(&key)?;
            }
            through_containerd.remove("cri-prepare")?;
            Ok(())
        },
    );
}
