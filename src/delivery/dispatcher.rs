//! The dispatcher: the packets this node holds and the streams it hands
//! them to.
//!
//! Everything it decides happens under one lock, without waiting: a packet
//! committed, marked or released is handed to a stream with room at once
//! (round robin), and the stream's task only forwards what it was given.
//! Only the database writes (lease ends) and Redis commands wait, outside
//! the lock.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::leases::{Holder, Lease, Leases};
use super::subscription::Subscription;
use super::{ConsumerInfo, Delivery, Held, LeaseChange, SubscribeOptions, backlog, expiry};
use crate::domain::lease_token::LeaseToken;
use crate::domain::packet_id::IdSet;
use crate::domain::{DeliveryStatus, PacketId};
use crate::error::Error;
use crate::queue::memory::MemoryQueue;
use crate::queue::redis::RedisQueue;
use crate::queue::{QueueError, QueueSink, Queued};
use crate::store::{CommitListener, LeaseEnd, MarkedDelivery, PendingPacket, Released, Store};

// Counted at every pump: the handles are made at first use and kept (see
// `crate::bucket`'s metrics), since the macro looks its key up every call.
static DELIVERIES: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("bucket_deliveries_total"));
static REDELIVERIES: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("bucket_redeliveries_total"));

#[cfg(test)]
mod model;

pub type Sent = Result<Delivery, Error>;

pub struct Dispatcher {
    core: Mutex<Core>,
    store: Store,
    redis: Option<Arc<RedisQueue>>,
    max_deliveries: u32,
    max_subscribers: usize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// A lease now expires before every other one.
    pub(super) expiry_changed: Notify,
    /// The memory queue may want a refill from the database.
    pub(super) backlog_wanted: Notify,
}

struct Core {
    /// This node's name, in every lease token it makes.
    node: Arc<str>,
    queue: MemoryQueue,
    leases: Leases,
    streams: HashMap<u64, Stream>,
    /// Stream numbers in round-robin order; `turn` is whose turn it is.
    rotation: Vec<u64>,
    turn: usize,
    next_stream: u64,
    /// Leases ended unmarked, until the database has counted them.
    ending: HashMap<PacketId, Ending>,
    /// Ends the database could not record yet (retried by the expiry task).
    stuck: Vec<LeaseEnd>,
    closed: bool,
}

struct Stream {
    consumer: String,
    tx: mpsc::Sender<Sent>,
    max_in_flight: u32,
    lease: Duration,
    held: IdSet,
    /// Of `held`, those whose mark came in and is being written: the
    /// consumer is done with them, so they leave its room while they keep
    /// their leases (until the outcome is recorded, or, if it cannot be,
    /// the lease ends as if nacked).
    marking: IdSet,
    connected_at: DateTime<Utc>,
    /// Takes nothing more (a Consume stream whose client ended its side
    /// keeps its leases until its last marks are recorded).
    paused: bool,
}

impl Stream {
    /// How many more packets it may be handed now.
    fn room(&self) -> usize {
        if self.paused {
            return 0;
        }
        (self.max_in_flight as usize).saturating_sub(self.in_flight())
    }

    /// Delivered and not yet marked.
    fn in_flight(&self) -> usize {
        debug_assert!(self.marking.is_subset(&self.held));
        self.held.len().saturating_sub(self.marking.len())
    }

    fn release(&mut self, id: &PacketId) {
        self.held.remove(id);
        self.marking.remove(id);
    }
}

struct Ending {
    queued: Queued,
    attempts: u32,
    /// Marked meanwhile: not to be handed out again.
    settled: bool,
}

/// What a pass of handing out did, for the caller to act on outside the lock.
#[derive(Default)]
struct Pumped {
    /// Leases of streams found closed.
    ended: Vec<Lease>,
    expiry_changed: bool,
}

impl Core {
    fn new(node: Arc<str>, queue: MemoryQueue) -> Core {
        Core {
            node,
            queue,
            leases: Leases::default(),
            streams: HashMap::new(),
            rotation: Vec::new(),
            turn: 0,
            next_stream: 1,
            ending: HashMap::new(),
            stuck: Vec::new(),
            closed: false,
        }
    }

    /// How this node holds `id`: None if it does not, else the stream
    /// entry it holds it under (None for one it holds without an entry).
    fn held_entry(&self, id: &PacketId) -> Option<Option<&str>> {
        self.leases
            .get(id)
            .map(|lease| &lease.queued)
            .or_else(|| self.queue.get(id))
            .or_else(|| self.ending.get(id).map(|ending| &ending.queued))
            .map(|queued| queued.entry.as_deref())
    }

    /// Queues packets read from the stream (or, `refused`, that Redis
    /// refused) that this node does not hold yet; returns the entries of
    /// those it holds under another entry (to remove: the packet is in
    /// hand), and how many refused ones the full window left to the
    /// database.
    fn take_read(&mut self, packets: Vec<Queued>, refused: bool) -> (Vec<String>, usize) {
        let mut duplicates = Vec::new();
        let mut left = 0;
        for queued in packets {
            match self.held_entry(&queued.id()) {
                None if !refused || queued.entry.is_some() => self.queue.push_back(queued),
                None => {
                    if !self.queue.offer(queued.pending) {
                        left += 1;
                    }
                }
                // The very entry it holds, read again (taken back from this
                // node's own pending-entries list while the read that
                // brought it was still being resolved): removing it would
                // leave the packet in hand without an entry.
                Some(held) if held.is_some() && held == queued.entry.as_deref() => {}
                Some(_) => duplicates.extend(queued.entry),
            }
        }
        (duplicates, left)
    }

