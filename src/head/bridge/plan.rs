//! What one reconcile of an EdgeNode does, decided purely: from the resource's pods, the
//! document's and the base both last agreed on, what goes into the document, what goes into
//! the resource, and what the synced-heads annotation needs.

use crate::model::merge3_noting;
use serde::Deserialize;
use serde_json::Value;

/// How many synced heads the annotation keeps: an edge that missed fewer edits than this
/// still finds a common base.
pub const SYNCED_HEADS_KEPT: usize = 8;

/// What a reconcile knows about one EdgeNode. Pods are maps keyed by pod name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inputs {
    /// The resource's pods: what the user last wrote.
    pub theirs: Value,
    /// The pods the resource and the document last agreed on; None when this head knows none
    /// (a resource it never merged, and no history to find one in).
    #[serde(default)]
    pub base: Option<Value>,
    /// The document's pods; None when it has none (never made here, or deleted on an edge).
    #[serde(default)]
    pub ours: Option<Value>,
    /// Whether the resource's newest synced-heads entry is a document version whose pods equal
    /// the resource's.
    #[serde(default)]
    pub annotated: bool,
}

/// What to write.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Plan {
    /// Pods to write into the document, when they differ from the document's.
    #[serde(default)]
    pub document: Option<Value>,
    /// Pods to write to the resource, when they differ from the resource's (an edit made on
    /// an edge, merged with the user's).
    #[serde(default)]
    pub resource: Option<Value>,
    /// The document was deleted on an edge and the resource is unchanged since: delete it.
    #[serde(default)]
    pub delete: bool,
    /// The resource's pods are the new base once the document holds them.
    #[serde(default)]
    pub base: Option<Value>,
    /// Record the document's version in the resource's synced-heads annotation: the two agree
    /// and the annotation does not say so yet.
    #[serde(default)]
    pub annotate: bool,
    /// The user changed the resource since the base: conflicts shown so far have been seen.
    #[serde(default)]
    pub user_changed: bool,
    /// Edits from the document that lost to the user's: `path: kept X, lost Y`.
    #[serde(default)]
    pub lost: Vec<String>,
}

/// The three-way merge of the resource (theirs) and the document (ours) over their base:
/// what each side changed is kept; where both changed the same field, the user's edit wins and
/// the document's is noted as lost.
pub fn plan(inputs: &Inputs) -> Plan {
    let theirs = &inputs.theirs;
    let user_changed = inputs.base.as_ref() != Some(theirs);
    let mut lost = Vec::new();
    let merged = merge3_noting(
        inputs.base.as_ref(),
        inputs.ours.as_ref(),
        Some(theirs),
        "spec.pods",
        &mut lost,
    );
    let Some(merged) = merged else {
        return Plan {
            delete: true,
            ..Plan::default()
        };
    };
    Plan {
        document: (inputs.ours.as_ref() != Some(&merged)).then(|| merged.clone()),
        annotate: merged == *theirs && !inputs.annotated,
        resource: (merged != *theirs).then_some(merged),
        base: user_changed.then(|| theirs.clone()),
        user_changed,
        lost,
        delete: false,
    }
}

/// `list` with `heads` as its newest entry, at most [`SYNCED_HEADS_KEPT`] long; None when
/// `heads` is the newest entry already.
pub fn with_synced(
    list: &[Vec<String>],
    heads: &[automerge::ChangeHash],
) -> Option<Vec<Vec<String>>> {
    let entry: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
    if entry.is_empty() || list.last() == Some(&entry) {
        return None;
    }
    let mut list = list.to_vec();
    list.push(entry);
    let excess = list.len().saturating_sub(SYNCED_HEADS_KEPT);
    list.drain(..excess);
    Some(list)
}

