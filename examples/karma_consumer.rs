//! An example Karma Tracker consumer, written the fastest correct way:
//! one Consume stream with room for many packets in flight, its marks sent
//! back on the same stream, as many per request as have piled up while the
//! previous one was on its way (no timer, so a lone packet is marked at
//! once). It reconnects with backoff whenever the bucket goes away; packets
//! it had not marked come back to some consumer, so a crash here loses
//! nothing.
//!
//! It uses the `bucket-client` crate (client/), as the Karma Tracker would.
//!
//! cargo run --example karma_consumer -- http://127.0.0.1:3000 [name]
//! (a consumer token, if the bucket wants one: BUCKET_TOKEN=...)
use std::time::Duration;

use bucket_client::{Received, connect, consume as open, json_to_struct, pb};
use serde_json::json;

/// Packets a stream may hold unmarked: enough to keep the requests of marks
/// full while one is on its way.
const IN_FLIGHT: u32 = 256;

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

async fn consume(
    url: &str,
    name: &str,
    token: Option<&str>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = connect(url, token).await?;
    let (mut consumer, acker) = open(
        &mut client,
        pb::ConsumeSettings {
            consumer: name.to_owned(),
            max_in_flight: IN_FLIGHT,
            lease_seconds: 30,
        },
    )
    .await?;
    println!("subscribed to {url} as {name}");
    while let Some(received) = consumer.next().await? {
        let delivery = match received {
            Received::Delivery(delivery) => delivery,
            Received::Answer(answer) => {
                // A refused mark's packet comes back when its lease ends:
                // nothing to redo here.
                for refused in answer.marks.iter().filter_map(|r| match &r.outcome {
                    Some(pb::consume_result::Outcome::Error(e)) => Some(e),
                    _ => None,
                }) {
                    eprintln!("mark refused: {}", refused.message);
                }
                continue;
            }
        };
        let Some(packet) = delivery.packet else {
            continue;
        };
        let actions = karma_actions(&packet.cognitive_state, packet.focus_score);
        println!(
            "marking {} user={} state={} attempt={} rewarded={}",
            packet.packet_id,
            packet.user_id,
            packet.cognitive_state,
            delivery.delivery_attempt,
            !actions.is_empty()
        );
        let outcome = pb::ConsumeMark {
            lease_token: delivery.lease_token,
            success: true,
            karma_actions: actions
                .iter()
                .map(|a| json_to_struct(a.as_object().expect("actions are objects")))
                .collect(),
            error_message: String::new(),
        };
        // Fails only when the stream is gone: reconnect after a backoff.
        acker.mark(outcome).await?;
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
    let token = std::env::var("BUCKET_TOKEN").ok();
    let mut backoff = Duration::from_millis(100);
    loop {
        match consume(&url, &name, token.as_deref()).await {
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
