//! Retention: prunes (removing checkpoints by count, age, size or
//! dangling parents) and merges (squashing chains by time, labels or
//! wholesale), each removed checkpoint folded into its kept children so
//! every kept one stays restorable, and the garbage collection of what no
//! checkpoint references. Plans are computed before anything is written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use super::chunks::{chunk_key, is_chunked};
use super::{Catalogue, CatalogueError, Checkpoint, MergePlan, MergePolicy, MergeStrategy, PrunePlan, PrunePolicy};
use crate::checkpoint::tree::Delta;

/// What a storage holds, read once for the plans of a prune or merge.
struct Holdings {
    /// Each checkpoint's change, by id.
    deltas: HashMap<String, Delta>,
    /// Every object's size, by key.
    sizes: HashMap<String, u64>,
    /// The chunk keys of each chunked blob.
    chunk_lists: HashMap<String, Vec<String>>,
}

impl Catalogue {
    /// What `policy` removes of the checkpoints of `namespace`/`container`,
    /// and, unless `dry_run`, removes it: each removed checkpoint with a
    /// kept child is folded into that child first, so every kept checkpoint
    /// stays restorable; then whatever no checkpoint references goes.
    pub fn prune(
        &self,
        namespace: &str,
        container: &str,
        policy: &PrunePolicy,
        dry_run: bool,
    ) -> Result<PrunePlan, CatalogueError> {
        if policy.keep_latest.is_none()
            && policy.keep_days.is_none()
            && policy.max_storage.is_none()
            && !policy.prune_dangling
        {
            return Err(CatalogueError::Invalid(
                "nothing to prune by: give --keep-latest, --keep-days, --max-storage or --prune-dangling".into(),
            ));
        }
        let all = self.all()?;
        let ids: BTreeSet<&str> = all.iter().map(|c| c.id.as_str()).collect();
        let mine: Vec<&Checkpoint> = all
            .iter()
            .filter(|c| c.namespace == namespace && c.container == container)
            .collect();
        let now = SystemTime::now();
        let excluded = |c: &Checkpoint| policy.exclude_labels.iter().any(|l| c.labels.contains_key(l));
        // Dangling: a parent that is gone, or above one that is.
        let mut dangling = BTreeSet::new();
        for c in &mine {
            let mut at = (*c).clone();
            let mut hops = 0;
            while let Some(parent) = &at.parent {
                if !ids.contains(parent.as_str()) || hops > all.len() {
                    dangling.insert(c.id.clone());
                    break;
                }
                at = all
                    .iter()
                    .find(|x| &x.id == parent)
                    .cloned()
                    .expect("present: checked above");
                hops += 1;
            }
        }
        let by_rule = policy.keep_latest.is_some() || policy.keep_days.is_some();
        let mut doomed: BTreeSet<String> = BTreeSet::new();
        let newest_first: Vec<&&Checkpoint> = mine.iter().rev().collect();
        for (rank, c) in newest_first.iter().enumerate() {
            if policy.prune_dangling && dangling.contains(&c.id) {
                doomed.insert(c.id.clone());
                continue;
            }
            if !by_rule || excluded(c) {
                continue;
            }
            let latest = policy.keep_latest.is_some_and(|n| (rank as u32) < n);
            let recent = policy
                .keep_days
                .is_some_and(|d| c.age(now) < Duration::from_secs(u64::from(d) * 86_400));
            if !latest && !recent {
                doomed.insert(c.id.clone());
            }
        }
        let holdings = self.holdings(&all)?;
        // Storage: the oldest go first until the storage fits.
        if let Some(limit) = policy.max_storage {
            for c in &mine {
                if self.usage_without(&all, &holdings, &doomed)? <= limit {
                    break;
                }
                if !excluded(c) {
                    doomed.insert(c.id.clone());
                }
            }
        }
        let before = self.usage_without(&all, &holdings, &BTreeSet::new())?;
        let after = self.usage_without(&all, &holdings, &doomed)?;
        let removed: Vec<String> = mine
            .iter()
            .filter(|c| doomed.contains(&c.id))
            .map(|c| c.id.clone())
            .collect();
        let folded: Vec<String> = all
            .iter()
            .filter(|c| !doomed.contains(&c.id) && c.parent.as_ref().is_some_and(|p| doomed.contains(p)))
            .map(|c| c.id.clone())
            .collect();
        let plan = PrunePlan {
            removed,
            folded,
            freed_bytes: before.saturating_sub(after),
        };
        if dry_run {
            return Ok(plan);
        }
        self.remove_all(&all, &holdings, &doomed)?;
        self.collect_garbage()?;
        Ok(plan)
    }

