//! Each fused kernel of `shears_models::ops` against its generic composition of burn ops, on
//! flex (the backend with native kernels): outputs and gradients (through `Autodiff<Flex>`'s
//! backward nodes) on random shapes — odd lengths, lengths up to 601, batch > 1, GQA ratios 1,
//! 3 and 9, head widths 8, 32 and 64, a cached past — in f32, and in f64 where the kernel has
//! an f64 copy. Inputs a kernel does not take fall back to the generic op.
#![cfg(feature = "flex")]

use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use shears_models::ops;
use shears_models::ShearsOps;
use shears_tests::rel_l2;

type B = Flex;
type AD = Autodiff<Flex>;

fn vals<Bk: burn::tensor::backend::Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap()
}

fn rand<const D: usize>(shape: [usize; D], dtype: DType, seed: u64) -> Tensor<AD, D> {
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), seed);
    Tensor::<AD, D>::random(shape, Distribution::Uniform(-1.0, 1.0), &Default::default())
        .cast(dtype)
}

/// `‖got − want‖ ≤ tol · max(‖want‖, 1e-2 √n)`: relative, with a floor for values that are
/// exactly zero in theory (e.g. the query gradient of a single visible key).
fn close(what: &str, got: Vec<f32>, want: Vec<f32>, tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let num: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    let e = num / den.max(1e-2 * (want.len() as f64).sqrt());
    assert!(e <= tol, "{what}: relative L2 error {e:e} > {tol:e}");
}

/// A fresh leaf with `t`'s values, so the generic and fused graphs share no node (a backward
/// pass consumes its graph).
fn leaf<const D: usize>(t: &Tensor<AD, D>) -> Tensor<AD, D> {
    Tensor::<AD, D>::from_data(t.to_data(), &Default::default())
        .cast(t.dtype())
        .require_grad()
}

/// Fused attention (through `Autodiff<Flex>`'s node) against the generic composition:
/// outputs and the gradients of `Σ out ∘ w` with respect to q, k and v.
fn check_attention(b: usize, t: usize, past: usize, h: usize, g: usize, hd: usize, dtype: DType) {
    check_window_attention((b, t, past, h, g, hd), None, dtype)
}

/// [`check_attention`] with a sliding `window` (the generic path reads the window's mask).
fn check_window_attention(
    (b, t, past, h, g, hd): (usize, usize, usize, usize, usize, usize),
    window: Option<usize>,
    dtype: DType,
) {
    let s = past + t;
    let tag = format!("b{b} t{t} past{past} h{h} g{g} hd{hd} window{window:?} {dtype:?}");
    let seed = (b * 1000 + t * 10 + h + g + hd + past) as u64;
    let q = rand([b, t, h, hd], dtype, seed);
    let k = rand([b, s, g, hd], dtype, seed + 1);
    let v = rand([b, s, g, hd], dtype, seed + 2);
    let w = rand([b, t, h, hd], dtype, seed + 3);
    let (qg, kg, vg) = (leaf(&q), leaf(&k), leaf(&v));
    let (qf, kf, vf) = (leaf(&q), leaf(&k), leaf(&v));
    let mask = ops::causal_mask::<AD>(past, t, window, &Default::default());
    let generic = ops::causal_attention_generic(qg.clone(), kg.clone(), vg.clone(), Some(&mask));
    let fused = AD::fused_attention(
        qf.clone().into_primitive().tensor(),
        kf.clone().into_primitive().tensor(),
        vf.clone().into_primitive().tensor(),
        ops::AttnSpec {
            scale: 1.0 / (hd as f64).sqrt(),
            window,
        },
    )
    .map(|p| Tensor::<AD, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(p)))
    .expect("flex has an attention kernel for f32 and f64");
    let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
    close(
        &format!("attention out {tag}"),
        vals(fused.clone()),
        vals(generic.clone()),
        tol,
    );
    let gg = (generic * w.clone()).sum().backward();
    let gf = (fused * w).sum().backward();
    for (name, xf, xg) in [("dq", &qf, &qg), ("dk", &kf, &kg), ("dv", &vf, &vg)] {
        close(
            &format!("attention {name} {tag}"),
            vals(xf.grad(&gf).unwrap()),
            vals(xg.grad(&gg).unwrap()),
            tol,
        );
    }
}

