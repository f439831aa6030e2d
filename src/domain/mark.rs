//! An outcome a consumer reports for a delivered packet (MarkProcessed, at
//! any door), and what makes one acceptable.
use super::packet::MAX_RAW_SIGNALS_BYTES;
use super::{FieldViolation, PacketId, json};
use serde_json::Value;
use serde_json::value::RawValue;

/// Longest accepted `error_message`, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
/// Largest accepted `karma_actions`, in bytes of compact JSON: stored
/// beside the packet, so no larger than its `raw_signals` may be.
pub const MAX_KARMA_ACTIONS_BYTES: usize = MAX_RAW_SIGNALS_BYTES;

/// One outcome as a consumer reports it, before validation.
#[derive(Debug, Clone, Default)]
pub struct MarkRequest {
    pub packet_id: String,
    pub success: bool,
    pub karma_actions: Vec<Value>,
    pub error_message: Option<String>,
}

/// An outcome that satisfies every rule.
#[derive(Debug, Clone)]
pub struct ValidMark {
    pub packet_id: PacketId,
    pub success: bool,
    /// The list as compact JSON, as it is stored: encoded once, where its
    /// size is checked.
    pub karma_actions: Box<RawValue>,
    /// Absent when empty.
    pub error_message: Option<String>,
}

impl MarkRequest {
    /// Checks every field, naming every violated one.
    pub fn validate(self) -> Result<ValidMark, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let id = PacketId::parse(&self.packet_id)
            .map_err(|why| violations.push(FieldViolation::new("packet_id", why)))
            .ok();
        if self.karma_actions.iter().any(json::contains_nul) {
            violations.push(FieldViolation::new(
                "karma_actions",
                "karma_actions must not contain U+0000 (NUL)",
            ));
        }
        let actions =
            serde_json::value::to_raw_value(&self.karma_actions).expect("JSON values encode");
        let actions_len = actions.get().len();
        if actions_len > MAX_KARMA_ACTIONS_BYTES {
            violations.push(FieldViolation::new(
                "karma_actions",
                format!(
                    "karma_actions is {actions_len} bytes encoded, over {MAX_KARMA_ACTIONS_BYTES}"
                ),
            ));
        }
        let error_message = self.error_message.filter(|m| !m.is_empty());
        if error_message.as_ref().is_some_and(|m| m.contains('\0')) {
            violations.push(FieldViolation::new(
                "error_message",
                "error_message must not contain U+0000 (NUL)",
            ));
        }
        if error_message
            .as_ref()
            .is_some_and(|m| m.len() > MAX_ERROR_MESSAGE_BYTES)
        {
            violations.push(FieldViolation::new(
                "error_message",
                format!("error_message is over {MAX_ERROR_MESSAGE_BYTES} bytes"),
            ));
        }
        match id {
            Some(packet_id) if violations.is_empty() => Ok(ValidMark {
                packet_id,
                success: self.success,
                karma_actions: actions,
                error_message,
            }),
            _ => Err(violations),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_violation_is_named_and_an_empty_error_is_absent() {
        let id = PacketId::new();
        let ok = MarkRequest {
            packet_id: id.to_string(),
            success: false,
            error_message: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(ok.validate().unwrap().error_message, None);
        let bad = MarkRequest {
            packet_id: "nope".into(),
            success: true,
            karma_actions: vec![
                json!({"a": "\0"}),
                json!("x".repeat(MAX_KARMA_ACTIONS_BYTES)),
            ],
            error_message: Some("e".repeat(MAX_ERROR_MESSAGE_BYTES + 1)),
        };
        let fields: Vec<String> = bad
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "packet_id",
                "karma_actions",
                "karma_actions",
                "error_message"
            ]
        );
    }
}