    /// Hands waiting packets to streams with room, one each in turn.
    fn pump(&mut self) -> Pumped {
        let mut out = Pumped::default();
        let (mut delivered, mut redelivered) = (0u64, 0u64);
        let mut full = 0;
        // One reading of the clocks for the whole pump: it runs in one go.
        let (now, instant) = (Utc::now(), Instant::now());
        while !self.queue.is_empty() && !self.rotation.is_empty() && full < self.rotation.len() {
            self.turn %= self.rotation.len();
            let sid = self.rotation[self.turn];
            self.turn += 1;
            let stream = self
                .streams
                .get_mut(&sid)
                .expect("rotation lists live streams");
            if stream.room() == 0 {
                full += 1;
                continue;
            }
            full = 0;
            let queued = self.queue.pop().expect("checked non-empty");
            let attempt = queued.pending.attempts + 1;
            let delivery = Delivery {
                packet: queued.pending.packet.clone(),
                received_at: queued.pending.received_at,
                attempt,
                lease_expires_at: now + stream.lease,
                lease_token: token(&self.node, self.leases.next_grant(), attempt, queued.id()),
            };
            match stream.tx.try_send(Ok(delivery)) {
                Ok(()) => {
                    stream.held.insert(queued.id());
                    let expires = instant + stream.lease;
                    out.expiry_changed |=
                        self.leases
                            .grant(queued, Holder::Stream(sid), attempt, expires);
                    delivered += 1;
                    if attempt > 1 {
                        redelivered += 1;
                    }
                }
                // The channel holds max_in_flight + 1, so it is never full
                // while the stream has room; closed: the stream is gone.
                Err(_) => {
                    self.queue.push_front(queued);
                    out.ended.extend(self.remove_stream(sid));
                }
            }
        }
        if delivered > 0 {
            DELIVERIES.increment(delivered);
        }
        if redelivered > 0 {
            REDELIVERIES.increment(redelivered);
        }
        out
    }

    /// Removes a stream; returns the leases it held.
    fn remove_stream(&mut self, sid: u64) -> Vec<Lease> {
        let Some(stream) = self.streams.remove(&sid) else {
            return Vec::new();
        };
        self.rotation.retain(|s| *s != sid);
        metrics::gauge!("bucket_consumers_connected").decrement(1.0);
        tracing::info!(consumer = %stream.consumer, stream = sid, "subscriber disconnected");
        stream
            .held
            .iter()
            .filter_map(|id| self.leases.end(id))
            .collect()
    }

    /// Moves unmarked leases to `ending`; returns what to tell the database.
    fn begin_ending(&mut self, leases: Vec<Lease>) -> Vec<LeaseEnd> {
        leases
            .into_iter()
            .map(|lease| {
                if let Holder::Stream(sid) = lease.holder
                    && let Some(stream) = self.streams.get_mut(&sid)
                {
                    stream.release(&lease.queued.id());
                }
                let end = LeaseEnd {
                    packet_id: lease.queued.id(),
                    attempts: lease.attempt,
                };
                self.ending.insert(
                    end.packet_id,
                    Ending {
                        queued: lease.queued,
                        attempts: lease.attempt,
                        settled: false,
                    },
                );
                end
            })
            .collect()
    }

    /// The database counted `ends`; `released` lists those still open.
    /// Returns the packets to queue again and the Redis entries to remove.
    fn finish_ending(&mut self, ends: &[LeaseEnd], released: &[Released]) -> Finished {
        let status: HashMap<PacketId, DeliveryStatus> =
            released.iter().map(|r| (r.packet_id, r.status)).collect();
        let mut out = Finished::default();
        for end in ends {
            let Some(ending) = self.ending.remove(&end.packet_id) else {
                continue;
            };
            match status.get(&end.packet_id) {
                Some(DeliveryStatus::Pending) if !ending.settled => {
                    let mut queued = ending.queued;
                    queued.pending.attempts = ending.attempts;
                    out.again.push(queued);
                }
                Some(DeliveryStatus::DeadLetter) => {
                    self.queue.finished(end.packet_id);
                    tracing::warn!(packet_id = %end.packet_id, attempts = ending.attempts, "packet dead-lettered");
                    out.dead += 1;
                    out.done.extend(ending.queued.entry);
                }
                // Marked meanwhile (here or through another node).
                _ => out.done.extend(ending.queued.entry),
            }
        }
        out
    }

