//! The LLaMA-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, tied or untied
//! LM head. Module paths mirror HF names (`model.layers.N.self_attn.q_proj`), and every layer
//! carries its own widths so finalised pruned models with non-uniform layers run unchanged.
//!
//! The forward keeps the places where the pruning masks of the spec (§1.3, §11.1) act as
//! separate, named values: the embedding output, each norm output, the per-head attention
//! context before `o_proj` ([`Attention::context`]), the `o_proj` output, the MLP up-projection
//! ([`Mlp::forward`]) and the MLP output.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::{backend::Backend, Bool, DType, Int, Tensor};
use shears_core::{Activation, LlamaConfig, Rope};

use crate::cache::{KvCache, LayerCache};
use crate::masks::{ForwardMasks, LayerMasks};
use crate::ops::{self, ShearsOps};
use crate::rope;
use crate::taps::LayerTaps;

// The small tensor helpers live with the ops (which use them too); re-exported here, where
// the rest of the workspace has always found them.
pub use crate::ops::tensor::{sigmoid, silu, to_dtype, upcast};

/// Root-mean-square layer norm, computed in f32 whatever the parameter dtype (as HF does).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel gain `[d]` (minus [`RmsNorm::offset`]).
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
    /// Added to the stored weight to give the gain: 0, or 1 for Gemma's `x · (1 + w)`.
    pub offset: f64,
}

impl<B: ShearsOps> RmsNorm<B> {
    /// The gain `weight + offset` `[d]`, in the parameter dtype.
    fn gain(&self) -> Tensor<B, 1> {
        match self.offset {
            0.0 => self.weight.val(),
            off => self.weight.val().add_scalar(off),
        }
    }

    /// Whether the fused kernel computes what HF does on `x`: same dtype, and for an offset
    /// gain full precision (HF adds the offset in f32; a half-precision `1 + w` would round).
    fn fusable(&self, dtype: DType) -> bool {
        dtype == self.weight.val().dtype()
            && (self.offset == 0.0 || matches!(dtype, DType::F32 | DType::F64))
    }

    /// Normalise over the last axis (the fused kernel where the backend has one).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let d = x.dims()[D - 1];
        if self.fusable(x.dtype()) {
            if let Some(y) = ops::rms_norm_fused(&x, &self.gain(), self.eps, d) {
                return y;
            }
        }
        let dtype = x.dtype();
        let xf = upcast(x);
        let var = xf.clone().square().mean_dim(D - 1);
        self.finish(xf, var, dtype)
    }

    /// The masked norm of the spec (§1.3): the mean square is taken over the `kept` channels
    /// where `z` is non-zero (the others are exactly zero in the residual stream), and the
    /// output is multiplied by `z`. With every channel kept this is [`RmsNorm::forward`] times z.
    /// The fused kernel folds `z` into the gain (`w · z`, a `[d]` product).
    pub fn forward_masked<const D: usize>(
        &self,
        x: Tensor<B, D>,
        z: &Tensor<B, 1>,
        kept: usize,
    ) -> Tensor<B, D> {
        if self.fusable(x.dtype()) {
            let wz = self.gain() * to_dtype(z.clone(), x.dtype());
            if let Some(y) = ops::rms_norm_fused(&x, &wz, self.eps, kept) {
                return y;
            }
        }
        let dtype = x.dtype();
        let xf = upcast(x);
        let var = xf.clone().square().sum_dim(D - 1).div_scalar(kept as f64);
        self.finish(xf, var, dtype) * to_dtype(z.clone(), dtype).unsqueeze::<D>()
    }

    fn finish<const D: usize>(
        &self,
        xf: Tensor<B, D>,
        var: Tensor<B, D>,
        dtype: DType,
    ) -> Tensor<B, D> {
        // A true division: burn-ndarray's SIMD `recip` is an approximation (~2e-5 relative
        // gradient error against PyTorch with it, ~5e-7 without).
        let normed = xf / var.add_scalar(self.eps).sqrt();
        if self.offset == 0.0 {
            normed.cast(dtype) * to_dtype(self.weight.val(), dtype).unsqueeze::<D>()
        } else {
            // Gemma: `normed · (1 + w)` in f32, then the cast.
            let gain = upcast(self.weight.val()).add_scalar(self.offset);
            (normed * gain.unsqueeze::<D>()).cast(dtype)
        }
    }
}

