//! A Kubernetes API server emulator for tests: real HTTP/1.1 on 127.0.0.1, JSON only, all state
//! in memory, so the real `kube` client and kube-runtime's watcher work against it unmodified.
//!
//! [`KubeApi::start`] serves the resources of `RESOURCE_TABLE` under the usual paths
//! (`/api/v1/...`, `/apis/{group}/{version}/...`) with discovery, `/version`, create, get, list,
//! watch (history replay, bookmarks, timeouts, 410 Gone after [`KubeApi::compact`]), replace,
//! merge / strategic (as merge) / JSON / server-side-apply patches, delete with finalizers,
//! status subresources, label and field selectors, optimistic concurrency on
//! `metadata.resourceVersion`, and ServiceAccount tokens from the TokenRequest subresource,
//! authorised by RoleBindings to the ClusterRoles `edit` or `admin`. A client connects with
//! `cluster_url` [`KubeApi::url`] and bearer token [`KubeApi::admin_token`], or through the file
//! of [`KubeApi::write_kubeconfig`]; no TLS is involved.
//!
//! Deliberate simplifications: `limit`/`continue` are ignored (lists are never paged); apply
//! patches are merged without field ownership (no managedFields, never an apply conflict);
//! strategic merge patches are treated as JSON merge patches; bodies must be JSON; `dryRun` is
//! refused (400); deleting a namespace removes its contents at once, whatever their finalizers;
//! there is no garbage collection by ownerReferences.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

/// Largest accepted request body.
const MAX_BODY: usize = 3 * 1024 * 1024;
/// How often an open watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);
/// Watch events kept for resuming watches; older ones are forgotten (410 Gone).
const HISTORY_LIMIT: usize = 10_000;
/// Events a watch may have queued before it is closed as too slow.
const WATCH_BUFFER: usize = 1024;
/// Namespaces that exist from the start.
const INITIAL_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

// ---------------------------------------------------------------------------------------------
// Resource table
// ---------------------------------------------------------------------------------------------

/// The served resources, one per line: apiVersion, kind, plural, scope, whether there is a
/// `/status` subresource, short names, and the field-selector keys supported besides
/// `metadata.name` and `metadata.namespace` ("-" for none).
const RESOURCE_TABLE: &str = "
v1                                 Namespace          namespaces          cluster    -      ns  status.phase
v1                                 Node               nodes               cluster    status no  spec.unschedulable
v1                                 Pod                pods                namespaced status po  spec.nodeName,spec.restartPolicy,spec.schedulerName,spec.serviceAccountName,spec.hostNetwork,status.phase,status.podIP,status.nominatedNodeName
v1                                 Secret             secrets             namespaced -      -   type
v1                                 ServiceAccount     serviceaccounts     namespaced -      sa  -
v1                                 Service            services            namespaced status svc -
v1                                 Endpoints          endpoints           namespaced -      ep  -
v1                                 ConfigMap          configmaps          namespaced -      cm  -
coordination.k8s.io/v1             Lease              leases              namespaced -      -   -
rbac.authorization.k8s.io/v1       Role               roles               namespaced -      -   -
rbac.authorization.k8s.io/v1       RoleBinding        rolebindings        namespaced -      -   -
rbac.authorization.k8s.io/v1       ClusterRole        clusterroles        cluster    -      -   -
rbac.authorization.k8s.io/v1       ClusterRoleBinding clusterrolebindings cluster    -      -   -
edgesync.io/v1alpha1               EdgeNode           edgenodes           namespaced status en  -
edgesync.io/v1alpha1               Edge               edges               cluster    status eg  -
edgesync.io/v1alpha1               User               users               cluster    status eu  -
edgesync.io/v1alpha1      AcceptableUsePolicy acceptableusepolicies     cluster    -      aup -
events.k8s.io/v1                   Event              events              namespaced -      ev  regarding.kind,regarding.namespace,regarding.name,regarding.uid,regarding.apiVersion,regarding.resourceVersion,regarding.fieldPath,reason,reportingController,type
apiextensions.k8s.io/v1   CustomResourceDefinition customresourcedefinitions cluster -      crd,crds -
";

/// One served resource type (a row of [`RESOURCE_TABLE`]).
struct Resource {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    /// Has a `/status` subresource (status is then written only through it).
    status: bool,
    short_names: Vec<&'static str>,
    /// Field selector keys besides `metadata.name` and `metadata.namespace`.
    fields: Vec<&'static str>,
}

impl Resource {
    fn parse(row: &'static str) -> Resource {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let [api_version, kind, plural, scope, status, short, fields] = cols[..] else {
            panic!("bad resource table row {row:?}");
        };
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let list = |col: &'static str| col.split(',').filter(|s| *s != "-").collect();
        Resource {
            group,
            version,
            kind,
            plural,
            namespaced: scope == "namespaced",
            status: status == "status",
            short_names: list(short),
            fields: list(fields),
        }
    }
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// `plural` or `plural.group`, as in API error messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

fn resources() -> &'static [Resource] {
    static PARSED: OnceLock<Vec<Resource>> = OnceLock::new();
    PARSED.get_or_init(|| {
        let rows = RESOURCE_TABLE.lines().filter(|l| !l.trim().is_empty());
        rows.map(Resource::parse).collect()
    })
}

