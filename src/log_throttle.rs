//! Holds back repeats of a log line that one lasting fault would otherwise write without end: a
//! full disk or a database that is down fails every batch of writes, every progress save and
//! every retry of every job at once, and an operator needs the first line and then a steady
//! reminder, not hundreds of lines a second burying everything else.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lets the first occurrence of a log line through, then at most one per period, counting
/// those held back in between so that the next line logged can say how many there were.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    period: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last_logged: Option<Instant>,
    held_back: u64,
}

impl LogThrottle {
    /// How often a repeated failure is logged while it lasts.
    pub(crate) const DEFAULT_PERIOD: Duration = Duration::from_secs(10);

    /// A throttle that logs at most once per `period`.
    pub(crate) const fn new(period: Duration) -> Self {
        Self {
            period,
            state: Mutex::new(ThrottleState {
                last_logged: None,
                held_back: 0,
            }),
        }
    }

    /// `Some(held_back)` when this occurrence is to be logged, `held_back` being how many
    /// were not since the last one that was; `None` when it is to be held back.
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        // Each critical section leaves the state consistent: a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = state
            .last_logged
            .is_none_or(|last| now.saturating_duration_since(last) >= self.period);
        if !due {
            state.held_back += 1;
            return None;
        }
        state.last_logged = Some(now);
        Some(std::mem::take(&mut state.held_back))
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(Self::DEFAULT_PERIOD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_one_per_period_counting_the_rest() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.admit_at(start), Some(0));
        for ms in [1, 500, 9_999] {
            assert_eq!(throttle.admit_at(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(throttle.admit_at(start + Duration::from_secs(10)), Some(3));
        assert_eq!(throttle.admit_at(start + Duration::from_secs(11)), None);
        assert_eq!(throttle.admit_at(start + Duration::from_secs(25)), Some(1));
        assert_eq!(throttle.admit_at(start + Duration::from_secs(60)), Some(0));
    }

    #[test]
    fn a_clock_read_out_of_order_holds_back_instead_of_failing() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now() + Duration::from_secs(1);
        assert_eq!(throttle.admit_at(start), Some(0));
        assert_eq!(throttle.admit_at(start - Duration::from_secs(1)), None);
    }
}
