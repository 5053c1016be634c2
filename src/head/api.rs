//! The head's HTTPS API for people: registration, the Acceptable Use Policy, and kubeconfigs;
//! plus the account logic shared with the control socket (decisions, access sweeps).

use super::access::Access;
use super::users::{Decision, Registration, User, UserError, Users};
use crate::node::Node;
use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Largest request body of the API.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a request may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long, and how much of, a refused body is still read and thrown away after the 413, so
/// a client that sends all before it reads gets the answer rather than a reset connection.
const DRAIN_TIME: Duration = Duration::from_secs(10);
const DRAIN_BYTES: usize = 64 << 20;
/// How often access is checked against status and AUP expiry.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Users and, with a cluster, their access to it.
#[derive(Clone)]
pub struct Accounts {
    /// The registry.
    pub users: Users,
    /// Cluster access; None on a standalone head.
    pub access: Option<Access>,
    /// Wakes the sweeper when access is granted (its expiry may be the next one) or a user
    /// changed.
    pub granted: Arc<tokio::sync::Notify>,
}

impl Accounts {
    /// A kubeconfig for `user`, if they may have one.
    pub async fn kubeconfig(&self, user: &User) -> Result<String, UserError> {
        if let Some(refusal) = user.refusal() {
            return Err(refusal);
        }
        let Some(access) = &self.access else {
            return Err(UserError::Conflict(
                "this head runs without a Kubernetes cluster; there are no cluster credentials"
                    .into(),
            ));
        };
        // Recorded first (and only while the user may use the cluster): whatever grant()
        // leaves behind, the sweep of any head knows to remove it.
        let name = &user.username;
        let user = self
            .users
            .set_access(name, true, name, "cluster access for a kubeconfig")
            .await?;
        self.granted.notify_one();
        let kubeconfig = access.grant(name, &user.uid).await?;
        // A decision, a new AUP, or a sweep that came in meanwhile, on any head, may have
        // recorded the access as gone: record it again if the user still may have it, else
        // take it back. Either way the record does not lag behind the RoleBinding.
        let now = self.users.get(name).await?;
        if now.access && now.may_use_cluster() {
            return Ok(kubeconfig);
        }
        match self
            .users
            .set_access(name, true, name, "cluster access for a kubeconfig")
            .await
        {
            Ok(_) => Ok(kubeconfig),
            Err(refusal @ UserError::Forbidden(_)) => {
                self.withdraw(&now, "system").await?;
                Err(refusal)
            }
            Err(e) => Err(e),
        }
    }

    /// An administrator's decision; access ends at once when it is withdrawn.
    pub async fn decide(
        &self,
        username: &str,
        decision: Decision,
        actor: &str,
    ) -> Result<User, UserError> {
        let user = self.users.decide(username, decision, actor).await?;
        if !user.may_use_cluster() {
            // Also when no access is recorded: a grant on another head may be under way.
            self.withdraw(&user, actor).await?;
        }
        self.users.get(username).await
    }

    /// Removes the access of a user who may no longer have it, as found by a sweep.
    async fn enforce(&self, user: &User, actor: &str) -> Result<(), UserError> {
        if !user.access || user.may_use_cluster() {
            return Ok(());
        }
        // The list may be old: another head may have acted, or the user renewed, since.
        let user = self.users.get(&user.username).await?;
        if !user.access || user.may_use_cluster() {
            return Ok(());
        }
        self.withdraw(&user, actor).await
    }

