//! EdgeNode ⇄ Automerge document, pure: layout, minimal-diff edits, reading, conflicts.
//!
//! Layout of one document (key `namespace/name`):
//! ```text
//! meta:       { namespace, name, createdAt, labels: {..} }
//! spec:       { pods: { <pod name>: <v1 Pod as JSON> } }
//! deleted:    bool                      tombstone, so a resync never resurrects
//! generation: counter                   +1 per spec edit, merges additively
//! generations: { <writer's actor>: int } a writer's spec edits since the document moved to
//!                                         counts per writer; the generation is the counter
//!                                         plus their sum
//! policy:     { privileged: bool }      written by the head from its policy
//! status:     { observedGeneration, pods: { <name>: { state, reason, cause } } }   written by the edge
//! ```
//! Every document starts with the same deterministic genesis change, so two sides that
//! create it independently (head by `apply`, edge by an offline `apply`) share the
//! top-level maps instead of producing conflicting ones.
//!
//! Why counts per writer: every increment of the counter is a successor of its one
//! operation, and Automerge, rebuilding a change that holds one (to store it, to send it),
//! visits them all, so a spec edit cost more the more edits the document ever had. A writer's
//! count is a plain value it alone overwrites, whatever the history. Concurrent edits still
//! add up (each writer counts its own), and the counter keeps what was counted before. A
//! head moves a document to counts per writer ([`count_per_writer`]) only once every peer
//! that reads it reads them; peers of earlier releases read the counter alone.

use crate::crd::PodState;
use crate::input::DesiredNode;
use crate::key::DocKey;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, AutoCommit, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, Value as AmValue,
    ValueRef,
};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Errors from editing or reading a document.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Automerge refused an operation.
    #[error("document operation failed: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// The document does not have the edgesync layout.
    #[error("document {key} is malformed: {what}")]
    Malformed {
        /// Document key.
        key: String,
        /// What is missing or wrong.
        what: String,
    },
}

/// What a document says, read out as plain values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DocView {
    /// Namespace of the EdgeNode.
    pub namespace: String,
    /// Name of the EdgeNode (the edge node's name).
    pub name: String,
    /// When the object was first created (RFC 3339), if known.
    pub created_at: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Desired pods by name.
    pub pods: BTreeMap<String, Value>,
    /// Deleted (tombstone).
    pub deleted: bool,
    /// Spec generation.
    pub generation: i64,
    /// Pods may break the baseline profile (head policy).
    pub privileged: bool,
    /// Generation the edge last applied.
    pub observed_generation: Option<i64>,
    /// Per-pod state reported by the edge.
    pub pod_states: Vec<PodState>,
    /// Fields where concurrent edits disagreed: `path: kept X, lost Y`.
    pub conflicts: Vec<String>,
}

/// A new document for `key` made of the shared genesis change, continuing as `actor`.
pub fn genesis(key: &str, actor: &ActorId) -> AutoCommit {
    let parsed = DocKey::parse(key).ok();
    let namespace = parsed.as_ref().and_then(DocKey::namespace).unwrap_or("");
    let name = parsed.as_ref().and_then(DocKey::name).unwrap_or(key);
    let mut doc = AutoCommit::new();
    let seed: [u8; 32] = Sha256::digest(format!("edgesync genesis v1 {key}")).into();
    doc.set_actor(ActorId::from(&seed[..16]));
    let build = |doc: &mut AutoCommit| -> Result<(), automerge::AutomergeError> {
        let meta = doc.put_object(ROOT, "meta", ObjType::Map)?;
        doc.put(&meta, "namespace", namespace)?;
        doc.put(&meta, "name", name)?;
        doc.put_object(&meta, "labels", ObjType::Map)?;
        let spec = doc.put_object(ROOT, "spec", ObjType::Map)?;
        doc.put_object(&spec, "pods", ObjType::Map)?;
        doc.put(ROOT, "deleted", false)?;
        doc.put(ROOT, "generation", ScalarValue::counter(0))?;
        let policy = doc.put_object(ROOT, "policy", ObjType::Map)?;
        doc.put(&policy, "privileged", false)?;
        let status = doc.put_object(ROOT, "status", ObjType::Map)?;
        doc.put_object(&status, "pods", ObjType::Map)?;
        Ok(())
    };
    build(&mut doc).expect("genesis operations on a fresh document cannot fail");
    doc.commit_with(CommitOptions::default().with_time(0));
    doc.set_actor(actor.clone());
    doc
}

