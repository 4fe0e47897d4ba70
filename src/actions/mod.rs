//! Actions: the [`Handler`] trait that runs one action of a job, the [`Registry`] of handlers a
//! server knows by name, and the built-in handlers.

mod builtin;
mod exec;
mod params;
mod progress;

pub use builtin::{Echo, Fail, Sha256, Sleep};
#[cfg(target_os = "linux")]
pub use exec::kill_orphaned_commands;
pub use exec::{Exec, ExecCommand};
pub use params::{ParamInfo, ParamType, str_param, u64_param};
pub use progress::{MAX_PROGRESS_MESSAGE_BYTES, ProgressReceiver, ProgressReporter};

/// The attribute [`Handler`] implementations need (`#[longrun::actions::async_trait]` on the
/// `impl`), re-exported so that an embedder need not depend on `async-trait` itself.
pub use async_trait::async_trait;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::job::{FieldViolation, JobError, JobId, NewAction, TraceContext};

/// What a handler says about itself in `ListActions`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionDescription {
    /// What the action does.
    pub description: String,
    /// The parameters it takes; any other parameter is refused at submission.
    pub params: Vec<ParamInfo>,
    /// Whether it reads the action's binary input.
    pub uses_input: bool,
}

/// A registered action, as `ListActions` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionInfo {
    /// The name clients submit it by.
    pub name: String,
    /// Its description.
    pub description: ActionDescription,
}

/// Everything a handler gets to run one action.
pub struct ActionContext {
    /// The job the action belongs to.
    pub job_id: JobId,
    /// The action's position within the job.
    pub action_index: usize,
    /// The job's attempt, 1 for the first run.
    pub attempt: u32,
    /// The attempts the job has in all: this one is the last when `attempt` reaches it, and
    /// a retryable [`HandlerError`] then fails the job.
    pub max_attempts: u32,
    /// The job's labels, as submitted.
    pub labels: BTreeMap<String, String>,
    /// The tenant that submitted the job (`default` without authentication).
    pub tenant: String,
    /// The action's parameters, already checked against its [`ActionDescription`].
    pub params: Map<String, Value>,
    /// The action's binary input.
    pub input: Bytes,
    /// Where to report progress.
    pub progress: ProgressReporter,
    /// Fires when the job is cancelled or runs out of time. A handler should stop promptly;
    /// one that does not is dropped after the server's grace period.
    pub cancel: CancellationToken,
    /// When the attempt's time runs out, if the job has a timeout.
    pub deadline: Option<Instant>,
    /// The trace context of the Submit that created the job, if it carried one: pass it on
    /// (its `headers()` on the requests the handler makes, say) so that the work the handler
    /// starts joins that trace.
    pub trace: Option<TraceContext>,
}

impl ActionContext {
    /// Sleeps for `duration`, or returns [`HandlerError::cancelled`] as soon as the action is
    /// cancelled.
    pub async fn sleep(&self, duration: Duration) -> Result<(), HandlerError> {
        tokio::select! {
            _ = tokio::time::sleep(duration) => Ok(()),
            _ = self.cancel.cancelled() => Err(HandlerError::cancelled()),
        }
    }

    /// Sleeps until `deadline` (at once if it has passed), or returns
    /// [`HandlerError::cancelled`] as soon as the action is cancelled. Steps timed against one
    /// start do not add up each sleep's rounding to the timer's millisecond, as repeated
    /// [`ActionContext::sleep`]s do.
    pub async fn sleep_until(&self, deadline: Instant) -> Result<(), HandlerError> {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => Ok(()),
            _ = self.cancel.cancelled() => Err(HandlerError::cancelled()),
        }
    }
}

/// Why a handler failed. It becomes the action's (and the job's) [`JobError`].
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerError {
    /// The error clients see.
    pub error: JobError,
    /// Whether another attempt might succeed; permanent errors fail the job at once.
    pub retryable: bool,
}

impl HandlerError {
    /// A retryable failure.
    pub fn new(code: &str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            error: JobError::new(code, reason, message),
            retryable: true,
        }
    }

    /// A failure that another attempt would repeat.
    pub fn permanent(code: &str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            ..Self::new(code, reason, message)
        }
    }

    /// The handler stopped because its cancellation token fired.
    pub fn cancelled() -> Self {
        Self::permanent("CANCELLED", "CANCELLED", "the action was stopped")
    }

    /// A retryable `INTERNAL` failure with reason `HANDLER_ERROR` and `error`'s text (in its
    /// alternate form, which for an `anyhow::Error` holds its causes): what `?` makes of a
    /// `std::error::Error`, for errors that are not one, as
    /// `.map_err(HandlerError::internal)?` on an `anyhow::Result`.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        Self::new("INTERNAL", "HANDLER_ERROR", format!("{error:#}"))
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.retryable {
            "retryable"
        } else {
            "permanent"
        };
        write!(f, "{} ({kind})", self.error)
    }
}

