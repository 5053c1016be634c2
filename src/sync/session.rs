//! The sync protocol of one session with one peer, sans IO: frames and change notices go in,
//! frames to send and sync states to store come out. No socket, database, clock or metrics
//! is inside: the caller lends the document a step concerns, passes the time, sends what
//! [`Session::poll_transmit`] returns, and reads [`Session::poll_event`] for what to log and
//! count. [`crate::sync::run_session`] drives it over a QUIC stream; the tests below drive
//! two of them in memory.
//!
//! Automerge's sync protocol runs per document. A failure that concerns one document (a
//! message too large, undecodable or not applicable) stays with it: the peer hears why, and
//! the document is tried again after a backoff while the others go on.

use super::compact;
use super::wire::{self, Frame, Reassembly, WireError};
use crate::transport::tls::Identity;
use automerge::sync::{self, SyncDoc};
use automerge::{AutoCommit, ChangeHash};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long a document whose sync failed waits before it is tried again; doubles with each
/// failure in a row, up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait before a failed document is tried again.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Documents that may be failing at once in one session; more ends the session.
pub const MAX_FAILING: usize = 1024;
/// Longest an answer that only acknowledges what was received waits for a change of this
/// side's own to the same document, to go out in one message with it (an edge answers a spec
/// change with the status its reconciler writes moments later): see [`Session::answer`].
pub const ANSWER_DELAY: Duration = Duration::from_millis(200);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The stream broke or carried an invalid frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// The encoded frames of one message, and the document they concern (None for a frame about
/// no document in particular).
#[derive(Debug)]
pub struct Transmit {
    /// The document.
    pub doc: Option<String>,
    /// Encoded frames, sent in order.
    pub frames: Vec<Vec<u8>>,
}

/// Something the caller logs or counts.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A document's sync failed; the peer was told why. `retry_in` is None when the document
    /// waits for the peer instead (a message of ours too large to send).
    Failed {
        /// The document.
        doc: String,
        /// Why.
        reason: String,
        /// When it is tried again.
        retry_in: Option<Duration>,
    },
    /// The peer sent a message for a document it may not access; it was told so.
    Refused {
        /// The document.
        doc: String,
    },
    /// The peer reported an error.
    PeerError {
        /// Its text.
        message: String,
    },
}

/// A sync message as read, to be lent its document by [`Session::receive`].
#[derive(Debug)]
pub enum Received {
    /// In Automerge's encoding.
    Plain(sync::Message),
    /// In the compact encoding, its hash prefixes not yet looked up.
    Compact(compact::Message),
}

/// Most documents one side of a session numbers for [`Frame::SyncCompact`]; a sender past it
/// sends [`Frame::Sync`], a receiver sent more ends the session.
pub const MAX_NUMBERED: usize = 1 << 18;

/// Automerge's next sync message for `doc` on `state`, if there is one.
fn generate(doc: &mut AutoCommit, state: &mut sync::State) -> Option<sync::Message> {
    #[cfg(test)]
    tests::GENERATED.with(|n| n.set(n.get() + 1));
    doc.sync().generate_sync_message(state)
}

/// What a message [`Session::receive`] applied brought its document.
#[derive(Debug)]
pub enum Brought {
    /// Exactly these changes after heads `since` (none if it brought nothing): each was new
    /// to the document and was applied, and no change it held back for missing ones came
    /// with them. The caller need not read them out of the document again, which in
    /// Automerge costs a walk of the whole document.
    Changes {
        /// The document's heads before.
        since: Vec<ChangeHash>,
        /// The changes, as the message carried them.
        changes: Vec<automerge::Change>,
    },
    /// Not known from the message alone: read the document's new changes.
    Unknown,
}

/// A message's changes as it arrives, if they are all new to the document and nothing waits
/// in its queue of changes missing others.
struct Arriving(Option<(Vec<ChangeHash>, Vec<automerge::Change>)>);

impl Arriving {
    fn of(doc: &mut AutoCommit, message: &sync::Message) -> Arriving {
        let changes: Option<Vec<automerge::Change>> = message
            .changes
            .iter()
            .map(|bytes| automerge::Change::from_bytes(bytes.to_vec()).ok())
            .collect();
        let known = changes.filter(|changes| {
            let hashes: Vec<ChangeHash> = changes.iter().map(automerge::Change::hash).collect();
            doc.get_missing_deps(&[]).is_empty()
                && doc.get_missing_deps(&hashes).len() == hashes.len()
        });
        Arriving(known.map(|changes| (doc.get_heads(), changes)))
    }

    /// What the message brought, now that it is applied.
    fn brought(self, doc: &mut AutoCommit) -> Brought {
        match self.0 {
            Some((since, changes))
                if doc
                    .get_missing_deps(&changes.iter().map(|c| c.hash()).collect::<Vec<_>>())
                    .is_empty() =>
            {
                Brought::Changes { since, changes }
            }
            _ => Brought::Unknown,
        }
    }
}

/// Whether the peer, as `state` knows it, has exactly `heads` and asks for nothing and no
/// reset is due: a message now carries no change and no need, so it could only acknowledge.
fn level(state: &sync::State, heads: &[ChangeHash]) -> bool {
    !state.needs_reset
        && state.their_heads.as_deref() == Some(heads)
        && state.their_need.as_ref().is_none_or(Vec::is_empty)
}

/// The documents' numbers of a session that speaks [`Frame::SyncCompact`].
#[derive(Debug, Default)]
struct Numbers {
    /// Given by this side.
    mine: HashMap<String, u32>,
    /// Given by the peer.
    theirs: HashMap<u32, String>,
}

impl Numbers {
    /// The document the peer numbered `number`, which `key` names anew if given.
    fn theirs(&mut self, number: u32, key: Option<String>) -> Result<String, SessionError> {
        let Some(key) = key else {
            return self.theirs.get(&number).cloned().ok_or_else(|| {
                SessionError::Protocol(format!("document number {number} was never named"))
            });
        };
        if self.theirs.len() >= MAX_NUMBERED && !self.theirs.contains_key(&number) {
            return Err(SessionError::Protocol(format!(
                "more than {MAX_NUMBERED} documents numbered"
            )));
        }
        self.theirs.insert(number, key.clone());
        Ok(key)
    }

