//! The pruning stage (method §4): masked forward with sampled hard-concrete masks, cross-entropy
//! plus the Lagrangian, and three AdamW groups: model weights and mask `log_alpha`s by descent,
//! Lagrange multipliers by ascent. Evaluation uses the deterministic masks of the expected
//! structure; the reference losses from the source use the unmasked model.

use shears_models::ShearsAutodiff;
use std::collections::BTreeMap;
use std::path::Path;

use crate::optim::ShearsAdamW;
use crate::teacher::{objective, Teacher, TeacherRows};
use burn::optim::{adaptor::OptimizerAdaptor, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use shears_core::formats::safetensors::{self, LazyTensors};
use shears_core::{DType, Error, ModelFiles, Result, WeightMap};
use shears_data::Dataset;
use shears_models::distill::KdSpec;
use shears_models::loss::scalar;
use shears_models::{load, recompute, Llama};
use shears_pruning::constraint::target_at;
use shears_pruning::model::GroupGradients;
use shears_pruning::size::{expected_params, Dims};
use shears_pruning::{L0Masks, Lagrangian, PerModule, PruningModel, PruningSpec};

use crate::compute::Compute;
use crate::config::StageKind;
use crate::driver::{DistillLoss, Stage, StepLosses};
use crate::optim::AdamWSettings;
use crate::parallel::Comm;
use crate::params::{self, NamedParam};
use crate::records::{EvalExtras, PruneState, PruningProgress, StageState};
use shears_eval::domain::{batch_tensor, domain_sums, summed_nll, DomainSum, EvalSettings, Part};

/// Learning rates of the three groups and the target warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneRates {
    /// AdamW for the model weights (the reference: lr 1e-4, betas 0.9/0.95, eps 1e-8, no decay);
    /// the masks and multipliers use the same Adam without weight decay.
    pub model: AdamWSettings,
    /// Learning rate of the masks' `log_alpha`s (`lag_lr`, 1.0).
    pub mask_lr: f64,
    /// Learning rate of the multipliers, applied as ascent (1.0).
    pub multiplier_lr: f64,
    /// Steps over which the target sparsity ramps from 0 (640 in the reference recipe).
    pub lagrangian_warmup_steps: usize,
}

impl PruneRates {
    /// The rates of a resolved pruning plan.
    pub fn of(plan: &crate::config::PruneConfig) -> Self {
        PruneRates {
            model: plan.optim.adamw(),
            mask_lr: plan.pruning.mask_lr,
            multiplier_lr: plan.pruning.multiplier_lr,
            lagrangian_warmup_steps: plan.pruning.lagrangian_warmup_steps.unwrap_or(0),
        }
    }
}

impl Default for PruneRates {
    /// The reference recipe's (method §7), from the plan defaults: lr 1e-4, betas 0.9 / 0.95,
    /// mask and multiplier rates 1.0, a target ramp over 20% of 3200 steps (640).
    fn default() -> Self {
        use crate::config::{OptimSettings, PruningSettings, RunSettings, StageKind};
        let steps = RunSettings::default().steps;
        let p = PruningSettings::default();
        PruneRates {
            model: OptimSettings::default().adamw(),
            mask_lr: p.mask_lr,
            multiplier_lr: p.multiplier_lr,
            lagrangian_warmup_steps: p
                .lagrangian_warmup_steps
                .unwrap_or(StageKind::Prune.lagrangian_warmup_steps(steps)),
        }
    }
}

type Opt<M, B> = OptimizerAdaptor<ShearsAdamW, M, B>;

/// A pruning run's model state and optimizers.
pub struct PruneStage<B: ShearsAutodiff> {
    state: Option<PruningModel<B>>,
    opt_model: Opt<Llama<B>, B>,
    opt_masks: Opt<L0Masks<B>, B>,
    opt_multipliers: Opt<Lagrangian<B>, B>,
    rates: PruneRates,
    /// Config and tokenizer of the source, written with every checkpoint's model.
    meta: ModelFiles,
    names: [Vec<NamedParam>; 3],
    pending: Option<[GradientsParams; 3]>,
    device: B::Device,
    compute: Compute,
    /// KD during pruning (method §12): the frozen source (or another model) as teacher of the
    /// masked student.
    teacher: Option<Teacher<B::InnerBackend>>,
}

