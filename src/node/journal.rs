//! The recent events of the EdgeNodes this node serves, as `describe` shows them: what
//! [`notices`] tells of their conditions, kept in memory in a bounded ring (a restart starts
//! it afresh; with a cluster the Kubernetes Events are the lasting record).

use super::looks::Follower;
use super::status::{Notice, notices};
use super::{Look, Node, lock};
use crate::crd::Condition;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Events kept, over all EdgeNodes; the oldest go first.
const KEPT: usize = 1000;

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

/// Keeps the journal of a node no cluster bridge tells, from the passes over the EdgeNodes
/// that changed ([`super::looks`]): records what each one's conditions tell. The first pass,
/// at start, only learns the conditions; an EdgeNode made later is told against none, so
/// trouble it starts with is told.
#[derive(Default)]
pub struct Recorder {
    /// Each EdgeNode's conditions when last looked at, without the transition times notices
    /// never look at.
    seen: HashMap<String, Vec<Condition>>,
    /// Whether a pass was over.
    passed: bool,
}

impl Follower for Recorder {
    fn saw(&mut self, node: &Node, key: &str, look: Option<&Look>) {
        let Some(look) = look else {
            self.seen.remove(key);
            return;
        };
        let mut conditions = node.conditions(key, look);
        if self.passed {
            let before = self.seen.get(key).map_or(&[][..], Vec::as_slice);
            node.journal().record(key, &notices(before, &conditions));
        }
        for c in &mut conditions {
            c.last_transition_time = None;
        }
        self.seen.insert(key.to_string(), conditions);
    }

    fn passed(&mut self, _node: &Node) {
        self.passed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
