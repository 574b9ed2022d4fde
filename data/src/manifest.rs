//! `manifest.json` of a prepared dataset: what was tokenized, how, and where each shard is. It is
//! written last, so a directory without it (or with a different fingerprint) is not a finished
//! dataset.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use shears_core::{Error, Result};

/// The format tag of this manifest version.
pub const FORMAT: &str = "shears-token-shards-v1";

/// Element type of the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDType {
    U16,
    U32,
}

impl TokenDType {
    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenDType::U16 => 2,
            TokenDType::U32 => 4,
        }
    }

    /// The narrowest type that holds ids below `vocab`.
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            TokenDType::U16
        } else {
            TokenDType::U32
        }
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Path relative to the dataset directory.
    pub file: String,
    pub sequences: u64,
    pub sha256: String,
}

/// One input file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    pub documents: usize,
}

/// The input files of one extension in a domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionCount {
    /// Files read (binary ones included).
    pub files: usize,
    /// Documents they gave.
    pub documents: usize,
    /// Their size on disk.
    pub bytes: u64,
    /// Of those files, how many were skipped as not text.
    pub binary: usize,
}

/// Per-domain counts and files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainManifest {
    /// Documents read (train + eval).
    pub documents: usize,
    pub train_documents: usize,
    pub eval_documents: usize,
    /// Tokens stored in full sequences (sequences x seq_len).
    pub train_tokens: u64,
    pub eval_tokens: u64,
    pub train_sequences: u64,
    pub eval_sequences: u64,
    /// Tokens of each split's final partial sequence, dropped.
    pub dropped_train_tokens: u64,
    pub dropped_eval_tokens: u64,
    /// Documents skipped because they were empty.
    pub empty_documents: usize,
    /// Lines skipped with a warning (not JSON, no text field, not UTF-8).
    pub skipped_lines: usize,
    /// Whole files skipped because they are not text (a NUL byte, or not UTF-8).
    #[serde(default)]
    pub skipped_binary_files: usize,
    /// Input files by extension (`rs`, `md`, `jsonl.gz`, `(none)`).
    #[serde(default)]
    pub extensions: BTreeMap<String, ExtensionCount>,
    pub train_shards: Vec<ShardInfo>,
    pub eval_shards: Vec<ShardInfo>,
    pub sources: Vec<SourceInfo>,
}

/// The tokenizer used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// The `--tokenizer` argument.
    pub source: String,
    /// sha256 of the tokenizer.json document.
    pub sha256: String,
    /// One more than the largest id the tokenizer can produce (vocabulary and added tokens):
    /// every id in the shards is below it, and it decides the shard dtype.
    pub vocab_size: usize,
    pub bos_id: Option<u32>,
    pub eos_id: u32,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// Hash of everything that decides the shards: settings, tokenizer, input files.
    pub fingerprint: String,
    pub seq_len: usize,
    pub dtype: TokenDType,
    pub tokenizer: TokenizerInfo,
    /// How documents become sequences, in words.
    pub packing: String,
    /// How documents are split between train and eval, in words.
    pub split_rule: String,
    pub eval_fraction: f64,
    pub seed: u64,
    /// Domains by name (never by position).
    pub domains: BTreeMap<String, DomainManifest>,
}

impl Manifest {
    /// Read `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join("manifest.json");
        let text = shears_core::fsutil::read_text(&p, shears_core::fsutil::TEXT_FILE_BYTES)?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::format(&p, format!("not a Shears data manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(Error::format(
                &p,
                format!("manifest format '{}' is not '{FORMAT}'", m.format),
            ));
        }
        // A hand-edited manifest must still describe shards Shears can read.
        if !(2..=shears_core::config::limits::POSITIONS).contains(&m.seq_len) {
            return Err(Error::format(
                &p,
                format!(
                    "seq_len {} is outside 2..={}",
                    m.seq_len,
                    shears_core::config::limits::POSITIONS
                ),
            ));
        }
        for (name, d) in &m.domains {
            for shards in [&d.train_shards, &d.eval_shards] {
                if let Some(s) = shards
                    .iter()
                    .find(|s| !shears_core::fsutil::is_inside_name(&s.file))
                {
                    return Err(Error::format(
                        &p,
                        format!(
                            "domain '{name}': shard '{}' is not a file inside the data directory",
                            s.file
                        ),
                    ));
                }
                shards
                    .iter()
                    .try_fold(0u64, |a, s| a.checked_add(s.sequences))
                    .filter(|&n| n <= u64::MAX / m.seq_len as u64)
                    .ok_or_else(|| {
                        Error::format(
                            &p,
                            format!("domain '{name}': shard sequence counts overflow"),
                        )
                    })?;
            }
        }
        Ok(m)
    }
}
