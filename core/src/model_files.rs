//! A model on disk, in either form Shears reads (an HF directory or a `.gguf` file), loaded into
//! host memory and checked against its config; and the writer of Shears' one model format, an
//! HF directory that transformers loads as `LlamaForCausalLM`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::config::{LayerShape, LlamaConfig};
use crate::error::{Error, Result};
use crate::formats::safetensors::{self, LazyTensors};
use crate::formats::{gguf::GgufFile, gguf_llama};
use crate::fsutil::StagedDir;
use crate::layer_tensors::{LayerTensor, EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use crate::tensor::{DType, WeightMap};
use crate::tokenizer::Tokenizer;

/// A loaded model: config, weights under HF names, tokenizer, and the widths of every layer.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: LlamaConfig,
    pub weights: WeightMap,
    /// `None` for a directory without `tokenizer.json` (enough for training, not for text).
    pub tokenizer: Option<Tokenizer>,
    /// Widths per layer, read off the weights (finalised pruned models may be non-uniform).
    pub layers: Vec<LayerShape>,
    /// Where the model was read from.
    pub source: PathBuf,
}

/// Only the config of a model: from an HF directory, a `config.json`, or a `.gguf` file's
/// metadata. Reads no weights, so a 70B model can be planned on a laptop.
pub fn load_config(path: impl AsRef<Path>) -> Result<LlamaConfig> {
    let path = path.as_ref();
    if path.is_dir() {
        LlamaConfig::from_file(path.join("config.json"))
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        gguf_llama::config_from_gguf(&GgufFile::open(path)?)
    } else if path.exists() {
        LlamaConfig::from_file(path)
    } else {
        Err(Error::format(path, "no such file or directory"))
    }
}

