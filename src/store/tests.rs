//! Store tests, each on a fresh database, each run twice: on SQLite (a new file) and on
//! PostgreSQL (a new database on the test server of `tests/common/postgres.rs`; skipped with a
//! note when PostgreSQL is not installed, a failure when `CI` is set). Every job state
//! transition, idempotency, recovery after a crash, keys, artifacts and the expiry query;
//! leases in `tests/lease.rs`, bad configuration in `tests/errors.rs`.
use serde_json::json;

use super::db::Text;
use super::*;

#[path = "../../tests/common/postgres.rs"]
pub(super) mod pg;

/// A temp folder removed at the end of the test.
pub(super) struct Tmp(pub std::path::PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, migrated store, its URL (to open it again, as another process would) and a temp
/// folder for files.
pub(super) struct Fresh {
    pub store: JobStore,
    pub url: String,
    pub tmp: Tmp,
}

fn tmp() -> Tmp {
    let dir = std::env::temp_dir().join(format!("afa-store-{}", random_hex(8).unwrap()));
    std::fs::create_dir_all(&dir).unwrap();
    Tmp(dir)
}

pub(super) async fn fresh_sqlite() -> Fresh {
    let tmp = tmp();
    let url = format!("sqlite://{}", tmp.0.join("jobs.db").display());
    let store = JobStore::open(&url).await.unwrap();
    Fresh { store, url, tmp }
}

/// `None` when PostgreSQL is not installed (and `CI` is not set).
pub(super) async fn fresh_postgres() -> Option<Fresh> {
    let url = tokio::task::spawn_blocking(pg::fresh_database)
        .await
        .unwrap()?;
    let store = JobStore::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    Some(Fresh {
        store,
        url,
        tmp: tmp(),
    })
}

/// `on_both_backends!(test_fn, ...)`: for each `async fn test_fn(f: Fresh)`, a test
/// `sqlite::test_fn` and a test `postgres::test_fn` (multi-threaded runtimes, so concurrent
/// work in a test really runs in parallel).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::fresh_sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    match super::fresh_postgres().await {
                        Some(f) => super::$name(f).await,
                        None => eprintln!("skipped: {} (no PostgreSQL)", stringify!($name)),
                    }
                }
            )*
        }
    };
}

mod errors;
mod lease;

on_both_backends!(
    insert_keeps_order_seeds_and_params,
    success_records_artifacts_and_timings,
    fail_requeue_and_cancel_transitions,
    recovery_requeues_in_order_and_fails_exhausted_jobs,
    idempotency_keys_are_per_owner,
    concurrent_inserts_with_one_key_make_one_job,
    quotas_count_queued_and_running_images_per_owner,
    keys_store_hashes_and_revoke,
    artifacts_round_trip_and_expire,
    one_replica_holds_the_sweep_lock_at_a_time,
);

pub(super) fn job(seed: u64, owner: Option<&str>) -> NewJob {
    NewJob {
        ensemble: "tiny".into(),
        params: json!({"prompt": "a", "seed": seed, "n": 2}),
        seeds: vec![seed, seed + 1],
        owner: owner.map(String::from),
        idempotency: None,
        batch_key: None,
    }
}

pub(super) async fn insert(store: &JobStore, new: &NewJob) -> JobRow {
    match store.insert_job(new).await.unwrap() {
        Insert::Created(row) => row,
        other => panic!("expected a new job, got {other:?}"),
    }
}

pub(super) async fn status(store: &JobStore, id: &str) -> JobStatus {
    store.job(id).await.unwrap().unwrap().status
}

async fn insert_keeps_order_seeds_and_params(f: Fresh) {
    let store = f.store.clone();
    let a = insert(&store, &job(7, None)).await;
    let b = insert(&store, &job(9, None)).await;
    assert_eq!(a.status, JobStatus::Queued);
    assert!(b.queue_order > a.queue_order);
    assert_eq!(a.seeds, vec![7, 8]);
    assert_eq!((a.images, a.attempts), (2, 0));
    assert_eq!(a.params["seed"], 7);
    assert_eq!(store.next_queued().await.unwrap().unwrap().id, a.id);
    assert_eq!(store.images_ahead(b.queue_order).await.unwrap(), 2);
    assert_eq!(store.active_images(None).await.unwrap(), 4);
    assert_eq!(store.active_images(Some("key_x")).await.unwrap(), 0);
}

