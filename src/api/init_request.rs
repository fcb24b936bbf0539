//! The image-to-image part of a native request: `init_image` and `mask` (base64 or `data:` URLs)
//! decoded within the picture bounds, the size an init picture gives a request that names none,
//! and the default strength: 0.8 for a whole picture and 1.0 with a mask, the defaults of
//! diffusers' img2img and inpaint pipelines.
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use image::DynamicImage;

use super::error::ApiError;
use super::request::NativeRequest;
use crate::worker::image_input::{self, InputLimits, MaskConvention};
use crate::worker::{EnsembleCatalog, InitImage, Strength, SubmitError};

/// Strength when a request with an init image gives none: whole picture / with a mask.
pub const DEFAULT_STRENGTH: f64 = 0.8;
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

/// A request's decoded init picture, mask and strength.
pub struct InitRequest {
    picture: DynamicImage,
    /// White where the picture is repainted.
    mask: Option<DynamicImage>,
    pub strength: Strength,
}

fn submit_error(e: impl Into<SubmitError>) -> ApiError {
    ApiError::from_submit(e.into())
}

/// The bytes of a base64 field, with or without a `data:<type>;base64,` prefix.
pub fn base64_field(value: &str, field: &'static str) -> Result<Vec<u8>, ApiError> {
    let payload = match value.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, data)| data)
            .ok_or_else(|| ApiError::invalid(field, "a data: URL must be base64 (;base64,)"))?,
        None => value,
    };
    B64.decode(payload.trim())
        .map_err(|e| ApiError::invalid(field, format!("not valid base64: {e}")))
}

/// Decodes a picture field.
pub fn picture(bytes: &[u8], field: &'static str) -> Result<DynamicImage, ApiError> {
    image_input::decode_picture(bytes, field, InputLimits::default()).map_err(submit_error)
}

/// The init picture, mask and strength of `req`, or `None` for text-to-image. A mask or a
/// strength without an init image is refused by name.
pub fn parse(req: &NativeRequest) -> Result<Option<InitRequest>, ApiError> {
    let Some(init) = &req.init_image else {
        if req.mask.is_some() {
            return Err(ApiError::invalid("mask", "a mask needs an init_image"));
        }
        if req.strength.is_some() {
            return Err(ApiError::invalid(
                "strength",
                "strength needs an init_image",
            ));
        }
        return Ok(None);
    };
    let picture = picture(&base64_field(init, "init_image")?, "init_image")?;
    let mask = match &req.mask {
        Some(m) => Some(
            image_input::to_native_mask(
                &self::picture(&base64_field(m, "mask")?, "mask")?,
                MaskConvention::WhiteRepaints,
                "mask",
            )
            .map_err(submit_error)?,
        ),
        None => None,
    };
    let default = if mask.is_some() {
        DEFAULT_INPAINT_STRENGTH
    } else {
        DEFAULT_STRENGTH
    };
    let strength = Strength::new(req.strength.unwrap_or(default)).map_err(submit_error)?;
    Ok(Some(InitRequest {
        picture,
        mask,
        strength,
    }))
}

impl InitRequest {
    /// The size of a request that names none: the picture's own (rounded down to a multiple
    /// of 8) where the ensemble serves any size, else its default size; with the field errors
    /// about it name.
    pub fn natural_size(&self, entry: &EnsembleCatalog) -> (usize, usize, Option<&'static str>) {
        if entry.allowed_sizes.is_empty() {
            let (w, h) = image_input::natural_size(&self.picture, 8);
            (w, h, Some("init_image"))
        } else {
            (entry.default_width, entry.default_height, None)
        }
    }

    /// The init image at `width` x `height` (picture and mask resized), shared by the
    /// request's images.
    pub fn for_size(&self, width: usize, height: usize) -> Result<Arc<InitImage>, ApiError> {
        let init = image_input::init_image(&self.picture, self.mask.as_ref(), (width, height))
            .map_err(submit_error)?;
        Ok(Arc::new(init))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_fields_take_plain_and_data_urls() {
        assert_eq!(base64_field("aGk=", "init_image").unwrap(), b"hi");
        assert_eq!(
            base64_field("data:image/png;base64,aGk=", "init_image").unwrap(),
            b"hi"
        );
        for bad in ["data:image/png,aGk=", "***"] {
            let e = base64_field(bad, "mask").unwrap_err();
            assert_eq!(e.body()["error"]["param"], "mask", "{bad}");
        }
    }

    #[test]
    fn mask_and_strength_need_an_init_image() {
        let req = |v: serde_json::Value| -> NativeRequest { serde_json::from_value(v).unwrap() };
        let param = |r: NativeRequest| parse(&r).err().unwrap().body()["error"]["param"].clone();
        assert_eq!(
            param(req(serde_json::json!({"prompt": "a", "mask": "aGk="}))),
            "mask"
        );
        assert_eq!(
            param(req(serde_json::json!({"prompt": "a", "strength": 0.5}))),
            "strength"
        );
        assert!(
            parse(&req(serde_json::json!({"prompt": "a"})))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            param(req(
                serde_json::json!({"prompt": "a", "init_image": "aGk="})
            )),
            "init_image"
        );
    }
}
