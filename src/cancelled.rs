//! Waiting on a cancellation token in a loop that polls it again at every turn: cheap.
//!
//! Open watch streams wait on the server's stopping token beside their watch, and a job's owner
//! task on the job's stop token beside its handler; both poll the token again each time they
//! have nothing else to do, which is once per message sent or progress report. A token's
//! `cancelled()` future locks the token, and its waiter list, at every poll; the streams all
//! share one token. With 10,000 jobs and watchers told of a change at once, those locks were a
//! few percent of the server's time. [`Cancelled`] registers with the token through a waker of
//! its own that notes each wake, and polls the token again only after such a wake, or when it
//! is polled from another task than before.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Completes once the token it was made from is cancelled. See the module.
pub(crate) struct Cancelled {
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    relay: Arc<Relay>,
    /// The task waker the relay forwards to, as of the last poll of `cancelled`.
    registered: Option<Waker>,
}

/// The waker `cancelled` is polled with: notes that the token woke it, then wakes the task.
#[derive(Default)]
struct Relay {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Noted before the task is woken, so the poll that wake causes sees it.
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl Cancelled {
    /// Waits for `token`.
    pub(crate) fn new(token: CancellationToken) -> Self {
        Self {
            cancelled: Box::pin(token.cancelled_owned()),
            relay: Arc::default(),
            registered: None,
        }
    }
}

impl Future for Cancelled {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let same_task = this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if same_task && !this.relay.woken.load(Ordering::Acquire) {
            // Registered for this task, and the token has not woken it since.
            return Poll::Pending;
        }
        if !same_task {
            *this.relay.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            this.registered = Some(cx.waker().clone());
        }
        // Cleared before the token is looked at: a wake after this is noted again.
        this.relay.woken.store(false, Ordering::Release);
        let relay = Waker::from(Arc::clone(&this.relay));
        this.cancelled
            .as_mut()
            .poll(&mut Context::from_waker(&relay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(stopping: &mut Cancelled, task: &Arc<CountingWaker>) -> Poll<()> {
        let waker = Waker::from(Arc::clone(task));
        Pin::new(stopping).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn it_completes_when_the_token_fires_and_wakes_the_task_that_polled_it_last() {
        let token = CancellationToken::new();
        let mut stopping = Cancelled::new(token.clone());
        let (first, second) = (Arc::default(), Arc::default());
        assert!(poll(&mut stopping, &first).is_pending());
        for _ in 0..3 {
            assert!(poll(&mut stopping, &first).is_pending());
        }
        // Polled from another task: that one is woken from now on.
        assert!(poll(&mut stopping, &second).is_pending());
        token.cancel();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(poll(&mut stopping, &second).is_ready());
    }

    #[test]
    fn a_token_cancelled_before_the_first_poll_completes_it_at_once() {
        let token = CancellationToken::new();
        let mut stopping = Cancelled::new(token.clone());
        token.cancel();
        assert!(poll(&mut stopping, &Arc::default()).is_ready());
    }

    #[tokio::test]
    async fn a_task_waiting_on_it_with_other_work_ends_when_the_token_fires() {
        let token = CancellationToken::new();
        let mut stopping = Cancelled::new(token.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let waiter = tokio::spawn(async move {
            let mut received = 0;
            loop {
                tokio::select! {
                    biased;
                    Some(_) = rx.recv() => received += 1,
                    _ = &mut stopping => return received,
                }
            }
        });
        for n in 0..100 {
            tx.send(n).unwrap();
            tokio::task::yield_now().await;
        }
        token.cancel();
        let received = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("ended once the token fired")
            .unwrap();
        assert_eq!(received, 100);
    }
}
