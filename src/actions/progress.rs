//! The channel a handler reports its progress on, and the executor's end of it.
//!
//! Nearly every report is made from inside the handler's future, which the job's owner task
//! is polling at that moment; that task takes the report right after the poll. Waking it as
//! well (as a general-purpose channel does) would only poll it once more for nothing, for every
//! report. So the receiver says when it is polling the handler ([`ProgressReceiver::polling`])
//! and a report made meanwhile wakes nobody; one made from anywhere else (a task or thread the
//! handler started) wakes the owner as usual.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use crate::job::{Progress, truncate};

/// The longest progress message kept, in bytes: every snapshot of the job repeats it (every
/// action's last one), and the job must still fit in one response.
pub const MAX_PROGRESS_MESSAGE_BYTES: usize = 1024;

#[derive(Default)]
struct Slot {
    /// The newest report not taken yet: older ones are coalesced away.
    newest: Option<Progress>,
    /// Whom a report made outside a poll of the handler wakes.
    waker: Option<Waker>,
}

#[derive(Default)]
struct Channel {
    slot: Mutex<Slot>,
    /// The receiver is polling the handler and looks for reports once the poll returns. Set
    /// and cleared around every poll of the handler without the lock: a report reads it
    /// under the lock, after storing itself, and the receiver takes reports under the lock
    /// after the poll, so a report either wakes the receiver or is found by it.
    in_poll: AtomicBool,
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
            if self.shared.in_poll.load(Ordering::Acquire) {
                None
            } else {
                slot.waker.take()
            }
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

    /// `future` (the handler), polled so that its reports during each poll wake nobody: the
    /// caller must look for a report ([`ProgressReceiver::next`] or
    /// [`ProgressReceiver::take`]) after every poll of it, in the same poll of its own task.
    pub(crate) fn polling<F: Future + Unpin>(&self, future: F) -> Polling<F> {
        Polling {
            shared: Arc::clone(&self.shared),
            future,
        }
    }
}

/// See [`ProgressReceiver::polling`].
pub(crate) struct Polling<F> {
    shared: Shared,
    future: F,
}

impl<F: Future + Unpin> Future for Polling<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        /// Clears the flag however the poll ends, a panic included.
        struct InPoll<'a>(&'a Shared);
        impl Drop for InPoll<'_> {
            fn drop(&mut self) {
                self.0.in_poll.store(false, Ordering::Release);
            }
        }
        this.shared.in_poll.store(true, Ordering::Release);
        let _in_poll = InPoll(&this.shared);
        Pin::new(&mut this.future).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

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
    fn a_report_from_outside_the_handler_wakes_the_receiver() {
        let (reporter, receiver) = ProgressReporter::channel();
        let woken = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let mut next = std::pin::pin!(receiver.next());
        assert!(poll_once(next.as_mut(), &woken).is_pending());
        std::thread::scope(|s| {
            s.spawn(|| reporter.percent(30, "elsewhere"));
        });
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            poll_once(next.as_mut(), &woken),
            Poll::Ready(Progress::percent(30, "elsewhere"))
        );
    }

    #[test]
    fn a_report_made_while_the_handler_is_polled_wakes_nobody_and_is_taken_after() {
        let (reporter, receiver) = ProgressReporter::channel();
        let woken = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let mut next = std::pin::pin!(receiver.next());
        assert!(poll_once(next.as_mut(), &woken).is_pending());
        let handler = std::future::poll_fn(|_| {
            reporter.percent(10, "inside");
            Poll::<()>::Pending
        });
        let mut handler = std::pin::pin!(receiver.polling(Box::pin(handler)));
        assert!(poll_once(handler.as_mut(), &woken).is_pending());
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            0,
            "no wake for a report in the poll"
        );
        assert_eq!(
            poll_once(next.as_mut(), &woken),
            Poll::Ready(Progress::percent(10, "inside"))
        );
        // Once the poll is over, a report wakes again.
        assert!(poll_once(next.as_mut(), &woken).is_pending());
        reporter.percent(20, "after");
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
    }
}
