//! BucketService: parse the request, call the application, map the answer.
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt, future, stream};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::auth::Caller;
use crate::bucket::Bucket;
use crate::error::Error;
use crate::proto::bucket::v1 as pb;
use crate::proto::bucket::v1::bucket_service_server::BucketService;
use crate::store::RequeueReason;

pub struct BucketGrpc {
    bucket: Arc<Bucket>,
}

impl BucketGrpc {
    pub fn new(bucket: Arc<Bucket>) -> Self {
        Self { bucket }
    }
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<pb::StreamPendingResponse, Status>> + Send>>;
type ConsumeStream = Pin<Box<dyn Stream<Item = Result<pb::ConsumeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl BucketService for BucketGrpc {
    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let packet = request
            .into_inner()
            .packet
            .ok_or_else(|| Error::invalid("packet", "packet is required"))?;
        let receipt = self
            .bucket
            .ingest(convert::draft(packet))
            .await
            .map_err(|e| e.prefixed("packet."))?;
        Ok(Response::new(convert::receipt(receipt)))
    }

    async fn ingest_batch(
        &self,
        request: Request<pb::IngestBatchRequest>,
    ) -> Result<Response<pb::IngestBatchResponse>, Status> {
        let drafts = request
            .into_inner()
            .packets
            .into_iter()
            .map(convert::draft)
            .collect();
        let results = self.bucket.ingest_batch(drafts).await?;
        let mut response = pb::IngestBatchResponse::default();
        for (index, result) in results.into_iter().enumerate() {
            let outcome = match result {
                Ok(receipt) => {
                    response.ingested += 1;
                    pb::ingest_batch_result::Outcome::Ingested(convert::receipt(receipt))
                }
                Err(e) => {
                    response.rejected += 1;
                    pb::ingest_batch_result::Outcome::Error(convert::ingest_error(&e))
                }
            };
            response.results.push(pb::IngestBatchResult {
                index: index as u32,
                outcome: Some(outcome),
            });
        }
        Ok(Response::new(response))
    }

    type StreamPendingStream = DeliveryStream;

