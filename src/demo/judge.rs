//! The pixel judge: reads a picture of the demonstration world back into colour, shape and
//! position, from pixels alone.
//!
//! 1. Background: the per-channel median of the border pixels.
//! 2. Foreground: pixels far from the background and saturated give the shape's mean colour;
//!    then every pixel past half the way from the background to that colour is foreground
//!    (so blurred edges split where a sharp edge would be).
//! 3. Colour: the nearest prototype to the mean foreground colour.
//! 4. Position: the nearest anchor to the foreground's centroid.
//! 5. Shape: the width of the foreground's top quarter against its bottom quarter (a triangle
//!    points up: much narrower on top) and the fill ratio of its bounding box (square ~1,
//!    circle ~pi/4, triangle ~1/2).
//!
//! Anything that fits no class well (too few foreground pixels, a colour far from every
//! prototype, a centroid between anchors, an in-between fill) is judged `None`, which counts
//! as wrong.
use image::RgbImage;

use super::world::{Colour, Position, Scene, Shape};

/// Initial foreground: at least this far (RGB Euclidean) from the background ...
const SEED_DISTANCE: f32 = 60.0;
/// ... and at least this saturated (max - min channel).
const SEED_SATURATION: f32 = 40.0;
/// Fewer foreground pixels than this: no shape.
const MIN_PIXELS: usize = 30;
/// The mean colour must be within this distance of its nearest prototype.
const MAX_COLOUR_DISTANCE: f32 = 100.0;
/// The centroid must be within this many pixels of its nearest anchor.
const MAX_ANCHOR_DISTANCE: f32 = 7.0;
/// Fill-ratio bounds: a triangle (narrow top) fills less than the first; a symmetric shape is a
/// circle between the second and third, a square above the third.
const FILL_TRIANGLE_MAX: f32 = 0.72;
const FILL_CIRCLE_MIN: f32 = 0.66;
const FILL_CIRCLE_SQUARE: f32 = 0.89;
/// A triangle's top quarter is at most this wide relative to its bottom quarter.
const TRIANGLE_TOP_RATIO: f32 = 0.6;
/// A circle's or square's top and bottom quarters differ by at most this factor.
const SYMMETRIC_RATIO: f32 = 0.7;

/// What the judge read from one picture (`None`: no confident reading).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    pub colour: Option<Colour>,
    pub shape: Option<Shape>,
    pub position: Option<Position>,
}

impl Verdict {
    /// Per-attribute correctness against what was asked: (colour, shape, position, all three).
    pub fn score(&self, asked: &Scene) -> [bool; 4] {
        let c = self.colour == Some(asked.colour);
        let s = self.shape == Some(asked.shape);
        let p = self.position == Some(asked.position);
        [c, s, p, c && s && p]
    }
}

/// Correct counts per attribute (colour, shape, position, all three) and the total.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub correct: [usize; 4],
    pub total: usize,
}

impl Tally {
    pub fn add(&mut self, score: [bool; 4]) {
        for (c, ok) in self.correct.iter_mut().zip(score) {
            *c += ok as usize;
        }
        self.total += 1;
    }

    /// Accuracy of attribute `i` and its binomial standard error.
    pub fn accuracy(&self, i: usize) -> (f64, f64) {
        let p = self.correct[i] as f64 / self.total.max(1) as f64;
        (p, (p * (1.0 - p) / self.total.max(1) as f64).sqrt())
    }
}

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|c| (a[c] - b[c]).powi(2)).sum::<f32>().sqrt()
}

fn rgb(p: &image::Rgb<u8>) -> [f32; 3] {
    [p[0] as f32, p[1] as f32, p[2] as f32]
}

fn border_median(img: &RgbImage) -> [f32; 3] {
    let (w, h) = img.dimensions();
    let mut channels: [Vec<u8>; 3] = Default::default();
    for (x, y, p) in img.enumerate_pixels() {
        if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
            for c in 0..3 {
                channels[c].push(p[c]);
            }
        }
    }
    channels.map(|mut v| {
        v.sort_unstable();
        v[v.len() / 2] as f32
    })
}

