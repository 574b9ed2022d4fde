//! The domain sampler (method §5.5, "recommended Rust design"): per domain a seeded permutation
//! of its train sequences with a cursor; per sample a seeded draw of the domain from the current
//! weights. Its whole state (weights, cursors, epochs, the RNG, the weight history) serialises,
//! so a resumed run draws exactly the sequences an uninterrupted one would.
//!
//! Data-parallel ranks share the permutation of each epoch and take every `world_size`-th entry
//! starting at their rank, so no sequence is used twice across ranks; each rank draws domains
//! with its own RNG stream. Domains are named everywhere, never positional (upstream #36).

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shears_core::{Error, Result};

/// What to do when a domain has no unused sequence left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Exhaustion {
    /// Stop with an error naming the domain and how much of it was used (the reference's
    /// behaviour, issue #15).
    #[default]
    Error,
    /// Start a new epoch of that domain with a fresh seeded permutation, and record a warning.
    Wrap,
}

/// Sampler settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    #[serde(default)]
    pub exhaustion: Exhaustion,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            seed: 0,
            rank: 0,
            world_size: 1,
            exhaustion: Exhaustion::Error,
        }
    }
}

/// Where one domain stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainCursor {
    /// Train sequences of the domain (all ranks).
    pub sequences: u64,
    /// Epoch of the domain (0 until it wraps).
    pub epoch: u64,
    /// Entries of this rank's share of the epoch's permutation already drawn.
    pub cursor: u64,
    /// Sequences drawn from this domain so far, all epochs.
    pub drawn: u64,
}

/// One change of the domain weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightUpdate {
    /// Optimizer step at which the weights took effect.
    pub step: u64,
    pub weights: BTreeMap<String, f64>,
    /// The per-domain losses that led to it, if any.
    #[serde(default)]
    pub losses: Option<BTreeMap<String, f64>>,
}

/// The complete, serialisable sampler state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerState {
    pub config: SamplerConfig,
    /// Current weights (normalised), by domain name.
    pub weights: BTreeMap<String, f64>,
    pub domains: BTreeMap<String, DomainCursor>,
    /// The domain-draw RNG.
    pub rng: Pcg64Mcg,
    /// Samples drawn so far.
    pub draws: u64,
    pub history: Vec<WeightUpdate>,
    /// Wrap-arounds and other events a run log should show.
    pub warnings: Vec<String>,
}

impl SamplerState {
    /// Check a state read back from a file: a rank below the world size, weights that are
    /// non-negative finite numbers summing to one over exactly the sampled domains (in the
    /// history too, with finite non-negative losses), cursors inside their epoch's share and
    /// draws that add up. A state that fails is refused, never sampled from.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = &self.config;
        if c.world_size == 0 || c.world_size > 1 << 20 || c.rank >= c.world_size {
            return Err(format!(
                "sampler rank {} / world size {} is not a valid rank",
                c.rank, c.world_size
            ));
        }
        let names: Vec<String> = self.domains.keys().cloned().collect();
        let check = |what: &str, w: &BTreeMap<String, f64>| -> std::result::Result<(), String> {
            normalized_weights(w, &names).map_err(|e| format!("{what}: {e}"))?;
            let sum: f64 = w.values().sum();
            if (sum - 1.0).abs() > 1e-6 {
                return Err(format!("{what} sum to {sum}, not 1"));
            }
            Ok(())
        };
        check("sampler weights", &self.weights)?;
        for (i, u) in self.history.iter().enumerate() {
            check(&format!("weight update {i} (step {})", u.step), &u.weights)?;
            for (d, l) in u.losses.iter().flatten() {
                if !l.is_finite() || *l < 0.0 {
                    return Err(format!(
                        "weight update {i}: loss {l} of domain '{d}' is not a non-negative number"
                    ));
                }
            }
        }
        let mut drawn = 0u64;
        for (d, cur) in &self.domains {
            let share = cur.sequences.div_ceil(c.world_size as u64);
            if cur.cursor > share {
                return Err(format!(
                    "domain '{d}': cursor {} is past this rank's {share} sequences",
                    cur.cursor
                ));
            }
            drawn = drawn
                .checked_add(cur.drawn)
                .ok_or_else(|| format!("domain '{d}': drawn {} overflows", cur.drawn))?;
        }
        if drawn != self.draws {
            return Err(format!(
                "the domains' draws add up to {drawn}, the sampler counted {}",
                self.draws
            ));
        }
        Ok(())
    }
}

