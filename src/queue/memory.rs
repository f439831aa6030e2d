//! The in-process queue, for one bucket node.
use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Queue, QueueError};

#[derive(Default)]
pub struct MemoryQueue {
    inner: Mutex<Inner>,
    ready: Notify,
}

#[derive(Default)]
struct Inner {
    order: VecDeque<Uuid>,
    queued: HashSet<Uuid>,
}

impl Inner {
    fn take(&mut self, max: usize) -> Vec<Uuid> {
        let n = max.min(self.order.len());
        let ids: Vec<Uuid> = self.order.drain(..n).collect();
        for id in &ids {
            self.queued.remove(id);
        }
        ids
    }
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many ids wait, without the async trait's ceremony.
    pub fn depth_now(&self) -> usize {
        self.lock().order.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("queue lock poisoned")
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn push(&self, ids: &[Uuid]) -> Result<(), QueueError> {
        let added = {
            let mut inner = self.lock();
            let mut added = 0;
            for id in ids {
                if inner.queued.insert(*id) {
                    inner.order.push_back(*id);
                    added += 1;
                }
            }
            added
        };
        if added > 0 {
            self.ready.notify_waiters();
        }
        Ok(())
    }

    async fn take(&self, max: usize) -> Result<Vec<Uuid>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        loop {
            // Register interest before looking, so a push between the look
            // and the wait still wakes us.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ids = self.lock().take(max);
            if !ids.is_empty() {
                // Others may be waiting for what we left behind.
                if !self.lock().order.is_empty() {
                    self.ready.notify_waiters();
                }
                return Ok(ids);
            }
            notified.await;
        }
    }

    async fn try_take(&self, max: usize) -> Result<Vec<Uuid>, QueueError> {
        Ok(self.lock().take(max))
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        Ok(self.depth_now() as u64)
    }

    async fn queued_ids(&self) -> Result<HashSet<Uuid>, QueueError> {
        Ok(self.lock().queued.clone())
    }

    fn redis_connected(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn fifo_without_duplicates() {
        let q = MemoryQueue::new();
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        q.push(&ids).await.unwrap();
        q.push(&ids[..1]).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), 3);
        assert_eq!(q.take(2).await.unwrap(), ids[..2]);
        assert_eq!(q.try_take(5).await.unwrap(), ids[2..]);
        assert!(q.try_take(5).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn take_waits_for_push() {
        let q = Arc::new(MemoryQueue::new());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.take(10).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let id = Uuid::new_v4();
        q.push(&[id]).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![id]);
    }
}
