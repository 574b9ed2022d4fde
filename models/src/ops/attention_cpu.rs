//! Fused causal attention on host slices, flash-style: queries and keys in tiles, an online
//! softmax, no `[t, s]` score matrix kept, fully masked tiles skipped, GQA read in place (query
//! head `j` reads kv head `j / r`, nothing is repeated), parallel over batch × heads × tiles.
//! Tile products run on [`super::gemm`] (AVX-512 or AVX2 micro-kernels).
//!
//! Layouts, all contiguous row-major: `q [b, t, h, hd]`, `k, v [b, s, g, hd]` with `s ≥ t`
//! (the first `s - t` keys are the cached past: query `i` sees keys `0 ..= s - t + i`, or with a
//! sliding window `w` only the last `w` of them), `out [b, t, h, hd]`, `lse [b, h, t]` (the
//! log-sum-exp of each row's scaled scores, kept for the backward). Tiles wholly outside a
//! query tile's window are skipped, like those past its diagonal.

use rayon::prelude::*;

use super::simd::{with_isa, Real};
use super::SharedMut as Shared;

/// Query rows per tile.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 64;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch.
    pub b: usize,
    /// Query length.
    pub t: usize,
    /// Key length (cached past + t).
    pub s: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (divides h).
    pub g: usize,
    /// Head width.
    pub hd: usize,
    /// Sliding window: query `i` sees keys `past + i - w < j ≤ past + i`; `None`: every key up
    /// to its own position.
    pub window: Option<usize>,
}

impl AttnShape {
    fn past(&self) -> usize {
        self.s - self.t
    }
    /// The first key query `qi` sees.
    fn first_key(&self, qi: usize) -> usize {
        match self.window {
            Some(w) => (self.past() + qi + 1).saturating_sub(w),
            None => 0,
        }
    }
    /// The first key tile (a multiple of `BK`) any query of `i0..` sees.
    fn first_tile(&self, i0: usize) -> usize {
        self.first_key(i0) / BK * BK
    }
    fn r(&self) -> usize {
        self.h / self.g
    }
    /// Whether the kernel handles this shape (else the caller falls back).
    pub fn supported(&self) -> bool {
        self.b > 0
            && self.t > 0
            && self.s >= self.t
            && self.g > 0
            && self.h % self.g == 0
            && self.hd > 0
            && self.window != Some(0)
    }
}

/// `dst[m×n] (row stride ldd) (+)= alpha · A[m×k] · B[k×n]`, strides in elements.
///
/// # Safety
/// As [`super::gemm::gemm`]: every element the shapes and strides address must be valid, and
/// `dst` must alias neither input.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn mm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    ldd: usize,
    accumulate: bool,
    a: *const T,
    a_rs: usize,
    a_cs: usize,
    bm: *const T,
    b_rs: usize,
    b_cs: usize,
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
                ptr: bm,
                rs: b_rs as isize,
                cs: b_cs as isize,
            },
            dst,
            ldd as isize,
            1,
            accumulate,
            false,
        )
    }
}

/// The columns of a tile (first key `kj0`, `n` keys) that query `qi` sees: key `kj0 + c` is
/// visible iff `first ≤ kj0 + c ≤ past + qi`, with `first` the query's first key
/// ([`AttnShape::first_key`]).
#[inline]
fn visible(sh: &AttnShape, qi: usize, kj0: usize, n: usize) -> std::ops::Range<usize> {
    let hi = (sh.past() + qi + 1).saturating_sub(kj0).min(n);
    let lo = sh.first_key(qi).saturating_sub(kj0).min(hi);
    lo..hi
}

