//! Links between peers: the accept loop (sync sessions and joins on one QUIC port) and the
//! dial loop with capped, jittered backoff. Both run a sync session per connection.

pub mod admission;

use crate::metrics::ReasonLabels;
use crate::node::Node;
use crate::node::PeerAddress;
use crate::sync::wire::{Frame, MAX_FIRST_FRAME, WireError, read_frame, write_frame};
use crate::sync::{log_end, run_session};
use crate::transport::tls::{Identity, TlsError};
use crate::transport::{self, Backoff};
use admission::{Admission, Decision, Ticket};
use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

/// Answers a join or renewal request (the first frame of a stream), given the caller's
/// certificate identity if it presented one.
pub type JoinHandler = Arc<
    dyn Fn(Frame, SocketAddr, Option<Identity>) -> Pin<Box<dyn Future<Output = Frame> + Send>>
        + Send
        + Sync,
>;

/// Why a gate does not admit a peer; its text is sent to the peer.
pub type Refusal = Box<dyn std::error::Error + Send + Sync>;

/// Decides whether a certified peer may hold a sync session here.
pub type Admit = Arc<
    dyn Fn(Identity) -> Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send>> + Send + Sync,
>;

/// What a head adds to the accept loop: joins and renewals, and who may hold a session.
#[derive(Clone)]
pub struct Gate {
    /// Answers join and renewal requests.
    pub join: JoinHandler,
    /// Admits certified peers.
    pub admit: Admit,
}

/// Builds the client TLS configuration for each dial, so a renewed certificate is picked up.
pub type TlsSource = Arc<dyn Fn() -> Result<rustls::ClientConfig, LinkError> + Send + Sync>;

/// Why a connection was refused or a link could not be set up. The refusals of a first frame
/// are also sent to the peer, as this text.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The node's certificate is not in its state dir (any more).
    #[error("the node certificate is gone from the state dir")]
    NoCertificate {
        /// The state dir.
        dir: PathBuf,
    },
    /// The node's certificate could not be read or used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The connection failed before its first stream was open.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// The first frame could not be read or written.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The gate did not admit the peer.
    #[error("{reason}")]
    NotAdmitted {
        /// The peer's name.
        peer: String,
        /// Why not.
        #[source]
        reason: Refusal,
    },
    /// A peer without a certificate asked for a sync session.
    #[error("a client certificate is required; join with a token first")]
    Uncertified {
        /// Where it connected from.
        remote: SocketAddr,
    },
    /// A certificate request to a node that is not a head.
    #[error("this node does not issue certificates; join through a head")]
    NotIssuing {
        /// Where it connected from.
        remote: SocketAddr,
    },
    /// A first frame that opens neither a session nor a certificate request.
    #[error("unexpected first frame")]
    UnexpectedFrame {
        /// Where it connected from.
        remote: SocketAddr,
    },
}

/// How long shutdown waits for close frames to reach peers.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long shutdown waits for the sessions to end and store their sync states.
const SESSIONS_END_GRACE: Duration = Duration::from_secs(5);
/// A session shorter than this does not reset the reconnect backoff, so a peer that accepts
/// and then fails at once is not hammered.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// How long a connection attempt may take to complete the QUIC handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new connection may take to open its first stream and send its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals under load are logged at most this often (each is counted in the metrics).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Application close code of the links of a node that stops: its reason is a time in
/// milliseconds (ASCII digits) over which its peers spread their return, each dialing again at
/// a random moment within it, so a restart does not bring them all back at once.
pub const CLOSE_RETURN_WITHIN: u32 = 2;
/// How many peers a second a stopping node plans to take back when it is up again: its peers
/// spread their return over one second per this many of them.
pub const RETURN_RATE: usize = 250;
/// The longest a peer spreads its return over, whatever its peer asks.
pub const MAX_RETURN_WITHIN: Duration = Duration::from_secs(300);

