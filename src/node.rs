//! The node core shared by both roles: the document store ([`docs`]), the peer table
//! ([`peers`]) and status derivation ([`status`]), with the metrics and the edge reconciler's
//! report. Nothing here depends on the role: what a node serves is its [`Scope`], and the
//! head-only parts (joins, tokens, the heads' registry, presence, admission) live in
//! [`crate::head`], wired in by the head.

pub mod docs;
pub mod feed;
pub mod journal;
pub mod looks;
pub mod peers;
pub mod status;

pub use docs::{ApplyOutcome, Change, DocEntry, Docs, Moved, Origin, Preview, Scope};
pub use peers::{PeerAddress, PeerInfo, Peers};
pub use status::{derive_status, to_edgenode};

use crate::crd::EdgeNode;
use crate::input::{InvalidInput, Rules};
use crate::key::DocKey;
use crate::metrics::{EdgeLabels, Metrics, RoleLabels};
use crate::model;
use crate::store::{Store, StoreError};
use crate::transport::tls::Role;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Errors from node operations.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The input was refused.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A document operation failed.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// A peer sent something unusable.
    #[error("document {key}: {reason}")]
    Sync {
        /// Document key.
        key: String,
        /// What went wrong.
        reason: String,
    },
    /// No such EdgeNode.
    #[error("edgenode {0:?} not found")]
    NotFound(String),
    /// The Kubernetes API refused or failed.
    #[error("cluster: {0}")]
    Cluster(String),
}

/// One manifest file as the edge reconciler left it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AppliedPod {
    /// EdgeNode key.
    pub edgenode: String,
    /// Pod name.
    pub pod: String,
    /// Manifest file, if one is written.
    pub file: Option<String>,
    /// Applied or Refused.
    pub state: String,
    /// Why it was refused.
    pub reason: Option<String>,
}

/// What `edgesync status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// head or edge.
    pub role: Role,
    /// This node's name.
    pub node: String,
    /// Known peers.
    pub peers: Vec<PeerInfo>,
    /// Documents held.
    pub documents: Vec<DocSummary>,
    /// Pods applied on this edge (empty on a head).
    pub applied_pods: Vec<AppliedPod>,
}

/// One document in the status report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DocSummary {
    /// `namespace/name`.
    pub key: String,
    /// Spec generation.
    pub generation: i64,
    /// Pods in the spec.
    pub pods: usize,
    /// Deleted (tombstone kept for sync).
    pub deleted: bool,
    /// Last sync with a peer.
    pub last_synced_at: Option<String>,
}

/// What a look at one EdgeNode reads: what its status is derived from ([`Node::look`]).
pub struct Look {
    /// Its document, read for its status.
    pub view: model::DocView,
    last_synced_at: Option<String>,
    online: bool,
}

struct Inner {
    role: Role,
    name: String,
    docs: Docs,
    peers: Peers,
    /// Per EdgeNode, each condition type's status and since when, as this node has seen.
    transitions: Mutex<HashMap<String, Vec<Transition>>>,
    journal: journal::Journal,
    applied: Mutex<Vec<AppliedPod>>,
    advertise: Mutex<Option<std::net::IpAddr>>,
    metrics: Metrics,
}

/// Handle to the node core; cheap to clone.
#[derive(Clone)]
pub struct Node(Arc<Inner>);

impl Node {
    /// Loads every stored document. A head serves every document, an edge those named after
    /// it; `rules.privileged_namespaces` is this node's policy.
    pub async fn open(
        role: Role,
        name: &str,
        store: Store,
        rules: Rules,
    ) -> Result<Node, NodeError> {
        let scope = match role {
            Role::Head => Scope::All,
            Role::Edge => Scope::Edge(name.to_string()),
        };
        let write_seconds = store.write_seconds();
        let docs = Docs::open(scope, store, rules).await?;
        Ok(Node(Arc::new(Inner {
            role,
            name: name.to_string(),
            docs,
            peers: Peers::default(),
            transitions: Mutex::new(HashMap::new()),
            journal: journal::Journal::default(),
            applied: Mutex::new(Vec::new()),
            advertise: Mutex::new(None),
            metrics: Metrics::new(write_seconds),
        })))
    }

