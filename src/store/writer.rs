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
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};

use std::collections::HashSet;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use tokio::sync::{Mutex, OwnedSemaphorePermit, RwLock, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use super::{
    Applied, Backend, CommitListener, Group, Inserted, LeaseEnd, Mark, MarkOutcome, PendingPacket,
    Released, StoreError,
};
use crate::domain::{Packet, PacketId};

// Recorded at every commit: the handles are made at first use and kept
// (the macro looks its key up every call), after the recorder is installed.
static COMMIT_SECONDS: LazyLock<metrics::Histogram> =
    LazyLock::new(|| metrics::histogram!("bucket_commit_seconds"));
static COMMIT_WRITES: LazyLock<metrics::Histogram> =
    LazyLock::new(|| metrics::histogram!("bucket_commit_writes"));

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
/// A write, who waits for it, and (an insert) its place in the ingest
/// lane's bound, given back when a commit takes it.
type Job = (
    WriteOp,
    oneshot::Sender<Reply>,
    Option<OwnedSemaphorePermit>,
);
type Lane = mpsc::UnboundedSender<Job>;

/// How much one commit takes.
#[derive(Debug, Clone, Copy)]
pub struct CommitLimits {
    /// Most inserts in one commit (delivery writes all join); None: the
    /// engine's default.
    pub max_writes: Option<usize>,
    /// How long a writer waits for company (see `gather`); None: the
    /// engine's default.
    pub linger: Option<Duration>,
    /// Inserts that may wait for a commit at once; past it ingest is
    /// refused UNAVAILABLE (retryable) instead of queueing without bound.
    /// Marks and lease ends are never refused (they free what is held).
    pub max_queued: usize,
}

/// Handle to the writer tasks.
#[derive(Clone)]
pub struct Writer {
    /// (ingest, delivery); None once closed.
    lanes: Arc<std::sync::Mutex<Option<(Lane, Lane)>>>,
    /// Room in the ingest lane (see [`CommitLimits::max_queued`]).
    room: Arc<std::sync::Mutex<Option<Arc<Semaphore>>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

/// What every writer task shares.
struct Shared {
    backend: Arc<dyn Backend>,
    gate: Arc<RwLock<()>>,
    listener: Arc<dyn CommitListener>,
    max_commit: usize,
    /// How long a writer lets writes gather after the first one arrives,
    /// when the previous group had company, and how long that grows to
    /// (see [`linger`]).
    linger: Duration,
    max_linger: Duration,
    per_companion: Duration,
    /// The highest seq an insert of this store was answered with: every
    /// packet a group stores after reading it gets a higher one.
    newest: AtomicI64,
}

impl Writer {
    /// A writer that refuses every write (before the tasks start).
    pub fn idle() -> Writer {
        Writer {
            lanes: Arc::new(std::sync::Mutex::new(None)),
            room: Arc::new(std::sync::Mutex::new(None)),
            tasks: Arc::new(Mutex::new(JoinSet::new())),
        }
    }

    /// Starts the writer tasks behind this handle (and its clones).
    pub fn start(
        &self,
        backend: Arc<dyn Backend>,
        gate: Arc<RwLock<()>>,
        limits: CommitLimits,
        listener: Arc<dyn CommitListener>,
    ) {
        let writers = backend.writers();
        let shared = Arc::new(Shared {
            backend,
            gate,
            listener,
            max_commit: limits.max_writes.unwrap_or(writers.max_commit).max(1),
            // A configured linger is fixed: it is also the most.
            linger: limits.linger.unwrap_or(writers.linger),
            max_linger: limits.linger.unwrap_or(writers.max_linger),
            per_companion: writers.per_companion,
            newest: AtomicI64::new(0),
        });
        let (ingest_tx, ingest_rx) = mpsc::unbounded_channel::<Job>();
        let (delivery_tx, delivery_rx) = mpsc::unbounded_channel::<Job>();
        let mut tasks = JoinSet::new();
        if writers.delivery == 0 {
            let writer = run_combined(shared, delivery_rx, ingest_rx);
            if writers.blocking {
                // The engine blocks while it writes (SQLite): a thread of
                // its own, so no runtime worker ever waits on the disk.
                let (done_tx, done_rx) = oneshot::channel::<()>();
                std::thread::Builder::new()
                    .name("bucket-writer".into())
                    .spawn(move || {
                        futures::executor::block_on(writer);
                        let _ = done_tx.send(());
                    })
                    .expect("spawn the writer thread");
                tasks.spawn(async move {
                    let _ = done_rx.await;
                });
            } else {
                tasks.spawn(writer);
            }
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
        *self.room.lock().expect("writer lock poisoned") =
            Some(Arc::new(Semaphore::new(limits.max_queued.max(1))));
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
                Ok(rx) => rx.await.unwrap_or_else(|_| {
                    Err(StoreError::Internal("the writer task stopped".into()))
                }),
                Err(refused) => Err(refused),
            });
        }
        replies
    }

    fn enqueue(&self, op: WriteOp) -> Result<oneshot::Receiver<Reply>, StoreError> {
        let closed = || StoreError::Unavailable("the bucket is shutting down".into());
        let (reply_tx, reply_rx) = oneshot::channel();
        let slot = if op.is_delivery() {
            None
        } else {
            let room = self.room.lock().expect("writer lock poisoned").clone();
            let permit = room.ok_or_else(closed)?.try_acquire_owned().map_err(|_| {
                metrics::counter!("bucket_writes_refused_total").increment(1);
                StoreError::Overloaded
            })?;
            Some(permit)
        };
        let lanes = self.lanes.lock().expect("writer lock poisoned");
        let (ingest, delivery) = lanes.as_ref().ok_or_else(closed)?;
        let lane = if op.is_delivery() { delivery } else { ingest };
        lane.send((op, reply_tx, slot)).map_err(|_| closed())?;
        Ok(reply_rx)
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
    let mut last_group = 0;
    loop {
        {
            // One writer at a time gathers a batch; others wait their turn
            // and then gather what arrived meanwhile.
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, shared.max_commit).await == 0 {
                return; // closed and drained
            }
            if let Some(wait) = linger(&shared, last_group) {
                tokio::time::sleep(wait).await;
                drain_ready(&mut rx, &mut jobs, shared.max_commit);
            }
        }
        last_group = jobs.len();
        commit(&shared, &mut jobs).await;
    }
}