/// Over how long the `peers` of a stopping node spread their return.
fn return_within(peers: usize) -> Duration {
    Duration::from_millis((peers * 1000 / RETURN_RATE) as u64).min(MAX_RETURN_WITHIN)
}

/// When to dial again after a link closed with `reason`: at a random moment within the time
/// a stopping peer asked its peers to spread their return over, if it did.
fn return_delay(reason: Option<&quinn::ConnectionError>) -> Option<Duration> {
    let Some(quinn::ConnectionError::ApplicationClosed(close)) = reason else {
        return None;
    };
    if close.error_code != quinn::VarInt::from_u32(CLOSE_RETURN_WITHIN) {
        return None;
    }
    let millis: u64 = std::str::from_utf8(&close.reason).ok()?.parse().ok()?;
    let within = Duration::from_millis(millis).min(MAX_RETURN_WITHIN);
    let [a, b, c, d] = crate::transport::tls::random_bytes::<4>();
    Some(within.mul_f64(f64::from(u32::from_le_bytes([a, b, c, d])) / f64::from(u32::MAX)))
}

/// Accepts connections on `endpoint` until `shutdown`: certified peers the gate admits get a
/// sync session, others may only join (if there is a gate). Attempts that have proven nothing
/// yet are bounded per source and in total (see [`admission`]); a certified peer stops counting
/// once its handshake completes. When every place is taken, attempts from proven addresses
/// wait in order for one, up to [`admission::MAX_WAIT`].
pub async fn serve(
    endpoint: quinn::Endpoint,
    node: Node,
    gate: Option<Gate>,
    shutdown: CancellationToken,
) {
    let admission = Admission::new();
    let mut waiting: VecDeque<(tokio::time::Instant, quinn::Incoming)> = VecDeque::new();
    let mut last_logged: Option<tokio::time::Instant> = None;
    let sessions = tokio_util::task::TaskTracker::new();
    let start = |incoming: quinn::Incoming, ticket: Ticket| {
        let (node, gate, shutdown) = (node.clone(), gate.clone(), shutdown.child_token());
        let remote = incoming.remote_address();
        sessions.spawn(
            async move {
                if let Err(e) = handle_incoming(incoming, node, gate, ticket, shutdown).await {
                    warn!(error = %e, "connection refused");
                }
            }
            .instrument(tracing::info_span!("conn", peer = %remote)),
        );
    };
    loop {
        let expires = waiting
            .front()
            .map(|(since, _)| *since + admission::MAX_WAIT);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                match admission.decide(remote.ip(), incoming.remote_address_validated()) {
                    Decision::Admit(ticket) => start(incoming, ticket),
                    Decision::Wait => waiting.push_back((tokio::time::Instant::now(), incoming)),
                    Decision::Retry => {
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().refuse();
                        }
                    }
                    Decision::Refuse => {
                        incoming.refuse();
                        refused(&node, "busy");
                        if last_logged.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                            last_logged = Some(tokio::time::Instant::now());
                            warn!(peer = %remote, pending = admission.pending(), waiting = admission.waiting(), "too many connections being set up; refusing new ones");
                        }
                    }
                }
            }
            _ = admission.freed(), if !waiting.is_empty() => {}
            _ = tokio::time::sleep_until(expires.unwrap_or_else(tokio::time::Instant::now)), if expires.is_some() => {}
        }
        // The waiting room, oldest first: a place for each while there are places; refused
        // once it waited too long (its peer is about to give up).
        while let Some((since, incoming)) = waiting.pop_front() {
            let ip = incoming.remote_address().ip();
            if since.elapsed() >= admission::MAX_WAIT {
                admission.leave(ip);
                incoming.refuse();
                refused(&node, "busy");
                continue;
            }
            match admission.admit_waiting(ip) {
                Some(ticket) => start(incoming, ticket),
                None => {
                    waiting.push_front((since, incoming));
                    break;
                }
            }
        }
    }
    for (_, incoming) in waiting.drain(..) {
        incoming.refuse();
    }
    // Every link at once, each peer told to spread its return.
    let within = return_within(endpoint.open_connections());
    endpoint.close(
        CLOSE_RETURN_WITHIN.into(),
        within.as_millis().to_string().as_bytes(),
    );
    // Each session stores its sync states as it ends (a stuck peer's after its writer gives
    // up, a second).
    sessions.close();
    let _ = tokio::time::timeout(SESSIONS_END_GRACE, sessions.wait()).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
}

