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

/// Which share of the eval batches a data-parallel rank scores: batch `j` of each domain goes
/// to rank `j % world`. [`Part::WHOLE`] is everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub rank: usize,
    pub world: usize,
}

impl Part {
    /// Every batch (one rank).
    pub const WHOLE: Part = Part { rank: 0, world: 1 };

    fn owns(&self, batch: usize) -> bool {
        batch % self.world.max(1) == self.rank
    }
}

/// One domain's summed NLL and token count: what ranks add up before dividing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainSum {
    pub nll: f64,
    pub tokens: u64,
}

/// The summed NLL and token count of every domain of `data` over `part`'s share of the eval
/// batches, with `nll` scoring a batch of equal-length sequences. Every domain is present (with
/// zeros where the part scores nothing).
pub fn domain_sums(
    data: &Dataset,
    settings: &EvalSettings,
    part: Part,
    mut nll: impl FnMut(&[Vec<u32>]) -> (f64, u64),
) -> Result<BTreeMap<String, DomainSum>> {
    let mut out = BTreeMap::new();
    for domain in data.domains() {
        let (mut sum, mut seen) = (DomainSum::default(), 0usize);
        for (j, batch) in data.eval_batches(&domain, settings.batch)?.enumerate() {
            let batch = batch?;
            let take = match settings.sequences {
                Some(cap) => cap.saturating_sub(seen).min(batch.len()),
                None => batch.len(),
            };
            if take == 0 {
                break;
            }
            seen += take;
            if !part.owns(j) {
                continue;
            }
            let seqs: Vec<Vec<u32>> = batch[..take]
                .iter()
                .map(|s| s[..settings.seq_len.min(s.len())].to_vec())
                .collect();
            let (s, c) = nll(&seqs);
            sum.nll += s;
            sum.tokens += c;
        }
        out.insert(domain, sum);
    }
    Ok(out)
}

/// Mean losses of summed NLLs; a domain without a scored token is an error.
pub fn losses_of(sums: &BTreeMap<String, DomainSum>) -> Result<BTreeMap<String, DomainEval>> {
    sums.iter()
        .map(|(domain, s)| {
            if s.tokens == 0 {
                return Err(shears_core::Error::invalid(format!(
                    "domain '{domain}' has no eval sequences"
                )));
            }
            Ok((
                domain.clone(),
                DomainEval {
                    loss: s.nll / s.tokens as f64,
                    tokens: s.tokens,
                },
            ))
        })
        .collect()
}

/// Evaluate every domain of `data` with `nll`, which scores a batch of equal-length sequences.
pub fn domain_losses(
    data: &Dataset,
    settings: &EvalSettings,
    nll: impl FnMut(&[Vec<u32>]) -> (f64, u64),
) -> Result<BTreeMap<String, DomainEval>> {
    losses_of(&domain_sums(data, settings, Part::WHOLE, nll)?)
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
