//! The job and its actions, and every change a job can go through. Each change bumps the
//! job's version; changes of state are also marked as *logged*, so stores keep them in the
//! per-job transition log that watchers resume from.

use std::{
    collections::BTreeMap,
    fmt,
    str::FromStr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{
    ActionState, IllegalTransition, JobState, TraceContext, WebhookSpec,
    encoding::{base64_bytes, is_default, opt_unix_nanos, unix_nanos},
};

/// How many progress-only versions a running job may be ahead of its stored snapshot: the
/// executor persists progress at least this often, so a restart can skip past them.
pub const MAX_UNPERSISTED_VERSIONS: i64 = 1000;

/// The tenant of every job when authentication is off, and of jobs stored before tenants
/// existed.
pub const DEFAULT_TENANT: &str = "default";

fn default_tenant() -> String {
    DEFAULT_TENANT.to_owned()
}

/// A job id: a UUIDv7, so ids sort by submission time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    /// A new id for a job submitted now.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl From<Uuid> for JobId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl JobId {
    /// The id as sent: hyphenated lower-case hex, as [`fmt::Display`] writes it, without going
    /// through a formatter (every snapshot sent carries one).
    pub fn to_wire(&self) -> String {
        let mut buffer = uuid::Uuid::encode_buffer();
        self.0.hyphenated().encode_lower(&mut buffer).to_owned()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s).map(Self)
    }
}

/// How far a job or an action has got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Percent done, 0 to 100.
    pub percent: u8,
    /// What is being done now.
    pub message: String,
    /// Units done, when the handler counts units.
    pub current: u64,
    /// Units in all, when known.
    pub total: u64,
}

impl Progress {
    /// Progress of `current` out of `total` units, with the percent derived from them.
    pub fn of(current: u64, total: u64, message: impl Into<String>) -> Self {
        let percent = current
            .min(total)
            .saturating_mul(100)
            .checked_div(total)
            .unwrap_or(0) as u8;
        Self {
            percent,
            message: message.into(),
            current,
            total,
        }
    }

    /// Progress at `percent` (clamped to 100) with a message.
    pub fn percent(percent: u8, message: impl Into<String>) -> Self {
        Self {
            percent: percent.min(100),
            message: message.into(),
            current: 0,
            total: 0,
        }
    }

    /// Complete progress.
    pub fn done() -> Self {
        Self::percent(100, "")
    }
}

/// Why a job or an action failed: data the client reads, never an RPC error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// The canonical gRPC status code name that fits best, e.g. `INTERNAL`.
    pub code: String,
    /// A machine-readable reason in UPPER_SNAKE_CASE, e.g. `TIMEOUT`.
    pub reason: String,
    /// A human-readable explanation.
    pub message: String,
    /// Further structured details.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
}

impl fmt::Display for JobError {
    /// `CODE/REASON: message`, as a log line would want it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}: {}", self.code, self.reason, self.message)
    }
}

/// The longest error message kept, in bytes; longer ones are cut.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
/// The largest error details kept, as sent (see [`super::wire_size`]); larger ones are
/// replaced by a note saying how large they were.
pub const MAX_ERROR_DETAILS_BYTES: usize = 8192;
/// The longest error reason kept, in bytes.
const MAX_ERROR_NAME_BYTES: usize = 128;

