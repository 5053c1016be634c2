//! What the CLI shows a person: `status`, `get` (JSON, YAML, table) and `crd` on head and
//! edge, and `dev` mode showing a manifest appear and change.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_get_and_crd_show_what_a_person_needs() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, _, edge) = head_and_edge(dir.path()).await;
        let out = cli_stdin(
            &[
                "apply",
                "-f",
                "-",
                "--socket",
                head.daemon.socket.to_str().unwrap(),
            ],
            &example("nginx"),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let node = wait_for("Running at the head", SOON, || {
            let node = head
                .daemon
                .json(&["get", "edgenodes", "edge01", "-o", "json"]);
            (node["status"]["phase"] == "Running").then_some(node)
        })
        .await;
        assert_eq!(node["apiVersion"], "edgesync.io/v1alpha1");
        assert_eq!(node["kind"], "EdgeNode");
        assert_eq!(node["metadata"]["namespace"], "default");
        assert_eq!(node["spec"]["pods"][0]["metadata"]["name"], "nginx");
        assert_eq!(node["status"]["online"], true);
        assert!(node["status"]["lastSyncedAt"].is_string());
        let types: Vec<_> = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].clone())
            .collect();
        assert_eq!(types, ["Synced", "Online", "Valid"]);

        let status = head.daemon.json(&["status", "-o", "json"]);
        let peer = &status["peers"][0];
        assert_eq!(
            (
                peer["name"].as_str(),
                peer["role"].as_str(),
                peer["connected"].as_bool()
            ),
            (Some("edge01"), Some("edge"), Some(true))
        );
        assert_eq!(status["documents"][0]["key"], "default/edge01");
        let text = ok(edge.cli(&["status"]));
        assert!(
            text.contains("Peers:") && text.contains("head-1") && text.contains("connected"),
            "{text}"
        );
        assert!(text.contains("edgesync_default_nginx.json"), "{text}");
        let yaml = ok(head
            .daemon
            .cli(&["get", "edgenodes", "edge01", "-o", "yaml"]));
        assert!(yaml.contains("kind: EdgeNode"), "{yaml}");

        let crd = ok(cli(&["crd"]));
        assert_eq!(crd, include_str!("../../deploy/crd.yaml"));

        edge.stop().await;
        let node = wait_for("Offline at the head", SOON, || {
            let node = head
                .daemon
                .json(&["get", "edgenodes", "edge01", "-o", "json"]);
            (node["status"]["phase"] == "Offline").then_some(node)
        })
        .await;
        assert_eq!(node["status"]["online"], false);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_shows_the_manifest_appear_and_change() {
    within(60, async {
        let out = tokio::task::spawn_blocking(|| cli(&["dev", "--once"]))
            .await
            .unwrap();
        let text = ok(out);
        assert!(
            text.contains("--- new:") && text.contains("edgesync_default_nginx.json"),
            "{text}"
        );
        assert!(
            text.contains("--- changed:") && text.contains("\"image\": \"nginx:1.27\""),
            "{text}"
        );
    })
    .await;
}

