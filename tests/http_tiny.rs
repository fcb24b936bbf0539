//! HTTP tests over the committed tiny ensemble (`models.toml`, untrained weights) on a real
//! listener: both generation routes, PNG validity and `parameters` metadata, seeds echoed and
//! reproducible across batch sizes, streaming, attention maps, and the operational routes.
mod http_support;

use std::sync::OnceLock;

use afa::api::ApiConfig;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http_support::*;
use serde_json::{Value, json};

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| start_tiny(4, ApiConfig::default()))
}

async fn post(path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(server().url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn b64(v: &Value) -> Vec<u8> {
    B64.decode(v.as_str().expect("a base64 string")).unwrap()
}

#[tokio::test]
async fn native_json_has_pngs_seeds_timings_and_parameters() {
    let resp = reqwest::Client::new()
        .post(server().url("/generate"))
        .header("x-request-id", "test-abc-1")
        .json(
            &json!({"prompt": "a red fox", "steps": 2, "seed": 123, "n": 2, "guidance_scale": 5.0}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "test-abc-1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["seeds"], json!([123, 124]));
    assert_eq!(body["model"], "tiny-afa");
    assert_eq!(body["parameters"]["steps"], 2);
    assert_eq!(body["parameters"]["scheduler"], "ddim");
    for key in [
        "queue_ms",
        "text_encode_ms",
        "denoise_ms",
        "decode_ms",
        "png_encode_ms",
    ] {
        assert!(body["timings"][key].is_number(), "{key}: {body}");
    }
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for (i, img) in images.iter().enumerate() {
        let (w, h, params) = decode_png(&b64(&img["png_base64"]));
        assert_eq!((w, h), (128, 128));
        let params = params.expect("a parameters chunk");
        assert!(params.starts_with("a red fox"), "{params}");
        assert!(params.contains("Steps: 2"), "{params}");
        assert!(params.contains(&format!("Seed: {}", 123 + i)), "{params}");
        assert!(params.contains("CFG scale: 5"), "{params}");
    }
}

#[tokio::test]
async fn accept_png_returns_bytes_with_seed_and_timing_headers() {
    let resp = reqwest::Client::new()
        .post(server().url("/generate"))
        .header("accept", "image/png")
        .json(&json!({"prompt": "a boat", "steps": 1, "seed": 77}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    assert_eq!(resp.headers()["x-seed"], "77");
    assert!(
        resp.headers()["server-timing"]
            .to_str()
            .unwrap()
            .contains("denoise;dur=")
    );
    assert!(resp.headers().contains_key("x-request-id"));
    let (w, h, params) = decode_png(&resp.bytes().await.unwrap());
    assert_eq!((w, h), (128, 128));
    assert!(params.unwrap().contains("Seed: 77"));
}

#[tokio::test]
async fn drawn_seeds_are_echoed_and_reproduce_across_batch_sizes() {
    let body: Value = post("/generate", json!({"prompt": "a hill", "steps": 2, "n": 3}))
        .await
        .json()
        .await
        .unwrap();
    let seeds: Vec<u64> = body["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(seeds.len(), 3);
    assert_eq!(seeds[1], seeds[0] + 1);
    assert_eq!(seeds[2], seeds[0] + 2);
    // The middle image of the batch of 3, alone in a batch of 1.
    let alone: Value = post(
        "/generate",
        json!({"prompt": "a hill", "steps": 2, "seed": seeds[1]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(alone["seeds"], json!([seeds[1]]));
    assert_eq!(
        b64(&alone["images"][0]["png_base64"]),
        b64(&body["images"][1]["png_base64"]),
        "seed {} differs between a batch of 3 and a batch of 1",
        seeds[1]
    );
}

#[tokio::test]
async fn openai_route_matches_the_native_route() {
    let resp = post(
        "/v1/images/generations",
        json!({"model": "tiny-afa", "prompt": "a lamp", "response_format": "b64_json", "seed": 1, "steps": 2, "size": "128x128"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    let openai_png = b64(&body["data"][0]["b64_json"]);
    let native: Value = post(
        "/generate",
        json!({"model": "tiny-afa", "prompt": "a lamp", "seed": 1, "steps": 2}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(openai_png, b64(&native["images"][0]["png_base64"]));
    assert!(decode_png(&openai_png).2.unwrap().contains("Seed: 1"));
}

#[tokio::test]
async fn openai_stream_sends_progress_then_completed() {
    let resp = post(
        "/v1/images/generations",
        json!({"prompt": "a tree", "seed": 5, "steps": 3, "stream": true, "quality": "high"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = parse_sse(&resp.text().await.unwrap());
    assert!(
        events
            .iter()
            .any(|e| e.event == "image_generation.progress"),
        "{events:?}"
    );
    let done: Vec<_> = events
        .iter()
        .filter(|e| e.event == "image_generation.completed")
        .collect();
    assert_eq!(done.len(), 1, "{events:?}");
    let data: Value = serde_json::from_str(&done[0].data).unwrap();
    assert_eq!(data["type"], "image_generation.completed");
    assert_eq!(data["quality"], "high", "the asked quality is echoed");
    assert!(data.get("usage").is_none(), "no made-up token counts");
    assert_eq!(decode_png(&b64(&data["b64_json"])).0, 128);
}

#[tokio::test]
async fn native_get_stream_reports_steps_and_result() {
    let resp = reqwest::get(server().url("/generate/stream?prompt=a%20cloud&steps=3&seed=9"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.text().await.unwrap());
    let steps: Vec<Value> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(
        steps.last().unwrap(),
        &json!({"step": 3, "total": 3}),
        "{events:?}"
    );
    let result = events
        .iter()
        .find(|e| e.event == "result")
        .expect("a result event");
    let body: Value = serde_json::from_str(&result.data).unwrap();
    assert_eq!(body["seeds"], json!([9]));
    // Query values are strings unless the field is numeric: a prompt of digits is a prompt.
    let resp = reqwest::get(server().url("/generate/stream?prompt=42&steps=1&seed=1"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.text().await.unwrap());
    let result = events
        .iter()
        .find(|e| e.event == "result")
        .expect("a result");
    let body: Value = serde_json::from_str(&result.data).unwrap();
    assert_eq!(body["parameters"]["prompt"], "42");
}

#[tokio::test]
async fn attention_maps_come_as_heat_maps_and_arrays() {
    let resp = post(
        "/generate",
        json!({"prompt": "a cat", "steps": 2, "seed": 3, "return_attention_maps": {"format": ["png", "f32"]}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["experts"], json!(["tiny-a", "tiny-b"]));
    let maps = body["images"][0]["attention_maps"]
        .as_array()
        .expect("maps");
    assert!(!maps.is_empty());
    for m in maps {
        let shape: Vec<usize> = m["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape[0], 2);
        assert_eq!(
            b64(&m["f32_base64"]).len(),
            4 * shape.iter().product::<usize>()
        );
        assert_eq!(&b64(&m["heatmap_png_base64"])[1..4], b"PNG");
    }
    // Only the asked-for points come back, every step of them.
    let resp = post(
        "/generate",
        json!({"prompt": "a cat", "steps": 3, "seed": 3,
               "return_attention_maps": {"steps": "all", "blocks": [3, 24], "format": "f16"}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let maps = body["images"][0]["attention_maps"].as_array().unwrap();
    let mut seen: Vec<(u64, u64)> = maps
        .iter()
        .map(|m| (m["point"].as_u64().unwrap(), m["step"].as_u64().unwrap()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![(3, 0), (3, 1), (3, 2), (24, 0), (24, 1), (24, 2)]
    );
    // The largest request every other limit admits, with every map: refused at once.
    let resp = post(
        "/generate",
        json!({"prompt": "a", "n": 16, "steps": 500, "size": "1024x1024",
               "return_attention_maps": {"steps": "all", "format": ["png", "f32", "f16"]}}),
    )
    .await;
    let (status, param, _) = envelope(resp).await;
    assert_eq!(
        (status, param.as_deref()),
        (413, Some("return_attention_maps"))
    );
    let info: Value = server().get_json("/info").await;
    assert_eq!(info["limits"]["max_attention_map_bytes"], 64 << 20);
}

#[tokio::test]
async fn operational_routes_describe_the_server() {
    let s = server();
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(s.url("/ready")).await.unwrap().status(), 200);
    let info: Value = s.get_json("/info").await;
    assert_eq!(info["state"], "ready");
    let e = &info["ensembles"][0];
    assert_eq!(e["name"], "tiny-afa");
    assert_eq!(e["untrained"], true);
    assert!(e["note"].as_str().unwrap().contains("UNTRAINED"));
    assert_eq!(e["members"].as_array().unwrap().len(), 2);
    let models: Value = reqwest::get(s.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-afa");
    assert_eq!(models["data"][0]["object"], "model");
    let one: Value = reqwest::get(s.url("/v1/models/tiny-afa"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["owned_by"], "afa-server");
    let (status, param, _) = envelope(reqwest::get(s.url("/v1/models/nope")).await.unwrap()).await;
    assert_eq!((status, param.as_deref()), (404, Some("model")));
    let _ = post("/generate", json!({"prompt": "a", "steps": 1})).await;
    let metrics = reqwest::get(s.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        afa::telemetry::QUEUE_DEPTH,
        afa::telemetry::QUEUE_WAIT,
        afa::telemetry::STAGE_SECONDS,
        afa::telemetry::BATCH_SIZE,
        afa::telemetry::IMAGES_PER_SECOND,
        afa::telemetry::REJECTIONS,
        afa::telemetry::CANCELLED_IMAGES,
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(metrics.contains("afa_images_completed_total"));
}
