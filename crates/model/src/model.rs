//! The Qwen2 causal language model, layer for layer as transformers' `modeling_qwen2.py`:
//! linear, embedding and norm, MLP, attention, decoder layer, model, causal-LM head.
//!
//! Module fields carry the Hugging Face names, so a parameter's module path is its checkpoint
//! name (`model.layers.0.self_attn.q_proj.weight`).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

use crate::attention::{AttentionBackend, AttentionImpl};
use crate::config::{AttentionKind, Family, Qwen2Config};
use crate::error::LoadError;
use crate::linear::LinearBackend;
use crate::ops::{self, AttentionMask};
use crate::rowwise::RowwiseBackend;
use crate::weights::{Init, Weights};

/// A linear layer in Hugging Face layout: `weight` is `[out, in]`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    fn new(
        w: &mut Weights<B>,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            weight: w.param("weight", [out_features, in_features], Init::Normal)?,
            bias: if bias {
                Some(w.param("bias", [out_features], Init::Zeros)?)
            } else {
                None
            },
        })
    }
}

impl<B: LinearBackend> Linear<B> {
    /// # Shapes
    /// `[..., in]` -> `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        ops::linear(x, self.weight.val(), self.bias.as_ref().map(Param::val))
    }
}

#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, hidden]`
    pub weight: Param<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    fn new(w: &mut Weights<B>, hidden: usize, eps: f64) -> Result<Self, LoadError> {
        Ok(Self {
            weight: w.param("weight", [hidden], Init::Ones)?,
            eps,
        })
    }
}

impl<B: RowwiseBackend> RmsNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        ops::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Module, Debug)]
pub struct Qwen2Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Qwen2Mlp<B> {
    fn new(w: &mut Weights<B>, config: &Qwen2Config) -> Result<Self, LoadError> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            gate_proj: Linear::new(&mut w.pp("gate_proj"), h, i, false)?,
            up_proj: Linear::new(&mut w.pp("up_proj"), h, i, false)?,
            down_proj: Linear::new(&mut w.pp("down_proj"), i, h, false)?,
        })
    }
}

impl<B: LinearBackend + RowwiseBackend> Qwen2Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        self.forward_rows(x.reshape([batch * seq, hidden]))
            .reshape([batch, seq, hidden])
    }

    /// [`forward`](Self::forward) on `[rows, hidden]`: both projections read the one `x`
    /// (see `ops::linear`).
    pub fn forward_rows(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let gated = ops::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(gated)
    }
}

/// Grouped-query self-attention: q/k/v with bias, o_proj without, RoPE on q and k. Qwen3
/// normalises each head's queries and keys (`q_norm`, `k_norm`) before RoPE, and its biases
/// follow `attention_bias`.
#[derive(Module, Debug)]
pub struct Qwen2Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Qwen2Attention<B> {
    fn new(w: &mut Weights<B>, config: &Qwen2Config) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        let d = config.head_dim();
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads());
        let (qkv_bias, o_bias) = config.projection_biases();
        let head_norm = |w: &mut Weights<B>, name: &str| match config.family() {
            Family::Qwen3 => RmsNorm::new(&mut w.pp(name), d, config.rms_norm_eps).map(Some),
            Family::Qwen2 => Ok(None),
        };
        Ok(Self {
            q_proj: Linear::new(&mut w.pp("q_proj"), h, heads * d, qkv_bias)?,
            k_proj: Linear::new(&mut w.pp("k_proj"), h, kv_heads * d, qkv_bias)?,
            v_proj: Linear::new(&mut w.pp("v_proj"), h, kv_heads * d, qkv_bias)?,
            o_proj: Linear::new(&mut w.pp("o_proj"), heads * d, h, o_bias)?,
            q_norm: head_norm(w, "q_norm")?,
            k_norm: head_norm(w, "k_norm")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        })
    }
}