    /// This side's number for `key`, and whether it is new (the frame then names it); None
    /// once [`MAX_NUMBERED`] are given.
    fn mine(&mut self, key: &str) -> Option<(u32, bool)> {
        if let Some(number) = self.mine.get(key) {
            return Some((*number, false));
        }
        if self.mine.len() >= MAX_NUMBERED {
            return None;
        }
        let number = self.mine.len() as u32 + 1;
        self.mine.insert(key.to_string(), number);
        Some((number, true))
    }
}

/// What a frame asks of the caller, which holds the documents.
#[derive(Debug)]
pub enum Incoming {
    /// A whole sync message for a document the peer may access: lend the document to
    /// [`Session::receive`].
    Message {
        /// The document.
        doc: String,
        /// The message.
        message: Received,
    },
    /// The peer's heads digests: answer with [`Session::on_summary`].
    Summary(Vec<(String, Vec<u8>)>),
}

/// A document whose sync with this peer failed.
#[derive(Debug, Default)]
struct Failing {
    /// Failures in a row.
    strikes: u32,
    /// Until when its messages are dropped; None once it is being tried again.
    retry_at: Option<Instant>,
}

/// One session's protocol state: a sync state per document, partly received messages, the
/// documents that failed, and what waits to go out.
#[derive(Debug)]
pub struct Session {
    peer: Identity,
    /// Boxed: a map allocates room for more entries than it holds, and most sessions (an
    /// edge's with its head) hold one, of some 180 bytes.
    states: HashMap<String, Box<sync::State>>,
    reassembly: Reassembly,
    failing: HashMap<String, Failing>,
    /// Documents whose acknowledgement is held back: until when, and their heads then. It and
    /// the queues below free their room once empty: a head keeps thousands of idle sessions.
    held: HashMap<String, (Instant, Vec<ChangeHash>)>,
    /// Until the summary goes out: the documents a message went out for before it (the
    /// resumed ones), which it leaves out.
    pushed_early: Option<HashSet<String>>,
    /// Until the peer's summary is read: the documents it sent a message for, which are being
    /// exchanged already whatever its summary says.
    heard: Option<HashSet<String>>,
    /// Set when the connection negotiated the compact encoding.
    numbers: Option<Numbers>,
    transmit: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Session {
    /// A session with `peer`, resuming from the sync states stored at the end of the last one
    /// (`(document, encoded state)`; one that does not decode starts fresh).
    pub fn new(peer: Identity, stored: Vec<(String, Vec<u8>)>) -> Session {
        let states = stored
            .into_iter()
            .filter_map(|(key, bytes)| Some((key, Box::new(sync::State::decode(&bytes).ok()?))))
            .collect();
        Session {
            peer,
            states,
            reassembly: Reassembly::default(),
            failing: HashMap::new(),
            held: HashMap::new(),
            pushed_early: Some(HashSet::new()),
            heard: Some(HashSet::new()),
            numbers: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The session, sending its sync messages in the compact encoding ([`Frame::SyncCompact`])
    /// if `compact`: both sides negotiated it.
    pub fn compact(mut self, compact: bool) -> Session {
        self.numbers = compact.then(Numbers::default);
        self
    }

    /// The peer.
    pub fn peer(&self) -> &Identity {
        &self.peer
    }

    /// Documents a stored sync state exists for.
    pub fn known(&self) -> Vec<String> {
        self.states.keys().cloned().collect()
    }

    /// Of the documents in `heads` (this side's current heads), those changed here since the
    /// last sync with the peer: the caller pushes them at once, ahead of the summary, assuming
    /// the peer is still where that sync left it (usually so after an outage). If it is not,
    /// Automerge's exchange sorts it out.
    pub fn resume(&mut self, heads: &HashMap<String, Vec<ChangeHash>>) -> Vec<String> {
        let mut changed = Vec::new();
        for (key, state) in &mut self.states {
            let Some(heads) = heads.get(key) else {
                continue;
            };
            if !state.shared_heads.is_empty() && *heads != state.shared_heads {
                assume_at_shared_heads(state);
                changed.push(key.clone());
            }
        }
        changed.sort();
        changed
    }

    /// Queues the summary: a digest of the heads of every document of `mine` the peer may see,
    /// but those a message already went out for: the peer reads that message first, and
    /// leaves them to the exchange it started (see [`Session::on_summary`]).
    pub fn summary(&mut self, mine: &[(String, Vec<ChangeHash>)]) -> Result<(), SessionError> {
        let pushed = self.pushed_early.take().unwrap_or_default();
        let entries = mine
            .iter()
            .filter(|(key, _)| self.peer.may_access(key) && !pushed.contains(key))
            .map(|(key, heads)| (key.clone(), wire::heads_digest(heads)))
            .collect();
        self.send(&Frame::Summary { entries })
    }

    /// Of `mine`, the documents whose heads differ from the peer's summary `theirs` (or that it
    /// lacks): the caller pushes each. Those the peer already sent a message for are left out:
    /// that exchange is under way (and the peer leaves them out of its summary).
    pub fn on_summary(
        &mut self,
        theirs: Vec<(String, Vec<u8>)>,
        mine: &[(String, Vec<ChangeHash>)],
    ) -> Vec<String> {
        let theirs: HashMap<String, Vec<u8>> = theirs.into_iter().collect();
        let heard = self.heard.take().unwrap_or_default();
        let mut differ = Vec::new();
        for (key, heads) in mine {
            if !self.peer.may_access(key) || heard.contains(key) {
                continue;
            }
            if let Some(digest) = theirs.get(key) {
                if wire::heads_digest(heads) == *digest {
                    continue;
                }
                if let Some(state) = self.states.get_mut(key)
                    && !state.shared_heads.is_empty()
                    && wire::heads_digest(&state.shared_heads) == *digest
                {
                    assume_at_shared_heads(state);
                }
            }
            differ.push(key.clone());
        }
        differ
    }

    /// Takes one frame from the peer. Chunks are put together, refusals and errors answered;
    /// what needs a document is handed back.
    pub fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
    ) -> Result<Option<Incoming>, SessionError> {
        // The document, the message's bytes, and whether they are in the compact encoding.
        let (doc, message, compact) = match frame {
            Frame::Sync { doc, message } => (doc, message, false),
            Frame::SyncCompact {
                number,
                key,
                message,
            } => {
                let Some(numbers) = &mut self.numbers else {
                    return Err(SessionError::Protocol(
                        "compact sync frame on a connection that did not negotiate it".into(),
                    ));
                };
                (numbers.theirs(number, key)?, message, true)
            }
            Frame::SyncChunk {
                doc,
                total,
                offset,
                data,
            } => {
                if !self.peer.may_access(&doc) {
                    if offset == 0 {
                        self.refuse(&doc)?;
                    }
                    return Ok(None);
                }
                match self.reassembly.push(&doc, total, offset, data) {
                    Ok(Some(message)) => (doc, message, false),
                    Ok(None) => return Ok(None),
                    Err(e) => {
                        self.fail(&doc, e.to_string(), now)?;
                        return Ok(None);
                    }
                }
            }
            Frame::Summary { entries } => return Ok(Some(Incoming::Summary(entries))),
            Frame::Hello { .. } => return Ok(None),
            Frame::Error { message } => {
                self.events.push_back(Event::PeerError { message });
                return Ok(None);
            }
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected frame {other:?} in a sync session"
                )));
            }
        };
        if !self.admit(&doc, now)? {
            return Ok(None);
        }
        let decoded = match compact {
            true => compact::decode(&message).map(Received::Compact),
            false => sync::Message::decode(&message)
                .map(Received::Plain)
                .map_err(|e| e.to_string()),
        };
        match decoded {
            Ok(message) => Ok(Some(Incoming::Message { doc, message })),
            Err(e) => {
                self.fail(&doc, format!("undecodable sync message: {e}"), now)?;
                Ok(None)
            }
        }
    }

    /// Whether a whole message for `doc` is to be read: the peer may access it (else it is
    /// told) and it is not waiting to be tried again.
    fn admit(&mut self, doc: &str, now: Instant) -> Result<bool, SessionError> {
        if !self.peer.may_access(doc) {
            self.refuse(doc)?;
            return Ok(false);
        }
        if let Some(heard) = &mut self.heard {
            heard.insert(doc.to_string());
        }
        Ok(!self.waits_for_retry(doc, now))
    }

    /// Applies a sync message to `doc` (document `key`, lent by the caller); returns what it
    /// brought, None if it was not applied. The caller then stores the document with
    /// [`Session::state`] if it changed, and only then calls [`Session::push`] to answer.
    pub fn receive(
        &mut self,
        key: &str,
        doc: &mut AutoCommit,
        message: Received,
        now: Instant,
    ) -> Result<Option<Brought>, SessionError> {
        let state = self.states.entry(key.to_string()).or_default();
        let message = match message {
            Received::Plain(message) => message,
            Received::Compact(message) => match message.resolve(doc, state) {
                Ok(message) => message,
                Err(e) => {
                    self.fail(key, format!("undecodable sync message: {e}"), now)?;
                    return Ok(None);
                }
            },
        };
        let arriving = Arriving::of(doc, &message);
        let applied = doc.sync().receive_sync_message(state, message);
        match applied {
            Ok(()) => {
                self.failing.remove(key);
                Ok(Some(arriving.brought(doc)))
            }
            Err(e) => {
                self.fail(key, e.to_string(), now)?;
                Ok(None)
            }
        }
    }

    /// Queues the next sync message for `doc` (document `key`), if the peer may see it, it is
    /// not waiting to be tried again, and there is one. A message too large to send is
    /// reported and not sent; the document then waits for the peer. An answer held back (see
    /// [`Session::answer`]) goes with it, unless the document is still as it was received.
    pub fn push(
        &mut self,
        key: &str,
        doc: &mut AutoCommit,
        now: Instant,
    ) -> Result<(), SessionError> {
        if let Some((_, heads)) = self.held.get(key) {
            if *heads == doc.get_heads() {
                // Only the notice of what was received: its answer waits on.
                return Ok(());
            }
            self.unhold(key);
        }
        if !self.peer.may_access(key) || self.waits_for_retry(key, now) {
            return Ok(());
        }
        let state = self.states.entry(key.to_string()).or_default();
        let heads = doc.get_heads();
        if level(state, &heads) && state.have_responded && state.last_sent_heads == heads {
            // Said already, and the peer has it all: Automerge would generate nothing, after
            // filtering what it has for the peer.
            return Ok(());
        }
        let Some(message) = generate(doc, state) else {
            return Ok(());
        };
        self.queue(key, message)
    }

    /// Like [`Session::push`], for the answer to a message that brought `doc` changes, except
    /// that an answer that only acknowledges them (it carries no changes, asks for none and
    /// resets nothing) is held back for up to [`ANSWER_DELAY`]: a change of this side's own
    /// pushed meanwhile carries the acknowledgement with it, and [`Session::answers_due`] names
    /// the documents whose wait is over. The peer learns a little later that the changes
    /// arrived; nothing waits on that but its own bookkeeping.
    pub fn answer(
        &mut self,
        key: &str,
        doc: &mut AutoCommit,
        now: Instant,
    ) -> Result<(), SessionError> {
        if !self.peer.may_access(key) || self.waits_for_retry(key, now) {
            return Ok(());
        }
        let state = self.states.entry(key.to_string()).or_default();
        let heads = doc.get_heads();
        if level(state, &heads) && !state.shared_heads.is_empty() {
            // An answer would only acknowledge, or say nothing: held without generating it.
            self.hold(key, heads, now);
            return Ok(());
        }
        let resets = state.needs_reset;
        let before = (
            state.last_sent_heads.clone(),
            state.have_responded,
            state.in_flight,
        );
        let Some(message) = generate(doc, state) else {
            return Ok(());
        };
        let acknowledges_only = !resets
            && message.changes.is_empty()
            && message.need.is_empty()
            && message
                .have
                .first()
                .is_some_and(|h| !h.last_sync.is_empty());
        if acknowledges_only {
            // As if it had not been generated: nothing else of the state moved.
            (state.last_sent_heads, state.have_responded, state.in_flight) = before;
            self.hold(key, heads, now);
            return Ok(());
        }
        self.unhold(key);
        self.queue(key, message)
    }

    /// Holds back the answer for document `key`, at `heads`, for up to [`ANSWER_DELAY`]. Held
    /// again after more changes, the first deadline stands and the heads move on.
    fn hold(&mut self, key: &str, heads: Vec<ChangeHash>, now: Instant) {
        let until = self.held.get(key).map_or(now + ANSWER_DELAY, |(at, _)| *at);
        self.held.insert(key.to_string(), (until, heads));
    }

    /// Drops the answer held back for document `key`, if any.
    fn unhold(&mut self, key: &str) {
        self.held.remove(key);
        self.free_held();
    }

    /// Frees the map of held answers' room once it holds none.
    fn free_held(&mut self) {
        if self.held.is_empty() {
            self.held.shrink_to_fit();
        }
    }

    /// The documents whose held-back answer is due: the caller pushes each.
    pub fn answers_due(&mut self, now: Instant) -> Vec<String> {
        let mut due: Vec<String> = self
            .held
            .extract_if(|_, (at, _)| *at <= now)
            .map(|(key, _)| key)
            .collect();
        self.free_held();
        due.sort();
        due
    }

    /// Queues `message` for document `key`, or reports it if it is too large to send.
    fn queue(&mut self, key: &str, message: sync::Message) -> Result<(), SessionError> {
        let frames = match self.compact_frame(key, &message) {
            Some(frame) => frame.encode().map(|frame| vec![frame]),
            None => wire::sync_frames(key, message.encode()),
        };
        match frames {
            Ok(frames) => {
                if let Some(pushed) = &mut self.pushed_early {
                    pushed.insert(key.to_string());
                }
                self.transmit.push_back(Transmit {
                    doc: Some(key.to_string()),
                    frames,
                });
                Ok(())
            }
            Err(e) => {
                // Nothing of it went out: let a later message carry those changes again.
                if let Some(state) = self.states.get_mut(key) {
                    state.sent_hashes.clear();
                }
                let reason = e.to_string();
                self.send(&Frame::error(format!(
                    "document {key} was not sent: {reason}"
                )))?;
                self.events.push_back(Event::Failed {
                    doc: key.to_string(),
                    reason,
                    retry_in: None,
                });
                Ok(())
            }
        }
    }

    /// `message` for document `key` as a [`Frame::SyncCompact`], if the session speaks it, it
    /// fits one frame and the document has or gets a number.
    fn compact_frame(&mut self, key: &str, message: &sync::Message) -> Option<Frame> {
        let numbers = self.numbers.as_mut()?;
        // What the peer surely has: what it announced, and what both had at the last sync.
        let state = self.states.get(key);
        let theirs: Vec<ChangeHash> = state
            .into_iter()
            .flat_map(|s| s.their_heads.iter().flatten().chain(&s.shared_heads))
            .copied()
            .collect();
        let message = compact::encode(message, &theirs);
        if message.len() + 16 + key.len() > wire::MAX_FRAME {
            return None;
        }
        let (number, new) = numbers.mine(key)?;
        Some(Frame::SyncCompact {
            number,
            key: new.then(|| key.to_string()),
            message,
        })
    }

    /// Queues the first message of a document this side has nothing of, which asks the peer
    /// for all of it.
    pub fn ask(&mut self, key: &str) -> Result<(), SessionError> {
        let ask = AutoCommit::new()
            .sync()
            .generate_sync_message(&mut sync::State::new());
        if let Some(ask) = ask {
            self.transmit.push_back(Transmit {
                doc: Some(key.to_string()),
                frames: wire::sync_frames(key, ask.encode())?,
            });
        }
        Ok(())
    }

    /// The document `key` could not be taken (by this session or by the caller, which could
    /// not store it): its exchange starts over after a backoff, and the peer hears why. Only
    /// too many failing documents end the session.
    pub fn fail(&mut self, key: &str, reason: String, now: Instant) -> Result<(), SessionError> {
        if self.failing.len() >= MAX_FAILING && !self.failing.contains_key(key) {
            return Err(SessionError::Protocol(format!(
                "more than {MAX_FAILING} documents failed to sync"
            )));
        }
        start_over(self.states.entry(key.to_string()).or_default());
        let failing = self.failing.entry(key.to_string()).or_default();
        let delay = RETRY_FIRST
            .saturating_mul(1 << failing.strikes.min(16))
            .min(RETRY_MAX);
        failing.strikes += 1;
        failing.retry_at = Some(now + delay);
        self.send(&Frame::error(format!(
            "document {key} was not synced: {reason}"
        )))?;
        self.events.push_back(Event::Failed {
            doc: key.to_string(),
            reason,
            retry_in: Some(delay),
        });
        Ok(())
    }

    /// When the next failed document is to be tried again or held-back answer is due.
    pub fn next_retry(&self) -> Option<Instant> {
        let retries = self.failing.values().filter_map(|f| f.retry_at);
        retries.chain(self.held.values().map(|(at, _)| *at)).min()
    }

    /// The failed documents whose wait is over, now tried again: the caller pushes each it
    /// has, and [`Session::ask`]s for each it has nothing of.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        for (key, failing) in &mut self.failing {
            if failing.retry_at.is_some_and(|at| at <= now) {
                failing.retry_at = None;
                due.push(key.clone());
            }
        }
        due.sort();
        due
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let next = self.transmit.pop_front();
        if next.is_none() {
            self.transmit = VecDeque::new();
        }
        next
    }

    /// The next thing to log or count.
    pub fn poll_event(&mut self) -> Option<Event> {
        let next = self.events.pop_front();
        if next.is_none() {
            self.events = VecDeque::new();
        }
        next
    }

    /// The encoded sync state of document `key`, to store with it.
    pub fn state(&self, key: &str) -> Option<Vec<u8>> {
        self.states.get(key).map(|state| state.encode())
    }

    /// The heads both sides had at the last exchange of document `key`.
    pub fn shared_heads(&self, key: &str) -> Vec<ChangeHash> {
        self.states
            .get(key)
            .map(|s| s.shared_heads.clone())
            .unwrap_or_default()
    }

    /// Every sync state, encoded, to store when the session ends.
    pub fn states(&self) -> Vec<(String, Vec<u8>)> {
        self.states
            .iter()
            .map(|(key, state)| (key.clone(), state.encode()))
            .collect()
    }

    fn send(&mut self, frame: &Frame) -> Result<(), SessionError> {
        self.transmit.push_back(Transmit {
            doc: None,
            frames: vec![frame.encode()?],
        });
        Ok(())
    }

    fn refuse(&mut self, key: &str) -> Result<(), SessionError> {
        let text = format!("{} may not access document {key}", self.peer.name);
        self.send(&Frame::error(text))?;
        self.events.push_back(Event::Refused {
            doc: key.to_string(),
        });
        Ok(())
    }

    /// Whether `key` failed and waits to be tried again.
    fn waits_for_retry(&self, key: &str, now: Instant) -> bool {
        self.failing
            .get(key)
            .is_some_and(|f| f.retry_at.is_some_and(|at| at > now))
    }
}

