//! Output formats and partial-image previews over the committed tiny ensemble on a real
//! listener: JPEG and WebP files on both generation routes (decodable, the A1111 parameters in
//! their EXIF UserComment, the right media types), bad values refused by name, and previews
//! (`partial_images`) on the OpenAI and native streams that are real images of the requested
//! size and leave the final image byte-identical.
mod http_support;

use std::io::Cursor;
use std::sync::OnceLock;

use afa::api::ApiConfig;
use afa::pipeline::encode::read_user_comment;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http_support::*;
use image::ImageDecoder;
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

/// Decodes a JPEG: (width, height, the EXIF UserComment).
fn decode_jpeg(bytes: &[u8]) -> (u32, u32, Option<String>) {
    assert_eq!(&bytes[..2], &[0xFF, 0xD8], "not a JPEG");
    let mut dec = image::codecs::jpeg::JpegDecoder::new(Cursor::new(bytes)).expect("a JPEG");
    let (w, h) = dec.dimensions();
    let comment = dec
        .exif_metadata()
        .unwrap()
        .and_then(|e| read_user_comment(&e));
    let mut pixels = vec![0; dec.total_bytes() as usize];
    dec.read_image(&mut pixels).expect("JPEG pixels");
    (w, h, comment)
}

/// Decodes a WebP: (width, height, the EXIF UserComment).
fn decode_webp(bytes: &[u8]) -> (u32, u32, Option<String>) {
    let mut dec = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).expect("a WebP");
    let (w, h) = dec.dimensions();
    let comment = dec
        .exif_metadata()
        .unwrap()
        .and_then(|e| read_user_comment(&e));
    let mut pixels = vec![0; dec.total_bytes() as usize];
    dec.read_image(&mut pixels).expect("WebP pixels");
    (w, h, comment)
}

