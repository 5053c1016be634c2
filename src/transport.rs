//! QUIC endpoints (quinn): transport settings with keep-alive, dialing, peer identity, and
//! capped exponential backoff with jitter for reconnects.

pub mod tls;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tls::{Identity, TlsError};

/// Errors setting up or using QUIC.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// QUIC could not use the TLS configuration.
    #[error("quic tls: {0}")]
    QuicTls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// Address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// How often the dialing side of an idle connection sends a keep-alive. It keeps NAT bindings
/// open: RFC 9000 (10.1.2) finds that a packet every 30 s keeps most middleboxes' UDP state.
/// The answering side needs none of its own, which halves the idle traffic. Each keep-alive
/// costs a head some 50 µs of CPU, so with 10,000 edges every 5 s it was 10 % of a core, and
/// every 20 s 2.5 %. A keep-alive lost is sent again within the [`IDLE_TIMEOUT`]'s last 5 s.
pub const KEEP_ALIVE: Duration = Duration::from_secs(25);
/// How long a silent connection lives before it is considered dead. A lost keep-alive is
/// sent again within a second or two, well inside it. A peer that vanished is seen gone at
/// most a keep-alive interval plus this after it was last heard (a head that restarts on its
/// address ends its predecessor's links at their next packet instead; see [`server`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn transport_config(dialing: bool) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(dialing.then_some(KEEP_ALIVE));
    if dialing {
        // The answering side acknowledges each of our packets at once instead of after its
        // ACK delay: for a keep-alive that spares the head a timer and a second wake-up.
        let mut acks = quinn::AckFrequencyConfig::default();
        acks.ack_eliciting_threshold(0u32.into());
        config.ack_frequency_config(Some(acks));
    }
    // A head's connections carry small sync messages; without segmentation offload each keeps
    // a send buffer of one datagram instead of ten (13 KiB less per connected edge).
    config.enable_segmentation_offload(dialing);
    if !dialing {
        // Nor does a head probe for a larger MTU: at QUIC's least (1,200 bytes) the send buffer
        // stays one such datagram (it grew to 2.4 KiB once a larger one was found: 1.2 KiB more
        // per connected edge), and no connection sends probes every ten minutes. An edge still
        // finds the larger MTU for what it sends.
        config.mtu_discovery_config(None);
    }
    config.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("idle timeout fits QUIC's range"),
    ));
    config.max_concurrent_bidi_streams(8u32.into());
    config.max_concurrent_uni_streams(0u32.into());
    Arc::new(config)
}

/// The receive and send buffers a server socket asks of the kernel. A head's one socket takes
/// the bursts of thousands of edges at once (a reconnect storm, the acknowledgements of a
/// fan-out); with the usual default of about 200 KiB they overflow, packets drop, keep-alives
/// go unanswered and links time out, which brings more handshakes. The kernel caps it at
/// `net.core.rmem_max` and `net.core.wmem_max`.
pub const SERVER_SOCKET_BUFFER: usize = 8 << 20;

/// The most stateless resets a head sends per second: enough to end every link of a large
/// fleet to its predecessor within a keep-alive interval. Each reset is smaller than the packet
/// that brings it, so it amplifies nothing.
const RESETS_PER_SECOND: u32 = 10_000;

/// Endpoint settings from the secret heads share: the key of stateless resets, and connection
/// IDs that carry a keyed hash, so a head answers with a reset only packets for a connection ID
/// a head of its CA issued.
fn endpoint_config(secret: [u8; 32]) -> quinn::EndpointConfig {
    use ring::hmac;
    let reset_key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
    let tag = hmac::sign(&reset_key, b"connection ids");
    let cid_key = u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("8 of 32 bytes"));
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config.min_reset_interval(Duration::from_secs(1) / RESETS_PER_SECOND);
    config
}

/// A thread of its own that drives a head's QUIC endpoint and connections: packets, their
/// crypto, timers and acknowledgements. An idle edge's keep-alive then wakes this one thread;
/// on the runtime's two workers it woke both (the runtime hands work found while parked to a
/// sibling), and an idle head spent a third more CPU. The sessions, which read and write the
/// connections' streams, stay on the runtime's workers. Stops when dropped.
pub struct QuicThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl QuicThread {
    /// Starts the thread.
    pub fn start() -> std::io::Result<QuicThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("edgesync-quic".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })?;
        Ok(QuicThread {
            handle,
            stop: Some(stop),
        })
    }

    /// The runtime to give an endpoint that is to run on this thread.
    pub fn runtime(&self) -> Arc<dyn quinn::Runtime> {
        Arc::new(OnThread(self.handle.clone()))
    }
}

