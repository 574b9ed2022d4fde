//! The model commands: import, export, score, generate, fetch, info.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::json;
use shears_core::gguf_export::{write_llama_gguf, GgufQuant};
use shears_core::{hub, ChatMessage, DType, ModelFiles};
use shears_models::generate::{self, SamplingConfig, Scored};
use shears_models::{dispatch, load, BackendKind, BackendTask};
use shears_pruning::memory::{
    parse_bytes, Checkpointing, DeviceKind, Kernels, MemorySettings, Precision, StatePrecision,
};
use shears_trainer::config::{defaults_toml, read_toml, StageKind};
use shears_trainer::PruneConfig;

fn log(msg: &str) {
    eprintln!("{msg}");
}

/// Resolve a `--model` argument and load it into host memory.
pub fn load_model_files(arg: &str) -> Result<ModelFiles> {
    let path = hub::resolve_model(arg, log)?;
    let files =
        ModelFiles::load(&path).with_context(|| format!("cannot load model {}", path.display()))?;
    for w in files.tokenizer.iter().flat_map(|t| &t.warnings) {
        eprintln!("warning: {w}");
    }
    Ok(files)
}

/// `shears import`.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// HF model directory, `.gguf` file, or a known model name (smollm2).
    pub src: String,
    /// Output directory (must not already hold a model unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Store weights as f32, f16 or bf16 (default: as read; GGUF is dequantised to f32).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Replace an existing model in --out.
    #[arg(long)]
    pub force: bool,
}

pub fn import(a: ImportArgs) -> Result<()> {
    let ImportArgs {
        src,
        out,
        dtype,
        force,
    } = a;
    let files = load_model_files(&src)?;
    let dir = files
        .write_hf_dir(&out, dtype, force)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "imported {} ({} layers, {} parameters) into {}",
        files.source.display(),
        files.layers.len(),
        files.weights.values().map(|t| t.numel()).sum::<usize>(),
        dir.display()
    );
    Ok(())
}

struct ExportTask {
    files: ModelFiles,
    dtype: DType,
}

impl BackendTask for ExportTask {
    type Output = shears_core::Result<ModelFiles>;
    fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Self::Output {
        let model = load::from_files::<B>(&self.files, &device, DType::F32)?;
        let mut files = self.files;
        files.weights = load::to_weights(&model, self.dtype);
        files.layers = load::layer_shapes(&model);
        Ok(files)
    }
}

/// Export formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// An HF directory (config.json, model.safetensors, tokenizer files): transformers loads it.
    Hf,
    /// One GGUF v3 file (llama.cpp, ollama, LM Studio).
    Gguf,
}

/// `shears export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// HF model directory, `.gguf` file, or a known model name.
    pub model: String,
    /// Output directory (hf) or file (gguf).
    #[arg(long)]
    pub out: PathBuf,
    /// Output format (default: gguf when --out ends in .gguf, else hf).
    #[arg(long, value_enum)]
    pub format: Option<ExportFormat>,
    /// hf: store weights as f32, f16 or bf16 (default f32).
    #[arg(long, conflicts_with = "quant")]
    pub dtype: Option<DType>,
    /// gguf: weight matrices as f32, f16, bf16, q8_0, q4_0 or q4_1 (default f16); norms stay
    /// f32, and rows that are not whole 32-element blocks fall back to f16.
    #[arg(long)]
    pub quant: Option<GgufQuant>,
    /// gguf: the model name written into `general.name` (default: the output file's stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace an existing model at --out.
    #[arg(long)]
    pub force: bool,
}