    /// head or edge.
    pub fn role(&self) -> Role {
        self.0.role
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The documents.
    pub fn docs(&self) -> &Docs {
        &self.0.docs
    }

    /// The peers.
    pub fn peers(&self) -> &Peers {
        &self.0.peers
    }

    /// The database.
    pub fn store(&self) -> &Store {
        self.0.docs.store()
    }

    /// This node's validation rules.
    pub fn rules(&self) -> &Rules {
        self.0.docs.rules()
    }

    /// The recent events of the EdgeNodes this node serves.
    pub fn journal(&self) -> &journal::Journal {
        &self.0.journal
    }

    /// This node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The metrics in the Prometheus text format, with the gauges that mirror state read now.
    pub async fn metrics_text(&self) -> String {
        let m = &self.0.metrics;
        m.documents.set(self.0.docs.keys().len() as i64);
        m.pending_documents.set(self.0.docs.pending().await as i64);
        let now = Timestamp::now();
        let peers = self.0.peers.list();
        for role in [Role::Head, Role::Edge] {
            let connected = peers
                .iter()
                .filter(|p| p.role == role && p.connected)
                .count();
            let labels = RoleLabels {
                role: role.as_str().into(),
            };
            m.peers.get_or_create(&labels).set(connected as i64);
        }
        m.last_sync_age.clear();
        for peer in peers.iter().filter(|p| p.role == Role::Edge) {
            let seen = peer
                .last_seen
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok());
            if let Some(seen) = seen {
                let age = now.duration_since(seen).as_secs_f64().max(0.0);
                let labels = EdgeLabels {
                    edge: peer.name.clone(),
                };
                m.last_sync_age.get_or_create(&labels).set(age);
            }
        }
        m.render()
    }

    /// The address this node advertises to heads (`--advertise-address`), if any.
    pub fn advertise(&self) -> Option<std::net::IpAddr> {
        *lock(&self.0.advertise)
    }

    /// Sets the address this node advertises to heads.
    pub fn set_advertise(&self, address: Option<std::net::IpAddr>) {
        *lock(&self.0.advertise) = address;
    }

    /// Whether edge `name` is online: for this edge itself, whether a head is connected; for
    /// another, whether it is connected here or to a head connected here.
    pub async fn online(&self, name: &str) -> bool {
        if name == self.0.name {
            return self.0.peers.any_head_connected();
        }
        if self.0.peers.is_connected(name) {
            return true;
        }
        let head = self.0.docs.presence_of(name).await;
        head.is_some_and(|head| head != self.0.name && self.0.peers.is_connected(&head))
    }

    /// Replaces the reconciler's report.
    pub fn set_applied(&self, applied: Vec<AppliedPod>) {
        *lock(&self.0.applied) = applied;
    }

    /// The status report.
    pub async fn status(&self) -> Result<StatusReport, NodeError> {
        let mut documents = Vec::new();
        for key in self.0.docs.keys() {
            if let Some((view, last_synced_at)) = self.0.docs.view(&key).await? {
                documents.push(DocSummary {
                    key,
                    generation: view.generation,
                    pods: view.pods.len(),
                    deleted: view.deleted,
                    last_synced_at,
                });
            }
        }
        Ok(StatusReport {
            role: self.0.role,
            node: self.0.name.clone(),
            peers: self.0.peers.list(),
            documents,
            applied_pods: lock(&self.0.applied).clone(),
        })
    }

    /// EdgeNodes as kubectl would show them; `namespace` None means all.
    pub async fn edgenodes(&self, namespace: Option<&str>) -> Result<Vec<EdgeNode>, NodeError> {
        let mut out = Vec::new();
        for key in self.0.docs.keys() {
            let in_namespace = |ns| DocKey::parse(&key).is_ok_and(|k| k.namespace() == Some(ns));
            if namespace.is_some_and(|ns| !in_namespace(ns)) {
                continue;
            }
            if let Some(node) = self.edgenode(&key).await? {
                out.push(node);
            }
        }
        Ok(out)
    }

