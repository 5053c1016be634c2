//! Joining with a token: an edge joins, gets what the head applies, and only ever touches the
//! files it wrote; bad, expired and foreign-CA tokens are refused with nothing synced; a token
//! cannot take over a joined name, and `node remove` shuts an edge out until it joins again.

use crate::harness::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_push_update_remove_touch_only_owned_files() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let edge_dirs = EdgeDirs::new(dir.path(), "edge01");
        std::fs::create_dir_all(&edge_dirs.manifests).unwrap();
        let foreign = edge_dirs.manifests.join("kube-apiserver.yaml");
        std::fs::write(&foreign, "not ours").unwrap();
        let edge = edge_dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        assert!(
            edge_dirs.state.join("node.pem").exists(),
            "certificate stored after join"
        );
        let key_mode = std::fs::metadata(edge_dirs.state.join("node.pem")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
            0o600
        );

        let file = write(dir.path(), "edge01.yaml", &example("nginx"));
        let started = Instant::now();
        let out = ok(head.daemon.cli(&["apply", "-f", &file]));
        assert_eq!(out.trim(), "edgenode.edgesync.io/edge01 created");
        let manifest = wait_for("manifest", SOON, || edge_dirs.manifest("default", "nginx")).await;
        let latency = started.elapsed();
        assert!(
            latency < Duration::from_secs(1),
            "manifest took {latency:?}"
        );
        assert_eq!(image(&manifest), "nginx");
        assert_eq!(manifest["metadata"]["namespace"], "default");
        assert_eq!(
            manifest["metadata"]["annotations"]["edgesync.io/managed"],
            "true"
        );

        let file = write(dir.path(), "edge01.yaml", &example("nginx:1.27"));
        assert_eq!(
            ok(head.daemon.cli(&["apply", "-f", &file])).trim(),
            "edgenode.edgesync.io/edge01 configured"
        );
        wait_for("updated image", SOON, || {
            edge_dirs
                .manifest("default", "nginx")
                .filter(|m| image(m) == "nginx:1.27")
        })
        .await;
        assert_eq!(
            ok(head.daemon.cli(&["apply", "-f", &file])).trim(),
            "edgenode.edgesync.io/edge01 unchanged"
        );

        let two = write(
            dir.path(),
            "two.yaml",
            &edgenode("default", "edge01", &[("web", "nginx"), ("db", "redis")]),
        );
        ok(head.daemon.cli(&["apply", "-f", &two]));
        wait_for("web and db only", SOON, || {
            (edge_dirs.files()
                == [
                    "edgesync_default_db.json",
                    "edgesync_default_web.json",
                    "kube-apiserver.yaml",
                ])
            .then_some(())
        })
        .await;

        ok(head.daemon.cli(&["delete", "edgenode", "edge01"]));
        wait_for("pods removed", SOON, || {
            (edge_dirs.files() == ["kube-apiserver.yaml"]).then_some(())
        })
        .await;
        assert_eq!(
            std::fs::read_to_string(&foreign).unwrap(),
            "not ours",
            "foreign file untouched"
        );
        let gone = head.daemon.cli(&["get", "edgenodes", "edge01"]);
        assert_eq!(gone.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));

        // A restart needs no token: the stored certificate is used.
        edge.stop().await;
        // A dead head listed first does not delay the live one.
        let edge = edge_dirs
            .start("edge01", &[free_udp_addr(), head.addr], None)
            .await;
        let started = Instant::now();
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("manifest after restart", SOON, || {
            edge_dirs.manifest("default", "nginx")
        })
        .await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "reached the live head after {took:?}"
        );
        drop(edge);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_unknown_cas_are_refused_and_nothing_syncs() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let file = write(dir.path(), "edge01.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        let token = head.token();
        let parts: Vec<&str> = token.split('.').collect();

        let wrong_secret = format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], "0".repeat(32));
        let wrong_ca = format!("{}.{}.{}.{}", parts[0], "ab".repeat(32), parts[2], parts[3]);
        let expired = ok(head.daemon.cli(&["token", "create", "--ttl", "1s"]))
            .trim()
            .to_string();
        tokio::time::sleep(Duration::from_millis(1100)).await; // let the 1s token expire
        let cases = [
            (wrong_secret.as_str(), "join token is invalid or expired"),
            (wrong_ca.as_str(), "does not match the CA hash"),
            (expired.as_str(), "join token is invalid or expired"),
        ];
        for (i, (token, expected)) in cases.into_iter().enumerate() {
            let dirs = EdgeDirs::new(dir.path(), &format!("bad{i}"));
            let code = dirs
                .spawn("edge01", &[head.addr], Some(token), &[])
                .exit_code(SOON)
                .await;
            let log = std::fs::read_to_string(&dirs.log).unwrap();
            assert_eq!(code, 1, "{log}");
            let last = log.lines().last().unwrap_or("");
            assert!(
                last.starts_with("error: ") && last.contains(expected),
                "{last}"
            );
            assert!(!dirs.state.join("node.pem").exists());
            assert!(dirs.files().is_empty(), "nothing synced");
        }

        let dirs = EdgeDirs::new(dir.path(), "notoken");
        let code = dirs
            .spawn("edge01", &[head.addr], None, &[])
            .exit_code(SOON)
            .await;
        assert_eq!(code, 1);
        assert!(
            std::fs::read_to_string(&dirs.log)
                .unwrap()
                .contains("give --token")
        );

        let malformed = dirs
            .spawn("edge01", &[head.addr], Some("garbage"), &[])
            .exit_code(SOON)
            .await;
        assert_eq!(malformed, 2, "a malformed token is a usage error");

        // A fresh token from `token create` works.
        let fresh = ok(head.daemon.cli(&["token", "create"])).trim().to_string();
        let good = EdgeDirs::new(dir.path(), "good");
        let _edge = good.start("edge01", &[head.addr], Some(&fresh)).await;
        wait_for("manifest with a fresh token", SOON, || {
            good.manifest("default", "nginx")
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cannot_take_over_a_joined_node_and_removal_shuts_it_out() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let file = write(dir.path(), "a.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        let real = EdgeDirs::new(dir.path(), "real");
        let edge = real
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        wait_for("manifest on the real edge", SOON, || {
            real.manifest("default", "nginx")
        })
        .await;

        let thief = EdgeDirs::new(dir.path(), "thief");
        let code = thief
            .spawn("edge01", &[head.addr], Some(&head.token()), &[])
            .exit_code(SOON)
            .await;
        let log = std::fs::read_to_string(&thief.log).unwrap();
        assert_eq!(code, 1, "{log}");
        assert!(log.contains("has already joined"), "{log}");
        assert!(thief.files().is_empty());

        let out = ok(head.daemon.cli(&["node", "remove", "edge01"]));
        assert_eq!(out.trim(), "node \"edge01\" removed");
        wait_for("the removed edge is cut off", SOON, || {
            let status = head.daemon.json(&["status", "-o", "json"]);
            let connected = status["peers"]
                .as_array()?
                .iter()
                .any(|p| p["name"] == "edge01" && p["connected"] == true);
            (!connected).then_some(())
        })
        .await;
        let file = write(dir.path(), "a.yaml", &example("nginx:after-removal"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("the head refuses the old certificate", SOON, || {
            head.daemon
                .log_text()
                .contains("is not a registered node")
                .then_some(())
        })
        .await;
        assert_eq!(
            image(&real.manifest("default", "nginx").unwrap()),
            "nginx",
            "nothing reaches a removed edge"
        );
        let missing = head.daemon.cli(&["node", "remove", "edge01"]);
        assert_eq!(missing.status.code(), Some(1));
        drop(edge);

        // With a new token, the name can join again.
        let fresh = ok(head.daemon.cli(&["token", "create"])).trim().to_string();
        let again = EdgeDirs::new(dir.path(), "again");
        let _edge = again.start("edge01", &[head.addr], Some(&fresh)).await;
        wait_for("manifest after joining again", SOON, || {
            again
                .manifest("default", "nginx")
                .filter(|m| image(m) == "nginx:after-removal")
        })
        .await;
    })
    .await;
}
