//! `shears prepare`: tokenize each domain's documents, split them between train and eval by
//! document, pack them into fixed-length sequences and write token shards plus `manifest.json`.
//!
//! - Every document becomes `[BOS] + tokens + [EOS]` (BOS only for tokenizers that add one by
//!   default, such as Llama-2's; EOS is `<|endoftext|>` when the vocabulary has it, else the
//!   tokenizer's EOS; both can be set in the plan). Special-token strings inside a text are
//!   tokenized as text.
//! - Split: documents in a seeded random order go to eval until it holds `eval_fraction` of the
//!   domain's tokens (at least one full sequence, and never every document); the rest is train.
//!   No document is in both.
//! - Packing: the documents of a split are concatenated, in that seeded order, into one token
//!   stream cut into `seq_len`-token sequences; documents run across sequence boundaries, and the
//!   final partial sequence of each split is dropped (its size is in the manifest).
//! - The output appears atomically (written under a temporary name, renamed at the end); a
//!   re-run whose settings, tokenizer and input files (sha256) are unchanged does nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use shears_core::error::IoContext;
use shears_core::fsutil::StagedDir;
use shears_core::{Error, Result, Tokenizer};

use crate::documents::{extension_key, read_documents, resolve_inputs, DomainDocuments};
use crate::manifest::{
    DomainManifest, ExtensionCount, Manifest, ShardInfo, SourceInfo, TokenDType, TokenizerInfo,
    FORMAT,
};
pub use crate::plan::{DataPlan, DomainPlan};

/// Progress of a prepare, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub domain: &'a str,
    pub documents_done: usize,
    pub documents: usize,
}

/// What `prepare` did.
#[derive(Debug, Clone)]
pub struct PrepareOutcome {
    pub manifest: Manifest,
    /// True when the existing output already matched and nothing was written.
    pub up_to_date: bool,
    /// Skipped lines and other things a user should see.
    pub warnings: Vec<String>,
}

/// The tokenizer's identity as a manifest records it: sha256 of its `tokenizer.json` text.
pub fn tokenizer_sha256(tok: &Tokenizer) -> String {
    format!("{:x}", Sha256::digest(tok.json().as_bytes()))
}

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).at(path, "cannot open")?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).at(path, "cannot read")?;
    Ok((n, format!("{:x}", h.finalize())))
}

fn seed_for(seed: u64, domain: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(domain.as_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().unwrap())
}

/// The document boundary tokens the plan asks for.
pub fn boundary_tokens(plan: &DataPlan, tok: &Tokenizer) -> Result<(Option<u32>, u32)> {
    let lookup = |t: &str, what: &str| {
        tok.token_to_id(t).ok_or_else(|| {
            Error::invalid(format!(
                "{what} token '{t}' is not in the tokenizer's vocabulary"
            ))
        })
    };
    let bos = match plan.bos.as_deref() {
        None => tok.default_prefix_token(),
        Some("none") => None,
        Some(t) => Some(lookup(t, "bos")?),
    };
    let eos = match plan.eos.as_deref() {
        Some(t) => lookup(t, "eos")?,
        None => match tok.token_to_id("<|endoftext|>") {
            Some(id) => id,
            None => match tok.eos_token() {
                Some(t) => lookup(&t, "eos")?,
                None => {
                    return Err(Error::invalid(
                        "cannot tell the end-of-document token; set `eos` in the data plan",
                    ))
                }
            },
        },
    };
    Ok((bos, eos))
}

struct PackedSplit {
    sequences: u64,
    dropped: u64,
    shards: Vec<ShardInfo>,
}

