//! The User and AcceptableUsePolicy custom resources (cluster-scoped, `kubectl get users`,
//! `kubectl get aup`): where heads with a cluster keep the people who use it, their approval,
//! and every version of the policy they accept, so that any head serves any user.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label on each User: the first 63 hex digits of the SHA-256 of its e-mail address in lower
/// case, so heads find a registration with the same address without reading every user.
pub const EMAIL_LABEL: &str = "edgesync.io/email-sha256";

/// A person registered through a head's API (`metadata.name` is the username, also the name
/// of their namespace). `spec.approval` is the administrator's decision: set it with
/// `edgesync user approve|reject|revoke` or `kubectl patch`/`kubectl edit`.
// Each printer column repeats `type_`, which the lint mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "edgesync.io",
    version = "v1alpha1",
    kind = "User",
    plural = "users",
    shortname = "eu",
    status = "UserStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A person registered through an edgesync head: the administrator's decision in spec, their sign-in secret's hash, AUP acceptance and cluster access in status.",
    printcolumn(name = "Status", type_ = "string", json_path = ".spec.approval"),
    printcolumn(name = "Email", type_ = "string", json_path = ".spec.email"),
    printcolumn(name = "AUP", type_ = "integer", json_path = ".status.aup.version"),
    printcolumn(
        name = "AUP Expires",
        type_ = "date",
        json_path = ".status.aup.expiresAt"
    ),
    printcolumn(
        name = "Access",
        type_ = "boolean",
        json_path = ".status.accessGranted"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    /// Contact address; unique among users (case-insensitive).
    pub email: String,
    /// Full name.
    pub full_name: String,
    /// Pending (waiting for an administrator), Approved, Rejected or Revoked.
    #[serde(default)]
    pub approval: Approval,
}

/// An administrator's decision about a user.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Approval {
    /// Registered, waiting for an administrator.
    #[default]
    Pending,
    /// May use the cluster once the AUP is accepted.
    Approved,
    /// Refused by an administrator.
    Rejected,
    /// Access withdrawn by an administrator.
    Revoked,
}

impl Approval {
    /// The name, as in the resource and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Approval::Pending => "Pending",
            Approval::Approved => "Approved",
            Approval::Rejected => "Rejected",
            Approval::Revoked => "Revoked",
        }
    }

    /// Parses a name written by [`Approval::as_str`]; anything else is Pending.
    pub fn parse(text: &str) -> Approval {
        match text {
            "Approved" => Approval::Approved,
            "Rejected" => Approval::Rejected,
            "Revoked" => Approval::Revoked,
            _ => Approval::Pending,
        }
    }
}

impl std::fmt::Display for Approval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the heads record about a user. The registration's id is `metadata.uid` and its time
/// `metadata.creationTimestamp`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserStatus {
    /// SHA-256 of the user's sign-in secret, hex (the secret itself is shown once and never
    /// stored). Absent while the registration is being written.
    #[serde(
        rename = "secretSHA256",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub secret_sha256: Option<String>,
    /// The user's latest acceptance of the AUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aup: Option<AupAcceptance>,
    /// Whether the user's RoleBinding exists (their kubeconfigs work).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_granted: Option<bool>,
    /// When the user last signed out of the portal (RFC 3339): sessions from before end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_out_at: Option<String>,
}

/// An acceptance of one AUP version.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AupAcceptance {
    /// The AcceptableUsePolicy version accepted.
    pub version: i64,
    /// When (RFC 3339).
    pub accepted_at: String,
    /// Until when (RFC 3339); then it must be accepted again.
    pub expires_at: String,
}

/// One version of the Acceptable Use Policy, named `v<version>`; the highest version is the
/// one in force. Publish a new one with `edgesync aup set -f FILE`; a version never changes.
// Each printer column repeats `type_`, which the lint mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "edgesync.io",
    version = "v1alpha1",
    kind = "AcceptableUsePolicy",
    plural = "acceptableusepolicies",
    shortname = "aup",
    derive = "PartialEq",
    doc = "One version of the Acceptable Use Policy users of the cluster accept; the highest version is in force.",
    printcolumn(name = "Version", type_ = "integer", json_path = ".spec.version"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self == oldSelf",
    "message": "an AUP version cannot change; publish a new one with `edgesync aup set -f FILE`"
}]))]
pub struct AcceptableUsePolicySpec {
    /// Version number, from 1; users accept a version.
    #[schemars(range(min = 1))]
    pub version: i64,
    /// The policy text.
    pub text: String,
}

/// Name of the AcceptableUsePolicy object of `version`.
pub fn aup_name(version: i64) -> String {
    format!("v{version}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn user_crd_has_the_documented_shape() {
        let crd = serde_json::to_value(User::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "users.edgesync.io");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "eu");
        let version = &crd["spec"]["versions"][0];
        assert!(version["subresources"]["status"].is_object());
        let schema = &version["schema"]["openAPIV3Schema"]["properties"];
        assert_eq!(
            schema["spec"]["properties"]["approval"]["enum"],
            serde_json::json!(["Pending", "Approved", "Rejected", "Revoked"])
        );
        assert!(schema["status"]["properties"]["secretSHA256"].is_object());
        let columns: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            columns,
            ["Status", "Email", "AUP", "AUP Expires", "Access", "Age"]
        );
    }

    #[test]
    fn aup_crd_is_cluster_scoped_and_immutable() {
        let crd = serde_json::to_value(AcceptableUsePolicy::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "acceptableusepolicies.edgesync.io");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["x-kubernetes-validations"][0]["rule"],
            "self == oldSelf"
        );
        assert_eq!(aup_name(2), "v2");
    }

    #[test]
    fn approval_round_trips_its_names() {
        for a in [
            Approval::Pending,
            Approval::Approved,
            Approval::Rejected,
            Approval::Revoked,
        ] {
            assert_eq!(Approval::parse(a.as_str()), a);
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
        let spec: UserSpec =
            serde_json::from_value(serde_json::json!({"email": "a@b.org", "fullName": "A"}))
                .unwrap();
        assert_eq!(spec.approval, Approval::Pending);
    }
}
