//! The order of one container's commit jobs. A commit is accepted while the
//! container's earlier jobs still build or push: it takes a place in the
//! container's line before the container is paused (a full line refuses it
//! untouched), enters the line once captured, and its job waits for the
//! one captured before it, so each builds on the capture before its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::CommitError;

type Lines = Arc<Mutex<HashMap<String, Line>>>;

/// Every container's line, by "<namespace>/<container id>".
#[derive(Debug)]
pub(super) struct Queues {
    /// Jobs that may wait behind the one running.
    max_waiting: usize,
    lines: Lines,
}

#[derive(Debug, Default)]
struct Line {
    /// Jobs placed and not yet ended, the running one included.
    jobs: usize,
    /// The last job that entered: its snapshot id, and the end of its turn.
    last: Option<(String, oneshot::Receiver<()>)>,
}

/// A job's place in its container's line, before its capture.
#[derive(Debug)]
pub(super) struct Place {
    lines: Lines,
    key: String,
}

/// A job in its container's line: [`Turn::wait`] returns when the job
/// before it has ended; dropping the turn lets the next one go.
#[derive(Debug)]
pub(super) struct Turn {
    _place: Place,
    before: Option<(String, oneshot::Receiver<()>)>,
    _done: oneshot::Sender<()>,
}

fn lock(lines: &Lines) -> std::sync::MutexGuard<'_, HashMap<String, Line>> {
    // A panic while holding this lock leaves only counts behind.
    lines.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Queues {
    pub(super) fn new(max_waiting: usize) -> Queues {
        Queues {
            max_waiting,
            lines: Arc::default(),
        }
    }

    /// A place in line `key` for a job of `container`, unless
    /// `max_waiting` jobs already wait there.
    pub(super) fn reserve(&self, key: &str, container: &str) -> Result<Place, CommitError> {
        let mut lines = lock(&self.lines);
        let line = lines.entry(key.to_string()).or_default();
        // One job runs; the others wait.
        let waiting = line.jobs.saturating_sub(1);
        if line.jobs > 0 && waiting >= self.max_waiting {
            return Err(CommitError::QueueFull {
                container: container.to_string(),
                queued: waiting,
            });
        }
        line.jobs += 1;
        Ok(Place {
            lines: self.lines.clone(),
            key: key.to_string(),
        })
    }

    /// Jobs placed in line `key` and not yet ended.
    #[cfg(test)]
    fn jobs(&self, key: &str) -> usize {
        lock(&self.lines).get(key).map_or(0, |line| line.jobs)
    }
}

impl Place {
    /// Enters the line as job `snapshot_id`, behind the last job that
    /// entered.
    pub(super) fn enter(self, snapshot_id: &str) -> Turn {
        let (done, end) = oneshot::channel();
        let before = {
            let mut lines = lock(&self.lines);
            let line = lines.entry(self.key.clone()).or_default();
            line.last.replace((snapshot_id.to_string(), end))
        };
        Turn {
            _place: self,
            before,
            _done: done,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut lines = lock(&self.lines);
        if let Some(line) = lines.get_mut(&self.key) {
            line.jobs = line.jobs.saturating_sub(1);
            if line.jobs == 0 {
                lines.remove(&self.key);
            }
        }
    }
}

impl Turn {
    /// The snapshot id of the job this one waits for, if any.
    pub(super) fn before(&self) -> Option<&str> {
        self.before.as_ref().map(|(id, _)| id.as_str())
    }

    /// Returns once the job before this one has ended (at once if none).
    pub(super) async fn wait(&mut self) {
        if let Some((_, end)) = self.before.as_mut() {
            // The sender is only ever dropped: an error is the signal.
            let _ = end.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn jobs_of_a_container_run_in_order_and_a_full_line_refuses() {
        let queues = Queues::new(2);
        let mut first = queues.reserve("ns/c", "c").unwrap().enter("s1");
        let mut second = queues.reserve("ns/c", "c").unwrap().enter("s2");
        let third = queues.reserve("ns/c", "c").unwrap();
        // Two wait behind the running one: the line is full.
        let refused = queues.reserve("ns/c", "c").unwrap_err();
        assert!(matches!(refused, CommitError::QueueFull { queued: 2, .. }), "{refused}");
        assert_eq!(refused.code(), super::super::CommitCode::SnapshotInProgress);
        // Another container has its own line.
        let other = queues.reserve("ns/d", "d").unwrap().enter("s9");
        assert_eq!(other.before(), None);

        assert_eq!(first.before(), None);
        first.wait().await;
        assert_eq!(second.before(), Some("s1"));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), second.wait())
                .await
                .is_err(),
            "the second waits while the first runs"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second.wait())
            .await
            .expect("the second goes once the first ended");

        let mut third = third.enter("s3");
        assert_eq!(third.before(), Some("s2"));
        drop(second);
        third.wait().await;
        assert_eq!(queues.jobs("ns/c"), 1);
        drop(third);
        assert_eq!(queues.jobs("ns/c"), 0, "an empty line is forgotten");
    }

    #[tokio::test]
    async fn a_place_given_up_before_entering_frees_it() {
        let queues = Queues::new(1);
        let running = queues.reserve("ns/c", "c").unwrap().enter("s1");
        let place = queues.reserve("ns/c", "c").unwrap();
        assert!(queues.reserve("ns/c", "c").is_err());
        // Its capture failed.
        drop(place);
        let mut next = queues.reserve("ns/c", "c").unwrap().enter("s2");
        assert_eq!(next.before(), Some("s1"));
        drop(running);
        next.wait().await;
    }
}
