//! What a StreamPending subscriber may ask for; its name is logged, so it
//! holds no control character.
use super::FieldViolation;
use super::lease::lease_seconds;
use super::packet::MAX_STRING_BYTES;

/// Most packets a subscriber may hold leased at once (also the largest
/// default an operator may set).
pub const MAX_IN_FLIGHT: u32 = 10_000;

/// A subscription's options, checked. `None`: not said, the server's
/// default applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub consumer: String,
    pub max_in_flight: Option<u32>,
    pub lease_seconds: Option<u32>,
}

impl Subscribe {
    /// Zero (and an empty consumer) means "not said", as proto3 sends it.
    pub fn check(
        consumer: &str,
        max_in_flight: u32,
        lease: u32,
    ) -> Result<Subscribe, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if consumer.len() > MAX_STRING_BYTES {
            violations.push(FieldViolation::new(
                "consumer",
                format!("consumer is over {MAX_STRING_BYTES} bytes"),
            ));
        }
        // The name is logged: a `\n` in it would forge log lines.
        if consumer.chars().any(char::is_control) {
            violations.push(FieldViolation::new(
                "consumer",
                "consumer must not contain control characters (newlines, tabs, escapes)",
            ));
        }
        if max_in_flight > MAX_IN_FLIGHT {
            violations.push(FieldViolation::new(
                "max_in_flight",
                format!("max_in_flight must be at most {MAX_IN_FLIGHT}, got {max_in_flight}"),
            ));
        }
        let lease_seconds = lease_seconds("lease_seconds", lease)
            .map_err(|v| violations.push(v))
            .ok()
            .flatten();
        if !violations.is_empty() {
            return Err(violations);
        }
        Ok(Subscribe {
            consumer: match consumer {
                "" => "anonymous".to_owned(),
                named => named.to_owned(),
            },
            max_in_flight: (max_in_flight > 0).then_some(max_in_flight),
            lease_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_unsaid_and_every_excess_is_named() {
        assert_eq!(
            Subscribe::check("", 0, 0),
            Ok(Subscribe {
                consumer: "anonymous".into(),
                max_in_flight: None,
                lease_seconds: None,
            })
        );
        let fields: Vec<String> = Subscribe::check(&"c".repeat(257), 10_001, 3601)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["consumer", "max_in_flight", "lease_seconds"]);
        for forged in ["karma\nINFO forged", "k\r", "k\u{1b}[31m", "k\u{85}", "k\0"] {
            let refused = Subscribe::check(forged, 0, 0).unwrap_err();
            assert_eq!(refused[0].field, "consumer", "{forged:?}");
        }
        assert!(Subscribe::check("karma-tracker é", 0, 0).is_ok());
    }
}