    /// The database could not count `ends`: packets with deliveries left
    /// go out again counted in memory (the database learns the count with
    /// the next end or mark); the others wait to be dead-lettered. Those
    /// marked meanwhile are done: the mark recorded their outcome, and a
    /// count written later could land after a Redrive and be charged to
    /// the new round (even dead-letter it at once).
    fn ending_failed(&mut self, ends: Vec<LeaseEnd>, max_deliveries: u32) -> Finished {
        let mut out = Finished::default();
        for end in ends {
            let Some(ending) = self.ending.get(&end.packet_id) else {
                continue;
            };
            if ending.settled {
                let ending = self.ending.remove(&end.packet_id).expect("just seen");
                out.done.extend(ending.queued.entry);
            } else if ending.attempts >= max_deliveries {
                self.stuck.push(end);
            } else if let Some(ending) = self.ending.remove(&end.packet_id) {
                let mut queued = ending.queued;
                queued.pending.attempts = ending.attempts;
                out.again.push(queued);
            }
        }
        out
    }

    /// The stream holding `id`'s lease, if a stream does.
    fn holder(&self, id: &PacketId) -> Option<u64> {
        match self.leases.get(id)?.holder {
            Holder::Stream(sid) => Some(sid),
            Holder::Poll => None,
        }
    }

    /// Marks came in for these packets: the streams holding their leases
    /// count them out of what they have in flight.
    fn marking(&mut self, ids: &[PacketId]) {
        for id in ids {
            if let Some(sid) = self.holder(id)
                && let Some(stream) = self.streams.get_mut(&sid)
                && stream.held.contains(id)
            {
                stream.marking.insert(*id);
            }
        }
    }

    /// The marks of these packets could not be recorded: the leases still
    /// counted out for them end (to be counted and handed out again, as a
    /// nack's), so a stream never holds more than `max_in_flight` of what
    /// it was not told is recorded.
    fn unmarked(&mut self, ids: &[PacketId]) -> Vec<Lease> {
        let mut ended = Vec::new();
        for id in ids {
            if let Some(sid) = self.holder(id)
                && self
                    .streams
                    .get(&sid)
                    .is_some_and(|stream| stream.marking.contains(id))
            {
                ended.extend(self.leases.end(id));
            }
        }
        ended
    }

    fn settle(&mut self, id: &PacketId, done: &mut Vec<String>) -> bool {
        self.queue.finished(*id);
        if let Some(lease) = self.leases.end(id) {
            if let Holder::Stream(sid) = lease.holder
                && let Some(stream) = self.streams.get_mut(&sid)
            {
                stream.release(id);
            }
            done.extend(lease.queued.entry);
        } else if let Some(queued) = self.queue.remove(id) {
            done.extend(queued.entry);
        } else if let Some(ending) = self.ending.get_mut(id) {
            ending.settled = true;
            // An end waiting for a retry (see ending_failed) is not needed
            // any more.
            if let Some(at) = self.stuck.iter().position(|e| e.packet_id == *id) {
                self.stuck.swap_remove(at);
                let ending = self.ending.remove(id).expect("just seen");
                done.extend(ending.queued.entry);
            }
        } else {
            return false;
        }
        true
    }

    /// ExtendLease for leases granted here: each token's lease must be the
    /// one this node holds under that grant. `lease`: the new length; None
    /// ends the leases (a nack). Returns the ended leases too, to count.
    fn change_leases(
        &mut self,
        tokens: &[LeaseToken],
        lease: Option<Duration>,
    ) -> (Vec<Result<LeaseChange, Error>>, Vec<Lease>, bool) {
        let mut ended = Vec::new();
        let mut first = false;
        let results = tokens
            .iter()
            .map(|t| {
                if !self.leases.holds(&t.packet_id, t.grant) {
                    return Err(not_held(t.packet_id));
                }
                match lease {
                    Some(lease) => {
                        first |= self.leases.extend(&t.packet_id, Instant::now() + lease);
                        Ok(LeaseChange::Extended(Utc::now() + lease))
                    }
                    None => {
                        ended.extend(self.leases.end(&t.packet_id));
                        Ok(LeaseChange::Ended)
                    }
                }
            })
            .collect();
        (results, ended, first)
    }

    fn wanted(&self) -> usize {
        let room: usize = self.streams.values().map(Stream::room).sum();
        room.saturating_sub(self.queue.len())
    }

    /// The packets read from the stream beyond what the streams have room
    /// for, newest read first, taken out of the queue.
    fn surplus(&mut self) -> Vec<Queued> {
        let room: usize = self.streams.values().map(Stream::room).sum();
        self.queue.shed(room)
    }
}

fn token(node: &Arc<str>, grant: u64, attempt: u32, packet_id: PacketId) -> LeaseToken {
    LeaseToken {
        node: Arc::clone(node),
        grant,
        attempt,
        packet_id,
    }
}

fn not_held(packet_id: PacketId) -> Error {
    Error::FailedPrecondition(format!(
        "the lease on packet {packet_id} is not held under this token: it ended \
         (expired, marked, handed back, or its node stopped), or the packet was \
         delivered again"
    ))
}

#[derive(Default)]
struct Finished {
    again: Vec<Queued>,
    /// Redis entries of packets this node is done with.
    done: Vec<String>,
    dead: u64,
}

