//! Versioned, length-prefixed frames on a QUIC stream: encode, decode, size limits.
//!
//! A frame is `version u8 | kind u8 | length u32 (big endian) | payload`. Payload fields are
//! `u32` length-prefixed byte strings. Every length is checked before anything is allocated.
//!
//! A sync message that does not fit one frame goes as [`Frame::SyncChunk`]s of at most
//! [`SYNC_CHUNK`] bytes, put back together by a [`Reassembly`] that holds at most
//! [`MAX_REASSEMBLY`] bytes per session; a message over [`MAX_SYNC_MESSAGE`] is refused for its
//! document alone.

use std::collections::HashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Wire format version this build speaks.
pub const VERSION: u8 = 1;
/// Largest frame accepted or sent (payload bytes).
pub const MAX_FRAME: usize = 8 << 20;
const MAX_DOC_KEY: usize = 64 + 253 + 1;
/// Largest sync message (one document's changes, or the whole document) sent or accepted.
pub const MAX_SYNC_MESSAGE: usize = 64 << 20;
/// Bytes of a sync message per [`Frame::SyncChunk`].
pub const SYNC_CHUNK: usize = 1 << 20;
/// Most bytes of partly received sync messages one session holds (claimed sizes, reserved
/// when a message's first chunk arrives).
pub const MAX_REASSEMBLY: usize = MAX_SYNC_MESSAGE;
// A document's whole history, which apply bounds, must fit one sync message with room for
// its heads and filters.
const _: () = assert!(crate::input::MAX_HISTORY_BYTES <= MAX_SYNC_MESSAGE / 4 * 3);
/// Most documents with a partly received sync message at once in one session (a sender sends
/// one such message at a time).
pub const MAX_PARTIAL_DOCS: usize = 4;
/// Longest version a [`Frame::Hello`] may carry.
pub const MAX_VERSION: usize = 64;
/// Longest [`Frame::Error`] text accepted.
pub const MAX_ERROR_TEXT: usize = 4096;

/// One message between peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a sync stream; carries the sender's node name for logs.
    Hello {
        /// Sender's node name.
        name: String,
        /// The address others should use to reach the sender (an edge's
        /// `--advertise-address`); empty when the address the receiver sees will do.
        advertise: String,
        /// The sender's edgesync version; sent only on a connection that negotiated
        /// [`crate::transport::tls::ALPN_HELLO_VERSION`] (a receiver of the first release refuses
        /// the field), empty otherwise.
        version: String,
    },
    /// An Automerge sync message for one document.
    Sync {
        /// Document key `namespace/name`.
        doc: String,
        /// Encoded `automerge::sync::Message`.
        message: Vec<u8>,
    },
    /// A part of an Automerge sync message too large for one [`Frame::Sync`]. The parts of one
    /// message go in order; parts of another document's message may come in between.
    SyncChunk {
        /// Document key `namespace/name`.
        doc: String,
        /// Length of the whole message.
        total: u32,
        /// Where in the message this part starts.
        offset: u32,
        /// The part.
        data: Vec<u8>,
    },
    /// Opens a join stream: the token and a certificate request.
    JoinRequest {
        /// Node name to join as.
        node: String,
        /// Token id.
        token_id: String,
        /// Token secret.
        secret: String,
        /// DER certificate signing request for the node's own key.
        csr: Vec<u8>,
        /// Address the node wants to be reached at (may be empty).
        advertise: String,
    },
    /// Opens a renewal stream (on a connection with a valid client certificate): a certificate
    /// request for a new key, to be signed for the same identity.
    Renew {
        /// DER certificate signing request.
        csr: Vec<u8>,
    },
    /// The head's answer to a join or renewal: the node's certificate and the CA.
    JoinAccepted {
        /// Node certificate, PEM.
        cert_pem: String,
        /// CA certificate, PEM.
        ca_pem: String,
    },
    /// A refusal; the text is meant for a person.
    Error {
        /// What went wrong.
        message: String,
    },
    /// A sync message in the compact encoding ([`super::compact`]), sent only on a connection
    /// that negotiated [`crate::transport::tls::ALPN_COMPACT`]. Its document goes by a number
    /// the sender gave it in this session, named with the first frame of that number.
    SyncCompact {
        /// The sender's number for the document.
        number: u32,
        /// The document's key `namespace/name`, sent with the first frame of its number.
        key: Option<String>,
        /// The compact message.
        message: Vec<u8>,
    },
    /// Sent by both sides when a session starts: a short digest of the heads of every document
    /// the other side may see, so only documents that differ start a sync.
    Summary {
        /// Document key and [`DIGEST_LEN`] bytes of the SHA-256 of its sorted heads.
        entries: Vec<(String, Vec<u8>)>,
    },
}

