//! Optimizer settings with PyTorch's meanings and defaults (burn's own `AdamWConfig` defaults
//! differ: eps 1e-5, weight decay 1e-4), and [`ShearsAdamW`], the AdamW every stage steps: burn's
//! update formula, run by the backend's fused in-place kernel where it has one
//! (`ShearsOps::adamw_kernel`, one multi-threaded pass per parameter instead of a dozen
//! allocating ops) and by the same composition of tensor ops elsewhere. Its state is burn's
//! `AdamWState`, so checkpoints are unchanged.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use serde::{Deserialize, Serialize};
use shears_models::ops::AdamWStep;
use shears_models::ShearsOps;

/// AdamW as `torch.optim.AdamW` defines it (decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWSettings {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the square root of the second moment.
    pub eps: f32,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f32,
}

impl AdamWSettings {
    /// `torch.optim.AdamW`'s own defaults (lr 1e-3, betas 0.9 / 0.999, eps 1e-8, weight decay
    /// 1e-2), for benchmarks and parity tests against PyTorch. A run's optimizer comes from its
    /// plan ([`crate::config::OptimSettings`], the one place plan defaults live), never from here.
    pub fn pytorch() -> Self {
        AdamWSettings {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWSettings {
    /// burn's config with every field set from these settings.
    /// The optimizer for a module, with these settings (no per-tensor clipping: the trainer
    /// clips by global norm).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
    ) -> OptimizerAdaptor<ShearsAdamW, M, B>
    where
        B::InnerBackend: ShearsOps,
    {
        self.init_with(None)
    }

    /// [`AdamWSettings::init`] keeping the moments in `state_dtype` (bf16 halves the
    /// optimizer's memory; the update still runs in f32). `None`: f32.
    pub fn init_with<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        state_dtype: Option<DType>,
    ) -> OptimizerAdaptor<ShearsAdamW, M, B>
    where
        B::InnerBackend: ShearsOps,
    {
        OptimizerAdaptor::from(ShearsAdamW {
            settings: *self,
            state_dtype: state_dtype.filter(|&d| d != DType::F32),
        })
    }

    /// burn's own AdamW configuration with these settings (the reference [`ShearsAdamW`] is
    /// tested against).
    pub fn to_burn(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.beta1)
            .with_beta_2(self.beta2)
            .with_epsilon(self.eps)
            .with_weight_decay(self.weight_decay)
    }
}

/// AdamW with burn's update formula (see the module doc), over [`ShearsOps`] backends.
#[derive(Debug, Clone, Copy)]
pub struct ShearsAdamW {
    /// β, ε and weight decay (the learning rate comes with each step).
    pub settings: AdamWSettings,
    /// The dtype the moments are stored in when not f32 (they are widened to f32 for the
    /// update and narrowed after it).
    pub state_dtype: Option<DType>,
}

