//! The policy of `checkpointctl automanage` (YAML, `--schedule-file`): which
//! containers it manages (by id or labels), when it checkpoints them (CPU
//! and memory thresholds, intervals) and how it then merges and prunes
//! their checkpoints. A file with an unknown key or a bad value is refused
//! with the key's path and the reason. The file's values are resolved
//! against the command line's here, once, so the rest of automanage sees
//! only the [`Rule`]s in force; this module decides nothing at run time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use seamless_snapshotter::checkpoint::filter::{parse_duration, parse_size};

/// The label automanage puts on every checkpoint it takes, valued with the
/// reason (`automanage=cpu`); a rule may not set it itself.
pub const REASON_LABEL: &str = "automanage";

/// Hysteresis when neither the file nor the command line says: a threshold
/// re-arms once usage falls 10 points below it.
pub const DEFAULT_HYSTERESIS: f64 = 10.0;

/// Refused before anything is dumped, as `checkpointctl create` does.
const DEFAULT_MEMORY_LIMIT: &str = "1G";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("policy {path}: key {key}: {reason}")]
    Invalid { path: String, key: String, reason: String },
}

impl PolicyError {
    /// `<key>: <reason>`, or the reason alone when no key is at fault (the
    /// file is missing or is not YAML): what a refused reload reports.
    pub fn fault(&self) -> String {
        match self {
            PolicyError::Read { reason, .. } => reason.clone(),
            PolicyError::Invalid { key, reason, .. } => format!("{key}: {reason}"),
        }
    }
}

/// What the command line says, for every value the file leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub check_interval: Duration,
    pub cpu_threshold: f64,
    pub mem_threshold: f64,
}

/// The policy in force: how often to sample and the rules, first match wins.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub check_interval: Duration,
    pub rules: Vec<Rule>,
}

/// One rule with every value resolved (rule over file over command line).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// `containers[N]` of the file, or `all running containers`: how logs
    /// name the rule.
    pub name: String,
    pub id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub limits: Limits,
    pub checkpoint: CheckpointSpec,
    pub merge: Option<MergeRule>,
    pub prune: Option<PruneRule>,
}

/// When a rule checkpoints: thresholds in percent, hysteresis in percent
/// points, and the interval of periodic checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub cpu_threshold: f64,
    pub mem_threshold: f64,
    pub hysteresis: f64,
    pub interval: Option<Duration>,
}

/// What a rule's checkpoints are.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSpec {
    /// `k=v` or bare `k`, besides `automanage=<reason>`.
    pub labels: Vec<String>,
    pub fs_only: bool,
    /// Bytes; 0 is no limit.
    pub memory_limit: u64,
}

impl Rule {
    /// Whether the rule selects a container: its id when the rule names
    /// one, and every label of the rule with the same value.
    pub fn selects(&self, id: &str, labels: &std::collections::HashMap<String, String>) -> bool {
        self.id.as_deref().is_none_or(|wanted| wanted == id)
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl Policy {
    /// Without a file: every running container of the namespace, with the
    /// command line's thresholds and no interval.
    pub fn every_running_container(defaults: &Defaults) -> Policy {
        Policy {
            check_interval: defaults.check_interval,
            rules: vec![Rule {
                name: "all running containers".into(),
                id: None,
                labels: BTreeMap::new(),
                limits: Limits {
                    cpu_threshold: defaults.cpu_threshold,
                    mem_threshold: defaults.mem_threshold,
                    hysteresis: DEFAULT_HYSTERESIS,
                    interval: None,
                },
                checkpoint: CheckpointSpec {
                    labels: Vec::new(),
                    fs_only: false,
                    // The constant parses: a unit test says so.
                    memory_limit: parse_size(DEFAULT_MEMORY_LIMIT).unwrap_or(0),
                },
                merge: None,
                prune: None,
            }],
        }
    }

    pub fn load(path: &Path, defaults: &Defaults) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Policy::parse(&text, &path.display().to_string(), defaults)
    }

    pub fn parse(text: &str, path: &str, defaults: &Defaults) -> Result<Policy, PolicyError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let file: PolicyFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let mut key = e.path().to_string();
            let mut reason = e.inner().to_string();
            // The YAML error may lead with the path already, or with the
            // path of the map around a value that failed its own check.
            if let Some((lead, rest)) = reason.split_once(": ") {
                if key == lead || key.starts_with(&format!("{lead}.")) {
                    reason = rest.to_string();
                }
            }
            // An unknown key is named in the path, not only in the reason.
            if let Some(field) = reason
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field.to_string())
            {
                if key == "." {
                    key = field;
                } else if key != field && !key.ends_with(&format!(".{field}")) {
                    key = format!("{key}.{field}");
                }
            }
            if key == "." {
                PolicyError::Read {
                    path: path.to_string(),
                    reason,
                }
            } else {
                PolicyError::Invalid {
                    path: path.to_string(),
                    key,
                    reason,
                }
            }
        })?;
        file.resolve(defaults).map_err(|(key, reason)| PolicyError::Invalid {
            path: path.to_string(),
            key,
            reason,
        })
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// Format version; only 1 exists.
    #[serde(default = "default_version")]
    version: u32,
    /// How often containers are sampled (default: --check-interval).
    #[serde(default)]
    check_interval: Option<Interval>,
    /// CPU percent of one CPU, as `docker stats` (default: --cpu-threshold).
    #[serde(default)]
    cpu_threshold: Option<Percent>,
    /// Memory percent of the container's limit (default: --mem-threshold).
    #[serde(default)]
    mem_threshold: Option<Percent>,
    /// Percent points below a threshold that usage must fall to before the
    /// threshold can trigger again.
    #[serde(default)]
    hysteresis: Option<f64>,
    /// The rules, first match wins; containers no rule selects are left alone.
    containers: Vec<RuleFile>,
}

