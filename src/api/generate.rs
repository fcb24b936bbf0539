//! The generation handlers: parse, validate against the catalog, submit to the worker, wait
//! for the result (or stream it), and answer as PNG bytes or JSON. Dropping the handler's
//! future (the client went away) drops the `JobTicket`, which cancels the job.
use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::ApiState;
use super::apidoc::{
    BadRequest, Internal, ModelNotFound, QueueFull, TimedOut, TooLarge, Unauthorized, Unavailable,
};
use super::body::{bytes_or_error, parse_json, parse_query};
use super::error::ApiError;
use super::media::image_file;
use super::middleware::{Caller, RequestId};
use super::openai::{OpenAiImageRequest, quality_steps, to_native};
use super::output::{native_json, openai_json, render_blocking, server_timing};
use super::quota::{QuotaGuard, admit_sync};
use super::request::{NativeQuery, NativeRequest, Validated, validate};
use super::schema::{ImageFile, NativeResponse, OpenAiImage, OpenAiImagesResponse, PngFile};
use super::stream::{Flavor, sse_response};
use crate::telemetry::Metrics;
use crate::worker::{ImageFormat, JobEvent, JobOutput, JobTicket};

/// A seed for a request without one: 32 bits, so every client (and A1111) can hold it.
pub(super) fn draw_seed() -> u64 {
    crate::ids::random_u64() & 0xffff_ffff
}

/// Counts a client disconnect when dropped before `finish`.
pub(super) struct DisconnectGuard {
    metrics: Arc<Metrics>,
    done: bool,
}

impl DisconnectGuard {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            done: false,
        }
    }

    pub(super) fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.disconnect();
            tracing::info!("client went away; job cancelled");
        }
    }
}

/// An accepted synchronous job: its ticket, and the caller's quota share it holds until the
/// request ends.
pub(super) struct Admitted {
    pub ticket: JobTicket,
    pub quota: Option<QuotaGuard>,
}

/// [`validate`], on a blocking thread when the request carries pictures (decoding and resizing
/// an upload of up to 16 Mpx takes long enough to stall the async workers), inline otherwise.
pub(super) async fn validate_off_runtime(
    req: &NativeRequest,
    catalog: Arc<crate::worker::Catalog>,
    capacity: usize,
    seed: u64,
) -> Result<Validated, ApiError> {
    if req.init_image.is_none() && req.mask.is_none() {
        return validate(req, &catalog, capacity, seed);
    }
    let req = req.clone();
    tokio::task::spawn_blocking(move || validate(&req, &catalog, capacity, seed))
        .await
        .map_err(|e| ApiError::Internal(format!("validation task: {e}")))?
}

/// Validates, checks the caller's quota, and submits.
async fn submit(
    state: &ApiState,
    caller: &Caller,
    req: &NativeRequest,
) -> Result<(Validated, Admitted), ApiError> {
    let catalog = state.ready_catalog()?;
    let capacity = state.worker.stats().queue_capacity;
    let validated = validate_off_runtime(req, catalog, capacity, draw_seed()).await?;
    let quota = admit_sync(state, caller, validated.job.images.len()).await?;
    let ticket = state
        .worker
        .submit(validated.job.clone())
        .map_err(ApiError::from_submit)?;
    Ok((validated, Admitted { ticket, quota }))
}

/// Waits for the job's result, skipping progress events.
pub(super) async fn wait_output(
    ticket: &mut JobTicket,
    metrics: &Metrics,
) -> Result<JobOutput, ApiError> {
    while let Some(event) = ticket.events.recv().await {
        if let JobEvent::Finished(result) = event {
            let output = result.map_err(ApiError::from_job)?;
            record_timings(metrics, &output);
            return Ok(output);
        }
    }
    Err(ApiError::Internal(
        "the worker dropped the job without a result".into(),
    ))
}

pub(super) fn record_timings(metrics: &Metrics, output: &JobOutput) {
    let t = &output.timings;
    metrics.job_finished(t.queue, [t.text_encode, t.denoise, t.decode, t.png_encode]);
}

