//! Server-Sent Events for a running job: queue position and step progress, previews
//! (`partial_images`), then the result, with `:` keep-alive comments so proxies keep idle
//! streams open. The native flavour sends `queued`, `progress`, `preview`, `result` (the
//! `/generate` JSON) and `error`; the OpenAI flavour sends `image_generation.progress`,
//! `image_generation.partial_image` and one `image_generation.completed` per image. Images and
//! previews are encoded in the request's `output_format` on the encode stage. Closing the
//! stream (the client went away) drops the `JobTicket`, which cancels the job.
use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt;
use futures_util::stream;
use serde_json::{Value, json};

use super::ApiState;
use super::error::ApiError;
use super::generate::{Admitted, DisconnectGuard, record_timings};
use super::media::{image_base64, preview_data, preview_file};
use super::output::render_blocking;
use super::output::{native_json, unix_now};
use super::quota::QuotaGuard;
use super::request::Validated;
use super::schema::{
    OpenAiCompletedData, OpenAiPartialImageData, OpenAiProgressData, ProgressData, QueuedData,
};
use crate::worker::{JobEvent, JobOutput, JobTicket, Raster};

/// Which event vocabulary to speak.
pub enum Flavor {
    Native {
        request_id: String,
        warnings: Vec<String>,
    },
    OpenAi {
        warnings: Vec<String>,
        /// The request's `quality`, echoed.
        quality: String,
    },
}

struct Running {
    state: ApiState,
    validated: Validated,
    ticket: JobTicket,
    /// The caller's quota share, held while the stream runs.
    _quota: Option<QuotaGuard>,
    flavor: Flavor,
    guard: DisconnectGuard,
    started: Instant,
    /// Previews sent so far, per image of the request.
    previews_sent: Vec<usize>,
}

/// One Server-Sent Event: `event: name`, `data:` the JSON on one line (every SSE route's).
pub(super) fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

fn error_event(e: &ApiError) -> Event {
    event("error", &e.body())
}