pub fn export(backend: BackendKind, a: ExportArgs) -> Result<()> {
    let ExportArgs {
        model,
        out,
        format,
        dtype,
        quant,
        name,
        force,
    } = a;
    let is_gguf_name = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let format = format.unwrap_or(if is_gguf_name {
        ExportFormat::Gguf
    } else {
        ExportFormat::Hf
    });
    if format == ExportFormat::Hf && (quant.is_some() || name.is_some()) {
        bail!("--quant and --name are GGUF options; add --format gguf (or name the output *.gguf)");
    }
    if format == ExportFormat::Gguf && dtype.is_some() {
        bail!("--dtype is an HF option; for GGUF use --quant f32|f16|bf16|q8_0|q4_0|q4_1");
    }
    let files = load_model_files(&model)?;
    let dtype = dtype.unwrap_or(DType::F32);
    // Through Shears' model (as the HF export): the weights written are the ones it runs.
    let files = dispatch(backend, ExportTask { files, dtype })??;
    match format {
        ExportFormat::Hf => {
            let dir = files
                .write_hf_dir(&out, None, force)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("exported to {}", dir.display());
        }
        ExportFormat::Gguf => {
            let quant = quant.unwrap_or(GgufQuant::F16);
            let name = name.unwrap_or_else(|| {
                out.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
            let r = write_llama_gguf(&files, quant, &name, &out, force)
                .with_context(|| format!("cannot write {}", out.display()))?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            let types: Vec<String> = r
                .tensors_by_type
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect();
            eprintln!(
                "exported {} ({:.1} MB; tensors: {}) to {}",
                name,
                r.bytes as f64 / 1e6,
                types.join(", "),
                out.display()
            );
        }
    }
    Ok(())
}

struct ScoreTask {
    files: ModelFiles,
    ids: Vec<u32>,
    dtype: DType,
}

impl BackendTask for ScoreTask {
    type Output = shears_core::Result<Scored>;
    fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Self::Output {
        let model = load::from_files::<B>(&self.files, &device, self.dtype)?;
        model.check_context(self.ids.len())?;
        Ok(generate::score(&model, &self.ids))
    }
}

/// Refuse token ids the model has no embedding for (a tokenizer that does not belong to the
/// model), naming the tokenizer, instead of failing inside the backend's gather.
fn check_ids(ids: &[u32], files: &ModelFiles, model: &str) -> Result<()> {
    let v = files.config.vocab_size;
    if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &i)| i as usize >= v) {
        bail!(
            "token id {id} (position {pos}) from the tokenizer of {model} is outside the model's vocabulary of {v}; the tokenizer does not belong to this model"
        );
    }
    Ok(())
}

/// `shears score`.
#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// HF model directory, `.gguf` file, or a known model name.
    #[arg(long)]
    pub model: String,
    /// File with the text to score (read as is).
    #[arg(long, conflicts_with = "text")]
    pub text_file: Option<PathBuf>,
    /// Text to score.
    #[arg(long)]
    pub text: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Parameter dtype on the device (f32, bf16, f16).
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
}

