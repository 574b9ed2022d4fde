//! The L0 mask module: one hard-concrete mask per pruned structure (method §1.2, §11.1), its
//! sampled and deterministic values, and the per-forward multipliers they become.
//!
//! Every mask is stored as a 2-D `log_alpha [rows, n]`, where a row is the unit the spec counts
//! in: hidden `[1, d]`, layer `[1, L]`, intermediate `[L, I]`, kv heads `[L, G]`, query heads
//! `[L·G, r]`. Expected sparsity and deterministic selection work per row.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use rand::Rng;
use shears_core::{HostTensor, WeightMap};
use shears_models::ForwardMasks;

use crate::hard_concrete::{self, ZeroCount};
use crate::per_module::PerModule;
use crate::target::{PruneModule, PruningSpec};

/// The learnable masks of a pruning run (the "masks" parameter group).
#[derive(Module, Debug)]
pub struct L0Masks<B: Backend> {
    /// `log_alpha` of each module in [`PruneModule::ALL`] order; `None` where not pruned.
    pub hidden: Option<Param<Tensor<B, 2>>>,
    pub layer: Option<Param<Tensor<B, 2>>>,
    pub intermediate: Option<Param<Tensor<B, 2>>>,
    pub kv_heads: Option<Param<Tensor<B, 2>>>,
    pub query_heads: Option<Param<Tensor<B, 2>>>,
    #[module(skip)]
    pub spec: PruningSpec,
}

/// Mask values of one forward, per module, as `[rows, n]` f32 tensors.
#[derive(Debug, Clone)]
pub struct MaskValues<B: Backend> {
    pub values: PerModule<Tensor<B, 2>>,
    pub spec: PruningSpec,
}

/// Deterministic mask values on the host, per module, as `[rows, n]` row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMasks {
    pub values: PerModule<Vec<f32>>,
    pub spec: PruningSpec,
}

/// Mask math runs in at least f32: the backend's float type, widened when it is a half type.
fn f32_tensor<B: Backend>(
    data: Vec<f32>,
    rows: usize,
    n: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let t = Tensor::<B, 2>::from_data(TensorData::new(data, [rows, n]), device);
    match t.dtype() {
        DType::F16 | DType::BF16 => t.cast(DType::F32),
        _ => t,
    }
}

type MaskParam<B> = Param<Tensor<B, 2>>;

impl<B: Backend> L0Masks<B> {
    /// Masks for `spec` with `log_alpha` parameters from `params` (modules without one are not
    /// pruned): the one place the five fields are written.
    fn assemble(spec: &PruningSpec, mut params: PerModule<MaskParam<B>>) -> Self {
        let mut take = |m: PruneModule| params.remove(m);
        L0Masks {
            hidden: take(PruneModule::Hidden),
            layer: take(PruneModule::Layer),
            intermediate: take(PruneModule::Intermediate),
            kv_heads: take(PruneModule::KvHeads),
            query_heads: take(PruneModule::QueryHeads),
            spec: spec.clone(),
        }
    }

    /// The `log_alpha` parameters of the pruned modules: the one place the five fields are read.
    fn into_params(self) -> (PerModule<MaskParam<B>>, PruningSpec) {
        let params = [
            (PruneModule::Hidden, self.hidden),
            (PruneModule::Layer, self.layer),
            (PruneModule::Intermediate, self.intermediate),
            (PruneModule::KvHeads, self.kv_heads),
            (PruneModule::QueryHeads, self.query_heads),
        ]
        .into_iter()
        .filter_map(|(m, p)| Some((m, p?)))
        .collect();
        (params, self.spec)
    }

    /// Masks for `spec`, `log_alpha ~ N(5, 0.01)` as the reference initialises them.
    pub fn new(spec: &PruningSpec, rng: &mut impl Rng, device: &B::Device) -> Self {
        let params = PerModule::from_fn(&spec.modules, |m| {
            let (rows, n) = spec.mask_shape(m);
            let data: Vec<f32> = (0..rows * n)
                .map(|_| {
                    let u1: f64 = rng.random::<f64>().max(1e-12);
                    let u2: f64 = rng.random::<f64>();
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (hard_concrete::INIT_MEAN + hard_concrete::INIT_STD * z) as f32
                })
                .collect();
            Param::from_tensor(f32_tensor(data, rows, n, device))
        });
        Self::assemble(spec, params)
    }

    /// Masks with given `log_alpha` values (`[rows, n]` row-major per module), e.g. from a
    /// checkpoint or a test. Values for modules `spec` does not prune are ignored.
    pub fn from_values(
        spec: &PruningSpec,
        values: &PerModule<Vec<f32>>,
        device: &B::Device,
    ) -> Self {
        let params = values
            .iter()
            .filter(|(m, _)| spec.has(*m))
            .map(|(m, v)| {
                let (rows, n) = spec.mask_shape(m);
                assert_eq!(
                    v.len(),
                    rows * n,
                    "{} log_alpha has the wrong size",
                    m.name()
                );
                (
                    m,
                    Param::from_tensor(f32_tensor(v.clone(), rows, n, device)),
                )
            })
            .collect();
        Self::assemble(spec, params)
    }

    /// The clamped `log_alpha` of every pruned module.
    pub fn log_alphas(&self) -> PerModule<Tensor<B, 2>> {
        self.clone().into_params().0.map(|_, p| p.val())
    }