/// Length of a document's heads digest in a [`Frame::Summary`].
pub const DIGEST_LEN: usize = 8;

/// [`DIGEST_LEN`] bytes of the SHA-256 of `heads` in sorted order.
pub fn heads_digest(heads: &[automerge::ChangeHash]) -> Vec<u8> {
    use sha2::Digest;
    let mut sorted = heads.to_vec();
    sorted.sort();
    let mut hasher = sha2::Sha256::new();
    for head in &sorted {
        hasher.update(head.0);
    }
    hasher.finalize()[..DIGEST_LEN].to_vec()
}

/// A frame could not be read or was invalid.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// Unknown wire version.
    #[error("peer speaks wire version {0}, this edgesync speaks {VERSION}")]
    Version(u8),
    /// Frame too large.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// Payload does not match its kind.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A sync message too large to send.
    #[error("sync message of {0} bytes exceeds the limit of {MAX_SYNC_MESSAGE}")]
    MessageTooLarge(usize),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::Sync { .. } => 2,
            Frame::JoinRequest { .. } => 3,
            Frame::JoinAccepted { .. } => 4,
            Frame::Error { .. } => 5,
            Frame::Renew { .. } => 6,
            Frame::Summary { .. } => 7,
            Frame::SyncChunk { .. } => 8,
            Frame::SyncCompact { .. } => 9,
        }
    }

    /// The frame's length on the wire, header included (what [`Frame::encode`] makes of it),
    /// without encoding it.
    pub fn wire_len(&self) -> usize {
        let mut len = 6;
        self.each_field(|field| len += field.len());
        len
    }

    /// An error frame; the text is cut to what the peer accepts.
    pub fn error(message: impl Into<String>) -> Frame {
        let mut message = message.into();
        if message.len() > MAX_ERROR_TEXT {
            let mut end = MAX_ERROR_TEXT - 3;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("...");
        }
        Frame::Error { message }
    }

    /// Encodes the frame, header included.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut payload = Vec::new();
        self.each_field(|field| payload.extend_from_slice(field));
        if payload.len() > MAX_FRAME {
            return Err(WireError::TooLarge(payload.len()));
        }
        let mut out = Vec::with_capacity(6 + payload.len());
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Calls `out` with the payload's bytes in order, in pieces.
    fn each_field(&self, mut out: impl FnMut(&[u8])) {
        // Most fields go as a `u32` length and their bytes.
        let mut field = |bytes: &[u8]| {
            out(&(bytes.len() as u32).to_be_bytes());
            out(bytes);
        };
        match self {
            Frame::SyncCompact {
                number,
                key,
                message,
            } => {
                // LEB128: the number (shifted, its low bit telling whether the key follows),
                // the key's length and the key; the message is the rest.
                let mut uint = |n: u64| {
                    let mut buf = [0u8; 10];
                    let len = leb128::write::unsigned(&mut &mut buf[..], n)
                        .expect("a u64 fits 10 bytes of LEB128");
                    out(&buf[..len]);
                };
                uint((u64::from(*number) << 1) | u64::from(key.is_some()));
                if let Some(key) = key {
                    uint(key.len() as u64);
                    out(key.as_bytes());
                }
                out(message);
            }
            Frame::Hello {
                name,
                advertise,
                version,
            } => {
                field(name.as_bytes());
                field(advertise.as_bytes());
                if !version.is_empty() {
                    field(version.as_bytes());
                }
            }
            Frame::Sync { doc, message } => {
                field(doc.as_bytes());
                field(message);
            }
            Frame::JoinRequest {
                node,
                token_id,
                secret,
                csr,
                advertise,
            } => {
                field(node.as_bytes());
                field(token_id.as_bytes());
                field(secret.as_bytes());
                field(csr);
                field(advertise.as_bytes());
            }
            Frame::JoinAccepted { cert_pem, ca_pem } => {
                field(cert_pem.as_bytes());
                field(ca_pem.as_bytes());
            }
            Frame::SyncChunk {
                doc,
                total,
                offset,
                data,
            } => {
                field(doc.as_bytes());
                field(&total.to_be_bytes());
                field(&offset.to_be_bytes());
                field(data);
            }
            Frame::Error { message } => field(message.as_bytes()),
            Frame::Renew { csr } => field(csr),
            Frame::Summary { entries } => {
                for (key, digest) in entries {
                    field(key.as_bytes());
                    field(digest);
                }
            }
        }
    }

    /// Decodes a payload of the given kind.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame, WireError> {
        let mut fields = Fields(payload);
        let frame = match kind {
            1 => Frame::Hello {
                name: fields.text(253)?,
                advertise: fields.text(64)?,
                version: match fields.0.is_empty() {
                    true => String::new(),
                    false => fields.text(MAX_VERSION)?,
                },
            },
            2 => Frame::Sync {
                doc: fields.text(MAX_DOC_KEY)?,
                message: fields.bytes(MAX_FRAME)?,
            },
            3 => Frame::JoinRequest {
                node: fields.text(253)?,
                token_id: fields.text(64)?,
                secret: fields.text(128)?,
                csr: fields.bytes(16 << 10)?,
                advertise: fields.text(64)?,
            },
            4 => Frame::JoinAccepted {
                cert_pem: fields.text(64 << 10)?,
                ca_pem: fields.text(64 << 10)?,
            },
            5 => Frame::Error {
                message: fields.text(MAX_ERROR_TEXT)?,
            },
            6 => Frame::Renew {
                csr: fields.bytes(16 << 10)?,
            },
            7 => {
                let mut entries = Vec::new();
                while !fields.0.is_empty() {
                    entries.push((fields.text(MAX_DOC_KEY)?, fields.bytes(DIGEST_LEN)?));
                }
                Frame::Summary { entries }
            }
            8 => {
                let (doc, total, offset) =
                    (fields.text(MAX_DOC_KEY)?, fields.u32()?, fields.u32()?);
                let data = fields.bytes(SYNC_CHUNK)?;
                if data.is_empty() || offset as u64 + data.len() as u64 > total as u64 {
                    return Err(WireError::Malformed(
                        "sync message part outside its message",
                    ));
                }
                Frame::SyncChunk {
                    doc,
                    total,
                    offset,
                    data,
                }
            }
            9 => {
                let mut rest = payload;
                let uint = |rest: &mut &[u8]| {
                    leb128::read::unsigned(rest).map_err(|_| WireError::Malformed("bad integer"))
                };
                let tagged = uint(&mut rest)?;
                let number = u32::try_from(tagged >> 1)
                    .map_err(|_| WireError::Malformed("document number out of range"))?;
                let key = match tagged & 1 {
                    1 => {
                        let len = uint(&mut rest)? as usize;
                        if len > MAX_DOC_KEY || len > rest.len() {
                            return Err(WireError::Malformed("field length out of bounds"));
                        }
                        let (key, tail) = rest.split_at(len);
                        rest = tail;
                        Some(
                            String::from_utf8(key.to_vec())
                                .map_err(|_| WireError::Malformed("text is not UTF-8"))?,
                        )
                    }
                    _ => None,
                };
                fields = Fields(&[]);
                Frame::SyncCompact {
                    number,
                    key,
                    message: rest.to_vec(),
                }
            }
            _ => return Err(WireError::Malformed("unknown frame kind")),
        };
        if !fields.0.is_empty() {
            return Err(WireError::Malformed("trailing bytes"));
        }
        Ok(frame)
    }
}

struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn bytes(&mut self, limit: usize) -> Result<Vec<u8>, WireError> {
        if self.0.len() < 4 {
            return Err(WireError::Malformed("truncated field length"));
        }
        let (len, rest) = self.0.split_at(4);
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > limit || len > rest.len() {
            return Err(WireError::Malformed("field length out of bounds"));
        }
        let (field, rest) = rest.split_at(len);
        self.0 = rest;
        Ok(field.to_vec())
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let bytes = self.bytes(4)?;
        let bytes: [u8; 4] = bytes
            .try_into()
            .map_err(|_| WireError::Malformed("short integer"))?;
        Ok(u32::from_be_bytes(bytes))
    }

    fn text(&mut self, limit: usize) -> Result<String, WireError> {
        String::from_utf8(self.bytes(limit)?).map_err(|_| WireError::Malformed("text is not UTF-8"))
    }
}

/// Largest first frame of a connection (a join, renewal or hello), read before the peer has
/// proven anything.
pub const MAX_FIRST_FRAME: usize = 64 << 10;

/// Bytes of a frame's payload reserved before they arrive.
const READ_AHEAD: usize = 64 << 10;

/// Reads one frame of at most `limit` payload bytes; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<Frame>, WireError> {
    let mut header = [0u8; 6];
    match reader.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    reader.read_exact(&mut header[1..]).await?;
    if header[0] != VERSION {
        return Err(WireError::Version(header[0]));
    }
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if len > limit.min(MAX_FRAME) {
        return Err(WireError::TooLarge(len));
    }
    // The buffer grows as bytes arrive: a peer announcing a large frame and sending little
    // holds no more memory than it sent.
    let mut payload = Vec::with_capacity(len.min(READ_AHEAD));
    (&mut *reader)
        .take(len as u64)
        .read_to_end(&mut payload)
        .await?;
    if payload.len() < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Frame::decode(header[1], &payload).map(Some)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> Result<usize, WireError> {
    let bytes = frame.encode()?;
    writer.write_all(&bytes).await?;
    Ok(bytes.len())
}

