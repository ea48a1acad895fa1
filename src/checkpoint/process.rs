//! The process side of a checkpoint: the record of the container that
//! restore recreates it from, CRIU dumps (and pre-dumps) stored as blobs of
//! the catalogue, and laying stored dumps out again as image directories
//! chained by their `parent` links, as CRIU reads them.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::Container;
use serde::{Deserialize, Serialize};

use super::beneath::{self, Beneath};
use super::catalogue::{
    blob_digest, Catalogue, CatalogueError, Compression, ProcessState, StagedFile, IMAGE_CHUNK_SIZES,
};
use super::tree;
use crate::error::{io_err, IoError};
use crate::host::criu::{CriuSettings, DumpRequest};

/// Label of a restored container: the checkpoint it was restored from.
pub const RESTORED_FROM_LABEL: &str = "io.seamless.restored-from";
/// runc reads a CRIU configuration file named by this annotation.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// CRIU's link from an image directory to its parent's.
const PARENT_LINK: &str = "parent";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    #[error(transparent)]
    Criu(#[from] crate::host::criu::CriuError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("stored CRIU images {key}: {reason}")]
    BadImages { key: String, reason: String },
    #[error("container record: {0}")]
    Record(String),
    #[error(transparent)]
    Journal(#[from] super::journal::JournalError),
}

/// What restore needs to create the container again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub snapshotter: String,
    /// containerd's name of the snapshot the container's was prepared on
    /// (the image's top layer).
    pub snapshot_parent: String,
    pub runtime_name: String,
    pub runtime_options_type: String,
    /// Hex of the runtime options' protobuf.
    pub runtime_options: String,
    pub spec_type: String,
    /// The OCI runtime spec.
    pub spec: serde_json::Value,
    /// "<pid>:<start time>" of the init process when checkpointed: a
    /// memory parent is used only for the same process.
    pub process_identity: String,
    /// The authentication of every other field, by the node that wrote the
    /// record (see `trust`); None in records of older versions and in any
    /// record someone made by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<super::trust::RecordSeal>,
}

impl ContainerRecord {
    pub fn from_container(
        container: &Container,
        snapshot_parent: String,
        process_identity: String,
    ) -> Result<ContainerRecord, ProcessError> {
        let spec = container
            .spec
            .as_ref()
            .ok_or_else(|| ProcessError::Record(format!("container {} has no spec", container.id)))?;
        let runtime = container.runtime.clone().unwrap_or_default();
        let options = runtime.options.unwrap_or_default();
        Ok(ContainerRecord {
            id: container.id.clone(),
            image: container.image.clone(),
            labels: container.labels.clone().into_iter().collect(),
            snapshotter: container.snapshotter.clone(),
            snapshot_parent,
            runtime_name: runtime.name,
            runtime_options_type: options.type_url,
            runtime_options: crate::oci::digest::hex(&options.value),
            spec_type: spec.type_url.clone(),
            spec: serde_json::from_slice(&spec.value)
                .map_err(|e| ProcessError::Record(format!("the spec of {} is not JSON: {e}", container.id)))?,
            process_identity,
            seal: None,
        })
    }

    pub fn runtime_options(&self) -> Option<prost_types::Any> {
        let value = crate::oci::digest::unhex(&self.runtime_options)?;
        (!self.runtime_options_type.is_empty()).then(|| prost_types::Any {
            type_url: self.runtime_options_type.clone(),
            value,
        })
    }

