//! The application: what every front door calls.
mod consume;

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use metrics::{Counter, Histogram};

use crate::config::{Config, DeliveryConfig};
use crate::delivery::{
    ConsumerInfo, Delivery, Dispatcher, LeaseChange, LeaseToken, SubscribeOptions, Subscription,
};
use crate::domain::batch::Batch;
use crate::domain::lease;
use crate::domain::mark::{MarkRequest, ValidMark};
use crate::domain::page_token::PageToken;
use crate::domain::subscribe::Subscribe;
use crate::domain::user_page::{PageBounds, user_id_violation};
use crate::domain::{DeliveryStatus, FieldViolation, Packet, PacketDraft, PacketId};
use crate::error::Error;
use crate::store::{
    Counts, Inserted, Mark, MarkOutcome, MarkedDelivery, Requeue, RequeueReason, Store,
    StoredPacket, UserQuery,
};

pub use consume::{Answer, ConsumeEvent, ConsumeRequest, Consumption, StreamMark, StreamMarked};

// The hot path's metrics, each handle made at its first use and kept: the
// macros build the key and look it up in the registry on every call. First
// used after `telemetry::metrics()` installs the recorder (the first step of
// `Application::build`), so none is a handle of no recorder.
static INGESTED: LazyLock<Counter> =
    LazyLock::new(|| metrics::counter!("bucket_packets_ingested_total"));
static INGEST_SECONDS: LazyLock<Histogram> =
    LazyLock::new(|| metrics::histogram!("bucket_ingest_seconds"));
static INGEST_BATCH_SECONDS: LazyLock<Histogram> =
    LazyLock::new(|| metrics::histogram!("bucket_ingest_batch_seconds"));
static MARKED_PROCESSED: LazyLock<Counter> =
    LazyLock::new(|| metrics::counter!("bucket_packets_marked_total", "outcome" => "processed"));