/// `?` on any error in a handler: a retryable `INTERNAL` failure with reason `HANDLER_ERROR`,
/// its message the error and its sources (`reading the input: unexpected end of file`).
/// Errors that deserve their own code, reason, or no retry are built with
/// [`HandlerError::new`] or [`HandlerError::permanent`]. (`HandlerError` itself is therefore
/// not a `std::error::Error`: it would have to convert from itself.)
impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::new("INTERNAL", "HANDLER_ERROR", message)
    }
}

impl From<JobError> for HandlerError {
    /// A retryable failure with exactly this error.
    fn from(error: JobError) -> Self {
        Self {
            error,
            retryable: true,
        }
    }
}

/// Runs one kind of action. Implement it to add your own actions to a server, with
/// [`macro@async_trait`] on the `impl` (re-exported here).
///
/// A handler reports progress through `ctx.progress`, stops soon after `ctx.cancel` fires
/// (a Cancel, the job's timeout, or shutdown; one that does not is dropped after the cancel
/// grace period), and returns a JSON result or a [`HandlerError`], permanent or retryable.
///
/// - A retryable error runs the job again (from its first action not yet succeeded, after a
///   backoff) only while it has attempts left: jobs get one unless their Submit or the
///   server's `default_max_attempts` say more.
/// - A panic fails the attempt as a retryable `INTERNAL` error with reason
///   `HANDLER_PANICKED`; the server goes on.
/// - A handler must not block its thread (CPU-heavy work, blocking I/O): it is polled by its
///   job's owner task, which while it blocks can neither store a Cancel (the Cancel answers
///   after 5 s without it) nor end the job at its timeout or grace period; the job ends when
///   the handler returns. Run such work with [`tokio::task::spawn_blocking`] and look at
///   `ctx.cancel` between its steps. (A thread cannot be stopped from outside; running the
///   handler elsewhere would only let the job end, or its next attempt start, while the
///   blocked handler still runs.)
/// - The result must fit in a response: at most 32 levels deep (past it the action fails
///   with `RESULT_TOO_DEEP`), and with the job's other results within the server's
///   `max_message_bytes` (`RESULT_TOO_LARGE`).
///
/// A handler that counts the lines of its input containing a word, reporting progress as it
/// goes and stopping when told to:
///
/// ```
/// use longrun::actions::{
///     ActionContext, ActionDescription, Handler, HandlerError, ParamInfo, ParamType,
///     ProgressReporter, Registry, async_trait, str_param,
/// };
/// use longrun::job::{FieldViolation, JobId};
/// use serde_json::{Map, Value, json};
///
/// struct CountMatches;
///
/// #[async_trait]
/// impl Handler for CountMatches {
///     fn describe(&self) -> ActionDescription {
///         ActionDescription {
///             description: "Counts the input's lines that contain `word`.".to_owned(),
///             params: vec![ParamInfo::optional("word", ParamType::String, "What to look for.")],
///             uses_input: true,
///         }
///     }
///
///     // Checked at Submit, so a bad request is refused before anything is stored.
///     fn validate(&self, params: &Map<String, Value>) -> Result<(), Vec<FieldViolation>> {
///         if str_param(params, "word", "x").is_empty() {
///             return Err(vec![FieldViolation::new("word", "must not be empty")]);
///         }
///         Ok(())
///     }
///
///     async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
///         let word = str_param(&ctx.params, "word", "x");
///         let text = std::str::from_utf8(&ctx.input)
///             .map_err(|e| HandlerError::permanent("INVALID_ARGUMENT", "NOT_UTF8", e.to_string()))?;
///         let lines: Vec<&str> = text.lines().collect();
///         let mut matching = 0;
///         for (done, chunk) in lines.chunks(1000).enumerate() {
///             if ctx.cancel.is_cancelled() {
///                 return Err(HandlerError::cancelled());
///             }
///             matching += chunk.iter().filter(|line| line.contains(word)).count();
///             let read = ((done + 1) * 1000).min(lines.len()) as u64;
///             ctx.progress.units(read, lines.len() as u64, format!("{read} lines read"));
///             tokio::task::yield_now().await; // let a cancel in between
///         }
///         Ok(json!({ "lines": lines.len(), "matching": matching }))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // Served by name, beside the built-in actions:
/// let mut registry = Registry::with_builtins();
/// registry.register("count_matches", CountMatches);
///
/// // A handler is a plain value: it can be tried without a server.
/// let (progress, reports) = ProgressReporter::channel();
/// let ctx = ActionContext {
///     job_id: JobId::generate(),
///     action_index: 0,
///     attempt: 1,
///     max_attempts: 1,
///     labels: Default::default(),
///     tenant: "default".to_owned(),
///     params: json!({ "word": "error" }).as_object().cloned().unwrap_or_default(),
///     input: "ok\nerror: disk\nok\nerror: net\n".into(),
///     progress,
///     cancel: Default::default(),
///     deadline: None,
///     trace: None,
/// };
/// let result = CountMatches.run(ctx).await.unwrap();
/// assert_eq!(result, json!({ "lines": 4, "matching": 2 }));
/// assert_eq!(reports.take().map(|p| p.percent), Some(100));
/// # }
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// What the action does and which params it takes. Asked once, when the handler is
    /// registered: the registry keeps the answer for every Submit and `ListActions`.
    fn describe(&self) -> ActionDescription;

    /// Checks params beyond their declared types (ranges, combinations). Called at Submit,
    /// after the declared types were checked; violations name the param (`duration_ms`).
    fn validate(&self, _params: &Map<String, Value>) -> Result<(), Vec<FieldViolation>> {
        Ok(())
    }

    /// Runs the action and returns its result.
    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError>;
}

