//! The local control socket: a small HTTP/JSON API on a unix socket (mode 0600) that the CLI
//! uses, and the client side of it.

use crate::head::api::Accounts;
use crate::head::create_token;
use crate::head::edges::Edges;
use crate::head::users::{Decision, UserError};
use crate::key::DocKey;
use crate::node::{Node, NodeError};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::json;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
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

/// What only a head serves: join tokens and user administration.
#[derive(Clone)]
pub struct HeadControl {
    /// Where edges reach this head, for printed join commands.
    pub join_address: String,
    /// Hash of the CA, for join tokens.
    pub ca_hash: String,
    /// Users and their access.
    pub accounts: Accounts,
    /// Joined edges and join tokens.
    pub edges: Edges,
}

#[derive(Clone)]
struct Ctx {
    node: Node,
    ca_hash: Option<String>,
    join_address: Option<String>,
    accounts: Option<Accounts>,
    edges: Option<Edges>,
}

/// Binds the socket and returns the server future (run it as a task). `head` is set on heads.
pub async fn serve(
    path: &Path,
    node: Node,
    head: Option<HeadControl>,
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
        .route("/v1/tokens", post(token).get(tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(delete_token))
        .route("/v1/nodes/{name}", axum::routing::delete(remove_node))
        .route("/metrics", get(metrics))
        .route("/v1/users", get(users))
        .route("/v1/users/{name}/{action}", post(decide))
        .route("/v1/aup", axum::routing::put(set_aup))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Ctx {
            node,
            ca_hash: head.as_ref().map(|h| h.ca_hash.clone()),
            join_address: head.as_ref().map(|h| h.join_address.clone()),
            edges: head.as_ref().map(|h| h.edges.clone()),
            accounts: head.map(|h| h.accounts),
        });
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

struct ApiError(StatusCode, serde_json::Value);

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

type ApiResult = Result<Response, ApiError>;

async fn status(State(ctx): State<Ctx>) -> ApiResult {
    Ok(Json(ctx.node.status().await?).into_response())
}

#[derive(Deserialize)]
struct NamespaceQuery {
    namespace: Option<String>,
}

async fn list(State(ctx): State<Ctx>, Query(q): Query<NamespaceQuery>) -> ApiResult {
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

async fn apply(State(ctx): State<Ctx>, Query(q): Query<NamespaceQuery>, body: String) -> ApiResult {
    let namespace = q.namespace.unwrap_or_else(|| "default".into());
    let outcomes = ctx.node.docs().apply_text(&body, &namespace).await?;
    Ok(Json(outcomes).into_response())
}

async fn remove_node(
    State(ctx): State<Ctx>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<ActorQuery>,
) -> ApiResult {
    let Some(edges) = &ctx.edges else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": "nodes are removed on a head; this node is an edge"}),
        ));
    };
    if edges.remove(&name, &actor(q)).await? {
        Ok(Json(json!({"removed": name})).into_response())
    } else {
        Err(NodeError::NotFound(format!("node {name}")).into())
    }
}

fn accounts(ctx: &Ctx) -> Result<&Accounts, ApiError> {
    ctx.accounts.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": "users are managed on a head; this node is an edge"}),
        )
    })
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        let crate::head::api::ApiError(code, error, field) = e.into();
        ApiError(code, json!({"error": error, "field": field}))
    }
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    crate::head::api::metrics(State(ctx.node)).await
}

async fn users(State(ctx): State<Ctx>) -> ApiResult {
    let users = accounts(&ctx)?.users.list().await?;
    Ok(Json(users).into_response())
}

#[derive(Deserialize)]
struct ActorQuery {
    actor: Option<String>,
}

/// Who acts through the socket, as the CLI says (the socket is reachable by root only).
fn actor(q: ActorQuery) -> String {
    format!("admin:{}", q.actor.unwrap_or_else(|| "unknown".into()))
}

async fn decide(
    State(ctx): State<Ctx>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    Query(q): Query<ActorQuery>,
) -> ApiResult {
    let decision = Decision::parse(&action).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": format!("unknown action {action:?}; use approve, reject or revoke")}),
        )
    })?;
    let accounts = accounts(&ctx)?;
    let before = accounts.users.get(&name).await?.status;
    let user = accounts.decide(&name, decision, &actor(q)).await?;
    // Whether this call changed anything (approving an approved user succeeds, changing nothing).
    let mut body = serde_json::to_value(&user).unwrap_or_default();
    body["changed"] = json!(before != user.status);
    Ok(Json(body).into_response())
}

async fn set_aup(State(ctx): State<Ctx>, Query(q): Query<ActorQuery>, text: String) -> ApiResult {
    let aup = accounts(&ctx)?.users.set_aup(text, &actor(q)).await?;
    Ok(Json(aup).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    ttl_seconds: u64,
}

async fn token(State(ctx): State<Ctx>, Json(req): Json<TokenRequest>) -> ApiResult {
    let (Some(ca_hash), Some(edges)) = (&ctx.ca_hash, &ctx.edges) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": "join tokens are created on a head; this node is an edge"}),
        ));
    };
    if req.ttl_seconds == 0 || req.ttl_seconds > 365 * 24 * 3600 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": "ttl must be between 1s and 365 days", "field": "ttl"}),
        ));
    }
    let ttl = Duration::from_secs(req.ttl_seconds);
    let token = create_token(edges, ca_hash, ttl).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        )
    })?;
    let expires = k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(
            req.ttl_seconds as i64,
        ))
        .map(|t| t.to_string())
        .unwrap_or_default();
    let head = ctx.join_address.clone().unwrap_or_default();
    Ok(
        Json(json!({"token": token.to_string(), "expiresAt": expires, "head": head}))
            .into_response(),
    )
}

fn head_edges(ctx: &Ctx) -> Result<&Edges, ApiError> {
    ctx.edges.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": "join tokens live on a head; this node is an edge"}),
        )
    })
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"error": e.to_string()}),
    )
}

async fn tokens(State(ctx): State<Ctx>) -> ApiResult {
    let tokens = head_edges(&ctx)?.tokens().await.map_err(internal)?;
    Ok(Json(tokens).into_response())
}

async fn delete_token(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ActorQuery>,
) -> ApiResult {
    if !head_edges(&ctx)?
        .delete_token(&id)
        .await
        .map_err(internal)?
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no join token {}", crate::input::show(&id))}),
        ));
    }
    tracing::info!(token = %crate::input::show(&id), actor = %actor(q), "join token deleted");
    Ok(Json(json!({"deleted": id})).into_response())
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

    /// Sends one request and returns the status and body.
    pub async fn request(
        &self,
        method: hyper::Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), ControlError> {
        let http = |reason: String| ControlError::Http {
            path: self.path.display().to_string(),
            reason,
        };
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ControlError::Connect {
                path: self.path.display().to_string(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| http(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "edgesync")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http(e.to_string()))?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok((status, body))
    }
}
