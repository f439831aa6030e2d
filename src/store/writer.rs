//! The writer tasks: group commit, in two lanes.
//!
//! Writes wait in one of two lanes: inserts (ingest), and marks with lease
//! ends (delivery). A writer takes whatever waits in its lane (up to
//! `max_commit`) and applies it in one transaction, so N concurrent
//! requests cost one fsync, not N. Marks never wait behind an ingest burst:
//! PostgreSQL gives each lane writers of their own; SQLite, which has one
//! writer anyway, takes every waiting mark first into each commit.
//!
//! Each waiter gets its own result: when a batch fails as a whole it is
//! retried one write at a time, so a single bad write cannot fail its
//! neighbours (unless the database itself is away, which fails them all at
//! once).
use std::sync::Arc;

use tokio::sync::{Mutex, RwLock, mpsc, oneshot};
use tokio::task::JoinSet;

use super::{
    Backend, CommitListener, Inserted, LeaseEnd, Mark, MarkOutcome, PendingPacket, Released,
    StoreError,
};
use crate::domain::Packet;

/// One write.
#[derive(Debug, Clone)]
pub enum WriteOp {
    Insert(Arc<Packet>),
    Mark(Mark),
    /// Leases that ended unmarked: count their deliveries; a packet out of
    /// deliveries becomes dead_letter.
    EndLeases {
        ends: Vec<LeaseEnd>,
        max_deliveries: u32,
    },
}

impl WriteOp {
    fn is_delivery(&self) -> bool {
        !matches!(self, WriteOp::Insert(_))
    }
}

/// The answer to one write, in the order of the ops.
#[derive(Debug)]
pub enum WriteReply {
    Inserted(Inserted),
    Marked(MarkOutcome),
    Released(Vec<Released>),
}

type Reply = Result<WriteReply, StoreError>;
type Job = (WriteOp, oneshot::Sender<Reply>);
type Lane = mpsc::UnboundedSender<Job>;

/// Handle to the writer tasks.
#[derive(Clone)]
pub struct Writer {
    /// (ingest, delivery); None once closed.
    lanes: Arc<std::sync::Mutex<Option<(Lane, Lane)>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

/// What every writer task shares.
struct Shared {
    backend: Arc<dyn Backend>,
    gate: Arc<RwLock<()>>,
    listener: Arc<dyn CommitListener>,
    max_commit: usize,
}

impl Writer {
    /// A writer that refuses every write (before the tasks start).
    pub fn idle() -> Writer {
        Writer {
            lanes: Arc::new(std::sync::Mutex::new(None)),
            tasks: Arc::new(Mutex::new(JoinSet::new())),
        }
    }

    /// Starts the writer tasks behind this handle (and its clones).
    pub fn start(
        &self,
        backend: Arc<dyn Backend>,
        gate: Arc<RwLock<()>>,
        max_commit: usize,
        listener: Arc<dyn CommitListener>,
    ) {
        let writers = backend.writers();
        let shared = Arc::new(Shared {
            backend,
            gate,
            listener,
            max_commit: max_commit.max(1),
        });
        let (ingest_tx, ingest_rx) = mpsc::unbounded_channel::<Job>();
        let (delivery_tx, delivery_rx) = mpsc::unbounded_channel::<Job>();
        let mut tasks = JoinSet::new();
        if writers.delivery == 0 {
            tasks.spawn(run_combined(shared, delivery_rx, ingest_rx));
        } else {
            let ingest_rx = Arc::new(Mutex::new(ingest_rx));
            let delivery_rx = Arc::new(Mutex::new(delivery_rx));
            for _ in 0..writers.ingest.max(1) {
                tasks.spawn(run_lane(shared.clone(), ingest_rx.clone()));
            }
            for _ in 0..writers.delivery {
                tasks.spawn(run_lane(shared.clone(), delivery_rx.clone()));
            }
        }
        *self.lanes.lock().expect("writer lock poisoned") = Some((ingest_tx, delivery_tx));
        *self
            .tasks
            .try_lock()
            .expect("started once, before any close") = tasks;
    }

    /// Queues writes together, so they share commits, and waits for each.
    pub async fn submit_all(&self, ops: impl IntoIterator<Item = WriteOp>) -> Vec<Reply> {
        let waiting: Vec<_> = ops.into_iter().map(|op| self.enqueue(op)).collect();
        let mut replies = Vec::with_capacity(waiting.len());
        for reply in waiting {
            replies.push(match reply {
                Some(rx) => rx.await.unwrap_or_else(|_| {
                    Err(StoreError::Internal("the writer task stopped".into()))
                }),
                None => Err(StoreError::Unavailable(
                    "the bucket is shutting down".into(),
                )),
            });
        }
        replies
    }

