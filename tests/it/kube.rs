//! The head with a cluster: a real head process whose real `kube` client talks to the
//! Kubernetes API emulator, and a real edge process behind it.

use crate::harness::*;
use crate::kube_api::KubeApi;
use edgesync::crd::EdgeNode;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const API: &str = "edgesync.io/v1alpha1";

pub(crate) struct Cluster {
    pub(crate) api: KubeApi,
    pub(crate) client: kube::Client,
    pub(crate) kubeconfig: String,
}

impl Cluster {
    pub(crate) async fn start(dir: &Path) -> Cluster {
        let api = KubeApi::start().await;
        api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "edgesync-system"}}));
        let path = dir.join("kubeconfig");
        api.write_kubeconfig(&path);
        let file = kube::config::Kubeconfig::read_from(&path).unwrap();
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .unwrap();
        Cluster {
            client: kube::Client::try_from(config).unwrap(),
            api,
            kubeconfig: path.display().to_string(),
        }
    }

    /// A head that uses this cluster, in `dir`.
    async fn head(&self, dir: &Path) -> HeadProc {
        HeadProc::start(dir, free_udp_addr(), &["--kubeconfig", &self.kubeconfig]).await
    }

    /// A head, and edge01 joined to it through a relay that can cut the link.
    async fn edge_behind_relay(
        &self,
        dir: &Path,
    ) -> (HeadProc, crate::relay::Relay, EdgeDirs, Daemon) {
        let head_addr = free_udp_addr();
        let head = HeadProc::start(dir, head_addr, &["--kubeconfig", &self.kubeconfig]).await;
        let relay = crate::relay::Relay::start(head_addr).await.unwrap();
        let dirs = EdgeDirs::new(dir, "edge01");
        let edge = dirs
            .start("edge01", &[relay.local_addr()], Some(&head.token()))
            .await;
        (head, relay, dirs, edge)
    }

    fn edgenodes(&self, namespace: &str) -> Api<EdgeNode> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// `kubectl apply -f` of an EdgeNode written as YAML.
    pub(crate) async fn apply(&self, yaml: &str) {
        let object: EdgeNode = serde_saphyr::from_str(yaml).unwrap();
        let namespace = object
            .metadata
            .namespace
            .clone()
            .unwrap_or("default".into());
        let name = object.metadata.name.clone().unwrap();
        let params = PatchParams::apply("kubectl").force();
        self.edgenodes(&namespace)
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .unwrap();
    }

    pub(crate) fn object(&self, namespace: &str, name: &str) -> Option<Value> {
        self.api.get(API, "EdgeNode", Some(namespace), name)
    }
}

/// The reasons of the Events about EdgeNode `name` (any namespace), oldest first.
fn edgenode_event_reasons(cluster: &Cluster, name: &str) -> Vec<String> {
    let events = cluster.api.list("events.k8s.io/v1", "Event");
    events
        .iter()
        .filter(|e| e["regarding"]["kind"] == "EdgeNode" && e["regarding"]["name"] == name)
        .filter_map(|e| e["reason"].as_str().map(String::from))
        .collect()
}

