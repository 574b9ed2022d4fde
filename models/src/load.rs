//! Between host weights under HF names ([`WeightMap`]) and a [`Llama`] on a device: the one
//! table of names and layouts. HF stores linear weights `[out, in]`; burn's `Linear` computes
//! `x · W` with `W` as `[in, out]`, so linear weights are transposed on the way in (into
//! contiguous `[in, out]` storage, never a strided view) and out.

use std::borrow::Cow;

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::{backend::Backend, DType as BurnDType, Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};
use shears_core::formats::safetensors::LazyTensors;
use shears_core::layer_tensors::{EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use shears_core::model_files::check_weights;
use shears_core::LayerTensor;
use shears_core::{
    DType, Error, HostTensor, LayerShape, LlamaConfig, ModelFiles, Result, WeightMap,
};

use crate::llama::{Attention, DecoderLayer, Llama, LlamaModel, Mlp, RmsNorm};

/// `[rows, cols]` row-major to `[cols, rows]` row-major, in cache-friendly tiles.
pub fn transpose_2d(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// burn's name for a Shears dtype.
pub fn burn_dtype(d: DType) -> BurnDType {
    match d {
        DType::F32 => BurnDType::F32,
        DType::F16 => BurnDType::F16,
        DType::BF16 => BurnDType::BF16,
    }
}

struct Builder<'a, B: Backend> {
    weights: &'a WeightMap,
    device: &'a B::Device,
    dtype: BurnDType,
}

impl<B: Backend> Builder<'_, B> {
    fn host(&self, name: &str) -> &HostTensor {
        // Presence and shapes were checked by `check_weights`.
        &self.weights[name]
    }

    fn tensor<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let t = self.host(name);
        let data = TensorData::new(t.to_f32_vec(), t.shape.clone());
        let t = Tensor::<B, D>::from_data(data, self.device);
        // "f32" means full precision: the backend's float type (f64 backends stay f64).
        match self.dtype {
            BurnDType::F32 => t,
            half => t.cast(half),
        }
    }

    /// A linear layer whose weight is stored contiguously as `[in, out]`, the layout the
    /// projections multiply with (`x [n, in] · W [in, out]`): transposed once here, on the host,
    /// instead of a transposed view that every call would copy.
    fn linear(&self, name: &str) -> Linear<B> {
        self.linear_with(name, None)
    }

    /// [`Self::linear`] with the bias stored under `bias` (a family's q/k/v biases).
    fn linear_with(&self, name: &str, bias: Option<&str>) -> Linear<B> {
        let t = self.host(name);
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let data = transpose_2d(&t.to_f32_vec(), rows, cols);
        let w = Tensor::<B, 2>::from_data(TensorData::new(data, [cols, rows]), self.device);
        let w = match self.dtype {
            BurnDType::F32 => w,
            half => w.cast(half),
        };
        Linear {
            weight: Param::from_tensor(w),
            bias: bias.map(|b| Param::from_tensor(self.tensor(b))),
        }
    }

    fn norm(&self, name: &str, eps: f64, offset: f64) -> RmsNorm<B> {
        RmsNorm {
            weight: Param::from_tensor(self.tensor(name)),
            eps,
            offset,
        }
    }
}

