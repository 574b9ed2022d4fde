//! Per-domain evaluation: mean token cross-entropy over each domain's eval shards, in fixed
//! order, the number the trainer logs and dynamic batch loading reads (method §5.3: the sum of
//! CE over the domain's tokens divided by their count).

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use shears_core::Result;
use shears_data::Dataset;

/// One domain's result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DomainEval {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// Tokens scored (each sequence of n tokens scores n − 1).
    pub tokens: u64,
}

impl DomainEval {
    /// `exp(loss)`.
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// What to evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalSettings {
    /// Sequences per domain (default all).
    pub sequences: Option<usize>,
    /// Tokens per sequence (the first `seq_len` of each stored sequence).
    pub seq_len: usize,
    /// Sequences per forward.
    pub batch: usize,
}

/// Token ids `[batch, len]` on `device`.
pub fn batch_tensor<B: Backend>(seqs: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let len = seqs[0].len();
    let v: Vec<i64> = seqs
        .iter()
        .flat_map(|s| s.iter().map(|&i| i as i64))
        .collect();
    Tensor::from_data(TensorData::new(v, [seqs.len(), len]), device)
}

/// Summed next-token NLL (f64) and token count of a per-position NLL `[batch, len-1]`
/// (`Llama::nll`).
pub fn summed_nll<B: Backend>(nll: Tensor<B, 2>) -> (f64, u64) {
    let n = nll.dims()[0] * nll.dims()[1];
    let v: Vec<f64> = nll.into_data().convert::<f64>().into_vec().expect("nll");
    (v.iter().sum(), n as u64)
}

/// Evaluate every domain of `data` with `nll`, which scores a batch of equal-length sequences.
pub fn domain_losses(
    data: &Dataset,
    settings: &EvalSettings,
    mut nll: impl FnMut(&[Vec<u32>]) -> (f64, u64),
) -> Result<BTreeMap<String, DomainEval>> {
    let mut out = BTreeMap::new();
    for domain in data.domains() {
        let (mut sum, mut count, mut seen) = (0.0f64, 0u64, 0usize);
        for batch in data.eval_batches(&domain, settings.batch)? {
            let batch = batch?;
            let take = match settings.sequences {
                Some(cap) => cap.saturating_sub(seen).min(batch.len()),
                None => batch.len(),
            };
            if take == 0 {
                break;
            }
            let seqs: Vec<Vec<u32>> = batch[..take]
                .iter()
                .map(|s| s[..settings.seq_len.min(s.len())].to_vec())
                .collect();
            let (s, c) = nll(&seqs);
            sum += s;
            count += c;
            seen += take;
        }
        if count == 0 {
            return Err(shears_core::Error::invalid(format!(
                "domain '{domain}' has no eval sequences"
            )));
        }
        out.insert(
            domain,
            DomainEval {
                loss: sum / count as f64,
                tokens: count,
            },
        );
    }
    Ok(out)
}

/// Per-domain eval of a model as stored (plain forward, f32).
pub fn eval_model<B: shears_models::ShearsOps>(
    files: &shears_core::ModelFiles,
    data: &Dataset,
    s: &EvalSettings,
    device: &B::Device,
) -> Result<BTreeMap<String, DomainEval>> {
    let model = shears_models::load::from_files::<B>(files, device, shears_core::DType::F32)?;
    domain_losses(data, s, |seqs| {
        let ids = batch_tensor::<B>(seqs, device);
        summed_nll(model.nll(ids))
    })
}
