//! The checkpoint catalogue through `checkpointctl`, against the daemon and
//! a running container of real containerd: create (whole, incremental,
//! labels, compressions, quoted parents), list in every format with the
//! issue's filter examples, sorts and the chain tree, the jq pipeline, info
//! (text, metadata, diff, verify catching a damaged blob), prune (dry run,
//! folding removed parents into kept children, every kept checkpoint still
//! verifying), exit codes, the config file, and the nfs backend on a local
//! directory (this kernel has no NFS client).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::env::{with_env, with_env_config, Env, Options};

struct Cli {
    socket: std::path::PathBuf,
    ns: String,
    config: std::path::PathBuf,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Result<(i32, String, String)> {
        self.run_in(Path::new("."), args)
    }

    /// Runs in the directory `dir`.
    fn run_in(&self, dir: &Path, args: &[&str]) -> Result<(i32, String, String)> {
        crate::env::outcome(
            Command::new(env!("CARGO_BIN_EXE_checkpointctl"))
                .current_dir(dir)
                .arg("--address")
                .arg(&self.socket)
                .arg("--namespace")
                .arg(&self.ns)
                .arg("-c")
                .arg(&self.config)
                .args(args),
        )
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.run(args)?;
        ensure!(code == 0, "checkpointctl {args:?} exited {code}: {out}{err}");
        Ok(out)
    }

    fn json(&self, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        let out = self.ok(args)?;
        serde_json::from_str(&out).with_context(|| format!("{args:?} printed {out}"))
    }

    fn ids(&self, args: &[&str]) -> Result<Vec<String>> {
        Ok(self
            .json(args)?
            .iter()
            .map(|c| c["id"].as_str().unwrap_or_default().to_string())
            .collect())
    }
}

