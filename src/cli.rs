//! Command line: clap definitions of every subcommand and dispatch to `commands`.
use clap::{Parser, Subcommand};

use crate::commands;

/// afa: serve and run ensembles of Stable Diffusion 1.5 fine-tunes (AFA).
#[derive(Debug, Parser)]
#[command(name = "afa", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt with the embedded demonstration ensemble (the default), one
    /// model, or an
    /// ensemble (an official AFA folder as --model, or --config models.toml --ensemble NAME).
    Generate(Box<commands::generate::GenerateArgs>),
    /// Measure speed and memory of the full-size components and of AFA steps (random weights).
    Bench(commands::bench::BenchArgs),
    /// Convert aggregator checkpoints between the official folder layout and our single file.
    Convert(commands::convert::ConvertArgs),
    /// Serve the ensembles of models.toml over HTTP (native and OpenAI-compatible APIs).
    Serve(commands::serve::ServeArgs),
    /// Validate a models.toml (files, members, aggregators) and exit 0 or 1.
    CheckModels(commands::check_models::CheckModelsArgs),
    /// Train the SABW aggregators of an ensemble (frozen members; docs/training.md).
    Train(commands::train::TrainArgs),
    /// Estimate how much an aggregator could gain for a member set before training (§7.2).
    Probe(commands::probe::ProbeArgs),
    /// Create or upgrade the job database (serve also does this at start-up).
    Migrate(commands::migrate::MigrateArgs),
    /// The demonstration world: render a captioned dataset, judge pictures against captions.
    Demo(commands::demo::DemoArgs),
    /// Measure every mode of an ensemble on the demonstration world (loss, alignment, routing).
    Eval(commands::eval::EvalArgs),
    /// Manage the API keys of the job store (create prints the key once; list; revoke).
    Keys(commands::keys::KeysArgs),
}

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        crate::telemetry::init_warnings();
    }
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(&args),
        Command::Convert(args) => commands::convert::run(&args),
        Command::Bench(args) => commands::bench::run_bench(&args),
        Command::Serve(args) => commands::serve::run(&args),
        Command::CheckModels(args) => commands::check_models::run(&args),
        Command::Train(args) => commands::train::run(&args),
        Command::Probe(args) => commands::probe::run(&args),
        Command::Migrate(args) => commands::migrate::run(&args),
        Command::Keys(args) => commands::keys::run(&args),
        Command::Demo(args) => commands::demo::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    }
}

/// The error and its causes on one line, each cause once (our error types already print their
/// source), cut before any multi-line backtrace a candle error may carry.
fn one_line(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.lines().next().unwrap_or("").trim_end();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    if out.is_empty() {
        "unknown error".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_printed_once_on_one_line() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let load = crate::loading::LoadError::io(std::path::Path::new("x/vocab.json"), io);
        let e = anyhow::Error::new(load).context("loading the tokenizer");
        assert_eq!(
            one_line(&e),
            "loading the tokenizer: x/vocab.json: no such file"
        );
    }
}
