//! The writer task: group commit.
//!
//! Every write waits in one channel. A writer takes whatever is waiting (up
//! to `max_commit`) and applies it in one transaction, so N concurrent
//! ingests cost one fsync, not N. Each waiter gets its own result: when a
//! batch fails as a whole it is retried one write at a time, so a single bad
//! write cannot fail its neighbours (unless the database itself is away,
//! which fails them all at once).
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::{Backend, Inserted, Mark, MarkOutcome, Released, StoreError, StoredPacket};
use crate::domain::Packet;

/// One write.
#[derive(Debug, Clone)]
pub enum WriteOp {
    Insert(Box<Packet>),
    /// Lease those of `ids` still pending to `owner`, counting a delivery.
    Lease {
        ids: Vec<Uuid>,
        owner: String,
        expires_at: DateTime<Utc>,
    },
    Mark(Mark),
    /// Leases expired by `now` end: pending again, or dead_letter once the
    /// packet was delivered `max_deliveries` times.
    ExpireLeases {
        now: DateTime<Utc>,
        max_deliveries: u32,
    },
    /// Every lease `owner` holds ends, as above.
    ReleaseOwner {
        owner: String,
        max_deliveries: u32,
    },
}

/// The answer to one write, in the order of the ops.
#[derive(Debug)]
pub enum WriteReply {
    Inserted(Inserted),
    Leased(Vec<StoredPacket>),
    Marked(MarkOutcome),
    Released(Vec<Released>),
}

type Job = (WriteOp, oneshot::Sender<Result<WriteReply, StoreError>>);

/// Handle to the writer tasks.
#[derive(Clone)]
pub struct Writer {
    tx: Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<Job>>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Writer {
    pub fn start(backend: Arc<dyn Backend>, max_commit: usize) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut tasks = JoinSet::new();
        for _ in 0..backend.writers().max(1) {
            tasks.spawn(run(backend.clone(), rx.clone(), max_commit.max(1)));
        }
        Writer {
            tx: Arc::new(std::sync::Mutex::new(Some(tx))),
            tasks: Arc::new(Mutex::new(tasks)),
        }
    }

    /// Queues a write and waits for its commit.
    pub async fn submit(&self, op: WriteOp) -> Result<WriteReply, StoreError> {
        self.enqueue(op).await
    }

    /// Queues a write now; the returned future resolves after its commit.
    pub fn enqueue(
        &self,
        op: WriteOp,
    ) -> impl Future<Output = Result<WriteReply, StoreError>> + use<> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = match &*self.tx.lock().expect("writer lock poisoned") {
            Some(tx) => tx.send((op, reply_tx)).is_ok(),
            None => false,
        };
        async move {
            if !sent {
                return Err(StoreError::Unavailable(
                    "the bucket is shutting down".into(),
                ));
            }
            reply_rx
                .await
                .unwrap_or_else(|_| Err(StoreError::Internal("the writer task stopped".into())))
        }
    }

    /// Refuses new writes, commits every write already queued, and waits
    /// for the writer tasks to finish.
    pub async fn close(&self) {
        self.tx.lock().expect("writer lock poisoned").take();
        let mut tasks = self.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
    }
}

async fn run(
    backend: Arc<dyn Backend>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    max_commit: usize,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(max_commit);
    loop {
        {
            // One writer at a time gathers a batch; others wait their turn
            // and then gather what arrived meanwhile.
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, max_commit).await == 0 {
                return; // closed and drained
            }
        }
        commit(backend.as_ref(), &mut jobs).await;
    }
}

