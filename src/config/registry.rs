//! `models.toml`: the registry of members and served ensembles. Parsed with unknown fields
//! denied, then checked for everything that can be checked without reading weights (unique
//! names, files present, known member references, sizes, merge weights). Paths are relative to
//! the file's folder. Loading the weights and matching aggregators to members is `loading`'s job.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors in `models.toml`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// How a member's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberFormat {
    Diffusers,
    SingleFile,
}

/// Weight precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

/// One `[[members]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    pub name: String,
    /// A diffusers folder or a single `.safetensors` file.
    pub path: PathBuf,
    /// Inferred from `path` when absent.
    #[serde(default)]
    pub format: Option<MemberFormat>,
    /// For single files: a diffusers folder describing the architecture (SD1.5 by default).
    #[serde(default)]
    pub model_config: Option<PathBuf>,
}

impl MemberEntry {
    /// The member's format, from `format` or the path.
    pub fn resolved_format(&self) -> MemberFormat {
        self.format.unwrap_or(if self.path.is_dir() {
            MemberFormat::Diffusers
        } else {
            MemberFormat::SingleFile
        })
    }
}

/// Request defaults and limits of an ensemble.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleDefaults {
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    #[serde(default = "default_side")]
    pub width: usize,
    #[serde(default = "default_side")]
    pub height: usize,
    #[serde(default = "default_mode")]
    pub mode: String,
}

impl Default for EnsembleDefaults {
    fn default() -> Self {
        Self {
            scheduler: default_scheduler(),
            steps: default_steps(),
            guidance_scale: default_guidance(),
            width: default_side(),
            height: default_side(),
            mode: default_mode(),
        }
    }
}

fn default_scheduler() -> String {
    "ddim".into()
}
fn default_steps() -> usize {
    20
}
fn default_guidance() -> f64 {
    7.5
}
fn default_side() -> usize {
    512
}
fn default_mode() -> String {
    "afa".into()
}

/// One `[[ensembles]]` entry: either `members` (+ `aggregators`), or an `official` AFA folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleEntry {
    /// The name clients use as `model`.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Member names, in order (the order the aggregators were trained with).
    #[serde(default)]
    pub members: Vec<String>,
    /// An aggregator checkpoint (our file or an official folder).
    #[serde(default)]
    pub aggregators: Option<PathBuf>,
    /// An official AFA folder holding members and aggregators together.
    #[serde(default)]
    pub official: Option<PathBuf>,
    /// A diffusers folder whose VAE, tokenizer and scheduler settings are shared (member 0's
    /// when absent).
    #[serde(default)]
    pub shared: Option<PathBuf>,
    /// Per-member weights of the `merge` baseline; the baseline is built only when given.
    #[serde(default)]
    pub merge_weights: Option<Vec<f64>>,
    #[serde(default)]
    pub dtype: Precision,
    /// Sizes clients may ask for, as "WxH"; any multiple of 8 within the limits when empty.
    #[serde(default)]
    pub allowed_sizes: Vec<String>,
    #[serde(default)]
    pub defaults: EnsembleDefaults,
    /// Say so when the weights are untrained (shown in /info and the CLI).
    #[serde(default)]
    pub untrained: bool,
}

/// The parsed registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRegistry {
    #[serde(default)]
    pub members: Vec<MemberEntry>,
    #[serde(default)]
    pub ensembles: Vec<EnsembleEntry>,
    /// The ensemble used when a request names none (the first one when absent).
    #[serde(default)]
    pub default_ensemble: Option<String>,
    /// Folder of the file; relative paths are resolved against it.
    #[serde(skip)]
    pub root: PathBuf,
    #[serde(skip)]
    pub source: PathBuf,
}

