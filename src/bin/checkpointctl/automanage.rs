//! `checkpointctl automanage`: a loop that samples the containers of a
//! namespace (one ContainerStats call per tick) and checkpoints those a
//! policy manages when a CPU or memory threshold is crossed, or when an
//! interval is due; after each checkpoint it applies the rule's merge (or,
//! for a rule without one, the `automerge` of the config file), then its
//! prune. Each decision is logged with the container, the reason and
//! the numbers.
//!
//! The decisions are pure ([`Watch::observe`]): samples in, a [`Decision`]
//! out, with the hysteresis state of each threshold. This module owns the
//! loop, the signals (SIGHUP reloads the policy, SIGTERM and SIGINT stop
//! between ticks) and detaching (`--daemonize`); the policy file is
//! [`crate::policy`]'s; keeping the detached log under `logging.max_size`
//! is [`log_rotation`]'s.

mod log_rotation;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::MissedTickBehavior;

use seamless_snapshotter::api::client::DaemonClient;
use seamless_snapshotter::proto::{
    ContainerSample, ContainerStatsRequest, CreateCheckpointRequest, InspectCheckpointRequest, ListCheckpointsRequest,
    MergeCheckpointsRequest, MergeRules, PruneCheckpointsRequest, Storage,
};

use crate::checkpoints::human_size;
use crate::policy::{parse_interval, parse_percent, Defaults, Limits, MergeRule, Policy, Rule, REASON_LABEL};
use crate::settings::{LoggingSettings, Settings, DEFAULT_MAX_BACKUPS};
use crate::{daemon, CliError, Context};
use log_rotation::LogRotation;

/// Set in the environment of the detached process, so that it runs the loop
/// instead of detaching again.
const DETACHED_ENV: &str = "CHECKPOINTCTL_AUTOMANAGE_DETACHED";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How often containers are sampled (a policy file may say otherwise).
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    check_interval: String,
    /// Checkpoint when CPU reaches this percent of one CPU (as `docker stats`).
    #[arg(long, default_value = "80%", value_name = "PERCENT")]
    cpu_threshold: String,
    /// Checkpoint when memory reaches this percent of the container's limit
    /// (of the host's memory when it has none).
    #[arg(long, default_value = "90%", value_name = "PERCENT")]
    mem_threshold: String,
    /// The policy (YAML): which containers, thresholds, intervals, merge
    /// and prune. Without it every running container is managed with the
    /// thresholds above and no interval. SIGHUP reloads it.
    #[arg(long, value_name = "FILE")]
    schedule_file: Option<PathBuf>,
    /// Sample, wait a second to measure CPU, decide once and exit (for cron
    /// and tests). The interval of a container automanage never
    /// checkpointed counts as due.
    #[arg(long, conflicts_with = "daemonize")]
    once: bool,
    /// Detach: run in a new session, log to --log-file, print the pid.
    #[arg(long)]
    daemonize: bool,
    /// The log of --daemonize [default: /var/log/checkpointctl-automanage.log
    /// as root, else $XDG_STATE_HOME/checkpointctl/automanage.log].
    #[arg(long, value_name = "FILE", requires = "daemonize")]
    log_file: Option<PathBuf>,
}

impl Args {
    fn defaults(&self) -> Result<Defaults, CliError> {
        let usage = |flag: &str, reason: String| CliError::Usage(format!("--{flag}: {reason}"));
        Ok(Defaults {
            check_interval: parse_interval(&self.check_interval).map_err(|r| usage("check-interval", r))?,
            cpu_threshold: parse_percent(&self.cpu_threshold).map_err(|r| usage("cpu-threshold", r))?,
            mem_threshold: parse_percent(&self.mem_threshold).map_err(|r| usage("mem-threshold", r))?,
        })
    }

    fn load_policy(&self) -> Result<Policy, CliError> {
        let defaults = self.defaults()?;
        match &self.schedule_file {
            Some(path) => Policy::load(path, &defaults).map_err(|e| CliError::Usage(e.to_string())),
            None => Ok(Policy::every_running_container(&defaults)),
        }
    }
}

// ----- decisions --------------------------------------------------------

/// Why automanage takes a checkpoint: the value of its `automanage` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Cpu,
    Memory,
    Interval,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Cpu => "cpu",
            Reason::Memory => "memory",
            Reason::Interval => "interval",
        }
    }
}

/// One sample of a container, as ContainerStats reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Cumulative.
    pub cpu_usage_ns: u64,
    pub sampled_unix_ns: u64,
    pub memory_bytes: u64,
    /// The cgroup's limit, or the host's memory.
    pub memory_limit_bytes: u64,
}

impl Usage {
    fn of(sample: &ContainerSample) -> Usage {
        Usage {
            cpu_usage_ns: sample.cpu_usage_ns,
            sampled_unix_ns: sample.sampled_unix_ns,
            memory_bytes: sample.memory_bytes,
            memory_limit_bytes: sample.memory_limit_bytes,
        }
    }
}