fn find_resource(group: &str, version: &str, plural: &str) -> Option<usize> {
    resources()
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

fn find_kind(api_version: &str, kind: &str) -> Option<usize> {
    resources()
        .iter()
        .position(|r| r.api_version() == api_version && r.kind == kind)
}

/// Index of a resource the emulator itself relies on (always in the table).
fn builtin(group: &str, plural: &str) -> usize {
    resources()
        .iter()
        .position(|r| r.group == group && r.plural == plural)
        .expect("built-in resource missing from the resource table")
}

// ---------------------------------------------------------------------------------------------
// Errors (metav1.Status)
// ---------------------------------------------------------------------------------------------

/// An API error, answered as a `Status` object with the matching HTTP status.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
    fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }
    fn about(mut self, r: &Resource, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": r.group, "kind": r.plural}));
        self
    }
    fn not_found(r: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        )
        .about(r, name)
    }
    fn already_exists(r: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", r.qualified()),
        )
        .about(r, name)
    }
    fn conflict(r: &Resource, name: &str) -> Self {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            r.qualified()
        );
        Self::new(409, "Conflict", message).about(r, name)
    }
    fn invalid(r: &Resource, name: &str, message: &str) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {message}", r.kind),
        )
        .about(r, name)
    }
    fn expired(message: String) -> Self {
        Self::new(410, "Expired", message)
    }
    fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.to_status())
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Small helpers: randomness, time, object metadata
// ---------------------------------------------------------------------------------------------

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

fn random_token() -> String {
    format!(
        "{:016x}{:016x}{:016x}",
        random_u64(),
        random_u64(),
        random_u64()
    )
}

fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// Five characters from the alphabet the real server uses for `generateName`.
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize];
            n /= ALPHABET.len() as u64;
            c as char
        })
        .collect()
}

/// RFC 3339 timestamp in UTC with second precision, like `metav1.Time`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The map of a JSON object, turning any other value into an empty object first.
fn obj_mut(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    match value {
        Value::Object(map) => map,
        _ => unreachable!("value was just made an object"),
    }
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    obj_mut(obj_mut(obj).entry("metadata").or_insert(Value::Null))
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn is_deleting(obj: &Value) -> bool {
    meta_str(obj, "deletionTimestamp").is_some()
}

fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// Everything that counts for `metadata.generation`: all but metadata, status and type.
fn spec_part(obj: &Value) -> Map<String, Value> {
    let mut map = obj.as_object().cloned().unwrap_or_default();
    for key in ["metadata", "status", "apiVersion", "kind"] {
        map.remove(key);
    }
    map
}

fn set_type(obj: &mut Value, r: &Resource) {
    let map = obj_mut(obj);
    map.insert("apiVersion".into(), r.api_version().into());
    map.insert("kind".into(), r.kind.into());
}

/// Rejects a body whose apiVersion or kind (when given) is not the resource's.
fn check_type(r: &Resource, obj: &Value) -> Result<(), ApiError> {
    let av = obj.get("apiVersion").and_then(Value::as_str);
    let kind = obj.get("kind").and_then(Value::as_str);
    if av.is_some_and(|v| v != r.api_version()) || kind.is_some_and(|k| k != r.kind) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version ({}/{})",
            av.unwrap_or_default(),
            r.api_version(),
            r.kind
        )));
    }
    Ok(())
}

/// Fields the server fills in on create, where the body left them out.
fn server_defaults(r: &Resource, obj: &mut Value) {
    let map = obj_mut(obj);
    if map.contains_key("status") {
        return;
    }
    match (r.group, r.plural) {
        ("", "namespaces") => {
            map.insert("status".into(), json!({"phase": "Active"}));
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let names = map
                .get("spec")
                .and_then(|s| s.get("names"))
                .cloned()
                .unwrap_or(json!({}));
            let now = rfc3339(SystemTime::now());
            let condition = |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": now, "reason": kind});
            map.insert(
                "status".into(),
                json!({"acceptedNames": names, "conditions": [condition("NamesAccepted"), condition("Established")]}),
            );
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Patches
// ---------------------------------------------------------------------------------------------

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    let target = obj_mut(target);
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// RFC 6902 JSON patch (add, remove, replace, move, copy, test).
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let field = |name: &str| {
            op.get(name)
                .ok_or(format!("operation is missing \"{name}\": {op}"))
        };
        let path = field("path")?.as_str().ok_or("\"path\" must be a string")?;
        match op.get("op").and_then(Value::as_str) {
            Some("add") => pointer_add(doc, path, field("value")?.clone())?,
            Some("remove") => drop(pointer_remove(doc, path)?),
            Some("replace") => {
                if !path.is_empty() {
                    pointer_remove(doc, path)?;
                }
                pointer_add(doc, path, field("value")?.clone())?;
            }
            Some("move") => {
                let from = field("from")?.as_str().ok_or("\"from\" must be a string")?;
                let value = pointer_remove(doc, from)?;
                pointer_add(doc, path, value)?;
            }
            Some("copy") => {
                let from = field("from")?.as_str().ok_or("\"from\" must be a string")?;
                let value = doc
                    .pointer(from)
                    .cloned()
                    .ok_or(format!("path {from} does not exist"))?;
                pointer_add(doc, path, value)?;
            }
            // As the API server's JSON patch library does, a missing member tests equal to null
            // (kube-runtime's finalizer helper relies on it).
            Some("test") => {
                let value = field("value")?;
                if doc.pointer(path).unwrap_or(&Value::Null) != value {
                    return Err(format!("test operation failed at {path}"));
                }
            }
            other => return Err(format!("unsupported JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

/// Splits a JSON pointer into its parent pointer and its (unescaped) last token.
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let at = path
        .rfind('/')
        .ok_or(format!("invalid JSON pointer {path:?}"))?;
    Ok((
        &path[..at],
        path[at + 1..].replace("~1", "/").replace("~0", "~"),
    ))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(last, value);
        }
        Some(Value::Array(items)) => {
            let at = if last == "-" {
                Some(items.len())
            } else {
                last.parse().ok().filter(|i| *i <= items.len())
            };
            items.insert(at.ok_or(format!("invalid array index in {path}"))?, value);
        }
        _ => return Err(format!("path {parent:?} does not exist")),
    }
    Ok(())
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let removed = match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&last),
        Some(Value::Array(items)) => match last.parse::<usize>() {
            Ok(i) if i < items.len() => Some(items.remove(i)),
            _ => None,
        },
        _ => None,
    };
    removed.ok_or(format!("path {path:?} does not exist"))
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelReq {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        match self {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        }
    }
}

/// Splits at commas outside parentheses.
fn split_terms(selector: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_selector(selector: &str) -> Result<Vec<LabelReq>, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "unable to parse requirement: invalid label selector {selector:?}"
        ))
    };
    let key = |k: &str| {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) {
            Err(bad())
        } else {
            Ok(k.to_string())
        }
    };
    let mut reqs = Vec::new();
    for term in split_terms(selector) {
        let req = if let Some((head, rest)) = term.split_once('(') {
            let values = rest
                .strip_suffix(')')
                .ok_or_else(bad)?
                .split(',')
                .map(|v| v.trim().to_string());
            let mut words = head.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(k), Some("in"), None) => LabelReq::In(key(k)?, values.collect()),
                (Some(k), Some("notin"), None) => LabelReq::NotIn(key(k)?, values.collect()),
                _ => return Err(bad()),
            }
        } else if let Some(k) = term.strip_prefix('!') {
            LabelReq::NotExists(key(k)?)
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelReq::NotEq(key(k)?, v.trim().to_string())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelReq::Eq(key(k)?, v.trim().to_string())
        } else {
            LabelReq::Exists(key(term)?)
        };
        reqs.push(req);
    }
    Ok(reqs)
}

