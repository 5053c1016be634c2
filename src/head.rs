//! Head wiring: CA and join tokens, the QUIC listener for edges and other heads, links to
//! peer heads, the local control socket, and the Kubernetes bridge when there is a cluster;
//! without a kubeconfig it runs standalone.

pub mod access;
pub mod admin;
pub mod api;
pub mod bridge;
pub mod cluster;
pub mod dns;
pub mod edges;
pub mod events;
pub mod fleet;
pub mod lease;
pub mod peers;
pub mod portal;
pub mod roster;
pub mod users;

use crate::clock::unix_now;
use crate::config::HeadConfig;
use crate::control;
use crate::daemon::{DaemonError, Tasks, io_err};
use crate::fsutil;
use crate::input::{self, NameError, Rules};
use crate::link::{self, Gate, JoinHandler};
use crate::node::Node;
use crate::node::journal::Recorder;
use crate::node::looks::{self, Follower};
use crate::store::{JoinedNode, Store};
use crate::sync::wire::Frame;
use crate::transport::tls::{self, Ca, JoinToken, Role, TlsError};
use crate::transport::{self, TransportError};
use edges::{Edges, EdgesError, Expect};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Lifetime of the join token written at first start and the default of `token create`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why the head refuses a join or a certificate renewal; the text is sent to the edge.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// A renewal without the edge's current, valid certificate.
    #[error("renewal needs the edge's current, valid certificate")]
    RenewalUncertified,
    /// The first frame of a certificate request is not a join request.
    #[error("not a join request")]
    NotAJoinRequest,
    /// The join token is unknown, its secret wrong, or it expired.
    #[error(
        "join token is invalid or expired; create one on the head with `edgesync token create`"
    )]
    BadToken {
        /// The token's id (its public part).
        token_id: String,
    },
    /// The node name the edge asks for is not a valid one.
    #[error("node name: {0}")]
    NodeName(#[source] NameError),
    /// The certificate signing request was refused.
    #[error("certificate request: {source}")]
    Csr {
        /// The edge's name.
        node: String,
        /// Why.
        #[source]
        source: TlsError,
    },
    /// The certificate just issued could not be read back.
    #[error(transparent)]
    Issued(TlsError),
    /// The edge may not join or renew under its name, or could not be recorded.
    #[error(transparent)]
    Edges(#[from] EdgesError),
}

/// A running head.
pub struct Head {
    node: Node,
    local_addr: SocketAddr,
    ca_hash: String,
    tasks: Tasks,
    /// Stopped after `tasks` closed the connections it drives.
    _quic: transport::QuicThread,
    /// Held until the head stops.
    _lock: crate::daemon::StateLock,
}

impl Head {
    /// Creates state (CA, database, first join token) as needed and starts serving.
    pub async fn start(config: HeadConfig) -> Result<Head, DaemonError> {
        let dir = &config.state_dir;
        let lock = crate::daemon::lock_state_dir(dir, "head")?;
        let store = Store::open(dir)?;
        let cluster = self::cluster::cluster(config.kubeconfig.as_deref()).await?;
        let ca = Arc::new(match &cluster {
            Some(c) => self::cluster::shared_ca(&c.client, &config.cluster_namespace, dir).await?,
            None => Ca::load_or_create(dir)?,
        });
        let rules = Rules {
            default_namespace: "default".into(),
            privileged_namespaces: config.privileged_namespaces.clone(),
        };
        let node = Node::open(Role::Head, &config.name, store.clone(), rules).await?;
        node.metrics().cert_expires("ca", &ca.cert);
        let mut tasks = Tasks::default();
        roster::start(&node, &mut tasks);
        // Unique per process, so two heads given the same --name never both hold the Lease.
        let identity = format!("{}_{}", config.name, hex::encode(tls::random_bytes::<4>()));
        let edges = match &cluster {
            Some(c) => Edges::in_cluster(
                node.clone(),
                c.client.clone(),
                &config.cluster_namespace,
                &identity,
                config.lease_duration,
                &mut tasks,
            ),
            None => Edges::standalone(node.clone(), &mut tasks),
        };
        // With a cluster the writer's status pass tells the events, as Kubernetes Events;
        // standalone this head keeps its own journal (below).
        let events = cluster
            .as_ref()
            .map(|c| events::ClusterEvents::start(c.client.clone(), &identity, &mut tasks));
        let token_file = dir.join("join-token");
        if !token_file.exists() {
            let token = create_token(&edges, &ca.hash(), DEFAULT_TOKEN_TTL).await?;
            fsutil::write_private(&token_file, format!("{token}\n").as_bytes())
                .map_err(|source| io_err(&token_file, source))?;
            info!(file = %token_file.display(), "wrote a join token valid for 24h");
        }
        let cert = ca.issue_head(&config.name)?;
        let quic = transport::QuicThread::start()
            .map_err(|e| DaemonError::Config(format!("the QUIC thread did not start: {e}")))?;
        let endpoint = transport::server(
            config.listen,
            tls::server_config(&ca.cert, &cert)?,
            ca.derive_key("edgesync stateless reset v1"),
            quic.runtime(),
        )?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: config.listen,
                source,
            })?;
        let gate = Gate {
            join: join_handler(edges.clone(), ca.clone(), config.edge_cert_lifetime),
            admit: {
                let edges = edges.clone();
                Arc::new(move |peer| {
                    let edges = edges.clone();
                    Box::pin(async move { Ok(edges.admit(&peer).await?) })
                })
            },
        };
        tasks.spawn(link::serve(
            endpoint,
            node.clone(),
            Some(gate),
            tasks.token(),
        ));
        let client = tls::client_config(&ca.cert, &cert)?;
        let client_tls: link::TlsSource = Arc::new(move || Ok(client.clone()));
        for peer in &config.peers {
            tasks.spawn(link::dial(
                node.clone(),
                vec![peer.clone()],
                client_tls.clone(),
                None,
                tasks.token(),
            ));
        }
        let accounts = accounts(&config, &store, cluster.as_ref()).await?;
        tasks.spawn(accounts.clone().sweep_forever(tasks.token()));
        tasks.spawn({
            let (node, shutdown) = (node.clone(), tasks.token());
            async move { node.docs().unload_forever(shutdown).await }
        });
        let api_cert = match &config.api_cert {
            Some((cert, key)) => tls::load_keyed_cert(cert, key)?,
            None => ca.issue_api(&api_names(&config))?,
        };
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        tasks.spawn(report_ready(edges.clone(), ready_tx));
        let (api_addr, api) = api::serve(
            config.api_listen,
            tls::api_server_config(&api_cert)?,
            accounts.clone(),
            node.clone(),
            ready,
            portal::Portal::new(
                accounts.clone(),
                // The same on every head of this CA: any head serves any signed-in user.
                portal::session::Keys::new(
                    ca.derive_key("edgesync portal sessions v1"),
                    config.session_lifetime,
                ),
                config.portal_title.clone(),
                config.portal_contact.clone(),
            ),
            tasks.token(),
        )
        .map_err(|source| {
            io_err(
                Path::new(&format!("--api-listen {}", config.api_listen)),
                source,
            )
        })?;
        tasks.spawn(api);
        let head_control = admin::HeadControl {
            join_address: join_address(&config.api_hostnames, local_addr),
            ca_hash: ca.hash(),
            accounts,
            edges: edges.clone(),
            node: node.clone(),
            events: events.clone(),
        };
        let control = control::serve(
            &config.socket,
            node.clone(),
            admin::routes(head_control),
            tasks.token(),
        )
        .await?;
        tasks.spawn(control);
        let render: control::RenderMetrics = {
            let (node, edges) = (node.clone(), edges.clone());
            Arc::new(move || {
                let (node, edges) = (node.clone(), edges.clone());
                Box::pin(async move {
                    fleet::update_metrics(&node, &edges).await;
                    node.metrics_text().await
                })
            })
        };
        if let Some((_, served)) =
            control::serve_metrics(config.metrics, render, tasks.token()).await?
        {
            tasks.spawn(served);
        }
        let mut followers: Vec<Box<dyn Follower>> = vec![Box::new(fleet::RefusedCount::default())];
        if events.is_none() {
            followers.push(Box::new(Recorder::default()));
        }
        tasks.spawn(looks::follow(node.clone(), followers, tasks.token()));
        let (leading, leading_rx) = tokio::sync::watch::channel(cluster.is_none());
        // Standalone, this head writes; with a cluster, the bridge says while it holds the Lease.
        node.metrics().writer.set(i64::from(cluster.is_none()));
        tasks.spawn(dns::run(
            edges.clone(),
            config.dns.clone(),
            leading_rx.clone(),
            tasks.token(),
        ));
        match cluster.as_ref().map(|c| c.client.clone()) {
            Some(client) => {
                let elector = lease::Elector::new(
                    client.clone(),
                    &config.cluster_namespace,
                    &identity,
                    config.lease_duration,
                );
                tasks.spawn(elector.run(leading, tasks.token()));
                tasks.spawn(peers::follow(
                    client.clone(),
                    config.cluster_namespace.clone(),
                    config.head_service.clone(),
                    node.clone(),
                    client_tls.clone(),
                    tasks.token(),
                ));
                self::bridge::Bridge::start(
                    client,
                    node.clone(),
                    edges.clone(),
                    events,
                    &config.watch_namespaces,
                    leading_rx,
                    &mut tasks,
                )
                .await?;
                info!(
                    namespace = %config.cluster_namespace,
                    "EdgeNode resources in the cluster are the source of truth; the holder of Lease edgesync-writer writes them"
                );
            }
            None => info!("no kubeconfig: running standalone"),
        }
        info!(quic = %local_addr, api = %api_addr, socket = %config.socket.display(), ca = %ca.hash(), "head ready");
        Ok(Head {
            node,
            local_addr,
            ca_hash: ca.hash(),
            tasks,
            _quic: quic,
            _lock: lock,
        })
    }

    /// The QUIC address edges dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node core.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// SHA-256 of the CA certificate (what tokens pin).
    pub fn ca_hash(&self) -> &str {
        &self.ca_hash
    }

    /// Stops serving and waits for every task.
    pub async fn shutdown(self) {
        self.tasks.shutdown().await;
    }
}

