//! Proto messages to and from the domain.
use crate::bucket::{
    Answer, ConsumeEvent, ConsumeRequest, Marked, RequeueRequest, StatusReport, StreamMark,
};
use crate::delivery::{ConsumerInfo, Delivery, LeaseChange};
use crate::domain::mark::MarkRequest;
use crate::domain::packet::TimestampInput;
use crate::domain::{DeliveryStatus, Packet, PacketDraft, PacketId, SenderRole, SystemType};
use crate::error::Error;
use crate::proto::bucket::v1 as pb;
use crate::proto::{JsonStruct, action_to_struct, from_timestamp, timestamp};
use crate::store::{HistoryEntry, Inserted, RequeueReason, StoredPacket};
use chrono::{DateTime, Utc};
use serde_json::Value;

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// A proto enum's value as the draft's text: unspecified is absent; a
/// number the contract does not know is kept as its digits, which
/// `Packet::parse` refuses, naming the field.
fn label_text<T: std::fmt::Display>(
    raw: i32,
    known: Result<Option<T>, prost::UnknownEnumValue>,
) -> Option<String> {
    match known {
        Ok(label) => label.map(|l| l.to_string()),
        Err(_) => Some(raw.to_string()),
    }
}

fn system_type_from_pb(s: pb::SystemType) -> Option<SystemType> {
    match s {
        pb::SystemType::Unspecified => None,
        pb::SystemType::Gurukul => Some(SystemType::Gurukul),
        pb::SystemType::Ems => Some(SystemType::Ems),
    }
}

fn role_from_pb(r: pb::Role) -> Option<SenderRole> {
    match r {
        pb::Role::Unspecified => None,
        pb::Role::Student => Some(SenderRole::Student),
        pb::Role::Employee => Some(SenderRole::Employee),
    }
}

fn system_type_to_pb(s: Option<SystemType>) -> pb::SystemType {
    match s {
        None => pb::SystemType::Unspecified,
        Some(SystemType::Gurukul) => pb::SystemType::Gurukul,
        Some(SystemType::Ems) => pb::SystemType::Ems,
    }
}

fn role_to_pb(r: Option<SenderRole>) -> pb::Role {
    match r {
        None => pb::Role::Unspecified,
        Some(SenderRole::Student) => pb::Role::Student,
        Some(SenderRole::Employee) => pb::Role::Employee,
    }
}

pub fn draft(p: pb::PacketInput) -> PacketDraft {
    let system_type = label_text(
        p.system_type,
        pb::SystemType::try_from(p.system_type).map(system_type_from_pb),
    );
    let role = label_text(p.role, pb::Role::try_from(p.role).map(role_from_pb));
    PacketDraft {
        packet_id: non_empty(p.packet_id),
        user_id: non_empty(p.user_id),
        employee_id: non_empty(p.employee_id),
        session_id: non_empty(p.session_id),
        lesson_id: non_empty(p.lesson_id),
        system_type,
        role,
        timestamp: p.timestamp.map(|ts| match from_timestamp(&ts) {
            Ok(at) => TimestampInput::At(at),
            Err(why) => TimestampInput::Invalid(why),
        }),
        cognitive_state: non_empty(p.cognitive_state),
        state: non_empty(p.state),
        active_seconds: Some(p.active_seconds),
        idle_seconds: Some(p.idle_seconds),
        away_seconds: Some(p.away_seconds),
        focus_score: p.focus_score,
        integrity_score: p.integrity_score,
        raw_signals: p.raw_signals.map(|s| Value::Object(s.0)),
        // Protobuf decoding already enforced the types.
        wrong_types: Vec::new(),
    }
}

pub fn receipt(r: Inserted) -> pb::IngestResponse {
    pb::IngestResponse {
        status: "ingested".to_owned(),
        packet_id: r.packet_id.text(),
        received_at: Some(timestamp(r.received_at)),
        created: r.created,
    }
}

pub fn mark_request(req: pb::MarkProcessedRequest) -> MarkRequest {
    MarkRequest {
        packet_id: req.packet_id,
        success: req.success,
        karma_actions: karma_actions(req.karma_actions),
        error_message: non_empty(req.error_message),
    }
}

fn karma_actions(actions: Vec<JsonStruct>) -> Vec<Value> {
    actions.into_iter().map(|s| Value::Object(s.0)).collect()
}

/// A Consume request after the first (its settings already taken);
/// settings in it again are refused.
pub fn consume_request(req: pb::ConsumeRequest) -> Result<ConsumeRequest, Error> {
    if req.settings.is_some() {
        return Err(Error::invalid(
            "settings",
            "settings go in the first request of a Consume stream only",
        ));
    }
    Ok(ConsumeRequest {
        marks: req
            .marks
            .into_iter()
            .map(|m| StreamMark {
                lease_token: m.lease_token,
                success: m.success,
                karma_actions: karma_actions(m.karma_actions),
                error_message: non_empty(m.error_message),
            })
            .collect(),
        nacks: req.nack_lease_tokens,
        extensions: req.extend_lease_tokens,
        extend_seconds: req.extend_lease_seconds,
    })
}