struct FieldReq {
    path: String,
    value: String,
    equal: bool,
}

fn parse_field_selector(r: &Resource, selector: &str) -> Result<Vec<FieldReq>, ApiError> {
    let mut reqs = Vec::new();
    for term in split_terms(selector) {
        let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (p, v, true)
        } else {
            return Err(ApiError::bad_request(format!(
                "invalid field selector: {term:?}"
            )));
        };
        let path = path.trim();
        if !matches!(path, "metadata.name" | "metadata.namespace") && !r.fields.contains(&path) {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {path}"
            )));
        }
        reqs.push(FieldReq {
            path: path.to_string(),
            value: value.trim().to_string(),
            equal,
        });
    }
    Ok(reqs)
}

fn field_value(obj: &Value, path: &str) -> String {
    let mut at = obj;
    for part in path.split('.') {
        match at.get(part) {
            Some(next) => at = next,
            None => return String::new(),
        }
    }
    match at {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Which objects a list or watch covers.
struct Filter {
    res: usize,
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn from_query(
        res: usize,
        namespace: Option<String>,
        query: &HashMap<String, String>,
    ) -> Result<Self, ApiError> {
        let labels = parse_label_selector(query.get("labelSelector").map_or("", String::as_str))?;
        let fields = parse_field_selector(
            &resources()[res],
            query.get("fieldSelector").map_or("", String::as_str),
        )?;
        Ok(Filter {
            res,
            namespace,
            labels,
            fields,
        })
    }
    fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta_str(obj, "namespace") == Some(ns))
            && self.labels.iter().all(|req| req.matches(labels))
            && self
                .fields
                .iter()
                .all(|req| (field_value(obj, &req.path) == req.value) == req.equal)
    }
}

// ---------------------------------------------------------------------------------------------
// Store, events and watchers
// ---------------------------------------------------------------------------------------------

/// (resource index, namespace or "" when cluster-scoped, name).
type Key = (usize, String, String);

#[derive(Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

struct Event {
    rv: u64,
    res: usize,
    kind: EventType,
    object: Value,
    /// The object before a modification, to turn it into ADDED/DELETED for selector watches.
    old: Option<Value>,
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

impl Event {
    fn line_for(&self, filter: &Filter) -> Option<Bytes> {
        if self.res != filter.res {
            return None;
        }
        let now = filter.matches(&self.object);
        let kind = match self.kind {
            EventType::Added if now => "ADDED",
            EventType::Deleted if now => "DELETED",
            EventType::Modified => {
                match (self.old.as_ref().is_some_and(|o| filter.matches(o)), now) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return None,
                }
            }
            _ => return None,
        };
        Some(watch_line(kind, &self.object))
    }
}

/// What goes down a watch stream.
enum Chunk {
    Data(Bytes),
    /// Abort the connection mid-stream.
    Cut,
}

struct Watcher {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<Chunk>,
}

struct IssuedToken {
    namespace: String,
    name: String,
    expires: SystemTime,
}

enum Caller {
    Admin,
    ServiceAccount { namespace: String, name: String },
}

