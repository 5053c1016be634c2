//! Joined edges and join tokens: who may hold a session with a head, and where each edge is.
//! Standalone, they live in the head's database and the heads' registry document. With a
//! cluster they live in the Kubernetes API — an `Edge` resource per joined edge and a Secret
//! per join token (only the secret's hash) — read through a watch cache and read afresh before
//! anything is refused, so every head, also one started a second ago with an empty state dir,
//! lets in the same edges. Each head writes what it learns; presence is written coalesced.

use crate::clock::unix_now;
use crate::crd::edge::{Edge, EdgeSpec, EdgeStatus};
use crate::daemon::Tasks;
use crate::head::cluster::{patch_params, post_params};
use crate::head::lease::HeadLeases;
use crate::node::{Node, NodeError};
use crate::registry::{self, Registration, Registry};
use crate::store::{JoinedNode, StoreError};
use crate::transport::tls::Identity;
use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Label on every join token Secret.
pub const TOKEN_LABEL: &str = "edgesync.io/join-token";
/// Type of the join token Secrets.
pub const TOKEN_SECRET_TYPE: &str = "edgesync.io/join-token";
/// Finalizer that keeps a removed Edge until the writer head has deleted its DNS record.
pub const DNS_FINALIZER: &str = "edgesync.io/dns-record";
/// How often edge presence is compared with what the API shows and written if it differs.
const PRESENCE_INTERVAL: Duration = Duration::from_secs(1);
/// At most this many presence writes a second, so a thousand edges reconnecting at once are a
/// steady trickle, not a storm.
const PRESENCE_WRITES_PER_TICK: usize = 50;
/// A presence just written is not written again for this long while the cache catches up.
const PRESENCE_SETTLE: Duration = Duration::from_secs(5);

/// Name of the Secret holding join token `id`.
pub fn token_secret_name(id: &str) -> String {
    format!("{TOKEN_PREFIX}{id}")
}

/// Prefix of the join token Secrets' names.
const TOKEN_PREFIX: &str = "edgesync-token-";

/// A join token as listed: never its secret.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// The token's id (its public part).
    pub id: String,
    /// When it stops being accepted (unix seconds).
    pub expires_at: i64,
    /// When it was made (unix seconds; 0 if unknown).
    pub created_at: i64,
}

/// Why an edge may not hold a session, join or renew, or why the book of edges and join tokens
/// could not be read or written. The texts go to the edge (refusing its request) and the CLI.
#[derive(Debug, thiserror::Error)]
pub enum EdgesError {
    /// The edge's key is not the one last issued to its name: a newer join replaced it.
    #[error(
        "the certificate of {edge} was replaced by a newer join; this one is no longer accepted"
    )]
    Replaced {
        /// The edge's name.
        edge: String,
    },
    /// Nothing is registered under the edge's name.
    #[error(
        "{edge} is not a registered node (removed with `edgesync node remove`?); join again with a token"
    )]
    NotRegistered {
        /// The edge's name.
        edge: String,
    },
    /// A join with a token under a name whose certificate is still valid.
    #[error(
        "node {edge:?} has already joined and its certificate is valid; choose another \
         --node-name, or run `edgesync node remove {edge}` on the head to let it join again"
    )]
    AlreadyJoined {
        /// The edge's name.
        edge: String,
    },
    /// A renewal with a key no longer registered under the name.
    #[error("{edge} is not registered with this key any more; join again with a token")]
    KeyNotRegistered {
        /// The edge's name.
        edge: String,
    },
    /// The edge's Edge resource is being deleted.
    #[error("node {edge:?} is being removed; join again in a moment")]
    BeingRemoved {
        /// The edge's name.
        edge: String,
    },
    /// Another head changed the edge's Edge resource between read and write.
    #[error("node {edge:?} joined or was removed meanwhile through another head; try again")]
    Conflict {
        /// The edge's name.
        edge: String,
    },
    /// The edge's new certificate could not be recorded in its Edge resource.
    #[error("cannot record the node in the cluster: {}", api_message(.source))]
    NotRecorded {
        /// The edge's name.
        edge: String,
        /// The API's error.
        #[source]
        source: kube::Error,
    },
    /// The Kubernetes API refused or failed a read or write of an edge's Edge resource.
    #[error("{}", api_message(.source))]
    EdgeApi {
        /// The edge's name.
        edge: String,
        /// The API's error.
        #[source]
        source: kube::Error,
    },
    /// The Kubernetes API refused or failed a read or write of join token Secrets.
    #[error("{}", api_message(.source))]
    TokenApi {
        /// The token's id; None when all of them were listed.
        token: Option<String>,
        /// The API's error.
        #[source]
        source: kube::Error,
    },
    /// The head's database failed (standalone).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The heads' registry document could not be changed (standalone).
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl EdgesError {
    /// An API error about edge `edge`'s Edge resource.
    fn edge_api(edge: &str, source: kube::Error) -> EdgesError {
        EdgesError::EdgeApi {
            edge: edge.to_string(),
            source,
        }
    }

    /// An API error about join token `token`'s Secret (None: about all of them).
    fn token_api(token: Option<&str>, source: kube::Error) -> EdgesError {
        EdgesError::TokenApi {
            token: token.map(str::to_string),
            source,
        }
    }
}

