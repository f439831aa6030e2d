//! `floor`: the bucket's contract served with nothing behind it, to measure
//! what the network path alone costs per packet (issue 15's floor).
//!
//! The same generated `BucketService` through tonic on HTTP/2 with
//! TCP_NODELAY, as the bucket serves it, but no store, no record log, no
//! edge layers (auth, limits, metrics, CORS, gRPC-web), no dispatcher: an
//! Ingest is converted to a `Packet`, kept in a queue in memory and
//! answered; a stream takes packets from the queue while it has fewer than
//! `max_in_flight` unmarked; a mark (MarkProcessed, or on a Consume stream)
//! frees the slot and answers ok. Nothing is durable and nothing is
//! redelivered: it is a measuring instrument, not a bucket. The methods the
//! benchmark does not call answer UNIMPLEMENTED.
//!
//! Run it as its own process (`bucket-bench floor --listen ADDR`) and point
//! `e2e --url http://ADDR --pid PID` at it: the server CPU, syscalls and
//! bytes that e2e reports are then the protocol's share of the bucket's.
//!
//! With `--durable DIR` ([`durable`]) it also does what the bucket must do
//! for each packet and nothing more: the packet and the marks synced to a
//! log before they are answered, and the packets in indexed SQLite tables
//! once a second.
mod durable;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_server::{BucketService, BucketServiceServer};
use futures::{Stream, StreamExt, stream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Request, Response, Status, Streaming};

type Deliveries = Pin<Box<dyn Stream<Item = Result<pb::StreamPendingResponse, Status>> + Send>>;
type Consuming = Pin<Box<dyn Stream<Item = Result<pb::ConsumeResponse, Status>> + Send>>;

/// Serves until the process is stopped.
pub async fn serve(listen: SocketAddr, durable: Option<(PathBuf, Duration)>) -> Result<()> {
    let durable = match durable {
        Some((dir, wait)) => Some(Arc::new(durable::Durable::start(&dir, wait)?)),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    eprintln!("floor: the contract with nothing behind it, on {listen}");
    tonic::transport::Server::builder()
        .add_service(BucketServiceServer::new(Floor {
            shared: Arc::default(),
            durable,
        }))
        .serve_with_incoming(incoming)
        .await
        .context("serving")
}

struct Floor {
    shared: Arc<Shared>,
    durable: Option<Arc<durable::Durable>>,
}

#[derive(Default)]
struct Shared {
    waiting: Mutex<VecDeque<pb::Packet>>,
    arrived: Notify,
    /// Delivered, not yet marked: the slot each holds on its stream.
    leased: Mutex<HashMap<String, OwnedSemaphorePermit>>,
    total: AtomicU64,
}

impl Shared {
    /// The next packet, once the stream has room for it.
    async fn next(&self, room: &Arc<Semaphore>) -> (pb::Packet, OwnedSemaphorePermit) {
        let permit = room.clone().acquire_owned().await.expect("never closed");
        loop {
            let notified = self.arrived.notified();
            if let Some(packet) = self.waiting.lock().expect("waiting lock").pop_front() {
                return (packet, permit);
            }
            notified.await;
        }
    }

    fn lease(&self, packet: pb::Packet, permit: OwnedSemaphorePermit) -> pb::StreamPendingResponse {
        let token = packet.packet_id.clone();
        self.leased
            .lock()
            .expect("leased lock")
            .insert(token.clone(), permit);
        pb::StreamPendingResponse {
            packet: Some(packet),
            delivery_attempt: 1,
            lease_expires_at: Some(now()),
            lease_token: token,
        }
    }

    fn mark(&self, packet_id: &str) -> pb::MarkProcessedResponse {
        let was = self.leased.lock().expect("leased lock").remove(packet_id);
        pb::MarkProcessedResponse {
            status: "ok".into(),
            message: "Packet marked as processed".into(),
            packet_id: packet_id.to_owned(),
            already_processed: was.is_none(),
        }
    }
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

fn packet(input: pb::PacketInput) -> pb::Packet {
    let packet_id = if input.packet_id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        input.packet_id
    };
    pb::Packet {
        packet_id,
        user_id: input.user_id,
        employee_id: input.employee_id,
        session_id: input.session_id,
        lesson_id: input.lesson_id,
        system_type: input.system_type,
        role: input.role,
        client_timestamp: input.timestamp,
        cognitive_state: input.cognitive_state,
        state: input.state,
        active_seconds: input.active_seconds,
        idle_seconds: input.idle_seconds,
        away_seconds: input.away_seconds,
        focus_score: input.focus_score,
        integrity_score: input.integrity_score.unwrap_or(1.0),
        raw_signals: input.raw_signals,
        received_at: Some(now()),
        ..Default::default()
    }
}

/// The answer to one Consume request: every mark recorded.
fn answer(shared: &Shared, request: &pb::ConsumeRequest) -> pb::ConsumeResponse {
    let marks: Vec<pb::ConsumeResult> = request
        .marks
        .iter()
        .enumerate()
        .map(|(i, m)| pb::ConsumeResult {
            index: i as u32,
            outcome: Some(pb::consume_result::Outcome::Marked(
                shared.mark(&m.lease_token),
            )),
            lease_ended: false,
        })
        .collect();
    let answer = pb::ConsumeAnswer {
        marked: marks.len() as u32,
        marks,
        ..Default::default()
    };
    pb::ConsumeResponse {
        deliveries: Vec::new(),
        answer: Some(answer),
    }
}

fn room(max_in_flight: u32) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(if max_in_flight == 0 {
        64
    } else {
        max_in_flight as usize
    }))
}

