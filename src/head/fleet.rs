//! What a head reports of its fleet: whether each registered edge is up, and when it was last
//! heard from, as metrics an operator can alert on.

use crate::head::edges::Edges;
use crate::metrics::EdgeLabels;
use crate::node::Node;
use k8s_openapi::jiff::Timestamp;

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
    for (name, _) in registered.iter().filter(|(_, r)| !r.removed) {
        let labels = EdgeLabels { edge: name.clone() };
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
