//! Reading request bodies and query strings into typed requests, with errors that name the
//! offending field: malformed JSON, wrong types, unknown and missing fields all become a 400
//! `ApiError` with `param` set; an oversized body becomes a 413.
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequestParts, Path};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Parses `bytes` as JSON into `T`, naming the field on failure.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Invalid {
            message: "the request body is empty; send a JSON object".into(),
            param: None,
        });
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::Invalid {
            message: "the request body must be a JSON object".into(),
            param: None,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(describe)?;
    de.end().map_err(|e| ApiError::Invalid {
        message: format!("malformed JSON: {e}"),
        param: None,
    })?;
    Ok(value)
}

/// Turns a serde error (with the path where it happened) into a 400.
fn describe(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = err.path().to_string();
    let inner = err.inner();
    let text = inner.to_string();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::Invalid {
                message: format!("malformed JSON: {text}"),
                param: None,
            }
        }
        _ => {
            if let Some(field) = quoted_after(&text, "unknown field `") {
                let expected = text
                    .split_once(", expected ")
                    .map(|(_, rest)| strip_position(rest))
                    .unwrap_or_default();
                let param = if path == "." || path.is_empty() {
                    field.clone()
                } else if path == field || path.ends_with(&format!(".{field}")) {
                    path
                } else {
                    format!("{path}.{field}")
                };
                return ApiError::Invalid {
                    message: format!("unknown field '{param}' (expected {expected})"),
                    param: Some(param),
                };
            }
            if let Some(field) = quoted_after(&text, "missing field `") {
                return ApiError::invalid(&field, format!("'{field}' is required"));
            }
            let param = (path != "." && !path.is_empty()).then_some(path);
            let message = match &param {
                Some(p) => format!("invalid value for '{p}': {}", strip_position(&text)),
                None => format!("invalid request: {}", strip_position(&text)),
            };
            ApiError::Invalid { message, param }
        }
    }
}

/// The text between `prefix` and the next backtick.
fn quoted_after(text: &str, prefix: &str) -> Option<String> {
    let rest = text.split_once(prefix)?.1;
    Some(rest.split_once('`')?.0.to_string())
}

/// Drops serde_json's " at line L column C" suffix.
fn strip_position(text: &str) -> String {
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}

/// Maps a failure to read the body (413 when over the limit).
pub fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge {
            message: "the request body is larger than the server accepts".into(),
            param: None,
        }
    } else {
        ApiError::Invalid {
            message: format!("could not read the request body: {rejection}"),
            param: None,
        }
    }
}

/// Reads the body, mapping a failure.
pub fn bytes_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(body_error)
}

/// Parses a query string into `T` with serde (values are strings unless `T`'s field is
/// numeric or boolean), naming the parameter on failure; repeated parameters are refused.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let text = err.inner().to_string();
        for (prefix, what) in [
            ("unknown field `", "unknown query parameter"),
            ("missing field `", "missing query parameter"),
            ("duplicate field `", "repeated query parameter"),
        ] {
            if let Some(field) = quoted_after(&text, prefix) {
                return ApiError::invalid(&field, format!("{what} '{field}'"));
            }
        }
        match (path != "." && !path.is_empty()).then_some(path) {
            Some(p) => ApiError::invalid(&p, format!("invalid value for '{p}': {text}")),
            None => ApiError::Invalid {
                message: format!("invalid query string: {text}"),
                param: None,
            },
        }
    })
}

/// `axum::extract::Path`, with its rejections (a segment that is not UTF-8 once
/// percent-decoded, ...) answered with the error envelope (400 naming the segment) instead of
/// axum's plain-text body.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(rejection) => Err(path_error(&rejection)),
        }
    }
}

fn path_error(rejection: &PathRejection) -> ApiError {
    let text = rejection.body_text();
    ApiError::Invalid {
        param: quoted_after(&text, "`"),
        message: format!("invalid path: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct R {
        prompt: String,
        steps: Option<u64>,
    }

    fn param_of(body: &str) -> Option<String> {
        match parse_json::<R>(body.as_bytes()) {
            Err(ApiError::Invalid { param, .. }) => param,
            other => panic!("expected 400, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            param_of(r#"{"prompt":"a","stpes":3}"#).as_deref(),
            Some("stpes")
        );
        assert_eq!(
            param_of(r#"{"prompt":"a","steps":"3"}"#).as_deref(),
            Some("steps")
        );
        assert_eq!(
            param_of(r#"{"prompt":"a","steps":-1}"#).as_deref(),
            Some("steps")
        );
        assert_eq!(param_of(r#"{"steps":1}"#).as_deref(), Some("prompt"));
        assert_eq!(param_of(r#"{"prompt":"a""#), None);
        assert_eq!(param_of(r#"{"prompt":"a"} x"#), None);
        assert_eq!(param_of(r#"[1]"#), None);
        assert_eq!(param_of(""), None);
    }

    #[test]
    fn query_strings_parse_by_field_type() {
        let r: R = parse_query("prompt=42&steps=4").unwrap();
        assert_eq!((r.prompt.as_str(), r.steps), ("42", Some(4)));
        let r: R = parse_query("prompt=a+red%20fox").unwrap();
        assert_eq!(r.prompt, "a red fox");
        let param = |q: &str| match parse_query::<R>(q) {
            Err(ApiError::Invalid { param, .. }) => param,
            other => panic!("expected 400, got {other:?}"),
        };
        assert_eq!(param("prompt=a&steps=007x").as_deref(), Some("steps"));
        assert_eq!(param("prompt=a&prompt=b").as_deref(), Some("prompt"));
        assert_eq!(param("prompt=a&stpes=1").as_deref(), Some("stpes"));
        assert_eq!(param("steps=1").as_deref(), Some("prompt"));
    }
}
