//! bucket-bench: load, latency, CPU and memory of the PRANA bucket (and of
//! NATS JetStream under the same workload), against a server it starts with
//! fresh state or one already running. See bench/README.md.
mod consume_stream;
mod consumers;
mod costs;
mod disk;
mod floor;
mod load;
mod modes;
mod nats;
mod packet;
mod pg_wal;
mod plot;
mod probe;
mod proc_stats;
mod redis_keys;
mod report;
mod scale;
mod series;
mod server;
mod tables;
mod tracker;
mod users;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use consumers::{ConsumerSpec, Marks};
use modes::{Check, E2eLoad, E2ePlan, IngestKind, IngestPlan, Timing};
use report::Report;
use server::{Server, ServerArgs, ServerSetup, Target};
use users::UsersArg;

#[derive(Parser)]
#[command(
    name = "bucket-bench",
    version,
    about = "Benchmark of the PRANA bucket and of NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Unary Ingest: closed loop (--concurrency) or open loop (--rate)
    Ingest(IngestArgs),
    /// IngestBatch, closed loop
    Batch(BatchArgs),
    /// The JSON REST ingest path over HTTP/1.1 keep-alive, closed loop
    Rest(RestArgs),
    /// Open-loop ingest while consumers take and mark every packet
    E2e(E2eArgs),
    /// Load a backlog, then measure how fast the consumers drain it
    Drain(DrainArgs),
    /// e2e for each target × rate on a fresh server each, then the plot
    Sweep(SweepArgs),
    /// Draw the p99-against-rate PNG from a CSV of e2e runs
    Plot(PlotArgs),
    /// Load N packets, then measure Status, /metrics, UserPackets, RSS and
    /// the database's size with them stored
    Scale(ScaleArgs),
    /// Serve the contract with nothing behind it (no store, no log, no edge
    /// layers), for `e2e --url`: what the network path alone costs
    Floor(FloorArgs),
    /// Synced appends to a file, as the record log commits, with nothing
    /// else: the disk's latency tail and the kernel's CPU per commit
    Disk(DiskArgs),
    /// A second's packets into SQLite tables once a second, as the fold
    /// writes them, with nothing else: the least keeping tables costs
    Tables(TablesArgs),
}

#[derive(Args, Debug)]
struct TablesArgs {
    /// A directory on the file system to measure (where the database lives)
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Rows per second (one transaction a second)
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Seconds measured, per table
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Distinct users the rows are spread over
    #[arg(long, default_value_t = 10_000)]
    users: u64,
}

#[derive(Args, Debug)]
struct DiskArgs {
    /// A directory on the file system to measure (where the database lives)
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Appends per second
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Seconds of appends
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Bytes per append (a multiple of 512)
    #[arg(long, default_value_t = 4096)]
    bytes: usize,
}

#[derive(Args, Debug)]
struct FloorArgs {
    /// Where to listen
    #[arg(long, default_value = "127.0.0.1:3960")]
    listen: std::net::SocketAddr,
    /// Also sync each packet and mark to a log in this directory before
    /// answering, and keep the packets in SQLite tables there (the
    /// bucket's obligations, nothing else of it)
    #[arg(long)]
    durable: Option<PathBuf>,
    /// With --durable: the log writer's wait for company, in µs
    #[arg(long, default_value_t = 4000)]
    wait_us: u64,
}

#[derive(Args, Debug)]
struct ScaleArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    users: UsersArg,
    /// Packets loaded (all pending unless --processed)
    #[arg(long, default_value_t = 1_000_000)]
    packets: u64,
    /// Packets per IngestBatch while loading
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// IngestBatch calls outstanding while loading
    #[arg(long, default_value_t = 4)]
    outstanding: usize,
    /// Share of the packets then marked processed (0 to 1)
    #[arg(long, default_value_t = 0.0)]
    processed: f64,
    /// Calls measured per kind
    #[arg(long, default_value_t = 1000)]
    samples: usize,
}

