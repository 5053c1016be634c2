//! The peer table: who is connected, from where, and what went over each link; and the
//! sessions to end when a peer is removed.

use crate::clock::now;
use crate::transport::tls::{Identity, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::mpsc;
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

/// A session with a peer started or ended (see [`Peers::watch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// A session started.
    Connected {
        /// The peer.
        peer: Identity,
        /// Where others can reach it.
        reachable: std::net::IpAddr,
        /// The edgesync version it said, if it said one.
        version: Option<String>,
    },
    /// A session ended.
    Disconnected {
        /// The peer.
        peer: Identity,
    },
}

/// Every peer this node has had a session with since it started.
#[derive(Default)]
pub struct Peers {
    table: Mutex<BTreeMap<String, PeerInfo>>,
    kicks: Mutex<BTreeMap<String, CancellationToken>>,
    watch: Mutex<Option<mpsc::UnboundedSender<PeerEvent>>>,
}

impl Peers {
    /// Sessions starting and ending from now on, for one watcher (a head records its edges'
    /// presence from them).
    pub fn watch(&self) -> mpsc::UnboundedReceiver<PeerEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&self.watch) = Some(tx);
        rx
    }

    fn tell(&self, event: PeerEvent) {
        if let Some(watch) = lock(&self.watch).as_ref() {
            let _ = watch.send(event);
        }
    }

    /// Records that a session with `peer` started.
    pub fn connected(&self, peer: &Identity, address: &PeerAddress) {
        self.record(peer, address);
        self.tell(PeerEvent::Connected {
            peer: peer.clone(),
            reachable: address.reachable,
            version: address.version.clone(),
        });
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
        if at.version.is_some() {
            info.version = at.version.clone();
        }
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
        self.tell(PeerEvent::Disconnected { peer: peer.clone() });
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
