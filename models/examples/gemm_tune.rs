//! GEMM rate of the native f32 kernel on the model's projection shapes (forward, and both
//! gradient GEMMs with their transposed operands), for tuning the blocking:
//! `cargo run --example gemm_tune -p shears-models`. The 3072- and 960-wide shapes are what
//! fused gate/up and q/k/v projections would run (for SmolLM2-135M): compare them with twice
//! the 1536-wide shape and with 576 + 2 x 192.
use shears_models::ops::gemm::{gemm, Mat};
use std::time::Instant;

fn main() {
    // Optional arguments `MxKxN` pick the shapes (for interleaved A/B runs of two blockings).
    let picked: Vec<(usize, usize, usize)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let v: Vec<usize> = a.split('x').filter_map(|x| x.parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect();
    let all: &[(usize, usize, usize)] = &[
        (256, 576, 576),
        (256, 576, 1536),
        (256, 1536, 576),
        (256, 576, 49152),
        (1024, 576, 576),
        (1024, 576, 1536),
        (1024, 576, 3072), // fused gate/up
        (1024, 576, 192),  // k_proj, v_proj
        (1024, 576, 960),  // fused q/k/v
        (1024, 1536, 576),
        (1024, 576, 49152),
        (2048, 256, 768),
    ];
    let shapes = if picked.is_empty() { all } else { &picked[..] };
    for &(m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) * 0.01).collect();
        // C on a 64-byte boundary, as the model's buffers are (mimalloc): streaming stores need it.
        let mut c_buf = vec![0f32; m * n + 16];
        let off = c_buf.as_ptr().align_offset(64);
        // SAFETY: `c_buf` holds the m × n output at offset `off` plus the alignment slack, and A
        // and B are the m × k and k × n buffers above.
        let c = unsafe { c_buf.as_mut_ptr().add(off) };
        // forward: A row-major [m,k], B row-major [k,n]; "nt": B given as [n,k] (transposed view)
        // "tn": A given as [k,m] (weight-gradient layout).
        for (name, am, bm) in [
            ("nn", Mat::rows(a.as_ptr(), k), Mat::rows(b.as_ptr(), n)),
            ("nt", Mat::rows(a.as_ptr(), k), Mat::rows(b.as_ptr(), k).t()),
            ("tn", Mat::rows(a.as_ptr(), m).t(), Mat::rows(b.as_ptr(), n)),
        ] {
            // SAFETY: `c_buf` holds the m × n output at offset `off` plus the alignment slack, and
            // A and B are the m × k and k × n buffers above.
            let run = || unsafe { gemm(m, n, k, 1.0f32, am, bm, c, n as isize, 1, false, true) };
            run();
            let iters = (1e10 / (2.0 * (m * n * k) as f64)).clamp(5.0, 400.0) as usize;
            let mut ts: Vec<f64> = (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    run();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            ts.sort_by(|x, y| x.partial_cmp(y).unwrap());
            let (best, med) = (ts[0], ts[ts.len() / 2]);
            let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
            println!(
                "{m:>5}x{k:>5}x{n:>6} {name}  median {:7.3} ms {:6.1} GFLOP/s  best {:6.1}",
                med * 1e3,
                gf(med),
                gf(best)
            );
        }
    }
}
