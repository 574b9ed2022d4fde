//! Fused LM head + cross-entropy on host slices: per-token `nll = logsumexp(h·Wᵀ) - (h·Wᵀ)[target]`
//! computed over the vocabulary in tiles, so the `[N, V]` logits never exist, and its backward
//! (`dh`, `dW`) recomputing each tile. Each tile is one large GEMM on [`super::gemm`] that
//! uses every thread (small per-thread tiles repacked the head weight for every row block and
//! ran at half the GEMM's rate), followed by a row-parallel pass over the tile. Sums run in a
//! fixed order (vocabulary chunks in sequence), so results do not depend on scheduling.
//!
//! `h` is `[N, d]` row-major. The head weight is read through strides as a `[V, d]` matrix:
//! `(w_rs, w_cs) = (d, 1)` for a tied embedding `[V, d]`, `(1, V)` for a linear weight stored
//! `[d, V]`. `dW` is written in the same layout as `W`.

use rayon::prelude::*;

use super::simd::{with_isa, Real};

/// Rows per block.
const RB: usize = 1024;
/// Vocabulary entries per chunk (a `RB × VC` tile is 4 MiB in f32: it stays in L3 between
/// the GEMM that writes it and the passes that read it).
const VC: usize = 1024;
/// Rows per task of the element-wise passes over a tile.
const ROWS_PER_TASK: usize = 16;

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

/// `dst (+)= alpha · A · B` with every stride explicit (elements), over every thread.
///
/// # Safety
/// As [`super::gemm::gemm`]: every element the shapes and strides address must be valid, and
/// `dst` must alias neither input.
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
    // SAFETY: this function's contract is `gemm`'s, to which the pointers and strides go unchanged.
    unsafe {
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
            true,
        )
    }
}

/// Logits tile `[m, nv]` = `h[r0..r0+m] · W[v0..v0+nv]ᵀ`.
///
/// # Safety
/// `h` must hold rows `r0..r0 + m` of width `sh.d`, `w` the rows `v0..v0 + nv` of the LM head
/// in `sh`'s layout, and `out` at least `m · nv` floats.
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
    // SAFETY: this function's contract: rows `r0..r0 + m` of `h` and rows `v0..v0 + nv` of `W` (in
    // `sh`'s layout) lie inside the slices, and `out` holds the `m · nv` tile, apart from both.
    unsafe {
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
}

/// Where the logits tile of rows `r0..r0 + m` and vocabulary `v0..v0 + nv` lives in a kept
/// `[N, V]` buffer: tile by tile (row blocks in order, each holding its vocabulary chunks in
/// order, every tile a contiguous `[m, nv]`), so each tile is one contiguous read.
fn kept_tile(v: usize, r0: usize, m: usize, v0: usize, nv: usize) -> std::ops::Range<usize> {
    let at = r0 * v + m * v0;
    at..at + m * nv
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
    forward_into(sh, h, w, targets, nll, lse, None)
}

/// As [`forward`], keeping every logits tile in `logits` (`N · V` elements, tile-major; see
/// `kept_tile`) for [`backward_kept`], which then reads each tile back instead of
/// recomputing it (the recompute is a third of the head's GEMM work). The caller bounds
/// `N · V` ([`super::KEEP_LOGITS_ELEMS`]).
pub fn forward_keep<T: Real>(
    sh: CeShape,
    h: &[T],
    w: &[T],
    targets: &[usize],
    nll: &mut [T],
    lse: &mut [T],
    logits: &mut [T],
) {
    assert_eq!(logits.len(), sh.n * sh.v);
    forward_into(sh, h, w, targets, nll, lse, Some(logits))
}

