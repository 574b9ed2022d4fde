//! Parity with HF transformers on the real SmolLM2-135M-Instruct (shared fixtures): token ids,
//! logits, cross-entropy, top-10, layer-0 intermediates, tokenizer edge cases, chat template and
//! greedy chat generation.

use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::Value;
use shears_core::{ChatMessage, DType, ModelFiles};
use shears_models::backend::NdArrayBackend;
use shears_models::generate::{self, SamplingConfig};
use shears_models::{load, loss, Llama, ShearsOps};
use shears_tests::{fixture, max_abs_diff, read_f32, read_i64, smollm2_gguf};

type B = NdArrayBackend;
/// The backend with native kernels (fused attention, LM head, GEMM).
type F = shears_models::backend::FlexBackend;

fn files() -> &'static ModelFiles {
    static FILES: OnceLock<ModelFiles> = OnceLock::new();
    FILES.get_or_init(|| ModelFiles::load(smollm2_gguf()).expect("load SmolLM2"))
}

fn model<Bk: ShearsOps>() -> Llama<Bk> {
    load::from_files::<Bk>(files(), &Default::default(), DType::F32).unwrap()
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixture("smollm2/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_tensor<Bk: Backend>(ids: &[i64]) -> Tensor<Bk, 2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    )
}

fn to_vec<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().into_vec().unwrap()
}

/// The indices of the 10 largest values, largest first (lower index first on ties).
fn top10(v: &[f32]) -> Vec<i64> {
    generate::top_k(v, 10)
        .into_iter()
        .map(|(i, _)| i as i64)
        .collect()
}

#[test]
fn logits_ce_and_top10_match_transformers_on_four_texts() {
    logits_ce_and_top10::<B>();
}

#[test]
fn logits_ce_and_top10_match_transformers_on_flex_with_fused_kernels() {
    logits_ce_and_top10::<F>();
}

fn logits_ce_and_top10<B: ShearsOps>() {
    let m = manifest();
    let model = model::<B>();
    let tok = files().tokenizer().unwrap();
    for name in ["text1_fox", "text2_paris", "text3_story", "code1_fib"] {
        let entry = &m["texts"][name];
        let f = fixture(&format!("smollm2/{name}.safetensors"));
        let (_, want_ids) = read_i64(&f, "input_ids");
        let text = entry["text"].as_str().unwrap();
        let ids: Vec<i64> = tok
            .encode(text, true)
            .unwrap()
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(ids, want_ids, "{name}: token ids");

        let logits = model.forward(ids_tensor(&ids));
        let [_, t, v] = logits.dims();
        let all = to_vec(logits.clone().reshape([t, v]));
        let (_, want_last) = read_f32(&f, "logits_last");
        let d_logits = max_abs_diff(&all[(t - 1) * v..], &want_last);

        let nll = to_vec(loss::token_nll(logits, ids_tensor(&ids)).reshape([t - 1]));
        // The fused LM head + cross-entropy (never materialising the logits) agrees.
        let fused = to_vec(model.nll(ids_tensor(&ids)).reshape([t - 1]));
        let d_fused = max_abs_diff(&fused, &nll);
        assert!(d_fused <= 1e-4, "{name}: fused NLL differs by {d_fused}");
        let (_, want_nll) = read_f32(&f, "nll_per_pos");
        let mean = nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64;
        let want_mean = entry["mean_ce"].as_f64().unwrap();
        let d_ce = (mean - want_mean).abs();
        let d_nll = max_abs_diff(&nll, &want_nll);

        let (_, want_top) = read_i64(&f, "topk_indices");
        for pos in 0..t {
            assert_eq!(
                top10(&all[pos * v..(pos + 1) * v]),
                want_top[pos * 10..(pos + 1) * 10].to_vec(),
                "{name}: top-10 indices at position {pos}"
            );
        }
        eprintln!(
            "{name}: T={t} max|dlogit_last|={d_logits:.2e} |dCE|={d_ce:.2e} max|dnll|={d_nll:.2e}"
        );
        assert!(
            d_logits <= 1e-3,
            "{name}: last-position logits differ by {d_logits}"
        );
        assert!(d_ce <= 1e-4, "{name}: mean CE {mean} vs {want_mean}");
        assert!(d_nll <= 1e-3, "{name}: per-position NLL differs by {d_nll}");
    }
}

#[test]
fn layer0_intermediates_match_debug_fixture() {
    layer0_intermediates::<B>();
}

#[test]
fn layer0_intermediates_match_debug_fixture_on_flex() {
    layer0_intermediates::<F>();
}

