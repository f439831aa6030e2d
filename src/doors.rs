//! One listener, three doors: native gRPC, gRPC-web (browsers) and the
//! JSON gateway. A request's path picks its door once: the bucket's own
//! service goes straight to tonic, through gRPC-web's translation and the
//! batch limit; everything else (health, reflection, REST, the fallback)
//! goes to one axum router.
//!
//! Invariant: the bucket's calls meet each layer once, unboxed. axum's
//! `Router::layer` wraps every route in a boxed service that is cloned and
//! driven by a boxed future on each call, so the edge, gRPC-web and the
//! batch limit stacked that way cost a box, a clone and a future each per
//! call, on every packet. The edge wraps the doors (at the server), and
//! the bucket's service is not a route at all.
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use http::Request;
use tower::{Layer, Service};

use crate::edge::batch_limit::{BatchLimit, BatchLimitLayer};
use crate::grpc::BucketGrpc;
use crate::proto::{self, bucket::v1::bucket_service_server::BucketServiceServer};

type BucketDoor = tonic_web::GrpcWebService<BatchLimit<BucketServiceServer<BucketGrpc>>>;

#[derive(Clone)]
pub struct Doors {
    bucket: BucketDoor,
    rest: axum::Router,
}

impl Doors {
    /// `rest` answers every path but the bucket service's.
    pub fn new(
        bucket: BucketServiceServer<BucketGrpc>,
        max_batch: usize,
        rest: axum::Router,
    ) -> Doors {
        Doors {
            bucket: tonic_web::GrpcWebLayer::new()
                .layer(BatchLimitLayer::new(max_batch).layer(bucket)),
            rest,
        }
    }
}

impl Service<Request<tonic::body::Body>> for Doors {
    type Response = Response;
    type Error = Infallible;
    type Future = DoorFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready (tonic's generated servers and axum's
        // router are); asked anyway, so the one called was made ready.
        ready!(Service::<Request<tonic::body::Body>>::poll_ready(
            &mut self.bucket,
            cx
        ))?;
        Service::<Request<tonic::body::Body>>::poll_ready(&mut self.rest, cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> DoorFuture {
        if proto::bucket_method(request.uri().path()).is_some() {
            DoorFuture::Bucket {
                future: self.bucket.call(request),
            }
        } else {
            DoorFuture::Rest {
                future: self.rest.call(request),
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = DoorProj]
    pub enum DoorFuture {
        Bucket { #[pin] future: <BucketDoor as Service<Request<tonic::body::Body>>>::Future },
        Rest { #[pin] future: RouteFuture<Infallible> },
    }
}

impl Future for DoorFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            DoorProj::Bucket { future } => future.poll(cx).map_ok(|r| r.map(Body::new)),
            DoorProj::Rest { future } => future.poll(cx),
        }
    }
}
