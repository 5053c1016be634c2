//! In-process head and edge on loopback QUIC with SQLite on disk: what crosses the wire.

use crate::harness::{edgenode, wait_for, within};
use edgesync::config::{EdgeConfig, HeadConfig};
use edgesync::edge::Edge;
use edgesync::head::Head;
use edgesync::model::COUNTS_AFTER;
use edgesync::node::Node;
use std::time::Duration;

/// Bytes exchanged with `peer` over its current connection, as the node counts them.
async fn traffic(node: &Node, peer: &str) -> Option<(u64, u64, bool)> {
    let status = node.status().await.ok()?;
    let p = status.peers.into_iter().find(|p| p.name == peer)?;
    Some((p.bytes_out, p.bytes_in, p.connected))
}

async fn doc_image(node: &Node, key: &str) -> Option<String> {
    let (view, _) = node.docs().view(key).await.ok()??;
    view.pods.get("web")?["spec"]["containers"][0]["image"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_sends_only_what_changed_and_a_one_field_edit_is_small() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let head = Head::start(HeadConfig::for_test(&dir.path().join("head"))).await.unwrap();
        let token = std::fs::read_to_string(dir.path().join("head/state/join-token")).unwrap();
        let edge_config = EdgeConfig::for_test(&dir.path().join("edge"), "edge01", head.local_addr(), Some(token.trim().into()));
        let edge = Edge::start(edge_config.clone()).await.unwrap();

        let namespaces: Vec<String> = (0..20).map(|i| format!("ns{i}")).collect();
        let pods = [("web", "nginx"), ("db", "redis"), ("cache", "memcached"), ("queue", "rabbitmq"), ("api", "api:1")];
        for ns in &namespaces {
            head.node().docs().apply_text(&edgenode(ns, "edge01", &pods), "default").await.unwrap();
        }
        for ns in &namespaces {
            wait_image(edge.node(), &format!("{ns}/edge01"), "nginx").await;
            wait_reported(head.node(), &format!("{ns}/edge01")).await;
        }

        // One-field edit on a live link.
        let quiet = wait_quiet(head.node(), "edge01").await;
        let head_name = head.node().name().to_string();
        let edge_quiet = wait_quiet(edge.node(), &head_name).await;
        let web = "nginx:1.27";
        let edited: Vec<(&str, &str)> = pods.iter().map(|&(n, i)| if n == "web" { (n, web) } else { (n, i) }).collect();
        head.node().docs().apply_text(&edgenode("ns0", "edge01", &edited), "default").await.unwrap();
        wait_image(edge.node(), "ns0/edge01", web).await;
        wait_reported(head.node(), "ns0/edge01").await;
        let after = wait_quiet(head.node(), "edge01").await;
        let one_field = (after.0 - quiet.0) + (after.1 - quiet.1);
        // Each side counts what the other counts, whichever frames carried it.
        let edge_after = wait_quiet(edge.node(), &head_name).await;
        assert_eq!(
            (edge_after.1 - edge_quiet.1, edge_after.0 - edge_quiet.0),
            (after.0 - quiet.0, after.1 - quiet.1),
            "bytes the head counted out and in, against the edge's in and out"
        );
        assert!(one_field < 1200, "a one-field edit cost {one_field} bytes both ways");

        // Outage: the edge stops, one document changes, the edge comes back.
        edge.shutdown().await;
        wait_for("head sees the edge gone", Duration::from_secs(30), || {
            let node = head.node().clone();
            futures_lite(async move { traffic(&node, "edge01").await.filter(|t| !t.2) })
        })
        .await;
        let before = traffic(head.node(), "edge01").await.unwrap();
        head.node().docs().apply_text(&edgenode("ns1", "edge01", &edited), "default").await.unwrap();
        let edge = Edge::start(edge_config).await.unwrap();
        wait_image(edge.node(), "ns1/edge01", web).await;
        let resync = wait_quiet(head.node(), "edge01").await;
        let resync_bytes = (resync.0 - before.0) + (resync.1 - before.1);
        let mut full_copy = 0;
        for ns in &namespaces {
            full_copy += head.node().docs().view(&format!("{ns}/edge01")).await.unwrap().map_or(0, |(v, _)| {
                serde_json::to_vec(&v.pods).unwrap().len()
            });
        }
        eprintln!("one-field edit: {one_field} B; resync after outage: {resync_bytes} B; full spec JSON: {full_copy} B");
        assert!(
            resync_bytes * 2 < full_copy as u64,
            "resync of 1 changed document in 20 sent {resync_bytes} B, a full copy is {full_copy} B"
        );
        edge.shutdown().await;
        head.shutdown().await;
    })
    .await;
}

