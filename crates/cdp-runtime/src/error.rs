//! The one error model of every API: a [`ServiceError`] has an
//! [`ErrorCode`], and the code alone decides the gRPC status and the HTTP
//! status (the Segment API, the webhooks, the console and every gRPC
//! service answer alike). Errors of the ports (log, stores) map to it here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cdp_domain::FieldError;
use cdp_log::LogError;
use cdp_store::StoreError;
use serde_json::json;
use thiserror::Error;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// What kind of failure a call met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is wrong; retrying it unchanged fails again.
    InvalidArgument,
    /// No credential, or not a valid one.
    Unauthenticated,
    /// A valid credential that may not do this.
    PermissionDenied,
    NotFound,
    /// The request is valid but the state does not allow it now.
    FailedPrecondition,
    /// The request is larger than accepted.
    TooLarge,
    /// Too many requests from this caller; retry later.
    RateLimited,
    /// The body's encoding or media type is not one we read.
    UnsupportedMediaType,
    /// A dependency (log, store) cannot be reached; the caller may retry.
    Unavailable,
    /// The process sheds load (too many requests, the pipeline too far
    /// behind, memory too high); retry after a second.
    Overloaded,
    Cancelled,
    /// A bug or a broken invariant.
    Internal,
}

impl ErrorCode {
    pub fn grpc(self) -> Code {
        match self {
            ErrorCode::InvalidArgument | ErrorCode::UnsupportedMediaType => Code::InvalidArgument,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::TooLarge | ErrorCode::RateLimited | ErrorCode::Overloaded => {
                Code::ResourceExhausted
            }
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::Cancelled => Code::Cancelled,
            ErrorCode::Internal => Code::Internal,
        }
    }

