//! An edge without its head: it restarts from its cache, repairs its manifests, takes edits on
//! its own socket at once, and hands those edits to the head when the head is back.

use crate::harness::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_restart_rewrites_and_repairs_manifests() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        let file = write(
            dir.path(),
            "two.yaml",
            &edgenode("default", "edge01", &[("web", "nginx"), ("db", "redis")]),
        );
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("both manifests", SOON, || {
            dirs.manifest("default", "db")
                .and(dirs.manifest("default", "web"))
        })
        .await;

        head.daemon.kill();
        edge.kill();
        std::fs::remove_file(dirs.manifests.join("edgesync_default_web.json")).unwrap();
        std::fs::write(
            dirs.manifests.join("edgesync_default_db.json"),
            "{\"hand\": \"edited\"}",
        )
        .unwrap();

        let edge = dirs.start("edge01", &[head.addr], None).await;
        wait_for("restored from the cache with the head down", SOON, || {
            let db = dirs.manifest("default", "db")?;
            (image(&db) == "redis").then(|| dirs.manifest("default", "web"))?
        })
        .await;

        std::fs::write(dirs.manifests.join("edgesync_default_web.json"), "drift").unwrap();
        wait_for("drift repaired", SOON, || dirs.manifest("default", "web")).await;

        // An offline edit on the edge takes effect locally at once.
        let offline = write(
            dir.path(),
            "three.yaml",
            &edgenode(
                "default",
                "edge01",
                &[("web", "nginx:2"), ("db", "redis"), ("cache", "memcached")],
            ),
        );
        ok(edge.cli(&["apply", "-f", &offline]));
        wait_for("offline edit applied", SOON, || {
            dirs.manifest("default", "cache")
                .and(dirs.manifest("default", "web"))
                .filter(|w| image(w) == "nginx:2")
        })
        .await;
        let status = edge.json(&["status", "-o", "json"]);
        assert_eq!(status["role"], "edge");
        assert_eq!(status["appliedPods"].as_array().unwrap().len(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edge_edit_reaches_a_restarted_head() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head_addr = free_udp_addr();
        let head = HeadProc::start(dir.path(), head_addr, &[]).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[head_addr], Some(&head.token()))
            .await;
        let file = write(
            dir.path(),
            "a.yaml",
            &edgenode("default", "edge01", &[("web", "nginx")]),
        );
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("web", SOON, || dirs.manifest("default", "web")).await;
        head.daemon.stop().await;

        let offline = write(
            dir.path(),
            "b.yaml",
            &edgenode(
                "default",
                "edge01",
                &[("web", "nginx"), ("extra", "busybox")],
            ),
        );
        ok(edge.cli(&["apply", "-f", &offline]));
        let head = HeadProc::start(dir.path(), head_addr, &[]).await;
        wait_for(
            "offline edit synced to the head",
            Duration::from_secs(30),
            || {
                let node = head
                    .daemon
                    .json(&["get", "edgenodes", "edge01", "-o", "json"]);
                let mut names = pod_names(&node);
                names.sort();
                (names == ["extra", "web"]).then_some(())
            },
        )
        .await;
    })
    .await;
}