/// The encoded frames that carry sync `message` for document `doc`: one [`Frame::Sync`] when it
/// fits (as every edgesync reads), else [`Frame::SyncChunk`]s of [`SYNC_CHUNK`] bytes.
pub fn sync_frames(doc: &str, message: Vec<u8>) -> Result<Vec<Vec<u8>>, WireError> {
    if message.len() > MAX_SYNC_MESSAGE {
        return Err(WireError::MessageTooLarge(message.len()));
    }
    if 8 + doc.len() + message.len() <= MAX_FRAME {
        let doc = doc.to_string();
        return Ok(vec![Frame::Sync { doc, message }.encode()?]);
    }
    let total = message.len() as u32;
    message
        .chunks(SYNC_CHUNK)
        .enumerate()
        .map(|(i, data)| {
            Frame::SyncChunk {
                doc: doc.to_string(),
                total,
                offset: (i * SYNC_CHUNK) as u32,
                data: data.to_vec(),
            }
            .encode()
        })
        .collect()
}

/// A chunked sync message for one document could not be put together; the rest of that
/// message is dropped as it arrives.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The message is larger than any this node accepts.
    #[error("sync message of {0} bytes exceeds the limit of {MAX_SYNC_MESSAGE}")]
    TooLarge(usize),
    /// Other documents' messages hold the session's reassembly budget.
    #[error(
        "sync message of {0} bytes does not fit beside the other partly received messages \
         (at most {MAX_REASSEMBLY} bytes and {MAX_PARTIAL_DOCS} documents per session)"
    )]
    Busy(usize),
    /// A part is missing, repeated or out of place.
    #[error("sync message part at offset {offset} out of place (expected offset {expected})")]
    OutOfPlace {
        /// The part's offset.
        offset: u32,
        /// The offset expected next.
        expected: u32,
    },
}

