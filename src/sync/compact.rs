//! A denser encoding of Automerge sync messages, spoken on connections that negotiated
//! [`crate::transport::tls::ALPN_COMPACT`]: the same message, with each change hash written as
//! a reference wherever the receiver can tell it without its 32 bytes, and lengths as LEB128.
//!
//! Most hashes of a small message can be told: a message that carries a change announces that
//! change's hash as its head, and the shared heads it names are the change's dependencies; an
//! acknowledgement names the heads the receiver announced itself. A hash is written as:
//!
//! | tag | then | the hash |
//! |---|---|---|
//! | 0 | 32 bytes | as written |
//! | 1 | change `i` | of the message's `i`-th change |
//! | 2 | change `i`, dependency `j` | the `j`-th dependency of that change |
//! | 3 | `i` | the `i`-th hash written before in this message |
//! | 4 | [`PREFIX_LEN`] bytes | of the hash the receiver has that begins with them |
//!
//! The sender writes a prefix only for a hash the receiver surely has: one it announced as a
//! head, or one both had at the last sync. The receiver looks it up among its heads and sync
//! state, then its whole history; one it cannot find, or finds twice, fails the document's
//! sync like any undecodable message.
//!
//! The message itself: `flags u8` (bit 0: Automerge's version 2 message; bit 1: Automerge
//! flags follow) `[automerge flags u8]`, the changes (a count, then each length-prefixed),
//! then heads, need and have as Automerge orders them (each list a count and its hashes; a
//! have's bloom filter length-prefixed).

use automerge::sync::{self, BloomFilter, Have, MessageFlags, MessageVersion};
use automerge::{AutoCommit, Change, ChangeHash};

/// Bytes of a hash written as a prefix.
pub const PREFIX_LEN: usize = 8;
/// Most changes of a message whose hashes the sender works out to refer to them; a larger
/// message (a first sync) writes its hashes whole, which weigh little beside its changes.
const MAX_REFERRED_CHANGES: usize = 16;

const V2: u8 = 1;
const FLAGS: u8 = 2;

const LITERAL: u8 = 0;
const CHANGE: u8 = 1;
const DEPENDENCY: u8 = 2;
const EARLIER: u8 = 3;
const PREFIX: u8 = 4;

/// Encodes `message`; `theirs` are hashes the receiver has (the heads it announced, and the
/// heads both had at the last sync), which may go as prefixes.
pub fn encode(message: &sync::Message, theirs: &[ChangeHash]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut flags = 0;
    if message.version == MessageVersion::V2 {
        flags |= V2;
    }
    if message.flags.is_some() {
        flags |= FLAGS;
    }
    out.push(flags);
    if let Some(f) = message.flags {
        out.push(
            (0..8)
                .filter(|bit| f.contains(1 << bit))
                .map(|bit| 1 << bit)
                .sum(),
        );
    }
    let chunks: Vec<&[u8]> = message.changes.iter().collect();
    uint(&mut out, chunks.len());
    for chunk in &chunks {
        bytes(&mut out, chunk);
    }
    let changes: Vec<Option<Change>> = match chunks.len() <= MAX_REFERRED_CHANGES {
        true => chunks
            .iter()
            .map(|c| Change::from_bytes(c.to_vec()).ok())
            .collect(),
        false => Vec::new(),
    };
    let mut writer = RefWriter {
        out,
        changes,
        theirs,
        written: Vec::new(),
    };
    writer.list(&message.heads);
    writer.list(&message.need);
    uint(&mut writer.out, message.have.len());
    for have in &message.have {
        writer.list(&have.last_sync);
        bytes(&mut writer.out, &have.bloom.to_bytes());
    }
    writer.out
}

struct RefWriter<'a> {
    out: Vec<u8>,
    changes: Vec<Option<Change>>,
    theirs: &'a [ChangeHash],
    written: Vec<ChangeHash>,
}