/// One drawn sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draw {
    pub domain: String,
    /// Index of the sequence in the domain's train split.
    pub index: u64,
}

/// Draws (domain, sequence) pairs; see the module docs.
#[derive(Debug, Clone)]
pub struct DomainSampler {
    state: SamplerState,
    /// This rank's share of each domain's current-epoch permutation.
    shares: BTreeMap<String, Vec<u64>>,
}

fn derive_seed(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    u64::from_le_bytes(h.finalize()[..8].try_into().unwrap())
}

fn share(cfg: &SamplerConfig, domain: &str, sequences: u64, epoch: u64) -> Vec<u64> {
    let mut perm: Vec<u64> = (0..sequences).collect();
    let seed = derive_seed(&[
        b"perm",
        &cfg.seed.to_le_bytes(),
        domain.as_bytes(),
        &epoch.to_le_bytes(),
    ]);
    perm.shuffle(&mut Pcg64Mcg::seed_from_u64(seed));
    perm.into_iter()
        .skip(cfg.rank)
        .step_by(cfg.world_size)
        .collect()
}

/// Check that `weights` name exactly `domains`, are finite and non-negative with a positive
/// sum, and normalise them.
pub fn normalized_weights(
    weights: &BTreeMap<String, f64>,
    domains: &[String],
) -> Result<BTreeMap<String, f64>> {
    for d in domains {
        if !weights.contains_key(d) {
            return Err(Error::invalid(format!("no weight for domain '{d}'")));
        }
    }
    for (name, w) in weights {
        if !domains.contains(name) {
            return Err(Error::invalid(format!(
                "weight for unknown domain '{name}' (domains: {})",
                domains.join(", ")
            )));
        }
        if !w.is_finite() || *w < 0.0 {
            return Err(Error::invalid(format!(
                "weight {w} of domain '{name}' is not a non-negative number"
            )));
        }
    }
    let sum: f64 = weights.values().sum();
    if sum <= 0.0 {
        return Err(Error::invalid("domain weights sum to zero"));
    }
    Ok(weights.iter().map(|(k, v)| (k.clone(), v / sum)).collect())
}

impl DomainSampler {
    /// A fresh sampler over domains with `sequences` train sequences each, drawing with
    /// `weights` (normalised here).
    pub fn new(
        config: SamplerConfig,
        sequences: &BTreeMap<String, u64>,
        weights: &BTreeMap<String, f64>,
    ) -> Result<Self> {
        if config.world_size == 0 || config.rank >= config.world_size {
            return Err(Error::invalid(format!(
                "rank {} is not below world size {}",
                config.rank, config.world_size
            )));
        }
        let names: Vec<String> = sequences.keys().cloned().collect();
        let weights = normalized_weights(weights, &names)?;
        let rng_seed = derive_seed(&[
            b"draw",
            &config.seed.to_le_bytes(),
            &(config.rank as u64).to_le_bytes(),
        ]);
        let state = SamplerState {
            domains: sequences
                .iter()
                .map(|(k, &n)| {
                    (
                        k.clone(),
                        DomainCursor {
                            sequences: n,
                            epoch: 0,
                            cursor: 0,
                            drawn: 0,
                        },
                    )
                })
                .collect(),
            history: vec![WeightUpdate {
                step: 0,
                weights: weights.clone(),
                losses: None,
            }],
            weights,
            rng: Pcg64Mcg::seed_from_u64(rng_seed),
            draws: 0,
            warnings: vec![],
            config,
        };
        Ok(Self::from_state(state))
    }

