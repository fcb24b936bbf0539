//! A battery of bad requests against the tiny ensemble behind an API key: each must get the
//! error envelope `{"error": {message, type, param, code}}`, the right status, the right
//! `param`, and an `x-request-id`.
mod http_support;

use std::sync::OnceLock;

use afa::api::{ApiConfig, ApiKeys};
use http_support::*;
use serde_json::json;

const KEY: &str = "test-key";

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let api = ApiConfig {
            api_keys: ApiKeys::new(vec![KEY.into()]),
            ..ApiConfig::default()
        };
        start_tiny(4, api)
    })
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Option<String>,
    key: Option<&'static str>,
    status: u16,
    param: Option<&'static str>,
}

fn native(
    name: &'static str,
    body: impl Into<String>,
    status: u16,
    param: Option<&'static str>,
) -> Case {
    Case {
        name,
        method: "POST",
        path: "/generate",
        body: Some(body.into()),
        key: Some(KEY),
        status,
        param,
    }
}

fn openai(
    name: &'static str,
    body: impl Into<String>,
    status: u16,
    param: Option<&'static str>,
) -> Case {
    Case {
        path: "/v1/images/generations",
        ..native(name, body, status, param)
    }
}

fn j(v: serde_json::Value) -> String {
    v.to_string()
}