/// The gRPC status code a canonical code name (`DEADLINE_EXCEEDED`) stands for; `None` for
/// any other text. The one table of the names: errors are checked and mapped against it.
pub fn status_code(name: &str) -> Option<tonic::Code> {
    use tonic::Code;
    Some(match name {
        "OK" => Code::Ok,
        "CANCELLED" => Code::Cancelled,
        "UNKNOWN" => Code::Unknown,
        "INVALID_ARGUMENT" => Code::InvalidArgument,
        "DEADLINE_EXCEEDED" => Code::DeadlineExceeded,
        "NOT_FOUND" => Code::NotFound,
        "ALREADY_EXISTS" => Code::AlreadyExists,
        "PERMISSION_DENIED" => Code::PermissionDenied,
        "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
        "FAILED_PRECONDITION" => Code::FailedPrecondition,
        "ABORTED" => Code::Aborted,
        "OUT_OF_RANGE" => Code::OutOfRange,
        "UNIMPLEMENTED" => Code::Unimplemented,
        "INTERNAL" => Code::Internal,
        "UNAVAILABLE" => Code::Unavailable,
        "DATA_LOSS" => Code::DataLoss,
        "UNAUTHENTICATED" => Code::Unauthenticated,
        _ => return None,
    })
}

/// Whether `name` is the canonical name of an error's code: any status code's but `OK` (an
/// error is never OK).
pub fn is_error_code_name(name: &str) -> bool {
    status_code(name).is_some_and(|code| code != tonic::Code::Ok)
}

/// Whether two webhook URLs are the same once normalized: a Submit stores the URL as parsed,
/// while a job stored before that (or submitted in-process) holds it as written.
fn same_url(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (url::Url::parse(a), url::Url::parse(b)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// The canonical code name `code` spells, in any case; `None` for any other text.
fn canonical_code(code: &str) -> Option<String> {
    let name = code.trim().to_ascii_uppercase();
    is_error_code_name(&name).then_some(name)
}

impl JobError {
    /// This error within the sizes a job keeps: a handler's error is repeated in every
    /// snapshot of its job from then on, which must still fit in one response.
    pub fn bounded(mut self) -> Self {
        let cut = |text: &mut String, max: usize| {
            if text.len() > max {
                *text = super::truncate(text, max);
            }
        };
        // Clients map the code to a status (Operations' `error.code`, the CLI's exit code):
        // a name that is none gets the one meant for an error of no known kind.
        self.code = canonical_code(&self.code).unwrap_or_else(|| "UNKNOWN".to_owned());
        cut(&mut self.reason, MAX_ERROR_NAME_BYTES);
        cut(&mut self.message, MAX_ERROR_MESSAGE_BYTES);
        // Depth first: measuring the size walks all of it.
        let dropped =
            if let Some(path) = super::fields_too_deep(&self.details, super::MAX_RESULT_DEPTH) {
                Some(format!(
                    "details{path} nested deeper than the {} levels kept",
                    super::MAX_RESULT_DEPTH
                ))
            } else {
                let size: usize = self
                    .details
                    .iter()
                    .map(|(key, value)| key.len() + super::wire_size(value))
                    .sum();
                (size > MAX_ERROR_DETAILS_BYTES).then(|| {
                    format!(
                        "the details were {size} bytes as sent, more than the \
                     {MAX_ERROR_DETAILS_BYTES} kept"
                    )
                })
            };
        if let Some(note) = dropped {
            self.details = Map::from_iter([("details_dropped".to_owned(), Value::String(note))]);
        }
        self
    }

    /// An error with no details.
    pub fn new(
        code: impl Into<String>,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            code: code.into(),
            reason: reason.into(),
            message: message.into(),
            details: Map::new(),
        }
    }
}

/// One action of a job to be submitted, already validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAction {
    /// The registered action to run.
    pub name: String,
    /// Its parameters, a JSON object.
    pub params: Map<String, Value>,
    /// Its binary input.
    #[serde(with = "base64_bytes")]
    pub input: Bytes,
}

