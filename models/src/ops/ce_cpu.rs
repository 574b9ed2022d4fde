//! Fused LM head + cross-entropy on host slices: per-token `nll = logsumexp(h·Wᵀ) - (h·Wᵀ)[target]`
//! computed over the vocabulary in tiles, so the `[N, V]` logits never exist, and its backward
//! (`dh`, `dW`) recomputing each tile. Tiles run on [`super::gemm`], parallel over
//! (row block × vocabulary chunk) forward and over vocabulary chunks backward.
//!
//! `h` is `[N, d]` row-major. The head weight is read through strides as a `[V, d]` matrix:
//! `(w_rs, w_cs) = (d, 1)` for a tied embedding `[V, d]`, `(1, V)` for a linear weight stored
//! `[d, V]`. `dW` is written in the same layout as `W`.

use rayon::prelude::*;

use super::simd::{with_isa, Real};
use super::SharedMut as Shared;

/// Rows per block.
const RB: usize = 256;
/// Vocabulary entries per chunk.
const VC: usize = 1024;
/// Groups of vocabulary chunks whose `dh` partial sums the backward adds in a fixed order.
const DH_GROUPS: usize = 8;

/// Shapes and weight layout of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CeShape {
    /// Tokens.
    pub n: usize,
    /// Hidden width.
    pub d: usize,
    /// Vocabulary.
    pub v: usize,
    /// Whether `W` is stored `[V, d]` (else `[d, V]`).
    pub vocab_major: bool,
}

impl CeShape {
    fn strides(&self) -> (usize, usize) {
        if self.vocab_major {
            (self.d, 1)
        } else {
            (1, self.v)
        }
    }
}

/// `dst (+)= alpha · A · B` with every stride explicit (elements).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn mm<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    (d_rs, d_cs): (usize, usize),
    accumulate: bool,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
    alpha: T,
) {
    super::gemm::gemm(
        m,
        n,
        k,
        alpha,
        super::gemm::Mat {
            ptr: a,
            rs: a_rs as isize,
            cs: a_cs as isize,
        },
        super::gemm::Mat {
            ptr: b,
            rs: b_rs as isize,
            cs: b_cs as isize,
        },
        dst,
        d_rs as isize,
        d_cs as isize,
        accumulate,
        false,
    )
}

/// Logits tile `[m, nv]` = `h[r0..r0+m] · W[v0..v0+nv]ᵀ`.
unsafe fn logits_tile<T: Real>(
    sh: CeShape,
    h: &[T],
    w: &[T],
    r0: usize,
    m: usize,
    v0: usize,
    nv: usize,
    out: &mut [T],
) {
    let (w_rs, w_cs) = sh.strides();
    mm(
        (m, nv, sh.d),
        out.as_mut_ptr(),
        (nv, 1),
        false,
        h.as_ptr().add(r0 * sh.d),
        (sh.d, 1),
        w.as_ptr().add(v0 * w_rs),
        // Wᵀ: element (dd, vv) is W[v0 + vv, dd].
        (w_cs, w_rs),
        T::ONE,
    );
}

