//! `afa demo render` (a captioned dataset of the demonstration world, in the image-folder layout
//! `afa train` reads) and `afa demo judge` (the pixel judge's accuracy over such a folder, or
//! over any folder of generated images with the same `metadata.jsonl`).
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::demo::{Scene, Tally, judge, render};

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(subcommand)]
    pub command: DemoCommand,
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Draw K pictures of each of the 60 scenes into DIR (PNGs + metadata.jsonl).
    Render(RenderArgs),
    /// Judge the pictures listed in DIR/metadata.jsonl against their captions.
    Judge(JudgeArgs),
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// Pictures per scene.
    #[arg(long, default_value_t = 100)]
    pub per_combo: usize,
    /// Picture i (in file order) is drawn with seed `seed * 1_000_000 + i`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct JudgeArgs {
    #[arg(long)]
    pub dir: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    match &args.command {
        DemoCommand::Render(a) => render_dataset(a),
        DemoCommand::Judge(a) => judge_dir(a),
    }
}

fn render_dataset(args: &RenderArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let meta_path = args.out.join("metadata.jsonl");
    let mut meta = std::io::BufWriter::new(
        std::fs::File::create(&meta_path).with_context(|| meta_path.display().to_string())?,
    );
    let mut index = 0u64;
    for k in 0..args.per_combo {
        for scene in Scene::all() {
            let file = format!("{index:06}.png");
            let seed = args.seed.wrapping_mul(1_000_000).wrapping_add(index);
            render(&scene, seed)
                .save(args.out.join(&file))
                .with_context(|| file.clone())?;
            let line = serde_json::json!({
                "file_name": file, "text": scene.caption(), "colour": scene.colour.word(),
                "shape": scene.shape.word(), "position": scene.position.word(), "seed": seed,
                "copy": k,
            });
            writeln!(meta, "{line}")?;
            index += 1;
        }
    }
    meta.flush()?;
    println!("{index} pictures in {}", args.out.display());
    Ok(())
}

/// The images and asked scenes of a dataset folder (read like `afa train` reads it).
fn read_listing(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Scene)>> {
    crate::trainer::data::read_records(dir)?
        .into_iter()
        .map(|r| match Scene::from_caption(&r.caption) {
            Some(scene) => Ok((r.path, scene)),
            None => bail!("'{}' is not a caption of the demo world", r.caption),
        })
        .collect()
}

fn judge_dir(args: &JudgeArgs) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    for (path, scene) in read_listing(&args.dir)? {
        let img = image::open(&path)
            .with_context(|| path.display().to_string())?
            .to_rgb8();
        tally.add(judge(&img).score(&scene));
    }
    let names = ["colour", "shape", "position", "all_three"];
    if args.json {
        let mut obj = serde_json::Map::new();
        obj.insert("images".into(), tally.total.into());
        for (i, name) in names.iter().enumerate() {
            obj.insert((*name).into(), tally.accuracy(i).0.into());
        }
        println!("{}", serde_json::Value::Object(obj));
    } else {
        println!("{} images", tally.total);
        for (i, name) in names.iter().enumerate() {
            let (p, se) = tally.accuracy(i);
            println!("{name:>10}: {:6.2}% ± {:.2}", 100.0 * p, 100.0 * se);
        }
    }
    Ok(())
}
