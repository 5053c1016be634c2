//! EdgeNode files from users: parse YAML/JSON, refuse anything invalid, normalise pods.

use crate::crd::{API_VERSION, LEGACY_API_VERSION};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

mod limits;
pub mod policy;
pub use limits::{
    MAX_ANCHORS, MAX_DEPTH, MAX_DOCUMENTS, MAX_EDGENODE_BYTES, MAX_FILE_NAME, MAX_HISTORY_BYTES,
    MAX_INPUT_BYTES, MAX_NODES, MAX_PODS, check_budget, check_manifest_name, clip,
    manifest_file_name, show,
};
use limits::{json_len, show_json};

/// A refused input: which object, which field, and why. Displays as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {reason}")]
pub struct InvalidInput {
    /// `EdgeNode default/edge01`, or `document 2` when the object has no name yet.
    pub object: String,
    /// JSON path of the field, e.g. `spec.pods[0].metadata.name`.
    pub field: String,
    /// What is wrong, and what to do about it.
    pub reason: String,
}

/// An EdgeNode as edgesync stores it: identity plus pods keyed by name, each normalised JSON.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DesiredNode {
    /// Namespace of the EdgeNode (and of every pod in it).
    pub namespace: String,
    /// Name of the EdgeNode, which is the edge node's name.
    pub name: String,
    /// Labels from the input's metadata.
    pub labels: BTreeMap<String, String>,
    /// Pods by name; each a v1 Pod object without namespace or status.
    pub pods: BTreeMap<String, Value>,
}

/// How to validate: the namespace to use when a document names none, and whether
/// pods outside the Pod Security baseline are allowed (per namespace).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Namespace for documents without `metadata.namespace`.
    pub default_namespace: String,
    /// Namespaces where pods may break the baseline profile.
    pub privileged_namespaces: Vec<String>,
}

impl Rules {
    /// Rules with the given default namespace and no privileged namespaces.
    pub fn new(default_namespace: &str) -> Self {
        Rules {
            default_namespace: default_namespace.to_string(),
            privileged_namespaces: Vec::new(),
        }
    }
}

/// Parses every EdgeNode in a YAML or JSON text (several documents, or a `List`).
/// All or nothing: the first invalid field refuses the whole text. The text is bounded before
/// it is parsed ([`MAX_INPUT_BYTES`]) and while it is parsed (nodes, depth, aliases,
/// documents), so a hostile text costs little memory or time.
pub fn parse_edgenodes(text: &str, rules: &Rules) -> Result<Vec<DesiredNode>, InvalidInput> {
    let objects = parse_objects(text)?;
    // Grown as objects pass, not sized for the text: most of a hostile one's fail at once.
    let mut nodes: Vec<DesiredNode> = Vec::new();
    let mut keys = std::collections::HashSet::new();
    for (label, object) in &objects {
        let node = parse_edgenode(object, label, rules)?;
        let key = node.key();
        if keys.contains(&key) {
            return Err(invalid(
                &format!("EdgeNode {key}"),
                "metadata.name",
                "appears twice in the input",
            ));
        }
        keys.insert(key);
        nodes.push(node);
    }
    Ok(nodes)
}

/// The namespace and name of every EdgeNode in a YAML or JSON text (`delete -f`): only its
/// kind and name are read, so an EdgeNode whose spec would be refused can still be named.
pub fn edgenode_names(
    text: &str,
    default_namespace: &str,
) -> Result<Vec<(String, String)>, InvalidInput> {
    let mut names = Vec::new();
    for (label, object) in parse_objects(text)? {
        if object.get("kind").and_then(Value::as_str) != Some("EdgeNode") {
            return Err(invalid(&label, "kind", "not an EdgeNode"));
        }
        let meta = &object["metadata"];
        let name = meta["name"].as_str().unwrap_or_default();
        check_subdomain(name).map_err(|e| invalid(&label, "metadata.name", &e.to_string()))?;
        let namespace = meta["namespace"].as_str().unwrap_or(default_namespace);
        check_label(namespace)
            .map_err(|e| invalid(&label, "metadata.namespace", &e.to_string()))?;
        names.push((namespace.to_string(), name.to_string()));
    }
    Ok(names)
}

