//! A packet as a Redis stream entry carries it, so the node that reads the
//! entry can deliver without reading the database.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::Packet;
use crate::store::PendingPacket;

#[derive(Serialize, Deserialize)]
struct Body<P> {
    packet: P,
    seq: i64,
    received_at: DateTime<Utc>,
    attempts: u32,
}

pub fn encode(pending: &PendingPacket) -> Vec<u8> {
    serde_json::to_vec(&Body {
        packet: pending.packet.as_ref(),
        seq: pending.seq,
        received_at: pending.received_at,
        attempts: pending.attempts,
    })
    .expect("a packet always encodes")
}

/// None for bytes this version cannot read: the reader then reads the
/// packet from the database instead.
pub fn decode(bytes: &[u8]) -> Option<PendingPacket> {
    let body: Body<Packet> = serde_json::from_slice(bytes).ok()?;
    Some(PendingPacket {
        packet: Arc::new(body.packet),
        seq: body.seq,
        received_at: body.received_at,
        attempts: body.attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::packet::{PacketDraft, TimestampInput};

    #[test]
    fn round_trips() {
        let draft = PacketDraft {
            user_id: Some("u".into()),
            timestamp: Some(TimestampInput::At(Utc::now())),
            cognitive_state: Some("ON_TASK".into()),
            active_seconds: Some(4.5),
            idle_seconds: Some(0.5),
            away_seconds: Some(0.0),
            focus_score: Some(85.0),
            raw_signals: Some(serde_json::json!({"a": [1, 2.5, {"b": null}]})),
            ..Default::default()
        };
        let pending = PendingPacket {
            packet: Arc::new(Packet::parse(draft, Utc::now()).unwrap()),
            seq: 42,
            received_at: Utc::now(),
            attempts: 2,
        };
        let back = decode(&encode(&pending)).unwrap();
        assert_eq!(back.packet, pending.packet);
        assert_eq!(
            (back.seq, back.received_at, back.attempts),
            (42, pending.received_at, 2)
        );
        assert!(decode(b"not json").is_none());
    }
}
