//! What a head reports of its fleet, as metrics an operator can alert on: whether each
//! registered edge is up, when it was last heard from, when its certificate expires, and how
//! many pods the edges refuse.

use crate::crd::{POD_NOT_WRITTEN, POD_REFUSED};
use crate::head::edges::Edges;
use crate::metrics::EdgeLabels;
use crate::model::DocView;
use crate::node::looks::Follower;
use crate::node::{Look, Node, PeerInfo};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// One registered edge as `edgesync node list` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeInfo {
    /// Name.
    pub name: String,
    /// Connected to this head or to a head connected to it.
    pub online: bool,
    /// The head it is connected to, if any.
    pub head: Option<String>,
    /// The address it is reachable at, as last seen or advertised.
    pub address: Option<String>,
    /// Last heard from (RFC 3339): now while online; else when its session here ended.
    pub last_seen: Option<String>,
    /// When its certificate expires (RFC 3339).
    pub certificate_expires: Option<String>,
    /// Its address in DNS, when published.
    pub dns: Option<String>,
    /// The edgesync version it last said it runs (none from an edge of an earlier release,
    /// which does not say it).
    pub version: Option<String>,
    /// EdgeNodes named after it (not deleted).
    pub edgenodes: usize,
    /// Pods its edge reports applied.
    pub pods_ready: usize,
    /// Pods its EdgeNodes ask for.
    pub pods: usize,
}

/// Every registered edge, online or not, by name.
pub async fn list(node: &Node, edges: &Edges) -> Vec<EdgeInfo> {
    let view = edges.dns_view().await;
    let peers = peers_by_name(node);
    let now = Timestamp::now();
    let mut counts: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for key in node.docs().keys() {
        let Ok(Some((doc, _))) = node.docs().view(&key).await else {
            continue;
        };
        if doc.deleted || doc.generation == 0 {
            continue;
        }
        let ready = doc
            .pod_states
            .iter()
            .filter(|p| p.state == crate::crd::POD_APPLIED && doc.pods.contains_key(&p.name))
            .count();
        let count = counts.entry(doc.name.clone()).or_default();
        *count = (count.0 + 1, count.1 + ready, count.2 + doc.pods.len());
    }
    let mut list = Vec::new();
    for (name, registration) in view.nodes.iter().filter(|(_, r)| !r.removed) {
        let online = node.online(name).await;
        let head = match node.peers().is_connected(name) {
            true => Some(node.name().to_string()),
            false => node.docs().presence_of(name).await.filter(|_| online),
        };
        let last_seen = last_heard(&peers, name, online, now).map(|t| t.to_string());
        let (edgenodes, pods_ready, pods) = counts.get(name).copied().unwrap_or_default();
        list.push(EdgeInfo {
            name: name.clone(),
            online,
            head,
            address: view.addresses.get(name).map(ToString::to_string),
            last_seen,
            certificate_expires: Timestamp::from_second(registration.not_after)
                .ok()
                .map(|t| t.to_string()),
            dns: view.dns.get(name).map(ToString::to_string),
            version: view.versions.get(name).cloned(),
            edgenodes,
            pods_ready,
            pods,
        });
    }
    list
}

/// Sets `edgesync_edge_up` and `edgesync_edge_last_heard_timestamp_seconds` for every
/// registered edge: up while it is connected here or to a head connected here; heard from now
/// while up (QUIC keep-alives hold the link), else when its last session here ended.
pub async fn update_metrics(node: &Node, edges: &Edges) {
    let view = edges.dns_view().await;
    let registered = &view.nodes;
    let peers = peers_by_name(node);
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
        if let Some(heard) = last_heard(&peers, name, up, now) {
            let seconds = heard.as_millisecond() as f64 / 1000.0;
            m.edge_last_heard.get_or_create(&labels).set(seconds);
        }
    }
}

/// When edge `name` was last heard from: `now` while it is `online` (QUIC keep-alives hold
/// the link), else when its last session here ended, if it had one since this head started.
fn last_heard(peers: &Peers, name: &str, online: bool, now: Timestamp) -> Option<Timestamp> {
    match online {
        true => Some(now),
        false => peers.get(name)?.last_seen.as_deref()?.parse().ok(),
    }
}

/// The peers of this head by name (a fleet's listing looks each registered edge up).
type Peers = HashMap<String, PeerInfo>;

fn peers_by_name(node: &Node) -> Peers {
    let peers = node.peers().list().into_iter();
    peers.map(|p| (p.name.clone(), p)).collect()
}

/// Keeps `edgesync_pods_refused` and `edgesync_pods_not_written` on a head, from the passes
/// over the EdgeNodes that changed ([`crate::node::looks`]): the pods the edges report
/// refused or not written, summed over every EdgeNode.
#[derive(Default)]
pub struct RefusedCount {
    /// The EdgeNodes with such pods.
    troubled: HashMap<String, Troubled>,
}

impl Follower for RefusedCount {
    fn saw(&mut self, _node: &Node, key: &str, look: Option<&Look>) {
        match look.map(|l| Troubled::of(&l.view)) {
            Some(some) if some != Troubled::default() => self.troubled.insert(key.into(), some),
            _ => self.troubled.remove(key),
        };
    }

    fn passed(&mut self, node: &Node) {
        let total = |of: fn(&Troubled) -> usize| {
            let sum: usize = self.troubled.values().map(of).sum();
            sum as i64
        };
        node.metrics().pods_refused.set(total(|t| t.refused));
        node.metrics()
            .pods_not_written
            .set(total(|t| t.not_written));
    }
}

/// Pods of one EdgeNode its edge reports refused, and not written.
#[derive(Default, PartialEq)]
struct Troubled {
    refused: usize,
    not_written: usize,
}

impl Troubled {
    /// The pods of a live EdgeNode's spec, as its edge reports them.
    fn of(view: &DocView) -> Troubled {
        if view.deleted {
            return Troubled::default();
        }
        let count = |state: &str| {
            let states = view.pod_states.iter();
            let of_spec = states.filter(|p| view.pods.contains_key(&p.name));
            of_spec.filter(|p| p.state == state).count()
        };
        Troubled {
            refused: count(POD_REFUSED),
            not_written: count(POD_NOT_WRITTEN),
        }
    }
}