    /// One EdgeNode as kubectl would show it, unless absent or deleted.
    pub async fn edgenode(&self, key: &str) -> Result<Option<EdgeNode>, NodeError> {
        self.object(key, false).await
    }

    /// One EdgeNode as [`Node::edgenode`] shows it, or, deleted, while its edge has not yet
    /// removed the pods (with a `Deleting` condition saying why it waits).
    pub async fn edgenode_or_deleting(&self, key: &str) -> Result<Option<EdgeNode>, NodeError> {
        self.object(key, true).await
    }

    async fn object(&self, key: &str, deleting: bool) -> Result<Option<EdgeNode>, NodeError> {
        let Some((view, last_synced_at, online)) = self.shown(key, deleting, false).await? else {
            return Ok(None);
        };
        let mut object = to_edgenode(&view, last_synced_at, online);
        if let Some(status) = object.status.as_mut() {
            self.stamp_transitions(key, &mut status.conditions);
        }
        Ok(Some(object))
    }

    /// What a look at EdgeNode `key` after it changed reads: what its status is derived from
    /// (without the pods' specs), as [`Node::edgenode_or_deleting`] shows it (so also one being
    /// deleted that its edge has not let go yet).
    pub async fn look(&self, key: &str) -> Result<Option<Look>, NodeError> {
        let shown = self.shown(key, true, true).await?;
        Ok(shown.map(|(view, last_synced_at, online)| Look {
            view,
            last_synced_at,
            online,
        }))
    }

    /// The conditions of EdgeNode `key` as `look` finds them.
    pub fn conditions(&self, key: &str, look: &Look) -> Vec<crate::crd::Condition> {
        let mut status = derive_status(&look.view, look.last_synced_at.clone(), look.online);
        self.stamp_transitions(key, &mut status.conditions);
        status.conditions
    }

    /// EdgeNode `key` read out (only what its status needs, if `status_only`), its last sync
    /// time and whether its edge is online; None unless it was created and is not deleted, or
    /// `deleting` asks also for one whose edge has not applied its deletion yet.
    async fn shown(
        &self,
        key: &str,
        deleting: bool,
        status_only: bool,
    ) -> Result<Option<(model::DocView, Option<String>, bool)>, NodeError> {
        let read = match status_only {
            true => self.0.docs.view_status(key).await?,
            false => self.0.docs.view(key).await?,
        };
        let Some((view, last_synced_at)) = read else {
            return Ok(None);
        };
        let waiting = deleting && view.observed_generation != Some(view.generation);
        if (view.deleted && !waiting) || view.generation == 0 {
            return Ok(None);
        }
        let online = self.online(&view.name).await;
        Ok(Some((view, last_synced_at, online)))
    }

    /// Sets each condition's `lastTransitionTime` of EdgeNode `key`: kept while its status
    /// stays, now when it changes (or was never seen here).
    pub fn stamp_transitions(&self, key: &str, conditions: &mut [crate::crd::Condition]) {
        let mut all = lock(&self.0.transitions);
        let seen = match all.get_mut(key) {
            Some(seen) => seen,
            None => all.entry(key.to_string()).or_default(),
        };
        for condition in conditions {
            let since = match seen.iter_mut().find(|t| *t.type_ == condition.type_) {
                Some(t) if *t.status == condition.status => t.since,
                Some(t) => {
                    (t.status, t.since) = (condition.status.as_str().into(), Timestamp::now());
                    t.since
                }
                None => {
                    let since = Timestamp::now();
                    seen.push(Transition {
                        type_: condition.type_.as_str().into(),
                        status: condition.status.as_str().into(),
                        since,
                    });
                    since
                }
            };
            condition.last_transition_time = Some(since.to_string());
        }
    }
}

/// A condition's status and since when: kept for every condition of every EdgeNode this node
/// has looked at, so in few bytes (a timestamp, not its text).
struct Transition {
    type_: Box<str>,
    status: Box<str>,
    since: Timestamp,
}