impl RefWriter<'_> {
    fn list(&mut self, hashes: &[ChangeHash]) {
        uint(&mut self.out, hashes.len());
        for hash in hashes {
            self.hash(hash);
        }
    }

    fn hash(&mut self, hash: &ChangeHash) {
        let out = &mut self.out;
        let changes = self.changes.iter().enumerate();
        let found = changes.filter_map(|(i, c)| Some((i, c.as_ref()?)));
        if let Some((i, _)) = found.clone().find(|(_, c)| c.hash() == *hash) {
            out.push(CHANGE);
            uint(out, i);
        } else if let Some((i, j)) = found
            .flat_map(|(i, c)| c.deps().iter().enumerate().map(move |(j, d)| (i, j, d)))
            .find(|(_, _, d)| *d == hash)
            .map(|(i, j, _)| (i, j))
        {
            out.push(DEPENDENCY);
            uint(out, i);
            uint(out, j);
        } else if let Some(i) = self.written.iter().position(|h| h == hash) {
            out.push(EARLIER);
            uint(out, i);
        } else if self.theirs.contains(hash) {
            out.push(PREFIX);
            out.extend_from_slice(&hash.0[..PREFIX_LEN]);
        } else {
            out.push(LITERAL);
            out.extend_from_slice(&hash.0);
        }
        self.written.push(*hash);
    }
}

fn uint(out: &mut Vec<u8>, n: usize) {
    leb128::write::unsigned(out, n as u64).expect("writing to a Vec cannot fail");
}

fn bytes(out: &mut Vec<u8>, data: &[u8]) {
    uint(out, data.len());
    out.extend_from_slice(data);
}

/// A hash as read: whole, or a prefix the receiver's document resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ref {
    Hash(ChangeHash),
    Prefix([u8; PREFIX_LEN]),
}

/// A compact message as read, its prefixes not yet looked up: see [`Message::resolve`].
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    version: MessageVersion,
    flags: Option<MessageFlags>,
    changes: Vec<Vec<u8>>,
    heads: Vec<Ref>,
    need: Vec<Ref>,
    have: Vec<(Vec<Ref>, BloomFilter)>,
}

/// Reads a compact message; every count and length is checked against what is left.
pub fn decode(input: &[u8]) -> Result<Message, String> {
    let mut r = Reader {
        input,
        parsed: Vec::new(),
        read: Vec::new(),
    };
    let flags = r.byte()?;
    if flags & !(V2 | FLAGS) != 0 {
        return Err(format!("unknown message flags {flags:#04x}"));
    }
    let automerge_flags = match flags & FLAGS != 0 {
        true => {
            let bits = r.byte()?;
            let mut f = MessageFlags::new();
            (0..8)
                .filter(|bit| bits & (1 << bit) != 0)
                .for_each(|bit| f.set(1 << bit));
            Some(f)
        }
        false => None,
    };
    let count = r.count(1)?;
    let mut changes = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.count(1)?;
        changes.push(r.take(len)?.to_vec());
    }
    r.parsed = vec![None; changes.len()];
    let heads = r.list(&changes)?;
    let need = r.list(&changes)?;
    let mut have = Vec::new();
    for _ in 0..r.count(2)? {
        let last_sync = r.list(&changes)?;
        let len = r.count(1)?;
        let bloom =
            BloomFilter::try_from(r.take(len)?).map_err(|e| format!("bloom filter: {e}"))?;
        have.push((last_sync, bloom));
    }
    if !r.input.is_empty() {
        return Err("trailing bytes after the message".into());
    }
    Ok(Message {
        version: match flags & V2 != 0 {
            true => MessageVersion::V2,
            false => MessageVersion::V1,
        },
        flags: automerge_flags,
        changes,
        heads,
        need,
        have,
    })
}

