//! The Segment-compatible HTTP API (`/v1/track`, `/v1/identify`, `/v1/page`,
//! `/v1/screen`, `/v1/group`, `/v1/alias`, `/v1/batch`) and the webhook
//! endpoints, over the same [`Ingestor`] as gRPC.
//!
//! A request is all or nothing: if any event of a batch is refused, the
//! answer names every bad field and nothing is appended.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::sync::Arc;
use subtle::ConstantTimeEq;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use cdp_domain::{Channel, FieldError, RawTouchpoint, Touchpoint};
use cdp_runtime::ServiceError;
use cdp_runtime::config::{MessengerConfig, SourceConfig, ZaloConfig};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::segment::{self, SourceContext};
use crate::webhooks;
use crate::{Ingestor, Outcome, now_ms};

/// A configured source, ready for look-ups.
#[derive(Debug, Clone)]
pub struct Source {
    pub id: String,
    pub channel: Channel,
    write_key: String,
    allowed_types: Vec<String>,
}

impl Source {
    pub fn from_config(c: &SourceConfig) -> Result<Self, String> {
        Ok(Source {
            id: c.id.clone(),
            channel: c.channel.parse()?,
            write_key: c.write_key.expose().to_owned(),
            allowed_types: c.allowed_types.clone(),
        })
    }

    fn allows(&self, event_type: &str) -> bool {
        self.allowed_types.is_empty() || self.allowed_types.iter().any(|t| t == event_type)
    }
}

pub struct HttpState {
    pub ingestor: Ingestor,
    pub sources: Vec<Source>,
    pub max_event_bytes: usize,
    pub max_batch_bytes: usize,
    pub zalo: Option<ZaloConfig>,
    pub messenger: Option<MessengerConfig>,
}

/// A refused request: the platform's one error model, whose code decides
/// the HTTP status (`cdp_runtime::error`).
pub type HttpError = ServiceError;

/// A missing or unknown write key (Segment's clients authenticate with
/// HTTP basic auth).
fn unauthenticated(message: impl Into<String>) -> HttpError {
    ServiceError::Unauthenticated {
        message: message.into(),
        challenge: Some("Basic realm=\"cdp\""),
    }
}

fn ok() -> Response {
    (StatusCode::OK, axum::Json(json!({"success": true}))).into_response()
}

/// Accepted, with the identifier values that were dropped (not valid for
/// their kind), each named by the Segment field it came from.
fn ok_with(warnings: &[FieldError]) -> Response {
    if warnings.is_empty() {
        return ok();
    }
    let warnings: Vec<Value> = warnings
        .iter()
        .map(|w| json!({"field": w.field, "reason": w.reason}))
        .collect();
    (
        StatusCode::OK,
        axum::Json(json!({"success": true, "warnings": warnings})),
    )
        .into_response()
}

