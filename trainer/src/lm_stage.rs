//! Continued pre-training (method §7.2): the same loop without masks and multipliers; one AdamW
//! group over the model weights.

use shears_models::ShearsAutodiff;
use std::collections::BTreeMap;
use std::path::Path;

use crate::optim::ShearsAdamW;
use burn::module::{AutodiffModule, Module};
use burn::optim::{adaptor::OptimizerAdaptor, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor};
use shears_core::formats::safetensors::{self, LazyTensors};
use shears_core::{DType, Error, ModelFiles, Result, WeightMap};
use shears_data::Dataset;
use shears_models::distill::KdSpec;
use shears_models::{load, recompute, Llama};

use crate::compute::Compute;
use crate::config::StageKind;
use crate::driver::{DistillLoss, Stage, StepLosses};
use crate::optim::AdamWSettings;
use crate::parallel::Comm;
use crate::params::{self, NamedParam};
use crate::records::{EvalExtras, StageState, TrainState};
use crate::teacher::{objective, Teacher};
use shears_eval::domain::{batch_tensor, domain_sums, summed_nll, DomainSum, EvalSettings, Part};

/// A continued pre-training run's model and optimizer.
pub struct LmStage<B: ShearsAutodiff> {
    model: Option<Llama<B>>,
    opt: OptimizerAdaptor<ShearsAdamW, Llama<B>, B>,
    settings: AdamWSettings,
    meta: ModelFiles,
    names: Vec<NamedParam>,
    pending: Option<GradientsParams>,
    device: B::Device,
    compute: Compute,
    teacher: Option<Teacher<B::InnerBackend>>,
}

impl<B: ShearsAutodiff> LmStage<B> {
    /// Start training `files`' model.
    pub fn new(files: &ModelFiles, settings: AdamWSettings, device: &B::Device) -> Result<Self> {
        let model = load::from_files::<B>(files, device, DType::F32)?;
        let mut meta = files.clone();
        meta.weights = WeightMap::new();
        Ok(Self::with_meta(model, meta, settings))
    }

    /// Start training a model built in memory (tests, benchmarks); checkpoints then hold its
    /// config and weights but no tokenizer.
    pub fn from_model(model: Llama<B>, settings: AdamWSettings) -> Self {
        let meta = ModelFiles {
            config: model.config.clone(),
            weights: WeightMap::new(),
            tokenizer: None,
            layers: load::layer_shapes(&model),
            source: "<in memory>".into(),
        };
        Self::with_meta(model, meta, settings)
    }

    fn with_meta(model: Llama<B>, meta: ModelFiles, settings: AdamWSettings) -> Self {
        LmStage {
            names: params::named_params::<B, _>(&model),
            device: model.device(),
            model: Some(model),
            opt: settings.init(),
            settings,
            meta,
            pending: None,
            compute: Compute::default(),
            teacher: None,
        }
    }

    /// Distil from `teacher` (its weights in the compute dtype: f32, or bf16 under
    /// bf16-mixed) with weight `alpha` on the KD term (call after [`LmStage::with_compute`]).
    /// `alpha = 0` keeps no teacher: training is exactly the LM loss's.
    pub fn with_teacher(mut self, teacher: &ModelFiles, spec: KdSpec, alpha: f64) -> Result<Self> {
        self.teacher = Teacher::load(teacher, spec, alpha, self.compute.precision, &self.device)?;
        Ok(self)
    }

    /// Compute with `compute`'s precision, optimizer-state precision and checkpointing (call
    /// before the first step; resuming keeps it).
    pub fn with_compute(mut self, compute: Compute) -> Self {
        let model = self.model.take().expect("model");
        self.model = Some(model.with_autocast(compute.autocast()));
        self.opt = self.settings.init_with(compute.state_dtype());
        self.compute = compute;
        self
    }

    /// The pending gradients (after [`Stage::backward`]) under HF names, in HF layout, f32.
    pub fn gradients(&self) -> WeightMap {
        params::hf_gradients(
            self.model(),
            self.pending.as_ref().expect("gradients pending"),
        )
    }

    /// The model as it is.
    pub fn model(&self) -> &Llama<B> {
        self.model.as_ref().expect("model between steps")
    }
}

impl<B: ShearsAutodiff> Stage<B> for LmStage<B> {
    fn kind(&self) -> StageKind {
        StageKind::Train
    }