/// Whether `node`'s document `key` has counts per writer, and its generation's counter.
async fn counts_and_counter(node: &Node, key: &str) -> (bool, i64) {
    use automerge::{ROOT, ReadDoc, ScalarValue, Value};
    let entry = node.docs().sync_doc(key).unwrap();
    let mut entry = entry.lock().await;
    let doc = entry.doc();
    let counts = doc.get(ROOT, "generations").unwrap().is_some();
    let counter = match doc.get(ROOT, "generation").unwrap() {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Counter(c) => i64::from(c),
            _ => -1,
        },
        _ => -1,
    };
    (counts, counter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_count_per_writer_once_the_edge_reads_them_and_still_add_up() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let head = Head::start(HeadConfig::for_test(&dir.path().join("head")))
            .await
            .unwrap();
        let token = std::fs::read_to_string(dir.path().join("head/state/join-token")).unwrap();
        let edge_config = EdgeConfig::for_test(
            &dir.path().join("edge"),
            "edge01",
            head.local_addr(),
            Some(token.trim().into()),
        );
        let edge = Edge::start(edge_config.clone()).await.unwrap();
        let key = "default/edge01";
        wait_for("the edge connected", Duration::from_secs(20), || {
            futures_lite(traffic(head.node(), "edge01")).filter(|t| t.2)
        })
        .await;
        let apply = |node: &Node, image: &str| {
            let text = edgenode("default", "edge01", &[("web", image)]);
            let node = node.clone();
            async move { node.docs().apply_text(&text, "default").await.unwrap() }
        };
        // Edited on the head with its edge connected: moved to counts per writer once its
        // counter has had enough increments.
        let edits = COUNTS_AFTER + 1;
        for i in 1..=edits {
            apply(head.node(), &format!("nginx:{i}")).await;
        }
        wait_image(edge.node(), key, &format!("nginx:{edits}")).await;
        wait_reported(head.node(), key).await;
        for node in [head.node(), edge.node()] {
            assert_eq!(counts_and_counter(node, key).await, (true, COUNTS_AFTER));
            assert_eq!(
                node.docs().view(key).await.unwrap().unwrap().0.generation,
                edits
            );
        }
        // An edit on the offline edge and one on the head add up when it is back.
        edge.shutdown().await;
        wait_for("head sees the edge gone", Duration::from_secs(30), || {
            futures_lite(traffic(head.node(), "edge01")).filter(|t| !t.2)
        })
        .await;
        apply(head.node(), "nginx:head").await;
        let edge = Edge::start(EdgeConfig {
            heads: Vec::new(),
            ..edge_config.clone()
        })
        .await
        .unwrap();
        let current = format!("nginx:{edits}");
        let offline = edgenode("default", "edge01", &[("web", &current), ("db", "redis")]);
        edge.node()
            .docs()
            .apply_text(&offline, "default")
            .await
            .unwrap();
        edge.shutdown().await;
        let edge = Edge::start(edge_config).await.unwrap();
        wait_image(edge.node(), key, "nginx:head").await;
        wait_reported(head.node(), key).await;
        for node in [head.node(), edge.node()] {
            let (view, _) = node.docs().view(key).await.unwrap().unwrap();
            assert_eq!(view.generation, edits + 2, "both edits counted");
            assert!(view.pods.contains_key("db"), "the edge's edit kept");
        }
        edge.shutdown().await;
        head.shutdown().await;
    })
    .await;
}

/// Polls a future-producing check synchronously inside `wait_for`.
fn futures_lite<T>(fut: impl std::future::Future<Output = Option<T>>) -> Option<T> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(fut))
}

async fn wait_image(node: &Node, key: &str, image: &str) {
    wait_for(
        &format!("{key} has image {image}"),
        Duration::from_secs(20),
        || futures_lite(async { doc_image(node, key).await.filter(|i| i == image) }),
    )
    .await;
}

/// Waits until the edge's status for `key` has reached the head (it applied the current spec).
async fn wait_reported(node: &Node, key: &str) {
    wait_for(
        &format!("edge reported {key}"),
        Duration::from_secs(20),
        || {
            futures_lite(async {
                let (view, _) = node.docs().view(key).await.ok()??;
                (view.observed_generation == Some(view.generation)).then_some(())
            })
        },
    )
    .await;
}

/// Waits until the byte counters with `peer` stop moving (sync has gone quiet) and returns them.
async fn wait_quiet(node: &Node, peer: &str) -> (u64, u64) {
    let mut last = None;
    wait_for("sync to go quiet", Duration::from_secs(20), || {
        let now = futures_lite(traffic(node, peer))
            .filter(|t| t.2)
            .map(|t| (t.0, t.1));
        std::thread::sleep(Duration::from_millis(150));
        let again = futures_lite(traffic(node, peer))
            .filter(|t| t.2)
            .map(|t| (t.0, t.1));
        let quiet = now.is_some() && now == again && last == now;
        last = again;
        if quiet { now } else { None }
    })
    .await
}
