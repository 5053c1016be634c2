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
