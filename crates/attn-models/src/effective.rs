//! Effective query/key weights of every attention layer (DESIGN.md), for the spectral
//! diagnostics: the probe and `cargo xtask diagnose` consume the same
//! [`rmt_core::effective::AttentionLayer`].

use crate::ModelError;
use crate::attention::Attention;
use crate::export::to_f32;
use crate::transformer::Llama;
use burn::nn::{Linear, RmsNorm};
use burn::prelude::*;
use rmt_core::effective::{AttentionLayer, MlaWeights, RowMajor, mha_effective, mla_effective};

/// Anything that can list its attention layers' effective `Q, K ∈ ℝ^{m×d}` (rows grouped
/// by head). Implemented for this crate's models; implement it for any other burn model to
/// use the probe on it.
pub trait EffectiveQk {
    /// One entry per attention layer, in order.
    ///
    /// # Errors
    /// Weights whose shapes contradict the head count.
    fn effective_qk(&self) -> Result<Vec<AttentionLayer>, ModelError>;
}

fn row_major<B: Backend>(l: &Linear<B>) -> Result<RowMajor, ModelError> {
    let w = l.weight.val().transpose(); // [out, in]
    let [rows, cols] = w.dims();
    Ok(RowMajor::new(to_f32(w), rows, cols)?)
}

fn gain<B: Backend>(n: &Option<RmsNorm<B>>) -> Option<Vec<f32>> {
    n.as_ref().map(|n| to_f32(n.gamma.val()))
}

impl<B: Backend> Attention<B> {
    /// This layer's effective `Q, K` (index `index`).
    pub fn effective_qk(&self, index: usize) -> Result<AttentionLayer, ModelError> {
        Ok(match self {
            Attention::Mha(a) => {
                mha_effective(index, self.heads(), row_major(&a.wq)?, row_major(&a.wk)?)?
            }
            Attention::Mla(a) => mla_effective(
                index,
                self.heads(),
                MlaWeights {
                    q_down: Some((row_major(&a.q_down)?, gain(&a.q_norm))),
                    q_up: row_major(&a.q_up)?,
                    kv_down: row_major(&a.kv_down)?,
                    kv_norm: gain(&a.kv_norm),
                    kv_up: row_major(&a.kv_up)?,
                },
            )?,
        })
    }
}

impl<B: Backend> EffectiveQk for Llama<B> {
    fn effective_qk(&self) -> Result<Vec<AttentionLayer>, ModelError> {
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, b)| b.attention.effective_qk(i))
            .collect()
    }
}