fn write_split(
    dir: &Path,
    domain: &str,
    split: &str,
    docs: &[&Vec<u32>],
    seq_len: usize,
    per_shard: usize,
    dtype: TokenDType,
) -> Result<PackedSplit> {
    let total: u64 = docs.iter().map(|d| d.len() as u64).sum();
    let sequences = total / seq_len as u64;
    let dropped = total % seq_len as u64;
    let keep = sequences * seq_len as u64;
    let mut shards = Vec::new();
    let mut stream = docs
        .iter()
        .flat_map(|d| d.iter().copied())
        .take(keep as usize);
    let mut written = 0u64;
    while written < sequences {
        let n = (sequences - written).min(per_shard as u64);
        let rel = format!("{domain}/{split}-{:05}.bin", shards.len());
        let path = dir.join(&rel);
        let mut bytes = Vec::with_capacity(n as usize * seq_len * dtype.size());
        for id in stream.by_ref().take(n as usize * seq_len) {
            match dtype {
                TokenDType::U16 => match u16::try_from(id) {
                    Ok(v) => bytes.extend(v.to_le_bytes()),
                    Err(_) => {
                        return Err(Error::invalid(format!(
                            "domain '{domain}': token id {id} does not fit the u16 shard {}; \
                             the tokenizer produced an id above its vocabulary",
                            path.display()
                        )))
                    }
                },
                TokenDType::U32 => bytes.extend(id.to_le_bytes()),
            }
        }
        let mut f = shears_core::fsutil::create_new(&path)?;
        f.write_all(&bytes).at(&path, "cannot write shard")?;
        f.sync_all().at(&path, "cannot sync shard")?;
        shards.push(ShardInfo {
            file: rel,
            sequences: n,
            sha256: format!("{:x}", Sha256::digest(&bytes)),
        });
        written += n;
    }
    Ok(PackedSplit {
        sequences,
        dropped,
        shards,
    })
}

/// The bound on token ids a dataset of `tok` holds: the largest id the tokenizer can produce
/// (its count of tokens is not enough: added tokens may have ids above it) or the boundary
/// tokens', plus one.
fn id_bound(tok: &Tokenizer, bos: Option<u32>, eos: u32) -> usize {
    [tok.vocab_size() as u64, tok.max_id() as u64 + 1]
        .into_iter()
        .chain(bos.map(|b| b as u64 + 1))
        .chain([eos as u64 + 1])
        .max()
        .unwrap_or(0) as usize
}

/// The output must not be, hold, or sit inside any input (a `--force` replace would delete the
/// corpus): the resolved files, and the directories or patterns as given.
fn check_out_apart(
    plan: &DataPlan,
    files: &BTreeMap<&str, Vec<PathBuf>>,
    out: &Path,
) -> Result<()> {
    let given: Vec<PathBuf> = plan
        .domains
        .values()
        .flat_map(|d| d.inputs.iter())
        .map(|i| match i.find(['*', '?', '[']) {
            // A pattern: the directory part before its first wildcard (none for a bare
            // pattern, whose matches are among the resolved files anyway).
            Some(k) => i[..k]
                .rfind('/')
                .map(|j| PathBuf::from(&i[..j]))
                .unwrap_or_default(),
            None => PathBuf::from(i),
        })
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    shears_core::fsutil::check_output_apart(
        out,
        files
            .values()
            .flatten()
            .map(|f| ("input", f.as_path()))
            .chain(given.iter().map(|g| ("input", g.as_path()))),
    )
}

/// Size and sha256 of each input file.
type Hashes<'a> = BTreeMap<&'a PathBuf, (u64, String)>;

/// What decides the output: the format, the plan's settings, the boundary tokens, the
/// tokenizer and every input file's hash. An output with the same fingerprint is up to date.
fn fingerprint(
    plan: &DataPlan,
    files: &BTreeMap<&str, Vec<PathBuf>>,
    hashes: &Hashes<'_>,
    (bos, eos): (Option<u32>, u32),
    tokenizer_sha: &str,
) -> String {
    let domains: BTreeMap<&str, serde_json::Value> = files
        .iter()
        .map(|(name, fs)| {
            let list: Vec<_> = fs
                .iter()
                .map(|f| serde_json::json!([f.to_string_lossy(), hashes[f].0, hashes[f].1]))
                .collect();
            (
                *name,
                serde_json::json!({"text_field": plan.domains[*name].text_field, "files": list}),
            )
        })
        .collect();
    let doc = serde_json::json!({
        "format": FORMAT, "seq_len": plan.seq_len, "eval_fraction": plan.eval_fraction, "seed": plan.seed,
        "shard_sequences": plan.shard_sequences, "bos": bos, "eos": eos, "tokenizer": tokenizer_sha,
        "domains": domains,
    });
    format!("{:x}", Sha256::digest(doc.to_string().as_bytes()))
}

