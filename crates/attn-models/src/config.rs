//! Configurations: the attention variants and the LLaMA decoder, with the `paper` and `tiny`
//! presets.

use burn::config::Config;
use serde::{Deserialize, Serialize};

/// The three attention variants of seed 000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionVariant {
    /// Standard multi-head attention with rotary embeddings on every head.
    Mha,
    /// Multi-head latent attention with rotary applied before the up-projection (on the
    /// latent, by default; see [`PreRopePlacement`]).
    MlaPreRope,
    /// DeepSeek-V2 MLA: per-head rotary queries and one rotary key shared by all heads,
    /// decoupled from the compressed content path.
    MlaDecoupled,
}

impl AttentionVariant {
    /// All three, in the paper's order.
    pub const ALL: [AttentionVariant; 3] = [
        AttentionVariant::Mha,
        AttentionVariant::MlaPreRope,
        AttentionVariant::MlaDecoupled,
    ];

    /// The kebab-case name (`mha`, `mla-prerope`, `mla-decoupled`).
    pub fn name(&self) -> &'static str {
        match self {
            AttentionVariant::Mha => "mha",
            AttentionVariant::MlaPreRope => "mla-prerope",
            AttentionVariant::MlaDecoupled => "mla-decoupled",
        }
    }

    /// Parses a kebab-case name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == s)
    }
}

/// Where MLA-PreRoPE applies its rotary embedding. The paper says both "before compression"
/// (abstract) and "before up-projection" (contributions); DESIGN.md fixes the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PreRopePlacement {
    /// Default: rotate the compressed latents `c_q`, `c_kv` (width `r`), then up-project.
    #[default]
    Latent,
    /// The other reading: rotate the input `x` (width `d`) before the down-projections. Keys
    /// then come from a rotated latent and values from an unrotated one, so the cache holds
    /// both.
    Input,
}

/// One attention layer's shape and behaviour.
#[derive(Config, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Heads `H`.
    pub n_heads: usize,
    /// Per-head query/key width of the content path (and MHA's head width) `d_h`.
    pub head_dim: usize,
    /// Variant.
    pub variant: AttentionVariant,
    /// Per-head value width (default `head_dim`).
    #[config(default = "None")]
    pub value_dim: Option<usize>,
    /// Query latent width `r_q` (MLA; default `H·head_dim/2 = d/2` — DESIGN.md's "64 to 32").
    #[config(default = "None")]
    pub q_latent: Option<usize>,
    /// Key/value latent width `r_kv` (MLA; default `H·head_dim/2`).
    #[config(default = "None")]
    pub kv_latent: Option<usize>,
    /// Rotary width of MLA-Decoupled's per-head query and shared key, `d_r`.
    #[config(default = 32)]
    pub rope_dim: usize,
    /// MLA-PreRoPE's rotary placement.
    #[config(default = "PreRopePlacement::Latent")]
    pub prerope_placement: PreRopePlacement,
    /// Rotary base θ.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Rotary embeddings on (off gives a position-free model, used to compare variants).
    #[config(default = true)]
    pub rope: bool,
    /// RMSNorm on the MLA latents (DeepSeek's `q_a_layernorm`, `kv_a_layernorm`).
    #[config(default = true)]
    pub latent_norm: bool,
    /// Gap removal: replace the attention matrix `A` by `A − U`, `U` each row's uniform
    /// distribution over its visible keys (seed 002, eq. 9, with a causal mask).
    #[config(default = false)]
    pub gap_removed: bool,
    /// Longest sequence (rotary tables).
    #[config(default = 4096)]
    pub max_seq_len: usize,
    /// Standard deviation of the weight initialisation (LLaMA-130M: 0.02).
    #[config(default = 0.02)]
    pub init_std: f64,
    /// RMSNorm ε of the latent norms.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
}

impl AttentionConfig {
    /// `d_v`.
    pub fn value_width(&self) -> usize {
        self.value_dim.unwrap_or(self.head_dim)
    }

