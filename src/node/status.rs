//! Status derivation, pure: an EdgeNode's phase, conditions and pod counts from its document,
//! what the node knows of the link, and (with a cluster) the Node and mirror pods. Every
//! condition is built here.

use crate::crd::{
    Condition, EdgeNode, EdgeNodeSpec, EdgeNodeStatus, POD_APPLIED, POD_REFUSED, Phase, PodState,
};
use crate::model::DocView;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

/// Builds the kubectl-shaped object from a document and what the node knows about the link.
pub fn to_edgenode(view: &DocView, last_synced_at: Option<String>, online: bool) -> EdgeNode {
    let pods = view
        .pods
        .values()
        .filter_map(|p| serde_json::from_value(p.clone()).ok())
        .collect();
    let metadata = ObjectMeta {
        name: Some(view.name.clone()),
        namespace: Some(view.namespace.clone()),
        labels: (!view.labels.is_empty()).then(|| view.labels.clone()),
        generation: Some(view.generation),
        creation_timestamp: view
            .created_at
            .as_deref()
            .and_then(|t| t.parse().ok())
            .map(Time),
        ..ObjectMeta::default()
    };
    let mut node = EdgeNode::new(&view.name, EdgeNodeSpec { pods });
    node.metadata = metadata;
    node.status = Some(derive_status(view, last_synced_at, online));
    node
}

