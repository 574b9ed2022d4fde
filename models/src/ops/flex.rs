//! burn-flex's native kernels: f32 and f64 tensors go through the host-slice kernels of
//! [`super::attention_cpu`] and [`super::ce_cpu`]; other dtypes and unsupported shapes return
//! `None` (the generic definition runs).
//!
//! Why one file of ~770 lines: it is the whole `ShearsOps` table of one backend (each op's
//! primitive conversion, dtype dispatch and fallback, side by side), so a reader checks one
//! backend's bindings in one place; the kernels themselves live in their own modules.

use burn::tensor::{DType, TensorData, TensorMetadata};
use burn_flex::{Flex, FlexTensor};

use super::attention_cpu::{self, AttnShape};
use super::ce_cpu::{self, CeShape};
use super::gemm::{gemm, Mat};
use super::simd::{with_isa, Real};
use super::{AdamWInput, AdamWOutput, AdamWStep, AttnSpec, ShearsOps};

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

fn attn_shape(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    window: Option<usize>,
) -> Option<AttnShape> {
    let [b, t, h, hd] = dims::<4>(q)?;
    let [bk, s, g, hdk] = dims::<4>(k)?;
    if dims::<4>(v)? != [bk, s, g, hdk] || bk != b || hdk != hd {
        return None;
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return None;
    }
    let sh = AttnShape {
        b,
        t,
        s,
        h,
        g,
        hd,
        window,
    };
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

/// A strided f32 view of a 2-D flex tensor (positive strides only).
fn mat2(t: &FlexTensor) -> Option<(usize, usize, Mat<f32>)> {
    let [r, c] = dims::<2>(t)?;
    let st = t.layout().strides();
    if t.dtype() != DType::F32 || st[0] < 0 || st[1] < 0 {
        return None;
    }
    let data: &[f32] = t.storage();
    // SAFETY: the layout addresses elements inside the storage.
    let ptr = unsafe { data.as_ptr().add(t.layout().start_offset()) };
    Some((
        r,
        c,
        Mat {
            ptr,
            rs: st[0],
            cs: st[1],
        },
    ))
}

/// `t` as a uniquely owned, contiguous, exactly sized f32 buffer (a copy only when shared or
/// strided).
fn owned_f32(t: FlexTensor) -> FlexTensor {
    let simple = t.is_unique()
        && t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == t.shape().num_elements() * 4;
    if simple {
        t
    } else {
        FlexTensor::from_data(t.into_data())
    }
}

/// burn's AdamW arithmetic over one chunk, in the same order of f32 operations per element.
/// The two flags are constants of each copy and the scalars are locals, so the loop is
/// branch-free and vectorises (`vdivps` and `vsqrtps` round exactly like their scalar forms:
/// the result is bit-identical to the element-by-element loop).
#[inline(always)]
fn adamw_chunk<const FIRST: bool, const DECAY: bool>(
    pc: &mut [f32],
    mc: &mut [f32],
    vc: &mut [f32],
    gc: &[f32],
    k: &AdamWScalars,
) {
    let (b1, b2, f1, f2, c1, c2) = (k.b1, k.b2, k.f1, k.f2, k.c1, k.c2);
    let (eps, lr, keep) = (k.eps, k.lr, k.keep);
    let n = pc.len();
    let (mc, vc, gc) = (&mut mc[..n], &mut vc[..n], &gc[..n]);
    for i in 0..n {
        let g = gc[i];
        let (m, v) = if FIRST {
            (g * f1, (g * g) * f2)
        } else {
            (mc[i] * b1 + g * f1, vc[i] * b2 + (g * g) * f2)
        };
        mc[i] = m;
        vc[i] = v;
        let mh = m / c1;
        let vh = v / c2;
        let delta = mh / (vh.sqrt() + eps);
        let decayed = if DECAY { pc[i] * keep } else { pc[i] };
        pc[i] = decayed - delta * lr;
    }
}

struct AdamWScalars {
    b1: f32,
    b2: f32,
    f1: f32,
    f2: f32,
    c1: f32,
    c2: f32,
    eps: f32,
    lr: f32,
    decay: bool,
    keep: f32,
}

/// Rows per parallel task of the row-wise kernels (fixed, so reductions are deterministic).
const ROWS: usize = 32;

fn f32_2d(t: &FlexTensor) -> Option<[usize; 2]> {
    (t.dtype() == DType::F32).then_some(())?;
    dims::<2>(t)
}

#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    // 16 partial sums: vectorises, and is the same order on every run.
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for &v in rest {
        s += v * v;
    }
    s
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The `[d]` sum of per-chunk partial sums laid out chunk after chunk, added in chunk order
/// (the column reductions of the row-wise backward kernels stay deterministic).
fn sum_parts(parts: &[f32], d: usize) -> Vec<f32> {
    let mut sum = vec![0f32; d];
    for part in parts.chunks_exact(d) {
        for (a, b) in sum.iter_mut().zip(part) {
            *a += *b;
        }
    }
    sum
}

impl ShearsOps for Flex {
    fn rms_norm_kernel(
        x: FlexTensor,
        w: FlexTensor,
        eps: f64,
        count: usize,
    ) -> Option<(FlexTensor, FlexTensor)> {
        use rayon::prelude::*;
        let [n, d] = f32_2d(&x)?;
        if w.dtype() != DType::F32 || dims::<1>(&w)? != [d] || d == 0 || count == 0 {
            return None;
        }
        let (x, w) = (contiguous(x), contiguous(w));
        let (xs, ws) = (slice::<f32>(&x), slice::<f32>(&w));
        let mut y = vec![0f32; n * d];
        let mut scale = vec![0f32; n];
        let eps = eps as f32;
        y.par_chunks_mut(ROWS * d)
            .zip(scale.par_chunks_mut(ROWS))
            .enumerate()
            .for_each(|(ci, (yc, sc))| {
                with_isa!({
                    for (r, (yr, s)) in yc.chunks_exact_mut(d).zip(sc.iter_mut()).enumerate() {
                        let xr = &xs[(ci * ROWS + r) * d..(ci * ROWS + r + 1) * d];
                        let den = (sum_sq(xr) / count as f32 + eps).sqrt();
                        *s = den;
                        for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(ws) {
                            *o = (xv / den) * wv;
                        }
                    }
                })
            });
        Some((make(y, vec![n, d]), make(scale, vec![n])))
    }

    fn rms_norm_kernel_backward(
        x: FlexTensor,
        w: FlexTensor,
        scale: FlexTensor,
        dy: FlexTensor,
        count: usize,
    ) -> Option<(FlexTensor, FlexTensor)> {
        use rayon::prelude::*;
        let [n, d] = f32_2d(&x)?;
        if f32_2d(&dy)? != [n, d] || w.dtype() != DType::F32 || scale.dtype() != DType::F32 {
            return None;
        }
        let [x, w, scale, dy] = [x, w, scale, dy].map(contiguous);
        let (xs, ws, ss, gs) = (
            slice::<f32>(&x),
            slice::<f32>(&w),
            slice::<f32>(&scale),
            slice::<f32>(&dy),
        );
        let mut dx = vec![0f32; n * d];
        let chunks = n.div_ceil(ROWS);
        let mut dw_parts = vec![0f32; chunks * d];
        dx.par_chunks_mut(ROWS * d)
            .zip(dw_parts.par_chunks_mut(d))
            .enumerate()
            .for_each(|(ci, (dxc, dwp))| {
                with_isa!({
                    let mut dxn = vec![0f32; d];
                    let mut xn = vec![0f32; d];
                    for (r, dxr) in dxc.chunks_exact_mut(d).enumerate() {
                        let row = ci * ROWS + r;
                        let (xr, gr) = (&xs[row * d..(row + 1) * d], &gs[row * d..(row + 1) * d]);
                        let den = ss[row];
                        for i in 0..d {
                            xn[i] = xr[i] / den;
                            dxn[i] = gr[i] * ws[i];
                            dwp[i] += gr[i] * xn[i];
                        }
                        let c = dot(&dxn, &xn) / count as f32;
                        for i in 0..d {
                            dxr[i] = (dxn[i] - xn[i] * c) / den;
                        }
                    }
                })
            });
        let dw = sum_parts(&dw_parts, d);
        Some((make(dx, vec![n, d]), make(dw, vec![d])))
    }

    fn rope_kernel(
        x: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        inverse: bool,
    ) -> Option<FlexTensor> {
        let [b, t, h, hd] = dims::<4>(&x)?;
        let dt = x.dtype();
        if !is_real(dt) || cos.dtype() != dt || sin.dtype() != dt || hd % 2 != 0 {
            return None;
        }
        if dims::<2>(&cos)? != [t, hd] || dims::<2>(&sin)? != [t, hd] {
            return None;
        }
        fn run<E: Real + burn::tensor::Element + bytemuck::Pod>(
            x: &FlexTensor,
            cos: &FlexTensor,
            sin: &FlexTensor,
            (b, t, h, hd): (usize, usize, usize, usize),
            inverse: bool,
        ) -> FlexTensor {
            use rayon::prelude::*;
            let (xs, cs, ss) = (slice::<E>(x), slice::<E>(cos), slice::<E>(sin));
            let half = hd / 2;
            let row = h * hd;
            let mut out = vec![E::ZERO; b * t * row];
            // Rows of whole positions, enough per task to amortise the scheduling.
            let per = (1usize << 14).div_ceil(row).max(1);
            out.par_chunks_mut(per * row)
                .enumerate()
                .for_each(|(ci, oc)| {
                    with_isa!({
                        for (ri, orow) in oc.chunks_exact_mut(row).enumerate() {
                            let r = ci * per + ri;
                            let p = r % t;
                            let (c, s) = (&cs[p * hd..(p + 1) * hd], &ss[p * hd..(p + 1) * hd]);
                            let xrow = &xs[r * row..(r + 1) * row];
                            for (o, xv) in orow.chunks_exact_mut(hd).zip(xrow.chunks_exact(hd)) {
                                // out = x·cos + swap_halves(x)·sin, in the generic op's order of
                                // operations; the inverse subtracts (sin negated exactly).
                                for j in 0..half {
                                    let rot = xv[j + half] * s[j];
                                    let a = xv[j] * c[j];
                                    o[j] = if inverse { a - rot } else { a + rot };
                                }
                                for j in half..hd {
                                    let rot = xv[j - half] * s[j];
                                    let a = xv[j] * c[j];
                                    o[j] = if inverse { a - rot } else { a + rot };
                                }
                            }
                        }
                    })
                });
            make(out, vec![b, t, h, hd])
        }
        let (x, cos, sin) = (contiguous(x), contiguous(cos), contiguous(sin));
        Some(match dt {
            DType::F32 => run::<f32>(&x, &cos, &sin, (b, t, h, hd), inverse),
            _ => run::<f64>(&x, &cos, &sin, (b, t, h, hd), inverse),
        })
    }

    fn swiglu_kernel(gate: FlexTensor, up: FlexTensor) -> Option<FlexTensor> {
        use rayon::prelude::*;
        if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || gate.shape() != up.shape() {
            return None;
        }
        let shape = gate.shape().to_vec();
        let (g, u) = (contiguous(gate), contiguous(up));
        let (gs, us) = (slice::<f32>(&g), slice::<f32>(&u));
        let mut out = vec![0f32; gs.len()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, oc)| {
            let (base, len) = (ci * CHUNK, oc.len());
            let (gc, uc) = (&gs[base..base + len], &us[base..base + len]);
            with_isa!({
                for i in 0..oc.len() {
                    let gv = gc[i];
                    let sig = 1.0 / (1.0 + super::simd::exp_f32(-gv));
                    oc[i] = (gv * sig) * uc[i];
                }
            })
        });
        Some(make(out, shape))
    }

    fn swiglu_kernel_backward(
        gate: FlexTensor,
        up: FlexTensor,
        dout: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        use rayon::prelude::*;
        if gate.dtype() != DType::F32 || gate.shape() != up.shape() || gate.shape() != dout.shape()
        {
            return None;
        }
        let shape = gate.shape().to_vec();
        let [g, u, o] = [gate, up, dout].map(contiguous);
        let (gs, us, os) = (slice::<f32>(&g), slice::<f32>(&u), slice::<f32>(&o));
        let mut dg = vec![0f32; gs.len()];
        let mut du = vec![0f32; gs.len()];
        const CHUNK: usize = 1 << 14;
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(ci, (dgc, duc))| {
                let (base, len) = (ci * CHUNK, dgc.len());
                // Exact-length slices: no bounds check in the loop, so it vectorises.
                let (gc, uc, oc) = (
                    &gs[base..base + len],
                    &us[base..base + len],
                    &os[base..base + len],
                );
                let duc = &mut duc[..len];
                with_isa!({
                    for i in 0..len {
                        let (gv, uv, ov) = (gc[i], uc[i], oc[i]);
                        let sig = 1.0 / (1.0 + super::simd::exp_f32(-gv));
                        duc[i] = ov * (gv * sig);
                        dgc[i] = ov * uv * (sig * (1.0 + gv * (1.0 - sig)));
                    }
                })
            });
        Some((make(dg, shape.clone()), make(du, shape)))
    }

    fn swiglu_masked_kernel(gate: FlexTensor, up: FlexTensor, z: FlexTensor) -> Option<FlexTensor> {
        use rayon::prelude::*;
        let [n, i] = f32_2d(&gate)?;
        if f32_2d(&up)? != [n, i] || z.dtype() != DType::F32 || dims::<1>(&z)? != [i] || i == 0 {
            return None;
        }
        let [g, u, z] = [gate, up, z].map(contiguous);
        let (gs, us, zs) = (slice::<f32>(&g), slice::<f32>(&u), slice::<f32>(&z));
        let mut out = vec![0f32; n * i];
        out.par_chunks_mut(ROWS * i)
            .enumerate()
            .for_each(|(ci, oc)| {
                with_isa!({
                    for (r, orow) in oc.chunks_exact_mut(i).enumerate() {
                        let row = (ci * ROWS + r) * i;
                        let (gr, ur) = (&gs[row..row + i], &us[row..row + i]);
                        for j in 0..i {
                            let gv = gr[j];
                            let sig = 1.0 / (1.0 + super::simd::exp_f32(-gv));
                            orow[j] = (gv * sig) * (ur[j] * zs[j]);
                        }
                    }
                })
            });
        Some(make(out, vec![n, i]))
    }

    fn swiglu_masked_kernel_backward(
        gate: FlexTensor,
        up: FlexTensor,
        z: FlexTensor,
        dout: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
        use rayon::prelude::*;
        let [n, i] = f32_2d(&gate)?;
        if f32_2d(&up)? != [n, i]
            || f32_2d(&dout)? != [n, i]
            || z.dtype() != DType::F32
            || dims::<1>(&z)? != [i]
            || i == 0
        {
            return None;
        }
        let [g, u, z, o] = [gate, up, z, dout].map(contiguous);
        let (gs, us, zs, os) = (
            slice::<f32>(&g),
            slice::<f32>(&u),
            slice::<f32>(&z),
            slice::<f32>(&o),
        );
        let mut dg = vec![0f32; n * i];
        let mut du = vec![0f32; n * i];
        let chunks = n.div_ceil(ROWS);
        // Per-chunk partial sums of dz, added in chunk order: deterministic.
        let mut dz_parts = vec![0f32; chunks * i];
        dg.par_chunks_mut(ROWS * i)
            .zip(du.par_chunks_mut(ROWS * i))
            .zip(dz_parts.par_chunks_mut(i))
            .enumerate()
            .for_each(|(ci, ((dgc, duc), dzp))| {
                with_isa!({
                    for (r, (dgr, dur)) in dgc
                        .chunks_exact_mut(i)
                        .zip(duc.chunks_exact_mut(i))
                        .enumerate()
                    {
                        let row = (ci * ROWS + r) * i;
                        let (gr, ur, or) =
                            (&gs[row..row + i], &us[row..row + i], &os[row..row + i]);
                        for j in 0..i {
                            let (gv, uv, ov) = (gr[j], ur[j], or[j]);
                            let sig = 1.0 / (1.0 + super::simd::exp_f32(-gv));
                            let silu = gv * sig;
                            dur[j] = (ov * silu) * zs[j];
                            dgr[j] = ov * (uv * zs[j]) * (sig * (1.0 + gv * (1.0 - sig)));
                            dzp[j] += (ov * silu) * uv;
                        }
                    }
                })
            });
        let dz = sum_parts(&dz_parts, i);
        Some((
            make(dg, vec![n, i]),
            make(du, vec![n, i]),
            make(dz, vec![i]),
        ))
    }

    fn adamw_kernel(
        param: FlexTensor,
        grad: FlexTensor,
        moments: Option<(FlexTensor, FlexTensor)>,
        st: AdamWStep,
    ) -> Result<AdamWOutput<Self>, AdamWInput<Self>> {
        use rayon::prelude::*;
        let shape = param.shape();
        let all_f32 = param.dtype() == DType::F32
            && grad.dtype() == DType::F32
            && moments
                .as_ref()
                .is_none_or(|(m, v)| m.dtype() == DType::F32 && v.dtype() == DType::F32);
        let same = grad.shape() == shape
            && moments
                .as_ref()
                .is_none_or(|(m, v)| m.shape() == shape && v.shape() == shape);
        if !all_f32 || !same || st.time == 0 {
            return Err((param, grad, moments));
        }
        let n = shape.num_elements();
        let first = moments.is_none();
        let (m, v) = match moments {
            Some((m, v)) => (owned_f32(m), owned_f32(v)),
            None => (
                make(vec![0f32; n], shape.to_vec()),
                make(vec![0f32; n], shape.to_vec()),
            ),
        };
        let (mut p, mut m, mut v) = (owned_f32(param), m, v);
        let g = contiguous(grad);
        // As burn computes them: f32 factors, f64 scalars rounded to f32 by the scalar ops.
        let decay_rate = st.lr * st.weight_decay as f64;
        let k = AdamWScalars {
            b1: st.beta1,
            b2: st.beta2,
            f1: 1.0 - st.beta1,
            f2: 1.0 - st.beta2,
            c1: 1f32 - st.beta1.powi(st.time as i32),
            c2: 1f32 - st.beta2.powi(st.time as i32),
            eps: st.eps,
            lr: st.lr as f32,
            decay: decay_rate != 0.0,
            keep: (1.0 - decay_rate) as f32,
        };
        {
            let gs = slice::<f32>(&g);
            let ps: &mut [f32] = p.storage_mut();
            let ms: &mut [f32] = m.storage_mut();
            let vs: &mut [f32] = v.storage_mut();
            const CHUNK: usize = 1 << 16;
            ps.par_chunks_mut(CHUNK)
                .zip(ms.par_chunks_mut(CHUNK))
                .zip(vs.par_chunks_mut(CHUNK))
                .zip(gs.par_chunks(CHUNK))
                .for_each(|(((pc, mc), vc), gc)| {
                    with_isa!(match (first, k.decay) {
                        (true, true) => adamw_chunk::<true, true>(pc, mc, vc, gc, &k),
                        (true, false) => adamw_chunk::<true, false>(pc, mc, vc, gc, &k),
                        (false, true) => adamw_chunk::<false, true>(pc, mc, vc, gc, &k),
                        (false, false) => adamw_chunk::<false, false>(pc, mc, vc, gc, &k),
                    })
                });
        }
        Ok((p, m, v))
    }

    fn matmul_kernel(lhs: FlexTensor, rhs: FlexTensor) -> Option<FlexTensor> {
        let (m, k, a) = mat2(&lhs)?;
        let (k2, n, b) = mat2(&rhs)?;
        if k != k2 {
            return None;
        }
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: strides and offsets come from the tensors' layouts; the output is a fresh
        // buffer that the GEMM overwrites entirely (accumulate = false) before it is read.
        unsafe {
            gemm(
                m,
                n,
                k,
                1.0,
                a,
                b,
                out.as_mut_ptr(),
                n as isize,
                1,
                false,
                true,
            );
            out.set_len(m * n);
        }
        Some(make(out, vec![m, n]))
    }

    fn attention_kernel(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        spec: AttnSpec,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let sh = attn_shape(&q, &k, &v, spec.window)?;
        let scale = spec.scale;
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
        spec: AttnSpec,
    ) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
        let sh = attn_shape(&q, &k, &v, spec.window)?;
        let scale = spec.scale;
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
        lm_nll(h, w, vocab_major, tg, false).map(|(nll, lse, _)| (nll, lse))
    }

    fn lm_nll_kernel_keep(
        h: FlexTensor,
        w: FlexTensor,
        vocab_major: bool,
        tg: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor, Option<FlexTensor>)> {
        lm_nll(h, w, vocab_major, tg, true)
    }

    fn lm_nll_kernel_backward(
        h: FlexTensor,
        w: FlexTensor,
        vocab_major: bool,
        tg: FlexTensor,
        lse: FlexTensor,
        dnll: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        lm_nll_backward(h, w, vocab_major, tg, lse, dnll, None)
    }

    fn lm_nll_kernel_backward_kept(
        h: FlexTensor,
        w: FlexTensor,
        vocab_major: bool,
        tg: FlexTensor,
        lse: FlexTensor,
        dnll: FlexTensor,
        logits: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        lm_nll_backward(h, w, vocab_major, tg, lse, dnll, Some(logits))
    }
}