impl Dispatcher {
    /// `node`: this node's name (the Redis consumer's), in lease tokens;
    /// `window`: how many packets the memory queue holds at most.
    pub fn new(
        store: Store,
        redis: Option<Arc<RedisQueue>>,
        node: &str,
        max_deliveries: u32,
        window: usize,
        max_subscribers: u32,
    ) -> Arc<Self> {
        let queue = match redis {
            Some(_) => MemoryQueue::buffer(window),
            None => MemoryQueue::new(window),
        };
        Arc::new(Dispatcher {
            core: Mutex::new(Core::new(node.into(), queue)),
            store,
            redis,
            max_deliveries: max_deliveries.max(1),
            max_subscribers: max_subscribers.max(1) as usize,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            expiry_changed: Notify::new(),
            backlog_wanted: Notify::new(),
        })
    }

    /// Fills the queue from the database (one node) or reconciles the
    /// Redis stream with it (several nodes).
    pub async fn rebuild(self: &Arc<Self>) -> Result<usize, Error> {
        match &self.redis {
            None => backlog::refill(self).await,
            Some(_) => super::reconciler::reconcile(self).await,
        }
    }

    /// Starts the lease timer and, for one node, the backlog reader.
    pub fn start(self: &Arc<Self>, sweep_interval: Duration) {
        self.tasks.spawn(expiry::run(
            self.clone(),
            sweep_interval,
            self.shutdown.clone(),
        ));
        if self.redis.is_none() {
            self.tasks
                .spawn(backlog::run(self.clone(), self.shutdown.clone()));
        }
    }