struct Reader<'a> {
    input: &'a [u8],
    /// The changes' hashes and dependencies, parsed when first referred to.
    parsed: Vec<Option<(ChangeHash, Vec<ChangeHash>)>>,
    read: Vec<Ref>,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.input.len() {
            return Err("message cut short".into());
        }
        let (taken, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(taken)
    }

    fn uint(&mut self) -> Result<usize, String> {
        let n = leb128::read::unsigned(&mut self.input).map_err(|_| "bad integer".to_string())?;
        usize::try_from(n).map_err(|_| "integer out of range".to_string())
    }

    /// A count of items of at least `each` bytes, which the rest of the input must be able
    /// to hold (so nothing is allocated for a count the message cannot back).
    fn count(&mut self, each: usize) -> Result<usize, String> {
        let n = self.uint()?;
        match n
            .checked_mul(each)
            .is_some_and(|len| len <= self.input.len())
        {
            true => Ok(n),
            false => Err("count larger than the message".into()),
        }
    }

    fn list(&mut self, changes: &[Vec<u8>]) -> Result<Vec<Ref>, String> {
        let count = self.count(2)?;
        let mut refs = Vec::with_capacity(count);
        for _ in 0..count {
            let r = self.hash(changes)?;
            self.read.push(r);
            refs.push(r);
        }
        Ok(refs)
    }

    fn hash(&mut self, changes: &[Vec<u8>]) -> Result<Ref, String> {
        match self.byte()? {
            LITERAL => Ok(Ref::Hash(ChangeHash(
                self.take(32)?.try_into().expect("32 bytes taken"),
            ))),
            CHANGE => {
                let i = self.uint()?;
                Ok(Ref::Hash(self.change(changes, i)?.0))
            }
            DEPENDENCY => {
                let (i, j) = (self.uint()?, self.uint()?);
                let deps = &self.change(changes, i)?.1;
                let dep = deps.get(j).ok_or("reference to a missing dependency")?;
                Ok(Ref::Hash(*dep))
            }
            EARLIER => {
                let i = self.uint()?;
                Ok(*self.read.get(i).ok_or("reference to a hash not read yet")?)
            }
            PREFIX => Ok(Ref::Prefix(
                self.take(PREFIX_LEN)?.try_into().expect("prefix taken"),
            )),
            tag => Err(format!("unknown hash reference {tag}")),
        }
    }

    fn change(
        &mut self,
        changes: &[Vec<u8>],
        i: usize,
    ) -> Result<&(ChangeHash, Vec<ChangeHash>), String> {
        let slot = self
            .parsed
            .get_mut(i)
            .ok_or("reference to a missing change")?;
        if slot.is_none() {
            let change = Change::from_bytes(changes[i].clone())
                .map_err(|e| format!("change {i} referred to does not parse: {e}"))?;
            *slot = Some((change.hash(), change.deps().to_vec()));
        }
        Ok(slot.as_ref().expect("parsed above"))
    }
}

impl Message {
    /// The Automerge message, its prefixes looked up in `doc` (the receiver's document) and
    /// `state` (its sync state with the sender).
    pub fn resolve(
        self,
        doc: &mut AutoCommit,
        state: &sync::State,
    ) -> Result<sync::Message, String> {
        let mut lookup = Lookup {
            known: None,
            all: None,
        };
        let mut hashes = |refs: Vec<Ref>| -> Result<Vec<ChangeHash>, String> {
            refs.into_iter()
                .map(|r| match r {
                    Ref::Hash(h) => Ok(h),
                    Ref::Prefix(p) => lookup.find(&p, doc, state),
                })
                .collect()
        };
        let heads = hashes(self.heads)?;
        let need = hashes(self.need)?;
        let mut have = Vec::with_capacity(self.have.len());
        for (last_sync, bloom) in self.have {
            have.push(Have {
                last_sync: hashes(last_sync)?,
                bloom,
            });
        }
        Ok(sync::Message {
            heads,
            need,
            have,
            changes: self.changes.into(),
            flags: self.flags,
            version: self.version,
        })
    }
}

/// Where a prefix is looked up: first the hashes the sender most likely means, then, only if
/// need be, every change of the document.
struct Lookup {
    known: Option<Vec<ChangeHash>>,
    all: Option<Vec<ChangeHash>>,
}