#[tonic::async_trait]
impl BucketService for Floor {
    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let input = request
            .into_inner()
            .packet
            .ok_or_else(|| Status::invalid_argument("packet is required"))?;
        let packet = packet(input);
        if let Some(durable) = &self.durable {
            durable.ingested(&packet).await;
        }
        let response = pb::IngestResponse {
            status: "ingested".into(),
            packet_id: packet.packet_id.clone(),
            received_at: packet.received_at,
            created: true,
        };
        self.shared
            .waiting
            .lock()
            .expect("waiting lock")
            .push_back(packet);
        self.shared.total.fetch_add(1, Ordering::Relaxed);
        self.shared.arrived.notify_one();
        Ok(Response::new(response))
    }

    async fn ingest_batch(
        &self,
        _: Request<pb::IngestBatchRequest>,
    ) -> Result<Response<pb::IngestBatchResponse>, Status> {
        Err(Status::unimplemented("floor: not measured"))
    }

    type StreamPendingStream = Deliveries;

    async fn stream_pending(
        &self,
        request: Request<pb::StreamPendingRequest>,
    ) -> Result<Response<Deliveries>, Status> {
        let room = room(request.into_inner().max_in_flight);
        let shared = self.shared.clone();
        let deliveries = stream::unfold((shared, room), |(shared, room)| async move {
            let (packet, permit) = shared.next(&room).await;
            let delivery = shared.lease(packet, permit);
            Some((Ok(delivery), (shared, room)))
        });
        Ok(Response::new(Box::pin(deliveries)))
    }

    async fn mark_processed(
        &self,
        request: Request<pb::MarkProcessedRequest>,
    ) -> Result<Response<pb::MarkProcessedResponse>, Status> {
        let packet_id = request.into_inner().packet_id;
        if let Some(durable) = &self.durable {
            let _ = durable.marks(vec![packet_id.clone()]).await;
        }
        Ok(Response::new(self.shared.mark(&packet_id)))
    }

    async fn mark_processed_batch(
        &self,
        _: Request<pb::MarkProcessedBatchRequest>,
    ) -> Result<Response<pb::MarkProcessedBatchResponse>, Status> {
        Err(Status::unimplemented("floor: not measured"))
    }

    async fn extend_lease(
        &self,
        _: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        Err(Status::unimplemented("floor: not measured"))
    }

    type ConsumeStream = Consuming;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Consuming>, Status> {
        let mut requests = request.into_inner();
        let first = requests
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("settings are required"))?;
        let room = room(first.settings.map_or(0, |s| s.max_in_flight));
        let (tx, rx) = mpsc::channel::<pb::ConsumeResponse>(64);
        // The first request's answer, then one per request, in order.
        let _ = tx
            .send(pb::ConsumeResponse {
                answer: Some(pb::ConsumeAnswer::default()),
                ..Default::default()
            })
            .await;
        let (shared, out) = (self.shared.clone(), tx.clone());
        let delivering = tokio::spawn(async move {
            loop {
                let (packet, permit) = shared.next(&room).await;
                let delivery = shared.lease(packet, permit);
                let message = pb::ConsumeResponse {
                    deliveries: vec![delivery],
                    answer: None,
                };
                if out.send(message).await.is_err() {
                    return;
                }
            }
        });
        let shared = self.shared.clone();
        match self.durable.clone() {
            None => {
                tokio::spawn(async move {
                    while let Ok(Some(request)) = requests.message().await {
                        if tx.send(answer(&shared, &request)).await.is_err() {
                            break;
                        }
                    }
                    delivering.abort();
                });
            }
            Some(durable) => {
                // Requests keep being read while their marks sync, so the
                // marks of several go in one block; answers go in order.
                let (synced_tx, mut synced_rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Ok(Some(request)) = requests.message().await {
                        let tokens = request.marks.iter().map(|m| m.lease_token.clone());
                        let synced = durable.marks(tokens.collect());
                        if synced_tx.send((synced, request)).is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((synced, request)) = synced_rx.recv().await {
                        let _ = synced.await;
                        if tx.send(answer(&shared, &request)).await.is_err() {
                            break;
                        }
                    }
                    delivering.abort();
                });
            }
        }
        let responses = stream::unfold(rx, |mut rx| async move {
            let message = rx.recv().await?;
            Some((Ok(message), rx))
        });
        Ok(Response::new(responses.boxed()))
    }

    async fn redrive(
        &self,
        _: Request<pb::RedriveRequest>,
    ) -> Result<Response<pb::RedriveResponse>, Status> {
        Err(Status::unimplemented("floor: not measured"))
    }

    async fn replay(
        &self,
        _: Request<pb::ReplayRequest>,
    ) -> Result<Response<pb::ReplayResponse>, Status> {
        Err(Status::unimplemented("floor: not measured"))
    }

    async fn user_packets(
        &self,
        _: Request<pb::UserPacketsRequest>,
    ) -> Result<Response<pb::UserPacketsResponse>, Status> {
        Err(Status::unimplemented("floor: not measured"))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            total_packets: self.shared.total.load(Ordering::Relaxed),
            ..Default::default()
        }))
    }
}