fn is_checkpoint_id(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.len() >= 3
        && parts[0] == "cp"
        && parts[1].len() == 8
        && parts[2].len() == 6
        && parts[1..].iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn checkpoint_catalogue_through_checkpointctl() {
    with_env("checkpoints", Options::default(), |env| {
        let (web, cli) = container_and_cli(env, "web", "storage:\n  backend: local\nlogging: {level: info}\n")?;
        let (ns, config) = (cli.ns.clone(), cli.config.clone());

        // Whole, then incremental checkpoints; one branch off the first.
        env.exec(
            &ns,
            &web,
            "mkdir -p /data && head -c 2000000 /dev/urandom > /data/big && echo one > /data/small && \
             echo gone-later > /data/gone && sync",
        )?;
        let id1 = cli
            .ok(&["create", &web, "-l", "golden", "-l", "prod", "--fs-only"])?
            .trim()
            .to_string();
        ensure!(is_checkpoint_id(&id1), "create printed {id1:?}");
        env.exec(
            &ns,
            &web,
            "echo two > /data/small && rm /data/gone && echo c > /data/c && sync",
        )?;
        let id2 = cli
            .ok(&[
                "create",
                &web,
                "--parent",
                &id1,
                "-l",
                "staging",
                "--compression",
                "gzip",
            ])?
            .trim()
            .to_string();
        env.exec(&ns, &web, "printf 'dddd\\n' > /data/d && sync")?;
        // A parent as jq prints it: in JSON quotes.
        let quoted = format!("\"{id2}\"");
        let id3 = cli
            .ok(&["create", &web, "-p", &quoted, "--pre-freeze"])?
            .trim()
            .to_string();
        env.exec(&ns, &web, "echo e > /data/e && sync")?;
        let id4 = cli
            .ok(&[
                "create",
                &web,
                "--parent",
                &id1,
                "-l",
                "critical",
                "--compression",
                "none",
            ])?
            .trim()
            .to_string();
        let all = [id1.clone(), id2.clone(), id3.clone(), id4.clone()];
        ensure!(
            all.iter().collect::<std::collections::BTreeSet<_>>().len() == 4,
            "ids are unique: {all:?}"
        );

        // JSON: an array, oldest first, with the documented fields.
        let listed = cli.json(&["list", "-o", "json"])?;
        let listed_ids: Vec<&str> = listed.iter().map(|c| c["id"].as_str().unwrap_or_default()).collect();
        ensure!(
            listed_ids == all.iter().map(String::as_str).collect::<Vec<_>>(),
            "{listed_ids:?}"
        );
        for c in &listed {
            let created = c["created"].as_str().unwrap_or_default();
            ensure!(
                created.len() == 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
                "created {created:?} is not YYYY-MM-DDTHH:MM:SSZ"
            );
            ensure!(c["container"] == web.as_str() && c["status"] == "ready", "{c}");
            ensure!(c["size"].as_u64().is_some() && c["labels"].is_object(), "{c}");
        }
        ensure!(
            listed[0]["parent"].is_null() && listed[1]["parent"] == id1.as_str(),
            "{listed:?}"
        );
        ensure!(
            listed[0]["size"].as_u64() > listed[2]["size"].as_u64(),
            "the incremental checkpoint stores less than the whole one: {listed:?}"
        );
        let yaml: Vec<BTreeMap<String, serde_yaml_ng::Value>> =
            serde_yaml_ng::from_str(&cli.ok(&["list", "-o", "yaml", &web])?)?;
        ensure!(yaml.len() == 4 && yaml[3]["id"] == id4.as_str());

        // The issue's filter examples.
        let filtered = |expr: &str| cli.ids(&["list", "--filter", expr, "-o", "json"]);
        ensure!(filtered("label=golden")? == vec![id1.clone()]);
        ensure!(filtered("label=prod && age<24h")? == vec![id1.clone()]);
        ensure!(filtered("size>100MB || label=critical")? == vec![id4.clone()]);
        ensure!(filtered("label in (prod,staging) && age<48h")? == vec![id1.clone(), id2.clone()]);
        ensure!(filtered("age>24h")?.is_empty());
        let (code, _, err) = cli.run(&["list", "--filter", "size>>1"])?;
        ensure!(code == 2 && err.contains("column 6"), "a bad filter: {code} {err}");

        // The seed's pipeline, with info standing in for restore (next issue).
        let pipeline = format!(
            "{bin} --address {sock} --namespace {ns} -c {config} list --filter=\"label=golden\" -o json | jq '.[-1].id' | \
             xargs {bin} --address {sock} --namespace {ns} -c {config} info",
            bin = env!("CARGO_BIN_EXE_checkpointctl"),
            sock = env.daemon_socket().display(),
            config = config.display(),
        );
        let out = Command::new("sh").arg("-c").arg(&pipeline).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains(&format!("ID:          {id1}")),
            "pipeline: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Sorts and the tree.
        let by_size = cli.json(&["list", "--sort", "size", "-o", "json"])?;
        let sizes: Vec<u64> = by_size.iter().map(|c| c["size"].as_u64().unwrap_or(0)).collect();
        ensure!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
        let tree = cli.ok(&["list", "--show-tree", &web])?;
        let first_column: Vec<String> = tree
            .lines()
            .skip(1)
            .map(|l| {
                l.split(&format!(" {web}"))
                    .next()
                    .unwrap_or_default()
                    .trim_end()
                    .to_string()
            })
            .collect();
        ensure!(
            first_column
                == vec![
                    id1.clone(),
                    format!("├── {id2}"),
                    format!("│   └── {id3}"),
                    format!("└── {id4}")
                ],
            "{tree}"
        );

        // info: text, metadata, diff, verify.
        let text = cli.ok(&["info", &id3])?;
        ensure!(
            text.contains(&format!("Chain:       {id1} -> {id2} -> {id3}")),
            "{text}"
        );
        let metadata: serde_json::Value = serde_json::from_str(&cli.ok(&["info", "--metadata", &id3])?)?;
        ensure!(metadata["parent"] == id2.as_str() && metadata["chain"].as_array().map(Vec::len) == Some(3));
        let diff = cli.ok(&["info", &format!("--diff={id1}"), &id3])?;
        for line in ["A /data/c", "A /data/d", "M /data/small", "D /data/gone"] {
            ensure!(diff.lines().any(|l| l == line), "no {line:?} in\n{diff}");
        }
        ensure!(!diff.contains("/data/big"), "{diff}");
        ensure!(cli.ok(&["info", "--verify", &id3])?.contains("objects verified"));
        let d_hex: String = Sha256::digest(b"dddd\n").iter().map(|b| format!("{b:02x}")).collect();
        let blob = env.daemon_root().join(format!("checkpoints/blobs/sha256/{d_hex}.zst"));
        ensure!(blob.is_file(), "{} is stored", blob.display());
        ensure!(
            std::fs::metadata(&blob)?.permissions().mode() & 0o777 == 0o600,
            "blobs are 0600"
        );
        let original = std::fs::read(&blob)?;
        std::fs::write(&blob, zstd::encode_all(&b"eeee\n"[..], 3)?)?;
        let (code, _, err) = cli.run(&["info", "--verify", &id3])?;
        ensure!(
            code == 1 && err.contains(&d_hex),
            "a damaged blob is named: {code} {err}"
        );
        std::fs::write(&blob, original)?;

        // Rules that keep everything here: all are recent, small, whole.
        for rule in [
            &["--keep-days", "1"][..],
            &["--max-storage", "1GB"][..],
            &["--prune-dangling"][..],
        ] {
            let mut args = vec!["prune", web.as_str(), "--dry-run"];
            args.extend_from_slice(rule);
            let out = cli.ok(&args)?;
            ensure!(out.contains("0 checkpoints would be removed"), "{rule:?}: {out}");
        }
        let by_labels = cli.ids(&["list", "--sort", "labels", "-o", "json"])?;
        ensure!(
            by_labels == vec![id3.clone(), id4.clone(), id1.clone(), id2.clone()],
            "unlabelled, critical, golden,prod, staging: {by_labels:?}"
        );
        let (code, _, err) = cli.run(&["--log-level", "debug", "list"])?;
        ensure!(
            code == 0 && err.contains("connecting to the daemon"),
            "debug logs on stderr: {err}"
        );

        // Prune: a dry run, then folding removed parents into kept children.
        let dry = cli.ok(&[
            "prune",
            &web,
            "--keep-latest",
            "2",
            "--exclude-labels",
            "critical",
            "--dry-run",
        ])?;
        ensure!(
            dry.contains(&format!("would remove {id1}"))
                && dry.contains(&format!("would remove {id2}"))
                && dry.contains(&id3)
                && dry.contains(&id4),
            "{dry}"
        );
        ensure!(
            cli.ids(&["list", "-o", "json"])?.len() == 4,
            "a dry run changes nothing"
        );
        let done = cli.ok(&["prune", &web, "--keep-latest", "2", "--exclude-labels", "critical"])?;
        ensure!(done.contains("2 checkpoints removed"), "{done}");
        let left = cli.json(&["list", "-o", "json"])?;
        ensure!(
            left.iter()
                .map(|c| c["id"].as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                == vec![id3.as_str(), id4.as_str()],
            "{left:?}"
        );
        ensure!(
            left.iter().all(|c| c["parent"].is_null()),
            "folded into roots: {left:?}"
        );
        for id in [&id3, &id4] {
            ensure!(
                cli.ok(&["info", "--verify", id])?.contains("objects verified"),
                "{id} stays restorable"
            );
        }
        let diff = cli.ok(&["info", &format!("--diff={id4}"), &id3])?;
        ensure!(diff.lines().any(|l| l == "D /data/e"), "{diff}");

        // Merge: a new chain on id3 squashed into its newest checkpoint.
        env.exec(&ns, &web, "echo five > /data/small && sync")?;
        let id5 = cli.ok(&["create", &web, "--parent", &id3])?.trim().to_string();
        env.exec(&ns, &web, "echo six > /data/small && rm /data/c && sync")?;
        let id6 = cli
            .ok(&["create", &web, "--parent", &id5, "-l", "tip"])?
            .trim()
            .to_string();
        let tree_before = cli.ok(&["info", &format!("--diff={id4}"), &id6])?;
        let dry = cli.ok(&["merge", &web, "-s", "incremental", "--dry-run"])?;
        ensure!(
            dry.contains(&format!("would merge {id3} into its child"))
                && dry.contains(&format!("would merge {id5} into its child"))
                && dry.contains(&format!("keep {id6}: "))
                && dry.contains(&format!("keep {id4}: ")),
            "{dry}"
        );
        ensure!(
            cli.ids(&["list", "-o", "json"])?.len() == 4,
            "a dry run changes nothing"
        );
        let (code, _, _) = cli.run(&["merge", &web, "-s", "time-based"])?;
        ensure!(code == 2, "time-based without a period rule is refused");
        let done = cli.ok(&["merge", &web, "-s", "incremental"])?;
        ensure!(done.contains("2 checkpoints merged"), "{done}");
        ensure!(cli.ids(&["list", "-o", "json"])? == vec![id4.clone(), id6.clone()]);
        ensure!(
            cli.ok(&["info", &format!("--diff={id4}"), &id6])? == tree_before,
            "the merged checkpoint holds the same tree"
        );
        ensure!(cli.ok(&["info", "--verify", &id6])?.contains("objects verified"));
        // Aggressive: large files become shared chunks; every tree stays.
        let chunked = cli.ok(&["merge", &web, "-s", "tagged", "--aggressive"])?;
        ensure!(chunked.contains("0 checkpoints merged"), "{chunked}");
        ensure!(
            env.daemon_root().join("checkpoints/chunks/sha256").read_dir()?.count() > 1,
            "the 2 MB file is stored as chunks"
        );
        for id in [&id4, &id6] {
            ensure!(cli.ok(&["info", "--verify", id])?.contains("objects verified"), "{id}");
        }
        ensure!(
            cli.ok(&["info", &format!("--diff={id4}"), &id6])? == tree_before,
            "chunking changes no tree"
        );

        // Exit codes: unknown container 3, unknown checkpoint 3, bad arguments 2.
        let (code, _, err) = cli.run(&["create", "no-such-container"])?;
        ensure!(code == 3, "unknown container: {code} {err}");
        let (code, _, _) = cli.run(&["info", "cp-20000101-000000"])?;
        ensure!(code == 3, "unknown checkpoint: {code}");
        let (code, _, _) = cli.run(&["create", &web, "--compression", "lz4"])?;
        ensure!(code == 2);
        let (code, _, _) = cli.run(&["prune", &web])?;
        ensure!(code == 2, "prune without a rule");
        let bad = env.dir().join("bad.yaml");
        std::fs::write(&bad, "storage:\n  s3: {bukket: x}\n")?;
        let out = Command::new(env!("CARGO_BIN_EXE_checkpointctl"))
            .args(["-c"])
            .arg(&bad)
            .args(["list"])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2) && err.contains("key storage.s3") && err.contains("bukket"),
            "{err}"
        );

        // Another namespace sees none of them.
        let other = Cli {
            socket: env.daemon_socket(),
            ns: env_namespace_for_test(&ns),
            config: config.clone(),
        };
        ensure!(other.ids(&["list", "-o", "json"])?.is_empty());

        // nfs: a mounted export, here a local directory.
        let (nfs, export) = nfs_cli(env, &ns, "export")?;
        let on_nfs = nfs
            .ok(&["--storage-backend", "nfs", "create", &web, "-l", "remote"])?
            .trim()
            .to_string();
        ensure!(nfs.ids(&["--storage-backend", "nfs", "list", "-o", "json"])? == vec![on_nfs.clone()]);
        // By label, not id: ids are unique per storage, so the nfs one may
        // repeat a local id taken in the same second.
        ensure!(
            cli.ids(&["list", "--filter", "label=remote", "-o", "json"])?.is_empty(),
            "local storage is another catalogue"
        );
        ensure!(
            export
                .join(format!("seamless-checkpoints/checkpoints/{on_nfs}.json"))
                .is_file(),
            "the checkpoint is described on the export itself"
        );
        ensure!(nfs
            .ok(&["--storage-backend", "nfs", "info", "--verify", &on_nfs])?
            .contains("verified"));
        check_no_leftovers(env)?;
        Ok(())
    });
}

