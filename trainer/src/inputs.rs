//! What a stage reads before it starts, opened and checked in one place: the model (an HF
//! directory, a `.gguf` file or a known name), the prepared data against the model (vocabulary,
//! positions, tokenizer), and the distillation teacher against the student.

use std::path::Path;

use shears_core::{hub, Error, ModelFiles, Result};
use shears_data::Dataset;

use crate::config::{DistillSettings, PruneConfig, RunSettings, TrainConfig, SOURCE_TEACHER};

/// Load a model argument (HF directory, `.gguf`, known name).
pub fn load_model(arg: &str) -> Result<ModelFiles> {
    let path = hub::resolve_model(arg, |m| eprintln!("{m}"))?;
    ModelFiles::load(&path)
}

/// Open a prepared dataset for `files`' model: refused when its ids can reach past the model's
/// vocabulary or its sequences past the model's positions, and when it was tokenized with
/// another tokenizer than the model's (the manifest's sha256 of `tokenizer.json` against the
/// model's) unless `allow_tokenizer_mismatch`. A model without a tokenizer cannot be compared:
/// that is a warning.
pub fn open_data(
    path: &Path,
    files: &ModelFiles,
    allow_tokenizer_mismatch: bool,
) -> Result<Dataset> {
    let data = Dataset::open(path)?;
    let tok = &data.manifest.tokenizer;
    match &files.tokenizer {
        Some(t) => {
            let model_sha = shears_data::prepare::tokenizer_sha256(t);
            if model_sha != tok.sha256 {
                let msg = format!(
                    "was tokenized with '{}' (tokenizer.json sha256 {}) but the model {} has another tokenizer (sha256 {})",
                    tok.source,
                    short(&tok.sha256),
                    files.source.display(),
                    short(&model_sha),
                );
                if !allow_tokenizer_mismatch {
                    return Err(Error::format(
                        path,
                        format!(
                            "{msg}; prepare the data with the model's tokenizer, or pass --allow-tokenizer-mismatch if you know the two vocabularies agree"
                        ),
                    ));
                }
                eprintln!("warning: {}: {msg} (allowed by --allow-tokenizer-mismatch)", path.display());
            }
        }
        None => eprintln!(
            "warning: the model {} has no tokenizer.json, so the tokenizer of {} ('{}') cannot be checked against it",
            files.source.display(),
            path.display(),
            tok.source
        ),
    }
    let max = files.config.max_position_embeddings;
    if data.seq_len() > max {
        return Err(Error::format(
            path,
            format!(
                "holds sequences of {} tokens, more than the model's max_position_embeddings of {max}; prepare it with a smaller seq_len",
                data.seq_len()
            ),
        ));
    }
    let v = data.manifest.tokenizer.vocab_size;
    if v > files.config.vocab_size {
        return Err(Error::format(
            path,
            format!(
                "was tokenized with a vocabulary of {v} tokens, larger than the model's {}; prepare the data with the model's tokenizer",
                files.config.vocab_size
            ),
        ));
    }
    Ok(data)
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// The teacher model `distill.teacher` names, `None` without one. `"source"` is the model the
/// student was pruned from, as `shears finalize` recorded it in the student's
/// `masks.safetensors` (the pipeline passes its `model` instead).
pub fn teacher_model(c: &TrainConfig) -> Result<Option<String>> {
    let Some(t) = &c.distill.teacher else {
        return Ok(None);
    };
    if t != SOURCE_TEACHER {
        return Ok(Some(t.clone()));
    }
    let masks = Path::new(&c.model).join("masks.safetensors");
    let recorded = if masks.is_file() {
        let f = shears_core::formats::safetensors::SafeTensorsFile::open(&masks)?;
        f.metadata().get(SOURCE_MODEL_KEY).cloned()
    } else {
        None
    };
    recorded.map(Some).ok_or_else(|| {
        Error::invalid(format!(
            "distill.teacher = \"source\": {} does not record the model it was pruned from (models written by `shears finalize` do, in masks.safetensors); name the teacher model instead",
            c.model
        ))
    })
}

/// The source model of a pruning run directory, as its resolved plan names it: an absolute
/// path where it names an existing file or directory (so a teacher found through it does not
/// depend on the working directory), else the name (`smollm2`). `None` when the plan cannot be
/// read.
pub fn run_source_model(run: &Path) -> Option<String> {
    let text = std::fs::read_to_string(run.join(crate::run_dir::RESOLVED)).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    Some(source_model_name(v.get("model")?.as_str()?))
}

/// A model argument as a finalized model records its source: an absolute path where it names an
/// existing file or directory, else the name as given.
pub fn source_model_name(model: &str) -> String {
    match std::fs::canonicalize(model) {
        Ok(p) => p.display().to_string(),
        Err(_) => model.to_string(),
    }
}

/// The metadata key of `masks.safetensors` that records the source model of a finalized model.
pub const SOURCE_MODEL_KEY: &str = "source_model";

/// A teacher must share the student's vocabulary: the same size and, where both carry a
/// tokenizer, the same `tokenizer.json`.
pub fn check_teacher(student: &ModelFiles, teacher: &ModelFiles) -> Result<()> {
    let (s, t) = (student.config.vocab_size, teacher.config.vocab_size);
    if s != t {
        return Err(Error::invalid(format!(
            "the teacher {} has a vocabulary of {t} tokens and the student {} one of {s}: distillation needs the same tokenizer",
            teacher.source.display(),
            student.source.display()
        )));
    }
    let missing: Vec<String> = [student, teacher]
        .iter()
        .filter(|m| m.tokenizer.is_none())
        .map(|m| m.source.display().to_string())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "warning: {} has no tokenizer.json, so the teacher's and the student's tokenizers \
             cannot be compared (only their vocabulary sizes, {s}, agree); distillation is \
             meaningless if they tokenize differently",
            missing.join(" and ")
        );
    }
    if let (Some(a), Some(b)) = (&student.tokenizer, &teacher.tokenizer) {
        let (a, b) = (
            shears_data::prepare::tokenizer_sha256(a),
            shears_data::prepare::tokenizer_sha256(b),
        );
        if a != b {
            return Err(Error::invalid(format!(
                "the teacher {} has another tokenizer than the student {} (tokenizer.json sha256 {} vs {}): distillation needs the same one",
                teacher.source.display(),
                student.source.display(),
                short(&b),
                short(&a)
            )));
        }
    }
    Ok(())
}