    /// `r_q`.
    pub fn q_latent_width(&self) -> usize {
        self.q_latent.unwrap_or(self.n_heads * self.head_dim / 2)
    }

    /// `r_kv`.
    pub fn kv_latent_width(&self) -> usize {
        self.kv_latent.unwrap_or(self.n_heads * self.head_dim / 2)
    }

    /// Per-head query/key width: `d_h`, plus `d_r` for MLA-Decoupled.
    pub fn qk_head_dim(&self) -> usize {
        match self.variant {
            AttentionVariant::MlaDecoupled => self.head_dim + self.rope_dim,
            _ => self.head_dim,
        }
    }

    /// Values cached per token and layer during decoding.
    ///
    /// * MHA: keys and values of every head, `2·H·d_h`.
    /// * MLA-PreRoPE: the latent `r_kv` (twice with input placement: rotated and not).
    /// * MLA-Decoupled: the latent and the shared rotary key, `r_kv + d_r`.
    pub fn kv_cache_values_per_token(&self) -> usize {
        match self.variant {
            AttentionVariant::Mha => 2 * self.n_heads * self.head_dim,
            AttentionVariant::MlaPreRope => match self.prerope_placement {
                PreRopePlacement::Latent => self.kv_latent_width(),
                PreRopePlacement::Input => 2 * self.kv_latent_width(),
            },
            AttentionVariant::MlaDecoupled => self.kv_latent_width() + self.rope_dim,
        }
    }

    /// Checks that the configuration is self-consistent.
    pub fn validate(&self) -> Result<(), crate::ModelError> {
        let bad = |what: String| Err(crate::ModelError::Config(what));
        if self.d_model == 0 || self.n_heads == 0 || self.head_dim == 0 {
            return bad(format!(
                "d_model {}, n_heads {}, head_dim {} must all be ≥ 1",
                self.d_model, self.n_heads, self.head_dim
            ));
        }
        if self.rope && !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "rotary needs an even head_dim, got {}",
                self.head_dim
            ));
        }
        if self.variant != AttentionVariant::Mha
            && (self.q_latent_width() == 0 || self.kv_latent_width() == 0)
        {
            return bad("MLA latent widths must be ≥ 1".into());
        }
        if self.variant == AttentionVariant::MlaPreRope && self.rope {
            let widths = match self.prerope_placement {
                PreRopePlacement::Latent => [self.q_latent_width(), self.kv_latent_width()],
                PreRopePlacement::Input => [self.d_model, self.d_model],
            };
            if widths.iter().any(|w| w % 2 != 0) {
                return bad(format!(
                    "PreRoPE rotates widths {widths:?}: they must be even"
                ));
            }
        }
        if self.variant == AttentionVariant::MlaDecoupled
            && (self.rope_dim == 0 || !self.rope_dim.is_multiple_of(2))
        {
            return bad(format!(
                "MLA-Decoupled needs an even rope_dim ≥ 2, got {}",
                self.rope_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta must be > 1, got {}", self.rope_theta));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return bad(format!("init_std must be > 0, got {}", self.init_std));
        }
        Ok(())
    }
}

/// A LLaMA-style decoder: embedding, `n_layers` × (RMSNorm → attention → residual, RMSNorm
/// → SwiGLU → residual), final RMSNorm, output head (tied to the embedding or not).
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Layers.
    pub n_layers: usize,
    /// The attention of every layer.
    pub attention: AttentionConfig,
    /// SwiGLU hidden width.
    pub ffn_hidden: usize,
    /// Context length used in training.
    pub context: usize,
    /// RMSNorm ε.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Tie the output head to the embedding.
    #[config(default = false)]
    pub tie_embeddings: bool,
}

