//! HTTP behaviour under load and failure, with a fake engine that is slow and controllable:
//! 429 + Retry-After under overload with nothing accepted lost, cancellation when the client
//! disconnects (queued and running, plain and streaming), readiness while loading and
//! draining, and request ids.
mod http_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use afa::api::ApiConfig;
use http_support::*;
use serde_json::{Value, json};

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

#[tokio::test]
async fn overload_gets_429_and_every_accepted_job_finishes() {
    let (s, control) = start_fake(worker_config(2, 4), ApiConfig::default(), false);
    wait_ready(&s, Duration::from_secs(10));
    control.reset();
    control.step_ms.store(40, Ordering::SeqCst);
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let (client, url) = (client.clone(), s.url("/generate"));
            tokio::spawn(async move {
                let resp = client
                    .post(url)
                    .json(&json!({"prompt": format!("p{i}"), "steps": 4, "seed": i}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let retry = resp
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let body: Value = resp.json().await.unwrap();
                (i, status, retry, body)
            })
        })
        .collect();
    let mut ok = 0;
    let mut rejected = 0;
    for t in tasks {
        let (i, status, retry, body) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                assert_eq!(body["seeds"], json!([i]), "a result for another request");
            }
            429 => {
                rejected += 1;
                let secs: u64 = retry.expect("Retry-After on 429").parse().unwrap();
                assert!(secs >= 1);
                assert_eq!(body["error"]["code"], "queue_full");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        rejected > 0,
        "24 requests into a queue of 4 should overflow"
    );
    assert!(ok >= 4, "only {ok} accepted");
    assert_eq!(
        control.finished_images.load(Ordering::SeqCst),
        ok,
        "accepted work was lost"
    );
    assert_eq!(s.state.metrics.rejections("queue_full"), rejected as u64);
    let batches = control.batches.lock().unwrap().clone();
    assert!(batches.iter().all(|b| *b <= 2), "{batches:?}");
}

