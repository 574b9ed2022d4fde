//! A model under pruning: the LLaMA weights, the L0 masks and the Lagrange multipliers, kept as
//! three modules so the trainer steps them as three parameter groups (method §4.3): the weights
//! and masks by descent, the multipliers by ascent.

use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use rand::Rng;
use shears_core::{Error, Result};
use shears_models::{ForwardMasks, Llama, ShearsAutodiff, ShearsOps};

use crate::constraint::{target_at, Lagrangian};
use crate::masks::{HostMasks, L0Masks};
use crate::per_module::PerModule;
use crate::target::PruningSpec;

/// The three parameter groups of a pruning run.
#[derive(Module, Debug)]
pub struct PruningModel<B: Backend> {
    pub model: Llama<B>,
    pub masks: L0Masks<B>,
    pub lagrangian: Lagrangian<B>,
}

/// The losses of one training forward.
#[derive(Debug, Clone)]
pub struct PruningLoss<B: Backend> {
    /// Next-token cross-entropy under the sampled masks.
    pub lm: Tensor<B, 1>,
    /// The Lagrangian penalty.
    pub lagrangian: Tensor<B, 1>,
    /// Expected sparsity per module and row.
    pub expected_sparsity: PerModule<Tensor<B, 1>>,
    /// Target sparsity per module at this step (after the warm-up ramp).
    pub target_sparsity: PerModule<f64>,
}

impl<B: Backend> PruningLoss<B> {
    /// `lm + lagrangian`, what is differentiated.
    pub fn total(&self) -> Tensor<B, 1> {
        self.lm.clone() + self.lagrangian.clone()
    }
}

impl<B: ShearsOps> PruningModel<B> {
    /// Start pruning `model` towards `spec`'s target with fresh masks and zero multipliers.
    pub fn new(model: Llama<B>, spec: &PruningSpec, rng: &mut impl Rng) -> Result<Self> {
        check_model(&model, spec)?;
        let device = model.device();
        Ok(PruningModel {
            masks: L0Masks::new(spec, rng, &device),
            lagrangian: Lagrangian::new(spec, &device),
            model,
        })
    }

    /// [`PruningModel::new`] with the masks' `log_alpha`s given (an importance init, method §12).
    pub fn from_log_alphas(
        model: Llama<B>,
        spec: &PruningSpec,
        log_alphas: &PerModule<Vec<f32>>,
    ) -> Result<Self> {
        check_model(&model, spec)?;
        let device = model.device();
        Ok(PruningModel {
            masks: L0Masks::from_values(spec, log_alphas, &device),
            lagrangian: Lagrangian::new(spec, &device),
            model,
        })
    }

    /// Clamp the masks' `log_alpha` in place; call before every training forward, as the
    /// reference does at every L0 call.
    pub fn clamp_masks(mut self) -> Self {
        self.masks = self.masks.clamped();
        self
    }

    /// One training forward (method §1.3, §4.2): sample the masks once for the batch, run the
    /// masked model, and add the Lagrangian with targets ramped over `warmup` steps.
    pub fn forward_train(
        &self,
        ids: Tensor<B, 2, Int>,
        rng: &mut impl Rng,
        step: usize,
        warmup: usize,
    ) -> PruningLoss<B> {
        let masks = self.sample_masks(rng);
        let lm = self.model.loss_masked(ids, &masks);
        let (lagrangian, expected_sparsity, target_sparsity) = self.lagrangian_parts(step, warmup);
        PruningLoss {
            lm: lm.clone(),
            lagrangian: lagrangian.cast(lm.dtype()),
            expected_sparsity,
            target_sparsity,
        }
    }

    /// One sample of the training masks, in the model's compute dtype (what
    /// [`PruningModel::forward_train`] multiplies in; the same `rng` state gives the same masks).
    pub fn sample_masks(&self, rng: &mut impl Rng) -> ForwardMasks<B> {
        self.masks
            .sample(rng)
            .forward_masks(self.model.compute_dtype())
    }

