//! EdgeNode status in the cluster: one writer, started with each term as the writer (so the
//! Lease is checked in one place), fed by a coalescing queue of what may have changed —
//! documents, presence, refusals and conflicts, the edge's Node and mirror pods. It writes an
//! EdgeNode's status only when it differs from what was last written, at most once per
//! interval, so neither syncing nor 1,000 edges reconnecting cause a write storm.

use super::{Bridge, lock};
use crate::crd::{Condition, EdgeNodeStatus, MANAGED_LABEL, Phase};
use crate::daemon::Tasks;
use crate::head::cluster::patch_params;
use crate::head::events::edgenode_reference;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::api::{Api, Patch};
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::warn;

/// The least time between two passes of the status writer: each EdgeNode's status is written
/// at most this often.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// `lastSyncedAt` alone is refreshed at most this often, so syncing never causes a write storm.
const SYNC_TIME_REFRESH: Duration = Duration::from_secs(60);

/// A coalescing queue of names: marks made before the consumer takes them merge into one
/// set, so a burst costs one pass and the queue never holds more than the names there are.
#[derive(Default)]
pub(super) struct Pending {
    marks: Mutex<(BTreeSet<String>, bool)>,
    notify: Notify,
}

impl Pending {
    /// Asks for `name` to be looked at.
    pub(super) fn mark(&self, name: String) {
        self.marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .insert(name);
        self.notify.notify_one();
    }

    /// Asks for everything to be looked at.
    pub(super) fn mark_all(&self) {
        self.marks.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.notify.notify_one();
    }

    /// Waits for marks, and takes them: the names, and whether everything was asked for.
    pub(super) async fn next(&self) -> (BTreeSet<String>, bool) {
        loop {
            {
                let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
                if marks.1 || !marks.0.is_empty() {
                    return std::mem::take(&mut *marks);
                }
            }
            self.notify.notified().await;
        }
    }
}

/// Writes EdgeNode status while this head is the writer. Marks are document keys
/// (`namespace/name`) or edge names (every EdgeNode of that edge).
pub(super) async fn write(bridge: &Bridge, scopes: &[super::Scope]) {
    // Nothing is written before the caches are filled, so the phase does not flap.
    tokio::join!(bridge.cluster.ready(), bridge.edges.ready());
    let mut written: BTreeMap<String, (Value, Instant)> = BTreeMap::new();
    loop {
        let (marks, all) = bridge.status.next().await;
        let pass = Instant::now();
        let known: BTreeSet<String> = {
            let seen = lock(&bridge.seen);
            seen.base
                .keys()
                .chain(seen.invalid.keys())
                .cloned()
                .collect()
        };
        written.retain(|key, _| known.contains(key));
        let marked = |key: &String| {
            let edge = crate::key::edge_of(key).unwrap_or("");
            all || marks.contains(key) || marks.contains(edge)
        };
        for key in known.iter().filter(|k| marked(k)) {
            write_status(bridge, scopes, &mut written, key).await;
        }
        tokio::time::sleep_until((pass + STATUS_INTERVAL).into()).await;
    }
}

