//! Builds the application and serves every front door on one listener.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::auth::Access;
use crate::bucket::Bucket;
use crate::config::Config;
use crate::delivery::Dispatcher;
use crate::doors::Doors;
use crate::edge::EdgeLayer;
use crate::edge::connections::ConnectionLimits;
use crate::grpc::BucketGrpc;
use crate::limits::{IngestRate, Limits};
use crate::proto::bucket::v1::bucket_service_server::BucketServiceServer;
use crate::proto::{FILE_DESCRIPTOR_SET, WELL_KNOWN_TYPES};
use crate::queue::redis::{RedisQueue, RedisTarget};
use crate::store::{CommitLimits, Store};
use uuid::Uuid;

pub struct Application {
    listener: TcpListener,
    access: Arc<Access>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    config: Config,
    store: Store,
    dispatcher: Arc<Dispatcher>,
    bucket: Arc<Bucket>,
}

impl Application {
    /// Connects storage and queue, rebuilds the queue from the database, and
    /// binds the listener (port 0 picks a free port, for tests).
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        crate::telemetry::metrics();
        let store = Store::connect(&config.database_url)
            .await
            .with_context(|| {
                format!(
                    "opening {}",
                    crate::config::redact_url(&config.database_url)
                )
            })?;
        let node = Uuid::new_v4().simple().to_string()[..8].to_owned();
        let redis = match RedisTarget::from_config(&config.redis)? {
            None => {
                tracing::info!("no REDIS_URL: in-memory queue (one node)");
                None
            }
            Some(target) => {
                let redis = RedisQueue::connect(&target, &config.redis, &node, store.clone())?;
                if tokio::time::timeout(Duration::from_secs(2), redis.wait_connected())
                    .await
                    .is_err()
                {
                    tracing::warn!(redis = %target.display, "Redis does not answer; serving from memory and reconnecting");
                }
                Some(redis)
            }
        };

        let dispatcher = Dispatcher::new(
            store.clone(),
            redis.clone(),
            &node,
            config.delivery.max_deliveries,
            config.delivery.queue_window,
            config.limits.max_subscribers,
        );
        let limits = CommitLimits {
            max_writes: config.max_commit,
            linger: config.commit_linger_us.map(Duration::from_micros),
            max_queued: config.max_queued_writes,
        };
        store.start_writers(limits, Arc::new(dispatcher.clone()));
        match dispatcher.rebuild().await {
            Ok(queued) => tracing::info!(queued, "queue rebuilt from the database"),
            // Redis away: what is committed meanwhile waits in memory, and
            // the reconciler adds the rest once Redis answers.
            Err(e) => {
                tracing::warn!(error = %e, "queue not fully rebuilt; will retry")
            }
        }
        dispatcher.start(config.delivery.sweep_interval());
        if let Some(redis) = &redis {
            redis.start(Arc::new(dispatcher.clone()), dispatcher.shutdown_token());
            dispatcher.start_reconciler(
                redis.reconnections(),
                Duration::from_secs(config.redis.reconcile_seconds),
            );
        }
        match config.retention.0 {
            Some(period) => tracing::info!(
                days = period.as_secs_f64() / 86_400.0,
                "retention: finished packets are deleted after this long"
            ),
            None => tracing::info!("retention off: every packet is kept"),
        }
        // Even with retention off: it also readies the days ahead.
        dispatcher.tasks().spawn(crate::store::retention::run(
            store.clone(),
            config.retention.0,
            dispatcher.shutdown_token(),
        ));
        let bucket = Arc::new(Bucket::new(store.clone(), dispatcher.clone(), &config));

        let access = Arc::new(Access::from_config(&config.auth)?);
        access.warn_open_roles();
        let tls = match (&config.tls.tls_cert, &config.tls.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
            _ => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        Ok(Application {
            listener,
            access,
            tls,
            config,
            store,
            dispatcher,
            bucket,
        })
    }