/// Forward: fills `out` and `lse`.
pub fn forward<T: Real>(
    sh: AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    let AttnShape {
        b, t, s, h, g, hd, ..
    } = sh;
    assert!(sh.supported());
    assert_eq!(q.len(), b * t * h * hd);
    assert_eq!(k.len(), b * s * g * hd);
    assert_eq!(v.len(), b * s * g * hd);
    assert_eq!(out.len(), b * t * h * hd);
    assert_eq!(lse.len(), b * h * t);
    let (past, r) = (sh.past(), sh.r());
    let qtiles = t.div_ceil(BQ);
    let outp = Shared(out.as_mut_ptr());
    let lsep = Shared(lse.as_mut_ptr());
    (0..b * h * qtiles).into_par_iter().for_each(|task| {
        let (outp, lsep) = (outp, lsep);
        let qt = task % qtiles;
        let head = (task / qtiles) % h;
        let bi = task / (qtiles * h);
        let kvh = head / r;
        let i0 = qt * BQ;
        let m = BQ.min(t - i0);
        let last = past + i0 + m; // keys 0..last are visible to some row of the tile
        let mut sc = vec![T::ZERO; m * BK];
        let mut acc = vec![T::ZERO; m * hd];
        let mut mx = vec![T::NEG_INFINITY; m];
        let mut l = vec![T::ZERO; m];
        let qrow = (bi * t + i0) * h * hd + head * hd;
        let (q_rs, kv_rs) = (h * hd, g * hd);
        for j0 in (sh.first_tile(i0)..last).step_by(BK) {
            let n = BK.min(last - j0);
            let kbase = (bi * s + j0) * kv_rs + kvh * hd;
            // SAFETY: indices are within the asserted lengths; sc has m*BK >= m*n elements.
            unsafe {
                mm(
                    m,
                    n,
                    hd,
                    sc.as_mut_ptr(),
                    n,
                    false,
                    q.as_ptr().add(qrow),
                    q_rs,
                    1,
                    k.as_ptr().add(kbase),
                    1,
                    kv_rs,
                    scale,
                );
            }
            with_isa!(online_softmax_tile(
                &mut sc[..m * n],
                n,
                &sh,
                i0,
                j0,
                &mut mx,
                &mut l,
                &mut acc,
                hd
            ));
            // acc += P · V
            // SAFETY: the indices stay within the lengths asserted above, and the tile buffers hold
            // the m · BK (or m · hd) elements the product writes.
            unsafe {
                mm(
                    m,
                    hd,
                    n,
                    acc.as_mut_ptr(),
                    hd,
                    true,
                    sc.as_ptr(),
                    n,
                    1,
                    v.as_ptr().add(kbase),
                    kv_rs,
                    1,
                    T::ONE,
                );
            }
        }
        for rr in 0..m {
            let inv = T::ONE / l[rr];
            // SAFETY: (bi, i0 + rr, head) is written by this task only.
            unsafe {
                let o = outp.0.add(qrow + rr * q_rs);
                for d in 0..hd {
                    *o.add(d) = acc[rr * hd + d] * inv;
                }
                *lsep.0.add((bi * h + head) * t + i0 + rr) = mx[rr] + l[rr].ln();
            }
        }
    });
}

/// Lanes of the explicit partial reductions below: 16 f32 are one zmm register, and the fixed
/// lane count lets the compiler vectorise a max or a sum (which it may not reassociate itself).
const LANES: usize = 16;

/// The largest of `init` and `row` (NaN-ignoring, like `f32::max`), in `LANES` partial maxima.
#[inline(always)]
fn row_max<T: Real>(row: &[T], init: T) -> T {
    let mut part = [init; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &x) in part.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    let mut m = init;
    for &x in part.iter().chain(rest) {
        m = m.max(x);
    }
    m
}

/// `row[i] = e^(row[i] - shift)` in place; returns the sum, in `LANES` partial sums.
#[inline(always)]
fn exp_sum<T: Real>(row: &mut [T], shift: T) -> T {
    let mut part = [T::ZERO; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (acc, x) in part.iter_mut().zip(c.iter_mut()) {
            let p = (*x - shift).exp();
            *x = p;
            *acc += p;
        }
    }
    let mut sum = T::ZERO;
    for x in chunks.into_remainder() {
        let p = (*x - shift).exp();
        *x = p;
        sum += p;
    }
    for p in part {
        sum += p;
    }
    sum
}

