//! The document store: the only owner of the Automerge documents. Each document lives in
//! memory behind its own lock and in SQLite; a change is stored first, then announced as a
//! typed [`Change`] saying what moved (spec, status or a head-only document) and where it
//! came from, and only then relayed to sync sessions.

use super::NodeError;
use super::feed::{Feed, Feeds};
use crate::clock::now;
use crate::crd::PodState;
use crate::input::{self, DesiredNode, InvalidInput, MAX_HISTORY_BYTES, Rules};
use crate::key::DocKey;
use crate::model::{self, DocView, ModelError};
use crate::registry::{self, Registry};
use crate::store::{COMPACT_AFTER_CHUNKS, DocSave, Store};
use crate::sync::session::Brought;
use crate::transport::tls::{Identity, Role};
use automerge::{ActorId, AutoCommit, ChangeHash, sync};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::lock;

mod change;
mod entry;

use change::moved;
pub use change::{Change, Moved, Origin};
pub use entry::DocEntry;
use entry::{Loads, Staged, check_history, stage};

/// Which documents a node serves, and what it decides in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every EdgeNode and the heads' documents; an apply also records whether its namespace is
    /// privileged (a head).
    All,
    /// The EdgeNodes named after one edge (an edge).
    Edge(String),
}

impl Scope {
    /// Whether document `key` is served here.
    fn serves(&self, key: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Edge(name) => crate::key::edge_of(key) == Some(name.as_str()),
        }
    }
}

/// What `apply` did to one EdgeNode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// `namespace/name`.
    pub key: String,
    /// created, configured or unchanged (as kubectl says).
    pub result: String,
}

/// What an apply would do to one EdgeNode.
#[derive(Debug, Clone)]
pub struct Preview {
    /// created, configured or unchanged.
    pub outcome: ApplyOutcome,
    /// The EdgeNode now, if it exists.
    pub before: Option<DocView>,
    /// The EdgeNode after the apply.
    pub after: DocView,
}

/// The documents of one node.
pub struct Docs {
    scope: Scope,
    actor: ActorId,
    store: Store,
    rules: Rules,
    docs: Mutex<Table>,
    changes: broadcast::Sender<Change>,
    feeds: Feeds,
    /// Heads each peer is known to have, by peer and document (from the sync states).
    shared: Mutex<HashMap<(String, String), Vec<ChangeHash>>>,
    /// The registry as last read, and the heads it was read at.
    registry_read: Mutex<Option<(Vec<ChangeHash>, Arc<Registry>)>>,
    loads: Arc<Loads>,
    readers: Mutex<Readers>,
}

/// Which peers read a document's generation with its counts per writer
/// ([`model::count_per_writer`]): a head moves an EdgeNode's document to them only when its
/// edge does and no head connected here does not.
#[derive(Default)]
struct Readers {
    /// Edges whose last session here read them.
    edges: BTreeSet<String>,
    /// Sessions connected now with heads that do not.
    older_heads: u32,
}

/// How long a head keeps an EdgeNode document loaded that nothing uses (about 15 KiB for a
/// small one); then it waits in its compact encoding (about half a KiB) until next used.
/// Long enough that a change's few uses (the apply, the sync rounds, the edge's report, the
/// looks at its status) find it loaded even when a fan-out to 10,000 edges takes its 15 s:
/// loading one again takes some 55 µs, and with 5 s, half of such a fan-out's documents were
/// saved away before their edge's turn and loaded again for it. The documents are looked over
/// once per this time, so one is saved away one to two times it after its last use (a look
/// goes over every EdgeNode: at 10,000 edges, a look every second was a tenth of an idle
/// head's CPU).
pub const UNLOAD_AFTER: Duration = Duration::from_secs(10);

/// How many EdgeNode documents a head keeps loaded at most (about 180 MiB at some 15 KiB
/// each): enough for a change to every EdgeNode of a fleet of 10,000 to keep them loaded while
/// it reaches the edges. With 2,048, each document of such a fan-out was loaded up to four
/// times (for the apply, the looks at its status, its push and the edge's report), which cost
/// the head a quarter of its CPU. Each time a quarter of this many more were loaded, those
/// least recently used beyond it are saved away (so at most a quarter more are loaded between
/// two looks, and those in use are left alone).
const LOADED_AT_MOST: usize = 12_288;

/// Documents looked over (and perhaps saved away) between two yields to the runtime.
const UNLOAD_AT_ONCE: usize = 256;

/// Of `entries`, the loaded documents beyond the `at_most` most recently used and a quarter
/// of `at_most` more (room for the loads until the next look), least recently used first.
fn beyond(
    entries: &[Arc<tokio::sync::Mutex<DocEntry>>],
    at_most: usize,
) -> Vec<Arc<tokio::sync::Mutex<DocEntry>>> {
    let mut loaded: Vec<_> = entries
        .iter()
        .filter_map(|entry| Some((entry.try_lock().ok()?.loaded_since()?, entry)))
        .collect();
    if loaded.len() <= at_most {
        return Vec::new();
    }
    loaded.sort_unstable_by_key(|(used, _)| *used);
    loaded.truncate(loaded.len() - (at_most - at_most / 4));
    loaded.into_iter().map(|(_, entry)| entry.clone()).collect()
}

/// Saves away those of `entries` loaded and unused for `idle`, leaving alone those in use now;
/// returns how many it saved away.
fn unload_idle(entries: &[Arc<tokio::sync::Mutex<DocEntry>>], idle: Duration) -> usize {
    let mut unloaded = 0;
    for entry in entries {
        if let Ok(mut entry) = entry.try_lock()
            && entry
                .loaded_since()
                .is_some_and(|used| used.elapsed() >= idle)
            && entry.unload()
        {
            unloaded += 1;
        }
    }
    unloaded
}

