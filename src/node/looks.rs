//! Passes over the EdgeNodes that changed: each is read once per pass for everything that
//! follows them (the journal, a head's refused-pods count), at most once per
//! [`PASS_INTERVAL`] and once changes pause (see [`super::feed::Feed::next_after`]), so that
//! a burst such as a fan-out is looked at after it, once per EdgeNode.

use super::{Look, Node};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The least time between two passes, so bursts cost one look per EdgeNode.
const PASS_INTERVAL: Duration = Duration::from_secs(1);

/// What follows the EdgeNodes' changes, told of each look.
pub trait Follower: Send {
    /// EdgeNode `key` as it is now; None once it is gone (deleted and let go by its edge).
    /// The first pass, at start, tells every EdgeNode.
    fn saw(&mut self, node: &Node, key: &str, look: Option<&Look>);

    /// A pass is over.
    fn passed(&mut self, _node: &Node) {}
}

/// Looks at each EdgeNode whose document or presence changed and tells `followers`; the
/// first pass looks at every one. The changed keys come coalesced: however far behind this
/// falls, it owes one look per EdgeNode that changed, never a look at every one. An EdgeNode
/// that cannot be read is told next time it changes.
pub async fn follow(
    node: Node,
    mut followers: Vec<Box<dyn Follower>>,
    shutdown: CancellationToken,
) {
    let changes = node.docs().watch_all();
    let mut registry = node.docs().registry().await;
    let mut keys: BTreeSet<String> = node.docs().keys().into_iter().collect();
    loop {
        let pass = tokio::time::Instant::now();
        for key in keys.iter().filter(|k| !crate::key::is_internal(k)) {
            #[cfg(test)]
            tests::LOOKS.with(|n| n.set(n.get() + 1));
            let Ok(look) = node.look(key).await else {
                continue;
            };
            for follower in &mut followers {
                follower.saw(&node, key, look.as_ref());
            }
        }
        for follower in &mut followers {
            follower.passed(&node);
        }
        keys = tokio::select! {
            _ = shutdown.cancelled() => return,
            keys = changes.next_after(pass + PASS_INTERVAL, super::feed::SETTLE) => keys,
        };
        node.docs().add_moved_edges(&mut keys, &mut registry).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// EdgeNodes looked at (a `#[tokio::test]` runs its tasks on its thread).
        pub(crate) static LOOKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn edgenodes(range: std::ops::Range<usize>, image: &str) -> String {
        let one = |i| {
            format!(
                "---\napiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: edge{i}\nspec:\n  pods:\n    - apiVersion: v1\n      kind: Pod\n      metadata:\n        name: web\n      spec:\n        containers:\n          - name: main\n            image: {image}\n"
            )
        };
        range.map(one).collect()
    }

    /// Counts what it is told.
    struct Told(std::sync::Arc<std::sync::Mutex<usize>>);

    impl Follower for Told {
        fn saw(&mut self, _: &Node, _: &str, _: Option<&Look>) {
            *self.0.lock().unwrap() += 1;
        }
    }

    #[tokio::test]
    async fn a_burst_of_changes_is_looked_at_once_per_changed_edgenode_for_every_follower() {
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
        let told = [(); 2].map(|_| std::sync::Arc::new(std::sync::Mutex::new(0)));
        let followers = told
            .iter()
            .map(|t| Box::new(Told(t.clone())) as Box<dyn Follower>)
            .collect();
        tokio::spawn(follow(node.clone(), followers, shutdown.clone()));
        let looks = || LOOKS.with(|n| n.get());
        while looks() < 1500 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // More changes at once than the broadcast of changes holds: a pass that read them
        // from it fell behind and looked at all 1,500 EdgeNodes again.
        LOOKS.with(|n| n.set(0));
        apply(1100, "nginx:2").await;
        tokio::time::sleep(PASS_INTERVAL * 3).await;
        assert_eq!(looks(), 1100);
        // Each follower was told of each look: one read for both.
        for t in &told {
            assert_eq!(*t.lock().unwrap(), 2600);
        }
        shutdown.cancel();
    }
}