/// skopeo, which reads the archives as any OCI tool would; a missing one
/// fails the test (never skipped).
fn skopeo() -> Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("skopeo"))
        .find(|p| p.is_file())
        .context("skopeo is missing: run .ci/setup, or `apt-get install skopeo` (it checks the exported OCI archives)")
}

/// `info --export` of a 3-deep chain of a running container: a private
/// OCI archive that `ctr images import` names and `skopeo` inspects;
/// `import` of it into nfs storage recreates the chain (ids, parents,
/// labels, trees; verified), refuses it a second time, and a truncated
/// archive is refused leaving nothing listed.
#[test]
fn checkpoint_archives_export_and_import() {
    with_env("checkpoint-archives", Options::default(), |env| {
        let skopeo = skopeo()?;
        let (web, cli) = container_and_cli(env, "arcweb", "storage:\n  backend: local\n")?;
        let ns = cli.ns.clone();
        env.exec(
            &ns,
            &web,
            "mkdir -p /data/dir && head -c 300000 /dev/urandom > /data/big && echo one > /data/small && \
             echo bye > /data/dir/gone && ln -s big /data/link && ln /data/big /data/big-link && \
             mkfifo /data/pipe && chmod 0640 /data/small && sync",
        )?;
        let id1 = cli
            .ok(&["create", &web, "--compression", "none", "-l", "golden"])?
            .trim()
            .to_string();
        env.exec(
            &ns,
            &web,
            "echo two > /data/small && rm -r /data/dir && cp /data/big /data/copy && sync",
        )?;
        let id2 = cli
            .ok(&["create", &web, "-p", &id1, "--compression", "gzip", "-l", "stage=2"])?
            .trim()
            .to_string();
        env.exec(&ns, &web, "echo three > /data/third && rm /data/pipe && sync")?;
        let id3 = cli.ok(&["create", &web, "-p", &id2])?.trim().to_string();
        let chain = vec![id1.clone(), id2.clone(), id3.clone()];

        let out = env.dir().join("out");
        std::fs::create_dir_all(&out)?;
        let archive = out.join("web.tar");
        let archive_arg = archive.display().to_string();
        let text = cli.ok(&["info", &id3, "--export", &archive_arg])?;
        ensure!(
            text.contains(&format!("Layers:      {id1} -> {id2} -> {id3}")),
            "{text}"
        );
        let mode = std::fs::metadata(&archive)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "the archive is {mode:o}, not 0600");
        let (code, _, err) = cli.run(&["info", &id3, "--export", &archive_arg])?;
        ensure!(
            code != 0 && err.contains("exists already"),
            "no clobbering: {code} {err}"
        );
        cli.ok(&["info", &id3, "--export", &archive_arg, "--force"])?;
        let (code, _, err) = cli.run(&["info", &id3, "--export", "/no/such/dir/x.tar"])?;
        ensure!(code == 2, "a missing directory is a usage error: {code} {err}");
        // Without a path: <id>.tar in the current directory.
        let here = env.dir().join("here");
        std::fs::create_dir_all(&here)?;
        let (code, text, err) = cli.run_in(&here, &["info", &id3, "--export"])?;
        ensure!(code == 0, "info --export without a path: {code} {text}{err}");
        let default = here.join(format!("{id3}.tar"));
        ensure!(
            text.contains(&default.display().to_string()),
            "written as {}: {text}",
            default.display()
        );
        ensure!(
            std::fs::read(&default)? == std::fs::read(&archive)?,
            "the same archive as with a path"
        );

        // Any OCI tool reads it: containerd names the image, skopeo inspects it.
        env.ctr(&ns, &["images", "import", &archive_arg])?;
        let reference = format!("seamless-checkpoint/{}:{id3}", web.to_ascii_lowercase());
        let images = env.ctr(&ns, &["images", "ls", "-q"])?;
        ensure!(
            images.lines().any(|l| l.trim() == reference),
            "ctr images import named no {reference}:\n{images}"
        );
        // Unpacked by containerd, the layers give the container's files (a
        // whiteout or opaque marker in the wrong layer would hide some).
        let rootfs = env.dir().join("imported-rootfs");
        std::fs::create_dir_all(&rootfs)?;
        let rootfs_arg = rootfs.display().to_string();
        env.ctr(&ns, &["images", "mount", &reference, &rootfs_arg])?;
        let unpacked = (|| -> Result<()> {
            let data = rootfs.join("data");
            ensure!(std::fs::read(data.join("small"))? == b"two\n");
            ensure!(std::fs::read(data.join("third"))? == b"three\n");
            ensure!(std::fs::metadata(data.join("big"))?.len() == 300_000);
            ensure!(std::fs::read(data.join("copy"))? == std::fs::read(data.join("big"))?);
            ensure!(std::fs::read_link(data.join("link"))? == Path::new("big"));
            ensure!(std::fs::metadata(data.join("big-link"))?.ino() == std::fs::metadata(data.join("big"))?.ino());
            for gone in ["pipe", "dir"] {
                ensure!(
                    std::fs::symlink_metadata(data.join(gone)).is_err(),
                    "/data/{gone} is back"
                );
            }
            Ok(())
        })();
        env.ctr(&ns, &["images", "unmount", &rootfs_arg])?;
        unpacked.context("the files of the imported image")?;
        let inspected = Command::new(&skopeo)
            .args(["inspect", &format!("oci-archive:{archive_arg}")])
            .output()?;
        ensure!(
            inspected.status.success(),
            "skopeo inspect: {}",
            String::from_utf8_lossy(&inspected.stderr)
        );
        let inspected: serde_json::Value = serde_json::from_slice(&inspected.stdout)?;
        ensure!(
            inspected["Layers"].as_array().map(Vec::len) == Some(3) && inspected["Os"] == "linux",
            "{inspected}"
        );

        // Imported into other storage: the same chain, tree for tree.
        let (nfs, _) = nfs_cli(env, &ns, "nfs-export")?;
        let imported: Vec<String> = nfs.ok(&["import", &archive_arg])?.lines().map(str::to_string).collect();
        ensure!(imported == chain, "import printed {imported:?}, not {chain:?}");
        let comparable = |c: &serde_json::Value| {
            let mut c = c.clone();
            // Storage-specific: what the blobs took there, and the change
            // object. Process state travels with the archive.
            for key in ["size", "delta_digest"] {
                c.as_object_mut().map(|o| o.remove(key));
            }
            c
        };
        let here = cli.json(&["list", "-o", "json", &web])?;
        let there = nfs.json(&["list", "-o", "json", &web])?;
        ensure!(
            here.iter().map(comparable).collect::<Vec<_>>() == there.iter().map(comparable).collect::<Vec<_>>(),
            "the imported checkpoints differ:\n{here:?}\n{there:?}"
        );
        for id in &chain {
            let verified = nfs.ok(&["info", "--verify", id])?;
            ensure!(verified.contains("objects verified"), "{verified}");
            let here = comparable(&serde_json::from_str(&cli.ok(&["info", "--metadata", id])?)?);
            let there = comparable(&serde_json::from_str(&nfs.ok(&["info", "--metadata", id])?)?);
            ensure!(here == there, "{id}: {here} vs {there}");
        }
        for (from, to) in [(&id1, &id3), (&id2, &id3), (&id1, &id2)] {
            let diff = |c: &Cli| c.ok(&["info", &format!("--diff={from}"), to]);
            let (here, there) = (diff(&cli)?, diff(&nfs)?);
            ensure!(here == there, "{from} -> {to} differs:\n{here}\n{there}");
        }
        let diff = nfs.ok(&["info", &format!("--diff={id1}"), &id3])?;
        for line in [
            "A /data/third",
            "A /data/copy",
            "M /data/small",
            "D /data/pipe",
            "D /data/dir/gone",
        ] {
            ensure!(diff.lines().any(|l| l == line), "no {line:?} in\n{diff}");
        }
        let (code, _, err) = nfs.run(&["import", &archive_arg])?;
        ensure!(
            code != 0 && err.contains("exists already"),
            "imported twice: {code} {err}"
        );

        // A truncated archive: refused, nothing listed, nothing left.
        let bytes = std::fs::read(&archive)?;
        let truncated = out.join("truncated.tar");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
        let fresh_dir = env.dir().join("nfs-fresh");
        std::fs::create_dir_all(&fresh_dir)?;
        let fresh_config = env.dir().join("fresh.yaml");
        std::fs::write(
            &fresh_config,
            format!("storage:\n  backend: nfs\n  nfs: {{path: {}}}\n", fresh_dir.display()),
        )?;
        let fresh = Cli {
            socket: env.daemon_socket(),
            ns: ns.clone(),
            config: fresh_config,
        };
        let (code, out_text, err) = fresh.run(&["import", &truncated.display().to_string()])?;
        ensure!(
            code != 0 && err.contains("damaged") && out_text.is_empty(),
            "a truncated archive: {code} {out_text} {err}"
        );
        ensure!(fresh.ids(&["list", "-o", "json"])?.is_empty(), "nothing is listed");
        let blobs = fresh_dir.join("seamless-checkpoints/blobs");
        ensure!(
            !blobs.exists() || walk_files(&blobs)?.is_empty(),
            "the failed import left blobs"
        );
        check_no_leftovers(env)?;
        Ok(())
    });
}

