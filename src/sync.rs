//! One sync session per connection: Automerge's sync protocol per (peer, document), pushed on
//! every change, with sync state persisted so a reconnect sends only what is missing.
//!
//! A failure that concerns one document (a message too large, undecodable or not applicable)
//! stays with that document: it is logged, counted, reported to the peer, and the document is
//! tried again after a backoff while the others go on syncing.

pub mod feed;
pub mod outbox;
pub mod wire;

use crate::node::{Node, NodeError, PeerAddress, now};
use crate::transport::tls::Identity;
use automerge::sync::{self, SyncDoc};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::{Frame, Reassembly, WireError, read_frame};

/// How long a document whose sync failed waits before it is tried again; doubles with each
/// failure in a row, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait before a failed document is tried again.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Documents that may be failing at once in one session; more ends the session.
const MAX_FAILING: usize = 1024;
/// Frames read ahead of the session (each at most [`wire::MAX_FRAME`] bytes).
const READ_AHEAD: usize = 4;

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

/// Runs the sync protocol with `peer` over one stream until it closes, the peer misbehaves or
/// `shutdown` fires. The first frame (Hello) is already consumed by the caller on the accepting
/// side; the dialing side sends its own Hello before calling this.
///
/// Reading, deciding and writing are separate tasks joined by queues: the session never blocks
/// on a write, so two peers pushing many documents at each other cannot deadlock. The outgoing
/// queue stays bounded by the protocol (at most one message in flight per document).
pub async fn run_session<R, W>(
    node: Node,
    peer: Identity,
    address: PeerAddress,
    recv: R,
    send: W,
    shutdown: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let changes = node.feed(&peer);
    let removed = node.removal_of(&peer.name);
    let (out, out_rx) = mpsc::unbounded_channel();
    let mut session = Session {
        node: node.clone(),
        peer: peer.clone(),
        states: HashMap::new(),
        out,
        reassembly: Reassembly::default(),
        failing: HashMap::new(),
    };
    let mut writer = tokio::spawn(write_frames(send, out_rx, node.clone()));
    node.peer_connected(&peer, &address);
    match node.store().sync_states(&peer.name).await {
        Ok(stored) => {
            for (key, bytes) in stored {
                if let Ok(state) = sync::State::decode(&bytes) {
                    session.states.insert(key, state);
                }
            }
        }
        Err(e) => {
            warn!(peer = %peer.name, error = %e, "stored sync state unreadable; starting fresh")
        }
    }
    let (frames_tx, mut frames) = mpsc::channel(READ_AHEAD);
    let reader = tokio::spawn(read_frames(recv, frames_tx));
    let result = async {
        // What changed here since the last sync goes out at once, ahead of the summary; the
        // rest starts syncing when the peer's summary shows it differs.
        session.push_changed_since_last_sync().await?;
        session.send_summary().await?;
        loop {
            let retry = session.next_retry();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                    session.retry_due().await?;
                }
                _ = removed.cancelled() => {
                    return Err(SessionError::Protocol("the node was removed on the head".into()));
                }
                written = &mut writer => return match written {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Ok(()),
                },
                frame = frames.recv() => match frame {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(frame)) => session.handle(frame).await?,
                },
                keys = changes.next() => {
                    for key in keys {
                        session.push(&key).await?;
                    }
                }
            }
        }
    }
    .await;
    reader.abort();
    let states = session
        .states
        .iter()
        .map(|(key, state)| (key.clone(), state.encode()))
        .collect();
    drop(session);
    if let Err(e) = node.store().save_sync_states(&peer.name, states).await {
        warn!(peer = %peer.name, error = %e, "cannot store the sync states");
    }
    // Let queued frames go out (a clean end), but never wait long for a stuck peer.
    if !writer.is_finished() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), &mut writer).await;
        writer.abort();
    }
    node.peer_disconnected(&peer).await;
    result
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut recv: R,
    out: mpsc::Sender<Result<Frame, WireError>>,
) {
    loop {
        let frame = read_frame(&mut recv, wire::MAX_FRAME).await;
        let end = !matches!(frame, Ok(Some(_)));
        let item = match frame {
            Ok(Some(f)) => Ok(f),
            Ok(None) => break,
            Err(e) => Err(e),
        };
        if out.send(item).await.is_err() || end {
            break;
        }
    }
}

/// The encoded frames of one message, and the document they concern.
type Outgoing = (Option<String>, Vec<Vec<u8>>);

async fn write_frames<W: AsyncWrite + Unpin>(
    mut send: W,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    node: Node,
) -> Result<(), WireError> {
    use tokio::io::AsyncWriteExt;
    let mut outbox = outbox::Outbox::default();
    loop {
        while let Ok((doc, frames)) = queue.try_recv() {
            outbox.push(doc.as_deref(), frames);
        }
        let Some(bytes) = outbox.pop() else {
            match queue.recv().await {
                Some((doc, frames)) => outbox.push(doc.as_deref(), frames),
                None => break,
            }
            continue;
        };
        node.metrics().pending.dec();
        send.write_all(&bytes).await?;
    }
    send.shutdown().await?;
    Ok(())
}

