//! deploy/: the Grafana dashboard and the Prometheus alert rules name only
//! metrics the bucket records (every `counter!`, `gauge!` and `histogram!`
//! in src/), and the alerts cover what the operator on call must hear of.
use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Names recorded in the code: the string after each metrics macro.
fn recorded() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![root().join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for kind in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(kind) {
                    let rest = text[at + kind.len()..].trim_start();
                    if let Some(quoted) = rest.strip_prefix('"') {
                        let end = quoted.find('"').unwrap();
                        names.insert(quoted[..end].to_owned());
                    }
                }
            }
        }
    }
    names
}

/// `bucket_…` names in a PromQL expression, histogram suffixes removed.
fn used_in(expr: &str, into: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(at) = rest.find("bucket_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        into.insert(base.to_owned());
    }
}

#[test]
fn the_dashboard_and_alerts_name_only_recorded_metrics() {
    let recorded = recorded();
    assert!(recorded.len() >= 15, "{recorded:?}");

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut dashboard_names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            used_in(target["expr"].as_str().unwrap(), &mut dashboard_names);
        }
    }

    let alerts = std::fs::read_to_string(root().join("deploy/prometheus-alerts.yml")).unwrap();
    let mut alert_names = BTreeSet::new();
    let mut alerts_defined = Vec::new();
    for line in alerts.lines().map(str::trim) {
        if let Some(expr) = line.strip_prefix("expr:") {
            used_in(expr, &mut alert_names);
        }
        if let Some(name) = line.strip_prefix("- alert:") {
            alerts_defined.push(name.trim().to_owned());
        }
    }

    for (file, names) in [("dashboard", &dashboard_names), ("alerts", &alert_names)] {
        let unknown: Vec<_> = names.difference(&recorded).collect();
        assert!(
            unknown.is_empty(),
            "the {file} names metrics the bucket does not record: {unknown:?}"
        );
    }
    // Every metric is on the dashboard.
    let missing: Vec<_> = recorded.difference(&dashboard_names).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
    // The conditions the operator must hear of.
    for alert in [
        "BucketDeadLettersRising",
        "BucketQueueGrowing",
        "BucketNoConsumer",
        "BucketStorageUnavailable",
    ] {
        assert!(
            alerts_defined.iter().any(|a| a == alert),
            "no {alert} alert"
        );
    }
}