    /// The container a restore creates: named `id`, labelled with the
    /// checkpoint it comes from, its cgroup renamed after it, and CRIU told
    /// to read `criu_config` (the options the dump was taken with).
    pub fn to_container(
        &self,
        id: &str,
        checkpoint_id: &str,
        criu_config: Option<&Path>,
    ) -> Result<Container, ProcessError> {
        let mut spec = self.spec.clone();
        let object = spec
            .as_object_mut()
            .ok_or_else(|| ProcessError::Record("the spec is not a JSON object".into()))?;
        if let Some(path) = object
            .get_mut("linux")
            .and_then(|l| l.get_mut("cgroupsPath"))
            .filter(|p| p.is_string())
        {
            let old = path.as_str().unwrap_or_default().to_string();
            for separator in ['/', ':'] {
                if let Some(prefix) = old.strip_suffix(&format!("{separator}{}", self.id)) {
                    *path = serde_json::Value::String(format!("{prefix}{separator}{id}"));
                    break;
                }
            }
        }
        if let Some(config) = criu_config {
            let annotations = object
                .entry("annotations")
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if let Some(map) = annotations.as_object_mut() {
                map.insert(
                    CRIU_CONFIG_ANNOTATION.into(),
                    serde_json::Value::String(config.display().to_string()),
                );
            }
        }
        let mut labels: std::collections::HashMap<String, String> = self.labels.clone().into_iter().collect();
        labels.insert(RESTORED_FROM_LABEL.into(), checkpoint_id.to_string());
        Ok(Container {
            id: id.to_string(),
            labels,
            image: self.image.clone(),
            runtime: Some(Runtime {
                name: self.runtime_name.clone(),
                options: self.runtime_options(),
            }),
            spec: Some(prost_types::Any {
                type_url: self.spec_type.clone(),
                value: serde_json::to_vec(&spec).map_err(|e| ProcessError::Record(e.to_string()))?,
            }),
            snapshotter: self.snapshotter.clone(),
            snapshot_key: id.to_string(),
            ..Default::default()
        })
    }
}

/// "<pid>:<start time in clock ticks>" of a process, or empty if gone.
pub fn process_identity(pid: u32) -> String {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return String::new();
    };
    // Fields after the command (which may hold spaces) start at state (3);
    // start time is field 22.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .map(|start| format!("{pid}:{start}"))
        .unwrap_or_default()
}

/// Buffer of the copies of image files: large, as memory images are.
const COPY_BUFFER: usize = 1 << 20;

/// Stores `bytes` as a blob; returns its key.
pub(super) fn store_bytes(
    catalogue: &Catalogue,
    bytes: &[u8],
    compression: Compression,
    prefix: &str,
) -> Result<String, ProcessError> {
    let dir = catalogue.scratch_dir()?.to_path_buf();
    let mut staged = StagedFile::create_named(&dir, prefix).map_err(io_err("create scratch file in", &dir))?;
    staged.file.write_all(bytes).map_err(io_err("write", &staged.path))?;
    staged.file.flush().map_err(io_err("write", &staged.path))?;
    let digest = crate::oci::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(bytes));
    Ok(catalogue.store_blob(&staged.path, &digest, compression)?.key)
}

