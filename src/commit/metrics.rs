//! Commit metrics, computed from the persisted jobs so they survive restarts:
//! counts by state, and summaries of pause, commit-call and background
//! times. Renders the Prometheus text format with the seamless-commit
//! reference's names (`nydus_seamless_snapshots_total{status="success"}`,
//! quantiles 0.5, 0.95 and 0.99); owns no state of its own.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

use crate::commit::{Job, JobState};

/// Quantiles reported for every summary.
pub const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Quantile -> seconds, in [`QUANTILES`] order.
    pub quantiles: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: u64,
}

impl Summary {
    pub fn of(mut samples: Vec<f64>) -> Summary {
        samples.sort_by(|a, b| a.total_cmp(b));
        let quantiles = QUANTILES.iter().map(|q| (*q, nearest_rank(&samples, *q))).collect();
        Summary {
            sum: samples.iter().sum(),
            count: samples.len() as u64,
            quantiles,
        }
    }

    /// The mean in seconds; 0 when there is no sample.
    pub fn mean(&self) -> f64 {
        match self.count {
            0 => 0.0,
            n => self.sum / n as f64,
        }
    }
}

/// The nearest-rank quantile of sorted `samples`; 0 when empty.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CommitMetrics {
    pub pending: u64,
    pub processing: u64,
    pub completed: u64,
    pub failed: u64,
    pub pause_time_seconds: Summary,
    /// The commit call's own time, request to started job (jobs recorded
    /// before it was measured have none).
    pub total_time_seconds: Summary,
    pub background_time_seconds: Summary,
}

impl CommitMetrics {
    pub fn of(jobs: &[Job]) -> CommitMetrics {
        let mut m = CommitMetrics::default();
        let mut pauses = Vec::new();
        let mut totals = Vec::new();
        let mut background = Vec::new();
        for job in jobs {
            match job.state {
                JobState::Pending => m.pending += 1,
                JobState::Processing => m.processing += 1,
                JobState::Completed => m.completed += 1,
                JobState::Failed => m.failed += 1,
            }
            pauses.push(job.pause.as_secs_f64());
            if !job.total.is_zero() {
                totals.push(job.total.as_secs_f64());
            }
            if let Some(ended) = job.ended {
                let took = ended.duration_since(job.started).unwrap_or(Duration::ZERO);
                background.push(took.as_secs_f64());
            }
        }
        m.pause_time_seconds = Summary::of(pauses);
        m.total_time_seconds = Summary::of(totals);
        m.background_time_seconds = Summary::of(background);
        m
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP nydus_seamless_snapshots_total Seamless commits by job status.\n");
        out.push_str("# TYPE nydus_seamless_snapshots_total counter\n");
        for (status, n) in [
            ("success", self.completed),
            ("failed", self.failed),
            ("pending", self.pending),
            ("processing", self.processing),
        ] {
            let _ = writeln!(out, "nydus_seamless_snapshots_total{{status=\"{status}\"}} {n}");
        }
        summary(
            &mut out,
            "nydus_seamless_pause_time_seconds",
            "Time containers were frozen by a seamless commit, freeze request to thaw.",
            &self.pause_time_seconds,
        );
        summary(
            &mut out,
            "nydus_seamless_total_time_seconds",
            "Time a seamless commit call took, request to started background job.",
            &self.total_time_seconds,
        );
        summary(
            &mut out,
            "nydus_seamless_background_time_seconds",
            "Time from a commit's capture to the end of its background build and push.",
            &self.background_time_seconds,
        );
        out
    }
}

fn summary(out: &mut String, name: &str, help: &str, s: &Summary) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} summary");
    for (q, v) in &s.quantiles {
        let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
    }
    let _ = writeln!(out, "{name}_sum {}", s.sum);
    let _ = writeln!(out, "{name}_count {}", s.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let s = Summary::of((1..=100).map(f64::from).collect());
        assert_eq!(s.quantiles, vec![(0.5, 50.0), (0.95, 95.0), (0.99, 99.0)]);
        assert_eq!((s.count, s.sum), (100, 5050.0));
        assert_eq!(s.mean(), 50.5);
        assert_eq!(Summary::of(vec![]).mean(), 0.0);
        let empty = Summary::of(vec![]);
        assert_eq!(empty.quantiles[0], (0.5, 0.0));
        assert_eq!(Summary::of(vec![3.0]).quantiles[2], (0.99, 3.0));
    }

    #[test]
    fn prometheus_text_names_every_series() {
        let m = CommitMetrics {
            completed: 2,
            failed: 1,
            pause_time_seconds: Summary::of(vec![0.002, 0.004]),
            ..Default::default()
        };
        let text = m.prometheus();
        assert!(
            text.contains("nydus_seamless_snapshots_total{status=\"success\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("nydus_seamless_snapshots_total{status=\"failed\"} 1\n"));
        assert!(text.contains("# TYPE nydus_seamless_pause_time_seconds summary\n"));
        assert!(text.contains("nydus_seamless_pause_time_seconds{quantile=\"0.99\"} 0.004\n"));
        assert!(text.contains("nydus_seamless_pause_time_seconds{quantile=\"0.95\"} 0.004\n"));
        assert!(
            !text.contains("status=\"completed\""),
            "the reference's label is success"
        );
        assert!(text.contains("nydus_seamless_total_time_seconds_count 0\n"));
        assert!(text.contains("nydus_seamless_pause_time_seconds_count 2\n"));
        assert!(text.contains("nydus_seamless_background_time_seconds_count 0\n"));
    }
}
