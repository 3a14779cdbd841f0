//! A connection's work raced against the signal that ends it (the drain's
//! turn, a stop or idle watch), polling the signal only when it woke.
//!
//! `tokio::select!` polls every branch on every wake-up of the task. A
//! proxied connection wakes for each read and write, and its signals are
//! cancellation tokens, a watch and a timer: polling them each time cost
//! ~600 instructions per TCP request/response (four `Notified` polls, a
//! mutex in `is_cancelled`) and ~1,400 per HTTP request. Here the signal is
//! polled with a waker of its own, which records that it fired; the work
//! is polled with the task's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Runs `work` until it finishes (`Some` of its output) or `signal`
/// resolves first (`None`; `work` is not polled again).
pub fn until<W: Future, S: Future>(work: W, signal: S) -> Until<W, S> {
    let woke = Arc::new(SignalWoke {
        // Polled once at the start, so it registers its wakers.
        woke: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    Until {
        work,
        signal,
        waker: Waker::from(woke.clone()),
        woke,
    }
}

pin_project_lite::pin_project! {
    pub struct Until<W, S> {
        #[pin]
        work: W,
        #[pin]
        signal: S,
        woke: Arc<SignalWoke>,
        // The signal's waker: `woke`, as a waker.
        waker: Waker,
    }
}

/// Whether the signal's waker fired since the signal was last polled, and
/// the task to wake when it does.
struct SignalWoke {
    woke: AtomicBool,
    task: AtomicWaker,
}

impl Wake for SignalWoke {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<W: Future, S: Future> Future for Until<W, S> {
    type Output = Option<W::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Before the check: a wake between the two is not lost.
        this.woke.task.register(cx.waker());
        if this.woke.woke.swap(false, Ordering::AcqRel)
            && this
                .signal
                .poll(&mut Context::from_waker(this.waker))
                .is_ready()
        {
            return Poll::Ready(None);
        }
        this.work.poll(cx).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::sync::oneshot;

    /// A future that counts its polls and never finishes.
    struct Counted(Arc<AtomicUsize>);

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn work_that_finishes_first_gives_its_output() {
        let (_keep, never) = oneshot::channel::<()>();
        assert_eq!(until(async { 7 }, never).await, Some(7));
    }

    #[tokio::test]
    async fn the_signal_ends_pending_work() {
        let (fire, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(until(std::future::pending::<()>(), signal));
        tokio::task::yield_now().await;
        fire.send(()).expect("send");
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert_eq!(ended.expect("ended in time").expect("task"), None);
    }

    #[tokio::test]
    async fn the_signal_is_polled_only_when_it_woke() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let work = async move {
            let mut sum = 0;
            while let Some(n) = rx.recv().await {
                sum += n;
            }
            sum
        };
        let task = tokio::spawn(until(work, Counted(polls.clone())));
        for n in 0..100 {
            tx.send(n).await.expect("send");
        }
        drop(tx);
        assert_eq!(task.await.expect("task"), Some(4950));
        assert_eq!(polls.load(Ordering::Relaxed), 1, "once, to register");
    }
}