fn default_version() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    /// Exact container id.
    #[serde(default)]
    id: Option<String>,
    /// Container labels that must all be present with these values.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Take a checkpoint this often (since the last one automanage took).
    #[serde(default)]
    interval: Option<Interval>,
    #[serde(default)]
    cpu_threshold: Option<Percent>,
    #[serde(default)]
    mem_threshold: Option<Percent>,
    /// Labels of the checkpoints taken: `k=v` or bare `k`.
    #[serde(default)]
    checkpoint_labels: Vec<String>,
    /// Filesystem only, no process state.
    #[serde(default)]
    fs_only: bool,
    /// Refuse to dump a container using more memory than this (default 1G).
    #[serde(default)]
    memory_limit: Option<Size>,
    /// Applied after each checkpoint, after `merge`.
    #[serde(default)]
    prune: Option<PruneRule>,
    /// Applied after each checkpoint, before `prune`.
    #[serde(default)]
    merge: Option<MergeRule>,
}

/// The rules of `checkpointctl prune` (PruneCheckpointsRequest).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRule {
    /// Keep the newest N checkpoints.
    #[serde(default)]
    pub keep_latest: Option<u32>,
    /// Keep checkpoints made within the last N days.
    #[serde(default)]
    pub keep_days: Option<u32>,
    /// Delete the oldest until the storage holds at most this (e.g. 10GB).
    #[serde(default)]
    pub max_storage: Option<Size>,
    /// Checkpoints with any of these labels are never pruned.
    #[serde(default)]
    pub exclude_labels: Vec<String>,
    /// Delete checkpoints whose parent is gone.
    #[serde(default)]
    pub prune_dangling: bool,
}

/// The rules of `checkpointctl merge` (MergeCheckpointsRequest).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeRule {
    #[serde(default)]
    pub strategy: Strategy,
    /// time-based: keep the newest of each of the last N days.
    #[serde(default)]
    pub keep_daily: Option<u32>,
    /// time-based: keep the newest of each of the last N hours.
    #[serde(default)]
    pub keep_hourly: Option<u32>,
    /// Checkpoints with any of these labels stay.
    #[serde(default)]
    pub retain_labels: Vec<String>,
    /// Also split large files into content-defined chunks.
    #[serde(default)]
    pub aggressive: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    TimeBased,
    Incremental,
    Tagged,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::TimeBased => "time-based",
            Strategy::Incremental => "incremental",
            Strategy::Tagged => "tagged",
        }
    }
}

/// A percentage from 1 to 100: `80`, `80.5` or `"80%"`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "PercentText")]
pub struct Percent(pub f64);

#[derive(Deserialize)]
#[serde(untagged)]
enum PercentText {
    Number(f64),
    Text(String),
}

impl TryFrom<PercentText> for Percent {
    type Error = String;

    fn try_from(value: PercentText) -> Result<Percent, String> {
        let number = match value {
            PercentText::Number(n) => n,
            PercentText::Text(text) => return parse_percent(&text).map(Percent),
        };
        check_percent(number).map(Percent)
    }
}

