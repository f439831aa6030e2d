//! What the record log holds that SQLite's tables do not have yet.
//!
//! Invariants:
//! - An entry is the latest state of a packet some logged group wrote
//!   since the last fold took it: a new packet with its body (`New`), or a
//!   packet already in the tables whose state changed (`Folded`). What is
//!   here wins over the tables; a packet not here is exactly as the tables
//!   have it.
//! - Entries change only after their group is on disk in the log, and
//!   `lsn` is where the log ends for what the entries show; a fold takes a
//!   snapshot with that `lsn`, and the tables are then up to date to it.
//! - An entry leaves only after a fold committed its state (its version
//!   unchanged since the snapshot); one changed since stays, now `Folded`.
//! - `counts` are every stored packet's statuses, tables and overlay
//!   together, kept exact by whoever changes a state (the writer, and the
//!   fold thread's retention and requeue).
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::packet_id::IdMap;
use crate::domain::{DeliveryStatus, Packet, PacketId};
use crate::store::Counts;

/// A packet's delivery state, as a row holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub processed_at: Option<DateTime<Utc>>,
    pub processed_by_karma: bool,
    /// JSON list, as stored.
    pub karma_actions: Arc<str>,
    pub error_message: Option<Arc<str>>,
}

/// `[]`, shared: every stored packet starts with it.
fn no_actions() -> Arc<str> {
    static EMPTY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("[]"));
    Arc::clone(&EMPTY)
}

impl State {
    /// A packet waiting for delivery, with `attempts` deliveries spent.
    pub fn pending(attempts: u32) -> State {
        State {
            status: DeliveryStatus::Pending,
            attempts,
            processed_at: None,
            processed_by_karma: false,
            karma_actions: no_actions(),
            error_message: None,
        }
    }
}

/// Where an entry's packet is.
#[derive(Debug, Clone)]
pub enum Kind {
    /// Not in the tables yet: the whole packet is here, with its
    /// raw_signals as the log has them (JSON), for the fold's row.
    New {
        packet: Arc<Packet>,
        raw_signals: Arc<str>,
    },
    /// In the tables; only its state is newer here.
    Folded { user_id: Arc<str> },
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: i64,
    pub received_at: DateTime<Utc>,
    pub kind: Kind,
    pub state: State,
    version: u64,
}

impl Entry {
    pub fn user_id(&self) -> &str {
        match &self.kind {
            Kind::New { packet, .. } => &packet.user_id,
            Kind::Folded { user_id } => user_id,
        }
    }
}

/// What a fold takes: entries as they were, with their versions.
pub struct Snapshot {
    pub entries: Vec<(PacketId, Entry)>,
    /// The log position the tables are up to date to once these are in.
    pub lsn: u64,
    pub next_seq: i64,
}

#[derive(Default)]
pub struct Overlay {
    entries: IdMap<Entry>,
    by_seq: BTreeMap<i64, PacketId>,
    versions: u64,
    /// Where the log ends for what the entries show.
    pub lsn: u64,
    /// The seq the next stored packet gets.
    pub next_seq: i64,
    /// Every stored packet's status.
    pub counts: Counts,
    /// The largest packet id in the tables (ids sort as UUIDs): a larger
    /// one cannot be there, so its look-up needs no read.
    pub max_folded_id: Option<Uuid>,
}

fn count(counts: &mut Counts, status: DeliveryStatus, delta: i64) {
    let n = match status {
        DeliveryStatus::Pending => &mut counts.pending,
        DeliveryStatus::Leased => &mut counts.leased,
        DeliveryStatus::Processed => &mut counts.processed,
        DeliveryStatus::Failed => &mut counts.failed,
        DeliveryStatus::DeadLetter => &mut counts.dead_letter,
    };
    *n = n.saturating_add_signed(delta);
}

