//! Creating, reading and listing checkpoints: metadata published beside
//! the data and indexed in the daemon's store (refreshed from a shared
//! storage before it is read), changes (deltas) and chains, and the trees
//! they add up to. A checkpoint exists once its metadata object does.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::SystemTime;

use super::blobs::content_key;
use super::record::Subjected;
use super::{validate_id, Catalogue, CatalogueError, Checkpoint, Compression, NewCheckpoint};
use crate::checkpoint::filter::Filter;
use crate::checkpoint::objects::ObjectError;
use crate::checkpoint::tree::{self, Delta, Tree, TreeDiff};
use crate::error::io_err;
use crate::oci::digest::sha256_hex;
use crate::snapshot::store::RecordKind;

fn record_key(storage_id: &str, id: &str) -> String {
    format!("{storage_id}|{id}")
}

impl Catalogue {
    /// Whether other daemons may write this storage (nfs, s3): its
    /// checkpoints' metadata objects are then the truth, and this daemon's
    /// index of them is refreshed from them before it is read.
    fn shared(&self) -> bool {
        self.storage_id != "local"
    }

    /// Reads metadata object `checkpoints/<id>.json`, if it exists.
    fn read_published(&self, id: &str) -> Result<Option<(Checkpoint, Vec<u8>)>, CatalogueError> {
        let key = format!("checkpoints/{id}.json");
        let bytes = match self.objects.get(&key) {
            Ok(bytes) => bytes,
            Err(ObjectError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let checkpoint: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Corrupt {
            id: id.to_string(),
            message: format!("unreadable metadata object {key}: {e}"),
        })?;
        if checkpoint.id != id {
            return Err(CatalogueError::Corrupt {
                id: id.to_string(),
                message: format!("{key} describes checkpoint {}", checkpoint.id),
            });
        }
        Ok(Some((checkpoint, bytes)))
    }

    /// Records metadata read from the storage in this daemon's index,
    /// writing only when it differs (a read is far cheaper than a write).
    fn index(&self, record: &str, bytes: &[u8]) -> Result<(), CatalogueError> {
        if self.store.get_record(RecordKind::Checkpoints, record)?.as_deref() != Some(bytes) {
            self.store.put_record(RecordKind::Checkpoints, record, bytes)?;
        }
        Ok(())
    }

    /// Makes this daemon's index of a shared storage what the storage
    /// holds: checkpoints other daemons made, changed (by their prunes and
    /// merges) or removed.
    fn refresh(&self) -> Result<(), CatalogueError> {
        let prefix = format!("{}|", self.storage_id);
        let indexed: BTreeSet<String> = self
            .store
            .list_records(RecordKind::Checkpoints)?
            .into_iter()
            .filter_map(|(key, _)| key.strip_prefix(&prefix).map(str::to_string))
            .collect();
        let mut published = BTreeSet::new();
        for (key, _) in self.objects.list("checkpoints/")? {
            let Some(id) = key.strip_prefix("checkpoints/").and_then(|k| k.strip_suffix(".json")) else {
                continue;
            };
            if validate_id(id).is_err() {
                continue;
            }
            if let Some((_, bytes)) = self.read_published(id)? {
                self.index(&record_key(&self.storage_id, id), &bytes)?;
                published.insert(id.to_string());
            }
        }
        for gone in indexed.difference(&published) {
            self.store
                .remove_record(RecordKind::Checkpoints, &record_key(&self.storage_id, gone))?;
        }
        Ok(())
    }

    /// Every checkpoint of this storage, oldest first.
    pub fn all(&self) -> Result<Vec<Checkpoint>, CatalogueError> {
        if self.shared() {
            self.refresh()?;
        }
        let prefix = format!("{}|", self.storage_id);
        let mut out = Vec::new();
        for (key, bytes) in self.store.list_records(RecordKind::Checkpoints)? {
            if !key.starts_with(&prefix) {
                continue;
            }
            let checkpoint: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Corrupt {
                id: key.clone(),
                message: format!("unreadable record: {e}"),
            })?;
            out.push(checkpoint);
        }
        out.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Checkpoint, CatalogueError> {
        validate_id(id)?;
        if self.shared() {
            let record = record_key(&self.storage_id, id);
            return match self.read_published(id)? {
                Some((checkpoint, bytes)) => {
                    self.index(&record, &bytes)?;
                    Ok(checkpoint)
                }
                None => {
                    self.store.remove_record(RecordKind::Checkpoints, &record)?;
                    Err(CatalogueError::NotFound {
                        storage: self.describe(),
                        id: id.to_string(),
                    })
                }
            };
        }
        let bytes = self
            .store
            .get_record(RecordKind::Checkpoints, &record_key(&self.storage_id, id))?
            .ok_or_else(|| CatalogueError::NotFound {
                storage: self.describe(),
                id: id.to_string(),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| CatalogueError::Corrupt {
            id: id.to_string(),
            message: format!("unreadable record: {e}"),
        })
    }

    /// Checkpoints of `namespace` (and `container` if not empty) that pass
    /// `filter`, oldest first.
    pub fn list(
        &self,
        namespace: &str,
        container: &str,
        filter: Option<&Filter>,
    ) -> Result<Vec<Checkpoint>, CatalogueError> {
        let now = SystemTime::now();
        Ok(self
            .all()?
            .into_iter()
            .filter(|c| c.namespace == namespace && (container.is_empty() || c.container == container))
            .filter(|c| filter.is_none_or(|f| f.matches(&Subjected(c, now))))
            .collect())
    }

    /// A new id for a checkpoint made at `now`: `cp-YYYYMMDD-HHMMSS`, with
    /// `-2`, `-3`... when taken.
    pub fn new_id(&self, now: SystemTime) -> Result<String, CatalogueError> {
        let stamp = crate::time::rfc3339(now);
        // 2026-12-01T10:11:12Z -> 20261201-101112
        let digits: String = stamp.chars().filter(|c| c.is_ascii_digit()).collect();
        let base = format!("cp-{}-{}", &digits[..8], &digits[8..14]);
        let taken = |id: &str| -> Result<bool, CatalogueError> {
            if self.shared() && self.objects.size(&format!("checkpoints/{id}.json"))?.is_some() {
                return Ok(true);
            }
            Ok(self
                .store
                .get_record(RecordKind::Checkpoints, &record_key(&self.storage_id, id))?
                .is_some())
        };
        if !taken(&base)? {
            return Ok(base);
        }
        for n in 2.. {
            let id = format!("{base}-{n}");
            if !taken(&id)? {
                return Ok(id);
            }
        }
        unreachable!("some suffix is free")
    }

    pub(in crate::checkpoint) fn read_delta(&self, checkpoint: &Checkpoint) -> Result<Delta, CatalogueError> {
        let stored = self.objects.get(&checkpoint.delta_key)?;
        let corrupt = |message: String| CatalogueError::Corrupt {
            id: checkpoint.id.clone(),
            message,
        };
        if sha256_hex(&stored) != checkpoint.delta_digest {
            return Err(corrupt(format!("{} does not match its digest", checkpoint.delta_key)));
        }
        let json = zstd::decode_all(&stored[..]).map_err(|e| corrupt(format!("{}: {e}", checkpoint.delta_key)))?;
        serde_json::from_slice(&json).map_err(|e| corrupt(format!("{}: {e}", checkpoint.delta_key)))
    }

    /// Stores `delta` for checkpoint `id` under a key no other version of
    /// it used; returns (key, digest, size).
    pub(in crate::checkpoint) fn write_delta(
        &self,
        id: &str,
        delta: &Delta,
    ) -> Result<(String, String, u64), CatalogueError> {
        let json = serde_json::to_vec(delta).map_err(|e| CatalogueError::Invalid(e.to_string()))?;
        let stored = zstd::encode_all(&json[..], 3).map_err(io_err("compress", Path::new(id)))?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let key = format!("deltas/{id}-{nanos}.json.zst");
        self.objects.put(&key, &stored)?;
        Ok((key, sha256_hex(&stored), stored.len() as u64))
    }

    /// Makes `checkpoint` exist: its metadata beside the data (the commit
    /// point), then in the daemon's store.
    pub(in crate::checkpoint) fn publish(&self, checkpoint: &Checkpoint) -> Result<(), CatalogueError> {
        let json = serde_json::to_vec_pretty(checkpoint).map_err(|e| CatalogueError::Invalid(e.to_string()))?;
        self.objects
            .put(&format!("checkpoints/{}.json", checkpoint.id), &json)?;
        self.store.put_record(
            RecordKind::Checkpoints,
            &record_key(&self.storage_id, &checkpoint.id),
            &json,
        )?;
        Ok(())
    }

    pub(in crate::checkpoint) fn unpublish(&self, id: &str) -> Result<(), CatalogueError> {
        self.objects.delete(&format!("checkpoints/{id}.json"))?;
        self.store
            .remove_record(RecordKind::Checkpoints, &record_key(&self.storage_id, id))?;
        Ok(())
    }

    /// The chain of `checkpoint`: its ancestors, oldest first, then itself.
    pub fn chain(&self, checkpoint: &Checkpoint) -> Result<Vec<Checkpoint>, CatalogueError> {
        let mut chain = vec![checkpoint.clone()];
        let mut seen = BTreeSet::from([checkpoint.id.clone()]);
        while let Some(parent) = chain.last().and_then(|c| c.parent.clone()) {
            if !seen.insert(parent.clone()) {
                return Err(CatalogueError::Corrupt {
                    id: checkpoint.id.clone(),
                    message: format!("its chain loops at {parent}"),
                });
            }
            let found = self.get(&parent).map_err(|e| match e {
                CatalogueError::NotFound { .. } => CatalogueError::Corrupt {
                    id: checkpoint.id.clone(),
                    message: format!("its parent {parent} is missing"),
                },
                other => other,
            })?;
            chain.push(found);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The whole tree of `checkpoint` and where each file content of it is
    /// stored (its blob key, by digest): what a restore writes back.
    pub fn restore_plan(&self, checkpoint: &Checkpoint) -> Result<(Tree, HashMap<String, String>), CatalogueError> {
        let mut tree = Tree::new();
        let mut keys = HashMap::new();
        for link in self.chain(checkpoint)? {
            let delta = self.read_delta(&link)?;
            delta.apply(&mut tree);
            for digest in delta.digests() {
                let key = content_key(&link, &delta, &digest);
                keys.insert(digest, key);
            }
        }
        Ok((tree, keys))
    }

    pub fn tree_of(&self, checkpoint: &Checkpoint) -> Result<Tree, CatalogueError> {
        let mut tree = Tree::new();
        for link in self.chain(checkpoint)? {
            self.read_delta(&link)?.apply(&mut tree);
        }
        Ok(tree)
    }

    /// Stores the writable layer captured at `upper` as a checkpoint.
    pub fn create(&self, id: &str, upper: &Path, new: &NewCheckpoint) -> Result<Checkpoint, CatalogueError> {
        validate_id(id)?;
        let parent = match &new.parent {
            Some(parent_id) => {
                let parent = self.get(parent_id)?;
                if parent.namespace != new.namespace || parent.container != new.container {
                    return Err(CatalogueError::Invalid(format!(
                        "parent {parent_id} is a checkpoint of {}/{}, not of {}/{}",
                        parent.namespace, parent.container, new.namespace, new.container
                    )));
                }
                Some(parent)
            }
            None => None,
        };
        let parent_tree = match &parent {
            Some(p) => Some(self.tree_of(p)?),
            None => None,
        };
        self.scratch_dir()?;
        let mut tree = tree::read_tree_unhashed(upper, parent_tree.as_ref())?;
        let (mut stored_bytes, mut stored_keys) = self.hash_and_store(upper, &mut tree, new.compression)?;
        tree::fill_hardlink_digests(&mut tree);
        // Files the parent had unchanged are not read again, but their blob
        // may be stored with another compression: make sure it is here.
        let empty = Tree::new();
        let mut delta = Delta::between(parent_tree.as_ref().unwrap_or(&empty), &tree);
        for (path, entry) in &delta.changed {
            let Some(digest) = &entry.digest else { continue };
            if delta.stored.contains_key(digest) {
                continue;
            }
            // Hashed just now, its key is known; otherwise (content the
            // parent had) it is looked up, and stored if need be.
            let key = match stored_keys.remove(digest) {
                Some(key) => key,
                None => {
                    let stored = self.store_blob(&upper.join(path), digest, new.compression)?;
                    stored_bytes += stored.written;
                    stored.key
                }
            };
            delta.stored.insert(digest.clone(), key);
        }
        let (delta_key, delta_digest, delta_size) = self.write_delta(id, &delta)?;
        let checkpoint = Checkpoint {
            id: id.to_string(),
            namespace: new.namespace.clone(),
            container: new.container.clone(),
            image: new.image.clone(),
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64,
            // Process images are stored before: their new chunks count here.
            size: stored_bytes + delta_size + new.process.as_ref().map_or(0, |p| p.stored_bytes),
            content_size: delta.content_bytes(),
            labels: new.labels.clone(),
            parent: new.parent.clone(),
            status: "ready".into(),
            compression: new.compression,
            changed_entries: delta.changed.len() as u64,
            removed_entries: delta.removed.len() as u64,
            fs_only: new.process.is_none(),
            pause_ns: new.pause.as_nanos() as u64,
            delta_key,
            delta_digest,
            process: new.process.clone(),
            container_key: new.container_key.clone(),
            engine: new.engine.clone(),
        };
        self.publish(&checkpoint)?;
        Ok(checkpoint)
    }

    /// Hashes the files of `tree` that have no digest yet and stores their
    /// content (unless stored already), on as many threads as there are
    /// cores; returns the bytes written and the key of each digest.
    fn hash_and_store(
        &self,
        upper: &Path,
        tree: &mut Tree,
        compression: Compression,
    ) -> Result<(u64, HashMap<String, String>), CatalogueError> {
        let todo: Vec<String> = tree
            .iter()
            .filter(|(_, e)| e.kind == tree::EntryKind::File && e.hardlink.is_none() && e.digest.is_none())
            .map(|(p, _)| p.clone())
            .collect();
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
        let next = std::sync::atomic::AtomicUsize::new(0);
        // Per worker: (path, digest, key) of each file it hashed, and bytes written.
        type Hashed = Result<(Vec<(String, String, String)>, u64), CatalogueError>;
        let results: Vec<Hashed> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers.min(todo.len().max(1)))
                .map(|_| {
                    scope.spawn(|| {
                        let mut digests = Vec::new();
                        let mut written = 0;
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(rel) = todo.get(i) else { break };
                            let path = upper.join(rel);
                            let digest = tree::hash_file(&path)?;
                            let stored = self.store_blob(&path, &digest, compression)?;
                            written += stored.written;
                            digests.push((rel.clone(), digest, stored.key));
                        }
                        Ok((digests, written))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CatalogueError::Invalid("a hashing thread panicked".into())))
                })
                .collect()
        });
        let mut written = 0;
        let mut keys = HashMap::new();
        for result in results {
            let (digests, bytes) = result?;
            written += bytes;
            for (rel, digest, key) in digests {
                if let Some(entry) = tree.get_mut(&rel) {
                    entry.digest = Some(digest.clone());
                }
                keys.insert(digest, key);
            }
        }
        Ok((written, keys))
    }