/// Stores the image directory `dir` (flat: CRIU writes no subdirectories;
/// the `parent` link is left out) as a tar. With zstd (the default), in
/// content-defined chunks each stored once: memory pages a later dump finds
/// unchanged cost nothing again, even where the kernel cannot tell CRIU
/// which pages changed. The tar then streams straight into the chunker, and
/// with `consume` each file is removed once archived, so that the storage's
/// flush does not write out images nobody reads again. With none or gzip,
/// as one blob so compressed. Returns its key, the bytes of the files and
/// the bytes written.
pub(super) fn store_images(
    catalogue: &Catalogue,
    dir: &Path,
    compression: Compression,
    consume: bool,
) -> Result<(String, u64, u64), ProcessError> {
    let names = image_files(dir)?;
    if compression == Compression::Zstd {
        let (reader, writer) = std::io::pipe().map_err(io_err("create a pipe for the images of", dir))?;
        // A pipe of 1 MiB, not 64 KiB: fewer hand-overs between the two
        // threads. Only an optimisation: a smaller one works as well.
        let _ = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&writer),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(COPY_BUFFER as i32),
        );
        let mut archived = None;
        let stored = std::thread::scope(|scope| {
            let tar = scope
                .spawn(|| write_images_tar(&names, std::io::BufWriter::with_capacity(COPY_BUFFER, writer), consume));
            catalogue.store_chunks_from(
                std::io::BufReader::with_capacity(COPY_BUFFER, reader),
                IMAGE_CHUNK_SIZES,
                &dir.display().to_string(),
                || {
                    let result = tar
                        .join()
                        .unwrap_or_else(|_| Err(ProcessError::Record("archiving the images panicked".into())));
                    let digest = result
                        .as_ref()
                        .map(|(digest, _)| digest.clone())
                        .map_err(|e| CatalogueError::Invalid(e.to_string()));
                    archived = Some(result);
                    digest
                },
            )
        });
        // The archiver's own error says more than the chunker's.
        let (_, size) = match archived {
            Some(result) => result?,
            None => {
                return Err(stored
                    .err()
                    .map_or_else(|| ProcessError::Record("images not archived".into()), Into::into))
            }
        };
        let stored = stored?;
        return Ok((stored.key, size, stored.written));
    }
    let scratch = catalogue.scratch_dir()?.to_path_buf();
    let staged = StagedFile::create_named(&scratch, "criu").map_err(io_err("create scratch file in", &scratch))?;
    let (digest, size) = write_images_tar(
        &names,
        std::io::BufWriter::with_capacity(COPY_BUFFER, &staged.file),
        false,
    )?;
    let stored = catalogue.store_blob(&staged.path, &digest, compression)?;
    Ok((stored.key, size, stored.written))
}

/// The plain files of the image directory `dir`, by name.
fn image_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, ProcessError> {
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let entry = entry.map_err(io_err("read", dir))?;
        let file_type = entry.file_type().map_err(io_err("stat", &entry.path()))?;
        if !file_type.is_file() {
            continue;
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| ProcessError::Record(format!("non-UTF-8 image name in {}", dir.display())))?;
        names.push((name, entry.path()));
    }
    names.sort();
    Ok(names)
}

/// Writes the tar of the files `names` into `out` (deterministic headers,
/// mode 0600), removing each once archived when `consume`. Returns the tar's
/// digest and the bytes of the files.
fn write_images_tar(
    names: &[(String, PathBuf)],
    out: impl Write,
    consume: bool,
) -> Result<(String, u64), ProcessError> {
    let mut size = 0;
    let mut builder = tar::Builder::new(tree::Hashing::new(out));
    builder.mode(tar::HeaderMode::Deterministic);
    for (name, path) in names {
        let mut file = fs::File::open(path).map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut header = tar::Header::new_gnu();
        header.set_size(len);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, &mut file)
            .map_err(io_err("archive", path))?;
        size += len;
        if consume {
            fs::remove_file(path).map_err(io_err("remove", path))?;
        }
    }
    let tar_stream = Path::new("the image tar");
    let hashing = builder.into_inner().map_err(io_err("write", tar_stream))?;
    let (mut writer, digest, _) = hashing.into_parts();
    writer.flush().map_err(io_err("write", tar_stream))?;
    Ok((digest, size))
}

/// Fetches and verifies the image sets `keys` (oldest first) into
/// `root/0`, `root/1`, ..., `parallel` at a time, and links each to the one
/// before as its CRIU parent (absolute links: the last directory is handed
/// to runc where it is). Returns the directories.
pub(super) fn unpack_images(
    catalogue: &Catalogue,
    keys: &[String],
    root: &Path,
    parallel: usize,
) -> Result<Vec<PathBuf>, ProcessError> {
    fs::create_dir_all(root).map_err(io_err("create", root))?;
    let dirs: Vec<PathBuf> = (0..keys.len()).map(|i| root.join(i.to_string())).collect();
    let work: Vec<(&String, &PathBuf)> = keys.iter().zip(&dirs).collect();
    for batch in work.chunks(parallel.max(1)) {
        let results: Vec<Result<(), ProcessError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|(key, dir)| scope.spawn(move || unpack_one(catalogue, key, dir)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(ProcessError::Record("unpacking panicked".into())))
                })
                .collect()
        });
        for result in results {
            result?;
        }
    }
    for pair in dirs.windows(2) {
        let link = pair[1].join(PARENT_LINK);
        std::os::unix::fs::symlink(&pair[0], &link).map_err(io_err("link", &link))?;
    }
    Ok(dirs)
}

