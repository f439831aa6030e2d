//! What each mode does, in order: open the doors and consumers, run the load
//! over a warmup and a measured window, read the server's CPU and memory at
//! the window's ends, wait for the end check, and fill in the report.
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bucket::proto::bucket::v1 as pb;
use clap::ValueEnum;

use crate::consumers::{self, ConsumerSpec, Consumers, Marks};
use crate::load::{self, Door, Window, grpc_client};
use crate::nats;
use crate::probe::Probe;
use crate::report::{EndCheck, Percentiles, Report};
use crate::server::{Server, Target};
use crate::tracker::{Snapshot, Tracker};
use crate::users::UserSpread;

/// Timing shared by the measured modes.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub duration: f64,
    pub warmup: f64,
    pub drain_timeout: f64,
}

/// The ingest-only modes' end check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Check {
    /// The server's stored count (Status.total_packets, or the stream's
    /// messages) grew by at least the acknowledged count: cheap at any size.
    Stored,
    /// Consumers (4 × 64, batch marks; not measured) take every packet
    /// afterwards: every acknowledged id must be delivered.
    Deliver,
    /// No end check.
    None,
}

/// The consumers of `--check deliver`: the fastest shape, since only the
/// outcome counts.
const CHECK_CONSUMERS: ConsumerSpec = ConsumerSpec {
    streams: 4,
    max_in_flight: 64,
    marks: Marks::Batch,
    lease_seconds: 30,
};

/// Which ingest-only load.
#[derive(Clone, Copy, Debug)]
pub enum IngestKind {
    /// Unary Ingest (a JetStream publish on NATS); open loop with a rate.
    Unary {
        rate: Option<f64>,
        max_outstanding: u64,
    },
    Batch {
        size: usize,
    },
    Rest,
}

#[derive(Clone, Copy, Debug)]
pub struct IngestPlan {
    pub kind: IngestKind,
    pub connections: usize,
    pub concurrency: usize,
    pub check: Check,
    pub users: UserSpread,
}

