//! Hot operations of the model behind one backend extension trait, [`ShearsOps`].
//!
//! Each operation has a generic definition (a composition of burn ops, which every backend
//! runs and autodiff differentiates op by op) and may have a native kernel. A backend offers a
//! kernel by implementing the trait's `*_kernel` methods (forward, plus the backward the
//! autodiff wrapper calls); they return `None` for inputs they do not handle (dtype, shape), and
//! the caller then runs the generic definition. `Autodiff<B>` implements the fused entry points
//! with its own backward node over `B`'s kernels, so one trait serves inference and training.
//!
//! Today the native kernels are CPU kernels for burn-flex: the 2-D GEMM of every projection
//! ([`gemm`], f32), a fused in-place AdamW step (f32), RMSNorm and SwiGLU (f32, vectorised
//! `exp`), RoPE on the contiguous layout, fused causal attention (flash-style, GQA in place, any cached past; f32 and
//! f64) and the fused LM head + cross-entropy (f32 and f64).
//! ndarray, wgpu and cuda run the generic definitions; a GPU kernel plugs in the same way.
//!
//! [`set_fused`] turns every kernel off (the generic path everywhere) for comparisons and
//! benchmarks; `SHEARS_FUSED=0` in the environment does the same at start-up.

// The kernel modules: `let p = p;` makes a closure capture a whole [`SharedMut`] (not its raw
// field), index loops mirror the math, and tile helpers take many scalars.
#[allow(
    clippy::redundant_locals,
    clippy::too_many_arguments,
    clippy::needless_range_loop,
    clippy::manual_is_multiple_of
)]
pub mod attention_cpu;
mod autodiff;
#[allow(clippy::redundant_locals, clippy::too_many_arguments)]
pub mod ce_cpu;
#[cfg(feature = "flex")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
mod flex;
#[allow(
    clippy::redundant_locals,
    clippy::too_many_arguments,
    clippy::needless_range_loop,
    clippy::erasing_op,
    clippy::identity_op
)]
pub mod gemm;
pub mod simd;
pub mod tensor;

/// A raw output pointer the parallel tasks of one kernel call share; each task writes a
/// disjoint set of elements (the kernels' safety argument), so it may cross threads.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: the tasks of one kernel call write disjoint elements through it (each kernel's own
// safety argument) and the call joins every task before the buffer is read or freed.
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as for `Send`: no element is written by two tasks, none is read while written.
unsafe impl<T> Sync for SharedMut<T> {}

use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{activation, Bool, Int, Tensor, TensorPrimitive};

use self::tensor::{silu, upcast};

