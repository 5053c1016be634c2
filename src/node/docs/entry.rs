//! One document in memory and the bookkeeping of its storage: what is stored, what a write
//! stages, and how much history it may hold.

use crate::clock::now;
use crate::input::InvalidInput;
use crate::model;
use crate::node::NodeError;
use crate::registry;
use crate::store::{COMPACT_AFTER_CHUNKS, DocSave, DocWrite, StoredDoc};
use automerge::{ActorId, AutoCommit};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::Notify;

/// Counts the documents a node loads, and wakes a head's saving away (`Docs::unload_forever`)
/// each time a quarter of `at_most` more were loaded.
pub(super) struct Loads {
    /// How many EdgeNode documents a head keeps loaded at most.
    pub(super) at_most: usize,
    count: AtomicUsize,
    pub(super) wake: Notify,
}

impl Loads {
    pub(super) fn new(at_most: usize) -> Arc<Loads> {
        Arc::new(Loads {
            at_most,
            count: AtomicUsize::new(0),
            wake: Notify::new(),
        })
    }

    fn one(&self) {
        let every = (self.at_most / 4).max(1);
        if (self.count.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(every) {
            self.wake.notify_one();
        }
    }
}

/// One document and what the node knows about it.
pub struct DocEntry {
    doc: Resident,
    /// When a peer last synced it.
    pub last_synced_at: Option<String>,
    /// Incremental chunks stored since the last snapshot.
    pub(super) chunks: usize,
    /// Heads as of the last successful store write.
    pub(super) persisted_heads: Vec<automerge::ChangeHash>,
    /// Bytes stored for it: the snapshot and the chunks since.
    pub(super) stored_bytes: usize,
    /// When it was last lent out.
    used: Instant,
    loads: Arc<Loads>,
    /// Its spec is known to hold no concurrent values (see [`model::StatusParts`]); kept
    /// while it is saved away, so that the look after an apply that loads it skips the walk.
    spec_clean: bool,
}

/// The sides of a status read known at the document's `heads`.
struct StatusRead {
    heads: Vec<automerge::ChangeHash>,
    parts: model::StatusParts,
}

/// A document in memory: loaded, to be read, edited and synced, or saved while nothing uses
/// it: its compact encoding, some forty times smaller than the loaded document.
enum Resident {
    /// Boxed: a document is 4 KiB before it holds anything. With it what is known of its
    /// status read at its heads ([`DocEntry::status_view`]).
    Loaded(Box<AutoCommit>, Option<Box<StatusRead>>),
    Saved {
        bytes: Vec<u8>,
        actor: ActorId,
    },
}

impl DocEntry {
    fn new(doc: AutoCommit, loads: &Arc<Loads>) -> DocEntry {
        loads.one();
        DocEntry {
            doc: Resident::Loaded(Box::new(doc), None),
            last_synced_at: None,
            chunks: COMPACT_AFTER_CHUNKS,
            persisted_heads: Vec::new(),
            stored_bytes: 0,
            used: Instant::now(),
            loads: loads.clone(),
            spec_clean: false,
        }
    }

    /// A document as stored: snapshot plus chunks, continuing as `actor`.
    pub(super) fn load(
        stored: StoredDoc,
        actor: &ActorId,
        loads: &Arc<Loads>,
    ) -> Result<DocEntry, NodeError> {
        let bad = |e: automerge::AutomergeError| NodeError::Sync {
            key: stored.key.clone(),
            reason: format!("stored document does not load: {e}"),
        };
        let mut doc = AutoCommit::load(&stored.snapshot).map_err(bad)?;
        for chunk in &stored.chunks {
            doc.load_incremental(chunk).map_err(bad)?;
        }
        doc.set_actor(actor.clone());
        Ok(DocEntry {
            persisted_heads: doc.get_heads(),
            last_synced_at: stored.last_synced_at,
            chunks: stored.chunks.len(),
            stored_bytes: stored.snapshot.len() + stored.chunks.iter().map(Vec::len).sum::<usize>(),
            ..DocEntry::new(doc, loads)
        })
    }

    /// A new document from the shared genesis change (not stored yet).
    pub(super) fn genesis(key: &str, actor: &ActorId, loads: &Arc<Loads>) -> DocEntry {
        let doc = match key == registry::KEY {
            true => registry::genesis(actor),
            false => model::genesis(key, actor),
        };
        DocEntry::new(doc, loads)
    }

