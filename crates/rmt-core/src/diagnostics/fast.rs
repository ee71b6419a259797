//! The partial-spectrum path: the paper's metrics need `λ₁`, the number of eigenvalues above
//! `λ₊` and their sum, and `tr G` — not the whole spectrum.
//!
//! * The count is the inertia of `G − λ₊I` (one Bunch–Kaufman `LBLᵀ`, `m³/3` flops;
//!   Sylvester's law of inertia).
//! * `λ₁ … λ_k` come from a block Krylov space with full reorthogonalisation and
//!   Rayleigh–Ritz. With orthonormal Ritz vectors `Y` and residual `R = GY − YΘ`, Kahan's
//!   theorem places `k` *distinct* eigenvalues of `G` within `‖R‖₂` of the Ritz values, and
//!   Cauchy interlacing gives `θᵢ ≤ λᵢ`. So when `θ_k > λ₊ + ‖R‖₂` and exactly `k`
//!   eigenvalues exceed `λ₊`, the Ritz values match the top `k` to within `‖R‖₂` each.
//! * With no outlier, `λ₁ ∈ [θ₁, θ₁ + ‖R‖₂]` is certified by a second inertia at
//!   `θ₁ + ‖R‖₂`.
//!
//! Whenever a certificate fails (too many outliers, slow convergence), the caller falls back
//! to the full spectrum.

use crate::linalg::{par, shifted_inertia};
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatRef};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// What the partial path found: `λ₁`, and per edge `(count above, sum above)`.
pub(crate) struct PartialSpectrum {
    pub lambda_max: f64,
    pub outliers: Vec<(usize, f64)>,
}

/// Relative residual accepted: `‖R‖₂ ≤ RESIDUAL_TOLERANCE·‖G‖₂`.
const RESIDUAL_TOLERANCE: f64 = 1e-10;
/// Largest outlier count handled by the Krylov path (beyond, the full spectrum is cheaper).
const MAX_OUTLIERS: usize = 96;

/// Computes the partial spectrum against each edge, or `None` when it cannot certify it.
pub(crate) fn partial_spectrum(g: MatRef<'_, f64>, edges: &[f64]) -> crate::Result<Option<PartialSpectrum>> {
    let n = g.nrows();
    if n < 64 {
        return Ok(None); // small: the full spectrum is cheapest
    }
    let counts: Vec<usize> = edges.iter().map(|&e| shifted_inertia(g, e).positive).collect();
    let k_max = *counts.iter().max().unwrap_or(&0);
    if k_max > MAX_OUTLIERS || 4 * k_max > n {
        return Ok(None);
    }
    let wanted = k_max.max(1);
    let Some((theta, residual)) = top_ritz_values(g, wanted) else {
        return Ok(None);
    };
    let lambda_max = theta[0];
    let mut outliers = Vec::with_capacity(edges.len());
    for (&edge, &count) in edges.iter().zip(&counts) {
        if count > 0 && theta[count - 1] <= edge + residual {
            return Ok(None); // an outlier too close to the edge to certify
        }
        outliers.push((count, theta[..count].iter().sum()));
    }
    if k_max == 0 && shifted_inertia(g, lambda_max + residual).positive != 0 {
        return Ok(None);
    }
    Ok(Some(PartialSpectrum { lambda_max, outliers }))
}