/// The handlers a server runs, by action name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Registered>,
}

/// A handler with the description it gave when it was registered.
#[derive(Clone)]
struct Registered {
    handler: Arc<dyn Handler>,
    description: ActionDescription,
}

/// A handler's [`Handler::validate`] panicked: the params could not be checked, which is the
/// server's fault, not the caller's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the {action:?} action's params check panicked: {message}")]
pub struct ValidatePanicked {
    /// The action whose handler panicked.
    pub action: String,
    /// The panic's message.
    pub message: String,
}

impl Registry {
    /// A registry with no actions.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A registry with the built-in actions `sleep`, `echo`, `fail` and `sha256`.
    pub fn with_builtins() -> Self {
        let mut registry = Self::empty();
        registry.register("sleep", Sleep);
        registry.register("echo", Echo);
        registry.register("fail", Fail);
        registry.register("sha256", Sha256);
        registry
    }

    /// Adds (or replaces) the handler for `name`, asking it for its description now.
    pub fn register(&mut self, name: impl Into<String>, handler: impl Handler) -> &mut Self {
        let description = handler.describe();
        self.handlers.insert(
            name.into(),
            Registered {
                handler: Arc::new(handler),
                description,
            },
        );
        self
    }

    /// The handler for `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.handlers
            .get(name)
            .map(|registered| Arc::clone(&registered.handler))
    }

    /// Every registered action, by name.
    pub fn list(&self) -> Vec<ActionInfo> {
        self.handlers
            .iter()
            .map(|(name, registered)| ActionInfo {
                name: name.clone(),
                description: registered.description.clone(),
            })
            .collect()
    }

    /// Checks one submitted action: its name is registered, its params have the declared
    /// names and types, and pass the handler's own checks. Fields are named relative to the
    /// action (`name`, `params.steps`). A panic in the handler's own checks is caught, logged
    /// and returned as such.
    pub fn validate(
        &self,
        name: &str,
        params: &Map<String, Value>,
    ) -> Result<Vec<FieldViolation>, ValidatePanicked> {
        let Some(registered) = self.handlers.get(name) else {
            let known: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
            return Ok(vec![FieldViolation::new(
                "name",
                format!(
                    "unknown action {name:?}; this server runs: {}",
                    known.join(", ")
                ),
            )]);
        };
        let mut violations = params::check(&registered.description.params, params);
        if violations.is_empty() {
            let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                registered.handler.validate(params)
            }));
            match checked {
                Ok(Ok(())) => {}
                Ok(Err(more)) => violations = more,
                Err(payload) => {
                    let panicked = ValidatePanicked {
                        action: name.to_owned(),
                        message: crate::job::truncate(
                            panic_text(&*payload),
                            MAX_PANIC_MESSAGE_BYTES,
                        ),
                    };
                    tracing::error!(error = %panicked, "an action's params check panicked");
                    return Err(panicked);
                }
            }
        }
        Ok(violations.into_iter().map(|v| v.under("params")).collect())
    }

    /// [`Registry::validate`] for the action at `index` of a submitted job, its fields named
    /// within the job (`actions[1].params.steps`); also refuses an input given to an action
    /// that reads none (like an unknown param, it would be silently ignored).
    pub fn validate_action(
        &self,
        index: usize,
        action: &NewAction,
    ) -> Result<Vec<FieldViolation>, ValidatePanicked> {
        let mut found = self.validate(&action.name, &action.params)?;
        if !action.input.is_empty()
            && self
                .handlers
                .get(&action.name)
                .is_some_and(|registered| !registered.description.uses_input)
        {
            found.push(FieldViolation::new(
                "input",
                format!(
                    "action {:?} reads no input (ListActions: uses_input false); leave it empty",
                    action.name
                ),
            ));
        }
        let prefix = format!("actions[{index}]");
        Ok(found.into_iter().map(|v| v.under(&prefix)).collect())
    }
}

