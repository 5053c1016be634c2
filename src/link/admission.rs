//! Admission of connections that have proven nothing yet (between the first QUIC packet and a
//! certificate or first frame), sans IO: bounded per source and in total, with QUIC Retry
//! asked of unproven addresses under load, room made for a new source by cutting the oldest
//! attempt of the source holding the most, and a bounded waiting room for proven addresses
//! when every place is taken: after a head restarts, thousands of edges come back at once,
//! and one that waits its turn for a moment costs less than one refused, which backs off and
//! comes back later with a whole new attempt.

use crate::node::lock;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Connection attempts that may be unproven at once, from all sources.
pub const MAX_PENDING: usize = 256;
/// Connection attempts that may be unproven at once from one source (an IPv4 address or an
/// IPv6 /64), waiting ones included.
pub const MAX_PENDING_PER_SOURCE: usize = 16;
/// With this many attempts pending, a source must prove its address (QUIC Retry) first.
pub const RETRY_ABOVE: usize = 32;
/// Attempts from proven addresses that may wait for a place at once (each holds its first
/// datagram, about 1.5 KB).
pub const MAX_WAITING: usize = 4096;
/// Longest an attempt waits for a place before it is refused: a dialing edge gives up on a
/// handshake after [`crate::transport::CONNECT_TIMEOUT`], and one admitted later would be set
/// up for nobody.
pub const MAX_WAIT: Duration = Duration::from_secs(6);

/// What to do with a new connection attempt.
#[derive(Debug)]
pub enum Decision {
    /// Go ahead while holding the ticket.
    Admit(Ticket),
    /// Ask the client to prove it owns its address (QUIC Retry), then decide again.
    Retry,
    /// Every place is taken: hold the attempt, in order, until [`Admission::admit_waiting`]
    /// gives it one, or refuse it (and [`Admission::leave`]) after [`MAX_WAIT`].
    Wait,
    /// Refuse it: its source has as many attempts pending as it may, or the room is full.
    Refuse,
}

/// The pending connection attempts, by source.
#[derive(Debug)]
pub struct Admission {
    state: Mutex<State>,
    max_total: usize,
    max_per_source: usize,
    max_waiting: usize,
    /// Wakes whoever holds waiting attempts when a place frees up.
    freed: Notify,
}

#[derive(Debug, Default)]
struct State {
    sources: HashMap<IpAddr, VecDeque<Slot>>,
    total: usize,
    /// Attempts waiting for a place, by source.
    waiting: HashMap<IpAddr, usize>,
    waiting_total: usize,
    next_id: u64,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    cut: CancellationToken,
}

/// One admitted attempt; dropping it frees its place. `cut` fires when the place is taken
/// back to admit another source.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    source: IpAddr,
    id: u64,
    /// Fires when this attempt must end to make room.
    pub cut: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = lock(&self.admission.state);
        if let Some(slots) = state.sources.get_mut(&self.source)
            && let Some(i) = slots.iter().position(|s| s.id == self.id)
        {
            slots.remove(i);
            if slots.is_empty() {
                state.sources.remove(&self.source);
            }
            state.total -= 1;
            if state.waiting_total > 0 {
                self.admission.freed.notify_one();
            }
        }
    }
}

/// The source an address counts against: itself for IPv4, its /64 for IPv6 (one host
/// commonly holds a whole /64).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl State {
    fn pending_from(&self, source: &IpAddr) -> usize {
        self.sources.get(source).map_or(0, VecDeque::len)
    }

    fn waiting_from(&self, source: &IpAddr) -> usize {
        self.waiting.get(source).copied().unwrap_or(0)
    }

    fn unwait(&mut self, source: IpAddr) {
        if let Some(n) = self.waiting.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.waiting.remove(&source);
            }
            self.waiting_total -= 1;
        }
    }
}

impl Admission {
    /// The limits edgesync runs with.
    pub fn new() -> Arc<Admission> {
        Admission::with_limits(MAX_PENDING, MAX_PENDING_PER_SOURCE, MAX_WAITING)
    }