impl ModelFiles {
    /// Load an HF model directory or a `.gguf` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            Self::load_hf_dir(path)
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            Self::load_gguf(path)
        } else if !path.exists() {
            Err(Error::format(path, "no such file or directory"))
        } else {
            Err(Error::format(
                path,
                "not a model: expected an HF model directory (config.json, model.safetensors, tokenizer.json) or a .gguf file",
            ))
        }
    }

    /// Load a GGUF model: dequantise to f32, undo llama.cpp's q/k permutation, rebuild the
    /// config and tokenizer from the metadata.
    pub fn load_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let g = GgufFile::open(path)?;
        let config = gguf_llama::config_from_gguf(&g)?;
        let tokenizer = Some(Tokenizer::from_gguf(&g)?);
        let weights = gguf_llama::weights_from_gguf(&g, &config)?;
        let layers = check_weights(&config, &weights, path)?;
        Ok(ModelFiles {
            config,
            weights,
            tokenizer,
            layers,
            source: path.to_path_buf(),
        })
    }

    /// Load an HF directory: `config.json`, `model.safetensors` or a sharded
    /// `model.safetensors.index.json`, and `tokenizer.json`.
    pub fn load_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        // A multimodal checkpoint's text decoder: its tensors renamed, the rest never read.
        let rename = |name: &str| -> Option<String> {
            match config.from_multimodal {
                true => crate::family::text_tensor_name(name),
                false => Some(name.to_string()),
            }
        };
        let (weights, weights_path) = if single.exists() {
            let file = safetensors::SafeTensorsFile::open(&single)?;
            let mut w = WeightMap::new();
            for name in file.names() {
                if let Some(to) = rename(name) {
                    w.insert(to, file.tensor(name)?);
                }
            }
            (w, single)
        } else if index.exists() {
            (read_sharded(&index, rename)?, index)
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not read; convert them to safetensors first)",
            ));
        };
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Tokenizer::from_hf_dir(dir)?)
        } else {
            None
        };
        let mut weights = weights;
        // Some tied checkpoints also store the shared matrix as lm_head.weight.
        if config.tie_word_embeddings {
            weights.remove("lm_head.weight");
        }
        weights.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if config.from_multimodal && !weights.contains_key(EMBED_TOKENS) {
            return Err(Error::format(
                &weights_path,
                "a Gemma3ForConditionalGeneration checkpoint without its text weights (no language_model.model.* / model.language_model.* tensors); Shears shears the text decoder",
            ));
        }
        let layers = check_weights(&config, &weights, &weights_path)?;
        Ok(ModelFiles {
            config,
            weights,
            tokenizer,
            layers,
            source: dir.to_path_buf(),
        })
    }

    /// The tokenizer, or an error naming the model when it has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::format(
                &self.source,
                "this model has no tokenizer (tokenizer.json is missing)",
            )
        })
    }

    /// Whether every layer has the config's widths (what plain HF `LlamaForCausalLM` can load).
    pub fn is_uniform(&self) -> bool {
        self.layers
            .iter()
            .all(|l| *l == self.config.uniform_layer_shapes()[0])
    }

    /// Write an HF model directory at `out`, atomically. `dtype` converts the weights (default:
    /// keep them). Refuses an `out` that already holds a model unless `overwrite`.
    pub fn write_hf_dir(
        &self,
        out: impl AsRef<Path>,
        dtype: Option<DType>,
        overwrite: bool,
    ) -> Result<PathBuf> {
        let tensors = match dtype {
            Some(d) => LazyTensors::converted(&self.weights, d),
            None => LazyTensors::borrowed(&self.weights),
        };
        self.write_hf_dir_with(out, overwrite, tensors)
    }

    /// [`Self::write_hf_dir`] with the weights given as `tensors` (made one at a time as they
    /// are written) instead of `self.weights`: a checkpoint of a model that lives on a device
    /// never holds a whole host copy of it.
    pub fn write_hf_dir_with(
        &self,
        out: impl AsRef<Path>,
        overwrite: bool,
        tensors: LazyTensors<'_>,
    ) -> Result<PathBuf> {
        if !self.is_uniform() {
            return Err(Error::invalid(format!(
                "the model has per-layer widths ({}) that HF LlamaForCausalLM cannot represent; exporting non-uniform models is not supported yet",
                describe_layers(&self.layers)
            )));
        }
        crate::fsutil::check_output_apart(out.as_ref(), [("model", self.source.as_path())])?;
        let stage = StagedDir::new(out, overwrite)?;
        let dir = stage.path().to_path_buf();
        let stored = tensors.first_dtype().unwrap_or(DType::F32);
        let mut config = self.config.clone();
        config.extra.remove("dtype");
        config
            .extra
            .insert("torch_dtype".into(), stored.torch_name().into());
        let p = dir.join("config.json");
        crate::fsutil::write_new(&p, config.to_json_string()?.as_bytes())?;
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        tensors.write(dir.join("model.safetensors"), &meta)?;
        if let Some(t) = &self.tokenizer {
            t.save(&dir)?;
        }
        let mut gen = serde_json::Map::new();
        if let Some(b) = &config.bos_token_id {
            gen.insert("bos_token_id".into(), b.clone());
        }
        if let Some(e) = &config.eos_token_id {
            gen.insert("eos_token_id".into(), e.clone());
        }
        if let Some(p) = &config.pad_token_id {
            gen.insert("pad_token_id".into(), p.clone());
        }
        let p = dir.join("generation_config.json");
        let text = serde_json::to_string_pretty(&json!(gen)).expect("json");
        crate::fsutil::write_new(&p, text.as_bytes())?;
        stage.commit()
    }
}

