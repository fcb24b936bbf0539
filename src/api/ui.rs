//! The playground's static files: the page at `/` and its assets under `/ui/{name}`, all
//! embedded in the binary (`web`). Unknown names answer the usual 404 envelope; names are looked
//! up in a fixed table, so no request path ever reaches the filesystem. These routes need no API
//! key (the page holds no data; its API calls carry the key the user typed).
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::body::ApiPath;
use super::error::ApiError;
#[allow(unused_imports)]
use super::schema::ErrorEnvelope;
use crate::web::{self, Asset};

/// Only this origin's scripts, styles and API; images also from `data:`/`blob:` URLs (the page
/// shows fetched PNGs as blobs because `<img src>` cannot send a bearer key).
const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; \
    style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the page's routes (open without a key).
pub fn is_page_path(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/")
}

fn respond(a: Asset) -> Response {
    let mut r = a.bytes.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    // The files change only with the binary: revalidate instead of caching stale copies.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

/// `GET /`: the playground page (no key needed).
#[utoipa::path(get, path = "/", tag = "playground", responses(
    (status = 200, description = "The page", content_type = "text/html", body = String)))]
pub async fn index() -> Response {
    respond(web::INDEX)
}

/// `GET /ui/{name}`: one asset of the page (no key needed), or 404.
#[utoipa::path(get, path = "/ui/{name}", tag = "playground",
    params(("name" = String, Path, description = "The asset's file name")),
    responses(
    (status = 200, description = "The asset", content(
        (String = "text/javascript"), (String = "text/css"), (String = "text/html"))),
        (status = 400, description = "A path segment that is not valid UTF-8 once percent-decoded", body = ErrorEnvelope),
        (status = 404, description = "No such asset", body = ErrorEnvelope),
))]
pub async fn asset(ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    web::asset(&name)
        .map(respond)
        .ok_or_else(|| ApiError::RouteNotFound(format!("/ui/{name}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;

    async fn body(r: Response) -> Vec<u8> {
        to_bytes(r.into_body(), usize::MAX).await.unwrap().to_vec()
    }

    #[tokio::test]
    async fn index_is_html_with_a_policy() {
        let r = index().await;
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        assert!(String::from_utf8(body(r).await).unwrap().contains("<html"));
    }

    #[tokio::test]
    async fn assets_are_typed_and_unknown_names_are_404() {
        let r = asset(ApiPath("app.js".into())).await.unwrap();
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let r = asset(ApiPath("style.css".into())).await.unwrap();
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/css; charset=utf-8");
        for bad in [
            "nope.js",
            "../Cargo.toml",
            "../../src/main.rs",
            "%2e%2e/Cargo.toml",
        ] {
            let e = asset(ApiPath(bad.into())).await.unwrap_err();
            assert_eq!(e.status(), 404, "{bad}");
        }
    }

    #[test]
    fn page_paths_are_the_root_and_ui() {
        assert!(is_page_path("/") && is_page_path("/ui/app.js"));
        assert!(!is_page_path("/info") && !is_page_path("/uix") && !is_page_path("/v1/jobs"));
    }
}
