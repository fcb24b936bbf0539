//! Lease tests on both backends: claiming batches within a limit, renewal (and the cancels and
//! losses it reports), expiry back to the queue and failure past the attempts, late results
//! discarded, release on drain, recovery leaving live leases alone, and two replicas claiming
//! at once never taking the same job; progress written by the holder only, shown to every reader.
use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use super::{Fresh, fresh_postgres, fresh_sqlite, insert, job, status};
use crate::store::*;

const LONG: Duration = Duration::from_secs(60);

fn keyed(seed: u64, key: Option<&str>, images: usize) -> NewJob {
    NewJob {
        seeds: (0..images as u64).map(|i| seed + i).collect(),
        batch_key: key.map(String::from),
        ..job(seed, None)
    }
}

fn ids(claims: &[Claim]) -> Vec<String> {
    claims.iter().map(|c| c.job.id.clone()).collect()
}

fn limit(jobs: usize, images: usize) -> ClaimLimit {
    ClaimLimit { jobs, images }
}

/// Leases that expired a moment ago (a claim with a zero lease, then a short wait).
async fn claim_expired(store: &JobStore, owner: &str) -> Vec<Claim> {
    let c = store
        .claim(owner, limit(1, 100), Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    c
}

on_both_backends!(
    claims_take_one_batch_key_within_the_limit,
    renewal_extends_and_reports_cancels_and_losses,
    expired_leases_requeue_then_fail_past_max_attempts,
    late_results_are_discarded,
    release_requeues_without_counting_the_attempt,
    recovery_leaves_live_leases_alone_on_postgres,
    concurrent_claimers_never_share_a_job,
    progress_is_written_by_the_holder_and_cleared_by_a_claim,
);

async fn claims_take_one_batch_key_within_the_limit(f: Fresh) {
    let s = f.store.clone();
    let a = insert(&s, &keyed(1, Some("k1"), 2)).await;
    let b = insert(&s, &keyed(2, Some("k2"), 2)).await;
    let c = insert(&s, &keyed(3, Some("k1"), 2)).await;
    let d = insert(&s, &keyed(4, Some("k1"), 2)).await;
    let e = insert(&s, &keyed(5, None, 1)).await;
    let g = insert(&s, &keyed(6, None, 1)).await;
    // The oldest job and the next of its key that fit in 4 images.
    let first = s.claim("r1", limit(8, 4), LONG).await.unwrap();
    assert_eq!(ids(&first), vec![a.id.clone(), c.id.clone()]);
    for claim in &first {
        assert_eq!(claim.job.status, JobStatus::Running);
        assert_eq!(claim.job.attempts, 1);
        assert_eq!(claim.job.lease_owner.as_deref(), Some("r1"));
        // The database's clock, in milliseconds like ours (same machine here).
        let expires = claim.job.lease_expires_at.unwrap();
        assert!(
            (now_ms() + 55_000..now_ms() + 61_000).contains(&expires),
            "{expires}"
        );
        assert_eq!(claim.lease.job_id, claim.job.id);
    }
    assert_ne!(first[0].lease.lease_id, first[1].lease.lease_id);
    // The oldest queued job (b, 2 images) does not fit in 1: nothing, not a younger job.
    assert!(s.claim("r2", limit(8, 1), LONG).await.unwrap().is_empty());
    assert!(s.claim("r2", limit(0, 8), LONG).await.unwrap().is_empty());
    // b's key has no other job; d (k1) is not taken with it.
    assert_eq!(
        ids(&s.claim("r2", limit(8, 8), LONG).await.unwrap()),
        vec![b.id]
    );
    // The job limit holds too; jobs without a key are claimed alone.
    assert_eq!(
        ids(&s.claim("r2", limit(1, 8), LONG).await.unwrap()),
        vec![d.id]
    );
    assert_eq!(
        ids(&s.claim("r2", limit(8, 8), LONG).await.unwrap()),
        vec![e.id]
    );
    assert_eq!(
        ids(&s.claim("r2", limit(8, 8), LONG).await.unwrap()),
        vec![g.id]
    );
    assert!(s.claim("r2", limit(8, 8), LONG).await.unwrap().is_empty());
    assert!(s.next_queued().await.unwrap().is_none());
}

async fn renewal_extends_and_reports_cancels_and_losses(f: Fresh) {
    let s = f.store.clone();
    insert(&s, &keyed(1, Some("k"), 1)).await;
    insert(&s, &keyed(2, Some("k"), 1)).await;
    insert(&s, &keyed(3, Some("k"), 1)).await;
    let claims = s
        .claim("r1", limit(3, 3), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(claims.len(), 3);
    let held: Vec<Lease> = claims.iter().map(|c| c.lease.clone()).collect();
    let before = claims[0].job.lease_expires_at.unwrap();
    // A client cancels one job; another's lease is taken over (expired, requeued, reclaimed).
    assert_eq!(
        s.cancel(&held[1].job_id).await.unwrap(),
        Some(JobStatus::Running)
    );
    assert!(s.requeue_leased(&held[2], None).await.unwrap());
    let taken = s.claim("r2", limit(1, 1), LONG).await.unwrap();
    assert_eq!(ids(&taken), vec![held[2].job_id.clone()]);
    let r = s.renew("r1", &held, LONG).await.unwrap();
    assert_eq!(r.renewed, vec![held[0].job_id.clone()]);
    assert_eq!(r.cancelled, vec![held[1].job_id.clone()]);
    assert_eq!(r.lost, vec![held[2].job_id.clone()]);
    let row = s.job(&held[0].job_id).await.unwrap().unwrap();
    assert!(row.lease_expires_at.unwrap() >= before + 50_000);
    // r2's lease was not touched by r1's renewal; another owner renews nothing.
    let r2 = s.job(&held[2].job_id).await.unwrap().unwrap();
    assert_eq!(r2.lease_owner.as_deref(), Some("r2"));
    let wrong = s.renew("r3", &held[..1], LONG).await.unwrap();
    assert_eq!(wrong.lost, vec![held[0].job_id.clone()]);
    assert_eq!(s.renew("r1", &[], LONG).await.unwrap(), Renewal::default());
}

async fn expired_leases_requeue_then_fail_past_max_attempts(f: Fresh) {
    let s = f.store.clone();
    let a = insert(&s, &keyed(1, None, 1)).await;
    let live = insert(&s, &keyed(2, None, 1)).await;
    claim_expired(&s, "r1").await;
    assert_eq!(
        s.claim("r2", limit(1, 1), LONG).await.unwrap()[0].job.id,
        live.id
    );
    // a's lease expired: back in the queue with its attempt counted; live's lease stays.
    let reaped = s.reap_expired(2).await.unwrap();
    assert_eq!(reaped.requeued, vec![a.id.clone()]);
    assert!(reaped.failed.is_empty());
    let row = s.job(&a.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Queued, 1));
    assert_eq!((row.lease_owner, row.lease_expires_at), (None, None));
    assert!(row.error.unwrap().contains("lease expired"));
    assert_eq!(status(&s, &live.id).await, JobStatus::Running);
    // Second attempt lost too: with 2 attempts allowed it fails.
    let again = claim_expired(&s, "r3").await;
    assert_eq!(
        (again[0].job.id.as_str(), again[0].job.attempts),
        (a.id.as_str(), 2)
    );
    let reaped = s.reap_expired(2).await.unwrap();
    assert_eq!(reaped.failed, vec![a.id.clone()]);
    let row = s.job(&a.id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Failed);
    assert!(row.error.unwrap().contains("interrupted 2 times"));
    assert!(row.finished_at.is_some());
    assert_eq!(s.reap_expired(2).await.unwrap(), Reaped::default());
}

async fn late_results_are_discarded(f: Fresh) {
    let s = f.store.clone();
    let a = insert(&s, &keyed(1, None, 1)).await;
    let art = |tag: &str| ArtifactRow {
        job_id: a.id.clone(),
        index: 0,
        kind: "png".into(),
        path: format!("jobs/{}/0.png", a.id),
        sha256: tag.into(),
        bytes: 1,
    };
    let old = claim_expired(&s, "r1").await.remove(0).lease;
    assert_eq!(
        s.reap_expired(3).await.unwrap().requeued,
        vec![a.id.clone()]
    );
    let new = s
        .claim("r2", limit(1, 1), LONG)
        .await
        .unwrap()
        .remove(0)
        .lease;
    // r1 finishes late: discarded, and told who holds the job now; nothing recorded.
    let late = s
        .complete_leased(&old, &[art("r1")], &json!({}))
        .await
        .unwrap();
    assert_eq!(
        late,
        Completion::LeaseLost {
            status: Some(JobStatus::Running),
            holder: Some("r2".into())
        }
    );
    assert!(s.artifacts(&a.id).await.unwrap().is_empty());
    assert!(!s.fail_leased(&old, "late failure").await.unwrap());
    assert!(!s.requeue_leased(&old, None).await.unwrap());
    assert!(!s.release(&old).await.unwrap());
    assert_eq!(status(&s, &a.id).await, JobStatus::Running);
    // The holder's result is recorded; a second one (even its own) is not.
    let done = s
        .complete_leased(&new, &[art("r2")], &json!({"ms": 1}))
        .await;
    assert_eq!(done.unwrap(), Completion::Recorded);
    assert_eq!(s.artifacts(&a.id).await.unwrap(), vec![art("r2")]);
    let twice = s
        .complete_leased(&new, &[art("x")], &json!({}))
        .await
        .unwrap();
    assert!(matches!(
        twice,
        Completion::LeaseLost {
            status: Some(JobStatus::Succeeded),
            ..
        }
    ));
    assert_eq!(s.artifacts(&a.id).await.unwrap(), vec![art("r2")]);
    // A job cancelled while it ran: the holder learns it at completion.
    let b = insert(&s, &keyed(2, None, 1)).await;
    let lease = s
        .claim("r1", limit(1, 1), LONG)
        .await
        .unwrap()
        .remove(0)
        .lease;
    s.cancel(&b.id).await.unwrap();
    let c = s.complete_leased(&lease, &[], &json!({})).await.unwrap();
    assert_eq!(c, Completion::Cancelled);
    assert_eq!(status(&s, &b.id).await, JobStatus::Cancelled);
}

async fn release_requeues_without_counting_the_attempt(f: Fresh) {
    let s = f.store.clone();
    let a = insert(&s, &keyed(1, None, 1)).await;
    let b = insert(&s, &keyed(2, None, 1)).await;
    let lease = s
        .claim("r1", limit(1, 1), LONG)
        .await
        .unwrap()
        .remove(0)
        .lease;
    assert!(s.release(&lease).await.unwrap());
    let row = s.job(&a.id).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.attempts, row.lease_owner),
        (JobStatus::Queued, 0, None)
    );
    // It keeps its place ahead of b.
    assert_eq!(s.next_queued().await.unwrap().unwrap().id, a.id);
    assert!(!s.release(&lease).await.unwrap(), "released twice");
    // A failure by the holder is final.
    let lease = s
        .claim("r1", limit(1, 1), LONG)
        .await
        .unwrap()
        .remove(0)
        .lease;
    assert!(s.fail_leased(&lease, "bad").await.unwrap());
    assert_eq!(status(&s, &a.id).await, JobStatus::Failed);
    assert_eq!(s.next_queued().await.unwrap().unwrap().id, b.id);
}

