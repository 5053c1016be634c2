//! Admission of connections that have proven nothing yet (between the first QUIC packet and a
//! certificate or first frame), sans IO: bounded per source and in total, with QUIC Retry
//! asked of unproven addresses under load, and room made for a new source by cutting the
//! oldest attempt of the source holding the most.

use crate::node::lock;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Connection attempts that may be unproven at once, from all sources.
pub const MAX_PENDING: usize = 256;
/// Connection attempts that may be unproven at once from one source (an IPv4 address or an
/// IPv6 /64).
pub const MAX_PENDING_PER_SOURCE: usize = 16;
/// With this many attempts pending, a source must prove its address (QUIC Retry) first.
pub const RETRY_ABOVE: usize = 32;

/// What to do with a new connection attempt.
#[derive(Debug)]
pub enum Decision {
    /// Go ahead while holding the ticket.
    Admit(Ticket),
    /// Ask the client to prove it owns its address (QUIC Retry), then decide again.
    Retry,
    /// Refuse it: its source has as many attempts pending as it may.
    Refuse,
}

/// The pending connection attempts, by source.
#[derive(Debug)]
pub struct Admission {
    state: Mutex<State>,
    max_total: usize,
    max_per_source: usize,
}

#[derive(Debug, Default)]
struct State {
    sources: HashMap<IpAddr, VecDeque<Slot>>,
    total: usize,
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

impl Admission {
    /// The limits edgesync runs with.
    pub fn new() -> Arc<Admission> {
        Admission::with_limits(MAX_PENDING, MAX_PENDING_PER_SOURCE)
    }

    /// Custom limits (tests).
    pub fn with_limits(max_total: usize, max_per_source: usize) -> Arc<Admission> {
        Arc::new(Admission {
            state: Mutex::default(),
            max_total,
            max_per_source,
        })
    }

    /// Decides on an attempt from `ip`; `validated` says whether it proved its address.
    pub fn decide(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Decision {
        let source = source_of(ip);
        let mut state = lock(&self.state);
        let mine = state.sources.get(&source).map_or(0, VecDeque::len);
        // Spoofed sources cannot hold places: under load, or beside another attempt from the
        // same source, an address must prove itself first (a Retry costs the server no state).
        if !validated && (state.total >= RETRY_ABOVE.min(self.max_total) || mine > 0) {
            return Decision::Retry;
        }
        if mine >= self.max_per_source {
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
                return Decision::Refuse;
            };
            let slots = state.sources.get_mut(&heaviest).expect("found above");
            if let Some(oldest) = slots.pop_front() {
                oldest.cut.cancel();
            }
            state.total -= 1;
        }
        state.next_id += 1;
        let id = state.next_id;
        let cut = CancellationToken::new();
        let slot = Slot {
            id,
            cut: cut.clone(),
        };
        state.sources.entry(source).or_default().push_back(slot);
        state.total += 1;
        Decision::Admit(Ticket {
            admission: self.clone(),
            source,
            id,
            cut,
        })
    }

    /// Attempts pending now.
    pub fn pending(&self) -> usize {
        lock(&self.state).total
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
        let a = Admission::with_limits(100, 3);
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
        let a = Admission::with_limits(100, 50);
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
        let a = Admission::with_limits(6, 4);
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
