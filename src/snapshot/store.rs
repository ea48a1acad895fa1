//! Snapshot metadata in an embedded transactional store (redb). Every
//! operation is one transaction, so a crash at any instant leaves either the
//! state before or after it. Owns the snapshot rules that are pure metadata:
//! unique keys, parents that exist and are committed, no removal under a
//! child. Never touches snapshot directories itself: `create` takes a closure
//! that makes the directory inside the transaction.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::SystemTime;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorKind};
use crate::snapshot::model::{Info, Kind, Labels, Usage};

/// key or name -> JSON of [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// "<parent>\0<child>" -> (), so "has children" is a range lookup.
const CHILDREN: TableDefinition<&str, ()> = TableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Commit job id -> JSON of the job (owned by `commit`).
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// "<namespace>/<container>" -> JSON of the container's commit chain (owned by `commit`).
const CHAINS: TableDefinition<&str, &[u8]> = TableDefinition::new("chains");
/// "<storage>|<checkpoint id>" -> JSON of a checkpoint (owned by `checkpoint`).
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
/// Schedule id -> JSON of a recurring checkpoint (owned by `checkpoint`).
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");
const NEXT_ID: &str = "next_id";
const SCHEMA: &str = "schema";
const SCHEMA_VERSION: u64 = 1;

/// Records other modules keep beside the snapshots, as opaque JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Commit jobs, by snapshot id.
    Jobs,
    /// Commit chains, by "<namespace>/<container>".
    Chains,
    /// The checkpoint catalogue, by "<storage>|<checkpoint id>".
    Checkpoints,
    /// Recurring checkpoints, by schedule id.
    Schedules,
}

impl RecordKind {
    fn table(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            RecordKind::Jobs => JOBS,
            RecordKind::Chains => CHAINS,
            RecordKind::Checkpoints => CHECKPOINTS,
            RecordKind::Schedules => SCHEDULES,
        }
    }
}

/// A record as read: decoded, or why it does not decode.
pub type Decoded<T> = Result<T, StoreError>;

/// One table of records a subsystem above keeps in this database (commit
/// jobs, commit chains, checkpoint schedules), typed as that subsystem's
/// own record `T` and stored as its JSON. The owner builds its tables once
/// and keeps them; nothing else reads them.
pub struct Records<T> {
    store: std::sync::Arc<Store>,
    kind: RecordKind,
    record: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Records<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").field("kind", &self.kind).finish()
    }
}

impl<T: Serialize + serde::de::DeserializeOwned> Records<T> {
    pub fn new(store: std::sync::Arc<Store>, kind: RecordKind) -> Records<T> {
        Records {
            store,
            kind,
            record: std::marker::PhantomData,
        }
    }

    /// Writes `record` as `id` (one transaction).
    pub fn put(&self, id: &str, record: &T) -> Result<(), StoreError> {
        // Plain data: serialising cannot fail.
        let bytes = serde_json::to_vec(record).expect("record serialises");
        self.store.put_record(self.kind, id, &bytes)
    }

    /// Record `id`, None if there is none; a record that no longer decodes
    /// is [`StoreError::Corrupt`].
    pub fn get(&self, id: &str) -> Result<Option<T>, StoreError> {
        self.store
            .get_record(self.kind, id)?
            .map(|bytes| decode_record(id, &bytes))
            .transpose()
    }

    /// Deletes record `id`; a missing one is not an error.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.store.remove_record(self.kind, id)
    }

    /// Every record by id order, each decoded or the reason it does not.
    pub fn list(&self) -> Result<Vec<(String, Decoded<T>)>, StoreError> {
        Ok(self
            .store
            .list_records(self.kind)?
            .into_iter()
            .map(|(id, bytes)| {
                let record = decode_record(&id, &bytes);
                (id, record)
            })
            .collect())
    }
}