/// Parses "WxH".
pub fn parse_size(s: &str) -> Option<(usize, usize)> {
    let (w, h) = s.split_once(['x', 'X'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

impl ModelRegistry {
    /// Reads, parses and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut registry: ModelRegistry = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        registry.source = path.to_path_buf();
        registry.root = path.parent().map(Path::to_path_buf).unwrap_or_default();
        registry.resolve_paths();
        registry.validate()?;
        Ok(registry)
    }

    fn resolve_paths(&mut self) {
        let root = self.root.clone();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = root.join(&*p);
            }
        };
        for m in &mut self.members {
            fix(&mut m.path);
            if let Some(c) = m.model_config.as_mut() {
                fix(c);
            }
        }
        for e in &mut self.ensembles {
            for p in [&mut e.aggregators, &mut e.official, &mut e.shared]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            message,
        }
    }

    /// Everything checkable without reading weights.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for m in &self.members {
            if !names.insert(m.name.as_str()) {
                return Err(self.invalid(format!("member name '{}' is used twice", m.name)));
            }
            if !m.path.exists() {
                return Err(self.invalid(format!(
                    "member '{}': {} does not exist",
                    m.name,
                    m.path.display()
                )));
            }
        }
        let mut ensembles = HashSet::new();
        for e in &self.ensembles {
            self.validate_ensemble(e)?;
            if !ensembles.insert(e.name.as_str()) {
                return Err(self.invalid(format!("ensemble name '{}' is used twice", e.name)));
            }
        }
        if let Some(d) = self
            .default_ensemble
            .as_ref()
            .filter(|d| !ensembles.contains(d.as_str()))
        {
            return Err(self.invalid(format!("default_ensemble '{d}' is not declared")));
        }
        Ok(())
    }

    fn validate_ensemble(&self, e: &EnsembleEntry) -> Result<(), ConfigError> {
        let name = &e.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.invalid(format!(
                "ensemble name '{name}' must be letters, digits, '-', '_' or '.'"
            )));
        }
        match (&e.official, e.members.is_empty()) {
            (Some(_), false) => {
                return Err(self.invalid(format!(
                    "ensemble '{name}': give either `official` or `members`, not both"
                )));
            }
            (None, true) => return Err(self.invalid(format!("ensemble '{name}' has no members"))),
            _ => {}
        }
        if let Some(dir) = e
            .official
            .as_ref()
            .filter(|d| !d.join("model_config.json").is_file())
        {
            {
                return Err(self.invalid(format!(
                    "ensemble '{name}': {} is not an official AFA folder (no model_config.json)",
                    dir.display()
                )));
            }
        }
        if e.members.len() > 8 {
            return Err(self.invalid(format!(
                "ensemble '{name}' has {} members; at most 8",
                e.members.len()
            )));
        }
        for m in &e.members {
            if !self.members.iter().any(|x| &x.name == m) {
                return Err(self.invalid(format!("ensemble '{name}' names unknown member '{m}'")));
            }
        }
        for p in [&e.aggregators, &e.shared].into_iter().flatten() {
            if !p.exists() {
                return Err(
                    self.invalid(format!("ensemble '{name}': {} does not exist", p.display()))
                );
            }
        }
        if let Some(w) = &e.merge_weights {
            let n = if e.members.is_empty() {
                w.len()
            } else {
                e.members.len()
            };
            if w.len() != n
                || w.iter().any(|x| !x.is_finite() || *x < 0.0)
                || w.iter().sum::<f64>() <= 0.0
            {
                return Err(self.invalid(format!(
                    "ensemble '{name}': merge_weights needs one non-negative weight per member with a positive sum"
                )));
            }
        }
        for s in &e.allowed_sizes {
            match parse_size(s) {
                Some((w, h)) if w.is_multiple_of(8) && h.is_multiple_of(8) && w > 0 && h > 0 => {}
                _ => {
                    return Err(self.invalid(format!(
                        "ensemble '{name}': allowed size '{s}' must be WxH with multiples of 8"
                    )));
                }
            }
        }
        let d = &e.defaults;
        if d.width == 0
            || d.height == 0
            || !d.width.is_multiple_of(8)
            || !d.height.is_multiple_of(8)
            || d.steps == 0
            || !d.guidance_scale.is_finite()
        {
            return Err(self.invalid(format!("ensemble '{name}': defaults need sizes that are positive multiples of 8, steps >= 1 and a finite guidance")));
        }
        Ok(())
    }

    /// The ensemble called `name`, or the default one when `None`.
    pub fn ensemble(&self, name: Option<&str>) -> Option<&EnsembleEntry> {
        match name.or(self.default_ensemble.as_deref()) {
            Some(n) => self.ensembles.iter().find(|e| e.name == n),
            None => self.ensembles.first(),
        }
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Option<&MemberEntry> {
        self.members.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelRegistry, ConfigError> {
        ModelRegistry::parse(
            text,
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models.toml")),
        )
    }

    const GOOD: &str = r#"
        [[members]]
        name = "a"
        path = "tests/fixtures/tiny-sd"
        [[members]]
        name = "b"
        path = "tests/fixtures/tiny-sd-b"
        [[ensembles]]
        name = "tiny"
        members = ["a", "b"]
        aggregators = "tests/fixtures/afa/n2"
        merge_weights = [0.5, 0.5]
        allowed_sizes = ["128x128"]
        defaults = { steps = 4, width = 128, height = 128 }
    "#;

    #[test]
    fn a_good_registry_parses_with_resolved_paths() {
        let r = parse(GOOD).unwrap();
        assert_eq!(r.ensembles.len(), 1);
        assert!(r.members[0].path.is_absolute());
        assert_eq!(r.ensemble(None).unwrap().name, "tiny");
        assert_eq!(r.members[0].resolved_format(), MemberFormat::Diffusers);
        assert_eq!(r.ensemble(None).unwrap().defaults.scheduler, "ddim");
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (GOOD.replace("name = \"b\"", "name = \"a\""), "used twice"),
            (
                GOOD.replace("[\"a\", \"b\"]", "[\"a\", \"zzz\"]"),
                "unknown member 'zzz'",
            ),
            (GOOD.replace("tiny-sd-b", "nope"), "does not exist"),
            (GOOD.replace("[0.5, 0.5]", "[1.0]"), "merge_weights"),
            (GOOD.replace("128x128", "100x100"), "multiples of 8"),
            (
                GOOD.replace("merge_weights", "merge_wieghts"),
                "merge_wieghts",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
