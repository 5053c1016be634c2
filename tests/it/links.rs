//! A bad link between head and edge, through the UDP relay: edits made while it is cut all
//! arrive once it heals, even with loss, delay and duplication.

use crate::harness::*;
use crate::relay;
use std::time::Duration;

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
