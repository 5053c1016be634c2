//! DNS records for edge workers through the Namecheap XML API, against a real head process and
//! a loopback server that speaks that API, with faults.

use crate::harness::*;
use crate::namecheap::{Fault, Namecheap, Record};
use std::path::Path;
use std::time::Duration;

const PATIENT: Duration = Duration::from_secs(30);

fn record(name: &str, kind: &str, address: &str, ttl: u32, mx_pref: u32) -> Record {
    Record {
        ttl,
        mx_pref,
        ..Record::new(name, kind, address)
    }
}

/// A zone with records of every type, one of them named like an edge.
fn existing() -> Vec<Record> {
    vec![
        record("@", "A", "198.51.100.1", 1800, 10),
        record("@", "AAAA", "2001:db8:ffff::1", 3600, 10),
        record("www", "CNAME", "example.org.", 300, 10),
        record("@", "MX", "mx1.example.org.", 1800, 5),
        record("@", "MX", "mx2.example.org.", 1800, 20),
        record("@", "TXT", "v=spf1 include:_spf.example.org ~all", 60, 10),
        record("_dmarc", "TXT", "v=DMARC1; p=none", 1800, 10),
        record("sub", "NS", "ns1.example.net.", 1800, 10),
        record("old", "URL301", "https://example.org/new", 1800, 10),
        record("frame", "FRAME", "https://example.org/", 1800, 10),
        record("@", "CAA", "0 issue \"letsencrypt.org\"", 1800, 10),
        record("edge09", "CNAME", "someone-else.example.net.", 1800, 10),
    ]
}

