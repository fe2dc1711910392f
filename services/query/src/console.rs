//! The agent console: a web page and the small JSON API behind it. Agents
//! sign in with a token from the configuration; every profile they open is
//! written to the audit topic (who, whom, when).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cdp_log::EventLog;
use cdp_pipeline::{emit, topic};
use cdp_runtime::ServiceError;
use serde::Deserialize;
use serde_json::{Value, json};

pub use cdp_pipeline::AuditEntry;

use crate::view::Update;
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

/// A missing or unknown agent token.
fn unauthenticated(message: &str) -> ServiceError {
    ServiceError::Unauthenticated {
        message: message.to_owned(),
        challenge: Some("Bearer realm=\"cdp-console\""),
    }
}

impl ConsoleState {
    /// The agent whose bearer token the request carries.
    fn agent(&self, headers: &HeaderMap) -> Result<&Agent, ServiceError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthenticated("sign in: an agent token is required"))?;
        self.agents
            .iter()
            .find(|a| a.token == token)
            .ok_or_else(|| unauthenticated("unknown agent token"))
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
        None => unauthenticated("unknown agent token").into_response(),
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
        Err(e) => e.into_response(),
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
            return ServiceError::invalid("customer_id", "give customer_id, or kind and value")
                .into_response();
        }
    };
    let loaded = match state.query.load(Some(lookup), 50).await {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let entry = AuditEntry {
        agent: agent.name.clone(),
        customer_id: loaded.profile.customer_id.to_string(),
        lookup: described,
        at: cdp_runtime::now_ms(),
    };
    let record = match emit::audit(&entry) {
        Ok(r) => r,
        Err(e) => return ServiceError::Internal(format!("audit entry: {e}")).into_response(),
    };
    // No audit record, no view: an agent's access is always accounted for.
    if let Err(e) = state.log.append(topic::AUDIT, vec![record]).await {
        tracing::error!(error = %e, "audit log append failed");
        return ServiceError::Unavailable(format!("the audit log is unavailable: {e}"))
            .into_response();
    }
    tracing::info!(agent = %entry.agent, customer = %entry.customer_id, "profile viewed");
    axum::Json(profile_json(&loaded, state.query.currency())).into_response()
}

#[derive(Deserialize)]
struct WatchQuery {
    customer_id: String,
}

/// Server-sent events: `changed` whenever the customer's view changes. When
/// a rebuild switches the projection generation, `switched` carries the id
/// of the customer the view is in the new generation (the same id, else the
/// holder of its strongest identifier; the page reloads it), or `gone`
/// when there is none, and the stream ends.
async fn watch(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(w): Query<WatchQuery>,
) -> Response {
    if let Err(e) = state.agent(&headers) {
        return e.into_response();
    }
    let mut watch = state.query.watch();
    let query = state.query.clone();
    let mut watched = w.customer_id;
    // The identifiers of the view, to find it again after a generation switch.
    let mut identifiers = match query
        .load(Some(Lookup::CustomerId(watched.clone())), 1)
        .await
    {
        Ok(loaded) => loaded.identifiers,
        Err(e) => return e.into_response(),
    };
    let stream = async_stream(move |tx| async move {
        loop {
            let event = match query.next_update(&mut watch, &watched).await {
                Update::Changed => Event::default().event("changed").data(watched.clone()),
                Update::Switched(_) => {
                    let found = match query.relocate(&watched, &identifiers).await {
                        Ok(c) => query.load(Some(Lookup::CustomerId(c.to_string())), 1).await,
                        Err(e) => Err(e),
                    };
                    match found {
                        Ok(loaded) => {
                            watched = loaded.profile.customer_id.to_string();
                            identifiers = loaded.identifiers;
                            Event::default().event("switched").data(watched.clone())
                        }
                        Err(error) => {
                            tracing::info!(%error, customer = %watched, "a watched customer is not in the new generation");
                            let gone = Event::default().event("gone").data(watched.clone());
                            let _ = tx.send(Ok(gone)).await;
                            return;
                        }
                    }
                }
                Update::Ended => return,
            };
            if tx.send(Ok(event)).await.is_err() {
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
    let ends = match state.log.end_offsets(topic::AUDIT).await {
        Ok(ends) => ends,
        Err(e) => return ServiceError::from(e).into_response(),
    };
    for (p, end) in (0u32..).zip(ends) {
        match state
            .log
            .read(topic::AUDIT, p, end.saturating_sub(200), 200)
            .await
        {
            Ok(records) => entries.extend(records.iter().filter_map(|r| emit::read_audit(r).ok())),
            Err(e) => return ServiceError::from(e).into_response(),
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.at));
    entries.truncate(200);
    axum::Json(json!({"entries": entries})).into_response()
}