/// The documents of a YAML or JSON text, after the size and structure budgets. JSON objects
/// one per `---` (what the CLI sends) are read without the YAML parser.
fn parse_documents(text: &str) -> Result<Vec<Value>, InvalidInput> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(invalid(
            "input",
            "(size)",
            &format!(
                "{} bytes, more than the {MAX_INPUT_BYTES} one apply takes; split it into several files",
                text.len()
            ),
        ));
    }
    if let Some(docs) = limits::json_documents(text) {
        return Ok(docs);
    }
    check_budget(text)?;
    serde_saphyr::from_multiple_with_options(text, parse_options()).map_err(|e| {
        invalid(
            "input",
            "(syntax)",
            &format!("not valid YAML or JSON: {}", one_line(&e.to_string())),
        )
    })
}

/// `text` as the CLI sends it to a head: each of its documents as compact JSON, one per `---`,
/// which the head reads without a YAML parser (as kubectl sends JSON to an API server).
/// Refused here as the head would refuse it.
pub fn for_the_wire(text: &str) -> Result<String, InvalidInput> {
    let docs = parse_documents(text)?;
    let docs: Vec<String> = docs.iter().map(Value::to_string).collect();
    Ok(docs.join("\n---\n"))
}

/// The objects of a YAML or JSON text (the items of a `List` each on its own), labelled
/// `document N` (`item M`), after the size and structure budgets.
fn parse_objects(text: &str) -> Result<Vec<(String, Value)>, InvalidInput> {
    let docs = parse_documents(text)?;
    let mut objects = Vec::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        let label = format!("document {}", i + 1);
        if doc.get("kind").and_then(Value::as_str) == Some("List") {
            let Some(Value::Array(items)) = doc.get_mut("items").map(Value::take) else {
                return Err(invalid(&label, "items", "a List needs an items array"));
            };
            for (j, item) in items.into_iter().enumerate() {
                objects.push((format!("{label} item {}", j + 1), item));
            }
        } else {
            objects.push((label, doc));
        }
    }
    if objects.is_empty() {
        return Err(invalid("input", "(document)", "no EdgeNode found"));
    }
    Ok(objects)
}

/// Deserializing a text that passed [`check_budget`]: the parser's own budgets are looser, and
/// no snippet of the input is quoted in errors.
fn parse_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            // Counted exactly by check_budget instead.
            enforce_alias_anchor_ratio: false,
        },
        emit_comments: false,
        with_snippet: false,
    }
}

