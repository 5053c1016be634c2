//! The local control socket: a small HTTP/JSON API on a unix socket (mode 0600) that the CLI
//! uses, and the client side of it.

use crate::config::MetricsListen;
use crate::key::DocKey;
use crate::node::{Node, NodeError};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Largest request body the socket accepts.
pub const MAX_BODY: usize = 4 << 20;

/// Errors of the control socket, both sides.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be set up.
    #[error("control socket {path}: {reason}")]
    Bind {
        /// Socket path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The daemon could not be reached.
    #[error("cannot reach edgesync at {path}: {source} (is it running? see --socket)")]
    Connect {
        /// Socket path.
        path: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("control socket {path}: {reason}")]
    Http {
        /// Socket path.
        path: String,
        /// Why.
        reason: String,
    },
}

#[derive(Clone)]
struct Ctx {
    node: Node,
}

/// Binds the socket and returns the server future (run it as a task). `role_routes` are what
/// the node's role adds: a head's tokens, nodes and users, or [`edge_routes`].
pub async fn serve(
    path: &Path,
    node: Node,
    role_routes: Router,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()> + Send + 'static, ControlError> {
    let bind_err = |reason: String| ControlError::Bind {
        path: path.display().to_string(),
        reason,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::fsutil::ensure_dir(parent, 0o755).map_err(|e| bind_err(e.to_string()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bind_err(
                "exists and is not a socket; choose another --socket".into(),
            ));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(bind_err(
                "another edgesync is serving it; stop it or choose another --socket".into(),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| bind_err(format!("stale socket cannot be removed: {e}")))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| bind_err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| bind_err(e.to_string()))?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/status", get(status))
        .route("/v1/edgenodes", get(list))
        .route(
            "/v1/edgenodes/{namespace}/{name}",
            get(get_one).delete(delete),
        )
        .route(
            "/v1/apply",
            post(apply).layer(DefaultBodyLimit::max(crate::input::MAX_INPUT_BYTES)),
        )
        .route(
            "/v1/diff",
            post(diff).layer(DefaultBodyLimit::max(crate::input::MAX_INPUT_BYTES)),
        )
        .route("/metrics", get(metrics).with_state(node.clone()))
        .with_state(Ctx { node })
        .merge(role_routes)
        .layer(DefaultBodyLimit::max(MAX_BODY));
    let socket = path.to_path_buf();
    Ok(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(socket = %socket.display(), error = %e, "control socket failed");
        }
        let _ = std::fs::remove_file(&socket);
    })
}

/// An error answer: its status and JSON body.
pub struct ApiError(pub StatusCode, pub serde_json::Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Invalid(invalid) => ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": invalid.to_string(), "object": invalid.object, "field": invalid.field}),
            ),
            NodeError::NotFound(_) => {
                ApiError(StatusCode::NOT_FOUND, json!({"error": e.to_string()}))
            }
            other => ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": other.to_string()}),
            ),
        }
    }
}

/// A handler's answer.
pub type ApiResult = Result<Response, ApiError>;

async fn status(State(ctx): State<Ctx>) -> ApiResult {
    Ok(Json(ctx.node.status().await?).into_response())
}

#[derive(Deserialize)]
struct NamespaceQuery {
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct ListQuery {
    namespace: Option<String>,
    /// Stream changes, one JSON event per line, instead of listing.
    #[serde(default)]
    watch: bool,
}

async fn list(State(ctx): State<Ctx>, Query(q): Query<ListQuery>) -> ApiResult {
    if q.watch {
        return Ok(watch(ctx.node, q.namespace));
    }
    let items = ctx.node.edgenodes(q.namespace.as_deref()).await?;
    Ok(Json(json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items})).into_response())
}

