//! Shears' own f32 GEMM for the CPU kernels: BLIS-style blocking (packed `KC × NC` panels of B,
//! packed `MC × KC` blocks of A, a register-tiled micro-kernel), AVX-512 (12 × 32 tile, 24 zmm
//! accumulators) or AVX2 + FMA (6 × 16 tile), chosen at run time. Other CPUs, f64 and
//! layouts it does not take go to the `gemm` crate.
//!
//! Why not only the `gemm` crate (burn-flex's GEMM): on the 2-core AVX-512 development machine
//! its AVX-512 f32 micro-kernel ran at about 50 GFLOP/s per core on our shapes whatever the
//! blocking, while this 12 × 32 kernel runs at about 145 (see `shears bench kernels`).
//!
//! Every operand is read through strides (`rs`, `cs` in elements), so transposed views cost
//! nothing; packing absorbs the layout.
//!
//! Why one file of ~710 lines: packing, blocking and the two ISA micro-kernels share the tile
//! constants and the packed layouts; split apart, each half would only make sense with the
//! other open.

use rayon::prelude::*;

use super::simd::{Isa, Real};
use super::SharedMut;

/// A strided read-only matrix.
#[derive(Clone, Copy, Debug)]
pub struct Mat<T> {
    /// Element (0, 0).
    pub ptr: *const T,
    /// Row stride in elements.
    pub rs: isize,
    /// Column stride in elements.
    pub cs: isize,
}

// SAFETY: a `Mat` is a read-only view; `gemm`'s contract keeps the elements valid and unwritten
// for the whole call, so the tasks of one GEMM may read them from any thread.
unsafe impl<T> Send for Mat<T> {}
// SAFETY: as for `Send`: only ever read, under `gemm`'s contract.
unsafe impl<T> Sync for Mat<T> {}