fn refused(node: &Node, reason: &str) {
    let labels = ReasonLabels {
        reason: reason.into(),
    };
    node.metrics()
        .handshakes_refused
        .get_or_create(&labels)
        .inc();
}

/// Runs `step` of an unproven connection attempt within `limit`, unless the attempt's place is
/// taken back first. None (after logging and counting why) if it did not finish.
async fn unproven<T>(
    node: &Node,
    ticket: Option<&Ticket>,
    limit: Duration,
    step: impl Future<Output = T>,
) -> Option<T> {
    let cut = async {
        match ticket {
            Some(ticket) => ticket.cut.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = cut => {
            debug!("connection attempt cut off to make room for other addresses");
            refused(node, "evicted");
            None
        }
        done = tokio::time::timeout(limit, step) => {
            if done.is_err() {
                debug!(?limit, "connection attempt timed out");
                refused(node, "timeout");
            }
            done.ok()
        }
    }
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    node: Node,
    gate: Option<Gate>,
    ticket: Ticket,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    // Boxed: the handshake's futures are most of this task's size, and the task of a peer
    // that stays connected would keep their room for the link's whole life (3 KiB per edge).
    let Some(opened) = Box::pin(open(incoming, &node, ticket)).await? else {
        return Ok(());
    };
    let Opened {
        conn,
        identity,
        send,
        recv,
        frame,
    } = opened;
    let remote = conn.remote_address();
    match (frame, identity) {
        (
            Some(Frame::Hello {
                advertise, version, ..
            }),
            Some(peer),
        ) => {
            let admitted = match &gate {
                Some(gate) => (gate.admit)(peer.clone()).await,
                None => Ok(()),
            };
            if let Err(reason) = admitted {
                let refused = LinkError::NotAdmitted {
                    peer: peer.name.clone(),
                    reason,
                };
                let message = refused.to_string();
                answer(&conn, send, Frame::Error { message }).await;
                return Err(refused);
            }
            info!(peer = %peer.name, role = %peer.role, "peer connected");
            // Where the peer is reachable: what it advertises, else what we see.
            let reachable = advertise.parse().unwrap_or(remote.ip());
            let address = PeerAddress {
                seen: remote.to_string(),
                reachable,
                // Shown to operators: only what a version is made of, never escapes.
                version: (!version.is_empty()
                    && version
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".+-_".contains(c)))
                .then_some(version),
            };
            let dialect = transport::Dialect::of(&conn);
            let stopping = shutdown.clone();
            let result =
                run_session(node, peer.clone(), address, recv, send, dialect, shutdown).await;
            log_end(&peer, &result, conn.close_reason());
            // A stopping node closes every link at once, with when to come back.
            if !stopping.is_cancelled() {
                conn.close(0u32.into(), b"bye");
            }
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
            let refused = match (&frame, &identity) {
                (Some(Frame::Hello { .. }), None) => LinkError::Uncertified { remote },
                (Some(Frame::JoinRequest { .. } | Frame::Renew { .. }), _) => {
                    LinkError::NotIssuing { remote }
                }
                _ => LinkError::UnexpectedFrame { remote },
            };
            let message = refused.to_string();
            answer(&conn, send, Frame::Error { message }).await;
            Err(refused)
        }
    }
}

