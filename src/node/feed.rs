//! Change notices for sync sessions. A session hears only of the documents its peer may see,
//! so a change to one edge's document wakes one session, not every session on the head; and
//! changes that pile up while a session is busy are one notice per document.

use super::lock;
use crate::transport::tls::{Identity, Role};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Notify;

/// How long changes must pause before a paced look ([`Feed::next_after`]) takes them: what
/// follows a change at once (on an edge, its report right after a spec; on a head, the
/// edges' reports after an apply) is seen in the same look.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// How long a paced look waits at most for changes to pause.
pub const SETTLE_AT_MOST: std::time::Duration = std::time::Duration::from_secs(2);

/// Names (of documents, or of peers) changed since the one watcher last looked, each once.
#[derive(Default)]
pub struct Feed {
    keys: Mutex<BTreeSet<String>>,
    /// Changes noted so far, for a paced look to tell whether a burst paused.
    added: AtomicU64,
    wake: Notify,
}

impl Feed {
    /// Waits for changes and takes them all, each key once.
    /// Cancel-safe: keys not yet taken stay for the next call.
    pub async fn next(&self) -> BTreeSet<String> {
        self.changed().await;
        std::mem::take(&mut *lock(&self.keys))
    }

    /// Waits until a change is here, taking nothing (the one watcher takes it next).
    async fn changed(&self) {
        while lock(&self.keys).is_empty() {
            self.wake.notified().await;
        }
    }

    /// As [`Feed::next`], but takes nothing before `at`, and then only once changes pause for
    /// `settle` (at most [`SETTLE_AT_MOST`] after the first is waiting): a watcher that looks
    /// at most once per interval gets a burst's changes in one go, after it, instead of taking
    /// CPU from it (an edge writes its report right after it applies a spec: one look sees
    /// both; a head's fan-out brings every edge's report after its apply: one look at each
    /// EdgeNode, once the reports are in). Cancel-safe too.
    pub async fn next_after(
        &self,
        at: tokio::time::Instant,
        settle: std::time::Duration,
    ) -> BTreeSet<String> {
        tokio::time::sleep_until(at).await;
        self.changed().await;
        let latest = tokio::time::Instant::now() + SETTLE_AT_MOST;
        loop {
            let seen = self.added.load(Ordering::Relaxed);
            tokio::time::sleep_until(latest.min(tokio::time::Instant::now() + settle)).await;
            if self.added.load(Ordering::Relaxed) == seen || tokio::time::Instant::now() >= latest {
                break;
            }
        }
        self.next().await
    }

    /// Notes that `key` changed.
    pub fn add(&self, key: &str) {
        lock(&self.keys).insert(key.to_string());
        self.added.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Puts back keys [`Feed::next`] gave out that could not be handled.
    pub fn requeue(&self, keys: BTreeSet<String>) {
        lock(&self.keys).extend(keys);
        self.wake.notify_one();
    }
}

/// Every live feed, by what it may see: heads see every document, an edge only its own.
#[derive(Default)]
pub struct Feeds {
    heads: Mutex<Vec<Weak<Feed>>>,
    edges: Mutex<HashMap<String, Vec<Weak<Feed>>>>,
}

impl Feeds {
    /// A feed for a session with `peer`; it ends when the session drops it.
    pub fn subscribe(&self, peer: &Identity) -> Arc<Feed> {
        let feed = Arc::new(Feed::default());
        let weak = Arc::downgrade(&feed);
        match peer.role {
            Role::Head => push_live(&mut lock(&self.heads), weak),
            Role::Edge => {
                let mut edges = lock(&self.edges);
                push_live(edges.entry(peer.name.clone()).or_default(), weak);
            }
        }
        feed
    }

    /// A feed of every document's changes.
    pub fn subscribe_all(&self) -> Arc<Feed> {
        let feed = Arc::new(Feed::default());
        push_live(&mut lock(&self.heads), Arc::downgrade(&feed));
        feed
    }

