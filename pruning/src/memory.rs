//! The memory a training or pruning run needs per device, from the model's shape and the run's
//! settings alone: what `shears plan` prints and whether a run fits a device.
//!
//! The model counts what the loop keeps alive at its peak, the end of a micro-batch's backward
//! pass:
//!
//! - **weights**: the parameters in f32; under `bf16-mixed` the parameters are the f32 **master
//!   weights** and the forward casts each to bf16 where it is used (autocast), so the weights
//!   term is those bf16 copies, all of them alive at the start of the backward pass, or one
//!   checkpointing segment's with `checkpointing = "layers"`;
//! - **gradients** as backward returns them: f32 under every precision (autocast's cast hands
//!   the gradient back in the master's dtype), all of them, or one segment's with layer
//!   checkpointing; plus an f32 **gradient accumulator** when a step runs several micro-batches
//!   or when layer checkpointing sums its segments' gradients;
//! - **optimizer state**: AdamW's two moments, f32 or bf16 (`optimizer_state`);
//! - **masks**: every `log_alpha` and Lagrange multiplier with gradient and both moments, always f32;
//! - **activations**: the larger of what a training step keeps for its backward pass (see
//!   [`activation_bytes`]) and what an evaluation forward holds at once (see
//!   [`eval_activation_bytes`]); evaluation runs between steps, when no gradient is alive, so
//!   counting the gradients beside it overstates that phase, never understates it;
//! - **workspace**: the runtime's own memory ([`DeviceKind`]: 1 GiB on a GPU, 0.25 GiB on the host)
//!   plus a tenth of the activations for the transient tensors of one op and allocator slack.
//!
//! Every figure is checked arithmetic: a size that does not fit in 64 bits is an error.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::size::Dims;

/// Upper bounds on the settings a memory plan takes, the same a run plan checks: far above any
/// real run, they keep every product of them inside 64 bits and every search over them short.
pub mod limits {
    /// Sequences per step, per forward, per eval forward.
    pub const BATCH: usize = 1 << 24;
    /// Data-parallel devices.
    pub const DEVICES: usize = 1024;
}

/// Numeric precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 weights and activations, f32 master weights, reductions and optimizer step.
    Bf16Mixed,
}

/// Precision of AdamW's moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StatePrecision {
    #[default]
    F32,
    /// Half the optimizer memory.
    Bf16,
}

/// What the backward pass keeps of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Checkpointing {
    /// Every intermediate tensor of every layer.
    #[default]
    None,
    /// Each decoder layer's input only; a layer's intermediates are recomputed during its
    /// backward pass (one layer's worth alive at a time).
    Layers,
}

/// Which kernels run the layer's hot operations; it decides what the backward pass keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Kernels {
    /// burn's generic composition of tensor ops (ndarray, wgpu and cuda today): attention keeps
    /// a `[t, t]` score and probability matrix per head, the loss keeps the f32 logits.
    #[default]
    Generic,
    /// Shears' fused kernels (the default CPU backend today): flash-style attention keeping one
    /// log-sum-exp per row, fused RMSNorm, RoPE and SwiGLU, and the LM head fused with the
    /// cross-entropy so the logits are never kept.
    Fused,
}

/// The device kind, for the runtime's own memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// A GPU: 1 GiB for the context, compiled kernels and GEMM workspaces.
    #[default]
    Cuda,
    /// The host: 0.25 GiB for the process (binary, tokenizer, memory-mapped data).
    Cpu,
}

impl DeviceKind {
    fn runtime_bytes(self) -> u64 {
        match self {
            DeviceKind::Cuda => 1 << 30,
            DeviceKind::Cpu => 1 << 28,
        }
    }
}