/// Sliding windows (Mistral's, Gemma's local layers): shorter than a tile, across tile edges,
/// a cached past longer than the window, a decode step, with GQA; forward and gradients.
#[test]
fn sliding_window_attention_matches_generic() {
    for &(shape, w) in &[
        ((1, 40, 0, 4, 2, 16), 7),
        ((2, 150, 0, 6, 2, 32), 70),
        ((1, 130, 0, 4, 4, 64), 64),
        ((1, 9, 140, 9, 3, 32), 33),
        ((2, 1, 100, 3, 1, 32), 40),
        ((1, 30, 0, 2, 1, 8), 1),
    ] {
        check_window_attention(shape, Some(w), DType::F32);
    }
    check_window_attention((1, 70, 10, 4, 2, 16), Some(25), DType::F64);
}

#[test]
fn attention_matches_generic_in_f32() {
    for &(b, t, past, h, g, hd) in &[
        (1, 1, 0, 1, 1, 8),
        (2, 37, 0, 9, 3, 32),  // GQA 3, odd length
        (1, 601, 0, 9, 1, 8),  // GQA 9, long
        (3, 130, 0, 4, 4, 64), // MHA
        (2, 65, 0, 6, 2, 64),  // tile edge
        (1, 5, 123, 9, 3, 64), // a cached past (prefill after a prompt)
        (2, 1, 77, 3, 1, 32),  // one decode step
    ] {
        check_attention(b, t, past, h, g, hd, DType::F32);
    }
}

#[test]
fn attention_matches_generic_in_f64() {
    for &(b, t, past, h, g, hd) in &[(2, 45, 0, 6, 2, 8), (1, 70, 9, 3, 1, 32)] {
        check_attention(b, t, past, h, g, hd, DType::F64);
    }
}

fn check_lm_nll(n: usize, d: usize, v: usize, vocab_major: bool, dtype: DType) {
    let tag = format!("n{n} d{d} V{v} vocab_major={vocab_major} {dtype:?}");
    let h0 = rand([n, d], dtype, n as u64);
    let w0 = if vocab_major {
        rand([v, d], dtype, 7)
    } else {
        rand([d, v], dtype, 7)
    };
    let (h, w) = (leaf(&h0), leaf(&w0));
    let (hf, wf) = (leaf(&h0), leaf(&w0));
    let tg: Vec<i64> = (0..n).map(|i| ((i * 7919 + 3) % v) as i64).collect();
    let tg_b =
        Tensor::<B, 1, Int>::from_data(TensorData::new(tg.clone(), [n]), &Default::default());
    let tg = Tensor::<AD, 1, Int>::from_data(TensorData::new(tg, [n]), &Default::default());
    let coef = rand([n], dtype, 11);
    let generic = ops::lm_head_nll_generic(h.clone(), w.clone(), vocab_major, tg.clone());
    let fused = AD::fused_lm_nll(
        hf.clone().into_primitive().tensor(),
        wf.clone().into_primitive().tensor(),
        vocab_major,
        tg.into_primitive(),
    )
    .map(|p| Tensor::<AD, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(p)))
    .expect("flex has an LM-head kernel for f32 and f64");
    let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
    close(
        &format!("nll {tag}"),
        vals(fused.clone()),
        vals(generic.clone()),
        tol,
    );
    let gg = (generic * coef.clone()).sum().backward();
    let gf = (fused * coef.clone()).sum().backward();
    close(
        &format!("dh {tag}"),
        vals(hf.grad(&gf).unwrap()),
        vals(h.grad(&gg).unwrap()),
        tol,
    );
    close(
        &format!("dw {tag}"),
        vals(wf.grad(&gf).unwrap()),
        vals(w.grad(&gg).unwrap()),
        tol,
    );
    // Autodiff ran the backward from the logits its forward kept (every case here is under
    // ops::KEEP_LOGITS_ELEMS); the backward that recomputes them tile by tile (larger heads)
    // runs the same tiles in the same order, so it must give the same bits.
    let prim = |t: &Tensor<AD, 2>| t.clone().inner().into_primitive().tensor();
    let (_, lse) = B::lm_nll_kernel(
        prim(&h0),
        prim(&w0),
        vocab_major,
        tg_b.clone().into_primitive(),
    )
    .expect("flex has an LM-head kernel for f32 and f64");
    let (dh, dw) = B::lm_nll_kernel_backward(
        prim(&h0),
        prim(&w0),
        vocab_major,
        tg_b.into_primitive(),
        lse,
        coef.inner().into_primitive().tensor(),
    )
    .expect("and its backward");
    let t = |p| Tensor::<B, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(p));
    close(
        &format!("recomputed dh {tag}"),
        vals(t(dh)),
        vals(hf.grad(&gf).unwrap()),
        0.0,
    );
    close(
        &format!("recomputed dw {tag}"),
        vals(t(dw)),
        vals(wf.grad(&gf).unwrap()),
        0.0,
    );
}