/// Every document of a domain as `[BOS] + ids + [EOS]`, tokenized in chunks (all cores per
/// chunk) so progress can be shown; a document that cannot be encoded is named.
fn tokenize_documents(
    encoder: &shears_core::tokenizer::PlainTextEncoder,
    docs: &DomainDocuments,
    (bos, eos): (Option<u32>, u32),
    domain: &str,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Vec<Vec<u32>>> {
    let n = docs.documents.len();
    let mut tokens: Vec<Vec<u32>> = Vec::with_capacity(n);
    for chunk in docs.documents.chunks(512) {
        let texts: Vec<&str> = chunk.iter().map(|d| d.text.as_str()).collect();
        let encoded = encoder.encode_batch(&texts).map_err(|e| {
            // Name the document: long ones are the only ones that can fail on their own.
            chunk
                .iter()
                .filter(|d| d.text.len() > shears_core::tokenizer::PIECE_BYTES)
                .find_map(|d| {
                    encoder.encode_batch(&[d.text.as_str()]).err().map(|e| {
                        let file = &docs.files[d.file];
                        match d.line {
                            0 => Error::format(file, e.to_string()),
                            l => Error::format(file, format!("line {l}: {e}")),
                        }
                    })
                })
                .unwrap_or(e)
        })?;
        for ids in encoded {
            let mut doc = Vec::with_capacity(ids.len() + 2);
            doc.extend(bos);
            doc.extend(ids);
            doc.push(eos);
            tokens.push(doc);
        }
        progress(Progress {
            domain,
            documents_done: tokens.len(),
            documents: n,
        });
    }
    Ok(tokens)
}

/// The split by document: in a seeded random order, documents go to eval until it holds
/// `eval_fraction` of the domain's tokens (at least one sequence, never every document).
/// Returns (train, eval) document indices.
fn split_documents(plan: &DataPlan, domain: &str, tokens: &[Vec<u32>]) -> (Vec<usize>, Vec<usize>) {
    let n = tokens.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_pcg::Pcg64Mcg::seed_from_u64(seed_for(
        plan.seed, domain,
    )));
    let total: u64 = tokens.iter().map(|t| t.len() as u64).sum();
    let eval_target = if plan.eval_fraction > 0.0 {
        ((plan.eval_fraction * total as f64).ceil() as u64).max(plan.seq_len as u64)
    } else {
        0
    };
    let mut eval_docs = Vec::new();
    let mut eval_tokens = 0u64;
    for &i in &order {
        if eval_tokens >= eval_target || eval_docs.len() + 1 >= n {
            break;
        }
        eval_docs.push(i);
        eval_tokens += tokens[i].len() as u64;
    }
    let in_eval: std::collections::HashSet<usize> = eval_docs.iter().copied().collect();
    let train_docs: Vec<usize> = order
        .iter()
        .copied()
        .filter(|i| !in_eval.contains(i))
        .collect();
    (train_docs, eval_docs)
}

/// One prepared domain: its manifest entry, and the reason it has no eval sequence (if so).
struct PreparedDomain {
    manifest: DomainManifest,
    no_eval: Option<String>,
}

/// What every domain of one `prepare` shares.
struct Packer<'a> {
    plan: &'a DataPlan,
    encoder: shears_core::tokenizer::PlainTextEncoder,
    boundary: (Option<u32>, u32),
    dtype: TokenDType,
    hashes: &'a Hashes<'a>,
    /// The staged output directory.
    dir: &'a Path,
    progress: &'a (dyn Fn(Progress) + Sync),
}