async fn success_records_artifacts_and_timings(f: Fresh) {
    let store = f.store.clone();
    let a = insert(&store, &job(1, None)).await;
    let art = ArtifactRow {
        job_id: a.id.clone(),
        index: 0,
        kind: "png".into(),
        path: format!("jobs/{}/0.png", a.id),
        sha256: "00".into(),
        bytes: 3,
    };
    // Not running yet: completion is refused.
    assert!(
        !store
            .complete(&a.id, std::slice::from_ref(&art), &json!({}))
            .await
            .unwrap()
    );
    assert!(store.mark_running(&a.id).await.unwrap());
    assert!(!store.mark_running(&a.id).await.unwrap(), "running twice");
    assert_eq!(status(&store, &a.id).await, JobStatus::Running);
    assert!(store.next_queued().await.unwrap().is_none());
    assert!(
        store
            .complete(
                &a.id,
                std::slice::from_ref(&art),
                &json!({"denoise_ms": 1.0})
            )
            .await
            .unwrap()
    );
    let row = store.job(&a.id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Succeeded);
    assert_eq!(row.attempts, 1);
    assert!(row.finished_at.is_some() && row.started_at.is_some());
    assert_eq!(row.timings.unwrap()["denoise_ms"], 1.0);
    assert_eq!(store.artifacts(&a.id).await.unwrap(), vec![art]);
    // Finished: neither cancel nor fail changes it.
    assert_eq!(store.cancel(&a.id).await.unwrap(), None);
    assert!(!store.fail(&a.id, "late").await.unwrap());
    assert_eq!(status(&store, &a.id).await, JobStatus::Succeeded);
}

async fn fail_requeue_and_cancel_transitions(f: Fresh) {
    let store = f.store.clone();
    let a = insert(&store, &job(1, None)).await;
    let b = insert(&store, &job(2, None)).await;
    let c = insert(&store, &job(3, None)).await;
    // queued -> cancelled
    assert_eq!(store.cancel(&a.id).await.unwrap(), Some(JobStatus::Queued));
    assert_eq!(status(&store, &a.id).await, JobStatus::Cancelled);
    assert!(
        !store.mark_running(&a.id).await.unwrap(),
        "a cancelled job never runs"
    );
    // running -> queued (retry keeps its place) -> running -> failed
    assert!(store.mark_running(&b.id).await.unwrap());
    assert!(store.requeue(&b.id, Some("boom")).await.unwrap());
    assert_eq!(store.next_queued().await.unwrap().unwrap().id, b.id);
    assert!(store.mark_running(&b.id).await.unwrap());
    assert!(store.fail(&b.id, "gave up").await.unwrap());
    let row = store.job(&b.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Failed, 2));
    assert_eq!(row.error.as_deref(), Some("gave up"));
    assert!(!store.requeue(&b.id, None).await.unwrap());
    // running -> cancelled; completion after that is refused
    assert!(store.mark_running(&c.id).await.unwrap());
    assert_eq!(store.cancel(&c.id).await.unwrap(), Some(JobStatus::Running));
    assert!(!store.complete(&c.id, &[], &json!({})).await.unwrap());
    assert_eq!(status(&store, &c.id).await, JobStatus::Cancelled);
    assert_eq!(store.cancel("job_nope").await.unwrap(), None);
}

async fn recovery_requeues_in_order_and_fails_exhausted_jobs(f: Fresh) {
    let store = f.store.clone();
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for s in 0..4 {
            v.push(insert(&store, &job(s * 10, None)).await.id);
        }
        v
    };
    // 0 and 1 were running when the process died; 1 had already used up its attempts.
    assert!(store.mark_running(&ids[0]).await.unwrap());
    for _ in 0..3 {
        assert!(store.mark_running(&ids[1]).await.unwrap());
        if store.job(&ids[1]).await.unwrap().unwrap().attempts < 3 {
            assert!(store.requeue(&ids[1], None).await.unwrap());
        }
    }
    store.close().await;
    // A new process on the same database.
    let store = JobStore::open(&f.url).await.unwrap();
    let r = store.recover(3).await.unwrap();
    assert_eq!(r.requeued, vec![ids[0].clone()]);
    assert_eq!(r.failed, vec![ids[1].clone()]);
    assert_eq!(r.queued, 3);
    let failed = store.job(&ids[1]).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert!(failed.error.unwrap().contains("interrupted 3 times"));
    // The queue is the original order, seeds unchanged.
    let mut order = Vec::new();
    while let Some(row) = store.next_queued().await.unwrap() {
        assert_eq!(row.seeds[0], row.params["seed"].as_u64().unwrap());
        assert!(store.mark_running(&row.id).await.unwrap());
        order.push(row.id);
    }
    assert_eq!(order, vec![ids[0].clone(), ids[2].clone(), ids[3].clone()]);
    // Nothing running is left behind by a second recovery with attempts left.
    assert_eq!(store.recover(10).await.unwrap().requeued.len(), 3);
}