/// Forgets what `state` knew of the peer, and has the next message ask the peer to forget
/// what it sent: the document's exchange starts over, resending whatever did not arrive.
fn start_over(state: &mut sync::State) {
    *state = sync::State {
        their_capabilities: state.their_capabilities.take(),
        needs_reset: true,
        ..sync::State::default()
    };
}

/// Records in `state` that the peer is at the heads both sides had at the last sync (it
/// changed nothing since), as if it had sent its first sync message: the first message to it
/// then carries the changes it lacks, which saves the round trip that would only tell us so.
/// If the peer did change, its answer corrects this, as in any Automerge exchange.
fn assume_at_shared_heads(state: &mut sync::State) {
    state.their_heads = Some(state.shared_heads.clone());
    state.their_need = Some(Vec::new());
    state.their_have = Some(vec![sync::Have {
        last_sync: state.shared_heads.clone(),
        bloom: sync::BloomFilter::default(),
    }]);
}

#[cfg(test)]
mod tests {
    //! Two or more sessions in memory, their frames carried by the test: convergence whatever
    //! the interleaving, across lost frames and restarts, and what each exchange costs in
    //! bytes. No process, socket or database.

    use super::*;
    use crate::input::{Rules, parse_edgenodes};
    use crate::model;
    use crate::transport::tls::Role;
    use automerge::ActorId;
    use std::collections::BTreeMap;

