//! The PRANA bucket's client: what the Karma Tracker (or any other
//! service) depends on, instead of the server crate. The generated gRPC
//! client and messages ([`pb`]), a connection with an optional bearer token
//! ([`connect`]), [`consume`], which takes deliveries and sends their marks
//! on one Consume stream (the cheapest way to consume), and [`Marker`],
//! which records outcomes with MarkProcessedBatch for StreamPending
//! subscribers.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use bucket_client::{connect, consume, pb, Received};
//! let mut client = connect("http://127.0.0.1:3000", None).await?;
//! let settings = pb::ConsumeSettings { consumer: "karma".into(), max_in_flight: 256, lease_seconds: 30 };
//! let (mut consumer, acker) = consume(&mut client, settings).await?;
//! while let Some(received) = consumer.next().await? {
//!     match received {
//!         Received::Delivery(delivery) => acker.ack(&delivery, Vec::new()).await?,
//!         Received::Answer(answer) => assert_eq!(answer.rejected, 0),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! With StreamPending and MarkProcessedBatch instead:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use bucket_client::{connect, pb, Marker};
//! let mut client = connect("http://127.0.0.1:3000", None).await?;
//! let mut stream = client
//!     .stream_pending(pb::StreamPendingRequest { consumer: "karma".into(), max_in_flight: 256, lease_seconds: 30 })
//!     .await?
//!     .into_inner();
//! let (marker, marking) = Marker::spawn(client.clone(), 256);
//! while let Some(delivery) = stream.message().await? {
//!     let packet = delivery.packet.expect("a delivery carries its packet");
//!     marker.mark(pb::MarkProcessedRequest { packet_id: packet.packet_id, success: true, ..Default::default() }).await?;
//! }
//! drop(marker);
//! marking.await??;
//! # Ok(()) }
//! ```
use std::collections::VecDeque;
use std::time::Duration;

use futures::{Stream, StreamExt, future, stream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

/// The contract's messages and the generated client (`bucket.v1`).
pub mod pb {
    tonic::include_proto!("bucket.v1");
}

/// The client [`connect`] gives: every call carries the token, if any.
pub type Client =
    pb::bucket_service_client::BucketServiceClient<InterceptedService<Channel, Bearer>>;

/// The bucket's default limit of marks per MarkProcessedBatch.
pub const MAX_BATCH: usize = 500;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The URL or the connection.
    Transport(tonic::transport::Error),
    /// A token that cannot be sent as a header.
    Token,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "connecting to the bucket: {e}"),
            Self::Token => f.write_str("the token is not a valid header value"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Transport(e) => Some(e),
            Self::Token => None,
        }
    }
}

/// Connects to the bucket at `url` (`http://…` or `https://…`), with
/// TCP_NODELAY (a mark must not wait for a delayed ACK) and a token for
/// every call if given (a role's token: consumer, ingest or admin).
pub async fn connect(url: &str, token: Option<&str>) -> Result<Client, ConnectError> {
    let bearer = match token {
        None => Bearer(None),
        Some(t) => Bearer(Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| ConnectError::Token)?,
        )),
    };
    let channel = Endpoint::from_shared(url.to_owned())
        .map_err(ConnectError::Transport)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(ConnectError::Transport)?;
    Ok(pb::bucket_service_client::BucketServiceClient::with_interceptor(channel, bearer))
}

/// A JSON object as a protobuf Struct (karma actions, raw signals).
pub fn json_to_struct(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match value {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        J::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Records outcomes with MarkProcessedBatch from a task of its own: each
/// batch carries as many marks as piled up while the previous one was
/// answered (up to [`MAX_BATCH`]), with no timer, so a lone mark goes at
/// once. The fastest correct way for a consumer to mark what it receives.
#[derive(Clone)]
pub struct Marker {
    outcomes: mpsc::Sender<pb::MarkProcessedRequest>,
}

/// The marker task stopped (its call failed): reconnect.
#[derive(Debug)]
pub struct MarkerStopped;

impl std::fmt::Display for MarkerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the marker stopped (its MarkProcessedBatch call failed)")
    }
}

impl std::error::Error for MarkerStopped {}

