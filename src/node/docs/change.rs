//! A stored change as the document store announces it: which document, what it moved, and
//! where it came from.

use crate::registry;
use automerge::{AutoCommit, Prop, ReadDoc};
use std::collections::HashMap;

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

/// What `changes`, new in document `key`, moved, read from their operations: an operation
/// under the top-level `status` moves the status, any other the spec. (A diff of the document
/// between the two points costs as much as its whole history.)
pub(super) fn moved(key: &str, doc: &mut AutoCommit, changes: &[automerge::Change]) -> Moved {
    use automerge::legacy::{Key, ObjectId};
    if registry::is_internal(key) {
        return Moved::INTERNAL;
    }
    let mut moved = Moved::default();
    // Whether an object is under `status`, per object the changes touch.
    let mut under_status: HashMap<String, bool> = HashMap::new();
    for change in changes {
        for op in change.decode().operations {
            let status = match &op.obj {
                ObjectId::Root => matches!(&op.key, Key::Map(k) if k == "status"),
                ObjectId::Id(id) => *under_status
                    .entry(id.to_string())
                    .or_insert_with_key(|id| top_key(doc, id).as_deref() == Some("status")),
            };
            match status {
                true => moved.status = true,
                false => moved.spec = true,
            }
            if moved.spec && moved.status {
                return moved;
            }
        }
    }
    moved
}

/// The top-level key object `id` (as `counter@actor`) sits under, if it can be found.
fn top_key(doc: &AutoCommit, id: &str) -> Option<String> {
    let obj = doc.import_obj(id).ok()?;
    match doc.parents(obj).ok()?.last()?.prop {
        Prop::Map(name) => Some(name),
        Prop::Seq(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{ObjType, ROOT, transaction::Transactable};

    #[test]
    fn what_a_change_moved_is_read_from_the_objects_its_operations_touch() {
        let mut doc = AutoCommit::new();
        let spec = doc.put_object(ROOT, "spec", ObjType::Map).unwrap();
        let pods = doc.put_object(&spec, "pods", ObjType::Map).unwrap();
        let status = doc.put_object(ROOT, "status", ObjType::Map).unwrap();
        let reported = doc.put_object(&status, "pods", ObjType::List).unwrap();
        doc.commit();
        let key = "default/edge01";
        let edit = |doc: &mut AutoCommit, f: &dyn Fn(&mut AutoCommit)| {
            let before = doc.get_heads();
            f(doc);
            doc.commit();
            let changes = doc.get_changes(&before);
            moved(key, doc, &changes)
        };
        let deep_status = |d: &mut AutoCommit| {
            let entry = d.insert_object(&reported, 0, ObjType::Map).unwrap();
            d.put(&entry, "state", "Applied").unwrap();
        };
        assert_eq!(edit(&mut doc, &deep_status), Moved::STATUS);
        let deep_spec = |d: &mut AutoCommit| d.put(&pods, "web", "nginx").unwrap();
        assert_eq!(edit(&mut doc, &deep_spec), Moved::SPEC);
        let top = |d: &mut AutoCommit| d.put(ROOT, "generation", 2).unwrap();
        assert_eq!(edit(&mut doc, &top), Moved::SPEC);
        let both = |d: &mut AutoCommit| {
            d.put(&status, "observedGeneration", 2).unwrap();
            d.put(&pods, "web", "nginx:2").unwrap();
        };
        let moved_both = edit(&mut doc, &both);
        assert!(moved_both.spec && moved_both.status, "{moved_both:?}");
        let all = doc.get_changes(&[]);
        assert_eq!(moved(crate::registry::KEY, &mut doc, &all), Moved::INTERNAL);
    }
}