/// Per-token NLL and log-sum-exp. Targets must be in `0..V` (checked by the caller).
pub fn forward<T: Real>(
    sh: CeShape,
    h: &[T],
    w: &[T],
    targets: &[usize],
    nll: &mut [T],
    lse: &mut [T],
) {
    let CeShape { n, d, v, .. } = sh;
    assert_eq!(h.len(), n * d);
    assert_eq!(w.len(), v * d);
    assert_eq!(targets.len(), n);
    assert_eq!(nll.len(), n);
    assert_eq!(lse.len(), n);
    let (rblocks, vchunks) = (n.div_ceil(RB), v.div_ceil(VC));
    // Per (row, chunk): running max and sum of exponentials; per row: the target logit.
    let mut stats = vec![(T::NEG_INFINITY, T::ZERO); n * vchunks];
    let mut target_logit = vec![T::ZERO; n];
    let statp = Shared(stats.as_mut_ptr());
    let tgtp = Shared(target_logit.as_mut_ptr());
    (0..rblocks * vchunks).into_par_iter().for_each(|task| {
        let (statp, tgtp) = (statp, tgtp);
        let (rb, vc) = (task / vchunks, task % vchunks);
        let (r0, v0) = (rb * RB, vc * VC);
        let (m, nv) = (RB.min(n - r0), VC.min(v - v0));
        let mut tile = vec![T::ZERO; m * nv];
        unsafe { logits_tile(sh, h, w, r0, m, v0, nv, &mut tile) };
        for (rr, row) in tile.chunks_exact(nv).enumerate() {
            let (mx, sum) = with_isa!(max_sumexp(row));
            let r = r0 + rr;
            // SAFETY: (r, vc) belongs to this task; the target lies in exactly one chunk.
            unsafe {
                *statp.0.add(r * vchunks + vc) = (mx, sum);
                let tg = targets[r];
                if (v0..v0 + nv).contains(&tg) {
                    *tgtp.0.add(r) = row[tg - v0];
                }
            }
        }
    });
    nll.par_iter_mut()
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(r, (nl, ls))| {
            let st = &stats[r * vchunks..(r + 1) * vchunks];
            let mx = st.iter().fold(T::NEG_INFINITY, |a, &(m, _)| a.max(m));
            let mut z = T::ZERO;
            for &(m, s) in st {
                z += s * (m - mx).exp();
            }
            let l = mx + z.ln();
            *ls = l;
            *nl = l - target_logit[r];
        });
}

#[inline(always)]
fn max_sumexp<T: Real>(row: &[T]) -> (T, T) {
    let mut mx = T::NEG_INFINITY;
    for &x in row {
        mx = mx.max(x);
    }
    let mut s = T::ZERO;
    for &x in row {
        s += (x - mx).exp();
    }
    (mx, s)
}

/// `g_r · (softmax_r - onehot(target_r))` in place over a logits tile.
#[inline(always)]
fn dlogits_tile<T: Real>(
    tile: &mut [T],
    nv: usize,
    v0: usize,
    lse: &[T],
    g: &[T],
    targets: &[usize],
) {
    for (rr, row) in tile.chunks_exact_mut(nv).enumerate() {
        let (l, gr) = (lse[rr], g[rr]);
        for x in row.iter_mut() {
            *x = (*x - l).exp() * gr;
        }
        let tg = targets[rr];
        if (v0..v0 + nv).contains(&tg) {
            row[tg - v0] = row[tg - v0] - gr;
        }
    }
}

