//! What one block of the record log holds: a commit group's effect, as
//! protobuf (compact, and an older reader skips fields it does not know).
//!
//! A record states a packet's state after the group, not the request that
//! led to it: replaying a record twice, or over a table that already has
//! it, leaves the same row.
//!
//! The writer encodes a group from its own values ([`InsertView`],
//! [`ChangeView`], [`encode_group`]) into exactly the bytes prost writes
//! for the [`GroupRecord`] with them (a property test holds the two
//! alike); the prost structs are what the log is read back into.
use chrono::{DateTime, TimeZone, Utc};
use prost::encoding::WireType;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::labels::Label;
use crate::domain::{DeliveryStatus, Packet, PacketId};

/// One commit group.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupRecord {
    /// Packets stored by the group.
    #[prost(message, repeated, tag = "1")]
    pub inserts: Vec<InsertRecord>,
    /// Packets whose state the group changed (marks, ended leases).
    #[prost(message, repeated, tag = "2")]
    pub changes: Vec<ChangeRecord>,
}

/// A new packet, pending.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InsertRecord {
    #[prost(int64, tag = "1")]
    pub seq: i64,
    #[prost(bytes = "vec", tag = "2")]
    pub packet_id: Vec<u8>,
    #[prost(string, tag = "3")]
    pub user_id: String,
    #[prost(string, optional, tag = "4")]
    pub employee_id: Option<String>,
    #[prost(string, optional, tag = "5")]
    pub session_id: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub lesson_id: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub system_type: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub role: Option<String>,
    #[prost(int64, tag = "9")]
    pub client_seconds: i64,
    #[prost(uint32, tag = "10")]
    pub client_nanos: u32,
    #[prost(string, tag = "11")]
    pub cognitive_state: String,
    #[prost(string, optional, tag = "12")]
    pub state: Option<String>,
    #[prost(double, tag = "13")]
    pub active_seconds: f64,
    #[prost(double, tag = "14")]
    pub idle_seconds: f64,
    #[prost(double, tag = "15")]
    pub away_seconds: f64,
    #[prost(double, optional, tag = "16")]
    pub focus_score: Option<f64>,
    #[prost(double, tag = "17")]
    pub integrity_score: f64,
    /// JSON text.
    #[prost(string, tag = "18")]
    pub raw_signals: String,
    /// Microseconds since the epoch (the store keeps microseconds).
    #[prost(int64, tag = "19")]
    pub received_at_us: i64,
}

/// A packet's delivery state after the group.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChangeRecord {
    #[prost(int64, tag = "1")]
    pub seq: i64,
    #[prost(bytes = "vec", tag = "2")]
    pub packet_id: Vec<u8>,
    /// `DeliveryStatus::as_str`.
    #[prost(string, tag = "3")]
    pub status: String,
    #[prost(uint32, tag = "4")]
    pub delivery_attempts: u32,
    #[prost(int64, optional, tag = "5")]
    pub processed_at_us: Option<i64>,
    #[prost(bool, tag = "6")]
    pub processed_by_karma: bool,
    /// JSON list.
    #[prost(string, tag = "7")]
    pub karma_actions: String,
    #[prost(string, optional, tag = "8")]
    pub error_message: Option<String>,
}

/// A record the log holds that no version of the bucket writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record log: {0}")]
pub struct BadRecord(pub String);

pub fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

pub fn from_micros(us: i64) -> Result<DateTime<Utc>, BadRecord> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| BadRecord(format!("time {us} out of range")))
}

pub fn packet_id(bytes: &[u8]) -> Result<PacketId, BadRecord> {
    Uuid::from_slice(bytes)
        .map(PacketId::from)
        .map_err(|_| BadRecord(format!("a packet id of {} bytes", bytes.len())))
}

fn label<T: Label>(text: Option<String>) -> Result<Option<T>, BadRecord> {
    text.map(|t| {
        t.parse()
            .map_err(|_| BadRecord(format!("unknown {} {t:?}", T::FIELD)))
    })
    .transpose()
}

