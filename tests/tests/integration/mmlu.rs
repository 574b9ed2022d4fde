//! MMLU from the package's Arrow files: the Arrow reader against the datasets' own metadata,
//! damaged files, the OLMES prompt layout, the shared-preamble path of scoring against whole
//! scoring on SmolLM2, and the macro average.

use std::path::{Path, PathBuf};

use shears_core::formats::arrow;
use shears_core::{DType, ModelFiles};
use shears_eval::mmlu::{self, SUBJECTS};
use shears_eval::zeroshot::{self, Limit};
use shears_models::backend::FlexBackend;
use shears_models::load;
use shears_tests::smollm2_gguf;

type B = FlexBackend;

fn data() -> PathBuf {
    mmlu::data_dir(|m| eprintln!("{m}")).unwrap()
}

fn arrow_file(dir: &Path, subject: &str, split: &str) -> PathBuf {
    dir.join(subject)
        .join(split)
        .join("data-00000-of-00001.arrow")
}

/// Every one of the 171 files reads, with the row count HF `datasets` recorded in its
/// `dataset_info.json` (written by a different program than the one that wrote the Arrow
/// bytes' reader here), four choices and an answer among them, and the subject column equal
/// to the folder.
#[test]
fn every_file_matches_its_recorded_size() {
    let dir = data();
    let mut totals = std::collections::BTreeMap::new();
    for subject in SUBJECTS {
        for split in ["dev", "validation", "test"] {
            let t = arrow::read(&arrow_file(&dir, subject, split)).unwrap();
            let info: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(subject).join(split).join("dataset_info.json"))
                    .unwrap(),
            )
            .unwrap();
            let want = info["splits"][split]["num_examples"].as_u64().unwrap() as usize;
            assert_eq!(t.rows, want, "{subject}/{split}");
            let Some(arrow::Column::Utf8(subj)) = t.column("subject") else {
                panic!("{subject}/{split}: no subject column")
            };
            assert!(subj.iter().all(|s| s == subject), "{subject}/{split}");
            let qs = mmlu::read_split(&dir, subject, split).unwrap();
            assert_eq!(qs.len(), want);
            assert!(qs.iter().all(|q| q.choices.len() == 4 && q.answer < 4));
            assert!(qs.iter().all(|q| !q.question.trim().is_empty()));
            *totals.entry(split).or_insert(0) += want;
        }
    }
    // MMLU's published sizes.
    assert_eq!(totals["dev"], 285);
    assert_eq!(totals["validation"], 1531);
    assert_eq!(totals["test"], 14042);
}

