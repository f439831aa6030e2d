//! The dispatcher's [`Core`] driven by random interleavings of what happens
//! to it (commits, deliveries, marks (recorded at once, or begun and then
//! recorded or failed), extensions, nacks, expiries, lease ends the
//! database counts or refuses, backlog reads, redrives, streams ending)
//! and checked after every step against a model of what the README
//! promises: a packet is never both queued and leased, never delivered
//! while a lease on it lives, never delivered once finished or beyond
//! `max_deliveries`, each delivery one attempt higher than the last one
//! that ended unmarked, leases expire when they were granted to (or
//! extended to), a stream never has more than `max_in_flight` deliveries
//! whose marks have not come in, and every pending packet is held or will
//! be read back.
//! At the end of each case a bounded drain (one consumer marking
//! everything, leases left to expire) must finish every packet: none stuck.
//!
//! The database is a map standing in for the store, with the semantics of
//! its SQL (a lease end counts attempts and dead-letters at the limit; a
//! mark keeps the higher attempt count; a redrive restarts the count). The
//! clock is tokio's, paused, so expiry is exact.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Core, Sent, Stream};
use crate::delivery::{Delivery, LeaseChange};
use crate::domain::packet_id::IdSet;
use crate::domain::{DeliveryStatus, Packet, PacketId};
use crate::queue::Queued;
use crate::queue::memory::{MemoryQueue, Refill};
use crate::store::{LeaseEnd, PendingPacket, Released};

const MAX_DELIVERIES: u32 = 3;
/// Small, so the queue spills to the database and reads back often.
const WINDOW: usize = 4;
const MAX_STREAMS: usize = 4;

#[derive(Debug, Clone)]
pub enum Op {
    /// Packets committed (the writer hands them to the dispatcher).
    Commit(usize),
    /// Packets committed whose answer was lost (the connection dropped
    /// after COMMIT): the writer tells the dispatcher only that inserts
    /// after the newest seq it knew may be stored.
    CommitLost(usize),
    Subscribe {
        max_in_flight: u32,
        lease_ms: u64,
    },
    /// The stream's task ends (the client went away).
    Unsubscribe(usize),
    /// The client's end of the stream is dropped: the dispatcher finds out
    /// on its next send.
    DropStream(usize),
    /// The consumer of a stream marks one delivery it holds.
    Mark {
        stream: usize,
        pick: usize,
        success: bool,
    },
    /// The consumer of a stream marks one delivery it holds, and the
    /// outcome's write starts (the stream has room for another at once)...
    MarkBegin {
        stream: usize,
        pick: usize,
        success: bool,
    },
    /// ... and the oldest such write is recorded, or fails (the lease, if
    /// the stream still holds it, ends as a nack's).
    MarkEnd {
        recorded: bool,
    },
    /// A mark of any packet, through any door (late, or sent twice).
    MarkAny {
        packet: usize,
        success: bool,
    },
    Extend {
        stream: usize,
        pick: usize,
        lease_ms: u64,
    },
    Nack {
        stream: usize,
        pick: usize,
    },
    /// Time passes; the lease timer ends what expired.
    Advance(u64),
    /// The database counts the oldest batch of ended leases (marks and
    /// lease ends share one writer lane, first in first out)...
    EndOk,
    /// ... or refuses to.
    EndFail,
    /// The backlog reader reads the pending packets after the queue's
    /// mark; no insert commits until it hands them over.
    RefillRead,
    RefillApply,
    /// Dead-lettered and failed packets sent back to pending (Redrive), or
    /// processed ones (Replay).
    Redrive {
        replay: bool,
    },
}

/// What the generator needs to know to make valid steps.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    packets: usize,
    streams: usize,
    /// A backlog read may be under way: inserts wait (the store's gate).
    reading: bool,
}

pub struct Machine;

impl ReferenceStateMachine for Machine {
    type State = Shape;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Shape> {
        Just(Shape::default()).boxed()
    }

