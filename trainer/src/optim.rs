//! Optimizer settings with PyTorch's meanings and defaults. burn's own `AdamWConfig` defaults
//! differ (eps 1e-5, weight decay 1e-4), so every field is set explicitly here.

use burn::optim::AdamWConfig;
use serde::{Deserialize, Serialize};

/// AdamW as `torch.optim.AdamW` defines it (decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWSettings {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the square root of the second moment.
    pub eps: f32,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f32,
}

impl Default for AdamWSettings {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamWSettings {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWSettings {
    /// burn's config with every field set from these settings.
    pub fn to_burn(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.beta1)
            .with_beta_2(self.beta2)
            .with_epsilon(self.eps)
            .with_weight_decay(self.weight_decay)
    }
}
