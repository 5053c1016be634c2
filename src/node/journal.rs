//! The recent events of the EdgeNodes this node serves, as `describe` shows them: what
//! [`notices`] tells of their conditions, kept in memory in a bounded ring (a restart starts
//! it afresh; with a cluster the Kubernetes Events are the lasting record).

use super::status::{Notice, notices};
use super::{Node, lock};
use crate::crd::Condition;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Events kept, over all EdgeNodes; the oldest go first.
const KEPT: usize = 1000;
/// The least time between two looks at what changed, so bursts cost one pass.
const PASS_INTERVAL: Duration = Duration::from_secs(1);

/// One event, as `describe` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine {
    /// When it last happened (RFC 3339).
    pub time: String,
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub type_: String,
    /// One CamelCase word.
    pub reason: String,
    /// What it is about: `EdgeNode namespace/name` or `Edge name`.
    pub object: String,
    /// What happened.
    pub message: String,
    /// How many times in a row.
    pub count: u32,
}

/// The object an EdgeNode's events are about.
pub fn edgenode_object(key: &str) -> String {
    format!("EdgeNode {key}")
}

/// The recent events; cheap to share.
#[derive(Default)]
pub struct Journal {
    lines: Mutex<VecDeque<EventLine>>,
}

impl Journal {
    /// Records what `notices` told of EdgeNode `key`; one that repeats the last line of the
    /// same object counts again instead.
    pub fn record(&self, key: &str, told: &[Notice]) {
        let object = edgenode_object(key);
        let now = crate::clock::now();
        let mut lines = lock(&self.lines);
        for notice in told {
            let last = lines.iter_mut().rev().find(|l| l.object == object);
            match last {
                Some(l)
                    if (&l.type_, &l.reason, &l.message)
                        == (&notice.type_, &notice.reason, &notice.message) =>
                {
                    l.count += 1;
                    l.time = now.clone();
                }
                _ => {
                    if lines.len() == KEPT {
                        lines.pop_front();
                    }
                    lines.push_back(EventLine {
                        time: now.clone(),
                        type_: notice.type_.clone(),
                        reason: notice.reason.clone(),
                        object: object.clone(),
                        message: notice.message.clone(),
                        count: 1,
                    });
                }
            }
        }
    }

    /// The events whose object `wanted` picks, oldest first.
    pub fn lines(&self, wanted: impl Fn(&str) -> bool) -> Vec<EventLine> {
        let lines = lock(&self.lines);
        lines
            .iter()
            .filter(|l| wanted(&l.object))
            .cloned()
            .collect()
    }
}

/// Keeps the journal of a node no cluster bridge tells: looks at each EdgeNode whose
/// document or presence changed, at most once per [`PASS_INTERVAL`], and records what its
/// conditions tell. The look at start only learns the conditions; an EdgeNode made later is
/// told against none, so trouble it starts with is told. The changed keys come coalesced:
/// however far behind this falls, it owes one look per EdgeNode that changed, never a look at
/// every one.
pub async fn follow(node: Node, shutdown: CancellationToken) {
    let changes = node.docs().watch_all();
    let mut seen: HashMap<String, Vec<Condition>> = HashMap::new();
    let mut registry = node.docs().registry().await;
    let mut keys: BTreeSet<String> = node.docs().keys().into_iter().collect();
    let mut start = true;
    loop {
        let pass = tokio::time::Instant::now();
        for key in keys.iter().filter(|k| !crate::key::is_internal(k)) {
            #[cfg(test)]
            tests::LOOKS.with(|n| n.set(n.get() + 1));
            let mut conditions = match node.conditions_or_deleting(key).await {
                Ok(Some(conditions)) => conditions,
                Ok(None) => {
                    seen.remove(key);
                    continue;
                }
                Err(_) => continue,
            };
            if !start {
                let before = seen.get(key).map_or(&[][..], Vec::as_slice);
                node.journal().record(key, &notices(before, &conditions));
            }
            // Kept for every EdgeNode: without the transition times notices never look at.
            for c in &mut conditions {
                c.last_transition_time = None;
            }
            seen.insert(key.clone(), conditions);
        }
        start = false;
        keys = tokio::select! {
            _ = shutdown.cancelled() => return,
            keys = changes.next_after(pass + PASS_INTERVAL, super::feed::SETTLE) => keys,
        };
        node.docs().add_moved_edges(&mut keys, &mut registry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// EdgeNodes the journal looked at (a `#[tokio::test]` runs its tasks on its thread).
        pub(super) static LOOKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn edgenodes(range: std::ops::Range<usize>, image: &str) -> String {
        let one = |i| {
            format!(
                "---\napiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: edge{i}\nspec:\n  pods:\n    - apiVersion: v1\n      kind: Pod\n      metadata:\n        name: web\n      spec:\n        containers:\n          - name: main\n            image: {image}\n"
            )
        };
        range.map(one).collect()
    }

    #[tokio::test]
    async fn a_burst_of_changes_is_looked_at_once_per_changed_edgenode_never_every_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let rules = crate::input::Rules::new("default");
        let node = Node::open(crate::transport::tls::Role::Head, "head", store, rules)
            .await
            .unwrap();
        let apply = |count: usize, image: &'static str| {
            let node = node.clone();
            async move {
                // An apply takes at most 500 documents.
                for first in (0..count).step_by(500) {
                    let text = edgenodes(first..count.min(first + 500), image);
                    node.docs().apply_text(&text, "default").await.unwrap();
                }
            }
        };
        apply(1500, "nginx:1").await;
        let shutdown = CancellationToken::new();
        tokio::spawn(follow(node.clone(), shutdown.clone()));
        let looks = || LOOKS.with(|n| n.get());
        while looks() < 1500 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // More changes at once than the broadcast of changes holds: a journal that read them
        // from it fell behind and looked at all 1,500 EdgeNodes again.
        LOOKS.with(|n| n.set(0));
        apply(1100, "nginx:2").await;
        tokio::time::sleep(PASS_INTERVAL * 3).await;
        assert_eq!(looks(), 1100);
        shutdown.cancel();
    }

    fn notice(reason: &str) -> Notice {
        Notice {
            type_: "Warning".into(),
            reason: reason.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn a_repeat_counts_and_the_ring_is_bounded() {
        let journal = Journal::default();
        journal.record("default/edge01", &[notice("EdgeOffline")]);
        journal.record("default/edge02", &[notice("EdgeOffline")]);
        journal.record("default/edge01", &[notice("EdgeOffline")]);
        let mine = journal.lines(|o| o == "EdgeNode default/edge01");
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].count, 2);
        for i in 0..KEPT + 10 {
            journal.record(&format!("default/e{i}"), &[notice("PodRefused")]);
        }
        assert_eq!(journal.lines(|_| true).len(), KEPT);
        assert!(journal.lines(|o| o == "EdgeNode default/edge01").is_empty());
    }
}
