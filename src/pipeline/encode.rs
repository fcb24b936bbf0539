//! Image files in the formats a client may ask for, with the A1111 generation parameters in
//! each: PNG (a `parameters` text chunk, see `png.rs`), JPEG (quality = `output_compression`)
//! and WebP (lossless: the `image` crate's WebP encoder has no lossy mode, so
//! `output_compression` cannot apply to it). JPEG and WebP carry the parameters as A1111 writes
//! them: an EXIF `UserComment` made by piexif's `UserComment.dump(text, encoding="unicode")`
//! (the 8 bytes `UNICODE\0`, then UTF-16BE) in the Exif IFD of a big-endian TIFF block, which
//! JPEG holds in its APP1 `Exif` segment and WebP in its `EXIF` chunk.
use std::io::Cursor;

use image::{ExtendedColorType, ImageEncoder};

use super::PipelineError;
use super::png::encode_rgb_png;

/// A file format of finished images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub const ALL: [ImageFormat; 3] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp];

    /// The name in requests and answers: `png`, `jpeg`, `webp`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The format called `name` (as in [`as_str`](Self::as_str)).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The media type (`image/png`, `image/jpeg`, `image/webp`).
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// The file extension, without the dot (`png`, `jpg`, `webp`).
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    /// Whether `output_compression` changes the file (only JPEG here; WebP is lossless).
    pub fn uses_compression(self) -> bool {
        self == ImageFormat::Jpeg
    }
}

/// How to write a finished image: the format and, for JPEG, the quality 0-100 (100 the best
/// and largest; 0 is written as 1, the encoder's lowest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encoding {
    pub format: ImageFormat,
    pub quality: u8,
}

impl Default for Encoding {
    /// PNG (quality unused; 100 as OpenAI's default `output_compression`).
    fn default() -> Self {
        Self {
            format: ImageFormat::Png,
            quality: 100,
        }
    }
}

/// A finished image before it becomes a file: 8-bit RGB, row-major, and the A1111 text of how
/// it was made.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Raster {
    pub width: usize,
    pub height: usize,
    /// `width * height * 3` bytes.
    pub rgb: Vec<u8>,
    /// The A1111 `parameters` text (prompt, negative prompt, settings line).
    pub parameters: String,
}

impl Raster {
    /// The file in `encoding`, with the parameters in the format's metadata.
    pub fn encode(&self, encoding: Encoding) -> Result<Vec<u8>, PipelineError> {
        let (w, h) = (self.width, self.height);
        if self.rgb.len() != w * h * 3 || w == 0 || h == 0 {
            return Err(PipelineError::Internal(format!(
                "{} bytes do not make a {w}x{h} RGB image",
                self.rgb.len()
            )));
        }
        let text = (!self.parameters.is_empty()).then_some(self.parameters.as_str());
        let fail = |e: image::ImageError| {
            PipelineError::Internal(format!("{} encoding failed: {e}", encoding.format.as_str()))
        };
        let mut out = Vec::new();
        match encoding.format {
            ImageFormat::Png => {
                return encode_rgb_png(&self.rgb, w, h, text.map(|t| ("parameters", t)));
            }
            ImageFormat::Jpeg => {
                let q = encoding.quality.clamp(1, 100);
                let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, q);
                if let Some(t) = text {
                    enc.set_exif_metadata(exif_user_comment(t))
                        .map_err(|e| fail(image::ImageError::Unsupported(e)))?;
                }
                enc.write_image(&self.rgb, w as u32, h as u32, ExtendedColorType::Rgb8)
                    .map_err(fail)?;
            }
            ImageFormat::Webp => {
                let mut enc = image::codecs::webp::WebPEncoder::new_lossless(Cursor::new(&mut out));
                if let Some(t) = text {
                    enc.set_exif_metadata(exif_user_comment(t))
                        .map_err(|e| fail(image::ImageError::Unsupported(e)))?;
                }
                enc.write_image(&self.rgb, w as u32, h as u32, ExtendedColorType::Rgb8)
                    .map_err(fail)?;
            }
        }
        Ok(out)
    }
}