/// Gradients of `Σ_r g_r · nll_r` with respect to `h` and `W`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    sh: CeShape,
    h: &[T],
    w: &[T],
    targets: &[usize],
    lse: &[T],
    g: &[T],
    dh: &mut [T],
    dw: &mut [T],
) {
    let CeShape { n, d, v, .. } = sh;
    assert_eq!(h.len(), n * d);
    assert_eq!(w.len(), v * d);
    assert_eq!(dh.len(), n * d);
    assert_eq!(dw.len(), v * d);
    assert_eq!(lse.len(), n);
    assert_eq!(g.len(), n);
    let (w_rs, w_cs) = sh.strides();
    let vchunks = v.div_ceil(VC);
    let dwp = Shared(dw.as_mut_ptr());
    // A fixed number of groups of consecutive vocabulary chunks, each summing into its own
    // `dh`, added in group order: the same result on every run (a work-stealing fold would
    // make the float sums depend on scheduling).
    let groups = vchunks.min(DH_GROUPS);
    let per_group = vchunks.div_ceil(groups);
    let partials: Vec<Vec<T>> = (0..groups)
        .into_par_iter()
        .map(|gi| {
            let dwp = dwp;
            let mut dh_acc = vec![T::ZERO; n * d];
            let mut tile = vec![T::ZERO; RB.min(n) * VC];
            for vc in gi * per_group..((gi + 1) * per_group).min(vchunks) {
                let v0 = vc * VC;
                let nv = VC.min(v - v0);
                for (bi, r0) in (0..n).step_by(RB).enumerate() {
                    let m = RB.min(n - r0);
                    let tile = &mut tile[..m * nv];
                    unsafe { logits_tile(sh, h, w, r0, m, v0, nv, tile) };
                    with_isa!(dlogits_tile(
                        tile,
                        nv,
                        v0,
                        &lse[r0..r0 + m],
                        &g[r0..r0 + m],
                        &targets[r0..r0 + m]
                    ));
                    unsafe {
                        // dW[v0.., :] (+)= dlogitsᵀ · h_block (the chunk's rows are this task's).
                        mm(
                            (nv, d, m),
                            dwp.0.add(v0 * w_rs),
                            (w_rs, w_cs),
                            bi > 0,
                            tile.as_ptr(),
                            (1, nv),
                            h.as_ptr().add(r0 * d),
                            (d, 1),
                            T::ONE,
                        );
                        // dh_block += dlogits · W[v0.., :]
                        mm(
                            (m, d, nv),
                            dh_acc.as_mut_ptr().add(r0 * d),
                            (d, 1),
                            true,
                            tile.as_ptr(),
                            (nv, 1),
                            w.as_ptr().add(v0 * w_rs),
                            (w_rs, w_cs),
                            T::ONE,
                        );
                    }
                }
            }
            dh_acc
        })
        .collect();
    dh.fill(T::ZERO);
    for p in &partials {
        for (x, y) in dh.iter_mut().zip(p) {
            *x += *y;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn reference(sh: CeShape, h: &[f64], w: &[f64], targets: &[usize]) -> Vec<f64> {
        let (w_rs, w_cs) = sh.strides();
        (0..sh.n)
            .map(|r| {
                let logits: Vec<f64> = (0..sh.v)
                    .map(|vv| {
                        (0..sh.d)
                            .map(|dd| h[r * sh.d + dd] * w[vv * w_rs + dd * w_cs])
                            .sum()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|x| (x - m).exp()).sum();
                m + z.ln() - logits[targets[r]]
            })
            .collect()
    }

    #[test]
    fn matches_reference_and_finite_differences() {
        for (i, &(n, d, v, vm)) in [
            (1, 4, 3, true),
            (7, 8, 1500, true),
            (300, 16, 2100, false),
            (5, 3, 1024, false),
        ]
        .iter()
        .enumerate()
        {
            let sh = CeShape {
                n,
                d,
                v,
                vocab_major: vm,
            };
            let mut rng = StdRng::seed_from_u64(i as u64);
            let h: Vec<f64> = (0..n * d)
                .map(|_| rng.random::<f64>() * 2.0 - 1.0)
                .collect();
            let w: Vec<f64> = (0..v * d)
                .map(|_| rng.random::<f64>() * 2.0 - 1.0)
                .collect();
            let tg: Vec<usize> = (0..n).map(|_| rng.random_range(0..v)).collect();
            let g: Vec<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
            let want = reference(sh, &h, &w, &tg);
            let (mut nll, mut lse) = (vec![0.0; n], vec![0.0; n]);
            forward(sh, &h, &w, &tg, &mut nll, &mut lse);
            for (a, b) in nll.iter().zip(&want) {
                assert!((a - b).abs() < 1e-10, "{sh:?}: {a} vs {b}");
            }
            let (mut dh, mut dw) = (vec![0.0; n * d], vec![0.0; v * d]);
            backward(sh, &h, &w, &tg, &lse, &g, &mut dh, &mut dw);
            let loss = |h: &[f64], w: &[f64]| -> f64 {
                reference(sh, h, w, &tg)
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a * b)
                    .sum()
            };
            let eps = 1e-6;
            for _ in 0..5 {
                let idx = rng.random_range(0..n * d);
                let (mut hp, mut hm) = (h.clone(), h.clone());
                hp[idx] += eps;
                hm[idx] -= eps;
                let fd = (loss(&hp, &w) - loss(&hm, &w)) / (2.0 * eps);
                assert!(
                    (fd - dh[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "dh {fd} {}",
                    dh[idx]
                );
                let idx = rng.random_range(0..v * d);
                let (mut wp, mut wm) = (w.clone(), w.clone());
                wp[idx] += eps;
                wm[idx] -= eps;
                let fd = (loss(&h, &wp) - loss(&h, &wm)) / (2.0 * eps);
                assert!(
                    (fd - dw[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "dw {fd} {}",
                    dw[idx]
                );
            }
        }
    }
}
