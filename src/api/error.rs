//! The one error type of the HTTP layer and its mapping to a response: every failure on every
//! route becomes `{"error": {"message", "type", "param", "code"}}` with the right status (and
//! `Retry-After` where waiting helps). Internal details of 5xx errors are logged, never sent.
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::schema::{ErrorBody, ErrorEnvelope};

use crate::worker::{JobError, SubmitError};

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: the caller sent something wrong; `param` names the field when there is one.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
    },
    /// 401: missing or wrong API key.
    #[error("invalid or missing API key")]
    Unauthorized,
    /// 404: an unknown model (ensemble).
    #[error("{message}")]
    ModelNotFound { message: String, param: String },
    /// 404: no such job (another key's job answers the same).
    #[error("{0}")]
    NotFound(String),
    /// 409: an `Idempotency-Key` reused with another request, or cancelling a finished job.
    #[error("{message}")]
    Conflict {
        message: String,
        param: Option<String>,
    },
    /// 404: no such route.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// 405: the route exists with other methods.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 413: the body, or the requested pixels, are too large.
    #[error("{message}")]
    TooLarge {
        message: String,
        param: Option<String>,
    },
    /// 429: the queue is full.
    #[error("the queue is full; retry after {}s", retry_secs(*retry_after))]
    QueueFull { retry_after: Duration },
    /// 503: models still loading.
    #[error("models are still loading; retry after {}s", retry_secs(*retry_after))]
    NotReady { retry_after: Duration },
    /// 503: models failed to load or warm up; the server will not turn ready (the reason says
    /// which stage and ensemble; details are in the log).
    #[error("not serving: {0}")]
    Unavailable(String),
    /// 503: shutting down.
    #[error("the server is shutting down; retry on another replica")]
    Draining { retry_after: Duration },
    /// 503: the job database does not answer (readiness only; it comes back by itself).
    #[error("the job database does not answer; retry after {}s", retry_secs(*retry_after))]
    DatabaseDown { retry_after: Duration },
    /// 503: the job was cancelled by the server (for example at the end of a shutdown grace).
    #[error("the job was cancelled by the server")]
    Cancelled,
    /// 504: the job ran past `--request-timeout-s`.
    #[error("the job timed out after {}s", .0.as_secs())]
    TimedOut(Duration),
    /// 500: a bug or an engine failure; the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

fn retry_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound { .. } | ApiError::RouteNotFound(_) | ApiError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady { .. }
            | ApiError::Unavailable(_)
            | ApiError::Draining { .. }
            | ApiError::DatabaseDown { .. }
            | ApiError::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `code` of the envelope; also the `reason` label of rejection metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid { .. } => "invalid_value",
            ApiError::Unauthorized => "invalid_api_key",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::RouteNotFound(_) => "not_found",
            ApiError::NotFound(_) => "job_not_found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::TooLarge { .. } => "payload_too_large",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::NotReady { .. } => "not_ready",
            ApiError::Unavailable(_) => "models_failed",
            ApiError::Draining { .. } => "draining",
            ApiError::DatabaseDown { .. } => "database_unavailable",
            ApiError::Cancelled => "cancelled",
            ApiError::TimedOut(_) => "timeout",
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "authentication_error",
            ApiError::QueueFull { .. } => "rate_limit_error",
            ApiError::NotReady { .. }
            | ApiError::Unavailable(_)
            | ApiError::Draining { .. }
            | ApiError::DatabaseDown { .. }
            | ApiError::Cancelled
            | ApiError::TimedOut(_)
            | ApiError::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { param, .. }
            | ApiError::TooLarge { param, .. }
            | ApiError::Conflict { param, .. } => param.as_deref(),
            ApiError::ModelNotFound { param, .. } => Some(param),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::QueueFull { retry_after }
            | ApiError::NotReady { retry_after }
            | ApiError::Draining { retry_after }
            | ApiError::DatabaseDown { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The envelope, typed.
    pub fn envelope(&self) -> ErrorEnvelope {
        let message = match self {
            ApiError::Internal(_) => {
                "internal server error (logged with this response's x-request-id)".to_string()
            }
            other => other.to_string(),
        };
        ErrorEnvelope {
            error: ErrorBody {
                message,
                kind: self.kind().into(),
                param: self.param().map(str::to_string),
                code: self.code().into(),
            },
        }
    }

    /// The JSON envelope.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(self.envelope()).unwrap_or_default()
    }

    /// Maps a worker refusal.
    pub fn from_submit(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { retry_after } => ApiError::QueueFull { retry_after },
            SubmitError::NotReady { retry_after } => ApiError::NotReady { retry_after },
            SubmitError::Draining { retry_after } => ApiError::Draining { retry_after },
            SubmitError::Invalid { field, reason } => ApiError::invalid(&field, reason),
            SubmitError::TooLarge { field, reason } => ApiError::TooLarge {
                message: reason,
                param: Some(field),
            },
            SubmitError::UnknownEnsemble(name) => ApiError::unknown_model(&name),
        }
    }

    /// Maps a failure of an accepted job.
    pub fn from_job(e: JobError) -> Self {
        match e {
            JobError::Invalid { field, reason } => {
                ApiError::invalid(&field, format!("invalid {field}: {reason}"))
            }
            JobError::TimedOut(d) => ApiError::TimedOut(d),
            JobError::Failed(m) => ApiError::Internal(m),
        }
    }

    /// A 404 for model `name`.
    pub fn unknown_model(name: &str) -> Self {
        ApiError::ModelNotFound {
            message: format!("unknown model '{name}' (GET /v1/models lists them)"),
            param: "model".into(),
        }
    }
}

/// Marks responses built from an `ApiError`, for the metrics middleware.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "request failed");
        }
        let mut response = (status, axum::Json(self.envelope())).into_response();
        let headers = response.headers_mut();
        if let Some(after) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(after)));
        }
        if status.is_server_error() && !matches!(self, ApiError::Cancelled) {
            let retry = matches!(self, ApiError::NotReady { .. } | ApiError::Draining { .. });
            headers.insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        response.extensions_mut().insert(ErrorCode(self.code()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_the_four_keys() {
        let body = ApiError::invalid("steps", "steps must be 1..=500").body();
        let e = &body["error"];
        assert_eq!(e["param"], "steps");
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "invalid_value");
        assert!(e["message"].as_str().unwrap().contains("1..=500"));
    }

    #[test]
    fn internal_details_are_not_sent() {
        let body = ApiError::Internal("CUDA out of memory at 0xdead".into()).body();
        assert!(!body.to_string().contains("0xdead"));
    }

    #[test]
    fn retry_after_is_rounded_up() {
        let r = ApiError::QueueFull {
            retry_after: Duration::from_millis(1200),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
