//! Dynamic batch loading (method §5): after each evaluation, domain weights move towards the
//! domains whose loss is furthest above its reference. The rule is a small trait with the
//! released code's rule (the default), the paper's rule and a constant baseline; reference losses
//! come from the plan, from the source model's own eval losses, or from a scaling-law fit.
//!
//! Weights, losses and references are maps keyed by domain name, never positional lists: a
//! mismatch is an error naming the domain (upstream #36's trap).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shears_core::{Error, Result};

/// Per-domain values, by name.
pub type DomainValues = BTreeMap<String, f64>;

/// How domain weights follow the losses.
pub trait ReweightRule {
    /// Name in plans and logs.
    fn name(&self) -> &'static str;
    /// New weights from the previous `weights`, this evaluation's `losses` and the `reference`.
    fn update(
        &self,
        weights: &DomainValues,
        losses: &DomainValues,
        reference: &DomainValues,
    ) -> Result<DomainValues>;
}

fn check_same_domains(weights: &DomainValues, other: &DomainValues, what: &str) -> Result<()> {
    for k in weights.keys() {
        if !other.contains_key(k) {
            return Err(Error::invalid(format!("no {what} for domain '{k}'")));
        }
    }
    for k in other.keys() {
        if !weights.contains_key(k) {
            return Err(Error::invalid(format!(
                "{what} given for unknown domain '{k}'"
            )));
        }
    }
    Ok(())
}

fn excess(
    losses: &DomainValues,
    reference: &DomainValues,
    weights: &DomainValues,
) -> Result<DomainValues> {
    check_same_domains(weights, losses, "loss")?;
    check_same_domains(weights, reference, "reference loss")?;
    Ok(weights
        .keys()
        .map(|k| (k.clone(), losses[k] - reference[k]))
        .collect())
}

/// The released code's rule (`update_type = "doremi"`): `a = softmax(ln w + η·(ℓ − ℓ_ref))`,
/// `w = (1 − c)·a + c/k`, renormalised. No clipping, so a domain below its reference loses weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CodeRule {
    /// Step size η (1.0).
    pub eta: f64,
    /// Smoothing c (1e-4): every weight stays at least c/k.
    pub smoothing: f64,
}

impl Default for CodeRule {
    fn default() -> Self {
        CodeRule {
            eta: 1.0,
            smoothing: 1e-4,
        }
    }
}

impl ReweightRule for CodeRule {
    fn name(&self) -> &'static str {
        "code"
    }
    fn update(
        &self,
        weights: &DomainValues,
        losses: &DomainValues,
        reference: &DomainValues,
    ) -> Result<DomainValues> {
        let diff = excess(losses, reference, weights)?;
        let logits: DomainValues = weights
            .iter()
            .map(|(k, w)| (k.clone(), w.ln() + self.eta * diff[k]))
            .collect();
        let max = logits.values().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.values().map(|l| (l - max).exp()).sum();
        let k = weights.len() as f64;
        let smoothed: DomainValues = logits
            .iter()
            .map(|(name, l)| {
                (
                    name.clone(),
                    (1.0 - self.smoothing) * (l - max).exp() / z + self.smoothing / k,
                )
            })
            .collect();
        let total: f64 = smoothed.values().sum();
        Ok(smoothed.into_iter().map(|(k, v)| (k, v / total)).collect())
    }
}

/// The paper's rule (Algorithm 1): `α = w ⊙ exp(max(ℓ − ℓ_ref, 0))`, `w = α / Σα`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PaperRule;

impl ReweightRule for PaperRule {
    fn name(&self) -> &'static str {
        "paper"
    }
    fn update(
        &self,
        weights: &DomainValues,
        losses: &DomainValues,
        reference: &DomainValues,
    ) -> Result<DomainValues> {
        let diff = excess(losses, reference, weights)?;
        let alpha: DomainValues = weights
            .iter()
            .map(|(k, w)| (k.clone(), w * diff[k].max(0.0).exp()))
            .collect();
        let total: f64 = alpha.values().sum();
        Ok(alpha.into_iter().map(|(k, v)| (k, v / total)).collect())
    }
}

