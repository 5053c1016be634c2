//! The fuzz targets' bodies, as plain functions of bytes: libFuzzer drives them from
//! `fuzz_targets/`, and the integration tests replay the committed corpus through them. Each
//! asserts what must hold for any input, beyond not crashing.

use edgesync::input::{self, MAX_PODS, Rules};
use edgesync::sync::wire::{self, Frame, MAX_FIRST_FRAME, MAX_FRAME};
use edgesync::transport::tls::{self, Ca, JoinToken, Role};
use serde_json::Value;
use std::future::Future;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Longest message a refused input may produce, in characters.
const MAX_MESSAGE: usize = 1024;

/// Runs a future that never waits (it reads from a byte slice) to its end.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("reading from a byte slice never waits"),
    }
}

/// The wire decoder: `data` as a payload of any kind, and as a stream of frames read as a
/// connection's first frame and as a session's frames, whose sync message parts go through the
/// session's reassembly, and as a compact sync message. Every decoded frame encodes back to bytes that decode to the same
/// frame; reassembly stays within its budget and yields only whole messages.
pub fn wire_frame(data: &[u8]) {
    if let Some((&kind, payload)) = data.split_first()
        && let Ok(frame) = Frame::decode(kind, payload)
    {
        round_trip(&frame);
    }
    // The compact sync message inside a frame: read with every count and length checked.
    let _ = edgesync::sync::compact::decode(data);
    for limit in [MAX_FIRST_FRAME, MAX_FRAME] {
        let mut stream = data;
        let mut reassembly = wire::Reassembly::default();
        while let Ok(Some(frame)) = now(wire::read_frame(&mut stream, limit)) {
            round_trip(&frame);
            if let Frame::SyncChunk {
                doc,
                total,
                offset,
                data,
            } = frame
                && let Ok(Some(message)) = reassembly.push(&doc, total, offset, data)
            {
                assert_eq!(message.len(), total as usize, "a whole message");
            }
            assert!(reassembly.reserved() <= wire::MAX_REASSEMBLY);
        }
    }
    // A message split into frames comes back whole, in one frame or in parts.
    let doc = "default/edge01";
    let frames = wire::sync_frames(doc, data.to_vec()).expect("a small message is sent");
    let mut reassembly = wire::Reassembly::default();
    let mut whole = None;
    for bytes in frames {
        match now(wire::read_frame(&mut &bytes[..], MAX_FRAME)) {
            Ok(Some(Frame::Sync { message, .. })) => whole = Some(message),
            Ok(Some(Frame::SyncChunk {
                total,
                offset,
                data,
                ..
            })) => {
                whole = reassembly
                    .push(doc, total, offset, data)
                    .expect("parts in order")
            }
            other => panic!("not a sync frame: {other:?}"),
        }
    }
    assert_eq!(whole.as_deref(), Some(data));
}

fn round_trip(frame: &Frame) {
    let bytes = frame.encode().expect("a decoded frame encodes");
    let mut stream = &bytes[..];
    let again = now(wire::read_frame(&mut stream, MAX_FRAME))
        .expect("an encoded frame decodes")
        .expect("an encoded frame is not the end of the stream");
    assert_eq!(&again, frame);
    assert!(stream.is_empty(), "the encoding is read whole");
}

/// The EdgeNode parser, on `data` as apply's text and (when it is JSON) as the object the
/// Kubernetes bridge hands over. A refusal is one short line; what is accepted is within the
/// limits, and its pods are already normal (normalising them again changes nothing).
pub fn edgenode_input(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let rules = Rules::new("default");
    match input::parse_edgenodes(text, &rules) {
        Ok(nodes) => nodes.iter().for_each(check_node),
        Err(e) => check_message(&e.to_string()),
    }
    if let Ok(object) = serde_json::from_str::<Value>(text) {
        match input::parse_edgenode(&object, "EdgeNode fuzz", &rules) {
            Ok(node) => check_node(&node),
            Err(e) => check_message(&e.to_string()),
        }
    }
}

fn check_node(node: &input::DesiredNode) {
    assert!(node.pods.len() <= MAX_PODS);
    for (name, pod) in &node.pods {
        input::check_manifest_name(&node.namespace, name).expect("manifest name fits");
        let (again, normal) =
            input::normalise_pod(pod, &node.name, false).expect("a normal pod stays valid");
        assert_eq!(&again, name);
        assert_eq!(&normal, pod, "normalising is idempotent");
    }
}

fn check_message(message: &str) {
    assert!(
        !message.chars().any(char::is_control),
        "one line, nothing a terminal would act on: {message:?}"
    );
    let chars = message.chars().count();
    assert!(chars <= MAX_MESSAGE, "{chars} characters");
}

/// The head's handling of a connection's first frame, up to where it needs its store: the
/// bounded read, the token secret's hash, the node name check, and signing the certificate
/// request with a CA (a certificate it signs names the requested edge). Also the join token
/// text an edge is given.
pub fn join_request(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(token) = JoinToken::parse(text)
    {
        assert_eq!(JoinToken::parse(&token.to_string()).ok(), Some(token));
    }
    let mut stream = data;
    let Ok(Some(frame)) = now(wire::read_frame(&mut stream, MAX_FIRST_FRAME)) else {
        return;
    };
    match frame {
        Frame::JoinRequest {
            node,
            token_id,
            secret,
            csr,
            advertise,
        } => {
            let token = JoinToken {
                ca_hash: String::new(),
                id: token_id,
                secret,
            };
            assert_eq!(token.secret_hash().len(), 32);
            let _ = advertise.parse::<std::net::IpAddr>();
            if input::check_subdomain(&node).is_ok() {
                sign(&csr, &node);
            }
        }
        Frame::Renew { csr } => sign(&csr, "edge01"),
        Frame::Hello {
            advertise, version, ..
        } => {
            let _ = advertise.parse::<std::net::IpAddr>();
            assert!(version.len() <= edgesync::sync::wire::MAX_VERSION);
        }
        _ => {}
    }
}

fn sign(csr: &[u8], node: &str) {
    static CA: OnceLock<Ca> = OnceLock::new();
    let ca = CA.get_or_init(|| Ca::generate().expect("a CA is made"));
    if let Ok(pem) = ca.sign_edge(csr, node, Duration::from_secs(3600)) {
        let cert = tls::pem_to_der(&pem).expect("a signed certificate is PEM");
        let identity = tls::identity(&cert).expect("a signed certificate has an identity");
        assert_eq!(identity.name, node);
        assert_eq!(identity.role, Role::Edge);
    }
}
