//! The PRANA bucket's client: what the Karma Tracker (or any other
//! service) depends on, instead of the server crate. The generated gRPC
//! client and messages ([`pb`]), a connection with an optional bearer token
//! ([`connect`]), and [`Marker`], which records outcomes with
//! MarkProcessedBatch as fast as the bucket takes them.
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
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

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