#[test]
fn lm_head_nll_matches_generic() {
    for &(n, d, v, vm) in &[
        (1, 8, 5, true),
        (37, 24, 1100, true),
        (301, 16, 2049, false),
        (64, 64, 1024, false),
        // Over ops::NLL_CHUNK_ELEMS logits: the generic side scores two row chunks.
        (2100, 8, 8200, true),
    ] {
        check_lm_nll(n, d, v, vm, DType::F32);
    }
    const { assert!(2100 * 8200 > ops::NLL_CHUNK_ELEMS && 2046 * 8200 <= ops::NLL_CHUNK_ELEMS) };
    check_lm_nll(29, 8, 1500, true, DType::F64);
}

#[test]
fn matmul_matches_burn_with_views_and_gradients() {
    for &(m, k, n) in &[(1, 1, 1), (7, 33, 65), (300, 70, 129), (15, 600, 31)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let tag = format!("{m}x{k}x{n} ta={ta} tb={tb}");
            let a0 = if ta {
                rand([k, m], DType::F32, 1)
            } else {
                rand([m, k], DType::F32, 1)
            };
            let b0 = if tb {
                rand([n, k], DType::F32, 2)
            } else {
                rand([k, n], DType::F32, 2)
            };
            let w = rand([m, n], DType::F32, 3);
            let mut out = vec![];
            for fused in [false, true] {
                let (a0, b0) = (leaf(&a0), leaf(&b0));
                let a = if ta {
                    a0.clone().transpose()
                } else {
                    a0.clone()
                };
                let b = if tb {
                    b0.clone().transpose()
                } else {
                    b0.clone()
                };
                let c = if fused {
                    let p =
                        AD::fused_matmul(a.into_primitive().tensor(), b.into_primitive().tensor())
                            .expect("flex has an f32 GEMM kernel");
                    Tensor::<AD, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(p))
                } else {
                    a.matmul(b)
                };
                let g = (c.clone() * w.clone()).sum().backward();
                out.push((
                    vals(c),
                    vals(a0.grad(&g).unwrap()),
                    vals(b0.grad(&g).unwrap()),
                ));
            }
            let (want, got) = (&out[0], &out[1]);
            close(
                &format!("matmul {tag}"),
                got.0.clone(),
                want.0.clone(),
                1e-6,
            );
            close(
                &format!("matmul da {tag}"),
                got.1.clone(),
                want.1.clone(),
                1e-6,
            );
            close(
                &format!("matmul db {tag}"),
                got.2.clone(),
                want.2.clone(),
                1e-6,
            );
        }
    }
}

