//! Activation importance (method §12): per-structure scores from no-grad forwards over
//! calibration sequences, read through the model's activation taps, and the two ways Shears uses
//! them: L0 masks whose step-0 deterministic mask is the importance-ranked target
//! ([`Importance::log_alphas`]), and one-shot pruning to the target ([`Importance::masks`], then
//! [`crate::finalize()`]).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use shears_core::formats::safetensors::{self, SafeTensorsFile};
use shears_core::{Error, HostTensor, LlamaConfig, Result, WeightMap};
use shears_models::taps::LayerTaps;
use shears_models::{Llama, ShearsOps};

use crate::hard_concrete;
use crate::masks::HostMasks;
use crate::target::{PruneModule, PruningSpec};
use crate::PerModule;

/// Importance scores of a model's structures, averaged over the calibration tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    /// `[L][H]`: each head's mean per-token L2 norm of its context (its output before `o_proj`).
    pub heads: Vec<Vec<f32>>,
    /// `[L][I]`: each MLP channel's RMS activation (`act(gate) · up`).
    pub intermediate: Vec<Vec<f32>>,
    /// `[d]`: each hidden channel's mean magnitude in the outputs of the norms feeding the
    /// sublayers, summed over the layers.
    pub hidden: Vec<f32>,
    /// `[L]`: each layer's mean `1 - cos(input, output)` over tokens (ShortGPT's block influence).
    pub layers: Vec<f32>,
    /// Calibration tokens the scores average over.
    pub tokens: u64,
}

fn host<B: burn::tensor::backend::Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32 data")
}

impl Importance {
    /// Scores of `model` (uniform layers) over `batches` of equal-length sequences, no graph.
    pub fn measure<B: ShearsOps>(model: &Llama<B>, batches: &[Vec<Vec<u32>>]) -> Result<Self> {
        let c = &model.config;
        let device = model.device();
        let mut taps: Vec<LayerTaps<B>> = model
            .model
            .layers
            .iter()
            .map(|l| {
                LayerTaps::zeros(
                    l.self_attn.num_heads,
                    l.mlp.gate_proj.weight.dims()[1],
                    c.hidden_size,
                    &device,
                )
            })
            .collect();
        let mut tokens = 0u64;
        for batch in batches {
            let t = batch.first().map_or(0, Vec::len);
            if t == 0 || batch.iter().any(|s| s.len() != t) {
                return Err(Error::invalid(
                    "calibration batches need sequences of one positive length",
                ));
            }
            let ids: Vec<i64> = batch.iter().flatten().map(|&i| i64::from(i)).collect();
            let ids =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.len(), t]), &device);
            tokens += model.tap(ids, &mut taps) as u64;
        }
        if tokens == 0 {
            return Err(Error::invalid("no calibration tokens"));
        }
        let n = tokens as f32;
        let mut hidden = vec![0f32; c.hidden_size];
        let (mut heads, mut intermediate, mut layers) = (vec![], vec![], vec![]);
        for t in taps {
            heads.push(host(t.heads).into_iter().map(|s| s / n).collect());
            intermediate.push(
                host(t.intermediate)
                    .into_iter()
                    .map(|s| (s / n).sqrt())
                    .collect(),
            );
            for (h, s) in hidden.iter_mut().zip(host(t.hidden)) {
                *h += s / n;
            }
            layers.push(host(t.block)[0] / n);
        }
        Ok(Importance {
            heads,
            intermediate,
            hidden,
            layers,
            tokens,
        })
    }

    /// The scores of module `m`'s mask rows (`[rows][n]` of [`PruningSpec::mask_shape`]): a kv
    /// group scores the sum of its query heads.
    pub fn rows(&self, spec: &PruningSpec, m: PruneModule) -> Vec<Vec<f32>> {
        let r = spec.heads_per_group();
        match m {
            PruneModule::Hidden => vec![self.hidden.clone()],
            PruneModule::Layer => vec![self.layers.clone()],
            PruneModule::Intermediate => self.intermediate.clone(),
            PruneModule::KvHeads => self
                .heads
                .iter()
                .map(|h| h.chunks(r).map(|g| g.iter().sum()).collect())
                .collect(),
            PruneModule::QueryHeads => self
                .heads
                .iter()
                .flat_map(|h| h.chunks(r).map(|g| g.to_vec()))
                .collect(),
        }
    }

    /// `log_alpha`s whose deterministic mask with the target's exact counts is the importance
    /// top-k of every row: the kept entries at the clamp's top (where the uniform init sits),
    /// the others below it by 1 to 2, in order of importance, so training refines the ranking
    /// rather than starting from it being absent.
    pub fn log_alphas(&self, spec: &PruningSpec) -> PerModule<Vec<f32>> {
        let (_, hi) = hard_concrete::clamp_range();
        PerModule::from_fn(&spec.modules, |m| {
            let k = spec.target_kept(m);
            self.rows(spec, m)
                .iter()
                .flat_map(|row| {
                    let order = ranking(row);
                    let n = row.len();
                    let mut out = vec![0f32; n];
                    for (rank, &i) in order.iter().enumerate() {
                        out[i] = if rank < k {
                            hi as f32
                        } else {
                            let below = (rank - k) as f32 / (n - k).max(1) as f32;
                            hi as f32 - 1.0 - below
                        };
                    }
                    out
                })
                .collect()
        })
    }

    /// One-shot pruning's masks: exactly 1 on every row's importance top-k, 0 elsewhere (the
    /// kept sets of [`Importance::log_alphas`]' step-0 mask), for [`crate::finalize()`].
    pub fn masks(&self, spec: &PruningSpec) -> HostMasks {
        let values = PerModule::from_fn(&spec.modules, |m| {
            let k = spec.target_kept(m);
            self.rows(spec, m)
                .iter()
                .flat_map(|row| {
                    let mut out = vec![0f32; row.len()];
                    for &i in ranking(row).iter().take(k) {
                        out[i] = 1.0;
                    }
                    out
                })
                .collect()
        });
        HostMasks {
            values,
            spec: spec.clone(),
        }
    }
}