impl InsertRecord {
    pub fn new(seq: i64, packet: &Packet, received_at: DateTime<Utc>) -> InsertRecord {
        InsertRecord {
            seq,
            packet_id: packet.packet_id.as_uuid().as_bytes().to_vec(),
            user_id: packet.user_id.clone(),
            employee_id: packet.employee_id.clone(),
            session_id: packet.session_id.clone(),
            lesson_id: packet.lesson_id.clone(),
            system_type: packet.system_type.map(|s| s.as_str().to_owned()),
            role: packet.role.map(|r| r.as_str().to_owned()),
            client_seconds: packet.client_timestamp.timestamp(),
            client_nanos: packet.client_timestamp.timestamp_subsec_nanos(),
            cognitive_state: packet.cognitive_state.clone(),
            state: packet.state.map(|s| s.as_str().to_owned()),
            active_seconds: packet.active_seconds,
            idle_seconds: packet.idle_seconds,
            away_seconds: packet.away_seconds,
            focus_score: packet.focus_score,
            integrity_score: packet.integrity_score,
            raw_signals: serde_json::to_string(&packet.raw_signals)
                .expect("JSON values always encode"),
            received_at_us: micros(received_at),
        }
    }

    /// The packet and when it was received.
    pub fn into_packet(self) -> Result<(Packet, DateTime<Utc>), BadRecord> {
        let client_timestamp = Utc
            .timestamp_opt(self.client_seconds, self.client_nanos)
            .single()
            .ok_or_else(|| BadRecord(format!("client timestamp {}", self.client_seconds)))?;
        let raw_signals: Map<String, Value> = serde_json::from_str(&self.raw_signals)
            .map_err(|e| BadRecord(format!("raw_signals: {e}")))?;
        let packet = Packet {
            packet_id: packet_id(&self.packet_id)?,
            user_id: self.user_id,
            employee_id: self.employee_id,
            session_id: self.session_id,
            lesson_id: self.lesson_id,
            system_type: label(self.system_type)?,
            role: label(self.role)?,
            client_timestamp,
            cognitive_state: self.cognitive_state,
            state: label(self.state)?,
            active_seconds: self.active_seconds,
            idle_seconds: self.idle_seconds,
            away_seconds: self.away_seconds,
            focus_score: self.focus_score,
            integrity_score: self.integrity_score,
            raw_signals,
        };
        Ok((packet, from_micros(self.received_at_us)?))
    }
}

/// A new packet's record, encoded straight from the packet: the bytes of
/// [`InsertRecord::new`]'s record (a property test holds them alike),
/// without copying the packet's strings (and its JSON) into one first.
/// The writer logs every packet: with [`ChangeView`] for the marks, its
/// thread's own time fell by about a sixth (BENCHMARKS.md, fifteenth
/// session).
#[derive(Debug, Clone, Copy)]
pub struct InsertView<'a> {
    pub seq: i64,
    pub packet: &'a Packet,
    /// The packet's raw_signals as JSON text.
    pub raw_signals: &'a str,
    pub received_at_us: i64,
}

/// A packet's state after the group, encoded from the writer's own
/// values: the bytes of the [`ChangeRecord`] with them.
#[derive(Debug, Clone, Copy)]
pub struct ChangeView<'a> {
    pub seq: i64,
    pub packet_id: &'a PacketId,
    pub status: DeliveryStatus,
    pub delivery_attempts: u32,
    pub processed_at_us: Option<i64>,
    pub processed_by_karma: bool,
    pub karma_actions: &'a str,
    pub error_message: Option<&'a str>,
}

/// The bytes of a [`GroupRecord`] with these inserts and changes.
pub fn encode_group(inserts: &[InsertView<'_>], changes: &[ChangeView<'_>]) -> Vec<u8> {
    use prost::encoding::{encoded_len_varint, key_len};
    let insert_lens: Vec<usize> = inserts.iter().map(|i| encoded_len(i.fields())).collect();
    let change_lens: Vec<usize> = changes.iter().map(|c| encoded_len(c.fields())).collect();
    let total: usize = [(1, &insert_lens), (2, &change_lens)]
        .into_iter()
        .flat_map(|(tag, lens)| lens.iter().map(move |len| (tag, *len)))
        .map(|(tag, len)| key_len(tag) + encoded_len_varint(len as u64) + len)
        .sum();
    let mut buf = Vec::with_capacity(total);
    for (insert, len) in inserts.iter().zip(insert_lens) {
        put_record(&mut buf, 1, len, insert.fields());
    }
    for (change, len) in changes.iter().zip(change_lens) {
        put_record(&mut buf, 2, len, change.fields());
    }
    buf
}

