//! A JSON body to a packet draft: the JSON door's counterpart of the gRPC
//! door's proto conversion (`grpc/convert.rs`). The rules are the domain's
//! (`Packet::parse`); this only reads what was sent.
use serde_json::Value;

use crate::domain::packet::TimestampInput;
use crate::domain::{FieldViolation, PacketDraft};

/// Reads a REST JSON body. A field of the wrong JSON type is kept as a
/// violation for `Packet::parse`, which reports it with every other one
/// (as FastAPI does); `null` counts as absent; unknown fields are ignored
/// (as the original bucket did).
pub fn draft(body: &Value) -> PacketDraft {
    let Value::Object(map) = body else {
        // Names the item itself: "" (the caller says where it is).
        return PacketDraft {
            wrong_types: vec![FieldViolation::new("", "the packet must be a JSON object")],
            ..Default::default()
        };
    };
    let mut wrong_types = Vec::new();
    let mut text = |field: &str| match map.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            wrong_types.push(FieldViolation::new(
                field,
                format!("{field} must be a string"),
            ));
            None
        }
    };
    let mut draft = PacketDraft {
        packet_id: text("packet_id"),
        user_id: text("user_id"),
        employee_id: text("employee_id"),
        session_id: text("session_id"),
        lesson_id: text("lesson_id"),
        system_type: text("system_type"),
        role: text("role"),
        timestamp: text("timestamp").map(TimestampInput::Text),
        cognitive_state: text("cognitive_state"),
        state: text("state"),
        raw_signals: map.get("raw_signals").filter(|v| !v.is_null()).cloned(),
        ..Default::default()
    };
    let mut number = |field: &str| match map.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(_) => {
            wrong_types.push(FieldViolation::new(
                field,
                format!("{field} must be a number"),
            ));
            None
        }
    };
    draft.active_seconds = number("active_seconds");
    draft.idle_seconds = number("idle_seconds");
    draft.away_seconds = number("away_seconds");
    draft.focus_score = number("focus_score");
    draft.integrity_score = number("integrity_score");
    draft.wrong_types = wrong_types;
    draft
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use serde_json::json;

    use super::*;
    use crate::domain::Packet;

    fn now() -> DateTime<Utc> {
        "2024-01-20T10:30:05Z".parse().unwrap()
    }

    #[test]
    fn json_body_reads_like_the_seed() {
        let body = json!({
            "user_id": "user_123", "timestamp": "2024-01-20T10:30:00Z",
            "cognitive_state": "ON_TASK", "active_seconds": 4.5, "idle_seconds": 0.3,
            "away_seconds": 0.2, "focus_score": 85.0, "raw_signals": {}, "extra": 1,
            "lesson_id": null
        });
        let p = Packet::parse(draft(&body), now()).unwrap();
        assert_eq!(p.user_id, "user_123");
        assert_eq!(p.lesson_id, None);
        // Type errors come with the rule errors, one per field.
        let mut wrong = body.clone();
        wrong["focus_score"] = json!("high");
        wrong["user_id"] = json!(7);
        wrong["active_seconds"] = json!("4.5");
        wrong["role"] = json!("teacher");
        let fields: Vec<String> = Packet::parse(draft(&wrong), now())
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["user_id", "active_seconds", "focus_score", "role"]);
        let not_object = Packet::parse(draft(&json!([1])), now()).unwrap_err();
        assert_eq!(not_object[0].field, "");
    }
}
