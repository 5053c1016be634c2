//! The monitoring shipped in `deploy/monitoring/`: promtool accepts the alert rules and passes
//! their tests, and what a real head and edge expose; every metric the rules and the
//! dashboard use is one they expose.

use crate::harness::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian: apt install prometheus)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{said}");
    said
}

/// Metric names in exposition `text`: each family's and each sample's.
fn names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .map(str::to_string)
        .collect()
}

/// Metric names used in `text` (rule or dashboard expressions).
fn used(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for prefix in ["edgesync_", "process_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            found.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_rules_and_what_head_and_edge_expose() {
    within(90, async {
        let monitoring = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring");
        promtool(&["check", "rules", "alerts.yaml"], &monitoring, None);
        let tested = promtool(&["test", "rules", "alerts-test.yaml"], &monitoring, None);
        assert!(tested.contains("SUCCESS"), "{tested}");

        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        ok(head.daemon.cli(&[
            "apply",
            "-f",
            &write(dir.path(), "en.yaml", &example("nginx")),
        ]));
        wait_for("manifest", SOON, || dirs.manifest("default", "nginx")).await;
        let mut exposed = BTreeSet::new();
        for daemon in [&head.daemon, &edge] {
            let text = scrape(daemon.metrics.unwrap()).await;
            let linted = promtool(&["check", "metrics"], &monitoring, Some(&text));
            assert!(linted.trim().is_empty(), "promtool check metrics: {linted}");
            exposed.extend(names(&text));
        }

        let rules = std::fs::read_to_string(monitoring.join("alerts.yaml")).unwrap();
        let dashboard = std::fs::read_to_string(monitoring.join("dashboard.json")).unwrap();
        let parsed: serde_json::Value =
            serde_json::from_str(&dashboard).expect("dashboard is JSON");
        assert!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()));
        for (what, text) in [("alerts.yaml", &rules), ("dashboard.json", &dashboard)] {
            let unknown: Vec<String> = used(text).difference(&exposed).cloned().collect();
            assert!(
                unknown.is_empty(),
                "{what} uses metrics nobody exposes: {unknown:?}"
            );
        }
    })
    .await;
}