    /// Tells the feeds that may see document `key` that it changed.
    pub fn publish(&self, key: &str) {
        notify_live(&mut lock(&self.heads), key);
        if let Some(edge) = crate::key::edge_of(key) {
            let mut edges = lock(&self.edges);
            if let Some(feeds) = edges.get_mut(edge) {
                notify_live(feeds, key);
                if feeds.is_empty() {
                    edges.remove(edge);
                }
            }
        }
    }
}

fn push_live(feeds: &mut Vec<Weak<Feed>>, feed: Weak<Feed>) {
    feeds.retain(|f| f.strong_count() > 0);
    feeds.push(feed);
}

fn notify_live(feeds: &mut Vec<Weak<Feed>>, key: &str) {
    feeds.retain(|f| match f.upgrade() {
        Some(feed) => {
            feed.add(key);
            true
        }
        None => false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(role: Role, name: &str) -> Identity {
        Identity {
            role,
            name: name.into(),
            key: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_paced_look_takes_a_burst_once_it_pauses_and_what_follows_a_change_with_it() {
        use tokio::time::{Duration, Instant};
        let feed = Arc::new(Feed::default());
        let keys = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let settle = Duration::from_millis(500);
        // Changes made before the time to look are taken once they pause after it.
        let start = Instant::now();
        feed.add("a");
        let at = start + Duration::from_millis(100);
        assert_eq!(feed.next_after(at, settle).await, keys(&["a"]));
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(100) + settle,
            "{elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_millis(100) + 2 * settle,
            "{elapsed:?}"
        );
        // A change after an idle while: taken `settle` after it, with the one that followed.
        let later = {
            let feed = feed.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                feed.add("b");
                feed.add("c");
                tokio::time::sleep(Duration::from_millis(10)).await;
                feed.add("d");
                tokio::time::sleep(Duration::from_secs(2)).await;
                feed.add("e");
            })
        };
        let start = Instant::now();
        assert_eq!(feed.next_after(start, settle).await, keys(&["b", "c", "d"]));
        assert!(start.elapsed() >= Duration::from_millis(200) + settle);
        later.await.unwrap();
        assert_eq!(feed.next().await, keys(&["e"]));
        // A burst: taken once it pauses, however long that is within SETTLE_AT_MOST.
        let settle = Duration::from_millis(300);
        let burst = |count: usize| {
            let feed = feed.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                for i in 0..count {
                    feed.add(&format!("k{i}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let start = Instant::now();
        let ten = burst(10);
        let taken = feed.next_after(start, settle).await;
        assert_eq!(taken.len(), 10, "{taken:?}");
        assert!(start.elapsed() >= Duration::from_millis(950) + settle);
        ten.await.unwrap();
        // So is one that began before the time to look.
        let start = Instant::now();
        let ten = burst(10);
        let taken = feed
            .next_after(start + Duration::from_millis(300), settle)
            .await;
        assert_eq!(taken.len(), 10, "{taken:?}");
        ten.await.unwrap();
        // One that does not pause is taken SETTLE_AT_MOST after it began, and all of it later.
        let start = Instant::now();
        let long = burst(40);
        let taken = feed.next_after(start, settle).await;
        assert!(start.elapsed() >= SETTLE_AT_MOST, "{:?}", start.elapsed());
        assert!((10..40).contains(&taken.len()), "{}", taken.len());
        long.await.unwrap();
        assert_eq!(taken.len() + feed.next().await.len(), 40);
    }

    #[tokio::test]
    async fn each_feed_hears_only_what_its_peer_may_see_once_per_document() {
        let feeds = Feeds::default();
        let head = feeds.subscribe(&peer(Role::Head, "head-b"));
        let edge1 = feeds.subscribe(&peer(Role::Edge, "edge1"));
        let edge2 = feeds.subscribe(&peer(Role::Edge, "edge2"));
        feeds.publish("default/edge1");
        feeds.publish("default/edge1");
        feeds.publish("other/edge1");
        feeds.publish(crate::registry::KEY);
        let keys = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(edge1.next().await, keys(&["default/edge1", "other/edge1"]));
        assert_eq!(
            head.next().await,
            keys(&["default/edge1", "other/edge1", crate::registry::KEY])
        );
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), edge2.next());
        assert!(
            waiting.await.is_err(),
            "edge2 heard of another edge's documents"
        );
        drop(edge1);
        feeds.publish("default/edge1");
        assert!(
            lock(&feeds.edges).get("edge1").is_none(),
            "a dropped feed is kept"
        );
        let later = tokio::spawn(async move { edge2.next().await });
        tokio::task::yield_now().await;
        feeds.publish("default/edge2");
        assert_eq!(later.await.unwrap(), keys(&["default/edge2"]));
    }
}
