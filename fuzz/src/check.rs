//! What the fuzz targets assert, in one file shared by both targets and by
//! the regression test (`tests/api/fuzz_regressions.rs` includes it with
//! `#[path]`), so a saved crasher is replayed through exactly these checks.
//!
//! It uses only `bucket`'s public API and crates `bucket` itself depends on
//! (serde_json, chrono, prost, prost-types, uuid), so it compiles in both
//! places.
//!
//! Not only "no panic": an accepted packet must satisfy every rule of the
//! README's "The packet", carry what was sent, and be storable and
//! deliverable by every door; a rejection must name real fields.
use bucket::domain::mark::{MAX_ERROR_MESSAGE_BYTES, MAX_KARMA_ACTIONS_BYTES, MarkRequest};
use bucket::domain::packet::{
    MAX_CLOCK_SKEW, MAX_RAW_SIGNALS_BYTES, MAX_RAW_SIGNALS_DEPTH, MAX_STRING_BYTES, WINDOW_SECONDS,
    WINDOW_TOLERANCE,
};
use bucket::domain::{FieldViolation, Packet, PacketId, json};
use bucket::proto::bucket::v1 as pb;
use bucket::proto::{JsonStruct, from_timestamp, timestamp};
use chrono::{DateTime, Utc};
use prost::Message;
use prost_types::value::Kind;
use serde_json::{Map, Value};

/// Every field a violation may name, but for the item itself.
const FIELDS: [&str; 16] = [
    "packet_id",
    "user_id",
    "employee_id",
    "session_id",
    "lesson_id",
    "system_type",
    "role",
    "timestamp",
    "cognitive_state",
    "state",
    "active_seconds",
    "idle_seconds",
    "away_seconds",
    "focus_score",
    "integrity_score",
    "raw_signals",
];

/// A description long enough for any number `{}` prints (an f64 can take
/// ~330 characters) but not for an echo of an unbounded input: a gRPC
/// rejection carries the descriptions in its headers.
const MAX_DESCRIPTION_BYTES: usize = 1024;

/// The protobuf well-known Timestamp's range, which every packet sent back
/// over gRPC must fit: 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999999Z.
const MIN_PROTO_SECONDS: i64 = -62_135_596_800;
const MAX_PROTO_SECONDS: i64 = 253_402_300_799;

/// The fields as the caller sent them, read independently of the code
/// under test, to compare with what an accepted packet carries.
#[derive(Debug, Default)]
struct Sent {
    packet_id: Option<String>,
    user_id: Option<String>,
    employee_id: Option<String>,
    session_id: Option<String>,
    lesson_id: Option<String>,
    system_type: Option<String>,
    role: Option<String>,
    cognitive_state: Option<String>,
    state: Option<String>,
    active_seconds: Option<f64>,
    idle_seconds: Option<f64>,
    away_seconds: Option<f64>,
    focus_score: Option<f64>,
    integrity_score: Option<f64>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl Sent {
    fn from_json(body: &Value) -> Sent {
        let text = |f: &str| body.get(f).and_then(Value::as_str).and_then(non_empty);
        let number = |f: &str| body.get(f).and_then(Value::as_f64);
        Sent {
            packet_id: text("packet_id"),
            user_id: text("user_id"),
            employee_id: text("employee_id"),
            session_id: text("session_id"),
            lesson_id: text("lesson_id"),
            system_type: text("system_type"),
            role: text("role"),
            cognitive_state: text("cognitive_state"),
            state: text("state"),
            active_seconds: number("active_seconds"),
            idle_seconds: number("idle_seconds"),
            away_seconds: number("away_seconds"),
            focus_score: number("focus_score"),
            integrity_score: number("integrity_score"),
        }
    }

    fn from_proto(p: &pb::PacketInput) -> Sent {
        let system_type = match p.system_type {
            0 => None,
            1 => Some("gurukul".to_owned()),
            2 => Some("ems".to_owned()),
            other => Some(other.to_string()),
        };
        let role = match p.role {
            0 => None,
            1 => Some("student".to_owned()),
            2 => Some("employee".to_owned()),
            other => Some(other.to_string()),
        };
        Sent {
            packet_id: non_empty(&p.packet_id),
            user_id: non_empty(&p.user_id),
            employee_id: non_empty(&p.employee_id),
            session_id: non_empty(&p.session_id),
            lesson_id: non_empty(&p.lesson_id),
            system_type,
            role,
            cognitive_state: non_empty(&p.cognitive_state),
            state: non_empty(&p.state),
            active_seconds: Some(p.active_seconds),
            idle_seconds: Some(p.idle_seconds),
            away_seconds: Some(p.away_seconds),
            focus_score: p.focus_score,
            integrity_score: p.integrity_score,
        }
    }
}

/// json_packet: bytes → JSON → `bucket::http::draft` → `Packet::parse`,
/// for the value and, when it is an array (the gateway's batch), for each
/// item; plus the public pieces of the mark-processed body.
pub fn json_packet(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        packet_id_text(text);
    }
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let now = Utc::now();
    json_item(&value, now);
    mark_body(&value);
    if let Value::Array(items) = &value {
        for item in items {
            json_item(item, now);
            mark_body(item);
        }
    }
}

