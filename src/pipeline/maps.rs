//! Attention maps of an ensemble (which expert was trusted where): collection over the steps
//! of a batch, and rendering as PNG heat maps.
use candle_core::Tensor;

use super::PipelineError;
use super::params::MapsRequest;

/// Expert weights per aggregation point, each `[2B, N, h, w]` f32 (unconditional half first).
#[derive(Debug, Clone)]
pub enum CollectedMaps {
    /// `steps[s][k]`: step s, aggregation point k.
    PerStep(Vec<Vec<Tensor>>),
    /// `points[k]`: the mean over all steps.
    Averaged(Vec<Tensor>),
}

/// Accumulates maps step by step as a request asked.
#[derive(Debug, Default)]
pub(super) struct MapCollector {
    steps: Vec<Vec<Tensor>>,
    sum: Option<Vec<Tensor>>,
    mode: MapsRequest,
}

impl MapCollector {
    /// Adds one step's maps (ignored when the request wants none or the denoiser gave none).
    pub(super) fn push(
        &mut self,
        mode: MapsRequest,
        maps: Vec<Tensor>,
    ) -> Result<(), PipelineError> {
        self.mode = mode;
        if maps.is_empty() {
            return Ok(());
        }
        match mode {
            MapsRequest::Off => {}
            MapsRequest::PerStep => self.steps.push(maps),
            MapsRequest::Averaged => {
                self.sum = Some(match self.sum.take() {
                    None => maps,
                    Some(sum) => sum
                        .iter()
                        .zip(&maps)
                        .map(|(a, b)| a + b)
                        .collect::<candle_core::Result<_>>()?,
                });
            }
        }
        Ok(())
    }

    /// The collected maps, averaged over `steps` when asked.
    pub(super) fn finish(self, steps: usize) -> Result<Option<CollectedMaps>, PipelineError> {
        Ok(match self.mode {
            MapsRequest::Off => None,
            MapsRequest::PerStep if self.steps.is_empty() => None,
            MapsRequest::PerStep => Some(CollectedMaps::PerStep(self.steps)),
            MapsRequest::Averaged => match self.sum {
                None => None,
                Some(sum) => Some(CollectedMaps::Averaged(
                    sum.iter()
                        .map(|t| t / steps.max(1) as f64)
                        .collect::<candle_core::Result<_>>()?,
                )),
            },
        })
    }
}
