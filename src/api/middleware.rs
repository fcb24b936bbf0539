//! Middleware shared by every route: `x-request-id` (echoed or generated, on every response),
//! bearer-key auth (`--api-key` values and the store's keys), and response/rejection counting.
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

/// Routes open without a key (probes, scraping and the API's description; the playground's
/// files are open too).
const OPEN_ROUTES: [&str; 4] = ["/health", "/ready", "/metrics", super::apidoc::OPENAPI_PATH];

fn acceptable_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| s.to_string())
}

/// A fresh request id (`req-` + 24 hex digits).
pub fn new_request_id() -> String {
    let a = crate::ids::random_u64();
    let b = crate::ids::random_u64();
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

/// Who is calling: the store key that authenticated the request (its jobs are its own), or
/// `None` for an operator key (`--api-key`) or an open server. A request extension.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub key_id: Option<String>,
    /// The key's limit on queued and running images.
    pub max_queued_images: Option<u64>,
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

fn unauthorized() -> Response {
    let mut r = ApiError::Unauthorized.into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Requires `Authorization: Bearer <key>` when keys are configured (`--api-key`) or exist in
/// the job store; records the [`Caller`].
pub async fn auth(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if OPEN_ROUTES.contains(&path) || super::ui::is_page_path(path) {
        return next.run(req).await;
    }
    let keys = &state.config.api_keys;
    let presented = bearer(&req).map(str::to_string);
    let mut caller = presented
        .as_deref()
        .filter(|k| keys.accepts(k))
        .map(|_| Caller::default());
    let mut required = !keys.is_empty();
    if let (None, Some(jobs)) = (&caller, &state.jobs) {
        let store = &jobs.store;
        if let Some(token) = presented.as_deref() {
            match store.key_for_token(token).await {
                Ok(Some(row)) => {
                    caller = Some(Caller {
                        key_id: Some(row.id),
                        max_queued_images: row.max_queued_images,
                    })
                }
                Ok(None) => {}
                Err(e) => {
                    return ApiError::Internal(format!("reading API keys: {e}")).into_response();
                }
            }
        }
        if caller.is_none() {
            match store.has_keys().await {
                Ok(has) => required |= has,
                Err(e) => {
                    return ApiError::Internal(format!("reading API keys: {e}")).into_response();
                }
            }
        }
    }
    match caller {
        Some(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        None if required => unauthorized(),
        None => {
            req.extensions_mut().insert(Caller::default());
            next.run(req).await
        }
    }
}