impl<B: AttentionBackend> Qwen2Attention<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]`, cos/sin: `[batch, 1, seq, head_dim]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 4>, Tensor<B, 4>),
        mask: &AttentionMask<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        let x = x.reshape([batch * seq, hidden]);
        self.forward_rows(x, [batch, seq], rope, mask, cache)
            .reshape([batch, seq, hidden])
    }

    /// [`forward`](Self::forward) on the `[batch * seq, hidden]` rows of `[batch, seq]`: q, k
    /// and v read the one `x` (see `ops::linear`).
    pub fn forward_rows(
        &self,
        x: Tensor<B, 2>,
        [batch, seq]: [usize; 2],
        rope: &(Tensor<B, 4>, Tensor<B, 4>),
        mask: &AttentionMask<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 2> {
        let d = self.head_dim;
        // [batch * seq, heads * d] -> [batch, seq, heads, d], per-head norm (Qwen3), then
        // [batch, heads, seq, d]
        let split = |t: Tensor<B, 2>, heads: usize, norm: Option<&RmsNorm<B>>| {
            let t = t.reshape([batch, seq, heads, d]);
            let t = match norm {
                Some(norm) => norm.forward(t),
                None => t,
            };
            t.swap_dims(1, 2)
        };
        let q = split(
            self.q_proj.forward(x.clone()),
            self.num_heads,
            self.q_norm.as_ref(),
        );
        let k = split(
            self.k_proj.forward(x.clone()),
            self.num_kv_heads,
            self.k_norm.as_ref(),
        );
        let v = split(self.v_proj.forward(x), self.num_kv_heads, None);
        let (cos, sin) = rope.clone();
        let q = ops::apply_rotary(q, cos.clone(), sin.clone());
        let k = ops::apply_rotary(k, cos, sin);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        // [batch, heads, seq, d] -> [batch * seq, heads * d]
        let out = ops::attention(q, k, v, mask)
            .swap_dims(1, 2)
            .reshape([batch * seq, self.num_heads * d]);
        self.o_proj.forward(out)
    }
}

/// Pre-norm residual block: attention, then MLP.
#[derive(Module, Debug)]
pub struct Qwen2DecoderLayer<B: Backend> {
    pub self_attn: Qwen2Attention<B>,
    pub mlp: Qwen2Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> Qwen2DecoderLayer<B> {
    fn new(w: &mut Weights<B>, config: &Qwen2Config) -> Result<Self, LoadError> {
        let (h, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Self {
            self_attn: Qwen2Attention::new(&mut w.pp("self_attn"), config)?,
            mlp: Qwen2Mlp::new(&mut w.pp("mlp"), config)?,
            input_layernorm: RmsNorm::new(&mut w.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::new(&mut w.pp("post_attention_layernorm"), h, eps)?,
        })
    }
}

impl<B: AttentionBackend> Qwen2DecoderLayer<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 4>, Tensor<B, 4>),
        mask: &AttentionMask<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        let x = x.reshape([batch * seq, hidden]);
        self.forward_rows(x, [batch, seq], rope, mask, cache)
            .reshape([batch, seq, hidden])
    }

    /// [`forward`](Self::forward) on the residual stream as `[batch * seq, hidden]` rows:
    /// each norm reads the very tensor that its residual addition reads, so that the norm's
    /// backward adds the two gradients as it writes its own (`ops::rms_norm`), and the model
    /// passes these rows from layer to layer with no reshape (a reshape that merges the
    /// dimensions of a pitched buffer copies it).
    pub fn forward_rows(
        &self,
        x: Tensor<B, 2>,
        dims: [usize; 2],
        rope: &(Tensor<B, 4>, Tensor<B, 4>),
        mask: &AttentionMask<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 2> {
        let normed = self.input_layernorm.forward(x.clone());
        let x = x + self.self_attn.forward_rows(normed, dims, rope, mask, cache);
        let normed = self.post_attention_layernorm.forward(x.clone());
        x + self.mlp.forward_rows(normed)
    }
}

/// Embedding, decoder layers and the final norm.
#[derive(Module, Debug)]
pub struct Qwen2Model<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<Qwen2DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

impl<B: Backend> Qwen2Model<B> {
    fn new(w: &mut Weights<B>, config: &Qwen2Config) -> Result<Self, LoadError> {
        let embed_tokens = Embedding {
            weight: w.pp("embed_tokens").param(
                "weight",
                [config.vocab_size, config.hidden_size],
                Init::Normal,
            )?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| Qwen2DecoderLayer::new(&mut w.pp("layers").pp(i), config))
            .collect::<Result<_, _>>()?;
        let norm = RmsNorm::new(&mut w.pp("norm"), config.hidden_size, config.rms_norm_eps)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
        })
    }
}