impl Marker {
    /// Starts the marker; `room` marks may wait (use the stream's
    /// max_in_flight). The task ends when every [`Marker`] is dropped (after
    /// sending what waits) or when a call fails (its error).
    pub fn spawn(client: Client, room: usize) -> (Marker, JoinHandle<Result<(), Status>>) {
        let (outcomes, waiting) = mpsc::channel(room.max(1));
        (
            Marker { outcomes },
            tokio::spawn(mark_in_batches(client, waiting)),
        )
    }

    /// Queues one outcome; waits only when `room` marks already wait.
    pub async fn mark(&self, outcome: pb::MarkProcessedRequest) -> Result<(), MarkerStopped> {
        self.outcomes.send(outcome).await.map_err(|_| MarkerStopped)
    }
}

async fn mark_in_batches(
    mut client: Client,
    mut outcomes: mpsc::Receiver<pb::MarkProcessedRequest>,
) -> Result<(), Status> {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while outcomes.recv_many(&mut batch, MAX_BATCH).await > 0 {
        client
            .mark_processed_batch(pb::MarkProcessedBatchRequest {
                marks: std::mem::take(&mut batch),
            })
            .await?;
        // A refused item's packet comes back when its lease ends: nothing
        // to redo here.
    }
    Ok(())
}

/// What a [`Consumer`] receives.
// Deliveries are nearly every item and move once, from the response to
// the caller: boxing them would cost an allocation per packet to save
// space in the rarer answers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Received {
    /// A packet leased to this stream until its `lease_expires_at`.
    Delivery(pb::StreamPendingResponse),
    /// The answer to one request the [`Acker`]s sent (in order; the first
    /// answers the subscription itself): each mark's, nack's and
    /// extension's result.
    Answer(pb::ConsumeAnswer),
}

/// The receiving end of a Consume stream: deliveries and answers.
pub struct Consumer {
    responses: Streaming<pb::ConsumeResponse>,
    /// Of the last response: deliveries, then its answer.
    ready: VecDeque<Received>,
}

impl Consumer {
    /// The next delivery or answer; `None` once the stream ended cleanly
    /// (every [`Acker`] was dropped and the bucket answered what they sent).
    /// An error ends the stream: reconnect (leases still held come back to
    /// some consumer).
    pub async fn next(&mut self) -> Result<Option<Received>, Status> {
        loop {
            if let Some(received) = self.ready.pop_front() {
                return Ok(Some(received));
            }
            let Some(response) = self.responses.message().await? else {
                return Ok(None);
            };
            self.ready
                .extend(response.deliveries.into_iter().map(Received::Delivery));
            self.ready.extend(response.answer.map(Received::Answer));
        }
    }
}

/// One thing an [`Acker`] sends.
enum Settle {
    Mark(pb::ConsumeMark),
    Nack(String),
    Extend(String, u32),
}

/// The sending end of a Consume stream: marks, nacks and extensions, sent
/// as requests of as many items as piled up while the previous one was on
/// its way (no timer: a lone mark goes at once). Clone it freely; the
/// stream's request side ends when every clone is dropped.
#[derive(Clone)]
pub struct Acker {
    items: mpsc::Sender<Settle>,
}

/// The Consume stream is gone (it ended or failed): reconnect.
#[derive(Debug)]
pub struct ConsumeStopped;

impl std::fmt::Display for ConsumeStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the Consume stream ended")
    }
}

impl std::error::Error for ConsumeStopped {}

impl Acker {
    /// Records a delivery's outcome (as [`pb::ConsumeMark`] says it).
    pub async fn mark(&self, mark: pb::ConsumeMark) -> Result<(), ConsumeStopped> {
        self.send(Settle::Mark(mark)).await
    }

    /// Marks a delivery processed, with the karma actions taken for it.
    pub async fn ack(
        &self,
        delivery: &pb::StreamPendingResponse,
        karma_actions: Vec<prost_types::Struct>,
    ) -> Result<(), ConsumeStopped> {
        self.mark(pb::ConsumeMark {
            lease_token: delivery.lease_token.clone(),
            success: true,
            karma_actions,
            error_message: String::new(),
        })
        .await
    }

    /// Hands a delivery back now: it goes out again, to any consumer.
    pub async fn nack(&self, lease_token: &str) -> Result<(), ConsumeStopped> {
        self.send(Settle::Nack(lease_token.to_owned())).await
    }

