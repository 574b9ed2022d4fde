//! The distillation teacher both stages share (method §7.2; during pruning, method §12): a
//! frozen model forward only, on the inner (non-autodiff) backend, and the objective on a
//! student's final hidden states, `(1 − α)·LM + α·KD` (or the LM loss without a teacher).

use burn::tensor::{Int, Tensor};
use shears_core::{DType, ModelFiles, Result};
use shears_models::distill::KdSpec;
use shears_models::loss::scalar;
use shears_models::{load, Llama, ShearsAutodiff, ShearsOps};

use crate::compute::Precision;

/// The distillation teacher.
pub struct Teacher<B: ShearsOps> {
    pub model: Llama<B>,
    pub spec: KdSpec,
    /// Weight of the KD term; the LM loss gets `1 − alpha`.
    pub alpha: f64,
}

impl<B: ShearsOps> Teacher<B> {
    /// `files`' model on `device`, its weights in the compute dtype (f32, or bf16 under
    /// bf16-mixed); `None` for `alpha = 0` (training is then exactly the LM loss's).
    pub fn load(
        files: &ModelFiles,
        spec: KdSpec,
        alpha: f64,
        precision: Precision,
        device: &B::Device,
    ) -> Result<Option<Self>> {
        if alpha <= 0.0 {
            return Ok(None);
        }
        let dtype = match precision {
            Precision::F32 => DType::F32,
            Precision::Bf16Mixed => DType::BF16,
        };
        let model = load::from_files::<B>(files, device, dtype)?;
        Ok(Some(Teacher { model, spec, alpha }))
    }
}

/// A teacher with its rows for the micro-batch at hand (`Llama::distill_rows` of the ids).
pub type TeacherRows<'a, B> = (&'a Teacher<B>, &'a Tensor<B, 2>);

/// The step objective on the student's final hidden states `y` for `ids`, given the teacher and
/// its rows for the same ids (`Llama::distill_rows`): the tensor to differentiate and the mean
/// NLL's value; the mean KD value is added to `kd`.
pub fn objective<B: ShearsAutodiff>(
    model: &Llama<B>,
    teacher: Option<TeacherRows<'_, B::InnerBackend>>,
    y: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    kd: &mut f64,
) -> (Tensor<B, 1>, f64) {
    let value = |t: &Tensor<B, 1>| scalar(t.clone());
    let Some((t, rows)) = teacher else {
        let loss = model.token_nll(y, ids).mean();
        let v = value(&loss);
        return (loss, v);
    };
    let (sur, v) = model.distill_surrogate(
        y.clone(),
        ids.clone(),
        &t.model,
        rows.clone(),
        &t.spec,
        t.alpha,
    );
    *kd += v.kd;
    if t.alpha < 1.0 {
        let loss = model.token_nll(y, ids).mean();
        let nll = value(&loss);
        (loss.mul_scalar(1.0 - t.alpha) + sur, nll)
    } else {
        (sur, v.nll)
    }
}