/// The inputs of one forward pass.
#[derive(Debug, Clone)]
pub struct Qwen2Input<B: Backend> {
    /// `[batch, seq]`
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`; defaults to `past..past + seq` on every row. Packed rows restart at 0 at
    /// each sequence.
    pub position_ids: Option<Tensor<B, 2, Int>>,
    /// `[batch, seq]`; 0 marks padding, equal non-zero ids mark one sequence (see
    /// [`AttentionMask`]). Defaults to one sequence per row, no padding.
    pub segment_ids: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> Qwen2Input<B> {
    pub fn new(input_ids: Tensor<B, 2, Int>) -> Self {
        Self {
            input_ids,
            position_ids: None,
            segment_ids: None,
        }
    }

    pub fn with_positions(mut self, position_ids: Tensor<B, 2, Int>) -> Self {
        self.position_ids = Some(position_ids);
        self
    }

    pub fn with_segments(mut self, segment_ids: Tensor<B, 2, Int>) -> Self {
        self.segment_ids = Some(segment_ids);
        self
    }

    /// A Hugging Face padding mask (`1` real token, `0` padding) is the segment ids of rows that
    /// hold one sequence each.
    pub fn with_attention_mask(self, attention_mask: Tensor<B, 2, Int>) -> Self {
        self.with_segments(attention_mask)
    }
}

/// The cached keys and values of one layer, after RoPE and before the GQA repeat.
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    /// `[batch, kv_heads, cached, head_dim]` each.
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> LayerCache<B> {
    /// Appends this step's keys and values and returns all of them.
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.kv.take() {
            Some((past_k, past_v)) => (
                Tensor::cat(vec![past_k, k], 2),
                Tensor::cat(vec![past_v, v], 2),
            ),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// The KV cache for generation: prefill once, then feed one token at a time.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    /// `[batch, cached]`: segment ids of the cached keys (0 = padding).
    segments: Option<Tensor<B, 2, Int>>,
    /// `[batch, 1]`: the next position of each row.
    next_position: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(config: &Qwen2Config) -> Self {
        Self {
            layers: vec![LayerCache::default(); config.num_hidden_layers],
            segments: None,
            next_position: None,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.segments.as_ref().map_or(0, |s| s.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Qwen2 causal language model with its lm_head, tied to the embedding or not.
#[derive(Module, Debug)]
pub struct Qwen2ForCausalLM<B: Backend> {
    pub model: Qwen2Model<B>,
    /// `None` when `tie_word_embeddings`: the logits then use `model.embed_tokens.weight`.
    pub lm_head: Option<Linear<B>>,
    head_dim: usize,
    rope_theta: f64,
    /// Per layer: `None` for full attention, `Some(window)` for sliding.
    windows: Vec<Option<usize>>,
    /// Activations run in this dtype; parameters stay in theirs and are cast on use.
    compute_dtype: DType,
    /// The memory budget of one query chunk of the attention (see [`AttentionMask`]).
    attention_chunk_bytes: usize,
    /// Which attention body runs.
    attention_impl: AttentionImpl,
}

impl<B: Backend> Qwen2ForCausalLM<B> {
    /// Builds the model, taking every parameter from `weights` by its Hugging Face name.
    pub fn new(config: &Qwen2Config, weights: &mut Weights<B>) -> Result<Self, LoadError> {
        let model = Qwen2Model::new(&mut weights.pp("model"), config)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(
                &mut weights.pp("lm_head"),
                config.hidden_size,
                config.vocab_size,
                false,
            )?)
        };
        let windows = (0..config.num_hidden_layers)
            .map(|layer| match config.attention_kind(layer) {
                AttentionKind::Full => None,
                AttentionKind::Sliding(window) => Some(window),
            })
            .collect();
        let compute_dtype = model.embed_tokens.weight.val().dtype();
        Ok(Self {
            model,
            lm_head,
            head_dim: config.head_dim(),
            rope_theta: config.rope_theta(),
            windows,
            compute_dtype,
            attention_chunk_bytes: crate::attention::DEFAULT_CHUNK_MEMORY_BYTES,
            attention_impl: AttentionImpl::Chunked,
        })
    }

    /// A freshly initialised model (normal(0, `initializer_range`) weights, zero biases, unit
    /// norms), identical for a given seed on every backend.
    pub fn init(config: &Qwen2Config, device: &B::Device, seed: u64) -> Self {
        let mut source = crate::weights::RandomInit::new(seed, config.initializer_range);
        let dtype = Tensor::<B, 1>::empty([1], device).dtype();
        Self::new(config, &mut Weights::new(&mut source, device, dtype))
            .expect("random initialisation cannot fail")
    }

    /// Runs activations in `dtype` (for example BF16 on a GPU) while parameters keep their own
    /// dtype and are cast on use.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Bounds the scores that one query chunk of the attention holds at a time.
    pub fn with_attention_chunk_bytes(mut self, bytes: usize) -> Self {
        self.attention_chunk_bytes = bytes;
        self
    }

    /// Runs the chunked attention (the default) or the reference body, to compare them.
    pub fn with_attention_impl(mut self, implementation: AttentionImpl) -> Self {
        self.attention_impl = implementation;
        self
    }

    /// The lm_head weight in `[vocab, hidden]` layout (the embedding when tied).
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.weight.val(),
        }
    }
}

impl<B: LinearBackend> Qwen2ForCausalLM<B> {
    /// Logits from final hidden states.
    ///
    /// # Shapes
    /// `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        ops::linear(hidden, self.lm_head_weight(), None)
    }
}

