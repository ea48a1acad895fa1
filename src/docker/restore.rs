//! Restoring a checkpoint directory as a new Docker container: the
//! directory checked (private, every digest matching, the record confined,
//! the writable layer free of devices and of links out of it) before the
//! engine is asked for anything; then a container created from the record,
//! the writable layer copied into its upper directory and CRIU's images
//! into its own checkpoint directory, and the engine asked to start it from
//! them. A failure removes the new container; the checkpoint is never
//! changed but for `restore.log`, which says what happened.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::layout::{CheckpointDir, RECORD, RESTORE_LOG, ROOTFS_DIFF};
use super::verify::{verify, Verification};
use super::DockerCheckpointError;
use crate::error::io_err;
use crate::host::docker::{DockerClient, DockerError};
use crate::host::sys::{RealSystem, SystemOps};

/// The largest `container.json` read (an inspect answer is a few KiB).
const MAX_RECORD: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The container the checkpoint was taken of, as named then.
    pub container: String,
    pub name: String,
    pub dir: PathBuf,
    pub new_name: String,
    /// Where the lock serialising restores' CRIU options is kept.
    pub state_root: PathBuf,
    /// runc's CRIU options file ([`super::criu_config::RUNC_CRIU_CONFIG`]).
    pub runc_criu_config: PathBuf,
}

#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub id: String,
    pub path: PathBuf,
    /// From the engine's create call to its start returning.
    pub restore_time: Duration,
    pub verification: Verification,
}

/// Restores `<dir>/<container>/<name>/` as the container `new_name`, then
/// verifies it; `restore.log` in the checkpoint says what was done.
pub async fn restore(engine: &DockerClient, options: &RestoreOptions) -> Result<RestoreReport, DockerCheckpointError> {
    let dir = CheckpointDir::open(&options.dir, &options.container, &options.name)?;
    let mut log = RestoreLog::new(&dir, options);
    let result = restore_into(engine, &dir, options, &mut log).await;
    match &result {
        Ok(report) => {
            for check in &report.verification.checks {
                log.line(&format!(
                    "verify {}: {} ({})",
                    check.name,
                    if check.ok { "ok" } else { "FAILED" },
                    check.detail
                ));
            }
        }
        Err(e) => log.line(&format!("restore failed: {e}")),
    }
    log.save();
    result
}

async fn restore_into(
    engine: &DockerClient,
    dir: &CheckpointDir,
    options: &RestoreOptions,
    log: &mut RestoreLog,
) -> Result<RestoreReport, DockerCheckpointError> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || dir.check_sums(threads))
            .await
            .map_err(|e| DockerCheckpointError::Copy {
                what: "the checkpoint's digests".into(),
                message: e.to_string(),
            })??;
    }
    log.line("every file matches SHA256SUMS");
    let record = read_record(&dir.join(RECORD))?;
    let body = super::record::create_body(&record).map_err(|reason| DockerCheckpointError::Record {
        path: dir.join(RECORD).display().to_string(),
        reason,
    })?;
    let images = dir.criu_files()?;
    let rootfs = dir.join(ROOTFS_DIFF);
    check_layer(&rootfs)?;
    let plan = EnginePlan {
        body: &body,
        new_name: &options.new_name,
        checkpoint_name: &options.name,
        images_dir: dir.path(),
        images: &images,
        state_root: &options.state_root,
        runc_criu_config: &options.runc_criu_config,
    };
    let mut lines = Vec::new();
    let restored = restore_through_engine(
        engine,
        &plan,
        move |upper| {
            RealSystem
                .copy_tree(&rootfs, upper)
                .map_err(|e| DockerCheckpointError::Copy {
                    what: "the writable layer".into(),
                    message: e.to_string(),
                })
        },
        &mut lines,
    )
    .await;
    for line in lines {
        log.line(&line);
    }
    let restored = restored?;
    match &restored.criu_log {
        Some(text) => log.block("CRIU's restore.log", text),
        None => log.line("CRIU's restore.log could not be read before the engine removed it"),
    }
    let verification = verify(engine, &restored.id, super::tty_of(&record)).await;
    Ok(RestoreReport {
        id: restored.id,
        path: dir.path().to_path_buf(),
        restore_time: restored.restore_time,
        verification,
    })
}

