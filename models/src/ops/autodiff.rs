//! [`ShearsOps`] on `Autodiff<B>`: the fused entry points run `B`'s kernels forward and record
//! one backward node each, which calls `B`'s backward kernel (the pattern of burn-autodiff's own
//! `linear`). Where `B` has no kernel they return `None` and the generic definition runs,
//! differentiated op by op as before.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;

use super::{AttnSpec, ShearsOps};

#[derive(Debug)]
struct MatmulBackward;

impl<B: ShearsOps> Backward<B, 2> for MatmulBackward {
    /// lhs (when rhs needs a gradient), rhs (when lhs does).
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [nl, nr] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (lhs, rhs) = ops.state;
        // Transposes are views; the native GEMM reads them through strides.
        let mm = |a: FloatTensor<B>, b: FloatTensor<B>| {
            B::matmul_kernel(a.clone(), b.clone()).unwrap_or_else(|| B::float_matmul(a, b))
        };
        if let (Some(node), Some(rhs)) = (nl, rhs) {
            grads.register::<B>(node.id, mm(grad.clone(), B::float_transpose(rhs)));
        }
        if let (Some(node), Some(lhs)) = (nr, lhs) {
            grads.register::<B>(node.id, mm(B::float_transpose(lhs), grad));
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: ShearsOps> Backward<B, 2> for RmsNormBackward {
    /// x, w, per-row scale, the mean square's divisor.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [nx, nw] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, scale, count) = ops.state;
        let (dx, dw) = B::rms_norm_kernel_backward(x, w, scale, dy, count)
            .expect("a backend with an RMSNorm forward kernel has its backward kernel");
        if let Some(node) = nx {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = nw {
            grads.register::<B>(node.id, dw);
        }
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: ShearsOps> Backward<B, 2> for SwigluBackward {
    /// gate, up.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [ng, nu] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (dg, du) = B::swiglu_kernel_backward(gate, up, dout)
            .expect("a backend with a SwiGLU forward kernel has its backward kernel");
        if let Some(node) = ng {
            grads.register::<B>(node.id, dg);
        }
        if let Some(node) = nu {
            grads.register::<B>(node.id, du);
        }
    }
}

#[derive(Debug)]
struct SwigluMaskedBackward;

impl<B: ShearsOps> Backward<B, 3> for SwigluMaskedBackward {
    /// gate, up, z.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [ng, nu, nz] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (gate, up, z) = ops.state;
        let (dg, du, dz) = B::swiglu_masked_kernel_backward(gate, up, z, dout)
            .expect("a backend with a masked SwiGLU forward kernel has its backward kernel");
        for (node, grad) in [(ng, dg), (nu, du), (nz, dz)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: ShearsOps> Backward<B, 3> for AttentionBackward {
    /// q, k, v, out, lse, scale.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        AttnSpec,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [nq, nk, nv] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (q, k, v, out, lse, spec) = ops.state;
        let (dq, dk, dv) = B::attention_kernel_backward(q, k, v, out, lse, dout, spec)
            .expect("a backend with an attention forward kernel has its backward kernel");
        for (node, grad) in [(nq, dq), (nk, dk), (nv, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: ShearsOps> Backward<B, 1> for RopeBackward {
    /// cos, sin.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [nx] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        // The rotation is orthogonal: its transpose is the rotation back.
        let dx = B::rope_kernel(dy, cos, sin, true)
            .expect("a backend with a RoPE forward kernel takes the same shapes backward");
        if let Some(node) = nx {
            grads.register::<B>(node.id, dx);
        }
    }
}

#[derive(Debug)]
struct LmNllBackward;

impl<B: ShearsOps> Backward<B, 2> for LmNllBackward {
    /// h, w, vocab_major, targets, lse, and the logits where the forward kept them.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        bool,
        IntTensor<B>,
        FloatTensor<B>,
        Option<FloatTensor<B>>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [nh, nw] = ops.parents;
        let dnll = grads.consume::<B>(&ops.node);
        let (h, w, vocab_major, targets, lse, logits) = ops.state;
        let (dh, dw) = match logits {
            Some(logits) => {
                B::lm_nll_kernel_backward_kept(h, w, vocab_major, targets, lse, dnll, logits)
            }
            None => B::lm_nll_kernel_backward(h, w, vocab_major, targets, lse, dnll),
        }
        .expect("a backend with an LM-head NLL forward kernel has its backward kernel");
        if let Some(node) = nh {
            grads.register::<B>(node.id, dh);
        }
        if let Some(node) = nw {
            grads.register::<B>(node.id, dw);
        }
    }
}

impl<B: ShearsOps, C: CheckpointStrategy> ShearsOps for Autodiff<B, C> {
    fn fused_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        let out = B::matmul_kernel(lhs.primitive.clone(), rhs.primitive.clone())?;
        let (lt, rt) = (lhs.is_tracked(), rhs.is_tracked());
        Some(
            match MatmulBackward
                .prepare::<C>([lhs.node.clone(), rhs.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    (rt.then_some(lhs.primitive), lt.then_some(rhs.primitive)),
                    out,
                ),
                OpsKind::UnTracked(prep) => prep.finish(out),
            },
        )
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
        count: usize,
    ) -> Option<FloatTensor<Self>> {
        let (y, scale) = B::rms_norm_kernel(x.primitive.clone(), w.primitive.clone(), eps, count)?;
        Some(
            match RmsNormBackward
                .prepare::<C>([x.node.clone(), w.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((x.primitive, w.primitive, scale, count), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            },
        )
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        let out = B::swiglu_kernel(gate.primitive.clone(), up.primitive.clone())?;
        Some(
            match SwigluBackward
                .prepare::<C>([gate.node.clone(), up.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((gate.primitive, up.primitive), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            },
        )
    }

    fn fused_swiglu_masked(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        z: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        let out = B::swiglu_masked_kernel(
            gate.primitive.clone(),
            up.primitive.clone(),
            z.primitive.clone(),
        )?;
        Some(
            match SwigluMaskedBackward
                .prepare::<C>([gate.node.clone(), up.node.clone(), z.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    prep.finish((gate.primitive, up.primitive, z.primitive), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(out),
            },
        )
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: AttnSpec,
    ) -> Option<FloatTensor<Self>> {
        let (out, lse) = B::attention_kernel(
            q.primitive.clone(),
            k.primitive.clone(),
            v.primitive.clone(),
            spec,
        )?;
        Some(
            match AttentionBackward
                .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    (
                        q.primitive,
                        k.primitive,
                        v.primitive,
                        out.clone(),
                        lse,
                        spec,
                    ),
                    out,
                ),
                OpsKind::UnTracked(prep) => prep.finish(out),
            },
        )
    }

    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        let out = B::rope_kernel(
            x.primitive.clone(),
            cos.primitive.clone(),
            sin.primitive.clone(),
            false,
        )?;
        Some(
            match RopeBackward
                .prepare::<C>([x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((cos.primitive, sin.primitive), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            },
        )
    }

    fn fused_lm_nll(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        vocab_major: bool,
        targets: IntTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        // Keep the logits for the backward only when there will be one.
        let tracked = !(h.node.requirement.is_none() && w.node.requirement.is_none());
        let (nll, lse, logits) = if tracked {
            B::lm_nll_kernel_keep(
                h.primitive.clone(),
                w.primitive.clone(),
                vocab_major,
                targets.clone(),
            )?
        } else {
            let (nll, lse) = B::lm_nll_kernel(
                h.primitive.clone(),
                w.primitive.clone(),
                vocab_major,
                targets.clone(),
            )?;
            (nll, lse, None)
        };
        Some(
            match LmNllBackward
                .prepare::<C>([h.node.clone(), w.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    (h.primitive, w.primitive, vocab_major, targets, lse, logits),
                    nll,
                ),
                OpsKind::UnTracked(prep) => prep.finish(nll),
            },
        )
    }
}