async fn idempotency_keys_are_per_owner(f: Fresh) {
    let store = f.store.clone();
    let key = store.create_key("k", None).await.unwrap();
    let with = |seed, hash: &str, owner: Option<&str>| NewJob {
        idempotency: Some(("abc".into(), hash.into())),
        ..job(seed, owner)
    };
    let first = insert(&store, &with(1, "h1", None)).await;
    match store.insert_job(&with(1, "h1", None)).await.unwrap() {
        Insert::Existing(row) => assert_eq!(row.id, first.id),
        other => panic!("{other:?}"),
    }
    match store.insert_job(&with(2, "h2", None)).await.unwrap() {
        Insert::Conflict(row) => assert_eq!(row.id, first.id),
        other => panic!("{other:?}"),
    }
    // Another owner may use the same key string.
    let other = insert(&store, &with(1, "h1", Some(&key.row.id))).await;
    assert_ne!(other.id, first.id);
    assert!(
        store
            .job_for(&first.id, Some(&key.row.id))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.job_for(&first.id, None).await.unwrap().is_some());
    assert!(store.job_for(&other.id, None).await.unwrap().is_none());
}

async fn keys_store_hashes_and_revoke(f: Fresh) {
    let store = f.store.clone();
    assert!(!store.has_keys().await.unwrap());
    let k = store.create_key("ci", Some(4)).await.unwrap();
    assert!(k.token.starts_with("afa_") && k.token.len() == 68);
    assert!(!format!("{k:?}").contains(&k.token));
    assert!(store.has_keys().await.unwrap());
    let found = store.key_for_token(&k.token).await.unwrap().unwrap();
    assert_eq!(
        (found.id.as_str(), found.max_queued_images),
        (k.row.id.as_str(), Some(4))
    );
    assert!(store.key_for_token("afa_wrong").await.unwrap().is_none());
    let hashes: Vec<Text> = store
        .db()
        .fetch_all("SELECT key_hash AS v FROM api_keys", vec![])
        .await
        .unwrap();
    let hashes: Vec<String> = hashes.into_iter().map(|Text(h)| h).collect();
    assert_eq!(hashes, vec![hash_token(&k.token)]);
    assert!(store.revoke_key(&k.row.id).await.unwrap());
    assert!(!store.revoke_key(&k.row.id).await.unwrap());
    assert!(store.key_for_token(&k.token).await.unwrap().is_none());
    assert!(
        store.has_keys().await.unwrap(),
        "revoked keys still switch auth on"
    );
    assert!(store.list_keys().await.unwrap()[0].revoked_at.is_some());
}