/// Locks `m`; a panic elsewhere while holding it leaves data still worth using.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::Identity;

    const EXAMPLE: &str = include_str!("../example/edge01.yaml");

    async fn open(dir: &std::path::Path) -> Node {
        let store = Store::open(dir).unwrap();
        Node::open(Role::Head, "head", store, Rules::new("default"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn one_edge_certificate_from_two_addresses_at_once_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let node = open(dir.path()).await;
        let edge = Identity {
            role: Role::Edge,
            name: "edge01".into(),
            key: vec![1],
        };
        let at = |seen: &str| PeerAddress {
            seen: seen.into(),
            reachable: "192.0.2.1".parse().unwrap(),
            version: None,
        };
        let peers = node.peers();
        let also_from = || {
            let list = peers.list();
            list.into_iter()
                .find(|p| p.name == "edge01")
                .unwrap()
                .also_from
        };
        peers.connected(&edge, &at("192.0.2.1:4000"));
        // A reconnect from the same host (a new port) while the old session lingers is not.
        peers.connected(&edge, &at("192.0.2.1:4001"));
        assert_eq!(also_from(), None);
        peers.disconnected(&edge);
        peers.connected(&edge, &at("198.51.100.7:4000"));
        assert_eq!(also_from().as_deref(), Some("192.0.2.1:4001"));
        peers.disconnected(&edge);
        assert_eq!(also_from(), None);
    }

    #[tokio::test]
    async fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let dir = tempfile::tempdir().unwrap();
        let node = open(dir.path()).await;
        let online = |ok: bool| vec![crate::crd::Condition::new("Online", ok, "", "")];
        let mut first = online(true);
        node.stamp_transitions("default/edge01", &mut first);
        let since = first[0].last_transition_time.clone().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut again = online(true);
        node.stamp_transitions("default/edge01", &mut again);
        assert_eq!(again[0].last_transition_time.as_ref(), Some(&since));
        let mut flipped = online(false);
        node.stamp_transitions("default/edge01", &mut flipped);
        let changed = flipped[0].last_transition_time.clone().unwrap();
        let time = |t: &str| t.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        assert!(time(&changed) > time(&since), "{changed} after {since}");
        let mut other = online(false);
        node.stamp_transitions("default/edge02", &mut other);
        assert!(other[0].last_transition_time.is_some());
    }

    async fn chunk_sizes(node: &Node) -> Vec<usize> {
        node.store()
            .inspect(|conn| {
                let mut stmt =
                    conn.prepare("SELECT length(data) FROM doc_chunks ORDER BY key, seq")?;
                stmt.query_map([], |r| r.get::<_, i64>(0))?
                    .map(|n| n.map(|n| n as usize))
                    .collect()
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_restart_stores_only_new_changes_and_keeps_everything() {
        tokio::time::timeout(std::time::Duration::from_secs(20), async {
            let dir = tempfile::tempdir().unwrap();
            let node = open(dir.path()).await;
            node.docs().apply_text(EXAMPLE, "default").await.unwrap();
            let edited = EXAMPLE.replace("image: nginx", "image: nginx:1.27");
            node.docs().apply_text(&edited, "default").await.unwrap();
            let before = chunk_sizes(&node).await;
            drop(node);

            let node = open(dir.path()).await;
            let (view, _) = node.docs().view("default/edge01").await.unwrap().unwrap();
            assert_eq!(
                view.pods["nginx"]["spec"]["containers"][0]["image"],
                "nginx:1.27"
            );
            let again = EXAMPLE.replace("image: nginx", "image: nginx:1.28");
            node.docs().apply_text(&again, "default").await.unwrap();
            let after = chunk_sizes(&node).await;
            assert_eq!(
                after.len(),
                before.len() + 1,
                "one new chunk: {before:?} -> {after:?}"
            );
            assert!(
                after[after.len() - 1] < 300,
                "only the change is stored: {after:?}"
            );
            drop(node);

            let node = open(dir.path()).await;
            let (view, _) = node.docs().view("default/edge01").await.unwrap().unwrap();
            assert_eq!(
                view.pods["nginx"]["spec"]["containers"][0]["image"],
                "nginx:1.28"
            );
            assert_eq!(view.generation, 3);
        })
        .await
        .expect("test timed out");
    }
}