impl Drop for QuicThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// quinn's tokio runtime, with its tasks, timers and socket on a given runtime's thread.
#[derive(Debug)]
struct OnThread(tokio::runtime::Handle);

impl quinn::Runtime for OnThread {
    fn new_timer(&self, at: std::time::Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        let _on = self.0.enter();
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _on = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> std::time::Instant {
        quinn::TokioRuntime.now()
    }
}

/// A QUIC server endpoint on `addr` presenting `tls`, driven on `runtime` (a head's: a
/// [`QuicThread`]). `secret` signs its stateless resets: heads that share it (derived from their
/// CA) answer a packet of a connection they do not know, such as one to a head that restarted
/// on this address, with a reset its peer can verify, so the peer drops the dead link at once
/// instead of after [`IDLE_TIMEOUT`].
pub fn server(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    secret: [u8; 32],
    runtime: Arc<dyn quinn::Runtime>,
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(false));
    let bind = |source| TransportError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind)?;
    // Best effort: a smaller buffer than asked still works.
    let _ = socket.set_recv_buffer_size(SERVER_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SERVER_SOCKET_BUFFER);
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted < SERVER_SOCKET_BUFFER {
        tracing::info!(
            granted_kib = granted >> 10,
            "the UDP receive buffer is smaller than asked; for thousands of edges raise net.core.rmem_max to {} or more",
            SERVER_SOCKET_BUFFER
        );
    }
    socket.bind(&addr.into()).map_err(bind)?;
    quinn::Endpoint::new(
        endpoint_config(secret),
        Some(config),
        socket.into(),
        runtime,
    )
    .map_err(bind)
}

/// A QUIC client endpoint on an ephemeral port of `source` (the local address to dial from),
/// else of any address of the right family.
pub fn client(
    for_addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<quinn::Endpoint, TransportError> {
    let any: IpAddr = match for_addr.is_ipv6() {
        true => Ipv6Addr::UNSPECIFIED.into(),
        false => Ipv4Addr::UNSPECIFIED.into(),
    };
    let bind = SocketAddr::new(source.unwrap_or(any), 0);
    if bind.is_ipv6() != for_addr.is_ipv6() {
        return Err(TransportError::Bind {
            addr: bind,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("cannot reach {for_addr} from an address of the other family"),
            ),
        });
    }
    quinn::Endpoint::client(bind).map_err(|source| TransportError::Bind { addr: bind, source })
}

/// How long a dial may take to complete its handshake: room for a moment in a busy head's
/// waiting room ([`crate::link::admission::MAX_WAIT`]) and the handshake after it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Dials `addr` with `tls`, asking for the head's server name.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<quinn::Connection, TransportError> {
    let err = |reason: String| TransportError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let crypto = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(true));
    let connecting = endpoint
        .connect_with(config, addr, tls::HEAD_SERVER_NAME)
        .map_err(|e| err(e.to_string()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(_) => Err(err("timed out".into())),
    }
}

/// Resolves `host:port` strings to addresses, keeping order and dropping duplicates.
pub async fn resolve(targets: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for target in targets {
        match tokio::net::lookup_host(target.as_str()).await {
            Ok(addrs) => {
                for addr in addrs {
                    if !out.contains(&addr) {
                        out.push(addr);
                    }
                }
            }
            Err(e) => tracing::warn!(target = %target, error = %e, "cannot resolve"),
        }
    }
    out
}

/// The identity in the peer's client certificate, if it presented one.
pub fn peer_identity(conn: &quinn::Connection) -> Option<Identity> {
    let certs = conn.peer_identity()?;
    let certs = certs
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::identity(certs.first()?).ok()
}

/// What a connection's peers agreed to speak (its ALPN protocol), which decides the frames
/// they may send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dialect {
    /// The dialer's Hello says its version.
    pub hello_version: bool,
    /// Sync messages may go in the compact encoding.
    pub compact: bool,
    /// The peer reads a document's generation with its counts per writer.
    pub counts: bool,
}

