//! UDP relay between QUIC peers that can cut (both ways or one way), delay, reorder, drop and
//! duplicate datagrams.
//!
//! Tests place a [`Relay`] between a QUIC client and a QUIC server on 127.0.0.1: the client
//! dials [`Relay::local_addr`] and the relay forwards to the server. Faults are switched on and
//! off at run time; the settings are read once per datagram, so changes apply immediately.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest UDP payload the relay can carry.
const MAX_DATAGRAM: usize = 65_535;

/// Traffic counters of a [`Relay`], for assertions in tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Datagrams sent to the upstream server (a duplicate counts twice).
    pub to_upstream_packets: u64,
    /// Payload bytes sent to the upstream server.
    pub to_upstream_bytes: u64,
    /// Datagrams sent back to clients (a duplicate counts twice).
    pub to_client_packets: u64,
    /// Payload bytes sent back to clients.
    pub to_client_bytes: u64,
    /// Datagrams dropped in either direction (cut, random drop or failed send).
    pub dropped: u64,
}

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a client to the upstream server.
    ToUpstream,
    /// From the upstream server back to a client.
    ToClient,
}

impl RelayStats {
    fn record_sent(&mut self, dir: Direction, bytes: usize) {
        let (packets, total) = match dir {
            Direction::ToUpstream => (&mut self.to_upstream_packets, &mut self.to_upstream_bytes),
            Direction::ToClient => (&mut self.to_client_packets, &mut self.to_client_bytes),
        };
        *packets += 1;
        *total += bytes as u64;
    }
}

/// Fault settings and counters, shared by the [`Relay`] handle and all of its tasks.
#[derive(Debug, Default)]
struct State {
    faults: Faults,
    stats: RelayStats,
}

/// The faults a [`Relay`] applies to each datagram.
#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    cut_to_upstream: bool,
    cut_to_client: bool,
    drop: f64,
    duplicate: f64,
    delay: Duration,
    jitter: Duration,
    latency: Duration,
}

impl Faults {
    fn cut(&self, dir: Direction) -> bool {
        match dir {
            Direction::ToUpstream => self.cut_to_upstream,
            Direction::ToClient => self.cut_to_client,
        }
    }
}

/// Locks the shared state; a panic elsewhere while holding it does not matter here.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// True with probability `p` (never for 0.0 or NaN, always for 1.0).
fn chance(p: f64) -> bool {
    p > 0.0 && fastrand::f64() < p
}

/// A running UDP fault-injection relay; dropping it stops all of its tasks.
pub struct Relay {
    local_addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: watch::Sender<bool>,
    listener_task: JoinHandle<()>,
}

impl Relay {
    /// Binds 127.0.0.1:0 and forwards every datagram to `upstream`; replies go back to the client
    /// that sent them. Supports several clients at once (one upstream socket per client address,
    /// so the server sees distinct source addresses).
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        let listener = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let local_addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (shutdown, stop) = watch::channel(false);
        let (ordered, queue) = tokio::sync::mpsc::unbounded_channel();
        let ctx = Ctx {
            state: state.clone(),
            stop,
            ordered,
        };
        tokio::spawn(run_ordered(queue, ctx.clone()));
        let listener_task = tokio::spawn(run_listener(listener, upstream, ctx));
        Ok(Relay {
            local_addr,
            state,
            shutdown,
            listener_task,
        })
    }

    /// The address clients should dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Drops every datagram in both directions until [`Relay::heal`].
    pub fn cut(&self) {
        let faults = &mut lock(&self.state).faults;
        faults.cut_to_upstream = true;
        faults.cut_to_client = true;
    }

    /// Drops every datagram travelling `dir` (the other way still flows) until [`Relay::heal`].
    pub fn cut_one_way(&self, dir: Direction) {
        let faults = &mut lock(&self.state).faults;
        match dir {
            Direction::ToUpstream => faults.cut_to_upstream = true,
            Direction::ToClient => faults.cut_to_client = true,
        }
    }

    /// Ends a [`Relay::cut`] or [`Relay::cut_one_way`]; traffic flows again.
    pub fn heal(&self) {
        let faults = &mut lock(&self.state).faults;
        faults.cut_to_upstream = false;
        faults.cut_to_client = false;
    }

    /// Ends every fault: no cut, loss, delay, jitter, latency nor duplication.
    pub fn clear(&self) {
        lock(&self.state).faults = Faults::default();
    }

    /// Each datagram (each direction) is dropped with this probability (0.0..=1.0).
    pub fn set_drop(&self, probability: f64) {
        lock(&self.state).faults.drop = probability.clamp(0.0, 1.0);
    }

    /// Each forwarded datagram is delayed by this much (order per direction is not preserved).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).faults.delay = delay;
    }

    /// Each forwarded datagram is delayed by a further random time up to this much, so later
    /// datagrams overtake earlier ones (reordering).
    pub fn set_jitter(&self, jitter: Duration) {
        lock(&self.state).faults.jitter = jitter;
    }

    /// Each forwarded datagram is held this long, in order: a long link (unlike
    /// [`Relay::set_delay`], which reorders). Used instead of the delay while set.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.state).faults.latency = latency;
    }

    /// Each forwarded datagram is sent twice with this probability (0.0..=1.0).
    pub fn set_duplicate(&self, probability: f64) {
        lock(&self.state).faults.duplicate = probability.clamp(0.0, 1.0);
    }

    /// Counters: datagrams and bytes forwarded each way and dropped, for assertions on traffic.
    pub fn stats(&self) -> RelayStats {
        lock(&self.state).stats
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        lock(&self.state).stats = RelayStats::default();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Wakes every task (per-client return paths and pending delayed sends), which then exit.
        self.shutdown.send_replace(true);
        self.listener_task.abort();
    }
}