/// EXIF tag of the Exif IFD pointer (in IFD0).
const EXIF_IFD_POINTER: u16 = 0x8769;
/// EXIF tag `UserComment` (in the Exif IFD).
const USER_COMMENT: u16 = 0x9286;
/// The character-code prefix of a Unicode `UserComment`.
const UNICODE_PREFIX: &[u8; 8] = b"UNICODE\0";
const ASCII_PREFIX: &[u8; 8] = b"ASCII\0\0\0";

/// A big-endian TIFF block (what follows `Exif\0\0` in a JPEG APP1 segment, and a WebP `EXIF`
/// chunk) whose Exif IFD holds one `UserComment`: `UNICODE\0` + `text` in UTF-16BE, the bytes
/// piexif's `UserComment.dump(text, encoding="unicode")` makes and A1111 reads.
pub fn exif_user_comment(text: &str) -> Vec<u8> {
    let mut comment = UNICODE_PREFIX.to_vec();
    comment.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    let mut out = Vec::with_capacity(44 + comment.len());
    out.extend_from_slice(b"MM\0\x2a");
    out.extend_from_slice(&8u32.to_be_bytes());
    // IFD0 at 8: one entry, the Exif IFD pointer (LONG) -> 26.
    let entry = |out: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: u32| {
        out.extend_from_slice(&tag.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    };
    out.extend_from_slice(&1u16.to_be_bytes());
    entry(&mut out, EXIF_IFD_POINTER, 4, 1, 26);
    out.extend_from_slice(&0u32.to_be_bytes());
    // Exif IFD at 26: one entry, UserComment (UNDEFINED, its bytes at 44).
    out.extend_from_slice(&1u16.to_be_bytes());
    entry(&mut out, USER_COMMENT, 7, comment.len() as u32, 44);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&comment);
    out
}