pub fn score(backend: BackendKind, a: ScoreArgs) -> Result<()> {
    let ScoreArgs {
        model,
        text_file,
        text,
        json: as_json,
        dtype,
    } = a;
    let model = model.as_str();
    let text = match (text_file, text) {
        (Some(f), _) => shears_core::fsutil::read_text(&f, shears_core::fsutil::TEXT_FILE_BYTES)?,
        (None, Some(t)) => t,
        (None, None) => bail!("give the text with --text-file or --text"),
    };
    let files = load_model_files(model)?;
    let ids = files.tokenizer()?.encode(&text, true)?;
    check_ids(&ids, &files, model)?;
    if ids.len() < 2 {
        bail!(
            "the text is {} token(s) long; scoring needs at least two",
            ids.len()
        );
    }
    let scored = dispatch(
        backend,
        ScoreTask {
            files,
            ids: ids.clone(),
            dtype,
        },
    )??;
    let mean = scored.mean_nll();
    let top = scored.top_logits(10);
    if as_json {
        let v = json!({
            "token_ids": ids,
            "nll": scored.nll,
            "mean_nll": mean,
            "perplexity": mean.exp(),
            "top_logits": top.iter().map(|(i, l)| json!([i, l])).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        println!("tokens:      {}", ids.len());
        println!("mean NLL:    {mean:.6} nats/token");
        println!("perplexity:  {:.4}", mean.exp());
        println!("top next tokens after the text:");
        for (id, logit) in top.iter().take(5) {
            println!("  {id:>7}  {logit:>9.4}");
        }
    }
    Ok(())
}

struct GenerateTask {
    files: ModelFiles,
    prompt: Vec<u32>,
    cfg: SamplingConfig,
    stop: Vec<u32>,
    dtype: DType,
}

impl BackendTask for GenerateTask {
    type Output = shears_core::Result<Vec<u32>>;
    fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Self::Output {
        let model = load::from_files::<B>(&self.files, &device, self.dtype)?;
        model.check_context(self.prompt.len().saturating_add(self.cfg.max_new_tokens))?;
        let tok = self.files.tokenizer()?.inner();
        let mut stream = tok.decode_stream(true);
        let mut stdout = std::io::stdout();
        let out = generate::generate(&model, &self.prompt, self.cfg, &self.stop, |id| {
            if let Ok(Some(piece)) = stream.step(id) {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
            true
        });
        let _ = writeln!(stdout);
        Ok(out)
    }
}

/// `shears generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// HF model directory, `.gguf` file, or a known model name.
    #[arg(long)]
    pub model: String,
    /// The prompt (or the user message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Parameter dtype on the device (f32, bf16, f16).
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
}

pub fn generate(backend: BackendKind, a: GenerateArgs) -> Result<()> {
    let (model, prompt, chat, system, dtype) = (&a.model, &a.prompt, a.chat, a.system, a.dtype);
    let cfg = SamplingConfig {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
    };
    // Sampling settings are checked before anything is loaded (NaN fails every comparison).
    if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
        bail!(
            "--temperature {}: must be a finite number ≥ 0 (0 is greedy)",
            cfg.temperature
        );
    }
    if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
        bail!("--top-p {}: must be in (0, 1]", cfg.top_p);
    }
    let files = load_model_files(model)?;
    let tok = files.tokenizer()?;
    let ids = if chat {
        let mut messages = vec![];
        if let Some(s) = system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt.to_string(),
        });
        let text = render_chat_template(&tok.chat()?, &messages)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    };
    if ids.is_empty() {
        bail!("the prompt tokenizes to nothing");
    }
    check_ids(&ids, &files, model)?;
    let mut stop = files.config.eos_token_ids();
    if let Some(id) = tok.eos_token().and_then(|t| tok.token_to_id(&t)) {
        stop.push(id);
    }
    let generated = dispatch(
        backend,
        GenerateTask {
            files,
            prompt: ids,
            cfg,
            stop,
            dtype,
        },
    )??;
    eprintln!("[{} tokens]", generated.len());
    Ok(())
}

/// `shears fetch`.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// Model name (smollm2).
    pub name: String,
}