/// The HTTP router: Segment API, webhooks, and a liveness probe.
pub fn router(state: Arc<HttpState>) -> Router {
    let limit = state.max_batch_bytes.saturating_mul(4).max(1024 * 1024);
    Router::new()
        .route("/v1/batch", post(batch))
        .route("/v1/import", post(batch))
        .route("/v1/{call}", post(single))
        .route("/webhooks/zalo", post(zalo))
        .route("/webhooks/messenger", post(messenger).get(messenger_verify))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The body, decompressed when `Content-Encoding: gzip`, at most `max` bytes.
fn body_bytes(
    headers: &HeaderMap,
    body: &Bytes,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, HttpError> {
    let too_big = |n: usize| {
        ServiceError::TooLarge(format!(
            "{what} is {n} bytes or more; at most {max} bytes are accepted"
        ))
    };
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let bytes = match encoding.as_deref() {
        None | Some("") | Some("identity") => body.to_vec(),
        Some("gzip") => {
            let mut out = Vec::new();
            let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
            flate2::read::GzDecoder::new(body.as_ref())
                .take(limit)
                .read_to_end(&mut out)
                .map_err(|e| ServiceError::invalid("body", format!("is not valid gzip: {e}")))?;
            out
        }
        Some(other) => {
            return Err(ServiceError::UnsupportedMediaType(format!(
                "Content-Encoding {other:?} is not supported; send gzip or nothing"
            )));
        }
    };
    if bytes.len() > max {
        return Err(too_big(bytes.len()));
    }
    Ok(bytes)
}

impl HttpState {
    /// The source whose write key is in the basic-auth user name (or, as
    /// Segment allows, in the body's `writeKey`).
    fn source(&self, headers: &HeaderMap, body_key: Option<&str>) -> Result<&Source, HttpError> {
        let from_header = basic_key(headers);
        let key = from_header
            .or_else(|| body_key.map(str::to_owned))
            .ok_or_else(|| {
                unauthenticated(
                    "missing write key: use HTTP basic auth with the write key as user name",
                )
            })?;
        // Compared in constant time against every key (hashes of equal length).
        let given = Sha256::digest(key.as_bytes());
        let mut found = None;
        for s in &self.sources {
            let known = Sha256::digest(s.write_key.as_bytes());
            if bool::from(known.ct_eq(&given)) && found.is_none() {
                found = Some(s);
            }
        }
        found.ok_or_else(|| unauthenticated("unknown write key"))
    }
}

/// The write key of a basic `Authorization` header (its user name).
fn basic_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .map(|user_pass| {
            user_pass
                .split_once(':')
                .map_or(user_pass.clone(), |(u, _)| u.to_owned())
        })
}

impl HttpState {
    /// Maps, checks and validates every message; all or nothing.
    fn prepare(
        &self,
        source: &Source,
        messages: &[(String, segment::Message, usize)],
        batch_sent_at: Option<&str>,
        prefix: impl Fn(usize) -> String,
    ) -> Result<Vec<Touchpoint>, HttpError> {
        let now = now_ms();
        let ctx = SourceContext {
            source_id: &source.id,
            channel: source.channel,
            received_at: now,
        };
        let mut violations = Vec::new();
        let mut valid = Vec::with_capacity(messages.len());
        for (i, (kind, m, size)) in messages.iter().enumerate() {
            let p = prefix(i);
            if *size > self.max_event_bytes {
                let field = if p.is_empty() {
                    "event".to_owned()
                } else {
                    p.trim_end_matches('.').to_owned()
                };
                violations.push(FieldError::new(
                    field,
                    format!(
                        "the event is {size} bytes; at most {} bytes are accepted per event",
                        self.max_event_bytes
                    ),
                ));
                continue;
            }
            let raw: RawTouchpoint = match segment::to_touchpoint(kind, m, batch_sent_at, &ctx) {
                Ok(r) => r,
                Err(errs) => {
                    violations.extend(
                        errs.into_iter()
                            .map(|e| FieldError::new(format!("{p}{}", e.field), e.reason)),
                    );
                    continue;
                }
            };
            let event_type = raw.event_type.clone().unwrap_or_default();
            if !source.allows(&event_type) {
                violations.push(FieldError::new(
                    format!("{p}event"),
                    format!(
                        "event type {event_type:?} is not allowed for source {}",
                        source.id
                    ),
                ));
                continue;
            }
            match self.ingestor.validate(&raw, now) {
                Ok(t) => valid.push(t),
                Err(errs) => violations.extend(errs.into_iter().map(|e| {
                    FieldError::new(format!("{p}{}", segment_field(&e.field, &raw)), e.reason)
                })),
            }
        }
        if violations.is_empty() {
            Ok(valid)
        } else {
            Err(ServiceError::InvalidArgument(violations))
        }
    }
}

/// Our field names in the Segment vocabulary, where they differ: an
/// identifier is named by the Segment field it came from.
fn identifier_source(kind: &str) -> &'static str {
    match kind {
        "user_id" => "userId",
        "anonymous_id" => "anonymousId",
        "email" => "traits.email",
        "phone" => "traits.phone",
        "device_id" => "context.device.id",
        _ => "userId",
    }
}

fn segment_field(field: &str, raw: &RawTouchpoint) -> String {
    match field {
        "occurred_at" => "timestamp".into(),
        "type" => "event".into(),
        "event_id" => "messageId".into(),
        other if other.starts_with("identifiers[") => other
            .trim_start_matches("identifiers[")
            .split(']')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| raw.identifiers.get(i))
            .map_or("userId", |id| identifier_source(&id.kind))
            .to_owned(),
        other => other.to_owned(),
    }
}

/// At most this many events in one `/v1/batch` (as `TrackBatch`; Segment's
/// libraries send 100 or fewer).
pub const MAX_BATCH_EVENTS: usize = 500;

