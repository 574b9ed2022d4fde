//! Scoring requests with a model: lm-eval's encoding of each (context, continuation) pair,
//! then either a context shared by several requests run once with every continuation from its
//! KV cache (`Scorer::group`, prefix reuse), or each request whole (`Scorer::whole`). Only
//! what the model can see is ever tokenized, and a document's context is tokenized once for
//! all its requests.

use std::cmp::Reverse;
use std::ops::Range;
use std::sync::Arc;

use burn::tensor::{activation, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use shears_core::{Error, Result, Tokenizer};
use shears_models::{ForwardMasks, KvCache, Llama, ShearsOps};

use super::requests::Request;

/// A scored request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub doc_id: u64,
    pub idx: usize,
    /// The context's ids (only with [`ScoreSettings::keep_ids`]; empty otherwise).
    pub ctx_ids: Vec<u32>,
    /// Tokens of the context as scored.
    #[serde(default)]
    pub ctx_tokens: usize,
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
    /// The context was longer than the model can see and only its end was tokenized.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub context_cut: bool,
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
    /// Keep every request's context ids in [`Scored::ctx_ids`] (for logged samples); without
    /// it a task's scores hold no context-sized data.
    pub keep_ids: bool,
}

impl Default for ScoreSettings {
    fn default() -> Self {
        ScoreSettings {
            batch: 16,
            prefix_reuse: true,
            keep_ids: false,
        }
    }
}

/// lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation;
/// the continuation's ids are `tok(ctx + cont)[len(tok(ctx)):]`. An empty context becomes the
/// end-of-text token.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let ctx = EncodedContext {
        ws: context[trimmed.len()..].to_string(),
        ids: tok.encode(trimmed, false)?,
        text: trimmed.to_string(),
        cut: false,
    };
    let cont = Encoder::continuation(tok, &ctx, continuation)?;
    Ok((ctx.scored_ids(eos_id(tok)), cont))
}

/// The end-of-text id (lm-eval's prefix for an empty context; also the padding here).
fn eos_id(tok: &Tokenizer) -> u32 {
    tok.eos_token()
        .and_then(|t| tok.token_to_id(&t))
        .or_else(|| tok.token_to_id("<|endoftext|>"))
        .unwrap_or(0)
}

/// Tokens tokenized beyond what the model can see when a context is cut: the first tokens of a
/// text cut in the middle may differ from the whole text's, and these lie before the window.
const CUT_MARGIN: usize = 64;

/// A context as scored: its text without the trailing whitespace (which lm-eval moves to the
/// continuation), that whitespace, and its ids.
#[derive(Debug)]
struct EncodedContext {
    text: String,
    ws: String,
    ids: Vec<u32>,
    /// Only the end of the context was tokenized (it is longer than the model can see).
    cut: bool,
}

impl EncodedContext {
    /// The ids the model reads: the end-of-text token for an empty context (lm-eval).
    fn scored_ids(&self, eos: u32) -> Vec<u32> {
        if self.ids.is_empty() {
            vec![eos]
        } else {
            self.ids.clone()
        }
    }
}

/// lm-eval's encoding on at most what the model can see: a context is left-cut before it is
/// tokenized to the bytes its last `max_len` tokens can span (plus a margin), so a huge context
/// costs what the model reads, not its size.
struct Encoder<'a> {
    tok: &'a Tokenizer,
    max_len: usize,
    /// Bytes of context tokenized at first; more when they give too few tokens.
    budget: usize,
    eos: u32,
}

impl<'a> Encoder<'a> {
    fn new(tok: &'a Tokenizer, max_len: usize) -> Self {
        Encoder {
            tok,
            max_len,
            budget: (max_len + 2 * CUT_MARGIN).saturating_mul(tok.longest_token_bytes()),
            eos: eos_id(tok),
        }
    }