pub fn fetch(a: FetchArgs) -> Result<()> {
    let name = a.name;
    let m = hub::known(&name).with_context(|| {
        format!(
            "unknown model '{name}' (known: {})",
            hub::KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let path = hub::ensure(&m, log)?;
    println!("{}", path.display());
    Ok(())
}

/// `shears info`.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// HF model directory, `.gguf` file, or a known model name.
    pub model: String,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let files = load_model_files(&a.model)?;
    let c = &files.config;
    let total: usize = files.weights.values().map(|t| t.numel()).sum();
    println!("source:        {}", files.source.display());
    println!("architecture:  {}", c.architectures.join(", "));
    println!(
        "shape:         {} layers, hidden {}, {} heads / {} kv heads x {}, intermediate {}, vocab {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim(),
        c.intermediate_size,
        c.vocab_size
    );
    println!("rope:          {:?}", c.rope().map_err(anyhow::Error::msg)?);
    println!("tied head:     {}", c.tie_word_embeddings);
    println!("uniform:       {}", files.is_uniform());
    println!("parameters:    {total}");
    match &files.tokenizer {
        Some(t) => println!(
            "tokenizer:     {} tokens, chat template: {}",
            t.vocab_size(),
            t.chat_template().is_some()
        ),
        None => println!("tokenizer:     none"),
    }
    Ok(())
}

/// `shears defaults`.
#[derive(clap::Args, Debug)]
pub struct DefaultsArgs {
    /// Which plan: `prune` (the L0 stage) or `train` (continued pre-training).
    pub stage: StageName,
}

/// A stage, as the command line names it.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum StageName {
    Prune,
    Train,
}

/// The text `shears defaults STAGE` prints (the README's block is this, checked by a test).
pub fn defaults_text(stage: StageName) -> String {
    let kind = match stage {
        StageName::Prune => StageKind::Prune,
        StageName::Train => StageKind::Train,
    };
    format!(
        "# Every setting of a `shears {}` plan with its default (besides model, data{}).\n{}",
        kind.name(),
        if kind == StageKind::Prune {
            " and [target]"
        } else {
            ""
        },
        defaults_toml(kind)
    )
}

pub fn defaults(a: DefaultsArgs) -> Result<()> {
    print!("{}", defaults_text(a.stage));
    Ok(())
}

/// `shears plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A pruning run plan (the TOML `shears prune` reads): its model, `[target]`, masked
    /// modules and `[run]` settings (batch, micro-batch, seq_len, precision, optimizer state,
    /// checkpointing, backend) are what is planned; the flags below override them.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Source model (HF directory, `.gguf`, known name) or its `config.json` (default: the
    /// run plan's `model`).
    #[arg(long, required_unless_present = "config")]
    pub source: Option<String>,
    /// Target shape: a TOML file, or an existing model's `config.json` / directory (default:
    /// the run plan's `[target]`).
    #[arg(long, required_unless_present = "config")]
    pub target: Option<PathBuf>,
    /// Pruned modules (default: every module whose target differs): hidden, layer,
    /// intermediate, kv_heads, query_heads.
    #[arg(long, value_delimiter = ',')]
    pub modules: Vec<shears_pruning::PruneModule>,
    /// Sequences per optimizer step on one device (default: the plan's, else 8).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Sequences per forward (divides the batch; default: the plan's, else the batch).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Tokens per sequence (default: the plan's, else 4096).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per evaluation forward (default: the plan's `run.eval_batch`, else 8).
    #[arg(long)]
    pub eval_batch: Option<usize>,
    /// Tokens per evaluation sequence (default: the plan's `run.eval_seq_len`, else seq_len).
    #[arg(long)]
    pub eval_seq_len: Option<usize>,
    /// Data-parallel devices (default: the plan's `run.devices`, else 1): the memory is per
    /// device (each holds a full replica); the report adds how the global batch splits.
    #[arg(long)]
    pub devices: Option<usize>,
    /// f32 or bf16-mixed (f32 master weights, bf16 forward and backward). Default: the plan's,
    /// else bf16-mixed on a cuda device and f32 on cpu.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Precision of AdamW's moments: f32 or bf16 (default: the plan's, else f32).
    #[arg(long)]
    pub optimizer_state: Option<StatePrecision>,
    /// Activation checkpointing: none, or layers (keep each layer's input, recompute the
    /// rest). Default: the plan's, else none.
    #[arg(long)]
    pub checkpointing: Option<Checkpointing>,
    /// Kernels: generic (burn's composition: a [t, t] score matrix per head, f32 logits kept)
    /// or fused (flash-style attention, fused norms and LM-head loss, as on the CPU backend in
    /// f32). Default: fused for a plan on the flex backend in f32, else generic.
    #[arg(long)]
    pub kernels: Option<Kernels>,
    /// Device kind, for the runtime's own memory: cuda or cpu (default: cpu for a plan on a
    /// CPU backend, else cuda).
    #[arg(long)]
    pub device: Option<DeviceKind>,
    /// The device's memory (e.g. 141GB, 80GiB): says whether the run fits, and the largest
    /// micro-batch that does.
    #[arg(long, value_parser = parse_bytes)]
    pub device_memory: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let cfg: Option<PruneConfig> = a.config.as_deref().map(read_toml).transpose()?;
    let run = cfg.as_ref().map(|c| c.run.clone()).unwrap_or_default();
    let source = match (&a.source, &cfg) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c.model.clone(),
        (None, None) => bail!("--source is required without --config"),
    };
    let path = hub::resolve_model(&source, log)?;
    let config = shears_core::model_files::load_config(&path)?;
    let target = match (&a.target, &cfg) {
        (Some(t), _) => shears_pruning::TargetShape::from_file(t)?,
        (None, Some(c)) => c.target,
        (None, None) => bail!("--target is required without --config"),
    };
    let plan_modules = cfg.as_ref().and_then(|c| c.pruning.modules.clone());
    let modules = if a.modules.is_empty() {
        plan_modules
    } else {
        Some(a.modules.clone())
    };
    let backend = run
        .backend
        .as_deref()
        .map(|b| b.parse::<BackendKind>().map_err(anyhow::Error::msg))
        .transpose()
        .context("run.backend")?;
    let device = a.device.unwrap_or(match backend {
        Some(b) if b.is_cpu() => DeviceKind::Cpu,
        _ => DeviceKind::Cuda,
    });
    let precision = a.precision.or(run.precision).unwrap_or(match device {
        DeviceKind::Cuda => Precision::Bf16Mixed,
        DeviceKind::Cpu => Precision::F32,
    });
    let kernels = a.kernels.unwrap_or(
        if backend == Some(BackendKind::Flex) && precision == Precision::F32 {
            Kernels::Fused
        } else {
            Kernels::Generic
        },
    );
    let batch = a
        .batch
        .or(cfg.as_ref().map(|_| run.batch_size))
        .unwrap_or(8);
    let settings = MemorySettings {
        batch,
        micro_batch: a.micro_batch.or(run.micro_batch),
        seq_len: a.seq_len.or(run.seq_len).unwrap_or(4096),
        precision,
        optimizer_state: a.optimizer_state.unwrap_or(run.optimizer_state),
        checkpointing: a.checkpointing.unwrap_or(run.checkpointing),
        kernels,
        device,
        device_memory: a.device_memory,
        eval_batch: a.eval_batch.unwrap_or(run.eval_batch),
        eval_seq_len: a.eval_seq_len.or(run.eval_seq_len),
        devices: a.devices.unwrap_or(run.devices),
    };
    let report = shears_pruning::plan::plan_configs(&config, target, modules.as_deref(), &settings)
        .with_context(|| format!("cannot prune {} to that target", path.display()))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