/// Partly received chunked sync messages of one session, bounded in bytes and documents.
#[derive(Debug, Default)]
pub struct Reassembly {
    partial: HashMap<String, Partial>,
    reserved: usize,
}

#[derive(Debug)]
struct Partial {
    total: u32,
    next: u32,
    /// None while the rest of a refused message is being dropped.
    buf: Option<Vec<u8>>,
}

impl Reassembly {
    /// Takes one part (checked by [`Frame::decode`] to lie within its message); returns the
    /// whole message after its last part. After an error the remaining parts of that message
    /// are dropped without another error.
    pub fn push(
        &mut self,
        doc: &str,
        total: u32,
        offset: u32,
        data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, ChunkError> {
        let end = offset.saturating_add(data.len() as u32);
        if offset == 0 {
            // A new message: whatever was left of an earlier one for this document is gone.
            self.forget(doc);
            return self.start(doc, total, data);
        }
        let expected = match self.partial.get_mut(doc) {
            Some(p) if p.total == total && p.next == offset => {
                p.next = end;
                if let Some(buf) = p.buf.as_mut() {
                    buf.extend_from_slice(&data);
                }
                None
            }
            Some(p) => Some(p.next),
            None => Some(0),
        };
        if let Some(expected) = expected {
            self.forget(doc);
            self.drop_rest(doc, total, end);
            return Err(ChunkError::OutOfPlace { offset, expected });
        }
        if end < total {
            return Ok(None);
        }
        let done = self.partial.remove(doc).and_then(|p| p.buf);
        if done.is_some() {
            self.reserved -= total as usize;
        }
        Ok(done)
    }

    fn start(
        &mut self,
        doc: &str,
        total: u32,
        data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, ChunkError> {
        let size = total as usize;
        let end = data.len() as u32;
        if end == total {
            return Ok(Some(data));
        }
        let buffering = self.partial.values().filter(|p| p.buf.is_some()).count();
        let error = if size > MAX_SYNC_MESSAGE {
            Some(ChunkError::TooLarge(size))
        } else if self.reserved + size > MAX_REASSEMBLY || buffering >= MAX_PARTIAL_DOCS {
            Some(ChunkError::Busy(size))
        } else {
            None
        };
        if let Some(error) = error {
            self.drop_rest(doc, total, end);
            return Err(error);
        }
        self.reserved += size;
        let mut buf = Vec::with_capacity(size.min(2 * SYNC_CHUNK));
        buf.extend_from_slice(&data);
        let partial = Partial {
            total,
            next: end,
            buf: Some(buf),
        };
        self.partial.insert(doc.to_string(), partial);
        Ok(None)
    }

    /// Remembers to drop the parts of `doc`'s message after `end`, if more are to come and
    /// few enough messages are being dropped (otherwise each later part is refused alone).
    fn drop_rest(&mut self, doc: &str, total: u32, end: u32) {
        let dropping = self.partial.values().filter(|p| p.buf.is_none()).count();
        if end < total && dropping < MAX_PARTIAL_DOCS {
            let partial = Partial {
                total,
                next: end,
                buf: None,
            };
            self.partial.insert(doc.to_string(), partial);
        }
    }

    fn forget(&mut self, doc: &str) {
        if let Some(Partial {
            buf: Some(_),
            total,
            ..
        }) = self.partial.remove(doc)
        {
            self.reserved -= total as usize;
        }
    }

    /// Bytes reserved by partly received messages.
    pub fn reserved(&self) -> usize {
        self.reserved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                name: "edge01".into(),
                advertise: "2001:db8::1".into(),
                version: "0.1.0+dcb77c7".into(),
            },
            Frame::Hello {
                name: "edge01".into(),
                advertise: String::new(),
                version: String::new(),
            },
            Frame::Sync {
                doc: "default/edge01".into(),
                message: vec![1, 2, 3],
            },
            Frame::JoinRequest {
                node: "edge01".into(),
                token_id: "abcd".into(),
                secret: "s".into(),
                csr: vec![9; 300],
                advertise: "10.0.0.1".into(),
            },
            Frame::JoinAccepted {
                cert_pem: "c".into(),
                ca_pem: "a".into(),
            },
            Frame::Error {
                message: "no".into(),
            },
            Frame::Renew { csr: vec![7; 200] },
            Frame::Summary {
                entries: vec![
                    ("default/edge01".into(), vec![1; DIGEST_LEN]),
                    ("team-a/edge01".into(), vec![2; DIGEST_LEN]),
                ],
            },
            Frame::SyncChunk {
                doc: "default/edge01".into(),
                total: 10,
                offset: 4,
                data: vec![5; 6],
            },
            Frame::SyncCompact {
                number: 300,
                key: Some("default/edge01".into()),
                message: vec![6; 9],
            },
            Frame::SyncCompact {
                number: 1,
                key: None,
                message: Vec::new(),
            },
        ]
    }