/// Reports the head ready (`/readyz`) once it has read the cluster's state it needs to serve.
async fn report_ready(edges: Edges, ready: tokio::sync::watch::Sender<bool>) {
    edges.ready().await;
    ready.send_replace(true);
    info!("read the state the head serves from: ready");
}

/// Users, and with a cluster their access to it, as configured.
async fn accounts(
    config: &HeadConfig,
    store: &Store,
    cluster: Option<&self::cluster::Cluster>,
) -> Result<api::Accounts, DaemonError> {
    let mut reserved = vec![config.cluster_namespace.clone()];
    reserved.extend(config.watch_namespaces.iter().cloned());
    reserved.extend(config.privileged_namespaces.iter().cloned());
    let policy = users::Policy {
        auto_approve: config.auto_approve,
        aup_validity: config.aup_validity,
        reserved,
    };
    let users = match cluster {
        None => users::Users::open(store.clone(), policy).await?,
        Some(cluster) => users::Users::open_cluster(cluster.client.clone(), &config.name, policy)
            .await
            .map_err(|e| DaemonError::Config(format!("users in the cluster: {e}")))?,
    };
    let access = match cluster {
        None => None,
        Some(cluster) => {
            let ca_pem = match &config.cluster_ca {
                Some(path) => {
                    Some(std::fs::read_to_string(path).map_err(|source| io_err(path, source))?)
                }
                None => cluster.ca_pem.clone(),
            };
            Some(access::Access {
                client: cluster.client.clone(),
                server: config
                    .cluster_server
                    .clone()
                    .unwrap_or_else(|| cluster.server.clone()),
                ca_pem,
                token_ttl: config.kubeconfig_ttl,
            })
        }
    };
    Ok(api::Accounts {
        users,
        access,
        granted: Default::default(),
    })
}

