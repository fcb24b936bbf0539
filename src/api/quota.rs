//! The per-key image quota (`max_queued_images` of an API key) on every route that queues work:
//! images of the key's stored jobs that are queued or running, plus images of its synchronous
//! requests (`/generate`, `/generate/stream`, `/v1/images/generations`) in flight, plus the new
//! request's, must stay within the limit. In-flight synchronous images are counted here and
//! released when their request ends.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ApiState;
use super::error::ApiError;
use super::middleware::Caller;

/// How long a caller over its quota is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Images of synchronous requests in flight, per key id.
#[derive(Debug, Default)]
pub struct InFlight {
    images: Mutex<HashMap<String, usize>>,
}

/// Holds `n` in-flight images of a key until dropped.
#[derive(Debug)]
pub struct QuotaGuard {
    tracker: Arc<InFlight>,
    key: String,
    n: usize,
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        let mut map = self
            .tracker
            .images
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.key) {
            *count = count.saturating_sub(self.n);
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl InFlight {
    /// In-flight synchronous images of `key`.
    pub fn count(&self, key: &str) -> usize {
        let map = self.images.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).copied().unwrap_or(0)
    }
}

/// Images of `caller`'s stored jobs that are queued or running (0 without a job store).
async fn stored_images(state: &ApiState, key: &str) -> Result<usize, ApiError> {
    match &state.jobs {
        Some(jobs) => jobs
            .store
            .active_images(Some(key))
            .await
            .map_err(|e| ApiError::Internal(format!("job store: {e}"))),
        None => Ok(0),
    }
}

fn over(limit: u64, used: usize, n: usize) -> Option<ApiError> {
    ((used + n) as u64 > limit).then_some(ApiError::QueueFull {
        retry_after: RETRY_AFTER,
    })
}

/// Checks that a stored job of `n` images fits `caller`'s quota.
pub async fn check_job(state: &ApiState, caller: &Caller, n: usize) -> Result<(), ApiError> {
    let (Some(limit), Some(key)) = (caller.max_queued_images, &caller.key_id) else {
        return Ok(());
    };
    let used = stored_images(state, key).await? + state.in_flight.count(key);
    over(limit, used, n).map_or(Ok(()), Err)
}

/// Admits a synchronous request of `n` images within `caller`'s quota; the guard holds them
/// until the request ends.
pub async fn admit_sync(
    state: &ApiState,
    caller: &Caller,
    n: usize,
) -> Result<Option<QuotaGuard>, ApiError> {
    let (Some(limit), Some(key)) = (caller.max_queued_images, &caller.key_id) else {
        return Ok(None);
    };
    let stored = stored_images(state, key).await?;
    let tracker = state.in_flight.clone();
    let mut map = tracker.images.lock().unwrap_or_else(|p| p.into_inner());
    let used = stored + map.get(key).copied().unwrap_or(0);
    if let Some(e) = over(limit, used, n) {
        return Err(e);
    }
    *map.entry(key.clone()).or_default() += n;
    drop(map);
    Ok(Some(QuotaGuard {
        tracker,
        key: key.clone(),
        n,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_release_their_images() {
        let t = Arc::new(InFlight::default());
        t.images.lock().unwrap().insert("k".into(), 3);
        let g = QuotaGuard {
            tracker: t.clone(),
            key: "k".into(),
            n: 2,
        };
        assert_eq!(t.count("k"), 3);
        drop(g);
        assert_eq!(t.count("k"), 1);
    }
}
