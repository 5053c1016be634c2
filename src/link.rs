//! Links between peers: the accept loop (sync sessions and joins on one QUIC port) and the
//! dial loop with capped, jittered backoff. Both run a sync session per connection.

use crate::node::Node;
use crate::node::PeerAddress;
use crate::sync::wire::{Frame, MAX_FIRST_FRAME, read_frame, write_frame};
use crate::sync::{log_end, run_session};
use crate::transport::tls::Identity;
use crate::transport::{self, Backoff};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

/// Answers a join or renewal request (the first frame of a stream), given the caller's
/// certificate identity if it presented one.
pub type JoinHandler = Arc<
    dyn Fn(Frame, SocketAddr, Option<Identity>) -> Pin<Box<dyn Future<Output = Frame> + Send>>
        + Send
        + Sync,
>;

/// Decides whether a certified peer may hold a sync session here.
pub type Admit =
    Arc<dyn Fn(Identity) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What a head adds to the accept loop: joins and renewals, and who may hold a session.
#[derive(Clone)]
pub struct Gate {
    /// Answers join and renewal requests.
    pub join: JoinHandler,
    /// Admits certified peers.
    pub admit: Admit,
}

/// Builds the client TLS configuration for each dial, so a renewed certificate is picked up.
pub type TlsSource = Arc<dyn Fn() -> Result<rustls::ClientConfig, String> + Send + Sync>;

/// How long shutdown waits for close frames to reach peers.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Connections that may be between accept and their first frame at once (each holds at
/// most one bounded first frame).
const MAX_HANDSHAKES: usize = 256;
/// A session shorter than this does not reset the reconnect backoff, so a peer that accepts
/// and then fails at once is not hammered.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// How long a new connection may take to open its first stream and send its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `endpoint` until `shutdown`: certified peers the gate admits get a
/// sync session, others may only join (if there is a gate).
pub async fn serve(
    endpoint: quinn::Endpoint,
    node: Node,
    gate: Option<Gate>,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            warn!(peer = %remote, "too many connections being set up; refused");
            incoming.refuse();
            continue;
        };
        let (node, gate, shutdown) = (node.clone(), gate.clone(), shutdown.child_token());
        tokio::spawn(
            async move {
                if let Err(e) = handle_incoming(incoming, node, gate, permit, shutdown).await {
                    warn!(error = %e, "connection refused");
                }
            }
            .instrument(tracing::info_span!("conn", peer = %remote)),
        );
    }
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    node: Node,
    gate: Option<Gate>,
    handshake: tokio::sync::OwnedSemaphorePermit,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let remote = conn.remote_address();
    let identity = transport::peer_identity(&conn);
    let first = tokio::time::timeout(FIRST_FRAME_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let frame = read_frame(&mut recv, MAX_FIRST_FRAME)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((send, recv, frame))
    })
    .await
    .map_err(|_| "no request within 10s".to_string())??;
    let (send, recv, frame) = first;
    drop(handshake);
    match (frame, identity) {
        (Some(Frame::Hello { advertise, .. }), Some(peer)) => {
            let admitted = match &gate {
                Some(gate) => (gate.admit)(peer.clone()).await,
                None => Ok(()),
            };
            if let Err(message) = admitted {
                answer(
                    &conn,
                    send,
                    Frame::Error {
                        message: message.clone(),
                    },
                )
                .await;
                return Err(message);
            }
            info!(peer = %peer.name, role = %peer.role, "peer connected");
            // Where the peer is reachable: what it advertises, else what we see.
            let reachable = advertise.parse().unwrap_or(remote.ip());
            let address = PeerAddress {
                seen: remote.to_string(),
                reachable,
            };
            let result = run_session(node, peer.clone(), address, recv, send, shutdown).await;
            log_end(&peer, &result);
            conn.close(0u32.into(), b"bye");
            Ok(())
        }
        (Some(request @ (Frame::JoinRequest { .. } | Frame::Renew { .. })), identity)
            if gate.is_some() =>
        {
            let gate = gate.expect("checked above");
            answer(&conn, send, (gate.join)(request, remote, identity).await).await;
            Ok(())
        }
        (frame, identity) => {
            let message = match (&frame, &identity) {
                (Some(Frame::Hello { .. }), None) => {
                    "a client certificate is required; join with a token first"
                }
                (Some(Frame::JoinRequest { .. } | Frame::Renew { .. }), _) => {
                    "this node does not issue certificates; join through a head"
                }
                _ => "unexpected first frame",
            };
            answer(
                &conn,
                send,
                Frame::Error {
                    message: message.into(),
                },
            )
            .await;
            Err(message.to_string())
        }
    }
}