/// Grouped-query self-attention (`num_kv_heads` divides `num_heads`; MHA when equal).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// Query heads, H.
    pub num_heads: usize,
    /// Key/value heads, G.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Sliding window: each query sees itself and the `window - 1` keys before it; `None`:
    /// every earlier key.
    pub window: Option<usize>,
    /// Per-head RMSNorm of the queries and keys `[head_dim]`, before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    /// Multiplies the queries so that the attention's `1/sqrt(head_dim)` gives the family's
    /// score scale (Gemma's `query_pre_attn_scalar^-1/2`); 1 elsewhere.
    pub query_scale: f64,
    /// Index of this layer's RoPE tables in [`Positions::ropes`].
    pub rope: usize,
}

/// `x [.., in] · W [in, out]` as one 2-D GEMM over all leading positions (`[b·t, in]`), on the
/// weight's contiguous `[in, out]` storage: no per-call copy of the weight and no batched
/// matmul whose weight gradient is a sum of per-batch products. The weight is cast to `x`'s
/// dtype when they differ (autocast: f32 parameters, bf16 compute).
pub fn linear<B: ShearsOps>(l: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let w = to_dtype(l.weight.val(), x.dtype());
    let n = w.dims()[1];
    let dtype = x.dtype();
    let y = ops::matmul(x.reshape([b * t, d]), w);
    let y = match &l.bias {
        Some(bias) => y + to_dtype(bias.val(), dtype).unsqueeze::<2>(),
        None => y,
    };
    y.reshape([b, t, n])
}

impl<B: ShearsOps> Attention<B> {
    /// Per-head attention context `[batch, len, H, head_dim]` (the contiguous layout, heads
    /// not yet merged), before `o_proj`; a head mask multiplies in here. `mask` is the causal
    /// mask `[len, past+len]` (true = hidden) the generic attention reads, `None` when no
    /// position needs hiding; a fused kernel applies causality itself.
    pub fn context(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 4> {
        let [b, t, _] = x.dims();
        let (h, g, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut q = linear(&self.q_proj, x.clone()).reshape([b, t, h, hd]);
        let mut k = linear(&self.k_proj, x.clone()).reshape([b, t, g, hd]);
        let v = linear(&self.v_proj, x).reshape([b, t, g, hd]);
        if let Some(n) = &self.q_norm {
            q = n.forward(q);
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(k);
        }
        if self.query_scale != 1.0 {
            q = q.mul_scalar(self.query_scale);
        }
        let (cos, sin) = &pos.ropes[self.rope];
        let mask = pos.masks.get(self.window);
        let q = rope::apply(q, cos, sin);
        let k = rope::apply(k, cos, sin);
        let (k, v) = match cache {
            Some(c) => c.append(k, v),
            None => (k, v),
        };
        ops::causal_attention(q, k, v, mask, self.window)
    }

    /// Merge the heads of `ctx [b, t, H, hd]` and project back to the residual width.
    pub fn project(&self, ctx: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, t, h, hd] = ctx.dims();
        linear(&self.o_proj, ctx.reshape([b, t, h * hd]))
    }
}

/// Gated MLP: `down(act(gate(x)) * up(x))`, SwiGLU (SiLU) or Gemma's GELU-tanh.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

/// GELU, tanh approximation (PyTorch's `gelu(x, approximate="tanh")`), in `x`'s dtype:
/// `x/2 · (1 + tanh(sqrt(2/π) · (x + 0.044715 x³)))`.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube.mul_scalar(0.044715)).mul_scalar(c);
    x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
}