/// A job to be submitted: what a Submit asks for. `Executor::submit` checks it against the
/// server's limits ([`SubmitLimits`](super::SubmitLimits)) and its actions against the
/// registry before anything is stored.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NewJob {
    /// The actions, in order; at least one.
    pub actions: Vec<NewAction>,
    /// A retried Submit with the same key returns the first job.
    pub idempotency_key: Option<String>,
    /// A time limit for each attempt.
    pub timeout: Option<Duration>,
    /// Attempts in all; `None` for the server's default.
    pub max_attempts: Option<u32>,
    /// Higher runs first.
    pub priority: i32,
    /// Labels to filter by.
    pub labels: BTreeMap<String, String>,
    /// Where to report the job's state changes, if anywhere.
    #[serde(default)]
    pub webhook: Option<WebhookSpec>,
    /// The tenant that owns the job; empty means [`DEFAULT_TENANT`].
    pub tenant: String,
    /// The trace context of the request that submitted it, if it carried a valid one.
    #[serde(
        default,
        deserialize_with = "super::trace::lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub trace: Option<TraceContext>,
    /// Run no earlier than this; `None` (or a time already past) to run as soon as a worker
    /// is free. A wall-clock time: a test that pauses tokio's clock still waits for the
    /// system clock to reach it.
    #[serde(
        with = "opt_unix_nanos",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub schedule_time: Option<SystemTime>,
}

impl NewJob {
    /// The first field in which this request asks for something other than `job` was
    /// submitted with, as a request field path (`actions[1].params`); `None` when it asks for
    /// the same job. What the server fills in is compared only when the request sets it
    /// (`max_attempts`), and a webhook's signing secret not at all, so that a retry of a
    /// Submit whose answer was lost always matches the job it created.
    pub fn first_difference(&self, job: &Job) -> Option<String> {
        first_difference(
            Asked {
                actions: &self.actions,
                priority: self.priority,
                labels: &self.labels,
                timeout: self.timeout,
                max_attempts: self.max_attempts,
                webhook: self.webhook.as_ref(),
                schedule_time: self.schedule_time,
            },
            job,
        )
    }
}

/// The fields of a Submit that [`NewJob::first_difference`] compares, whether read from the
/// request or from the job made of it ([`Job::first_difference_as_asked`]).
struct Asked<'a, A> {
    actions: &'a [A],
    priority: i32,
    labels: &'a BTreeMap<String, String>,
    timeout: Option<Duration>,
    max_attempts: Option<u32>,
    webhook: Option<&'a WebhookSpec>,
    schedule_time: Option<SystemTime>,
}

/// An action as a Submit asked for it: a [`NewAction`], or the [`Action`] made of one.
trait AskedAction {
    fn parts(&self) -> (&str, &Map<String, Value>, &Bytes);
}

impl AskedAction for NewAction {
    fn parts(&self) -> (&str, &Map<String, Value>, &Bytes) {
        (&self.name, &self.params, &self.input)
    }
}

impl AskedAction for Action {
    fn parts(&self) -> (&str, &Map<String, Value>, &Bytes) {
        (&self.name, &self.params, &self.input)
    }
}

fn first_difference<A: AskedAction>(asked: Asked<'_, A>, job: &Job) -> Option<String> {
    if asked.actions.len() != job.actions.len() {
        return Some("actions".to_owned());
    }
    for (i, (action, stored)) in asked.actions.iter().zip(&job.actions).enumerate() {
        let (name, params, input) = action.parts();
        let differs = if name != stored.name {
            "name"
        } else if *params != stored.params {
            "params"
        } else if *input != stored.input {
            "input"
        } else {
            continue;
        };
        return Some(format!("actions[{i}].{differs}"));
    }
    let webhook_differs = match (asked.webhook, &job.webhook) {
        (None, None) => false,
        (Some(asked), Some(stored)) => {
            !same_url(&asked.url, &stored.url) || asked.events != stored.events
        }
        _ => true,
    };
    let differs = if asked.priority != job.priority {
        "priority"
    } else if *asked.labels != job.labels {
        "labels"
    } else if asked.timeout != job.timeout {
        "timeout"
    } else if asked
        .max_attempts
        .is_some_and(|n| n.max(1) != job.max_attempts)
    {
        "max_attempts"
    } else if webhook_differs {
        "webhook"
    } else if asked.schedule_time != job.schedule_time {
        "schedule_time"
    } else {
        return None;
    };
    Some(differs.to_owned())
}