/// Phase and conditions from the edge's report and the link state.
pub fn derive_status(
    view: &DocView,
    last_synced_at: Option<String>,
    online: bool,
) -> EdgeNodeStatus {
    let pods: Vec<PodState> = view
        .pods
        .keys()
        .map(|name| {
            view.pod_states
                .iter()
                .find(|s| &s.name == name)
                .cloned()
                .unwrap_or_else(|| PodState {
                    name: name.clone(),
                    state: "Pending".into(),
                    reason: None,
                    phase: None,
                })
        })
        .collect();
    let applied = pods.iter().filter(|p| p.state == POD_APPLIED).count();
    let refused: Vec<&PodState> = pods.iter().filter(|p| p.state == POD_REFUSED).collect();
    let synced = view.observed_generation == Some(view.generation);
    let phase = if !online && last_synced_at.is_some() {
        Phase::Offline
    } else if !synced {
        Phase::Pending
    } else if !refused.is_empty() {
        Phase::Degraded
    } else {
        Phase::Running
    };
    let mut conditions = vec![
        Condition::new(
            "Synced",
            synced,
            if synced { "Applied" } else { "Pending" },
            match view.observed_generation {
                Some(g) => format!("edge applied generation {g} of {}", view.generation),
                None => "edge has not reported yet".into(),
            },
        ),
        Condition::new(
            "Online",
            online,
            if online { "Connected" } else { "Disconnected" },
            "",
        ),
        Condition::new(
            "Valid",
            refused.is_empty(),
            if refused.is_empty() {
                "AllPodsAccepted"
            } else {
                "PodsRefused"
            },
            refused
                .iter()
                .map(|p| format!("{}: {}", p.name, p.reason.as_deref().unwrap_or("refused")))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    ];
    if !view.conflicts.is_empty() {
        conditions.push(Condition::new(
            "Conflict",
            true,
            "ConcurrentEdits",
            view.conflicts.join("; "),
        ));
    }
    EdgeNodeStatus {
        phase: Some(phase),
        conditions,
        observed_generation: view.observed_generation,
        last_synced_at,
        online: Some(online),
        pods_ready: Some(format!("{applied}/{}", pods.len())),
        pods,
    }
}

/// Folds what the cluster shows into the status the edge reported: with a Node of the edge's
/// name, the edge is Running only when every mirror pod is Running, and Offline when the Node
/// is not Ready. Without one (a kubelet not registered with this cluster) the report stands.
pub fn with_cluster(
    status: &mut EdgeNodeStatus,
    node_ready: Option<bool>,
    mirror_phase: impl Fn(&str) -> Option<String>,
) {
    let Some(ready) = node_ready else {
        return;
    };
    for pod in &mut status.pods {
        pod.phase = Some(mirror_phase(&pod.name).unwrap_or_else(|| "Missing".into()));
    }
    let phase_of = |p: &crate::crd::PodState| p.phase.clone().unwrap_or_default();
    let running = status
        .pods
        .iter()
        .filter(|p| phase_of(p) == "Running")
        .count();
    status.pods_ready = Some(format!("{running}/{}", status.pods.len()));
    if !ready {
        status.phase = Some(Phase::Offline);
        status.online = Some(false);
        for c in status.conditions.iter_mut().filter(|c| c.type_ == "Online") {
            *c = Condition::new("Online", false, "NodeNotReady", "the Node is not Ready");
        }
        return;
    }
    if status.phase == Some(Phase::Running) {
        let failed = status
            .pods
            .iter()
            .any(|p| !matches!(phase_of(p).as_str(), "Running" | "Pending" | "Missing"));
        if failed {
            status.phase = Some(Phase::Degraded);
        } else if running < status.pods.len() {
            status.phase = Some(Phase::Pending);
        }
    }
}

/// Adds what the Kubernetes bridge found that the document cannot say: `conflicts` between a
/// user's edits and the edge's, and why the resource's spec was `refused`.
pub fn with_bridge(
    status: &mut EdgeNodeStatus,
    conflicts: Option<Vec<String>>,
    refused: Option<String>,
) {
    let mut set = |condition: Condition| {
        status.conditions.retain(|c| c.type_ != condition.type_);
        status.conditions.push(condition);
    };
    if let Some(conflicts) = conflicts {
        set(Condition::new(
            "Conflict",
            true,
            "ConcurrentEdits",
            conflicts.join("; "),
        ));
    }
    if let Some(reason) = refused {
        set(Condition::new("Valid", false, "SpecRefused", reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(observed: Option<i64>, states: &[(&str, &str)]) -> DocView {
        DocView {
            namespace: "default".into(),
            name: "edge01".into(),
            generation: 2,
            observed_generation: observed,
            pods: states
                .iter()
                .map(|(name, _)| (name.to_string(), json!({})))
                .collect(),
            pod_states: states
                .iter()
                .map(|(name, state)| PodState {
                    name: name.to_string(),
                    state: state.to_string(),
                    reason: (*state == POD_REFUSED).then(|| "hostNetwork".into()),
                    phase: None,
                })
                .collect(),
            ..DocView::default()
        }
    }

    fn condition<'a>(status: &'a EdgeNodeStatus, type_: &str) -> &'a Condition {
        let mut found = status.conditions.iter().filter(|c| c.type_ == type_);
        let first = found.next().expect(type_);
        assert!(found.next().is_none(), "{type_} twice");
        first
    }

    #[test]
    fn the_phase_and_every_condition_say_why() {
        let at = Some("2026-12-02T00:00:00Z".to_string());
        let running = derive_status(&view(Some(2), &[("web", POD_APPLIED)]), at.clone(), true);
        assert_eq!(running.phase, Some(Phase::Running));
        assert_eq!(running.pods_ready.as_deref(), Some("1/1"));
        let pending = derive_status(&view(Some(1), &[("web", POD_APPLIED)]), at.clone(), true);
        assert_eq!(pending.phase, Some(Phase::Pending));
        assert_eq!(
            condition(&pending, "Synced").message,
            "edge applied generation 1 of 2"
        );
        let refused = derive_status(&view(Some(2), &[("web", POD_REFUSED)]), at.clone(), true);
        assert_eq!(refused.phase, Some(Phase::Degraded));
        assert_eq!(condition(&refused, "Valid").message, "web: hostNetwork");
        let offline = derive_status(&view(Some(2), &[("web", POD_APPLIED)]), at, false);
        assert_eq!(offline.phase, Some(Phase::Offline));
        assert_eq!(condition(&offline, "Online").reason, "Disconnected");

        // The cluster's view: a Node not Ready is offline, whatever the edge last said.
        let mut folded = running.clone();
        with_cluster(&mut folded, Some(false), |_| Some("Running".into()));
        assert_eq!(folded.phase, Some(Phase::Offline));
        assert_eq!(condition(&folded, "Online").reason, "NodeNotReady");
        let mut starting = running.clone();
        with_cluster(&mut starting, Some(true), |_| None);
        assert_eq!(starting.phase, Some(Phase::Pending));
        assert_eq!(starting.pods_ready.as_deref(), Some("0/1"));

        // What the bridge found replaces, never repeats, a condition.
        let mut bridged = refused.clone();
        with_bridge(
            &mut bridged,
            Some(vec!["spec.x: kept 1, lost 2".into()]),
            None,
        );
        with_bridge(&mut bridged, None, Some("spec.pods[0]: bad".into()));
        assert_eq!(condition(&bridged, "Conflict").reason, "ConcurrentEdits");
        assert_eq!(condition(&bridged, "Valid").reason, "SpecRefused");
    }
}