    /// Reconciles the Redis stream with the database on every Redis
    /// (re)connection and every `every`.
    pub fn start_reconciler<T: Clone + Send + 'static>(
        self: &Arc<Self>,
        connected: tokio::sync::broadcast::Receiver<T>,
        every: Duration,
    ) {
        self.tasks.spawn(super::reconciler::run(
            self.clone(),
            connected,
            every,
            self.shutdown.clone(),
        ));
    }

    /// Tasks that end with the dispatcher (it waits for them at shutdown).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    pub fn redis(&self) -> Option<&Arc<RedisQueue>> {
        self.redis.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().expect("dispatcher lock poisoned")
    }

    /// Hands out what waits, then acts on what that found.
    fn pump(self: &Arc<Self>, mut core: MutexGuard<'_, Core>) {
        let pumped = core.pump();
        let wanted = core.wanted();
        let refill = core.queue.refill().is_some();
        let ends = core.begin_ending(pumped.ended);
        drop(core);
        if pumped.expiry_changed {
            self.expiry_changed.notify_one();
        }
        if refill {
            self.backlog_wanted.notify_one();
        }
        if wanted > 0
            && let Some(redis) = &self.redis
        {
            redis.demand();
        }
        self.finish_soon(ends);
    }

    pub fn subscribe(self: &Arc<Self>, options: SubscribeOptions) -> Result<Subscription, Error> {
        let (tx, rx) = mpsc::channel(options.max_in_flight as usize + 1);
        let mut core = self.lock();
        if core.closed {
            return Err(Error::Unavailable(
                "the bucket is shutting down; reconnect".into(),
            ));
        }
        if core.streams.len() >= self.max_subscribers {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "this node serves {} subscribers at most; use another node or retry later",
                    self.max_subscribers
                ),
                retry_after: None,
            });
        }
        let sid = core.next_stream;
        core.next_stream += 1;
        tracing::info!(consumer = %options.consumer, stream = sid, max_in_flight = options.max_in_flight, lease_s = options.lease.as_secs(), "subscriber connected");
        metrics::gauge!("bucket_consumers_connected").increment(1.0);
        core.streams.insert(
            sid,
            Stream {
                consumer: options.consumer,
                tx,
                max_in_flight: options.max_in_flight,
                lease: options.lease,
                held: IdSet::default(),
                marking: IdSet::default(),
                connected_at: Utc::now(),
                paused: false,
            },
        );
        core.rotation.push(sid);
        self.pump(core);
        Ok(Subscription::new(rx, sid, self.clone()))
    }

    /// The stream ended (the client went away): its leases end now.
    pub(super) fn unsubscribe(self: &Arc<Self>, sid: u64) {
        let mut core = self.lock();
        let ended = core.remove_stream(sid);
        let ends = core.begin_ending(ended);
        drop(core);
        self.finish_soon(ends);
    }

    /// Leases up to `limit` waiting packets at once, without a stream: the
    /// JSON gateway's poll. They come back if not marked within `lease`.
    /// Polls together hold at most `max_polled` leases (no stream bounds
    /// them, and with hour-long leases a poller could otherwise pull the
    /// whole backlog into memory); past it a poll gets fewer, or none.
    pub async fn lease_now(
        self: &Arc<Self>,
        limit: usize,
        lease: Duration,
        max_polled: usize,
    ) -> Result<Vec<Delivery>, Error> {
        let limit = {
            let core = self.lock();
            if core.closed {
                return Err(Error::Unavailable(
                    "the bucket is shutting down; poll another node".into(),
                ));
            }
            limit.min(max_polled.saturating_sub(core.leases.polled()))
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let short = limit.saturating_sub(self.lock().queue.len());
        if short > 0 {
            match &self.redis {
                Some(redis) => {
                    let read = redis.read_now(short).await.map_err(Error::from)?;
                    self.feed(read);
                }
                None => {
                    if self.lock().queue.refill().is_some() {
                        backlog::refill(self).await?;
                    }
                }
            }
        }
        let mut core = self.lock();
        let mut out = Vec::new();
        let mut expiry_changed = false;
        while out.len() < limit
            && core.leases.polled() < max_polled
            && let Some(queued) = core.queue.pop()
        {
            let attempt = queued.pending.attempts + 1;
            let lease_token = token(&core.node, core.leases.next_grant(), attempt, queued.id());
            out.push(Delivery {
                packet: queued.pending.packet.clone(),
                received_at: queued.pending.received_at,
                attempt,
                lease_expires_at: Utc::now() + lease,
                lease_token,
            });
            expiry_changed |=
                core.leases
                    .grant(queued, Holder::Poll, attempt, Instant::now() + lease);
        }
        drop(core);
        if expiry_changed {
            self.expiry_changed.notify_one();
        }
        DELIVERIES.increment(out.len() as u64);
        Ok(out)
    }

    /// Stream `sid` is handed nothing more; what it holds stays leased.
    pub(super) fn pause(&self, sid: u64) {
        if let Some(stream) = self.lock().streams.get_mut(&sid) {
            stream.paused = true;
        }
    }

    /// Whether the lease each token names is still held (granted here,
    /// under that grant, and not ended since).
    pub fn live(&self, tokens: &[LeaseToken]) -> Vec<bool> {
        let core = self.lock();
        tokens
            .iter()
            .map(|t| *t.node == *core.node && core.leases.holds(&t.packet_id, t.grant))
            .collect()
    }

    /// The delivery a mark of each packet is of, as far as this node
    /// knows: the lease it granted (or that just ended, not yet counted);
    /// none beyond those counted if no lease can live elsewhere (one node,
    /// or the packet waits here); else, with Redis, another node may hold
    /// the lease.
    pub fn attempts(&self, ids: &[PacketId]) -> Vec<MarkedDelivery> {
        let core = self.lock();
        ids.iter()
            .map(|id| {
                let here = core
                    .leases
                    .attempt(id)
                    .or_else(|| core.ending.get(id).map(|e| e.attempts));
                match here {
                    Some(attempt) => MarkedDelivery::Attempt(attempt),
                    None if self.redis.is_some() && !core.queue.contains(id) => {
                        MarkedDelivery::AfterCounted
                    }
                    None => MarkedDelivery::Attempt(0),
                }
            })
            .collect()
    }

    /// Marks of these packets came in and are being written: the streams
    /// holding them may be handed more meanwhile (max_in_flight bounds what
    /// a consumer has not marked; the wait for the commit is the bucket's).
    /// Followed by [`Dispatcher::settled`], or [`Dispatcher::unmarked`] for
    /// those whose outcome was not recorded.
    pub fn marking(self: &Arc<Self>, ids: &[PacketId]) {
        let mut core = self.lock();
        core.marking(ids);
        self.pump(core);
    }

    /// The outcomes of these packets were not recorded: the deliveries
    /// counted out for them end unmarked, as nacked ones do.
    pub fn unmarked(self: &Arc<Self>, ids: &[PacketId]) {
        if ids.is_empty() {
            return;
        }
        let mut core = self.lock();
        let ended = core.unmarked(ids);
        let ends = core.begin_ending(ended);
        self.pump(core);
        self.finish_soon(ends);
    }

    /// These packets' outcomes are recorded: their leases end and they are
    /// not handed out again. Other nodes hear of those not held here.
    pub async fn settled(self: &Arc<Self>, ids: &[PacketId]) {
        let mut done = Vec::new();
        let mut elsewhere = Vec::new();
        {
            let mut core = self.lock();
            for id in ids {
                if !core.settle(id, &mut done) {
                    elsewhere.push(*id);
                }
            }
            self.pump(core);
        }
        if let Some(redis) = &self.redis {
            redis.remove_entries(done);
            if !elsewhere.is_empty() {
                redis.publish_settled(&elsewhere).await;
            }
        }
    }

    /// ExtendLease: changes the leases `tokens` name, here or (through
    /// Redis) on the node that granted them; each answered on its own, in
    /// order. `lease`: the new length from now; None ends them (a nack: the
    /// delivery is counted as one that ended unmarked, and the packet goes
    /// out again).
    pub async fn change_leases(
        self: &Arc<Self>,
        tokens: &[LeaseToken],
        lease: Option<Duration>,
    ) -> Vec<Result<LeaseChange, Error>> {
        let node = self.lock().node.clone();
        let mut results: Vec<Option<Result<LeaseChange, Error>>> =
            tokens.iter().map(|_| None).collect();
        // Grouped by node, one call each, in token order within a node.
        let mut by_node: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            by_node.entry(&*t.node).or_default().push(i);
        }
        for (holder, at) in by_node {
            let mine: Vec<LeaseToken> = at.iter().map(|&i| tokens[i].clone()).collect();
            let answers = if holder == &*node {
                self.change_local(&mine, lease)
            } else {
                match &self.redis {
                    Some(redis) => redis.change_leases(holder, &mine, lease).await,
                    // One node: a token of another node is one from before a restart.
                    None => mine.iter().map(|t| Err(not_held(t.packet_id))).collect(),
                }
            };
            for (i, answer) in at.into_iter().zip(answers) {
                results[i] = Some(answer);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every token answered"))
            .collect()
    }

    /// [`Dispatcher::change_leases`] for the leases this node granted.
    fn change_local(
        self: &Arc<Self>,
        tokens: &[LeaseToken],
        lease: Option<Duration>,
    ) -> Vec<Result<LeaseChange, Error>> {
        let mut core = self.lock();
        let (results, ended, first) = core.change_leases(tokens, lease);
        // Handed back like an expiry: counted, then out again.
        let ends = core.begin_ending(ended);
        self.pump(core);
        if first {
            self.expiry_changed.notify_one();
        }
        if !ends.is_empty() {
            metrics::counter!("bucket_leases_nacked_total").increment(ends.len() as u64);
        }
        self.finish_soon(ends);
        results
    }

    /// Packets an operator made pending again (Redrive, Replay), after
    /// `after_seq` in arrival order: one node reads them back from the
    /// database; several add their ids to the Redis stream (if that fails,
    /// retried every few seconds).
    pub async fn requeued(self: &Arc<Self>, ids: &[PacketId], after_seq: i64) {
        if ids.is_empty() {
            return;
        }
        match &self.redis {
            None => {
                self.lock().queue.rewind(after_seq);
                self.backlog_wanted.notify_one();
            }
            Some(redis) => {
                if let Err(e) = redis.requeued(ids).await {
                    tracing::warn!(error = %e, count = ids.len(), "could not queue packets sent back to pending; retrying");
                }
            }
        }
    }

    /// Ends expired leases, and retries ends the database refused.
    pub(super) fn expire(self: &Arc<Self>) -> Option<Instant> {
        let mut core = self.lock();
        let expired = core.leases.expired(Instant::now());
        let mut ends = core.begin_ending(expired);
        ends.append(&mut core.stuck);
        let next = core.leases.next_expiry();
        self.pump(core);
        if !ends.is_empty() {
            tracing::debug!(count = ends.len(), "leases ended unmarked");
        }
        self.finish_soon(ends);
        next
    }

    /// [`Dispatcher::finish`] on a task of its own, if anything ended.
    fn finish_soon(self: &Arc<Self>, ends: Vec<LeaseEnd>) {
        if !ends.is_empty() {
            let me = self.clone();
            self.tasks.spawn(async move { me.finish(ends).await });
        }
    }

    /// Has the database count ended leases, then queues what is pending again.
    async fn finish(self: Arc<Self>, ends: Vec<LeaseEnd>) {
        match self
            .store
            .end_leases(ends.clone(), self.max_deliveries)
            .await
        {
            Ok(released) => {
                let finished = self.lock().finish_ending(&ends, &released);
                if finished.dead > 0 {
                    metrics::counter!("bucket_dead_letters_total").increment(finished.dead);
                }
                if let Some(redis) = &self.redis {
                    redis.remove_entries(finished.done);
                }
                self.again(finished.again);
            }
            Err(e) => {
                tracing::warn!(error = %e, count = ends.len(), "could not record ended leases; retrying");
                let finished = self.lock().ending_failed(ends, self.max_deliveries);
                if let Some(redis) = &self.redis {
                    redis.remove_entries(finished.done);
                }
                self.again(finished.again);
            }
        }
    }

    /// Packets pending again: to the Redis stream (any node may take them),
    /// or this node's queue.
    fn again(self: &Arc<Self>, packets: Vec<Queued>) {
        if packets.is_empty() {
            return;
        }
        match &self.redis {
            Some(redis) => redis.requeue(packets),
            None => {
                let mut core = self.lock();
                for queued in packets {
                    core.queue.push_back(queued);
                }
                self.pump(core);
            }
        }
    }

    /// What this node holds.
    pub fn held(&self) -> Held {
        let core = self.lock();
        Held {
            waiting: core.queue.len() as u64,
            leased: core.leases.len() as u64,
        }
    }

    pub fn consumers(&self) -> Vec<ConsumerInfo> {
        let core = self.lock();
        let mut out: Vec<ConsumerInfo> = core
            .streams
            .values()
            .map(|s| ConsumerInfo {
                consumer: s.consumer.clone(),
                in_flight: s.in_flight() as u32,
                max_in_flight: s.max_in_flight,
                connected_at: s.connected_at,
            })
            .collect();
        out.sort_by_key(|c| c.connected_at);
        out
    }

    /// Ends every stream with UNAVAILABLE (their clients reconnect
    /// elsewhere; what was sent before still arrives), ends their leases,
    /// and refuses new streams, without waiting.
    pub fn begin_shutdown(self: &Arc<Self>) {
        self.shutdown.cancel();
        let mut core = self.lock();
        core.closed = true;
        let sids: Vec<u64> = core.streams.keys().copied().collect();
        let mut ended = Vec::new();
        for sid in sids {
            if let Some(stream) = core.streams.get(&sid) {
                let _ = stream.tx.try_send(Err(Error::Unavailable(
                    "the bucket is shutting down; reconnect".into(),
                )));
            }
            ended.extend(core.remove_stream(sid));
        }
        let ends = core.begin_ending(ended);
        drop(core);
        self.finish_soon(ends);
    }

    /// Ends every stream and lease, records the ended leases, hands what
    /// this node held back to the Redis stream, and waits for all of it.
    pub async fn shutdown(self: &Arc<Self>) {
        self.begin_shutdown();
        let ends = {
            let mut core = self.lock();
            let leases = core.leases.drain();
            let mut ends = core.begin_ending(leases);
            ends.append(&mut core.stuck);
            ends
        };
        if !ends.is_empty() {
            self.clone().finish(ends).await;
        }
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(redis) = &self.redis {
            // What Redis refused goes back only through the database (what
            // is still pending): this node may not have heard of outcomes
            // recorded elsewhere.
            if let Err(e) = super::reconciler::hand_back(self).await {
                tracing::warn!(error = %e, "could not give back what Redis refused; the reconciler adds it");
            }
            let waiting: Vec<Queued> = {
                let mut core = self.lock();
                std::iter::from_fn(|| core.queue.pop()).collect()
            };
            redis.close(waiting).await;
        }
    }

    pub(super) fn lock_queue<T>(
        &self,
        f: impl FnOnce(&mut MemoryQueue, &dyn Fn(&PacketId) -> bool) -> T,
    ) -> T {
        let mut core = self.lock();
        let core = &mut *core;
        let leases = &core.leases;
        let ending = &core.ending;
        f(&mut core.queue, &|id| {
            leases.contains(id) || ending.contains_key(id)
        })
    }

    pub(super) fn pump_now(self: &Arc<Self>) {
        let core = self.lock();
        self.pump(core);
    }

    fn feed(self: &Arc<Self>, packets: Vec<Queued>) {
        self.take(packets, false);
    }

    /// Packets read from Redis (`refused` false) go into the buffer
    /// whatever its window: local streams asked for them. Those Redis
    /// refused: with an entry (a lease that ended, its entry still in this
    /// node's pending-entries list, where nothing else reads it while this
    /// node lives) likewise; without one, while the window has room, the
    /// rest left to the database until Redis takes packets again.
    fn take(self: &Arc<Self>, packets: Vec<Queued>, refused: bool) {
        let mut core = self.lock();
        let (duplicates, left) = core.take_read(packets, refused);
        self.pump(core);
        if left > 0 {
            tracing::debug!(
                count = left,
                "buffer full: packets left to the database until Redis answers"
            );
        }
        if let Some(redis) = &self.redis {
            redis.remove_entries(duplicates);
        }
    }
}

impl CommitListener for Arc<Dispatcher> {
    fn committed(&self, packets: Vec<PendingPacket>) {
        match &self.redis {
            Some(redis) => redis.push(packets),
            None => {
                let mut core = self.lock();
                for pending in packets {
                    core.queue.offer(pending);
                }
                self.pump(core);
            }
        }
    }

    /// One node: the next backlog read looks from `after_seq` on (issue 16,
    /// suspicion 3). Several: the reconciler's next incremental pass reads
    /// recent packets anyway.
    fn uncertain(&self, after_seq: i64) {
        if self.redis.is_none() {
            self.lock().queue.rewind(after_seq);
            self.backlog_wanted.notify_one();
        }
    }
}

impl QueueSink for Arc<Dispatcher> {
    fn feed(&self, packets: Vec<Queued>) {
        Dispatcher::feed(self, packets);
    }

    fn keep(&self, packets: Vec<Queued>) {
        self.take(packets, true);
    }

    fn leave(&self, packets: Vec<PendingPacket>) {
        let mut core = self.lock();
        for pending in &packets {
            core.queue.leave(pending);
        }
    }

    fn wanted(&self) -> usize {
        self.lock().wanted()
    }

    fn settle_remote(&self, ids: &[PacketId]) {
        let mut done = Vec::new();
        let mut core = self.lock();
        for id in ids {
            core.settle(id, &mut done);
        }
        self.pump(core);
        if let Some(redis) = &self.redis {
            redis.remove_entries(done);
        }
    }

    fn surplus(&self) -> Vec<Queued> {
        self.lock().surplus()
    }

    fn held_ids(&self) -> HashSet<PacketId> {
        let core = self.lock();
        core.leases
            .ids()
            .chain(core.ending.keys())
            .copied()
            .chain(core.queue.ids())
            .collect()
    }

    fn held_entries(&self) -> HashSet<String> {
        let core = self.lock();
        core.leases
            .iter()
            .map(|lease| &lease.queued)
            .chain(core.queue.iter())
            .chain(core.ending.values().map(|ending| &ending.queued))
            .filter_map(|queued| queued.entry.clone())
            .collect()
    }

    fn change_leases(
        &self,
        tokens: &[LeaseToken],
        lease: Option<Duration>,
    ) -> Vec<Result<LeaseChange, Error>> {
        self.change_local(tokens, lease)
    }
}

impl From<QueueError> for Error {
    /// Clients hear what to do; the cause is logged here, once.
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Store(e) => e.into(),
            e => {
                tracing::warn!(cause = %e, "queue unavailable");
                Error::Unavailable("the queue is unavailable; retry with backoff".into())
            }
        }
    }
}