/// How much of a panic's message an error keeps: enough to recognise the bug, not so much that
/// a panic formatting a large value bloats every snapshot of the job.
pub(crate) const MAX_PANIC_MESSAGE_BYTES: usize = 1024;

/// A panic's message, as `panic!` gives it.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!("test params are objects"),
        }
    }

    #[test]
    fn any_error_converts_into_a_retryable_handler_error_with_its_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading the input")]
        struct Reading(#[source] std::io::Error);

        fn handler_step() -> Result<(), HandlerError> {
            Err(Reading(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "unexpected end of file",
            )))?;
            Ok(())
        }
        let error = handler_step().unwrap_err();
        assert!(error.retryable);
        assert_eq!(
            error.to_string(),
            "INTERNAL/HANDLER_ERROR: reading the input: unexpected end of file (retryable)"
        );
        // An anyhow::Error is no std::error::Error: `internal` keeps its context chain.
        fn anyhow_step() -> anyhow::Result<()> {
            anyhow::bail!("unexpected end of file")
        }
        let error = anyhow::Context::context(anyhow_step(), "reading the input")
            .map_err(HandlerError::internal)
            .unwrap_err();
        assert!(error.retryable);
        assert_eq!(
            error.to_string(),
            "INTERNAL/HANDLER_ERROR: reading the input: unexpected end of file (retryable)"
        );
        let own = HandlerError::from(JobError::new("NOT_FOUND", "NO_SUCH_FILE", "gone"));
        assert_eq!(own.error.reason, "NO_SUCH_FILE");
        assert_eq!(
            HandlerError::cancelled().to_string(),
            "CANCELLED/CANCELLED: the action was stopped (permanent)"
        );
    }

    #[test]
    fn an_input_is_refused_only_for_actions_that_read_none() {
        let registry = Registry::with_builtins();
        let with_input = |name: &str| NewAction {
            name: name.to_owned(),
            params: Map::new(),
            input: bytes::Bytes::from_static(b"x"),
        };
        let violations = registry.validate_action(2, &with_input("sleep")).unwrap();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "actions[2].input");
        assert!(violations[0].description.contains("sleep"));
        assert!(
            registry
                .validate_action(0, &with_input("echo"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn unknown_action_is_named() {
        let registry = Registry::with_builtins();
        let violations = registry.validate("nope", &Map::new()).unwrap();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "name");
        assert!(violations[0].description.contains("sleep"));
    }

    #[test]
    fn params_are_checked_by_type_and_name() {
        let registry = Registry::with_builtins();
        assert!(
            registry
                .validate("sleep", &params(json!({"duration_ms": 5})))
                .unwrap()
                .is_empty()
        );
        let violations = registry
            .validate("sleep", &params(json!({"duration_ms": "long"})))
            .unwrap();
        assert_eq!(violations[0].field, "params.duration_ms");
        let violations = registry
            .validate("sleep", &params(json!({"bogus": 1})))
            .unwrap();
        assert_eq!(violations[0].field, "params.bogus");
        let violations = registry
            .validate("sleep", &params(json!({"steps": 0})))
            .unwrap();
        assert_eq!(violations[0].field, "params.steps");
    }

    /// Counts the calls of `describe`, and panics in `validate` when params carry `boom`.
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);

    #[async_trait]
    impl Handler for Counted {
        fn describe(&self) -> ActionDescription {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ActionDescription {
                description: "counted".to_owned(),
                params: vec![ParamInfo::optional("boom", ParamType::Boolean, "panic")],
                uses_input: false,
            }
        }

        fn validate(&self, params: &Map<String, Value>) -> Result<(), Vec<FieldViolation>> {
            if params.contains_key("boom") {
                panic!("boom at {}", "validate");
            }
            Ok(())
        }

        async fn run(&self, _ctx: ActionContext) -> Result<Value, HandlerError> {
            Ok(Value::Null)
        }
    }

    #[test]
    fn a_description_is_asked_once_and_a_panicking_check_is_caught() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut registry = Registry::empty();
        registry.register("counted", Counted(Arc::clone(&calls)));
        for _ in 0..3 {
            assert!(
                registry
                    .validate("counted", &Map::new())
                    .unwrap()
                    .is_empty()
            );
        }
        assert_eq!(registry.list()[0].description.description, "counted");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);

        let panicked = registry
            .validate("counted", &params(json!({"boom": true})))
            .unwrap_err();
        assert_eq!(panicked.action, "counted");
        assert_eq!(panicked.message, "boom at validate");
    }

    #[test]
    fn builtins_are_listed_by_name() {
        let names: Vec<String> = Registry::with_builtins()
            .list()
            .into_iter()
            .map(|a| a.name)
            .collect();
        assert_eq!(names, ["echo", "fail", "sha256", "sleep"]);
    }
}