/// `80`, `80.5` or `80%`, from 1 to 100 (also what the flags take).
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    let digits = trimmed.strip_suffix('%').unwrap_or(trimmed).trim_end();
    let number: f64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage such as 80 or 80%"))?;
    check_percent(number)
}

fn check_percent(number: f64) -> Result<f64, String> {
    if (1.0..=100.0).contains(&number) {
        Ok(number)
    } else {
        Err(format!("{number} is not a percentage between 1 and 100"))
    }
}

/// A duration of at least a second: `30s`, `5m`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct Interval(pub Duration);

impl TryFrom<String> for Interval {
    type Error = String;

    fn try_from(text: String) -> Result<Interval, String> {
        parse_interval(&text).map(Interval)
    }
}

/// A duration of at least a second (also what `--check-interval` takes).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < Duration::from_secs(1) {
        return Err(format!("{text:?} is shorter than a second"));
    }
    Ok(duration)
}

/// A size such as `512MB` or `10GB`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct Size(pub u64);

impl TryFrom<String> for Size {
    type Error = String;

    fn try_from(text: String) -> Result<Size, String> {
        parse_size(&text).map(Size)
    }
}

/// A failure of [`PolicyFile::resolve`]: the key and the reason.
type Fault = (String, String);

impl PolicyFile {
    fn resolve(self, defaults: &Defaults) -> Result<Policy, Fault> {
        if self.version != 1 {
            return Err((
                "version".into(),
                format!("{} is not a known version (only 1)", self.version),
            ));
        }
        if self.containers.is_empty() {
            return Err((
                "containers".into(),
                "no rules: list the containers to manage, by id or labels".into(),
            ));
        }
        let hysteresis = self.hysteresis.unwrap_or(DEFAULT_HYSTERESIS);
        if !(0.0..100.0).contains(&hysteresis) {
            return Err((
                "hysteresis".into(),
                format!("{hysteresis} is not a number of percent points from 0 to 99"),
            ));
        }
        let cpu_default = self.cpu_threshold.map_or(defaults.cpu_threshold, |p| p.0);
        let mem_default = self.mem_threshold.map_or(defaults.mem_threshold, |p| p.0);
        let mut rules = Vec::with_capacity(self.containers.len());
        for (index, rule) in self.containers.into_iter().enumerate() {
            rules.push(rule.resolve(&format!("containers[{index}]"), cpu_default, mem_default, hysteresis)?);
        }
        Ok(Policy {
            check_interval: self.check_interval.map_or(defaults.check_interval, |i| i.0),
            rules,
        })
    }
}

