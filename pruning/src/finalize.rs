//! Finalize (method §6, §11.1, §11.2): fold deterministic masks with the target's exact counts
//! into the weights and slice out a dense model of exactly the target shape. Host-side f32, so
//! it runs on any machine that can hold the weights and needs no backend.

use shears_core::layer_tensors::{EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use shears_core::model_files::check_weights;
use shears_core::{
    Axis, Error, HostTensor, LayerShape, LayerTensor, LlamaConfig, Result, WeightMap,
};

use crate::masks::HostMasks;
use crate::target::PruneModule;

/// Finalize settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FinalizeOptions {
    /// Reproduce the reference conversion's LM-head double scaling (§6.1): `z_hidden` is folded
    /// into the final norm *and* the LM head (untied) or into the final norm on top of the tied
    /// embedding (tied). Off by default: the default conversion is exact.
    #[serde(default)]
    pub compat_reference_lm_head: bool,
}

/// Element `m[r, c]` gathered at `rows × cols`, scaled by `row_scale[r'] · col_scale[c']`.
fn gather(
    m: &[f32],
    n_cols: usize,
    rows: &[usize],
    cols: &[usize],
    row_scale: Option<&[f32]>,
    col_scale: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    for (ri, &r) in rows.iter().enumerate() {
        let rs = row_scale.map_or(1.0, |s| s[ri]);
        let src = &m[r * n_cols..(r + 1) * n_cols];
        for (ci, &c) in cols.iter().enumerate() {
            let cs = col_scale.map_or(1.0, |s| s[ci]);
            out.push(src[c] * rs * cs);
        }
    }
    out
}

/// A norm's kept gains: `w[c]`, or with a fold `(w[c] + offset) · f - offset`, so the gain
/// `w + offset` the model applies (Gemma's `1 + w`) is what carries the factor.
fn gather_norm(w: &[f32], cols: &[usize], scale: Option<&[f32]>, offset: f32) -> Vec<f32> {
    match scale {
        None => cols.iter().map(|&c| w[c]).collect(),
        Some(s) => cols
            .iter()
            .zip(s)
            .map(|(&c, f)| (w[c] + offset) * f - offset)
            .collect(),
    }
}

fn nonzero(v: &[f32]) -> Vec<usize> {
    v.iter()
        .enumerate()
        .filter(|(_, x)| **x != 0.0)
        .map(|(i, _)| i)
        .collect()
}

/// What deterministic masks keep of one source layer, checked against the target.
struct LayerKeep {
    /// The source layer.
    layer: usize,
    /// Kept rows of q/o (head_dim per kept query head), of k/v (per kept group), MLP channels.
    q_rows: Vec<usize>,
    kv_rows: Vec<usize>,
    int: Vec<usize>,
    /// Per kept q row: its head's factor `z_kv[l, g] · z_q[l, g, s]`.
    head_scale: Vec<f32>,
    /// Per kept hidden channel: `z_layer[l] · z_hidden[c]`, on the rows o/down write.
    written: Vec<f32>,
    /// Per kept MLP channel: `z_int[l, c]`, on up_proj's rows.
    int_scale: Vec<f32>,
}

/// What deterministic masks keep, validated: exactly the target's counts everywhere.
struct Keep {
    hidden: Vec<usize>,
    /// `z_hidden` of the kept channels.
    hidden_scale: Vec<f32>,
    /// Every channel of a head (`0..head_dim`): what q/k norms keep.
    head_dim: Vec<usize>,
    /// Gemma's sandwich: the post norms, not o_proj/down_proj, carry `written`.
    sandwich: bool,
    layers: Vec<LayerKeep>,
}

fn bad(what: String) -> Error {
    Error::invalid(format!(
        "finalize needs deterministic masks with the target's exact counts; {what} (compute them with exact_target = true)"
    ))
}

