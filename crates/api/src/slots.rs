//! Bounded concurrency for executions: `max_concurrent` slots and a queue of `max_queue`
//! waiters. A request that finds the queue full gets 429 at once, with a `Retry-After` from the
//! recent run times, instead of piling up.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Slots and queue.
pub struct Slots {
    sem: Arc<Semaphore>,
    max_concurrent: usize,
    max_queue: usize,
    waiting: AtomicUsize,
    /// Moving average of run times, milliseconds.
    avg_ms: AtomicU64,
}

/// A held slot; dropping it frees the slot and records the run time.
pub struct Slot<'a> {
    _permit: OwnedSemaphorePermit,
    slots: &'a Slots,
    started: std::time::Instant,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let ms = self.started.elapsed().as_millis() as u64;
        let old = self.slots.avg_ms.load(Ordering::Relaxed);
        self.slots
            .avg_ms
            .store((old * 7 + ms) / 8, Ordering::Relaxed);
    }
}

/// Removes a waiter from the queue count however the wait ends (also when the request is
/// dropped because its client went away).
struct Waiting<'a>(&'a Slots, &'a Metrics);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let n = self.0.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        self.1.queue_depth.set(n as i64);
    }
}

impl Slots {
    /// `max_concurrent` slots, `max_queue` waiters.
    pub fn new(max_concurrent: usize, max_queue: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            max_queue,
            waiting: AtomicUsize::new(0),
            avg_ms: AtomicU64::new(5_000),
        }
    }

    /// Executions waiting now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Executions running now.
    pub fn running(&self) -> usize {
        self.max_concurrent - self.sem.available_permits()
    }

    /// A slot now, or after waiting in the queue; 429 when the queue is full.
    pub async fn acquire<'a>(&'a self, metrics: &'a Metrics) -> Result<Slot<'a>, ApiError> {
        let permit = match self.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let before = self.waiting.fetch_add(1, Ordering::SeqCst);
                let guard = Waiting(self, metrics);
                if before >= self.max_queue {
                    drop(guard);
                    metrics.rejected.inc();
                    let per_slot = (before + 1).div_ceil(self.max_concurrent.max(1)) as u64;
                    let retry_after = (per_slot * self.avg_ms.load(Ordering::Relaxed))
                        .div_ceil(1000)
                        .max(1);
                    return Err(ApiError::Busy {
                        running: self.running(),
                        queued: before,
                        retry_after,
                    });
                }
                metrics.queue_depth.set((before + 1) as i64);
                let p = self
                    .sem
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ApiError::ShuttingDown)?;
                drop(guard);
                p
            }
        };
        Ok(Slot {
            _permit: permit,
            slots: self,
            started: std::time::Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_answers_busy_and_frees_its_place() {
        let m = Metrics::default();
        let s = Slots::new(1, 1);
        let held = s.acquire(&m).await.unwrap();
        assert_eq!(s.running(), 1);
        // One waiter fits in the queue.
        let waiter = s.acquire(&m);
        tokio::pin!(waiter);
        assert!(futures::poll!(&mut waiter).is_pending());
        assert_eq!(s.queued(), 1);
        // The next is refused with a Retry-After.
        match s.acquire(&m).await {
            Err(ApiError::Busy {
                queued: 1,
                retry_after,
                ..
            }) => assert!(retry_after >= 1),
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
        assert_eq!(s.queued(), 1, "a refused request takes no place");
        drop(held);
        let got = waiter.await.unwrap();
        assert_eq!(s.queued(), 0);
        drop(got);
        assert_eq!(s.running(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_leaves_the_queue() {
        let m = Metrics::default();
        let s = Slots::new(1, 4);
        let _held = s.acquire(&m).await.unwrap();
        {
            let w = s.acquire(&m);
            tokio::pin!(w);
            assert!(futures::poll!(&mut w).is_pending());
            assert_eq!(s.queued(), 1);
        }
        assert_eq!(s.queued(), 0);
    }
}
