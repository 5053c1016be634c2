//! Resource limits seen from outside: what the head accepted reaches the edge whatever its
//! size, and a flood of connection attempts does not lock a joined edge out.

use crate::harness::*;
use crate::{SOON, within};
use std::time::Duration;

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
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
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
