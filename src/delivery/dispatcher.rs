//! The dispatcher: which subscribers this node has, and what they hold.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::subscriber::Subscriber;
use super::{ConsumerInfo, Delivery, SubscribeOptions, sweeper};
use crate::error::Error;
use crate::queue::Queue;
use crate::store::{Released, Store, StoredPacket};

/// The node part of a lease owner `consumer@node#stream`.
fn owner_node(owner: &str) -> Option<&str> {
    let (_, rest) = owner.rsplit_once('@')?;
    Some(rest.split_once('#').map_or(rest, |(node, _)| node))
}

pub struct Dispatcher {
    store: Store,
    queue: Arc<dyn Queue>,
    /// Distinguishes this process's lease owners from other nodes'.
    node: String,
    max_deliveries: u32,
    subscribers: Mutex<HashMap<String, Entry>>,
    next_stream: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

struct Entry {
    consumer: String,
    max_in_flight: u32,
    connected_at: DateTime<Utc>,
    in_flight: Arc<AtomicU32>,
    settled: mpsc::UnboundedSender<Uuid>,
}

/// The receiving end of a subscription: deliveries, then (at shutdown) an
/// error saying why the stream ends.
pub type Subscription = mpsc::Receiver<Result<Delivery, Error>>;

impl Dispatcher {
    /// `node` names this process in lease owners and in the Redis group.
    pub fn new(
        store: Store,
        queue: Arc<dyn Queue>,
        node: String,
        max_deliveries: u32,
    ) -> Arc<Self> {
        Arc::new(Dispatcher {
            store,
            queue,
            node,
            max_deliveries: max_deliveries.max(1),
            subscribers: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Starts the lease sweeper, and listens for lease ends on other nodes.
    pub fn start(self: &Arc<Self>, sweep_interval: Duration) {
        self.tasks.spawn(sweeper::run(
            self.clone(),
            sweep_interval,
            self.shutdown.clone(),
        ));
        if let Some(mut events) = self.queue.settled_events() {
            let dispatcher = self.clone();
            let shutdown = self.shutdown.clone();
            self.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        event = events.recv() => match event {
                            Ok((owner, id)) => {
                                dispatcher.settle_local(&owner, id);
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            });
        }
    }

    /// Starts reconciling the queue with the database on every Redis
    /// (re)connection and every `every`.
    pub fn start_reconciler<T: Clone + Send + 'static>(
        self: &Arc<Self>,
        connected: tokio::sync::broadcast::Receiver<T>,
        every: Duration,
    ) {
        self.tasks.spawn(super::reconciler::run(
            self.clone(),
            connected,
            every,
            self.shutdown.clone(),
        ));
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    /// Tells every stream and the sweeper to end, without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Ends every stream (releasing its leases) and the sweeper, and waits.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    pub fn subscribe(self: &Arc<Self>, options: SubscribeOptions) -> Subscription {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let owner = format!("{}@{}#{stream}", options.consumer, self.node);
        let (out_tx, out_rx) = mpsc::channel(options.max_in_flight as usize + 1);
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        let in_flight = Arc::new(AtomicU32::new(0));
        self.lock().insert(
            owner.clone(),
            Entry {
                consumer: options.consumer.clone(),
                max_in_flight: options.max_in_flight,
                connected_at: Utc::now(),
                in_flight: in_flight.clone(),
                settled: settled_tx,
            },
        );
        tracing::info!(%owner, max_in_flight = options.max_in_flight, lease_s = options.lease.as_secs(), "subscriber connected");
        metrics::gauge!("bucket_consumers_connected").increment(1.0);
        let subscriber = Subscriber {
            dispatcher: self.clone(),
            owner,
            options,
            out: out_tx,
            settled: settled_rx,
            in_flight,
            shutdown: self.shutdown.clone(),
        };
        self.tasks.spawn(subscriber.run());
        out_rx
    }

    /// Leases up to `limit` queued packets at once, without a stream: the
    /// JSON gateway's poll. They come back if not marked within `lease`.
    pub async fn lease_now(&self, limit: usize, lease: Duration) -> Result<Vec<Delivery>, Error> {
        let ids = self
            .queue
            .try_take(limit)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let owner = format!("poll@{}", self.node);
        self.lease(ids, owner, lease).await
    }

    /// Leases `ids` (taken off the queue) to `owner`. On failure the ids go
    /// back on the queue, so nothing taken is forgotten.
    pub(super) async fn lease(
        &self,
        ids: Vec<Uuid>,
        owner: String,
        lease: Duration,
    ) -> Result<Vec<Delivery>, Error> {
        let expires_at = Utc::now() + lease;
        match self.store.lease(ids.clone(), owner, expires_at).await {
            Ok(rows) => {
                let redelivered = rows.iter().filter(|r| r.delivery_attempts > 1).count();
                metrics::counter!("bucket_deliveries_total").increment(rows.len() as u64);
                metrics::counter!("bucket_redeliveries_total").increment(redelivered as u64);
                Ok(rows
                    .into_iter()
                    .map(|stored: StoredPacket| Delivery {
                        stored,
                        lease_expires_at: expires_at,
                    })
                    .collect())
            }
            Err(e) => {
                self.requeue(&ids).await;
                Err(e.into())
            }
        }
    }

    /// A packet's lease ended by MarkProcessed: free the holder's slot,
    /// here or, through the queue, on the node that holds it.
    pub async fn settled(&self, lease_owner: &str, packet_id: Uuid) {
        if !self.settle_local(lease_owner, packet_id) && owner_node(lease_owner) != Some(&self.node)
        {
            self.queue.publish_settled(lease_owner, packet_id).await;
        }
    }

    fn settle_local(&self, lease_owner: &str, packet_id: Uuid) -> bool {
        match self.lock().get(lease_owner) {
            Some(entry) => entry.settled.send(packet_id).is_ok(),
            None => false,
        }
    }

    /// Ends `owner`'s leases now and queues what is pending again.
    pub(super) async fn release_owner(&self, owner: &str) {
        if let Some(entry) = self.lock().remove(owner) {
            metrics::gauge!("bucket_consumers_connected").decrement(1.0);
            tracing::info!(%owner, consumer = %entry.consumer, "subscriber disconnected");
        }
        match self
            .store
            .release_owner(owner.to_owned(), self.max_deliveries)
            .await
        {
            Ok(released) => self.requeue_released(&released).await,
            // Its leases still end, at their expiry, through the sweeper.
            Err(e) => tracing::warn!(%owner, error = %e, "could not release leases"),
        }
    }

    /// Ends expired leases and queues what is pending again.
    pub(super) async fn expire_leases(&self) -> Result<(), Error> {
        let released = self
            .store
            .expire_leases(Utc::now(), self.max_deliveries)
            .await?;
        if !released.is_empty() {
            tracing::debug!(count = released.len(), "leases expired");
        }
        self.requeue_released(&released).await;
        Ok(())
    }

    async fn requeue_released(&self, released: &[Released]) {
        let mut pending = Vec::with_capacity(released.len());
        for r in released {
            match r.status {
                crate::domain::DeliveryStatus::DeadLetter => {
                    metrics::counter!("bucket_dead_letters_total").increment(1);
                    tracing::warn!(packet_id = %r.packet_id, "packet dead-lettered");
                }
                _ => pending.push(r.packet_id),
            }
        }
        self.requeue(&pending).await;
    }

    pub async fn requeue(&self, ids: &[Uuid]) {
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.queue.push(ids).await {
            // The rows stay pending in the database; the rebuild finds them.
            tracing::warn!(error = %e, count = ids.len(), "could not queue packets");
        }
    }

    pub(super) fn queue(&self) -> &dyn Queue {
        self.queue.as_ref()
    }

    pub fn consumers(&self) -> Vec<ConsumerInfo> {
        let mut out: Vec<ConsumerInfo> = self
            .lock()
            .values()
            .map(|e| ConsumerInfo {
                consumer: e.consumer.clone(),
                in_flight: e.in_flight.load(Ordering::Relaxed),
                max_in_flight: e.max_in_flight,
                connected_at: e.connected_at,
            })
            .collect();
        out.sort_by_key(|c| c.connected_at);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.subscribers.lock().expect("subscribers lock poisoned")
    }
}