fn json_item(value: &Value, now: DateTime<Utc>) {
    let draft = bucket::http::draft(value);
    let sent = Sent::from_json(value);
    let raw_signals = value.get("raw_signals").cloned();
    match Packet::parse(draft, now) {
        Ok(packet) => {
            assert!(value.is_object(), "accepted a body that is not an object");
            accepted(&packet, &sent, now);
            assert_eq!(
                raw_signals.as_ref(),
                Some(&Value::Object(packet.raw_signals.clone())),
                "raw_signals changed"
            );
        }
        Err(violations) => rejected(&violations, value.is_object()),
    }
}

/// The mark-processed body: the gateway's reading of it is private, so the
/// fields of the right JSON types are given to `MarkRequest::validate`
/// (src/domain/mark.rs) here, beside checks of the public pieces it is
/// built from: `PacketId::parse` for `packet_id`, and `json::encoded_len` for
/// the `karma_actions` size limit.
fn mark_body(value: &Value) {
    assert_eq!(
        json::encoded_len(value),
        serde_json::to_vec(value).expect("a Value encodes").len(),
        "encoded_len is not the compact encoding's length"
    );
    let Value::Object(body) = value else {
        return;
    };
    if let Some(Value::String(id)) = body.get("packet_id") {
        packet_id_text(id);
    }
    if let Some(Value::Array(actions)) = body.get("karma_actions") {
        assert_eq!(
            json::encoded_len(actions),
            serde_json::to_vec(actions).expect("a Value encodes").len(),
            "encoded_len of karma_actions is not the compact encoding's length"
        );
    }
    let request = MarkRequest {
        packet_id: body
            .get("packet_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        success: body.get("success").and_then(Value::as_bool).unwrap_or(true),
        karma_actions: body
            .get("karma_actions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        error_message: body
            .get("error_message")
            .and_then(Value::as_str)
            .map(str::to_owned),
    };
    let sent = request.clone();
    match request.validate() {
        Ok(mark) => {
            assert_eq!(Ok(mark.packet_id), PacketId::parse(&sent.packet_id));
            assert_eq!(mark.success, sent.success);
            // Stored as compact JSON: within the limit, and the list sent.
            assert!(mark.karma_actions.get().len() <= MAX_KARMA_ACTIONS_BYTES);
            let stored: Vec<Value> = serde_json::from_str(mark.karma_actions.get())
                .expect("karma_actions are stored as JSON");
            assert_eq!(mark.karma_actions.get().len(), json::encoded_len(&stored));
            assert!(!stored.iter().any(json::contains_nul));
            assert_eq!(stored, sent.karma_actions);
            if let Some(m) = &mark.error_message {
                assert!(!m.is_empty() && m.len() <= MAX_ERROR_MESSAGE_BYTES && !m.contains('\0'));
            }
            assert_eq!(
                mark.error_message,
                sent.error_message.filter(|m| !m.is_empty())
            );
        }
        Err(violations) => {
            assert!(!violations.is_empty(), "mark rejected without a violation");
            for v in violations {
                assert!(
                    ["packet_id", "karma_actions", "error_message"].contains(&v.field.as_str()),
                    "mark violation names {:?}",
                    v.field
                );
                description(&v.field, &v.description);
            }
        }
    }
}

/// `PacketId::parse` accepts a UUID that reads back the same from its hyphenated
/// form (how it is stored), or says why not, briefly.
fn packet_id_text(raw: &str) {
    match PacketId::parse(raw) {
        Ok(id) => assert_eq!(
            PacketId::parse(&id.to_string()),
            Ok(id),
            "UUID text round trip"
        ),
        Err(why) => description("packet_id", &why),
    }
}

/// proto_packet: bytes → protobuf `IngestRequest` and `IngestBatchRequest`
/// (the same bytes decode as both: field 1 is one PacketInput or many) →
/// the gRPC door's proto→domain conversion → `Packet::parse`.
pub fn proto_packet(data: &[u8]) {
    let now = Utc::now();
    if let Ok(request) = pb::IngestRequest::decode(data)
        && let Some(packet) = request.packet
    {
        proto_item(packet, now);
    }
    if let Ok(batch) = pb::IngestBatchRequest::decode(data) {
        for packet in batch.packets {
            proto_item(packet, now);
        }
    }
}

fn proto_item(input: pb::PacketInput, now: DateTime<Utc>) {
    let sent = Sent::from_proto(&input);
    let raw_signals = input.raw_signals.clone();
    let sent_timestamp = input.timestamp;
    match Packet::parse(bucket::grpc::draft(input), now) {
        Ok(packet) => {
            accepted(&packet, &sent, now);
            // What was sent, as prost's own Struct reads it.
            let sent_signals = prost_types::Struct::decode(
                raw_signals
                    .expect("raw_signals is required")
                    .encode_to_vec()
                    .as_slice(),
            )
            .expect("a Struct written is read back");
            same_struct(&sent_signals, &packet.raw_signals);
            let ts = sent_timestamp.expect("timestamp is required");
            assert_eq!(
                from_timestamp(&ts),
                Ok(packet.client_timestamp),
                "timestamp changed"
            );
        }
        Err(violations) => rejected(&violations, true),
    }
}

/// An accepted packet: every documented rule, what was sent, and that every
/// door and store can carry it.
fn accepted(p: &Packet, sent: &Sent, now: DateTime<Utc>) {
    // The three seconds: each a number >= 0, summing to 5.0 ± 0.1.
    for (name, x) in [
        ("active_seconds", p.active_seconds),
        ("idle_seconds", p.idle_seconds),
        ("away_seconds", p.away_seconds),
    ] {
        assert!(x.is_finite() && x >= 0.0, "{name} = {x}");
    }
    let sum = p.active_seconds + p.idle_seconds + p.away_seconds;
    assert!(
        (sum - WINDOW_SECONDS).abs() <= WINDOW_TOLERANCE + 1e-9,
        "seconds sum to {sum}"
    );
    assert_eq!(Some(p.active_seconds), sent.active_seconds);
    assert_eq!(Some(p.idle_seconds), sent.idle_seconds);
    assert_eq!(Some(p.away_seconds), sent.away_seconds);

    // Scores: focus 0..=100 as sent; integrity 0..=1, as sent, else
    // focus / 100, else 0.5.
    if let Some(f) = p.focus_score {
        assert!((0.0..=100.0).contains(&f), "focus_score = {f}");
    }
    assert_eq!(p.focus_score, sent.focus_score);
    assert!(
        (0.0..=1.0).contains(&p.integrity_score),
        "integrity_score = {}",
        p.integrity_score
    );
    let integrity = sent
        .integrity_score
        .or(sent.focus_score.map(|f| f / 100.0))
        .unwrap_or(0.5);
    assert_eq!(p.integrity_score, integrity);

    // Strings: present ones non-empty, at most 256 bytes, storable.
    for (name, s) in [
        ("user_id", Some(&p.user_id)),
        ("employee_id", p.employee_id.as_ref()),
        ("session_id", p.session_id.as_ref()),
        ("lesson_id", p.lesson_id.as_ref()),
        ("cognitive_state", Some(&p.cognitive_state)),
    ] {
        let Some(s) = s else { continue };
        assert!(!s.is_empty(), "{name} is empty");
        assert!(s.len() <= MAX_STRING_BYTES, "{name} is {} bytes", s.len());
        // PostgreSQL's TEXT cannot hold U+0000 (and SQLite's C API is
        // not meant to): the insert would fail, a 500 instead of a 422.
        assert!(!s.contains('\0'), "{name} holds a NUL: {s:?}");
    }
    let user = sent
        .user_id
        .as_ref()
        .or(sent.employee_id.as_ref())
        .map_or("unknown", String::as_str);
    assert_eq!(p.user_id, user);
    assert_eq!(p.employee_id, sent.employee_id);
    assert_eq!(p.session_id, sent.session_id);
    assert_eq!(p.lesson_id, sent.lesson_id);
    // The labels' types hold only their sets' values; the text is what was sent.
    let text = |label: Option<&'static str>| label.map(str::to_owned);
    assert_eq!(text(p.system_type.map(|s| s.as_str())), sent.system_type);
    assert_eq!(text(p.role.map(|r| r.as_str())), sent.role);
    assert_eq!(text(p.state.map(|s| s.as_str())), sent.state);
    assert_eq!(
        Some(&p.cognitive_state),
        sent.cognitive_state.as_ref().or(sent.state.as_ref())
    );
    if let Some(id) = &sent.packet_id {
        assert_eq!(Ok(p.packet_id), PacketId::parse(id), "packet_id changed");
    }

    // Timestamp: at most 24 h ahead, and one that the gRPC door can send
    // back: a valid google.protobuf.Timestamp that reads back the same.
    assert!(
        p.client_timestamp <= now + MAX_CLOCK_SKEW,
        "timestamp {} is too far ahead",
        p.client_timestamp
    );
    let ts = timestamp(p.client_timestamp);
    assert!(
        (MIN_PROTO_SECONDS..=MAX_PROTO_SECONDS).contains(&ts.seconds)
            && (0..1_000_000_000).contains(&ts.nanos),
        "timestamp {:?} ({}) is not a valid protobuf Timestamp",
        p.client_timestamp,
        p.client_timestamp
    );
    assert_eq!(
        from_timestamp(&ts),
        Ok(p.client_timestamp),
        "timestamp does not survive the gRPC door"
    );

    // raw_signals: an object, at most 8 levels deep and 16 KiB encoded,
    // storable in PostgreSQL's JSONB (no U+0000), and the same (numbers
    // compared as doubles) once through the protobuf Struct that the
    // gRPC door sends it back as.
    let signals = Value::Object(p.raw_signals.clone());
    let depth = depth(&signals);
    assert!(depth <= MAX_RAW_SIGNALS_DEPTH, "raw_signals {depth} deep");
    let len = serde_json::to_vec(&signals).expect("a Value encodes").len();
    assert!(len <= MAX_RAW_SIGNALS_BYTES, "raw_signals {len} bytes");
    assert!(!holds_nul(&signals), "raw_signals holds a NUL");
    let wire = JsonStruct(p.raw_signals.clone()).encode_to_vec();
    let back = Value::Object(
        JsonStruct::decode(wire.as_slice())
            .expect("a Struct written is read back")
            .0,
    );
    assert!(
        same_json(&signals, &back),
        "raw_signals changed through a protobuf Struct: {signals} -> {back}"
    );

    // The JSON encoding the Redis queue's entries and SQLite's raw_signals
    // column use: bit for bit (serde_json's float_roundtrip).
    let bytes = serde_json::to_vec(p).expect("a packet encodes");
    let again: Packet = serde_json::from_slice(&bytes).expect("a packet decodes");
    assert_eq!(&again, p, "the packet changed through its JSON encoding");
}

/// A rejection: at least one violation, each naming a real field with a
/// short description. An item that is not an object gets one violation of
/// the item itself, named `""` (the front door prefixes where the item is:
/// `body`, `body.2`, `packet`), or `body` as the gateway called it before.
fn rejected(violations: &[FieldViolation], is_object: bool) {
    assert!(!violations.is_empty(), "rejected without a violation");
    if !is_object {
        assert!(
            matches!(violations, [v] if v.field.is_empty() || v.field == "body"),
            "a body that is not an object: {violations:?}"
        );
        return description("body", &violations[0].description);
    }
    for v in violations {
        assert!(!v.field.is_empty(), "violation without a field: {v:?}");
        assert!(
            FIELDS.contains(&v.field.as_str()),
            "violation names no field of the packet: {v:?}"
        );
        description(&v.field, &v.description);
    }
}

fn description(field: &str, text: &str) {
    assert!(!text.is_empty(), "{field}: empty description");
    assert!(
        text.len() <= MAX_DESCRIPTION_BYTES,
        "{field}: description of {} bytes: {}…",
        text.len(),
        text.chars().take(120).collect::<String>()
    );
}

/// Nesting depth as the README counts it (`{}` is 1), without recursion.
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0)];
    while let Some((v, above)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Object(map) => Box::new(map.values()),
            Value::Array(items) => Box::new(items.iter()),
            _ => continue,
        };
        deepest = deepest.max(above + 1);
        stack.extend(children.map(|c| (c, above + 1)));
    }
    deepest
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// Equal JSON, numbers compared as doubles (a Struct holds only doubles).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// The Struct sent and the JSON accepted hold the same values: finite
/// numbers equal, others (NaN, ±inf: JSON has none) null.
fn same_struct(sent: &prost_types::Struct, got: &Map<String, Value>) {
    assert_eq!(sent.fields.len(), got.len(), "raw_signals lost keys");
    for (k, v) in &sent.fields {
        let g = got
            .get(k)
            .unwrap_or_else(|| panic!("raw_signals lost {k:?}"));
        same_value(v, g);
    }
}

