//! Finalize (method §6, §11.1, §11.2): fold deterministic masks with the target's exact counts
//! into the weights and slice out a dense model of exactly the target shape. Host-side f32, so
//! it runs on any machine that can hold the weights and needs no backend.

use shears_core::model_files::{check_weights, layer_key};
use shears_core::{Error, HostTensor, LlamaConfig, Result, WeightMap};

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

fn nonzero(v: &[f32]) -> Vec<usize> {
    v.iter()
        .enumerate()
        .filter(|(_, x)| **x != 0.0)
        .map(|(i, _)| i)
        .collect()
}

/// The dense config and weights of the target, from source `weights` (HF names and layout) and
/// deterministic `masks` with the target's exact counts (`L0Masks::deterministic(true)`).
pub fn finalize(
    weights: &WeightMap,
    masks: &HostMasks,
    opts: FinalizeOptions,
) -> Result<(LlamaConfig, WeightMap)> {
    let spec = &masks.spec;
    let src = &spec.source;
    let (l_src, d, hd) = (src.num_hidden_layers, src.hidden_size, src.head_dim());
    let (g_src, r_src, i_src) = (
        src.num_kv_heads(),
        spec.heads_per_group(),
        src.intermediate_size,
    );
    let h_src = g_src * r_src;
    let ones = |n: usize| vec![1f32; n];
    let get =
        |m: PruneModule, n: usize| masks.get(m).map(|v| v.to_vec()).unwrap_or_else(|| ones(n));
    let zh = get(PruneModule::Hidden, d);
    let zl = get(PruneModule::Layer, l_src);
    let zi = get(PruneModule::Intermediate, l_src * i_src);
    let zkv = get(PruneModule::KvHeads, l_src * g_src);
    let zq = get(PruneModule::QueryHeads, l_src * h_src);
    let t = &spec.target;
    let bad = |what: String| {
        Error::invalid(format!(
            "finalize needs deterministic masks with the target's exact counts; {what} (compute them with exact_target = true)"
        ))
    };

    let k_hid = nonzero(&zh);
    let k_layer = nonzero(&zl);
    if k_hid.len() != t.hidden_size {
        return Err(bad(format!(
            "the hidden mask keeps {} channels, the target has {}",
            k_hid.len(),
            t.hidden_size
        )));
    }
    if k_layer.len() != t.num_hidden_layers {
        return Err(bad(format!(
            "the layer mask keeps {} layers, the target has {}",
            k_layer.len(),
            t.num_hidden_layers
        )));
    }
    let f32w = |name: &str| -> Result<Vec<f32>> {
        weights
            .get(name)
            .map(|t| t.to_f32_vec())
            .ok_or_else(|| Error::invalid(format!("finalize: tensor '{name}' is missing")))
    };
    let zh_kept: Vec<f32> = k_hid.iter().map(|&i| zh[i]).collect();
    let vocab = src.vocab_size;
    let all_vocab: Vec<usize> = (0..vocab).collect();
    let mut out = WeightMap::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        out.insert(name, HostTensor::f32(shape, data));
    };

    // Embedding columns carry z_hidden: the embedding output is masked (and, when tied, the LM
    // head carries the factor of the final norm's masked output exactly once).
    let embed = f32w("model.embed_tokens.weight")?;
    put(
        "model.embed_tokens.weight".into(),
        vec![vocab, k_hid.len()],
        gather(&embed, d, &all_vocab, &k_hid, None, Some(&zh_kept)),
    );
    let norm = f32w("model.norm.weight")?;
    let fold_final_norm = !src.tie_word_embeddings || opts.compat_reference_lm_head;
    put(
        "model.norm.weight".into(),
        vec![k_hid.len()],
        gather(
            &norm,
            d,
            &[0],
            &k_hid,
            None,
            fold_final_norm.then_some(zh_kept.as_slice()),
        ),
    );
    if !src.tie_word_embeddings {
        let head = f32w("lm_head.weight")?;
        put(
            "lm_head.weight".into(),
            vec![vocab, k_hid.len()],
            gather(
                &head,
                d,
                &all_vocab,
                &k_hid,
                None,
                opts.compat_reference_lm_head.then_some(zh_kept.as_slice()),
            ),
        );
    }

    for (new_l, &l) in k_layer.iter().enumerate() {
        let k = |s: &str| layer_key(l, s);
        let nk = |s: &str| layer_key(new_l, s);
        // Per query head: z_kv[l, g] · z_q[l, g, s].
        let head_factor: Vec<f32> = (0..h_src)
            .map(|j| zkv[l * g_src + j / r_src] * zq[l * h_src + j])
            .collect();
        let k_heads = nonzero(&head_factor);
        let k_groups = nonzero(&zkv[l * g_src..(l + 1) * g_src]);
        let k_int = nonzero(&zi[l * i_src..(l + 1) * i_src]);
        if k_groups.len() != t.num_key_value_heads || k_heads.len() != t.num_attention_heads {
            return Err(bad(format!(
                "layer {l} keeps {} kv heads and {} query heads, the target has {} and {}",
                k_groups.len(),
                k_heads.len(),
                t.num_key_value_heads,
                t.num_attention_heads
            )));
        }
        if k_groups
            .iter()
            .any(|&g| k_heads.iter().filter(|&&j| j / r_src == g).count() != t.heads_per_group())
        {
            return Err(bad(format!(
                "layer {l} keeps a kv group without exactly {} query heads",
                t.heads_per_group()
            )));
        }
        if k_int.len() != t.intermediate_size {
            return Err(bad(format!(
                "layer {l} keeps {} MLP channels, the target has {}",
                k_int.len(),
                t.intermediate_size
            )));
        }
        let rows_of = |units: &[usize]| -> Vec<usize> {
            units.iter().flat_map(|&u| u * hd..(u + 1) * hd).collect()
        };
        let q_rows = rows_of(&k_heads);
        let kv_rows = rows_of(&k_groups);
        let (dt, ht, gt, it) = (k_hid.len(), q_rows.len(), kv_rows.len(), k_int.len());

        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            put(
                nk(n),
                vec![dt],
                gather(&f32w(&k(n))?, d, &[0], &k_hid, None, Some(&zh_kept)),
            );
        }
        put(
            nk("self_attn.q_proj.weight"),
            vec![ht, dt],
            gather(
                &f32w(&k("self_attn.q_proj.weight"))?,
                d,
                &q_rows,
                &k_hid,
                None,
                None,
            ),
        );
        put(
            nk("self_attn.k_proj.weight"),
            vec![gt, dt],
            gather(
                &f32w(&k("self_attn.k_proj.weight"))?,
                d,
                &kv_rows,
                &k_hid,
                None,
                None,
            ),
        );
        put(
            nk("self_attn.v_proj.weight"),
            vec![gt, dt],
            gather(
                &f32w(&k("self_attn.v_proj.weight"))?,
                d,
                &kv_rows,
                &k_hid,
                None,
                None,
            ),
        );
        // o_proj: each kept head's input columns carry its factor; rows carry z_layer · z_hidden.
        let col_scale: Vec<f32> = q_rows.iter().map(|&c| head_factor[c / hd]).collect();
        let out_scale: Vec<f32> = zh_kept.iter().map(|z| zl[l] * z).collect();
        put(
            nk("self_attn.o_proj.weight"),
            vec![dt, ht],
            gather(
                &f32w(&k("self_attn.o_proj.weight"))?,
                h_src * hd,
                &k_hid,
                &q_rows,
                Some(&out_scale),
                Some(&col_scale),
            ),
        );
        let zi_kept: Vec<f32> = k_int.iter().map(|&c| zi[l * i_src + c]).collect();
        put(
            nk("mlp.gate_proj.weight"),
            vec![it, dt],
            gather(
                &f32w(&k("mlp.gate_proj.weight"))?,
                d,
                &k_int,
                &k_hid,
                None,
                None,
            ),
        );
        put(
            nk("mlp.up_proj.weight"),
            vec![it, dt],
            gather(
                &f32w(&k("mlp.up_proj.weight"))?,
                d,
                &k_int,
                &k_hid,
                Some(&zi_kept),
                None,
            ),
        );
        put(
            nk("mlp.down_proj.weight"),
            vec![dt, it],
            gather(
                &f32w(&k("mlp.down_proj.weight"))?,
                i_src,
                &k_hid,
                &k_int,
                Some(&out_scale),
                None,
            ),
        );
    }
    let config = t.config(src);
    check_weights(&config, &out, std::path::Path::new("<finalized>"))?;
    Ok((config, out))
}
