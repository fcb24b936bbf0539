//! Training data: images with captions, from
//! - an image folder with `metadata.jsonl` (`{"file_name": ..., "text": ...}` per line, the
//!   common image-folder convention) or `metadata.csv` (`file_name,text` header), or
//! - a `.jsonl` / `.csv` file listing `file_name` (or `path`/`image`) and `text` (or `caption`),
//!   paths relative to the listing's folder.
//!
//! Images are decoded once when the dataset opens; unreadable or truncated ones are skipped and
//! counted. A sample is resized so its shorter side is the training resolution (bilinear), then
//! cropped to a square (random offset in training, centred for validation, the probe and the
//! latent cache) and mapped to [-1, 1].
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;

use super::{Result, TrainerError};

/// One image and its caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub path: PathBuf,
    pub caption: String,
}

/// The readable records of a dataset, in listing order, and what was skipped.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub records: Vec<Record>,
    /// Skipped images with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Where the square crop sits inside the resized image: fractions of the free room (0.5, 0.5
/// is the centre).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crop {
    pub x: f64,
    pub y: f64,
}

impl Crop {
    pub const CENTER: Crop = Crop { x: 0.5, y: 0.5 };
}

fn pick<'a>(v: &'a serde_json::Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_str()))
}

const PATH_KEYS: [&str; 3] = ["file_name", "path", "image"];
const TEXT_KEYS: [&str; 3] = ["text", "caption", "prompt"];

fn read_jsonl(path: &Path, root: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| TrainerError::data(path, format!("line {}: {e}", i + 1)))?;
        let (Some(file), Some(caption)) = (pick(&v, &PATH_KEYS), pick(&v, &TEXT_KEYS)) else {
            return Err(TrainerError::data(
                path,
                format!("line {}: needs \"file_name\" and \"text\"", i + 1),
            ));
        };
        out.push(Record {
            path: root.join(file),
            caption: caption.to_string(),
        });
    }
    Ok(out)
}

/// Splits one CSV line (RFC 4180 quoting; no newlines inside fields).
fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

fn read_csv(path: &Path, root: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = csv_fields(lines.next().unwrap_or_default());
    let col = |keys: &[&str]| header.iter().position(|h| keys.contains(&h.trim()));
    let (Some(pc), Some(tc)) = (col(&PATH_KEYS), col(&TEXT_KEYS)) else {
        return Err(TrainerError::data(
            path,
            "the header needs a file_name (or path) and a text (or caption) column",
        ));
    };
    lines
        .enumerate()
        .map(|(i, line)| {
            let f = csv_fields(line);
            match (f.get(pc), f.get(tc)) {
                (Some(p), Some(t)) => Ok(Record {
                    path: root.join(p),
                    caption: t.clone(),
                }),
                _ => Err(TrainerError::data(path, format!("row {} is short", i + 2))),
            }
        })
        .collect()
}

/// The records `data` lists (a folder with `metadata.jsonl`/`metadata.csv`, or a listing file).
pub fn read_records(data: &Path) -> Result<Vec<Record>> {
    let (listing, root) = if data.is_dir() {
        let jsonl = data.join("metadata.jsonl");
        let csv = data.join("metadata.csv");
        if jsonl.is_file() {
            (jsonl, data.to_path_buf())
        } else if csv.is_file() {
            (csv, data.to_path_buf())
        } else {
            return Err(TrainerError::data(
                data,
                "no metadata.jsonl or metadata.csv in the folder",
            ));
        }
    } else if data.is_file() {
        let root = data.parent().unwrap_or(Path::new(".")).to_path_buf();
        (data.to_path_buf(), root)
    } else {
        return Err(TrainerError::data(data, "no such file or folder"));
    };
    let records = match listing.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("csv") => read_csv(&listing, &root)?,
        _ => read_jsonl(&listing, &root)?,
    };
    if records.is_empty() {
        return Err(TrainerError::data(&listing, "lists no images"));
    }
    Ok(records)
}

fn decode(path: &Path) -> std::result::Result<image::DynamicImage, String> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    reader.decode().map_err(|e| e.to_string())
}

impl Dataset {
    /// Reads the listing of `data` and decodes every image once, skipping (and counting) the
    /// ones that cannot be read.
    pub fn open(data: &Path) -> Result<Self> {
        let mut records = Vec::new();
        let mut skipped = Vec::new();
        for r in read_records(data)? {
            match decode(&r.path) {
                Ok(img) if img.width() > 0 && img.height() > 0 => records.push(r),
                Ok(_) => skipped.push((r.path, "empty image".to_string())),
                Err(e) => skipped.push((r.path, e)),
            }
        }
        if records.is_empty() {
            return Err(TrainerError::data(data, "no readable images"));
        }
        Ok(Self { records, skipped })
    }
}

/// Loads `path` as a `[3, size, size]` f32 tensor in [-1, 1]: shorter side resized to `size`
/// (bilinear), then the square at `crop`.
pub fn load_pixels(path: &Path, size: usize, crop: Crop, device: &Device) -> Result<Tensor> {
    let img = decode(path).map_err(|e| TrainerError::data(path, e))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = if w <= h {
        (size, (h * size / w).max(size))
    } else {
        ((w * size / h).max(size), size)
    };
    let resized = img
        .resize_exact(nw as u32, nh as u32, FilterType::Triangle)
        .to_rgb8();
    let x0 = ((nw - size) as f64 * crop.x.clamp(0.0, 1.0)).round() as usize;
    let y0 = ((nh - size) as f64 * crop.y.clamp(0.0, 1.0)).round() as usize;
    let mut data = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel((x0 + x) as u32, (y0 + y) as u32);
            for c in 0..3 {
                data[c * size * size + y * size + x] = p[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(data, (3, size, size), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting() {
        assert_eq!(
            csv_fields(r#"a.png,"a ""red"", big cat""#),
            vec!["a.png".to_string(), r#"a "red", big cat"#.to_string()]
        );
    }

    #[test]
    fn resize_and_crop() {
        let dir = std::env::temp_dir().join(format!("afa-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = image::RgbImage::from_fn(40, 20, |x, _| {
            image::Rgb([if x < 20 { 0 } else { 255 }, 0, 0])
        });
        img.save(dir.join("a.png")).unwrap();
        std::fs::write(dir.join("b.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
        std::fs::write(
            dir.join("metadata.jsonl"),
            "{\"file_name\": \"a.png\", \"text\": \"left black\"}\n{\"file_name\": \"b.png\", \"text\": \"bad\"}\n",
        )
        .unwrap();
        let ds = Dataset::open(&dir).unwrap();
        assert_eq!(ds.records.len(), 1);
        assert_eq!(ds.skipped.len(), 1);
        let left = load_pixels(
            &ds.records[0].path,
            10,
            Crop { x: 0.0, y: 0.0 },
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(left.dims(), &[3, 10, 10]);
        let red = left
            .get(0)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(red < -0.9, "{red}");
        let right = load_pixels(
            &ds.records[0].path,
            10,
            Crop { x: 1.0, y: 0.0 },
            &Device::Cpu,
        )
        .unwrap();
        let red = right
            .get(0)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(red > 0.9, "{red}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