/// A stream's slots while marks are written.
#[cfg(test)]
mod marking_tests {
    use super::*;

    /// A core with one stream of `max_in_flight` 1 and `packets` queued.
    fn one_slot(packets: i64) -> (Core, mpsc::Receiver<Sent>) {
        let mut core = Core::new("n".into(), MemoryQueue::buffer(64));
        for seq in 1..=packets {
            core.queue.offer(PendingPacket::sample(seq));
        }
        let (tx, rx) = mpsc::channel(2);
        core.streams.insert(
            1,
            Stream {
                consumer: "c".into(),
                tx,
                max_in_flight: 1,
                lease: Duration::from_secs(30),
                held: IdSet::default(),
                marking: IdSet::default(),
                connected_at: Utc::now(),
                paused: false,
            },
        );
        core.rotation.push(1);
        (core, rx)
    }

    fn delivered(rx: &mut mpsc::Receiver<Sent>) -> PacketId {
        rx.try_recv()
            .expect("a delivery")
            .expect("not an error")
            .packet
            .packet_id
    }

    #[tokio::test]
    async fn a_mark_coming_in_frees_its_slot_and_a_failed_one_ends_the_lease() {
        let (mut core, mut rx) = one_slot(3);
        core.pump();
        let first = delivered(&mut rx);
        core.pump();
        assert!(rx.try_recv().is_err(), "one slot, taken");
        // Its mark comes in: the slot frees while the lease lives on.
        core.marking(&[first]);
        core.pump();
        let second = delivered(&mut rx);
        let stream = &core.streams[&1];
        assert_eq!(stream.held.len(), 2);
        assert_eq!(stream.in_flight(), 1);
        assert!(core.leases.contains(&first));
        // The mark could not be recorded: its lease ends, as a nack's.
        let ended = core.unmarked(&[first]);
        assert_eq!(ended.len(), 1);
        let ends = core.begin_ending(ended);
        assert_eq!(ends[0].packet_id, first);
        assert!(!core.leases.contains(&first));
        assert_eq!(core.streams[&1].in_flight(), 1);
        core.pump();
        assert!(rx.try_recv().is_err(), "still one in flight: {second}");
        // A mark of a delivery not counted out ends nothing.
        assert!(core.unmarked(&[second]).is_empty());
        // Recorded: settled, the slot stays free.
        core.marking(&[second]);
        let mut done = Vec::new();
        assert!(core.settle(&second, &mut done));
        let stream = &core.streams[&1];
        assert!(stream.held.is_empty() && stream.marking.is_empty());
        core.pump();
        delivered(&mut rx);
    }
}