#[tokio::test]
async fn a_disconnected_client_cancels_its_running_and_queued_jobs() {
    let (s, control) = start_fake(worker_config(1, 8), ApiConfig::default(), false);
    wait_ready(&s, Duration::from_secs(10));
    control.reset();
    control.step_ms.store(50, Ordering::SeqCst);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    // The first runs (40 steps = 2 s), the second waits behind it; both clients give up.
    let a = impatient
        .post(s.url("/generate"))
        .json(&json!({"prompt": "a", "steps": 40}))
        .send();
    let b = impatient
        .post(s.url("/generate"))
        .json(&json!({"prompt": "b", "steps": 40}))
        .send();
    let (ra, rb) = tokio::join!(a, b);
    assert!(
        ra.is_err() && rb.is_err(),
        "both should time out client-side"
    );
    let done = wait_until(Duration::from_secs(5), || {
        control.cancelled_images.load(Ordering::SeqCst) >= 1 && s.worker.stats().queued_images == 0
    })
    .await;
    assert!(done, "the running image was not cancelled");
    assert!(
        wait_until(Duration::from_secs(5), || s.worker.stats().running_images
            == 0)
        .await
    );
    assert_eq!(
        control.finished_images.load(Ordering::SeqCst),
        0,
        "a cancelled image was finished"
    );
    // The queued job never started: only one image ever reached the engine.
    assert_eq!(control.started_images.load(Ordering::SeqCst), 1);
    assert_eq!(s.state.metrics.client_disconnects.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn closing_an_event_stream_cancels_the_job() {
    let (s, control) = start_fake(worker_config(1, 8), ApiConfig::default(), false);
    wait_ready(&s, Duration::from_secs(10));
    control.reset();
    control.step_ms.store(50, Ordering::SeqCst);
    let mut resp = reqwest::Client::new()
        .post(s.url("/generate/stream"))
        .json(&json!({"prompt": "a", "steps": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    while !seen.contains("event: progress") {
        let chunk = resp.chunk().await.unwrap().expect("more events");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: queued"), "{seen}");
    drop(resp);
    assert!(
        wait_until(Duration::from_secs(5), || control
            .cancelled_images
            .load(Ordering::SeqCst)
            == 1)
        .await
    );
    assert_eq!(control.finished_images.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn not_ready_while_loading_then_ready_then_draining() {
    let (s, control) = start_fake(worker_config(2, 8), ApiConfig::default(), true);
    let client = reqwest::Client::new();
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);
    let ready = reqwest::get(s.url("/ready")).await.unwrap();
    assert!(ready.headers().contains_key("retry-after"));
    let (status, _, body) = envelope(ready).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("not_ready"))
    );
    let generate = client
        .post(s.url("/generate"))
        .json(&json!({"prompt": "a"}))
        .send()
        .await
        .unwrap();
    assert!(generate.headers().contains_key("retry-after"));
    assert_eq!(envelope(generate).await.0, 503);
    let info: Value = s.get_json("/info").await;
    assert_eq!(info["state"], "loading");
    assert_eq!(info["devices"][0]["state"], "loading");
    control.release_load.store(true, Ordering::SeqCst);
    wait_ready(&s, Duration::from_secs(10));
    assert_eq!(reqwest::get(s.url("/ready")).await.unwrap().status(), 200);
    let ok = client
        .post(s.url("/generate"))
        .json(&json!({"prompt": "a", "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let info: Value = s.get_json("/info").await;
    let device = &info["devices"][0];
    assert_eq!(
        (&device["name"], &device["state"], &device["batches"]),
        (&json!("device-0"), &json!("ready"), &json!(1)),
        "the request's batch (the warm-up is not counted): {info}"
    );
    let metrics = reqwest::get(s.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("afa_device_up{device=\"device-0\"} 1\n")
            && metrics.contains("afa_device_images_completed_total{device=\"device-0\"} 1\n"),
        "{metrics}"
    );
    s.worker.begin_drain();
    let (status, _, body) = envelope(reqwest::get(s.url("/ready")).await.unwrap()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("draining"))
    );
    let refused = client
        .post(s.url("/generate"))
        .json(&json!({"prompt": "a"}))
        .send()
        .await
        .unwrap();
    assert!(refused.headers().contains_key("retry-after"));
    let (status, _, body) = envelope(refused).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("draining"))
    );
    assert_eq!(s.state.metrics.rejections("draining"), 1);
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated_everywhere() {
    let (s, _control) = start_fake(worker_config(2, 8), ApiConfig::default(), false);
    wait_ready(&s, Duration::from_secs(10));
    let client = reqwest::Client::new();
    let echoed = client
        .get(s.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "abc-123");
    let made = client.get(s.url("/nope")).send().await.unwrap();
    let id = made.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.starts_with("req-") && id.len() > 10, "{id}");
    let ok = client
        .post(s.url("/generate"))
        .json(&json!({"prompt": "a", "steps": 1}))
        .send()
        .await
        .unwrap();
    let other = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(id, other);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(body["id"], other.as_str());
}

#[tokio::test]
async fn a_failed_warm_up_keeps_ready_at_503_with_the_reason() {
    let (s, control) = start_fake(worker_config(2, 8), ApiConfig::default(), true);
    control.fail_runs.store(true, Ordering::SeqCst);
    control.release_load.store(true, Ordering::SeqCst);
    let failed = wait_until(Duration::from_secs(10), || s.worker.failure().is_some()).await;
    assert!(failed, "the worker never reported the failure");
    let (status, _, body) = envelope(reqwest::get(s.url("/ready")).await.unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "models_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("warm-up of ensemble 'fake'"), "{message}");
    assert!(
        !message.contains("bus"),
        "internals stay in the log: {message}"
    );
    let info: Value = s.get_json("/info").await;
    assert_eq!(info["state"], "failed");
    let generate = reqwest::Client::new()
        .post(s.url("/generate"))
        .json(&json!({"prompt": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(envelope(generate).await.0, 503);
}
