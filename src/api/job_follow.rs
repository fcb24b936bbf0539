//! The follower behind `GET /v1/jobs/{id}/events`: it reads the job's live state (when this
//! replica runs it: no query per step) or its row (when it is queued, or runs on another replica:
//! polled with back-off, [`Backoff`]) and turns what changed into events (`queued`, `progress`,
//! `preview`, then `result` or `error`). Previews exist only on the replica running the job.
//! Split from `jobs.rs`.
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use super::jobs::{job_view, store_error, unknown_job};
use super::media::{parse_output, preview_data, preview_file};
use super::output::render_blocking;
use super::schema::{JobProgressData, JobQueuedData};
use super::stream::event;
use crate::jobs::JobService;
use crate::store::{JobRow, JobStatus};
use crate::worker::Encoding;

pub(super) struct Follow {
    jobs: Arc<JobService>,
    id: String,
    last: Option<(Option<usize>, usize)>,
    pub(super) done: bool,
    /// The `seq` of the last preview sent, and how many went out per image.
    preview_seq: usize,
    previews_sent: Vec<usize>,
    /// The job's image format (previews come in it too).
    encoding: Encoding,
    /// The pause before the row is read again (while no live state is here).
    poll: Backoff,
}

/// Polling with back-off: the pause doubles from [`Backoff::FIRST`] up to [`Backoff::MOST`]
/// while nothing changes and starts over when something did, so a follower of a job on another
/// replica reads its row a few times a second while it moves and once per `MOST` while it waits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(super) const FIRST: Duration = Duration::from_millis(100);
    pub(super) const MOST: Duration = Duration::from_secs(2);

    pub(super) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// Something changed: the next pause is short again.
    pub(super) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The pause to take now (the one after it is twice as long, up to `MOST`).
    pub(super) fn pause(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MOST);
        now
    }
}

impl Follow {
    /// Follows `row` (a job the caller owns).
    pub(super) fn new(jobs: Arc<JobService>, row: &JobRow) -> Self {
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
            jobs,
            id: row.id.clone(),
            last: None,
            done: false,
            preview_seq: 0,
            previews_sent: Vec::new(),
            encoding,
            poll: Backoff::new(),
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
        if let Some(live) = self.jobs.live(&self.id) {
            // Running here: the live state, no query.
            let mut events = self.state_events(
                JobStatus::Running,
                live.position,
                (live.step, Some(live.total)),
            );
            events.extend(self.preview_events().await);
            return events;
        }
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
        let view = match job_view(&self.jobs, &row).await {
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
        let step = view.progress.as_ref().map_or(0, |p| p.step);
        let total = view.progress.as_ref().map(|p| p.total);
        let events = self.state_events(row.status, view.queue_position, (step, total));
        if !events.is_empty() {
            self.poll.reset();
        }
        events
    }

    /// A `queued` or `progress` event when the position or the step changed since the last one.
    fn state_events(
        &mut self,
        status: JobStatus,
        position: Option<usize>,
        (step, total): (usize, Option<usize>),
    ) -> Vec<Event> {
        if self.last == Some((position, step)) {
            return vec![];
        }
        self.last = Some((position, step));
        match (status, position) {
            (JobStatus::Queued, p) | (JobStatus::Running, p @ Some(_)) => {
                let data = JobQueuedData {
                    status: status.as_str().into(),
                    position: p,
                };
                vec![event("queued", &json!(data))]
            }
            _ => {
                let data = JobProgressData {
                    status: "running".into(),
                    step,
                    total,
                };
                vec![event("progress", &json!(data))]
            }
        }
    }

    /// Waits for news: a live update when the job runs here (or its end), else the back-off
    /// pause before the row is read again.
    pub(super) async fn wait(&mut self) {
        match self.jobs.subscribe(&self.id) {
            Some(mut rx) => {
                self.poll.reset();
                // A long bound: the update (or the channel's close at the job's end) wakes it.
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = tokio::time::sleep(Backoff::MOST) => {}
                }
            }
            None => tokio::time::sleep(self.poll.pause()).await,
        }
    }
}
