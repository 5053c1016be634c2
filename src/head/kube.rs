//! Kubernetes bridge: the EdgeNode custom resource as the source of truth. A kube-runtime
//! watcher feeds spec changes into the documents as three-way merges (so edits made on an
//! edge are kept); spec edits that arrive from edges are written back to the resource with a
//! named field manager; status goes through the status subresource, coalesced.

use crate::crd::{Condition, EdgeNode, EdgeNodeStatus, MANAGED_LABEL, Phase};
use crate::daemon::DaemonError;
use crate::daemon::Tasks;
use crate::head::edges::Edges;
use crate::input;
use crate::model::merge3_noting;
use crate::node::{Node, NodeError};
use crate::transport::tls::Ca;
use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod, Secret};
use kube::api::ObjectMeta;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Field manager named on every write edgesync makes to the API server.
pub const FIELD_MANAGER: &str = "edgesync";
/// Parameters of a patch edgesync makes: its field manager named.
pub fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Parameters of a create or replace edgesync makes: its field manager named.
pub fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

/// Finalizer that holds a deleted EdgeNode until its edge has removed the pods (or is gone).
pub const FINALIZER: &str = "edgesync.io/edge-cleanup";
/// Annotation on each EdgeNode: the document heads (newest last) at which its document's pods
/// equalled the resource's, so a head with no history of its own (all heads replaced, state
/// dirs lost) finds a merge base in the history an edge or another head brings, rather than
/// starting a competing history that could win over an edge's offline edits.
pub const SYNCED_HEADS_ANNOTATION: &str = "edgesync.io/synced-heads";
/// How many synced heads the annotation keeps: an edge that missed fewer edits than this
/// still finds a common base.
const SYNCED_HEADS_KEPT: usize = 8;
/// How long a head waits, while the edge is connected, for history it never receives before
/// it merges the resource without a base.
const HISTORY_WAIT: Duration = Duration::from_secs(10);
/// How often status is compared and, if changed, written.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// `lastSyncedAt` alone is refreshed at most this often, so syncing never causes a write storm.
const SYNC_TIME_REFRESH: Duration = Duration::from_secs(60);

/// Errors setting up the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// Where it came from.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// The shared CA Secret could not be read, created or used.
    #[error("CA Secret {namespace}/{CA_SECRET}: {reason}")]
    CaSecret {
        /// Its namespace.
        namespace: String,
        /// Why.
        reason: String,
    },
}

/// Secret (type kubernetes.io/tls) holding the CA that every head of a cluster uses.
pub const CA_SECRET: &str = "edgesync-ca";

/// The CA all heads of the cluster share: the one in Secret `namespace/edgesync-ca`, or, when
/// there is none yet, this head's (created if need be) stored there, create-if-absent, so heads
/// starting together cannot end up with different CAs. Kept in `dir` as well; a different CA
/// already in `dir` is an error rather than something to overwrite.
pub async fn shared_ca(
    client: &kube::Client,
    namespace: &str,
    dir: &Path,
) -> Result<Ca, DaemonError> {
    let err = |reason: String| BridgeError::CaSecret {
        namespace: namespace.to_string(),
        reason,
    };
    let api_err = |e: kube::Error| match e {
        kube::Error::Api(s) if s.code == 404 => {
            err(format!("{} (see --cluster-namespace)", s.message))
        }
        kube::Error::Api(s) => err(s.message),
        e => err(e.to_string()),
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let local = Ca::load(dir)?;
    let found = secrets.get_opt(CA_SECRET).await.map_err(api_err)?;
    let ca = match found {
        Some(secret) => ca_of(&secret).map_err(err)?,
        None => {
            let ca = match &local {
                Some(ca) => Ca::from_pem(&ca.cert_pem, ca.key_pem())?,
                None => Ca::generate()?,
            };
            let data = [
                ("tls.crt", &ca.cert_pem),
                ("tls.key", &ca.key_pem().to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect();
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(CA_SECRET.into()),
                    labels: Some(
                        [("app.kubernetes.io/name".into(), "edgesync-head".into())].into(),
                    ),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Secret::default()
            };
            let params = post_params();
            match secrets.create(&params, &secret).await {
                Ok(_) => {
                    info!(secret = CA_SECRET, %namespace, "stored this head's CA for the other heads");
                    ca
                }
                // Another head was first: use its CA.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let secret = secrets.get(CA_SECRET).await.map_err(api_err)?;
                    ca_of(&secret).map_err(err)?
                }
                Err(e) => return Err(api_err(e).into()),
            }
        }
    };
    match local {
        Some(local) if local.hash() != ca.hash() => Err(err(format!(
            "differs from the CA in {} (ca.crt); edges that trust one would not trust the other. Move one of them away",
            dir.display()
        ))
        .into()),
        Some(_) => Ok(ca),
        None => {
            ca.save(dir)?;
            Ok(ca)
        }
    }
}

fn ca_of(secret: &Secret) -> Result<Ca, String> {
    let field = |name: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(name))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .ok_or_else(|| format!("has no {name}"))
    };
    Ca::from_pem(&field("tls.crt")?, &field("tls.key")?).map_err(|e| e.to_string())
}