fn layer0_intermediates<B: ShearsOps>() {
    let model = model::<B>();
    let f = fixture("smollm2/text1_fox.debug_layer0.safetensors");
    let (_, ids) = read_i64(&f, "input_ids");
    let t = ids.len();
    let check = |name: &str, got: Vec<f32>, tol: f32| {
        let (_, want) = read_f32(&f, name);
        let d = max_abs_diff(&got, &want);
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        eprintln!("{name:<28} max|diff| {d:.2e} (max|ref| {scale:.2e})");
        assert!(d <= tol * scale.max(1.0), "{name}: max abs diff {d}");
    };
    let layer = &model.model.layers[0];
    let pos = model.position_inputs(0, t);
    let x = model.model.embed_tokens.forward(ids_tensor(&ids));
    check("embed", to_vec(x.clone()), 1e-6);
    let n1 = layer.input_layernorm.forward(x.clone());
    check("L0_input_layernorm", to_vec(n1.clone()), 1e-5);
    check(
        "L0_q_proj",
        to_vec(layer.self_attn.q_proj.forward(n1.clone())),
        1e-5,
    );
    check(
        "L0_k_proj",
        to_vec(layer.self_attn.k_proj.forward(n1.clone())),
        1e-5,
    );
    check(
        "L0_v_proj",
        to_vec(layer.self_attn.v_proj.forward(n1.clone())),
        1e-5,
    );
    let ctx = layer.self_attn.context(n1, &pos, None);
    let [_, _, h, hd] = ctx.dims();
    check(
        "L0_attn_context",
        to_vec(ctx.clone().reshape([t, h * hd])),
        1e-5,
    );
    let o = layer.self_attn.project(ctx);
    check("L0_o_proj", to_vec(o.clone()), 1e-5);
    let x = x + o;
    let n2 = layer.post_attention_layernorm.forward(x.clone());
    check("L0_post_attention_layernorm", to_vec(n2.clone()), 1e-5);
    let mlp = layer.mlp.forward(n2);
    check("L0_mlp", to_vec(mlp.clone()), 1e-5);
    let out0 = x + mlp;
    check("L0_output_hidden", to_vec(out0.clone()), 1e-5);
    // Logit lens of layer 0: the tied head on the raw and on the final-normed layer-0 output.
    check(
        "L0_logit_lens_raw",
        to_vec(model.logits(out0.clone())),
        1e-5,
    );
    check(
        "L0_logit_lens_normed",
        to_vec(model.logits(model.model.norm.forward(out0))),
        1e-5,
    );

    let mut x = model.model.embed_tokens.forward(ids_tensor(&ids));
    for l in &model.model.layers {
        x = l.forward(x, &pos, None);
    }
    check("L29_output_hidden", to_vec(x.clone()), 1e-5);
    // (The fixture's `final_norm_hidden` matches no position of this text, so the final norm is
    // checked through the logits of every position instead.)
    check(
        "logits_all",
        to_vec(model.logits(model.model.norm.forward(x))),
        1e-5,
    );
}

#[test]
fn tokenizer_cases_encode_and_decode_exactly() {
    let text = std::fs::read_to_string(fixture("smollm2/tokenizer_cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let tok = files().tokenizer().unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 23);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, want, "ids of {text:?}");
        let tokens: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        let want_tokens: Vec<String> = c["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tokens, want_tokens, "tokens of {text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "decode of {text:?}");
    }
}

#[test]
fn greedy_chat_answers_paris() {
    let m = manifest();
    let chat = &m["chat_greedy"];
    let tok = files().tokenizer().unwrap();
    let prompt = tok
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(prompt, chat["prompt_text"].as_str().unwrap());
    let ids = tok.encode(&prompt, false).unwrap();
    let want: Vec<u32> = chat["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want, "chat prompt ids");
    let model = model::<B>();
    let stop = files().config.eos_token_ids();
    let cfg = SamplingConfig {
        max_new_tokens: 20,
        ..Default::default()
    };
    let out = generate::generate(&model, &ids, cfg, &stop, |_| true);
    let want_out: Vec<u32> = chat["greedy_20_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(out, want_out);
    assert_eq!(
        tok.decode(&out, true).unwrap(),
        "The capital of France is Paris."
    );
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    kv_cache_decoding::<B>();
}

#[test]
fn kv_cache_decoding_matches_full_forward_on_flex() {
    kv_cache_decoding::<F>();
}

fn kv_cache_decoding<B: ShearsOps>() {
    let model = model::<B>();
    let tok = files().tokenizer().unwrap();
    let ids: Vec<i64> = tok
        .encode(
            "Paris is the capital and most populous city of France.",
            true,
        )
        .unwrap()
        .iter()
        .map(|&i| i as i64)
        .collect();
    let full = model.forward(ids_tensor(&ids));
    let [_, t, v] = full.dims();
    let full = to_vec(full.reshape([t, v]));
    let mut cache = model.new_cache();
    // A prompt chunk, then one token at a time.
    let split = 5;
    let mut got = to_vec(model.forward_last(ids_tensor(&ids[..split]), &mut cache));
    assert!(max_abs_diff(&got, &full[(split - 1) * v..split * v]) < 1e-4);
    for (i, &id) in ids.iter().enumerate().skip(split) {
        got = to_vec(model.forward_last(ids_tensor(&[id]), &mut cache));
        let d = max_abs_diff(&got, &full[i * v..(i + 1) * v]);
        assert!(d < 1e-4, "position {i}: cached decoding differs by {d}");
    }
    assert_eq!(cache.len(), t);
}