    fn from_state(state: SamplerState) -> Self {
        let shares = state
            .domains
            .iter()
            .map(|(k, c)| (k.clone(), share(&state.config, k, c.sequences, c.epoch)))
            .collect();
        DomainSampler { state, shares }
    }

    /// Continue from a saved state. `sequences` must describe the same data (checked).
    pub fn restore(state: SamplerState, sequences: &BTreeMap<String, u64>) -> Result<Self> {
        let saved: BTreeMap<String, u64> = state
            .domains
            .iter()
            .map(|(k, c)| (k.clone(), c.sequences))
            .collect();
        if &saved != sequences {
            return Err(Error::invalid(format!(
                "the sampler state was saved for other data (domains and sequences {saved:?}, now {sequences:?})"
            )));
        }
        state.validate().map_err(Error::invalid)?;
        Ok(Self::from_state(state))
    }

    /// The state to save.
    pub fn state(&self) -> &SamplerState {
        &self.state
    }

    /// Current weights.
    pub fn weights(&self) -> &BTreeMap<String, f64> {
        &self.state.weights
    }

    /// Replace the weights from optimizer step `step` on (dynamic batch loading), recording
    /// the update and the losses behind it.
    pub fn set_weights(
        &mut self,
        step: u64,
        weights: &BTreeMap<String, f64>,
        losses: Option<&BTreeMap<String, f64>>,
    ) -> Result<()> {
        let names: Vec<String> = self.state.domains.keys().cloned().collect();
        let w = normalized_weights(weights, &names)?;
        self.state.weights = w.clone();
        self.state.history.push(WeightUpdate {
            step,
            weights: w,
            losses: losses.cloned(),
        });
        Ok(())
    }

