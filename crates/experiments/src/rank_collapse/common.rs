//! Shared pieces of the seed-002 reproduction: inputs, the burn model on the host in f64,
//! stable ranks, statistics, seeds and CSV output.

use crate::{ExperimentError, io_err};
use attn_models::attention_only::{AttentionInit, AttentionOnly, AttentionOnlyConfig, ValueScale};
use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::prelude::*;
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// The backend of every measurement: burn's CPU backend in f64, so that deep products of
/// unit-variance value matrices (norms growing like `d^{ℓ/2}`) neither overflow nor lose the
/// small excess `srank − 1 = O(n^{1−2ℓ})` of Prop 3 to rounding.
pub type Host = NdArray<f64>;
/// [`Host`] with autodiff, for gradient norms and training.
pub type HostAd = Autodiff<Host>;

/// The CPU device of [`Host`], its tensors f64. burn 0.21 keys a device's default float dtype
/// by the device's type, which every `NdArray<E, I>` shares: the first backend to create a
/// tensor on the CPU sets the dtype the others' parameters and random tensors get. After an
/// f32 computation in the same process these measurements would silently run in f32; that is
/// an error instead.
pub fn host_device() -> Result<burn::backend::ndarray::NdArrayDevice, ExperimentError> {
    let device = Default::default();
    let dtype = burn::tensor::get_device_settings::<Host>(&device).float_dtype;
    if dtype != burn::tensor::FloatDType::F64 {
        return Err(ExperimentError::Invalid(format!(
            "the CPU backend's default float dtype is already {dtype:?} in this process; the \
             seed-002 measurements need f64: run them in a process of their own"
        )));
    }
    Ok(device)
}

/// A seeded generator for task `parts` under `base` (SplitMix64 mixing of the parts).
pub fn rng_for(base: u64, parts: &[u64]) -> rand_pcg::Pcg64 {
    let mut h = base ^ 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h = splitmix(h ^ p.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    }
    rand_pcg::Pcg64::seed_from_u64(h)
}

/// One SplitMix64 step.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An `n×d` matrix with orthonormal rows (`XXᵀ = I_n`, the isometric input of the theory),
/// from the QR factorisation of a Gaussian matrix.
pub fn isometric<R: rand::Rng>(n: usize, d: usize, rng: &mut R) -> DMatrix<f64> {
    let g = DMatrix::<f64>::from_fn(d, n, |_, _| StandardNormal.sample(rng));
    g.qr().q().transpose()
}

/// A `d×d` Haar-orthogonal matrix.
pub fn orthogonal<R: rand::Rng>(d: usize, rng: &mut R) -> DMatrix<f64> {
    let g = DMatrix::<f64>::from_fn(d, d, |_, _| StandardNormal.sample(rng));
    let qr = g.qr();
    let (q, r) = (qr.q(), qr.r());
    // Fix the signs so the law is Haar.
    let mut q = q;
    for j in 0..d {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    q
}

/// A host matrix as a burn tensor `[1, rows, cols]`.
pub fn tensor3<B: Backend>(x: &DMatrix<f64>, device: &B::Device) -> Tensor<B, 3> {
    tensor2::<B>(x, device).unsqueeze::<3>()
}

/// A host matrix as a burn tensor `[rows, cols]`.
pub fn tensor2<B: Backend>(x: &DMatrix<f64>, device: &B::Device) -> Tensor<B, 2> {
    let (r, c) = x.shape();
    let v: Vec<f64> = (0..r)
        .flat_map(|i| (0..c).map(move |j| (i, j)))
        .map(|(i, j)| x[(i, j)])
        .collect();
    Tensor::from_data(TensorData::new(v, [r, c]), device)
}

/// Batch item `b` of a `[batch, rows, cols]` tensor as a host matrix.
pub fn matrix_of<B: Backend>(t: &Tensor<B, 3>, b: usize) -> Result<DMatrix<f64>, ExperimentError> {
    let [_, r, c] = t.dims();
    let v = t
        .clone()
        .slice([b..b + 1, 0..r, 0..c])
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_err(|e| ExperimentError::Invalid(format!("tensor data: {e:?}")))?;
    Ok(DMatrix::from_row_slice(r, c, &v))
}

/// The architecture switches of A.3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    /// Residual connection.
    pub skip: bool,
    /// LayerNorm after each layer.
    pub ln: bool,
}

impl Arch {
    /// The four variants of the paper's figures, in legend order.
    pub const ALL: [Arch; 4] = [
        Arch {
            skip: false,
            ln: false,
        },
        Arch {
            skip: false,
            ln: true,
        },
        Arch {
            skip: true,
            ln: false,
        },
        Arch {
            skip: true,
            ln: true,
        },
    ];

    /// `plain`, `+ LN`, `+ skip`, `+ skip + LN`.
    pub fn name(&self) -> &'static str {
        match (self.skip, self.ln) {
            (false, false) => "plain",
            (false, true) => "+ LN",
            (true, false) => "+ skip",
            (true, true) => "+ skip + LN",
        }
    }

    /// A file-name friendly tag.
    pub fn tag(&self) -> &'static str {
        match (self.skip, self.ln) {
            (false, false) => "plain",
            (false, true) => "ln",
            (true, false) => "skip",
            (true, true) => "skip_ln",
        }
    }
}

