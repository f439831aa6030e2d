//! The in-memory queue of one node: packets waiting to be handed out, oldest
//! first, at most `window` of them. A packet that does not fit stays where
//! it is safe anyway, in the database, and the queue notes from where on it
//! must read the pending packets back (`spilled`); once it has read all of
//! them it takes new packets directly again. So a backlog of millions costs
//! disk, not memory.
//!
//! In front of the Redis queue it is the node's buffer ([`MemoryQueue::buffer`]):
//! what it read from the stream, bounded by what local streams asked for,
//! and what Redis refused, at most `window` of that, the rest left to the
//! database the same way; what Redis may have taken (an XADD whose answer
//! never came) it leaves there whole. Once Redis takes packets again, both
//! go back through the database ([`MemoryQueue::begin_hand_back`]): only
//! what is still pending reaches the stream, and the buffer keeps no copy
//! another node could deliver and mark without this one hearing of it.
use std::collections::{HashSet, VecDeque};

use super::Queued;
use crate::domain::PacketId;
use crate::domain::packet_id::IdMap;
use crate::store::PendingPacket;

pub struct MemoryQueue {
    /// Hand-out order. Ids no longer waiting (settled meanwhile) are
    /// skipped when they reach the front.
    order: VecDeque<PacketId>,
    waiting: IdMap<Queued>,
    window: usize,
    /// Some(seq): pending packets after `seq` may be in the database only.
    spilled: Option<i64>,
    /// Packets after this seq became pending again (Redrive, Replay) since
    /// the last refill began: a refill under way may have read before, so
    /// its end must not forget them.
    rewound: Option<i64>,
    /// While a refill reads (or a hand-back adds): packets finished since
    /// it began (marked, dead-lettered), which it may have read as pending.
    /// The store's gate holds back inserts only, not marks or lease ends.
    finished: Option<HashSet<PacketId>>,
    /// The buffer: the highest seq left to the database since the last
    /// hand-back began. A hand-back reads no further: later packets went
    /// to the stream, or are left out again for the next one.
    spilled_upto: Option<i64>,
    /// The buffer: the seqs, from after the first to the second, of the
    /// packets left to the database since the last hand-back began
    /// because their XADD went unanswered ([`MemoryQueue::leave`]).
    left: Option<(i64, i64)>,
}

/// What the buffer gives back once Redis takes packets again: the packets
/// it kept that no stream entry holds (out of the buffer meanwhile, so no
/// local stream takes one while it goes to Redis), and the pending packets
/// from `after_seq` to `upto_seq` it may have left to the database.
#[derive(Debug)]
pub struct HandBack {
    pub kept: Vec<Queued>,
    pub after_seq: i64,
    pub upto_seq: i64,
}

/// A read of the database's pending packets that the queue asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    pub after_seq: i64,
    pub limit: usize,
}

impl MemoryQueue {
    /// Starts spilled from the beginning: the first refill rebuilds the
    /// queue from the database.
    pub fn new(window: usize) -> Self {
        MemoryQueue {
            order: VecDeque::new(),
            waiting: IdMap::default(),
            window: window.max(2),
            spilled: Some(0),
            rewound: None,
            finished: None,
            spilled_upto: None,
            left: None,
        }
    }

