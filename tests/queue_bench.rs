//! Job-queue benchmark for `BENCHMARKS.md` ("Job queue across replicas"): 1, 2 and 4 replicas on
//! one PostgreSQL (a durable server: fsync on), each a whole job service (dispatcher with
//! leases, heartbeat, progress writer, artifact files, health probe) over a trivially cheap
//! engine (the tests' fake: one instant step), draining a backlog of 1-image jobs.
//! - jobs/s: backlog size / time from waking the dispatchers to the last job recorded;
//! - database statements per job: `pg_stat_statements` calls during the drain / jobs;
//! - claim latency p50/p99: R claimers (one pool each, as R replicas) taking the same kind of
//!   backlog one job at a time with `JobStore::claim` and recording each with `complete_leased`.
//!
//! Ignored by default; run with
//! `AFA_PG_DURABLE=1 cargo test --test queue_bench -- --ignored --nocapture` (needs
//! PostgreSQL's binaries; `AFA_BENCH_JOBS` sets the backlog, default 400).
mod http_support;
mod jobs_support;
#[path = "common/postgres.rs"]
mod postgres;

use std::time::{Duration, Instant};

use afa::api::ApiConfig;
use afa::store::{ClaimLimit, Completion, JobStatus, JobStore, NewJob};
use jobs_support::*;
use serde_json::{Value, json};

fn backlog() -> usize {
    std::env::var("AFA_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// Statements run on the current database since the last reset.
async fn statements(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT COALESCE(SUM(calls), 0)::bigint FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn reset(pool: &sqlx::PgPool) {
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await
        .unwrap();
}

async fn drain_through_services(url: &str, replicas: usize, jobs: usize) -> (f64, f64) {
    let ttl = Duration::from_secs(3600);
    let servers: Vec<JobServer> = (0..replicas)
        .map(|_| start_jobs_on(Some(url.to_string()), 0, ttl, ApiConfig::default()))
        .collect();
    let first: Value = submit(
        &servers[0],
        json!({"prompt": "p", "steps": 1, "seed": 0}),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let first = first["id"].as_str().unwrap().to_string();
    assert_eq!(
        finished(&servers[0], &first, None).await["status"],
        "succeeded"
    );
    let store = &servers[0].jobs.store;
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&pool)
        .await
        .unwrap();
    reset(&pool).await;
    // The backlog appears at once (one statement), as copies of the job just run: the
    // dispatchers cannot start on half of it.
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO jobs (id, status, ensemble, params, seeds, images, attempts, created_at, \
         batch_key) SELECT 'job_' || lpad(to_hex(g), 24, '0'), 'queued', ensemble, params, \
         '[' || g || ']', 1, 0, created_at, batch_key FROM jobs, generate_series(1, $2) AS g \
         WHERE id = $1",
    )
    .bind(&first)
    .bind(jobs as i64)
    .execute(&pool)
    .await
    .unwrap();
    for s in &servers {
        s.jobs.wake();
    }
    let mut polls = 0;
    loop {
        polls += 1;
        let done = sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if done as usize > jobs {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "the backlog never drained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    // Less the reset, the insert and this test's polling.
    let per_job = (statements(&pool).await - polls - 2) as f64 / jobs as f64;
    for g in (1..=jobs).step_by(37) {
        let id = format!("job_{g:024x}");
        let row = store.job(&id).await.unwrap().unwrap();
        assert_eq!(
            (row.status, row.attempts),
            (JobStatus::Succeeded, 1),
            "{id}"
        );
    }
    (jobs as f64 / secs, per_job)
}

async fn claim_latency(url: &str, claimers: usize, jobs: usize) -> (f64, f64, f64) {
    let store = JobStore::open(url).await.unwrap();
    let template = NewJob {
        ensemble: "fake".into(),
        params: json!({"prompt": "p"}),
        seeds: vec![0],
        owner: None,
        idempotency: None,
        batch_key: None,
    };
    for i in 0..jobs {
        let new = NewJob {
            seeds: vec![i as u64],
            ..template.clone()
        };
        store.insert_job(&new).await.unwrap();
    }
    let t = Instant::now();
    let tasks: Vec<_> = (0..claimers)
        .map(|c| {
            let url = url.to_string();
            tokio::spawn(async move {
                let store = JobStore::connect(&url).await.unwrap();
                let owner = format!("claimer-{c}");
                let limit = ClaimLimit { jobs: 1, images: 1 };
                let mut took = Vec::new();
                loop {
                    let t = Instant::now();
                    let claims = store
                        .claim(&owner, limit, Duration::from_secs(30))
                        .await
                        .unwrap();
                    took.push(t.elapsed());
                    let Some(claim) = claims.into_iter().next() else {
                        return took;
                    };
                    let done = store
                        .complete_leased(&claim.lease, &[], &json!({}))
                        .await
                        .unwrap();
                    assert_eq!(done, Completion::Recorded);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let secs = t.elapsed().as_secs_f64();
    all.sort();
    (
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        jobs as f64 / secs,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn job_queue_across_replicas() {
    let durable = std::env::var_os("AFA_PG_DURABLE").is_some();
    println!(
        "PostgreSQL: {}",
        if durable {
            "durable (fsync on)"
        } else {
            "fsync off (set AFA_PG_DURABLE=1)"
        }
    );
    let jobs = backlog();
    println!(
        "| replicas | jobs/s (service) | statements/job | claim p50 ms | claim p99 ms | claim+complete jobs/s |"
    );
    println!("|---|---|---|---|---|---|");
    for replicas in [1, 2, 4] {
        let url = tokio::task::spawn_blocking(postgres::fresh_database)
            .await
            .unwrap()
            .expect("PostgreSQL is needed");
        let (rate, per_job) = drain_through_services(&url, replicas, jobs).await;
        let url = tokio::task::spawn_blocking(postgres::fresh_database)
            .await
            .unwrap()
            .unwrap();
        let (p50, p99, claim_rate) = claim_latency(&url, replicas, jobs).await;
        println!(
            "| {replicas} | {rate:.0} | {per_job:.1} | {p50:.2} | {p99:.2} | {claim_rate:.0} |"
        );
    }
}