/// A field of a record, as prost writes it.
enum Field<'a> {
    Int(u64),
    Text(&'a str),
    Bytes(&'a [u8]),
    Double(f64),
}

impl<'a> InsertView<'a> {
    /// The record's fields in tag order, each only where prost writes it:
    /// a plain field when it is not its default, an optional one when set.
    fn fields(&self) -> impl Iterator<Item = (u32, Field<'a>)> + use<'a> {
        let p = self.packet;
        let some = |tag, v: Option<&'a str>| v.map(|v| (tag, Field::Text(v)));
        let double = |tag, v: f64| (v != 0.0).then_some((tag, Field::Double(v)));
        [
            int(1, self.seq),
            Some((2, Field::Bytes(p.packet_id.as_uuid().as_bytes()))),
            text(3, &p.user_id),
            some(4, p.employee_id.as_deref()),
            some(5, p.session_id.as_deref()),
            some(6, p.lesson_id.as_deref()),
            some(7, p.system_type.map(|s| s.as_str())),
            some(8, p.role.map(|r| r.as_str())),
            int(9, p.client_timestamp.timestamp()),
            int(10, i64::from(p.client_timestamp.timestamp_subsec_nanos())),
            text(11, &p.cognitive_state),
            some(12, p.state.map(|s| s.as_str())),
            double(13, p.active_seconds),
            double(14, p.idle_seconds),
            double(15, p.away_seconds),
            p.focus_score.map(|v| (16, Field::Double(v))),
            double(17, p.integrity_score),
            text(18, self.raw_signals),
            int(19, self.received_at_us),
        ]
        .into_iter()
        .flatten()
    }
}

impl<'a> ChangeView<'a> {
    /// As [`InsertView::fields`], for a [`ChangeRecord`].
    fn fields(&self) -> impl Iterator<Item = (u32, Field<'a>)> + use<'a> {
        [
            int(1, self.seq),
            Some((2, Field::Bytes(self.packet_id.as_uuid().as_bytes()))),
            text(3, self.status.as_str()),
            int(4, i64::from(self.delivery_attempts)),
            self.processed_at_us.map(|v| (5, Field::Int(v as u64))),
            int(6, i64::from(self.processed_by_karma)),
            text(7, self.karma_actions),
            self.error_message.map(|v| (8, Field::Text(v))),
        ]
        .into_iter()
        .flatten()
    }
}

/// A plain integer field, written unless 0 (proto3's default).
fn int<'a>(tag: u32, v: i64) -> Option<(u32, Field<'a>)> {
    (v != 0).then_some((tag, Field::Int(v as u64)))
}

/// A plain string field, written unless empty (proto3's default).
fn text(tag: u32, v: &str) -> Option<(u32, Field<'_>)> {
    (!v.is_empty()).then_some((tag, Field::Text(v)))
}

/// One record of the group: its key, its length, its fields.
fn put_record<'a>(
    buf: &mut Vec<u8>,
    tag: u32,
    len: usize,
    fields: impl Iterator<Item = (u32, Field<'a>)>,
) {
    put_key(tag, WireType::LengthDelimited, buf);
    put_varint(len as u64, buf);
    encode_fields(fields, buf);
}

/// Bytes the fields take, keys included.
fn encoded_len<'a>(fields: impl Iterator<Item = (u32, Field<'a>)>) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    fields
        .map(|(tag, field)| {
            key_len(tag)
                + match field {
                    Field::Int(v) => encoded_len_varint(v),
                    Field::Text(v) => encoded_len_varint(v.len() as u64) + v.len(),
                    Field::Bytes(v) => encoded_len_varint(v.len() as u64) + v.len(),
                    Field::Double(_) => 8,
                }
        })
        .sum()
}