/// How e2e offers its load.
#[derive(Clone, Copy, Debug)]
pub enum E2eLoad {
    /// Open loop at this many packets/s: latency under a given load.
    Rate(f64),
    /// Closed loop with this many ingests outstanding: how much delivery
    /// sustains when ingest goes as fast as the server lets it.
    Outstanding(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct E2ePlan {
    pub consumers: ConsumerSpec,
    pub load: E2eLoad,
    /// Ingest connections, separate from the consumers'.
    pub connections: usize,
    /// Open loop: most ingests outstanding before sends count as not offered.
    pub max_outstanding: u64,
    pub users: UserSpread,
}

fn per_s(a: &Snapshot, b: &Snapshot, f: fn(&Snapshot) -> u64) -> Option<f64> {
    let secs = b.at?.duration_since(a.at?).as_secs_f64();
    (secs > 0.0).then(|| f(b).saturating_sub(f(a)) as f64 / secs)
}

/// Waits until every acknowledged packet was marked (and no ingest is still
/// unanswered), or until `deadline`.
async fn settle(tracker: &Tracker, deadline: Instant) {
    while !tracker.all_settled() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn start_consumers(
    server: &Server,
    spec: ConsumerSpec,
    tracker: &Arc<Tracker>,
) -> Result<Consumers> {
    if server.is_nats() {
        nats::create_consumer(&server.url, spec).await?;
        nats::start_consumers(&server.url, spec, tracker.clone()).await
    } else {
        consumers::start_bucket(&server.url, spec, tracker.clone()).await
    }
}

/// What the server says about its consumer after the run (NATS only: the
/// bucket's consumers were checked by every mark's answer).
async fn server_side(server: &Server) -> Option<String> {
    if !server.is_nats() {
        return None;
    }
    // Plain acks are fire-and-forget: give the server a moment to count them.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match nats::consumer_pending(&server.url).await {
            Ok((0, 0)) => return Some("consumer karma: 0 pending, 0 awaiting ack".into()),
            Ok((pending, ack_pending)) if Instant::now() > deadline => {
                return Some(format!(
                    "consumer karma: {pending} pending, {ack_pending} awaiting ack"
                ));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Some(format!("consumer info: {e:#}")),
        }
    }
}

/// The end check's figures from the tracker.
fn end_check(tracker: &Tracker, delivery_checked: bool) -> EndCheck {
    let scan = tracker.end_scan();
    let c = &tracker.counters;
    EndCheck {
        acked: scan.acked,
        undelivered: delivery_checked.then_some(scan.undelivered),
        unmarked: delivery_checked.then_some(scan.unmarked),
        redeliveries: c.redeliveries.load(Relaxed),
        duplicates: c.duplicates.load(Relaxed),
        foreign: c.foreign.load(Relaxed),
        delivered_unacked: scan.delivered_unacked,
        not_stored: None,
        ingest_errors: c.ingest_errors.load(Relaxed),
        unoffered: c.unoffered.load(Relaxed),
        mark_errors: c.mark_errors.load(Relaxed),
        stream_errors: c.stream_errors.load(Relaxed),
        server_side: None,
        first_error: tracker.first_error(),
    }
}

fn target_notes(server: &Server, marks: Option<Marks>) -> Vec<String> {
    let mut notes = Vec::new();
    match server.target {
        Target::Nats => {
            notes.push(nats::DURABILITY_NOTE.into());
            match marks {
                Some(Marks::Batch) => notes.push(nats::BATCH_ACK_NOTE.into()),
                Some(Marks::Stream) => notes.push(nats::ACK_ALL_NOTE.into()),
                _ => {}
            }
        }
        Target::Postgres | Target::Redis => notes.push(
            "server CPU is the bucket process alone; PostgreSQL's and Redis's are the store CPU line"
                .into(),
        ),
        Target::Sqlite => {}
    }
    notes
}

/// Packets the server holds: the bucket's Status.total_packets, or the
/// stream's message count.
async fn stored_count(server: &Server) -> Result<u64> {
    if server.is_nats() {
        return nats::stream_messages(&server.url).await;
    }
    let mut client = grpc_client(&server.url).await?;
    Ok(client
        .status(pb::StatusRequest {})
        .await?
        .into_inner()
        .total_packets)
}

/// ingest, batch, rest: the ingest path alone.
pub async fn ingest(server: &Server, plan: IngestPlan, timing: Timing) -> Result<Report> {
    let tracker = Arc::new(Tracker::new());
    let (door, mode, per_request, shape) = match (plan.kind, server.is_nats()) {
        (IngestKind::Unary { .. }, true) => (
            Door::Nats(nats::publishers(&server.url, plan.connections).await?),
            "ingest",
            1,
            format!("JetStream publish + PubAck, {} connections", plan.connections),
        ),
        (IngestKind::Batch { .. } | IngestKind::Rest, true) => {
            bail!("batch and rest are the bucket's doors; against NATS use ingest or e2e")
        }
        (IngestKind::Unary { .. }, false) => (
            Door::grpc(&server.url, plan.connections, false).await?,
            "ingest",
            1,
            format!("unary Ingest, {} HTTP/2 connections", plan.connections),
        ),
        (IngestKind::Batch { size }, false) => (
            Door::grpc(&server.url, plan.connections, true).await?,
            "batch",
            size.max(1),
            format!(
                "IngestBatch of {size}, {} HTTP/2 connections",
                plan.connections
            ),
        ),
        (IngestKind::Rest, false) => (
            Door::rest(&server.url)?,
            "rest",
            1,
            "POST /api/v1/bucket/prana/ingest (JSON), HTTP/1.1 keep-alive: one connection per outstanding request".into(),
        ),
    };
    let door = Arc::new(door);
    let stored_before = match plan.check {
        Check::Stored => Some(stored_count(server).await?),
        _ => None,
    };
    let mut probe = Probe::start(server);
    let window = Window::new(timing.warmup, timing.duration);
    let (load, shape) = match plan.kind {
        IngestKind::Unary {
            rate: Some(rate),
            max_outstanding,
        } => (
            tokio::spawn(load::open_loop(
                door,
                tracker.clone(),
                rate,
                max_outstanding,
                plan.connections,
                plan.users,
                window,
            )),
            format!(
                "open loop {rate:.0} packets/s offered, at most {max_outstanding} outstanding; {shape}"
            ),
        ),
        _ => (
            tokio::spawn(load::closed_loop(
                door,
                tracker.clone(),
                plan.concurrency,
                per_request,
                plan.users,
                window,
            )),
            format!(
                "closed loop, {} requests outstanding; {shape}",
                plan.concurrency
            ),
        ),
    };
    let shape = format!(
        "{shape}; {} users; {} s measured after {} s warmup",
        plan.users.users(),
        timing.duration,
        timing.warmup
    );

    tokio::time::sleep_until(window.t0.into()).await;
    probe.find_store(server).await;
    let (snap0, cpu0) = (tracker.snapshot(), probe.mark().await);
    tokio::time::sleep_until(window.t1.into()).await;
    let (snap1, cpu1) = (tracker.snapshot(), probe.mark().await);
    let _ = load.await;
    let deadline = Instant::now() + Duration::from_secs_f64(timing.drain_timeout);
    while tracker.counters.outstanding.load(Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut not_stored = None;
    let mut server_side_note = None;
    match plan.check {
        Check::Stored => {
            let grew = stored_count(server)
                .await?
                .saturating_sub(stored_before.unwrap_or(0));
            not_stored = Some(tracker.counters.acked.load(Relaxed).saturating_sub(grew));
        }
        Check::Deliver => {
            let consumers = start_consumers(server, CHECK_CONSUMERS, &tracker).await?;
            settle(&tracker, deadline).await;
            server_side_note = server_side(server).await;
            consumers.stop().await;
        }
        Check::None => {}
    }

    let window_s = window.t1.duration_since(window.t0).as_secs_f64();
    let ingested = snap1.acked.saturating_sub(snap0.acked);
    let mut report = Report {
        mode: mode.into(),
        target: server.target.name().into(),
        server: server.description.clone(),
        shape,
        offered_rate: match plan.kind {
            IngestKind::Unary { rate, .. } => rate,
            _ => None,
        },
        connections: (!matches!(plan.kind, IngestKind::Rest)).then_some(plan.connections),
        concurrency: match plan.kind {
            IngestKind::Unary { rate: Some(_), .. } => None,
            _ => Some(plan.concurrency),
        },
        batch_size: match plan.kind {
            IngestKind::Batch { size } => Some(size),
            _ => None,
        },
        users: Some(plan.users.users()),
        window_s,
        ingested_per_s: per_s(&snap0, &snap1, |s| s.acked),
        ack: Percentiles::of(&tracker.ack_histogram()),
        cpu_basis: "per ingested packet",
        end: end_check(&tracker, plan.check == Check::Deliver),
        notes: target_notes(server, None),
        ..Default::default()
    };
    report.end.not_stored = not_stored;
    report.end.server_side = server_side_note;
    if plan.check == Check::Deliver {
        report.notes.push(format!(
            "end check: every acknowledged packet delivered afterwards to {} (not measured)",
            CHECK_CONSUMERS.describe()
        ));
    }
    probe.finish(cpu0, cpu1, window_s, ingested, &mut report);
    Ok(report)
}

/// e2e: ingest (open loop at a rate, or closed loop with N outstanding)
/// while the consumers take and mark every packet.
pub async fn e2e(server: &Server, plan: E2ePlan, timing: Timing) -> Result<Report> {
    let (spec, connections) = (plan.consumers, plan.connections);
    let tracker = Arc::new(Tracker::new());
    let consumers = start_consumers(server, spec, &tracker).await?;
    let door = Arc::new(if server.is_nats() {
        Door::Nats(nats::publishers(&server.url, connections).await?)
    } else {
        Door::grpc(&server.url, connections, false).await?
    });
    let mut probe = Probe::start(server);
    let window = Window::new(timing.warmup, timing.duration);
    tracker.start_series(window.t0);
    let load = match plan.load {
        E2eLoad::Rate(rate) => tokio::spawn(load::open_loop(
            door,
            tracker.clone(),
            rate,
            plan.max_outstanding,
            connections,
            plan.users,
            window,
        )),
        E2eLoad::Outstanding(n) => tokio::spawn(load::closed_loop(
            door,
            tracker.clone(),
            n,
            1,
            plan.users,
            window,
        )),
    };

    tokio::time::sleep_until(window.t0.into()).await;
    probe.find_store(server).await;
    let (snap0, cpu0) = (tracker.snapshot(), probe.mark().await);
    tokio::time::sleep_until(window.t1.into()).await;
    let (snap1, cpu1) = (tracker.snapshot(), probe.mark().await);
    let _ = load.await;
    // The offered load has stopped: now every acknowledged packet must come
    // through.
    settle(
        &tracker,
        window.t1 + Duration::from_secs_f64(timing.drain_timeout),
    )
    .await;
    let server_side_note = server_side(server).await;
    consumers.stop().await;

    let window_s = window.t1.duration_since(window.t0).as_secs_f64();
    let marked = snap1.marked.saturating_sub(snap0.marked);
    let door_name = if server.is_nats() {
        "JetStream publish + PubAck"
    } else {
        "unary Ingest"
    };
    let load_shape = match plan.load {
        E2eLoad::Rate(rate) => format!(
            "open loop {rate:.0} packets/s ({door_name}, {connections} connections, at most {} outstanding)",
            plan.max_outstanding
        ),
        E2eLoad::Outstanding(n) => {
            format!("closed loop, {n} ingests outstanding ({door_name}, {connections} connections)")
        }
    };
    let mut report = Report {
        mode: "e2e".into(),
        target: server.target.name().into(),
        server: server.description.clone(),
        shape: format!(
            "{load_shape}; {} users; consumers {}; {} s measured after {} s warmup",
            plan.users.users(),
            spec.describe(),
            timing.duration,
            timing.warmup
        ),
        offered_rate: match plan.load {
            E2eLoad::Rate(rate) => Some(rate),
            E2eLoad::Outstanding(_) => None,
        },
        outstanding: match plan.load {
            E2eLoad::Rate(_) => None,
            E2eLoad::Outstanding(n) => Some(n),
        },
        users: Some(plan.users.users()),
        streams: Some(spec.streams),
        in_flight: Some(spec.max_in_flight),
        marks: Some(spec.marks.name()),
        connections: Some(connections),
        window_s,
        ingested_per_s: per_s(&snap0, &snap1, |s| s.acked),
        delivered_per_s: per_s(&snap0, &snap1, |s| s.deliveries),
        marked_per_s: per_s(&snap0, &snap1, |s| s.marked),
        ack: Percentiles::of(&tracker.ack_histogram()),
        e2e: Percentiles::of(&tracker.e2e_histogram()),
        series: tracker.series(timing.duration.ceil() as usize),
        cpu_basis: "per processed packet",
        end: end_check(&tracker, true),
        notes: target_notes(server, Some(spec.marks)),
        ..Default::default()
    };
    report.end.server_side = server_side_note;
    // Fell behind: delivered < 95% of what was offered in the window (closed
    // loop: of what was acknowledged, so delivery lagged ingest), or
    // something acknowledged never came out.
    let offered = match plan.load {
        E2eLoad::Rate(_) => tracker.counters.offered.load(Relaxed),
        E2eLoad::Outstanding(_) => snap1.acked.saturating_sub(snap0.acked),
    } as f64;
    let delivered = snap1.deliveries.saturating_sub(snap0.deliveries) as f64;
    report.saturated = delivered < 0.95 * offered || report.end.undelivered.unwrap_or(0) > 0;
    probe.finish(cpu0, cpu1, window_s, marked, &mut report);
    Ok(report)
}

/// drain: a backlog loaded first (not measured), then consumers take it all.
pub async fn drain(
    server: &Server,
    spec: ConsumerSpec,
    backlog: u64,
    batch_size: usize,
    users: UserSpread,
    stall_timeout: f64,
) -> Result<Report> {
    let tracker = Arc::new(Tracker::new());
    let mut probe = Probe::start(server);
    let loading = Instant::now();
    if server.is_nats() {
        let door = Door::Nats(nats::publishers(&server.url, 2).await?);
        load::backlog(Arc::new(door), tracker.clone(), backlog, 1, 64, users).await;
    } else {
        let door = Door::grpc(&server.url, 2, true).await?;
        load::backlog(
            Arc::new(door),
            tracker.clone(),
            backlog,
            batch_size,
            4,
            users,
        )
        .await;
    }
    let loaded = tracker.counters.acked.load(Relaxed);
    eprintln!(
        "backlog: {loaded} of {backlog} packets acknowledged in {:.1} s",
        loading.elapsed().as_secs_f64()
    );
    if loaded == 0 {
        bail!(
            "no backlog packet was acknowledged: {}",
            tracker.first_error().unwrap_or_default()
        );
    }

    probe.find_store(server).await;
    let (snap0, cpu0) = (tracker.snapshot(), probe.mark().await);
    let consumers = start_consumers(server, spec, &tracker).await?;
    // Until all are marked, or nothing moved for --drain-timeout: a long
    // backlog may take minutes, a stuck one should not.
    let mut last = (tracker.counters.marked.load(Relaxed), Instant::now());
    while !tracker.all_settled() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let marked = tracker.counters.marked.load(Relaxed);
        if marked != last.0 {
            last = (marked, Instant::now());
        } else if last.1.elapsed().as_secs_f64() > stall_timeout {
            break;
        }
    }
    let (snap1, cpu1) = (tracker.snapshot(), probe.mark().await);
    let server_side_note = server_side(server).await;
    consumers.stop().await;

    let window_s = snap1
        .at
        .zip(snap0.at)
        .map_or(0.0, |(b, a)| b.duration_since(a).as_secs_f64());
    let marked = snap1.marked.saturating_sub(snap0.marked);
    let mut report = Report {
        mode: "drain".into(),
        target: server.target.name().into(),
        server: server.description.clone(),
        shape: format!(
            "backlog of {backlog} over {} users ({}), then consumers {}",
            users.users(),
            if server.is_nats() {
                "JetStream publish, 64 outstanding".to_owned()
            } else {
                format!("IngestBatch of {batch_size}, 4 outstanding")
            },
            spec.describe()
        ),
        streams: Some(spec.streams),
        in_flight: Some(spec.max_in_flight),
        marks: Some(spec.marks.name()),
        users: Some(users.users()),
        batch_size: (!server.is_nats()).then_some(batch_size),
        window_s,
        delivered_per_s: per_s(&snap0, &snap1, |s| s.deliveries),
        marked_per_s: per_s(&snap0, &snap1, |s| s.marked),
        drained_per_s: (window_s > 0.0).then(|| marked as f64 / window_s),
        cpu_basis: "per processed packet",
        end: end_check(&tracker, true),
        notes: target_notes(server, Some(spec.marks)),
        ..Default::default()
    };
    report.end.server_side = server_side_note;
    probe.finish(cpu0, cpu1, window_s, marked, &mut report);
    Ok(report)
}