fn aux(rates: &PruneRates) -> AdamWSettings {
    AdamWSettings {
        weight_decay: 0.0,
        ..rates.model
    }
}

impl<B: ShearsAutodiff> PruneStage<B> {
    /// Start pruning `files`' model towards `spec` (masks initialised from `seed`).
    pub fn new(
        files: &ModelFiles,
        spec: &PruningSpec,
        rates: PruneRates,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self> {
        Self::new_with(files, spec, rates, seed, None, device)
    }

    /// [`PruneStage::new`] with the masks' initial `log_alpha`s given (importance init).
    pub fn new_with(
        files: &ModelFiles,
        spec: &PruningSpec,
        rates: PruneRates,
        seed: u64,
        init: Option<&PerModule<Vec<f32>>>,
        device: &B::Device,
    ) -> Result<Self> {
        let model = load::from_files::<B>(files, device, DType::F32)?;
        let state = match init {
            Some(las) => PruningModel::from_log_alphas(model, spec, las)?,
            None => {
                let mut rng = StdRng::seed_from_u64(seed ^ 0x6d61_736b);
                PruningModel::new(model, spec, &mut rng)?
            }
        };
        let mut meta = files.clone();
        meta.weights = WeightMap::new();
        Ok(Self::with_meta(state, meta, rates))
    }

    /// Prune a state built in memory (tests, benchmarks); checkpoints then hold its config and
    /// weights but no tokenizer.
    pub fn from_state(state: PruningModel<B>, rates: PruneRates) -> Self {
        let meta = ModelFiles {
            config: state.model.config.clone(),
            weights: WeightMap::new(),
            tokenizer: None,
            layers: load::layer_shapes(&state.model),
            source: "<in memory>".into(),
        };
        Self::with_meta(state, meta, rates)
    }

    fn with_meta(state: PruningModel<B>, meta: ModelFiles, rates: PruneRates) -> Self {
        let device = state.model.device();
        let mut s = PruneStage {
            opt_model: rates.model.init(),
            opt_masks: aux(&rates).init(),
            opt_multipliers: aux(&rates).init(),
            names: [vec![], vec![], vec![]],
            state: Some(state),
            rates,
            meta,
            pending: None,
            device,
            compute: Compute::default(),
            teacher: None,
        };
        s.refresh_names();
        s
    }

    /// Distil from `teacher` while pruning, with weight `alpha` on the KD term (call after
    /// [`PruneStage::with_compute`]); `alpha = 0` keeps no teacher.
    pub fn with_teacher(mut self, teacher: &ModelFiles, spec: KdSpec, alpha: f64) -> Result<Self> {
        self.teacher = Teacher::load(teacher, spec, alpha, self.compute.precision, &self.device)?;
        Ok(self)
    }

    /// Compute with `compute`'s precision, optimizer-state precision (of the model weights; the
    /// masks' and multipliers' moments stay f32) and checkpointing. Call before the first step;
    /// resuming keeps it.
    pub fn with_compute(mut self, compute: Compute) -> Self {
        let mut st = self.state.take().expect("state");
        st.model = st.model.with_autocast(compute.autocast());
        self.state = Some(st);
        self.opt_model = self.rates.model.init_with(compute.state_dtype());
        self.compute = compute;
        self
    }

    fn refresh_names(&mut self) {
        let st = self.state();
        self.names = [
            params::named_params::<B, _>(&st.model),
            params::named_params::<B, _>(&st.masks),
            params::named_params::<B, _>(&st.lagrangian),
        ];
    }

    /// The pending gradients (after [`Stage::backward`]) of all three groups, keyed
    /// `model.{path}`, `masks.{path}` and `multipliers.{path}` (the multipliers' negated for
    /// ascent), f32 on the host.
    pub fn gradients(&self) -> WeightMap {
        let p = self.pending.as_ref().expect("gradients pending");
        let mut out = WeightMap::new();
        for ((prefix, names), g) in ["model", "masks", "multipliers"]
            .into_iter()
            .zip(&self.names)
            .zip(p)
        {
            out.extend(params::named_gradients::<B::InnerBackend>(prefix, names, g));
        }
        out
    }

    /// The state between steps.
    pub fn state(&self) -> &PruningModel<B> {
        self.state.as_ref().expect("state between steps")
    }

    fn spec(&self) -> &PruningSpec {
        &self.state().masks.spec
    }
}

/// One micro-batch of a pruning step.
struct Micro<B: ShearsAutodiff> {
    ids: Tensor<B, 2, Int>,
    /// Seeds the mask sample (the same for every recomputed segment).
    seed: u64,
    step: usize,
    warmup: usize,
    /// `1 / micro-batches`.
    scale: f64,
    by_layers: bool,
}

/// The gradients of one micro-batch's `(1 − α)·LM + α·KD` on the masked student (layer by
/// layer when checkpointing) plus the Lagrangian, handed to `add` per parameter group.
/// Returns the mean NLL and the Lagrangian's value.
fn distill_micro<B: ShearsAutodiff>(
    state: &PruningModel<B>,
    m: Micro<B>,
    teacher: TeacherRows<'_, B::InnerBackend>,
    kd: &mut f64,
    add: &mut dyn FnMut(GroupGradients),
) -> (f64, f64) {
    let model = &state.model;
    let masks = || Some(state.sample_masks(&mut StdRng::seed_from_u64(m.seed)));
    let mut head =
        |y: Tensor<B, 3>, ids: Tensor<B, 2, Int>| objective(model, Some(teacher), y, ids, kd);
    let lm = if m.by_layers {
        recompute::backward_by_layers_with_head(
            model,
            m.ids,
            &masks,
            m.scale,
            &mut |g| add(state.split_gradients(g)),
            &mut head,
        )
    } else {
        let fm = masks().expect("masks");
        let y = model.hidden_states_masked(m.ids.clone(), None, Some(&fm));
        let (loss, value) = head(y, m.ids);
        add(state.split_gradients(loss.mul_scalar(m.scale).backward()));
        value
    };
    let term = state.lagrangian_term(m.step, m.warmup);
    let lag = scalar(term.clone());
    add(state.split_gradients(term.mul_scalar(m.scale).backward()));
    (lm, lag)
}

impl<B: ShearsAutodiff> Stage<B> for PruneStage<B> {
    fn kind(&self) -> StageKind {
        StageKind::Prune
    }

