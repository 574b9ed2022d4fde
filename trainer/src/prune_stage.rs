//! The pruning stage (method §4): masked forward with sampled hard-concrete masks, cross-entropy
//! plus the Lagrangian, and three AdamW groups: model weights and mask `log_alpha`s by descent,
//! Lagrange multipliers by ascent. Evaluation uses the deterministic masks of the expected
//! structure; the reference losses from the source use the unmasked model.

use shears_models::ShearsAutodiff;
use std::collections::BTreeMap;
use std::path::Path;

use crate::optim::ShearsAdamW;
use burn::optim::{adaptor::OptimizerAdaptor, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use rand::{rngs::StdRng, SeedableRng};
use serde_json::{json, Map, Value};
use shears_core::formats::safetensors;
use shears_core::{DType, Error, ModelFiles, Result, WeightMap};
use shears_data::Dataset;
use shears_models::{load, Llama};
use shears_pruning::constraint::target_at;
use shears_pruning::size::{expected_params, Dims};
use shears_pruning::{L0Masks, Lagrangian, PruneModule, PruningModel, PruningSpec};

use crate::config::StageKind;
use crate::driver::{Stage, StepLosses};
use crate::eval::{batch_tensor, domain_losses, summed_nll, DomainEval, EvalSettings};
use crate::optim::AdamWSettings;
use crate::params::{self, NamedParam};

/// Learning rates of the three groups and the target warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneRates {
    pub model: AdamWSettings,
    pub mask_lr: f64,
    pub multiplier_lr: f64,
    pub lagrangian_warmup_steps: usize,
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
}

fn scalar<B: burn::tensor::backend::Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("scalar")[0]
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
        let model = load::from_files::<B>(files, device, DType::F32)?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6d61_736b);
        let state = PruningModel::new(model, spec, &mut rng)?;
        let mut meta = files.clone();
        meta.weights = WeightMap::new();
        let mut s = PruneStage {
            opt_model: rates.model.init(),
            opt_masks: aux(&rates).init(),
            opt_multipliers: aux(&rates).init(),
            names: [vec![], vec![], vec![]],
            state: Some(state),
            rates,
            meta,
            pending: None,
            device: device.clone(),
        };
        s.refresh_names();
        Ok(s)
    }

    fn refresh_names(&mut self) {
        let st = self.state();
        self.names = [
            params::named_params::<B, _>(&st.model),
            params::named_params::<B, _>(&st.masks),
            params::named_params::<B, _>(&st.lagrangian),
        ];
    }

    /// The state between steps.
    pub fn state(&self) -> &PruningModel<B> {
        self.state.as_ref().expect("state between steps")
    }

    fn spec(&self) -> &PruningSpec {
        &self.state().masks.spec
    }
}

impl<B: ShearsAutodiff> Stage<B> for PruneStage<B> {
    fn kind(&self) -> StageKind {
        StageKind::Prune
    }

