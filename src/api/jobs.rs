//! The async job routes (`/v1/jobs`): submit (202 + `Location`, `Idempotency-Key`), status
//! with queue position, progress and image links, the image files and attention-map bundles,
//! cancel, and progress as Server-Sent Events. Jobs belong to the API key that submitted them;
//! another key's job id answers 404 as if it did not exist.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::json;

use super::ApiState;
use super::apidoc::{
    BadPath, BadRequest, Internal, JobNotFound, QueueFull, TooLarge, Unauthorized, Unavailable,
};
use super::body::ApiPath;
use super::body::bytes_or_error;
use super::error::ApiError;
use super::job_codec::resolved_params;
use super::job_follow::Follow;
use super::middleware::Caller;
use super::request::{NativeRequest, Validated};
use super::schema::{
    ErrorEnvelope, ImageFile, JobErrorInfo, JobImage, JobProgress, JobView, MapsBundle, PngFile,
};
use crate::jobs::JobService;
use crate::store::{Insert, JobRow, JobStatus, NewJob, StoreError, sha256_hex};
use crate::worker::ImageFormat;

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

pub(super) fn store_error(e: StoreError) -> ApiError {
    ApiError::Internal(format!("job store: {e}"))
}

fn service(state: &ApiState) -> Result<&Arc<JobService>, ApiError> {
    state
        .jobs
        .as_ref()
        .ok_or_else(|| ApiError::RouteNotFound("/v1/jobs (this server runs no job store)".into()))
}

pub(super) fn unknown_job(id: &str) -> ApiError {
    ApiError::NotFound(format!("no job '{id}'"))
}

/// The `Idempotency-Key` header, checked.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::invalid(
            "Idempotency-Key",
            format!("Idempotency-Key must be 1..={MAX_IDEMPOTENCY_KEY} printable ASCII characters"),
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s.is_empty() || s.len() > MAX_IDEMPOTENCY_KEY || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

/// A job row plus whether it was created by this request.
pub(super) struct Submitted {
    pub row: JobRow,
    pub created: bool,
}

/// The idempotency hash of a request: the validated parameters (so `7` and `7.0`, or fields
/// in another order, are the same request), with the seed as the client gave it (a drawn seed
/// differs on every retry).
fn request_hash(validated: &Validated, req: &NativeRequest) -> String {
    let mut params = resolved_params(validated, req);
    params["seed"] = json!(req.seed);
    sha256_hex(params.to_string().as_bytes())
}

/// Validates `req`, replays the job an idempotency key already names (before any quota check,
/// so a retry is never refused), applies the caller's quota, and stores a queued job.
pub(super) async fn submit_job(
    state: &ApiState,
    caller: &Caller,
    req: &NativeRequest,
    idempotency_key: Option<String>,
) -> Result<Submitted, ApiError> {
    let jobs = service(state)?;
    let catalog = state.ready_catalog()?;
    let capacity = state.worker.stats().queue_capacity;
    let seed = super::generate::draw_seed();
    let validated = super::generate::validate_off_runtime(req, catalog, capacity, seed).await?;
    let n = validated.job.images.len();
    let new = NewJob {
        ensemble: validated.job.ensemble.clone(),
        params: resolved_params(&validated, req),
        seeds: validated.job.images.iter().map(|i| i.seed).collect(),
        owner: caller.key_id.clone(),
        idempotency: idempotency_key.map(|key| (key, request_hash(&validated, req))),
        // A claiming hint only (jobs with equal keys are claimed together); the worker batches
        // by the key itself.
        batch_key: Some(format!("{:?}", validated.job.batch_key())),
    };
    let outcome = match jobs
        .store
        .find_idempotent(&new)
        .await
        .map_err(store_error)?
    {
        Some(found) => found,
        None => {
            super::quota::check_job(state, caller, n).await?;
            jobs.store.insert_job(&new).await.map_err(store_error)?
        }
    };
    match outcome {
        Insert::Created(row) => {
            jobs.wake();
            tracing::info!(job = %row.id, images = n, "job queued");
            Ok(Submitted { row, created: true })
        }
        Insert::Existing(row) => Ok(Submitted {
            row,
            created: false,
        }),
        Insert::Conflict(row) => Err(ApiError::Conflict {
            message: format!(
                "this Idempotency-Key was used for another request (job {}); use a new key",
                row.id
            ),
            param: Some("Idempotency-Key".into()),
        }),
    }
}