impl<B: ShearsOps> SimpleOptimizer<B> for ShearsAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let s = &self.settings;
        let time = state.as_ref().map_or(1, |st| st.momentum.time + 1);
        let step = AdamWStep {
            lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            time,
        };
        let prim = |t: Tensor<B, D>| t.into_primitive().tensor();
        if let Some(narrow) = self.state_dtype {
            // Widen the stored moments, step in f32, store them narrowed again.
            let wide = ShearsAdamW {
                state_dtype: None,
                ..*self
            };
            let state = state.map(|mut st| {
                st.momentum.moment_1 = st.momentum.moment_1.cast(DType::F32);
                st.momentum.moment_2 = st.momentum.moment_2.cast(DType::F32);
                st
            });
            let (p, st) = wide.step(lr, tensor, grad, state);
            let st = st.map(|mut st| {
                st.momentum.moment_1 = st.momentum.moment_1.cast(narrow);
                st.momentum.moment_2 = st.momentum.moment_2.cast(narrow);
                st
            });
            return (p, st);
        }
        let wrap = |p| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(p));
        let moments = state.map(|st| (st.momentum.moment_1, st.momentum.moment_2));
        // The tensors move into the kernel (no clone held here), so buffers nobody else holds
        // are updated in place; a backend without the kernel hands them back.
        let (tensor, grad, moments) = if shears_models::ops::fused_enabled() {
            match B::adamw_kernel(
                prim(tensor),
                prim(grad),
                moments.map(|(m, v)| (prim(m), prim(v))),
                step,
            ) {
                Ok((p, m, v)) => {
                    let momentum = AdaptiveMomentumState {
                        time,
                        moment_1: wrap(m),
                        moment_2: wrap(v),
                        max_moment_2: None,
                    };
                    return (wrap(p), Some(AdamWState { momentum }));
                }
                Err((p, g, mv)) => (wrap(p), wrap(g), mv.map(|(m, v)| (wrap(m), wrap(v)))),
            }
        } else {
            (tensor, grad, moments)
        };
        // The composition, exactly burn's AdamW (burn-optim 0.21 `adamw.rs`).
        let (f1, f2) = (1.0 - s.beta1, 1.0 - s.beta2);
        let (m, v) = match moments {
            Some((m, v)) => (
                m.mul_scalar(s.beta1).add(grad.clone().mul_scalar(f1)),
                v.mul_scalar(s.beta2).add(grad.square().mul_scalar(f2)),
            ),
            None => (grad.clone().mul_scalar(f1), grad.square().mul_scalar(f2)),
        };
        let mh = m.clone().div_scalar(1f32 - s.beta1.powi(time as i32));
        let vh = v.clone().div_scalar(1f32 - s.beta2.powi(time as i32));
        let delta = mh.div(vh.sqrt().add_scalar(s.eps));
        let decay_rate = lr * s.weight_decay as f64;
        let decayed = if decay_rate == 0.0 {
            tensor
        } else {
            tensor.mul_scalar(1.0 - decay_rate)
        };
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: m,
            moment_2: v,
            max_moment_2: None,
        };
        (
            decayed - delta.mul_scalar(lr),
            Some(AdamWState { momentum }),
        )
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::{Module, Param};
    use burn::optim::{GradientsParams, Optimizer};
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Two<B: burn::tensor::backend::Backend> {
        a: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
    }

    fn bits<const D: usize>(t: Tensor<AD, D>) -> Vec<u32> {
        t.into_data()
            .into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// The fused in-place kernel and burn's own AdamW give bit-identical parameters and
    /// moments over several steps, with and without weight decay.
    #[test]
    fn fused_adamw_is_bit_identical_to_burns() {
        let dev = Default::default();
        // The comparison below goes through the kernel, not the composition.
        let t = Tensor::<Flex, 1>::random([5], Distribution::Default, &dev);
        let prim = |t: &Tensor<Flex, 1>| t.clone().into_primitive().tensor();
        let step = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            time: 1,
        };
        assert!(Flex::adamw_kernel(prim(&t), prim(&t), None, step).is_ok());
        for wd in [0.0f32, 0.1] {
            let settings = AdamWSettings {
                lr: 3e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: wd,
            };
            let init = || Two::<AD> {
                a: Param::from_tensor(Tensor::random([37, 129], Distribution::Default, &dev)),
                b: Param::from_tensor(Tensor::random([70_001], Distribution::Default, &dev)),
            };
            <Flex as burn::tensor::backend::Backend>::seed(&dev, 3);
            let mut ours = init();
            <Flex as burn::tensor::backend::Backend>::seed(&dev, 3);
            let mut theirs = init();
            let mut opt_ours = settings.init::<AD, Two<AD>>();
            let mut opt_theirs = settings.to_burn().init::<AD, Two<AD>>();
            for step in 0..4 {
                let loss = |m: &Two<AD>| {
                    (m.a.val().sin().sum() + m.b.val().powi_scalar(2).mean() * (step as f32 + 1.0))
                        .reshape([1])
                };
                let g1 = GradientsParams::from_grads(loss(&ours).backward(), &ours);
                let g2 = GradientsParams::from_grads(loss(&theirs).backward(), &theirs);
                ours = opt_ours.step(settings.lr, ours, g1);
                theirs = opt_theirs.step(settings.lr, theirs, g2);
                assert_eq!(
                    bits(ours.a.val()),
                    bits(theirs.a.val()),
                    "a, step {step}, wd {wd}"
                );
                assert_eq!(
                    bits(ours.b.val()),
                    bits(theirs.b.val()),
                    "b, step {step}, wd {wd}"
                );
            }
        }
    }
}