/// One action of a job, with its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// The registered action to run.
    pub name: String,
    /// Its parameters.
    pub params: Map<String, Value>,
    /// Its binary input.
    #[serde(
        with = "base64_bytes",
        default,
        skip_serializing_if = "Bytes::is_empty"
    )]
    pub input: Bytes,
    /// Its state.
    pub state: ActionState,
    /// Its own progress.
    #[serde(default, skip_serializing_if = "is_default")]
    pub progress: Progress,
    /// Its result, once it has succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed, was cancelled, or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// When it last started.
    #[serde(
        with = "opt_unix_nanos",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub start_time: Option<SystemTime>,
    /// When it last stopped.
    #[serde(
        with = "opt_unix_nanos",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub end_time: Option<SystemTime>,
}

/// A job: a snapshot at one version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Its state.
    pub state: JobState,
    /// Bumped by every change, starting at 1.
    pub version: i64,
    /// The version of the last change that stores must log (a change of the job's or an
    /// action's state). Progress-only changes are not logged.
    pub logged_version: i64,
    /// Its actions, in order.
    pub actions: Vec<Action>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// The current attempt, 1 for the first run.
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// Higher runs first.
    pub priority: i32,
    /// Labels given at submission.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The idempotency key given at submission; unique within its tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The tenant that owns the job: only that tenant's callers see it. Snapshots stored
    /// before tenants existed read as [`DEFAULT_TENANT`].
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// The per-attempt time limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// When it was submitted.
    #[serde(with = "unix_nanos")]
    pub create_time: SystemTime,
    /// When it last started running.
    #[serde(
        with = "opt_unix_nanos",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub start_time: Option<SystemTime>,
    /// When it reached a terminal state.
    #[serde(
        with = "opt_unix_nanos",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub end_time: Option<SystemTime>,
    /// When it last changed.
    #[serde(with = "unix_nanos")]
    pub update_time: SystemTime,
    /// Where its state changes are reported, if anywhere (absent from snapshots written before
    /// webhooks existed, hence the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    /// A Cancel reached the job while it ran and its handler is stopping. Stored, so a server
    /// that dies before the handler has stopped ends the job CANCELLED at its restart instead
    /// of running it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// The trace context of the Submit that created it: its run, the commands it starts and
    /// its webhook deliveries are tied to that trace.
    #[serde(
        default,
        deserialize_with = "super::trace::lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub trace: Option<TraceContext>,
    /// The earliest time it may run, as submitted; `None` for a job submitted to run at once.
    #[serde(
        with = "opt_unix_nanos",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub schedule_time: Option<SystemTime>,
    /// While QUEUED for another attempt: the earliest time that attempt may start (the end of
    /// the retry's backoff). Stored with the job, so the backoff holds across a restart and on
    /// every replica; `None` otherwise.
    #[serde(
        with = "opt_unix_nanos",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt_time: Option<SystemTime>,
}

impl Job {
    /// A freshly submitted job: QUEUED, version 1, attempt 1.
    pub fn new(id: JobId, spec: NewJob, default_max_attempts: u32, now: SystemTime) -> Self {
        let actions = spec
            .actions
            .into_iter()
            .map(|action| Action {
                name: action.name,
                params: action.params,
                input: action.input,
                state: ActionState::Pending,
                progress: Progress::default(),
                result: None,
                error: None,
                start_time: None,
                end_time: None,
            })
            .collect();
        Self {
            id,
            state: JobState::Queued,
            version: 1,
            logged_version: 1,
            actions,
            error: None,
            attempt: 1,
            max_attempts: spec.max_attempts.unwrap_or(default_max_attempts).max(1),
            priority: spec.priority,
            labels: spec.labels,
            idempotency_key: spec.idempotency_key,
            tenant: if spec.tenant.is_empty() {
                default_tenant()
            } else {
                spec.tenant
            },
            timeout: spec.timeout,
            create_time: now,
            start_time: None,
            end_time: None,
            update_time: now,
            webhook: spec.webhook,
            cancel_requested: false,
            trace: spec.trace,
            schedule_time: spec.schedule_time,
            next_attempt_time: None,
        }
    }