/// Indices of `row` from most to least important (ties: the lower index first; NaN last).
fn ranking(row: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    let key = |i: usize| {
        if row[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            row[i]
        }
    };
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    order
}

/// The source shape an importance file was measured on, as its metadata records it.
fn fingerprint(c: &LlamaConfig) -> String {
    format!(
        "{:?} L={} d={} heads={} kv={} head_dim={} I={} vocab={}",
        c.family(),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim(),
        c.intermediate_size,
        c.vocab_size
    )
}

impl Importance {
    /// Write `importance.safetensors` for `source` (its shape in the metadata, so a file from
    /// another model is refused when read).
    pub fn save(&self, path: &Path, source: &LlamaConfig) -> Result<()> {
        let (l, h, i) = (
            self.heads.len(),
            self.heads[0].len(),
            self.intermediate[0].len(),
        );
        let mut w = WeightMap::new();
        w.insert(
            "heads".into(),
            HostTensor::f32(vec![l, h], self.heads.concat()),
        );
        let inter = self.intermediate.concat();
        w.insert("intermediate".into(), HostTensor::f32(vec![l, i], inter));
        w.insert(
            "hidden".into(),
            HostTensor::f32(vec![self.hidden.len()], self.hidden.clone()),
        );
        w.insert(
            "layers".into(),
            HostTensor::f32(vec![l], self.layers.clone()),
        );
        let meta = BTreeMap::from([
            ("source".to_string(), fingerprint(source)),
            ("tokens".to_string(), self.tokens.to_string()),
        ]);
        safetensors::write(path, &w, &meta)
    }

    /// Read a file [`Importance::save`] wrote for this `source`.
    pub fn load(path: &Path, source: &LlamaConfig) -> Result<Self> {
        let f = SafeTensorsFile::open(path)?;
        let bad = |m: String| Error::format(path, m);
        let want = fingerprint(source);
        match f.metadata().get("source") {
            Some(s) if *s == want => {}
            Some(s) => {
                return Err(bad(format!(
                    "importance scores of another model ({s}); this source is {want}: remove the file to measure again"
                )))
            }
            None => return Err(bad("not an importance file (no source in its metadata)".into())),
        }
        let tokens = f
            .metadata()
            .get("tokens")
            .and_then(|t| t.parse().ok())
            .filter(|&t| t > 0)
            .ok_or_else(|| bad("no calibration token count".into()))?;
        let (l, h, i, d) = (
            source.num_hidden_layers,
            source.num_attention_heads,
            source.intermediate_size,
            source.hidden_size,
        );
        let read = |name: &str, shape: Vec<usize>| -> Result<Vec<f32>> {
            let (s, v) = f.read_f32(name)?;
            if s != shape || v.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(bad(format!(
                    "'{name}' must be {shape:?} finite non-negative scores (it is {s:?})"
                )));
            }
            Ok(v)
        };
        let heads = read("heads", vec![l, h])?;
        let intermediate = read("intermediate", vec![l, i])?;
        Ok(Importance {
            heads: heads.chunks(h).map(<[f32]>::to_vec).collect(),
            intermediate: intermediate.chunks(i).map(<[f32]>::to_vec).collect(),
            hidden: read("hidden", vec![d])?,
            layers: read("layers", vec![l])?,
            tokens,
        })
    }
}
