//! A run directory: the plan as given (`plan.toml`) and resolved (`resolved.toml`),
//! `metrics.jsonl` (one JSON object per line: per step and per evaluation), `log.txt` (the human
//! log) and `checkpoints/`. Everything needed to resume, inspect and plot a run.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::records::MetricRecord;
use shears_core::error::IoContext;
use shears_core::{Error, Result};

/// An open run directory. The leader (rank 0 of a data-parallel run, or the only rank) holds
/// the files; a [`RunDir::follower_of`] reads checkpoints and writes nothing.
pub struct RunDir {
    pub root: PathBuf,
    metrics: Option<File>,
    metrics_len: u64,
    log: Option<File>,
    /// Also print log lines to stderr.
    pub echo: bool,
}

/// Settings a run may resume with changed: how many devices it runs on (every rank draws the
/// same global sample and noise, so only the order of per-rank sums changes).
const RESUMABLE_WITH_ANOTHER: &[(&str, &str)] = &[("run", "devices")];

/// Whether two resolved plans describe the same run, up to [`RESUMABLE_WITH_ANOTHER`].
fn same_run(old: &str, new: &str) -> bool {
    if old == new {
        return true;
    }
    let strip = |text: &str| -> Option<toml::Table> {
        let mut t: toml::Table = toml::from_str(text).ok()?;
        for (section, key) in RESUMABLE_WITH_ANOTHER {
            if let Some(toml::Value::Table(s)) = t.get_mut(*section) {
                s.remove(*key);
            }
        }
        Some(t)
    };
    matches!((strip(old), strip(new)), (Some(a), Some(b)) if a == b)
}

pub use crate::records::{CHECKPOINTS, LOG, METRICS, PLAN, RESOLVED};

impl RunDir {
    /// Open `root` for a new run (it must not hold one) or, with `resume`, for continuing the
    /// run there. The resolved plan must equal the one the run was started with.
    pub fn open(root: &Path, plan_text: &str, resolved: &str, resume: bool) -> Result<Self> {
        let has_run = root.join(RESOLVED).exists();
        if has_run && !resume {
            return Err(Error::format(
                root,
                "already holds a run; pass --resume to continue it or choose another output directory",
            ));
        }
        if !has_run && root.exists() {
            // Empty, or holding only the plan of a start killed before resolved.toml was written.
            let foreign = std::fs::read_dir(root)
                .at(root, "cannot list")?
                .flatten()
                .any(|e| e.file_name() != PLAN);
            if foreign {
                return Err(Error::format(
                    root,
                    format!(
                        "exists and is not a run directory (no {RESOLVED}); Shears writes a run only into a new or empty directory, so choose another output directory"
                    ),
                ));
            }
        }
        std::fs::create_dir_all(root).at(root, "cannot create the run directory")?;
        if has_run {
            let old = shears_core::fsutil::read_text(
                &root.join(RESOLVED),
                shears_core::fsutil::SETTINGS_FILE_BYTES,
            )?;
            if !same_run(&old, resolved) {
                return Err(Error::format(
                    root.join(RESOLVED),
                    "the plan differs from the one this run was started with; resume with the same plan or start a new run",
                ));
            }
        } else {
            shears_core::fsutil::write_atomic(&root.join(PLAN), plan_text.as_bytes(), true)?;
            shears_core::fsutil::write_atomic(&root.join(RESOLVED), resolved.as_bytes(), true)?;
        }
        let mpath = root.join(METRICS);
        let metrics = shears_core::fsutil::open_append(&mpath)?;
        let metrics_len = metrics.metadata().at(&mpath, "cannot stat")?.len();
        let lpath = root.join(LOG);
        let log = shears_core::fsutil::open_append(&lpath)?;
        Ok(RunDir {
            root: root.to_path_buf(),
            metrics: Some(metrics),
            metrics_len,
            log: Some(log),
            echo: true,
        })
    }

    /// The view of the run directory at `root` for the other ranks of a data-parallel
    /// run: the same root (to read checkpoints from), no files; metrics and log lines are
    /// dropped.
    pub fn follower_of(root: &Path) -> RunDir {
        RunDir {
            root: root.to_path_buf(),
            metrics: None,
            metrics_len: 0,
            log: None,
            echo: false,
        }
    }

    /// The checkpoint directory.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join(CHECKPOINTS)
    }

    /// Bytes of `metrics.jsonl` written so far (saved in checkpoints).
    pub fn metrics_len(&self) -> u64 {
        self.metrics_len
    }

    /// Cut `metrics.jsonl` back to `len` bytes: what a checkpoint had seen, so a resumed run
    /// writes exactly the lines an uninterrupted one would.
    pub fn truncate_metrics(&mut self, len: u64) -> Result<()> {
        if self.metrics.is_none() {
            self.metrics_len = len;
            return Ok(());
        }
        let mpath = self.root.join(METRICS);
        if len > self.metrics_len {
            return Err(Error::format(
                &mpath,
                format!(
                    "is shorter ({} bytes) than the checkpoint recorded ({len} bytes)",
                    self.metrics_len
                ),
            ));
        }
        if let Some(m) = &self.metrics {
            m.set_len(len).at(&mpath, "cannot truncate")?;
        }
        self.metrics_len = len;
        Ok(())
    }

    /// Append one metrics record.
    pub fn metric(&mut self, v: &MetricRecord) -> Result<()> {
        let Some(metrics) = &mut self.metrics else {
            return Ok(());
        };
        let mut line = serde_json::to_string(v).expect("a record always serializes");
        line.push('\n');
        let mpath = self.root.join(METRICS);
        metrics
            .write_all(line.as_bytes())
            .at(&mpath, "cannot write")?;
        metrics.flush().at(&mpath, "cannot write")?;
        self.metrics_len += line.len() as u64;
        Ok(())
    }

    /// Append a line to the human log (and echo it).
    pub fn log(&mut self, msg: &str) {
        let Some(log) = &mut self.log else {
            return;
        };
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let _ = writeln!(log, "[{secs}] {msg}");
        if self.echo {
            eprintln!("{msg}");
        }
    }
}