/// Validates one EdgeNode object given as JSON.
pub fn parse_edgenode(
    object: &Value,
    label: &str,
    rules: &Rules,
) -> Result<DesiredNode, InvalidInput> {
    let Some(map) = object.as_object() else {
        return Err(invalid(
            label,
            "(document)",
            "must be a mapping with apiVersion, kind, metadata and spec",
        ));
    };
    for key in map.keys() {
        if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()) {
            return Err(invalid(label, key, "unknown field"));
        }
    }
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION | LEGACY_API_VERSION) => {}
        Some(other) => {
            return Err(invalid(
                label,
                "apiVersion",
                &format!("{} is not supported; use {API_VERSION}", show(other)),
            ));
        }
        None => {
            return Err(invalid(
                label,
                "apiVersion",
                &format!("missing; use {API_VERSION}"),
            ));
        }
    }
    match map.get("kind") {
        Some(kind) if kind == "EdgeNode" => {}
        Some(other) => {
            return Err(invalid(
                label,
                "kind",
                &format!("{} is not EdgeNode", show_json(other)),
            ));
        }
        None => return Err(invalid(label, "kind", "missing; use EdgeNode")),
    }
    let metadata = map.get("metadata").and_then(Value::as_object);
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(label, "metadata.name", "missing"))?;
    check_subdomain(name).map_err(|r| invalid(label, "metadata.name", &r.to_string()))?;
    let namespace = match metadata.and_then(|m| m.get("namespace")) {
        None | Some(Value::Null) => rules.default_namespace.as_str(),
        Some(Value::String(ns)) => ns.as_str(),
        Some(_) => return Err(invalid(label, "metadata.namespace", "must be a string")),
    };
    let object_name = format!("EdgeNode {namespace}/{name}");
    check_label(namespace)
        .map_err(|r| invalid(&object_name, "metadata.namespace", &r.to_string()))?;
    let labels = match metadata.and_then(|m| m.get("labels")) {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            invalid(
                &object_name,
                "metadata.labels",
                "must map strings to strings",
            )
        })?,
    };

    let empty = Map::new();
    let spec = match map.get("spec") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(spec)) => spec,
        Some(_) => return Err(invalid(&object_name, "spec", "must be a mapping")),
    };
    if let Some(key) = spec.keys().find(|k| k.as_str() != "pods") {
        return Err(invalid(
            &object_name,
            &format!("spec.{key}"),
            "unknown field",
        ));
    }
    let pods: &[Value] = match spec.get("pods") {
        None | Some(Value::Null) => &[],
        Some(Value::Array(pods)) => pods,
        Some(_) => return Err(invalid(&object_name, "spec.pods", "must be a list of pods")),
    };
    if pods.len() > MAX_PODS {
        return Err(invalid(
            &object_name,
            "spec.pods",
            &format!(
                "{} pods, more than the {MAX_PODS} an EdgeNode holds; put the others in an EdgeNode of the same name in another namespace",
                pods.len()
            ),
        ));
    }
    let size = json_len(spec);
    if size > MAX_EDGENODE_BYTES {
        return Err(invalid(
            &object_name,
            "spec",
            &format!(
                "{size} bytes as JSON, more than the {MAX_EDGENODE_BYTES} an EdgeNode holds; put some pods in an EdgeNode of the same name in another namespace"
            ),
        ));
    }
    let privileged = rules.privileged_namespaces.iter().any(|n| n == namespace);
    let mut by_name = BTreeMap::new();
    for (i, pod) in pods.iter().enumerate() {
        let path = format!("spec.pods[{i}]");
        let (pod_name, pod) = normalise_pod(pod, name, privileged)
            .and_then(|(pod_name, pod)| {
                check_manifest_name(namespace, &pod_name)
                    .map_err(|r| (".metadata.name".to_string(), r.to_string()))?;
                Ok((pod_name, pod))
            })
            .map_err(|(field, reason)| invalid(&object_name, &format!("{path}{field}"), &reason))?;
        if by_name.insert(pod_name.clone(), pod).is_some() {
            return Err(invalid(
                &object_name,
                &format!("{path}.metadata.name"),
                &format!("duplicate pod name {}", show(&pod_name)),
            ));
        }
    }
    Ok(DesiredNode {
        namespace: namespace.to_string(),
        name: name.to_string(),
        labels,
        pods: by_name,
    })
}