impl<T> Mat<T> {
    /// Row-major with leading dimension `ld`.
    pub fn rows(ptr: *const T, ld: usize) -> Self {
        Mat {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The transpose (a view).
    pub fn t(self) -> Self {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Pointer to element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` must address an element of the matrix the pointer and strides describe.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> *const T {
        // SAFETY: `(i, j)` addresses an element of the matrix `ptr`, `rs` and `cs` describe (this
        // function's contract), so the offset stays inside its allocation.
        unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }
}

/// `C[m×n] = alpha · A[m×k] · B[k×n]`, plus the old `C` when `accumulate`. `C` is strided
/// (`c_rs`, `c_cs`). With `parallel`, work is split over the rayon pool.
///
/// # Safety
/// Every element addressed through the pointers and strides must be valid; `C` must not alias
/// `A` or `B`, and no two elements of `C` may share an address.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: Mat<T>,
    b: Mat<T>,
    c: *mut T,
    c_rs: isize,
    c_cs: isize,
    accumulate: bool,
    parallel: bool,
) {
    // SAFETY: the caller guarantees this function's contract: every element addressed through `a`,
    // `b` and `c` is valid and `c` aliases neither input. The `k == 0` loop writes only those
    // elements of C; `sgemm` is called with a vector ISA `Isa::detect` found and C's unit stride on
    // its columns; the `gemm` crate takes the same pointers and strides.
    unsafe {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                for i in 0..m {
                    for j in 0..n {
                        *c.offset(i as isize * c_rs + j as isize * c_cs) = T::ZERO;
                    }
                }
            }
            return;
        }
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
            let isa = Isa::detect();
            if isa != Isa::Baseline {
                let cast = |x: Mat<T>| Mat::<f32> {
                    ptr: x.ptr as *const f32,
                    rs: x.rs,
                    cs: x.cs,
                };
                let alpha = alpha.to_f64() as f32;
                let c = c as *mut f32;
                // The kernels write rows of C contiguously: transpose the problem when C is
                // column-major (Cᵀ = Bᵀ Aᵀ).
                if c_cs == 1 {
                    return sgemm(
                        isa,
                        m,
                        n,
                        k,
                        alpha,
                        cast(a),
                        cast(b),
                        c,
                        c_rs,
                        accumulate,
                        parallel,
                    );
                }
                if c_rs == 1 {
                    return sgemm(
                        isa,
                        n,
                        m,
                        k,
                        alpha,
                        cast(b).t(),
                        cast(a).t(),
                        c,
                        c_cs,
                        accumulate,
                        parallel,
                    );
                }
            }
        }
        let par = if parallel {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs,
            c_rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::ONE,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Cache blocking: depth of a packed block (`KC`), rows of A per macro block (`MC`, a multiple
/// of the kernel's `mr`) and the widest column chunk of B one task packs (`NC`).
#[derive(Clone, Copy, Debug)]
struct Blocking {
    kc: usize,
    mc: usize,
    nc: usize,
}

/// Depths up to this run as one `KC` block: C is then written once, never re-read per block,
/// which pays most where C is large (the LM head's `[b·t, vocab]`). Measured on a Sapphire
/// Rapids Xeon (2 cores): K = 576 as one block ran the gate/up and LM-head shapes 5-19% faster
/// than 256 + 256 + 64, while K = 1536 stays fastest in 256-deep blocks.
const SINGLE_BLOCK_MAX_K: usize = 768;

fn blocking(kern: &Kernel, k: usize) -> Blocking {
    static OVERRIDE: std::sync::OnceLock<Option<(usize, usize, usize)>> =
        std::sync::OnceLock::new();
    // Tuning knob for `examples/gemm_tune.rs`: SHEARS_GEMM_BLOCKING="kc,mc_panels,nc_panels".
    let o = OVERRIDE.get_or_init(|| {
        let v = std::env::var("SHEARS_GEMM_BLOCKING").ok()?;
        let p: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        (p.len() == 3 && p.iter().all(|&x| x > 0)).then(|| (p[0], p[1], p[2]))
    });
    let (kc, mcp, ncp) = o.unwrap_or_else(|| {
        if k > kern.kc && k <= SINGLE_BLOCK_MAX_K {
            // Keep the packed A block (MC x KC) about the size the default blocking gives.
            let mcp = (kern.mc_panels * kern.kc)
                .div_ceil(k)
                .clamp(2, kern.mc_panels);
            (k, mcp, kern.nc_panels)
        } else {
            (kern.kc, kern.mc_panels, kern.nc_panels)
        }
    });
    Blocking {
        kc,
        mc: mcp * kern.mr,
        nc: ncp * kern.nr,
    }
}

/// Outputs of at least this many bytes, written once, use streaming stores
/// (`SHEARS_GEMM_NT_MIN` overrides it, for tuning).
fn nt_min_bytes() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("SHEARS_GEMM_NT_MIN")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(4 << 20)
    })
}

/// Whether a GEMM writes C with streaming stores: C is written once (one `KC` block, nothing
/// to accumulate), is large, and its rows start on 64-byte boundaries.
fn streams(m: usize, n: usize, kblocks: usize, c: *mut f32, ldc: isize, accumulate: bool) -> bool {
    !accumulate
        && kblocks == 1
        && m * n * 4 >= nt_min_bytes()
        && (c as usize).is_multiple_of(64)
        && (ldc * 4) % 64 == 0
}

/// One micro-kernel: `C[MR×NR] (row stride ldc) (+)= Ap · Bp` over `kc`.
type MicroKernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, bool);

struct Kernel {
    mr: usize,
    nr: usize,
    kc: usize,
    /// `MC / mr`.
    mc_panels: usize,
    /// `NC / nr`.
    nc_panels: usize,
    run: MicroKernel,
    /// The same kernel writing C with non-temporal stores where it does not accumulate.
    run_nt: MicroKernel,
}

fn kernel(isa: Isa) -> Kernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Kernel {
            mr: 12,
            nr: 32,
            kc: 256,
            mc_panels: 12,
            nc_panels: 16,
            run: x86::kernel_12x32,
            run_nt: x86::kernel_12x32_nt,
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Kernel {
            mr: 6,
            nr: 16,
            kc: 256,
            mc_panels: 24,
            nc_panels: 32,
            run: x86::kernel_6x16,
            run_nt: x86::kernel_6x16,
        },
        _ => unreachable!("sgemm is only called with a vector ISA"),
    }
}

thread_local! {
    static APACK: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    static BPACK: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Run `f` on this thread's reusable pack buffer, grown to `len`. The buffer is taken out of
/// its slot while in use, so a re-entrant call (rayon runs other jobs while a thread waits)
/// gets a fresh one instead of a borrow panic.
fn with_buffer<R>(
    slot: &'static std::thread::LocalKey<std::cell::Cell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = slot.with(|s| s.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    slot.with(|s| s.set(buf));
    r
}

/// The task grid of one GEMM: column chunks first (B is then packed once), row groups only when
/// the columns alone cannot feed every thread twice. Panels are spread evenly (chunks differ by
/// at most one panel) over a multiple of the thread count, so every thread gets the same share:
/// 18 panels as 5 + 5 + 5 + 3 left one of two threads idle for a sixth of the time.
struct Grid {
    /// Column chunks.
    ncols: usize,
    /// Row groups.
    nrows: usize,
    /// The most `nr`-wide panels a column chunk holds.
    chunk_panels: usize,
}

impl Grid {
    fn new(mpanels: usize, npanels: usize, max_chunk: usize, threads: usize) -> Self {
        let want = if threads > 1 { 2 * threads } else { 1 };
        let mut ncols = npanels.div_ceil(max_chunk).max(want.min(npanels));
        if threads > 1 && ncols > threads {
            ncols = ncols.next_multiple_of(threads).min(npanels);
        }
        Grid {
            ncols,
            nrows: want.div_ceil(ncols).min(mpanels),
            chunk_panels: npanels.div_ceil(ncols),
        }
    }
}

/// The driver. A is packed once, whole (every `KC` block of every `mr` panel, in parallel);
/// the work is then a grid of tasks, each a column chunk of C (a multiple of `nr`, at most
/// `NC` wide) times a group of row panels, enough tasks for every thread with a balanced
/// number of micro-tiles each. A task walks the `KC` blocks, packs its own `KC × chunk` piece
/// of B (L2-resident) and sweeps its rows `MC` at a time (the packed A block in L2, one B
/// micro-panel in L1).
///
/// # Safety
/// As [`gemm`] (valid elements, C aliasing neither input), with C's columns contiguous (row
/// stride `ldc`), and `isa` a vector ISA this CPU has (from [`Isa::detect`]).
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat<f32>,
    b: Mat<f32>,
    c: *mut f32,
    ldc: isize,
    accumulate: bool,
    parallel: bool,
) {
    // SAFETY: this function's contract. Packing reads A and B only at the elements `m`, `n`, `k`
    // and the strides address; every micro-kernel call writes a tile inside C (`macro_block` clips
    // the edges into a local tile); the packed buffers are sized `kblocks · mpanels · mr · KC` and
    // `chunk_panels · nr · KC` for the panels they hold. Tasks write disjoint column chunks and row
    // groups of C, so the shared `SharedMut` pointer is never written twice at one element.
    unsafe {
        let kern = kernel(isa);
        let blk = blocking(&kern, k);
        let (mr, nr, kc_max) = (kern.mr, kern.nr, blk.kc);
        let threads = if parallel && m * n * k >= 1 << 17 {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let mpanels = m.div_ceil(mr);
        let npanels = n.div_ceil(nr);
        let kblocks = k.div_ceil(kc_max);
        let Grid {
            ncols,
            nrows,
            chunk_panels,
        } = Grid::new(mpanels, npanels, blk.nc / nr, threads);
        // First panel of column chunk `c` / row group `g` (`c = ncols`, `g = nrows`: the end).
        let col = |c: usize| c * npanels / ncols;
        let row = |g: usize| g * mpanels / nrows;

        // Regular stores would first read every line of C (write-allocate) and then evict it.
        let stream = streams(m, n, kblocks, c, ldc, accumulate);
        // Packed A: block `pb` of panel `ip` at `(pb·mpanels + ip)·mr·KC`.
        let kstride = mpanels * mr * kc_max;
        with_buffer(&APACK, kblocks * kstride, |apack| {
            let pack_job = |(job, dst): (usize, &mut [f32])| {
                let (pb, ip) = (job / mpanels, job % mpanels);
                let p0 = pb * kc_max;
                let kc = kc_max.min(k - p0);
                let i0 = ip * mr;
                pack(
                    a.t(),
                    p0,
                    kc,
                    i0,
                    mr.min(m - i0),
                    mr,
                    alpha,
                    &mut dst[..mr * kc],
                );
            };
            // Chunks of `mr · KC` floats: job `pb·mpanels + ip` (a short last block only uses the
            // front of its chunks).
            if threads > 1 && m * k >= 1 << 15 {
                apack
                    .par_chunks_mut(mr * kc_max)
                    .enumerate()
                    .for_each(pack_job);
            } else {
                apack.chunks_mut(mr * kc_max).enumerate().for_each(pack_job);
            }
            let apack: &[f32] = apack;
            let out = SharedMut(c);
            let task = |t: usize| {
                let out = out;
                let (rg, cg) = (t / ncols, t % ncols);
                let j0 = col(cg) * nr;
                let ncur = ((col(cg + 1) - col(cg)) * nr).min(n - j0);
                let (r0, r1) = (row(rg), row(rg + 1));
                with_buffer(&BPACK, chunk_panels * nr * kc_max, |bpack| {
                    for pb in 0..kblocks {
                        let p0 = pb * kc_max;
                        let kc = kc_max.min(k - p0);
                        pack(b, p0, kc, j0, ncur, nr, 1.0, bpack);
                        let ablock = &apack[pb * kstride..];
                        for ib in (r0..r1).step_by(blk.mc / mr) {
                            let ie = (ib + blk.mc / mr).min(r1);
                            let i0 = ib * mr;
                            let mc = (ie * mr).min(m) - i0;
                            macro_block(
                                &kern,
                                mc,
                                ncur,
                                kc,
                                &ablock[ib * mr * kc_max..],
                                mr * kc_max,
                                bpack,
                                out.0.offset(i0 as isize * ldc + j0 as isize),
                                ldc,
                                accumulate || pb > 0,
                                stream,
                            );
                        }
                    }
                });
                if stream {
                    // Streaming stores are weakly ordered: make them visible before the task ends.
                    #[cfg(target_arch = "x86_64")]
                    std::arch::x86_64::_mm_sfence();
                }
            };
            let tasks = nrows * ncols;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        });
    }
}

/// Every micro-tile of a packed `mc × kc` A block times a packed `kc × n` B block into C.
///
/// # Safety
/// `c` must be valid for `mc` rows of `n` floats with row stride `ldc`, `apack` and `bpack`
/// must hold the packed A and B panels of that block (as `pack` lays them out), and the
/// kernel's ISA must be present.
#[allow(clippy::too_many_arguments)]
unsafe fn macro_block(
    kern: &Kernel,
    mc: usize,
    n: usize,
    kc: usize,
    apack: &[f32],
    a_panel_stride: usize,
    bpack: &[f32],
    c: *mut f32,
    ldc: isize,
    acc: bool,
    stream: bool,
) {
    // SAFETY: this function's contract: `apack` and `bpack` hold the packed panels of an `mc × kc`
    // and a `kc × n` block (pointer offsets stay inside the slices), and C is valid for `mc` rows
    // of `n` floats with row stride `ldc`; full tiles go to the kernel in place, edge tiles through
    // a local 12 × 32 buffer, so nothing outside the `mc × n` block is touched.
    unsafe {
        let (mr, nr) = (kern.mr, kern.nr);
        let run = if stream { kern.run_nt } else { kern.run };
        let mut tile = [0f32; 12 * 32];
        for (jp, j0) in (0..n).step_by(nr).enumerate() {
            let nrr = nr.min(n - j0);
            let bp = bpack.as_ptr().add(jp * nr * kc);
            for (ip, ii) in (0..mc).step_by(mr).enumerate() {
                let mrr = mr.min(mc - ii);
                let ap = apack.as_ptr().add(ip * a_panel_stride);
                let cp = c.offset(ii as isize * ldc + j0 as isize);
                if mrr == mr && nrr == nr {
                    run(kc, ap, bp, cp, ldc as usize, acc);
                } else {
                    (kern.run)(kc, ap, bp, tile.as_mut_ptr(), nr, false);
                    for i in 0..mrr {
                        for j in 0..nrr {
                            let d = cp.offset(i as isize * ldc + j as isize);
                            let v = tile[i * nr + j];
                            *d = if acc { *d + v } else { v };
                        }
                    }
                }
            }
        }
    }
}

/// Pack `alpha ·` rows `p0..p0+kc`, columns `c0..c0+n` of `x` into `width`-wide panels
/// `[panel][kk][width]`, zero-padded: B as it is (`width = nr`), A through its transpose
/// (`width = mr`, so a panel holds `mr` rows of A side by side).
///
/// # Safety
/// Rows `p0..p0 + kc` and columns `c0..c0 + n` of `x` must be valid elements, and on x86_64
/// AVX must be present (the transposing copy uses it).
#[allow(clippy::too_many_arguments)]
unsafe fn pack(
    x: Mat<f32>,
    p0: usize,
    kc: usize,
    c0: usize,
    n: usize,
    width: usize,
    alpha: f32,
    dst: &mut [f32],
) {
    // SAFETY: this function's contract: the rows `p0..p0 + kc` and columns `c0..c0 + n` of `x` are
    // valid elements, and only those are read (`w` clips the last panel); `dst` is indexed as a
    // slice.
    unsafe {
        for (jp, jj) in (0..n).step_by(width).enumerate() {
            let j0 = c0 + jj;
            let w = width.min(n - jj);
            let panel = &mut dst[jp * width * kc..(jp + 1) * width * kc];
            if x.cs == 1 {
                for kk in 0..kc {
                    let src = x.at(p0 + kk, j0);
                    let row = &mut panel[kk * width..(kk + 1) * width];
                    if alpha == 1.0 {
                        std::ptr::copy_nonoverlapping(src, row.as_mut_ptr(), w);
                    } else {
                        for (j, r) in row[..w].iter_mut().enumerate() {
                            *r = alpha * *src.add(j);
                        }
                    }
                    row[w..].fill(0.0);
                }
            } else if x.rs == 1 {
                // Columns are contiguous along k: a transposing copy.
                pack_lines(x.at(p0, j0), x.cs, w, kc, width, alpha, panel);
            } else {
                for kk in 0..kc {
                    for j in 0..width {
                        panel[kk * width + j] = if j < w {
                            alpha * *x.at(p0 + kk, j0 + j)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// The transposing half of packing: `h` lines (`src + i·stride`, each contiguous along k)
/// become the columns of a `[kc][width]` panel, scaled by `alpha`, columns `h..width` zero.
/// 8 × 8 (and 4 × 8) register transposes where the shape allows, scalar at the edges.
///
/// # Safety
/// Each of the `h` lines `src + i·stride` must be valid for `kc` floats, `h ≤ width`, `panel`
/// must hold `kc · width` floats, and on x86_64 AVX must be present.
unsafe fn pack_lines(
    src: *const f32,
    stride: isize,
    h: usize,
    kc: usize,
    width: usize,
    alpha: f32,
    panel: &mut [f32],
) {
    // SAFETY: this function's contract: each of the `h` lines `src + i·stride` is valid for `kc`
    // floats; the 8 × 8 and 4 × 8 transposes read 8 floats of 8 (or 4) of those lines and write 8
    // rows of 8 (or 4) floats inside `panel` (`k0 + 8 ≤ kc`, `i + 8 ≤ h ≤ width`), and AVX is
    // present.
    unsafe {
        let line = |i: usize| src.offset(i as isize * stride);
        // Scalar copy of k-steps `ks`, lines `from..h`, and the zero padding.
        let scalar = |panel: &mut [f32], ks: std::ops::Range<usize>, from: usize| {
            for t in ks {
                for r in from..h {
                    panel[t * width + r] = alpha * *line(r).add(t);
                }
                panel[t * width + h..(t + 1) * width].fill(0.0);
            }
        };
        let mut k0 = 0;
        #[cfg(target_arch = "x86_64")]
        while k0 + 8 <= kc {
            let mut i = 0;
            let base = panel.as_mut_ptr().add(k0 * width);
            let block = |i: usize| (line(i).add(k0), base.add(i));
            while i + 8 <= h {
                let (s, d) = block(i);
                x86::transpose_8x8(s, stride, d, width, alpha);
                i += 8;
            }
            if i + 4 <= h {
                let (s, d) = block(i);
                x86::transpose_4x8(s, stride, d, width, alpha);
                i += 4;
            }
            scalar(panel, k0..k0 + 8, i);
            k0 += 8;
        }
        scalar(panel, k0..kc, 0);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `dst[c·ld + r] = alpha · src[r·stride + c]` for an 8 × 8 block (rows `r` of the
    /// source are contiguous). Only called under `Isa::Avx2`/`Isa::Avx512`, so AVX is there.
    ///
    /// # Safety
    /// `src + r·stride` must be readable for 8 floats for `r` in `0..8`, `dst + c·ld` writable for
    /// 8 floats for `c` in `0..8`, and the CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub unsafe fn transpose_8x8(
        src: *const f32,
        stride: isize,
        dst: *mut f32,
        ld: usize,
        alpha: f32,
    ) {
        // SAFETY: this function's contract: the 8 source rows `src + r·stride` hold 8 floats each
        // and the 8 destination rows `dst + c·ld` have room for 8; AVX is enabled on this function.
        unsafe {
            let r = |i: isize| _mm256_loadu_ps(src.offset(i * stride));
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            let (r4, r5, r6, r7) = (r(4), r(5), r(6), r(7));
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            let t4 = _mm256_unpacklo_ps(r4, r5);
            let t5 = _mm256_unpackhi_ps(r4, r5);
            let t6 = _mm256_unpacklo_ps(r6, r7);
            let t7 = _mm256_unpackhi_ps(r6, r7);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let a = _mm256_set1_ps(alpha);
            let w = |c: usize, x: __m256| _mm256_storeu_ps(dst.add(c * ld), _mm256_mul_ps(a, x));
            w(0, _mm256_permute2f128_ps::<0x20>(s0, s4));
            w(1, _mm256_permute2f128_ps::<0x20>(s1, s5));
            w(2, _mm256_permute2f128_ps::<0x20>(s2, s6));
            w(3, _mm256_permute2f128_ps::<0x20>(s3, s7));
            w(4, _mm256_permute2f128_ps::<0x31>(s0, s4));
            w(5, _mm256_permute2f128_ps::<0x31>(s1, s5));
            w(6, _mm256_permute2f128_ps::<0x31>(s2, s6));
            w(7, _mm256_permute2f128_ps::<0x31>(s3, s7));
        }
    }

    /// As [`transpose_8x8`] for 4 source rows of 8: eight output rows of 4.
    ///
    /// # Safety
    /// `src + r·stride` must be readable for 8 floats for `r` in `0..4`, `dst + c·ld` writable for
    /// 4 floats for `c` in `0..8`, and the CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub unsafe fn transpose_4x8(
        src: *const f32,
        stride: isize,
        dst: *mut f32,
        ld: usize,
        alpha: f32,
    ) {
        // SAFETY: this function's contract: the 4 source rows hold 8 floats each and the 8
        // destination rows have room for 4; AVX is enabled on this function.
        unsafe {
            let r = |i: isize| _mm256_loadu_ps(src.offset(i * stride));
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            let a = _mm256_set1_ps(alpha);
            let s0 = _mm256_mul_ps(a, _mm256_shuffle_ps::<0x44>(t0, t2));
            let s1 = _mm256_mul_ps(a, _mm256_shuffle_ps::<0xEE>(t0, t2));
            let s2 = _mm256_mul_ps(a, _mm256_shuffle_ps::<0x44>(t1, t3));
            let s3 = _mm256_mul_ps(a, _mm256_shuffle_ps::<0xEE>(t1, t3));
            let w = |c: usize, x: __m128| _mm_storeu_ps(dst.add(c * ld), x);
            w(0, _mm256_castps256_ps128(s0));
            w(1, _mm256_castps256_ps128(s1));
            w(2, _mm256_castps256_ps128(s2));
            w(3, _mm256_castps256_ps128(s3));
            w(4, _mm256_extractf128_ps::<1>(s0));
            w(5, _mm256_extractf128_ps::<1>(s1));
            w(6, _mm256_extractf128_ps::<1>(s2));
            w(7, _mm256_extractf128_ps::<1>(s3));
        }
    }

    /// Software prefetch distances of the 12 × 32 kernel, in floats: 16 k-steps of A and 8 of
    /// B ahead. With K = 576 as one block the B micro-panel (74 KB) is larger than L1; measured
    /// on Sapphire Rapids (one thread, median of 3 interleaved runs against no prefetch):
    /// 1024x576x1536 133-137 -> 138-144 GFLOP/s, 1024x1536x576 124-130 -> 126-136,
    /// 1024x576x576 138-143 -> 145-149; K = 256 shapes unchanged.
    const PF_A: usize = 12 * 16;
    const PF_B: usize = 32 * 8;

    /// 12 × 32 tile: two zmm of B and 12 broadcasts of A per k step, 24 accumulators (with
    /// the two B vectors and a broadcast, 27 of the 32 zmm registers: no spills).
    ///
    /// # Safety
    /// `a` must hold `12 · kc` packed floats, `b` `32 · kc`, `c` must be valid for 12 rows of 32
    /// floats with row stride `ldc`, and the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_12x32(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: this function's contract, which is `kernel_12x32_impl`'s; AVX-512F is enabled
        // here.
        unsafe { kernel_12x32_impl::<false>(kc, a, b, c, ldc, accumulate) }
    }

    /// As [`kernel_12x32`], writing C with streaming stores where it does not accumulate (rows
    /// that start on a 64-byte boundary).
    ///
    /// # Safety
    /// As [`kernel_12x32`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_12x32_nt(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: as `kernel_12x32`: this function's contract is `kernel_12x32_impl`'s.
        unsafe { kernel_12x32_impl::<true>(kc, a, b, c, ldc, accumulate) }
    }

    ///
    /// # Safety
    /// As [`kernel_12x32`]; only called (inlined) from the AVX-512F kernels.
    #[inline(always)]
    unsafe fn kernel_12x32_impl<const NT: bool>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: this function's contract: the loads read `12 · kc` floats of `a` and `32 · kc` of
        // `b` (the prefetches may point past them but never fault), the stores write 12 rows of 32
        // floats of C; it is inlined into the AVX-512F kernels above.
        unsafe {
            // Named accumulators (not an array) so they stay in registers.
            let mut c0a = _mm512_setzero_ps();
            let mut c0b = _mm512_setzero_ps();
            let mut c1a = _mm512_setzero_ps();
            let mut c1b = _mm512_setzero_ps();
            let mut c2a = _mm512_setzero_ps();
            let mut c2b = _mm512_setzero_ps();
            let mut c3a = _mm512_setzero_ps();
            let mut c3b = _mm512_setzero_ps();
            let mut c4a = _mm512_setzero_ps();
            let mut c4b = _mm512_setzero_ps();
            let mut c5a = _mm512_setzero_ps();
            let mut c5b = _mm512_setzero_ps();
            let mut c6a = _mm512_setzero_ps();
            let mut c6b = _mm512_setzero_ps();
            let mut c7a = _mm512_setzero_ps();
            let mut c7b = _mm512_setzero_ps();
            let mut c8a = _mm512_setzero_ps();
            let mut c8b = _mm512_setzero_ps();
            let mut c9a = _mm512_setzero_ps();
            let mut c9b = _mm512_setzero_ps();
            let mut c10a = _mm512_setzero_ps();
            let mut c10b = _mm512_setzero_ps();
            let mut c11a = _mm512_setzero_ps();
            let mut c11b = _mm512_setzero_ps();
            let (mut ap, mut bp) = (a, b);
            for _ in 0..kc {
                _mm_prefetch::<_MM_HINT_T0>(ap.add(PF_A) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bp.add(PF_B) as *const i8);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                let ai = _mm512_set1_ps(*ap.add(0));
                c0a = _mm512_fmadd_ps(ai, b0, c0a);
                c0b = _mm512_fmadd_ps(ai, b1, c0b);
                let ai = _mm512_set1_ps(*ap.add(1));
                c1a = _mm512_fmadd_ps(ai, b0, c1a);
                c1b = _mm512_fmadd_ps(ai, b1, c1b);
                let ai = _mm512_set1_ps(*ap.add(2));
                c2a = _mm512_fmadd_ps(ai, b0, c2a);
                c2b = _mm512_fmadd_ps(ai, b1, c2b);
                let ai = _mm512_set1_ps(*ap.add(3));
                c3a = _mm512_fmadd_ps(ai, b0, c3a);
                c3b = _mm512_fmadd_ps(ai, b1, c3b);
                let ai = _mm512_set1_ps(*ap.add(4));
                c4a = _mm512_fmadd_ps(ai, b0, c4a);
                c4b = _mm512_fmadd_ps(ai, b1, c4b);
                let ai = _mm512_set1_ps(*ap.add(5));
                c5a = _mm512_fmadd_ps(ai, b0, c5a);
                c5b = _mm512_fmadd_ps(ai, b1, c5b);
                let ai = _mm512_set1_ps(*ap.add(6));
                c6a = _mm512_fmadd_ps(ai, b0, c6a);
                c6b = _mm512_fmadd_ps(ai, b1, c6b);
                let ai = _mm512_set1_ps(*ap.add(7));
                c7a = _mm512_fmadd_ps(ai, b0, c7a);
                c7b = _mm512_fmadd_ps(ai, b1, c7b);
                let ai = _mm512_set1_ps(*ap.add(8));
                c8a = _mm512_fmadd_ps(ai, b0, c8a);
                c8b = _mm512_fmadd_ps(ai, b1, c8b);
                let ai = _mm512_set1_ps(*ap.add(9));
                c9a = _mm512_fmadd_ps(ai, b0, c9a);
                c9b = _mm512_fmadd_ps(ai, b1, c9b);
                let ai = _mm512_set1_ps(*ap.add(10));
                c10a = _mm512_fmadd_ps(ai, b0, c10a);
                c10b = _mm512_fmadd_ps(ai, b1, c10b);
                let ai = _mm512_set1_ps(*ap.add(11));
                c11a = _mm512_fmadd_ps(ai, b0, c11a);
                c11b = _mm512_fmadd_ps(ai, b1, c11b);
                ap = ap.add(12);
                bp = bp.add(32);
            }
            /// # Safety
            /// `p` must be valid for 32 floats and the CPU must have AVX-512F.
            #[inline(always)]
            unsafe fn store<const NT: bool>(p: *mut f32, x0: __m512, x1: __m512, accumulate: bool) {
                // SAFETY: `p` is valid for 32 floats (a row of the caller's C tile); AVX-512F is
                // enabled in the kernel this is inlined into.
                unsafe {
                    let (mut x0, mut x1) = (x0, x1);
                    if accumulate {
                        x0 = _mm512_add_ps(_mm512_loadu_ps(p), x0);
                        x1 = _mm512_add_ps(_mm512_loadu_ps(p.add(16)), x1);
                    }
                    if NT && !accumulate && (p as usize).is_multiple_of(64) {
                        _mm512_stream_ps(p, x0);
                        _mm512_stream_ps(p.add(16), x1);
                    } else {
                        _mm512_storeu_ps(p, x0);
                        _mm512_storeu_ps(p.add(16), x1);
                    }
                }
            }
            store::<NT>(c.add(0 * ldc), c0a, c0b, accumulate);
            store::<NT>(c.add(1 * ldc), c1a, c1b, accumulate);
            store::<NT>(c.add(2 * ldc), c2a, c2b, accumulate);
            store::<NT>(c.add(3 * ldc), c3a, c3b, accumulate);
            store::<NT>(c.add(4 * ldc), c4a, c4b, accumulate);
            store::<NT>(c.add(5 * ldc), c5a, c5b, accumulate);
            store::<NT>(c.add(6 * ldc), c6a, c6b, accumulate);
            store::<NT>(c.add(7 * ldc), c7a, c7b, accumulate);
            store::<NT>(c.add(8 * ldc), c8a, c8b, accumulate);
            store::<NT>(c.add(9 * ldc), c9a, c9b, accumulate);
            store::<NT>(c.add(10 * ldc), c10a, c10b, accumulate);
            store::<NT>(c.add(11 * ldc), c11a, c11b, accumulate);
        }
    }

    /// 6 × 16 tile: two ymm of B and 6 broadcasts of A per k step, 12 accumulators.
    ///
    /// # Safety
    /// `a` must hold `6 · kc` packed floats, `b` `16 · kc`, `c` must be valid for 6 rows of 16
    /// floats with row stride `ldc`, and the CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_6x16(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: this function's contract: the loads read `6 · kc` floats of `a` and `16 · kc` of
        // `b`, the stores write 6 rows of 16 floats of C; AVX2 and FMA are enabled here.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 12];
            let (mut ap, mut bp) = (a, b);
            for _ in 0..kc {
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                macro_rules! row {
                ($($i:expr),*) => {$(
                    let ai = _mm256_set1_ps(*ap.add($i));
                    acc[2 * $i] = _mm256_fmadd_ps(ai, b0, acc[2 * $i]);
                    acc[2 * $i + 1] = _mm256_fmadd_ps(ai, b1, acc[2 * $i + 1]);
                )*};
            }
                row!(0, 1, 2, 3, 4, 5);
                ap = ap.add(6);
                bp = bp.add(16);
            }
            for i in 0..6 {
                let p = c.add(i * ldc);
                let (mut x0, mut x1) = (acc[2 * i], acc[2 * i + 1]);
                if accumulate {
                    x0 = _mm256_add_ps(_mm256_loadu_ps(p), x0);
                    x1 = _mm256_add_ps(_mm256_loadu_ps(p.add(8)), x1);
                }
                _mm256_storeu_ps(p, x0);
                _mm256_storeu_ps(p.add(8), x1);
            }
        }
    }
}

/// Run `f` with the f32 GEMM forced onto one ISA's kernel (tests of every compiled kernel).
///
/// # Safety
/// As `sgemm`.
#[cfg(test)]
pub(crate) unsafe fn sgemm_with(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat<f32>,
    b: Mat<f32>,
    c: *mut f32,
    ldc: isize,
    accumulate: bool,
    parallel: bool,
) {
    // SAFETY: this function's contract is `sgemm`'s.
    unsafe { sgemm(isa, m, n, k, alpha, a, b, c, ldc, accumulate, parallel) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        ars: usize,
        acs: usize,
        b: &[f32],
        brs: usize,
        bcs: usize,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64)
                    .sum();
            }
        }
        c
    }

    /// The task grid depends on the thread count, the sums do not: every C element comes from
    /// one task with the same `KC` blocks and micro-tile, so any pool size gives the same bits
    /// (column counts that split evenly, that do not, and too few panels for the columns alone).
    #[test]
    fn every_thread_count_gives_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(7);
        let isa = Isa::detect();
        if isa == Isa::Baseline {
            return;
        }
        for &(m, n, k) in &[
            (120, 576, 70),
            (100, 288, 300),
            (130, 96, 90),
            (40, 1600, 33),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let want = naive(m, n, k, &a, k, 1, &b, n, 1);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = vec![0f32; m * n];
                // SAFETY: A is m × k and B k × n row-major vectors, C an m × n vector apart from
                // both; the ISA came from `Isa::detect`.
                pool.install(|| unsafe {
                    sgemm_with(
                        isa,
                        m,
                        n,
                        k,
                        1.0,
                        Mat::rows(a.as_ptr(), k),
                        Mat::rows(b.as_ptr(), n),
                        c.as_mut_ptr(),
                        n as isize,
                        false,
                        true,
                    )
                });
                c
            };
            let one = run(1);
            for (x, w) in one.iter().zip(&want) {
                assert!(
                    (*x as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{m}x{n}x{k}"
                );
            }
            for threads in 2..=5 {
                let c = run(threads);
                let same = c.iter().zip(&one).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{m}x{n}x{k} on {threads} threads differs from 1 thread"
                );
            }
        }
    }

    /// Outputs large enough for streaming stores (full and partial tiles, one thread and
    /// two), and the same output one float off the 64-byte boundary (regular stores).
    #[test]
    fn streaming_stores_match_naive() {
        if Isa::detect() == Isa::Baseline {
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        let (m, n, k) = (1030, 1056, 40);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let want = naive(m, n, k, &a, k, 1, &b, n, 1);
        let mut buf = vec![f32::NAN; m * n + 32];
        let base = buf.as_ptr().align_offset(64);
        for (skew, par) in [(0, false), (0, true), (1, true)] {
            buf.fill(f32::NAN);
            // SAFETY: `buf` holds `m · n + 32` floats, and `base + skew` is below 32 (the
            // alignment offset is under 16 floats).
            let c = unsafe { buf.as_mut_ptr().add(base + skew) };
            assert_eq!(streams(m, n, 1, c, n as isize, false), skew == 0);
            // SAFETY: C is the `m × n` floats from `c` inside `buf`, apart from A and B.
            unsafe {
                sgemm_with(
                    Isa::detect(),
                    m,
                    n,
                    k,
                    1.0,
                    Mat::rows(a.as_ptr(), k),
                    Mat::rows(b.as_ptr(), n),
                    c,
                    n as isize,
                    false,
                    par,
                )
            };
            let got = &buf[base + skew..base + skew + m * n];
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "skew {skew} par {par} at {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn every_kernel_layout_and_edge_matches_naive() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut isas = vec![];
        if Isa::detect() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        if Isa::detect() != Isa::Baseline {
            isas.push(Isa::Avx2);
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 31, 7),
            (14, 32, 256),
            (15, 33, 257),
            (141, 530, 300),
            (3, 1100, 64),
            (600, 5, 40),
            (30, 2100, 70),
            (5, 40, 600),
            (200, 70, 520),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
            for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
                let (ars, acs) = if at { (1, m) } else { (k, 1) };
                let (brs, bcs) = if bt { (1, k) } else { (n, 1) };
                let want = naive(m, n, k, &a, ars, acs, &b, brs, bcs);
                let am = Mat {
                    ptr: a.as_ptr(),
                    rs: ars as isize,
                    cs: acs as isize,
                };
                let bm = Mat {
                    ptr: b.as_ptr(),
                    rs: brs as isize,
                    cs: bcs as isize,
                };
                for &isa in &isas {
                    for (acc, par) in [(false, false), (true, true)] {
                        let mut c: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
                        let before = c.clone();
                        // SAFETY: the test's buffers hold the shapes passed (A, B and C sized
                        // above, C apart from both), and only kernels of ISAs this CPU has (checked
                        // above) run.
                        unsafe {
                            sgemm_with(
                                isa,
                                m,
                                n,
                                k,
                                0.5,
                                am,
                                bm,
                                c.as_mut_ptr(),
                                n as isize,
                                acc,
                                par,
                            )
                        };
                        for i in 0..m * n {
                            let w = 0.5 * want[i] + if acc { before[i] as f64 } else { 0.0 };
                            assert!(
                                (c[i] as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                                "{isa:?} {m}x{n}x{k} at={at} bt={bt} acc={acc}: {} vs {w}",
                                c[i]
                            );
                        }
                    }
                }
                // The generic entry point, column-major C (transposed problem).
                let mut c = vec![0f32; m * n];
                // SAFETY: the test's buffers hold the shapes passed (A, B and C sized above, C
                // apart from both), and only kernels of ISAs this CPU has (checked above) run.
                unsafe {
                    gemm(
                        m,
                        n,
                        k,
                        1.0f32,
                        am,
                        bm,
                        c.as_mut_ptr(),
                        1,
                        m as isize,
                        false,
                        true,
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let w = want[i * n + j];
                        assert!((c[j * m + i] as f64 - w).abs() < 1e-4 * (1.0 + w.abs()));
                    }
                }
            }
        }
    }
}

/// Rates of the AVX-512 micro-kernel alone, where the data sits: the core's FMA peak, the kernel
/// with everything in L1, the macro-block sweep (C in L2, then moving through memory), and
/// C in a 64 MB area with regular and with streaming stores. A benchmark, not a check:
/// `cargo test --release -p shears-models --lib kbench -- --ignored --nocapture`.
#[cfg(all(test, target_arch = "x86_64"))]
mod kbench {
    use std::time::Instant;

    #[test]
    #[ignore]
    fn kernel_rates() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let kc = 256;
        let mpan = 12;
        let npan = 16;
        let a: Vec<f32> = (0..mpan * 12 * kc).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..npan * 32 * kc).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; 2048 * 512];
        let flops = |calls: usize| (calls * 12 * 32 * kc * 2) as f64;
        #[target_feature(enable = "avx512f")]
        unsafe fn peak(n: usize) -> f32 {
            use std::arch::x86_64::*;
            let mut acc = [_mm512_set1_ps(0.0); 24];
            let x = _mm512_set1_ps(1.000_001);
            let y = _mm512_set1_ps(0.999_999);
            for _ in 0..n {
                for a in acc.iter_mut() {
                    *a = _mm512_fmadd_ps(*a, x, y);
                }
            }
            let mut s = _mm512_setzero_ps();
            for a in acc {
                s = _mm512_add_ps(s, a);
            }
            _mm512_reduce_add_ps(s)
        }
        let t = Instant::now();
        let n = 20_000_000;
        // SAFETY: the test's buffers hold the shapes passed (A, B and C sized above, C apart
        // from both), and only kernels of ISAs this CPU has (checked above) run.
        let r = unsafe { peak(n) };
        println!(
            "FMA peak: {:.1} GFLOP/s ({r})",
            (n * 24 * 32) as f64 / t.elapsed().as_secs_f64() / 1e9
        );
        // 1: the same A and B panels each call, C the same tile (all L1).
        for _ in 0..2 {
            let t = Instant::now();
            let calls = 200_000;
            for _ in 0..calls {
                // SAFETY: the test's buffers hold the shapes passed (A, B and C sized above, C
                // apart from both), and only kernels of ISAs this CPU has (checked above) run.
                unsafe {
                    super::x86::kernel_12x32(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), 32, false)
                };
            }
            println!(
                "L1 only: {:.1} GFLOP/s",
                flops(calls) / t.elapsed().as_secs_f64() / 1e9
            );
            // 2: the macro-block sweep (B micro-panels outer, A panels inner, as `macro_block`
            // runs them) over 144 x 512 blocks of C starting at the given (row, column).
            let sweep =
                |kern: super::MicroKernel, c: *mut f32, ldc: usize, blocks: &[(usize, usize)]| {
                    let t = Instant::now();
                    for &(r0, c0) in blocks {
                        for jp in 0..npan {
                            for ip in 0..mpan {
                                // SAFETY: the test's buffers hold the shapes passed (A, B and C
                                // sized above, C apart from both), and only kernels of ISAs this
                                // CPU has (checked above) run.
                                unsafe {
                                    kern(
                                        kc,
                                        a.as_ptr().add(ip * 12 * kc),
                                        b.as_ptr().add(jp * 32 * kc),
                                        c.add((r0 + ip * 12) * ldc + c0 + jp * 32),
                                        ldc,
                                        false,
                                    )
                                };
                            }
                        }
                    }
                    flops(blocks.len() * npan * mpan) / t.elapsed().as_secs_f64() / 1e9
                };
            let l2 = sweep(
                super::x86::kernel_12x32,
                c.as_mut_ptr(),
                512,
                &[(0, 0); 1000],
            );
            println!("sweep, C in L2: {l2:.1} GFLOP/s");
            // 3: the same, the block moving through a 2048-row, 4 MB C.
            let moving: Vec<_> = (0..100).map(|r| ((r * 144) % (2048 - 144), 0)).collect();
            let rate = sweep(super::x86::kernel_12x32, c.as_mut_ptr(), 512, &moving);
            println!("sweep, C streamed: {rate:.1} GFLOP/s");
            // 4: every block of a 2048 x 8192 C (64 MB, 64-byte aligned), both store kinds.
            let whole: Vec<_> = (0..2048 / 144)
                .flat_map(|ib| (0..16).map(move |jc| (ib * 144, jc * 512)))
                .collect();
            for (name, kern) in [
                ("storeu", super::x86::kernel_12x32 as super::MicroKernel),
                ("stream", super::x86::kernel_12x32_nt),
            ] {
                let mut big = vec![1f32; 2048 * 8192 + 16];
                let off = big.as_ptr().align_offset(64);
                let rate = sweep(kern, big[off..].as_mut_ptr(), 8192, &whole);
                println!("64 MB C, {name}: {rate:.1} GFLOP/s");
            }
        }
    }
}
