//! Calibration for activation importance (method §12): which sequences of the prepared data the
//! scores are measured on, and where a pruning run's scores come from (a file, or a measurement
//! that the run then keeps as `importance.safetensors`).

use std::path::Path;

use shears_core::{Error, ModelFiles, Result};
use shears_data::{Dataset, Split};
use shears_models::{load, ShearsOps};
use shears_pruning::Importance;

use crate::config::PruningSettings;

/// The file a run keeps its importance scores in.
pub const IMPORTANCE_FILE: &str = "importance.safetensors";

/// `n` training sequences, spread over the domains (in name order, the remainder to the first)
/// and evenly over each domain's split, in batches of at most `batch`: the same sequences for
/// the same data on every machine.
pub fn calibration_batches(data: &Dataset, n: usize, batch: usize) -> Result<Vec<Vec<Vec<u32>>>> {
    let domains = data.domains();
    let mut seqs = Vec::with_capacity(n);
    for (k, d) in domains.iter().enumerate() {
        let split = data.split(d, Split::Train)?;
        let want = n / domains.len() + usize::from(k < n % domains.len());
        let have = split.len();
        if have == 0 || want == 0 {
            continue;
        }
        let take = (want as u64).min(have);
        for j in 0..take {
            seqs.push(split.sequence(j * have / take)?);
        }
    }
    if seqs.is_empty() {
        return Err(Error::invalid(
            "no training sequences to calibrate importance on",
        ));
    }
    Ok(seqs
        .chunks(batch.max(1))
        .map(<[Vec<u32>]>::to_vec)
        .collect())
}

/// The importance scores of `files`' model for a pruning run in `run`: read from
/// `settings.importance_file`, else from the run's own earlier file, else measured on
/// `settings.calib` calibration sequences (f32, no graph, on `device`) and returned with the
/// note that they are new (the caller writes them into the run).
pub fn importance<B: ShearsOps>(
    settings: &PruningSettings,
    files: &ModelFiles,
    data: &Dataset,
    run: &Path,
    device: &B::Device,
) -> Result<(Importance, bool)> {
    let own = run.join(IMPORTANCE_FILE);
    if let Some(p) = &settings.importance_file {
        return Ok((Importance::load(p, &files.config)?, false));
    }
    if own.is_file() {
        return Ok((Importance::load(&own, &files.config)?, false));
    }
    let model = load::from_files::<B>(files, device, shears_core::DType::F32)?;
    let batches = calibration_batches(data, settings.calib, 4)?;
    Ok((Importance::measure(&model, &batches)?, true))
}
