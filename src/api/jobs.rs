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
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::json;

use super::ApiState;
use super::apidoc::{
    BadPath, BadRequest, Internal, JobNotFound, QueueFull, TooLarge, Unauthorized, Unavailable,
};
use super::body::ApiPath;
use super::body::{bytes_or_error, parse_json};
use super::error::ApiError;
use super::job_codec::resolved_params;
use super::middleware::Caller;
use super::request::{NativeRequest, Validated, validate};
use super::schema::{
    ErrorEnvelope, JobErrorInfo, JobImage, JobProgress, JobProgressData, JobQueuedData, JobView,
    MapsBundle, PngFile,
};
use super::stream::event;
use crate::jobs::JobService;
use crate::store::{Insert, JobRow, JobStatus, NewJob, StoreError, sha256_hex};

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

fn store_error(e: StoreError) -> ApiError {
    ApiError::Internal(format!("job store: {e}"))
}

fn service(state: &ApiState) -> Result<&Arc<JobService>, ApiError> {
    state
        .jobs
        .as_ref()
        .ok_or_else(|| ApiError::RouteNotFound("/v1/jobs (this server runs no job store)".into()))
}

fn unknown_job(id: &str) -> ApiError {
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
    let validated = validate(req, &catalog, capacity, super::generate::draw_seed())?;
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
    let bytes = bytes_or_error(body)?;
    let req: NativeRequest = parse_json(&bytes)?;
    if req.stream == Some(true) {
        return Err(ApiError::invalid(
            "stream",
            "jobs do not stream their answer; follow GET /v1/jobs/{id}/events instead",
        ));
    }
    let submitted = submit_job(&state, &caller, &req, idempotency_key(&headers)?).await?;
    let jobs = service(&state)?;
    let view = job_view(&state, jobs, &submitted.row).await?;
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
pub(super) async fn job_view(
    state: &ApiState,
    jobs: &JobService,
    row: &JobRow,
) -> Result<JobView, ApiError> {
    let mut position = None;
    let mut progress = None;
    match row.status {
        JobStatus::Queued => {
            let before = jobs
                .store
                .queued_images_before(row.queue_order)
                .await
                .map_err(store_error)?;
            let s = state.worker.stats();
            position = Some(before + s.queued_images + s.running_images);
        }
        JobStatus::Running => {
            let live = jobs.live(&row.id).unwrap_or_default();
            position = live.position;
            progress = Some(JobProgress {
                step: live.step,
                total: live.total,
            });
        }
        _ => {}
    }
    let mut images = Vec::new();
    if row.status == JobStatus::Succeeded {
        let artifacts = jobs.store.artifacts(&row.id).await.map_err(store_error)?;
        for a in artifacts.iter().filter(|a| a.kind == "png") {
            let has_maps = artifacts
                .iter()
                .any(|m| m.kind == "maps" && m.index == a.index);
            images.push(JobImage {
                index: a.index,
                seed: row.seeds.get(a.index).copied(),
                url: format!("/v1/jobs/{}/images/{}", row.id, a.index),
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
        parameters: row.params.clone(),
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
    Ok(axum::Json(job_view(&state, service(&state)?, &row).await?))
}

async fn artifact(
    state: &ApiState,
    caller: &Caller,
    (id, k): (&str, &str),
    kind: &str,
) -> Result<Vec<u8>, ApiError> {
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
        .find(|a| a.index == index && a.kind == kind)
        .ok_or_else(missing)?;
    let files = jobs.artifacts.clone();
    let read = tokio::task::spawn_blocking(move || files.read(&found))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match read {
        Ok(bytes) => Ok(bytes),
        Err(StoreError::NotFound(m)) => Err(ApiError::NotFound(m)),
        Err(e) => Err(store_error(e)),
    }
}

/// `GET /v1/jobs/{id}/images/{k}`: the PNG.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/images/{k}",
    tag = "jobs",
    operation_id = "get_job_image",
    params(("id" = String, Path, description = "The job id"), ("k" = u64, Path, description = "The image index")),
    responses(
        (status = 200, description = "The PNG", content_type = "image/png", body = PngFile),
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
    let bytes = artifact(&state, &caller, (&id, &k), "png").await?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
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
    let bytes = artifact(&state, &caller, (&id, &k), "maps").await?;
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
    Ok(axum::Json(job_view(&state, jobs, &row).await?))
}

struct Follow {
    state: ApiState,
    jobs: Arc<JobService>,
    id: String,
    last: Option<(Option<usize>, usize)>,
    done: bool,
}

impl Follow {
    /// The events since the last call; sets `done` at the end of the job.
    async fn next_events(&mut self) -> Vec<Event> {
        let row = match self.jobs.store.job(&self.id).await {
            Ok(Some(row)) => row,
            Ok(None) => {
                self.done = true;
                return vec![event("error", &unknown_job(&self.id).body())];
            }
            Err(e) => {
                self.done = true;
                return vec![event("error", &store_error(e).body())];
            }
        };
        let view = match job_view(&self.state, &self.jobs, &row).await {
            Ok(v) => v,
            Err(e) => {
                self.done = true;
                return vec![event("error", &e.body())];
            }
        };
        if row.status.is_terminal() {
            self.done = true;
            let name = if row.status == JobStatus::Succeeded {
                "result"
            } else {
                "error"
            };
            return vec![event(name, &json!(view))];
        }
        let position = view.queue_position;
        let step = view.progress.as_ref().map_or(0, |p| p.step);
        if self.last == Some((position, step)) {
            return vec![];
        }
        self.last = Some((position, step));
        match (row.status, position) {
            (JobStatus::Queued, p) | (JobStatus::Running, p @ Some(_)) => {
                let data = JobQueuedData {
                    status: row.status.as_str().into(),
                    position: p,
                };
                vec![event("queued", &json!(data))]
            }
            _ => {
                let data = JobProgressData {
                    status: "running".into(),
                    step,
                    total: view.progress.as_ref().map(|p| p.total),
                };
                vec![event("progress", &json!(data))]
            }
        }
    }

    /// Waits for news: a live update, or a tenth of a second.
    async fn wait(&self) {
        let pause = tokio::time::sleep(Duration::from_millis(100));
        match self.jobs.subscribe(&self.id) {
            Some(mut rx) => {
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = pause => {}
                }
            }
            None => pause.await,
        }
    }
}

/// `GET /v1/jobs/{id}/events`: `queued` and `progress` events, then `result` (the job view)
/// or `error`, with keep-alive comments.
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
    let follow = Follow {
        jobs: service(&state)?.clone(),
        state,
        id: row.id,
        last: None,
        done: false,
    };
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

/// Waits (polling the store, at most `limit`) until job `id` finished; the final row.
pub(super) async fn await_job(
    jobs: &JobService,
    id: &str,
    limit: Duration,
) -> Result<JobRow, ApiError> {
    let deadline = tokio::time::Instant::now() + limit;
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
        let pause = tokio::time::sleep(Duration::from_millis(200));
        match jobs.subscribe(id) {
            Some(mut rx) => {
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = pause => {}
                }
            }
            None => pause.await,
        }
    }
}
