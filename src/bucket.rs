//! The application: what every front door calls.
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::config::{Config, DeliveryConfig};
use crate::delivery::{
    ConsumerInfo, Delivery, Dispatcher, LeaseChange, LeaseToken, SubscribeOptions, Subscription,
};
use crate::domain::packet::{MAX_RAW_SIGNALS_BYTES, MAX_STRING_BYTES, parse_uuid};
use crate::domain::page_token::PageToken;
use crate::domain::{DeliveryStatus, FieldViolation, Packet, PacketDraft, json};
use crate::error::Error;
use crate::store::{
    Counts, Inserted, Mark, MarkOutcome, Requeue, RequeueReason, Store, StoredPacket, UserQuery,
};

pub const MAX_LEASE_SECONDS: u32 = 3600;
pub const MAX_IN_FLIGHT: u32 = 10_000;
pub const DEFAULT_USER_LIMIT: u32 = 50;
pub const MAX_USER_LIMIT: u32 = 500;
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

pub struct Bucket {
    store: Store,
    dispatcher: Arc<Dispatcher>,
    delivery: DeliveryConfig,
    max_batch: usize,
}

/// Which finished packets Redrive or Replay sends back to pending, as the
/// operator asked; see [`Bucket::requeue`].
#[derive(Debug, Clone, Default)]
pub struct RequeueRequest {
    /// Redrive: dead_letter and/or failed (empty: both). Replay: unused.
    pub statuses: Vec<DeliveryStatus>,
    /// Empty: every user.
    pub user_id: String,
    pub received_from: Option<DateTime<Utc>>,
    pub received_before: Option<DateTime<Utc>>,
}

/// What MarkProcessed did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marked {
    pub packet_id: Uuid,
    pub success: bool,
    pub already_processed: bool,
}

impl Marked {
    /// The original bucket's message for the outcome.
    pub fn message(&self) -> &'static str {
        match (self.already_processed, self.success) {
            (true, _) => "Packet already processed",
            (false, true) => "Packet marked as processed",
            (false, false) => "Packet marked as failed",
        }
    }
}

/// One outcome as a consumer reports it, before validation.
#[derive(Debug, Clone, Default)]
pub struct MarkRequest {
    pub packet_id: String,
    pub success: bool,
    pub karma_actions: Vec<Value>,
    pub error_message: Option<String>,
}

