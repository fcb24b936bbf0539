//! Operational routes: `/health` (alive), `/ready` (loaded, warmed up, not draining), `/info`
//! (what is served, said plainly when weights are untrained), `/metrics` (Prometheus text),
//! `/v1/models[/{id}]`, and the error answers for unknown routes and methods.
use axum::extract::State;
use axum::http::{Uri, header};
use axum::response::{IntoResponse, Response};

use super::ApiState;
use super::apidoc::{BadPath, Internal, ModelNotFound, Unauthorized, Unavailable};
use super::body::ApiPath;
use super::error::ApiError;
use super::openai::{model_object, models_list};
use super::schema::{
    Info, InfoDefaults, InfoDevice, InfoEnsemble, InfoLimits, InfoMember, ModelList, ModelObject,
    Status,
};
use crate::telemetry::{DeviceGauges, WorkerGauges};
use crate::worker::DeviceState;

/// `GET /health`: the process is alive (no key needed).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", body = Status)))]
pub async fn health() -> axum::Json<Status> {
    axum::Json(Status {
        status: "ok".into(),
    })
}

/// `GET /ready`: 200 when serving, 503 + Retry-After while loading or draining (no key needed).
#[utoipa::path(get, path = "/ready", tag = "operations", responses(
    (status = 200, description = "Serving", body = Status),
        (status = 503, response = Unavailable),
))]
pub async fn ready(State(state): State<ApiState>) -> Result<axum::Json<Status>, ApiError> {
    state.ready_catalog()?;
    if state.jobs.as_ref().is_some_and(|j| !j.database_ok()) {
        return Err(ApiError::DatabaseDown {
            retry_after: crate::jobs::HEALTH_EVERY,
        });
    }
    Ok(axum::Json(Status {
        status: "ready".into(),
    }))
}

fn state_name(state: &ApiState) -> &'static str {
    if state.worker.is_draining() {
        "draining"
    } else if state.worker.failure().is_some() {
        "failed"
    } else if state.worker.is_ready() {
        "ready"
    } else {
        "loading"
    }
}

const UNTRAINED_NOTE: &str = "UNTRAINED: these weights are seeded random, so every image is noise; it exists to test the server";

/// `GET /info`: what is served, limits, settings, and where the OpenAPI document is.
#[utoipa::path(get, path = "/info", tag = "operations", responses(
    (status = 200, description = "The server", body = Info),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
),
    security((), ("bearer" = [])),
)]
pub async fn info(State(state): State<ApiState>) -> axum::Json<Info> {
    let mut body = Info {
        name: "afa-server".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        state: state_name(&state).into(),
        server: state.config.settings.clone(),
        openapi: super::apidoc::OPENAPI_PATH.into(),
        failure: state.worker.failure(),
        devices: state
            .worker
            .stats()
            .devices
            .into_iter()
            .map(|d| InfoDevice {
                name: d.name,
                state: d.state.name().into(),
                failure: match d.state {
                    DeviceState::Failed(reason) => Some(reason),
                    _ => None,
                },
                running_images: d.running_images,
                batches: d.batches,
                failed_batches: d.failed_batches,
                last_error: d.last_error,
                completed_images: d.completed_images,
                images_per_second: d.images_per_second,
            })
            .collect(),
        device: None,
        dtype: None,
        default_ensemble: None,
        limits: None,
        ensembles: None,
    };
    if let Some(c) = state.worker.catalog() {
        let l = &c.limits;
        body.device = Some(c.device.clone());
        body.dtype = Some(c.dtype.clone());
        body.default_ensemble = Some(c.default_ensemble.clone());
        body.limits = Some(InfoLimits {
            min_side: l.min_side,
            max_side: l.max_side,
            max_pixels: l.max_pixels,
            max_steps: l.max_steps,
            max_guidance: l.max_guidance,
            max_n: l.max_batch,
            max_prompt_bytes: l.max_prompt_bytes,
            max_body_bytes: state.config.max_body_bytes,
            max_upload_bytes: state.config.max_upload_bytes,
            max_attention_map_bytes: l.max_map_bytes,
        });
        let ensembles = c
            .ensembles
            .iter()
            .map(|e| InfoEnsemble {
                name: e.name.clone(),
                description: e.description.clone(),
                untrained: e.untrained,
                note: e.untrained.then(|| UNTRAINED_NOTE.to_string()),
                members: e
                    .members
                    .iter()
                    .map(|(n, h)| InfoMember {
                        name: n.clone(),
                        weight_hash: h.clone(),
                    })
                    .collect(),
                dtype: e.dtype.clone(),
                modes: e.modes.clone(),
                schedulers: e.schedulers.clone(),
                defaults: InfoDefaults {
                    steps: e.default_steps,
                    guidance_scale: e.default_guidance,
                    scheduler: e.default_scheduler.clone(),
                    width: e.default_width,
                    height: e.default_height,
                    ensemble_mode: e.default_mode.clone(),
                },
                allowed_sizes: e
                    .allowed_sizes
                    .iter()
                    .map(|(w, h)| format!("{w}x{h}"))
                    .collect(),
            })
            .collect();
        body.ensembles = Some(ensembles);
    }
    axum::Json(body)
}

/// `GET /metrics`: Prometheus text (no key needed).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<ApiState>) -> Response {
    let s = state.worker.stats();
    let gauges = WorkerGauges {
        queued_images: s.queued_images,
        running_images: s.running_images,
        queue_capacity: s.queue_capacity,
        images_per_second: s.images_per_second,
        completed_images: s.completed_images,
        failed_jobs: s.failed_jobs,
        cancelled_images: s.cancelled_images,
        last_batch_size: s.last_batch_size,
        ready: state.worker.is_ready(),
        draining: state.worker.is_draining(),
        devices: s
            .devices
            .iter()
            .map(|d| DeviceGauges {
                name: d.name.clone(),
                up: d.state == DeviceState::Ready,
                running_images: d.running_images,
                batches: d.batches,
                failed_batches: d.failed_batches,
                completed_images: d.completed_images,
                images_per_second: d.images_per_second,
            })
            .collect(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&gauges),
    )
        .into_response()
}

/// `GET /v1/models`: the served ensembles.
#[utoipa::path(get, path = "/v1/models", tag = "openai", responses(
    (status = 200, description = "The served ensembles", body = ModelList),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
),
    security((), ("bearer" = [])),
)]
pub async fn models(State(state): State<ApiState>) -> Result<axum::Json<ModelList>, ApiError> {
    let c = state.ready_catalog()?;
    Ok(axum::Json(models_list(&c)))
}

/// `GET /v1/models/{id}`: one served ensemble.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "The ensemble name")),
    responses(
    (status = 200, description = "The ensemble", body = ModelObject),
        (status = 400, response = BadPath),
        (status = 401, response = Unauthorized),
        (status = 404, response = ModelNotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
),
    security((), ("bearer" = [])),
)]
pub async fn model(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ModelObject>, ApiError> {
    let c = state.ready_catalog()?;
    model_object(&c, &id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::unknown_model(&id))
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