/// A connection attempt with its handshake done and its first frame read.
struct Opened {
    conn: quinn::Connection,
    /// The peer's certificate of this CA, if it presented one.
    identity: Option<Identity>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    frame: Option<Frame>,
}

/// Completes the handshake of `incoming` and reads its first frame, each step in its time
/// and while the attempt keeps its place (`ticket`) if the peer presented no certificate;
/// None (counted and logged) if either did not finish.
async fn open(
    incoming: quinn::Incoming,
    node: &Node,
    ticket: Ticket,
) -> Result<Option<Opened>, LinkError> {
    let mut ticket = Some(ticket);
    let handshake = std::future::IntoFuture::into_future(incoming);
    let Some(conn) = unproven(node, ticket.as_ref(), HANDSHAKE_TIMEOUT, handshake).await else {
        return Ok(None);
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => {
            debug!(error = %e, "handshake failed");
            refused(node, "handshake");
            return Ok(None);
        }
    };
    let identity = transport::peer_identity(&conn);
    if identity.is_some() {
        // A certificate of this CA: no longer an unproven attempt.
        ticket = None;
    }
    let first = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let frame = read_frame(&mut recv, MAX_FIRST_FRAME).await?;
        Ok::<_, LinkError>((send, recv, frame))
    };
    let Some(first) = unproven(node, ticket.as_ref(), FIRST_FRAME_TIMEOUT, first).await else {
        conn.close(1u32.into(), b"no request in time");
        return Ok(None);
    };
    let (send, recv, frame) = first?;
    Ok(Some(Opened {
        conn,
        identity,
        send,
        recv,
        frame,
    }))
}

/// Sends the one answer of a short exchange and gives the peer a moment to read it and close.
async fn answer(conn: &quinn::Connection, mut send: quinn::SendStream, frame: Frame) {
    let _ = write_frame(&mut send, &frame).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
}