    /// The request's context, tokenized once for all the requests that share it.
    fn context(&self, r: &Request) -> Result<EncodedContext> {
        let mut budget = self.budget;
        loop {
            let (mut text, cut) = r.context_tail(budget);
            let trimmed = text.trim_end().len();
            let ws = text[trimmed..].to_string();
            text.truncate(trimmed);
            let ids = self.tok.encode(&text, false)?;
            // A cut context must still fill the window past the margin; a tokenizer whose
            // tokens span more bytes than its longest token string (a normalizer that drops
            // characters) gets a larger piece, up to the whole context.
            if !cut || ids.len() >= self.max_len + CUT_MARGIN {
                return Ok(EncodedContext { text, ws, ids, cut });
            }
            budget = budget.saturating_mul(4);
        }
    }

    /// The continuation's ids after `ctx` (lm-eval: `tok(ctx + cont)[len(tok(ctx)):]`).
    fn continuation(tok: &Tokenizer, ctx: &EncodedContext, cont: &str) -> Result<Vec<u32>> {
        let whole = tok.encode(&format!("{}{}{cont}", ctx.text, ctx.ws), false)?;
        Ok(whole[ctx.ids.len().min(whole.len())..].to_vec())
    }

    fn pair(&self, ctx: &EncodedContext, r: &Request) -> Result<Vec<u32>> {
        Self::continuation(self.tok, ctx, &r.continuation)
    }

    /// lm-eval's rule, before any forward: a continuation must fit the model's context (its
    /// first token needs at least the last context token before it). Only continuations long
    /// enough in bytes to possibly break it are tokenized for the check.
    fn check_continuations(&self, requests: &[Request]) -> Result<()> {
        for r in requests {
            // Fewer bytes than a quarter of the window cannot make too many tokens (a token
            // is at least a byte; the margin covers a boundary merge and normalizers that
            // expand characters); [`Self::fits`] checks every request again as it is scored.
            let ws = r.context.len() - r.context.trim_end().len();
            if 4 * (r.continuation.len() + ws + 1) <= self.max_len {
                continue;
            }
            self.fits(r, &self.pair(&self.context(r)?, r)?)?;
        }
        Ok(())
    }

    fn fits(&self, r: &Request, cont: &[u32]) -> Result<()> {
        if cont.len() > self.max_len {
            return Err(Error::invalid(format!(
                "document {} choice {}: the continuation is {} tokens, longer than the model's context of {}",
                r.doc_id,
                r.idx,
                cont.len(),
                self.max_len
            )));
        }
        Ok(())
    }
}

/// The few-shot preamble last run: its text, its tokens and (when they start the contexts
/// that carry it) its KV cache.
struct Preamble<B: ShearsOps> {
    text: Arc<str>,
    ids: Vec<u32>,
    kv: Option<KvCache<B>>,
}

/// A model and how it scores.
struct Scorer<'a, B: ShearsOps> {
    model: &'a Llama<B>,
    masks: Option<&'a ForwardMasks<B>>,
    enc: Encoder<'a>,
    keep_ids: bool,
    device: B::Device,
}