    /// When the job became (or becomes) ready to run: its submission, or its schedule when
    /// that is later. Jobs of equal priority run in this order.
    pub fn ready_time(&self) -> SystemTime {
        self.schedule_time
            .map_or(self.create_time, |due| due.max(self.create_time))
    }

    /// When the job becomes due, if that is still after `now`: until then it waits in the
    /// queue without being started. That is its `schedule_time`, or the end of a retry's
    /// backoff ([`Job::next_attempt_time`]), whichever is later.
    pub fn due_after(&self, now: SystemTime) -> Option<SystemTime> {
        self.schedule_time
            .max(self.next_attempt_time)
            .filter(|due| *due > now)
    }

    /// [`NewJob::first_difference`] of the request this job was made of, told by the job
    /// itself and the request's own `max_attempts` (the job holds the server's default when
    /// the request set none), so a keyed Submit need not keep a copy of its request.
    pub fn first_difference_as_asked(
        &self,
        asked_max_attempts: Option<u32>,
        existing: &Job,
    ) -> Option<String> {
        first_difference(
            Asked {
                actions: &self.actions,
                priority: self.priority,
                labels: &self.labels,
                timeout: self.timeout,
                max_attempts: asked_max_attempts,
                webhook: self.webhook.as_ref(),
                schedule_time: self.schedule_time,
            },
            existing,
        )
    }

    /// The job's progress, derived from its actions: the mean of their percents, with the
    /// running action's message, and counting finished actions as units.
    pub fn progress(&self) -> Progress {
        let total = self.actions.len() as u64;
        if total == 0 {
            return Progress::default();
        }
        let finished = self
            .actions
            .iter()
            .filter(|a| a.state == ActionState::Succeeded)
            .count() as u64;
        let percent_sum: u64 = self
            .actions
            .iter()
            .map(|a| match a.state {
                ActionState::Succeeded => 100,
                _ => u64::from(a.progress.percent),
            })
            .sum();
        let message = self
            .actions
            .iter()
            .find(|a| a.state == ActionState::Running)
            .map(|a| a.progress.message.clone())
            .unwrap_or_default();
        Progress {
            percent: (percent_sum / total) as u8,
            message,
            current: finished,
            total,
        }
    }

