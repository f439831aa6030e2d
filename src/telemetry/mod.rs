//! Logs (tracing) and metrics (Prometheus text).
use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{Format, JsonFields};

use self::request::WithRequest;

pub mod request;

/// Structured logs to stderr; `RUST_LOG` overrides the default level.
/// A line logged while a request is handled carries its id and method
/// (`request`).
pub fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,hyper=warn,tower=warn"));
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").is_some(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests start many servers in one process) is harmless.
    let _ = if json {
        builder
            .fmt_fields(JsonFields::new())
            .event_format(WithRequest::json(Format::default().json()))
            .try_init()
    } else {
        builder
            .event_format(WithRequest::text(Format::default().with_ansi(ansi)))
            .try_init()
    };
}

/// Colours only for a person at a terminal: a file, a pipe or journald
/// would keep the escape codes in every line (and formatting them was a
/// sixth of what a request's log span cost). `NO_COLOR` turns them off
/// there too (no-color.org).
fn colours(stderr_is_terminal: bool, no_color: bool) -> bool {
    stderr_is_terminal && !no_color
}

/// The process's metrics recorder, installed on first use.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            // Histograms keep raw samples until upkeep folds them in; without
            // it, memory grows with every request between two scrapes.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            // Counters exist from the start, so rate() sees their first step.
            for name in [
                "bucket_packets_ingested_total",
                "bucket_deliveries_total",
                "bucket_redeliveries_total",
                "bucket_dead_letters_total",
            ] {
                metrics::counter!(name).increment(0);
            }
            handle
        })
        .clone()
}

#[cfg(test)]
mod colour_tests {
    use super::colours;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, false));
        assert!(!colours(false, false));
        assert!(!colours(true, true));
        assert!(!colours(false, true));
    }
}
