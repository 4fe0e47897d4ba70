//! The channel a handler reports its progress on, and the executor's end of it: one slot
//! holding the newest report not taken yet, so a handler that reports faster than the job's
//! owner takes reports never queues them, and a report wakes the owner only when it waits.

use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    task::{Poll, Waker},
};

use crate::job::{Progress, truncate};

/// The longest progress message kept, in bytes: every snapshot of the job repeats it (every
/// action's last one), and the job must still fit in one response.
pub const MAX_PROGRESS_MESSAGE_BYTES: usize = 1024;

#[derive(Default)]
struct Slot {
    /// The newest report not taken yet: older ones are coalesced away.
    newest: Option<Progress>,
    /// Whom the next report wakes: the owner, while it waits for one.
    waker: Option<Waker>,
}

#[derive(Default)]
struct Channel {
    slot: Mutex<Slot>,
}

type Shared = Arc<Channel>;

fn lock(shared: &Shared) -> MutexGuard<'_, Slot> {
    // Every critical section only moves plain values; a panic cannot leave the slot half-set.
    shared.slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reports an action's progress to the executor. Cheap to clone and never blocks: reports
/// that come faster than the executor takes them are coalesced to the newest.
#[derive(Clone)]
pub struct ProgressReporter {
    shared: Shared,
}

impl ProgressReporter {
    /// A reporter and the receiving end the executor takes reports from.
    pub fn channel() -> (Self, ProgressReceiver) {
        let shared = Shared::default();
        (
            Self {
                shared: Arc::clone(&shared),
            },
            ProgressReceiver { shared },
        )
    }

    /// Reports progress. A message past [`MAX_PROGRESS_MESSAGE_BYTES`] is cut, a percent past
    /// 100 is 100, and units done past the known total are the total: clients are promised
    /// 0 to 100, and a job's percent is derived from its actions'.
    pub fn report(&self, mut progress: Progress) {
        progress.percent = progress.percent.min(100);
        if progress.total > 0 {
            progress.current = progress.current.min(progress.total);
        }
        if progress.message.len() > MAX_PROGRESS_MESSAGE_BYTES {
            progress.message = truncate(&progress.message, MAX_PROGRESS_MESSAGE_BYTES);
        }
        let waker = {
            let mut slot = lock(&self.shared);
            slot.newest = Some(progress);
            // Taken: the reports that follow before the owner waits again wake nobody.
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Reports `current` of `total` units done.
    pub fn units(&self, current: u64, total: u64, message: impl Into<String>) {
        self.report(Progress::of(current, total, message));
    }

    /// Reports a percent done.
    pub fn percent(&self, percent: u8, message: impl Into<String>) {
        self.report(Progress::percent(percent, message));
    }
}

/// The executor's end of a [`ProgressReporter`]: the newest report not taken yet.
pub struct ProgressReceiver {
    shared: Shared,
}

impl ProgressReceiver {
    /// Takes the newest report not taken yet, if there is one.
    pub fn take(&self) -> Option<Progress> {
        lock(&self.shared).newest.take()
    }

    /// Waits for a report and takes it. Never completes if every reporter is gone.
    pub fn next(&self) -> impl Future<Output = Progress> + '_ {
        std::future::poll_fn(|cx| {
            let mut slot = lock(&self.shared);
            if let Some(progress) = slot.newest.take() {
                return Poll::Ready(progress);
            }
            match &mut slot.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Wake};

    #[test]
    fn a_long_progress_message_is_cut_at_a_character_boundary() {
        let (reporter, receiver) = ProgressReporter::channel();
        reporter.percent(5, "é".repeat(MAX_PROGRESS_MESSAGE_BYTES));
        let taken = receiver.take().expect("a report");
        assert!(taken.message.len() <= MAX_PROGRESS_MESSAGE_BYTES);
        assert!(taken.message.ends_with('…'));
        reporter.percent(6, "short");
        assert_eq!(receiver.take().expect("a report").message, "short");
    }

    #[test]
    fn a_report_past_100_percent_or_its_total_is_kept_in_range() {
        let (reporter, receiver) = ProgressReporter::channel();
        reporter.report(Progress {
            percent: 250,
            message: "over".to_owned(),
            current: 9,
            total: 3,
        });
        let taken = receiver.take().expect("a report");
        assert_eq!((taken.percent, taken.current, taken.total), (100, 3, 3));
        // Units with no known total stay as counted.
        reporter.report(Progress {
            percent: 40,
            message: String::new(),
            current: 7,
            total: 0,
        });
        let taken = receiver.take().expect("a report");
        assert_eq!((taken.percent, taken.current), (40, 7));
    }

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_once<F: Future>(future: Pin<&mut F>, waker: &Arc<CountingWaker>) -> Poll<F::Output> {
        let waker = Waker::from(Arc::clone(waker));
        future.poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn reports_coalesce_to_the_newest_and_are_taken_once() {
        let (reporter, receiver) = ProgressReporter::channel();
        assert_eq!(receiver.take(), None);
        reporter.units(1, 4, "one");
        reporter.clone().units(2, 4, "two");
        assert_eq!(receiver.take(), Some(Progress::of(2, 4, "two")));
        assert_eq!(receiver.take(), None);
    }

    #[test]
    fn a_report_wakes_the_waiting_receiver_once_until_it_waits_again() {
        let (reporter, receiver) = ProgressReporter::channel();
        let woken = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let mut next = std::pin::pin!(receiver.next());
        assert!(poll_once(next.as_mut(), &woken).is_pending());
        std::thread::scope(|s| {
            s.spawn(|| {
                reporter.percent(10, "first");
                reporter.percent(30, "elsewhere");
            });
        });
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "one wake for both");
        assert_eq!(
            poll_once(next.as_mut(), &woken),
            Poll::Ready(Progress::percent(30, "elsewhere"))
        );
    }
}