/// Unpacks one stored image set into the new directory `dir`. CRIU
/// writes flat directories of plain files, so a member that is anything
/// else (a path with `/` or `..`, a symlink, a hard link, a device) is
/// refused, and each file is created through [`Beneath`] as a new regular
/// file of `dir`, never through a name already there.
fn unpack_one(catalogue: &Catalogue, key: &str, dir: &Path) -> Result<(), ProcessError> {
    let bad = |reason: String| ProcessError::BadImages {
        key: key.to_string(),
        reason,
    };
    fs::create_dir(dir).map_err(io_err("create", dir))?;
    let beneath = Beneath::open(dir).map_err(|e| bad(e.to_string()))?;
    let digest = blob_digest(key).ok_or_else(|| bad("not the key of a blob".into()))?;
    // Unpacked as it streams in; the digest is checked at the end, and the
    // caller discards the directory when anything failed.
    let mut reader = catalogue.open_verified(key, digest)?;
    {
        let mut tar = tar::Archive::new(&mut reader);
        for entry in tar.entries().map_err(io_err("read", dir))? {
            let mut entry = entry.map_err(io_err("read", dir))?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let name = std::str::from_utf8(&raw)
                .ok()
                .and_then(|name| beneath::flat_name(std::ffi::OsStr::new(name)))
                .filter(|name| name.as_str() != PARENT_LINK);
            let kind = entry.header().entry_type();
            let Some(name) = name.filter(|_| kind == tar::EntryType::Regular) else {
                return Err(bad(format!(
                    "unexpected member {shown:?} ({kind:?}): image sets hold plain files only"
                )));
            };
            let out = beneath
                .at(&name)
                .and_then(|at| at.create_file(0o600))
                .map_err(|e| bad(e.to_string()))?;
            // io::copy fills a BufWriter's own buffer: reads and writes of
            // 1 MiB, not 8 KiB (a memory image is most of a gigabyte).
            let mut out = std::io::BufWriter::with_capacity(COPY_BUFFER, out);
            let target = dir.join(name.as_str());
            std::io::copy(&mut entry, &mut out)
                .and_then(|_| out.flush())
                .map_err(io_err("write", &target))?;
        }
    }
    reader.finish()?;
    Ok(())
}

/// What one process-state dump is asked for.
pub(super) struct DumpInput<'a> {
    pub settings: &'a CriuSettings,
    pub namespace: &'a str,
    pub container: &'a str,
    /// Scratch directory of this dump (created, and removed by the caller).
    pub work: &'a Path,
    /// Image sets of the parent checkpoint's dump, when it is of the same
    /// process: only pages dirtied since are written.
    pub parent_images: Vec<String>,
    pub pre_dump: bool,
    pub leave_running: bool,
    /// The caller holds the container frozen and stops it itself once the
    /// checkpoint is stored: CRIU leaves it as it is, so that a failure (or
    /// a killed daemon) before then loses neither the container nor the
    /// checkpoint.
    pub stopped_by_caller: bool,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub memory_bytes: u64,
    pub process_identity: String,
    /// How the images are stored (see [`store_images`]).
    pub compression: Compression,
    /// See [`DumpPlan::consume_images`].
    pub consume_images: bool,
}