/// Writes the desired spec as a minimal diff. Returns whether anything changed; a change
/// bumps `generation` and clears the tombstone.
pub fn set_spec(
    doc: &mut AutoCommit,
    desired: &DesiredNode,
    now: &str,
) -> Result<bool, ModelError> {
    doc.commit();
    let meta = map_at(doc, &ROOT, "meta")?;
    if doc.get(&meta, "createdAt")?.is_none() {
        doc.put(&meta, "createdAt", now)?;
    }
    let labels = Value::Object(
        desired
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    );
    reconcile(doc, &meta, "labels".into(), &labels)?;
    let spec = map_at(doc, &ROOT, "spec")?;
    let pods = Value::Object(
        desired
            .pods
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    reconcile(doc, &spec, "pods".into(), &pods)?;
    reconcile(doc, &ROOT, "deleted".into(), &Value::Bool(false))?;
    finish_spec_edit(doc)
}

/// Marks the document deleted and empties its pods. Returns whether anything changed.
pub fn mark_deleted(doc: &mut AutoCommit) -> Result<bool, ModelError> {
    doc.commit();
    let spec = map_at(doc, &ROOT, "spec")?;
    reconcile(doc, &spec, "pods".into(), &Value::Object(Map::new()))?;
    reconcile(doc, &ROOT, "deleted".into(), &Value::Bool(true))?;
    finish_spec_edit(doc)
}

/// Commits a spec edit as one change together with its generation bump; no ops, no change.
/// The bump goes to this writer's count if the document has counts per writer and its
/// counter is above 0 (so that peers reading the counter alone see the EdgeNode created),
/// else to the counter.
fn finish_spec_edit(doc: &mut AutoCommit) -> Result<bool, ModelError> {
    if doc.pending_ops() == 0 {
        return Ok(false);
    }
    match counts_map(doc)? {
        Some(counts) if counter(doc)? > 0 => {
            let me = doc.get_actor().to_hex_string();
            let mine = scalar_int(doc, &counts, &me)?.unwrap_or(0);
            doc.put(&counts, me, mine.saturating_add(1))?;
        }
        _ => doc.increment(ROOT, "generation", 1)?,
    }
    doc.commit();
    Ok(true)
}

/// The map of counts per writer, if the document has one.
fn counts_map(doc: &AutoCommit) -> Result<Option<ObjId>, ModelError> {
    Ok(match doc.get(ROOT, COUNTS)? {
        Some((AmValue::Object(ObjType::Map), id)) => Some(id),
        _ => None,
    })
}

/// Where a document keeps its counts per writer.
const COUNTS: &str = "generations";

/// How many increments a document's counter has before it moves to counts per writer: up to
/// here the increments cost Automerge little (a few µs per edit), while the move is a change
/// more in the document, which cost a head 2 to 3 KiB of memory per idle edge when every
/// EdgeNode of a fleet of 10,000 moved at its creation (2026-12-06, BENCHMARKS.md).
pub const COUNTS_AFTER: i64 = 32;

/// The document's generation counter: all of its generation that peers of earlier releases
/// read.
pub fn counter(doc: &AutoCommit) -> Result<i64, ModelError> {
    Ok(scalar_int(doc, &ROOT, "generation")?.unwrap_or(0))
}

/// Moves document `key` to counts per writer, unless it has them: the map comes in a change
/// every side makes the same (as the genesis change is, after which it comes), so two sides
/// that do it independently share one map. Returns whether it was added. Only for a document
/// every peer reading it reads the counts: one of an earlier release reads the counter
/// alone, which then stops at what it was.
pub fn count_per_writer(doc: &mut AutoCommit, key: &str) -> Result<bool, ModelError> {
    if counts_map(doc)?.is_some() {
        return Ok(false);
    }
    let seed: [u8; 32] = Sha256::digest(format!("edgesync generation counts v1 {key}")).into();
    let mut made = genesis(key, &ActorId::from(&seed[..16]));
    made.put_object(ROOT, COUNTS, ObjType::Map)?;
    made.commit_with(CommitOptions::default().with_time(0));
    let change = made
        .get_last_local_change()
        .expect("a change was just committed");
    doc.apply_changes([change])?;
    Ok(counts_map(doc)?.is_some())
}

/// A document's generation: its counter plus the counts per writer.
fn generation(doc: &AutoCommit) -> Result<i64, ModelError> {
    let counts = counts_map(doc)?.map_or(0, |counts| sum_counts(doc, &counts));
    Ok(counter(doc)?.saturating_add(counts))
}

/// The sum of the counts per writer in map `counts`.
fn sum_counts(doc: &AutoCommit, counts: &ObjId) -> i64 {
    let values = doc
        .map_range(counts, ..)
        .filter_map(|item| match &item.value {
            ValueRef::Scalar(s) => int(s),
            _ => None,
        });
    values.fold(0i64, i64::saturating_add)
}

/// Sets the head's policy flag. Returns whether it changed.
pub fn set_privileged(doc: &mut AutoCommit, privileged: bool) -> Result<bool, ModelError> {
    let policy = map_at(doc, &ROOT, "policy")?;
    let changed = reconcile(doc, &policy, "privileged".into(), &Value::Bool(privileged))?;
    doc.commit();
    Ok(changed)
}

/// Writes the edge's report (observed generation and per-pod state) as a minimal diff.
/// Returns whether anything changed.
pub fn set_status(
    doc: &mut AutoCommit,
    observed_generation: i64,
    pods: &[PodState],
) -> Result<bool, ModelError> {
    write_status(doc, observed_generation, Some(pods))
}

/// Writes an edge's report whose pods' states the status holds already (`known`, read at the
/// document's heads): the observed generation alone, without a walk over the pods' states.
/// Otherwise as [`set_status`]. A concurrent value that a walk would settle is left to the
/// next report that moves a pod: every peer shows the same of the values meanwhile.
/// Returns the status as a read finds it now if this changed the document.
pub fn set_status_known(
    doc: &mut AutoCommit,
    observed_generation: i64,
    pods: &[PodState],
    known: Option<&StatusSide>,
) -> Result<Option<StatusSide>, ModelError> {
    let written = StatusSide::written(observed_generation, pods);
    let changed = match known {
        Some(known) if *known == written => false,
        Some(known) if known.pod_states == written.pod_states => {
            write_status(doc, observed_generation, None)?
        }
        _ => write_status(doc, observed_generation, Some(pods))?,
    };
    Ok(changed.then_some(written))
}

/// Writes the observed generation and, if given, the pods' states (a walk over those held),
/// in one commit. Returns whether anything changed.
fn write_status(
    doc: &mut AutoCommit,
    observed_generation: i64,
    pods: Option<&[PodState]>,
) -> Result<bool, ModelError> {
    let status = map_at(doc, &ROOT, "status")?;
    let mut changed = reconcile(
        doc,
        &status,
        "observedGeneration".into(),
        &Value::from(observed_generation),
    )?;
    if let Some(pods) = pods {
        #[cfg(test)]
        tests::POD_STATE_WRITES.with(|n| n.set(n.get() + 1));
        let pods = Value::Object(
            pods.iter()
                .map(|p| {
                    let mut state = Map::new();
                    state.insert("state".into(), Value::String(p.state.clone()));
                    for (field, value) in [("reason", &p.reason), ("cause", &p.cause)] {
                        if let Some(value) = value {
                            state.insert(field.into(), Value::String(value.clone()));
                        }
                    }
                    (p.name.clone(), Value::Object(state))
                })
                .collect(),
        );
        changed |= reconcile(doc, &status, "pods".into(), &pods)?;
    }
    doc.commit();
    Ok(changed)
}

/// Whether the document holds a live EdgeNode: it was created (generation above 0) and is not
/// deleted. Reads its generation and tombstone, not the whole document.
pub fn is_live(doc: &AutoCommit) -> Result<bool, ModelError> {
    Ok(generation(doc)? > 0 && !scalar_bool(doc, &ROOT, "deleted")?)
}

fn scalar_int(doc: &AutoCommit, obj: &ObjId, prop: &str) -> Result<Option<i64>, ModelError> {
    Ok(match doc.get(obj, prop)? {
        Some((AmValue::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Counter(c) => Some(i64::from(c)),
            ScalarValue::Int(i) => Some(*i),
            _ => None,
        },
        _ => None,
    })
}

fn scalar_bool(doc: &AutoCommit, obj: &ObjId, prop: &str) -> Result<bool, ModelError> {
    Ok(matches!(
        doc.get(obj, prop)?,
        Some((AmValue::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Boolean(true))
    ))
}

/// The spec's side of what an EdgeNode's status is derived from: only a change that moves
/// the spec (an operation on anything but the top-level `status`) moves it, so a look after
/// a status report can take it from the look before ([`read_status_with`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpecSide {
    deleted: bool,
    generation: i64,
    conflicts: Vec<String>,
    pods: Vec<String>,
}

impl SpecSide {
    /// The spec's side of a whole read ([`read`]).
    pub fn of(view: &DocView) -> SpecSide {
        SpecSide {
            deleted: view.deleted,
            generation: view.generation,
            conflicts: view.conflicts.clone(),
            pods: view.pods.keys().cloned().collect(),
        }
    }
}

/// Reads what an EdgeNode's status is derived from: a [`DocView`] whose pods are only named
/// (their specs are `Null`), without labels or creation time. Walks the root, the spec (for
/// its conflicts) and the status, each map once (a lookup of one property costs about as much
/// as a pass over a small map), reading no value of the spec's but its conflicts': for looks
/// at the conditions of many EdgeNodes.
pub fn read_status(doc: &AutoCommit, key: &str) -> Result<DocView, ModelError> {
    read_status_with(doc, key, &mut StatusParts::default())
}

/// The status's side of what an EdgeNode's status is derived from: what its edge last
/// reported. Only that report moves it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatusSide {
    observed_generation: Option<i64>,
    pod_states: Vec<PodState>,
}

impl StatusSide {
    /// The status's side of a whole read ([`read`]).
    pub fn of(view: &DocView) -> StatusSide {
        StatusSide {
            observed_generation: view.observed_generation,
            pod_states: view.pod_states.clone(),
        }
    }

    /// What a status read finds after [`set_status`] wrote this report.
    pub fn written(observed_generation: i64, pods: &[PodState]) -> StatusSide {
        let mut pod_states: Vec<PodState> = pods
            .iter()
            .map(|p| PodState {
                phase: None,
                ..p.clone()
            })
            .collect();
        pod_states.sort_by(|a, b| a.name.cmp(&b.name));
        StatusSide {
            observed_generation: Some(observed_generation),
            pod_states,
        }
    }
}

/// The two sides of a status read, each kept while it holds (see [`read_status_with`]).
#[derive(Debug, Clone, Default)]
pub struct StatusParts {
    /// The spec's side, if known.
    pub spec: Option<SpecSide>,
    /// The status's side, if known.
    pub status: Option<StatusSide>,
    /// The spec is known to hold no concurrent values: a read found none, and only this
    /// node's edits (which leave one value wherever they write) and status changes came
    /// since. Its side is then read without the walk for conflicts.
    pub spec_clean: bool,
}

/// [`read_status`], reading only the sides `parts` does not know yet (the spec's walk for
/// conflicts is most of a read); `parts` then holds both.
pub fn read_status_with(
    doc: &AutoCommit,
    key: &str,
    parts: &mut StatusParts,
) -> Result<DocView, ModelError> {
    let parsed = DocKey::parse(key).map_err(|e| malformed(key, &e.reason))?;
    let (Some(namespace), Some(name)) = (parsed.namespace(), parsed.name()) else {
        return Err(malformed(key, "not an EdgeNode"));
    };
    let status = match &parts.spec {
        Some(_) if parts.status.is_some() => None,
        Some(_) => match doc.get(&ROOT, "status")? {
            Some((AmValue::Object(ObjType::Map), id)) => Some(id),
            _ => None,
        },
        None => {
            let (side, status) = read_spec_side(doc, key, parts.spec_clean)?;
            parts.spec = Some(side);
            status
        }
    };
    if parts.status.is_none() {
        parts.status = Some(read_status_side(doc, status.as_ref()));
    }
    let (Some(spec), Some(status)) = (&parts.spec, &parts.status) else {
        unreachable!("both sides read just above");
    };
    Ok(DocView {
        namespace: namespace.to_string(),
        name: name.to_string(),
        created_at: None,
        labels: BTreeMap::new(),
        pods: spec.pods.iter().map(|p| (p.clone(), Value::Null)).collect(),
        deleted: spec.deleted,
        generation: spec.generation,
        privileged: false,
        observed_generation: status.observed_generation,
        pod_states: status.pod_states.clone(),
        conflicts: spec.conflicts.clone(),
    })
}

/// The status's side of a status read, from the status object if there is one.
fn read_status_side(doc: &AutoCommit, status: Option<&ObjId>) -> StatusSide {
    #[cfg(test)]
    tests::STATUS_READS.with(|n| n.set(n.get() + 1));
    let mut side = StatusSide::default();
    let Some(status) = status else {
        return side;
    };
    let mut states = None;
    for item in doc.map_range(status, ..) {
        match (&*item.key, &item.value) {
            ("pods", ValueRef::Object(ObjType::Map)) => states = Some(item.id()),
            ("observedGeneration", ValueRef::Scalar(s)) => side.observed_generation = int(s),
            _ => {}
        }
    }
    for pod in states.iter().flat_map(|states| doc.map_range(states, ..)) {
        if !matches!(pod.value, ValueRef::Object(ObjType::Map)) {
            continue;
        }
        let mut state = PodState {
            name: pod.key.to_string(),
            ..PodState::default()
        };
        for field in doc.map_range(pod.id(), ..) {
            let ValueRef::Scalar(automerge::ScalarValueRef::Str(text)) = &field.value else {
                continue;
            };
            match &*field.key {
                "state" => state.state = text.to_string(),
                "reason" => state.reason = Some(text.to_string()),
                "cause" => state.cause = Some(text.to_string()),
                _ => {}
            }
        }
        side.pod_states.push(state);
    }
    side
}

/// The spec's side of a status read, and the status object if there is one.
fn read_spec_side(
    doc: &AutoCommit,
    key: &str,
    clean: bool,
) -> Result<(SpecSide, Option<ObjId>), ModelError> {
    let mut side = SpecSide::default();
    let (mut spec, mut status, mut counts, mut counter) = (None, None, None, 0);
    for item in doc.map_range(&ROOT, ..) {
        match (&*item.key, &item.value) {
            ("spec", ValueRef::Object(ObjType::Map)) => spec = Some(item.id()),
            ("status", ValueRef::Object(ObjType::Map)) => status = Some(item.id()),
            ("deleted", ValueRef::Scalar(s)) => side.deleted = is_true(s),
            ("generation", ValueRef::Scalar(s)) => counter = int(s).unwrap_or(0),
            (COUNTS, ValueRef::Object(ObjType::Map)) => counts = Some(item.id()),
            _ => {}
        }
    }
    side.generation = counter.saturating_add(counts.map_or(0, |c| sum_counts(doc, &c)));
    let spec = spec.ok_or_else(|| malformed(key, "spec missing"))?;
    if !clean {
        // The spec's conflicts are found in a pass over all of it, reading no value but theirs.
        #[cfg(test)]
        tests::SPEC_WALKS.with(|n| n.set(n.get() + 1));
        find_conflicts(
            doc,
            &spec,
            ObjType::Map,
            &mut "spec".into(),
            &mut side.conflicts,
        )?;
    }
    if let Some((AmValue::Object(ObjType::Map), pods)) = doc.get(&spec, "pods")? {
        side.pods = doc.keys(&pods).collect();
    }
    Ok((side, status))
}

/// A whole number, as [`scalar_int`] reads one.
fn int(scalar: &automerge::ScalarValueRef<'_>) -> Option<i64> {
    match scalar {
        automerge::ScalarValueRef::Int(i) | automerge::ScalarValueRef::Counter(i) => Some(*i),
        _ => None,
    }
}

/// Whether a scalar is `true`, as [`scalar_bool`] reads one.
fn is_true(scalar: &automerge::ScalarValueRef<'_>) -> bool {
    matches!(scalar, automerge::ScalarValueRef::Boolean(true))
}

/// Reads a document into a [`DocView`], in one pass over its objects.
pub fn read(doc: &AutoCommit, key: &str) -> Result<DocView, ModelError> {
    let mut conflicts = Vec::new();
    let json = read_json(doc, &mut conflicts)?;
    if !json["spec"].is_object() {
        return Err(malformed(key, "spec missing"));
    }
    let meta = &json["meta"];
    let text = |v: &Value| v.as_str().map(str::to_string);
    // Identity comes from the (validated) key, never from fields a peer could rewrite.
    let parsed = DocKey::parse(key).map_err(|e| malformed(key, &e.reason))?;
    let (namespace, name) = match (parsed.namespace(), parsed.name()) {
        (Some(namespace), Some(name)) => (namespace.to_string(), name.to_string()),
        _ => return Err(malformed(key, "not an EdgeNode")),
    };
    let labels = serde_json::from_value(meta["labels"].clone()).unwrap_or_default();
    let pods = json["spec"]["pods"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let status = &json["status"];
    let pod_states = status["pods"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, s)| PodState {
                    name: name.clone(),
                    state: text(&s["state"]).unwrap_or_default(),
                    reason: text(&s["reason"]),
                    cause: text(&s["cause"]),
                    phase: None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(DocView {
        namespace,
        name,
        created_at: text(&meta["createdAt"]),
        labels,
        pods,
        deleted: json["deleted"].as_bool().unwrap_or(false),
        generation: generation(doc)?,
        privileged: json["policy"]["privileged"].as_bool().unwrap_or(false),
        observed_generation: status["observedGeneration"].as_i64(),
        pod_states,
        conflicts,
    })
}

/// The whole document as JSON (as automerge's serde form has it), and a line in `conflicts`
/// for every property under `spec` that holds concurrent values.
fn read_json(doc: &AutoCommit, conflicts: &mut Vec<String>) -> Result<Value, ModelError> {
    let mut root = Map::new();
    for item in doc.map_range(&ROOT, ..) {
        let value = match item.value {
            ValueRef::Object(kind) => {
                let mut path = item.key.to_string();
                let spec = (item.key == "spec").then_some(&mut *conflicts);
                to_json(doc, &item.id(), kind, &mut path, spec)?
            }
            ValueRef::Scalar(scalar) => scalar_json(&scalar),
        };
        root.insert(item.key.into_owned(), value);
    }
    Ok(Value::Object(root))
}

/// Object `obj` (of `kind`) as JSON, one pass over its winning values; with `conflicts`,
/// appends a line for every property under it holding concurrent values (each named from
/// `path`, the object's own, which it leaves as it found it).
fn to_json(
    doc: &AutoCommit,
    obj: &ObjId,
    kind: ObjType,
    path: &mut String,
    mut conflicts: Option<&mut Vec<String>>,
) -> Result<Value, automerge::AutomergeError> {
    let mut child = |prop: Prop, value: ValueRef<'_>, id: ObjId, conflict: bool| {
        let len = enter(doc, obj, prop, conflict, path, conflicts.as_deref_mut())?;
        let value = match value {
            ValueRef::Object(kind) => to_json(doc, &id, kind, path, conflicts.as_deref_mut())?,
            ValueRef::Scalar(scalar) => scalar_json(&scalar),
        };
        path.truncate(len);
        Ok::<_, automerge::AutomergeError>(value)
    };
    Ok(match kind {
        ObjType::Map | ObjType::Table => {
            let mut map = Map::new();
            for item in doc.map_range(obj, ..) {
                let id = object_id(&item.value, || item.id());
                let key = item.key.into_owned();
                let value = child(Prop::Map(key.clone()), item.value, id, item.conflict)?;
                map.insert(key, value);
            }
            Value::Object(map)
        }
        ObjType::List => {
            let mut list = Vec::new();
            for item in doc.list_range(obj, ..) {
                let id = object_id(&item.value, || item.id());
                list.push(child(Prop::Seq(item.index), item.value, id, item.conflict)?);
            }
            Value::Array(list)
        }
        ObjType::Text => Value::String(doc.text(obj)?),
    })
}

/// Appends to `conflicts` a line for every property under `obj` (of `kind`) holding concurrent
/// values, as [`to_json`] does, without reading the values that are not in conflict.
fn find_conflicts(
    doc: &AutoCommit,
    obj: &ObjId,
    kind: ObjType,
    path: &mut String,
    conflicts: &mut Vec<String>,
) -> Result<(), automerge::AutomergeError> {
    let mut child = |prop: Prop, value: ValueRef<'_>, id: ObjId, conflict: bool| {
        let len = enter(doc, obj, prop, conflict, path, Some(&mut *conflicts))?;
        if let ValueRef::Object(kind) = value {
            find_conflicts(doc, &id, kind, path, conflicts)?;
        }
        path.truncate(len);
        Ok::<_, automerge::AutomergeError>(())
    };
    match kind {
        ObjType::Map | ObjType::Table => {
            for item in doc.map_range(obj, ..) {
                let id = object_id(&item.value, || item.id());
                child(
                    Prop::Map(item.key.to_string()),
                    item.value,
                    id,
                    item.conflict,
                )?;
            }
        }
        ObjType::List => {
            for item in doc.list_range(obj, ..) {
                let id = object_id(&item.value, || item.id());
                child(Prop::Seq(item.index), item.value, id, item.conflict)?;
            }
        }
        ObjType::Text => {}
    }
    Ok(())
}

/// With `conflicts`, a step of a walk into property `prop` of `obj`: extends `path` with it and,
/// if it holds concurrent values (`conflict`), appends its line. Returns the length `path` goes
/// back to after the step.
fn enter(
    doc: &AutoCommit,
    obj: &ObjId,
    prop: Prop,
    conflict: bool,
    path: &mut String,
    conflicts: Option<&mut Vec<String>>,
) -> Result<usize, automerge::AutomergeError> {
    use std::fmt::Write;
    let len = path.len();
    if let Some(out) = conflicts {
        let _ = match &prop {
            Prop::Map(key) => write!(path, ".{key}"),
            Prop::Seq(i) => write!(path, "[{i}]"),
        };
        if conflict {
            out.push(conflict_line(doc, obj, prop, path)?);
        }
    }
    Ok(len)
}

/// The id of a value that is an object, made only then: ROOT stands in for a scalar's, which
/// is never used.
fn object_id(value: &ValueRef<'_>, id: impl FnOnce() -> ObjId) -> ObjId {
    match value {
        ValueRef::Object(_) => id(),
        ValueRef::Scalar(_) => ROOT,
    }
}

/// A scalar as JSON, as automerge's serde form has it.
fn scalar_json(scalar: &automerge::ScalarValueRef<'_>) -> Value {
    use automerge::ScalarValueRef as S;
    match scalar {
        S::Str(text) => Value::String(text.to_string()),
        S::Int(i) | S::Counter(i) | S::Timestamp(i) => Value::from(*i),
        S::Uint(u) => Value::from(*u),
        S::F64(f) => Value::from(*f),
        S::Boolean(b) => Value::Bool(*b),
        S::Bytes(bytes) => Value::from(bytes.to_vec()),
        S::Unknown { type_code, bytes } => {
            serde_json::json!({ "type_code": type_code, "bytes": bytes.to_vec() })
        }
        S::Null => Value::Null,
    }
}

fn malformed(key: &str, what: &str) -> ModelError {
    ModelError::Malformed {
        key: key.to_string(),
        what: what.to_string(),
    }
}

fn map_at(doc: &mut AutoCommit, obj: &ObjId, prop: &str) -> Result<ObjId, ModelError> {
    match doc.get(obj, prop)? {
        Some((AmValue::Object(ObjType::Map), id)) => Ok(id),
        _ => Ok(doc.put_object(obj, prop, ObjType::Map)?),
    }
}

/// Makes `obj[prop]` equal to `value` with as few operations as possible: unchanged scalars
/// are not written, maps and lists are edited in place. A field in conflict is rewritten, so
/// applying a value settles the conflict. Returns whether anything was written.
pub fn reconcile(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    value: &Value,
) -> Result<bool, automerge::AutomergeError> {
    // One lookup: the value shown is the last of the conflicting ones.
    let mut values = doc.get_all(obj, prop.clone())?;
    let held = Held {
        conflicted: values.len() > 1,
        current: match values.pop() {
            None => Current::Absent,
            Some((AmValue::Object(ObjType::Map), id)) => Current::Map(id),
            Some((AmValue::Object(ObjType::List), id)) => Current::List(id),
            Some((AmValue::Scalar(s), _)) => Current::Scalar(s.into_owned()),
            Some(_) => Current::Other,
        },
    };
    reconcile_held(doc, obj, prop, held, value)
}

/// [`reconcile`], knowing what `obj[prop]` holds. The properties of a map (the items of a
/// list) it keeps are each found in one pass over it, not looked up one by one.
fn reconcile_held(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    Held {
        current,
        conflicted,
    }: Held,
    value: &Value,
) -> Result<bool, automerge::AutomergeError> {
    match value {
        Value::Object(map) => {
            let (id, mut changed) = match current {
                Current::Map(id) if !conflicted => (id, false),
                _ => (put_object(doc, obj, prop, ObjType::Map)?, true),
            };
            let mut held: BTreeMap<String, Held> = doc
                .map_range(&id, ..)
                .map(|item| {
                    let held = Held::of(&item.value, item.conflict, || item.id());
                    (item.key.into_owned(), held)
                })
                .collect();
            for key in held.keys().filter(|k| !map.contains_key(*k)) {
                doc.delete(&id, key.as_str())?;
                changed = true;
            }
            for (key, child) in map {
                let held = held.remove(key).unwrap_or(Held::ABSENT);
                changed |= reconcile_held(doc, &id, key.as_str().into(), held, child)?;
            }
            Ok(changed)
        }
        Value::Array(items) => {
            let (id, mut changed) = match current {
                Current::List(id) if !conflicted => (id, false),
                _ => (put_object(doc, obj, prop, ObjType::List)?, true),
            };
            let mut held: Vec<Held> = doc
                .list_range(&id, ..)
                .map(|item| Held::of(&item.value, item.conflict, || item.id()))
                .collect();
            for index in (items.len()..held.len()).rev() {
                doc.delete(&id, index)?;
                changed = true;
            }
            held.truncate(items.len());
            let mut held = held.into_iter();
            for (index, item) in items.iter().enumerate() {
                changed |= match held.next() {
                    Some(held) => reconcile_held(doc, &id, index.into(), held, item)?,
                    None => {
                        insert_placeholder(doc, &id, index, item)?;
                        reconcile(doc, &id, index.into(), item)?;
                        true
                    }
                };
            }
            Ok(changed)
        }
        scalar => {
            let new = to_scalar(scalar);
            let same = matches!(&current, Current::Scalar(old) if *old == new);
            if same && !conflicted {
                return Ok(false);
            }
            match prop {
                Prop::Map(key) => doc.put(obj, key, new)?,
                Prop::Seq(index) => doc.put(obj, index, new)?,
            }
            Ok(true)
        }
    }
}

/// Three-way merge of JSON values: where `theirs` did not change `base`, `ours` stands; where
/// `ours` did not, `theirs` does; where both changed a map, keys merge one by one; anything
/// else both changed goes to `theirs`. `None` means absent.
pub fn merge3(base: Option<&Value>, ours: Option<&Value>, theirs: Option<&Value>) -> Option<Value> {
    merge3_noting(base, ours, theirs, "", &mut Vec::new())
}

/// [`merge3`], also noting each place where `ours` lost to `theirs`, in the form of conflict
/// messages: `path: kept X, lost Y`, with paths below `path`.
pub fn merge3_noting(
    base: Option<&Value>,
    ours: Option<&Value>,
    theirs: Option<&Value>,
    path: &str,
    lost: &mut Vec<String>,
) -> Option<Value> {
    if theirs == base {
        return ours.cloned();
    }
    if ours == base || ours == theirs {
        return theirs.cloned();
    }
    match (base, ours, theirs) {
        (None | Some(Value::Object(_)), Some(Value::Object(o)), Some(Value::Object(t))) => {
            let empty = Map::new();
            let b = base.and_then(Value::as_object).unwrap_or(&empty);
            let keys: std::collections::BTreeSet<&String> =
                b.keys().chain(o.keys()).chain(t.keys()).collect();
            let merged = keys
                .into_iter()
                .filter_map(|k| {
                    let below = format!("{path}.{k}");
                    merge3_noting(b.get(k), o.get(k), t.get(k), &below, lost)
                        .map(|v| (k.clone(), v))
                })
                .collect();
            Some(Value::Object(merged))
        }
        _ => {
            let show = |v: Option<&Value>| v.map_or("nothing".to_string(), Value::to_string);
            let at = path.trim_start_matches('.');
            lost.push(format!("{at}: kept {}, lost {}", show(theirs), show(ours)));
            theirs.cloned()
        }
    }
}

/// What a property holds now, detached from the document borrow.
enum Current {
    Absent,
    Map(ObjId),
    List(ObjId),
    Scalar(ScalarValue),
    Other,
}

/// What a property holds: the value shown, and whether concurrent values are under it.
struct Held {
    current: Current,
    conflicted: bool,
}

impl Held {
    const ABSENT: Held = Held {
        current: Current::Absent,
        conflicted: false,
    };

    /// A value met in a pass over a map or a list; `id` names it if it is an object.
    fn of(value: &ValueRef<'_>, conflicted: bool, id: impl FnOnce() -> ObjId) -> Held {
        let current = match value {
            ValueRef::Object(ObjType::Map) => Current::Map(id()),
            ValueRef::Object(ObjType::List) => Current::List(id()),
            ValueRef::Scalar(s) => Current::Scalar(s.clone().into()),
            ValueRef::Object(_) => Current::Other,
        };
        Held {
            current,
            conflicted,
        }
    }
}

fn put_object(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    kind: ObjType,
) -> Result<ObjId, automerge::AutomergeError> {
    match prop {
        Prop::Map(key) => doc.put_object(obj, key, kind),
        Prop::Seq(index) => doc.put_object(obj, index, kind),
    }
}

fn insert_placeholder(
    doc: &mut AutoCommit,
    list: &ObjId,
    index: usize,
    item: &Value,
) -> Result<(), automerge::AutomergeError> {
    match item {
        Value::Object(_) => doc.insert_object(list, index, ObjType::Map).map(drop),
        Value::Array(_) => doc.insert_object(list, index, ObjType::List).map(drop),
        scalar => doc.insert(list, index, to_scalar(scalar)),
    }
}

fn to_scalar(value: &Value) -> ScalarValue {
    match value {
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => ScalarValue::Int(i),
            (None, Some(u), _) => ScalarValue::Uint(u),
            (_, _, f) => ScalarValue::F64(f.unwrap_or_default()),
        },
        Value::String(s) => ScalarValue::Str(s.as_str().into()),
        _ => ScalarValue::Null,
    }
}

