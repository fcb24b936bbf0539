//! Partial-image previews through `SdPipeline` on the tiny model: the observer gets exactly the
//! previews it asks for, of the images it names, as real images of the batch's size; a preview
//! after the last step is the final image itself (x0 at noise level 0); and asking for previews
//! never changes the final images (byte-identical PNGs), for every sampler.
mod common;

use std::sync::Arc;

use afa::pipeline::preview::preview_steps;
use afa::pipeline::{
    BatchRequest, ImageSpec, InitImage, MapsRequest, Observer, SdPipeline, SingleUNet, Strength,
};
use afa::schedulers::SchedulerKind;

fn pipeline() -> SdPipeline<SingleUNet> {
    common::single_pipeline(common::tiny_sd())
}

fn request(kind: SchedulerKind, steps: usize) -> BatchRequest {
    let image = |prompt: &str, seed| ImageSpec {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        seed,
        guidance_scale: 5.0,
        init: None,
    };
    BatchRequest {
        images: vec![image("a red fox", 3), image("a blue boat", 4)],
        width: 64,
        height: 64,
        steps,
        scheduler: kind,
        strength: None,
        initial_latents: None,
        attention_maps: MapsRequest::Off,
    }
}

/// Asks for previews of image `of` after the steps `at`, and keeps what it gets.
struct Previews {
    at: Vec<usize>,
    of: usize,
    got: Vec<(usize, usize, usize, Vec<u8>)>,
}

impl Observer for Previews {
    fn previews_wanted(&self, done: usize, _total: usize) -> Vec<usize> {
        if self.at.contains(&done) {
            vec![self.of]
        } else {
            vec![]
        }
    }
    fn preview(&mut self, index: usize, done: usize, total: usize, rgb: Vec<u8>) {
        self.got.push((index, done, total, rgb));
    }
}

#[test]
fn previews_are_real_and_leave_the_final_images_unchanged() {
    let p = pipeline();
    for kind in SchedulerKind::ALL {
        let req = request(kind, 4);
        let plain = p.generate(&req, &mut ()).unwrap();
        let mut obs = Previews {
            at: preview_steps(2, 4),
            of: 1,
            got: vec![],
        };
        let with = p.generate(&req, &mut obs).unwrap();
        for (a, b) in plain.images.iter().zip(&with.images) {
            assert_eq!(a.png, b.png, "{kind}: previews changed image {}", a.index);
        }
        let steps: Vec<(usize, usize, usize)> = obs.got.iter().map(|g| (g.0, g.1, g.2)).collect();
        assert_eq!(steps, [(1, 1, 4), (1, 2, 4)], "{kind}");
        for (_, done, _, rgb) in &obs.got {
            assert_eq!(rgb.len(), 64 * 64 * 3, "{kind}");
            let (lo, hi) = (rgb.iter().min().unwrap(), rgb.iter().max().unwrap());
            assert!(hi > lo, "{kind}: preview after step {done} is flat");
            assert_ne!(
                rgb, &with.images[1].rgb,
                "{kind}: step {done} is already final"
            );
        }
        assert_ne!(obs.got[0].3, obs.got[1].3, "{kind}");
    }
}

#[test]
fn a_preview_after_the_last_step_is_the_final_image() {
    let p = pipeline();
    // Euler-a and DPM++ end at noise level 0, where the predicted x0 is the result; an
    // inpainting preview has the known region the final image keeps.
    let inpaint = |mut req: BatchRequest| {
        let init = Arc::new(InitImage {
            rgb: (0..64 * 64 * 3).map(|v| (v % 251) as u8).collect(),
            mask: Some(
                (0..64 * 64)
                    .map(|k| if k % 64 < 32 { 255 } else { 0 })
                    .collect(),
            ),
        });
        for image in &mut req.images {
            image.init = Some(init.clone());
        }
        req.strength = Some(Strength::new(0.75).unwrap());
        req.steps = 4;
        req
    };
    let kinds = [SchedulerKind::EulerAncestral, SchedulerKind::DpmPp2m];
    let requests = kinds
        .iter()
        .map(|&k| (k, request(k, 3)))
        .chain(kinds.iter().map(|&k| (k, inpaint(request(k, 4)))));
    for (kind, req) in requests {
        let mut obs = Previews {
            at: vec![3],
            of: 0,
            got: vec![],
        };
        let out = p.generate(&req, &mut obs).unwrap();
        assert_eq!(obs.got.len(), 1);
        let diff = obs.got[0]
            .3
            .iter()
            .zip(&out.images[0].rgb)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            diff <= 1,
            "{kind}: the last preview differs from the image by {diff}"
        );
    }
}