pub(crate) fn pod_images(object: &Value) -> Vec<(String, String)> {
    let mut pods: Vec<(String, String)> = object["spec"]["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .map(|p| {
                    (
                        p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                        p["spec"]["containers"][0]["image"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    pods.sort();
    pods
}

pub(crate) fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_reaches_the_edge_and_status_comes_back() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let head = cluster.head(dir.path()).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;

        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        wait_for("manifest from the CRD", SOON, || {
            dirs.manifest("default", "web")
        })
        .await;
        let object = wait_for("Running in the resource's status", SOON, || {
            cluster
                .object("default", "edge01")
                .filter(|o| o["status"]["phase"] == "Running")
        })
        .await;
        assert_eq!(object["status"]["podsReady"], "1/1");
        assert_eq!(object["status"]["online"], true);
        let types: Vec<&str> = object["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Synced", "Online", "Valid"]);

        cluster
            .apply(&edgenode(
                "default",
                "edge01",
                &[("web", "nginx:1.27"), ("db", "redis")],
            ))
            .await;
        wait_for("update from the CRD", SOON, || {
            dirs.manifest("default", "web")
                .filter(|m| image(m) == "nginx:1.27")
                .and(dirs.manifest("default", "db"))
        })
        .await;
        wait_for("status after the update", SOON, || {
            cluster
                .object("default", "edge01")
                .filter(|o| o["status"]["podsReady"] == "2/2")
        })
        .await;
        // The resource's spec stays as the user wrote it: nothing was written back.
        let object = cluster.object("default", "edge01").unwrap();
        assert_eq!(
            pod_images(&object),
            pairs(&[("db", "redis"), ("web", "nginx:1.27")])
        );
        // Two applies, the head adding its finalizer once, and recording the synced document
        // heads once per applied change.
        let writes = cluster.api.write_count();
        assert_eq!(
            writes.get("PATCH edgenodes").copied().unwrap_or(0),
            5,
            "{writes:?}"
        );
        assert_eq!(
            object["metadata"]["finalizers"],
            json!(["edgesync.io/edge-cleanup"])
        );
        // Status is written when it changes, not per sync message: a handful of writes.
        tokio::time::sleep(Duration::from_secs(2)).await; // idle time in which nothing may be written
        let status_writes = cluster
            .api
            .write_count()
            .get("PATCH edgenodes/status")
            .copied()
            .unwrap_or(0);
        assert!(
            (2..=8).contains(&status_writes),
            "{status_writes} status writes: {writes:?}"
        );

        cluster
            .edgenodes("default")
            .delete("edge01", &DeleteParams::default())
            .await
            .unwrap();
        wait_for("pods removed after kubectl delete", SOON, || {
            (dirs.manifest("default", "web").is_none() && dirs.manifest("default", "db").is_none())
                .then_some(())
        })
        .await;
        wait_for(
            "the resource released once the edge removed its pods",
            SOON,
            || cluster.object("default", "edge01").is_none().then_some(()),
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_edgenode_waits_for_its_offline_edge() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let head = cluster.head(dir.path()).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        wait_for("manifest from the CRD", SOON, || {
            dirs.manifest("default", "web")
        })
        .await;
        wait_for("the edge online in status", SOON, || {
            let object = cluster.object("default", "edge01")?;
            (object["status"]["online"] == true).then_some(())
        })
        .await;
        edge.stop().await;

        cluster
            .edgenodes("default")
            .delete("edge01", &DeleteParams::default())
            .await
            .unwrap();
        // Held by the finalizer, and says why.
        let deleting = wait_for("a Deleting condition naming the offline edge", SOON, || {
            let object = cluster.object("default", "edge01")?;
            let conditions = object["status"]["conditions"].as_array()?;
            let c = conditions.iter().find(|c| c["type"] == "Deleting")?;
            (c["reason"] == "EdgeOffline").then(|| c.clone())
        })
        .await;
        let message = deleting["message"].as_str().unwrap();
        assert!(message.contains("edgesync node remove edge01"), "{message}");
        let object = cluster.object("default", "edge01").unwrap();
        assert!(object["metadata"]["deletionTimestamp"].is_string());
        assert!(dirs.manifest("default", "web").is_some());

        // As Events on the EdgeNode, which `describe` lists from the API.
        wait_for("EdgeOffline and DeletionBlocked Events", SOON, || {
            let reasons = edgenode_event_reasons(&cluster, "edge01");
            (reasons.contains(&"EdgeOffline".to_string())
                && reasons.contains(&"DeletionBlocked".to_string()))
            .then_some(())
        })
        .await;
        let described = ok(head.daemon.cli(&["node", "describe", "edge01"]));
        let events = described.split_once("Events:").unwrap().1;
        for said in [
            "EdgeOffline",
            "DeletionBlocked",
            "EdgeNode default/edge01",
            "Joined",
        ] {
            assert!(events.contains(said), "{said} in:\n{described}");
        }

        let _edge = dirs.start("edge01", &[head.addr], None).await;
        wait_for("pods removed when the edge is back", SOON, || {
            dirs.manifest("default", "web").is_none().then_some(())
        })
        .await;
        wait_for("the resource released", SOON, || {
            cluster.object("default", "edge01").is_none().then_some(())
        })
        .await;

        // A resource for an edge that never joined goes at once.
        cluster
            .apply(&edgenode("default", "edge02", &[("web", "nginx")]))
            .await;
        wait_for("finalizer added", SOON, || {
            cluster
                .object("default", "edge02")
                .filter(|o| o["metadata"]["finalizers"].is_array())
        })
        .await;
        cluster
            .edgenodes("default")
            .delete("edge02", &DeleteParams::default())
            .await
            .unwrap();
        wait_for("released: no such edge", SOON, || {
            cluster.object("default", "edge02").is_none().then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_offline_edits_are_written_back_and_merge_with_user_edits() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let (_head, relay, dirs, edge) = cluster.edge_behind_relay(dir.path()).await;
        cluster
            .apply(&edgenode(
                "default",
                "edge01",
                &[("web", "nginx"), ("db", "redis")],
            ))
            .await;
        wait_for("base on the edge", SOON, || dirs.manifest("default", "db")).await;

        relay.cut();
        cluster
            .apply(&edgenode(
                "default",
                "edge01",
                &[("web", "nginx:1.27"), ("db", "redis")],
            ))
            .await;
        let offline = write(
            dir.path(),
            "edge.yaml",
            &edgenode(
                "default",
                "edge01",
                &[("web", "nginx"), ("db", "redis"), ("cache", "memcached")],
            ),
        );
        ok(edge.cli(&["apply", "-f", &offline]));
        wait_for("offline edit on the edge", SOON, || {
            dirs.manifest("default", "cache")
        })
        .await;
        relay.heal();

        let merged = pairs(&[
            ("cache", "memcached"),
            ("db", "redis"),
            ("web", "nginx:1.27"),
        ]);
        wait_for(
            "edge edit written back to the CRD, user edit kept",
            Duration::from_secs(40),
            || {
                cluster
                    .object("default", "edge01")
                    .filter(|o| pod_images(o) == merged)
            },
        )
        .await;
        wait_for("merged manifests", SOON, || {
            dirs.manifest("default", "web")
                .filter(|m| image(m) == "nginx:1.27")
                .and(dirs.manifest("default", "cache"))
        })
        .await;
        let managers: Vec<String> =
            cluster.object("default", "edge01").unwrap()["metadata"]["managedFields"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(|f| f["manager"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
        let writes = cluster.api.write_count();
        assert!(
            writes.get("PATCH edgenodes").copied().unwrap_or(0) >= 3,
            "user applies and the write-back: {writes:?} {managers:?}"
        );

        // An EdgeNode made on the edge itself appears in the cluster.
        let team = write(
            dir.path(),
            "team.yaml",
            &edgenode("team-a", "edge01", &[("x", "busybox")]),
        );
        let out = edge.cli(&["apply", "-f", &team]);
        assert!(out.status.success());
        let _ = cluster
            .api
            .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}));
        wait_for(
            "EdgeNode created from the edge",
            Duration::from_secs(30),
            || cluster.object("team-a", "edge01"),
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_expired_watch_recovers_without_losing_anything() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let head = cluster.head(dir.path()).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        let _ = cluster
            .api
            .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}));
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        cluster
            .apply(&edgenode("team-a", "edge01", &[("job", "busybox")]))
            .await;
        wait_for("both EdgeNodes on the edge", SOON, || {
            dirs.manifest("default", "web")
                .and(dirs.manifest("team-a", "job"))
        })
        .await;

        cluster.api.break_watches();
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx:2")]))
            .await;
        wait_for("change after a broken watch", SOON, || {
            dirs.manifest("default", "web")
                .filter(|m| image(m) == "nginx:2")
        })
        .await;

        // Deleted while the watch is down and history is gone: the relist must notice.
        cluster.api.break_watches();
        cluster
            .api
            .delete(API, "EdgeNode", Some("team-a"), "edge01");
        cluster.api.compact();
        cluster.api.break_watches();
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx:3")]))
            .await;
        wait_for("relist after 410 Gone", Duration::from_secs(30), || {
            let web = dirs
                .manifest("default", "web")
                .filter(|m| image(m) == "nginx:3");
            web.and(dirs.manifest("team-a", "job").is_none().then_some(()))
        })
        .await;

        // A head restart relists without duplicating or losing anything.
        head.daemon.stop().await;
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx:4")]))
            .await;
        let head = HeadProc::start(
            dir.path(),
            head.addr,
            &["--kubeconfig", &cluster.kubeconfig],
        )
        .await;
        wait_for(
            "change made while the head was down",
            Duration::from_secs(30),
            || {
                dirs.manifest("default", "web")
                    .filter(|m| image(m) == "nginx:4")
            },
        )
        .await;
        let listed = head.daemon.json(&["get", "edgenodes", "-A", "-o", "json"]);
        assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_the_head_refuses_says_why_in_its_status() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let _head = cluster.head(dir.path()).await;
        let privileged = edgenode("default", "edge01", &[("agent", "agent:1")])
            .replace("      spec:\n", "      spec:\n        hostNetwork: true\n");
        let object: Value = serde_saphyr::from_str(&privileged).unwrap();
        let api: Api<EdgeNode> = cluster.edgenodes("default");
        api.create(
            &PostParams::default(),
            &serde_json::from_value(object).unwrap(),
        )
        .await
        .unwrap();
        wait_for("a SpecRefused Event", SOON, || {
            let reasons = edgenode_event_reasons(&cluster, "edge01");
            reasons.contains(&"SpecRefused".to_string()).then_some(())
        })
        .await;
        let object = wait_for("Valid=False on the resource", SOON, || {
            cluster.object("default", "edge01").filter(|o| {
                o["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Valid" && c["status"] == "False")
                })
            })
        })
        .await;
        let valid = object["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Valid")
            .unwrap()
            .clone();
        assert!(
            valid["message"]
                .as_str()
                .unwrap()
                .contains("spec.pods[0].spec.hostNetwork"),
            "{valid}"
        );
    })
    .await;
}

