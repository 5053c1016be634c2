//! Documents without a resource and resources without a document, found while this head is
//! the writer: a document made elsewhere gets a resource, a resource deleted while nobody
//! watched takes its document along.

use super::plan::with_synced;
use super::{Bridge, FINALIZER, SYNCED_HEADS_ANNOTATION, Scope, lock, pods_value};
use crate::head::cluster::post_params;
use crate::node::NodeError;
use kube::api::DynamicObject;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use std::collections::BTreeSet;
use tracing::{info, warn};

impl Bridge {
    /// Documents without a resource and resources without a document, in one scope, once its
    /// cache is filled: a document made elsewhere (on an edge, or while another head wrote)
    /// gets a resource; a resource deleted while nobody watched takes its document along.
    pub(super) async fn orphans(&self, scope: &Scope) {
        if scope.store.wait_until_ready().await.is_err() {
            return;
        }
        loop {
            let (keys, all) = scope.orphans.next().await;
            let keys: BTreeSet<String> = match all {
                true => {
                    let known: Vec<String> = lock(&self.seen).base.keys().cloned().collect();
                    known.into_iter().chain(self.node.docs().keys()).collect()
                }
                false => keys,
            };
            let in_scope = |key: &String| {
                self.in_scope(key)
                    && crate::key::parts(key).is_some_and(|(ns, _)| {
                        scope.namespace.as_deref().is_none_or(|scope| scope == ns)
                    })
            };
            for key in keys.iter().filter(|k| in_scope(k)) {
                let Some((namespace, name)) = crate::key::parts(key) else {
                    continue;
                };
                let object = ObjectRef::new_with(name, self.resource.clone()).within(namespace);
                if scope.store.get(&object).is_some() {
                    continue;
                }
                let known = lock(&self.seen).base.contains_key(key);
                if !known {
                    self.create_resource(key).await;
                    continue;
                }
                // A resource this head just made may not be in its cache yet: ask.
                match self.api(namespace).get_opt(name).await {
                    Ok(Some(_)) => {}
                    Ok(None) => self.resource_deleted(key).await,
                    Err(e) => warn!(doc = %key, error = %e, "cannot read the resource"),
                }
            }
        }
    }

    /// The resource is gone (deleted without waiting for the edge, or while no head watched):
    /// the document goes too, and the edge removes the pods.
    async fn resource_deleted(&self, key: &str) {
        match self.node.docs().delete(key).await {
            Ok(()) => info!(doc = key, "EdgeNode deleted; the edge removes its pods"),
            Err(NodeError::NotFound(_)) => {}
            Err(e) => return warn!(doc = key, error = %e, "cannot delete the document"),
        }
        self.forget(key).await;
    }

    /// Makes the resource for a document that has none.
    async fn create_resource(&self, key: &str) {
        let Some((namespace, name)) = crate::key::parts(key) else {
            return;
        };
        let Ok(Some((view, heads))) = self.node.docs().view_at(key).await else {
            return;
        };
        if view.deleted || view.generation == 0 {
            return;
        }
        let synced = with_synced(&[], &heads).unwrap_or_default();
        let mut object = DynamicObject::new(name, &self.resource).within(namespace);
        object.data = json!({"spec": {"pods": view.pods.values().collect::<Vec<_>>()}});
        object.metadata.finalizers = Some(vec![FINALIZER.into()]);
        object.metadata.annotations = Some(
            [(
                SYNCED_HEADS_ANNOTATION.to_string(),
                serde_json::to_string(&synced).unwrap_or_default(),
            )]
            .into(),
        );
        if !view.labels.is_empty() {
            object.metadata.labels = Some(view.labels.clone());
        }
        match self.api(namespace).create(&post_params(), &object).await {
            Ok(_) => {
                info!(doc = key, "EdgeNode made on an edge; resource created");
                self.remember(key, Some(pods_value(&view.pods))).await;
            }
            // Someone made it meanwhile: the Controller merges it in.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => warn!(doc = key, error = %e, "cannot create the resource"),
        }
    }
}