    fn transitions(shape: &Shape) -> BoxedStrategy<Op> {
        let mut ops = vec![
            (3, (1..=3usize).prop_map(Op::Commit).boxed()),
            (1, (1..=2usize).prop_map(Op::CommitLost).boxed()),
            (3, (0u64..2_500).prop_map(Op::Advance).boxed()),
            (3, Just(Op::EndOk).boxed()),
            (1, Just(Op::EndFail).boxed()),
            (1, Just(Op::RefillRead).boxed()),
            (2, Just(Op::MarkEnd { recorded: true }).boxed()),
            (1, Just(Op::MarkEnd { recorded: false }).boxed()),
            (1, Just(Op::RefillApply).boxed()),
            (
                1,
                any::<bool>()
                    .prop_map(|replay| Op::Redrive { replay })
                    .boxed(),
            ),
        ];
        if shape.streams < MAX_STREAMS {
            ops.push((
                1,
                (1u32..=3, prop_oneof![Just(1_000u64), Just(3_000)])
                    .prop_map(|(max_in_flight, lease_ms)| Op::Subscribe {
                        max_in_flight,
                        lease_ms,
                    })
                    .boxed(),
            ));
        }
        if shape.streams > 0 {
            let s = 0..shape.streams;
            ops.extend([
                (
                    5,
                    (s.clone(), any::<usize>(), prop::bool::weighted(0.8))
                        .prop_map(|(stream, pick, success)| Op::Mark {
                            stream,
                            pick,
                            success,
                        })
                        .boxed(),
                ),
                (
                    2,
                    (s.clone(), any::<usize>(), any::<bool>())
                        .prop_map(|(stream, pick, success)| Op::MarkBegin {
                            stream,
                            pick,
                            success,
                        })
                        .boxed(),
                ),
                (
                    1,
                    (s.clone(), any::<usize>(), 0u64..4_000)
                        .prop_map(|(stream, pick, lease_ms)| Op::Extend {
                            stream,
                            pick,
                            lease_ms,
                        })
                        .boxed(),
                ),
                (
                    1,
                    (s.clone(), any::<usize>())
                        .prop_map(|(stream, pick)| Op::Nack { stream, pick })
                        .boxed(),
                ),
                (1, s.clone().prop_map(Op::Unsubscribe).boxed()),
                (1, s.prop_map(Op::DropStream).boxed()),
            ]);
        }
        if shape.packets > 0 {
            ops.push((
                1,
                (0..shape.packets, any::<bool>())
                    .prop_map(|(packet, success)| Op::MarkAny { packet, success })
                    .boxed(),
            ));
        }
        prop::strategy::Union::new_weighted(ops).boxed()
    }

    fn preconditions(shape: &Shape, op: &Op) -> bool {
        match op {
            Op::Commit(_) | Op::CommitLost(_) => !shape.reading,
            Op::Subscribe { .. } => shape.streams < MAX_STREAMS,
            Op::Mark { stream, .. }
            | Op::MarkBegin { stream, .. }
            | Op::Extend { stream, .. }
            | Op::Nack { stream, .. }
            | Op::Unsubscribe(stream)
            | Op::DropStream(stream) => *stream < shape.streams,
            Op::MarkAny { packet, .. } => *packet < shape.packets,
            _ => true,
        }
    }

