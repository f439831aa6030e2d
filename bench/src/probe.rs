//! The resource use of a run, read at the measured window's two ends: the
//! server's CPU and writes (the bucket, or nats-server), the store's
//! processes (PostgreSQL's, redis-server) and PostgreSQL's WAL, this tool's
//! CPU and the whole machine's; and the server's memory, sampled throughout.
use crate::costs::{Cost, Cpu};
use crate::pg_wal::{WalCost, WalReader, WalSample};
use crate::proc_stats::{self, ProcSample, RssSampler};
use crate::report::Report;
use crate::server::{Server, StoreProcesses};

const SYSCW_NOTE: &str = "write syscalls (syscw) count every write, writev and sendmsg: \
     socket writes (answers, deliveries) as well as the disk's";
const CLUSTER_NOTE: &str = "the WAL figures and PostgreSQL's WAL writer, checkpointer and \
     background writer are the whole cluster's: other databases' work during the run counts too";

pub struct Probe {
    server: Option<u32>,
    rss: Option<RssSampler>,
    store: StoreProcesses,
    wal: Option<WalReader>,
}

/// Every counter at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    server: Option<ProcSample>,
    /// This process: the load generator and consumers.
    client_cpu: Option<f64>,
    pg_backends: Option<ProcSample>,
    pg_shared: Option<ProcSample>,
    redis: Option<ProcSample>,
    wal: Option<WalSample>,
    machine: Option<f64>,
}

impl Probe {
    pub fn start(server: &Server) -> Self {
        Self {
            server: server.pid,
            rss: server.pid.map(RssSampler::start),
            store: StoreProcesses::default(),
            wal: None,
        }
    }

    /// The store's processes as connected now (after the warmup the
    /// bucket's pool has opened its connections), and a connection for
    /// the WAL's counters.
    pub async fn find_store(&mut self, server: &Server) {
        self.store = server.store_processes().await;
        if let Some(url) = server.pg_admin_url() {
            match WalReader::connect(url).await {
                Ok(reader) => self.wal = Some(reader),
                Err(e) => eprintln!("warning: {e:#}: no WAL figures"),
            }
        }
    }

    pub async fn mark(&mut self) -> Mark {
        // /proc first, all together: the WAL's query takes a round trip.
        let mut mark = Mark {
            server: self.server.and_then(|p| proc_stats::sample(&[p])),
            client_cpu: proc_stats::cpu_seconds(std::process::id()),
            pg_backends: proc_stats::sample(&self.store.pg_backends),
            pg_shared: proc_stats::sample(&self.store.pg_shared),
            redis: self.store.redis.and_then(|p| proc_stats::sample(&[p])),
            wal: None,
            machine: proc_stats::machine_busy_seconds(),
        };
        if let Some(reader) = &mut self.wal {
            match reader.sample().await {
                Ok(s) => mark.wal = Some(s),
                Err(e) => eprintln!("warning: {e:#}"),
            }
        }
        mark
    }

    /// Fills in the costs between the marks (per `packets`) and memory.
    pub fn finish(self, a: Mark, b: Mark, window_s: f64, packets: u64, report: &mut Report) {
        let cost = |x: Option<ProcSample>, y: Option<ProcSample>| {
            x.zip(y)
                .map(|(x, y)| Cost::between(x, y, window_s, packets))
        };
        report.server_cost = cost(a.server, b.server);
        report.pg_backends = cost(a.pg_backends, b.pg_backends);
        report.pg_backend_count = self.store.pg_backends.len();
        report.pg_shared = cost(a.pg_shared, b.pg_shared);
        report.redis = cost(a.redis, b.redis);
        let store_s: Option<f64> = [report.pg_backends, report.pg_shared, report.redis]
            .iter()
            .flatten()
            .map(|c| c.cpu.seconds)
            .reduce(|x, y| x + y);
        report.store_cpu = store_s.map(|s| Cpu::new(s, window_s, packets));
        report.wal = a
            .wal
            .zip(b.wal)
            .and_then(|(x, y)| WalCost::between(x, y, packets));
        if let (Some(x), Some(y)) = (a.client_cpu, b.client_cpu) {
            report.client_cpu = Some(Cpu::new(y - x, window_s, packets));
        }
        if let (Some(x), Some(y)) = (a.machine, b.machine)
            && window_s > 0.0
        {
            report.machine_cores = Some((y - x) / window_s);
        }
        if report.server_cost.and_then(|c| c.disk).is_some() {
            report.notes.push(SYSCW_NOTE.into());
        }
        if report.wal.is_some() {
            report.notes.push(CLUSTER_NOTE.into());
        }
        report.hwm_mib = self.server.and_then(proc_stats::vm_hwm_mib);
        report.rss_max_mib = self.rss.and_then(RssSampler::stop);
    }
}