macro_rules! names {
    ($t:ty, $what:literal, $($v:ident = $s:literal),+) => {
        impl $t {
            /// Every accepted spelling.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
            pub fn name(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(Self::$v),)+
                    _ => Err(format!(
                        "unknown {} {s:?}: expected one of {}",
                        $what,
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }
    };
}
names!(
    Precision,
    "precision",
    F32 = "f32",
    Bf16Mixed = "bf16-mixed"
);
names!(
    StatePrecision,
    "optimizer state precision",
    F32 = "f32",
    Bf16 = "bf16"
);
names!(
    Checkpointing,
    "checkpointing",
    None = "none",
    Layers = "layers"
);
names!(Kernels, "kernels", Generic = "generic", Fused = "fused");
names!(DeviceKind, "device kind", Cuda = "cuda", Cpu = "cpu");

/// The run settings that decide memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemorySettings {
    /// Sequences per optimizer step: the global batch, over all `devices`.
    pub batch: usize,
    /// Sequences per forward (divides `batch`); `None`: `batch`.
    pub micro_batch: Option<usize>,
    /// Tokens per sequence.
    pub seq_len: usize,
    pub precision: Precision,
    pub optimizer_state: StatePrecision,
    pub checkpointing: Checkpointing,
    pub kernels: Kernels,
    pub device: DeviceKind,
    /// The device's memory in bytes, to say whether the run fits.
    pub device_memory: Option<u64>,
    /// Sequences per evaluation forward (`run.eval_batch`).
    pub eval_batch: usize,
    /// Tokens per evaluation sequence (`run.eval_seq_len`); `None`: `seq_len`.
    pub eval_seq_len: Option<usize>,
    /// Data-parallel devices (`run.devices`), each with a full replica: the memory per device
    /// does not change with it, the micro-batches of a step are dealt out to the devices.
    pub devices: usize,
}

impl MemorySettings {
    /// f32, no checkpointing, generic kernels on a GPU, one forward per step.
    pub fn new(batch: usize, seq_len: usize) -> Self {
        MemorySettings {
            batch,
            micro_batch: None,
            seq_len,
            precision: Precision::F32,
            optimizer_state: StatePrecision::F32,
            checkpointing: Checkpointing::None,
            kernels: Kernels::Generic,
            device: DeviceKind::Cuda,
            device_memory: None,
            eval_batch: 8,
            eval_seq_len: None,
            devices: 1,
        }
    }

    /// Micro-batches per step on the busiest device.
    pub fn micro_batches_per_device(&self) -> usize {
        (self.batch / self.micro().max(1)).div_ceil(self.devices.max(1))
    }

    /// Tokens per evaluation sequence.
    pub fn eval_len(&self) -> usize {
        self.eval_seq_len.unwrap_or(self.seq_len)
    }

    /// Sequences per forward.
    pub fn micro(&self) -> usize {
        self.micro_batch.unwrap_or(self.batch)
    }

    fn check(&self) -> Result<(), String> {
        for (name, v, most) in [
            ("batch", self.batch, limits::BATCH),
            ("micro-batch", self.micro(), limits::BATCH),
            ("eval batch", self.eval_batch, limits::BATCH),
            (
                "seq_len",
                self.seq_len,
                shears_core::config::limits::POSITIONS,
            ),
            (
                "eval seq_len",
                self.eval_len(),
                shears_core::config::limits::POSITIONS,
            ),
            ("devices", self.devices, limits::DEVICES),
        ] {
            if v > most {
                return Err(format!(
                    "{name} = {v} is beyond the most a run takes ({most})"
                ));
            }
        }
        let m = self.micro();
        if self.batch == 0 || self.seq_len == 0 || m == 0 {
            return Err(format!(
                "batch ({}), micro-batch ({m}) and seq_len ({}) must be at least 1",
                self.batch, self.seq_len
            ));
        }
        if self.eval_batch == 0 || self.eval_len() == 0 {
            return Err(format!(
                "eval batch ({}) and eval seq_len ({}) must be at least 1",
                self.eval_batch,
                self.eval_len()
            ));
        }
        if !self.batch.is_multiple_of(m) {
            return Err(format!(
                "micro-batch ({m}) must divide batch ({})",
                self.batch
            ));
        }
        if self.devices == 0 || self.batch / m < self.devices {
            return Err(format!(
                "{} device(s) need at least one micro-batch each, and batch {} / micro-batch {m} gives {}",
                self.devices,
                self.batch,
                self.batch / m
            ));
        }
        Ok(())
    }
}

/// Bytes per device, by what holds them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryReport {
    pub settings: MemorySettings,
    pub weights: u64,
    pub master_weights: u64,
    pub gradients: u64,
    pub gradient_accumulator: u64,
    pub optimizer_state: u64,
    pub masks: u64,
    /// The larger of `step_activations` and `eval_activations`.
    pub activations: u64,
    /// What one micro-batch's forward keeps for its backward pass.
    pub step_activations: u64,
    /// What one evaluation forward holds at its peak.
    pub eval_activations: u64,
    pub workspace: u64,
    /// A distillation teacher's share (see [`teacher_bytes`]); 0 without one.
    pub teacher: u64,
    pub total: u64,
    /// `total <= device_memory`, when a device memory was given.
    pub fits: Option<bool>,
    /// The largest micro-batch (a divisor of `batch`) whose total fits the device, when a device
    /// memory was given; `None` there when not even one sequence fits.
    pub max_micro_batch: Option<usize>,
}