/// Build a model on `device` from host weights that [`check_weights`] accepted, with
/// parameters in `dtype`.
pub fn build<B: Backend>(
    config: &LlamaConfig,
    layers: &[LayerShape],
    weights: &WeightMap,
    device: &B::Device,
    dtype: DType,
) -> Result<Llama<B>> {
    let bdt = burn_dtype(dtype);
    if dtype != DType::F32 && !B::supports_dtype(device, bdt) {
        return Err(Error::invalid(format!(
            "the {} backend does not support {dtype:?} parameters; use f32 or another backend",
            B::name(device)
        )));
    }
    // The distinct ropes, and each layer's index among them.
    let mut ropes = Vec::new();
    let mut rope_index = Vec::with_capacity(layers.len());
    for l in 0..layers.len() {
        let r = config.rope_of_layer(l).map_err(Error::invalid)?;
        let i = ropes.iter().position(|x| *x == r).unwrap_or_else(|| {
            ropes.push(r);
            ropes.len() - 1
        });
        rope_index.push(i);
    }
    if ropes.is_empty() {
        ropes.push(config.rope().map_err(Error::invalid)?);
    }
    let act = config.activation().map_err(Error::invalid)?;
    let b = Builder::<B> {
        weights,
        device,
        dtype: bdt,
    };
    let (eps, family) = (config.rms_norm_eps, config.family());
    let offset = family.norm_offset() as f64;
    let query_scale = config.attention_scale() * (config.head_dim() as f64).sqrt();
    let decoder = layers
        .iter()
        .enumerate()
        .map(|(l, shape)| {
            let linear = |t: LayerTensor| {
                let bias = t.bias().filter(|_| family.has_qkv_bias());
                b.linear_with(&t.key(l), bias.map(|x| x.key(l)).as_deref())
            };
            let norm = |t: LayerTensor| b.norm(&t.key(l), eps, offset);
            let qk_norm = |t: LayerTensor| family.has_qk_norm().then(|| norm(t));
            let ffn_norm = |t: LayerTensor| family.has_sandwich_norms().then(|| norm(t));
            DecoderLayer {
                self_attn: Attention {
                    q_proj: linear(LayerTensor::QProj),
                    k_proj: linear(LayerTensor::KProj),
                    v_proj: linear(LayerTensor::VProj),
                    o_proj: linear(LayerTensor::OProj),
                    num_heads: shape.num_attention_heads,
                    num_kv_heads: shape.num_key_value_heads,
                    head_dim: config.head_dim(),
                    window: config.attention_window(l),
                    q_norm: qk_norm(LayerTensor::QNorm),
                    k_norm: qk_norm(LayerTensor::KNorm),
                    // Exactly 1 where the scale is head_dim's, so no multiply is added.
                    query_scale: if (query_scale - 1.0).abs() < 1e-12 {
                        1.0
                    } else {
                        query_scale
                    },
                    rope: rope_index[l],
                },
                mlp: Mlp {
                    gate_proj: linear(LayerTensor::GateProj),
                    up_proj: linear(LayerTensor::UpProj),
                    down_proj: linear(LayerTensor::DownProj),
                    act,
                },
                input_layernorm: norm(LayerTensor::InputLayernorm),
                post_attention_layernorm: norm(LayerTensor::PostAttentionLayernorm),
                pre_feedforward_layernorm: ffn_norm(LayerTensor::PreFeedforwardLayernorm),
                post_feedforward_layernorm: ffn_norm(LayerTensor::PostFeedforwardLayernorm),
            }
        })
        .collect();
    Ok(Llama {
        model: LlamaModel {
            embed_tokens: Embedding {
                weight: Param::from_tensor(b.tensor(EMBED_TOKENS)),
            },
            layers: decoder,
            norm: b.norm(FINAL_NORM, eps, offset),
        },
        lm_head: (!config.tie_word_embeddings).then(|| b.linear(LM_HEAD)),
        config: config.clone(),
        ropes,
        autocast: None,
    })
}

/// Build a model from loaded model files.
pub fn from_files<B: Backend>(
    files: &ModelFiles,
    device: &B::Device,
    dtype: DType,
) -> Result<Llama<B>> {
    build(&files.config, &files.layers, &files.weights, device, dtype)
}

/// Host copy of a device tensor, stored as `dtype`.
pub fn host_of<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t.cast(BurnDType::F32).into_data();
    let values: Vec<f32> = data.into_vec().expect("f32 tensor data");
    HostTensor::f32(shape, values).to_dtype(dtype)
}

/// Visits every parameter of a [`Llama`] with its HF name. `hf_layout_transposed` is true for
/// linear weights, whose burn layout is the transpose of HF's.
pub trait ParamVisitor<B: Backend> {
    /// Called once per parameter.
    fn visit<const D: usize>(
        &mut self,
        hf_name: String,
        param: &Param<Tensor<B, D>>,
        hf_layout_transposed: bool,
    );
}