    /// Deletes the user's RoleBinding, records that access is gone (unless the user may use the
    /// cluster again by then), and deletes it again: a grant on another head that recorded
    /// access before this record was written and made the RoleBinding after the first delete
    /// is undone too. Repeating it, on any head, changes nothing.
    async fn withdraw(&self, user: &User, actor: &str) -> Result<(), UserError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let reason = if user.aup.valid {
            format!("status {}", user.status)
        } else {
            "the AUP acceptance expired or the AUP changed".into()
        };
        access.withdraw(&user.username).await?;
        let now = self
            .users
            .set_access(&user.username, false, actor, &reason)
            .await?;
        if !now.access {
            access.withdraw(&user.username).await?;
        }
        Ok(())
    }

    /// Checks every user's access now (at start, so what expired while the head was down is
    /// handled), then when the next acceptance expires, when a user or the AUP changes (with a
    /// cluster: also on another head or with kubectl), and at least every 30 s.
    pub async fn sweep_forever(self, shutdown: CancellationToken) {
        if let Some(mut changes) = self.users.changes() {
            let (wake, stop) = (self.granted.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        change = changes.next() => match change {
                            Some(()) => wake.notify_one(),
                            None => return,
                        },
                    }
                }
            });
        }
        let mut collected: Option<tokio::time::Instant> = None;
        loop {
            let mut next = SWEEP_INTERVAL;
            if collected.is_none_or(|at| at.elapsed() >= SWEEP_INTERVAL) {
                collected = Some(tokio::time::Instant::now());
                if let Err(e) = self.users.forget_abandoned().await {
                    warn!(error = %e, "cannot remove abandoned registrations");
                }
            }
            match self.users.list().await {
                Ok(users) => {
                    let now = k8s_openapi::jiff::Timestamp::now();
                    for user in users {
                        if let Err(e) = self.enforce(&user, "system").await {
                            warn!(user = %user.username, error = %e, "cannot remove access; will retry");
                        }
                        let expires = user
                            .aup
                            .expires_at
                            .as_deref()
                            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
                        if let Some(expires) = expires.filter(|_| user.access)
                            && let Ok(left) = Duration::try_from(expires.duration_since(now))
                        {
                            next = next.min(left + Duration::from_millis(100));
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot read users"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(next) => {}
                _ = self.granted.notified() => {}
            }
        }
    }
}

/// An API error: `{"error": ..., "field": ...}` with its status code.
pub struct ApiError(pub StatusCode, pub String, pub Option<String>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.1});
        if let Some(field) = self.2 {
            body["field"] = json!(field);
        }
        (self.0, Json(body)).into_response()
    }
}

/// The HTTP status of a users error, the same in the API and the portal.
pub fn status_of(e: &UserError) -> StatusCode {
    match e {
        UserError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        UserError::Duplicate { .. } | UserError::Conflict(_) => StatusCode::CONFLICT,
        UserError::Unauthorized => StatusCode::UNAUTHORIZED,
        UserError::Forbidden(_) => StatusCode::FORBIDDEN,
        UserError::NotFound(_) => StatusCode::NOT_FOUND,
        UserError::Cluster(_) => StatusCode::BAD_GATEWAY,
        UserError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        let code = status_of(&e);
        let field = e.field().map(str::to_string);
        ApiError(code, e.to_string(), field)
    }
}

type ApiResult = Result<Response, ApiError>;

/// The body as JSON of type `T`: 413 when too large, 400 when not JSON, 422 naming the field
/// that is unknown, missing or of the wrong type.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY} bytes"),
            None,
        ),
        code => ApiError(code, e.body_text(), None),
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("body is not JSON: {e}"),
            None,
        )
    })?;
    serde_path_to_error::deserialize(&value).map_err(|e| {
        // serde quotes the value it refused; a body may hold a long one.
        let inner = crate::input::clip(&e.inner().to_string());
        let field = match e.path().to_string() {
            p if p == "." => inner.split('`').nth(1).unwrap_or_default().to_string(),
            p => p,
        };
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, inner, Some(field))
    })
}

async fn register(
    State(accounts): State<Accounts>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let request: Registration = parse(body)?;
    let (user, secret) = accounts.users.register(request).await?;
    let body = json!({"username": user.username, "status": user.status, "secret": secret});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn aup(State(accounts): State<Accounts>) -> ApiResult {
    let aup = accounts.users.aup().await?;
    Ok(Json(aup).into_response())
}

/// The user named in the path, if the bearer secret is theirs.
async fn caller(
    accounts: &Accounts,
    username: &str,
    headers: &HeaderMap,
) -> Result<User, ApiError> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    Ok(accounts.users.authenticate(username, secret).await?)
}