async fn artifacts_round_trip_and_expire(f: Fresh) {
    let store = f.store.clone();
    let files = Artifacts::open(f.tmp.0.join("data")).unwrap();
    let a = insert(&store, &job(5, None)).await;
    assert!(store.mark_running(&a.id).await.unwrap());
    let rows = files
        .write(
            &a.id,
            &[ArtifactFile {
                index: 0,
                kind: "png",
                bytes: b"png!".to_vec(),
            }],
        )
        .unwrap();
    assert_eq!(rows[0].sha256, sha256_hex(b"png!"));
    assert!(store.complete(&a.id, &rows, &json!({})).await.unwrap());
    assert_eq!(files.read(&rows[0]).unwrap(), b"png!");
    let mut tampered = rows[0].clone();
    tampered.path = "../jobs.db".into();
    assert!(
        files.read(&tampered).is_err(),
        "paths stay inside the data dir"
    );
    assert!(files.write("../evil", &[]).is_err());
    // Expiry: finished before `now + 1s` -> listed; removal takes files and rows.
    assert!(
        store
            .expired(now_ms() - 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let expired = store.expired(now_ms() + 1000, 10).await.unwrap();
    assert_eq!(expired, vec![a.id.clone()]);
    files.remove_job(&a.id).unwrap();
    store.delete_job(&a.id).await.unwrap();
    assert!(store.job(&a.id).await.unwrap().is_none());
    assert!(store.artifacts(&a.id).await.unwrap().is_empty());
    assert!(files.read(&rows[0]).is_err());
}

/// On PostgreSQL the sweep lock is one holder's across pools (replicas) until it is dropped,
/// also when the holder's pool is gone; on SQLite (one server per file) it is always granted.
async fn one_replica_holds_the_sweep_lock_at_a_time(f: Fresh) {
    let other = JobStore::open(&f.url).await.unwrap();
    let held = f.store.try_sweep_lock().await.unwrap();
    assert!(held.is_some());
    let second = other.try_sweep_lock().await.unwrap();
    match f.store.backend() {
        Backend::Sqlite => assert!(second.is_some()),
        Backend::Postgres => {
            assert!(second.is_none(), "two replicas sweeping at once");
            // Asked again on the same pool: still one holder.
            assert!(f.store.try_sweep_lock().await.unwrap().is_none());
            drop(held);
            // Closing the connection released it (the server may take a moment to notice).
            let t = std::time::Instant::now();
            let mut again = None;
            while again.is_none() {
                assert!(t.elapsed().as_secs() < 10, "the lock was never released");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                again = other.try_sweep_lock().await.unwrap();
            }
            assert!(f.store.try_sweep_lock().await.unwrap().is_none());
        }
    }
}

#[tokio::test]
async fn memory_databases_work_for_one_connection() {
    let store = JobStore::open("sqlite::memory:").await.unwrap();
    let a = insert(&store, &job(1, None)).await;
    assert_eq!(status(&store, &a.id).await, JobStatus::Queued);
}

/// Replicas submitting the same request with the same key at once get one job.
async fn concurrent_inserts_with_one_key_make_one_job(f: Fresh) {
    let other = JobStore::open(&f.url).await.unwrap();
    let new = NewJob {
        idempotency: Some(("retry-1".into(), "h".into())),
        ..job(3, None)
    };
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = if i % 2 == 0 {
                f.store.clone()
            } else {
                other.clone()
            };
            let new = new.clone();
            tokio::spawn(async move { store.insert_job(&new).await.unwrap() })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            Insert::Created(row) => {
                created += 1;
                ids.insert(row.id);
            }
            Insert::Existing(row) => {
                ids.insert(row.id);
            }
            Insert::Conflict(row) => panic!("same body, conflict: {row:?}"),
        }
    }
    assert_eq!((created, ids.len()), (1, 1));
    other.close().await;
}

/// The quota check's count: queued and running images, per owner, finished ones excluded.
async fn quotas_count_queued_and_running_images_per_owner(f: Fresh) {
    let store = f.store.clone();
    let k = store.create_key("q", Some(3)).await.unwrap();
    let owner = Some(k.row.id.as_str());
    let a = insert(&store, &job(1, owner)).await;
    let b = insert(&store, &job(2, owner)).await;
    insert(&store, &job(3, None)).await;
    assert_eq!(store.active_images(owner).await.unwrap(), 4);
    assert!(store.mark_running(&a.id).await.unwrap());
    assert_eq!(store.active_images(owner).await.unwrap(), 4);
    assert!(store.fail(&b.id, "x").await.unwrap());
    assert_eq!(store.active_images(owner).await.unwrap(), 2);
    assert_eq!(store.active_images(None).await.unwrap(), 2);
    let found = store.key_for_token(&k.token).await.unwrap().unwrap();
    assert_eq!(found.max_queued_images, Some(3));
}

/// Replicas starting together on an empty PostgreSQL database: every one migrates without
/// error (sqlx's advisory lock serialises them) and the schema is there once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrating_at_once_on_postgres_all_succeed() {
    let Some(url) = tokio::task::spawn_blocking(pg::fresh_database)
        .await
        .unwrap()
    else {
        eprintln!("skipped: no PostgreSQL");
        return;
    };
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { JobStore::open(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().expect("a replica failed to migrate"));
    }
    let super::db::Int(applied) = stores[0]
        .db()
        .fetch_one("SELECT COUNT(*) AS v FROM _sqlx_migrations", vec![])
        .await
        .unwrap();
    assert_eq!(applied as usize, PG_MIGRATOR.iter().count());
    insert(&stores[5], &job(1, None)).await;
    for s in stores {
        s.close().await;
    }
}
