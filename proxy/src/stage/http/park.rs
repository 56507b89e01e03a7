//! The waits of parked HTTP/1 connections (`Http1` in `mod.rs`): one timer
//! per stage instead of a tokio `Sleep` (112 bytes) in every idle
//! keep-alive client's task.
//!
//! A wait is an entry of 32 bytes in a slab shared by the stage's
//! connections. One task, running only while there are waits, sleeps until
//! the earliest end and wakes every connection whose wait has ended; a wait
//! ends at most [`GRAIN`] late, so that thousands of waits ending near each
//! other cost one sweep.

use std::{
    fmt,
    sync::{Arc, Mutex, MutexGuard, Weak},
    task::{Context, Poll, Waker},
    time::Duration,
};

use slab::Slab;
use tokio::time::Instant;

/// How late a wait may end: one sweep wakes all that end within it.
const GRAIN: Duration = Duration::from_millis(50);

/// The waits of one stage's parked connections. All last as long (the
/// stage's `header_read_timeout` less the time before parking), so a new
/// wait never ends before one already running: the sweep never has to come
/// earlier than it planned.
#[derive(Default)]
pub struct ParkedWaits(Arc<Mutex<Waits>>);

/// A clone starts empty, like the other per-stage state of `HttpSettings`.
impl Clone for ParkedWaits {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for ParkedWaits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParkedWaits")
            .field("waiting", &self.waiting())
            .finish()
    }
}

struct Waits {
    entries: Slab<Entry>,
    /// Whether the sweep task runs (it ends when no wait is left).
    sweeping: bool,
    /// What deadlines count from.
    epoch: Instant,
}

impl Default for Waits {
    fn default() -> Self {
        Self {
            entries: Slab::new(),
            sweeping: false,
            epoch: Instant::now(),
        }
    }
}

struct Entry {
    /// Milliseconds since `epoch`.
    deadline_ms: u64,
    waker: Waker,
    ended: bool,
}

impl Waits {
    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

fn lock(waits: &Mutex<Waits>) -> MutexGuard<'_, Waits> {
    waits.lock().unwrap_or_else(|e| e.into_inner())
}

impl ParkedWaits {
    /// A wait of `length` from now, for the task of `cx`. Must be called
    /// within the stage's runtime (the sweep is spawned there).
    pub fn start(&self, length: Duration, cx: &Context<'_>) -> ParkedWait {
        let mut waits = lock(&self.0);
        let deadline_ms = waits.ms(Instant::now() + length);
        let key = waits.entries.insert(Entry {
            deadline_ms,
            waker: cx.waker().clone(),
            ended: false,
        });
        if !waits.sweeping {
            waits.sweeping = true;
            let at = waits.epoch + Duration::from_millis(deadline_ms);
            tokio::spawn(sweep(Arc::downgrade(&self.0), at));
        }
        ParkedWait {
            waits: self.0.clone(),
            key,
        }
    }

    /// Waits not yet ended or dropped.
    pub fn waiting(&self) -> usize {
        lock(&self.0)
            .entries
            .iter()
            .filter(|(_, e)| !e.ended)
            .count()
    }

    #[cfg(test)]
    fn sweeping(&self) -> bool {
        lock(&self.0).sweeping
    }
}

/// Wakes the waits that ended, until none is left.
async fn sweep(waits: Weak<Mutex<Waits>>, mut at: Instant) {
    loop {
        tokio::time::sleep_until(at).await;
        let Some(waits) = waits.upgrade() else {
            return;
        };
        let mut waits = lock(&waits);
        let now = Instant::now();
        let now_ms = waits.ms(now);
        let mut earliest = None::<u64>;
        for (_, e) in waits.entries.iter_mut().filter(|(_, e)| !e.ended) {
            if e.deadline_ms <= now_ms {
                e.ended = true;
                e.waker.wake_by_ref();
            } else {
                earliest = Some(earliest.map_or(e.deadline_ms, |d| d.min(e.deadline_ms)));
            }
        }
        let Some(earliest) = earliest else {
            waits.sweeping = false;
            return;
        };
        at = (waits.epoch + Duration::from_millis(earliest)).max(now + GRAIN);
    }
}

/// One parked connection's wait; dropping it (the connection woke, or
/// closed) takes it out.
pub struct ParkedWait {
    waits: Arc<Mutex<Waits>>,
    key: usize,
}

impl ParkedWait {
    /// Ready once the wait has ended; else the task of `cx` is woken then.
    pub fn poll_ended(&self, cx: &Context<'_>) -> Poll<()> {
        let mut waits = lock(&self.waits);
        let entry = &mut waits.entries[self.key];
        if entry.ended {
            return Poll::Ready(());
        }
        if !entry.waker.will_wake(cx.waker()) {
            entry.waker = cx.waker().clone();
        }
        Poll::Pending
    }
}

impl Drop for ParkedWait {
    fn drop(&mut self) {
        lock(&self.waits).entries.remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// Waits for `wait` to end; when it did. A wait nobody wakes fails
    /// the test (the paused clock jumps to this timeout) instead of hanging.
    async fn ended(wait: &ParkedWait) -> Instant {
        tokio::time::timeout(Duration::from_secs(60), poll_fn(|cx| wait.poll_ended(cx)))
            .await
            .expect("the wait was never woken");
        Instant::now()
    }

    async fn start(waits: &ParkedWaits, length: Duration) -> ParkedWait {
        poll_fn(|cx| Poll::Ready(waits.start(length, cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn waits_end_on_time_and_the_sweep_stops_when_none_is_left() {
        let waits = ParkedWaits::default();
        let length = Duration::from_secs(2);
        let t0 = Instant::now();
        let first = start(&waits, length).await;
        tokio::time::advance(Duration::from_millis(10)).await;
        let second = start(&waits, length).await;
        let dropped = start(&waits, length).await;
        assert_eq!(waits.waiting(), 3);
        assert!(waits.sweeping());
        drop(dropped);
        assert_eq!(waits.waiting(), 2);

        let took = ended(&first).await - t0;
        assert!(
            took >= length && took <= length + GRAIN,
            "the first wait ended after {took:?}"
        );
        // The second ends at most a grain after the sweep that ended the
        // first, never before its own end.
        let took = ended(&second).await - t0;
        let (end, latest) = (length + Duration::from_millis(10), length + GRAIN);
        assert!(
            took >= end && took <= latest,
            "the second ended after {took:?}"
        );
        assert_eq!(waits.waiting(), 0);
        // Nothing left to wait for: the sweep has ended, and a new wait
        // starts it again.
        tokio::task::yield_now().await;
        assert!(!waits.sweeping());
        drop((first, second));
        let t1 = Instant::now();
        let again = start(&waits, length).await;
        assert!(waits.sweeping());
        let took = ended(&again).await - t1;
        assert!(took >= length && took <= length + GRAIN, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_dropped_before_its_end_wakes_nothing_and_frees_its_entry() {
        let waits = ParkedWaits::default();
        let wait = start(&waits, Duration::from_secs(1)).await;
        drop(wait);
        assert_eq!(lock(&waits.0).entries.len(), 0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        assert!(
            !waits.sweeping(),
            "the sweep goes on with nothing to wait for"
        );
    }
}