    fn apply(mut shape: Shape, op: &Op) -> Shape {
        match op {
            Op::Commit(n) | Op::CommitLost(n) => shape.packets += n,
            Op::Subscribe { .. } => shape.streams += 1,
            Op::RefillRead => shape.reading = true,
            Op::RefillApply => shape.reading = false,
            _ => {}
        }
        shape
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    seq: i64,
    status: DeliveryStatus,
    attempts: u32,
}

/// What the model expects of one live lease.
#[derive(Debug, Clone, Copy)]
struct Live {
    sid: u64,
    grant: u64,
    expires: Instant,
    attempt: u32,
}

/// One client's end of a stream.
struct Client {
    sid: u64,
    rx: Option<mpsc::Receiver<Sent>>,
    /// Deliveries received and not yet marked or nacked.
    inbox: Vec<Delivery>,
}

pub struct Sut {
    rt: tokio::runtime::Runtime,
    core: Core,
    packets: Vec<PendingPacket>,
    db: BTreeMap<PacketId, Row>,
    clients: Vec<Client>,
    /// Lease ends handed to the database and not yet answered.
    ends: Vec<Vec<LeaseEnd>>,
    /// Marks whose writes are under way, oldest first.
    marking: Vec<(PacketId, bool)>,
    read: Option<(Refill, Vec<PendingPacket>)>,
    /// The model's leases.
    live: HashMap<PacketId, Live>,
    /// The attempt of each packet's last delivery (0: none since it was
    /// stored or redriven).
    last_attempt: HashMap<PacketId, u32>,
    next_seq: i64,
}

fn packet() -> Arc<Packet> {
    Packet::sample("u")
}

impl Sut {
    fn new() -> Sut {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let core = Core::new("model".into(), MemoryQueue::new(WINDOW));
        let mut sut = Sut {
            rt,
            core,
            packets: Vec::new(),
            db: BTreeMap::new(),
            clients: Vec::new(),
            ends: Vec::new(),
            marking: Vec::new(),
            read: None,
            live: HashMap::new(),
            last_attempt: HashMap::new(),
            next_seq: 1,
        };
        // The dispatcher's rebuild at start.
        sut.refill_read();
        sut.refill_apply();
        sut
    }

    fn id(&self, packet: usize) -> PacketId {
        self.packets[packet].packet.packet_id
    }