/// The `wanted` largest Ritz values of symmetric `g` (lower triangle valid, but `g` here is
/// full) and the spectral norm of the residual block, once it is below tolerance; `None`
/// if the Krylov space reaches its size limit first.
fn top_ritz_values(g: MatRef<'_, f64>, wanted: usize) -> Option<(Vec<f64>, f64)> {
    let n = g.nrows();
    let block = (wanted + 4).clamp(8, 32);
    let max_dim = (8 * wanted + 160).min(n);
    let mut rng = rand_pcg::Pcg64::seed_from_u64(0x5eed);
    let mut basis = Mat::<f64>::zeros(n, max_dim); // orthonormal Krylov basis
    let mut image = Mat::<f64>::zeros(n, max_dim); // G·basis
    let mut next = Mat::<f64>::from_fn(n, block, |_, _| StandardNormal.sample(&mut rng));
    let mut t_full = Mat::<f64>::zeros(max_dim, max_dim); // basisᵀ·G·basis
    let mut dim = 0;
    let mut blocks = 0usize;
    let norm_g = frobenius_upper_bound(g);
    while dim + block <= max_dim {
        // Orthonormalise `next` against the basis (twice) and within itself.
        let added = orthonormalize_into(&mut basis, dim, next.as_mut(), 2);
        if added == 0 {
            break;
        }
        let new_cols = basis.as_ref().subcols(dim, added);
        faer::linalg::matmul::matmul(image.as_mut().subcols_mut(dim, added), Accum::Replace, g, new_cols, 1.0, par());
        // New columns of T = VᵀGV.
        let cols = basis.as_ref().subcols(0, dim + added).transpose() * image.as_ref().subcols(dim, added);
        for j in 0..added {
            for i in 0..dim + added {
                t_full[(i, dim + j)] = cols[(i, j)];
                t_full[(dim + j, i)] = cols[(i, j)];
            }
        }
        dim += added;
        blocks += 1;
        // Rayleigh–Ritz every other block once the space can hold the wanted pairs.
        if dim >= 2 * wanted + block && blocks % 2 == 0 {
            let v = basis.as_ref().subcols(0, dim);
            let gv = image.as_ref().subcols(0, dim);
            let t = Mat::from_fn(dim, dim, |i, j| 0.5 * (t_full[(i, j)] + t_full[(j, i)]));
            if let Ok(evd) = t.self_adjoint_eigen(faer::Side::Lower) {
                let s = evd.S();
                let u = evd.U();
                // faer sorts ascending: the wanted ones are the last `wanted` columns.
                let top = u.subcols(dim - wanted, wanted);
                let y = v * top;
                let gy = gv * top;
                let theta: Vec<f64> = (0..wanted).map(|i| s[dim - wanted + i]).collect();
                let mut r = gy.clone();
                for j in 0..wanted {
                    for i in 0..n {
                        r[(i, j)] -= theta[j] * y[(i, j)];
                    }
                }
                // ‖R‖₂ ≤ ‖R‖_F.
                let res = r.norm_l2();
                if res <= RESIDUAL_TOLERANCE * norm_g {
                    let mut desc = theta;
                    desc.reverse();
                    return Some((desc, res));
                }
            }
        }
        // Next block: G applied to the newest block.
        next = image.as_ref().subcols(dim - added, added).to_owned();
    }
    None
}

/// `‖G‖_F ≥ ‖G‖₂`, as the scale for the residual tolerance.
fn frobenius_upper_bound(g: MatRef<'_, f64>) -> f64 {
    g.norm_l2()
}

/// Orthonormalises the columns of `x` against `basis[:, ..dim]` (block classical
/// Gram–Schmidt, `passes` times) and among themselves (modified Gram–Schmidt), appending the
/// ones that survive to `basis`. Returns how many were appended.
fn orthonormalize_into(basis: &mut Mat<f64>, dim: usize, mut x: faer::MatMut<'_, f64>, passes: usize) -> usize {
    let n = basis.nrows();
    for _ in 0..passes {
        if dim > 0 {
            let q = basis.as_ref().subcols(0, dim);
            let c = q.transpose() * x.rb();
            faer::linalg::matmul::matmul(x.rb_mut(), Accum::Add, q, c.as_ref(), -1.0, par());
        }
    }
    let mut added = 0;
    for j in 0..x.ncols() {
        if dim + added >= basis.ncols() {
            break;
        }
        let mut col: Vec<f64> = (0..n).map(|i| x[(i, j)]).collect();
        let original: f64 = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        for _ in 0..2 {
            for p in dim..dim + added {
                let dot: f64 = (0..n).map(|i| basis[(i, p)] * col[i]).sum();
                for (i, c) in col.iter_mut().enumerate() {
                    *c -= dot * basis[(i, p)];
                }
            }
        }
        let norm: f64 = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 1e-10 * original.max(1e-300) {
            for (i, c) in col.iter().enumerate() {
                basis[(i, dim + added)] = c / norm;
            }
            added += 1;
        }
    }
    added
}
