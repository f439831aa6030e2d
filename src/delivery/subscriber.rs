//! One StreamPending call: take, lease, send; never more than
//! `max_in_flight` unmarked packets on the stream.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::dispatcher::Dispatcher;
use super::{Delivery, SubscribeOptions};
use crate::error::Error;

/// Pause after the store or queue failed, before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

pub(super) struct Subscriber {
    pub dispatcher: Arc<Dispatcher>,
    pub owner: String,
    pub options: SubscribeOptions,
    pub out: mpsc::Sender<Result<Delivery, Error>>,
    pub settled: mpsc::UnboundedReceiver<Uuid>,
    pub in_flight: Arc<AtomicU32>,
    pub shutdown: CancellationToken,
}

impl Subscriber {
    pub async fn run(mut self) {
        // Packets sent and not yet marked, with when their lease ends.
        let mut held: HashMap<Uuid, Instant> = HashMap::new();
        loop {
            let now = Instant::now();
            held.retain(|_, expires| *expires > now);
            self.in_flight.store(held.len() as u32, Ordering::Relaxed);
            let free = (self.options.max_in_flight as usize).saturating_sub(held.len());
            let next_expiry = held.values().min().copied();

            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    let _ = self.out.try_send(Err(Error::Unavailable(
                        "the bucket is shutting down; reconnect".into(),
                    )));
                    break;
                }
                _ = self.out.closed() => break,
                Some(id) = self.settled.recv() => {
                    held.remove(&id);
                }
                _ = tokio::time::sleep_until(next_expiry.unwrap_or(now)), if next_expiry.is_some() => {}
                taken = self.dispatcher.queue().take(free), if free > 0 => match taken {
                    Ok(ids) => {
                        if !self.deliver(ids, &mut held).await {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(owner = %self.owner, error = %e, "queue unavailable");
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                },
            }
        }
        self.dispatcher.release_owner(&self.owner).await;
    }

    /// Leases and sends `ids`; false when the stream is gone.
    async fn deliver(&mut self, ids: Vec<Uuid>, held: &mut HashMap<Uuid, Instant>) -> bool {
        let deliveries = match self
            .dispatcher
            .lease(ids, self.owner.clone(), self.options.lease)
            .await
        {
            Ok(deliveries) => deliveries,
            Err(e) => {
                tracing::warn!(owner = %self.owner, error = %e, "could not lease packets");
                tokio::time::sleep(RETRY_AFTER).await;
                return true;
            }
        };
        let expires = Instant::now() + self.options.lease;
        for delivery in deliveries {
            held.insert(delivery.stored.packet.packet_id, expires);
            if self.out.send(Ok(delivery)).await.is_err() {
                return false;
            }
        }
        true
    }
}