    fn backward_share(
        &mut self,
        micro: &[Vec<Vec<u32>>],
        step: usize,
        seeds: &[u64],
        of: usize,
    ) -> StepLosses {
        let state = self.state.take().expect("state").clamp_masks();
        let n = of;
        let mut acc = [
            GradientsParams::new(),
            GradientsParams::new(),
            GradientsParams::new(),
        ];
        let (mut lm, mut lag, mut kd) = (0.0, 0.0, 0.0);
        let names = &self.names;
        let add = |acc: &mut [GradientsParams; 3], g: GroupGradients| {
            params::accumulate::<B::InnerBackend>(&names[0], &mut acc[0], g.model);
            params::accumulate::<B::InnerBackend>(&names[1], &mut acc[1], g.masks);
            params::accumulate::<B::InnerBackend>(&names[2], &mut acc[2], g.multipliers);
        };
        for (i, seqs) in micro.iter().enumerate() {
            let ids = batch_tensor::<B>(seqs, &self.device);
            if let Some(t) = &self.teacher {
                let rows = t.model.distill_rows(ids.clone().inner());
                let micro = Micro {
                    ids,
                    seed: seeds[i],
                    step,
                    warmup: self.rates.lagrangian_warmup_steps,
                    scale: 1.0 / n as f64,
                    by_layers: self.compute.by_layers(),
                };
                let (l, g) = distill_micro(&state, micro, (t, &rows), &mut kd, &mut |g| {
                    add(&mut acc, g)
                });
                lm += l;
                lag = g;
                continue;
            }
            if self.compute.by_layers() {
                // The LM loss segment by segment (masks re-sampled from the same seed for each),
                // then the Lagrangian, which depends on the masks' parameters only.
                let seed = seeds[i];
                let masks = || Some(state.sample_masks(&mut StdRng::seed_from_u64(seed)));
                lm += recompute::backward_by_layers(
                    &state.model,
                    ids,
                    &masks,
                    1.0 / n as f64,
                    &mut |g| add(&mut acc, state.split_gradients(g)),
                );
                let term = state.lagrangian_term(step, self.rates.lagrangian_warmup_steps);
                lag = scalar(term.clone());
                add(
                    &mut acc,
                    state.split_gradients(term.div_scalar(n as f64).backward()),
                );
                continue;
            }
            let mut rng = StdRng::seed_from_u64(seeds[i]);
            let loss = state.forward_train(ids, &mut rng, step, self.rates.lagrangian_warmup_steps);
            lm += scalar(loss.lm.clone());
            lag = scalar(loss.lagrangian.clone());
            let total = loss.total().div_scalar(n as f64);
            add(&mut acc, state.split_gradients(total.backward()));
        }
        self.state = Some(state);
        self.pending = Some(acc);
        StepLosses {
            lm: lm / n as f64,
            lagrangian: Some(lag),
            distill: self.teacher.as_ref().map(|t| DistillLoss {
                alpha: t.alpha,
                kd: kd / n as f64,
            }),
        }
    }