/// Runs of consecutive requests that share a context (a document's choices).
fn documents(requests: &[Request]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = vec![];
    for (i, r) in requests.iter().enumerate() {
        match out.last_mut() {
            Some(d) if requests[d.start].same_context(r) => d.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Score `requests` with `model` in batches of `batch` (see [`score_with`]); context ids are
/// kept.
pub fn score<B: ShearsOps>(
    model: &Llama<B>,
    tok: &Tokenizer,
    requests: &[Request],
    batch: usize,
    progress: impl FnMut(usize),
) -> Result<Vec<Scored>> {
    let settings = ScoreSettings {
        batch,
        keep_ids: true,
        ..Default::default()
    };
    score_with::<B>(model, None, tok, requests, settings, progress)
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
    let sc = Scorer {
        model,
        masks,
        enc: Encoder::new(tok, model.config.max_position_embeddings.max(2)),
        keep_ids: settings.keep_ids,
        device: model.device(),
    };
    sc.enc.check_continuations(requests)?;
    let mut out: Vec<Option<Scored>> = vec![None; requests.len()];
    let mut done = 0;
    let mut whole = vec![];
    let mut preamble: Option<Preamble<B>> = None;
    for doc in documents(requests) {
        if !settings.prefix_reuse || doc.len() < 2 {
            whole.extend(doc);
            continue;
        }
        let ctx = sc.enc.context(&requests[doc.start])?;
        // Requests whose context and continuation fit the model together run as a group.
        let mut fit = vec![];
        for i in doc {
            let k = sc.enc.pair(&ctx, &requests[i])?;
            if !k.is_empty() && ctx.ids.len().max(1) + k.len() - 1 <= sc.enc.max_len {
                fit.push((i, k));
            } else {
                whole.push(i);
            }
        }
        if fit.len() < 2 {
            whole.extend(fit.into_iter().map(|f| f.0));
            continue;
        }
        done += fit.len();
        sc.group(requests, &ctx, fit, &mut preamble, &mut out)?;
        progress(done);
    }
    // Longest first, so batches hold similar lengths; results go back to request order.
    whole.sort_by_key(|&i| Reverse(requests[i].context_len() + requests[i].continuation.len()));
    for chunk in whole.chunks(settings.batch.max(1)) {
        sc.whole(requests, chunk, &mut out)?;
        done += chunk.len();
        progress(done);
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every request scored"))
        .collect())
}

impl<B: ShearsOps> Scorer<'_, B> {
    fn scored(
        &self,
        r: &Request,
        ctx: &EncodedContext,
        cont_ids: Vec<u32>,
        (token_logprobs, is_greedy): (Vec<f64>, bool),
        shared_tokens: usize,
    ) -> Scored {
        Scored {
            doc_id: r.doc_id,
            idx: r.idx,
            ctx_ids: if self.keep_ids {
                ctx.scored_ids(self.enc.eos)
            } else {
                vec![]
            },
            ctx_tokens: ctx.ids.len().max(1),
            cont_ids,
            sum_logprob: token_logprobs.iter().sum(),
            token_logprobs,
            is_greedy,
            cont_chars: r.continuation.chars().count(),
            cont_bytes: r.continuation.len(),
            shared_tokens,
            context_cut: ctx.cut,
        }
    }

    fn ids_tensor(&self, rows: &[&[u32]]) -> Tensor<B, 2, Int> {
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
        let pad = self.enc.eos as i64;
        let flat: Vec<i64> = rows
            .iter()
            .flat_map(|ids| {
                ids.iter()
                    .map(|&i| i as i64)
                    .chain(std::iter::repeat_n(pad, len - ids.len()))
                    .collect::<Vec<_>>()
            })
            .collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows.len(), len]), &self.device)
    }

    /// The hidden states of `rows`, continuing `cache` when given.
    fn hidden(&self, rows: &[&[u32]], cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.model
            .hidden_states_masked(self.ids_tensor(rows), cache, self.masks)
    }

    /// Where a context may start from the few-shot preamble's cache: a preamble shared with
    /// other documents runs once, and its cache is kept while the documents that start with it
    /// (contiguous in request order) go by. The cache holds the preamble's tokens as far as
    /// they agree with this context's own tokenization (a tokenizer may merge across the
    /// preamble's end: its last "\n\n" often does), and serves a context only if it starts
    /// with exactly those tokens, so scores do not change: keys and values of a causal prefix
    /// depend on that prefix alone. Returns the tokens it covers and the cache to continue.
    fn preamble_start(
        &self,
        r: &Request,
        ctx: &EncodedContext,
        preamble: &mut Option<Preamble<B>>,
    ) -> Result<(usize, KvCache<B>)> {
        let fresh = (0, self.model.new_cache());
        if r.preamble.is_empty() || r.context.trim_end().is_empty() || ctx.cut {
            return Ok(fresh);
        }
        let ids = &ctx.ids;
        if preamble
            .as_ref()
            .is_none_or(|p| !Arc::ptr_eq(&p.text, &r.preamble) && p.text != r.preamble)
        {
            let mut pre = self.enc.tok.encode(&r.preamble, false)?;
            let agree = pre.iter().zip(ids).take_while(|(a, b)| a == b).count();
            pre.truncate(agree.min(ids.len().saturating_sub(1)));
            let kv = (!pre.is_empty()).then(|| {
                let mut kv = self.model.new_cache();
                self.hidden(&[&pre], Some(&mut kv));
                kv
            });
            *preamble = Some(Preamble {
                text: r.preamble.clone(),
                ids: pre,
                kv,
            });
        }
        match preamble {
            Some(Preamble {
                ids: pre,
                kv: Some(kv),
                ..
            }) if ids.starts_with(pre) && pre.len() < ids.len() => Ok((pre.len(), kv.clone())),
            _ => Ok(fresh),
        }
    }

    /// Requests `fit` (index and continuation ids) that share the context `ctx`: the context
    /// runs once, then every continuation from its KV cache in one batch.
    fn group(
        &self,
        requests: &[Request],
        ctx: &EncodedContext,
        fit: Vec<(usize, Vec<u32>)>,
        preamble: &mut Option<Preamble<B>>,
        out: &mut [Option<Scored>],
    ) -> Result<()> {
        let ids = ctx.scored_ids(self.enc.eos);
        let (start, mut cache) = self.preamble_start(&requests[fit[0].0], ctx, preamble)?;
        let h = self.hidden(&[&ids[start..]], Some(&mut cache));
        let d = h.dims()[2];
        // The last context position predicts every continuation's first token.
        let last = h.narrow(1, ids.len() - start - 1, 1).reshape([1, d]);
        let conts: Vec<&[u32]> = fit.iter().map(|f| f.1.as_slice()).collect();
        let rests: Vec<&[u32]> = conts.iter().map(|c| &c[..c.len() - 1]).collect();
        let longest = rests.iter().map(|r| r.len()).max().unwrap_or(0);
        let hc = (longest > 0).then(|| {
            let mut cache = cache.repeat_batch(fit.len());
            self.hidden(&rests, Some(&mut cache))
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
        let scores = read_scores(self.model, picked, &conts);
        for ((i, k), s) in fit.into_iter().zip(scores) {
            out[i] = Some(self.scored(&requests[i], ctx, k, s, start));
        }
        Ok(())
    }

    /// Requests `chunk`, each `(context + continuation)[:-1]` whole, left-truncated to the
    /// model's context, in one forward.
    fn whole(
        &self,
        requests: &[Request],
        chunk: &[usize],
        out: &mut [Option<Scored>],
    ) -> Result<()> {
        // A document's requests often sit side by side: its context is tokenized once.
        let mut encoded: Vec<(Arc<EncodedContext>, Vec<u32>)> = Vec::with_capacity(chunk.len());
        for (n, &i) in chunk.iter().enumerate() {
            let r = &requests[i];
            let ctx = match n.checked_sub(1) {
                Some(p) if requests[chunk[p]].same_context(r) => encoded[p].0.clone(),
                _ => Arc::new(self.enc.context(r)?),
            };
            let k = self.enc.pair(&ctx, r)?;
            self.enc.fits(r, &k)?;
            encoded.push((ctx, k));
        }
        let max_len = self.enc.max_len;
        let inputs: Vec<Vec<u32>> = encoded
            .iter()
            .map(|(c, k)| {
                let mut all: Vec<u32> = c.scored_ids(self.enc.eos);
                all.extend(k);
                all.pop();
                let cut = all.len().saturating_sub(max_len);
                all.split_off(cut)
            })
            .collect();
        let rows: Vec<&[u32]> = inputs.iter().map(|x| x.as_slice()).collect();
        let h = self.hidden(&rows, None);
        let d = h.dims()[2];
        // Rows `n_in - k .. n_in` of each sequence predict its continuation.
        let conts: Vec<&[u32]> = encoded.iter().map(|e| e.1.as_slice()).collect();
        let picked: Vec<Tensor<B, 2>> = conts
            .iter()
            .enumerate()
            .filter(|(_, k)| !k.is_empty())
            .map(|(row, k)| {
                let n_in = inputs[row].len();
                h.clone()
                    .narrow(0, row, 1)
                    .narrow(1, n_in - k.len(), k.len())
                    .reshape([k.len(), d])
            })
            .collect();
        let scores = read_scores(self.model, picked, &conts);
        for ((&i, (ctx, k)), s) in chunk.iter().zip(encoded).zip(scores) {
            out[i] = Some(self.scored(&requests[i], &ctx, k, s, 0));
        }
        Ok(())
    }
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