/// What every relay task needs: the shared state and the shutdown signal.
#[derive(Clone)]
struct Ctx {
    state: Arc<Mutex<State>>,
    stop: watch::Receiver<bool>,
    ordered: tokio::sync::mpsc::UnboundedSender<Held>,
}

/// A datagram held for the latency: when to send it, and where.
struct Held {
    at: tokio::time::Instant,
    socket: Arc<UdpSocket>,
    data: Vec<u8>,
    to: SocketAddr,
    dir: Direction,
    copies: usize,
}

/// Sends held datagrams in the order they came, each when its time is up.
async fn run_ordered(mut queue: tokio::sync::mpsc::UnboundedReceiver<Held>, mut ctx: Ctx) {
    loop {
        let held = tokio::select! {
            _ = ctx.stopped() => return,
            held = queue.recv() => match held {
                Some(held) => held,
                None => return,
            },
        };
        tokio::time::sleep_until(held.at).await;
        for _ in 0..held.copies {
            ctx.send(&held.socket, &held.data, held.to, held.dir).await;
        }
    }
}

impl Ctx {
    /// Resolves once the relay is shutting down (flag set or sender gone).
    async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|stopping| *stopping).await;
    }

    /// Next datagram on `socket`, or `None` once the relay is shutting down.
    async fn recv(&mut self, socket: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        loop {
            tokio::select! {
                _ = self.stopped() => return None,
                received = socket.recv_from(&mut *buf) => match received {
                    Ok(received) => return Some(received),
                    Err(e) => eprintln!("relay: receive on {:?} failed: {e}", socket.local_addr()),
                },
            }
        }
    }

    /// Applies cut, drop, duplicate, delay and jitter to one datagram, then sends it from
    /// `socket` to `to`.
    async fn forward(&self, socket: &Arc<UdpSocket>, data: &[u8], to: SocketAddr, dir: Direction) {
        let (copies, delay, latency) = {
            let mut state = lock(&self.state);
            let faults = state.faults;
            if faults.cut(dir) || chance(faults.drop) {
                state.stats.dropped += 1;
                return;
            }
            let copies = 1 + usize::from(chance(faults.duplicate));
            let jitter = faults.jitter.mul_f64(fastrand::f64());
            (copies, faults.delay + jitter, faults.latency)
        };
        if !latency.is_zero() {
            let _ = self.ordered.send(Held {
                at: tokio::time::Instant::now() + latency,
                socket: socket.clone(),
                data: data.to_vec(),
                to,
                dir,
                copies,
            });
            return;
        }
        if delay.is_zero() {
            for _ in 0..copies {
                self.send(socket, data, to, dir).await;
            }
            return;
        }
        let (mut ctx, socket, data) = (self.clone(), socket.clone(), data.to_vec());
        tokio::spawn(async move {
            tokio::select! {
                _ = ctx.stopped() => {}
                _ = tokio::time::sleep(delay) => {
                    for _ in 0..copies {
                        ctx.send(&socket, &data, to, dir).await;
                    }
                }
            }
        });
    }

    /// Sends one datagram unless the link was cut meanwhile; updates the counters.
    async fn send(&self, socket: &UdpSocket, data: &[u8], to: SocketAddr, dir: Direction) {
        {
            let mut state = lock(&self.state);
            if state.faults.cut(dir) {
                state.stats.dropped += 1;
                return;
            }
        }
        let result = socket.send_to(data, to).await;
        let stats = &mut lock(&self.state).stats;
        match result {
            Ok(sent) => stats.record_sent(dir, sent),
            Err(e) => {
                stats.dropped += 1;
                eprintln!("relay: send {dir:?} to {to} failed: {e}");
            }
        }
    }
}

/// Receives from clients, creating one upstream socket (and return-path task) per client.
async fn run_listener(listener: Arc<UdpSocket>, upstream: SocketAddr, mut ctx: Ctx) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Some((len, client)) = ctx.recv(&listener, &mut buf).await {
        let socket = match clients.get(&client) {
            Some(socket) => socket.clone(),
            None => {
                let bind = match upstream {
                    SocketAddr::V4(_) => "127.0.0.1:0",
                    SocketAddr::V6(_) => "[::1]:0",
                };
                let socket = match UdpSocket::bind(bind).await {
                    Ok(socket) => Arc::new(socket),
                    Err(e) => {
                        eprintln!("relay: bind upstream socket for {client} failed: {e}");
                        continue;
                    }
                };
                clients.insert(client, socket.clone());
                let back = run_return_path(socket.clone(), listener.clone(), client, ctx.clone());
                tokio::spawn(back);
                socket
            }
        };
        let data = &buf[..len];
        ctx.forward(&socket, data, upstream, Direction::ToUpstream)
            .await;
    }
}

/// Carries the upstream's replies for one client back to that client.
async fn run_return_path(
    upstream: Arc<UdpSocket>,
    out: Arc<UdpSocket>,
    to: SocketAddr,
    mut ctx: Ctx,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Some((len, _)) = ctx.recv(&upstream, &mut buf).await {
        ctx.forward(&out, &buf[..len], to, Direction::ToClient)
            .await;
    }
}