impl RuleFile {
    fn resolve(self, at: &str, cpu_default: f64, mem_default: f64, hysteresis: f64) -> Result<Rule, Fault> {
        let fault = |key: &str, reason: String| (format!("{at}.{key}"), reason);
        if self.id.as_deref().is_some_and(str::is_empty) {
            return Err(fault("id", "is empty".into()));
        }
        if self.id.is_none() && self.labels.is_empty() {
            return Err((
                at.to_string(),
                "selects no container: give id or labels (or both)".into(),
            ));
        }
        let cpu_threshold = self.cpu_threshold.map_or(cpu_default, |p| p.0);
        let mem_threshold = self.mem_threshold.map_or(mem_default, |p| p.0);
        for (key, threshold) in [("cpu_threshold", cpu_threshold), ("mem_threshold", mem_threshold)] {
            if threshold <= hysteresis {
                return Err(fault(
                    key,
                    format!("{threshold}% is not above the hysteresis ({hysteresis} points): it would never re-arm"),
                ));
            }
        }
        for (index, label) in self.checkpoint_labels.iter().enumerate() {
            let key = label.split_once('=').map_or(label.as_str(), |(k, _)| k);
            if key.trim().is_empty() {
                return Err(fault(
                    &format!("checkpoint_labels[{index}]"),
                    format!("{label:?} has no key"),
                ));
            }
            if key == REASON_LABEL {
                return Err(fault(
                    &format!("checkpoint_labels[{index}]"),
                    format!("{REASON_LABEL} is set by automanage itself (to the reason of the checkpoint)"),
                ));
            }
        }
        if let Some(prune) = &self.prune {
            if prune.keep_latest.is_none()
                && prune.keep_days.is_none()
                && prune.max_storage.is_none()
                && !prune.prune_dangling
            {
                return Err(fault(
                    "prune",
                    "nothing to prune by: give keep_latest, keep_days, max_storage or prune_dangling".into(),
                ));
            }
            if prune.keep_latest == Some(0) {
                return Err(fault(
                    "prune.keep_latest",
                    "0 would delete the checkpoint just taken; keep at least 1".into(),
                ));
            }
        }
        if let Some(merge) = &self.merge {
            if merge.strategy == Strategy::TimeBased && merge.keep_daily.is_none() && merge.keep_hourly.is_none() {
                return Err(fault(
                    "merge",
                    "the time-based strategy needs keep_daily or keep_hourly".into(),
                ));
            }
        }
        let name = match (&self.id, self.labels.is_empty()) {
            (Some(id), true) => format!("{at} (id {id})"),
            (Some(id), false) => format!("{at} (id {id}, labels {})", labels_text(&self.labels)),
            (None, _) => format!("{at} (labels {})", labels_text(&self.labels)),
        };
        Ok(Rule {
            name,
            id: self.id,
            labels: self.labels,
            limits: Limits {
                cpu_threshold,
                mem_threshold,
                hysteresis,
                interval: self.interval.map(|i| i.0),
            },
            checkpoint: CheckpointSpec {
                labels: self.checkpoint_labels,
                fs_only: self.fs_only,
                memory_limit: match self.memory_limit {
                    Some(size) => size.0,
                    None => parse_size(DEFAULT_MEMORY_LIMIT).unwrap_or(0),
                },
            },
            merge: self.merge,
            prune: self.prune,
        })
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            check_interval: Duration::from_secs(300),
            cpu_threshold: 80.0,
            mem_threshold: 90.0,
        }
    }

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, "p.yaml", &defaults())
    }

    const EXAMPLE: &str = "\
version: 1
check_interval: 1m
cpu_threshold: 70
hysteresis: 5
containers:
  - id: web-1
    interval: 2h
    cpu_threshold: 50%
    checkpoint_labels: [daily, tier=web]
    merge: {strategy: time-based, keep_daily: 7}
    prune: {keep_latest: 10, max_storage: 10GB, exclude_labels: [golden]}
  - labels: {app: db}
    mem_threshold: 75.5
    fs_only: true
    memory_limit: 512MB