/// What to do about one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Why to checkpoint now; `None`: not now.
    pub reason: Option<Reason>,
    /// The thresholds crossed while armed: disarmed once a checkpoint is
    /// taken, still armed (so tried again) when it fails.
    pub crossed: Vec<Reason>,
    /// One clause per measure, e.g. `cpu 97.3% >= 50% (armed), memory 3.1%
    /// < 90%, interval 2h not due (1.5s left)`.
    pub detail: String,
}

/// What automanage remembers of one container between ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct Watch {
    previous: Option<Usage>,
    /// Why there is no previous sample to measure CPU against.
    no_baseline: &'static str,
    cpu_armed: bool,
    memory_armed: bool,
    /// Unix ns the interval counts from: the last checkpoint automanage
    /// took, or when it began to manage the container.
    interval_from_ns: u64,
    /// The last checkpoint automanage took: the parent of the next one.
    pub last_checkpoint: Option<String>,
}

impl Watch {
    /// Both thresholds armed, nothing measured yet.
    pub fn new(interval_from_ns: u64, last_checkpoint: Option<String>) -> Watch {
        Watch {
            previous: None,
            no_baseline: "first sample",
            cpu_armed: true,
            memory_armed: true,
            interval_from_ns,
            last_checkpoint,
        }
    }

    /// Decides on `usage`, the newest sample. A threshold triggers when
    /// usage reaches it while armed; it re-arms only once usage falls below
    /// the threshold minus the hysteresis. An interval is due when that
    /// long has passed (by the samples' clock) since the last checkpoint.
    pub fn observe(&mut self, usage: Usage, limits: &Limits) -> Decision {
        let cpu = match self.previous.replace(usage) {
            None => Err(self.no_baseline),
            Some(p) if usage.sampled_unix_ns <= p.sampled_unix_ns || usage.cpu_usage_ns < p.cpu_usage_ns => {
                Err("counter reset")
            }
            Some(p) => Ok((usage.cpu_usage_ns - p.cpu_usage_ns) as f64 * 100.0
                / (usage.sampled_unix_ns - p.sampled_unix_ns) as f64),
        };
        let memory = match usage.memory_limit_bytes {
            0 => Err("no limit known"),
            limit => Ok(usage.memory_bytes as f64 * 100.0 / limit as f64),
        };
        let mut clauses = Vec::new();
        let mut crossed = Vec::new();
        let measures = [
            (Reason::Cpu, cpu, limits.cpu_threshold, &mut self.cpu_armed),
            (Reason::Memory, memory, limits.mem_threshold, &mut self.memory_armed),
        ];
        for (reason, measured, threshold, armed) in measures {
            let name = reason.as_str();
            let rearm_below = threshold - limits.hysteresis;
            let (at, below) = (percent(threshold), percent(rearm_below));
            let clause = match measured {
                Err(why) => format!("{name} n/a ({why})"),
                Ok(value) if value >= threshold && *armed => {
                    crossed.push(reason);
                    format!("{name} {value:.1}% >= {at}% (armed)")
                }
                Ok(value) if value >= threshold => format!("{name} {value:.1}% >= {at}% (disarmed until < {below}%)"),
                Ok(value) if !*armed && value < rearm_below => {
                    *armed = true;
                    format!("{name} {value:.1}% < {below}% (re-armed)")
                }
                Ok(value) if !*armed => format!("{name} {value:.1}% < {at}% (disarmed until < {below}%)"),
                Ok(value) => format!("{name} {value:.1}% < {at}%"),
            };
            clauses.push(clause);
        }
        let mut interval_due = false;
        if let Some(interval) = limits.interval {
            let elapsed = Duration::from_nanos(usage.sampled_unix_ns.saturating_sub(self.interval_from_ns));
            if elapsed >= interval {
                interval_due = true;
                clauses.push(format!("interval {} due", duration_text(interval)));
            } else {
                clauses.push(format!(
                    "interval {} not due ({:.1}s left)",
                    duration_text(interval),
                    (interval - elapsed).as_secs_f64()
                ));
            }
        }
        let reason = crossed.first().copied().or(interval_due.then_some(Reason::Interval));
        Decision {
            reason,
            crossed,
            detail: clauses.join(", "),
        }
    }

    /// Records checkpoint `id`, taken on `decision` for the sample of
    /// `sampled_unix_ns`: the crossed thresholds disarm and the interval
    /// counts from here. The next sample only starts a new CPU window: a
    /// checkpoint freezes the container (for a CRIU dump, for most of it),
    /// so a window that holds one under-reports its load and would re-arm a
    /// container that never cooled down.
    pub fn taken(&mut self, decision: &Decision, sampled_unix_ns: u64, id: String) {
        for reason in &decision.crossed {
            match reason {
                Reason::Cpu => self.cpu_armed = false,
                Reason::Memory => self.memory_armed = false,
                Reason::Interval => {}
            }
        }
        self.interval_from_ns = sampled_unix_ns;
        self.last_checkpoint = Some(id);
        self.previous = None;
        self.no_baseline = "after a checkpoint";
    }
}

