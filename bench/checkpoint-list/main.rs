//! `checkpointctl list --filter` over 10,000 checkpoints, end to end (the
//! CLI process, the gRPC call, the daemon's catalogue, the filter), against
//! the peer a catalogue of metadata files would offer: jq over the same
//! 10,000 JSON objects. Goal: interactive, under 100 ms.
//!
//! The daemon runs in-process on a temporary root (directory storage). One
//! checkpoint is created for real; the others are its metadata with other
//! ids, times, sizes and labels, written straight into the catalogue (their
//! data is not needed to list them).
//!
//! `cargo bench --bench checkpoint_list` (CHECKPOINTS, RUNS to change the
//! defaults 10000 and 15).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use seamless_snapshotter::api::server;
use seamless_snapshotter::capture::CaptureService;
use seamless_snapshotter::checkpoint::objects::DirStore;
use seamless_snapshotter::checkpoint::{Catalogue, Compression, NewCheckpoint};
use seamless_snapshotter::checkpoint::{CheckpointService, CheckpointSettings};
use seamless_snapshotter::commit::CommitService;
use seamless_snapshotter::config::{BackendChoice, Config};
use seamless_snapshotter::host::sys::RealSystem;
use seamless_snapshotter::snapshot::snapshotter::Snapshotter;
use seamless_snapshotter::snapshot::store::RecordKind;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time_command(cmd: &mut Command, runs: usize) -> (Duration, String) {
    let mut samples = Vec::new();
    let mut out = String::new();
    for _ in 0..runs {
        let started = Instant::now();
        let output = cmd.output().expect("run command");
        samples.push(started.elapsed());
        assert!(
            output.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        out = String::from_utf8_lossy(&output.stdout).into_owned();
    }
    (median(samples), out)
}

fn main() {
    let count = env_number("CHECKPOINTS", 10_000);
    let runs = env_number("RUNS", 15);
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut config = Config::default();
    config.storage.backend = BackendChoice::Directory;
    let snapshotter = Arc::new(Snapshotter::open(&root, &config, Arc::new(RealSystem)).expect("open snapshotter"));

    // One real checkpoint, then its metadata under 10,000 names.
    let upper = tmp.path().join("upper");
    std::fs::create_dir_all(upper.join("data")).unwrap();
    std::fs::write(upper.join("data/file"), b"content").unwrap();
    let catalogue = Catalogue::new(
        "local".into(),
        Arc::new(DirStore::open(&root.join("checkpoints"), "local").unwrap()),
        snapshotter.record_store(),
        &root.join("checkpoint-work"),
    );
    let real = catalogue
        .create(
            "cp-20260101-000000",
            &upper,
            &NewCheckpoint {
                namespace: "bench".into(),
                container: "web".into(),
                image: "registry.local/web:1".into(),
                labels: Default::default(),
                parent: None,
                compression: Compression::Zstd,
                pause: Duration::from_millis(2),
                process: None,
                container_key: None,
                engine: String::new(),
            },
        )
        .expect("create");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let json_dir = tmp.path().join("json");
    std::fs::create_dir_all(&json_dir).unwrap();
    let seeding = Instant::now();
    for i in 0..count {
        let mut c = real.clone();
        c.id = format!("cp-20260101-{:06}-{}", i % 1_000_000, i + 2);
        c.container = format!("web-{}", i % 50);
        // One per 10 minutes, back from now: ages from 0 to ~70 days.
        c.created_unix = now - (count - i) as i64 * 600;
        c.size = (i as u64 * 7919) % (500 << 20);
        c.labels.clear();
        match i % 10 {
            0 => c.labels.insert("prod".into(), String::new()),
            1 => c.labels.insert("staging".into(), String::new()),
            2 => c.labels.insert("critical".into(), String::new()),
            _ => c.labels.insert("env".into(), "dev".into()),
        };
        let json = serde_json::to_vec(&c).unwrap();
        snapshotter
            .record_store()
            .put_record(RecordKind::Checkpoints, &format!("local|{}", c.id), &json)
            .expect("seed");
        std::fs::write(json_dir.join(format!("{}.json", c.id)), &json).unwrap();
    }
    eprintln!("seeded {count} checkpoints in {:.1} s", seeding.elapsed().as_secs_f64());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let socket = tmp.path().join("d.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let capture = Arc::new(CaptureService::new(
        snapshotter.clone(),
        &root,
        root.join("no-containerd.sock"),
    ));
    let commits = Arc::new(CommitService::new(capture.clone(), 1, None).unwrap());
    let settings = CheckpointSettings::load(&root, &Config::default()).expect("checkpoint settings");
    let checkpoints = Arc::new(CheckpointService::new(capture, settings, &root));
    let server = {
        let _guard = runtime.enter();
        let listener = server::bind_socket(&socket).expect("bind");
        runtime.spawn(server::run(
            listener,
            None,
            snapshotter.clone(),
            commits,
            checkpoints,
            root.clone(),
            async {
                let _ = stopped.await;
            },
        ))
    };

    let filter = "label in (prod,staging) && age<48h && size>1MB";
    let mut ours = Command::new(env!("CARGO_BIN_EXE_checkpointctl"));
    ours.arg("--address")
        .arg(&socket)
        .arg("--namespace")
        .arg("bench")
        .arg("-c")
        .arg(tmp.path().join("absent.yaml"));
    // A missing named config file is an error: point at an empty one.
    std::fs::write(tmp.path().join("absent.yaml"), "").unwrap();
    ours.args(["list", "--filter", filter, "-o", "json"]);
    let (ours_time, ours_out) = time_command(&mut ours, runs);
    let matched: Vec<serde_json::Value> = serde_json::from_str(&ours_out).expect("json");

    let peer_filter = format!(
        "[.[] | select((.labels.prod != null or .labels.staging != null) and ({now} - .created_unix) < 172800 \
         and .size > 1048576)] | sort_by(.created_unix)"
    );
    let mut peer = Command::new("sh");
    peer.arg("-c").arg(format!(
        "find {} -name '*.json' -print0 | xargs -0 cat | jq -s '{peer_filter}'",
        json_dir.display()
    ));
    let (peer_time, peer_out) = time_command(&mut peer, runs);
    let peer_matched: Vec<serde_json::Value> = serde_json::from_str(&peer_out).expect("jq json");
    assert_eq!(matched.len(), peer_matched.len(), "both select the same checkpoints");
    let mut all = Command::new(env!("CARGO_BIN_EXE_checkpointctl"));
    all.arg("--address")
        .arg(&socket)
        .arg("--namespace")
        .arg("bench")
        .arg("-c")
        .arg(tmp.path().join("absent.yaml"))
        .args(["list", "-o", "json"]);
    let (all_time, all_out) = time_command(&mut all, runs);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&all_out).expect("json");
    assert_eq!(listed.len(), count + 1);

    println!("checkpoint list over {} checkpoints, median of {runs} runs", count + 1);
    println!("  filter: {filter} ({} match)", matched.len());
    println!(
        "  {:<52} {:>8.1} ms",
        "checkpointctl list --filter ... -o json",
        ours_time.as_secs_f64() * 1000.0
    );
    println!(
        "  {:<52} {:>8.1} ms",
        "checkpointctl list -o json (everything)",
        all_time.as_secs_f64() * 1000.0
    );
    println!(
        "  {:<52} {:>8.1} ms",
        "peer: jq over the same metadata files",
        peer_time.as_secs_f64() * 1000.0
    );
    println!(
        "  ratio ours/peer: {:.2}; goal under 100 ms: {}",
        ours_time.as_secs_f64() / peer_time.as_secs_f64(),
        if ours_time < Duration::from_millis(100) {
            "met"
        } else {
            "NOT met"
        }
    );
    let _ = stop.send(());
    let _ = runtime.block_on(server);
}
