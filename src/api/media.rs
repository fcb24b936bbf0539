//! The output fields every generation route shares: `output_format` (`png`, `jpeg`, `webp`),
//! `output_compression` (0-100, the JPEG quality; WebP here is lossless and PNG always is, so
//! for them it changes nothing and a warning says so) and `partial_images` (0..=3 previews
//! while streaming), validated into an [`OutputOptions`]; and the encoding of finished images
//! and previews in the asked format, which runs on the encode stage (`render_blocking`) or a
//! blocking thread, never on the executor.
use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::error::ApiError;
use super::schema::PreviewData;
use crate::worker::{Encoding, ImageFormat, ImageResult, MAX_PARTIAL_IMAGES, Raster};

/// What a request asked about its files and previews.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutputOptions {
    pub encoding: Encoding,
    /// Whether `output_compression` was given (echoed in the stored parameters).
    pub compression_given: bool,
    pub partial_images: usize,
    /// Fields accepted without effect (`output_compression` on a lossless format).
    pub warnings: Vec<String>,
}

/// Checks `output_format`, `output_compression` and `partial_images`, naming the field at fault.
pub fn parse_output(
    format: Option<&str>,
    compression: Option<u64>,
    partial_images: Option<u64>,
) -> Result<OutputOptions, ApiError> {
    let format = match format {
        None => ImageFormat::Png,
        Some(name) => ImageFormat::parse(name).ok_or_else(|| {
            ApiError::invalid(
                "output_format",
                format!("unknown output_format '{name}' (png, jpeg or webp)"),
            )
        })?,
    };
    let mut warnings = Vec::new();
    let quality = match compression {
        None => 100,
        Some(c) if c > 100 => {
            return Err(ApiError::invalid(
                "output_compression",
                format!("output_compression must be 0..=100, got {c}"),
            ));
        }
        Some(c) => {
            if !format.uses_compression() && c < 100 {
                let why = match format {
                    ImageFormat::Webp => "WebP is written lossless here",
                    _ => "PNG is lossless",
                };
                warnings.push(format!("output_compression {c} has no effect: {why}"));
            }
            c as u8
        }
    };
    let partial_images = match partial_images {
        None => 0,
        Some(n) if n > MAX_PARTIAL_IMAGES as u64 => {
            return Err(ApiError::invalid(
                "partial_images",
                format!("partial_images must be 0..={MAX_PARTIAL_IMAGES}, got {n}"),
            ));
        }
        Some(n) => n as usize,
    };
    Ok(OutputOptions {
        encoding: Encoding { format, quality },
        compression_given: compression.is_some(),
        partial_images,
        warnings,
    })
}

fn encode_failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("encoding the image: {e}"))
}

/// The file of a finished image in `encoding`: the executor's PNG as it is, or the other
/// formats encoded from its pixels (CPU work: call it on the encode stage).
pub fn image_file(img: &ImageResult, encoding: Encoding) -> Result<Cow<'_, [u8]>, ApiError> {
    match encoding.format {
        ImageFormat::Png => Ok(Cow::Borrowed(&img.png)),
        _ => Ok(Cow::Owned(
            img.raster.encode(encoding).map_err(encode_failed)?,
        )),
    }
}

/// A preview's file in `encoding` (CPU work: call it on the encode stage).
pub fn preview_file(raster: &Raster, encoding: Encoding) -> Result<Vec<u8>, ApiError> {
    raster.encode(encoding).map_err(encode_failed)
}

/// The `preview` event's data of the native and job streams: image `index`'s
/// `partial_image_index`-th preview, after `step` of `total`, `b64` its file in `format`.
pub fn preview_data(
    (index, partial_image_index): (usize, usize),
    (step, total): (usize, usize),
    format: ImageFormat,
    b64: String,
) -> PreviewData {
    let png = format == ImageFormat::Png;
    PreviewData {
        index,
        partial_image_index,
        step,
        total,
        output_format: format.as_str().into(),
        png_base64: png.then(|| b64.clone()),
        image_base64: (!png).then_some(b64),
    }
}

/// `image_file` in base64.
pub fn image_base64(img: &ImageResult, encoding: Encoding) -> Result<String, ApiError> {
    Ok(B64.encode(image_file(img, encoding)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(r: Result<OutputOptions, ApiError>) -> String {
        r.unwrap_err().body()["error"]["param"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn formats_compression_and_previews_are_validated() {
        let o = parse_output(None, None, None).unwrap();
        assert_eq!(o.encoding, Encoding::default());
        assert_eq!(o.partial_images, 0);
        let o = parse_output(Some("jpeg"), Some(80), Some(2)).unwrap();
        assert_eq!(
            (o.encoding.format, o.encoding.quality),
            (ImageFormat::Jpeg, 80)
        );
        assert_eq!(o.partial_images, 2);
        assert!(o.warnings.is_empty() && o.compression_given);
        assert_eq!(
            param(parse_output(Some("gif"), None, None)),
            "output_format"
        );
        assert_eq!(
            param(parse_output(Some("JPEG"), None, None)),
            "output_format"
        );
        assert_eq!(
            param(parse_output(None, Some(101), None)),
            "output_compression"
        );
        assert_eq!(param(parse_output(None, None, Some(4))), "partial_images");
        for (format, warned) in [("png", true), ("webp", true), ("jpeg", false)] {
            let o = parse_output(Some(format), Some(50), None).unwrap();
            assert_eq!(
                o.warnings.len(),
                usize::from(warned),
                "{format}: {:?}",
                o.warnings
            );
        }
        // 100 (OpenAI's default) is never worth a warning.
        assert!(
            parse_output(Some("png"), Some(100), None)
                .unwrap()
                .warnings
                .is_empty()
        );
    }
}