/// One tile of the online softmax: mask, new running max, `p = e^(s - max)` in place, running
/// sums and the rescale of the accumulator rows. Vectorised through [`row_max`] and
/// [`exp_sum`] (written as scalar loops with one running sum, this was a seventh of a SmolLM2
/// forward).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn online_softmax_tile<T: Real>(
    sc: &mut [T],
    n: usize,
    sh: &AttnShape,
    i0: usize,
    j0: usize,
    mx: &mut [T],
    l: &mut [T],
    acc: &mut [T],
    hd: usize,
) {
    for (rr, row) in sc.chunks_exact_mut(n).enumerate() {
        let vis = visible(sh, i0 + rr, j0, n);
        let (before, rest) = row.split_at_mut(vis.start);
        let (seen, after) = rest.split_at_mut(vis.len());
        for x in before.iter_mut().chain(after) {
            *x = T::ZERO;
        }
        if seen.is_empty() {
            // A row whose window lies wholly in later tiles: nothing to add (its zero row of
            // P adds nothing to the accumulator either).
            continue;
        }
        let m_new = row_max(seen, mx[rr]);
        let sum = exp_sum(seen, m_new);
        let corr = (mx[rr] - m_new).exp();
        l[rr] = l[rr] * corr + sum;
        mx[rr] = m_new;
        if corr != T::ONE {
            for a in &mut acc[rr * hd..(rr + 1) * hd] {
                *a *= corr;
            }
        }
    }
}

/// `p = e^(scaled score - lse)` for one tile, masked entries 0.
#[inline(always)]
fn probs_tile<T: Real>(sc: &mut [T], n: usize, sh: &AttnShape, i0: usize, j0: usize, lse: &[T]) {
    for (rr, row) in sc.chunks_exact_mut(n).enumerate() {
        let vis = visible(sh, i0 + rr, j0, n);
        let m = lse[rr];
        for (c, x) in row.iter_mut().enumerate() {
            *x = if vis.contains(&c) {
                (*x - m).exp()
            } else {
                T::ZERO
            };
        }
    }
}

/// `ds = p ∘ (dp - D_row)` in place in `dp`.
#[inline(always)]
fn dscores_tile<T: Real>(p: &[T], dp: &mut [T], n: usize, dsum: &[T]) {
    for (rr, (prow, drow)) in p.chunks_exact(n).zip(dp.chunks_exact_mut(n)).enumerate() {
        let dd = dsum[rr];
        for (x, &pp) in drow.iter_mut().zip(prow) {
            *x = pp * (*x - dd);
        }
    }
}

/// What the backward's tiles read: the forward's inputs, `lse`, the output gradient and
/// `D = rowsum(dO ∘ O)` (`[b, h, t]`).
struct Backward<'a, T> {
    sh: AttnShape,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    lse: &'a [T],
    dout: &'a [T],
    dsum: &'a [T],
    scale: T,
}