    /// The store (tests read its tables after [`Store::table_sync`]).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The dispatcher (tests ask what this node holds in memory).
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops gracefully: streams end
    /// (their leases released), in-flight requests finish, queued writes
    /// commit.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr();
        let dispatcher = self.dispatcher.clone();
        let signalled = tokio_util::sync::CancellationToken::new();
        let stop = {
            let signalled = signalled.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: new calls refused, streams ended");
                dispatcher.begin_shutdown();
                signalled.cancel();
            }
        };
        // After the signal, requests under way get this long to finish.
        let grace = Duration::from_secs(self.config.limits.shutdown_grace_seconds);
        let grace_over = async move {
            signalled.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        let limits = &self.config.limits;
        let mut server = Server::builder();
        if let Some(age) = limits.max_connection_age.0 {
            server = server.max_connection_age(age);
            if let Some(grace) = limits.max_connection_age_grace.0 {
                server = server.max_connection_age_grace(grace);
            }
        }
        let server = server
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_seconds)))
            .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_seconds)))
            .max_concurrent_streams(limits.max_concurrent_streams)
            // CORS outside everything, so preflights and errors carry it too.
            .layer(crate::http::cors::layer(&self.config.cors_origins))
            // Then, once for every door: request id, authentication,
            // ingest rate, per-method metrics.
            .layer(EdgeLayer::new(self.access.clone(), self.limits()));
        let doors = self.doors()?;
        // Server::tcp_nodelay only reaches listeners tonic binds itself;
        // without it, Nagle holds small HTTP/2 frames back behind delayed
        // ACKs (20-40 ms per unary call beside a busy stream).
        let tcp = TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let database = crate::config::redact_url(&self.config.database_url);
        let connections = ConnectionLimits {
            max_connections: limits.max_connections,
            preface: limits.preface_timeout.0,
            idle: limits.idle_timeout.0,
        };
        let serving = async {
            let tls = if self.tls.is_some() {
                "TLS"
            } else {
                "plaintext"
            };
            tracing::info!(%addr, %database, tls, "bucket listening");
            let incoming = crate::edge::connections::incoming(tcp, self.tls.clone(), connections);
            server
                .serve_with_incoming_shutdown(doors, incoming, stop)
                .await
        };
        tokio::select! {
            served = serving => served.context("serving")?,
            () = grace_over => tracing::warn!(
                grace_seconds = grace.as_secs(),
                "shutdown grace period over; closing the connections still busy"
            ),
        }
        self.dispatcher.shutdown().await;
        self.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }

    fn doors(&self) -> anyhow::Result<Doors> {
        let bucket = BucketServiceServer::new(BucketGrpc::new(self.bucket.clone()))
            .max_decoding_message_size(self.config.max_body_bytes);
        let reflection = reflection_builder().build_v1()?;
        let reflection_alpha = reflection_builder().build_v1alpha()?;
        let (health_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(report_health(
            self.bucket.clone(),
            health_reporter,
            self.dispatcher.shutdown_token(),
        ));
        // gRPC-web (binary and text, over HTTP/1.1 too) on the gRPC routes
        // only: tonic-web refuses every other HTTP/1.1 request.
        let grpc = Routes::new(health)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .into_axum_router()
            .layer(tonic_web::GrpcWebLayer::new());
        let http = crate::http::router(self.bucket.clone(), self.config.max_body_bytes);
        let rest = grpc.merge(http).fallback(crate::http::not_found);
        Ok(Doors::new(bucket, self.config.max_batch, rest))
    }

    fn limits(&self) -> Limits {
        Limits {
            ingest_rate: IngestRate::new(
                self.config.limits.ingest_rate,
                self.config.limits.ingest_burst,
            ),
        }
    }
}

/// Server reflection over everything the bucket serves or answers with.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.BadRequest & co., so grpcurl and buf curl print an
        // error's details instead of bytes.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(WELL_KNOWN_TYPES)
}

/// `grpc.health.v1.Health`: SERVING while the database answers, for the
/// whole server ("") and for `bucket.v1.BucketService`.
async fn report_health(
    bucket: Arc<Bucket>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: tokio_util::sync::CancellationToken,
) {
    const SERVICE: &str = "bucket.v1.BucketService";
    let mut last = None;
    loop {
        let serving = bucket.store().ping().await.is_ok();
        if last != Some(serving) {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tracing::warn!("database unreachable: health NOT_SERVING");
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SERVICE, status).await;
            last = Some(serving);
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                reporter.set_service_status(SERVICE, tonic_health::ServingStatus::NotServing).await;
                return;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