fn accepts(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|part| part.trim().starts_with(mime)))
}

/// `POST /generate`: generate and answer with JSON (base64 PNGs, seeds, timings), the PNG
/// itself (`Accept` naming the `output_format`'s type, e.g. `image/png`, n = 1, no maps), or
/// Server-Sent Events (`stream: true` or
/// `Accept: text/event-stream`).
#[utoipa::path(
    post,
    path = "/generate",
    tag = "native",
    request_body = NativeRequest,
    responses(
        (status = 200, description = "The images", content(
            (NativeResponse = "application/json"),
            (PngFile = "image/png"),
            (ImageFile = "image/jpeg"),
            (ImageFile = "image/webp"),
            (ref("#/components/schemas/NativeStreamEvent") = "text/event-stream"),
        ), headers(
            ("x-seed" = u64, description = "The seed (bare image answers)"),
            ("server-timing" = String, description = "Stage timings (bare image answers)"),
        )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = ModelNotFound),
        (status = 413, response = TooLarge),
        (status = 429, response = QueueFull),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
        (status = 504, response = TimedOut),
    ),
    security((), ("bearer" = [])),
)]
pub async fn native(
    State(state): State<ApiState>,
    Extension(id): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = super::edits::native_request(&headers, bytes_or_error(body)?).await?;
    let answer = Answer {
        sse: req.stream.unwrap_or(false) || accepts(&headers, "text/event-stream"),
        file: ImageFormat::ALL.map(|f| accepts(&headers, f.content_type())),
    };
    run_native(state, (id, caller), req, answer).await
}

/// How a native request wants its answer.
#[derive(Debug, Clone, Copy)]
struct Answer {
    sse: bool,
    /// Per format of `ImageFormat::ALL`, whether `Accept` names its media type (the bare
    /// file is the answer when it names the request's `output_format`).
    file: [bool; 3],
}

impl Answer {
    fn wants_file(&self, format: ImageFormat) -> bool {
        ImageFormat::ALL
            .iter()
            .zip(self.file)
            .any(|(f, yes)| *f == format && yes)
    }
}

/// `POST /generate/stream`: like `/generate`, answered with Server-Sent Events (`queued`,
/// `progress`, then `result` with the `/generate` JSON, or `error` with the envelope).
#[utoipa::path(
    post,
    path = "/generate/stream",
    tag = "native",
    operation_id = "native_stream_post",
    request_body = NativeRequest,
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = ref("#/components/schemas/NativeStreamEvent")),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = ModelNotFound),
        (status = 413, response = TooLarge),
        (status = 429, response = QueueFull),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("bearer" = [])),
)]
pub async fn native_stream_post(
    State(state): State<ApiState>,
    Extension(id): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = super::edits::native_request(&headers, bytes_or_error(body)?).await?;
    let answer = Answer {
        sse: true,
        file: [false; 3],
    };
    run_native(state, (id, caller), req, answer).await
}

/// `GET /generate/stream?prompt=...&steps=...`: the same fields as query parameters,
/// answered with Server-Sent Events.
#[utoipa::path(
    get,
    path = "/generate/stream",
    tag = "native",
    operation_id = "native_stream_get",
    params(NativeQuery),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = ref("#/components/schemas/NativeStreamEvent")),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = ModelNotFound),
        (status = 413, response = TooLarge),
        (status = 429, response = QueueFull),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("bearer" = [])),
)]
pub async fn native_stream_get(
    State(state): State<ApiState>,
    Extension(id): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query: NativeQuery = parse_query(query.as_deref().unwrap_or(""))?;
    let answer = Answer {
        sse: true,
        file: [false; 3],
    };
    run_native(state, (id, caller), NativeRequest::from(query), answer).await
}