#[derive(Default)]
struct Store {
    /// Last resourceVersion handed out.
    rv: u64,
    /// Watches and exact lists from a resourceVersion below this get 410 Gone.
    expired_before: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    watchers: Vec<Watcher>,
    next_watch: u64,
    tokens: HashMap<String, IssuedToken>,
    writes: BTreeMap<String, u64>,
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, res: usize, kind: EventType, object: &Value, old: Option<&Value>) {
        let event = Event {
            rv: self.rv,
            res,
            kind,
            object: object.clone(),
            old: old.cloned(),
        };
        self.watchers.retain(|w| match event.line_for(&w.filter) {
            Some(line) => w.tx.try_send(Chunk::Data(line)).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.history.push_back(event);
        if self.history.len() > HISTORY_LIMIT
            && let Some(dropped) = self.history.pop_front()
        {
            self.expired_before = self.expired_before.max(dropped.rv);
        }
    }

    /// Stores a new object, filling in the server-managed metadata.
    fn insert_new(&mut self, key: Key, mut obj: Value) -> Value {
        let r = &resources()[key.0];
        let rv = self.next_rv();
        set_type(&mut obj, r);
        server_defaults(r, &mut obj);
        let meta = meta_mut(&mut obj);
        meta.insert("name".into(), key.2.clone().into());
        if r.namespaced {
            meta.insert("namespace".into(), key.1.clone().into());
        } else {
            meta.remove("namespace");
        }
        meta.entry("uid").or_insert_with(|| new_uid().into());
        meta.entry("creationTimestamp")
            .or_insert_with(|| rfc3339(SystemTime::now()).into());
        meta.insert("resourceVersion".into(), rv.to_string().into());
        meta.insert("generation".into(), 1.into());
        self.objects.insert(key.clone(), obj.clone());
        self.emit(key.0, EventType::Added, &obj, None);
        obj
    }

    /// Writes a new version of a stored object: bumps generation when its spec changed, skips
    /// no-op writes, and removes it when it is being deleted and has no finalizers left.
    fn replace(&mut self, key: &Key, mut new: Value) -> Value {
        let Some(old) = self.objects.get(key).cloned() else {
            return self.insert_new(key.clone(), new);
        };
        set_type(&mut new, &resources()[key.0]);
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            + i64::from(spec_part(&old) != spec_part(&new));
        let meta = meta_mut(&mut new);
        meta.insert("generation".into(), generation.into());
        meta.insert(
            "resourceVersion".into(),
            old["metadata"]["resourceVersion"].clone(),
        );
        if new == old {
            return old;
        }
        let rv = self.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), rv.to_string().into());
        if is_deleting(&new) && !has_finalizers(&new) {
            self.objects.remove(key);
            self.emit(key.0, EventType::Deleted, &new, Some(&old));
        } else {
            self.objects.insert(key.clone(), new.clone());
            self.emit(key.0, EventType::Modified, &new, Some(&old));
        }
        new
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), rv.to_string().into());
        self.emit(key.0, EventType::Deleted, &obj, None);
        Some(obj)
    }

    /// Deletes like the API does: at once without finalizers, else marks deletionTimestamp.
    fn delete(&mut self, key: &Key) -> Result<Value, ApiError> {
        let r = &resources()[key.0];
        let old = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, &key.2))?;
        if key.0 == builtin("", "namespaces") {
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| resources()[k.0].namespaced && k.1 == key.2)
                .cloned()
                .collect();
            for k in inside {
                self.remove(&k);
            }
        }
        if !has_finalizers(&old) {
            return Ok(self.remove(key).unwrap_or(old));
        }
        if is_deleting(&old) {
            return Ok(old);
        }
        let mut marked = old;
        meta_mut(&mut marked).insert(
            "deletionTimestamp".into(),
            rfc3339(SystemTime::now()).into(),
        );
        Ok(self.replace(key, marked))
    }

    fn matching<'a>(
        &'a self,
        filter: &'a Filter,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        self.objects
            .range((filter.res, String::new(), String::new())..)
            .take_while(|(k, _)| k.0 == filter.res)
            .filter(|(_, v)| filter.matches(v))
    }

    fn bookmark(&self, res: usize, annotations: Value) -> Bytes {
        let r = &resources()[res];
        let object = json!({
            "kind": r.kind, "apiVersion": r.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string(), "annotations": annotations},
        });
        watch_line("BOOKMARK", &object)
    }

    /// Opens a watch: queues the initial or replayed events, then registers it for live ones.
    /// Returns the watch id (None when the stream is already complete) and its receiver.
    fn open_watch(
        &mut self,
        filter: Filter,
        opts: &WatchOpts,
    ) -> (Option<u64>, mpsc::Receiver<Chunk>) {
        let mut lines = Vec::new();
        match opts.from {
            Some(from) if !opts.send_initial && from < self.expired_before => {
                let gone = ApiError::expired(format!(
                    "too old resource version: {from} ({})",
                    self.expired_before
                ));
                lines.push(watch_line("ERROR", &gone.to_status()));
                let (tx, rx) = mpsc::channel(1);
                for line in lines {
                    let _ = tx.try_send(Chunk::Data(line));
                }
                return (None, rx);
            }
            Some(from) if !opts.send_initial => {
                lines.extend(
                    self.history
                        .iter()
                        .filter(|e| e.rv > from)
                        .filter_map(|e| e.line_for(&filter)),
                );
            }
            _ => {
                lines.extend(
                    self.matching(&filter)
                        .map(|(_, obj)| watch_line("ADDED", obj)),
                );
                if opts.send_initial && opts.bookmarks {
                    lines.push(
                        self.bookmark(filter.res, json!({"k8s.io/initial-events-end": "true"})),
                    );
                }
            }
        }
        let (tx, rx) = mpsc::channel(lines.len() + WATCH_BUFFER);
        for line in lines {
            let _ = tx.try_send(Chunk::Data(line));
        }
        self.next_watch += 1;
        let id = self.next_watch;
        self.watchers.push(Watcher { id, filter, tx });
        (Some(id), rx)
    }

    /// Whether a RoleBinding in `namespace` binds the ServiceAccount to ClusterRole edit or admin.
    fn sa_bound(&self, namespace: &str, sa_namespace: &str, sa_name: &str) -> bool {
        let rb = builtin("rbac.authorization.k8s.io", "rolebindings");
        let subject_ok = |s: &Value| {
            s.get("kind").and_then(Value::as_str) == Some("ServiceAccount")
                && s.get("name").and_then(Value::as_str) == Some(sa_name)
                && s.get("namespace")
                    .and_then(Value::as_str)
                    .unwrap_or(namespace)
                    == sa_namespace
        };
        self.objects
            .range((rb, namespace.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == rb && k.1 == namespace)
            .any(|(_, b)| {
                let role = &b["roleRef"];
                role["kind"] == "ClusterRole"
                    && (role["name"] == "edit" || role["name"] == "admin")
                    && b["subjects"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(subject_ok))
            })
    }

    fn authorize(&self, caller: &Caller, target: &Target, verb: &str) -> Result<(), ApiError> {
        let Caller::ServiceAccount {
            namespace: sa_ns,
            name: sa,
        } = caller
        else {
            return Ok(());
        };
        let r = &resources()[target.res];
        if let (Some(ns), true) = (&target.namespace, r.namespaced)
            && self.sa_bound(ns, sa_ns, sa)
        {
            return Ok(());
        }
        let resource = target
            .sub
            .as_ref()
            .map_or(r.plural.to_string(), |s| format!("{}/{s}", r.plural));
        let scope = target
            .namespace
            .as_ref()
            .map_or(" at the cluster scope".to_string(), |ns| {
                format!(" in the namespace \"{ns}\"")
            });
        Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "{} is forbidden: User \"system:serviceaccount:{sa_ns}:{sa}\" cannot {verb} resource \"{resource}\" in API group \"{}\"{scope}",
                r.qualified(),
                r.group
            ),
        ))
    }
}