    /// The Lagrangian term of [`PruningModel::forward_train`] alone, f32 (it depends on the
    /// masks' `log_alpha` and the multipliers, not on the batch).
    pub fn lagrangian_term(&self, step: usize, warmup: usize) -> Tensor<B, 1> {
        self.lagrangian_parts(step, warmup)
            .0
            .cast(burn::tensor::DType::F32)
    }

    #[allow(clippy::type_complexity)]
    fn lagrangian_parts(
        &self,
        step: usize,
        warmup: usize,
    ) -> (Tensor<B, 1>, PerModule<Tensor<B, 1>>, PerModule<f64>) {
        let spec = &self.masks.spec;
        let target_sparsity = PerModule::from_fn(&spec.modules, |m| {
            target_at(spec.target_sparsity(m), step, warmup)
        });
        let expected_sparsity = self.masks.expected_sparsity();
        let lagrangian = self.lagrangian.loss(&expected_sparsity, &target_sparsity);
        (lagrangian, expected_sparsity, target_sparsity)
    }

    /// Per-position next-token NLL `[batch, len-1]` under deterministic masks (see
    /// [`PruningModel::forward_eval`]), through the fused LM head where available.
    pub fn nll_eval(&self, ids: Tensor<B, 2, Int>, exact_target: bool) -> Tensor<B, 2> {
        let masks = self
            .masks
            .deterministic(exact_target)
            .to_device::<B>(&self.model.device())
            .forward_masks(self.model.compute_dtype());
        self.model.nll_masked(ids, &masks)
    }

    /// Logits under deterministic masks: the expected structure (`exact_target = false`, what
    /// evaluation during pruning uses) or exactly the target's (`true`, what finalize keeps).
    pub fn forward_eval(
        &self,
        ids: Tensor<B, 2, Int>,
        exact_target: bool,
    ) -> (Tensor<B, 3>, HostMasks) {
        let host = self.masks.deterministic(exact_target);
        let masks = host
            .to_device::<B>(&self.model.device())
            .forward_masks(self.model.compute_dtype());
        (self.model.forward_masked(ids, &masks), host)
    }
}

/// Gradients of the three groups; the multipliers' are negated so a descent optimizer ascends.
pub struct GroupGradients {
    pub model: GradientsParams,
    pub masks: GradientsParams,
    pub multipliers: GradientsParams,
}

impl<B: ShearsAutodiff> PruningModel<B> {
    /// Split the gradients of a backward pass into the three groups, negating the multipliers'
    /// (gradient ascent, method §4.3 and pitfall §10 item 1).
    pub fn split_gradients(&self, mut grads: B::Gradients) -> GroupGradients {
        let model = GradientsParams::from_module(&mut grads, &self.model);
        let masks = GradientsParams::from_module(&mut grads, &self.masks);
        let mut multipliers = GradientsParams::from_module(&mut grads, &self.lagrangian);
        for id in [self.lagrangian.lambda_1.id, self.lagrangian.lambda_2.id] {
            if let Some(g) = multipliers.remove::<B::InnerBackend, 1>(id) {
                multipliers.register(id, g.neg());
            }
        }
        GroupGradients {
            model,
            masks,
            multipliers,
        }
    }

    /// The model without autodiff tracking.
    pub fn valid(&self) -> PruningModel<B::InnerBackend> {
        AutodiffModule::valid(self)
    }
}

/// Pruning needs a model whose config is the spec's source and whose layers are uniform.
fn check_model<B: Backend>(model: &Llama<B>, spec: &PruningSpec) -> Result<()> {
    let uniform = spec.source.uniform_layer_shapes();
    let layers = shears_models::load::layer_shapes(model);
    if layers != uniform {
        return Err(Error::invalid(
            "pruning needs a source model with uniform layers (an already pruned, non-uniform model cannot be pruned again yet)",
        ));
    }
    if model.config.hidden_size != spec.source.hidden_size
        || model.config.vocab_size != spec.source.vocab_size
    {
        return Err(Error::invalid(
            "the model does not match the pruning spec's source config",
        ));
    }
    Ok(())
}
