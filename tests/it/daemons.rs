//! One state dir, one daemon: a second daemon on a state dir in use, or an edge whose socket
//! is taken, refuses before touching anything, and its node name stays free.

use crate::harness::*;
use crate::{SOON, within};
use std::time::SystemTime;

/// Every file under `dir` with its size and modification time.
fn snapshot(dir: &std::path::Path) -> Vec<(String, u64, SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let meta = e.metadata().unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            (name, meta.len(), meta.modified().unwrap())
        })
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_a_state_dir_refuses_before_touching_anything() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(&dir.path().join("head"), free_udp_addr(), &[]).await;
        let token = head.token();
        let before = snapshot(&head.state);

        // An edge given the head's state dir.
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let state = head.state.display().to_string();
        let misplaced = EdgeDirs {
            state: head.state.clone(),
            ..EdgeDirs::new(dir.path(), "misplaced")
        };
        let edge = misplaced.spawn("edge01", &[head.addr], Some(&token), &[]);
        assert_ne!(edge.exit_code(SOON).await, 0);
        let log = std::fs::read_to_string(&misplaced.log).unwrap();
        assert!(
            log.contains("is in use by another edgesync (head, pid"),
            "{log}"
        );
        assert_eq!(
            snapshot(&head.state),
            before,
            "the head's state dir is untouched"
        );

        // A second head on it.
        let other = dir.path().join("other.sock");
        let args = [
            "head".to_string(),
            "--state-dir".into(),
            state.clone(),
            "--socket".into(),
            other.display().to_string(),
            "--listen".into(),
            free_udp_addr().to_string(),
            "--api-listen".into(),
            free_tcp_addr().to_string(),
        ];
        let log = dir.path().join("again.log");
        let again = Daemon::spawn(args.to_vec(), log.clone(), other);
        assert_ne!(again.exit_code(SOON).await, 0);
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(
            log.contains("is in use by another edgesync (head, pid"),
            "{log}"
        );
        assert_eq!(
            snapshot(&head.state),
            before,
            "the head's state dir is untouched"
        );

        // An edge whose socket is the head's: refused before joining, so the name is free.
        let socket = head.daemon.socket.display().to_string();
        let edge = dirs.spawn("edge01", &[head.addr], Some(&token), &["--socket", &socket]);
        assert_ne!(edge.exit_code(SOON).await, 0);
        assert!(
            !head.daemon.log_text().contains("edge01"),
            "no join was made"
        );
        let _edge = dirs.start("edge01", &[head.addr], Some(&token)).await;
        wait_for("edge01 connected", SOON, || {
            let status = head.daemon.json(&["status", "-o", "json"]);
            status["peers"]
                .as_array()?
                .iter()
                .any(|p| p["name"] == "edge01" && p["connected"] == true)
                .then_some(())
        })
        .await;
    })
    .await;
}