impl MemoryReport {
    /// Every term of the total, named as the report prints it.
    pub fn parts(&self) -> [(&'static str, u64); 9] {
        [
            ("weights", self.weights),
            ("master weights (f32)", self.master_weights),
            ("gradients", self.gradients),
            ("gradient accumulator (f32)", self.gradient_accumulator),
            ("optimizer state", self.optimizer_state),
            ("masks and multipliers", self.masks),
            ("activations", self.activations),
            ("workspace", self.workspace),
            ("distillation teacher", self.teacher),
        ]
    }

    /// The human-readable block of `shears plan`.
    pub fn render(&self) -> String {
        let s = &self.settings;
        let mut o = format!(
            "\nmemory per device ({}): batch {} (micro-batch {}) x {} tokens, eval batch {} x {} tokens, precision {}, optimizer state {}, checkpointing {}, kernels {}\n",
            s.device,
            s.batch,
            s.micro(),
            s.seq_len,
            s.eval_batch,
            s.eval_len(),
            s.precision,
            s.optimizer_state,
            s.checkpointing,
            s.kernels
        );
        if s.devices > 1 {
            o += &format!(
                "  on each of {} devices (full replicas): global batch {} = {} micro-batches of {} per step, {} per device\n",
                s.devices,
                s.batch,
                s.batch / s.micro(),
                s.micro(),
                s.micro_batches_per_device()
            );
        }
        let parts = self
            .parts()
            .into_iter()
            .filter(|&(n, b)| b > 0 || n != "distillation teacher");
        for (name, b) in parts.chain([("total", self.total)]) {
            o += &format!("  {name:<27} {:>12}", gib(b));
            if name == "activations" {
                o += &format!(
                    "  (larger of step {}, eval {})",
                    gib(self.step_activations),
                    gib(self.eval_activations)
                );
            }
            o += "\n";
        }
        if let (Some(device), Some(fits)) = (s.device_memory, self.fits) {
            o += &format!(
                "  {} a device of {}\n",
                if fits { "fits" } else { "does not fit" },
                gib(device)
            );
            o += &match self.max_micro_batch {
                Some(m) => {
                    format!("  largest micro-batch that fits (a divisor of the batch): {m}\n")
                }
                None => {
                    let levers: Vec<&str> = [
                        (s.precision == Precision::F32, "--precision bf16-mixed"),
                        (
                            s.optimizer_state == StatePrecision::F32,
                            "--optimizer-state bf16",
                        ),
                        (
                            s.checkpointing == Checkpointing::None,
                            "--checkpointing layers",
                        ),
                        (s.kernels == Kernels::Generic, "--kernels fused"),
                    ]
                    .into_iter()
                    .filter_map(|(off, flag)| off.then_some(flag))
                    .collect();
                    format!(
                        "  not even a micro-batch of one sequence fits: lower seq_len{}\n",
                        if levers.is_empty() {
                            String::new()
                        } else {
                            format!(", or try {}", levers.join(", "))
                        }
                    )
                }
            };
        }
        o
    }
}

/// Elements a decoder layer of the pruning stage keeps per token for its backward pass.
///
/// Fused kernels (counted from what each backward node saves): the layer input and the two
/// normalised inputs of the projections with their mask products (2 × 3 × hidden, one less:
/// the second norm's input is the residual), q, the attention output and its head-masked
/// product (3 × heads × head_dim), k and v after RoPE (2 × kv_heads × head_dim), gate, up and
/// the SwiGLU output (3 × intermediate), the two sublayer outputs the layer and hidden masks
/// scale (2 × hidden, within the 7), and a log-sum-exp per head plus two norm statistics.
///
/// Generic composition: norm inputs, squares, statistics and outputs, residuals and mask
/// products (8 × hidden), q, context and o_proj input (3 × heads × head_dim), k and v before
/// and after RoPE (4 × kv_heads × head_dim) and four MLP intermediates (4 × intermediate); its
/// attention rows are counted in bytes by [`generic_attention_bytes`].
///
/// Family extras: Gemma's two post norms (their input, mask products and output: 4 × hidden
/// fused, 8 generic), q/k norms (their outputs; the generic norm also its squares and
/// statistics: 1 or 3 × (q + kv width)), and the GELU-tanh composition's intermediates
/// (4 × intermediate).
fn layer_elems_per_token(d: &Dims, kernels: Kernels) -> Option<u64> {
    let q_width = d.heads.checked_mul(d.head_dim)?;
    let kv_width = d.kv_heads.checked_mul(d.head_dim)?;
    let generic = u64::from(kernels == Kernels::Generic);
    let extras = [
        if d.hidden_norms > 2 {
            d.hidden.checked_mul(4 + 4 * generic)?
        } else {
            0
        },
        if d.qk_norm {
            q_width
                .checked_add(kv_width)?
                .checked_mul(1 + 2 * generic)?
        } else {
            0
        },
        if d.gelu {
            d.intermediate.checked_mul(4)?
        } else {
            0
        },
    ];
    let extra = extras.into_iter().try_fold(0u64, u64::checked_add)?;
    let terms = match kernels {
        Kernels::Fused => [
            d.hidden.checked_mul(7)?,
            q_width.checked_mul(3)?,
            kv_width.checked_mul(2)?,
            d.intermediate.checked_mul(3)?,
            d.heads.checked_add(2)?,
        ],
        Kernels::Generic => [
            d.hidden.checked_mul(8)?,
            q_width.checked_mul(3)?,
            kv_width.checked_mul(4)?,
            d.intermediate.checked_mul(4)?,
            0,
        ],
    };
    terms.into_iter().try_fold(extra, u64::checked_add)
}

/// Bytes per token one decoder layer's generic attention keeps for its backward: per head the
/// score row and its masked copy in the compute precision, and the softmax's f32 rows (it runs
/// in f32 under every precision: the upcast input, its exponentials and the output), i.e.
/// `heads × t × (2 × bytes + 12)`. Measured against peak RSS on SmolLM2 (bf16-mixed, 4 x 512,
/// no checkpointing: 10.10 GiB); counting the rows in the compute precision alone
/// (`2 × bytes`) underestimated that run by 35%.
fn generic_attention_bytes(d: &Dims, seq: u64, bytes: u64) -> Option<u64> {
    d.heads
        .checked_mul(seq)?
        .checked_mul(bytes.checked_mul(2)?.checked_add(12)?)
}

/// Activation bytes of one micro-batch of `micro` sequences: every layer's kept tensors (or,
/// with layer checkpointing, every layer's input plus one layer's kept tensors during its
/// recomputation) in the compute precision, with generic kernels also those layers' attention
/// rows (`generic_attention_bytes`), plus the head: with generic kernels the logits,
/// their log-softmax and its gradient in f32 (the loss is reduced in f32 under every
/// precision); with the fused LM-head loss only the final norm's input and output and one
/// log-sum-exp per token, plus in f32 the logits it keeps for its backward while they fit
/// [`shears_models::ops::KEEP_LOGITS_ELEMS`] (the flex kernel's rule; other backends keep none,
/// so there this over-counts by at most 256 MiB).
pub fn activation_bytes(d: &Dims, s: &MemorySettings, micro: u64) -> Option<u64> {
    let tokens = micro.checked_mul(s.seq_len as u64)?;
    let bytes = match s.precision {
        Precision::F32 => 4,
        Precision::Bf16Mixed => 2,
    };
    let layer = layer_elems_per_token(d, s.kernels)?;
    let attention = match s.kernels {
        Kernels::Generic => generic_attention_bytes(d, s.seq_len as u64, bytes)?,
        Kernels::Fused => 0,
    };
    // Elements in the compute precision, and the layers whose attention rows are alive.
    let (per_token, attn_layers) = match s.checkpointing {
        Checkpointing::None => (d.layers.checked_mul(layer)?, d.layers),
        Checkpointing::Layers => (d.layers.checked_mul(d.hidden)?.checked_add(layer)?, 1),
    };
    let head = match s.kernels {
        Kernels::Generic => d.vocab.checked_mul(3 * 4)?,
        Kernels::Fused => d.hidden.checked_mul(2 * bytes)?.checked_add(4)?,
    };
    // The fused f32 loss keeps the micro-batch's logits (`micro · (seq_len - 1)` rows) for its
    // backward when there are at most `KEEP_LOGITS_ELEMS` of them.
    let kept = match (s.kernels, s.precision) {
        (Kernels::Fused, Precision::F32) => {
            let logits = micro
                .checked_mul((s.seq_len as u64).saturating_sub(1))?
                .checked_mul(d.vocab)?;
            if logits <= shears_models::ops::KEEP_LOGITS_ELEMS as u64 {
                logits.checked_mul(4)?
            } else {
                0
            }
        }
        _ => 0,
    };
    tokens
        .checked_mul(
            per_token
                .checked_mul(bytes)?
                .checked_add(attn_layers.checked_mul(attention)?)?
                .checked_add(head)?,
        )?
        .checked_add(kept)
}

/// Peak bytes of one evaluation forward of `eval_batch` sequences of `eval_len()` tokens: no
/// autodiff graph, so one decoder layer's tensors are alive at a time. Per token, in the compute
/// precision: the residual stream, the normalised input, the attention output and the residual
/// sum (4 × hidden), q before and after RoPE (2 × heads × head_dim), k and v (2 × kv_heads ×
/// head_dim), gate, up and their SwiGLU product (3 × intermediate); with generic kernels also
/// per head two score rows in the compute precision (the scores and their scaled copy) and the
/// softmax's three f32 rows: t × (2 × bytes + 12). The head: generic kernels score the
/// LM head in chunks of at most [`shears_models::ops::NLL_CHUNK_ELEMS`] logits (the logits in the
/// compute precision and three f32 tensors of the loss per chunk); the fused LM-head loss keeps
/// no logits.
pub fn eval_activation_bytes(d: &Dims, s: &MemorySettings) -> Option<u64> {
    let t = s.eval_len() as u64;
    let tokens = (s.eval_batch as u64).checked_mul(t)?;
    let bytes: u64 = match s.precision {
        Precision::F32 => 4,
        Precision::Bf16Mixed => 2,
    };
    let q_width = d.heads.checked_mul(d.head_dim)?;
    let kv_width = d.kv_heads.checked_mul(d.head_dim)?;
    let layer = [
        d.hidden.checked_mul(4)?,
        q_width.checked_mul(2)?,
        kv_width.checked_mul(2)?,
        d.intermediate.checked_mul(3)?,
    ]
    .into_iter()
    .try_fold(0u64, u64::checked_add)?
    .checked_mul(bytes)?;
    let (attention, head) = match s.kernels {
        Kernels::Generic => {
            let rows =
                tokens.min((shears_models::ops::NLL_CHUNK_ELEMS as u64 / d.vocab.max(1)).max(1));
            (
                d.heads.checked_mul(t)?.checked_mul(2 * bytes + 12)?,
                rows.checked_mul(d.vocab)?.checked_mul(bytes + 12)?,
            )
        }
        Kernels::Fused => (0, 0),
    };
    tokens
        .checked_mul(layer.checked_add(attention)?)?
        .checked_add(head)
}

/// Parameters of the largest segment layer checkpointing differentiates at once: a decoder
/// layer, or the head (final norm and LM head) or the embedding.
pub fn segment_params(d: &Dims) -> Option<u64> {
    let q = d.heads.checked_mul(d.head_dim)?;
    let kv = d.kv_heads.checked_mul(d.head_dim)?;
    let layer = [
        d.hidden.checked_mul(q)?.checked_mul(2)?,
        d.hidden.checked_mul(kv)?.checked_mul(2)?,
        d.hidden.checked_mul(d.intermediate)?.checked_mul(3)?,
        d.hidden.checked_mul(2)?,
    ]
    .into_iter()
    .try_fold(0u64, u64::checked_add)?;
    let head = d.vocab.checked_mul(d.hidden)?.checked_add(d.hidden)?;
    Some(layer.max(head))
}

/// Memory per device for `params` weights (with `mask_entries` mask and multiplier entries) of
/// a model of shape `d`.
pub fn estimate(
    d: &Dims,
    params: u64,
    mask_entries: u64,
    s: &MemorySettings,
) -> Result<MemoryReport, String> {
    estimate_with_teacher(d, params, mask_entries, s, None)
}

/// A distillation teacher: its shape and parameter count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TeacherShape {
    pub dims: Dims,
    pub params: u64,
}