    fn enqueue(&self, op: WriteOp) -> Option<oneshot::Receiver<Reply>> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let lanes = self.lanes.lock().expect("writer lock poisoned");
        let (ingest, delivery) = lanes.as_ref()?;
        let lane = if op.is_delivery() { delivery } else { ingest };
        lane.send((op, reply_tx)).ok()?;
        Some(reply_rx)
    }

    /// Refuses new writes, commits every write already queued, and waits
    /// for the writer tasks to finish.
    pub async fn close(&self) {
        self.lanes.lock().expect("writer lock poisoned").take();
        let mut tasks = self.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
    }
}

/// A writer of one lane, beside others of the same lane.
async fn run_lane(shared: Arc<Shared>, rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(shared.max_commit);
    loop {
        {
            // One writer at a time gathers a batch; others wait their turn
            // and then gather what arrived meanwhile.
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, shared.max_commit).await == 0 {
                return; // closed and drained
            }
        }
        commit(&shared, &mut jobs).await;
    }
}

/// The one writer of an engine with one writer: every waiting delivery
/// write first, then inserts up to `max_commit`.
async fn run_combined(
    shared: Arc<Shared>,
    mut delivery: mpsc::UnboundedReceiver<Job>,
    mut ingest: mpsc::UnboundedReceiver<Job>,
) {
    let max = shared.max_commit;
    let mut jobs: Vec<Job> = Vec::with_capacity(max);
    let (mut delivery_open, mut ingest_open) = (true, true);
    while delivery_open || ingest_open {
        drain_ready(&mut delivery, &mut jobs, usize::MAX);
        drain_ready(&mut ingest, &mut jobs, max);
        if jobs.is_empty() {
            tokio::select! {
                job = delivery.recv(), if delivery_open => match job {
                    Some(job) => jobs.push(job),
                    None => delivery_open = false,
                },
                job = ingest.recv(), if ingest_open => match job {
                    Some(job) => jobs.push(job),
                    None => ingest_open = false,
                },
            }
            // Whatever else waits now joins this commit.
            drain_ready(&mut delivery, &mut jobs, usize::MAX);
            drain_ready(&mut ingest, &mut jobs, max);
        }
        if !jobs.is_empty() {
            commit(&shared, &mut jobs).await;
        }
    }
}

/// Moves waiting jobs into `jobs` without waiting, until `jobs` holds `max`.
fn drain_ready(rx: &mut mpsc::UnboundedReceiver<Job>, jobs: &mut Vec<Job>, max: usize) {
    while jobs.len() < max {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => return,
        }
    }
}

async fn commit(shared: &Shared, jobs: &mut Vec<Job>) {
    let (ops, senders): (Vec<WriteOp>, Vec<_>) = jobs.drain(..).unzip();
    let started = std::time::Instant::now();
    let result = shared.backend.write(&ops, shared.gate.clone()).await;
    metrics::histogram!("bucket_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("bucket_commit_writes").record(ops.len() as f64);
    match result {
        Ok((replies, gate)) => {
            announce(shared, &ops, &replies);
            drop(gate);
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
                let one = std::slice::from_ref(op);
                let result = match shared.backend.write(one, shared.gate.clone()).await {
                    Ok((mut replies, gate)) => {
                        announce(shared, one, &replies);
                        drop(gate);
                        Ok(replies.pop().expect("one reply per op"))
                    }
                    Err(e) => Err(e),
                };
                let _ = reply_tx.send(result);
            }
        }
    }
}