/// One node's documents by key, and the keys of each edge's (what its sync sessions offer, so a
/// session start never walks a fleet's documents).
#[derive(Default)]
struct Table {
    entries: BTreeMap<String, Arc<tokio::sync::Mutex<DocEntry>>>,
    by_edge: HashMap<String, BTreeSet<String>>,
}

impl Table {
    fn insert(&mut self, key: String, entry: Arc<tokio::sync::Mutex<DocEntry>>) {
        if let Some(edge) = crate::key::edge_of(&key) {
            let keys = self.by_edge.entry(edge.to_string()).or_default();
            keys.insert(key.clone());
        }
        self.entries.insert(key, entry);
    }

    /// The documents `peer` may see.
    fn seen_by(&self, peer: &Identity) -> Vec<(String, Arc<tokio::sync::Mutex<DocEntry>>)> {
        let entry = |key: &String| (key.clone(), self.entries[key].clone());
        match peer.role {
            Role::Head => self.entries.keys().map(entry).collect(),
            Role::Edge => self
                .by_edge
                .get(&peer.name)
                .map(|keys| keys.iter().map(entry).collect())
                .unwrap_or_default(),
        }
    }
}

impl Docs {
    /// Loads every stored document, continuing as this node's actor.
    pub async fn open(scope: Scope, store: Store, rules: Rules) -> Result<Docs, NodeError> {
        Docs::open_loading_at_most(scope, store, rules, LOADED_AT_MOST).await
    }

    async fn open_loading_at_most(
        scope: Scope,
        store: Store,
        rules: Rules,
        at_most: usize,
    ) -> Result<Docs, NodeError> {
        let loads = Loads::new(at_most);
        let actor = store
            .meta_or_init(
                "actor",
                crate::transport::tls::random_bytes::<16>().to_vec(),
            )
            .await?;
        let actor = ActorId::from(actor);
        let mut docs = Table::default();
        for stored in store.load_docs().await? {
            let key = stored.key.clone();
            let mut entry = DocEntry::load(stored, &actor, &loads)?;
            // A head loads a document when it is used (see `unload_forever`).
            if scope == Scope::All && !registry::is_internal(&key) {
                entry.unload();
            }
            docs.insert(key, Arc::new(tokio::sync::Mutex::new(entry)));
        }
        let mut shared = HashMap::new();
        for (peer, key, state) in store.all_sync_states().await? {
            if let Ok(state) = sync::State::decode(&state) {
                shared.insert((peer, key), state.shared_heads);
            }
        }
        let (changes, _) = broadcast::channel(1024);
        Ok(Docs {
            scope,
            actor,
            store,
            rules,
            docs: Mutex::new(docs),
            changes,
            feeds: Feeds::default(),
            shared: Mutex::new(shared),
            registry_read: Mutex::new(None),
            loads,
            readers: Mutex::new(Readers::default()),
        })
    }