/// Checks one pod and returns its name and normalised JSON (typed round trip, no namespace,
/// no status). Errors carry the field path below the pod (starting with `.`) and the reason.
pub fn normalise_pod(
    pod: &Value,
    node: &str,
    privileged: bool,
) -> Result<(String, Value), (String, String)> {
    let err = |field: &str, reason: &str| (clip(field), reason.to_string());
    let Some(map) = pod.as_object() else {
        return Err(err("", "must be a Pod mapping"));
    };
    match map.get("apiVersion") {
        None => {}
        Some(v) if v == "v1" => {}
        Some(v) => return Err(err(".apiVersion", &format!("{} is not v1", show_json(v)))),
    }
    match map.get("kind") {
        None => {}
        Some(v) if v == "Pod" => {}
        Some(v) => return Err(err(".kind", &format!("{} is not Pod", show_json(v)))),
    }
    let mut input = pod.clone();
    if let Some(obj) = input.as_object_mut() {
        obj.remove("status");
        obj.insert("apiVersion".into(), "v1".into());
        obj.insert("kind".into(), "Pod".into());
    }
    let typed: Pod = serde_path_to_error::deserialize(&input).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            String::new()
        } else {
            format!(".{path}")
        };
        err(&field, &one_line(&e.inner().to_string()))
    })?;
    let mut normal = serde_json::to_value(&typed).map_err(|e| err("", &e.to_string()))?;
    if let Some(field) = unknown_field(&input, &normal, "") {
        return Err(err(&field, "unknown field"));
    }
    let name = typed
        .metadata
        .name
        .clone()
        .ok_or_else(|| err(".metadata.name", "missing"))?;
    check_subdomain(&name).map_err(|r| err(".metadata.name", &r.to_string()))?;
    if name.len() + 1 + node.len() > 253 {
        return Err(err(
            ".metadata.name",
            "too long: the mirror pod name <pod>-<node> must fit in 253 characters",
        ));
    }
    let spec = typed.spec.as_ref().ok_or_else(|| err(".spec", "missing"))?;
    if spec.containers.is_empty() {
        return Err(err(
            ".spec.containers",
            "at least one container is required",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (format!(".spec.initContainers[{i}]"), c))
        .chain(
            spec.containers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!(".spec.containers[{i}]"), c)),
        );
    for (path, container) in all {
        check_label(&container.name).map_err(|r| err(&format!("{path}.name"), &r.to_string()))?;
        if !seen.insert(container.name.as_str()) {
            return Err(err(
                &format!("{path}.name"),
                &format!("duplicate container name {}", show(&container.name)),
            ));
        }
        if container.image.as_deref().is_none_or(str::is_empty) {
            return Err(err(&format!("{path}.image"), "an image is required"));
        }
    }
    if !privileged && let Some(v) = policy::baseline_violations(&typed).into_iter().next() {
        return Err((
            format!(".{}", v.field),
            format!(
                "{} (Pod Security baseline; allow it with policy.privileged_namespaces)",
                v.reason
            ),
        ));
    }
    if let Some(meta) = normal.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("namespace");
    }
    Ok((name, normal))
}

/// The first field of `input` that the typed round trip dropped, i.e. a field the type does not
/// know. Nulls count as absent.
pub fn unknown_field(input: &Value, normal: &Value, path: &str) -> Option<String> {
    match (input, normal) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            None if v.is_null() => None,
            None => Some(format!("{path}.{k}")),
            Some(w) => unknown_field(v, w, &format!("{path}.{k}")),
        }),
        (Value::Array(a), Value::Array(b)) => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| unknown_field(v, w, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// A name Kubernetes would refuse: not a DNS-1123 label or subdomain, or a pod name whose
/// manifest file name on the edge would be too long. Shows the name clipped ([`show`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a DNS-1123 label (namespaces, container names, usernames).
    #[error(
        "{} is not a valid DNS-1123 label (lowercase letters, digits and '-', at most 63)",
        show(.name)
    )]
    Label {
        /// The name refused.
        name: String,
    },
    /// Not a DNS-1123 subdomain (node, pod and host names).
    #[error(
        "{} is not a valid DNS-1123 name (lowercase letters, digits, '-' and '.', at most 253)",
        show(.name)
    )]
    Subdomain {
        /// The name refused.
        name: String,
    },
    /// The pod's static pod manifest would need a file name longer than a file system holds.
    #[error(
        "too long: its manifest file name on the edge would be {file_bytes} bytes, more than the \
         {MAX_FILE_NAME} a file name may have; in namespace {namespace:?} a pod name may have at \
         most {fits} characters"
    )]
    ManifestFileName {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        pod: String,
        /// Length of the file name it would have.
        file_bytes: usize,
        /// The longest pod name that fits in this namespace.
        fits: usize,
    },
}

/// Checks that `email` looks like an e-mail address: `local@domain.tld`, at most 254
/// characters, no spaces or control characters.
pub fn check_email(email: &str) -> Result<(), NotAnEmail> {
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NotAnEmail);
    }
    let (local, domain) = email.rsplit_once('@').ok_or(NotAnEmail)?;
    let labels_ok = domain
        .split('.')
        .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
    if local.is_empty() || local.contains('@') || !domain.contains('.') || !labels_ok {
        return Err(NotAnEmail);
    }
    Ok(())
}

/// What [`check_email`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("is not an e-mail address like name@example.org")]
pub struct NotAnEmail;

/// Checks a DNS-1123 label (namespaces, container names): lowercase alphanumerics and `-`,
/// starting and ending alphanumeric, at most 63 characters.
pub fn check_label(value: &str) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    match ok {
        true => Ok(()),
        false => Err(NameError::Label {
            name: value.to_string(),
        }),
    }
}