#[test]
fn inputs_without_a_kernel_fall_back_to_the_generic_op() {
    let dev = Default::default();
    // Half precision: no attention, LM-head or GEMM kernel; the entry points run burn's ops.
    let q = Tensor::<B, 4>::random([1, 9, 4, 8], Distribution::Default, &dev).cast(DType::F16);
    let k = Tensor::<B, 4>::random([1, 9, 2, 8], Distribution::Default, &dev).cast(DType::F16);
    let v = Tensor::<B, 4>::random([1, 9, 2, 8], Distribution::Default, &dev).cast(DType::F16);
    let prim = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
    assert!(B::fused_attention(
        prim(&q),
        prim(&k),
        prim(&v),
        ops::AttnSpec {
            scale: 0.3,
            window: None
        }
    )
    .is_none());
    let mask = ops::causal_mask::<B>(0, 9, None, &dev);
    let via_entry = ops::causal_attention(q.clone(), k.clone(), v.clone(), Some(&mask), None);
    let generic = ops::causal_attention_generic(q, k, v, Some(&mask));
    assert_eq!(vals(via_entry), vals(generic));
    // Mismatched shapes (kv heads not dividing the query heads) get no kernel either.
    let q = Tensor::<B, 4>::random([1, 3, 4, 8], Distribution::Default, &dev);
    let k = Tensor::<B, 4>::random([1, 3, 3, 8], Distribution::Default, &dev);
    assert!(B::fused_attention(
        prim(&q),
        prim(&k),
        prim(&k),
        ops::AttnSpec {
            scale: 0.3,
            window: None
        }
    )
    .is_none());
    // A target outside the vocabulary: no kernel (the generic op reports it as burn does).
    let h = Tensor::<B, 2>::random([2, 8], Distribution::Default, &dev);
    let w = Tensor::<B, 2>::random([5, 8], Distribution::Default, &dev);
    let bad = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![1i64, 5], [2]), &dev);
    assert!(B::fused_lm_nll(
        h.clone().into_primitive().tensor(),
        w.clone().into_primitive().tensor(),
        true,
        bad.into_primitive()
    )
    .is_none());
    // f64 GEMM: burn-flex's own matmul.
    let a = Tensor::<B, 2>::random([3, 4], Distribution::Default, &dev).cast(DType::F64);
    assert!(B::fused_matmul(
        a.clone().into_primitive().tensor(),
        a.transpose().into_primitive().tensor()
    )
    .is_none());
}

#[test]
fn turning_kernels_off_gives_the_generic_path() {
    let dev = Default::default();
    let q = Tensor::<B, 4>::random([2, 10, 4, 8], Distribution::Default, &dev);
    let k = Tensor::<B, 4>::random([2, 10, 2, 8], Distribution::Default, &dev);
    let mask = ops::causal_mask::<B>(0, 10, None, &dev);
    let fused = vals(ops::causal_attention(
        q.clone(),
        k.clone(),
        k.clone(),
        Some(&mask),
        None,
    ));
    let generic = vals(ops::causal_attention_generic(q, k.clone(), k, Some(&mask)));
    assert!(rel_l2(&fused, &generic) < 1e-5);
    assert!(ops::fused_enabled());
    // The switch is process-wide, so the kernels are turned off in a child process (this test
    // binary again, running only the ignored test below with SHEARS_FUSED=0). Flipping it here
    // with `set_fused` raced with the other tests of this binary, which run the fused ops at the
    // same time: `fused_backward_passes_are_deterministic` once saw the generic path in one of
    // its runs and failed.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fused_kernels::kernels_off_child",
            "--ignored",
            "--test-threads",
            "1",
        ])
        .env("SHEARS_FUSED", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "run by turning_kernels_off_gives_the_generic_path with SHEARS_FUSED=0"]
fn kernels_off_child() {
    if std::env::var("SHEARS_FUSED").as_deref() != Ok("0") {
        eprintln!("skipped: only meaningful with SHEARS_FUSED=0");
        return;
    }
    assert!(!ops::fused_enabled());
    let dev = Default::default();
    let q = Tensor::<B, 4>::random([2, 10, 4, 8], Distribution::Default, &dev);
    let k = Tensor::<B, 4>::random([2, 10, 2, 8], Distribution::Default, &dev);
    let mask = ops::causal_mask::<B>(0, 10, None, &dev);
    let generic = vals(ops::causal_attention_generic(
        q.clone(),
        k.clone(),
        k.clone(),
        Some(&mask),
    ));
    let off = vals(ops::causal_attention(q, k.clone(), k, Some(&mask), None));
    assert_eq!(off, generic);
}

