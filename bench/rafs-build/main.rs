//! RAFS build throughput: the Nydus image of one directory tree, built the
//! way a seamless commit builds it (the tree written as a layer tar by our
//! layer builder, then RAFS v6 with lz4_block on every core), against the
//! same builder on one thread (as upstream `nydus-image create` runs),
//! Debian's `mkfs.erofs -zlz4` and `tar | zstd -3`, interleaved round by
//! round. Every variant reads the tree from the page cache alike.
//!
//! Run: `cargo bench --bench rafs_build`. Environment: RAFS_BENCH_TREE (a
//! directory to build instead of the generated one), RAFS_BENCH_MB
//! (generated size, default 1024), RAFS_BENCH_FILES (generated files,
//! default 50000), RAFS_BENCH_ROUNDS (default 3), RAFS_BENCH_DIR (scratch
//! directory, default a new one under the temp dir; the generated tree is
//! kept there for the next run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use seamless_snapshotter::nydus::{self, Compressor, RafsOptions};
use seamless_snapshotter::oci::layer::{build_layer, build_layer_parts, BuildContext, Compression, PathFilter};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A tree of `files` files and `mb` MiB: mostly small files, some large
/// ones, content half random and half repetitive (compressible about 2:1,
/// like binaries and text of a real image).
fn generate_tree(root: &Path, mb: u64, files: u64) -> std::io::Result<()> {
    let total = mb << 20;
    let large = (files / 1000).max(1);
    let small = files - large;
    // Small files share a quarter of the data, large ones the rest.
    let small_size = (total / 4 / small.max(1)).max(1);
    let large_size = total * 3 / 4 / large;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut fill = |len: u64| -> Vec<u8> {
        let mut data = Vec::with_capacity(len as usize);
        while (data.len() as u64) < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let word = state.to_le_bytes();
            // 8 random bytes, then 8 of a repeating pattern.
            data.extend_from_slice(&word);
            data.extend_from_slice(b"seamless");
        }
        data.truncate(len as usize);
        data
    };
    for i in 0..files {
        let dir = root.join(format!("d{:03}/s{:02}", i % 500, (i / 500) % 50));
        std::fs::create_dir_all(&dir)?;
        let size = if i < large { large_size } else { small_size };
        std::fs::write(dir.join(format!("f{i}")), fill(size))?;
    }
    Ok(())
}

fn du_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| du_bytes(&e.path())).sum())
        .unwrap_or(0)
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

struct Variant {
    name: &'static str,
    times: Vec<Duration>,
    output_bytes: u64,
}