    /// On a head: saves away the EdgeNode documents nothing used for [`UNLOAD_AFTER`] (looking
    /// once per that time), and those least recently used beyond [`LOADED_AT_MOST`], until
    /// `shutdown`. A document saved away is loaded again when it is next used.
    pub async fn unload_forever(&self, shutdown: CancellationToken) {
        let mut look = tokio::time::interval(UNLOAD_AFTER);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let idle = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = look.tick() => true,
                _ = self.loads.wake.notified() => false,
            };
            // A few at a time: saving thousands away at once would hold a runtime thread.
            let entries = self.edgenode_entries();
            if idle {
                for entries in entries.chunks(UNLOAD_AT_ONCE) {
                    unload_idle(entries, UNLOAD_AFTER);
                    tokio::task::yield_now().await;
                }
            }
            for entries in beyond(&entries, self.loads.at_most).chunks(UNLOAD_AT_ONCE / 8) {
                unload_idle(entries, Duration::ZERO);
                tokio::task::yield_now().await;
            }
        }
    }

    /// Saves away the loaded EdgeNode documents unused for `idle`, leaving alone those in use
    /// now; returns how many it saved away.
    #[cfg(test)]
    fn unload(&self, idle: Duration) -> usize {
        unload_idle(&self.edgenode_entries(), idle)
    }

    /// How many EdgeNode documents are loaded now (not counting those in use this instant).
    #[cfg(test)]
    fn loaded(&self) -> usize {
        let entries = self.edgenode_entries();
        let loaded = |entry: &Arc<tokio::sync::Mutex<DocEntry>>| {
            entry.try_lock().is_ok_and(|e| e.loaded_since().is_some())
        };
        entries.iter().filter(|e| loaded(e)).count()
    }

    fn edgenode_entries(&self) -> Vec<Arc<tokio::sync::Mutex<DocEntry>>> {
        let docs = lock(&self.docs);
        let edgenodes = docs
            .entries
            .iter()
            .filter(|(key, _)| !registry::is_internal(key));
        edgenodes.map(|(_, entry)| entry.clone()).collect()
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This node's validation rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Changes, each announced after it is stored (local edits and received changes).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Every EdgeNode document key.
    pub fn keys(&self) -> Vec<String> {
        let docs = lock(&self.docs);
        docs.entries
            .keys()
            .filter(|k| !registry::is_internal(k))
            .cloned()
            .collect()
    }

    /// The keys of the EdgeNodes named after edge `edge`.
    pub fn keys_of_edge(&self, edge: &str) -> Vec<String> {
        let docs = lock(&self.docs);
        let keys = docs.by_edge.get(edge).into_iter().flatten();
        keys.filter(|k| !registry::is_internal(k))
            .cloned()
            .collect()
    }

    /// When `changed` (keys from [`Docs::watch_all`]) holds the registry: adds the EdgeNodes
    /// of the edges whose presence or registration moved since `seen`, an earlier reading of
    /// it (their Online may have changed), and makes `seen` the reading now.
    pub async fn add_moved_edges(&self, changed: &mut BTreeSet<String>, seen: &mut Arc<Registry>) {
        if !changed.iter().any(|k| registry::is_internal(k)) {
            return;
        }
        let now = self.registry().await;
        for edge in now.moved_since(seen) {
            changed.extend(self.keys_of_edge(&edge));
        }
        *seen = now;
    }

    /// The keys of documents as they change (each once until taken), for a watcher that must
    /// not fall behind.
    pub fn watch_all(&self) -> Arc<Feed> {
        self.feeds.subscribe_all()
    }

    /// Changes to the documents `peer` may see, for a sync session with it.
    pub fn feed(&self, peer: &Identity) -> Arc<Feed> {
        self.feeds.subscribe(peer)
    }

    /// The heads' registry as this head knows it.
    pub async fn registry(&self) -> Arc<Registry> {
        let Some(entry) = self.entry(registry::KEY) else {
            return Arc::default();
        };
        let mut entry = entry.lock().await;
        // Read once per version: at 10,000 edges a reading costs tens of milliseconds, and
        // presence, DNS and the journal each look at every change.
        let heads = entry.heads();
        let mut read = lock(&self.registry_read);
        match &*read {
            Some((at, registry)) if *at == heads => registry.clone(),
            _ => {
                let registry = Arc::new(registry::read(entry.doc()));
                *read = Some((heads, registry.clone()));
                registry
            }
        }
    }

    /// The head edge `name` is connected to, as the heads' registry says.
    pub async fn presence_of(&self, name: &str) -> Option<String> {
        let entry = self.entry(registry::KEY)?;
        let mut entry = entry.lock().await;
        registry::presence_of(entry.doc(), name)
    }

    /// Edits the heads' registry and stores it; it reaches the other heads by sync.
    pub async fn edit_registry(
        &self,
        edit: impl FnOnce(&mut automerge::AutoCommit) -> Result<bool, ModelError>,
    ) -> Result<(), NodeError> {
        let entry = self.entry_or_genesis(registry::KEY);
        let mut entry = entry.lock().await;
        if edit(entry.doc())? {
            self.persist(
                registry::KEY,
                &mut entry,
                Vec::new(),
                Origin::Local,
                Moved::INTERNAL,
            )
            .await?;
        }
        Ok(())
    }

    fn entry(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<DocEntry>>> {
        lock(&self.docs).entries.get(key).cloned()
    }

    fn entry_or_genesis(&self, key: &str) -> Arc<tokio::sync::Mutex<DocEntry>> {
        let mut docs = lock(&self.docs);
        if let Some(entry) = docs.entries.get(key) {
            return entry.clone();
        }
        let entry = DocEntry::genesis(key, &self.actor, &self.loads);
        let entry = Arc::new(tokio::sync::Mutex::new(entry));
        docs.insert(key.to_string(), entry.clone());
        entry
    }

    /// Stores what changed in `entry` since its last save (and the given sync states), then
    /// tells subscribers. Nothing is announced before it is on disk; if the write fails, the
    /// entry goes back to what is stored, so nothing unstored is ever relayed.
    async fn persist(
        &self,
        key: &str,
        entry: &mut DocEntry,
        sync_states: Vec<(String, Vec<u8>)>,
        origin: Origin,
        moved: Moved,
    ) -> Result<(), NodeError> {
        let synced = matches!(origin, Origin::Peer(_));
        let Some((save, staged)) = stage(key, entry, sync_states, synced, None) else {
            return Ok(());
        };
        self.store_staged(key, entry, save, staged, origin, moved)
            .await
    }

    /// Stores a staged write of `entry`, then tells subscribers; if the write fails, the
    /// entry goes back to what is stored.
    async fn store_staged(
        &self,
        key: &str,
        entry: &mut DocEntry,
        save: DocSave,
        staged: Staged,
        origin: Origin,
        moved: Moved,
    ) -> Result<(), NodeError> {
        match self.store.save_docs(vec![save]).await {
            Ok(()) => {
                self.stored(key, entry, staged, origin, moved);
                Ok(())
            }
            Err(e) => {
                self.revert(key, entry).await;
                Err(e.into())
            }
        }
    }

    /// Finishes a staged write that is stored: subscribers hear of the change.
    fn stored(
        &self,
        key: &str,
        entry: &mut DocEntry,
        staged: Staged,
        origin: Origin,
        moved: Moved,
    ) {
        entry.chunks = staged.chunks;
        entry.stored_bytes = staged.stored_bytes;
        entry.persisted_heads = staged.heads;
        if staged.synced_at.is_some() {
            entry.last_synced_at = staged.synced_at;
        }
        if staged.changed {
            let change = Change {
                key: key.to_string(),
                moved,
                origin,
            };
            let _ = self.changes.send(change);
            self.feeds.publish(key);
        }
    }

    /// Puts `entry` back to what is stored, dropping edits not stored.
    async fn revert(&self, key: &str, entry: &mut DocEntry) {
        let stored = match self.store.load_doc(key.to_string()).await {
            Ok(Some(stored)) => DocEntry::load(stored, &self.actor, &self.loads),
            Ok(None) => Ok(DocEntry::genesis(key, &self.actor, &self.loads)),
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
    /// Objects this node does not serve (another edge's, on an edge) are refused.
    pub async fn apply_text(
        &self,
        text: &str,
        default_namespace: &str,
    ) -> Result<Vec<ApplyOutcome>, NodeError> {
        let nodes = self.parse(text, default_namespace)?;
        self.apply_nodes(&nodes).await
    }

    /// What applying `text` would do to each EdgeNode, and each before and after, without
    /// storing anything (`apply --dry-run=server`, `diff`).
    pub async fn preview_text(
        &self,
        text: &str,
        default_namespace: &str,
    ) -> Result<Vec<Preview>, NodeError> {
        let nodes = self.parse(text, default_namespace)?;
        let mut previews = Vec::with_capacity(nodes.len());
        for desired in &nodes {
            let key = desired.key().to_string();
            let mut doc = match self.entry(&key) {
                Some(entry) => entry.lock().await.doc().fork(),
                None => DocEntry::genesis(&key, &self.actor, &self.loads)
                    .doc()
                    .fork(),
            };
            let live = model::is_live(&doc)?;
            let before = live.then(|| model::read(&doc, &key)).transpose()?;
            let (existed, changed) = self.edit_spec(&mut doc, desired)?;
            let result = match (existed, changed) {
                (false, _) => "created",
                (true, true) => "configured",
                (true, false) => "unchanged",
            };
            previews.push(Preview {
                outcome: ApplyOutcome {
                    key: key.clone(),
                    result: result.into(),
                },
                before,
                after: model::read(&doc, &key)?,
            });
        }
        Ok(previews)
    }

    /// Parses EdgeNode text for an apply: every object valid, and one this node serves.
    fn parse(&self, text: &str, default_namespace: &str) -> Result<Vec<DesiredNode>, NodeError> {
        let rules = Rules {
            default_namespace: default_namespace.to_string(),
            privileged_namespaces: self.rules.privileged_namespaces.clone(),
        };
        let nodes = input::parse_edgenodes(text, &rules)?;
        if let Scope::Edge(me) = &self.scope
            && let Some(other) = nodes.iter().find(|n| n.name != *me)
        {
            return Err(InvalidInput {
                object: format!("EdgeNode {}", other.key()),
                field: "metadata.name".into(),
                reason: format!(
                    "this edge is {me:?} and only serves EdgeNodes of that name; apply it on the head"
                ),
            }
            .into());
        }
        Ok(nodes)
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
            let edited = self.edit_spec(locked[i].doc(), desired).and_then(|edited| {
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
            if let Some((save, done)) = stage(key, &mut locked[i], Vec::new(), false, None) {
                saves.push(save);
                staged.push((i, done));
            }
        }
        let saved = self.store.save_docs(saves).await;
        for (i, done) in staged {
            match saved {
                Ok(()) => self.stored(
                    &order[i].0,
                    &mut locked[i],
                    done,
                    Origin::Local,
                    Moved::SPEC,
                ),
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
        if self.scope == Scope::All {
            let privileged = self
                .rules
                .privileged_namespaces
                .contains(&desired.namespace);
            changed |= model::set_privileged(doc, privileged)?;
        }
        // Moved to counts per writer with a change that is stored anyway, once its counter
        // has had enough increments: edits after it cost the same whatever its history.
        if changed && model::counter(doc)? >= model::COUNTS_AFTER {
            let key = desired.key().to_string();
            if self.counts_read(&key) {
                model::count_per_writer(doc, &key)?;
            }
        }
        Ok((existed, changed))
    }

    /// Deletes an EdgeNode (a tombstone that syncs); only one this node serves.
    pub async fn delete(&self, key: &str) -> Result<(), NodeError> {
        let entry = self
            .entry(key)
            .ok_or_else(|| NodeError::NotFound(key.to_string()))?;
        let mut entry = entry.lock().await;
        if !model::is_live(entry.doc())? {
            return Err(NodeError::NotFound(key.to_string()));
        }
        if !self.scope.serves(key) {
            return Err(NodeError::NotFound(key.to_string()));
        }
        model::mark_deleted(entry.doc())?;
        self.persist(key, &mut entry, Vec::new(), Origin::Local, Moved::SPEC)
            .await
    }

    /// The document `key` read out, with its last sync time.
    pub async fn view(&self, key: &str) -> Result<Option<(DocView, Option<String>)>, NodeError> {
        let Some(entry) = self.entry(key) else {
            return Ok(None);
        };
        let mut entry = entry.lock().await;
        let view = entry.read(|doc| model::read(doc, key))?;
        // A look at the status that follows (after the edge's report of a change it reads
        // for) reads nothing.
        let heads = entry.heads();
        entry.keep_read(&heads, &view);
        Ok(Some((view, entry.last_synced_at.clone())))
    }

    /// What the status of document `key` is derived from ([`model::read_status`]), with its
    /// last sync time.
    pub async fn view_status(
        &self,
        key: &str,
    ) -> Result<Option<(DocView, Option<String>)>, NodeError> {
        let Some(entry) = self.entry(key) else {
            return Ok(None);
        };
        let mut entry = entry.lock().await;
        let view = entry.status_view(key)?;
        Ok(Some((view, entry.last_synced_at.clone())))
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
        let heads = entry.heads();
        Ok(Some((entry.read(|doc| model::read(doc, key))?, heads)))
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
                .any(|h| entry.doc().get_change_by_hash(h).is_none())
        {
            return Ok(None);
        }
        let past = entry.doc().fork_at(heads).map_err(|e| NodeError::Sync {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some(model::read(&past, key)?))
    }

    /// Writes the edge's report into document `key` if it differs; returns the document's
    /// heads before and after (None if there is no such document).
    pub async fn report_status(
        &self,
        key: &str,
        observed: i64,
        pods: &[PodState],
    ) -> Result<Option<(Vec<ChangeHash>, Vec<ChangeHash>)>, NodeError> {
        let Some(entry) = self.entry(key) else {
            return Ok(None);
        };
        let mut entry = entry.lock().await;
        let before = entry.heads();
        // The status as last read or written here, if nothing moved it since: a report that
        // moves no pod's state writes the observed generation alone.
        let known = entry.known_status(&before).cloned();
        if let Some(written) = model::set_status_known(entry.doc(), observed, pods, known.as_ref())?
        {
            let after = entry.heads();
            entry.status_moved(&before, &after, Some(written));
            self.persist(key, &mut entry, Vec::new(), Origin::Local, Moved::STATUS)
                .await?;
        }
        Ok(Some((before, entry.heads())))
    }

    /// Document `key` for a sync session to apply a message to: created (from the shared
    /// genesis) if it is not here yet. Only valid keys this node serves are taken.
    pub fn sync_entry(&self, key: &str) -> Result<Arc<tokio::sync::Mutex<DocEntry>>, NodeError> {
        let refuse = |reason: String| NodeError::Sync {
            key: input::show(key),
            reason,
        };
        let parsed = DocKey::parse(key).map_err(|e| refuse(e.reason))?;
        if !self.scope.serves(parsed.as_str()) {
            return Err(refuse("not a document this node serves".into()));
        }
        Ok(self.entry_or_genesis(key))
    }

    /// Document `key`, if it is here.
    pub fn sync_doc(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<DocEntry>>> {
        self.entry(key)
    }

    /// After a sync message from `peer` was applied to `entry` (document `key`): stores what
    /// it brought (with the session's sync `state`, if given), then announces it; true if it
    /// brought changes. Nothing is announced before it is stored; if the write fails, the
    /// entry goes back to what is stored.
    pub async fn synced(
        &self,
        peer: &str,
        key: &str,
        entry: &mut DocEntry,
        state: Option<Vec<u8>>,
        shared_heads: Vec<automerge::ChangeHash>,
        brought: Brought,
    ) -> Result<bool, NodeError> {
        lock(&self.shared).insert((peer.to_string(), key.to_string()), shared_heads);
        if entry.heads() == entry.persisted_heads {
            // Nothing new (an acknowledgement): the session keeps the sync state and stores
            // it when it ends; a state stored stale only costs a little resending.
            entry.last_synced_at = Some(now());
            return Ok(false);
        }
        let before = entry.persisted_heads.clone();
        // The new changes, read once (from the message when it had them all): what they
        // moved, and the chunk that stores them.
        let changes = match brought {
            Brought::Changes { since, changes } if since == before => changes,
            _ => entry.doc().get_changes(&before),
        };
        let moved = moved(key, entry.doc(), &changes);
        if moved.spec {
            entry.spec_moved();
        } else {
            let after = entry.heads();
            entry.status_moved(&before, &after, None);
        }
        let chunk = changes
            .iter()
            .flat_map(|c| c.raw_bytes())
            .copied()
            .collect();
        let states = state.map(|s| (peer.to_string(), s)).into_iter().collect();
        let origin = Origin::Peer(peer.to_string());
        if let Some((save, staged)) = stage(key, entry, states, true, Some(chunk)) {
            self.store_staged(key, entry, save, staged, origin, moved)
                .await?;
        }
        Ok(true)
    }

    /// The heads of every document `peer` may see (what a sync session with it offers).
    pub async fn sync_heads(&self, peer: &Identity) -> Vec<(String, Vec<automerge::ChangeHash>)> {
        let entries = lock(&self.docs).seen_by(peer);
        let mut heads = Vec::with_capacity(entries.len());
        for (key, entry) in entries {
            heads.push((key, entry.lock().await.heads()));
        }
        heads
    }

    /// The heads of document `key`, if there is one.
    pub async fn heads(&self, key: &str) -> Option<Vec<automerge::ChangeHash>> {
        let entry = self.entry(key)?;
        let heads = entry.lock().await.heads();
        Some(heads)
    }

    /// EdgeNode documents with changes some peer that syncs them does not have yet, or that
    /// no peer has synced yet.
    pub async fn pending(&self) -> usize {
        let mut known: HashMap<String, Vec<Vec<ChangeHash>>> = HashMap::new();
        for ((_, key), heads) in lock(&self.shared).iter() {
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

    /// Forgets what peer `name` was known to have.
    pub fn forget_peer(&self, name: &str) {
        lock(&self.shared).retain(|(peer, _), _| peer != name);
    }

    /// Records that a session with `peer` started (or, with `started` false, ended), and
    /// whether it reads a document's generation with its counts per writer.
    pub fn session_reads(&self, peer: &Identity, counts: bool, started: bool) {
        let mut readers = lock(&self.readers);
        match peer.role {
            Role::Edge if started && counts => {
                readers.edges.insert(peer.name.clone());
            }
            Role::Edge if started => {
                readers.edges.remove(&peer.name);
            }
            Role::Head if !counts && started => readers.older_heads += 1,
            Role::Head if !counts => readers.older_heads = readers.older_heads.saturating_sub(1),
            _ => {}
        }
    }

    /// Whether every peer reading EdgeNode `key` reads its generation's counts per writer: on
    /// a head, when its edge's last session here did, and no head is connected with one that
    /// does not.
    fn counts_read(&self, key: &str) -> bool {
        let Some(edge) = crate::key::edge_of(key) else {
            return false;
        };
        let readers = lock(&self.readers);
        self.scope == Scope::All && readers.older_heads == 0 && readers.edges.contains(edge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../example/edge01.yaml");

    /// A head's documents, stored in `dir`.
    async fn head_docs(dir: &std::path::Path) -> Docs {
        let store = Store::open(dir).unwrap();
        Docs::open(Scope::All, store, Rules::new("default"))
            .await
            .unwrap()
    }

    /// Merges `theirs` into document `key` as a sync from edge01 brings it (naming the changes
    /// it brought), and stores it.
    async fn from_peer(docs: &Docs, key: &str, entry: &mut DocEntry, theirs: &mut AutoCommit) {
        let since = entry.doc().get_heads();
        let changes = entry.doc().get_changes_added(theirs);
        entry.doc().apply_changes(changes.clone()).unwrap();
        let brought = Brought::Changes { since, changes };
        docs.synced("edge01", key, entry, None, Vec::new(), brought)
            .await
            .unwrap();
    }

    /// An edge's report of the example's one pod.
    fn nginx_report(state: &str) -> Vec<PodState> {
        vec![PodState {
            name: "nginx".into(),
            state: state.into(),
            ..PodState::default()
        }]
    }

    #[tokio::test]
    async fn a_head_moves_a_document_to_counts_per_writer_once_all_its_readers_read_them() {
        let key = "default/edge01";
        let dir = tempfile::tempdir().unwrap();
        let docs = head_docs(dir.path()).await;
        let peer = |role, name: &str| Identity {
            role,
            name: name.into(),
            key: Vec::new(),
        };
        let (edge, other_edge) = (peer(Role::Edge, "edge01"), peer(Role::Edge, "edge02"));
        let older_head = peer(Role::Head, "head-b");
        let edit = |image: &str| EXAMPLE.replace("image: nginx", &format!("image: {image}"));
        let counts = async |docs: &Docs| {
            let entry = docs.entry(key).unwrap();
            let mut entry = entry.lock().await;
            let doc = entry.doc();
            let counts = automerge::ReadDoc::get(doc, automerge::ROOT, "generations").unwrap();
            (counts.is_some(), doc.get_heads())
        };
        let generation = async |docs: &Docs| docs.view(key).await.unwrap().unwrap().0.generation;
        // Not while its counter has had few increments.
        docs.session_reads(&other_edge, true, true);
        docs.session_reads(&edge, true, true);
        docs.apply_text(EXAMPLE, "default").await.unwrap();
        for i in 2..model::COUNTS_AFTER {
            docs.apply_text(&edit(&format!("nginx:{i}")), "default")
                .await
                .unwrap();
        }
        assert!(!counts(&docs).await.0);
        // Nor while its edge is not known to read them, nor while a head that does not is
        // connected.
        docs.session_reads(&edge, false, true);
        docs.apply_text(&edit("nginx:a"), "default").await.unwrap();
        assert!(!counts(&docs).await.0);
        docs.session_reads(&edge, true, true);
        docs.session_reads(&older_head, false, true);
        docs.apply_text(&edit("nginx:b"), "default").await.unwrap();
        assert!(!counts(&docs).await.0);
        // Nor with an apply that changes nothing.
        docs.session_reads(&older_head, false, false);
        let (_, heads) = counts(&docs).await;
        docs.apply_text(&edit("nginx:b"), "default").await.unwrap();
        assert_eq!(counts(&docs).await, (false, heads));
        docs.apply_text(&edit("nginx:c"), "default").await.unwrap();
        assert!(counts(&docs).await.0);
        assert_eq!(generation(&docs).await, model::COUNTS_AFTER + 2);
        // Stored with the edit: a restart reads them back.
        drop(docs);
        let docs = head_docs(dir.path()).await;
        assert!(counts(&docs).await.0);
        docs.apply_text(&edit("nginx:d"), "default").await.unwrap();
        assert_eq!(generation(&docs).await, model::COUNTS_AFTER + 3);
    }

    #[tokio::test]
    async fn each_stored_change_says_what_moved_and_where_it_came_from() {
        let key = "default/edge01";
        let dir = tempfile::tempdir().unwrap();
        let docs = head_docs(dir.path()).await;
        let mut changes = docs.subscribe();
        let change = |moved: Moved, origin: Origin| Change {
            key: key.into(),
            moved,
            origin,
        };
        docs.apply_text(EXAMPLE, "default").await.unwrap();
        assert_eq!(
            changes.recv().await.unwrap(),
            change(Moved::SPEC, Origin::Local)
        );
        docs.report_status(key, 1, &nginx_report("Applied"))
            .await
            .unwrap();
        assert_eq!(
            changes.recv().await.unwrap(),
            change(Moved::STATUS, Origin::Local)
        );
        docs.edit_registry(|doc| registry::set_presence(doc, "edge01", Some("head"), "head"))
            .await
            .unwrap();
        let registry = changes.recv().await.unwrap();
        assert_eq!(
            (registry.key.as_str(), registry.moved),
            (registry::KEY, Moved::INTERNAL)
        );

        // From a peer: an edge's report moves the status only, a user's edit the spec.
        let entry = docs.sync_doc(key).unwrap();
        let mut entry = entry.lock().await;
        let mut theirs = entry.doc().fork();
        model::set_status(&mut theirs, 1, &nginx_report("Refused")).unwrap();
        from_peer(&docs, key, &mut entry, &mut theirs).await;
        let peer = || Origin::Peer("edge01".into());
        assert_eq!(changes.recv().await.unwrap(), change(Moved::STATUS, peer()));
        let edited = EXAMPLE.replace("image: nginx", "image: nginx:1.27");
        let desired = input::parse_edgenodes(&edited, &Rules::new("default")).unwrap();
        model::set_spec(&mut theirs, &desired[0], "t").unwrap();
        from_peer(&docs, key, &mut entry, &mut theirs).await;
        assert_eq!(changes.recv().await.unwrap(), change(Moved::SPEC, peer()));
        // Nothing new: nothing announced.
        docs.synced(
            "edge01",
            key,
            &mut entry,
            None,
            Vec::new(),
            Brought::Unknown,
        )
        .await
        .unwrap();
        assert!(changes.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_report_that_moves_no_pod_writes_its_generation_alone() {
        let key = "default/edge01";
        let dir = tempfile::tempdir().unwrap();
        let docs = head_docs(dir.path()).await;
        let walks = || model::tests::POD_STATE_WRITES.with(|n| n.get());
        // Reports the pod's state `state` at `generation`: whether it wrote, how many walks
        // over the pods' states it took, and the status a read of the stored document finds.
        let docs = &docs;
        let report = move |generation: i64, state: &'static str| async move {
            let before = walks();
            let report = nginx_report(state);
            let heads = docs.report_status(key, generation, &report).await;
            let (old, new) = heads.unwrap().unwrap();
            let stored = docs.store().load_doc(key.into()).await.unwrap().unwrap();
            let mut stored = DocEntry::load(stored, &ActorId::random(), &Loads::new(1)).unwrap();
            let view = stored.read(|doc| model::read(doc, key)).unwrap();
            let states: Vec<String> = view.pod_states.into_iter().map(|p| p.state).collect();
            (
                old != new,
                walks() - before,
                view.observed_generation,
                states,
            )
        };
        let states = |state: &str| vec![state.to_string()];
        docs.apply_text(EXAMPLE, "default").await.unwrap();
        assert_eq!(
            report(1, "Applied").await,
            (true, 1, Some(1), states("Applied"))
        );
        // A new generation read here, whose pod stays applied: the generation alone.
        let edited = EXAMPLE.replace("image: nginx", "image: nginx:1.27");
        docs.apply_text(&edited, "default").await.unwrap();
        docs.view(key).await.unwrap().unwrap();
        assert_eq!(
            report(2, "Applied").await,
            (true, 0, Some(2), states("Applied"))
        );
        // The same report again writes nothing; a pod's new state is walked and written.
        assert_eq!(
            report(2, "Applied").await,
            (false, 0, Some(2), states("Applied"))
        );
        assert_eq!(
            report(2, "Refused").await,
            (true, 1, Some(2), states("Refused"))
        );
        // What the status holds is not known once the document moved since it was read.
        let edited = EXAMPLE.replace("image: nginx", "image: nginx:1.28");
        docs.apply_text(&edited, "default").await.unwrap();
        assert_eq!(
            report(3, "Refused").await,
            (true, 1, Some(3), states("Refused"))
        );
    }

    #[tokio::test]
    async fn a_status_read_follows_every_change_and_reads_only_the_sides_that_moved() {
        let key = "default/edge01";
        let dir = tempfile::tempdir().unwrap();
        let docs = head_docs(dir.path()).await;
        // Walks of the spec, and reads of the status object.
        let reads = || {
            let walks = model::tests::SPEC_WALKS.with(|n| n.get());
            (walks, model::tests::STATUS_READS.with(|n| n.get()))
        };
        let status = || async {
            let before = reads();
            let (view, _) = docs.view_status(key).await.unwrap().unwrap();
            let states = view.pod_states.into_iter().map(|p| p.state);
            let read = (view.generation, view.observed_generation, states.collect());
            (
                read,
                view.pods.len(),
                view.conflicts.len(),
                (reads().0 - before.0, reads().1 - before.1),
            )
        };
        let applied = || vec!["Applied".to_string()];
        docs.apply_text(EXAMPLE, "default").await.unwrap();
        assert_eq!(status().await, ((1, None, vec![]), 1, 0, (1, 1)));
        assert_eq!(
            status().await,
            ((1, None, vec![]), 1, 0, (0, 0)),
            "read again"
        );
        docs.report_status(key, 1, &nginx_report("Applied"))
            .await
            .unwrap();
        assert_eq!(status().await, ((1, Some(1), applied()), 1, 0, (0, 0)));
        let edited = EXAMPLE.replace("image: nginx", "image: nginx:1.27");
        docs.apply_text(&edited, "default").await.unwrap();
        // This node's own edit leaves no conflict: the spec is read without the walk for them.
        assert_eq!(status().await, ((2, Some(1), applied()), 1, 0, (0, 1)));
        // A whole read serves the look after the next report too (this node wrote it).
        docs.view(key).await.unwrap().unwrap();
        docs.report_status(key, 2, &nginx_report("Applied"))
            .await
            .unwrap();
        assert_eq!(status().await, ((2, Some(2), applied()), 1, 0, (0, 0)));
        // A peer's changes: the status alone, then the spec, concurrently with this side's
        // edit of the same field (a conflict), then a second pod.
        let entry = docs.sync_doc(key).unwrap();
        let mut entry = entry.lock().await;
        let mut theirs = entry.doc().fork();
        model::set_status(&mut theirs, 2, &nginx_report("Refused")).unwrap();
        from_peer(&docs, key, &mut entry, &mut theirs).await;
        drop(entry);
        let refused = vec!["Refused".to_string()];
        assert_eq!(
            status().await,
            ((2, Some(2), refused.clone()), 1, 0, (0, 1))
        );
        let entry = docs.sync_doc(key).unwrap();
        let mut entry = entry.lock().await;
        let mut theirs = entry.doc().fork();
        drop(entry);
        let theirs_edit = EXAMPLE.replace("image: nginx", "image: nginx:1.28");
        let desired = input::parse_edgenodes(&theirs_edit, &Rules::new("default")).unwrap();
        model::set_spec(&mut theirs, &desired[0], "t").unwrap();
        let ours = EXAMPLE.replace("image: nginx", "image: nginx:1.29");
        docs.apply_text(&ours, "default").await.unwrap();
        assert_eq!(
            status().await,
            ((3, Some(2), refused.clone()), 1, 0, (0, 1))
        );
        let entry = docs.sync_doc(key).unwrap();
        let mut entry = entry.lock().await;
        from_peer(&docs, key, &mut entry, &mut theirs).await;
        drop(entry);
        let (read, pods, conflicts, walked) = status().await;
        assert_eq!((pods, walked), (1, (1, 1)));
        assert!(conflicts > 0 && read.2 == refused, "{read:?} {conflicts}");
        let two = format!(
            "{ours}    - apiVersion: v1\n      kind: Pod\n      metadata:\n        name: web\n      spec:\n        containers:\n          - name: web\n            image: nginx\n"
        );
        // This node's apply resolves them; the look after it still walks the spec for them,
        // which then stays clean through the next apply.
        docs.apply_text(&two, "default").await.unwrap();
        let (_, pods, conflicts, walked) = status().await;
        assert_eq!((pods, conflicts, walked), (2, 0, (1, 1)));
        docs.apply_text(
            &two.replace("image: nginx\n", "image: nginx:2\n"),
            "default",
        )
        .await
        .unwrap();
        assert_eq!(status().await.3, (0, 1));
        // What this node wrote is what a read finds (in the order a read finds it).
        let mut report = vec![PodState {
            name: "web".into(),
            state: "NotWritten".into(),
            reason: Some("writing it failed".into()),
            cause: Some("DiskFull".into()),
            phase: Some("Running".into()),
        }];
        report.extend(nginx_report("Applied"));
        docs.report_status(key, 4, &report).await.unwrap();
        let (kept, _) = docs.view_status(key).await.unwrap().unwrap();
        let entry = docs.sync_doc(key).unwrap();
        let read = entry.lock().await.read(|d| model::read_status(d, key));
        assert_eq!(kept, read.unwrap());
        assert_eq!(kept.pod_states.len(), 2);
    }

    #[tokio::test]
    async fn a_head_keeps_only_the_documents_used_last_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let docs = Docs::open_loading_at_most(Scope::All, store, Rules::new("default"), 8)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let name = |i: usize| format!("edge{i:02}");
        let loaded = |i: usize| {
            let entry = docs.entry(&format!("default/{}", name(i))).unwrap();
            entry.try_lock().unwrap().loaded_since().is_some()
        };
        let applies = async {
            for i in 0..40 {
                docs.apply_text(&EXAMPLE.replace("edge01", &name(i)), "default")
                    .await
                    .unwrap();
                // The saving away runs beside the applies, as on a head.
                tokio::task::yield_now().await;
            }
            // A last look, long before `UNLOAD_AFTER`, after which any unused one goes.
            tokio::time::sleep(Duration::from_millis(50)).await;
            shutdown.cancel();
        };
        tokio::join!(docs.unload_forever(shutdown.clone()), applies);
        // At most 8, and the loads until the next look (a quarter of 8).
        assert!(docs.loaded() <= 10, "{} loaded", docs.loaded());
        assert!(loaded(39) && !loaded(0), "the least recently used go first");
        // Nothing is lost: each reads back as applied.
        for i in [0, 20, 39] {
            let key = format!("default/{}", name(i));
            let (view, _) = docs.view(&key).await.unwrap().unwrap();
            assert_eq!(view.name, name(i));
        }
    }

    #[tokio::test]
    async fn documents_saved_away_load_again_when_used_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let store = Store::open(dir.path()).unwrap();
            Docs::open(Scope::All, store, Rules::new("default"))
                .await
                .unwrap()
        };
        let docs = open().await;
        let names = ["edge01", "edge02", "edge03"];
        for name in names {
            docs.apply_text(&EXAMPLE.replace("edge01", name), "default")
                .await
                .unwrap();
        }
        async fn view(docs: &Docs, name: &str) -> DocView {
            let key = format!("default/{name}");
            docs.view(&key).await.unwrap().unwrap().0
        }
        let before = view(&docs, "edge01").await;
        let heads = docs.heads("default/edge01").await.unwrap();
        assert_eq!(docs.loaded(), 3);
        // Only those unused for long go.
        assert_eq!(docs.unload(Duration::from_secs(3600)), 0);
        assert_eq!(docs.unload(Duration::ZERO), 3);
        assert_eq!(docs.loaded(), 0);
        assert_eq!(docs.heads("default/edge01").await.unwrap(), heads);
        assert_eq!(docs.loaded(), 0, "heads are known without loading");
        // A read loads it for the read only (a look at every EdgeNode loads none for good);
        // an edit or a sync loads it.
        assert_eq!(view(&docs, "edge01").await, before);
        assert_eq!(docs.loaded(), 0);
        docs.sync_doc("default/edge01").unwrap().lock().await.doc();
        assert_eq!(docs.loaded(), 1);
        // An edit of a document saved away is stored like any other.
        let edited = EXAMPLE
            .replace("edge01", "edge02")
            .replace("image: nginx", "image: nginx:1.27");
        docs.apply_text(&edited, "default").await.unwrap();
        assert_eq!(docs.loaded(), 2);
        drop(docs);
        // A head keeps what it opens saved away until it is used.
        let docs = open().await;
        assert_eq!(docs.loaded(), 0);
        let image = |view: DocView| view.pods["nginx"]["spec"]["containers"][0]["image"].clone();
        assert_eq!(image(view(&docs, "edge02").await), "nginx:1.27");
        assert_eq!(view(&docs, "edge01").await, before);
    }
}
