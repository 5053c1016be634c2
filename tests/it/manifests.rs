//! The edge's manifest directory with real processes: one pod that cannot be written holds
//! back no other, hand edits are repaired whatever the timing, links are never followed,
//! files edgesync did not write are never touched (a pod refused for one shows in the
//! EdgeNode's status), a crash's temp files go on start, and the head's policy lets a
//! privileged namespace's pods through.

use crate::harness::*;
use serde_json::Value;
use std::path::Path;

/// State and reason of `pod` in EdgeNode `default/edge01`, as `get -o json` on `daemon` shows it.
fn pod_state(daemon: &Daemon, pod: &str) -> Option<(String, String)> {
    let node = daemon.json(&["get", "edgenodes", "edge01", "-o", "json"]);
    let state = node["status"]["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == pod)?
        .clone();
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    Some((text(&state["state"]), text(&state["reason"])))
}

/// Waits until `pod` shows `state` with a reason containing `reason`.
async fn wait_state(daemon: &Daemon, pod: &str, state: &str, reason: &str) {
    let what = format!("{pod} {state} ({reason}) in status");
    wait_for(&what, SOON, || {
        pod_state(daemon, pod).filter(|(s, r)| s == state && r.contains(reason))
    })
    .await;
}

fn apply(daemon: &Daemon, dir: &Path, pods: &[(&str, &str)]) {
    let file = write(dir, "edge01.yaml", &edgenode("default", "edge01", pods));
    ok(daemon.cli(&["apply", "-f", &file]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_blocked_by_a_directory_holds_back_no_other_and_is_written_once_it_is_gone() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let edge_dirs = EdgeDirs::new(dir.path(), "edge01");
        std::fs::create_dir_all(edge_dirs.manifests.join("edgesync_default_stuck.json")).unwrap();
        let foreign = edge_dirs.manifests.join("kube-apiserver.yaml");
        std::fs::write(&foreign, "not ours").unwrap();
        let _edge = edge_dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;

        let pods = [("stuck", "nginx"), ("web", "nginx"), ("db", "redis")];
        apply(&head.daemon, dir.path(), &pods);
        wait_for("the good manifests", SOON, || {
            edge_dirs
                .manifest("default", "web")
                .and(edge_dirs.manifest("default", "db"))
        })
        .await;
        wait_state(&head.daemon, "stuck", "NotWritten", "is a directory").await;
        wait_state(&head.daemon, "web", "Applied", "").await;

        // Later edits to the good pods still apply.
        let pods = [("stuck", "nginx"), ("web", "nginx:2"), ("db", "redis")];
        apply(&head.daemon, dir.path(), &pods);
        wait_for("edited web", SOON, || {
            edge_dirs
                .manifest("default", "web")
                .filter(|m| image(m) == "nginx:2")
        })
        .await;
        assert!(
            edge_dirs
                .manifests
                .join("edgesync_default_stuck.json")
                .is_dir(),
            "the directory is left alone"
        );

        std::fs::remove_dir(edge_dirs.manifests.join("edgesync_default_stuck.json")).unwrap();
        let stuck = wait_for("the unblocked manifest", SOON, || {
            edge_dirs.manifest("default", "stuck")
        })
        .await;
        assert_eq!(image(&stuck), "nginx");
        wait_state(&head.daemon, "stuck", "Applied", "").await;

        ok(head.daemon.cli(&["delete", "edgenode", "edge01"]));
        wait_for("every manifest removed", SOON, || {
            (edge_dirs.files() == ["kube-apiserver.yaml"]).then_some(())
        })
        .await;
        assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "not ours");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_manifest_is_repaired_by_the_drift_check() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let edge_dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = edge_dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        apply(&head.daemon, dir.path(), &[("web", "nginx")]);
        wait_for("manifest", SOON, || edge_dirs.manifest("default", "web")).await;

        // With no apply after it, the drift check repairs it, whatever was written there.
        for edit in ["{\"hand\": \"edited\"}", "not even JSON", ""] {
            std::fs::write(edge_dirs.manifests.join("edgesync_default_web.json"), edit).unwrap();
            wait_for("repaired", SOON, || {
                edge_dirs
                    .manifest("default", "web")
                    .filter(|m| image(m) == "nginx")
            })
            .await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_manifest_follows_an_apply_that_comes_before_any_drift_check() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let edge_dirs = EdgeDirs::new(dir.path(), "edge01");
        // No drift check in this test's time: only applies act on the hand edits.
        let _edge = edge_dirs
            .spawn(
                "edge01",
                &[head.addr],
                Some(&head.token()),
                &["--drift-interval", "1h"],
            )
            .ready()
            .await;
        let path = |pod: &str| {
            edge_dirs
                .manifests
                .join(format!("edgesync_default_{pod}.json"))
        };
        apply(
            &head.daemon,
            dir.path(),
            &[("web", "nginx"), ("db", "redis")],
        );
        wait_for("manifests", SOON, || {
            edge_dirs
                .manifest("default", "web")
                .and(edge_dirs.manifest("default", "db"))
        })
        .await;

        // Edited by hand, then removed from the spec: removed.
        std::fs::write(path("web"), "{\"hand\": \"edited\"}").unwrap();
        apply(&head.daemon, dir.path(), &[("db", "redis")]);
        wait_for("the edited manifest of a removed pod gone", SOON, || {
            (!path("web").exists()).then_some(())
        })
        .await;

        // Edited by hand, then changed in the spec: the new spec is written.
        std::fs::write(path("db"), "{\"hand\": \"edited\"}").unwrap();
        apply(&head.daemon, dir.path(), &[("db", "redis:2")]);
        wait_for("the edited manifest rewritten", SOON, || {
            edge_dirs
                .manifest("default", "db")
                .filter(|m| image(m) == "redis:2")
        })
        .await;

        // A pod removed while its manifest was edited by hand, then added back: written.
        std::fs::write(path("db"), "mine now?").unwrap();
        apply(&head.daemon, dir.path(), &[("web", "nginx")]);
        wait_for("db removed", SOON, || (!path("db").exists()).then_some(())).await;
        apply(
            &head.daemon,
            dir.path(),
            &[("web", "nginx"), ("db", "redis:3")],
        );
        wait_for("db back", SOON, || {
            edge_dirs
                .manifest("default", "db")
                .filter(|m| image(m) == "redis:3")
        })
        .await;
        wait_state(&head.daemon, "db", "Applied", "").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_at_manifest_paths_are_never_followed_and_their_targets_never_touched() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let edge_dirs = EdgeDirs::new(dir.path(), "edge01");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(&edge_dirs.manifests).unwrap();
        let target = outside.join("target.json");
        std::fs::write(&target, "outside").unwrap();
        let nowhere = outside.join("nowhere.json");
        let path = |pod: &str| {
            edge_dirs
                .manifests
                .join(format!("edgesync_default_{pod}.json"))
        };
        std::os::unix::fs::symlink(&nowhere, path("dangling")).unwrap();
        std::os::unix::fs::symlink(&target, path("linked")).unwrap();
        let edge = edge_dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;

        let pods = [("dangling", "nginx"), ("linked", "nginx"), ("web", "nginx")];
        apply(&head.daemon, dir.path(), &pods);
        wait_for("web", SOON, || edge_dirs.manifest("default", "web")).await;
        wait_state(&head.daemon, "dangling", "NotWritten", "symbolic link").await;
        wait_state(&head.daemon, "linked", "NotWritten", "symbolic link").await;

        // A managed manifest replaced by a link to a file outside: reported, left alone.
        std::fs::remove_file(path("web")).unwrap();
        std::os::unix::fs::symlink(&target, path("web")).unwrap();
        let pods = [
            ("dangling", "nginx"),
            ("linked", "nginx"),
            ("web", "nginx:2"),
        ];
        apply(&head.daemon, dir.path(), &pods);
        wait_state(&head.daemon, "web", "NotWritten", "symbolic link").await;

        // Deleting the EdgeNode removes none of the links.
        ok(head.daemon.cli(&["delete", "edgenode", "edge01"]));
        wait_for("nothing applied", SOON, || {
            let status = edge.json(&["status", "-o", "json"]);
            (status["appliedPods"] == serde_json::json!([])).then_some(())
        })
        .await;
        for pod in ["dangling", "linked", "web"] {
            assert!(path(pod).is_symlink(), "the link at {pod} is left alone");
        }
        assert!(!nowhere.exists(), "nothing written through a dangling link");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "outside");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_file_left_by_a_crash_is_removed_on_start_and_nothing_else() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let edge_dirs = EdgeDirs::new(dir.path(), "edge01");
        std::fs::create_dir_all(&edge_dirs.manifests).unwrap();
        let others = [
            ".edgesync-x.tmp.bak",
            "edgesync-x.tmp",
            "kube-apiserver.yaml",
        ];
        for name in [".edgesync-x.tmp"].iter().chain(&others) {
            std::fs::write(edge_dirs.manifests.join(name), "partial").unwrap();
        }
        let _edge = edge_dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        // The edge answers on its socket only after cleaning up.
        assert!(!edge_dirs.manifests.join(".edgesync-x.tmp").exists());
        for name in others {
            let content = std::fs::read_to_string(edge_dirs.manifests.join(name)).unwrap();
            assert_eq!(content, "partial", "{name} untouched");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_edgenode_runs_no_pod_not_even_one_added_apart_while_it_was_deleted() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let head_addr = free_udp_addr();
        let head = HeadProc::start(dir.path(), head_addr, &[]).await;
        let relay = crate::relay::Relay::start(head_addr).await.unwrap();
        let edge_dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = edge_dirs
            .start("edge01", &[relay.local_addr()], Some(&head.token()))
            .await;
        apply(&head.daemon, dir.path(), &[("web", "nginx")]);
        wait_for("web", SOON, || edge_dirs.manifest("default", "web")).await;

        // Apart: the edge adds a pod the head never sees, the head deletes the EdgeNode.
        relay.cut();
        apply(&edge, dir.path(), &[("web", "nginx"), ("cache", "redis")]);
        wait_for("cache", SOON, || edge_dirs.manifest("default", "cache")).await;
        ok(head.daemon.cli(&["delete", "edgenode", "edge01"]));
        relay.heal();

        // The delete removes only the pods the head saw; the document still holds cache,
        // but the EdgeNode is gone for everyone, so its pods are too.
        let gone = |daemon: &Daemon| {
            let list = daemon.json(&["get", "edgenodes", "-A", "-o", "json"]);
            list["items"] == serde_json::json!([])
        };
        wait_for("the deletion on the edge", SOON, || {
            gone(&edge).then_some(())
        })
        .await;
        assert!(gone(&head.daemon));
        wait_for("no manifest left", SOON, || {
            edge_dirs.files().is_empty().then_some(())
        })
        .await;
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
        assert_eq!(taken["state"], "NotWritten");
        assert_eq!(taken["cause"], "FileNameTaken");
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

/// A tmpfs mounted over a directory for one test, unmounted when dropped.
struct Mount(std::path::PathBuf);

impl Mount {
    /// Mounts a tmpfs of `size` over `dir`; None when not root (mounting needs it).
    fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        if !nix_is_root() {
            eprintln!("not root: cannot mount a tmpfs, so this test cannot run here");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let options = format!("size={size},mode=0700");
        mount(&[
            "-t",
            "tmpfs",
            "-o",
            &options,
            "tmpfs",
            &dir.display().to_string(),
        ]);
        Some(Mount(dir.to_path_buf()))
    }

    fn remount(&self, options: &str) {
        let options = format!("remount,{options}");
        mount(&["-o", &options, &self.0.display().to_string()]);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn mount(args: &[&str]) {
    let status = std::process::Command::new("mount").args(args).status();
    assert!(status.is_ok_and(|s| s.success()), "mount {args:?} failed");
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

/// `ManifestsWritten` of EdgeNode `default/edge01` on `daemon`: status, reason and message.
fn written_condition(daemon: &Daemon) -> Option<(String, String, String)> {
    let node = daemon.json(&["get", "edgenodes", "edge01", "-o", "json"]);
    let conditions = node["status"]["conditions"].as_array()?;
    let c = conditions
        .iter()
        .find(|c| c["type"] == "ManifestsWritten")?;
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    Some((text(&c["status"]), text(&c["reason"]), text(&c["message"])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_manifest_dir_is_a_condition_naming_the_cause_until_it_is_fixed() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let Some(disk) = Mount::tmpfs(&dirs.manifests, "256k") else {
            return;
        };
        let head = HeadProc::start(dir.path(), free_udp_addr(), &[]).await;
        let edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        apply(&head.daemon, dir.path(), &[("web", "nginx")]);
        wait_state(&head.daemon, "web", "Applied", "").await;

        // The disk fills up (with a file of the test's own): a new pod cannot be written, the
        // one written before stays.
        let filler = dirs.manifests.join("filler");
        let block = vec![b'x'; 4096];
        let mut file = std::fs::File::create(&filler).unwrap();
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
        drop(file);
        apply(
            &head.daemon,
            dir.path(),
            &[("web", "nginx"), ("db", "redis")],
        );
        wait_state(&head.daemon, "db", "NotWritten", "No space left").await;
        let (status, reason, message) = written_condition(&head.daemon).unwrap();
        assert_eq!((status.as_str(), reason.as_str()), ("False", "DiskFull"));
        let expected = "db: writing edgesync_default_db.json failed: No space left on device";
        assert!(message.starts_with(expected), "{message}");
        assert!(!message.contains(".tmp"), "no temp file path: {message}");
        let node = head
            .daemon
            .json(&["get", "edgenodes", "edge01", "-o", "json"]);
        assert_eq!(node["status"]["phase"], "Degraded");
        assert!(
            dirs.manifest("default", "web").is_some(),
            "the old one stays"
        );
        let described = ok(head.daemon.cli(&["describe", "edgenode", "edge01"]));
        assert!(
            described.contains("ManifestsWritten") && described.contains("DiskFull"),
            "{described}"
        );

        // Space again: it is written, and the condition clears.
        std::fs::remove_file(&filler).unwrap();
        wait_state(&head.daemon, "db", "Applied", "").await;
        wait_for("the ManifestsWritten condition gone", SOON, || {
            written_condition(&head.daemon).is_none().then_some(())
        })
        .await;

        // Read-only: an edit cannot be written, and says why.
        disk.remount("ro");
        apply(
            &head.daemon,
            dir.path(),
            &[("web", "nginx:2"), ("db", "redis")],
        );
        wait_state(&head.daemon, "web", "NotWritten", "Read-only file system").await;
        let (_, reason, message) = written_condition(&head.daemon).unwrap();
        assert_eq!(reason, "ManifestDirNotWritable");
        assert!(!message.contains(".tmp"), "no temp file path: {message}");
        let metrics = scrape(edge.metrics.unwrap()).await;
        assert!(metrics.contains("edgesync_pods_not_written 1"), "{metrics}");

        disk.remount("rw");
        wait_for("the edit written", SOON, || {
            dirs.manifest("default", "web")
                .filter(|m| image(m) == "nginx:2")
        })
        .await;
    })
    .await;
}
