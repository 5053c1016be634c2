//! A stored change as the document store announces it: which document, what it moved, and
//! where it came from.

use crate::registry;
use automerge::{AutoCommit, ChangeHash, Prop};

/// What a stored change moved in its document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// What the EdgeNode asks for: its spec, labels, deletion, generation or policy.
    pub spec: bool,
    /// What an edge reported.
    pub status: bool,
    /// A head-only document.
    pub internal: bool,
}

impl Moved {
    pub(crate) const SPEC: Moved = Moved {
        spec: true,
        status: false,
        internal: false,
    };
    pub(crate) const STATUS: Moved = Moved {
        spec: false,
        status: true,
        internal: false,
    };
    pub(crate) const INTERNAL: Moved = Moved {
        spec: false,
        status: false,
        internal: true,
    };
}

/// Where a change came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Made on this node (an apply, a delete, a status report, a registry edit).
    Local,
    /// Received from the peer of this name.
    Peer(String),
}

/// A change to one document, announced once it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The document.
    pub key: String,
    /// What it moved.
    pub moved: Moved,
    /// Where it came from.
    pub origin: Origin,
}

/// What the changes between `before` and `after` moved in document `key`.
pub(super) fn moved(
    key: &str,
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    after: &[ChangeHash],
) -> Moved {
    if registry::is_internal(key) {
        return Moved::INTERNAL;
    }
    let mut moved = Moved::default();
    for patch in doc.diff(before, after) {
        use automerge::PatchAction::*;
        let top = match (patch.path.first(), &patch.action) {
            (Some((_, prop)), _) => Some(prop.clone()),
            (None, PutMap { key, .. } | DeleteMap { key }) => Some(Prop::Map(key.clone())),
            (None, Increment { prop, .. } | Conflict { prop }) => Some(prop.clone()),
            (None, _) => None,
        };
        match top {
            Some(Prop::Map(name)) if name == "status" => moved.status = true,
            _ => moved.spec = true,
        }
    }
    moved
}
