//! PostgreSQL's own write-ahead log over a window: bytes from the WAL insert
//! position (exact, at the instant it is read), records and full-page images
//! from `pg_stat_wal` (which backends report at most about once a second, so
//! those two are good to about a second of load at each end). Both are
//! cluster-wide: anything else writing to the same cluster during the run
//! counts too.
use anyhow::{Context as _, Result};
use sqlx::{Connection as _, PgConnection};

/// The WAL's counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalSample {
    /// Bytes of WAL ever inserted (the insert LSN as an offset).
    pub inserted_bytes: u64,
    pub records: u64,
    pub full_page_images: u64,
    /// pg_stat_wal's own wal_bytes (lags like records).
    pub stat_bytes: u64,
}

/// A connection to the admin database kept for the window's two reads, so
/// that opening it is not inside the measurement. Its queries write no WAL.
pub struct WalReader {
    conn: PgConnection,
}

impl WalReader {
    pub async fn connect(admin_url: &str) -> Result<Self> {
        let conn = PgConnection::connect(admin_url)
            .await
            .context("connecting to PostgreSQL for pg_stat_wal")?;
        Ok(Self { conn })
    }

    pub async fn sample(&mut self) -> Result<WalSample> {
        let (inserted, records, fpi, stat_bytes): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint, \
                    wal_records, wal_fpi, wal_bytes::bigint \
             FROM pg_stat_wal",
        )
        .fetch_one(&mut self.conn)
        .await
        .context("reading pg_stat_wal")?;
        let u = |v: i64| v.max(0) as u64;
        Ok(WalSample {
            inserted_bytes: u(inserted),
            records: u(records),
            full_page_images: u(fpi),
            stat_bytes: u(stat_bytes),
        })
    }
}

/// The WAL written between two samples, per packet.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WalCost {
    pub bytes_per_packet: f64,
    pub records_per_packet: f64,
    pub fpi_per_packet: f64,
    pub stat_bytes_per_packet: f64,
}

impl WalCost {
    pub fn between(a: WalSample, b: WalSample, packets: u64) -> Option<Self> {
        let n = packets as f64;
        let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / n;
        (packets > 0).then(|| Self {
            bytes_per_packet: per(a.inserted_bytes, b.inserted_bytes),
            records_per_packet: per(a.records, b.records),
            fpi_per_packet: per(a.full_page_images, b.full_page_images),
            stat_bytes_per_packet: per(a.stat_bytes, b.stat_bytes),
        })
    }

    pub fn human(&self) -> String {
        format!(
            "{:.0} B/packet (insert position), {:.1} records and {:.2} full-page images per packet \
             (pg_stat_wal, which says {:.0} B/packet)",
            self.bytes_per_packet,
            self.records_per_packet,
            self.fpi_per_packet,
            self.stat_bytes_per_packet
        )
    }
}
