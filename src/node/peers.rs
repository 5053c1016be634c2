//! The peer table: who is connected, from where, and what went over each link; the peers
//! whose sessions started or ended since a watcher last looked; and the sessions to end when
//! a peer is removed.

use super::feed::Feed;
use crate::clock::now;
use crate::transport::tls::{Identity, Role};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::lock;

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
    /// The edgesync version it said in its last Hello here, if it said one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where others can reach it, as its last session here said.
    #[serde(skip)]
    pub reachable: Option<std::net::IpAddr>,
}

/// Where a peer is, for a session with it.
#[derive(Debug, Clone)]
pub struct PeerAddress {
    /// The socket address the connection comes from (shown in status).
    pub seen: String,
    /// Where others can reach it: its advertised address, else the one seen (for DNS).
    pub reachable: std::net::IpAddr,
    /// The edgesync version it said in its Hello, if it said one.
    pub version: Option<String>,
}

/// Every peer this node has had a session with since it started.
#[derive(Default)]
pub struct Peers {
    table: Mutex<BTreeMap<String, PeerInfo>>,
    kicks: Mutex<BTreeMap<String, CancellationToken>>,
    /// Peers whose sessions started or ended since the watcher last looked: one entry per
    /// peer however many times it came and went, so a reconnect storm queues no more work
    /// than there are peers.
    changed: Feed,
}

impl Peers {
    /// Waits until sessions started or ended, and takes the names of their peers, each once,
    /// for one watcher (a head records its edges' presence from them; what is true now is in
    /// the table). Cancel-safe: names not taken stay for the next call.
    pub async fn changes(&self) -> BTreeSet<String> {
        self.changed.next().await
    }

    /// Puts back names [`Peers::changes`] gave out whose change could not be recorded.
    pub fn requeue(&self, names: BTreeSet<String>) {
        self.changed.requeue(names);
    }

    fn tell(&self, name: &str) {
        self.changed.add(name);
    }

    /// Records that a session with `peer` started.
    pub fn connected(&self, peer: &Identity, address: &PeerAddress) {
        self.record(peer, address);
        self.tell(&peer.name);
    }

    fn record(&self, peer: &Identity, at: &PeerAddress) {
        let address = at.seen.as_str();
        let mut peers = lock(&self.table);
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
            version: None,
            reachable: None,
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
        // What its last session said: none from a release before versions were said.
        info.version = at.version.clone();
        info.reachable = Some(at.reachable);
        info.sessions += 1;
        info.connected = true;
        info.last_seen = Some(now());
    }

    /// Records that a session with `peer` ended.
    pub fn disconnected(&self, peer: &Identity) {
        if let Some(info) = lock(&self.table).get_mut(&peer.name) {
            info.sessions = info.sessions.saturating_sub(1);
            info.connected = info.sessions > 0;
            if info.sessions <= 1 {
                info.also_from = None;
            }
        }
        self.tell(&peer.name);
    }

    /// Changes a known peer's record.
    pub fn touch(&self, name: &str, f: impl FnOnce(&mut PeerInfo)) {
        if let Some(info) = lock(&self.table).get_mut(name) {
            f(info);
        }
    }

    /// Whether a peer of this name is connected now.
    pub fn is_connected(&self, name: &str) -> bool {
        lock(&self.table).get(name).is_some_and(|p| p.connected)
    }

    /// Whether any head is connected now.
    pub fn any_head_connected(&self) -> bool {
        lock(&self.table)
            .values()
            .any(|p| p.connected && p.role == Role::Head)
    }

    /// The peers of `names` that are known, by name.
    pub fn some(&self, names: &BTreeSet<String>) -> BTreeMap<String, PeerInfo> {
        let table = lock(&self.table);
        names
            .iter()
            .filter_map(|name| Some((name.clone(), table.get(name)?.clone())))
            .collect()
    }

    /// Every peer.
    pub fn list(&self) -> Vec<PeerInfo> {
        lock(&self.table).values().cloned().collect()
    }

    /// Fires when peer `name` is removed: its sessions end at once.
    pub fn removal_of(&self, name: &str) -> CancellationToken {
        lock(&self.kicks)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Ends the sessions of peer `name` (its certificate was replaced or removed).
    pub fn end_sessions(&self, name: &str) {
        if let Some(token) = lock(&self.kicks).remove(name) {
            token.cancel();
        }
    }

    /// Ends peer `name`'s sessions and forgets it.
    pub fn forget(&self, name: &str) {
        self.end_sessions(name);
        lock(&self.table).remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_storm_of_sessions_leaves_one_name_per_peer_to_look_at() {
        let peers = Peers::default();
        let edge = |name: &str| Identity {
            name: name.into(),
            role: Role::Edge,
            key: vec![1],
        };
        let at = PeerAddress {
            seen: "192.0.2.1:4000".into(),
            reachable: "192.0.2.1".parse().unwrap(),
            version: Some("0.1.0+abc".into()),
        };
        for _ in 0..1000 {
            for name in ["edge01", "edge02"] {
                peers.connected(&edge(name), &at);
                peers.disconnected(&edge(name));
            }
        }
        peers.connected(&edge("edge01"), &at);
        let names: Vec<String> = peers.changes().await.into_iter().collect();
        assert_eq!(names, ["edge01", "edge02"]);
        assert!(peers.is_connected("edge01") && !peers.is_connected("edge02"));
        let one = peers
            .list()
            .into_iter()
            .find(|p| p.name == "edge01")
            .unwrap();
        assert_eq!(one.version.as_deref(), Some("0.1.0+abc"));
        assert_eq!(one.reachable, Some(at.reachable));
        // Taken: nothing waits until a session starts or ends again.
        let next = tokio::time::timeout(std::time::Duration::from_millis(50), peers.changes());
        assert!(next.await.is_err());
    }
}