/// What a node on the Redis queue keeps in its hands.
#[cfg(test)]
mod hands_tests {
    use super::*;

    fn core() -> Core {
        Core::new("n".into(), MemoryQueue::buffer(64))
    }

    fn read(pending: &PendingPacket, entry: &str) -> Queued {
        Queued {
            pending: pending.clone(),
            entry: Some(entry.to_owned()),
        }
    }

    fn pending(seq: i64) -> PendingPacket {
        PendingPacket::sample(seq)
    }

    #[test]
    fn an_entry_read_twice_is_kept_and_another_entry_of_a_held_packet_removed() {
        let pending = pending(1);
        let mut core = core();
        assert!(
            core.take_read(vec![read(&pending, "0/1-0")], false)
                .0
                .is_empty()
        );
        // The same entry again: nothing to remove, the packet queued once.
        assert!(
            core.take_read(vec![read(&pending, "0/1-0")], false)
                .0
                .is_empty()
        );
        assert_eq!(core.queue.len(), 1);
        // Another entry of the packet in hand: a duplicate, removed.
        assert_eq!(
            core.take_read(vec![read(&pending, "0/2-0")], false).0,
            ["0/2-0"]
        );
        assert_eq!(
            core.held_entry(&pending.packet.packet_id),
            Some(Some("0/1-0"))
        );
    }

    #[test]
    fn with_no_stream_to_take_them_every_packet_read_is_surplus() {
        let mut core = core();
        core.take_read(vec![read(&pending(1), "0/1-0")], false);
        // Refused by Redis: kept for the hand-back, never surplus.
        let refused = Queued {
            pending: pending(2),
            entry: None,
        };
        core.take_read(vec![refused], true);
        core.take_read(vec![read(&pending(3), "0/3-0")], false);
        let surplus = core.surplus();
        let entries: Vec<_> = surplus.iter().map(|q| q.entry.as_deref()).collect();
        assert_eq!(entries, [Some("0/3-0"), Some("0/1-0")], "newest read first");
        assert_eq!(core.queue.len(), 1, "the refused packet stays");
        assert!(core.surplus().is_empty());
    }
}
