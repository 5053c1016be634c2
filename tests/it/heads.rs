//! Heads with a cluster come and go and nothing is lost: edges and join tokens live in the
//! Kubernetes API (the emulator), so fresh heads with empty state dirs let every edge in, a
//! rolling replacement refuses nobody, and two heads given one name never both write.

use crate::harness::*;
use crate::kube::{Cluster, lease_holder, pairs, pod_images};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const API: &str = "edgesync.io/v1alpha1";
/// How long an edge may take to notice a killed head and dial again: the keep-alive interval
/// and the QUIC idle timeout (20 + 30 s), and a dial.
const RECONNECT: Duration = Duration::from_secs(75);

/// A head named `name` with the cluster, its files in `dir`, a short Lease.
async fn head(cluster: &Cluster, dir: &Path, name: &str, addr: SocketAddr) -> HeadProc {
    let args = [
        "--kubeconfig",
        &cluster.kubeconfig,
        "--lease-duration",
        "3s",
    ];
    HeadProc::start_named(dir, name, addr, &args).await
}

fn edge_object(cluster: &Cluster, name: &str) -> Option<Value> {
    cluster.api.get(API, "Edge", None, name)
}

/// Whether `head` has a session with peer `name` now.
fn connected(head: &HeadProc, name: &str) -> bool {
    let out = head.daemon.cli(&["status", "-o", "json"]);
    out.status.success()
        && serde_json::from_slice::<Value>(&out.stdout).unwrap()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == name && p["connected"] == true)
}

