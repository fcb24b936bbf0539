//! User-supplied pictures (PNG, JPEG, WebP) made into init images and masks: bounded decoding
//! (the header's size is checked before any pixel is allocated, so a 20000x20000 header or a
//! decompression bomb is refused cheaply), resizing to the batch's size (Lanczos3, as diffusers'
//! image processor and A1111's "just resize"), and the two mask conventions: native masks are
//! white where the image is repainted (grey thresholded at 50%, as diffusers binarizes), OpenAI
//! masks are transparent (alpha 0) where it is edited. Errors name the request field.
use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, ImageFormat, ImageReader};

use super::PipelineError;
use super::init_image::InitImage;

/// Bounds on one uploaded picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Longest side accepted, in pixels.
    pub max_side: u32,
    /// Most pixels (width x height) accepted.
    pub max_pixels: u64,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_side: 4096,
            max_pixels: 4096 * 4096,
        }
    }
}

/// Which pixels of a mask picture mean "repaint".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskConvention {
    /// Luminance 128 and above (white) repaints, darker keeps.
    WhiteRepaints,
    /// Fully transparent (alpha 0) repaints (OpenAI's `mask`); needs an alpha channel.
    TransparentRepaints,
}

/// Decodes `bytes` (PNG, JPEG or WebP, told apart by their signature) within `limits`;
/// `field` names the request field in errors.
pub fn decode_picture(
    bytes: &[u8],
    field: &'static str,
    limits: InputLimits,
) -> Result<DynamicImage, PipelineError> {
    let open = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| PipelineError::invalid(field, format!("unreadable image: {e}")))
    };
    let reader = open()?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(other) => {
            return Err(PipelineError::invalid(
                field,
                format!("{other:?} images are not accepted; send PNG, JPEG or WebP"),
            ));
        }
        None => {
            return Err(PipelineError::invalid(
                field,
                "not a PNG, JPEG or WebP image",
            ));
        }
    }
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| PipelineError::invalid(field, format!("unreadable image: {e}")))?;
    if width.max(height) > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(PipelineError::TooLarge {
            field,
            reason: format!(
                "{width}x{height} exceeds {} pixels a side or {} pixels in all",
                limits.max_side, limits.max_pixels
            ),
        });
    }
    let mut reader = open()?;
    let mut bounds = image::Limits::default();
    bounds.max_image_width = Some(limits.max_side);
    bounds.max_image_height = Some(limits.max_side);
    // RGBA16 of the largest accepted picture, plus decoder slack.
    bounds.max_alloc = Some(limits.max_pixels * 8 + (64 << 20));
    reader.limits(bounds);
    reader
        .decode()
        .map_err(|e| PipelineError::invalid(field, format!("unreadable image: {e}")))
}

/// The size an init picture gives a request that names none: its own, rounded down to a
/// multiple of `multiple` (the VAE's factor).
pub fn natural_size(picture: &DynamicImage, multiple: usize) -> (usize, usize) {
    let round = |v: u32| (v as usize / multiple) * multiple;
    (round(picture.width()), round(picture.height()))
}

/// Whether any pixel of `picture` is fully transparent.
pub fn has_transparent_pixels(picture: &DynamicImage) -> bool {
    picture.color().has_alpha() && picture.to_rgba8().pixels().any(|p| p[3] == 0)
}

/// The mask of `mask` under `convention` as a picture, white where the image is repainted
/// (the native convention); `field` names it in errors.
pub fn to_native_mask(
    mask: &DynamicImage,
    convention: MaskConvention,
    field: &'static str,
) -> Result<DynamicImage, PipelineError> {
    match convention {
        MaskConvention::WhiteRepaints => Ok(DynamicImage::ImageLuma8(mask.to_luma8())),
        MaskConvention::TransparentRepaints => {
            if !mask.color().has_alpha() {
                return Err(PipelineError::invalid(
                    field,
                    "the mask needs an alpha channel: transparent (alpha 0) where the image is edited",
                ));
            }
            let rgba = mask.to_rgba8();
            let luma = image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Luma([if rgba.get_pixel(x, y)[3] == 0 { 255 } else { 0 }])
            });
            Ok(DynamicImage::ImageLuma8(luma))
        }
    }
}