impl<B: ShearsOps> Mlp<B> {
    /// Apply the MLP.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_masked(x, None)
    }

    /// Apply the MLP with the intermediate mask `z_int [I]` on the `up_proj` output.
    pub fn forward_masked(&self, x: Tensor<B, 3>, z_int: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        linear(&self.down_proj, self.activation(x, z_int))
    }

    /// The gated activation `act(gate(x)) · up(x) [· z_int]` `[b, t, I]`, `down_proj`'s input.
    pub fn activation(&self, x: Tensor<B, 3>, z_int: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        let gate = linear(&self.gate_proj, x.clone());
        let up = linear(&self.up_proj, x);
        match (self.act, z_int) {
            (Activation::Silu, Some(z)) => ops::swiglu_masked(gate, up, z),
            (Activation::Silu, None) => ops::swiglu(gate, up),
            (Activation::GeluTanh, z) => {
                let y = gelu_tanh(gate) * up;
                match z {
                    Some(z) => {
                        let z = to_dtype(z.clone(), y.dtype());
                        y * z.unsqueeze::<3>()
                    }
                    None => y,
                }
            }
        }
    }
}

/// One pre-norm decoder block; Gemma's "sandwich" block when it has the feedforward norms.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    /// Before the MLP (LLaMA); after attention, on its output (Gemma's sandwich).
    pub post_attention_layernorm: RmsNorm<B>,
    /// Gemma: before the MLP.
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Gemma: after the MLP, on its output.
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
}

impl<B: ShearsOps> DecoderLayer<B> {
    /// `x + attn(norm1(x))`, then `+ mlp(norm2(.))` (Gemma: each sublayer's output normed too).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        self.forward_masked(x, pos, cache, &LayerMasks::none())
    }

    /// The block with pruning masks applied where the spec puts them (§1.3, §11.1).
    pub fn forward_masked(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
        m: &LayerMasks<B>,
    ) -> Tensor<B, 3> {
        self.forward_tapped(x, pos, cache, m, None)
    }

    /// [`DecoderLayer::forward_masked`], adding what `taps` reads at the mask points: each
    /// head's context, the norm outputs feeding the sublayers, the MLP activation, and the
    /// block's input and output.
    pub fn forward_tapped(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut LayerCache<B>>,
        m: &LayerMasks<B>,
        mut taps: Option<&mut LayerTaps<B>>,
    ) -> Tensor<B, 3> {
        let input = taps.is_some().then(|| x.clone());
        let norm = |n: &RmsNorm<B>, x: Tensor<B, 3>| match &m.hidden {
            Some((z, kept)) => n.forward_masked(x, z, *kept),
            None => n.forward(x),
        };
        // A norm on a sublayer's output (Gemma's post norms): the output is non-zero on pruned
        // channels too, so it is restricted to the kept ones first; the mean square then runs
        // over the kept channels, as in the finalized model, and `z` comes in with `scale_out`.
        let post_norm = |n: &RmsNorm<B>, y: Tensor<B, 3>| match &m.hidden {
            Some((z, kept)) => {
                let ind = to_dtype(z.clone().not_equal_elem(0.0).float(), y.dtype());
                n.forward_masked(y * ind.clone().unsqueeze::<3>(), &ind, *kept)
            }
            None => n.forward(y),
        };
        // Layer and hidden masks scale what a sublayer adds to the residual stream: one factor
        // `z_layer · z_hidden` (a `[d]` product), so each sublayer output is multiplied once.
        let out_factor = match (&m.layer, &m.hidden) {
            (Some(zl), Some((zh, _))) => Some(zh.clone() * zl.clone()),
            (Some(zl), None) => Some(zl.clone()),
            (None, Some((zh, _))) => Some(zh.clone()),
            (None, None) => None,
        };
        let scale_out = |y: Tensor<B, 3>| match &out_factor {
            Some(z) => y * z.clone().unsqueeze::<3>(),
            None => y,
        };
        let n1 = norm(&self.input_layernorm, x.clone());
        if let Some(t) = taps.as_deref_mut() {
            t.add_hidden(&n1);
        }
        let mut ctx = self.self_attn.context(n1, pos, cache);
        if let Some(z) = &m.heads {
            ctx = ctx * z.clone().reshape([1, 1, self.self_attn.num_heads, 1]);
        }
        if let Some(t) = taps.as_deref_mut() {
            t.add_heads(&ctx);
        }
        let a = self.self_attn.project(ctx);
        let (a, pre_mlp) = match &self.pre_feedforward_layernorm {
            Some(pre) => (post_norm(&self.post_attention_layernorm, a), pre),
            None => (a, &self.post_attention_layernorm),
        };
        let x = x + scale_out(a);
        let n2 = norm(pre_mlp, x.clone());
        let act = self.mlp.activation(n2.clone(), m.intermediate.as_ref());
        if let Some(t) = taps.as_deref_mut() {
            t.add_hidden(&n2);
            t.add_intermediate(&act);
        }
        let y = linear(&self.mlp.down_proj, act);
        let y = match &self.post_feedforward_layernorm {
            Some(post) => post_norm(post, y),
            None => y,
        };
        let out = x + scale_out(y);
        if let (Some(t), Some(input)) = (taps, input) {
            t.add_block(&input, &out);
        }
        out
    }
}