/// What a finished CRIU dump left in its scratch directory and what storing
/// it needs besides: everything [`store_dump`] reads, so that a checkpoint
/// whose daemon was killed between the dump and its storing can be stored
/// by the next start (see `journal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpPlan {
    /// Image sets already stored, oldest first (the parent checkpoint's,
    /// then this create's pre-dump): the parents of this dump's.
    pub images: Vec<String>,
    pub pre_dump: bool,
    pub pre_dump_pages_written: u64,
    /// Bytes the pre-dump's images took in storage.
    pub stored_bytes: u64,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub leave_running: bool,
    pub memory_bytes: u64,
    pub process_identity: String,
    pub criu_version: String,
    pub compression: Compression,
    /// Remove each image file once archived (see [`store_images`]); never
    /// when the dump is journaled, which must be storable again after a
    /// kill mid-store.
    pub consume_images: bool,
}

/// The directories of `work` CRIU dumps into: the images and its own
/// (with `dump.log` and `stats-dump`).
fn dump_dirs(work: &Path) -> (PathBuf, PathBuf) {
    (work.join("images"), work.join("work"))
}

/// What CRIU writes last into its log of a dump that succeeded.
const DUMP_FINISHED: &str = "Dumping finished successfully";

/// Whether the final dump in the scratch directory `work` finished: CRIU
/// logged its success. A dump killed on the way (with the daemon, or by
/// its timeout) has not, and its images are not a checkpoint.
pub fn dump_finished(work: &Path) -> bool {
    let (_, criu_work) = dump_dirs(work);
    fs::read_to_string(criu_work.join("dump.log")).is_ok_and(|log| log.contains(DUMP_FINISHED))
}

/// Dumps the container's processes (after a pre-dump if asked, whose
/// images it stores) into `input.work`, calling `before_final` with what
/// storing the dump needs just before the final dump starts: after it, with
/// `--leave-running=false`, CRIU may have stopped the container and the
/// images are the only copy of its processes. Store them with
/// [`store_dump`].
pub(super) fn dump(
    catalogue: &Catalogue,
    input: &DumpInput<'_>,
    before_final: &mut dyn FnMut(&DumpPlan) -> Result<(), ProcessError>,
) -> Result<DumpPlan, ProcessError> {
    let started = std::time::Instant::now();
    let parents = if input.parent_images.is_empty() {
        Vec::new()
    } else {
        unpack_images(catalogue, &input.parent_images, &input.work.join("parents"), 3)?
    };
    let mut previous = parents.last().cloned();
    let mut plan = DumpPlan {
        images: input.parent_images.clone(),
        pre_dump: input.pre_dump,
        pre_dump_pages_written: 0,
        stored_bytes: 0,
        tcp_established: input.tcp_established,
        file_locks: input.file_locks,
        leave_running: input.leave_running,
        memory_bytes: input.memory_bytes,
        process_identity: input.process_identity.clone(),
        criu_version: input.settings.criu_version(),
        compression: input.compression,
        consume_images: input.consume_images,
    };
    let mkdir = |dir: PathBuf| -> Result<PathBuf, ProcessError> {
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(dir)
    };
    if input.pre_dump {
        let (pre, pre_work) = (mkdir(input.work.join("pre"))?, mkdir(input.work.join("pre-work"))?);
        input.settings.dump(&DumpRequest {
            namespace: input.namespace,
            container: input.container,
            images: &pre,
            work: &pre_work,
            parent: previous
                .as_deref()
                .map(|p| relative_to_sibling(input.work, p))
                .as_deref(),
            pre_dump: true,
            leave_running: true,
            tcp_established: input.tcp_established,
            file_locks: input.file_locks,
        })?;
        plan.pre_dump_pages_written = crate::host::criu::read_stats(&pre_work, &pre)?.pages_written;
        // Kept: the final dump reads them as its parent.
        let (key, _, written) = store_images(catalogue, &pre, input.compression, false)?;
        plan.stored_bytes += written;
        plan.images.push(key);
        previous = Some(pre);
    }
    let (images, criu_work) = dump_dirs(input.work);
    let (dump, dump_work) = (mkdir(images)?, mkdir(criu_work)?);
    before_final(&plan)?;
    input.settings.dump(&DumpRequest {
        namespace: input.namespace,
        container: input.container,
        images: &dump,
        work: &dump_work,
        parent: previous
            .as_deref()
            .map(|p| relative_to_sibling(input.work, p))
            .as_deref(),
        pre_dump: false,
        leave_running: input.leave_running || input.stopped_by_caller,
        tcp_established: input.tcp_established,
        file_locks: input.file_locks,
    })?;
    tracing::info!(
        container = input.container,
        seconds = started.elapsed().as_secs_f64(),
        "processes dumped"
    );
    Ok(plan)
}