    /// A 5-pod EdgeNode for `edge`, its first pod running `image`.
    fn edgenode(namespace: &str, edge: &str, image: &str) -> crate::input::DesiredNode {
        let pods: String = (0..5)
            .map(|i| {
                let image = if i == 0 { image } else { "nginx:1.27" };
                format!(
                    "    - apiVersion: v1\n      kind: Pod\n      metadata:\n        name: pod{i}\n      \
                     spec:\n        containers:\n          - name: main\n            image: {image}\n"
                )
            })
            .collect();
        let text = format!(
            "apiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: {edge}\n  \
             namespace: {namespace}\nspec:\n  pods:\n{pods}"
        );
        parse_edgenodes(&text, &Rules::new("default"))
            .unwrap()
            .remove(0)
    }

    /// A message says which changes it brought when each is new to the document and was
    /// applied; when it repeats one the document has, or waits for one it lacks, the caller
    /// is told to read them from the document.
    #[test]
    fn a_message_names_the_changes_it_brought_only_when_they_are_all_that_is_new() {
        let now = Instant::now();
        let mut theirs = model::genesis("default/edge01", &ActorId::random());
        let base = theirs.get_heads();
        let change = |doc: &mut AutoCommit, image: &str| {
            model::set_spec(doc, &edgenode("default", "edge01", image), "t").unwrap();
            doc.get_last_local_change().unwrap()
        };
        let (first, second) = (change(&mut theirs, "a"), change(&mut theirs, "b"));
        let heads = theirs.get_heads();
        let message = |changes: &[&automerge::Change]| {
            let bytes: Vec<Vec<u8>> = changes.iter().map(|c| c.raw_bytes().to_vec()).collect();
            Received::Plain(sync::Message {
                heads: heads.clone(),
                need: Vec::new(),
                have: Vec::new(),
                changes: bytes.into(),
                flags: None,
                version: sync::MessageVersion::V1,
            })
        };
        let mut session = Session::new(identity(Role::Edge, "edge01"), Vec::new());
        let mut ours = model::genesis("default/edge01", &ActorId::random());
        ours.merge(&mut theirs.fork_at(&base).unwrap()).unwrap();
        let since = ours.get_heads();
        let receive = |session: &mut Session, doc: &mut AutoCommit, m| {
            session
                .receive("default/edge01", doc, m, now)
                .unwrap()
                .unwrap()
        };
        match receive(&mut session, &mut ours, message(&[&first])) {
            Brought::Changes { since: s, changes } => {
                assert_eq!((s, changes), (since, vec![first.clone()]));
            }
            other => panic!("{other:?}"),
        }
        // The first again, with the second: not all new.
        let again = receive(&mut session, &mut ours, message(&[&first, &second]));
        assert!(matches!(again, Brought::Unknown), "{again:?}");
        // A change whose predecessor is missing waits in the document's queue.
        let mut other = model::genesis("default/edge01", &ActorId::random());
        other.merge(&mut theirs.fork_at(&base).unwrap()).unwrap();
        let waits = receive(&mut session, &mut other, message(&[&second]));
        assert!(matches!(waits, Brought::Unknown), "{waits:?}");
    }

