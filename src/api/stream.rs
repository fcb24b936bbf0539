//! Server-Sent Events for a running job: queue position and step progress, then the result,
//! with `:` keep-alive comments so proxies keep idle streams open. The native flavour sends
//! `queued`, `progress`, `result` (the `/generate` JSON) and `error`; the OpenAI flavour sends
//! `image_generation.progress` and one `image_generation.completed` per image. Closing the
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
use super::output::render_blocking;
use super::output::{native_json, unix_now};
use super::quota::QuotaGuard;
use super::request::Validated;
use super::schema::{OpenAiCompletedData, OpenAiProgressData, ProgressData, QueuedData};
use crate::worker::{JobEvent, JobOutput, JobTicket};

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
    let running = Running {
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
            let (warnings, quality) = (warnings.clone(), quality.clone());
            let rendered = render_blocking(move || {
                Ok(output
                    .images
                    .iter()
                    .enumerate()
                    .map(|(index, img)| {
                        json!(OpenAiCompletedData {
                            kind: "image_generation.completed".into(),
                            b64_json: B64.encode(&img.png),
                            created_at: unix_now(),
                            size: size.clone(),
                            quality: quality.clone(),
                            background: "opaque".into(),
                            output_format: "png".into(),
                            index,
                            seed: img.seed,
                            warnings: warnings.clone(),
                        })
                        // No `usage`: a diffusion model counts no tokens, and zeros would lie.
                    })
                    .collect::<Vec<Value>>())
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