/// `POST /v1/jobs`: 202 `{id, status, ...}` + `Location`.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = NativeRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "1..=255 printable ASCII characters: the same key and body answer the same job, another body 409")),
    responses(
        (status = 202, description = "The job, queued", body = JobView, headers(
            ("Location" = String, description = "/v1/jobs/<id>"),
            ("idempotent-replayed" = String, description = "`true` when an earlier job was answered"),
        )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, description = "Unknown model, or this server runs no job store", body = ErrorEnvelope),
        (status = 409, description = "The Idempotency-Key was used for another request", body = ErrorEnvelope),
        (status = 413, response = TooLarge),
        (status = 429, response = QueueFull),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("bearer" = [])),
)]
pub async fn create(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = super::edits::native_request(&headers, bytes_or_error(body)?).await?;
    if req.stream == Some(true) {
        return Err(ApiError::invalid(
            "stream",
            "jobs do not stream their answer; follow GET /v1/jobs/{id}/events instead",
        ));
    }
    let submitted = submit_job(&state, &caller, &req, idempotency_key(&headers)?).await?;
    let jobs = service(&state)?;
    let view = job_view(jobs, &submitted.row).await?;
    let mut r = (StatusCode::ACCEPTED, axum::Json(view)).into_response();
    let location = format!("/v1/jobs/{}", submitted.row.id);
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if !submitted.created {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(r)
}

async fn owned_job(state: &ApiState, caller: &Caller, id: &str) -> Result<JobRow, ApiError> {
    let jobs = service(state)?;
    jobs.store
        .job_for(id, caller.key_id.as_deref())
        .await
        .map_err(store_error)?
        .ok_or_else(|| unknown_job(id))
}

/// The JSON view of a job.
pub(super) async fn job_view(jobs: &JobService, row: &JobRow) -> Result<JobView, ApiError> {
    let mut position = None;
    let mut progress = None;
    match row.status {
        JobStatus::Queued => {
            // From the shared queue, so every replica answers the same.
            let ahead = jobs
                .store
                .images_ahead(row.queue_order)
                .await
                .map_err(store_error)?;
            position = Some(ahead);
        }
        JobStatus::Running => {
            // The running replica's memory when it is this one, else what it wrote to the row.
            let (at, step, total) = match jobs.live(&row.id) {
                Some(live) => (live.position, live.step, live.total),
                None => row
                    .progress
                    .map_or((None, 0, 0), |p| (p.position, p.step, p.total)),
            };
            position = at;
            progress = Some(JobProgress { step, total });
        }
        _ => {}
    }
    let mut images = Vec::new();
    if row.status == JobStatus::Succeeded {
        let artifacts = jobs.store.artifacts(&row.id).await.map_err(store_error)?;
        for a in artifacts.iter().filter(|a| image_format(&a.kind).is_some()) {
            let has_maps = artifacts
                .iter()
                .any(|m| m.kind == "maps" && m.index == a.index);
            images.push(JobImage {
                index: a.index,
                seed: row.seeds.get(a.index).copied(),
                url: format!("/v1/jobs/{}/images/{}", row.id, a.index),
                content_type: image_format(&a.kind)
                    .unwrap_or_default()
                    .content_type()
                    .into(),
                sha256: a.sha256.clone(),
                bytes: a.bytes,
                attention_maps_url: has_maps
                    .then(|| format!("/v1/jobs/{}/images/{}/maps", row.id, a.index)),
            });
        }
    }
    let ttl = jobs.config.result_ttl.as_millis() as i64;
    Ok(JobView {
        id: row.id.clone(),
        object: "job".into(),
        status: row.status.as_str().into(),
        model: row.ensemble.clone(),
        seeds: row.seeds.clone(),
        parameters: super::job_codec::public_params(&row.params),
        queue_position: position,
        progress,
        attempts: row.attempts,
        error: match row.status {
            JobStatus::Failed | JobStatus::Cancelled => Some(JobErrorInfo {
                message: row.error.clone(),
            }),
            _ => None,
        },
        timings: row.timings.clone(),
        images,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        expires_at: row.finished_at.map(|f| f + ttl),
    })
}

/// `GET /v1/jobs/{id}`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "get_job",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, response = BadPath),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 500, response = Internal),
    ),
    security((), ("bearer" = [])),
)]
pub async fn get(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let row = owned_job(&state, &caller, &id).await?;
    Ok(axum::Json(job_view(service(&state)?, &row).await?))
}

/// The image format an artifact kind names (`png`, `jpeg`, `webp`); `None` for `maps`.
fn image_format(kind: &str) -> Option<ImageFormat> {
    ImageFormat::parse(kind)
}

/// The bytes and kind of artifact `k` of job `id` whose kind `is_kind` accepts.
async fn artifact(
    state: &ApiState,
    caller: &Caller,
    (id, k): (&str, &str),
    (kind, is_kind): (&str, fn(&str) -> bool),
) -> Result<(Vec<u8>, String), ApiError> {
    let row = owned_job(state, caller, id).await?;
    let jobs = service(state)?;
    let missing = || ApiError::NotFound(format!("job '{id}' has no {kind} {k}"));
    let index: usize = k.parse().map_err(|_| missing())?;
    if row.status != JobStatus::Succeeded {
        return Err(ApiError::NotFound(format!(
            "job '{id}' is {}; its images exist once it succeeded",
            row.status.as_str()
        )));
    }
    let artifacts = jobs.store.artifacts(id).await.map_err(store_error)?;
    let found = artifacts
        .into_iter()
        .find(|a| a.index == index && is_kind(&a.kind))
        .ok_or_else(missing)?;
    let files = jobs.artifacts.clone();
    let found_kind = found.kind.clone();
    let read = tokio::task::spawn_blocking(move || files.read(&found))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match read {
        Ok(bytes) => Ok((bytes, found_kind)),
        Err(StoreError::NotFound(m)) => Err(ApiError::NotFound(m)),
        Err(e) => Err(store_error(e)),
    }
}

