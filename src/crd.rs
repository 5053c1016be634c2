//! The EdgeNode custom resource: spec, status, conditions; and every CRD edgesync serves,
//! generated from the Rust types into `deploy/`.

pub mod edge;
pub mod user;

use k8s_openapi::api::core::v1::Pod;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the EdgeNode resource.
pub const GROUP: &str = "edgesync.io";
/// `apiVersion` written on every EdgeNode edgesync prints.
pub const API_VERSION: &str = "edgesync.io/v1alpha1";
/// `apiVersion` of the old proof of concept, still accepted by `apply`.
pub const LEGACY_API_VERSION: &str = "edge.k8s.io/v1alpha1";
/// Annotation that marks a manifest file as written by edgesync.
pub const MANAGED_ANNOTATION: &str = "edgesync.io/managed";
/// Annotation naming the EdgeNode (`namespace/name`) a manifest came from.
pub const SOURCE_ANNOTATION: &str = "edgesync.io/edgenode";
/// Label (value "true") on every manifest, so the head can select the mirror pods.
pub const MANAGED_LABEL: &str = "edgesync.io/managed";

/// Which pods must run on one edge node (`metadata.name` is the node's name).
// Each printer column repeats `type_`, which the lint mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "edgesync.io",
    version = "v1alpha1",
    kind = "EdgeNode",
    plural = "edgenodes",
    shortname = "en",
    namespaced,
    status = "EdgeNodeStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Pods that must run on the edge node named like this object, as kubelet static pods.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pods", type_ = "string", json_path = ".status.podsReady"),
    printcolumn(name = "Online", type_ = "boolean", json_path = ".status.online"),
    printcolumn(name = "Last Sync", type_ = "date", json_path = ".status.lastSyncedAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EdgeNodeSpec {
    /// Pods to run on the edge; names are unique DNS-1123 names.
    #[serde(default)]
    #[schemars(schema_with = "pods_schema")]
    pub pods: Vec<Pod>,
}

fn pods_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "description": "Pods to run on the edge node; each is a v1 Pod (apiVersion, kind, metadata, spec).",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}

/// What the edge reports, plus what the local node knows about the link.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeStatus {
    /// Pending, Running, Degraded or Offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Synced, Online, Valid and, while concurrent edits disagree, Conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec generation the edge last applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When this object was last exchanged with the other side (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_at: Option<String>,
    /// Whether the edge is connected (seen from the head) or the head is (seen from the edge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// Applied pods over desired pods, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_ready: Option<String>,
    /// Per-pod state on the edge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodState>,
}

/// Overall phase of an EdgeNode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// The edge has not applied the current spec yet.
    Pending,
    /// Every pod is applied on the edge.
    Running,
    /// Some pods were refused.
    Degraded,
    /// The edge is not connected.
    Offline,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A status condition, as in Kubernetes conventions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Synced, Online, Valid or Conflict.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// One CamelCase word.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the status last changed (RFC 3339), as far as the node serving it has seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl Condition {
    /// A condition with `status` "True" or "False".
    pub fn new(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            type_: type_.to_string(),
            status: if ok { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: None,
        }
    }
}

/// State of one pod on the edge.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    /// Pod name.
    pub name: String,
    /// Applied (manifest written), Refused (by policy, see reason) or NotWritten (the edge
    /// cannot write its manifest now, see cause and reason; it tries again).
    pub state: String,
    /// Why the pod was refused or is not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a pod not written: FileNameTaken, ManifestDirNotWritable, DiskFull or WriteFailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// Phase of the mirror pod `<pod>-<node>` in the cluster ("Missing" when there is none);
    /// set by a head with a cluster whose Node object of that name exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// Pod state: the manifest is written.
pub const POD_APPLIED: &str = "Applied";
/// Pod state: the edge refused the pod (see reason).
pub const POD_REFUSED: &str = "Refused";
/// Pod state: the edge cannot write the pod's manifest now (see cause and reason); a manifest
/// it wrote before stays, and it tries again.
pub const POD_NOT_WRITTEN: &str = "NotWritten";

/// A CRD edgesync generates: the plural `edgesync crd` takes, the file it is checked in at,
/// and the definition.
pub struct Generated {
    /// Resource plural, as `edgesync crd PLURAL` names it.
    pub plural: &'static str,
    /// Path under the repository, e.g. `deploy/crd.yaml`.
    pub file: &'static str,
    /// The CustomResourceDefinition.
    pub crd: fn() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
}

/// Every CRD edgesync serves; the first (EdgeNode) is what `edgesync crd` prints by default.
pub const GENERATED: &[Generated] = &[
    Generated {
        plural: "edgenodes",
        file: "deploy/crd.yaml",
        crd: EdgeNode::crd,
    },
    Generated {
        plural: "edges",
        file: "deploy/crd-edges.yaml",
        crd: edge::Edge::crd,
    },
    Generated {
        plural: "users",
        file: "deploy/crd-users.yaml",
        crd: user::User::crd,
    },
    Generated {
        plural: "acceptableusepolicies",
        file: "deploy/crd-acceptableusepolicies.yaml",
        crd: user::AcceptableUsePolicy::crd,
    },
];

/// The CRD of `plural` as YAML, exactly as checked in under `deploy/`; None for an unknown plural.
pub fn yaml_of(plural: &str) -> Option<String> {
    let generated = GENERATED.iter().find(|g| g.plural == plural)?;
    let crd = serde_json::to_value((generated.crd)()).expect("CRD serialises to JSON");
    let yaml = serde_saphyr::to_string(&crd).expect("CRD serialises to YAML");
    let command = match plural {
        "edgenodes" => "edgesync crd".to_string(),
        other => format!("edgesync crd {other}"),
    };
    Some(format!(
        "# Generated by `{command}` from the Rust types in src/crd; do not edit.\n{yaml}"
    ))
}

/// The EdgeNode CRD as YAML, exactly as checked in at `deploy/crd.yaml`.
pub fn crd_yaml() -> String {
    yaml_of("edgenodes").expect("EdgeNode is generated")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_has_the_documented_shape() {
        let crd = serde_json::to_value(EdgeNode::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "edgenodes.edgesync.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "en");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(columns, ["Phase", "Pods", "Online", "Last Sync", "Age"]);
    }

    #[test]
    fn checked_in_crds_are_current() {
        for generated in GENERATED {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(generated.file);
            let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                checked_in == yaml_of(generated.plural).unwrap(),
                "{} is stale: run `cargo run -- crd {} > {}`",
                generated.file,
                generated.plural,
                generated.file
            );
        }
    }
}