impl Lookup {
    fn find(
        &mut self,
        prefix: &[u8; PREFIX_LEN],
        doc: &mut AutoCommit,
        state: &sync::State,
    ) -> Result<ChangeHash, String> {
        let known = self.known.get_or_insert_with(|| {
            let mut known = doc.get_heads();
            known.extend(&state.last_sent_heads);
            known.extend(&state.shared_heads);
            known
        });
        if let Some(hash) = unique(known.iter(), prefix)? {
            return Ok(hash);
        }
        #[cfg(test)]
        tests::SLOW_LOOKUPS.with(|n| n.set(n.get() + 1));
        let all = self.all.get_or_insert_with(|| {
            doc.get_changes_meta(&[])
                .into_iter()
                .map(|m| m.hash)
                .collect()
        });
        unique(all.iter(), prefix)?.ok_or_else(|| {
            format!(
                "no change of the document begins with {}",
                hex::encode(prefix)
            )
        })
    }
}

/// The one hash of `hashes` that begins with `prefix` (duplicates of it allowed), if any.
fn unique<'a>(
    hashes: impl Iterator<Item = &'a ChangeHash>,
    prefix: &[u8; PREFIX_LEN],
) -> Result<Option<ChangeHash>, String> {
    let mut found: Option<ChangeHash> = None;
    for hash in hashes.filter(|h| h.0.starts_with(prefix)) {
        if found.is_some_and(|f| f != *hash) {
            return Err(format!("two changes begin with {}", hex::encode(prefix)));
        }
        found = Some(*hash);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, ROOT, sync::SyncDoc};

    thread_local! {
        /// Lookups of a prefix in a document's whole history, on this test's thread.
        pub(super) static SLOW_LOOKUPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_change_answered_with_a_status_resolves_its_prefixes_without_the_history() {
        let (mut head, mut edge) = (doc("head"), doc("edge"));
        let (mut sh, mut se) = (sync::State::new(), sync::State::new());
        edit(&mut head, "spec", "0");
        exchange(&mut head, &mut sh, &mut edge, &mut se);
        let before = SLOW_LOOKUPS.get();
        for i in 1..30 {
            edit(&mut head, "spec", &i.to_string());
            send((&mut head, &mut sh), (&mut edge, &mut se)).unwrap();
            edit(&mut edge, "status", &i.to_string());
            send((&mut edge, &mut se), (&mut head, &mut sh)).unwrap();
            send((&mut head, &mut sh), (&mut edge, &mut se)).unwrap();
        }
        assert_eq!(SLOW_LOOKUPS.get(), before, "lookups in the whole history");
    }

    fn doc(actor: &str) -> AutoCommit {
        AutoCommit::new().with_actor(ActorId::from(actor.as_bytes()))
    }

    fn edit(doc: &mut AutoCommit, key: &str, value: &str) {
        doc.put(ROOT, key, value).unwrap();
        doc.commit_with(automerge::transaction::CommitOptions::default().with_time(0));
    }

    /// Sends `from`'s next message to `to` the compact way, checking that `to` reads back the
    /// very message; returns its compact and its Automerge size, or None when there was none.
    fn send(
        (from, from_state): (&mut AutoCommit, &mut sync::State),
        (to, to_state): (&mut AutoCommit, &mut sync::State),
    ) -> Option<(usize, usize)> {
        let message = from.sync().generate_sync_message(from_state)?;
        let mut theirs = from_state.their_heads.clone().unwrap_or_default();
        theirs.extend(&from_state.shared_heads);
        let compact = encode(&message, &theirs);
        let read = decode(&compact).unwrap().resolve(to, to_state).unwrap();
        assert_eq!(read, message);
        let sizes = (compact.len(), message.clone().encode().len());
        to.sync().receive_sync_message(to_state, read).unwrap();
        Some(sizes)
    }

    /// Runs the exchange until both sides are quiet; the compact and Automerge bytes sent.
    fn exchange(
        a: &mut AutoCommit,
        sa: &mut sync::State,
        b: &mut AutoCommit,
        sb: &mut sync::State,
    ) -> (usize, usize) {
        let mut total = (0, 0);
        for _ in 0..10 {
            let ab = send((a, sa), (b, sb));
            let ba = send((b, sb), (a, sa));
            for (c, m) in ab.into_iter().chain(ba) {
                total = (total.0 + c, total.1 + m);
            }
            if ab.is_none() && ba.is_none() {
                return total;
            }
        }
        panic!("the exchange did not settle");
    }

    #[test]
    fn every_message_of_an_exchange_reads_back_as_sent_and_a_change_costs_less() {
        let (mut head, mut edge) = (doc("head"), doc("edge"));
        let (mut sh, mut se) = (sync::State::new(), sync::State::new());
        for i in 0..40 {
            edit(&mut head, &format!("k{i}"), "first");
        }
        // A first sync: more changes than are referred to, written whole.
        exchange(&mut head, &mut sh, &mut edge, &mut se);
        assert_eq!(head.get_heads(), edge.get_heads());
        // A change and the status it brings back, as an edge answers one.
        edit(&mut head, "spec", "v2");
        let change = send((&mut head, &mut sh), (&mut edge, &mut se)).unwrap();
        edit(&mut edge, "status", "v2 running");
        let status = send((&mut edge, &mut se), (&mut head, &mut sh)).unwrap();
        let ack = send((&mut head, &mut sh), (&mut edge, &mut se)).unwrap();
        assert_eq!(exchange(&mut head, &mut sh, &mut edge, &mut se), (0, 0));
        // Both heads come from the changes, the shared heads from their dependencies, the
        // acknowledgement's from what the edge announced.
        assert!(change.0 + 60 <= change.1, "{change:?}");
        assert!(status.0 + 60 <= status.1, "{status:?}");
        assert!(ack.0 + 50 <= ack.1, "{ack:?}");
        // Concurrent changes on both sides, and a peer that comes back with fresh state.
        edit(&mut head, "a", "1");
        edit(&mut edge, "b", "2");
        exchange(&mut head, &mut sh, &mut edge, &mut se);
        let mut fresh = sync::State::new();
        edit(&mut edge, "c", "3");
        exchange(&mut head, &mut fresh, &mut edge, &mut se);
        assert_eq!(head.get_heads(), edge.get_heads());
    }

    #[test]
    fn a_prefix_the_receiver_lacks_or_bad_input_is_an_error_never_a_panic() {
        let (mut a, mut b) = (doc("a"), doc("b"));
        edit(&mut a, "x", "1");
        let (mut sa, sb) = (sync::State::new(), sync::State::new());
        let message = a.sync().generate_sync_message(&mut sa).unwrap();
        // Claims b has a's head, which it does not.
        let compact = encode(&message, &a.get_heads());
        assert!(compact.len() < message.clone().encode().len());
        let err = decode(&compact).unwrap().resolve(&mut b, &sb).unwrap_err();
        assert!(
            err.contains("no change of the document begins with"),
            "{err}"
        );
        // Every cut of a message with changes, and flipped bytes, fail cleanly.
        edit(&mut a, "y", "2");
        let message = a
            .sync()
            .generate_sync_message(&mut sync::State::new())
            .unwrap();
        let compact = encode(&message, &[]);
        for end in 0..compact.len() {
            assert!(decode(&compact[..end]).is_err(), "cut at {end}");
        }
        for i in 0..compact.len() {
            let mut bad = compact.clone();
            bad[i] ^= 0xa5;
            if let Ok(m) = decode(&bad) {
                let _ = m.resolve(&mut b, &sb);
            }
        }
        // A change after a chunk that is none (a whole document, say) is referred to by its
        // own place in the message.
        let change = a.get_changes(&[]).pop().unwrap();
        let mut message = a
            .sync()
            .generate_sync_message(&mut sync::State::new())
            .unwrap();
        message.heads = vec![change.hash()];
        message.changes = vec![vec![0x85; 8], change.raw_bytes().to_vec()].into();
        let compact = encode(&message, &[]);
        assert_eq!(
            decode(&compact).unwrap().resolve(&mut b, &sb).unwrap(),
            message
        );
        // The fuzz corpus's seed: a head given by prefix, and a have with an empty filter.
        let seed = std::fs::read("fuzz/corpus/wire_frame/compact-message-prefix").unwrap();
        let read = decode(&seed).unwrap();
        assert_eq!(read.heads, [Ref::Prefix([1, 2, 3, 4, 5, 6, 7, 8])]);
        assert!(read.resolve(&mut b, &sb).is_err());
        assert!(decode(&[0x80]).is_err());
        assert!(decode(&[0, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