/// A backend the model runs on: burn's `Backend` plus Shears' fused operations.
pub trait ShearsOps: Backend {
    /// `lhs [m, k] · rhs [k, n]` (2-D, any strides: transposed views are free) through a
    /// native GEMM, or `None` (then burn's `matmul` runs). The default uses
    /// [`ShearsOps::matmul_kernel`].
    fn fused_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        Self::matmul_kernel(lhs, rhs)
    }

    /// Native 2-D GEMM, `None` where there is none for these inputs.
    fn matmul_kernel(
        _lhs: FloatTensor<Self>,
        _rhs: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// Causal attention through a native kernel, or `None` (then the generic definition runs).
    /// `q [b, t, h, hd]`, `k, v [b, s, g, hd]` (`s ≥ t`; the first `s - t` keys are a cached
    /// past), output `[b, t, h, hd]`, attending as `spec` says (scale, sliding window). The
    /// default uses [`ShearsOps::attention_kernel`].
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: AttnSpec,
    ) -> Option<FloatTensor<Self>> {
        Self::attention_kernel(q, k, v, spec).map(|(out, _)| out)
    }

    /// Per-token NLL `[n]` of `targets [n]` under the logits `h · Wᵀ`, never materialising
    /// them, or `None`. `h [n, d]`; `w` is `[V, d]` when `vocab_major` (a tied embedding), else
    /// `[d, V]` (a linear weight stored `[in, out]`).
    fn fused_lm_nll(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        vocab_major: bool,
        targets: IntTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        Self::lm_nll_kernel(h, w, vocab_major, targets).map(|(nll, _)| nll)
    }

    /// Native attention forward: the output and the per-row log-sum-exp `[b, h, t]` its
    /// backward needs. `None` where there is no kernel for these inputs.
    fn attention_kernel(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _spec: AttnSpec,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// Native attention backward: `(dq, dk, dv)`. Must exist wherever the forward kernel does.
    #[allow(clippy::too_many_arguments)]
    fn attention_kernel_backward(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _out: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _dout: FloatTensor<Self>,
        _spec: AttnSpec,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// RMSNorm over the last axis of `x [n, d]` with gain `w [d]`:
    /// `x / √(Σx² / count + eps) · w`, and each row's `√(Σx² / count + eps)` `[n]` for the
    /// backward. `count` is `d` for the plain norm; the masked norm of the pruning stage
    /// averages over the channels its hidden mask keeps. `None` where there is no kernel.
    fn rms_norm_kernel(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _eps: f64,
        _count: usize,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// RMSNorm backward: `(dx, dw)`.
    fn rms_norm_kernel_backward(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _scale: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _count: usize,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// RMSNorm through a native kernel (with a backward node on autodiff backends), or `None`.
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
        count: usize,
    ) -> Option<FloatTensor<Self>> {
        Self::rms_norm_kernel(x, w, eps, count).map(|(y, _)| y)
    }

    /// SwiGLU's product `silu(gate) · up` (same shapes), or `None`.
    fn swiglu_kernel(
        _gate: FloatTensor<Self>,
        _up: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// SwiGLU backward: `(dgate, dup)`.
    fn swiglu_kernel_backward(
        _gate: FloatTensor<Self>,
        _up: FloatTensor<Self>,
        _dout: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// SwiGLU through a native kernel (with a backward node on autodiff backends), or `None`.
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        Self::swiglu_kernel(gate, up)
    }

    /// SwiGLU with the pruning stage's intermediate mask on the up-projection:
    /// `silu(gate) · (up · z)`, `gate, up [n, I]`, `z [I]`. `None` where there is no kernel.
    fn swiglu_masked_kernel(
        _gate: FloatTensor<Self>,
        _up: FloatTensor<Self>,
        _z: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// Masked SwiGLU backward: `(dgate, dup, dz)`.
    fn swiglu_masked_kernel_backward(
        _gate: FloatTensor<Self>,
        _up: FloatTensor<Self>,
        _z: FloatTensor<Self>,
        _dout: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// Masked SwiGLU through a native kernel (with a backward node on autodiff backends, which
    /// also gives `z` its gradient), or `None`.
    fn fused_swiglu_masked(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        z: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        Self::swiglu_masked_kernel(gate, up, z)
    }

    /// One AdamW step in place where the buffers allow: `(param, m, v)` after the step, from
    /// the parameter, its gradient and the moments (`None` on the first step). Bit-identical
    /// to burn's AdamW in f32. Where there is no kernel it hands its inputs back untouched
    /// (`Err`), and the caller runs the composition. The inputs are taken by value so that
    /// buffers nobody else holds are updated in place instead of copied.
    fn adamw_kernel(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        _step: AdamWStep,
    ) -> Result<AdamWOutput<Self>, AdamWInput<Self>> {
        Err((param, grad, moments))
    }

    /// Rotary position embedding of `x [b, t, heads, hd]` with the signed tables `cos, sin
    /// [t, hd]` of [`crate::rope::tables`]: `x·cos + swap_halves(x)·sin`, or with `inverse` the
    /// rotation back (`sin` negated), which is also its own backward. `None` where there is no
    /// kernel.
    fn rope_kernel(
        _x: FloatTensor<Self>,
        _cos: FloatTensor<Self>,
        _sin: FloatTensor<Self>,
        _inverse: bool,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// RoPE through a native kernel (with a backward node on autodiff backends: the tables are
    /// constants, only `x` gets a gradient), or `None`.
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        Self::rope_kernel(x, cos, sin, false)
    }

    /// Native LM-head NLL forward: the NLL and each row's log-sum-exp `[n]`.
    fn lm_nll_kernel(
        _h: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _vocab_major: bool,
        _targets: IntTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// As [`Self::lm_nll_kernel`] when a backward will follow: also the `[n, V]` logits where
    /// the backend keeps them for [`Self::lm_nll_kernel_backward_kept`] (at most
    /// [`KEEP_LOGITS_ELEMS`]), `None` where the backward recomputes them.
    #[allow(clippy::type_complexity)]
    fn lm_nll_kernel_keep(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        vocab_major: bool,
        targets: IntTensor<Self>,
    ) -> Option<(
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    )> {
        Self::lm_nll_kernel(h, w, vocab_major, targets).map(|(nll, lse)| (nll, lse, None))
    }

    /// Native LM-head NLL backward from the logits [`Self::lm_nll_kernel_keep`] kept.
    fn lm_nll_kernel_backward_kept(
        _h: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _vocab_major: bool,
        _targets: IntTensor<Self>,
        _lse: FloatTensor<Self>,
        _dnll: FloatTensor<Self>,
        _logits: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// Native LM-head NLL backward: `(dh, dw)` for the NLL's gradient `dnll [n]`.
    fn lm_nll_kernel_backward(
        _h: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _vocab_major: bool,
        _targets: IntTensor<Self>,
        _lse: FloatTensor<Self>,
        _dnll: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
}

/// `(param, m, v)` after an AdamW step.
pub type AdamWOutput<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// `(param, grad, moments)` handed back by a backend without an AdamW kernel.
pub type AdamWInput<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    Option<(FloatTensor<B>, FloatTensor<B>)>,
);

/// Scalars of one AdamW step (burn's formula: decoupled weight decay `p·(1 - lr·wd)`, moments
/// `m = β1·m + (1-β1)·g`, `v = β2·v + (1-β2)·g²`, bias corrections by `1 - β^t`, update
/// `lr · m̂ / (√v̂ + ε)`).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// This step's count, 1 on the first step (the moments are then initialised from `g`).
    pub time: usize,
}

/// An autodiff backend whose inner backend is also a [`ShearsOps`] (evaluation on
/// `model.valid()` runs there).
pub trait ShearsAutodiff: AutodiffBackend<InnerBackend: ShearsOps> + ShearsOps {}
impl<T> ShearsAutodiff for T
where
    T: AutodiffBackend + ShearsOps,
    T::InnerBackend: ShearsOps,
{
}

#[cfg(feature = "ndarray")]
impl ShearsOps for burn::backend::NdArray<f32> {}
#[cfg(feature = "ndarray")]
impl ShearsOps for burn::backend::NdArray<f64> {}
#[cfg(feature = "wgpu")]
impl ShearsOps for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl ShearsOps for burn::backend::Cuda {}

/// 0: not read yet, 1: on, 2: off.
static FUSED: AtomicU8 = AtomicU8::new(0);

/// Whether native kernels are used (default on; `SHEARS_FUSED=0` turns them off).
pub fn fused_enabled() -> bool {
    match FUSED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("SHEARS_FUSED").map_or(true, |v| v != "0");
            FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turn native kernels on or off for the whole process.
pub fn set_fused(on: bool) {
    FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `a [m, k] · b [k, n]`: the native GEMM where the backend has one (and [`fused_enabled`]),
/// else burn's `matmul`.
pub fn matmul<B: ShearsOps>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    if fused_enabled() {
        if let Some(out) = B::fused_matmul(prim(a.clone()), prim(b.clone())) {
            return tensor(out);
        }
    }
    a.matmul(b)
}

/// RMSNorm of `x [.., d]` by `w [d]` through the native kernel where there is one, or `None`
/// (the caller runs its generic definition). The mean square divides by `count` (`d` for the
/// plain norm, the kept channels for the masked one).
pub fn rms_norm_fused<B: ShearsOps, const D: usize>(
    x: &Tensor<B, D>,
    w: &Tensor<B, 1>,
    eps: f64,
    count: usize,
) -> Option<Tensor<B, D>> {
    if !fused_enabled() || count == 0 {
        return None;
    }
    let dims = x.dims();
    let d = dims[D - 1];
    let n = dims[..D - 1].iter().product::<usize>();
    let x2 = x.clone().reshape([n, d]);
    B::fused_rms_norm(prim(x2), prim(w.clone()), eps, count)
        .map(|y| tensor::<B, 2>(y).reshape(dims))
}

/// RoPE of `x [b, t, heads, hd]` with the tables `cos, sin [t, hd]` of
/// [`crate::rope::tables`]: the native kernel where there is one, else [`rope_generic`].
pub fn rope<B: ShearsOps>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    if fused_enabled() {
        if let Some(out) = B::fused_rope(prim(x.clone()), prim(cos.clone()), prim(sin.clone())) {
            return tensor(out);
        }
    }
    rope_generic(x, cos, sin)
}

/// The generic definition of [`rope`], in burn ops: HF's `x·cos + rotate_half(x)·sin` with the
/// sign of `rotate_half` folded into the tables' `sin`.
pub fn rope_generic<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Tensor<B, 4> {
    let [_, t, _, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let swapped = Tensor::cat(vec![x2, x1], 3);
    let cos = cos.clone().reshape([1, t, 1, d]);
    let sin = sin.clone().reshape([1, t, 1, d]);
    x * cos + swapped * sin
}

/// `silu(gate) · up`: the native kernel where there is one, else the composition.
pub fn swiglu<B: ShearsOps, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    if fused_enabled() {
        if let Some(out) = B::fused_swiglu(prim(gate.clone()), prim(up.clone())) {
            return tensor(out);
        }
    }
    silu(gate) * up
}

/// `silu(gate) · (up · z)` with `z [I]` along the last axis of `gate, up [.., I]` (the
/// intermediate mask): the native kernel where there is one, else the composition.
pub fn swiglu_masked<B: ShearsOps, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    z: &Tensor<B, 1>,
) -> Tensor<B, D> {
    if fused_enabled() {
        let dims = gate.dims();
        let i = dims[D - 1];
        let n = dims[..D - 1].iter().product::<usize>();
        if let Some(out) = B::fused_swiglu_masked(
            prim(gate.clone().reshape([n, i])),
            prim(up.clone().reshape([n, i])),
            prim(z.clone()),
        ) {
            return tensor::<B, 2>(out).reshape(dims);
        }
    }
    silu(gate) * (up * z.clone().unsqueeze::<D>())
}

/// How one causal attention call attends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnSpec {
    /// The scores' scale (`1 / √head_dim`).
    pub scale: f64,
    /// A sliding window: each query sees itself and the `window - 1` keys before it
    /// (transformers' `kv_idx > q_idx - sliding_window`); `None`: every earlier key.
    pub window: Option<usize>,
}

/// Causal attention `softmax(q kᵀ · scale + causal) v` with grouped-query heads, over a
/// sliding `window` of keys when given: the native kernel where the backend has one (and
/// [`fused_enabled`]), else [`causal_attention_generic`]. `mask` (`[t, s]`, true = hidden, the
/// window's mask from [`causal_mask`]) is only read by the generic path.
pub fn causal_attention<B: ShearsOps>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 2, Bool>>,
    window: Option<usize>,
) -> Tensor<B, 4> {
    let hd = q.dims()[3];
    let spec = AttnSpec {
        scale: 1.0 / (hd as f64).sqrt(),
        window,
    };
    if fused_enabled() {
        if let Some(out) =
            B::fused_attention(prim(q.clone()), prim(k.clone()), prim(v.clone()), spec)
        {
            return tensor(out);
        }
    }
    causal_attention_generic(q, k, v, mask)
}

/// The generic definition of [`causal_attention`], in burn ops. `mask` is `[t, s]` (true =
/// hidden), `None` when no position needs hiding (a single new token).
pub fn causal_attention_generic<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 2, Bool>>,
) -> Tensor<B, 4> {
    let [b, t, h, hd] = q.dims();
    let [_, s, g, _] = k.dims();
    let r = h / g;
    // Query head j reads kv head j / r: group the r query heads of a kv head along the
    // sequence axis so one batched matmul serves them without copying k and v r times.
    let q = q.swap_dims(1, 2).reshape([b, g, r * t, hd]);
    let k = k.swap_dims(1, 2);
    let v = v.swap_dims(1, 2);
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (hd as f64).sqrt());
    let scores = match mask {
        Some(m) => {
            let m = m
                .clone()
                .unsqueeze_dim::<3>(0)
                .repeat_dim(0, r)
                .reshape([1, 1, r * t, s])
                .expand([b, g, r * t, s]);
            scores.mask_fill(m, f32::NEG_INFINITY)
        }
        None => scores,
    };
    let dtype = scores.dtype();
    let probs = activation::softmax(upcast(scores), 3).cast(dtype);
    probs.matmul(v).reshape([b, h, t, hd]).swap_dims(1, 2)
}

/// The causal mask `[t, past + t]` (true = hidden) the generic attention reads: query `i`
/// (position `past + i`) sees keys `j ≤ past + i`, and with a sliding `window` only those with
/// `j > past + i - window`.
pub fn causal_mask<B: Backend>(
    past: usize,
    t: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let later = Tensor::<B, 2, Bool>::tril_mask([t, past + t], past as i64, device);
    match window {
        // `triu_mask` hides `j < i + offset`: with offset `past - window + 1`, the keys at or
        // before `past + i - window`.
        Some(w) if past + t > w => {
            let before =
                Tensor::<B, 2, Bool>::triu_mask([t, past + t], past as i64 - w as i64 + 1, device);
            later.bool_or(before)
        }
        _ => later,
    }
}

/// Whether attention over `past + t` keys with `window` needs a mask at all (a single new token
/// sees every cached key unless the window cuts some off).
pub fn needs_mask(past: usize, t: usize, window: Option<usize>) -> bool {
    t > 1 || window.is_some_and(|w| past + t > w)
}

/// Per-token NLL `[n]` of `targets [n]` under logits `h [n, d] · Wᵀ` (`w [V, d]` when
/// `vocab_major`, else `[d, V]`): the fused kernel where the backend has one, else logits and
/// a log-softmax in f32 (f64 on f64 backends).
pub fn lm_head_nll<B: ShearsOps>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    vocab_major: bool,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    if fused_enabled() {
        if let Some(nll) = B::fused_lm_nll(
            prim(h.clone()),
            prim(w.clone()),
            vocab_major,
            targets.clone().into_primitive(),
        ) {
            return tensor(nll);
        }
    }
    lm_head_nll_generic(h, w, vocab_major, targets)
}