impl LlamaConfig {
    /// LLaMA-130M as in the paper (DESIGN.md): d 768, 12 layers × 12 heads of 64, SwiGLU
    /// 2048, RMSNorm 1e-6, N(0, 0.02), T5 vocabulary (32 100), context 256.
    pub fn paper(variant: AttentionVariant) -> Self {
        let attention = AttentionConfig::new(768, 12, 64, variant).with_max_seq_len(1024);
        LlamaConfig::new(32_100, 12, attention, 2048, 256)
    }

    /// The same code at a size that trains on two CPU cores in minutes: d 128, 4 layers × 4
    /// heads of 32, SwiGLU 352, vocabulary 2048, context 64.
    pub fn tiny(variant: AttentionVariant) -> Self {
        let attention = AttentionConfig::new(128, 4, 32, variant)
            .with_rope_dim(16)
            .with_max_seq_len(512);
        LlamaConfig::new(2048, 4, attention, 352, 64)
    }

    /// A preset by name (`paper`, `tiny`).
    pub fn preset(name: &str, variant: AttentionVariant) -> Option<Self> {
        match name {
            "paper" => Some(Self::paper(variant)),
            "tiny" => Some(Self::tiny(variant)),
            _ => None,
        }
    }

    /// Weights that multiply activations, `N`: every Linear (attention, SwiGLU, output head)
    /// and, when tied, the embedding used as the head; not the embedding lookup nor the
    /// RMSNorm gains.
    ///
    /// # Example
    /// ```
    /// use attn_models::{AttentionVariant, LlamaConfig};
    /// let c = LlamaConfig::paper(AttentionVariant::Mha);
    /// // 12 · (4·768² + 3·768·2048) + 768·32100
    /// assert_eq!(c.matmul_parameters(), 12 * (4 * 768 * 768 + 3 * 768 * 2048) + 768 * 32100);
    /// ```
    pub fn matmul_parameters(&self) -> usize {
        let a = &self.attention;
        let (d, h, hd, dv) = (a.d_model, a.n_heads, a.head_dim, a.value_width());
        let attention = match a.variant {
            AttentionVariant::Mha => d * h * hd * 2 + 2 * d * h * dv,
            _ => {
                let dr = if a.variant == AttentionVariant::MlaDecoupled {
                    a.rope_dim
                } else {
                    0
                };
                let (rq, rkv) = (a.q_latent_width(), a.kv_latent_width());
                d * rq + rq * h * (hd + dr) + d * (rkv + dr) + rkv * h * (hd + dv) + h * dv * d
            }
        };
        self.n_layers * (attention + 3 * d * self.ffn_hidden) + d * self.vocab_size
    }

    /// Training FLOPs per token, PaLM's count (Chowdhery et al. 2022, App. B):
    /// `6N + 6·L·H·s·(d_qk + d_v)` — forward and backward of every weight matmul, plus the
    /// two attention matmuls over the full (unmasked) `s × s` at context `s`. MLA-PreRoPE's
    /// second up-projection of the rotated latent is not counted (it is not a parameter of
    /// its own), so its model FLOPs utilisation is slightly understated.
    pub fn training_flops_per_token(&self) -> f64 {
        let a = &self.attention;
        let attention =
            self.n_layers * a.n_heads * self.context * (a.qk_head_dim() + a.value_width());
        6.0 * self.matmul_parameters() as f64 + 6.0 * attention as f64
    }

    /// Checks that the configuration is self-consistent.
    pub fn validate(&self) -> Result<(), crate::ModelError> {
        self.attention.validate()?;
        if self.vocab_size == 0 || self.n_layers == 0 || self.ffn_hidden == 0 || self.context == 0 {
            return Err(crate::ModelError::Config(format!(
                "vocab_size {}, n_layers {}, ffn_hidden {}, context {} must all be ≥ 1",
                self.vocab_size, self.n_layers, self.ffn_hidden, self.context
            )));
        }
        if self.context > self.attention.max_seq_len {
            return Err(crate::ModelError::Config(format!(
                "context {} exceeds the rotary table length max_seq_len {}",
                self.context, self.attention.max_seq_len
            )));
        }
        Ok(())
    }
}
