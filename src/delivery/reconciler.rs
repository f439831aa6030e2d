//! Puts back on the queue every pending packet it lacks: at start, each time
//! Redis (re)connects, and every `every` while Redis is in use. The queue
//! can lose ids (Redis restarted without persistence, a node crashed
//! holding some); the database cannot, so no packet is lost.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::dispatcher::Dispatcher;
use crate::error::Error;

/// One pass; returns how many ids were queued.
pub async fn reconcile(dispatcher: &Dispatcher) -> Result<usize, Error> {
    let queue = dispatcher.queue();
    let unavailable = |e: crate::queue::QueueError| Error::Unavailable(e.to_string());
    if let Err(e) = queue.prepare().await {
        // Redis away: what is pushed waits in this node's memory meanwhile.
        tracing::warn!(error = %e, "queue not ready");
    }
    let queued: HashSet<_> = queue.queued_ids().await.map_err(unavailable)?;
    let missing: Vec<_> = dispatcher
        .store()
        .pending_ids()
        .await?
        .into_iter()
        .filter(|id| !queued.contains(id))
        .collect();
    queue.push(&missing).await.map_err(unavailable)?;
    if !missing.is_empty() {
        tracing::info!(
            queued = missing.len(),
            "pending packets put back on the queue"
        );
    }
    Ok(missing.len())
}

/// Reconciles on every Redis (re)connection and every `every`.
pub(super) async fn run<T: Clone>(
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