async fn commit(backend: &dyn Backend, jobs: &mut Vec<Job>) {
    let (ops, senders): (Vec<WriteOp>, Vec<_>) = jobs.drain(..).unzip();
    let started = std::time::Instant::now();
    let result = backend.write_batch(&ops).await;
    metrics::histogram!("bucket_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("bucket_commit_writes").record(ops.len() as f64);
    tracing::trace!(
        writes = ops.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "commit"
    );
    match result {
        Ok(replies) => {
            for (reply_tx, reply) in senders.into_iter().zip(replies) {
                let _ = reply_tx.send(Ok(reply));
            }
        }
        // Alone, or the database itself is away: every waiter gets the
        // error now. Retrying one by one only helps when one write is at
        // fault, and against a dead database it would make each waiter sit
        // through its own connection timeout.
        Err(e) if ops.len() == 1 || matches!(e, StoreError::Unavailable(_)) => {
            for reply_tx in senders {
                let _ = reply_tx.send(Err(e.clone()));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, batch = ops.len(), "batch failed; retrying one by one");
            for (op, reply_tx) in ops.iter().zip(senders) {
                let result = backend
                    .write_batch(std::slice::from_ref(op))
                    .await
                    .map(|mut replies| replies.pop().expect("one reply per op"));
                let _ = reply_tx.send(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::domain::packet::{PacketDraft, TimestampInput};
    use crate::store::{Counts, StoredPacket, UserQuery};

    /// Fails a whole batch when it holds a packet of user "bad", or always
    /// when `down`; counts the batches it was asked to apply.
    struct Fake {
        down: bool,
        batches: AtomicUsize,
    }

    #[async_trait]
    impl Backend for Fake {
        async fn write_batch(&self, ops: &[WriteOp]) -> Result<Vec<WriteReply>, StoreError> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            if self.down {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            ops.iter()
                .map(|op| match op {
                    WriteOp::Insert(p) if p.user_id == "bad" => {
                        Err(StoreError::Internal("constraint".into()))
                    }
                    WriteOp::Insert(p) => Ok(WriteReply::Inserted(Inserted {
                        packet_id: p.packet_id,
                        received_at: Utc::now(),
                        created: true,
                    })),
                    _ => unreachable!("inserts only here"),
                })
                .collect()
        }
        async fn pending_ids(&self) -> Result<Vec<Uuid>, StoreError> {
            Ok(Vec::new())
        }
        async fn user_packets(&self, _: &UserQuery) -> Result<Vec<StoredPacket>, StoreError> {
            Ok(Vec::new())
        }
        async fn counts(&self) -> Result<Counts, StoreError> {
            Ok(Counts::default())
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn writers(&self) -> usize {
            1
        }
    }

    fn insert(user: &str) -> WriteOp {
        let draft = PacketDraft {
            user_id: Some(user.into()),
            timestamp: Some(TimestampInput::At(Utc::now())),
            cognitive_state: Some("ON_TASK".into()),
            active_seconds: Some(5.0),
            idle_seconds: Some(0.0),
            away_seconds: Some(0.0),
            raw_signals: Some(serde_json::json!({})),
            ..Default::default()
        };
        WriteOp::Insert(Box::new(Packet::parse(draft, Utc::now()).unwrap()))
    }

    #[tokio::test]
    async fn one_bad_write_does_not_fail_its_batch() {
        let fake = Arc::new(Fake {
            down: false,
            batches: AtomicUsize::new(0),
        });
        let writer = Writer::start(fake.clone(), 100);
        // Queued before the writer runs, so they share one batch.
        let pending: Vec<_> = ["a", "bad", "c"]
            .iter()
            .map(|u| writer.enqueue(insert(u)))
            .collect();
        let mut results = Vec::new();
        for p in pending {
            results.push(p.await.is_ok());
        }
        assert_eq!(results, [true, false, true]);
        // One batch of three, then each write alone.
        assert_eq!(fake.batches.load(Ordering::SeqCst), 4);
        writer.close().await;
    }

    #[tokio::test]
    async fn a_dead_database_fails_every_waiter_at_once() {
        let fake = Arc::new(Fake {
            down: true,
            batches: AtomicUsize::new(0),
        });
        let writer = Writer::start(fake.clone(), 100);
        let pending: Vec<_> = (0..50).map(|_| writer.enqueue(insert("a"))).collect();
        for p in pending {
            assert!(matches!(p.await, Err(StoreError::Unavailable(_))));
        }
        assert!(
            fake.batches.load(Ordering::SeqCst) < 5,
            "no write-by-write retries against a dead database"
        );
        writer.close().await;
        assert!(
            matches!(
                writer.submit(insert("a")).await,
                Err(StoreError::Unavailable(_))
            ),
            "closed"
        );
    }
}