/// The cluster the head works with.
#[derive(Clone)]
pub struct Cluster {
    /// Client with the head's own credentials.
    pub client: kube::Client,
    /// The API server's URL as the head reaches it.
    pub server: String,
    /// The CA the head trusts for it (PEM), if any.
    pub ca_pem: Option<String>,
}

/// The cluster: from `kubeconfig` if given, else `KUBECONFIG`, else the in-cluster service
/// account. None when none of those exists: the head runs standalone.
pub async fn cluster(kubeconfig: Option<&Path>) -> Result<Option<Cluster>, BridgeError> {
    let from_file = |path: String| async move {
        let err = |reason: String| BridgeError::Kubeconfig {
            path: path.clone(),
            reason,
        };
        let file = kube::config::Kubeconfig::read_from(&path).map_err(|e| err(e.to_string()))?;
        let options = kube::config::KubeConfigOptions::default();
        kube::Config::from_custom_kubeconfig(file, &options)
            .await
            .map_err(|e| err(e.to_string()))
    };
    let config = match (kubeconfig, std::env::var("KUBECONFIG")) {
        (Some(path), _) => from_file(path.display().to_string()).await?,
        (None, Ok(path)) if !path.is_empty() => from_file(path).await?,
        _ if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => kube::Config::incluster()
            .map_err(|e| BridgeError::Kubeconfig {
                path: "(in-cluster service account)".into(),
                reason: e.to_string(),
            })?,
        _ => return Ok(None),
    };
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let ca_pem = config.root_cert.as_ref().map(|certs| {
        certs
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect::<String>()
    });
    let client = kube::Client::try_from(config).map_err(|e| BridgeError::Kubeconfig {
        path: kubeconfig.map_or("(KUBECONFIG)".into(), |p| p.display().to_string()),
        reason: e.to_string(),
    })?;
    Ok(Some(Cluster {
        client,
        server,
        ca_pem,
    }))
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// What the bridge remembers per EdgeNode.
#[derive(Default)]
struct Seen {
    /// Pods as last seen in (or written to) the resource: the base of three-way merges.
    /// Persisted, so a restarted head still tells edge edits from user edits.
    base: BTreeMap<String, Value>,
    /// resourceVersion of the resource as last seen, for conflict-checked write-back.
    version: BTreeMap<String, String>,
    /// Why a resource's spec was refused (shown as Valid=False).
    invalid: BTreeMap<String, String>,
    /// Status last written, without lastSyncedAt, and when lastSyncedAt was last written.
    status: BTreeMap<String, (Value, Instant)>,
    /// Resources being deleted whose finalizer waits for the edge.
    deleting: BTreeSet<String>,
    /// Edits that lost to a concurrent one, shown as the Conflict condition until the user
    /// next changes the resource.
    conflicts: BTreeMap<String, BTreeSet<String>>,
    /// The synced-heads annotation of each resource as last seen or written.
    synced: BTreeMap<String, Vec<Vec<String>>>,
    /// Resources whose document history has not reached this head yet, and since when their
    /// edge has been connected here while waiting.
    awaiting: BTreeMap<String, (DynamicObject, Option<Instant>)>,
}

impl Seen {
    fn note_conflicts(&mut self, key: &str, found: impl IntoIterator<Item = String>) {
        let mut found = found.into_iter().peekable();
        if found.peek().is_some() {
            self.conflicts
                .entry(key.to_string())
                .or_default()
                .extend(found);
        }
    }
}

/// The running bridge.
#[derive(Clone)]
pub struct Bridge {
    client: kube::Client,
    cluster: ClusterView,
    resource: ApiResource,
    node: Node,
    edges: Edges,
    seen: Arc<Mutex<Seen>>,
    /// Namespaces watched; None for all.
    namespaces: Option<BTreeSet<String>>,
    /// Whether this head holds the writer Lease; only the writer writes to the API server.
    leading: watch::Receiver<bool>,
    /// Held while a watch event is merged in, and while writing back: the write-back must not
    /// see a document the watcher changed before the watcher has recorded the new base.
    turn: Arc<tokio::sync::Mutex<()>>,
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
    /// Loads the remembered bases and starts watching and writing back as daemon tasks.
    pub async fn start(
        client: kube::Client,
        node: Node,
        edges: Edges,
        namespaces: &[String],
        leading: watch::Receiver<bool>,
        tasks: &mut Tasks,
    ) -> Result<(), NodeError> {
        let mut seen = Seen::default();
        for key in node.keys() {
            if let Some(bytes) = node.store().meta(base_key(&key)).await?
                && let Ok(base) = serde_json::from_slice(&bytes)
            {
                seen.base.insert(key, base);
            }
        }
        let bridge = Bridge {
            cluster: ClusterView::start(&client, tasks),
            client,
            resource: ApiResource::erase::<EdgeNode>(&()),
            node,
            edges,
            seen: Arc::new(Mutex::new(seen)),
            turn: Arc::default(),
            namespaces: (!namespaces.is_empty()).then(|| namespaces.iter().cloned().collect()),
            leading,
        };
        tasks.spawn(bridge.clone().watch(tasks.token()));
        tasks.spawn(bridge.clone().write_back(tasks.token()));
        tasks.spawn(bridge.status_loop(tasks.token()));
        Ok(())
    }

    /// Whether this head holds the writer Lease now; checked before every write.
    fn writing(&self) -> bool {
        *self.leading.borrow()
    }

    /// Whether document `key` is an EdgeNode in a namespace this bridge keeps in the cluster.
    fn in_scope(&self, key: &str) -> bool {
        let Some((namespace, _)) = key.split_once('/') else {
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

    /// Watches EdgeNodes in every namespace; a relist (restart, 410 Gone) is handled like any
    /// other event, and resources missing from a relist count as deleted.
    /// While another head writes, only follows (see [`Bridge::follow`]); on becoming the writer it
    /// relists, so every resource is merged afresh.
    async fn watch(self, shutdown: CancellationToken) {
        let mut leading = self.leading.clone();
        loop {
            let writer = *leading.borrow_and_update();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = leading.changed() => {}
                _ = self.watch_as(writer) => return,
            }
            if writer {
                lock(&self.seen).status.clear();
            }
        }
    }

    async fn watch_as(&self, writer: bool) {
        match &self.namespaces {
            None => self.watch_scope(writer, None).await,
            Some(namespaces) => {
                let scopes = namespaces
                    .iter()
                    .map(|ns| self.watch_scope(writer, Some(ns)));
                futures_util::future::join_all(scopes).await;
            }
        }
    }

    /// Watches one namespace, or all of them.
    async fn watch_scope(&self, writer: bool, namespace: Option<&str>) {
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &self.resource),
            None => Api::all_with(self.client.clone(), &self.resource),
        };
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        tokio::pin!(stream);
        let mut relisted: Option<BTreeSet<String>> = None;
        while let Some(event) = stream.next().await {
            let _turn = self.turn.lock().await;
            if !writer {
                match event {
                    Ok(watcher::Event::InitApply(object) | watcher::Event::Apply(object)) => {
                        self.follow(object).await
                    }
                    Err(e) => warn!(error = %e, "EdgeNode watch failed; retrying"),
                    Ok(_) => {}
                }
                continue;
            }
            match event {
                Ok(watcher::Event::Init) => relisted = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(object)) => {
                    if let (Some(set), Some(key)) = (relisted.as_mut(), key_of(&object)) {
                        set.insert(key);
                    }
                    self.on_resource(object).await;
                }
                Ok(watcher::Event::InitDone) => {
                    let listed = relisted.take().unwrap_or_default();
                    let known: Vec<String> = lock(&self.seen).base.keys().cloned().collect();
                    let in_scope = |k: &String| {
                        namespace.is_none_or(|ns| k.split_once('/').is_some_and(|(n, _)| n == ns))
                    };
                    for key in known
                        .into_iter()
                        .filter(|k| in_scope(k) && !listed.contains(k))
                    {
                        self.on_deleted(&key).await;
                    }
                    // Documents made elsewhere (on an edge, or while another head wrote) that
                    // have no resource yet get one.
                    let made_elsewhere: Vec<String> = self
                        .node
                        .keys()
                        .into_iter()
                        .filter(|k| self.in_scope(k) && in_scope(k) && !listed.contains(k))
                        .collect();
                    for key in made_elsewhere {
                        self.write_spec(&key).await;
                    }
                }
                Ok(watcher::Event::Apply(object)) => self.on_resource(object).await,
                Ok(watcher::Event::Delete(object)) => {
                    if let Some(key) = key_of(&object) {
                        self.on_deleted(&key).await;
                    }
                }
                Err(e) => warn!(error = %e, "EdgeNode watch failed; retrying"),
            }
        }
    }

    /// On a head that is not the writer: records the resource's pods as the merge base when the
    /// document (kept up to date by the writer through head-to-head sync) holds exactly them,
    /// so a takeover starts from a base that both sides had.
    async fn follow(&self, object: DynamicObject) {
        let Some(key) = key_of(&object) else {
            return;
        };
        let json = serde_json::to_value(&object).unwrap_or_default();
        let rules = self.node.rules().clone();
        let Ok(desired) = input::parse_edgenode(&json, &format!("EdgeNode {key}"), &rules) else {
            return;
        };
        if let Some(version) = &object.metadata.resource_version {
            lock(&self.seen)
                .version
                .insert(key.clone(), version.clone());
        }
        let theirs = pods_value(&desired.pods);
        let agreed = matches!(self.node.view(&key).await,
            Ok(Some((view, _))) if !view.deleted && pods_value(&view.pods) == theirs);
        if agreed && lock(&self.seen).base.get(&key) != Some(&theirs) {
            self.remember(&key, Some(theirs)).await;
        }
    }

    /// A resource was created or changed: merge what the user changed into the document.
    async fn on_resource(&self, object: DynamicObject) {
        let Some(key) = key_of(&object) else {
            return;
        };
        let finalizers = object.metadata.finalizers.clone().unwrap_or_default();
        let has_finalizer = finalizers.iter().any(|f| f == FINALIZER);
        if object.metadata.deletion_timestamp.is_some() {
            if !has_finalizer {
                return self.on_deleted(&key).await;
            }
            match self.node.delete(&key).await {
                Ok(()) => {
                    info!(doc = %key, "EdgeNode deleted; waiting for the edge to remove its pods")
                }
                Err(NodeError::NotFound(_)) => {}
                Err(e) => return warn!(doc = %key, error = %e, "cannot delete the document"),
            }
            lock(&self.seen).deleting.insert(key);
            return;
        }
        if !has_finalizer {
            let mut finalizers = finalizers;
            finalizers.push(FINALIZER.into());
            let version = object.metadata.resource_version.clone();
            // The watcher brings the new version back; the spec is merged now all the same.
            self.set_finalizers(&key, finalizers, version).await;
        }
        if let Some(version) = &object.metadata.resource_version {
            lock(&self.seen)
                .version
                .insert(key.clone(), version.clone());
        }
        let json = serde_json::to_value(&object).unwrap_or_default();
        let rules = self.node.rules().clone();
        let desired = match input::parse_edgenode(&json, &format!("EdgeNode {key}"), &rules) {
            Ok(desired) => {
                lock(&self.seen).invalid.remove(&key);
                desired
            }
            Err(e) => {
                warn!(doc = %key, error = %e, "EdgeNode refused");
                lock(&self.seen).invalid.insert(key, e.to_string());
                return;
            }
        };
        let theirs = pods_value(&desired.pods);
        let synced = synced_heads(&object);
        lock(&self.seen).synced.insert(key.clone(), synced.clone());
        let mut base = lock(&self.seen).base.get(&key).cloned();
        if base.is_none() && !synced.is_empty() {
            // How long its edge has been connected here while this head waited.
            let edge = object.metadata.name.clone().unwrap_or_default();
            let waiting = lock(&self.seen).awaiting.get(&key).map(|(_, at)| *at);
            let since = match self.node.is_connected(&edge) {
                true => Some(waiting.flatten().unwrap_or_else(Instant::now)),
                false => None,
            };
            match self.history_base(&key, &synced, since).await {
                Some(found) => base = found,
                None => {
                    if waiting.is_none() {
                        info!(doc = %key, "waiting for the document's history from its edge or another head before merging the resource");
                    }
                    lock(&self.seen).awaiting.insert(key, (object, since));
                    return;
                }
            }
        }
        lock(&self.seen).awaiting.remove(&key);
        if base.as_ref() != Some(&theirs) {
            // The user changed the resource: they have seen what was kept.
            lock(&self.seen).conflicts.remove(&key);
        }
        let ours = match self.node.view(&key).await {
            Ok(Some((view, _))) if !view.deleted && view.generation > 0 => {
                lock(&self.seen).note_conflicts(&key, view.conflicts);
                Some(pods_value(&view.pods))
            }
            _ => None,
        };
        let mut lost = Vec::new();
        let Some(merged) = merge3_noting(
            base.as_ref(),
            ours.as_ref(),
            Some(&theirs),
            "spec.pods",
            &mut lost,
        ) else {
            // Deleted elsewhere (on an edge) and unchanged here: the resource goes too.
            return self.write_spec(&key).await;
        };
        if !lost.is_empty() {
            warn!(doc = %key, lost = ?lost, "an edit from an edge lost to the user's");
        }
        lock(&self.seen).note_conflicts(&key, lost);
        let mut merged_node = desired.clone();
        merged_node.pods = merged
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let changed = match self.node.apply_node(&merged_node).await {
            Ok(outcome) => {
                debug!(doc = %key, result = %outcome.result, "EdgeNode applied");
                outcome.result != "unchanged"
            }
            Err(e) => {
                warn!(doc = %key, error = %e, "EdgeNode not applied");
                return;
            }
        };
        self.remember(&key, Some(theirs.clone())).await;
        if merged != theirs {
            self.write_spec(&key).await;
        } else if (changed || synced.is_empty()) && has_finalizer {
            // Once per change the user made, not on every status report; after adding the
            // finalizer, the event of that write does it.
            self.annotate(&key, &theirs, object.metadata.resource_version.clone())
                .await;
        }
    }

    /// The merge base for a resource this head has no base of: the document as it was at the
    /// newest synced heads it holds. Some(None) when no such history will come — there is no
    /// such edge, or it has been connected for a while and sent none: merged without a base.
    /// None while the history may still arrive.
    async fn history_base(
        &self,
        key: &str,
        synced: &[Vec<String>],
        connected_since: Option<Instant>,
    ) -> Option<Option<Value>> {
        for entry in synced.iter().rev() {
            let Some(heads) = parse_heads(entry) else {
                continue;
            };
            if let Ok(Some(view)) = self.node.view_at_heads(key, &heads).await {
                debug!(doc = key, "merge base found in the document's history");
                return Some(Some(pods_value(&view.pods)));
            }
        }
        let edge = key.split_once('/').map_or(key, |(_, name)| name);
        let waited = connected_since.is_some_and(|at| at.elapsed() >= HISTORY_WAIT);
        if self.edges.is_registered(edge).await && !waited {
            return None;
        }
        warn!(
            doc = key,
            "no history shared with the resource reached this head; merging without a base"
        );
        Some(None)
    }

    /// Records in the resource (still at `version`) the document heads at which its pods equal
    /// `pods`, for a head that will have no base of its own.
    async fn annotate(&self, key: &str, pods: &Value, version: Option<String>) {
        if !self.writing() {
            return;
        }
        let Some((namespace, name)) = key.split_once('/') else {
            return;
        };
        let Ok(Some((view, heads))) = self.node.view_at(key).await else {
            return;
        };
        if pods_value(&view.pods) != *pods {
            return;
        }
        let current = lock(&self.seen)
            .synced
            .get(key)
            .cloned()
            .unwrap_or_default();
        let Some(list) = with_synced(&current, &heads) else {
            return;
        };
        let text = serde_json::to_string(&list).unwrap_or_default();
        let patch = json!({"metadata": {
            "resourceVersion": version,
            "annotations": {SYNCED_HEADS_ANNOTATION: text},
        }});
        let params = patch_params();
        match self
            .api(namespace)
            .patch(name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                lock(&self.seen).synced.insert(key.to_string(), list);
            }
            // Changed meanwhile: the next event annotates.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => warn!(doc = key, error = %e, "cannot record the synced heads"),
        }
    }

    /// Merges again the resources that were waiting for their document's history.
    async fn retry_awaiting(&self, keys: impl IntoIterator<Item = String>) {
        for key in keys {
            let waiting = lock(&self.seen).awaiting.get(&key).map(|(o, _)| o.clone());
            if let Some(object) = waiting {
                self.on_resource(object).await;
            }
        }
    }

    /// Replaces the resource's finalizers, provided it is still at `version`.
    async fn set_finalizers(&self, key: &str, finalizers: Vec<String>, version: Option<String>) {
        if !self.writing() {
            return;
        }
        let Some((namespace, name)) = key.split_once('/') else {
            return;
        };
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": version}});
        let params = patch_params();
        match self
            .api(namespace)
            .patch(name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // Changed or gone meanwhile: the watcher brings the news and we try again then.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => warn!(doc = key, error = %e, "cannot update the finalizers"),
        }
    }

    /// Lets a deleted resource go once its edge has applied the deletion (its report names
    /// the deletion's generation) or is no longer a registered node.
    async fn release(&self, key: &str) {
        if !self.writing() {
            return;
        }
        let Some((namespace, name)) = key.split_once('/') else {
            return;
        };
        let told = match self.node.view(key).await {
            Ok(Some((view, _))) => {
                view.deleted && view.observed_generation == Some(view.generation)
            }
            Ok(None) => true,
            Err(_) => false,
        };
        let gone = !self.edges.is_registered(name).await;
        if !(told || gone) {
            return;
        }
        let object = match self.api(namespace).get_opt(name).await {
            Ok(Some(object)) => object,
            Ok(None) => return self.on_deleted(key).await,
            Err(e) => return warn!(doc = key, error = %e, "cannot read the resource"),
        };
        let finalizers: Vec<String> = object
            .metadata
            .finalizers
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f != FINALIZER)
            .collect();
        info!(
            doc = key,
            edge = if told {
                "removed the pods"
            } else {
                "is not registered"
            },
            "releasing the deleted EdgeNode"
        );
        self.set_finalizers(key, finalizers, object.metadata.resource_version)
            .await;
    }

    async fn on_deleted(&self, key: &str) {
        match self.node.delete(key).await {
            Ok(()) => info!(doc = key, "EdgeNode deleted; the edge removes its pods"),
            Err(NodeError::NotFound(_)) => {}
            Err(e) => warn!(doc = key, error = %e, "cannot delete the document"),
        }
        self.remember(key, None).await;
        let mut seen = lock(&self.seen);
        seen.version.remove(key);
        seen.status.remove(key);
        seen.invalid.remove(key);
        seen.deleting.remove(key);
        seen.conflicts.remove(key);
        seen.synced.remove(key);
        seen.awaiting.remove(key);
    }

    /// Writes spec changes that came from edges (or `edgesync apply`) back to the resources.
    async fn write_back(self, shutdown: CancellationToken) {
        let mut changes = self.node.subscribe();
        loop {
            let mut keys = BTreeSet::new();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = changes.recv() => match changed {
                    Ok(key) => { keys.insert(key); }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => keys.extend(self.node.keys()),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
            while let Ok(key) = changes.try_recv() {
                keys.insert(key);
            }
            keys.retain(|k| self.in_scope(k));
            if !*self.leading.borrow() {
                continue;
            }
            let _turn = self.turn.lock().await;
            let (waiting, ready): (Vec<String>, Vec<String>) = {
                let seen = lock(&self.seen);
                keys.into_iter()
                    .partition(|k| seen.awaiting.contains_key(k))
            };
            self.retry_awaiting(waiting).await;
            for key in ready {
                self.write_spec(&key).await;
            }
        }
    }

    /// Makes the resource's spec equal to the document's, if they differ; creates the resource
    /// for a document made elsewhere and deletes it for one deleted elsewhere.
    async fn write_spec(&self, key: &str) {
        if !self.writing() {
            return;
        }
        let Some((namespace, name)) = key.split_once('/') else {
            return;
        };
        let Ok(Some((view, heads))) = self.node.view_at(key).await else {
            return;
        };
        lock(&self.seen).note_conflicts(key, view.conflicts.clone());
        let base = lock(&self.seen).base.get(key).cloned();
        let current = lock(&self.seen)
            .synced
            .get(key)
            .cloned()
            .unwrap_or_default();
        let synced = with_synced(&current, &heads).unwrap_or(current);
        let annotations = json!({
            SYNCED_HEADS_ANNOTATION: serde_json::to_string(&synced).unwrap_or_default()
        });
        let api = self.api(namespace);
        if view.deleted || view.generation == 0 {
            if base.is_some() {
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => info!(doc = key, "EdgeNode deleted from an edge; resource deleted"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    // The base stays, so the next relist or change tries again.
                    Err(e) => return warn!(doc = key, error = %e, "cannot delete the resource"),
                }
                self.remember(key, None).await;
            }
            return;
        }
        let pods = pods_value(&view.pods);
        if base.as_ref() == Some(&pods) {
            return;
        }
        let list: Vec<Value> = view.pods.values().cloned().collect();
        let result = match base {
            None => {
                let mut object = DynamicObject::new(name, &self.resource).within(namespace);
                object.data = json!({"spec": {"pods": list}});
                object.metadata.finalizers = Some(vec![FINALIZER.into()]);
                object.metadata.annotations = serde_json::from_value(annotations).ok();
                if !view.labels.is_empty() {
                    object.metadata.labels = Some(view.labels.clone());
                }
                let params = post_params();
                api.create(&params, &object).await.map(drop)
            }
            Some(_) => {
                let Some(version) = lock(&self.seen).version.get(key).cloned() else {
                    // Not seen yet (the relist is still coming): never write unconditionally.
                    return debug!(doc = key, "write-back waits for the resource's version");
                };
                let patch = json!({
                    "metadata": {"resourceVersion": version, "annotations": annotations},
                    "spec": {"pods": list},
                });
                let params = patch_params();
                api.patch(name, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop)
            }
        };
        match result {
            Ok(()) => {
                info!(
                    doc = key,
                    "spec edited on an edge written back to the EdgeNode"
                );
                lock(&self.seen).synced.insert(key.to_string(), synced);
                self.remember(key, Some(pods)).await;
            }
            // The user changed it meanwhile: the watcher merges that in, then we write again.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                debug!(doc = key, "write-back raced a user edit")
            }
            Err(e) => warn!(doc = key, error = %e, "cannot write the spec back"),
        }
    }

    /// Writes each EdgeNode's status when it changed, at most once per interval per object.
    async fn status_loop(self, shutdown: CancellationToken) {
        // Nothing is written before the caches are filled, so the phase does not flap.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { tokio::join!(self.cluster.ready(), self.edges.ready()) } => {}
        }
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !*self.leading.borrow() {
                continue;
            }
            let keys: BTreeSet<String> = {
                let seen = lock(&self.seen);
                seen.base
                    .keys()
                    .chain(seen.invalid.keys())
                    .cloned()
                    .collect()
            };
            for key in keys {
                self.write_status(&key).await;
            }
            let deleting: Vec<String> = lock(&self.seen).deleting.iter().cloned().collect();
            for key in deleting {
                self.release(&key).await;
            }
            let waiting: Vec<String> = lock(&self.seen).awaiting.keys().cloned().collect();
            if !waiting.is_empty() {
                let _turn = self.turn.lock().await;
                self.retry_awaiting(waiting).await;
            }
        }
    }

    async fn write_status(&self, key: &str) {
        if !self.writing() {
            return;
        }
        let Some((namespace, name)) = key.split_once('/') else {
            return;
        };
        let refused = lock(&self.seen).invalid.get(key).cloned();
        let mut status = match self.node.edgenode(key).await {
            Ok(Some(object)) => {
                let mut status = object.status.unwrap_or_default();
                with_cluster(&mut status, self.cluster.node_ready(name), |pod| {
                    self.cluster.mirror_phase(namespace, pod, name)
                });
                serde_json::to_value(status).unwrap_or_default()
            }
            // Refused before any document existed: say so rather than nothing.
            Ok(None) if refused.is_some() => json!({"phase": "Pending", "conditions": []}),
            _ => return,
        };
        let conflicts = lock(&self.seen).conflicts.get(key).cloned();
        if let Some(conflicts) = conflicts
            && let Some(conditions) = status["conditions"].as_array_mut()
        {
            conditions.retain(|c| c["type"] != "Conflict");
            let message: Vec<String> = conflicts.into_iter().collect();
            conditions.push(json!({
                "type": "Conflict",
                "status": "True",
                "reason": "ConcurrentEdits",
                "message": message.join("; "),
            }));
        }
        if let Some(reason) = refused
            && let Some(conditions) = status["conditions"].as_array_mut()
        {
            conditions.retain(|c| c["type"] != "Valid");
            conditions.push(json!({
                "type": "Valid",
                "status": "False",
                "reason": "SpecRefused",
                "message": reason,
            }));
        }
        let mut comparable = status.clone();
        if let Some(map) = comparable.as_object_mut() {
            map.remove("lastSyncedAt");
        }
        let due = match lock(&self.seen).status.get(key) {
            Some((last, at)) => *last != comparable || at.elapsed() >= SYNC_TIME_REFRESH,
            None => true,
        };
        if !due {
            return;
        }
        let params = patch_params();
        let patch = json!({"status": status});
        match self
            .api(namespace)
            .patch_status(name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                lock(&self.seen)
                    .status
                    .insert(key.to_string(), (comparable, Instant::now()));
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => warn!(doc = key, error = %e, "cannot write status"),
        }
    }
}