impl<T: Real> Backward<'_, T> {
    /// Offsets of batch `bi`, query head `head`, query row `i0` and key row `j0`: into `q`/`dout`,
    /// into `k`/`v` and into `lse`/`dsum`.
    fn offsets(&self, bi: usize, head: usize, i0: usize, j0: usize) -> (usize, usize, usize) {
        let AttnShape { t, s, h, g, hd, .. } = self.sh;
        let kvh = head / self.sh.r();
        (
            (bi * t + i0) * h * hd + head * hd,
            (bi * s + j0) * g * hd + kvh * hd,
            (bi * h + head) * t + i0,
        )
    }

    /// Recompute the probabilities `P` (into `p`) and the score gradients
    /// `dS = P ∘ (dO·Vᵀ − D)` (into `dp`) of query rows `i0 .. i0 + m` of `head` against keys
    /// `j0 .. j0 + n`, both `[m, n]`.
    fn tile(
        &self,
        bi: usize,
        head: usize,
        (i0, m): (usize, usize),
        (j0, n): (usize, usize),
        p: &mut [T],
        dp: &mut [T],
    ) {
        let AttnShape { h, g, hd, .. } = self.sh;
        let (q_rs, kv_rs) = (h * hd, g * hd);
        let (qrow, kbase, lrow) = self.offsets(bi, head, i0, j0);
        // SAFETY: the offsets address rows inside q, k, v and dout (shapes checked by the
        // caller), and p, dp hold at least m · n elements.
        unsafe {
            // S = scale · Q · Kᵀ
            mm(
                m,
                n,
                hd,
                p.as_mut_ptr(),
                n,
                false,
                self.q.as_ptr().add(qrow),
                q_rs,
                1,
                self.k.as_ptr().add(kbase),
                1,
                kv_rs,
                self.scale,
            );
            // dP = dO · Vᵀ
            mm(
                m,
                n,
                hd,
                dp.as_mut_ptr(),
                n,
                false,
                self.dout.as_ptr().add(qrow),
                q_rs,
                1,
                self.v.as_ptr().add(kbase),
                1,
                kv_rs,
                T::ONE,
            );
        }
        let (lse, dsum) = (&self.lse[lrow..lrow + m], &self.dsum[lrow..lrow + m]);
        let sh = self.sh;
        with_isa!({
            probs_tile(&mut p[..m * n], n, &sh, i0, j0, lse);
            dscores_tile(&p[..m * n], &mut dp[..m * n], n, dsum);
        });
    }

    /// Pass 1: `dq = scale · dS · K`, one task per (batch, head, query tile).
    fn dq(&self, dq: &mut [T]) {
        let AttnShape { b, t, h, g, hd, .. } = self.sh;
        let (q_rs, kv_rs) = (h * hd, g * hd);
        let qtiles = t.div_ceil(BQ);
        let dqp = Shared(dq.as_mut_ptr());
        (0..b * h * qtiles).into_par_iter().for_each(|task| {
            let dqp = dqp;
            let qt = task % qtiles;
            let head = (task / qtiles) % h;
            let bi = task / (qtiles * h);
            let i0 = qt * BQ;
            let m = BQ.min(t - i0);
            let last = self.sh.past() + i0 + m;
            let mut p = vec![T::ZERO; m * BK];
            let mut dp = vec![T::ZERO; m * BK];
            let mut acc = vec![T::ZERO; m * hd];
            for j0 in (self.sh.first_tile(i0)..last).step_by(BK) {
                let n = BK.min(last - j0);
                self.tile(bi, head, (i0, m), (j0, n), &mut p, &mut dp);
                let (_, kbase, _) = self.offsets(bi, head, i0, j0);
                // SAFETY: acc is [m, hd]; dp holds the [m, n] tile; kbase addresses k's rows.
                unsafe {
                    mm(
                        m,
                        hd,
                        n,
                        acc.as_mut_ptr(),
                        hd,
                        true,
                        dp.as_ptr(),
                        n,
                        1,
                        self.k.as_ptr().add(kbase),
                        kv_rs,
                        1,
                        self.scale,
                    );
                }
            }
            let (qrow, _, _) = self.offsets(bi, head, i0, 0);
            for rr in 0..m {
                // SAFETY: each task writes only its own (batch, head, query tile) rows of dq.
                unsafe {
                    let o = dqp.0.add(qrow + rr * q_rs);
                    for d in 0..hd {
                        *o.add(d) = acc[rr * hd + d];
                    }
                }
            }
        });
    }

    /// Pass 2: `dv = Pᵀ · dO` and `dk = scale · dSᵀ · Q`, one task per (batch, kv head, key
    /// tile), over the r query heads that read the kv head and the query tiles that see the
    /// key tile.
    fn dkv(&self, dk: &mut [T], dv: &mut [T]) {
        let AttnShape {
            b, t, s, h, g, hd, ..
        } = self.sh;
        let (q_rs, kv_rs, r) = (h * hd, g * hd, self.sh.r());
        let ktiles = s.div_ceil(BK);
        let dkp = Shared(dk.as_mut_ptr());
        let dvp = Shared(dv.as_mut_ptr());
        (0..b * g * ktiles).into_par_iter().for_each(|task| {
            let (dkp, dvp) = (dkp, dvp);
            let kt = task % ktiles;
            let kvh = (task / ktiles) % g;
            let bi = task / (ktiles * g);
            let j0 = kt * BK;
            let n = BK.min(s - j0);
            let mut p = vec![T::ZERO; BQ * n];
            let mut dp = vec![T::ZERO; BQ * n];
            let mut dk_acc = vec![T::ZERO; n * hd];
            let mut dv_acc = vec![T::ZERO; n * hd];
            // The first query that sees key j0 is i = j0 - past (all of them when j0 < past);
            // with a window, no query past j0 + n - 1 + w - past sees the tile.
            let first_q = j0.saturating_sub(self.sh.past());
            let end_q = match self.sh.window {
                Some(w) => (j0 + n + w - 1).saturating_sub(self.sh.past()).min(t),
                None => t,
            };
            for head in kvh * r..(kvh + 1) * r {
                for i0 in ((first_q / BQ) * BQ..end_q).step_by(BQ) {
                    let m = BQ.min(t - i0);
                    self.tile(bi, head, (i0, m), (j0, n), &mut p, &mut dp);
                    let (qrow, _, _) = self.offsets(bi, head, i0, j0);
                    // SAFETY: the accumulators are [n, hd]; p and dp hold the [m, n] tile;
                    // qrow addresses dout's and q's rows.
                    unsafe {
                        // dV += Pᵀ · dO
                        mm(
                            n,
                            hd,
                            m,
                            dv_acc.as_mut_ptr(),
                            hd,
                            true,
                            p.as_ptr(),
                            1,
                            n,
                            self.dout.as_ptr().add(qrow),
                            q_rs,
                            1,
                            T::ONE,
                        );
                        // dK += scale · dSᵀ · Q
                        mm(
                            n,
                            hd,
                            m,
                            dk_acc.as_mut_ptr(),
                            hd,
                            true,
                            dp.as_ptr(),
                            1,
                            n,
                            self.q.as_ptr().add(qrow),
                            q_rs,
                            1,
                            self.scale,
                        );
                    }
                }
            }
            let kbase = (bi * s + j0) * kv_rs + kvh * hd;
            for c in 0..n {
                // SAFETY: each task writes only its own (batch, kv head, key tile) rows.
                unsafe {
                    let ok = dkp.0.add(kbase + c * kv_rs);
                    let ov = dvp.0.add(kbase + c * kv_rs);
                    for d in 0..hd {
                        *ok.add(d) = dk_acc[c * hd + d];
                        *ov.add(d) = dv_acc[c * hd + d];
                    }
                }
            }
        });
    }
}

