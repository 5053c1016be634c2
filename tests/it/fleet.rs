//! The fleet view on a head: `edgesync node list` (and `get nodes`) shows every registered
//! edge, online or not, with its EdgeNodes and pods.

use crate::harness::*;
use serde_json::Value;

fn edge_of<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("{name} not listed: {list}"))
}

/// `node list -o json` once `want` holds for it.
async fn listed(daemon: &Daemon, want: impl Fn(&Value) -> bool) -> Value {
    wait_for("node list", SOON, || {
        let list = daemon.json(&["node", "list", "-o", "json"]);
        want(&list).then_some(list)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_list_shows_every_registered_edge_online_or_not() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge1) = head_and_edge(dir.path()).await;
        let dirs2 = EdgeDirs::new(dir.path(), "edge02");
        // edge02 dials from another local address (--source-address), which the head sees.
        let edge2 = dirs2
            .spawn(
                "edge02",
                &[head.addr],
                Some(&head.token()),
                &["--source-address", "127.0.0.2"],
            )
            .ready()
            .await;
        let pods = edgenode("default", "edge01", &[("web", "nginx"), ("db", "redis")]);
        ok(head
            .daemon
            .cli(&["apply", "-f", &write(dir.path(), "a.yaml", &pods)]));
        wait_for("manifests", SOON, || dirs.manifest("default", "db")).await;

        let list = listed(&head.daemon, |l| edge_of(l, "edge01")["podsReady"] == 2).await;
        let one = edge_of(&list, "edge01");
        assert_eq!(one["online"], true, "{one}");
        assert_eq!(one["head"], "head-1", "{one}");
        assert_eq!(
            (one["edgenodes"].as_u64(), one["pods"].as_u64()),
            (Some(1), Some(2))
        );
        assert!(one["certificateExpires"].as_str().is_some(), "{one}");
        assert_eq!(one["version"], said_version(), "{one}");
        assert_eq!(edge_of(&list, "edge02")["edgenodes"], 0);
        assert_eq!(edge_of(&list, "edge02")["address"], "127.0.0.2");

        // describe: one EdgeNode with its pods and conditions; one edge with its EdgeNodes.
        let described = ok(head.daemon.cli(&["describe", "edgenode", "edge01"]));
        for shown in [
            "Name:        edge01",
            "Pods:",
            "web",
            "nginx",
            "Applied",
            "Conditions:",
            "Synced",
            "True",
            "SINCE",
        ] {
            assert!(described.contains(shown), "{shown:?} not in:\n{described}");
        }
        let node = ok(head.daemon.cli(&["node", "describe", "edge01"]));
        for shown in [
            "Name:",
            "edge01",
            "Online:",
            "true",
            "Head:",
            "head-1",
            "2/2 ready",
            "Version:",
            "EdgeNodes:",
            "default",
        ] {
            assert!(node.contains(shown), "{shown:?} not in:\n{node}");
        }
        let missing = head.daemon.cli(&["node", "describe", "edge09"]);
        assert_eq!(missing.status.code(), Some(1));

        // An edge that stopped is still listed: offline, with when it was last seen.
        edge2.stop().await;
        let list = listed(&head.daemon, |l| edge_of(l, "edge02")["online"] == false).await;
        let two = edge_of(&list, "edge02");
        assert!(two["lastSeen"].as_str().is_some(), "{two}");
        assert!(two["head"].is_null(), "{two}");

        let table = ok(head.daemon.cli(&["get", "nodes"]));
        assert!(table.starts_with("NAME"), "{table}");
        assert!(table.contains("edge01") && table.contains("2/2"), "{table}");
        let wide = ok(head.daemon.cli(&["node", "list", "-o", "wide"]));
        assert!(
            wide.contains("CERTIFICATE EXPIRES") && wide.contains("head-1"),
            "{wide}"
        );
        let yaml = ok(head.daemon.cli(&["get", "nodes", "-o", "yaml"]));
        assert!(yaml.contains("name: edge02"), "{yaml}");

        // Edges have no fleet to show.
        let on_edge = edge1.cli(&["node", "list"]);
        assert_eq!(on_edge.status.code(), Some(1));
        let said = String::from_utf8_lossy(&on_edge.stderr);
        assert!(said.contains("edges are listed on a head"), "{said}");
    })
    .await;
}

/// The `Events:` part of what `describe` printed.
fn events_part(described: &str) -> &str {
    described.split_once("Events:").map_or("", |(_, e)| e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_the_recent_events_of_an_edgenode_and_its_edge() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        let described = || ok(head.daemon.cli(&["describe", "edgenode", "edge01"]));
        // A file of someone else's where the manifest of "taken" would go.
        std::fs::write(dirs.manifests.join("edgesync_default_taken.json"), "theirs").unwrap();
        let pods = edgenode("default", "edge01", &[("web", "nginx"), ("taken", "nginx")]);
        ok(head
            .daemon
            .cli(&["apply", "-f", &write(dir.path(), "a.yaml", &pods)]));
        wait_for("manifests", SOON, || dirs.manifest("default", "web")).await;
        let first = wait_for("a ManifestNotWritten event", SOON, || {
            let text = described();
            events_part(&text)
                .contains("ManifestNotWritten")
                .then_some(text)
        })
        .await;
        let events = events_part(&first);
        assert!(
            events.contains("TYPE") && events.contains("Warning"),
            "{first}"
        );
        assert!(events.contains("FileNameTaken: taken: "), "{first}");
        assert!(!events.contains("EdgeOffline"), "{first}");

        edge.stop().await;
        let offline = wait_for("an EdgeOffline event", SOON, || {
            let text = described();
            events_part(&text).contains("EdgeOffline").then_some(text)
        })
        .await;
        assert!(
            events_part(&offline).contains("the edge is offline"),
            "{offline}"
        );
        let edge = dirs.start("edge01", &[head.addr], None).await;
        wait_for("an EdgeOnline event", SOON, || {
            let node = ok(head.daemon.cli(&["node", "describe", "edge01"]));
            let events = events_part(&node);
            (events.contains("EdgeOnline") && events.contains("EdgeNode default/edge01"))
                .then_some(())
        })
        .await;
        // The edge keeps its own.
        let on_edge = ok(edge.cli(&["describe", "edgenode", "edge01"]));
        assert!(on_edge.contains("Events:"), "{on_edge}");
    })
    .await;
}
