//! The README's walkthrough, run: every grpcurl command in it, in order, by
//! a real command-line gRPC client (`buf curl`, from the @bufbuild/buf
//! package the test command installs; it takes the same JSON and uses
//! server reflection as grpcurl does), against a real bucket. The `0199…`
//! ids are filled in with real ones; the answers the README shows in
//! comments (`# {...}`) must match what comes back, key by key.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{Backend, TestApp, ingest, packet_for};

/// One grpcurl command from the README, and the answer it shows.
#[derive(Debug)]
struct Command {
    args: Vec<String>,
    shown: String,
}

fn buf() -> PathBuf {
    if let Ok(path) = std::env::var("BUCKET_TEST_BUF") {
        return path.into();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser/node_modules/.bin/buf");
    assert!(
        path.exists(),
        "buf is not installed: run `bash tests/run.sh` (it installs it with the browser \
         example), or set BUCKET_TEST_BUF to a `buf` executable"
    );
    path
}

/// The `sh` blocks of the README's walkthrough section.
fn walkthrough_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme
        .find("## Walkthrough")
        .expect("a walkthrough section");
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut blocks = Vec::new();
    let mut rest = &section[..end];
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("```").expect("a closed block");
        blocks.push(body[..close].to_owned());
        rest = &body[close + 3..];
    }
    blocks
}

/// Splits a block into commands as a shell would: words, single quotes
/// (which may span lines), `\` line continuations, `#` comments (kept as
/// the answer the previous command shows).
fn commands(block: &str) -> Vec<Command> {
    let mut out: Vec<Command> = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = block.chars().peekable();
    let finish = |words: &mut Vec<String>, out: &mut Vec<Command>| {
        if !words.is_empty() {
            out.push(Command {
                args: std::mem::take(words),
                shown: String::new(),
            });
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    w.push(q);
                }
            }
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
            }
            '#' if word.is_none() => {
                let comment: String = chars.by_ref().take_while(|c| *c != '\n').collect();
                words.extend(word.take());
                finish(&mut words, &mut out);
                if let Some(last) = out.last_mut() {
                    last.shown.push_str(comment.trim());
                    last.shown.push(' ');
                }
            }
            ' ' | '\t' => words.extend(word.take()),
            '\n' => {
                words.extend(word.take());
                finish(&mut words, &mut out);
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word.take());
    finish(&mut words, &mut out);
    out.into_iter()
        .filter(|c| c.args.first().is_some_and(|a| a == "grpcurl"))
        .collect()
}

/// The `"key": value` pairs an answer in the README shows, leaving out
/// elided values (`…`) and nested ones.
fn shown_pairs(shown: &str) -> Vec<String> {
    let mut pairs = Vec::new();
    let mut rest = shown;
    while let Some(k) = rest.find('"') {
        let after = &rest[k + 1..];
        let Some(kend) = after.find('"') else { break };
        let key = &after[..kend];
        let tail = &after[kend + 1..];
        if let Some(value) = tail.strip_prefix(": ") {
            let end = value.find([',', '}', ']']).unwrap_or(value.len());
            let v = value[..end].trim();
            if !v.is_empty() && !v.contains('…') && !v.starts_with(['{', '[']) {
                pairs.push(format!("\"{key}\": {v}"));
            }
        }
        rest = tail;
    }
    pairs
}