#[test]
fn fused_backward_passes_are_deterministic() {
    // Runs (and resumed runs) must be bit-identical: no reduction may depend on scheduling.
    let grads = || {
        let h = leaf(&rand([300, 32], DType::F32, 5));
        let w = leaf(&rand([5000, 32], DType::F32, 6));
        let tg: Vec<i64> = (0..300).map(|i| (i * 131 % 5000) as i64).collect();
        let tg = Tensor::<AD, 1, Int>::from_data(TensorData::new(tg, [300]), &Default::default());
        let q = leaf(&rand([2, 70, 6, 16], DType::F32, 7));
        let k = leaf(&rand([2, 70, 2, 16], DType::F32, 8));
        let nll = ops::lm_head_nll(h.clone(), w.clone(), true, tg);
        let att = ops::causal_attention(q.clone(), k.clone(), k.clone(), None, None);
        let g = (nll.sum() + att.powi_scalar(2).sum()).backward();
        let bits =
            |t: Tensor<B, 2>| -> Vec<u32> { vals(t).into_iter().map(f32::to_bits).collect() };
        (
            bits(h.grad(&g).unwrap()),
            bits(w.grad(&g).unwrap()),
            vals(q.grad(&g).unwrap())
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>(),
            vals(k.grad(&g).unwrap())
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>(),
        )
    };
    let first = grads();
    for _ in 0..3 {
        assert!(
            grads() == first,
            "a fused backward pass changed between identical runs"
        );
    }
}

#[test]
fn rms_norm_and_swiglu_match_generic() {
    for &(n, d) in &[(1, 1), (37, 576), (300, 64), (5, 1000)] {
        let tag = format!("n{n} d{d}");
        let x0 = rand([n, d], DType::F32, n as u64);
        let w0 = rand([d], DType::F32, d as u64);
        let dy = rand([n, d], DType::F32, 99);
        // RMSNorm: the generic definition vs the kernel, outputs and both gradients.
        let (xg, wg) = (leaf(&x0), leaf(&w0));
        let yg = xg.clone() / xg.clone().square().mean_dim(1).add_scalar(1e-5).sqrt()
            * wg.clone().unsqueeze::<2>();
        let (xf, wf) = (leaf(&x0), leaf(&w0));
        let yf = ops::rms_norm_fused(&xf, &wf, 1e-5, d).expect("flex has an RMSNorm kernel");
        close(
            &format!("rmsnorm {tag}"),
            vals(yf.clone()),
            vals(yg.clone()),
            1e-6,
        );
        let gg = (yg * dy.clone()).sum().backward();
        let gf = (yf * dy.clone()).sum().backward();
        close(
            &format!("rmsnorm dx {tag}"),
            vals(xf.grad(&gf).unwrap()),
            vals(xg.grad(&gg).unwrap()),
            1e-5,
        );
        close(
            &format!("rmsnorm dw {tag}"),
            vals(wf.grad(&gf).unwrap()),
            vals(wg.grad(&gg).unwrap()),
            1e-5,
        );
        // SwiGLU.
        let u0 = rand([n, d], DType::F32, 5 + n as u64);
        let (ag, ug) = (leaf(&x0.clone().mul_scalar(4.0)), leaf(&u0));
        let og = burn::tensor::activation::silu(ag.clone()) * ug.clone();
        let (af, uf) = (leaf(&x0.clone().mul_scalar(4.0)), leaf(&u0));
        let of = ops::swiglu(af.clone(), uf.clone());
        close(
            &format!("swiglu {tag}"),
            vals(of.clone()),
            vals(og.clone()),
            1e-6,
        );
        let gg = (og * dy.clone()).sum().backward();
        let gf = (of * dy).sum().backward();
        close(
            &format!("swiglu dgate {tag}"),
            vals(af.grad(&gf).unwrap()),
            vals(ag.grad(&gg).unwrap()),
            1e-5,
        );
        close(
            &format!("swiglu dup {tag}"),
            vals(uf.grad(&gf).unwrap()),
            vals(ug.grad(&gg).unwrap()),
            1e-5,
        );
    }
}