/// Tokenize, split and pack one domain into `dir/<name>/`.
fn prepare_domain(
    p: &Packer<'_>,
    name: &str,
    docs: &DomainDocuments,
    warnings: &mut Vec<String>,
) -> Result<PreparedDomain> {
    let (plan, dir, hashes, dtype) = (p.plan, p.dir, p.hashes, p.dtype);
    let dplan = &plan.domains[name];
    if docs.documents.is_empty() {
        return Err(Error::invalid(format!(
            "domain '{name}' has no documents (inputs: {})",
            dplan.inputs.join(", ")
        )));
    }
    warnings.extend(docs.warnings.iter().cloned());
    std::fs::create_dir_all(dir.join(name)).at(dir.join(name), "cannot create directory")?;
    let tokens = tokenize_documents(&p.encoder, docs, p.boundary, name, p.progress)?;
    let (train_docs, eval_docs) = split_documents(plan, name, &tokens);
    let pick = |ix: &[usize]| ix.iter().map(|&i| &tokens[i]).collect::<Vec<_>>();
    let write = |split: &str, ix: &[usize]| {
        write_split(
            dir,
            name,
            split,
            &pick(ix),
            plan.seq_len,
            plan.shard_sequences,
            dtype,
        )
    };
    let train = write("train", &train_docs)?;
    let eval = write("eval", &eval_docs)?;
    // An empty train split is an error (the sampler could never draw the domain). An empty
    // eval split is a warning for one domain (a domain of one document has none: the split is
    // by document) and an error when no domain has one although eval was asked for.
    if train.sequences == 0 {
        return Err(Error::invalid(format!(
            "domain '{name}': {} train tokens ({} documents) make no sequence of seq_len {}; \
             add text or lower seq_len",
            train.dropped,
            train_docs.len(),
            plan.seq_len
        )));
    }
    let no_eval = (eval.sequences == 0 && plan.eval_fraction > 0.0).then(|| {
        warnings.push(format!(
            "domain '{name}': not enough documents for a full eval sequence"
        ));
        format!(
            "domain '{name}' ({} tokens in {} documents)",
            eval.dropped,
            eval_docs.len()
        )
    });
    let mut per_file = vec![0usize; docs.files.len()];
    for d in &docs.documents {
        per_file[d.file] += 1;
    }
    let mut extensions: BTreeMap<String, ExtensionCount> = BTreeMap::new();
    for (f, &n) in docs.files.iter().zip(&per_file) {
        let e = extensions.entry(extension_key(f)).or_default();
        e.files += 1;
        e.documents += n;
        e.bytes += hashes[f].0;
    }
    for (f, _) in &docs.binary {
        extensions.entry(extension_key(f)).or_default().binary += 1;
    }
    if let Some((first, why)) = docs.binary.first() {
        warnings.push(format!(
            "domain '{name}': skipped {} files that are not text (first: {}: {why})",
            docs.binary.len(),
            first.display()
        ));
    }
    let sources = docs
        .files
        .iter()
        .zip(per_file)
        .map(|(f, documents)| SourceInfo {
            path: f.to_string_lossy().to_string(),
            bytes: hashes[f].0,
            sha256: hashes[f].1.clone(),
            documents,
        })
        .collect();
    let manifest = DomainManifest {
        documents: docs.documents.len(),
        train_documents: train_docs.len(),
        eval_documents: eval_docs.len(),
        train_tokens: train.sequences * plan.seq_len as u64,
        eval_tokens: eval.sequences * plan.seq_len as u64,
        train_sequences: train.sequences,
        eval_sequences: eval.sequences,
        dropped_train_tokens: train.dropped,
        dropped_eval_tokens: eval.dropped,
        empty_documents: docs.empty,
        skipped_lines: docs.warnings.len(),
        skipped_binary_files: docs.binary.len(),
        extensions,
        train_shards: train.shards,
        eval_shards: eval.shards,
        sources,
    };
    Ok(PreparedDomain { manifest, no_eval })
}