    async fn stream_pending(
        &self,
        request: Request<pb::StreamPendingRequest>,
    ) -> Result<Response<Self::StreamPendingStream>, Status> {
        let req = request.into_inner();
        let subscription =
            self.bucket
                .subscribe(&req.consumer, req.max_in_flight, req.lease_seconds)?;
        let stream = subscription.map(|item| item.map(convert::delivery).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn mark_processed(
        &self,
        request: Request<pb::MarkProcessedRequest>,
    ) -> Result<Response<pb::MarkProcessedResponse>, Status> {
        let marked = self
            .bucket
            .mark_processed(convert::mark_request(request.into_inner()))
            .await?;
        Ok(Response::new(convert::marked(marked)))
    }

    async fn mark_processed_batch(
        &self,
        request: Request<pb::MarkProcessedBatchRequest>,
    ) -> Result<Response<pb::MarkProcessedBatchResponse>, Status> {
        let requests = request
            .into_inner()
            .marks
            .into_iter()
            .map(convert::mark_request)
            .collect();
        let results = self.bucket.mark_processed_batch(requests).await?;
        let mut response = pb::MarkProcessedBatchResponse::default();
        for (index, result) in results.into_iter().enumerate() {
            let outcome = match result {
                Ok(marked) => {
                    response.marked += 1;
                    pb::mark_processed_batch_result::Outcome::Marked(convert::marked(marked))
                }
                Err(e) => {
                    response.rejected += 1;
                    pb::mark_processed_batch_result::Outcome::Error(convert::ingest_error(&e))
                }
            };
            response.results.push(pb::MarkProcessedBatchResult {
                index: index as u32,
                outcome: Some(outcome),
            });
        }
        Ok(Response::new(response))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let req = request.into_inner();
        let results = self
            .bucket
            .extend_lease(&req.lease_tokens, req.lease_seconds)
            .await?;
        let mut response = pb::ExtendLeaseResponse::default();
        for (index, result) in results.into_iter().enumerate() {
            let outcome = match result {
                Ok((packet_id, change)) => {
                    response.extended += 1;
                    pb::extend_lease_result::Outcome::Extended(convert::extended_lease(
                        packet_id, change,
                    ))
                }
                Err(e) => {
                    response.rejected += 1;
                    pb::extend_lease_result::Outcome::Error(convert::ingest_error(&e))
                }
            };
            response.results.push(pb::ExtendLeaseResult {
                index: index as u32,
                outcome: Some(outcome),
            });
        }
        Ok(Response::new(response))
    }

    type ConsumeStream = ConsumeStream;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let mut inbound = request.into_inner();
        let mut first = inbound.message().await?.unwrap_or_default();
        let settings = first.settings.take().ok_or_else(|| {
            Error::invalid(
                "settings",
                "the first request of a Consume stream subscribes: settings is required",
            )
        })?;
        let first = convert::consume_request(first)?;
        // A transport error on the requests (a message over the size
        // limit, say) ends the answers with that same status, after what
        // was read before it is answered.
        let broken: Arc<Mutex<Option<Status>>> = Arc::default();
        let rest = inbound.scan(broken.clone(), |broken, message| {
            future::ready(match message {
                Ok(message) => Some(convert::consume_request(message)),
                Err(status) => {
                    *broken.lock().expect("consume lock poisoned") = Some(status);
                    None
                }
            })
        });
        let requests = stream::once(future::ready(Ok(first))).chain(rest);
        let consumption = self
            .bucket
            .consume(
                &settings.consumer,
                settings.max_in_flight,
                settings.lease_seconds,
                Box::pin(requests),
            )
            .map_err(|e| e.prefixed("settings."))?;
        let events =
            consumption.map(|event| event.map(convert::consume_event).map_err(Status::from));
        let broken =
            stream::once(async move { broken.lock().expect("consume lock poisoned").take() })
                .filter_map(|status| future::ready(status.map(Err)));
        Ok(Response::new(Box::pin(events.chain(broken))))
    }

    async fn redrive(
        &self,
        request: Request<pb::RedriveRequest>,
    ) -> Result<Response<pb::RedriveResponse>, Status> {
        let req = request.into_inner();
        let filter = convert::requeue_request(
            &req.statuses,
            req.user_id,
            req.received_from,
            req.received_before,
        )?;
        let redriven = self.bucket.requeue(RequeueReason::Redrive, filter).await?;
        Ok(Response::new(pb::RedriveResponse { redriven }))
    }

    async fn replay(
        &self,
        request: Request<pb::ReplayRequest>,
    ) -> Result<Response<pb::ReplayResponse>, Status> {
        let req = request.into_inner();
        let filter =
            convert::requeue_request(&[], req.user_id, req.received_from, req.received_before)?;
        let replayed = self.bucket.requeue(RequeueReason::Replay, filter).await?;
        Ok(Response::new(pb::ReplayResponse { replayed }))
    }

    async fn user_packets(
        &self,
        request: Request<pb::UserPacketsRequest>,
    ) -> Result<Response<pb::UserPacketsResponse>, Status> {
        let req = request.into_inner();
        let filter = convert::status_filter(req.status_filter)?;
        let page = self
            .bucket
            .user_packets(&req.user_id, req.limit, filter, &req.page_token)
            .await?;
        Ok(Response::new(pb::UserPacketsResponse {
            packets: page.packets.into_iter().map(convert::packet).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let mut report = self.bucket.status().await?;
        // Status is open to anyone; who consumes is the operators' business.
        let admin = request
            .extensions()
            .get::<Caller>()
            .is_some_and(|c| c.admin);
        if !admin {
            report.consumers.clear();
        }
        Ok(Response::new(convert::status(report)))
    }
}
