//! Integration tests: the built binary as real head and edge processes on loopback, QUIC with
//! mutual TLS, SQLite on disk, and a UDP relay that cuts and degrades the link.

mod chaos;
mod daemons;
mod deploy;
mod dns;
mod harness;
mod heads;
mod inputs;
mod kube;
mod limits;
mod manifests;
mod metrics;
mod sync;
mod users;

#[path = "../support/kube_api.rs"]
mod kube_api;
#[path = "../support/namecheap.rs"]
mod namecheap;
#[path = "../support/relay.rs"]
mod relay;

use harness::*;
use std::future::Future;
use std::time::{Duration, Instant};

/// Runs a test body with an overall deadline.
async fn within<F: Future<Output = ()>>(secs: u64, body: F) {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("test exceeded its time limit");
}

const SOON: Duration = Duration::from_secs(10);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_certificates_renew_before_they_expire() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head =
            HeadProc::start(dir.path(), free_udp_addr(), &["--edge-cert-lifetime", "6s"]).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        let first = std::fs::read(dirs.state.join("node.pem")).unwrap();
        let renewed = wait_for("renewal after two thirds of the lifetime", SOON, || {
            let now = std::fs::read(dirs.state.join("node.pem")).ok()?;
            (now != first).then_some(now)
        })
        .await;
        assert!(
            String::from_utf8_lossy(&renewed).contains("PRIVATE KEY"),
            "key and certificate stay together"
        );
        let mode = std::fs::metadata(dirs.state.join("node.pem")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        // A second renewal happens after the first certificate expired (6s): the edge is still in.
        wait_for("second renewal", SOON, || {
            let now = std::fs::read(dirs.state.join("node.pem")).ok()?;
            (now != renewed).then_some(())
        })
        .await;
        edge.stop().await;
        let edge = dirs.start("edge01", &[head.addr], None).await;
        let file = write(dir.path(), "a.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("manifest through a renewed certificate", SOON, || {
            dirs.manifest("default", "nginx")
        })
        .await;
        assert!(head.daemon.log_text().contains("edge certificate renewed"));
        drop(edge);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expired_offline_keeps_pods_and_rejoins() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head_addr = free_udp_addr();
        let head = HeadProc::start(dir.path(), head_addr, &["--edge-cert-lifetime", "3s"]).await;
        let token = head.token();
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs.start("edge01", &[head_addr], Some(&token)).await;
        let file = write(dir.path(), "a.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("manifest", SOON, || dirs.manifest("default", "nginx")).await;
        head.daemon.stop().await;
        edge.stop().await;
        tokio::time::sleep(Duration::from_secs(4)).await; // every certificate issued has expired

        std::fs::remove_file(dirs.manifests.join("edgesync_default_nginx.json")).unwrap();
        let edge = dirs.start("edge01", &[head_addr], Some(&token)).await;
        wait_for(
            "pods served from the cache with an expired certificate",
            SOON,
            || dirs.manifest("default", "nginx"),
        )
        .await;
        let head = HeadProc::start(dir.path(), head_addr, &["--edge-cert-lifetime", "3s"]).await;
        let file = write(dir.path(), "a.yaml", &example("nginx:1.27"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("joined again and synced", Duration::from_secs(30), || {
            dirs.manifest("default", "nginx")
                .filter(|m| image(m) == "nginx:1.27")
        })
        .await;
        assert!(
            edge.log_text().contains("rejoined=true"),
            "{}",
            edge.log_text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_restart_rewrites_and_repairs_manifests() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_edge_serves_every_namespace_and_refuses_other_nodes() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs.start("edge01", &[head.addr], Some(&head.token())).await;
        let good = write(dir.path(), "good.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &good]));
        wait_for("manifest", SOON, || dirs.manifest("default", "nginx")).await;
        let before = head.daemon.json(&["get", "edgenodes", "edge01", "-o", "json"])["spec"].clone();
        let pod = |extra: &str| format!("{}{extra}", example("nginx:bad"));
        let cases: Vec<(&str, String, &str)> = vec![
            ("malformed", "kind: EdgeNode\nmetadata: [".into(), "not valid YAML"),
            ("unknown", example("nginx:bad").replace("pods:", "podz:"), "spec.podz: unknown field"),
            ("unknown-in-pod", example("nginx:bad").replace("imagePullPolicy", "imagePullPolicyy"), "spec.pods[0].spec.containers[0].imagePullPolicyy: unknown field"),
            ("duplicate", edgenode("default", "edge01", &[("web", "a"), ("web", "b")]), "spec.pods[1].metadata.name: duplicate pod name"),
            ("not-dns", edgenode("default", "edge01", &[("Web_1", "a")]), "spec.pods[0].metadata.name"),
            ("escape", edgenode("default", "edge01", &[("../../etc/cron.d/x", "a")]), "spec.pods[0].metadata.name"),
            ("privileged", pod("            securityContext:\n              privileged: true\n"), "spec.pods[0].spec.containers[0].securityContext.privileged"),
            ("host-network", example("nginx:bad").replace("      spec:\n        containers", "      spec:\n        hostNetwork: true\n        containers"), "spec.pods[0].spec.hostNetwork"),
            ("host-path", example("nginx:bad").replace("      spec:\n        containers", "      spec:\n        volumes: [{name: root, hostPath: {path: /}}]\n        containers"), "spec.pods[0].spec.volumes[0].hostPath"),
            ("capability", pod("            securityContext:\n              capabilities:\n                add: [NET_ADMIN]\n"), "capabilities.add[0]"),
            ("wrong-kind", example("nginx:bad").replace("kind: EdgeNode", "kind: Deployment"), "kind"),
        ];
        for (name, text, expected) in &cases {
            let file = write(dir.path(), &format!("{name}.yaml"), text);
            let out = head.daemon.cli(&["apply", "-f", &file]);
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert_eq!(out.status.code(), Some(2), "{name}: {err}");
            assert!(err.contains(&file) && err.contains(expected), "{name}: {err:?} lacks {expected:?}");
            assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line: {err:?}");
            assert!(out.stdout.is_empty(), "{name}: nothing printed as applied");
        }
        // A file with one good and one bad document changes nothing either.
        let mixed = format!("{}---\n{}", edgenode("default", "edge01", &[("new", "nginx")]), edgenode("default", "x", &[("Bad", "a")]));
        let mixed = write(dir.path(), "mixed.yaml", &mixed);
        assert_eq!(head.daemon.cli(&["apply", "-f", &mixed]).status.code(), Some(2));
        let out = head.daemon.cli(&["apply", "-f", &dir.path().join("missing.yaml").display().to_string()]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));

        assert_eq!(head.daemon.json(&["get", "edgenodes", "edge01", "-o", "json"])["spec"], before);
        assert_eq!(dirs.files(), ["edgesync_default_nginx.json"]);
        assert_eq!(image(&dirs.manifest("default", "nginx").unwrap()), "nginx");
        // The edge validates as well: the same refusals on its own socket.
        let out = edge.cli(&["apply", "-f", &write(dir.path(), "p.yaml", &pod("            securityContext:\n              privileged: true\n"))]);
        assert_eq!(out.status.code(), Some(2));
        // Unknown resource types are usage errors.
        assert_eq!(head.daemon.cli(&["get", "pods"]).status.code(), Some(2));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_pods_show_in_status_and_head_policy_allows_privileged_namespaces() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(
            dir.path(),
            free_udp_addr(),
            &["--privileged-namespace", "ops"],
        )
        .await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        std::fs::create_dir_all(&dirs.manifests).unwrap();
        std::fs::write(
            dirs.manifests.join("edgesync_default_taken.json"),
            "someone else's",
        )
        .unwrap();
        let _edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        let file = write(
            dir.path(),
            "a.yaml",
            &edgenode(
                "default",
                "edge01",
                &[("taken", "nginx"), ("free", "nginx")],
            ),
        );
        ok(head.daemon.cli(&["apply", "-f", &file]));
        let node = wait_for("degraded status at the head", SOON, || {
            let node = head
                .daemon
                .json(&["get", "edgenodes", "edge01", "-o", "json"]);
            (node["status"]["phase"] == "Degraded").then_some(node)
        })
        .await;
        let pods = node["status"]["pods"].as_array().unwrap();
        let taken = pods.iter().find(|p| p["name"] == "taken").unwrap();
        assert_eq!(taken["state"], "Refused");
        assert!(
            taken["reason"]
                .as_str()
                .unwrap()
                .contains("not written by edgesync")
        );
        assert_eq!(node["status"]["podsReady"], "1/2");
        assert_eq!(
            std::fs::read_to_string(dirs.manifests.join("edgesync_default_taken.json")).unwrap(),
            "someone else's"
        );

        let privileged = edgenode("ops", "edge01", &[("agent", "agent:1")])
            .replace("      spec:\n", "      spec:\n        hostNetwork: true\n");
        let file = write(dir.path(), "ops.yaml", &privileged);
        ok(head.daemon.cli(&["apply", "-f", &file]));
        let agent = wait_for("privileged pod allowed by head policy", SOON, || {
            dirs.manifest("ops", "agent")
        })
        .await;
        assert_eq!(agent["spec"]["hostNetwork"], true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_and_lossy_link_heals_and_converges_with_nothing_lost() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let head_addr = free_udp_addr();
        let head = HeadProc::start(dir.path(), head_addr, &[]).await;
        let relay = relay::Relay::start(head_addr).await.unwrap();
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs
            .start("edge01", &[relay.local_addr()], Some(&head.token()))
            .await;
        let file = write(dir.path(), "a.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("first manifest", SOON, || dirs.manifest("default", "nginx")).await;

        relay.cut();
        for i in 0..5 {
            let file = write(dir.path(), "a.yaml", &example(&format!("nginx:{i}")));
            ok(head.daemon.cli(&["apply", "-f", &file]));
        }
        let pods: Vec<(String, String)> = (0..8)
            .map(|i| (format!("p{i}"), format!("img:{i}")))
            .collect();
        let refs: Vec<(&str, &str)> = pods.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let many = write(
            dir.path(),
            "many.yaml",
            &edgenode("team-b", "edge01", &refs),
        );
        ok(head.daemon.cli(&["apply", "-f", &many]));
        assert_eq!(
            image(&dirs.manifest("default", "nginx").unwrap()),
            "nginx",
            "nothing crosses a cut link"
        );

        relay.set_drop(0.2);
        relay.set_delay(Duration::from_millis(30));
        relay.set_duplicate(0.1);
        relay.heal();
        wait_for(
            "all changes after healing a lossy link",
            Duration::from_secs(60),
            || {
                let latest = dirs
                    .manifest("default", "nginx")
                    .filter(|m| image(m) == "nginx:4")?;
                let all = (0..8).all(|i| dirs.manifest("team-b", &format!("p{i}")).is_some());
                all.then_some(latest)
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_get_and_crd_show_what_a_person_needs() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_state_is_a_clear_error_never_a_silent_reset() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("head-state");
        std::fs::create_dir_all(&state).unwrap();
        let db = state.join("edgesync.db");
        std::fs::write(&db, vec![0x42u8; 8192]).unwrap();
        let args: Vec<String> = [
            "head",
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--socket",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().join("h.sock").display().to_string()])
        .collect();
        let run = |args: Vec<String>| {
            tokio::task::spawn_blocking(move || {
                cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
            })
        };
        let out = run(args.clone()).await.unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("edgesync.db") && err.lines().count() == 1,
            "{err}"
        );
        assert_eq!(
            std::fs::read(&db).unwrap(),
            vec![0x42u8; 8192],
            "the database is left as it was"
        );

        std::fs::remove_file(&db).unwrap();
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("PRAGMA user_version = 99;").unwrap();
        drop(conn);
        let out = run(args).await.unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("newer than this edgesync knows"));

        let out = cli(&["edge", "--node-name", "Bad_Name", "--head", "127.0.0.1:1"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --node-name:"));
    })
    .await;
}
