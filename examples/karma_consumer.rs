//! An example Karma Tracker consumer: subscribes with StreamPending, turns
//! each packet's cognitive state into a karma action, marks it processed,
//! and reconnects with backoff whenever the bucket goes away.
//!
//! cargo run --example karma_consumer -- http://127.0.0.1:3000 [name]
use std::time::Duration;

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use bucket::proto::json_to_struct;
use serde_json::json;
use tonic::transport::Channel;

/// The seed's mapping idea: focused work earns karma, distraction none.
fn karma_actions(cognitive_state: &str, focus_score: Option<f64>) -> Vec<serde_json::Value> {
    match cognitive_state {
        "DEEP_FOCUS" => {
            vec![json!({"action": "deep_focus", "reward": 10, "token": "DharmaPoints"})]
        }
        "ON_TASK" | "WORKING" => {
            vec![json!({"action": "completing_lessons", "reward": 5, "token": "DharmaPoints"})]
        }
        "THINKING" if focus_score.unwrap_or(0.0) >= 50.0 => {
            vec![json!({"action": "reflection", "reward": 2, "token": "DharmaPoints"})]
        }
        // DISTRACTED, AWAY, OFF_TASK, IDLE, FAKING, anything else: no karma.
        _ => Vec::new(),
    }
}

async fn consume(url: &str, name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let channel = Channel::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut client = BucketServiceClient::new(channel);
    let mut stream = client
        .stream_pending(pb::StreamPendingRequest {
            consumer: name.to_owned(),
            max_in_flight: 32,
            lease_seconds: 30,
        })
        .await?
        .into_inner();
    println!("subscribed to {url} as {name}");
    while let Some(delivery) = stream.message().await? {
        let Some(packet) = delivery.packet else {
            continue;
        };
        let actions = karma_actions(&packet.cognitive_state, packet.focus_score);
        let rewarded = !actions.is_empty();
        client
            .mark_processed(pb::MarkProcessedRequest {
                packet_id: packet.packet_id.clone(),
                success: true,
                karma_actions: actions
                    .iter()
                    .map(|a| json_to_struct(a.as_object().expect("actions are objects")))
                    .collect(),
                error_message: String::new(),
            })
            .await?;
        println!(
            "processed {} user={} state={} attempt={} rewarded={rewarded}",
            packet.packet_id, packet.user_id, packet.cognitive_state, delivery.delivery_attempt
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:3000".to_owned());
    let name = args.next().unwrap_or_else(|| "karma-tracker".to_owned());
    let mut backoff = Duration::from_millis(100);
    loop {
        match consume(&url, &name).await {
            // The bucket ended the stream (shutdown): reconnect at once.
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                eprintln!("bucket unavailable ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