fn same_value(sent: &prost_types::Value, got: &Value) {
    match (&sent.kind, got) {
        (None | Some(Kind::NullValue(_)), Value::Null) => {}
        (Some(Kind::BoolValue(a)), Value::Bool(b)) => assert_eq!(a, b),
        (Some(Kind::StringValue(a)), Value::String(b)) => assert_eq!(a, b),
        (Some(Kind::NumberValue(n)), Value::Number(m)) => {
            assert_eq!(Some(*n), m.as_f64(), "number {n:e} became {m}")
        }
        (Some(Kind::NumberValue(n)), Value::Null) => {
            assert!(!n.is_finite(), "number {n:e} became null")
        }
        (Some(Kind::StructValue(s)), Value::Object(m)) => same_struct(s, m),
        (Some(Kind::ListValue(l)), Value::Array(items)) => {
            assert_eq!(l.values.len(), items.len(), "list length changed");
            for (a, b) in l.values.iter().zip(items) {
                same_value(a, b);
            }
        }
        (kind, got) => panic!("{kind:?} became {got}"),
    }
}

/// Arbitrary bytes as a segment of the SQLite record log, and as one
/// block's payload. As a segment: the scan never panics, stops at the first
/// thing that is not a block, and every block it returns is exactly what
/// encoding its payload at its position writes. As a payload: written as a
/// block and scanned, it comes back whole and alone. Either way a payload
/// decoded as a commit group's record never panics, a packet read from
/// one reads back the same after the store writes it again, and the
/// writer's own encoding of what was read is prost's, byte for byte.
pub fn record_log(data: &[u8]) {
    use bucket::store::record_log::{block, scan};

    let (payloads, end, _) = scan(data, 0, 0);
    let mut pos = 0usize;
    for payload in &payloads {
        let size = block::size(payload.len());
        let mut out = vec![0xAA; size];
        block::encode(pos as u64, payload, &mut out);
        let written = block::HEADER + payload.len();
        assert_eq!(&out[..written], &data[pos..pos + written], "block at {pos}");
        pos += size;
        group_record(payload);
    }
    assert_eq!(end, pos as u64, "the scan ends after its last block");

    let at = 512 * u64::from(data.first().copied().unwrap_or(0));
    let mut out = vec![0; block::size(data.len())];
    block::encode(at, data, &mut out);
    let (read, end, why) = scan(&out, at, at);
    assert_eq!(read, [data], "a block reads back whole");
    assert_eq!(end, at + out.len() as u64);
    assert_eq!(why, block::NotABlock::Short, "and alone");
    group_record(data);
}