async fn get_one(
    State(ctx): State<Ctx>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> ApiResult {
    let key = key_of(&namespace, &name)?;
    match ctx.node.edgenode(key.as_str()).await? {
        Some(node) => Ok(Json(node).into_response()),
        None => Err(NodeError::NotFound(key.to_string()).into()),
    }
}

async fn delete(
    State(ctx): State<Ctx>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> ApiResult {
    let key = key_of(&namespace, &name)?;
    ctx.node.docs().delete(key.as_str()).await?;
    Ok(Json(json!({"deleted": key.as_str()})).into_response())
}

/// The key of EdgeNode `namespace/name`; an EdgeNode that cannot exist is not found.
fn key_of(namespace: &str, name: &str) -> Result<DocKey, NodeError> {
    DocKey::new(namespace, name)
        .map_err(|_| NodeError::NotFound(crate::input::clip(&format!("{namespace}/{name}"))))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplyQuery {
    namespace: Option<String>,
    /// Nothing is stored; the answer says what would be done.
    #[serde(default)]
    dry_run: bool,
}

async fn apply(State(ctx): State<Ctx>, Query(q): Query<ApplyQuery>, body: String) -> ApiResult {
    let namespace = q.namespace.unwrap_or_else(|| "default".into());
    let docs = ctx.node.docs();
    let outcomes = match q.dry_run {
        true => docs
            .preview_text(&body, &namespace)
            .await?
            .into_iter()
            .map(|p| p.outcome)
            .collect(),
        false => docs.apply_text(&body, &namespace).await?,
    };
    Ok(Json(outcomes).into_response())
}

/// What an apply would change, per EdgeNode: a unified diff of its labels and spec as YAML.
async fn diff(State(ctx): State<Ctx>, Query(q): Query<NamespaceQuery>, body: String) -> ApiResult {
    let namespace = q.namespace.unwrap_or_else(|| "default".into());
    let previews = ctx.node.docs().preview_text(&body, &namespace).await?;
    let yaml = |view: Option<&crate::model::DocView>| -> Result<String, ApiError> {
        let Some(view) = view else {
            return Ok(String::new());
        };
        let object = crate::node::to_edgenode(view, None, false);
        let mut shown = json!({"spec": object.spec});
        if let Some(labels) = object.metadata.labels {
            shown["metadata"] = json!({ "labels": labels });
        }
        serde_saphyr::to_string(&shown).map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            )
        })
    };
    let mut diffs = Vec::new();
    for preview in &previews {
        let (before, after) = (yaml(preview.before.as_ref())?, yaml(Some(&preview.after))?);
        let key = &preview.outcome.key;
        let text = similar::TextDiff::from_lines(&before, &after)
            .unified_diff()
            .header(&format!("{key} (now)"), &format!("{key} (applied)"))
            .to_string();
        diffs.push(json!({"key": key, "result": preview.outcome.result, "diff": text}));
    }
    Ok(Json(diffs).into_response())
}

/// Changes to the EdgeNodes (of `namespace`, or all), as kubectl's watch events, one JSON
/// object per line: `{"type":"MODIFIED","object":…}`, or `DELETED` with the name only. Runs
/// until the client goes.
fn watch(node: Node, namespace: Option<String>) -> Response {
    use tokio::sync::broadcast::error::RecvError;
    let changes = node.docs().subscribe();
    let events = futures_util::stream::unfold(
        (node, changes, namespace),
        |(node, mut changes, namespace)| async move {
            loop {
                let change = match changes.recv().await {
                    Ok(change) => change,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                };
                let Some((ns, name)) = crate::key::parts(&change.key) else {
                    continue;
                };
                if change.moved.internal || namespace.as_deref().is_some_and(|n| n != ns) {
                    continue;
                }
                let event = match node.edgenode(&change.key).await {
                    Ok(Some(object)) => json!({"type": "MODIFIED", "object": object}),
                    Ok(None) => json!({"type": "DELETED", "object":
                        {"metadata": {"name": name, "namespace": ns}}}),
                    Err(_) => continue,
                };
                let line = Bytes::from(format!("{event}\n"));
                return Some((
                    Ok::<_, std::convert::Infallible>(line),
                    (node, changes, namespace),
                ));
            }
        },
    );
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

/// The node's metrics in the OpenMetrics text format.
pub async fn metrics(State(node): State<Node>, headers: HeaderMap) -> Response {
    exposition(node.metrics_text().await, &headers)
}

/// The metrics in the format the scraper asks for: OpenMetrics when it accepts it (as
/// Prometheus does), else the Prometheus text format 0.0.4 (curl, `promtool check metrics`).
fn exposition(openmetrics: String, headers: &HeaderMap) -> Response {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (content_type, body) = match accept.contains("application/openmetrics-text") {
        true => (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            openmetrics,
        ),
        false => (
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::to_text_format(&openmetrics),
        ),
    };
    ([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Renders the metrics text when scraped.
pub type RenderMetrics =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Listens on `listen` for Prometheus (plain HTTP, `GET /metrics`, rendered by `render`).
/// Returns the address and the server future (run it as a task); None when nothing is to be
/// served, or the default address is taken (then a warning says so).
pub async fn serve_metrics(
    listen: MetricsListen,
    render: RenderMetrics,
    shutdown: CancellationToken,
) -> Result<Option<(SocketAddr, impl Future<Output = ()> + Send + 'static)>, ControlError> {
    let (address, given) = match listen {
        MetricsListen::None => return Ok(None),
        MetricsListen::Default(address) => (address, false),
        MetricsListen::Given(address) => (address, true),
    };
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(e) if !given => {
            tracing::warn!(%address, error = %e, "metrics not served: the default address is taken; choose one with --metrics-listen");
            return Ok(None);
        }
        Err(e) => {
            return Err(ControlError::Bind {
                path: format!("--metrics-listen {address}"),
                reason: e.to_string(),
            });
        }
    };
    let local = listener.local_addr().unwrap_or(address);
    let handler = move |headers: HeaderMap| {
        let render = render.clone();
        async move { exposition(render().await, &headers) }
    };
    let app = Router::new().route("/metrics", get(handler));
    tracing::info!(address = %local, "serving metrics at /metrics");
    Ok(Some((local, async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(address = %local, error = %e, "metrics listener failed");
        }
    })))
}

/// Which events `GET /v1/events` lists: one EdgeNode's (`namespace` and `name`), or one edge's
/// (`edge`: the Edge and every EdgeNode of it).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EventsQuery {
    /// The EdgeNode's namespace.
    pub namespace: Option<String>,
    /// The EdgeNode's name.
    pub name: Option<String>,
    /// The edge's name.
    pub edge: Option<String>,
}

