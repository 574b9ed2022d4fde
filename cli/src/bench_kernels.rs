//! `shears bench kernels`: each fused kernel against its generic composition of burn ops on
//! the same backend, forward and forward + backward, plus the GEMM rate on the model's
//! projection shapes. Numbers are printed, never asserted.

use std::time::Instant;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde_json::json;
use shears_models::ops::{self, simd::Isa};
use shears_models::{AutodiffTask, ShearsAutodiff, ShearsOps};

/// Shapes of the kernel benchmark (SmolLM2-135M's by default).
#[derive(Debug, Clone)]
pub struct KernelShapes {
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub iters: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    v[v.len() / 2]
}

/// Median seconds of `iters` runs after one warm-up.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..iters.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn sync<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) {
    let _ = t.sum().into_data();
}

pub struct KernelBench {
    pub shapes: KernelShapes,
    pub json: bool,
}

/// The figures of one kernel against its generic composition.
struct Rows(Vec<serde_json::Value>);

impl Rows {
    fn push(&mut self, name: &str, generic: f64, fused: Option<f64>, flops: f64) {
        self.0.push(json!({
            "kernel": name, "generic_s": generic, "fused_s": fused,
            "speedup": fused.map(|f| generic / f),
            "generic_gflop_s": flops / generic / 1e9,
            "fused_gflop_s": fused.map(|f| flops / f / 1e9),
        }));
    }

    fn print(self, iters: usize, json: bool) {
        let threads = rayon::current_num_threads();
        if json {
            for mut r in self.0 {
                r["threads"] = json!(threads);
                r["isa"] = json!(Isa::detect().name());
                println!("{r}");
            }
            return;
        }
        println!(
            "# shears bench kernels: median of {iters} runs after 1 warm-up, {threads} threads, {} kernels",
            Isa::detect().name()
        );
        println!(
            "{:<58} {:>11} {:>11} {:>8} {:>10} {:>10}",
            "kernel", "generic ms", "fused ms", "speedup", "gen GF/s", "fused GF/s"
        );
        for r in self.0 {
            let f = |k: &str| r[k].as_f64();
            println!(
                "{:<58} {:>11.2} {:>11} {:>8} {:>10.1} {:>10}",
                r["kernel"].as_str().unwrap_or(""),
                1e3 * f("generic_s").unwrap_or(f64::NAN),
                f("fused_s").map_or("-".into(), |x| format!("{:.2}", 1e3 * x)),
                f("speedup").map_or("-".into(), |x| format!("{x:.2}x")),
                f("generic_gflop_s").unwrap_or(f64::NAN),
                f("fused_gflop_s").map_or("-".into(), |x| format!("{x:.1}")),
            );
        }
    }
}

type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;

/// GEMM on the projection shapes, inference backend.
fn gemm_rows<B: ShearsAutodiff>(s: &KernelShapes, device: &B::Device, rows: &mut Rows) {
    let n = s.batch * s.seq_len;
    for (name, k, nn) in [
        ("gemm q_proj", s.hidden, s.heads * s.head_dim),
        ("gemm gate_proj", s.hidden, s.intermediate),
        ("gemm down_proj", s.intermediate, s.hidden),
        ("gemm lm_head", s.hidden, s.vocab),
    ] {
        let x = Tensor::<Inner<B>, 2>::random([n, k], Distribution::Default, device);
        let w = Tensor::<Inner<B>, 2>::random([k, nn], Distribution::Default, device);
        let secs = time(s.iters, || sync(x.clone().matmul(w.clone())));
        let has = Inner::<B>::fused_matmul(
            x.clone().into_primitive().tensor(),
            w.clone().into_primitive().tensor(),
        )
        .is_some();
        let fused = has.then(|| time(s.iters, || sync(ops::matmul(x.clone(), w.clone()))));
        rows.push(
            &format!("{name} [{n}x{k}]x[{k}x{nn}]"),
            secs,
            fused,
            2.0 * (n * k * nn) as f64,
        );
    }
}