/// What every layer of one forward reads besides its input: the RoPE tables (`cos`, `sin`
/// `[len, head_dim]`) of each rope the model's layers use, and the attention masks.
#[derive(Debug, Clone)]
pub struct Positions<B: Backend> {
    /// Indexed by [`Attention::rope`].
    pub ropes: Vec<(Tensor<B, 2>, Tensor<B, 2>)>,
    pub masks: AttnMasks<B>,
}

/// The attention masks of one forward (`[t, past + t]`, true = hidden), which only the generic
/// attention reads: the causal one, and one per sliding window some layer uses.
#[derive(Debug, Clone)]
pub struct AttnMasks<B: Backend> {
    causal: Option<Tensor<B, 2, Bool>>,
    windowed: Vec<(usize, Tensor<B, 2, Bool>)>,
}

impl<B: Backend> AttnMasks<B> {
    /// The masks of `len` new positions after `past` cached ones, for attention with each of
    /// `windows` (and none).
    pub fn new(past: usize, len: usize, windows: &[usize], device: &B::Device) -> Self {
        let causal = ops::needs_mask(past, len, None)
            .then(|| ops::causal_mask::<B>(past, len, None, device));
        let windowed = windows
            .iter()
            .filter(|&&w| ops::needs_mask(past, len, Some(w)))
            .map(|&w| (w, ops::causal_mask::<B>(past, len, Some(w), device)))
            .collect();
        AttnMasks { causal, windowed }
    }

    /// The mask of attention with `window` (`None` when nothing needs hiding).
    pub fn get(&self, window: Option<usize>) -> Option<&Tensor<B, 2, Bool>> {
        match window {
            None => self.causal.as_ref(),
            Some(w) => self.windowed.iter().find(|(x, _)| *x == w).map(|(_, m)| m),
        }
    }
}

/// HF's `model.` submodule: embeddings, decoder layers, final norm.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// A LLaMA-family causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub model: LlamaModel<B>,
    /// `None` when the LM head is tied to `model.embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    /// The HF config the model was built from.
    #[module(skip)]
    pub config: LlamaConfig,
    /// The distinct RoPEs of the layers (Gemma 3: global and local), indexed by
    /// [`Attention::rope`].
    #[module(skip)]
    pub ropes: Vec<Rope>,
    /// The dtype activations and matmuls run in when it differs from the parameters'
    /// (mixed precision: f32 parameters, the master weights, cast to bf16 at each use inside
    /// the graph, so gradients come back in f32). `None`: compute in the parameter dtype.
    #[module(skip)]
    pub autocast: Option<DType>,
}

impl<B: ShearsOps> Llama<B> {
    /// Parameter dtype (that of the embedding).
    pub fn dtype(&self) -> DType {
        self.model.embed_tokens.weight.val().dtype()
    }

    /// The dtype activations are computed in (see [`Llama::autocast`]).
    pub fn compute_dtype(&self) -> DType {
        self.autocast.unwrap_or_else(|| self.dtype())
    }

