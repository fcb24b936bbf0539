//! Operational routes: `/health` (alive), `/ready` (loaded, warmed up, not draining), `/info`
//! (what is served, said plainly when weights are untrained), `/metrics` (Prometheus text),
//! `/v1/models[/{id}]`, and the error answers for unknown routes and methods.
use axum::extract::{Path, State};
use axum::http::{Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::ApiState;
use super::error::ApiError;
use super::openai::{model_object, models_list};
use crate::telemetry::WorkerGauges;

/// `GET /health`: the process is alive.
pub async fn health() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

/// `GET /ready`: 200 when serving, 503 + Retry-After while loading or draining.
pub async fn ready(State(state): State<ApiState>) -> Result<axum::Json<Value>, ApiError> {
    state.ready_catalog()?;
    Ok(axum::Json(json!({"status": "ready"})))
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

/// `GET /info`.
pub async fn info(State(state): State<ApiState>) -> axum::Json<Value> {
    let mut body = json!({
        "name": "afa-server",
        "version": env!("CARGO_PKG_VERSION"),
        "state": state_name(&state),
        "server": state.config.settings,
    });
    if let Some(reason) = state.worker.failure() {
        body["failure"] = json!(reason);
    }
    if let Some(c) = state.worker.catalog() {
        let l = &c.limits;
        body["device"] = json!(c.device);
        body["dtype"] = json!(c.dtype);
        body["default_ensemble"] = json!(c.default_ensemble);
        body["limits"] = json!({
            "min_side": l.min_side, "max_side": l.max_side, "max_pixels": l.max_pixels,
            "max_steps": l.max_steps, "max_guidance": l.max_guidance, "max_n": l.max_batch,
            "max_prompt_bytes": l.max_prompt_bytes, "max_body_bytes": state.config.max_body_bytes,
            "max_attention_map_bytes": l.max_map_bytes,
        });
        let ensembles: Vec<Value> = c
            .ensembles
            .iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "description": e.description,
                    "untrained": e.untrained,
                    "note": e.untrained.then_some(
                        "UNTRAINED: these weights are seeded random, so every image is noise; it exists to test the server"),
                    "members": e.members.iter().map(|(n, h)| json!({"name": n, "weight_hash": h})).collect::<Vec<_>>(),
                    "dtype": e.dtype,
                    "modes": e.modes,
                    "schedulers": e.schedulers,
                    "defaults": {
                        "steps": e.default_steps, "guidance_scale": e.default_guidance,
                        "scheduler": e.default_scheduler, "width": e.default_width,
                        "height": e.default_height, "ensemble_mode": e.default_mode,
                    },
                    "allowed_sizes": e.allowed_sizes.iter().map(|(w, h)| format!("{w}x{h}")).collect::<Vec<_>>(),
                })
            })
            .collect();
        body["ensembles"] = json!(ensembles);
    }
    axum::Json(body)
}

/// `GET /metrics`.
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

/// `GET /v1/models`.
pub async fn models(State(state): State<ApiState>) -> Result<axum::Json<Value>, ApiError> {
    let c = state.ready_catalog()?;
    Ok(axum::Json(models_list(&c)))
}

/// `GET /v1/models/{id}`.
pub async fn model(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let c = state.ready_catalog()?;
    match model_object(&c, &id) {
        Value::Null => Err(ApiError::unknown_model(&id)),
        v => Ok(axum::Json(v)),
    }
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