/// grpcurl's arguments as buf curl's: `-plaintext HOST METHOD` becomes an
/// h2c URL; `list` and `describe` become `--list-services` and
/// `--list-methods`.
fn buf_args(grpcurl: &[String], addr: &str) -> Vec<String> {
    let mut args = vec![
        "curl".to_owned(),
        "--protocol".into(),
        "grpc".into(),
        "--http2-prior-knowledge".into(),
    ];
    let mut words = grpcurl[1..].iter().filter(|a| *a != "-plaintext");
    let mut positional = Vec::new();
    while let Some(a) = words.next() {
        if a == "-d" {
            args.push("-d".into());
            args.push(words.next().expect("-d takes the JSON").clone());
        } else {
            positional.push(a.clone());
        }
    }
    match positional.as_slice() {
        [_, list] if list == "list" => {
            args.push("--list-services".into());
            args.push(format!("http://{addr}"));
        }
        // buf curl lists every method (a service in the URL is read as a
        // path prefix); the test checks the service's are there.
        [_, describe, _service] if describe == "describe" => {
            args.push("--list-methods".into());
            args.push(format!("http://{addr}"));
        }
        [_, method] => args.push(format!("http://{addr}/{method}")),
        other => panic!("a grpcurl command this test does not know: {other:?}"),
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_runs_as_written() {
    let buf = buf();
    let app = TestApp::spawn(Backend::Sqlite).await;
    let addr = app.url().trim_start_matches("http://").to_owned();
    // Packets for the `0199…` of the commands after the one the
    // walkthrough ingests (the subscriber below receives them all).
    let mut client = app.client().await;
    let mut spare = Vec::new();
    for _ in 0..8 {
        spare.push(ingest(&mut client, packet_for("user_123")).await);
    }

    let blocks = walkthrough_blocks();
    let all: Vec<Command> = blocks.iter().flat_map(|b| commands(b)).collect();
    assert!(all.len() >= 10, "the walkthrough's commands: {all:?}");

    // The first command subscribes and keeps streaming: it runs beside
    // the others, and must show a leased delivery of what they ingest.
    let first = &all[0];
    assert!(first.args.last().unwrap().ends_with("/StreamPending"));
    let mut stream = tokio::process::Command::new(&buf)
        .args(buf_args(&first.args, &addr))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("buf curl starts");
    let mut lines = BufReader::new(stream.stdout.take().unwrap()).lines();

    // Ids the walkthrough ingested, for its next `0199…`, then spare ones.
    let mut ids: Vec<String> = Vec::new();
    let mut fresh: std::collections::VecDeque<String> = Default::default();
    let mut ran = 0;
    for command in &all[1..] {
        let mut args = buf_args(&command.args, &addr);
        for a in &mut args {
            while a.contains("0199…") {
                let id = fresh
                    .pop_front()
                    .or_else(|| spare.pop())
                    .expect("enough spare packets");
                *a = a.replacen("0199…", &id, 1);
            }
        }
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(&buf).args(&args).output(),
        )
        .await
        .expect("buf curl answers within 30 s")
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Compact, as the README writes answers.
        let compact: String = match serde_json::from_str::<serde_json::Value>(&stdout) {
            Ok(v) => v.to_string().replace("\":", "\": ").replace(",\"", ", \""),
            Err(_) => stdout.to_string(),
        };
        for pair in shown_pairs(&command.shown) {
            assert!(
                compact.contains(&pair),
                "{args:?}: the README shows {pair}, the answer was {compact}"
            );
        }
        if args.last().unwrap().ends_with("/Ingest")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&stdout)
        {
            let id = v["packetId"].as_str().unwrap().to_owned();
            fresh.push_back(id.clone());
            ids.push(id);
        }
        if command.args.iter().any(|a| a == "list") {
            assert!(stdout.contains("bucket.v1.BucketService"), "{stdout}");
        }
        if command.args.iter().any(|a| a == "describe") {
            assert!(
                stdout.contains("bucket.v1.BucketService/Ingest"),
                "{stdout}"
            );
        }
        ran += 1;
    }
    assert!(!ids.is_empty(), "the walkthrough ingests");

    // The subscriber received the walkthrough's packet, leased.
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            if seen.contains(&ids[0]) && seen.contains("PACKET_STATUS_LEASED") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(found.unwrap_or(false), "the subscriber showed: {seen}");
    assert!(seen.contains("leaseToken"), "{seen}");
    stream.kill().await.unwrap();
    assert!(ran >= 9);
}