static MARKED_FAILED: LazyLock<Counter> =
    LazyLock::new(|| metrics::counter!("bucket_packets_marked_total", "outcome" => "failed"));

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
    pub packet_id: PacketId,
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

    /// Most items a request's list may carry (`BUCKET_MAX_BATCH`).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Whether a request's list of `len` items is within the batch limit.
    pub fn fits(&self, batch: Batch, len: usize) -> Result<(), Error> {
        batch
            .check(self.max_batch, len)
            .map_err(|v| Error::InvalidInput(vec![v]))
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
        INGESTED.increment(1);
        INGEST_SECONDS.record(started.elapsed().as_secs_f64());
        Ok(receipt)
    }

    /// Stores the valid packets of a batch; every item gets its own answer.
    pub async fn ingest_batch(
        &self,
        drafts: Vec<PacketDraft>,
    ) -> Result<Vec<Result<Inserted, Error>>, Error> {
        self.fits(Batch::Packets, drafts.len())?;
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
        INGESTED.increment(ingested as u64);
        INGEST_BATCH_SECONDS.record(started.elapsed().as_secs_f64());
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
        let options = self.subscribe_options(consumer, max_in_flight, lease_seconds)?;
        self.dispatcher.subscribe(options)
    }

    /// A subscriber's options, checked, defaults applied.
    fn subscribe_options(
        &self,
        consumer: &str,
        max_in_flight: u32,
        lease_seconds: u32,
    ) -> Result<SubscribeOptions, Error> {
        let asked = Subscribe::check(consumer, max_in_flight, lease_seconds)
            .map_err(Error::InvalidInput)?;
        Ok(SubscribeOptions {
            consumer: asked.consumer,
            max_in_flight: asked.max_in_flight.unwrap_or(self.delivery.max_in_flight),
            lease: self.lease(asked.lease_seconds),
        })
    }

    /// Leases up to `limit` pending packets now (the JSON gateway's poll).
    pub async fn lease_pending(
        &self,
        limit: u32,
        lease_seconds: u32,
    ) -> Result<Vec<Delivery>, Error> {
        let asked = lease::lease_seconds("lease_seconds", lease_seconds)
            .map_err(|v| Error::InvalidInput(vec![v]))?;
        self.dispatcher
            .lease_now(
                limit as usize,
                self.lease(asked),
                self.delivery.max_poll_leases,
            )
            .await
    }

    /// The lease asked for, else the configured one.
    fn lease(&self, seconds: Option<u32>) -> Duration {
        Duration::from_secs(u64::from(
            seconds.unwrap_or(self.delivery.lease_seconds).max(1),
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
        self.fits(Batch::Marks, requests.len())?;
        Ok(self.mark_many(requests).await)
    }

    async fn mark_many(&self, requests: Vec<MarkRequest>) -> Vec<Result<Marked, Error>> {
        self.record_marks(requests, &[])
            .await
            .into_iter()
            .map(|r| r.map(|(marked, _)| marked))
            .collect()
    }

    /// Validates and records outcomes in one store call, then ends their
    /// leases. `tokens` (a Consume stream's; else empty) name the lease of
    /// each request: with each recorded outcome comes whether that lease
    /// had ended before the outcome was recorded.
    async fn record_marks(
        &self,
        requests: Vec<MarkRequest>,
        tokens: &[LeaseToken],
    ) -> Vec<Result<(Marked, bool), Error>> {
        // Microseconds, as every store keeps times (PostgreSQL's timestamptz,
        // SQLite's record log): read before and after a restart alike.
        let at = Utc::now().trunc_subsecs(6);
        let mut results: Vec<Option<Result<(Marked, bool), Error>>> =
            Vec::with_capacity(requests.len());
        let mut valid = Vec::new();
        let mut valid_at = Vec::new();
        for (i, request) in requests.into_iter().enumerate() {
            match request.validate() {
                Ok(ValidMark {
                    packet_id,
                    success,
                    karma_actions,
                    error_message,
                }) => {
                    valid.push(Mark {
                        packet_id,
                        success,
                        karma_actions,
                        error_message,
                        at,
                        attempt: MarkedDelivery::Attempt(0),
                    });
                    valid_at.push(i);
                    results.push(None);
                }
                Err(violations) => results.push(Some(Err(Error::InvalidInput(violations)))),
            }
        }
        // The delivery being marked is written with the outcome, so the
        // stored attempts count it: the one this node leased, else the one
        // the token names (a lease another node granted), else the
        // dispatcher's best knowledge.
        let ids: Vec<PacketId> = valid.iter().map(|m| m.packet_id).collect();
        let known = self.dispatcher.attempts(&ids);
        for ((mark, here), i) in valid.iter_mut().zip(known).zip(&valid_at) {
            let named = tokens.get(*i).map_or(0, |t| t.attempt);
            mark.attempt = match here {
                MarkedDelivery::Attempt(attempt) => MarkedDelivery::Attempt(attempt.max(named)),
                MarkedDelivery::AfterCounted if named > 0 => MarkedDelivery::Attempt(named),
                after => after,
            };
        }
        // What the answers need; the marks themselves (karma actions and
        // all) go to the store without a copy.
        let answered: Vec<(PacketId, bool)> =
            valid.iter().map(|m| (m.packet_id, m.success)).collect();
        // The consumer is done with these deliveries: its stream may be
        // handed more while the outcomes wait for their commit (a stream's
        // window counts what its consumer has not marked; held until the
        // commit, 4 streams × 64 delivered a third less under a closed
        // loop on one runtime worker, BENCHMARKS.md, twenty-second
        // session).
        self.dispatcher.marking(&ids);
        let outcomes = self.store.mark_many(valid).await;
        // Asked after the write, just before the leases end: a lease that
        // expired while the outcome was written had ended.
        let live = self.dispatcher.live(tokens);
        let mut settled = Vec::with_capacity(outcomes.len());
        let mut unrecorded = Vec::new();
        let (mut processed, mut failed) = (0, 0);
        for ((i, (packet_id, success)), outcome) in valid_at.into_iter().zip(answered).zip(outcomes)
        {
            let answer = match outcome {
                Err(e) => {
                    unrecorded.push(packet_id);
                    Err(e.into())
                }
                Ok(MarkOutcome::NotFound) => {
                    unrecorded.push(packet_id);
                    Err(Error::NotFound(format!("packet {packet_id}")))
                }
                Ok(outcome) => {
                    // Already processed: still ends a lease this node holds
                    // (a packet delivered twice).
                    settled.push(packet_id);
                    let already_processed = outcome == MarkOutcome::AlreadyProcessed;
                    if !already_processed {
                        *(if success { &mut processed } else { &mut failed }) += 1;
                    }
                    let lease_ended = live.get(i).is_some_and(|live| !live);
                    Ok((
                        Marked {
                            packet_id,
                            success,
                            already_processed,
                        },
                        lease_ended,
                    ))
                }
            };
            results[i] = Some(answer);
        }
        self.dispatcher.unmarked(&unrecorded);
        self.dispatcher.settled(&settled).await;
        if processed > 0 {
            MARKED_PROCESSED.increment(processed);
        }
        if failed > 0 {
            MARKED_FAILED.increment(failed);
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
    ) -> Result<Vec<Result<(PacketId, LeaseChange), Error>>, Error> {
        let mut violations: Vec<FieldViolation> = Batch::LeaseTokens
            .check(self.max_batch, tokens.len())
            .err()
            .into_iter()
            .collect();
        let lease = lease::lease_seconds("lease_seconds", lease_seconds)
            .map_err(|v| violations.push(v))
            .ok()
            .flatten()
            .map(|seconds| Duration::from_secs(u64::from(seconds)));
        if !violations.is_empty() {
            return Err(Error::InvalidInput(violations));
        }
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
        let ids: Vec<PacketId> = rows.iter().map(|(id, _)| *id).collect();
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
        let PageBounds { limit, before_seq } =
            PageBounds::check(user_id, limit, status, page_token).map_err(Error::InvalidInput)?;
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
