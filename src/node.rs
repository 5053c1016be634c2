//! The node core shared by both roles: documents in memory backed by SQLite, change
//! notifications, peers, and the EdgeNode views built from them.

use crate::clock::{now, unix_now};
use crate::crd::{
    Condition, EdgeNode, EdgeNodeSpec, EdgeNodeStatus, POD_APPLIED, POD_REFUSED, Phase, PodState,
};
use crate::input::{self, DesiredNode, InvalidInput, MAX_HISTORY_BYTES, Rules};
use crate::key::DocKey;
use crate::metrics::{EdgeLabels, Metrics, RoleLabels};
use crate::model::{self, DocView, ModelError};
use crate::registry::{self, Registration, Registry};
use crate::store::{
    COMPACT_AFTER_CHUNKS, DocSave, DocWrite, JoinedNode, Store, StoreError, StoredDoc,
};
use crate::sync::feed::{Feed, Feeds};
use crate::transport::tls::{Identity, Role};
use automerge::sync;
use automerge::{ActorId, AutoCommit};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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

/// One document and what the node knows about it.
pub struct DocEntry {
    /// The Automerge document.
    pub doc: AutoCommit,
    /// When a peer last synced it.
    pub last_synced_at: Option<String>,
    /// Incremental chunks stored since the last snapshot.
    chunks: usize,
    /// Heads as of the last successful store write.
    persisted_heads: Vec<automerge::ChangeHash>,
    /// Bytes stored for it: the snapshot and the chunks since.
    stored_bytes: usize,
}

impl DocEntry {
    /// A document as stored: snapshot plus chunks, continuing as `actor`.
    fn load(stored: StoredDoc, actor: &ActorId) -> Result<DocEntry, NodeError> {
        let bad = |e: automerge::AutomergeError| NodeError::Sync {
            key: stored.key.clone(),
            reason: format!("stored document does not load: {e}"),
        };
        let mut doc = AutoCommit::load(&stored.snapshot).map_err(bad)?;
        for chunk in &stored.chunks {
            doc.load_incremental(chunk).map_err(bad)?;
        }
        doc.set_actor(actor.clone());
        // Everything loaded is already stored: start the incremental save cursor here.
        let _ = doc.save_incremental();
        Ok(DocEntry {
            persisted_heads: doc.get_heads(),
            doc,
            last_synced_at: stored.last_synced_at,
            chunks: stored.chunks.len(),
            stored_bytes: stored.snapshot.len() + stored.chunks.iter().map(Vec::len).sum::<usize>(),
        })
    }

    /// A new document from the shared genesis change (not stored yet).
    fn genesis(key: &str, actor: &ActorId) -> DocEntry {
        DocEntry {
            doc: model::genesis(key, actor),
            last_synced_at: None,
            chunks: COMPACT_AFTER_CHUNKS,
            persisted_heads: Vec::new(),
            stored_bytes: 0,
        }
    }
}

/// A peer as shown by `edgesync status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    /// Node name from its certificate.
    pub name: String,
    /// head or edge.
    pub role: Role,
    /// Remote address.
    pub address: String,
    /// Connected now.
    pub connected: bool,
    /// Live connections with this peer (two heads that dial each other have two).
    pub sessions: u32,
    /// Last time anything was received (RFC 3339).
    pub last_seen: Option<String>,
    /// Bytes of sync frames sent to this peer since this node started.
    pub bytes_out: u64,
    /// Bytes of sync frames received from this peer since this node started.
    pub bytes_in: u64,
    /// Another address the same edge certificate is connected from at the same time: two
    /// machines sharing one state dir (a cloned one), or a move the old session has not
    /// noticed yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub also_from: Option<String>,
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

/// What `apply` did to one EdgeNode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// `namespace/name`.
    pub key: String,
    /// created, configured or unchanged (as kubectl says).
    pub result: String,
}

struct Inner {
    role: Role,
    name: String,
    actor: ActorId,
    store: Store,
    rules: Rules,
    docs: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<DocEntry>>>>,
    changes: broadcast::Sender<String>,
    feeds: Feeds,
    peers: Mutex<BTreeMap<String, PeerInfo>>,
    /// Heads each peer is known to have, by peer and document (from the sync states).
    shared: Mutex<HashMap<(String, String), Vec<automerge::ChangeHash>>>,
    kicks: Mutex<BTreeMap<String, CancellationToken>>,
    applied: Mutex<Vec<AppliedPod>>,
    advertise: Mutex<Option<std::net::IpAddr>>,
    metrics: Metrics,
}

/// Where a peer is, for a session with it.
#[derive(Debug, Clone)]
pub struct PeerAddress {
    /// The socket address the connection comes from (shown in status).
    pub seen: String,
    /// Where others can reach it: its advertised address, else the one seen (for DNS).
    pub reachable: std::net::IpAddr,
}

/// Handle to the node core; cheap to clone.
#[derive(Clone)]
pub struct Node(Arc<Inner>);

