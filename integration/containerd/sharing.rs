//! Committed layers shared between namespaces through containerd's
//! `containerd.io/snapshot.ref` label.

use super::*;

/// Two namespaces share committed layers through containerd's
/// `containerd.io/snapshot.ref` label: an unpack that labels its Prepare with
/// the chain id of a layer the daemon already holds (in any namespace) gets
/// AlreadyExists, and containerd adopts the existing snapshot instead of
/// unpacking again. The layers outlive the first namespace's image.
///
/// containerd 1.6's `ctr images pull` unpacks through `rootfs.ApplyLayers`,
/// which never sets that label, so the first namespace is `k8s.io`, pulled
/// through CRI (containerd's unpacker, which labels every layer), and the
/// second namespace replays the unpacker's RPCs (Stat, then Prepare with the
/// label) through containerd's snapshots service; its `ctr images pull` then
/// finds every layer and unpacks nothing.
#[test]
fn namespaces_share_committed_layers() {
    // The namespaces that may share, as the operator lists them; the test's
    // namespace names are fixed by its name and process.
    let second_name = format!("sit-share-b-{}", std::process::id());
    with_env_config(
        "share",
        Options {
            cri: true,
            ..Options::default()
        },
        &format!("[snapshotter]\nshared_namespaces = [\"k8s.io\", \"{second_name}\"]\n"),
        |env| {
            let second = env.namespace("b");
            ensure!(
                second == second_name,
                "namespace {second} is not the one configured as sharing"
            );
            let chain = env.image().chain_ids.clone();
            let image_id = cri::pull_image(&env.containerd_socket(), &env.image_ref())?;
            ensure!(image_id.starts_with("sha256:"), "CRI PullImage answered {image_id:?}");
            expect_snapshots(env, "k8s.io", &[], "after the CRI pull")?;
            let before = daemon_snapshots(env)?;

            // The unpacker works under a lease, which keeps what it adopts from
            // the garbage collector until the image references it.
            let lease = "sit-unpack";
            env.ctr(&second, &["leases", "create", "--id", lease])?;
            let mut snapshots =
                Snapshots::containerd(&env.containerd_socket(), &env.snapshotter, &second)?.with_lease(lease);
            for (layer, chain_id) in chain.iter().enumerate() {
                let parent = if layer == 0 { "" } else { chain[layer - 1].as_str() };
                let found = snapshots.stat(chain_id);
                ensure!(
                    found.is_err(),
                    "{chain_id} exists in {second} before its unpack: {found:?}"
                );
                let key = format!("extract-{layer}-test {chain_id}");
                let labels = HashMap::from([("containerd.io/snapshot.ref".to_string(), chain_id.clone())]);
                match snapshots.prepare(&key, parent, labels) {
                    Err(e) if grpc::code_of(&e) == Some(tonic::Code::AlreadyExists) => {}
                    Err(e) => bail!("Prepare of layer {layer} with the chain id label should be AlreadyExists: {e:?}"),
                    Ok(mounts) => {
                        bail!(
                        "Prepare of layer {layer} ({chain_id}) unpacks again instead of reusing the layer: {mounts:?}"
                    )
                    }
                }
                let info = snapshots
                    .stat(chain_id)
                    .with_context(|| format!("layer {layer} after adoption"))?;
                ensure!(
                    grpc::is_committed(&info),
                    "adopted layer {layer} is not committed: {info:?}"
                );
            }
            env.pull(&second)?;
            env.ctr(&second, &["leases", "delete", "--sync", lease])?;
            expect_snapshots(env, &second, &[], "after adopting the layers and pulling")?;

            let after = daemon_snapshots(env)?;
            ensure!(
            after == before,
            "adopting the layers in a second namespace must not create snapshots in the daemon:\n  before {before:#?}\n  after  {after:#?}"
        );
            ensure!(
                env.snapshotter != "seamless"
                    || (after.len() == chain.len()
                        && after
                            .iter()
                            .all(|s| s.starts_with("k8s.io/") && s.contains("(committed"))),
                "the daemon should hold exactly the {} committed layers of k8s.io: {after:#?}",
                chain.len()
            );

            let id = env.container_id("c1");
            env.run_container(&second, &id)?;
            check_image_content(env, &second, &id)?;

            // k8s.io lets go of the image; the second namespace still holds the
            // layers, so garbage collection must keep them.
            // CRI names the image by tag, repo digest and id: remove them all.
            let names = env.ctr("k8s.io", &["images", "ls", "-q"])?;
            let mut rm = vec!["images", "rm", "--sync"];
            rm.extend(names.split_whitespace());
            env.ctr("k8s.io", &rm)?;
            let left = env.snapshots("k8s.io")?;
            ensure!(
                left.is_empty(),
                "k8s.io still has snapshots after removing the image: {left:?}"
            );
            expect_snapshots(env, &second, &[&id], "after k8s.io removed the image")?;
            let id2 = env.container_id("c2");
            env.run_container(&second, &id2)?;
            let out = env.exec(&second, &id2, &format!("cat {}", image::GREETING.0))?;
            ensure!(
                out == image::GREETING.1,
                "a container of the second namespace after k8s.io let go: {out:?}"
            );
            // A namespace the operator did not list claims the same chain
            // ids: it is not handed the layers, it unpacks its own.
            let outsider = env.namespace("c");
            let mut theirs = Snapshots::containerd(&env.containerd_socket(), &env.snapshotter, &outsider)?;
            let outsider_key = format!("extract-0-outsider {}", chain[0]);
            let labels = HashMap::from([("containerd.io/snapshot.ref".to_string(), chain[0].clone())]);
            if let Err(e) = theirs.prepare(&outsider_key, "", labels) {
                bail!("a namespace not listed as sharing must unpack its own layer, got {e:?}");
            }
            ensure!(
                theirs.stat(&chain[0]).is_err(),
                "the outsider namespace sees {} without having unpacked it",
                chain[0]
            );
            theirs.remove(&outsider_key)?;
            env.remove_container(&second, &id)?;
            env.remove_container(&second, &id2)?;
            Ok(())
        },
    );
}