/// A block's payload as the record of one commit group.
fn group_record(payload: &[u8]) {
    use bucket::store::log_record::{
        ChangeView, GroupRecord, InsertRecord, InsertView, encode_group, from_micros, packet_id,
    };

    let Ok(group) = GroupRecord::decode(payload) else {
        return;
    };
    for insert in group.inserts {
        let seq = insert.seq;
        let Ok((packet, received_at)) = insert.into_packet() else {
            continue;
        };
        let once = InsertRecord::new(seq, &packet, received_at);
        let (again, again_at) = once
            .clone()
            .into_packet()
            .expect("a record the store wrote reads back");
        let twice = InsertRecord::new(seq, &again, again_at);
        assert_eq!(once.encode_to_vec(), twice.encode_to_vec(), "a fixed point");
        let view = InsertView {
            seq,
            packet: &packet,
            raw_signals: &once.raw_signals,
            received_at_us: once.received_at_us,
        };
        let prost = GroupRecord {
            inserts: vec![once.clone()],
            changes: Vec::new(),
        };
        assert_eq!(
            encode_group(&[view], &[]),
            prost.encode_to_vec(),
            "the writer encodes an insert as prost does"
        );
    }
    for change in group.changes {
        if let (Ok(status), Ok(id)) = (change.status(), packet_id(&change.packet_id)) {
            let view = ChangeView {
                seq: change.seq,
                packet_id: &id,
                status,
                delivery_attempts: change.delivery_attempts,
                processed_at_us: change.processed_at_us,
                processed_by_karma: change.processed_by_karma,
                karma_actions: &change.karma_actions,
                error_message: change.error_message.as_deref(),
            };
            let prost = GroupRecord {
                inserts: Vec::new(),
                changes: vec![change.clone()],
            };
            assert_eq!(
                encode_group(&[], &[view]),
                prost.encode_to_vec(),
                "the writer encodes a change as prost does"
            );
        }
        if let Some(us) = change.processed_at_us {
            let _ = from_micros(us);
        }
    }
}