async fn write_status(
    bridge: &Bridge,
    scopes: &[super::Scope],
    written: &mut BTreeMap<String, (Value, Instant)>,
    key: &str,
) {
    let Some((namespace, name)) = crate::key::parts(key) else {
        return;
    };
    let (refused, conflicts) = {
        let seen = lock(&bridge.seen);
        (
            seen.invalid.get(key).cloned(),
            seen.conflicts.get(key).cloned(),
        )
    };
    let mut status = match bridge.node.edgenode_or_deleting(key).await {
        Ok(Some(object)) => {
            let mut status = object.status.unwrap_or_default();
            crate::node::status::with_cluster(
                &mut status,
                bridge.cluster.node_ready(name),
                |pod| bridge.cluster.mirror_phase(namespace, pod, name),
            );
            status
        }
        // Refused before any document existed: say so rather than nothing.
        Ok(None) if refused.is_some() => EdgeNodeStatus {
            phase: Some(Phase::Pending),
            ..EdgeNodeStatus::default()
        },
        _ => return,
    };
    let conflicts = conflicts.map(|c| c.into_iter().collect());
    crate::node::status::with_bridge(&mut status, conflicts, refused);
    // Times of its own: the cluster's view of a condition (Online from the Node) may differ
    // from the node's.
    let cluster_key = format!("cluster {key}");
    bridge
        .node
        .stamp_transitions(&cluster_key, &mut status.conditions);
    let status = serde_json::to_value(status).unwrap_or_default();
    let mut comparable = status.clone();
    if let Some(map) = comparable.as_object_mut() {
        map.remove("lastSyncedAt");
    }
    let due = match written.get(key) {
        Some((last, at)) => *last != comparable || at.elapsed() >= SYNC_TIME_REFRESH,
        None => true,
    };
    if !due {
        return;
    }
    let patch = json!({"status": status});
    // What the conditions were: as last written in this term, or as the cluster has them.
    let cached = scopes
        .iter()
        .filter(|s| s.namespace.as_deref().is_none_or(|ns| ns == namespace))
        .find_map(|s| {
            let at = ObjectRef::new_with(name, bridge.resource.clone()).within(namespace);
            s.store.get(&at)
        });
    let before: Vec<Condition> = match written.get(key) {
        Some((last, _)) => serde_json::from_value(last["conditions"].clone()),
        None => {
            let status = cached
                .as_ref()
                .map(|o| o.data["status"]["conditions"].clone());
            serde_json::from_value(status.unwrap_or_default())
        }
    }
    .unwrap_or_default();
    match bridge
        .api(namespace)
        .patch_status(name, &patch_params(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            let after: Vec<Condition> =
                serde_json::from_value(comparable["conditions"].clone()).unwrap_or_default();
            let told = crate::node::status::notices(&before, &after);
            if let Some(events) = bridge.events.as_ref().filter(|_| !told.is_empty()) {
                let uid = cached.and_then(|o| o.metadata.uid.clone());
                events.publish(&edgenode_reference(namespace, name, uid), told);
            }
            written.insert(key.to_string(), (comparable, Instant::now()));
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => warn!(doc = key, error = %e, "cannot write status"),
    }
}

/// What the cluster shows about the edges: their Node objects and the mirror pods the kubelets
/// create for the manifests, kept in caches by reflectors.
pub(super) struct ClusterView {
    nodes: Cache<KubeNode>,
    mirrors: Cache<Pod>,
}

impl ClusterView {
    /// Starts the caches; each change to a Node or a mirror pod asks `status` to look at
    /// that edge's EdgeNodes again.
    pub(super) fn start(
        client: &kube::Client,
        status: Arc<Pending>,
        tasks: &mut Tasks,
    ) -> ClusterView {
        let selector = format!("{MANAGED_LABEL}=true");
        let node_name = |node: &KubeNode| node.metadata.name.clone();
        let pod_node = |pod: &Pod| pod.spec.as_ref().and_then(|s| s.node_name.clone());
        ClusterView {
            nodes: cache(
                Api::all(client.clone()),
                watcher::Config::default(),
                status.clone(),
                node_name,
                tasks,
            ),
            mirrors: cache(
                Api::all(client.clone()),
                watcher::Config::default().labels(&selector),
                status,
                pod_node,
                tasks,
            ),
        }
    }

    pub(super) async fn ready(&self) {
        let _ = tokio::join!(
            self.nodes.wait_until_ready(),
            self.mirrors.wait_until_ready()
        );
    }

    /// The Node's Ready condition; None when the cluster has no Node of that name.
    pub(super) fn node_ready(&self, name: &str) -> Option<bool> {
        let node = self.nodes.get(&ObjectRef::new(name))?;
        let conditions = node.status.as_ref()?.conditions.as_ref();
        Some(conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")))
    }

    /// Phase of the mirror pod `<pod>-<node>` the kubelet of `node` made for a manifest.
    pub(super) fn mirror_phase(&self, namespace: &str, pod: &str, node: &str) -> Option<String> {
        let name = format!("{pod}-{node}");
        let mirror = self.mirrors.get(&ObjectRef::new(&name).within(namespace))?;
        let is_mirror = mirror
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
        let on_node = mirror.spec.as_ref()?.node_name.as_deref() == Some(node);
        if !(is_mirror && on_node) {
            return None;
        }
        let phase = mirror.status.as_ref().and_then(|s| s.phase.clone());
        Some(phase.unwrap_or_else(|| "Pending".into()))
    }
}

/// Annotation the kubelet puts on the mirror pod of a static pod.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A cache of `api`; each change to an object asks `status` to look at the EdgeNodes of the
/// edge it names.
fn cache<K: crate::head::cluster::Cached>(
    api: Api<K>,
    config: watcher::Config,
    status: Arc<Pending>,
    edge_of: fn(&K) -> Option<String>,
    tasks: &mut Tasks,
) -> Cache<K> {
    crate::head::cluster::cache(api, config, tasks, move |event| match event {
        watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
            if let Some(edge) = edge_of(object) {
                status.mark(edge);
            }
        }
        watcher::Event::InitDone => status.mark_all(),
        _ => {}
    })
}
