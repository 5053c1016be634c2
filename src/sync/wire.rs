//! Versioned, length-prefixed frames on a QUIC stream: encode, decode, size limits.
//!
//! A frame is `version u8 | kind u8 | length u32 (big endian) | payload`. Payload fields are
//! `u32` length-prefixed byte strings. Every length is checked before anything is allocated.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Wire format version this build speaks.
pub const VERSION: u8 = 1;
/// Largest frame accepted or sent (payload bytes).
pub const MAX_FRAME: usize = 8 << 20;
const MAX_DOC_KEY: usize = 64 + 253 + 1;

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
    },
    /// An Automerge sync message for one document.
    Sync {
        /// Document key `namespace/name`.
        doc: String,
        /// Encoded `automerge::sync::Message`.
        message: Vec<u8>,
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
        }
    }

    /// Encodes the frame, header included.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut payload = Vec::new();
        let mut put = |field: &[u8]| {
            payload.extend_from_slice(&(field.len() as u32).to_be_bytes());
            payload.extend_from_slice(field);
        };
        match self {
            Frame::Hello { name, advertise } => {
                put(name.as_bytes());
                put(advertise.as_bytes());
            }
            Frame::Sync { doc, message } => {
                put(doc.as_bytes());
                put(message);
            }
            Frame::JoinRequest {
                node,
                token_id,
                secret,
                csr,
                advertise,
            } => {
                for field in [
                    node.as_bytes(),
                    token_id.as_bytes(),
                    secret.as_bytes(),
                    csr,
                    advertise.as_bytes(),
                ] {
                    put(field);
                }
            }
            Frame::JoinAccepted { cert_pem, ca_pem } => {
                put(cert_pem.as_bytes());
                put(ca_pem.as_bytes());
            }
            Frame::Error { message } => put(message.as_bytes()),
            Frame::Renew { csr } => put(csr),
            Frame::Summary { entries } => {
                for (key, digest) in entries {
                    put(key.as_bytes());
                    put(digest);
                }
            }
        }
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

    /// Decodes a payload of the given kind.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame, WireError> {
        let mut fields = Fields(payload);
        let frame = match kind {
            1 => Frame::Hello {
                name: fields.text(253)?,
                advertise: fields.text(64)?,
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
                message: fields.text(4096)?,
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

    fn text(&mut self, limit: usize) -> Result<String, WireError> {
        String::from_utf8(self.bytes(limit)?).map_err(|_| WireError::Malformed("text is not UTF-8"))
    }
}

/// Largest first frame of a connection (a join, renewal or hello), read before the peer has
/// proven anything.
pub const MAX_FIRST_FRAME: usize = 64 << 10;

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
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                name: "edge01".into(),
                advertise: "2001:db8::1".into(),
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
            let unknown_kind = [VERSION, 77, 0, 0, 0, 0];
            assert!(matches!(
                read_frame(&mut &unknown_kind[..], MAX_FRAME).await,
                Err(WireError::Malformed(_))
            ));
            for frame in all_frames() {
                let bytes = frame.encode().unwrap();
                let truncated = &bytes[..bytes.len() - 1];
                assert!(read_frame(&mut &truncated[..], MAX_FRAME).await.is_err());
            }
        })
        .await;
    }
}
