use bucket::config::Config;
use bucket::startup::Application;
use bucket::telemetry;
use clap::Parser;

#[global_allocator]
static ALLOCATOR: bucket::allocator::Allocator = bucket::allocator::Allocator {};

/// mimalloc's options, set before Rust's runtime allocates anything:
/// constructors with a priority run before those without (mimalloc's own)
/// and before `main`.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static TUNE_ALLOCATOR: extern "C" fn() = bucket::allocator::tune;

fn main() -> anyhow::Result<()> {
    // Before any thread or SQLite connection exists.
    #[cfg(not(target_os = "linux"))]
    bucket::allocator::tune();
    // SAFETY: no other thread exists yet, so none uses SQLite. Nothing has
    // opened it either, so the settings hold.
    let _ = unsafe { bucket::store::before_first_connection() };
    let config = Config::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime_workers(cores))
        .enable_all()
        .build()?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::init_logs(config.log_json);
    let app = Application::build(config).await?;
    app.run(shutdown_signal()).await
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