/// `GET /v1/jobs/{id}/images/{k}`: the image file, in the job's `output_format`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/images/{k}",
    tag = "jobs",
    operation_id = "get_job_image",
    params(("id" = String, Path, description = "The job id"), ("k" = u64, Path, description = "The image index")),
    responses(
        (status = 200, description = "The image, in the job's output_format", content(
            (PngFile = "image/png"),
            (ImageFile = "image/jpeg"),
            (ImageFile = "image/webp"),
        )),
        (status = 400, response = BadPath),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 500, response = Internal),
    ),
    security((), ("bearer" = [])),
)]
pub async fn image(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, k)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let is_image: fn(&str) -> bool = |kind| image_format(kind).is_some();
    let (bytes, kind) = artifact(&state, &caller, (&id, &k), ("image", is_image)).await?;
    let format = image_format(&kind).unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, format.content_type())], bytes).into_response())
}

/// `GET /v1/jobs/{id}/images/{k}/maps`: the attention-map bundle (JSON).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/images/{k}/maps",
    tag = "jobs",
    operation_id = "get_job_maps",
    params(("id" = String, Path, description = "The job id"), ("k" = u64, Path, description = "The image index")),
    responses(
        (status = 200, description = "The maps of image k", body = MapsBundle),
        (status = 400, response = BadPath),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 500, response = Internal),
    ),
    security((), ("bearer" = [])),
)]
pub async fn maps(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, k)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let is_maps: fn(&str) -> bool = |kind| kind == "maps";
    let (bytes, _) = artifact(&state, &caller, (&id, &k), ("maps", is_maps)).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job (409 once it finished).
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "cancel_job",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job, cancelled", body = JobView),
        (status = 400, response = BadPath),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 409, description = "The job already finished", body = ErrorEnvelope),
        (status = 500, response = Internal),
    ),
    security((), ("bearer" = [])),
)]
pub async fn cancel(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let row = owned_job(&state, &caller, &id).await?;
    let jobs = service(&state)?;
    match jobs.store.cancel(&row.id).await.map_err(store_error)? {
        // Queued may have turned running meanwhile: tell a follower either way.
        Some(_) => jobs.cancel_running(&row.id),
        None => {
            return Err(ApiError::Conflict {
                message: format!("job '{id}' already {}", row.status.as_str()),
                param: None,
            });
        }
    }
    let row = owned_job(&state, &caller, &id).await?;
    Ok(axum::Json(job_view(jobs, &row).await?))
}

/// `GET /v1/jobs/{id}/events`: `queued`, `progress` and `preview` (`partial_images`) events,
/// then `result` (the job view) or `error`, with keep-alive comments (see `job_follow.rs`).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    operation_id = "job_events",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = ref("#/components/schemas/JobStreamEvent")),
        (status = 400, response = BadPath),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 500, response = Internal),
    ),
    security((), ("bearer" = [])),
)]
pub async fn events(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let row = owned_job(&state, &caller, &id).await?;
    let keep_alive = state.config.keep_alive;
    let follow = Follow::new(service(&state)?.clone(), &row);
    let events = stream::unfold((follow, true), |(mut f, first)| async move {
        if f.done {
            return None;
        }
        if !first {
            f.wait().await;
        }
        let events = f.next_events().await;
        Some((
            stream::iter(events.into_iter().map(Ok::<_, Infallible>)),
            (f, false),
        ))
    });
    use futures_util::StreamExt;
    Ok(Sse::new(events.flatten())
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response())
}

/// Waits (at most `limit`) until job `id` finished; the final row. While this replica runs the
/// job it waits for the job's end in memory; otherwise it reads the row with back-off.
pub(super) async fn await_job(
    jobs: &JobService,
    id: &str,
    limit: Duration,
) -> Result<JobRow, ApiError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut poll = super::job_follow::Backoff::new();
    loop {
        let row = jobs
            .store
            .job(id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| unknown_job(id))?;
        if row.status.is_terminal() {
            return Ok(row);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::TimedOut(limit));
        }
        let pause =
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + poll.pause()));
        match jobs.subscribe(id) {
            Some(mut rx) => {
                // Running here: its live state closes when it ends.
                let ended = async { while rx.changed().await.is_ok() {} };
                tokio::select! {
                    _ = ended => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                poll.reset();
            }
            None => pause.await,
        }
    }
}