fn main() {
    let mb = env_or("RAFS_BENCH_MB", 1024);
    let files = env_or("RAFS_BENCH_FILES", 50_000);
    let rounds = env_or("RAFS_BENCH_ROUNDS", 3);
    let scratch = match std::env::var("RAFS_BENCH_DIR") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => std::env::temp_dir().join(format!("rafs-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let tree = match std::env::var("RAFS_BENCH_TREE") {
        Ok(tree) => PathBuf::from(tree),
        Err(_) => {
            let tree = scratch.join("tree");
            if !tree.exists() {
                eprintln!("generating {mb} MiB in {files} files under {}", tree.display());
                generate_tree(&tree, mb, files).expect("generate tree");
            }
            tree
        }
    };
    for tool in ["mkfs.erofs", "tar", "zstd"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing: apt-get install erofs-utils tar zstd"
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let options = RafsOptions {
        fs_version: 6,
        compressor: Compressor::Lz4Block,
    };
    let mut variants = [
        Variant {
            name: "seamless (layer tar + RAFS v6 lz4, all cores)",
            times: vec![],
            output_bytes: 0,
        },
        Variant {
            name: "nydus-builder on one thread (as nydus-image)",
            times: vec![],
            output_bytes: 0,
        },
        Variant {
            name: "mkfs.erofs -zlz4 (Debian erofs-utils)",
            times: vec![],
            output_bytes: 0,
        },
        Variant {
            name: "tar | zstd -3 (one thread)",
            times: vec![],
            output_bytes: 0,
        },
    ];
    let filter = PathFilter::default();
    for round in 0..rounds {
        for (i, variant) in variants.iter_mut().enumerate() {
            let out = scratch.join(format!("out-{round}-{i}"));
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir_all(&out).expect("out dir");
            let start = Instant::now();
            match i {
                0 | 1 => {
                    let ctx = BuildContext {
                        upper: &tree,
                        previous: None,
                        lowers: &[],
                        compression: Compression::None,
                        filter: &filter,
                    };
                    let blobs = out.join("blobs");
                    if i == 0 {
                        // As a commit does: the layer written in one part per
                        // core, the parts built at once.
                        let parts = build_layer_parts(&ctx, cores, nydus::MIN_PART_BYTES, |p| {
                            out.join(format!("part-{p}.tar"))
                        })
                        .expect("layer parts");
                        let tar_time = start.elapsed();
                        let tars: Vec<PathBuf> = parts.into_iter().map(|(_, path)| path).collect();
                        nydus::build_from_parts(&tars, None, &options, &out.join("image.boot"), &blobs).expect("rafs");
                        eprintln!(
                            "  {} tars in {tar_time:.2?}, RAFS in {:.2?}",
                            tars.len(),
                            start.elapsed() - tar_time
                        );
                    } else {
                        let tar = out.join("layer.tar");
                        build_layer(&ctx, &tar).expect("layer tar");
                        let tar_time = start.elapsed();
                        let layer =
                            nydus::build_layer(&tar, None, &options, &out.join("layer.boot"), &blobs).expect("rafs");
                        nydus::merge_layers(None, &[layer], None, &out.join("image.boot")).expect("merge");
                        eprintln!("  1 tar in {tar_time:.2?}, RAFS in {:.2?}", start.elapsed() - tar_time);
                    }
                    variant.times.push(start.elapsed());
                    variant.output_bytes = dir_bytes(&blobs) + du_bytes(&out.join("image.boot"));
                }
                2 => {
                    let image = out.join("erofs.img");
                    run(Command::new("mkfs.erofs")
                        .arg("-zlz4")
                        .arg("--quiet")
                        .arg(&image)
                        .arg(&tree));
                    variant.times.push(start.elapsed());
                    variant.output_bytes = du_bytes(&image);
                }
                _ => {
                    let archive = out.join("layer.tar.zst");
                    run(Command::new("sh").arg("-c").arg(format!(
                        "tar -C '{}' -cf - . | zstd -q -3 -T1 -o '{}'",
                        tree.display(),
                        archive.display()
                    )));
                    variant.times.push(start.elapsed());
                    variant.output_bytes = du_bytes(&archive);
                }
            }
            eprintln!("round {round}: {} {:.2?}", variant.name, variant.times.last().unwrap());
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    let tree_bytes: u64 = walk_bytes(&tree);
    let median = |v: &Variant| {
        let mut t = v.times.clone();
        t.sort();
        t[t.len() / 2]
    };
    let ours = median(&variants[0]);
    println!(
        "RAFS build of {} ({:.0} MiB), {rounds} interleaved rounds, {cores} cores; median seconds, MiB/s of input, output MiB, peer/seamless time ratio",
        tree.display(),
        tree_bytes as f64 / (1 << 20) as f64
    );
    for v in &variants {
        let m = median(v);
        println!(
            "{:<50} {:>7.2} s {:>7.0} MiB/s {:>7.0} MiB  {:>5.2}x",
            v.name,
            m.as_secs_f64(),
            tree_bytes as f64 / (1 << 20) as f64 / m.as_secs_f64(),
            v.output_bytes as f64 / (1 << 20) as f64,
            m.as_secs_f64() / ours.as_secs_f64()
        );
    }
}

fn walk_bytes(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}
