//! Several nodes: puts back into the Redis stream the pending packets it
//! lacks. The stream can lose entries (Redis restarted without
//! persistence, a node stopped between commit and XADD); the database
//! cannot, so no packet is lost.
//!
//! Its cost does not grow with what is stored. At start and each time
//! Redis (re)connects, a full pass: skipped when the stream holds at least
//! as many entries as packets are pending (the count is kept by the
//! database, no scan; after Redis lost its data the stream is short) and
//! the server is the one checked before (a server restarted from an old
//! snapshot can hold stale entries that make up the count), else it pages
//! through the pending packets by seq. Every `every`, an incremental pass looks only at packets received
//! since the previous pass (by the `received_at` index) and at stream
//! entries added since then (entry ids are times): the one loss that
//! happens without a reconnection, a node stopping between commit and
//! XADD, is always recent.
//!
//! A packet pending in the database and absent from the stream may still be
//! on its way there (committed, not yet XADDed, on this node or another):
//! it is looked for again before it is added (see [`add_missing`]), so a
//! pass does not put a second entry beside the one arriving.
//!
//! After every pass, and at shutdown, a node gives back what it kept or
//! left to the database while Redis refused (or did not answer) its
//! packets ([`hand_back`]): from the database, so only what is still
//! pending reaches the stream.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::dispatcher::Dispatcher;
use crate::domain::PacketId;
use crate::error::Error;
use crate::queue::QueueSink;
use crate::queue::redis::StreamView;

/// Pending ids read per query.
const PAGE: u32 = 10_000;
/// How long after its commit a packet may still be on its way to the
/// stream from another node; this node's own sends are waited for.
const IN_FLIGHT: Duration = Duration::from_secs(2);
/// Ids that look missing, looked for again together (the look waits
/// [`IN_FLIGHT`], so not once a page).
const CONFIRM_AT: usize = 50_000;
/// How far before the previous pass the incremental one looks at packets,
/// for commits in flight then.
const OVERLAP: chrono::TimeDelta = chrono::TimeDelta::seconds(10);
/// How much earlier it reads stream entries: entry ids are Redis's clock,
/// received_at the node's, and they may differ.
const CLOCK_SLACK: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// A full pass; returns how many ids were added.
pub async fn reconcile(dispatcher: &Arc<Dispatcher>) -> Result<usize, Error> {
    let Some(redis) = dispatcher.redis() else {
        return Ok(0);
    };
    if let Err(e) = redis.ensure_group().await {
        // Redis away: what is committed meanwhile waits in this node's memory.
        tracing::warn!(error = %e, "queue not ready");
    }
    let (in_stream, _) = redis.depth().await?;
    let pending = dispatcher.store().counts().await?.pending;
    // A Redis server that restarted since the last check (from an old
    // snapshot, or a replica promoted) may hold stale entries that make up
    // the count while recent ones are missing: the count is trusted only
    // from the server checked before (issue 16, suspicion 6).
    let run = redis.run_id().await?;
    if in_stream >= pending && !redis.restarted(&run) {
        redis.checked(run);
        return Ok(0);
    }
    // Held here first: an entry removed between the two reads is one this
    // node just took, so it is in one of the two sets.
    let held = dispatcher.held_ids();
    let mut in_stream = redis.stream_ids(None).await?;
    let added = add_missing(dispatcher, 0, None, &mut in_stream, &held).await?;
    redis.checked(run);
    Ok(added)
}

/// An incremental pass over what was received since `since`.
pub async fn reconcile_since(
    dispatcher: &Arc<Dispatcher>,
    since: DateTime<Utc>,
) -> Result<usize, Error> {
    let Some(redis) = dispatcher.redis() else {
        return Ok(0);
    };
    let Some(first) = dispatcher.store().first_seq_since(since - OVERLAP).await? else {
        return Ok(0);
    };
    let held = dispatcher.held_ids();
    let mut in_stream = redis
        .stream_ids(Some(since - OVERLAP - CLOCK_SLACK))
        .await?;
    add_missing(dispatcher, first - 1, None, &mut in_stream, &held).await
}

