//! Named weight sets: which file and key each model tensor comes from, and a `VarBuilder`
//! over them that records every tensor the model asks for, so that a load reports all
//! missing, unexpected and mis-shaped tensors by name at once instead of failing on the first.
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use super::safetensors_file::SafetensorsFile;
pub use super::single_file::KeyTransform as Transform;
use super::{LoadError, ShapeMismatch};

/// Where one named tensor lives.
#[derive(Debug, Clone)]
pub struct WeightSource {
    pub file: Arc<SafetensorsFile>,
    pub key: String,
    pub transform: Transform,
}

impl WeightSource {
    /// Shape after the transform (an unusable stored shape is reported as stored).
    fn stored_shape(&self) -> Vec<usize> {
        let shape = self.file.shape(&self.key).unwrap_or(&[]);
        self.transform
            .output_shape(shape)
            .unwrap_or_else(|| shape.to_vec())
    }

    fn load(&self, dtype: DType, device: &Device) -> Result<Tensor, LoadError> {
        let t = self.file.load(&self.key, dtype, device)?;
        Ok(self.transform.apply(t)?)
    }
}

/// The tensors of one model component (UNet, VAE, text encoder, ...) under diffusers names.
#[derive(Debug, Clone)]
pub struct WeightSet {
    component: String,
    entries: Arc<HashMap<String, WeightSource>>,
}

impl WeightSet {
    /// A set from explicit entries.
    pub fn new(component: impl Into<String>, entries: HashMap<String, WeightSource>) -> Self {
        Self {
            component: component.into(),
            entries: Arc::new(entries),
        }
    }

    /// Every tensor of `file`, renamed by `rename` (which may drop a key by returning `None`).
    pub fn from_file(
        component: impl Into<String>,
        file: Arc<SafetensorsFile>,
        rename: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let entries = file
            .names()
            .filter_map(|key| {
                rename(key).map(|name| {
                    let source = WeightSource {
                        file: file.clone(),
                        key: key.to_string(),
                        transform: Transform::None,
                    };
                    (name, source)
                })
            })
            .collect();
        Self::new(component, entries)
    }

    /// The distinct files the tensors come from, in name order of their first tensor.
    pub fn files(&self) -> Vec<Arc<SafetensorsFile>> {
        let mut files: Vec<Arc<SafetensorsFile>> = Vec::new();
        for name in self.names() {
            let f = &self.entries[name].file;
            if !files.iter().any(|g| Arc::ptr_eq(g, f)) {
                files.push(f.clone());
            }
        }
        files
    }

    /// Name of the component, for messages.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the set holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Names of every tensor, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Loads one tensor.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, LoadError> {
        let source = self
            .entries
            .get(name)
            .ok_or_else(|| LoadError::TensorMismatch {
                component: self.component.clone(),
                missing: vec![name.to_string()],
                unexpected: vec![],
                mis_shaped: vec![],
            })?;
        source.load(dtype, device)
    }

    /// Builds a model from this set with `build`, then checks that every tensor the model asked
    /// for was present with the right shape and that no stored tensor went unused.
    pub fn build<T>(
        &self,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T, LoadError> {
        let tracker = Arc::new(Mutex::new(TrackState::default()));
        let backend = TrackingBackend {
            set: self.clone(),
            state: tracker.clone(),
        };
        let boxed: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(backend);
        let vb = VarBuilder::from_backend(boxed, dtype, device.clone());
        let built = build(vb);
        let state = std::mem::take(&mut *tracker.lock().expect("tracker lock poisoned"));
        let unexpected: Vec<String> = self
            .entries
            .keys()
            .filter(|k| !state.used.contains(*k))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !state.missing.is_empty() || !state.mis_shaped.is_empty() || !unexpected.is_empty() {
            return Err(LoadError::TensorMismatch {
                component: self.component.clone(),
                missing: state.missing.into_iter().collect(),
                unexpected,
                mis_shaped: state.mis_shaped,
            });
        }
        if let Some(e) = state.load_error {
            return Err(e);
        }
        Ok(built?)
    }
}

#[derive(Default)]
struct TrackState {
    used: BTreeSet<String>,
    missing: BTreeSet<String>,
    mis_shaped: Vec<ShapeMismatch>,
    load_error: Option<LoadError>,
}

/// A `VarBuilder` backend that serves tensors from a `WeightSet` and records what was asked.
/// Missing or mis-shaped tensors are recorded and replaced by zeros so that construction can
/// go on and every problem is reported together by `WeightSet::build`.
struct TrackingBackend {
    set: WeightSet,
    state: Arc<Mutex<TrackState>>,
}

impl candle_nn::var_builder::SimpleBackend for TrackingBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut state = self.state.lock().expect("tracker lock poisoned");
        let Some(source) = self.set.entries.get(name) else {
            state.missing.insert(name.to_string());
            return Tensor::zeros(shape, dtype, device);
        };
        state.used.insert(name.to_string());
        let found = source.stored_shape();
        if found != shape.dims() {
            state.mis_shaped.push(ShapeMismatch {
                name: name.to_string(),
                expected: shape.dims().to_vec(),
                found,
            });
            return Tensor::zeros(shape, dtype, device);
        }
        match source.load(dtype, device) {
            Ok(t) => Ok(t),
            Err(e) => {
                state.load_error.get_or_insert(e);
                Tensor::zeros(shape, dtype, device)
            }
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut state = self.state.lock().expect("tracker lock poisoned");
        match self.set.entries.get(name) {
            Some(source) => {
                state.used.insert(name.to_string());
                source
                    .load(dtype, device)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
            None => {
                state.missing.insert(name.to_string());
                candle_core::bail!("missing tensor {name}")
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.set.entries.contains_key(name)
    }
}