    fn backward_share(
        &mut self,
        micro: &[Vec<Vec<u32>>],
        _step: usize,
        _seeds: &[u64],
        of: usize,
    ) -> StepLosses {
        let model = self.model();
        let n = of;
        let mut acc = GradientsParams::new();
        let (mut lm, mut kd) = (0.0, 0.0);
        for seqs in micro {
            let ids = batch_tensor::<B>(seqs, &self.device);
            let rows = self
                .teacher
                .as_ref()
                .map(|t| t.model.distill_rows(ids.clone().inner()));
            // The objective on the final hidden states: the mean NLL, or (1 − α)·LM + α·KD.
            let teacher = self.teacher.as_ref().zip(rows.as_ref());
            let mut head = |y: Tensor<B, 3>, ids: Tensor<B, 2, Int>| {
                objective(model, teacher, y, ids, &mut kd)
            };
            if self.compute.by_layers() {
                lm += recompute::backward_by_layers_with_head(
                    model,
                    ids,
                    &|| None,
                    1.0 / n as f64,
                    &mut |g| {
                        let g = GradientsParams::from_grads(g, model);
                        params::accumulate::<B::InnerBackend>(&self.names, &mut acc, g);
                    },
                    &mut head,
                );
            } else {
                let (loss, value) = head(model.hidden_states(ids.clone(), None), ids);
                lm += value;
                let g = GradientsParams::from_grads(loss.div_scalar(n as f64).backward(), model);
                params::accumulate::<B::InnerBackend>(&self.names, &mut acc, g);
            }
        }
        self.pending = Some(acc);
        StepLosses {
            lm: lm / n as f64,
            lagrangian: None,
            distill: self.teacher.as_ref().map(|t| DistillLoss {
                alpha: t.alpha,
                kd: kd / n as f64,
            }),
        }
    }

    fn all_reduce(&mut self, comm: &Comm) -> Result<()> {
        let p = self.pending.as_mut().expect("gradients pending");
        params::all_reduce::<B::InnerBackend>(&self.names, p, comm, &self.device)
    }

    fn device(&self) -> B::Device {
        self.device.clone()
    }

    fn grad_norm(&self) -> f64 {
        let p = self.pending.as_ref().expect("gradients pending");
        params::global_norm::<B::InnerBackend>(&[(&self.names, p)])
    }

    fn scale_grads(&mut self, s: f64) {
        let p = self.pending.as_mut().expect("gradients pending");
        params::scale_grads::<B::InnerBackend>(&self.names, p, s);
    }

    fn apply(&mut self, lr_scale: f64) {
        let g = self.pending.take().expect("gradients pending");
        let model = self.model.take().expect("model");
        self.model = Some(self.opt.step(self.settings.lr * lr_scale, model, g));
    }

    fn discard(&mut self) {
        self.pending = None;
    }

    fn lr(&self, lr_scale: f64) -> f64 {
        self.settings.lr * lr_scale
    }

    fn eval_part(
        &self,
        data: &Dataset,
        s: &EvalSettings,
        part: Part,
    ) -> Result<BTreeMap<String, DomainSum>> {
        let v = self.model().valid();
        let device = self.device.clone();
        domain_sums(data, s, part, |seqs| {
            let ids = batch_tensor::<B::InnerBackend>(seqs, &device);
            summed_nll(v.nll(ids))
        })
    }

    fn eval_extras(&self, _step: usize) -> EvalExtras {
        EvalExtras {
            params: Some(self.model().num_params()),
            pruning: None,
        }
    }

    fn save(&self, dir: &Path) -> Result<StageState> {
        let model = self.model();
        let mut files = self.meta.clone();
        files.layers = load::layer_shapes(model);
        files.write_hf_dir_with(
            dir.join("model"),
            false,
            load::lazy_weights(model, DType::F32),
        )?;
        let mut opt = LazyTensors::new();
        let mut times = BTreeMap::new();
        params::save_adamw(&self.opt, model, "model", &mut opt, &mut times);
        opt.write(dir.join("optimizer.safetensors"), &Default::default())?;
        Ok(StageState::Train(TrainState {
            optimizer_steps: times,
        }))
    }

    fn load(&mut self, dir: &Path, state: &StageState) -> Result<()> {
        let StageState::Train(state) = state else {
            return Err(Error::format(
                dir.join("state.json"),
                "is not a continued pre-training checkpoint",
            ));
        };
        let files = ModelFiles::load_hf_dir(dir.join("model"))?;
        let model = load::from_files::<B>(&files, &self.device, DType::F32)?
            .with_autocast(self.compute.autocast());
        let opt = safetensors::SafeTensorsFile::open(dir.join("optimizer.safetensors"))?;
        let times = &state.optimizer_steps;
        self.opt = params::load_adamw(
            self.settings.init_with(self.compute.state_dtype()),
            &model,
            "model",
            &opt,
            times,
            &self.device,
        )?;
        self.names = params::named_params::<B, _>(&model);
        self.model = Some(model);
        self.pending = None;
        Ok(())
    }
}
