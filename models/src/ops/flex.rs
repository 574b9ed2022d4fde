//! burn-flex's native kernels: f32 and f64 tensors go through the host-slice kernels of
//! [`super::attention_cpu`] and [`super::ce_cpu`]; other dtypes and unsupported shapes return
//! `None` (the generic definition runs).

use burn::tensor::{DType, TensorData, TensorMetadata};
use burn_flex::{Flex, FlexTensor};

use super::attention_cpu::{self, AttnShape};
use super::ce_cpu::{self, CeShape};
use super::simd::Real;
use super::ShearsOps;

/// A contiguous copy (free when already contiguous) and its elements.
fn contiguous(t: FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn slice<E: Real + burn::tensor::Element + bytemuck::Pod>(t: &FlexTensor) -> &[E] {
    t.as_slice::<E>()
        .expect("a contiguous tensor of the checked dtype")
}

fn make<E: burn::tensor::Element>(v: Vec<E>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

fn dims<const D: usize>(t: &FlexTensor) -> Option<[usize; D]> {
    t.shape().as_slice().try_into().ok()
}

fn attn_shape(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> Option<AttnShape> {
    let [b, t, h, hd] = dims::<4>(q)?;
    let [bk, s, g, hdk] = dims::<4>(k)?;
    if dims::<4>(v)? != [bk, s, g, hdk] || bk != b || hdk != hd {
        return None;
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return None;
    }
    let sh = AttnShape { b, t, s, h, g, hd };
    sh.supported().then_some(sh)
}

fn attn_fwd<E: Real + burn::tensor::Element + bytemuck::Pod>(
    sh: AttnShape,
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    scale: f64,
) -> (FlexTensor, FlexTensor) {
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let mut out = vec![E::ZERO; sh.b * sh.t * sh.h * sh.hd];
    let mut lse = vec![E::ZERO; sh.b * sh.h * sh.t];
    attention_cpu::forward(
        sh,
        slice::<E>(&q),
        slice::<E>(&k),
        slice::<E>(&v),
        E::of(scale),
        &mut out,
        &mut lse,
    );
    (
        make(out, vec![sh.b, sh.t, sh.h, sh.hd]),
        make(lse, vec![sh.b, sh.h, sh.t]),
    )
}

#[allow(clippy::too_many_arguments)]
fn attn_bwd<E: Real + burn::tensor::Element + bytemuck::Pod>(
    sh: AttnShape,
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    out: FlexTensor,
    lse: FlexTensor,
    dout: FlexTensor,
    scale: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [q, k, v, out, lse, dout] = [q, k, v, out, lse, dout].map(contiguous);
    let mut dq = vec![E::ZERO; q.shape().num_elements()];
    let mut dk = vec![E::ZERO; k.shape().num_elements()];
    let mut dv = vec![E::ZERO; v.shape().num_elements()];
    attention_cpu::backward(
        sh,
        slice::<E>(&q),
        slice::<E>(&k),
        slice::<E>(&v),
        slice::<E>(&out),
        slice::<E>(&lse),
        slice::<E>(&dout),
        E::of(scale),
        &mut dq,
        &mut dk,
        &mut dv,
    );
    (
        make(dq, q.shape().to_vec()),
        make(dk, k.shape().to_vec()),
        make(dv, v.shape().to_vec()),
    )
}

fn ce_shape(h: &FlexTensor, w: &FlexTensor, vocab_major: bool) -> Option<CeShape> {
    let [n, d] = dims::<2>(h)?;
    let [a, c] = dims::<2>(w)?;
    let (v, dw) = if vocab_major { (a, c) } else { (c, a) };
    (dw == d && h.dtype() == w.dtype() && n > 0 && v > 0).then_some(CeShape {
        n,
        d,
        v,
        vocab_major,
    })
}

/// Targets as indices, or `None` when one is outside the vocabulary (the generic path then
/// reports it the way burn does).
fn targets(t: FlexTensor, n: usize, v: usize) -> Option<Vec<usize>> {
    let data = t.into_data();
    let ids: Vec<i64> = data.iter::<i64>().collect();
    if ids.len() != n {
        return None;
    }
    ids.into_iter()
        .map(|x| usize::try_from(x).ok().filter(|&x| x < v))
        .collect()
}

fn is_real(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F64)
}

impl ShearsOps for Flex {
    fn attention_kernel(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        scale: f64,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let sh = attn_shape(&q, &k, &v)?;
        match q.dtype() {
            DType::F32 => Some(attn_fwd::<f32>(sh, q, k, v, scale)),
            DType::F64 => Some(attn_fwd::<f64>(sh, q, k, v, scale)),
            _ => None,
        }
    }

    fn attention_kernel_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        out: FlexTensor,
        lse: FlexTensor,
        dout: FlexTensor,
        scale: f64,
    ) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
        let sh = attn_shape(&q, &k, &v)?;
        if dout.dtype() != q.dtype() || out.dtype() != q.dtype() || lse.dtype() != q.dtype() {
            return None;
        }
        match q.dtype() {
            DType::F32 => Some(attn_bwd::<f32>(sh, q, k, v, out, lse, dout, scale)),
            DType::F64 => Some(attn_bwd::<f64>(sh, q, k, v, out, lse, dout, scale)),
            _ => None,
        }
    }

    fn lm_nll_kernel(
        h: FlexTensor,
        w: FlexTensor,
        vocab_major: bool,
        tg: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let sh = ce_shape(&h, &w, vocab_major)?;
        if !is_real(h.dtype()) {
            return None;
        }
        let tg = targets(tg, sh.n, sh.v)?;
        fn run<E: Real + burn::tensor::Element + bytemuck::Pod>(
            sh: CeShape,
            h: FlexTensor,
            w: FlexTensor,
            tg: &[usize],
        ) -> (FlexTensor, FlexTensor) {
            let (h, w) = (contiguous(h), contiguous(w));
            let (mut nll, mut lse) = (vec![E::ZERO; sh.n], vec![E::ZERO; sh.n]);
            ce_cpu::forward(sh, slice(&h), slice(&w), tg, &mut nll, &mut lse);
            (make(nll, vec![sh.n]), make(lse, vec![sh.n]))
        }
        Some(match h.dtype() {
            DType::F32 => run::<f32>(sh, h, w, &tg),
            _ => run::<f64>(sh, h, w, &tg),
        })
    }

    fn lm_nll_kernel_backward(
        h: FlexTensor,
        w: FlexTensor,
        vocab_major: bool,
        tg: FlexTensor,
        lse: FlexTensor,
        dnll: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let sh = ce_shape(&h, &w, vocab_major)?;
        if !is_real(h.dtype()) || lse.dtype() != h.dtype() || dnll.dtype() != h.dtype() {
            return None;
        }
        let tg = targets(tg, sh.n, sh.v)?;
        fn run<E: Real + burn::tensor::Element + bytemuck::Pod>(
            sh: CeShape,
            [h, w, lse, g]: [FlexTensor; 4],
            tg: &[usize],
        ) -> (FlexTensor, FlexTensor) {
            let [h, w, lse, g] = [h, w, lse, g].map(contiguous);
            let mut dh = vec![E::ZERO; sh.n * sh.d];
            let mut dw = vec![E::ZERO; sh.v * sh.d];
            ce_cpu::backward(
                sh,
                slice(&h),
                slice(&w),
                tg,
                slice(&lse),
                slice(&g),
                &mut dh,
                &mut dw,
            );
            let wshape = if sh.vocab_major {
                vec![sh.v, sh.d]
            } else {
                vec![sh.d, sh.v]
            };
            (make(dh, vec![sh.n, sh.d]), make(dw, wshape))
        }
        Some(match h.dtype() {
            DType::F32 => run::<f32>(sh, [h, w, lse, dnll], &tg),
            _ => run::<f64>(sh, [h, w, lse, dnll], &tg),
        })
    }
}
