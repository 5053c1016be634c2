//! One sync session per connection: Automerge's sync protocol per (peer, document), pushed on
//! every change, with sync state persisted so a reconnect sends only what is missing.

pub mod wire;

use crate::node::{Node, PeerInfo, now};
use crate::transport::tls::Identity;
use automerge::sync;
use std::collections::HashMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::{Frame, WireError, read_frame, write_frame};

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
pub async fn run_session<R, W>(
    node: Node,
    peer: Identity,
    address: String,
    recv: R,
    mut send: W,
    shutdown: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let mut changes = node.subscribe();
    node.peer_update(PeerInfo {
        name: peer.name.clone(),
        role: peer.role,
        address,
        connected: true,
        last_seen: Some(now()),
        bytes_out: 0,
        bytes_in: 0,
    });
    let mut session = Session {
        node: node.clone(),
        peer: peer.clone(),
        states: HashMap::new(),
    };
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
    let (frames_tx, mut frames) = mpsc::channel(64);
    let reader = tokio::spawn(read_frames(recv, frames_tx));
    let result = async {
        for key in node.keys() {
            session.push(&key, &mut send).await?;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                frame = frames.recv() => match frame {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(frame)) => session.handle(frame, &mut send).await?,
                },
                changed = changes.recv() => match changed {
                    Ok(key) => session.push(&key, &mut send).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        for key in node.keys() {
                            session.push(&key, &mut send).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
    .await;
    reader.abort();
    node.peer_touch(&peer.name, |p| p.connected = false);
    result
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut recv: R,
    out: mpsc::Sender<Result<Frame, WireError>>,
) {
    loop {
        let frame = read_frame(&mut recv).await;
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

struct Session {
    node: Node,
    peer: Identity,
    states: HashMap<String, sync::State>,
}

impl Session {
    /// Sends the next sync message for `key`, if the peer may see it and there is one.
    async fn push<W: AsyncWrite + Unpin>(
        &mut self,
        key: &str,
        send: &mut W,
    ) -> Result<(), SessionError> {
        if !self.peer.may_access(key) {
            return Ok(());
        }
        let state = self.states.entry(key.to_string()).or_default();
        if let Some(message) = self.node.generate_sync(key, state).await {
            let frame = Frame::Sync {
                doc: key.to_string(),
                message: message.encode(),
            };
            let n = write_frame(send, &frame).await?;
            debug!(peer = %self.peer.name, doc = key, bytes = n, "sync sent");
            self.node
                .peer_touch(&self.peer.name, |p| p.bytes_out += n as u64);
        }
        Ok(())
    }

    async fn handle<W: AsyncWrite + Unpin>(
        &mut self,
        frame: Frame,
        send: &mut W,
    ) -> Result<(), SessionError> {
        let (key, message) = match frame {
            Frame::Sync { doc, message } => (doc, message),
            Frame::Hello { .. } => return Ok(()),
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
        self.node.peer_touch(&self.peer.name, |p| {
            p.bytes_in += size;
            p.last_seen = Some(now());
        });
        if !self.peer.may_access(&key) {
            warn!(peer = %self.peer.name, doc = %key, "refused sync for a document this peer may not access");
            let refusal = Frame::Error {
                message: format!("{} may not access document {key}", self.peer.name),
            };
            write_frame(send, &refusal).await?;
            return Ok(());
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
        self.push(&key, send).await
    }
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
