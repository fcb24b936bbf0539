//! The follower behind `GET /v1/jobs/{id}/events`: it reads the job's row and live state and
//! turns what changed into events (`queued`, `progress`, `preview`, then `result` or `error`).
//! Split from `jobs.rs`.
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use super::ApiState;
use super::jobs::{job_view, store_error, unknown_job};
use super::media::{parse_output, preview_data, preview_file};
use super::output::render_blocking;
use super::schema::{JobProgressData, JobQueuedData};
use super::stream::event;
use crate::jobs::JobService;
use crate::store::{JobRow, JobStatus};
use crate::worker::Encoding;

pub(super) struct Follow {
    state: ApiState,
    jobs: Arc<JobService>,
    id: String,
    last: Option<(Option<usize>, usize)>,
    pub(super) done: bool,
    /// The `seq` of the last preview sent, and how many went out per image.
    preview_seq: usize,
    previews_sent: Vec<usize>,
    /// The job's image format (previews come in it too).
    encoding: Encoding,
}

impl Follow {
    /// Follows `row` (a job the caller owns).
    pub(super) fn new(state: ApiState, jobs: Arc<JobService>, row: &JobRow) -> Self {
        // Stored parameters were validated when the job was made.
        let p = &row.params;
        let encoding = parse_output(
            p["output_format"].as_str(),
            p["output_compression"].as_u64(),
            None,
        )
        .map(|o| o.encoding)
        .unwrap_or_default();
        Self {
            state,
            jobs,
            id: row.id.clone(),
            last: None,
            done: false,
            preview_seq: 0,
            previews_sent: Vec::new(),
            encoding,
        }
    }

    /// A `preview` event when the job has a preview this stream has not sent.
    async fn preview_events(&mut self) -> Vec<Event> {
        let Some(p) = self
            .jobs
            .live(&self.id)
            .and_then(|l| l.preview)
            .filter(|p| p.seq > self.preview_seq)
        else {
            return vec![];
        };
        self.preview_seq = p.seq;
        if self.previews_sent.len() <= p.index {
            self.previews_sent.resize(p.index + 1, 0);
        }
        let partial_image_index = self.previews_sent[p.index];
        self.previews_sent[p.index] += 1;
        let encoding = self.encoding;
        let raster = p.raster.clone();
        let file = match render_blocking(move || preview_file(&raster, encoding)).await {
            Ok(f) => B64.encode(f),
            Err(e) => {
                tracing::error!("{e:?}");
                return vec![];
            }
        };
        let data = preview_data(
            (p.index, partial_image_index),
            (p.step, p.total),
            encoding.format,
            file,
        );
        vec![event("preview", &json!(data))]
    }

    /// The events since the last call; sets `done` at the end of the job.
    pub(super) async fn next_events(&mut self) -> Vec<Event> {
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
            return self.preview_events().await;
        }
        self.last = Some((position, step));
        let mut events = match (row.status, position) {
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
        };
        events.extend(self.preview_events().await);
        events
    }

    /// Waits for news: a live update, or a tenth of a second.
    pub(super) async fn wait(&self) {
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
