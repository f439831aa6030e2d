//! What one block of the record log holds: a commit group's effect, as
//! protobuf (compact, and an older reader skips fields it does not know).
//!
//! A record states a packet's state after the group, not the request that
//! led to it: replaying a record twice, or over a table that already has
//! it, leaves the same row.
use chrono::{DateTime, TimeZone, Utc};
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
}
