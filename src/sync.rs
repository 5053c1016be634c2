//! One sync session per connection: Automerge's sync protocol per (peer, document), pushed on
//! every change, with sync state persisted so a reconnect sends only what is missing.

pub mod feed;
pub mod wire;

use crate::node::{Node, PeerAddress, now};
use crate::transport::tls::Identity;
use automerge::sync;
use std::collections::HashMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::{Frame, WireError, read_frame};

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
    let (frames_tx, mut frames) = mpsc::channel(16);
    let reader = tokio::spawn(read_frames(recv, frames_tx));
    let result = async {
        // What changed here since the last sync goes out at once, ahead of the summary; the
        // rest starts syncing when the peer's summary shows it differs.
        session.push_changed_since_last_sync().await?;
        session.send_summary().await?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
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

async fn write_frames<W: AsyncWrite + Unpin>(
    mut send: W,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
    node: Node,
) -> Result<(), WireError> {
    use tokio::io::AsyncWriteExt;
    while let Some(bytes) = queue.recv().await {
        node.metrics().pending.dec();
        send.write_all(&bytes).await?;
    }
    send.shutdown().await?;
    Ok(())
}

struct Session {
    node: Node,
    peer: Identity,
    states: HashMap<String, sync::State>,
    out: mpsc::UnboundedSender<Vec<u8>>,
}

impl Session {
    /// Queues a frame for the writer; counts its bytes.
    fn send(&self, frame: &Frame) -> Result<(), SessionError> {
        let bytes = frame.encode()?;
        let n = bytes.len() as u64;
        self.out
            .send(bytes)
            .map_err(|_| SessionError::Protocol("connection writer has stopped".into()))?;
        let metrics = self.node.metrics();
        metrics.pending.inc();
        metrics.traffic(self.peer.role.as_str(), "out", n);
        self.node.peer_touch(&self.peer.name, |p| p.bytes_out += n);
        Ok(())
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

    /// Sends the next sync message for `key`, if the peer may see it and there is one.
    async fn push(&mut self, key: &str) -> Result<(), SessionError> {
        if !self.peer.may_access(key) {
            return Ok(());
        }
        let state = self.states.entry(key.to_string()).or_default();
        if let Some(message) = self.node.generate_sync(key, state).await {
            debug!(peer = %self.peer.name, doc = key, "sync sent");
            self.send(&Frame::Sync {
                doc: key.to_string(),
                message: message.encode(),
            })?;
        }
        Ok(())
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), SessionError> {
        let (key, message) = match frame {
            Frame::Sync { doc, message } => (doc, message),
            Frame::Hello { .. } => return Ok(()),
            Frame::Summary { entries } => return self.on_summary(entries).await,
            Frame::Error { message } => {
                warn!(peer = %self.peer.name, %message, "peer reported an error");
                return Ok(());
            }
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected frame {other:?} in a sync session"
                )));
            }
        };
        let size = message.len() as u64 + key.len() as u64;
        self.node
            .metrics()
            .traffic(self.peer.role.as_str(), "in", size);
        self.node.peer_touch(&self.peer.name, |p| {
            p.bytes_in += size;
            p.last_seen = Some(now());
        });
        if !self.peer.may_access(&key) {
            warn!(peer = %self.peer.name, doc = %key, "refused sync for a document this peer may not access");
            return self.send(&Frame::Error {
                message: format!("{} may not access document {key}", self.peer.name),
            });
        }
        let message = sync::Message::decode(&message).map_err(|e| {
            SessionError::Protocol(format!("document {key}: undecodable sync message: {e}"))
        })?;
        let state = self.states.entry(key.clone()).or_default();
        if let Err(e) = self
            .node
            .receive_sync(&self.peer.name, &key, message, state)
            .await
        {
            warn!(peer = %self.peer.name, doc = %key, error = %e, "sync message not applied");
            return Err(SessionError::Protocol(e.to_string()));
        }
        debug!(peer = %self.peer.name, doc = %key, "sync received");
        let role = crate::metrics::RoleLabels {
            role: self.peer.role.as_str().into(),
        };
        self.node.metrics().sync_rounds.get_or_create(&role).inc();
        self.push(&key).await
    }
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