/// The init image of a `width` x `height` request from `picture` and an optional native mask
/// (white repaints), both resized to that size. The mask must be the picture's size.
pub fn init_image(
    picture: &DynamicImage,
    mask: Option<&DynamicImage>,
    (width, height): (usize, usize),
) -> Result<InitImage, PipelineError> {
    if let Some(m) = mask.filter(|m| m.dimensions() != picture.dimensions()) {
        return Err(PipelineError::invalid(
            "mask",
            format!(
                "the mask is {}x{} but the image is {}x{}; they must be the same size",
                m.width(),
                m.height(),
                picture.width(),
                picture.height()
            ),
        ));
    }
    let (w, h) = (width as u32, height as u32);
    let fit = |p: &DynamicImage| {
        if (p.width(), p.height()) == (w, h) {
            p.clone()
        } else {
            p.resize_exact(w, h, FilterType::Lanczos3)
        }
    };
    Ok(InitImage {
        rgb: fit(picture).to_rgb8().into_raw(),
        mask: mask.map(|m| fit(m).to_luma8().into_raw()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(picture: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        picture.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// Collects what a writer that is never finished wrote.
    #[derive(Clone, Default)]
    struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A PNG header claiming 20000x20000 and its first chunk of pixel data, nothing more.
    fn bomb_header() -> Vec<u8> {
        let buf = SharedBuf::default();
        let mut encoder = png::Encoder::new(buf.clone(), 20000, 20000);
        encoder.set_color(png::ColorType::Rgb);
        let mut rows = encoder
            .write_header()
            .unwrap()
            .into_stream_writer_with_size(4096)
            .unwrap();
        std::io::Write::write_all(&mut rows, &vec![0u8; 60_000]).unwrap();
        std::io::Write::flush(&mut rows).unwrap();
        std::mem::forget(rows);
        buf.0.lock().unwrap().clone()
    }

    fn field_of(r: Result<DynamicImage, PipelineError>) -> &'static str {
        match r {
            Err(PipelineError::Invalid { field, .. } | PipelineError::TooLarge { field, .. }) => {
                field
            }
            other => panic!("{:?}", other.map(|p| p.width())),
        }
    }

    #[test]
    fn hostile_pictures_are_refused_by_field() {
        let good = png(&DynamicImage::new_rgb8(64, 48));
        let limits = InputLimits::default();
        assert_eq!(decode_picture(&good, "image", limits).unwrap().width(), 64);
        // Truncated.
        assert_eq!(
            field_of(decode_picture(&good[..good.len() / 2], "image", limits)),
            "image"
        );
        // Not an image at all, and a format we do not take.
        assert_eq!(field_of(decode_picture(b"hello", "mask", limits)), "mask");
        let mut gif = b"GIF89a".to_vec();
        gif.extend([0u8; 32]);
        assert_eq!(field_of(decode_picture(&gif, "image", limits)), "image");
        // A header claiming 20000x20000: refused before decoding (TooLarge).
        let huge = bomb_header();
        match decode_picture(&huge, "image", limits) {
            Err(PipelineError::TooLarge { field, .. }) => assert_eq!(field, "image"),
            other => panic!("{:?}", other.map(|p| p.width())),
        }
        // A highly compressible picture within the bounds decodes; one past them does not.
        let tight = InputLimits {
            max_side: 4096,
            max_pixels: 1000,
        };
        assert_eq!(field_of(decode_picture(&good, "image", tight)), "image");
    }

    #[test]
    fn masks_follow_their_convention_and_must_match_the_image() {
        let mut rgba = image::RgbaImage::new(16, 8);
        for (x, _, p) in rgba.enumerate_pixels_mut() {
            *p = image::Rgba([0, 0, 0, if x < 4 { 0 } else { 255 }]);
        }
        let openai = DynamicImage::ImageRgba8(rgba);
        let native = to_native_mask(&openai, MaskConvention::TransparentRepaints, "mask").unwrap();
        let luma = native.to_luma8();
        assert_eq!(luma.get_pixel(0, 0)[0], 255);
        assert_eq!(luma.get_pixel(8, 0)[0], 0);
        let opaque = DynamicImage::new_rgb8(16, 8);
        assert!(to_native_mask(&opaque, MaskConvention::TransparentRepaints, "mask").is_err());
        assert!(has_transparent_pixels(&openai) && !has_transparent_pixels(&opaque));

        let init = init_image(&opaque, Some(&native), (32, 16)).unwrap();
        assert_eq!(
            (init.rgb.len(), init.mask.as_ref().unwrap().len()),
            (32 * 16 * 3, 32 * 16)
        );
        let other = DynamicImage::new_luma8(8, 8);
        match init_image(&opaque, Some(&other), (16, 8)) {
            Err(PipelineError::Invalid { field, .. }) => assert_eq!(field, "mask"),
            other => panic!("{:?}", other.is_ok()),
        }
        assert_eq!(natural_size(&DynamicImage::new_rgb8(100, 70), 8), (96, 64));
    }
}
