//! The server under test: started by the tool with fresh state (a bucket on
//! a new SQLite file, a new PostgreSQL database, + a Redis prefix of its own;
//! or a nats-server on a new store directory) and stopped and cleaned up at
//! the end, or one already running (--url / --nats-url).
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use bucket::proto::bucket::v1 as pb;
use clap::{Args, ValueEnum};
use sqlx::{Connection, Executor, PgConnection};
use tokio::process::{Child, Command};

use crate::load::grpc_client;
use crate::{nats, redis_keys};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The bucket on a new SQLite file, in-memory queue.
    Sqlite,
    /// The bucket on a new PostgreSQL database, in-memory queue.
    Postgres,
    /// The bucket on a new PostgreSQL database with the Redis queue.
    Redis,
    /// NATS JetStream (nats-server -js on a new store directory).
    Nats,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Sqlite => "sqlite",
            Target::Postgres => "postgres",
            Target::Redis => "redis",
            Target::Nats => "nats",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Target::from_str(name, true).ok()
    }

    /// How plots and reports call it.
    pub fn label(self) -> &'static str {
        match self {
            Target::Sqlite => "bucket SQLite",
            Target::Postgres => "bucket PostgreSQL",
            Target::Redis => "bucket PostgreSQL + Redis",
            Target::Nats => "NATS JetStream",
        }
    }
}

/// How to start servers (shared by every mode, sweep included).
#[derive(Args, Clone, Debug)]
pub struct ServerSetup {
    /// The bucket binary [default: target/release/bucket of this repository]
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Extra environment for the started bucket, KEY=VALUE (repeatable)
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    pub server_env: Vec<String>,
    /// PostgreSQL where the per-run databases are created and dropped
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_admin: String,
    /// Redis for --target redis (the run's keys get a unique prefix, deleted afterwards)
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The nats-server binary for --target nats
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    pub nats_bin: PathBuf,
}

/// Which server to measure.
#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// Start this server with fresh state (with --url: only the report's label)
    #[arg(long, value_enum, default_value_t = Target::Sqlite)]
    pub target: Target,
    /// Measure a bucket already running at this URL instead of starting one
    #[arg(long, conflicts_with = "nats_url")]
    pub url: Option<String>,
    /// Use a running nats-server at this URL (implies --target nats; its
    /// stream PRANA is deleted and created again)
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Pid of the server at --url / --nats-url, for its CPU and memory
    #[arg(long)]
    pub pid: Option<u32>,
    #[command(flatten)]
    pub setup: ServerSetup,
}

impl ServerArgs {
    pub fn for_target(setup: &ServerSetup, target: Target) -> Self {
        Self {
            target,
            url: None,
            nats_url: None,
            pid: None,
            setup: setup.clone(),
        }
    }
}

pub struct Server {
    pub target: Target,
    /// http://127.0.0.1:PORT (bucket) or nats://127.0.0.1:PORT.
    pub url: String,
    pub pid: Option<u32>,
    /// What runs, for the report's header.
    pub description: String,
    child: Option<Child>,
    /// Started by the tool (cleaned up at the end) or given (--url).
    owned: bool,
    tmp: Option<tempfile::TempDir>,
    pg: Option<PgDatabase>,
    redis_prefix: Option<String>,
    setup: ServerSetup,
}

/// The store's processes, found once the bucket is connected.
#[derive(Clone, Debug, Default)]
pub struct StoreProcesses {
    /// The backends connected to the run's database.
    pub pg_backends: Vec<u32>,
    /// The cluster's WAL writer, checkpointer and background writer: they
    /// work for every database, this run's included.
    pub pg_shared: Vec<u32>,
    pub redis: Option<u32>,
}

struct PgDatabase {
    admin: String,
    name: String,
}

impl Server {
    pub fn is_nats(&self) -> bool {
        self.target == Target::Nats
    }

    pub async fn start(args: &ServerArgs) -> Result<Self> {
        let target = if args.nats_url.is_some() {
            Target::Nats
        } else {
            args.target
        };
        let mut server = Server {
            target,
            url: String::new(),
            pid: args.pid,
            description: String::new(),
            child: None,
            owned: false,
            tmp: None,
            pg: None,
            redis_prefix: None,
            setup: args.setup.clone(),
        };
        let launched = match (&args.url, &args.nats_url, target) {
            (Some(url), _, Target::Nats) => Err(anyhow!(
                "--url is a bucket; use --nats-url {url} for a running nats-server"
            )),
            (Some(url), _, _) => server.attach_bucket(url).await,
            (_, Some(url), _) => server.attach_nats(url).await,
            (None, None, Target::Nats) => server.launch_nats().await,
            (None, None, _) => server.launch_bucket().await,
        };
        match launched {
            Ok(()) => Ok(server),
            Err(e) => {
                server.stop().await;
                Err(e)
            }
        }
    }