    /// This model computing in `dtype` (`None` or the parameter dtype: no autocast).
    pub fn with_autocast(mut self, dtype: Option<DType>) -> Self {
        self.autocast = dtype.filter(|&d| d != self.dtype());
        self
    }

    /// Device the parameters live on.
    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// RoPE tables and attention masks for `len` new positions after `past` cached ones.
    pub fn position_inputs(&self, past: usize, len: usize) -> Positions<B> {
        let device = self.device();
        let ropes = self
            .ropes
            .iter()
            .map(|r| {
                rope::tables::<B>(
                    r,
                    self.config.head_dim(),
                    past,
                    len,
                    self.compute_dtype(),
                    &device,
                )
            })
            .collect();
        let mut windows: Vec<usize> = self
            .model
            .layers
            .iter()
            .filter_map(|l| l.self_attn.window)
            .collect();
        windows.sort_unstable();
        windows.dedup();
        Positions {
            ropes,
            masks: AttnMasks::new(past, len, &windows, &device),
        }
    }

    /// Final-norm hidden states `[batch, len, d]`. With a cache, `ids` continue the cached
    /// sequence and the cache is extended.
    pub fn hidden_states(
        &self,
        ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.hidden_states_masked(ids, cache, None)
    }

    /// [`Llama::hidden_states`] with pruning masks. Masks need uniform layers.
    pub fn hidden_states_masked(
        &self,
        ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
        masks: Option<&ForwardMasks<B>>,
    ) -> Tensor<B, 3> {
        let [_, t] = ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let pos = self.position_inputs(past, t);
        let kept = masks.and_then(|m| m.hidden_kept());
        let layer_masks = |l: usize| match masks {
            Some(m) => m.layer(l, kept),
            None => LayerMasks::none(),
        };
        let mut x = self.embed(ids, masks);
        match cache {
            Some(cache) => {
                for (l, (layer, slot)) in
                    self.model.layers.iter().zip(cache.layers_mut()).enumerate()
                {
                    x = layer.forward_masked(x, &pos, Some(slot), &layer_masks(l));
                }
                cache.advance(t);
            }
            None => {
                for (l, layer) in self.model.layers.iter().enumerate() {
                    x = layer.forward_masked(x, &pos, None, &layer_masks(l));
                }
            }
        }
        self.final_norm(x, masks, kept)
    }

    /// Run `ids` through every layer without a graph's cache, adding each layer's statistics to
    /// `taps` (one per layer; see [`crate::taps`]). Returns the number of tokens tapped.
    pub fn tap(&self, ids: Tensor<B, 2, Int>, taps: &mut [LayerTaps<B>]) -> usize {
        let [b, t] = ids.dims();
        let pos = self.position_inputs(0, t);
        let mut x = self.embed(ids, None);
        for (layer, tap) in self.model.layers.iter().zip(taps.iter_mut()) {
            x = layer.forward_tapped(x, &pos, None, &LayerMasks::none(), Some(tap));
        }
        b * t
    }

    /// The embedding of `ids` in the compute dtype (Gemma: times `sqrt(hidden_size)`, rounded to
    /// the parameter dtype as transformers does), times `z_hidden` when masked: the input of
    /// layer 0.
    pub fn embed(&self, ids: Tensor<B, 2, Int>, masks: Option<&ForwardMasks<B>>) -> Tensor<B, 3> {
        let e = self.model.embed_tokens.forward(ids);
        let e = match self.config.embed_scale() {
            Some(s) => e.mul_scalar(s as f32 as f64),
            None => e,
        };
        let x = to_dtype(e, self.compute_dtype());
        match masks.and_then(|m| m.hidden.as_ref()) {
            Some(z) => {
                let z = to_dtype(z.clone(), x.dtype());
                x * z.unsqueeze::<3>()
            }
            None => x,
        }
    }

    /// The final norm (masked when `masks` has `z_hidden`; `kept` is
    /// [`ForwardMasks::hidden_kept`]).
    pub fn final_norm(
        &self,
        x: Tensor<B, 3>,
        masks: Option<&ForwardMasks<B>>,
        kept: Option<usize>,
    ) -> Tensor<B, 3> {
        match (masks.and_then(|m| m.hidden.as_ref()), kept) {
            (Some(z), Some(k)) => self.model.norm.forward_masked(x, z, k),
            _ => self.model.norm.forward(x),
        }
    }

