//! Replays the fuzz targets' inputs through the targets' own checks
//! (fuzz/src/check.rs, included below): every crasher kept in
//! fuzz/regressions/<target>/, and the seed corpora in fuzz/seeds/<target>/.
//! No server, no database. To add a crasher: copy it from
//! fuzz/artifacts/<target>/ into fuzz/regressions/<target>/ (README, "Fuzzing").
#[path = "../../fuzz/src/check.rs"]
mod check;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Every file under `fuzz/<dir>`, sorted; none if the folder is absent.
fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable folder").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target` over every file of each folder; fails naming each input
/// whose check failed.
fn replay(dirs: &[&str], target: fn(&[u8])) -> usize {
    let mut failed = Vec::new();
    let mut count = 0;
    for dir in dirs {
        for path in inputs(dir) {
            let bytes = std::fs::read(&path).expect("a readable input");
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| target(&bytes))).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "failing inputs:\n{}", failed.join("\n"));
    count
}

#[test]
fn json_packet_regressions_and_seeds() {
    let n = replay(
        &["regressions/json_packet", "seeds/json_packet"],
        check::json_packet,
    );
    assert!(n > 0, "no inputs found under fuzz/");
}

#[test]
fn proto_packet_regressions_and_seeds() {
    let n = replay(
        &["regressions/proto_packet", "seeds/proto_packet"],
        check::proto_packet,
    );
    assert!(n > 0, "no inputs found under fuzz/");
}

#[test]
fn record_log_regressions_and_seeds() {
    let n = replay(
        &["regressions/record_log", "seeds/record_log"],
        check::record_log,
    );
    assert!(n > 0, "no inputs found under fuzz/");
}

#[test]
fn batch_limit_regressions_and_seeds() {
    let n = replay(
        &["regressions/batch_limit", "seeds/batch_limit"],
        check::batch_limit,
    );
    assert!(n > 0, "no inputs found under fuzz/");
}