/// The `UserComment` of a TIFF block (either byte order), decoded as piexif's
/// `UserComment.load` does (Unicode as UTF-16BE, ASCII as ASCII); `None` when absent or
/// malformed.
pub fn read_user_comment(tiff: &[u8]) -> Option<String> {
    let big = match tiff.get(..4)? {
        b"MM\0\x2a" => true,
        b"II\x2a\0" => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(at..at + 2)?.try_into().ok()?;
        Some(if big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(at..at + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    // (count, value-or-offset) of `tag` in the IFD at `ifd`.
    let find = |ifd: usize, tag: u16| -> Option<(usize, usize)> {
        let n = u16_at(ifd)? as usize;
        (0..n).find_map(|k| {
            let e = ifd + 2 + 12 * k;
            (u16_at(e)? == tag).then(|| Some((u32_at(e + 4)? as usize, u32_at(e + 8)? as usize)))?
        })
    };
    let (_, exif_ifd) = find(u32_at(4)? as usize, EXIF_IFD_POINTER)?;
    let (count, at) = find(exif_ifd, USER_COMMENT)?;
    let bytes = tiff.get(at..at.checked_add(count)?)?;
    let (prefix, body) = bytes.split_at_checked(8)?;
    if prefix == UNICODE_PREFIX {
        let units: Vec<u16> = body
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).ok()
    } else if prefix == ASCII_PREFIX {
        String::from_utf8(body.to_vec()).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageDecoder;

    const TEXT: &str = "a red fox, 一只狐狸 🦊\nNegative prompt: blurry\nSteps: 4, Sampler: DDIM, \
                        CFG scale: 7.5, Seed: 42, Size: 32x16, Model: tiny";

    /// A 32x16 gradient (smooth enough for JPEG to keep close).
    fn raster() -> Raster {
        let (w, h) = (32, 16);
        let rgb = (0..w * h)
            .flat_map(|p| {
                let (x, y) = (p % w, p / w);
                [(x * 8) as u8, (y * 16) as u8, 128]
            })
            .collect();
        Raster {
            width: w,
            height: h,
            rgb,
            parameters: TEXT.into(),
        }
    }

    fn jpeg(quality: u8) -> Vec<u8> {
        raster()
            .encode(Encoding {
                format: ImageFormat::Jpeg,
                quality,
            })
            .unwrap()
    }

    #[test]
    fn user_comment_has_piexifs_unicode_layout() {
        let tiff = exif_user_comment("Hi");
        assert_eq!(&tiff[..8], b"MM\0\x2a\0\0\0\x08");
        // The comment: UNICODE\0 then UTF-16BE, where the Exif IFD entry points (offset 44).
        assert_eq!(&tiff[44..], b"UNICODE\0\0H\0i");
        assert_eq!(read_user_comment(&tiff).as_deref(), Some("Hi"));
        assert_eq!(
            read_user_comment(&exif_user_comment(TEXT)).as_deref(),
            Some(TEXT)
        );
        assert_eq!(read_user_comment(b"MM\0\x2a\0\0\0\x08\0"), None);
        assert_eq!(read_user_comment(b"nonsense"), None);
    }

    #[test]
    fn jpeg_decodes_back_with_the_parameters() {
        let bytes = jpeg(90);
        assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF]);
        // The APP1 segment A1111 reads: `Exif\0\0` then the TIFF block.
        let app1 = bytes.windows(6).position(|w| w == b"Exif\0\0").unwrap();
        assert_eq!(&bytes[app1 - 4..app1 - 2], &[0xFF, 0xE1]);
        let mut dec = image::codecs::jpeg::JpegDecoder::new(Cursor::new(&bytes)).unwrap();
        assert_eq!(dec.dimensions(), (32, 16));
        let exif = dec.exif_metadata().unwrap().unwrap();
        assert_eq!(read_user_comment(&exif).as_deref(), Some(TEXT));
        let mut pixels = vec![0u8; dec.total_bytes() as usize];
        dec.read_image(&mut pixels).unwrap();
        let original = raster().rgb;
        let mean_err = pixels
            .iter()
            .zip(&original)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / original.len() as f64;
        assert!(mean_err < 6.0, "mean error {mean_err}");
    }

    #[test]
    fn jpeg_quality_follows_output_compression() {
        let (low, high) = (jpeg(10).len(), jpeg(100).len());
        assert!(low < high, "quality 10: {low} bytes, 100: {high}");
        // 0 is the encoder's lowest quality, not an error.
        assert_eq!(jpeg(0), jpeg(1));
    }

    #[test]
    fn webp_is_lossless_with_the_parameters() {
        let webp = |quality| {
            raster()
                .encode(Encoding {
                    format: ImageFormat::Webp,
                    quality,
                })
                .unwrap()
        };
        let bytes = webp(50);
        assert_eq!((&bytes[..4], &bytes[8..12]), (&b"RIFF"[..], &b"WEBP"[..]));
        assert_eq!(
            bytes,
            webp(100),
            "output_compression does not apply to WebP"
        );
        let mut dec = image::codecs::webp::WebPDecoder::new(Cursor::new(&bytes)).unwrap();
        assert_eq!(dec.dimensions(), (32, 16));
        let exif = dec.exif_metadata().unwrap().unwrap();
        assert_eq!(read_user_comment(&exif).as_deref(), Some(TEXT));
        let mut pixels = vec![0u8; dec.total_bytes() as usize];
        dec.read_image(&mut pixels).unwrap();
        assert_eq!(pixels, raster().rgb, "lossless");
    }

    #[test]
    fn png_is_the_executors_encoding() {
        let r = raster();
        let png = r.encode(Encoding::default()).unwrap();
        let expected = encode_rgb_png(&r.rgb, 32, 16, Some(("parameters", TEXT))).unwrap();
        assert_eq!(png, expected);
    }

    #[test]
    fn names_types_and_extensions() {
        for f in ImageFormat::ALL {
            assert_eq!(ImageFormat::parse(f.as_str()), Some(f));
        }
        assert_eq!(ImageFormat::parse("jpg"), None);
        assert_eq!(ImageFormat::Jpeg.content_type(), "image/jpeg");
        assert_eq!(ImageFormat::Jpeg.extension(), "jpg");
        assert_eq!(ImageFormat::Webp.content_type(), "image/webp");
        let bad = Raster {
            width: 2,
            height: 2,
            rgb: vec![0; 5],
            parameters: String::new(),
        };
        assert!(bad.encode(Encoding::default()).is_err());
    }
}