    /// Squashes the chains of `namespace`/`container` per `policy`: every
    /// checkpoint a rule retains stays, as does the newest of each chain
    /// (nothing comes after it to squash it into); each other one is folded
    /// into its children, whose trees stay exactly what they were.
    pub fn merge(
        &self,
        namespace: &str,
        container: &str,
        policy: &MergePolicy,
        dry_run: bool,
    ) -> Result<MergePlan, CatalogueError> {
        policy.check()?;
        let all = self.all()?;
        let mine: Vec<&Checkpoint> = all
            .iter()
            .filter(|c| c.namespace == namespace && c.container == container)
            .collect();
        let mut reasons: BTreeMap<String, String> = BTreeMap::new();
        let has_children = |id: &str| all.iter().any(|c| c.parent.as_deref() == Some(id));
        for c in &mine {
            if !has_children(&c.id) {
                reasons.insert(c.id.clone(), "newest of its chain".into());
            }
            if let Some(label) = policy.retain_labels.iter().find(|l| c.labels.contains_key(*l)) {
                reasons.insert(c.id.clone(), format!("label {label}"));
            }
            if policy.strategy == MergeStrategy::Tagged && !c.labels.is_empty() {
                reasons.entry(c.id.clone()).or_insert_with(|| "labelled".into());
            }
        }
        if policy.strategy == MergeStrategy::TimeBased {
            let mut keep_period = |count: Option<u32>, width: i64, name: &str| {
                let Some(count) = count else { return };
                let mut periods = BTreeSet::new();
                for c in mine.iter().rev() {
                    let period = c.created_unix.div_euclid(width);
                    if periods.contains(&period) {
                        continue;
                    }
                    if periods.len() as u32 >= count {
                        break;
                    }
                    periods.insert(period);
                    reasons
                        .entry(c.id.clone())
                        .or_insert_with(|| format!("newest of its {name}"));
                }
            };
            keep_period(policy.keep_daily, 86_400, "day");
            keep_period(policy.keep_hourly, 3_600, "hour");
        }
        let merged: BTreeSet<String> = mine
            .iter()
            .filter(|c| !reasons.contains_key(&c.id))
            .map(|c| c.id.clone())
            .collect();
        let holdings = self.holdings(&all)?;
        let before = self.usage_without(&all, &holdings, &BTreeSet::new())?;
        let plan = MergePlan {
            kept: mine
                .iter()
                .filter_map(|c| reasons.get(&c.id).map(|r| (c.id.clone(), r.clone())))
                .collect(),
            merged: mine
                .iter()
                .filter(|c| merged.contains(&c.id))
                .map(|c| c.id.clone())
                .collect(),
            rebased: all
                .iter()
                .filter(|c| !merged.contains(&c.id) && c.parent.as_ref().is_some_and(|p| merged.contains(p)))
                .map(|c| c.id.clone())
                .collect(),
            freed_bytes: 0,
        };
        if dry_run {
            // Chunking is not simulated: a dry run reports what folding frees.
            let after = self.usage_without(&all, &holdings, &merged)?;
            return Ok(MergePlan {
                freed_bytes: before.saturating_sub(after),
                ..plan
            });
        }
        if !merged.is_empty() {
            self.remove_all(&all, &holdings, &merged)?;
        }
        if policy.aggressive {
            self.chunk_large_files()?;
        }
        self.collect_garbage()?;
        let now_all = self.all()?;
        let after = self.usage_without(&now_all, &self.holdings(&now_all)?, &BTreeSet::new())?;
        Ok(MergePlan {
            freed_bytes: before.saturating_sub(after),
            ..plan
        })
    }