/// A document whose sync with this peer failed.
#[derive(Default)]
struct Failing {
    /// Failures in a row.
    strikes: u32,
    /// Until when its messages are dropped; None once it is being tried again.
    retry_at: Option<Instant>,
}

struct Session {
    node: Node,
    peer: Identity,
    states: HashMap<String, sync::State>,
    out: mpsc::UnboundedSender<Outgoing>,
    reassembly: Reassembly,
    failing: HashMap<String, Failing>,
}

impl Session {
    /// Queues a frame about no document in particular.
    fn send(&self, frame: &Frame) -> Result<(), SessionError> {
        self.queue(None, vec![frame.encode()?])
    }

    /// Queues the frames of one message for the writer; counts their bytes.
    fn queue(&self, doc: Option<&str>, frames: Vec<Vec<u8>>) -> Result<(), SessionError> {
        let metrics = self.node.metrics();
        let mut n = 0;
        for frame in &frames {
            n += frame.len() as u64;
            metrics.traffic(self.peer.role.as_str(), "out", frame.len() as u64);
        }
        metrics.pending.inc_by(frames.len() as i64);
        self.node.peer_touch(&self.peer.name, |p| p.bytes_out += n);
        self.out
            .send((doc.map(str::to_string), frames))
            .map_err(|_| SessionError::Protocol("connection writer has stopped".into()))
    }

    /// Tells the peer the heads of every document it may see.
    async fn send_summary(&mut self) -> Result<(), SessionError> {
        let mut entries = Vec::new();
        for key in self.node.sync_keys() {
            if self.peer.may_access(&key)
                && let Some(digest) = self.node.heads_digest(&key).await
            {
                entries.push((key, digest));
            }
        }
        self.send(&Frame::Summary { entries })
    }

    /// Sends, without waiting to hear from the peer, the changes made here since the last sync
    /// with it, assuming it is still where that sync left it (usually so after an outage). If
    /// it is not, Automerge's exchange sorts it out.
    async fn push_changed_since_last_sync(&mut self) -> Result<(), SessionError> {
        let mut changed = Vec::new();
        for (key, state) in &mut self.states {
            let Some(heads) = self.node.heads(key).await else {
                continue;
            };
            if !state.shared_heads.is_empty() && heads != state.shared_heads {
                assume_at_shared_heads(state);
                changed.push(key.clone());
            }
        }
        for key in changed {
            self.push(&key).await?;
        }
        Ok(())
    }

    /// Starts syncing every document whose heads differ from the peer's (or that it lacks).
    async fn on_summary(&mut self, entries: Vec<(String, Vec<u8>)>) -> Result<(), SessionError> {
        let theirs: HashMap<String, Vec<u8>> = entries.into_iter().collect();
        for key in self.node.sync_keys() {
            let Some(digest) = theirs.get(&key) else {
                self.push(&key).await?;
                continue;
            };
            if self.node.heads_digest(&key).await.as_ref() == Some(digest) {
                continue;
            }
            if let Some(state) = self.states.get_mut(&key)
                && !state.shared_heads.is_empty()
                && wire::heads_digest(&state.shared_heads) == *digest
            {
                assume_at_shared_heads(state);
            }
            self.push(&key).await?;
        }
        Ok(())
    }

    /// Sends the next sync message for `key`, if the peer may see it and there is one. A message
    /// too large to send is reported and not sent; the document then waits for the peer.
    async fn push(&mut self, key: &str) -> Result<(), SessionError> {
        if !self.peer.may_access(key) || self.waits_for_retry(key) {
            return Ok(());
        }
        let state = self.states.entry(key.to_string()).or_default();
        let Some(message) = self.node.generate_sync(key, state).await else {
            return Ok(());
        };
        let message = message.encode();
        let bytes = message.len();
        match wire::sync_frames(key, message) {
            Ok(frames) => {
                debug!(peer = %self.peer.name, doc = key, bytes, frames = frames.len(), "sync sent");
                self.queue(Some(key), frames)
            }
            Err(e) => {
                // Nothing of it went out: let a later message carry those changes again.
                state.sent_hashes.clear();
                self.count_failure();
                warn!(peer = %self.peer.name, doc = key, error = %e, "sync message not sent; the other documents go on");
                self.send(&Frame::error(format!("document {key} was not sent: {e}")))
            }
        }
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), SessionError> {
        match frame {
            Frame::Sync { doc, message } => {
                self.count_in(&doc, message.len());
                self.on_message(doc, message).await
            }
            Frame::SyncChunk {
                doc,
                total,
                offset,
                data,
            } => {
                self.count_in(&doc, data.len());
                if !self.peer.may_access(&doc) {
                    return match offset {
                        0 => self.refuse_access(&doc),
                        _ => Ok(()),
                    };
                }
                match self.reassembly.push(&doc, total, offset, data) {
                    Ok(Some(message)) => self.on_message(doc, message).await,
                    Ok(None) => Ok(()),
                    Err(e) => self.failed(&doc, e.to_string()),
                }
            }
            Frame::Hello { .. } => Ok(()),
            Frame::Summary { entries } => self.on_summary(entries).await,
            Frame::Error { message } => {
                warn!(peer = %self.peer.name, %message, "peer reported an error");
                Ok(())
            }
            other => Err(SessionError::Protocol(format!(
                "unexpected frame {other:?} in a sync session"
            ))),
        }
    }