/// What a restore through the engine starts from: the create body (from
/// a checked record), and CRIU's files, flat in `images_dir`.
#[derive(Debug, Clone, Copy)]
pub struct EnginePlan<'a> {
    pub body: &'a Value,
    pub new_name: &'a str,
    /// The name the images take in the new container's checkpoint
    /// directory (a single path component).
    pub checkpoint_name: &'a str,
    pub images_dir: &'a Path,
    pub images: &'a [String],
    /// Where the lock serialising restores' CRIU options is kept.
    pub state_root: &'a Path,
    pub runc_criu_config: &'a Path,
}

/// A container the engine restored.
#[derive(Debug, Clone)]
pub struct EngineRestored {
    pub id: String,
    /// From the create call to the start returning.
    pub restore_time: Duration,
    /// CRIU's log of the restore, when it could be read.
    pub criu_log: Option<String>,
}

/// Creates the container `plan.new_name`, has `write_layer` fill its
/// (empty) upper directory, places CRIU's images in its checkpoint
/// directory and starts it from them; a failure removes it. `log` gets a
/// line per step.
pub async fn restore_through_engine<W>(
    engine: &DockerClient,
    plan: &EnginePlan<'_>,
    write_layer: W,
    log: &mut Vec<String>,
) -> Result<EngineRestored, DockerCheckpointError>
where
    W: FnOnce(&Path) -> Result<(), DockerCheckpointError> + Send + 'static,
{
    if !plan
        .images
        .iter()
        .any(|f| f.starts_with("core-") && f.ends_with(".img"))
    {
        return Err(DockerCheckpointError::Damaged {
            path: plan.images_dir.display().to_string(),
            reason: "it holds no CRIU images (core-*.img)".into(),
        });
    }
    let info = engine.info().await?;
    if info.get("ExperimentalBuild").and_then(Value::as_bool) != Some(true) {
        return Err(DockerCheckpointError::NotExperimental);
    }
    let docker_root = info
        .get("DockerRootDir")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .ok_or_else(|| DockerError::Answer {
            call: "info".into(),
            what: "no absolute DockerRootDir".into(),
        })?;
    match engine.inspect(plan.new_name).await {
        Ok(_) => return Err(DockerCheckpointError::NameTaken(plan.new_name.to_string())),
        Err(DockerError::NoSuchContainer(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let started = Instant::now();
    let id = engine.create(plan.new_name, plan.body).await.map_err(|e| match e {
        DockerError::Refused { status: 409, .. } => DockerCheckpointError::NameTaken(plan.new_name.to_string()),
        other => other.into(),
    })?;
    log.push(format!("created container {} ({id})", plan.new_name));
    let placed = place_and_start(engine, plan, &id, &docker_root, write_layer, log).await;
    match placed {
        Ok(criu_log) => {
            let restore_time = started.elapsed();
            log.push(format!("started from the checkpoint in {restore_time:?}"));
            Ok(EngineRestored {
                id,
                restore_time,
                criu_log,
            })
        }
        Err((e, criu_log)) => {
            if let Err(removal) = engine.remove(&id).await {
                tracing::warn!(container = %id, error = %removal, "cannot remove the container of a failed restore");
            }
            if let Some(text) = criu_log {
                log.push(format!("CRIU's restore.log:\n{}", text.trim_end()));
            }
            log.push(format!("removed container {id}"));
            Err(e)
        }
    }
}

/// Fills the new container's upper directory and checkpoint directory,
/// then starts it from them. Returns CRIU's log of the restore (also with
/// the error).
async fn place_and_start<W>(
    engine: &DockerClient,
    plan: &EnginePlan<'_>,
    id: &str,
    docker_root: &Path,
    write_layer: W,
    log: &mut Vec<String>,
) -> Result<Option<String>, (DockerCheckpointError, Option<String>)>
where
    W: FnOnce(&Path) -> Result<(), DockerCheckpointError> + Send + 'static,
{
    let created = engine.inspect(id).await.map_err(|e| (e.into(), None))?;
    let upper = created
        .get("GraphDriver")
        .and_then(|g| g.get("Data"))
        .and_then(|d| d.get("UpperDir"))
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(docker_root) && p.is_dir())
        .ok_or_else(|| {
            let e = DockerCheckpointError::Runtime {
                container: id.into(),
                reason: format!("no overlay2 upper directory under {}", docker_root.display()),
            };
            (e, None)
        })?;
    if !super::is_container_id(id) {
        let e = DockerCheckpointError::Runtime {
            container: id.into(),
            reason: "the engine gave a malformed id".into(),
        };
        return Err((e, None));
    }
    let checkpoints = docker_root
        .join("containers")
        .join(id)
        .join("checkpoints")
        .join(plan.checkpoint_name);
    {
        let (upper, source, checkpoints, images) = (
            upper.clone(),
            plan.images_dir.to_path_buf(),
            checkpoints.clone(),
            plan.images.to_vec(),
        );
        tokio::task::spawn_blocking(move || {
            write_layer(&upper)?;
            place_images(&source, &checkpoints, &images)
        })
        .await
        .map_err(|e| DockerCheckpointError::Copy {
            what: "the checkpoint".into(),
            message: e.to_string(),
        })
        .and_then(|r| r)
        .map_err(|e| (e, None))?;
    }
    log.push(format!(
        "wrote the writable layer into {} and placed {} CRIU files in {}",
        upper.display(),
        plan.images.len(),
        checkpoints.display()
    ));
    let needs = super::criu_config::restore_options(plan.images);
    let _lock = super::criu_config::lock(&plan.state_root.join("criu-config.lock")).map_err(|e| (e, None))?;
    let config = super::criu_config::provide(plan.runc_criu_config, &needs).map_err(|e| (e, None))?;
    if !needs.is_empty() {
        log.push(format!(
            "CRIU restores with {} (from {})",
            needs.join(", "),
            plan.runc_criu_config.display()
        ));
    }
    let unpack_dirs = containerd_temp_dirs();
    let before = checkpoint_copies(&unpack_dirs);
    let mut watcher = tokio::spawn(open_restore_log(id.to_string()));
    let started = engine.start(id, Some(plan.checkpoint_name)).await;
    drop(config);
    // The engine has read them into its own store by now.
    if let Err(e) = fs::remove_dir_all(&checkpoints) {
        tracing::warn!(path = %checkpoints.display(), error = %e, "cannot remove the engine's copy of the checkpoint");
    }
    let removed = remove_unpacked_copies(&unpack_dirs, &before, plan.images_dir);
    if removed > 0 {
        log.push(format!(
            "removed {removed} copy of the images containerd left in its temporary directory"
        ));
    }
    // Opened while CRIU wrote it: readable after the engine removes it. A
    // watcher that has not found it yet gets a moment more; after a
    // successful start the shim (and its bundle) are still there anyway.
    let watched = match tokio::time::timeout(LAST_LOOK, &mut watcher).await {
        Ok(found) => found.ok().flatten(),
        Err(_) => {
            watcher.abort();
            None
        }
    };
    let criu_log = watched
        .or_else(|| find_shim_bundle(id).and_then(|b| open_nofollow(&b.join("work").join("restore.log")).ok()))
        .and_then(read_log);
    match started {
        Ok(()) => Ok(criu_log),
        Err(e) => Err((e.into(), criu_log)),
    }
}

/// Where containerd unpacks a checkpoint it restores from: its `TMPDIR`
/// (`ctrd-checkpoint*`), read from the environment of every containerd
/// process, else /tmp. containerd 1.6 never removes that copy (966 MiB per
/// restore of a 1 GB process).
fn containerd_temp_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/tmp")];
    let Ok(entries) = fs::read_dir("/proc") else {
        return dirs;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name();
        if !pid.to_str().is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "containerd" {
            continue;
        }
        let environ = fs::read(entry.path().join("environ")).unwrap_or_default();
        let tmpdir = environ
            .split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(b"TMPDIR="))
            .map(|dir| PathBuf::from(String::from_utf8_lossy(dir).into_owned()))
            .filter(|dir| dir.is_absolute());
        if let Some(dir) = tmpdir {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// The `ctrd-checkpoint*` directories in `dirs`.
fn checkpoint_copies(dirs: &[PathBuf]) -> std::collections::HashSet<PathBuf> {
    dirs.iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ctrd-checkpoint"))
        .map(|e| e.path())
        .collect()
}

/// Removes the copies of our images containerd unpacked during this start:
/// new since `before`, real directories whose `inventory.img` and
/// `descriptors.json` are ours byte for byte. Returns how many.
fn remove_unpacked_copies(dirs: &[PathBuf], before: &std::collections::HashSet<PathBuf>, images: &Path) -> usize {
    let ours = |name: &str| fs::read(images.join(name)).ok();
    let (inventory, descriptors) = (ours("inventory.img"), ours("descriptors.json"));
    let mut removed = 0;
    for copy in checkpoint_copies(dirs).difference(before) {
        let is_dir = fs::symlink_metadata(copy).is_ok_and(|m| m.is_dir());
        let same = |name: &str, want: &Option<Vec<u8>>| {
            want.is_some() && open_nofollow(&copy.join(name)).ok().and_then(|f| read_bytes(f).ok()) == *want
        };
        if is_dir && same("inventory.img", &inventory) && same("descriptors.json", &descriptors) {
            match fs::remove_dir_all(copy) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(path = %copy.display(), error = %e, "cannot remove containerd's copy of the images")
                }
            }
        }
    }
    removed
}

fn read_bytes(file: fs::File) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(1 << 20).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// How long the watcher of CRIU's log may still take once the start has
/// returned.
const LAST_LOOK: Duration = Duration::from_millis(500);

/// How often the shim of a container being restored is looked for.
const WATCH_INTERVAL: Duration = Duration::from_millis(5);

/// Opens CRIU's log of the restore of container `id` once it appears: in
/// the work directory of the bundle of its shim (the process whose
/// arguments are `-id <id>`, working in the bundle). Runs until aborted.
async fn open_restore_log(id: String) -> Option<fs::File> {
    let mut bundle: Option<PathBuf> = None;
    loop {
        if bundle.is_none() {
            bundle = find_shim_bundle(&id);
        }
        if let Some(bundle) = &bundle {
            if let Ok(file) = open_nofollow(&bundle.join("work").join("restore.log")) {
                return Some(file);
            }
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// The bundle of the shim serving container `id`, by its arguments.
fn find_shim_bundle(id: &str) -> Option<PathBuf> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let serves = args.windows(2).any(|w| w[0] == b"-id" && w[1] == id.as_bytes());
        if serves && args.first().is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2")) {
            let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            return (cwd.file_name()? == std::ffi::OsStr::new(id)).then_some(cwd);
        }
    }
    None
}

fn open_nofollow(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Links (or, across filesystems, copies) CRIU's files into the engine's
/// checkpoint directory `target`, made 0700.
fn place_images(source: &Path, target: &Path, images: &[String]) -> Result<(), DockerCheckpointError> {
    if let Some(parent) = target.parent() {
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(parent)
            .map_err(io_err("create", parent))?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(target)
        .map_err(io_err("create", target))?;
    for name in images {
        let (from, to) = (source.join(name), target.join(name));
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(io_err("copy", &from))?;
        }
    }
    Ok(())
}

/// The most of CRIU's restore log copied into `restore.log`.
const MAX_CRIU_LOG: u64 = 4 << 20;

fn read_log(file: fs::File) -> Option<String> {
    let mut text = Vec::new();
    file.take(MAX_CRIU_LOG).read_to_end(&mut text).ok()?;
    Some(String::from_utf8_lossy(&text).into_owned())
}

/// `container.json` at `path` as JSON, read only up to its bound (the
/// file is outside our trust: a larger one is refused, not read whole).
pub fn read_record(path: &Path) -> Result<Value, DockerCheckpointError> {
    let bad = |reason: String| DockerCheckpointError::Record {
        path: path.display().to_string(),
        reason,
    };
    let file = fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut text = Vec::new();
    file.take(MAX_RECORD + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_RECORD {
        return Err(bad(format!("larger than {MAX_RECORD} bytes")));
    }
    serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))
}

/// Refuses a writable layer holding what a container's own files cannot:
/// a device other than overlayfs' whiteouts (character 0:0), or a hard
/// link to a file outside the layer (which the copy would read into the
/// container).
pub fn check_layer(root: &Path) -> Result<(), DockerCheckpointError> {
    let damaged = |reason: String| DockerCheckpointError::Damaged {
        path: root.display().to_string(),
        reason,
    };
    let meta = fs::symlink_metadata(root).map_err(|e| damaged(format!("no writable layer: {e}")))?;
    if !meta.is_dir() {
        return Err(damaged("the writable layer is not a directory".into()));
    }
    let mut links: HashMap<(u64, u64), (u64, u64, PathBuf)> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
            let kind = meta.file_type();
            let shown = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_block_device() || (kind.is_char_device() && meta.rdev() != 0) {
                return Err(damaged(format!("{shown} is a device: a container's layer holds none")));
            } else if kind.is_file() && meta.nlink() > 1 {
                let seen = links
                    .entry((meta.dev(), meta.ino()))
                    .or_insert((meta.nlink(), 0, path.clone()));
                seen.1 += 1;
            }
        }
    }
    if let Some((_, _, path)) = links.values().find(|(nlink, found, _)| found < nlink) {
        let shown = path.strip_prefix(root).unwrap_or(path).display().to_string();
        return Err(damaged(format!("{shown} is a hard link to a file outside the layer")));
    }
    Ok(())
}