/// Waits until the head answers 200 on /readyz (it has read the cluster's state).
async fn ready(head: &HeadProc) {
    let http = crate::users::client(head);
    let url = format!("https://localhost:{}/readyz", head.api.port());
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let status = http.get(&url).send().await.map(|r| r.status().as_u16());
        if status.as_ref().is_ok_and(|s| *s == 200) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "/readyz: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the Edge resource says `edge` is online through head `head`.
async fn online_through(cluster: &Cluster, edge: &str, head: &str) -> Value {
    wait_for(&format!("Edge {edge} online through {head}"), SOON, || {
        edge_object(cluster, edge)
            .filter(|o| o["status"]["online"] == true && o["status"]["head"] == head)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_heads_with_empty_state_keep_offline_edits_let_edges_in_and_take_old_tokens() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let addr = free_udp_addr();
        let a = head(&cluster, &dir.path().join("a"), "head-a", addr).await;
        let spare = ok(a.daemon.cli(&["token", "create"])).trim().to_string();
        // Only the hash of a token's secret is in the cluster.
        let secrets = cluster.api.list("v1", "Secret");
        let tokens: Vec<&Value> = secrets
            .iter()
            .filter(|s| s["type"] == "edgesync.io/join-token")
            .collect();
        assert_eq!(tokens.len(), 2, "{secrets:?}");
        let secret_part = spare.rsplit('.').next().unwrap();
        assert!(
            !serde_json::to_string(&tokens)
                .unwrap()
                .contains(secret_part)
        );
        // Listed and deleted through the Secrets: a third token, made and deleted again.
        let third = ok(a.daemon.cli(&["token", "create"])).trim().to_string();
        let third_id = third.split('.').nth(2).unwrap();
        let listed = a.daemon.json(&["token", "list", "-o", "json"]);
        assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
        ok(a.daemon.cli(&["token", "delete", third_id]));
        let name = format!("edgesync-token-{third_id}");
        assert!(
            cluster
                .api
                .get("v1", "Secret", Some("edgesync-system"), &name)
                .is_none()
        );

        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs.start("edge01", &[addr], Some(&a.token())).await;
        let object = online_through(&cluster, "edge01", "head-a").await;
        assert_eq!(object["status"]["address"], "127.0.0.1");
        // The version the edge said in its Hello, as `node list` also shows it.
        assert_eq!(object["status"]["version"], said_version(), "{object}");
        assert_eq!(
            object["spec"]["publicKeySHA256"].as_str().unwrap().len(),
            64
        );
        assert!(
            object["spec"]["certificateNotAfter"].is_string(),
            "{object}"
        );
        cluster
            .apply(&edgenode(
                "default",
                "edge01",
                &[("web", "nginx"), ("db", "postgres")],
            ))
            .await;
        wait_for("manifests from the CRD", SOON, || {
            dirs.manifest("default", "db")
        })
        .await;
        // The resource records where the document stood when it matched.
        wait_for("the synced heads recorded", SOON, || {
            cluster
                .object("default", "edge01")
                .filter(|o| o["metadata"]["annotations"]["edgesync.io/synced-heads"].is_string())
        })
        .await;

        // Every head gone, state and all; meanwhile the edge is edited offline: a pod
        // removed, one changed, one added.
        a.daemon.kill();
        std::fs::remove_dir_all(dir.path().join("a")).unwrap();
        let offline = write(
            dir.path(),
            "offline.yaml",
            &edgenode(
                "default",
                "edge01",
                &[("web", "nginx:1.26"), ("cache", "memcached")],
            ),
        );
        ok(edge.cli(&["apply", "-f", &offline]));
        wait_for("the offline edit applied", SOON, || {
            dirs.manifest("default", "cache")
        })
        .await;
        // A fresh head takes the same address.
        let b = head(&cluster, &dir.path().join("b"), "head-b", addr).await;
        // The fresh head shares the CA, so it answers the edge's next packet for the dead
        // head's connection with a stateless reset, and the edge dials again at once.
        wait_for("the edge let in by the fresh head", RECONNECT, || {
            connected(&b, "edge01").then_some(())
        })
        .await;
        let log = edge.log_text();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        assert!(
            log.contains("reset by peer"),
            "the old link did not end by a reset; the edge's log ends: {tail:#?}"
        );
        online_through(&cluster, "edge01", "head-b").await;
        assert!(!edge.log_text().contains("not a registered node"));
        // The offline edit wins over nothing: it reaches the resource whole.
        let want = pairs(&[("cache", "memcached"), ("web", "nginx:1.26")]);
        wait_for("the offline edit in the resource", SOON, || {
            cluster
                .object("default", "edge01")
                .filter(|o| pod_images(o) == want)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            dirs.manifest("default", "db").is_none(),
            "the removed pod came back"
        );
        assert_eq!(
            image(&dirs.manifest("default", "web").unwrap()),
            "nginx:1.26"
        );
        // The user's edits still reach the edge through the fresh head.
        cluster
            .apply(&edgenode(
                "default",
                "edge01",
                &[("web", "nginx:1.27"), ("cache", "memcached")],
            ))
            .await;
        wait_for("an edit through the fresh head", SOON, || {
            dirs.manifest("default", "web")
                .filter(|m| image(m) == "nginx:1.27")
        })
        .await;

        // A token made before the wipe still joins a new edge.
        let dirs2 = EdgeDirs::new(dir.path(), "edge02");
        let _edge2 = dirs2.start("edge02", &[addr], Some(&spare)).await;
        online_through(&cluster, "edge02", "head-b").await;

        // Deleting its Edge resource shuts an edge out at once, on every head.
        cluster.api.delete(API, "Edge", None, "edge02");
        wait_for("edge02's session ended", SOON, || {
            (!connected(&b, "edge02")).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!connected(&b, "edge02"), "edge02 came back");
        assert!(connected(&b, "edge01"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_replacement_refuses_no_edge() {
    within(260, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let addrs = [free_udp_addr(), free_udp_addr()];
        let mut old = head(&cluster, &dir.path().join("h0"), "head-0", addrs[0]).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs.start("edge01", &addrs, Some(&old.token())).await;
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        wait_for("manifest from the CRD", SOON, || {
            dirs.manifest("default", "web")
        })
        .await;
        let mut users: Vec<(String, String)> = Vec::new();
        for round in 1..=3 {
            // The new head starts with an empty state dir; the old one dies a second later.
            let name = format!("head-{round}");
            let new = head(
                &cluster,
                &dir.path().join(format!("h{round}")),
                &name,
                addrs[round % 2],
            )
            .await;
            ready(&new).await;
            // Users call the API of the new head: every earlier registration signs in.
            let api = crate::users::Api::new(&new);
            let username = format!("user{round}");
            let (status, body) = api
                .register(&username, &format!("{username}@example.org"))
                .await;
            assert_eq!(status.as_u16(), 201, "{body}");
            users.push((username, body["secret"].as_str().unwrap().to_string()));
            for (username, secret) in &users {
                let (status, body) = api.get(&format!("/api/v1/users/{username}"), secret).await;
                assert_eq!(status.as_u16(), 200, "{username} through {name}: {body}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            // A crash first, then the graceful stops of a rolling update.
            match round {
                1 => old.daemon.kill(),
                _ => old.daemon.stop().await,
            }
            wait_for("the edge let in by the new head", RECONNECT, || {
                connected(&new, "edge01").then_some(())
            })
            .await;
            let image = format!("nginx:1.{round}");
            cluster
                .apply(&edgenode("default", "edge01", &[("web", &image)]))
                .await;
            wait_for("the user's edit through the new head", SOON, || {
                dirs.manifest("default", "web")
                    .filter(|m| crate::harness::image(m) == image)
            })
            .await;
            old = new;
        }
        assert!(
            !edge.log_text().contains("not a registered node"),
            "{}",
            edge.log_text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_heads_given_one_name_never_both_write() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let one = head(&cluster, &dir.path().join("one"), "head", free_udp_addr()).await;
        let two = head(&cluster, &dir.path().join("two"), "head", free_udp_addr()).await;
        wait_for("a writer", SOON, || lease_holder(&cluster)).await;
        let writes = |h: &HeadProc| h.daemon.log_text().contains("this head is now the writer");
        // Several renewals later, still one writer.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(
            writes(&one) != writes(&two),
            "one writer: {} / {}",
            writes(&one),
            writes(&two)
        );
        let (writer, standby) = if writes(&one) { (one, two) } else { (two, one) };
        writer.daemon.kill();
        wait_for("the other takes over", Duration::from_secs(15), || {
            writes(&standby).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_shown_online_through_a_head_that_stopped_is_shown_offline() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let a = head(&cluster, &dir.path().join("a"), "head-a", free_udp_addr()).await;
        let _b = head(&cluster, &dir.path().join("b"), "head-b", free_udp_addr()).await;
        // The edge knows head A only, so it cannot move to B.
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs.start("edge01", &[a.addr], Some(&a.token())).await;
        online_through(&cluster, "edge01", "head-a").await;
        // Head B leaves alone an edge of a head that runs (Leases of 3 s, renewed each 1 s).
        tokio::time::sleep(Duration::from_secs(5)).await;
        online_through(&cluster, "edge01", "head-a").await;
        a.daemon.kill();
        let object = wait_for("Edge edge01 offline", Duration::from_secs(15), || {
            edge_object(&cluster, "edge01").filter(|o| o["status"]["online"] == false)
        })
        .await;
        assert_eq!(object["status"]["head"], "head-a", "{object}");
    })
    .await;
}
