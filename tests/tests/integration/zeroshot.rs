//! Zero-shot scoring against transformers on the first 25 documents of every task in
//! `fixtures/smollm2/eval_loglik_first25.json`, batch-size independence, and clean failures.
//! On flex, the default CPU backend with the fused kernels (ndarray scores 3-4x slower; its
//! logits are held to transformers' in `smollm2_parity`).

use serde_json::Value;
use shears_core::{DType, ModelFiles};
use shears_eval::zeroshot::{self, load_task};
use shears_models::backend::FlexBackend;
use shears_models::load;
use shears_tests::{fixture, smollm2_gguf};

type B = FlexBackend;

/// `requests` scored at batch 8 with the shared-context KV cache, then each whole (the MMLU
/// tests use it too).
pub(crate) fn with_and_without_prefix_reuse(
    model: &shears_models::Llama<B>,
    tok: &shears_core::Tokenizer,
    requests: &[zeroshot::Request],
) -> (Vec<zeroshot::Scored>, Vec<zeroshot::Scored>) {
    let run = |prefix_reuse| {
        let s = zeroshot::ScoreSettings {
            batch: 8,
            prefix_reuse,
            keep_ids: true,
        };
        zeroshot::score_with(model, None, tok, requests, s, |_| {}).unwrap()
    };
    (run(true), run(false))
}

fn fixture_tasks() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture("smollm2/eval_loglik_first25.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn first_25_documents_match_transformers() {
    let files = ModelFiles::load(smollm2_gguf()).unwrap();
    let tok = files.tokenizer().unwrap();
    let device = Default::default();
    let model = load::from_files::<B>(&files, &device, DType::F32).unwrap();
    let dir = zeroshot::tasks_dir(|m| eprintln!("{m}")).unwrap();
    let fx = fixture_tasks();
    let mut worst = 0.0f64;
    for (key, want) in fx["tasks"].as_object().unwrap() {
        let name = key.split('/').next().unwrap();
        let task = load_task(&dir, name, Some(25)).unwrap();
        let reqs = want["requests"].as_array().unwrap();
        assert_eq!(task.requests.len(), reqs.len(), "{key}");
        let scored = zeroshot::score(&model, tok, &task.requests, 8, |_| {}).unwrap();
        for (s, w) in scored.iter().zip(reqs) {
            let ids = |v: &Value| -> Vec<u32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            assert_eq!(
                (s.doc_id, s.idx),
                (
                    w["doc_id"].as_u64().unwrap(),
                    w["idx"].as_u64().unwrap() as usize
                ),
                "{key}"
            );
            assert_eq!(
                s.ctx_ids,
                ids(&w["ctx_ids"]),
                "{key} doc {} idx {}",
                s.doc_id,
                s.idx
            );
            assert_eq!(
                s.cont_ids,
                ids(&w["cont_ids"]),
                "{key} doc {} idx {}",
                s.doc_id,
                s.idx
            );
            // Flex's fused kernels sum in another order than transformers: a long
            // continuation's sum drifts by a few 1e-6 of itself (piqa doc 22: -240.6782 vs
            // -240.6768), so the bound is 1e-3 or 1e-5 of the sum, whichever is larger.
            let want_sum = w["sum_logprob"].as_f64().unwrap();
            let d = (s.sum_logprob - want_sum).abs();
            worst = worst.max(d);
            assert!(
                d < 1e-3f64.max(1e-5 * want_sum.abs()),
                "{key} doc {} idx {}: {} vs {}",
                s.doc_id,
                s.idx,
                s.sum_logprob,
                w["sum_logprob"]
            );
            assert_eq!(
                s.is_greedy,
                w["is_greedy"].as_bool().unwrap(),
                "{key} doc {} idx {}",
                s.doc_id,
                s.idx
            );
            assert_eq!(s.cont_chars as u64, w["cont_chars"].as_u64().unwrap());
            assert_eq!(s.cont_bytes as u64, w["cont_bytes"].as_u64().unwrap());
        }
        let m = zeroshot::metrics(&task.requests, &scored, &task.primary_metric).unwrap();
        let wm = &want["metrics"];
        assert_eq!(m.n as u64, wm["n_docs"].as_u64().unwrap(), "{key}");
        if name == "lambada" {
            assert_eq!(m.acc, wm["greedy_acc"].as_f64().unwrap(), "{key}");
            assert!(
                (m.bits_per_byte.unwrap() - wm["bits_per_byte"].as_f64().unwrap()).abs() < 1e-4
            );
        } else {
            assert_eq!(m.acc, wm["acc_raw"].as_f64().unwrap(), "{key}");
            assert_eq!(
                m.acc_per_char.unwrap(),
                wm["acc_per_char"].as_f64().unwrap(),
                "{key}"
            );
        }
    }
    eprintln!("worst |Δ sum log-prob| = {worst:.2e}");
}

#[test]
fn results_do_not_depend_on_the_batch_size() {
    let files = ModelFiles::load(smollm2_gguf()).unwrap();
    let tok = files.tokenizer().unwrap();
    let device = Default::default();
    let model = load::from_files::<B>(&files, &device, DType::F32).unwrap();
    let dir = zeroshot::tasks_dir(|m| eprintln!("{m}")).unwrap();
    let task = load_task(&dir, "hellaswag", Some(8)).unwrap();
    let a = zeroshot::score(&model, tok, &task.requests, 1, |_| {}).unwrap();
    let b = zeroshot::score(&model, tok, &task.requests, 16, |_| {}).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.cont_ids, y.cont_ids);
        assert_eq!(x.is_greedy, y.is_greedy);
        assert!(
            (x.sum_logprob - y.sum_logprob).abs() < 1e-4,
            "{} vs {}",
            x.sum_logprob,
            y.sum_logprob
        );
    }
    let (ma, mb) = (
        zeroshot::metrics(&task.requests, &a, "acc").unwrap(),
        zeroshot::metrics(&task.requests, &b, "acc").unwrap(),
    );
    assert_eq!(ma, mb);
}

