//! How an ensemble predicts noise for a request: the AFA method or one of the baselines.
use std::fmt;
use std::str::FromStr;

use super::EnsembleError;
use super::magicfusion::MagicFusionConfig;

/// `ensemble_mode` of a request / `--mode` of the CLI.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum EnsembleMode {
    /// Trained SABW aggregators at every point (the method).
    #[default]
    Afa,
    /// Every aggregator replaced by a uniform average of the experts' features.
    Mean,
    /// One member alone, by name.
    Single(String),
    /// A weighted parameter average of the members' UNets and text encoders, built at load.
    Merge,
    /// Saliency-aware noise blending (§10.4), extended to N experts by a per-element argmax.
    MagicFusion(MagicFusionConfig),
}

impl FromStr for EnsembleMode {
    type Err = EnsembleError;

    /// `afa`, `mean`, `single:<member>`, `merge`, `magicfusion` (default settings).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "afa" => EnsembleMode::Afa,
            "mean" => EnsembleMode::Mean,
            "merge" => EnsembleMode::Merge,
            "magicfusion" => EnsembleMode::MagicFusion(MagicFusionConfig::default()),
            other => match other.strip_prefix("single:") {
                Some(name) if !name.is_empty() => EnsembleMode::Single(name.to_string()),
                _ => return Err(EnsembleError::UnknownMode(other.to_string())),
            },
        })
    }
}

impl fmt::Display for EnsembleMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnsembleMode::Afa => f.write_str("afa"),
            EnsembleMode::Mean => f.write_str("mean"),
            EnsembleMode::Single(name) => write!(f, "single:{name}"),
            EnsembleMode::Merge => f.write_str("merge"),
            EnsembleMode::MagicFusion(_) => f.write_str("magicfusion"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for s in ["afa", "mean", "merge", "magicfusion", "single:rv51"] {
            assert_eq!(s.parse::<EnsembleMode>().unwrap().to_string(), s);
        }
        assert!("single:".parse::<EnsembleMode>().is_err());
        assert!("average".parse::<EnsembleMode>().is_err());
    }
}
