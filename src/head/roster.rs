//! The heads' registry of edges and join tokens as a standalone head keeps it, and what every
//! head writes into it: a join or a token recorded here and for every head, an edge removed,
//! what another head wrote taken in, and each edge's presence (the head it is connected to,
//! where it is) written as its sessions start and end.

use crate::clock::unix_now;
use crate::daemon::Tasks;
use crate::node::{Node, NodeError, Origin};
use crate::registry::{self, Registration};
use crate::store::JoinedNode;
use crate::transport::tls::Role;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Starts writing edges' presence into the registry and taking in what other heads write.
pub fn start(node: &Node, tasks: &mut Tasks) {
    tasks.spawn(record_presence(node.clone(), tasks.token()));
    tasks.spawn(adopt_forever(node.clone(), tasks.token()));
}

/// Writes each edge's presence, address and version as its sessions start and end: all the
/// edges whose sessions changed since the last write go into one registry change (a
/// reconnect storm costs a few writes, not one per event). Each is written as the peer table
/// has it under the registry's lock, so a change handled late still leaves what is true.
async fn record_presence(node: Node, shutdown: CancellationToken) {
    let me = node.name().to_string();
    loop {
        let names = tokio::select! {
            _ = shutdown.cancelled() => return,
            names = node.peers().changes() => names,
        };
        let edit = |doc: &mut automerge::AutoCommit| {
            let table = node.peers().some(&names);
            let mut moved = false;
            for name in &names {
                let Some(peer) = table.get(name) else {
                    // Forgotten (removed): not here any more.
                    moved |= registry::set_presence(doc, name, None, &me)?;
                    continue;
                };
                if peer.role != Role::Edge {
                    continue;
                }
                let head = peer.connected.then_some(me.as_str());
                moved |= registry::set_presence(doc, name, head, &me)?;
                if let Some(address) = peer.reachable.filter(|_| peer.connected) {
                    moved |= registry::set_address(doc, name, address)?;
                }
                if let Some(version) = peer.version.as_deref().filter(|_| peer.connected) {
                    moved |= registry::set_version(doc, name, version)?;
                }
            }
            Ok(moved)
        };
        if let Err(e) = node.docs().edit_registry(edit).await {
            warn!(edges = names.len(), error = %e, "cannot record the edges' presence; will retry");
            node.peers().requeue(names);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Takes in the registry each time another head's change to it arrives.
async fn adopt_forever(node: Node, shutdown: CancellationToken) {
    let mut changes = node.docs().subscribe();
    loop {
        let adopt = tokio::select! {
            _ = shutdown.cancelled() => return,
            change = changes.recv() => match change {
                Ok(change) => change.key == registry::KEY && matches!(change.origin, Origin::Peer(_)),
                // Missed changes may hold another head's; with none connected, none came.
                Err(RecvError::Lagged(_)) => node.peers().any_head_connected(),
                Err(RecvError::Closed) => return,
            },
        };
        if adopt && let Err(e) = adopt_registry(&node).await {
            warn!(error = %e, "cannot take in the heads' registry");
        }
    }
}

/// Records the certificate just issued to edge `joined.name`, here and for every head.
pub async fn register_edge(node: &Node, joined: JoinedNode) -> Result<(), NodeError> {
    let registration = Registration {
        key: hex::encode(&joined.key_sha256),
        not_after: joined.cert_not_after,
        removed: false,
    };
    // Registry first: a concurrent adoption of the registry then writes the new key too.
    node.docs()
        .edit_registry(|doc| registry::set_registration(doc, &joined.name, &registration))
        .await?;
    node.store().add_node(joined, unix_now()).await?;
    Ok(())
}

/// Creates join token `id` here and for every head.
pub async fn register_token(
    node: &Node,
    id: &str,
    secret_hash: Vec<u8>,
    expires: i64,
) -> Result<(), NodeError> {
    let token = registry::Token {
        hash: hex::encode(&secret_hash),
        expires,
    };
    node.docs()
        .edit_registry(|doc| registry::set_token(doc, id, &token, unix_now()))
        .await?;
    node.store()
        .add_token(id.to_string(), secret_hash, expires, unix_now())
        .await?;
    Ok(())
}

/// Forgets edge `name` (`edgesync node remove`): its key is no longer let in and its live
/// sessions end. Returns whether it was known.
pub async fn remove_node(node: &Node, name: &str) -> Result<bool, NodeError> {
    let known = forget_edge(node, name).await?;
    let registered = node.docs().registry().await.nodes.get(name).cloned();
    if let Some(registration) = registered.filter(|r| !r.removed) {
        let removed = Registration {
            removed: true,
            ..registration
        };
        node.docs()
            .edit_registry(|doc| registry::set_registration(doc, name, &removed))
            .await?;
        return Ok(true);
    }
    Ok(known)
}

/// Ends edge `name`'s sessions and forgets what this node keeps of it, after it was removed
/// elsewhere (its Edge resource deleted).
pub async fn drop_edge(node: &Node, name: &str) {
    if let Err(e) = forget_edge(node, name).await {
        warn!(node = %name, error = %e, "cannot forget the removed edge");
    }
}

async fn forget_edge(node: &Node, name: &str) -> Result<bool, NodeError> {
    let known = node.store().remove_node(name.to_string()).await?;
    node.peers().forget(name);
    node.docs().forget_peer(name);
    Ok(known)
}

/// Makes this head's tables of edges and tokens match the registry after another head
/// changed it.
async fn adopt_registry(node: &Node) -> Result<(), NodeError> {
    let registry = node.docs().registry().await;
    let now = unix_now();
    for (id, token) in &registry.tokens {
        let Ok(hash) = hex::decode(&token.hash) else {
            continue;
        };
        if token.expires > now && node.store().token(id.clone()).await?.is_none() {
            node.store()
                .add_token(id.clone(), hash, token.expires, now)
                .await?;
        }
    }
    for (name, registration) in &registry.nodes {
        let stored = node.store().node(name.clone()).await?;
        if registration.removed {
            if stored.is_some() {
                forget_edge(node, name).await?;
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
                node.peers().end_sessions(name);
            }
            let joined = JoinedNode {
                name: name.clone(),
                key_sha256,
                cert_not_after: registration.not_after,
            };
            node.store().add_node(joined, unix_now()).await?;
        }
    }
    Ok(())
}
