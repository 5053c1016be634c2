//! One sync session per connection: the sans-IO [`session::Session`] speaks Automerge's sync
//! protocol per (peer, document), pushed on every change; this module drives it over a
//! stream and does the IO: documents are lent to it under their locks, a received change is
//! stored before it is announced or answered, sync states are stored so a reconnect sends
//! only what is missing, and traffic, failures and presence are counted.

pub mod compact;
pub mod outbox;
pub mod session;
pub mod wire;

use crate::clock::now;
use crate::node::{Node, PeerAddress};
use crate::transport::Dialect;
use crate::transport::tls::{Identity, Role};
use session::{Event, Incoming, Session, Transmit};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::{Frame, WireError, read_frame};

pub use session::SessionError;

/// Runs the sync protocol with `peer` over one stream until it closes, the peer misbehaves or
/// `shutdown` fires. The first frame (Hello) is already consumed by the caller on the accepting
/// side; the dialing side sends its own Hello before calling this. `dialect`: what the
/// connection negotiated (the compact encoding of sync messages, counts per writer).
///
/// Writing is a task of its own, fed by a queue: the session never blocks on a write, so two
/// peers pushing many documents at each other cannot deadlock. The outgoing queue stays bounded
/// by the protocol (at most one message in flight per document). The session reads the next
/// frame itself, between its steps (QUIC holds what arrives meanwhile, within its flow control
/// window): a reader task and its queue cost every connection of a fleet about a kilobyte.
pub async fn run_session<R, W>(
    node: Node,
    peer: Identity,
    address: PeerAddress,
    recv: R,
    send: W,
    dialect: Dialect,
    shutdown: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let changes = node.docs().feed(&peer);
    let removed = node.peers().removal_of(&peer.name);
    let (out, out_rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(write_frames(send, out_rx, node.clone()));
    node.peers().connected(&peer, &address);
    node.docs().session_reads(&peer, dialect.counts, true);
    // The steps before and after the loop are boxed, like the loop's own: a session's task
    // then keeps room for what waits in the loop only, for the session's whole life.
    let stored = match Box::pin(node.store().sync_states(&peer.name)).await {
        Ok(stored) => stored,
        Err(e) => {
            warn!(peer = %peer.name, error = %e, "stored sync state unreadable; starting fresh");
            Vec::new()
        }
    };
    let mut link = Link {
        node: node.clone(),
        session: Session::new(peer.clone(), stored).compact(dialect.compact),
        out,
    };
    // The read under way, kept across the loop's turns (a frame half read is never lost).
    let mut reading = Box::pin(next_frame(recv));
    let result = async {
        Box::pin(link.start()).await?;
        loop {
            let retry = link.session.next_retry().map(Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                    Box::pin(link.retry_due()).await?;
                }
                _ = removed.cancelled() => {
                    return Err(SessionError::Protocol("the node was removed on the head".into()));
                }
                written = &mut writer => return match written {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Ok(()),
                },
                (recv, frame) = &mut reading => match frame {
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.into()),
                    Ok(Some(frame)) => {
                        reading.set(next_frame(recv));
                        // Boxed, like the other steps below: the session's task then keeps
                        // only what waits between frames, not the largest step, for its life.
                        Box::pin(link.on_frame(frame)).await?
                    }
                },
                keys = changes.next() => {
                    for key in keys {
                        Box::pin(link.push(&key)).await?;
                    }
                }
            }
            link.flush()?;
        }
    }
    .await;
    drop(reading);
    let states = link.session.states();
    drop(link);
    Box::pin(end(&node, &peer, states, writer)).await;
    node.docs().session_reads(&peer, dialect.counts, false);
    result
}

/// A session's end: its sync states stored, its queued frames out (a clean end, but never a
/// long wait for a stuck peer), the peer no longer connected.
async fn end(
    node: &Node,
    peer: &Identity,
    states: Vec<(String, Vec<u8>)>,
    mut writer: tokio::task::JoinHandle<Result<(), WireError>>,
) {
    if let Err(e) = node.store().save_sync_states(&peer.name, states).await {
        warn!(peer = %peer.name, error = %e, "cannot store the sync states");
    }
    if !writer.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
        writer.abort();
    }
    node.peers().disconnected(peer);
}

