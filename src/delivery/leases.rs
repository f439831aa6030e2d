//! The leases this node granted: which packet is leased to whom, until when.
use std::collections::BTreeMap;

use tokio::time::Instant;

use crate::domain::PacketId;
use crate::domain::packet_id::IdMap;
use crate::queue::Queued;

/// Who holds a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A StreamPending call, by its number.
    Stream(u64),
    /// A poll of the JSON gateway: no stream, only the expiry ends it.
    Poll,
}

#[derive(Debug)]
pub struct Lease {
    pub queued: Queued,
    pub holder: Holder,
    /// Which delivery this is: 1 the first.
    pub attempt: u32,
    /// (expiry, grant number): the key in the expiry index.
    key: (Instant, u64),
}

#[derive(Default)]
pub struct Leases {
    by_id: IdMap<Lease>,
    /// Expiry order; one entry per lease, removed with it.
    by_expiry: BTreeMap<(Instant, u64), PacketId>,
    granted: u64,
    /// Leases held by polls (`Holder::Poll`), which no stream bounds.
    polled: usize,
}

impl Leases {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Leases held by polls of the JSON gateway.
    pub fn polled(&self) -> usize {
        self.polled
    }

    /// Keeps `polled` in step as a lease comes (+1) or goes (-1).
    fn count(&mut self, holder: Holder, delta: isize) {
        if holder == Holder::Poll {
            self.polled = self.polled.saturating_add_signed(delta);
        }
    }

    pub fn contains(&self, id: &PacketId) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn get(&self, id: &PacketId) -> Option<&Lease> {
        self.by_id.get(id)
    }