struct WatchOpts {
    /// None: start with the current state.
    from: Option<u64>,
    send_initial: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
}

/// Streaming body of a watch response.
struct WatchBody(mpsc::Receiver<Chunk>);

impl HttpBody for WatchBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|chunk| match chunk {
            Some(Chunk::Data(bytes)) => Some(Ok(hyper::body::Frame::data(bytes))),
            Some(Chunk::Cut) => Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "watch broken",
            ))),
            None => None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The public handle
// ---------------------------------------------------------------------------------------------

struct Shared {
    store: Mutex<Store>,
    admin_token: String,
    addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        if token == self.admin_token {
            return Ok(Caller::Admin);
        }
        let store = self.lock();
        let issued = store.tokens.get(token).ok_or_else(ApiError::unauthorized)?;
        let sa_key = (
            builtin("", "serviceaccounts"),
            issued.namespace.clone(),
            issued.name.clone(),
        );
        if SystemTime::now() >= issued.expires || !store.objects.contains_key(&sa_key) {
            return Err(ApiError::unauthorized());
        }
        Ok(Caller::ServiceAccount {
            namespace: issued.namespace.clone(),
            name: issued.name.clone(),
        })
    }
}

/// A running API server emulator on 127.0.0.1; dropping it stops the server and its watches.
pub struct KubeApi {
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl KubeApi {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub async fn start() -> KubeApi {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("local address of the emulator");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            admin_token: random_token(),
            addr,
        });
        {
            let mut store = shared.lock();
            let ns = builtin("", "namespaces");
            for name in INITIAL_NAMESPACES {
                store.insert_new(
                    (ns, String::new(), name.to_string()),
                    json!({"metadata": {"name": name}}),
                );
            }
        }
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        KubeApi {
            shared,
            shutdown: Some(tx),
        }
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Bearer token with full access.
    pub fn admin_token(&self) -> &str {
        &self.shared.admin_token
    }

    /// Writes a kubeconfig file (YAML) at `path` for the admin token, context/cluster/user all
    /// named "emulator" (default namespace "default").
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\n\
             users:\n- name: emulator\n  user:\n    token: {}\ncontexts:\n- name: emulator\n  context:\n    \
             cluster: emulator\n    user: emulator\n    namespace: default\ncurrent-context: emulator\n",
            self.url(),
            self.admin_token()
        );
        std::fs::write(path, yaml).expect("write kubeconfig");
    }

    /// Creates or replaces an object, keyed by apiVersion/kind/metadata (namespace "default" when
    /// a namespaced object has none), bypassing HTTP and authorisation; the object is stored as
    /// given (status included) apart from server-managed metadata. Returns the stored object.
    /// Panics on an unknown kind or a missing name.
    pub fn put(&self, mut object: serde_json::Value) -> serde_json::Value {
        let av = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let res =
            find_kind(av, kind).unwrap_or_else(|| panic!("emulator does not serve {av} {kind}"));
        let name = meta_str(&object, "name")
            .expect("put: metadata.name is required")
            .to_string();
        let ns = if resources()[res].namespaced {
            meta_str(&object, "namespace")
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let key = (res, ns, name);
        let mut store = self.shared.lock();
        if let Some(old) = store.objects.get(&key) {
            let old_meta = old["metadata"].clone();
            let meta = meta_mut(&mut object);
            for field in ["uid", "creationTimestamp", "namespace"] {
                if let Some(v) = old_meta.get(field) {
                    meta.entry(field).or_insert_with(|| v.clone());
                }
            }
            store.replace(&key, object)
        } else {
            store.insert_new(key, object)
        }
    }

    /// The stored object, if any.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<serde_json::Value> {
        let res = find_kind(api_version, kind)?;
        self.shared
            .lock()
            .objects
            .get(&(
                res,
                namespace.unwrap_or_default().to_string(),
                name.to_string(),
            ))
            .cloned()
    }

    /// Deletes as a DELETE request would (finalizers honoured); absent objects are ignored.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) {
        if let Some(res) = find_kind(api_version, kind) {
            let _ = self.shared.lock().delete(&(
                res,
                namespace.unwrap_or_default().to_string(),
                name.to_string(),
            ));
        }
    }

    /// Every stored object of that type, in all namespaces, ordered by namespace and name.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<serde_json::Value> {
        let Some(res) = find_kind(api_version, kind) else {
            return Vec::new();
        };
        let filter = Filter {
            res,
            namespace: None,
            labels: Vec::new(),
            fields: Vec::new(),
        };
        self.shared
            .lock()
            .matching(&filter)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Ends every open watch stream now (the connection closes mid-stream, as a load balancer
    /// would).
    pub fn break_watches(&self) {
        let mut store = self.shared.lock();
        for w in store.watchers.drain(..) {
            let _ = w.tx.try_send(Chunk::Cut);
        }
    }

    /// Forgets history: a watch or list resuming from any resourceVersion older than now gets
    /// 410 Gone ("Expired"). Uses up one resourceVersion, so lists made afterwards resume fine.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        let rv = store.next_rv();
        store.expired_before = rv;
        store.history.clear();
    }

    /// How many authenticated write requests (POST/PUT/PATCH/DELETE) reached a resource, keyed
    /// `"VERB plural"` or `"VERB plural/subresource"`, e.g. `"PATCH edgenodes/status"`.
    pub fn write_count(&self) -> std::collections::BTreeMap<String, u64> {
        self.shared.lock().writes.clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.break_watches();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------------

fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in resources().iter().filter(|r| !r.group.is_empty()) {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

fn api_group(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv], "preferredVersion": gv})
}