/// The SSE response for an accepted job.
pub(super) fn sse_response(
    state: ApiState,
    validated: Validated,
    admitted: Admitted,
    flavor: Flavor,
) -> Response {
    let keep_alive = state.config.keep_alive;
    let n = validated.job.images.len();
    let running = Running {
        previews_sent: vec![0; n],
        guard: DisconnectGuard::new(state.metrics.clone()),
        state,
        validated,
        ticket: admitted.ticket,
        _quota: admitted.quota,
        flavor,
        started: Instant::now(),
    };
    let events = stream::unfold(Some(running), |run| async move {
        let mut run = run?;
        let Some(ev) = run.ticket.events.recv().await else {
            run.guard.finish();
            let e = ApiError::Internal("the worker dropped the job without a result".into());
            tracing::error!("{e:?}");
            return Some((vec![error_event(&e)], None));
        };
        match ev {
            JobEvent::Queued { position } => {
                let events = progress_events(&run.flavor, Some(position), None);
                Some((events, Some(run)))
            }
            JobEvent::Progress { step, total } => {
                let events = progress_events(&run.flavor, None, Some((step, total)));
                Some((events, Some(run)))
            }
            JobEvent::Preview {
                index,
                step,
                total,
                raster,
            } => {
                let events = preview_event(&mut run, index, (step, total), raster).await;
                Some((events, Some(run)))
            }
            JobEvent::Finished(result) => {
                run.guard.finish();
                let events = match result {
                    Ok(output) => finished_events(&mut run, output).await,
                    Err(e) => vec![error_event(&ApiError::from_job(e))],
                };
                Some((events, None))
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response()
}

fn progress_events(
    flavor: &Flavor,
    position: Option<usize>,
    step: Option<(usize, usize)>,
) -> Vec<Event> {
    match flavor {
        Flavor::Native { .. } => match (position, step) {
            (Some(position), _) => vec![event("queued", &json!(QueuedData { position }))],
            (_, Some((step, total))) => {
                vec![event("progress", &json!(ProgressData { step, total }))]
            }
            _ => vec![],
        },
        Flavor::OpenAi { .. } => {
            let (s, t) = step.unwrap_or((0, 0));
            let data = OpenAiProgressData {
                kind: "image_generation.progress".into(),
                queue_position: position,
                step: s,
                total: t,
            };
            vec![event("image_generation.progress", &json!(data))]
        }
    }
}

/// The event of one preview (image `index` after `step` of `total`), in the flavour's
/// vocabulary and the request's format.
async fn preview_event(
    run: &mut Running,
    index: usize,
    (step, total): (usize, usize),
    raster: Raster,
) -> Vec<Event> {
    let Some(sent) = run.previews_sent.get_mut(index) else {
        return vec![];
    };
    let partial_image_index = *sent;
    *sent += 1;
    let encoding = run.validated.output.encoding;
    let file = match render_blocking(move || preview_file(&raster, encoding)).await {
        Ok(f) => B64.encode(f),
        Err(e) => {
            tracing::error!("{e:?}");
            return vec![];
        }
    };
    let format = encoding.format;
    match &run.flavor {
        Flavor::Native { .. } => {
            let data = preview_data((index, partial_image_index), (step, total), format, file);
            vec![event("preview", &json!(data))]
        }
        Flavor::OpenAi { quality, .. } => {
            let data = OpenAiPartialImageData {
                kind: "image_generation.partial_image".into(),
                b64_json: file,
                partial_image_index,
                created_at: unix_now(),
                size: format!("{}x{}", run.validated.job.width, run.validated.job.height),
                quality: quality.clone(),
                background: "opaque".into(),
                output_format: format.as_str().into(),
                index,
                step,
                total,
            };
            vec![event("image_generation.partial_image", &json!(data))]
        }
    }
}

async fn finished_events(run: &mut Running, output: JobOutput) -> Vec<Event> {
    record_timings(&run.state.metrics, &output);
    let route = match run.flavor {
        Flavor::Native { .. } => "/generate/stream",
        Flavor::OpenAi { .. } => "/v1/images/generations",
    };
    run.state
        .metrics
        .request_duration(route, run.started.elapsed());
    match &run.flavor {
        Flavor::Native {
            request_id,
            warnings,
        } => {
            let (v, id, w) = (run.validated.clone(), request_id.clone(), warnings.clone());
            let rendered = render_blocking(move || {
                let body = native_json(&output, &v, &id, &w)?;
                serde_json::to_value(body).map_err(|e| ApiError::Internal(e.to_string()))
            });
            match rendered.await {
                Ok(body) => vec![event("result", &body)],
                Err(e) => vec![error_event(&e)],
            }
        }
        Flavor::OpenAi { warnings, quality } => {
            let size = format!("{}x{}", run.validated.job.width, run.validated.job.height);
            let warnings = [&run.validated.output.warnings[..], warnings].concat();
            let quality = quality.clone();
            let encoding = run.validated.output.encoding;
            let rendered = render_blocking(move || {
                output
                    .images
                    .iter()
                    .enumerate()
                    .map(|(index, img)| {
                        Ok(json!(OpenAiCompletedData {
                            kind: "image_generation.completed".into(),
                            b64_json: image_base64(img, encoding)?,
                            created_at: unix_now(),
                            size: size.clone(),
                            quality: quality.clone(),
                            background: "opaque".into(),
                            output_format: encoding.format.as_str().into(),
                            index,
                            seed: img.seed,
                            warnings: warnings.clone(),
                        }))
                        // No `usage`: a diffusion model counts no tokens, and zeros would lie.
                    })
                    .collect::<Result<Vec<Value>, ApiError>>()
            })
            .await;
            match rendered {
                Ok(events) => events
                    .iter()
                    .map(|data| event("image_generation.completed", data))
                    .collect(),
                Err(e) => vec![error_event(&e)],
            }
        }
    }
}