/// A layer's parameter for a table entry: a 1-D gain or bias, or a linear weight.
enum LayerParam<'a, B: Backend> {
    Vector(&'a Param<Tensor<B, 1>>),
    Linear(&'a Param<Tensor<B, 2>>),
}

fn layer_param<B: Backend>(layer: &DecoderLayer<B>, t: LayerTensor) -> LayerParam<'_, B> {
    let (a, m) = (&layer.self_attn, &layer.mlp);
    match t {
        LayerTensor::InputLayernorm => LayerParam::Vector(&layer.input_layernorm.weight),
        LayerTensor::PostAttentionLayernorm => {
            LayerParam::Vector(&layer.post_attention_layernorm.weight)
        }
        LayerTensor::QBias | LayerTensor::KBias | LayerTensor::VBias => {
            let proj = match t {
                LayerTensor::QBias => &a.q_proj,
                LayerTensor::KBias => &a.k_proj,
                _ => &a.v_proj,
            };
            LayerParam::Vector(
                proj.bias
                    .as_ref()
                    .expect("a family with biases builds its projections with them"),
            )
        }
        LayerTensor::QNorm | LayerTensor::KNorm => {
            let n = if t == LayerTensor::QNorm {
                &a.q_norm
            } else {
                &a.k_norm
            };
            LayerParam::Vector(&n.as_ref().expect("a family with q/k norms has them").weight)
        }
        LayerTensor::PreFeedforwardLayernorm | LayerTensor::PostFeedforwardLayernorm => {
            let n = if t == LayerTensor::PreFeedforwardLayernorm {
                &layer.pre_feedforward_layernorm
            } else {
                &layer.post_feedforward_layernorm
            };
            LayerParam::Vector(&n.as_ref().expect("a sandwich family has them").weight)
        }
        LayerTensor::QProj => LayerParam::Linear(&a.q_proj.weight),
        LayerTensor::KProj => LayerParam::Linear(&a.k_proj.weight),
        LayerTensor::VProj => LayerParam::Linear(&a.v_proj.weight),
        LayerTensor::OProj => LayerParam::Linear(&a.o_proj.weight),
        LayerTensor::GateProj => LayerParam::Linear(&m.gate_proj.weight),
        LayerTensor::UpProj => LayerParam::Linear(&m.up_proj.weight),
        LayerTensor::DownProj => LayerParam::Linear(&m.down_proj.weight),
    }
}

/// Walk the parameters in a fixed order (embedding, each layer's tensors in table order, final
/// norm, LM head) under their HF names.
pub fn visit_params<B: Backend, V: ParamVisitor<B>>(model: &Llama<B>, v: &mut V) {
    v.visit(EMBED_TOKENS.into(), &model.model.embed_tokens.weight, false);
    for (l, layer) in model.model.layers.iter().enumerate() {
        for t in LayerTensor::of(&model.config) {
            match layer_param(layer, t) {
                LayerParam::Vector(p) => v.visit(t.key(l), p, false),
                LayerParam::Linear(p) => v.visit(t.key(l), p, true),
            }
        }
    }
    v.visit(FINAL_NORM.into(), &model.model.norm.weight, false);
    if let Some(head) = &model.lm_head {
        v.visit(LM_HEAD.into(), &head.weight, true);
    }
}

/// The model's parameters as host tensors under HF names, in HF layout, stored as `dtype`.
pub fn to_weights<B: Backend>(model: &Llama<B>, dtype: DType) -> WeightMap {
    struct Collect(WeightMap, DType);
    impl<B: Backend> ParamVisitor<B> for Collect {
        fn visit<const D: usize>(
            &mut self,
            name: String,
            p: &Param<Tensor<B, D>>,
            transposed: bool,
        ) {
            let t = p.val();
            let t = if transposed { t.transpose() } else { t };
            self.0.insert(name, host_of(t, self.1));
        }
    }
    let mut c = Collect(WeightMap::new(), dtype);
    visit_params(model, &mut c);
    c.0
}