/// How long to let writes gather before this commit, if at all. Every
/// commit costs an fsync and the wake-ups around it (~240 µs of CPU here,
/// whatever its size), so when writes come in company (the last group had
/// several) a wait lets more share the next one, and each companion of the
/// last group lengthens it by the engine's step, up to `max_linger`:
/// under load the groups grow until the wait is at its most, and at a few
/// writes at a time it stays near `linger`. A lone client never waits: its
/// groups have one write.
fn linger(shared: &Shared, last_group: usize) -> Option<Duration> {
    wait_for_company(
        shared.linger,
        shared.max_linger,
        shared.per_companion,
        last_group,
    )
}

/// `linger`, plus `step` for each write of the last group past two, up to
/// `max`.
fn wait_for_company(
    linger: Duration,
    max: Duration,
    step: Duration,
    last_group: usize,
) -> Option<Duration> {
    if last_group <= 1 || linger.is_zero() {
        return None;
    }
    let companions = u32::try_from(last_group - 2).unwrap_or(u32::MAX);
    let grown = step
        .checked_mul(companions)
        .and_then(|extra| linger.checked_add(extra))
        .unwrap_or(max);
    Some(grown.min(max.max(linger)))
}

/// The one writer of an engine with one writer: every waiting delivery
/// write first, then inserts up to `max_commit`.
///
/// In company a commit also starts no sooner than the wait after the one
/// before it started. Under load the writes that arrive during a commit
/// would otherwise start the next one at once, and the groups would stay
/// as small as one fsync is short (610-660 commits a second of 15-16
/// writes at 5,000 packets/s). Paced, they grow to what arrives in the
/// wait (~210 commits a second of 46-50 writes), and the commits, their
/// wake-ups and the answers' socket writes become fewer (BENCHMARKS.md,
/// ninth session). A lone client is never paced, nor a full group.
async fn run_combined(
    shared: Arc<Shared>,
    mut delivery: mpsc::UnboundedReceiver<Job>,
    mut ingest: mpsc::UnboundedReceiver<Job>,
) {
    let max = shared.max_commit;
    let mut jobs: Vec<Job> = Vec::with_capacity(max);
    let (mut delivery_open, mut ingest_open) = (true, true);
    let mut last_group = 0;
    let mut last_start = std::time::Instant::now();
    while delivery_open || ingest_open {
        drain_ready(&mut delivery, &mut jobs, usize::MAX);
        drain_ready(&mut ingest, &mut jobs, max);
        let idle = jobs.is_empty();
        if idle {
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
        }
        // An idle writer waits from its first write; a busy one from the
        // last commit's start (the pacing), unless its group is full.
        let from = if idle {
            std::time::Instant::now()
        } else {
            last_start
        };
        if let Some(left) = linger(&shared, last_group)
            .and_then(|wait| still_to_wait(from.elapsed(), wait))
            .filter(|_| idle || jobs.len() < max)
        {
            // A thread of its own (see `Writer::start`): it may sleep.
            std::thread::sleep(left);
        }
        // Whatever else waits now joins this commit.
        drain_ready(&mut delivery, &mut jobs, usize::MAX);
        drain_ready(&mut ingest, &mut jobs, max);
        last_group = jobs.len();
        if !jobs.is_empty() {
            last_start = std::time::Instant::now();
            commit(&shared, &mut jobs).await;
        }
    }
}