    fn step(&mut self, op: Op) {
        let rt = self.rt.handle().clone();
        let _in = rt.enter();
        match op {
            Op::Commit(n) | Op::CommitLost(n) => {
                let lost = matches!(op, Op::CommitLost(_));
                let floor = self.next_seq - 1;
                let mut committed = Vec::new();
                for _ in 0..n {
                    let pending = PendingPacket {
                        packet: packet(),
                        seq: self.next_seq,
                        received_at: Utc::now(),
                        attempts: 0,
                    };
                    self.next_seq += 1;
                    self.db.insert(
                        pending.packet.packet_id,
                        Row {
                            seq: pending.seq,
                            status: DeliveryStatus::Pending,
                            attempts: 0,
                        },
                    );
                    self.packets.push(pending.clone());
                    committed.push(pending);
                }
                if lost {
                    // As Dispatcher::uncertain, one node.
                    self.core.queue.rewind(floor);
                } else {
                    for pending in committed {
                        self.core.queue.offer(pending);
                    }
                }
                self.pump();
            }
            Op::Subscribe {
                max_in_flight,
                lease_ms,
            } => {
                let (tx, rx) = mpsc::channel(max_in_flight as usize + 1);
                let sid = self.core.next_stream;
                self.core.next_stream += 1;
                self.core.streams.insert(
                    sid,
                    Stream {
                        consumer: format!("c{sid}"),
                        tx,
                        max_in_flight,
                        lease: Duration::from_millis(lease_ms),
                        held: IdSet::default(),
                        marking: IdSet::default(),
                        connected_at: Utc::now(),
                        paused: false,
                    },
                );
                self.core.rotation.push(sid);
                self.clients.push(Client {
                    sid,
                    rx: Some(rx),
                    inbox: Vec::new(),
                });
                self.pump();
            }
            Op::Unsubscribe(c) => {
                let sid = self.clients[c].sid;
                let ended = self.core.remove_stream(sid);
                self.ended_by_stream(sid, &ended);
                let ends = self.core.begin_ending(ended);
                self.handed_to_db(ends);
            }
            Op::DropStream(c) => {
                self.clients[c].rx = None;
                self.clients[c].inbox.clear();
            }
            Op::Mark {
                stream,
                pick,
                success,
            } => {
                if let Some(id) = self.picked(stream, pick) {
                    self.mark(id, success);
                }
            }
            Op::MarkBegin {
                stream,
                pick,
                success,
            } => {
                if let Some(id) = self.picked(stream, pick) {
                    self.core.marking(&[id]);
                    self.marking.push((id, success));
                    self.pump();
                }
            }
            Op::MarkEnd { recorded } => {
                if self.marking.is_empty() {
                    return;
                }
                let (id, success) = self.marking.remove(0);
                if recorded {
                    self.mark(id, success);
                    return;
                }
                // Counted out while its mark was written: the lease ends
                // as a nack's does (none if it ended meanwhile).
                let counted_out = self.core.streams.values().any(|s| s.marking.contains(&id));
                let ended = self.core.unmarked(&[id]);
                assert_eq!(ended.len(), usize::from(counted_out), "the lease of {id}");
                if counted_out {
                    self.live.remove(&id);
                }
                let ends = self.core.begin_ending(ended);
                self.handed_to_db(ends);
                self.pump();
            }
            Op::MarkAny { packet, success } => {
                let id = self.id(packet);
                for client in &mut self.clients {
                    client.inbox.retain(|d| d.packet.packet_id != id);
                }
                self.mark(id, success);
            }
            Op::Extend {
                stream,
                pick,
                lease_ms,
            } => {
                let inbox = &self.clients[stream].inbox;
                if inbox.is_empty() {
                    return;
                }
                let token = inbox[pick % inbox.len()].lease_token.clone();
                let lease = Duration::from_millis(lease_ms);
                let (results, ended, _) = self
                    .core
                    .change_leases(std::slice::from_ref(&token), Some(lease));
                assert!(ended.is_empty(), "an extension ends nothing");
                let live = self.live.get(&token.packet_id).copied();
                match (live, &results[0]) {
                    (Some(live), Ok(LeaseChange::Extended(_))) if live.grant == token.grant => {
                        let live = self.live.get_mut(&token.packet_id).expect("live");
                        live.expires = Instant::now() + lease;
                    }
                    (live, Err(_)) if live.is_none_or(|l| l.grant != token.grant) => {}
                    (live, result) => panic!(
                        "extending {token}: the model's lease {live:?}, the dispatcher answered {result:?}"
                    ),
                }
            }
            Op::Nack { stream, pick } => {
                let inbox = &mut self.clients[stream].inbox;
                if inbox.is_empty() {
                    return;
                }
                let delivery = inbox.remove(pick % inbox.len());
                let token = delivery.lease_token;
                let (results, ended, _) =
                    self.core.change_leases(std::slice::from_ref(&token), None);
                match (self.live.get(&token.packet_id).copied(), &results[0]) {
                    (Some(live), Ok(LeaseChange::Ended)) if live.grant == token.grant => {
                        assert_eq!(ended.len(), 1);
                        self.live.remove(&token.packet_id);
                    }
                    (live, Err(_)) if live.is_none_or(|l| l.grant != token.grant) => {
                        assert!(ended.is_empty());
                    }
                    (live, result) => panic!(
                        "nacking {token}: the model's lease {live:?}, the dispatcher answered {result:?}"
                    ),
                }
                let ends = self.core.begin_ending(ended);
                self.handed_to_db(ends);
                self.pump();
            }
            Op::Advance(ms) => {
                self.rt
                    .block_on(tokio::time::advance(Duration::from_millis(ms)));
                let now = Instant::now();
                let mut due: Vec<PacketId> = self
                    .live
                    .iter()
                    .filter(|(_, l)| l.expires <= now)
                    .map(|(id, _)| *id)
                    .collect();
                // As Dispatcher::expire.
                let expired = self.core.leases.expired(now);
                let mut got: Vec<PacketId> = expired.iter().map(|l| l.queued.id()).collect();
                due.sort();
                got.sort();
                assert_eq!(got, due, "the leases that expired");
                for id in &due {
                    self.live.remove(id);
                }
                let mut ends = self.core.begin_ending(expired);
                ends.append(&mut self.core.stuck);
                self.handed_to_db(ends);
                self.pump();
            }
            Op::EndOk => {
                if self.ends.is_empty() {
                    return;
                }
                let ends = self.ends.remove(0);
                let released = self.end_leases(&ends);
                let finished = self.core.finish_ending(&ends, &released);
                self.again(finished.again);
            }
            Op::EndFail => {
                if self.ends.is_empty() {
                    return;
                }
                let ends = self.ends.remove(0);
                let finished = self.core.ending_failed(ends, MAX_DELIVERIES);
                self.again(finished.again);
            }
            Op::RefillRead => self.refill_read(),
            Op::RefillApply => self.refill_apply(),
            Op::Redrive { replay } => {
                let from: &[DeliveryStatus] = if replay {
                    &[DeliveryStatus::Processed]
                } else {
                    &[DeliveryStatus::DeadLetter, DeliveryStatus::Failed]
                };
                let mut first = None;
                for (id, row) in self.db.iter_mut() {
                    if from.contains(&row.status) {
                        row.status = DeliveryStatus::Pending;
                        row.attempts = 0;
                        self.last_attempt.remove(id);
                        first = Some(first.map_or(row.seq, |f: i64| f.min(row.seq)));
                    }
                }
                // As Dispatcher::requeued, one node.
                if let Some(first) = first {
                    self.core.queue.rewind(first - 1);
                    self.pump();
                }
            }
        }
    }