/// Backward: `dq`, `dk`, `dv` from the forward's inputs, output, `lse` and the output gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    sh: AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let AttnShape {
        b, t, s, h, g, hd, ..
    } = sh;
    assert!(sh.supported());
    assert_eq!(q.len(), b * t * h * hd);
    assert_eq!(out.len(), q.len());
    assert_eq!(dout.len(), q.len());
    assert_eq!(dq.len(), q.len());
    assert_eq!(k.len(), b * s * g * hd);
    assert_eq!(v.len(), k.len());
    assert_eq!(dk.len(), k.len());
    assert_eq!(dv.len(), k.len());
    assert_eq!(lse.len(), b * h * t);
    let q_rs = h * hd;
    // D = rowsum(dO ∘ O), [b, h, t].
    let mut dsum = vec![T::ZERO; b * h * t];
    dsum.par_chunks_mut(t).enumerate().for_each(|(bh, rowd)| {
        let (bi, head) = (bh / h, bh % h);
        for (i, dd) in rowd.iter_mut().enumerate() {
            let base = (bi * t + i) * q_rs + head * hd;
            let mut acc = T::ZERO;
            for d in 0..hd {
                acc += dout[base + d] * out[base + d];
            }
            *dd = acc;
        }
    });
    let bw = Backward {
        sh,
        q,
        k,
        v,
        lse,
        dout,
        dsum: &dsum,
        scale,
    };
    bw.dq(dq);
    bw.dkv(dk, dv);
}