/// Prepare `plan` into `out` with tokenizer `tok` (named `tokenizer_source` in the manifest).
/// `overwrite` allows replacing a directory that is not a previous dataset.
pub fn prepare(
    plan: &DataPlan,
    tok: &Tokenizer,
    tokenizer_source: &str,
    out: &Path,
    overwrite: bool,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<PrepareOutcome> {
    plan.validate().map_err(Error::invalid)?;
    let (bos, eos) = boundary_tokens(plan, tok)?;
    // Shards are as narrow as the ids allow; every id written is checked against the shard
    // type again.
    let id_bound = id_bound(tok, bos, eos);
    let dtype = TokenDType::for_vocab(id_bound);

    // Inputs and their hashes decide whether anything needs doing.
    let mut files: BTreeMap<&str, Vec<PathBuf>> = BTreeMap::new();
    for (name, d) in &plan.domains {
        files.insert(name, resolve_inputs(&d.inputs, &d.extensions)?);
    }
    check_out_apart(plan, &files, out)?;
    let all: Vec<&PathBuf> = files.values().flatten().collect();
    let hashes: Vec<(u64, String)> = all
        .par_iter()
        .map(|p| sha256_file(p))
        .collect::<Result<_>>()?;
    let hashes: Hashes<'_> = all.iter().copied().zip(hashes).collect();
    let tokenizer_sha = tokenizer_sha256(tok);
    let fingerprint = fingerprint(plan, &files, &hashes, (bos, eos), &tokenizer_sha);
    let previous = out.join("manifest.json");
    if previous.exists() {
        if let Ok(m) = Manifest::read(out) {
            if m.fingerprint == fingerprint {
                return Ok(PrepareOutcome {
                    manifest: m,
                    up_to_date: true,
                    warnings: vec![],
                });
            }
        }
    }

    let stage = StagedDir::new(out, overwrite || previous.exists())?;
    let dir = stage.path().to_path_buf();
    let packer = Packer {
        plan,
        encoder: tok.plain_text_encoder(),
        boundary: (bos, eos),
        dtype,
        hashes: &hashes,
        dir: &dir,
        progress,
    };
    let mut warnings = Vec::new();
    let mut no_eval = Vec::new();
    let mut domains = BTreeMap::new();
    for name in plan.domains.keys() {
        let docs = read_documents(files[name.as_str()].clone(), &plan.domains[name].text_field)?;
        let d = prepare_domain(&packer, name, &docs, &mut warnings)?;
        no_eval.extend(d.no_eval);
        domains.insert(name.clone(), d.manifest);
    }
    if !no_eval.is_empty() && no_eval.len() == plan.domains.len() {
        return Err(Error::invalid(format!(
            "no domain's eval split holds a sequence of seq_len {}: {}; add text, lower seq_len \
             or set eval_fraction = 0",
            plan.seq_len,
            no_eval.join(", ")
        )));
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        fingerprint,
        seq_len: plan.seq_len,
        dtype,
        tokenizer: TokenizerInfo {
            source: tokenizer_source.into(),
            sha256: tokenizer_sha,
            vocab_size: id_bound,
            bos_id: bos,
            eos_id: eos,
        },
        packing: "each document is [BOS] + tokens + [EOS]; a split's documents are concatenated in a seeded random order into one stream cut into seq_len-token sequences (documents run across sequence boundaries); the final partial sequence of each split is dropped".into(),
        split_rule: "by document: documents in a seeded random order go to eval until it holds eval_fraction of the domain's tokens (at least one sequence, never every document); the rest is train".into(),
        eval_fraction: plan.eval_fraction,
        seed: plan.seed,
        domains,
    };
    let p = dir.join("manifest.json");
    shears_core::fsutil::write_new(
        &p,
        serde_json::to_string_pretty(&manifest)
            .expect("json")
            .as_bytes(),
    )?;
    stage.commit()?;
    Ok(PrepareOutcome {
        manifest,
        up_to_date: false,
        warnings,
    })
}
