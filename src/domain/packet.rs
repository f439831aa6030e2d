//! A PRANA packet, and the one place where one is parsed and validated.
//!
//! Every front door (gRPC, gRPC-web, the JSON gateway) fills a
//! [`PacketDraft`] with what the caller sent and calls [`Packet::parse`], so
//! they all accept and reject exactly the same packets.
use std::sync::LazyLock;

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::PacketId;
use super::json;
use super::labels::{Label, LegacyState, SenderRole, SystemType, UnknownLabel};

/// Longest accepted identifier or state string, in bytes.
pub const MAX_STRING_BYTES: usize = 256;
/// Largest accepted `raw_signals`, in bytes of compact JSON.
pub const MAX_RAW_SIGNALS_BYTES: usize = 16 * 1024;
/// Deepest accepted `raw_signals` nesting (the object itself is level 1).
pub const MAX_RAW_SIGNALS_DEPTH: usize = 8;
/// One packet covers five seconds; the three seconds fields must add up to it.
pub const WINDOW_SECONDS: f64 = 5.0;
pub const WINDOW_TOLERANCE: f64 = 0.1;
/// How far ahead of the server's clock a client timestamp may be.
pub const MAX_CLOCK_SKEW: Duration = Duration::hours(24);
/// The earliest client timestamp: the first instant a
/// google.protobuf.Timestamp may hold, so that every stored packet can be
/// sent back over gRPC (protobuf's JSON mapping, grpcurl and Connect refuse
/// year 0000; found by fuzz/, proto_packet). Earlier ones (a proto
/// Timestamp, or ISO-8601 with a signed year) cannot be written as RFC 3339
/// either, and PostgreSQL refuses those before 4713 BC.
pub const MIN_TIMESTAMP: &str = "0001-01-01T00:00:00Z";

/// One violated field, named by its JSON/proto field name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// A client timestamp as it arrived: already structured (proto) or text (JSON).
#[derive(Debug, Clone)]
pub enum TimestampInput {
    At(DateTime<Utc>),
    Text(String),
    /// A proto Timestamp out of range; carries why.
    Invalid(String),
}

/// What a caller sent, before validation. `None` means "not sent".
#[derive(Debug, Clone, Default)]
pub struct PacketDraft {
    pub packet_id: Option<String>,
    pub user_id: Option<String>,
    pub employee_id: Option<String>,
    pub session_id: Option<String>,
    pub lesson_id: Option<String>,
    pub system_type: Option<String>,
    pub role: Option<String>,
    pub timestamp: Option<TimestampInput>,
    pub cognitive_state: Option<String>,
    pub state: Option<String>,
    pub active_seconds: Option<f64>,
    pub idle_seconds: Option<f64>,
    pub away_seconds: Option<f64>,
    pub focus_score: Option<f64>,
    pub integrity_score: Option<f64>,
    pub raw_signals: Option<Value>,
    /// Fields that arrived with the wrong JSON type (or a body that is not
    /// an object), reported by `Packet::parse` with the other violations.
    pub wrong_types: Vec<FieldViolation>,
}

/// A packet that satisfies every rule; the only kind the store accepts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Packet {
    pub packet_id: PacketId,
    /// `user_id`, else `employee_id`, else `"unknown"`.
    pub user_id: String,
    pub employee_id: Option<String>,
    pub session_id: Option<String>,
    pub lesson_id: Option<String>,
    pub system_type: Option<SystemType>,
    pub role: Option<SenderRole>,
    pub client_timestamp: DateTime<Utc>,
    /// `cognitive_state`, else the legacy `state`.
    pub cognitive_state: String,
    pub state: Option<LegacyState>,
    pub active_seconds: f64,
    pub idle_seconds: f64,
    pub away_seconds: f64,
    pub focus_score: Option<f64>,
    /// As sent, else `focus_score / 100`, else 0.5.
    pub integrity_score: f64,
    pub raw_signals: Map<String, Value>,
}