fn encode_fields<'a>(fields: impl Iterator<Item = (u32, Field<'a>)>, buf: &mut Vec<u8>) {
    for (tag, field) in fields {
        match field {
            Field::Int(v) => {
                put_key(tag, WireType::Varint, buf);
                put_varint(v, buf);
            }
            Field::Text(v) => {
                put_key(tag, WireType::LengthDelimited, buf);
                put_varint(v.len() as u64, buf);
                buf.extend_from_slice(v.as_bytes());
            }
            Field::Bytes(v) => {
                put_key(tag, WireType::LengthDelimited, buf);
                put_varint(v.len() as u64, buf);
                buf.extend_from_slice(v);
            }
            Field::Double(v) => {
                put_key(tag, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// A field's key, as prost's `encode_key` writes it.
fn put_key(tag: u32, wire_type: WireType, buf: &mut Vec<u8>) {
    put_varint(u64::from(tag << 3 | wire_type as u32), buf);
}

/// The bytes of prost's `encode_varint`, pushed onto the `Vec` directly:
/// through `BufMut` each call cost ~32 instructions, and a packet's
/// records take ~42 calls, a tenth of the writer thread's instructions
/// (callgrind, twenty-first session). `encode_group` sized the buffer, so
/// no push reallocates.
fn put_varint(mut v: u64, buf: &mut Vec<u8>) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

impl ChangeRecord {
    pub fn status(&self) -> Result<DeliveryStatus, BadRecord> {
        DeliveryStatus::parse(&self.status)
            .ok_or_else(|| BadRecord(format!("status {:?}", self.status)))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::domain::packet::{PacketDraft, TimestampInput};

    #[test]
    fn a_packet_survives_the_record_bit_for_bit() {
        let draft = PacketDraft {
            user_id: Some("u1".into()),
            employee_id: Some("e1".into()),
            system_type: Some("ems".into()),
            role: Some("employee".into()),
            timestamp: Some(TimestampInput::At(
                Utc.timestamp_opt(1_700_000_000, 123_456_789).unwrap(),
            )),
            state: Some("WORKING".into()),
            active_seconds: Some(4.9),
            idle_seconds: Some(0.1),
            away_seconds: Some(0.0),
            focus_score: Some(54.781751339831196),
            raw_signals: Some(serde_json::json!({"a": [1.5, {"b": null}], "c": "ü"})),
            ..Default::default()
        };
        let packet = Packet::parse(draft, Utc::now()).unwrap();
        let at = Utc.timestamp_opt(1_700_000_001, 654_321_000).unwrap();
        let group = GroupRecord {
            inserts: vec![InsertRecord::new(42, &packet, at)],
            changes: Vec::new(),
        };
        let bytes = group.encode_to_vec();
        let read = GroupRecord::decode(&bytes[..]).unwrap();
        let (back, received_at) = read.inserts[0].clone().into_packet().unwrap();
        assert_eq!((back, received_at), (packet, at));
        assert_eq!(read.inserts[0].seq, 42);
    }

    mod view {
        use proptest::prelude::*;

        use super::*;
        use crate::domain::labels::{LegacyState, SenderRole, SystemType};

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![Just(String::new()), "[a-zü-]{1,12}"]
        }

        fn double() -> impl Strategy<Value = f64> {
            prop_oneof![Just(0.0), Just(-0.0), any::<f64>()]
        }

        fn one_of<T: Copy + std::fmt::Debug + 'static>(
            all: &'static [T],
        ) -> impl Strategy<Value = Option<T>> {
            proptest::option::of(proptest::sample::select(all))
        }

        prop_compose! {
            fn packet()(
                id in any::<u128>(),
                user_id in text(),
                employee_id in proptest::option::of(text()),
                session_id in proptest::option::of(text()),
                lesson_id in proptest::option::of(text()),
                system_type in one_of(SystemType::ALL),
                role in one_of(SenderRole::ALL),
                secs in prop_oneof![Just(0i64), -62_000_000_000i64..250_000_000_000],
                nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000],
                cognitive_state in text(),
                state in one_of(LegacyState::ALL),
                active_seconds in double(),
                idle_seconds in double(),
                away_seconds in double(),
                focus_score in proptest::option::of(double()),
                integrity_score in double(),
                signals in proptest::collection::btree_map("[a-z]{1,4}", any::<i32>(), 0..3),
            ) -> Packet {
                Packet {
                    packet_id: PacketId::from(Uuid::from_u128(id)),
                    user_id,
                    employee_id,
                    session_id,
                    lesson_id,
                    system_type,
                    role,
                    client_timestamp: Utc.timestamp_opt(secs, nanos).unwrap(),
                    cognitive_state,
                    state,
                    active_seconds,
                    idle_seconds,
                    away_seconds,
                    focus_score,
                    integrity_score,
                    raw_signals: signals.into_iter().map(|(k, v)| (k, Value::from(v))).collect(),
                }
            }
        }

        fn change() -> impl Strategy<
            Value = (
                i64,
                PacketId,
                DeliveryStatus,
                u32,
                Option<i64>,
                bool,
                String,
                Option<String>,
            ),
        > {
            (
                any::<i64>(),
                any::<u128>().prop_map(|id| PacketId::from(Uuid::from_u128(id))),
                proptest::sample::select(vec![
                    DeliveryStatus::Pending,
                    DeliveryStatus::Processed,
                    DeliveryStatus::Failed,
                    DeliveryStatus::DeadLetter,
                ]),
                prop_oneof![Just(0u32), any::<u32>()],
                proptest::option::of(any::<i64>()),
                any::<bool>(),
                text(),
                proptest::option::of(text()),
            )
        }

        proptest! {
            /// `put_varint` writes what prost's `encode_varint` writes, for
            /// every width (a negative int64 takes ten bytes).
            #[test]
            fn a_varint_is_prost_s(v in prop_oneof![0u64..0x80, 0u64..1 << 35, any::<u64>()]) {
                let (mut ours, mut prost_s) = (Vec::new(), Vec::new());
                put_varint(v, &mut ours);
                prost::encoding::encode_varint(v, &mut prost_s);
                prop_assert_eq!(ours, prost_s);
            }
        }

        proptest! {
            /// The writer's encoding is prost's, byte for byte: what it logs
            /// every reader (and an older bucket) decodes as before.
            #[test]
            fn a_group_encodes_as_prost_encodes_it(
                inserts in proptest::collection::vec((any::<i64>(), packet(), any::<i64>()), 0..4),
                changes in proptest::collection::vec(change(), 0..4),
            ) {
                let json: Vec<String> = inserts
                    .iter()
                    .map(|(_, p, _)| serde_json::to_string(&p.raw_signals).unwrap())
                    .collect();
                let views: Vec<InsertView<'_>> = inserts
                    .iter()
                    .zip(&json)
                    .map(|((seq, packet, at), raw_signals)| InsertView {
                        seq: *seq,
                        packet,
                        raw_signals,
                        received_at_us: *at,
                    })
                    .collect();
                let change_views: Vec<ChangeView<'_>> = changes
                    .iter()
                    .map(|(seq, id, status, attempts, at, karma, actions, error)| ChangeView {
                        seq: *seq,
                        packet_id: id,
                        status: *status,
                        delivery_attempts: *attempts,
                        processed_at_us: *at,
                        processed_by_karma: *karma,
                        karma_actions: actions,
                        error_message: error.as_deref(),
                    })
                    .collect();
                let prost = GroupRecord {
                    inserts: inserts
                        .iter()
                        .map(|(seq, packet, at)| InsertRecord {
                            // Any i64, not only a time chrono can hold.
                            received_at_us: *at,
                            ..InsertRecord::new(*seq, packet, Utc::now())
                        })
                        .collect(),
                    changes: changes
                        .iter()
                        .map(|(seq, id, status, attempts, at, karma, actions, error)| ChangeRecord {
                            seq: *seq,
                            packet_id: id.as_uuid().as_bytes().to_vec(),
                            status: status.as_str().to_owned(),
                            delivery_attempts: *attempts,
                            processed_at_us: *at,
                            processed_by_karma: *karma,
                            karma_actions: actions.clone(),
                            error_message: error.clone(),
                        })
                        .collect(),
                };
                prop_assert_eq!(encode_group(&views, &change_views), prost.encode_to_vec());
            }
        }
    }
}
