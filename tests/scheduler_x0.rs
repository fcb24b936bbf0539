//! `Scheduler::predicted_original` (the x0 behind partial-image previews): it agrees with each
//! sampler's own step where the step's result is x0 (the last step, which goes to noise level
//! 0), it inverts the forward process for a perfect noise prediction, and calling it in the
//! middle of a run changes nothing the sampler produces.
use candle_core::{Device, Tensor};

use afa::schedulers::{
    DpmSolverMultistep, EulerAncestral, NoiseSource, SchedulerConfig, SchedulerError, SchedulerKind,
};

/// Seeded standard-normal noise, the same sequence for two runs.
struct SeededNoise(u64);

impl NoiseSource for SeededNoise {
    fn sample(&mut self, shape: &[usize]) -> Result<Tensor, SchedulerError> {
        self.0 += 1;
        Ok(seeded(shape, self.0))
    }
}

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    // A small LCG through Box-Muller: deterministic, no extra dependency.
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const SHAPE: [usize; 4] = [2, 4, 3, 3];

#[test]
fn the_last_step_lands_on_the_predicted_original() {
    let cfg = SchedulerConfig {
        // DDIM's last step reaches alpha 1 (noise level 0) only with set_alpha_to_one.
        set_alpha_to_one: true,
        ..SchedulerConfig::default()
    };
    for kind in SchedulerKind::ALL {
        let steps = 5;
        let mut s = cfg.build(kind, steps).unwrap();
        let mut noise = SeededNoise(1);
        let mut x = (seeded(&SHAPE, 7) * s.init_noise_sigma()).unwrap();
        for i in 0..steps {
            let eps = seeded(&SHAPE, 100 + i as u64);
            let x0 = s.predicted_original(&eps, i, &x).unwrap();
            assert_eq!(x0.dims(), SHAPE);
            x = s.step(&eps, i, &x, &mut noise).unwrap();
            if i + 1 == steps {
                let d = max_diff(&x, &x0);
                assert!(d < 1e-4, "{kind}: last step differs from x0 by {d}");
            } else {
                assert!(max_diff(&x, &x0) > 1e-2, "{kind}: step {i} is not x0 yet");
            }
        }
    }
}

#[test]
fn a_perfect_noise_prediction_gives_back_the_clean_latents() {
    let cfg = SchedulerConfig::default();
    let x0 = seeded(&SHAPE, 3);
    let eps = seeded(&SHAPE, 4);
    let steps = 10;
    let euler = EulerAncestral::new(&cfg, steps).unwrap();
    let dpm = DpmSolverMultistep::new(&cfg, steps, false).unwrap();
    use afa::schedulers::Scheduler;
    for i in [0, 4, 9] {
        // Euler works in sigma space: x = x0 + sigma * eps.
        let sigma = euler.sigmas()[i];
        let x = (&x0 + (&eps * sigma).unwrap()).unwrap();
        let d = max_diff(&euler.predicted_original(&eps, i, &x).unwrap(), &x0);
        assert!(d < 1e-4, "euler-a step {i}: {d}");
        // DPM++ in the variance-preserving space: x = alpha x0 + sigma_t eps.
        let sigma = dpm.sigmas()[i];
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let x = ((&x0 * alpha).unwrap() + (&eps * (sigma * alpha)).unwrap()).unwrap();
        let d = max_diff(&dpm.predicted_original(&eps, i, &x).unwrap(), &x0);
        assert!(d < 1e-4, "dpm++ step {i}: {d}");
    }
}

#[test]
fn asking_for_x0_mid_run_changes_nothing() {
    let cfg = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        let run = |peek: bool| {
            let steps = 6;
            let mut s = cfg.build(kind, steps).unwrap();
            let mut noise = SeededNoise(9);
            let mut x = (seeded(&SHAPE, 11) * s.init_noise_sigma()).unwrap();
            for i in 0..steps {
                let eps = seeded(&SHAPE, 200 + i as u64);
                if peek {
                    s.predicted_original(&eps, i, &x).unwrap();
                }
                x = s.step(&eps, i, &x, &mut noise).unwrap();
            }
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(false), run(true), "{kind}");
    }
}

#[test]
fn out_of_range_steps_are_errors() {
    let cfg = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        let s = cfg.build(kind, 3).unwrap();
        let t = seeded(&SHAPE, 1);
        assert!(s.predicted_original(&t, 3, &t).is_err(), "{kind}");
        let other = seeded(&[1, 4, 3, 3], 1);
        assert!(s.predicted_original(&other, 0, &t).is_err(), "{kind}");
    }
}