/// A document's heads around a status report.
pub struct ReportedAt {
    /// Before the report was written.
    pub before: Vec<automerge::ChangeHash>,
    /// After (the same if the report changed nothing).
    pub after: Vec<automerge::ChangeHash>,
}

/// A document write on its way to the store, and what the entry becomes once it is stored.
struct Staged {
    heads: Vec<automerge::ChangeHash>,
    chunks: usize,
    stored_bytes: usize,
    synced_at: Option<String>,
    changed: bool,
}

/// Prepares the write of what changed in `entry` since its last save (None if nothing is to
/// be stored): a chunk, or a whole snapshot after enough chunks.
fn stage(
    key: &str,
    entry: &mut DocEntry,
    sync_states: Vec<(String, Vec<u8>)>,
    synced: bool,
) -> Option<(DocSave, Staged)> {
    let heads = entry.doc.get_heads();
    let changed = heads != entry.persisted_heads;
    let synced_at = synced.then(now);
    if !changed && sync_states.is_empty() && synced_at.is_none() {
        return None;
    }
    let (write, chunks, stored_bytes) = if entry.chunks >= COMPACT_AFTER_CHUNKS {
        let snapshot = entry.doc.save();
        let bytes = snapshot.len();
        (DocWrite::Snapshot(snapshot), 0, bytes)
    } else {
        let chunk = entry.doc.save_incremental();
        let stored = entry.chunks + usize::from(!chunk.is_empty());
        let bytes = entry.stored_bytes + chunk.len();
        (DocWrite::Chunk(chunk), stored, bytes)
    };
    let save = DocSave {
        key: key.to_string(),
        write,
        sync_states,
        synced_at: synced_at.clone(),
    };
    let staged = Staged {
        heads,
        chunks,
        stored_bytes,
        synced_at,
        changed,
    };
    Some((save, staged))
}

/// Refuses an edit that gives a document more than `limit` bytes of history
/// ([`MAX_HISTORY_BYTES`], what one sync message carries): an edge that has none of it must be
/// able to receive it whole. Documents that store little are let through without counting.
fn check_history(key: &str, entry: &mut DocEntry, limit: usize) -> Result<(), NodeError> {
    const COUNT_FROM: usize = 1 << 20;
    if entry.stored_bytes < COUNT_FROM {
        return Ok(());
    }
    let changes = entry.doc.get_changes(&[]);
    let history: usize = changes.iter().map(|c| c.raw_bytes().len()).sum();
    if history <= limit {
        return Ok(());
    }
    Err(InvalidInput {
        object: format!("EdgeNode {key}"),
        field: "spec".into(),
        reason: format!(
            "this edit would bring its history to {} MiB, more than the {} MiB an edge receives at once; apply it under another name or namespace",
            history >> 20,
            limit >> 20
        ),
    }
    .into())
}

