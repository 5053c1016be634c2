//! Resource limits seen from outside: what the head accepted reaches the edge whatever its
//! size, and a flood of connection attempts does not lock a joined edge out.

use crate::harness::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// An EdgeNode for edge01 in `namespace` whose one pod carries `size` bytes of incompressible
/// text (an environment value), drawn from `rng`.
fn large_edgenode(namespace: &str, image: &str, size: usize, rng: &mut fastrand::Rng) -> String {
    let blob: String = (0..size).map(|_| rng.alphanumeric()).collect();
    format!(
        "apiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: edge01\n  namespace: {namespace}\n\
         spec:\n  pods:\n    - apiVersion: v1\n      kind: Pod\n      metadata:\n        name: blob\n      \
         spec:\n        containers:\n          - name: main\n            image: {image}\n            \
         env:\n              - name: BLOB\n                value: \"{blob}\"\n"
    )
}

/// The largest `frames=N` of the "sync sent" lines in a log.
fn most_frames_per_message(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("sync sent"))
        .filter_map(|l| {
            l.split("frames=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_edge_gets_documents_larger_than_a_frame_and_later_edits() {
    within(300, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        let small = |image: &str| edgenode("default", "edge01", &[("web", image)]);
        ok(head.daemon.cli(&[
            "apply",
            "-f",
            &write(dir.path(), "small.yaml", &small("nginx")),
        ]));
        wait_for("first sync", SOON, || dirs.manifest("default", "web")).await;
        edge.stop().await;

        // While the edge is away, every apply is accepted: one EdgeNode's history grows well
        // past the 8 MiB frame (many moderate applies), and a second EdgeNode appears.
        let mut rng = fastrand::Rng::with_seed(12);
        let versions = 40;
        for v in 1..=versions {
            let text = large_edgenode("big", &format!("busybox:v{v}"), 320 << 10, &mut rng);
            ok(head
                .daemon
                .cli(&["apply", "-f", &write(dir.path(), "big.yaml", &text)]));
        }
        let other = large_edgenode("other", "busybox:other", 320 << 10, &mut rng);
        ok(head
            .daemon
            .cli(&["apply", "-f", &write(dir.path(), "other.yaml", &other)]));

        let edge = dirs.start("edge01", &[head.addr], None).await;
        let last = format!("busybox:v{versions}");
        wait_for(
            "every accepted EdgeNode on the edge",
            Duration::from_secs(120),
            || {
                let big = dirs.manifest("big", "blob").filter(|m| image(m) == last)?;
                dirs.manifest("other", "blob")?;
                Some(big)
            },
        )
        .await;
        assert!(
            most_frames_per_message(&head.daemon.log_text()) > 1,
            "the test meant one sync message to exceed a frame; the head's log shows none did"
        );

        // The link is still up and carries a later small edit.
        ok(head.daemon.cli(&[
            "apply",
            "-f",
            &write(dir.path(), "small.yaml", &small("nginx:2")),
        ]));
        wait_for("a later small edit", Duration::from_secs(30), || {
            dirs.manifest("default", "web")
                .filter(|m| image(m) == "nginx:2")
        })
        .await;
        edge.stop().await;
    })
    .await;
}

/// Keeps `per_address` connection attempts going from each of `sources` to `head`: each
/// completes QUIC when let in and then never sends a frame; when the head drops it, it tries
/// again. `held` counts the connections open now.
fn flood(
    head: std::net::SocketAddr,
    ca_hash: &str,
    sources: &[std::net::IpAddr],
    per_address: usize,
    held: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> tokio::task::JoinSet<()> {
    let (tls, _) = edgesync::transport::tls::join_client_config(ca_hash).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut tasks = tokio::task::JoinSet::new();
    for &source in sources {
        let endpoint = quinn::Endpoint::client((source, 0).into())
            .unwrap_or_else(|e| panic!("cannot bind a client endpoint on {source}: {e}"));
        for _ in 0..per_address {
            let (endpoint, config, held, stop) =
                (endpoint.clone(), config.clone(), held.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let attempt = async {
                        let conn = endpoint
                            .connect_with(config.clone(), head, "edgesync-head")
                            .ok()?
                            .await
                            .ok()?;
                        held.fetch_add(1, Ordering::SeqCst);
                        conn.closed().await;
                        held.fetch_sub(1, Ordering::SeqCst);
                        Some(())
                    };
                    let pause = tokio::select! {
                        _ = stop.cancelled() => break,
                        done = attempt => done.is_none(),
                    };
                    if pause {
                        let wait = Duration::from_millis(200 + fastrand::u64(..100));
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                endpoint.close(0u32.into(), b"done");
            });
        }
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_edge_gets_in_at_once_during_a_flood_of_connection_attempts() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        let file = write(dir.path(), "edge01.yaml", &example("nginx"));
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("first sync", SOON, || dirs.manifest("default", "nginx")).await;
        edge.stop().await;
        let file = write(dir.path(), "edge01.yaml", &example("nginx:2"));
        ok(head.daemon.cli(&["apply", "-f", &file]));

        // 400 attempts from four other addresses, each holding its place as long as it can.
        let ca_hash = edgesync::transport::tls::JoinToken::parse(&head.token())
            .unwrap()
            .ca_hash;
        let sources: Vec<std::net::IpAddr> = (2..6).map(|i| [127, 0, 0, i].into()).collect();
        let (held, stop) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        let mut flooding = flood(
            head.addr,
            &ca_hash,
            &sources,
            100,
            held.clone(),
            stop.clone(),
        );
        wait_for(
            "the flood to hold many places",
            Duration::from_secs(30),
            || (held.load(Ordering::SeqCst) >= 64).then_some(()),
        )
        .await;

        // The joined edge restarts in the middle of it and is served at once: well before
        // the flood's attempts would time out and free their places.
        let started = std::time::Instant::now();
        let edge = dirs.start("edge01", &[head.addr], None).await;
        wait_for(
            "the edge to sync during the flood",
            Duration::from_secs(7),
            || {
                dirs.manifest("default", "nginx")
                    .filter(|m| image(m) == "nginx:2")
            },
        )
        .await;
        eprintln!(
            "edge synced {:?} after its start, with {} flood connections held",
            started.elapsed(),
            held.load(Ordering::SeqCst)
        );
        stop.cancel();
        while flooding.join_next().await.is_some() {}
        edge.stop().await;
    })
    .await;
}