/// Stores the images and CRIU's logs of the dump [`dump`] left in `work`
/// as blobs. Storing the same dump again stores the same blobs, so a
/// journaled dump whose storing was cut short is stored again whole.
pub(super) fn store_dump(catalogue: &Catalogue, work: &Path, plan: &DumpPlan) -> Result<ProcessState, ProcessError> {
    let (dump, dump_work) = dump_dirs(work);
    let stats = crate::host::criu::read_stats(&dump_work, &dump)?;
    let mut log = String::new();
    if plan.pre_dump {
        append_log(&mut log, "pre-dump", &work.join("pre-work"));
    }
    append_log(&mut log, "dump", &dump_work);
    let (key, images_size, written) = store_images(catalogue, &dump, plan.compression, plan.consume_images)?;
    let mut images = plan.images.clone();
    images.push(key);
    let dump_log_key = store_bytes(catalogue, log.as_bytes(), Compression::Zstd, "dump-log")?;
    Ok(ProcessState {
        images,
        dump_log_key,
        stats,
        memory_bytes: plan.memory_bytes,
        images_size,
        stored_bytes: plan.stored_bytes + written,
        pre_dump: plan.pre_dump,
        pre_dump_pages_written: plan.pre_dump_pages_written,
        tcp_established: plan.tcp_established,
        file_locks: plan.file_locks,
        leave_running: plan.leave_running,
        criu_version: plan.criu_version.clone(),
        process_identity: plan.process_identity.clone(),
    })
}

/// `dir` (under `work`) as seen from another directory directly under
/// `work`: runc takes the parent images relative to the images directory.
fn relative_to_sibling(work: &Path, dir: &Path) -> PathBuf {
    Path::new("..").join(dir.strip_prefix(work).unwrap_or(dir))
}

/// Appends CRIU's log of one step (runc names it dump.log in the work
/// directory, for pre-dumps too).
fn append_log(log: &mut String, step: &str, work: &Path) {
    let text = fs::read_to_string(work.join("dump.log")).unwrap_or_else(|e| format!("(no log: {e})\n"));
    log.push_str(&format!("==> {step}\n"));
    log.push_str(&text);
    if !text.ends_with('\n') {
        log.push('\n');
    }
}