fn decode_record<T: serde::de::DeserializeOwned>(id: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: id.to_string(),
        reason: e.to_string(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("snapshot {key} does not exist")]
    NotFound { key: String },
    #[error("parent snapshot {parent} does not exist")]
    ParentNotFound { parent: String },
    #[error("snapshot {key} already exists")]
    AlreadyExists { key: String },
    #[error("parent {parent} is not a committed snapshot")]
    ParentNotCommitted { parent: String },
    #[error("snapshot {key} is not active")]
    NotActive { key: String },
    #[error("cannot remove snapshot {key}: it has children")]
    HasChildren { key: String },
    #[error("cannot update field {field:?} of snapshot {key}: only labels can change")]
    ImmutableField { key: String, field: String },
    #[error("metadata store {path}: schema version {found} is newer than this daemon's {SCHEMA_VERSION}")]
    Schema { path: String, found: u64 },
    #[error("metadata store: {0}")]
    Db(String),
    #[error("metadata record of {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

impl Classify for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            StoreError::NotFound { .. } | StoreError::ParentNotFound { .. } => ErrorKind::NotFound,
            StoreError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            StoreError::ParentNotCommitted { .. } | StoreError::ImmutableField { .. } => ErrorKind::InvalidArgument,
            StoreError::NotActive { .. } | StoreError::HasChildren { .. } => ErrorKind::FailedPrecondition,
            StoreError::Schema { .. } | StoreError::Db(_) | StoreError::Corrupt { .. } => ErrorKind::Internal,
        }
    }
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into().to_string())
}

/// One snapshot as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: Labels,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Measured at commit; zero for active and view snapshots.
    pub usage: Usage,
}

impl Record {
    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: self.created,
            updated: self.updated,
        }
    }
}

/// A snapshot just created, with the ids of its parents, nearest first.
#[derive(Debug, Clone)]
pub struct Created {
    pub record: Record,
    pub parent_ids: Vec<u64>,
}

/// How `update` changes labels.
#[derive(Debug, Clone)]
pub enum LabelUpdate {
    /// No field paths: replace all labels.
    ReplaceAll(Labels),
    /// Field paths `labels` or `labels.<key>` (anything else is refused).
    Paths { paths: Vec<String>, labels: Labels },
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn child_key(parent: &str, child: &str) -> String {
    format!("{parent}\0{child}")
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn encode(record: &Record) -> Vec<u8> {
    // Serialising plain data with string keys cannot fail.
    serde_json::to_vec(record).expect("record serialises")
}

fn get_in<T: ReadableTable<&'static str, &'static [u8]>>(table: &T, key: &str) -> Result<Option<Record>, StoreError> {
    match table.get(key).map_err(db_err)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

/// `parent` and its ancestors with their names, nearest first.
fn ancestors_in<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    mut parent: String,
) -> Result<Vec<(String, Record)>, StoreError> {
    let mut chain = Vec::new();
    while !parent.is_empty() {
        let record = get_in(table, &parent)?.ok_or(StoreError::ParentNotFound { parent: parent.clone() })?;
        let next = record.parent.clone();
        chain.push((parent, record));
        parent = next;
    }
    Ok(chain)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(SNAPSHOTS).map_err(db_err)?;
            txn.open_table(CHILDREN).map_err(db_err)?;
            txn.open_table(JOBS).map_err(db_err)?;
            txn.open_table(CHAINS).map_err(db_err)?;
            txn.open_table(CHECKPOINTS).map_err(db_err)?;
            txn.open_table(SCHEDULES).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let found = meta.get(SCHEMA).map_err(db_err)?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::Schema {
                        path: path.display().to_string(),
                        found: v,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert(SCHEMA, SCHEMA_VERSION).map_err(db_err)?;
                }
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    pub fn get(&self, key: &str) -> Result<Record, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        get_in(&table, key)?.ok_or(StoreError::NotFound { key: key.to_string() })
    }

    /// The record of `key` and its ancestors with their names, nearest
    /// first, read in one transaction.
    pub fn get_with_ancestors(&self, key: &str) -> Result<(Record, Vec<(String, Record)>), StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        let record = get_in(&table, key)?.ok_or(StoreError::NotFound { key: key.to_string() })?;
        let chain = ancestors_in(&table, record.parent.clone())?;
        Ok((record, chain))
    }