/// A hidden/intermediate mask of width `d` as the pruning stage samples it: exact zeros, exact
/// ones and fractions in between; `x` gets zeros where the mask is zero (as the residual stream
/// does).
fn sample_mask(d: usize, seed: u64) -> Vec<f32> {
    (0..d)
        .map(|j| match (j as u64 * 7 + seed) % 5 {
            0 | 1 => 0.0,
            2 => 1.0,
            k => 0.1 + 0.2 * k as f32 + 0.01 * (j % 7) as f32,
        })
        .collect()
}

#[test]
fn masked_rms_norm_and_swiglu_match_generic() {
    let dev = Default::default();
    for &(n, d) in &[(1, 3), (37, 576), (300, 64), (5, 1000)] {
        let tag = format!("n{n} d{d}");
        let zv = sample_mask(d, n as u64);
        let kept = zv.iter().filter(|&&v| v != 0.0).count().max(1);
        let z0 = Tensor::<AD, 1>::from_data(TensorData::new(zv.clone(), [d]), &dev);
        let keep = Tensor::<AD, 1>::from_data(
            TensorData::new(zv.iter().map(|&v| f32::from(v != 0.0)).collect(), [d]),
            &dev,
        );
        let x0 = rand([n, d], DType::F32, 11 + n as u64) * keep.unsqueeze::<2>();
        let w0 = rand([d], DType::F32, 3 + d as u64);
        let dy = rand([n, d], DType::F32, 98);
        // Masked RMSNorm: mean square over the kept channels, output times z; gradients for
        // x, the gain and the mask.
        let (xg, wg, zg) = (leaf(&x0), leaf(&w0), leaf(&z0));
        let var = xg.clone().square().sum_dim(1).div_scalar(kept as f64);
        let yg = xg.clone() / var.add_scalar(1e-5).sqrt()
            * wg.clone().unsqueeze::<2>()
            * zg.clone().unsqueeze::<2>();
        let (xf, wf, zf) = (leaf(&x0), leaf(&w0), leaf(&z0));
        let yf = ops::rms_norm_fused(&xf, &(wf.clone() * zf.clone()), 1e-5, kept)
            .expect("flex has an RMSNorm kernel");
        close(
            &format!("masked rmsnorm {tag}"),
            vals(yf.clone()),
            vals(yg.clone()),
            1e-6,
        );
        let gg = (yg * dy.clone()).sum().backward();
        let gf = (yf * dy.clone()).sum().backward();
        for (what, got, want) in [
            (
                "dx",
                vals(xf.grad(&gf).unwrap()),
                vals(xg.grad(&gg).unwrap()),
            ),
            (
                "dw",
                vals(wf.grad(&gf).unwrap()),
                vals(wg.grad(&gg).unwrap()),
            ),
            (
                "dz",
                vals(zf.grad(&gf).unwrap()),
                vals(zg.grad(&gg).unwrap()),
            ),
        ] {
            close(&format!("masked rmsnorm {what} {tag}"), got, want, 1e-5);
        }
        // Masked SwiGLU: silu(gate) · (up · z), gradients for gate, up and z.
        let u0 = rand([n, d], DType::F32, 5 + n as u64);
        let a0 = rand([n, d], DType::F32, 17 + n as u64).mul_scalar(4.0);
        let (ag, ug, zg) = (leaf(&a0), leaf(&u0), leaf(&z0));
        let og =
            burn::tensor::activation::silu(ag.clone()) * (ug.clone() * zg.clone().unsqueeze::<2>());
        let (af, uf, zf) = (leaf(&a0), leaf(&u0), leaf(&z0));
        let of = ops::swiglu_masked(af.clone(), uf.clone(), &zf);
        close(
            &format!("masked swiglu {tag}"),
            vals(of.clone()),
            vals(og.clone()),
            1e-6,
        );
        let gg = (og * dy.clone()).sum().backward();
        let gf = (of * dy).sum().backward();
        for (what, got, want) in [
            (
                "dgate",
                vals(af.grad(&gf).unwrap()),
                vals(ag.grad(&gg).unwrap()),
            ),
            (
                "dup",
                vals(uf.grad(&gf).unwrap()),
                vals(ug.grad(&gg).unwrap()),
            ),
            (
                "dz",
                vals(zf.grad(&gf).unwrap()),
                vals(zg.grad(&gg).unwrap()),
            ),
        ] {
            close(&format!("masked swiglu {what} {tag}"), got, want, 1e-5);
        }
        // The kernel ran (not the fallback): a 3-D input goes through the same entry point.
        assert!(AD::fused_swiglu_masked(
            leaf(&a0).into_primitive().tensor(),
            leaf(&u0).into_primitive().tensor(),
            leaf(&z0).into_primitive().tensor(),
        )
        .is_some());
    }
    // Shapes the kernel does not take fall back to the composition: a mask of the wrong
    // width is refused by the kernel (the composition then reports the shape error itself).
    let a = rand([4, 6], DType::F32, 1).inner();
    let z = rand([5], DType::F32, 2).inner();
    assert!(B::swiglu_masked_kernel(
        a.clone().into_primitive().tensor(),
        a.into_primitive().tensor(),
        z.into_primitive().tensor()
    )
    .is_none());
}

