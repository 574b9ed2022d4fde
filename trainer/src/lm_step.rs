//! One causal-LM training step: forward, mean next-token cross-entropy, backward, AdamW update.

use crate::optim::ShearsAdamW;
use burn::module::{AutodiffModule, Param};
use burn::optim::{adaptor::OptimizerAdaptor, GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, Int, Tensor};
use shears_core::{DType, WeightMap};
use shears_models::load::{host_of, visit_params, ParamVisitor};
use shears_models::Llama;
use shears_models::ShearsAutodiff;

use crate::optim::AdamWSettings;

/// A model and its optimizer, stepped on batches of token ids.
pub struct LmTrainer<B: ShearsAutodiff> {
    model: Option<Llama<B>>,
    optim: OptimizerAdaptor<ShearsAdamW, Llama<B>, B>,
    settings: AdamWSettings,
    steps: usize,
}

impl<B: ShearsAutodiff> LmTrainer<B> {
    /// Start training `model` with AdamW `settings`.
    pub fn new(model: Llama<B>, settings: AdamWSettings) -> Self {
        LmTrainer {
            model: Some(model),
            optim: settings.init(),
            settings,
            steps: 0,
        }
    }

    /// The model as it is now.
    pub fn model(&self) -> &Llama<B> {
        self.model.as_ref().expect("model present between steps")
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Loss and gradients (HF names and layout, f32) of `ids` `[batch, len]`, without updating.
    pub fn loss_and_gradients(&self, ids: Tensor<B, 2, Int>) -> (f32, WeightMap) {
        let model = self.model();
        let loss = model.loss(ids);
        let value = scalar(&loss);
        let grads = loss.backward();
        struct Collect<'a, B: AutodiffBackend>(&'a B::Gradients, WeightMap);
        impl<B: AutodiffBackend> ParamVisitor<B> for Collect<'_, B> {
            fn visit<const D: usize>(
                &mut self,
                name: String,
                p: &Param<Tensor<B, D>>,
                transposed: bool,
            ) {
                if let Some(g) = p.val().grad(self.0) {
                    let g = if transposed { g.transpose() } else { g };
                    self.1.insert(name, host_of(g, DType::F32));
                }
            }
        }
        let mut c = Collect::<B>(&grads, WeightMap::new());
        visit_params(model, &mut c);
        (value, c.1)
    }

    /// One step on `ids`; returns the loss before the update.
    pub fn step(&mut self, ids: Tensor<B, 2, Int>) -> f32 {
        let model = self.model.take().expect("model present between steps");
        let loss = model.loss(ids);
        let value = scalar(&loss);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.model = Some(self.optim.step(self.settings.lr, model, grads));
        self.steps += 1;
        value
    }

    /// The trained model without autodiff tracking.
    pub fn into_inner(self) -> Llama<B::InnerBackend> {
        self.model.expect("model present").valid()
    }
}

fn scalar<B: AutodiffBackend>(t: &Tensor<B, 1>) -> f32 {
    t.clone()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32")[0]
}