/// The line telling that property `prop` of `obj` (at `path`) holds concurrent values.
fn conflict_line(
    doc: &AutoCommit,
    obj: &ObjId,
    prop: Prop,
    path: &str,
) -> Result<String, automerge::AutomergeError> {
    let all = doc.get_all(obj, prop.clone())?;
    let kept = doc
        .get(obj, prop)?
        .map(|(v, _)| describe(&v))
        .unwrap_or_default();
    let lost: Vec<String> = all
        .iter()
        .map(|(v, _)| describe(v))
        .filter(|v| *v != kept)
        .collect();
    Ok(format!("{path}: kept {kept}, lost {}", lost.join(", ")))
}

fn describe(value: &AmValue<'_>) -> String {
    match value {
        AmValue::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => format!("{:?}", s.as_str()),
            other => other.to_string(),
        },
        AmValue::Object(kind) => format!("another {kind}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Walks of a spec for its conflicts in a status read (a `#[tokio::test]` runs its tasks
        /// on its thread).
        pub(crate) static SPEC_WALKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Reads of a status object for a status read.
        pub(crate) static STATUS_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Reports written with a walk over the pods' states.
        pub(crate) static POD_STATE_WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    use crate::input::{Rules, parse_edgenodes};
    use automerge::sync::{self, SyncDoc};

    fn desired(image: &str) -> DesiredNode {
        let text = include_str!("../example/edge01.yaml")
            .replace("image: nginx", &format!("image: {image}"));
        parse_edgenodes(&text, &Rules::new("default"))
            .unwrap()
            .remove(0)
    }

    fn merge(a: &mut AutoCommit, b: &mut AutoCommit) {
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        loop {
            let ab = a.sync().generate_sync_message(&mut sa);
            if let Some(m) = ab.clone() {
                b.sync().receive_sync_message(&mut sb, m).unwrap();
            }
            let ba = b.sync().generate_sync_message(&mut sb);
            if let Some(m) = ba.clone() {
                a.sync().receive_sync_message(&mut sa, m).unwrap();
            }
            if ab.is_none() && ba.is_none() {
                break;
            }
        }
    }

    /// The status read agrees with the whole read on all that a status is derived from.
    fn status_read_agrees(doc: &AutoCommit, key: &str) {
        let (full, part) = (read(doc, key).unwrap(), read_status(doc, key).unwrap());
        assert!(part.pods.keys().eq(full.pods.keys()));
        assert!(part.pods.values().all(Value::is_null));
        let status = |v: DocView| {
            let identity = (v.namespace, v.name);
            (
                identity,
                v.deleted,
                v.generation,
                v.observed_generation,
                v.pod_states,
                v.conflicts,
            )
        };
        assert_eq!(status(part), status(full));
    }

    #[test]
    fn spec_round_trips_and_reapply_is_a_no_op() {
        let mut doc = genesis("default/edge01", &ActorId::random());
        assert!(!is_live(&doc).unwrap(), "genesis is not an EdgeNode yet");
        assert!(set_spec(&mut doc, &desired("nginx"), "2026-01-01T00:00:00Z").unwrap());
        assert!(is_live(&doc).unwrap());
        let heads = doc.get_heads();
        assert!(!set_spec(&mut doc, &desired("nginx"), "later").unwrap());
        assert_eq!(doc.get_heads(), heads);
        let view = read(&doc, "default/edge01").unwrap();
        assert_eq!(view.pods, desired("nginx").pods);
        assert_eq!(view.generation, 1);
        assert_eq!(view.created_at.as_deref(), Some("2026-01-01T00:00:00Z"));
    }

    #[test]
    fn one_field_change_is_a_small_change() {
        let mut doc = genesis("default/edge01", &ActorId::random());
        set_spec(&mut doc, &desired("nginx"), "t").unwrap();
        doc.save();
        set_spec(&mut doc, &desired("nginx:1.27"), "t").unwrap();
        let change = doc.get_last_local_change().unwrap().clone();
        assert_eq!(
            change.len(),
            2,
            "one put for the image, one generation increment"
        );
        let bytes = doc.save_incremental();
        assert!(
            bytes.len() < 300,
            "one-field edit took {} bytes",
            bytes.len()
        );
    }

    #[test]
    fn independent_genesis_and_concurrent_edits_merge() {
        let mut head = genesis("default/edge01", &ActorId::random());
        let mut edge = genesis("default/edge01", &ActorId::random());
        set_spec(&mut head, &desired("nginx"), "t").unwrap();
        merge(&mut head, &mut edge);
        let mut with_redis = desired("nginx");
        let redis = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "redis"},
            "spec": {"containers": [{"name": "redis", "image": "redis"}]}});
        with_redis.pods.insert("redis".into(), redis);
        set_spec(&mut edge, &with_redis, "t").unwrap();
        set_spec(&mut head, &desired("nginx:1.27"), "t").unwrap();
        merge(&mut head, &mut edge);
        let (h, e) = (
            read(&head, "default/edge01").unwrap(),
            read(&edge, "default/edge01").unwrap(),
        );
        assert_eq!(h, e);
        assert_eq!(
            h.pods["nginx"]["spec"]["containers"][0]["image"],
            "nginx:1.27"
        );
        assert!(h.pods.contains_key("redis"));
        assert_eq!(h.generation, 3, "concurrent generation bumps add up");
        assert!(h.conflicts.is_empty(), "{:?}", h.conflicts);
    }

    /// The operations of `doc`'s last change, as (action, key) in its encoding.
    fn last_ops(doc: &mut AutoCommit) -> Vec<String> {
        let change = doc.get_last_local_change().unwrap();
        let ops = change.decode().operations;
        ops.iter()
            .map(|op| format!("{:?} {:?}", op.action, op.key))
            .collect()
    }

    #[test]
    fn counts_per_writer_keep_the_generation_and_bump_a_plain_value() {
        let key = "default/edge01";
        let mut head = genesis(key, &ActorId::random());
        set_spec(&mut head, &desired("nginx"), "t").unwrap();
        set_spec(&mut head, &desired("nginx:2"), "t").unwrap();
        assert!(
            last_ops(&mut head)
                .iter()
                .any(|op| op.contains("Increment"))
        );
        let mut edge = genesis(key, &ActorId::random());
        merge(&mut head, &mut edge);
        // Both sides move to counts per writer on their own, and share one map.
        assert!(count_per_writer(&mut head, key).unwrap());
        assert!(!count_per_writer(&mut head, key).unwrap(), "once");
        assert!(count_per_writer(&mut edge, key).unwrap());
        assert_eq!(head.get_heads(), edge.get_heads(), "the same change");
        assert_eq!(
            read(&head, key).unwrap().generation,
            2,
            "nothing counted anew"
        );
        set_spec(&mut head, &desired("nginx:3"), "t").unwrap();
        let ops = last_ops(&mut head);
        assert!(
            ops.iter().all(|op| !op.contains("Increment")),
            "a plain value, not an increment: {ops:?}"
        );
        assert_eq!(read(&head, key).unwrap().generation, 3);
        assert_eq!(
            scalar_int(&head, &ROOT, "generation").unwrap(),
            Some(2),
            "the counter, all that peers of earlier releases read, stays"
        );
        // Concurrent edits add up: two writers' counts, and an increment of the counter by a
        // peer that does not know them.
        let mut old = genesis(key, &ActorId::random());
        merge(&mut head, &mut old);
        merge(&mut head, &mut edge);
        set_spec(&mut head, &desired("nginx:4"), "t").unwrap();
        set_spec(&mut edge, &desired("nginx:edge"), "t").unwrap();
        old.increment(ROOT, "generation", 1).unwrap();
        old.commit();
        merge(&mut head, &mut edge);
        merge(&mut head, &mut old);
        merge(&mut head, &mut edge);
        for doc in [&head, &edge] {
            assert_eq!(read(doc, key).unwrap().generation, 6);
            status_read_agrees(doc, key);
        }
        assert_eq!(generation(&head).unwrap(), 6);
    }

    #[test]
    fn an_edgenode_created_with_counts_per_writer_is_live_for_older_peers() {
        let key = "default/edge01";
        let mut head = genesis(key, &ActorId::random());
        assert!(count_per_writer(&mut head, key).unwrap());
        assert!(!is_live(&head).unwrap());
        set_spec(&mut head, &desired("nginx"), "t").unwrap();
        // Its first bump goes to the counter, which an older peer reads.
        assert_eq!(scalar_int(&head, &ROOT, "generation").unwrap(), Some(1));
        set_spec(&mut head, &desired("nginx:2"), "t").unwrap();
        assert_eq!(scalar_int(&head, &ROOT, "generation").unwrap(), Some(1));
        let view = read(&head, key).unwrap();
        assert_eq!(view.generation, 2);
        assert!(is_live(&head).unwrap());
        mark_deleted(&mut head).unwrap();
        assert_eq!(read(&head, key).unwrap().generation, 3);
        assert!(!is_live(&head).unwrap());
    }

    #[test]
    fn same_field_conflict_is_reported_and_settled_by_reapply() {
        let mut head = genesis("default/edge01", &ActorId::random());
        let mut edge = genesis("default/edge01", &ActorId::random());
        set_spec(&mut head, &desired("nginx"), "t").unwrap();
        merge(&mut head, &mut edge);
        set_spec(&mut head, &desired("nginx:head"), "t").unwrap();
        set_spec(&mut edge, &desired("nginx:edge"), "t").unwrap();
        merge(&mut head, &mut edge);
        let view = read(&head, "default/edge01").unwrap();
        assert_eq!(view.conflicts.len(), 1, "{:?}", view.conflicts);
        status_read_agrees(&head, "default/edge01");
        let conflict = &view.conflicts[0];
        assert!(
            conflict.starts_with("spec.pods.nginx.spec.containers[0].image: kept"),
            "{conflict}"
        );
        assert!(
            conflict.contains("nginx:head") && conflict.contains("nginx:edge"),
            "{conflict}"
        );
        set_spec(&mut head, &desired("nginx:final"), "t").unwrap();
        merge(&mut head, &mut edge);
        assert!(read(&edge, "default/edge01").unwrap().conflicts.is_empty());
    }

    #[test]
    fn a_read_sees_every_kind_of_value_as_automerge_shows_it() {
        let mut doc = genesis("default/edge01", &ActorId::random());
        set_spec(&mut doc, &desired("nginx"), "t").unwrap();
        let (_, spec) = doc.get(ROOT, "spec").unwrap().unwrap();
        let odd = doc.put_object(&spec, "odd", ObjType::Map).unwrap();
        let values = [
            ScalarValue::Bytes(vec![1, 2]),
            ScalarValue::Uint(u64::MAX),
            ScalarValue::F64(1.5),
            ScalarValue::F64(f64::NAN),
            ScalarValue::counter(3),
            ScalarValue::Timestamp(-4),
            ScalarValue::Null,
            ScalarValue::Unknown {
                type_code: 20,
                bytes: vec![9],
            },
        ];
        for (i, value) in values.into_iter().enumerate() {
            doc.put(&odd, format!("v{i}"), value).unwrap();
        }
        let text = doc.put_object(&odd, "text", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, "hello").unwrap();
        let list = doc.put_object(&odd, "list", ObjType::List).unwrap();
        doc.insert(&list, 0, true).unwrap();
        doc.insert_object(&list, 1, ObjType::Map).unwrap();
        doc.commit();
        // And a conflict, in a list.
        let mut other = doc.fork().with_actor(ActorId::random());
        doc.put(&list, 0, "ours").unwrap();
        other.put(&list, 0, "theirs").unwrap();
        doc.merge(&mut other).unwrap();
        let mut conflicts = Vec::new();
        let json = read_json(&doc, &mut conflicts).unwrap();
        let serde = serde_json::to_value(automerge::AutoSerde::from(&doc)).unwrap();
        assert_eq!(json, serde);
        assert_eq!(json["spec"]["odd"]["text"], "hello");
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(
            conflicts[0].starts_with("spec.odd.list[0]: kept"),
            "{conflicts:?}"
        );
        assert_eq!(read(&doc, "default/edge01").unwrap().conflicts, conflicts);
        status_read_agrees(&doc, "default/edge01");
    }

    #[test]
    fn three_way_merge_keeps_both_sides_edits() {
        let j = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let base = j(r#"{"web": {"image": "a", "port": 1}, "db": {"image": "r"}}"#);
        let ours = j(
            r#"{"web": {"image": "a", "port": 2}, "db": {"image": "r"}, "cache": {"image": "m"}}"#,
        );
        let theirs = j(r#"{"web": {"image": "b", "port": 1}}"#);
        let merged = merge3(Some(&base), Some(&ours), Some(&theirs)).unwrap();
        assert_eq!(
            merged,
            j(r#"{"web": {"image": "b", "port": 2}, "cache": {"image": "m"}}"#)
        );
        assert_eq!(
            merge3(Some(&base), Some(&base), Some(&theirs)),
            Some(theirs.clone())
        );
        assert_eq!(merge3(None, Some(&ours), Some(&ours)), Some(ours.clone()));
        let mut lost = Vec::new();
        let noted = merge3_noting(Some(&j("1")), Some(&j("2")), Some(&j("3")), "a", &mut lost);
        assert_eq!(
            (noted, lost),
            (Some(j("3")), vec!["a: kept 3, lost 2".to_string()])
        );
        let both = merge3(Some(&j("1")), Some(&j("2")), Some(&j("3")));
        assert_eq!(both, Some(j("3")), "a true conflict goes to theirs");
    }

    #[test]
    fn delete_is_a_tombstone_and_status_is_stored() {
        let mut doc = genesis("team-a/edge01", &ActorId::random());
        set_spec(&mut doc, &desired("nginx"), "t").unwrap();
        let states = [
            PodState {
                name: "db".into(),
                state: "NotWritten".into(),
                reason: Some("writing it failed: no space left".into()),
                cause: Some("DiskFull".into()),
                phase: None,
            },
            PodState {
                name: "nginx".into(),
                state: "Applied".into(),
                ..PodState::default()
            },
        ];
        assert!(set_status(&mut doc, 1, &states).unwrap());
        assert!(!set_status(&mut doc, 1, &states).unwrap());
        assert_eq!(
            read_status(&doc, "team-a/edge01").unwrap().pod_states,
            states
        );
        status_read_agrees(&doc, "team-a/edge01");
        assert!(mark_deleted(&mut doc).unwrap());
        status_read_agrees(&doc, "team-a/edge01");
        assert!(!is_live(&doc).unwrap());
        let view = read(&doc, "team-a/edge01").unwrap();
        assert!(view.deleted && view.pods.is_empty());
        assert_eq!(view.namespace, "team-a");
        assert_eq!(view.observed_generation, Some(1));
        assert_eq!(view.pod_states, states);
    }
}