fn resource_list(group: &str, version: &str) -> Value {
    let verbs = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    let mut entries = Vec::new();
    for r in resources()
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut entry = json!({
            "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
            "kind": r.kind, "verbs": verbs,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        entries.push(entry);
        if r.status {
            entries.push(json!({
                "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        if group.is_empty() && r.plural == "serviceaccounts" {
            entries.push(json!({
                "name": "serviceaccounts/token", "singularName": "", "namespaced": true,
                "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": entries})
}

fn discovery(shared: &Shared, segs: &[&str]) -> Option<Value> {
    let known = |g: &str, v: Option<&str>| {
        group_versions()
            .iter()
            .any(|(gg, vv)| *gg == g && v.is_none_or(|v| v == *vv))
    };
    Some(match segs {
        ["version"] => json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-emulator", "gitCommit": "emulator",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0",
            "compiler": "gc", "platform": "linux/amd64",
        }),
        ["api"] => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
        }),
        ["api", "v1"] => resource_list("", "v1"),
        ["apis"] => {
            let groups: Vec<Value> = group_versions()
                .iter()
                .map(|(g, v)| api_group(g, v))
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        ["apis", g] if known(g, None) => {
            let (g, v) = group_versions().into_iter().find(|(gg, _)| gg == g)?;
            api_group(g, v)
        }
        ["apis", g, v] if known(g, Some(v)) => resource_list(g, v),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

/// What a resource path names.
struct Target {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(segs: &[&str]) -> Option<Target> {
    let (group, version, rest) = match segs {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    let res = find_resource(group, version, plural)?;
    let r = &resources()[res];
    let sub_ok = match sub.as_deref() {
        None => true,
        Some("status") => r.status,
        Some("token") => r.plural == "serviceaccounts" && r.group.is_empty(),
        Some(_) => false,
    };
    let scope_ok = namespace.is_none() || r.namespaced;
    let named_scope_ok = name.is_none() || namespace.is_some() || !r.namespaced;
    (sub_ok && scope_ok && named_scope_ok).then_some(Target {
        res,
        namespace,
        name,
        sub,
    })
}

fn parse_query(uri: &Uri) -> Result<HashMap<String, String>, ApiError> {
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ))
    }
}

fn parse_rv(value: &str) -> Result<u64, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {value:?}")))
}

/// Reads a request body of at most [`MAX_BODY`] bytes. A larger one is still drained (up to a
/// bound), so that the 413 answer reaches the client instead of a connection reset.
async fn read_body(mut body: Body) -> Result<Bytes, ApiError> {
    const DRAIN_LIMIT: usize = 64 * MAX_BODY;
    let (mut data, mut seen) = (Vec::new(), 0usize);
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        if let Ok(chunk) = frame.into_data() {
            seen += chunk.len();
            if seen <= MAX_BODY {
                data.extend_from_slice(&chunk);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
    }
    if seen > MAX_BODY {
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            "the request body is larger than 3 MiB",
        ));
    }
    Ok(Bytes::from(data))
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    query.get(name).is_some_and(|v| v == "true" || v == "1")
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    serve(&shared, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn serve(shared: &Arc<Shared>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = shared.authenticate(&parts.headers)?;
    let segs: Vec<&str> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if parts.method == Method::GET
        && let Some(doc) = discovery(shared, &segs)
    {
        return Ok(json_response(StatusCode::OK, &doc));
    }
    let target = parse_target(&segs).ok_or_else(ApiError::no_route)?;
    let query = parse_query(&parts.uri)?;
    let method = parts.method.clone();
    let verb = match (&method, target.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if flag(&query, "watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::POST, true) if target.sub.as_deref() == Some("token") => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return Err(ApiError::method_not_allowed()),
    };
    if target.sub.as_deref() == Some("token") && verb != "create" {
        return Err(ApiError::method_not_allowed());
    }
    if query.contains_key("dryRun") {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the emulator",
        ));
    }
    let body = if method == Method::GET {
        Bytes::new()
    } else {
        read_body(body).await?
    };
    {
        let mut store = shared.lock();
        if method != Method::GET {
            let r = &resources()[target.res];
            let resource = target
                .sub
                .as_ref()
                .map_or(r.plural.to_string(), |s| format!("{}/{s}", r.plural));
            *store
                .writes
                .entry(format!("{method} {resource}"))
                .or_default() += 1;
        }
        store.authorize(&caller, &target, verb)?;
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let content_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    match verb {
        "get" => get_object(shared, &target),
        "list" => list(shared, &target, &query),
        "watch" => watch(shared, &target, &query),
        "create" if target.sub.is_some() => token_request(shared, &target, &body),
        "create" => create(shared, &target, parse_json(&body)?),
        "update" => update(shared, &target, parse_json(&body)?),
        "patch" => patch(shared, &target, &content_type, &body, &query),
        "delete" => delete(shared, &target, &body),
        _ => delete_collection(shared, &target, &query),
    }
}

fn key_of(target: &Target) -> Key {
    (
        target.res,
        target.namespace.clone().unwrap_or_default(),
        target.name.clone().unwrap_or_default(),
    )
}

fn get_object(shared: &Shared, target: &Target) -> Result<Response, ApiError> {
    let key = key_of(target);
    let store = shared.lock();
    let obj = store
        .objects
        .get(&key)
        .ok_or_else(|| ApiError::not_found(&resources()[key.0], &key.2))?;
    Ok(json_response(StatusCode::OK, obj))
}

fn list(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let filter = Filter::from_query(target.res, target.namespace.clone(), query)?;
    let store = shared.lock();
    if query
        .get("resourceVersionMatch")
        .is_some_and(|m| m == "Exact")
        && let Some(rv) = query.get("resourceVersion")
        && parse_rv(rv)? < store.expired_before
    {
        return Err(ApiError::expired(format!(
            "too old resource version: {rv} ({})",
            store.expired_before
        )));
    }
    let r = &resources()[target.res];
    let items: Vec<&Value> = store.matching(&filter).map(|(_, v)| v).collect();
    let body = json!({
        "kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
        "metadata": {"resourceVersion": store.rv.to_string()}, "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let filter = Filter::from_query(target.res, target.namespace.clone(), query)?;
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(parse_rv(rv)?),
    };
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => {
            Some(Duration::from_secs(t.parse().map_err(|_| {
                ApiError::bad_request("invalid timeoutSeconds")
            })?))
        }
        None => None,
    };
    let opts = WatchOpts {
        from,
        send_initial: flag(query, "sendInitialEvents"),
        bookmarks: flag(query, "allowWatchBookmarks"),
        timeout,
    };
    let (id, rx) = shared.lock().open_watch(filter, &opts);
    if let Some(id) = id {
        tokio::spawn(keep_watch(shared.clone(), id, target.res, opts));
    }
    let mut response = Response::new(Body::new(WatchBody(rx)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Sends bookmarks to watch `id` and closes it at its timeout or once its client has gone.
async fn keep_watch(shared: Arc<Shared>, id: u64, res: usize, opts: WatchOpts) {
    let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut ticks = tokio::time::interval(BOOKMARK_EVERY);
    ticks.tick().await;
    loop {
        let expired = match deadline {
            Some(deadline) => tokio::select! {
                _ = tokio::time::sleep_until(deadline) => true,
                _ = ticks.tick() => false,
            },
            None => {
                ticks.tick().await;
                false
            }
        };
        let mut store = shared.lock();
        let Some(pos) = store.watchers.iter().position(|w| w.id == id) else {
            return;
        };
        let bookmark = store.bookmark(res, json!({}));
        let w = &store.watchers[pos];
        let keep = !expired
            && !w.tx.is_closed()
            && (!opts.bookmarks || w.tx.try_send(Chunk::Data(bookmark)).is_ok());
        if !keep {
            store.watchers.remove(pos);
            return;
        }
    }
}

fn create(shared: &Shared, target: &Target, mut obj: Value) -> Result<Response, ApiError> {
    let r = &resources()[target.res];
    if r.namespaced && target.namespace.is_none() {
        return Err(ApiError::no_route());
    }
    check_type(r, &obj)?;
    let ns = target.namespace.clone().unwrap_or_default();
    if let Some(body_ns) = meta_str(&obj, "namespace")
        && r.namespaced
        && body_ns != ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}{}", name_suffix()),
        _ => {
            return Err(ApiError::invalid(
                r,
                "",
                "metadata.name: Required value: name or generateName is required",
            ));
        }
    };
    let meta = meta_mut(&mut obj);
    for field in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "deletionTimestamp",
        "generation",
        "managedFields",
    ] {
        meta.remove(field);
    }
    if r.status {
        obj_mut(&mut obj).remove("status");
    }
    let mut store = shared.lock();
    if r.namespaced
        && !store
            .objects
            .contains_key(&(builtin("", "namespaces"), String::new(), ns.clone()))
    {
        return Err(ApiError::not_found(
            &resources()[builtin("", "namespaces")],
            &ns,
        ));
    }
    let key = (target.res, ns, name);
    if store.objects.contains_key(&key) {
        return Err(ApiError::already_exists(r, &key.2));
    }
    Ok(json_response(
        StatusCode::CREATED,
        &store.insert_new(key, obj),
    ))
}

/// Turns a requested new version (full object, or a patched copy) into the stored one:
/// optimistic concurrency, the status subresource split and server-managed metadata.
fn apply_update(
    store: &mut Store,
    target: &Target,
    old: Value,
    mut candidate: Value,
) -> Result<Value, ApiError> {
    let r = &resources()[target.res];
    let key = key_of(target);
    if let Some(rv) = meta_str(&candidate, "resourceVersion")
        && !rv.is_empty()
        && Some(rv) != meta_str(&old, "resourceVersion")
    {
        return Err(ApiError::conflict(r, &key.2));
    }
    let new = if target.sub.as_deref() == Some("status") {
        let mut new = old.clone();
        match obj_mut(&mut candidate).remove("status") {
            Some(status) => obj_mut(&mut new).insert("status".into(), status),
            None => obj_mut(&mut new).remove("status"),
        };
        new
    } else {
        if r.status {
            match old.get("status") {
                Some(status) => obj_mut(&mut candidate).insert("status".into(), status.clone()),
                None => obj_mut(&mut candidate).remove("status"),
            };
        }
        let old_meta = old.get("metadata").cloned().unwrap_or_default();
        let meta = meta_mut(&mut candidate);
        meta.remove("managedFields");
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
            "name",
            "namespace",
        ] {
            match old_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        candidate
    };
    Ok(store.replace(&key, new))
}

fn update(shared: &Shared, target: &Target, body: Value) -> Result<Response, ApiError> {
    let r = &resources()[target.res];
    check_type(r, &body)?;
    let key = key_of(target);
    if meta_str(&body, "name").is_some_and(|n| n != key.2) {
        return Err(ApiError::bad_request(format!(
            "the name of the object does not match the name on the URL ({})",
            key.2
        )));
    }
    if r.namespaced && meta_str(&body, "namespace").is_some_and(|n| n != key.1) {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let mut store = shared.lock();
    let old = store
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(r, &key.2))?;
    let stored = apply_update(&mut store, target, old, body)?;
    Ok(json_response(StatusCode::OK, &stored))
}

fn patch(
    shared: &Shared,
    target: &Target,
    content_type: &str,
    body: &[u8],
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let r = &resources()[target.res];
    let key = key_of(target);
    let patch: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the patch is not valid JSON (YAML is not supported): {e}"
        ))
    })?;
    let mut store = shared.lock();
    let old = store.objects.get(&key).cloned();
    let candidate = match content_type {
        "application/apply-patch+yaml" => {
            if query.get("fieldManager").is_none_or(String::is_empty) {
                return Err(ApiError::invalid(
                    r,
                    &key.2,
                    "fieldManager: Required value: is required for apply patch",
                ));
            }
            check_type(r, &patch)?;
            let Some(old) = old.as_ref() else {
                if target.sub.is_some() {
                    return Err(ApiError::not_found(r, &key.2));
                }
                drop(store);
                let mut obj = patch;
                meta_mut(&mut obj).insert("name".into(), key.2.clone().into());
                return create(shared, target, obj);
            };
            let mut candidate = old.clone();
            merge_patch(&mut candidate, &patch);
            candidate
        }
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let mut candidate = old.clone().ok_or_else(|| ApiError::not_found(r, &key.2))?;
            merge_patch(&mut candidate, &patch);
            candidate
        }
        "application/json-patch+json" => {
            let mut candidate = old.clone().ok_or_else(|| ApiError::not_found(r, &key.2))?;
            json_patch(&mut candidate, &patch).map_err(|e| ApiError::invalid(r, &key.2, &e))?;
            candidate
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                ),
            ));
        }
    };
    let old = old.ok_or_else(|| ApiError::not_found(r, &key.2))?;
    if !candidate.is_object() {
        return Err(ApiError::invalid(
            r,
            &key.2,
            "the patched object is not a JSON object",
        ));
    }
    let stored = apply_update(&mut store, target, old, candidate)?;
    Ok(json_response(StatusCode::OK, &stored))
}

