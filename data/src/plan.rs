//! The data plan: which files make each domain, and how `shears prepare` tokenizes, splits and
//! packs them (TOML, every field but the inputs defaulted).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use shears_core::{Error, Result};

/// One domain of a data plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPlan {
    /// Files, directories or glob patterns.
    pub inputs: Vec<String>,
    /// The JSONL field holding the text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Extensions (`["rs", "py", "md"]`) of the files a directory input also takes, each file
    /// one document, besides `.txt` and `.jsonl[.gz|.zst]`. Globs and named files take any file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<String>,
}

fn default_text_field() -> String {
    "text".into()
}
fn default_seq_len() -> usize {
    2048
}
fn default_eval_fraction() -> f64 {
    0.02
}
fn default_shard_sequences() -> usize {
    16384
}

/// A data plan: the `[data]` part of a run plan, or a file of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPlan {
    /// Model whose tokenizer is used (HF directory, `.gguf`, known name).
    pub tokenizer: String,
    /// Tokens per sequence.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Share of each domain's tokens held out for evaluation.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Seed of the document order and the split.
    #[serde(default)]
    pub seed: u64,
    /// Sequences per shard file.
    #[serde(default = "default_shard_sequences")]
    pub shard_sequences: usize,
    /// Document start token: unset = the tokenizer's default, `"none"`, or a token string.
    #[serde(default)]
    pub bos: Option<String>,
    /// Document end token: unset = `<|endoftext|>` if present, else the tokenizer's EOS.
    #[serde(default)]
    pub eos: Option<String>,
    /// Domains by name.
    pub domains: BTreeMap<String, DomainPlan>,
}

impl DataPlan {
    /// Read a TOML plan (the plan itself, or a run plan's `[data]` table).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = shears_core::fsutil::read_text(path, shears_core::fsutil::SETTINGS_FILE_BYTES)?;
        let v: toml::Value =
            toml::from_str(&text).map_err(|e| Error::format(path, format!("invalid TOML: {e}")))?;
        let table = v.get("data").cloned().unwrap_or(v);
        let plan: DataPlan = table
            .try_into()
            .map_err(|e: toml::de::Error| Error::format(path, format!("invalid data plan: {e}")))?;
        plan.validate().map_err(|m| Error::format(path, m))?;
        Ok(plan)
    }

    /// Check settings and domain names.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.domains.is_empty() {
            return Err("the plan names no domains".into());
        }
        for name in self.domains.keys() {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                || name.starts_with('.')
            {
                return Err(format!(
                    "domain name '{name}' must be letters, digits, '_', '-' or '.'"
                ));
            }
        }
        if self.seq_len < 2 {
            return Err(format!("seq_len {} must be at least 2", self.seq_len));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(format!(
                "eval_fraction {} must be in [0, 1)",
                self.eval_fraction
            ));
        }
        for (name, d) in &self.domains {
            crate::documents::normalise_extensions(&d.extensions)
                .map_err(|m| format!("domain '{name}': {m}"))?;
        }
        if self.shard_sequences == 0 {
            return Err("shard_sequences must be positive".into());
        }
        Ok(())
    }
}