fn forward_into<T: Real>(
    sh: CeShape,
    h: &[T],
    w: &[T],
    targets: &[usize],
    nll: &mut [T],
    lse: &mut [T],
    mut keep: Option<&mut [T]>,
) {
    let CeShape { n, d, v, .. } = sh;
    assert_eq!(h.len(), n * d);
    assert_eq!(w.len(), v * d);
    assert_eq!(targets.len(), n);
    assert_eq!(nll.len(), n);
    assert_eq!(lse.len(), n);
    let vchunks = v.div_ceil(VC);
    // Per (row, chunk): running max and sum of exponentials; per row: the target logit.
    let mut stats = vec![(T::NEG_INFINITY, T::ZERO); n * vchunks];
    let mut target_logit = vec![T::ZERO; n];
    let mut scratch = if keep.is_some() {
        vec![]
    } else {
        vec![T::ZERO; RB.min(n) * VC.min(v)]
    };
    for r0 in (0..n).step_by(RB) {
        let m = RB.min(n - r0);
        for vc in 0..vchunks {
            let v0 = vc * VC;
            let nv = VC.min(v - v0);
            let tile = match keep.as_deref_mut() {
                Some(k) => &mut k[kept_tile(v, r0, m, v0, nv)],
                None => &mut scratch[..m * nv],
            };
            // SAFETY: the tile is the `[m, nv]` block of rows `r0..r0 + m` and vocabulary rows
            // `v0..v0 + nv`, inside `h`, `w` and the tile slice (shapes checked where the kernel is
            // entered).
            unsafe { logits_tile(sh, h, w, r0, m, v0, nv, tile) };
            tile.par_chunks(nv * ROWS_PER_TASK)
                .zip(
                    stats[r0 * vchunks..(r0 + m) * vchunks].par_chunks_mut(vchunks * ROWS_PER_TASK),
                )
                .zip(target_logit[r0..r0 + m].par_chunks_mut(ROWS_PER_TASK))
                .zip(targets[r0..r0 + m].par_chunks(ROWS_PER_TASK))
                .for_each(|(((rows, st), tl), tg)| {
                    for (rr, row) in rows.chunks_exact(nv).enumerate() {
                        st[rr * vchunks + vc] = with_isa!(max_sumexp(row));
                        if (v0..v0 + nv).contains(&tg[rr]) {
                            tl[rr] = row[tg[rr] - v0];
                        }
                    }
                });
        }
    }
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

/// The row's maximum and `Σ e^(x - max)`, over 16 lanes of partial results combined in a fixed
/// order (a single running max and sum is a serial dependency the compiler may not vectorise).
#[inline(always)]
fn max_sumexp<T: Real>(row: &[T]) -> (T, T) {
    const L: usize = 16;
    let chunks = row.chunks_exact(L);
    let rest = chunks.remainder();
    let mut lanes = [T::NEG_INFINITY; L];
    for c in chunks.clone() {
        for i in 0..L {
            // NaN-ignoring like `max`: a NaN logit surfaces through the sum below.
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let mut mx = T::NEG_INFINITY;
    for &x in lanes.iter().chain(rest) {
        mx = mx.max(x);
    }
    let mut sums = [T::ZERO; L];
    for c in chunks {
        for i in 0..L {
            sums[i] += (c[i] - mx).exp();
        }
    }
    let mut s = T::ZERO;
    for v in sums {
        s += v;
    }
    for &x in rest {
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
    backward_from(sh, h, w, targets, lse, g, dh, dw, None)
}

/// As [`backward`], reading each logits tile from what [`forward_keep`] kept (overwritten
/// with the tile's gradient) instead of recomputing it. Same tiles, same sum order: the
/// results equal [`backward`]'s bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn backward_kept<T: Real>(
    sh: CeShape,
    h: &[T],
    w: &[T],
    targets: &[usize],
    lse: &[T],
    g: &[T],
    logits: &mut [T],
    dh: &mut [T],
    dw: &mut [T],
) {
    assert_eq!(logits.len(), sh.n * sh.v);
    backward_from(sh, h, w, targets, lse, g, dh, dw, Some(logits))
}

#[allow(clippy::too_many_arguments)]
fn backward_from<T: Real>(
    sh: CeShape,
    h: &[T],
    w: &[T],
    targets: &[usize],
    lse: &[T],
    g: &[T],
    dh: &mut [T],
    dw: &mut [T],
    mut keep: Option<&mut [T]>,
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
    let mut scratch = if keep.is_some() {
        vec![]
    } else {
        vec![T::ZERO; RB.min(n) * VC.min(v)]
    };
    for vc in 0..vchunks {
        let v0 = vc * VC;
        let nv = VC.min(v - v0);
        for (bi, r0) in (0..n).step_by(RB).enumerate() {
            let m = RB.min(n - r0);
            let tile = match keep.as_deref_mut() {
                Some(k) => &mut k[kept_tile(v, r0, m, v0, nv)],
                None => {
                    let t = &mut scratch[..m * nv];
                    // SAFETY: the tile is the `[m, nv]` block of rows `r0..r0 + m` and vocabulary
                    // rows `v0..v0 + nv`, inside `h`, `w` and the tile slice (shapes checked where
                    // the kernel is entered).
                    unsafe { logits_tile(sh, h, w, r0, m, v0, nv, t) };
                    t
                }
            };
            tile.par_chunks_mut(nv * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(ti, rows)| {
                    let a = r0 + ti * ROWS_PER_TASK;
                    let b = a + rows.len() / nv;
                    with_isa!(dlogits_tile(
                        rows,
                        nv,
                        v0,
                        &lse[a..b],
                        &g[a..b],
                        &targets[a..b]
                    ))
                });
            // SAFETY: the tile is the `[m, nv]` block of rows `r0..r0 + m` and vocabulary rows
            // `v0..v0 + nv`, inside `h`, `w` and the tile slice (shapes checked where the kernel is
            // entered).
            unsafe {
                // dW[v0.., :] (+)= dlogitsᵀ · h_block, summed over row blocks in order.
                mm(
                    (nv, d, m),
                    dw.as_mut_ptr().add(v0 * w_rs),
                    (w_rs, w_cs),
                    bi > 0,
                    tile.as_ptr(),
                    (1, nv),
                    h.as_ptr().add(r0 * d),
                    (d, 1),
                    T::ONE,
                );
                // dh_block (+)= dlogits · W[v0.., :], summed over chunks in order.
                mm(
                    (m, d, nv),
                    dh.as_mut_ptr().add(r0 * d),
                    (d, 1),
                    vc > 0,
                    tile.as_ptr(),
                    (nv, 1),
                    w.as_ptr().add(v0 * w_rs),
                    (w_rs, w_cs),
                    T::ONE,
                );
            }
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
            // More rows than one block, a short last vocabulary chunk.
            (1100, 3, 1030, true),
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
            // The kept-logits path computes the same tiles in the same order: the same bits.
            let (mut nll2, mut lse2, mut logits) = (vec![0.0; n], vec![0.0; n], vec![0.0; n * v]);
            forward_keep(sh, &h, &w, &tg, &mut nll2, &mut lse2, &mut logits);
            for (a, b) in nll2.iter().zip(&nll).chain(lse2.iter().zip(&lse)) {
                assert!(
                    (a - b).abs() < 1e-10 * (1.0 + b.abs()),
                    "{sh:?}: {a} vs {b}"
                );
            }
            let (mut dh2, mut dw2) = (vec![0.0; n * d], vec![0.0; v * d]);
            backward_kept(sh, &h, &w, &tg, &lse2, &g, &mut logits, &mut dh2, &mut dw2);
            for (a, b) in dh2.iter().zip(&dh).chain(dw2.iter().zip(&dw)) {
                assert!(
                    (a - b).abs() < 1e-10 * (1.0 + b.abs()),
                    "{sh:?}: {a} vs {b}"
                );
            }
            let loss = |h: &[f64], w: &[f64]| -> f64 {
                reference(sh, h, w, &tg)
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a * b)
                    .sum()
            };
            let eps = 1e-4;
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