/// Weights never change (the fixed-mixture baseline).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ConstantRule;

impl ReweightRule for ConstantRule {
    fn name(&self) -> &'static str {
        "constant"
    }
    fn update(
        &self,
        weights: &DomainValues,
        losses: &DomainValues,
        reference: &DomainValues,
    ) -> Result<DomainValues> {
        excess(losses, reference, weights)?;
        Ok(weights.clone())
    }
}

/// The rule as a plan names it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "lowercase")]
pub enum RuleConfig {
    Code {
        #[serde(default = "one")]
        eta: f64,
        #[serde(default = "smoothing")]
        smoothing: f64,
    },
    Paper,
    Constant,
}

fn one() -> f64 {
    1.0
}
fn smoothing() -> f64 {
    1e-4
}

impl Default for RuleConfig {
    fn default() -> Self {
        RuleConfig::Code {
            eta: 1.0,
            smoothing: 1e-4,
        }
    }
}

impl RuleConfig {
    /// The rule object.
    pub fn build(&self) -> Box<dyn ReweightRule + Send + Sync> {
        match *self {
            RuleConfig::Code { eta, smoothing } => Box::new(CodeRule { eta, smoothing }),
            RuleConfig::Paper => Box::new(PaperRule),
            RuleConfig::Constant => Box::new(ConstantRule),
        }
    }
}

/// One model's per-domain losses, for a scaling-law fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingPoint {
    /// Total parameters of the model (embeddings included).
    pub params: f64,
    pub losses: DomainValues,
}

/// Where reference losses come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum ReferenceSource {
    /// Numbers given in the plan.
    Given { losses: DomainValues },
    /// The source model's own per-domain eval loss, measured at the start of the run (the
    /// authors' recommendation with fewer than three model sizes, issue #13).
    SourceModel,
    /// A fit `ℓ(N) = a / N^b + c` per domain through three or more models, evaluated at the
    /// target's total parameter count (method §5.4).
    ScalingLaw {
        points: Vec<ScalingPoint>,
        target_params: f64,
    },
}

impl ReferenceSource {
    /// The reference losses; `source_model_losses` is needed for [`ReferenceSource::SourceModel`].
    pub fn resolve(&self, source_model_losses: Option<&DomainValues>) -> Result<DomainValues> {
        match self {
            ReferenceSource::Given { losses } => Ok(losses.clone()),
            ReferenceSource::SourceModel => source_model_losses.cloned().ok_or_else(|| {
                Error::invalid(
                    "reference losses from the source model need its measured eval losses",
                )
            }),
            ReferenceSource::ScalingLaw {
                points,
                target_params,
            } => {
                if points.len() < 3 {
                    return Err(Error::invalid(format!(
                        "a scaling-law fit needs at least 3 models, got {}; use the source model's losses instead",
                        points.len()
                    )));
                }
                let domains: Vec<&String> = points[0].losses.keys().collect();
                for p in points {
                    check_same_domains(&points[0].losses, &p.losses, "scaling-law loss")?;
                }
                domains
                    .into_iter()
                    .map(|d| {
                        let xy: Vec<(f64, f64)> =
                            points.iter().map(|p| (p.params, p.losses[d])).collect();
                        let law = ScalingLaw::fit(&xy)
                            .map_err(|m| Error::invalid(format!("domain '{d}': {m}")))?;
                        Ok((d.clone(), law.at(*target_params)))
                    })
                    .collect()
            }
        }
    }
}

/// `ℓ(N) = a / N^b + c`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalingLaw {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

impl ScalingLaw {
    /// The loss at `n` parameters.
    pub fn at(&self, n: f64) -> f64 {
        self.a * n.powf(-self.b) + self.c
    }