impl Keep {
    /// The validator: the kept structure of `masks`, or an error naming what differs from the
    /// target.
    fn of(masks: &HostMasks) -> Result<Keep> {
        let spec = &masks.spec;
        let (src, t) = (&spec.source, &spec.target);
        let (l_src, d, hd) = (src.num_hidden_layers, src.hidden_size, src.head_dim());
        let (g_src, r_src, i_src) = (
            src.num_kv_heads(),
            spec.heads_per_group(),
            src.intermediate_size,
        );
        let h_src = g_src * r_src;
        let get = |m: PruneModule, n: usize| {
            masks
                .get(m)
                .map(|v| v.to_vec())
                .unwrap_or_else(|| vec![1f32; n])
        };
        let zh = get(PruneModule::Hidden, d);
        let zl = get(PruneModule::Layer, l_src);
        let zi = get(PruneModule::Intermediate, l_src * i_src);
        let zkv = get(PruneModule::KvHeads, l_src * g_src);
        let zq = get(PruneModule::QueryHeads, l_src * h_src);
        let hidden = nonzero(&zh);
        let kept_layers = nonzero(&zl);
        if hidden.len() != t.hidden_size {
            return Err(bad(format!(
                "the hidden mask keeps {} channels, the target has {}",
                hidden.len(),
                t.hidden_size
            )));
        }
        if kept_layers.len() != t.num_hidden_layers {
            return Err(bad(format!(
                "the layer mask keeps {} layers, the target has {}",
                kept_layers.len(),
                t.num_hidden_layers
            )));
        }
        let hidden_scale: Vec<f32> = hidden.iter().map(|&i| zh[i]).collect();
        let mut layers = Vec::with_capacity(kept_layers.len());
        for l in kept_layers {
            let head_factor: Vec<f32> = (0..h_src)
                .map(|j| zkv[l * g_src + j / r_src] * zq[l * h_src + j])
                .collect();
            let heads = nonzero(&head_factor);
            let groups = nonzero(&zkv[l * g_src..(l + 1) * g_src]);
            let int = nonzero(&zi[l * i_src..(l + 1) * i_src]);
            if groups.len() != t.num_key_value_heads || heads.len() != t.num_attention_heads {
                return Err(bad(format!(
                    "layer {l} keeps {} kv heads and {} query heads, the target has {} and {}",
                    groups.len(),
                    heads.len(),
                    t.num_key_value_heads,
                    t.num_attention_heads
                )));
            }
            if groups
                .iter()
                .any(|&g| heads.iter().filter(|&&j| j / r_src == g).count() != t.heads_per_group())
            {
                return Err(bad(format!(
                    "layer {l} keeps a kv group without exactly {} query heads",
                    t.heads_per_group()
                )));
            }
            if int.len() != t.intermediate_size {
                return Err(bad(format!(
                    "layer {l} keeps {} MLP channels, the target has {}",
                    int.len(),
                    t.intermediate_size
                )));
            }
            let rows_of = |units: &[usize]| -> Vec<usize> {
                units.iter().flat_map(|&u| u * hd..(u + 1) * hd).collect()
            };
            let q_rows = rows_of(&heads);
            layers.push(LayerKeep {
                layer: l,
                head_scale: q_rows.iter().map(|&c| head_factor[c / hd]).collect(),
                kv_rows: rows_of(&groups),
                written: hidden_scale.iter().map(|z| zl[l] * z).collect(),
                int_scale: int.iter().map(|&c| zi[l * i_src + c]).collect(),
                int,
                q_rows,
            });
        }
        Ok(Keep {
            hidden,
            hidden_scale,
            head_dim: (0..hd).collect(),
            sandwich: src.family().has_sandwich_norms(),
            layers,
        })
    }
}

impl LayerKeep {
    /// Kept indices along `axis`.
    fn along<'a>(&'a self, keep: &'a Keep, axis: Axis) -> &'a [usize] {
        match axis {
            Axis::Hidden => &keep.hidden,
            Axis::QueryHeads => &self.q_rows,
            Axis::KvHeads => &self.kv_rows,
            Axis::Intermediate => &self.int,
            Axis::HeadDim => &keep.head_dim,
        }
    }

    /// Where the masks' values fold into `tensor` (row and column scales): norms on the
    /// residual stream carry z_hidden; o_proj's input columns carry each kept head's factor;
    /// what a sublayer writes to the stream carries z_layer · z_hidden (the rows of o_proj and
    /// down_proj, or with Gemma's sandwich the post norms' gains); up_proj's rows carry z_int.
    fn folds<'a>(
        &'a self,
        keep: &'a Keep,
        tensor: LayerTensor,
    ) -> (Option<&'a [f32]>, Option<&'a [f32]>) {
        let written = (!keep.sandwich).then_some(self.written.as_slice());
        match tensor {
            LayerTensor::PostAttentionLayernorm | LayerTensor::PostFeedforwardLayernorm
                if keep.sandwich =>
            {
                (None, Some(&self.written))
            }
            LayerTensor::InputLayernorm
            | LayerTensor::PostAttentionLayernorm
            | LayerTensor::PreFeedforwardLayernorm
            | LayerTensor::PostFeedforwardLayernorm => (None, Some(&keep.hidden_scale)),
            LayerTensor::OProj => (written, Some(&self.head_scale)),
            LayerTensor::DownProj => (written, None),
            LayerTensor::UpProj => (Some(&self.int_scale), None),
            // q/k norms act inside each head, on every channel of it: kept whole and unscaled.
            LayerTensor::QNorm | LayerTensor::KNorm => (None, None),
            // A pruned head takes its q/k/v bias rows with it; the kept ones are unscaled (head
            // masks act on the attention context, hidden masks on the projections' inputs).
            LayerTensor::QProj
            | LayerTensor::KProj
            | LayerTensor::VProj
            | LayerTensor::GateProj
            | LayerTensor::QBias
            | LayerTensor::KBias
            | LayerTensor::VBias => (None, None),
        }
    }
}