/// How many items prost reads from a message (None: prost refuses it).
type ItemCount = fn(&[u8]) -> Option<usize>;

/// Arbitrary bytes as one message of a method with a list, walked by the
/// pre-decode scan (`bucket::edge::batch_limit`) in two chunks and whole:
/// the scan and prost must agree. A message prost decodes with at most
/// `max` items is never refused; one with more is always refused, before
/// prost would build them; the chunking never changes the verdict.
///
/// Layout: byte 0 picks the method, byte 1 the limit (0..=7), byte 2 where
/// the framed message is split; the rest is the message.
pub fn batch_limit(data: &[u8]) {
    use bucket::edge::batch_limit::{Listed, Scan};
    let [method, max, split, message @ ..] = data else {
        return;
    };
    let (path, items): (&str, ItemCount) = match method % 4 {
        0 => ("IngestBatch", |m| {
            pb::IngestBatchRequest::decode(m)
                .ok()
                .map(|r| r.packets.len())
        }),
        1 => ("MarkProcessedBatch", |m| {
            pb::MarkProcessedBatchRequest::decode(m)
                .ok()
                .map(|r| r.marks.len())
        }),
        2 => ("ExtendLease", |m| {
            pb::ExtendLeaseRequest::decode(m)
                .ok()
                .map(|r| r.lease_tokens.len())
        }),
        _ => ("Redrive", |m| {
            pb::RedriveRequest::decode(m).ok().map(|r| r.statuses.len())
        }),
    };
    let listed =
        Listed::of_path(&format!("/bucket.v1.BucketService/{path}")).expect("a method with a list");
    let max = usize::from(max % 8);
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);

    let whole = Scan::new(listed, max).feed(&framed).is_ok();
    let at = usize::from(*split).min(framed.len());
    let mut chunked = Scan::new(listed, max);
    let chunked = chunked.feed(&framed[..at]).is_ok() && chunked.feed(&framed[at..]).is_ok();
    assert_eq!(
        whole, chunked,
        "{path}: the split at {at} changed the verdict"
    );
    if let Some(n) = items(message) {
        assert_eq!(
            whole,
            n <= max,
            "{path}: prost reads {n} items, the scan {} at most {max}",
            if whole { "accepted" } else { "refused" }
        );
    }
}
