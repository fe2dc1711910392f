//! The agent console: a web page and the small JSON API behind it. Agents
//! sign in with their key (any credential whose role reads profiles) and
//! get a session that expires (`access.session_minutes`); failed sign-ins
//! are throttled per address. Every answer goes through the same
//! [`Viewer`] as gRPC: scoped, masked, audited. Supervisors reveal a field
//! with a reason and read their team's audit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cdp_domain::access::Permission;
use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller, Principal};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::access::AccessGrpc;
use crate::view::Update;
use crate::{Loaded, Lookup, ProfileQuery, Viewer};

const PAGE: &str = include_str!("console.html");

pub struct ConsoleState {
    pub query: ProfileQuery,
    pub access: Arc<Access>,
    pub api: Arc<AccessGrpc>,
}

pub fn router(state: Arc<ConsoleState>) -> Router {
    Router::new()
        .route("/console", get(|| async { Html(PAGE) }))
        .route("/api/login", post(login))
        .route("/api/me", get(me))
        .route("/api/search", get(search))
        .route("/api/profile", get(profile))
        .route("/api/watch", get(watch))
        .route("/api/reveal", post(reveal))
        .route("/api/audit", get(audit))
        .with_state(state)
}

/// A missing or unknown session.
fn unauthenticated(message: &str) -> ServiceError {
    ServiceError::Unauthenticated {
        message: message.to_owned(),
        challenge: Some("Bearer realm=\"cdp-console\""),
    }
}

impl ConsoleState {
    /// The caller of a console request: a valid session whose role grants
    /// `needs`, within its rate.
    async fn caller(
        &self,
        headers: &HeaderMap,
        client: SocketAddr,
        action: &str,
        needs: Permission,
    ) -> Result<Caller, ServiceError> {
        let session = cdp_runtime::auth::bearer(
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        )
        .ok_or_else(|| unauthenticated("sign in: a session is required"))?;
        let principal = self.access.from_session(session)?;
        let caller = Caller {
            principal: Arc::new(principal),
            client: client.to_string(),
            request_id: uuid::Uuid::new_v4().to_string(),
            action: format!("console/{action}"),
        };
        self.access.permit(caller, Some(needs)).await
    }

    async fn viewer(
        &self,
        headers: &HeaderMap,
        client: SocketAddr,
        action: &str,
    ) -> Result<Viewer, ServiceError> {
        let caller = self
            .caller(headers, client, action, Permission::ReadProfiles)
            .await?;
        Ok(Viewer::new(&self.access, caller))
    }
}

fn me_json(p: &Principal) -> Value {
    json!({
        "agent": p.name,
        "role": p.role.to_string(),
        "team": p.team,
        "can_reveal": p.role.allows(Permission::Reveal),
        "can_audit": p.role.allows(Permission::ReadAudit),
    })
}

#[derive(Deserialize)]
struct LoginRequest {
    token: String,
}

async fn login(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    axum::Json(body): axum::Json<LoginRequest>,
) -> Response {
    if let Err(e) = state.access.check_blocked(Some(client.ip())) {
        return e.into_response();
    }
    let principal = match state.access.registry.authenticate(body.token.trim()).await {
        Ok(p) => p,
        Err(e) => {
            state.access.failed(Some(client.ip()));
            let anonymous = Caller::anonymous(
                Some(client),
                uuid::Uuid::new_v4().to_string(),
                "console/login".into(),
            );
            state.access.denied(anonymous, &e).await;
            return e.into_response();
        }
    };
    if !principal.role.allows(Permission::ReadProfiles) {
        return ServiceError::PermissionDenied(format!(
            "the {} role does not use the console",
            principal.role
        ))
        .into_response();
    }
    let (session, expires_at) = state.access.session(&principal);
    let mut me = me_json(&principal);
    me["session"] = json!(session);
    me["expires_at"] = json!(expires_at);
    axum::Json(me).into_response()
}

async fn me(State(state): State<Arc<ConsoleState>>, headers: HeaderMap) -> Response {
    let session = cdp_runtime::auth::bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    match session.map(|s| state.access.from_session(s)) {
        Some(Ok(p)) => axum::Json(me_json(&p)).into_response(),
        Some(Err(e)) => e.into_response(),
        None => unauthenticated("sign in: a session is required").into_response(),
    }
}

#[derive(Deserialize)]
struct SearchQuery {
    q: String,
}