/// Names in the certificate the CA issues for the HTTPS API.
fn api_names(config: &HeadConfig) -> Vec<String> {
    let mut names = vec![
        config.name.clone(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !config.api_listen.ip().is_unspecified() {
        names.push(config.api_listen.ip().to_string());
    }
    names.extend(config.api_hostnames.iter().cloned());
    names.dedup();
    names
}

/// Creates a join token valid for `ttl`; every head accepts it (only its hash is kept).
pub async fn create_token(
    edges: &Edges,
    ca_hash: &str,
    ttl: Duration,
) -> Result<JoinToken, crate::node::NodeError> {
    let token = JoinToken::generate(ca_hash);
    let expires = unix_now().saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    edges
        .add_token(&token.id, token.secret_hash(), expires)
        .await?;
    Ok(token)
}

/// Where edges reach this head, for printed join commands: its QUIC address when that names
/// an address, else the first `--api-hostname` (or this host's name) with the QUIC port.
fn join_address(hostnames: &[String], quic: SocketAddr) -> String {
    if !quic.ip().is_unspecified() {
        return quic.to_string();
    }
    let host = hostnames.first().cloned().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "HEAD-ADDRESS".into())
    });
    format!("{host}:{}", quic.port())
}

fn join_handler(edges: Edges, ca: Arc<Ca>, lifetime: Duration) -> JoinHandler {
    Arc::new(move |request, remote, identity| {
        let (edges, ca) = (edges.clone(), ca.clone());
        Box::pin(async move {
            let renewal = matches!(request, Frame::Renew { .. });
            let outcome = match (request, identity) {
                (Frame::Renew { csr }, Some(peer)) if peer.role == Role::Edge => {
                    match edges.admit(&peer).await {
                        Ok(()) => {
                            let expect = Expect::Key(peer.key.clone());
                            issue(&edges, &ca, &peer.name, &csr, lifetime, expect).await
                        }
                        Err(e) => Err(e.into()),
                    }
                }
                (Frame::Renew { .. }, _) => Err(HeadError::RenewalUncertified),
                (request, _) => join(&edges, &ca, request, lifetime).await,
            };
            match (outcome, renewal) {
                (Ok((frame, node)), false) => {
                    info!(node = %node, peer = %remote, "edge joined");
                    frame
                }
                (Ok((frame, node)), true) => {
                    info!(node = %node, peer = %remote, "edge certificate renewed");
                    frame
                }
                (Err(refused), _) => {
                    warn!(peer = %remote, reason = %refused, "certificate request refused");
                    Frame::Error {
                        message: refused.to_string(),
                    }
                }
            }
        })
    })
}