    pub fn diff(&self, from: &Checkpoint, to: &Checkpoint) -> Result<TreeDiff, CatalogueError> {
        Ok(tree::diff(&self.tree_of(from)?, &self.tree_of(to)?))
    }

    /// Blob keys the tree of `checkpoint` needs.
    pub fn blobs_needed(&self, checkpoint: &Checkpoint) -> Result<usize, CatalogueError> {
        let mut keys = BTreeSet::new();
        for link in self.chain(checkpoint)? {
            let delta = self.read_delta(&link)?;
            keys.extend(self.blob_keys(&link, &delta));
        }
        Ok(keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use super::*;
    use crate::checkpoint::objects::DirStore;
    use crate::snapshot::store::Store;
    use std::fs;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn daemons_sharing_a_storage_see_each_others_checkpoints() {
        let w = world();
        let shared = w._tmp.path().join("export");
        // Two daemons: each its own metadata store, one shared directory.
        let daemon = |n: u32| {
            Catalogue::new(
                "nfs:/export".into(),
                Arc::new(DirStore::open(&shared, "nfs").unwrap()),
                Arc::new(Store::open(&w._tmp.path().join(format!("meta{n}.redb"))).unwrap()),
                &w._tmp.path().join(format!("work{n}")),
            )
        };
        let (a, b) = (daemon(1), daemon(2));
        fs::write(w.upper.join("data/f"), b"one").unwrap();
        let first = a
            .create("cp-20261201-100000", &w.upper, &new(None, &[], Compression::Zstd))
            .unwrap();
        assert_eq!(b.get(&first.id).unwrap(), first, "made by the other daemon");
        assert_eq!(b.all().unwrap(), vec![first.clone()]);
        assert_eq!(
            b.new_id(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_119_200))
                .unwrap(),
            "cp-20261201-100000-2",
            "an id the other daemon took is not reused"
        );
        fs::write(w.upper.join("data/f"), b"two").unwrap();
        let second = b
            .create(
                "cp-20261201-100100",
                &w.upper,
                &new(Some(&first.id), &[], Compression::Zstd),
            )
            .unwrap();
        assert_eq!(a.all().unwrap().len(), 2);
        assert_eq!(a.tree_of(&a.get(&second.id).unwrap()).unwrap()["data/f"].size, 3);
        // Removed by one daemon: gone for the other, and its garbage
        // collection keeps what the other's checkpoints need.
        a.unpublish(&second.id).unwrap();
        assert_eq!(
            b.all().unwrap().iter().map(|c| &c.id).collect::<Vec<_>>(),
            vec![&first.id]
        );
        assert!(matches!(b.get(&second.id), Err(CatalogueError::NotFound { .. })));
        a.collect_garbage().unwrap();
        let (_, failures) = b.verify(&b.get(&first.id).unwrap()).unwrap();
        assert!(failures.is_empty(), "{failures:?}");
    }

    #[test]
    fn incremental_checkpoints_store_only_what_changed_and_restore_whole_trees() {
        let w = world();
        let big = vec![7u8; 300_000];
        fs::write(w.upper.join("data/big"), &big).unwrap();
        fs::write(w.upper.join("data/small"), b"one").unwrap();
        fs::write(w.upper.join("data/gone"), b"bye").unwrap();
        let first = w
            .catalogue
            .create(
                "cp-20261201-100000",
                &w.upper,
                &new(None, &["golden"], Compression::Zstd),
            )
            .unwrap();
        assert_eq!(blob_count(&w), 3);
        assert!(first.size > 0 && first.size < 300_000, "compressed: {}", first.size);
        assert_eq!(first.content_size, 300_000 + 3 + 3);

        fs::write(w.upper.join("data/small"), b"two").unwrap();
        fs::remove_file(w.upper.join("data/gone")).unwrap();
        fs::write(w.upper.join("data/copy"), &big).unwrap();
        let second = w
            .catalogue
            .create(
                "cp-20261201-100100",
                &w.upper,
                &new(Some(&first.id), &["env=prod"], Compression::Zstd),
            )
            .unwrap();
        assert_eq!(
            blob_count(&w),
            4,
            "only the new content of small is stored; the copy is deduplicated"
        );
        assert_eq!(second.removed_entries, 1);
        assert_eq!(second.parent.as_deref(), Some(first.id.as_str()));
        let tree = w.catalogue.tree_of(&second).unwrap();
        assert!(tree.contains_key("data/copy") && !tree.contains_key("data/gone"));
        assert_eq!(w.catalogue.chain(&second).unwrap().len(), 2);
        let d = w.catalogue.diff(&first, &second).unwrap();
        assert_eq!(
            (d.added.clone(), d.removed.clone()),
            (vec!["data/copy".to_string()], vec!["data/gone".to_string()])
        );
        assert!(d.changed.contains(&"data/small".to_string()), "{d:?}");
        assert_eq!(d.size_delta, 300_000 - 3);

        // Listing, with filters.
        let f = Filter::parse("label=golden").unwrap();
        let listed = w.catalogue.list("ns", "", Some(&f)).unwrap();
        assert_eq!(
            listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            vec![first.id.as_str()]
        );
        let f = Filter::parse("label=env=prod && age<1h").unwrap();
        assert_eq!(w.catalogue.list("ns", "c1", Some(&f)).unwrap().len(), 1);
        assert_eq!(w.catalogue.list("other", "", None).unwrap().len(), 0);

        // Verify passes, then names a damaged blob.
        let (checked, failures) = w.catalogue.verify(&second).unwrap();
        assert!(checked >= 5 && failures.is_empty(), "{checked} {failures:?}");
        let small_digest = tree["data/small"].digest.clone().unwrap();
        let small_key = w.objects.join(format!("blobs/sha256/{small_digest}.zst"));
        fs::write(&small_key, zstd::encode_all(&b"tampered"[..], 3).unwrap()).unwrap();
        let (_, failures) = w.catalogue.verify(&second).unwrap();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains(&small_digest) && failures[0].contains("hashes to"),
            "{failures:?}"
        );
    }
}
