//! Peer heads from the cluster: the addresses behind the head Service's Endpoints, each dialled
//! like a `--peer`, added and dropped as the Endpoints change. This head's own address (whose
//! targetRef names it) is left out.

use crate::link::{self, TlsSource};
use crate::node::Node;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Endpoints;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, BTreeSet};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Keeps one dialler per peer head listed in Endpoints `namespace/service`, until shutdown.
pub async fn follow(
    client: kube::Client,
    namespace: String,
    service: String,
    node: Node,
    tls: TlsSource,
    shutdown: CancellationToken,
) {
    let api: Api<Endpoints> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={service}"));
    let stream = watcher(api, config).default_backoff().applied_objects();
    tokio::pin!(stream);
    let mut dials: BTreeMap<String, CancellationToken> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    loop {
        let endpoints = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = stream.next() => match event {
                None => break,
                Some(Err(e)) => {
                    warn!(service = %service, error = %e, "cannot watch the head Service's endpoints");
                    continue;
                }
                Some(Ok(endpoints)) => endpoints,
            },
        };
        let wanted = peer_addresses(&endpoints, node.name());
        dials.retain(|addr, token| {
            let keep = wanted.contains(addr);
            if !keep {
                info!(peer = %addr, "peer head left the Service");
                token.cancel();
            }
            keep
        });
        for addr in wanted {
            if dials.contains_key(&addr) {
                continue;
            }
            info!(peer = %addr, "peer head found in the Service");
            let token = shutdown.child_token();
            dials.insert(addr.clone(), token.clone());
            tasks.spawn(link::dial(
                node.clone(),
                vec![addr],
                tls.clone(),
                None,
                token,
            ));
        }
        while tasks.try_join_next().is_some() {}
    }
    for token in dials.values() {
        token.cancel();
    }
    while tasks.join_next().await.is_some() {}
}

/// `ip:port` of every address in `endpoints` except the one of head `me`; the port is the one
/// named `quic`, else the first UDP one.
fn peer_addresses(endpoints: &Endpoints, me: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports = subset.ports.iter().flatten();
        let port = ports
            .clone()
            .find(|p| p.name.as_deref() == Some("quic"))
            .or_else(|| ports.clone().find(|p| p.protocol.as_deref() == Some("UDP")));
        let Some(port) = port else {
            continue;
        };
        let addresses = subset
            .addresses
            .iter()
            .chain(subset.not_ready_addresses.iter())
            .flatten();
        for address in addresses {
            let own = address
                .target_ref
                .as_ref()
                .and_then(|r| r.name.as_deref())
                .or(address.hostname.as_deref())
                == Some(me);
            if !own {
                let ip: Result<std::net::IpAddr, _> = address.ip.parse();
                if let Ok(ip) = ip {
                    found.insert(std::net::SocketAddr::new(ip, port.port as u16).to_string());
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_every_address_but_this_heads_on_the_quic_port() {
        let endpoints: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "edgesync-head"},
            "subsets": [{
                "addresses": [
                    {"ip": "10.0.0.1", "targetRef": {"kind": "Pod", "name": "head-a"}},
                    {"ip": "10.0.0.2", "targetRef": {"kind": "Pod", "name": "head-b"}},
                ],
                "notReadyAddresses": [{"ip": "fd00::3", "targetRef": {"kind": "Pod", "name": "head-c"}}],
                "ports": [{"name": "api", "port": 7444, "protocol": "TCP"}, {"name": "quic", "port": 7443, "protocol": "UDP"}],
            }, {
                "addresses": [{"ip": "10.0.0.9"}],
                "ports": [{"name": "api", "port": 7444, "protocol": "TCP"}],
            }],
        }))
        .unwrap();
        let peers: Vec<String> = peer_addresses(&endpoints, "head-a").into_iter().collect();
        assert_eq!(peers, ["10.0.0.2:7443", "[fd00::3]:7443"]);
    }
}