    /// The delivery a stream's consumer picks from those it holds, taken
    /// out of its hands; None if it holds none.
    fn picked(&mut self, stream: usize, pick: usize) -> Option<PacketId> {
        let inbox = &mut self.clients[stream].inbox;
        (!inbox.is_empty()).then(|| inbox.remove(pick % inbox.len()).packet.packet_id)
    }

    /// A mark: the outcome committed, then the dispatcher told (as
    /// Bucket::mark_processed_batch).
    fn mark(&mut self, id: PacketId, success: bool) {
        // Ends handed to the writer before this mark commit before it.
        while !self.ends.is_empty() {
            self.step(Op::EndOk);
        }
        let attempt = self.core.leases.attempt(&id).unwrap_or(0);
        let row = self.db.get_mut(&id).expect("a stored packet");
        if row.status != DeliveryStatus::Processed {
            row.status = if success {
                DeliveryStatus::Processed
            } else {
                DeliveryStatus::Failed
            };
            row.attempts = row.attempts.max(attempt);
        }
        self.live.remove(&id);
        let mut done = Vec::new();
        self.core.settle(&id, &mut done);
        self.pump();
    }

    /// The store's end_leases.
    fn end_leases(&mut self, ends: &[LeaseEnd]) -> Vec<Released> {
        let mut released = Vec::new();
        for end in ends {
            let row = self.db.get_mut(&end.packet_id).expect("a stored packet");
            if row.status != DeliveryStatus::Pending {
                continue;
            }
            row.attempts = row.attempts.max(end.attempts);
            if row.attempts >= MAX_DELIVERIES {
                row.status = DeliveryStatus::DeadLetter;
            }
            released.push(Released {
                packet_id: end.packet_id,
                status: row.status,
            });
        }
        released
    }

    /// As Dispatcher::again, one node.
    fn again(&mut self, packets: Vec<Queued>) {
        for queued in packets {
            self.core.queue.push_back(queued);
        }
        self.pump();
    }