#[test]
fn bad_task_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_task(tmp.path(), "nope", None).unwrap_err().to_string();
    assert!(
        e.contains("unknown task 'nope'") && e.contains("hellaswag"),
        "{e}"
    );
    let e = load_task(&tmp.path().join("missing"), "piqa", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing") && e.contains("oe_eval_tasks"), "{e}");
    let d = tmp.path().join("piqa/rc_0shot");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("requests.jsonl.gz"), b"not gzip at all").unwrap();
    let e = load_task(tmp.path(), "piqa", None).unwrap_err().to_string();
    assert!(e.contains("requests.jsonl.gz") && e.contains("gzip"), "{e}");
    // A valid gzip with a line that is not a request.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"{\"doc_id\": 0, \"request\": {}}\n").unwrap();
    std::fs::write(d.join("requests.jsonl.gz"), gz.finish().unwrap()).unwrap();
    let e = load_task(tmp.path(), "piqa", None).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("context"), "{e}");
}

/// Running a shared context once and every choice from its KV cache gives the log-probs of
/// scoring each request whole (≤ 1e-4 per token), on every fixture task.
#[test]
fn prefix_reuse_matches_whole_scoring() {
    let files = ModelFiles::load(smollm2_gguf()).unwrap();
    let tok = files.tokenizer().unwrap();
    let model = load::from_files::<B>(&files, &Default::default(), DType::F32).unwrap();
    let dir = zeroshot::tasks_dir(|m| eprintln!("{m}")).unwrap();
    let mut worst = 0.0f64;
    let mut shared = 0;
    for key in fixture_tasks()["tasks"].as_object().unwrap().keys() {
        let name = key.split('/').next().unwrap();
        let task = load_task(&dir, name, Some(6)).unwrap();
        let (a, b) = with_and_without_prefix_reuse(&model, tok, &task.requests);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (x.doc_id, x.idx, &x.cont_ids),
                (y.doc_id, y.idx, &y.cont_ids)
            );
            assert_eq!(x.is_greedy, y.is_greedy, "{key} doc {}", x.doc_id);
            for (p, q) in x.token_logprobs.iter().zip(&y.token_logprobs) {
                worst = worst.max((p - q).abs());
                assert!(
                    (p - q).abs() <= 1e-4,
                    "{key} doc {} idx {}: {p} vs {q}",
                    x.doc_id,
                    x.idx
                );
            }
        }
        let mut ctx: Vec<&Vec<u32>> = a.iter().map(|s| &s.ctx_ids).collect();
        let n = ctx.len();
        ctx.sort();
        ctx.dedup();
        shared += n - ctx.len();
    }
    assert!(
        shared > 0,
        "no fixture task shares a context: the prefix path went untested"
    );
    eprintln!("prefix reuse vs whole: worst |Δ log-prob| = {worst:.2e}");
}

/// A context longer than the model can see (a 4.8 MB few-shot preamble before a 128-token
/// model) is cut before it is tokenized: only the end the model reads is tokenized, once per
/// document, and the scores equal those of the same request with the preamble's last 4 KB
/// alone (the window is the same).
#[test]
fn contexts_past_the_window_are_cut_before_tokenizing() {
    let tmp = tempfile::tempdir().unwrap();
    let files = ModelFiles::load(shears_tests::runs::tiny_model(tmp.path())).unwrap();
    let tok = files.tokenizer().unwrap();
    let model = load::from_files::<B>(&files, &Default::default(), DType::F32).unwrap();
    let window = model.config.max_position_embeddings;
    let long: String = "the cat sat on the mat. ".repeat(200_000);
    let requests = |pre: &str| -> Vec<zeroshot::Request> {
        let pre: std::sync::Arc<str> = std::sync::Arc::from(pre);
        let ctx: std::sync::Arc<str> = std::sync::Arc::from("Question: the?\nAnswer:");
        [" the", " cat", " mat", " sat on"]
            .iter()
            .enumerate()
            .map(|(i, c)| zeroshot::Request {
                preamble: pre.clone(),
                ..zeroshot::Request::new(0, i, Some(1), ctx.clone(), c)
            })
            .collect()
    };
    let short = &long[long.len() - 4096..];
    for reuse in [true, false] {
        let s = zeroshot::ScoreSettings {
            batch: 4,
            prefix_reuse: reuse,
            keep_ids: true,
        };
        let a = zeroshot::score_with(&model, None, tok, &requests(&long), s, |_| {}).unwrap();
        let b = zeroshot::score_with(&model, None, tok, &requests(short), s, |_| {}).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!(x.context_cut && y.context_cut, "{reuse}");
            assert!(x.ctx_tokens < 100_000, "{} tokens", x.ctx_tokens);
            assert_eq!(x.cont_ids, y.cont_ids);
            let tail = |s: &zeroshot::Scored| s.ctx_ids[s.ctx_ids.len() - window..].to_vec();
            assert_eq!(tail(x), tail(y));
            for (p, q) in x.token_logprobs.iter().zip(&y.token_logprobs) {
                assert!((p - q).abs() <= 1e-5, "{p} vs {q}");
            }
        }
    }
}
