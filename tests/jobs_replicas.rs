//! Leases and replicas through the job service over a fake engine: the heartbeat stops jobs
//! cancelled or taken over elsewhere, released jobs run again once, and two replicas share one
//! PostgreSQL queue (skipped with a note when PostgreSQL is not installed; a failure when `CI`
//! is set).
mod http_support;
mod jobs_support;
#[path = "common/postgres.rs"]
mod postgres;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use afa::api::ApiConfig;
use afa::store::JobStatus;
use jobs_support::*;
use serde_json::{Value, json};

/// Waits until job `id` is executing in the worker (steps advancing).
async fn wait_executing(s: &JobServer, id: &str) {
    let t = Instant::now();
    while s.jobs.live(id).is_none_or(|l| l.step == 0) {
        assert!(t.elapsed() < Duration::from_secs(10), "{id} never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the worker dropped `n` images in all and job `id` is no longer followed.
async fn wait_dropped(s: &JobServer, id: &str, n: usize) {
    let t = Instant::now();
    while s.control.cancelled_images.load(Ordering::SeqCst) < n || s.jobs.live(id).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{id} was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A cancel recorded only in the row (another replica's DELETE) and a job changed by someone
/// else (its lease lost) reach the running job through the heartbeat, which drops it; the row
/// keeps what the other party wrote.
#[tokio::test]
async fn the_heartbeat_stops_jobs_cancelled_elsewhere_or_taken_over() {
    let s = start_jobs(100, Duration::from_secs(3600), ApiConfig::default());
    let long = json!({"prompt": "long", "steps": 200});
    let a: Value = submit(&s, long.clone(), None).await.json().await.unwrap();
    let a = a["id"].as_str().unwrap().to_string();
    wait_executing(&s, &a).await;
    assert_eq!(
        s.jobs.store.cancel(&a).await.unwrap(),
        Some(JobStatus::Running)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.control.cancelled_images.load(Ordering::SeqCst),
        0,
        "nothing but the heartbeat tells this replica"
    );
    afa::jobs::beat(&s.jobs).await;
    wait_dropped(&s, &a, 1).await;
    assert_eq!(finished(&s, &a, None).await["status"], "cancelled");

    let b: Value = submit(&s, long, None).await.json().await.unwrap();
    let b = b["id"].as_str().unwrap().to_string();
    wait_executing(&s, &b).await;
    assert!(s.jobs.store.fail(&b, "taken over").await.unwrap());
    afa::jobs::beat(&s.jobs).await;
    wait_dropped(&s, &b, 2).await;
    let row = s.jobs.store.job(&b).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.error.as_deref()),
        (JobStatus::Failed, Some("taken over"))
    );
}

/// Two fake-engine replicas (`step_ms` a step) on one fresh PostgreSQL database; `None` (with
/// a note) when PostgreSQL is not installed outside CI.
async fn two_replicas(step_ms: u64) -> Option<[JobServer; 2]> {
    let Some(url) = tokio::task::spawn_blocking(postgres::fresh_database)
        .await
        .unwrap()
    else {
        eprintln!("skipped: no PostgreSQL");
        return None;
    };
    let ttl = Duration::from_secs(3600);
    Some([
        start_jobs_on(Some(url.clone()), step_ms, ttl, ApiConfig::default()),
        start_jobs_on(Some(url), step_ms, ttl, ApiConfig::default()),
    ])
}

/// Two replicas on one PostgreSQL database share its queue: jobs submitted to either run once
/// each, on one of them, and either answers for every job.
#[tokio::test]
async fn two_replicas_on_postgres_run_every_job_once() {
    let Some(replicas) = two_replicas(20).await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..12u64 {
        let body = json!({"prompt": format!("p{i}"), "steps": 5, "seed": i, "n": 1 + i % 2});
        let v: Value = submit(&replicas[(i % 2) as usize], body, None)
            .await
            .json()
            .await
            .unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let names: Vec<&str> = replicas.iter().map(|r| r.jobs.replica.as_str()).collect();
    let mut ran = [0; 2];
    for (i, id) in ids.iter().enumerate() {
        let v = finished(&replicas[(i + 1) % 2], id, None).await;
        assert_eq!(v["status"], "succeeded", "{v}");
        let row = replicas[0].jobs.store.job(id).await.unwrap().unwrap();
        assert_eq!(row.attempts, 1, "{id} ran more than once");
        let owner = row.lease_owner.unwrap();
        let r = names
            .iter()
            .position(|n| *n == owner)
            .expect("a replica ran it");
        ran[r] += 1;
    }
    let images: u64 = ids.len() as u64 + 6;
    let done: u64 = replicas
        .iter()
        .map(|r| r.control.finished_images.load(Ordering::SeqCst) as u64)
        .sum();
    eprintln!("jobs run per replica: {ran:?}; images {done}");
    assert!(
        done >= images,
        "every image was generated: {done} < {images}"
    );
}

/// Queue position and progress are the same from every replica: a queued job's position comes
/// from the shared queue, a running job's progress from what its holder writes to the row, and
/// the event stream of another replica's job follows the row to its result.
#[tokio::test]
async fn progress_and_positions_are_right_from_any_replica() {
    let Some(replicas) = two_replicas(40).await else {
        return;
    };
    // Each replica takes one 4-image job (its job budget; other step counts: other batch keys,
    // claimed one by one); the third waits in the queue.
    let mut ids = Vec::new();
    for i in 0..3u64 {
        let body = json!({"prompt": format!("p{i}"), "steps": 20 + i, "seed": i, "n": 4});
        let v: Value = submit(&replicas[0], body, None).await.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let store = &replicas[0].jobs.store;
    let t = Instant::now();
    let mut running = Vec::new();
    while running.len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "two jobs never ran");
        running.clear();
        for id in &ids {
            let row = store.job(id).await.unwrap().unwrap();
            if row.status == JobStatus::Running {
                running.push((id.clone(), row.lease_owner.unwrap()));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queued = ids
        .iter()
        .find(|id| running.iter().all(|(r, _)| r != *id))
        .unwrap();
    // Both replicas give the images ahead in the shared queue: the running jobs' and the queued
    // ones' before it (read again while a dispatcher moves rows for a moment).
    let t = Instant::now();
    loop {
        let before = snapshot(store, &ids).await;
        let mut positions = Vec::new();
        for r in &replicas {
            let v: Value = get(r, &format!("/v1/jobs/{queued}"), None)
                .await
                .json()
                .await
                .unwrap();
            positions.push(v["queue_position"].clone());
        }
        if snapshot(store, &ids).await == before {
            let mine = before.iter().find(|r| r.0 == *queued).unwrap().3;
            let ahead: usize = before
                .iter()
                .filter(|r| r.1 == JobStatus::Running || (r.1 == JobStatus::Queued && r.3 < mine))
                .map(|r| r.2)
                .sum();
            assert_eq!(positions, vec![json!(ahead), json!(ahead)], "{before:?}");
            assert!(ahead >= 4);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the queue never held still"
        );
    }
    // A running job seen from the replica that does not run it.
    let (id, owner) = &running[0];
    let other = replicas.iter().find(|r| r.jobs.replica != *owner).unwrap();
    assert!(other.jobs.live(id).is_none());
    let events = tokio::spawn({
        let (addr, id) = (other.server.addr, id.clone());
        async move {
            let url = format!("http://{addr}/v1/jobs/{id}/events");
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    let t = Instant::now();
    loop {
        let v: Value = get(other, &format!("/v1/jobs/{id}"), None)
            .await
            .json()
            .await
            .unwrap();
        if v["status"] == "running" && v["progress"]["step"].as_u64().unwrap_or(0) > 0 {
            assert!(v["progress"]["total"].as_u64().unwrap() >= 20, "{v}");
            assert_eq!(v["queue_position"], Value::Null, "{v}");
            break;
        }
        assert_eq!(v["status"], "running", "{v}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no progress seen: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = tokio::time::timeout(Duration::from_secs(30), events)
        .await
        .unwrap()
        .unwrap();
    let events = http_support::parse_sse(&text);
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(steps.iter().any(|s| *s > 0), "{text}");
    let last = events.last().unwrap();
    assert_eq!(last.event, "result", "{text}");
    for id in &ids {
        assert_eq!(finished(other, id, None).await["status"], "succeeded");
    }
}

/// (id, status, images, queue order) of each job.
async fn snapshot(
    store: &afa::store::JobStore,
    ids: &[String],
) -> Vec<(String, JobStatus, usize, i64)> {
    let mut rows = Vec::new();
    for id in ids {
        let r = store.job(id).await.unwrap().unwrap();
        rows.push((r.id, r.status, r.images, r.queue_order));
    }
    rows
}

/// A draining server gives its unfinished jobs back (the attempt not counted); here the same
/// server claims the job again at once, which stops the older attempt still running, and the
/// job succeeds once.
#[tokio::test]
async fn released_jobs_run_again_and_the_older_attempt_stops() {
    let s = start_jobs(50, Duration::from_secs(3600), ApiConfig::default());
    let v: Value = submit(&s, json!({"prompt": "p", "steps": 30, "seed": 1}), None)
        .await
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    wait_executing(&s, &id).await;
    assert_eq!(s.jobs.release_held().await, 1);
    let v = finished(&s, &id, None).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    let row = s.jobs.store.job(&id).await.unwrap().unwrap();
    assert_eq!(row.attempts, 1, "a released attempt is not counted");
    assert!(s.control.cancelled_images.load(Ordering::SeqCst) >= 1);
    assert_eq!(s.jobs.store.artifacts(&id).await.unwrap().len(), 1);
}

/// Losing the job database turns `/ready` to 503 (`database_unavailable`, with Retry-After),
/// and it comes back to 200 by itself once the database answers again.
#[tokio::test]
async fn losing_the_database_turns_ready_503_and_back() {
    let Some(url) = tokio::task::spawn_blocking(postgres::fresh_database)
        .await
        .unwrap()
    else {
        eprintln!("skipped: no PostgreSQL");
        return;
    };
    let name = url.rsplit('/').next().unwrap().to_string();
    let admin_url = format!("{}/postgres", url.rsplit_once('/').unwrap().0);
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    let s = start_jobs_on(
        Some(url),
        5,
        Duration::from_secs(3600),
        ApiConfig::default(),
    );
    let ready = || async {
        let r = get(&s, "/ready", None).await;
        let retry = r.headers().contains_key("retry-after");
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or_default();
        (status, retry, body)
    };
    assert_eq!(ready().await.0, 200);
    let until = |want: u16| async move {
        let t = Instant::now();
        loop {
            let (status, retry, body) = ready().await;
            if status == want {
                return (retry, body);
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "/ready never {want}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    for sql in [
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
        format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ),
    ] {
        sqlx::query(&sql).execute(&admin).await.unwrap();
    }
    let (retry, body) = until(503).await;
    assert!(retry, "a 503 from /ready carries Retry-After");
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    until(200).await;
}