    /// Clamp every `log_alpha` to `[ln 0.01, ln 100]` in place, keeping parameter identities (the
    /// reference does this at the start of every L0 call, so an init of 5 becomes ln 100).
    pub fn clamped(self) -> Self {
        let (lo, hi) = hard_concrete::clamp_range();
        let (params, spec) = self.into_params();
        let params = params.map(|_, p| {
            p.map(|t| {
                let require_grad = t.is_require_grad();
                let t = t.clamp(lo, hi).detach();
                if require_grad {
                    t.require_grad()
                } else {
                    t
                }
            })
        });
        Self::assemble(&spec, params)
    }

    /// A training-time sample (method §2.2): one draw per forward, shared by the whole batch, with
    /// the noise drawn from `rng` on the host so runs are reproducible and resumable.
    pub fn sample(&self, rng: &mut impl Rng) -> MaskValues<B> {
        let eps = hard_concrete::EPSILON as f32;
        let values = self.log_alphas().map(|_, la| {
            let [rows, n] = la.dims();
            let u: Vec<f32> = (0..rows * n)
                .map(|_| rng.random_range(eps..1.0 - eps))
                .collect();
            let u = f32_tensor::<B>(u, rows, n, &la.device());
            hard_concrete::sample(la, u)
        });
        MaskValues {
            values,
            spec: self.spec.clone(),
        }
    }

    /// `P(z ≠ 0)` of every entry, per module.
    pub fn scores(&self) -> PerModule<Tensor<B, 2>> {
        self.log_alphas().map(|_, la| hard_concrete::score(la))
    }

    /// Expected sparsity `1 − Σ score / n` per row, per module (`[rows]`).
    pub fn expected_sparsity(&self) -> PerModule<Tensor<B, 1>> {
        self.scores().map(|_, s| {
            let [rows, _] = s.dims();
            s.mean_dim(1).reshape([rows]).neg().add_scalar(1.0)
        })
    }

    /// The deterministic masks (method §2.4) of the clamped `log_alpha`s, per row: the expected
    /// number of zeros rounded
    /// (`exact_target = false`, during pruning) or exactly the target's (`true`, finalize).
    pub fn deterministic(&self, exact_target: bool) -> HostMasks {
        let values = self.log_alphas().map(|m, la| {
            let [rows, n] = la.dims();
            let (lo, hi) = hard_concrete::clamp_range();
            let data: Vec<f32> = la
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32")
                .into_iter()
                .map(|a| a.clamp(lo as f32, hi as f32))
                .collect();
            let count = if exact_target {
                ZeroCount::Exact(self.spec.target_kept(m))
            } else {
                ZeroCount::ExpectedRounded
            };
            let mut out = Vec::with_capacity(rows * n);
            for r in 0..rows {
                out.extend(hard_concrete::deterministic_row(
                    &data[r * n..(r + 1) * n],
                    count,
                ));
            }
            out
        });
        HostMasks {
            values,
            spec: self.spec.clone(),
        }
    }
}

impl HostMasks {
    /// The values of module `m`, if pruned.
    pub fn get(&self, m: PruneModule) -> Option<&[f32]> {
        self.values.get(m).map(Vec::as_slice)
    }

    /// On a device, as the values of a forward.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> MaskValues<B> {
        MaskValues {
            values: self.values.map_ref(|m, v| {
                let (rows, n) = self.spec.mask_shape(m);
                f32_tensor::<B>(v.clone(), rows, n, device)
            }),
            spec: self.spec.clone(),
        }
    }

    /// As named tensors (`z_hidden`, `z_layer`, ...), for saving next to a finalised model.
    pub fn to_weight_map(&self) -> WeightMap {
        self.values
            .iter()
            .map(|(m, v)| {
                let (rows, n) = self.spec.mask_shape(m);
                (
                    format!("z_{}", m.name()),
                    HostTensor::f32(vec![rows, n], v.clone()),
                )
            })
            .collect()
    }
}

impl<B: Backend> MaskValues<B> {
    fn get(&self, m: PruneModule) -> Option<&Tensor<B, 2>> {
        self.values.get(m)
    }

    /// The multipliers the model applies (`models::ForwardMasks`), in the model's `dtype`:
    /// query heads get `z_kv[l, g] · z_q[l, g, s]`, the layer mask is shared by both sublayers.
    pub fn forward_masks(&self, dtype: DType) -> ForwardMasks<B> {
        let s = &self.spec.source;
        let (l, g, r) = (
            s.num_hidden_layers,
            s.num_kv_heads(),
            self.spec.heads_per_group(),
        );
        let kv = self.get(PruneModule::KvHeads).map(|kv| {
            kv.clone()
                .reshape([l, g, 1])
                .expand([l, g, r])
                .reshape([l, g * r])
        });
        let q = self
            .get(PruneModule::QueryHeads)
            .map(|q| q.clone().reshape([l, g * r]));
        let heads = match (kv, q) {
            (Some(kv), Some(q)) => Some(kv * q),
            (kv, q) => kv.or(q),
        };
        let vec = |m: PruneModule| {
            self.get(m).map(|z| {
                let n = z.dims()[1];
                z.clone().reshape([n]).cast(dtype)
            })
        };
        ForwardMasks {
            hidden: vec(PruneModule::Hidden),
            layer: vec(PruneModule::Layer),
            heads: heads.map(|h| h.cast(dtype)),
            intermediate: self
                .get(PruneModule::Intermediate)
                .map(|z| z.clone().cast(dtype)),
        }
    }
}