/// `"A"` or `"A − 1ₙₙ/n"` (the legend suffix of the gap removal).
pub fn gap_name(gap_removed: bool) -> &'static str {
    if gap_removed { "A − 1ₙₙ/n" } else { "A" }
}

/// The attention kind's short name.
pub fn attention_name(a: &AttentionInit) -> &'static str {
    match a {
        AttentionInit::KeyQuery { xavier: false } => "key-query",
        AttentionInit::KeyQuery { xavier: true } => "key-query (Xavier)",
        AttentionInit::RandomMarkov { .. } => "Random Markov",
        AttentionInit::Identity => "identity",
    }
}

/// The model configuration of one variant.
pub fn model_config(
    n: usize,
    d: usize,
    depth: usize,
    attention: AttentionInit,
    arch: Arch,
    gap_removed: bool,
    seed: u64,
) -> AttentionOnlyConfig {
    AttentionOnlyConfig::new(n, d, depth, attention)
        .with_skip(arch.skip)
        .with_layer_norm(arch.ln)
        .with_gap_removed(gap_removed)
        .with_value_scale(ValueScale::Unit)
        .with_seed(seed)
}

/// Replaces every value matrix by a Haar-orthogonal one (the paper's "orthogonal values"
/// control of rank collapse in depth).
pub fn orthogonal_values<B: Backend>(model: &mut AttentionOnly<B>, seed: u64, device: &B::Device) {
    let mut rng = rng_for(seed, &[0x0A7]);
    for layer in &mut model.layers {
        let d = layer.value.dims()[0];
        layer.value = Param::from_tensor(tensor2::<B>(&orthogonal(d, &mut rng), device));
    }
}

/// Every layer's output `X_1 … X_L` of one model for input `x0`, as host matrices.
pub fn layer_outputs(
    config: &AttentionOnlyConfig,
    orthogonal: bool,
    x0: &DMatrix<f64>,
) -> Result<Vec<DMatrix<f64>>, ExperimentError> {
    let device = host_device()?;
    let mut model = config.init::<Host>(&device)?;
    if orthogonal {
        orthogonal_values(&mut model, config.seed, &device);
    }
    model
        .forward_all(tensor3::<Host>(x0, &device))
        .iter()
        .map(|t| matrix_of(t, 0))
        .collect()
}

/// Stable rank of the covariance `Σ = XXᵀ` (seed 002, eq. 4): `Σλᵢ²/λ₁²` over the
/// eigenvalues of `Σ`. `X` is first scaled to unit Frobenius norm (the stable rank is
/// scale-free), so deep unnormalised products cannot overflow. NaN for a zero or
/// non-finite `X`.
pub fn covariance_stable_rank(x: &DMatrix<f64>) -> f64 {
    covariance_spectrum(x, true)
        .and_then(|ev| {
            let sq: Vec<f64> = ev.iter().map(|l| l * l).collect();
            rmt_core::spectra::stable_rank_of_spectrum(&sq).ok()
        })
        .unwrap_or(f64::NAN)
}

/// Eigenvalues of `XXᵀ` (descending), optionally after scaling `X` to unit Frobenius norm.
pub fn covariance_spectrum(x: &DMatrix<f64>, normalise: bool) -> Option<Vec<f64>> {
    let norm = x.norm();
    if !(norm.is_finite() && norm > 0.0) {
        return None;
    }
    let scale = if normalise { 1.0 / (norm * norm) } else { 1.0 };
    let g = rmt_core::spectra::gram(x, scale).ok()?;
    rmt_core::spectra::symmetric_eigenvalues(&g).ok()
}

/// Mean and (sample, n − 1) standard deviation of the finite values; NaN when none.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = f.iter().sum::<f64>() / f.len() as f64;
    if f.len() < 2 {
        return (m, 0.0);
    }
    let var = f.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (f.len() - 1) as f64;
    (m, var.sqrt())
}

/// Least-squares slope of `log y` against `log x` over the points with finite positive
/// coordinates; NaN with fewer than two.
pub fn log_log_slope(x: &[f64], y: &[f64]) -> f64 {
    let pts: Vec<(f64, f64)> = x
        .iter()
        .zip(y)
        .filter(|(a, b)| a.is_finite() && b.is_finite() && **a > 0.0 && **b > 0.0)
        .map(|(a, b)| (a.ln(), b.ln()))
        .collect();
    if pts.len() < 2 {
        return f64::NAN;
    }
    let k = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / k;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / k;
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    sxy / sxx
}

/// A CSV table, written with the csv crate.
#[derive(Debug, Clone, Default)]
pub struct Csv {
    /// Column names.
    pub header: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<String>>,
}

impl Csv {
    /// A table with the given columns.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Writes `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), ExperimentError> {
        let path = dir.join(name);
        let mut w = csv::Writer::from_path(&path).map_err(|e| ExperimentError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let csv_err = |e: csv::Error| ExperimentError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        };
        w.write_record(&self.header).map_err(csv_err)?;
        for r in &self.rows {
            w.write_record(r).map_err(csv_err)?;
        }
        w.flush().map_err(io_err(&path))
    }
}

/// A number for a CSV cell (full precision, `NaN` kept).
pub fn cell(v: f64) -> String {
    format!("{v}")
}
