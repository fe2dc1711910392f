//! The service error kinds and their one mapping to gRPC status codes.

use cdp_domain::FieldError;
use thiserror::Error;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, Error)]
pub enum ServiceError {
    /// The request is wrong; the fields say how.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldError>),
    #[error("not found: {0}")]
    NotFound(String),
    /// A dependency (log, store) cannot be reached; the caller may retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
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

    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Cancelled(_) => Code::Cancelled,
            ServiceError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        match &e {
            ServiceError::InvalidArgument(fields) => {
                let mut details = ErrorDetails::new();
                for f in fields {
                    details.add_bad_request_violation(f.field.clone(), f.reason.clone());
                }
                Status::with_error_details(code, e.to_string(), details)
            }
            _ => Status::new(code, e.to_string()),
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
}