fn delete(shared: &Shared, target: &Target, body: &[u8]) -> Result<Response, ApiError> {
    let r = &resources()[target.res];
    let key = key_of(target);
    let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        parse_json(body)?
    };
    if options.get("dryRun").is_some_and(|d| !d.is_null()) {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the emulator",
        ));
    }
    let mut store = shared.lock();
    let old = store
        .objects
        .get(&key)
        .ok_or_else(|| ApiError::not_found(r, &key.2))?;
    for (field, meta_field) in [("resourceVersion", "resourceVersion"), ("uid", "uid")] {
        if let Some(want) = options
            .pointer(&format!("/preconditions/{field}"))
            .and_then(Value::as_str)
            && Some(want) != meta_str(old, meta_field)
        {
            return Err(ApiError::conflict(r, &key.2));
        }
    }
    let deleted = store.delete(&key)?;
    Ok(json_response(StatusCode::OK, &deleted))
}

fn delete_collection(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let r = &resources()[target.res];
    let filter = Filter::from_query(target.res, target.namespace.clone(), query)?;
    let mut store = shared.lock();
    let keys: Vec<Key> = store.matching(&filter).map(|(k, _)| k.clone()).collect();
    let items: Vec<Value> = keys.iter().filter_map(|k| store.delete(k).ok()).collect();
    let body = json!({
        "kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
        "metadata": {"resourceVersion": store.rv.to_string()}, "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn token_request(shared: &Shared, target: &Target, body: &[u8]) -> Result<Response, ApiError> {
    let key = key_of(target);
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(body)?
    };
    let seconds = match request.pointer("/spec/expirationSeconds") {
        None | Some(Value::Null) => 3600,
        Some(v) => v.as_u64().filter(|s| *s > 0).ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                "spec.expirationSeconds: Invalid value: must be a positive integer",
            )
        })?,
    };
    let mut store = shared.lock();
    if !store.objects.contains_key(&key) {
        return Err(ApiError::not_found(&resources()[key.0], &key.2));
    }
    let token = random_token();
    let expires = SystemTime::now() + Duration::from_secs(seconds);
    store.tokens.insert(
        token.clone(),
        IssuedToken {
            namespace: key.1.clone(),
            name: key.2.clone(),
            expires,
        },
    );
    let audiences = request
        .pointer("/spec/audiences")
        .cloned()
        .unwrap_or(json!([]));
    let body = json!({
        "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": key.2, "namespace": key.1, "creationTimestamp": rfc3339(SystemTime::now())},
        "spec": {"audiences": audiences, "expirationSeconds": seconds},
        "status": {"token": token, "expirationTimestamp": rfc3339(expires)},
    });
    Ok(json_response(StatusCode::CREATED, &body))
}