    /// `parent` and its ancestors with their names, nearest first (empty for
    /// no parent), read in one transaction.
    pub fn ancestors(&self, parent: &str) -> Result<Vec<(String, Record)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        ancestors_in(&table, parent.to_string())
    }

    /// Creates snapshot `key`. `make_dir(id, parent_ids)` runs inside the
    /// transaction; the record is written only if it succeeds.
    pub fn create<E: From<StoreError>>(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: Labels,
        make_dir: impl FnOnce(u64, &[u64]) -> Result<(), E>,
    ) -> Result<Created, E> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let created = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            if get_in(&table, key)?.is_some() {
                return Err(StoreError::AlreadyExists { key: key.to_string() }.into());
            }
            if !parent.is_empty() {
                let p = get_in(&table, parent)?.ok_or(StoreError::ParentNotFound {
                    parent: parent.to_string(),
                })?;
                if p.kind != Kind::Committed {
                    return Err(StoreError::ParentNotCommitted {
                        parent: parent.to_string(),
                    }
                    .into());
                }
            }
            let parent_ids: Vec<u64> = ancestors_in(&table, parent.to_string())?
                .iter()
                .map(|(_, r)| r.id)
                .collect();
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let id = meta.get(NEXT_ID).map_err(db_err)?.map(|v| v.value()).unwrap_or(1);
            meta.insert(NEXT_ID, id + 1).map_err(db_err)?;
            make_dir(id, &parent_ids)?;
            let now = SystemTime::now();
            let record = Record {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                usage: Usage::default(),
            };
            table.insert(key, encode(&record).as_slice()).map_err(db_err)?;
            if !parent.is_empty() {
                let mut children = txn.open_table(CHILDREN).map_err(db_err)?;
                children.insert(child_key(parent, key).as_str(), ()).map_err(db_err)?;
            }
            Created { record, parent_ids }
        };
        txn.commit().map_err(db_err)?;
        Ok(created)
    }

    /// Turns active snapshot `key` into committed snapshot `name`.
    pub fn commit_active(&self, key: &str, name: &str, labels: Labels, usage: Usage) -> Result<Record, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let committed = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            if get_in(&table, name)?.is_some() {
                return Err(StoreError::AlreadyExists { key: name.to_string() });
            }
            let active = get_in(&table, key)?.ok_or(StoreError::NotFound { key: key.to_string() })?;
            if active.kind != Kind::Active {
                return Err(StoreError::NotActive { key: key.to_string() });
            }
            let now = SystemTime::now();
            let committed = Record {
                kind: Kind::Committed,
                labels,
                created: now,
                updated: now,
                usage,
                ..active
            };
            table.remove(key).map_err(db_err)?;
            table.insert(name, encode(&committed).as_slice()).map_err(db_err)?;
            if !committed.parent.is_empty() {
                let mut children = txn.open_table(CHILDREN).map_err(db_err)?;
                children
                    .remove(child_key(&committed.parent, key).as_str())
                    .map_err(db_err)?;
                children
                    .insert(child_key(&committed.parent, name).as_str(), ())
                    .map_err(db_err)?;
            }
            committed
        };
        txn.commit().map_err(db_err)?;
        Ok(committed)
    }

    /// Deletes the record of `key`; refuses while it has children.
    pub fn remove(&self, key: &str) -> Result<Record, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let removed = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let record = get_in(&table, key)?.ok_or(StoreError::NotFound { key: key.to_string() })?;
            let mut children = txn.open_table(CHILDREN).map_err(db_err)?;
            let prefix = child_key(key, "");
            let has_child = children
                .range(prefix.as_str()..)
                .map_err(db_err)?
                .next()
                .transpose()
                .map_err(db_err)?
                .is_some_and(|(k, _)| k.value().starts_with(&prefix));
            if has_child {
                return Err(StoreError::HasChildren { key: key.to_string() });
            }
            table.remove(key).map_err(db_err)?;
            if !record.parent.is_empty() {
                children
                    .remove(child_key(&record.parent, key).as_str())
                    .map_err(db_err)?;
            }
            record
        };
        txn.commit().map_err(db_err)?;
        Ok(removed)
    }

    /// Changes the labels of `key`, containerd's way.
    pub fn update_labels(&self, key: &str, update: LabelUpdate) -> Result<Record, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let updated = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let mut record = get_in(&table, key)?.ok_or(StoreError::NotFound { key: key.to_string() })?;
            match update {
                LabelUpdate::ReplaceAll(labels) => record.labels = labels,
                LabelUpdate::Paths { paths, labels } => {
                    for path in paths {
                        if path == "labels" {
                            record.labels = labels.clone();
                        } else if let Some(label) = path.strip_prefix("labels.") {
                            match labels.get(label) {
                                Some(v) => record.labels.insert(label.to_string(), v.clone()),
                                None => record.labels.remove(label),
                            };
                        } else {
                            return Err(StoreError::ImmutableField {
                                key: key.to_string(),
                                field: path,
                            });
                        }
                    }
                }
            }
            record.updated = SystemTime::now();
            table.insert(key, encode(&record).as_slice()).map_err(db_err)?;
            record
        };
        txn.commit().map_err(db_err)?;
        Ok(updated)
    }

    /// Every snapshot, by name order.
    pub fn list(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        let mut all = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let key = k.value().to_string();
            let record = decode(&key, v.value())?;
            all.push((key, record));
        }
        Ok(all)
    }

    /// Writes `bytes` (JSON another module owns) as record `id` of `kind`
    /// (one transaction).
    pub fn put_record(&self, kind: RecordKind, id: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(kind.table()).map_err(db_err)?;
            table.insert(id, bytes).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub fn get_record(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(kind.table()).map_err(db_err)?;
        Ok(table.get(id).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Deletes record `id` of `kind`; a missing one is not an error.
    pub fn remove_record(&self, kind: RecordKind, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(kind.table()).map_err(db_err)?;
            table.remove(id).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Every record of `kind`, by id order.
    pub fn list_records(&self, kind: RecordKind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(kind.table()).map_err(db_err)?;
        let mut all = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            all.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(all)
    }

    /// Runs `f` with the ids every record references, while holding the write
    /// lock, so no snapshot can be created while `f` removes directories.
    pub fn with_referenced_ids<R>(&self, f: impl FnOnce(&BTreeSet<u64>) -> R) -> Result<R, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let ids = {
            let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let mut ids = BTreeSet::new();
            for entry in table.iter().map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                ids.insert(decode(k.value(), v.value())?.id);
            }
            ids
        };
        let result = f(&ids);
        txn.abort().map_err(db_err)?;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("meta.redb")).unwrap();
        (tmp, store)
    }

    fn create(store: &Store, key: &str, parent: &str, kind: Kind) -> Result<Created, StoreError> {
        store.create(key, parent, kind, Labels::new(), |_, _| Ok::<(), StoreError>(()))
    }

    #[test]
    fn chain_ids_and_children() {
        let (_t, s) = store();
        let a = create(&s, "a", "", Kind::Active).unwrap();
        assert_eq!(a.record.id, 1);
        s.commit_active("a", "A", Labels::new(), Usage { size: 4096, inodes: 1 })
            .unwrap();
        let b = create(&s, "b", "A", Kind::Active).unwrap();
        assert_eq!(b.parent_ids, vec![1]);
        s.commit_active("b", "B", Labels::new(), Usage::default()).unwrap();
        let v = create(&s, "v", "B", Kind::View).unwrap();
        assert_eq!(v.parent_ids, vec![2, 1]);
        assert!(matches!(s.remove("A"), Err(StoreError::HasChildren { .. })));
        assert!(matches!(s.remove("B"), Err(StoreError::HasChildren { .. })));
        s.remove("v").unwrap();
        s.remove("B").unwrap();
        s.remove("A").unwrap();
        assert!(s.list().unwrap().is_empty());
        assert_eq!(
            create(&s, "c", "", Kind::Active).unwrap().record.id,
            4,
            "ids are never reused"
        );
    }

    #[test]
    fn rule_violations_have_their_kinds() {
        let (_t, s) = store();
        create(&s, "a", "", Kind::Active).unwrap();
        assert_eq!(
            create(&s, "a", "", Kind::Active).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            create(&s, "b", "nope", Kind::Active).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            create(&s, "b", "a", Kind::Active).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        create(&s, "v", "", Kind::View).unwrap();
        let e = s.commit_active("v", "V", Labels::new(), Usage::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let e = s
            .commit_active("missing", "M", Labels::new(), Usage::default())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = s.commit_active("a", "v", Labels::new(), Usage::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(s.remove("zzz").unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn failed_directory_leaves_no_record() {
        let (_t, s) = store();
        let err = s
            .create("a", "", Kind::Active, Labels::new(), |_, _| {
                Err(StoreError::Db("disk full".into()))
            })
            .unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert!(matches!(s.get("a"), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn label_updates_follow_containerd() {
        let (_t, s) = store();
        let labels: Labels = [("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())].into();
        s.create("k", "", Kind::Active, labels, |_, _| Ok::<(), StoreError>(()))
            .unwrap();
        let new: Labels = [("b".to_string(), "3".to_string()), ("c".to_string(), "4".to_string())].into();
        let r = s
            .update_labels(
                "k",
                LabelUpdate::Paths {
                    paths: vec!["labels.b".into(), "labels.a".into()],
                    labels: new.clone(),
                },
            )
            .unwrap();
        assert_eq!(r.labels, [("b".to_string(), "3".to_string())].into());
        let r = s.update_labels("k", LabelUpdate::ReplaceAll(new.clone())).unwrap();
        assert_eq!(r.labels, new);
        let e = s
            .update_labels(
                "k",
                LabelUpdate::Paths {
                    paths: vec!["parent".into()],
                    labels: Labels::new(),
                },
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn record_tables_are_typed_and_report_what_does_not_decode() {
        let (_tmp, store) = store();
        let store = std::sync::Arc::new(store);
        let jobs: Records<Vec<u32>> = Records::new(store.clone(), RecordKind::Jobs);
        let chains: Records<Vec<u32>> = Records::new(store.clone(), RecordKind::Chains);
        jobs.put("a", &vec![1, 2]).unwrap();
        assert_eq!(jobs.get("a").unwrap(), Some(vec![1, 2]));
        assert_eq!(chains.get("a").unwrap(), None, "tables are apart");
        store.put_record(RecordKind::Jobs, "b", b"not json").unwrap();
        assert!(matches!(jobs.get("b"), Err(StoreError::Corrupt { .. })));
        let listed = jobs.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].1.as_ref().unwrap(), &vec![1, 2]);
        assert!(listed[1].1.is_err());
        jobs.remove("a").unwrap();
        jobs.remove("a").unwrap();
        assert_eq!(jobs.get("a").unwrap(), None);
    }

    #[test]
    fn survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("meta.redb");
        {
            let s = Store::open(&path).unwrap();
            create(&s, "a", "", Kind::Active).unwrap();
            s.commit_active("a", "A", Labels::new(), Usage { size: 1, inodes: 2 })
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let r = s.get("A").unwrap();
        assert_eq!((r.kind, r.usage), (Kind::Committed, Usage { size: 1, inodes: 2 }));
        let ids = s.with_referenced_ids(|ids| ids.clone()).unwrap();
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), vec![1]);
    }
}
