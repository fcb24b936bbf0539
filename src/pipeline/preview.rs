//! Partial-image previews while denoising (`partial_images`): after evenly spaced steps, the
//! clean image the model predicts at that step (x0, the sampler's `pred_original_sample`) is
//! decoded with the VAE and handed to the observer as 8-bit RGB at the requested size.
//!
//! Why the VAE and not a cheap latent-to-RGB projection: the projection's factors are fitted
//! to one VAE (SD 1.5's), so for any other VAE (the tiny test models, a fine-tune's own VAE) it
//! draws colours that mean nothing, and it gives an image 8 times smaller than asked. A decode
//! costs about what the final decode costs, at most 3 times per image, and only for images
//! whose request asked for previews. Nothing here writes to the latents or the scheduler, so
//! the final image is the same with and without previews.
use candle_core::{DType, Tensor};

use super::PipelineError;
use super::generate::{Observer, to_rgb8};
use crate::models::vae::AutoencoderKL;
use crate::schedulers::Scheduler;

/// Most previews one image may ask for (OpenAI's `partial_images` bound).
pub const MAX_PARTIAL_IMAGES: usize = 3;

/// After which steps (counted from 1, of `total`) the `count` previews are made: evenly spaced
/// before the end (`floor(j * total / (count + 1))` for j = 1..=count, at least step 1, repeats
/// dropped), so a run with fewer steps than previews sends fewer previews.
pub fn preview_steps(count: usize, total: usize) -> Vec<usize> {
    let count = count.min(MAX_PARTIAL_IMAGES);
    let mut steps: Vec<usize> = (1..=count)
        .map(|j| (j * total / (count + 1)).max(1))
        .filter(|&s| s <= total)
        .collect();
    steps.dedup();
    steps
}

/// x0 of the images that want a preview after this step, waiting to be decoded.
pub(super) struct PendingPreview {
    /// `[k, C, h, w]`: the rows of the wanting images.
    x0: Tensor,
    /// Their indices in the request, in row order.
    indices: Vec<usize>,
    /// `[k]` u32: their rows in the running batch.
    rows: Tensor,
    done: usize,
    total: usize,
}

/// The x0 of the running images that `observer` wants a preview of after step `step_index`
/// (of `total`): `guided` (the guided model output) and `sample` are `[B, C, h, w]`, the
/// tensors the sampler's step takes; `active[row]` is the request index of each row.
pub(super) fn predict(
    scheduler: &dyn Scheduler,
    observer: &dyn Observer,
    (guided, sample): (&Tensor, &Tensor),
    (step_index, done, total): (usize, usize, usize),
    active: &[usize],
) -> Result<Option<PendingPreview>, PipelineError> {
    let wanted = observer.previews_wanted(done, total);
    if wanted.is_empty() {
        return Ok(None);
    }
    let (rows, indices): (Vec<u32>, Vec<usize>) = active
        .iter()
        .enumerate()
        .filter(|(_, k)| wanted.contains(k))
        .map(|(row, &k)| (row as u32, k))
        .unzip();
    if rows.is_empty() {
        return Ok(None);
    }
    let rows = Tensor::from_vec(rows.clone(), rows.len(), sample.device())?;
    let x0 = scheduler.predicted_original(
        &guided.index_select(&rows, 0)?,
        step_index,
        &sample.index_select(&rows, 0)?,
    )?;
    Ok(Some(PendingPreview {
        x0,
        indices,
        rows,
        done,
        total,
    }))
}

impl PendingPreview {
    /// Replaces x0 by `f(x0, rows)` (`[k, C, h, w]`, `[k]` u32 batch rows), e.g. to paste an
    /// inpainting's known region into the preview.
    pub(super) fn map_x0(
        mut self,
        f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor, PipelineError>,
    ) -> Result<Self, PipelineError> {
        self.x0 = f(&self.x0, &self.rows)?;
        Ok(self)
    }

    /// Decodes the previews with `vae` and hands each to `observer`.
    pub(super) fn send(
        self,
        vae: &AutoencoderKL,
        observer: &mut dyn Observer,
    ) -> Result<(), PipelineError> {
        let z = vae.unscale_latents(&self.x0.to_dtype(vae.dtype())?)?;
        let image = vae.decode(&z)?.to_dtype(DType::F32)?.clamp(-1f32, 1f32)?;
        for (index, rgb) in self.indices.into_iter().zip(to_rgb8(&image)?) {
            observer.preview(index, self.done, self.total, rgb);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_evenly_spaced_before_the_end() {
        assert_eq!(preview_steps(0, 20), Vec::<usize>::new());
        assert_eq!(preview_steps(1, 20), [10]);
        assert_eq!(preview_steps(2, 20), [6, 13]);
        assert_eq!(preview_steps(3, 20), [5, 10, 15]);
        assert_eq!(preview_steps(2, 3), [1, 2]);
        // Fewer steps than previews: fewer previews, never after step 0.
        assert_eq!(preview_steps(3, 2), [1]);
        assert_eq!(preview_steps(2, 1), [1]);
        // Never more than three.
        assert_eq!(preview_steps(9, 100).len(), 3);
    }
}