/// A threshold as written: `50`, `65.5`, never `65.50000000000001`.
fn percent(value: f64) -> String {
    format!("{}", (value * 100.0).round() / 100.0)
}

/// `2h`, `5m`, `90s`.
fn duration_text(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{:.1}s", duration.as_secs_f64()),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

// ----- the loop ---------------------------------------------------------

/// Whether to detach now (`--daemonize`, unless this is the detached one).
pub fn should_detach(args: &Args) -> bool {
    args.daemonize && std::env::var_os(DETACHED_ENV).is_none()
}

/// Starts this same command again detached: in a new session, stdin from
/// /dev/null, stdout and stderr appended to the log file; prints its pid.
/// The arguments and the policy are checked here first, so mistakes are
/// reported on the terminal rather than in the log. Runs before any async
/// runtime exists.
pub fn detach(args: &Args) -> Result<(), CliError> {
    use std::os::unix::process::CommandExt;

    args.load_policy()?;
    let log_file = match &args.log_file {
        Some(path) => path.clone(),
        None => default_log_file()?,
    };
    let failed = |what: &str, e: std::io::Error| CliError::Failed(format!("{what} {}: {e}", log_file.display()));
    if let Some(dir) = log_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| failed("creating the directory of", e))?;
    }
    let log = log_rotation::open_log(&log_file).map_err(|e| failed("opening", e))?;
    let stdout = log.try_clone().map_err(|e| failed("opening", e))?;
    let exe = std::env::current_exe().map_err(|e| CliError::Failed(format!("finding checkpointctl itself: {e}")))?;
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(DETACHED_ENV, "1")
        // A log file, not a terminal: no colour codes.
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(log);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setsid(2), which is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = command
        .spawn()
        .map_err(|e| CliError::Failed(format!("starting the detached automanage: {e}")))?;
    // One that cannot reach the daemon exits at once: say so here.
    std::thread::sleep(Duration::from_millis(500));
    if let Ok(Some(status)) = child.try_wait() {
        return Err(CliError::Failed(format!(
            "the detached automanage exited at once ({status}); see {}",
            log_file.display()
        )));
    }
    println!("{}", child.id());
    Ok(())
}

fn default_log_file() -> Result<PathBuf, CliError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/log/checkpointctl-automanage.log"));
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/state")))
        .ok_or_else(|| CliError::Usage("neither XDG_STATE_HOME nor HOME is set: give --log-file".into()))?;
    Ok(state.join("checkpointctl/automanage.log"))
}

/// The rotation of the detached process's log, if `logging.max_size` asks
/// for one (a foreground automanage writes to the terminal).
fn log_rotation(args: &Args, logging: &LoggingSettings) -> Result<Option<LogRotation>, CliError> {
    let Some(max_size) = logging.max_size_bytes() else {
        return Ok(None);
    };
    if !args.daemonize || std::env::var_os(DETACHED_ENV).is_none() {
        return Ok(None);
    }
    let log = match &args.log_file {
        Some(path) => path.clone(),
        None => default_log_file()?,
    };
    let max_backups = logging.max_backups.unwrap_or(DEFAULT_MAX_BACKUPS);
    Ok(Some(LogRotation::new(log, max_size, max_backups)))
}

/// Rotates the log if it grew past its size; a failure is logged, never
/// fatal.
fn rotate_log(rotation: Option<&LogRotation>) {
    if let Some(rotation) = rotation {
        match rotation.check() {
            Ok(true) => tracing::info!("log rotated: over logging.max_size"),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot rotate the log: {e}"),
        }
    }
}

