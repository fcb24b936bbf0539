//! The playground's routes on a real listener: the page at `/` and its assets under `/ui/`
//! with their content types, open without an API key while the API itself needs one, unknown
//! assets 404 with the error envelope, and no path (raw `..`, encoded or not) reaches a file
//! outside the embedded table.
mod http_support;

use std::io::{Read, Write};
use std::time::Duration;

use afa::api::{ApiConfig, ApiKeys};
use http_support::*;

/// Sends `GET <raw path>` exactly as written (clients normalise `..` away) and returns the
/// status line and the whole response.
fn raw_get(server: &Server, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out)
}

fn server() -> Server {
    let api = ApiConfig {
        api_keys: ApiKeys::new(vec!["k".into()]),
        ..ApiConfig::default()
    };
    let (s, _) = start_fake(worker_config(1, 4), api, false);
    wait_ready(&s, Duration::from_secs(10));
    s
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_without_a_key() {
    let s = server();
    let page = reqwest::get(s.url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.headers().contains_key("content-security-policy"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/ui/app.js") && html.contains("/ui/style.css"));
    for (path, kind) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/api.js", "text/javascript; charset=utf-8"),
        ("/ui/explorer.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
    ] {
        let r = reqwest::get(s.url(path)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], kind, "{path}");
        assert!(!r.bytes().await.unwrap().is_empty(), "{path}");
    }
    // The API behind the page still needs the key.
    assert_eq!(reqwest::get(s.url("/info")).await.unwrap().status(), 401);
    let head = reqwest::Client::new()
        .head(s.url("/ui/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn unknown_assets_are_404_and_paths_never_escape() {
    let s = server();
    let (status, _, body) = envelope(reqwest::get(s.url("/ui/nope.js")).await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    for path in [
        "/ui/../Cargo.toml",
        "/ui/%2e%2e/Cargo.toml",
        "/ui/..%2fCargo.toml",
        "/ui/../../../../etc/passwd",
        "/ui/%2e%2e%2f%2e%2e%2fsrc/main.rs",
        "/ui/web/mod.rs",
        "/ui/",
        "/ui//app.js",
    ] {
        let (status, response) = raw_get(&s, path);
        assert_eq!(status, 404, "{path}: {response}");
        assert!(
            !response.contains("[package]") && !response.contains("root:"),
            "{path} leaked a file"
        );
    }
    // An API route under the page's prefix is not opened by it.
    let (status, _) = raw_get(&s, "/ui/../info");
    assert_eq!(status, 404);
}