#[test]
fn version_completion_and_log_level_work_as_documented() {
    let text = cli(&["version"]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    for line in [
        "edgesync ",
        "commit:",
        "build date:",
        "wire:       version 1 (ALPN edgesync/1.3, edgesync/1.2, edgesync/1.1, edgesync/1)",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    let json: serde_json::Value = serde_json::from_slice(&cli(&["version", "-o", "json"]).stdout)
        .expect("version -o json is JSON");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["wireVersion"], 1);
    assert!(json["commit"].as_str().is_some_and(|c| !c.is_empty()));

    for shell in ["bash", "zsh", "fish"] {
        let script = cli(&["completion", shell]);
        assert!(script.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&script.stdout);
        assert!(
            script.contains("edgesync") && script.contains("apply"),
            "{shell}"
        );
    }
    // The bash script is valid bash.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgesync.bash");
    std::fs::write(&file, cli(&["completion", "bash"]).stdout).unwrap();
    let checked = std::process::Command::new("bash")
        .arg("-n")
        .arg(&file)
        .status()
        .unwrap();
    assert!(checked.success(), "bash -n refused the completion script");

    let bad = cli(&["--log-level", "nope[", "status"]);
    assert_eq!(bad.status.code(), Some(2));
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("--log-level"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_and_diff_change_nothing_and_delete_takes_a_file() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let two = |image: &str| {
            format!(
                "{}---\n{}",
                edgenode("default", "edge01", &[("web", image)]),
                edgenode("default", "edge02", &[("web", image)])
            )
        };
        let file = write(dir.path(), "two.yaml", &two("nginx:1"));
        let stored =
            || head.daemon.json(&["get", "edgenodes", "-A", "-o", "json"])["items"].clone();

        let server = ok(head.daemon.cli(&["apply", "--dry-run=server", "-f", &file]));
        assert_eq!(
            server,
            "edgenode.edgesync.io/edge01 created (server dry run)\n\
             edgenode.edgesync.io/edge02 created (server dry run)\n"
        );
        let client = ok(head.daemon.cli(&["apply", "--dry-run", "-f", &file]));
        assert!(client.contains("edge01 checked (dry run)"), "{client}");
        assert_eq!(
            stored(),
            serde_json::json!([]),
            "a dry run stored something"
        );
        let bad = write(
            dir.path(),
            "bad.yaml",
            &two("nginx:1").replace("name: web", "name: Web"),
        );
        let refused = head.daemon.cli(&["apply", "--dry-run=client", "-f", &bad]);
        assert_eq!(refused.status.code(), Some(2));

        // diff: exit 1 and the change while something would change; 0 and nothing after.
        let before = head.daemon.cli(&["diff", "-f", &file]);
        assert_eq!(before.status.code(), Some(1));
        let shown = String::from_utf8_lossy(&before.stdout);
        assert!(
            shown.contains("+++ default/edge01 (applied)") && shown.contains("+  - apiVersion: v1"),
            "{shown}"
        );
        ok(head.daemon.cli(&["apply", "-f", &file]));
        assert_eq!(ok(head.daemon.cli(&["diff", "-f", &file])), "");
        let newer = write(dir.path(), "newer.yaml", &two("nginx:2"));
        let changed = head.daemon.cli(&["diff", "-f", &newer]);
        assert_eq!(changed.status.code(), Some(1));
        let shown = String::from_utf8_lossy(&changed.stdout);
        let lines: Vec<&str> = shown.lines().collect();
        let old = lines
            .iter()
            .any(|l| l.starts_with('-') && l.ends_with("image: nginx:1"));
        let new = lines
            .iter()
            .any(|l| l.starts_with('+') && l.ends_with("image: nginx:2"));
        assert!(old && new, "{shown}");
        assert_eq!(stored().as_array().unwrap().len(), 2);

        // delete -f deletes every EdgeNode the file names; a second time they are missing.
        let deleted = ok(head.daemon.cli(&["delete", "-f", &file]));
        assert!(
            deleted.contains("\"edge01\" deleted") && deleted.contains("\"edge02\" deleted"),
            "{deleted}"
        );
        assert_eq!(stored(), serde_json::json!([]));
        let again = head.daemon.cli(&["delete", "-f", &file]);
        assert_eq!(again.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&again.stderr).contains("not found"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_selects_by_label_and_prints_names_jsonpath_and_wide() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let labelled = |edge: &str, app: &str| {
            edgenode("default", edge, &[("web", "nginx")]).replace(
                &format!("  name: {edge}\n"),
                &format!("  name: {edge}\n  labels:\n    app: {app}\n"),
            )
        };
        let text = format!(
            "{}---\n{}",
            labelled("edge01", "web"),
            labelled("edge02", "db")
        );
        ok(head
            .daemon
            .cli(&["apply", "-f", &write(dir.path(), "l.yaml", &text)]));
        let get = |args: &[&str]| ok(head.daemon.cli(&[&["get", "edgenodes"], args].concat()));
        assert_eq!(
            get(&["-o", "name"]),
            "edgenode.edgesync.io/edge01\nedgenode.edgesync.io/edge02\n"
        );
        assert_eq!(
            get(&["-l", "app=web", "-o", "name"]),
            "edgenode.edgesync.io/edge01\n"
        );
        assert_eq!(
            get(&["-l", "app notin (web)", "-o", "name"]),
            "edgenode.edgesync.io/edge02\n"
        );
        assert_eq!(get(&["-l", "!app", "-o", "name"]), "");
        assert_eq!(
            get(&["-o", "jsonpath={.items[*].metadata.name}"]),
            "edge01 edge02\n"
        );
        assert_eq!(
            get(&["edge02", "-o", "jsonpath={.metadata.labels.app}"]),
            "db\n"
        );
        let wide = get(&["-o", "wide"]);
        assert!(
            wide.contains("GENERATION") && wide.contains("app=db"),
            "{wide}"
        );
        let bad = head.daemon.cli(&["get", "edgenodes", "-l", "app in web"]);
        assert_eq!(bad.status.code(), Some(2));
        let bad = head
            .daemon
            .cli(&["get", "edgenodes", "-o", "jsonpath={range .items[*]}"]);
        assert_eq!(bad.status.code(), Some(2));
        let names = ok(head.daemon.cli(&["get", "nodes", "-o", "name"]));
        assert_eq!(names, "", "no edge has joined");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_watch_prints_each_change_until_interrupted() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let watch = |output: &str| {
            tokio::process::Command::new(bin())
                .args(["get", "edgenodes", "-w", "-o", output, "--socket"])
                .arg(&head.daemon.socket)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        };
        let mut names = watch("name");
        let mut rows = watch("wide");
        let mut names_out = BufReader::new(names.stdout.take().unwrap()).lines();
        let mut rows_out = BufReader::new(rows.stdout.take().unwrap()).lines();
        // Both are watching once their (empty) list is out: a change now must reach them.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let file = write(dir.path(), "w.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        let line = names_out.next_line().await.unwrap().unwrap();
        assert_eq!(line, "edgenode.edgesync.io/edge01");
        let row = rows_out.next_line().await.unwrap().unwrap();
        assert!(
            row.starts_with("edge01") && row.contains("Pending"),
            "{row}"
        );
        ok(head.daemon.cli(&["delete", "edgenode", "edge01"]));
        loop {
            let row = rows_out.next_line().await.unwrap().unwrap();
            if row.contains("Deleted") {
                assert!(row.starts_with("edge01"), "{row}");
                break;
            }
        }
        assert!(
            names.try_wait().unwrap().is_none(),
            "the watch ended by itself"
        );
    })
    .await;
}