/// What a head knows about one joined edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// SHA-256 of the public key let in under its name.
    pub key_sha256: Vec<u8>,
    /// When its certificate expires (unix seconds).
    pub not_after: i64,
}

/// What a join or renewal expects to find registered under the name.
pub enum Expect {
    /// A join with a token, presenting the key with this SHA-256: nothing registered, a
    /// registration whose certificate has expired, or this same key (the same join tried
    /// again, its answer lost on the way).
    Join(Vec<u8>),
    /// The key the renewing edge presented.
    Key(Vec<u8>),
}

/// The book of joined edges and join tokens; cheap to clone.
#[derive(Clone)]
pub struct Edges {
    node: Node,
    cluster: Option<Arc<InCluster>>,
    /// Fires when something DNS depends on changed.
    changed: Arc<Notify>,
}

struct InCluster {
    edges: Api<Edge>,
    secrets: Api<Secret>,
    cache: Cache<Edge>,
    recorder: Recorder,
    /// Presence last written, per edge, and when.
    written: Mutex<HashMap<String, (EdgeStatus, Instant)>>,
    /// The heads' own Leases: whether the head an edge is shown online through still runs.
    heads: Arc<HeadLeases>,
}

fn rfc3339(unix: i64) -> String {
    Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn unix_of(text: &str) -> i64 {
    text.parse::<Timestamp>().map_or(0, |t| t.as_second())
}

/// What the API server said, without the status around it; any other error as it displays.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        e => e.to_string(),
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The registration an Edge object holds; None while it is being deleted (removed).
fn registered_of(edge: &Edge) -> Option<Registered> {
    if edge.metadata.deletion_timestamp.is_some() {
        return None;
    }
    Some(Registered {
        key_sha256: hex::decode(&edge.spec.public_key_sha256).ok()?,
        not_after: unix_of(&edge.spec.certificate_not_after),
    })
}

/// Whether `peer` may hold a session, given what is registered under its name.
fn admission(peer: &Identity, registered: Option<&Registered>) -> Result<(), EdgesError> {
    let edge = peer.name.clone();
    match registered {
        Some(r) if r.key_sha256 == peer.key => Ok(()),
        Some(_) => Err(EdgesError::Replaced { edge }),
        None => Err(EdgesError::NotRegistered { edge }),
    }
}

impl Edges {
    /// The book of a standalone head: its database and the heads' registry document.
    pub fn standalone(node: Node, tasks: &mut Tasks) -> Edges {
        let edges = Edges {
            node,
            cluster: None,
            changed: Arc::default(),
        };
        tasks.spawn(edges.clone().forward_registry_changes(tasks.token()));
        edges
    }

    /// The book of a head with a cluster: Edge resources and token Secrets in `namespace`,
    /// watched from now on; presence of the edges connected here is written as it changes,
    /// and of those shown online through a head that stopped (its Lease unrenewed for
    /// `lease_duration`), cleared.
    pub fn in_cluster(
        node: Node,
        client: kube::Client,
        namespace: &str,
        identity: &str,
        lease_duration: Duration,
        tasks: &mut Tasks,
    ) -> Edges {
        let heads = HeadLeases::start(
            client.clone(),
            namespace,
            node.name(),
            identity,
            lease_duration,
            tasks,
        );
        let edges_api: Api<Edge> = Api::all(client.clone());
        let (cache, writer) = reflector::store();
        let reporter = Reporter {
            controller: crate::head::users::cluster::REPORTER.into(),
            instance: Some(identity.to_string()),
        };
        let cluster = Arc::new(InCluster {
            edges: edges_api.clone(),
            secrets: Api::namespaced(client.clone(), namespace),
            cache,
            recorder: Recorder::new(client, reporter),
            written: Mutex::default(),
            heads,
        });
        let edges = Edges {
            node,
            cluster: Some(cluster),
            changed: Arc::default(),
        };
        let stream = reflector::reflector(writer, watcher(edges_api, watcher::Config::default()))
            .default_backoff();
        tasks.spawn(edges.clone().follow(stream, tasks.token()));
        tasks.spawn(edges.clone().presence_loop(tasks.token()));
        edges
    }

    /// Waits until what the cluster holds has been read (at once when standalone).
    pub async fn ready(&self) {
        if let Some(c) = &self.cluster {
            let _ = c.cache.wait_until_ready().await;
        }
    }

    /// Wakes when something DNS records depend on changed.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    async fn forward_registry_changes(self, shutdown: CancellationToken) {
        let mut changes = self.node.docs().subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = changes.recv() => match changed {
                    Ok(change) if change.key != registry::KEY => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => self.changed.notify_one(),
                },
            }
        }
    }

    /// Keeps the watch cache filled; an Edge that goes (deleted, or being deleted) ends its
    /// sessions here at once.
    async fn follow(
        self,
        stream: impl futures_util::Stream<Item = Result<watcher::Event<Edge>, watcher::Error>>,
        shutdown: CancellationToken,
    ) {
        tokio::pin!(stream);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => match event {
                    None => return,
                    Some(event) => event,
                },
            };
            match event {
                Ok(watcher::Event::Apply(edge) | watcher::Event::InitApply(edge))
                    if registered_of(&edge).is_some() => {}
                Ok(
                    watcher::Event::Apply(edge)
                    | watcher::Event::InitApply(edge)
                    | watcher::Event::Delete(edge),
                ) => {
                    let name = edge.name_any();
                    if self.node.peers().is_connected(&name) {
                        info!(node = %name, "edge removed; its sessions end");
                    }
                    super::roster::drop_edge(&self.node, &name).await;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot watch the Edge resources; retrying"),
            }
            self.changed.notify_one();
        }
    }

    /// What is registered under `name`, read afresh from the cluster (or the database).
    pub async fn registered(&self, name: &str) -> Result<Option<Registered>, EdgesError> {
        match &self.cluster {
            None => {
                let stored = self.node.store().node(name.to_string()).await?;
                Ok(stored.map(|n| Registered {
                    key_sha256: n.key_sha256,
                    not_after: n.cert_not_after,
                }))
            }
            Some(c) => {
                let edge = c
                    .edges
                    .get_opt(name)
                    .await
                    .map_err(|e| EdgesError::edge_api(name, e))?;
                Ok(edge.as_ref().and_then(registered_of))
            }
        }
    }

    /// Whether edge `name` is registered as far as the watch cache knows (no API call).
    pub async fn is_registered(&self, name: &str) -> bool {
        match &self.cluster {
            None => matches!(self.node.store().node(name.to_string()).await, Ok(Some(_))),
            Some(c) => c
                .cache
                .get(&ObjectRef::new(name))
                .is_some_and(|e| registered_of(&e).is_some()),
        }
    }

    /// Whether `peer` may hold a sync session: heads always, an edge only with the key last
    /// issued to its name. The cache answers yes; a no is checked with a fresh read, so an
    /// edge that joined through another head a moment ago is let in.
    pub async fn admit(&self, peer: &Identity) -> Result<(), EdgesError> {
        if peer.role != crate::transport::tls::Role::Edge {
            return Ok(());
        }
        if let Some(c) = &self.cluster {
            let cached = c.cache.get(&ObjectRef::new(&peer.name));
            if admission(peer, cached.as_deref().and_then(registered_of).as_ref()).is_ok() {
                return Ok(());
            }
        }
        admission(peer, self.registered(&peer.name).await?.as_ref())
    }

    /// Records the certificate just issued to `joined.name`, provided what is registered is
    /// what `expect` says; from then on only its key is let in, on every head.
    pub async fn register(&self, joined: &JoinedNode, expect: Expect) -> Result<(), EdgesError> {
        let Some(c) = &self.cluster else {
            let current = self.registered(&joined.name).await?;
            check_expected(&joined.name, current.as_ref(), &expect)?;
            return Ok(super::roster::register_edge(&self.node, joined.clone()).await?);
        };
        let spec = EdgeSpec {
            public_key_sha256: hex::encode(&joined.key_sha256),
            certificate_not_after: rfc3339(joined.cert_not_after),
        };
        let params = post_params();
        let existing = c
            .edges
            .get_opt(&joined.name)
            .await
            .map_err(|e| EdgesError::edge_api(&joined.name, e))?;
        check_expected(
            &joined.name,
            existing.as_ref().and_then(registered_of).as_ref(),
            &expect,
        )?;
        let renewal = matches!(expect, Expect::Key(_));
        let written = match existing {
            Some(mut edge) if edge.metadata.deletion_timestamp.is_none() => {
                // Replaced only as read: a concurrent join or removal makes this one fail.
                edge.spec = spec;
                c.edges.replace(&joined.name, &params, &edge).await
            }
            Some(_) => {
                return Err(EdgesError::BeingRemoved {
                    edge: joined.name.clone(),
                });
            }
            None => {
                let mut edge = Edge::new(&joined.name, spec);
                edge.metadata.labels =
                    Some([("app.kubernetes.io/managed-by".into(), "edgesync".into())].into());
                c.edges.create(&params, &edge).await
            }
        };
        let edge = written.map_err(|source| match is_code(&source, 409) {
            true => EdgesError::Conflict {
                edge: joined.name.clone(),
            },
            false => EdgesError::NotRecorded {
                edge: joined.name.clone(),
                source,
            },
        })?;
        let (reason, note) = if renewal {
            ("CertificateRenewed", "certificate renewed with a fresh key")
        } else {
            ("Joined", "joined with a token")
        };
        self.record(&edge, EventType::Normal, reason, "Join", note)
            .await;
        Ok(())
    }

    /// Forgets edge `name` (`edgesync node remove`): its key is let in nowhere any more and its
    /// sessions end. Returns whether it was known.
    pub async fn remove(&self, name: &str, actor: &str) -> Result<bool, NodeError> {
        let Some(c) = &self.cluster else {
            return super::roster::remove_node(&self.node, name).await;
        };
        let known = match c.edges.get_opt(name).await {
            Ok(Some(edge)) => {
                let note = format!("removed by {actor}");
                self.record(&edge, EventType::Normal, "Removed", "Remove", &note)
                    .await;
                true
            }
            Ok(None) => false,
            Err(e) => return Err(cluster_error(e)),
        };
        match c.edges.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_code(&e, 404) => {}
            Err(e) => return Err(cluster_error(e)),
        }
        super::roster::drop_edge(&self.node, name).await;
        Ok(known)
    }

    /// Creates join token `id` (only the hash of its secret is kept) valid until `expires`.
    pub async fn add_token(
        &self,
        id: &str,
        secret_hash: Vec<u8>,
        expires: i64,
    ) -> Result<(), NodeError> {
        let Some(c) = &self.cluster else {
            return super::roster::register_token(&self.node, id, secret_hash, expires).await;
        };
        let data = [
            ("secret-sha256", hex::encode(&secret_hash)),
            ("expires-at", expires.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
        .collect();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(token_secret_name(id)),
                labels: Some(
                    [
                        (TOKEN_LABEL.to_string(), "true".to_string()),
                        ("app.kubernetes.io/name".into(), "edgesync-head".into()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some(TOKEN_SECRET_TYPE.into()),
            data: Some(data),
            ..Secret::default()
        };
        let params = post_params();
        c.secrets
            .create(&params, &secret)
            .await
            .map_err(cluster_error)?;
        self.forget_expired_tokens(c).await;
        Ok(())
    }

    async fn forget_expired_tokens(&self, c: &InCluster) {
        let listed = c
            .secrets
            .list(&ListParams::default().labels(&format!("{TOKEN_LABEL}=true")))
            .await;
        let Ok(listed) = listed else {
            return;
        };
        let now = unix_now();
        for secret in listed {
            if token_of(&secret).is_some_and(|(_, expires)| expires < now) {
                let name = secret.name_any();
                if let Err(e) = c.secrets.delete(&name, &DeleteParams::default()).await
                    && !is_code(&e, 404)
                {
                    warn!(secret = %name, error = %api_message(&e), "cannot delete an expired join token");
                }
            }
        }
    }

    /// The secret hash and expiry of join token `id`, if it exists.
    pub async fn token(&self, id: &str) -> Result<Option<(Vec<u8>, i64)>, EdgesError> {
        match &self.cluster {
            None => Ok(self.node.store().token(id.to_string()).await?),
            Some(c) => {
                let secret = c
                    .secrets
                    .get_opt(&token_secret_name(id))
                    .await
                    .map_err(|e| EdgesError::token_api(Some(id), e))?;
                Ok(secret.as_ref().and_then(token_of))
            }
        }
    }

    /// Every join token (never its secret): id, expiry and creation (unix seconds), newest
    /// first.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, EdgesError> {
        let mut tokens: Vec<TokenInfo> = match &self.cluster {
            None => self
                .node
                .store()
                .tokens()
                .await?
                .into_iter()
                .map(|(id, expires_at, created_at)| TokenInfo {
                    id,
                    expires_at,
                    created_at,
                })
                .collect(),
            Some(c) => c
                .secrets
                .list(&ListParams::default().labels(&format!("{TOKEN_LABEL}=true")))
                .await
                .map_err(|e| EdgesError::token_api(None, e))?
                .into_iter()
                .filter_map(|secret| {
                    let id = secret.name_any().strip_prefix(TOKEN_PREFIX)?.to_string();
                    let (_, expires_at) = token_of(&secret)?;
                    let created_at = secret
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map_or(0, |t| t.0.as_second());
                    Some(TokenInfo {
                        id,
                        expires_at,
                        created_at,
                    })
                })
                .collect(),
        };
        tokens.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        Ok(tokens)
    }

    /// Deletes join token `id`, so no edge can join with it any more; whether there was one.
    pub async fn delete_token(&self, id: &str) -> Result<bool, EdgesError> {
        match &self.cluster {
            None => Ok(self.node.store().delete_token(id.to_string()).await?),
            Some(c) => {
                match c
                    .secrets
                    .delete(&token_secret_name(id), &DeleteParams::default())
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if is_code(&e, 404) => Ok(false),
                    Err(e) => Err(EdgesError::token_api(Some(id), e)),
                }
            }
        }
    }

    /// What DNS records are made from: every registration (removed ones marked), each edge's
    /// reachable address and the record published for it.
    pub async fn dns_view(&self) -> Arc<Registry> {
        let Some(c) = &self.cluster else {
            return self.node.docs().registry().await;
        };
        let mut view = Registry::default();
        for edge in c.cache.state() {
            let name = edge.name_any();
            let status = edge.status.clone().unwrap_or_default();
            let registration = Registration {
                key: edge.spec.public_key_sha256.clone(),
                not_after: unix_of(&edge.spec.certificate_not_after),
                removed: edge.metadata.deletion_timestamp.is_some(),
            };
            view.nodes.insert(name.clone(), registration);
            if let Some(ip) = status.address.and_then(|a| a.parse().ok()) {
                view.addresses.insert(name.clone(), ip);
            }
            if let Some(ip) = status.dns_address.and_then(|a| a.parse().ok()) {
                view.dns.insert(name.clone(), ip);
            }
            if let Some(version) = status.version {
                view.versions.insert(name, version);
            }
        }
        Arc::new(view)
    }

    /// Records that edge `name`'s DNS record now holds `address` (None: there is none). With a
    /// cluster, an Edge with a record keeps a finalizer until the record is gone.
    pub async fn set_published(
        &self,
        name: &str,
        address: Option<IpAddr>,
    ) -> Result<(), EdgesError> {
        let Some(c) = &self.cluster else {
            let edit =
                |doc: &mut automerge::AutoCommit| registry::set_published(doc, name, address);
            return Ok(self.node.docs().edit_registry(edit).await?);
        };
        let params = patch_params();
        let Some(edge) = c
            .edges
            .get_opt(name)
            .await
            .map_err(|e| EdgesError::edge_api(name, e))?
        else {
            return Ok(());
        };
        let mut finalizers = edge.finalizers().to_vec();
        let has = finalizers.iter().any(|f| f == DNS_FINALIZER);
        if address.is_some() && !has {
            finalizers.push(DNS_FINALIZER.into());
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": edge.resource_version()}});
            c.edges
                .patch(name, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| EdgesError::edge_api(name, e))?;
        }
        let patch = json!({"status": {"dnsAddress": address.map(|a| a.to_string())}});
        match c
            .edges
            .patch_status(name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(e) if is_code(&e, 404) => return Ok(()),
            Err(e) => return Err(EdgesError::edge_api(name, e)),
        }
        if address.is_none() && has {
            finalizers.retain(|f| f != DNS_FINALIZER);
            let patch = json!({"metadata": {"finalizers": finalizers}});
            match c.edges.patch(name, &params, &Patch::Merge(&patch)).await {
                Ok(_) => {}
                Err(e) if is_code(&e, 404) => {}
                Err(e) => return Err(EdgesError::edge_api(name, e)),
            }
        }
        Ok(())
    }

    async fn record(&self, edge: &Edge, type_: EventType, reason: &str, action: &str, note: &str) {
        let Some(c) = &self.cluster else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = c.recorder.publish(&event, &edge.object_ref(&())).await {
            warn!(edge = %edge.name_any(), error = %api_message(&e), "cannot record an event");
        }
    }

    /// Writes the presence of the edges connected here (online, this head, address, when last
    /// seen) into their Edge status when it changes, at a bounded rate.
    async fn presence_loop(self, shutdown: CancellationToken) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = c.cache.wait_until_ready() => {}
        }
        let mut tick = tokio::time::interval(PRESENCE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let me = self.node.name().to_string();
            let registry = self.node.docs().registry().await;
            // The version each edge said in its Hello here.
            let said: HashMap<String, String> = self
                .node
                .peers()
                .list()
                .into_iter()
                .filter_map(|p| Some((p.name, p.version?)))
                .collect();
            let mut writes = 0;
            for edge in c.cache.state() {
                if writes >= PRESENCE_WRITES_PER_TICK {
                    break;
                }
                let name = edge.name_any();
                let seen = edge.status.clone().unwrap_or_default();
                let connected = self.node.peers().is_connected(&name);
                let wanted = match connected {
                    true => EdgeStatus {
                        online: Some(true),
                        head: Some(me.clone()),
                        address: registry
                            .addresses
                            .get(&name)
                            .map(|a| a.to_string())
                            .or(seen.address.clone()),
                        version: said.get(&name).cloned().or(seen.version.clone()),
                        ..seen.clone()
                    },
                    // It left this head, or the head it was with has stopped: say so,
                    // unless another head has it now.
                    false
                        if seen.online == Some(true)
                            && seen
                                .head
                                .as_deref()
                                .is_some_and(|head| head == me || c.heads.gone(head)) =>
                    {
                        EdgeStatus {
                            online: Some(false),
                            ..seen.clone()
                        }
                    }
                    false => continue,
                };
                let same = |a: &EdgeStatus, b: &EdgeStatus| {
                    (&a.online, &a.head, &a.address, &a.version)
                        == (&b.online, &b.head, &b.address, &b.version)
                };
                if same(&wanted, &seen) {
                    continue;
                }
                let recent = crate::node::lock(&c.written)
                    .get(&name)
                    .is_some_and(|(w, at)| same(w, &wanted) && at.elapsed() < PRESENCE_SETTLE);
                if recent || registered_of(&edge).is_none() {
                    continue;
                }
                writes += 1;
                let now = Timestamp::now().to_string();
                let patch = if connected {
                    Patch::Merge(json!({"status": {
                        "online": true, "head": me, "address": wanted.address, "lastSeen": now,
                        "version": wanted.version,
                    }}))
                } else {
                    // Only if the head it names still does: a head that took the edge
                    // over wins.
                    let ops = json!([
                        {"op": "test", "path": "/status/head", "value": seen.head},
                        {"op": "replace", "path": "/status/online", "value": false},
                        {"op": "add", "path": "/status/lastSeen", "value": now},
                    ]);
                    match serde_json::from_value(ops) {
                        Ok(ops) => Patch::Json(ops),
                        Err(_) => continue,
                    }
                };
                let params = patch_params();
                match c.edges.patch_status(&name, &params, &patch).await {
                    Ok(_) => {
                        crate::node::lock(&c.written).insert(name, (wanted, Instant::now()));
                    }
                    Err(e) if is_code(&e, 404) || is_code(&e, 422) || is_code(&e, 409) => {}
                    Err(e) => {
                        warn!(edge = %name, error = %api_message(&e), "cannot record the edge's presence")
                    }
                }
            }
            crate::node::lock(&c.written).retain(|_, (_, at)| at.elapsed() < PRESENCE_SETTLE);
        }
    }
}

