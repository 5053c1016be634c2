//! What a head reports of its fleet, as metrics an operator can alert on: whether each
//! registered edge is up, when it was last heard from, when its certificate expires, and how
//! many pods the edges refuse.

use crate::crd::POD_REFUSED;
use crate::head::edges::Edges;
use crate::metrics::EdgeLabels;
use crate::node::Node;
use k8s_openapi::jiff::Timestamp;
use std::collections::HashMap;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// Sets `edgesync_edge_up` and `edgesync_edge_last_heard_timestamp_seconds` for every
/// registered edge: up while it is connected here or to a head connected here; heard from now
/// while up (QUIC keep-alives hold the link), else when its last session here ended.
pub async fn update_metrics(node: &Node, edges: &Edges) {
    let registered = edges.dns_view().await.nodes;
    let peers = node.peers().list();
    let now = Timestamp::now();
    let m = node.metrics();
    m.edge_up.clear();
    m.edge_last_heard.clear();
    m.edge_cert_expiry.clear();
    for (name, registration) in registered.iter().filter(|(_, r)| !r.removed) {
        let labels = EdgeLabels { edge: name.clone() };
        m.edge_cert_expiry
            .get_or_create(&labels)
            .set(registration.not_after);
        let up = node.online(name).await;
        m.edge_up.get_or_create(&labels).set(i64::from(up));
        let heard = match up {
            true => Some(now),
            false => peers
                .iter()
                .find(|p| p.name == *name)
                .and_then(|p| p.last_seen.as_deref()?.parse::<Timestamp>().ok()),
        };
        if let Some(heard) = heard {
            let seconds = heard.as_millisecond() as f64 / 1000.0;
            m.edge_last_heard.get_or_create(&labels).set(seconds);
        }
    }
}

/// Keeps `edgesync_pods_refused` on a head: the pods the edges report refused, summed over
/// every EdgeNode, each counted again only when its document changes.
pub async fn count_refused(node: Node, shutdown: CancellationToken) {
    let mut changes = node.docs().subscribe();
    let mut refused: HashMap<String, usize> = HashMap::new();
    let mut all = true;
    loop {
        let keys = match all {
            true => {
                refused.clear();
                node.docs().keys()
            }
            false => Vec::new(),
        };
        all = false;
        for key in keys {
            refused.insert(key.clone(), refused_in(&node, &key).await);
        }
        let total: usize = refused.values().sum();
        node.metrics().pods_refused.set(total as i64);
        let change = tokio::select! {
            _ = shutdown.cancelled() => return,
            change = changes.recv() => change,
        };
        match change {
            Ok(change) if !change.moved.internal => {
                let count = refused_in(&node, &change.key).await;
                refused.insert(change.key, count);
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => all = true,
            Err(RecvError::Closed) => return,
        }
    }
}

/// Pods of EdgeNode `key` its edge reports refused.
async fn refused_in(node: &Node, key: &str) -> usize {
    match node.docs().view(key).await {
        Ok(Some((view, _))) if !view.deleted => view
            .pod_states
            .iter()
            .filter(|p| p.state == POD_REFUSED && view.pods.contains_key(&p.name))
            .count(),
        _ => 0,
    }
}