/// The hashes of one synced-heads entry; None if any does not parse.
pub fn parse_heads(entry: &[String]) -> Option<Vec<automerge::ChangeHash>> {
    entry.iter().map(|h| h.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each fixture: a name, what the reconcile knows, and the plan it must make.
    const FIXTURES: &str = r#"
- name: a new resource goes into a new document
  inputs:
    theirs: {web: {name: web, image: nginx:1}}
  plan:
    document: {web: {name: web, image: nginx:1}}
    base: {web: {name: web, image: nginx:1}}
    userChanged: true
    annotate: true

- name: nothing changed on either side writes nothing
  inputs:
    theirs: {web: {name: web, image: nginx:1}}
    base: {web: {name: web, image: nginx:1}}
    ours: {web: {name: web, image: nginx:1}}
    annotated: true
  plan: {}

- name: agreement not yet in the annotation is recorded
  inputs:
    theirs: {web: {name: web, image: nginx:1}}
    base: {web: {name: web, image: nginx:1}}
    ours: {web: {name: web, image: nginx:1}}
  plan:
    annotate: true

- name: a user edit goes into the document
  inputs:
    theirs: {web: {name: web, image: nginx:2}}
    base: {web: {name: web, image: nginx:1}}
    ours: {web: {name: web, image: nginx:1}}
  plan:
    document: {web: {name: web, image: nginx:2}}
    base: {web: {name: web, image: nginx:2}}
    userChanged: true
    annotate: true

- name: an edge edit is written back to the resource
  inputs:
    theirs: {web: {name: web, image: nginx:1}}
    base: {web: {name: web, image: nginx:1}}
    ours: {web: {name: web, image: nginx:3}}
    annotated: true
  plan:
    resource: {web: {name: web, image: nginx:3}}

- name: edits to different pods on both sides are both kept
  inputs:
    theirs: {web: {name: web, image: nginx:2}, db: {name: db, image: pg:1}}
    base: {web: {name: web, image: nginx:1}, db: {name: db, image: pg:1}}
    ours: {web: {name: web, image: nginx:1}, db: {name: db, image: pg:2}}
  plan:
    document: {web: {name: web, image: nginx:2}, db: {name: db, image: pg:2}}
    resource: {web: {name: web, image: nginx:2}, db: {name: db, image: pg:2}}
    base: {web: {name: web, image: nginx:2}, db: {name: db, image: pg:1}}
    userChanged: true

- name: the same field edited on both sides keeps the user's and notes the edge's as lost
  inputs:
    theirs: {web: {name: web, image: nginx:2}}
    base: {web: {name: web, image: nginx:1}}
    ours: {web: {name: web, image: nginx:3}}
  plan:
    document: {web: {name: web, image: nginx:2}}
    base: {web: {name: web, image: nginx:2}}
    userChanged: true
    annotate: true
    lost: ['spec.pods.web.image: kept "nginx:2", lost "nginx:3"']

- name: a pod added on an edge while the user removed another is merged
  inputs:
    theirs: {}
    base: {web: {name: web, image: nginx:1}}
    ours: {web: {name: web, image: nginx:1}, cache: {name: cache, image: redis:7}}
  plan:
    document: {cache: {name: cache, image: redis:7}}
    resource: {cache: {name: cache, image: redis:7}}
    base: {}
    userChanged: true

- name: a document deleted on an edge deletes the unchanged resource
  inputs:
    theirs: {web: {name: web, image: nginx:1}}
    base: {web: {name: web, image: nginx:1}}
  plan:
    delete: true

- name: a user edit made while an edge deleted the document brings it back
  inputs:
    theirs: {web: {name: web, image: nginx:2}}
    base: {web: {name: web, image: nginx:1}}
  plan:
    document: {web: {name: web, image: nginx:2}}
    base: {web: {name: web, image: nginx:2}}
    userChanged: true
    annotate: true
    lost: ['spec.pods: kept {"web":{"image":"nginx:2","name":"web"}}, lost nothing']

- name: with no base (history never came), the resource wins where they differ
  inputs:
    theirs: {web: {name: web, image: nginx:1}}
    ours: {web: {name: web, image: nginx:3}, cache: {name: cache, image: redis:7}}
  plan:
    document: {web: {name: web, image: nginx:1}, cache: {name: cache, image: redis:7}}
    resource: {web: {name: web, image: nginx:1}, cache: {name: cache, image: redis:7}}
    base: {web: {name: web, image: nginx:1}}
    userChanged: true
    lost: ['spec.pods.web.image: kept "nginx:1", lost "nginx:3"']
"#;

    #[derive(Deserialize)]
    struct Fixture {
        name: String,
        inputs: Inputs,
        plan: Plan,
    }

    #[test]
    fn plans_match_the_fixtures() {
        let fixtures: Vec<Fixture> = serde_saphyr::from_str(FIXTURES).unwrap();
        assert_eq!(fixtures.len(), 11);
        for fixture in fixtures {
            assert_eq!(plan(&fixture.inputs), fixture.plan, "{}", fixture.name);
        }
    }

    fn hash(byte: u8) -> automerge::ChangeHash {
        automerge::ChangeHash([byte; 32])
    }

    #[test]
    fn synced_heads_keep_the_newest_entries_and_skip_a_repeat() {
        let mut list: Vec<Vec<String>> = Vec::new();
        for byte in 0..10u8 {
            list = with_synced(&list, &[hash(byte), hash(byte + 100)]).unwrap();
        }
        assert_eq!(list.len(), SYNCED_HEADS_KEPT);
        let newest = parse_heads(list.last().unwrap()).unwrap();
        assert_eq!(newest, [hash(9), hash(109)]);
        assert_eq!(parse_heads(&list[0]).unwrap()[0], hash(2));
        assert!(with_synced(&list, &[hash(9), hash(109)]).is_none());
        assert!(with_synced(&list, &[]).is_none());
        assert!(parse_heads(&["not a hash".to_string()]).is_none());
    }
}