    pub fn http(self) -> StatusCode {
        match self {
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::FailedPrecondition => StatusCode::CONFLICT,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::Unavailable | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            // What nginx answers for a client that went away.
            ErrorCode::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code's name in HTTP bodies (gRPC's names where it has the kind;
    /// `TOO_LARGE` and `UNSUPPORTED_MEDIA_TYPE` are HTTP's finer kinds of
    /// `RESOURCE_EXHAUSTED` and `INVALID_ARGUMENT`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::FailedPrecondition => "FAILED_PRECONDITION",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::RateLimited => "RESOURCE_EXHAUSTED",
            ErrorCode::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Overloaded => "RESOURCE_EXHAUSTED",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

#[derive(Debug, Clone, Error)]
pub enum ServiceError {
    /// The request is wrong; the fields say how.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldError>),
    /// `challenge` is the `WWW-Authenticate` an HTTP answer carries (none
    /// for a webhook whose signature did not match).
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        message: String,
        challenge: Option<&'static str>,
    },
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("rate limited: {0}")]
    RateLimited(String),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// A dependency (log, store) cannot be reached; the caller may retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Load shed: retry after [`RETRY_AFTER_SECS`].
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A bug or a broken invariant.
    #[error("internal: {0}")]
    Internal(String),
}

fn describe(fields: &[FieldError]) -> String {
    fields
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ServiceError::InvalidArgument(vec![FieldError::new(field, reason)])
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ServiceError::Unauthenticated { .. } => ErrorCode::Unauthenticated,
            ServiceError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            ServiceError::NotFound(_) => ErrorCode::NotFound,
            ServiceError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            ServiceError::TooLarge(_) => ErrorCode::TooLarge,
            ServiceError::RateLimited(_) => ErrorCode::RateLimited,
            ServiceError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ServiceError::Unavailable(_) => ErrorCode::Unavailable,
            ServiceError::Overloaded(_) => ErrorCode::Overloaded,
            ServiceError::Cancelled(_) => ErrorCode::Cancelled,
            ServiceError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn log_if_internal(&self) {
        if self.code() == ErrorCode::Internal {
            tracing::error!(error = %self, "internal error");
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        e.log_if_internal();
        let code = e.code().grpc();
        match &e {
            ServiceError::InvalidArgument(fields) => {
                let mut details = ErrorDetails::new();
                for f in fields {
                    details.add_bad_request_violation(f.field.clone(), f.reason.clone());
                }
                Status::with_error_details(code, e.to_string(), details)
            }
            ServiceError::Overloaded(_) => {
                let mut status = Status::new(code, e.to_string());
                // gRFC A6: how long a retrying client should wait.
                status.metadata_mut().insert(
                    "grpc-retry-pushback-ms",
                    tonic::metadata::MetadataValue::from(RETRY_AFTER_SECS * 1000),
                );
                status
            }
            _ => Status::new(code, e.to_string()),
        }
    }
}

/// How long a client refused for load should wait, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An HTTP answer: the status of the code and a JSON body
/// `{"success": false, "error": "...", "code": "INVALID_ARGUMENT",
/// "violations": [{"field": ..., "reason": ...}]}` (Segment's clients read
/// `success`; the console reads `error`).
impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        self.log_if_internal();
        let code = self.code();
        let violations: Vec<serde_json::Value> = match &self {
            ServiceError::InvalidArgument(fields) => fields
                .iter()
                .map(|f| json!({"field": f.field, "reason": f.reason}))
                .collect(),
            _ => Vec::new(),
        };
        let body = json!({
            "success": false,
            "error": self.to_string(),
            "code": code.as_str(),
            "violations": violations,
        });
        let mut response = (code.http(), axum::Json(body)).into_response();
        if let ServiceError::Unauthenticated {
            challenge: Some(challenge),
            ..
        } = &self
        {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let ServiceError::Overloaded(_) = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => ServiceError::Unavailable(m),
            StoreError::Invalid(m) => ServiceError::invalid("request", m),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

impl From<LogError> for ServiceError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Invalid(m) => ServiceError::invalid("request", m),
            other => ServiceError::Unavailable(format!("the event log: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_arguments_name_every_field_in_message_and_details() {
        let status: Status = ServiceError::InvalidArgument(vec![
            FieldError::new("channel", "unknown channel \"fax\""),
            FieldError::new("type", "is required"),
        ])
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("channel: unknown channel"));
        assert!(status.message().contains("type: is required"));
        let details = status.get_error_details();
        let bad = details.bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[0].field, "channel");
    }

    #[tokio::test]
    async fn one_code_gives_the_same_answer_over_grpc_and_http() {
        let cases = [
            (
                ServiceError::invalid("batch", "is empty"),
                Code::InvalidArgument,
                400,
            ),
            (
                ServiceError::Unauthenticated {
                    message: "missing write key".into(),
                    challenge: Some("Basic realm=\"cdp\""),
                },
                Code::Unauthenticated,
                401,
            ),
            (ServiceError::NotFound("x".into()), Code::NotFound, 404),
            (
                ServiceError::FailedPrecondition("rebuilding".into()),
                Code::FailedPrecondition,
                409,
            ),
            (
                ServiceError::TooLarge("big".into()),
                Code::ResourceExhausted,
                413,
            ),
            (
                ServiceError::Unavailable("log".into()),
                Code::Unavailable,
                503,
            ),
        ];
        for (error, grpc, http) in cases {
            let text = error.to_string();
            let code = error.code();
            assert_eq!(code.grpc(), grpc, "{text}");
            assert_eq!(code.http().as_u16(), http, "{text}");
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), http);
            if http == 401 {
                assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
            }
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["success"], false);
            assert_eq!(body["error"], text);
            assert_eq!(body["code"], code.as_str());
        }
    }

    #[test]
    fn port_errors_map_to_what_a_caller_can_act_on() {
        assert_eq!(
            ServiceError::from(StoreError::Unavailable("down".into())).code(),
            ErrorCode::Unavailable
        );
        assert_eq!(
            ServiceError::from(StoreError::Invalid("bad page token".into())).code(),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            ServiceError::from(StoreError::Storage("disk".into())).code(),
            ErrorCode::Internal
        );
        assert_eq!(
            ServiceError::from(LogError::Closed).code(),
            ErrorCode::Unavailable
        );
    }
}