#[derive(Args, Clone, Debug)]
struct TimingArgs {
    /// Measured seconds
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before the measurement starts
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// After the load, seconds to wait for every acknowledged packet to be
    /// delivered and marked
    #[arg(long, default_value_t = 20.0)]
    drain_timeout: f64,
}

impl TimingArgs {
    fn timing(&self) -> Timing {
        Timing {
            duration: self.duration,
            warmup: self.warmup,
            drain_timeout: self.drain_timeout,
        }
    }
}

#[derive(Args, Clone, Debug)]
struct CsvArg {
    /// Append one CSV row with the figures to this file
    #[arg(long)]
    csv: Option<PathBuf>,
}

impl CsvArg {
    fn outputs(&self) -> Outputs<'_> {
        Outputs {
            csv: self.csv.as_deref(),
            series: None,
        }
    }
}

#[derive(Args, Clone, Debug)]
struct ConsumerArgs {
    /// Consumer streams (StreamPending or, with --marks stream, Consume
    /// subscribers / NATS pullers), one connection each
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Unmarked packets per stream (NATS: max_ack_pending = streams × this)
    #[arg(long, default_value_t = 64)]
    max_in_flight: u32,
    /// How consumers mark what they receive
    #[arg(long, value_enum, default_value_t = Marks::Unary)]
    marks: Marks,
    /// Lease asked for by each stream (NATS: ack_wait)
    #[arg(long, default_value_t = 30)]
    lease_seconds: u32,
}

impl ConsumerArgs {
    fn spec(&self) -> ConsumerSpec {
        ConsumerSpec {
            streams: self.streams.max(1),
            max_in_flight: self.max_in_flight.max(1),
            marks: self.marks,
            lease_seconds: self.lease_seconds.max(1),
        }
    }
}

#[derive(Args, Debug)]
struct IngestArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    users: UsersArg,
    #[command(flatten)]
    timing: TimingArgs,
    #[command(flatten)]
    csv: CsvArg,
    /// HTTP/2 connections the requests are spread over
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Closed loop: requests outstanding at once
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop instead: packets per second, each send its own task
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most requests outstanding; sends beyond are counted as not offered
    #[arg(long, default_value_t = 20_000)]
    max_outstanding: u64,
    /// End check
    #[arg(long, value_enum, default_value_t = Check::Stored)]
    check: Check,
}

#[derive(Args, Debug)]
struct BatchArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    users: UsersArg,
    #[command(flatten)]
    timing: TimingArgs,
    #[command(flatten)]
    csv: CsvArg,
    /// Packets per IngestBatch
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// HTTP/2 connections the requests are spread over
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests outstanding at once
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// End check
    #[arg(long, value_enum, default_value_t = Check::Stored)]
    check: Check,
}

#[derive(Args, Debug)]
struct RestArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    users: UsersArg,
    #[command(flatten)]
    timing: TimingArgs,
    #[command(flatten)]
    csv: CsvArg,
    /// Requests outstanding at once (HTTP/1.1: as many keep-alive connections)
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// End check
    #[arg(long, value_enum, default_value_t = Check::Stored)]
    check: Check,
}

#[derive(Args, Debug)]
struct E2eArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    users: UsersArg,
    #[command(flatten)]
    timing: TimingArgs,
    #[command(flatten)]
    csv: CsvArg,
    #[command(flatten)]
    consumers: ConsumerArgs,
    /// Offered packets per second (open loop)
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Closed loop instead of --rate: keep this many ingests outstanding
    /// (over --connections) and report what delivery sustains
    #[arg(long, conflicts_with = "rate")]
    outstanding: Option<usize>,
    /// Ingest connections (separate from the consumers')
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Most ingest requests outstanding; sends beyond are counted as not offered
    #[arg(long, default_value_t = 20_000)]
    max_outstanding: u64,
    /// Write the window's ingest→delivery (and ack) latency second by second
    /// to this CSV file (replaced)
    #[arg(long)]
    series: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DrainArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    users: UsersArg,
    #[command(flatten)]
    csv: CsvArg,
    #[command(flatten)]
    consumers: ConsumerArgs,
    /// Packets loaded before the consumers start
    #[arg(long, default_value_t = 20_000)]
    backlog: u64,
    /// Packets per IngestBatch while loading the backlog
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Give up when nothing was marked for this many seconds
    #[arg(long, default_value_t = 20.0)]
    drain_timeout: f64,
}