/// Gives back to the stream what this node kept, or left to the database,
/// while Redis refused (or did not answer) its packets (see
/// [`crate::queue::memory::MemoryQueue::begin_hand_back`]): the pending
/// packets among them that are neither in the stream nor held here are
/// added, as ids, for any node to take; then the node keeps no copy, so it
/// never delivers one that another node delivered and marked meanwhile
/// unheard. If Redis refuses again, they are kept (and left out) as
/// before, for the next pass.
pub async fn hand_back(dispatcher: &Arc<Dispatcher>) -> Result<usize, Error> {
    let Some(redis) = dispatcher.redis() else {
        return Ok(0);
    };
    if !redis.connected() {
        return Ok(0);
    }
    let Some(back) = dispatcher.lock_queue(|queue, _| queue.begin_hand_back()) else {
        return Ok(0);
    };
    // Out of the buffer now, so not among what this node holds.
    let held = dispatcher.held_ids();
    let added = match redis.stream_ids(None).await {
        Ok(mut in_stream) => {
            add_missing(
                dispatcher,
                back.after_seq,
                Some(back.upto_seq),
                &mut in_stream,
                &held,
            )
            .await
        }
        Err(e) => Err(e.into()),
    };
    let kept = back.kept.len();
    dispatcher.lock_queue(|queue, held| queue.handed_back(back, added.is_ok(), held));
    dispatcher.pump_now();
    if added.is_ok() {
        tracing::info!(kept, "gave back to Redis what it refused");
    }
    added
}

/// Adds the pending packets after seq `after` (up to `upto`) that are
/// neither in the stream nor held here, page by page.
///
/// A packet is committed before its XADD, on whichever node committed it:
/// one pending in the database and not in the stream may be on its way.
/// So what looks missing is looked for again before it is added: once this
/// node sent everything it committed, and [`IN_FLIGHT`] after the database
/// said it was pending (time for another node's send), in the entries
/// added to the stream since and among what this node holds by then; and
/// what is still missing is asked of the database again (an entry read,
/// marked and removed meanwhile is missing from the stream too).
async fn add_missing(
    dispatcher: &Arc<Dispatcher>,
    mut after: i64,
    upto: Option<i64>,
    in_stream: &mut StreamView,
    held: &HashSet<PacketId>,
) -> Result<usize, Error> {
    let redis = dispatcher.redis().expect("reconciling a Redis queue");
    let upto = upto.unwrap_or(i64::MAX);
    let mut added = 0;
    let mut looks_missing: Vec<PacketId> = Vec::new();
    let mut since: Option<Instant> = None;
    loop {
        let last_page = if after < upto {
            let read = Instant::now();
            let page = dispatcher.store().pending_ids(after, PAGE).await?;
            if let Some(&(_, last)) = page.last() {
                after = last;
            }
            let before = looks_missing.len();
            looks_missing.extend(
                page.iter()
                    .filter(|(id, seq)| {
                        *seq <= upto && !in_stream.ids.contains(id) && !held.contains(id)
                    })
                    .map(|(id, _)| *id),
            );
            if looks_missing.len() > before {
                since.get_or_insert(read);
            }
            page.len() < PAGE as usize
        } else {
            true
        };
        if let Some(read) = since
            && (last_page || looks_missing.len() >= CONFIRM_AT)
        {
            tokio::time::sleep_until((read + IN_FLIGHT).into()).await;
            redis.sent_so_far(IN_FLIGHT).await;
            redis.catch_up(in_stream).await?;
            let held = dispatcher.held_ids();
            looks_missing.retain(|id| !in_stream.ids.contains(id) && !held.contains(id));
            // An entry read, marked and removed meanwhile is not in the
            // stream either: its packet is no longer pending.
            let mut missing = Vec::with_capacity(looks_missing.len());
            for chunk in looks_missing.chunks(PAGE as usize) {
                let pending = dispatcher.store().pending_among(chunk).await?;
                missing.extend(pending.iter().map(|p| p.packet.packet_id));
            }
            redis.add_ids(&missing).await?;
            added += missing.len();
            looks_missing.clear();
            since = None;
        }
        if last_page {
            break;
        }
    }
    if added > 0 {
        tracing::info!(queued = added, "pending packets put back on the queue");
    }
    Ok(added)
}

/// A full pass on every Redis (re)connection, an incremental one every
/// `every`.
pub async fn run<T: Clone>(
    dispatcher: Arc<Dispatcher>,
    mut connected: broadcast::Receiver<T>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now; start already reconciled
    let mut last = Utc::now();
    loop {
        let full = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            event = connected.recv() => match event {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    tracing::info!("Redis connected; reconciling the queue with the database");
                    true
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        let started = Utc::now();
        let done = if full {
            reconcile(&dispatcher).await
        } else {
            reconcile_since(&dispatcher, last).await
        };
        match done {
            Ok(_) => last = started,
            Err(e) => tracing::warn!(error = %e, "queue reconciliation failed; will retry"),
        }
        if let Err(e) = hand_back(&dispatcher).await {
            tracing::warn!(error = %e, "giving back what Redis refused failed; will retry");
        }
    }
}