    /// Least-squares fit by variable projection: for a given exponent `b` the best `a` and `c`
    /// solve a 2x2 linear system, so only `b` is searched (a scan over (0, 3] refined by
    /// golden-section search). With three points the fit interpolates, as scipy's `curve_fit`
    /// does in the reference notebook.
    pub fn fit(points: &[(f64, f64)]) -> std::result::Result<Self, String> {
        if points.len() < 3 {
            return Err("need at least 3 points".into());
        }
        if points
            .iter()
            .any(|(n, l)| n.is_nan() || *n <= 0.0 || !l.is_finite())
        {
            return Err("parameter counts must be positive and losses finite".into());
        }
        let solve = |b: f64| -> (f64, f64, f64) {
            // Columns x = N^-b and 1; normal equations.
            let (mut sxx, mut sx, mut sxy, mut sy, n) = (0.0, 0.0, 0.0, 0.0, points.len() as f64);
            for &(p, l) in points {
                let x = p.powf(-b);
                sxx += x * x;
                sx += x;
                sxy += x * l;
                sy += l;
            }
            let det = sxx * n - sx * sx;
            if det.abs() < 1e-300 {
                return (0.0, sy / n, f64::INFINITY);
            }
            let a = (sxy * n - sx * sy) / det;
            let c = (sxx * sy - sx * sxy) / det;
            let sse: f64 = points
                .iter()
                .map(|&(p, l)| (a * p.powf(-b) + c - l).powi(2))
                .sum();
            (a, c, sse)
        };
        let (mut best_b, mut best) = (0.0, f64::INFINITY);
        let steps = 3000;
        for i in 1..=steps {
            let b = 3.0 * i as f64 / steps as f64;
            let sse = solve(b).2;
            if sse < best {
                best = sse;
                best_b = b;
            }
        }
        let (mut lo, mut hi) = ((best_b - 0.001).max(1e-6), best_b + 0.001);
        let g = (5f64.sqrt() - 1.0) / 2.0;
        for _ in 0..200 {
            let m1 = hi - g * (hi - lo);
            let m2 = lo + g * (hi - lo);
            if solve(m1).2 < solve(m2).2 {
                hi = m2;
            } else {
                lo = m1;
            }
        }
        let b = (lo + hi) / 2.0;
        let (a, c, _) = solve(b);
        Ok(ScalingLaw { a, b, c })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(v: &[(&str, f64)]) -> DomainValues {
        v.iter().map(|(k, x)| (k.to_string(), *x)).collect()
    }

    #[test]
    fn code_rule_by_hand() {
        let w = vals(&[("a", 0.5), ("b", 0.25), ("c", 0.25)]);
        let l = vals(&[("a", 2.0), ("b", 3.0), ("c", 1.0)]);
        let r = vals(&[("a", 2.0), ("b", 2.0), ("c", 2.0)]);
        let out = CodeRule::default().update(&w, &l, &r).unwrap();
        // softmax(ln w + diff): 0.5·e^0, 0.25·e^1, 0.25·e^-1, normalised, then smoothed.
        let raw = [0.5, 0.25 * 1f64.exp(), 0.25 * (-1f64).exp()];
        let z: f64 = raw.iter().sum();
        let want: Vec<f64> = raw
            .iter()
            .map(|x| (1.0 - 1e-4) * x / z + 1e-4 / 3.0)
            .collect();
        for (k, w) in ["a", "b", "c"].iter().zip(want) {
            assert!((out[*k] - w).abs() < 1e-12, "{k}: {} vs {w}", out[*k]);
        }
        assert!((out.values().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn paper_rule_by_hand_clips_at_zero() {
        let w = vals(&[("a", 0.5), ("b", 0.25), ("c", 0.25)]);
        let l = vals(&[("a", 2.0), ("b", 3.0), ("c", 1.0)]);
        let r = vals(&[("a", 2.0), ("b", 2.0), ("c", 2.0)]);
        let out = PaperRule.update(&w, &l, &r).unwrap();
        let z = 0.5 + 0.25 * 1f64.exp() + 0.25;
        assert!((out["a"] - 0.5 / z).abs() < 1e-12);
        assert!((out["b"] - 0.25 * 1f64.exp() / z).abs() < 1e-12);
        assert!(
            (out["c"] - 0.25 / z).abs() < 1e-12,
            "below reference: factor exp(0) = 1"
        );
        assert_eq!(ConstantRule.update(&w, &l, &r).unwrap(), w);
    }

    #[test]
    fn code_rule_keeps_a_floor() {
        let mut w = vals(&[("a", 0.98), ("b", 0.01), ("c", 0.01)]);
        let l = vals(&[("a", 30.0), ("b", 0.0), ("c", 0.0)]);
        let r = vals(&[("a", 0.0), ("b", 0.0), ("c", 0.0)]);
        for _ in 0..50 {
            w = CodeRule::default().update(&w, &l, &r).unwrap();
            assert!((w.values().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(
                w.values().all(|x| *x >= 1e-4 / 3.0 * (1.0 - 1e-12)),
                "{w:?}"
            );
        }
    }

    #[test]
    fn domains_are_matched_by_name() {
        let w = vals(&[("book", 0.5), ("c4", 0.5)]);
        let l = vals(&[("book", 1.0), ("wiki", 1.0)]);
        let e = CodeRule::default()
            .update(&w, &l, &w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no loss for domain 'c4'"), "{e}");
        let l = vals(&[("book", 1.0), ("c4", 1.0), ("wiki", 1.0)]);
        let e = PaperRule.update(&w, &l, &w).unwrap_err().to_string();
        assert!(e.contains("unknown domain 'wiki'"), "{e}");
    }

    #[test]
    fn scaling_law_reproduces_the_reference_losses() {
        // Spec §5.4: LLaMA2 7B / 13B / 70B validation losses per domain, fitted and evaluated at
        // the targets' total parameter counts.
        let names = [
            "cc",
            "github",
            "book",
            "stackexchange",
            "wiki",
            "arxiv",
            "c4",
        ];
        let l7 = [1.7520, 0.6216, 1.9063, 1.4482, 1.4844, 1.2637, 1.9219];
        let l13 = [1.6680, 0.5791, 1.8242, 1.3936, 1.3945, 1.2109, 1.8486];
        let l70 = [1.4621, 0.4890, 1.6450, 1.2805, 1.2118, 1.1148, 1.6848];
        let point = |n: f64, l: &[f64]| ScalingPoint {
            params: n,
            losses: names
                .iter()
                .zip(l)
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        };
        let points = vec![
            point(6_738_415_616.0, &l7),
            point(13_015_864_320.0, &l13),
            point(68_976_648_192.0, &l70),
        ];
        for (target, want) in [
            (
                1_345_423_360.0,
                [1.9643, 0.7459, 2.1393, 1.6117, 1.7590, 1.4449, 2.1251],
            ),
            (
                2_701_560_320.0,
                [1.8712, 0.6883, 2.0325, 1.5353, 1.6297, 1.3560, 2.0328],
            ),
        ] {
            let src = ReferenceSource::ScalingLaw {
                points: points.clone(),
                target_params: target,
            };
            let got = src.resolve(None).unwrap();
            for (k, w) in names.iter().zip(want) {
                assert!(
                    (got[*k] - w).abs() < 5e-4,
                    "{k} at {target}: {} vs {w}",
                    got[*k]
                );
            }
        }
        let two = ReferenceSource::ScalingLaw {
            points: points[..2].to_vec(),
            target_params: 1e9,
        };
        assert!(two
            .resolve(None)
            .unwrap_err()
            .to_string()
            .contains("at least 3"));
        assert!(ReferenceSource::SourceModel.resolve(None).is_err());
    }
}