impl EventsQuery {
    /// Whether an event about `object` (`EdgeNode ns/name` or `Edge name`) is asked for.
    pub fn wants(&self, object: &str) -> bool {
        let Some((kind, name)) = object.split_once(' ') else {
            return false;
        };
        match (kind, &self.edge) {
            ("Edge", Some(edge)) => name == edge,
            ("EdgeNode", Some(edge)) => crate::key::edge_of(name) == Some(edge.as_str()),
            ("EdgeNode", None) => {
                let wanted = (self.namespace.as_deref(), self.name.as_deref());
                crate::key::parts(name).is_some_and(|(ns, n)| wanted == (Some(ns), Some(n)))
            }
            _ => false,
        }
    }
}

/// The events this node's journal holds that `q` asks for.
pub fn journal_events(node: &Node, q: &EventsQuery) -> Response {
    Json(node.journal().lines(|object| q.wants(object))).into_response()
}

/// An edge's own routes: its events, and what it answers to what only a head serves.
pub fn edge_routes(node: Node) -> Router {
    let only_on_a_head = |what: &'static str| {
        move || async move {
            ApiError(
                StatusCode::NOT_FOUND,
                json!({"error": format!("{what} on a head; this node is an edge")}),
            )
        }
    };
    Router::new()
        .route(
            "/v1/tokens",
            post(only_on_a_head("join tokens are created")).get(only_on_a_head("join tokens live")),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(only_on_a_head("join tokens live")),
        )
        .route("/v1/nodes", get(only_on_a_head("edges are listed")))
        .route(
            "/v1/nodes/{name}",
            axum::routing::delete(only_on_a_head("nodes are removed")),
        )
        .route("/v1/users", get(only_on_a_head("users are managed")))
        .route("/v1/audit", get(only_on_a_head("the audit trail is kept")))
        .route(
            "/v1/users/{name}/{action}",
            post(only_on_a_head("users are managed")),
        )
        .route(
            "/v1/aup",
            axum::routing::put(only_on_a_head("users are managed")),
        )
        .route(
            "/v1/events",
            get(
                |State(node): State<Node>, Query(q): Query<EventsQuery>| async move {
                    journal_events(&node, &q)
                },
            ),
        )
        .with_state(node)
}

/// Client of the control socket.
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client for the socket at `path`.
    pub fn new(path: &Path) -> Client {
        Client {
            path: path.to_path_buf(),
        }
    }

    /// Sends a GET whose answer is JSON lines, and hands each line to `each` as it arrives,
    /// until the daemon ends the stream (an error answer is returned as a whole).
    pub async fn lines(
        &self,
        uri: &str,
        mut each: impl FnMut(&str),
    ) -> Result<(StatusCode, Vec<u8>), ControlError> {
        let (response, driver) = self.send(hyper::Method::GET, uri, None).await?;
        let status = response.status();
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            if !status.is_success() {
                continue;
            }
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                each(String::from_utf8_lossy(&line).trim_end());
            }
        }
        driver.abort();
        Ok((status, pending))
    }

    /// Sends one request and returns the status and body.
    pub async fn request(
        &self,
        method: hyper::Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), ControlError> {
        let (response, driver) = self.send(method, uri, body).await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http(e.to_string()))?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok((status, body))
    }

    /// Connects, sends one request, and returns the response with the task driving the
    /// connection (to abort once the body is read).
    async fn send(
        &self,
        method: hyper::Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<
        (
            hyper::Response<hyper::body::Incoming>,
            tokio::task::JoinHandle<Result<(), hyper::Error>>,
        ),
        ControlError,
    > {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ControlError::Connect {
                path: self.path.display().to_string(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| self.http(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "edgesync")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.http(e.to_string()))?;
        Ok((response, driver))
    }

    fn http(&self, reason: String) -> ControlError {
        ControlError::Http {
            path: self.path.display().to_string(),
            reason,
        }
    }
}