/// The model's weights under HF names, in HF layout, as [`LazyTensors`]: each tensor's host copy
/// (in `dtype`) is made only when the writer reaches it, so writing a checkpoint holds one
/// tensor's host copy at a time instead of the whole model's.
pub fn lazy_weights<B: Backend>(model: &Llama<B>, dtype: DType) -> LazyTensors<'static> {
    struct Collect(LazyTensors<'static>, DType);
    impl<B: Backend> ParamVisitor<B> for Collect {
        fn visit<const D: usize>(
            &mut self,
            name: String,
            p: &Param<Tensor<B, D>>,
            transposed: bool,
        ) {
            let t = p.val();
            let t = if transposed { t.transpose() } else { t };
            let dtype = self.1;
            self.0.push(name, dtype, t.dims().to_vec(), move || {
                Cow::Owned(host_of(t, dtype))
            });
        }
    }
    let mut c = Collect(LazyTensors::new(), dtype);
    visit_params(model, &mut c);
    c.0
}

/// Widths of every layer of a built model.
pub fn layer_shapes<B: Backend>(model: &Llama<B>) -> Vec<LayerShape> {
    model
        .model
        .layers
        .iter()
        .map(|l| LayerShape {
            num_attention_heads: l.self_attn.num_heads,
            num_key_value_heads: l.self_attn.num_kv_heads,
            intermediate_size: l.mlp.gate_proj.weight.dims()[1],
        })
        .collect()
}

/// Seeded random weights for `config` (normal with std 0.02, norms at 1 + small noise), the
/// same on every backend: tiny models for tests and benchmarks.
pub fn random_weights(config: &LlamaConfig, seed: u64) -> WeightMap {
    random_weights_for(config, &config.uniform_layer_shapes(), seed)
}

/// Like [`random_weights`], with per-layer widths.
pub fn random_weights_for(config: &LlamaConfig, layers: &[LayerShape], seed: u64) -> WeightMap {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        // Box-Muller: enough for initialisation, and independent of rand_distr's versions.
        (0..n)
            .map(|_| {
                let u1: f32 = rng.random::<f32>().max(1e-7);
                let u2: f32 = rng.random::<f32>();
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    };
    let (v, d) = (config.vocab_size, config.hidden_size);
    let mut w = WeightMap::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        w.insert(name, HostTensor::f32(shape, data));
    };
    put(EMBED_TOKENS.into(), vec![v, d], normal(v * d, 0.02));
    let offset = config.family().norm_offset();
    let norm_gain =
        |noise: Vec<f32>| -> Vec<f32> { noise.iter().map(|x| 1.0 - offset + x).collect() };
    put(FINAL_NORM.into(), vec![d], norm_gain(normal(d, 0.1)));
    if !config.tie_word_embeddings {
        put(LM_HEAD.into(), vec![v, d], normal(v * d, 0.02));
    }
    // Projections first, then norms: the order the random streams were always drawn in.
    for (l, shape) in layers.iter().enumerate() {
        let tensors = LayerTensor::of(config);
        for t in tensors.iter().filter(|t| !t.is_vector()) {
            let s = t.shape(config, shape);
            put(t.key(l), s.clone(), normal(s.iter().product(), 0.02));
        }
        for t in tensors.iter().filter(|t| t.is_norm()) {
            let n = t.shape(config, shape)[0];
            put(t.key(l), vec![n], norm_gain(normal(n, 0.1)));
        }
        // Biases last: models without them draw the same streams as before they existed.
        for t in tensors.iter().filter(|t| t.is_bias()) {
            let s = t.shape(config, shape);
            put(t.key(l), s.clone(), normal(s.iter().product(), 0.02));
        }
    }
    w
}

/// A seeded random model of `config` on `device` (f32).
pub fn random_model<B: Backend>(
    config: &LlamaConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Llama<B>> {
    let weights = random_weights(config, seed);
    let layers = check_weights(config, &weights, std::path::Path::new("<random>"))?;
    build(config, &layers, &weights, device, DType::F32)
}
