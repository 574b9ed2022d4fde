//! A task's metrics from its scored requests: lm-eval's `acc`, `acc_norm` (per byte) and
//! OLMES' `acc_per_char` for multiple choice, greedy accuracy, perplexity and bits per byte for
//! LAMBADA, macro averages over subtasks, and the per-document samples.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shears_core::{Error, Result};

use super::requests::Request;
use super::scoring::Scored;

/// A task's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    /// Documents.
    pub n: usize,
    pub requests: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    /// Multiple choice: argmax of log-prob per byte (lm-eval's `acc_norm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm_stderr: Option<f64>,
    /// Multiple choice: argmax of log-prob per character (OLMES).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_per_char: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_per_char_stderr: Option<f64>,
    /// LAMBADA: `exp(−mean per-document log-likelihood)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// LAMBADA: `−Σ log-likelihood / (Σ bytes · ln 2)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_byte: Option<f64>,
    /// The task's primary metric (from the package's config) and its value; with
    /// `subtasks`, the macro average of the subtasks' values (the other fields stay micro
    /// averages over all documents).
    pub primary_metric: String,
    pub primary: f64,
    /// Per-subtask metrics (MMLU's subjects) when the requests carry groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtasks: Option<BTreeMap<String, TaskMetrics>>,
}

/// Mean and its standard error `sqrt(Σ(x − mean)² / (n − 1) / n)` (lm-eval's `mean_stderr`).
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

fn argmax(v: &[f64]) -> usize {
    // The first maximum, as numpy's argmax.
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Whether the gold choice wins by total log-prob, per byte and per character (1 or 0 each).
fn choice_hits(items: &[(&Request, &Scored)], label: usize) -> [f64; 3] {
    let ll: Vec<f64> = items.iter().map(|(_, s)| s.sum_logprob).collect();
    let by_bytes: Vec<f64> = items
        .iter()
        .map(|(_, s)| s.sum_logprob / s.cont_bytes.max(1) as f64)
        .collect();
    let by_chars: Vec<f64> = items
        .iter()
        .map(|(_, s)| s.sum_logprob / s.cont_chars.max(1) as f64)
        .collect();
    [ll, by_bytes, by_chars].map(|v| (argmax(&v) == label) as u8 as f64)
}

/// A document's gold answer: the choice index, or the continuation text (LAMBADA).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Target {
    Choice(usize),
    Text(String),
}