/// Checks a join request's token and issues the node's certificate.
async fn join(
    edges: &Edges,
    ca: &Ca,
    request: Frame,
    lifetime: Duration,
) -> Result<(Frame, String), HeadError> {
    let Frame::JoinRequest {
        node,
        token_id,
        secret,
        csr,
        ..
    } = request
    else {
        return Err(HeadError::NotAJoinRequest);
    };
    let stored = edges.token(&token_id).await?;
    let presented = JoinToken {
        ca_hash: String::new(),
        id: String::new(),
        secret,
    }
    .secret_hash();
    let valid = stored.is_some_and(|(hash, expires)| {
        bool::from(subtle::ConstantTimeEq::ct_eq(
            hash.as_slice(),
            presented.as_slice(),
        )) && expires > unix_now()
    });
    if !valid {
        return Err(HeadError::BadToken { token_id });
    }
    input::check_subdomain(&node).map_err(HeadError::NodeName)?;
    // Refused before signing when the name is taken by another key; checked again as the node
    // is recorded.
    let key = tls::request_key(&csr).map_err(|source| HeadError::Csr {
        node: node.clone(),
        source,
    })?;
    let expect = Expect::Join(key);
    edges::check_expected(&node, edges.registered(&node).await?.as_ref(), &expect)?;
    issue(edges, ca, &node, &csr, lifetime, expect).await
}