    /// Every async test here runs under a deadline.
    async fn bounded(body: impl std::future::Future<Output = ()>) {
        tokio::time::timeout(std::time::Duration::from_secs(5), body)
            .await
            .expect("test timed out");
    }

    #[tokio::test]
    async fn frames_round_trip() {
        bounded(async {
            let mut buf = Vec::new();
            for frame in all_frames() {
                write_frame(&mut buf, &frame).await.unwrap();
            }
            let mut reader = &buf[..];
            for frame in all_frames() {
                assert_eq!(frame.wire_len(), frame.encode().unwrap().len(), "{frame:?}");
                assert_eq!(
                    read_frame(&mut reader, MAX_FRAME).await.unwrap(),
                    Some(frame)
                );
            }
            assert_eq!(read_frame(&mut reader, MAX_FRAME).await.unwrap(), None);
        })
        .await;
    }

    #[tokio::test]
    async fn bad_frames_are_refused_before_allocation() {
        bounded(async {
            let too_big = [VERSION, 2, 0xff, 0xff, 0xff, 0xff];
            assert!(matches!(
                read_frame(&mut &too_big[..], MAX_FRAME).await,
                Err(WireError::TooLarge(_))
            ));
            let wrong_version = [9, 2, 0, 0, 0, 0];
            assert!(matches!(
                read_frame(&mut &wrong_version[..], MAX_FRAME).await,
                Err(WireError::Version(9))
            ));
            let lying_field = [VERSION, 1, 0, 0, 0, 4, 0, 0, 0, 200];
            assert!(matches!(
                read_frame(&mut &lying_field[..], MAX_FRAME).await,
                Err(WireError::Malformed(_))
            ));
            let big_first = [VERSION, 3, 0, 2, 0, 0];
            assert!(matches!(
                read_frame(&mut &big_first[..], MAX_FIRST_FRAME).await,
                Err(WireError::TooLarge(131072))
            ));
            // Announces 8 MiB and sends 3 bytes: an end of stream, with 3 bytes read.
            let short = [VERSION, 2, 0, 0x80, 0, 0, 1, 2, 3];
            assert!(matches!(
                read_frame(&mut &short[..], MAX_FRAME).await,
                Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
            ));
            let unknown_kind = [VERSION, 77, 0, 0, 0, 0];
            assert!(matches!(
                read_frame(&mut &unknown_kind[..], MAX_FRAME).await,
                Err(WireError::Malformed(_))
            ));
            // A compact frame whose key runs past the frame, or whose number is too large.
            for payload in [&[0x03, 0x05, b'a'][..], &[0x80, 0x80, 0x80, 0x80, 0x40]] {
                assert!(matches!(
                    Frame::decode(9, payload),
                    Err(WireError::Malformed(_))
                ));
            }
            for frame in all_frames() {
                let bytes = frame.encode().unwrap();
                let truncated = &bytes[..bytes.len() - 1];
                assert!(read_frame(&mut &truncated[..], MAX_FRAME).await.is_err());
            }
        })
        .await;
    }

