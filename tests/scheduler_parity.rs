//! Parity of the samplers in `afa::schedulers` with diffusers 0.42.1, against the fixtures written
//! by `scripts/fixtures/schedulers.py` (timesteps, sigmas, init_noise_sigma, alphas_cumprod and
//! short rollouts of a fake deterministic model with stored ancestral noise), plus unit tests of
//! the DDIM spacing, config parsing and error handling.
mod common;

use std::path::{Path, PathBuf};

use afa::npy;
use afa::schedulers::{
    DpmSolverMultistep, EulerAncestral, NoiseSource, SchedulerConfig, SchedulerError,
    SchedulerKind, TimestepSpacing,
};
use candle_core::{Device, Tensor};
use common::max_abs_diff;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

fn load(path: &Path) -> npy::NpyArray {
    npy::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replays stored noise, one [2,4,8,8] slice per call.
struct StoredNoise {
    noise: Tensor,
    next: usize,
}

impl NoiseSource for StoredNoise {
    fn sample(&mut self, shape: &[usize]) -> Result<Tensor, SchedulerError> {
        let n = self.noise.get(self.next)?;
        assert_eq!(n.dims(), shape);
        self.next += 1;
        Ok(n)
    }
}

/// Deterministic samplers must not draw noise.
struct NoNoise;

impl NoiseSource for NoNoise {
    fn sample(&mut self, _shape: &[usize]) -> Result<Tensor, SchedulerError> {
        Err(SchedulerError::InvalidInput("unexpected noise draw".into()))
    }
}

fn fixture_sigmas(kind: SchedulerKind, steps: usize) -> Option<Vec<f64>> {
    let cfg = SchedulerConfig::default();
    match kind {
        SchedulerKind::Ddim => None,
        SchedulerKind::EulerAncestral => Some(EulerAncestral::new(&cfg, steps).unwrap().sigmas()),
        SchedulerKind::DpmPp2m => Some(
            DpmSolverMultistep::new(&cfg, steps, false)
                .unwrap()
                .sigmas(),
        ),
        SchedulerKind::DpmPp2mKarras => {
            Some(DpmSolverMultistep::new(&cfg, steps, true).unwrap().sigmas())
        }
    }
}

/// Runs the fake model `model_output = input * 0.9 + bias * f32(0.5 cos i)` through `kind` and
/// compares every step (and Euler's scaled inputs) with the stored diffusers rollout.
fn check_rollout(dir: &Path, kind: SchedulerKind, steps: usize, init_sigma: f64) {
    let dev = Device::Cpu;
    let expected = load(&dir.join("samples.npy")).to_tensor(&dev).unwrap();
    let initial = load(&root().join("initial.npy")).to_tensor(&dev).unwrap();
    let bias = load(&root().join("bias.npy")).to_tensor(&dev).unwrap();
    let scaled_ref = dir.join("scaled_inputs.npy").exists().then(|| {
        load(&dir.join("scaled_inputs.npy"))
            .to_tensor(&dev)
            .unwrap()
    });
    let mut stored;
    let mut none = NoNoise;
    let noise: &mut dyn NoiseSource = if dir.join("noise.npy").exists() {
        stored = StoredNoise {
            noise: load(&dir.join("noise.npy")).to_tensor(&dev).unwrap(),
            next: 0,
        };
        &mut stored
    } else {
        &mut none
    };
    let mut sched = SchedulerConfig::default().build(kind, steps).unwrap();
    let mut x = initial.affine(init_sigma, 0.0).unwrap();
    let mut worst = 0f32;
    for i in 0..steps {
        let inp = sched.scale_model_input(&x, i).unwrap();
        if let Some(r) = &scaled_ref {
            let d = max_abs_diff(&inp, &r.get(i).unwrap());
            assert!(d <= 1e-5, "{kind} {steps}: scaled input {i} differs by {d}");
        }
        let c = (0.5 * (i as f64).cos()) as f32;
        let mo = (inp.affine(0.9, 0.0).unwrap() + bias.affine(f64::from(c), 0.0).unwrap()).unwrap();
        x = sched.step(&mo, i, &x, noise).unwrap();
        let d = max_abs_diff(&x, &expected.get(i).unwrap());
        worst = worst.max(d);
        assert!(
            d <= 1e-5,
            "{kind} {steps}: sample after step {i} differs by {d}"
        );
    }
    eprintln!("{kind} {steps}: rollout max abs err {worst:e}");
}

#[test]
fn fixtures_match_diffusers() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 8, "missing scheduler fixtures");
    let mut seen = std::collections::HashSet::new();
    let mut rollouts = 0;
    for dir in dirs {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let (kind, steps) = name.rsplit_once('_').unwrap();
        let kind: SchedulerKind = kind.parse().unwrap();
        let steps: usize = steps.parse().unwrap();
        seen.insert(kind);
        let sched = SchedulerConfig::default().build(kind, steps).unwrap();

        let ts = load(&dir.join("timesteps.npy")).data;
        assert_eq!(sched.timesteps().len(), ts.len(), "{name}: timestep count");
        for (i, (a, b)) in sched.timesteps().iter().zip(&ts).enumerate() {
            if kind == SchedulerKind::EulerAncestral {
                assert!((a - b).abs() <= 1e-9, "{name}: timestep {i}: {a} vs {b}");
            } else {
                assert_eq!(a, b, "{name}: timestep {i}");
            }
        }

        if let Some(sig) = fixture_sigmas(kind, steps) {
            let want = load(&dir.join("sigmas.npy")).data;
            assert_eq!(sig.len(), want.len(), "{name}: sigma count");
            for (i, (a, b)) in sig.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs(),
                    "{name}: sigma {i}: {a} vs {b}"
                );
            }
        }

        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let init = meta["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (sched.init_noise_sigma() - init).abs() <= 1e-6 * init,
            "{name}: init_noise_sigma"
        );

        if dir.join("samples.npy").exists() {
            check_rollout(&dir, kind, steps, sched.init_noise_sigma());
            rollouts += 1;
        }
    }
    assert_eq!(
        seen.len(),
        SchedulerKind::ALL.len(),
        "every kind has fixtures"
    );
    assert!(rollouts >= 4);
}