/// Checks a DNS-1123 subdomain (node and pod names): dot-separated labels, at most 253
/// characters. Such a name can never contain `/` or `..`.
pub fn check_subdomain(value: &str) -> Result<(), NameError> {
    let ok =
        !value.is_empty() && value.len() <= 253 && value.split('.').all(|l| check_label(l).is_ok());
    match ok {
        true => Ok(()),
        false => Err(NameError::Subdomain {
            name: value.to_string(),
        }),
    }
}

fn invalid(object: &str, field: &str, reason: &str) -> InvalidInput {
    InvalidInput {
        object: clip(object),
        field: clip(field),
        reason: reason.to_string(),
    }
}

/// Another library's message as one line, clipped (it may quote the input).
fn one_line(text: &str) -> String {
    clip(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../example/edge01.yaml");

    fn parse(text: &str) -> Result<Vec<DesiredNode>, InvalidInput> {
        parse_edgenodes(text, &Rules::new("default"))
    }

    fn refusal(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    pub(super) fn with_pods(pods: &str) -> String {
        format!(
            "apiVersion: edgesync.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: edge01\nspec:\n  pods:\n{pods}"
        )
    }

    #[test]
    fn legacy_example_parses() {
        let nodes = parse(EXAMPLE).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].key().as_str(), "default/edge01");
        let nginx = &nodes[0].pods["nginx"];
        assert_eq!(nginx["spec"]["containers"][0]["image"], "nginx");
        assert_eq!(nginx["kind"], "Pod");
    }

    #[test]
    fn several_documents_and_lists() {
        let text = format!(
            "{EXAMPLE}---\n{}",
            EXAMPLE.replace("namespace: default", "namespace: team-a")
        );
        assert_eq!(parse(&text).unwrap().len(), 2);
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [serde_saphyr::from_str::<Value>(EXAMPLE).unwrap()]});
        assert_eq!(parse(&list.to_string()).unwrap().len(), 1);
    }

    #[test]
    fn an_edgenode_named_twice_refuses_the_text() {
        let other = EXAMPLE.replace("namespace: default", "namespace: team-a");
        let text = format!("{EXAMPLE}---\n{other}---\n{EXAMPLE}");
        let refused = parse(&text).unwrap_err();
        assert_eq!(
            (refused.object.as_str(), refused.field.as_str()),
            ("EdgeNode default/edge01", "metadata.name")
        );
        assert!(refused.reason.contains("twice"), "{refused}");
    }

    #[test]
    fn what_the_cli_sends_reads_as_the_yaml_it_came_from() {
        let text = format!(
            "{EXAMPLE}---\n{}",
            EXAMPLE.replace("namespace: default", "namespace: team-a")
        );
        let wire = for_the_wire(&text).unwrap();
        assert!(limits::json_documents(&wire).is_some(), "{wire}");
        assert_eq!(parse_objects(&wire).unwrap(), parse_objects(&text).unwrap());
        // A refusal reads the same whichever form carries the text.
        let bad = with_pods("    - kind: Pod\n      metadata:\n        name: Web\n");
        let wire = for_the_wire(&bad).unwrap();
        assert!(limits::json_documents(&wire).is_some(), "{wire}");
        assert_eq!(refusal(&wire), refusal(&bad));
        // What the YAML path would refuse is left to it, to say why.
        assert_eq!(
            for_the_wire("kind: [").unwrap_err().to_string(),
            refusal("kind: [")
        );
        let duplicate =
            r#"{"apiVersion": "edgesync.io/v1alpha1", "kind": "EdgeNode", "kind": "x"}"#;
        assert!(limits::json_documents(duplicate).is_none());
        let deep = format!("{{\"a\": {}1{}}}", "[".repeat(60), "]".repeat(60));
        assert!(limits::json_documents(&deep).is_none());
        assert!(
            refusal(&deep).contains("nested deeper than 48 levels"),
            "{}",
            refusal(&deep)
        );
        let big = format!("{{\"a\": \"{}\"}}", "x".repeat(MAX_EDGENODE_BYTES + 1));
        assert!(limits::json_documents(&big).is_none());
    }

    #[test]
    fn refusals_name_object_and_field() {
        let cases = [
            ("kind: [", "input: (syntax)"),
            (
                "apiVersion: v1\nkind: EdgeNode\nmetadata: {name: a}\n",
                "document 1: apiVersion",
            ),
            (
                &EXAMPLE.replace("pods:", "podz:"),
                "EdgeNode default/edge01: spec.podz: unknown field",
            ),
            (
                &EXAMPLE.replace("image: nginx", "imagee: nginx"),
                "spec.pods[0].spec.containers[0].imagee: unknown field",
            ),
            (
                &EXAMPLE.replace("name: nginx\n      spec", "name: Nginx_1\n      spec"),
                "spec.pods[0].metadata.name",
            ),
            (
                &EXAMPLE.replace(
                    "name: nginx\n      spec",
                    "name: ../../etc/passwd\n      spec",
                ),
                "spec.pods[0].metadata.name",
            ),
            (
                &EXAMPLE.replace("name: edge01", "name: ../edge01"),
                "document 1: metadata.name",
            ),
            (
                &EXAMPLE.replace(
                    "imagePullPolicy: IfNotPresent",
                    "ports: [{containerPort: \"http\"}]",
                ),
                "spec.pods[0].spec.containers[0].ports[0].containerPort",
            ),
        ];
        for (text, expected) in cases {
            let message = refusal(text);
            assert!(
                message.contains(expected),
                "{message:?} should contain {expected:?}"
            );
            assert!(!message.contains('\n'), "one line: {message:?}");
        }
    }

    #[test]
    fn duplicate_pods_are_refused() {
        let pod =
            "    - metadata: {name: web}\n      spec: {containers: [{name: c, image: nginx}]}\n";
        let message = refusal(&with_pods(&format!("{pod}{pod}")));
        assert!(
            message.contains("spec.pods[1].metadata.name: duplicate pod name"),
            "{message}"
        );
    }

    #[test]
    fn baseline_is_enforced_unless_namespace_is_privileged() {
        let pod = "    - metadata: {name: web}\n      spec:\n        hostNetwork: true\n        containers: [{name: c, image: nginx}]\n";
        let message = refusal(&with_pods(pod));
        assert!(
            message.contains("spec.pods[0].spec.hostNetwork"),
            "{message}"
        );
        let rules = Rules {
            default_namespace: "default".into(),
            privileged_namespaces: vec!["default".into()],
        };
        assert!(parse_edgenodes(&with_pods(pod), &rules).is_ok());
    }

    #[test]
    fn oversized_inputs_are_refused_before_parsing() {
        let text = format!("{EXAMPLE}#{}", "x".repeat(MAX_INPUT_BYTES));
        let message = refusal(&text);
        assert!(
            message.starts_with("input: (size): ")
                && message.contains(&MAX_INPUT_BYTES.to_string()),
            "{message}"
        );
    }

    fn pods(count: usize, env: &str) -> String {
        (0..count)
            .map(|i| format!("    - metadata: {{name: p{i}}}\n      spec: {{containers: [{{name: c, image: nginx, env: [{{name: E, value: {env:?}}}]}}]}}\n"))
            .collect()
    }

    #[test]
    fn edgenodes_are_bounded_in_pods_and_bytes() {
        assert!(parse(&with_pods(&pods(MAX_PODS, "v"))).is_ok());
        let message = refusal(&with_pods(&pods(MAX_PODS + 1, "v")));
        assert!(
            message.starts_with("EdgeNode default/edge01: spec.pods: 111 pods, more than the 110"),
            "{message}"
        );
        let big = "v".repeat(MAX_EDGENODE_BYTES / 4);
        assert!(parse(&with_pods(&pods(3, &big))).is_ok());
        let message = refusal(&with_pods(&pods(4, &big)));
        assert!(
            message.starts_with("EdgeNode default/edge01: spec: ")
                && message.contains(&format!("more than the {MAX_EDGENODE_BYTES}")),
            "{message}"
        );
    }

    #[test]
    fn pod_names_whose_manifest_file_cannot_exist_are_refused() {
        let ns = "n".repeat(63);
        let text = |pod: &str| {
            with_pods(&format!(
                "    - metadata: {{name: {pod}}}\n      spec: {{containers: [{{name: c, image: nginx}}]}}\n"
            ))
            .replace("name: edge01", &format!("name: e\n  namespace: {ns}"))
        };
        // edgesync_<ns>_<pod>.json: 15 + 63 + 177 = 255 bytes.
        let longest = format!("{0}.{0}.{1}", "a".repeat(63), "b".repeat(49));
        assert_eq!(manifest_file_name(&ns, &longest).len(), MAX_FILE_NAME);
        assert!(parse(&text(&longest)).is_ok());
        let message = refusal(&text(&format!("{longest}b")));
        assert!(
            message.contains("spec.pods[0].metadata.name: too long")
                && message.contains("at most 177 characters"),
            "{message}"
        );
        assert!(!message.contains(&longest), "{message}");
    }

    #[test]
    fn refusals_never_echo_huge_values() {
        // Under the size limits, so each is refused for what it is.
        let huge = "a".repeat(300 << 10);
        let cases = [
            EXAMPLE.replace(
                "name: nginx\n      spec",
                &format!("name: {huge}\n      spec"),
            ),
            EXAMPLE.replace("name: edge01", &format!("name: {huge}")),
            // YAML keys have at most 1024 characters.
            EXAMPLE.replace("pods:", &format!("{}: 1\n  pods:", &huge[..1000])),
            EXAMPLE.replace(
                "image: nginx",
                &format!("image: nginx\n            ? {huge}\n            : 1"),
            ),
            EXAMPLE.replacen(
                EXAMPLE.lines().next().unwrap(),
                &format!("apiVersion: {huge}"),
                1,
            ),
            EXAMPLE.replace("kind: Pod", &format!("kind: {huge}")),
            EXAMPLE.replace("apiVersion: v1", &format!("apiVersion: [{huge}]")),
            EXAMPLE.replace(
                "imagePullPolicy: IfNotPresent",
                &format!("ports: [{{containerPort: {huge}}}]"),
            ),
        ];
        for text in cases {
            let message = refusal(&text);
            assert!(
                message.len() < 600,
                "{}",
                &message[..1000.min(message.len())]
            );
            assert!(message.contains("… ("), "{message}");
        }
        // A key is part of the field's path: its line breaks and escapes stay escaped.
        let message = refusal(&EXAMPLE.replace("pods:", "\"a\\nb\\e[31m\": 1\n  pods:"));
        assert!(
            message.ends_with("spec.a\\nb\\u{1b}[31m: unknown field"),
            "{message}"
        );
        assert_eq!(show("web"), "\"web\"");
        assert_eq!(
            show(&"é".repeat(100)),
            format!("{:?}… (200 bytes)", "é".repeat(64))
        );
    }

    #[test]
    fn pod_namespace_and_status_are_dropped() {
        let pod = "    - metadata: {name: web, namespace: kube-system}\n      spec: {containers: [{name: c, image: nginx}]}\n      status: {phase: Running}\n";
        let nodes = parse(&with_pods(pod)).unwrap();
        let web = &nodes[0].pods["web"];
        assert!(web["metadata"].get("namespace").is_none());
        assert!(web.get("status").is_none());
    }

    #[test]
    fn refused_names_read_as_users_know_them() {
        assert_eq!(
            check_label("Edge").unwrap_err().to_string(),
            "\"Edge\" is not a valid DNS-1123 label (lowercase letters, digits and '-', at most 63)"
        );
        assert_eq!(
            check_subdomain("a..b").unwrap_err().to_string(),
            "\"a..b\" is not a valid DNS-1123 name (lowercase letters, digits, '-' and '.', at most 253)"
        );
        let long = "p".repeat(250);
        assert_eq!(
            check_manifest_name("default", &long)
                .unwrap_err()
                .to_string(),
            "too long: its manifest file name on the edge would be 272 bytes, more than the 255 a \
             file name may have; in namespace \"default\" a pod name may have at most 233 characters"
        );
        assert!(check_manifest_name("default", &"p".repeat(233)).is_ok());
    }
}