async fn search(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<SearchQuery>,
) -> Response {
    let viewer = match state.viewer(&headers, client, "search").await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    match state.query.search(&viewer, &q.q, 10).await {
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

impl ProfileQueryParams {
    fn lookup(self) -> Result<Lookup, ServiceError> {
        match (self.customer_id, self.kind, self.value) {
            (Some(c), _, _) => Ok(Lookup::CustomerId(c)),
            (None, Some(kind), Some(value)) => Ok(Lookup::Identifier(cdp_proto::v1::Identifier {
                kind,
                value,
            })),
            _ => Err(ServiceError::invalid(
                "customer_id",
                "give customer_id, or kind and value",
            )),
        }
    }
}

fn profile_json(
    loaded: &Loaded,
    currency: &str,
    traits: &[cdp_domain::audience::TraitValue],
) -> Value {
    let view = loaded.profile.view();
    let rfm = loaded.profile.rfm(cdp_runtime::now_ms(), currency);
    json!({
        "customer_id": loaded.profile.customer_id.to_string(),
        "identifiers": loaded.identifiers.iter().map(|i| json!({"kind": i.kind.to_string(), "value": i.value})).collect::<Vec<_>>(),
        "view": view,
        "rfm": rfm,
        "timeline": loaded.timeline,
        "segments": loaded.profile.audience.members.iter().map(|(name, m)| json!({"segment": name, "version": m.version, "since": m.since})).collect::<Vec<_>>(),
        "computed_traits": traits,
    })
}

async fn profile(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(p): Query<ProfileQueryParams>,
) -> Response {
    let viewer = match state.viewer(&headers, client, "profile").await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let lookup = match p.lookup() {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    match state
        .query
        .load_for(&viewer, Some(lookup), 50, &["profile"])
        .await
    {
        Ok(loaded) => {
            let traits = state
                .query
                .trait_values(&viewer, &loaded.profile, cdp_runtime::now_ms())
                .await;
            axum::Json(profile_json(&loaded, state.query.currency(), &traits)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct RevealRequest {
    customer_id: String,
    field: String,
    #[serde(default)]
    reason: String,
}

/// One field in clear, with a reason (supervisors and admins), audited.
async fn reveal(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Json(r): axum::Json<RevealRequest>,
) -> Response {
    let caller = match state
        .caller(&headers, client, "reveal", Permission::Reveal)
        .await
    {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let viewer = Viewer::new(&state.access, caller);
    match state
        .api
        .reveal(
            &viewer,
            Some(Lookup::CustomerId(r.customer_id)),
            &r.field,
            &r.reason,
        )
        .await
    {
        Ok(answer) => axum::Json(json!({
            "customer_id": answer.customer_id,
            "field": answer.field,
            "values": answer.values,
            "hide_after_ms": answer
                .hide_at
                .as_ref()
                .map(|t| cdp_proto::convert::timestamp_to_millis(t) - cdp_runtime::now_ms())
                .unwrap_or(0),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
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
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(w): Query<WatchQuery>,
) -> Response {
    let viewer = match state.viewer(&headers, client, "watch").await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    // The watch itself is audited and scoped; each reload is a profile read.
    if let Err(e) = state
        .query
        .load_for(
            &viewer,
            Some(Lookup::CustomerId(w.customer_id.clone())),
            1,
            &["watch"],
        )
        .await
    {
        return e.into_response();
    }
    let mut watch = state.query.watch();
    let query = state.query.clone();
    let mut watched = w.customer_id;
    // The identifiers of the view (unmasked, kept on the server), to find it
    // again after a generation switch.
    let mut identifiers = match query
        .load(Some(Lookup::CustomerId(watched.clone())), 1)
        .await
    {
        Ok(loaded) => loaded.identifiers,
        Err(e) => return e.into_response(),
    };
    let access = Arc::clone(&state.access);
    let credential = viewer.caller.principal.credential_id.clone();
    let viewer = viewer.clone();
    let stream = async_stream(move |tx| async move {
        loop {
            let update = query.next_update(&mut watch, &watched).await;
            // A key revoked or expired since the watch began ends it.
            if access.registry.by_id(&credential).is_err() {
                return;
            }
            let event = match update {
                Update::Changed => Event::default().event("changed").data(watched.clone()),
                Update::Switched(_) => {
                    let found = match query.relocate(&watched, &identifiers).await {
                        Ok(c) => query.load(Some(Lookup::CustomerId(c.to_string())), 1).await,
                        Err(e) => Err(e),
                    }
                    // Found again, and still the agent's to see.
                    .and_then(|loaded| viewer.admit(&loaded.profile).map(|()| loaded));
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

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    customer_id: String,
    #[serde(default)]
    actor: String,
}

/// The most recent audit entries of the supervisor's team (everyone's for
/// an admin), by customer or actor.
async fn audit(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let caller = match state
        .caller(&headers, client, "audit", Permission::ReadAudit)
        .await
    {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match state
        .api
        .audit_list(&caller, &q.customer_id, &q.actor, 200)
        .await
    {
        Ok(entries) => axum::Json(json!({"entries": entries})).into_response(),
        Err(e) => e.into_response(),
    }
}