/// The dense config and weights of the target, from source `weights` (HF names and layout) and
/// deterministic `masks` with the target's exact counts (`L0Masks::deterministic(true)`).
pub fn finalize(
    weights: &WeightMap,
    masks: &HostMasks,
    opts: FinalizeOptions,
) -> Result<(LlamaConfig, WeightMap)> {
    let keep = Keep::of(masks)?;
    let (src, t) = (&masks.spec.source, &masks.spec.target);
    let d = src.hidden_size;
    let f32w = |name: &str| -> Result<Vec<f32>> {
        weights
            .get(name)
            .map(|t| t.to_f32_vec())
            .ok_or_else(|| Error::invalid(format!("finalize: tensor '{name}' is missing")))
    };
    let (hidden, zh) = (&keep.hidden, keep.hidden_scale.as_slice());
    let vocab = src.vocab_size;
    let all_vocab: Vec<usize> = (0..vocab).collect();
    let mut out = WeightMap::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        out.insert(name, HostTensor::f32(shape, data));
    };

    let offset = src.family().norm_offset();
    // Embedding columns carry z_hidden: the embedding output is masked (and, when tied, the LM
    // head carries the factor of the final norm's masked output exactly once). A scaled
    // embedding (Gemma's sqrt(d)) is rescaled to the new width's scale, and a tied LM head's
    // final norm takes the inverse, so neither the layers' input nor the logits change.
    let ratio = match (src.embed_scale(), t.config(src).embed_scale()) {
        (Some(s), Some(s_new)) => (s as f32) / (s_new as f32),
        _ => 1.0,
    };
    let embed_cols: Vec<f32> = zh.iter().map(|z| z * ratio).collect();
    put(
        EMBED_TOKENS.into(),
        vec![vocab, hidden.len()],
        gather(
            &f32w(EMBED_TOKENS)?,
            d,
            &all_vocab,
            hidden,
            None,
            Some(&embed_cols),
        ),
    );
    let fold_final_norm = !src.tie_word_embeddings || opts.compat_reference_lm_head;
    let final_scale: Vec<f32> = zh
        .iter()
        .map(|z| {
            let z = if fold_final_norm { *z } else { 1.0 };
            if src.tie_word_embeddings {
                z / ratio
            } else {
                z
            }
        })
        .collect();
    let any_final = fold_final_norm || ratio != 1.0;
    put(
        FINAL_NORM.into(),
        vec![hidden.len()],
        gather_norm(
            &f32w(FINAL_NORM)?,
            hidden,
            any_final.then_some(final_scale.as_slice()),
            offset,
        ),
    );
    if !src.tie_word_embeddings {
        let fold = opts.compat_reference_lm_head.then_some(zh);
        put(
            LM_HEAD.into(),
            vec![vocab, hidden.len()],
            gather(&f32w(LM_HEAD)?, d, &all_vocab, hidden, None, fold),
        );
    }

    // Every layer tensor: its kept rows and columns by the axis each dimension counts.
    let src_layer = LayerShape {
        num_attention_heads: src.num_attention_heads,
        num_key_value_heads: src.num_kv_heads(),
        intermediate_size: src.intermediate_size,
    };
    for (new_l, lk) in keep.layers.iter().enumerate() {
        for tensor in LayerTensor::of(src) {
            let w = f32w(&tensor.key(lk.layer))?;
            let (row_scale, col_scale) = lk.folds(&keep, tensor);
            let axes = tensor.axes();
            let cols_axis = axes[axes.len() - 1];
            let cols = lk.along(&keep, cols_axis);
            let (rows, shape): (&[usize], Vec<usize>) = if tensor.is_vector() {
                (&[0], vec![cols.len()])
            } else {
                let rows = lk.along(&keep, axes[0]);
                (rows, vec![rows.len(), cols.len()])
            };
            let n_cols = cols_axis.len(d, src.head_dim(), &src_layer);
            let data = if tensor.is_norm() {
                gather_norm(&w, cols, col_scale, offset)
            } else {
                gather(&w, n_cols, rows, cols, row_scale, col_scale)
            };
            put(tensor.key(new_l), shape, data);
        }
    }
    // The target's widths, and the kept layers' own attention kinds.
    let mut config = t.config(src);
    let kept: Vec<usize> = keep.layers.iter().map(|lk| lk.layer).collect();
    if let Some(types) = src.with_layers(&kept).extra.remove("layer_types") {
        config.extra.insert("layer_types".into(), types);
    }
    check_weights(&config, &out, std::path::Path::new("<finalized>"))?;
    Ok((config, out))
}
