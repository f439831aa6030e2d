//! Several nodes: puts back into the Redis stream every pending packet it
//! lacks, at start, each time Redis (re)connects, and every `every`. The
//! stream can lose entries (Redis restarted without persistence, a node
//! stopped between commit and XADD); the database cannot, so no packet is
//! lost.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::dispatcher::{Dispatcher, QueueSink};
use crate::error::Error;

/// One pass; returns how many ids were added.
pub async fn reconcile(dispatcher: &Arc<Dispatcher>) -> Result<usize, Error> {
    let Some(redis) = dispatcher.redis() else {
        return Ok(0);
    };
    if let Err(e) = redis.ensure_group().await {
        // Redis away: what is committed meanwhile waits in this node's memory.
        tracing::warn!(error = %e, "queue not ready");
    }
    // Held here first: an entry removed between the two reads is one this
    // node just took, so it is in one of the two sets.
    let held = dispatcher.held_ids();
    let in_stream: HashSet<_> = redis.stream_ids().await?;
    let missing: Vec<_> = dispatcher
        .store()
        .pending_ids()
        .await?
        .into_iter()
        .filter(|id| !in_stream.contains(id) && !held.contains(id))
        .collect();
    redis.add_ids(&missing).await?;
    if !missing.is_empty() {
        tracing::info!(
            queued = missing.len(),
            "pending packets put back on the queue"
        );
    }
    Ok(missing.len())
}

/// Reconciles on every Redis (re)connection and every `every`.
pub async fn run<T: Clone>(
    dispatcher: Arc<Dispatcher>,
    mut connected: broadcast::Receiver<T>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now; start already reconciled
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            event = connected.recv() => match event {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    tracing::info!("Redis connected; reconciling the queue with the database");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
        if let Err(e) = reconcile(&dispatcher).await {
            tracing::warn!(error = %e, "queue reconciliation failed; will retry");
        }
    }
}