    fn refill_read(&mut self) {
        if self.read.is_some() {
            return;
        }
        let Some(read) = self.core.queue.begin_refill() else {
            return;
        };
        let rows = self
            .db
            .iter()
            .filter(|(_, r)| r.status == DeliveryStatus::Pending && r.seq > read.after_seq)
            .map(|(id, r)| (r.seq, (*id, r.attempts)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .take(read.limit)
            .map(|(seq, (id, attempts))| {
                let packet = self
                    .packets
                    .iter()
                    .find(|p| p.packet.packet_id == id)
                    .expect("a stored packet");
                PendingPacket {
                    seq,
                    attempts,
                    ..packet.clone()
                }
            })
            .collect();
        self.read = Some((read, rows));
    }

    fn refill_apply(&mut self) {
        let Some((read, rows)) = self.read.take() else {
            return;
        };
        let core = &mut self.core;
        let (leases, ending) = (&core.leases, &core.ending);
        core.queue.refilled(read, rows, |id| {
            leases.contains(id) || ending.contains_key(id)
        });
        self.pump();
    }

    fn handed_to_db(&mut self, ends: Vec<LeaseEnd>) {
        if !ends.is_empty() {
            self.ends.push(ends);
        }
    }

    /// A stream's leases ended with it.
    fn ended_by_stream(&mut self, sid: u64, ended: &[super::Lease]) {
        let mut expected: Vec<PacketId> = self
            .live
            .iter()
            .filter(|(_, l)| l.sid == sid)
            .map(|(id, _)| *id)
            .collect();
        let mut got: Vec<PacketId> = ended.iter().map(|l| l.queued.id()).collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "the leases stream {sid} held");
        for id in expected {
            self.live.remove(&id);
        }
        for client in &mut self.clients {
            if client.sid == sid {
                client.inbox.clear();
            }
        }
    }

    /// As Dispatcher::pump: hands out, then every client reads what it
    /// was sent (checked against the model as it arrives).
    fn pump(&mut self) {
        let before: HashSet<u64> = self.core.streams.keys().copied().collect();
        let pumped = self.core.pump();
        // Streams found closed: only those whose client dropped its end.
        for sid in before {
            if !self.core.streams.contains_key(&sid) {
                let client = self
                    .clients
                    .iter()
                    .find(|c| c.sid == sid)
                    .expect("a client");
                assert!(
                    client.rx.is_none(),
                    "stream {sid} removed while its client listens"
                );
                let mut held: Vec<PacketId> = pumped
                    .ended
                    .iter()
                    .filter(|l| l.holder == super::Holder::Stream(sid))
                    .map(|l| l.queued.id())
                    .collect();
                let mut expected: Vec<PacketId> = self
                    .live
                    .iter()
                    .filter(|(_, l)| l.sid == sid)
                    .map(|(id, _)| *id)
                    .collect();
                held.sort();
                expected.sort();
                assert_eq!(held, expected, "the leases closed stream {sid} held");
                for id in expected {
                    self.live.remove(&id);
                }
            }
        }
        let ends = self.core.begin_ending(pumped.ended);
        self.handed_to_db(ends);
        let now = Instant::now();
        for c in 0..self.clients.len() {
            let sid = self.clients[c].sid;
            let lease = self.core.streams.get(&sid).map(|s| s.lease);
            while let Some(rx) = self.clients[c].rx.as_mut()
                && let Ok(sent) = rx.try_recv()
            {
                let delivery = sent.expect("no stream ends with an error here");
                let id = delivery.packet.packet_id;
                let row = self.db[&id];
                assert_eq!(
                    row.status,
                    DeliveryStatus::Pending,
                    "{id} delivered while {:?} in the database",
                    row.status
                );
                let last = self.last_attempt.get(&id).copied().unwrap_or(0);
                assert_eq!(
                    delivery.attempt,
                    last + 1,
                    "{id}: each delivery one attempt higher than the last"
                );
                assert!(
                    delivery.attempt <= MAX_DELIVERIES,
                    "{id} delivered {} times",
                    delivery.attempt
                );
                assert!(
                    !self.live.contains_key(&id),
                    "{id} delivered while a lease on it lives: {:?}",
                    self.live[&id]
                );
                self.last_attempt.insert(id, delivery.attempt);
                self.live.insert(
                    id,
                    Live {
                        sid,
                        grant: delivery.lease_token.grant,
                        expires: now + lease.expect("a stream that sent is open"),
                        attempt: delivery.attempt,
                    },
                );
                self.clients[c].inbox.push(delivery);
            }
        }
    }

    fn check(&self) {
        let core = &self.core;
        let queued: HashSet<PacketId> = core.queue.ids().collect();
        let leased: HashSet<PacketId> = core.leases.ids().copied().collect();
        let ending: HashSet<PacketId> = core.ending.keys().copied().collect();
        assert!(
            queued.is_disjoint(&leased),
            "queued and leased: {queued:?} {leased:?}"
        );
        assert!(queued.is_disjoint(&ending), "queued and ending");
        assert!(leased.is_disjoint(&ending), "leased and ending");
        let live: HashSet<PacketId> = self.live.keys().copied().collect();
        assert_eq!(leased, live, "the leases the model expects");
        for (id, l) in &self.live {
            assert_eq!(core.leases.attempt(id), Some(l.attempt));
        }
        for (sid, stream) in &core.streams {
            assert!(stream.in_flight() <= stream.max_in_flight as usize);
            assert!(
                stream.marking.is_subset(&stream.held),
                "stream {sid} marks what it does not hold"
            );
            let mine: IdSet = self
                .live
                .iter()
                .filter(|(_, l)| l.sid == *sid)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(stream.held, mine, "what stream {sid} holds");
        }
        for end in &core.stuck {
            assert!(ending.contains(&end.packet_id), "a stuck end not ending");
        }
        let spilled = core.queue.spilled();
        for (id, row) in &self.db {
            let held = queued.contains(id) || leased.contains(id) || ending.contains(id);
            match row.status {
                DeliveryStatus::Pending => assert!(
                    held || spilled.is_some_and(|s| row.seq > s),
                    "{id} (seq {}) pending, held nowhere, and no read will find it (spilled {spilled:?})",
                    row.seq
                ),
                status => {
                    assert!(!queued.contains(id), "{id} queued while {status:?}");
                    assert!(!leased.contains(id), "{id} leased while {status:?}");
                }
            }
            if row.status == DeliveryStatus::DeadLetter {
                assert!(
                    self.last_attempt.get(id).copied().unwrap_or(0) >= MAX_DELIVERIES,
                    "{id} dead-lettered after {} deliveries",
                    self.last_attempt.get(id).copied().unwrap_or(0)
                );
            }
        }
    }

    /// Every fault heals and one consumer marks everything: within a
    /// bounded number of rounds every packet is finished and nothing is
    /// held.
    fn drain(&mut self) {
        while !self.marking.is_empty() {
            self.step(Op::MarkEnd { recorded: true });
        }
        for client in &mut self.clients {
            client.rx = None;
        }
        let rt = self.rt.handle().clone();
        let _in = rt.enter();
        let sids: Vec<u64> = self.core.streams.keys().copied().collect();
        for sid in sids {
            let ended = self.core.remove_stream(sid);
            self.ended_by_stream(sid, &ended);
            let ends = self.core.begin_ending(ended);
            self.handed_to_db(ends);
        }
        drop(_in);
        self.step(Op::Subscribe {
            max_in_flight: 3,
            lease_ms: 1_000,
        });
        let consumer = self.clients.len() - 1;
        for _ in 0..200 {
            while !self.ends.is_empty() {
                self.step(Op::EndOk);
            }
            self.step(Op::RefillApply);
            self.step(Op::RefillRead);
            self.step(Op::RefillApply);
            while !self.clients[consumer].inbox.is_empty() {
                self.step(Op::Mark {
                    stream: consumer,
                    pick: 0,
                    success: true,
                });
            }
            self.check();
            let open = self
                .db
                .values()
                .any(|r| r.status == DeliveryStatus::Pending);
            if !open && self.ends.is_empty() {
                break;
            }
            self.step(Op::Advance(1_000));
        }
        let stuck: Vec<(PacketId, Row)> = self
            .db
            .iter()
            .filter(|(_, r)| r.status == DeliveryStatus::Pending)
            .map(|(id, r)| (*id, *r))
            .collect();
        assert!(stuck.is_empty(), "still pending after the drain: {stuck:?}");
        assert_eq!(self.core.queue.len(), 0, "queued after the drain");
        assert_eq!(self.core.leases.len(), 0, "leased after the drain");
        assert!(self.core.ending.is_empty(), "ending after the drain");
    }
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Sut;
    type Reference = Machine;

    fn init_test(_: &Shape) -> Sut {
        Sut::new()
    }

    fn apply(mut sut: Sut, _: &Shape, op: Op) -> Sut {
        sut.step(op);
        sut
    }

    fn check_invariants(sut: &Sut, _: &Shape) {
        sut.check();
    }

    fn teardown(mut sut: Sut, _: Shape) {
        sut.drain();
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        max_shrink_iters: 4096,
        .. ProptestConfig::default()
    })]
    #[test]
    fn the_dispatcher_keeps_the_readmes_promises(sequential 1..60 => Sut);
}
