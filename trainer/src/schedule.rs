//! The learning-rate multiplier (method §4.3): Composer's `cosine_with_warmup`, which scales all
//! parameter groups of a run (the masks' and multipliers' rates too).

use serde::{Deserialize, Serialize};

/// `mult(t) = t / warmup` for `t < warmup`, else
/// `α_f + (1 − α_f)·½(1 + cos(π·τ))` with `τ = clip((t − warmup)/(max − warmup), 0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineWithWarmup {
    /// Warm-up steps (320 of 3200 in the pruning recipe).
    pub warmup: usize,
    /// Total steps (`t_max`).
    pub max: usize,
    /// Final multiplier (`α_f`, 0.1).
    pub final_ratio: f64,
}

impl CosineWithWarmup {
    /// The multiplier for optimizer step `t` (0-based: the step about to be taken).
    pub fn at(&self, t: usize) -> f64 {
        if t < self.warmup {
            return t as f64 / self.warmup as f64;
        }
        let span = self.max.saturating_sub(self.warmup);
        let tau = if span == 0 {
            1.0
        } else {
            ((t - self.warmup) as f64 / span as f64).clamp(0.0, 1.0)
        };
        self.final_ratio
            + (1.0 - self.final_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * tau).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composer_values() {
        let s = CosineWithWarmup {
            warmup: 320,
            max: 3200,
            final_ratio: 0.1,
        };
        assert_eq!(s.at(0), 0.0);
        assert_eq!(s.at(160), 0.5);
        assert_eq!(s.at(320), 1.0);
        // Half-way through the decay: 0.1 + 0.9 · 0.5.
        assert!((s.at(1760) - 0.55).abs() < 1e-12);
        assert!((s.at(3200) - 0.1).abs() < 1e-12);
        assert!((s.at(5000) - 0.1).abs() < 1e-12);
        // Monotone after the warm-up.
        for t in 320..3200 {
            assert!(s.at(t + 1) <= s.at(t) + 1e-15);
        }
    }
}