    /// The next sequence.
    pub fn draw(&mut self) -> Result<Draw> {
        let u: f64 = self.state.rng.random();
        let mut acc = 0.0;
        let mut chosen = None;
        let mut last_positive = None;
        for (name, w) in &self.state.weights {
            if *w > 0.0 {
                last_positive = Some(name.clone());
                acc += w;
                if u < acc {
                    chosen = Some(name.clone());
                    break;
                }
            }
        }
        // Rounding can leave u just above the cumulative sum: take the last domain with weight.
        let domain = chosen.or(last_positive).expect("weights sum to one");
        let cfg = self.state.config.clone();
        let cursor = self.state.domains.get_mut(&domain).expect("known domain");
        if cursor.cursor as usize >= self.shares[&domain].len() {
            match cfg.exhaustion {
                Exhaustion::Error => {
                    return Err(Error::invalid(format!(
                        "domain '{domain}' ran out of data: this rank drew all {} of its {} sequences (the domain has {} over {} rank(s)) in epoch {}; add data, lower its weight, or set exhaustion = \"wrap\"",
                        cursor.cursor,
                        self.shares[&domain].len(),
                        cursor.sequences,
                        cfg.world_size,
                        cursor.epoch
                    )))
                }
                Exhaustion::Wrap => {
                    cursor.epoch += 1;
                    cursor.cursor = 0;
                    self.state.warnings.push(format!(
                        "domain '{domain}' ran out of data after {} draws and starts epoch {}: its sequences are repeated",
                        cursor.drawn, cursor.epoch
                    ));
                    let s = share(&cfg, &domain, cursor.sequences, cursor.epoch);
                    if s.is_empty() {
                        return Err(Error::invalid(format!("domain '{domain}' has no train sequence for rank {}", cfg.rank)));
                    }
                    self.shares.insert(domain.clone(), s);
                }
            }
        }
        let cursor = self.state.domains.get_mut(&domain).expect("known domain");
        let index = self.shares[&domain][cursor.cursor as usize];
        cursor.cursor += 1;
        cursor.drawn += 1;
        self.state.draws += 1;
        Ok(Draw { domain, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(v: &[(&str, u64)]) -> BTreeMap<String, u64> {
        v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }
    fn weights(v: &[(&str, f64)]) -> BTreeMap<String, f64> {
        v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    #[test]
    fn mix_matches_weights() {
        let w = weights(&[("a", 0.5), ("b", 0.3), ("c", 0.2)]);
        let mut s = DomainSampler::new(
            SamplerConfig {
                exhaustion: Exhaustion::Wrap,
                ..Default::default()
            },
            &sizes(&[("a", 100), ("b", 100), ("c", 100)]),
            &w,
        )
        .unwrap();
        let n = 30_000;
        let mut counts: BTreeMap<String, f64> = BTreeMap::new();
        for _ in 0..n {
            *counts.entry(s.draw().unwrap().domain).or_default() += 1.0;
        }
        // Pearson chi-square with 2 degrees of freedom; 13.8 is its 0.999 quantile.
        let chi2: f64 = w
            .iter()
            .map(|(k, p)| (counts[k] - p * n as f64).powi(2) / (p * n as f64))
            .sum();
        assert!(chi2 < 13.8, "chi2 {chi2}, counts {counts:?}");
    }

    #[test]
    fn ranks_partition_each_domain() {
        let sz = sizes(&[("a", 101), ("b", 37)]);
        let w = weights(&[("a", 0.5), ("b", 0.5)]);
        let mut seen = std::collections::HashSet::new();
        for rank in 0..3 {
            let cfg = SamplerConfig {
                seed: 4,
                rank,
                world_size: 3,
                exhaustion: Exhaustion::Error,
            };
            let mut s = DomainSampler::new(cfg, &sz, &w).unwrap();
            loop {
                match s.draw() {
                    Ok(d) => assert!(seen.insert((d.domain, d.index)), "drawn twice"),
                    Err(e) => {
                        assert!(e.to_string().contains("ran out of data"), "{e}");
                        break;
                    }
                }
            }
            // Drain the other domain too.
            let mut only = s.state().clone();
            for (k, v) in only.weights.iter_mut() {
                *v = if s.state().domains[k].cursor as usize >= s.shares[k].len() {
                    0.0
                } else {
                    1.0
                };
            }
            if only.weights.values().any(|w| *w > 0.0) {
                let mut s2 = DomainSampler::restore(only, &sz).unwrap();
                while let Ok(d) = s2.draw() {
                    assert!(seen.insert((d.domain, d.index)), "drawn twice");
                }
            }
        }
        assert_eq!(
            seen.len(),
            138,
            "every sequence exactly once over the ranks"
        );
    }

    #[test]
    fn wrap_starts_a_new_epoch_with_a_warning() {
        let mut s = DomainSampler::new(
            SamplerConfig {
                exhaustion: Exhaustion::Wrap,
                ..Default::default()
            },
            &sizes(&[("a", 5)]),
            &weights(&[("a", 1.0)]),
        )
        .unwrap();
        let first: Vec<u64> = (0..5).map(|_| s.draw().unwrap().index).collect();
        let second: Vec<u64> = (0..5).map(|_| s.draw().unwrap().index).collect();
        let mut a = first.clone();
        a.sort();
        assert_eq!(a, vec![0, 1, 2, 3, 4]);
        assert_ne!(first, second, "a new epoch has a new order");
        assert_eq!(s.state().domains["a"].epoch, 1);
        assert!(s.state().warnings[0].contains("starts epoch 1"));
    }

    #[test]
    fn weights_are_named() {
        let sz = sizes(&[("a", 5), ("b", 5)]);
        let e = DomainSampler::new(
            SamplerConfig::default(),
            &sz,
            &weights(&[("a", 1.0), ("c", 1.0)]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no weight for domain 'b'"), "{e}");
        let e = DomainSampler::new(
            SamplerConfig::default(),
            &sz,
            &weights(&[("a", 1.0), ("b", -1.0)]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("non-negative"), "{e}");
        let s = DomainSampler::new(
            SamplerConfig::default(),
            &sz,
            &weights(&[("a", 1.0), ("b", 1.0)]),
        )
        .unwrap();
        let e =
            DomainSampler::restore(s.state().clone(), &sizes(&[("a", 5), ("b", 6)])).unwrap_err();
        assert!(e.to_string().contains("other data"), "{e}");
    }
}
