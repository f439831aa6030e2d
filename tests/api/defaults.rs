//! The README's run command with nothing set: the binary started in an
//! empty directory makes its SQLite file and record log there (relative
//! paths), stores what it acknowledges, and starts again over them.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use tonic::transport::Channel;

use crate::helpers::packet_for;

fn start_bare(dir: &std::path::Path, port: u16) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bucket"));
    // No DATABASE_URL, REDIS_* or BUCKET_* but the port (3000 may be taken).
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
        .env("BUCKET_LISTEN", format!("127.0.0.1:{port}"))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command.spawn().expect("the bucket binary")
}

/// A client once the server answers; fails with what the server printed
/// if it exits instead.
async fn serving(server: &mut Child, port: u16) -> BucketServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the bucket exited ({status}) in an empty directory:\n{err}");
        }
        if let Ok(client) = BucketServiceClient::connect(format!("http://127.0.0.1:{port}")).await {
            return client;
        }
        assert!(Instant::now() < deadline, "the bucket did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_database_starts_in_an_empty_directory_and_again_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = start_bare(dir.path(), port);
    let mut client = serving(&mut server, port).await;
    let id = client
        .ingest(pb::IngestRequest {
            packet: Some(packet_for("defaults-user")),
        })
        .await
        .unwrap()
        .into_inner()
        .packet_id;
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(dir.path().join("bucket.db").is_file());
    assert!(dir.path().join("bucket.db-records").is_dir());

    let mut server = start_bare(dir.path(), port);
    let mut client = serving(&mut server, port).await;
    let page = client
        .user_packets(pb::UserPacketsRequest {
            user_id: "defaults-user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.packets.len(), 1);
    assert_eq!(page.packets[0].packet_id, id);
    server.kill().unwrap();
    server.wait().unwrap();
}