/// Logits (`rows × vocab`) the native LM-head loss keeps from its forward for the backward
/// under autodiff, at most: 64 Mi elements, 256 MiB in f32 (SmolLM2-135M at 4 × 256 tokens
/// keeps 201 MB, the tiny benchmark model at 8 × 256 67 MB). Above it the backward recomputes
/// them tile by tile (a 7B-class run at 8 × 4096 tokens and a 32k vocabulary would need 4 GiB).
/// Both ways run the same tiles in the same order, so the gradients are the same bits; keeping
/// saves the recompute (measured on SmolLM2-135M's head at 4 × 256, 2 threads: 1,034-1,042 ms
/// to 879-890 ms forward + backward; at hidden 256 nothing measurable).
pub const KEEP_LOGITS_ELEMS: usize = 1 << 26;

/// Logit elements the generic NLL materialises at once (16 Mi f32 = 64 MiB): rows are
/// scored in chunks of at most this many `rows × vocab` elements, so evaluating a batch never
/// holds `[batch · t, vocab]` logits and their log-softmax (tens of GB at t = 4096 and a 128k
/// vocabulary). Rows are independent, so chunking changes no value; under autodiff each
/// chunk's tensors are kept for the backward pass as they were unchunked.
pub const NLL_CHUNK_ELEMS: usize = 1 << 24;

/// The generic definition of [`lm_head_nll`], scored in row chunks of at most
/// [`NLL_CHUNK_ELEMS`] logits.
pub fn lm_head_nll_generic<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    vocab_major: bool,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let n = h.dims()[0];
    let vocab = w.dims()[if vocab_major { 0 } else { 1 }].max(1);
    let rows = (NLL_CHUNK_ELEMS / vocab).max(1);
    if n <= rows {
        return nll_rows(h, w, vocab_major, targets);
    }
    let parts = (0..n)
        .step_by(rows)
        .map(|s| {
            let e = (s + rows).min(n);
            nll_rows(
                h.clone().slice(s..e),
                w.clone(),
                vocab_major,
                targets.clone().slice(s..e),
            )
        })
        .collect();
    Tensor::cat(parts, 0)
}

fn nll_rows<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    vocab_major: bool,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let n = h.dims()[0];
    let logits = if vocab_major {
        h.matmul(w.transpose())
    } else {
        h.matmul(w)
    };
    let logp = activation::log_softmax(upcast(logits), 1);
    logp.gather(1, targets.reshape([n, 1])).neg().reshape([n])
}