    fn identity(role: Role, name: &str) -> Identity {
        Identity {
            role,
            name: name.into(),
            key: Vec::new(),
        }
    }

    /// A deterministic random stream (xorshift), so that a failing interleaving is replayed
    /// from its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// One side: its documents (the caller's part) and its session with the other side.
    struct Side {
        name: &'static str,
        actor: ActorId,
        docs: BTreeMap<String, AutoCommit>,
        session: Session,
        /// Whether its sessions speak the compact encoding (as both sides of this build do).
        compact: bool,
        /// Messages in flight to the other side, each one document's frames (or a control
        /// frame); the carrier may deliver messages of different documents out of order.
        outgoing: Vec<Transmit>,
    }

    impl Side {
        fn new(name: &'static str, peer: Identity) -> Side {
            Side::speaking(name, peer, true)
        }

        fn speaking(name: &'static str, peer: Identity, compact: bool) -> Side {
            Side {
                name,
                // Fixed actors and commit times: the same hashes, and so the same bloom
                // filters (whose false positives cost an exchange a round), on every run.
                actor: ActorId::from(name.as_bytes()),
                docs: BTreeMap::new(),
                session: Session::new(peer, Vec::new()).compact(compact),
                compact,
                outgoing: Vec::new(),
            }
        }

        fn heads(&mut self) -> Vec<(String, Vec<ChangeHash>)> {
            self.docs
                .iter_mut()
                .map(|(k, d)| (k.clone(), d.get_heads()))
                .collect()
        }

        /// Starts the session as the link does: changed documents first, then the summary.
        fn start(&mut self, now: Instant) {
            let heads: HashMap<_, _> = self.heads().into_iter().collect();
            for key in self.session.resume(&heads) {
                self.push(&key, now);
            }
            let mine = self.heads();
            self.session.summary(&mine).unwrap();
            self.collect();
        }