/// What the cluster shows about the edges: their Node objects and the mirror pods the kubelets
/// create for the manifests, kept in caches by reflectors.
#[derive(Clone)]
struct ClusterView {
    nodes: Cache<KubeNode>,
    mirrors: Cache<Pod>,
}

impl ClusterView {
    fn start(client: &kube::Client, tasks: &mut Tasks) -> ClusterView {
        let selector = format!("{MANAGED_LABEL}=true");
        ClusterView {
            nodes: cache(Api::all(client.clone()), watcher::Config::default(), tasks),
            mirrors: cache(
                Api::all(client.clone()),
                watcher::Config::default().labels(&selector),
                tasks,
            ),
        }
    }

    async fn ready(&self) {
        let _ = tokio::join!(
            self.nodes.wait_until_ready(),
            self.mirrors.wait_until_ready()
        );
    }

    /// The Node's Ready condition; None when the cluster has no Node of that name.
    fn node_ready(&self, name: &str) -> Option<bool> {
        let node = self.nodes.get(&ObjectRef::new(name))?;
        let conditions = node.status.as_ref()?.conditions.as_ref();
        Some(conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")))
    }

    /// Phase of the mirror pod `<pod>-<node>` the kubelet of `node` made for a manifest.
    fn mirror_phase(&self, namespace: &str, pod: &str, node: &str) -> Option<String> {
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

/// A reflector's cache of `api`, kept up to date by a daemon task.
fn cache<K>(api: Api<K>, config: watcher::Config, tasks: &mut Tasks) -> Cache<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let shutdown = tasks.token();
    tasks.spawn(async move {
        tokio::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => match event {
                    None => return,
                    Some(Err(e)) => warn!(kind = K::kind(&()).as_ref(), error = %e, "watch failed; retrying"),
                    Some(Ok(_)) => {}
                },
            }
        }
    });
    reader
}