/// Of the config file: `automerge` merges after each checkpoint of a rule
/// that has no `merge` of its own; `logging.max_size` rotates the log of
/// `--daemonize`.
pub async fn run(context: &Context, settings: &Settings, args: Args) -> Result<(), CliError> {
    let automerge = settings.automerge.rules();
    let rotation = log_rotation(&args, &settings.logging)?;
    rotate_log(rotation.as_ref());
    let defaults = args.defaults()?;
    let mut policy = args.load_policy()?;
    let source = match &args.schedule_file {
        Some(path) => format!("policy {}", path.display()),
        None => "no policy file: every running container".into(),
    };
    if args.once {
        let mut manager = Manager::connect(context, automerge.clone(), true).await?;
        tracing::info!(namespace = %context.namespace, rules = policy.rules.len(), "automanage once with {source}");
        manager.tick(&policy, false).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let failures = manager.tick(&policy, true).await?;
        if failures > 0 {
            return Err(CliError::Failed(format!("{failures} automanage actions failed")));
        }
        return Ok(());
    }
    // Before connecting: a SIGHUP must never find the default action (exit).
    let mut signals = Signals::new()?;
    let mut manager = Manager::connect(context, automerge, false).await?;
    tracing::info!(
        namespace = %context.namespace,
        rules = policy.rules.len(),
        check_interval = %duration_text(policy.check_interval),
        "automanage started with {source}"
    );
    let mut ticks = ticker(policy.check_interval, Duration::ZERO);
    loop {
        // Signals are looked at between ticks: a checkpoint under way is
        // finished, never cut short.
        tokio::select! {
            _ = ticks.tick() => {
                if let Err(e) = manager.tick(&policy, true).await {
                    tracing::warn!("sampling failed, trying again next tick: {e}");
                }
                rotate_log(rotation.as_ref());
            }
            _ = signals.hangup.recv() => {
                let Some(path) = &args.schedule_file else {
                    tracing::info!("SIGHUP: no policy file to reload");
                    continue;
                };
                match Policy::load(path, &defaults) {
                    Ok(reloaded) => {
                        if reloaded.check_interval != policy.check_interval {
                            ticks = ticker(reloaded.check_interval, reloaded.check_interval);
                        }
                        tracing::info!(
                            rules = reloaded.rules.len(),
                            check_interval = %duration_text(reloaded.check_interval),
                            "policy {} reloaded",
                            path.display()
                        );
                        policy = reloaded;
                    }
                    Err(e) => tracing::warn!(
                        "policy {} refused: {}; keeping the previous policy",
                        path.display(),
                        e.fault()
                    ),
                }
            }
            _ = signals.terminate.recv() => {
                tracing::info!("SIGTERM: automanage stopped");
                return Ok(());
            }
            _ = signals.interrupt.recv() => {
                tracing::info!("SIGINT: automanage stopped");
                return Ok(());
            }
        }
    }
}

struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn new() -> Result<Signals, CliError> {
        let listen =
            |kind: SignalKind| signal(kind).map_err(|e| CliError::Failed(format!("cannot listen for signals: {e}")));
        Ok(Signals {
            hangup: listen(SignalKind::hangup())?,
            terminate: listen(SignalKind::terminate())?,
            interrupt: listen(SignalKind::interrupt())?,
        })
    }
}

/// Ticks every `period`, the first after `first`; a tick that runs long
/// (a dump) delays the next rather than bunching them up.
fn ticker(period: Duration, first: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks
}

struct Manager {
    client: DaemonClient,
    namespace: String,
    storage: Storage,
    watches: HashMap<String, Watch>,
    /// Containers no rule selects, logged once each.
    unmanaged: HashSet<String>,
    once: bool,
    /// The config file's `automerge`.
    automerge: Option<MergeRules>,
}

/// The merge after a checkpoint of `rule`'s: its own, else the config
/// file's `automerge`, else none.
fn merge_after(rule: &Rule, automerge: Option<&MergeRules>) -> Option<(MergeRules, &'static str)> {
    let own = |m: &MergeRule| MergeRules {
        strategy: m.strategy.as_str().into(),
        keep_daily: m.keep_daily.unwrap_or(0),
        has_keep_daily: m.keep_daily.is_some(),
        keep_hourly: m.keep_hourly.unwrap_or(0),
        has_keep_hourly: m.keep_hourly.is_some(),
        retain_labels: m.retain_labels.clone(),
        aggressive: m.aggressive,
    };
    match (&rule.merge, automerge) {
        (Some(m), _) => Some((own(m), "policy")),
        (None, Some(rules)) => Some((rules.clone(), "automerge")),
        (None, None) => None,
    }
}

impl Manager {
    async fn connect(context: &Context, automerge: Option<MergeRules>, once: bool) -> Result<Manager, CliError> {
        Ok(Manager {
            automerge,
            client: daemon::connect(&context.address).await?,
            namespace: context.namespace.clone(),
            storage: context.storage.clone(),
            watches: HashMap::new(),
            unmanaged: HashSet::new(),
            once,
        })
    }

