//! The bridge of a head that is not the writer: it keeps the merge bases, so a takeover
//! starts from a base both sides had.

use super::{Bridge, key_of, lock, pods_value};
use crate::input;
use futures_util::StreamExt;
use kube::api::DynamicObject;
use kube::runtime::{WatchStreamExt, watcher};
use tracing::warn;

impl Bridge {
    /// While another head writes: watches the resources and records a resource's pods as
    /// the merge base whenever the document (kept up to date by the writer through
    /// head-to-head sync) holds exactly them, so a takeover starts from a base both sides had.
    pub(super) async fn follow(&self) {
        let scopes = self.scope_apis().into_iter().map(|(_, api)| async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            tokio::pin!(stream);
            while let Some(object) = stream.next().await {
                match object {
                    Ok(object) => self.follow_one(&object).await,
                    Err(e) => warn!(error = %e, "EdgeNode watch failed; retrying"),
                }
            }
        });
        futures_util::future::join_all(scopes).await;
    }

    async fn follow_one(&self, object: &DynamicObject) {
        let Some(key) = key_of(object) else {
            return;
        };
        let json = serde_json::to_value(object).unwrap_or_default();
        let rules = self.node.rules().clone();
        let Ok(desired) = input::parse_edgenode(&json, &format!("EdgeNode {key}"), &rules) else {
            return;
        };
        let theirs = pods_value(&desired.pods);
        let agreed = matches!(self.node.docs().view(&key).await,
            Ok(Some((view, _))) if !view.deleted && pods_value(&view.pods) == theirs);
        if agreed && lock(&self.seen).base.get(&key) != Some(&theirs) {
            self.remember(&key, Some(theirs)).await;
        }
    }
}