pub fn consume_event(event: ConsumeEvent) -> pb::ConsumeResponse {
    pb::ConsumeResponse {
        deliveries: event.deliveries.into_iter().map(delivery).collect(),
        answer: event.answer.map(consume_answer),
    }
}

fn consume_answer(a: Answer) -> pb::ConsumeAnswer {
    use pb::consume_result::Outcome;
    let mut rejected = 0;
    let mut refused = |index: usize, e: &Error| {
        rejected += 1;
        pb::ConsumeResult {
            index: index as u32,
            outcome: Some(Outcome::Error(ingest_error(e))),
            lease_ended: false,
        }
    };
    let mut marks = Vec::with_capacity(a.marks.len());
    let mut marked = 0;
    for (index, result) in a.marks.into_iter().enumerate() {
        marks.push(match result {
            Ok(m) => {
                marked += 1;
                pb::ConsumeResult {
                    index: index as u32,
                    outcome: Some(Outcome::Marked(self::marked(m.marked))),
                    lease_ended: m.lease_ended,
                }
            }
            Err(e) => refused(index, &e),
        });
    }
    let mut leases = |results: Vec<Result<(PacketId, LeaseChange), Error>>| {
        results
            .into_iter()
            .enumerate()
            .map(|(index, result)| match result {
                Ok((packet_id, change)) => pb::ConsumeResult {
                    index: index as u32,
                    outcome: Some(Outcome::Lease(extended_lease(packet_id, change))),
                    lease_ended: false,
                },
                Err(e) => refused(index, &e),
            })
            .collect::<Vec<_>>()
    };
    let nacks = leases(a.nacks);
    let extensions = leases(a.extensions);
    pb::ConsumeAnswer {
        marks,
        nacks,
        extensions,
        marked,
        rejected,
    }
}

pub fn extended_lease(packet_id: PacketId, change: LeaseChange) -> pb::ExtendedLease {
    pb::ExtendedLease {
        packet_id: packet_id.text(),
        lease_expires_at: match change {
            LeaseChange::Extended(until) => Some(timestamp(until)),
            LeaseChange::Ended => None,
        },
    }
}

pub fn marked(m: Marked) -> pb::MarkProcessedResponse {
    pb::MarkProcessedResponse {
        status: "ok".to_owned(),
        message: m.message().to_owned(),
        packet_id: m.packet_id.text(),
        already_processed: m.already_processed,
    }
}

pub fn ingest_error(e: &Error) -> pb::IngestError {
    pb::IngestError {
        code: super::code_of(e) as i32,
        message: e.to_string(),
        field_violations: match e {
            Error::InvalidInput(vs) => vs
                .iter()
                .map(|v| pb::FieldViolation {
                    field: v.field.clone(),
                    description: v.description.clone(),
                })
                .collect(),
            _ => Vec::new(),
        },
    }
}

pub fn status_to_pb(s: DeliveryStatus) -> pb::PacketStatus {
    match s {
        DeliveryStatus::Pending => pb::PacketStatus::Pending,
        DeliveryStatus::Leased => pb::PacketStatus::Leased,
        DeliveryStatus::Processed => pb::PacketStatus::Processed,
        DeliveryStatus::Failed => pb::PacketStatus::Failed,
        DeliveryStatus::DeadLetter => pb::PacketStatus::DeadLetter,
    }
}

/// A status filter: unspecified is every status.
pub fn status_filter(raw: i32) -> Result<Option<DeliveryStatus>, Error> {
    match pb::PacketStatus::try_from(raw) {
        Ok(pb::PacketStatus::Unspecified) => Ok(None),
        Ok(pb::PacketStatus::Pending) => Ok(Some(DeliveryStatus::Pending)),
        Ok(pb::PacketStatus::Leased) => Ok(Some(DeliveryStatus::Leased)),
        Ok(pb::PacketStatus::Processed) => Ok(Some(DeliveryStatus::Processed)),
        Ok(pb::PacketStatus::Failed) => Ok(Some(DeliveryStatus::Failed)),
        Ok(pb::PacketStatus::DeadLetter) => Ok(Some(DeliveryStatus::DeadLetter)),
        Err(_) => Err(Error::invalid(
            "status_filter",
            format!("{raw} is not a PacketStatus"),
        )),
    }
}