/// One document in lm-evaluation-harness's sample layout, for `--log-samples`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub doc_id: u64,
    /// `[context, continuation]` per request.
    pub arguments: Vec<(String, String)>,
    /// Per request, lm-eval's `[[str(log-likelihood), str(is_greedy)]]`.
    pub resps: Vec<Vec<(String, &'static str)>>,
    /// Per request, `[str(log-likelihood), str(is_greedy)]`.
    pub filtered_resps: Vec<(String, &'static str)>,
    pub target: Target,
    /// Multiple choice: whether the gold choice wins by log-prob; LAMBADA: greedy match.
    pub acc: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_per_char: Option<f64>,
    /// LAMBADA: the document's log-likelihood (lm-eval's per-document `perplexity` input).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
}

/// One record per document in lm-evaluation-harness's sample layout (`doc_id`, `target`,
/// `arguments` as `[context, continuation]` pairs, `resps` / `filtered_resps` as
/// `[log-likelihood, is_greedy]`, and the document's metric values), for `--log-samples`.
pub fn samples(requests: &[Request], scored: &[Scored]) -> Vec<Sample> {
    let mut docs: BTreeMap<u64, Vec<(&Request, &Scored)>> = BTreeMap::new();
    for (r, s) in requests.iter().zip(scored) {
        docs.entry(r.doc_id).or_default().push((r, s));
    }
    docs.into_iter()
        .map(|(doc_id, mut items)| {
            items.sort_by_key(|(r, _)| r.idx);
            // lm-eval writes each response as Python's str() of (log-likelihood, is_greedy).
            let py_bool = |b: bool| if b { "True" } else { "False" };
            let filtered_resps: Vec<(String, &'static str)> = items
                .iter()
                .map(|(_, s)| (s.sum_logprob.to_string(), py_bool(s.is_greedy)))
                .collect();
            let mut sample = Sample {
                doc_id,
                arguments: items
                    .iter()
                    .map(|(r, _)| (r.full_context(), r.continuation.clone()))
                    .collect(),
                resps: filtered_resps.iter().map(|r| vec![r.clone()]).collect(),
                filtered_resps,
                target: Target::Text(String::new()),
                acc: 0.0,
                acc_norm: None,
                acc_per_char: None,
                perplexity: None,
            };
            match items[0].0.label {
                Some(label) if label < items.len() => {
                    let [a, n, c] = choice_hits(&items, label);
                    sample.target = Target::Choice(label);
                    (sample.acc, sample.acc_norm, sample.acc_per_char) = (a, Some(n), Some(c));
                }
                _ => {
                    let greedy = items.iter().all(|(_, s)| s.is_greedy);
                    sample.target =
                        Target::Text(items.iter().map(|(r, _)| r.continuation.as_str()).collect());
                    sample.acc = greedy as u8 as f64;
                    sample.perplexity = Some(items.iter().map(|(_, s)| s.sum_logprob).sum());
                }
            }
            sample
        })
        .collect()
}

/// Metrics of one task from its requests and their scores (same order). Requests with a
/// `group` are also scored per group, and the primary value is the groups' macro average.
pub fn metrics(
    requests: &[Request],
    scored: &[Scored],
    primary_metric: &str,
) -> Result<TaskMetrics> {
    let mut m = flat_metrics(requests, scored, primary_metric)?;
    let mut groups: BTreeMap<&str, (Vec<Request>, Vec<Scored>)> = BTreeMap::new();
    for (r, s) in requests.iter().zip(scored) {
        if let Some(g) = &r.group {
            let e = groups.entry(g.as_str()).or_default();
            e.0.push(r.clone());
            e.1.push(s.clone());
        }
    }
    if groups.is_empty() {
        return Ok(m);
    }
    let mut subtasks = BTreeMap::new();
    for (g, (rs, ss)) in groups {
        subtasks.insert(g.to_string(), flat_metrics(&rs, &ss, primary_metric)?);
    }
    m.primary = subtasks.values().map(|t| t.primary).sum::<f64>() / subtasks.len() as f64;
    m.subtasks = Some(subtasks);
    Ok(m)
}

fn flat_metrics(
    requests: &[Request],
    scored: &[Scored],
    primary_metric: &str,
) -> Result<TaskMetrics> {
    let mut docs: BTreeMap<u64, Vec<(&Request, &Scored)>> = BTreeMap::new();
    for (r, s) in requests.iter().zip(scored) {
        docs.entry(r.doc_id).or_default().push((r, s));
    }
    let multiple_choice = requests.iter().all(|r| r.label.is_some());
    if multiple_choice {
        let (mut acc, mut norm, mut per_char) = (vec![], vec![], vec![]);
        for (id, mut items) in docs {
            items.sort_by_key(|(r, _)| r.idx);
            let label = items[0].0.label.expect("label");
            if label >= items.len() {
                return Err(Error::invalid(format!(
                    "document {id}: label {label} but only {} choices",
                    items.len()
                )));
            }
            let [a, n, c] = choice_hits(&items, label);
            acc.push(a);
            norm.push(n);
            per_char.push(c);
        }
        let (a, ae) = mean_stderr(&acc);
        let (n, ne) = mean_stderr(&norm);
        let (c, ce) = mean_stderr(&per_char);
        let primary = match primary_metric {
            "acc_norm" => n,
            "acc_per_char" => c,
            _ => a,
        };
        Ok(TaskMetrics {
            n: acc.len(),
            requests: requests.len(),
            acc: a,
            acc_stderr: ae,
            acc_norm: Some(n),
            acc_norm_stderr: Some(ne),
            acc_per_char: Some(c),
            acc_per_char_stderr: Some(ce),
            perplexity: None,
            bits_per_byte: None,
            primary_metric: primary_metric.to_string(),
            primary,
            subtasks: None,
        })
    } else {
        let mut acc = vec![];
        let (mut ll_sum, mut bytes, mut lls) = (0.0, 0usize, vec![]);
        for items in docs.values() {
            let greedy = items.iter().all(|(_, s)| s.is_greedy);
            let ll: f64 = items.iter().map(|(_, s)| s.sum_logprob).sum();
            acc.push(greedy as u8 as f64);
            lls.push(ll);
            ll_sum += ll;
            bytes += items.iter().map(|(_, s)| s.cont_bytes).sum::<usize>();
        }
        let (a, ae) = mean_stderr(&acc);
        let ppl = (-lls.iter().sum::<f64>() / lls.len() as f64).exp();
        Ok(TaskMetrics {
            n: acc.len(),
            requests: requests.len(),
            acc: a,
            acc_stderr: ae,
            acc_norm: None,
            acc_norm_stderr: None,
            acc_per_char: None,
            acc_per_char_stderr: None,
            perplexity: Some(ppl),
            bits_per_byte: Some(-ll_sum / (bytes.max(1) as f64 * std::f64::consts::LN_2)),
            primary_metric: "acc".into(),
            primary: a,
            subtasks: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(doc: u64, idx: usize, label: usize, cont: &str) -> Request {
        Request::new(doc, idx, Some(label), "Q:".into(), cont)
    }

    fn sc(r: &Request, ll: f64) -> Scored {
        Scored {
            doc_id: r.doc_id,
            idx: r.idx,
            ctx_ids: vec![],
            ctx_tokens: 1,
            cont_ids: vec![],
            token_logprobs: vec![ll],
            sum_logprob: ll,
            is_greedy: false,
            cont_chars: r.continuation.chars().count(),
            cont_bytes: r.continuation.len(),
            shared_tokens: 0,
            context_cut: false,
        }
    }

    #[test]
    fn acc_norm_and_per_char_follow_their_lengths() {
        // Doc 0: raw log-prob prefers the short choice; per byte/char the long one (the gold).
        // Doc 1: "é" is 2 bytes but 1 character: per byte prefers choice 0, per char choice 1.
        // Doc 2: everything prefers the gold.
        let rs = vec![
            req(0, 0, 1, " a"),
            req(0, 1, 1, " abcdefgh"),
            req(1, 0, 0, " éé"),
            req(1, 1, 0, " xyz"),
            req(2, 0, 0, " yes"),
            req(2, 1, 0, " no"),
        ];
        let lls = [-2.0, -4.0, -6.0, -7.0, -1.0, -5.0];
        let ss: Vec<Scored> = rs.iter().zip(lls).map(|(r, l)| sc(r, l)).collect();
        let m = metrics(&rs, &ss, "acc_per_char").unwrap();
        assert_eq!(m.n, 3);
        // acc: doc0 picks 0 (wrong), doc1 picks 0 (right), doc2 right → 2/3.
        assert!((m.acc - 2.0 / 3.0).abs() < 1e-12);
        // bytes: doc0 -2/2=-1 vs -4/9 → 1 (right); doc1 -6/5=-1.2 vs -7/4 → 0 (right); doc2 right.
        assert_eq!(m.acc_norm, Some(1.0));
        // chars: doc1 -6/3=-2 vs -7/4=-1.75 → 1 (wrong) → 2/3.
        assert!((m.acc_per_char.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.primary, m.acc_per_char.unwrap());
        // stderr of {0,1,1}: sqrt(var/n) with var = (4/9 + 1/9 + 1/9)/2 = 1/3 → sqrt(1/9) = 1/3.
        assert!((m.acc_stderr - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.acc_norm_stderr, Some(0.0));
    }

    #[test]
    fn stderr_formula() {
        let (m, s) = mean_stderr(&[1.0, 0.0, 0.0, 1.0]);
        assert_eq!(m, 0.5);
        assert!((s - (1.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn a_label_out_of_range_is_an_error() {
        let rs = vec![req(0, 0, 3, " a"), req(0, 1, 3, " b")];
        let ss: Vec<Scored> = rs.iter().map(|r| sc(r, -1.0)).collect();
        assert!(metrics(&rs, &ss, "acc")
            .unwrap_err()
            .to_string()
            .contains("label 3"));
    }

    #[test]
    fn samples_have_lm_eval_fields() {
        let rs = vec![
            req(4, 0, 1, " a"),
            req(4, 1, 1, " bb"),
            req(7, 0, 0, " c"),
            req(7, 1, 0, " d"),
        ];
        let lls = [-3.0, -1.0, -2.0, -0.5];
        let ss: Vec<Scored> = rs.iter().zip(lls).map(|(r, ll)| sc(r, ll)).collect();
        let s: Vec<serde_json::Value> = samples(&rs, &ss)
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0]["doc_id"], 4);
        assert_eq!(s[0]["target"], 1);
        assert_eq!(s[0]["acc"], 1.0);
        assert_eq!(s[1]["acc"], 0.0);
        assert_eq!(s[0]["arguments"][1], serde_json::json!(["Q:", " bb"]));
        assert_eq!(
            s[0]["filtered_resps"][0],
            serde_json::json!(["-3", "False"])
        );
        assert_eq!(s[0]["resps"][0], serde_json::json!([["-3", "False"]]));
    }
}