/// `restore.log`: what one restore did, appended to the checkpoint's
/// (0600), for the troubleshooting the reference describes.
struct RestoreLog {
    dir: CheckpointDir,
    text: String,
}

impl RestoreLog {
    fn new(dir: &CheckpointDir, options: &RestoreOptions) -> RestoreLog {
        let mut log = RestoreLog {
            dir: dir.clone(),
            text: String::new(),
        };
        log.line(&format!(
            "restore of {}/{} as {}",
            options.container, options.name, options.new_name
        ));
        log
    }

    fn line(&mut self, text: &str) {
        let now = crate::time::rfc3339(std::time::SystemTime::now());
        self.text.push_str(&format!("{now} {text}\n"));
    }

    /// `text` under a heading, as it is.
    fn block(&mut self, heading: &str, text: &str) {
        self.line(&format!("{heading}:"));
        self.text.push_str(text);
        if !text.ends_with('\n') {
            self.text.push('\n');
        }
    }

    fn save(&self) {
        let path = self.dir.join(RESTORE_LOG);
        let mut all = fs::read(&path).unwrap_or_default();
        all.extend_from_slice(self.text.as_bytes());
        if let Err(e) = self.dir.write_file(RESTORE_LOG, &all) {
            tracing::warn!(error = %e, "cannot write restore.log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_or_malformed_record_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("container.json");
        fs::write(&path, vec![b' '; (MAX_RECORD + 1) as usize]).unwrap();
        let err = read_record(&path).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        fs::write(&path, b"{\"Config\":").unwrap();
        assert!(read_record(&path).unwrap_err().to_string().contains("not JSON"));
        fs::write(&path, b"{\"Config\":{}}").unwrap();
        assert!(read_record(&path).is_ok());
    }

    #[test]
    fn a_layer_with_a_device_or_an_outside_hard_link_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        fs::create_dir_all(layer.join("etc")).unwrap();
        fs::write(layer.join("etc/a"), b"a").unwrap();
        fs::hard_link(layer.join("etc/a"), layer.join("etc/b")).unwrap();
        check_layer(&layer).unwrap();

        fs::write(tmp.path().join("secret"), b"s").unwrap();
        fs::hard_link(tmp.path().join("secret"), layer.join("etc/shadow")).unwrap();
        let err = check_layer(&layer).unwrap_err();
        assert!(err.to_string().contains("etc/shadow is a hard link"), "{err}");
        fs::remove_file(layer.join("etc/shadow")).unwrap();

        // As root (the unit tests run as root): a whiteout is fine, a real
        // device is not.
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        mknod(&layer.join("gone"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), 0).unwrap();
        check_layer(&layer).unwrap();
        mknod(
            &layer.join("sda"),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            makedev(8, 0),
        )
        .unwrap();
        let err = check_layer(&layer).unwrap_err();
        assert!(err.to_string().contains("sda is a device"), "{err}");
        assert!(check_layer(&tmp.path().join("missing")).is_err());
    }
}