impl MarkRequest {
    fn validate(self, at: chrono::DateTime<Utc>) -> Result<Mark, Error> {
        let mut violations = Vec::new();
        let id = parse_uuid(&self.packet_id)
            .map_err(|why| violations.push(FieldViolation::new("packet_id", why)))
            .ok();
        if self.karma_actions.iter().any(json::contains_nul) {
            violations.push(FieldViolation::new(
                "karma_actions",
                "karma_actions must not contain U+0000 (NUL)",
            ));
        }
        let actions_len = json::encoded_len(&self.karma_actions);
        if actions_len > MAX_RAW_SIGNALS_BYTES {
            violations.push(FieldViolation::new(
                "karma_actions",
                format!(
                    "karma_actions is {actions_len} bytes encoded, over {MAX_RAW_SIGNALS_BYTES}"
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
            Some(packet_id) if violations.is_empty() => Ok(Mark {
                packet_id,
                success: self.success,
                karma_actions: self.karma_actions,
                error_message,
                at,
                attempt: 0,
            }),
            _ => Err(Error::InvalidInput(violations)),
        }
    }
}

/// A page of one user's packets, newest first.
#[derive(Debug, Clone)]
pub struct UserPage {
    pub packets: Vec<StoredPacket>,
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StatusReport {
    pub queue_size: u64,
    pub redis_connected: bool,
    pub counts: Counts,
    pub consumers: Vec<ConsumerInfo>,
}

impl Bucket {
    pub fn new(store: Store, dispatcher: Arc<Dispatcher>, config: &Config) -> Self {
        Bucket {
            store,
            dispatcher,
            delivery: config.delivery.clone(),
            max_batch: config.max_batch,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Items per IngestBatch, MarkProcessedBatch or JSON array, at most.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Stores one packet; answers only once it is committed.
    pub async fn ingest(&self, draft: PacketDraft) -> Result<Inserted, Error> {
        let started = Instant::now();
        let packet = parse(draft)?;
        let receipt = self
            .store
            .insert_many(vec![Arc::new(packet)])
            .await
            .pop()
            .expect("one receipt per packet")?;
        metrics::counter!("bucket_packets_ingested_total").increment(1);
        metrics::histogram!("bucket_ingest_seconds").record(started.elapsed().as_secs_f64());
        Ok(receipt)
    }

    /// Stores the valid packets of a batch; every item gets its own answer.
    pub async fn ingest_batch(
        &self,
        drafts: Vec<PacketDraft>,
    ) -> Result<Vec<Result<Inserted, Error>>, Error> {
        if drafts.len() > self.max_batch {
            return Err(Error::invalid(
                "packets",
                format!(
                    "a batch holds at most {} packets, got {}",
                    self.max_batch,
                    drafts.len()
                ),
            ));
        }
        let started = Instant::now();
        let mut results: Vec<Option<Result<Inserted, Error>>> = Vec::with_capacity(drafts.len());
        let mut valid = Vec::new();
        let mut valid_at = Vec::new();
        for (i, draft) in drafts.into_iter().enumerate() {
            match parse(draft) {
                Ok(packet) => {
                    valid.push(Arc::new(packet));
                    valid_at.push(i);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let stored = self.store.insert_many(valid).await;
        let ingested = stored.iter().filter(|r| r.is_ok()).count();
        for (i, result) in valid_at.into_iter().zip(stored) {
            results[i] = Some(result.map_err(Error::from));
        }
        metrics::counter!("bucket_packets_ingested_total").increment(ingested as u64);
        metrics::histogram!("bucket_ingest_batch_seconds").record(started.elapsed().as_secs_f64());
        Ok(results
            .into_iter()
            .map(|r| r.expect("every item answered"))
            .collect())
    }

    /// Subscribes to pending packets. Zero means "the default".
    pub fn subscribe(
        &self,
        consumer: &str,
        max_in_flight: u32,
        lease_seconds: u32,
    ) -> Result<Subscription, Error> {
        let mut violations = Vec::new();
        if consumer.len() > MAX_STRING_BYTES {
            violations.push(FieldViolation::new(
                "consumer",
                format!("consumer is over {MAX_STRING_BYTES} bytes"),
            ));
        }
        if max_in_flight > MAX_IN_FLIGHT {
            violations.push(FieldViolation::new(
                "max_in_flight",
                format!("max_in_flight must be at most {MAX_IN_FLIGHT}, got {max_in_flight}"),
            ));
        }
        let lease = self.lease_seconds("lease_seconds", lease_seconds, &mut violations);
        if !violations.is_empty() {
            return Err(Error::InvalidInput(violations));
        }
        let consumer = if consumer.is_empty() {
            "anonymous"
        } else {
            consumer
        };
        self.dispatcher.subscribe(SubscribeOptions {
            consumer: consumer.to_owned(),
            max_in_flight: or_default(max_in_flight, self.delivery.max_in_flight),
            lease,
        })
    }

    /// Leases up to `limit` pending packets now (the JSON gateway's poll).
    pub async fn lease_pending(
        &self,
        limit: u32,
        lease_seconds: u32,
    ) -> Result<Vec<Delivery>, Error> {
        let mut violations = Vec::new();
        let lease = self.lease_seconds("lease_seconds", lease_seconds, &mut violations);
        if !violations.is_empty() {
            return Err(Error::InvalidInput(violations));
        }
        self.dispatcher.lease_now(limit as usize, lease).await
    }

    fn lease_seconds(
        &self,
        field: &str,
        seconds: u32,
        violations: &mut Vec<FieldViolation>,
    ) -> Duration {
        if seconds > MAX_LEASE_SECONDS {
            violations.push(FieldViolation::new(
                field,
                format!("{field} must be at most {MAX_LEASE_SECONDS}, got {seconds}"),
            ));
        }
        Duration::from_secs(u64::from(
            or_default(seconds, self.delivery.lease_seconds).max(1),
        ))
    }

    /// Records one outcome; see [`Bucket::mark_processed_batch`].
    pub async fn mark_processed(&self, request: MarkRequest) -> Result<Marked, Error> {
        let mut results = self.mark_many(vec![request]).await;
        results.pop().expect("one result per mark")
    }

    /// Records many outcomes at once; each item is answered on its own.
    pub async fn mark_processed_batch(
        &self,
        requests: Vec<MarkRequest>,
    ) -> Result<Vec<Result<Marked, Error>>, Error> {
        if requests.len() > self.max_batch {
            return Err(Error::invalid(
                "marks",
                format!(
                    "a batch holds at most {} marks, got {}",
                    self.max_batch,
                    requests.len()
                ),
            ));
        }
        Ok(self.mark_many(requests).await)
    }

    async fn mark_many(&self, requests: Vec<MarkRequest>) -> Vec<Result<Marked, Error>> {
        let at = Utc::now();
        let mut results: Vec<Option<Result<Marked, Error>>> = Vec::with_capacity(requests.len());
        let mut valid = Vec::new();
        let mut valid_at = Vec::new();
        for (i, request) in requests.into_iter().enumerate() {
            match request.validate(at) {
                Ok(mark) => {
                    valid.push(mark);
                    valid_at.push(i);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        // The delivery being marked is written with the outcome, so the
        // stored attempts count it.
        let ids: Vec<Uuid> = valid.iter().map(|m| m.packet_id).collect();
        for (mark, attempt) in valid.iter_mut().zip(self.dispatcher.attempts(&ids)) {
            mark.attempt = attempt;
        }
        let outcomes = self.store.mark_many(valid.clone()).await;
        let mut settled = Vec::with_capacity(outcomes.len());
        let (mut processed, mut failed) = (0, 0);
        for ((i, mark), outcome) in valid_at.into_iter().zip(valid).zip(outcomes) {
            let packet_id = mark.packet_id;
            let answer = match outcome {
                Err(e) => Err(e.into()),
                Ok(MarkOutcome::NotFound) => Err(Error::NotFound(format!("packet {packet_id}"))),
                Ok(outcome) => {
                    // Already processed: still ends a lease this node holds
                    // (a packet delivered twice).
                    settled.push(packet_id);
                    let already_processed = outcome == MarkOutcome::AlreadyProcessed;
                    if !already_processed {
                        *(if mark.success {
                            &mut processed
                        } else {
                            &mut failed
                        }) += 1;
                    }
                    Ok(Marked {
                        packet_id,
                        success: mark.success,
                        already_processed,
                    })
                }
            };
            results[i] = Some(answer);
        }
        self.dispatcher.settled(&settled).await;
        if processed > 0 {
            metrics::counter!("bucket_packets_marked_total", "outcome" => "processed")
                .increment(processed);
        }
        if failed > 0 {
            metrics::counter!("bucket_packets_marked_total", "outcome" => "failed")
                .increment(failed);
        }
        results
            .into_iter()
            .map(|r| r.expect("every mark answered"))
            .collect()
    }

    /// ExtendLease: moves the end of each lease a token names to
    /// `lease_seconds` from now, or ends it (0: a nack). Each token is
    /// answered on its own, with the packet it leases.
    pub async fn extend_lease(
        &self,
        tokens: &[String],
        lease_seconds: u32,
    ) -> Result<Vec<Result<(Uuid, LeaseChange), Error>>, Error> {
        let mut violations = Vec::new();
        if tokens.len() > self.max_batch {
            violations.push(FieldViolation::new(
                "lease_tokens",
                format!(
                    "at most {} tokens at once, got {}",
                    self.max_batch,
                    tokens.len()
                ),
            ));
        }
        if lease_seconds > MAX_LEASE_SECONDS {
            violations.push(FieldViolation::new(
                "lease_seconds",
                format!("lease_seconds must be at most {MAX_LEASE_SECONDS}, got {lease_seconds}"),
            ));
        }
        if !violations.is_empty() {
            return Err(Error::InvalidInput(violations));
        }
        let lease = (lease_seconds > 0).then(|| Duration::from_secs(u64::from(lease_seconds)));
        let parsed: Vec<Option<LeaseToken>> = tokens.iter().map(|t| LeaseToken::parse(t)).collect();
        let valid: Vec<LeaseToken> = parsed.iter().flatten().cloned().collect();
        let mut changed = self
            .dispatcher
            .change_leases(&valid, lease)
            .await
            .into_iter();
        Ok(parsed
            .into_iter()
            .map(|token| match token {
                None => Err(Error::invalid(
                    "lease_token",
                    "not a lease token this server makes (StreamPending sends them)",
                )),
                Some(t) => changed
                    .next()
                    .expect("one answer per valid token")
                    .map(|c| (t.packet_id, c)),
            })
            .collect())
    }

    /// Redrive (dead_letter and failed packets) or Replay (processed ones):
    /// the selected packets are pending again, delivered from the start,
    /// their outcome kept in their history. Answers how many.
    pub async fn requeue(
        &self,
        reason: RequeueReason,
        request: RequeueRequest,
    ) -> Result<u64, Error> {
        let mut violations = Vec::new();
        let user_id = match request.user_id.as_str() {
            "" => None,
            u => match user_id_violation(u) {
                Some(v) => {
                    violations.push(v);
                    None
                }
                None => Some(u.to_owned()),
            },
        };
        if let (Some(from), Some(before)) = (request.received_from, request.received_before)
            && from >= before
        {
            violations.push(FieldViolation::new(
                "received_before",
                "received_before must be later than received_from",
            ));
        }
        let statuses = match reason {
            RequeueReason::Replay => {
                if user_id.is_none()
                    && request.received_from.is_none()
                    && request.received_before.is_none()
                {
                    violations.push(FieldViolation::new(
                        "user_id",
                        "Replay needs a user_id or a received_from/received_before range \
                         (replaying every processed packet is refused)",
                    ));
                }
                vec![DeliveryStatus::Processed]
            }
            RequeueReason::Redrive if request.statuses.is_empty() => {
                vec![DeliveryStatus::DeadLetter, DeliveryStatus::Failed]
            }
            RequeueReason::Redrive => {
                if let Some(s) = request
                    .statuses
                    .iter()
                    .find(|s| !matches!(s, DeliveryStatus::DeadLetter | DeliveryStatus::Failed))
                {
                    violations.push(FieldViolation::new(
                        "statuses",
                        format!("Redrive takes dead_letter and failed packets, not {s}"),
                    ));
                }
                request.statuses
            }
        };
        if !violations.is_empty() {
            return Err(Error::InvalidInput(violations));
        }
        let requeue = Requeue {
            reason,
            statuses,
            user_id,
            received_from: request.received_from,
            received_before: request.received_before,
        };
        let rows = self.store.requeue(&requeue, Utc::now()).await?;
        let ids: Vec<Uuid> = rows.iter().map(|(id, _)| *id).collect();
        let first = rows.iter().map(|(_, seq)| *seq).min().unwrap_or(0);
        self.dispatcher.requeued(&ids, first - 1).await;
        let reason = match reason {
            RequeueReason::Redrive => "redrive",
            RequeueReason::Replay => "replay",
        };
        tracing::info!(reason, count = ids.len(), "packets sent back to pending");
        metrics::counter!("bucket_packets_requeued_total", "reason" => reason)
            .increment(ids.len() as u64);
        Ok(ids.len() as u64)
    }

    pub async fn user_packets(
        &self,
        user_id: &str,
        limit: u32,
        status: Option<DeliveryStatus>,
        page_token: &str,
    ) -> Result<UserPage, Error> {
        let mut violations = Vec::new();
        violations.extend(user_id_violation(user_id));
        if limit > MAX_USER_LIMIT {
            violations.push(FieldViolation::new(
                "limit",
                format!("limit must be at most {MAX_USER_LIMIT}, got {limit}"),
            ));
        }
        let before_seq = match page_token {
            "" => None,
            token => match PageToken::decode(token, user_id, status) {
                Ok(t) => Some(t.before_seq),
                Err(e) => {
                    violations.push(FieldViolation::new("page_token", e.describe()));
                    None
                }
            },
        };
        if !violations.is_empty() {
            return Err(Error::InvalidInput(violations));
        }
        let limit = or_default(limit, DEFAULT_USER_LIMIT);
        // One extra row tells whether another page follows.
        let mut packets = self
            .store
            .user_packets(&UserQuery {
                user_id: user_id.to_owned(),
                status,
                limit: limit + 1,
                before_seq,
            })
            .await?;
        let next_page_token = if packets.len() > limit as usize {
            packets.truncate(limit as usize);
            packets
                .last()
                .map(|p| PageToken::encode(p.seq, user_id, status))
        } else {
            None
        };
        Ok(UserPage {
            packets,
            next_page_token,
        })
    }

    /// The database's counts, with leases (which it does not hold) taken
    /// out of its pending packets.
    pub async fn status(&self) -> Result<StatusReport, Error> {
        let mut counts = self.store.counts().await?;
        let held = self.dispatcher.held();
        let (redis_connected, leased) = match self.dispatcher.redis() {
            None => (false, held.leased),
            Some(redis) => {
                // Entries other nodes hold count as leased; this node knows its own.
                let (_, held_by_nodes) = redis.depth().await.unwrap_or((0, 0));
                let others = held_by_nodes.saturating_sub(held.leased + held.waiting);
                (redis.connected(), held.leased + others)
            }
        };
        counts.leased = leased.min(counts.pending);
        counts.pending -= counts.leased;
        Ok(StatusReport {
            queue_size: counts.pending,
            redis_connected,
            counts,
            consumers: self.dispatcher.consumers(),
        })
    }
}

fn parse(draft: PacketDraft) -> Result<Packet, Error> {
    Packet::parse(draft, Utc::now()).map_err(|violations| {
        for v in &violations {
            metrics::counter!("bucket_packets_rejected_total", "field" => v.field.clone())
                .increment(1);
        }
        Error::InvalidInput(violations)
    })
}

/// What is wrong with a user id a query names, if anything.
fn user_id_violation(user_id: &str) -> Option<FieldViolation> {
    if user_id.is_empty() || user_id.len() > MAX_STRING_BYTES {
        Some(FieldViolation::new(
            "user_id",
            format!("user_id must be 1 to {MAX_STRING_BYTES} bytes"),
        ))
    } else if user_id.contains('\0') {
        // No stored user has one, and PostgreSQL refuses the query.
        Some(FieldViolation::new(
            "user_id",
            "user_id must not contain U+0000 (NUL)",
        ))
    } else {
        None
    }
}

fn or_default(value: u32, default: u32) -> u32 {
    if value == 0 { default } else { value }
}