    fn count_in(&self, key: &str, len: usize) {
        let size = len as u64 + key.len() as u64;
        self.node
            .metrics()
            .traffic(self.peer.role.as_str(), "in", size);
        self.node.peer_touch(&self.peer.name, |p| {
            p.bytes_in += size;
            p.last_seen = Some(now());
        });
    }

    fn refuse_access(&self, key: &str) -> Result<(), SessionError> {
        warn!(peer = %self.peer.name, doc = %key, "refused sync for a document this peer may not access");
        self.send(&Frame::error(format!(
            "{} may not access document {key}",
            self.peer.name
        )))
    }

    /// Applies one whole sync message for `key` and answers it.
    async fn on_message(&mut self, key: String, message: Vec<u8>) -> Result<(), SessionError> {
        if !self.peer.may_access(&key) {
            return self.refuse_access(&key);
        }
        if self.waits_for_retry(&key) {
            debug!(peer = %self.peer.name, doc = %key, "sync message dropped: the document waits to be tried again");
            return Ok(());
        }
        let message = match sync::Message::decode(&message) {
            Ok(message) => message,
            Err(e) => return self.failed(&key, format!("undecodable sync message: {e}")),
        };
        let state = self.states.entry(key.clone()).or_default();
        let received = self
            .node
            .receive_sync(&self.peer.name, &key, message, state)
            .await;
        match received {
            Ok(()) => {}
            Err(NodeError::Sync { reason, .. }) => return self.failed(&key, reason),
            Err(e) => return self.failed(&key, e.to_string()),
        }
        self.failing.remove(&key);
        debug!(peer = %self.peer.name, doc = %key, "sync received");
        let role = crate::metrics::RoleLabels {
            role: self.peer.role.as_str().into(),
        };
        self.node.metrics().sync_rounds.get_or_create(&role).inc();
        self.push(&key).await
    }

    /// A message for `key` could not be taken: the document's sync starts over after a
    /// backoff, and the peer hears why. Only too many failing documents end the session.
    fn failed(&mut self, key: &str, reason: String) -> Result<(), SessionError> {
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
        failing.retry_at = Some(Instant::now() + delay);
        self.count_failure();
        warn!(peer = %self.peer.name, doc = %key, %reason, retry_in = ?delay, "sync message not applied; the other documents go on");
        self.send(&Frame::error(format!(
            "document {key} was not synced: {reason}"
        )))
    }

    fn count_failure(&self) {
        let role = crate::metrics::RoleLabels {
            role: self.peer.role.as_str().into(),
        };
        self.node.metrics().sync_failures.get_or_create(&role).inc();
    }

    /// Whether `key` failed and waits to be tried again.
    fn waits_for_retry(&self, key: &str) -> bool {
        self.failing
            .get(key)
            .is_some_and(|f| f.retry_at.is_some_and(|at| at > Instant::now()))
    }

    /// When the next failed document is to be tried again.
    fn next_retry(&self) -> Option<Instant> {
        self.failing.values().filter_map(|f| f.retry_at).min()
    }