    async fn attach_bucket(&mut self, url: &str) -> Result<()> {
        self.url = url.trim_end_matches('/').to_owned();
        self.description = format!("bucket at {}{}", self.url, pid_note(self.pid));
        wait_for_bucket(&self.url, None, None).await
    }

    async fn attach_nats(&mut self, url: &str) -> Result<()> {
        self.url = url.to_owned();
        self.description = format!("nats-server at {url}{}", pid_note(self.pid));
        nats::create_stream(&self.url).await
    }

    async fn launch_bucket(&mut self) -> Result<()> {
        let bin = server_bin(self.setup.server_bin.as_deref())?;
        let tmp = tempdir()?;
        let port = free_port()?;
        self.url = format!("http://127.0.0.1:{port}");
        self.owned = true;
        let database_url = match self.target {
            Target::Sqlite => format!("sqlite://{}", tmp.path().join("bucket.db").display()),
            _ => self.create_database().await?,
        };
        let mut cmd = Command::new(&bin);
        // Only what the tool sets (and --server-env) reaches the server: a
        // REDIS_HOST or DATABASE_URL in the caller's shell would change the
        // target behind the report's back.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("BUCKET_") || key.starts_with("REDIS_") || key == "DATABASE_URL" {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.env("BUCKET_LISTEN", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", &database_url)
            .env("RUST_LOG", "warn");
        let mut queue = "in-memory queue".to_owned();
        if self.target == Target::Redis {
            let prefix = format!("bench-{}:", uuid::Uuid::new_v4().simple());
            cmd.env("REDIS_URL", &self.setup.redis_url)
                .env("BUCKET_REDIS_PREFIX", &prefix);
            queue = format!("Redis queue {} prefix {prefix}", self.setup.redis_url);
            self.redis_prefix = Some(prefix);
        }
        for kv in &self.setup.server_env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("--server-env {kv:?} is not KEY=VALUE"))?;
            cmd.env(k, v);
        }
        let log = tmp.path().join("server.log");
        let child = spawn_logged(&mut cmd, &log)?;
        self.pid = child.id();
        self.child = Some(child);
        self.description = format!(
            "bucket {} on {}, {queue}",
            bin.display(),
            redact(&database_url)
        );
        self.tmp = Some(tmp);
        wait_for_bucket(&self.url, self.child.as_mut(), Some(&log)).await
    }

    async fn launch_nats(&mut self) -> Result<()> {
        let tmp = tempdir()?;
        let port = free_port()?;
        self.url = format!("nats://127.0.0.1:{port}");
        self.owned = true;
        let bin = &self.setup.nats_bin;
        let mut cmd = Command::new(bin);
        cmd.arg("-js")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .arg("-sd")
            .arg(tmp.path().join("jetstream"));
        let log = tmp.path().join("server.log");
        let child = spawn_logged(&mut cmd, &log)
            .with_context(|| format!("starting {} (apt-get install nats-server)", bin.display()))?;
        self.pid = child.id();
        self.child = Some(child);
        self.description = format!("{} -js on {}", bin.display(), self.url);
        self.tmp = Some(tmp);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(exit) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("nats-server exited ({exit}):\n{}", log_tail(&log));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("nats-server did not listen in 15 s:\n{}", log_tail(&log));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nats::create_stream(&self.url).await
    }

    async fn create_database(&mut self) -> Result<String> {
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&self.setup.pg_admin)
            .await
            .with_context(|| format!("connecting to {}", redact(&self.setup.pg_admin)))?;
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        self.pg = Some(PgDatabase {
            admin: self.setup.pg_admin.clone(),
            name: name.clone(),
        });
        let mut url = reqwest::Url::parse(&self.setup.pg_admin)?;
        url.set_path(&format!("/{name}"));
        Ok(url.to_string())
    }

    /// The size of the run's database: SQLite's file and WAL, or
    /// PostgreSQL's `pg_database_size`.
    pub async fn database_bytes(&self) -> Option<u64> {
        if let Some(pg) = &self.pg {
            let mut conn = PgConnection::connect(&pg.admin).await.ok()?;
            let (bytes,): (i64,) = sqlx::query_as("SELECT pg_database_size($1)")
                .bind(&pg.name)
                .fetch_one(&mut conn)
                .await
                .ok()?;
            return Some(bytes as u64);
        }
        let dir = self.tmp.as_ref()?.path();
        let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
        Some(size("bucket.db") + size("bucket.db-wal"))
    }

    /// Processes of the store the bucket talks to, whose CPU and writes the
    /// bucket's own figures leave out. PostgreSQL: the backends serving the
    /// run's database (as connected now) and the cluster's WAL writer,
    /// checkpointer and background writer, which write for every database
    /// (the run's WAL, flushed by a backend at its commit or by the WAL
    /// writer, and its pages); Redis: redis-server.
    pub async fn store_processes(&self) -> StoreProcesses {
        let mut store = StoreProcesses::default();
        if let Some(pg) = &self.pg
            && let Ok(mut conn) = PgConnection::connect(&pg.admin).await
        {
            let rows: Vec<(i32, bool)> = sqlx::query_as(
                "SELECT pid, datname IS NOT DISTINCT FROM $1 FROM pg_stat_activity WHERE datname = $1 \
                 OR backend_type IN ('walwriter', 'checkpointer', 'background writer')",
            )
            .bind(&pg.name)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
            for (pid, ours) in rows {
                if ours {
                    store.pg_backends.push(pid as u32);
                } else {
                    store.pg_shared.push(pid as u32);
                }
            }
        }
        if self.redis_prefix.is_some()
            && let Ok(pid) = redis_keys::server_pid(&self.setup.redis_url).await
        {
            store.redis = Some(pid);
        }
        store
    }

    /// The PostgreSQL the run's database lives on (for its WAL figures).
    pub fn pg_admin_url(&self) -> Option<&str> {
        self.pg.as_ref().map(|pg| pg.admin.as_str())
    }

    /// Stops what the tool started and removes its state; problems are
    /// printed, not returned: the measurement is already done.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SIGTERM: the bucket ends its streams and commits its queued
                // writes, nats-server flushes; SIGKILL only if that hangs.
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                eprintln!("warning: server did not stop in 10 s; killing it");
                let _ = child.kill().await;
            }
        }
        // A server the tool did not start keeps running: leave it without
        // the benchmark's stream.
        if self.is_nats()
            && !self.owned
            && !self.url.is_empty()
            && let Err(e) = nats::delete_stream(&self.url).await
        {
            eprintln!("warning: {e:#}");
        }
        if let Some(pg) = self.pg.take() {
            let dropped = async {
                let mut conn = PgConnection::connect(&pg.admin).await?;
                conn.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", pg.name).as_str())
                    .await?;
                anyhow::Ok(())
            };
            if let Err(e) = dropped.await {
                eprintln!("warning: could not drop database {}: {e:#}", pg.name);
            }
        }
        if let Some(prefix) = self.redis_prefix.take()
            && let Err(e) = redis_keys::delete_prefix(&self.setup.redis_url, &prefix).await
        {
            eprintln!("warning: could not delete Redis keys {prefix}*: {e:#}");
        }
    }
}