    /// Whether the job has reached a state it never leaves.
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }

    /// The index of the action running now, if one is.
    pub fn running_action(&self) -> Option<usize> {
        self.actions
            .iter()
            .position(|a| a.state == ActionState::Running)
    }

    /// The index of the next action to run: the first one that has not succeeded.
    pub fn next_action(&self) -> Option<usize> {
        self.actions
            .iter()
            .position(|a| a.state == ActionState::Pending)
    }

    fn bump(&mut self, now: SystemTime, logged: bool) {
        self.version += 1;
        if logged {
            self.logged_version = self.version;
        }
        self.update_time = now;
    }

    fn set_state(&mut self, to: JobState) -> Result<(), IllegalTransition> {
        self.state = self.state.transition(to)?;
        Ok(())
    }

    fn action_mut(&mut self, index: usize) -> Result<&mut Action, IllegalTransition> {
        self.actions
            .get_mut(index)
            .ok_or_else(|| IllegalTransition {
                from: format!("action {index}"),
                to: "a job with fewer actions".to_owned(),
            })
    }

    /// QUEUED → RUNNING: an attempt starts.
    pub fn start(&mut self, now: SystemTime) -> Result<(), IllegalTransition> {
        self.set_state(JobState::Running)?;
        self.start_time = Some(now);
        self.next_attempt_time = None;
        self.bump(now, true);
        Ok(())
    }

    /// An action starts running.
    pub fn start_action(&mut self, index: usize, now: SystemTime) -> Result<(), IllegalTransition> {
        let action = self.action_mut(index)?;
        action.state = action.state.transition(ActionState::Running)?;
        action.progress = Progress::default();
        // An earlier attempt's failure no longer describes it.
        action.error = None;
        action.start_time = Some(now);
        action.end_time = None;
        self.bump(now, true);
        Ok(())
    }

    /// A running action reports progress. Returns false (and changes nothing) when the action
    /// is not running or the progress is what it already was.
    pub fn report_progress(&mut self, index: usize, progress: Progress, now: SystemTime) -> bool {
        let Some(action) = self.actions.get_mut(index) else {
            return false;
        };
        if action.state != ActionState::Running || action.progress == progress {
            return false;
        }
        action.progress = progress;
        self.bump(now, false);
        true
    }

    /// Makes `self`, an older snapshot of the same job, equal to `newer`, reusing its
    /// allocations: what a submission fixed (the actions' names, params and inputs, labels,
    /// idempotency key, tenant, webhook, trace context) is never copied, since no change of a
    /// job touches it. The executor refills a snapshot nobody reads any more this way instead
    /// of cloning the whole job for every progress report. Returns false, changing nothing,
    /// when `newer` is not the same job.
    pub(crate) fn refresh_from(&mut self, newer: &Job) -> bool {
        if self.id != newer.id || self.actions.len() != newer.actions.len() {
            return false;
        }
        // Every field named, so that a new one cannot be forgotten here.
        let Job {
            id: _,
            state,
            version,
            logged_version,
            actions,
            error,
            attempt,
            max_attempts,
            priority,
            labels: _,
            idempotency_key: _,
            tenant: _,
            timeout,
            create_time,
            start_time,
            end_time,
            update_time,
            webhook: _,
            cancel_requested,
            trace: _,
            schedule_time,
            next_attempt_time,
        } = newer;
        self.state = *state;
        self.schedule_time = *schedule_time;
        self.next_attempt_time = *next_attempt_time;
        self.version = *version;
        self.logged_version = *logged_version;
        self.error.clone_from(error);
        self.attempt = *attempt;
        self.max_attempts = *max_attempts;
        self.priority = *priority;
        self.timeout = *timeout;
        self.create_time = *create_time;
        self.start_time = *start_time;
        self.end_time = *end_time;
        self.update_time = *update_time;
        self.cancel_requested = *cancel_requested;
        for (mine, theirs) in self.actions.iter_mut().zip(actions) {
            let Action {
                name: _,
                params: _,
                input: _,
                state,
                progress,
                result,
                error,
                start_time,
                end_time,
            } = theirs;
            mine.state = *state;
            mine.progress.percent = progress.percent;
            mine.progress.message.clone_from(&progress.message);
            mine.progress.current = progress.current;
            mine.progress.total = progress.total;
            mine.result.clone_from(result);
            mine.error.clone_from(error);
            mine.start_time = *start_time;
            mine.end_time = *end_time;
        }
        debug_assert_eq!(*self, *newer, "a change touched what a submission fixed");
        true
    }

    /// A running action succeeds with a result.
    pub fn succeed_action(
        &mut self,
        index: usize,
        result: Value,
        now: SystemTime,
    ) -> Result<(), IllegalTransition> {
        let action = self.action_mut(index)?;
        action.state = action.state.transition(ActionState::Succeeded)?;
        action.progress = Progress {
            percent: 100,
            ..action.progress.clone()
        };
        action.result = Some(result);
        action.end_time = Some(now);
        self.bump(now, true);
        Ok(())
    }

    /// A running action fails; the job's own state is decided by [`Job::retry`] or
    /// [`Job::fail`] afterwards.
    pub fn fail_action(
        &mut self,
        index: usize,
        error: JobError,
        now: SystemTime,
    ) -> Result<(), IllegalTransition> {
        let action = self.action_mut(index)?;
        action.state = action.state.transition(ActionState::Failed)?;
        action.error = Some(error.bounded());
        action.end_time = Some(now);
        self.bump(now, true);
        Ok(())
    }

    /// RUNNING → SUCCEEDED, once every action has succeeded.
    pub fn succeed(&mut self, now: SystemTime) -> Result<(), IllegalTransition> {
        if let Some(index) = self.next_action() {
            return Err(IllegalTransition {
                from: format!("action {index} not run"),
                to: JobState::Succeeded.to_string(),
            });
        }
        self.set_state(JobState::Succeeded)?;
        self.end_time = Some(now);
        self.bump(now, true);
        Ok(())
    }

    /// → FAILED with `error`; the actions not run yet are marked SKIPPED and say why.
    pub fn fail(&mut self, error: JobError, now: SystemTime) -> Result<(), IllegalTransition> {
        let error = error.bounded();
        self.set_state(JobState::Failed)?;
        self.end_remaining_actions(&error, now);
        self.error = Some(error);
        self.end_time = Some(now);
        self.bump(now, true);
        Ok(())
    }

    /// → CANCELLED: a running action is marked CANCELLED, the others not run SKIPPED.
    pub fn cancel(&mut self, error: JobError, now: SystemTime) -> Result<(), IllegalTransition> {
        let error = error.bounded();
        self.set_state(JobState::Cancelled)?;
        // A cancel during a retry's backoff: no attempt follows.
        self.next_attempt_time = None;
        self.end_remaining_actions(&error, now);
        self.error = Some(error);
        self.end_time = Some(now);
        self.bump(now, true);
        Ok(())
    }

    /// RUNNING → QUEUED for another attempt, which may start after `backoff`: the attempt
    /// counter goes up, and the actions that did not succeed go back to PENDING (succeeded
    /// ones keep their results).
    pub fn retry(&mut self, now: SystemTime, backoff: Duration) -> Result<(), IllegalTransition> {
        if self.attempt >= self.max_attempts {
            return Err(IllegalTransition {
                from: format!("attempt {} of {}", self.attempt, self.max_attempts),
                to: "another attempt".to_owned(),
            });
        }
        self.set_state(JobState::Queued)?;
        self.attempt += 1;
        self.next_attempt_time = Some(now.checked_add(backoff).unwrap_or(now));
        self.reset_unfinished_actions();
        self.bump(now, true);
        Ok(())
    }

    /// RUNNING → QUEUED because the server died while the job ran, found at the next start
    /// (the caller checks that an attempt is left): the attempt counter goes up, and the
    /// actions that did not succeed go back to PENDING. The version jumps past any
    /// progress-only version that may have been shown to watchers but not persisted (at most
    /// [`MAX_UNPERSISTED_VERSIONS`]), so versions never go backwards across a crash.
    pub fn interrupt(&mut self, now: SystemTime) -> Result<(), IllegalTransition> {
        self.requeue_unfinished(now)?;
        self.attempt += 1;
        Ok(())
    }

    /// RUNNING → QUEUED because a graceful shutdown stopped the job's handler: as
    /// [`Job::interrupt`], but the attempt is not used up, since an orderly stop is neither
    /// the job's fault nor a crash that could repeat. The next start runs the same attempt
    /// again, so `attempt` never exceeds `max_attempts`.
    pub fn set_aside(&mut self, now: SystemTime) -> Result<(), IllegalTransition> {
        self.requeue_unfinished(now)
    }

    fn requeue_unfinished(&mut self, now: SystemTime) -> Result<(), IllegalTransition> {
        self.set_state(JobState::Queued)?;
        self.reset_unfinished_actions();
        self.version += MAX_UNPERSISTED_VERSIONS;
        self.bump(now, true);
        Ok(())
    }

    /// RUNNING → FAILED because the server stopped while the job ran and the configured policy
    /// gives up on such jobs: [`Job::fail`] with `error`, and the same version jump as
    /// [`Job::interrupt`], so a watcher that saw unpersisted progress can still resume.
    pub fn fail_interrupted(
        &mut self,
        error: JobError,
        now: SystemTime,
    ) -> Result<(), IllegalTransition> {
        self.fail(error, now)?;
        self.jump_past_unpersisted();
        Ok(())
    }

    /// RUNNING → CANCELLED because the server stopped while the job's handler was stopping
    /// for a Cancel ([`Job::request_cancel`]): the cancel stands, with the version jump of
    /// [`Job::interrupt`].
    pub fn cancel_interrupted(
        &mut self,
        error: JobError,
        now: SystemTime,
    ) -> Result<(), IllegalTransition> {
        self.cancel(error, now)?;
        self.jump_past_unpersisted();
        Ok(())
    }

    /// Marks a RUNNING job as asked to cancel while its handler stops: a logged change, so it
    /// is stored before the Cancel is answered.
    pub fn request_cancel(&mut self, now: SystemTime) -> Result<(), IllegalTransition> {
        if self.state != JobState::Running {
            return Err(IllegalTransition {
                from: self.state.as_str().to_owned(),
                to: "cancel requested".to_owned(),
            });
        }
        self.cancel_requested = true;
        self.bump(now, true);
        Ok(())
    }

    fn jump_past_unpersisted(&mut self) {
        self.version += MAX_UNPERSISTED_VERSIONS;
        self.logged_version = self.version;
    }

    /// Whether a watcher may already have been shown `version` of this job, though this
    /// snapshot is older: a running job's progress-only versions reach watchers before the
    /// store (at most [`MAX_UNPERSISTED_VERSIONS`] of them), so a replica reading the store, or
    /// a server restarted before the job was recovered, can be behind what a client saw. Every
    /// logged change is stored before anyone is told, so nothing else can be ahead.
    pub fn may_have_shown(&self, version: i64) -> bool {
        version <= self.version
            || (self.state == JobState::Running
                && version - self.version < MAX_UNPERSISTED_VERSIONS)
    }

    /// Whether another attempt is allowed after this one.
    pub fn has_attempts_left(&self) -> bool {
        self.attempt < self.max_attempts
    }

    fn reset_unfinished_actions(&mut self) {
        for action in &mut self.actions {
            // A running action was interrupted: count it as cancelled, then run it again.
            if action.state == ActionState::Running {
                action.state = ActionState::Cancelled;
            }
            if let Ok(state) = action.state.transition(ActionState::Pending) {
                action.state = state;
                action.progress = Progress::default();
            }
        }
    }

    fn end_remaining_actions(&mut self, error: &JobError, now: SystemTime) {
        for (index, action) in self.actions.iter_mut().enumerate() {
            let (to, note) = match action.state {
                ActionState::Running => (ActionState::Cancelled, error.clone()),
                ActionState::Pending => {
                    // Every action not run repeats it: a short form each. One whose last
                    // attempt failed (the job ends while waiting to retry) did run: say so.
                    let message = match &action.error {
                        Some(last) => format!(
                            "action {index} was not run again: {}; its last attempt failed: {}",
                            super::truncate(&error.message, 256),
                            super::truncate(&last.to_string(), 256)
                        ),
                        None => format!(
                            "action {index} was not run: {}",
                            super::truncate(&error.message, 256)
                        ),
                    };
                    (
                        ActionState::Skipped,
                        JobError::new("ABORTED", "NOT_RUN", message),
                    )
                }
                _ => continue,
            };
            if let Ok(state) = action.state.transition(to) {
                action.state = state;
                action.error = Some(note);
                action.end_time = Some(now);
            }
        }
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
