//! `/metrics` on `--metrics-listen` and on the control socket, from real processes after a
//! join and a sync; never on the head's public API.

use crate::harness::*;
use rustls_pki_types::pem::PemObject;

async fn from_socket(daemon: &Daemon) -> String {
    let (status, body) = edgesync::control::Client::new(&daemon.socket)
        .request(hyper::Method::GET, "/metrics", None)
        .await
        .unwrap();
    assert!(status.is_success());
    String::from_utf8(body).unwrap()
}

/// The value of the sample whose name and labels start with `sample`.
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(sample))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_edge_serve_prometheus_metrics() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        ok(head.daemon.cli(&[
            "apply",
            "-f",
            &write(dir.path(), "en.yaml", &example("nginx")),
        ]));
        wait_for("manifest", SOON, || dirs.manifest("default", "nginx")).await;

        let text = wait_value(&head.daemon, "edgesync_peers_connected{role=\"edge\"}", 1.0).await;
        assert_eq!(value(&text, "edgesync_documents "), Some(1.0), "{text}");
        assert!(
            value(&text, "edgesync_last_sync_age_seconds{edge=\"edge01\"}").is_some(),
            "{text}"
        );
        assert!(
            value(&text, "edgesync_sqlite_write_seconds_count").unwrap() > 0.0,
            "{text}"
        );
        assert!(
            value(
                &text,
                "edgesync_certificate_expiry_timestamp_seconds{certificate=\"ca\"}"
            )
            .unwrap()
                > 1.7e9
        );

        let text = from_socket(&edge).await;
        assert!(
            value(
                &text,
                "edgesync_wire_bytes_total{role=\"head\",direction=\"out\"}"
            )
            .unwrap()
                > 0.0,
            "{text}"
        );
        assert!(
            value(
                &text,
                "edgesync_frames_total{role=\"head\",direction=\"in\"}"
            )
            .unwrap()
                > 0.0,
            "{text}"
        );
        assert!(
            value(&text, "edgesync_sync_rounds_total{role=\"head\"}").unwrap() > 0.0,
            "{text}"
        );
        assert!(
            value(&text, "edgesync_reconcile_runs_total").unwrap() > 0.0,
            "{text}"
        );
        assert_eq!(value(&text, "edgesync_pods_refused "), Some(0.0), "{text}");
        assert!(
            value(
                &text,
                "edgesync_certificate_expiry_timestamp_seconds{certificate=\"node\"}"
            )
            .is_some(),
            "{text}"
        );

        let pem = std::fs::read(head.state.join("ca.crt")).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        let tls = edgesync::transport::tls::https_client_config(&der).unwrap();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .unwrap();
        // The metrics listeners serve the same over HTTP, with what an operator alerts on.
        let scrape = |daemon: &Daemon| {
            let request = http.get(format!("http://{}/metrics", daemon.metrics.unwrap()));
            async move { request.send().await.unwrap().text().await.unwrap() }
        };
        let text = scrape(&head.daemon).await;
        assert_eq!(
            value(&text, "edgesync_edge_up{edge=\"edge01\"}"),
            Some(1.0),
            "{text}"
        );
        let heard = value(
            &text,
            "edgesync_edge_last_heard_timestamp_seconds{edge=\"edge01\"}",
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(heard.is_some_and(|t| (now - t).abs() < 30.0), "{text}");
        assert_eq!(value(&text, "edgesync_head_writer "), Some(1.0), "{text}");
        let build = format!(
            "edgesync_build_info{{version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        for process in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(
                value(&text, process).is_some_and(|v| v > 0.0),
                "{process}: {text}"
            );
        }
        let text = scrape(&edge).await;
        assert!(
            text.contains("edgesync_peers_connected{role=\"head\"} 1"),
            "{text}"
        );

        // The head's public API does not serve them.
        let url = format!("https://localhost:{}/metrics", head.api.port());
        let status = http.get(url).send().await.unwrap().status();
        assert_eq!(status, reqwest::StatusCode::NOT_FOUND);

        // An edge that stops is down, heard from when its session ended.
        edge.stop().await;
        wait_value(&head.daemon, "edgesync_peers_connected{role=\"edge\"}", 0.0).await;
        let text = scrape(&head.daemon).await;
        assert_eq!(
            value(&text, "edgesync_edge_up{edge=\"edge01\"}"),
            Some(0.0),
            "{text}"
        );
        assert!(
            value(
                &text,
                "edgesync_edge_last_heard_timestamp_seconds{edge=\"edge01\"}"
            )
            .is_some(),
            "{text}"
        );
    })
    .await;
}

/// Waits until `sample` reads `want` on `daemon`'s control socket; returns all the metrics then.
async fn wait_value(daemon: &Daemon, sample: &str, want: f64) -> String {
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let text = from_socket(daemon).await;
        if value(&text, sample) == Some(want) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{sample} is not {want}: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_documents_count_edits_that_have_not_reached_a_peer() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head_addr = free_udp_addr();
        let head = HeadProc::start(dir.path(), head_addr, &[]).await;
        let pods = |image| edgenode("default", "edge01", &[("web", image)]);
        ok(head.daemon.cli(&[
            "apply",
            "-f",
            &write(dir.path(), "a.yaml", &pods("nginx:1")),
        ]));
        // No peer has it yet: its edge has not joined.
        wait_value(&head.daemon, "edgesync_pending_documents ", 1.0).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[head_addr], Some(&head.token()))
            .await;
        wait_for("manifest", SOON, || dirs.manifest("default", "web")).await;
        wait_value(&head.daemon, "edgesync_pending_documents ", 0.0).await;
        wait_value(&edge, "edgesync_pending_documents ", 0.0).await;

        head.daemon.stop().await;
        ok(edge.cli(&[
            "apply",
            "-f",
            &write(dir.path(), "b.yaml", &pods("nginx:2")),
        ]));
        wait_value(&edge, "edgesync_pending_documents ", 1.0).await;

        let head = HeadProc::start(dir.path(), head_addr, &[]).await;
        wait_value(&edge, "edgesync_pending_documents ", 0.0).await;
        wait_value(&head.daemon, "edgesync_pending_documents ", 0.0).await;
    })
    .await;
}
