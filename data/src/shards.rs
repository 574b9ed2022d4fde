//! Reading prepared token shards, memory-mapped: per domain and split, sequence `i` is a slice of
//! `seq_len` tokens. Sizes are checked against the manifest on open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use shears_core::error::IoContext;
use shears_core::{Error, Result};

use crate::manifest::{Manifest, ShardInfo, TokenDType};

/// Train or eval.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

/// The shards of one domain and split.
#[derive(Debug)]
pub struct SplitShards {
    maps: Vec<Mmap>,
    /// The shard files, for errors.
    paths: Vec<PathBuf>,
    /// Every id must be below this (the manifest's tokenizer bound): a shard changed after
    /// `prepare` is an error when it is read, never an out-of-range embedding lookup.
    id_bound: u32,
    /// Sequences before each shard (prefix sums), for locating sequence i.
    starts: Vec<u64>,
    len: u64,
    seq_len: usize,
    dtype: TokenDType,
}

impl SplitShards {
    fn open(
        dir: &Path,
        shards: &[ShardInfo],
        seq_len: usize,
        dtype: TokenDType,
        id_bound: u32,
    ) -> Result<Self> {
        let mut maps = Vec::new();
        let mut paths = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0u64;
        for s in shards {
            let p = dir.join(&s.file);
            let f = std::fs::File::open(&p).at(&p, "cannot open shard")?;
            // SAFETY: read-only map of a file written once by `prepare`.
            #[allow(unsafe_code)]
            let m = unsafe { Mmap::map(&f) }.at(&p, "cannot memory-map shard")?;
            let want = (s.sequences as usize)
                .checked_mul(seq_len)
                .and_then(|n| n.checked_mul(dtype.size()))
                .ok_or_else(|| {
                    Error::format(
                        &p,
                        format!(
                            "the manifest's {} sequences x {seq_len} tokens overflow",
                            s.sequences
                        ),
                    )
                })?;
            if m.len() != want {
                return Err(Error::format(
                    &p,
                    format!("shard is {} bytes but the manifest says {} sequences x {seq_len} tokens = {want} bytes", m.len(), s.sequences),
                ));
            }
            starts.push(len);
            len += s.sequences;
            maps.push(m);
            paths.push(p);
        }
        Ok(SplitShards {
            maps,
            paths,
            id_bound,
            starts,
            len,
            seq_len,
            dtype,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Append sequence `i`'s tokens to `out`; an id at or past the manifest's tokenizer bound
    /// (a shard changed after `prepare`) is an error naming the shard.
    pub fn read_into(&self, i: u64, out: &mut Vec<u32>) -> Result<()> {
        assert!(
            i < self.len,
            "sequence {i} out of range ({} sequences)",
            self.len
        );
        let shard = self.starts.partition_point(|&s| s <= i) - 1;
        let local = (i - self.starts[shard]) as usize;
        let bytes = self.dtype.size() * self.seq_len;
        let b = &self.maps[shard][local * bytes..(local + 1) * bytes];
        let from = out.len();
        match self.dtype {
            TokenDType::U16 => out.extend(
                b.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            ),
            TokenDType::U32 => out.extend(
                b.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
        let max = out[from..].iter().copied().max().unwrap_or(0);
        if max >= self.id_bound {
            return Err(Error::format(
                &self.paths[shard],
                format!(
                    "sequence {local} holds token id {max}, but the manifest's tokenizer has only {} ids; the shard was changed after prepare (prepare the data again)",
                    self.id_bound
                ),
            ));
        }
        Ok(())
    }

    /// Sequence `i`'s tokens.
    pub fn sequence(&self, i: u64) -> Result<Vec<u32>> {
        let mut v = Vec::with_capacity(self.seq_len);
        self.read_into(i, &mut v)?;
        Ok(v)
    }
}

/// A prepared dataset.
#[derive(Debug)]
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    splits: BTreeMap<(String, Split), SplitShards>,
}

impl Dataset {
    /// Open `dir` (written by `prepare`).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = Manifest::read(&dir)?;
        let id_bound = u32::try_from(manifest.tokenizer.vocab_size).map_err(|_| {
            Error::format(
                dir.join("manifest.json"),
                format!(
                    "tokenizer.vocab_size {} does not fit token ids of 32 bits",
                    manifest.tokenizer.vocab_size
                ),
            )
        })?;
        let mut splits = BTreeMap::new();
        for (name, d) in &manifest.domains {
            for (split, shards) in [
                (Split::Train, &d.train_shards),
                (Split::Eval, &d.eval_shards),
            ] {
                splits.insert(
                    (name.clone(), split),
                    SplitShards::open(&dir, shards, manifest.seq_len, manifest.dtype, id_bound)?,
                );
            }
        }
        Ok(Dataset {
            dir,
            manifest,
            splits,
        })
    }

    /// Domain names, sorted.
    pub fn domains(&self) -> Vec<String> {
        self.manifest.domains.keys().cloned().collect()
    }

    /// The shards of `domain`'s `split`.
    pub fn split(&self, domain: &str, split: Split) -> Result<&SplitShards> {
        self.splits
            .get(&(domain.to_string(), split))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "the dataset in {} has no domain '{domain}' (it has {})",
                    self.dir.display(),
                    self.domains().join(", ")
                ))
            })
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.manifest.seq_len
    }

    /// Batches of `batch` eval sequences of `domain`, in fixed order (the last may be shorter):
    /// what per-domain evaluation iterates.
    pub fn eval_batches(
        &self,
        domain: &str,
        batch: usize,
    ) -> Result<impl Iterator<Item = Result<Vec<Vec<u32>>>> + '_> {
        let s = self.split(domain, Split::Eval)?;
        let n = s.len();
        let batch = batch.max(1) as u64;
        Ok((0..n.div_ceil(batch)).map(move |b| {
            (b * batch..((b + 1) * batch).min(n))
                .map(|i| s.sequence(i))
                .collect()
        }))
    }
}