/// The LM-head NLL forward: `(nll, lse)`, plus the logits tiles when `keep` and they fit
/// [`super::KEEP_LOGITS_ELEMS`].
#[allow(clippy::type_complexity)]
fn lm_nll(
    h: FlexTensor,
    w: FlexTensor,
    vocab_major: bool,
    tg: FlexTensor,
    keep: bool,
) -> Option<(FlexTensor, FlexTensor, Option<FlexTensor>)> {
    let sh = ce_shape(&h, &w, vocab_major)?;
    if !is_real(h.dtype()) {
        return None;
    }
    let tg = targets(tg, sh.n, sh.v)?;
    let keep = keep && sh.n.checked_mul(sh.v)? <= super::KEEP_LOGITS_ELEMS;
    fn run<E: Real + burn::tensor::Element + bytemuck::Pod>(
        sh: CeShape,
        h: FlexTensor,
        w: FlexTensor,
        tg: &[usize],
        keep: bool,
    ) -> (FlexTensor, FlexTensor, Option<FlexTensor>) {
        let (h, w) = (contiguous(h), contiguous(w));
        let (mut nll, mut lse) = (vec![E::ZERO; sh.n], vec![E::ZERO; sh.n]);
        let (h, w) = (slice(&h), slice(&w));
        let logits = if keep {
            let mut logits = vec![E::ZERO; sh.n * sh.v];
            ce_cpu::forward_keep(sh, h, w, tg, &mut nll, &mut lse, &mut logits);
            Some(make(logits, vec![sh.n, sh.v]))
        } else {
            ce_cpu::forward(sh, h, w, tg, &mut nll, &mut lse);
            None
        };
        (make(nll, vec![sh.n]), make(lse, vec![sh.n]), logits)
    }
    Some(match h.dtype() {
        DType::F32 => run::<f32>(sh, h, w, &tg, keep),
        _ => run::<f64>(sh, h, w, &tg, keep),
    })
}