#[derive(Args, Debug)]
struct SweepArgs {
    #[command(flatten)]
    setup: ServerSetup,
    #[command(flatten)]
    users: UsersArg,
    #[command(flatten)]
    timing: TimingArgs,
    #[command(flatten)]
    consumers: ConsumerArgs,
    /// Targets, comma-separated
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sqlite,postgres,redis,nats"
    )]
    targets: Vec<Target>,
    /// Offered rates in packets/s, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,5000,10000,15000,20000"
    )]
    rates: Vec<f64>,
    /// Ingest connections
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Most ingest requests outstanding
    #[arg(long, default_value_t = 20_000)]
    max_outstanding: u64,
    /// The CSV the runs are appended to (and the plot drawn from)
    #[arg(long, default_value = "bench-sweep.csv")]
    csv: PathBuf,
    /// The plot
    #[arg(long, default_value = "bench-sweep.png")]
    png: PathBuf,
    /// TTF font for the plot's text
    #[arg(long, default_value = DEFAULT_FONT)]
    font: PathBuf,
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// A CSV written by this tool (its e2e rows are plotted)
    #[arg(long)]
    csv: PathBuf,
    /// The PNG to write [default: the CSV's name with .png]
    #[arg(long)]
    out: Option<PathBuf>,
    /// TTF font for the plot's text
    #[arg(long, default_value = DEFAULT_FONT)]
    font: PathBuf,
}

const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Where a measured run's figures go besides stdout.
#[derive(Clone, Copy, Default)]
struct Outputs<'a> {
    /// One row appended per run.
    csv: Option<&'a Path>,
    /// The run's latency second by second (e2e).
    series: Option<&'a Path>,
}