impl Overlay {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, id: &PacketId) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Whether the tables may hold `id`.
    pub fn may_be_folded(&self, id: &PacketId) -> bool {
        self.max_folded_id.is_some_and(|max| *id.as_uuid() <= max)
    }

    fn bump(&mut self) -> u64 {
        self.versions += 1;
        self.versions
    }

    /// A newly stored packet, pending.
    pub fn insert(
        &mut self,
        seq: i64,
        packet: Arc<Packet>,
        raw_signals: Arc<str>,
        received_at: DateTime<Utc>,
    ) {
        let version = self.bump();
        let id = packet.packet_id;
        count(&mut self.counts, DeliveryStatus::Pending, 1);
        self.by_seq.insert(seq, id);
        self.entries.insert(
            id,
            Entry {
                seq,
                received_at,
                kind: Kind::New {
                    packet,
                    raw_signals,
                },
                state: State::pending(0),
                version,
            },
        );
    }

    /// A packet's new state; `known` is how the tables have a packet that
    /// is not here yet (its seq, received_at, user and status).
    pub fn change(&mut self, id: PacketId, state: State, known: Option<Known>) {
        let version = self.bump();
        match self.entries.get_mut(&id) {
            Some(entry) => {
                count(&mut self.counts, entry.state.status, -1);
                count(&mut self.counts, state.status, 1);
                entry.state = state;
                entry.version = version;
            }
            None => {
                let known = known.expect("a packet not in the overlay comes with its row");
                count(&mut self.counts, known.status, -1);
                count(&mut self.counts, state.status, 1);
                self.by_seq.insert(known.seq, id);
                self.entries.insert(
                    id,
                    Entry {
                        seq: known.seq,
                        received_at: known.received_at,
                        kind: Kind::Folded {
                            user_id: known.user_id,
                        },
                        state,
                        version,
                    },
                );
            }
        }
    }

    /// Everything a fold writes, as it is now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            entries: self
                .entries
                .iter()
                .map(|(id, entry)| (*id, entry.clone()))
                .collect(),
            lsn: self.lsn,
            next_seq: self.next_seq,
        }
    }

    /// A fold committed `folded`: entries unchanged since leave; changed
    /// ones stay, now in the tables.
    pub fn folded(&mut self, folded: &[(PacketId, Entry)]) {
        for (id, was) in folded {
            if let Kind::New { packet, .. } = &was.kind {
                let id = *packet.packet_id.as_uuid();
                if self.max_folded_id.is_none_or(|max| id > max) {
                    self.max_folded_id = Some(id);
                }
            }
            let Some(entry) = self.entries.get_mut(id) else {
                continue;
            };
            if entry.version == was.version {
                self.by_seq.remove(&entry.seq);
                self.entries.remove(id);
            } else if let Kind::New { packet, .. } = &entry.kind {
                entry.kind = Kind::Folded {
                    user_id: Arc::from(packet.user_id.as_str()),
                };
            }
        }
    }

    /// Packets the tables lost by retention (seq, status as the tables had it).
    pub fn pruned(&mut self, statuses: &[DeliveryStatus]) {
        for status in statuses {
            count(&mut self.counts, *status, -1);
        }
    }

    /// Every entry's seq.
    pub fn seqs(&self) -> impl Iterator<Item = i64> + '_ {
        self.by_seq.keys().copied()
    }

    /// Entries after `seq`, in seq order.
    pub fn after(&self, seq: i64) -> impl Iterator<Item = (&PacketId, &Entry)> + '_ {
        self.by_seq
            .range(seq + 1..)
            .map(|(_, id)| (id, &self.entries[id]))
    }

    /// Entries of one user.
    pub fn of_user<'a>(&'a self, user_id: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .values()
            .filter(move |e| e.user_id() == user_id)
    }
}

/// How the tables have a packet (for [`Overlay::change`]).
#[derive(Debug, Clone)]
pub struct Known {
    pub seq: i64,
    pub received_at: DateTime<Utc>,
    pub user_id: Arc<str>,
    pub status: DeliveryStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet() -> Arc<Packet> {
        Packet::sample("u")
    }

    fn processed() -> State {
        State {
            status: DeliveryStatus::Processed,
            processed_by_karma: true,
            processed_at: Some(Utc::now()),
            ..State::pending(1)
        }
    }

    #[test]
    fn a_fold_removes_what_it_wrote_and_keeps_what_changed_since() {
        let mut overlay = Overlay::default();
        let (a, b) = (packet(), packet());
        overlay.insert(1, a.clone(), Arc::from("{}"), Utc::now());
        overlay.insert(2, b.clone(), Arc::from("{}"), Utc::now());
        let snapshot = overlay.snapshot();
        // b is marked while the fold writes.
        overlay.change(b.packet_id, processed(), None);
        overlay.folded(&snapshot.entries);
        assert!(overlay.get(&a.packet_id).is_none());
        let kept = overlay
            .get(&b.packet_id)
            .expect("changed since the snapshot");
        assert!(
            matches!(kept.kind, Kind::Folded { .. }),
            "now in the tables"
        );
        assert_eq!(kept.state.status, DeliveryStatus::Processed);
        assert_eq!(
            overlay.max_folded_id,
            Some(*a.packet_id.as_uuid().max(b.packet_id.as_uuid()))
        );
        assert_eq!(overlay.seqs().collect::<Vec<_>>(), [2]);
        let counts = &overlay.counts;
        assert_eq!((counts.pending, counts.processed), (1, 1));
    }

    #[test]
    fn a_change_to_a_folded_packet_moves_its_count() {
        let mut overlay = Overlay::default();
        overlay.counts.failed = 3;
        let id = PacketId::new();
        let known = Known {
            seq: 9,
            received_at: Utc::now(),
            user_id: Arc::from("u"),
            status: DeliveryStatus::Failed,
        };
        overlay.change(id, processed(), Some(known));
        assert_eq!((overlay.counts.failed, overlay.counts.processed), (2, 1));
        assert_eq!(overlay.of_user("u").count(), 1);
        assert_eq!(overlay.after(8).count(), 1);
        assert_eq!(overlay.after(9).count(), 0);
    }
}