    fn all_reduce(&mut self, comm: &Comm) -> Result<()> {
        let p = self.pending.as_mut().expect("gradients pending");
        for (names, g) in self.names.iter().zip(p.iter_mut()) {
            params::all_reduce::<B::InnerBackend>(names, g, comm, &self.device)?;
        }
        Ok(())
    }

    fn device(&self) -> B::Device {
        self.device.clone()
    }

    fn grad_norm(&self) -> f64 {
        let p = self.pending.as_ref().expect("gradients pending");
        params::global_norm::<B::InnerBackend>(&[
            (&self.names[0], &p[0]),
            (&self.names[1], &p[1]),
            (&self.names[2], &p[2]),
        ])
    }

    fn scale_grads(&mut self, s: f64) {
        let p = self.pending.as_mut().expect("gradients pending");
        for (names, g) in self.names.iter().zip(p.iter_mut()) {
            params::scale_grads::<B::InnerBackend>(names, g, s);
        }
    }

    fn apply(&mut self, lr_scale: f64) {
        let [gm, gk, gl] = self.pending.take().expect("gradients pending");
        let PruningModel {
            model,
            masks,
            lagrangian,
        } = self.state.take().expect("state");
        let r = self.rates;
        let model = self.opt_model.step(r.model.lr * lr_scale, model, gm);
        let masks = self.opt_masks.step(r.mask_lr * lr_scale, masks, gk);
        let lagrangian = self
            .opt_multipliers
            .step(r.multiplier_lr * lr_scale, lagrangian, gl);
        self.state = Some(PruningModel {
            model,
            masks,
            lagrangian,
        });
    }

    fn discard(&mut self) {
        self.pending = None;
    }

    fn lr(&self, lr_scale: f64) -> f64 {
        self.rates.model.lr * lr_scale
    }

    fn eval_part(
        &self,
        data: &Dataset,
        s: &EvalSettings,
        part: Part,
    ) -> Result<BTreeMap<String, DomainSum>> {
        let v = self.state().valid();
        let device = self.device.clone();
        domain_sums(data, s, part, |seqs| {
            let ids = batch_tensor::<B::InnerBackend>(seqs, &device);
            summed_nll(v.nll_eval(ids, false))
        })
    }

    fn eval_source_part(
        &self,
        data: &Dataset,
        s: &EvalSettings,
        part: Part,
    ) -> Result<BTreeMap<String, DomainSum>> {
        let v = self.state().valid();
        let device = self.device.clone();
        domain_sums(data, s, part, |seqs| {
            let ids = batch_tensor::<B::InnerBackend>(seqs, &device);
            summed_nll(v.model.nll(ids))
        })
    }

