//! Attention maps of an ensemble (which expert was trusted where): collection over the steps
//! of a batch, and rendering as PNG heat maps.
use candle_core::Tensor;

use super::PipelineError;
#[cfg(test)]
use super::params::MapPoints;
use super::params::MapsRequest;

/// Expert weights of the kept aggregation points, each `[2B, N, h, w]` f32 (unconditional half
/// first). Entry i is the i-th kept point (`MapPoints::among`); all points unless filtered.
#[derive(Debug, Clone)]
pub enum CollectedMaps {
    /// `steps[s][i]`: step s, kept point i.
    PerStep(Vec<Vec<Tensor>>),
    /// `points[i]`: the mean over all steps.
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
    /// Adds one step's maps (all points; only the asked-for ones are kept; ignored when the
    /// request wants none or the denoiser gave none).
    pub(super) fn push(
        &mut self,
        mode: MapsRequest,
        maps: Vec<Tensor>,
    ) -> Result<(), PipelineError> {
        self.mode = mode;
        let Some(points) = mode.points() else {
            return Ok(());
        };
        let maps: Vec<Tensor> = maps
            .into_iter()
            .enumerate()
            .filter(|(k, _)| points.contains(*k))
            .map(|(_, m)| m)
            .collect();
        if maps.is_empty() {
            return Ok(());
        }
        match mode {
            MapsRequest::Off => {}
            MapsRequest::PerStep(_) => self.steps.push(maps),
            MapsRequest::Averaged(_) => {
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

    /// Keeps only these rows (`[R]` u32 indices into the `2B` rows) of what was collected.
    pub(super) fn retain_rows(&mut self, rows: &Tensor) -> Result<(), PipelineError> {
        let select = |maps: &mut Vec<Tensor>| -> Result<(), PipelineError> {
            for m in maps.iter_mut() {
                *m = m.index_select(rows, 0)?;
            }
            Ok(())
        };
        for step in &mut self.steps {
            select(step)?;
        }
        if let Some(sum) = self.sum.as_mut() {
            select(sum)?;
        }
        Ok(())
    }

    /// The collected maps, averaged over `steps` when asked.
    pub(super) fn finish(self, steps: usize) -> Result<Option<CollectedMaps>, PipelineError> {
        Ok(match self.mode {
            MapsRequest::Off => None,
            MapsRequest::PerStep(_) if self.steps.is_empty() => None,
            MapsRequest::PerStep(_) => Some(CollectedMaps::PerStep(self.steps)),
            MapsRequest::Averaged(_) => match self.sum {
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

/// Heat maps are about this many pixels wide: the map's own resolution times the largest
/// integer factor that fits (at least 1). Clients scale them up for display.
pub const HEATMAP_WIDTH: usize = 128;

/// The integer upscale factor of a heat map of a map `map_width` wide.
pub fn heatmap_scale(map_width: usize) -> usize {
    (HEATMAP_WIDTH / map_width.max(1)).max(1)
}

/// Distinct colours for up to 8 experts (ColorBrewer Set1), RGB.
pub const EXPERT_COLOURS: [[u8; 3]; 8] = [
    [228, 26, 28],
    [55, 126, 184],
    [77, 175, 74],
    [152, 78, 163],
    [255, 127, 0],
    [255, 255, 51],
    [166, 86, 40],
    [247, 129, 191],
];

/// Renders one map as a composite heat map: each pixel is the weight-mixed colour of the
/// experts. `map`: `[N, h, w]` weights summing to 1 over N; each map cell becomes a
/// `scale x scale` block. Returns PNG bytes.
pub fn heatmap_png(map: &Tensor, scale: usize, legend: &str) -> Result<Vec<u8>, PipelineError> {
    let (n, h, w) = map.dims3()?;
    let values = map
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    heatmap_png_from_values(&values, [n, h, w], scale, legend)
}

/// [`heatmap_png`] of a map given as row-major `values` of `shape` `[N, h, w]`.
pub fn heatmap_png_from_values(
    values: &[f32],
    shape: [usize; 3],
    scale: usize,
    legend: &str,
) -> Result<Vec<u8>, PipelineError> {
    let [n, h, w] = shape;
    if n > EXPERT_COLOURS.len() {
        return Err(PipelineError::Internal(format!(
            "no colours for {n} experts"
        )));
    }
    if values.len() != n * h * w {
        return Err(PipelineError::Internal(format!(
            "a {n}x{h}x{w} map has {} values",
            values.len()
        )));
    }
    let scale = scale.max(1);
    let (out_w, out_h) = (w * scale, h * scale);
    let mut rgb = vec![0u8; out_w * out_h * 3];
    for y in 0..out_h {
        for x in 0..out_w {
            let (my, mx) = (y / scale, x / scale);
            let mut colour = [0f32; 3];
            for (e, c) in EXPERT_COLOURS.iter().enumerate().take(n) {
                let weight = values[e * h * w + my * w + mx];
                for ch in 0..3 {
                    colour[ch] += weight * c[ch] as f32;
                }
            }
            let at = (y * out_w + x) * 3;
            for ch in 0..3 {
                rgb[at + ch] = colour[ch].round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    super::png::encode_rgb_png(&rgb, out_w, out_h, Some(("experts", legend)))
}

/// A legend naming each expert's colour, as text ("expert0 = #e41a1c, ...").
pub fn legend_text(names: &[String]) -> String {
    names
        .iter()
        .zip(EXPERT_COLOURS.iter())
        .map(|(n, c)| format!("{n} = #{:02x}{:02x}{:02x}", c[0], c[1], c[2]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An HTML page showing the heat maps `files` (one per aggregation point) with the legend.
pub fn maps_index_html(title: &str, names: &[String], files: &[String]) -> String {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut html = format!(
        "<!doctype html><meta charset=utf-8><title>{t}</title><style>body{{font-family:sans-serif}}\
         figure{{display:inline-block;margin:6px;text-align:center}}img{{image-rendering:pixelated;width:160px}}\
         .sw{{display:inline-block;width:14px;height:14px;margin:0 4px 0 12px;vertical-align:middle}}</style>\
         <h1>{t}</h1><p>Which expert the aggregators trusted where (colours mixed by weight):",
        t = escape(title)
    );
    for (n, c) in names.iter().zip(EXPERT_COLOURS.iter()) {
        html.push_str(&format!(
            "<span class=sw style=background:#{:02x}{:02x}{:02x}></span>{}",
            c[0],
            c[1],
            c[2],
            escape(n)
        ));
    }
    html.push_str("</p>");
    for (k, f) in files.iter().enumerate() {
        html.push_str(&format!(
            "<figure><img src=\"{}\"><figcaption>point {k}</figcaption></figure>",
            escape(f)
        ));
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn heatmap_mixes_expert_colours_by_weight() {
        // 2 experts, 1x2 map: pixel 0 all expert 0, pixel 1 half/half.
        let map = Tensor::from_vec(vec![1f32, 0.5, 0.0, 0.5], (2, 1, 2), &Device::Cpu).unwrap();
        let png = heatmap_png(&map, 1, "a, b").unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[0..3], &EXPERT_COLOURS[0]);
        let mid: Vec<u8> = (0..3)
            .map(|c| {
                ((EXPERT_COLOURS[0][c] as f32 + EXPERT_COLOURS[1][c] as f32) / 2.0).round() as u8
            })
            .collect();
        assert_eq!(&buf[3..6], mid.as_slice());
    }

    #[test]
    fn averaged_maps_are_the_mean_over_steps() {
        let dev = Device::Cpu;
        let mut c = MapCollector::default();
        let a = Tensor::full(0.2f32, (2, 2, 1, 1), &dev).unwrap();
        let b = Tensor::full(0.6f32, (2, 2, 1, 1), &dev).unwrap();
        c.push(MapsRequest::Averaged(MapPoints::ALL), vec![a])
            .unwrap();
        c.push(MapsRequest::Averaged(MapPoints::ALL), vec![b])
            .unwrap();
        match c.finish(2).unwrap() {
            Some(CollectedMaps::Averaged(m)) => {
                let v = m[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(v.iter().all(|x| (x - 0.4).abs() < 1e-6));
            }
            other => panic!("{other:?}"),
        }
    }
}