/// What a kubelet registered as `name` reports about its Node.
fn kube_node(name: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

/// The mirror pod a kubelet makes for a static pod manifest.
fn mirror_pod(manifest: &Value, node: &str, phase: &str) -> Value {
    let mut pod = manifest.clone();
    let name = format!("{}-{node}", manifest["metadata"]["name"].as_str().unwrap());
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["annotations"]["kubernetes.io/config.mirror"] = json!("hash");
    pod["spec"]["nodeName"] = json!(node);
    pod["status"] = json!({"phase": phase});
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_pods_and_the_node_decide_the_phase() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        cluster.api.put(kube_node("edge01", true));
        let head = cluster.head(dir.path()).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        let manifest = wait_for("manifest from the CRD", SOON, || {
            dirs.manifest("default", "web")
        })
        .await;
        assert_eq!(
            manifest["metadata"]["labels"]["edgesync.io/managed"],
            "true"
        );
        let phase = |want: &'static str| {
            let cluster = &cluster;
            move || {
                cluster
                    .object("default", "edge01")
                    .filter(|o| o["status"]["phase"] == want)
            }
        };
        // Applied on the edge, but the kubelet has not made the mirror pod yet.
        let object = wait_for("Pending without a mirror pod", SOON, phase("Pending")).await;
        assert_eq!(object["status"]["pods"][0]["phase"], "Missing");
        assert_eq!(object["status"]["podsReady"], "0/1");

        cluster.api.put(mirror_pod(&manifest, "edge01", "Pending"));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            cluster.object("default", "edge01").unwrap()["status"]["phase"],
            "Pending"
        );

        cluster.api.put(mirror_pod(&manifest, "edge01", "Running"));
        let object = wait_for("Running with the mirror pod", SOON, phase("Running")).await;
        assert_eq!(object["status"]["pods"][0]["phase"], "Running");
        assert_eq!(object["status"]["podsReady"], "1/1");

        cluster.api.put(kube_node("edge01", false));
        let object = wait_for("Offline when the Node is not Ready", SOON, phase("Offline")).await;
        assert_eq!(object["status"]["online"], false);

        cluster.api.put(kube_node("edge01", true));
        wait_for("Running again", SOON, phase("Running")).await;
        cluster.api.put(mirror_pod(&manifest, "edge01", "Failed"));
        wait_for("Degraded when a mirror pod failed", SOON, phase("Degraded")).await;
    })
    .await;
}