#[tokio::test]
async fn native_jpeg_carries_the_parameters_in_exif() {
    let body: Value = post(
        "/generate",
        json!({"prompt": "a red fox", "steps": 2, "seed": 5, "n": 2,
               "output_format": "jpeg", "output_compression": 80}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["parameters"]["output_format"], "jpeg", "{body}");
    assert_eq!(body["parameters"]["output_compression"], 80, "{body}");
    for (i, img) in body["images"].as_array().unwrap().iter().enumerate() {
        assert_eq!(img["output_format"], "jpeg");
        assert_eq!(img["content_type"], "image/jpeg");
        assert!(img.get("png_base64").is_none(), "{img}");
        let (w, h, comment) = decode_jpeg(&b64(&img["image_base64"]));
        assert_eq!((w, h), (128, 128));
        let comment = comment.expect("a UserComment");
        assert!(comment.starts_with("a red fox"), "{comment}");
        assert!(comment.contains(&format!("Seed: {}", 5 + i)), "{comment}");
    }
    assert_eq!(body["warnings"], json!([]));
}

#[tokio::test]
async fn accept_webp_returns_the_lossless_file_and_a_warning_for_compression() {
    let resp = reqwest::Client::new()
        .post(server().url("/generate"))
        .header("accept", "image/webp")
        .json(&json!({"prompt": "a boat", "steps": 1, "seed": 8, "output_format": "webp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/webp");
    assert_eq!(resp.headers()["x-seed"], "8");
    let (w, h, comment) = decode_webp(&resp.bytes().await.unwrap());
    assert_eq!((w, h), (128, 128));
    assert!(comment.unwrap().contains("Seed: 8"));
    // WebP is lossless here: a compression below 100 is accepted and said to do nothing.
    let body: Value = post(
        "/generate",
        json!({"prompt": "a boat", "steps": 1, "seed": 8, "output_format": "webp",
               "output_compression": 40}),
    )
    .await
    .json()
    .await
    .unwrap();
    let warnings = body["warnings"].to_string();
    assert!(
        warnings.contains("output_compression 40 has no effect"),
        "{warnings}"
    );
}

#[tokio::test]
async fn openai_jpeg_and_bad_values_named() {
    let body: Value = post(
        "/v1/images/generations",
        json!({"prompt": "a tree", "seed": 3, "steps": 2, "output_format": "jpeg",
               "output_compression": 80}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["output_format"], "jpeg", "{body}");
    let (w, h, comment) = decode_jpeg(&b64(&body["data"][0]["b64_json"]));
    assert_eq!((w, h), (128, 128));
    assert!(comment.unwrap().contains("Seed: 3"));
    for (path, extra, field) in [
        (
            "/generate",
            json!({"output_format": "gif"}),
            "output_format",
        ),
        (
            "/generate",
            json!({"output_compression": 101}),
            "output_compression",
        ),
        (
            "/generate",
            json!({"partial_images": 4, "stream": true}),
            "partial_images",
        ),
        // Previews are stream events: asked for without a stream, they are refused.
        ("/generate", json!({"partial_images": 2}), "partial_images"),
        (
            "/v1/images/generations",
            json!({"output_format": "bmp"}),
            "output_format",
        ),
        (
            "/v1/images/generations",
            json!({"output_compression": -1}),
            "output_compression",
        ),
        (
            "/v1/images/generations",
            json!({"partial_images": 1}),
            "partial_images",
        ),
        (
            "/v1/images/generations",
            json!({"partial_images": 9, "stream": true}),
            "partial_images",
        ),
    ] {
        let mut body = json!({"prompt": "a", "steps": 1});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, param, e) = envelope(post(path, body.clone()).await).await;
        assert_eq!(
            (status, param.as_deref()),
            (400, Some(field)),
            "{path} {body}: {e}"
        );
    }
    assert_eq!(server().get_json("/ready").await["status"], "ready");
}

#[tokio::test]
async fn openai_stream_sends_partial_images_then_the_unchanged_final_image() {
    let base = json!({"prompt": "a lighthouse", "seed": 21, "steps": 4});
    let plain: Value = post("/v1/images/generations", base.clone())
        .await
        .json()
        .await
        .unwrap();
    let plain = b64(&plain["data"][0]["b64_json"]);
    let mut streamed = base.clone();
    streamed["stream"] = json!(true);
    streamed["partial_images"] = json!(2);
    let resp = post("/v1/images/generations", streamed).await;
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.text().await.unwrap());
    let names: Vec<&str> = events
        .iter()
        .map(|e| e.event.as_str())
        .filter(|e| *e != "image_generation.progress")
        .collect();
    assert_eq!(
        names,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    let partials: Vec<Value> = events
        .iter()
        .filter(|e| e.event == "image_generation.partial_image")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    let mut previews = Vec::new();
    for (k, p) in partials.iter().enumerate() {
        assert_eq!(p["type"], "image_generation.partial_image");
        assert_eq!(p["partial_image_index"], k);
        assert_eq!(
            (p["size"].as_str(), p["output_format"].as_str()),
            (Some("128x128"), Some("png"))
        );
        assert!(p["created_at"].is_u64() && p["background"] == "opaque" && p["quality"] == "auto");
        let png = b64(&p["b64_json"]);
        let (w, h, _) = decode_png(&png);
        assert_eq!((w, h), (128, 128), "a preview of the requested size");
        previews.push(png);
    }
    // Evenly spaced steps (1 and 2 of 4), each its own prediction.
    assert_eq!(
        (partials[0]["step"].as_u64(), partials[1]["step"].as_u64()),
        (Some(1), Some(2))
    );
    assert_ne!(previews[0], previews[1]);
    let done: Value = serde_json::from_str(&events.last().unwrap().data).unwrap();
    assert_eq!(
        b64(&done["b64_json"]),
        plain,
        "previews changed the final image"
    );
    assert_ne!(previews[1], plain);
}

#[tokio::test]
async fn native_stream_sends_previews_in_the_asked_format() {
    let resp = post(
        "/generate/stream",
        json!({"prompt": "a hill", "seed": 4, "steps": 3, "partial_images": 1,
               "output_format": "jpeg"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let events = parse_sse(&resp.text().await.unwrap());
    let previews: Vec<Value> = events
        .iter()
        .filter(|e| e.event == "preview")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(previews.len(), 1, "{events:?}");
    let p = &previews[0];
    assert_eq!(
        (p["index"].as_u64(), p["step"].as_u64(), p["total"].as_u64()),
        (Some(0), Some(1), Some(3))
    );
    assert_eq!(p["output_format"], "jpeg");
    let (w, h, _) = decode_jpeg(&b64(&p["image_base64"]));
    assert_eq!((w, h), (128, 128));
    let last = events.last().unwrap();
    assert_eq!(last.event, "result");
    let result: Value = serde_json::from_str(&last.data).unwrap();
    decode_jpeg(&b64(&result["images"][0]["image_base64"]));
}
