//! Weight space: `M = QKᵀ` and `G = MMᵀ/d` of every layer (and head) on the training device,
//! then rmt-core's MP diagnostics on the host.

use crate::ProbeError;
use crate::readback::{read, to_f32};
use attn_models::QkTensors;
use burn::prelude::*;
use burn::tensor::Transaction;
use rmt_core::diagnostics::{
    DiagnosticsConfig, EntryMoments, Factorization, SpectrumDiagnostics, diagnose_gram,
};
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

/// Forms `M` and `G` on the layers' device in f32 (one batched product per layer and per
/// head group) and copies `G` and the two reductions of `M` back, every layer in one read.
///
/// # Errors
/// A device error while reading.
pub fn device_grams<B: Backend>(
    layers: Vec<QkTensors<B>>,
    per_head: bool,
) -> Result<Vec<LayerGrams>, ProbeError> {
    let mut transaction = Transaction::<B>::default();
    let mut shapes = Vec::with_capacity(layers.len());
    for layer in layers {
        let [m, d] = layer.q.dims();
        let h = layer.kind.heads();
        shapes.push((layer.index, m, d, h, layer.factorization));
        let (q, k) = (layer.q, layer.k);
        let mm = q.clone().matmul(k.clone().transpose());
        transaction = transaction
            .register(Tensor::cat(
                vec![mm.clone().sum(), mm.clone().powi_scalar(2).sum()],
                0,
            ))
            .register(mm.clone().matmul(mm.transpose()).div_scalar(d as f64));
        if per_head {
            let dk = m / h;
            let mh = q
                .reshape([h, dk, d])
                .matmul(k.reshape([h, dk, d]).swap_dims(1, 2)); // [h, dk, dk]
            transaction = transaction
                .register(mh.clone().sum_dim(2).sum_dim(1))
                .register(mh.clone().powi_scalar(2).sum_dim(2).sum_dim(1))
                .register(mh.clone().matmul(mh.swap_dims(1, 2)).div_scalar(d as f64));
        }
    }
    let mut data = read(transaction)?.into_iter();
    let mut next = || to_f32(data.next().expect("one datum per registered tensor"));
    shapes
        .into_iter()
        .map(|(index, m, d, h, factorization)| {
            let sums = next()?;
            let moments = EntryMoments::from_sums(sums[0] as f64, sums[1] as f64, m * m);
            let gram = next()?;
            let head_grams = if per_head {
                let dk = m / h;
                let (sum, sum2, g) = (next()?, next()?, next()?);
                (0..h)
                    .map(|i| {
                        (
                            g[i * dk * dk..(i + 1) * dk * dk].to_vec(),
                            EntryMoments::from_sums(sum[i] as f64, sum2[i] as f64, dk * dk),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Ok(LayerGrams {
                layer: index,
                heads: h,
                rows: m,
                width: d,
                factorization,
                gram,
                moments,
                head_grams,
            })
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