";

    #[test]
    fn a_full_policy_resolves_rule_over_file_over_flags() {
        let policy = parse(EXAMPLE).unwrap();
        assert_eq!(policy.check_interval, Duration::from_secs(60));
        let [web, db] = &policy.rules[..] else {
            panic!("{policy:?}");
        };
        assert_eq!(web.name, "containers[0] (id web-1)");
        assert_eq!(
            web.limits,
            Limits {
                cpu_threshold: 50.0,
                mem_threshold: 90.0,
                hysteresis: 5.0,
                interval: Some(Duration::from_secs(7200)),
            }
        );
        assert_eq!(web.checkpoint.labels, ["daily", "tier=web"]);
        assert_eq!(web.checkpoint.memory_limit, 1 << 30);
        let merge = web.merge.as_ref().unwrap();
        assert_eq!((merge.strategy.as_str(), merge.keep_daily), ("time-based", Some(7)));
        let prune = web.prune.as_ref().unwrap();
        assert_eq!(prune.max_storage, Some(Size(10 << 30)));
        assert_eq!(prune.exclude_labels, ["golden"]);

        assert_eq!(db.name, "containers[1] (labels app=db)");
        assert_eq!((db.limits.cpu_threshold, db.limits.mem_threshold), (70.0, 75.5));
        assert_eq!(db.limits.interval, None);
        assert!(db.checkpoint.fs_only);
        assert_eq!(db.checkpoint.memory_limit, 512 << 20);
        assert!(db.merge.is_none() && db.prune.is_none());
    }

    #[test]
    fn rules_select_by_id_and_every_label() {
        let policy = parse(EXAMPLE).unwrap();
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let (web, db) = (&policy.rules[0], &policy.rules[1]);
        assert!(web.selects("web-1", &labels(&[])));
        assert!(!web.selects("web-10", &labels(&[])));
        assert!(db.selects("x", &labels(&[("app", "db"), ("tier", "2")])));
        assert!(!db.selects("x", &labels(&[("app", "web")])));
        assert!(!db.selects("x", &labels(&[])));
        let all = Policy::every_running_container(&defaults());
        assert!(all.rules[0].selects("anything", &labels(&[])));
        assert_eq!(all.rules[0].limits.cpu_threshold, 80.0);
        assert_eq!(all.rules[0].limits.interval, None);
        assert_eq!(all.rules[0].checkpoint.memory_limit, 1 << 30);
    }

    #[test]
    fn bad_policies_name_the_key_and_the_reason() {
        let cases = [
            (
                "containers: [{id: a, cpu_treshold: 50}]\n",
                "containers[0].cpu_treshold",
                "unknown field `cpu_treshold`",
            ),
            ("colour: blue\ncontainers: [{id: a}]\n", "colour", "unknown field"),
            (
                "containers: [{id: a, cpu_threshold: 150}]\n",
                "containers[0].cpu_threshold",
                "150 is not a percentage between 1 and 100",
            ),
            (
                "containers: [{id: a, mem_threshold: 0}]\n",
                "containers[0].mem_threshold",
                "between 1 and 100",
            ),
            (
                "cpu_threshold: lots\ncontainers: [{id: a}]\n",
                "cpu_threshold",
                "not a percentage",
            ),
            (
                "containers: [{id: a}, {labels: {app: x}, interval: soon}]\n",
                "containers[1].interval",
                "invalid duration",
            ),
            (
                "check_interval: 0s\ncontainers: [{id: a}]\n",
                "check_interval",
                "shorter than a second",
            ),
            (
                "containers: [{interval: 1h}]\n",
                "containers[0]",
                "selects no container",
            ),
            ("containers: []\n", "containers", "no rules"),
            ("version: 2\ncontainers: [{id: a}]\n", "version", "only 1"),
            (
                "hysteresis: 20\ncontainers: [{id: a, cpu_threshold: 15}]\n",
                "containers[0].cpu_threshold",
                "never re-arm",
            ),
            ("hysteresis: -1\ncontainers: [{id: a}]\n", "hysteresis", "from 0 to 99"),
            (
                "containers: [{id: a, checkpoint_labels: [automanage=x]}]\n",
                "containers[0].checkpoint_labels[0]",
                "set by automanage itself",
            ),
            (
                "containers: [{id: a, merge: {strategy: random}}]\n",
                "containers[0].merge.strategy",
                "unknown variant `random`",
            ),
            (
                "containers: [{id: a, merge: {strategy: time-based}}]\n",
                "containers[0].merge",
                "needs keep_daily or keep_hourly",
            ),
            (
                "containers: [{id: a, prune: {exclude_labels: [golden]}}]\n",
                "containers[0].prune",
                "nothing to prune by",
            ),
            (
                "containers: [{id: a, prune: {keep_latest: 0}}]\n",
                "containers[0].prune.keep_latest",
                "keep at least 1",
            ),
            (
                "containers: [{id: a, prune: {max_storage: big}}]\n",
                "containers[0].prune.max_storage",
                "invalid size",
            ),
            (
                "containers: [{id: a, labels: [x]}]\n",
                "containers[0].labels",
                "expected a map",
            ),
        ];
        for (text, key, reason) in cases {
            let err = parse(text).unwrap_err();
            let message = err.to_string();
            assert!(message.starts_with("policy p.yaml: "), "{text}: {message}");
            assert!(message.contains(&format!("key {key}: ")), "{text}: {message}");
            assert!(err.fault().starts_with(&format!("{key}: ")), "{text}: {}", err.fault());
            assert!(message.contains(reason), "{text}: {message}");
        }
    }

    #[test]
    fn files_that_are_not_policies_are_refused_without_a_key() {
        for text in ["", "just text", "[1, 2]"] {
            let err = parse(text).unwrap_err();
            assert!(matches!(err, PolicyError::Read { .. }), "{text:?}: {err:?}");
        }
        let err = parse("containers: [").unwrap_err();
        assert!(err.fault().contains("did not find expected node content"), "{err}");
        let err = Policy::load(Path::new("/nonexistent/p.yaml"), &defaults()).unwrap_err();
        assert!(err.fault().contains("No such file"), "{err}");
    }

    #[test]
    fn percentages_read_with_or_without_the_sign() {
        assert_eq!(parse_percent("80%"), Ok(80.0));
        assert_eq!(parse_percent(" 97.5 "), Ok(97.5));
        assert_eq!(parse_percent("100"), Ok(100.0));
        assert!(parse_percent("0.5%").is_err());
        assert!(parse_percent("101").is_err());
        assert!(parse_percent("eighty").is_err());
        assert_eq!(parse_interval("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_interval("0s").is_err());
    }

    #[test]
    fn the_packaged_example_is_a_valid_policy() {
        let text = include_str!("../../../packaging/automanage-policy.yaml");
        let policy = parse(text).unwrap();
        assert!(!policy.rules.is_empty());
    }
}