/// Sends the one answer of a short exchange and gives the peer a moment to read it and close.
async fn answer(conn: &quinn::Connection, mut send: quinn::SendStream, frame: Frame) {
    let _ = write_frame(&mut send, &frame).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
}

/// Keeps one link to whichever of `targets` answers first, reconnecting with backoff until
/// `shutdown`. `tls` must present this node's certificate.
pub async fn dial(node: Node, targets: Vec<String>, tls: TlsSource, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    let mut endpoints: Vec<(bool, quinn::Endpoint)> = Vec::new();
    while !shutdown.is_cancelled() {
        let addrs = transport::resolve(&targets).await;
        let attempt = match tls() {
            Ok(tls) => tokio::select! {
                _ = shutdown.cancelled() => None,
                conn = connect_any(&mut endpoints, &addrs, &tls) => conn,
            },
            Err(e) => {
                warn!(error = %e, "no usable client certificate");
                None
            }
        };
        if let Some(conn) = attempt {
            let span = tracing::info_span!("link", peer = %conn.remote_address());
            let started = std::time::Instant::now();
            run_link(&node, conn, shutdown.child_token())
                .instrument(span)
                .await;
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    // Let the close reach the peer, so it sees us go at once rather than after the idle timeout.
    for (_, endpoint) in endpoints {
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    }
}

/// Dials every address at once and keeps the first connection that completes, so a dead
/// head never delays reaching a live one.
async fn connect_any(
    endpoints: &mut Vec<(bool, quinn::Endpoint)>,
    addrs: &[SocketAddr],
    tls: &rustls::ClientConfig,
) -> Option<quinn::Connection> {
    let mut attempts = tokio::task::JoinSet::new();
    for &addr in addrs {
        match endpoint_for(endpoints, addr) {
            Ok(endpoint) => {
                let tls = tls.clone();
                attempts.spawn(async move { transport::connect(&endpoint, addr, tls).await });
            }
            Err(e) => warn!(error = %e, "cannot open a QUIC client socket"),
        }
    }
    while let Some(done) = attempts.join_next().await {
        match done {
            Ok(Ok(conn)) => return Some(conn),
            Ok(Err(e)) => warn!(error = %e, "peer unreachable"),
            Err(e) => warn!(error = %e, "dial task failed"),
        }
    }
    None
}

fn endpoint_for(
    endpoints: &mut Vec<(bool, quinn::Endpoint)>,
    addr: SocketAddr,
) -> Result<quinn::Endpoint, transport::TransportError> {
    if let Some((_, e)) = endpoints.iter().find(|(v6, _)| *v6 == addr.is_ipv6()) {
        return Ok(e.clone());
    }
    let endpoint = transport::client(addr)?;
    endpoints.push((addr.is_ipv6(), endpoint.clone()));
    Ok(endpoint)
}

async fn run_link(node: &Node, conn: quinn::Connection, shutdown: CancellationToken) {
    let remote = conn.remote_address();
    let Some(peer) = transport::peer_identity(&conn) else {
        warn!("peer certificate carries no edgesync identity; disconnecting");
        conn.close(0u32.into(), b"no identity");
        return;
    };
    let opened = async {
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(
            &mut send,
            &Frame::Hello {
                name: node.name().to_string(),
                advertise: node.advertise().map(|a| a.to_string()).unwrap_or_default(),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok::<_, String>((send, recv))
    };
    match opened.await {
        Ok((send, recv)) => {
            info!(peer = %peer.name, "connected");
            let address = PeerAddress {
                seen: remote.to_string(),
                reachable: remote.ip(),
            };
            let result =
                run_session(node.clone(), peer.clone(), address, recv, send, shutdown).await;
            log_end(&peer, &result);
        }
        Err(e) => warn!(error = %e, "could not open a sync stream"),
    }
    conn.close(0u32.into(), b"bye");
}