impl<B: AttentionBackend> Qwen2ForCausalLM<B> {
    /// Final hidden states, after the last norm.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_states(
        &self,
        input: &Qwen2Input<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let device = input.input_ids.device();
        let [batch, seq] = input.input_ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());

        let segments = input
            .segment_ids
            .clone()
            .unwrap_or_else(|| Tensor::ones([batch, seq], &device));
        let positions = input.position_ids.clone().unwrap_or_else(|| {
            match cache.as_ref().and_then(|c| c.next_position.clone()) {
                // [batch, 1] + [1, seq]
                Some(next) => {
                    next.expand([batch, seq])
                        + Tensor::arange(0..seq as i64, &device)
                            .reshape([1, seq])
                            .expand([batch, seq])
                }
                None => Tensor::arange(past as i64..(past + seq) as i64, &device)
                    .reshape([1, seq])
                    .expand([batch, seq]),
            }
        });
        let key_segments = match cache.as_mut() {
            Some(cache) => {
                let all = match cache.segments.take() {
                    Some(past) => Tensor::cat(vec![past, segments.clone()], 1),
                    None => segments.clone(),
                };
                cache.segments = Some(all.clone());
                cache.next_position = Some(positions.clone().narrow(1, seq - 1, 1).add_scalar(1));
                all
            }
            None => segments.clone(),
        };

        let rope = ops::rotary_tables(
            positions,
            self.head_dim,
            self.rope_theta,
            self.compute_dtype,
        );
        // Masks are only segment ids and positions; each layer gets one for its window.
        let mask_for = |window: Option<usize>| {
            AttentionMask::new(segments.clone(), key_segments.clone(), past, window)
                .with_chunk_memory_bytes(self.attention_chunk_bytes)
                .with_implementation(self.attention_impl)
        };

        let x = ops::embedding(
            self.model.embed_tokens.weight.val(),
            input.input_ids.clone(),
        );
        let hidden = x.dims()[2];
        // The residual stream as rows from here to the final norm (`forward_rows`), reshaped
        // before the cast, while it is the lookup's packed buffer.
        let mut x = x.reshape([batch * seq, hidden]).cast(self.compute_dtype);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let mask = mask_for(self.windows[i]);
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward_rows(x, [batch, seq], &rope, &mask, layer_cache);
        }
        self.model.norm.forward(x).reshape([batch, seq, hidden])
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// `[batch, seq]` -> `[batch, seq, vocab]`
    pub fn forward(&self, input: &Qwen2Input<B>) -> Tensor<B, 3> {
        self.logits(self.hidden_states(input, None))
    }

    /// Logits for the new tokens, reading and extending `cache`.
    pub fn forward_cached(&self, input: &Qwen2Input<B>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        self.logits(self.hidden_states(input, Some(cache)))
    }
}
