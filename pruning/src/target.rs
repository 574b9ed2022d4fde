//! The architecture to prune to, and which mask modules reach it.
//!
//! A target is read from a TOML file, or from the `config.json` of an existing model (the
//! paper's "use an existing model's shape"). It is validated against the source: every width at
//! most the source's, query heads split into kv groups, no more query heads per group than the
//! source has (GQA-aware pruning removes whole groups and heads inside groups), head dim kept.

use std::path::Path;

use serde::{Deserialize, Serialize};
use shears_core::{Error, LlamaConfig, Result};

/// Target widths. Head dim and vocabulary are kept from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetShape {
    /// Decoder layers L_T.
    pub num_hidden_layers: usize,
    /// Residual width d_T.
    pub hidden_size: usize,
    /// Query heads H_T.
    pub num_attention_heads: usize,
    /// Key/value heads G_T (defaults to H_T for MHA sources).
    pub num_key_value_heads: usize,
    /// MLP width I_T.
    pub intermediate_size: usize,
}

/// What a target file may say; `num_key_value_heads` may be left out for MHA.
#[derive(Debug, Deserialize)]
struct TargetFile {
    #[serde(alias = "layers")]
    num_hidden_layers: usize,
    #[serde(alias = "hidden")]
    hidden_size: usize,
    #[serde(alias = "heads")]
    num_attention_heads: usize,
    #[serde(default, alias = "kv_heads")]
    num_key_value_heads: Option<usize>,
    #[serde(alias = "intermediate")]
    intermediate_size: usize,
}

impl From<TargetFile> for TargetShape {
    fn from(f: TargetFile) -> Self {
        TargetShape {
            num_hidden_layers: f.num_hidden_layers,
            hidden_size: f.hidden_size,
            num_attention_heads: f.num_attention_heads,
            num_key_value_heads: f.num_key_value_heads.unwrap_or(f.num_attention_heads),
            intermediate_size: f.intermediate_size,
        }
    }
}

impl TargetShape {
    /// The source's own shape (nothing pruned).
    pub fn of(config: &LlamaConfig) -> Self {
        TargetShape {
            num_hidden_layers: config.num_hidden_layers,
            hidden_size: config.hidden_size,
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_kv_heads(),
            intermediate_size: config.intermediate_size,
        }
    }

    /// Read a target: a `.toml` file (`num_hidden_layers`, `hidden_size`,
    /// `num_attention_heads`, `num_key_value_heads`, `intermediate_size`, or the short names
    /// `layers`, `hidden`, `heads`, `kv_heads`, `intermediate`, at the top level or under
    /// `[target]`), an HF `config.json`, or a model directory holding one.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = shears_core::fsutil::read_text(&file, shears_core::fsutil::SETTINGS_FILE_BYTES)?;
        let bad = |m: String| Error::format(&file, format!("invalid target shape: {m}"));
        let parsed: TargetFile = if file.extension().is_some_and(|e| e == "toml") {
            let v: toml::Value = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let table = v.get("target").cloned().unwrap_or(v);
            table
                .try_into()
                .map_err(|e: toml::de::Error| bad(e.to_string()))?
        } else {
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
        };
        Ok(parsed.into())
    }

    /// Query heads per kv group, r_T.
    pub fn heads_per_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// Check the target against `source` (which must have uniform layers) and return the
    /// problems as one message.
    pub fn validate(&self, source: &LlamaConfig) -> std::result::Result<(), String> {
        let t = self;
        let dims = [
            (
                "num_hidden_layers",
                t.num_hidden_layers,
                source.num_hidden_layers,
            ),
            ("hidden_size", t.hidden_size, source.hidden_size),
            (
                "num_attention_heads",
                t.num_attention_heads,
                source.num_attention_heads,
            ),
            (
                "num_key_value_heads",
                t.num_key_value_heads,
                source.num_kv_heads(),
            ),
            (
                "intermediate_size",
                t.intermediate_size,
                source.intermediate_size,
            ),
        ];
        for (name, want, have) in dims {
            if want == 0 {
                return Err(format!(
                    "target {name} is 0; every dimension must be at least 1"
                ));
            }
            if want > have {
                return Err(format!(
                    "target {name} {want} is larger than the source's {have}; pruning only removes"
                ));
            }
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(format!(
                "target num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        let r_src = source.num_attention_heads / source.num_kv_heads();
        if t.heads_per_group() > r_src {
            return Err(format!(
                "target has {} query heads per kv group but the source has {r_src}; pruning keeps whole groups and heads inside groups, so it cannot add heads to a group",
                t.heads_per_group()
            ));
        }
        let hd = source.head_dim();
        if source.head_dim.is_none() && t.hidden_size != t.num_attention_heads * hd {
            return Err(format!(
                "the source derives head_dim from hidden_size / num_attention_heads, so the target's hidden_size must be num_attention_heads x head_dim = {} x {hd} = {} (it is {})",
                t.num_attention_heads,
                t.num_attention_heads * hd,
                t.hidden_size
            ));
        }
        Ok(())
    }

    /// The target's HF config: the source's with the target widths (and an explicit head_dim).
    pub fn config(&self, source: &LlamaConfig) -> LlamaConfig {
        // The first layers' kinds; finalize names the kept layers' own.
        let first: Vec<usize> = (0..self.num_hidden_layers).collect();
        let mut c = source.with_layers(&first);
        c.head_dim = Some(source.head_dim());
        c.hidden_size = self.hidden_size;
        c.num_attention_heads = self.num_attention_heads;
        c.num_key_value_heads = Some(self.num_key_value_heads);
        c.intermediate_size = self.intermediate_size;
        c
    }
}

/// A prunable structure, with one hard-concrete mask and one pair of Lagrange multipliers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneModule {
    /// `z_hidden [d]`: residual-stream channels, shared by all layers.
    Hidden,
    /// `z_layer [L]`: whole layers (attention and MLP together).
    Layer,
    /// `z_int [L, I]`: MLP channels per layer.
    Intermediate,
    /// `z_kv [L, G]`: whole kv groups (their k/v rows and all their query heads); the reference's
    /// head mask for MHA models.
    KvHeads,
    /// `z_q [L, G, r]`: query heads inside their group (GQA sources only).
    QueryHeads,
}

impl PruneModule {
    /// Every module in a fixed order.
    pub const ALL: [PruneModule; 5] = [
        PruneModule::Hidden,
        PruneModule::Layer,
        PruneModule::Intermediate,
        PruneModule::KvHeads,
        PruneModule::QueryHeads,
    ];

    /// Name in configs and logs.
    pub fn name(self) -> &'static str {
        match self {
            PruneModule::Hidden => "hidden",
            PruneModule::Layer => "layer",
            PruneModule::Intermediate => "intermediate",
            PruneModule::KvHeads => "kv_heads",
            PruneModule::QueryHeads => "query_heads",
        }
    }
}