async fn user(
    State(accounts): State<Accounts>,
    UrlPath(username): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult {
    Ok(Json(caller(&accounts, &username, &headers).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptRequest {
    accept: bool,
    version: i64,
}

async fn accept(
    State(accounts): State<Accounts>,
    UrlPath(username): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let user = caller(&accounts, &username, &headers).await?;
    let request: AcceptRequest = parse(body)?;
    if !request.accept {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "accept must be true to accept the policy".into(),
            Some("accept".into()),
        ));
    }
    let user = accounts
        .users
        .accept(&user.username, request.version)
        .await?;
    Ok(Json(user).into_response())
}

async fn kubeconfig(
    State(accounts): State<Accounts>,
    UrlPath(username): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult {
    let user = caller(&accounts, &username, &headers).await?;
    let kubeconfig = accounts.kubeconfig(&user).await?;
    info!(user = %user.username, "kubeconfig issued");
    Ok(([(header::CONTENT_TYPE, "application/yaml")], kubeconfig).into_response())
}

/// Reads each request's body, at most [`MAX_BODY`] bytes, before a handler sees it. A larger
/// body, by its Content-Length or (chunked) as it arrives, is answered 413 at once; the rest of
/// it is read and dropped in the background, within bounds, and the connection then closes.
async fn bounded_body(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        // A client that waits for "100 Continue" is answered without being asked for the body.
        let expects = parts.headers.contains_key(header::EXPECT);
        return too_large((!expects).then_some(body));
    }
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(BODY_TIMEOUT, async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| "the request body could not be read")?;
            if bytes.len() + chunk.len() > MAX_BODY {
                return Ok::<_, &str>(false);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(true)
    })
    .await;
    match read {
        Ok(Ok(true)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Ok(false)) => too_large(Some(Body::from_stream(stream))),
        Ok(Err(message)) => ApiError(StatusCode::BAD_REQUEST, message.into(), None).into_response(),
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body took longer than {}s",
                BODY_TIMEOUT.as_secs()
            ),
            None,
        )
        .into_response(),
    }
}

/// 413, closing the connection once the rest of `body` is read and dropped (or given up on).
fn too_large(body: Option<Body>) -> Response {
    if let Some(body) = body {
        tokio::spawn(async move {
            let mut stream = body.into_data_stream();
            let mut seen = 0;
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                while let Some(Ok(chunk)) = stream.next().await {
                    seen += chunk.len();
                    if seen > DRAIN_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
    let mut response = ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than {MAX_BODY} bytes"),
        None,
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What the API's handlers share.
#[derive(Clone)]
struct ApiState {
    accounts: Accounts,
    node: Node,
    ready: watch::Receiver<bool>,
}

impl FromRef<ApiState> for Accounts {
    fn from_ref(state: &ApiState) -> Accounts {
        state.accounts.clone()
    }
}

impl FromRef<ApiState> for watch::Receiver<bool> {
    fn from_ref(state: &ApiState) -> watch::Receiver<bool> {
        state.ready.clone()
    }
}

impl FromRef<ApiState> for Node {
    fn from_ref(state: &ApiState) -> Node {
        state.node.clone()
    }
}

/// 200 once the head has read the state it needs to serve (the cluster's, with one); 503 before.
async fn readyz(State(ready): State<watch::Receiver<bool>>) -> Response {
    match *ready.borrow() {
        true => "ok".into_response(),
        false => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: reading the cluster's state",
        )
            .into_response(),
    }
}

fn router(
    accounts: Accounts,
    node: Node,
    ready: watch::Receiver<bool>,
    portal: super::portal::Portal,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/registrations", post(register))
        .route("/api/v1/aup", get(aup))
        .route("/api/v1/users/{username}", get(user))
        .route("/api/v1/users/{username}/aup", post(accept))
        .route("/api/v1/users/{username}/kubeconfig", get(kubeconfig))
        .with_state(ApiState {
            accounts,
            node,
            ready,
        })
        .merge(portal.routes())
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into(), None) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(bounded_body))
}

/// Binds `addr` now (so a taken port fails the start) and returns the address and the server
/// future.
pub fn serve(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    accounts: Accounts,
    node: Node,
    ready: watch::Receiver<bool>,
    portal: super::portal::Portal,
    shutdown: CancellationToken,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
    let server = axum_server::from_tcp_rustls(listener, config)?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    // The peer's address: sign-ins are limited per address.
    let app =
        router(accounts, node, ready, portal).into_make_service_with_connect_info::<SocketAddr>();
    Ok((local, async move {
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stopper.graceful_shutdown(Some(Duration::from_secs(2)));
        });
        if let Err(e) = server.handle(handle).serve(app).await {
            tracing::error!(error = %e, "head API stopped");
        }
    }))
}
