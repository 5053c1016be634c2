//! Edits made apart: head and edge both edit one EdgeNode while the link is cut, and when they
//! meet again the edits merge, a conflict on one field shows on both sides with the same
//! winner, and applying a value settles it.

use crate::harness::*;
use crate::relay;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_made_apart_merge_when_head_and_edge_meet_again() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let head_addr = free_udp_addr();
        let head = HeadProc::start(dir.path(), head_addr, &[]).await;
        let relay = relay::Relay::start(head_addr).await.unwrap();
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[relay.local_addr()], Some(&head.token()))
            .await;
        let pods = |list: &[(&str, &str)]| edgenode("default", "edge01", list);
        let base = write(
            dir.path(),
            "base.yaml",
            &pods(&[("web", "nginx"), ("db", "redis"), ("api", "api:1")]),
        );
        ok(head.daemon.cli(&["apply", "-f", &base]));
        wait_for("edge applied (status back at the head)", SOON, || {
            let node = head
                .daemon
                .json(&["get", "edgenodes", "edge01", "-o", "json"]);
            (node["status"]["phase"] == "Running").then_some(())
        })
        .await;

        relay.cut();
        // Head: new web image, api -> api:head. Edge (offline): adds cache, removes db,
        // api -> api:edge (the same field as the head: a conflict).
        let on_head = write(
            dir.path(),
            "head.yaml",
            &pods(&[("web", "nginx:1.27"), ("db", "redis"), ("api", "api:head")]),
        );
        ok(head.daemon.cli(&["apply", "-f", &on_head]));
        let on_edge = write(
            dir.path(),
            "edge.yaml",
            &pods(&[
                ("web", "nginx"),
                ("cache", "memcached"),
                ("api", "api:edge"),
            ]),
        );
        ok(edge.cli(&["apply", "-f", &on_edge]));
        // One reconcile writes cache and then removes db: wait for both.
        wait_for("offline edit on the edge", SOON, || {
            dirs.manifest("default", "cache")
                .filter(|_| dirs.manifest("default", "db").is_none())
        })
        .await;

        relay.heal();
        let merged = |node: &serde_json::Value| {
            let mut names = pod_names(node);
            names.sort();
            let image_of = |pod: &str| {
                node["spec"]["pods"]
                    .as_array()?
                    .iter()
                    .find(|p| p["metadata"]["name"] == pod)
                    .and_then(|p| {
                        p["spec"]["containers"][0]["image"]
                            .as_str()
                            .map(str::to_string)
                    })
            };
            let conflict = node["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Conflict")?["message"]
                .as_str()?
                .to_string();
            (names == ["api", "cache", "web"] && image_of("web")? == "nginx:1.27")
                .then(|| (image_of("api"), conflict))
        };
        let (api_head, conflict) = wait_for("merged on the head", Duration::from_secs(40), || {
            merged(
                &head
                    .daemon
                    .json(&["get", "edgenodes", "edge01", "-o", "json"]),
            )
        })
        .await;
        assert!(
            conflict.contains("api:head") && conflict.contains("api:edge"),
            "{conflict}"
        );
        assert!(
            conflict.contains("spec.pods.api.spec.containers[0].image"),
            "{conflict}"
        );
        let (api_edge, _) = wait_for("merged on the edge", SOON, || {
            merged(&edge.json(&["get", "edgenodes", "edge01", "-o", "json"]))
        })
        .await;
        assert_eq!(api_head, api_edge, "both sides pick the same winner");
        let winner = api_head.unwrap();
        wait_for("merged manifests", SOON, || {
            let web = dirs.manifest("default", "web")?;
            let api = dirs.manifest("default", "api")?;
            (image(&web) == "nginx:1.27"
                && image(&api) == winner
                && dirs.manifest("default", "db").is_none())
            .then(|| dirs.manifest("default", "cache"))?
        })
        .await;

        // Applying a value settles the conflict.
        let settled = write(
            dir.path(),
            "settled.yaml",
            &pods(&[
                ("web", "nginx:1.27"),
                ("cache", "memcached"),
                ("api", "api:2"),
            ]),
        );
        ok(head.daemon.cli(&["apply", "-f", &settled]));
        wait_for("conflict settled on the edge", SOON, || {
            let node = edge.json(&["get", "edgenodes", "edge01", "-o", "json"]);
            let conditions = node["status"]["conditions"].as_array()?.clone();
            (!conditions.iter().any(|c| c["type"] == "Conflict"))
                .then(|| dirs.manifest("default", "api"))?
                .filter(|api| image(api) == "api:2")
        })
        .await;
    })
    .await;
}