/// Bytes a distillation teacher adds on each device for micro-batches of `micro` sequences:
/// its weights in the compute precision (no gradients, no optimizer state), its final hidden
/// rows kept through the student's step (`tokens × hidden`, compute precision), and the KD
/// head's buffers: about eight f32 `[rows, vocab]` tensors of one chunk of
/// [`shears_models::distill::KD_CHUNK_ELEMS`] logits, the f32 gradient of the student's LM-head
/// weight and of its hidden rows. The teacher's own forward holds one layer's tensors at a
/// time before the student's forward starts, below the student's step activations, so it
/// adds nothing at the peak.
pub fn teacher_bytes(
    student: &Dims,
    t: &TeacherShape,
    s: &MemorySettings,
    micro: u64,
) -> Option<u64> {
    let bytes: u64 = match s.precision {
        Precision::F32 => 4,
        Precision::Bf16Mixed => 2,
    };
    let tokens = micro.checked_mul(s.seq_len as u64)?;
    let weights = t.params.checked_mul(bytes)?;
    let rows = tokens.checked_mul(t.dims.hidden)?.checked_mul(bytes)?;
    let chunk_rows =
        tokens.min((shears_models::distill::KD_CHUNK_ELEMS as u64 / student.vocab.max(1)).max(1));
    let kd = [
        chunk_rows.checked_mul(student.vocab)?.checked_mul(8 * 4)?,
        student.vocab.checked_mul(student.hidden)?.checked_mul(4)?,
        tokens.checked_mul(student.hidden)?.checked_mul(4)?,
    ]
    .into_iter()
    .try_fold(0u64, u64::checked_add)?;
    weights.checked_add(rows)?.checked_add(kd)
}