    /// Custom limits (tests).
    pub fn with_limits(
        max_total: usize,
        max_per_source: usize,
        max_waiting: usize,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            state: Mutex::default(),
            max_total,
            max_per_source,
            max_waiting,
            freed: Notify::new(),
        })
    }

    /// Decides on an attempt from `ip`; `validated` says whether it proved its address.
    pub fn decide(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Decision {
        let source = source_of(ip);
        let mut state = lock(&self.state);
        let mine = state.pending_from(&source);
        // Spoofed sources cannot hold places: under load, or beside another attempt from the
        // same source, an address must prove itself first (a Retry costs the server no state).
        if !validated && (state.total >= RETRY_ABOVE.min(self.max_total) || mine > 0) {
            return Decision::Retry;
        }
        if mine + state.waiting_from(&source) >= self.max_per_source {
            return Decision::Refuse;
        }
        if state.total >= self.max_total {
            // Full: the source holding the most (more than this one would) gives up its oldest.
            let heaviest = state
                .sources
                .iter()
                .max_by_key(|(_, slots)| slots.len())
                .filter(|(_, slots)| slots.len() > mine + 1)
                .map(|(ip, _)| *ip);
            let Some(heaviest) = heaviest else {
                // Proven addresses wait their turn, in order, while there is room.
                if validated && state.waiting_total < self.max_waiting {
                    *state.waiting.entry(source).or_default() += 1;
                    state.waiting_total += 1;
                    return Decision::Wait;
                }
                return Decision::Refuse;
            };
            let slots = state.sources.get_mut(&heaviest).expect("found above");
            if let Some(oldest) = slots.pop_front() {
                oldest.cut.cancel();
            }
            state.total -= 1;
        }
        Decision::Admit(self.admit(&mut state, source))
    }

    /// A place for the attempt from `ip` that waits longest, if one is free now (then it no
    /// longer waits).
    pub fn admit_waiting(self: &Arc<Self>, ip: IpAddr) -> Option<Ticket> {
        let source = source_of(ip);
        let mut state = lock(&self.state);
        if state.total >= self.max_total {
            return None;
        }
        state.unwait(source);
        Some(self.admit(&mut state, source))
    }

    /// A waiting attempt from `ip` leaves without a place (refused after [`MAX_WAIT`]).
    pub fn leave(&self, ip: IpAddr) {
        lock(&self.state).unwait(source_of(ip));
    }

    /// Resolves when a place may have freed up for a waiting attempt.
    pub async fn freed(&self) {
        self.freed.notified().await
    }

    fn admit(self: &Arc<Self>, state: &mut State, source: IpAddr) -> Ticket {
        state.next_id += 1;
        let id = state.next_id;
        let cut = CancellationToken::new();
        let slot = Slot {
            id,
            cut: cut.clone(),
        };
        state.sources.entry(source).or_default().push_back(slot);
        state.total += 1;
        Ticket {
            admission: self.clone(),
            source,
            id,
            cut,
        }
    }

    /// Attempts pending now.
    pub fn pending(&self) -> usize {
        lock(&self.state).total
    }

    /// Attempts waiting for a place now.
    pub fn waiting(&self) -> usize {
        lock(&self.state).waiting_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        [10, 0, 0, last].into()
    }

    fn admit(a: &Arc<Admission>, from: IpAddr) -> Ticket {
        match a.decide(from, true) {
            Decision::Admit(t) => t,
            other => panic!("{from} not admitted: {other:?}"),
        }
    }

    #[test]
    fn each_source_is_bounded_and_places_come_back() {
        let a = Admission::with_limits(100, 3, 0);
        let held: Vec<Ticket> = (0..3).map(|_| admit(&a, ip(1))).collect();
        assert!(matches!(a.decide(ip(1), true), Decision::Refuse));
        let other = admit(&a, ip(2));
        drop(held);
        drop(other);
        assert_eq!(a.pending(), 0);
        let _again = admit(&a, ip(1));
    }

    #[test]
    fn unproven_addresses_retry_under_load_or_beside_their_own_attempt() {
        let a = Admission::with_limits(100, 50, 0);
        let first = match a.decide(ip(1), false) {
            Decision::Admit(t) => t,
            other => panic!("{other:?}"),
        };
        assert!(matches!(a.decide(ip(1), false), Decision::Retry));
        let _second = admit(&a, ip(1));
        drop(first);
        let load: Vec<Ticket> = (0..RETRY_ABOVE)
            .map(|i| admit(&a, ip(i as u8 + 2)))
            .collect();
        assert!(matches!(a.decide(ip(200), false), Decision::Retry));
        let _proven = admit(&a, ip(200));
        drop(load);
    }

    #[test]
    fn when_full_a_new_source_takes_the_oldest_place_of_the_busiest_source() {
        let a = Admission::with_limits(6, 4, 0);
        let flood: Vec<Ticket> = (0..4).map(|_| admit(&a, ip(1))).collect();
        let others: Vec<Ticket> = (0..2).map(|_| admit(&a, ip(2))).collect();
        assert_eq!(a.pending(), 6);
        let newcomer = admit(&a, ip(3));
        assert!(
            flood[0].cut.is_cancelled(),
            "the oldest of the busiest source is cut"
        );
        assert!(flood[1..].iter().all(|t| !t.cut.is_cancelled()));
        assert!(others.iter().all(|t| !t.cut.is_cancelled()));
        assert_eq!(a.pending(), 6);
        // The busiest source cannot take back its place from a lighter one.
        assert!(matches!(a.decide(ip(1), true), Decision::Refuse));
        // A source no busier than the others cannot cut them; a new one can.
        drop(flood);
        let more: Vec<Ticket> = [4, 4, 5].into_iter().map(|i| admit(&a, ip(i))).collect();
        assert_eq!(a.pending(), 6);
        assert!(matches!(a.decide(ip(4), true), Decision::Refuse));
        let _new = admit(&a, ip(6));
        assert_eq!(a.pending(), 6);
        assert!(!newcomer.cut.is_cancelled() && !more[2].cut.is_cancelled());
        let cut = others
            .iter()
            .chain(&more)
            .filter(|t| t.cut.is_cancelled())
            .count();
        assert_eq!(cut, 1);
    }

    #[test]
    fn when_full_proven_addresses_wait_in_a_bounded_room_and_take_freed_places() {
        let a = Admission::with_limits(2, 2, 2);
        let held: Vec<Ticket> = (1..=2).map(|i| admit(&a, ip(i))).collect();
        // Unproven: asked to prove themselves first, never waiting.
        assert!(matches!(a.decide(ip(3), false), Decision::Retry));
        assert!(matches!(a.decide(ip(3), true), Decision::Wait));
        assert!(matches!(a.decide(ip(3), true), Decision::Wait));
        assert_eq!(a.waiting(), 2);
        // The room is full; a source's waiting attempts count against its own bound too.
        assert!(matches!(a.decide(ip(4), true), Decision::Refuse));
        assert!(a.admit_waiting(ip(3)).is_none(), "no place is free yet");
        drop(held);
        let first = a.admit_waiting(ip(3)).expect("a freed place");
        let _second = a.admit_waiting(ip(3)).expect("a freed place");
        assert!(a.admit_waiting(ip(3)).is_none());
        assert_eq!((a.pending(), a.waiting()), (2, 0));
        drop(first);
        // One that waited too long leaves; its source may wait again.
        let _full = admit(&a, ip(5));
        assert!(matches!(a.decide(ip(6), true), Decision::Wait));
        a.leave(ip(6));
        assert_eq!(a.waiting(), 0);
        assert!(matches!(a.decide(ip(6), true), Decision::Wait));
    }

    #[tokio::test]
    async fn a_freed_place_wakes_the_waiting_room() {
        let a = Admission::with_limits(1, 1, 1);
        let held = admit(&a, ip(1));
        assert!(matches!(a.decide(ip(2), true), Decision::Wait));
        let woken = tokio::spawn({
            let a = a.clone();
            async move { a.freed().await }
        });
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(5), woken)
            .await
            .expect("not woken")
            .unwrap();
        assert!(a.admit_waiting(ip(2)).is_some());
    }

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64() {
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_of(one), source_of(two));
        assert_ne!(source_of(one), source_of(elsewhere));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_of(mapped), ip(1));
    }
}
