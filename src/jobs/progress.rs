//! The progress writer: while a dispatched job runs, its live progress (worker queue position,
//! step of total) is written to the job's row at most once per `JobsConfig::progress_every`,
//! always ending with the latest state, so any replica's job view and event stream show it.
//! Writes are fenced by the lease: a writer whose lease was lost stops.
use std::sync::Arc;

use tokio::sync::watch;

use super::service::{JobService, Live};
use crate::store::Lease;

/// What of a live state goes into the row (previews stay in the holder's memory).
fn stored(live: &Live) -> (Option<usize>, usize, usize) {
    (live.position, live.step, live.total)
}

/// Writes `lease`'s progress from `updates` until the job's live state closes (it finished
/// here) or the lease is lost.
pub(super) async fn write_progress(
    jobs: Arc<JobService>,
    lease: Lease,
    mut updates: watch::Receiver<Live>,
) {
    let mut written = None;
    loop {
        if updates.changed().await.is_err() {
            return; // finished: the result (or the failure) is the row's last word
        }
        let now = stored(&updates.borrow_and_update());
        if written == Some(now) {
            continue;
        }
        let (position, step, total) = now;
        match jobs
            .store
            .record_progress(&lease, position, (step, total))
            .await
        {
            Ok(true) => written = Some(now),
            Ok(false) => return, // the lease is no longer held (the heartbeat stops the job)
            Err(e) => tracing::warn!(job = %lease.job_id, "writing the job's progress: {e}"),
        }
        tokio::time::sleep(jobs.config.progress_every).await;
    }
}