    fn eval_extras(&self, step: usize) -> EvalExtras {
        let v = self.state().valid();
        let masks = v.masks.clone().clamped();
        let spec = self.spec();
        let warmup = self.rates.lagrangian_warmup_steps;
        let progress = PruningProgress {
            expected_sparsity: masks.expected_sparsity().map(|_, e| scalar(e.mean())),
            target_sparsity: PerModule::from_fn(&spec.modules, |k| {
                target_at(spec.target_sparsity(k), step, warmup)
            }),
            final_target_sparsity: PerModule::from_fn(&spec.modules, |k| spec.target_sparsity(k)),
            lambda: v.lagrangian.values(),
            expected_prunable_params: scalar(expected_params(&masks)),
            target_prunable_params: Dims::of_target(&spec.target, &spec.source).prunable(),
            source_prunable_params: Dims::of(&spec.source).prunable(),
        };
        EvalExtras {
            params: None,
            pruning: Some(progress),
        }
    }

    fn save(&self, dir: &Path) -> Result<StageState> {
        let st = self.state();
        let mut files = self.meta.clone();
        files.layers = load::layer_shapes(&st.model);
        files.write_hf_dir_with(
            dir.join("model"),
            false,
            load::lazy_weights(&st.model, DType::F32),
        )?;
        let mut masks = WeightMap::new();
        for (m, t) in st.masks.log_alphas() {
            masks.insert(
                format!("log_alpha.{}", m.name()),
                load::host_of(t, DType::F32),
            );
        }
        masks.insert(
            "lambda_1".into(),
            load::host_of(st.lagrangian.lambda_1.val(), DType::F32),
        );
        masks.insert(
            "lambda_2".into(),
            load::host_of(st.lagrangian.lambda_2.val(), DType::F32),
        );
        safetensors::write(dir.join("pruning.safetensors"), &masks, &Default::default())?;
        let mut opt = LazyTensors::new();
        let mut times = BTreeMap::new();
        params::save_adamw(&self.opt_model, &st.model, "model", &mut opt, &mut times);
        params::save_adamw(&self.opt_masks, &st.masks, "masks", &mut opt, &mut times);
        params::save_adamw(
            &self.opt_multipliers,
            &st.lagrangian,
            "multipliers",
            &mut opt,
            &mut times,
        );
        opt.write(dir.join("optimizer.safetensors"), &Default::default())?;
        let spec = self.spec();
        Ok(StageState::Prune(PruneState {
            optimizer_steps: times,
            target: spec.target,
            modules: spec.modules.clone(),
        }))
    }

    fn load(&mut self, dir: &Path, state: &StageState) -> Result<()> {
        let StageState::Prune(state) = state else {
            return Err(Error::format(
                dir.join("state.json"),
                "is not a pruning checkpoint",
            ));
        };
        if state.target != self.spec().target || state.modules != self.spec().modules {
            return Err(Error::format(
                dir.join("state.json"),
                "was written for another target or other masked modules than this run's plan",
            ));
        }
        let spec = self.spec().clone();
        let files = ModelFiles::load_hf_dir(dir.join("model"))?;
        let model = load::from_files::<B>(&files, &self.device, DType::F32)?
            .with_autocast(self.compute.autocast());
        let (masks, lagrangian) = crate::checkpoint::read_pruning::<B>(dir, &spec, &self.device)?;
        let opt = safetensors::SafeTensorsFile::open(dir.join("optimizer.safetensors"))?;
        let times = &state.optimizer_steps;
        let r = self.rates;
        self.opt_model = params::load_adamw(
            r.model.init_with(self.compute.state_dtype()),
            &model,
            "model",
            &opt,
            times,
            &self.device,
        )?;
        self.opt_masks =
            params::load_adamw(aux(&r).init(), &masks, "masks", &opt, times, &self.device)?;
        self.opt_multipliers = params::load_adamw(
            aux(&r).init(),
            &lagrangian,
            "multipliers",
            &opt,
            times,
            &self.device,
        )?;
        self.state = Some(PruningModel {
            model,
            masks,
            lagrangian,
        });
        self.pending = None;
        self.refresh_names();
        Ok(())
    }
}