    fn decode_all(frames: &[Vec<u8>]) -> Vec<Frame> {
        frames
            .iter()
            .map(|bytes| {
                let len = u32::from_be_bytes(bytes[2..6].try_into().unwrap()) as usize;
                assert!(len <= MAX_FRAME, "frame of {len} bytes");
                Frame::decode(bytes[1], &bytes[6..]).unwrap()
            })
            .collect()
    }

    /// Whole messages and errors, by document.
    type Fed = (Vec<(String, Vec<u8>)>, Vec<(String, ChunkError)>);

    /// Feeds chunk frames to `r`; returns the whole messages and the errors.
    fn feed(r: &mut Reassembly, frames: Vec<Frame>) -> Fed {
        let (mut done, mut errors) = (Vec::new(), Vec::new());
        for frame in frames {
            let Frame::SyncChunk {
                doc,
                total,
                offset,
                data,
            } = frame
            else {
                panic!("not a chunk: {frame:?}");
            };
            match r.push(&doc, total, offset, data) {
                Ok(Some(message)) => done.push((doc, message)),
                Ok(None) => {}
                Err(e) => errors.push((doc, e)),
            }
        }
        (done, errors)
    }

    fn chunks(doc: &str, message: &[u8]) -> Vec<Frame> {
        let total = message.len() as u32;
        message
            .chunks(SYNC_CHUNK)
            .enumerate()
            .map(|(i, data)| Frame::SyncChunk {
                doc: doc.into(),
                total,
                offset: (i * SYNC_CHUNK) as u32,
                data: data.to_vec(),
            })
            .collect()
    }

