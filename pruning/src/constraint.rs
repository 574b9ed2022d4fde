//! The targeted constraint (method §4.2): for every pruned module, a Lagrangian term
//! `mean_rows(λ1·(e − t) + λ2·(e − t)²)` on expected sparsity fractions, with `t` ramped linearly
//! from 0 to the module's target over the warm-up. The multipliers are trained by gradient
//! *ascent* (the trainer negates their gradients).

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use crate::per_module::PerModule;
use crate::target::{PruneModule, PruningSpec};

/// Lagrange multipliers, one pair per pruned module (the "multipliers" parameter group), f32.
#[derive(Module, Debug)]
pub struct Lagrangian<B: Backend> {
    /// Linear multipliers, one per module in `modules` order.
    pub lambda_1: Param<Tensor<B, 1>>,
    /// Quadratic multipliers.
    pub lambda_2: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub modules: Vec<PruneModule>,
}

/// The target sparsity at optimizer step `step`: a linear ramp from 0 over `warmup` steps.
pub fn target_at(target: f64, step: usize, warmup: usize) -> f64 {
    if warmup == 0 {
        target
    } else {
        target * (step as f64 / warmup as f64).min(1.0)
    }
}

impl<B: Backend> Lagrangian<B> {
    /// Multipliers at zero (the reference's initialisation) for the modules of `spec`.
    pub fn new(spec: &PruningSpec, device: &B::Device) -> Self {
        Self::from_values(
            spec,
            &vec![0.0; spec.modules.len()],
            &vec![0.0; spec.modules.len()],
            device,
        )
    }

    /// Multipliers with given values (one per module of `spec`, in order).
    pub fn from_values(
        spec: &PruningSpec,
        lambda_1: &[f32],
        lambda_2: &[f32],
        device: &B::Device,
    ) -> Self {
        let mk = |v: &[f32]| {
            let t = Tensor::<B, 1>::from_floats(v, device);
            let t = match t.dtype() {
                burn::tensor::DType::F16 | burn::tensor::DType::BF16 => {
                    t.cast(burn::tensor::DType::F32)
                }
                _ => t,
            };
            Param::from_tensor(t)
        };
        Lagrangian {
            lambda_1: mk(lambda_1),
            lambda_2: mk(lambda_2),
            modules: spec.modules.clone(),
        }
    }

    /// `Σ_m mean_rows(λ1_m·(e_m − t_m) + λ2_m·(e_m − t_m)²)` for expected sparsities `expected`
    /// (per module, per row) and targets `targets` (per module, already ramped).
    pub fn loss(
        &self,
        expected: &PerModule<Tensor<B, 1>>,
        targets: &PerModule<f64>,
    ) -> Tensor<B, 1> {
        let device = self.lambda_1.val().device();
        let mut total = Tensor::<B, 1>::zeros([1], &device).cast(self.lambda_1.val().dtype());
        for (i, &m) in self.modules.iter().enumerate() {
            let gap = expected[m].clone().sub_scalar(targets[m]);
            let l1 = self.lambda_1.val().narrow(0, i, 1);
            let l2 = self.lambda_2.val().narrow(0, i, 1);
            let term = gap.clone() * l1 + gap.square() * l2;
            total = total + term.mean();
        }
        total
    }

    /// Current values `[λ1, λ2]` per module, for logs.
    pub fn values(&self) -> PerModule<[f32; 2]> {
        let l1: Vec<f32> = self
            .lambda_1
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32");
        let l2: Vec<f32> = self
            .lambda_2
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32");
        self.modules
            .iter()
            .zip(l1.into_iter().zip(l2))
            .map(|(m, (a, b))| (*m, [a, b]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp() {
        assert_eq!(target_at(0.5, 0, 640), 0.0);
        assert_eq!(target_at(0.5, 320, 640), 0.25);
        assert_eq!(target_at(0.5, 10_000, 640), 0.5);
        assert_eq!(target_at(0.5, 0, 0), 0.5);
    }
}