fn cases() -> Vec<Case> {
    let long = "x".repeat(100 * 1024);
    vec![
        native("malformed JSON", r#"{"prompt": "a""#, 400, None),
        native("trailing garbage", r#"{"prompt": "a"} x"#, 400, None),
        native("not an object", "[1, 2]", 400, None),
        native("empty body", "", 400, None),
        native(
            "NaN literal",
            r#"{"prompt": "a", "guidance_scale": NaN}"#,
            400,
            None,
        ),
        native(
            "prompt is a number",
            j(json!({"prompt": 5})),
            400,
            Some("prompt"),
        ),
        native(
            "steps is a string",
            j(json!({"prompt": "a", "steps": "4"})),
            400,
            Some("steps"),
        ),
        native(
            "n is negative",
            j(json!({"prompt": "a", "n": -1})),
            400,
            Some("n"),
        ),
        native(
            "seed is fractional",
            j(json!({"prompt": "a", "seed": 1.5})),
            400,
            Some("seed"),
        ),
        native(
            "seed is negative",
            j(json!({"prompt": "a", "seed": -3})),
            400,
            Some("seed"),
        ),
        native(
            "negative prompt is a list",
            j(json!({"prompt": "a", "negative_prompt": ["x"]})),
            400,
            Some("negative_prompt"),
        ),
        native(
            "unknown field",
            j(json!({"prompt": "a", "stpes": 4})),
            400,
            Some("stpes"),
        ),
        native(
            "missing prompt",
            j(json!({"steps": 4})),
            400,
            Some("prompt"),
        ),
        native(
            "empty prompt",
            j(json!({"prompt": ""})),
            400,
            Some("prompt"),
        ),
        native(
            "blank prompt",
            j(json!({"prompt": "   "})),
            400,
            Some("prompt"),
        ),
        native(
            "100 kB prompt",
            j(json!({"prompt": long})),
            400,
            Some("prompt"),
        ),
        native(
            "odd width",
            j(json!({"prompt": "a", "width": 100})),
            400,
            Some("width"),
        ),
        native(
            "tiny height",
            j(json!({"prompt": "a", "height": 8})),
            400,
            Some("height"),
        ),
        native(
            "huge size",
            j(json!({"prompt": "a", "size": "100000x100000"})),
            400,
            Some("size"),
        ),
        native(
            "over the pixel budget",
            j(json!({"prompt": "a", "size": "2048x2048"})),
            413,
            Some("size"),
        ),
        native(
            "size is not WxH",
            j(json!({"prompt": "a", "size": "large"})),
            400,
            Some("size"),
        ),
        native(
            "size and width",
            j(json!({"prompt": "a", "size": "128x128", "width": 128})),
            400,
            Some("size"),
        ),
        native("n is 0", j(json!({"prompt": "a", "n": 0})), 400, Some("n")),
        native(
            "n is 1000",
            j(json!({"prompt": "a", "n": 1000})),
            400,
            Some("n"),
        ),
        native(
            "negative guidance",
            j(json!({"prompt": "a", "guidance_scale": -1.0})),
            400,
            Some("guidance_scale"),
        ),
        native(
            "NaN guidance as text",
            j(json!({"prompt": "a", "guidance_scale": "NaN"})),
            400,
            Some("guidance_scale"),
        ),
        native(
            "huge guidance",
            j(json!({"prompt": "a", "guidance_scale": 1e6})),
            400,
            Some("guidance_scale"),
        ),
        native(
            "steps 0",
            j(json!({"prompt": "a", "steps": 0})),
            400,
            Some("steps"),
        ),
        native(
            "steps 10^6",
            j(json!({"prompt": "a", "steps": 1_000_000})),
            400,
            Some("steps"),
        ),
        native(
            "unknown model",
            j(json!({"prompt": "a", "model": "sdxl"})),
            404,
            Some("model"),
        ),
        native(
            "unknown scheduler",
            j(json!({"prompt": "a", "scheduler": "plms"})),
            400,
            Some("scheduler"),
        ),
        native(
            "unknown mode",
            j(json!({"prompt": "a", "ensemble_mode": "average"})),
            400,
            Some("ensemble_mode"),
        ),
        native(
            "unknown member",
            j(json!({"prompt": "a", "ensemble_mode": "single:nobody"})),
            400,
            Some("ensemble_mode"),
        ),
        native(
            "output format",
            j(json!({"prompt": "a", "output_format": "gif"})),
            400,
            Some("output_format"),
        ),
        native(
            "output compression out of range",
            j(json!({"prompt": "a", "output_compression": 101})),
            400,
            Some("output_compression"),
        ),
        native(
            "previews without a stream",
            j(json!({"prompt": "a", "partial_images": 2})),
            400,
            Some("partial_images"),
        ),
        native(
            "output format of a wrong type",
            j(json!({"prompt": "a", "output_format": 3})),
            400,
            Some("output_format"),
        ),
        native(
            "maps of a wrong type",
            j(json!({"prompt": "a", "return_attention_maps": 5})),
            400,
            Some("return_attention_maps"),
        ),
        native(
            "maps with an unknown option",
            j(json!({"prompt": "a", "return_attention_maps": {"fmt": "png"}})),
            400,
            Some("return_attention_maps.fmt"),
        ),
        native(
            "oversize body (past the 16 MiB upload limit)",
            format!("{{\"prompt\": \"{}\"}}", "y".repeat(17 * 1024 * 1024)),
            413,
            None,
        ),
        Case {
            key: None,
            ..native("no API key", j(json!({"prompt": "a"})), 401, None)
        },
        Case {
            key: Some("wrong"),
            ..native("wrong API key", j(json!({"prompt": "a"})), 401, None)
        },
        openai(
            "openai url format",
            j(json!({"prompt": "a", "response_format": "url"})),
            400,
            Some("response_format"),
        ),
        openai(
            "openai oversize body (generations carry no pictures: 1 MiB)",
            format!("{{\"prompt\": \"{}\"}}", "y".repeat(2 * 1024 * 1024)),
            413,
            None,
        ),
        openai(
            "openai unknown field",
            j(json!({"prompt": "a", "foo": 1})),
            400,
            Some("foo"),
        ),
        openai(
            "openai odd size",
            j(json!({"prompt": "a", "size": "13x13"})),
            400,
            Some("size"),
        ),
        openai(
            "openai n as text",
            j(json!({"prompt": "a", "n": "2"})),
            400,
            Some("n"),
        ),
        openai(
            "openai unknown model",
            j(json!({"prompt": "a", "model": "dall-e-3"})),
            404,
            Some("model"),
        ),
        openai(
            "openai bad quality",
            j(json!({"prompt": "a", "quality": "ultra"})),
            400,
            Some("quality"),
        ),
        Case {
            method: "GET",
            path: "/generate/stream?prompt=a&steps=0",
            body: None,
            ..native("stream steps 0", "", 400, Some("steps"))
        },
        Case {
            method: "GET",
            path: "/generate/stream?prompt=a&colour=red",
            body: None,
            ..native("stream unknown field", "", 400, Some("colour"))
        },
        Case {
            method: "GET",
            path: "/v1/models/nope",
            body: None,
            ..native("unknown model id", "", 404, Some("model"))
        },
        Case {
            method: "GET",
            path: "/nope",
            body: None,
            ..native("unknown route", "", 404, None)
        },
        Case {
            method: "DELETE",
            path: "/generate",
            body: None,
            ..native("wrong method", "", 405, None)
        },
    ]
}

#[tokio::test]
async fn every_bad_request_gets_the_envelope() {
    let s = server();
    // No connection reuse, so that every case stands alone (the server keeps a connection
    // after a 413 by reading the refused body: tested on its own below).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for case in &cases {
        let url = s.url(case.path);
        let mut req = match case.method {
            "GET" => client.get(&url),
            "DELETE" => client.delete(&url),
            _ => client.post(&url).header("content-type", "application/json"),
        };
        if let Some(body) = &case.body {
            req = req.body(body.clone());
        }
        if let Some(key) = case.key {
            req = req.bearer_auth(key);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: request failed: {e}", case.name));
                continue;
            }
        };
        let (status, param, body) = envelope(resp).await;
        if status != case.status || param.as_deref() != case.param {
            failures.push(format!(
                "{}: expected {} {:?}, got {status} {param:?}: {body}",
                case.name, case.status, case.param
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn probes_and_metrics_need_no_key_but_generation_does() {
    let s = server();
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(
            reqwest::get(s.url(path)).await.unwrap().status(),
            200,
            "{path}"
        );
    }
    assert_eq!(reqwest::get(s.url("/info")).await.unwrap().status(), 401);
    let ok = reqwest::Client::new()
        .post(s.url("/generate"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "a", "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn the_openapi_document_is_served_without_a_key_and_linked_from_info() {
    let s = server();
    let r = reqwest::get(s.url("/openapi.json")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: serde_json::Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in ["/generate", "/v1/images/generations", "/v1/jobs", "/info"] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
    let info: serde_json::Value = reqwest::Client::new()
        .get(s.url("/info"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["openapi"], "/openapi.json");
}

/// Found while fuzzing the API: a path segment that is not UTF-8 once percent-decoded got
/// axum's plain-text 400 ("Invalid URL: ...") instead of the error envelope.
#[tokio::test]
async fn malformed_path_segments_get_the_envelope() {
    let s = server();
    let client = reqwest::Client::new();
    for path in [
        "/v1/jobs/%FF",
        "/v1/jobs/%FF/events",
        "/v1/jobs/%C3%28/images/0",
        "/v1/jobs/%FF/images/0/maps",
        "/v1/models/%FF",
        "/ui/%FF",
    ] {
        let r = client
            .get(s.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-type"], "application/json", "{path}");
        let (status, param, _) = envelope(r).await;
        assert_eq!(status, 400, "{path}");
        assert!(param.is_some(), "{path}");
    }
    let r = client
        .delete(s.url("/v1/jobs/%FF"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(envelope(r).await.0, 400);
}

/// Sends `head` then, after a pause in which the server has seen the headers, `body`; then
/// reads one response (headers and a `content-length` body) from `tcp`. Returns its status.
async fn raw_exchange(tcp: &mut tokio::net::TcpStream, head: String, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    tcp.write_all(body)
        .await
        .expect("the server reads the whole body; it must not reset the connection under it");
    let reading = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = tcp.read(&mut buf).await.expect("reading the answer");
            assert!(n > 0, "connection closed before the answer: {got:?}");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .expect("a content-length");
                if rest.len() >= length {
                    return head[9..12].parse().unwrap();
                }
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), reading)
        .await
        .expect("an answer within 20 s")
}

#[tokio::test]
async fn a_refused_upload_is_read_to_its_end_so_the_client_sees_the_answer() {
    let s = server();
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let body = format!("{{\"prompt\": \"{}\"}}", "y".repeat(3 * 1024 * 1024));
    // Over the 1 MiB limit of generations: 413, and the connection stays usable.
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    assert_eq!(raw_exchange(&mut tcp, head, body.as_bytes()).await, 413);
    // Refused before the body is looked at (no key): 401, same connection.
    let head = format!(
        "POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    assert_eq!(raw_exchange(&mut tcp, head, body.as_bytes()).await, 401);
    let health = "GET /health HTTP/1.1\r\nhost: x\r\n\r\n".to_string();
    assert_eq!(raw_exchange(&mut tcp, health, b"").await, 200);
}
