//! Per-image seeded noise. Every image owns a generator derived from its own seed only, so an
//! image is the same whether it is generated alone or inside a batch. The generator is
//! xoshiro256++ seeded through SplitMix64, with Box-Muller for normal draws: simple, fast, and
//! fixed forever (a seed must keep giving the same image across releases).
use candle_core::{Device, Tensor};

use crate::schedulers::{NoiseSource, SchedulerError};

/// xoshiro256++ with Box-Muller normals.
#[derive(Debug, Clone)]
pub struct ImageRng {
    state: [u64; 4],
    spare: Option<f32>,
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ImageRng {
    /// The generator of the image with this seed.
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        let state = [
            splitmix64(&mut s),
            splitmix64(&mut s),
            splitmix64(&mut s),
            splitmix64(&mut s),
        ];
        Self { state, spare: None }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in (0, 1], never 0 (safe for `ln`).
    fn uniform_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// One standard normal draw.
    pub fn normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let u1 = self.uniform_open0();
        let u2 = self.uniform_open0();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    /// `count` standard normal draws.
    pub fn normals(&mut self, count: usize) -> Vec<f32> {
        (0..count).map(|_| self.normal()).collect()
    }
}

/// The generators of a batch, one per image, in batch order.
#[derive(Debug, Clone)]
pub struct BatchNoise {
    rngs: Vec<ImageRng>,
    device: Device,
}

impl BatchNoise {
    /// Generators for images with these seeds.
    pub fn new(seeds: &[u64], device: &Device) -> Self {
        Self {
            rngs: seeds.iter().map(|&s| ImageRng::new(s)).collect(),
            device: device.clone(),
        }
    }

    /// Keeps only the generators at these batch positions (images cancelled mid-run are
    /// dropped; the others keep their streams).
    pub fn retain(&mut self, keep: &[usize]) {
        self.rngs = keep.iter().map(|&i| self.rngs[i].clone()).collect();
    }

    /// A `[B, ...]` f32 tensor whose row b comes from image b's generator.
    pub fn draw(&mut self, shape: &[usize]) -> candle_core::Result<Tensor> {
        if shape.first() != Some(&self.rngs.len()) {
            candle_core::bail!(
                "noise shape {shape:?} does not match a batch of {}",
                self.rngs.len()
            );
        }
        let per_image: usize = shape[1..].iter().product();
        let mut data = Vec::with_capacity(per_image * self.rngs.len());
        for rng in &mut self.rngs {
            data.extend(rng.normals(per_image));
        }
        Tensor::from_vec(data, shape, &self.device)
    }
}

impl NoiseSource for BatchNoise {
    fn sample(&mut self, shape: &[usize]) -> Result<Tensor, SchedulerError> {
        Ok(self.draw(shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_regardless_of_batch() {
        let mut alone = BatchNoise::new(&[7], &Device::Cpu);
        let mut batch = BatchNoise::new(&[3, 7], &Device::Cpu);
        let a = alone.draw(&[1, 4, 2, 2]).unwrap();
        let b = batch.draw(&[2, 4, 2, 2]).unwrap().narrow(0, 1, 1).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn normals_look_standard() {
        let mut rng = ImageRng::new(42);
        let v = rng.normals(200_000);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
        assert_ne!(ImageRng::new(1).next_u64(), ImageRng::new(2).next_u64());
    }
}
