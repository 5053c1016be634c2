//! Cluster credentials for users: a namespace of their own, a ServiceAccount in it, a
//! RoleBinding to the `edit` ClusterRole there only, and a bounded-lifetime token from the
//! TokenRequest API, handed out as a kubeconfig. Removing the RoleBinding ends access, whatever
//! tokens are still around.

use super::users::UserError;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use serde_json::json;
use std::time::Duration;

/// Name of the ServiceAccount and RoleBinding made in each user's namespace.
pub const USER_OBJECT: &str = "edgesync-user";
/// Annotation on a user's namespace naming the registration it was made for.
const OWNER: &str = "edgesync.io/owner";
/// Label on everything made for users.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "edgesync");

/// How users reach the cluster.
#[derive(Clone)]
pub struct Access {
    /// Client with the head's credentials.
    pub client: kube::Client,
    /// API server URL written into kubeconfigs.
    pub server: String,
    /// CA of the API server written into kubeconfigs (PEM), if any.
    pub ca_pem: Option<String>,
    /// Lifetime of the tokens handed out.
    pub token_ttl: Duration,
}

fn cluster_err(e: kube::Error) -> UserError {
    match e {
        kube::Error::Api(s) => UserError::Cluster(s.message),
        e => UserError::Cluster(e.to_string()),
    }
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
        ..ObjectMeta::default()
    }
}

/// Creates `object` unless it exists.
async fn ensure<K>(api: Api<K>, object: &K) -> Result<(), UserError>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(cluster_err(e)),
    }
}

impl Access {
    /// Makes sure user `username` (registration `uid`) can work in their namespace and returns
    /// a kubeconfig for it. A namespace of that name that was not made for this registration is
    /// refused.
    pub async fn grant(&self, username: &str, uid: &str) -> Result<String, UserError> {
        let ns = username;
        let client = &self.client;
        let namespaces = Api::<Namespace>::all(client.clone());
        let mut namespace = Namespace {
            metadata: meta(ns, None),
            ..Namespace::default()
        };
        namespace.metadata.annotations = Some([(OWNER.to_string(), uid.to_string())].into());
        ensure(namespaces.clone(), &namespace).await?;
        let existing = namespaces.get(ns).await.map_err(cluster_err)?;
        let owner = existing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(OWNER));
        if owner.map(String::as_str) != Some(uid) {
            return Err(UserError::Forbidden(format!(
                "namespace {ns} exists and was not made for this user; ask an administrator"
            )));
        }
        let accounts = Api::<ServiceAccount>::namespaced(client.clone(), ns);
        let account = ServiceAccount {
            metadata: meta(USER_OBJECT, Some(ns)),
            ..ServiceAccount::default()
        };
        ensure(accounts.clone(), &account).await?;
        let binding = RoleBinding {
            metadata: meta(USER_OBJECT, Some(ns)),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: "edit".into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: USER_OBJECT.into(),
                namespace: Some(ns.to_string()),
                ..Subject::default()
            }]),
        };
        ensure(Api::<RoleBinding>::namespaced(client.clone(), ns), &binding).await?;
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(self.token_ttl.as_secs() as i64),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let issued = accounts
            .create_token_request(USER_OBJECT, &PostParams::default(), &request)
            .await
            .map_err(cluster_err)?;
        let token = issued
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| UserError::Cluster("TokenRequest returned no token".into()))?;
        Ok(self.kubeconfig(username, &token))
    }

    /// Removes `username`'s RoleBinding, so their tokens no longer work.
    pub async fn withdraw(&self, username: &str) -> Result<(), UserError> {
        let bindings = Api::<RoleBinding>::namespaced(self.client.clone(), username);
        match bindings.delete(USER_OBJECT, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(cluster_err(e)),
        }
    }

    fn kubeconfig(&self, username: &str, token: &str) -> String {
        use base64::Engine;
        let mut cluster = json!({"server": self.server});
        if let Some(ca) = &self.ca_pem {
            cluster["certificate-authority-data"] =
                json!(base64::engine::general_purpose::STANDARD.encode(ca));
        }
        let context = format!("{username}@edgesync");
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "edgesync", "cluster": cluster}],
            "users": [{"name": username, "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": "edgesync", "user": username, "namespace": username}}],
            "current-context": context,
        });
        serde_saphyr::to_string(&config).unwrap_or_default()
    }
}
