//! Edge certificates: renewed before they expire while the edge is connected, and one that
//! expired while the edge was offline keeps its pods served and leads to a fresh join.

use crate::harness::*;
use std::time::Duration;

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