/// [`estimate`] for a run that distils from `teacher` (continued pre-training).
pub fn estimate_with_teacher(
    d: &Dims,
    params: u64,
    mask_entries: u64,
    s: &MemorySettings,
    teacher: Option<&TeacherShape>,
) -> Result<MemoryReport, String> {
    s.check()?;
    let too_big = || {
        format!(
            "the memory of a batch of {} x {} tokens on this model does not fit in 64 bits; use a smaller batch or seq_len",
            s.batch, s.seq_len
        )
    };
    let at = |micro: usize| {
        totals(d, params, mask_entries, s, micro as u64, teacher).ok_or_else(too_big)
    };
    let mut report = at(s.micro())?;
    if let Some(device) = s.device_memory {
        report.fits = Some(report.total <= device);
        // Memory is not monotone in the micro-batch (a whole-batch step keeps no gradient
        // accumulator), so every divisor is tried, largest first: at most a few hundred for a
        // batch up to 2^24, found in sqrt(batch) steps.
        report.max_micro_batch = divisors(s.batch)
            .into_iter()
            .rev()
            .filter(|m| s.batch / m >= s.devices)
            .find(|&m| matches!(totals(d, params, mask_entries, s, m as u64, teacher), Some(r) if r.total <= device));
    }
    Ok(report)
}

