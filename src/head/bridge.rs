//! Kubernetes bridge: the EdgeNode custom resource as the source of truth. While this head
//! holds the writer Lease, a kube-runtime Controller reconciles each resource with its
//! document: [`plan`] decides, purely, what a three-way merge over their last agreed base
//! writes to either side (so edits made on an edge are kept); the finalizer helper holds a
//! deleted resource until its edge has removed the pods. Status goes out through one writer
//! ([`status`]). While another head writes, this one only follows, keeping its merge bases.

mod follow;
mod orphans;
mod plan;
mod status;

use crate::daemon::Tasks;
use crate::head::cluster::patch_params;
use crate::head::edges::Edges;
use crate::head::events::ClusterEvents;
use crate::input;
use crate::node::{Node, NodeError};
use futures_util::{Stream, StreamExt};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use plan::{Inputs, parse_heads, with_synced};
use serde_json::{Value, json};
use status::{ClusterView, Pending};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Finalizer that holds a deleted EdgeNode until its edge has removed the pods (or is gone).
pub const FINALIZER: &str = "edgesync.io/edge-cleanup";
/// Annotation on each EdgeNode: the document heads (newest last) at which its document's pods
/// equalled the resource's, so a head with no history of its own (all heads replaced, state
/// dirs lost) finds a merge base in the history an edge or another head brings, rather than
/// starting a competing history that could win over an edge's offline edits.
pub const SYNCED_HEADS_ANNOTATION: &str = "edgesync.io/synced-heads";
/// How long a head waits, while the edge is connected, for history it never receives before
/// it merges the resource without a base.
const HISTORY_WAIT: Duration = Duration::from_secs(10);
/// How soon a resource waiting for its document's history, or for its edge to remove the
/// pods of a deleted one, is looked at again (a document change brings it sooner).
const RECHECK: Duration = Duration::from_secs(1);
/// How soon a reconcile that failed is tried again.
const RETRY: Duration = Duration::from_secs(5);
/// Resources reconciled at once.
const CONCURRENCY: u16 = 16;

/// Why a reconcile did not finish; each is tried again (see [`error_policy`]).
#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    /// A resource without a namespace or name.
    #[error("the resource has no namespace or name")]
    Unnamed,
    /// A request to the API server failed.
    #[error("API request: {0}")]
    Api(#[from] kube::Error),
    /// The document could not be read or written.
    #[error("document: {0}")]
    Node(#[from] NodeError),
    /// The edge has not removed the pods of the deleted resource yet.
    #[error("waiting for the edge to remove the pods")]
    AwaitingEdge,
    /// Adding or removing the finalizer, or the reconcile inside it, failed.
    #[error(transparent)]
    Finalizer(Box<finalizer::Error<ReconcileError>>),
}

/// What the bridge remembers per EdgeNode.
#[derive(Default)]
struct Seen {
    /// Pods as last agreed by the resource and the document: the base of three-way merges.
    /// Persisted, so a restarted head still tells edge edits from user edits.
    base: BTreeMap<String, Value>,
    /// Why a resource's spec was refused (shown as Valid=False).
    invalid: BTreeMap<String, String>,
    /// Edits that lost to a concurrent one, shown as the Conflict condition until the user
    /// next changes the resource.
    conflicts: BTreeMap<String, BTreeSet<String>>,
    /// Per resource, its newest synced-heads entry and the pods the document had there.
    annotated: BTreeMap<String, (Vec<String>, Value)>,
    /// Resources whose document history has not reached this head yet, and since when their
    /// edge has been connected here while waiting.
    awaiting: BTreeMap<String, Option<Instant>>,
    /// Per resource, the resourceVersion this head's last write replaced: a cache still at
    /// that version has not seen the write yet, and is not reconciled.
    superseded: BTreeMap<String, String>,
}

impl Seen {
    fn note_conflicts(&mut self, key: &str, found: impl IntoIterator<Item = String>) -> bool {
        let mut found = found.into_iter().peekable();
        let any = found.peek().is_some();
        if any {
            self.conflicts
                .entry(key.to_string())
                .or_default()
                .extend(found);
        }
        any
    }
}

/// The running bridge.
pub struct Bridge {
    client: kube::Client,
    resource: ApiResource,
    node: Node,
    edges: Edges,
    seen: Mutex<Seen>,
    /// Namespaces watched; None for all.
    namespaces: Option<BTreeSet<String>>,
    /// EdgeNodes whose status is to be looked at (keys, or edge names for every EdgeNode of
    /// that edge), for the status writer.
    status: Arc<Pending>,
    cluster: ClusterView,
    /// Where the status writer's notices go as Kubernetes Events.
    events: Option<ClusterEvents>,
}

/// One namespace (or all) as the writer sees it: the Controller's cache, where documents that
/// changed are sent to be reconciled, and the orphan checks still to make.
struct Scope {
    namespace: Option<String>,
    store: Store<DynamicObject>,
    trigger: mpsc::Sender<ObjectRef<DynamicObject>>,
    orphans: Arc<Pending>,
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|p| p.into_inner())
}

