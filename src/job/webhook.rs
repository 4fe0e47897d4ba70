//! A job's webhook and its deliveries: which state changes are reported, and where each
//! notification stands. The rule of what gets a delivery lives here, once, so that every store
//! writes the same outbox rows in the same transaction as the state they report.

use std::{fmt, str::FromStr, time::SystemTime};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Job, JobId, JobState, UnknownState};

/// Which state changes of a job its webhook reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WebhookEvents {
    /// Only the terminal state: one delivery per job.
    #[default]
    Terminal,
    /// Every change of the job's state (not progress, not an action's state alone), from the
    /// QUEUED of its submission on.
    All,
}

/// Where a job's state changes are POSTed, validated at the edge.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookSpec {
    /// An absolute http(s) URL.
    pub url: String,
    /// The key that signs deliveries. Kept in the stored snapshot (a restarted server must
    /// still sign) but never shown on the wire.
    pub secret: String,
    /// Which changes to report.
    #[serde(default)]
    pub events: WebhookEvents,
}

impl fmt::Debug for WebhookSpec {
    // By hand, so that the secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .finish()
    }
}

/// A delivery to be written with a snapshot: its id and what it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewDelivery {
    /// The delivery id: a UUIDv7 made when the snapshot is written.
    pub id: Uuid,
    /// The job state reported.
    pub job_state: JobState,
    /// The job version reported.
    pub job_version: i64,
}

/// The delivery that storing `job` must write in the same transaction, if any: when `job` is a
/// logged snapshot (a transition) whose webhook subscribes to the state it reaches, and that
/// state differs from `previous` (the stored state; `None` when the job is being created).
///
/// Terminal-only webhooks get exactly one delivery (a terminal state is reached once); ALL
/// webhooks get one for each change of the job's own state, including the QUEUED at creation
/// and the QUEUED before each retry.
pub fn delivery_for(previous: Option<JobState>, job: &Job) -> Option<NewDelivery> {
    let webhook = job.webhook.as_ref()?;
    if job.logged_version != job.version || previous == Some(job.state) {
        return None;
    }
    let wanted = match webhook.events {
        WebhookEvents::Terminal => job.state.is_terminal(),
        WebhookEvents::All => true,
    };
    wanted.then(|| NewDelivery {
        id: Uuid::now_v7(),
        job_state: job.state,
        job_version: job.version,
    })
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Waiting for its first attempt or for a retry.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// Every allowed attempt failed.
    Dead,
}

impl DeliveryState {
    /// The name stored and shown: `PENDING`, `DELIVERED`, `DEAD`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "PENDING",
            DeliveryState::Delivered => "DELIVERED",
            DeliveryState::Dead => "DEAD",
        }
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeliveryState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PENDING" => Ok(DeliveryState::Pending),
            "DELIVERED" => Ok(DeliveryState::Delivered),
            "DEAD" => Ok(DeliveryState::Dead),
            other => Err(UnknownState(other.to_owned())),
        }
    }
}

/// One notification of one state change of a job, as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The delivery id, the same on every attempt.
    pub id: Uuid,
    /// The job.
    pub job_id: JobId,
    /// The job state reported.
    pub job_state: JobState,
    /// The job version reported.
    pub job_version: i64,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// Why the last failed attempt failed.
    pub last_error: Option<String>,
    /// When the next attempt is due, while pending.
    pub next_attempt_at: Option<SystemTime>,
    /// When a receiver accepted it.
    pub delivered_at: Option<SystemTime>,
    /// When it was written, with the state it reports.
    pub created_at: SystemTime,
}

impl Delivery {
    /// The outbox row for `new`, reporting `job`: pending, due at once, created at the
    /// job's update time (the moment of the change it reports).
    pub fn pending(new: NewDelivery, job: &Job) -> Self {
        Self {
            id: new.id,
            job_id: job.id,
            job_state: new.job_state,
            job_version: new.job_version,
            state: DeliveryState::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_at: Some(job.update_time),
            delivered_at: None,
            created_at: job.update_time,
        }
    }
}

/// How one delivery attempt ended, as recorded in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx at this time.
    Delivered {
        /// When.
        at: SystemTime,
    },
    /// The attempt failed; try again at `retry_at`.
    Retry {
        /// When the next attempt is due.
        retry_at: SystemTime,
        /// Why this one failed.
        error: String,
    },
    /// The attempt failed and was the last one allowed.
    Dead {
        /// Why it failed.
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobError, NewAction, NewJob};

    fn job(events: Option<WebhookEvents>) -> Job {
        let spec = NewJob {
            actions: vec![NewAction {
                name: "echo".into(),
                params: Default::default(),
                input: Default::default(),
            }],
            webhook: events.map(|events| WebhookSpec {
                url: "https://example.com/hook".into(),
                secret: "s".into(),
                events,
            }),
            ..NewJob::default()
        };
        Job::new(JobId::generate(), spec, 1, SystemTime::now())
    }

    #[test]
    fn terminal_webhooks_report_only_the_end() {
        let now = SystemTime::now();
        let mut job = job(Some(WebhookEvents::Terminal));
        assert_eq!(delivery_for(None, &job), None);
        job.start(now).unwrap();
        assert_eq!(delivery_for(Some(JobState::Queued), &job), None);
        job.fail(JobError::new("INTERNAL", "X", "x"), now).unwrap();
        let delivery = delivery_for(Some(JobState::Running), &job).unwrap();
        assert_eq!(delivery.job_state, JobState::Failed);
        assert_eq!(delivery.job_version, job.version);
    }

    #[test]
    fn all_webhooks_report_each_change_of_the_job_state_only() {
        let now = SystemTime::now();
        let mut job = job(Some(WebhookEvents::All));
        assert_eq!(
            delivery_for(None, &job).map(|d| d.job_state),
            Some(JobState::Queued)
        );
        job.start(now).unwrap();
        assert!(delivery_for(Some(JobState::Queued), &job).is_some());
        // An action's own transition is logged but leaves the job RUNNING.
        job.start_action(0, now).unwrap();
        assert_eq!(delivery_for(Some(JobState::Running), &job), None);
        // Progress is not a transition.
        assert!(job.report_progress(0, crate::job::Progress::percent(5, ""), now));
        assert_eq!(delivery_for(Some(JobState::Queued), &job), None);
    }

    #[test]
    fn snapshots_round_trip_and_old_ones_without_a_webhook_still_decode() {
        let with = job(Some(WebhookEvents::All));
        let text = serde_json::to_string(&with).unwrap();
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), with);

        let without = job(None);
        let mut value = serde_json::to_value(&without).unwrap();
        assert!(value.get("webhook").is_none(), "not written when absent");
        value.as_object_mut().unwrap().remove("webhook");
        assert_eq!(serde_json::from_value::<Job>(value).unwrap(), without);
    }

    #[test]
    fn jobs_without_a_webhook_get_no_delivery() {
        assert_eq!(delivery_for(None, &job(None)), None);
    }

    #[test]
    fn the_secret_stays_out_of_debug_output() {
        let spec = WebhookSpec {
            url: "https://example.com".into(),
            secret: "hunter2".into(),
            events: WebhookEvents::All,
        };
        assert!(!format!("{spec:?}").contains("hunter2"));
    }
}
