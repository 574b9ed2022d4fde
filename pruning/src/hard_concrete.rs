//! The hard-concrete distribution (Louizos et al. 2018) as LLM-Shearing uses it (method §2):
//! stretched, clamped sigmoid gates with a learnable location `log_alpha` per mask entry.
//! Everything here is f32, whatever the model's dtype.

use burn::tensor::{backend::Backend, Tensor};
use shears_models::llama::sigmoid;

/// Lower end of the stretch interval, `l`.
pub const LIMIT_A: f64 = -0.1;
/// Upper end of the stretch interval, `r`.
pub const LIMIT_B: f64 = 1.1;
/// Temperature β.
pub const BETA: f64 = 2.0 / 3.0;
/// Clamp of the uniform noise and of the zero-probability.
pub const EPSILON: f64 = 1e-6;
/// Scale of the deterministic mask: `sigmoid(log_alpha / β · 0.8)`.
pub const MAGICAL_NUMBER: f64 = 0.8;
/// Mean of the `log_alpha` initialisation (the reference hard-codes 5; the clamp makes it ln 100).
pub const INIT_MEAN: f64 = 5.0;
/// Standard deviation of the `log_alpha` initialisation.
pub const INIT_STD: f64 = 0.01;

/// `log_alpha` is clamped to `[ln 0.01, ln 100]` before every use.
pub fn clamp_range() -> (f64, f64) {
    (0.01f64.ln(), 100.0f64.ln())
}

/// `β · ln(-l / r)`, the offset of the zero-probability.
fn zero_offset() -> f64 {
    BETA * (-LIMIT_A / LIMIT_B).ln()
}

/// A reparameterised sample `z = clamp(sigmoid((ln u − ln(1−u) + log_alpha)/β)·(r−l) + l, 0, 1)`
/// for noise `u` in `(ε, 1−ε)`. Gradients reach `log_alpha` except where the clamp is active.
pub fn sample<B: Backend, const D: usize>(
    log_alpha: Tensor<B, D>,
    u: Tensor<B, D>,
) -> Tensor<B, D> {
    let logit_u = u.clone().log() - u.neg().add_scalar(1.0).log();
    let s = sigmoid((logit_u + log_alpha).div_scalar(BETA));
    s.mul_scalar(LIMIT_B - LIMIT_A)
        .add_scalar(LIMIT_A)
        .clamp(0.0, 1.0)
}

/// `P(z ≠ 0) = 1 − clamp(sigmoid(β·ln(−l/r) − log_alpha), ε, 1−ε)`, the expected-score of an
/// entry (method §2.3).
pub fn score<B: Backend, const D: usize>(log_alpha: Tensor<B, D>) -> Tensor<B, D> {
    let p_zero = sigmoid(log_alpha.neg().add_scalar(zero_offset())).clamp(EPSILON, 1.0 - EPSILON);
    p_zero.neg().add_scalar(1.0)
}

/// [`score`] of one value on the host (f32, same formula).
pub fn score_host(log_alpha: f32) -> f32 {
    let x = zero_offset() as f32 - log_alpha;
    let p_zero = (1.0 / (1.0 + (-x).exp())).clamp(EPSILON as f32, 1.0 - EPSILON as f32);
    1.0 - p_zero
}

/// How many entries of a row the deterministic mask zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCount {
    /// `round(N − Σ score)` with ties to even (Python's `round`): the expected structure, used
    /// while pruning (`eval_target_model = false`).
    ExpectedRounded,
    /// `N − kept`: the exact target, used at finalize (`eval_target_model = true`).
    Exact(usize),
}

/// Round half to even, as Python's `round`.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// The deterministic mask of one row (method §2.4): `sigmoid(log_alpha / β · 0.8)`, with the
/// `count` smallest entries set to exactly 0. Ties are broken by index (the lower index is
/// zeroed first), so the result does not depend on sort internals.
pub fn deterministic_row(log_alpha: &[f32], count: ZeroCount) -> Vec<f32> {
    let n = log_alpha.len();
    let zeros = match count {
        ZeroCount::ExpectedRounded => {
            let kept: f64 = log_alpha.iter().map(|&a| score_host(a) as f64).sum();
            round_half_even(n as f64 - kept).clamp(0.0, n as f64) as usize
        }
        ZeroCount::Exact(kept) => n - kept.min(n),
    };
    let scale = (MAGICAL_NUMBER / BETA) as f32;
    let mut soft: Vec<f32> = log_alpha
        .iter()
        .map(|&a| 1.0 / (1.0 + (-(a * scale)).exp()))
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| soft[i].total_cmp(&soft[j]).then(i.cmp(&j)));
    for &i in &order[..zeros] {
        soft[i] = 0.0;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_scores() {
        // Spec §2.3: log_alpha 4.605 -> 0.99798, 0 -> 0.83182, -4.605 -> 0.04713.
        assert!((score_host(4.605) - 0.99798).abs() < 1e-5);
        assert!((score_host(0.0) - 0.83182).abs() < 1e-5);
        assert!((score_host(-4.605) - 0.04713).abs() < 1e-5);
        assert!((zero_offset() + 1.598597).abs() < 1e-6);
    }

    #[test]
    fn bankers_rounding() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(2.4999), 2.0);
        assert_eq!(round_half_even(-0.5), 0.0);
    }

    #[test]
    fn deterministic_rows() {
        let (lo, hi) = clamp_range();
        let row = [hi as f32, 0.0, lo as f32, 0.0, hi as f32];
        let m = deterministic_row(&row, ZeroCount::Exact(3));
        // The clamped minimum goes first, then the tie at 0.0 breaks to the lower index.
        assert_eq!(m.iter().filter(|&&x| x == 0.0).count(), 2);
        assert_eq!((m[1], m[2]), (0.0, 0.0));
        assert!(
            (m[0] - 0.99603).abs() < 1e-5,
            "kept values stay soft: {}",
            m[0]
        );
        // Expected zeros: scores 0.998 + 0.832 + 0.047 + 0.832 + 0.998 = 3.707 -> 1.29 -> 1 zero.
        let m = deterministic_row(&row, ZeroCount::ExpectedRounded);
        assert_eq!(m.iter().filter(|&&x| x == 0.0).count(), 1);
        assert_eq!(m[2], 0.0);
    }
}
