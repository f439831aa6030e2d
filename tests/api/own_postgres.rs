//! A PostgreSQL cluster of a test's own, on a free port, that the test may
//! stop (as a crash, or politely) and start again on the same data; it is
//! stopped and its directory removed when the value is dropped, even when
//! the test panics. The machine's shared server (127.0.0.1:5432) is never
//! touched: other tests run on it.
use std::path::PathBuf;

use crate::crash::free_port;

/// How `pg_ctl stop` takes the server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum StopMode {
    /// Clients disconnected, a shutdown checkpoint written.
    Fast,
    /// No checkpoint, connections cut: a crash, recovered from the WAL at
    /// the next start.
    Immediate,
}

impl StopMode {
    fn arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// The newest PostgreSQL server binaries Debian installed
/// (`/usr/lib/postgresql/<major>/bin`).
fn pg_bin() -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((major, bin))
        })
        .max();
    newest
        .expect("PostgreSQL server binaries in /usr/lib/postgresql/<major>/bin")
        .1
}

/// A PostgreSQL cluster of the test's own, on a free port, that it can stop
/// and start again; stopped and removed on drop, even when the test panics.
/// initdb and postgres refuse to run as root: they run as the `postgres`
/// OS user, in a directory it owns.
pub(crate) struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
    /// Whether a stop is due on drop.
    running: bool,
}

impl OwnPostgres {
    pub(crate) async fn start() -> OwnPostgres {
        let dir = tempfile::tempdir().expect("tempdir");
        run(
            "chown",
            &["postgres:postgres", &dir.path().display().to_string()],
        )
        .await;
        let mut pg = OwnPostgres {
            dir,
            port: free_port(),
            running: false,
        };
        let data = pg.data().display().to_string();
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        .await;
        pg.up().await;
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again: same port, same data) and waits until it
    /// accepts connections. A start that fails is tried again (at most 5
    /// times): the port, free while the server was down, may have been
    /// taken for a moment as the local port of an outgoing connection.
    pub(crate) async fn up(&mut self) {
        self.running = true;
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let (data, log) = (self.data(), self.dir.path().join("log"));
        let (data, log) = (data.display().to_string(), log.display().to_string());
        let args = [
            "-D", &data, "-o", &options, "-l", &log, "-w", "-t", "30", "start",
        ];
        for attempt in 1..=5 {
            match self.try_as_postgres("pg_ctl", &args).await {
                Ok(()) => return,
                Err(e) if attempt < 5 => {
                    println!("PostgreSQL did not start (try {attempt}): {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Stops the server the hard way (`immediate`: no shutdown checkpoint,
    /// open connections cut), as a crash would.
    pub(crate) async fn down(&mut self) {
        self.stop(StopMode::Immediate).await;
    }

    pub(crate) async fn stop(&mut self, mode: StopMode) {
        let data = self.data().display().to_string();
        self.as_postgres(
            "pg_ctl",
            &["-D", &data, "-m", mode.arg(), "-w", "-t", "30", "stop"],
        )
        .await;
        self.running = false;
    }

    /// The server's port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    async fn as_postgres(&self, program: &str, args: &[&str]) {
        if let Err(e) = self.try_as_postgres(program, args).await {
            panic!("{e}");
        }
    }

    /// Runs a PostgreSQL program as the `postgres` OS user; on failure, its
    /// output and the server log's last lines (the log spans every start).
    async fn try_as_postgres(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let program = pg_bin().join(program).display().to_string();
        let mut all = vec!["-u", "postgres", "--", program.as_str()];
        all.extend_from_slice(args);
        let output = tokio::process::Command::new("runuser")
            .args(&all)
            .current_dir(self.dir.path())
            .output()
            .await
            .unwrap_or_else(|e| panic!("runuser {all:?}: {e}"));
        if output.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        Err(format!(
            "{all:?} failed: {}{}\nserver log, last lines first:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            tail.join("\n")
        ))
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let stopped = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .args(["-D", &self.data().display().to_string()])
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            // pg_ctl failed: the postmaster's pid is the first line of its
            // pid file; SIGKILL it (its backends exit with it).
            let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        // The TempDir field removes the data directory after this.
    }
}

async fn run(program: &str, args: &[&str]) {
    let output = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