    /// The Redis queue's local hands. What it read from the stream goes in
    /// whatever the window ([`MemoryQueue::push_back`]: bounded by what
    /// local streams asked for); what Redis refused is offered
    /// ([`MemoryQueue::offer`]), at most `window` of it.
    pub fn buffer(window: usize) -> Self {
        MemoryQueue {
            order: VecDeque::new(),
            waiting: IdMap::default(),
            window: window.max(2),
            spilled: None,
            rewound: None,
            finished: None,
            spilled_upto: None,
            left: None,
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = PacketId> + '_ {
        self.waiting.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Pending packets after this seq may be in the database only.
    pub fn spilled(&self) -> Option<i64> {
        self.spilled
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn contains(&self, id: &PacketId) -> bool {
        self.waiting.contains_key(id)
    }

    pub fn get(&self, id: &PacketId) -> Option<&Queued> {
        self.waiting.get(id)
    }

    /// Every waiting packet.
    pub fn iter(&self) -> impl Iterator<Item = &Queued> {
        self.waiting.values()
    }

    /// A newly committed packet: queued, or left to a refill when the
    /// window is full or older packets still wait in the database (they go
    /// first). True when queued.
    pub fn offer(&mut self, pending: PendingPacket) -> bool {
        if self.spilled.is_none() && self.waiting.len() < self.window {
            self.push_back(Queued::local(pending));
            return true;
        }
        // Several writers commit out of seq order, so the lowest seq left
        // out decides where the next refill starts.
        let before = pending.seq - 1;
        self.spilled = Some(self.spilled.map_or(before, |s| s.min(before)));
        self.spilled_upto = Some(
            self.spilled_upto
                .map_or(pending.seq, |s| s.max(pending.seq)),
        );
        false
    }

    /// The buffer: a packet whose XADD went unanswered, left to the
    /// database whatever the window (its entry may land still, and one
    /// with a body is delivered unchecked, so no copy is kept here; see
    /// [`super::redis`]). The next hand-back reads it; unlike a spill, it
    /// holds back nothing Redis refuses later.
    pub fn leave(&mut self, pending: &PendingPacket) {
        let (after, upto) = (pending.seq - 1, pending.seq);
        self.left = Some(
            self.left
                .map_or((after, upto), |(a, u)| (a.min(after), u.max(upto))),
        );
    }

    /// Queues a packet whatever the window (one whose lease ended, one
    /// read from Redis): these are few, bounded by what streams may hold.
    pub fn push_back(&mut self, queued: Queued) {
        let id = queued.id();
        if self.waiting.insert(id, queued).is_none() {
            self.order.push_back(id);
        }
    }

    /// Puts a packet back at the front (a send that did not happen).
    pub fn push_front(&mut self, queued: Queued) {
        let id = queued.id();
        if self.waiting.insert(id, queued).is_none() {
            self.order.push_front(id);
        }
    }

    pub fn pop(&mut self) -> Option<Queued> {
        while let Some(id) = self.order.pop_front() {
            if let Some(queued) = self.waiting.remove(&id) {
                return Some(queued);
            }
        }
        None
    }

    /// Takes out, newest first, packets read from the stream until at most
    /// `room` wait. Packets without an entry (Redis refused them) stay:
    /// they go back through the hand-back, which adds only what is neither
    /// in the stream nor held, and would add one on its way twice.
    pub fn shed(&mut self, room: usize) -> Vec<Queued> {
        let mut out = Vec::new();
        let mut i = self.order.len();
        while self.waiting.len() > room && i > 0 {
            i -= 1;
            let id = self.order[i];
            if self.waiting.get(&id).is_some_and(|q| q.entry.is_some()) {
                out.extend(self.waiting.remove(&id));
                self.order.remove(i);
            }
        }
        out
    }

    pub fn remove(&mut self, id: &PacketId) -> Option<Queued> {
        let queued = self.waiting.remove(id)?;
        // Settled packets leave stale ids behind; keep them from piling up.
        if self.order.len() > 2 * self.waiting.len() + 1024 {
            let waiting = &self.waiting;
            self.order.retain(|id| waiting.contains_key(id));
        }
        Some(queued)
    }

    /// The read the queue needs now, if any: it spilled and is half empty.
    pub fn refill(&self) -> Option<Refill> {
        let after_seq = self.spilled?;
        (self.waiting.len() <= self.window / 2).then(|| Refill {
            after_seq,
            limit: self.window - self.waiting.len(),
        })
    }

    /// [`MemoryQueue::refill`], for the reader about to make that read: a
    /// rewind from now on is one this read may miss.
    pub fn begin_refill(&mut self) -> Option<Refill> {
        let read = self.refill()?;
        self.rewound = None;
        self.finished = Some(HashSet::new());
        Some(read)
    }

    /// This packet is finished (marked, dead-lettered): a refill under way
    /// must not bring it back.
    pub fn finished(&mut self, id: PacketId) {
        if let Some(finished) = &mut self.finished {
            finished.insert(id);
        }
    }

    /// Packets after `after_seq`, older than what the queue took since,
    /// are pending again in the database (an operator sent them back): the
    /// next refill reads from there.
    pub fn rewind(&mut self, after_seq: i64) {
        let lower = |at: Option<i64>| Some(at.map_or(after_seq, |s| s.min(after_seq)));
        self.spilled = lower(self.spilled);
        self.rewound = lower(self.rewound);
    }

    /// The buffer, once Redis takes packets again: takes out the packets
    /// it kept that no stream entry holds (kept because Redis refused them)
    /// and says from where the database may hold pending packets it left
    /// out; None if neither. Packets finished from now on are noted, so a
    /// failed hand-back does not keep them again.
    pub fn begin_hand_back(&mut self) -> Option<HandBack> {
        // In hand-out order, so what is kept again goes out as before.
        let mut seen = HashSet::new();
        let ids: Vec<PacketId> = self
            .order
            .iter()
            .filter(|id| self.waiting.get(id).is_some_and(|q| q.entry.is_none()))
            .filter(|id| seen.insert(**id))
            .copied()
            .collect();
        let kept: Vec<Queued> = ids.iter().filter_map(|id| self.remove(id)).collect();
        let seqs = kept.iter().map(|q| q.pending.seq);
        let (left_after, left_upto) = self.left.take().unzip();
        let after_seq = seqs
            .clone()
            .map(|s| s - 1)
            .chain(self.spilled)
            .chain(left_after)
            .min()?;
        let upto_seq = seqs
            .chain(self.spilled_upto)
            .chain(left_upto)
            .max()
            .unwrap_or(after_seq);
        self.spilled = None;
        self.spilled_upto = None;
        self.finished = Some(HashSet::new());
        Some(HandBack {
            kept,
            after_seq,
            upto_seq,
        })
    }

    /// Ends a hand-back. `added`: the stream now holds every packet it
    /// covered that is still pending. Else its packets are kept again
    /// (those not finished meanwhile nor held otherwise, while the window
    /// has room) and its range is left out again, for the next hand-back.
    pub fn handed_back(
        &mut self,
        back: HandBack,
        added: bool,
        held_elsewhere: impl Fn(&PacketId) -> bool,
    ) {
        let finished = self.finished.take().unwrap_or_default();
        if added {
            return;
        }
        for queued in back.kept {
            let id = queued.id();
            if !finished.contains(&id)
                && !held_elsewhere(&id)
                && !self.contains(&id)
                && self.waiting.len() < self.window
            {
                self.push_back(queued);
            }
        }
        self.spilled = Some(
            self.spilled
                .map_or(back.after_seq, |s| s.min(back.after_seq)),
        );
        self.spilled_upto = Some(
            self.spilled_upto
                .map_or(back.upto_seq, |s| s.max(back.upto_seq)),
        );
    }

    /// Takes the rows a refill read (pending, after `after_seq`, in seq
    /// order), skipping those this node already holds and those finished
    /// since the read began. No packet committed
    /// between the read and this call (the store's gate), so a short read
    /// means every pending packet is held: new ones are taken directly.
    pub fn refilled(
        &mut self,
        read: Refill,
        rows: Vec<PendingPacket>,
        held_elsewhere: impl Fn(&PacketId) -> bool,
    ) {
        let exhausted = rows.len() < read.limit;
        let mut last = read.after_seq;
        let finished = self.finished.take().unwrap_or_default();
        for pending in rows {
            last = last.max(pending.seq);
            let id = pending.packet.packet_id;
            if !held_elsewhere(&id) && !self.contains(&id) && !finished.contains(&id) {
                self.push_back(Queued::local(pending));
            }
        }
        let next = (!exhausted).then_some(last);
        // Rewound while this read ran: read those again.
        self.spilled = match (next, self.rewound.take()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(seq: i64) -> PendingPacket {
        PendingPacket::sample(seq)
    }

    fn drain(q: &mut MemoryQueue) -> Vec<i64> {
        std::iter::from_fn(|| q.pop().map(|x| x.pending.seq)).collect()
    }

    #[test]
    fn starts_by_reading_the_database_then_takes_offers() {
        let mut q = MemoryQueue::new(4);
        assert!(
            !q.offer(pending(1)),
            "older packets may wait in the database"
        );
        let read = q.refill().unwrap();
        assert_eq!(
            read,
            Refill {
                after_seq: 0,
                limit: 4
            }
        );
        q.refilled(read, vec![pending(1)], |_| false);
        assert_eq!(q.refill(), None, "a short read: everything is held");
        assert!(q.offer(pending(2)));
        assert_eq!(drain(&mut q), [1, 2]);
    }

    #[test]
    fn a_full_window_spills_to_the_database_and_reads_back_in_order() {
        let mut q = MemoryQueue::new(4);
        q.refilled(q.refill().unwrap(), Vec::new(), |_| false);
        for seq in 1..=4 {
            assert!(q.offer(pending(seq)));
        }
        // Committed out of order by two writers: 6 before 5.
        assert!(!q.offer(pending(6)));
        assert!(!q.offer(pending(5)));
        assert_eq!(q.refill(), None, "still full");
        assert_eq!(q.pop().unwrap().pending.seq, 1);
        assert_eq!(q.pop().unwrap().pending.seq, 2);
        let read = q.refill().unwrap();
        assert_eq!(read.after_seq, 4, "from the lowest packet left out");
        q.refilled(read, vec![pending(5), pending(6)], |_| false);
        assert_eq!(q.refill(), None);
        assert_eq!(drain(&mut q), [3, 4, 5, 6]);
    }

    #[test]
    fn a_refill_skips_what_is_held() {
        let mut q = MemoryQueue::new(4);
        let read = q.refill().unwrap();
        let (a, b) = (pending(1), pending(2));
        let leased = a.packet.packet_id;
        q.refilled(read, vec![a, b], |id| *id == leased);
        assert_eq!(drain(&mut q), [2]);
    }

    #[test]
    fn a_rewind_reads_old_packets_again_even_during_a_refill() {
        let mut q = MemoryQueue::new(8);
        let read = q.begin_refill().unwrap();
        q.refilled(read, vec![pending(5)], |_| false);
        assert_eq!(q.refill(), None, "everything is held");
        // Packets 2 and 3 are pending again: read from 1 on.
        q.rewind(1);
        let read = q.begin_refill().unwrap();
        assert_eq!(read.after_seq, 1);
        q.refilled(read, vec![pending(2), pending(3)], |_| false);
        assert_eq!(q.refill(), None);
        // A rewind while a read is under way: that read may predate it.
        let read = q.begin_refill();
        assert_eq!(read, None, "nothing to read yet");
        q.rewind(0);
        let read = q.begin_refill().unwrap();
        q.rewind(3);
        q.refilled(read, Vec::new(), |_| false);
        assert_eq!(q.refill().map(|r| r.after_seq), Some(3), "read again");
        let read = q.begin_refill().unwrap();
        q.refilled(read, Vec::new(), |_| false);
        assert_eq!(q.refill(), None);
        assert_eq!(drain(&mut q), [5, 2, 3]);
    }

    #[test]
    fn a_refill_leaves_out_packets_finished_while_it_read() {
        // Issue 16, suspicion 5: marked (or dead-lettered) between the
        // SELECT and the hand-over, a packet read as pending was queued
        // again and delivered once more.
        let mut q = MemoryQueue::new(4);
        let read = q.begin_refill().unwrap();
        let (a, b) = (pending(1), pending(2));
        q.finished(a.packet.packet_id);
        q.refilled(read, vec![a, b], |_| false);
        assert_eq!(drain(&mut q), [2]);
        // Only during that read: a later one takes the packet (redriven).
        q.rewind(0);
        let read = q.begin_refill().unwrap();
        let a = pending(1);
        q.refilled(read, vec![a], |_| false);
        assert_eq!(drain(&mut q), [1]);
    }

    #[test]
    fn a_buffer_keeps_a_window_of_what_redis_refused_and_gives_it_back() {
        // Issue 16, suspicion 4: the buffer in front of Redis kept all that
        // Redis refused, and never gave it back.
        let mut q = MemoryQueue::buffer(4);
        let kept: Vec<bool> = (1..=6).map(|seq| q.offer(pending(seq))).collect();
        assert_eq!(kept, [true, true, true, true, false, false]);
        // Read from the stream: taken whatever the window, and its entry
        // holds it, so it is not given back.
        let mut read = Queued::local(pending(7));
        read.entry = Some("0/1-0".into());
        q.push_back(read);

        let back = q.begin_hand_back().unwrap();
        assert_eq!((back.after_seq, back.upto_seq), (0, 6));
        let seqs: Vec<i64> = back.kept.iter().map(|k| k.pending.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(drain(&mut q), [7], "given-back packets are out of reach");
        // Refused again: kept again, but for one marked meanwhile; the
        // range is left out again.
        q.finished(back.kept[0].id());
        q.handed_back(back, false, |_| false);
        assert_eq!(q.spilled(), Some(0));
        assert!(!q.offer(pending(8)), "left out after what was left out");
        assert_eq!(drain(&mut q), [2, 3, 4]);

        let back = q.begin_hand_back().unwrap();
        assert_eq!((back.after_seq, back.upto_seq, back.kept.len()), (0, 8, 0));
        // Refused while the hand-back ran: kept, for the next one.
        assert!(q.offer(pending(9)));
        q.handed_back(back, true, |_| false);
        assert_eq!(q.spilled(), None);
        let back = q.begin_hand_back().unwrap();
        assert_eq!((back.after_seq, back.upto_seq, back.kept.len()), (8, 9, 1));
        q.handed_back(back, true, |_| false);
        assert!(q.begin_hand_back().is_none(), "nothing left to give back");
        assert!(q.is_empty());
    }

    #[test]
    fn a_buffer_leaves_what_redis_may_have_taken_to_the_hand_back() {
        let mut q = MemoryQueue::buffer(4);
        q.leave(&pending(3));
        q.leave(&pending(2));
        assert!(q.is_empty(), "no copy kept");
        // Unlike a spill it holds back nothing Redis refuses later.
        assert!(q.offer(pending(4)));
        let back = q.begin_hand_back().unwrap();
        assert_eq!((back.after_seq, back.upto_seq), (1, 4));
        assert_eq!(back.kept.len(), 1);
        q.handed_back(back, true, |_| false);
        assert!(q.begin_hand_back().is_none(), "nothing left to give back");
    }

    #[test]
    fn removed_packets_are_skipped() {
        let mut q = MemoryQueue::new(8);
        q.refilled(q.refill().unwrap(), Vec::new(), |_| false);
        let a = pending(1);
        let id = a.packet.packet_id;
        q.offer(a);
        q.offer(pending(2));
        assert!(q.remove(&id).is_some());
        assert_eq!(q.len(), 1);
        assert_eq!(drain(&mut q), [2]);
    }
}
