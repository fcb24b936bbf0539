//! Reading request bodies and query strings into typed requests, with errors that name the
//! offending field: malformed JSON, wrong types, unknown and missing fields all become a 400
//! `ApiError` with `param` set; an oversized body becomes a 413.
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
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

/// A query string as a JSON object: each value is a JSON scalar when it parses as one
/// (`steps=4`, `stream=true`), otherwise a string. Repeated keys are an error.
pub fn query_to_json(query: &str) -> Result<serde_json::Value, ApiError> {
    let mut map = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(k)?;
        let raw = percent_decode(v)?;
        let value = match serde_json::from_str::<serde_json::Value>(&raw) {
            Ok(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v,
            _ => serde_json::Value::String(raw),
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(ApiError::invalid(&key, format!("'{key}' is given twice")));
        }
    }
    Ok(serde_json::Value::Object(map))
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let b = hex
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| ApiError::Invalid {
                        message: "malformed percent-encoding in the query string".into(),
                        param: None,
                    })?;
                out.push(b);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::Invalid {
        message: "the query string is not UTF-8".into(),
        param: None,
    })
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
    fn query_strings_become_json() {
        let v = query_to_json("prompt=a+red%20fox&steps=4&stream=true&seed=007x").unwrap();
        assert_eq!(v["prompt"], "a red fox");
        assert_eq!(v["steps"], 4);
        assert_eq!(v["stream"], true);
        assert_eq!(v["seed"], "007x");
        assert!(query_to_json("a=1&a=2").is_err());
        assert!(query_to_json("a=%zz").is_err());
    }
}
