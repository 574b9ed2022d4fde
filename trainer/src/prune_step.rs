//! One step of the pruning stage (method §4.3): sample masks, masked forward, cross-entropy plus
//! Lagrangian, backward, then three AdamW updates: model weights and mask `log_alpha`s by
//! descent, Lagrange multipliers by ascent (their gradients are negated).

use crate::optim::ShearsAdamW;
use burn::optim::{adaptor::OptimizerAdaptor, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use shears_models::Llama;
use shears_models::ShearsAutodiff;
use shears_pruning::{L0Masks, Lagrangian, PruneModule, PruningModel};

use crate::optim::AdamWSettings;

/// Learning rates and optimizer settings of the three groups.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PruneStepSettings {
    /// AdamW for the model weights (the reference: lr 1e-4, betas 0.9/0.95, eps 1e-8, no decay).
    pub model: AdamWSettings,
    /// Learning rate of the masks' `log_alpha`s (`lag_lr`, 1.0).
    pub mask_lr: f64,
    /// Learning rate of the multipliers, applied as ascent (1.0).
    pub multiplier_lr: f64,
    /// Steps over which the target sparsity ramps from 0 (640 in the reference recipe).
    pub lagrangian_warmup_steps: usize,
}

impl Default for PruneStepSettings {
    fn default() -> Self {
        PruneStepSettings {
            model: AdamWSettings {
                lr: 1e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            mask_lr: 1.0,
            multiplier_lr: 1.0,
            lagrangian_warmup_steps: 640,
        }
    }
}

/// What one step measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruneStepReport {
    pub step: usize,
    pub lm_loss: f64,
    pub lagrangian_loss: f64,
    /// Mean expected sparsity per module before the update.
    pub expected_sparsity: Vec<(PruneModule, f64)>,
    /// Target sparsity per module at this step.
    pub target_sparsity: Vec<(PruneModule, f64)>,
}

/// A pruning run's state and its three optimizers.
pub struct PruneTrainer<B: ShearsAutodiff> {
    state: Option<PruningModel<B>>,
    opt_model: OptimizerAdaptor<ShearsAdamW, Llama<B>, B>,
    opt_masks: OptimizerAdaptor<ShearsAdamW, L0Masks<B>, B>,
    opt_multipliers: OptimizerAdaptor<ShearsAdamW, Lagrangian<B>, B>,
    settings: PruneStepSettings,
    rng: StdRng,
    step: usize,
}

fn scalar<B: AutodiffBackend>(t: Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("scalar")[0]
}

impl<B: ShearsAutodiff> PruneTrainer<B> {
    /// Train `state` with `settings`; `seed` drives mask sampling.
    pub fn new(state: PruningModel<B>, settings: PruneStepSettings, seed: u64) -> Self {
        // The masks and multipliers use the same Adam (betas 0.9/0.95, eps 1e-8, no decay).
        let aux = AdamWSettings {
            weight_decay: 0.0,
            ..settings.model
        };
        PruneTrainer {
            state: Some(state),
            opt_model: settings.model.init(),
            opt_masks: aux.init(),
            opt_multipliers: aux.init(),
            settings,
            rng: StdRng::seed_from_u64(seed),
            step: 0,
        }
    }

    /// The state between steps.
    pub fn state(&self) -> &PruningModel<B> {
        self.state.as_ref().expect("state present between steps")
    }

    /// One step on `ids` `[batch, len]`; `lr_scale` is the schedule's multiplier for all three
    /// groups (method §4.3: the scheduler scales the masks' and multipliers' rates too).
    pub fn step(&mut self, ids: Tensor<B, 2, Int>, lr_scale: f64) -> PruneStepReport {
        let state = self.state.take().expect("state present").clamp_masks();
        let loss = state.forward_train(
            ids,
            &mut self.rng,
            self.step,
            self.settings.lagrangian_warmup_steps,
        );
        let report = PruneStepReport {
            step: self.step,
            lm_loss: scalar(loss.lm.clone()),
            lagrangian_loss: scalar(loss.lagrangian.clone()),
            expected_sparsity: loss
                .expected_sparsity
                .iter()
                .map(|(m, e)| (*m, scalar(e.clone().mean())))
                .collect(),
            target_sparsity: loss.target_sparsity.clone(),
        };
        let grads = state.split_gradients(loss.total().backward());
        let PruningModel {
            model,
            masks,
            lagrangian,
        } = state;
        let s = &self.settings;
        let model = self
            .opt_model
            .step(s.model.lr * lr_scale, model, grads.model);
        let masks = self
            .opt_masks
            .step(s.mask_lr * lr_scale, masks, grads.masks);
        let lagrangian =
            self.opt_multipliers
                .step(s.multiplier_lr * lr_scale, lagrangian, grads.multipliers);
        self.state = Some(PruningModel {
            model,
            masks,
            lagrangian,
        });
        self.step += 1;
        report
    }
}