/// The CRIU configuration a restore needs for options the dump was taken
/// with (CRIU refuses to restore established connections or file locks
/// without them); None when it needs none.
pub fn restore_criu_config(process: &ProcessState) -> Option<String> {
    let mut lines = Vec::new();
    if process.tcp_established {
        lines.push("tcp-established");
    }
    if process.file_locks {
        lines.push("file-locks");
    }
    (!lines.is_empty()).then(|| lines.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"]},
            "linux": {"cgroupsPath": "/ns1/web"},
        });
        Container {
            id: "web".into(),
            image: "docker.io/library/busybox:latest".into(),
            labels: [("app".to_string(), "shop".to_string())].into_iter().collect(),
            snapshotter: "seamless".into(),
            snapshot_key: "web".into(),
            runtime: Some(Runtime {
                name: "io.containerd.runc.v2".into(),
                options: Some(prost_types::Any {
                    type_url: crate::host::criu::RUNC_OPTIONS_TYPE.into(),
                    value: vec![0x3a, 1, b'x'],
                }),
            }),
            spec: Some(prost_types::Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
                value: serde_json::to_vec(&spec).unwrap(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn records_recreate_the_container_under_a_new_name() {
        let record = ContainerRecord::from_container(&container(), "sha256:abc".into(), "7:100".into()).unwrap();
        let json = serde_json::to_string(&record).unwrap();
        let record: ContainerRecord = serde_json::from_str(&json).unwrap();
        let made = record
            .to_container("web-restored", "cp-20261201-120000", Some(Path::new("/r/criu.conf")))
            .unwrap();
        assert_eq!(made.id, "web-restored");
        assert_eq!(made.snapshot_key, "web-restored");
        assert_eq!(made.labels["app"], "shop");
        assert_eq!(made.labels[RESTORED_FROM_LABEL], "cp-20261201-120000");
        let runtime = made.runtime.unwrap();
        assert_eq!(runtime.name, "io.containerd.runc.v2");
        assert_eq!(runtime.options.unwrap().value, vec![0x3a, 1, b'x']);
        let spec: serde_json::Value = serde_json::from_slice(&made.spec.unwrap().value).unwrap();
        assert_eq!(spec["linux"]["cgroupsPath"], "/ns1/web-restored");
        assert_eq!(spec["annotations"][CRIU_CONFIG_ANNOTATION], "/r/criu.conf");
        assert_eq!(spec["process"]["args"][0], "sh");
        let plain = record.to_container("other", "cp-1", None).unwrap();
        let spec: serde_json::Value = serde_json::from_slice(&plain.spec.unwrap().value).unwrap();
        assert!(spec.get("annotations").is_none());
    }

    #[test]
    fn a_container_without_spec_has_no_record() {
        let mut c = container();
        c.spec = None;
        assert!(ContainerRecord::from_container(&c, String::new(), String::new()).is_err());
    }

    #[test]
    fn process_identity_is_pid_and_start_time() {
        let me = std::process::id();
        let id = process_identity(me);
        assert!(id.starts_with(&format!("{me}:")), "{id}");
        assert_eq!(id, process_identity(me));
        assert_eq!(process_identity(u32::MAX - 1), "");
    }

    fn catalogue(root: &Path) -> Catalogue {
        let store = std::sync::Arc::new(crate::snapshot::store::Store::open(&root.join("meta.redb")).unwrap());
        Catalogue::new(
            "local".into(),
            std::sync::Arc::new(super::super::objects::DirStore::open(&root.join("objects"), "local").unwrap()),
            store,
            &root.join("work"),
        )
    }

    #[test]
    fn image_sets_round_trip_as_a_parent_chain_and_damage_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let catalogue = catalogue(tmp.path());
        let mut keys = Vec::new();
        for (i, pages) in [b"first pages".as_slice(), b"second pages"].iter().enumerate() {
            let dir = tmp.path().join(format!("dump{i}"));
            fs::create_dir(&dir).unwrap();
            fs::write(dir.join("pages-1.img"), pages).unwrap();
            fs::write(dir.join("inventory.img"), [i as u8; 3]).unwrap();
            if i == 1 {
                std::os::unix::fs::symlink(tmp.path().join("dump0"), dir.join(PARENT_LINK)).unwrap();
            }
            // The first chunked (streamed, its files consumed), the second
            // one gzip blob.
            let compression = [Compression::Zstd, Compression::Gzip][i];
            let (key, size, written) = store_images(&catalogue, &dir, compression, i == 0).unwrap();
            assert_eq!(size, pages.len() as u64 + 3);
            assert_eq!(
                dir.join("pages-1.img").exists(),
                i == 1,
                "only a consumed directory is emptied"
            );
            assert!(written > 0);
            assert!(key.ends_with([".chunks", ".gz"][i]), "{key}");
            keys.push(key);
        }
        let out = tmp.path().join("restore");
        let dirs = unpack_images(&catalogue, &keys, &out, 2).unwrap();
        assert_eq!(fs::read(dirs[0].join("pages-1.img")).unwrap(), b"first pages");
        assert_eq!(fs::read(dirs[1].join("pages-1.img")).unwrap(), b"second pages");
        assert!(!dirs[0].join(PARENT_LINK).exists());
        assert_eq!(fs::read_link(dirs[1].join(PARENT_LINK)).unwrap(), dirs[0]);
        assert!(dirs[1].join(PARENT_LINK).join("pages-1.img").exists());
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(dirs[1].join("pages-1.img")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);

        // A blob whose content no longer matches its digest is refused.
        let stored = tmp.path().join("objects").join(&keys[1]);
        let mut raw = fs::read(&stored).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        fs::write(&stored, raw).unwrap();
        let again = tmp.path().join("restore2");
        assert!(unpack_images(&catalogue, &keys, &again, 3).is_err());
    }

    /// A tar of one member written as it is (the tar crate refuses to
    /// write `..` itself), stored as a blob; returns its key.
    fn hostile_images(catalogue: &Catalogue, dir: &Path, name: &str, kind: tar::EntryType, link: &str) -> String {
        let mut header = tar::Header::new_old();
        let field = &mut header.as_old_mut().name;
        field[..name.len()].copy_from_slice(name.as_bytes());
        if !link.is_empty() {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(0o600);
        let data: &[u8] = if kind == tar::EntryType::Regular { b"pages" } else { b"" };
        header.set_size(data.len() as u64);
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, data).unwrap();
        let bytes = builder.into_inner().unwrap();
        let digest = crate::oci::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let path = dir.join(format!("hostile-{digest}.tar"));
        fs::write(&path, &bytes).unwrap();
        catalogue.store_blob(&path, &digest, Compression::None).unwrap().key
    }

    #[test]
    fn hostile_image_sets_are_refused_and_write_nothing_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let catalogue = catalogue(tmp.path());
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("passwd"), b"root:x:0:0").unwrap();
        let target = outside.join("passwd").display().to_string();
        let cases = [
            ("../../outside/escape.img", tar::EntryType::Regular, ""),
            ("/tmp/absolute.img", tar::EntryType::Regular, ""),
            ("sub/pages.img", tar::EntryType::Regular, ""),
            ("link.img", tar::EntryType::Symlink, target.as_str()),
            ("hard.img", tar::EntryType::Link, target.as_str()),
            ("hard-up.img", tar::EntryType::Link, "../../outside/passwd"),
            ("null.img", tar::EntryType::Char, ""),
            (PARENT_LINK, tar::EntryType::Regular, ""),
        ];
        for (n, (name, kind, link)) in cases.into_iter().enumerate() {
            let key = hostile_images(&catalogue, tmp.path(), name, kind, link);
            let out = tmp.path().join(format!("restore{n}"));
            let err = unpack_images(&catalogue, &[key], &out, 1).unwrap_err();
            assert!(matches!(err, ProcessError::BadImages { .. }), "{name}: {err}");
            assert!(
                err.to_string().contains(&format!("unexpected member {name:?}")),
                "{err}"
            );
            assert_eq!(
                fs::read_dir(out.join("0")).unwrap().count(),
                0,
                "{name}: nothing unpacked"
            );
            assert_eq!(fs::read_dir(&outside).unwrap().count(), 1, "{name}: nothing outside");
            assert_eq!(fs::read(outside.join("passwd")).unwrap(), b"root:x:0:0");
        }
        assert!(!Path::new("/tmp/absolute.img").exists());
    }

    #[test]
    fn parents_are_named_relative_to_the_images_directory() {
        let work = Path::new("/w/criu-1");
        assert_eq!(relative_to_sibling(work, &work.join("pre")), Path::new("../pre"));
        assert_eq!(
            relative_to_sibling(work, &work.join("parents/2")),
            Path::new("../parents/2")
        );
    }

    #[test]
    fn restore_config_carries_the_dump_options() {
        let mut p = ProcessState::default();
        assert_eq!(restore_criu_config(&p), None);
        p.tcp_established = true;
        p.file_locks = true;
        assert_eq!(restore_criu_config(&p).unwrap(), "tcp-established\nfile-locks\n");
    }
}