/// A byte count in GiB, as the reports print it.
pub(crate) fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The divisors of `n`, ascending.
fn divisors(n: usize) -> Vec<usize> {
    let (mut low, mut high) = (vec![], vec![]);
    let mut i = 1;
    while i <= n / i {
        if n.is_multiple_of(i) {
            low.push(i);
            if i != n / i {
                high.push(n / i);
            }
        }
        i += 1;
    }
    low.extend(high.into_iter().rev());
    low
}

fn totals(
    d: &Dims,
    params: u64,
    mask_entries: u64,
    s: &MemorySettings,
    micro: u64,
    teacher: Option<&TeacherShape>,
) -> Option<MemoryReport> {
    let mixed = s.precision == Precision::Bf16Mixed;
    let by_layers = s.checkpointing == Checkpointing::Layers;
    // What one backward pass holds at once: every parameter, or one segment's.
    let held = if by_layers {
        segment_params(d)?.min(params)
    } else {
        params
    };
    let (weights, master_weights) = if mixed {
        (held.checked_mul(2)?, params.checked_mul(4)?)
    } else {
        (params.checked_mul(4)?, 0)
    };
    let gradients = held.checked_mul(4)?;
    let accumulating = micro < s.batch as u64 || by_layers;
    let gradient_accumulator = if accumulating {
        params.checked_mul(4)?
    } else {
        0
    };
    let optimizer_state = params.checked_mul(match s.optimizer_state {
        StatePrecision::F32 => 8,
        StatePrecision::Bf16 => 4,
    })?;
    // log_alpha (or λ), its gradient and two moments, f32.
    let masks = mask_entries.checked_mul(16)?;
    let step_activations = activation_bytes(d, s, micro)?;
    let eval_activations = eval_activation_bytes(d, s)?;
    let activations = step_activations.max(eval_activations);
    let workspace = s.device.runtime_bytes().checked_add(activations / 10)?;
    let mut report = MemoryReport {
        settings: MemorySettings {
            micro_batch: Some(micro as usize),
            ..*s
        },
        weights,
        master_weights,
        gradients,
        gradient_accumulator,
        optimizer_state,
        masks,
        activations,
        step_activations,
        eval_activations,
        workspace,
        teacher: match teacher {
            Some(t) => teacher_bytes(d, t, s, micro)?,
            None => 0,
        },
        total: 0,
        fits: None,
        max_micro_batch: None,
    };
    report.total = report
        .parts()
        .into_iter()
        .try_fold(0u64, |sum, (_, b)| sum.checked_add(b))?;
    Some(report)
}

/// The smallest device memory `parse_bytes` takes (anything below cannot hold a model).
pub const MIN_DEVICE_BYTES: u64 = 1 << 20;