/// Waits until Status answers (the bucket is migrated and serving).
async fn wait_for_bucket(
    url: &str,
    mut child: Option<&mut Child>,
    log: Option<&Path>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_error: String;
    loop {
        if let Some(c) = child.as_deref_mut()
            && let Some(exit) = c.try_wait()?
        {
            bail!(
                "the bucket exited ({exit}):\n{}",
                log.map(log_tail).unwrap_or_default()
            );
        }
        match grpc_client(url).await {
            Ok(mut client) => match client.status(pb::StatusRequest {}).await {
                Ok(_) => return Ok(()),
                Err(e) => last_error = e.to_string(),
            },
            Err(e) => last_error = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "the bucket at {url} did not answer Status in 30 s ({last_error})\n{}",
                log.map(log_tail).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pid_note(pid: Option<u32>) -> String {
    match pid {
        Some(p) if crate::proc_stats::cpu_seconds(p).is_some() => format!(" (pid {p})"),
        Some(p) => format!(" (pid {p} is not readable in /proc: no CPU or memory figures)"),
        None => " (no --pid: no CPU or memory figures)".into(),
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    Ok(cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // If the tool dies, its server goes with it.
        .kill_on_drop(true)
        .spawn()?)
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn tempdir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("bucket-bench-").tempdir()?)
}

/// A port nothing listens on now (the OS picks it; a tiny race remains
/// until the server binds it).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A URL without its password, for printing.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// --server-bin, else target/release/bucket of this repository (found from
/// where this crate was compiled, then from the working directory), else a
/// `bucket` next to this binary (the same target directory).
pub fn server_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--server-bin {} does not exist", p.display());
    }
    let mut candidates =
        vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/bucket")];
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("target/release/bucket"));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("bucket"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or(p))
        .ok_or_else(|| {
            anyhow!("no bucket binary: build it (cargo build --release --bin bucket) or pass --server-bin")
        })
}