    /// The Automerge document, loaded if it was saved away.
    pub fn doc(&mut self) -> &mut AutoCommit {
        self.used = Instant::now();
        if let Resident::Saved { bytes, actor } = &self.doc {
            let mut doc = decode(bytes);
            doc.set_actor(actor.clone());
            self.doc = Resident::Loaded(Box::new(doc), None);
            self.loads.one();
        }
        match &mut self.doc {
            Resident::Loaded(doc, _) => doc,
            Resident::Saved { .. } => unreachable!("loaded just above"),
        }
    }

    /// Reads the document with `f`. One saved away is loaded for this read only and stays
    /// saved: a look at every EdgeNode (a presence storm, a list) must not load them all.
    pub fn read<R>(&mut self, f: impl FnOnce(&AutoCommit) -> R) -> R {
        match &self.doc {
            Resident::Loaded(doc, _) => {
                self.used = Instant::now();
                f(doc)
            }
            Resident::Saved { bytes, .. } => f(&decode(bytes)),
        }
    }

    /// The document's heads, without loading it.
    pub fn heads(&mut self) -> Vec<automerge::ChangeHash> {
        match &mut self.doc {
            Resident::Loaded(doc, _) => doc.get_heads(),
            Resident::Saved { .. } => self.persisted_heads.clone(),
        }
    }

    /// What the document's status is derived from ([`model::read_status`]). A loaded one
    /// keeps what it knows of the read: the spec's side while the spec does not move, the
    /// status's while it does not, or as this node wrote it (see [`DocEntry::status_moved`]);
    /// so the look after an edge's report reads the status alone, or on the edge, nothing.
    pub fn status_view(&mut self, key: &str) -> Result<model::DocView, model::ModelError> {
        let mut unknown = model::StatusParts {
            spec_clean: self.spec_clean,
            ..Default::default()
        };
        let Resident::Loaded(doc, kept) = &mut self.doc else {
            let view = self.read(|doc| model::read_status_with(doc, key, &mut unknown))?;
            self.spec_clean = view.conflicts.is_empty();
            return Ok(view);
        };
        self.used = Instant::now();
        let heads = doc.get_heads();
        let mut parts = kept
            .take()
            .filter(|k| k.heads == heads)
            .map_or(unknown, |k| k.parts);
        let view = model::read_status_with(doc, key, &mut parts)?;
        *kept = Some(Box::new(StatusRead { heads, parts }));
        self.spec_clean = view.conflicts.is_empty();
        Ok(view)
    }

    /// Keeps what `view`, a whole read of the document at `heads`, says its status read is.
    pub fn keep_read(&mut self, heads: &[automerge::ChangeHash], view: &model::DocView) {
        self.spec_clean = view.conflicts.is_empty();
        if let Resident::Loaded(_, kept) = &mut self.doc {
            let parts = model::StatusParts {
                spec: Some(model::SpecSide::of(view)),
                status: Some(model::StatusSide::of(view)),
                spec_clean: self.spec_clean,
            };
            let heads = heads.to_vec();
            *kept = Some(Box::new(StatusRead { heads, parts }));
        }
    }

    /// The document went from heads `before` to `after` by changes that moved its status
    /// alone: the spec's side of the status read known at `before` holds at `after` too, and
    /// the status's is `written` if this node wrote it.
    pub(super) fn status_moved(
        &mut self,
        before: &[automerge::ChangeHash],
        after: &[automerge::ChangeHash],
        written: Option<model::StatusSide>,
    ) {
        if let Resident::Loaded(_, Some(kept)) = &mut self.doc
            && kept.heads == before
        {
            kept.heads = after.to_vec();
            kept.parts.status = written;
        }
    }

    /// The status's side of the read kept at `heads`, if it is known there.
    pub(super) fn known_status(
        &self,
        heads: &[automerge::ChangeHash],
    ) -> Option<&model::StatusSide> {
        match &self.doc {
            Resident::Loaded(_, Some(kept)) if kept.heads == heads => kept.parts.status.as_ref(),
            _ => None,
        }
    }

    /// A peer's change moved the spec: it may hold concurrent values now.
    pub(super) fn spec_moved(&mut self) {
        self.spec_clean = false;
    }

    /// When it was last lent out, if it is loaded.
    pub(super) fn loaded_since(&self) -> Option<Instant> {
        matches!(self.doc, Resident::Loaded(..)).then_some(self.used)
    }