fn walk_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(walk_files(&entry.path())?);
        } else {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// A namespace that exists nowhere.
fn env_namespace_for_test(ns: &str) -> String {
    format!("{ns}-other")
}

/// Creates leave no scratch files behind.
fn check_no_leftovers(env: &Env) -> Result<()> {
    let path: &Path = &env.daemon_root().join("checkpoint-work");
    if path.exists() {
        let left: Vec<_> = std::fs::read_dir(path)?.collect();
        ensure!(left.is_empty(), "{} holds {left:?}", path.display());
    }
    Ok(())
}

/// moto's S3 server on a free port of 127.0.0.1, killed when dropped.
struct S3Server {
    child: std::process::Child,
    port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_s3(env: &Env) -> Result<S3Server> {
    let binary = std::env::var("SEAMLESS_MOTO_SERVER").unwrap_or_else(|_| "/opt/seamless-moto/bin/moto_server".into());
    ensure!(
        Path::new(&binary).is_file(),
        "the S3 test server {binary} is missing: run .ci/setup (it installs moto[server] into /opt/seamless-moto)"
    );
    let port = super::env::free_port()?;
    let log = std::fs::File::create(env.dir().join("moto.log"))?;
    let child = Command::new(&binary)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {binary}"))?;
    let server = S3Server { child, port };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "moto did not listen on {port} within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(server)
}

fn curl(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("curl").arg("-sf").args(args).output()?;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// The same catalogue on S3 (moto on 127.0.0.1) with every object sealed
/// at rest: create, incremental create, list, verify, prune; the stored
/// objects are not plaintext, and the daemon never logs the secrets.
#[test]
fn checkpoints_on_s3_sealed_at_rest() {
    with_env("checkpoints-s3", Options::default(), |env| {
        let s3 = start_s3(env)?;
        let endpoint = format!("http://127.0.0.1:{}", s3.port);
        curl(&["-X", "PUT", &format!("{endpoint}/ckpt")])?;
        let secret = "s3cr3t-value-that-must-not-leak";
        let key = "5e".repeat(32);
        let (web, cli) = container_and_cli(
            env,
            "s3web",
            &format!(
                "storage:\n  backend: s3\n  s3: {{bucket: ckpt, region: us-east-1, endpoint: {endpoint}, \
                 access_key: AKIATESTKEY, secret_key: {secret}}}\n  encryption_key: \"{key}\"\n"
            ),
        )?;
        let ns = cli.ns.clone();
        env.exec(&ns, &web, "mkdir -p /data && printf 'plaintext-marker\\n' > /data/known && head -c 300000 /dev/urandom > /data/r && sync")?;
        let first = cli
            .ok(&["create", &web, "--compression", "none", "-l", "s3"])?
            .trim()
            .to_string();
        env.exec(&ns, &web, "echo more > /data/more && sync")?;
        let second = cli.ok(&["create", &web, "--parent", &first])?.trim().to_string();
        ensure!(cli.ids(&["list", "-o", "json"])? == vec![first.clone(), second.clone()]);
        ensure!(cli.ok(&["info", "--verify", &second])?.contains("objects verified"));
        let (code, _, _) = cli.run(&["--storage-backend", "local", "info", &first])?;
        ensure!(code == 3, "local storage is another catalogue");

        // Sealed at rest: the object of /data/known is not its content.
        let hex: String = Sha256::digest(b"plaintext-marker\n")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let credentials = format!("AKIATESTKEY:{secret}");
        let stored = curl(&[
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            &credentials,
            &format!("{endpoint}/ckpt/seamless-checkpoints/blobs/sha256/{hex}.raw"),
        ])?;
        ensure!(stored.starts_with(b"seamseal"), "the blob is sealed");
        ensure!(
            !stored.windows(16).any(|w| w == b"plaintext-marker"),
            "the blob holds its plaintext"
        );
        // A wrong key cannot read them.
        let wrong = env.dir().join("wrong.yaml");
        let text = std::fs::read_to_string(&cli.config)?.replace(&key, &"11".repeat(32));
        write_private(&wrong, &text)?;
        let wrong_cli = Cli {
            socket: env.daemon_socket(),
            ns: ns.clone(),
            config: wrong,
        };
        let (code, _, err) = wrong_cli.run(&["info", "--verify", &second])?;
        ensure!(code != 0 && err.contains("cannot be decrypted"), "{code} {err}");

        let pruned = cli.ok(&["prune", &web, "--keep-latest", "1"])?;
        ensure!(pruned.contains(&format!("removed {first}")), "{pruned}");
        ensure!(cli.ok(&["info", "--verify", &second])?.contains("objects verified"));
        let log = std::fs::read_to_string(env.dir().join("daemon.log"))?;
        ensure!(
            !log.contains(secret) && !log.contains(&key),
            "the daemon's log holds a secret"
        );
        drop(s3);
        Ok(())
    });
}

/// `create --interval`: a checkpoint now, then one every interval, each on
/// the previous one; listed and removable with `schedule`, and kept by the
/// daemon across a kill -9.
#[test]
fn recurring_checkpoints_survive_a_restart() {
    with_env("checkpoints-schedule", Options::default(), |env| {
        let (web, cli) = container_and_cli(env, "sched", "")?;
        let (code, _, _) = cli.run(&["create", &web, "--interval", "0s"])?;
        ensure!(code == 2, "an interval under the minimum is refused");
        let out = cli.ok(&["create", &web, "--interval", "2s", "-l", "auto"])?;
        let mut lines = out.lines();
        let first = lines.next().unwrap_or_default().to_string();
        ensure!(is_checkpoint_id(&first), "{out}");
        let schedule_id = lines
            .next()
            .and_then(|l| l.strip_prefix("schedule "))
            .and_then(|l| l.split(':').next())
            .context("no schedule line")?
            .to_string();

        let listed = wait_for(env, &cli, &web, 3)?;
        ensure!(listed[0]["id"] == first.as_str(), "{listed:?}");
        for pair in listed.windows(2) {
            ensure!(
                pair[1]["parent"] == pair[0]["id"],
                "each on the previous one: {listed:?}"
            );
        }
        let schedules = cli.json(&["schedule", "ls", "-o", "json"])?;
        ensure!(
            schedules.len() == 1 && schedules[0]["id"] == schedule_id.as_str(),
            "{schedules:?}"
        );
        ensure!(schedules[0]["runs"].as_u64() >= Some(3), "{schedules:?}");

        // kill -9: the schedule is the daemon's, on disk.
        env.signal_daemon(nix::sys::signal::Signal::SIGKILL)?;
        env.start_daemon()?;
        let before = cli.json(&["list", "-f", "label=auto", "-o", "json"])?.len();
        wait_for(env, &cli, &web, before + 2)?;

        cli.ok(&["schedule", "rm", &schedule_id])?;
        ensure!(cli.json(&["schedule", "ls", "-o", "json"])?.is_empty());
        let stopped = cli.json(&["list", "-f", "label=auto", "-o", "json"])?.len();
        std::thread::sleep(std::time::Duration::from_secs(5));
        let later = cli.json(&["list", "-f", "label=auto", "-o", "json"])?.len();
        ensure!(later <= stopped + 1, "a removed schedule stops: {stopped} then {later}");
        let (code, _, _) = cli.run(&["schedule", "rm", "sched-0-0"])?;
        ensure!(code == 3, "an unknown schedule");
        Ok(())
    });
}

/// The reference's `create NAME -i 30m -l production -p cp-x`, with a short
/// interval: the schedule's first checkpoint is on the given parent, the
/// next one on the first; removing the schedule stops it.
#[test]
fn a_schedule_starts_on_the_given_parent() {
    with_env("checkpoints-schedule-parent", Options::default(), |env| {
        let (web, cli) = container_and_cli(env, "schedp", "")?;
        let base = cli.ok(&["create", &web, "--fs-only"])?.trim().to_string();
        ensure!(is_checkpoint_id(&base), "{base}");
        let out = cli.ok(&["create", &web, "-i", "2s", "-l", "auto", "-p", &base, "--fs-only"])?;
        let mut lines = out.lines();
        let first = lines.next().unwrap_or_default().to_string();
        let schedule_id = lines
            .next()
            .and_then(|l| l.strip_prefix("schedule "))
            .and_then(|l| l.split(':').next())
            .context("no schedule line")?
            .to_string();
        let listed = wait_for(env, &cli, &web, 2)?;
        ensure!(listed[0]["id"] == first.as_str(), "{listed:?}");
        ensure!(
            listed[0]["parent"] == base.as_str(),
            "the first scheduled checkpoint is on {base}: {listed:?}"
        );
        ensure!(
            listed[1]["parent"] == first.as_str(),
            "then on the previous one: {listed:?}"
        );
        cli.ok(&["schedule", "rm", &schedule_id])?;
        ensure!(cli.json(&["schedule", "ls", "-o", "json"])?.is_empty());
        Ok(())
    });
}

/// `--criu-path` and the config's `criu_path` reach the daemon, which runs
/// a caller-named criu only if its `[criu] allowed_paths` lists it and only
/// root can change it: a listed wrapper of the real criu dumps (and leaves
/// its mark), an unlisted or group-writable one is refused naming the key.
#[test]
fn a_caller_named_criu_runs_only_if_the_daemon_allows_it() {
    let dir = std::path::PathBuf::from(format!("/run/seamless-it-criu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the criu directory");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let real = std::fs::canonicalize(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("criu"))
            .find(|p| p.is_file())
            .expect("criu on PATH"),
    )
    .expect("criu's real path");
    let mark = dir.join("ran");
    let wrapper = |name: &str, mode: u32| {
        let path = dir.join(name);
        let script = format!(
            "#!/bin/sh\necho \"$@\" >> {}\nexec {} \"$@\"\n",
            mark.display(),
            real.display()
        );
        std::fs::write(&path, script).expect("writing a criu wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.display().to_string()
    };
    let allowed = wrapper("criu-allowed", 0o755);
    let loose = wrapper("criu-loose", 0o775);
    let unlisted = wrapper("criu-unlisted", 0o755);
    let config = format!("[criu]\nallowed_paths = [\"{allowed}\", \"{loose}\"]\n");
    with_env_config("checkpoints-criu-path", Options::default(), &config, |env| {
        let (web, cli) = container_and_cli(env, "criupath", "")?;
        let (code, out, err) = cli.run(&["--criu-path", &unlisted, "create", &web])?;
        ensure!(code == 1, "an unlisted criu is refused: {code} {out}{err}");
        ensure!(
            err.contains("criu.allowed_paths") && err.contains("criu-unlisted"),
            "the refusal names the binary and the key: {err}"
        );
        let (code, _, err) = cli.run(&["--criu-path", &loose, "create", &web])?;
        ensure!(
            code == 1 && err.contains("mode 0775"),
            "a group-writable criu is refused: {err}"
        );
        ensure!(!mark.exists(), "no refused criu ran");
        ensure!(cli.json(&["list", "-o", "json"])?.is_empty(), "nothing was stored");

        let id = cli.ok(&["--criu-path", &allowed, "create", &web])?.trim().to_string();
        ensure!(is_checkpoint_id(&id), "{id}");
        let ran = std::fs::read_to_string(&mark).context("the allowed criu did not run")?;
        ensure!(ran.contains("swrk"), "runc ran the named criu: {ran}");
        let info = cli.json(&["list", "-o", "json"])?;
        ensure!(info.len() == 1 && info[0]["fs_only"] != true, "{info:?}");

        // Restore too: refused before anything is created, then through the
        // allowed binary (runc in the shim runs it: a second mark).
        let restored = format!("{web}-r");
        let (code, _, err) = cli.run(&["--criu-path", &unlisted, "restore", &id, "--name", &restored])?;
        ensure!(
            code == 1 && err.contains("criu.allowed_paths"),
            "restore with an unlisted criu: {err}"
        );
        ensure!(
            !env.ctr(&cli.ns, &["containers", "ls", "-q"])?.contains(&restored),
            "a refused restore creates no container"
        );
        let marks = std::fs::read_to_string(&mark)?.lines().count();
        cli.ok(&["--criu-path", &allowed, "restore", &id, "--name", &restored, "--resume"])?;
        let after = std::fs::read_to_string(&mark)?;
        ensure!(
            after.lines().count() > marks && after.lines().last().is_some_and(|l| l.starts_with("swrk")),
            "the restore ran the named criu: {after}"
        );

        // The config file's criu_path, as --criu-path.
        let (cfg_cli, _) = nfs_cli(env, &cli.ns, "criu-config")?;
        let mut text = std::fs::read_to_string(&cfg_cli.config)?;
        text.push_str(&format!("criu_path: {unlisted}\n"));
        std::fs::write(&cfg_cli.config, text)?;
        let (code, _, err) = cfg_cli.run(&["create", &web])?;
        ensure!(
            code == 1 && err.contains("criu-unlisted") && err.contains("criu.allowed_paths"),
            "{err}"
        );
        // Only a process dump runs criu: a filesystem-only one ignores it.
        cfg_cli.ok(&["create", &web, "--fs-only"])?;
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `count` checkpoints labelled auto exist, writing to the
/// container meanwhile so each has a change.
fn wait_for(env: &Env, cli: &Cli, container: &str, count: usize) -> Result<Vec<serde_json::Value>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        // runc refuses to exec while a dump holds the container frozen.
        if let Err(e) = env.exec(&cli.ns, container, "date >> /tick && sync") {
            ensure!(format!("{e:?}").contains("paused container"), "{e:?}");
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let listed = cli.json(&["list", "-f", "label=auto", "-o", "json"])?;
        if listed.len() >= count {
            return Ok(listed);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{count} scheduled checkpoints expected, {} after 30 s",
            listed.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A CLI whose config names `nfs` storage on a new local directory
/// `<test dir>/<name>` (this kernel has no NFS client); returns the
/// directory too.
fn nfs_cli(env: &Env, ns: &str, name: &str) -> Result<(Cli, std::path::PathBuf)> {
    let export = env.dir().join(name);
    std::fs::create_dir_all(&export)?;
    let config = env.dir().join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!("storage:\n  backend: nfs\n  nfs: {{path: {}}}\n", export.display()),
    )?;
    let cli = Cli {
        socket: env.daemon_socket(),
        ns: ns.to_string(),
        config,
    };
    Ok((cli, export))
}

/// Writes a checkpointctl config that may hold secrets: 0600, as
/// checkpointctl refuses such a file that others can read.
fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A running container of the test image in a namespace of its own, and a
/// CLI for it whose config file (`<test dir>/<label>.yaml`) is `config`.
fn container_and_cli(env: &mut Env, label: &str, config: &str) -> Result<(String, Cli)> {
    let ns = env.namespace(label);
    env.pull(&ns)?;
    let id = env.container_id(label);
    env.run_container(&ns, &id)?;
    let path = env.dir().join(format!("{label}.yaml"));
    write_private(&path, config)?;
    let cli = Cli {
        socket: env.daemon_socket(),
        ns,
        config: path,
    };
    Ok((id, cli))
}