/// A cut, a flipped byte or a lying length in a real file is an error naming the file,
/// never a panic or a wrong table read silently (a damaged length field either fails or the
/// table still has the right shape).
#[test]
fn damaged_files_fail_cleanly() {
    let dir = data();
    let src = arrow_file(&dir, "anatomy", "dev");
    let bytes = std::fs::read(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("data.arrow");
    for cut in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        match arrow::read(&path) {
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("data.arrow"), "{m}");
            }
            // The stream may end at a message boundary before the record batch: no rows.
            Ok(t) => assert!(t.rows == 0 || cut >= bytes.len() - 8, "cut {cut}"),
        }
    }
    let mut x = 0x9e37_79b9u32;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let mut b = bytes.clone();
        let i = x as usize % b.len();
        b[i] ^= 1 << (x >> 29);
        let _ = arrow::parse(&b);
    }
    // A dataset directory that is not one names the problem.
    let e = mmlu::load(tmp.path(), "mmlu_rc", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not an MMLU directory"), "{e}");
    let e = mmlu::load(&tmp.path().join("nope"), "mmlu_rc", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

/// The exact text of a request, both formats, and the per-subject limit.
#[test]
fn prompts_follow_olmes() {
    let dir = data();
    let dev = mmlu::read_split(&dir, "abstract_algebra", "dev").unwrap();
    let val = mmlu::read_split(&dir, "abstract_algebra", "validation").unwrap();
    let rc = mmlu::load(&dir, "mmlu_rc_val", Some(Limit::Docs(1))).unwrap();
    assert_eq!(rc.primary_metric, "acc_per_char");
    assert_eq!(rc.documents, 1531);
    // One question per subject, four requests each.
    assert_eq!(rc.requests.len(), 57 * 4);
    let r = &rc.requests[0];
    assert_eq!(r.group.as_deref(), Some("abstract_algebra"));
    let mut want = String::from(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n",
    );
    for q in &dev {
        want += &format!(
            "Question: {}\nAnswer: {}\n\n",
            q.question.trim(),
            q.choices[q.answer]
        );
    }
    assert_eq!(&*r.preamble, want);
    want += &format!("Question: {}\nAnswer:", val[0].question.trim());
    assert_eq!(r.full_context(), want);
    // The choices share one context and the subject one preamble (references, not copies).
    assert!(std::sync::Arc::ptr_eq(&r.context, &rc.requests[3].context));
    assert!(std::sync::Arc::ptr_eq(
        &r.preamble,
        &rc.requests[3].preamble
    ));
    let conts: Vec<&str> = rc.requests[..4]
        .iter()
        .map(|r| r.continuation.as_str())
        .collect();
    let expect: Vec<String> = val[0].choices.iter().map(|c| format!(" {c}")).collect();
    assert_eq!(conts, expect);
    assert!(rc.requests[..4]
        .iter()
        .all(|r| r.label == Some(val[0].answer)));

    let mc = mmlu::load(&dir, "mmlu_mc", Some(Limit::Fraction(0.01))).unwrap();
    assert_eq!(mc.primary_metric, "acc");
    assert_eq!(mc.documents, 14042);
    let r = &mc.requests[0];
    let t0 = &mmlu::read_split(&dir, "abstract_algebra", "test").unwrap()[0];
    let last_shot = &dev[4];
    let want = format!(
        "Answer: {}\n\nQuestion: {}\n A. {}\n B. {}\n C. {}\n D. {}\nAnswer:",
        ["A", "B", "C", "D"][last_shot.answer],
        t0.question.trim(),
        t0.choices[0],
        t0.choices[1],
        t0.choices[2],
        t0.choices[3]
    );
    let context = r.full_context();
    assert!(context.ends_with(&want), "{context}");
    assert!(context.starts_with(&format!(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\nQuestion: {}\n A. {}\n",
        dev[0].question.trim(),
        dev[0].choices[0]
    )));
    assert_eq!(
        mc.requests[..4]
            .iter()
            .map(|r| r.continuation.as_str())
            .collect::<Vec<_>>(),
        [" A", " B", " C", " D"]
    );
    // 1% of each subject, rounded up: at least one question from every subject.
    let mut groups: Vec<&str> = mc
        .requests
        .iter()
        .map(|r| r.group.as_deref().unwrap())
        .collect();
    groups.dedup();
    assert_eq!(groups, SUBJECTS);
    assert!(matches!(
        mmlu::load(&dir, "mmlu_xx", None),
        Err(shears_core::Error::Invalid(_))
    ));
    assert!(shears_eval::task_names().contains(&"mmlu_mc_val"));
}

/// The few-shot preamble runs once per subject and every question continues from its cache:
/// the log-probs equal scoring each request whole (≤ 1e-4), in both formats, and the fast
/// path is really taken (the SmolLM2 tokenizer splits every subject's preamble where the
/// question begins).
#[test]
fn shared_preamble_matches_whole_scoring() {
    let dir = data();
    let files = ModelFiles::load(smollm2_gguf()).unwrap();
    let tok = files.tokenizer().unwrap();
    let model = load::from_files::<B>(&files, &Default::default(), DType::F32).unwrap();
    // Every subject's preamble tokenizes as the start of its contexts but for its last
    // couple of tokens (where "\n\n" meets "Question"), so nearly all of it is shared.
    for name in ["mmlu_rc_val", "mmlu_mc_val"] {
        let all = mmlu::load(&dir, name, Some(Limit::Docs(2))).unwrap();
        for r in all.requests.iter().step_by(4) {
            let pre = tok.encode(&r.preamble, false).unwrap();
            let ctx = tok.encode(&r.full_context(), false).unwrap();
            let agree = pre.iter().zip(&ctx).take_while(|(a, b)| a == b).count();
            assert!(
                agree + 2 >= pre.len() && agree > 100,
                "{:?}: {agree} of {}",
                r.group,
                pre.len()
            );
        }
    }
    let mut worst = 0.0f64;
    for name in ["mmlu_rc_val", "mmlu_mc_val"] {
        let mut task = mmlu::load(&dir, name, Some(Limit::Docs(2))).unwrap();
        task.requests.retain(|r| {
            matches!(
                r.group.as_deref(),
                Some("abstract_algebra" | "global_facts" | "virology")
            )
        });
        assert_eq!(task.requests.len(), 3 * 2 * 4);
        let (a, b) = crate::zeroshot::with_and_without_prefix_reuse(&model, tok, &task.requests);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (x.doc_id, x.idx, &x.ctx_ids, &x.cont_ids),
                (y.doc_id, y.idx, &y.ctx_ids, &y.cont_ids)
            );
            assert_eq!(x.is_greedy, y.is_greedy);
            // The preamble's cache served all but its last tokens; whole scoring shares none.
            assert!(
                x.shared_tokens > 100,
                "{name} doc {}: {} of {}",
                x.doc_id,
                x.shared_tokens,
                x.ctx_ids.len()
            );
            assert!(x.shared_tokens < x.ctx_ids.len());
            assert_eq!(y.shared_tokens, 0);
            for (p, q) in x.token_logprobs.iter().zip(&y.token_logprobs) {
                worst = worst.max((p - q).abs());
                assert!((p - q).abs() <= 1e-4, "{name} doc {}: {p} vs {q}", x.doc_id);
            }
        }
        // The primary score is the mean of the subjects' primaries.
        let m = zeroshot::metrics(&task.requests, &a, &task.primary_metric).unwrap();
        let subs = m.subtasks.as_ref().unwrap();
        assert_eq!(subs.len(), 3);
        let mean = subs.values().map(|s| s.primary).sum::<f64>() / 3.0;
        assert!((m.primary - mean).abs() < 1e-12);
        assert!(subs.values().all(|s| s.n == 2));
    }
    eprintln!("shared preamble vs whole: worst |Δ log-prob| = {worst:.2e}");
}

