//! One state dir, one daemon: a second daemon on a state dir in use, or an edge whose socket
//! is taken, refuses before touching anything, and its node name stays free. A state dir the
//! daemon cannot use (a corrupt database, or one from a newer edgesync) is a one-line error
//! that leaves it as it was, never a silent reset.

use crate::harness::*;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_joins_with_the_printed_command_and_deleted_tokens_are_refused() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(&dir.path().join("head"), free_udp_addr(), &[]).await;
        let line = ok(head
            .daemon
            .cli(&["token", "create", "--print-join-command"]));
        // edgesync edge --node-name "$(hostname)" --head ADDR --token TOKEN
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words[..4],
            ["edgesync", "edge", "--node-name", "\"$(hostname)\""],
            "{line}"
        );
        assert_eq!(words[4..6], ["--head", &head.addr.to_string()], "{line}");
        assert_eq!(words[6], "--token", "{line}");
        let token = words[7].to_string();
        let id = token.split('.').nth(2).unwrap().to_string();

        let listed = head.daemon.json(&["token", "list", "-o", "json"]);
        let ids: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids.len(),
            2,
            "the first start's token and this one: {listed}"
        );
        assert!(ids.contains(&id.as_str()), "{listed}");
        assert!(
            !listed
                .to_string()
                .contains(token.split('.').nth(3).unwrap()),
            "no secret listed"
        );
        let table = ok(head.daemon.cli(&["token", "list"]));
        assert!(
            table.starts_with("ID") && table.contains(&id) && table.contains("in 2"),
            "{table}"
        );

        // The printed command, with this edge's name for "$(hostname)".
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs.start("edge01", &[head.addr], Some(&token)).await;

        ok(head.daemon.cli(&["token", "delete", &id]));
        let listed = head.daemon.json(&["token", "list", "-o", "json"]);
        assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
        let again = head.daemon.cli(&["token", "delete", &id]);
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("no join token"));
        let refused =
            EdgeDirs::new(dir.path(), "edge02").spawn("edge02", &[head.addr], Some(&token), &[]);
        assert_ne!(
            refused.exit_code(SOON).await,
            0,
            "a deleted token joins no edge"
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

/// The names of `pid`'s threads (as the kernel keeps them: at most 15 bytes).
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .collect()
}

/// A head drives its QUIC endpoint on a thread of its own, where an idle edge's keep-alive
/// wakes nothing else, and its edges' sessions work through it; an edge has no such thread.
/// A head's allocator has a thread that returns freed memory while the head is idle; an
/// edge's returns it as it comes free, with no thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_drives_its_quic_endpoint_on_a_thread_of_its_own() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let (head, dirs, edge) = head_and_edge(dir.path()).await;
        let names = thread_names(head.daemon.pid());
        for thread in ["edgesync-quic", "jemalloc_bg_thd"] {
            assert_eq!(
                names.iter().filter(|n| *n == thread).count(),
                1,
                "{thread}: {names:?}"
            );
        }
        let names = thread_names(edge.pid());
        for thread in ["edgesync-quic", "jemalloc_bg_thd"] {
            assert!(!names.iter().any(|n| n == thread), "{thread}: {names:?}");
        }
        // The edge's session works through it: an apply reaches the edge's manifests.
        let file = write(
            dir.path(),
            "node.yaml",
            &edgenode("default", "edge01", &[("web", "nginx:9")]),
        );
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("the manifest", SOON, || {
            dirs.manifest("default", "web")
                .filter(|m| image(m) == "nginx:9")
        })
        .await;
    })
    .await;
}