impl Node {
    /// Loads every stored document. `rules.privileged_namespaces` is this node's policy.
    pub async fn open(
        role: Role,
        name: &str,
        store: Store,
        rules: Rules,
    ) -> Result<Node, NodeError> {
        let actor = store
            .meta_or_init(
                "actor",
                crate::transport::tls::random_bytes::<16>().to_vec(),
            )
            .await?;
        let actor = ActorId::from(actor);
        let mut docs = BTreeMap::new();
        for stored in store.load_docs().await? {
            let key = stored.key.clone();
            let entry = DocEntry::load(stored, &actor)?;
            docs.insert(key, Arc::new(tokio::sync::Mutex::new(entry)));
        }
        let mut shared = HashMap::new();
        for (peer, key, state) in store.all_sync_states().await? {
            if let Ok(state) = sync::State::decode(&state) {
                shared.insert((peer, key), state.shared_heads);
            }
        }
        let (changes, _) = broadcast::channel(1024);
        let write_seconds = store.write_seconds();
        Ok(Node(Arc::new(Inner {
            role,
            name: name.to_string(),
            actor,
            store,
            rules,
            docs: Mutex::new(docs),
            changes,
            feeds: Feeds::default(),
            peers: Mutex::new(BTreeMap::new()),
            shared: Mutex::new(shared),
            kicks: Mutex::new(BTreeMap::new()),
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

    /// This node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The metrics in the Prometheus text format, with the gauges that mirror state read now.
    pub async fn metrics_text(&self) -> String {
        let m = &self.0.metrics;
        m.documents.set(self.keys().len() as i64);
        m.pending_documents
            .set(self.pending_documents().await as i64);
        let now = Timestamp::now();
        let peers: Vec<PeerInfo> = lock(&self.0.peers).values().cloned().collect();
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
        if self.0.role == Role::Head {
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
        }
        m.render()
    }

    /// EdgeNode documents with changes some peer that syncs them does not have yet, or that
    /// no peer has synced yet.
    async fn pending_documents(&self) -> usize {
        let mut known: HashMap<String, Vec<Vec<automerge::ChangeHash>>> = HashMap::new();
        for ((_, key), heads) in lock(&self.0.shared).iter() {
            known.entry(key.clone()).or_default().push(heads.clone());
        }
        let mut pending = 0;
        for key in self.keys() {
            let Some(heads) = self.heads(&key).await else {
                continue;
            };
            let at_peers = known.get(&key).map(Vec::as_slice).unwrap_or_default();
            if at_peers.is_empty() || at_peers.iter().any(|theirs| *theirs != heads) {
                pending += 1;
            }
        }
        pending
    }

    /// The address this node advertises to heads (`--advertise-address`), if any.
    pub fn advertise(&self) -> Option<std::net::IpAddr> {
        *lock(&self.0.advertise)
    }

    /// Sets the address this node advertises to heads.
    pub fn set_advertise(&self, address: Option<std::net::IpAddr>) {
        *lock(&self.0.advertise) = address;
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// This node's validation rules.
    pub fn rules(&self) -> &Rules {
        &self.0.rules
    }

    /// Notifications of changed document keys (local edits and received changes, after they are
    /// stored).
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.0.changes.subscribe()
    }

    /// Every EdgeNode document key.
    pub fn keys(&self) -> Vec<String> {
        let docs = lock(&self.0.docs);
        docs.keys()
            .filter(|k| !registry::is_internal(k))
            .cloned()
            .collect()
    }

    /// Changes to the documents `peer` may see, for a sync session with it.
    pub fn feed(&self, peer: &Identity) -> Arc<Feed> {
        self.0.feeds.subscribe(peer)
    }

    /// The heads' registry as this head knows it.
    pub async fn registry(&self) -> Registry {
        match self.entry(registry::KEY) {
            Some(entry) => registry::read(&entry.lock().await.doc),
            None => Registry::default(),
        }
    }

    /// Edits the heads' registry and stores it; it reaches the other heads by sync.
    pub async fn edit_registry(
        &self,
        edit: impl FnOnce(&mut automerge::AutoCommit) -> Result<bool, ModelError>,
    ) -> Result<(), NodeError> {
        let entry = self.entry_or_genesis(registry::KEY);
        let mut entry = entry.lock().await;
        if edit(&mut entry.doc)? {
            self.persist(registry::KEY, &mut entry, Vec::new(), false)
                .await?;
        }
        Ok(())
    }

    /// Records the certificate just issued to edge `joined.name`, here and for every head.
    pub async fn register_edge(&self, joined: JoinedNode) -> Result<(), NodeError> {
        let registration = Registration {
            key: hex::encode(&joined.key_sha256),
            not_after: joined.cert_not_after,
            removed: false,
        };
        // Registry first: a concurrent adoption of the registry then writes the new key too.
        self.edit_registry(|doc| registry::set_registration(doc, &joined.name, &registration))
            .await?;
        self.0.store.add_node(joined, unix_now()).await?;
        Ok(())
    }

    /// Creates join token `id` here and for every head.
    pub async fn register_token(
        &self,
        id: &str,
        secret_hash: Vec<u8>,
        expires: i64,
    ) -> Result<(), NodeError> {
        let token = registry::Token {
            hash: hex::encode(&secret_hash),
            expires,
        };
        self.edit_registry(|doc| registry::set_token(doc, id, &token, unix_now()))
            .await?;
        self.0
            .store
            .add_token(id.to_string(), secret_hash, expires, unix_now())
            .await?;
        Ok(())
    }

    /// Makes this head's tables of edges and tokens match the registry after another head
    /// changed it.
    async fn adopt_registry(&self) -> Result<(), NodeError> {
        let registry = self.registry().await;
        let now = unix_now();
        for (id, token) in registry.tokens {
            let Ok(hash) = hex::decode(&token.hash) else {
                continue;
            };
            if token.expires > now && self.0.store.token(id.clone()).await?.is_none() {
                self.0.store.add_token(id, hash, token.expires, now).await?;
            }
        }
        for (name, registration) in registry.nodes {
            let stored = self.0.store.node(name.clone()).await?;
            if registration.removed {
                if stored.is_some() {
                    self.forget_edge(&name).await?;
                    info!(node = %name, "edge removed on another head");
                }
                continue;
            }
            let Ok(key_sha256) = hex::decode(&registration.key) else {
                continue;
            };
            if stored.as_ref().is_none_or(|s| s.key_sha256 != key_sha256) {
                // A newer certificate replaces the old one: sessions under the old key end.
                if stored.is_some() {
                    self.kick(&name);
                }
                let joined = JoinedNode {
                    name,
                    key_sha256,
                    cert_not_after: registration.not_after,
                };
                self.0.store.add_node(joined, unix_now()).await?;
            }
        }
        Ok(())
    }

    fn entry(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<DocEntry>>> {
        lock(&self.0.docs).get(key).cloned()
    }

    fn entry_or_genesis(&self, key: &str) -> Arc<tokio::sync::Mutex<DocEntry>> {
        let mut docs = lock(&self.0.docs);
        docs.entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(DocEntry::genesis(
                    key,
                    &self.0.actor,
                )))
            })
            .clone()
    }

    /// Stores what changed in `entry` since its last save (and the given sync states), then
    /// tells subscribers. Nothing is announced before it is on disk; if the write fails, the
    /// entry goes back to what is stored, so nothing unstored is ever relayed.
    async fn persist(
        &self,
        key: &str,
        entry: &mut DocEntry,
        sync_states: Vec<(String, Vec<u8>)>,
        synced: bool,
    ) -> Result<(), NodeError> {
        let Some((save, staged)) = stage(key, entry, sync_states, synced) else {
            return Ok(());
        };
        match self.0.store.save_docs(vec![save]).await {
            Ok(()) => {
                self.stored(key, entry, staged);
                Ok(())
            }
            Err(e) => {
                self.revert(key, entry).await;
                Err(e.into())
            }
        }
    }

    /// Finishes a staged write that is stored: subscribers hear of the change.
    fn stored(&self, key: &str, entry: &mut DocEntry, staged: Staged) {
        entry.chunks = staged.chunks;
        entry.stored_bytes = staged.stored_bytes;
        entry.persisted_heads = staged.heads;
        if staged.synced_at.is_some() {
            entry.last_synced_at = staged.synced_at;
        }
        if staged.changed {
            let _ = self.0.changes.send(key.to_string());
            self.0.feeds.publish(key);
        }
    }

    /// Puts `entry` back to what is stored, dropping edits not stored.
    async fn revert(&self, key: &str, entry: &mut DocEntry) {
        let stored = match self.0.store.load_doc(key.to_string()).await {
            Ok(Some(stored)) => DocEntry::load(stored, &self.0.actor),
            Ok(None) => Ok(DocEntry::genesis(key, &self.0.actor)),
            Err(e) => Err(e.into()),
        };
        match stored {
            Ok(stored) => *entry = stored,
            Err(e) => {
                warn!(doc = %key, error = %e, "cannot read the document back; its next write stores it whole");
                entry.chunks = COMPACT_AFTER_CHUNKS;
            }
        }
    }

    /// Parses and applies EdgeNode text: all objects are validated before any is written.
    /// On an edge, objects for another node are refused.
    pub async fn apply_text(
        &self,
        text: &str,
        default_namespace: &str,
    ) -> Result<Vec<ApplyOutcome>, NodeError> {
        let rules = Rules {
            default_namespace: default_namespace.to_string(),
            privileged_namespaces: self.0.rules.privileged_namespaces.clone(),
        };
        let nodes = input::parse_edgenodes(text, &rules)?;
        if self.0.role == Role::Edge
            && let Some(other) = nodes.iter().find(|n| n.name != self.0.name)
        {
            return Err(InvalidInput {
                object: format!("EdgeNode {}", other.key()),
                field: "metadata.name".into(),
                reason: format!(
                    "this edge is {:?} and only serves EdgeNodes of that name; apply it on the head",
                    self.0.name
                ),
            }
            .into());
        }
        self.apply_nodes(&nodes).await
    }

    /// Writes one validated EdgeNode into its document as a minimal diff.
    pub async fn apply_node(&self, desired: &DesiredNode) -> Result<ApplyOutcome, NodeError> {
        let mut outcomes = self.apply_nodes(std::slice::from_ref(desired)).await?;
        Ok(outcomes.remove(0))
    }

    /// Writes validated EdgeNodes (of distinct keys) into their documents as minimal diffs,
    /// stored in one transaction: all of them or none.
    async fn apply_nodes(&self, nodes: &[DesiredNode]) -> Result<Vec<ApplyOutcome>, NodeError> {
        let mut order: Vec<(String, &DesiredNode)> =
            nodes.iter().map(|n| (n.key().to_string(), n)).collect();
        // Locks are taken in key order, so two applies never wait on each other.
        order.sort_by(|a, b| a.0.cmp(&b.0));
        let entries: Vec<_> = order
            .iter()
            .map(|(key, _)| self.entry_or_genesis(key))
            .collect();
        let mut locked = Vec::with_capacity(entries.len());
        for entry in &entries {
            locked.push(entry.lock().await);
        }
        let mut outcomes = BTreeMap::new();
        let mut saves = Vec::new();
        let mut staged = Vec::new();
        for (i, (key, desired)) in order.iter().enumerate() {
            let edited = self
                .edit_spec(&mut locked[i].doc, desired)
                .and_then(|edited| {
                    check_history(key, &mut locked[i], MAX_HISTORY_BYTES).map(|()| edited)
                });
            let result = match edited {
                Ok((false, _)) => "created",
                Ok((true, true)) => "configured",
                Ok((true, false)) => "unchanged",
                Err(e) => {
                    for (j, (key, _)) in order.iter().enumerate().take(i + 1) {
                        self.revert(key, &mut locked[j]).await;
                    }
                    return Err(e);
                }
            };
            outcomes.insert(key.clone(), result);
            if let Some((save, done)) = stage(key, &mut locked[i], Vec::new(), false) {
                saves.push(save);
                staged.push((i, done));
            }
        }
        let saved = self.0.store.save_docs(saves).await;
        for (i, done) in staged {
            match saved {
                Ok(()) => self.stored(&order[i].0, &mut locked[i], done),
                Err(_) => self.revert(&order[i].0, &mut locked[i]).await,
            }
        }
        saved?;
        Ok(nodes
            .iter()
            .map(|n| {
                let key = n.key().to_string();
                let result = outcomes[&key].to_string();
                ApplyOutcome { key, result }
            })
            .collect())
    }

    /// Writes `desired` into `doc`; returns whether the EdgeNode existed and whether it changed.
    fn edit_spec(
        &self,
        doc: &mut AutoCommit,
        desired: &DesiredNode,
    ) -> Result<(bool, bool), NodeError> {
        let existed = model::is_live(doc)?;
        let mut changed = model::set_spec(doc, desired, &now())?;
        if self.0.role == Role::Head {
            let privileged = self
                .0
                .rules
                .privileged_namespaces
                .contains(&desired.namespace);
            changed |= model::set_privileged(doc, privileged)?;
        }
        Ok((existed, changed))
    }

    /// Deletes an EdgeNode (a tombstone that syncs). On an edge only its own.
    pub async fn delete(&self, key: &str) -> Result<(), NodeError> {
        let entry = self
            .entry(key)
            .ok_or_else(|| NodeError::NotFound(key.to_string()))?;
        let mut entry = entry.lock().await;
        if !model::is_live(&entry.doc)? {
            return Err(NodeError::NotFound(key.to_string()));
        }
        if self.0.role == Role::Edge && crate::key::edge_of(key) != Some(self.0.name.as_str()) {
            return Err(NodeError::NotFound(key.to_string()));
        }
        model::mark_deleted(&mut entry.doc)?;
        self.persist(key, &mut entry, Vec::new(), false).await
    }

    /// The document `key` read out, with its last sync time.
    pub async fn view(&self, key: &str) -> Result<Option<(DocView, Option<String>)>, NodeError> {
        let Some(entry) = self.entry(key) else {
            return Ok(None);
        };
        let entry = entry.lock().await;
        Ok(Some((
            model::read(&entry.doc, key)?,
            entry.last_synced_at.clone(),
        )))
    }

    /// Document `key` as a view, with the heads it was read at.
    pub async fn view_at(
        &self,
        key: &str,
    ) -> Result<Option<(DocView, Vec<automerge::ChangeHash>)>, NodeError> {
        let Some(entry) = self.entry(key) else {
            return Ok(None);
        };
        let mut entry = entry.lock().await;
        let heads = entry.doc.get_heads();
        Ok(Some((model::read(&entry.doc, key)?, heads)))
    }

    /// Document `key` as it was at `heads`; None when this node has no such document or not
    /// all of that history.
    pub async fn view_at_heads(
        &self,
        key: &str,
        heads: &[automerge::ChangeHash],
    ) -> Result<Option<DocView>, NodeError> {
        let Some(entry) = self.entry(key) else {
            return Ok(None);
        };
        let mut entry = entry.lock().await;
        if heads.is_empty()
            || heads
                .iter()
                .any(|h| entry.doc.get_change_by_hash(h).is_none())
        {
            return Ok(None);
        }
        let past = entry.doc.fork_at(heads).map_err(|e| NodeError::Sync {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some(model::read(&past, key)?))
    }

    /// Writes the edge's report into document `key` if it differs. Returns the document's
    /// heads before and after.
    pub async fn report_status(
        &self,
        key: &str,
        observed: i64,
        pods: &[PodState],
    ) -> Result<Option<ReportedAt>, NodeError> {
        let Some(entry) = self.entry(key) else {
            return Ok(None);
        };
        let mut entry = entry.lock().await;
        let before = entry.doc.get_heads();
        if model::set_status(&mut entry.doc, observed, pods)? {
            self.persist(key, &mut entry, Vec::new(), false).await?;
        }
        let after = entry.doc.get_heads();
        Ok(Some(ReportedAt { before, after }))
    }

    /// Document `key` for a sync session to apply a message to: created (from the shared
    /// genesis) if it is not here yet. Only EdgeNode keys, and on a head the heads' registry,
    /// are taken from peers.
    pub fn sync_entry(&self, key: &str) -> Result<Arc<tokio::sync::Mutex<DocEntry>>, NodeError> {
        let refuse = |reason: String| NodeError::Sync {
            key: input::show(key),
            reason,
        };
        let parsed = DocKey::parse(key).map_err(|e| refuse(e.reason))?;
        if parsed.is_internal() && self.0.role != Role::Head {
            return Err(refuse("a head-only document".into()));
        }
        Ok(self.entry_or_genesis(key))
    }

    /// Document `key`, if it is here.
    pub fn sync_doc(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<DocEntry>>> {
        self.entry(key)
    }

    /// After a sync message from `peer` was applied to `entry` (document `key`): stores what
    /// it brought with the session's sync `state`, then announces it. Nothing is announced
    /// before it is stored; if the write fails, the entry goes back to what is stored.
    pub async fn synced(
        &self,
        peer: &str,
        key: &str,
        entry: &mut DocEntry,
        state: Option<Vec<u8>>,
        shared_heads: Vec<automerge::ChangeHash>,
    ) -> Result<(), NodeError> {
        lock(&self.0.shared).insert((peer.to_string(), key.to_string()), shared_heads);
        if entry.doc.get_heads() == entry.persisted_heads {
            // Nothing new (an acknowledgement): the session keeps the sync state and stores
            // it when it ends; a state stored stale only costs a little resending.
            entry.last_synced_at = Some(now());
            return Ok(());
        }
        let states = state.map(|s| (peer.to_string(), s)).into_iter().collect();
        self.persist(key, entry, states, true).await
    }

    /// After document `key` was synced and its lock let go: on a head, a changed registry of
    /// heads is taken in.
    pub async fn after_sync(&self, key: &str) -> Result<(), NodeError> {
        if key == registry::KEY && self.0.role == Role::Head {
            self.adopt_registry().await?;
        }
        Ok(())
    }

    /// The heads of every document (what sync sessions offer; each session filters by what
    /// its peer may access).
    pub async fn sync_heads(&self) -> Vec<(String, Vec<automerge::ChangeHash>)> {
        let entries: Vec<_> = lock(&self.0.docs)
            .iter()
            .map(|(key, entry)| (key.clone(), entry.clone()))
            .collect();
        let mut heads = Vec::with_capacity(entries.len());
        for (key, entry) in entries {
            heads.push((key, entry.lock().await.doc.get_heads()));
        }
        heads
    }

    /// The heads of document `key`, if there is one.
    pub async fn heads(&self, key: &str) -> Option<Vec<automerge::ChangeHash>> {
        let entry = self.entry(key)?;
        let heads = entry.lock().await.doc.get_heads();
        Some(heads)
    }

    /// Fires when peer `name` is removed: its sessions end at once.
    pub fn removal_of(&self, name: &str) -> CancellationToken {
        lock(&self.0.kicks)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Forgets edge `name` (`edgesync node remove`): its key is no longer let in and its live
    /// sessions end. Returns whether it was known.
    pub async fn remove_node(&self, name: &str) -> Result<bool, NodeError> {
        let known = self.forget_edge(name).await?;
        let registered = self.registry().await.nodes.get(name).cloned();
        if let Some(registration) = registered.filter(|r| !r.removed) {
            let removed = Registration {
                removed: true,
                ..registration
            };
            self.edit_registry(|doc| registry::set_registration(doc, name, &removed))
                .await?;
            return Ok(true);
        }
        Ok(known)
    }

    /// Ends edge `name`'s sessions and forgets what this node keeps of it, after it was removed
    /// elsewhere (its Edge resource deleted).
    pub async fn drop_edge(&self, name: &str) {
        if let Err(e) = self.forget_edge(name).await {
            warn!(node = %name, error = %e, "cannot forget the removed edge");
        }
    }

    async fn forget_edge(&self, name: &str) -> Result<bool, NodeError> {
        let known = self.0.store.remove_node(name.to_string()).await?;
        self.kick(name);
        lock(&self.0.peers).remove(name);
        lock(&self.0.shared).retain(|(peer, _), _| peer != name);
        Ok(known)
    }

    fn kick(&self, name: &str) {
        if let Some(token) = lock(&self.0.kicks).remove(name) {
            token.cancel();
        }
    }

    /// Records that a session with `peer` started. On a head, the edge's presence and address
    /// go into the registry in the background, so the session does not wait for the write.
    pub fn peer_connected(&self, peer: &Identity, address: &PeerAddress) {
        self.record_peer(peer, &address.seen);
        if self.0.role == Role::Head && peer.role == Role::Edge {
            let (node, peer, reachable) = (self.clone(), peer.clone(), address.reachable);
            tokio::spawn(async move {
                let me = node.0.name.clone();
                // Checked under the registry's lock: a session that ended meanwhile has
                // recorded the absence, which stands.
                let edit = |doc: &mut automerge::AutoCommit| {
                    let connected = node.is_connected(&peer.name);
                    let present =
                        connected && registry::set_presence(doc, &peer.name, Some(&me), &me)?;
                    let moved = registry::set_address(doc, &peer.name, reachable)?;
                    Ok(present || moved)
                };
                if let Err(e) = node.edit_registry(edit).await {
                    warn!(peer = %peer.name, error = %e, "cannot record the edge's presence");
                }
            });
        }
    }

    fn record_peer(&self, peer: &Identity, address: &str) {
        let mut peers = lock(&self.0.peers);
        let info = peers.entry(peer.name.clone()).or_insert_with(|| PeerInfo {
            name: peer.name.clone(),
            role: peer.role,
            address: String::new(),
            connected: false,
            sessions: 0,
            last_seen: None,
            bytes_out: 0,
            bytes_in: 0,
            also_from: None,
        });
        let host = |a: &str| {
            a.parse::<std::net::SocketAddr>()
                .map_or(a.to_string(), |s| s.ip().to_string())
        };
        if info.connected && peer.role == Role::Edge && host(&info.address) != host(address) {
            warn!(
                edge = %peer.name, first = %info.address, second = %address,
                "the same edge certificate is connected from two addresses at once; if this lasts, two machines share one state dir (cloned): give each its own state dir and join it with its own name"
            );
            info.also_from = Some(info.address.clone());
        }
        info.role = peer.role;
        info.address = address.to_string();
        info.sessions += 1;
        info.connected = true;
        info.last_seen = Some(now());
    }

    /// Records that a session with peer `name` ended.
    pub async fn peer_disconnected(&self, peer: &Identity) {
        if let Some(info) = lock(&self.0.peers).get_mut(&peer.name) {
            info.sessions = info.sessions.saturating_sub(1);
            info.connected = info.sessions > 0;
            if info.sessions <= 1 {
                info.also_from = None;
            }
        }
        if self.0.role == Role::Head && peer.role == Role::Edge {
            let me = self.0.name.clone();
            // Checked under the registry's lock: a session that started meanwhile keeps it.
            let edit = |doc: &mut automerge::AutoCommit| match self.is_connected(&peer.name) {
                true => Ok(false),
                false => registry::set_presence(doc, &peer.name, None, &me),
            };
            if let Err(e) = self.edit_registry(edit).await {
                warn!(peer = %peer.name, error = %e, "cannot record the edge's absence");
            }
        }
    }

    /// Whether edge `name` is connected to this head, or to another head connected to this one.
    async fn edge_online(&self, name: &str) -> bool {
        if self.is_connected(name) {
            return true;
        }
        let Some(entry) = self.entry(registry::KEY) else {
            return false;
        };
        let head = registry::presence_of(&entry.lock().await.doc, name);
        head.is_some_and(|head| head != self.0.name && self.is_connected(&head))
    }

    /// Changes a known peer's record.
    pub fn peer_touch(&self, name: &str, f: impl FnOnce(&mut PeerInfo)) {
        if let Some(info) = lock(&self.0.peers).get_mut(name) {
            f(info);
        }
    }

    /// Whether a peer of this name is connected now.
    pub fn is_connected(&self, name: &str) -> bool {
        lock(&self.0.peers).get(name).is_some_and(|p| p.connected)
    }

    fn any_head_connected(&self) -> bool {
        lock(&self.0.peers)
            .values()
            .any(|p| p.connected && p.role == Role::Head)
    }

    /// Replaces the reconciler's report.
    pub fn set_applied(&self, applied: Vec<AppliedPod>) {
        *lock(&self.0.applied) = applied;
    }

    /// The status report.
    pub async fn status(&self) -> Result<StatusReport, NodeError> {
        let mut documents = Vec::new();
        for key in self.keys() {
            if let Some((view, last_synced_at)) = self.view(&key).await? {
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
            peers: lock(&self.0.peers).values().cloned().collect(),
            documents,
            applied_pods: lock(&self.0.applied).clone(),
        })
    }

    /// EdgeNodes as kubectl would show them; `namespace` None means all.
    pub async fn edgenodes(&self, namespace: Option<&str>) -> Result<Vec<EdgeNode>, NodeError> {
        let mut out = Vec::new();
        for key in self.keys() {
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
        let Some((view, last_synced_at)) = self.view(key).await? else {
            return Ok(None);
        };
        if view.deleted || view.generation == 0 {
            return Ok(None);
        }
        let online = match self.0.role {
            Role::Head => self.edge_online(&view.name).await,
            Role::Edge => self.any_head_connected(),
        };
        Ok(Some(to_edgenode(&view, last_synced_at, online)))
    }
}

/// Builds the kubectl-shaped object from a document and what the node knows about the link.
pub fn to_edgenode(view: &DocView, last_synced_at: Option<String>, online: bool) -> EdgeNode {
    let pods = view
        .pods
        .values()
        .filter_map(|p| serde_json::from_value(p.clone()).ok())
        .collect();
    let metadata = ObjectMeta {
        name: Some(view.name.clone()),
        namespace: Some(view.namespace.clone()),
        labels: (!view.labels.is_empty()).then(|| view.labels.clone()),
        generation: Some(view.generation),
        creation_timestamp: view
            .created_at
            .as_deref()
            .and_then(|t| t.parse().ok())
            .map(Time),
        ..ObjectMeta::default()
    };
    let mut node = EdgeNode::new(&view.name, EdgeNodeSpec { pods });
    node.metadata = metadata;
    node.status = Some(derive_status(view, last_synced_at, online));
    node
}

/// Phase and conditions from the edge's report and the link state.
pub fn derive_status(
    view: &DocView,
    last_synced_at: Option<String>,
    online: bool,
) -> EdgeNodeStatus {
    let pods: Vec<PodState> = view
        .pods
        .keys()
        .map(|name| {
            view.pod_states
                .iter()
                .find(|s| &s.name == name)
                .cloned()
                .unwrap_or_else(|| PodState {
                    name: name.clone(),
                    state: "Pending".into(),
                    reason: None,
                    phase: None,
                })
        })
        .collect();
    let applied = pods.iter().filter(|p| p.state == POD_APPLIED).count();
    let refused: Vec<&PodState> = pods.iter().filter(|p| p.state == POD_REFUSED).collect();
    let synced = view.observed_generation == Some(view.generation);
    let phase = if !online && last_synced_at.is_some() {
        Phase::Offline
    } else if !synced {
        Phase::Pending
    } else if !refused.is_empty() {
        Phase::Degraded
    } else {
        Phase::Running
    };
    let mut conditions = vec![
        Condition::new(
            "Synced",
            synced,
            if synced { "Applied" } else { "Pending" },
            match view.observed_generation {
                Some(g) => format!("edge applied generation {g} of {}", view.generation),
                None => "edge has not reported yet".into(),
            },
        ),
        Condition::new(
            "Online",
            online,
            if online { "Connected" } else { "Disconnected" },
            "",
        ),
        Condition::new(
            "Valid",
            refused.is_empty(),
            if refused.is_empty() {
                "AllPodsAccepted"
            } else {
                "PodsRefused"
            },
            refused
                .iter()
                .map(|p| format!("{}: {}", p.name, p.reason.as_deref().unwrap_or("refused")))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    ];
    if !view.conflicts.is_empty() {
        conditions.push(Condition::new(
            "Conflict",
            true,
            "ConcurrentEdits",
            view.conflicts.join("; "),
        ));
    }
    EdgeNodeStatus {
        phase: Some(phase),
        conditions,
        observed_generation: view.observed_generation,
        last_synced_at,
        online: Some(online),
        pods_ready: Some(format!("{applied}/{}", pods.len())),
        pods,
    }
}

/// Locks `m`; a panic elsewhere while holding it leaves data still worth using.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let also_from = |node: &Node| lock(&node.0.peers)["edge01"].also_from.clone();
        node.peer_connected(&edge, &at("192.0.2.1:4000"));
        // A reconnect from the same host (a new port) while the old session lingers is not.
        node.peer_connected(&edge, &at("192.0.2.1:4001"));
        assert_eq!(also_from(&node), None);
        node.peer_disconnected(&edge).await;
        node.peer_connected(&edge, &at("198.51.100.7:4000"));
        assert_eq!(also_from(&node).as_deref(), Some("192.0.2.1:4001"));
        node.peer_disconnected(&edge).await;
        assert_eq!(also_from(&node), None);
    }

    #[test]
    fn an_edit_past_the_history_an_edge_can_receive_is_refused() {
        use automerge::{ROOT, transaction::Transactable};
        let actor = ActorId::random();
        let mut entry = DocEntry::genesis("default/e1", &actor);
        // Three changes of 600 KiB that do not compress (an xorshift stream as hex).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3 {
            let text: String = (0..600 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from_digit((x % 16) as u32, 16).unwrap()
                })
                .collect();
            entry.doc.put(ROOT, "blob", text).unwrap();
            entry.doc.commit();
        }
        // A document that stores little is not counted.
        assert!(check_history("default/e1", &mut entry, 1 << 20).is_ok());
        entry.stored_bytes = 2 << 20;
        assert!(check_history("default/e1", &mut entry, 8 << 20).is_ok());
        let refused = check_history("default/e1", &mut entry, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("EdgeNode default/e1")
                && refused.contains("spec")
                && refused.contains("more than the 1 MiB an edge receives at once"),
            "{refused}"
        );
    }

    fn chunk_sizes(dir: &std::path::Path) -> Vec<usize> {
        let conn = rusqlite::Connection::open(dir.join("edgesync.db")).unwrap();
        let mut stmt = conn
            .prepare("SELECT length(data) FROM doc_chunks ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, i64>(0))
            .unwrap()
            .map(|n| n.unwrap() as usize)
            .collect()
    }

    #[tokio::test]
    async fn a_restart_stores_only_new_changes_and_keeps_everything() {
        tokio::time::timeout(std::time::Duration::from_secs(20), async {
            let dir = tempfile::tempdir().unwrap();
            let node = open(dir.path()).await;
            node.apply_text(EXAMPLE, "default").await.unwrap();
            let edited = EXAMPLE.replace("image: nginx", "image: nginx:1.27");
            node.apply_text(&edited, "default").await.unwrap();
            let before = chunk_sizes(dir.path());
            drop(node);

            let node = open(dir.path()).await;
            let (view, _) = node.view("default/edge01").await.unwrap().unwrap();
            assert_eq!(
                view.pods["nginx"]["spec"]["containers"][0]["image"],
                "nginx:1.27"
            );
            let again = EXAMPLE.replace("image: nginx", "image: nginx:1.28");
            node.apply_text(&again, "default").await.unwrap();
            let after = chunk_sizes(dir.path());
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
            let (view, _) = node.view("default/edge01").await.unwrap().unwrap();
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