async fn run_native(
    state: ApiState,
    (id, caller): (RequestId, Caller),
    req: NativeRequest,
    answer: Answer,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    if let Some(n) = req.partial_images.filter(|&n| n > 0 && !answer.sse) {
        return Err(ApiError::invalid(
            "partial_images",
            format!(
                "partial_images {n} sends previews as stream events: it needs stream: true (or follow a /v1/jobs job's events)"
            ),
        ));
    }
    let (validated, mut admitted) = submit(&state, &caller, &req).await?;
    if answer.sse {
        let flavor = Flavor::Native {
            request_id: id.0,
            warnings: Vec::new(),
        };
        return Ok(sse_response(state, validated, admitted, flavor));
    }
    let mut guard = DisconnectGuard::new(state.metrics.clone());
    let output = wait_output(&mut admitted.ticket, &state.metrics).await;
    guard.finish();
    let output = output?;
    state
        .metrics
        .request_duration("/generate", started.elapsed());
    let encoding = validated.output.encoding;
    if answer.wants_file(encoding.format)
        && validated.job.images.len() == 1
        && validated.maps.is_none()
    {
        let bytes = if encoding.format == ImageFormat::Png {
            output.images[0].png.clone()
        } else {
            let image = output.images[0].clone();
            render_blocking(move || Ok(image_file(&image, encoding)?.into_owned())).await?
        };
        return Ok(file_response(&output, encoding.format, bytes));
    }
    let body = render_blocking(move || native_json(&output, &validated, &id.0, &[])).await?;
    Ok(axum::Json(body).into_response())
}

/// The bare image answer (`bytes`, the file of the only image), with seed, timings and
/// warnings as headers.
fn file_response(output: &JobOutput, format: ImageFormat, bytes: Vec<u8>) -> Response {
    let image = &output.images[0];
    let mut r = ([(header::CONTENT_TYPE, format.content_type())], bytes).into_response();
    let h = r.headers_mut();
    h.insert("x-seed", HeaderValue::from(image.seed));
    if let Ok(v) = HeaderValue::from_str(&server_timing(&output.timings)) {
        h.insert("server-timing", v);
    }
    for w in &image.warnings {
        if let Ok(v) = HeaderValue::from_str(w) {
            h.append("x-warning", v);
        }
    }
    r
}

/// `POST /v1/images/generations`: the OpenAI-compatible route (`b64_json` or `url` answers;
/// `stream: true` sends `image_generation.progress` and `image_generation.completed` events).
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "openai",
    request_body = OpenAiImageRequest,
    responses(
        (status = 200, description = "The images", content(
            (OpenAiImagesResponse = "application/json"),
            (ref("#/components/schemas/OpenAiStreamEvent") = "text/event-stream"),
        )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = ModelNotFound),
        (status = 413, response = TooLarge),
        (status = 429, response = QueueFull),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
        (status = 504, response = TimedOut),
    ),
    security((), ("bearer" = [])),
)]
pub async fn openai(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: OpenAiImageRequest = parse_json(&bytes_or_error(body)?)?;
    let (native, options) = to_native(req)?;
    let route = "/v1/images/generations";
    run_openai(&state, &caller, &headers, native, options, (route, started)).await
}

/// `POST /v1/images/edits`: an OpenAI edit (multipart, as the official client sends it) as
/// image-to-image, or inpainting where the mask (or the picture itself) is transparent.
/// Answers as `/v1/images/generations` does.
#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "openai",
    request_body(content = super::edits::OpenAiEditForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The images", content(
            (OpenAiImagesResponse = "application/json"),
            (ref("#/components/schemas/OpenAiStreamEvent") = "text/event-stream"),
        )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = ModelNotFound),
        (status = 413, response = TooLarge),
        (status = 429, response = QueueFull),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("bearer" = []))
)]
pub async fn openai_edit(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    form: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let form = form.map_err(|e| ApiError::Invalid {
        message: format!("send multipart/form-data: {}", e.body_text()),
        param: None,
    })?;
    let (native, options) = super::edits::read_edit(form).await?;
    let route = "/v1/images/edits";
    run_openai(&state, &caller, &headers, native, options, (route, started)).await
}