pub(crate) fn lease_holder(cluster: &Cluster) -> Option<String> {
    let lease = cluster.api.get(
        "coordination.k8s.io/v1",
        "Lease",
        Some("edgesync-system"),
        "edgesync-writer",
    )?;
    // The holder is the head's name and a suffix unique to its process.
    let holder = lease["spec"]["holderIdentity"].as_str()?;
    let (name, suffix) = holder.split_once('_')?;
    assert_eq!(suffix.len(), 8, "{holder}");
    Some(name.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_writer_head_dies_another_takes_the_lease_and_the_edge_follows() {
    within(180, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let (addr_a, addr_b) = (free_udp_addr(), free_udp_addr());
        let head = |name: &'static str, addr, peer: std::net::SocketAddr| {
            let dir = dir.path().join(name);
            let kubeconfig = cluster.kubeconfig.clone();
            async move {
                let peer = peer.to_string();
                let args = [
                    "--kubeconfig",
                    &kubeconfig,
                    "--lease-duration",
                    "3s",
                    "--peer",
                    &peer,
                ];
                HeadProc::start_named(&dir, name, addr, &args).await
            }
        };
        let a = head("head-a", addr_a, addr_b).await;
        let b = head("head-b", addr_b, addr_a).await;
        // Both heads use the one CA of the Secret the first head created.
        let ca = |h: &HeadProc| std::fs::read(h.state.join("ca.crt")).unwrap();
        assert_eq!(ca(&a), ca(&b));
        let writer = wait_for("a writer", SOON, || lease_holder(&cluster)).await;
        let (writer, standby) = if writer == "head-a" { (a, b) } else { (b, a) };

        // The edge joins through the writer and knows both heads.
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let edge = dirs
            .start(
                "edge01",
                &[writer.addr, standby.addr],
                Some(&writer.token()),
            )
            .await;
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        wait_for("manifest from the CRD", SOON, || {
            dirs.manifest("default", "web")
        })
        .await;
        wait_for("Running", SOON, || {
            cluster
                .object("default", "edge01")
                .filter(|o| o["status"]["phase"] == "Running")
        })
        .await;

        writer.daemon.kill();
        let standby_name = if standby.addr == addr_a {
            "head-a"
        } else {
            "head-b"
        };
        wait_for(
            "the standby takes the Lease",
            Duration::from_secs(15),
            || (lease_holder(&cluster).as_deref() == Some(standby_name)).then_some(()),
        )
        .await;

        // The edge, joined through the dead head, is let in by the other one.
        let edit = write(
            dir.path(),
            "edge.yaml",
            &edgenode(
                "default",
                "edge01",
                &[("web", "nginx"), ("cache", "memcached")],
            ),
        );
        ok(edge.cli(&["apply", "-f", &edit]));
        // The edge sees the dead head gone within a keep-alive and the idle timeout (50 s).
        wait_for(
            "the edge's edit written back by the new writer",
            Duration::from_secs(75),
            || {
                cluster
                    .object("default", "edge01")
                    .filter(|o| pod_images(o) == pairs(&[("cache", "memcached"), ("web", "nginx")]))
            },
        )
        .await;
        let peers = edge.json(&["status", "-o", "json"]);
        assert!(peers.to_string().contains(standby_name), "{peers}");

        // And the new writer carries on: user edits reach the edge, status comes back.
        cluster
            .apply(&edgenode(
                "default",
                "edge01",
                &[("web", "nginx:1.27"), ("cache", "memcached")],
            ))
            .await;
        wait_for("user edit through the new writer", SOON, || {
            dirs.manifest("default", "web")
                .filter(|m| image(m) == "nginx:1.27")
        })
        .await;
        wait_for("Running and online through the new writer", SOON, || {
            cluster
                .object("default", "edge01")
                .filter(|o| o["status"]["phase"] == "Running" && o["status"]["podsReady"] == "2/2")
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_find_each_other_through_the_head_service() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let (addr_a, addr_b) = (free_udp_addr(), free_udp_addr());
        let subset = |name: &str, addr: std::net::SocketAddr| {
            json!({
                "addresses": [{"ip": addr.ip().to_string(), "targetRef": {"kind": "Pod", "name": name}}],
                "ports": [{"name": "quic", "port": addr.port(), "protocol": "UDP"}],
            })
        };
        cluster.api.put(json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "edgesync-head", "namespace": "edgesync-system"},
            "subsets": [subset("head-a", addr_a), subset("head-b", addr_b)],
        }));
        let kubeconfig = ["--kubeconfig", cluster.kubeconfig.as_str()];
        let a = HeadProc::start_named(&dir.path().join("a"), "head-a", addr_a, &kubeconfig).await;
        let b = HeadProc::start_named(&dir.path().join("b"), "head-b", addr_b, &kubeconfig).await;
        let connected_to = |head: &HeadProc, peer: &str| {
            head.daemon.json(&["status", "-o", "json"])["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == peer && p["connected"] == true)
        };
        wait_for("the heads connected", SOON, || {
            (connected_to(&a, "head-b") && connected_to(&b, "head-a")).then_some(())
        })
        .await;
        // Documents flow between them: a resource reaches both heads' stores.
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        for head in [&a, &b] {
            wait_for("the document on every head", SOON, || {
                let out = head.daemon.cli(&["get", "edgenodes", "edge01", "-o", "json"]);
                out.status.success().then_some(())
            })
            .await;
        }

        // An edge that joins and connects only to the head that does not write, with a token
        // the writer made, is reported online and Running by the writer.
        let writer = wait_for("a writer", SOON, || lease_holder(&cluster)).await;
        let (writer, standby) = if writer == "head-a" { (&a, &b) } else { (&b, &a) };
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs
            .start("edge01", &[standby.addr], Some(&writer.token()))
            .await;
        wait_for("manifest through the standby", SOON, || {
            dirs.manifest("default", "web")
        })
        .await;
        let object = wait_for("Running and online, written by the writer", SOON, || {
            cluster
                .object("default", "edge01")
                .filter(|o| o["status"]["phase"] == "Running")
        })
        .await;
        assert_eq!(object["status"]["online"], true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_field_edited_on_both_sides_is_shown_as_a_conflict() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let (_head, relay, dirs, edge) = cluster.edge_behind_relay(dir.path()).await;
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        wait_for("base on the edge", SOON, || dirs.manifest("default", "web")).await;

        relay.cut();
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx:1.27")]))
            .await;
        let offline = write(
            dir.path(),
            "edge.yaml",
            &edgenode("default", "edge01", &[("web", "nginx:1.26")]),
        );
        ok(edge.cli(&["apply", "-f", &offline]));
        relay.heal();

        let object = wait_for("a Conflict condition", Duration::from_secs(40), || {
            cluster.object("default", "edge01").filter(|o| {
                o["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Conflict"))
            })
        })
        .await;
        let conflict = object["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Conflict")
            .unwrap()
            .clone();
        let message = conflict["message"].as_str().unwrap();
        assert!(
            message.contains("nginx:1.27") && message.contains("nginx:1.26"),
            "{conflict}"
        );
        // Both sides settle on one value, the one the condition says was kept.
        let settled = wait_for("one image everywhere", SOON, || {
            let manifest = dirs.manifest("default", "web")?;
            let object = cluster.object("default", "edge01")?;
            let ours = pod_images(&object);
            (ours.len() == 1 && ours[0].1 == image(&manifest)).then(|| ours[0].1.clone())
        })
        .await;
        let other = if settled == "nginx:1.27" {
            "nginx:1.26"
        } else {
            "nginx:1.27"
        };
        let told = message.split("; ").any(|c| {
            c.split_once(", lost ")
                .is_some_and(|(kept, lost)| kept.contains(&settled) && lost.contains(other))
        });
        assert!(told, "{message} / {settled}");
        wait_for("a Conflict Event", SOON, || {
            let reasons = edgenode_event_reasons(&cluster, "edge01");
            reasons.contains(&"Conflict".to_string()).then_some(())
        })
        .await;
        // The condition stays until the user changes the resource again.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let still = cluster.object("default", "edge01").unwrap();
        assert!(
            still["status"]["conditions"]
                .to_string()
                .contains("Conflict"),
            "{still}"
        );
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx:1.28")]))
            .await;
        wait_for(
            "the Conflict condition cleared by the next edit",
            SOON,
            || {
                cluster.object("default", "edge01").filter(|o| {
                    !o["status"]["conditions"].to_string().contains("Conflict")
                        && o["status"]["phase"] == "Running"
                })
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_keeps_only_the_namespaces_it_is_told_to_watch() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        cluster
            .api
            .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}));
        let head = HeadProc::start(
            dir.path(),
            free_udp_addr(),
            &[
                "--kubeconfig",
                &cluster.kubeconfig,
                "--watch-namespace",
                "team-a",
            ],
        )
        .await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        cluster
            .apply(&edgenode("default", "edge01", &[("web", "nginx")]))
            .await;
        cluster
            .apply(&edgenode("team-a", "edge01", &[("api", "nginx")]))
            .await;
        wait_for("the watched namespace reaches the edge", SOON, || {
            dirs.manifest("team-a", "api")
        })
        .await;
        wait_for("status in the watched namespace", SOON, || {
            cluster
                .object("team-a", "edge01")
                .filter(|o| o["status"]["phase"] == "Running")
        })
        .await;
        let other = cluster.object("default", "edge01").unwrap();
        assert!(dirs.manifest("default", "web").is_none());
        assert!(
            other.get("status").is_none() && other["metadata"]["finalizers"].is_null(),
            "{other}"
        );
    })
    .await;
}

