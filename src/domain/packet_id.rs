//! A packet's id: a UUID that cannot be mixed up with the other UUIDs the
//! bucket handles (request ids, node names, lease tokens).
use std::fmt;

use uuid::Uuid;

use super::packet::quoted;

/// Serialized, bound and stored exactly as the bare UUID it wraps, so the
/// Redis queue's entries, the JSON shapes and the SQL stay as they were.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    sqlx::Type,
)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct PacketId(Uuid);

/// The hasher of the maps the hot path keeps by packet id: foldhash
/// (hashbrown's own default), seeded per process. A packet takes ten or
/// so look-ups; in a map of 4,096 ids std's SipHash-1-3 took ~11 ns each,
/// foldhash ~4 (BENCHMARKS.md, fifteenth session).
pub type IdHasher = foldhash::fast::RandomState;
/// A map by packet id (see [`IdHasher`]).
pub type IdMap<V> = std::collections::HashMap<PacketId, V, IdHasher>;
/// A set of packet ids (see [`IdHasher`]).
pub type IdSet = std::collections::HashSet<PacketId, IdHasher>;

impl PacketId {
    /// A fresh id for a packet sent without one: UUIDv7, so ids the bucket
    /// makes sort by when they were made.
    #[expect(
        clippy::new_without_default,
        reason = "a default that differs on every call would surprise"
    )]
    pub fn new() -> PacketId {
        PacketId(Uuid::now_v7())
    }

    /// Accepts only the usual UUID text forms; the error describes `raw`
    /// for a field violation.
    pub fn parse(raw: &str) -> Result<PacketId, String> {
        Uuid::try_parse(raw)
            .map(PacketId)
            .map_err(|_| format!("{} is not a UUID", quoted(raw)))
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The id as its `Display` writes it, made straight: through `Display`
    /// (`to_string`) an id took ~700 instructions, and the hot path writes
    /// one per answer, delivery and fold row (BENCHMARKS.md, twenty-first
    /// and twenty-second sessions).
    pub fn text(self) -> String {
        let mut buffer = Uuid::encode_buffer();
        self.0.hyphenated().encode_lower(&mut buffer).to_owned()
    }
}

impl From<Uuid> for PacketId {
    fn from(id: Uuid) -> PacketId {
        PacketId(id)
    }
}

/// Hyphenated lowercase, the form every door sends and SQLite stores.
impl fmt::Display for PacketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_in_lowercase_hyphenated_form() {
        let id = PacketId::parse("0192F3A4-5B6C-7D8E-9FA0-B1C2D3E4F5A6").unwrap();
        assert_eq!(id.to_string(), "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a6");
        assert_eq!(PacketId::parse(&id.to_string()), Ok(id));
        let fresh = PacketId::new();
        assert_eq!(fresh.as_uuid().get_version_num(), 7);
        assert_eq!(fresh.to_string(), fresh.as_uuid().to_string());
    }

    proptest::proptest! {
        #[test]
        fn text_is_what_display_writes(id in proptest::prelude::any::<u128>()) {
            let id = PacketId::from(Uuid::from_u128(id));
            proptest::prop_assert_eq!(id.text(), id.to_string());
        }
    }

    #[test]
    fn serde_form_is_the_bare_uuid() {
        let uuid = Uuid::now_v7();
        let id = PacketId::from(uuid);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, serde_json::to_string(&uuid).unwrap());
        assert_eq!(serde_json::from_str::<PacketId>(&json).unwrap(), id);
    }

    #[test]
    fn an_invalid_id_is_described_quoted() {
        assert_eq!(
            PacketId::parse("nope").unwrap_err(),
            r#""nope" is not a UUID"#
        );
    }
}