fn base_key(key: &str) -> String {
    format!("crd-base/{key}")
}

fn pods_value(pods: &BTreeMap<String, Value>) -> Value {
    Value::Object(pods.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

impl Bridge {
    /// Loads the remembered bases and starts the bridge as a daemon task: the writer's part
    /// while `leading` says this head holds the Lease, the follower's otherwise.
    pub async fn start(
        client: kube::Client,
        node: Node,
        edges: Edges,
        events: Option<ClusterEvents>,
        namespaces: &[String],
        leading: watch::Receiver<bool>,
        tasks: &mut Tasks,
    ) -> Result<(), NodeError> {
        let mut seen = Seen::default();
        for key in node.docs().keys() {
            if let Some(bytes) = node.store().meta(base_key(&key)).await?
                && let Ok(base) = serde_json::from_slice(&bytes)
            {
                seen.base.insert(key, base);
            }
        }
        let status = Arc::new(Pending::default());
        let bridge = Arc::new(Bridge {
            cluster: ClusterView::start(&client, status.clone(), tasks),
            status,
            client,
            resource: ApiResource::erase::<crate::crd::EdgeNode>(&()),
            node,
            edges,
            events,
            seen: Mutex::new(seen),
            namespaces: (!namespaces.is_empty()).then(|| namespaces.iter().cloned().collect()),
        });
        tasks.spawn(bridge.run(leading, tasks.token()));
        Ok(())
    }

    /// Writes while this head holds the Lease, follows while another does; the one place the
    /// Lease is checked. A term ends as soon as the Lease changes hands, dropping whatever it
    /// was doing; the next term lists every resource afresh.
    async fn run(self: Arc<Self>, mut leading: watch::Receiver<bool>, shutdown: CancellationToken) {
        loop {
            let writer = *leading.borrow_and_update();
            self.node.metrics().writer.set(i64::from(writer));
            let term = async {
                match writer {
                    true => self.clone().lead().await,
                    false => self.follow().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
                _ = term => return,
            }
        }
    }

    /// Whether document `key` is an EdgeNode in a namespace this bridge keeps in the cluster.
    fn in_scope(&self, key: &str) -> bool {
        let Some((namespace, _)) = crate::key::parts(key) else {
            return false;
        };
        !crate::registry::is_internal(key)
            && self
                .namespaces
                .as_ref()
                .is_none_or(|n| n.contains(namespace))
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.resource)
    }

    /// The watched scopes: each namespace named, or all of them.
    fn scope_apis(&self) -> Vec<(Option<String>, Api<DynamicObject>)> {
        match &self.namespaces {
            None => vec![(None, Api::all_with(self.client.clone(), &self.resource))],
            Some(namespaces) => namespaces
                .iter()
                .map(|ns| (Some(ns.clone()), self.api(ns)))
                .collect(),
        }
    }

    async fn remember(&self, key: &str, pods: Option<Value>) {
        let bytes = pods
            .as_ref()
            .map(|p| serde_json::to_vec(p).unwrap_or_default());
        if let Err(e) = self.node.store().set_meta(base_key(key), bytes).await {
            warn!(doc = key, error = %e, "cannot store the merge base");
        }
        let mut seen = lock(&self.seen);
        match pods {
            Some(p) => seen.base.insert(key.to_string(), p),
            None => seen.base.remove(key),
        };
    }

    /// Forgets a resource that is gone.
    async fn forget(&self, key: &str) {
        self.remember(key, None).await;
        let mut seen = lock(&self.seen);
        seen.invalid.remove(key);
        seen.conflicts.remove(key);
        seen.annotated.remove(key);
        seen.awaiting.remove(key);
        seen.superseded.remove(key);
    }

    // ---- the writer -------------------------------------------------------------------

    /// One term as the writer: a Controller per scope, the routing of document changes to
    /// them, and the status writer.
    async fn lead(self: Arc<Self>) {
        // Whether an edge is registered decides how long to wait for its history.
        self.edges.ready().await;
        self.status.mark_all();
        let mut scopes = Vec::new();
        let mut controllers = Vec::new();
        for (namespace, api) in self.scope_apis() {
            let (scope, controller) = self.clone().controller(namespace, api);
            scopes.push(scope);
            controllers.push(controller);
        }
        let scopes = Arc::new(scopes);
        let orphans = scopes.iter().map(|scope| self.orphans(scope));
        tokio::join!(
            futures_util::future::join_all(controllers),
            futures_util::future::join_all(orphans),
            self.route_changes(&scopes),
            status::write(&self, &scopes),
        );
    }

    /// The Controller of one scope. Its watch is tapped for deletions and for the end of each
    /// (re)list, after which resources deleted meanwhile and documents made elsewhere are
    /// looked for ([`Bridge::orphans`]).
    fn controller(
        self: Arc<Self>,
        namespace: Option<String>,
        api: Api<DynamicObject>,
    ) -> (Scope, impl Future<Output = ()>) {
        let writer = reflector::store::Writer::new(self.resource.clone());
        let store = writer.as_reader();
        let (trigger, triggers) = mpsc::channel(1024);
        let orphans = Arc::new(Pending::default());
        let tap = orphans.clone();
        let events = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        )
        .inspect(move |event| match event {
            Ok(watcher::Event::InitDone) => tap.mark_all(),
            Ok(watcher::Event::Delete(object)) => {
                if let Some(key) = key_of(object) {
                    tap.mark(key)
                }
            }
            Err(e) => warn!(error = %e, "EdgeNode watch failed; retrying"),
            Ok(_) => {}
        });
        let controller = Controller::for_stream_with(
            events.applied_objects(),
            store.clone(),
            self.resource.clone(),
        )
        .reconcile_on(receiver_stream(triggers))
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .run(reconcile, error_policy, self)
        .for_each(|_| async {});
        let scope = Scope {
            namespace,
            store,
            trigger,
            orphans,
        };
        (scope, controller)
    }

    /// Sends each document that changed to be reconciled with its resource, or, when it has
    /// none, to the orphan checks; and tells the status writer. The changed keys come
    /// coalesced, so falling behind never means looking at every document; a presence change
    /// marks the EdgeNodes of the edges that moved.
    async fn route_changes(&self, scopes: &[Scope]) {
        let changes = self.node.docs().watch_all();
        let mut registry = self.node.docs().registry().await;
        loop {
            let mut keys = changes.next().await;
            self.node
                .docs()
                .add_moved_edges(&mut keys, &mut registry)
                .await;
            for key in keys {
                if crate::registry::is_internal(&key) {
                    continue;
                }
                if !self.in_scope(&key) {
                    continue;
                }
                self.status.mark(key.clone());
                let Some((namespace, name)) = crate::key::parts(&key) else {
                    continue;
                };
                let Some(scope) = scopes
                    .iter()
                    .find(|s| s.namespace.as_deref().is_none_or(|ns| ns == namespace))
                else {
                    continue;
                };
                let object = ObjectRef::new_with(name, self.resource.clone()).within(namespace);
                match scope.store.get(&object) {
                    Some(_) => {
                        if scope.trigger.send(object).await.is_err() {
                            return;
                        }
                    }
                    None => scope.orphans.mark(key),
                }
            }
        }
    }

    /// Merges the resource into the document and the document into the resource.
    async fn apply(&self, key: &str, object: &DynamicObject) -> Result<Action, ReconcileError> {
        let json = serde_json::to_value(object).unwrap_or_default();
        let rules = self.node.rules().clone();
        let desired = match input::parse_edgenode(&json, &format!("EdgeNode {key}"), &rules) {
            Ok(desired) => desired,
            Err(e) => {
                warn!(doc = %key, error = %e, "EdgeNode refused");
                lock(&self.seen).invalid.insert(key.into(), e.to_string());
                self.status.mark(key.into());
                return Ok(Action::await_change());
            }
        };
        if lock(&self.seen).invalid.remove(key).is_some() {
            self.status.mark(key.into());
        }
        let theirs = pods_value(&desired.pods);
        let synced = synced_heads(object);
        let Some(base) = self.base_for(key, &synced).await else {
            return Ok(Action::requeue(RECHECK));
        };
        let (ours, conflicts) = match self.node.docs().view(key).await? {
            Some((view, _)) if !view.deleted && view.generation > 0 => {
                (Some(pods_value(&view.pods)), view.conflicts)
            }
            _ => (None, Vec::new()),
        };
        let annotated = self.annotated(key, &synced, &theirs).await;
        let plan = plan::plan(&Inputs {
            theirs,
            base,
            ours,
            annotated,
        });
        if !plan.lost.is_empty() {
            warn!(doc = %key, lost = ?plan.lost, "an edit from an edge lost to the user's");
        }
        if plan.user_changed && lock(&self.seen).conflicts.remove(key).is_some() {
            self.status.mark(key.into());
        }
        if plan.delete {
            return self.delete_resource(key).await;
        }
        let mut conflicts = conflicts;
        if let Some(pods) = plan.document {
            let mut merged = desired;
            merged.pods = pods
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            let outcome = self.node.docs().apply_node(&merged).await?;
            debug!(doc = %key, result = %outcome.result, "EdgeNode applied");
            // Writing the fields may have settled the document's own conflicts.
            conflicts = match self.node.docs().view(key).await? {
                Some((view, _)) => view.conflicts,
                None => Vec::new(),
            };
        }
        if lock(&self.seen).note_conflicts(key, conflicts.into_iter().chain(plan.lost)) {
            self.status.mark(key.into());
        }
        if let Some(base) = plan.base {
            self.remember(key, Some(base)).await;
        }
        if let Some(pods) = plan.resource {
            self.write_spec(key, object, pods, &synced).await?;
        } else if plan.annotate {
            self.annotate(key, object, &synced).await?;
        }
        Ok(Action::await_change())
    }

    /// The merge base: remembered, or, for a resource this head has none of, the document as
    /// it was at the newest synced heads it holds. Some(None) when there is none and none
    /// will come (no such edge, or it has been connected a while and sent none): merged
    /// without a base. None while the history may still arrive.
    async fn base_for(&self, key: &str, synced: &[Vec<String>]) -> Option<Option<Value>> {
        if let Some(base) = lock(&self.seen).base.get(key) {
            return Some(Some(base.clone()));
        }
        if synced.is_empty() {
            return Some(None);
        }
        for entry in synced.iter().rev() {
            let Some(heads) = parse_heads(entry) else {
                continue;
            };
            if let Ok(Some(view)) = self.node.docs().view_at_heads(key, &heads).await {
                debug!(doc = key, "merge base found in the document's history");
                lock(&self.seen).awaiting.remove(key);
                let base = pods_value(&view.pods);
                self.remember(key, Some(base.clone())).await;
                return Some(Some(base));
            }
        }
        let edge = crate::key::edge_of(key).unwrap_or(key);
        let connected = self.node.peers().is_connected(edge);
        let since = {
            let mut seen = lock(&self.seen);
            let first = !seen.awaiting.contains_key(key);
            let since = seen.awaiting.entry(key.to_string()).or_default();
            match connected {
                true => {
                    since.get_or_insert_with(Instant::now);
                }
                false => *since = None,
            }
            if first {
                info!(doc = %key, "waiting for the document's history from its edge or another head before merging the resource");
            }
            *since
        };
        let waited = since.is_some_and(|at| at.elapsed() >= HISTORY_WAIT);
        if self.edges.is_registered(edge).await && !waited {
            return None;
        }
        warn!(
            doc = key,
            "no history shared with the resource reached this head; merging without a base"
        );
        lock(&self.seen).awaiting.remove(key);
        Some(None)
    }

    /// Whether the resource's newest synced-heads entry is a document version with `pods`.
    async fn annotated(&self, key: &str, synced: &[Vec<String>], pods: &Value) -> bool {
        let Some(entry) = synced.last() else {
            return false;
        };
        if let Some((known, at)) = lock(&self.seen).annotated.get(key)
            && known == entry
        {
            return at == pods;
        }
        let Some(heads) = parse_heads(entry) else {
            return false;
        };
        let Ok(Some(view)) = self.node.docs().view_at_heads(key, &heads).await else {
            return false;
        };
        let at = pods_value(&view.pods);
        let matches = at == *pods;
        lock(&self.seen)
            .annotated
            .insert(key.to_string(), (entry.clone(), at));
        matches
    }

    /// Writes `pods` (an edit from an edge, merged) to the resource, at the version read,
    /// with the document's heads added to the synced-heads annotation.
    async fn write_spec(
        &self,
        key: &str,
        object: &DynamicObject,
        pods: Value,
        synced: &[Vec<String>],
    ) -> Result<(), ReconcileError> {
        let (namespace, name) = crate::key::parts(key).ok_or(ReconcileError::Unnamed)?;
        let heads = match self.node.docs().view_at(key).await? {
            Some((_, heads)) => heads,
            None => Vec::new(),
        };
        let synced = with_synced(synced, &heads).unwrap_or_else(|| synced.to_vec());
        let list: Vec<&Value> = pods
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .collect();
        let patch = json!({
            "metadata": {
                "resourceVersion": object.metadata.resource_version,
                "annotations": {SYNCED_HEADS_ANNOTATION: serde_json::to_string(&synced).unwrap_or_default()},
            },
            "spec": {"pods": list},
        });
        match self
            .api(namespace)
            .patch(name, &patch_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(
                    doc = key,
                    "spec edited on an edge written back to the EdgeNode"
                );
                self.wrote(key, object);
                self.remember(key, Some(pods)).await;
                Ok(())
            }
            // The user changed it meanwhile: that change brings another reconcile.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                debug!(doc = key, "write-back raced a user edit");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records in the resource the document's heads, at which its pods equal the resource's,
    /// for a head that will have no base of its own.
    async fn annotate(
        &self,
        key: &str,
        object: &DynamicObject,
        synced: &[Vec<String>],
    ) -> Result<(), ReconcileError> {
        let (namespace, name) = crate::key::parts(key).ok_or(ReconcileError::Unnamed)?;
        let Some((_, heads)) = self.node.docs().view_at(key).await? else {
            return Ok(());
        };
        let Some(list) = with_synced(synced, &heads) else {
            return Ok(());
        };
        let text = serde_json::to_string(&list).unwrap_or_default();
        let patch = json!({"metadata": {
            "resourceVersion": object.metadata.resource_version,
            "annotations": {SYNCED_HEADS_ANNOTATION: text},
        }});
        match self
            .api(namespace)
            .patch(name, &patch_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.wrote(key, object);
                Ok(())
            }
            // Changed or gone meanwhile: the next reconcile annotates.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Notes that this head replaced `object`'s version: the cache may still hold it.
    fn wrote(&self, key: &str, object: &DynamicObject) {
        if let Some(version) = &object.metadata.resource_version {
            lock(&self.seen)
                .superseded
                .insert(key.to_string(), version.clone());
        }
    }

    /// Whether `object` is a version this head has already replaced.
    fn is_stale(&self, key: &str, object: &DynamicObject) -> bool {
        let seen = lock(&self.seen);
        object.metadata.resource_version.is_some()
            && seen.superseded.get(key) == object.metadata.resource_version.as_ref()
    }

    /// The document was deleted on an edge: the resource goes too.
    async fn delete_resource(&self, key: &str) -> Result<Action, ReconcileError> {
        let (namespace, name) = crate::key::parts(key).ok_or(ReconcileError::Unnamed)?;
        match self
            .api(namespace)
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => info!(doc = key, "EdgeNode deleted from an edge; resource deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Action::await_change())
    }

    /// A deleted resource: the document is deleted, and the finalizer goes once the edge has
    /// applied the deletion (its report names the deletion's generation) or is no longer a
    /// registered node.
    async fn cleanup(&self, key: &str) -> Result<Action, ReconcileError> {
        match self.node.docs().delete(key).await {
            Ok(()) => {
                info!(doc = %key, "EdgeNode deleted; waiting for the edge to remove its pods")
            }
            Err(NodeError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let name = crate::key::edge_of(key).unwrap_or(key);
        let told = match self.node.docs().view(key).await? {
            Some((view, _)) => view.deleted && view.observed_generation == Some(view.generation),
            None => true,
        };
        if !told && self.edges.is_registered(name).await {
            return Err(ReconcileError::AwaitingEdge);
        }
        info!(
            doc = key,
            edge = if told {
                "removed the pods"
            } else {
                "is not registered"
            },
            "releasing the deleted EdgeNode"
        );
        self.forget(key).await;
        Ok(Action::await_change())
    }
}

/// Reconciles one resource: the finalizer first, then the merge, or the cleanup of a deleted
/// one.
async fn reconcile(
    object: Arc<DynamicObject>,
    bridge: Arc<Bridge>,
) -> Result<Action, ReconcileError> {
    let key = key_of(&object).ok_or(ReconcileError::Unnamed)?;
    if bridge.is_stale(&key, &object) {
        return Ok(Action::await_change());
    }
    let namespace = object.metadata.namespace.clone().unwrap_or_default();
    let api = bridge.api(&namespace);
    finalizer(&api, FINALIZER, object, |event| async {
        match event {
            finalizer::Event::Apply(object) => bridge.apply(&key, &object).await,
            finalizer::Event::Cleanup(_) => bridge.cleanup(&key).await,
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)))
}

/// When a failed reconcile is tried again: soon when waiting for the edge or a concurrent
/// write, later (and logged) when something is wrong.
fn error_policy(
    object: Arc<DynamicObject>,
    error: &ReconcileError,
    _bridge: Arc<Bridge>,
) -> Action {
    let key = key_of(&object).unwrap_or_default();
    let inner = match error {
        ReconcileError::Finalizer(e) => match &**e {
            finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => inner,
            finalizer::Error::AddFinalizer(kube::Error::Api(e))
            | finalizer::Error::RemoveFinalizer(kube::Error::Api(e))
                if e.code == 409 || e.code == 422 =>
            {
                debug!(doc = %key, "finalizer raced another write; trying again");
                return Action::requeue(RECHECK);
            }
            _ => error,
        },
        _ => error,
    };
    match inner {
        ReconcileError::AwaitingEdge => Action::requeue(RECHECK),
        e => {
            warn!(doc = %key, error = %e, "EdgeNode not reconciled; trying again");
            Action::requeue(RETRY)
        }
    }
}

fn receiver_stream<T>(receiver: mpsc::Receiver<T>) -> impl Stream<Item = T> {
    futures_util::stream::unfold(receiver, |mut r| async { r.recv().await.map(|t| (t, r)) })
}

fn key_of(object: &DynamicObject) -> Option<String> {
    Some(format!(
        "{}/{}",
        object.metadata.namespace.as_deref()?,
        object.metadata.name.as_deref()?
    ))
}

/// The synced-heads annotation of `object` (empty when absent or unreadable).
fn synced_heads(object: &DynamicObject) -> Vec<Vec<String>> {
    object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SYNCED_HEADS_ANNOTATION))
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_is_read_from_the_resource() {
        let hash = automerge::ChangeHash([1; 32]).to_string();
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "edgesync.io/v1alpha1", "kind": "EdgeNode",
            "metadata": {"name": "edge01", "namespace": "default", "annotations": {
                SYNCED_HEADS_ANNOTATION: serde_json::to_string(&[[&hash]]).unwrap(),
            }},
        }))
        .unwrap();
        assert_eq!(synced_heads(&object), [[hash]]);
        let bare: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "edgesync.io/v1alpha1", "kind": "EdgeNode",
            "metadata": {"name": "edge01", "namespace": "default"},
        }))
        .unwrap();
        assert!(synced_heads(&bare).is_empty());
    }
}