/// The plain definition (scores, mask, softmax, weighted sum) in f64, for tests.
pub fn reference(sh: AttnShape, q: &[f64], k: &[f64], v: &[f64], scale: f64) -> Vec<f64> {
    let AttnShape {
        b, t, s, h, g, hd, ..
    } = sh;
    let (past, r) = (sh.past(), sh.r());
    let mut out = vec![0.0; b * t * h * hd];
    for bi in 0..b {
        for head in 0..h {
            let kvh = head / r;
            for i in 0..t {
                let qo = ((bi * t + i) * h + head) * hd;
                let (first, vis) = (sh.first_key(i), past + i + 1);
                let sc: Vec<f64> = (first..vis)
                    .map(|j| {
                        let ko = ((bi * s + j) * g + kvh) * hd;
                        (0..hd).map(|d| q[qo + d] * k[ko + d]).sum::<f64>() * scale
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in (first..vis).zip(&e) {
                    let vo = ((bi * s + j) * g + kvh) * hd;
                    for d in 0..hd {
                        out[qo + d] += ej / z * v[vo + d];
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
    }

    /// Loss `Σ out ∘ w` for a fixed random `w`, so its gradient wrt out is `w`.
    fn loss(sh: AttnShape, q: &[f64], k: &[f64], v: &[f64], w: &[f64], scale: f64) -> f64 {
        reference(sh, q, k, v, scale)
            .iter()
            .zip(w)
            .map(|(a, b)| a * b)
            .sum()
    }

    fn check(sh: AttnShape, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let nq = sh.b * sh.t * sh.h * sh.hd;
        let nk = sh.b * sh.s * sh.g * sh.hd;
        let (q, k, v) = (
            rand_vec(&mut rng, nq),
            rand_vec(&mut rng, nk),
            rand_vec(&mut rng, nk),
        );
        let w = rand_vec(&mut rng, nq);
        let scale = 1.0 / (sh.hd as f64).sqrt();
        let want = reference(sh, &q, &k, &v, scale);
        let mut out = vec![0.0; nq];
        let mut lse = vec![0.0; sh.b * sh.h * sh.t];
        forward(sh, &q, &k, &v, scale, &mut out, &mut lse);
        let err = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "{sh:?}: forward error {err}");
        // f32 copy agrees to f32 precision.
        let f = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let mut out32 = vec![0f32; nq];
        let mut lse32 = vec![0f32; sh.b * sh.h * sh.t];
        forward(
            sh,
            &f(&q),
            &f(&k),
            &f(&v),
            scale as f32,
            &mut out32,
            &mut lse32,
        );
        let err32 = out32
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(err32 < 2e-6, "{sh:?}: f32 forward error {err32}");
        // Gradients against central finite differences of the f64 reference.
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        backward(
            sh, &q, &k, &v, &out, &lse, &w, scale, &mut dq, &mut dk, &mut dv,
        );
        let eps = 1e-6;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for _ in 0..6 {
                let n = grad.len();
                let idx = rng.random_range(0..n);
                let mut xs = [q.clone(), k.clone(), v.clone()];
                xs[which][idx] += eps;
                let up = loss(sh, &xs[0], &xs[1], &xs[2], &w, scale);
                xs[which][idx] -= 2.0 * eps;
                let dn = loss(sh, &xs[0], &xs[1], &xs[2], &w, scale);
                let fd = (up - dn) / (2.0 * eps);
                assert!(
                    (fd - grad[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{sh:?}: grad {which}[{idx}] {} vs fd {fd}",
                    grad[idx]
                );
            }
        }
    }

    #[test]
    fn matches_reference_and_finite_differences() {
        let shapes = [
            (1, 1, 1, 1, 1, 8),
            (2, 5, 5, 3, 1, 8),
            (1, 67, 67, 4, 4, 16),
            (2, 130, 130, 6, 2, 8),
            (1, 3, 70, 9, 1, 8),   // cached past of 67 keys
            (1, 1, 129, 2, 2, 32), // one decode step
        ];
        for (i, (b, t, s, h, g, hd)) in shapes.into_iter().enumerate() {
            let window = None;
            check(
                AttnShape {
                    b,
                    t,
                    s,
                    h,
                    g,
                    hd,
                    window,
                },
                i as u64,
            );
        }
    }

    /// Sliding windows: shorter than a tile, across tile boundaries (rows whose window starts
    /// in a later tile than the tile's first row's), with a cached past longer than the window,
    /// a decode step, a window of one key, and one longer than everything (no effect).
    #[test]
    fn sliding_windows_match_reference_and_finite_differences() {
        let shapes = [
            (1, 20, 20, 2, 1, 8, 5),
            (1, 150, 150, 4, 2, 8, 70),
            (2, 130, 130, 2, 2, 8, 64),
            (1, 9, 140, 3, 1, 8, 33), // past of 131 keys, most outside the window
            (1, 1, 129, 2, 2, 16, 40),
            (1, 12, 12, 2, 1, 8, 1),
            (1, 30, 30, 2, 2, 8, 1000),
        ];
        for (i, (b, t, s, h, g, hd, w)) in shapes.into_iter().enumerate() {
            check(
                AttnShape {
                    b,
                    t,
                    s,
                    h,
                    g,
                    hd,
                    window: Some(w),
                },
                100 + i as u64,
            );
        }
    }
}
