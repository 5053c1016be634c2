//! The Edge custom resource (cluster-scoped, `kubectl get edges`): one per joined edge, written
//! by the head that admits it, so every head, also a fresh one, lets it in; the fleet view.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A joined edge: which key the heads let in under its name, until when its certificate runs.
/// Deleting it (or `edgesync node remove`) shuts the edge out; it may join again with a token.
// Each printer column repeats `type_`, which the lint mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "edgesync.io",
    version = "v1alpha1",
    kind = "Edge",
    plural = "edges",
    shortname = "eg",
    status = "EdgeStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "An edge joined to the heads: the key it was issued and where it is now.",
    printcolumn(name = "Online", type_ = "boolean", json_path = ".status.online"),
    printcolumn(name = "Head", type_ = "string", json_path = ".status.head"),
    printcolumn(name = "Address", type_ = "string", json_path = ".status.address"),
    printcolumn(name = "Last Seen", type_ = "date", json_path = ".status.lastSeen"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(
        name = "Cert Expires",
        type_ = "date",
        json_path = ".spec.certificateNotAfter"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeSpec {
    /// SHA-256 of the public key of the certificate last issued to the edge, hex: the only
    /// key let in under this name.
    #[serde(rename = "publicKeySHA256")]
    pub public_key_sha256: String,
    /// When that certificate expires (RFC 3339).
    pub certificate_not_after: String,
}

/// Where the edge is, as the heads see it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeStatus {
    /// Whether a head has a session with the edge now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// The head it is (or was last) connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// Address it is reachable at: its advertised address, else the one the head saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// When a head last had a session with it start or end (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// The address in its DNS record, as published (absent: no record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_address: Option<String>,
    /// The edgesync version it last said it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}
