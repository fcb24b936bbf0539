//! The async job API over a fake engine on a real listener with a fresh job database per
//! server: submit/poll/fetch, idempotency, cancel, SSE progress, `response_format: "url"`,
//! retries that end `failed`, per-key limits, expiry, and API-key isolation (leases and
//! replicas: `jobs_replicas.rs`).
mod http_support;
mod jobs_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use afa::api::ApiConfig;
use http_support::*;
use jobs_support::*;
use serde_json::{Value, json};

#[tokio::test]
async fn submit_poll_and_fetch_images() {
    let s = start_jobs(5, Duration::from_secs(3600), ApiConfig::default());
    let r = submit(
        &s,
        json!({"prompt": "a fox", "n": 2, "seed": 40, "steps": 3}),
        None,
    )
    .await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert_eq!(v["seeds"], json!([40, 41]));
    let done = finished(&s, &id, None).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["parameters"]["steps"], 3);
    assert!(done["timings"]["denoise_ms"].is_number());
    let images = done["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for (k, img) in images.iter().enumerate() {
        let r = get(&s, img["url"].as_str().unwrap(), None).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let bytes = r.bytes().await.unwrap();
        let rgb = vec![((40 + k as u64) % 251) as u8; 8 * 8 * 3];
        assert_eq!(
            bytes,
            afa::pipeline::png::encode_rgb_png(&rgb, 8, 8, None).unwrap()
        );
        assert_eq!(img["seed"], 40 + k as u64);
    }
    // The async job shows in the queue-wait and stage histograms like a synchronous one.
    let metrics = get(&s, "/metrics", None).await.text().await.unwrap();
    for line in [
        "afa_queue_wait_seconds_count 1",
        "afa_stage_seconds_count{stage=\"denoise\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    let r = get(&s, &format!("/v1/jobs/{id}/images/2"), None).await;
    assert_eq!(envelope(r).await.0, 404);
    let r = get(&s, "/v1/jobs/job_000000000000000000000000", None).await;
    assert_eq!(envelope(r).await.0, 404);
    let r = submit(&s, json!({"prompt": "a", "stream": true}), None).await;
    assert_eq!(envelope(r).await.1.as_deref(), Some("stream"));
    let r = submit(&s, json!({"prompt": "a", "steps": 0}), None).await;
    assert_eq!(envelope(r).await.1.as_deref(), Some("steps"));
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_or_409() {
    let s = start_jobs(1, Duration::from_secs(3600), ApiConfig::default());
    let send = |body: Value, key: &'static str| {
        client()
            .post(s.server.url("/v1/jobs"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let a: Value = send(json!({"prompt": "x", "seed": 1, "steps": 2}), "k-1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Same body, fields in another order: the same job.
    let r = send(json!({"steps": 2, "seed": 1, "prompt": "x"}), "k-1")
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let b: Value = r.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    let r = send(json!({"prompt": "y", "seed": 1, "steps": 2}), "k-1")
        .await
        .unwrap();
    let (status, param, _) = envelope(r).await;
    assert_eq!((status, param.as_deref()), (409, Some("Idempotency-Key")));
    // Another key: another job; no key: always a new job.
    let c: Value = send(json!({"prompt": "x", "seed": 1, "steps": 2}), "k-2")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(a["id"], c["id"]);
    let d: Value = submit(&s, json!({"prompt": "x", "seed": 1, "steps": 2}), None)
        .await
        .json()
        .await
        .unwrap();
    let e: Value = submit(&s, json!({"prompt": "x", "seed": 1, "steps": 2}), None)
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(d["id"], e["id"]);
}

#[tokio::test]
async fn cancel_queued_and_running_jobs() {
    let s = start_jobs(100, Duration::from_secs(3600), ApiConfig::default());
    let long = json!({"prompt": "long", "steps": 200});
    let a: Value = submit(&s, long.clone(), None).await.json().await.unwrap();
    let a = a["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    // The warm-up counts one image; the row turns running just after the worker took it.
    loop {
        let v: Value = get(&s, &format!("/v1/jobs/{a}"), None)
            .await
            .json()
            .await
            .unwrap();
        if s.control.started_images.load(Ordering::SeqCst) >= 2 && v["status"] == "running" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the job never started: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b: Value = submit(&s, long, None).await.json().await.unwrap();
    let b = b["id"].as_str().unwrap().to_string();
    for id in [&b, &a] {
        let r = client()
            .delete(s.server.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "cancelled");
    }
    let t = Instant::now();
    while s.control.cancelled_images.load(Ordering::SeqCst) < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the running job was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = client()
        .delete(s.server.url(&format!("/v1/jobs/{a}")))
        .send()
        .await
        .unwrap();
    assert_eq!(envelope(r).await.0, 409);
    assert_eq!(finished(&s, &b, None).await["status"], "cancelled");
}

#[tokio::test]
async fn events_stream_progress_then_the_result() {
    let s = start_jobs(30, Duration::from_secs(3600), ApiConfig::default());
    let v: Value = submit(&s, json!({"prompt": "p", "steps": 20, "seed": 3}), None)
        .await
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap();
    let r = get(&s, &format!("/v1/jobs/{id}/events"), None).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = tokio::time::timeout(Duration::from_secs(30), r.text())
        .await
        .unwrap()
        .unwrap();
    let events = parse_sse(&text);
    assert!(events.iter().any(|e| e.event == "progress"), "{text}");
    let last = events.last().unwrap();
    assert_eq!(last.event, "result", "{text}");
    let result: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["seeds"], json!([3]));
}

#[tokio::test]
async fn openai_url_format_links_the_stored_images() {
    let s = start_jobs(1, Duration::from_secs(3600), ApiConfig::default());
    let r = client()
        .post(s.server.url("/v1/images/generations"))
        .json(&json!({"prompt": "a", "response_format": "url", "n": 2, "seed": 8, "steps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (k, d) in data.iter().enumerate() {
        let url = d["url"].as_str().unwrap();
        assert!(
            url.starts_with(&format!("http://{}/v1/jobs/", s.server.addr)),
            "{url}"
        );
        let r = client().get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let (w, h, _) = decode_png(&r.bytes().await.unwrap());
        assert_eq!((w, h), (8, 8));
        assert_eq!(d["seed"], 8 + k as u64);
    }
    // The links serve the asked format, and the answer says which.
    let v: Value = client()
        .post(s.server.url("/v1/images/generations"))
        .json(
            &json!({"prompt": "a", "response_format": "url", "seed": 8, "steps": 2,
            "output_format": "webp"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["output_format"], "webp", "{v}");
    let r = client()
        .get(v["data"][0]["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/webp");
    assert_eq!(&r.bytes().await.unwrap()[8..12], b"WEBP");
}

#[tokio::test]
async fn failing_jobs_are_retried_then_fail_with_a_reason() {
    let s = start_jobs(1, Duration::from_secs(3600), ApiConfig::default());
    let v: Value = submit(&s, json!({"prompt": "fail please", "steps": 2}), None)
        .await
        .json()
        .await
        .unwrap();
    let done = finished(&s, v["id"].as_str().unwrap(), None).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["attempts"], 3);
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("failed 3 times"), "{message}");
    assert!(!message.contains("injected"), "internals leak: {message}");
    let ok: Value = submit(&s, json!({"prompt": "fine", "steps": 2}), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        finished(&s, ok["id"].as_str().unwrap(), None).await["status"],
        "succeeded"
    );
}

#[tokio::test]
async fn finished_jobs_expire_with_their_files() {
    let s = start_jobs(1, Duration::from_millis(300), ApiConfig::default());
    let v: Value = submit(&s, json!({"prompt": "brief", "steps": 2}), None)
        .await
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(finished(&s, &id, None).await["status"], "succeeded");
    let dir = s.jobs.artifacts.root().join("jobs").join(&id);
    let t = Instant::now();
    loop {
        let r = get(&s, &format!("/v1/jobs/{id}"), None).await;
        if r.status() == 404 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the job never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!dir.exists(), "files outlived their row");
}

#[tokio::test]
async fn store_keys_isolate_callers() {
    let s = start_jobs(1, Duration::from_secs(3600), ApiConfig::default());
    // No key yet: open.
    assert_eq!(get(&s, "/v1/models", None).await.status(), 200);
    let a = s.jobs.store.create_key("alice", None).await.unwrap();
    let b = s.jobs.store.create_key("bob", Some(2)).await.unwrap();
    let revoked = s.jobs.store.create_key("old", None).await.unwrap();
    assert!(s.jobs.store.revoke_key(&revoked.row.id).await.unwrap());
    let body = json!({"prompt": "mine", "steps": 2});
    assert_eq!(envelope(submit(&s, body.clone(), None).await).await.0, 401);
    assert_eq!(
        envelope(submit(&s, body.clone(), Some("afa_nope")).await)
            .await
            .0,
        401
    );
    assert_eq!(
        envelope(submit(&s, body.clone(), Some(&revoked.token)).await)
            .await
            .0,
        401
    );
    assert_eq!(envelope(get(&s, "/v1/models", None).await).await.0, 401);
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(&s, open, None).await.status(), 200, "{open}");
    }
    let r = submit(&s, body.clone(), Some(&a.token)).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        finished(&s, &id, Some(&a.token)).await["status"],
        "succeeded"
    );
    for path in [
        format!("/v1/jobs/{id}"),
        format!("/v1/jobs/{id}/images/0"),
        format!("/v1/jobs/{id}/events"),
    ] {
        assert_eq!(
            envelope(get(&s, &path, Some(&b.token)).await).await.0,
            404,
            "{path}"
        );
        assert_eq!(get(&s, &path, Some(&a.token)).await.status(), 200, "{path}");
    }
    let r = client()
        .delete(s.server.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(&b.token)
        .send()
        .await
        .unwrap();
    assert_eq!(envelope(r).await.0, 404);
    // Bob may hold at most 2 queued images.
    let r = submit(
        &s,
        json!({"prompt": "many", "n": 3, "steps": 2}),
        Some(&b.token),
    )
    .await;
    assert_eq!(envelope(r).await.0, 429);
}

#[tokio::test]
async fn operator_keys_still_work_with_the_store() {
    let api = ApiConfig {
        api_keys: afa::api::ApiKeys::new(vec!["operator".into()]),
        ..ApiConfig::default()
    };
    let s = start_jobs(1, Duration::from_secs(3600), api);
    assert_eq!(
        envelope(submit(&s, json!({"prompt": "a"}), None).await)
            .await
            .0,
        401
    );
    let r = submit(&s, json!({"prompt": "a", "steps": 2}), Some("operator")).await;
    assert_eq!(r.status(), 202);
    let k = s.jobs.store.create_key("k", None).await.unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        finished(&s, &id, Some("operator")).await["status"],
        "succeeded"
    );
    assert_eq!(
        get(&s, &format!("/v1/jobs/{id}"), Some(&k.token))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn the_quota_holds_on_every_route_and_retries_replay_first() {
    // 100 ms per step: a 20-step job holds its images for about 2 s.
    let s = start_jobs(100, Duration::from_secs(3600), ApiConfig::default());
    let k = s.jobs.store.create_key("carol", Some(2)).await.unwrap();
    let post = |path: &'static str, body: Value| {
        client()
            .post(s.server.url(path))
            .bearer_auth(&k.token)
            .json(&body)
            .send()
    };
    // Too many images at once, on each route that queues work.
    for path in ["/generate", "/v1/images/generations", "/v1/jobs"] {
        let r = post(path, json!({"prompt": "x", "n": 3, "steps": 1}))
            .await
            .unwrap();
        assert_eq!(envelope(r).await.0, 429, "{path}");
    }
    // A stored job of 2 images fills the quota ...
    let send = |body: Value| {
        client()
            .post(s.server.url("/v1/jobs"))
            .bearer_auth(&k.token)
            .header("idempotency-key", "order-1")
            .json(&body)
            .send()
    };
    let first = send(json!({"prompt": "x", "n": 2, "steps": 20, "guidance_scale": 7}))
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    // ... so the synchronous routes refuse more, and so does a new job ...
    for path in ["/generate", "/v1/images/generations", "/v1/jobs"] {
        let r = post(path, json!({"prompt": "y", "steps": 1}))
            .await
            .unwrap();
        assert_eq!(envelope(r).await.0, 429, "{path} while the job runs");
    }
    // ... but a retry of the same request (7 and 7.0 are the same number) replays it.
    let again = send(json!({"steps": 20, "prompt": "x", "guidance_scale": 7.0, "n": 2}))
        .await
        .unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    let id = first["id"].as_str().unwrap();
    assert_eq!(
        finished(&s, id, Some(&k.token)).await["status"],
        "succeeded"
    );
    // Done: the quota is free again, and a synchronous request holds its share while it runs.
    let slow = tokio::spawn(post(
        "/generate",
        json!({"prompt": "z", "n": 2, "steps": 20}),
    ));
    let t = Instant::now();
    while s.server.state.in_flight.count(&k.row.id) == 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = post("/v1/jobs", json!({"prompt": "w", "steps": 1}))
        .await
        .unwrap();
    assert_eq!(
        envelope(r).await.0,
        429,
        "a synchronous request holds the quota"
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert_eq!(s.server.state.in_flight.count(&k.row.id), 0);
    let r = post("/generate", json!({"prompt": "w", "steps": 1}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn init_images_are_stored_with_the_job_and_shown_by_digest() {
    use base64::Engine as _;
    let s = start_jobs(5, Duration::from_secs(3600), ApiConfig::default());
    let mut png = std::io::Cursor::new(Vec::new());
    image::DynamicImage::new_rgb8(64, 64)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let init = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
    let body =
        json!({"prompt": "a fox", "seed": 2, "steps": 3, "init_image": init, "strength": 0.5});
    let r = submit(&s, body.clone(), None).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = finished(&s, &id, None).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let params = &done["parameters"];
    assert_eq!(params["strength"], 0.5);
    assert_eq!(
        (params["width"].as_u64(), params["height"].as_u64()),
        (Some(64), Some(64))
    );
    assert!(
        params.get("init_image").is_none(),
        "the picture is not echoed: {params}"
    );
    assert_eq!(
        params["init_image_sha256"],
        afa::store::sha256_hex(init.as_bytes()),
        "{params}"
    );
}

#[tokio::test]
async fn jobs_keep_their_format_and_stream_previews() {
    let s = start_jobs(30, Duration::from_secs(3600), ApiConfig::default());
    let body = json!({"prompt": "p", "steps": 6, "seed": 2, "n": 2, "output_format": "jpeg",
        "output_compression": 70, "partial_images": 2});
    let v: Value = submit(&s, body, None).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let text = tokio::time::timeout(
        Duration::from_secs(30),
        get(&s, &format!("/v1/jobs/{id}/events"), None).await.text(),
    )
    .await
    .unwrap()
    .unwrap();
    let events = parse_sse(&text);
    let previews: Vec<Value> = events
        .iter()
        .filter(|e| e.event == "preview")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    // Two per image were made (after steps 2 and 4); the stream sends the newest it sees.
    assert!(!previews.is_empty() && previews.len() <= 4, "{text}");
    for p in &previews {
        assert_eq!(p["output_format"], "jpeg");
        let jpeg = base64_decode(&p["image_base64"]);
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8], "{p}");
        assert!([2, 4].contains(&p["step"].as_u64().unwrap()), "{p}");
    }
    let view = finished(&s, &id, None).await;
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["parameters"]["output_format"], "jpeg");
    assert_eq!(view["parameters"]["partial_images"], 2);
    for img in view["images"].as_array().unwrap() {
        assert_eq!(img["content_type"], "image/jpeg", "{view}");
        let r = get(&s, img["url"].as_str().unwrap(), None).await;
        assert_eq!(r.headers()["content-type"], "image/jpeg");
        let bytes = r.bytes().await.unwrap();
        assert_eq!(&bytes[..2], &[0xFF, 0xD8]);
        let mut dec = image::codecs::jpeg::JpegDecoder::new(std::io::Cursor::new(&bytes)).unwrap();
        use image::ImageDecoder;
        let exif = dec.exif_metadata().unwrap().unwrap();
        let comment = afa::pipeline::encode::read_user_comment(&exif).unwrap();
        assert!(comment.starts_with("p\nSeed: "), "{comment}");
    }
    // The file on disk is named for its format.
    let artifacts = s.jobs.store.artifacts(&id).await.unwrap();
    assert!(
        artifacts
            .iter()
            .all(|a| a.kind == "jpeg" && a.path.ends_with(".jpg"))
    );
}

fn base64_decode(v: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}