/// The teacher of a distilling plan (`resolved.distill`), loaded and checked against the
/// student `files` and the training sequences of `data`; `None` without distillation.
pub fn load_teacher(
    resolved: &TrainConfig,
    files: &ModelFiles,
    data: &Dataset,
) -> Result<Option<(shears_models::distill::KdSpec, f64, ModelFiles)>> {
    if resolved.distill.spec().is_none() {
        return Ok(None);
    }
    let name = teacher_model(resolved)?.expect("a teacher when distilling");
    teacher_for(&resolved.distill, &resolved.run, &name, files, data)
}

/// The teacher of a pruning run (`[distill]` of its plan): `"source"` is the model being
/// pruned, loaded again as a frozen copy.
pub fn load_prune_teacher(
    resolved: &PruneConfig,
    files: &ModelFiles,
    data: &Dataset,
) -> Result<Option<(shears_models::distill::KdSpec, f64, ModelFiles)>> {
    let Some(t) = resolved
        .distill
        .teacher
        .as_ref()
        .filter(|_| resolved.distill.spec().is_some())
    else {
        return Ok(None);
    };
    let name = if t == SOURCE_TEACHER {
        &resolved.model
    } else {
        t
    };
    teacher_for(&resolved.distill, &resolved.run, name, files, data)
}

fn teacher_for(
    distill: &DistillSettings,
    run: &RunSettings,
    name: &str,
    files: &ModelFiles,
    data: &Dataset,
) -> Result<Option<(shears_models::distill::KdSpec, f64, ModelFiles)>> {
    let spec = distill.spec().expect("a teacher when distilling");
    let t = load_model(name)?;
    check_teacher(files, &t)?;
    let len = run.seq_len.unwrap_or(data.seq_len());
    let max = t.config.max_position_embeddings;
    if len > max {
        return Err(Error::invalid(format!(
            "the teacher {} attends over at most {max} positions (max_position_embeddings), fewer than the training sequences' {len} tokens; lower run.seq_len or choose another teacher",
            t.source.display()
        )));
    }
    Ok(Some((spec, distill.alpha, t)))
}
