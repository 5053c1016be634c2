//! What only a head serves on the control socket: join tokens, removing edges, and user
//! administration.

use crate::control::{ApiError, ApiResult, EventsQuery};
use crate::head::api::Accounts;
use crate::head::create_token;
use crate::head::edges::Edges;
use crate::head::users::{Decision, UserError};
use crate::node::NodeError;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

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
    /// This head's node core.
    pub node: crate::node::Node,
    /// With a cluster, the EdgeNodes' Kubernetes Events.
    pub events: Option<crate::head::events::ClusterEvents>,
}

/// The head's routes of the control socket.
pub fn routes(head: HeadControl) -> Router {
    Router::new()
        .route("/v1/tokens", post(token).get(tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(delete_token))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}", axum::routing::delete(remove_node))
        .route("/v1/users", get(users))
        .route("/v1/audit", get(audit))
        .route("/v1/events", get(events))
        .route("/v1/users/{name}/{action}", post(decide))
        .route("/v1/aup", axum::routing::put(set_aup))
        .with_state(head)
}

#[derive(Deserialize)]
struct AuditQuery {
    /// Unix seconds.
    since: Option<i64>,
}

/// The most lines one `audit` shows.
const AUDIT_LINES: usize = 10_000;

async fn audit(State(head): State<HeadControl>, Query(q): Query<AuditQuery>) -> ApiResult {
    let rows = head
        .accounts
        .users
        .audit(q.since.unwrap_or(0), AUDIT_LINES)
        .await?;
    Ok(Json(rows).into_response())
}

/// The events `q` asks for: with a cluster its Events, else this head's journal.
async fn events(State(head): State<HeadControl>, Query(q): Query<EventsQuery>) -> ApiResult {
    match &head.events {
        Some(cluster) => match cluster.list(&q).await {
            Ok(lines) => Ok(Json(lines).into_response()),
            Err(e) => Err(internal(format!("cannot list the Events: {e}"))),
        },
        None => Ok(crate::control::journal_events(&head.node, &q)),
    }
}

async fn nodes(State(head): State<HeadControl>) -> ApiResult {
    let list = crate::head::fleet::list(&head.node, &head.edges).await;
    Ok(Json(list).into_response())
}

async fn remove_node(
    State(head): State<HeadControl>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<ActorQuery>,
) -> ApiResult {
    if head.edges.remove(&name, &actor(q)).await? {
        Ok(Json(json!({"removed": name})).into_response())
    } else {
        Err(NodeError::NotFound(format!("node {name}")).into())
    }
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        let crate::head::api::ApiError(code, error, field) = e.into();
        ApiError(code, json!({"error": error, "field": field}))
    }
}

async fn users(State(head): State<HeadControl>) -> ApiResult {
    let users = head.accounts.users.list().await?;
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
    State(head): State<HeadControl>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    Query(q): Query<ActorQuery>,
) -> ApiResult {
    let decision = Decision::parse(&action).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": format!("unknown action {action:?}; use approve, reject or revoke")}),
        )
    })?;
    let accounts = &head.accounts;
    let before = accounts.users.get(&name).await?.status;
    let user = accounts.decide(&name, decision, &actor(q)).await?;
    // Whether this call changed anything (approving an approved user succeeds, changing nothing).
    let mut body = serde_json::to_value(&user).unwrap_or_default();
    body["changed"] = json!(before != user.status);
    Ok(Json(body).into_response())
}

async fn set_aup(
    State(head): State<HeadControl>,
    Query(q): Query<ActorQuery>,
    text: String,
) -> ApiResult {
    let aup = head.accounts.users.set_aup(text, &actor(q)).await?;
    Ok(Json(aup).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    ttl_seconds: u64,
}

async fn token(State(head): State<HeadControl>, Json(req): Json<TokenRequest>) -> ApiResult {
    if req.ttl_seconds == 0 || req.ttl_seconds > 365 * 24 * 3600 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": "ttl must be between 1s and 365 days", "field": "ttl"}),
        ));
    }
    let ttl = Duration::from_secs(req.ttl_seconds);
    let token = create_token(&head.edges, &head.ca_hash, ttl)
        .await
        .map_err(|e| {
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
    let address = head.join_address.clone();
    Ok(
        Json(json!({"token": token.to_string(), "expiresAt": expires, "head": address}))
            .into_response(),
    )
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"error": e.to_string()}),
    )
}

async fn tokens(State(head): State<HeadControl>) -> ApiResult {
    let tokens = head.edges.tokens().await.map_err(internal)?;
    Ok(Json(tokens).into_response())
}

async fn delete_token(
    State(head): State<HeadControl>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ActorQuery>,
) -> ApiResult {
    if !head.edges.delete_token(&id).await.map_err(internal)? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no join token {}", crate::input::show(&id))}),
        ));
    }
    tracing::info!(token = %crate::input::show(&id), actor = %actor(q), "join token deleted");
    Ok(Json(json!({"deleted": id})).into_response())
}