/// The packet as sent; the caller fills in its delivery state.
fn packet_base(p: &Packet, received_at: DateTime<Utc>) -> pb::Packet {
    pb::Packet {
        packet_id: p.packet_id.text(),
        user_id: p.user_id.clone(),
        employee_id: p.employee_id.clone().unwrap_or_default(),
        session_id: p.session_id.clone().unwrap_or_default(),
        lesson_id: p.lesson_id.clone().unwrap_or_default(),
        system_type: system_type_to_pb(p.system_type) as i32,
        role: role_to_pb(p.role) as i32,
        client_timestamp: Some(timestamp(p.client_timestamp)),
        cognitive_state: p.cognitive_state.clone(),
        state: p.state.map(|s| s.as_str().to_owned()).unwrap_or_default(),
        active_seconds: p.active_seconds,
        idle_seconds: p.idle_seconds,
        away_seconds: p.away_seconds,
        focus_score: p.focus_score,
        integrity_score: p.integrity_score,
        raw_signals: Some(JsonStruct(p.raw_signals.clone())),
        received_at: Some(timestamp(received_at)),
        ..Default::default()
    }
}

pub fn packet(s: StoredPacket) -> pb::Packet {
    pb::Packet {
        status: status_to_pb(s.status) as i32,
        delivery_attempts: s.delivery_attempts,
        processed_at: s.processed_at.map(timestamp),
        processed_by_karma: s.processed_by_karma,
        karma_actions: s.karma_actions.iter().map(action_to_struct).collect(),
        error_message: s.error_message.unwrap_or_default(),
        history: s.history.into_iter().map(history_entry).collect(),
        ..packet_base(&s.packet, s.received_at)
    }
}

fn history_entry(h: HistoryEntry) -> pb::PacketHistoryEntry {
    let reason = match h.reason {
        RequeueReason::Redrive => pb::RequeueReason::Redrive,
        RequeueReason::Replay => pb::RequeueReason::Replay,
    };
    let status =
        DeliveryStatus::parse(&h.status).map_or(pb::PacketStatus::Unspecified, status_to_pb);
    pb::PacketHistoryEntry {
        reason: reason as i32,
        requeued_at: Some(timestamp(h.requeued_at)),
        status: status as i32,
        delivery_attempts: h.delivery_attempts,
        processed_at: h.processed_at.map(timestamp),
        processed_by_karma: h.processed_by_karma,
        karma_actions: h.karma_actions.iter().map(action_to_struct).collect(),
        error_message: h.error_message.unwrap_or_default(),
    }
}

/// A Redrive or Replay request's filters, checked as far as the proto
/// types allow (the rest is [`crate::bucket::Bucket::requeue`]'s).
pub fn requeue_request(
    statuses: &[i32],
    user_id: String,
    received_from: Option<prost_types::Timestamp>,
    received_before: Option<prost_types::Timestamp>,
) -> Result<RequeueRequest, Error> {
    let mut violations = Vec::new();
    let mut time = |field: &str, ts: Option<prost_types::Timestamp>| {
        ts.and_then(|ts| {
            from_timestamp(&ts)
                .map_err(|why| violations.push(crate::domain::FieldViolation::new(field, why)))
                .ok()
        })
    };
    let received_from = time("received_from", received_from);
    let received_before = time("received_before", received_before);
    let mut parsed = Vec::new();
    for raw in statuses {
        match status_filter(*raw) {
            Ok(Some(s)) => parsed.push(s),
            _ => violations.push(crate::domain::FieldViolation::new(
                "statuses",
                format!("{raw} is not a PacketStatus Redrive takes (DEAD_LETTER, FAILED)"),
            )),
        }
    }
    if !violations.is_empty() {
        return Err(Error::InvalidInput(violations));
    }
    Ok(RequeueRequest {
        statuses: parsed,
        user_id,
        received_from,
        received_before,
    })
}

pub fn delivery(d: Delivery) -> pb::StreamPendingResponse {
    pb::StreamPendingResponse {
        delivery_attempt: d.attempt,
        lease_expires_at: Some(timestamp(d.lease_expires_at)),
        lease_token: d.lease_token.text(),
        packet: Some(pb::Packet {
            status: pb::PacketStatus::Leased as i32,
            delivery_attempts: d.attempt,
            ..packet_base(&d.packet, d.received_at)
        }),
    }
}

fn consumer(c: ConsumerInfo) -> pb::ConsumerInfo {
    pb::ConsumerInfo {
        consumer: c.consumer,
        in_flight: c.in_flight,
        max_in_flight: c.max_in_flight,
        connected_at: Some(timestamp(c.connected_at)),
    }
}

pub fn status(s: StatusReport) -> pb::StatusResponse {
    pb::StatusResponse {
        queue_size: s.queue_size,
        redis_connected: s.redis_connected,
        model_available: false,
        total_packets: s.counts.total(),
        processed_packets: s.counts.processed,
        pending_packets: s.counts.pending,
        leased_packets: s.counts.leased,
        failed_packets: s.counts.failed,
        dead_letter_packets: s.counts.dead_letter,
        consumers: s.consumers.into_iter().map(consumer).collect(),
    }
}
