//! # attn-models
//!
//! Every model the two papers train, on burn 0.21, generic over `B: Backend` (the CPU ndarray
//! backend by default, CUDA behind the `cuda` feature):
//!
//! * a LLaMA-style decoder ([`Llama`], [`LlamaConfig`] with the `paper` and `tiny` presets)
//!   with a pluggable [`Attention`]: [`AttentionVariant::Mha`], `MlaPreRope` and
//!   `MlaDecoupled`, each with an optional gap removal (`A − U`, seed 002);
//! * KV-cache decoding for all three, MLA caching only its latents, and MLA's absorbed-matrix
//!   path;
//! * effective `Q, K` weights of every layer ([`EffectiveQk`]) for the spectral diagnostics;
//! * safetensors export/import under HF LLaMA and DeepSeek-V2 names ([`export`]);
//! * the attention-only model of seed 002 ([`attention_only`]);
//! * a per-backend registry of fused kernels for RMSNorm and the causal softmax ([`fused`]),
//!   which the models use when a backend (the CUDA one in `experiments`) provides them.
#![warn(missing_docs)]

pub mod attention;
pub mod attention_only;
pub mod cache;
pub mod config;
pub mod effective;
pub mod export;
pub mod fused;
pub mod rope;
pub mod transformer;

pub use attention::{Attention, AttentionMaps};
pub use cache::LayerCache;
pub use config::{AttentionConfig, AttentionVariant, LlamaConfig, PreRopePlacement};
pub use effective::{EffectiveQk, EffectiveQkTensors, QkTensors};
pub use transformer::{Block, Llama};

/// Errors of model construction, export and import.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A configuration that contradicts itself.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A checkpoint that cannot be read or does not match the model.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// File system errors.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Errors from rmt-core (effective weights).
    #[error(transparent)]
    Rmt(#[from] rmt_core::RmtError),
    /// A device error while reading weights.
    #[error("device: {0}")]
    Device(String),
}

/// Forces every lazily initialised parameter of `module` to take its value now.
///
/// burn initialises parameters lazily, on first use, and a clone of a module made before that
/// carries the initialiser rather than the values: two clones would draw two different
/// models. Every constructor in this crate calls this, so a model's clones share its weights.
pub fn materialize<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(module: &M) {
    struct Touch;
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}