/// Whether what is registered under `name` is what a join or renewal expects.
pub fn check_expected(
    name: &str,
    current: Option<&Registered>,
    expect: &Expect,
) -> Result<(), EdgesError> {
    let edge = name.to_string();
    match (expect, current) {
        (Expect::Join(key), Some(r)) if r.not_after > unix_now() && r.key_sha256 != *key => {
            Err(EdgesError::AlreadyJoined { edge })
        }
        (Expect::Join(_), _) => Ok(()),
        (Expect::Key(key), Some(r)) if r.key_sha256 == *key => Ok(()),
        (Expect::Key(_), _) => Err(EdgesError::KeyNotRegistered { edge }),
    }
}

/// The secret hash and expiry a join token Secret holds.
fn token_of(secret: &Secret) -> Option<(Vec<u8>, i64)> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
    let hash = hex::decode(text("secret-sha256")?).ok()?;
    let expires = text("expires-at")?.parse().ok()?;
    Some((hash, expires))
}

fn cluster_error(e: kube::Error) -> NodeError {
    NodeError::Cluster(api_message(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::Role;

    #[test]
    fn refusals_name_the_edge_and_say_what_to_do() {
        let peer = Identity {
            role: Role::Edge,
            name: "edge01".into(),
            key: vec![1],
        };
        let registered = |key: u8, not_after: i64| Registered {
            key_sha256: vec![key],
            not_after,
        };
        assert!(admission(&peer, Some(&registered(1, 0))).is_ok());
        assert_eq!(
            admission(&peer, Some(&registered(2, 0)))
                .unwrap_err()
                .to_string(),
            "the certificate of edge01 was replaced by a newer join; this one is no longer accepted"
        );
        assert_eq!(
            admission(&peer, None).unwrap_err().to_string(),
            "edge01 is not a registered node (removed with `edgesync node remove`?); join again \
             with a token"
        );
        let valid = registered(1, unix_now() + 3600);
        assert_eq!(
            check_expected("edge01", Some(&valid), &Expect::Join(vec![2]))
                .unwrap_err()
                .to_string(),
            "node \"edge01\" has already joined and its certificate is valid; choose another \
             --node-name, or run `edgesync node remove edge01` on the head to let it join again"
        );
        let expired = registered(1, unix_now() - 1);
        assert!(check_expected("edge01", Some(&expired), &Expect::Join(vec![2])).is_ok());
        assert!(check_expected("edge01", None, &Expect::Join(vec![2])).is_ok());
        // The same join again (its answer was lost): the key already let in.
        assert!(check_expected("edge01", Some(&valid), &Expect::Join(vec![1])).is_ok());
        assert!(check_expected("edge01", Some(&valid), &Expect::Key(vec![1])).is_ok());
        assert_eq!(
            check_expected("edge01", Some(&valid), &Expect::Key(vec![2]))
                .unwrap_err()
                .to_string(),
            "edge01 is not registered with this key any more; join again with a token"
        );
    }
}
