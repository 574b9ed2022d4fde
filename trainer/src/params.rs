//! Parameters by name, for what burn keys by run-local ids: global-norm gradient clipping over
//! several modules, and optimizer state that survives a restart (saved under module paths,
//! loaded onto the new process's parameter ids).

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::optim::ShearsAdamW;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamWState, AdaptiveMomentumState, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use shears_core::formats::safetensors::{LazyTensors, SafeTensorsFile};
use shears_core::{DType, Error, HostTensor, Result, WeightMap};
use shears_models::load::{host_of, visit_params, ParamVisitor};

use crate::parallel::Comm;

/// A float parameter: its module path (`layers.3.self_attn.q_proj.weight`), id, rank and shape.
#[derive(Debug, Clone)]
pub struct NamedParam {
    pub name: String,
    pub id: ParamId,
    pub dims: usize,
    pub shape: Vec<usize>,
}

struct Collect {
    path: Vec<String>,
    out: Vec<NamedParam>,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.out.push(NamedParam {
            name: self.path.join("."),
            id: param.id,
            dims: D,
            shape: param.val().dims().to_vec(),
        });
    }
}

/// Every float parameter of `module`, in visiting order (deterministic).
pub fn named_params<B: Backend, M: Module<B>>(module: &M) -> Vec<NamedParam> {
    let mut c = Collect {
        path: vec![],
        out: vec![],
    };
    module.visit(&mut c);
    c.out
}

/// Call `f::<B, D>(args)` at the parameter's rank `D` (1 to 4): burn's gradient and optimizer
/// maps are typed by rank, the named list only knows it at run time.
macro_rules! by_rank {
    ($p:expr, $f:ident::<$b:ty>($($arg:expr),*)) => {
        match $p.dims {
            1 => $f::<$b, 1>($($arg),*),
            2 => $f::<$b, 2>($($arg),*),
            3 => $f::<$b, 3>($($arg),*),
            4 => $f::<$b, 4>($($arg),*),
            d => panic!("parameter {} has rank {d}", $p.name),
        }
    };
}

fn sum_squares<B: Backend, const D: usize>(grads: &GradientsParams, id: ParamId) -> f64 {
    let Some(g) = grads.get::<B, D>(id) else {
        return 0.0;
    };
    let v: Vec<f64> = g
        .square()
        .sum()
        .into_data()
        .convert::<f64>()
        .into_vec()
        .expect("scalar");
    v[0]
}

/// The L2 norm over all gradients of `groups` (each a parameter list and its gradients),
/// accumulated in f64. Non-finite when any gradient is.
pub fn global_norm<B: Backend>(groups: &[(&[NamedParam], &GradientsParams)]) -> f64 {
    let mut total = 0.0f64;
    for (params, grads) in groups {
        for p in params.iter() {
            total += by_rank!(p, sum_squares::<B>(grads, p.id));
        }
    }
    total.sqrt()
}

fn scale_one<B: Backend, const D: usize>(grads: &mut GradientsParams, id: ParamId, s: f64) {
    if let Some(g) = grads.remove::<B, D>(id) {
        grads.register(id, g.mul_scalar(s));
    }
}

/// Multiply every gradient of `params` in `grads` by `s`.
pub fn scale_grads<B: Backend>(params: &[NamedParam], grads: &mut GradientsParams, s: f64) {
    for p in params {
        by_rank!(p, scale_one::<B>(grads, p.id, s));
    }
}

fn add_one<B: Backend, const D: usize>(
    acc: &mut GradientsParams,
    new: &mut GradientsParams,
    id: ParamId,
) {
    if let Some(g) = new.remove::<B, D>(id) {
        let sum = match acc.remove::<B, D>(id) {
            Some(a) => a + g,
            None => g,
        };
        acc.register(id, sum);
    }
}

/// `acc += new` for the gradients of `params` (gradient accumulation in a fixed order).
pub fn accumulate<B: Backend>(
    params: &[NamedParam],
    acc: &mut GradientsParams,
    mut new: GradientsParams,
) {
    for p in params {
        by_rank!(p, add_one::<B>(acc, &mut new, p.id));
    }
}

fn has_grad<B: Backend, const D: usize>(grads: &GradientsParams, id: ParamId) -> bool {
    grads.get::<B, D>(id).is_some()
}

fn reduce_one<B: Backend, const D: usize>(
    grads: &mut GradientsParams,
    p: &NamedParam,
    comm: &Comm,
    device: &B::Device,
) -> Result<()> {
    let g = match grads.remove::<B, D>(p.id) {
        Some(g) => g,
        None => {
            let shape: [usize; D] = p.shape.clone().try_into().expect("rank D shape");
            Tensor::<B, D>::zeros(shape, device)
        }
    };
    grads.register(p.id, comm.sum_tensor(g)?);
    Ok(())
}

/// Sum the gradients of `params` over the ranks of `comm`, one all-reduce per parameter in the
/// list's order (the same on every rank: module paths, not run-local ids). A parameter whose
/// gradient some rank lacks is summed with zeros there; one no rank has stays absent.
pub fn all_reduce<B: Backend>(
    params: &[NamedParam],
    grads: &mut GradientsParams,
    comm: &Comm,
    device: &B::Device,
) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let present: Vec<f64> = params
        .iter()
        .map(|p| f64::from(u8::from(by_rank!(p, has_grad::<B>(grads, p.id)))))
        .collect();
    let present = comm.sum_f64::<B>(&present, device)?;
    for (p, k) in params.iter().zip(present) {
        if k > 0.0 {
            by_rank!(p, reduce_one::<B>(grads, p, comm, device))?;
        }
    }
    Ok(())
}

