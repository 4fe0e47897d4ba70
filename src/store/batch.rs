//! What the group-commit writers of the durable stores (SQLite, PostgreSQL) share: each command's
//! result is held until its batch commits, then sent; a batch that fails tells each of its
//! callers why. Also the outcomes their commands report, and the SQL both spell the same.

use tokio::sync::oneshot;

use super::StoreError;
use crate::log_throttle::LogThrottle;

/// The terminal states, as SQL: the jobs that may be deleted or purged.
pub(super) const TERMINAL_STATES: &str = "('SUCCEEDED', 'FAILED', 'CANCELLED')";

/// What a create did; a found job is left encoded for the caller to decode.
#[derive(Debug)]
pub(super) enum CreateOutcome {
    New,
    Existing(String),
}

/// What a delete did; a found job is left encoded for the caller to decode.
#[derive(Debug)]
pub(super) enum DeleteOutcome {
    Removed,
    NotFound,
    NotTerminal(String),
}

/// Where a write command's result goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Sends a held result, or the batch's failure in its place.
type Deliver = Box<dyn FnOnce(Option<&BatchFailure>) + Send>;

/// A command's result, held until its batch commits.
pub(super) struct Answer {
    send: Deliver,
}

impl Answer {
    /// Holds `result` for `reply`.
    pub(super) fn new<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Self {
        Self {
            send: Box::new(move |failure| {
                let result = match failure {
                    // A command that failed on its own keeps its own error.
                    Some(failure) if result.is_ok() => Err(failure.error()),
                    _ => result,
                };
                // The caller may have stopped waiting; its write is committed all the same.
                let _ = reply.send(result);
            }),
        }
    }

    /// Tells the caller; `failure` when the batch did not commit.
    pub(super) fn send(self, failure: Option<&BatchFailure>) {
        (self.send)(failure)
    }
}

/// The answer to hold until the commit; a command that broke the batch is told at once.
pub(super) fn respond<T: Send + 'static>(
    reply: Reply<T>,
    outcome: Result<Result<T, StoreError>, BatchFailure>,
) -> Result<Answer, BatchFailure> {
    match outcome {
        Ok(result) => Ok(Answer::new(reply, result)),
        Err(failure) => {
            let _ = reply.send(Err(failure.error()));
            Err(failure)
        }
    }
}

/// Why a whole batch failed, told to each of its callers.
pub(super) struct BatchFailure {
    context: String,
    full: bool,
    /// The backend's error, as text.
    pub(super) message: String,
}

impl BatchFailure {
    /// A failure of the backend while `context`; `full` when the disk (or database) is full.
    pub(super) fn new(context: &str, full: bool, error: &dyn std::fmt::Display) -> Self {
        Self {
            context: context.to_owned(),
            full,
            message: error.to_string(),
        }
    }

    /// A failure reported as a store error.
    pub(super) fn from_error(error: &StoreError) -> Self {
        Self::new(
            "writing a batch of changes",
            matches!(error, StoreError::Full { .. }),
            error,
        )
    }

    /// Logs that the batch did not commit (`outcome`) at ERROR, unless `throttle` holds it
    /// back: one lasting fault, a full disk or a database that is down, fails every batch.
    pub(super) fn log(&self, outcome: &str, throttle: &LogThrottle) {
        if let Some(held_back) = throttle.admit() {
            tracing::error!(error = %self.message, held_back, "{outcome}");
        }
    }

    /// The error each caller gets (the backend's error cannot be cloned, its text can).
    pub(super) fn error(&self) -> StoreError {
        if self.full {
            StoreError::Full {
                context: self.context.clone(),
                source: self.message.clone().into(),
            }
        } else {
            StoreError::backend(self.context.clone(), self.message.clone())
        }
    }
}
