//! Activation space, on a fixed probe batch: per layer and head, the spectrum of the scaled
//! scores `S = QKᵀ/√d_k`, the attention matrix's `σ₁`, `σ₂` and gap (seed 002's quantity
//! during training), its stable rank, and its entropy in bits (seed 000, Appendix B).

use crate::ProbeError;
use crate::readback::{read, to_f32};
use attn_models::AttentionMaps;
use burn::prelude::*;
use burn::tensor::Transaction;
use nalgebra::DMatrix;
use rmt_core::diagnostics::{DiagnosticsConfig, EntryMoments, diagnose_gram};
use rmt_core::linalg::row_major_view;
use rmt_core::spectra::singular_values;

/// One layer's scores and attention matrices on the host, in f32: `[b, H, s, s]` each.
#[derive(Debug, Clone)]
pub struct LayerMaps {
    /// Layer index.
    pub layer: usize,
    /// Batch size `b`.
    pub batch: usize,
    /// Heads `H`.
    pub heads: usize,
    /// Sequence length `s`.
    pub seq: usize,
    /// Scaled scores before the mask.
    pub scores: Vec<f32>,
    /// Attention after the causal softmax (and gap removal, if the model has it).
    pub probs: Vec<f32>,
}

/// One layer's maps as read from the device, still in the device's dtype (bf16 on CUDA):
/// [`RawLayerMaps::widen`] converts them on a worker, off the training thread.
#[derive(Debug, Clone)]
pub struct RawLayerMaps {
    /// Layer index.
    pub layer: usize,
    /// Scaled scores before the mask, `[b, H, s, s]`.
    pub scores: TensorData,
    /// Attention after the causal softmax (and gap removal), `[b, H, s, s]`.
    pub probs: TensorData,
}

/// Reads every layer's maps to the host in one transaction.
///
/// # Errors
/// A device error while reading.
pub fn read_maps<B: Backend>(maps: Vec<AttentionMaps<B>>) -> Result<Vec<RawLayerMaps>, ProbeError> {
    let layers = maps.len();
    let transaction = maps.into_iter().fold(Transaction::<B>::default(), |t, m| {
        t.register(m.scores).register(m.probs)
    });
    let mut data = read(transaction)?.into_iter();
    Ok((0..layers)
        .map(|layer| RawLayerMaps {
            layer,
            scores: data.next().expect("one datum per registered tensor"),
            probs: data.next().expect("one datum per registered tensor"),
        })
        .collect())
}

impl RawLayerMaps {
    /// The maps in f32.
    ///
    /// # Errors
    /// Maps that are not `[b, H, s, s]` float tensors of one shape.
    pub fn widen(self) -> Result<LayerMaps, ProbeError> {
        let dims = self.scores.shape.to_vec();
        if dims.len() != 4 || dims[2] != dims[3] || self.probs.shape.to_vec() != dims {
            return Err(ProbeError::Format(format!(
                "layer {}: attention maps of shapes {:?} and {:?}, expected two equal [b, H, s, s]",
                self.layer,
                dims,
                self.probs.shape.to_vec()
            )));
        }
        Ok(LayerMaps {
            layer: self.layer,
            batch: dims[0],
            heads: dims[1],
            seq: dims[2],
            scores: to_f32(self.scores)?,
            probs: to_f32(self.probs)?,
        })
    }
}

/// The activation metrics of one head of one layer, averaged over the batch, as
/// `(metric, value)` pairs.
pub fn head_metrics(maps: &LayerMaps, head: usize) -> Result<Vec<(&'static str, f64)>, ProbeError> {
    let s = maps.seq;
    let config = DiagnosticsConfig::default();
    let mut sums: Vec<(&'static str, f64)> = Vec::new();
    let mut add = |name: &'static str, v: f64| match sums.iter_mut().find(|(n, _)| *n == name) {
        Some((_, acc)) => *acc += v,
        None => sums.push((name, v)),
    };
    let mut entropy_defined = true;
    for b in 0..maps.batch {
        let offset = ((b * maps.heads) + head) * s * s;
        let block =
            |data: &[f32]| DMatrix::<f64>::from_fn(s, s, |i, j| data[offset + i * s + j] as f64);
        // Scores: MP diagnostics of G_S = S Sᵀ / s with the paper's empirical σ².
        let scores = block(&maps.scores);
        let (sum, sum2) = scores
            .iter()
            .fold((0.0, 0.0), |(a, b), x| (a + x, b + x * x));
        let g: Vec<f64> = (&scores * scores.transpose() / s as f64)
            .transpose()
            .iter()
            .copied()
            .collect();
        let diag = diagnose_gram(
            row_major_view(&g, s, s)?,
            EntryMoments::from_sums(sum, sum2, s * s),
            s,
            Some(head),
            &config,
            None,
        )?;
        let m = diag.diagnoses[0].metrics;
        add("scores_lambda_max", m.lambda_max);
        add("scores_mp_gap", m.mp_gap);
        add("scores_outlier_count", m.outlier_count as f64);
        add("scores_outlier_energy", m.outlier_energy);
        add("scores_mp_soft_rank", m.mp_soft_rank);
        add("scores_stable_rank", m.stable_rank);
        // Attention matrix: leading singular values, their gap, stable rank, entropy.
        let a = block(&maps.probs);
        let sv = singular_values(&a)?;
        let (s1, s2) = (sv[0], sv.get(1).copied().unwrap_or(0.0));
        add("attn_sigma1", s1);
        add("attn_sigma2", s2);
        add("attn_gap", s1 - s2);
        add(
            "attn_stable_rank",
            sv.iter().map(|x| x * x).sum::<f64>() / (s1 * s1),
        );
        if a.iter().any(|&p| p < -1e-6) {
            entropy_defined = false;
        } else {
            let h: f64 = a
                .row_iter()
                .map(|row| {
                    -row.iter()
                        .filter(|&&p| p > 0.0)
                        .map(|&p| p * p.log2())
                        .sum::<f64>()
                })
                .sum::<f64>()
                / s as f64;
            add("attn_entropy_bits", h);
        }
    }
    let n = maps.batch as f64;
    let mut out: Vec<(&'static str, f64)> = sums.into_iter().map(|(k, v)| (k, v / n)).collect();
    if !entropy_defined {
        // Gap-removed attention has negative entries: no distribution, no entropy.
        out.retain(|(k, _)| *k != "attn_entropy_bits");
    }
    Ok(out)
}