    /// Every lease.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_id.values()
    }

    pub fn attempt(&self, id: &PacketId) -> Option<u32> {
        self.by_id.get(id).map(|l| l.attempt)
    }

    /// The number the next [`Leases::grant`] gives its lease (for the
    /// delivery's token, made before the lease).
    pub fn next_grant(&self) -> u64 {
        self.granted + 1
    }

    /// Whether the lease on `id` is the one granted as number `grant`.
    pub fn holds(&self, id: &PacketId, grant: u64) -> bool {
        self.by_id.get(id).is_some_and(|l| l.key.1 == grant)
    }

    /// Moves the lease on `id` to end at `expires`. True when it now
    /// expires before every other (the expiry timer must wake earlier).
    pub fn extend(&mut self, id: &PacketId, expires: Instant) -> bool {
        let Some(lease) = self.by_id.get_mut(id) else {
            return false;
        };
        self.by_expiry.remove(&lease.key);
        // The grant number stays: it keeps the key unique and names the lease.
        lease.key.0 = expires;
        let key = lease.key;
        self.by_expiry.insert(key, *id);
        self.by_expiry
            .first_key_value()
            .is_some_and(|(k, _)| *k == key)
    }

    /// Leases `queued` to `holder` until `expires`. True when that lease
    /// expires before every other (the expiry timer must wake earlier).
    pub fn grant(
        &mut self,
        queued: Queued,
        holder: Holder,
        attempt: u32,
        expires: Instant,
    ) -> bool {
        self.granted += 1;
        let key = (expires, self.granted);
        let first = self
            .by_expiry
            .first_key_value()
            .is_none_or(|(k, _)| key < *k);
        let id = queued.id();
        self.by_expiry.insert(key, id);
        self.count(holder, 1);
        if let Some(old) = self.by_id.insert(
            id,
            Lease {
                queued,
                holder,
                attempt,
                key,
            },
        ) {
            // A packet is leased once at a time; keep the index in step anyway.
            self.by_expiry.remove(&old.key);
            self.count(old.holder, -1);
        }
        first
    }

    /// Ends the lease on `id`, if any.
    pub fn end(&mut self, id: &PacketId) -> Option<Lease> {
        let lease = self.by_id.remove(id)?;
        self.by_expiry.remove(&lease.key);
        self.count(lease.holder, -1);
        Some(lease)
    }

    /// Ends every lease expired at `now`, soonest first.
    pub fn expired(&mut self, now: Instant) -> Vec<Lease> {
        let mut out = Vec::new();
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let id = entry.remove();
            if let Some(lease) = self.by_id.remove(&id) {
                self.count(lease.holder, -1);
                out.push(lease);
            }
        }
        out
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.by_expiry.first_key_value().map(|((at, _), _)| *at)
    }

    /// Ends every lease (shutdown).
    pub fn drain(&mut self) -> Vec<Lease> {
        self.by_expiry.clear();
        self.polled = 0;
        self.by_id.drain().map(|(_, lease)| lease).collect()
    }

    /// Every leased packet's id.
    pub fn ids(&self) -> impl Iterator<Item = &PacketId> {
        self.by_id.keys()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::PendingPacket;

    fn queued() -> Queued {
        Queued::local(PendingPacket::sample(1))
    }

    #[test]
    fn expire_in_order_and_forget_ended_leases() {
        let mut leases = Leases::default();
        let now = Instant::now();
        let (a, b, c) = (queued(), queued(), queued());
        let (ida, idb, idc) = (a.id(), b.id(), c.id());
        assert!(leases.grant(a, Holder::Stream(1), 1, now + Duration::from_secs(2)));
        assert!(!leases.grant(b, Holder::Poll, 1, now + Duration::from_secs(3)));
        assert!(leases.grant(c, Holder::Stream(1), 2, now + Duration::from_secs(1)));
        assert_eq!(leases.next_expiry(), Some(now + Duration::from_secs(1)));
        assert_eq!(leases.end(&idc).unwrap().attempt, 2);
        assert!(leases.expired(now + Duration::from_millis(1500)).is_empty());
        let expired: Vec<PacketId> = leases
            .expired(now + Duration::from_secs(5))
            .iter()
            .map(|l| l.queued.id())
            .collect();
        assert_eq!(expired, [ida, idb]);
        assert_eq!(leases.len(), 0);
        assert_eq!(leases.next_expiry(), None);
    }

    #[test]
    fn an_extended_lease_moves_in_the_expiry_order_and_keeps_its_grant() {
        let mut leases = Leases::default();
        let now = Instant::now();
        let (a, b) = (queued(), queued());
        let (ida, idb) = (a.id(), b.id());
        let grant_a = leases.next_grant();
        leases.grant(a, Holder::Stream(1), 1, now + Duration::from_secs(1));
        let grant_b = leases.next_grant();
        leases.grant(b, Holder::Stream(2), 1, now + Duration::from_secs(2));
        assert_ne!(grant_a, grant_b);
        assert!(leases.holds(&ida, grant_a));
        assert!(!leases.holds(&ida, grant_b), "another delivery's grant");
        // Later than b: no longer the first to expire.
        assert!(!leases.extend(&ida, now + Duration::from_secs(5)));
        assert!(leases.holds(&ida, grant_a));
        assert_eq!(leases.next_expiry(), Some(now + Duration::from_secs(2)));
        let expired: Vec<PacketId> = leases
            .expired(now + Duration::from_secs(3))
            .iter()
            .map(|l| l.queued.id())
            .collect();
        assert_eq!(expired, [idb]);
        // Shortened: first again.
        assert!(leases.extend(&ida, now + Duration::from_millis(500)));
        assert!(!leases.extend(&idb, now), "an ended lease is not extended");
        assert_eq!(leases.expired(now + Duration::from_secs(1)).len(), 1);
    }
    #[test]
    fn polled_leases_are_counted_as_they_come_and_go() {
        let mut leases = Leases::default();
        let now = Instant::now();
        let (a, b, c) = (queued(), queued(), queued());
        let (ida, idb) = (a.id(), b.id());
        leases.grant(a, Holder::Poll, 1, now + Duration::from_secs(1));
        leases.grant(b, Holder::Poll, 1, now + Duration::from_secs(5));
        leases.grant(c, Holder::Stream(1), 1, now + Duration::from_secs(1));
        assert_eq!(leases.polled(), 2);
        leases.end(&idb);
        assert_eq!(leases.polled(), 1);
        assert_eq!(leases.expired(now + Duration::from_secs(2)).len(), 2);
        assert_eq!(leases.polled(), 0);
        assert!(!leases.contains(&ida));
    }
}