    fn message(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn a_message_that_fits_goes_in_one_sync_frame_a_larger_one_in_bounded_chunks() {
        let small = message(1000, 1);
        let frames = decode_all(&sync_frames("ns/edge01", small.clone()).unwrap());
        assert_eq!(
            frames,
            [Frame::Sync {
                doc: "ns/edge01".into(),
                message: small
            }]
        );

        let large = message(MAX_FRAME + 3 * SYNC_CHUNK / 2, 2);
        let frames = decode_all(&sync_frames("ns/edge01", large.clone()).unwrap());
        assert_eq!(frames.len(), 10);
        let mut r = Reassembly::default();
        let (done, errors) = feed(&mut r, frames);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(done, [("ns/edge01".to_string(), large)]);
        assert_eq!(r.reserved(), 0);

        let too_large = vec![0; MAX_SYNC_MESSAGE + 1];
        assert!(matches!(
            sync_frames("ns/edge01", too_large),
            Err(WireError::MessageTooLarge(n)) if n == MAX_SYNC_MESSAGE + 1
        ));
    }

    #[test]
    fn parts_of_several_documents_interleave_and_each_comes_out_whole() {
        let (a, b) = (message(3 * SYNC_CHUNK + 5, 3), message(2 * SYNC_CHUNK, 4));
        let (mut ca, mut cb) = (chunks("ns/a", &a), chunks("ns/b", &b));
        let mut mixed = Vec::new();
        while !ca.is_empty() || !cb.is_empty() {
            if !ca.is_empty() {
                mixed.push(ca.remove(0));
            }
            if !cb.is_empty() {
                mixed.push(cb.remove(0));
            }
        }
        let mut r = Reassembly::default();
        let (done, errors) = feed(&mut r, mixed);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(done, [("ns/b".to_string(), b), ("ns/a".to_string(), a)]);
        assert_eq!(r.reserved(), 0);
    }

    #[test]
    fn a_refused_message_costs_one_error_and_no_memory_and_others_still_pass() {
        let mut r = Reassembly::default();
        // Claims more than any message may be: refused at its first part, the rest dropped.
        let claim = (MAX_SYNC_MESSAGE + SYNC_CHUNK) as u32;
        let huge: Vec<Frame> = (0..4)
            .map(|i| Frame::SyncChunk {
                doc: "ns/huge".into(),
                total: claim,
                offset: i * SYNC_CHUNK as u32,
                data: vec![0; SYNC_CHUNK],
            })
            .collect();
        let (done, errors) = feed(&mut r, huge);
        assert!(done.is_empty());
        assert_eq!(
            errors,
            [("ns/huge".to_string(), ChunkError::TooLarge(claim as usize))]
        );
        assert_eq!(r.reserved(), 0);

        // A missing part: one error, the rest of that message dropped.
        let mut gap = chunks("ns/gap", &message(4 * SYNC_CHUNK, 5));
        gap.remove(1);
        let (done, errors) = feed(&mut r, gap);
        assert!(done.is_empty());
        assert_eq!(
            errors,
            [(
                "ns/gap".to_string(),
                ChunkError::OutOfPlace {
                    offset: 2 * SYNC_CHUNK as u32,
                    expected: SYNC_CHUNK as u32
                }
            )]
        );
        assert_eq!(r.reserved(), 0);

        // The next message of the same document, and another document's, come through.
        let again = message(2 * SYNC_CHUNK + 1, 6);
        let (done, errors) = feed(&mut r, chunks("ns/gap", &again));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(done, [("ns/gap".to_string(), again)]);
    }

    #[test]
    fn partly_received_messages_are_bounded_in_bytes_and_documents() {
        let mut r = Reassembly::default();
        let first = |doc: &str, total: usize| Frame::SyncChunk {
            doc: doc.into(),
            total: total as u32,
            offset: 0,
            data: vec![1; SYNC_CHUNK],
        };
        // Most of the budget is claimed by one message; a second that does not fit is refused.
        let big = MAX_REASSEMBLY - 8 * SYNC_CHUNK;
        let (_, errors) = feed(&mut r, vec![first("ns/big", big)]);
        assert!(errors.is_empty());
        assert_eq!(r.reserved(), big);
        let (_, errors) = feed(&mut r, vec![first("ns/other", 9 * SYNC_CHUNK)]);
        assert_eq!(
            errors,
            [("ns/other".to_string(), ChunkError::Busy(9 * SYNC_CHUNK))]
        );
        // Small ones fit, up to the number of documents (the big one is one of them).
        let docs: Vec<String> = (0..MAX_PARTIAL_DOCS).map(|i| format!("ns/d{i}")).collect();
        let frames = docs.iter().map(|d| first(d, SYNC_CHUNK + 1)).collect();
        let (_, errors) = feed(&mut r, frames);
        let refused: Vec<&str> = errors.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(refused, [docs[MAX_PARTIAL_DOCS - 1].as_str()]);
        assert!(r.reserved() <= MAX_REASSEMBLY);
        // A new message for a document replaces its unfinished one and frees its bytes.
        let (done, errors) = feed(&mut r, vec![first("ns/big", SYNC_CHUNK)]);
        assert!(errors.is_empty());
        assert_eq!(done.len(), 1);
        assert_eq!(r.reserved(), (MAX_PARTIAL_DOCS - 1) * (SYNC_CHUNK + 1));
    }

    #[test]
    fn chunk_frames_outside_their_message_are_malformed() {
        let frame = Frame::SyncChunk {
            doc: "ns/a".into(),
            total: 10,
            offset: 8,
            data: vec![0; 3],
        };
        let bytes = frame.encode().unwrap();
        assert!(matches!(
            Frame::decode(bytes[1], &bytes[6..]),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn error_text_is_cut_to_what_the_peer_accepts() {
        let frame = Frame::error("é".repeat(3000));
        let Frame::Error { message } = &frame else {
            unreachable!()
        };
        assert!(message.len() <= MAX_ERROR_TEXT && message.ends_with("..."));
        let bytes = frame.encode().unwrap();
        assert_eq!(Frame::decode(bytes[1], &bytes[6..]).unwrap(), frame);
    }
}