fn head_config(dir: &Path, api: &Namecheap) -> String {
    let text = format!(
        "[dns]\nprovider = \"namecheap\"\nzone = \"example.org\"\nttl = 300\n\n\
         [dns.namecheap]\napi_url = \"{}\"\napi_user = \"{}\"\napi_key = \"{}\"\n\
         username = \"{}\"\nclient_ip = \"{}\"\n",
        api.url(),
        api.api_user(),
        api.api_key(),
        api.username(),
        api.client_ip()
    );
    let path = write(dir, "head.toml", &text);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn edge(
    dirs: &EdgeDirs,
    name: &str,
    head: &HeadProc,
    token: Option<&str>,
    address: Option<&str>,
) -> Daemon {
    let extra: Vec<&str> = address
        .map(|a| vec!["--advertise-address", a])
        .unwrap_or_default();
    dirs.spawn(name, &[head.addr], token, &extra)
}

/// The zone without our records, sorted, to compare with what it was.
fn others(api: &Namecheap) -> Vec<Record> {
    let mut records: Vec<Record> = api
        .records("example.org")
        .into_iter()
        .filter(|r| !r.name.starts_with("edge0") || r.name == "edge09")
        .collect();
    records.sort_by(|a, b| (&a.name, &a.kind, &a.address).cmp(&(&b.name, &b.kind, &b.address)));
    records
}

fn ours(api: &Namecheap, name: &str) -> Option<(String, String, u32)> {
    api.records("example.org")
        .into_iter()
        .find(|r| r.name == name)
        .map(|r| (r.kind, r.address, r.ttl))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_get_records_and_every_other_record_stays_as_it_was() {
    within(150, async {
        let dir = tempfile::tempdir().unwrap();
        let api = Namecheap::start().await;
        api.add_zone("example.org", existing());
        let before = others(&api);
        let config = head_config(dir.path(), &api);
        let head = HeadProc::start(dir.path(), free_udp_addr(), &["--config", &config]).await;
        let token = head.token();

        let dirs1 = EdgeDirs::new(dir.path(), "edge01");
        let edge01 = edge(&dirs1, "edge01", &head, Some(&token), Some("192.0.2.10"))
            .ready()
            .await;
        wait_for("A record of edge01", PATIENT, || {
            (ours(&api, "edge01") == Some(("A".into(), "192.0.2.10".into(), 300))).then_some(())
        })
        .await;
        assert_eq!(others(&api), before);

        // Several edges at once: updates are made one at a time, none is lost.
        let dirs2 = EdgeDirs::new(dir.path(), "edge02");
        let dirs3 = EdgeDirs::new(dir.path(), "edge03");
        let _edge02 = edge(&dirs2, "edge02", &head, Some(&token), Some("2001:db8::2"));
        let _edge03 = edge(&dirs3, "edge03", &head, Some(&token), None);
        wait_for("records of edge02 and edge03", PATIENT, || {
            let two = ours(&api, "edge02") == Some(("AAAA".into(), "2001:db8::2".into(), 300));
            let three = ours(&api, "edge03") == Some(("A".into(), "127.0.0.1".into(), 300));
            (two && three).then_some(())
        })
        .await;
        assert_eq!(api.max_concurrent(), 1, "updates are serialised");
        assert_eq!(others(&api), before);

        // A failed, garbled or empty read is never followed by a write; the change is retried.
        api.fail_next(1, Fault::Http500);
        api.fail_next(1, Fault::Garbage);
        api.fail_next(1, Fault::EmptyHosts);
        api.fail_next(1, Fault::ApiError);
        edge01.stop().await;
        let _edge01 = edge(&dirs1, "edge01", &head, None, Some("192.0.2.11"))
            .ready()
            .await;
        wait_for("edge01's new address after the faults", PATIENT, || {
            (ours(&api, "edge01") == Some(("A".into(), "192.0.2.11".into(), 300))).then_some(())
        })
        .await;
        assert_eq!(others(&api), before);
        assert!(ours(&api, "edge02").is_some() && ours(&api, "edge03").is_some());
        let requests = api.requests();
        for pair in requests.windows(2) {
            if pair[1]
                .0
                .eq_ignore_ascii_case("namecheap.domains.dns.setHosts")
            {
                assert!(
                    pair[0]
                        .0
                        .eq_ignore_ascii_case("namecheap.domains.dns.getHosts")
                );
            }
        }

        // A name someone else uses is left alone, with a clear log line.
        let dirs9 = EdgeDirs::new(dir.path(), "edge09");
        let _edge09 = edge(&dirs9, "edge09", &head, Some(&token), Some("192.0.2.19"))
            .ready()
            .await;
        wait_for("refusal logged", PATIENT, || {
            let log = head.daemon.log_text();
            log.lines()
                .any(|l| l.contains("edge09.example.org") && l.contains("already used"))
                .then_some(())
        })
        .await;
        assert_eq!(others(&api), before);

        // Removing a node removes its record.
        let socket = head.daemon.socket.display().to_string();
        ok(cli(&["node", "remove", "edge02", "--socket", &socket]));
        wait_for("edge02's record removed", PATIENT, || {
            ours(&api, "edge02").is_none().then_some(())
        })
        .await;
        assert_eq!(others(&api), before);
        assert!(ours(&api, "edge03").is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_fresh_heads_rewrite_no_record_and_removal_deletes_it() {
    within(150, async {
        let dir = tempfile::tempdir().unwrap();
        let api = Namecheap::start().await;
        api.add_zone("example.org", existing());
        let cluster = crate::kube::Cluster::start(dir.path()).await;
        let config = head_config(dir.path(), &api);
        let args = ["--config", &config, "--kubeconfig", &cluster.kubeconfig];
        let addr = free_udp_addr();
        let a = HeadProc::start_named(&dir.path().join("a"), "head-a", addr, &args).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge01 = edge(&dirs, "edge01", &a, Some(&a.token()), Some("192.0.2.10"))
            .ready()
            .await;
        wait_for("A record of edge01", PATIENT, || {
            (ours(&api, "edge01") == Some(("A".into(), "192.0.2.10".into(), 300))).then_some(())
        })
        .await;
        let edge_object = || {
            cluster
                .api
                .get("edgesync.io/v1alpha1", "Edge", None, "edge01")
        };
        let object = wait_for("the published record in the Edge", PATIENT, || {
            edge_object().filter(|o| o["status"]["dnsAddress"] == "192.0.2.10")
        })
        .await;
        assert_eq!(
            object["metadata"]["finalizers"],
            serde_json::json!(["edgesync.io/dns-record"])
        );
        let set_hosts = |api: &Namecheap| {
            api.requests()
                .iter()
                .filter(|(command, _)| {
                    command.eq_ignore_ascii_case("namecheap.domains.dns.setHosts")
                })
                .count()
        };
        let writes = set_hosts(&api);

        // Every head replaced with an empty state dir: the record is known, not rewritten.
        a.daemon.kill();
        std::fs::remove_dir_all(dir.path().join("a")).unwrap();
        let b = HeadProc::start_named(&dir.path().join("b"), "head-b", addr, &args).await;
        wait_for(
            "the edge back through the fresh head",
            Duration::from_secs(60),
            || {
                edge_object()
                    .filter(|o| o["status"]["head"] == "head-b" && o["status"]["online"] == true)
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(set_hosts(&api), writes, "{:?}", api.requests());
        assert_eq!(
            ours(&api, "edge01"),
            Some(("A".into(), "192.0.2.10".into(), 300))
        );

        // Removal deletes the record, then the Edge resource goes.
        ok(b.daemon.cli(&["node", "remove", "edge01"]));
        wait_for("edge01's record removed", PATIENT, || {
            ours(&api, "edge01").is_none().then_some(())
        })
        .await;
        wait_for("the Edge resource gone", PATIENT, || {
            edge_object().is_none().then_some(())
        })
        .await;
        drop(edge01);
    })
    .await;
}