/// A Segment message from its JSON; a field of the wrong type is named
/// under `prefix` (`batch[3].event`).
fn message_of(value: Value) -> Result<segment::Message, impl Fn(&str) -> FieldError> {
    segment::message_from_json(value).map_err(|e| {
        move |prefix: &str| {
            let field = match (prefix, e.field.as_str()) {
                ("", "") => "body".to_owned(),
                ("", f) => f.to_owned(),
                (pre, "") => pre.to_owned(),
                (pre, f) => format!("{pre}.{f}"),
            };
            FieldError::new(field, e.reason.clone())
        }
    })
}

/// Parses a JSON body, or answers 400 saying why not.
fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ServiceError::invalid("body", format!("is not valid JSON: {e}")))
}

/// A webhook's configuration, or 404 when it is not configured.
fn configured<'a, T>(config: &'a Option<T>, name: &str) -> Result<&'a T, HttpError> {
    config
        .as_ref()
        .ok_or_else(|| ServiceError::NotFound(format!("the {name} webhook is not configured")))
}

const CALLS: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

async fn append(state: &HttpState, touchpoints: Vec<Touchpoint>) -> Result<Response, HttpError> {
    append_named(state, touchpoints, |_| String::new()).await
}

/// Appends, answering with the dropped identifier values named in the
/// Segment vocabulary (`prefix` names a message of a batch).
async fn append_named(
    state: &HttpState,
    touchpoints: Vec<Touchpoint>,
    prefix: impl Fn(usize) -> String,
) -> Result<Response, HttpError> {
    let warnings: Vec<FieldError> = touchpoints
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            let p = prefix(i);
            t.personal.dropped.iter().map(move |d| {
                FieldError::new(
                    format!("{p}{}", identifier_source(d.kind.as_str())),
                    format!("dropped, the event was kept without it: {}", d.reason),
                )
            })
        })
        .collect();
    let outcomes = state.ingestor.append(&touchpoints).await?;
    let duplicates = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Duplicate(_)))
        .count();
    tracing::debug!(
        events = touchpoints.len(),
        duplicates,
        "http events appended"
    );
    Ok(ok_with(&warnings))
}

async fn single(
    State(state): State<Arc<HttpState>>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    if !CALLS.contains(&call.as_str()) {
        return Err(ServiceError::NotFound(format!("no endpoint /v1/{call}")));
    }
    // A key in the header is checked before the body is decompressed or parsed.
    if basic_key(&headers).is_some() {
        state.source(&headers, None)?;
    }
    let bytes = body_bytes(&headers, &body, state.max_event_bytes, "the event")?;
    let value: Value = json_body(&bytes)?;
    let source = state
        .source(&headers, value.get("writeKey").and_then(Value::as_str))?
        .clone();
    let message = message_of(value).map_err(|e| ServiceError::InvalidArgument(vec![e("")]))?;
    let touchpoints = state.prepare(&source, &[(call, message, bytes.len())], None, |_| {
        String::new()
    })?;
    append_named(&state, touchpoints, |_| String::new()).await
}

/// The top of a `/v1/batch` body; each event stays JSON text until it is
/// parsed on its own.
#[derive(Deserialize)]
struct RawBatch<'a> {
    #[serde(borrow, default)]
    batch: Option<&'a serde_json::value::RawValue>,
    #[serde(rename = "writeKey", default)]
    write_key: Option<Value>,
    #[serde(rename = "sentAt", default)]
    sent_at: Option<Value>,
    #[serde(default)]
    context: Option<Value>,
}