        /// A new session after a broken connection, from the states it had stored.
        fn restart(&mut self, stored: Vec<(String, Vec<u8>)>, now: Instant) {
            let peer = self.session.peer().clone();
            self.session = Session::new(peer, stored).compact(self.compact);
            self.outgoing.clear();
            self.start(now);
        }

        fn push(&mut self, key: &str, now: Instant) {
            if let Some(doc) = self.docs.get_mut(key) {
                self.session.push(key, doc, now).unwrap();
            }
        }

        /// An edit here: the change notice pushes it.
        fn edit(&mut self, key: &str, image: &str, now: Instant) {
            let (namespace, edge) = crate::key::parts(key).unwrap();
            let actor = self.actor.clone();
            let doc = self
                .docs
                .entry(key.to_string())
                .or_insert_with(|| model::genesis(key, &actor));
            model::set_spec(doc, &edgenode(namespace, edge, image), "t").unwrap();
            doc.commit_with(automerge::transaction::CommitOptions::default().with_time(0));
            self.push(key, now);
            self.collect();
        }

        fn collect(&mut self) {
            while let Some(t) = self.session.poll_transmit() {
                self.outgoing.push(t);
            }
        }

        /// Takes one encoded frame from the other side.
        fn deliver(&mut self, bytes: &[u8], now: Instant) {
            let frame = Frame::decode(bytes[1], &bytes[6..]).unwrap();
            match self.session.on_frame(frame, now).unwrap() {
                None => {}
                Some(Incoming::Summary(theirs)) => {
                    let mine = self.heads();
                    for key in self.session.on_summary(theirs, &mine) {
                        self.push(&key, now);
                    }
                }
                Some(Incoming::Message { doc: key, message }) => {
                    let actor = self.actor.clone();
                    let doc = self
                        .docs
                        .entry(key.clone())
                        .or_insert_with(|| model::genesis(&key, &actor));
                    let before = doc.get_heads();
                    if self
                        .session
                        .receive(&key, doc, message, now)
                        .unwrap()
                        .is_some()
                    {
                        // As the link answers: an edge holds back a bare acknowledgement.
                        let brought = doc.get_heads() != before;
                        if brought && self.session.peer().role == Role::Head {
                            self.session.answer(&key, doc, now).unwrap();
                        } else {
                            self.session.push(&key, doc, now).unwrap();
                        }
                    }
                }
            }
            self.collect();
        }
    }

    /// Carries one message from `from` to `to`: the next one, or with `rng` any whose
    /// document has nothing queued before it (each document's messages keep their order, as
    /// the link's outbox keeps them). Returns the bytes carried.
    fn carry(from: &mut Side, to: &mut Side, rng: Option<&mut Rng>, now: Instant) -> usize {
        let eligible: Vec<usize> = (0..from.outgoing.len())
            .filter(|&i| {
                let doc = &from.outgoing[i].doc;
                doc.is_none() || !from.outgoing[..i].iter().any(|t| t.doc == *doc)
            })
            .collect();
        let pick = match rng {
            Some(rng) => eligible[rng.below(eligible.len())],
            None => 0,
        };
        let t = from.outgoing.remove(pick);
        let mut bytes = 0;
        for frame in &t.frames {
            bytes += frame.len();
            to.deliver(frame, now);
        }
        bytes
    }

    /// Carries messages both ways until none is left; returns the bytes carried.
    fn settle(a: &mut Side, b: &mut Side, mut rng: Option<&mut Rng>, now: Instant) -> usize {
        let mut bytes = 0;
        for _ in 0..10_000 {
            let a_first = match rng.as_deref_mut() {
                Some(rng) => rng.below(2) == 0,
                None => true,
            };
            if a.outgoing.is_empty() && b.outgoing.is_empty() {
                // Held-back answers go out when their wait is over.
                let mut held = false;
                for side in [&mut *a, &mut *b] {
                    for key in side.session.answers_due(now + ANSWER_DELAY) {
                        held = true;
                        side.push(&key, now);
                        side.collect();
                    }
                }
                if !held {
                    return bytes;
                }
                continue;
            }
            if (a_first || b.outgoing.is_empty()) && !a.outgoing.is_empty() {
                bytes += carry(a, b, rng.as_deref_mut(), now);
            } else {
                bytes += carry(b, a, rng.as_deref_mut(), now);
            }
        }
        panic!("{} and {} never settled", a.name, b.name);
    }

    /// One random step of choice `choice`: carry a message either way, or edit one of `keys`
    /// on either side (`tag` makes each edit differ).
    fn step(
        head: &mut Side,
        edge: &mut Side,
        rng: &mut Rng,
        choice: usize,
        keys: &[&str],
        tag: &str,
    ) {
        let now = Instant::now();
        match choice {
            0 if !head.outgoing.is_empty() => {
                carry(head, edge, Some(rng), now);
            }
            1 if !edge.outgoing.is_empty() => {
                carry(edge, head, Some(rng), now);
            }
            2 => head.edit(keys[rng.below(keys.len())], &format!("h{tag}"), now),
            _ => edge.edit(keys[rng.below(keys.len())], &format!("e{tag}"), now),
        }
    }

    /// Whether both sides hold the same documents at the same heads.
    fn assert_equal(a: &mut Side, b: &mut Side) {
        assert_eq!(a.heads(), b.heads(), "{} and {} differ", a.name, b.name);
    }

