//! The LLaMA-style decoder.

use crate::attention::{Attention, AttentionMaps};
use crate::cache::LayerCache;
use crate::config::LlamaConfig;
use crate::fused::{linear_layer, rms_norm, swiglu};
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::prelude::*;

/// One decoder block: `x + attn(norm(x))`, then `x + down(silu(gate(h)) ⊙ up(h))`,
/// `h = norm(x)`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// `input_layernorm`.
    pub attn_norm: RmsNorm<B>,
    /// `self_attn`.
    pub attention: Attention<B>,
    /// `post_attention_layernorm`.
    pub ffn_norm: RmsNorm<B>,
    /// `mlp.gate_proj` (burn layout `[d, ffn]`).
    pub gate: Linear<B>,
    /// `mlp.up_proj`.
    pub up: Linear<B>,
    /// `mlp.down_proj` (`[ffn, d]`).
    pub down: Linear<B>,
}

impl<B: Backend> Block<B> {
    fn ffn(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = rms_norm(&self.ffn_norm, x.clone());
        let gated = swiglu(
            linear_layer(&self.gate, h.clone()),
            linear_layer(&self.up, h),
        );
        x + linear_layer(&self.down, gated)
    }
}

/// A decoder-only language model (`LlamaForCausalLM` / `DeepseekV2ForCausalLM` shapes).
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// `model.embed_tokens` (`[vocab, d]`).
    pub embed: Embedding<B>,
    /// `model.layers`.
    pub blocks: Vec<Block<B>>,
    /// `model.norm`.
    pub norm: RmsNorm<B>,
    /// `lm_head` (`[d, vocab]` in burn's layout); `None` when tied to the embedding.
    pub head: Option<Linear<B>>,
}

/// Whether the output head is the embedding's transpose.
pub fn is_tied<B: Backend>(model: &Llama<B>) -> bool {
    model.head.is_none()
}

impl LlamaConfig {
    /// Builds the model with N(0, init_std) weights and unit norm gains.
    ///
    /// # Errors
    /// An inconsistent configuration.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Llama<B>, crate::ModelError> {
        self.validate()?;
        let a = &self.attention;
        let init = Initializer::Normal {
            mean: 0.0,
            std: a.init_std,
        };
        let lin = |i: usize, o: usize| {
            LinearConfig::new(i, o)
                .with_bias(false)
                .with_initializer(init.clone())
                .init(device)
        };
        let norm = || {
            RmsNormConfig::new(a.d_model)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let blocks = (0..self.n_layers)
            .map(|_| {
                Ok(Block {
                    attn_norm: norm(),
                    attention: a.init(device)?,
                    ffn_norm: norm(),
                    gate: lin(a.d_model, self.ffn_hidden),
                    up: lin(a.d_model, self.ffn_hidden),
                    down: lin(self.ffn_hidden, a.d_model),
                })
            })
            .collect::<Result<Vec<_>, crate::ModelError>>()?;
        let model = Llama {
            embed: EmbeddingConfig::new(self.vocab_size, a.d_model)
                .with_initializer(init.clone())
                .init(device),
            blocks,
            norm: norm(),
            head: (!self.tie_embeddings).then(|| lin(a.d_model, self.vocab_size)),
        };
        crate::materialize(&model);
        Ok(model)
    }
}

impl<B: Backend> Llama<B> {
    fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = rms_norm(&self.norm, h);
        match &self.head {
            Some(head) => head.forward(h),
            None => h.matmul(self.embed.weight.val().transpose().unsqueeze::<3>()),
        }
    }

    /// Token ids `[b, s]` → logits `[b, s, vocab]` (positions `0..s`, causal).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut x = self.embed.forward(tokens);
        for block in &self.blocks {
            x = x.clone()
                + block
                    .attention
                    .forward(rms_norm(&block.attn_norm, x), 0, None);
            x = block.ffn(x);
        }
        self.logits(x)
    }

    /// Incremental decoding: the new tokens `[b, s]` continue the sequence held in `cache`
    /// (one entry per layer, from [`Llama::new_cache`]); returns their logits. With
    /// `absorbed`, MLA layers use the absorbed-matrix path.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut [LayerCache<B>],
        absorbed: bool,
    ) -> Tensor<B, 3> {
        let offset = cache.first().map_or(0, |c| c.len());
        let mut x = self.embed.forward(tokens);
        for (block, layer_cache) in self.blocks.iter().zip(cache.iter_mut()) {
            let h = rms_norm(&block.attn_norm, x.clone());
            let a = if absorbed {
                block
                    .attention
                    .forward_absorbed(h, offset, Some(layer_cache))
            } else {
                block.attention.forward(h, offset, Some(layer_cache))
            };
            x = block.ffn(x + a);
        }
        self.logits(x)
    }

    /// An empty cache for every layer.
    pub fn new_cache(&self) -> Vec<LayerCache<B>> {
        self.blocks.iter().map(|_| LayerCache::new()).collect()
    }

    /// Forward pass that also returns every layer's attention scores and probabilities
    /// (`[b, H, s, s]`), for activation-space probes.
    pub fn forward_with_maps(
        &self,
        tokens: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 3>, Vec<AttentionMaps<B>>) {
        let mut x = self.embed.forward(tokens);
        let mut maps = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (a, m) = block
                .attention
                .forward_with_maps(rms_norm(&block.attn_norm, x.clone()));
            maps.push(m);
            x = block.ffn(x + a);
        }
        (self.logits(x), maps)
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }
}