impl std::str::FromStr for PruneModule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        PruneModule::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown module '{s}' (hidden, layer, intermediate, kv_heads, query_heads)")
            })
    }
}

/// A validated pruning problem: source, target, and the modules that carry masks.
#[derive(Debug, Clone, PartialEq)]
pub struct PruningSpec {
    pub source: LlamaConfig,
    pub target: TargetShape,
    /// Masked modules, in [`PruneModule::ALL`] order.
    pub modules: Vec<PruneModule>,
}

impl PruningSpec {
    /// Validate `target` against `source` and choose the masked modules: `modules` as given,
    /// or by default every module whose target differs from the source. A target that differs
    /// in a dimension whose module is switched off is an error (upstream issue #74).
    pub fn new(
        source: &LlamaConfig,
        target: TargetShape,
        modules: Option<&[PruneModule]>,
    ) -> Result<Self> {
        target.validate(source).map_err(Error::invalid)?;
        let r_src = source.num_attention_heads / source.num_kv_heads();
        let differs = |m: PruneModule| match m {
            PruneModule::Hidden => target.hidden_size != source.hidden_size,
            PruneModule::Layer => target.num_hidden_layers != source.num_hidden_layers,
            PruneModule::Intermediate => target.intermediate_size != source.intermediate_size,
            PruneModule::KvHeads => target.num_key_value_heads != source.num_kv_heads(),
            PruneModule::QueryHeads => target.heads_per_group() != r_src,
        };
        let modules: Vec<PruneModule> = match modules {
            None => PruneModule::ALL
                .into_iter()
                .filter(|m| differs(*m))
                .collect(),
            Some(given) => {
                let missing: Vec<&str> = PruneModule::ALL
                    .into_iter()
                    .filter(|m| differs(*m) && !given.contains(m))
                    .map(|m| m.name())
                    .collect();
                if !missing.is_empty() {
                    return Err(Error::invalid(format!(
                        "the target changes {} but those modules are not pruned; add them to the pruned modules (otherwise the model cannot reach the target)",
                        missing.join(", ")
                    )));
                }
                PruneModule::ALL
                    .into_iter()
                    .filter(|m| given.contains(m))
                    .collect()
            }
        };
        if modules.contains(&PruneModule::QueryHeads) && r_src == 1 {
            return Err(Error::invalid(
                "query_heads masks need a GQA source (more query heads than kv heads); for MHA models kv_heads is the head mask",
            ));
        }
        Ok(PruningSpec {
            source: source.clone(),
            target,
            modules,
        })
    }