/// Valid but unusual folders: an empty subject under a fractional limit (it panicked), every
/// split empty (0 questions exited 0), a question or a shot with 27 choices (cut silently, or
/// a shot's answer past 'Z' panicked), and a 1 MB preamble that every request shares instead
/// of copying.
#[cfg(unix)]
#[test]
fn unusual_mmlu_folders_are_refused_or_shared() {
    let tmp = tempfile::tempdir().unwrap();
    let normal = shears_tests::mmlu_folder(&tmp.path().join("normal"), |_, s| match s {
        "dev" => "dev.arrow",
        _ => "test.arrow",
    });
    let t = mmlu::load(&normal, "mmlu_mc", Some(Limit::Fraction(0.5))).unwrap();
    assert_eq!(t.requests.len(), 57 * 5 * 4);
    let one_empty = shears_tests::mmlu_folder(&tmp.path().join("one-empty"), |subject, s| {
        match (subject, s) {
            (_, "dev") => "dev.arrow",
            ("anatomy", _) => "empty.arrow",
            _ => "test.arrow",
        }
    });
    let t = mmlu::load(&one_empty, "mmlu_rc", Some(Limit::Fraction(0.5))).unwrap();
    assert_eq!(t.requests.len(), 56 * 5 * 4);
    let all_empty = shears_tests::mmlu_folder(&tmp.path().join("all-empty"), |_, s| match s {
        "dev" => "dev.arrow",
        _ => "empty.arrow",
    });
    let e = mmlu::load(&all_empty, "mmlu_mc_val", Some(Limit::Fraction(0.5)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no question to score"), "{e}");
    for (split, name) in [("test", "many-choices"), ("dev", "many-shots")] {
        let dir =
            shears_tests::mmlu_folder(&tmp.path().join(name), |subject, s| match (subject, s) {
                ("virology", x) if x == split => "choices27.arrow",
                (_, "dev") => "dev.arrow",
                _ => "test.arrow",
            });
        let e = mmlu::load(&dir, "mmlu_mc", Some(Limit::Docs(1)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("virology/{split}")) && e.contains("27 choices"),
            "{e}"
        );
    }
    let big = shears_tests::mmlu_folder(&tmp.path().join("big"), |_, s| match s {
        "dev" => "dev-big.arrow",
        _ => "test.arrow",
    });
    let t = mmlu::load(&big, "mmlu_rc", None).unwrap();
    assert_eq!(t.requests.len(), 57 * 10 * 4);
    assert!(t.requests[0].preamble.len() > 1_000_000);
    for r in &t.requests[..40] {
        assert!(std::sync::Arc::ptr_eq(&r.preamble, &t.requests[0].preamble));
    }
}
