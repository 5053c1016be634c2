//! Every manifest in deploy/ parses as the Kubernetes type it claims, with no unknown field,
//! and the kustomization lists every one of them.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::Path;

fn check<T: DeserializeOwned + serde::Serialize>(file: &str, doc: &Value) {
    let typed: T = serde_path_to_error::deserialize(doc)
        .unwrap_or_else(|e| panic!("{file}: {}: {}", e.path(), e.inner()));
    let round = serde_json::to_value(&typed).unwrap();
    if let Some(field) = edgesync::input::unknown_field(doc, &round, "") {
        panic!("{file}: unknown field {field}");
    }
}

#[test]
fn every_deploy_manifest_is_the_type_it_claims() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut kinds = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!docs.is_empty(), "{file} is empty");
        for doc in &docs {
            let api = doc["apiVersion"].as_str().unwrap_or_default();
            let kind = doc["kind"].as_str().unwrap_or_default();
            match (api, kind) {
                ("v1", "Namespace") => check::<Namespace>(file, doc),
                ("v1", "ServiceAccount") => check::<ServiceAccount>(file, doc),
                ("v1", "Service") => check::<Service>(file, doc),
                ("apps/v1", "Deployment") => check::<Deployment>(file, doc),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => check::<ClusterRole>(file, doc),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    check::<ClusterRoleBinding>(file, doc)
                }
                ("rbac.authorization.k8s.io/v1", "Role") => check::<Role>(file, doc),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => check::<RoleBinding>(file, doc),
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    check::<CustomResourceDefinition>(file, doc)
                }
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                    let listed: Vec<&str> = doc["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap())
                        .collect();
                    let others: Vec<&str> = files
                        .iter()
                        .map(String::as_str)
                        .filter(|f| *f != file.as_str())
                        .collect();
                    let mut sorted = listed.clone();
                    sorted.sort();
                    assert_eq!(
                        sorted, others,
                        "kustomization.yaml must list every manifest"
                    );
                }
                other => panic!("{file}: no check for {other:?}"),
            }
            kinds.push(kind.to_string());
        }
    }
    for needed in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "Deployment",
        "Service",
        "Kustomization",
    ] {
        assert!(kinds.iter().any(|k| k == needed), "deploy/ has no {needed}");
    }
    let deployment: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("head.yaml")).unwrap()).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
}
