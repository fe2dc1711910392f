//! The agent console: a web page and the small JSON API behind it. Agents
//! sign in with a token from the configuration; every profile they open is
//! written to the audit topic (who, whom, when).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cdp_log::{EventLog, Record, Topic};
use cdp_runtime::ServiceError;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Loaded, Lookup, ProfileQuery};

const PAGE: &str = include_str!("console.html");

/// An agent allowed to use the console.
#[derive(Clone)]
pub struct Agent {
    pub name: String,
    pub token: String,
}

pub struct ConsoleState {
    pub query: ProfileQuery,
    pub agents: Vec<Agent>,
    pub log: Arc<dyn EventLog>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub agent: String,
    pub customer_id: String,
    /// How the agent found the customer: `phone:+84…`, `customer_id:…`.
    pub lookup: String,
    pub at: i64,
}

pub fn router(state: Arc<ConsoleState>) -> Router {
    Router::new()
        .route("/console", get(|| async { Html(PAGE) }))
        .route("/api/login", post(login))
        .route("/api/search", get(search))
        .route("/api/profile", get(profile))
        .route("/api/watch", get(watch))
        .route("/api/audit", get(audit))
        .with_state(state)
}

/// An API error: a status and a message, as JSON.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({"error": self.message}))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError {
        status,
        message: message.into(),
    }
    .into_response()
}

fn service_error(e: ServiceError) -> Response {
    let status = match e {
        ServiceError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
        ServiceError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

impl ConsoleState {
    /// The agent whose bearer token the request carries.
    fn agent(&self, headers: &HeaderMap) -> Result<&Agent, ApiError> {
        let unauthorized = |message: &str| ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_owned(),
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthorized("sign in: an agent token is required"))?;
        self.agents
            .iter()
            .find(|a| a.token == token)
            .ok_or_else(|| unauthorized("unknown agent token"))
    }
}

#[derive(Deserialize)]
struct LoginRequest {
    token: String,
}

async fn login(
    State(state): State<Arc<ConsoleState>>,
    axum::Json(body): axum::Json<LoginRequest>,
) -> Response {
    match state.agents.iter().find(|a| a.token == body.token.trim()) {
        Some(a) => axum::Json(json!({"agent": a.name})).into_response(),
        None => error(StatusCode::UNAUTHORIZED, "unknown agent token"),
    }
}

#[derive(Deserialize)]
struct SearchQuery {
    q: String,
}

async fn search(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(q): Query<SearchQuery>,
) -> Response {
    if let Err(e) = state.agent(&headers) {
        return e.into_response();
    }
    match state.query.search(&q.q, 10).await {
        Ok(candidates) => {
            let list: Vec<Value> = candidates
                .iter()
                .map(|c| json!({"customer_id": c.customer_id, "name": c.name, "emails": c.emails, "phones": c.phones}))
                .collect();
            axum::Json(json!({"candidates": list})).into_response()
        }
        Err(e) => service_error(e),
    }
}

#[derive(Deserialize)]
struct ProfileQueryParams {
    customer_id: Option<String>,
    kind: Option<String>,
    value: Option<String>,
}

fn profile_json(loaded: &Loaded, currency: &str) -> Value {
    let view = loaded.profile.view();
    let rfm = loaded.profile.rfm(cdp_runtime::now_ms(), currency);
    json!({
        "customer_id": loaded.profile.customer_id.to_string(),
        "identifiers": loaded.identifiers.iter().map(|i| json!({"kind": i.kind.to_string(), "value": i.value})).collect::<Vec<_>>(),
        "view": view,
        "rfm": rfm,
        "timeline": loaded.timeline,
    })
}

async fn profile(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(p): Query<ProfileQueryParams>,
) -> Response {
    let agent = match state.agent(&headers) {
        Ok(a) => a.clone(),
        Err(e) => return e.into_response(),
    };
    let (lookup, described) = match (p.customer_id, p.kind, p.value) {
        (Some(c), _, _) => (Lookup::CustomerId(c.clone()), format!("customer_id:{c}")),
        (None, Some(kind), Some(value)) => (
            Lookup::Identifier(cdp_proto::v1::Identifier {
                kind: kind.clone(),
                value: value.clone(),
            }),
            format!("{kind}:{value}"),
        ),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give customer_id, or kind and value",
            );
        }
    };
    let loaded = match state.query.load(Some(lookup), 50).await {
        Ok(l) => l,
        Err(e) => return service_error(e),
    };
    let entry = AuditEntry {
        agent: agent.name.clone(),
        customer_id: loaded.profile.customer_id.to_string(),
        lookup: described,
        at: cdp_runtime::now_ms(),
    };
    let record = Record {
        key: entry.customer_id.clone().into_bytes(),
        value: serde_json::to_vec(&entry).unwrap_or_default(),
        ..Record::default()
    };
    // No audit record, no view: an agent's access is always accounted for.
    if let Err(e) = state.log.append(Topic::Audit, vec![record]).await {
        tracing::error!(error = %e, "audit log append failed");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the audit log is unavailable: {e}"),
        );
    }
    tracing::info!(agent = %entry.agent, customer = %entry.customer_id, "profile viewed");
    axum::Json(profile_json(&loaded, state.query.currency())).into_response()
}

#[derive(Deserialize)]
struct WatchQuery {
    customer_id: String,
}

/// Server-sent events: `changed` whenever the customer's view changes.
async fn watch(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(w): Query<WatchQuery>,
) -> Response {
    if let Err(e) = state.agent(&headers) {
        return e.into_response();
    }
    let mut changes = state.query.changes();
    let query = state.query.clone();
    let watched = w.customer_id;
    let stream = async_stream(move |tx| async move {
        loop {
            let relevant = match query.next_change(&mut changes).await {
                Some(Ok(c)) => query.concerns(&watched, c).await,
                Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => true,
                Some(Err(tokio::sync::broadcast::error::RecvError::Closed)) | None => return,
            };
            if relevant
                && tx
                    .send(Ok(Event::default().event("changed").data(watched.clone())))
                    .await
                    .is_err()
            {
                return;
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A stream fed by a task through a small channel (bounded: a slow reader
/// holds back the task, not memory).
fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The most recent audit entries (newest first, at most 200).
async fn audit(State(state): State<Arc<ConsoleState>>, headers: HeaderMap) -> Response {
    if let Err(e) = state.agent(&headers) {
        return e.into_response();
    }
    let mut entries: Vec<AuditEntry> = Vec::new();
    for p in 0..state.log.partitions(Topic::Audit) {
        let end = match state.log.end_offsets(Topic::Audit).await {
            Ok(ends) => ends.get(p as usize).copied().unwrap_or(0),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        match state
            .log
            .read(Topic::Audit, p, end.saturating_sub(200), 200)
            .await
        {
            Ok(records) => entries.extend(
                records
                    .iter()
                    .filter_map(|r| serde_json::from_slice(&r.value).ok()),
            ),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.at));
    entries.truncate(200);
    axum::Json(json!({"entries": entries})).into_response()
}
