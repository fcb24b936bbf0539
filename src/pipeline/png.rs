//! PNG encoding of generated images with an A1111-style `parameters` text chunk, so tools that
//! read A1111 metadata (and users) can see how an image was made.
use super::PipelineError;

/// What goes into the `parameters` chunk.
#[derive(Debug, Clone)]
pub struct PngParameters<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub steps: usize,
    pub sampler: &'a str,
    pub guidance_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: &'a str,
    /// Image-to-image / inpainting: A1111's `Denoising strength`.
    pub strength: Option<f64>,
}

impl PngParameters<'_> {
    /// The A1111 text: prompt, `Negative prompt: ...`, then one line of `Key: value` pairs.
    pub fn to_a1111_text(&self) -> String {
        let mut s = self.prompt.to_string();
        if !self.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(self.negative_prompt);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.sampler,
            self.guidance_scale,
            self.seed,
            self.width,
            self.height,
            self.model
        ));
        if let Some(strength) = self.strength {
            s.push_str(&format!(", Denoising strength: {strength}"));
        }
        s
    }
}

/// Encodes 8-bit RGB pixels (`width * height * 3` bytes, row-major) as PNG with the
/// parameters chunk.
pub fn encode_png(
    rgb: &[u8],
    width: usize,
    height: usize,
    params: &PngParameters,
) -> Result<Vec<u8>, PipelineError> {
    encode_rgb_png(
        rgb,
        width,
        height,
        Some(("parameters", &params.to_a1111_text())),
    )
}

/// Encodes 8-bit RGB pixels as PNG with an optional text chunk (tEXt when Latin-1 encodable,
/// else iTXt, as PIL does).
pub fn encode_rgb_png(
    rgb: &[u8],
    width: usize,
    height: usize,
    text: Option<(&str, &str)>,
) -> Result<Vec<u8>, PipelineError> {
    if rgb.len() != width * height * 3 {
        return Err(PipelineError::Internal(format!(
            "{} bytes do not make a {width}x{height} RGB image",
            rgb.len()
        )));
    }
    let png_err =
        |e: png::EncodingError| PipelineError::Internal(format!("PNG encoding failed: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some((keyword, value)) = text {
            if value.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(keyword.into(), value.into())
                    .map_err(png_err)?;
            } else {
                enc.add_itxt_chunk(keyword.into(), value.into())
                    .map_err(png_err)?;
            }
        }
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(rgb).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params<'a>(prompt: &'a str) -> PngParameters<'a> {
        PngParameters {
            prompt,
            negative_prompt: "blurry",
            steps: 20,
            sampler: "DDIM",
            guidance_scale: 7.5,
            seed: 42,
            width: 2,
            height: 1,
            model: "tiny",
            strength: None,
        }
    }

    #[test]
    fn image_to_image_records_its_strength_as_a1111_does() {
        let text = PngParameters {
            strength: Some(0.6),
            ..params("a cat")
        }
        .to_a1111_text();
        assert!(
            text.ends_with("Model: tiny, Denoising strength: 0.6"),
            "{text}"
        );
        assert!(!params("a cat").to_a1111_text().contains("Denoising"));
    }

    #[test]
    fn png_round_trips_with_parameters() {
        for prompt in ["a cat", "一只猫 🐱"] {
            let bytes = encode_png(&[255, 0, 0, 0, 255, 0], 2, 1, &params(prompt)).unwrap();
            let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
            let reader = decoder.read_info().unwrap();
            let info = reader.info();
            assert_eq!((info.width, info.height), (2, 1));
            let text: Vec<String> = info
                .uncompressed_latin1_text
                .iter()
                .map(|t| t.text.clone())
                .chain(info.utf8_text.iter().map(|t| t.get_text().unwrap()))
                .collect();
            assert_eq!(text.len(), 1);
            assert!(text[0].starts_with(prompt));
            assert!(text[0].contains(
                "Negative prompt: blurry\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42"
            ));
        }
    }

    #[test]
    fn wrong_pixel_count_is_an_error() {
        assert!(encode_png(&[0; 5], 2, 1, &params("x")).is_err());
    }
}