    /// What the catalogue would hold without `doomed`: every other
    /// checkpoint with its change, each removed one folded into its
    /// children (oldest first, so a child of several removed ancestors gets
    /// their composition). Nothing is written. Ordered oldest first.
    fn without(
        &self,
        all: &[Checkpoint],
        holdings: &Holdings,
        doomed: &BTreeSet<String>,
    ) -> Result<Vec<(Checkpoint, Delta)>, CatalogueError> {
        let mut current: Vec<(Checkpoint, Delta, bool)> = Vec::with_capacity(all.len());
        for c in all {
            let delta = holdings
                .deltas
                .get(&c.id)
                .cloned()
                .ok_or_else(|| CatalogueError::Corrupt {
                    id: c.id.clone(),
                    message: "its change was not read".into(),
                })?;
            current.push((c.clone(), delta, false));
        }
        for victim_index in 0..current.len() {
            if !doomed.contains(&current[victim_index].0.id) {
                continue;
            }
            let (victim, victim_delta, _) = current[victim_index].clone();
            for (child, delta, changed) in current.iter_mut() {
                if child.parent.as_deref() != Some(victim.id.as_str()) {
                    continue;
                }
                *delta = victim_delta.then(delta);
                child.parent = victim.parent.clone();
                child.size += victim.size;
                child.content_size = delta.content_bytes();
                child.changed_entries = delta.changed.len() as u64;
                child.removed_entries = delta.removed.len() as u64;
                *changed = true;
            }
        }
        Ok(current
            .into_iter()
            .filter(|(c, _, _)| !doomed.contains(&c.id))
            .map(|(c, d, changed)| {
                let c = if changed {
                    Checkpoint {
                        // Marks a change to write: no stored object has it.
                        delta_key: String::new(),
                        ..c
                    }
                } else {
                    c
                };
                (c, d)
            })
            .collect())
    }

    /// Removes `doomed` from the catalogue, folding each into its kept
    /// children. Each rewritten child is published (its new change under a
    /// new key first, then its metadata) before any removed one goes, so a
    /// crash leaves every checkpoint restorable.
    fn remove_all(
        &self,
        all: &[Checkpoint],
        holdings: &Holdings,
        doomed: &BTreeSet<String>,
    ) -> Result<(), CatalogueError> {
        for (checkpoint, delta) in self.without(all, holdings, doomed)? {
            if !checkpoint.delta_key.is_empty() {
                continue;
            }
            let (delta_key, delta_digest, _) = self.write_delta(&checkpoint.id, &delta)?;
            self.publish(&Checkpoint {
                delta_key,
                delta_digest,
                ..checkpoint
            })?;
        }
        for id in all.iter().map(|c| &c.id).filter(|id| doomed.contains(*id)) {
            self.unpublish(id)?;
        }
        Ok(())
    }

    /// Bytes the storage would hold without `doomed`, folded as
    /// [`Catalogue::without`] folds them: metadata, changes and the blobs
    /// still referenced.
    fn usage_without(
        &self,
        all: &[Checkpoint],
        holdings: &Holdings,
        doomed: &BTreeSet<String>,
    ) -> Result<u64, CatalogueError> {
        let size = |key: &str| holdings.sizes.get(key).copied().unwrap_or(0);
        let mut keys = BTreeSet::new();
        let mut total = 0u64;
        for (c, delta) in self.without(all, holdings, doomed)? {
            keys.extend(self.blob_keys(&c, &delta));
            total += if c.delta_key.is_empty() {
                let json = serde_json::to_vec(&delta).map_err(|e| CatalogueError::Invalid(e.to_string()))?;
                zstd::encode_all(&json[..], 3)
                    .map(|z| z.len() as u64)
                    .unwrap_or(json.len() as u64)
            } else {
                size(&c.delta_key)
            };
            total += size(&format!("checkpoints/{}.json", c.id));
        }
        let chunks: BTreeSet<&String> = keys
            .iter()
            .filter_map(|k| holdings.chunk_lists.get(k))
            .flatten()
            .collect();
        total += keys.iter().map(|k| size(k)).sum::<u64>() + chunks.into_iter().map(|k| size(k)).sum::<u64>();
        Ok(total)
    }