/// What `kubectl apply -f FILE` does: finds the file's kind through discovery (refused when
/// the API server does not serve its group), then applies the object server-side.
async fn kubectl_apply_file(client: &kube::Client, path: &str) -> Result<(), kube::Error> {
    let text = std::fs::read_to_string(path).unwrap();
    let object: kube::api::DynamicObject = serde_saphyr::from_str(&text).unwrap();
    let types = object.types.clone().unwrap();
    let gvk = kube::api::GroupVersionKind::try_from(&types).unwrap();
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await?;
    let namespace = object.metadata.namespace.clone().unwrap();
    let name = object.metadata.name.clone().unwrap();
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &resource);
    let params = PatchParams::apply("kubectl").force();
    api.patch(&name, &params, &Patch::Apply(&object)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_works_with_kubectl_and_its_legacy_form_with_edgesync_apply() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path()).await;
        let head = cluster.head(dir.path()).await;
        let dirs = EdgeDirs::new(dir.path(), "edge01");
        let _edge = dirs
            .start("edge01", &[head.addr], Some(&head.token()))
            .await;
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/example/edge01.yaml");
        let legacy = concat!(env!("CARGO_MANIFEST_DIR"), "/example/edge01-legacy.yaml");

        let refused = kubectl_apply_file(&cluster.client, legacy).await;
        assert!(refused.is_err(), "the legacy group is not served");
        kubectl_apply_file(&cluster.client, example).await.unwrap();
        let manifest = wait_for("the example's pod on the edge", SOON, || {
            dirs.manifest("default", "nginx")
        })
        .await;
        assert_eq!(image(&manifest), "nginx");

        // The legacy form, with another image, through edgesync apply: the resource follows.
        let text = std::fs::read_to_string(legacy)
            .unwrap()
            .replace("image: nginx", "image: nginx:1.27");
        let file = write(dir.path(), "legacy.yaml", &text);
        ok(head.daemon.cli(&["apply", "-f", &file]));
        wait_for("the legacy file's edit in the resource", SOON, || {
            cluster
                .object("default", "edge01")
                .filter(|o| pod_images(o) == [("nginx".to_string(), "nginx:1.27".to_string())])
        })
        .await;
    })
    .await;
}