impl Dialect {
    /// The dialect `conn` negotiated.
    pub fn of(conn: &quinn::Connection) -> Dialect {
        let protocol = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        let counts = protocol.as_deref() == Some(tls::ALPN_COUNTS);
        let compact = counts || protocol.as_deref() == Some(tls::ALPN_COMPACT);
        Dialect {
            hello_version: compact || protocol.as_deref() == Some(tls::ALPN_HELLO_VERSION),
            compact,
            counts,
        }
    }
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubles per attempt up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay: random in [ceiling/2, ceiling], ceiling = min(cap, base·2^attempt).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let [r] = tls::random_bytes::<1>();
        ceiling / 2 + ceiling.mul_f64(f64::from(r) / 510.0)
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert!(b.next_delay() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_client_binds_its_source_address_of_the_right_family() {
        let head: SocketAddr = "127.0.0.1:7444".parse().unwrap();
        let any = client(head, None).unwrap().local_addr().unwrap();
        assert!(any.ip().is_unspecified() && any.is_ipv4(), "{any}");
        let from = client(head, Some("127.0.0.3".parse().unwrap()));
        assert_eq!(
            from.unwrap().local_addr().unwrap().ip().to_string(),
            "127.0.0.3"
        );
        let other = client(head, Some("::1".parse().unwrap())).unwrap_err();
        assert!(other.to_string().contains("other family"), "{other}");
    }
}

#[cfg(test)]
mod alpn_tests {
    use super::*;

    fn on_tokio() -> Arc<dyn quinn::Runtime> {
        Arc::new(quinn::TokioRuntime)
    }