/// Folds what the cluster shows into the status the edge reported: with a Node of the edge's
/// name, the edge is Running only when every mirror pod is Running, and Offline when the Node
/// is not Ready. Without one (a kubelet not registered with this cluster) the report stands.
fn with_cluster(
    status: &mut EdgeNodeStatus,
    node_ready: Option<bool>,
    mirror_phase: impl Fn(&str) -> Option<String>,
) {
    let Some(ready) = node_ready else {
        return;
    };
    for pod in &mut status.pods {
        pod.phase = Some(mirror_phase(&pod.name).unwrap_or_else(|| "Missing".into()));
    }
    let phase_of = |p: &crate::crd::PodState| p.phase.clone().unwrap_or_default();
    let running = status
        .pods
        .iter()
        .filter(|p| phase_of(p) == "Running")
        .count();
    status.pods_ready = Some(format!("{running}/{}", status.pods.len()));
    if !ready {
        status.phase = Some(Phase::Offline);
        status.online = Some(false);
        for c in status.conditions.iter_mut().filter(|c| c.type_ == "Online") {
            *c = Condition::new("Online", false, "NodeNotReady", "the Node is not Ready");
        }
        return;
    }
    if status.phase == Some(Phase::Running) {
        let failed = status
            .pods
            .iter()
            .any(|p| !matches!(phase_of(p).as_str(), "Running" | "Pending" | "Missing"));
        if failed {
            status.phase = Some(Phase::Degraded);
        } else if running < status.pods.len() {
            status.phase = Some(Phase::Pending);
        }
    }
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

/// `list` with `heads` as its newest entry, at most [`SYNCED_HEADS_KEPT`] long; None when
/// `heads` is the newest entry already.
fn with_synced(list: &[Vec<String>], heads: &[automerge::ChangeHash]) -> Option<Vec<Vec<String>>> {
    let entry: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
    if entry.is_empty() || list.last() == Some(&entry) {
        return None;
    }
    let mut list = list.to_vec();
    list.push(entry);
    let excess = list.len().saturating_sub(SYNCED_HEADS_KEPT);
    list.drain(..excess);
    Some(list)
}

/// The hashes of one synced-heads entry; None if any does not parse.
fn parse_heads(entry: &[String]) -> Option<Vec<automerge::ChangeHash>> {
    entry.iter().map(|h| h.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(byte: u8) -> automerge::ChangeHash {
        automerge::ChangeHash([byte; 32])
    }

    #[test]
    fn synced_heads_keep_the_newest_entries_and_skip_a_repeat() {
        let mut list: Vec<Vec<String>> = Vec::new();
        for byte in 0..10u8 {
            list = with_synced(&list, &[hash(byte), hash(byte + 100)]).unwrap();
        }
        assert_eq!(list.len(), SYNCED_HEADS_KEPT);
        let newest = parse_heads(list.last().unwrap()).unwrap();
        assert_eq!(newest, [hash(9), hash(109)]);
        assert_eq!(parse_heads(&list[0]).unwrap()[0], hash(2));
        assert!(with_synced(&list, &[hash(9), hash(109)]).is_none());
        assert!(with_synced(&list, &[]).is_none());
        assert!(parse_heads(&["not a hash".to_string()]).is_none());
    }

    #[test]
    fn the_annotation_is_read_from_the_resource() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "edgesync.io/v1alpha1", "kind": "EdgeNode",
            "metadata": {"name": "edge01", "namespace": "default", "annotations": {
                SYNCED_HEADS_ANNOTATION: serde_json::to_string(&[[hash(1).to_string()]]).unwrap(),
            }},
        }))
        .unwrap();
        assert_eq!(synced_heads(&object), [[hash(1).to_string()]]);
        let bare: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "edgesync.io/v1alpha1", "kind": "EdgeNode",
            "metadata": {"name": "edge01", "namespace": "default"},
        }))
        .unwrap();
        assert!(synced_heads(&bare).is_empty());
    }
}
