//! The HTTP layer (the only module that uses axum): the native routes (`/generate`,
//! `/generate/stream`), the OpenAI-compatible routes (`/v1/images/generations`, `/v1/models`),
//! operations (`/health`, `/ready`, `/info`, `/metrics`), the store-backed async jobs
//! (`/v1/jobs`, with the dispatcher that feeds them to the worker), and the middleware every
//! route shares: `x-request-id`, bearer auth, body limit, metrics; and the playground page
//! (`/`, `/ui/...`, files embedded from `web`); `/openapi.json` describes all of it (`apidoc`,
//! with the answer types in `schema`). Every failure is an [`ApiError`].
pub mod apidoc;
pub mod body;
mod drain;
mod edits;
pub mod error;
mod generate;
pub mod init_request;
mod job_codec;
mod job_follow;
mod jobs;
pub mod media;
pub mod middleware;
pub mod openai;
mod ops;
pub mod output;
pub mod quota;
pub mod request;
mod request_maps;
pub mod schema;
mod schema_events;
mod stream;
mod ui;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use crate::jobs::{JobService, JobsConfig};
pub use error::ApiError;
pub use job_codec::HttpJobCodec;

use crate::telemetry::Metrics;
use crate::worker::{Catalog, WorkerHandle};

/// Request body limit when none is configured: 1 MiB (prompts are bounded far below).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Body limit of the routes that carry pictures (init images, masks) when none is
/// configured: 16 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 16 * 1024 * 1024;

/// The API keys clients must present (`Authorization: Bearer <key>`); none = open.
/// Debug output never shows the keys.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<String>);

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> Self {
        Self(keys.into_iter().filter(|k| !k.is_empty()).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `candidate` is one of the keys (compared in constant time per key).
    pub fn accepts(&self, candidate: &str) -> bool {
        self.0.iter().fold(false, |found, key| {
            let same_len = key.len() == candidate.len();
            let diff = key
                .bytes()
                .zip(candidate.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found | (same_len && diff == 0)
        })
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} redacted)", self.0.len())
    }
}

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub api_keys: ApiKeys,
    pub max_body_bytes: usize,
    /// Body limit of `POST /generate`, `/generate/stream`, `/v1/jobs` and `/v1/images/edits`.
    pub max_upload_bytes: usize,
    /// Interval of `:` keep-alive comments on event streams.
    pub keep_alive: Duration,
    /// Server settings shown in `/info` (batch size, queue capacity, ...).
    pub settings: serde_json::Value,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            api_keys: ApiKeys::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            keep_alive: Duration::from_secs(15),
            settings: serde_json::Value::Null,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    pub worker: WorkerHandle,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ApiConfig>,
    /// The job store behind `/v1/jobs` and `response_format: "url"` (absent: those answer 404).
    pub jobs: Option<Arc<JobService>>,
    /// Images of synchronous requests in flight per API key (the quota counts them).
    pub in_flight: Arc<quota::InFlight>,
}

impl ApiState {
    pub fn new(worker: WorkerHandle, config: ApiConfig) -> Self {
        Self {
            worker,
            metrics: Arc::new(Metrics::default()),
            config: Arc::new(config),
            jobs: None,
            in_flight: Arc::default(),
        }
    }

    /// Serves async jobs from `jobs`.
    pub fn with_jobs(mut self, jobs: Arc<JobService>) -> Self {
        self.jobs = Some(jobs);
        self
    }

    /// The catalog, or 503 while loading / draining.
    fn ready_catalog(&self) -> Result<Arc<Catalog>, ApiError> {
        if self.worker.is_draining() {
            return Err(ApiError::Draining {
                retry_after: Duration::from_secs(5),
            });
        }
        if let Some(reason) = self.worker.failure() {
            return Err(ApiError::Unavailable(reason));
        }
        match self.worker.catalog() {
            Some(c) if self.worker.is_ready() => Ok(c),
            _ => Err(ApiError::NotReady {
                retry_after: Duration::from_secs(5),
            }),
        }
    }
}

/// Routes that generate images (their refusals are counted as rejections).
const GENERATION_ROUTES: [&str; 5] = [
    "/generate",
    "/generate/stream",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/jobs",
];

/// The whole HTTP API.
pub fn router(state: ApiState) -> Router {
    let max_body = state.config.max_body_bytes;
    let uploads = DefaultBodyLimit::max(state.config.max_upload_bytes);
    Router::new()
        .route("/", get(ui::index))
        .route("/ui/{*name}", get(ui::asset))
        .route("/generate", post(generate::native).layer(uploads))
        .route(
            "/generate/stream",
            get(generate::native_stream_get)
                .post(generate::native_stream_post)
                .layer(uploads),
        )
        .route("/v1/images/generations", post(generate::openai))
        .route(
            "/v1/images/edits",
            post(generate::openai_edit).layer(uploads),
        )
        .route("/v1/jobs", post(jobs::create).layer(uploads))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/v1/jobs/{id}/images/{k}", get(jobs::image))
        .route("/v1/jobs/{id}/images/{k}/maps", get(jobs::maps))
        .route("/v1/models", get(ops::models))
        .route("/v1/models/{id}", get(ops::model))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/info", get(ops::info))
        .route("/metrics", get(ops::metrics))
        .route(apidoc::OPENAPI_PATH, get(apidoc::openapi_json))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::auth,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::count,
        ))
        .layer(axum::middleware::from_fn(middleware::request_id))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(drain::drain_unread))
        .with_state(state)
}

/// Serves `router` on `listener` until `stop` resolves, then lets open requests finish.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_and_redacted() {
        let keys = ApiKeys::new(vec!["s3cret".into(), "other".into()]);
        assert!(keys.accepts("s3cret") && keys.accepts("other"));
        assert!(!keys.accepts("s3cre") && !keys.accepts("s3cretx") && !keys.accepts(""));
        assert!(!format!("{keys:?}").contains("s3cret"));
    }
}
