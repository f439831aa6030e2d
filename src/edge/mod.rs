//! The edge: what every request meets before any handler, through every
//! door (gRPC, gRPC-web, REST). `connections` accepts and holds the
//! connections within their limits; `batch_limit` refuses a gRPC list over
//! the batch limit before it is decoded; and this module's layer gives each
//! request its id (on its log lines too: `telemetry::request`), lets only
//! the right callers through (`auth`), holds a runaway client to the ingest
//! rate (`limits`), marks the connection busy until the answer ends, and
//! counts and times the answer by method.
//!
//! One hand-written service instead of a middleware per concern: each
//! `axum::middleware::from_fn` clones the inner router and boxes a future
//! per call, and with three of them the layers cost ~17 µs of CPU per call
//! (a third of the runtime's work per packet at 5,000 packets/s; measured
//! in BENCHMARKS.md).
pub mod auth;
pub mod batch_limit;
pub mod connections;
pub mod limits;
pub mod request_id;
pub mod tls;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use http_body::Frame;
use http_body_util::BodyExt;
use metrics::{Counter, Histogram};
use tower::{Layer, Service};

use self::auth::{Access, Origin, Role, is_grpc, refuse, required_role};
use self::limits::{Client, Limits, too_large_is_resource_exhausted};
use self::request_id::Method;
use crate::error::Error;
use crate::telemetry::request;

#[derive(Clone)]
pub struct EdgeLayer {
    shared: Arc<Shared>,
}

struct Shared {
    access: Arc<Access>,
    limits: Limits,
    metrics: MethodMetrics,
}

impl EdgeLayer {
    /// Metric handles are taken from the recorder installed now, so build
    /// this after `crate::telemetry::metrics()`.
    pub fn new(access: Arc<Access>, limits: Limits) -> EdgeLayer {
        EdgeLayer {
            shared: Arc::new(Shared {
                access,
                limits,
                metrics: MethodMetrics::new(),
            }),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl Shared {
    /// Why this caller may not make this call now, if it may not.
    fn admit<B>(&self, method: Method, request: &mut Request<B>) -> Result<(), Error> {
        // CORS preflights carry no token.
        let required = if request.method() == axum::http::Method::OPTIONS {
            None
        } else {
            required_role(method)
        };
        let peer = request
            .extensions()
            .get::<connections::Peer>()
            .and_then(|p| p.addr)
            .map(|a| a.ip());
        let caller = self
            .access
            .decide(required, request.headers(), Origin::of(peer))?;
        if required == Some(Role::Ingest) && self.limits.ingest_rate.is_some() {
            let client = Client::of(self.access.verified(request.headers()), peer);
            self.limits.admit_ingest(client)?;
        }
        request.extensions_mut().insert(caller);
        Ok(())
    }
}

impl<S, B> Service<Request<B>> for Edge<S>
where
    S: Service<Request<B>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = Method::of(request.uri().path());
        let id = request_id::given(request.headers()).unwrap_or_else(request_id::new_id);
        let grpc = is_grpc(request.headers());
        // The connection is busy until this answer's body ends.
        let under_way = request
            .extensions()
            .get::<connections::Peer>()
            .map(connections::Peer::request);
        let tag = Arc::new(request::Tag {
            id,
            method: method.label(),
        });
        let admitted = {
            let _entered = request::enter(&tag);
            self.shared.admit(method, &mut request)
        };
        let state = match admitted {
            Err(error) => State::Refused {
                response: Some(refuse(request.headers(), error)),
            },
            Ok(()) => {
                // The clone that was made ready is the one that is called.
                let ready = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, ready);
                State::Called {
                    future: inner.call(request),
                }
            }
        };
        EdgeFuture {
            state,
            done: Some(Done {
                under_way,
                tag,
                method,
                grpc,
                started,
                shared: self.shared.clone(),
            }),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct EdgeFuture<F> {
        #[pin]
        state: State<F>,
        done: Option<Done>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Refused { response: Option<Response> },
        Called { #[pin] future: F },
    }
}

/// What the answer needs once it comes.
struct Done {
    under_way: Option<connections::UnderWay>,
    /// The request's id and method, for its log lines.
    tag: Arc<request::Tag>,
    method: Method,
    grpc: bool,
    started: Instant,
    shared: Arc<Shared>,
}

impl<F> std::future::Future for EdgeFuture<F>
where
    F: std::future::Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.state.project() {
            StateProj::Refused { response } => response.take().expect("polled after completion"),
            StateProj::Called { future } => {
                let tag = &this.done.as_ref().expect("polled after completion").tag;
                let _entered = request::enter(tag);
                match future.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(response)) => response,
                }
            }
        };
        let done = this.done.take().expect("polled after completion");
        Poll::Ready(Ok(done.finish(response)))
    }
}