    /// Saves the document away, if it is loaded and all of it is stored (an edit not stored
    /// yet stays in memory); returns whether it did.
    pub(super) fn unload(&mut self) -> bool {
        let Resident::Loaded(doc, kept) = &mut self.doc else {
            return false;
        };
        if doc.get_heads() != self.persisted_heads {
            return false;
        }
        // Freed first, so that the saved bytes can take its place in memory.
        *kept = None;
        let actor = doc.get_actor().clone();
        self.doc = Resident::Saved {
            bytes: doc.save(),
            actor,
        };
        true
    }
}

/// A document saved away, loaded again.
fn decode(bytes: &[u8]) -> AutoCommit {
    AutoCommit::load(bytes).expect("a document this node encoded itself decodes again")
}

/// A document write on its way to the store, and what the entry becomes once it is stored.
pub(super) struct Staged {
    pub(super) heads: Vec<automerge::ChangeHash>,
    pub(super) chunks: usize,
    pub(super) stored_bytes: usize,
    pub(super) synced_at: Option<String>,
    pub(super) changed: bool,
}

/// Prepares the write of what changed in `entry` since its last save (None if nothing is to
/// be stored): a chunk (`chunk`, if the caller has the changes' bytes already), or a whole
/// snapshot after enough chunks.
pub(super) fn stage(
    key: &str,
    entry: &mut DocEntry,
    sync_states: Vec<(String, Vec<u8>)>,
    synced: bool,
    chunk: Option<Vec<u8>>,
) -> Option<(DocSave, Staged)> {
    let heads = entry.heads();
    let changed = heads != entry.persisted_heads;
    let synced_at = synced.then(now);
    if !changed && sync_states.is_empty() && synced_at.is_none() {
        return None;
    }
    let (write, chunks, stored_bytes) = if !changed {
        // Only sync states or the sync time: the document needs no write (nor loading).
        (
            DocWrite::Chunk(Vec::new()),
            entry.chunks,
            entry.stored_bytes,
        )
    } else if entry.chunks >= COMPACT_AFTER_CHUNKS {
        let snapshot = entry.doc().save();
        let bytes = snapshot.len();
        (DocWrite::Snapshot(snapshot), 0, bytes)
    } else {
        // What changed since the last write; not `save_incremental`, whose cursor starts
        // empty in a document just loaded, so that its first call encoded the whole history
        // again (up to a tenth of a head's CPU in a fan-out that loads documents saved away).
        let since = entry.persisted_heads.clone();
        let chunk = chunk.unwrap_or_else(|| entry.doc().save_after(&since));
        let stored = entry.chunks + usize::from(!chunk.is_empty());
        let bytes = entry.stored_bytes + chunk.len();
        (DocWrite::Chunk(chunk), stored, bytes)
    };
    let save = DocSave {
        key: key.to_string(),
        write,
        sync_states,
        synced_at: synced_at.clone(),
    };
    let staged = Staged {
        heads,
        chunks,
        stored_bytes,
        synced_at,
        changed,
    };
    Some((save, staged))
}

/// Refuses an edit that gives a document more than `limit` bytes of history
/// ([`crate::input::MAX_HISTORY_BYTES`], what one sync message carries): an edge that has
/// none of it must be able to receive it whole. Documents that store little are let through
/// without counting.
pub(super) fn check_history(
    key: &str,
    entry: &mut DocEntry,
    limit: usize,
) -> Result<(), NodeError> {
    const COUNT_FROM: usize = 1 << 20;
    if entry.stored_bytes < COUNT_FROM {
        return Ok(());
    }
    let changes = entry.doc().get_changes(&[]);
    let history: usize = changes.iter().map(|c| c.raw_bytes().len()).sum();
    if history <= limit {
        return Ok(());
    }
    Err(InvalidInput {
        object: format!("EdgeNode {key}"),
        field: "spec".into(),
        reason: format!(
            "this edit would bring its history to {} MiB, more than the {} MiB an edge receives at once; apply it under another name or namespace",
            history >> 20,
            limit >> 20
        ),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_past_the_history_an_edge_can_receive_is_refused() {
        use automerge::{ROOT, transaction::Transactable};
        let actor = ActorId::random();
        let mut entry = DocEntry::genesis("default/e1", &actor, &Loads::new(1));
        // Three changes of 600 KiB that do not compress (an xorshift stream as hex).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3 {
            let text: String = (0..600 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from_digit((x % 16) as u32, 16).unwrap()
                })
                .collect();
            entry.doc().put(ROOT, "blob", text).unwrap();
            entry.doc().commit();
        }
        // A document that stores little is not counted.
        assert!(check_history("default/e1", &mut entry, 1 << 20).is_ok());
        entry.stored_bytes = 2 << 20;
        assert!(check_history("default/e1", &mut entry, 8 << 20).is_ok());
        let refused = check_history("default/e1", &mut entry, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("EdgeNode default/e1")
                && refused.contains("spec")
                && refused.contains("more than the 1 MiB an edge receives at once"),
            "{refused}"
        );
    }
}