    fn backward(
        &mut self,
        micro: &[Vec<Vec<u32>>],
        step: usize,
        seeds: &[u64],
        poison: bool,
    ) -> StepLosses {
        let state = self.state.take().expect("state").clamp_masks();
        let n = micro.len();
        let mut acc = [
            GradientsParams::new(),
            GradientsParams::new(),
            GradientsParams::new(),
        ];
        let (mut lm, mut lag) = (0.0, 0.0);
        for (i, seqs) in micro.iter().enumerate() {
            let ids = batch_tensor::<B>(seqs, &self.device);
            let mut rng = StdRng::seed_from_u64(seeds[i]);
            let loss = state.forward_train(ids, &mut rng, step, self.rates.lagrangian_warmup_steps);
            lm += scalar(loss.lm.clone());
            lag = scalar(loss.lagrangian.clone());
            let mut total = loss.total().div_scalar(n as f64);
            if poison && i == 0 {
                total = total.mul_scalar(f64::NAN);
                lm = f64::NAN;
            }
            let g = state.split_gradients(total.backward());
            params::accumulate::<B::InnerBackend>(&self.names[0], &mut acc[0], g.model);
            params::accumulate::<B::InnerBackend>(&self.names[1], &mut acc[1], g.masks);
            params::accumulate::<B::InnerBackend>(&self.names[2], &mut acc[2], g.multipliers);
        }
        self.state = Some(state);
        self.pending = Some(acc);
        StepLosses {
            lm: lm / n as f64,
            lagrangian: Some(lag),
        }
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

    fn eval(&self, data: &Dataset, s: &EvalSettings) -> Result<BTreeMap<String, DomainEval>> {
        let v = self.state().valid();
        let device = self.device.clone();
        domain_losses(data, s, |seqs| {
            let ids = batch_tensor::<B::InnerBackend>(seqs, &device);
            summed_nll(v.nll_eval(ids, false))
        })
    }

    fn eval_source(
        &self,
        data: &Dataset,
        s: &EvalSettings,
    ) -> Result<BTreeMap<String, DomainEval>> {
        let v = self.state().valid();
        let device = self.device.clone();
        domain_losses(data, s, |seqs| {
            let ids = batch_tensor::<B::InnerBackend>(seqs, &device);
            summed_nll(v.model.nll(ids))
        })
    }

    fn eval_extras(&self, step: usize) -> Map<String, Value> {
        let v = self.state().valid();
        let masks = v.masks.clone().clamped();
        let spec = self.spec();
        let mut m = Map::new();
        let expected: BTreeMap<&str, f64> = masks
            .expected_sparsity()
            .into_iter()
            .map(|(k, e)| (k.name(), scalar(e.mean())))
            .collect();
        let target: BTreeMap<&str, f64> = spec
            .modules
            .iter()
            .map(|k| {
                (
                    k.name(),
                    target_at(
                        spec.target_sparsity(*k),
                        step,
                        self.rates.lagrangian_warmup_steps,
                    ),
                )
            })
            .collect();
        let final_target: BTreeMap<&str, f64> = spec
            .modules
            .iter()
            .map(|k| (k.name(), spec.target_sparsity(*k)))
            .collect();
        let lambdas: BTreeMap<&str, [f32; 2]> = v
            .lagrangian
            .values()
            .into_iter()
            .map(|(k, a, b)| (k.name(), [a, b]))
            .collect();
        m.insert("expected_sparsity".into(), json!(expected));
        m.insert("target_sparsity".into(), json!(target));
        m.insert("final_target_sparsity".into(), json!(final_target));
        m.insert("lambda".into(), json!(lambdas));
        m.insert(
            "expected_prunable_params".into(),
            json!(scalar(expected_params(&masks))),
        );
        m.insert(
            "target_prunable_params".into(),
            json!(Dims::of_target(&spec.target, &spec.source).prunable()),
        );
        m.insert(
            "source_prunable_params".into(),
            json!(Dims::of(&spec.source).prunable()),
        );
        m
    }

    fn save(&self, dir: &Path) -> Result<Value> {
        let st = self.state();
        let mut files = self.meta.clone();
        files.weights = load::to_weights(&st.model, DType::F32);
        files.layers = load::layer_shapes(&st.model);
        files.write_hf_dir(dir.join("model"), None, false)?;
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
        let mut opt = WeightMap::new();
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
        safetensors::write(dir.join("optimizer.safetensors"), &opt, &Default::default())?;
        let spec = self.spec();
        Ok(json!({
            "optimizer_steps": times,
            "target": spec.target,
            "modules": spec.modules,
        }))
    }

    fn load(&mut self, dir: &Path, state: &Value) -> Result<()> {
        let spec = self.spec().clone();
        let files = ModelFiles::load_hf_dir(dir.join("model"))?;
        let model = load::from_files::<B>(&files, &self.device, DType::F32)?;
        let (masks, lagrangian) = read_pruning::<B>(dir, &spec, &self.device)?;
        let opt =
            safetensors::SafeTensorsFile::open(dir.join("optimizer.safetensors"))?.all_tensors()?;
        let times: BTreeMap<String, usize> =
            serde_json::from_value(state["optimizer_steps"].clone()).map_err(|e| {
                Error::format(dir.join("state.json"), format!("optimizer_steps: {e}"))
            })?;
        let r = self.rates;
        self.opt_model =
            params::load_adamw(r.model.init(), &model, "model", &opt, &times, &self.device)?;
        self.opt_masks =
            params::load_adamw(aux(&r).init(), &masks, "masks", &opt, &times, &self.device)?;
        self.opt_multipliers = params::load_adamw(
            aux(&r).init(),
            &lagrangian,
            "multipliers",
            &opt,
            &times,
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

/// The masks and multipliers of a checkpoint's `pruning.safetensors`.
pub fn read_pruning<B: burn::tensor::backend::Backend>(
    dir: &Path,
    spec: &PruningSpec,
    device: &B::Device,
) -> Result<(L0Masks<B>, Lagrangian<B>)> {
    let path = dir.join("pruning.safetensors");
    let f = safetensors::SafeTensorsFile::open(&path)?;
    let mut las: Vec<(PruneModule, Vec<f32>)> = vec![];
    for m in &spec.modules {
        let (shape, v) = f.read_f32(&format!("log_alpha.{}", m.name()))?;
        let (rows, n) = spec.mask_shape(*m);
        if shape != [rows, n] {
            return Err(Error::format(
                &path,
                format!(
                    "log_alpha.{} has shape {shape:?}, the plan's target needs [{rows}, {n}]",
                    m.name()
                ),
            ));
        }
        las.push((*m, v));
    }
    let (_, l1) = f.read_f32("lambda_1")?;
    let (_, l2) = f.read_f32("lambda_2")?;
    if l1.len() != spec.modules.len() || l2.len() != spec.modules.len() {
        return Err(Error::format(
            &path,
            "the multipliers do not match the pruned modules",
        ));
    }
    Ok((
        L0Masks::from_values(spec, &las, device),
        Lagrangian::from_values(spec, &l1, &l2, device),
    ))
}