impl Done {
    fn finish(self, mut response: Response) -> Response {
        // Nothing else holds the tag once the request is answered.
        let id = Arc::try_unwrap(self.tag).map_or_else(|tag| tag.id.clone(), |tag| tag.id);
        response.headers_mut().insert(request_id::HEADER, id);
        if self.grpc {
            too_large_is_resource_exhausted(response.headers_mut());
            // An oversized message after the first can only come on a
            // stream of requests; the status then rides in the trailers.
            // Every other call's request is read before it answers, so an
            // oversized one is answered trailers-only (the headers above).
            if self.method.streams_requests() {
                response = response.map(|body| {
                    Body::new(body.map_frame(|frame| match frame.into_trailers() {
                        Ok(mut trailers) => {
                            too_large_is_resource_exhausted(&mut trailers);
                            Frame::trailers(trailers)
                        }
                        Err(frame) => frame,
                    }))
                });
            }
        }
        let metrics = &self.shared.metrics;
        metrics.count(self.method, Outcome::of(&response, self.grpc));
        // For a stream, the time to its first answer (its headers).
        metrics.histograms[self.method.index()].record(self.started.elapsed().as_secs_f64());
        match self.under_way {
            Some(under_way) => response.map(|body| {
                Body::new(Busy {
                    body,
                    _under_way: under_way,
                })
            }),
            None => response,
        }
    }
}

pin_project_lite::pin_project! {
    /// An answer's body, holding its connection busy until it ends.
    struct Busy {
        #[pin]
        body: Body,
        _under_way: connections::UnderWay,
    }
}

impl http_body::Body for Busy {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The outcome to count: the gRPC status when the answer carries it in
/// its headers (every refusal does), else OK for gRPC, else the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Grpc(tonic::Code),
    Http(u16),
}

impl Outcome {
    fn of(response: &Response, grpc: bool) -> Outcome {
        let in_headers = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok());
        match in_headers {
            Some(code) => Outcome::Grpc(tonic::Code::from_i32(code)),
            None if grpc && response.status().is_success() => Outcome::Grpc(tonic::Code::Ok),
            None => Outcome::Http(response.status().as_u16()),
        }
    }

    fn label(self) -> String {
        match self {
            Outcome::Grpc(code) => format!("{code:?}"),
            Outcome::Http(status) => status.to_string(),
        }
    }
}

/// `bucket_requests_total{method, code}` and `bucket_request_seconds{method}`,
/// their handles made once: `metrics::counter!` with labels builds the key
/// and looks it up in the registry on every call.
struct MethodMetrics {
    histograms: Vec<Histogram>,
    /// Per method, per gRPC code (0..=16): made on first use, so /metrics
    /// lists only outcomes that happened.
    grpc: Vec<[OnceLock<Counter>; 17]>,
    /// HTTP statuses are few but open-ended.
    http: Mutex<std::collections::HashMap<(Method, u16), Counter>>,
}

impl MethodMetrics {
    fn new() -> MethodMetrics {
        MethodMetrics {
            histograms: (0..Method::COUNT)
                .map(|i| {
                    metrics::histogram!("bucket_request_seconds", "method" => Method::at(i).label())
                })
                .collect(),
            grpc: (0..Method::COUNT)
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
            http: Mutex::default(),
        }
    }

    fn counter(method: Method, outcome: Outcome) -> Counter {
        metrics::counter!(
            "bucket_requests_total",
            "method" => method.label(),
            "code" => outcome.label()
        )
    }

    fn count(&self, method: Method, outcome: Outcome) {
        match outcome {
            Outcome::Grpc(code) => self.grpc[method.index()][code as usize]
                .get_or_init(|| Self::counter(method, outcome))
                .increment(1),
            Outcome::Http(status) => self
                .http
                .lock()
                .expect("metrics lock poisoned")
                .entry((method, status))
                .or_insert_with(|| Self::counter(method, outcome))
                .increment(1),
        }
    }
}