/// Address space a chat template may use, in MiB: the template runs in a child process under
/// this limit, because minijinja's instruction budget does not bound what a template builds in
/// memory (captured blocks, concatenation).
const CHAT_TEMPLATE_MIB: u64 = 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct ChatRequest {
    template: shears_core::ChatTemplate,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
}

/// Render `template` for `messages` (with the generation prompt) in a child process (this
/// binary's `render-chat-template`) under an address-space limit; in-process, with the same
/// instruction and output limits, where no `sh` exists to set the limit.
fn render_chat_template(
    template: &shears_core::ChatTemplate,
    messages: &[ChatMessage],
) -> Result<String> {
    use std::process::{Command, Stdio};
    let request = serde_json::to_vec(&ChatRequest {
        template: template.clone(),
        messages: messages.to_vec(),
        add_generation_prompt: true,
    })?;
    let exe = std::env::current_exe().context("cannot find the shears binary")?;
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {} && exec \"$0\" render-chat-template",
            CHAT_TEMPLATE_MIB * 1024
        ))
        .arg(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        return Ok(template.render(messages, true)?);
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A child that fails early closes its end; its status says why.
        let _ = stdin.write_all(&request);
    }
    let out = child
        .wait_with_output()
        .context("the chat template renderer did not run")?;
    if out.status.success() {
        return String::from_utf8(out.stdout)
            .map_err(|_| anyhow::anyhow!("chat template produced invalid UTF-8"));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    match err.lines().find_map(|l| l.strip_prefix("error: ")) {
        Some(msg) if out.status.code() == Some(1) => bail!("{msg}"),
        _ => bail!(
            "chat template failed: it needed more than {CHAT_TEMPLATE_MIB} MiB of memory (or the renderer died: {})",
            out.status
        ),
    }
}

/// `shears render-chat-template`: a [`ChatRequest`] on stdin, the text on stdout.
pub fn render_chat_template_child() -> Result<()> {
    use std::io::Read;
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("cannot read the request")?;
    let r: ChatRequest = serde_json::from_slice(&input).context("invalid request")?;
    let text = r.template.render(&r.messages, r.add_generation_prompt)?;
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("cannot write the text")?;
    Ok(())
}
