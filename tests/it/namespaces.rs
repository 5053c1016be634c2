//! Namespaces and node names: one edge serves its EdgeNodes in every namespace, never receives
//! another node's, and refuses an apply for another node on its own socket.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_edge_serves_every_namespace_and_refuses_other_nodes() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        let text = format!(
            "{}---\n{}---\n{}",
            edgenode("default", "edge01", &[("web", "nginx")]),
            edgenode("team-a", "edge01", &[("web", "httpd")]),
            edgenode("default", "edge02", &[("other", "nginx")])
        );
        let file = write(dir.path(), "multi.yaml", &text);
        ok(head.daemon.cli(&["apply", "-f", &file]));
        let team = wait_for("team-a pod", SOON, || dirs.manifest("team-a", "web")).await;
        assert_eq!(team["metadata"]["namespace"], "team-a");
        assert_eq!(image(&team), "httpd");
        wait_for("default pod", SOON, || dirs.manifest("default", "web")).await;
        let all = head.daemon.json(&["get", "edgenodes", "-A", "-o", "json"]);
        assert_eq!(all["kind"], "List");
        assert_eq!(all["items"].as_array().unwrap().len(), 3);
        let edge_view = edge.json(&["get", "edgenodes", "-A", "-o", "json"]);
        let names: Vec<_> = edge_view["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].clone())
            .collect();
        assert_eq!(
            names,
            ["edge01", "edge01"],
            "the edge never receives another node's EdgeNode"
        );
        assert!(!dirs.files().iter().any(|f| f.contains("other")));

        let other = write(
            dir.path(),
            "other.yaml",
            &edgenode("default", "edge02", &[("x", "nginx")]),
        );
        let out = edge.cli(&["apply", "-f", &other]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("EdgeNode default/edge02: metadata.name")
                && err.contains("apply it on the head"),
            "{err}"
        );

        let table = ok(head.daemon.cli(&["get", "en", "-n", "team-a"]));
        let mut lines = table.lines();
        assert!(lines.next().unwrap().starts_with("NAME"));
        assert!(lines.next().unwrap().starts_with("edge01"));
    })
    .await;
}