/// Causal attention, forward and forward + backward.
fn attention_rows<B: ShearsAutodiff>(s: &KernelShapes, device: &B::Device, rows: &mut Rows) {
    let it = s.iters;
    let (b, t, h, g, hd) = (s.batch, s.seq_len, s.heads, s.kv_heads, s.head_dim);
    let q = Tensor::<B, 4>::random([b, t, h, hd], Distribution::Default, device);
    let k = Tensor::<B, 4>::random([b, t, g, hd], Distribution::Default, device);
    let v = Tensor::<B, 4>::random([b, t, g, hd], Distribution::Default, device);
    let mask = ops::causal_mask::<B>(0, t, None, device);
    // Causal: half the t x t scores, two GEMMs of hd each.
    let attn_flops = 2.0 * 2.0 * (b * h * t * t * hd) as f64 / 2.0;
    let fused_ok = B::fused_attention(
        q.clone().into_primitive().tensor(),
        k.clone().into_primitive().tensor(),
        v.clone().into_primitive().tensor(),
        ops::AttnSpec {
            scale: 1.0,
            window: None,
        },
    )
    .is_some();
    let (qi, ki, vi) = (q.clone().inner(), k.clone().inner(), v.clone().inner());
    let mask_i = mask.clone().inner();
    let gen = time(it, || {
        sync(ops::causal_attention_generic(
            qi.clone(),
            ki.clone(),
            vi.clone(),
            Some(&mask_i),
        ))
    });
    let fus = fused_ok.then(|| {
        time(it, || {
            sync(ops::causal_attention(
                qi.clone(),
                ki.clone(),
                vi.clone(),
                Some(&mask_i),
                None,
            ))
        })
    });
    let shape = format!("b{b} t{t} h{h} g{g} hd{hd}");
    rows.push(&format!("attention fwd {shape}"), gen, fus, attn_flops);
    let (qg, kg, vg) = (q.require_grad(), k.require_grad(), v.require_grad());
    let gen = time(it, || {
        let o = ops::causal_attention_generic(qg.clone(), kg.clone(), vg.clone(), Some(&mask));
        let _ = o.sum().backward();
    });
    let fus = fused_ok.then(|| {
        time(it, || {
            let o = ops::causal_attention(qg.clone(), kg.clone(), vg.clone(), Some(&mask), None);
            let _ = o.sum().backward();
        })
    });
    rows.push(
        &format!("attention fwd+bwd {shape}"),
        gen,
        fus,
        attn_flops * 3.5,
    );
}

/// LM head + cross-entropy (tied embedding layout), forward and forward + backward.
fn lm_head_rows<B: ShearsAutodiff>(s: &KernelShapes, device: &B::Device, rows: &mut Rows) {
    let it = s.iters;
    let n = s.batch * s.seq_len;
    let hs = Tensor::<B, 2>::random([n, s.hidden], Distribution::Default, device);
    let w =
        Tensor::<B, 2>::random([s.vocab, s.hidden], Distribution::Default, device).mul_scalar(0.05);
    let tg: Vec<i64> = (0..n).map(|i| ((i * 7919) % s.vocab) as i64).collect();
    let tg = Tensor::<B, 1, Int>::from_data(TensorData::new(tg, [n]), device);
    let ce_flops = 2.0 * (n * s.hidden * s.vocab) as f64;
    let fused_ok = B::fused_lm_nll(
        hs.clone().into_primitive().tensor(),
        w.clone().into_primitive().tensor(),
        true,
        tg.clone().into_primitive(),
    )
    .is_some();
    let (hi, wi, ti) = (hs.clone().inner(), w.clone().inner(), tg.clone().inner());
    let gen = time(it, || {
        sync(ops::lm_head_nll_generic(
            hi.clone(),
            wi.clone(),
            true,
            ti.clone(),
        ))
    });
    let fus = fused_ok.then(|| {
        time(it, || {
            sync(ops::lm_head_nll(hi.clone(), wi.clone(), true, ti.clone()))
        })
    });
    let shape = format!("n{n} d{} V{}", s.hidden, s.vocab);
    rows.push(&format!("lm head + CE fwd {shape}"), gen, fus, ce_flops);
    let (hg, wg) = (hs.require_grad(), w.require_grad());
    let gen = time(it, || {
        let l = ops::lm_head_nll_generic(hg.clone(), wg.clone(), true, tg.clone());
        let _ = l.mean().backward();
    });
    let fus = fused_ok.then(|| {
        time(it, || {
            let l = ops::lm_head_nll(hg.clone(), wg.clone(), true, tg.clone());
            let _ = l.mean().backward();
        })
    });
    rows.push(
        &format!("lm head + CE fwd+bwd {shape}"),
        gen,
        fus,
        ce_flops * 3.0,
    );
}

impl AutodiffTask for KernelBench {
    type Output = ();
    fn run<B: ShearsAutodiff>(self, device: B::Device) {
        let mut rows = Rows(Vec::new());
        gemm_rows::<B>(&self.shapes, &device, &mut rows);
        attention_rows::<B>(&self.shapes, &device, &mut rows);
        lm_head_rows::<B>(&self.shapes, &device, &mut rows);
        rows.print(self.shapes.iters, self.json);
    }
}