impl Packet {
    /// A valid packet of `user`, for tests.
    #[cfg(test)]
    pub fn sample(user: &str) -> std::sync::Arc<Packet> {
        let draft = PacketDraft {
            user_id: Some(user.into()),
            timestamp: Some(TimestampInput::At(Utc::now())),
            cognitive_state: Some("ON_TASK".into()),
            active_seconds: Some(5.0),
            idle_seconds: Some(0.0),
            away_seconds: Some(0.0),
            raw_signals: Some(serde_json::json!({})),
            ..Default::default()
        };
        std::sync::Arc::new(Packet::parse(draft, Utc::now()).expect("a valid packet"))
    }

    /// Validates a draft against every rule, naming every violated field.
    /// `now` is the server's clock, for the future-timestamp limit.
    pub fn parse(draft: PacketDraft, now: DateTime<Utc>) -> Result<Packet, Vec<FieldViolation>> {
        let mut v = Violations(draft.wrong_types);
        if v.has("") {
            return Err(v.0);
        }

        let packet_id = match draft.packet_id.as_deref() {
            None => PacketId::new(),
            Some(raw) => match PacketId::parse(raw) {
                Ok(id) => id,
                Err(why) => {
                    v.add("packet_id", why);
                    PacketId::from(Uuid::nil())
                }
            },
        };

        let user_id = v.bounded("user_id", draft.user_id);
        let employee_id = v.bounded("employee_id", draft.employee_id);
        let session_id = v.bounded("session_id", draft.session_id);
        let lesson_id = v.bounded("lesson_id", draft.lesson_id);
        let system_type = v.label::<SystemType>(draft.system_type);
        let role = v.label::<SenderRole>(draft.role);
        let cognitive_state = v.bounded("cognitive_state", draft.cognitive_state);
        let state = v.label::<LegacyState>(draft.state);
        let stated = cognitive_state.or_else(|| state.map(|s| s.as_str().to_owned()));
        if stated.is_none() && !v.has("state") && !v.has("cognitive_state") {
            v.add("cognitive_state", "cognitive_state or state is required");
        }

        let client_timestamp = match draft.timestamp {
            None => {
                v.require("timestamp");
                None
            }
            Some(input) => match parse_timestamp(input) {
                Ok(at) if at > now + MAX_CLOCK_SKEW => {
                    v.add("timestamp", "timestamp is more than 24 hours in the future");
                    None
                }
                Ok(at) if at < min_timestamp() => {
                    v.add("timestamp", format!("timestamp is before {MIN_TIMESTAMP}"));
                    None
                }
                // RFC 3339 allows second 60; chrono keeps it as a nanosecond
                // count over 1e9, which no protobuf Timestamp holds: the
                // packet could not be sent back over gRPC (found by fuzz/,
                // json_packet). The gRPC door cannot send one at all.
                Ok(at) if at.timestamp_subsec_nanos() >= 1_000_000_000 => {
                    v.add(
                        "timestamp",
                        "timestamp is a leap second (:60), which a protobuf Timestamp cannot hold",
                    );
                    None
                }
                Ok(at) => Some(at),
                Err(why) => {
                    v.add("timestamp", why);
                    None
                }
            },
        };

        let active = v.seconds("active_seconds", draft.active_seconds);
        let idle = v.seconds("idle_seconds", draft.idle_seconds);
        let away = v.seconds("away_seconds", draft.away_seconds);
        if let (Some(a), Some(i), Some(w)) = (active, idle, away) {
            let sum = a + i + w;
            if (sum - WINDOW_SECONDS).abs() > WINDOW_TOLERANCE + 1e-9 {
                v.add(
                    "active_seconds",
                    format!(
                        "active_seconds + idle_seconds + away_seconds must be 5.0 ± 0.1, got {sum}"
                    ),
                );
            }
        }

        let focus_score = v.in_range("focus_score", draft.focus_score, 0.0, 100.0);
        let integrity_score = v.in_range("integrity_score", draft.integrity_score, 0.0, 1.0);

        let raw_signals = match draft.raw_signals {
            None | Some(Value::Null) => {
                v.add("raw_signals", "raw_signals is required");
                None
            }
            Some(Value::Object(map)) => {
                if json::object_depth(&map) > MAX_RAW_SIGNALS_DEPTH {
                    v.add(
                        "raw_signals",
                        format!("raw_signals is nested deeper than {MAX_RAW_SIGNALS_DEPTH} levels"),
                    );
                }
                if json::object_contains_nul(&map) {
                    v.add("raw_signals", "raw_signals must not contain U+0000 (NUL)");
                }
                let len = json::encoded_len(&map);
                if len > MAX_RAW_SIGNALS_BYTES {
                    v.add(
                        "raw_signals",
                        format!("raw_signals is {len} bytes encoded, over the limit of {MAX_RAW_SIGNALS_BYTES}"),
                    );
                }
                Some(map)
            }
            Some(_) => {
                v.add("raw_signals", "raw_signals must be a JSON object");
                None
            }
        };

        // Every None here was reported as a violation above.
        let (
            Some(client_timestamp),
            Some(cognitive_state),
            Some(active),
            Some(idle),
            Some(away),
            Some(raw_signals),
        ) = (client_timestamp, stated, active, idle, away, raw_signals)
        else {
            return Err(v.0);
        };
        if !v.0.is_empty() {
            return Err(v.0);
        }

        let integrity_score = integrity_score
            .or(focus_score.map(|f| f / 100.0))
            .unwrap_or(0.5);
        Ok(Packet {
            packet_id,
            user_id: user_id
                .clone()
                .or_else(|| employee_id.clone())
                .unwrap_or_else(|| "unknown".to_owned()),
            employee_id,
            session_id,
            lesson_id,
            system_type,
            role,
            client_timestamp,
            cognitive_state,
            state,
            active_seconds: active,
            idle_seconds: idle,
            away_seconds: away,
            focus_score,
            integrity_score,
            raw_signals,
        })
    }
}

