//! `shears plan`: what a pruning run from a source to a target involves, before any weights are
//! loaded: shapes, parameter counts, per-module target sparsity, hardware-friendliness, and the
//! memory a pruning run needs per device.

use serde::Serialize;
use shears_core::LlamaConfig;

use crate::memory::{gib, MemoryReport, MemorySettings, TeacherShape};
use crate::size::Dims;
use crate::target::{PruneModule, PruningSpec, TargetShape};

/// Shape summary of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeReport {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub prunable_params: u64,
    pub total_params: u64,
}

/// One pruned module.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub module: &'static str,
    pub mask_shape: [usize; 2],
    pub kept_per_row: usize,
    pub target_sparsity: f64,
}

/// Whether a target width is a multiple of 64, and the parameter count if it were rounded to
/// the nearest multiple (method §11.4).
#[derive(Debug, Clone, Serialize)]
pub struct AlignmentReport {
    pub dimension: &'static str,
    pub value: usize,
    pub multiple_of_64: bool,
    pub nearest_multiple_of_64: usize,
    pub total_params_at_nearest: u64,
}

/// The whole plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub source: ShapeReport,
    pub target: ShapeReport,
    pub target_sparsity: f64,
    pub modules: Vec<ModuleReport>,
    pub alignment: Vec<AlignmentReport>,
    /// Memory per device of the pruning run (the source model with its masks).
    pub memory: MemoryReport,
    /// Memory per device of continued pre-training of the target with the same settings, on
    /// the LM loss alone.
    pub train_memory: MemoryReport,
    /// The same, distilling from the source (`[distill] teacher = "source"`).
    pub distill_memory: MemoryReport,
}

fn shape(d: &Dims) -> ShapeReport {
    ShapeReport {
        num_hidden_layers: d.layers as usize,
        hidden_size: d.hidden as usize,
        num_attention_heads: d.heads as usize,
        num_key_value_heads: d.kv_heads as usize,
        head_dim: d.head_dim as usize,
        intermediate_size: d.intermediate as usize,
        vocab_size: d.vocab as usize,
        prunable_params: d.prunable(),
        total_params: d.total(),
    }
}

/// Plan pruning `source` to `target` with the run settings that decide memory.
///
/// Every size is computed with checked arithmetic: a batch, sequence length or config so large
/// that a byte count does not fit in 64 bits is an error, not a wrapped number.
pub fn plan(spec: &PruningSpec, run: &MemorySettings) -> shears_core::Result<PlanReport> {
    let src = Dims::of(&spec.source);
    let tgt = Dims::of_target(&spec.target, &spec.source);
    let modules = spec
        .modules
        .iter()
        .map(|&m| {
            let (rows, n) = spec.mask_shape(m);
            ModuleReport {
                module: m.name(),
                mask_shape: [rows, n],
                kept_per_row: spec.target_kept(m),
                target_sparsity: spec.target_sparsity(m),
            }
        })
        .collect();
    let nearest = |v: usize| ((v + 32) / 64 * 64).max(64);
    let alignment = [
        ("hidden_size", spec.target.hidden_size),
        ("intermediate_size", spec.target.intermediate_size),
        (
            "attention width (heads x head_dim)",
            spec.target.num_attention_heads * tgt.head_dim as usize,
        ),
    ]
    .into_iter()
    .map(|(name, v)| {
        let mut rounded = spec.target;
        match name {
            "hidden_size" => rounded.hidden_size = nearest(v),
            "intermediate_size" => rounded.intermediate_size = nearest(v),
            _ => {}
        }
        AlignmentReport {
            dimension: name,
            value: v,
            multiple_of_64: v % 64 == 0,
            nearest_multiple_of_64: nearest(v),
            total_params_at_nearest: Dims::of_target(&rounded, &spec.source).total(),
        }
    })
    .collect();
    let mask_entries: u64 = spec
        .modules
        .iter()
        .map(|&m| {
            let (r, n) = spec.mask_shape(m);
            (r * n) as u64
        })
        .sum::<u64>()
        + 2 * spec.modules.len() as u64;
    let memory = crate::memory::estimate(&src, src.total(), mask_entries, run)
        .map_err(shears_core::Error::invalid)?;
    let train_memory =
        crate::memory::estimate(&tgt, tgt.total(), 0, run).map_err(shears_core::Error::invalid)?;
    let teacher = TeacherShape {
        dims: src,
        params: src.total(),
    };
    let distill_memory =
        crate::memory::estimate_with_teacher(&tgt, tgt.total(), 0, run, Some(&teacher))
            .map_err(shears_core::Error::invalid)?;
    Ok(PlanReport {
        source: shape(&src),
        target: shape(&tgt),
        target_sparsity: 1.0 - tgt.prunable() as f64 / src.prunable() as f64,
        modules,
        alignment,
        memory,
        train_memory,
        distill_memory,
    })
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl PlanReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let row = |name: &str, s: &ShapeReport| {
            format!(
                "{name:<8} L={:<3} d={:<6} heads={:<3} kv={:<3} head_dim={:<4} I={:<6} vocab={:<7} prunable={:>15} total={:>15}\n",
                s.num_hidden_layers,
                s.hidden_size,
                s.num_attention_heads,
                s.num_key_value_heads,
                s.head_dim,
                s.intermediate_size,
                s.vocab_size,
                group(s.prunable_params),
                group(s.total_params)
            )
        };
        o += &row("source", &self.source);
        o += &row("target", &self.target);
        o += &format!(
            "overall target sparsity (prunable params): {:.5}\n\n",
            self.target_sparsity
        );
        o += "pruned modules:\n";
        for m in &self.modules {
            o += &format!(
                "  {:<13} mask [{} x {}], keep {} per row, target sparsity {:.6}\n",
                m.module, m.mask_shape[0], m.mask_shape[1], m.kept_per_row, m.target_sparsity
            );
        }
        o += "\nhardware alignment:\n";
        for a in &self.alignment {
            if a.multiple_of_64 {
                o += &format!("  {:<36} {:>6}  multiple of 64\n", a.dimension, a.value);
            } else {
                o += &format!(
                    "  {:<36} {:>6}  WARNING: not a multiple of 64 (nearest {}, total params there {})\n",
                    a.dimension,
                    a.value,
                    a.nearest_multiple_of_64,
                    group(a.total_params_at_nearest)
                );
            }
        }
        o += &self.memory.render();
        let fits = |m: &MemoryReport| match m.fits {
            Some(true) => ", fits",
            Some(false) => ", does not fit",
            None => "",
        };
        o += &format!(
            "\ncontinued pre-training of the target, same settings: total {}{}\n  distilling from the source ([distill] teacher = \"source\"): total {}{} (teacher weights, rows and KD buffers {})\n",
            gib(self.train_memory.total),
            fits(&self.train_memory),
            gib(self.distill_memory.total),
            fits(&self.distill_memory),
            gib(self.distill_memory.teacher)
        );
        o
    }
}

/// Convenience: plan from configs.
pub fn plan_configs(
    source: &LlamaConfig,
    target: TargetShape,
    modules: Option<&[PruneModule]>,
    run: &MemorySettings,
) -> shears_core::Result<PlanReport> {
    let spec = PruningSpec::new(source, target, modules)?;
    plan(&spec, run)
}
