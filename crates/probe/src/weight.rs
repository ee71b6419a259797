//! Weight space: `M = QKᵀ` and `G = MMᵀ/d` of every layer (and head) on the training device,
//! then rmt-core's MP diagnostics on the host.

use crate::ProbeError;
use burn::prelude::*;
use burn::tensor::DType;
use rmt_core::diagnostics::{
    DiagnosticsConfig, EntryMoments, Factorization, SpectrumDiagnostics, diagnose_gram,
};
use rmt_core::effective::AttentionLayer;
use rmt_core::linalg::row_major_view;

/// What the device hands to the host for one layer: `G` and the moments of `M`, whole and
/// per head (`f32`, row-major).
#[derive(Debug, Clone)]
pub struct LayerGrams {
    /// Layer index.
    pub layer: usize,
    /// Heads.
    pub heads: usize,
    /// Rows `m` of `Q` and `K`.
    pub rows: usize,
    /// Model width `d`.
    pub width: usize,
    /// Factor shapes of `M` (product null).
    pub factorization: Factorization,
    /// `G = MMᵀ/d`, `[m, m]`.
    pub gram: Vec<f32>,
    /// Moments of `M`'s entries.
    pub moments: EntryMoments,
    /// Per head `(G_h [d_k, d_k], moments of M_h)`, when asked for.
    pub head_grams: Vec<(Vec<f32>, EntryMoments)>,
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("converted to f32")
}

/// Forms `M` and `G` on `device` in f32 (one batched product per layer and per head group)
/// and copies `G` and the two reductions of `M` back.
pub fn device_grams<B: Backend>(
    layers: &[AttentionLayer],
    per_head: bool,
    device: &B::Device,
) -> Vec<LayerGrams> {
    layers
        .iter()
        .map(|layer| {
            let (m, d, h) = (layer.rows, layer.width, layer.kind.heads());
            let q = Tensor::<B, 2>::from_data(
                TensorData::new(layer.q.clone(), [m, d]),
                (device, DType::F32),
            );
            let k = Tensor::<B, 2>::from_data(
                TensorData::new(layer.k.clone(), [m, d]),
                (device, DType::F32),
            );
            let mm = q.clone().matmul(k.clone().transpose());
            let sums = host(Tensor::cat(
                vec![mm.clone().sum(), mm.clone().powi_scalar(2).sum()],
                0,
            ));
            let moments = EntryMoments::from_sums(sums[0] as f64, sums[1] as f64, m * m);
            let gram = host(mm.clone().matmul(mm.transpose()).div_scalar(d as f64));
            let head_grams = if per_head {
                let dk = m / h;
                let mh = q
                    .reshape([h, dk, d])
                    .matmul(k.reshape([h, dk, d]).swap_dims(1, 2)); // [h, dk, dk]
                let sum = host(mh.clone().sum_dim(2).sum_dim(1));
                let sum2 = host(mh.clone().powi_scalar(2).sum_dim(2).sum_dim(1));
                let g = host(mh.clone().matmul(mh.swap_dims(1, 2)).div_scalar(d as f64));
                (0..h)
                    .map(|i| {
                        let block = g[i * dk * dk..(i + 1) * dk * dk].to_vec();
                        (
                            block,
                            EntryMoments::from_sums(sum[i] as f64, sum2[i] as f64, dk * dk),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            LayerGrams {
                layer: layer.index,
                heads: h,
                rows: m,
                width: d,
                factorization: layer.factorization.clone(),
                gram,
                moments,
                head_grams,
            }
        })
        .collect()
}

/// `(head, diagnostics)` of one layer on the host: the whole layer (`None`) and each head.
pub fn diagnose(
    grams: &LayerGrams,
    config: &DiagnosticsConfig,
) -> Result<Vec<SpectrumDiagnostics>, ProbeError> {
    let whole_config = DiagnosticsConfig {
        per_head: false,
        ..config.clone()
    };
    let mut out = vec![diagnose_gram(
        row_major_view(&grams.gram, grams.rows, grams.rows)?,
        grams.moments,
        grams.width,
        None,
        &whole_config,
        Some(&grams.factorization),
    )?];
    let dk = grams.rows / grams.heads.max(1);
    let head_config = DiagnosticsConfig {
        fast_path: false,
        ..whole_config
    };
    for (h, (g, moments)) in grams.head_grams.iter().enumerate() {
        out.push(diagnose_gram(
            row_major_view(g, dk, dk)?,
            *moments,
            grams.width,
            Some(h),
            &head_config,
            Some(&grams.factorization),
        )?);
    }
    Ok(out)
}