/// The OpenAI routes after parsing: quality as steps, logging of the caller's ids, then a
/// stored job (`url`), a stream, or a wait for the images. `timing`: the route's name in the
/// metrics and when the request arrived.
async fn run_openai(
    state: &ApiState,
    caller: &Caller,
    headers: &HeaderMap,
    mut native: NativeRequest,
    options: super::openai::OpenAiOptions,
    (route, started): (&'static str, Instant),
) -> Result<Response, ApiError> {
    if native.steps.is_none() && options.quality != "auto" {
        let catalog = state.ready_catalog()?;
        let name = native.model.as_deref().unwrap_or(&catalog.default_ensemble);
        if let Some(entry) = catalog.ensemble(name) {
            let steps = quality_steps(
                &options.quality,
                entry.default_steps,
                catalog.limits.max_steps,
            );
            native.steps = Some(steps as u64);
        }
    }
    if options.user.is_some() || options.safety_identifier.is_some() {
        let (user, safety_identifier) = (&options.user, &options.safety_identifier);
        tracing::info!(?user, ?safety_identifier, "openai request");
    }
    if options.url {
        return openai_url(state, caller, headers, &native, &options.warnings).await;
    }
    let (validated, mut admitted) = submit(state, caller, &native).await?;
    if options.stream {
        let flavor = Flavor::OpenAi {
            warnings: options.warnings,
            quality: options.quality,
        };
        return Ok(sse_response(state.clone(), validated, admitted, flavor));
    }
    let mut guard = DisconnectGuard::new(state.metrics.clone());
    let output = wait_output(&mut admitted.ticket, &state.metrics).await;
    guard.finish();
    let output = output?;
    state.metrics.request_duration(route, started.elapsed());
    let warnings = options.warnings;
    let body = render_blocking(move || openai_json(&output, &validated, &warnings)).await?;
    Ok(axum::Json(body).into_response())
}

/// `http(s)://host` of this request (from `Host` and `X-Forwarded-Proto`), when it is sane.
fn base_url(headers: &HeaderMap) -> String {
    let sane = |v: &HeaderValue| {
        v.to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic()))
            .filter(|s| !s.contains('/') && !s.contains('@'))
            .map(str::to_string)
    };
    let Some(host) = headers.get(header::HOST).and_then(sane) else {
        return String::new();
    };
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

/// `response_format: "url"`: runs the request as a stored job, waits for it, and answers with
/// links to its image files (which need the same bearer key).
async fn openai_url(
    state: &ApiState,
    caller: &Caller,
    headers: &HeaderMap,
    native: &NativeRequest,
    warnings: &[String],
) -> Result<Response, ApiError> {
    let Some(jobs) = state.jobs.as_ref() else {
        return Err(ApiError::invalid(
            "response_format",
            "response_format 'url' needs the job store, which this server does not run; use 'b64_json'",
        ));
    };
    let submitted = super::jobs::submit_job(state, caller, native, None).await?;
    let limit = jobs.config.url_wait;
    let row = super::jobs::await_job(jobs, &submitted.row.id, limit).await?;
    match row.status {
        crate::store::JobStatus::Succeeded => {}
        crate::store::JobStatus::Cancelled => return Err(ApiError::Cancelled),
        _ => {
            return Err(ApiError::Internal(format!(
                "job {} failed: {}",
                row.id,
                row.error.unwrap_or_default()
            )));
        }
    }
    let base = base_url(headers);
    let data = row
        .seeds
        .iter()
        .enumerate()
        .map(|(k, seed)| OpenAiImage {
            b64_json: None,
            url: Some(format!("{base}/v1/jobs/{}/images/{k}", row.id)),
            seed: *seed,
        })
        .collect();
    let p = &row.params;
    Ok(axum::Json(OpenAiImagesResponse {
        created: super::output::unix_now(),
        data,
        job_id: Some(row.id.clone()),
        model: row.ensemble.clone(),
        output_format: p["output_format"].as_str().unwrap_or("png").into(),
        size: format!("{}x{}", p["width"], p["height"]),
        timings: row.timings.clone().unwrap_or_default(),
        warnings: warnings.to_vec(),
    })
    .into_response())
}