/// Keeps one link to whichever of `targets` answers first, dialing from `source` if given,
/// reconnecting with backoff until `shutdown`. `tls` must present this node's certificate.
pub async fn dial(
    node: Node,
    targets: Vec<String>,
    tls: TlsSource,
    source: Option<IpAddr>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    let mut endpoints: Vec<(bool, quinn::Endpoint)> = Vec::new();
    while !shutdown.is_cancelled() {
        let addrs = transport::resolve(&targets).await;
        let attempt = match tls() {
            Ok(tls) => tokio::select! {
                _ = shutdown.cancelled() => None,
                conn = connect_any(&mut endpoints, &addrs, &tls, source) => conn,
            },
            Err(e) => {
                warn!(error = %e, "no usable client certificate");
                None
            }
        };
        if let Some(conn) = attempt {
            let span = tracing::info_span!("link", peer = %conn.remote_address());
            let started = std::time::Instant::now();
            let closed = run_link(&node, conn, shutdown.child_token())
                .instrument(span)
                .await;
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            if let Some(delay) = return_delay(closed.as_ref()) {
                info!(
                    ?delay,
                    "the peer is stopping; dialing again after a random part of the time it asked for"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
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
    source: Option<IpAddr>,
) -> Option<quinn::Connection> {
    let mut attempts = tokio::task::JoinSet::new();
    for &addr in addrs {
        match endpoint_for(endpoints, addr, source) {
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
    source: Option<IpAddr>,
) -> Result<quinn::Endpoint, transport::TransportError> {
    if let Some((_, e)) = endpoints.iter().find(|(v6, _)| *v6 == addr.is_ipv6()) {
        return Ok(e.clone());
    }
    let endpoint = transport::client(addr, source)?;
    endpoints.push((addr.is_ipv6(), endpoint.clone()));
    Ok(endpoint)
}

/// Runs a sync session on a dialed connection; returns why the connection closed, if the
/// peer or the network closed it.
async fn run_link(
    node: &Node,
    conn: quinn::Connection,
    shutdown: CancellationToken,
) -> Option<quinn::ConnectionError> {
    let remote = conn.remote_address();
    let Some(peer) = transport::peer_identity(&conn) else {
        warn!("peer certificate carries no edgesync identity; disconnecting");
        conn.close(0u32.into(), b"no identity");
        return None;
    };
    // A peer that negotiated the older protocol refuses a Hello with a version.
    let dialect = transport::Dialect::of(&conn);
    let opened = async {
        let (mut send, recv) = conn.open_bi().await?;
        write_frame(
            &mut send,
            &Frame::Hello {
                name: node.name().to_string(),
                advertise: node.advertise().map(|a| a.to_string()).unwrap_or_default(),
                version: match dialect.hello_version {
                    true => crate::version::short(),
                    false => String::new(),
                },
            },
        )
        .await?;
        Ok::<_, LinkError>((send, recv))
    };
    match opened.await {
        Ok((send, recv)) => {
            info!(peer = %peer.name, "connected");
            let address = PeerAddress {
                seen: remote.to_string(),
                reachable: remote.ip(),
                version: None,
            };
            let result = run_session(
                node.clone(),
                peer.clone(),
                address,
                recv,
                send,
                dialect,
                shutdown,
            )
            .await;
            log_end(&peer, &result, conn.close_reason());
        }
        Err(e) => warn!(error = %e, "could not open a sync stream"),
    }
    let closed = conn.close_reason();
    conn.close(0u32.into(), b"bye");
    closed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls;

    #[test]
    fn peers_spread_their_return_over_a_second_per_rate_of_them() {
        assert_eq!(return_within(0), Duration::ZERO);
        assert_eq!(return_within(RETURN_RATE), Duration::from_secs(1));
        assert_eq!(return_within(10_000), Duration::from_secs(40));
        assert_eq!(return_within(usize::MAX / 1000), MAX_RETURN_WITHIN);
    }

    /// A server that stops closes a client's connection as [`serve`] does; what the client
    /// makes of it.
    #[tokio::test]
    async fn a_stopping_peer_says_over_how_long_to_come_back() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = tls::Ca::generate().unwrap();
        let head = ca.issue_head("head").unwrap();
        let server_tls = tls::server_config(&ca.cert, &head).unwrap();
        let server = transport::server(
            "127.0.0.1:0".parse().unwrap(),
            server_tls,
            [0; 32],
            Arc::new(quinn::TokioRuntime),
        );
        let server = server.unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            (conn, server)
        });
        let client_tls = tls::client_config(&ca.cert, &ca.issue_head("edge").unwrap()).unwrap();
        let client = transport::client(addr, None).unwrap();
        let conn = transport::connect(&client, addr, client_tls).await.unwrap();
        let (_server_conn, server) = accept.await.unwrap();
        server.close(CLOSE_RETURN_WITHIN.into(), b"4000");
        let closed = conn.closed().await;
        let delays: Vec<Duration> = (0..50)
            .map(|_| return_delay(Some(&closed)).expect("a return delay"))
            .collect();
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(4)),
            "{delays:?}"
        );
        assert!(
            delays.iter().any(|d| *d > Duration::from_secs(2)),
            "{delays:?}"
        );
        assert!(
            delays.iter().any(|d| *d < Duration::from_secs(2)),
            "{delays:?}"
        );

        // Any other close, or a reason that is no time, is no request to wait.
        let close = |code: u32, reason: &'static [u8]| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code.into(),
                reason: reason.into(),
            })
        };
        assert_eq!(return_delay(Some(&close(0, b"bye"))), None);
        assert_eq!(
            return_delay(Some(&close(CLOSE_RETURN_WITHIN, b"soon"))),
            None
        );
        assert_eq!(return_delay(None), None);
        let far = close(CLOSE_RETURN_WITHIN, b"99999999999");
        assert!(return_delay(Some(&far)).unwrap() <= MAX_RETURN_WITHIN);
    }
}
