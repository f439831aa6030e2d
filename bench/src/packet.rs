//! The seed's example packet (README), as protobuf for the gRPC doors and as
//! JSON for the REST door and NATS, with a client-chosen packet_id so the
//! tool knows every id it sent, and a user_id picked by the run's
//! [`UserSpread`].
use std::sync::OnceLock;

use bucket::proto::bucket::v1 as pb;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::users::UserSpread;

/// 2024-01-20T10:30:00Z, the seed's timestamp.
const SEED_TIMESTAMP_SECONDS: i64 = 1_705_746_600;

/// One packet to send: its id, its sequence number in the run, and the
/// spread that turns the number into its user.
#[derive(Clone, Copy, Debug)]
pub struct PacketRef {
    pub id: Uuid,
    pub seq: u64,
    users: UserSpread,
}

impl PacketRef {
    pub fn new(seq: u64, users: UserSpread) -> Self {
        Self {
            // v7: time-ordered, like the ids the server makes itself;
            // v4 when asked, as a browser's crypto.randomUUID() makes them.
            id: match users.random_ids {
                true => Uuid::new_v4(),
                false => Uuid::now_v7(),
            },
            seq,
            users,
        }
    }

    fn user(&self) -> String {
        self.users.user_id(self.seq)
    }

    pub fn proto(&self) -> pb::PacketInput {
        pb::PacketInput {
            packet_id: self.id.to_string(),
            user_id: self.user(),
            session_id: "session_456".into(),
            lesson_id: "lesson_789".into(),
            system_type: pb::SystemType::Gurukul as i32,
            role: pb::Role::Student as i32,
            timestamp: Some(prost_types::Timestamp {
                seconds: SEED_TIMESTAMP_SECONDS,
                nanos: 0,
            }),
            cognitive_state: "ON_TASK".into(),
            active_seconds: 4.5,
            idle_seconds: 0.3,
            away_seconds: 0.2,
            focus_score: Some(85.0),
            raw_signals: Some(raw_signals_struct().clone()),
            ..Default::default()
        }
    }

    /// The JSON the REST door takes (and what NATS publishers send).
    pub fn json(&self) -> Value {
        json!({
            "packet_id": self.id.to_string(),
            "user_id": self.user(),
            "session_id": "session_456",
            "lesson_id": "lesson_789",
            "system_type": "gurukul",
            "role": "student",
            "timestamp": "2024-01-20T10:30:00Z",
            "cognitive_state": "ON_TASK",
            "active_seconds": 4.5,
            "idle_seconds": 0.3,
            "away_seconds": 0.2,
            "focus_score": 85.0,
            "raw_signals": raw_signals(),
        })
    }

    pub fn json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.json()).expect("a JSON value serializes")
    }
}

fn raw_signals() -> Value {
    json!({"dwell_time_ms": 1200, "mouse_velocity": 0.5})
}

/// Built once: every packet carries the same raw_signals.
fn raw_signals_struct() -> &'static bucket::proto::JsonStruct {
    static S: OnceLock<bucket::proto::JsonStruct> = OnceLock::new();
    S.get_or_init(|| {
        let Value::Object(map) = raw_signals() else {
            unreachable!("raw_signals is an object")
        };
        bucket::proto::json_to_struct(&map)
    })
}

/// The packet_id inside a JSON packet (NATS payloads), without decoding the rest.
pub fn id_from_json(payload: &[u8]) -> Option<Uuid> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        packet_id: Uuid,
    }
    serde_json::from_slice::<IdOnly>(payload)
        .ok()
        .map(|p| p.packet_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_carries_the_id_and_the_seed_fields() {
        let users = UserSpread::new(1000);
        let p = PacketRef::new(1234, users);
        let bytes = p.json_bytes();
        assert_eq!(id_from_json(&bytes), Some(p.id));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["user_id"], users.user_id(1234));
        assert_eq!(v["raw_signals"]["dwell_time_ms"], 1200);
        let proto = p.proto();
        assert_eq!(proto.packet_id, p.id.to_string());
        assert_eq!(proto.user_id, users.user_id(1234));
        assert_eq!(proto.timestamp.unwrap().seconds, SEED_TIMESTAMP_SECONDS);
    }

    #[test]
    fn ids_are_time_ordered_unless_random_ones_are_asked_for() {
        let users = UserSpread::new(10);
        assert_eq!(PacketRef::new(1, users).id.get_version_num(), 7);
        let mut random = users;
        random.random_ids = true;
        assert_eq!(PacketRef::new(1, random).id.get_version_num(), 4);
    }
}