/// Signs `csr` for edge `node` and records the node with its new key (provided what is
/// registered is what `expect` says): from then on only this key is let in under that name.
async fn issue(
    edges: &Edges,
    ca: &Ca,
    node: &str,
    csr: &[u8],
    lifetime: Duration,
    expect: Expect,
) -> Result<(Frame, String), HeadError> {
    let cert_pem = ca
        .sign_edge(csr, node, lifetime)
        .map_err(|source| HeadError::Csr {
            node: node.to_string(),
            source,
        })?;
    let cert = tls::pem_to_der(&cert_pem).map_err(HeadError::Issued)?;
    let identity = tls::identity(&cert).map_err(HeadError::Issued)?;
    let not_after = tls::not_after(&cert).map_or(0, |t| t.unix_timestamp());
    let joined = JoinedNode {
        name: node.to_string(),
        key_sha256: identity.key,
        cert_not_after: not_after,
    };
    edges.register(&joined, expect).await?;
    Ok((
        Frame::JoinAccepted {
            cert_pem,
            ca_pem: ca.cert_pem.clone(),
        },
        node.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_join_tried_again_with_its_key_is_let_in_and_another_key_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let node = Node::open(Role::Head, "head", store, Rules::new("default"))
            .await
            .unwrap();
        let mut tasks = Tasks::default();
        let edges = Edges::standalone(node, &mut tasks);
        let ca = Ca::generate().unwrap();
        let token = create_token(&edges, "", Duration::from_secs(600))
            .await
            .unwrap();
        let request = |csr: &[u8]| Frame::JoinRequest {
            node: "edge01".into(),
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            csr: csr.to_vec(),
            advertise: String::new(),
        };
        let year = Duration::from_secs(365 * 86400);
        let (_, csr) = tls::new_request("edge01").unwrap();
        join(&edges, &ca, request(&csr), year).await.unwrap();
        // Its answer was lost: the edge asks again with the same key.
        join(&edges, &ca, request(&csr), year).await.unwrap();
        let (_, other) = tls::new_request("edge01").unwrap();
        let refused = join(&edges, &ca, request(&other), year).await.unwrap_err();
        assert!(
            refused.to_string().contains("has already joined"),
            "{refused}"
        );
        let garbage = join(&edges, &ca, request(b"garbage"), year)
            .await
            .unwrap_err();
        assert!(
            garbage.to_string().starts_with("certificate request"),
            "{garbage}"
        );
        tasks.shutdown().await;
    }

    /// A head that stops keeps, for each edge's documents, the sync state its session ended
    /// with (a received change stores one only on its document's first exchange), before
    /// `edgesync head` returns and its runtime drops whatever is still running.
    #[test]
    fn a_stopping_head_stores_the_sync_state_each_session_ends_with() {
        let dir = tempfile::tempdir().unwrap();
        let key = "default/edge01";
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        };
        let heads = runtime().block_on(async {
            let head = Head::start(HeadConfig::for_test(&dir.path().join("head")))
                .await
                .unwrap();
            let token = std::fs::read_to_string(dir.path().join("head/state/join-token"));
            let edge_config = crate::config::EdgeConfig::for_test(
                &dir.path().join("edge"),
                "edge01",
                head.local_addr(),
                Some(token.unwrap().trim().to_string()),
            );
            let _edge = crate::edge::Edge::start(edge_config).await.unwrap();
            let node = head.node().clone();
            let docs = node.docs();
            for image in ["nginx", "nginx:1.27"] {
                let text = crate::dev::EXAMPLE.replace("image: nginx", &format!("image: {image}"));
                docs.apply_text(&text, "default").await.unwrap();
                // Until the edge reported it: the head holds the edge's change too.
                let generation = docs.view(key).await.unwrap().unwrap().0.generation;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while docs.view(key).await.unwrap().unwrap().0.observed_generation
                    != Some(generation)
                {
                    assert!(tokio::time::Instant::now() < deadline, "no report");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let heads = docs.heads(key).await.unwrap();
            drop(node);
            head.shutdown().await;
            heads
        });
        let states = runtime().block_on(async {
            let store = Store::open(&dir.path().join("head/state")).unwrap();
            store.sync_states("edge01").await.unwrap()
        });
        let [(doc, state)] = &states[..] else {
            panic!("one stored state: {states:?}");
        };
        let state = automerge::sync::State::decode(state).unwrap();
        assert_eq!((doc.as_str(), state.shared_heads), (key, heads));
    }
}