/// The LM-head NLL backward `(dh, dw)`: from the kept logits tiles when given (overwritten
/// with their gradient), else recomputing each tile.
fn lm_nll_backward(
    h: FlexTensor,
    w: FlexTensor,
    vocab_major: bool,
    tg: FlexTensor,
    lse: FlexTensor,
    dnll: FlexTensor,
    logits: Option<FlexTensor>,
) -> Option<(FlexTensor, FlexTensor)> {
    let sh = ce_shape(&h, &w, vocab_major)?;
    let dt = h.dtype();
    if !is_real(dt) || lse.dtype() != dt || dnll.dtype() != dt {
        return None;
    }
    if let Some(l) = &logits {
        if l.dtype() != dt || l.shape().num_elements() != sh.n * sh.v {
            return None;
        }
    }
    let tg = targets(tg, sh.n, sh.v)?;
    fn run<E: Real + burn::tensor::Element + bytemuck::Pod>(
        sh: CeShape,
        [h, w, lse, g]: [FlexTensor; 4],
        logits: Option<FlexTensor>,
        tg: &[usize],
    ) -> (FlexTensor, FlexTensor) {
        let [h, w, lse, g] = [h, w, lse, g].map(contiguous);
        let (h, w, lse, g) = (slice(&h), slice(&w), slice(&lse), slice(&g));
        let mut dh = vec![E::ZERO; sh.n * sh.d];
        let mut dw = vec![E::ZERO; sh.v * sh.d];
        match logits {
            Some(logits) => {
                // The backward owns the kept logits: overwrite them with their gradient
                // (copied only if something else still holds them).
                let mut logits = contiguous(logits);
                let logits = &mut logits.storage_mut::<E>()[..sh.n * sh.v];
                ce_cpu::backward_kept(sh, h, w, tg, lse, g, logits, &mut dh, &mut dw);
            }
            None => ce_cpu::backward(sh, h, w, tg, lse, g, &mut dh, &mut dw),
        }
        let wshape = if sh.vocab_major {
            vec![sh.v, sh.d]
        } else {
            vec![sh.d, sh.v]
        };
        (make(dh, vec![sh.n, sh.d]), make(dw, wshape))
    }
    Some(match dt {
        DType::F32 => run::<f32>(sh, [h, w, lse, dnll], logits, &tg),
        _ => run::<f64>(sh, [h, w, lse, dnll], logits, &tg),
    })
}
