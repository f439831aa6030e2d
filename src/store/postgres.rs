//! PostgreSQL, for real deployments and for several bucket nodes.
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

pub struct PgBackend {
    writes: PgPool,
    reads: PgPool,
}

impl PgBackend {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self {
            writes: pool.clone(),
            reads: pool,
        })
    }
}

// PostgreSQL takes concurrent transactions, so a few writers commit side by side.
super::sql::sql_backend!(
    PgBackend,
    sqlx::Postgres,
    Uuid,
    |id: Uuid| id,
    |id: Uuid| id,
    writers = 4
);