fn describe_layers(layers: &[LayerShape]) -> String {
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "layer {i}: {} heads / {} kv / {} mlp",
                l.num_attention_heads, l.num_key_value_heads, l.intermediate_size
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The tensors a sharded checkpoint's index names, under the names `rename` gives them (those
/// it maps to `None` are not read).
fn read_sharded(index: &Path, rename: impl Fn(&str) -> Option<String>) -> Result<WeightMap> {
    let text = crate::fsutil::read_text(index, crate::fsutil::SETTINGS_FILE_BYTES)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("index does not parse: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "index has no 'weight_map' object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut by_file: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (name, file) in map {
        let Some(to) = rename(name) else {
            continue;
        };
        let file = file.as_str().ok_or_else(|| {
            Error::format(index, format!("weight_map['{name}'] is not a file name"))
        })?;
        if !crate::fsutil::is_inside_name(file) {
            return Err(Error::format(
                index,
                format!("weight_map['{name}'] = '{file}' points outside the model directory"),
            ));
        }
        by_file
            .entry(file.to_string())
            .or_default()
            .push((name.clone(), to));
    }
    let mut out = WeightMap::new();
    for (file, names) in by_file {
        let shard = safetensors::SafeTensorsFile::open(dir.join(&file))?;
        for (n, to) in names {
            out.insert(to, shard.tensor(&n)?);
        }
    }
    Ok(out)
}

/// Check that `weights` are a LLaMA model of `config` and read off each layer's widths.
pub fn check_weights(
    config: &LlamaConfig,
    weights: &WeightMap,
    path: &Path,
) -> Result<Vec<LayerShape>> {
    let bad = |m: String| Error::format(path, m);
    let (v, d, hd) = (config.vocab_size, config.hidden_size, config.head_dim());
    let shape = |name: &str| -> Result<&[usize]> {
        weights
            .get(name)
            .map(|t| t.shape.as_slice())
            .ok_or_else(|| bad(format!("tensor '{name}' is missing")))
    };
    let expect = |name: &str, want: &[usize]| -> Result<()> {
        let got = shape(name)?;
        if got != want {
            return Err(bad(format!(
                "tensor '{name}' has shape {got:?}, config.json implies {want:?}"
            )));
        }
        Ok(())
    };
    expect(EMBED_TOKENS, &[v, d])?;
    expect(FINAL_NORM, &[d])?;
    if !config.tie_word_embeddings {
        expect(LM_HEAD, &[v, d])?;
    }
    // The weights say how many layers there are; metadata that disagrees is refused before
    // anything is sized from it.
    let held = weights
        .keys()
        .filter_map(|k| k.strip_prefix("model.layers.")?.split_once('.'))
        .filter_map(|(l, _)| l.parse::<usize>().ok())
        .max()
        .map_or(0, |l| l.saturating_add(1));
    if held != config.num_hidden_layers {
        return Err(bad(format!(
            "the config (config.json, or a GGUF's block_count) says num_hidden_layers = {} but the weights hold {held} layers",
            config.num_hidden_layers
        )));
    }
    let tensors = LayerTensor::of(config);
    let mut layers = Vec::with_capacity(held);
    for l in 0..held {
        // Heads and MLP width are read off q/k/gate; every tensor is then checked against the
        // table's shape for them.
        let q = shape(&LayerTensor::QProj.key(l))?;
        let kk = shape(&LayerTensor::KProj.key(l))?;
        if q.len() != 2
            || q[1] != d
            || q[0] % hd != 0
            || kk.len() != 2
            || kk[1] != d
            || kk[0] % hd != 0
        {
            return Err(bad(format!(
                "layer {l}: q_proj {q:?} / k_proj {kk:?} are not [heads x head_dim {hd}, hidden {d}]"
            )));
        }
        let (h, g) = (q[0] / hd, kk[0] / hd);
        if g == 0 || h % g != 0 {
            return Err(bad(format!(
                "layer {l}: {h} query heads do not split into {g} kv heads"
            )));
        }
        let gate = shape(&LayerTensor::GateProj.key(l))?;
        if gate.len() != 2 || gate[1] != d {
            return Err(bad(format!("layer {l}: gate_proj has shape {gate:?}")));
        }
        let layer = LayerShape {
            num_attention_heads: h,
            num_key_value_heads: g,
            intermediate_size: gate[0],
        };
        for t in &tensors {
            expect(&t.key(l), &t.shape(config, &layer))?;
        }
        layers.push(layer);
    }
    let known = 2 + usize::from(!config.tie_word_embeddings) + tensors.len() * held;
    if weights.len() != known {
        let extra: Vec<&String> = weights
            .keys()
            .filter(|k| {
                ![EMBED_TOKENS, FINAL_NORM, LM_HEAD].contains(&k.as_str())
                    && LayerTensor::parse(k).is_none_or(|(l, t)| l >= held || !tensors.contains(&t))
            })
            .take(5)
            .collect();
        let hint = if !config.family().has_qkv_bias()
            && extra.iter().any(|k| k.ends_with("_proj.bias"))
        {
            "; the checkpoint has attention biases that config.json (attention_bias / architectures) says this family does not have"
        } else {
            ""
        };
        return Err(bad(format!(
            "unexpected tensors for a {}-layer {:?} model: {extra:?}{hint}",
            config.num_hidden_layers,
            config.family()
        )));
    }
    Ok(layers)
}
