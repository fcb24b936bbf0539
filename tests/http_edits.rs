//! Image-to-image and inpainting over HTTP on the committed tiny ensemble (a real listener): the
//! native `init_image`/`mask`/`strength` fields, `POST /v1/images/edits` as multipart, sizes
//! taken from the picture, and hostile uploads (truncated, a 20000x20000 header, not an image,
//! a mask of another size, two pictures, wrong content type), each a 4xx naming the field,
//! with the server ready afterwards.
mod http_support;

use std::sync::OnceLock;

use afa::api::ApiConfig;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http_support::*;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| start_tiny(4, ApiConfig::default()))
}

fn png_of(picture: image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    picture.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A 96x72 gradient picture (sizes not multiples of 64 on purpose).
fn picture() -> Vec<u8> {
    png_of(image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(
        96,
        72,
        |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, 128]),
    )))
}

/// An RGBA mask of `w` x `h`: transparent (edit) on the left half.
fn openai_mask(w: u32, h: u32) -> Vec<u8> {
    png_of(image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(
        w,
        h,
        |x, _| image::Rgba([0, 0, 0, if x < w / 2 { 0 } else { 255 }]),
    )))
}

async fn generate(body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(server().url("/generate"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn edit(form: Form) -> reqwest::Response {
    reqwest::Client::new()
        .post(server().url("/v1/images/edits"))
        .multipart(form)
        .send()
        .await
        .unwrap()
}

fn image_part(bytes: Vec<u8>) -> Part {
    Part::bytes(bytes)
        .file_name("image.png")
        .mime_str("image/png")
        .unwrap()
}

fn first_png(body: &Value, key: &str) -> Vec<u8> {
    let list = body.get("images").or_else(|| body.get("data")).unwrap();
    B64.decode(list[0][key].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn native_init_image_and_mask_take_the_pictures_size() {
    let init = B64.encode(picture());
    let resp = generate(json!({
        "prompt": "a lighthouse", "steps": 4, "seed": 5, "init_image": init, "strength": 0.5
    }))
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["parameters"]["strength"], 0.5);
    let (w, h, _) = decode_png(&first_png(&body, "png_base64"));
    assert_eq!((w, h), (96, 72), "the picture's size, rounded down to 8");

    // The same seed from text alone differs; with a mask (data URL) at another size it works.
    let text: Value =
        generate(json!({"prompt": "a lighthouse", "steps": 4, "seed": 5, "size": "96x72"}))
            .await
            .json()
            .await
            .unwrap();
    assert_ne!(
        first_png(&text, "png_base64"),
        first_png(&body, "png_base64")
    );
    let white_left = png_of(image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(
        96,
        72,
        |x, _| image::Luma([if x < 48 { 255 } else { 0 }]),
    )));
    let resp = generate(json!({
        "prompt": "a lighthouse", "steps": 2, "seed": 5, "size": "128x64",
        "init_image": format!("data:image/png;base64,{init}"),
        "mask": B64.encode(white_left),
    }))
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["parameters"]["strength"], 1.0, "inpainting's default");
    let (w, h, _) = decode_png(&first_png(&body, "png_base64"));
    assert_eq!((w, h), (128, 64));
}

#[tokio::test]
async fn openai_edits_with_and_without_a_mask() {
    let form = Form::new()
        .part("image", image_part(picture()))
        .text("prompt", "a red boat")
        .text("n", "2")
        .text("size", "64x64")
        .text("seed", "3")
        .text("steps", "3")
        .text("strength", "0.6");
    let resp = edit(form).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["size"], "64x64");
    let (w, h, params) = decode_png(&first_png(&body, "b64_json"));
    assert_eq!((w, h), (64, 64));
    let params = params.unwrap();
    assert!(
        params.contains("Seed: 3") && params.contains("Denoising strength: 0.6"),
        "{params}"
    );

    let form = Form::new()
        .part("image[]", image_part(picture()))
        .part("mask", image_part(openai_mask(96, 72)))
        .text("prompt", "a red boat")
        .text("steps", "2")
        .text("input_fidelity", "high");
    let resp = edit(form).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let (w, h, _) = decode_png(&first_png(&body, "b64_json"));
    assert_eq!((w, h), (96, 72));
    assert!(
        body["warnings"].to_string().contains("input_fidelity"),
        "{body}"
    );
}

#[tokio::test]
async fn hostile_uploads_are_refused_by_field() {
    let good = picture();
    let mut huge_header = good[..33].to_vec();
    huge_header[16..24].copy_from_slice(&[0, 0, 0x4e, 0x20, 0, 0, 0x4e, 0x20]);
    let cases: Vec<(&str, Form, u16, &str)> = vec![
        (
            "truncated",
            Form::new()
                .part("image", image_part(good[..good.len() / 2].to_vec()))
                .text("prompt", "a"),
            400,
            "image",
        ),
        (
            "not an image",
            Form::new()
                .part("image", image_part(b"hello".to_vec()))
                .text("prompt", "a"),
            400,
            "image",
        ),
        (
            "mask of another size",
            Form::new()
                .part("image", image_part(good.clone()))
                .part("mask", image_part(openai_mask(64, 64)))
                .text("prompt", "a"),
            400,
            "mask",
        ),
        (
            "opaque mask",
            Form::new()
                .part("image", image_part(good.clone()))
                .part("mask", image_part(good.clone()))
                .text("prompt", "a"),
            400,
            "mask",
        ),
        (
            "two pictures",
            Form::new()
                .part("image[]", image_part(good.clone()))
                .part("image[]", image_part(good.clone()))
                .text("prompt", "a"),
            400,
            "image",
        ),
        ("no picture", Form::new().text("prompt", "a"), 400, "image"),
        (
            "unknown field",
            Form::new()
                .part("image", image_part(good.clone()))
                .text("prompt", "a")
                .text("colour", "red"),
            400,
            "colour",
        ),
        (
            "bad number",
            Form::new()
                .part("image", image_part(good.clone()))
                .text("prompt", "a")
                .text("n", "two"),
            400,
            "n",
        ),
        (
            "strength out of range",
            Form::new()
                .part("image", image_part(good.clone()))
                .text("prompt", "a")
                .text("strength", "1.5"),
            400,
            "strength",
        ),
    ];
    for (name, form, status, param) in cases {
        let (got, got_param, body) = envelope(edit(form).await).await;
        assert_eq!(
            (got, got_param.as_deref()),
            (status, Some(param)),
            "{name}: {body}"
        );
    }
    // A 20000x20000 header (a decompression bomb's) is refused before decoding.
    let (got, param, body) =
        envelope(generate(json!({"prompt": "a", "init_image": B64.encode(&huge_header)})).await)
            .await;
    assert!(matches!(got, 400 | 413), "{body}");
    assert_eq!(param.as_deref(), Some("init_image"), "{body}");
    // JSON is not a multipart form.
    let resp = reqwest::Client::new()
        .post(server().url("/v1/images/edits"))
        .json(&json!({"prompt": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(envelope(resp).await.0, 400);
    for (body, param) in [
        (json!({"prompt": "a", "mask": B64.encode(&good)}), "mask"),
        (json!({"prompt": "a", "strength": 0.3}), "strength"),
        (
            json!({"prompt": "a", "init_image": "not base64!"}),
            "init_image",
        ),
    ] {
        let (got, got_param, body) = envelope(generate(body).await).await;
        assert_eq!((got, got_param.as_deref()), (400, Some(param)), "{body}");
    }
    let ready = reqwest::get(server().url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn native_routes_take_uploads_as_a_form() {
    let white_left = png_of(image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(
        96,
        72,
        |x, _| image::Luma([if x < 48 { 255 } else { 0 }]),
    )));
    let form = Form::new()
        .part("init_image", image_part(picture()))
        .part("mask", image_part(white_left))
        .text("prompt", "a lighthouse")
        .text("steps", "2")
        .text("seed", "5")
        .text("strength", "0.9")
        .text("width", "64")
        .text("height", "64");
    let resp = reqwest::Client::new()
        .post(server().url("/generate"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["parameters"]["strength"], 0.9);
    let (w, h, _) = decode_png(&first_png(&body, "png_base64"));
    assert_eq!((w, h), (64, 64));
    for (form, param) in [
        (
            Form::new().text("prompt", "a").text("steps", "many"),
            "steps",
        ),
        (
            Form::new()
                .text("prompt", "a")
                .part("mask", image_part(picture())),
            "mask",
        ),
        (
            Form::new()
                .text("prompt", "a")
                .part("init_image", image_part(b"nope".to_vec())),
            "init_image",
        ),
    ] {
        let resp = reqwest::Client::new()
            .post(server().url("/generate"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        let (status, got, body) = envelope(resp).await;
        assert_eq!((status, got.as_deref()), (400, Some(param)), "{body}");
    }
}
