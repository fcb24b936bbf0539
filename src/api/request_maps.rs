//! `return_attention_maps` of a request: its parsing into which maps a job keeps
//! ([`MapsRequest`]) and how they are encoded ([`MapsOutput`]), naming the offending sub-field,
//! and the bytes such maps take (the budget `validate` enforces). Split from `request.rs`.
use serde_json::Value;

use super::error::ApiError;
use super::request::MapsOutput;
use crate::worker::{EnsembleCatalog, MapPoints, MapsRequest, heatmap_scale};

/// Bytes one image's maps take: their f32 values while the job runs, plus each asked-for
/// encoding after base64 (heat maps counted as raw RGB, an upper bound of the PNG).
pub(super) fn map_bytes(
    entry: &EnsembleCatalog,
    (width, height, steps): (usize, usize, usize),
    request: MapsRequest,
    out: &MapsOutput,
) -> u64 {
    let Some(points) = request.points() else {
        return 0;
    };
    let copies = match request {
        MapsRequest::PerStep(_) => steps as u64,
        _ => 1,
    };
    let experts = entry.members.len() as u64;
    let (lh, lw) = (height.div_ceil(8), width.div_ceil(8));
    let base64 = |b: u64| b.div_ceil(3) * 4;
    let mut per_copy = 0u64;
    for k in points.among(entry.map_downscales.len()) {
        let ds = entry.map_downscales[k].max(1);
        let (h, w) = (lh.div_ceil(ds), lw.div_ceil(ds));
        let values = experts * (h * w) as u64;
        per_copy += 4 * values;
        if out.f32 {
            per_copy += base64(4 * values);
        }
        if out.f16 {
            per_copy += base64(2 * values);
        }
        if out.png {
            let scale = heatmap_scale(w);
            per_copy += base64((h * scale * w * scale * 3) as u64);
        }
    }
    per_copy * copies
}

/// `return_attention_maps`: false/null (none), true (averaged, PNG heat maps), or an object.
/// `blocks` must name aggregation points of `entry`.
pub(super) fn parse_maps(
    v: Option<&Value>,
    entry: &EnsembleCatalog,
) -> Result<(MapsRequest, Option<MapsOutput>), ApiError> {
    const P: &str = "return_attention_maps";
    let bad = |m: String| ApiError::invalid(P, m);
    let obj = match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok((MapsRequest::Off, None)),
        Some(Value::Bool(true)) => {
            let out = MapsOutput {
                png: true,
                ..Default::default()
            };
            return Ok((MapsRequest::Averaged(MapPoints::ALL), Some(out)));
        }
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(bad(format!(
                "expected true, false or an object, got {other}"
            )));
        }
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["steps", "blocks", "format"].contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            &format!("{P}.{k}"),
            format!("unknown field '{P}.{k}' (expected steps, blocks, format)"),
        ));
    }
    let per_step = match obj.get("steps").and_then(Value::as_str) {
        None if obj.get("steps").is_none() => false,
        Some("mean") => false,
        Some("all") => true,
        _ => return Err(bad("steps must be \"mean\" or \"all\"".into())),
    };
    let blocks = match obj.get("blocks") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("blocks must be a list of aggregation point indices".into()))?,
        ),
        Some(_) => {
            return Err(bad(
                "blocks must be a list of aggregation point indices".into()
            ));
        }
    };
    let formats: Vec<&str> = match obj.get("format") {
        None => vec!["png"],
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().ok_or_else(|| {
                    ApiError::invalid(
                        &format!("{P}.format"),
                        format!("format entries are strings (png, f32, f16), got {x}"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "format must be \"png\", \"f32\", \"f16\" or a list".into()
            ));
        }
    };
    let total = entry.map_downscales.len();
    let points = match &blocks {
        None => MapPoints::ALL,
        Some(list) => {
            if let Some(k) = list.iter().find(|&&k| k >= total) {
                return Err(ApiError::invalid(
                    &format!("{P}.blocks"),
                    format!(
                        "block {k} does not exist: {} has aggregation points 0..={}",
                        entry.name,
                        total.saturating_sub(1)
                    ),
                ));
            }
            MapPoints::only(list).ok_or_else(|| bad("too many aggregation points".into()))?
        }
    };
    let request = if per_step {
        MapsRequest::PerStep(points)
    } else {
        MapsRequest::Averaged(points)
    };
    let mut out = MapsOutput::default();
    for f in &formats {
        match *f {
            "png" => out.png = true,
            "f32" => out.f32 = true,
            "f16" => out.f16 = true,
            other => return Err(bad(format!("unknown map format '{other}' (png, f32, f16)"))),
        }
    }
    if formats.is_empty() {
        return Err(bad("format names no format".into()));
    }
    Ok((request, Some(out)))
}