/// Hands every newly stored packet to the listener.
fn announce(shared: &Shared, ops: &[WriteOp], replies: &[WriteReply]) {
    let committed: Vec<PendingPacket> = ops
        .iter()
        .zip(replies)
        .filter_map(|(op, reply)| match (op, reply) {
            (WriteOp::Insert(packet), WriteReply::Inserted(r)) if r.created => {
                Some(PendingPacket {
                    packet: packet.clone(),
                    seq: r.seq,
                    received_at: r.received_at,
                    attempts: 0,
                })
            }
            _ => None,
        })
        .collect();
    if !committed.is_empty() {
        shared.listener.committed(committed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use chrono::Utc;
    use tokio::sync::OwnedRwLockReadGuard;
    use uuid::Uuid;

    use super::*;
    use crate::domain::packet::{PacketDraft, TimestampInput};
    use crate::store::{Counts, StoredPacket, UserQuery, Writers};

    /// Fails a whole batch when it holds a packet of user "bad", or always
    /// when `down`; counts the batches it was asked to apply.
    #[derive(Default)]
    struct Fake {
        down: bool,
        batches: AtomicUsize,
        /// Per batch: how many inserts, and where its marks were.
        seen: std::sync::Mutex<Vec<(usize, bool)>>,
    }

    #[async_trait]
    impl Backend for Fake {
        async fn write(
            &self,
            ops: &[WriteOp],
            gate: Arc<RwLock<()>>,
        ) -> Result<(Vec<WriteReply>, OwnedRwLockReadGuard<()>), StoreError> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            let inserts = ops.iter().filter(|op| !op.is_delivery()).count();
            let marks = ops.iter().any(WriteOp::is_delivery);
            self.seen.lock().unwrap().push((inserts, marks));
            if self.down {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            let replies = ops
                .iter()
                .map(|op| match op {
                    WriteOp::Insert(p) if p.user_id == "bad" => {
                        Err(StoreError::Internal("constraint".into()))
                    }
                    WriteOp::Insert(p) => Ok(WriteReply::Inserted(Inserted {
                        packet_id: p.packet_id,
                        received_at: Utc::now(),
                        created: true,
                        seq: 1,
                    })),
                    WriteOp::Mark(_) => Ok(WriteReply::Marked(MarkOutcome::Applied)),
                    WriteOp::EndLeases { .. } => Ok(WriteReply::Released(Vec::new())),
                })
                .collect::<Result<_, _>>()?;
            Ok((replies, gate.read_owned().await))
        }
        async fn pending_after(&self, _: i64, _: u32) -> Result<Vec<PendingPacket>, StoreError> {
            Ok(Vec::new())
        }
        async fn pending_among(&self, _: &[Uuid]) -> Result<Vec<PendingPacket>, StoreError> {
            Ok(Vec::new())
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
        fn writers(&self) -> Writers {
            Writers {
                ingest: 1,
                delivery: 0,
            }
        }
    }

    /// Counts the packets it heard of.
    #[derive(Default)]
    struct Heard(AtomicUsize);

    impl CommitListener for Heard {
        fn committed(&self, packets: Vec<PendingPacket>) {
            self.0.fetch_add(packets.len(), Ordering::SeqCst);
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
        WriteOp::Insert(Arc::new(Packet::parse(draft, Utc::now()).unwrap()))
    }

    fn start(fake: &Arc<Fake>, heard: &Arc<Heard>) -> Writer {
        let writer = Writer::idle();
        writer.start(fake.clone(), Arc::new(RwLock::new(())), 100, heard.clone());
        writer
    }

    #[tokio::test]
    async fn one_bad_write_does_not_fail_its_batch() {
        let fake = Arc::new(Fake::default());
        let heard = Arc::new(Heard::default());
        let writer = start(&fake, &heard);
        let results: Vec<bool> = writer
            .submit_all(["a", "bad", "c"].map(insert))
            .await
            .iter()
            .map(Result::is_ok)
            .collect();
        assert_eq!(results, [true, false, true]);
        // One batch of three, then each write alone.
        assert_eq!(fake.batches.load(Ordering::SeqCst), 4);
        assert_eq!(heard.0.load(Ordering::SeqCst), 2, "stored ones announced");
        writer.close().await;
    }

    #[tokio::test]
    async fn a_dead_database_fails_every_waiter_at_once() {
        let fake = Arc::new(Fake {
            down: true,
            ..Default::default()
        });
        let heard = Arc::new(Heard::default());
        let writer = start(&fake, &heard);
        let replies = writer.submit_all((0..50).map(|_| insert("a"))).await;
        assert!(
            replies
                .iter()
                .all(|r| matches!(r, Err(StoreError::Unavailable(_))))
        );
        assert!(
            fake.batches.load(Ordering::SeqCst) < 5,
            "no write-by-write retries against a dead database"
        );
        assert_eq!(heard.0.load(Ordering::SeqCst), 0, "nothing announced");
        writer.close().await;
        assert!(
            matches!(
                writer.submit_all([insert("a")]).await.pop().unwrap(),
                Err(StoreError::Unavailable(_))
            ),
            "closed"
        );
    }

    #[tokio::test]
    async fn marks_never_wait_behind_an_ingest_burst() {
        let fake = Arc::new(Fake::default());
        let heard = Arc::new(Heard::default());
        let writer = start(&fake, &heard); // max_commit 100
        let mark = WriteOp::Mark(Mark {
            packet_id: Uuid::new_v4(),
            success: true,
            karma_actions: Vec::new(),
            error_message: None,
            at: Utc::now(),
            attempt: 1,
        });
        // A burst of 1,000 inserts queued ahead of the mark.
        let burst = writer.submit_all((0..1000).map(|_| insert("a")));
        let marked = writer.submit_all([mark]);
        let (inserted, marked) = tokio::join!(burst, marked);
        assert!(inserted.iter().all(Result::is_ok));
        assert!(matches!(
            marked[0],
            Ok(WriteReply::Marked(MarkOutcome::Applied))
        ));
        let seen = fake.seen.lock().unwrap().clone();
        let first_with_mark = seen.iter().position(|(_, mark)| *mark).unwrap();
        assert!(
            first_with_mark <= 1,
            "the mark waited for {first_with_mark} commits of inserts: {seen:?}"
        );
        assert!(seen.iter().all(|(inserts, _)| *inserts <= 100), "{seen:?}");
        writer.close().await;
    }
}