/// The next frame `recv` brings (None at its end), with `recv` back for the one after.
async fn next_frame<R: AsyncRead + Unpin>(mut recv: R) -> (R, Result<Option<Frame>, WireError>) {
    let frame = read_frame(&mut recv, wire::MAX_FRAME).await;
    (recv, frame)
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut send: W,
    mut queue: mpsc::UnboundedReceiver<Box<Transmit>>,
    node: Node,
) -> Result<(), WireError> {
    use tokio::io::AsyncWriteExt;
    let mut outbox = outbox::Outbox::default();
    loop {
        while let Ok(t) = queue.try_recv() {
            outbox.push(t.doc.as_deref(), t.frames);
        }
        let Some(bytes) = outbox.pop() else {
            match queue.recv().await {
                Some(t) => outbox.push(t.doc.as_deref(), t.frames),
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

/// The IO around one [`Session`]: the node's documents, and the queue to the writer.
struct Link {
    node: Node,
    session: Session,
    out: mpsc::UnboundedSender<Box<Transmit>>,
}

fn now_std() -> std::time::Instant {
    std::time::Instant::now()
}

impl Link {
    fn peer(&self) -> &Identity {
        self.session.peer()
    }

    /// What changed here since the last sync goes out at once, ahead of the summary; the rest
    /// starts syncing when the peer's summary shows it differs.
    async fn start(&mut self) -> Result<(), SessionError> {
        let mut heads = std::collections::HashMap::new();
        for key in self.session.known() {
            if let Some(h) = self.node.docs().heads(&key).await {
                heads.insert(key, h);
            }
        }
        for key in self.session.resume(&heads) {
            self.push(&key).await?;
        }
        let mine = self.node.docs().sync_heads(self.session.peer()).await;
        self.session.summary(&mine)?;
        self.flush()
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), SessionError> {
        if matches!(
            frame,
            Frame::Sync { .. }
                | Frame::SyncCompact { .. }
                | Frame::SyncChunk { .. }
                | Frame::Summary { .. }
        ) {
            self.count_in(frame.wire_len());
        }
        match self.session.on_frame(frame, now_std())? {
            None => Ok(()),
            Some(Incoming::Summary(theirs)) => {
                let mine = self.node.docs().sync_heads(self.session.peer()).await;
                for key in self.session.on_summary(theirs, &mine) {
                    self.push(&key).await?;
                }
                Ok(())
            }
            Some(Incoming::Message { doc, message }) => self.receive(doc, message).await,
        }
    }

    /// Applies one sync message under its document's lock, stores what it brought, and only
    /// then answers.
    async fn receive(
        &mut self,
        key: String,
        message: session::Received,
    ) -> Result<(), SessionError> {
        let entry = match self.node.docs().sync_entry(&key) {
            Ok(entry) => entry,
            Err(e) => return self.session.fail(&key, e.to_string(), now_std()),
        };
        let mut entry = entry.lock().await;
        // The sync state goes into the store with what a message brought only on the
        // document's first exchange (a fresh state after a crash would cost its whole history
        // again); after that, when the session ends. One stored earlier only costs the next
        // session a larger summary of what it has.
        let first = self.session.shared_heads(&key).is_empty();
        let Some(brought) = self
            .session
            .receive(&key, entry.doc(), message, now_std())?
        else {
            return Ok(());
        };
        let state = first.then(|| self.session.state(&key)).flatten();
        let shared = self.session.shared_heads(&key);
        let peer = self.peer().name.clone();
        let changed = match self
            .node
            .docs()
            .synced(&peer, &key, &mut entry, state, shared, brought)
            .await
        {
            Ok(changed) => changed,
            Err(e) => return self.session.fail(&key, e.to_string(), now_std()),
        };
        debug!(peer = %peer, doc = %key, "sync received");
        let role = crate::metrics::RoleLabels {
            role: self.peer().role.as_str().into(),
        };
        self.node.metrics().sync_rounds.get_or_create(&role).inc();
        // An edge answers a head's change with the status its reconciler writes next, and
        // acknowledges the change in the same message.
        match changed && self.node.role() == Role::Edge {
            true => self.session.answer(&key, entry.doc(), now_std()),
            false => self.session.push(&key, entry.doc(), now_std()),
        }
    }

    /// Queues the next sync message for `key`, if there is one.
    async fn push(&mut self, key: &str) -> Result<(), SessionError> {
        if let Some(entry) = self.node.docs().sync_doc(key) {
            let mut entry = entry.lock().await;
            self.session.push(key, entry.doc(), now_std())?;
        }
        Ok(())
    }

    /// Tries again the failed documents whose wait is over, and sends the held-back answers
    /// that are due.
    async fn retry_due(&mut self) -> Result<(), SessionError> {
        for key in self.session.answers_due(now_std()) {
            self.push(&key).await?;
        }
        for key in self.session.due(now_std()) {
            debug!(peer = %self.peer().name, doc = %key, "trying the document again");
            match self.node.docs().sync_doc(&key) {
                Some(_) => self.push(&key).await?,
                // Nothing of it is here: ask for all of it.
                None => self.session.ask(&key)?,
            }
        }
        Ok(())
    }

    /// Hands what the session queued to the writer, and logs and counts its events.
    fn flush(&mut self) -> Result<(), SessionError> {
        let metrics = self.node.metrics();
        let role = self.peer().role.as_str();
        while let Some(transmit) = self.session.poll_transmit() {
            let mut n = 0;
            for frame in &transmit.frames {
                n += frame.len() as u64;
                metrics.traffic(role, "out", frame.len() as u64);
            }
            if let Some(doc) = &transmit.doc {
                debug!(peer = %self.peer().name, doc = %doc, bytes = n, frames = transmit.frames.len(), "sync sent");
            }
            metrics.pending.inc_by(transmit.frames.len() as i64);
            self.node
                .peers()
                .touch(&self.peer().name, |p| p.bytes_out += n);
            self.out
                .send(Box::new(transmit))
                .map_err(|_| SessionError::Protocol("connection writer has stopped".into()))?;
        }
        while let Some(event) = self.session.poll_event() {
            let peer = &self.peer().name;
            match event {
                Event::Failed {
                    doc,
                    reason,
                    retry_in,
                } => {
                    let labels = crate::metrics::RoleLabels { role: role.into() };
                    metrics.sync_failures.get_or_create(&labels).inc();
                    warn!(peer = %peer, doc = %doc, %reason, ?retry_in, "sync of a document failed; the other documents go on");
                }
                Event::Refused { doc } => {
                    warn!(peer = %peer, doc = %doc, "refused sync for a document this peer may not access")
                }
                Event::PeerError { message } => {
                    warn!(peer = %peer, %message, "peer reported an error")
                }
            }
        }
        Ok(())
    }

    /// Counts a frame of `len` bytes (header included, as counted going out) from the peer.
    fn count_in(&self, len: usize) {
        let size = len as u64;
        self.node
            .metrics()
            .traffic(self.peer().role.as_str(), "in", size);
        self.node.peers().touch(&self.peer().name, |p| {
            p.bytes_in += size;
            p.last_seen = Some(now());
        });
    }
}

/// Logs the end of a session: a broken link is routine (info), a misbehaving peer is not (warn).
/// `link_lost` is why the connection under it ended, if it did (timed out, reset by peer...):
/// said instead of the stream's bare "connection lost".
pub fn log_end(
    peer: &Identity,
    result: &Result<(), SessionError>,
    link_lost: Option<impl std::fmt::Display>,
) {
    match result {
        Ok(()) => info!(peer = %peer.name, role = %peer.role, "peer disconnected"),
        Err(SessionError::Wire(WireError::Io(e))) => {
            let reason = link_lost.map_or_else(|| e.to_string(), |why| why.to_string());
            info!(peer = %peer.name, role = %peer.role, %reason, "peer disconnected")
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
    use automerge::sync::{self, SyncDoc};
    use std::collections::HashMap;
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

    /// A running session, the token that ends it, and the halves of the stream the test plays
    /// its peer over.
    type TestSession = (
        tokio::task::JoinHandle<Result<(), SessionError>>,
        CancellationToken,
        tokio::io::ReadHalf<tokio::io::DuplexStream>,
        tokio::io::WriteHalf<tokio::io::DuplexStream>,
    );

    /// A session of `here` with a head "head-b" that the test plays.
    fn session_with_test_peer(here: &Node) -> TestSession {
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
            version: None,
        };
        let shutdown = CancellationToken::new();
        let session = tokio::spawn(run_session(
            here.clone(),
            peer,
            address,
            recv,
            send,
            Dialect::default(),
            shutdown.clone(),
        ));
        let (rx, tx) = tokio::io::split(theirs);
        (session, shutdown, rx, tx)
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
                source
                    .docs()
                    .apply_text(&edgenode(ns), "default")
                    .await
                    .unwrap();
            }
            let (session, shutdown, mut rx, mut tx) = session_with_test_peer(&here);
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
            let good_doc = source.docs().sync_doc("good/edge01").unwrap();
            let first = good_doc
                .lock()
                .await
                .doc()
                .sync()
                .generate_sync_message(good);
            let first = first.unwrap();
            let first = Frame::Sync {
                doc: "good/edge01".into(),
                message: first.encode(),
            };
            write_frame(&mut tx, &first).await.unwrap();

            let mut errors = Vec::new();
            let have = |key: &'static str| {
                let here = here.clone();
                async move {
                    here.docs()
                        .view(key)
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
                        let entry = source.docs().sync_entry(&doc).unwrap();
                        let mut entry = entry.lock().await;
                        let theirs = entry.doc();
                        theirs.sync().receive_sync_message(state, message).unwrap();
                        let reply = entry.doc().sync().generate_sync_message(state);
                        drop(entry);
                        if let Some(reply) = reply {
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

    /// A frame that arrives a byte at a time, while the session's other work (pushes of local
    /// edits) takes turns with its read, is read whole: the read under way is kept across turns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_read_across_other_work_arrives_whole() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let here = node(&dir.path().join("here"), "head-a").await;
            let source = node(&dir.path().join("source"), "head-b").await;
            source
                .docs()
                .apply_text(&edgenode("slow"), "default")
                .await
                .unwrap();
            let (session, shutdown, mut rx, mut tx) = session_with_test_peer(&here);
            // What the session sends is read and dropped, so its writer never waits.
            tokio::spawn(
                async move { while let Ok(Some(_)) = read_frame(&mut rx, MAX_FRAME).await {} },
            );

            // A message that carries the document's changes: the answer to an empty peer's.
            let entry = source.docs().sync_entry("slow/edge01").unwrap();
            let mut entry = entry.lock().await;
            let (mut theirs, mut empty_state) = (sync::State::new(), sync::State::new());
            let mut empty = automerge::AutoCommit::new();
            let first = entry
                .doc()
                .sync()
                .generate_sync_message(&mut theirs)
                .unwrap();
            let mut asker = empty.sync();
            asker.receive_sync_message(&mut empty_state, first).unwrap();
            let asked = asker.generate_sync_message(&mut empty_state).unwrap();
            let message = {
                let mut answerer = entry.doc().sync();
                answerer.receive_sync_message(&mut theirs, asked).unwrap();
                answerer.generate_sync_message(&mut theirs).unwrap()
            };
            drop(entry);
            let frame = Frame::Sync {
                doc: "slow/edge01".into(),
                message: message.encode(),
            };
            let mut bytes = Vec::new();
            write_frame(&mut bytes, &frame).await.unwrap();
            use tokio::io::AsyncWriteExt;
            for (i, byte) in bytes.iter().enumerate() {
                tx.write_all(&[*byte]).await.unwrap();
                tx.flush().await.unwrap();
                if i % 64 == 0 {
                    // A local edit: the session pushes it between the frame's bytes.
                    let ns = format!("local{i}");
                    here.docs()
                        .apply_text(&edgenode(&ns), "default")
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            loop {
                let view = here.docs().view("slow/edge01").await.unwrap();
                if view.is_some_and(|(v, _)| v.pods.contains_key("web")) {
                    break;
                }
                assert!(
                    !session.is_finished(),
                    "the session ended: {:?}",
                    session.await
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            shutdown.cancel();
            session.await.unwrap().unwrap();
        })
        .await
        .expect("test timed out");
    }
}
