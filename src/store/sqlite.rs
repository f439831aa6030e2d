//! SQLite, the embedded default: one file, WAL, an fsync per commit.
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub struct SqliteBackend {
    /// One connection: SQLite has one writer anyway, and a connection that
    /// always writes keeps its page cache warm.
    writes: SqlitePool,
    reads: SqlitePool,
}

impl SqliteBackend {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before ingest answers, even if the
            // machine loses power. Group commit pays for the fsync.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let writes = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writes).await?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(Self { writes, reads })
    }
}

super::sql::sql_backend!(
    SqliteBackend,
    sqlx::Sqlite,
    uuid::fmt::Hyphenated,
    |id: Uuid| id.hyphenated(),
    |id: uuid::fmt::Hyphenated| id.into_uuid(),
    writers = 1
);