/// The gradients `grads` holds for `model`'s parameters, under HF names and in HF layout, f32
/// (for comparisons with PyTorch).
pub fn hf_gradients<B: shears_models::ShearsAutodiff>(
    model: &shears_models::Llama<B>,
    grads: &GradientsParams,
) -> WeightMap {
    struct Collect<'a>(&'a GradientsParams, WeightMap);
    impl<B: shears_models::ShearsAutodiff> ParamVisitor<B> for Collect<'_> {
        fn visit<const D: usize>(
            &mut self,
            name: String,
            p: &Param<Tensor<B, D>>,
            transposed: bool,
        ) {
            if let Some(g) = self.0.get::<B::InnerBackend, D>(p.id) {
                let g = if transposed { g.transpose() } else { g };
                self.1.insert(name, host_of(g, DType::F32));
            }
        }
    }
    let mut c = Collect(grads, WeightMap::new());
    visit_params(model, &mut c);
    c.1
}

/// AdamW moments of one parameter group, keyed `{prefix}.{path}.m` / `.v` (f32 when written,
/// whatever precision the state is kept in), plus each parameter's step count. The moments are
/// added to `tensors` lazily: each host copy is made when the writer reaches it.
pub fn save_adamw<B: shears_models::ShearsAutodiff, M: AutodiffModule<B>>(
    optim: &OptimizerAdaptor<ShearsAdamW, M, B>,
    module: &M,
    prefix: &str,
    tensors: &mut LazyTensors<'static>,
    times: &mut BTreeMap<String, usize>,
) {
    let mut record = optim.to_record();
    for p in named_params::<B, M>(module) {
        let Some(rec) = record.remove(&p.id) else {
            continue;
        };
        let key = format!("{prefix}.{}", p.name);
        let time = by_rank!(p, push_moments::<B>(rec, &key, tensors));
        times.insert(key, time);
    }
}

fn push_moments<B: shears_models::ShearsAutodiff, const D: usize>(
    rec: AdaptorRecord<ShearsAdamW, B>,
    key: &str,
    tensors: &mut LazyTensors<'static>,
) -> usize {
    let state: AdamWState<B::InnerBackend, D> = rec.into_state::<D>();
    let m = state.momentum;
    for (suffix, t) in [("m", m.moment_1), ("v", m.moment_2)] {
        let shape = t.dims().to_vec();
        tensors.push(format!("{key}.{suffix}"), DType::F32, shape, move || {
            Cow::Owned(host_of(t, DType::F32))
        });
    }
    m.time
}

fn state_of<B: shears_models::ShearsAutodiff, const D: usize>(
    time: usize,
    m: &HostTensor,
    v: &HostTensor,
    device: &B::Device,
) -> AdaptorRecord<ShearsAdamW, B> {
    let t = |h: &HostTensor| {
        let t = Tensor::<B::InnerBackend, D>::from_data(
            TensorData::new(h.to_f32_vec(), h.shape.clone()),
            device,
        );
        t.cast(burn::tensor::DType::F32)
    };
    AdaptorRecord::from_state::<D>(AdamWState {
        momentum: AdaptiveMomentumState {
            time,
            moment_1: t(m),
            moment_2: t(v),
            max_moment_2: None,
        },
    })
}

/// Load the state [`save_adamw`] wrote onto `module`'s parameters (matched by path).
pub fn load_adamw<B: shears_models::ShearsAutodiff, M: AutodiffModule<B>>(
    optim: OptimizerAdaptor<ShearsAdamW, M, B>,
    module: &M,
    prefix: &str,
    file: &SafeTensorsFile,
    times: &BTreeMap<String, usize>,
    device: &B::Device,
) -> Result<OptimizerAdaptor<ShearsAdamW, M, B>> {
    let mut record: <OptimizerAdaptor<ShearsAdamW, M, B> as Optimizer<M, B>>::Record =
        Default::default();
    for p in named_params::<B, M>(module) {
        let key = format!("{prefix}.{}", p.name);
        let Some(&time) = times.get(&key) else {
            continue;
        };
        // One parameter's moments at a time: resuming never holds the whole state on the host.
        let get = |s: &str| {
            let name = format!("{key}.{s}");
            if file.entry(&name).is_none() {
                return Err(Error::format(
                    file.path(),
                    format!("holds no optimizer state '{name}'"),
                ));
            }
            file.tensor(&name)
        };
        let (m, v) = (get("m")?, get("v")?);
        if m.shape != p.shape || v.shape != p.shape {
            return Err(Error::format(
                file.path(),
                format!(
                    "optimizer state '{key}' has shapes {:?} / {:?}, the parameter is {:?}",
                    m.shape, v.shape, p.shape
                ),
            ));
        }
        let rec = by_rank!(p, state_of::<B>(time, &m, &v, device));
        record.insert(p.id, rec);
    }
    Ok(optim.load_record(record))
}

fn host_grad<B: Backend, const D: usize>(
    grads: &GradientsParams,
    id: ParamId,
) -> Option<shears_core::HostTensor> {
    grads.get::<B, D>(id).map(|g| host_of(g, DType::F32))
}

/// The gradients `grads` holds for `params`, keyed `{prefix}.{path}`, f32 on the host (tests
/// and diagnostics).
pub fn named_gradients<B: Backend>(
    prefix: &str,
    params: &[NamedParam],
    grads: &GradientsParams,
) -> WeightMap {
    let mut out = WeightMap::new();
    for p in params {
        if let Some(h) = by_rank!(p, host_grad::<B>(grads, p.id)) {
            out.insert(format!("{prefix}.{}", p.name), h);
        }
    }
    out
}