    /// The protocol a client offering `offered` and a server accepting `accepted` (this
    /// build's when None) agree on.
    async fn negotiated(offered: Vec<Vec<u8>>, accepted: Option<Vec<Vec<u8>>>) -> Option<Vec<u8>> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = tls::Ca::generate().unwrap();
        let head = ca.issue_head("head").unwrap();
        let mut server_tls = tls::server_config(&ca.cert, &head).unwrap();
        if let Some(accepted) = accepted {
            server_tls.alpn_protocols = accepted;
        }
        // Driven on a thread of its own, as a head's.
        let quic = QuicThread::start().unwrap();
        let server = server(
            "127.0.0.1:0".parse().unwrap(),
            server_tls,
            [0; 32],
            quic.runtime(),
        );
        let server = server.unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await?.await.ok()?;
            Some((conn, server))
        });
        let mut client_tls =
            tls::client_config(&ca.cert, &ca.issue_head("other").unwrap()).unwrap();
        client_tls.alpn_protocols = offered;
        let conn = connect(&client(addr, None).unwrap(), addr, client_tls)
            .await
            .unwrap();
        let _server = accept.await.unwrap();
        let data = conn.handshake_data()?;
        data.downcast::<quinn::crypto::rustls::HandshakeData>()
            .ok()?
            .protocol
    }

    #[tokio::test]
    async fn a_peer_of_the_first_release_gets_the_hello_it_knows() {
        // This build offers all four and prefers the counts per writer.
        let ours = tls::client_config(
            &tls::Ca::generate().unwrap().cert,
            &tls::Ca::generate().unwrap().issue_head("x").unwrap(),
        )
        .unwrap()
        .alpn_protocols;
        assert_eq!(
            negotiated(ours.clone(), None).await.as_deref(),
            Some(tls::ALPN_COUNTS)
        );
        // Builds before them offer and accept the compact encoding at most.
        let compact = tls::alpn_protocols()[1..].to_vec();
        assert_eq!(
            negotiated(compact.clone(), None).await.as_deref(),
            Some(tls::ALPN_COMPACT)
        );
        assert_eq!(
            negotiated(ours.clone(), Some(compact)).await.as_deref(),
            Some(tls::ALPN_COMPACT)
        );
        // Builds before the compact encoding offer and accept the Hello with a version.
        let hello_version = vec![tls::ALPN_HELLO_VERSION.to_vec(), tls::ALPN.to_vec()];
        assert_eq!(
            negotiated(hello_version.clone(), None).await.as_deref(),
            Some(tls::ALPN_HELLO_VERSION)
        );
        assert_eq!(
            negotiated(ours.clone(), Some(hello_version))
                .await
                .as_deref(),
            Some(tls::ALPN_HELLO_VERSION)
        );
        // A dialer of the first release offers only edgesync/1, and gets it.
        assert_eq!(
            negotiated(vec![tls::ALPN.to_vec()], None).await.as_deref(),
            Some(tls::ALPN)
        );
        // A head of the first release accepts only edgesync/1: this build's dialer gets it,
        // and so sends the Hello without a version.
        let first_release = Some(vec![tls::ALPN.to_vec()]);
        assert_eq!(
            negotiated(ours, first_release).await.as_deref(),
            Some(tls::ALPN)
        );
    }

    /// A client connected to a head that then vanishes (its endpoint moves away without
    /// closing anything, as a crash leaves it), when its next packet reaches `successor` on the
    /// head's address (with the head's reset key or another): how the connection ended within
    /// 3 s, if it did.
    /// An edge's connection (a certificate of `ca`) to `head`, and the head's end of it.
    async fn connect_edge(
        head: &quinn::Endpoint,
        ca: &tls::Ca,
    ) -> (quinn::Connection, quinn::Connection) {
        let addr = head.local_addr().unwrap();
        let accepted = tokio::spawn({
            let head = head.clone();
            async move { head.accept().await.unwrap().await.unwrap() }
        });
        let edge_tls = tls::client_config(&ca.cert, &ca.issue_head("edge").unwrap()).unwrap();
        let edge = connect(&client(addr, None).unwrap(), addr, edge_tls)
            .await
            .unwrap();
        (edge, accepted.await.unwrap())
    }

    async fn after_head_vanishes(same_key: bool) -> Option<quinn::ConnectionError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = tls::Ca::generate().unwrap();
        let key = ca.derive_key("reset");
        let head_tls = || tls::server_config(&ca.cert, &ca.issue_head("head").unwrap()).unwrap();
        let head = server("127.0.0.1:0".parse().unwrap(), head_tls(), key, on_tokio()).unwrap();
        let addr = head.local_addr().unwrap();
        let (conn, _kept) = connect_edge(&head, &ca).await;
        // Twice: an endpoint keeps listening on the socket it left until traffic reaches the
        // new one.
        for _ in 0..2 {
            head.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
                .unwrap();
        }
        let successor_key = match same_key {
            true => key,
            false => tls::Ca::generate().unwrap().derive_key("reset"),
        };
        // The old socket closes once the head's connection has moved off it as well.
        let mut successor = server(addr, head_tls(), successor_key, on_tokio());
        for _ in 0..100 {
            if successor.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            successor = server(addr, head_tls(), successor_key, on_tokio());
        }
        let _successor = successor.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(b"anyone there?").await.unwrap();
        tokio::time::timeout(Duration::from_secs(3), conn.closed())
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_head_on_the_same_address_and_ca_ends_its_predecessors_links_at_once() {
        assert_eq!(
            after_head_vanishes(true).await,
            Some(quinn::ConnectionError::Reset)
        );
        // Another key: the reset cannot be verified, and the link waits for its idle timeout.
        assert_eq!(after_head_vanishes(false).await, None);
    }

    /// An edge finds a larger path MTU for what it sends; a head stays at QUIC's least, which
    /// keeps its send buffer per connection one such datagram.
    #[tokio::test]
    async fn only_the_dialing_side_searches_for_a_larger_mtu() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = tls::Ca::generate().unwrap();
        let head_tls = tls::server_config(&ca.cert, &ca.issue_head("head").unwrap()).unwrap();
        let endpoint = server(
            "127.0.0.1:0".parse().unwrap(),
            head_tls,
            [0; 32],
            on_tokio(),
        )
        .unwrap();
        let (edge, head) = connect_edge(&endpoint, &ca).await;
        for _ in 0..100 {
            if edge.stats().path.current_mtu > 1200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(edge.stats().path.current_mtu > 1200);
        assert_eq!(head.stats().path.current_mtu, 1200);
        assert_eq!(head.stats().path.sent_plpmtud_probes, 0);
    }
}