    thread_local! {
        /// Sync messages Automerge generated on this thread (each test runs on its own).
        pub(super) static GENERATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn pair() -> (Side, Side) {
        pair_speaking(true)
    }

    fn pair_speaking(compact: bool) -> (Side, Side) {
        let head = Side::speaking("head", identity(Role::Edge, "edge01"), compact);
        let edge = Side::speaking("edge01", identity(Role::Head, "head"), compact);
        (head, edge)
    }

    /// A head and an edge that synced document `key` on one session.
    fn in_sync(key: &str, now: Instant) -> (Side, Side) {
        let (mut head, mut edge) = pair();
        head.edit(key, "nginx:1", now);
        head.start(now);
        edge.start(now);
        settle(&mut head, &mut edge, None, now);
        (head, edge)
    }

    #[test]
    fn sessions_converge_whatever_the_interleaving() {
        let now = Instant::now();
        for (seed, compact) in (1..=40u64).flat_map(|s| [(s, true), (s, false)]) {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let (mut head, mut edge) = pair_speaking(compact);
            // Each side has documents before they meet, one of them on both sides.
            head.edit("default/edge01", "nginx:1", now);
            head.edit("other/edge01", "nginx:2", now);
            edge.edit("default/edge01", "nginx:3", now);
            edge.edit("third/edge01", "nginx:4", now);
            head.start(now);
            edge.start(now);
            let keys = ["default/edge01", "other/edge01", "third/edge01"];
            for i in 0..60 {
                let choice = rng.below(4);
                step(
                    &mut head,
                    &mut edge,
                    &mut rng,
                    choice,
                    &keys,
                    &i.to_string(),
                );
            }
            settle(&mut head, &mut edge, Some(&mut rng), now);
            assert_equal(&mut head, &mut edge);
            assert_eq!(head.docs.len(), 3, "seed {seed}");
        }
    }

    #[test]
    fn sessions_converge_after_lost_frames_and_restarts_from_stale_states() {
        let now = Instant::now();
        for (seed, compact) in (1..=40u64).flat_map(|s| [(s, true), (s, false)]) {
            let mut rng = Rng(seed.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1);
            let (mut head, mut edge) = pair_speaking(compact);
            let keys = ["default/edge01", "other/edge01"];
            head.edit(keys[0], "nginx:1", now);
            head.start(now);
            edge.start(now);
            settle(&mut head, &mut edge, None, now);
            // States as stored at some earlier point (a crash loses what came after).
            let mut stored = (head.session.states(), edge.session.states());
            for round in 0..6 {
                for i in 0..8 {
                    match rng.below(5) {
                        4 if rng.below(2) == 0 => {
                            stored = (head.session.states(), edge.session.states());
                        }
                        4 => {}
                        choice => {
                            let tag = format!("{round}.{i}");
                            step(&mut head, &mut edge, &mut rng, choice, &keys, &tag);
                        }
                    }
                }
                // The connection breaks: what was in flight is lost; both restart from the
                // states stored last (stale or not).
                head.restart(stored.0.clone(), now);
                edge.restart(stored.1.clone(), now);
            }
            settle(&mut head, &mut edge, Some(&mut rng), now);
            assert_equal(&mut head, &mut edge);
        }
    }

    #[test]
    fn an_edge_gets_only_its_own_documents_and_a_head_gets_all() {
        let now = Instant::now();
        // Head A syncs with edge01, then with head B: edge01's edit reaches head B through A,
        // and the document of edge02 never reaches edge01.
        let mut head_a = Side::new("head-a", identity(Role::Edge, "edge01"));
        let mut edge = Side::new("edge01", identity(Role::Head, "head-a"));
        head_a.edit("default/edge02", "nginx:2", now);
        edge.edit("default/edge01", "nginx:1", now);
        head_a.start(now);
        edge.start(now);
        settle(&mut head_a, &mut edge, None, now);
        assert!(head_a.docs.contains_key("default/edge01"));
        assert!(!edge.docs.contains_key("default/edge02"));

        let mut to_b = Side::new("head-a", identity(Role::Head, "head-b"));
        to_b.docs = head_a.docs.clone();
        let mut head_b = Side::new("head-b", identity(Role::Head, "head-a"));
        to_b.start(now);
        head_b.start(now);
        settle(&mut to_b, &mut head_b, None, now);
        assert_equal(&mut to_b, &mut head_b);
    }

    #[test]
    fn a_document_the_peer_may_not_access_is_refused_and_never_taken() {
        let now = Instant::now();
        let (mut head, _edge) = pair();
        let mut doc = model::genesis("default/edge02", &ActorId::random());
        model::set_spec(&mut doc, &edgenode("default", "edge02", "x"), "t").unwrap();
        let message = doc
            .sync()
            .generate_sync_message(&mut sync::State::new())
            .unwrap();
        let frame = Frame::Sync {
            doc: "default/edge02".into(),
            message: message.encode(),
        };
        let incoming = head.session.on_frame(frame, now).unwrap();
        assert!(
            incoming.is_none(),
            "an edge's message for another edge was taken"
        );
        assert_eq!(
            head.session.poll_event(),
            Some(Event::Refused {
                doc: "default/edge02".into()
            })
        );
        assert!(matches!(
            head.session.poll_transmit(),
            Some(Transmit { doc: None, .. })
        ));
    }

    #[test]
    fn a_failed_document_waits_its_backoff_while_the_others_sync() {
        let now = Instant::now();
        let (mut head, mut edge) = pair();
        head.edit("default/edge01", "nginx:1", now);
        head.start(now);
        edge.start(now);
        let garbage = Frame::Sync {
            doc: "bad/edge01".into(),
            message: vec![0x42, 1, 2],
        };
        assert!(head.session.on_frame(garbage, now).unwrap().is_none());
        let Some(Event::Failed { doc, retry_in, .. }) = head.session.poll_event() else {
            panic!("no failure reported");
        };
        assert_eq!((doc.as_str(), retry_in), ("bad/edge01", Some(RETRY_FIRST)));
        head.collect();
        settle(&mut head, &mut edge, None, now);
        assert_equal(&mut head, &mut edge);
        // Until its wait is over the document's messages are dropped; then it is due.
        assert_eq!(head.session.next_retry(), Some(now + RETRY_FIRST));
        assert!(head.session.due(now).is_empty());
        assert_eq!(head.session.due(now + RETRY_FIRST), ["bad/edge01"]);
        assert_eq!(head.session.next_retry(), None);
    }

    #[test]
    fn an_edge_acknowledges_a_change_with_its_own_next_change_or_after_a_while() {
        let (now, key) = (Instant::now(), "default/edge01");
        let (mut head, mut edge) = in_sync(key, now);
        let generated = || GENERATED.with(std::cell::Cell::get);

        // The head's change arrives; the bare acknowledgement is held back, and the edge's own
        // change to the document (its status) carries it: one message, then the head's answer.
        head.edit(key, "nginx:2", now);
        let before = generated();
        carry(&mut head, &mut edge, None, now);
        edge.push(key, now); // the notice of the change received
        edge.collect();
        assert!(edge.outgoing.is_empty(), "the acknowledgement went alone");
        assert_eq!(generated(), before, "a bare acknowledgement was generated");
        assert_eq!(edge.session.next_retry(), Some(now + ANSWER_DELAY));
        edge.edit(key, "status", now);
        assert_eq!(edge.outgoing.len(), 1);
        assert!(edge.session.answers_due(now + ANSWER_DELAY).is_empty());
        carry(&mut edge, &mut head, None, now);
        assert_eq!(
            head.outgoing.len(),
            1,
            "the head acknowledges the edge's change"
        );
        let before = generated();
        carry(&mut head, &mut edge, None, now);
        assert!(head.outgoing.is_empty() && edge.outgoing.is_empty());
        assert_eq!(
            generated(),
            before,
            "an answer to the acknowledgement was generated"
        );
        assert_equal(&mut head, &mut edge);

        // With no change of its own, the acknowledgement goes when its wait is over.
        head.edit(key, "nginx:3", now);
        carry(&mut head, &mut edge, None, now);
        assert!(edge.outgoing.is_empty());
        assert!(edge.session.answers_due(now).is_empty());
        assert_eq!(edge.session.answers_due(now + ANSWER_DELAY), [key]);
        edge.push(key, now);
        edge.collect();
        assert_eq!(edge.outgoing.len(), 1);
        settle(&mut head, &mut edge, None, now);
        assert_equal(&mut head, &mut edge);
        // The head knows the edge has its change: nothing is left to resend.
        let edge_heads = edge.heads();
        assert_eq!(head.session.shared_heads(key), edge_heads[0].1);
        // Both idle again, neither keeps room for answers held or frames and events queued.
        for side in [&head, &edge] {
            let s = &side.session;
            let room = (
                s.held.capacity(),
                s.transmit.capacity(),
                s.events.capacity(),
            );
            assert_eq!(room, (0, 0, 0));
        }
    }

    #[test]
    fn a_resumed_document_is_left_out_of_the_summary_and_to_the_exchange_it_started() {
        let (now, key) = (Instant::now(), "default/edge01");
        let (mut head, mut edge) = in_sync(key, now);
        let stored = (head.session.states(), edge.session.states());

        // The head changed the document while the link was down: on reconnect it pushes the
        // change at once, and its summary names nothing more.
        head.edit(key, "nginx:2", now);
        head.outgoing.clear();
        head.restart(stored.0, now);
        edge.restart(stored.1, now);
        assert_eq!(head.outgoing.len(), 2);
        assert_eq!(head.outgoing[0].doc.as_deref(), Some(key));
        let summary = &head.outgoing[1].frames[0];
        let summary = Frame::decode(summary[1], &summary[6..]).unwrap();
        assert_eq!(summary, Frame::Summary { entries: vec![] });

        // The edge reads the change, then the summary that leaves the document out: it pushes
        // nothing for it beside the exchange under way (its answer waits for its status).
        assert_eq!(edge.outgoing.len(), 1, "only the edge's own summary");
        carry(&mut head, &mut edge, None, now);
        carry(&mut head, &mut edge, None, now);
        assert_eq!(
            edge.outgoing.len(),
            1,
            "the edge pushed beside the exchange"
        );
        settle(&mut head, &mut edge, None, now);
        assert_equal(&mut head, &mut edge);
    }

    #[test]
    fn compact_frames_need_the_negotiation_and_a_named_number() {
        let now = Instant::now();
        let frame = |number, key: Option<&str>| Frame::SyncCompact {
            number,
            key: key.map(str::to_string),
            // An empty message: no changes, heads, needs or haves.
            message: vec![0; 5],
        };
        let head = || identity(Role::Head, "head");
        let mut plain = Session::new(head(), Vec::new());
        let named = frame(1, Some("default/edge01"));
        let err = plain.on_frame(named.clone(), now).unwrap_err();
        assert!(err.to_string().contains("did not negotiate"), "{err}");
        let mut compact = Session::new(head(), Vec::new()).compact(true);
        let err = compact.on_frame(frame(2, None), now).unwrap_err();
        assert!(err.to_string().contains("never named"), "{err}");
        for frame in [named, frame(1, None)] {
            assert!(matches!(
                compact.on_frame(frame, now).unwrap(),
                Some(Incoming::Message { doc, .. }) if doc == "default/edge01"
            ));
        }
    }

    /// The byte costs the design names, measured on a 5-pod EdgeNode, in both encodings; the
    /// compact one costs less.
    #[test]
    fn exchanges_cost_what_the_design_says() {
        let [plain, compact] = [false, true].map(exchange_costs);
        let worse = plain.iter().zip(&compact).any(|(p, c)| c > p);
        // A change and its acknowledgement: about 350 bytes plain, 200 compact.
        assert!(
            !worse && compact[1] * 3 <= plain[1] * 2,
            "compact {compact:?} against plain {plain:?}"
        );
    }

    /// The bytes of a first sync, a one-field change, a meeting of fresh states and a
    /// reconnect after a missed change.
    fn exchange_costs(compact: bool) -> [usize; 4] {
        let now = Instant::now();
        let key = "default/edge01";
        let (mut head, mut edge) = pair_speaking(compact);
        head.edit(key, "nginx:1", now);
        head.start(now);
        edge.start(now);
        let first = settle(&mut head, &mut edge, None, now);
        let history = head.docs[key].clone().save().len();

        // A one-field change on live sync states.
        head.edit(key, "nginx:2", now);
        let one_field = settle(&mut head, &mut edge, None, now);
        assert!(
            one_field <= 450,
            "a one-field change took {one_field} bytes"
        );

        // Two fresh states meet equal documents: the summary settles it, and the next change
        // costs what it costs on live states, not the whole history.
        head.restart(Vec::new(), now);
        edge.restart(Vec::new(), now);
        let meet = settle(&mut head, &mut edge, None, now);
        assert!(meet <= 100, "equal documents cost {meet} bytes to meet");
        head.edit(key, "nginx:3", now);
        let after_fresh = settle(&mut head, &mut edge, None, now);
        assert!(
            after_fresh <= 2 * one_field,
            "after fresh states a one-field change took {after_fresh} bytes (live: {one_field}, history {history})"
        );

        // A reconnect after one missed change: the stored states let it go out at once.
        let stored = (head.session.states(), edge.session.states());
        head.edit(key, "nginx:4", now);
        head.outgoing.clear(); // the link was down
        head.restart(stored.0, now);
        edge.restart(stored.1, now);
        let reconnect = settle(&mut head, &mut edge, None, now);
        assert!(
            reconnect <= 2 * one_field,
            "a reconnect after one missed change took {reconnect} bytes (one field: {one_field})"
        );
        assert_equal(&mut head, &mut edge);
        assert!(first > one_field);
        [first, one_field, meet, reconnect]
    }
}