/// Runs one measured mode against its server; the server is stopped (and
/// its state removed) whatever happens, Ctrl-C included.
async fn measured<F>(args: &ServerArgs, outputs: Outputs<'_>, mode: F) -> Result<ExitCode>
where
    F: AsyncFnOnce(&Server) -> Result<Report>,
{
    if let Some(path) = outputs.csv {
        report::check_csv(path)?;
    }
    let server = Server::start(args).await?;
    let result = tokio::select! {
        r = mode(&server) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    server.stop().await;
    let report = result?;
    report.print();
    if let Some(path) = outputs.csv {
        report.append_csv(path)?;
    }
    if let Some(path) = outputs.series {
        series::write_csv(path, &report.series)?;
        println!("series: {}", path.display());
    }
    // Something acknowledged and then lost is a failed run.
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Ingest(a) => {
            let plan = IngestPlan {
                kind: IngestKind::Unary {
                    rate: a.rate,
                    max_outstanding: a.max_outstanding,
                },
                connections: a.connections,
                concurrency: a.concurrency,
                check: a.check,
                users: a.users.spread(),
            };
            let timing = a.timing.timing();
            measured(&a.server, a.csv.outputs(), async |s: &Server| {
                modes::ingest(s, plan, timing).await
            })
            .await
        }
        Command::Batch(a) => {
            let plan = IngestPlan {
                kind: IngestKind::Batch { size: a.batch_size },
                connections: a.connections,
                concurrency: a.concurrency,
                check: a.check,
                users: a.users.spread(),
            };
            let timing = a.timing.timing();
            measured(&a.server, a.csv.outputs(), async |s: &Server| {
                modes::ingest(s, plan, timing).await
            })
            .await
        }
        Command::Rest(a) => {
            let plan = IngestPlan {
                kind: IngestKind::Rest,
                connections: 1,
                concurrency: a.concurrency,
                check: a.check,
                users: a.users.spread(),
            };
            let timing = a.timing.timing();
            measured(&a.server, a.csv.outputs(), async |s: &Server| {
                modes::ingest(s, plan, timing).await
            })
            .await
        }
        Command::E2e(a) => {
            let plan = E2ePlan {
                consumers: a.consumers.spec(),
                load: match a.outstanding {
                    Some(n) => E2eLoad::Outstanding(n.max(1)),
                    None => E2eLoad::Rate(a.rate),
                },
                connections: a.connections,
                max_outstanding: a.max_outstanding,
                users: a.users.spread(),
            };
            let timing = a.timing.timing();
            let outputs = Outputs {
                series: a.series.as_deref(),
                ..a.csv.outputs()
            };
            measured(&a.server, outputs, async |s: &Server| {
                modes::e2e(s, plan, timing).await
            })
            .await
        }
        Command::Drain(a) => {
            let spec = a.consumers.spec();
            measured(&a.server, a.csv.outputs(), async |s: &Server| {
                let users = a.users.spread();
                modes::drain(s, spec, a.backlog, a.batch_size, users, a.drain_timeout).await
            })
            .await
        }
        Command::Sweep(a) => sweep(a).await,
        Command::Scale(a) => {
            let server = Server::start(&a.server).await?;
            let plan = scale::ScalePlan {
                packets: a.packets,
                batch_size: a.batch_size,
                outstanding: a.outstanding,
                processed: a.processed,
                samples: a.samples,
                users: a.users.spread(),
            };
            let result = scale::scale(&server, &plan).await;
            server.stop().await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Floor(a) => {
            let durable = a.durable.map(|dir| (dir, Duration::from_micros(a.wait_us)));
            floor::serve(a.listen, durable).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Disk(a) => {
            disk::run(&disk::DiskPlan {
                dir: a.dir,
                rate: a.rate,
                duration: Duration::from_secs(a.duration),
                bytes: a.bytes,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tables(a) => {
            tables::run(&tables::TablesPlan {
                dir: a.dir,
                rate: a.rate,
                duration: Duration::from_secs(a.duration),
                users: a.users,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot(a) => {
            let out = a.out.unwrap_or_else(|| a.csv.with_extension("png"));
            plot::draw(&a.csv, &out, &a.font)?;
            println!("plot: {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Every target × rate as its own e2e run on a fresh server. A run that fell
/// behind is recorded (saturated); one that could not run at all is
/// reported and skipped, and makes the exit status non-zero.
async fn sweep(a: SweepArgs) -> Result<ExitCode> {
    let timing = a.timing.timing();
    report::check_csv(&a.csv)?;
    let mut failures = 0;
    for &target in &a.targets {
        for &rate in &a.rates {
            eprintln!("== sweep: {} at {rate:.0} packets/s", target.name());
            let args = ServerArgs::for_target(&a.setup, target);
            let server = match Server::start(&args).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: starting {}: {e:#}", target.name());
                    failures += 1;
                    continue;
                }
            };
            let plan = E2ePlan {
                consumers: a.consumers.spec(),
                load: E2eLoad::Rate(rate),
                connections: a.connections,
                max_outstanding: a.max_outstanding,
                users: a.users.spread(),
            };
            let result = tokio::select! {
                r = modes::e2e(&server, plan, timing) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            };
            server.stop().await;
            match result {
                Ok(report) => {
                    report.print();
                    report.append_csv(&a.csv)?;
                }
                Err(e) if e.to_string() == "interrupted" => return Err(e),
                Err(e) => {
                    eprintln!("error: {} at {rate:.0}/s: {e:#}", target.name());
                    failures += 1;
                }
            }
            // Let the last server's files and the store settle before the next.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    plot::draw(&a.csv, &a.png, &a.font)?;
    println!("csv: {}\nplot: {}", a.csv.display(), a.png.display());
    Ok(if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
