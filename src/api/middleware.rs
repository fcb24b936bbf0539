//! Middleware shared by every route: `x-request-id` (echoed or generated, on every response),
//! bearer-key auth, and response/rejection counting.
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::{ApiError, ErrorCode};
use super::{ApiState, GENERATION_ROUTES};

/// The id of the request being served (a request extension).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Routes open without a key (probes and scraping).
const OPEN_ROUTES: [&str; 3] = ["/health", "/ready", "/metrics"];

fn acceptable_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| s.to_string())
}

/// A fresh request id (`req-` + 24 hex digits).
pub fn new_request_id() -> String {
    let a = super::generate::random_u64();
    let b = super::generate::random_u64();
    format!("req-{a:016x}{:08x}", b as u32)
}

/// Echoes the client's `x-request-id` or makes one; logs one line per request.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(acceptable_id)
        .unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("http", request_id = %id);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = std::time::Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            %method,
            %path,
            status = response.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Counts responses per route and rejections of generation routes.
pub async fn count(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    state.metrics.response(&route, response.status().as_u16());
    if GENERATION_ROUTES.contains(&route.as_str())
        && let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>()
        && response.status().as_u16() != 500
    {
        state.metrics.reject(code);
    }
    response
}

/// Requires `Authorization: Bearer <key>` when keys are configured.
pub async fn auth(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    if keys.is_empty() || OPEN_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match presented {
        Some(key) if keys.accepts(key) => next.run(req).await,
        _ => {
            let mut r = ApiError::Unauthorized.into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}