    /// Whether `m` carries a mask.
    pub fn has(&self, m: PruneModule) -> bool {
        self.modules.contains(&m)
    }

    /// Query heads per group in the source, r.
    pub fn heads_per_group(&self) -> usize {
        self.source.num_attention_heads / self.source.num_kv_heads()
    }

    /// `(rows, entries per row)` of module `m`'s mask.
    pub fn mask_shape(&self, m: PruneModule) -> (usize, usize) {
        let s = &self.source;
        let (l, g) = (s.num_hidden_layers, s.num_kv_heads());
        match m {
            PruneModule::Hidden => (1, s.hidden_size),
            PruneModule::Layer => (1, l),
            PruneModule::Intermediate => (l, s.intermediate_size),
            PruneModule::KvHeads => (l, g),
            PruneModule::QueryHeads => (l * g, self.heads_per_group()),
        }
    }

    /// Entries per row that the target keeps for module `m`.
    pub fn target_kept(&self, m: PruneModule) -> usize {
        let t = &self.target;
        match m {
            PruneModule::Hidden => t.hidden_size,
            PruneModule::Layer => t.num_hidden_layers,
            PruneModule::Intermediate => t.intermediate_size,
            PruneModule::KvHeads => t.num_key_value_heads,
            PruneModule::QueryHeads => t.heads_per_group(),
        }
    }

    /// Per-module target sparsity `1 - N_T / N`.
    pub fn target_sparsity(&self, m: PruneModule) -> f64 {
        let (_, n) = self.mask_shape(m);
        1.0 - self.target_kept(m) as f64 / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama7b() -> LlamaConfig {
        LlamaConfig::from_json_str(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,
            "intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":32,"rms_norm_eps":1e-5}"#,
        )
        .unwrap()
    }

    fn shape(l: usize, d: usize, h: usize, g: usize, i: usize) -> TargetShape {
        TargetShape {
            num_hidden_layers: l,
            hidden_size: d,
            num_attention_heads: h,
            num_key_value_heads: g,
            intermediate_size: i,
        }
    }

    #[test]
    fn sheared_targets_choose_the_canonical_modules() {
        let s = PruningSpec::new(&llama7b(), shape(24, 2048, 16, 16, 5504), None).unwrap();
        assert_eq!(
            s.modules,
            vec![
                PruneModule::Hidden,
                PruneModule::Layer,
                PruneModule::Intermediate,
                PruneModule::KvHeads
            ]
        );
        let s = PruningSpec::new(&llama7b(), shape(32, 2560, 20, 20, 6912), None).unwrap();
        assert!(!s.has(PruneModule::Layer));
        assert!((s.target_sparsity(PruneModule::Intermediate) - 0.372093).abs() < 1e-6);
    }

    #[test]
    fn bad_targets_are_clear_errors() {
        let src = llama7b();
        let err = |t: TargetShape| PruningSpec::new(&src, t, None).unwrap_err().to_string();
        assert!(err(shape(40, 4096, 32, 32, 11008)).contains("larger than the source"));
        assert!(err(shape(0, 4096, 32, 32, 11008)).contains("is 0"));
        assert!(err(shape(32, 2560, 20, 3, 6912)).contains("not a multiple"));
        assert!(err(shape(32, 2560, 20, 10, 6912)).contains("query heads per kv group"));
        assert!(err(shape(32, 2048, 20, 20, 6912)).contains("num_attention_heads x head_dim"));
        // Switching off a module whose dimension changes is upstream issue #74's trap.
        let e = PruningSpec::new(
            &src,
            shape(24, 2048, 16, 16, 5504),
            Some(&[PruneModule::KvHeads, PruneModule::Intermediate]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hidden, layer"), "{e}");
        let e = PruningSpec::new(
            &src,
            TargetShape::of(&src),
            Some(&[PruneModule::QueryHeads]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("GQA source"), "{e}");
    }

    #[test]
    fn target_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(
            &p,
            "[target]\nlayers = 20\nhidden = 384\nheads = 6\nkv_heads = 3\nintermediate = 1024\n",
        )
        .unwrap();
        assert_eq!(
            TargetShape::from_file(&p).unwrap(),
            shape(20, 384, 6, 3, 1024)
        );
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"num_hidden_layers":24,"hidden_size":2048,"num_attention_heads":16,"intermediate_size":5504,"model_type":"x"}"#).unwrap();
        assert_eq!(
            TargetShape::from_file(dir.path()).unwrap(),
            shape(24, 2048, 16, 16, 5504)
        );
        std::fs::write(&p, r#"{"num_hidden_layers":24}"#).unwrap();
        let e = TargetShape::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("hidden_size"),
            "{e}"
        );
    }
}