    /// Logits `[batch, len, vocab]` of hidden states.
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => linear(head, h),
            None => {
                let [b, t, d] = h.dims();
                let w = to_dtype(self.model.embed_tokens.weight.val(), h.dtype());
                let v = w.dims()[0];
                ops::matmul(h.reshape([b * t, d]), w.transpose()).reshape([b, t, v])
            }
        }
    }

    /// Per-position next-token NLL `[batch, len-1]` of `ids` under the hidden states
    /// `h [batch, len, d]` (positions `0..len-1` predict ids `1..len`), through the fused LM
    /// head + cross-entropy where the backend has it (the logits are never materialised), else
    /// [`Llama::logits`] and a log-softmax. f32 (f64 on f64 backends).
    pub fn token_nll(&self, h: Tensor<B, 3>, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t, d] = h.dims();
        assert!(t >= 2, "a causal LM loss needs at least two tokens");
        let n = b * (t - 1);
        let h = h.narrow(1, 0, t - 1).reshape([n, d]);
        let targets = ids.narrow(1, 1, t - 1).reshape([n]);
        let dt = h.dtype();
        let nll = match &self.lm_head {
            Some(head) => ops::lm_head_nll(h, to_dtype(head.weight.val(), dt), false, targets),
            None => {
                let w = to_dtype(self.model.embed_tokens.weight.val(), dt);
                ops::lm_head_nll(h, w, true, targets)
            }
        };
        nll.reshape([b, t - 1])
    }

    /// Per-position next-token NLL `[batch, len-1]` of `ids` (fused LM head where available).
    pub fn nll(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.token_nll(self.hidden_states(ids.clone(), None), ids)
    }

    /// [`Llama::nll`] with pruning masks applied.
    pub fn nll_masked(&self, ids: Tensor<B, 2, Int>, masks: &ForwardMasks<B>) -> Tensor<B, 2> {
        self.token_nll(
            self.hidden_states_masked(ids.clone(), None, Some(masks)),
            ids,
        )
    }

    /// Mean next-token cross-entropy of `ids` (HF's causal-LM loss), a one-element tensor.
    pub fn loss(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        self.nll(ids).mean()
    }

    /// [`Llama::loss`] with pruning masks applied.
    pub fn loss_masked(&self, ids: Tensor<B, 2, Int>, masks: &ForwardMasks<B>) -> Tensor<B, 1> {
        self.nll_masked(ids, masks).mean()
    }

    /// Logits for every position of `ids` `[batch, len]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.logits(self.hidden_states(ids, None))
    }

    /// Logits with pruning masks applied (the LM head itself is never masked).
    pub fn forward_masked(&self, ids: Tensor<B, 2, Int>, masks: &ForwardMasks<B>) -> Tensor<B, 3> {
        self.logits(self.hidden_states_masked(ids, None, Some(masks)))
    }

    /// f32 logits `[batch, vocab]` of the last position only, extending `cache` (generation).
    pub fn forward_last(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let h = self.hidden_states(ids, Some(cache));
        let [b, t, _] = h.dims();
        let logits = self.logits(h.narrow(1, t - 1, 1));
        let v = logits.dims()[2];
        upcast(logits.reshape([b, v]))
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.model.layers.len())
    }

    /// Refuse contexts the model cannot attend over faithfully: longer than its
    /// `max_position_embeddings` (positions it was never trained on, and attention buffers
    /// that grow with the square of the length). A sliding window is attended as the model does.
    pub fn check_context(&self, len: usize) -> shears_core::Result<()> {
        let max = self.config.max_position_embeddings;
        if len > max {
            return Err(shears_core::Error::invalid(format!(
                "context of {len} tokens exceeds the model's max_position_embeddings of {max}; \
                 shorten the input"
            )));
        }
        Ok(())
    }
}