async fn recovery_leaves_live_leases_alone_on_postgres(f: Fresh) {
    let s = f.store.clone();
    let leased = insert(&s, &keyed(1, None, 1)).await;
    let unleased = insert(&s, &keyed(2, None, 1)).await;
    let expired = insert(&s, &keyed(3, None, 1)).await;
    s.claim("r1", limit(1, 1), LONG).await.unwrap();
    assert!(s.mark_running(&unleased.id).await.unwrap());
    claim_expired(&s, "r2").await;
    let r = s.recover(3).await.unwrap();
    if s.backend() == Backend::Postgres {
        // A replica restarting: the job a live replica holds keeps running there.
        assert_eq!(r.requeued, vec![unleased.id.clone(), expired.id.clone()]);
        assert_eq!(r.queued, 2);
        assert_eq!(status(&s, &leased.id).await, JobStatus::Running);
    } else {
        // One file, one server: whatever ran was the previous process's.
        let all = vec![leased.id.clone(), unleased.id.clone(), expired.id.clone()];
        assert_eq!((r.requeued, r.queued), (all, 3));
    }
}

/// Two replicas (two pools on one database) claim at once until the queue is empty: every job
/// is claimed exactly once.
async fn concurrent_claimers_never_share_a_job(f: Fresh) {
    let total = 60;
    let mut all = BTreeSet::new();
    for i in 0..total {
        let key = ["a", "b", "c"][i % 3];
        all.insert(insert(&f.store, &keyed(i as u64, Some(key), 1)).await.id);
    }
    let replicas = [f.store.clone(), JobStore::open(&f.url).await.unwrap()];
    let tasks: Vec<_> = replicas
        .iter()
        .enumerate()
        .flat_map(|(r, store)| (0..2).map(move |t| (format!("r{r}-{t}"), store.clone())))
        .map(|(owner, store)| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let c = store.claim(&owner, limit(3, 3), LONG).await.unwrap();
                    if c.is_empty() && store.next_queued().await.unwrap().is_none() {
                        return got;
                    }
                    got.extend(ids(&c));
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let unique: BTreeSet<String> = claimed.iter().cloned().collect();
    assert_eq!(claimed.len(), total, "a job was claimed twice");
    assert_eq!(unique, all);
    for id in &all {
        let row = f.store.job(id).await.unwrap().unwrap();
        assert_eq!((row.status, row.attempts), (JobStatus::Running, 1));
    }
    replicas[1].close().await;
}

async fn progress_is_written_by_the_holder_and_cleared_by_a_claim(f: Fresh) {
    let s = f.store.clone();
    let a = insert(&s, &keyed(1, None, 2)).await;
    let b = insert(&s, &keyed(2, None, 3)).await;
    let c = insert(&s, &keyed(3, None, 1)).await;
    // Images ahead of a queued job: the queued ones before it and every running one.
    assert_eq!(s.images_ahead(c.queue_order).await.unwrap(), 5);
    let claim = s.claim("r1", limit(1, 8), LONG).await.unwrap().remove(0);
    assert_eq!(claim.job.id, a.id);
    assert_eq!(claim.job.progress, None, "nothing written yet");
    assert_eq!(s.images_ahead(c.queue_order).await.unwrap(), 5);
    assert_eq!(s.images_ahead(b.queue_order).await.unwrap(), 2);

    assert!(
        s.record_progress(&claim.lease, Some(3), (0, 20))
            .await
            .unwrap()
    );
    let p = row(&s, &a.id).await.progress.unwrap();
    assert_eq!((p.position, p.step, p.total), (Some(3), 0, 20));
    assert!(
        s.record_progress(&claim.lease, None, (7, 20))
            .await
            .unwrap()
    );
    let p = row(&s, &a.id).await.progress.unwrap();
    assert_eq!((p.position, p.step, p.total), (None, 7, 20));
    assert!((now_ms() - 5_000..=now_ms()).contains(&p.at));

    // Someone else's lease (a stale one) writes nothing.
    let stale = Lease {
        job_id: a.id.clone(),
        lease_id: "0000".into(),
    };
    assert!(!s.record_progress(&stale, None, (19, 20)).await.unwrap());
    assert_eq!(row(&s, &a.id).await.progress.unwrap().step, 7);

    // Released and claimed again: the new attempt starts without the old progress.
    assert!(s.release(&claim.lease).await.unwrap());
    assert!(
        !s.record_progress(&claim.lease, None, (8, 20))
            .await
            .unwrap()
    );
    let again = s.claim("r2", limit(1, 8), LONG).await.unwrap().remove(0);
    assert_eq!(again.job.id, a.id);
    assert_eq!(again.job.progress, None);
    assert_eq!(row(&s, &a.id).await.progress, None);
}

async fn row(s: &JobStore, id: &str) -> JobRow {
    s.job(id).await.unwrap().unwrap()
}