/// [`MIN_TIMESTAMP`], parsed once: every packet is checked against it, and
/// chrono's `FromStr` runs its general format parser.
fn min_timestamp() -> DateTime<Utc> {
    static MIN: LazyLock<DateTime<Utc>> =
        LazyLock::new(|| MIN_TIMESTAMP.parse().expect("a valid RFC 3339 constant"));
    *MIN
}

/// Characters of a rejected value that a description quotes: enough to
/// recognise it. Quoting all of it echoed a body-sized value back, and over
/// gRPC the descriptions travel in the status trailers (`grpc-message`,
/// `grpc-status-details-bin`), whose size hyper-based clients such as tonic
/// cap at 16 KiB by default. Found by fuzz/ (json_packet).
const MAX_QUOTED_CHARS: usize = 64;

/// `value` quoted for a description, cut after [`MAX_QUOTED_CHARS`].
pub(super) fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

fn parse_timestamp(input: TimestampInput) -> Result<DateTime<Utc>, String> {
    match input {
        TimestampInput::At(at) => Ok(at),
        TimestampInput::Invalid(why) => Err(why),
        TimestampInput::Text(text) => {
            if let Ok(at) = DateTime::parse_from_rfc3339(&text) {
                return Ok(at.with_timezone(&Utc));
            }
            // The original accepted ISO-8601 without an offset, read as UTC.
            NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f")
                .map(|naive| naive.and_utc())
                .map_err(|_| {
                    format!(
                        "timestamp {} is not an ISO-8601 / RFC 3339 date-time",
                        quoted(&text)
                    )
                })
        }
    }
}

struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: &str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    fn has(&self, field: &str) -> bool {
        self.0.iter().any(|f| f.field == field)
    }

    /// "is required", unless the field was sent with the wrong type.
    fn require(&mut self, field: &str) {
        if !self.has(field) {
            self.add(field, format!("{field} is required"));
        }
    }

    /// An optional string: empty counts as absent; at most 256 bytes, no
    /// U+0000 (PostgreSQL cannot store it).
    fn bounded(&mut self, field: &str, value: Option<String>) -> Option<String> {
        let value = value.filter(|s| !s.is_empty())?;
        if value.contains('\0') {
            self.add(field, format!("{field} must not contain U+0000 (NUL)"));
            return None;
        }
        if value.len() > MAX_STRING_BYTES {
            self.add(
                field,
                format!(
                    "{field} is {} bytes, over the limit of {MAX_STRING_BYTES}",
                    value.len()
                ),
            );
            return None;
        }
        Some(value)
    }

    /// An optional label: empty counts as absent.
    fn label<T: Label>(&mut self, value: Option<String>) -> Option<T> {
        let value = value.filter(|s| !s.is_empty())?;
        value
            .parse()
            .map_err(|why: UnknownLabel| self.add(T::FIELD, why.to_string()))
            .ok()
    }

    fn seconds(&mut self, field: &str, value: Option<f64>) -> Option<f64> {
        match value {
            None => {
                self.require(field);
                None
            }
            Some(x) if !x.is_finite() || x < 0.0 => {
                self.add(field, format!("{field} must be a number >= 0, got {x}"));
                None
            }
            Some(x) => Some(x),
        }
    }

    fn in_range(&mut self, field: &str, value: Option<f64>, lo: f64, hi: f64) -> Option<f64> {
        let x = value?;
        if !x.is_finite() || x < lo || x > hi {
            self.add(
                field,
                format!("{field} must be between {lo} and {hi}, got {x}"),
            );
            return None;
        }
        Some(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2024-01-20T10:30:05Z".parse().unwrap()
    }

    /// The seed's example packet.
    fn seed() -> PacketDraft {
        PacketDraft {
            user_id: Some("user_123".into()),
            session_id: Some("session_456".into()),
            lesson_id: Some("lesson_789".into()),
            system_type: Some("gurukul".into()),
            role: Some("student".into()),
            timestamp: Some(TimestampInput::Text("2024-01-20T10:30:00Z".into())),
            cognitive_state: Some("ON_TASK".into()),
            active_seconds: Some(4.5),
            idle_seconds: Some(0.3),
            away_seconds: Some(0.2),
            focus_score: Some(85.0),
            raw_signals: Some(json!({"dwell_time_ms": 1200, "mouse_velocity": 0.5})),
            ..Default::default()
        }
    }

    fn fields(draft: PacketDraft) -> Vec<String> {
        Packet::parse(draft, now())
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn seed_packet_is_valid_and_derives_integrity() {
        let p = Packet::parse(seed(), now()).unwrap();
        assert_eq!(p.user_id, "user_123");
        assert_eq!(p.cognitive_state, "ON_TASK");
        assert_eq!(p.integrity_score, 0.85);
        assert_eq!(
            p.client_timestamp,
            "2024-01-20T10:30:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }

    #[test]
    fn user_falls_back_to_employee_then_unknown() {
        let mut d = seed();
        d.user_id = None;
        d.employee_id = Some("emp_1".into());
        assert_eq!(Packet::parse(d.clone(), now()).unwrap().user_id, "emp_1");
        d.employee_id = None;
        assert_eq!(Packet::parse(d, now()).unwrap().user_id, "unknown");
    }

    #[test]
    fn legacy_state_is_stored_as_state() {
        let mut d = seed();
        d.cognitive_state = None;
        d.state = Some("WORKING".into());
        let p = Packet::parse(d, now()).unwrap();
        assert_eq!(p.cognitive_state, "WORKING");
        assert_eq!(p.state, Some(LegacyState::Working));
    }

    #[test]
    fn integrity_defaults_to_half_without_focus() {
        let mut d = seed();
        d.focus_score = None;
        assert_eq!(Packet::parse(d, now()).unwrap().integrity_score, 0.5);
    }

    #[test]
    fn every_violation_is_named() {
        let d = PacketDraft {
            packet_id: Some("nope".into()),
            system_type: Some("school".into()),
            role: Some("teacher".into()),
            state: Some("SLEEPING".into()),
            active_seconds: Some(-1.0),
            idle_seconds: None,
            away_seconds: Some(f64::NAN),
            focus_score: Some(101.0),
            integrity_score: Some(1.5),
            raw_signals: Some(json!([1, 2])),
            user_id: Some("u".repeat(257)),
            ..Default::default()
        };
        let got = fields(d);
        for f in [
            "packet_id",
            "system_type",
            "role",
            "state",
            "timestamp",
            "active_seconds",
            "idle_seconds",
            "away_seconds",
            "focus_score",
            "integrity_score",
            "raw_signals",
            "user_id",
        ] {
            assert!(got.contains(&f.to_owned()), "{f} not in {got:?}");
        }
    }

    #[test]
    fn missing_state_names_cognitive_state() {
        let mut d = seed();
        d.cognitive_state = None;
        assert_eq!(fields(d), ["cognitive_state"]);
    }

    #[test]
    fn seconds_must_sum_to_five() {
        let mut d = seed();
        d.active_seconds = Some(4.0);
        assert_eq!(fields(d.clone()), ["active_seconds"]);
        d.active_seconds = Some(4.6); // 5.1: on the edge, accepted
        assert!(Packet::parse(d, now()).is_ok());
    }

    #[test]
    fn timestamp_rules() {
        let mut d = seed();
        d.timestamp = Some(TimestampInput::Text("yesterday".into()));
        assert_eq!(fields(d.clone()), ["timestamp"]);
        d.timestamp = Some(TimestampInput::Text("2024-01-21T10:31:00Z".into()));
        assert_eq!(fields(d.clone()), ["timestamp"]);
        d.timestamp = Some(TimestampInput::Text("2024-01-20T10:30:00".into()));
        assert!(Packet::parse(d, now()).is_ok());
    }

    #[test]
    fn nul_and_pre_rfc3339_timestamps_are_refused() {
        let mut d = seed();
        d.user_id = Some("a\0b".into());
        assert_eq!(fields(d), ["user_id"]);
        let mut d = seed();
        d.raw_signals = Some(json!({"k\0": "v"}));
        assert_eq!(fields(d), ["raw_signals"]);
        let mut d = seed();
        d.timestamp = Some(TimestampInput::Text("-0001-01-01T00:00:00".into()));
        assert_eq!(fields(d.clone()), ["timestamp"]);
        d.timestamp = Some(TimestampInput::Text(MIN_TIMESTAMP.into()));
        assert!(Packet::parse(d, now()).is_ok());
    }

    #[test]
    fn timestamps_fit_a_protobuf_timestamp() {
        let mut d = seed();
        for text in [
            "0000-12-31T23:59:59Z",
            "2024-01-20T10:29:60Z",
            "2016-12-31T23:59:60.5",
        ] {
            d.timestamp = Some(TimestampInput::Text(text.into()));
            assert_eq!(fields(d.clone()), ["timestamp"], "{text}");
        }
        d.timestamp = Some(TimestampInput::At(
            DateTime::from_timestamp(-62_135_596_801, 0).unwrap(),
        ));
        assert_eq!(fields(d.clone()), ["timestamp"]);
        d.timestamp = Some(TimestampInput::Text("0001-01-01T00:00:00Z".into()));
        assert!(Packet::parse(d, now()).is_ok());
    }

    #[test]
    fn raw_signals_limits() {
        let mut d = seed();
        d.raw_signals = Some(json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}));
        assert!(Packet::parse(d.clone(), now()).is_ok());
        d.raw_signals = Some(json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}}));
        assert_eq!(fields(d.clone()), ["raw_signals"]);
        d.raw_signals = Some(json!({"blob": "x".repeat(MAX_RAW_SIGNALS_BYTES)}));
        assert_eq!(fields(d.clone()), ["raw_signals"]);
        d.raw_signals = None;
        assert_eq!(fields(d), ["raw_signals"]);
    }

    #[test]
    fn client_packet_id_is_kept() {
        let mut d = seed();
        let id = PacketId::from(Uuid::new_v4());
        d.packet_id = Some(id.to_string());
        assert_eq!(Packet::parse(d, now()).unwrap().packet_id, id);
    }

    #[test]
    fn descriptions_quote_a_bounded_prefix() {
        assert_eq!(
            PacketId::parse("nope").unwrap_err(),
            r#""nope" is not a UUID"#
        );
        let mut d = seed();
        d.packet_id = Some("x".repeat(100_000));
        d.state = Some("\u{1}".repeat(100_000));
        d.timestamp = Some(TimestampInput::Text("é".repeat(100_000)));
        let violations = Packet::parse(d, now()).unwrap_err();
        assert_eq!(violations.len(), 3, "{violations:?}");
        for v in violations {
            assert!(v.description.len() < 1024, "{v:?}");
            assert!(v.description.contains(" bytes)"), "{v:?}");
        }
    }
}