    /// Tries again the failed documents whose wait is over.
    async fn retry_due(&mut self) -> Result<(), SessionError> {
        let now = Instant::now();
        let mut due = Vec::new();
        for (key, failing) in &mut self.failing {
            if failing.retry_at.is_some_and(|at| at <= now) {
                failing.retry_at = None;
                due.push(key.clone());
            }
        }
        for key in due {
            debug!(peer = %self.peer.name, doc = %key, "trying the document again");
            if self.node.heads(&key).await.is_some() {
                self.push(&key).await?;
            } else {
                // Nothing of it is here: the first message of an empty document asks for all.
                let ask = automerge::AutoCommit::new()
                    .sync()
                    .generate_sync_message(&mut sync::State::new());
                if let Some(ask) = ask {
                    self.queue(Some(&key), wire::sync_frames(&key, ask.encode())?)?;
                }
            }
        }
        Ok(())
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

/// Logs the end of a session: a broken link is routine (info), a misbehaving peer is not (warn).
pub fn log_end(peer: &Identity, result: &Result<(), SessionError>) {
    match result {
        Ok(()) => info!(peer = %peer.name, role = %peer.role, "peer disconnected"),
        Err(SessionError::Wire(WireError::Io(e))) => {
            info!(peer = %peer.name, role = %peer.role, reason = %e, "peer disconnected")
        }
        Err(e) => warn!(peer = %peer.name, role = %peer.role, error = %e, "peer session ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Rules;
    use crate::store::Store;
    use crate::transport::tls::Role;
    use wire::{MAX_FRAME, MAX_SYNC_MESSAGE, write_frame};

    fn edgenode(namespace: &str) -> String {
        format!(
            "apiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: edge01\n  \
             namespace: {namespace}\nspec:\n  pods:\n    - apiVersion: v1\n      kind: Pod\n      \
             metadata:\n        name: web\n      spec:\n        containers:\n          - name: \
             main\n            image: nginx\n"
        )
    }

    async fn node(dir: &std::path::Path, name: &str) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let store = Store::open(dir).unwrap();
        Node::open(Role::Head, name, store, Rules::new("default"))
            .await
            .unwrap()
    }

    /// A session with `here`, the test playing the peer from `source`'s documents: every sync
    /// message the session sends for a document of `source` is answered from `source`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_message_for_one_document_leaves_the_others_syncing_and_is_tried_again() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let here = node(&dir.path().join("here"), "head-a").await;
            let source = node(&dir.path().join("source"), "head-b").await;
            for ns in ["good", "bad"] {
                source.apply_text(&edgenode(ns), "default").await.unwrap();
            }
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            let (recv, send) = tokio::io::split(ours);
            let peer = Identity {
                role: Role::Head,
                name: "head-b".into(),
                key: Vec::new(),
            };
            let address = PeerAddress {
                seen: "test".into(),
                reachable: [127, 0, 0, 1].into(),
            };
            let shutdown = CancellationToken::new();
            let session = tokio::spawn(run_session(
                here.clone(),
                peer,
                address,
                recv,
                send,
                shutdown.clone(),
            ));
            let (mut rx, mut tx) = tokio::io::split(theirs);
            let mut states: HashMap<String, sync::State> = HashMap::new();

            // An undecodable message, a message claimed larger than any allowed, a good start.
            let garbage = Frame::Sync {
                doc: "bad/edge01".into(),
                message: vec![0x42, 1, 2, 3],
            };
            write_frame(&mut tx, &garbage).await.unwrap();
            let huge = Frame::SyncChunk {
                doc: "huge/edge01".into(),
                total: (MAX_SYNC_MESSAGE + 1) as u32,
                offset: 0,
                data: vec![0; 16],
            };
            write_frame(&mut tx, &huge).await.unwrap();
            let good = states.entry("good/edge01".into()).or_default();
            let first = source.generate_sync("good/edge01", good).await.unwrap();
            let first = Frame::Sync {
                doc: "good/edge01".into(),
                message: first.encode(),
            };
            write_frame(&mut tx, &first).await.unwrap();

            let mut errors = Vec::new();
            let have = |key: &'static str| {
                let here = here.clone();
                async move {
                    here.view(key)
                        .await
                        .unwrap()
                        .is_some_and(|(v, _)| v.pods.contains_key("web"))
                }
            };
            while !(have("good/edge01").await && have("bad/edge01").await) {
                match read_frame(&mut rx, MAX_FRAME).await.unwrap() {
                    Some(Frame::Error { message }) => errors.push(message),
                    Some(Frame::Sync { doc, message }) if doc != crate::registry::KEY => {
                        let state = states.entry(doc.clone()).or_default();
                        let message = sync::Message::decode(&message).unwrap();
                        source
                            .receive_sync("head-a", &doc, message, state)
                            .await
                            .unwrap();
                        if let Some(reply) = source.generate_sync(&doc, state).await {
                            let reply = Frame::Sync {
                                doc,
                                message: reply.encode(),
                            };
                            write_frame(&mut tx, &reply).await.unwrap();
                        }
                    }
                    Some(_) => {}
                    None => panic!("the session ended: {:?}", session.await),
                }
            }
            assert!(errors[0].contains("bad/edge01"), "{errors:?}");
            assert!(errors[1].contains("huge/edge01"), "{errors:?}");
            assert!(!session.is_finished(), "the session ended");
            let failures: u64 = here
                .metrics_text()
                .await
                .lines()
                .filter(|l| l.starts_with("edgesync_sync_failures_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            assert_eq!(failures, 2);
            shutdown.cancel();
            session.await.unwrap().unwrap();
        })
        .await
        .expect("test timed out");
    }
}