/// A byte count as people write it: `141GB`, `80 GiB`, `512MiB`, `1.5TB` (decimal units are
/// powers of 1000, binary ones of 1024). A bare number is refused: it is ambiguous; a size
/// below [`MIN_DEVICE_BYTES`] too.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("{s:?} has no unit: write e.g. 141GB or 80GiB"))?;
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {:?} is not a number", num.trim()))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let bytes = num * scale;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is not a size below 16 EiB"));
    }
    if bytes < MIN_DEVICE_BYTES as f64 {
        return Err(format!(
            "{s:?} is {bytes} bytes, below 1 MiB: give the device's memory, e.g. 80GB or 141GB"
        ));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama2_7b() -> Dims {
        Dims {
            layers: 32,
            hidden: 4096,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            intermediate: 11008,
            vocab: 32000,
            tied: false,
            qkv_bias: false,
            hidden_norms: 2,
            qk_norm: false,
            gelu: false,
        }
    }

    #[test]
    fn sizes_parse_with_units_only() {
        assert_eq!(parse_bytes("141GB").unwrap(), 141_000_000_000);
        assert_eq!(parse_bytes(" 80 GiB").unwrap(), 80 << 30);
        assert_eq!(parse_bytes("1.5tb").unwrap(), 1_500_000_000_000);
        for bad in [
            "141",
            "GB",
            "-1GB",
            "0GB",
            "1e30TB",
            "12 parsecs",
            "nanGB",
            "",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_setting_moves_the_right_term() {
        let d = llama2_7b();
        let p = 6_738_415_616u64;
        let base = MemorySettings::new(8, 4096);
        let f32 = estimate(&d, p, 0, &base).unwrap();
        assert_eq!(f32.weights, 4 * p);
        assert_eq!(f32.gradients, 4 * p);
        assert_eq!((f32.master_weights, f32.gradient_accumulator), (0, 0));
        assert_eq!(f32.optimizer_state, 8 * p);
        let mixed = estimate(
            &d,
            p,
            0,
            &MemorySettings {
                precision: Precision::Bf16Mixed,
                micro_batch: Some(2),
                optimizer_state: StatePrecision::Bf16,
                ..base
            },
        )
        .unwrap();
        assert_eq!(mixed.weights, 2 * p);
        assert_eq!(mixed.master_weights, 4 * p);
        assert_eq!(mixed.gradients, 4 * p);
        assert_eq!(mixed.gradient_accumulator, 4 * p);
        assert_eq!(mixed.optimizer_state, 4 * p);
        // Layer checkpointing holds one segment's bf16 copies and gradients (here a decoder
        // layer: 4 · 4096² + 3 · 4096 · 11008 + 2 · 4096 > 32000 · 4096 + 4096), and always
        // sums the segments into the accumulator.
        let seg = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096;
        assert_eq!(segment_params(&d), Some(seg));
        let by_layers = |micro| {
            estimate(
                &d,
                p,
                0,
                &MemorySettings {
                    precision: Precision::Bf16Mixed,
                    checkpointing: Checkpointing::Layers,
                    micro_batch: Some(micro),
                    ..base
                },
            )
            .unwrap()
        };
        for micro in [8, 2] {
            let r = by_layers(micro);
            assert_eq!((r.weights, r.gradients), (2 * seg, 4 * seg));
            assert_eq!(r.gradient_accumulator, 4 * p);
        }
        // Activations: linear in the micro-batch; checkpointing and fused kernels shrink them.
        let a = |s: MemorySettings, m| activation_bytes(&d, &s, m).unwrap();
        assert_eq!(a(base, 4), 2 * a(base, 2));
        let ckpt = MemorySettings {
            checkpointing: Checkpointing::Layers,
            ..base
        };
        let fused = MemorySettings {
            kernels: Kernels::Fused,
            ..base
        };
        assert!(a(ckpt, 1) * 10 < a(base, 1));
        assert!(a(fused, 1) * 3 < a(base, 1));
        // By hand: 7B, one 4096-token sequence, f32, generic kernels, then fused.
        // Generic attention: per head the score row and its masked copy (f32 here) and the
        // softmax's three f32 rows.
        let layer = 8 * 4096 + 3 * 4096 + 4 * 4096 + 4 * 11008;
        let attention = 32 * 4096 * (2 * 4 + 12);
        assert_eq!(
            a(base, 1),
            4096 * (32 * (layer * 4 + attention) + 32000 * 12)
        );
        // bf16-mixed halves the rows in the compute precision, not the softmax's f32 ones.
        let bf16 = MemorySettings {
            precision: Precision::Bf16Mixed,
            ..base
        };
        let attention = 32 * 4096 * (2 * 2 + 12);
        assert_eq!(
            a(bf16, 1),
            4096 * (32 * (layer * 2 + attention) + 32000 * 12)
        );
        let layer = 7 * 4096 + 3 * 4096 + 2 * 4096 + 3 * 11008 + 32 + 2;
        assert_eq!(a(fused, 1), 4096 * (32 * layer * 4 + 2 * 4096 * 4 + 4));
        // At 1024 tokens the fused f32 loss keeps its 1023 x 32000 logits (under 64 Mi), at
        // 4096 it does not; bf16-mixed keeps none.
        let short = MemorySettings {
            kernels: Kernels::Fused,
            ..MemorySettings::new(8, 1024)
        };
        assert_eq!(
            a(short, 1),
            1024 * (32 * layer * 4 + 2 * 4096 * 4 + 4) + 1023 * 32000 * 4
        );
        let short_bf16 = MemorySettings {
            precision: Precision::Bf16Mixed,
            ..short
        };
        assert_eq!(a(short_bf16, 1), 1024 * (32 * layer * 2 + 2 * 4096 * 2 + 4));
    }

    #[test]
    fn evaluation_is_its_own_phase() {
        let d = llama2_7b();
        let p = 6_738_415_616u64;
        let base = MemorySettings {
            precision: Precision::Bf16Mixed,
            checkpointing: Checkpointing::Layers,
            micro_batch: Some(1),
            eval_batch: 1,
            ..MemorySettings::new(32, 4096)
        };
        let e = |s: MemorySettings| eval_activation_bytes(&d, &s).unwrap();
        // By hand: one 4096-token sequence in bf16, generic kernels: one layer's tensors, the
        // per-head score rows, and one LM-head chunk of 16Mi / 32000 = 524 rows.
        let layer = (4 * 4096 + 2 * 4096 + 2 * 4096 + 3 * 11008) * 2;
        let attention = 32 * 4096 * (2 * 2 + 12);
        assert_eq!(e(base), 4096 * (layer + attention) + 524 * 32000 * 14);
        // The score rows grow with the eval length, the rest with the tokens.
        let longer = MemorySettings {
            eval_seq_len: Some(8192),
            ..base
        };
        assert!(e(longer) > 3 * e(base));
        let eight = MemorySettings {
            eval_batch: 8,
            ..base
        };
        assert!(e(eight) > 7 * (e(base) - 524 * 32000 * 14));
        // Fused kernels: no score matrix and no logits.
        let fused = MemorySettings {
            kernels: Kernels::Fused,
            precision: Precision::F32,
            ..base
        };
        assert_eq!(e(fused), 4096 * layer * 2);
        // The report's activations are the larger phase; the eval phase decides at batch 8.
        let r = estimate(&d, p, 0, &base).unwrap();
        assert_eq!(r.activations, r.step_activations.max(r.eval_activations));
        let r8 = estimate(&d, p, 0, &eight).unwrap();
        assert_eq!(r8.activations, r8.eval_activations);
        assert!(r8.total > r.total + 50_000_000_000);
        assert_eq!(r8.step_activations, r.step_activations);
        // Zero-sized evaluation is refused.
        let zero = MemorySettings {
            eval_batch: 0,
            ..base
        };
        assert!(estimate(&d, p, 0, &zero).is_err());
    }

    #[test]
    fn fitting_and_the_largest_micro_batch() {
        let d = llama2_7b();
        let p = 6_738_415_616u64;
        let s = MemorySettings {
            precision: Precision::Bf16Mixed,
            optimizer_state: StatePrecision::Bf16,
            checkpointing: Checkpointing::Layers,
            micro_batch: Some(1),
            device_memory: Some(141_000_000_000),
            eval_batch: 1,
            ..MemorySettings::new(32, 4096)
        };
        let r = estimate(&d, p, 0, &s).unwrap();
        assert_eq!(r.fits, Some(true));
        let m = r.max_micro_batch.unwrap();
        assert!(m >= 1 && 32 % m == 0);
        let at = |m| {
            estimate(
                &d,
                p,
                0,
                &MemorySettings {
                    micro_batch: Some(m),
                    ..s
                },
            )
            .unwrap()
        };
        assert!(at(m).total <= 141_000_000_000);
        if m < 32 {
            assert!(at(2 * m).total > 141_000_000_000);
        }
        let tiny = MemorySettings {
            device_memory: Some(1 << 30),
            ..s
        };
        let r = estimate(&d, p, 0, &tiny).unwrap();
        assert_eq!((r.fits, r.max_micro_batch), (Some(false), None));
        assert!(estimate(
            &d,
            p,
            0,
            &MemorySettings {
                micro_batch: Some(3),
                ..s
            }
        )
        .is_err());
        assert!(estimate(&d, p, 0, &MemorySettings::new(1 << 40, 1 << 40)).is_err());
    }
}