    /// One sample of every running container, then a decision for each one
    /// a rule manages (unless `act` is false: a first sample only sets the
    /// CPU baseline). Returns how many actions failed.
    async fn tick(&mut self, policy: &Policy, act: bool) -> Result<usize, CliError> {
        let mut samples = self
            .client
            .container_stats(ContainerStatsRequest {
                namespace: self.namespace.clone(),
                containers: Vec::new(),
            })
            .await
            .map_err(|status| {
                CliError::rpc(
                    format!("sampling the containers of namespace {}", self.namespace),
                    status,
                )
            })?
            .into_inner()
            .containers;
        samples.retain(|s| s.status == "running" && s.sampled_unix_ns > 0);
        samples.sort_by(|a, b| a.id.cmp(&b.id));
        let running: HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
        self.watches.retain(|id, _| running.contains(id.as_str()));
        self.unmanaged.retain(|id| running.contains(id.as_str()));
        let mut failures = 0;
        for sample in &samples {
            let Some(rule) = policy.rules.iter().find(|r| r.selects(&sample.id, &sample.labels)) else {
                if self.unmanaged.insert(sample.id.clone()) {
                    tracing::debug!(container = %sample.id, "not managed: no rule selects it");
                }
                self.watches.remove(&sample.id);
                continue;
            };
            self.unmanaged.remove(&sample.id);
            if !self.watches.contains_key(&sample.id) {
                let watch = self.start_watch(&sample.id, sample.sampled_unix_ns, rule).await;
                self.watches.insert(sample.id.clone(), watch);
            }
            let Some(watch) = self.watches.get_mut(&sample.id) else {
                continue;
            };
            let usage = Usage::of(sample);
            let decision = watch.observe(usage, &rule.limits);
            if !act {
                continue;
            }
            let Some(reason) = decision.reason else {
                tracing::info!(container = %sample.id, "no checkpoint: {}", decision.detail);
                continue;
            };
            let parent = match watch.last_checkpoint.clone() {
                Some(id) => self.still_exists(id).await,
                None => None,
            };
            match self.create(&sample.id, rule, reason, parent.clone()).await {
                Ok(id) => {
                    tracing::info!(
                        container = %sample.id,
                        reason = %reason.as_str(),
                        checkpoint = %id,
                        parent = %parent.as_deref().unwrap_or("-"),
                        "checkpoint taken: {}",
                        decision.detail
                    );
                    if let Some(watch) = self.watches.get_mut(&sample.id) {
                        watch.taken(&decision, usage.sampled_unix_ns, id);
                    }
                    failures += self.retain(&sample.id, rule).await;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(
                        container = %sample.id,
                        reason = %reason.as_str(),
                        "checkpoint failed: {}: {e}",
                        decision.detail
                    );
                }
            }
        }
        Ok(failures)
    }

    /// Starts managing a container: the interval counts from the newest
    /// checkpoint an earlier automanage took of it (so a restart keeps the
    /// rhythm), else from now; `--once` has no "now" to count from, so an
    /// interval with no checkpoint behind it is due.
    async fn start_watch(&mut self, container: &str, now_ns: u64, rule: &Rule) -> Watch {
        let previous = self.newest_automanaged(container).await;
        let from_ns = match &previous {
            Some((_, created_unix)) => (*created_unix).max(0) as u64 * 1_000_000_000,
            None if self.once => 0,
            None => now_ns,
        };
        let limits = &rule.limits;
        tracing::info!(
            container = %container,
            rule = ?rule.name,
            previous = %previous.as_ref().map_or("-", |(id, _)| id.as_str()),
            "managing: cpu >= {}%, memory >= {}%, hysteresis {} points, interval {}",
            percent(limits.cpu_threshold),
            percent(limits.mem_threshold),
            percent(limits.hysteresis),
            limits.interval.map_or_else(|| "none".to_string(), duration_text)
        );
        Watch::new(from_ns, previous.map(|(id, _)| id))
    }

