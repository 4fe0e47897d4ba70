//! The job and action state machines. Every transition goes through [`JobState::transition`] or
//! [`ActionState::transition`], which the executor, the stores and the tests all share.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// The lifecycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Stored and waiting for a worker (also between retry attempts).
    Queued,
    /// An action of the job is being run.
    Running,
    /// Every action succeeded. Terminal.
    Succeeded,
    /// An action failed and no attempt is left. Terminal.
    Failed,
    /// Cancelled before it finished. Terminal.
    Cancelled,
}

/// A state change that the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition from {from} to {to}")]
pub struct IllegalTransition {
    /// The state the job or action was in.
    pub from: String,
    /// The state it was asked to move to.
    pub to: String,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Whether the state is final: a terminal job never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Moves to `to` if the state machine allows it.
    ///
    /// Legal: QUEUED → RUNNING | CANCELLED; RUNNING → SUCCEEDED | FAILED | CANCELLED | QUEUED (a
    /// retry). QUEUED → FAILED is allowed for jobs that cannot start at all (for example
    /// recovered with no attempt left). Nothing leaves a terminal state.
    pub fn transition(self, to: JobState) -> Result<JobState, IllegalTransition> {
        use JobState::*;
        let legal = matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Failed)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Queued)
        );
        allow(legal, self, to)
    }

    /// The stable name used in storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `to` if the move is legal, the error naming both states otherwise.
fn allow<S: fmt::Display>(legal: bool, from: S, to: S) -> Result<S, IllegalTransition> {
    if legal {
        Ok(to)
    } else {
        Err(IllegalTransition {
            from: from.to_string(),
            to: to.to_string(),
        })
    }
}

/// A state name that is not one of [`JobState`]'s or [`ActionState`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// The state of one action within a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActionState {
    /// Not started yet.
    Pending,
    /// Being run now.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Failed.
    Failed,
    /// Stopped by a cancel or a timeout while running.
    Cancelled,
    /// Never run: an earlier action failed, or the job ended first.
    Skipped,
}

impl ActionState {
    /// Every state.
    pub const ALL: [ActionState; 6] = [
        ActionState::Pending,
        ActionState::Running,
        ActionState::Succeeded,
        ActionState::Failed,
        ActionState::Cancelled,
        ActionState::Skipped,
    ];

    /// Moves to `to` if allowed. A failed or cancelled action may go back to PENDING when its job
    /// is retried; a succeeded one keeps its result and is not run again.
    pub fn transition(self, to: ActionState) -> Result<ActionState, IllegalTransition> {
        use ActionState::*;
        let legal = matches!(
            (self, to),
            (Pending, Running)
                | (Pending, Skipped)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Failed, Pending)
                | (Cancelled, Pending)
        );
        allow(legal, self, to)
    }

    /// The stable name used in storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionState::Pending => "PENDING",
            ActionState::Running => "RUNNING",
            ActionState::Succeeded => "SUCCEEDED",
            ActionState::Failed => "FAILED",
            ActionState::Cancelled => "CANCELLED",
            ActionState::Skipped => "SKIPPED",
        }
    }
}

impl fmt::Display for ActionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ActionState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ActionState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_job_state() -> impl Strategy<Value = JobState> {
        prop::sample::select(JobState::ALL.to_vec())
    }

    #[test]
    fn queued_job_can_start_or_be_cancelled() {
        assert_eq!(
            JobState::Queued.transition(JobState::Running),
            Ok(JobState::Running)
        );
        assert_eq!(
            JobState::Queued.transition(JobState::Cancelled),
            Ok(JobState::Cancelled)
        );
        assert!(JobState::Queued.transition(JobState::Succeeded).is_err());
    }

    #[test]
    fn running_job_can_end_or_be_retried() {
        for to in [
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::Queued,
        ] {
            assert_eq!(JobState::Running.transition(to), Ok(to));
        }
        assert!(JobState::Running.transition(JobState::Running).is_err());
    }

    #[test]
    fn names_round_trip() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
        for state in ActionState::ALL {
            assert_eq!(state.as_str().parse::<ActionState>(), Ok(state));
        }
        assert!("DONE".parse::<JobState>().is_err());
    }

    #[test]
    fn succeeded_action_is_never_rerun() {
        for to in ActionState::ALL {
            assert!(ActionState::Succeeded.transition(to).is_err());
            assert!(ActionState::Skipped.transition(to).is_err());
        }
    }

    proptest! {
        #[test]
        fn terminal_states_never_change(from in any_job_state(), to in any_job_state()) {
            if from.is_terminal() {
                prop_assert!(from.transition(to).is_err());
            }
        }

        #[test]
        fn no_state_moves_to_itself(state in any_job_state()) {
            prop_assert!(state.transition(state).is_err());
        }
    }
}