fn nearest<T: Copy>(options: &[T], mut distance_to: impl FnMut(T) -> f32) -> (T, f32) {
    options
        .iter()
        .map(|&o| (o, distance_to(o)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("non-empty vocabulary")
}

/// Mean row width of the mask over rows `rows` (`widths[y]` is row y's foreground count).
fn mean_width(widths: &[usize]) -> f32 {
    widths.iter().sum::<usize>() as f32 / widths.len().max(1) as f32
}

fn classify_shape(mask: &[bool], w: usize) -> Option<Shape> {
    let rows: Vec<usize> = (0..mask.len() / w)
        .filter(|&y| mask[y * w..(y + 1) * w].iter().any(|&m| m))
        .collect();
    let cols: Vec<usize> = (0..w)
        .filter(|&x| mask.iter().skip(x).step_by(w).any(|&m| m))
        .collect();
    let (top, bottom) = (*rows.first()?, *rows.last()?);
    let (left, right) = (*cols.first()?, *cols.last()?);
    let (bw, bh) = (right - left + 1, bottom - top + 1);
    let count = mask.iter().filter(|&&m| m).count();
    let fill = count as f32 / (bw * bh) as f32;
    let widths: Vec<usize> = (top..=bottom)
        .map(|y| mask[y * w..(y + 1) * w].iter().filter(|&&m| m).count())
        .collect();
    let quarter = (bh / 4).max(1);
    let top_width = mean_width(&widths[..quarter]);
    let bottom_width = mean_width(&widths[bh - quarter..]);
    let ratio = top_width / bottom_width.max(1e-6);
    let symmetric = (SYMMETRIC_RATIO..=1.0 / SYMMETRIC_RATIO).contains(&ratio);
    if ratio <= TRIANGLE_TOP_RATIO {
        (fill < FILL_TRIANGLE_MAX).then_some(Shape::Triangle)
    } else if fill < FILL_CIRCLE_MIN {
        None
    } else if fill < FILL_CIRCLE_SQUARE {
        symmetric.then_some(Shape::Circle)
    } else {
        symmetric.then_some(Shape::Square)
    }
}

/// Reads one picture (any size; the anchors scale with it).
pub fn judge(img: &RgbImage) -> Verdict {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let background = border_median(img);
    let pixels: Vec<[f32; 3]> = img.pixels().map(rgb).collect();
    let seeds: Vec<&[f32; 3]> = pixels
        .iter()
        .filter(|p| {
            let (max, min) = (p[0].max(p[1]).max(p[2]), p[0].min(p[1]).min(p[2]));
            distance(**p, background) > SEED_DISTANCE && max - min > SEED_SATURATION
        })
        .collect();
    if seeds.len() < MIN_PIXELS {
        return Verdict::default();
    }
    let mut mean = [0f32; 3];
    for p in &seeds {
        for c in 0..3 {
            mean[c] += p[c] / seeds.len() as f32;
        }
    }
    let threshold = 0.5 * distance(mean, background);
    let mask: Vec<bool> = pixels
        .iter()
        .map(|p| distance(*p, background) > threshold)
        .collect();
    let (colour, colour_distance) = nearest(Colour::ALL, |c| distance(c.rgb(), mean));
    let (mut sx, mut sy, mut n) = (0f32, 0f32, 0f32);
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        sx += (i % w) as f32 + 0.5;
        sy += (i / w) as f32 + 0.5;
        n += 1.0;
    }
    let scale = (w as f32 / 64.0, h as f32 / 64.0);
    let centroid = (sx / n / scale.0, sy / n / scale.1);
    let (position, anchor_distance) = nearest(Position::ALL, |p| {
        let (ax, ay) = p.anchor();
        ((ax - centroid.0).powi(2) + (ay - centroid.1).powi(2)).sqrt()
    });
    Verdict {
        colour: (colour_distance <= MAX_COLOUR_DISTANCE).then_some(colour),
        shape: classify_shape(&mask, w),
        position: (anchor_distance <= MAX_ANCHOR_DISTANCE).then_some(position),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::render::render;

    #[test]
    fn every_render_is_judged_right() {
        for (i, scene) in Scene::all().iter().enumerate() {
            for seed in 0..25u64 {
                let img = render(scene, seed * 1000 + i as u64);
                assert_eq!(
                    judge(&img).score(scene),
                    [true; 4],
                    "{scene:?} seed {seed}: {:?}",
                    judge(&img)
                );
            }
        }
    }

    #[test]
    fn blurred_renders_are_still_judged_right() {
        // A stand-in for a VAE round trip: a Gaussian blur softens edges and corners.
        for (i, scene) in Scene::all().iter().enumerate() {
            let img = image::imageops::blur(&render(scene, 77 + i as u64), 1.0);
            assert_eq!(judge(&img).score(scene), [true; 4], "{scene:?}");
        }
    }

    #[test]
    fn blank_and_noise_pictures_are_judged_wrong() {
        let blank = RgbImage::from_pixel(64, 64, image::Rgb([238, 236, 230]));
        assert_eq!(judge(&blank), Verdict::default());
        let mut rng = crate::pipeline::noise::ImageRng::new(3);
        let noise = RgbImage::from_fn(64, 64, |_, _| {
            let v = rng.next_u64();
            image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
        });
        let scene = Scene::all()[0];
        assert!(!judge(&noise).score(&scene)[3]);
    }

    #[test]
    fn a_wrong_shape_is_not_read_as_the_asked_one() {
        let circle = Scene::all()[0];
        let square = Scene {
            shape: Shape::Square,
            ..circle
        };
        let img = render(&square, 5);
        assert_eq!(judge(&img).score(&circle), [true, false, true, false]);
    }
}