async fn batch(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    if basic_key(&headers).is_some() {
        state.source(&headers, None)?;
    }
    let bytes = body_bytes(&headers, &body, state.max_batch_bytes, "the batch")?;
    // The events are parsed from their own text, each straight into a
    // message (no `Value` tree of the whole batch, no copy of each event),
    // and measured as sent.
    let raw: RawBatch<'_> = serde_json::from_slice(&bytes).map_err(|e| {
        if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
            ServiceError::invalid("batch", "is required and must be a list")
        } else {
            ServiceError::invalid("body", format!("is not valid JSON: {e}"))
        }
    })?;
    let source = state
        .source(&headers, raw.write_key.as_ref().and_then(Value::as_str))?
        .clone();
    let items: Vec<&serde_json::value::RawValue> = raw
        .batch
        .and_then(|b| serde_json::from_str(b.get()).ok())
        .ok_or_else(|| ServiceError::invalid("batch", "is required and must be a list"))?;
    if items.is_empty() {
        return Err(ServiceError::invalid("batch", "is empty"));
    }
    if items.len() > MAX_BATCH_EVENTS {
        return Err(ServiceError::invalid(
            "batch",
            format!(
                "holds {} events; at most {MAX_BATCH_EVENTS} are accepted per request (split it)",
                items.len()
            ),
        ));
    }
    let sent_at = raw
        .sent_at
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_owned);
    let batch_context = match raw.context {
        Some(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let mut messages = Vec::with_capacity(items.len());
    let mut violations = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let text = item.get();
        let parsed = segment::message_from_str(text).map_err(|e| {
            let prefix = format!("batch[{i}]");
            let field = if e.field.is_empty() {
                prefix
            } else {
                format!("{prefix}.{}", e.field)
            };
            FieldError::new(field, e.reason)
        });
        match parsed {
            Ok(mut m) => {
                for (k, v) in &batch_context {
                    m.context.entry(k.clone()).or_insert_with(|| v.clone());
                }
                match m.kind.clone() {
                    Some(kind) => messages.push((kind, m, text.len())),
                    None => violations.push(FieldError::new(
                        format!("batch[{i}].type"),
                        "is required in a batch",
                    )),
                }
            }
            Err(e) => violations.push(e),
        }
    }
    if !violations.is_empty() {
        return Err(ServiceError::InvalidArgument(violations));
    }
    let touchpoints = state.prepare(&source, &messages, sent_at.as_deref(), |i| {
        format!("batch[{i}].")
    })?;
    append_named(&state, touchpoints, |i| format!("batch[{i}].")).await
}

async fn zalo(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let config = configured(&state.zalo, "Zalo")?;
    let signature = headers
        .get("x-zevent-signature")
        .and_then(|v| v.to_str().ok());
    if !webhooks::zalo_signature_ok(config.oa_secret_key.expose(), &body, signature) {
        return Err(ServiceError::Unauthenticated {
            message: "X-ZEvent-Signature does not match the event".into(),
            challenge: None,
        });
    }
    let value: Value = json_body(&body)?;
    webhooks::zalo_fresh(&value, now_ms(), config.max_age_secs).map_err(|reason| {
        ServiceError::Unauthenticated {
            message: reason,
            challenge: None,
        }
    })?;
    let Some(raw) = webhooks::zalo_event(&value, &config.source_id)
        .map_err(|e| ServiceError::InvalidArgument(vec![e]))?
    else {
        return Ok(ok());
    };
    let touchpoint = state
        .ingestor
        .validate(&raw, now_ms())
        .map_err(ServiceError::InvalidArgument)?;
    append(&state, vec![touchpoint]).await
}

#[derive(Deserialize)]
struct VerifyQuery {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

async fn messenger_verify(
    State(state): State<Arc<HttpState>>,
    Query(q): Query<VerifyQuery>,
) -> Result<Response, HttpError> {
    let config = configured(&state.messenger, "Messenger")?;
    if q.mode.as_deref() == Some("subscribe")
        && q.verify_token.as_deref().is_some_and(|t| {
            bool::from(
                Sha256::digest(t.as_bytes())
                    .ct_eq(&Sha256::digest(config.verify_token.expose().as_bytes())),
            )
        })
    {
        Ok((StatusCode::OK, q.challenge.unwrap_or_default()).into_response())
    } else {
        Err(ServiceError::PermissionDenied(
            "hub.verify_token does not match".into(),
        ))
    }
}

async fn messenger(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let config = configured(&state.messenger, "Messenger")?;
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !webhooks::messenger_signature_ok(config.app_secret.expose(), &body, signature) {
        return Err(ServiceError::Unauthenticated {
            message: "X-Hub-Signature-256 does not match the body".into(),
            challenge: None,
        });
    }
    let value: Value = json_body(&body)?;
    let raws = webhooks::messenger_events(&value, &config.source_id)
        .map_err(|e| ServiceError::InvalidArgument(vec![e]))?;
    let now = now_ms();
    let mut touchpoints = Vec::with_capacity(raws.len());
    for raw in &raws {
        touchpoints.push(
            state
                .ingestor
                .validate(raw, now)
                .map_err(ServiceError::InvalidArgument)?,
        );
    }
    append(&state, touchpoints).await
}