    /// Keeps a delivery leased for `lease_seconds` more from now (0: the
    /// stream's lease length).
    pub async fn extend(
        &self,
        lease_token: &str,
        lease_seconds: u32,
    ) -> Result<(), ConsumeStopped> {
        self.send(Settle::Extend(lease_token.to_owned(), lease_seconds))
            .await
    }

    async fn send(&self, item: Settle) -> Result<(), ConsumeStopped> {
        self.items.send(item).await.map_err(|_| ConsumeStopped)
    }
}

/// Opens a Consume stream with `settings`. The [`Acker`] may wait for room
/// only when more than twice `max_in_flight` items are unsent, which one
/// mark per delivery never reaches.
pub async fn consume(
    client: &mut Client,
    settings: pb::ConsumeSettings,
) -> Result<(Consumer, Acker), Status> {
    let room = 2 * (settings.max_in_flight.max(64) as usize);
    let (items, waiting) = mpsc::channel(room);
    let first = pb::ConsumeRequest {
        settings: Some(settings),
        ..Default::default()
    };
    let requests = stream::once(future::ready(first)).chain(requests(waiting));
    let responses = client.consume(requests).await?.into_inner();
    Ok((
        Consumer {
            responses,
            ready: VecDeque::new(),
        },
        Acker { items },
    ))
}

/// The requests after the first: whatever waits, up to [`MAX_BATCH`]
/// items, one extension length per request.
fn requests(waiting: mpsc::Receiver<Settle>) -> impl Stream<Item = pb::ConsumeRequest> {
    stream::unfold(
        (waiting, VecDeque::new()),
        |(mut waiting, mut pending)| async move {
            if pending.is_empty() {
                let mut read = Vec::with_capacity(MAX_BATCH);
                if waiting.recv_many(&mut read, MAX_BATCH).await == 0 {
                    return None;
                }
                pending.extend(read);
            }
            let mut request = pb::ConsumeRequest::default();
            let mut seconds = None;
            let mut later = VecDeque::new();
            for item in pending.drain(..) {
                match item {
                    Settle::Mark(mark) => request.marks.push(mark),
                    Settle::Nack(token) => request.nack_lease_tokens.push(token),
                    Settle::Extend(token, s) if seconds.is_none_or(|x| x == s) => {
                        seconds = Some(s);
                        request.extend_lease_tokens.push(token);
                    }
                    other => later.push_back(other),
                }
            }
            request.extend_lease_seconds = seconds.unwrap_or(0);
            Some((request, (waiting, later)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the requests after the first carry, for items sent in one go.
    async fn requests_for(items: Vec<Settle>) -> Vec<pb::ConsumeRequest> {
        let (tx, rx) = mpsc::channel(items.len().max(1));
        for item in items {
            tx.send(item).await.unwrap();
        }
        drop(tx);
        requests(rx).collect().await
    }

    fn mark(token: &str) -> Settle {
        Settle::Mark(pb::ConsumeMark {
            lease_token: token.into(),
            success: true,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn what_waits_goes_in_one_request_with_one_extension_length_each() {
        let sent = requests_for(vec![
            mark("a"),
            Settle::Extend("b".into(), 60),
            Settle::Nack("c".into()),
            Settle::Extend("d".into(), 0),
            mark("e"),
            Settle::Extend("f".into(), 60),
        ])
        .await;
        assert_eq!(sent.len(), 2, "{sent:?}");
        let tokens = |marks: &[pb::ConsumeMark]| {
            marks
                .iter()
                .map(|m| m.lease_token.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(tokens(&sent[0].marks), ["a", "e"]);
        assert_eq!(sent[0].nack_lease_tokens, ["c"]);
        assert_eq!(sent[0].extend_lease_tokens, ["b", "f"]);
        assert_eq!(sent[0].extend_lease_seconds, 60);
        assert!(sent[0].settings.is_none());
        assert!(sent[1].marks.is_empty());
        assert_eq!(sent[1].extend_lease_tokens, ["d"]);
        assert_eq!(sent[1].extend_lease_seconds, 0);
    }

    #[tokio::test]
    async fn a_request_holds_at_most_the_batch_limit() {
        let items = (0..MAX_BATCH + 1).map(|i| mark(&i.to_string())).collect();
        let sizes: Vec<usize> = requests_for(items)
            .await
            .iter()
            .map(|r| r.marks.len())
            .collect();
        assert_eq!(sizes, [MAX_BATCH, 1]);
    }
}
