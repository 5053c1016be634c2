//! Status derivation, pure: an EdgeNode's phase, conditions and pod counts from its document,
//! what the node knows of the link, and (with a cluster) the Node and mirror pods. Every
//! condition is built here.

use crate::crd::{
    Condition, EdgeNode, EdgeNodeSpec, EdgeNodeStatus, POD_APPLIED, POD_NOT_WRITTEN, POD_REFUSED,
    Phase, PodState,
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
                    ..PodState::default()
                })
        })
        .collect();
    let applied = pods.iter().filter(|p| p.state == POD_APPLIED).count();
    let in_state = |state| pods.iter().filter(move |p: &&PodState| p.state == state);
    let refused: Vec<&PodState> = in_state(POD_REFUSED).collect();
    let unwritten: Vec<&PodState> = in_state(POD_NOT_WRITTEN).collect();
    let why = |pods: &[&PodState], otherwise: &str| {
        let each = pods.iter().map(|p| {
            let reason = p.reason.as_deref().unwrap_or(otherwise);
            format!("{}: {reason}", p.name)
        });
        each.collect::<Vec<_>>().join("; ")
    };
    let synced = view.observed_generation == Some(view.generation);
    let phase = if !online && last_synced_at.is_some() {
        Phase::Offline
    } else if !synced {
        Phase::Pending
    } else if !refused.is_empty() || !unwritten.is_empty() {
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
            why(&refused, "refused"),
        ),
    ];
    // Only while some manifest cannot be written, as Conflict only while there is one: the
    // conditions always present stay the three the design names.
    if !unwritten.is_empty() {
        conditions.push(Condition::new(
            "ManifestsWritten",
            false,
            written_reason(&unwritten),
            why(&unwritten, "not written"),
        ));
    }
    if !view.conflicts.is_empty() {
        conditions.push(Condition::new(
            "Conflict",
            true,
            "ConcurrentEdits",
            view.conflicts.join("; "),
        ));
    }
    if view.deleted && !synced {
        let edge = &view.name;
        conditions.push(match online {
            true => Condition::new(
                "Deleting",
                true,
                "WaitingForEdge",
                format!("waiting for edge {edge} to remove the pods"),
            ),
            false => Condition::new(
                "Deleting",
                true,
                "EdgeOffline",
                format!(
                    "edge {edge} is offline: the EdgeNode goes once the edge is back and has \
                     removed the pods, or once it is forgotten with `edgesync node remove {edge}`"
                ),
            ),
        });
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

/// The `ManifestsWritten` condition's reason: the pods' one cause, or WriteFailed for several
/// (or an unknown one).
fn written_reason(unwritten: &[&PodState]) -> &'static str {
    let causes: std::collections::BTreeSet<&str> = unwritten
        .iter()
        .map(|p| p.cause.as_deref().unwrap_or("WriteFailed"))
        .collect();
    match causes.into_iter().collect::<Vec<_>>()[..] {
        ["FileNameTaken"] => "FileNameTaken",
        ["ManifestDirNotWritable"] => "ManifestDirNotWritable",
        ["DiskFull"] => "DiskFull",
        _ => "WriteFailed",
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

/// A transition worth telling as an event: Online and offline, refused pods, manifests that
/// cannot be written, conflicts, and a deletion blocked by an offline edge.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Notice {
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub type_: String,
    /// One CamelCase word, as Kubernetes Events have.
    pub reason: String,
    /// What happened.
    pub message: String,
}

/// The notices between two sets of an EdgeNode's conditions: a condition that turns bad, or
/// stays bad for another reason, is told again; one that recovers, where it matters.
pub fn notices(before: &[Condition], after: &[Condition]) -> Vec<Notice> {
    let find = |set: &[Condition], type_: &str| set.iter().find(|c| c.type_ == type_).cloned();
    let mut out = Vec::new();
    let mut tell = |warning: bool, reason: &str, message: String| {
        out.push(Notice {
            type_: if warning { "Warning" } else { "Normal" }.into(),
            reason: reason.into(),
            message,
        })
    };
    let changed = |b: &Option<Condition>, a: &Condition| {
        b.as_ref().is_none_or(|b| {
            (&b.status, &b.reason, &b.message) != (&a.status, &a.reason, &a.message)
        })
    };
    for a in after {
        let b = find(before, &a.type_);
        if !changed(&b, a) {
            continue;
        }
        let was_true = b.as_ref().map(|b| b.status == "True");
        let is_true = a.status == "True";
        let detail = |what: &str| match a.message.is_empty() {
            true => what.to_string(),
            false => format!("{what}: {}", a.message),
        };
        match (a.type_.as_str(), is_true) {
            ("Online", true) if was_true == Some(false) => {
                tell(false, "EdgeOnline", "the edge is connected again".into())
            }
            ("Online", false) if was_true == Some(true) => tell(
                true,
                "EdgeOffline",
                detail(&format!("the edge is offline ({})", a.reason)),
            ),
            // The head refused the resource itself, or the edge some of its pods.
            ("Valid", false) if a.reason == "SpecRefused" => {
                tell(true, "SpecRefused", detail("refused"))
            }
            ("Valid", false) => tell(true, "PodRefused", detail("refused")),
            ("Valid", true) if was_true == Some(false) => {
                tell(false, "PodsAccepted", "every pod is accepted".into())
            }
            ("ManifestsWritten", false) => tell(true, "ManifestNotWritten", detail(&a.reason)),
            ("ManifestsWritten", true) if was_true == Some(false) => tell(
                false,
                "ManifestsWritten",
                "every manifest is written".into(),
            ),
            ("Conflict", true) => tell(true, "Conflict", detail("concurrent edits disagreed")),
            ("Deleting", true) if a.reason == "EdgeOffline" => {
                tell(true, "DeletionBlocked", a.message.clone())
            }
            _ => {}
        }
    }
    // Shown only while bad: gone is recovered.
    let gone = |type_: &str| {
        find(before, type_).is_some_and(|b| b.status == "False") && find(after, type_).is_none()
    };
    if gone("ManifestsWritten") {
        tell(
            false,
            "ManifestsWritten",
            "every manifest is written".into(),
        );
    }
    out
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
                    reason: (*state != POD_APPLIED).then(|| format!("{name} broke")),
                    cause: (*state == POD_NOT_WRITTEN).then(|| format!("Cause{name}")),
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
        assert_eq!(condition(&refused, "Valid").message, "web: web broke");
        let only_while_bad =
            |s: &EdgeNodeStatus| s.conditions.iter().all(|c| c.type_ != "ManifestsWritten");
        assert!(only_while_bad(&refused) && only_while_bad(&running));
        // A manifest not written is its own condition, named by the cause.
        let mut full = view(Some(2), &[("web", POD_NOT_WRITTEN), ("db", POD_APPLIED)]);
        full.pod_states[0].cause = Some("DiskFull".into());
        let full = derive_status(&full, at.clone(), true);
        assert_eq!(full.phase, Some(Phase::Degraded));
        assert_eq!(condition(&full, "Valid").status, "True");
        let written = condition(&full, "ManifestsWritten");
        assert_eq!(
            (written.status.as_str(), written.reason.as_str()),
            ("False", "DiskFull")
        );
        assert_eq!(written.message, "web: web broke");
        let two = view(
            Some(2),
            &[("web", POD_NOT_WRITTEN), ("db", POD_NOT_WRITTEN)],
        );
        let two = derive_status(&two, at.clone(), true);
        assert_eq!(condition(&two, "ManifestsWritten").reason, "WriteFailed");
        assert_eq!(
            condition(&two, "ManifestsWritten").message,
            "db: db broke; web: web broke"
        );
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

    #[test]
    fn a_deletion_waiting_for_an_offline_edge_says_so() {
        let mut deleted = view(Some(2), &[]);
        deleted.deleted = true;
        deleted.generation = 3;
        let at = Some("2026-12-02T00:00:00Z".to_string());
        let waiting = derive_status(&deleted, at.clone(), true);
        assert_eq!(condition(&waiting, "Deleting").reason, "WaitingForEdge");
        let blocked = derive_status(&deleted, at.clone(), false);
        let c = condition(&blocked, "Deleting");
        assert_eq!(c.reason, "EdgeOffline");
        assert!(
            c.message.contains("edgesync node remove edge01"),
            "{}",
            c.message
        );
        deleted.observed_generation = Some(3);
        let done = derive_status(&deleted, at, false);
        assert!(done.conditions.iter().all(|c| c.type_ != "Deleting"));
    }

    #[test]
    fn notices_tell_what_turned_bad_and_what_recovered_once() {
        let c = |type_: &str, ok: bool, reason: &str, message: &str| {
            Condition::new(type_, ok, reason, message)
        };
        let reasons = |n: Vec<Notice>| {
            n.into_iter()
                .map(|n| format!("{} {}", n.type_, n.reason))
                .collect::<Vec<_>>()
        };
        let healthy = [
            c("Online", true, "Connected", ""),
            c("Valid", true, "AllPodsAccepted", ""),
        ];
        // First sight of a healthy EdgeNode: nothing to tell.
        assert!(notices(&[], &healthy).is_empty());
        assert!(notices(&healthy, &healthy).is_empty());
        // First seen offline (a new EdgeNode whose edge never connected): nothing to tell.
        assert!(notices(&[], &[c("Online", false, "Disconnected", "")]).is_empty());
        let troubled = [
            c("Online", false, "Disconnected", ""),
            c("Valid", false, "PodsRefused", "web: hostNetwork"),
            c("ManifestsWritten", false, "DiskFull", "db: no space"),
            c(
                "Conflict",
                true,
                "ConcurrentEdits",
                "spec.x: kept 1, lost 2",
            ),
            c("Deleting", true, "EdgeOffline", "edge edge01 is offline"),
        ];
        assert_eq!(
            reasons(notices(&healthy, &troubled)),
            [
                "Warning EdgeOffline",
                "Warning PodRefused",
                "Warning ManifestNotWritten",
                "Warning Conflict",
                "Warning DeletionBlocked"
            ]
        );
        let told = notices(&healthy, &troubled);
        assert_eq!(told[1].message, "refused: web: hostNetwork");
        assert_eq!(told[2].message, "DiskFull: db: no space");
        // Told once, not on every pass; again when the reason changes.
        assert!(notices(&troubled, &troubled).is_empty());
        let mut other = troubled.clone();
        other[1].message = "db: hostPID".into();
        assert_eq!(reasons(notices(&troubled, &other)), ["Warning PodRefused"]);
        assert_eq!(
            reasons(notices(&troubled, &healthy)),
            [
                "Normal EdgeOnline",
                "Normal PodsAccepted",
                "Normal ManifestsWritten"
            ]
        );
    }
}