#[test]
fn alphas_cumprod_matches_diffusers() {
    let want = load(&root().join("alphas_cumprod.npy")).data;
    let got = SchedulerConfig::default().alphas_cumprod().unwrap();
    assert_eq!(got.len(), 1000);
    assert_eq!(
        got, want,
        "alphas_cumprod should be bit-identical to torch float32"
    );
}

#[test]
fn ddim_leading_timesteps() {
    let cfg = SchedulerConfig::default();
    let s = cfg.build(SchedulerKind::Ddim, 50).unwrap();
    let want: Vec<f64> = (0..50).rev().map(|i| (i * 20 + 1) as f64).collect();
    assert_eq!(s.timesteps(), want.as_slice());
    assert_eq!((s.timesteps()[0], s.timesteps()[49]), (981.0, 1.0));
    let s = cfg.build(SchedulerKind::Ddim, 20).unwrap();
    let want: Vec<f64> = (0..20).rev().map(|i| (i * 50 + 1) as f64).collect();
    assert_eq!(s.timesteps(), want.as_slice());
    assert_eq!(&s.timesteps()[..3], &[951.0, 901.0, 851.0]);
    assert_eq!(s.init_noise_sigma(), 1.0);
}

#[test]
fn bad_configs_and_steps_are_errors() {
    let cfg = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        assert!(matches!(
            cfg.build(kind, 0),
            Err(SchedulerError::InvalidSteps { .. })
        ));
        assert!(matches!(
            cfg.build(kind, 1001),
            Err(SchedulerError::InvalidSteps { .. })
        ));
        assert!(cfg.build(kind, 1).is_ok(), "{kind}: 1 step");
        let bad = SchedulerConfig {
            num_train_timesteps: 1,
            ..cfg.clone()
        };
        assert!(bad.build(kind, 1).is_err());
        let bad = SchedulerConfig {
            beta_start: -1.0,
            beta_schedule: afa::schedulers::BetaSchedule::Linear,
            ..cfg.clone()
        };
        assert!(bad.build(kind, 10).is_err());
        let bad = SchedulerConfig {
            trained_betas: Some(vec![0.01; 3]),
            ..cfg.clone()
        };
        assert!(bad.build(kind, 10).is_err());
    }
    // leading + steps_offset can push the first DDIM timestep past the table.
    assert!(cfg.build(SchedulerKind::Ddim, 1000).is_err());
    assert!(SchedulerConfig::from_json(r#"{"prediction_type": "sample"}"#).is_err());
    assert!(SchedulerConfig::from_json(r#"{"beta_schedule": "squaredcos_cap_v2"}"#).is_err());
    assert!(SchedulerConfig::from_json(r#"{"timestep_spacing": "weird"}"#).is_err());
}

#[test]
fn step_misuse_is_an_error() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &dev).unwrap();
    let cfg = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        let mut s = cfg.build(kind, 4).unwrap();
        let mut noise = ZeroNoise;
        assert!(
            s.step(&x, 4, &x, &mut noise).is_err(),
            "{kind}: index out of range"
        );
        let y = Tensor::zeros((1, 4, 2, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(
            s.step(&y, 0, &x, &mut noise).is_err(),
            "{kind}: shape mismatch"
        );
    }
    let mut s = cfg.build(SchedulerKind::DpmPp2m, 4).unwrap();
    assert!(
        s.step(&x, 1, &x, &mut ZeroNoise).is_err(),
        "DPM++ out of order"
    );
}

struct ZeroNoise;

impl NoiseSource for ZeroNoise {
    fn sample(&mut self, shape: &[usize]) -> Result<Tensor, SchedulerError> {
        Ok(Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu)?)
    }
}

#[test]
fn kind_names_round_trip() {
    let names: Vec<String> = SchedulerKind::ALL.iter().map(|k| k.to_string()).collect();
    assert_eq!(names, ["ddim", "euler-a", "dpmpp-2m", "dpmpp-2m-karras"]);
    for k in SchedulerKind::ALL {
        assert_eq!(k.to_string().parse::<SchedulerKind>().unwrap(), k);
        assert_eq!(SchedulerConfig::default().build(k, 10).unwrap().kind(), k);
    }
    assert!(matches!(
        "euler".parse::<SchedulerKind>(),
        Err(SchedulerError::UnknownKind(_))
    ));
}

#[test]
fn sd15_config_json_is_tolerated() {
    let json = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;
    let cfg = SchedulerConfig::from_json(json).unwrap();
    assert_eq!(cfg, SchedulerConfig::default());
    assert_eq!(
        cfg.spacing_for(SchedulerKind::Ddim),
        TimestepSpacing::Leading
    );
    assert_eq!(
        cfg.spacing_for(SchedulerKind::EulerAncestral),
        TimestepSpacing::Linspace
    );
    let v = SchedulerConfig::from_json(
        r#"{"prediction_type": "v_prediction", "timestep_spacing": "trailing"}"#,
    )
    .unwrap();
    assert_eq!(
        v.spacing_for(SchedulerKind::Ddim),
        TimestepSpacing::Trailing
    );
    let s = v.build(SchedulerKind::Ddim, 10).unwrap();
    assert_eq!(s.timesteps()[0], 999.0);
}

#[test]
fn add_noise_is_ddpm_forward() {
    let dev = Device::Cpu;
    let ns = SchedulerConfig::default().noise_schedule().unwrap();
    let x0 = Tensor::ones((2, 1, 2, 2), candle_core::DType::F32, &dev).unwrap();
    let eps = Tensor::full(2f32, (2, 1, 2, 2), &dev).unwrap();
    let out = ns.add_noise(&x0, &eps, &[0, 999]).unwrap();
    let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    for (b, t) in [(0usize, 0usize), (1, 999)] {
        let a = ns.alphas_cumprod()[t];
        let want = a.sqrt() + 2.0 * (1.0 - a).sqrt();
        assert!((f64::from(v[b * 4]) - want).abs() < 1e-6, "t={t}");
    }
    assert!(ns.add_noise(&x0, &eps, &[0]).is_err());
    assert!(ns.add_noise(&x0, &eps, &[0, 1000]).is_err());
}
