//! Drawing a scene: a light flat background (jittered per image) and one flat shape of a
//! jittered prototype colour, with its centroid jittered around the position's anchor and its
//! size jittered, anti-aliased by 4x4 supersampling. Every draw comes from the image's seed.
use image::RgbImage;

use super::world::{IMAGE_SIZE, Scene, Shape};
use crate::pipeline::noise::ImageRng;

/// The background's mean colour; each image jitters it by up to `BACKGROUND_JITTER`.
pub const BACKGROUND: [f32; 3] = [238.0, 236.0, 230.0];
const BACKGROUND_JITTER: f32 = 8.0;
/// Per-channel jitter of the shape's colour around its prototype.
const COLOUR_JITTER: f32 = 12.0;
/// Jitter of the centroid around the anchor, in pixels (each axis).
const POSITION_JITTER: f32 = 2.5;
/// The shape's half-extent `r` in pixels is drawn from this range.
const SIZE_RANGE: (f32, f32) = (8.0, 10.5);
/// A square's half side, as a fraction of `r` (its area then matches a circle's).
const SQUARE_HALF: f32 = 0.87;
const SUPERSAMPLE: usize = 4;

fn uniform(rng: &mut ImageRng, lo: f32, hi: f32) -> f32 {
    let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    lo + (hi - lo) * u
}

/// Whether point (x, y) lies inside `shape` of half-extent `r` with its centroid at (cx, cy).
/// The triangle points up: base 2.2 r wide, height 2 r, centroid a third above the base.
fn inside(shape: Shape, (cx, cy): (f32, f32), r: f32, (x, y): (f32, f32)) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        Shape::Square => dx.abs() <= SQUARE_HALF * r && dy.abs() <= SQUARE_HALF * r,
        Shape::Triangle => {
            let (apex, base) = (cy - 4.0 * r / 3.0, cy + 2.0 * r / 3.0);
            if y < apex || y > base {
                return false;
            }
            let half_width = 1.1 * r * (y - apex) / (base - apex);
            dx.abs() <= half_width
        }
    }
}

/// Draws `scene` with the jitter drawn from `seed`.
pub fn render(scene: &Scene, seed: u64) -> RgbImage {
    let mut rng = ImageRng::new(seed);
    let background: Vec<f32> = BACKGROUND
        .iter()
        .map(|c| c + uniform(&mut rng, -BACKGROUND_JITTER, BACKGROUND_JITTER))
        .collect();
    let colour: Vec<f32> = scene
        .colour
        .rgb()
        .iter()
        .map(|c| (c + uniform(&mut rng, -COLOUR_JITTER, COLOUR_JITTER)).clamp(0.0, 255.0))
        .collect();
    let (ax, ay) = scene.position.anchor();
    let centre = (
        ax + uniform(&mut rng, -POSITION_JITTER, POSITION_JITTER),
        ay + uniform(&mut rng, -POSITION_JITTER, POSITION_JITTER),
    );
    let r = uniform(&mut rng, SIZE_RANGE.0, SIZE_RANGE.1);
    let n = IMAGE_SIZE as u32;
    RgbImage::from_fn(n, n, |px, py| {
        let mut hits = 0usize;
        for sy in 0..SUPERSAMPLE {
            for sx in 0..SUPERSAMPLE {
                let x = px as f32 + (sx as f32 + 0.5) / SUPERSAMPLE as f32;
                let y = py as f32 + (sy as f32 + 0.5) / SUPERSAMPLE as f32;
                hits += inside(scene.shape, centre, r, (x, y)) as usize;
            }
        }
        let a = hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
        let mix = |c: usize| (background[c] * (1.0 - a) + colour[c] * a).round() as u8;
        image::Rgb([mix(0), mix(1), mix(2)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::world::{Colour, Position};

    #[test]
    fn same_seed_same_picture_other_seed_other_jitter() {
        let scene = Scene {
            colour: Colour::Blue,
            shape: Shape::Triangle,
            position: Position::Top,
        };
        assert_eq!(render(&scene, 7), render(&scene, 7));
        assert_ne!(render(&scene, 7), render(&scene, 8));
    }

    #[test]
    fn shapes_stay_inside_the_image() {
        for scene in Scene::all() {
            for seed in 0..20 {
                let img = render(&scene, seed);
                let border = img.enumerate_pixels().filter(|(x, y, _)| {
                    *x == 0 || *y == 0 || *x == IMAGE_SIZE as u32 - 1 || *y == IMAGE_SIZE as u32 - 1
                });
                for (_, _, p) in border {
                    let d: f32 = (0..3)
                        .map(|c| (p[c] as f32 - BACKGROUND[c]).abs())
                        .fold(0.0, f32::max);
                    assert!(d <= BACKGROUND_JITTER + 1.0, "{scene:?} seed {seed}");
                }
            }
        }
    }
}