    /// Reads what the plans of a prune or merge need, once: every
    /// checkpoint's change, every object's size, every chunk list.
    fn holdings(&self, all: &[Checkpoint]) -> Result<Holdings, CatalogueError> {
        let mut deltas = HashMap::with_capacity(all.len());
        for c in all {
            deltas.insert(c.id.clone(), self.read_delta(c)?);
        }
        let mut sizes = HashMap::new();
        for prefix in ["blobs/", "chunks/", "deltas/", "checkpoints/"] {
            sizes.extend(self.objects.list(prefix)?);
        }
        let mut chunk_lists = HashMap::new();
        for key in sizes.keys().filter(|k| is_chunked(k)) {
            let chunks = self
                .read_chunk_list(key)?
                .chunks
                .iter()
                .map(|c| chunk_key(&c.digest))
                .collect();
            chunk_lists.insert(key.clone(), chunks);
        }
        Ok(Holdings {
            deltas,
            sizes,
            chunk_lists,
        })
    }

    /// Deletes every blob and change no checkpoint references: what prunes
    /// and merges free, and what an interrupted create left.
    pub fn collect_garbage(&self) -> Result<u64, CatalogueError> {
        let all = self.all()?;
        let mut keep = BTreeSet::new();
        for c in &all {
            keep.insert(c.delta_key.clone());
            keep.extend(self.blob_keys(c, &self.read_delta(c)?));
        }
        let chunks = self.chunks_of(&keep)?;
        keep.extend(chunks);
        let mut freed = 0;
        for prefix in ["blobs/", "deltas/", "chunks/"] {
            for (key, size) in self.objects.list(prefix)? {
                if !keep.contains(&key) {
                    self.objects.delete(&key)?;
                    freed += size;
                }
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use crate::checkpoint::objects::DirStore;
    use crate::checkpoint::tree::Tree;
    use std::fs;

    /// Prunes the test world's container `ns/c1` for real.
    fn prune(w: &World, policy: PrunePolicy) -> PrunePlan {
        w.catalogue.prune("ns", "c1", &policy, false).unwrap()
    }

    #[test]
    fn prune_folds_removed_parents_into_kept_children_and_frees_their_data() {
        let w = world();
        let mut ids = Vec::new();
        let mut trees = Vec::new();
        for i in 0..4 {
            fs::write(w.upper.join(format!("data/f{i}")), vec![i as u8; 50_000 + i]).unwrap();
            if i == 2 {
                fs::remove_file(w.upper.join("data/f0")).unwrap();
            }
            let parent = ids.last().map(String::as_str);
            let labels: &[&str] = if i == 1 { &["keep"] } else { &[] };
            let c = w
                .catalogue
                .create(
                    &format!("cp-20261201-10000{i}"),
                    &w.upper,
                    &new(parent, labels, Compression::Gzip),
                )
                .unwrap();
            trees.push(w.catalogue.tree_of(&c).unwrap());
            ids.push(c.id);
        }
        let keep_one = PrunePolicy {
            keep_latest: Some(1),
            exclude_labels: vec!["keep".into()],
            ..PrunePolicy::default()
        };
        let plan = w.catalogue.prune("ns", "c1", &keep_one, true).unwrap();
        assert_eq!(plan.removed, vec![ids[0].clone(), ids[2].clone()]);
        assert_eq!(plan.folded, vec![ids[1].clone(), ids[3].clone()]);
        assert!(plan.freed_bytes > 0, "the removed changes go: {plan:?}");
        assert_eq!(w.catalogue.all().unwrap().len(), 4, "a dry run changes nothing");

        let done = w.catalogue.prune("ns", "c1", &keep_one, false).unwrap();
        assert_eq!(done, plan);
        let left = w.catalogue.all().unwrap();
        assert_eq!(
            left.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
            vec![ids[1].clone(), ids[3].clone()]
        );
        assert_eq!(left[0].parent, None);
        assert_eq!(left[1].parent.as_deref(), Some(ids[1].as_str()));
        assert_eq!(
            w.catalogue.tree_of(&left[0]).unwrap(),
            trees[1],
            "folded trees are unchanged"
        );
        assert_eq!(w.catalogue.tree_of(&left[1]).unwrap(), trees[3]);
        for c in &left {
            assert!(w.catalogue.verify(c).unwrap().1.is_empty());
        }
        assert_eq!(blob_count(&w), 4, "the kept first tree still has f0");

        let err = w
            .catalogue
            .prune("ns", "c1", &PrunePolicy::default(), true)
            .unwrap_err();
        assert!(err.to_string().contains("--keep-latest"), "{err}");

        // Storage limit: the oldest goes until the rest fits.
        let plan = prune(
            &w,
            PrunePolicy {
                max_storage: Some(1),
                ..PrunePolicy::default()
            },
        );
        assert_eq!(plan.removed.len(), 2);
        assert_eq!(blob_count(&w), 0);
        assert!(fs::read_dir(w.objects.join("deltas")).unwrap().next().is_none());
    }

    /// Five checkpoints of one chain, `f` rewritten each time; the
    /// second and fourth labelled. Returns ids and trees.
    fn chain_of_five(w: &World, created: &[i64; 5]) -> (Vec<String>, Vec<Tree>) {
        let mut ids: Vec<String> = Vec::new();
        let mut trees = Vec::new();
        for (i, at) in created.iter().enumerate() {
            fs::write(w.upper.join("data/f"), vec![i as u8 + 1; 40_000]).unwrap();
            fs::write(w.upper.join(format!("data/g{i}")), [i as u8]).unwrap();
            let labels: &[&str] = if i % 2 == 1 { &["tag"] } else { &[] };
            let c = w
                .catalogue
                .create(
                    &format!("cp-20261201-10000{i}"),
                    &w.upper,
                    &new(ids.last().map(String::as_str), labels, Compression::Zstd),
                )
                .unwrap();
            let c = Checkpoint { created_unix: *at, ..c };
            w.catalogue.publish(&c).unwrap();
            trees.push(w.catalogue.tree_of(&c).unwrap());
            ids.push(c.id);
        }
        (ids, trees)
    }

    #[test]
    fn merges_squash_chains_keeping_what_rules_retain_restorable() {
        let hour = 3_600;
        let day = 86_400;
        let base = 1_764_547_200; // a midnight
                                  // Two on day 0 (hours 1 and 2), one on day 1, two on day 2.
        let created = [
            base + hour,
            base + 2 * hour,
            base + day,
            base + 2 * day,
            base + 2 * day + hour,
        ];
        let policy = |strategy, keep_daily, keep_hourly| MergePolicy {
            strategy,
            keep_daily,
            keep_hourly,
            retain_labels: vec![],
            aggressive: false,
        };

        let w = world();
        let (ids, trees) = chain_of_five(&w, &created);
        let plan = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::TimeBased, Some(2), None), true)
            .unwrap();
        // Newest of each of the last two days that have one: 4 (day 2), 2 (day 1).
        assert_eq!(plan.merged, vec![ids[0].clone(), ids[1].clone(), ids[3].clone()]);
        assert_eq!(plan.rebased, vec![ids[2].clone(), ids[4].clone()]);
        assert!(plan.freed_bytes > 0, "f's squashed versions go: {plan:?}");
        assert_eq!(w.catalogue.all().unwrap().len(), 5, "a dry run changes nothing");
        let hourly = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::TimeBased, None, Some(3)), true)
            .unwrap();
        assert_eq!(
            hourly.merged,
            vec![ids[0].clone(), ids[1].clone()],
            "the three newest hours with one: {hourly:?}"
        );
        let err = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::TimeBased, None, None), true);
        assert!(err.is_err());

        let blobs_before = blob_count(&w);
        let done = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::TimeBased, Some(2), None), false)
            .unwrap();
        assert_eq!(done.merged, plan.merged);
        let left = w.catalogue.all().unwrap();
        assert_eq!(
            left.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
            vec![ids[2].clone(), ids[4].clone()]
        );
        assert_eq!(w.catalogue.tree_of(&left[0]).unwrap(), trees[2]);
        assert_eq!(w.catalogue.tree_of(&left[1]).unwrap(), trees[4]);
        for c in &left {
            assert!(w.catalogue.verify(c).unwrap().1.is_empty());
        }
        assert_eq!(blob_count(&w), blobs_before - 3, "versions 1, 2 and 4 of f are gone");

        // Tagged: labelled ones and the newest stay.
        let w = world();
        let (ids, trees) = chain_of_five(&w, &created);
        let done = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::Tagged, None, None), false)
            .unwrap();
        assert_eq!(done.merged, vec![ids[0].clone(), ids[2].clone()]);
        let kept: Vec<&str> = done.kept.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, vec![ids[1].as_str(), ids[3].as_str(), ids[4].as_str()]);
        for (c, tree) in w.catalogue.all().unwrap().iter().zip([&trees[1], &trees[3], &trees[4]]) {
            assert_eq!(&w.catalogue.tree_of(c).unwrap(), tree);
        }

        // Incremental: one checkpoint per chain, unless a label retains more.
        let w = world();
        let (ids, trees) = chain_of_five(&w, &created);
        let mut retain = policy(MergeStrategy::Incremental, None, None);
        retain.retain_labels = vec!["tag".into()];
        let plan = w.catalogue.merge("ns", "c1", &retain, true).unwrap();
        assert_eq!(plan.merged, vec![ids[0].clone(), ids[2].clone()]);
        let done = w
            .catalogue
            .merge("ns", "c1", &policy(MergeStrategy::Incremental, None, None), false)
            .unwrap();
        assert_eq!(done.merged.len(), 4);
        let left = w.catalogue.all().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].parent, None);
        assert_eq!(w.catalogue.tree_of(&left[0]).unwrap(), trees[4]);
        assert!(w.catalogue.verify(&left[0]).unwrap().1.is_empty());
    }

    #[test]
    fn what_an_interrupted_create_leaves_is_collected_by_the_next_prune() {
        let w = world();
        fs::write(w.upper.join("data/kept"), b"kept").unwrap();
        let kept = w
            .catalogue
            .create("cp-20261201-100000", &w.upper, &new(None, &[], Compression::Zstd))
            .unwrap();
        // Killed after uploading a blob and a change, before the metadata:
        // no checkpoint lists them.
        let objects = DirStore::open(&w.objects, "local").unwrap();
        objects
            .put(&format!("blobs/sha256/{}.zst", "ab".repeat(32)), b"orphan")
            .unwrap();
        objects.put("deltas/cp-20261201-100100-1.json.zst", b"orphan").unwrap();
        assert_eq!(w.catalogue.all().unwrap().len(), 1, "nothing half-written is listed");
        let plan = prune(
            &w,
            PrunePolicy {
                keep_latest: Some(5),
                ..PrunePolicy::default()
            },
        );
        assert!(plan.removed.is_empty());
        assert!(objects
            .size(&format!("blobs/sha256/{}.zst", "ab".repeat(32)))
            .unwrap()
            .is_none());
        assert!(objects.size("deltas/cp-20261201-100100-1.json.zst").unwrap().is_none());
        assert!(w.catalogue.verify(&kept).unwrap().1.is_empty(), "the kept one is whole");
    }
}