/// What is left of `wait` counted from `since` ago; None once it is over.
fn still_to_wait(since: Duration, wait: Duration) -> Option<Duration> {
    wait.checked_sub(since).filter(|left| !left.is_zero())
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

/// Applies a group of writes; each waiter gets its own answer. When a kind
/// of write fails as a whole for another reason than the database being
/// away, its writes are tried one at a time, so one bad write cannot fail
/// its neighbours; against a dead database that would make each waiter sit
/// through its own timeout, so they all fail at once.
async fn commit(shared: &Shared, jobs: &mut Vec<Job>) {
    let started = std::time::Instant::now();
    let count = jobs.len();
    let mut inserts: Vec<(Arc<Packet>, oneshot::Sender<Reply>)> = Vec::new();
    let mut marks: Vec<(Mark, oneshot::Sender<Reply>)> = Vec::new();
    let mut ends: Vec<(Vec<LeaseEnd>, oneshot::Sender<Reply>)> = Vec::new();
    let mut max_deliveries = 1;
    for (op, reply_tx, _slot) in jobs.drain(..) {
        match op {
            WriteOp::Insert(packet) => inserts.push((packet, reply_tx)),
            WriteOp::Mark(mark) => marks.push((mark, reply_tx)),
            WriteOp::EndLeases {
                ends: some,
                max_deliveries: max,
            } => {
                max_deliveries = max;
                ends.push((some, reply_tx));
            }
        }
    }
    let at = Utc::now().trunc_subsecs(6);
    let group = Group {
        marks: marks.iter().map(|(m, _)| m).collect(),
        ends: ends.iter().flat_map(|(e, _)| e.iter().copied()).collect(),
        max_deliveries,
        inserts: inserts.iter().map(|(p, _)| p).collect(),
        at,
    };
    let floor = shared.newest.load(Ordering::SeqCst);
    let (applied, gate) = shared.backend.write(&group, &shared.gate).await;
    let inserted: Vec<Result<Inserted, StoreError>> = match applied.inserts {
        Ok(receipts) => {
            announce(shared, &group.inserts, &receipts);
            drop(gate);
            receipts.into_iter().map(Ok).collect()
        }
        Err(e) => {
            // The commit may have happened with its answer lost (the
            // connection dropped after COMMIT). A retry of such a packet
            // is answered `created: false` and never announced, so the
            // listener must look in the database for it.
            if !group.inserts.is_empty() {
                shared.listener.uncertain(floor);
            }
            drop(gate);
            one_by_one(shared, &group.inserts, e, |p| Group {
                inserts: vec![*p],
                at,
                ..Group::default()
            })
            .await
            .into_iter()
            .map(|answer| answer.and_then(|a| a.inserts.map(|mut r| r.remove(0))))
            .collect()
        }
    };
    let marked: Vec<Result<MarkOutcome, StoreError>> = match applied.marks {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(e) => one_by_one(shared, &group.marks, e, |m| Group {
            marks: vec![*m],
            ..Group::default()
        })
        .await
        .into_iter()
        .map(|answer| answer.and_then(|a| a.marks.map(|mut o| o.remove(0))))
        .collect(),
    };
    let released: Result<Vec<Released>, StoreError> = match applied.ends {
        // Failed beside other writes (one transaction on SQLite): alone.
        Err(e) if !matches!(e, StoreError::Unavailable(_)) && !alone_already(&group) => {
            let alone = Group {
                ends: group.ends.clone(),
                max_deliveries,
                ..Group::default()
            };
            shared.backend.write(&alone, &shared.gate).await.0.ends
        }
        other => other,
    };
    for ((_, reply_tx), answer) in inserts.into_iter().zip(inserted) {
        let _ = reply_tx.send(answer.map(WriteReply::Inserted));
    }
    for ((_, reply_tx), answer) in marks.into_iter().zip(marked) {
        let _ = reply_tx.send(answer.map(WriteReply::Marked));
    }
    // Lease ends are the dispatcher's own writes, retried by it on failure.
    for (mine, reply_tx) in ends {
        let ids: HashSet<PacketId> = mine.iter().map(|e| e.packet_id).collect();
        let answer = released.clone().map(|all| {
            WriteReply::Released(
                all.into_iter()
                    .filter(|r| ids.contains(&r.packet_id))
                    .collect(),
            )
        });
        let _ = reply_tx.send(answer);
    }
    COMMIT_SECONDS.record(started.elapsed().as_secs_f64());
    COMMIT_WRITES.record(count as f64);
}

/// Whether the group held lease ends only.
fn alone_already(group: &Group<'_>) -> bool {
    group.inserts.is_empty() && group.marks.is_empty()
}

/// After a kind of write failed as a whole: each write alone (announcing
/// the inserts that commit), or the error for all.
async fn one_by_one<T>(
    shared: &Shared,
    items: &[T],
    error: StoreError,
    alone: impl Fn(&T) -> Group<'_>,
) -> Vec<Result<Applied, StoreError>> {
    if items.len() == 1 || matches!(error, StoreError::Unavailable(_)) {
        return items.iter().map(|_| Err(error.clone())).collect();
    }
    tracing::debug!(%error, batch = items.len(), "batch failed; retrying one by one");
    let mut answers = Vec::with_capacity(items.len());
    for item in items {
        let group = alone(item);
        let (applied, _gate) = shared.backend.write(&group, &shared.gate).await;
        if let Ok(receipts) = &applied.inserts {
            announce(shared, &group.inserts, receipts);
        }
        answers.push(Ok(applied));
    }
    answers
}

/// Hands every newly stored packet to the listener.
fn announce(shared: &Shared, packets: &[&Arc<Packet>], receipts: &[Inserted]) {
    if let Some(newest) = receipts.iter().map(|r| r.seq).max() {
        shared.newest.fetch_max(newest, Ordering::SeqCst);
    }
    let committed: Vec<PendingPacket> = packets
        .iter()
        .zip(receipts)
        .filter(|(_, r)| r.created)
        .map(|(packet, r)| PendingPacket {
            packet: Arc::clone(packet),
            seq: r.seq,
            received_at: r.received_at,
            attempts: 0,
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

    use super::*;
    use crate::store::{Counts, StoredPacket, UserQuery, Writers};

    #[test]
    fn the_wait_grows_with_the_company_up_to_its_most() {
        let us = Duration::from_micros;
        let (base, most, step) = (us(300), us(2_000), us(100));
        assert_eq!(wait_for_company(base, most, step, 0), None);
        assert_eq!(
            wait_for_company(base, most, step, 1),
            None,
            "a lone client never waits"
        );
        assert_eq!(wait_for_company(base, most, step, 2), Some(us(300)));
        assert_eq!(wait_for_company(base, most, step, 10), Some(us(1_100)));
        assert_eq!(wait_for_company(base, most, step, 18), Some(us(1_900)));
        assert_eq!(wait_for_company(base, most, step, 19), Some(most));
        assert_eq!(wait_for_company(base, most, step, usize::MAX), Some(most));
        // A steeper step reaches the most sooner (PostgreSQL's).
        assert_eq!(
            wait_for_company(us(1_000), us(5_000), us(300), 10),
            Some(us(3_400))
        );
        assert_eq!(
            wait_for_company(us(1_000), us(5_000), us(300), 16),
            Some(us(5_000))
        );
        // Fixed when the most is the linger (a configured one).
        assert_eq!(
            wait_for_company(us(1_000), us(1_000), step, 50),
            Some(us(1_000))
        );
        assert_eq!(wait_for_company(Duration::ZERO, most, step, 50), None);
        // A most below the linger never shortens it.
        assert_eq!(wait_for_company(base, us(100), step, 50), Some(base));
    }

    #[test]
    fn a_paced_commit_waits_out_what_is_left_of_the_wait() {
        let us = Duration::from_micros;
        assert_eq!(still_to_wait(us(0), us(4_000)), Some(us(4_000)));
        assert_eq!(still_to_wait(us(1_500), us(4_000)), Some(us(2_500)));
        assert_eq!(still_to_wait(us(4_000), us(4_000)), None);
        assert_eq!(still_to_wait(us(9_000), us(4_000)), None);
    }

    /// Fails a whole batch when it holds a packet of user "bad", or always
    /// when `down`; counts the batches it was asked to apply.
    #[derive(Default)]
    struct Fake {
        down: bool,
        /// Inserts commit but answer an error (the connection dropped
        /// after COMMIT).
        lose_answers: std::sync::atomic::AtomicBool,
        batches: AtomicUsize,
        /// Per batch: how many inserts, and where its marks were.
        seen: std::sync::Mutex<Vec<(usize, bool)>>,
    }

    #[async_trait]
    impl Backend for Fake {
        async fn write(
            &self,
            group: &Group<'_>,
            gate: &Arc<RwLock<()>>,
        ) -> (Applied, Option<tokio::sync::OwnedRwLockReadGuard<()>>) {
            self.batches.fetch_add(1, Ordering::SeqCst);
            self.seen
                .lock()
                .unwrap()
                .push((group.inserts.len(), !group.marks.is_empty()));
            let down = || StoreError::Unavailable("connection refused".into());
            let guard = match group.inserts.is_empty() {
                true => None,
                false => Some(gate.clone().read_owned().await),
            };
            let inserts = if self.down || self.lose_answers.load(Ordering::SeqCst) {
                Err(down())
            } else if group.inserts.iter().any(|p| p.user_id == "bad") {
                Err(StoreError::Internal("constraint".into()))
            } else {
                Ok(group
                    .inserts
                    .iter()
                    .map(|p| Inserted {
                        packet_id: p.packet_id,
                        received_at: group.at,
                        created: true,
                        seq: 1,
                    })
                    .collect())
            };
            let marks = match self.down {
                true => Err(down()),
                false => Ok(group.marks.iter().map(|_| MarkOutcome::Applied).collect()),
            };
            let ends = match self.down {
                true => Err(down()),
                false => Ok(Vec::new()),
            };
            (
                Applied {
                    marks,
                    ends,
                    inserts,
                },
                guard,
            )
        }
        async fn prune(
            &self,
            _: chrono::DateTime<Utc>,
            _: u32,
        ) -> Result<super::super::Pruned, StoreError> {
            Ok(super::super::Pruned {
                packets: 0,
                done: true,
            })
        }
        async fn requeue(
            &self,
            _: &super::super::Requeue,
            _: chrono::DateTime<Utc>,
        ) -> Result<Vec<(PacketId, i64)>, StoreError> {
            Ok(Vec::new())
        }
        async fn pending_after(&self, _: i64, _: u32) -> Result<Vec<PendingPacket>, StoreError> {
            Ok(Vec::new())
        }
        async fn pending_among(&self, _: &[PacketId]) -> Result<Vec<PendingPacket>, StoreError> {
            Ok(Vec::new())
        }
        async fn pending_ids(&self, _: i64, _: u32) -> Result<Vec<(PacketId, i64)>, StoreError> {
            Ok(Vec::new())
        }
        async fn first_seq_since(
            &self,
            _: chrono::DateTime<Utc>,
        ) -> Result<Option<i64>, StoreError> {
            Ok(None)
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
                blocking: false,
                linger: Duration::ZERO,
                max_linger: Duration::ZERO,
                per_companion: Duration::ZERO,
                max_commit: 100,
            }
        }
    }

    /// Counts the packets it heard of, and keeps what it was told may
    /// have committed unannounced.
    #[derive(Default)]
    struct Heard(AtomicUsize, std::sync::Mutex<Vec<i64>>);

    impl CommitListener for Heard {
        fn committed(&self, packets: Vec<PendingPacket>) {
            self.0.fetch_add(packets.len(), Ordering::SeqCst);
        }

        fn uncertain(&self, after_seq: i64) {
            self.1.lock().unwrap().push(after_seq);
        }
    }

    fn insert(user: &str) -> WriteOp {
        WriteOp::Insert(Packet::sample(user))
    }

    fn mark() -> WriteOp {
        WriteOp::Mark(Mark {
            packet_id: PacketId::new(),
            success: true,
            karma_actions: serde_json::value::to_raw_value(&[(); 0]).unwrap(),
            error_message: None,
            at: Utc::now(),
            attempt: crate::store::MarkedDelivery::Attempt(1),
        })
    }

    fn start(fake: &Arc<Fake>, heard: &Arc<Heard>) -> Writer {
        start_with(fake, heard, 100_000)
    }

    fn start_with(fake: &Arc<Fake>, heard: &Arc<Heard>, max_queued: usize) -> Writer {
        let writer = Writer::idle();
        let limits = CommitLimits {
            max_writes: Some(100),
            linger: Some(Duration::ZERO),
            max_queued,
        };
        writer.start(
            fake.clone(),
            Arc::new(RwLock::new(())),
            limits,
            heard.clone(),
        );
        writer
    }

    #[tokio::test]
    async fn past_the_bound_inserts_are_refused_and_marks_still_pass() {
        let fake = Arc::new(Fake::default());
        let heard = Arc::new(Heard::default());
        let writer = start_with(&fake, &heard, 10);
        // All 30 are queued before the writer runs (one thread, no await
        // in between): 10 fit, 20 are refused before anything is written.
        let mark = mark();
        let replies = writer
            .submit_all((0..30).map(|_| insert("a")).chain([mark]))
            .await;
        let stored = replies[..30].iter().filter(|r| r.is_ok()).count();
        let refused = replies[..30]
            .iter()
            .filter(|r| matches!(r, Err(StoreError::Overloaded)))
            .count();
        assert_eq!((stored, refused), (10, 20));
        assert!(replies[30].is_ok(), "a mark is never refused");
        assert_eq!(
            heard.0.load(Ordering::SeqCst),
            10,
            "only stored ones announced"
        );
        // Room again once committed.
        assert!(writer.submit_all([insert("a")]).await[0].is_ok());
        writer.close().await;
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
    async fn an_insert_whose_answer_was_lost_sends_the_listener_to_the_database() {
        // Issue 16, suspicion 3: an insert that committed but answered an
        // error was never announced, and its retry (`created: false`)
        // neither: pending, held nowhere, until a restart.
        let fake = Arc::new(Fake::default());
        let heard = Arc::new(Heard::default());
        let writer = start(&fake, &heard);
        assert!(writer.submit_all([insert("a")]).await[0].is_ok());
        assert!(heard.1.lock().unwrap().is_empty(), "nothing uncertain yet");
        fake.lose_answers.store(true, Ordering::SeqCst);
        assert!(writer.submit_all([insert("b")]).await[0].is_err());
        assert_eq!(
            *heard.1.lock().unwrap(),
            [1],
            "told to look after the last seq it knows of"
        );
        writer.close().await;
    }

    #[tokio::test]
    async fn marks_never_wait_behind_an_ingest_burst() {
        let fake = Arc::new(Fake::default());
        let heard = Arc::new(Heard::default());
        let writer = start(&fake, &heard); // max_commit 100
        let mark = mark();
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