#[test]
fn rope_matches_generic_bit_for_bit() {
    // Odd lengths, GQA-sized and full head counts, head widths 8 / 32 / 64, a cached past
    // (tables starting past 0), f32 and f64: the kernel does the generic op's arithmetic in
    // the same order, so outputs and gradients are identical, not merely close.
    let rope = shears_core::Rope {
        theta: 10000.0,
        scaling: shears_core::RopeScaling::None,
    };
    for &(b, t, h, hd, start, dtype) in &[
        (1, 1, 1, 8, 0, DType::F32),
        (2, 37, 3, 64, 0, DType::F32),
        (3, 601, 9, 32, 0, DType::F32),
        (2, 5, 4, 64, 17, DType::F32),
        (2, 29, 3, 8, 3, DType::F64),
    ] {
        let tag = format!("b{b} t{t} h{h} hd{hd} start{start} {dtype:?}");
        let (cos, sin) =
            shears_models::rope::tables::<AD>(&rope, hd, start, t, dtype, &Default::default());
        let x0 = rand([b, t, h, hd], dtype, (b * t + h + hd) as u64);
        let dy = rand([b, t, h, hd], dtype, 7);
        let (xg, xf) = (leaf(&x0), leaf(&x0));
        let yg = shears_models::rope::apply_generic(xg.clone(), &cos, &sin);
        let yf = ops::rope(xf.clone(), &cos, &sin);
        assert!(
            AD::fused_rope(
                xf.clone().into_primitive().tensor(),
                cos.clone().into_primitive().tensor(),
                sin.clone().into_primitive().tensor()
            )
            .is_some(),
            "{tag}: flex has a RoPE kernel"
        );
        assert_eq!(vals(yf.clone()), vals(yg.clone()), "rope {tag}");
        let gg = (yg * dy.clone()).sum().backward();
        let gf = (yf * dy).sum().backward();
        assert_eq!(
            vals(xf.grad(&gf).unwrap()),
            vals(xg.grad(&gg).unwrap()),
            "rope dx {tag}"
        );
    }
    // Tables that do not match x (length or width): no kernel, the generic op runs.
    let dev = Default::default();
    let (cos, sin) = shears_models::rope::tables::<B>(&rope, 8, 0, 4, DType::F32, &dev);
    let x = Tensor::<B, 4>::random([1, 5, 2, 8], Distribution::Default, &dev);
    let p = |t: Tensor<B, 2>| t.into_primitive().tensor();
    assert!(B::fused_rope(x.into_primitive().tensor(), p(cos), p(sin)).is_none());
}