    /// The newest checkpoint of `container` labelled `automanage`, and
    /// when it was made.
    async fn newest_automanaged(&mut self, container: &str) -> Option<(String, i64)> {
        let listed = self
            .client
            .list_checkpoints(ListCheckpointsRequest {
                storage: Some(self.storage.clone()),
                namespace: self.namespace.clone(),
                container: container.to_string(),
                filter: format!("label={REASON_LABEL}"),
            })
            .await;
        match listed {
            Ok(response) => response
                .into_inner()
                .checkpoints
                .into_iter()
                .filter(|c| c.container == container)
                .max_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)))
                .map(|c| (c.id, c.created_unix)),
            Err(status) => {
                tracing::warn!(container = %container, "listing its checkpoints failed: {}", status.message());
                None
            }
        }
    }

    /// `id` if the catalogue still has it (a prune may have removed it).
    async fn still_exists(&mut self, id: String) -> Option<String> {
        let inspected = self
            .client
            .inspect_checkpoint(InspectCheckpointRequest {
                storage: Some(self.storage.clone()),
                namespace: self.namespace.clone(),
                id: id.clone(),
                ..Default::default()
            })
            .await;
        match inspected {
            Ok(_) => Some(id),
            Err(status) if status.code() == tonic::Code::NotFound => {
                tracing::debug!(checkpoint = %id, "the previous checkpoint is gone: taking a whole one");
                None
            }
            Err(status) => {
                tracing::warn!(checkpoint = %id, "cannot check the previous checkpoint, taking a whole one: {}", status.message());
                None
            }
        }
    }

    async fn create(
        &mut self,
        container: &str,
        rule: &Rule,
        reason: Reason,
        parent: Option<String>,
    ) -> Result<String, CliError> {
        let mut labels = rule.checkpoint.labels.clone();
        labels.push(format!("{REASON_LABEL}={}", reason.as_str()));
        let created = self
            .client
            .create_checkpoint(CreateCheckpointRequest {
                storage: Some(self.storage.clone()),
                namespace: self.namespace.clone(),
                container: container.to_string(),
                labels,
                parent: parent.unwrap_or_default(),
                compression: "zstd".into(),
                memory_limit: rule.checkpoint.memory_limit,
                fs_only: rule.checkpoint.fs_only,
                ..Default::default()
            })
            .await
            .map_err(|status| CliError::rpc(format!("checkpoint of container {container}"), status))?;
        Ok(created.into_inner().id)
    }

    /// The rule's merge, then its prune; returns how many failed.
    async fn retain(&mut self, container: &str, rule: &Rule) -> usize {
        let mut failures = 0;
        if let Some((merge, from)) = merge_after(rule, self.automerge.as_ref()) {
            let strategy = merge.strategy.clone();
            let merged = self
                .client
                .merge_checkpoints(MergeCheckpointsRequest {
                    storage: Some(self.storage.clone()),
                    namespace: self.namespace.clone(),
                    container: container.to_string(),
                    strategy: merge.strategy,
                    keep_daily: merge.keep_daily,
                    has_keep_daily: merge.has_keep_daily,
                    keep_hourly: merge.keep_hourly,
                    has_keep_hourly: merge.has_keep_hourly,
                    retain_labels: merge.retain_labels,
                    aggressive: merge.aggressive,
                    dry_run: false,
                })
                .await;
            match merged {
                Ok(plan) => {
                    let plan = plan.into_inner();
                    tracing::info!(
                        container = %container,
                        strategy = %strategy,
                        rules = from,
                        "merge: {} merged, {} kept, {} freed",
                        plan.merged.len(),
                        plan.kept.len(),
                        human_size(plan.freed_bytes)
                    );
                }
                Err(status) => {
                    failures += 1;
                    tracing::warn!(container = %container, rules = from, "merge failed: {}", status.message());
                }
            }
        }
        if let Some(prune) = &rule.prune {
            let max_storage = prune.max_storage.map(|s| s.0);
            let pruned = self
                .client
                .prune_checkpoints(PruneCheckpointsRequest {
                    storage: Some(self.storage.clone()),
                    namespace: self.namespace.clone(),
                    container: container.to_string(),
                    keep_latest: prune.keep_latest.unwrap_or(0),
                    has_keep_latest: prune.keep_latest.is_some(),
                    keep_days: prune.keep_days.unwrap_or(0),
                    has_keep_days: prune.keep_days.is_some(),
                    exclude_labels: prune.exclude_labels.clone(),
                    max_storage: max_storage.unwrap_or(0),
                    has_max_storage: max_storage.is_some(),
                    prune_dangling: prune.prune_dangling,
                    dry_run: false,
                })
                .await;
            match pruned {
                Ok(plan) => {
                    let plan = plan.into_inner();
                    tracing::info!(
                        container = %container,
                        "prune: {} removed, {} freed",
                        plan.removed.len(),
                        human_size(plan.freed_bytes)
                    );
                }
                Err(status) => {
                    failures += 1;
                    tracing::warn!(container = %container, "prune failed: {}", status.message());
                }
            }
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_without_merge_merges_as_the_config_automerge_says() {
        let defaults = Defaults {
            check_interval: Duration::from_secs(300),
            cpu_threshold: 80.0,
            mem_threshold: 90.0,
        };
        let policy = Policy::parse(
            "containers:\n- {id: a, merge: {strategy: tagged}}\n- {id: b}\n",
            "p.yaml",
            &defaults,
        )
        .unwrap();
        let (own, plain) = (&policy.rules[0], &policy.rules[1]);
        let automerge = crate::settings::AutomergeSettings {
            strategy: Some("incremental".into()),
            ..Default::default()
        }
        .rules();
        let (rules, from) = merge_after(own, automerge.as_ref()).unwrap();
        assert_eq!((rules.strategy.as_str(), from), ("tagged", "policy"));
        let (rules, from) = merge_after(plain, automerge.as_ref()).unwrap();
        assert_eq!((rules.strategy.as_str(), from), ("incremental", "automerge"));
        assert!(merge_after(plain, None).is_none());
    }

    const SECOND: u64 = 1_000_000_000;

    fn limits(cpu: f64, interval: Option<u64>) -> Limits {
        Limits {
            cpu_threshold: cpu,
            mem_threshold: 90.0,
            hysteresis: 10.0,
            interval: interval.map(Duration::from_secs),
        }
    }

    /// A container sampled every second from t=0 at the given CPU percents
    /// (of one CPU), with 100 MiB of a 1 GiB limit.
    struct Feed {
        watch: Watch,
        limits: Limits,
        at: u64,
        cpu_ns: u64,
    }

    impl Feed {
        fn new(limits: Limits) -> Feed {
            Feed {
                watch: Watch::new(0, None),
                limits,
                at: 0,
                cpu_ns: 0,
            }
        }

        fn usage(&self, memory_bytes: u64) -> Usage {
            Usage {
                cpu_usage_ns: self.cpu_ns,
                sampled_unix_ns: self.at,
                memory_bytes,
                memory_limit_bytes: 1 << 30,
            }
        }

        /// One sample after a second at `cpu` percent; a checkpoint is
        /// taken (and succeeds) whenever one is decided.
        fn tick(&mut self, cpu: f64) -> Decision {
            self.tick_with_memory(cpu, 100 << 20)
        }

        fn tick_with_memory(&mut self, cpu: f64, memory_bytes: u64) -> Decision {
            self.at += SECOND;
            self.cpu_ns += (cpu / 100.0 * SECOND as f64) as u64;
            let usage = self.usage(memory_bytes);
            let decision = self.watch.observe(usage, &self.limits);
            if decision.reason.is_some() {
                self.watch
                    .taken(&decision, usage.sampled_unix_ns, format!("cp-{}", self.at / SECOND));
            }
            decision
        }

        fn reasons(&mut self, cpus: &[f64]) -> Vec<Option<Reason>> {
            cpus.iter().map(|&cpu| self.tick(cpu).reason).collect()
        }
    }

    #[test]
    fn a_container_that_stays_hot_is_checkpointed_once() {
        let mut feed = Feed::new(limits(50.0, None));
        let first = feed.tick(100.0);
        assert_eq!(first.reason, None);
        assert!(first.detail.starts_with("cpu n/a (first sample)"), "{}", first.detail);
        let hot = feed.tick(97.3);
        assert_eq!(hot.reason, Some(Reason::Cpu));
        assert_eq!(hot.detail, "cpu 97.3% >= 50% (armed), memory 9.8% < 90%");
        // The window after the checkpoint is not measured, the rest stay hot.
        let after = feed.tick(10.0);
        assert!(
            after.detail.starts_with("cpu n/a (after a checkpoint)"),
            "{}",
            after.detail
        );
        let still = feed.tick(99.0);
        assert_eq!(still.reason, None);
        assert!(
            still.detail.starts_with("cpu 99.0% >= 50% (disarmed until < 40%)"),
            "{}",
            still.detail
        );
        assert_eq!(feed.reasons(&[100.0; 20]), vec![None; 20]);
    }

    #[test]
    fn a_threshold_rearms_only_below_the_hysteresis() {
        let mut feed = Feed::new(limits(50.0, None));
        let reasons = feed.reasons(&[0.0, 80.0, 0.0, 80.0, 45.0, 41.0, 40.0, 49.9, 50.0]);
        assert_eq!(
            reasons,
            [None, Some(Reason::Cpu), None, None, None, None, None, None, None],
            "dipping to 45% and 41% is not cooling down; 40.0 is not below 40"
        );
        let cooled = feed.tick(39.9);
        assert_eq!(cooled.reason, None);
        assert!(
            cooled.detail.starts_with("cpu 39.9% < 40% (re-armed)"),
            "{}",
            cooled.detail
        );
        let armed = feed.tick(20.0);
        assert!(armed.detail.starts_with("cpu 20.0% < 50%,"), "{}", armed.detail);
        assert_eq!(feed.tick(50.0).reason, Some(Reason::Cpu));
    }

    #[test]
    fn a_failed_checkpoint_leaves_the_threshold_armed() {
        let mut watch = Watch::new(0, None);
        let limits = limits(50.0, None);
        let at = |s: u64, cpu_s: u64| Usage {
            cpu_usage_ns: cpu_s * SECOND,
            sampled_unix_ns: s * SECOND,
            memory_bytes: 0,
            memory_limit_bytes: 1 << 30,
        };
        watch.observe(at(1, 0), &limits);
        // Decided, but never taken: the next hot sample decides again.
        assert_eq!(watch.observe(at(2, 1), &limits).reason, Some(Reason::Cpu));
        assert_eq!(watch.observe(at(3, 2), &limits).reason, Some(Reason::Cpu));
        assert_eq!(watch.last_checkpoint, None);
    }

    #[test]
    fn memory_triggers_on_its_own_threshold_with_the_same_hysteresis() {
        let mut feed = Feed::new(limits(50.0, None));
        let gib = 1u64 << 30;
        let full = feed.tick_with_memory(0.0, gib * 95 / 100);
        assert_eq!(full.reason, Some(Reason::Memory), "memory needs no previous sample");
        assert!(full.detail.contains("memory 95.0% >= 90% (armed)"), "{}", full.detail);
        assert_eq!(feed.tick_with_memory(0.0, gib * 92 / 100).reason, None);
        assert_eq!(feed.tick_with_memory(0.0, gib * 85 / 100).reason, None);
        let low = feed.tick_with_memory(0.0, gib * 50 / 100);
        assert!(low.detail.contains("memory 50.0% < 80% (re-armed)"), "{}", low.detail);
        assert_eq!(feed.tick_with_memory(0.0, gib).reason, Some(Reason::Memory));
        let no_limit = Watch::new(0, None).observe(
            Usage {
                memory_limit_bytes: 0,
                ..feed.usage(1)
            },
            &feed.limits,
        );
        assert!(
            no_limit.detail.contains("memory n/a (no limit known)"),
            "{}",
            no_limit.detail
        );
    }

    #[test]
    fn intervals_count_from_the_last_checkpoint_of_any_reason() {
        let mut feed = Feed::new(limits(50.0, Some(2)));
        // t=1: not yet; t=2: due; t=3: 1 s since; t=4: due again.
        let reasons = feed.reasons(&[0.0, 0.0, 0.0, 0.0]);
        assert_eq!(reasons, [None, Some(Reason::Interval), None, Some(Reason::Interval)]);
        let waiting = feed.tick(0.0);
        assert!(
            waiting.detail.ends_with("interval 2s not due (1.0s left)"),
            "{}",
            waiting.detail
        );

        // A CPU checkpoint at t=2 restarts a 3 s interval: due at 5, not 3.
        let mut feed = Feed::new(limits(50.0, Some(3)));
        let reasons = feed.reasons(&[0.0, 90.0, 90.0, 90.0, 90.0]);
        assert_eq!(reasons, [None, Some(Reason::Cpu), None, None, Some(Reason::Interval)]);
        assert_eq!(feed.watch.last_checkpoint.as_deref(), Some("cp-5"));
    }

    #[test]
    fn a_threshold_wins_over_a_due_interval_and_both_disarm() {
        let mut feed = Feed::new(limits(50.0, Some(3)));
        assert_eq!(feed.reasons(&[0.0, 0.0]), [None, None]);
        let both = feed.tick_with_memory(100.0, 1 << 30);
        assert_eq!(both.reason, Some(Reason::Cpu));
        assert_eq!(both.crossed, [Reason::Cpu, Reason::Memory]);
        assert!(both.detail.ends_with("interval 3s due"), "{}", both.detail);
        assert_eq!(feed.tick_with_memory(100.0, 1 << 30).reason, None);
        assert_eq!(feed.tick_with_memory(100.0, 1 << 30).reason, None);
        let next = feed.tick_with_memory(100.0, 1 << 30);
        assert_eq!(next.reason, Some(Reason::Interval), "{}", next.detail);
        assert!(next.crossed.is_empty());
        assert!(
            next.detail
                .starts_with("cpu 100.0% >= 50% (disarmed until < 40%), memory 100.0% >= 90% (disarmed until < 80%)"),
            "{}",
            next.detail
        );
    }

    #[test]
    fn a_restarted_container_starts_a_new_cpu_window() {
        let mut watch = Watch::new(0, None);
        let limits = limits(50.0, None);
        let at = |s: u64, cpu_ns: u64| Usage {
            cpu_usage_ns: cpu_ns,
            sampled_unix_ns: s * SECOND,
            memory_bytes: 0,
            memory_limit_bytes: 1 << 30,
        };
        watch.observe(at(1, 50 * SECOND), &limits);
        let reset = watch.observe(at(2, SECOND), &limits);
        assert_eq!(reset.reason, None);
        assert!(reset.detail.starts_with("cpu n/a (counter reset)"), "{}", reset.detail);
        assert_eq!(watch.observe(at(3, 2 * SECOND), &limits).reason, Some(Reason::Cpu));
    }

    #[test]
    fn thresholds_and_durations_print_as_written() {
        assert_eq!(percent(80.3 - 10.0), "70.3");
        assert_eq!(percent(50.0), "50");
        assert_eq!(duration_text(Duration::from_secs(7200)), "2h");
        assert_eq!(duration_text(Duration::from_secs(300)), "5m");
        assert_eq!(duration_text(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn flags_default_as_the_issue_says() {
        use clap::Parser;

        #[derive(Debug, Parser)]
        struct Automanage {
            #[command(flatten)]
            args: Args,
        }
        let args = Automanage::try_parse_from(["automanage"]).unwrap().args;
        assert_eq!(
            args.defaults().unwrap(),
            Defaults {
                check_interval: Duration::from_secs(300),
                cpu_threshold: 80.0,
                mem_threshold: 90.0,
            }
        );
        assert_eq!(args.load_policy().unwrap().rules[0].name, "all running containers");
        let bad = Automanage::try_parse_from(["automanage", "--cpu-threshold", "120%"])
            .unwrap()
            .args;
        let err = bad.defaults().unwrap_err();
        assert!(matches!(err, CliError::Usage(_)), "{err:?}");
        assert!(err.to_string().starts_with("--cpu-threshold: "), "{err}");
        assert!(Automanage::try_parse_from(["automanage", "--once", "--daemonize"]).is_err());
        assert!(Automanage::try_parse_from(["automanage", "--log-file", "/tmp/x"]).is_err());
    }
}
